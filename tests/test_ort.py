"""ONNX Runtime runs exported graphs (plugin graphs through ort_ops' lowering, portable as they are)
and matches the float64 PyTorch reference: prefill, decode steps, greedy generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import edgessm
from edgessm.export import export_onnx
from edgessm.export.builder import DOMAIN
from edgessm.export.lowering import LoweringError
from edgessm.runtime import open_backend
from edgessm.runtime.backend import TorchBackend
from edgessm.runtime.generation import generate
from edgessm.runtime.ort import OrtBackend
from edgessm.runtime.ort_ops import lower_custom_ops
from tests.conftest import ALL_CONFIGS, rel_err

CASES = [(name, scan) for name in ("m1-odd", "m1-noconvbias", "m2-g2-h32", "m2-dtlimit") for scan in ("plugin", "portable")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """(float32 model, float64 model, ORT backend) per (config, scan mode), exported once per module."""
    from tests.conftest import save_hf_model

    cache: dict[tuple[str, str], tuple] = {}

    def get(name: str, scan: str):
        if (name, scan) not in cache:
            arch, kwargs = ALL_CONFIGS[name]
            root = tmp_path_factory.mktemp(f"{name}-{scan}")
            _, ckpt = save_hf_model(root, arch, **kwargs)
            # small chunks so the test lengths cover partial and several chunks
            export_onnx(ckpt, root / "onnx", scan=scan, chunk_mamba1=4, chunk_mamba2=8, external_data_threshold=4096)
            cache[name, scan] = (edgessm.load_model(ckpt), edgessm.load_model(ckpt, dtype=torch.float64),
                                 OrtBackend(root / "onnx"))
        return cache[name, scan]

    return get


def _states_err(got, ref) -> float:
    return max(max(rel_err(torch.from_numpy(g.conv), r.conv), rel_err(torch.from_numpy(g.ssm), r.ssm))
               for g, r in zip(got, ref))


@pytest.mark.parametrize("name,scan", CASES)
def test_prefill_matches_float64_reference(name: str, scan: str, exported) -> None:
    _, ref_model, backend = exported(name, scan)
    gen = torch.Generator().manual_seed(hash((name, scan)) % 2**31)
    for length in (1, 3, 8, 21):  # 21: not a multiple of either chunk size
        tokens = torch.randint(0, ref_model.config.vocab_size, (2, length), generator=gen)
        with torch.no_grad():
            ref, ref_states = ref_model(tokens)
        logits, states = backend.prefill(tokens.numpy())
        assert logits.shape == (2, length, ref_model.config.vocab_size) and logits.dtype == np.float32
        assert rel_err(torch.from_numpy(logits), ref) < 1e-4, length
        assert _states_err(states, ref_states) < 1e-4, length


@pytest.mark.parametrize("name,scan", CASES)
def test_decode_steps_match_reference_steps(name: str, scan: str, exported) -> None:
    _, ref_model, backend = exported(name, scan)
    tokens = torch.randint(0, ref_model.config.vocab_size, (3, 12))
    with torch.no_grad():
        _, ref_states = ref_model(tokens[:, :5])
    _, states = backend.prefill(tokens[:, :5].numpy())
    for t in range(5, 12):
        with torch.no_grad():
            ref, ref_states = ref_model.step(tokens[:, t], ref_states)
        logits, states = backend.step(tokens[:, t].numpy(), states)
        assert logits.shape == (3, ref_model.config.vocab_size)
        assert rel_err(torch.from_numpy(logits), ref) < 1e-4, t
        assert _states_err(states, ref_states) < 1e-4, t


def test_decode_from_zero_states_equals_prefill(exported) -> None:
    """The decode graph alone, started from zero states, reproduces the prefill graph's logits."""
    model, _, backend = exported("m2-dtlimit", "portable")
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (2, 6))
    full, _ = backend.prefill(tokens)
    states = backend.zero_states(2)
    for t in range(6):
        logits, states = backend.step(tokens[:, t], states)
        assert rel_err(torch.from_numpy(logits), torch.from_numpy(full[:, t])) < 1e-5


@pytest.mark.parametrize("name,scan", [("m1-odd", "plugin"), ("m2-g2-h32", "portable")])
def test_greedy_generation_equals_torch(name: str, scan: str, exported) -> None:
    model, _, backend = exported(name, scan)
    prompt = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 7))
    ref = generate(TorchBackend(model), prompt, 32)
    got = generate(backend, prompt, 32)
    assert got.new_tokens.shape == (2, 32)
    np.testing.assert_array_equal(got.tokens, ref.tokens)


def test_open_backend_detects_export(exported) -> None:
    _, _, backend = exported("m1-odd", "portable")
    opened = open_backend(backend.dir)
    assert isinstance(opened, OrtBackend) and opened.config == backend.config


def test_lowering_removes_every_custom_node(exported) -> None:
    _, _, backend = exported("m2-g2-h32", "plugin")
    model = onnx.load(str(backend.dir / "prefill.onnx"), load_external_data=False)
    assert any(n.domain == DOMAIN for n in model.graph.node)
    lowered = lower_custom_ops(model)
    assert not any(n.domain == DOMAIN for n in lowered.graph.node)
    assert all(o.domain != DOMAIN for o in lowered.opset_import)


def test_lowering_needs_static_dims() -> None:
    """A custom node whose inputs have unknown shapes is refused with the tensor named."""
    from onnx import TensorProto, helper

    node = helper.make_node("CausalConv1d", ["x", "w", "b"], ["y", "s"], domain=DOMAIN, silu=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "xwb"],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "ys"])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(DOMAIN, 1)])
    with pytest.raises(LoweringError, match=r"input 1 \(w\)"):
        lower_custom_ops(model)


def test_tampered_graph_is_rejected(exported, tmp_path: Path) -> None:
    import shutil

    _, _, backend = exported("m1-noconvbias", "portable")
    copy = tmp_path / "copy"
    shutil.copytree(backend.dir, copy)
    with open(copy / "decode.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(edgessm.errors.ConfigError, match="decode.onnx: sha256"):
        OrtBackend(copy)


def test_bad_inputs_are_explained(exported) -> None:
    _, _, backend = exported("m1-noconvbias", "plugin")
    with pytest.raises(ValueError, match="length>=1"):
        backend.prefill(np.zeros((1, 0), np.int64))
    _, states = backend.prefill(np.zeros((1, 2), np.int64))
    with pytest.raises(ValueError, match="states of 2 layers"):
        backend.step(np.zeros(1, np.int64), states[:1])


@pytest.mark.parametrize(("machine", "flags", "exact"), [
    ("x86_64", "fpu sse2 avx2 fma", False),  # AVX2 only: u8 x s8 pairs saturate in 16 bits
    ("x86_64", "fpu avx2 avx512f avx512_vnni", True),
    ("x86_64", "fpu avx2 avx_vnni", True),
    ("x86_64", "fpu avx2 amx_int8 amx_tile", True),
    ("aarch64", "fp asimd asimddp", True),  # Arm kernels use sdot/smmla: no cpuinfo needed
])
def test_int8_kernels_exact_from_cpu_flags(machine: str, flags: str, exact: bool, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from edgessm.runtime import ort as ort_backend

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\nflags\t\t: {flags}\n")
    monkeypatch.setattr(ort_backend.platform, "machine", lambda: machine)
    assert ort_backend.int8_kernels_exact.__wrapped__(str(cpuinfo)) is exact
    if machine == "x86_64":  # flags that cannot be read: treated as inexact (the fusion then stays off)
        assert ort_backend.int8_kernels_exact.__wrapped__(str(tmp_path / "missing")) is False
