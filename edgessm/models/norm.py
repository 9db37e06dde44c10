"""RMSNorm variants, numerically identical to Hugging Face's MambaRMSNorm / MambaRMSNormGated."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back before the weight: the order HF (and mamba_ssm) use.
        xf = x.float() if x.dtype != torch.float64 else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Mamba-2's norm: ``rmsnorm(x * silu(z))`` normalised per group of ``group_size`` channels."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.group_size = group_size

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(cd) * F.silu(z.to(cd))
        g = h.view(*h.shape[:-1], -1, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * g.view(h.shape).to(x.dtype)
