"""Symmetric integer quantization primitives shared by every recipe.

- ``quantize(x, scale, bits)`` = ``clamp(round_half_to_even(x / scale), -2^(b-1), 2^(b-1) - 1)``,
  the rounding ONNX QuantizeLinear / the CUDA kernels use (``rint``).
- A quantized activation travels as a :class:`QTensor` (integer codes + float32 scale that
  broadcasts over the last axis); consumers dequantize ``q * scale`` (docs/onnx_ops.md).
- int4 weights are packed two per byte along the input axis: byte ``j`` of a row holds element
  ``2j`` in its low nibble and ``2j+1`` in its high nibble, each as a 4-bit two's complement
  code; an odd row length is padded with a zero nibble.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def scale_from_absmax(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """float32 scale mapping ``absmax`` to the largest code; an all-zero range gets scale 1 (codes stay 0)."""
    absmax = absmax.to(torch.float32)
    return torch.where(absmax > 0, absmax / qmax(bits), torch.ones_like(absmax))


def quantize(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8 tensor for bits <= 8) of ``x`` for a broadcastable float32 ``scale``."""
    q = torch.round(x.to(torch.float32) / scale)
    return q.clamp_(-qmax(bits) - 1, qmax(bits)).to(torch.int8)


class QTensor(NamedTuple):
    """An int8-coded activation: ``q`` int8 and a float32 ``scale`` ([] per tensor or [C] per channel)."""

    q: torch.Tensor
    scale: torch.Tensor

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.q.to(torch.float32) * self.scale).to(dtype)


Act = torch.Tensor | QTensor


def as_float(a: Act, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return a.dequantize(dtype) if isinstance(a, QTensor) else a


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """10·log10(‖ref‖² / ‖ref − approx‖²) in float64; +inf when they are identical."""
    ref64, err = ref.double(), (ref.double() - approx.double())
    noise = float(err.pow(2).sum())
    signal = float(ref64.pow(2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise)).item() if signal > 0 else float("-inf")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], shape [rows, cols] → uint8 [rows, ceil(cols/2)] (low nibble = even index)."""
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"pack_int4 expects a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError(f"pack_int4: codes outside [-8, 7] (min {int(q.min())}, max {int(q.max())})")
    if q.shape[1] % 2:
        q = torch.cat([q, q.new_zeros(q.shape[0], 1)], dim=1)
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return nib[:, 0::2] | (nib[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [rows, ceil(cols/2)] → int8 [rows, cols]."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != (cols + 1) // 2:
        raise ValueError(f"unpack_int4: expected uint8 [rows, {(cols + 1) // 2}], got {packed.dtype} {tuple(packed.shape)}")
    lo = (packed & 0xF).to(torch.int16)
    hi = (packed >> 4).to(torch.int16)
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)[:, :cols]
    return torch.where(both >= 8, both - 16, both).to(torch.int8)
