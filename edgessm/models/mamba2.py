"""Mamba-2 mixer (SSD block), parameter names as in HF Mamba2Mixer / mamba_ssm Mamba2."""

from __future__ import annotations

import torch
from torch import nn

from edgessm.config import MambaConfig
from edgessm.models.norm import GatedRMSNorm
from edgessm.models.sites import ActivationSites, LayerState
from edgessm.ops.stateful import causal_conv1d_continue, ssd_continue


class Mamba2Mixer(ActivationSites):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        d, di, h = config.d_model, config.d_inner, config.n_heads
        self.config = config
        self.in_proj = nn.Linear(d, di + config.conv_dim + h, bias=config.proj_bias)
        self.conv1d = nn.Conv1d(
            config.conv_dim, config.conv_dim, config.d_conv, groups=config.conv_dim, padding=config.d_conv - 1,
            bias=config.conv_bias,
        )
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(di, group_size=di // config.n_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(di, d, bias=config.proj_bias)

    def forward(self, hidden: torch.Tensor, state: LayerState | None = None) -> tuple[torch.Tensor, LayerState]:
        cfg = self.config
        batch, length, _ = hidden.shape
        z, xBC, dt = torch.split(self.in_proj(hidden), [cfg.d_inner, cfg.conv_dim, cfg.n_heads], dim=-1)
        xBC = self.site("conv_in", xBC).transpose(1, 2)  # [B, conv_dim, L]
        xc, conv_state = causal_conv1d_continue(
            xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, None if state is None else state.conv
        )
        gn = cfg.n_groups * cfg.d_state
        x, Bm, Cm = torch.split(xc.transpose(1, 2), [cfg.d_inner, gn, gn], dim=-1)
        y, ssm_state = ssd_continue(
            self.site("ssm_x", x).reshape(batch, length, cfg.n_heads, cfg.head_dim), self.site("ssm_dt", dt),
            -torch.exp(self.A_log.float()),
            self.site("ssm_B", Bm).reshape(batch, length, cfg.n_groups, cfg.d_state),
            self.site("ssm_C", Cm).reshape(batch, length, cfg.n_groups, cfg.d_state),
            self.D, self.dt_bias, None if state is None else state.ssm, cfg.dt_limit, cfg.chunk_size,
        )
        y = self.norm(y.reshape(batch, length, cfg.d_inner), self.site("ssm_z", z))
        out = self.out_proj(self.site("out_in", y.to(hidden.dtype)))
        return out, LayerState(conv_state, ssm_state)
