#!/usr/bin/env bash
# Where a kernel spends its instructions and stalls, per SASS instruction: builds the kernels, runs
# the benchmark's profile mode (one launch of each headline kernel) under Nsight Compute for the
# first launch whose name matches REGEX, and writes the report's source page as CSV (one row per
# SASS instruction: executed instructions, warp stall samples, ...) for reading offline, e.g. with
# tools/sass_hotspots.py.
#
#   OUT=/tmp/out bash tools/gpu_sass_profile.sh 'ssd_chunked_kernel' 'selective_scan_seq1_kernel'
#
# Environment: OUT (default out/gpu_sass_profile), CUDA_ARCHS (default 90), PYTHON (default python3),
# LIB (a kernel library already built with -lineinfo, e.g. on a machine without a GPU: skips the build).
# Results: $OUT/<n>.csv (the source page of REGEX number n) and $OUT/<n>.txt (the sections' summary).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: tools/gpu_sass_profile.sh REGEX [REGEX...]" >&2; exit 2; }
OUT="${OUT:-out/gpu_sass_profile}"
CUDA_ARCHS="${CUDA_ARCHS:-90}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
command -v ncu >/dev/null || { echo "gpu_sass_profile: ncu (Nsight Compute) not found" >&2; exit 2; }

if [ -n "${LIB:-}" ]; then
  lib=$(realpath "$LIB")
else
  dir=build/plugins-profile
  lib="$dir/libedgessm_kernels.so"
  { cmake -S plugins -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" \
      -DCMAKE_CUDA_FLAGS=-lineinfo -DEDGESSM_BUILD_TRT=OFF && ninja -C "$dir"; } > "$OUT/build.log" 2>&1 \
    || { tail -40 "$OUT/build.log" >&2; exit 1; }
fi

status=0
n=0
for regex in "$@"; do
  n=$((n + 1))
  echo "== $n: $regex"
  rep="$OUT/$n"
  if timeout 240 ncu --section SourceCounters --section WarpStateStats --section InstructionStats \
      --section LaunchStats --section ComputeWorkloadAnalysis --section SpeedOfLight --import-source no -k "regex:$regex" -c 1 -f -o "$rep" \
      "$PYTHON" plugins/harness/bench_kernels.py --lib "$lib" --profile > "$rep.txt" 2>&1; then
    ncu -i "$rep.ncu-rep" --print-details all >> "$rep.txt" 2>&1
    ncu -i "$rep.ncu-rep" --page source --print-source sass --csv > "$rep.csv" 2>> "$rep.txt" || status=1
    rm -f "$rep.ncu-rep"
    echo "   $(wc -l < "$rep.csv") SASS rows -> $rep.csv"
  else
    echo "   ncu failed (see $rep.txt)"; tail -5 "$rep.txt"; status=1
  fi
done
exit $status
