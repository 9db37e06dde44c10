"""Mamba-1 selective scan: sequential reference, chunked parallel form, and one-step update.

Layout follows mamba_ssm (channel-first): u, delta, z: [B, D, L]; A: [D, N]; B, C: [B, N, L].
Semantics: docs/onnx_ops.md (SelectiveScan / SelectiveStateUpdate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgessm.ops._dtype import compute_dtype


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log1p(exp(x)), returning x itself above 20 (the threshold mamba_ssm and torch use)."""
    return F.softplus(x, beta=1.0, threshold=20.0)


def _discretize_dt(delta: torch.Tensor, delta_bias: torch.Tensor | None, use_softplus: bool, dt: torch.dtype) -> torch.Tensor:
    delta = delta.to(dt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dt).unsqueeze(-1) if delta.dim() == 3 else delta + delta_bias.to(dt)
    return softplus(delta) if use_softplus else delta


def _finish(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, channel_dim_view: tuple[int, ...]
) -> torch.Tensor:
    if D is not None:
        y = y + u.to(y.dtype) * D.to(y.dtype).view(channel_dim_view)
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y [B, D, L] in u's dtype, final_state [B, D, N] float32/64).

    ``chunk_size=None`` runs the sequential recurrence; an int computes the same result
    chunk-parallel (the form a parallel kernel or a loop-free graph lowering uses).
    """
    cd = compute_dtype(u)
    dt = _discretize_dt(delta, delta_bias, delta_softplus, cd)  # [B, D, L]
    uf = u.to(cd)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1], dtype=cd) if initial_state is None else initial_state.to(cd)
    args = (dt, A.to(cd), B.to(cd), C.to(cd), uf, h)
    y, h = _sequential(*args) if chunk_size is None else _chunked(*args, chunk_size)
    return _finish(y, uf, D, z, (1, -1, 1)).to(u.dtype), h


def _sequential(dt: torch.Tensor, A: torch.Tensor, Bf: torch.Tensor, Cf: torch.Tensor, uf: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = []
    for t in range(uf.shape[-1]):
        dA = torch.exp(dt[:, :, t, None] * A)  # [B, D, N]
        h = dA * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bf[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cf[:, :, t]))
    return (torch.stack(ys, dim=-1) if ys else uf.new_zeros(uf.shape)), h


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """segsum[..., t, s] = sum_{s < r <= t} a[..., r] for s <= t, -inf above the diagonal.

    Built from sums of the masked values themselves, not a difference of two long cumulative
    sums, so it stays accurate when the cumulative decay is large.
    """
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)  # [..., r, s] = a[r]
    strict = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    seg = torch.cumsum(rep.masked_fill(~strict, 0), dim=-2)
    return seg.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device)), float("-inf"))


def _chunked(dt: torch.Tensor, A: torch.Tensor, Bf: torch.Tensor, Cf: torch.Tensor, uf: torch.Tensor, h: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Within a chunk every output is a masked decay-weighted sum over earlier positions;
    chunks are chained through their end states."""
    ys = []
    for start in range(0, uf.shape[-1], chunk_size):
        sl = slice(start, start + chunk_size)
        dtc, uc, Bc, Cc = dt[:, :, sl], uf[:, :, sl], Bf[:, :, sl], Cf[:, :, sl]
        a = (dtc[..., None] * A[None, :, None, :]).permute(0, 1, 3, 2)  # [B, D, N, T] log-decay per step
        decay = torch.exp(_segsum(a))  # [B, D, N, t, s]
        x = (dtc * uc)[:, :, None, :] * Bc[:, None, :, :]  # [B, D, N, s]: dt*u*B
        intra = torch.einsum("bdnts,bdns,bnt->bdt", decay, x, Cc)
        from_start = torch.exp(torch.cumsum(a, dim=-1))  # [B, D, N, t] decay since the chunk start
        ys.append(intra + torch.einsum("bdnt,bdn,bnt->bdt", from_start, h, Cc))
        h = from_start[..., -1] * h + torch.einsum("bdns,bdns->bdn", decay[..., -1, :], x)
    return (torch.cat(ys, dim=-1) if ys else uf.new_zeros(uf.shape)), h


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. state: [B, D, N]; x, dt, z: [B, D]; B, C: [B, N]. Returns (y [B, D], new_state)."""
    dt_ = compute_dtype(x)
    step = _discretize_dt(dt, dt_bias, dt_softplus, dt_)
    xf = x.to(dt_)
    new_state = torch.exp(step[:, :, None] * A.to(dt_)) * state.to(dt_) + (step * xf)[:, :, None] * B.to(dt_)[:, None, :]
    y = torch.einsum("bdn,bn->bd", new_state, C.to(dt_))
    return _finish(y, xf, D, z, (1, -1)).to(x.dtype), new_state
