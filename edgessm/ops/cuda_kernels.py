"""Torch-tensor wrappers over libedgessm_kernels.so (the C ABI in plugins/include/edgessm/kernels.h).

Each wrapper checks device, dtype, shape and contiguity of every tensor (naming the one that is
wrong), launches on torch's current CUDA stream (so it can be captured in a CUDA graph), and raises
``KernelLaunchError`` on a nonzero cudaError_t. Semantics are those of the reference ops in
``edgessm.ops`` (docs/onnx_ops.md); activations ("io") are float32/float16/bfloat16, parameters
(A, D, biases, conv weights) float32, recurrent states float32. The decode wrappers update their
state in place unless an output state is given.

The library is found through ``$EDGESSM_KERNELS_LIB``, then ``build/plugins/`` and ``plugins/build*/``
of the repository (build it with ``cmake -S plugins -B build/plugins -G Ninja && ninja -C build/plugins``).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
from pathlib import Path
from typing import Sequence

import torch

from edgessm.errors import BackendUnavailable

LIB_NAME = "libedgessm_kernels.so"
_REPO = Path(__file__).resolve().parents[2]
_IO_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_SIGNATURES: dict[str, list] = {
    "essm_causal_conv1d_fwd": [_I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _P],
    "essm_causal_conv1d_update": [_I, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _P],
    # the scale-struct pointers are always NULL here (float io only)
    "essm_selective_scan_fwd": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I, _P],
    "essm_selective_state_update": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _I, _I, _I, _P],
    "essm_ssd_scan_fwd": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _F, _F, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I,
                          _P, ctypes.c_size_t, _P],
    "essm_ssd_scan_workspace_size": [_I, _I, _I, _I, _I, _I],
    "essm_ssd_state_update": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _F, _F, _P, _P, _P, _I, _I, _I, _I, _I, _P],
}


_RESTYPES = {"essm_ssd_scan_workspace_size": ctypes.c_size_t}


class KernelLaunchError(RuntimeError):
    """A launcher returned a nonzero cudaError_t."""


def find_kernel_library() -> Path:
    """$EDGESSM_KERNELS_LIB, else the first build of plugins/ in the repository."""
    env = os.environ.get("EDGESSM_KERNELS_LIB")
    if env:
        path = Path(env)
        if not path.is_file():
            raise BackendUnavailable(f"EDGESSM_KERNELS_LIB={env}: no such file (build plugins/ or fix the path)")
        return path
    candidates = [_REPO / "build" / "plugins" / LIB_NAME, *sorted(_REPO.glob(f"plugins/build*/{LIB_NAME}"))]
    for path in candidates:
        if path.is_file():
            return path
    raise BackendUnavailable(
        f"{LIB_NAME} not found (looked in $EDGESSM_KERNELS_LIB, {_REPO / 'build/plugins'}, {_REPO / 'plugins/build*'}); "
        "build it with: cmake -S plugins -B build/plugins -G Ninja && ninja -C build/plugins"
    )


@functools.cache
def kernel_library() -> ctypes.CDLL:
    """The loaded library (once per process). Raises BackendUnavailable without CUDA or the library."""
    if not torch.cuda.is_available():
        raise BackendUnavailable("the CUDA kernels need a CUDA GPU, and torch.cuda.is_available() is False")
    path = find_kernel_library()
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BackendUnavailable(f"{path}: cannot be loaded ({e})") from e
    for name, argtypes in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:
            raise BackendUnavailable(f"{path}: does not export {name} (stale build of plugins/?)") from e
        fn.argtypes = argtypes
        fn.restype = _RESTYPES.get(name, ctypes.c_int)
    return lib


def _launch(op: str, *args) -> None:
    """Call the launcher ``essm_{op}`` (op = the wrapper's name) on torch's current stream."""
    name = f"essm_{op}"
    code = getattr(kernel_library(), name)(*args, torch.cuda.current_stream().cuda_stream)
    if code != 0:
        raise KernelLaunchError(f"{name} returned cudaError_t {code}")


# ---- argument checks ---------------------------------------------------------------------------------
def _check(op: str, what: str, t: torch.Tensor | None, shape: Sequence[int], dtype: torch.dtype | None = None,
           optional: bool = False) -> int | None:
    """Validate one tensor and return its device address (None for an absent optional tensor)."""
    if t is None:
        if optional:
            return None
        raise ValueError(f"{op}: {what} is required")
    if t.device.type != "cuda":
        raise ValueError(f"{op}: {what} is on {t.device}, expected a CUDA tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: {what} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{op}: {what} has dtype {t.dtype}, expected {dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{op}: {what} must be contiguous (strides {t.stride()})")
    return t.data_ptr()


def _io(op: str, t: torch.Tensor) -> int:
    if t.dtype not in _IO_CODES:
        raise TypeError(f"{op}: activations have dtype {t.dtype}, expected float32, float16 or bfloat16")
    return _IO_CODES[t.dtype]


def _same_device(op: str, tensors: dict[str, torch.Tensor | None]) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensors are on different devices: {devices}")


def _limits(dt_limit: tuple[float, float]) -> tuple[float, float]:
    lo, hi = dt_limit
    return float(lo), (float(hi) if math.isfinite(hi) else float("inf"))


# ---- causal conv1d ----------------------------------------------------------------------------------------
def causal_conv1d_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, L] io; weight [C, K] f32; bias [C] f32. Returns (y [B, C, L], conv_state [B, C, K-1])."""
    op = "causal_conv1d_fwd"
    if x.dim() != 3:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}, expected [batch, channels, seqlen]")
    b, c, length = x.shape
    width = weight.shape[-1]
    _same_device(op, {"x": x, "weight": weight, "bias": bias})
    y = torch.empty((b, c, length), dtype=x.dtype, device=x.device)
    state = torch.empty((b, c, width - 1), dtype=x.dtype, device=x.device)
    _launch(op, _io(op, x), _check(op, "x", x, (b, c, length)), _check(op, "weight", weight, (c, width), torch.float32),
            _check(op, "bias", bias, (c,), torch.float32, optional=True), int(silu), y.data_ptr(), state.data_ptr(),
            b, c, length, width)
    return y, state


