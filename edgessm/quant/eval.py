"""Perplexity of a language model (float or quantized) on a token stream."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from edgessm.errors import NumericsError
from edgessm.models.lm import MambaLM


@torch.no_grad()
def perplexity(model: MambaLM, stream: torch.Tensor, seq_len: int = 512, batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``seq_len`` tokens (each predicts
    its tokens 1..seq_len-1 from a fresh state); a trailing partial window is dropped."""
    n = stream.numel() // seq_len
    if n == 0:
        raise ValueError(f"evaluation text has {stream.numel()} tokens, fewer than seq_len={seq_len}")
    windows = stream[: n * seq_len].reshape(n, seq_len)
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress):
        logits, _ = model(batch)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(loss):
            raise NumericsError("perplexity: the model produced NaN/Inf logits")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(nll / count)
