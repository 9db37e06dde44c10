"""CPU emulation of the mixed softplus/SiLU of the single-segment Mamba-1 prefill scan (variant 4).

`fma_rcp` (plugins/kernels/common.cuh) and `log1p_unit`, `mixed_softplus`, `mixed_silu`
(plugins/kernels/selective_scan.cu) are replayed operation by operation in numpy float32: every
add/multiply rounds to float32, fmaf is computed in float64 and rounded once to float32 (a product
of two floats is exact in float64, so only the sum's rounding can differ from a true fma, and only
by double rounding), and the bit manipulations act on the float32 encodings. The polynomial
coefficients are read from the CUDA sources, so the test follows them. `ex2.approx.ftz.f32` (the
special-function unit's 2^x, `fast_exp2`) has no bit-exact description: it is emulated as 2^x
rounded to float32 and then moved by its documented worst case, 2^-22 relative, both ways; the
composed functions must hold their bound either way. The maximum relative error against float64 is
checked over millions of points in [-30, 30]. (The kernels themselves are checked on a GPU against
float64 by plugins/harness/check_kernels.py.)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "plugins" / "kernels"
F32 = npt.NDArray[np.float32]
EX2_REL_ERR = 2.0**-22  # PTX ISA, ex2.approx.f32: maximum relative error
LOG2E = np.float32(1.4426950408889634)  # kLog2e
# Bound on the relative error at x: 2^(x * kLog2e) is off from e^x by |x| times (the float32
# rounding of the product, at most 2^-24 relative, plus kLog2e's own rounding, 1.3e-8): the
# |x|-proportional term that fast_softplus and fast_silu share. ex2.approx adds EX2_REL_ERR, and the
# FMA-pipe log1p/reciprocal and the final roundings stay below 2e-7 (test_log1p_error, test_rcp_error).
X_TERM = 2.0**-24 + abs(float(LOG2E) / np.log2(np.e) - 1)
REST = EX2_REL_ERR + 2e-7
LITERAL = r"(-?\d+\.\d*(?:e[-+]?\d+)?)f"


def _body(source: Path, name: str) -> str:
    text = source.read_text()
    start = text.index(f"__device__ __forceinline__ float {name}(")
    return text[start:text.index("\n}\n", start)]


def _horner_coefficients(body: str, acc: str) -> list[np.float32]:
    """The literals of `float acc = c;` and the following `acc = fmaf(acc, x, c);` lines, in order."""
    first = re.findall(rf"float {acc} = {LITERAL};", body)
    rest = re.findall(rf"{acc} = fmaf\({acc}, \w+, {LITERAL}\);", body)
    assert len(first) == 1 and rest, f"Horner scheme of {acc!r} not found"
    return [np.float32(float(c)) for c in first + rest]


RCP_BODY = _body(KERNELS / "common.cuh", "fma_rcp")
LOG1P_BODY = _body(KERNELS / "selective_scan.cu", "log1p_unit")
SOFTPLUS_BODY = _body(KERNELS / "selective_scan.cu", "mixed_softplus")
SILU_BODY = _body(KERNELS / "selective_scan.cu", "mixed_silu")
LOG1P_POLY = _horner_coefficients(LOG1P_BODY, "q")
RCP_MAGIC = np.uint32(int(re.search(r"0x([0-9A-Fa-f]+) - __float_as_int", RCP_BODY).group(1), 16))
SILU_CLAMP = np.float32(float(re.search(rf"fminf\(-x \* kLog2e, {LITERAL}\)", SILU_BODY).group(1)))


def fma(a: F32 | np.float32, b: F32 | np.float32, c: F32 | np.float32) -> F32:
    return (np.asarray(a, np.float64) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def horner(coefficients: list[np.float32], x: F32) -> F32:
    acc = np.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        acc = fma(acc, x, c)
    return acc


def fast_exp2(v: F32, skew: float) -> F32:
    """ex2.approx.ftz.f32: 2^v off by `skew` relative (flushed to 0 below the normal range)."""
    y = (np.exp2(v.astype(np.float64)) * (1 + skew)).astype(np.float32)
    return np.where(y < np.finfo(np.float32).tiny, np.float32(0), y)


def fma_rcp(d: F32) -> F32:
    r = (RCP_MAGIC - d.view(np.uint32)).view(np.float32)
    e = fma(-d, r, np.float32(1))
    r = fma(r, e, r)
    e = fma(-d, r, np.float32(1))
    return fma(r, fma(e, e, e), r)


def log1p_unit(t: F32) -> F32:
    q = horner(LOG1P_POLY, t)
    return fma((t * q).astype(np.float32), t, t)


def mixed_softplus(x: F32, skew: float) -> F32:
    with np.errstate(over="ignore"):  # |x| > 2.3e38: -inf, as on the GPU, then 2^-inf = 0
        t = fast_exp2((-np.abs(x) * LOG2E).astype(np.float32), skew)
    return (np.maximum(x, np.float32(0)) + log1p_unit(t)).astype(np.float32)


def mixed_silu(x: F32, skew: float) -> F32:
    e = fast_exp2(np.minimum((-x * LOG2E).astype(np.float32), SILU_CLAMP), skew)
    return (x * fma_rcp((np.float32(1) + e).astype(np.float32))).astype(np.float32)


def _points() -> F32:
    rng = np.random.default_rng()
    return np.concatenate([np.linspace(-30, 30, 4_000_001, dtype=np.float32),
                           rng.uniform(-30, 30, 2_000_000).astype(np.float32),
                           np.float32([-20.0, 20.0, np.nextafter(np.float32(20), np.float32(21)), 1e-30, -1e-30])])


def _rel_errs(got: F32, want: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """|got / want - 1| where want != 0 (got must be exactly 0 elsewhere), and that mask."""
    nz = want != 0
    assert np.all(got[~nz] == 0)
    return np.abs(got[nz].astype(np.float64) / want[nz] - 1), nz


def _max_rel_err(got: F32, want: npt.NDArray[np.float64]) -> float:
    return float(np.max(_rel_errs(got, want)[0]))


def _within_bound(got: F32, want: npt.NDArray[np.float64], x: F32) -> bool:
    """|got / want - 1| <= X_TERM |x| + REST at every point."""
    err, nz = _rel_errs(got, want)
    return bool(np.all(err <= X_TERM * np.abs(x[nz].astype(np.float64)) + REST))


def test_sources_parsed() -> None:
    assert len(LOG1P_POLY) == 9 and SILU_CLAMP == np.float32(125)
    # the call structure emulated by mixed_softplus/mixed_silu below
    assert "fmaxf(x, 0.f) + log1p_unit(fast_exp2(-fabsf(x) * kLog2e))" in SOFTPLUS_BODY
    assert "x * fma_rcp(1.f + fast_exp2(fminf(-x * kLog2e, 125.f)))" in SILU_BODY


def test_log1p_error() -> None:
    t = np.concatenate([np.linspace(0, 1, 2_000_001, dtype=np.float32), np.float32(2) ** -np.linspace(0, 126, 100_001)])
    assert _max_rel_err(log1p_unit(t.astype(np.float32)), np.log1p(t.astype(np.float64))) <= 1.5e-7


def test_rcp_error() -> None:
    d = np.concatenate([np.linspace(1, 2, 1_000_001, dtype=np.float32),
                        np.float32(2) ** np.linspace(0, 125, 1_000_001, dtype=np.float32)])
    assert _max_rel_err(fma_rcp(d), 1 / d.astype(np.float64)) <= 1.2e-7


@pytest.mark.parametrize("skew", [-EX2_REL_ERR, 0.0, EX2_REL_ERR])
def test_softplus_error(skew: float) -> None:
    x = _points()
    xd = x.astype(np.float64)
    want = np.where(xd > 20, xd, np.log1p(np.exp(xd)))
    assert _within_bound(mixed_softplus(x, skew), want, x)
    big = np.float32([20.5, 30.0, 1e4, 3e38])
    assert np.array_equal(mixed_softplus(big, skew), big)  # the x > 20 threshold holds without a branch


@pytest.mark.parametrize("skew", [-EX2_REL_ERR, 0.0, EX2_REL_ERR])
def test_silu_error(skew: float) -> None:
    x = _points()
    xd = x.astype(np.float64)
    assert _within_bound(mixed_silu(x, skew), xd / (1 + np.exp(-xd)), x)
    tail = mixed_silu(np.float32([-88.0, -1e4, 90.0, 1e4]), skew)
    # below -86.5: x * 2^-125 (the clamp), tiny instead of -0 or a NaN; above 87, exactly x
    assert np.all(np.abs(tail[:2]) < 1e-30) and np.all(tail[:2] != 0) and np.array_equal(tail[2:], np.float32([90, 1e4]))
