"""Weight quantization: round-to-nearest and GPTQ (Frantar et al., 2022), symmetric, per channel or per group.

Scales have shape [out, n_groups]; column ``i`` belongs to group ``i // group`` where ``group`` is
the effective group size (the whole row for per-channel quantization, and also when the row is
shorter than the requested group size). The last group of a row may be shorter.
"""

from __future__ import annotations

import math

import torch

from edgessm.errors import NumericsError
from edgessm.quant.primitives import qmax, quantize, scale_from_absmax


def effective_group(in_features: int, group_size: int) -> int:
    """Columns per scale: ``group_size``, or the whole row when 0 or when the row is shorter."""
    return in_features if group_size <= 0 or group_size >= in_features else group_size


def n_groups(in_features: int, group_size: int) -> int:
    return math.ceil(in_features / effective_group(in_features, group_size))


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int) -> torch.Tensor:
    """[out, n_groups] → [out, in] (each column's scale)."""
    g = effective_group(in_features, group_size)
    return scales.repeat_interleave(g, dim=1)[:, :in_features]


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    return q.to(torch.float32) * expand_scales(scales, q.shape[1], group_size)


def _group_absmax(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, cols = w.shape
    g = effective_group(cols, group_size)
    pad = (-cols) % g
    wp = torch.nn.functional.pad(w.abs(), (0, pad))
    return wp.reshape(out, -1, g).amax(-1)


def quantize_rtn(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest: (codes int8 [out, in], scales float32 [out, n_groups])."""
    scales = scale_from_absmax(_group_absmax(w.float(), group_size), bits)
    return quantize(w, expand_scales(scales, w.shape[1], group_size), bits), scales


def quantize_gptq(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, damp: float = 0.01, block: int = 128
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ: quantize columns left to right, spreading each column's error over the columns not yet
    quantized through the inverse Hessian's Cholesky factor (lazy block updates).

    Group scales are taken when the group's first column is reached, from the weights as updated
    so far; the block width is a multiple of the group so a group never straddles two blocks.
    """
    out, cols = w.shape
    g = effective_group(cols, group_size)
    if hessian.shape != (cols, cols):
        raise ValueError(f"GPTQ: Hessian shape {tuple(hessian.shape)} does not match weight columns {cols}")
    W = w.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=torch.float64, device=H.device)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as e:
        raise NumericsError(f"GPTQ: Hessian is not positive definite even after damping ({e})") from e
    per_row = g == cols
    scales = scale_from_absmax(W.abs().amax(1, keepdim=True), bits).double() if per_row else None
    group_scales = torch.empty(out, n_groups(cols, group_size), dtype=torch.float64, device=W.device)
    Q = torch.empty(out, cols, dtype=torch.int8, device=W.device)
    lo, hi = -qmax(bits) - 1, qmax(bits)
    block = block if per_row else g * max(1, block // g)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        err = torch.zeros_like(W1)
        Hb = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if not per_row and col % g == 0:
                end = min(i + g, i2 - i1)
                scales = scale_from_absmax(W1[:, i:end].abs().amax(1, keepdim=True), bits).double()
                group_scales[:, col // g] = scales[:, 0]
            wcol = W1[:, i : i + 1]
            q = torch.round(wcol / scales).clamp_(lo, hi)
            Q[:, col] = q[:, 0].to(torch.int8)
            e = (wcol - q * scales) / Hb[i, i]
            W1[:, i:] -= e @ Hb[i : i + 1, i:]
            err[:, i : i + 1] = e
        W[:, i2:] -= err @ Hinv[i1:i2, i2:]
    if per_row:
        group_scales[:, 0] = scales[:, 0]
    return Q, group_scales.to(torch.float32)
