"""Autoregressive generation over any Backend: one prefill, then one decode step per new token."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgessm.runtime.backend import Backend


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    tokens: np.ndarray  # [B, prompt + new]
    new_tokens: np.ndarray  # [B, new]
    prefill_seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 * float(np.median(self.step_seconds)) if self.step_seconds else float("nan")


def sample_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B, V] → next token ids [B] (int64)."""
    if sampling.temperature == 0.0:
        return logits.argmax(axis=-1).astype(np.int64)
    scaled = logits.astype(np.float64) / sampling.temperature
    if sampling.top_k:
        kth = np.sort(scaled, axis=-1)[:, -min(sampling.top_k, scaled.shape[-1])][:, None]
        scaled = np.where(scaled < kth, -np.inf, scaled)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if sampling.top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) >= sampling.top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        probs = np.where(drop, 0.0, probs)
        probs /= probs.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=p) for p in probs], dtype=np.int64)


def generate(
    backend: Backend,
    prompt: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_token_id: int | None = None,
) -> GenerationResult:
    """prompt [B, T] int64. Stops after max_new_tokens, or once every row has produced eos_token_id."""
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, length>=1] token ids, got shape {prompt.shape}")
    rng = np.random.default_rng(sampling.seed)
    t0 = time.perf_counter()
    logits, states = backend.prefill(prompt.astype(np.int64))
    result = GenerationResult(prompt, prompt[:, :0], time.perf_counter() - t0)
    last = logits[:, -1]
    finished = np.zeros(prompt.shape[0], dtype=bool)
    new: list[np.ndarray] = []
    for i in range(max_new_tokens):
        token = sample_next(last, sampling, rng)
        if eos_token_id is not None:
            token = np.where(finished, eos_token_id, token)
            finished |= token == eos_token_id
        new.append(token)
        if finished.all() or i == max_new_tokens - 1:
            break
        t0 = time.perf_counter()
        last, states = backend.step(token, states)
        result.step_seconds.append(time.perf_counter() - t0)
    result.new_tokens = np.stack(new, axis=1) if new else prompt[:, :0]
    result.tokens = np.concatenate([prompt, result.new_tokens], axis=1)
    return result
