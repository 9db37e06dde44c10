"""`edgessm bench`: prefill throughput, decode latency and peak memory of any Backend."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from edgessm.runtime.backend import Backend


@dataclass(frozen=True)
class BenchResult:
    backend: str
    batch: int
    prompt_len: int
    new_tokens: int
    prefill_ms: float
    prefill_tokens_per_s: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    peak_rss_mib: float

    def as_dict(self) -> dict:
        return asdict(self)


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def bench_backend(
    backend: Backend, batch: int = 1, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> BenchResult:
    """Median of ``repeats`` prefills and of every decode step, after one warm-up of each."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, backend.config.vocab_size, size=(batch, prompt_len), dtype=np.int64)
    logits, states = backend.prefill(prompt)  # warm-up: allocation, graph optimisation
    backend.step(logits[:, -1].argmax(-1), states)
    prefill = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        logits, states = backend.prefill(prompt)
        prefill.append(time.perf_counter() - t0)
    steps = []
    token = logits[:, -1].argmax(-1)
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        logits, states = backend.step(token, states)
        steps.append(time.perf_counter() - t0)
        token = logits.argmax(-1)
    p, s = float(np.median(prefill)), float(np.median(steps))
    return BenchResult(
        backend=backend.name, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
        prefill_ms=1e3 * p, prefill_tokens_per_s=batch * prompt_len / p,
        decode_ms_per_token=1e3 * s, decode_tokens_per_s=batch / s, peak_rss_mib=_peak_rss_mib(),
    )


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain fixed-width table (what benchmarks print before writing JSON)."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return "" if v is None else str(v)
