#!/usr/bin/env bash
# A/B a patch against this tree on one GPU, in one device command: build the kernels of both trees,
# run the float64 correctness harness on the patched one, then time both with the same benchmark
# commands back to back (A, B, A, B: the second pair shows the run-to-run noise).
#
#   OUT=/tmp/out ONLY=scan,ssd bash tools/gpu_ab.sh /tmp/change.patch
#   OUT=/tmp/out ONLY=ssd DECODE_ARGS="--configs mamba1-1.4b --modes float,w8a16 --no-baselines --steps 200" \
#     bash tools/gpu_ab.sh /tmp/change.patch
#
# Environment: OUT (default out/gpu_ab), ONLY (the harness/benchmark --only filter; empty = all
# kernels), CUDA_ARCHS (default 90), PYTHON (default python3), DECODE_ARGS (when set, also time
# benchmarks/gpu_decode.py with these arguments in both trees; DECODE_TWICE=1: A, B, A, B), GEMV_ARGS
# (when set, also time benchmarks/gpu_gemv.py with these arguments: A, B, A, B), SKIP_CHECK=1 (no correctness run),
# SKIP_KERNEL_BENCH=1 (no kernel benchmark: for patches outside plugins/), B_TESTS (pytest files run
# in tree B against its kernels, e.g. tests/test_cuda_backend.py), TensorRT_ROOT (TensorRT headers:
# also run the TensorRT plugin harness on tree B, whose plugins call the patched launchers),
# B_BENCH_ARGS (more benchmark arguments for tree B only, e.g. "--kernel-times --ssd-variants '0,0 4,2,4'").
# Results: $OUT/{a,b}{1,2}/bench_kernels.json, $OUT/b/check_kernels.json, $OUT/{a,b,a2,b2}/gpu_decode.json,
# $OUT/{a1,b1,a2,b2}/gpu_gemv.json.
set -uo pipefail
cd "$(dirname "$0")/.."
patch_file=$(realpath "${1:?usage: tools/gpu_ab.sh PATCH}")

OUT="${OUT:-out/gpu_ab}"
CUDA_ARCHS="${CUDA_ARCHS:-90}"
PYTHON="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"; OUT=$(realpath "$OUT")
only_args=()
[ -n "${ONLY:-}" ] && only_args=(--only "$ONLY")

tree_a=$PWD
tree_b=$(mktemp -d)/edgessm-b
mkdir -p "$tree_b"
# The files the kernels, harness and benchmarks need; `git apply` works outside a repository too.
cp -r edgessm plugins benchmarks tests tools pyproject.toml "$tree_b"/
(cd "$tree_b" && git apply "$patch_file") || { echo "gpu_ab: $patch_file does not apply to this tree" >&2; exit 2; }

