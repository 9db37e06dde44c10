"""Mamba-2 SSD (scalar-A-per-head selective scan): sequential reference, chunked form, one-step update.

Layout follows mamba_ssm's chunk scan (token-major): x: [B, L, H, P]; dt: [B, L, H]; A, D, dt_bias:
[H]; B, C: [B, L, G, N]; states: [B, H, P, N]. Semantics: docs/onnx_ops.md (SSDScan / SSDStateUpdate).
"""

from __future__ import annotations

import math

import torch

from edgessm.ops._dtype import compute_dtype
from edgessm.ops.scan import _segsum, softplus


def discretize_ssd_dt(
    dt: torch.Tensor,
    dt_bias: torch.Tensor | None,
    dt_softplus: bool,
    dt_limit: tuple[float, float],
    dtype: torch.dtype,
) -> torch.Tensor:
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or math.isfinite(hi):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def _heads(t: torch.Tensor, n_heads: int, group_dim: int) -> torch.Tensor:
    """Expand the group axis of B/C to one entry per head (head h uses group h // (H/G))."""
    return t.repeat_interleave(n_heads // t.shape[group_dim], dim=group_dim)


def _skip(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None) -> torch.Tensor:
    return y if D is None else y + x * D.to(y.dtype)[:, None]


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    initial_state: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y [B, L, H, P] in x's dtype, final_state [B, H, P, N]).

    ``chunk_size=None`` runs the sequential recurrence; an int runs the SSD chunked algorithm
    (Mamba-2 paper, section 6: a quadratic attention-like form inside each chunk, a linear
    recurrence over chunk states between them), which gives the same result.
    """
    cd = compute_dtype(x)
    batch, _, heads, hdim = x.shape
    step = discretize_ssd_dt(dt, dt_bias, dt_softplus, dt_limit, cd)  # [B, L, H]
    xf = x.to(cd)
    Bh, Ch = _heads(B.to(cd), heads, 2), _heads(C.to(cd), heads, 2)  # [B, L, H, N]
    s = x.new_zeros(batch, heads, hdim, B.shape[-1], dtype=cd) if initial_state is None else initial_state.to(cd)
    args = (step, A.to(cd), Bh, Ch, xf, s)
    y, s = _ssd_sequential(*args) if chunk_size is None else _ssd_chunked(*args, chunk_size)
    return _skip(y, xf, D).to(x.dtype), s


def _ssd_sequential(step: torch.Tensor, A: torch.Tensor, Bh: torch.Tensor, Ch: torch.Tensor, xf: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = []
    for t in range(xf.shape[1]):
        decay = torch.exp(step[:, t] * A)[:, :, None, None]
        s = decay * s + (step[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", s, Ch[:, t]))
    return (torch.stack(ys, dim=1) if ys else xf.new_zeros(xf.shape)), s


def _ssd_chunked(step: torch.Tensor, A: torch.Tensor, Bh: torch.Tensor, Ch: torch.Tensor, xf: torch.Tensor, s: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    a_all = step * A  # [B, L, H] log-decay per step
    ys = []
    for start in range(0, xf.shape[1], chunk_size):
        sl = slice(start, start + chunk_size)
        a = a_all[:, sl].transpose(1, 2)  # [B, H, T]
        xdt = xf[:, sl] * step[:, sl, :, None]  # [B, T, H, P]
        Bc, Cc = Bh[:, sl], Ch[:, sl]  # [B, T, H, N]
        decay = torch.exp(_segsum(a))  # [B, H, t, s]
        scores = torch.einsum("bthn,bshn->bhts", Cc, Bc) * decay
        y = torch.einsum("bhts,bshp->bthp", scores, xdt)
        from_start = torch.exp(torch.cumsum(a, dim=-1))  # [B, H, t]
        y = y + torch.einsum("bthn,bhpn,bht->bthp", Cc, s, from_start)
        s = from_start[..., -1, None, None] * s + torch.einsum("bshn,bhs,bshp->bhpn", Bc, decay[:, :, -1, :], xdt)
        ys.append(y)
    return (torch.cat(ys, dim=1) if ys else xf.new_zeros(xf.shape)), s


def ssd_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step. state: [B, H, P, N]; x: [B, H, P]; dt: [B, H]; B, C: [B, G, N]."""
    cd = compute_dtype(x)
    heads = x.shape[1]
    step = discretize_ssd_dt(dt, dt_bias, dt_softplus, dt_limit, cd)  # [B, H]
    xf = x.to(cd)
    Bh, Ch = _heads(B.to(cd), heads, 1), _heads(C.to(cd), heads, 1)  # [B, H, N]
    new_state = torch.exp(step * A.to(cd))[:, :, None, None] * state.to(cd) + (step[:, :, None] * xf)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    return _skip(y, xf, D).to(x.dtype), new_state
