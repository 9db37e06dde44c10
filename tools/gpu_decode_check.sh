#!/usr/bin/env bash
# One device command for the GPU decode path: build the plugins/ kernels, check the CUDA backend
# (edgessm/runtime/cuda_backend.py) against the reference model, then benchmark whole-model decode.
#
#   OUT=/tmp/out bash tools/gpu_decode_check.sh        # on a machine with a CUDA GPU, Triton and PyTorch
#
# Checks (tests/test_cuda_backend.py, GPU part): Triton GEMV kernels vs float64; the kernel wrappers
# vs the reference ops; backend logits vs the reference model in float32 (< 1e-3, 32 equal greedy
# tokens) and float16 (< 2e-2), quantized modes vs the dequantized model. Benchmark:
# benchmarks/gpu_decode.py (JSON in $OUT/gpu_decode.json). The benchmark runs even when a check
# fails (its numbers are then marked by the exit status), so one device call yields both.
#
# Environment: OUT (default out/gpu_decode), BUILD_DIR (default build/plugins-sm90), CUDA_ARCHS
# (default 90), PYTHON (default python3), BENCH_ARGS (extra arguments of gpu_decode.py),
# CHECK_TIMEOUT_S / BENCH_TIMEOUT_S (default 240 / 250: each phase is cut off rather than the whole call).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-out/gpu_decode}"
BUILD_DIR="${BUILD_DIR:-build/plugins-sm90}"
CUDA_ARCHS="${CUDA_ARCHS:-90}"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee "$OUT/device.txt"
"$PYTHON" -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"

echo "== build kernels (CUDA archs $CUDA_ARCHS)"
{ cmake -S plugins -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" \
    -DEDGESSM_BUILD_TRT=OFF && ninja -C "$BUILD_DIR"; } > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export EDGESSM_KERNELS_LIB="$PWD/$BUILD_DIR/libedgessm_kernels.so"

status=0
echo "== correctness: tests/test_cuda_backend.py"
timeout "${CHECK_TIMEOUT_S:-240}" "$PYTHON" -m pytest -q -rfEs -s -p no:cacheprovider tests/test_cuda_backend.py 2>&1 \
  | tee "$OUT/check.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmark: benchmarks/gpu_decode.py"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT_S:-250}" "$PYTHON" benchmarks/gpu_decode.py --json "$OUT/gpu_decode.json" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== gpu_decode_check finished with status $status (logs in $OUT)"
exit $status
