"""Mamba-1 mixer (selective SSM block), parameter names as in HF MambaMixer / mamba_ssm Mamba."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgessm.config import MambaConfig
from edgessm.models.sites import ActivationSites, LayerState
from edgessm.ops.stateful import causal_conv1d_continue, selective_scan_continue


class Mamba1Mixer(ActivationSites):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        d, di, n, r = config.d_model, config.d_inner, config.d_state, config.dt_rank
        self.config = config
        self.in_proj = nn.Linear(d, 2 * di, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(di, di, config.d_conv, groups=di, padding=config.d_conv - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D = nn.Parameter(torch.ones(di))
        self.out_proj = nn.Linear(di, d, bias=config.proj_bias)

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        """hidden: [B, L, d_model]. With ``state`` the sequence continues from it (decode when L == 1)."""
        cfg = self.config
        xz = self.in_proj(hidden)  # [B, L, 2*d_inner]
        x, z = xz.chunk(2, dim=-1)
        x = self.site("conv_in", x).transpose(1, 2)  # [B, d_inner, L]
        xc, conv_state = causal_conv1d_continue(
            x, self.conv1d.weight.squeeze(1), self.conv1d.bias, None if state is None else state.conv
        )
        xc = self.site("ssm_x", xc.transpose(1, 2))  # [B, L, d_inner]
        dt, Bm, Cm = torch.split(self.x_proj(xc), [cfg.dt_rank, cfg.d_state, cfg.d_state], dim=-1)
        dt = self.site("ssm_dt", F.linear(dt, self.dt_proj.weight))  # bias is added inside the scan
        y, ssm_state = selective_scan_continue(
            xc, dt, -torch.exp(self.A_log.float()), self.site("ssm_B", Bm), self.site("ssm_C", Cm), self.D,
            self.site("ssm_z", z), self.dt_proj.bias, None if state is None else state.ssm,
        )
        out = self.out_proj(self.site("out_in", y.to(hidden.dtype)))
        return out, LayerState(conv_state, ssm_state)
