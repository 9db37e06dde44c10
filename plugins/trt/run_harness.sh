#!/usr/bin/env bash
# Build libedgessm_plugins.so and the plugin harness, then run the harness (every op, every dtype,
# enqueued on the GPU against a float64 reference). Exit status is the harness's: 0 = all passed.
#
#   plugins/trt/run_harness.sh [harness args: --seed N --op Name --no-enqueue]
#
# Env: TensorRT_ROOT (default third_party/TensorRT, headers only), BUILD_DIR (default
# build/plugins-trt), CUDA_ARCHS (default: the CMake project's 87;90).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
build=${BUILD_DIR:-$repo/build/plugins-trt}
trt_root=${TensorRT_ROOT:-$repo/third_party/TensorRT}
if [ ! -f "$trt_root/include/NvInferRuntime.h" ]; then
  echo "run_harness.sh: TensorRT headers not found in $trt_root/include (set TensorRT_ROOT)" >&2
  exit 2
fi
trt_root=$(cd "$trt_root" && pwd)  # absolute: CMake resolves relative paths against its own cwd
cmake -S "$repo/plugins" -B "$build" -G Ninja -DTensorRT_ROOT="$trt_root" \
  ${CUDA_ARCHS:+-DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS"}
ninja -C "$build" edgessm_plugins edgessm_plugin_harness
exec "$build/trt/edgessm_plugin_harness" --lib "$build/trt/libedgessm_plugins.so" "$@"
