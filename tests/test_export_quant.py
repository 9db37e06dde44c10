"""Quantized models (docs/quantization.md) export with TensorRT-style explicit quantization and
ONNX Runtime reproduces the integer-exact PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edgessm.config import MambaConfig
from edgessm.export import export_onnx
from edgessm.export.builder import DOMAIN
from edgessm.models.loading import random_model
from edgessm.quant import get_recipe, quantize_model, save_quantized, set_quant_mode
from edgessm.runtime.ort import OrtBackend
from tests.conftest import rel_err

CONFIGS = {
    "mamba1": MambaConfig(arch="mamba1", vocab_size=100, d_model=64, n_layer=2, d_state=8, d_conv=3,
                          tie_embeddings=False, proj_bias=True),
    "mamba2": MambaConfig(arch="mamba2", vocab_size=100, d_model=64, n_layer=2, d_state=16, head_dim=16, n_groups=2,
                          chunk_size=8),
}
RECIPES = {"w8a8": {}, "w4a8": {"group_size": 32, "method": "rtn"}, "w4a16": {"group_size": 32, "method": "rtn"}}
# ORT vs the integer-exact reference (docs/export.md): the same codes and scales, float32 rounding only.
TOL = 1e-4


@pytest.fixture(scope="module")
def quantized():
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(arch: str, recipe: str):
        if (arch, recipe) not in cache:
            calib = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(0))
            model, _ = quantize_model(random_model(CONFIGS[arch]), get_recipe(recipe, **RECIPES[recipe]), calib,
                                      progress=False)
            set_quant_mode(model, "int")
            cache[arch, recipe] = model
        return cache[arch, recipe]

    return get


@pytest.mark.parametrize("scan", ["plugin", "portable"])
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", ["mamba1", "mamba2"])
def test_ort_matches_integer_reference(arch: str, recipe: str, scan: str, quantized, tmp_path: Path) -> None:
    model = quantized(arch, recipe)
    export_onnx(model, tmp_path / "o", scan=scan)
    backend = OrtBackend(tmp_path / "o")
    tokens = torch.randint(0, 100, (2, 19))
    with torch.no_grad():
        ref, ref_states = model(tokens)
    logits, states = backend.prefill(tokens.numpy())
    assert rel_err(torch.from_numpy(logits), ref) < TOL
    for t in range(3):
        token = torch.randint(0, 100, (2,))
        with torch.no_grad():
            ref, ref_states = model.step(token, ref_states)
        logits, states = backend.step(token.numpy(), states)
        assert rel_err(torch.from_numpy(logits), ref) < TOL, t


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output}


@pytest.mark.parametrize("recipe", ["w8a8", "w4a8"])
def test_qdq_placement(recipe: str, quantized, tmp_path: Path) -> None:
    """Every quantized MatMul: weight = DequantizeLinear(int initializer) (per-channel axis 1 or
    blocks along axis 0), activation = DequantizeLinear(QuantizeLinear(x)) per tensor or per channel."""
    model = quantized("mamba1", recipe)
    export_onnx(model, tmp_path / "o", scan="plugin", graphs=("prefill",))
    proto = onnx.load(str(tmp_path / "o" / "prefill.onnx"), load_external_data=False)
    inits = {t.name: t for t in proto.graph.initializer}
    producer = _producers(proto.graph)
    quant_matmuls = 0
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in producer or producer[node.input[1]].op_type != "DequantizeLinear":
            continue
        quant_matmuls += 1
        wdq = producer[node.input[1]]
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in wdq.attribute}
        weight = inits[wdq.input[0]]
        if recipe == "w8a8":
            assert weight.data_type == onnx.TensorProto.INT8 and attrs == {"axis": 1}
        else:
            assert weight.data_type == onnx.TensorProto.INT4
            assert attrs == {"axis": 0, "block_size": 32} or attrs == {"axis": 1}  # rows shorter than a group
        adq = producer[node.input[0]]
        assert adq.op_type == "DequantizeLinear"
        # out_proj's input comes from the fused rotation + quantization, the others from QuantizeLinear
        assert producer[adq.input[0]].op_type in ("QuantizeLinear", "HadamardQuantize")
        assert inits[adq.input[2]].data_type == onnx.TensorProto.INT8
    assert quant_matmuls == 4 * 2  # in_proj, x_proj, dt_proj, out_proj per layer
    ops = [n.op_type for n in proto.graph.node if n.domain == DOMAIN]
    assert ops.count("HadamardQuantize") == 2 and ops.count("QuantSelectiveScan") == 2
    assert "SelectiveScan" not in ops and "HadamardTransform" not in ops
    scan = next(n for n in proto.graph.node if n.op_type == "QuantSelectiveScan")
    assert [list(inits[i].dims) for i in scan.input[8:]] == [[128], [1], [1], [1], [1]]  # u_scale [D], then per tensor
    # nothing dangles: every node output is read by a node or is a graph output
    read = {i for n in proto.graph.node for i in n.input} | {o.name for o in proto.graph.output}
    assert all(o in read for n in proto.graph.node for o in n.output)


def test_portable_hadamard_is_a_matmul(quantized, tmp_path: Path) -> None:
    export_onnx(quantized("mamba2", "w8a8"), tmp_path / "o", scan="portable", graphs=("decode",))
    proto = onnx.load(str(tmp_path / "o" / "decode.onnx"), load_external_data=False)
    assert not any(n.domain == DOMAIN for n in proto.graph.node)
    inits = {t.name: t for t in proto.graph.initializer}
    rotations = []
    for n in proto.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" and len(n.input) > 1 else None
        if w is not None and w.data_type == onnx.TensorProto.FLOAT and list(w.dims) == [128, 128]:
            rotations.append(onnx.numpy_helper.to_array(w))
    assert len(rotations) == 2
    np.testing.assert_allclose(rotations[0] @ rotations[0].T, np.eye(128), atol=1e-5)  # orthonormal


def test_export_from_quantized_directory(quantized, tmp_path: Path) -> None:
    model = quantized("mamba2", "w4a8")
    recipe = model.mixers[0].recipe
    save_quantized(model, recipe, tmp_path / "q", calibration={"source": "test"})
    result = export_onnx(tmp_path / "q", tmp_path / "o", scan="portable", external_data_threshold=0)
    assert result.manifest["quantization"]["w_bits"] == 4 and result.manifest["quantization"]["a_bits"] == 8
    proto = onnx.load(str(tmp_path / "o" / "prefill.onnx"), load_external_data=False)
    int4 = [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert int4 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in int4 if t.name.endswith("in_proj.qweight_t"))
    backend = OrtBackend(tmp_path / "o")
    tokens = np.random.default_rng(0).integers(0, 100, (1, 9))
    with torch.no_grad():
        ref, _ = model(torch.from_numpy(tokens))
    assert rel_err(torch.from_numpy(backend.prefill(tokens)[0]), ref) < TOL


def test_quantized_export_is_byte_deterministic(quantized, tmp_path: Path) -> None:
    model = quantized("mamba2", "w4a8")
    a = export_onnx(model, tmp_path / "a", scan="plugin", external_data_threshold=0)
    b = export_onnx(model, tmp_path / "b", scan="plugin", external_data_threshold=0)
    assert a.files == b.files
    for f in a.files:
        assert (a.out_dir / f).read_bytes() == (b.out_dir / f).read_bytes(), f
