"""Triton kernels for the decode step: quantized GEMV / skinny GEMM, the fused residual-add + RMSNorm and
Mamba-2's gated RMSNorm.

Quantized weight formats (all symmetric, no zero point; ``W`` is the float weight [N, K], y = x W^T):

- **W8** (``quantize_w8``): ``q`` int8 [N, K], ``scale`` float32 [N] per output channel;
  ``W[n, k] ≈ q[n, k] * scale[n]``, ``scale = absmax(W[n]) / 127``.
- **W4** (``quantize_w4``): signed int4 in [-8, 7] per group of ``group_size`` (default 128)
  consecutive inputs; ``scale`` float32 [N, K / group_size], ``scale = absmax(group) / 7``.
  Two values share a byte of ``packed`` int8 [N, K / 2]: the **low nibble holds the even input
  index** ``k = 2j`` and the high nibble ``k = 2j + 1``, each as 4-bit two's complement.
- **A8** (``gemv_w8a8``): activations quantized per tensor, ``xq = clamp(round_half_even(x * (1 /
  x_scale)), -128, 127)`` (in float32, or passed in already as int8), int8 x int8 products summed
  exactly (int32, or float32 partial sums kept below 2**24), then ``y = acc * scale[n] * x_scale``.

Decode (M = batch <= 4) runs the GEMV kernels: each program owns a few output rows of one row of x
and streams them over K, multiplying element-wise and reducing once at the end; the step is bound by
reading the weights once. The word-streaming kernel (``_words_gemv_kernel``) serves W4A16, W8A16, W8A8
and unquantized float16/bfloat16 weights (``gemv_float``, the CUDA backend's ``weights="float"``): it
reads weights and activations as int32 words in 16-byte vectors, one element per thread in every tensor
(no layout conversions through shared memory), and is compiled for each K, its K steps unrolled; it
takes rows of a multiple of 4 words (every W4 K, W8 K % 16, 16-bit K % 8) and W8 rows up to
``_WORDS_W8_MAX_K``, with launch limits per weight width (``_WORDS_GEMV_TUNING``, measured on an H100).
The row-streaming kernel (``_rows_gemv_kernel``) serves the other K, in wide 2-D tiles. Both can end in the decode
step's causal conv1d update (``ConvUpdate``): in_proj's x (Mamba-1) or xBC (Mamba-2) columns leave the
kernel convolved, with the conv state shifted, which saves the decode step one launch per layer.
Larger M runs the GEMM kernels, which tile M (tokens) by
16 or 64 and N (outputs) by 16..64 on tensor cores and stream K. Every GEMV/GEMM kernel has a
float64 reference (``reference_*``) used by the tests. Activations of the A16 kernels are float16
or bfloat16; outputs are in the activation dtype (float16 for W8A8 with int8 input).

The norms (``add_rmsnorm``: residual add + RMSNorm; ``gated_rmsnorm``: Mamba-2's gated RMSNorm) run one
program per row (per row and group for the gated one) and have torch references that round exactly as
the model's modules do. ``dt_proj_state_update`` is Mamba-1's decode step after x_proj (dt_proj, then
the selective state update) in one kernel, a [channels, dstate] state tile per program; its dt_proj
weight may be float, W8 or W4.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from edgessm.errors import BackendUnavailable
from edgessm.ops import conv as conv_ops
from edgessm.ops import scan as scan_ops

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None


def _require_triton() -> None:
    if triton is None:
        raise BackendUnavailable("the Triton GEMV kernels need the `triton` package (pip install triton)")


# ---- quantization of weights (plain torch, any device) ----------------------------------------------
def quantize_w8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (q int8 [N, K], scale float32 [N]) with per-output-channel absmax scales."""
    wf = w.detach().float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(wf / scale[:, None]).clamp(-128, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q int8 [N, K] with values in [-8, 7], K even → int8 [N, K/2]; low nibble = even k."""
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: the input dimension K={q.shape[-1]} must be even")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: values must lie in [-8, 7]")
    nib = q.to(torch.int16) & 0xF
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8).view(torch.int8).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: int8 [N, K/2] → int8 [N, K] in [-8, 7]."""
    p = packed.to(torch.int16)
    lo = ((p & 0xF) ^ 8) - 8  # sign-extend a 4-bit two's complement value
    hi = (((p >> 4) & 0xF) ^ 8) - 8
    return torch.stack([lo, hi], dim=-1).flatten(-2).to(torch.int8)


def quantize_w4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float → (packed int8 [N, K/2], scale float32 [N, K/group_size])."""
    n, k = w.shape
    if k % group_size or group_size % 2:
        raise ValueError(f"quantize_w4: K={k} must be a multiple of the (even) group size {group_size}")
    g = w.detach().float().view(n, k // group_size, group_size)
    scale = (g.abs().amax(dim=-1) / 7.0).clamp(min=1e-12)
    q = torch.round(g / scale[..., None]).clamp(-8, 7).to(torch.int8).view(n, k)
    return pack_int4(q), scale.contiguous()


def dequantize_w8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()[:, None]


def dequantize_w4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = unpack_int4(packed).float()
    group = q.shape[1] // scale.shape[1]
    return (q.view(q.shape[0], scale.shape[1], group) * scale.float()[..., None]).view(q.shape)


def quantize_activation(x: torch.Tensor, x_scale: float) -> torch.Tensor:
    """The A8 activation quantizer, exactly as the kernel computes it (float32 multiply by 1/scale)."""
    inv = torch.tensor(1.0 / x_scale, dtype=torch.float32)
    return torch.round(torch.clamp(x.float() * inv.to(x.device), -128.0, 127.0)).to(torch.int8)


# ---- the conv update fused into a decode GEMV -----------------------------------------------------------
@dataclass(frozen=True)
class ConvUpdate:
    """The one-token causal conv1d update with SiLU (edgessm.ops.conv.causal_conv1d_update) of output
    columns [start, start + C) of a decode GEMV, run in its epilogue: those columns of y leave the kernel
    convolved, and ``state`` [M, C, width - 1] (y's dtype, contiguous) is shifted in place to end with
    their unconvolved values (rounded to y's dtype, as the separate kernel would read them from y).
    ``weight`` [C, width] and ``bias`` [C] are float32."""

    state: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    start: int

    @property
    def channels(self) -> int:
        return self.weight.shape[0]

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    def columns(self, y: torch.Tensor) -> torch.Tensor:
        """The view of y [M, N] that the update convolves."""
        return y[:, self.start:self.start + self.channels]


def reference_conv_columns(y: torch.Tensor, conv: ConvUpdate) -> torch.Tensor:
    """What a GEMV with ``conv`` computes from the plain GEMV's output y [M, N] (in the output dtype): the
    conv columns replaced by the conv update of their values; ``conv.state`` is updated in place."""
    cols, new_state = conv_ops.causal_conv1d_update(conv.columns(y), conv.state, conv.weight, conv.bias, True)
    conv.state.copy_(new_state)
    out = y.clone()
    conv.columns(out).copy_(cols)
    return out


# ---- float64 references -------------------------------------------------------------------------------
def reference_float(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if bias is None else y + bias.double()


def reference_w8a16(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ (q.double() * scale.double()[:, None]).T
    return y if bias is None else y + bias.double()


def reference_w4a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = x.double() @ dequantize_w4(packed, scale).double().T
    return y if bias is None else y + bias.double()


def reference_w8a8(
    x: torch.Tensor, x_scale: float, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    xq = x if x.dtype == torch.int8 else quantize_activation(x, x_scale)
    y = (xq.double() @ q.double().T) * (float(torch.tensor(x_scale, dtype=torch.float32)) * scale.double())
    return y if bias is None else y + bias.double()


def reference_add_rmsnorm(
    residual: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``add_rmsnorm`` computes: the arithmetic of edgessm.models.lm.Block and RMSNorm, in torch ops."""
    new_res = residual if out is None else residual + out
    h = new_res.to(weight.dtype)
    hf = h.float()
    normed = weight * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return new_res, normed


def reference_dt_proj_state_update(
    state: torch.Tensor, x: torch.Tensor, dbc: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
    A: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dt_bias: torch.Tensor | None,
) -> torch.Tensor:
    """What ``dt_proj_state_update`` computes, as the two steps it fuses: ``dt = dt_proj(dbc[:, :R])`` (the
    float, W8 or W4 weight, no bias; the scales applied as the GEMV kernels apply them) rounded to x's dtype, then edgessm.ops.scan.selective_state_update with
    softplus; ``state`` is updated in place, y returned."""
    n = A.shape[1]
    r = dbc.shape[1] - 2 * n
    u = dbc[:, :r].float()
    if weight_scale is not None and weight_scale.dim() == 2:  # W4: each group's sum times its scale
        groups = weight_scale.shape[1]
        q = unpack_int4(weight).float().view(weight.shape[0], groups, r // groups)
        acc = ((u.view(u.shape[0], 1, groups, r // groups) * q).sum(-1) * weight_scale.float()).sum(-1)
    else:  # float or W8: the scale after the sum, as the W8 GEMV applies it
        acc = u @ weight.float().T
        acc = acc if weight_scale is None else acc * weight_scale.float()
    dt = acc.to(x.dtype)
    y, new = scan_ops.selective_state_update(state, x, dt, A, dbc[:, r:r + n], dbc[:, r + n:r + 2 * n], D, z, dt_bias,
                                             True)
    state.copy_(new)
    return y


def reference_gated_rmsnorm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float
) -> torch.Tensor:
    """What ``gated_rmsnorm`` computes: the ops of edgessm.models.norm.GatedRMSNorm for float16/bfloat16/
    float32 x (float32 math, the normalised value cast to x's dtype). With weight in x's dtype, torch
    keeps the last product in x's dtype: computed in float32 (exact for 16-bit operands), rounded once."""
    h = x.float() * F.silu(z.float())
    g = h.view(*h.shape[:-1], -1, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight * g.view(h.shape).to(x.dtype)


# ---- kernels ---------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _a8_input(x, inv_scale, X_INT8: tl.constexpr):
        """The int8 activations of the W8A8 kernels: x itself when the caller quantized it already."""
        if X_INT8:
            xq = x
        else:
            xq = _a8_value(x.to(tl.float32), inv_scale).to(tl.int8)
        return xq

    @triton.jit
    def _a8_value(x, inv_scale):
        """The int8 quantization of the float32 x (as _a8_input gives it), as a float32 integer in [-128, 127]."""
        v = tl.minimum(tl.maximum(x * inv_scale, -128.0), 127.0)
        # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half-to-even in float32 (as torch.round does)
        return (v + 12582912.0) - 12582912.0

    @triton.jit
    def _pdl_start(PDL: tl.constexpr):
        """Programmatic dependent launch (PDL: sm_90 and later, see _pdl): let the next kernel's programs
        start now. They run up to their own _pdl_wait, loading only parameters (weights, scales, norm
        and conv weights) that no kernel writes."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _pdl_wait(PDL: tl.constexpr):
        """Wait until the previous kernel has finished and its writes are visible: before the first load of
        an activation or state, and before any store."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _epilogue(acc, rn, mask_n, ws_ptr, b_ptr, x_scale,
                  CHANNEL_SCALE: tl.constexpr, A8: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Every kernel's output in float32: acc [BLOCK_N] (GEMV) or [BLOCK_M, BLOCK_N] (GEMM) over the
        output channels rn, times the per-channel weight scale (W8; W4 applies its group scales in the K
        loop) and the activation scale (A8), plus the bias. Rank-1 operands broadcast along the last
        axis, so one body serves both shapes."""
        y = acc.to(tl.float32)
        if CHANNEL_SCALE:
            y = y * tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
        if A8:
            y = y * x_scale
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        return y

    @triton.jit
    def _conv_columns(y, rows, mask, m, state_ptr, cw_ptr, cb_ptr, start, C,
                      W: tl.constexpr, HAS_BIAS: tl.constexpr):
        """A decode GEMV's outputs y [rows] (float32) of activation row m with the conv update of
        ConvUpdate applied to the rows in [start, start + C) (others pass through): the value rounded
        to the state's dtype enters the window, the whole window is read before it is shifted, and the
        sum runs as the CUDA kernel's (bias first, then one FMA per tap, oldest first), then SiLU.

        rows usually sits in a layout that repeats each value over several threads, all of which load
        the window, while one of them stores the shifted state: the barrier keeps every copy's loads
        ahead of that store (without it, on an H100, copies that read the shifted window wrote wrong
        outputs at 32 rows per program)."""
        io = state_ptr.dtype.element_ty
        c = rows - start
        mine = mask & (c >= 0) & (c < C)
        x = y.to(io)
        s_row = state_ptr + (m * C + c) * (W - 1)
        win = ()
        for j in tl.static_range(W - 1):
            win = win + (tl.load(s_row + j, mask=mine, other=0.0),)
        if HAS_BIAS:
            acc = tl.load(cb_ptr + c, mask=mine, other=0.0)
        else:
            acc = tl.zeros_like(y)
        for j in tl.static_range(W - 1):
            acc = tl.fma(tl.load(cw_ptr + c * W + j, mask=mine, other=0.0), win[j].to(tl.float32), acc)
        acc = tl.fma(tl.load(cw_ptr + c * W + (W - 1), mask=mine, other=0.0), x.to(tl.float32), acc)
        tl.debug_barrier()
        for j in tl.static_range(W - 2):
            tl.store(s_row + j, win[j + 1], mask=mine)
        if W > 1:
            tl.store(s_row + (W - 2), x, mask=mine)
        return tl.where(mine, acc / (1.0 + tl.exp(-acc)), y)

    @triton.jit
    def _w8_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, x_inv_scale, x_scale,
        A8: tl.constexpr, X_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n, mask_m = rn < N, rm < M
        if A8:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)  # exact int8 x int8 sums
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
            if A8:
                acc += tl.dot(_a8_input(x, x_inv_scale, X_INT8), tl.trans(w))
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        y = _epilogue(acc, rn, mask_n, ws_ptr, b_ptr, x_scale, CHANNEL_SCALE=True, A8=A8, HAS_BIAS=HAS_BIAS)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _w4_kernel(
        x_ptr, p_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One K step is one quantization group; the even and odd inputs of the group are two
        # half-width dot products (x[2j] pairs with the low nibble, x[2j+1] with the high one), which
        # avoids interleaving the unpacked nibbles in registers.
        HALF: tl.constexpr = GROUP // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_n, mask_m = rn < N, rm < M
        mask_x = mask_m[:, None]
        n_groups = K // GROUP
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for g in range(0, n_groups):
            rj = g * HALF + tl.arange(0, HALF)
            p = tl.load(p_ptr + rn[:, None] * (K // 2) + rj[None, :], mask=mask_n[:, None], other=0).to(tl.int32)
            lo = (p << 28) >> 28  # arithmetic shifts sign-extend each nibble
            hi = (p << 24) >> 28
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :], mask=mask_x, other=0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + 2 * rj[None, :] + 1, mask=mask_x, other=0)
            part = tl.dot(x_even, tl.trans(lo.to(x_even.dtype))) + tl.dot(x_odd, tl.trans(hi.to(x_odd.dtype)))
            s = tl.load(s_ptr + rn * n_groups + g, mask=mask_n, other=0.0)
            acc += part * s[None, :]
        y = _epilogue(acc, rn, mask_n, None, b_ptr, 1.0, CHANNEL_SCALE=False, A8=False, HAS_BIAS=HAS_BIAS)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _int_to_f32(u):
        # u int32 in [0, 2**23): float32 with bit pattern 0x4B000000 | u is exactly 2**23 + u; the caller
        # subtracts 2**23 (plus the offset that undoes the sign flip). This replaces an I2F conversion
        # per weight (a low-throughput instruction that limits batch-1 decode) with integer ops.
        return (u | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _rows_weights(w_ptr, rn, mask_n, k0, K, BLOCK_K: tl.constexpr):
        """The row-streaming GEMV's weight tile [rows rn, K step at k0]."""
        rk = k0 + tl.arange(0, BLOCK_K)
        return tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask_n[:, None] & (rk < K)[None, :], other=0)

    @triton.jit
    def _rows_step(acc, w, x_row, k0, K, x_inv_scale, A8: tl.constexpr, X_INT8: tl.constexpr, W16: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """acc + the element-wise products of the weight tile w and the K step at k0 of the row x_row."""
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + rk, mask=rk < K, other=0)
        if A8:
            acc += w.to(tl.int32) * _a8_input(x, x_inv_scale, X_INT8).to(tl.int32)[None, :]
        elif W16:
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        else:
            # (q ^ 0x80) & 0xFF = q + 128 in [0, 255]
            wf = _int_to_f32((w.to(tl.int32) ^ 0x80) & 0xFF) - 8388736.0  # 2**23 + 128
            acc += wf * x.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _rows_gemv_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym, x_inv_scale, x_scale,
        cs_ptr, cw_ptr, cb_ptr, conv_start, conv_c,
        A8: tl.constexpr, X_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, W16: tl.constexpr,
        CONV_W: tl.constexpr, CONV_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # Decode (few rows of x) where the word-streaming kernel does not apply (W8 or 16-bit weights at a
        # K it does not take): program (i, m) owns BLOCK_N output rows of activation row m
        # and streams them over K in wide tiles; products accumulate element-wise in a 2D register tile
        # and are reduced across K once at the end (no tensor-core tile padded to 16 rows of x). Weights
        # are W8 (int8 with a scale per output row) or, with W16, 16-bit floats used as they are. (Triton
        # loads the x slice in a layout of its own and converts it to the tile's through shared memory.)
        #
        # With PDL the first K step's weights are loaded before _pdl_wait, i.e. while the kernel that
        # writes x may still run (the step is peeled off the loop for that).
        _pdl_start(PDL)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        mask_n = rn < N
        if A8:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)  # exact int8 x int8 sums
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        w = _rows_weights(w_ptr, rn, mask_n, 0, K, BLOCK_K)
        _pdl_wait(PDL)
        acc = _rows_step(acc, w, x_ptr + m * stride_xm, 0, K, x_inv_scale, A8, X_INT8, W16, BLOCK_K)
        for k0 in range(BLOCK_K, K, BLOCK_K):
            acc = _rows_step(acc, _rows_weights(w_ptr, rn, mask_n, k0, K, BLOCK_K), x_ptr + m * stride_xm, k0, K,
                             x_inv_scale, A8, X_INT8, W16, BLOCK_K)
        y = _epilogue(tl.sum(acc, axis=1), rn, mask_n, ws_ptr, b_ptr, x_scale, CHANNEL_SCALE=not W16, A8=A8,
                      HAS_BIAS=HAS_BIAS)
        if CONV_W > 0:  # (CONV_W: the conv width, 0 without the conv update)
            y = _conv_columns(y, rn, mask_n, m, cs_ptr, cw_ptr, cb_ptr, conv_start, conv_c, CONV_W, CONV_BIAS)
        tl.store(y_ptr + m * stride_ym + rn, y.to(y_ptr.dtype.element_ty), mask=mask_n)

    @triton.jit
    def _word_field(u, I: tl.constexpr, BITS: tl.constexpr, fmagic):
        """Field I (bits BITS*I.., input k = (32 / BITS) w + I) of the offset-binary words u (each 4-bit
        field + 8, each 8-bit one + 128) as its signed float32 value. One LOP3 puts the field into the
        mantissa of the float 2**(23 - BITS J), whose mantissa bit BITS J weighs 1, so the float is exactly
        2**(23 - BITS J) + field; one FADD removes 2**(23 - BITS J) + the offset. Fields that would reach
        the exponent (bit 23: nibbles 5..7, bytes 2..3) are taken from one shift of the word instead,
        at the lowest positions J."""
        FIT: tl.constexpr = 23 // BITS  # fields entirely below bit 23
        J: tl.constexpr = I if I < FIT else I - (32 // BITS - FIT)
        v = u if I < FIT else u >> (BITS * (32 // BITS - FIT))
        f = ((v & (((1 << BITS) - 1) << (BITS * J))) | (fmagic - ((BITS * J) << 23))).to(tl.float32, bitcast=True)
        return f - (2.0 ** (23 - BITS * J) + 2.0 ** (BITS - 1))

    @triton.jit
    def _x_halves(xw, F16: tl.constexpr):
        """An int32 word holding two 16-bit activations (low half = even k) -> the two as float32."""
        if F16:
            lo = (xw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        else:  # bfloat16 is the upper half of a float32
            lo = (xw << 16).to(tl.float32, bitcast=True)
            hi = (xw & -65536).to(tl.float32, bitcast=True)
        return lo, hi

    @triton.jit
    def _joined_rows_sum(accs, R: tl.constexpr):
        """R (1, 2, 4 or 8) per-row partial sums [C] -> their sums [R] in one reduction: the rows are
        joined into an in-thread last axis first (one shuffle tree and one cross-warp exchange for all
        rows instead of R)."""
        C: tl.constexpr = accs[0].shape[0]
        if R == 1:
            t = tl.reshape(accs[0], [C, 1])
        elif R == 2:
            t = tl.join(accs[0], accs[1])
        elif R == 4:  # the nested joins put row r at [:, r // 2, r % 2]: the reshape keeps row order
            t = tl.reshape(tl.join(tl.join(accs[0], accs[2]), tl.join(accs[1], accs[3])), [C, 4])
        else:
            t = tl.reshape(tl.join(tl.join(tl.join(accs[0], accs[4]), tl.join(accs[2], accs[6])),
                                   tl.join(tl.join(accs[1], accs[5]), tl.join(accs[3], accs[7]))), [C, 8])
        return tl.sum(t, axis=0)

    @triton.jit
    def _load_words(ptr, N: tl.constexpr, ASM: tl.constexpr):
        """The N (1, 2 or 4) consecutive int32 words at each of the pointers ptr [C] as N tensors [C] of
        ptr's layout: one vector load per pointer with ASM (N * 4-byte aligned addresses), else N scalar
        loads (Triton's interpreter runs no inline assembly). tl.load of a [C, N] block would do the
        same in one instruction, but its layout (chosen for the load) differs from that of the [C]
        tensors computed from the words, and the conversions go through shared memory."""
        if not ASM:
            # what the vector load would need; checked where device asserts run (the tests turn them on in
            # the interpreter, so that its runs catch a misaligned address that would fault on a GPU)
            tl.device_assert(ptr.to(tl.int64, bitcast=True) % (4 * N) == 0, "_load_words: misaligned vector load")
            if N == 1:
                return (tl.load(ptr),)
            elif N == 2:
                return tl.load(ptr), tl.load(ptr + 1)
            else:
                return tl.load(ptr), tl.load(ptr + 1), tl.load(ptr + 2), tl.load(ptr + 3)
        # (is_pure=False: the loads keep their place relative to _pdl_wait, also inline assembly)
        elif N == 1:
            return (tl.inline_asm_elementwise("ld.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                              is_pure=False, pack=1),)
        elif N == 2:
            return tl.inline_asm_elementwise("ld.global.v2.b32 {$0, $1}, [$2];", "=r,=r,l", [ptr],
                                             dtype=(tl.int32, tl.int32), is_pure=False, pack=1)
        else:
            return tl.inline_asm_elementwise("ld.global.v4.b32 {$0, $1, $2, $3}, [$4];", "=r,=r,=r,=r,l", [ptr],
                                             dtype=(tl.int32, tl.int32, tl.int32, tl.int32), is_pure=False, pack=1)

    @triton.jit
    def _weight_values(u, BITS: tl.constexpr, F16: tl.constexpr, fmagic):
        """The 32 / BITS weights of the int32 words u [CH] as float32 tensors, input order: 4- and 8-bit
        fields (signed, two's complement) through _word_field, 16-bit floats (x's dtype) as they are."""
        if BITS == 16:
            lo, hi = _x_halves(u, F16)
            return lo, hi
        else:
            offset_binary = _offset_binary(u, BITS)
            vals = ()
            for i in tl.static_range(32 // BITS):
                vals = vals + (_word_field(offset_binary, i, BITS, fmagic),)
            return vals

    @triton.jit
    def _offset_binary(u, BITS: tl.constexpr):
        """The two's complement 4- or 8-bit fields of the int32 words u as offset binary (_word_field's input)."""
        if BITS == 4:
            return u ^ -0x77777778  # ^ 0x88888888: each nibble + 8, in [0, 15]
        else:
            return u ^ -0x7F7F7F80  # ^ 0x80808080: each byte + 128, in [0, 255]

    @triton.jit
    def _chain_value(acc, A8: tl.constexpr):
        """A float32 FFMA chain as it is summed: with A8 an exact integer, summed in int32."""
        if A8:
            return acc.to(tl.int32)
        else:
            return acc

    @triton.jit
    def _activations(xws, first: tl.constexpr, count: tl.constexpr, magic, x_inv_scale, F16: tl.constexpr,
                     A8: tl.constexpr, X_INT8: tl.constexpr):
        """The activations in the ``count`` words xws[first:first + count] as float32, in input order: 16-bit
        floats two per word, or with A8 their int8 quantization (_a8_input's arithmetic, as exact float32
        integers), or int8 four per word when x is int8 already."""
        xs = ()
        for j in tl.static_range(first, first + count):
            if X_INT8:
                xs = xs + _weight_values(xws[j], 8, F16, magic)
            else:
                lo, hi = _x_halves(xws[j], F16)
                if A8:
                    xs = xs + (_a8_value(lo, x_inv_scale), _a8_value(hi, x_inv_scale))
                else:
                    xs = xs + (lo, hi)
        return xs

    @triton.jit
    def _w4_group_step(accs, ws, ss, xws, i: tl.constexpr, magic, F16: tl.constexpr, BLOCK_N: tl.constexpr,
                       VEC: tl.constexpr):
        """accs [r] + row r's products of batched K step i (words ws, scales ss, activation pairs xws as
        _words_gemv_kernel loads them): each word's 8 products summed, the VEC words' sums added, times
        their group's scale once."""
        parts = ()  # [v * BLOCK_N + r]: row r's sum over word v's 8 weights
        for v in tl.static_range(VEC):
            xs = _activations(xws, (i * VEC + v) * 4, 4, magic, 1.0, F16, False, False)
            us = ()
            for r in tl.static_range(BLOCK_N):
                us = us + (_offset_binary(ws[(i * BLOCK_N + r) * VEC + v], 4),)
            # field-major, so that the rows' independent FFMA chains interleave; each nibble is unpacked
            # where it is used (unpacking all first reorders the PTX: in the decode in_proj kernel with
            # the conv update ptxas then gave 80 registers instead of 96, and Mamba-1 1.4B W4A16 decode
            # measured 4.7% slower on an H100)
            row_parts = ()
            for r in tl.static_range(BLOCK_N):
                row_parts = row_parts + (_word_field(us[r], 0, 4, magic) * xs[0],)
            for e in tl.static_range(1, 8):
                nxt = ()
                for r in tl.static_range(BLOCK_N):
                    nxt = nxt + (row_parts[r] + _word_field(us[r], e, 4, magic) * xs[e],)
                row_parts = nxt
            parts = parts + row_parts
        nxt = ()
        for r in tl.static_range(BLOCK_N):
            row_sum = parts[r]
            for v in tl.static_range(1, VEC):
                row_sum += parts[v * BLOCK_N + r]
            nxt = nxt + (accs[r] + row_sum * ss[i * BLOCK_N + r],)
        return nxt

    @triton.jit
    def _fma_chains_step(accs, ws, xws, i: tl.constexpr, magic, x_inv_scale, BITS: tl.constexpr, F16: tl.constexpr,
                         A8: tl.constexpr, X_INT8: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr):
        """accs [r * VEC + v] + the products of batched K step i for unscaled weights (W8: the row scale
        comes after the sum; 16-bit floats): one FFMA per weight into the chain of its row and word
        position, so BLOCK_N * VEC independent chains and no partial sums. With A8 every product and
        chain is an integer below 2**24 (see _words_gemv_kernel), so exact."""
        E: tl.constexpr = 32 // BITS
        PX: tl.constexpr = E // 4 if X_INT8 else E // 2  # activation words per weight word
        xs = _activations(xws, i * VEC * PX, VEC * PX, magic, x_inv_scale, F16, A8, X_INT8)  # [v * E + e]
        wvals = ()  # [(r * VEC + v) * E + e]
        for r in tl.static_range(BLOCK_N):
            for v in tl.static_range(VEC):
                wvals = wvals + _weight_values(ws[(i * BLOCK_N + r) * VEC + v], BITS, F16, magic)
        for e in tl.static_range(E):  # field-major, so that the chains interleave
            nxt = ()
            for c in tl.static_range(BLOCK_N * VEC):
                nxt = nxt + (accs[c] + wvals[c * E + e] * xs[(c % VEC) * E + e],)
            accs = nxt
        return accs

    @triton.jit(do_not_specialize=["fmagic"])
    def _words_gemv_kernel(
        x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, N, stride_xm, stride_ym, fmagic, x_inv_scale, x_scale,
        cs_ptr, cw_ptr, cb_ptr, conv_start, conv_c,
        K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, A8: tl.constexpr, X_INT8: tl.constexpr,
        HAS_BIAS: tl.constexpr, CONV_W: tl.constexpr, CONV_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, VEC: tl.constexpr,
        BLOCK_W: tl.constexpr, BATCH: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr,
    ):
        # Decode (few rows of x): program (i, m) owns BLOCK_N output rows of activation
        # row m. The weights are read as int32 words of E = 32 / BITS weights each, inputs E w .. E w + E - 1
        # in ascending bit order: BITS = 4 (W4: nibbles, a float32 scale per GROUP inputs), 8 (W8: bytes,
        # a float32 scale per row, applied after the sum) or 16 (x's float dtype, no scale). Per K step of
        # BLOCK_W words, thread c takes the VEC consecutive words from c * VEC (one vector load; for W4
        # inside one quantization group) of every row, and their activations, P int32 words per weight
        # word (E / 2 pairs of 16-bit activations; W8A8 with int8 x: E / 4 words of four) in P VEC
        # consecutive words (one to four vector loads), converted once for all BLOCK_N rows. Every tensor is [CH] (one element per thread, _load_words), so nothing changes layout.
        # Per weight: one LOP3 + one FADD (_word_field; 16-bit: one conversion) + one FFMA; per row and
        # thread the VEC words are summed in-thread (W4: times their group scale once). K is a
        # compile-time constant and the K steps unroll, BATCH steps' loads at a time; the rows are reduced
        # across threads together at the end.
        #
        # W8A8 (A8): x is quantized as it is converted (or is int8 already, X_INT8: four per word, one word
        # per weight word) and the products run as for W8A16 on those integers: each product is at most
        # 2**14 in magnitude and a chain holds 4 * STEPS <= 1024 of them (K <= 2**19, asserted), so every
        # chain is exact in float32; the chains are summed in int32, as the reference sums.
        #
        # ``fmagic`` is 0x4B000000 (the float 2**23) passed in at run time rather than written as a
        # literal: as a register it lets ptxas fuse (u & mask) | magic into one LOP3 (with two
        # immediates it emits two), and ``fmagic >> 31`` is a 0 the compiler cannot fold (below).
        #
        # With PDL the first batch's weights and scales are loaded before _pdl_wait, its activations after.
        _pdl_start(PDL)
        E: tl.constexpr = 32 // BITS  # weights per word
        P: tl.constexpr = E // 4 if X_INT8 else E // 2  # activation words per weight word (int8 x: 4 per word)
        XV: tl.constexpr = 4 if VEC * P >= 4 else VEC * P  # activation words per vector load
        KW: tl.constexpr = K // E  # int32 words per row
        NG: tl.constexpr = K // GROUP
        CH: tl.constexpr = BLOCK_W // VEC
        STEPS: tl.constexpr = (KW + BLOCK_W - 1) // BLOCK_W
        EVEN: tl.constexpr = KW % BLOCK_W == 0
        tl.static_assert(not A8 or 4 * STEPS <= 1024, "W8A8: a chain of more than 1024 products may be inexact")
        F16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
        # The last program is moved back to end at row N (it recomputes rows of its neighbour and stores
        # only its own), so that no load needs a mask.
        r0 = tl.minimum(tl.program_id(0) * BLOCK_N, N - BLOCK_N)
        m = tl.program_id(1)
        zero = fmagic >> 31
        c0 = tl.arange(0, CH) * VEC  # a thread's first word in a K step
        pw = w_ptr.to(tl.pointer_type(tl.int32)) + r0 * KW
        if BITS == 4:
            sp = s_ptr + r0 * NG
        xw_ptr = x_ptr.to(tl.pointer_type(tl.int32)) + m * (stride_xm // (4 if X_INT8 else 2))
        accs = ()  # W4: [r], row r's sum; else [r * VEC + v], row r's chain of word position v
        for r in tl.static_range(BLOCK_N if BITS == 4 else BLOCK_N * VEC):
            accs = accs + (tl.zeros([CH], dtype=tl.float32),)
        for b0 in tl.static_range(0, STEPS, BATCH):
            # loads of steps b0 .. b0 + BATCH - 1 (i = step - b0): row r's word v at ws[(i * BLOCK_N + r) * VEC
            # + v], its W4 scale at ss[i * BLOCK_N + r], pair j of word v at xws[(i * VEC + v) * P + j]
            ws = ()
            ss = ()
            xws = ()
            for st in tl.static_range(b0, b0 + BATCH):
                if st < STEPS:
                    cw = st * BLOCK_W + c0
                    if not EVEN:  # words past the row read word 0; their activations (below) are 0
                        cw = tl.where(cw < KW, cw, 0)
                    for r in tl.static_range(BLOCK_N):
                        ws = ws + _load_words(pw + r * KW + cw, VEC, ASM)
                        if BITS == 4:  # (a thread's VEC words lie in one group)
                            gi = (st * BLOCK_W + c0) // (GROUP // E)
                            if EVEN:
                                ss = ss + (tl.load(sp + r * NG + gi),)
                            else:
                                ss = ss + (tl.load(sp + r * NG + gi, mask=gi < NG, other=0.0),)
            if b0 == 0:
                _pdl_wait(PDL)
            for st in tl.static_range(b0, b0 + BATCH):
                if st < STEPS:
                    cw = st * BLOCK_W + c0
                    for v in tl.static_range(0, VEC * P, XV):
                        if EVEN:
                            xws = xws + _load_words(xw_ptr + cw * P + v, XV, ASM)
                        else:  # 0 past the row (their weights repeat word 0: finite times non-finite x is not 0)
                            ok = cw < KW  # (KW is a multiple of VEC: a thread's words are all in or all out)
                            pairs = _load_words(xw_ptr + tl.where(ok, cw, 0) * P + v, XV, ASM)
                            for j in tl.static_range(XV):
                                xws = xws + (tl.where(ok, pairs[j], 0),)
            # ``magic`` is fmagic | 0, the 0 computed from every word and scale loaded above: as the
            # unpacking below depends on it, ptxas has to issue all of these loads before it unpacks
            # anything (otherwise it sinks each row's loads to just before that row's arithmetic, and
            # their latencies add up instead of overlapping).
            dep = zero
            for i in tl.static_range(len(ws)):
                dep = dep & ws[i]
            for i in tl.static_range(len(ss)):
                dep = dep & ss[i].to(tl.int32, bitcast=True)
            for i in tl.static_range(len(xws)):
                dep = dep & xws[i]
            magic = dep | fmagic
            for i in tl.static_range(len(ws) // (BLOCK_N * VEC)):
                if BITS == 4:
                    accs = _w4_group_step(accs, ws, ss, xws, i, magic, F16, BLOCK_N, VEC)
                else:
                    accs = _fma_chains_step(accs, ws, xws, i, magic, x_inv_scale, BITS, F16, A8, X_INT8, BLOCK_N, VEC)
        if BITS != 4:  # each row's VEC chains
            sums = ()
            for r in tl.static_range(BLOCK_N):
                row_sum = _chain_value(accs[r * VEC], A8)
                for v in tl.static_range(1, VEC):
                    row_sum += _chain_value(accs[r * VEC + v], A8)
                sums = sums + (row_sum,)
            accs = sums
        y = _joined_rows_sum(accs, BLOCK_N).to(tl.float32)
        rows = r0 + tl.arange(0, BLOCK_N)
        if BITS == 8:
            y = y * tl.load(s_ptr + rows)
        if A8:
            y = y * x_scale
        if HAS_BIAS:
            y += tl.load(b_ptr + rows).to(tl.float32)
        # the rows this program owns: the last one, moved back, leaves its neighbour's rows to it (the
        # conv update of a row must run once)
        own = rows >= tl.program_id(0) * BLOCK_N
        if CONV_W > 0:
            y = _conv_columns(y, rows, own, m, cs_ptr, cw_ptr, cb_ptr, conv_start, conv_c, CONV_W, CONV_BIAS)
        tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=own)

    @triton.jit
    def _add_rmsnorm_kernel(
        res_ptr, out_ptr, w_ptr, normed_ptr, D, eps, HAS_OUT: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        _pdl_start(PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _pdl_wait(PDL)
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OUT:
            r = r + tl.load(out_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            r = r.to(res_ptr.dtype.element_ty)  # the residual stream's own rounding
            tl.store(res_ptr + row * D + cols, r, mask=mask)
        io = normed_ptr.dtype.element_ty
        h = r.to(io).to(tl.float32)  # Block casts the residual to the norm's dtype first
        var = tl.sum(h * h, axis=0) / D
        hn = (h * (1.0 / tl.sqrt(var + eps))).to(io).to(tl.float32)
        tl.store(normed_ptr + row * D + cols, (hn * w).to(io), mask=mask)

    @triton.jit
    def _gated_rmsnorm_kernel(
        x_ptr, z_ptr, w_ptr, y_ptr, stride_xm, stride_zm, stride_ym, eps, GROUP: tl.constexpr, BLOCK: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # program (row, group): the group's GROUP channels of one row, in one tile of BLOCK (GROUP
        # rounded up to a power of two); the arithmetic is GatedRMSNorm's, in float32
        _pdl_start(PDL)
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < GROUP
        cols = tl.program_id(1) * GROUP + offs
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        _pdl_wait(PDL)
        x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * stride_zm + cols, mask=mask, other=0.0).to(tl.float32)
        h = x * (z / (1.0 + tl.exp(-z)))  # silu(z) as torch writes it
        var = tl.sum(h * h, axis=0) / GROUP
        io = y_ptr.dtype.element_ty
        hn = (h * (1.0 / tl.sqrt(var + eps))).to(io).to(tl.float32)  # cast to x's dtype before the weight
        tl.store(y_ptr + row * stride_ym + cols, (hn * w).to(io), mask=mask)  # the product rounded once

    @triton.jit
    def _dt_state_update_kernel(
        state_ptr, x_ptr, dbc_ptr, w_ptr, ws_ptr, bias_ptr, A_ptr, D_ptr, z_ptr, y_ptr,
        DIM, R, N, stride_x, stride_dbc, stride_z,
        W8: tl.constexpr, W4: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
        PDL: tl.constexpr,
    ):
        # program (channel block, batch row): every load first (with PDL the parameters before _pdl_wait),
        # then dt = dt_proj(dbc[:R]) rounded to the io dtype as the separate GEMV rounds it, then the
        # selective state update of the block's rows
        _pdl_start(PDL)
        b = tl.program_id(1)
        rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        rr = tl.arange(0, BLOCK_R)
        rn = tl.arange(0, BLOCK_N)
        md, mr, mn = rd < DIM, rr < R, rn < N
        m2 = md[:, None] & mn[None, :]
        dbc = dbc_ptr + b * stride_dbc
        rj = tl.arange(0, BLOCK_R // 2)
        mj = md[:, None] & (rj < R // 2)[None, :]
        if W4:  # packed nibbles: byte j of a row holds inputs 2j (low) and 2j + 1 (high)
            packed = tl.load(w_ptr + rd[:, None] * (R // 2) + rj[None, :], mask=mj, other=0).to(tl.int32)
            w_scale = tl.load(ws_ptr + rd[:, None] * (R // GROUP) + (2 * rj[None, :]) // GROUP, mask=mj, other=0.0)
        else:
            w = tl.load(w_ptr + rd[:, None] * R + rr[None, :], mask=md[:, None] & mr[None, :], other=0.0).to(tl.float32)
        A = tl.load(A_ptr + rd[:, None] * N + rn[None, :], mask=m2, other=0.0)
        _pdl_wait(PDL)
        if W4:
            u_even = tl.load(dbc + 2 * rj, mask=rj < R // 2, other=0.0).to(tl.float32)
            u_odd = tl.load(dbc + 2 * rj + 1, mask=rj < R // 2, other=0.0).to(tl.float32)
        else:
            u = tl.load(dbc + rr, mask=mr, other=0.0).to(tl.float32)
        s_off = (b * DIM + rd)[:, None] * N + rn[None, :]
        h = tl.load(state_ptr + s_off, mask=m2, other=0.0)
        Bv = tl.load(dbc + R + rn, mask=mn, other=0.0).to(tl.float32)
        Cv = tl.load(dbc + R + N + rn, mask=mn, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * stride_x + rd, mask=md, other=0.0).to(tl.float32)
        io = y_ptr.dtype.element_ty
        if W4:
            lo = (((packed & 0xF) ^ 8) - 8).to(tl.float32)
            hi = ((((packed >> 4) & 0xF) ^ 8) - 8).to(tl.float32)
            acc = tl.sum((lo * u_even[None, :] + hi * u_odd[None, :]) * w_scale, axis=1)
        else:
            acc = tl.sum(w * u[None, :], axis=1)
            if W8:
                acc = acc * tl.load(ws_ptr + rd, mask=md, other=0.0)
        dt = acc.to(io).to(tl.float32)
        if HAS_BIAS:
            dt = dt + tl.load(bias_ptr + rd, mask=md, other=0.0)
        # softplus (threshold 20, as torch); log(1 + t) as t (1 - t / 2) for t < 1e-4, where 1 + t
        # would round away t's low bits
        t = tl.exp(tl.minimum(dt, 20.0))
        sp = tl.where(t < 1e-4, t * (1.0 - 0.5 * t), tl.log(1.0 + t))
        dt = tl.where(dt > 20.0, dt, sp)
        h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bv[None, :]
        tl.store(state_ptr + s_off, h, mask=m2)
        y = tl.sum(h * Cv[None, :], axis=1)
        if HAS_D:
            y = y + tl.load(D_ptr + rd, mask=md, other=0.0) * x
        if HAS_Z:
            z = tl.load(z_ptr + b * stride_z + rd, mask=md, other=0.0).to(tl.float32)
            y = y * (z / (1.0 + tl.exp(-z)))
        tl.store(y_ptr + b * DIM + rd, y.to(io), mask=md)


# ---- launchers ---------------------------------------------------------------------------------------------
def _check_x(name: str, x: torch.Tensor, k: int, allowed: tuple[torch.dtype, ...]) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: x has shape {tuple(x.shape)}, expected [M, {k}]")
    if x.dtype not in allowed:
        raise TypeError(f"{name}: x has dtype {x.dtype}, expected one of {allowed}")
    if x.stride(1) != 1:
        raise ValueError(f"{name}: x must have unit stride along K (got strides {x.stride()})")


def _check_param(name: str, what: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous() or t.device != device:
        raise ValueError(
            f"{name}: {what} is {t.dtype} {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()}), "
            f"expected contiguous {dtype} {shape} on {device}"
        )


def _block_n(n: int, largest: int, smallest: int, programs: int) -> int:
    """Output rows per program: halve from ``largest`` (down to ``smallest``) until the grid over N
    has ``programs`` programs, so that small layers still spread over the SMs."""
    block_n = largest
    while block_n > smallest and (n + block_n - 1) // block_n < programs:
        block_n //= 2
    return block_n


def _output(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
            out: torch.Tensor | None) -> torch.Tensor:
    """Checks bias and out against x [M, K] and N; returns out, or a new [M, N] output."""
    if bias is not None:
        _check_param(name, "bias", bias, (n,), bias.dtype, x.device)
    if out is None:
        return torch.empty(x.shape[0], n, dtype=out_dtype, device=x.device)
    _check_param(name, "out", out, (x.shape[0], n), out_dtype, x.device)
    return out


# The H100's count, which the interpreter (tensors on the CPU) sizes grids for, as the GPU tests do.
_NOMINAL_SMS = 132


def _sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's GPU (132 on an H100, 16 on Jetson AGX Orin): the grid targets
    below are per SM, so that a layer spreads over whatever GPU runs it. (torch caches the properties.)"""
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else _NOMINAL_SMS


def _gemm_setup(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
                out: torch.Tensor | None) -> tuple[torch.Tensor, int, int, tuple[int, int]]:
    """Output, BLOCK_M, BLOCK_N and grid of a GEMM kernel: BLOCK_M covers a decode batch in one tile;
    BLOCK_N shrinks from 64 to 16 until the grid has ~2 programs per SM."""
    y = _output(name, x, n, bias, out_dtype, out)
    m = x.shape[0]
    block_m = 16 if m <= 16 else 64
    block_n = _block_n(n, 64, 16, 2 * _sm_count(x))
    return y, block_m, block_n, ((n + block_n - 1) // block_n, (m + block_m - 1) // block_m)


_A16 = (torch.float16, torch.bfloat16)

# Up to this many rows of x the element-wise GEMV kernels run (one program column per row, the
# weights re-read from L2 per row); above it the tensor-core GEMM kernels do.
_GEMV_MAX_M = 4
_GEMV_TILE = 4096  # weight elements per program per K step (32 float32 accumulators per thread at 4 warps)
_GEMV_PROGRAMS_PER_SM = 4  # enough weight loads in flight to stream HBM (528 programs on an H100)
# The fewest output rows a GEMV program may own. Measured on an H100 (docs/benchmarks.md, decode of
# Mamba-1 1.4B): W8 down to one row (x_proj's 160 outputs then run 160 programs instead of 40) makes
# W8A16 decode 7% faster.
_W8_GEMV_MIN_BLOCK_N = 1


class WordsGemvTuning(NamedTuple):
    """Launch limits of the word-streaming GEMV (``_words_gemv_kernel``) for one weight width; see
    _words_gemv_config. Rows per program halve from max_block_n (1, 2, 4 or 8: _joined_rows_sum) until the
    grid has warps_per_sm warps and programs_per_sm programs per SM: the rows of a program share its
    activation unpacking, so more rows amortize it for large N, while a small layer (x_proj: 160 or 80
    outputs) spreads over more SMs."""

    max_block_w: int  # widest K step, in int32 words per row (up to 4 warps x 4 words)
    max_block_n: int
    warps_per_sm: int
    programs_per_sm: int


# Per weight bits, measured on an H100 (132 SMs). W4: tuned as whole-model decode with programmatic
# dependent launch (tools/decode_knob_sweep.py; docs/benchmarks.md, tenth session), ms/token for Mamba-1
# 1.4B / Mamba-1 130M / Mamba-2 130M at 4 warps per SM: 1.195 / 0.256 / (0.262-0.272 in earlier calls);
# 6: 1.192 / 0.238 / 0.261; 8: 1.08-1.11 / 0.239 / 0.272-0.274; 12: 1.08 / 0.279 / 0.273; at most 4, 2 or 1
# rows per program instead of 8 (at 4 warps per SM): 1.4B 1.20, 1.46, 1.96. W8 and 16 bits: chosen from
# every launch configuration of the Mamba-1 130M and 1.4B projections timed one at a time
# (tools/gemv_config_sweep.py; docs/benchmarks.md, fourteenth session) as the limits with the least total
# time per weight width: over those layers W4's limits took 1.18-1.28x the time of each layer's best
# configuration, these 1.04-1.10x. Jetson Orin (16 SMs) gets the same counts per SM, not tuned there.
_WORDS_GEMV_TUNING: dict[int, WordsGemvTuning] = {
    4: WordsGemvTuning(max_block_w=512, max_block_n=8, warps_per_sm=8, programs_per_sm=0),
    8: WordsGemvTuning(max_block_w=256, max_block_n=8, warps_per_sm=0, programs_per_sm=4),
    16: WordsGemvTuning(max_block_w=512, max_block_n=4, warps_per_sm=0, programs_per_sm=2),
}
# Weight words per thread loaded before the kernel waits for them (4 x 16-byte loads in flight per row at
# 8 rows): successive K steps are batched up to this.
_WORDS_GEMV_MAX_WORDS = 32
# magic float 2**23 (see _words_gemv_kernel)
_WORDS_FMAGIC = 0x4B000000


def _words_gemv_config(n: int, kw: int, bits: int, sms: int = _NOMINAL_SMS) -> tuple[int, int, int, int, int]:
    """(BLOCK_N rows per program, VEC words per thread, BLOCK_W words per K step, BATCH steps per wait,
    num_warps) of the word-streaming GEMV for N outputs and rows of ``kw`` int32 words (a multiple of 4)
    of ``bits``-bit weights, within _WORDS_GEMV_TUNING[bits].

    Rows shorter than a warp's 32 words are one masked step. Otherwise the K step is the largest power of
    two dividing kw (up to max_block_w), so no word is masked; rows with an odd factor over 8 steps use
    masked steps of a power of two instead, padding at most a third. 4 words (one 16-byte load) per thread
    and row where the step has 128 or more, fewer below; 1-4 warps to cover the step. Steps are batched
    until a thread holds _WORDS_GEMV_MAX_WORDS words."""
    tune = _WORDS_GEMV_TUNING[bits]
    if kw < 32:
        block_w = 1 << (kw - 1).bit_length()
    else:
        block_w = min(kw & -kw, tune.max_block_w)
        if kw // block_w > 8:
            block_w = min(1 << (kw - 1).bit_length(), tune.max_block_w)  # next power of two
            while block_w > 32 and 3 * (-(-kw // block_w) * block_w) > 4 * kw:
                block_w //= 2
    vec = min(4, max(block_w // 32, 1))
    warps = max(block_w // (32 * vec), 1)
    programs = max(-(-tune.warps_per_sm * sms // warps), tune.programs_per_sm * sms)
    block_n = _block_n(n, tune.max_block_n, 1, programs)
    while block_n > n:  # the last program is moved back to end at row N, so it must fit
        block_n //= 2
    batch = max(1, min(-(-kw // block_w), _WORDS_GEMV_MAX_WORDS // (block_n * vec)))
    return block_n, vec, block_w, batch, warps


# W8 rows of more than this many weights run the row-streaming kernel. Measured on an H100 (docs/benchmarks.md,
# fourteenth session): at K = 4096 (Mamba-1 1.4B x_proj and out_proj) the row-streaming kernel was 1.07-1.2x
# faster than the word-streaming one at its W8 limits (at out_proj also than its best tiling), at K <= 2048
# as fast or slower. It also bounds W8A8's float32 product chains well within exactness (_words_gemv_kernel).
_WORDS_W8_MAX_K = 2048


def _words_gemv_applies(x: torch.Tensor, k: int, bits: int, a8: bool = False) -> bool:
    """Whether ``_launch_words_gemv`` takes x [M, K] with weights of ``bits`` bits: decode-sized M, 16-bit
    activations (W8A8: or int8), and rows of a multiple of 4 words (every K of W4; K % 16 for W8, K % 8
    for 16 bits), which keeps every row of the weights 16-byte aligned and a thread's words within the
    row; W8 up to _WORDS_W8_MAX_K."""
    dtypes = _A16 + (torch.int8,) if a8 else _A16
    return (x.shape[0] <= _GEMV_MAX_M and x.dtype in dtypes and k % (128 // bits) == 0
            and (bits != 8 or k <= _WORDS_W8_MAX_K))


def _launch_words_gemv(name: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                       bias: torch.Tensor | None, out: torch.Tensor | None, conv: ConvUpdate | None, bits: int,
                       group: int, out_dtype: torch.dtype | None = None, a8: bool = False,
                       x_inv_scale: float = 1.0, x_scale: float = 1.0) -> torch.Tensor:
    """The word-streaming GEMV kernel over weights w [N, K * bits / 8 bytes] (W4: packed nibbles with group
    scales [N, K / group]; W8: int8 with row scales [N], with ``a8`` for W8A8; 16 bits: x's dtype, no
    scale); see _words_gemv_applies. The output is in out_dtype (default: x's dtype)."""
    n, k = w.shape[0], x.shape[1]
    y = _output(name, x, n, bias, out_dtype or x.dtype, out)
    # the kernel reads x and the weights in 16-byte vectors (_load_words): x rows and the weights must
    # start at multiples of 16 bytes (fresh tensors do; views may not)
    if (x.shape[0] > 1 and x.stride(0) * x.element_size() % 16) or x.data_ptr() % 16:
        x = x.contiguous() if not x.is_contiguous() else x.clone()
    if w.data_ptr() % 16:
        w = w.clone()
    bn, vec, bw, batch, warps = _words_gemv_config(n, k * bits // 32, bits, _sm_count(x))
    _words_gemv_kernel[(triton.cdiv(n, bn), x.shape[0])](
        x, w, scale, bias, y, n, x.stride(0), y.stride(0), _WORDS_FMAGIC, x_inv_scale, x_scale,
        *_conv_args(name, conv, y), K=k, BITS=bits, GROUP=group, A8=a8, X_INT8=x.dtype == torch.int8,
        HAS_BIAS=bias is not None, **_conv_flags(conv), BLOCK_N=bn, VEC=vec, BLOCK_W=bw, BATCH=batch, ASM=x.is_cuda,
        num_warps=warps, **_pdl(y))
    return y


def _pdl(t: torch.Tensor) -> dict[str, bool]:
    """The launch options of the decode kernels (PDL, launch_pdl) for tensors on t's device: programmatic
    dependent launch on CUDA GPUs of compute capability 9.0 or later (not Jetson Orin's 8.7), unless
    EDGESSM_PDL=0. Each kernel then starts while the previous one finishes: its programs are scheduled
    and load their weights, and wait (griddepcontrol.wait) only before reading the previous kernel's
    output. Inside a CUDA graph the capture keeps these as programmatic edges."""
    on = (t.is_cuda and torch.cuda.get_device_capability(t.device) >= (9, 0)
          and os.environ.get("EDGESSM_PDL", "1") != "0")
    return dict(PDL=on, launch_pdl=on)


def _check_conv(name: str, conv: ConvUpdate, y: torch.Tensor) -> None:
    """conv against the GEMV's output y [M, N]."""
    m, n = y.shape
    c, width = conv.weight.shape if conv.weight.dim() == 2 else (0, 0)
    if width < 1 or not 0 <= conv.start <= n - c or c < 1:
        raise ValueError(f"{name}: the conv update's weight {tuple(conv.weight.shape)} at column {conv.start} does "
                         f"not lie within the output's {n} columns (expected [C, width] with start + C <= {n})")
    _check_param(name, "conv weight", conv.weight, (c, width), torch.float32, y.device)
    if conv.bias is not None:
        _check_param(name, "conv bias", conv.bias, (c,), torch.float32, y.device)
    _check_param(name, "conv state", conv.state, (m, c, width - 1), y.dtype, y.device)


def _conv_args(name: str, conv: ConvUpdate | None, y: torch.Tensor) -> tuple:
    """The GEMV kernels' conv arguments (state, weight, bias, start, C), checked against y."""
    if conv is None:
        return None, None, None, 0, 0
    _check_conv(name, conv, y)
    return conv.state, conv.weight, conv.bias, conv.start, conv.channels


def _conv_flags(conv: ConvUpdate | None) -> dict[str, int | bool]:
    return dict(CONV_W=0 if conv is None else conv.width, CONV_BIAS=conv is not None and conv.bias is not None)


def _no_conv_beyond_gemv(name: str, conv: ConvUpdate | None, m: int) -> None:
    if conv is not None:
        raise ValueError(f"{name}: the conv update runs in the decode GEMV kernels only (at most {_GEMV_MAX_M} rows "
                         f"of x and float16/bfloat16 activations; see fuses_conv_update), got {m} rows")


def fuses_conv_update(x: torch.Tensor) -> bool:
    """Whether a GEMV of x [M, K] runs a kernel that takes a ``conv=ConvUpdate`` (the decode GEMV kernels:
    Triton present, M <= 4, 16-bit or int8 activations); otherwise run the conv separately."""
    return triton is not None and x.shape[0] <= _GEMV_MAX_M and x.dtype in _A16 + (torch.int8,)


def _gemv_setup(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
                out: torch.Tensor | None, min_block_n: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Output, BLOCK_N and grid (N blocks x rows of x) of a GEMV kernel: BLOCK_N shrinks from 32 to
    ``min_block_n`` until the grid has ~4 programs per SM."""
    block_n = _block_n(n, 32, min_block_n, _GEMV_PROGRAMS_PER_SM * _sm_count(x))
    return _output(name, x, n, bias, out_dtype, out), block_n, ((n + block_n - 1) // block_n, x.shape[0])


def _launch_w8(name: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, out: torch.Tensor | None, x_inv_scale: float, x_scale: float, a8: bool,
               conv: ConvUpdate | None) -> torch.Tensor:
    """Both W8 paths (A16 and A8): a GEMV kernel for decode-sized M (the word-streaming one where it applies,
    else the row-streaming one), the GEMM kernel otherwise."""
    n, k = q.shape
    m = x.shape[0]
    if _words_gemv_applies(x, k, 8, a8):
        return _launch_words_gemv(name, x, q, scale, bias, out, conv, bits=8, group=k, out_dtype=out_dtype, a8=a8,
                                  x_inv_scale=x_inv_scale, x_scale=x_scale)
    flags = dict(A8=a8, X_INT8=x.dtype == torch.int8, HAS_BIAS=bias is not None)
    if m <= _GEMV_MAX_M:
        return _launch_rows_gemv(name, x, q, scale, bias, out_dtype, out, x_inv_scale, x_scale, conv, W16=False,
                                 **flags)
    _no_conv_beyond_gemv(name, conv, m)
    y, bm, bn, grid = _gemm_setup(name, x, n, bias, out_dtype, out)
    _w8_kernel[grid](x, q, scale, bias, y, m, n, k, x.stride(0), y.stride(0), x_inv_scale, x_scale,
             **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=256, num_warps=4, num_stages=3)
    return y


def _launch_rows_gemv(name: str, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                      bias: torch.Tensor | None, out_dtype: torch.dtype, out: torch.Tensor | None,
                      x_inv_scale: float, x_scale: float, conv: ConvUpdate | None, **flags: bool) -> torch.Tensor:
    """The row-streaming GEMV kernel over weights w [N, K] (W8, or 16-bit floats with W16=True)."""
    n, k = w.shape
    y, bn, grid = _gemv_setup(name, x, n, bias, out_dtype, out, _W8_GEMV_MIN_BLOCK_N)
    bk = min(_GEMV_TILE // bn, max(triton.next_power_of_2(k), 64))  # powers of two, as tl.arange needs
    _rows_gemv_kernel[grid](x, w, scale, bias, y, n, k, x.stride(0), y.stride(0), x_inv_scale,
                            x_scale, *_conv_args(name, conv, y), **flags, **_conv_flags(conv), BLOCK_N=bn,
                            BLOCK_K=bk, num_warps=4, **_pdl(y))
    return y


def gemv_float(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None, conv: ConvUpdate | None = None) -> torch.Tensor:
    """y [M, N] = x [M, K] · w [N, K]^T (+ bias): for float16/bfloat16 x and w of the same dtype and M
    <= 4 a decode GEMV kernel (the word-streaming one for K % 8 == 0, else the row-streaming one), else
    F.linear (cuBLAS on a GPU): float32, larger M. ``conv`` (GEMV kernels only): see ConvUpdate."""
    n, k = w.shape
    if x.dtype not in _A16 or x.shape[0] > _GEMV_MAX_M or triton is None:
        _no_conv_beyond_gemv("gemv_float", conv, x.shape[0])
        if bias is None or bias.dtype == x.dtype:
            y = F.linear(x, w, bias)
        else:  # e.g. a float32 bias: added in float32, as the kernel's epilogue does
            y = (F.linear(x, w).float() + bias.float()).to(x.dtype)
        return y if out is None else out.copy_(y)
    _check_x("gemv_float", x, k, _A16)
    _check_param("gemv_float", "w", w, (n, k), x.dtype, x.device)
    if _words_gemv_applies(x, k, 16):
        return _launch_words_gemv("gemv_float", x, w, None, bias, out, conv, bits=16, group=k)
    return _launch_rows_gemv("gemv_float", x, w, None, bias, x.dtype, out, 1.0, 1.0, conv, W16=True, A8=False,
                             X_INT8=False, HAS_BIAS=bias is not None)


def gemv_w8a16(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None, conv: ConvUpdate | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] (float16/bfloat16) · (q int8 [N, K] * scale[N])^T (+ bias); ``conv`` (M <= 4):
    see ConvUpdate."""
    n, k = q.shape
    _check_x("gemv_w8a16", x, k, _A16)
    _check_param("gemv_w8a16", "q", q, (n, k), torch.int8, x.device)
    _check_param("gemv_w8a16", "scale", scale, (n,), torch.float32, x.device)
    _require_triton()
    return _launch_w8("gemv_w8a16", x, q, scale, bias, x.dtype, out, 1.0, 1.0, a8=False, conv=conv)


def gemv_w8a8(
    x: torch.Tensor, x_scale: float, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None, conv: ConvUpdate | None = None,
) -> torch.Tensor:
    """x [M, K] float16/bfloat16 (quantized in the kernel with the per-tensor ``x_scale``) or int8
    (already quantized with it) · (q int8 [N, K] * scale[N])^T, int32 accumulation; ``conv`` (M <= 4):
    see ConvUpdate."""
    n, k = q.shape
    _check_x("gemv_w8a8", x, k, _A16 + (torch.int8,))
    _check_param("gemv_w8a8", "q", q, (n, k), torch.int8, x.device)
    _check_param("gemv_w8a8", "scale", scale, (n,), torch.float32, x.device)
    if not x_scale > 0:
        raise ValueError(f"gemv_w8a8: x_scale must be positive, got {x_scale}")
    out_dtype = out_dtype or (torch.float16 if x.dtype == torch.int8 else x.dtype)
    _require_triton()
    # Both scale factors go in as the float32 values the reference uses.
    xs = float(torch.tensor(x_scale, dtype=torch.float32))
    inv = float(torch.tensor(1.0 / x_scale, dtype=torch.float32))
    return _launch_w8("gemv_w8a8", x, q, scale, bias, out_dtype, out, inv, xs, a8=True, conv=conv)


def gemv_w4a16(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None, conv: ConvUpdate | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] · dequantize_w4(packed [N, K/2], scale [N, K/group])^T (+ bias); ``conv`` (M <=
    4): see ConvUpdate."""
    n, half = packed.shape
    k = 2 * half
    _check_x("gemv_w4a16", x, k, _A16)
    _check_param("gemv_w4a16", "packed", packed, (n, half), torch.int8, x.device)
    if scale.dim() != 2 or scale.shape[0] != n or k % scale.shape[1]:
        raise ValueError(f"gemv_w4a16: scale has shape {tuple(scale.shape)}, expected [{n}, K/group] with K={k}")
    group = k // scale.shape[1]
    _check_param("gemv_w4a16", "scale", scale, (n, k // group), torch.float32, x.device)
    if group < 32 or group & (group - 1):
        raise ValueError(f"gemv_w4a16: group size {group} must be a power of two >= 32")
    _require_triton()
    if _words_gemv_applies(x, k, 4):
        return _launch_words_gemv("gemv_w4a16", x, packed, scale, bias, out, conv, bits=4, group=group)
    _no_conv_beyond_gemv("gemv_w4a16", conv, x.shape[0])
    y, bm, bn, grid = _gemm_setup("gemv_w4a16", x, n, bias, x.dtype, out)
    _w4_kernel[grid](x, packed, scale, bias, y, x.shape[0], n, k, x.stride(0), y.stride(0),
             HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=3)
    return y


def _norm_tile(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of a norm kernel whose program holds n values: n rounded up to a power of two
    (as tl.arange needs), 4 warps up to 2048 values and 8 above."""
    block = triton.next_power_of_2(n)
    return block, 4 if block <= 2048 else 8


def add_rmsnorm(
    residual: torch.Tensor, out: torch.Tensor | None, weight: torch.Tensor, eps: float, normed: torch.Tensor
) -> None:
    """In place: ``residual += out`` (when given), ``normed = RMSNorm(residual.to(weight.dtype)) * weight``.

    residual [M, D] (float32, or the io dtype when the model keeps its residual in it); out, normed,
    weight in the io dtype. Rounding follows edgessm.models.lm.Block exactly (see reference_add_rmsnorm).
    """
    m, d = residual.shape
    for what, t in (("out", out), ("normed", normed)):
        if t is not None and (tuple(t.shape) != (m, d) or not t.is_contiguous()):
            raise ValueError(f"add_rmsnorm: {what} is {tuple(t.shape)}, expected contiguous {(m, d)}")
    if not residual.is_contiguous() or weight.shape != (d,) or normed.dtype != weight.dtype:
        raise ValueError("add_rmsnorm: residual must be contiguous, weight [D] in normed's dtype")
    _require_triton()
    block, warps = _norm_tile(d)
    _add_rmsnorm_kernel[(m,)](residual, out, weight, normed, d, eps, HAS_OUT=out is not None, BLOCK_D=block,
                 num_warps=warps, **_pdl(normed))


_NORM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gated_rmsnorm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Mamba-2's gated RMSNorm (edgessm.models.norm.GatedRMSNorm) in one kernel: ``h = x * silu(z)`` in
    float32, ``h * rsqrt(mean(h^2) + eps)`` over each group of ``group_size`` channels, cast to x's
    dtype, times ``weight``.

    x, z [M, D] float16/bfloat16/float32 of one dtype with unit stride along D and any row stride
    (z may be a column slice of in_proj's output); weight [D] contiguous in x's dtype; D a multiple of
    group_size. Returns ``out`` (or a new contiguous tensor) [M, D] in x's dtype. Rounding follows
    GatedRMSNorm (see reference_gated_rmsnorm): the weight product is rounded to x's dtype once, as
    torch rounds ``weight * g.to(x.dtype)`` with both in x's dtype (a float32 weight would promote it to
    float32, hence weight in x's dtype); exp, the sum of squares and the reciprocal square root may
    differ from torch's by float32 ulps.
    """
    if x.dim() != 2 or x.dtype not in _NORM_DTYPES:
        raise ValueError(f"gated_rmsnorm: x is {x.dtype} {tuple(x.shape)}, expected [M, D] in one of {_NORM_DTYPES}")
    m, d = x.shape
    if group_size < 1 or d % group_size:
        raise ValueError(f"gated_rmsnorm: D={d} is not a multiple of the group size {group_size}")
    for what, t in (("x", x), ("z", z), ("out", out)):
        if t is None:
            continue
        if tuple(t.shape) != (m, d) or t.dtype != x.dtype or t.device != x.device or t.stride(1) != 1:
            raise ValueError(
                f"gated_rmsnorm: {what} is {t.dtype} {tuple(t.shape)} with strides {t.stride()} on {t.device}, "
                f"expected {x.dtype} {(m, d)} with unit stride along D on {x.device}"
            )
    _check_param("gated_rmsnorm", "weight", weight, (d,), x.dtype, x.device)
    _require_triton()
    y = torch.empty(m, d, dtype=x.dtype, device=x.device) if out is None else out
    block, warps = _norm_tile(group_size)
    _gated_rmsnorm_kernel[(m, d // group_size)](x, z, weight, y, x.stride(0), z.stride(0), y.stride(0), eps,
                 GROUP=group_size, BLOCK=block, num_warps=warps, **_pdl(y))
    return y


def dt_proj_state_update(
    state: torch.Tensor, x: torch.Tensor, dbc: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
    A: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba-1's decode step after x_proj in one kernel: ``dt = dt_proj(dbc[:, :R])``, then the selective state
    update with softplus (edgessm.ops.scan.selective_state_update): ``state`` is updated in place, y returned.

    Separately they are two CUDA-graph nodes per layer, each costing more than its work; dt_proj is R
    (dt_rank) multiply-adds per channel, so each program computes its channels' dt itself.
    state [B, DIM, N] float32 contiguous; x [B, DIM] float16/bfloat16/float32 with unit stride along DIM (any
    row stride: x may be a column slice of in_proj's output); dbc [B, R + 2N] (x_proj's
    output: dt input, B, C) in x's dtype, unit stride along its row, R = dt_rank; weight: [DIM, R] in x's
    dtype, or the W8 format (int8 [DIM, R], ``weight_scale`` float32 [DIM]) or the W4 one (packed int8
    [DIM, R / 2], ``weight_scale`` float32 [DIM, R / group_size]; see the module docstring); A [DIM, N],
    D, dt_bias [DIM] float32; z [B, DIM] in x's dtype with unit stride along DIM (any row stride).
    Rounding follows reference_dt_proj_state_update but for float32 ulps (the order of dt's sum, exp, log).
    """
    name = "dt_proj_state_update"
    if state.dim() != 3 or A.dim() != 2:
        raise ValueError(f"{name}: state {tuple(state.shape)} must be [B, DIM, N] and A {tuple(A.shape)} [DIM, N]")
    b, dim, n = state.shape
    if dbc.dim() != 2 or dbc.shape[1] <= 2 * n:
        raise ValueError(f"{name}: dbc is {tuple(dbc.shape)}, expected [B, dt_rank + 2 * {n}]")
    r = dbc.shape[1] - 2 * n
    if x.dtype not in _NORM_DTYPES or tuple(x.shape) != (b, dim) or x.stride(1) != 1:
        raise ValueError(f"{name}: x is {x.dtype} {tuple(x.shape)} with strides {x.stride()}, expected {(b, dim)} "
                         f"with unit stride along DIM in one of {_NORM_DTYPES}")
    if dbc.shape[0] != b or dbc.dtype != x.dtype or dbc.stride(1) != 1:  # (its width gave dt_rank)
        raise ValueError(f"{name}: dbc is {dbc.dtype} {tuple(dbc.shape)} with strides {dbc.stride()}, expected "
                         f"{x.dtype} {(b, r + 2 * n)} (dt_rank + 2 dstate) with unit stride along the row")
    if z is not None and (tuple(z.shape) != (b, dim) or z.dtype != x.dtype or z.stride(1) != 1):
        raise ValueError(f"{name}: z is {z.dtype} {tuple(z.shape)} with strides {z.stride()}, expected {x.dtype} "
                         f"{(b, dim)} with unit stride along DIM")
    quantized = weight.dtype == torch.int8
    if quantized != (weight_scale is not None):
        raise ValueError(f"{name}: an int8 weight needs weight_scale and a float one takes none; the weight is "
                         f"{weight.dtype}, weight_scale {'given' if weight_scale is not None else 'None'}")
    w4 = quantized and weight_scale.dim() == 2
    groups = weight_scale.shape[1] if w4 else 1
    if w4 and (groups < 1 or r % groups or (r // groups) % 2):
        raise ValueError(f"{name}: a W4 weight_scale {tuple(weight_scale.shape)} must split dt_rank {r} into groups "
                         f"of an even size")
    _check_param(name, "weight", weight, (dim, r // 2 if w4 else r), torch.int8 if quantized else x.dtype, x.device)
    if quantized:
        _check_param(name, "weight_scale", weight_scale, (dim, groups) if w4 else (dim,), torch.float32, x.device)
    _check_param(name, "state", state, (b, dim, n), torch.float32, x.device)
    _check_param(name, "A", A, (dim, n), torch.float32, x.device)
    for what, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None:
            _check_param(name, what, t, (dim,), torch.float32, x.device)
    _require_triton()
    y = torch.empty(b, dim, dtype=x.dtype, device=x.device)
    block_n = triton.next_power_of_2(n)
    block_d = max(4, min(32, 512 // block_n))  # a [block_d, block_n] state tile of <= 4 values per thread
    _dt_state_update_kernel[(triton.cdiv(dim, block_d), b)](
        state, x, dbc, weight, weight_scale, dt_bias, A, D, z, y, dim, r, n, x.stride(0), dbc.stride(0),
        0 if z is None else z.stride(0), W8=quantized and not w4, W4=w4, GROUP=r // groups, HAS_BIAS=dt_bias is not None,
        HAS_D=D is not None, HAS_Z=z is not None, BLOCK_D=block_d, BLOCK_R=max(2, triton.next_power_of_2(r)),
        BLOCK_N=block_n, num_warps=4, **_pdl(y))
    return y
