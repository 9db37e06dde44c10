"""The GPU backend (edgessm.runtime.cuda_backend), its CUDA kernel wrappers and the Triton kernels.

On the CPU (CI): the quantized weight formats, argument errors, BackendUnavailable, and the
backend's wiring (splits, transposes, state handling, quantized layers) with the CUDA and Triton
kernels replaced by their torch references, against the reference model; where Triton is installed,
the GEMV kernels in Triton's CPU interpreter against float64 and the gated RMSNorm against the model's.
On a CUDA GPU (skipped otherwise; tools/gpu_decode_check.sh runs them): every Triton GEMV against
float64, the norms against the model's, every kernel wrapper against the reference op, and the
backend (CUDA graph decode) against the reference model: float32 logits rel err < 1e-3 and 32 equal
greedy tokens; float16 logits within FP16_BOUND; the quantized modes against the model with the
same dequantized weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgessm import ops
from edgessm.config import MambaConfig
from edgessm.errors import BackendUnavailable, ConfigError
from edgessm.models.loading import random_model
from edgessm.ops import cuda_kernels as K
from edgessm.ops import triton_gemv as Q
from edgessm.runtime.generation import generate
from tests.conftest import MAMBA1_CONFIGS, MAMBA2_CONFIGS, rel_err

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_tf32():
    """The float32 references must be float32: no TF32 in cuBLAS or cuDNN (F.conv1d) while testing."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
_skip_no_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (runs on the device via tools/gpu_decode_check.sh)")


def needs_gpu(fn):
    return pytest.mark.gpu(_skip_no_gpu(fn))
needs_triton = pytest.mark.skipif(Q.triton is None, reason="needs the `triton` package")

FP32_BOUND = 1e-3  # float32 backend vs float32 reference model
FP16_BOUND = 2e-2  # float16 backend vs float16 reference (same weights, different summation order/fusion)
QUANT_BOUND = 2e-2  # A16 quantized backend vs the float32 model holding the same dequantized weights
W8A8_BOUND = 0.15  # W8A8 vs W8A16: the per-tensor int8 activation rounding of every linear input

CONFIGS = {
    "mamba1": MambaConfig(arch="mamba1", vocab_size=512, d_model=128, n_layer=3, d_state=16),
    "mamba1-odd": MambaConfig(arch="mamba1", vocab_size=300, d_model=96, n_layer=2, d_state=8, d_conv=3,
                              proj_bias=True, tie_embeddings=False, residual_in_fp32=False),
    "mamba2": MambaConfig(arch="mamba2", vocab_size=512, d_model=128, n_layer=3, d_state=32, head_dim=32,
                          n_groups=2, chunk_size=16),
    "mamba2-dtlimit": MambaConfig(arch="mamba2", vocab_size=300, d_model=64, n_layer=2, d_state=16, head_dim=16,
                                  n_groups=1, chunk_size=8, dt_limit=(0.001, 0.1)),
}


def _model(name: str, seed: int = 0):
    model = random_model(CONFIGS[name], seed=seed)
    with torch.no_grad():  # spread dt and A like trained checkpoints, so the decays differ per channel
        for mixer in model.mixers:
            mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
            mixer.D.add_(0.1 * torch.randn_like(mixer.D))
    return model


def _tokens(vocab: int, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _dequantized_copy(model, weights: str, group_size: int, dtype: torch.dtype = torch.float16):
    """The float32 model holding exactly the weights the quantized backend (activations in ``dtype``) uses."""
    from edgessm.runtime.cuda_backend import DecodeLinear

    ref = copy.deepcopy(model).to(dtype).float()  # non-quantized parameters rounded as the backend holds them
    linears = [ref.lm_head] + [getattr(m, a) for m in ref.mixers for a in ("in_proj", "x_proj", "dt_proj", "out_proj")
                                if hasattr(m, a)]
    with torch.no_grad():
        for lin in linears:
            dl = DecodeLinear(lin.weight.to(dtype), None, weights, group_size, 1.0)
            w = Q.dequantize_w4(*dl.tensors) if dl.mode == "w4a16" else Q.dequantize_w8(*dl.tensors)
            lin.weight = torch.nn.Parameter(w)  # a new tensor: unties lm_head from the (float) embeddings
    return ref


def _teacher_forced(backend, ref_model, tokens: torch.Tensor, steps: int) -> list[float]:
    """Prefill both on tokens[:, :-steps], then feed the same tokens to both; rel err of every logits."""
    device = next(ref_model.parameters()).device
    prompt, rest = tokens[:, :-steps], tokens[:, -steps:]
    got, states = backend.prefill(prompt.numpy())
    with torch.no_grad():
        ref, ref_states = ref_model(prompt.to(device))
    errs = [rel_err(torch.from_numpy(got), ref.cpu())]
    for t in range(steps):
        got, states = backend.step(rest[:, t].numpy(), states)
        with torch.no_grad():
            ref, ref_states = ref_model.step(rest[:, t].to(device), ref_states)
        errs.append(rel_err(torch.from_numpy(got), ref.cpu()))
    return errs


# ---- CPU: formats and errors ----------------------------------------------------------------------------
def test_int4_packing_layout() -> None:
    q = torch.randint(-8, 8, (7, 32), dtype=torch.int8)
    packed = Q.pack_int4(q)
    assert packed.shape == (7, 16) and packed.dtype == torch.int8
    assert torch.equal(Q.unpack_int4(packed), q)
    byte = int(packed[0, 0]) & 0xFF  # low nibble = even input index, high nibble = odd
    assert ((byte & 0xF) ^ 8) - 8 == int(q[0, 0]) and ((byte >> 4) ^ 8) - 8 == int(q[0, 1])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        Q.pack_int4(torch.full((1, 2), 9, dtype=torch.int8))


@pytest.mark.parametrize("kind", ["w8", "w4"])
def test_weight_quantization_error_is_bounded(kind: str) -> None:
    w = torch.randn(64, 256) * 0.05
    if kind == "w8":
        q, s = Q.quantize_w8(w)
        deq = Q.dequantize_w8(q, s)
        step = s[:, None].expand_as(w)
    else:
        p, s = Q.quantize_w4(w, 128)
        deq = Q.dequantize_w4(p, s)
        step = s.repeat_interleave(128, dim=1)
    assert ((deq - w).abs() <= 0.5 * step + 1e-7).all()  # round to nearest: at most half a step everywhere
    assert 0 < rel_err(deq, w) < (0.01 if kind == "w8" else 0.15)


def test_activation_quantizer_rounds_half_to_even_and_saturates() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0, 0.49])
    assert Q.quantize_activation(x, 1.0).tolist() == [0, 2, 2, 0, -2, 127, -128, 0]


