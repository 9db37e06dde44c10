"""tools/cubin_diff.py's SASS parsing and comparison (its cuobjdump and nvcc runs need the CUDA tools)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import cubin_diff  # noqa: E402

SASS = """
	code for sm_90
		Function : _ZN4essm50_GLOBAL__N__47ad31e2_17_selective_scan_cu_c1fe615826selective_scan_seq1_kernelIffEEvNS0_8ScanArgsE
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                   /* 0x00000a00ff017b82 */
        /*fff0*/              @!P0 FFMA R2, R3, R4, R5 ;                                    /* 0x0000000403027223 */
        /*10000*/                  MUFU.EX2 R6, R2 ;                                        /* 0x0000000200067308 */
        /*10010*/                  EXIT ;                                                   /* 0x000000000000794d */
		Function : _ZN4essm62_GLOBAL__N__492c2814_29__cubin_diff_selective_scan_cu_c1fe615829selective_scan_cluster_kernelIffEEvNS0_8ScanArgsEii
        /*0000*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;                            /* 0x0000000000007b1d */
"""


def test_parse_sass_reads_every_address_width_and_drops_path_hashes() -> None:
    kernels = cubin_diff.parse_sass(SASS)
    seq1, cluster = sorted(kernels, key=len)
    assert "c1fe6158" not in seq1 and "cubin_diff" not in cluster  # the file's hash and name are gone
    assert "selective_scan_seq1_kernel" in seq1 and "selective_scan_cluster_kernel" in cluster
    assert kernels[seq1] == ["LDC R1, c[0x0][0x28]", "FFMA R2, R3, R4, R5", "MUFU.EX2 R6, R2", "EXIT"]
    assert kernels[cluster] == ["BAR.SYNC.DEFER_BLOCKING 0x0"]


def test_compare_separates_integer_and_floating_point_changes() -> None:
    base = ["IADD3 R1, R2, R3, RZ", "FFMA R4, R5, R6, R7", "LDS.128 R8, [R9]"]
    assert cubin_diff.compare(base, list(base)) == "identical"
    assert cubin_diff.compare(base, base[::-1]).startswith("same opcodes")
    integer_only = cubin_diff.compare(base, [*base, "LEA R10, R11, R12, 0x2"])
    assert "only integer/control opcodes differ" in integer_only and "3 -> 4" in integer_only
    core = cubin_diff.compare(base, [*base, "MUFU.EX2 R13, R14"])
    assert "differs in {'MUFU.EX2': (0, 1)}" in core
