"""Compile-only check of the CUDA kernels in plugins/ (no GPU needed).

Configures plugins/ with CMake for sm_87;90 and builds libedgessm_kernels.so with ninja -j2; any
.cu that fails to compile fails the test. Then checks that every launcher declared in
plugins/include/edgessm/kernels.h is exported, and that argument validation (which runs on the
host before any CUDA call) rejects unsupported sizes. Skipped when nvcc, cmake or ninja is absent.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
HEADER = PLUGINS / "include" / "edgessm" / "kernels.h"
CUDA_ERROR_INVALID_VALUE = 1
BUILD_TIMEOUT_S = 600

_missing = [tool for tool in ("nvcc", "cmake", "ninja") if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"CUDA build tools not on PATH: {', '.join(_missing)}")


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")


@pytest.fixture(scope="module")
def kernels_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("plugins_build")
    _run(["cmake", "-S", str(PLUGINS), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
          "-DCMAKE_CUDA_ARCHITECTURES=87;90", "-DEDGESSM_BUILD_TRT=OFF"], ROOT)
    _run(["ninja", "-C", str(build), "-j2", "edgessm_kernels", "edgessm_kernels_static"], ROOT)
    lib = build / "libedgessm_kernels.so"
    assert lib.is_file(), f"build succeeded but {lib} is missing"
    assert (build / "libedgessm_kernels_static.a").is_file(), "static kernel library missing"
    return lib


def test_every_declared_launcher_is_exported(kernels_lib: Path) -> None:
    declared = re.findall(r"(?:cudaError_t|size_t)\s+(essm_\w+)\s*\(", HEADER.read_text())
    assert len(declared) >= 8, f"expected the 7 launchers and the SSD workspace query in {HEADER}, found {declared}"
    lib = ctypes.CDLL(str(kernels_lib))
    missing = [name for name in declared if not hasattr(lib, name)]
    assert not missing, f"launchers declared in kernels.h but not exported: {missing}"


def test_unsupported_sizes_are_rejected_on_the_host(kernels_lib: Path) -> None:
    lib = ctypes.CDLL(str(kernels_lib))
    P, I, F, I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    had = lib.essm_hadamard_transform
    had.argtypes = [I, I, P, P, I, F, F, P, I64, I, P]
    dummy = 256  # never dereferenced: validation fails first
    assert had(0, 0, dummy, dummy, 3, 1.0, 1.0, dummy, 1, 24, None) == CUDA_ERROR_INVALID_VALUE  # m = 3
    assert had(0, 0, dummy, dummy, 40, 1.0, 1.0, dummy, 1, 40 * 1024, None) == CUDA_ERROR_INVALID_VALUE
    assert had(0, 0, dummy, dummy, 12, 1.0, 1.0, dummy, 1, 36, None) == CUDA_ERROR_INVALID_VALUE  # 36/12 = 3
    assert had(0, 3, dummy, dummy, 1, 1.0, 0.0, dummy, 1, 64, None) == CUDA_ERROR_INVALID_VALUE  # int8, scale 0
    ssd = lib.essm_ssd_scan_fwd
    ssd.argtypes = [I, I, P, P, P, P, P, P, P, I, F, F, P, P, P, P, I, I, I, I, I, I, I, P, ctypes.c_size_t, P]
    assert ssd(0, 0, dummy, dummy, dummy, dummy, dummy, None, None, 1, 0.0, math.inf, None, None, dummy, None,
               1, 8, 2, 64, 1, 24, 256, None, 0, None) == CUDA_ERROR_INVALID_VALUE  # dstate not a multiple of 16
    assert ssd(0, 0, dummy, dummy, dummy, dummy, dummy, None, None, 1, 0.0, math.inf, None, None, dummy, None,
               1, 8, 3, 64, 2, 16, 256, None, 0, None) == CUDA_ERROR_INVALID_VALUE  # heads not divisible by groups
    assert ssd(1, 1, dummy, dummy, dummy, dummy, dummy, None, None, 1, 0.0, math.inf, None, None, dummy, None,
               1, 8, 2, 64, 1, 128, 256, None, 4096, None) == CUDA_ERROR_INVALID_VALUE  # bytes without a workspace
    ws_size = lib.essm_ssd_scan_workspace_size
    ws_size.argtypes, ws_size.restype = [I, I, I, I, I, I], ctypes.c_size_t
    # (out dtype, max batch, max seqlen, heads, headdim, dstate): float32 outputs never split; a
    # batch-1 prefill of 24 heads does, and larger limits never need less
    assert ws_size(0, 1, 2048, 24, 64, 128) == 0
    small, large = ws_size(1, 1, 2048, 24, 64, 128), ws_size(1, 4, 4096, 24, 64, 128)
    assert 0 < small <= large
    # sized for an H100 (ssd.cu, SegSplit), the larger need of the two pass-2 forms: 264 two-stage or
    # 396 one-stage full blocks, 528 state-only ones; (segments - 1) * pieces end states of 32 x 128
    # floats plus a decay each, per (head, 32-column tile)
    piece_bytes = 32 * 128 * 4 + 4
    assert small == 48 * (5 - 1) * 2 * piece_bytes  # 24 heads: two stages, 5 segments of 7 chunks, 2 pieces
    assert ws_size(1, 1, 2048, 64, 64, 128) == 128 * 1 * 4 * piece_bytes  # 64 heads: 2 segments, 4 pieces
    assert ws_size(1, 1, 2048, 8, 64, 128) == 16 * (24 - 1) * 1 * piece_bytes  # 8 heads: one stage, 24 segments
    assert ws_size(1, 1, 2048, 128, 64, 128) == 0  # 256 tiles fill the GPU: no split
    scan = lib.essm_selective_scan_fwd
    scan.argtypes = [I, I, P, P, P, P, P, P, P, P, I, P, P, P, P, I, I, I, I, P]
    assert scan(1, 0, dummy, dummy, dummy, dummy, dummy, None, None, None, 1, None, None, dummy, None,
                1, 4, 16, 8, None) == CUDA_ERROR_INVALID_VALUE  # f16 in, f32 out
    assert scan(3, 1, dummy, dummy, dummy, dummy, dummy, None, None, None, 1, None, None, dummy, None,
                1, 4, 16, 8, None) == CUDA_ERROR_INVALID_VALUE  # int8 without scales
    upd = lib.essm_selective_state_update
    upd.argtypes = [I, I, P, P, P, P, P, P, P, P, P, I, P, P, P, I, I, I, P]
    assert upd(0, 0, dummy, dummy, dummy, dummy, dummy, dummy, None, None, None, 1, None, dummy, dummy,
               1, 4, 257, None) == CUDA_ERROR_INVALID_VALUE  # dstate above the decode kernels' 256
    ssd_upd = lib.essm_ssd_state_update
    ssd_upd.argtypes = [I, I, P, P, P, P, P, P, P, P, I, F, F, P, P, P, I, I, I, I, I, P]
    assert ssd_upd(0, 0, dummy, dummy, dummy, dummy, dummy, dummy, None, None, 1, 0.0, math.inf, None, dummy, dummy,
                   1, 2, 4, 1, 272, None) == CUDA_ERROR_INVALID_VALUE  # dstate above 256
    conv = lib.essm_causal_conv1d_fwd
    conv.argtypes = [I, P, P, P, I, P, P, I, I, I, I, P]
    assert conv(0, dummy, dummy, None, 1, dummy, None, 1, 4, 8, 9, None) == CUDA_ERROR_INVALID_VALUE  # width 9


def test_the_unit_rate_probe_compiles(tmp_path: Path) -> None:
    """plugins/harness/unit_rates.cu (tools/gpu_check.sh runs it on a GPU) builds for both targets."""
    for arch in ("87", "90"):
        _run(["nvcc", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-c",
              str(PLUGINS / "harness" / "unit_rates.cu"), "-o", str(tmp_path / f"unit_rates_{arch}.o")], ROOT)


def test_the_cluster_placement_probe_compiles(tmp_path: Path) -> None:
    """tools/cluster_placement.cu (run on the device; docs/kernels.md, "Cluster placement") builds for
    sm_90, the first architecture with thread-block clusters."""
    _run(["nvcc", "-O2", "-gencode=arch=compute_90,code=sm_90", "-c", str(ROOT / "tools" / "cluster_placement.cu"),
          "-o", str(tmp_path / "cluster_placement.o")], ROOT)