def causal_conv1d_update(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, silu: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token. x [B, C] io; conv_state [B, C, K-1] io, updated in place. Returns y [B, C] (``out`` if given)."""
    op = "causal_conv1d_update"
    if x.dim() != 2:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}, expected [batch, channels]")
    b, c = x.shape
    width = weight.shape[-1]
    _same_device(op, {"x": x, "conv_state": conv_state, "weight": weight, "bias": bias, "out": out})
    y = torch.empty((b, c), dtype=x.dtype, device=x.device) if out is None else out
    sp = _check(op, "conv_state", conv_state, (b, c, width - 1), x.dtype)
    _launch(op, _io(op, x), _check(op, "x", x, (b, c)), sp, _check(op, "weight", weight, (c, width), torch.float32),
            _check(op, "bias", bias, (c,), torch.float32, optional=True), int(silu), _check(op, "out", y, (b, c), x.dtype),
            sp, b, c, width)
    return y


# ---- Mamba-1 selective scan -------------------------------------------------------------------------------
def selective_scan_fwd(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True, initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u, delta, z [B, D, L] io; A [D, N] f32; B, C [B, N, L] io. Returns (y [B, D, L] io, final_state [B, D, N] f32)."""
    op = "selective_scan_fwd"
    if u.dim() != 3 or A.dim() != 2:
        raise ValueError(f"{op}: u {tuple(u.shape)} must be [batch, dim, seqlen] and A {tuple(A.shape)} [dim, dstate]")
    b, d, length = u.shape
    n = A.shape[1]
    _same_device(op, {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias,
                      "initial_state": initial_state})
    io = _io(op, u)
    y = torch.empty((b, d, length), dtype=u.dtype, device=u.device)
    final = torch.empty((b, d, n), dtype=torch.float32, device=u.device)
    _launch(op, io, io, _check(op, "u", u, (b, d, length)), _check(op, "delta", delta, (b, d, length), u.dtype),
            _check(op, "A", A, (d, n), torch.float32), _check(op, "B", B, (b, n, length), u.dtype),
            _check(op, "C", C, (b, n, length), u.dtype), _check(op, "D", D, (d,), torch.float32, optional=True),
            _check(op, "z", z, (b, d, length), u.dtype, optional=True),
            _check(op, "delta_bias", delta_bias, (d,), torch.float32, optional=True), int(delta_softplus), None,
            _check(op, "initial_state", initial_state, (b, d, n), torch.float32, optional=True),
            y.data_ptr(), final.data_ptr(), b, d, n, length)
    return y, final


MAX_DECODE_DSTATE = 256  # the decode kernels' limit (kMaxDecodeStates in plugins/kernels/common.cuh)


def _check_decode_dstate(op: str, dstate: int) -> None:
    if dstate > MAX_DECODE_DSTATE:
        raise ValueError(f"{op}: state has dstate {dstate}; the decode kernels take at most {MAX_DECODE_DSTATE}")


def selective_state_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = True, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step; ``state`` [B, D, N] f32 is updated in place. x, dt, z [B, D] io; B, C [B, N] io."""
    op = "selective_state_update"
    if state.dim() != 3:
        raise ValueError(f"{op}: state has shape {tuple(state.shape)}, expected [batch, dim, dstate]")
    b, d, n = state.shape
    _check_decode_dstate(op, n)
    _same_device(op, {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias,
                      "out": out})
    io = _io(op, x)
    y = torch.empty((b, d), dtype=x.dtype, device=x.device) if out is None else out
    sp = _check(op, "state", state, (b, d, n), torch.float32)
    _launch(op, io, io, sp, _check(op, "x", x, (b, d)), _check(op, "dt", dt, (b, d), x.dtype),
            _check(op, "A", A, (d, n), torch.float32), _check(op, "B", B, (b, n), x.dtype),
            _check(op, "C", C, (b, n), x.dtype), _check(op, "D", D, (d,), torch.float32, optional=True),
            _check(op, "z", z, (b, d), x.dtype, optional=True),
            _check(op, "dt_bias", dt_bias, (d,), torch.float32, optional=True), int(dt_softplus), None,
            _check(op, "out", y, (b, d), x.dtype), sp, b, d, n)
    return y


# ---- Mamba-2 SSD --------------------------------------------------------------------------------------------
def ssd_scan_fwd(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None, dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf), initial_state: torch.Tensor | None = None, chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, H, P] io; dt [B, L, H] io; A, D, dt_bias [H] f32; B, C [B, L, G, N] io.
    Returns (y [B, L, H, P] io, final_state [B, H, P, N] f32)."""
    op = "ssd_scan_fwd"
    if x.dim() != 4 or B.dim() != 4:
        raise ValueError(f"{op}: x {tuple(x.shape)} must be [B, L, H, P] and B {tuple(B.shape)} [B, L, G, N]")
    b, length, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    _same_device(op, {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "dt_bias": dt_bias,
                      "initial_state": initial_state})
    io = _io(op, x)
    lo, hi = _limits(dt_limit)
    y = torch.empty((b, length, h, p), dtype=x.dtype, device=x.device)
    final = torch.empty((b, h, p, n), dtype=torch.float32, device=x.device)
    # the workspace of the launcher's sequence split (batch-1 prefill on a large GPU), if it asks for one
    ws_bytes = int(kernel_library().essm_ssd_scan_workspace_size(io, b, length, h, p, n))
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    _launch(op, io, io, _check(op, "x", x, (b, length, h, p)), _check(op, "dt", dt, (b, length, h), x.dtype),
            _check(op, "A", A, (h,), torch.float32), _check(op, "B", B, (b, length, g, n), x.dtype),
            _check(op, "C", C, (b, length, g, n), x.dtype), _check(op, "D", D, (h,), torch.float32, optional=True),
            _check(op, "dt_bias", dt_bias, (h,), torch.float32, optional=True), int(dt_softplus), lo, hi, None,
            _check(op, "initial_state", initial_state, (b, h, p, n), torch.float32, optional=True),
            y.data_ptr(), final.data_ptr(), b, length, h, p, g, n, chunk_size,
            None if ws is None else ws.data_ptr(), ws_bytes)
    return y, final


def ssd_state_update(
    state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None, dt_softplus: bool = True,
    dt_limit: tuple[float, float] = (0.0, math.inf), out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step; ``state`` [B, H, P, N] f32 is updated in place. x [B, H, P]; dt [B, H]; B, C [B, G, N]."""
    op = "ssd_state_update"
    if state.dim() != 4 or B.dim() != 3:
        raise ValueError(f"{op}: state {tuple(state.shape)} must be [B, H, P, N] and B {tuple(B.shape)} [B, G, N]")
    b, h, p, n = state.shape
    _check_decode_dstate(op, n)
    g = B.shape[1]
    _same_device(op, {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "dt_bias": dt_bias, "out": out})
    io = _io(op, x)
    lo, hi = _limits(dt_limit)
    y = torch.empty((b, h, p), dtype=x.dtype, device=x.device) if out is None else out
    sp = _check(op, "state", state, (b, h, p, n), torch.float32)
    _launch(op, io, io, sp, _check(op, "x", x, (b, h, p)), _check(op, "dt", dt, (b, h), x.dtype),
            _check(op, "A", A, (h,), torch.float32), _check(op, "B", B, (b, g, n), x.dtype),
            _check(op, "C", C, (b, g, n), x.dtype), _check(op, "D", D, (h,), torch.float32, optional=True),
            _check(op, "dt_bias", dt_bias, (h,), torch.float32, optional=True), int(dt_softplus), lo, hi, None,
            _check(op, "out", y, (b, h, p), x.dtype), sp, b, h, p, g, n)
    return y