build() {  # build TREE -> prints the library path
  local tree=$1 dir=$1/build/plugins-ab
  { cmake -S "$tree/plugins" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" \
      -DEDGESSM_BUILD_TRT=OFF && ninja -C "$dir"; } >> "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log" >&2; return 1; }
  echo "$dir/libedgessm_kernels.so"
}
echo "== build A (this tree) and B (patched), CUDA archs $CUDA_ARCHS"
lib_a=$(build "$tree_a") || exit 1
if (cd "$tree_b" && git apply --numstat "$patch_file") | cut -f3 | grep -q '^plugins/'; then
  lib_b=$(build "$tree_b") || exit 1
else
  lib_b=$lib_a  # the patch leaves the kernels alone
fi

status=0
if [ "${SKIP_CHECK:-0}" != 1 ]; then
  echo "== correctness of B"
  mkdir -p "$OUT/b"
  "$PYTHON" "$tree_b/plugins/harness/check_kernels.py" --lib "$lib_b" "${only_args[@]}" \
    --json "$OUT/b/check_kernels.json" > "$OUT/b/check_kernels.log" 2>&1 || status=1
  tail -5 "$OUT/b/check_kernels.log"
fi

if [ -n "${B_TESTS:-}" ]; then
  echo "== tests of B: $B_TESTS"
  mkdir -p "$OUT/b"
  # shellcheck disable=SC2086
  (cd "$tree_b" && EDGESSM_KERNELS_LIB="$lib_b" PYTHONPATH="$tree_b" "$PYTHON" -m pytest -q -p no:cacheprovider $B_TESTS) \
    > "$OUT/b/tests.log" 2>&1 || status=1
  tail -3 "$OUT/b/tests.log"
fi

if [ -n "${TensorRT_ROOT:-}" ]; then
  echo "== TensorRT plugin harness of B"
  mkdir -p "$OUT/b"
  BUILD_DIR="$tree_b/build/plugins-trt" CUDA_ARCHS="$CUDA_ARCHS" TensorRT_ROOT="$(realpath "$TensorRT_ROOT")" \
    bash "$tree_b/plugins/trt/run_harness.sh" > "$OUT/b/trt_harness.log" 2>&1 || status=1
  tail -1 "$OUT/b/trt_harness.log"
fi

bench() {  # bench NAME TREE LIB [EXTRA ARGS, as one shell-quoted string]
  mkdir -p "$OUT/$1"
  echo "== kernel benchmark $1"
  eval "\"\$PYTHON\" \"\$2/plugins/harness/bench_kernels.py\" --lib \"\$3\" \"\${only_args[@]}\" --json \"\$OUT/\$1/bench_kernels.json\" ${4:-}" \
    2>&1 | tee "$OUT/$1/bench_kernels.log" || status=1
}
if [ "${SKIP_KERNEL_BENCH:-0}" != 1 ]; then
  bench a1 "$tree_a" "$lib_a"
  bench b1 "$tree_b" "$lib_b" "${B_BENCH_ARGS:-}"
  bench a2 "$tree_a" "$lib_a"
  bench b2 "$tree_b" "$lib_b" "${B_BENCH_ARGS:-}"
  echo "== A/B (µs; b2/a1 < 1: B faster)"
  "$PYTHON" tools/ab_table.py "$OUT"/{a1,b1,a2,b2}/bench_kernels.json || status=1
fi

if [ -n "${GEMV_ARGS:-}" ]; then
  for side in a1 b1 a2 b2; do
    tree=$tree_a
    [ "${side:0:1}" = b ] && tree=$tree_b
    mkdir -p "$OUT/$side"
    echo "== GEMV benchmark $side"
    # shellcheck disable=SC2086
    (cd "$tree" && PYTHONPATH="$tree" "$PYTHON" benchmarks/gpu_gemv.py --json "$OUT/$side/gpu_gemv.json" $GEMV_ARGS) \
      > "$OUT/$side/gpu_gemv.log" 2>&1 || status=1
  done
  "$PYTHON" tools/ab_table.py "$OUT"/{a1,b1,a2,b2}/gpu_gemv.json || status=1
fi

if [ -n "${DECODE_ARGS:-}" ]; then
  sides="a b"
  [ "${DECODE_TWICE:-0}" = 1 ] && sides="a b a2 b2"
  for side in $sides; do
    tree=$tree_a lib=$lib_a
    [ "${side:0:1}" = b ] && tree=$tree_b lib=$lib_b
    mkdir -p "$OUT/$side"
    echo "== decode benchmark $side"
    # shellcheck disable=SC2086
    (cd "$tree" && EDGESSM_KERNELS_LIB="$lib" PYTHONPATH="$tree" "$PYTHON" benchmarks/gpu_decode.py \
      --json "$OUT/$side/gpu_decode.json" $DECODE_ARGS) 2>&1 | tee "$OUT/$side/gpu_decode.log" || status=1
  done
fi
echo "== gpu_ab finished with status $status (results in $OUT)"
exit $status
