"""Triton kernels for the decode step: quantized GEMV / skinny GEMM, and the fused residual-add + RMSNorm.

Quantized weight formats (all symmetric, no zero point; ``W`` is the float weight [N, K], y = x W^T):

- **W8** (``quantize_w8``): ``q`` int8 [N, K], ``scale`` float32 [N] per output channel;
  ``W[n, k] ≈ q[n, k] * scale[n]``, ``scale = absmax(W[n]) / 127``.
- **W4** (``quantize_w4``): signed int4 in [-8, 7] per group of ``group_size`` (default 128)
  consecutive inputs; ``scale`` float32 [N, K / group_size], ``scale = absmax(group) / 7``.
  Two values share a byte of ``packed`` int8 [N, K / 2]: the **low nibble holds the even input
  index** ``k = 2j`` and the high nibble ``k = 2j + 1``, each as 4-bit two's complement.
- **A8** (``gemv_w8a8``): activations quantized per tensor, ``xq = clamp(round_half_even(x * (1 /
  x_scale)), -128, 127)`` (in float32, or passed in already as int8), int8 x int8 products summed in
  int32, then ``y = acc * x_scale * scale[n]``.

Decode (M = batch <= 4) runs the GEMV kernels: each program owns a few output rows of one row of x
and streams them over K in wide tiles, multiplying element-wise and reducing once at the end; the
step is bound by reading the weights once. Larger M runs the GEMM kernels, which tile M (tokens) by
16 or 64 and N (outputs) by 16..64 on tensor cores and stream K. Every kernel has a
float64 reference (``reference_*``) used by the tests. Activations of the A16 kernels are float16
or bfloat16; outputs are in the activation dtype (float16 for W8A8 with int8 input).
"""

from __future__ import annotations

import torch

from edgessm.errors import BackendUnavailable

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


# ---- float64 references -------------------------------------------------------------------------------
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


