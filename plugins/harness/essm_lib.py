"""ctypes binding of libedgessm_kernels.so (the C ABI in plugins/include/edgessm/kernels.h).

Tensors are torch CUDA tensors; every launcher runs on torch's current stream and a nonzero
return code raises `KernelError` naming the launcher.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ESSM_F32, ESSM_F16, ESSM_BF16, ESSM_I8 = 0, 1, 2, 3
DTYPE_NAMES = {ESSM_F32: "f32", ESSM_F16: "f16", ESSM_BF16: "bf16", ESSM_I8: "i8"}
TORCH_DTYPES = {
    ESSM_F32: torch.float32,
    ESSM_F16: torch.float16,
    ESSM_BF16: torch.bfloat16,
    ESSM_I8: torch.int8,
}
# cudaError_t values a launcher is likely to return, for readable messages.
CUDA_ERRORS = {
    1: "cudaErrorInvalidValue",
    2: "cudaErrorMemoryAllocation",
    9: "cudaErrorInvalidConfiguration",
    98: "cudaErrorInvalidDeviceFunction",
    209: "cudaErrorNoKernelImageForDevice",
    400: "cudaErrorInvalidResourceHandle",
    700: "cudaErrorIllegalAddress",
    701: "cudaErrorLaunchOutOfResources",
}
CUDA_ERROR_INVALID_VALUE = 1

DEFAULT_LIB = Path(__file__).resolve().parents[2] / "build" / "plugins" / "libedgessm_kernels.so"

# SSD prefill forms (essm_tuning_set_ssd_variant, essm_tuning_set_ssd_pieces): (variant, segments[,
# pieces]) -> label. "auto" is the launcher's own choice (for 16-bit outputs the register-resident
# mma.sync chunked form where dstate <= 128, with 4 or 8 warps by occupancy and its sequence split
# into as many segments as fill the GPU, each cut into as many state-only pieces as fill it in pass
# 1, else the WMMA chunked form); "wmma/<warps>w" and "mma/<warps>w[/single][/S<segments>[/P<pieces>]]"
# force a chunked form, its warps per block, (mma) whether its pass 2 keeps a single copy of the raw
# tiles (3 blocks per H100 SM for 16-bit input) instead of two, the segments each sequence is split
# into and the pass-1 pieces per segment (the mma form only where it applies: dstate <= 128; never more
# segments than chunks, nor pieces than a segment's chunks). Float32 outputs always take the direct form.
SSD_VARIANTS = {(0, 0): "auto", (1, 0): "direct", (2, 0): "wmma/8w", (3, 0): "wmma/16w", (4, 1): "mma/4w",
                (5, 1): "mma/8w", (4, 2): "mma/4w/S2", (4, 4): "mma/4w/S4", (4, 8): "mma/4w/S8", (5, 3): "mma/8w/S3",
                (4, 2, 1): "mma/4w/S2/P1", (4, 4, 1): "mma/4w/S4/P1", (4, 3, 5): "mma/4w/S3/P5",
                (6, 1): "mma/4w/single", (6, 4, 2): "mma/4w/single/S4/P2"}


class KernelError(RuntimeError):
    def __init__(self, name: str, code: int) -> None:
        super().__init__(f"{name} returned {code} ({CUDA_ERRORS.get(code, 'cudaError')})")
        self.name = name
        self.code = code


class ScanScales(ctypes.Structure):
    """essm_scan_scales: device addresses of u_scale [dim] and delta/B/C/z_scale [1] (float32)."""

    _fields_ = [
        ("u_scale", ctypes.c_void_p),
        ("delta_scale", ctypes.c_void_p),
        ("B_scale", ctypes.c_void_p),
        ("C_scale", ctypes.c_void_p),
        ("z_scale", ctypes.c_void_p),
    ]


def scan_scales(u_scale: torch.Tensor, tensor_scales: torch.Tensor) -> ScanScales:
    """essm_scan_scales pointing at u_scale [dim] and tensor_scales [4] = delta, B, C, z scales.

    Both must be contiguous float32 CUDA tensors that the caller keeps alive while the struct is used.
    """
    for name, t in (("u_scale", u_scale), ("tensor_scales", tensor_scales)):
        if t.dtype != torch.float32 or not t.is_cuda:
            raise ValueError(f"{name} must be a float32 CUDA tensor, got {t.dtype} on {t.device}")
    if tuple(tensor_scales.shape) != (4,):
        raise ValueError(f"tensor_scales must have shape (4,) (delta, B, C, z), got {tuple(tensor_scales.shape)}")
    base = ptr(tensor_scales)
    item = tensor_scales.element_size()
    return ScanScales(ptr(u_scale), *(base + i * item for i in range(4)))


class SsdScales(ctypes.Structure):
    _fields_ = [("x_scale", ctypes.c_void_p), ("B_scale", ctypes.c_void_p), ("C_scale", ctypes.c_void_p)]


_P, _I, _F, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
_SIGNATURES: dict[str, list[Any]] = {
    "essm_causal_conv1d_fwd": [_I, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _P],
    "essm_causal_conv1d_update": [_I, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _P],
    "essm_selective_scan_fwd": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I,
                                ctypes.POINTER(ScanScales), _P, _P, _P, _I, _I, _I, _I, _P],
    "essm_selective_state_update": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I,
                                    ctypes.POINTER(ScanScales), _P, _P, _I, _I, _I, _P],
    "essm_ssd_scan_fwd": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _F, _F, ctypes.POINTER(SsdScales),
                          _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _P, ctypes.c_size_t, _P],
    "essm_ssd_scan_workspace_size": [_I, _I, _I, _I, _I, _I],
    "essm_ssd_state_update": [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _F, _F,
                              ctypes.POINTER(SsdScales), _P, _P, _I, _I, _I, _I, _I, _P],
    "essm_hadamard_transform": [_I, _I, _P, _P, _I, _F, _F, _P, _I64, _I, _P],
    "essm_tuning_set_scan_variant": [_I, _I],
    "essm_tuning_set_ssd_variant": [_I, _I],
    "essm_tuning_set_ssd_pieces": [_I],
}
_RESTYPES: dict[str, Any] = {"essm_ssd_scan_workspace_size": ctypes.c_size_t}


def ptr(t: torch.Tensor | None) -> int | None:
    """Device address of a contiguous tensor (None -> NULL)."""
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("kernel tensors must be contiguous")
    return t.data_ptr()


class KernelLib:
    """Loaded libedgessm_kernels.so; `call(name, ...)` launches on torch's current stream."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        lib_path = Path(path or os.environ.get("EDGESSM_KERNELS_LIB", DEFAULT_LIB))
        if not lib_path.is_file():
            raise FileNotFoundError(f"kernel library not found: {lib_path} (build plugins/ first)")
        self.path = lib_path
        self._lib = ctypes.CDLL(str(lib_path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.argtypes = argtypes
            fn.restype = _RESTYPES.get(name, ctypes.c_int)

    def call(self, name: str, *args: Any) -> None:
        """Launch `name` with `args` (the stream argument is appended); raise on a nonzero code."""
        stream = torch.cuda.current_stream().cuda_stream
        code = getattr(self._lib, name)(*args, stream)
        if code != 0:
            raise KernelError(name, code)

    def status(self, name: str, *args: Any) -> int:
        """Launch and return the raw cudaError_t (for checks that expect a rejection)."""
        return int(getattr(self._lib, name)(*args, torch.cuda.current_stream().cuda_stream))

    def set_scan_variant(self, variant: int, segments: int = 0) -> int:
        """Force the prefill scan variant (selective_scan.cu): 0 heuristic, 1/2 chunked parallel scan
        with 1/2 channels per thread, 3 segmented sequential scan (dstate <= 16) with `segments`
        time segments (a power of two <= 32; 0 = heuristic, which at one segment runs 4), 4 the
        single-segment one-barrier kernel (dstate <= 16). Returns the variant in force."""
        return int(self._lib.essm_tuning_set_scan_variant(variant, segments))

    def set_ssd_variant(self, variant: int, segments: int = 0, pieces: int = 0) -> int:
        """Force the SSD prefill form (ssd.cu; labels in SSD_VARIANTS): 0 by output dtype and dstate
        (16-bit outputs: the register-resident chunked form for dstate <= 128 with 4 or 8 warps by
        occupancy, else the WMMA chunked form with 8 or 16; float32: the direct recurrence), 1 the
        direct recurrence always, 2 / 3 the WMMA chunked form with 8 / 16 warps, 4 / 5 the
        register-resident form with 4 / 8 warps (16-bit outputs), 6 the same with 4 warps and one
        copy of the raw tiles in pass 2 (two: 4 and 5); `segments` (1..32) forces the
        register-resident form's sequence split (0: as many segments as fill the GPU) and `pieces`
        (1..32) the state-only pieces per segment of its pass 1 (0: as many as fill the GPU).
        Returns the variant in force."""
        self._lib.essm_tuning_set_ssd_pieces(pieces)
        return int(self._lib.essm_tuning_set_ssd_variant(variant, segments))

    @contextlib.contextmanager
    def forced_ssd_variant(self, variant: tuple[int, ...]) -> Iterator[None]:
        """Runs the block with the SSD prefill form (variant, segments) forced, then back to the
        launcher's own choice."""
        self.set_ssd_variant(*variant)
        try:
            yield
        finally:
            self.set_ssd_variant(0)

    def ssd_workspace(self, out_dtype: int, batch: int, seqlen: int, nheads: int, headdim: int,
                      dstate: int) -> torch.Tensor | None:
        """A workspace for essm_ssd_scan_fwd (under the SSD form in force), filled with 0xFF bytes
        (NaN as float32: the kernels must not read what they did not write); None if it needs none."""
        nbytes = int(self._lib.essm_ssd_scan_workspace_size(out_dtype, batch, seqlen, nheads, headdim, dstate))
        return torch.full((nbytes,), 0xFF, dtype=torch.uint8, device="cuda") if nbytes else None
