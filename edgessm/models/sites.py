"""Named activation sites inside a mixer: where quantization observes and fake-quantizes tensors.

A mixer passes each tensor that a quantization recipe may care about through ``self.site(name, t)``.
By default this is the identity; ``edgessm.quant`` installs observers (calibration) or quantizers
(fake-quant / integer-exact execution) per site, so the float model code is shared by all modes.

Site names (same for both architectures): ``conv_in`` (x before the causal conv), ``ssm_x``
(scan input), ``ssm_dt``, ``ssm_B``, ``ssm_C`` (scan parameters), ``ssm_z`` (gate), ``out_in``
(input of out_proj).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

SITE_NAMES = ("conv_in", "ssm_x", "ssm_dt", "ssm_B", "ssm_C", "ssm_z", "out_in")


class LayerState(NamedTuple):
    """Recurrent state of one layer: conv window [B, conv_dim, d_conv-1] and SSM state (float32)."""

    conv: torch.Tensor
    ssm: torch.Tensor


class ActivationSites(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.site_fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}

    def site(self, name: str, t: torch.Tensor) -> torch.Tensor:
        fn = self.site_fns.get(name)
        return t if fn is None else fn(t)
