"""Perplexity and next-token accuracy of any Backend on held-out text.

Protocol (shared by `edgessm eval`, the quantization report and the shipped models' recorded
numbers): the token stream is cut into non-overlapping windows of ``window`` tokens (a shorter
tail is dropped); inside each window, tokens 1..window-1 are predicted from the ones before them
(one prefill per window, no state carried between windows). Perplexity = exp(mean NLL) over all
predicted tokens, computed in float64.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edgessm.errors import DataError
from edgessm.runtime.backend import Backend


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll: float
    accuracy: float
    tokens: int
    windows: int

    def as_dict(self) -> dict:
        return asdict(self)


def windows_of(tokens: np.ndarray, window: int, max_windows: int | None = None) -> np.ndarray:
    if window < 2:
        raise DataError(f"window must be >= 2 tokens, got {window}")
    n = len(tokens) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"text has {len(tokens)} tokens, fewer than one window of {window}")
    return np.asarray(tokens[: n * window], dtype=np.int64).reshape(n, window)


def evaluate_tokens(
    backend: Backend, tokens: np.ndarray, window: int = 256, max_windows: int | None = None, batch: int = 8,
    progress: bool = False,
) -> EvalResult:
    wins = windows_of(tokens, window, max_windows)
    nll_sum, correct, count = 0.0, 0, 0
    for start in tqdm(range(0, len(wins), batch), desc="eval", unit="batch", disable=not progress):
        chunk = wins[start : start + batch]
        logits, _ = backend.prefill(chunk)
        logits = logits[:, :-1].astype(np.float64)
        target = chunk[:, 1:]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logz = np.log(np.exp(shifted).sum(axis=-1))
        picked = np.take_along_axis(shifted, target[..., None], axis=-1)[..., 0]
        nll_sum += float((logz - picked).sum())
        correct += int((logits.argmax(axis=-1) == target).sum())
        count += target.size
    nll = nll_sum / count
    return EvalResult(float(np.exp(nll)), nll, correct / count, count, len(wins))


def evaluate_file(
    backend: Backend, data: str | Path, tokenizer, window: int = 256, max_windows: int | None = None,
    progress: bool = False,
) -> EvalResult:
    text = Path(data).read_text(encoding="utf-8")
    return evaluate_tokens(backend, np.array(tokenizer.encode(text)), window, max_windows, progress=progress)
