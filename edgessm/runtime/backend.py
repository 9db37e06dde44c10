"""The interface every runtime backend (torch, ONNX Runtime, TensorRT) implements.

Generation, evaluation and benchmarking are written once against this protocol. States are
opaque to callers: each backend keeps them in whatever form it runs on (torch tensors, numpy
arrays, device buffers).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from edgessm.config import MambaConfig
from edgessm.models import MambaLM, States


@runtime_checkable
class Backend(Protocol):
    name: str
    config: MambaConfig

    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        """tokens [B, T] int64 → (logits [B, T, vocab] float32, states after the last token)."""
        ...

    def step(self, token: np.ndarray, states: Any) -> tuple[np.ndarray, Any]:
        """token [B] int64 → (logits [B, vocab] float32, new states)."""
        ...


class TorchBackend:
    """The reference PyTorch model (CPU or CUDA) behind the Backend protocol."""

    name = "torch"

    def __init__(self, model: MambaLM, device: str | torch.device = "cpu") -> None:
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)

    @torch.no_grad()
    def prefill(self, tokens: np.ndarray) -> tuple[np.ndarray, States]:
        logits, states = self.model(torch.as_tensor(tokens, dtype=torch.long, device=self.device))
        return logits.cpu().numpy(), states

    @torch.no_grad()
    def step(self, token: np.ndarray, states: States) -> tuple[np.ndarray, States]:
        logits, states = self.model.step(torch.as_tensor(token, dtype=torch.long, device=self.device), states)
        return logits.cpu().numpy(), states
