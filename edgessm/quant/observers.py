"""Calibration statistics: activation ranges (max, exact percentile, per channel), GPTQ Hessians, SQNR."""

from __future__ import annotations

import math

import torch

from edgessm.errors import NumericsError


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise NumericsError(f"{where}: {bad} of {t.numel()} activation values are NaN/Inf during calibration")


class RangeObserver:
    """Running |x| statistics of one activation site.

    ``absmax`` (per tensor), ``channel_absmax`` (over the last axis) and, when ``percentile`` is
    given, the exact percentile of |x| over all ``total`` elements the site will see: only the
    largest values needed for it are kept (a running top-k), so memory stays small even when the
    calibration set has 10^8 elements. Interpolation is linear between order statistics, as
    ``torch.quantile`` does.
    """

    def __init__(self, percentile: float | None = None, total: int | None = None) -> None:
        self.absmax = 0.0
        self.channel_absmax: torch.Tensor | None = None
        self.seen = 0
        self._pct = percentile
        self._total = total
        self._top: torch.Tensor | None = None
        if percentile is not None:
            if total is None or total < 1:
                raise ValueError("a percentile observer needs the total element count it will see")
            pos = percentile / 100.0 * (total - 1)
            self._lo = math.floor(pos)
            self._frac = pos - self._lo
            self._k = total - self._lo  # keep the top values down to the lower order statistic

    def update(self, t: torch.Tensor) -> None:
        a = t.detach().abs().to(torch.float32)
        self.absmax = max(self.absmax, float(a.max())) if a.numel() else self.absmax
        cmax = a.reshape(-1, a.shape[-1]).amax(0)
        self.channel_absmax = cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
        self.seen += a.numel()
        if self._pct is not None:
            flat = a.reshape(-1)
            if self._top is not None:
                flat = torch.cat([self._top, flat])
            self._top = torch.topk(flat, min(self._k, flat.numel())).values

    def percentile(self) -> float:
        if self._pct is None or self._top is None:
            raise ValueError("percentile was not requested for this observer")
        if self.seen != self._total:
            raise ValueError(f"percentile observer saw {self.seen} elements, expected {self._total}")
        r_lo = self._total - 1 - self._lo  # index in the descending top-k of the lower order statistic
        lo = float(self._top[r_lo])
        hi = float(self._top[r_lo - 1]) if r_lo >= 1 else lo
        return lo + self._frac * (hi - lo)


class HessianObserver:
    """GPTQ's H = 2/n · Σ xᵀx over the n input rows of a linear (float64 accumulation)."""

    def __init__(self) -> None:
        self.h: torch.Tensor | None = None
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        xtx = x.T @ x
        self.h = xtx if self.h is None else self.h + xtx
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.h is None or self.rows == 0:
            raise ValueError("no calibration rows were observed")
        return 2.0 * self.h / self.rows


class SqnrMeter:
    """Accumulates signal and quantization-noise energy of one site over all batches."""

    def __init__(self) -> None:
        self.signal = 0.0
        self.noise = 0.0

    def update(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        ref64 = ref.detach().double()
        self.signal += float(ref64.pow(2).sum())
        self.noise += float((ref64 - approx.detach().double()).pow(2).sum())

    def db(self) -> float:
        if self.noise == 0.0:
            return float("inf")
        return 10.0 * math.log10(self.signal / self.noise) if self.signal > 0 else float("-inf")
