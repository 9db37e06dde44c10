"""Run an op over a segment of a sequence that may continue from a carried state.

This is the one place that decides between the two forms every mixer needs: a single decode
step (one token and a state: the ``*_update`` ops, which is what decode graphs and kernels run)
or a scan over several tokens (from zeros for a prefill, from the state for a continuation).
Mixer code (float and quantized) calls these instead of choosing itself.
"""

from __future__ import annotations

import math

import torch

from edgessm.ops.conv import causal_conv1d, causal_conv1d_update
from edgessm.ops.scan import selective_scan, selective_state_update
from edgessm.ops.ssd import ssd_scan, ssd_state_update


def _is_step(state: torch.Tensor | None, length: int) -> bool:
    return state is not None and length == 1


def causal_conv1d_continue(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, L] → (silu(conv(x)) [B, C, L], conv state [B, C, K-1])."""
    if _is_step(state, x.shape[-1]):
        y, new_state = causal_conv1d_update(x[..., 0], state, weight, bias)
        return y.unsqueeze(-1), new_state
    return causal_conv1d(x, weight, bias, initial_state=state)


def selective_scan_continue(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, D: torch.Tensor,
    z: torch.Tensor, dt_bias: torch.Tensor, state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-1 with softplus dt, token-major: u, dt, z [B, L, D]; Bm, Cm [B, L, N] → (y [B, L, D], state)."""
    if _is_step(state, u.shape[1]):
        y, new_state = selective_state_update(state, u[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, z[:, 0], dt_bias, True)
        return y.unsqueeze(1), new_state
    y, new_state = selective_scan(
        u.transpose(1, 2), dt.transpose(1, 2), A, Bm.transpose(1, 2), Cm.transpose(1, 2), D, z.transpose(1, 2),
        dt_bias, delta_softplus=True, initial_state=state,
    )
    return y.transpose(1, 2), new_state


def ssd_continue(
    x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor, Cm: torch.Tensor, D: torch.Tensor,
    dt_bias: torch.Tensor, state: torch.Tensor | None, dt_limit: tuple[float, float] = (0.0, math.inf),
    chunk_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba-2 with softplus dt: x [B, L, H, P]; dt [B, L, H]; Bm, Cm [B, L, G, N] → (y [B, L, H, P], state)."""
    if _is_step(state, x.shape[1]):
        y, new_state = ssd_state_update(state, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, dt_bias, True, dt_limit)
        return y.unsqueeze(1), new_state
    return ssd_scan(x, dt, A, Bm, Cm, D, dt_bias, True, dt_limit, initial_state=state, chunk_size=chunk_size)
