"""Causal depthwise conv1d (channel-first, as in mamba_ssm) and its one-token update.

The carried state is the last ``width - 1`` inputs: exactly what the next token's window needs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgessm.ops._dtype import compute_dtype


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, L]; weight: [C, K]; bias: [C]; initial_state: [B, C, K-1] (zeros if None).

    Returns (y [B, C, L] in x's dtype, final_state [B, C, K-1] in x's dtype).
    """
    batch, channels, _ = x.shape
    width = weight.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, width - 1)
    window = torch.cat([initial_state.to(x.dtype), x], dim=-1)
    dt = compute_dtype(x)
    y = F.conv1d(window.to(dt), weight.to(dt).unsqueeze(1), None if bias is None else bias.to(dt), groups=channels)
    if silu:
        y = F.silu(y)
    return y.to(x.dtype), window[:, :, window.shape[-1] - (width - 1) :]


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    silu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token. x: [B, C]; conv_state: [B, C, K-1]. Returns (y [B, C], new_conv_state)."""
    y, new_state = causal_conv1d(x.unsqueeze(-1), weight, bias, silu, initial_state=conv_state)
    return y.squeeze(-1), new_state
