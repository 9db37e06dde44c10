"""The int8 output path of the Hadamard kernel on the CPU: plugins/kernels/quantize_int8.cuh.

quantize_int8_div(v, s, quantize_int8_inv(s)) replaces the kernel's per-element division
clamp(rintf(v / s), -128, 127) with a multiply and a rare fallback to the division, and must give
the same int8 for every float v and s (ties included). tests/cpp/quantize_int8_check.cpp includes
the header the kernels use, so g++ checks the device code's own source: random pairs over wide
exponent ranges; exact and near ties (v = RN(h s) and 8 float neighbours either side, for every
half-integer and integer h in [-200.5, 200.5]) for ~8400 scales; zeros, infinities, NaNs and
subnormals. Skipped when g++ is absent. A larger run (and every float v for a few scales):
    g++ -std=c++17 -O2 -ffp-contract=off -pthread -Iplugins/kernels tests/cpp/quantize_int8_check.cpp
    ./a.out --random 1000000000 --tie-scales 150000 --exhaustive 0.007874016,0.1,1
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "quantize_int8_check.cpp"
HEADER_DIR = ROOT / "plugins" / "kernels"
CXX = shutil.which("g++")

pytestmark = pytest.mark.skipif(CXX is None, reason="g++ not on PATH (needed to build tests/cpp/quantize_int8_check.cpp)")


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    exe = tmp_path_factory.mktemp("quantize_int8") / "quantize_int8_check"
    # -ffp-contract=off: no FMA contraction, so each float operation rounds once, as the device's
    # _rn intrinsics do (x86-64 SSE arithmetic is IEEE single precision without excess precision)
    cmd = [CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-Wall", "-Wextra", "-Werror", "-pthread",
           f"-I{HEADER_DIR}", str(SOURCE), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return exe


def test_fast_int8_quantization_matches_the_division(checker: Path) -> None:
    # ~415M pairs: about 5 s on 2 cores
    proc = subprocess.run([str(checker), "--random", "300000000", "--tie-scales", "8000", "--threads", "2",
                           "--seed", "12345"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "\nok: " in out, f"int8 quantization differs from the division:\n{out[-6000:]}"
    # the division stays rare for realistic scales (amax / 127): ~2^-13 of the elements
    share = re.search(r"s = amax / 127\s+(\d+) pairs, divided ([0-9.e+-]+)%", out)
    assert share is not None, out
    assert int(share.group(1)) > 1_000_000
    assert float(share.group(2)) < 0.05, f"fallback share {share.group(2)}% (expected ~0.012%)"
