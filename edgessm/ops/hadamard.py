"""Hadamard matrices and the fast Hadamard transform (docs/onnx_ops.md, HadamardTransform).

``n = m * 2^k`` with a ±1 base matrix of order ``m`` in {1, 12, 20, 28, 40}; the full matrix is
``had_m ⊗ H_{2^k}`` (Sylvester ``H_{2^k}``), so element ``i = a*2^k + b`` pairs row ``a`` of the base
with row ``b`` of the Sylvester part. This covers the d_inner of common Mamba sizes that are not
powers of two (1536 = 12·128, 2560 = 20·128, 5120 = 20·256, 3584 = 28·128).

Base matrices are built, not tabulated:
- 12 and 20: Paley construction I over GF(11) / GF(19) (q ≡ 3 mod 4, order q+1);
- 28: Paley construction II over GF(13) (q ≡ 1 mod 4, order 2(q+1));
- 40: Sylvester doubling of the order-20 matrix.
"""

from __future__ import annotations

import functools
import math

import torch

BASE_ORDERS = (1, 12, 20, 28, 40)


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j - i) over GF(q), q prime; χ is the quadratic character (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if r in squares else -1 for r in range(1, q)]
    return torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)


def _paley1(q: int) -> torch.Tensor:
    """Order q+1 for a prime q ≡ 3 (mod 4): H = I + S with S = [[0, 1ᵀ], [-1, Q]] skew-symmetric."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley2(q: int) -> torch.Tensor:
    """Order 2(q+1) for a prime q ≡ 1 (mod 4): C = [[0, 1ᵀ], [1, Q]] symmetric; each 0 of C becomes
    [[1, -1], [-1, -1]] and each ±1 becomes ±[[1, 1], [1, -1]]."""
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    zero_block = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    one_block = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, one_block) + torch.kron((c == 0).to(torch.float64), zero_block)


@functools.cache
def _base(m: int) -> torch.Tensor:
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 12:
        return _paley1(11)
    if m == 20:
        return _paley1(19)
    if m == 28:
        return _paley2(13)
    if m == 40:
        h = _base(20)
        return torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    raise ValueError(f"no Hadamard base matrix of order {m}: supported orders are {BASE_ORDERS}")


def hadamard_base(m: int) -> torch.Tensor:
    """The ±1 base matrix of order ``m`` (float32, [m, m]); ``had_m @ had_m.T == m * I``."""
    return _base(m).to(torch.float32).clone()


def _is_pow2(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


def hadamard_factor(n: int) -> tuple[int, int]:
    """(m, 2^k) with ``n = m * 2^k``: the smallest supported base order that works.

    Every producer and consumer of a HadamardTransform (quantizer, exporter, kernels) must use
    this same factorisation, since different ones give different (equally orthogonal) matrices.
    """
    for m in BASE_ORDERS:
        if n % m == 0 and _is_pow2(n // m):
            return m, n // m
    raise ValueError(
        f"no Hadamard matrix of size {n}: it must be m * 2^k with m in {BASE_ORDERS} "
        f"(e.g. 1536 = 12*128, 5120 = 20*256)"
    )


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, normalized: bool = False) -> torch.Tensor:
    """The dense ±1 matrix ``had_m ⊗ H_{2^k}`` of size n (scaled by 1/sqrt(n) when ``normalized``)."""
    m, p = hadamard_factor(n)
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < p:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    h = torch.kron(_base(m), sylvester)
    return (h / math.sqrt(n) if normalized else h).to(dtype)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform along the last axis (length a power of two), O(n log n)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        x = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2).reshape(*lead, n)
        h *= 2
    return x


def hadamard_transform(x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """``scale * (had_m ⊗ H_{2^k}) x`` along the last axis; ``scale=None`` means 1/sqrt(n) (orthonormal).

    Computed in float32 (float64 for float64 input) and returned in x's dtype.
    """
    n = x.shape[-1]
    m, p = hadamard_factor(n)
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = _fwht(x.to(cd).reshape(*x.shape[:-1], m, p))  # [..., a, b]: Sylvester part along b
    if m > 1:
        y = torch.einsum("ac,...cb->...ab", _base(m).to(device=x.device, dtype=cd), y)
    y = y.reshape(x.shape)
    s = 1.0 / math.sqrt(n) if scale is None else scale
    return (y * s).to(x.dtype)