# ---- kernels ---------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _a8_input(x, inv_scale, X_INT8: tl.constexpr):
        """The int8 activations of the W8A8 kernels: x itself when the caller quantized it already."""
        if X_INT8:
            xq = x
        else:
            v = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -128.0), 127.0)
            # 1.5 * 2**23: (v + M) - M rounds |v| < 2**22 half-to-even in float32 (as torch.round does)
            xq = ((v + 12582912.0) - 12582912.0).to(tl.int8)
        return xq

    @triton.jit
    def _epilogue(acc, rn, mask_n, y_ptrs, mask_y, ws_ptr, b_ptr, x_scale,
                  CHANNEL_SCALE: tl.constexpr, A8: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Every kernel's output: acc [BLOCK_N] (GEMV) or [BLOCK_M, BLOCK_N] (GEMM) over the output
        channels rn, times the per-channel weight scale (W8; W4 applies its group scales in the K loop)
        and the activation scale (A8), plus the bias, stored in y's dtype. Rank-1 operands broadcast
        along the last axis, so one body serves both shapes."""
        y = acc.to(tl.float32)
        if CHANNEL_SCALE:
            y = y * tl.load(ws_ptr + rn, mask=mask_n, other=0.0)
        if A8:
            y = y * x_scale
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)
        tl.store(y_ptrs, y.to(y_ptrs.dtype.element_ty), mask=mask_y)

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
        _epilogue(acc, rn, mask_n, y_ptr + rm[:, None] * stride_ym + rn[None, :], mask_m[:, None] & mask_n[None, :],
                  ws_ptr, b_ptr, x_scale, CHANNEL_SCALE=True, A8=A8, HAS_BIAS=HAS_BIAS)

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
        _epilogue(acc, rn, mask_n, y_ptr + rm[:, None] * stride_ym + rn[None, :], mask_m[:, None] & mask_n[None, :],
                  None, b_ptr, 1.0, CHANNEL_SCALE=False, A8=False, HAS_BIAS=HAS_BIAS)

    @triton.jit
    def _int_to_f32(u):
        # u int32 in [0, 2**23): float32 with bit pattern 0x4B000000 | u is exactly 2**23 + u; the caller
        # subtracts 2**23 (plus the offset that undoes the sign flip). This replaces an I2F conversion
        # per weight (a low-throughput instruction that limits batch-1 decode) with integer ops.
        return (u | 0x4B000000).to(tl.float32, bitcast=True)

    @triton.jit
    def _w8_gemv_kernel(
        x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, N, K, stride_xm, stride_ym, x_inv_scale, x_scale,
        A8: tl.constexpr, X_INT8: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Decode (few rows of x): program (i, m) owns BLOCK_N output rows of activation row m and
        # streams them over K in wide tiles; products accumulate element-wise in a 2D register tile and
        # are reduced across K once at the end (no tensor-core tile padded to 16 rows of x).
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        mask_n = rn < N
        if A8:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.int32)  # exact int8 x int8 sums
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < K
            x = tl.load(x_ptr + m * stride_xm + rk, mask=mask_k, other=0)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
            if A8:
                acc += w.to(tl.int32) * _a8_input(x, x_inv_scale, X_INT8).to(tl.int32)[None, :]
            else:
                # (q ^ 0x80) & 0xFF = q + 128 in [0, 255]
                wf = _int_to_f32((w.to(tl.int32) ^ 0x80) & 0xFF) - 8388736.0  # 2**23 + 128
                acc += wf * x.to(tl.float32)[None, :]
        _epilogue(tl.sum(acc, axis=1), rn, mask_n, y_ptr + m * stride_ym + rn, mask_n, ws_ptr, b_ptr, x_scale,
                  CHANNEL_SCALE=True, A8=A8, HAS_BIAS=HAS_BIAS)

    @triton.jit
    def _w4_gemv_kernel(
        x_ptr, p_ptr, s_ptr, b_ptr, y_ptr, N, K, n_groups, stride_xm, stride_ym,
        HAS_BIAS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
    ):
        # Decode (few rows of x): program (i, m) owns BLOCK_N output rows and takes GROUPS whole
        # quantization groups per K step as a [BLOCK_N, GROUPS, GROUP/2] tile of packed bytes
        # (contiguous per row), so the group scale is one [BLOCK_N, GROUPS] load broadcast over the
        # group. Even inputs pair with low nibbles, odd inputs with high nibbles.
        HALF: tl.constexpr = GROUP // 2
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        mask_n = rn < N
        rh = tl.arange(0, HALF)
        acc = tl.zeros([BLOCK_N, GROUPS, HALF], dtype=tl.float32)
        for g0 in range(0, n_groups, GROUPS):
            rg = g0 + tl.arange(0, GROUPS)
            mask_g = rg < n_groups
            xoff = m * stride_xm + rg[:, None] * GROUP + 2 * rh[None, :]
            x_even = tl.load(x_ptr + xoff, mask=mask_g[:, None], other=0).to(tl.float32)
            x_odd = tl.load(x_ptr + xoff + 1, mask=mask_g[:, None], other=0).to(tl.float32)
            mask_ng = mask_n[:, None] & mask_g[None, :]
            poff = rn[:, None, None] * (K // 2) + rg[None, :, None] * HALF + rh[None, None, :]
            p = tl.load(p_ptr + poff, mask=mask_ng[:, :, None], other=0).to(tl.int32)
            s = tl.load(s_ptr + rn[:, None] * n_groups + rg[None, :], mask=mask_ng, other=0.0)
            u = p ^ 0x88  # each nibble + 8 (two's complement -> offset binary)
            lo = _int_to_f32(u & 0xF) - 8388616.0  # 2**23 + 8
            hi = _int_to_f32((u >> 4) & 0xF) - 8388616.0
            acc += (lo * x_even[None, :, :] + hi * x_odd[None, :, :]) * s[:, :, None]
        _epilogue(tl.sum(tl.sum(acc, axis=2), axis=1), rn, mask_n, y_ptr + m * stride_ym + rn, mask_n, None, b_ptr,
                  1.0, CHANNEL_SCALE=False, A8=False, HAS_BIAS=HAS_BIAS)

    @triton.jit
    def _add_rmsnorm_kernel(
        res_ptr, out_ptr, w_ptr, normed_ptr, D, eps, HAS_OUT: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        r = tl.load(res_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_OUT:
            r = r + tl.load(out_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
            r = r.to(res_ptr.dtype.element_ty)  # the residual stream's own rounding
            tl.store(res_ptr + row * D + cols, r, mask=mask)
        io = normed_ptr.dtype.element_ty
        h = r.to(io).to(tl.float32)  # Block casts the residual to the norm's dtype first
        var = tl.sum(h * h, axis=0) / D
        hn = (h * (1.0 / tl.sqrt(var + eps))).to(io).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(normed_ptr + row * D + cols, (hn * w).to(io), mask=mask)


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


def _gemm_setup(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
                out: torch.Tensor | None) -> tuple[torch.Tensor, int, int, tuple[int, int]]:
    """Output, BLOCK_M, BLOCK_N and grid of a GEMM kernel: BLOCK_M covers a decode batch in one tile;
    BLOCK_N shrinks from 64 to 16 until the grid has ~2 programs per SM."""
    y = _output(name, x, n, bias, out_dtype, out)
    m = x.shape[0]
    block_m = 16 if m <= 16 else 64
    block_n = _block_n(n, 64, 16, 264)
    return y, block_m, block_n, ((n + block_n - 1) // block_n, (m + block_m - 1) // block_m)


_A16 = (torch.float16, torch.bfloat16)

# Up to this many rows of x the element-wise GEMV kernels run (one program column per row, the
# weights re-read from L2 per row); above it the tensor-core GEMM kernels do.
_GEMV_MAX_M = 4
_GEMV_TILE = 4096  # weight elements per program per K step (32 float32 accumulators per thread at 4 warps)
_GEMV_PROGRAMS = 528  # ~4 programs per SM on 132 SMs: enough weight loads in flight to stream HBM
# The fewest output rows a GEMV program may own. Measured on an H100 (docs/benchmarks.md, decode of
# Mamba-1 1.4B): W8 down to one row (x_proj's 160 outputs then run 160 programs instead of 40) makes
# W8A16 decode 7% faster; W4 down to one row makes W4A16 18% slower (its programs are bound by
# nibble unpacking and group scales, which more programs do not shorten), so W4 stays at 4.
_W8_GEMV_MIN_BLOCK_N = 1
_W4_GEMV_MIN_BLOCK_N = 4


def _gemv_setup(name: str, x: torch.Tensor, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
                out: torch.Tensor | None, min_block_n: int) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """Output, BLOCK_N and grid (N blocks x rows of x) of a GEMV kernel: BLOCK_N shrinks from 32 to
    ``min_block_n`` until the grid has ~4 programs per SM."""
    block_n = _block_n(n, 32, min_block_n, _GEMV_PROGRAMS)
    return _output(name, x, n, bias, out_dtype, out), block_n, ((n + block_n - 1) // block_n, x.shape[0])


def _launch_w8(name: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               out_dtype: torch.dtype, out: torch.Tensor | None, x_inv_scale: float, x_scale: float, a8: bool) -> torch.Tensor:
    """Both W8 paths (A16 and A8): the GEMV kernel for decode-sized M, the GEMM kernel otherwise."""
    n, k = q.shape
    m = x.shape[0]
    flags = dict(A8=a8, X_INT8=x.dtype == torch.int8, HAS_BIAS=bias is not None)
    if m <= _GEMV_MAX_M:
        y, bn, grid = _gemv_setup(name, x, n, bias, out_dtype, out, _W8_GEMV_MIN_BLOCK_N)
        bk = min(_GEMV_TILE // bn, max(triton.next_power_of_2(k), 64))  # powers of two, as tl.arange needs
        _w8_gemv_kernel[grid](x, q, scale, bias, y, n, k, x.stride(0), y.stride(0), x_inv_scale,
                 x_scale, **flags, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
        return y
    y, bm, bn, grid = _gemm_setup(name, x, n, bias, out_dtype, out)
    _w8_kernel[grid](x, q, scale, bias, y, m, n, k, x.stride(0), y.stride(0), x_inv_scale, x_scale,
             **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=256, num_warps=4, num_stages=3)
    return y


def gemv_w8a16(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y [M, N] = x [M, K] (float16/bfloat16) · (q int8 [N, K] * scale[N])^T (+ bias)."""
    n, k = q.shape
    _check_x("gemv_w8a16", x, k, _A16)
    _check_param("gemv_w8a16", "q", q, (n, k), torch.int8, x.device)
    _check_param("gemv_w8a16", "scale", scale, (n,), torch.float32, x.device)
    _require_triton()
    return _launch_w8("gemv_w8a16", x, q, scale, bias, x.dtype, out, 1.0, 1.0, a8=False)


def gemv_w8a8(
    x: torch.Tensor, x_scale: float, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] float16/bfloat16 (quantized in the kernel with the per-tensor ``x_scale``) or int8
    (already quantized with it) · (q int8 [N, K] * scale[N])^T, int32 accumulation."""
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
    return _launch_w8("gemv_w8a8", x, q, scale, bias, out_dtype, out, inv, xs, a8=True)


def gemv_w4a16(
    x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [M, N] = x [M, K] · dequantize_w4(packed [N, K/2], scale [N, K/group])^T (+ bias)."""
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
    if x.shape[0] <= _GEMV_MAX_M:
        y, bn, grid = _gemv_setup("gemv_w4a16", x, n, bias, x.dtype, out, _W4_GEMV_MIN_BLOCK_N)
        groups = min(max(_GEMV_TILE // (bn * group), 1), triton.next_power_of_2(k // group))
        _w4_gemv_kernel[grid](x, packed, scale, bias, y, n, k, k // group, x.stride(0),
                 y.stride(0), HAS_BIAS=bias is not None, GROUP=group, BLOCK_N=bn, GROUPS=groups, num_warps=4)
        return y
    y, bm, bn, grid = _gemm_setup("gemv_w4a16", x, n, bias, x.dtype, out)
    _w4_kernel[grid](x, packed, scale, bias, y, x.shape[0], n, k, x.stride(0), y.stride(0),
             HAS_BIAS=bias is not None, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=3)
    return y


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
    block = triton.next_power_of_2(d)
    _add_rmsnorm_kernel[(m,)](residual, out, weight, normed, d, eps, HAS_OUT=out is not None, BLOCK_D=block,
                 num_warps=4 if block <= 2048 else 8)
