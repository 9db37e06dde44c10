#!/usr/bin/env bash
# One-command GPU check of plugins/: build (sm_87 + sm_90), kernel correctness harness, kernel
# benchmark, and (when present) the TensorRT plugin harness. Logs and JSON go to $OUT.
#
#   OUT=/tmp/out bash tools/gpu_check.sh            # on a machine with a CUDA GPU
#   TensorRT_ROOT=/path/to/TensorRT bash tools/gpu_check.sh
#
# Environment: OUT (default out/gpu_check), BUILD_DIR (default build/plugins), PYTHON (default
# python3), CUDA_ARCHS (default "87;90"), SKIP_BENCH=1 to stop after the correctness harness,
# PROFILE=1 to add an Nsight Compute report of the headline kernels ($OUT/ncu.txt),
# TensorRT_ROOT (TensorRT headers; enables the plugin harness), TRT_BUILD_DIR, PEER (a folder made by
# tools/peer_mamba_ssm.sh: the benchmark also times mamba_ssm's Triton kernels on the same inputs),
# CHECK_ARGS / KERNEL_BENCH_ARGS (more arguments for the harness / the kernel benchmark, e.g.
# CHECK_ARGS="--only ssd" KERNEL_BENCH_ARGS="--only ssd --kernel-times --ssd-variants '0,0 4,2,4'").
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-out/gpu_check}"
BUILD_DIR="${BUILD_DIR:-build/plugins}"
PYTHON="${PYTHON:-python3}"
CUDA_ARCHS="${CUDA_ARCHS:-87;90}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt" || true
nvcc --version | tail -2

echo "== build kernels (CUDA archs $CUDA_ARCHS)"
cmake -S plugins -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" \
  -DEDGESSM_BUILD_TRT=OFF 2>&1 | tee "$OUT/build.log"
ninja -C "$BUILD_DIR" 2>&1 | tee -a "$OUT/build.log"
LIB="$BUILD_DIR/libedgessm_kernels.so"

status=0
echo "== execution-unit peak rates (plugins/harness/unit_rates.cu)"
nvcc -O3 -arch=native plugins/harness/unit_rates.cu -o "$BUILD_DIR/unit_rates" && "$BUILD_DIR/unit_rates" 2>&1 \
  | tee "$OUT/unit_rates.txt" || echo "unit_rates failed"

echo "== kernel correctness harness"
eval "\"\$PYTHON\" plugins/harness/check_kernels.py --lib \"\$LIB\" --json \"\$OUT/check_kernels.json\" ${CHECK_ARGS:-}" 2>&1 | tee "$OUT/check_kernels.log" || status=1

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== kernel benchmark"
  eval "\"\$PYTHON\" plugins/harness/bench_kernels.py --lib \"\$LIB\" --json \"\$OUT/bench_kernels.json\" ${PEER:+--peer \"\$PEER\"} ${KERNEL_BENCH_ARGS:-}" \
    2>&1 | tee "$OUT/bench_kernels.log" || status=1
fi

if [ "${PROFILE:-0}" = 1 ] && command -v ncu >/dev/null; then
  echo "== ncu profile of the headline kernels (one launch each)"
  timeout 300 ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section MemoryWorkloadAnalysis -k regex:'selective_scan|ssd_chunked|ssd_scan_fwd|hadamard_kernel' -c 10 \
    "$PYTHON" plugins/harness/bench_kernels.py --lib "$LIB" --profile > "$OUT/ncu.txt" 2>&1 || echo "ncu failed (see $OUT/ncu.txt)"
fi

# ---- HOOK: TensorRT plugins (owned by plugins/trt) ----------------------------------------------
# plugins/trt/run_harness.sh configures plugins/ with TensorRT_ROOT (which adds trt/), builds
# libedgessm_plugins.so + its harness in its own build dir, and runs every plugin on the GPU.
if [ -d plugins/trt ] && [ -n "${TensorRT_ROOT:-}" ]; then
  echo "== TensorRT plugin harness"
  BUILD_DIR="${TRT_BUILD_DIR:-build/plugins-trt}" CUDA_ARCHS="$CUDA_ARCHS" \
    bash plugins/trt/run_harness.sh 2>&1 | tee "$OUT/trt_harness.log" || status=1
fi
# ---- end HOOK ----------------------------------------------------------------------------------

echo "== gpu_check finished with status $status (logs in $OUT)"
exit $status
