"""The causal language model around the mixers: embeddings, pre-norm residual blocks, final norm, head.

Module and parameter names match Hugging Face's MambaForCausalLM / Mamba2ForCausalLM exactly,
so a HF state dict loads with no renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from edgessm.config import MambaConfig
from edgessm.models.mamba1 import Mamba1Mixer
from edgessm.models.mamba2 import Mamba2Mixer
from edgessm.models.norm import RMSNorm
from edgessm.models.sites import LayerState

States = list[LayerState]


class Block(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.mixer: Mamba1Mixer | Mamba2Mixer = (Mamba1Mixer if config.arch == "mamba1" else Mamba2Mixer)(config)

    def forward(self, hidden: torch.Tensor, state: LayerState | None) -> tuple[torch.Tensor, LayerState]:
        residual = hidden
        normed = self.norm(hidden.to(self.norm.weight.dtype))
        if self.residual_in_fp32 and residual.dtype != torch.float64:
            residual = residual.float()
        out, new_state = self.mixer(normed, state)
        return residual + out, new_state


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, eps=config.norm_eps)


class MambaLM(nn.Module):
    """Mamba-1 or Mamba-2 language model.

    ``forward(tokens)`` is the prefill: it returns logits for every position and the per-layer
    states after the last token. ``forward(tokens[:, -1:], states)`` continues the sequence one
    token at a time (the decode step); longer continuations work as well.
    """

    def __init__(self, config: MambaConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight

    @property
    def mixers(self) -> list[Mamba1Mixer | Mamba2Mixer]:
        return [layer.mixer for layer in self.backbone.layers]

    def forward(self, tokens: torch.Tensor, states: States | None = None) -> tuple[torch.Tensor, States]:
        """tokens: [B, L] int64. Returns (logits [B, L, vocab] float32, new states)."""
        hidden = self.backbone.embeddings(tokens)
        new_states: States = []
        for i, layer in enumerate(self.backbone.layers):
            hidden, st = layer(hidden, None if states is None else states[i])
            new_states.append(st)
        hidden = self.backbone.norm_f(hidden.to(self.backbone.norm_f.weight.dtype))
        logits = self.lm_head(hidden.to(self.lm_head.weight.dtype))
        return logits.float() if logits.dtype != torch.float64 else logits, new_states

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, States]:
        return self(tokens)

    @torch.no_grad()
    def step(self, token: torch.Tensor, states: States) -> tuple[torch.Tensor, States]:
        """token: [B] int64 → (logits [B, vocab], states)."""
        logits, states = self(token[:, None], states)
        return logits[:, -1], states

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
