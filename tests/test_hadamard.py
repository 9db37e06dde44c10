"""edgessm.ops.hadamard: base matrices, dense matrices, and the fast transform (docs/onnx_ops.md)."""

from __future__ import annotations

import pytest
import torch

from edgessm.ops.hadamard import BASE_ORDERS, hadamard_base, hadamard_factor, hadamard_matrix, hadamard_transform

# Several sizes per base order, including the d_inner of real Mamba models (1536, 2560, 3584).
SIZES = [1, 2, 8, 256, 12, 24, 96, 1536, 20, 40, 160, 2560, 28, 56, 224, 3584]


@pytest.mark.parametrize("m", BASE_ORDERS)
def test_base_is_hadamard(m: int) -> None:
    h = hadamard_base(m).double()
    assert h.shape == (m, m)
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", SIZES)
def test_matrix_orthogonal(n: int) -> None:
    h = hadamard_matrix(n)
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))
    hn = hadamard_matrix(n, normalized=True)
    assert (hn @ hn.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-12


def test_factorisation_and_element_order() -> None:
    assert hadamard_factor(1536) == (12, 128)
    assert hadamard_factor(5120) == (20, 256)
    assert hadamard_factor(3584) == (28, 128)
    assert hadamard_factor(1024) == (1, 1024)
    # element i = a*2^k + b: entry (a*2^k+b, c*2^k+d) = had_m[a, c] * H_{2^k}[b, d]
    h, base = hadamard_matrix(48), hadamard_base(12).double()
    sylvester = hadamard_matrix(4)
    a, b, c, d = torch.meshgrid(torch.arange(12), torch.arange(4), torch.arange(12), torch.arange(4), indexing="ij")
    assert torch.equal(h[a * 4 + b, c * 4 + d], base[a, c] * sylvester[b, d])


@pytest.mark.parametrize("n", [36, 44, 100, 9 * 64, 0])
def test_unsupported_sizes_raise(n: int) -> None:
    with pytest.raises(ValueError, match="Hadamard"):
        hadamard_factor(n)


@pytest.mark.parametrize("n", [1, 64, 24, 1536, 20, 160, 56, 448])
def test_fast_transform_matches_dense(n: int) -> None:
    x = torch.randn(3, 5, n, dtype=torch.float64)
    dense = x @ hadamard_matrix(n, normalized=True).T
    got = hadamard_transform(x)
    assert (got - dense).norm() / dense.norm() < 1e-12
    x32 = x.float()
    got32 = hadamard_transform(x32)
    assert got32.dtype == torch.float32
    assert (got32.double() - dense).norm() / dense.norm() < 1e-6
    # an explicit scale multiplies the unnormalised ±1 transform
    assert torch.allclose(hadamard_transform(x, scale=0.5), 0.5 * (x @ hadamard_matrix(n).T), rtol=1e-12, atol=1e-9)


def test_transform_is_involution_up_to_transpose() -> None:
    n = 1536
    x = torch.randn(4, n, dtype=torch.float64)
    h = hadamard_matrix(n, normalized=True)
    # orthonormal: applying Hᵀ to H x gives x back
    assert torch.allclose(hadamard_transform(x) @ h, x, atol=1e-10)
