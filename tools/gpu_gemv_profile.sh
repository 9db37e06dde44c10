#!/usr/bin/env bash
# Nsight Compute profiles of decode GEMVs, one per (weights, projection): the first launch of each
# kernel that benchmarks/gpu_gemv.py makes (its accuracy call, outside the CUDA graph: the kernel on
# its own, so a PDL wait returns at once). Writes the sections' details and the per-SASS-instruction
# source page (CSV, readable with tools/sass_hotspots.py) for each.
#
#   OUT=/tmp/out bash tools/gpu_gemv_profile.sh                       # W8A16 and W4A16, 1.4B x_proj and in_proj
#   OUT=/tmp/out IMPLS=w4a16 PROJECTIONS=out_proj CONFIG=mamba1-130m bash tools/gpu_gemv_profile.sh
#
# Environment: OUT (default out/gpu_gemv_profile), IMPLS (gpu_gemv.py impls, default "w8a16 w4a16"),
# PROJECTIONS (default "x_proj in_proj"), CONFIG (default mamba1-1.4b), PYTHON (default python3).
# Results: $OUT/<impl>-<projection>.txt and .csv (two files per pair: at most four pairs come back
# from one device call).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_gemv_profile}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
command -v ncu >/dev/null || { echo "gpu_gemv_profile: ncu (Nsight Compute) not found" >&2; exit 2; }
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

status=0
for impl in ${IMPLS:-w8a16 w4a16}; do
  for proj in ${PROJECTIONS:-x_proj in_proj}; do
    rep="$OUT/$impl-$proj"
    echo "== $impl $proj"
    if timeout 240 ncu --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
        --section LaunchStats --section Occupancy --section SourceCounters --import-source no \
        -k "regex:rows_gemv|w4_gemv" -c 1 -f -o "$rep" \
        "$PYTHON" benchmarks/gpu_gemv.py --configs "${CONFIG:-mamba1-1.4b}" --projections "$proj" --impls "$impl" \
        --copies 1 --replays 1 --warmup 0 --l2-multiple 0 --json "$rep.json" > "$rep.txt" 2>&1; then
      ncu -i "$rep.ncu-rep" --print-details all >> "$rep.txt" 2>&1
      ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "$rep.csv" 2>> "$rep.txt" || status=1
      grep -E "Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Warp Cycles Per Issued" \
        "$rep.txt" | head -8
    else
      echo "   ncu failed (see $rep.txt)"; tail -5 "$rep.txt"; status=1
    fi
    rm -f "$rep.ncu-rep" "$rep.json"
  done
done
exit $status