def test_missing_library_is_backend_unavailable(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("EDGESSM_KERNELS_LIB", str(tmp_path / "nope.so"))
    with pytest.raises(BackendUnavailable, match="nope.so"):
        K.find_kernel_library()


def test_kernel_wrappers_reject_cpu_tensors_by_name() -> None:
    x = torch.zeros(1, 8)
    with pytest.raises(ValueError, match=r"causal_conv1d_update: \w+ is on cpu, expected a CUDA tensor"):
        K.causal_conv1d_update(x, torch.zeros(1, 8, 3), torch.zeros(8, 4), None)


def test_decode_wrappers_reject_dstate_above_the_kernel_limit() -> None:
    n = K.MAX_DECODE_DSTATE + 1
    with pytest.raises(ValueError, match=f"selective_state_update: state has dstate {n}; .* at most 256"):
        K.selective_state_update(torch.zeros(1, 2, n), *(torch.zeros(1) for _ in range(5)))
    with pytest.raises(ValueError, match=f"ssd_state_update: state has dstate {n}; .* at most 256"):
        K.ssd_state_update(torch.zeros(1, 2, 4, n), torch.zeros(1, 2, 4), torch.zeros(1, 2), torch.zeros(2),
                           torch.zeros(1, 1, n), torch.zeros(1, 1, n))


def test_wrappers_bind_exported_launchers() -> None:
    """Every wrapper's launcher essm_<name> (plus the SSD scan's workspace query) has a ctypes signature
    and is exported by a built library."""
    wrappers = [K.causal_conv1d_fwd, K.causal_conv1d_update, K.selective_scan_fwd, K.selective_state_update,
                K.ssd_scan_fwd, K.ssd_state_update]
    assert {f"essm_{w.__name__}" for w in wrappers} | {"essm_ssd_scan_workspace_size"} == set(K._SIGNATURES)
    try:
        path = K.find_kernel_library()
    except BackendUnavailable:
        pytest.skip("no built libedgessm_kernels.so (set EDGESSM_KERNELS_LIB or build plugins/)")
    import ctypes

    lib = ctypes.CDLL(str(path))  # loads without a GPU (static cudart)
    for name in K._SIGNATURES:
        assert hasattr(lib, name), f"{path} does not export {name}"


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without a GPU")
def test_backend_without_cuda_is_unavailable() -> None:
    from edgessm.runtime.cuda_backend import CudaBackend

    with pytest.raises(BackendUnavailable, match="CUDA"):
        CudaBackend(_model("mamba1"))


# ---- CPU: the backend's wiring, with the kernels replaced by their torch references ------------------
def _fake_kernels(monkeypatch) -> None:
    def conv_update(x, conv_state, w, b, silu=True, out=None):
        y, new = ops.causal_conv1d_update(x, conv_state, w, b, silu)
        conv_state.copy_(new)
        return y

    def state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, out=None):
        y, new = ops.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state.copy_(new)
        return y

    def ssd_update(state, x, dt, A, B, C, D=None, dt_bias=None, dt_softplus=True, dt_limit=(0.0, math.inf), out=None):
        y, new = ops.ssd_state_update(state, x, dt, A, B, C, D, dt_bias, dt_softplus, dt_limit)
        state.copy_(new)
        return y

    def add_rmsnorm(residual, out, weight, eps, normed):
        r, n = Q.reference_add_rmsnorm(residual, out, weight, eps)
        residual.copy_(r)
        normed.copy_(n)

    def strict(fn, rows_only: bool = False):
        """Enforce what the real launchers require: contiguous tensors (GEMV inputs: unit stride along K)."""
        def wrapped(*args, **kwargs):
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor):
                    assert (t.stride(-1) == 1) if rows_only else t.is_contiguous(), f"{fn.__name__}: {t.stride()}"
            return fn(*args, **kwargs)
        return wrapped

    def conv_fwd(x, w, b, silu=True):
        return ops.causal_conv1d(x, w, b, silu)

    def ssd_fwd(*args, chunk_size=256, **kwargs):
        return ops.ssd_scan(*args, **kwargs)

    for name, fn in (("causal_conv1d_fwd", conv_fwd), ("causal_conv1d_update", conv_update),
                     ("selective_scan_fwd", ops.selective_scan), ("selective_state_update", state_update),
                     ("ssd_scan_fwd", ssd_fwd), ("ssd_state_update", ssd_update)):
        monkeypatch.setattr(K, name, strict(fn))
    monkeypatch.setattr(K, "kernel_library", lambda: None)
    monkeypatch.setattr(Q, "add_rmsnorm", strict(add_rmsnorm))
    monkeypatch.setattr(Q, "gated_rmsnorm", strict(Q.reference_gated_rmsnorm, True))  # x, z: any row stride
    monkeypatch.setattr(Q, "dt_proj_state_update", strict(Q.reference_dt_proj_state_update, True))  # dbc, z: slices
    def gemv(reference):
        """A GEMV launcher as a torch reference, with the conv update of its epilogue (ConvUpdate)."""
        def fake(x, *args, conv=None):
            y = reference(x, *args).to(x.dtype)
            return y if conv is None else Q.reference_conv_columns(y, conv)
        fake.__name__ = reference.__name__
        return strict(fake, True)

    monkeypatch.setattr(Q, "gemv_w8a16", gemv(Q.reference_w8a16))
    monkeypatch.setattr(Q, "gemv_w4a16", gemv(Q.reference_w4a16))
    monkeypatch.setattr(Q, "gemv_w8a8", gemv(Q.reference_w8a8))
    monkeypatch.setattr(Q, "triton", object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("batch", [1, 2])
def test_backend_wiring_on_cpu(name: str, batch: int, monkeypatch) -> None:
    from edgessm.runtime.cuda_backend import CudaBackend, CudaStates

    _fake_kernels(monkeypatch)
    model = _model(name)
    backend = CudaBackend(copy.deepcopy(model), device="cpu", dtype=None, use_graph=False)
    tokens = _tokens(model.config.vocab_size, batch, 12, seed=1)
    errs = _teacher_forced(backend, model, tokens, steps=4)
    assert max(errs) < 1e-5, errs
    _, states = backend.prefill(tokens.numpy())
    _, ref_states = model(tokens)
    ref = CudaStates.from_layer_states(ref_states)
    assert rel_err(states.conv, ref.conv) < 1e-6 and rel_err(states.ssm, ref.ssm) < 1e-5


@pytest.mark.parametrize("weights", ["w8a16", "w4a16"])
@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_quantized_wiring_on_cpu(name: str, weights: str, monkeypatch) -> None:
    from edgessm.runtime.cuda_backend import CudaBackend

    _fake_kernels(monkeypatch)
    model = _model(name)
    backend = CudaBackend(copy.deepcopy(model), device="cpu", dtype=torch.bfloat16, weights=weights, group_size=32,
                          use_graph=False)
    assert {lin.mode for ly in backend._layers for lin in (ly.in_proj, ly.out_proj)} == {weights}
    ref = _dequantized_copy(model, weights, 32, torch.bfloat16)
    errs = _teacher_forced(backend, ref, _tokens(model.config.vocab_size, 1, 10, seed=2), steps=3)
    assert max(errs) < 3e-2, errs  # bfloat16 activations vs the float32 model


def test_quantized_modes_need_half_precision(monkeypatch) -> None:
    from edgessm.runtime.cuda_backend import CudaBackend

    _fake_kernels(monkeypatch)
    with pytest.raises(ConfigError, match="float16/bfloat16"):
        CudaBackend(_model("mamba1"), device="cpu", dtype=torch.float32, weights="w8a16", use_graph=False)


# ---- Triton kernels vs float64: on the GPU, and in Triton's CPU interpreter -----------------------------
GEMV_MODES = ["float", "w8a16", "w4a16", "w8a8", "w8a8-int8-in"]
GEMV_SHAPES = [(1, 1536, 768), (1, 80, 1536), (3, 700, 384), (16, 64, 128), (37, 200, 256)]
# Small enough for the interpreter: GEMV programs with a partial row block (N = 5, 7; K = 2176 also
# leaves a partial K tile) and with 4 rows (N = 1100), and the GEMM path (M = 17).
INTERPRETER_SHAPES = [(2, 5, 2176), (3, 7, 256), (1, 1100, 128), (17, 24, 256)]
# Decode shapes whose K the word-streaming kernel does not take (Q._words_gemv_applies), so that the modes
# but W4A16 run the row-streaming kernel: W8 at K = 200 (float16 still word-streaming), all at K = 100.
ROW_STREAMING_SHAPES = [(2, 40, 200), (3, 9, 100)]
ROW_STREAMING_MODES = [mode for mode in GEMV_MODES if mode != "w4a16"]
GEMV_BOUND = 1e-3  # float16 output rounding; the sums themselves are float32 / exact int32


def _gemv_call(mode: str, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, group: int = 128):
    """(launch(out=, conv=), float64 reference, x as the launch takes it) of one Triton GEMV ``mode`` with
    float weights w [N, K] quantized as the mode needs."""
    if mode == "float":  # float16 weights; beyond 4 rows (and on the CPU) gemv_float is F.linear
        w16 = w.to(x.dtype)
        return lambda **kw: Q.gemv_float(x, w16, bias, **kw), Q.reference_float(x, w16, bias), x
    if mode == "w4a16":
        p, s = Q.quantize_w4(w, group)
        return lambda **kw: Q.gemv_w4a16(x, p, s, bias, **kw), Q.reference_w4a16(x, p, s, bias), x
    q, s = Q.quantize_w8(w)
    if mode == "w8a16":
        return lambda **kw: Q.gemv_w8a16(x, q, s, bias, **kw), Q.reference_w8a16(x, q, s, bias), x
    xs = float(x.float().abs().max()) / 127 * 0.7  # saturates the largest inputs on purpose
    xin = Q.quantize_activation(x, xs) if mode.endswith("int8-in") else x
    return lambda **kw: Q.gemv_w8a8(xin, xs, q, s, bias, **kw), Q.reference_w8a8(xin, xs, q, s, bias), xin


def _gemv_rel_err(mode: str, shape: tuple[int, int, int], device: str) -> float:
    """One Triton GEMV of ``mode`` (biased for odd M) into a NaN-filled ``out``, relative error vs float64."""
    m, n, k = shape
    x = torch.randn(m, k, device=device, dtype=torch.float16)
    w = torch.randn(n, k, device=device) * 0.05
    bias = torch.randn(n, device=device) if m % 2 else None
    launch, ref, _ = _gemv_call(mode, x, w, bias)
    out = torch.full((m, n), float("nan"), device=device, dtype=torch.float16)
    got = launch(out=out)
    assert got.data_ptr() == out.data_ptr()
    return rel_err(got, ref)


# Decode GEMVs ending in the conv update (Q.ConvUpdate), (M, N, K, conv start, conv channels, width,
# conv bias, dtype): Mamba-1 130M's in_proj (x: the first half), Mamba-2 130M's (xBC: the middle), and
# ranges that start and end inside a program's rows (N = 37: up to the rows that the last W4 program
# shares with its neighbour), a width of 3 and of 1 (no state), all columns.
CONV_GEMV_CASES = [
    (1, 3072, 768, 0, 1536, 4, True, "float16"), (1, 3352, 768, 1536, 1792, 4, True, "float16"),
    (3, 700, 384, 101, 333, 3, False, "bfloat16"), (4, 200, 256, 0, 200, 4, True, "float16"),
    (2, 37, 256, 3, 34, 4, True, "float16"), (2, 37, 128, 5, 32, 1, True, "float16"),
]
CONV_GEMV_INTERPRETER_CASES = [(2, 37, 256, 5, 32, 4, True, "float16"), (3, 13, 128, 0, 13, 3, False, "bfloat16"),
                               (1, 9, 128, 4, 5, 1, True, "float16")]


def _conv_gemv_errs(mode: str, case: tuple, device: str) -> dict[str, float]:
    """One GEMV with the conv update on fresh random inputs, its output NaN-poisoned first, vs float64:
    the plain columns and the value entering the conv state vs the GEMV's float64 reference; the conv
    columns vs the float64 conv of the old window and that value; the rest of the state must be the
    old state shifted by one, exactly. Returns each part's relative error."""
    m, n, k, start, c, width, has_bias, dtype = case
    dt = getattr(torch, dtype)
    x = torch.randn(m, k, device=device).to(dt)
    w = torch.randn(n, k, device=device) * 0.05
    bias = torch.randn(n, device=device) if m % 2 else None
    launch, ref, _ = _gemv_call(mode, x, w, bias, group=128 if k % 128 == 0 else 32)
    state = torch.randn(m, c, width - 1, device=device).to(dt)
    old = state.clone()
    cw = torch.randn(c, width, device=device) * 0.5
    cb = torch.randn(c, device=device) if has_bias else None
    out_dtype = torch.float16 if mode.endswith("int8-in") else dt
    if out_dtype != dt:
        state, old = state.to(out_dtype), old.to(out_dtype)
    out = torch.full((m, n), float("nan"), device=device, dtype=out_dtype)
    got = launch(out=out, conv=Q.ConvUpdate(state, cw, cb, start))
    assert got.data_ptr() == out.data_ptr() and state.shape == old.shape
    assert torch.equal(state[..., :-1], old[..., 1:]), "the conv state is not the old one shifted"
    plain = torch.ones(n, dtype=torch.bool)
    plain[start:start + c] = False
    entered = state[..., -1] if width > 1 else None
    errs = {"plain": rel_err(got[:, plain.to(device)], ref[:, plain.to(device)]) if plain.any() else 0.0}
    if entered is not None:
        errs["entered"] = rel_err(entered, ref[:, start:start + c])
        window = torch.cat([old.double(), entered.double()[..., None]], dim=-1)
    else:  # nothing to read the entering value back from: the GEMV's own rounding of it
        window = ref[:, start:start + c].to(out_dtype).double()[..., None]
    conv = (window * cw.double()).sum(-1) + (cb.double() if cb is not None else 0.0)
    errs["conv"] = rel_err(got[:, start:start + c], torch.nn.functional.silu(conv))
    return errs


def _conv_gemv_bound(case: tuple) -> float:
    return W4_BOUND[case[-1]]


@needs_gpu
@needs_triton
@pytest.mark.parametrize(("mode", "shape"), [(m, s) for m in GEMV_MODES for s in GEMV_SHAPES]
                         + [(m, s) for m in ROW_STREAMING_MODES for s in ROW_STREAMING_SHAPES])
def test_triton_gemv_vs_float64(mode: str, shape: tuple[int, int, int]) -> None:
    """Every GEMV mode at GEMV_SHAPES, and the modes that have one at ROW_STREAMING_SHAPES (the
    row-streaming kernel)."""
    assert _gemv_rel_err(mode, shape, "cuda") < GEMV_BOUND


def test_words_gemv_applies() -> None:
    """Decode-sized M, 16-bit activations and rows of a multiple of 4 int32 words take the word-streaming
    kernel; the row-streaming one (or the GEMMs) the rest."""
    x = torch.zeros(4, 200, dtype=torch.float16)
    assert Q._words_gemv_applies(x, 200, 16) and not Q._words_gemv_applies(x, 200, 8)
    assert Q._words_gemv_applies(x[:, :192], 192, 8) and Q._words_gemv_applies(x[:, :96].bfloat16(), 96, 4)
    assert not Q._words_gemv_applies(x[:, :100], 100, 16)
    assert not Q._words_gemv_applies(torch.zeros(5, 256, dtype=torch.float16), 256, 16)
    assert not Q._words_gemv_applies(torch.zeros(1, 256), 256, 16)
    xq = torch.zeros(1, 256, dtype=torch.int8)  # W8A8's int8 input
    assert Q._words_gemv_applies(xq, 256, 8, a8=True) and not Q._words_gemv_applies(xq, 256, 8)
    k_max = Q._WORDS_W8_MAX_K  # longer W8 rows: the row-streaming kernel, faster there
    for a8 in (False, True):
        assert Q._words_gemv_applies(torch.zeros(1, k_max, dtype=torch.float16), k_max, 8, a8=a8)
        assert not Q._words_gemv_applies(torch.zeros(1, k_max + 16, dtype=torch.float16), k_max + 16, 8, a8=a8)
    assert Q._words_gemv_applies(torch.zeros(1, 4096, dtype=torch.float16), 4096, 16)


@needs_gpu
@needs_triton
@pytest.mark.parametrize("few_programs", [False, True])
@pytest.mark.parametrize("mode", GEMV_MODES)
@pytest.mark.parametrize("case", CONV_GEMV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gemv_conv_update_vs_float64(mode: str, case: tuple, few_programs: bool, monkeypatch) -> None:
    """few_programs: the most rows per program (8 in the word-streaming kernel, whose last program then
    overlaps its neighbour's rows, which it must leave alone)."""
    if few_programs:
        monkeypatch.setattr(Q, "_GEMV_PROGRAMS_PER_SM", 0)
        monkeypatch.setattr(Q, "_WORDS_GEMV_TUNING", most_rows_per_program(Q._WORDS_GEMV_TUNING))
    errs = _conv_gemv_errs(mode, case, "cuda")
    assert max(errs.values()) < _conv_gemv_bound(case), errs


def test_conv_update_outside_the_gemv_kernels_is_rejected() -> None:
    """A GEMM-sized input (or no GEMV kernel) cannot take the conv update: the caller runs it apart."""
    x = torch.zeros(5, 32, dtype=torch.float16)
    conv = Q.ConvUpdate(torch.zeros(5, 8, 3, dtype=torch.float16), torch.zeros(8, 4), None, 0)
    assert not Q.fuses_conv_update(x) and not Q.fuses_conv_update(x[:1].float())
    with pytest.raises(ValueError, match=r"gemv_float: the conv update runs in the decode GEMV kernels only .* got 5 rows"):
        Q.gemv_float(x, torch.zeros(16, 32, dtype=torch.float16), conv=conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_float_runs_linear_where_the_kernel_does_not_apply(dtype: torch.dtype, monkeypatch) -> None:
    """float32, more than 4 rows of x, or no Triton: F.linear, with a float32 bias added in float32."""
    if dtype == torch.float16:
        monkeypatch.setattr(Q, "triton", None)
    torch.manual_seed(3)
    w = (torch.randn(9, 64) * 0.1).to(dtype)
    bias = torch.randn(9)
    for m in (1, 6):
        x = torch.randn(m, 64).to(dtype)
        out = torch.full((m, 9), float("nan"), dtype=dtype)
        got = Q.gemv_float(x, w, bias, out=out)
        assert got.data_ptr() == out.data_ptr() and got.dtype == dtype
        assert rel_err(got, Q.reference_float(x, w, bias)) < (1e-6 if dtype == torch.float32 else GEMV_BOUND)


def test_gemv_block_n() -> None:
    """W8 GEMV programs own 32 output rows for large N and shrink to 1 until the grid has 4 programs per SM
    (528 on an H100; 64 on Jetson AGX Orin's 16 SMs)."""
    ns = (80, 160, 2048, 8192, 50280)
    assert [Q._block_n(n, 32, Q._W8_GEMV_MIN_BLOCK_N, Q._GEMV_PROGRAMS_PER_SM * 132) for n in ns] == [1, 1, 2, 8, 32]
    assert [Q._block_n(n, 32, Q._W8_GEMV_MIN_BLOCK_N, Q._GEMV_PROGRAMS_PER_SM * 16) for n in ns] == [1, 2, 32, 32, 32]


def most_rows_per_program(tuning: dict) -> dict:
    """_WORDS_GEMV_TUNING with every weight width at its most rows per program (no grid-size target), so that
    programs own several rows and the last one overlaps its neighbour's."""
    return {bits: t._replace(warps_per_sm=0, programs_per_sm=0) for bits, t in tuning.items()}


# (bits, N, K) -> (BLOCK_N, VEC, BLOCK_W, BATCH, num_warps) of the word-streaming GEMV for the Mamba-1 1.4B
# and 130M layers it runs, as tuned (triton_gemv._WORDS_GEMV_TUNING; W4 in whole-model decode, W8 and 16 bits per
# layer; W8 at K = 4096 runs the row-streaming kernel)
WORDS_CONFIGS = {
    (4, 8192, 2048): (8, 4, 256, 1, 2), (4, 50280, 2048): (8, 4, 256, 1, 2), (4, 2048, 4096): (4, 4, 512, 1, 4),
    (4, 160, 4096): (1, 4, 512, 1, 4), (4, 4096, 128): (2, 1, 16, 1, 1),
    (4, 3072, 768): (2, 1, 32, 3, 1), (4, 50280, 768): (8, 1, 32, 3, 1), (4, 768, 1536): (1, 2, 64, 3, 1),
    (8, 8192, 2048): (8, 4, 256, 1, 2), (8, 4096, 128): (4, 1, 32, 1, 1), (8, 3072, 768): (4, 2, 64, 3, 1), (8, 768, 1536): (1, 4, 128, 3, 1),
    (8, 1536, 48): (2, 1, 16, 1, 1),
    (16, 8192, 2048): (4, 4, 512, 2, 4), (16, 2048, 4096): (4, 4, 512, 2, 4), (16, 160, 4096): (1, 4, 512, 4, 4),
    (16, 4096, 128): (4, 2, 64, 1, 1), (16, 3072, 768): (4, 4, 128, 2, 1), (16, 768, 1536): (2, 4, 256, 3, 2),
    (16, 1536, 48): (4, 1, 32, 1, 1),
}


@pytest.mark.parametrize("bits", [4, 8, 16])
@pytest.mark.parametrize("n", [1, 3, 5, 80, 160, 768, 2048, 8192, 50280])
@pytest.mark.parametrize("k", [32, 48, 128, 640, 768, 1536, 2048, 2176, 2560, 4096, 8192, 65536 + 32])
def test_words_gemv_config(bits: int, n: int, k: int) -> None:
    """The word-streaming GEMV tiling: whole powers of two of rows per program (within N, as the last
    program is moved back to end at row N), K steps that cover the row with at most a third masked (a row
    shorter than a warp's 32 words: one step), a step that fills its warps (or is below one warp), and at
    most _WORDS_GEMV_MAX_WORDS words per thread per wait; the tuned layers as WORDS_CONFIGS."""
    if k % (128 // bits):
        pytest.skip(f"{bits}-bit rows of K={k} are not whole 16-byte vectors (_words_gemv_applies)")
    kw = k * bits // 32
    bn, vec, bw, batch, warps = cfg = Q._words_gemv_config(n, kw, bits)
    assert cfg == WORDS_CONFIGS.get((bits, n, k), cfg)
    assert bn in (1, 2, 4, 8) and bn <= n
    assert vec in (1, 2, 4) and warps in (1, 2, 4) and kw % vec == 0
    assert bw == 32 * warps * vec or (bw < 32 and warps == vec == 1)
    steps = -(-kw // bw)
    assert 3 * steps * bw <= 4 * kw or bw == 32
    assert steps == 1 or kw >= 32
    assert 1 <= batch <= steps and (batch == 1 or batch * bn * vec <= Q._WORDS_GEMV_MAX_WORDS)


def _interpreter_runs_scalar_loops() -> bool:
    """Triton's interpreter before 3.8 turns scalar kernel arguments used as loop bounds into Python
    ints with int() of a 1-element array, which NumPy 2.4 rejects."""
    triton_v, numpy_v = (tuple(int(p) for p in v.split(".")[:2]) for v in (Q.triton.__version__, np.__version__))
    return triton_v >= (3, 8) or numpy_v < (2, 4)


needs_interpreter = pytest.mark.skipif(Q.triton is not None and not _interpreter_runs_scalar_loops(),
                                       reason="Triton < 3.8's interpreter needs NumPy < 2.4")


# Turns on tl.device_assert in Triton's interpreter (its options are fixed at debug=False otherwise), e.g. the
# alignment check of the vector loads in triton_gemv._load_words.
_INTERPRETER_ASSERTS = ("import dataclasses; from triton.runtime import interpreter as _ti;"
                        " _ti.interpreter_builder.options = dataclasses.replace(_ti.interpreter_builder.options,"
                        " debug=True);")


def _in_interpreter(code: str, timeout_s: int) -> list:
    """Runs `code` in a fresh Python with TRITON_INTERPRET=1 (which takes effect when the kernels are
    defined) and device asserts on, from the repository root; returns the JSON its last output line
    prints."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETER_ASSERTS + code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_triton
def test_interpreter_checks_vector_load_alignment() -> None:
    """The interpreter runs of the GEMV kernels check the alignment that their 16-byte loads need on a GPU:
    _load_words of 4 words one word past a 16-byte boundary must fail, at the boundary pass."""
    results = _in_interpreter(
        "import json, torch, triton, triton.language as tl; from edgessm.ops import triton_gemv as Q\n"
        "@triton.jit\n"
        "def k(p, offset):\n"
        "    w = Q._load_words(p.to(tl.pointer_type(tl.int32)) + offset + tl.arange(0, 2) * 4, 4, False)\n"
        "    tl.store(p.to(tl.pointer_type(tl.int32)) + 32 + tl.arange(0, 2), w[0])\n"
        "def run(offset):\n"
        "    try:\n"
        "        k[(1,)](torch.zeros(64, dtype=torch.int32), offset); return 'passed'\n"
        "    except Exception as e:\n"
        "        return 'misaligned' if 'misaligned vector load' in repr(e) else repr(e)\n"
        "print(json.dumps([run(0), run(1)]))", timeout_s=120)
    assert results == ["passed", "misaligned"]


@needs_triton
@needs_interpreter
def test_triton_gemv_in_interpreter() -> None:
    """Every GEMV/GEMM kernel on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, which takes
    effect when the kernels are defined, hence a fresh process) vs float64."""
    errs = _in_interpreter(
        "import json, torch; from tests.test_cuda_backend import _gemv_rel_err, GEMV_MODES, INTERPRETER_SHAPES,"
        " ROW_STREAMING_SHAPES, ROW_STREAMING_MODES;"
        "torch.manual_seed(0);"
        "print(json.dumps([[mode, s, _gemv_rel_err(mode, s, 'cpu')] for mode in GEMV_MODES"
        " for s in INTERPRETER_SHAPES] + [[mode, s, _gemv_rel_err(mode, s, 'cpu')] for mode in ROW_STREAMING_MODES"
        " for s in ROW_STREAMING_SHAPES]))", timeout_s=600)
    assert len(errs) == len(GEMV_MODES) * len(INTERPRETER_SHAPES) + len(ROW_STREAMING_MODES) * len(ROW_STREAMING_SHAPES)
    assert all(err < GEMV_BOUND for _, _, err in errs), errs


@needs_triton
@needs_interpreter
def test_gemv_conv_update_in_interpreter() -> None:
    """The decode GEMV kernels with the conv update (CONV_GEMV_INTERPRETER_CASES) in Triton's interpreter,
    with up to 8 rows per W4 program (the last one overlapping its neighbour)."""
    errs = _in_interpreter(
        "import json, torch; from tests.test_cuda_backend import _conv_gemv_errs, GEMV_MODES, Q,"
        " CONV_GEMV_INTERPRETER_CASES as C, most_rows_per_program as most; torch.manual_seed(0);"
        " Q._WORDS_GEMV_TUNING = most(Q._WORDS_GEMV_TUNING);"
        "print(json.dumps([[m, c, _conv_gemv_errs(m, c, 'cpu')] for m in GEMV_MODES for c in C]))", timeout_s=600)
    assert len(errs) == len(GEMV_MODES) * len(CONV_GEMV_INTERPRETER_CASES)
    assert all(max(e.values()) < _conv_gemv_bound(c) for _, c, e in errs), errs


# W4 GEMV cases (M, N, K, group, dtype, x layout) for the GPU and, with the most rows per program (so
# that the programs own 2-8 rows and the last one overlaps), for the interpreter: one K step of 256 or
# 512 words, 3 batched steps of 32 or 64 words, 2 steps of 512 (two waits), masked steps (K/8 = 272),
# 16 words on 32 threads (K = 128); bias for odd M; x strided, with an odd stride (copied) or at an
# address that is not a multiple of 4 bytes (copied); x and the packed weights 8 bytes past a 16-byte
# boundary (both copied: the kernel loads 16-byte vectors).
W4_CASES = [
    (1, 13, 2048, 128, "float16", "contiguous"), (3, 13, 2048, 32, "bfloat16", "strided"),
    (4, 24, 4096, 64, "float16", "contiguous"), (1, 10, 768, 128, "bfloat16", "contiguous"),
    (2, 6, 1536, 32, "float16", "odd-stride"), (3, 9, 8192, 128, "float16", "contiguous"),
    (2, 5, 2176, 64, "bfloat16", "misaligned"), (3, 3, 128, 32, "float16", "strided"),
    (1, 11, 640, 64, "float16", "contiguous"), (2, 7, 1024, 64, "float16", "misaligned-16"),
]
W4_GPU_CASES = W4_CASES + [
    (1, 8192, 2048, 128, "float16", "contiguous"), (1, 50280, 2048, 128, "bfloat16", "contiguous"),
    (4, 2048, 4096, 128, "float16", "contiguous"), (1, 160, 4096, 128, "float16", "strided"),
    (3, 3072, 768, 128, "bfloat16", "contiguous"), (1, 4096, 128, 128, "float16", "strided"),
]
# float16 output rounding; bfloat16 output rounding (its 8-bit mantissa; Triton's interpreter truncates)
W4_BOUND = {"float16": GEMV_BOUND, "bfloat16": 8e-3}


def _w4_rel_err(case: tuple, device: str) -> float:
    m, n, k, group, dtype, layout = case
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(n * k + m)
    xs = torch.randn(m, k + 2, generator=gen).to(device=device, dtype=dt)
    if layout == "contiguous":
        x = xs[:, :k].contiguous()
    elif layout == "strided":  # e.g. dt_proj's input, the first dt_rank columns of x_proj's output
        x = xs[:, :k]
    elif layout == "odd-stride":
        x = xs.view(-1)[: m * (k + 1)].view(m, k + 1)[:, :k]
    elif layout == "misaligned":  # 2 bytes past a 4-byte boundary
        x = xs.view(-1)[1: 1 + m * k].view(m, k)
    else:  # misaligned-16: 8 bytes past a 16-byte boundary (x and, below, the packed weights)
        x = xs.view(-1)[4: 4 + m * k].view(m, k)
    w = torch.randn(n, k, generator=gen).to(device) * 0.05
    bias = torch.randn(n, generator=gen).to(device=device, dtype=dt) if m % 2 else None
    p, s = Q.quantize_w4(w, group)
    if layout == "misaligned-16":
        p = torch.cat([p.new_zeros(8), p.flatten()])[8:].view(p.shape)
        assert p.data_ptr() % 16 == 8 and x.data_ptr() % 16 == 8
    out = torch.full((m, n), float("nan"), device=device, dtype=dt)
    got = Q.gemv_w4a16(x, p, s, bias, out=out)
    assert got.data_ptr() == out.data_ptr()
    return rel_err(got, Q.reference_w4a16(x, p, s, bias))


@needs_gpu
@needs_triton
@pytest.mark.parametrize("case", W4_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_w4_gemv_vs_float64(case: tuple) -> None:
    assert _w4_rel_err(case, "cuda") < W4_BOUND[case[4]]


@needs_triton
@needs_interpreter
def test_w4_gemv_in_interpreter() -> None:
    """The W4 GEMV over W4_CASES in Triton's interpreter vs float64, with up to 8 rows per program."""
    errs = _in_interpreter(
        "import json, torch; from tests.test_cuda_backend import _w4_rel_err, W4_CASES, Q, most_rows_per_program;"
        "Q._WORDS_GEMV_TUNING = most_rows_per_program(Q._WORDS_GEMV_TUNING);"
        "print(json.dumps([[c, _w4_rel_err(c, 'cpu')] for c in W4_CASES]))", timeout_s=900)
    assert len(errs) == len(W4_CASES)
    assert all(err < W4_BOUND[case[4]] for case, err in errs), errs


@needs_gpu
@needs_triton
@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float16])
def test_add_rmsnorm_matches_block_arithmetic(res_dtype: torch.dtype) -> None:
    from edgessm.models.norm import RMSNorm

    d = 768
    norm = RMSNorm(d).cuda().half()
    with torch.no_grad():
        norm.weight.add_(0.1 * torch.randn_like(norm.weight))
    residual = torch.randn(3, d, device="cuda", dtype=res_dtype)
    out = torch.randn(3, d, device="cuda", dtype=torch.float16)
    normed = torch.full((3, d), float("nan"), device="cuda", dtype=torch.float16)
    expect_res = residual + out
    with torch.no_grad():
        expect = norm(expect_res.to(torch.float16))
    Q.add_rmsnorm(residual, out, norm.weight, norm.eps, normed)
    assert rel_err(residual, expect_res) == 0.0
    assert rel_err(normed, expect) < 2e-3  # rsqrt and fp16 re-rounding may differ by an ulp


# Gated RMSNorm cases (M, D, group size, dtype, layout): ngroups 1 at Mamba-2 130M/1.3B widths, several
# groups (of a power of two, and of 96 and 80 channels: masked tiles); x and z column slices of wider
# rows (as z of in_proj's output) or contiguous; odd M writes into a given ``out``. The GPU adds a
# prefill-sized M and Mamba-2 2.7B's width in 8 groups.
GATED_NORM_CASES = [
    (1, 1536, 1536, "float16", "sliced"), (3, 2048, 256, "bfloat16", "sliced"), (2, 768, 768, "float32", "contiguous"),
    (5, 384, 96, "float16", "contiguous"), (2, 640, 80, "float32", "sliced"), (1, 4096, 4096, "bfloat16", "sliced"),
]
GATED_NORM_GPU_CASES = GATED_NORM_CASES + [(64, 1536, 1536, "float16", "sliced"), (3, 5120, 640, "bfloat16", "sliced")]


def _gated_norm_bound(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) of gated_rmsnorm vs GatedRMSNorm. The kernel's float32 arithmetic differs from torch's
    by a few float32 ulps (exp, which Triton approximates on the GPU; the order of the sum of squares;
    the reciprocal square root). In float16/bfloat16 that can round the normalised value to the
    neighbouring io value (one io ulp, at most eps * |value|, carried through the weight) and each side
    rounds the weight product once (half an ulp each; a whole ulp in the interpreter, which truncates
    to bfloat16): 3 eps in all. In float32 the ulps of the arithmetic themselves: 32 eps. atol: the same
    ulps at the subnormal spacing (float16 outputs below 6e-5)."""
    fi = torch.finfo(dtype)
    rtol = (3 if dtype != torch.float32 else 32) * fi.eps
    return rtol, rtol * fi.tiny


def _gated_rmsnorm_excess(case: tuple, device: str) -> list:
    """gated_rmsnorm on fresh random inputs vs reference_gated_rmsnorm, which must equal the GatedRMSNorm
    module exactly: [seed, max |got - ref| / (rtol |ref| + atol)] (<= 1 passes)."""
    from edgessm.models.norm import GatedRMSNorm

    m, d, group, dtype, layout = case
    dt = getattr(torch, dtype)
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    # sliced: z the first D columns of in_proj-like rows, x at an odd column offset of other rows
    x = torch.randn(m, d + 24, generator=gen).to(device=device, dtype=dt)[:, 3:3 + d]
    z = (2 * torch.randn(m, 2 * d + 40, generator=gen)).to(device=device, dtype=dt)[:, :d]
    if layout == "contiguous":
        x, z = x.contiguous(), z.contiguous()
    norm = GatedRMSNorm(d, group, eps=1e-5).to(device=device, dtype=dt)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d, generator=gen))
        want = norm(x, z)
    ref = Q.reference_gated_rmsnorm(x, z, norm.weight.detach(), group, norm.eps)
    assert ref.dtype == dt and torch.equal(ref, want), case
    out = torch.full((m, d), float("nan"), device=device, dtype=dt) if m % 2 else None
    got = Q.gated_rmsnorm(x, z, norm.weight.detach(), group, norm.eps, out=out)
    assert got.dtype == dt and (out is None or got.data_ptr() == out.data_ptr())
    rtol, atol = _gated_norm_bound(dt)
    return [seed, float(((got.float() - ref.float()).abs() / (rtol * ref.float().abs() + atol)).max())]


@needs_gpu
@needs_triton
@pytest.mark.parametrize("case", GATED_NORM_GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gated_rmsnorm_matches_module(case: tuple) -> None:
    seed, excess = _gated_rmsnorm_excess(case, "cuda")
    assert excess <= 1, (case, seed, excess)


@needs_triton
def test_gated_rmsnorm_in_interpreter() -> None:
    """gated_rmsnorm over GATED_NORM_CASES in Triton's interpreter vs GatedRMSNorm."""
    errs = _in_interpreter(
        "import json; from tests.test_cuda_backend import _gated_rmsnorm_excess, GATED_NORM_CASES;"
        "print(json.dumps([[c, *_gated_rmsnorm_excess(c, 'cpu')] for c in GATED_NORM_CASES]))", timeout_s=300)
    assert len(errs) == len(GATED_NORM_CASES)
    assert all(excess <= 1 for _, _, excess in errs), errs


def test_gated_rmsnorm_rejects_bad_inputs() -> None:
    """The argument checks come before Triton is needed, so they run without it."""
    x = torch.zeros(2, 64, dtype=torch.float16)
    w = torch.ones(64, dtype=torch.float16)
    with pytest.raises(ValueError, match="D=64 is not a multiple of the group size 48"):
        Q.gated_rmsnorm(x, x, w, 48, 1e-5)
    with pytest.raises(ValueError, match=r"x is torch.float64 \(2, 64\), expected \[M, D\]"):
        Q.gated_rmsnorm(x.double(), x.double(), w.double(), 64, 1e-5)
    with pytest.raises(ValueError, match=r"z is torch.bfloat16 \(2, 64\) .* on cpu, expected torch.float16 \(2, 64\)"):
        Q.gated_rmsnorm(x, x.bfloat16(), w, 64, 1e-5)
    with pytest.raises(ValueError, match=r"x is .* with strides \(1, 2\) .* unit stride along D"):
        Q.gated_rmsnorm(torch.zeros(64, 2, dtype=torch.float16).T, x, w, 64, 1e-5)
    with pytest.raises(ValueError, match=r"out is torch.float16 \(2, 32\)"):
        Q.gated_rmsnorm(x, x, w, 64, 1e-5, out=torch.zeros(2, 32, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"weight is torch.float32 \(64,\) .* expected contiguous torch.float16"):
        Q.gated_rmsnorm(x, x, w.float(), 64, 1e-5)


# ---- Mamba-1's fused dt_proj + state update ---------------------------------------------------------------
# (batch, d_inner, dt_rank, dstate, dtype, weights, z): the 130M / 1.4B shapes, W8 and W4 (group size
# after "w4g") weights, a batch with z a column slice of in_proj's output, no z, and odd sizes (partial
# channel block, dt_rank and dstate not powers of two)
DT_UPDATE_CASES = [(1, 1536, 48, 16, "float16", "float", True), (2, 4096, 128, 16, "bfloat16", "w8", True),
                   (1, 4096, 128, 16, "float16", "w4g128", True), (2, 300, 48, 16, "bfloat16", "w4g16", True),
                   (2, 64, 8, 16, "float32", "float", True),
                   (3, 77, 5, 13, "float16", "w8", False), (1, 100, 160, 64, "float16", "float", True)]
DT_UPDATE_INTERPRETER_CASES = [(1, 100, 48, 16, "float16", "float", True), (2, 77, 48, 16, "bfloat16", "w8", True),
                               (3, 40, 5, 13, "float16", "w8", False), (2, 70, 48, 16, "float16", "w4g16", True)]


def _dt_update_errors(case: tuple, device: str) -> list:
    """One dt_proj_state_update vs reference_dt_proj_state_update on fresh random inputs: [seed, y error /
    bound, state error / bound]. The bound is one rounding of dt in the io dtype (the sums' float32 order
    may round dt to the neighbouring value; Triton's interpreter truncates to bfloat16): eps (at least
    1e-6) for the state's relative error, 4 eps for y's."""
    b, dim, r, n, dtype, weights, with_z = case
    dt = getattr(torch, dtype)
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    x = rand(b, dim + 5).to(device=device, dtype=dt)[:, :dim]  # a row stride of its own (in_proj's output)
    dbc = rand(b, r + 2 * n + 3).to(device=device, dtype=dt)[:, :r + 2 * n]  # a row stride of its own
    w = rand(dim, r) * r ** -0.5
    if weights == "w8":
        ws = w.abs().amax(1) / 127
        weight, ws = torch.round(w / ws[:, None]).to(device=device, dtype=torch.int8), ws.to(device)
    elif weights.startswith("w4g"):
        weight, ws = (t.to(device) for t in Q.quantize_w4(w, int(weights[3:])))
    else:
        weight, ws = w.to(device=device, dtype=dt), None
    A = -torch.exp(torch.rand(dim, n, generator=gen) * 3).to(device)
    Dk, bias = rand(dim).to(device), (torch.rand(dim, generator=gen) * -2 - 1).to(device)
    z = rand(b, 2 * dim).to(device=device, dtype=dt)[:, dim:] if with_z else None
    state = rand(b, dim, n).to(device)
    want_state = state.clone()
    want = Q.reference_dt_proj_state_update(want_state, x, dbc, weight, ws, A, Dk, z, bias)
    got = Q.dt_proj_state_update(state, x, dbc, weight, ws, A, Dk, z, bias)
    eps = max(torch.finfo(dt).eps, 1e-6)  # float32: the kernel's exp, log and sums differ from torch's by ulps
    return [seed, rel_err(got, want) / (4 * eps), rel_err(state, want_state) / eps]


@needs_triton
@needs_interpreter
def test_dt_proj_state_update_in_interpreter() -> None:
    errs = _in_interpreter(
        "import json; from tests.test_cuda_backend import _dt_update_errors, DT_UPDATE_INTERPRETER_CASES;"
        "print(json.dumps([[c, *_dt_update_errors(c, 'cpu')] for c in DT_UPDATE_INTERPRETER_CASES]))",
        timeout_s=300)
    assert len(errs) == len(DT_UPDATE_INTERPRETER_CASES)
    assert all(ey <= 1 and es <= 1 for _, _, ey, es in errs), errs


@needs_gpu
@needs_triton
@pytest.mark.parametrize("case", DT_UPDATE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_dt_proj_state_update_matches_reference(case: tuple) -> None:
    seed, ey, es = _dt_update_errors(case, "cuda")
    assert ey <= 1 and es <= 1, (case, seed, ey, es)


def test_dt_proj_state_update_rejects_bad_inputs() -> None:
    """The argument checks come before Triton is needed, so they run without it."""
    b, dim, r, n = 2, 8, 4, 16
    h = torch.float16
    args = dict(state=torch.zeros(b, dim, n), x=torch.zeros(b, dim, dtype=h), dbc=torch.zeros(b, r + 2 * n, dtype=h),
                weight=torch.zeros(dim, r, dtype=h), weight_scale=None, A=torch.zeros(dim, n))
    with pytest.raises(ValueError, match=r"dbc is torch.float16 \(3, 36\) .* expected torch.float16 \(2, 36\)"):
        Q.dt_proj_state_update(**{**args, "dbc": torch.zeros(3, 36, dtype=h)})
    with pytest.raises(ValueError, match=r"weight is torch.float16 \(8, 4\) .* expected contiguous torch.float16 \(8, 8\)"):
        Q.dt_proj_state_update(**{**args, "dbc": torch.zeros(b, 40, dtype=h)})
    with pytest.raises(ValueError, match=r"W4 weight_scale \(8, 3\) must split dt_rank 4 into groups"):
        Q.dt_proj_state_update(**{**args, "weight": torch.zeros(dim, 2, dtype=torch.int8),
                                  "weight_scale": torch.ones(dim, 3)})
    with pytest.raises(ValueError, match="an int8 weight needs weight_scale"):
        Q.dt_proj_state_update(**{**args, "weight": torch.zeros(dim, r, dtype=torch.int8)})
    with pytest.raises(ValueError, match=r"x is torch.float64 \(2, 8\) with strides \(8, 1\), expected \(2, 8\) with unit stride along DIM"):
        Q.dt_proj_state_update(**{**args, "x": torch.zeros(b, dim, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"z is .* with strides \(1, 2\), expected torch.float16 \(2, 8\)"):
        Q.dt_proj_state_update(**args, z=torch.zeros(dim, b, dtype=h).T)
    with pytest.raises(ValueError, match=r"A is torch.float16 .* expected contiguous torch.float32 \(8, 16\)"):
        Q.dt_proj_state_update(**{**args, "A": torch.zeros(dim, n, dtype=h)})


# ---- GPU: kernel wrappers vs the reference ops ---------------------------------------------------------
@needs_gpu
def test_kernel_wrappers_vs_reference_ops() -> None:
    K.kernel_library()
    g = torch.Generator(device="cuda").manual_seed(torch.seed() % 2**31)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
    b, d, n, length, width = 2, 96, 16, 37, 4
    x, w, bias = r(b, d, length), r(d, width), r(d)
    y, st = K.causal_conv1d_fwd(x, w, bias)
    y_ref, st_ref = ops.causal_conv1d(x.double(), w.double(), bias.double())
    assert rel_err(y, y_ref) < 1e-5 and rel_err(st, st_ref) == 0.0
    xt, state = r(b, d), r(b, d, width - 1)
    y_ref, st_ref = ops.causal_conv1d_update(xt.double(), state.double(), w.double(), bias.double())
    assert rel_err(K.causal_conv1d_update(xt, state, w, bias), y_ref) < 1e-5 and rel_err(state, st_ref) == 0.0

    A = -torch.rand(d, n, device="cuda", generator=g) * 4 - 0.1
    u, delta, z, Bm, Cm, D, db = r(b, d, length), r(b, d, length) - 1, r(b, d, length), r(b, n, length), r(b, n, length), r(d), r(d)
    h0 = r(b, d, n)
    y, hT = K.selective_scan_fwd(u, delta, A, Bm, Cm, D, z, db, True, initial_state=h0)
    y_ref, hT_ref = ops.selective_scan(*(t.double() for t in (u, delta, A, Bm, Cm, D, z, db)), delta_softplus=True,
                                       initial_state=h0.double())
    assert rel_err(y, y_ref) < 1e-4 and rel_err(hT, hT_ref) < 1e-4
    xs, dts, zs, Bs, Cs = r(b, d), r(b, d), r(b, d), r(b, n), r(b, n)
    y_ref, h_ref = ops.selective_state_update(h0.double(), *(t.double() for t in (xs, dts, A, Bs, Cs, D, zs, db)), True)
    y = K.selective_state_update(h0, xs, dts, A, Bs, Cs, D, zs, db, True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h0, h_ref) < 1e-5

    H, P, G, N = 8, 16, 2, 32
    x4, dt3, B4, C4 = r(b, length, H, P), r(b, length, H), r(b, length, G, N), r(b, length, G, N)
    Ah, Dh, dbh, s0 = -torch.rand(H, device="cuda", generator=g) - 0.1, r(H), r(H), r(b, H, P, N)
    y, sT = K.ssd_scan_fwd(x4, dt3, Ah, B4, C4, Dh, dbh, True, (0.0, 0.5), initial_state=s0)
    y_ref, sT_ref = ops.ssd_scan(*(t.double() for t in (x4, dt3, Ah, B4, C4, Dh, dbh)), True, (0.0, 0.5),
                                 initial_state=s0.double())
    assert rel_err(y, y_ref) < 1e-4 and rel_err(sT, sT_ref) < 1e-4
    x3, dt2, B3, C3 = r(b, H, P), r(b, H), r(b, G, N), r(b, G, N)
    y_ref, s_ref = ops.ssd_state_update(s0.double(), *(t.double() for t in (x3, dt2, Ah, B3, C3, Dh, dbh)), True, (0.0, 0.5))
    y = K.ssd_state_update(s0, x3, dt2, Ah, B3, C3, Dh, dbh, True, (0.0, 0.5))
    assert rel_err(y, y_ref) < 1e-5 and rel_err(s0, s_ref) < 1e-5


@needs_gpu
def test_kernel_wrappers_name_the_bad_tensor() -> None:
    x = torch.zeros(2, 8, device="cuda")
    with pytest.raises(ValueError, match=r"conv_state has shape \(2, 8, 2\), expected \(2, 8, 3\)"):
        K.causal_conv1d_update(x, torch.zeros(2, 8, 2, device="cuda"), torch.zeros(8, 4, device="cuda"), None)
    with pytest.raises(TypeError, match="weight has dtype torch.float16"):
        K.causal_conv1d_update(x, torch.zeros(2, 8, 3, device="cuda"), torch.zeros(8, 4, device="cuda").half(), None)
    with pytest.raises(ValueError, match="state must be contiguous"):
        K.selective_state_update(torch.zeros(2, 4, 8, device="cuda").transpose(1, 2), x, x, torch.zeros(8, 4, device="cuda"),
                                 torch.zeros(2, 4, device="cuda"), torch.zeros(2, 4, device="cuda"))


# ---- GPU: the backend vs the reference model -------------------------------------------------------------
@needs_gpu
@needs_triton
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_backend_float32_logits_and_greedy_tokens(name: str) -> None:
    from edgessm.runtime.backend import TorchBackend
    from edgessm.runtime.cuda_backend import CudaBackend

    model = _model(name)
    ref = TorchBackend(copy.deepcopy(model), device="cuda")
    backend = CudaBackend(model, dtype=torch.float32)
    errs = _teacher_forced(backend, ref.model, _tokens(model.config.vocab_size, 2, 40, seed=3), steps=8)
    assert max(errs) < FP32_BOUND, errs
    assert backend.decode_graph(2).graph is not None  # the steps above replayed a captured graph
    prompt = _tokens(model.config.vocab_size, 1, 9, seed=4).numpy()
    got = generate(backend, prompt, 32)
    want = generate(ref, prompt, 32)
    np.testing.assert_array_equal(got.new_tokens, want.new_tokens)


@needs_gpu
@needs_triton
@pytest.mark.parametrize("batch", [1, 3, 6])
@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_backend_float16_within_bound(name: str, batch: int) -> None:
    """Batch 1 and 3 decode with the conv update in in_proj's GEMV kernel, 6 with the separate kernel
    after a GEMM."""
    from edgessm.runtime.backend import TorchBackend
    from edgessm.runtime.cuda_backend import CudaBackend

    model = _model(name)
    ref = TorchBackend(copy.deepcopy(model).half(), device="cuda")
    backend = CudaBackend(model, dtype=torch.float16)
    errs = _teacher_forced(backend, ref.model, _tokens(model.config.vocab_size, batch, 40, seed=5), steps=16)
    print(f"{name} float16 batch {batch} teacher-forced logits rel err: max {max(errs):.2e}")
    assert max(errs) < FP16_BOUND, errs
    if batch > 1:
        return
    # Greedy decoding: where the tokens first differ, the reference's own logits must nearly tie.
    prompt = _tokens(model.config.vocab_size, 1, 9, seed=6).numpy()
    got, want = generate(backend, prompt, 32).new_tokens[0], generate(ref, prompt, 32).new_tokens[0]
    diff = np.flatnonzero(got != want)
    if diff.size:
        i = int(diff[0])
        ctx = np.concatenate([prompt[0], want[:i]])[None]
        logits, _ = ref.prefill(ctx)
        gap = abs(logits[0, -1, got[i]] - logits[0, -1, want[i]]) / np.abs(logits[0, -1]).max()
        assert gap < 1e-2, f"token {i}: {got[i]} vs {want[i]}, relative logit gap {gap:.3g}"


@needs_gpu
@needs_triton
@pytest.mark.parametrize("weights", ["w8a16", "w4a16", "w8a8"])
@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_backend_quantized(name: str, weights: str) -> None:
    from edgessm.runtime.cuda_backend import CudaBackend

    model = _model(name)
    tokens = _tokens(model.config.vocab_size, 1, 30, seed=7)
    backend = CudaBackend(copy.deepcopy(model), weights=weights, group_size=64, calib_tokens=tokens)
    if weights == "w8a8":
        w8a16 = CudaBackend(copy.deepcopy(model), weights="w8a16")
        got, _ = backend.prefill(tokens.numpy())
        want, _ = w8a16.prefill(tokens.numpy())
        err = rel_err(torch.from_numpy(got), torch.from_numpy(want))
        print(f"{name} w8a8 vs w8a16 logits rel err {err:.3e}")
        assert err < W8A8_BOUND
        return
    ref = _dequantized_copy(model, weights, 64).cuda()
    errs = _teacher_forced(backend, ref, tokens, steps=8)
    print(f"{name} {weights} vs dequantized float32 model: max rel err {max(errs):.2e}")
    assert max(errs) < QUANT_BOUND, errs


@needs_gpu
@needs_triton
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("weights", ["float", "w4a16", "w8a8"])
@pytest.mark.parametrize("name", ["mamba1", "mamba2"])
def test_backend_pdl_is_bit_identical_to_serial_launches(name: str, weights: str, batch: int, monkeypatch) -> None:
    """Programmatic dependent launch only moves when each kernel starts: the decode graph's logits and states
    with it (on sm_90+) must equal those without it (EDGESSM_PDL=0) bit for bit, step after step. At batch 1
    every kernel of a layer follows the one that wrote its input directly (no copies in between), the
    CUDA state updates (Mamba-2; Mamba-1 W8A8) among them."""
    from edgessm.runtime.cuda_backend import CudaBackend

    model = _model(name)
    tokens = _tokens(model.config.vocab_size, batch, 24, seed=8)
    runs = []
    for pdl in ("0", "1"):
        monkeypatch.setenv("EDGESSM_PDL", pdl)  # read when the kernels are launched, i.e. captured
        backend = CudaBackend(copy.deepcopy(model), weights=weights, group_size=64, calib_tokens=tokens)
        logits, states = backend.prefill(tokens[:, :8].numpy())
        steps = [logits[:, -1]]
        for t in range(8, 24):
            logits, states = backend.step(tokens[:, t].numpy(), states)
            steps.append(logits)
        runs.append((np.stack(steps), states.conv.cpu(), states.ssm.cpu()))
    (l0, c0, s0), (l1, c1, s1) = runs
    np.testing.assert_array_equal(l0, l1)
    assert torch.equal(c0, c1) and torch.equal(s0, s1)


def test_pdl_only_on_sm90_gpus_and_switched_off_by_env(monkeypatch) -> None:
    assert Q._pdl(torch.zeros(1)) == {"PDL": False, "launch_pdl": False}
    if HAS_CUDA:
        x = torch.zeros(1, device="cuda")
        monkeypatch.setenv("EDGESSM_PDL", "0")
        assert Q._pdl(x)["PDL"] is False
        monkeypatch.setenv("EDGESSM_PDL", "1")
        assert Q._pdl(x)["PDL"] is (torch.cuda.get_device_capability() >= (9, 0))


# ---- open_backend / CLI: --gpu-weights ------------------------------------------------------------------
def test_cli_gpu_weights_are_cuda_backend_modes() -> None:
    """The CLI spells the choices out (it does not import torch to print --help): they must stay
    GPU_WEIGHTS, which must stay CUDA-backend modes."""
    from edgessm.cli import main
    from edgessm.runtime import GPU_WEIGHTS
    from edgessm.runtime.cuda_backend import WEIGHT_MODES

    assert set(GPU_WEIGHTS) <= set(WEIGHT_MODES) and "w8a8" not in GPU_WEIGHTS
    for command in ("run", "generate", "eval", "bench"):
        option = next(o for o in main.commands[command].params if o.name == "gpu_weights")
        assert tuple(option.type.choices) == GPU_WEIGHTS, command


@pytest.mark.parametrize("weights", ["float", "w8a16", "w4a16"])
def test_open_backend_passes_gpu_weights_to_cuda_backend(weights: str, hf_checkpoint, monkeypatch) -> None:
    """A float checkpoint on --device cuda opens the CUDA backend with the requested weight mode (the
    constructor is recorded, so no GPU is needed; the backend itself is tested above and on the GPU)."""
    import edgessm.runtime.cuda_backend as cuda_backend
    from edgessm.models import MambaLM
    from edgessm.runtime import open_backend

    seen: dict = {}

    class Recorder:
        def __init__(self, model, device: str, weights: str) -> None:
            seen.update(model=model, device=device, weights=weights)

    monkeypatch.setattr(cuda_backend, "CudaBackend", Recorder)
    _, path = hf_checkpoint("mamba1", **MAMBA1_CONFIGS["m1-default"])
    assert isinstance(open_backend(path, "auto", "cuda", gpu_weights=weights), Recorder)
    assert seen["weights"] == weights and seen["device"] == "cuda" and isinstance(seen["model"], MambaLM)


def test_gpu_weights_outside_the_cuda_backend_is_an_error(hf_checkpoint, tmp_path: Path) -> None:
    from edgessm.runtime import open_backend

    _, path = hf_checkpoint("mamba2", **MAMBA2_CONFIGS["m2-g1-h16"])
    with pytest.raises(ConfigError, match=r"--device cuda\); .* device 'cpu'"):
        open_backend(path, "torch", "cpu", gpu_weights="w8a16")
    with pytest.raises(ConfigError, match="unknown gpu_weights 'w8a8'"):
        open_backend(path, "torch", "cuda", gpu_weights="w8a8")
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "quant_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="already quantized"):
        open_backend(tmp_path / "q", "torch", "cuda", gpu_weights="w4a16")


def test_cli_gpu_weights_error_names_the_fix(hf_checkpoint) -> None:
    from click.testing import CliRunner

    from edgessm.cli import main

    _, path = hf_checkpoint("mamba1", **MAMBA1_CONFIGS["m1-default"])
    result = CliRunner().invoke(main, ["bench", str(path), "--gpu-weights", "w8a16", "--new-tokens", "1"])
    assert result.exit_code != 0 and "--device cuda" in result.output, result.output


@needs_gpu
@needs_triton
@pytest.mark.parametrize("weights", ["float", "w8a16", "w4a16"])
def test_cli_bench_on_the_gpu(weights: str, hf_checkpoint, tmp_path: Path) -> None:
    """`edgessm bench --device cuda --gpu-weights ...` end to end: the CUDA backend in the mode asked for."""
    from click.testing import CliRunner

    from edgessm.cli import main

    _, path = hf_checkpoint("mamba2", **MAMBA2_CONFIGS["m2-g1-h16"])  # the kernels need dstate % 16 == 0
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", str(path), "--device", "cuda", "--gpu-weights", weights, "--prompt-len",
                                       "8", "--new-tokens", "4", "--repeats", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["backend"] == ("cuda" if weights == "float" else f"cuda-{weights}")
    assert math.isfinite(report["decode_ms_per_token"]) and report["decode_ms_per_token"] > 0
