"""The tensor-core W4A16 GEMV (plugins/kernels/w4_gemv.cu, edgessm.ops.cuda_kernels.w4a16_gemv_mma).

On the CPU: the repacked weight layout against the mma.m16n8k16 A-fragment layout of the PTX ISA
(every register of every lane decoded with the kernel's LOP3 / HSUB2 / HFMA2 bit arithmetic, replayed
in NumPy, must give back the quantized weights exactly), and the wrapper's argument errors. On a GPU
(the device machine): the kernel against the float64 reference, outputs poisoned with NaN first.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgessm.ops import cuda_kernels as K
from edgessm.ops import triton_gemv as Q
from tests.conftest import rel_err

HAS_CUDA = torch.cuda.is_available()


def _fp16_pairs(bits: np.ndarray) -> np.ndarray:
    """uint32 words -> their two float16 halves (low half first) as float64 [..., 2]."""
    return bits.astype(np.uint32).view(np.float16).reshape(*bits.shape, 2).astype(np.float64)


def _a_registers(word: np.ndarray) -> list[np.ndarray]:
    """The kernel's dequant_w4_step on a NumPy word array: the four A registers as (lo, hi) float pairs."""
    w = word.astype(np.uint32)
    w8 = w >> 8
    lo = lambda v: _fp16_pairs((v & 0x000F000F) | 0x64006400) - 1032.0  # noqa: E731
    hi = lambda v: _fp16_pairs((v & 0x00F000F0) | 0x64006400) / 16.0 - 72.0  # noqa: E731
    return [lo(w), hi(w), lo(w8), hi(w8)]


# mma.m16n8k16 .f16 A fragment (PTX ISA, "Matrix Fragments for mma.m16n8k16"): register i of lane
# 4g + t holds rows/columns (row offset, column offset) + (g, 2t + e) for its halves e = 0, 1
A_FRAGMENT = [(0, 0), (8, 0), (0, 8), (8, 8)]


def _unrepack(rw: np.ndarray, n: int, k: int) -> np.ndarray:
    """The [N16, K] weights that the kernel's A fragments hold, from the repacked words."""
    tiles, kblocks = rw.shape[:2]
    w = np.full((tiles * 16, k), np.nan)
    for lane in range(32):
        g, t = divmod(lane, 4)
        for j in range(4):
            regs = _a_registers(rw[:, :, lane, j])  # each [tiles, kblocks, 2]
            for (dr, dk), reg in zip(A_FRAGMENT, regs):
                for e in range(2):
                    rows = np.arange(tiles)[:, None] * 16 + g + dr
                    cols = np.arange(kblocks)[None, :] * 64 + 16 * j + 2 * t + dk + e
                    w[rows, cols] = reg[..., e]
    return w


@pytest.mark.parametrize("n,k", [(16, 64), (40, 128), (160, 256), (13, 192)])
def test_repack_gives_the_fragments_of_the_weights(n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n * k)
    q = torch.randint(-8, 8, (n, k), generator=gen, dtype=torch.int8)
    rw = K.repack_w4_mma(Q.pack_int4(q))
    assert rw.shape == (-(-n // 16), k // 64, 32, 4) and rw.dtype == torch.int32
    w = _unrepack(rw.numpy(), n, k)
    np.testing.assert_array_equal(w[:n], q.numpy().astype(np.float64))
    np.testing.assert_array_equal(w[n:], 0.0)  # padded rows are zero weights


def test_repack_rejects_k_not_a_multiple_of_64() -> None:
    with pytest.raises(ValueError, match="K=96 must be a multiple of 64"):
        K.repack_w4_mma(torch.zeros(16, 48, dtype=torch.int8))


@pytest.mark.parametrize("x_shape,x_dtype,scale_shape,match", [
    ((1, 128), torch.float32, (16, 1), "expected torch.float16"),
    ((9, 128), torch.float16, (16, 1), "9 rows, expected 1..8"),
    ((1, 128), torch.float16, (16, 3), r"scale has shape \(16, 3\)"),
    ((1, 128), torch.float16, (16, 8), "group size 16 must be a power of two >= 32"),
])
def test_wrapper_rejects_bad_arguments(x_shape, x_dtype, scale_shape, match) -> None:
    x = torch.zeros(x_shape, dtype=x_dtype)
    rw = torch.zeros(1, 2, 32, 4, dtype=torch.int32)
    with pytest.raises((ValueError, TypeError), match=match):
        K.w4a16_gemv_mma(x, rw, torch.ones(scale_shape), 16)


GPU_CASES = [  # (M, N, K, group, bias)
    (1, 8192, 2048, 128, False), (1, 2048, 4096, 128, False), (1, 160, 4096, 128, False),
    (1, 50280, 2048, 128, False), (1, 3072, 768, 128, True), (2, 40, 1536, 32, True),
    (4, 24, 640, 64, False), (8, 130, 1024, 256, True), (3, 16, 64, 32, False), (1, 4096, 128, 128, True),
]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (runs on the device via tools/gpu_decode_check.sh)")
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
def test_w4a16_gemv_mma_vs_float64(case: tuple) -> None:
    m, n, k, group, with_bias = case
    gen = torch.Generator().manual_seed(n + k + m)
    x = torch.randn(m, k, generator=gen).half().cuda()
    w = torch.randn(n, k, generator=gen) * 0.05
    p, s = Q.quantize_w4(w, group)
    bias = torch.randn(n, generator=gen).cuda() if with_bias else None
    p, s = p.cuda(), s.cuda()
    out = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    got = K.w4a16_gemv_mma(x, K.repack_w4_mma(p), s, n, bias, out=out)
    torch.cuda.synchronize()
    assert got.data_ptr() == out.data_ptr()
    assert rel_err(got, Q.reference_w4a16(x, p, s, bias)) < 1e-3  # float16 output rounding
