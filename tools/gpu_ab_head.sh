#!/usr/bin/env bash
# tools/gpu_ab.sh with tree A = the last commit, for use while the working tree holds other,
# unfinished work: A is unpacked from ab/head.tar, B is A + PATCH; neither sees the rest of the
# working tree. Before the device call (ab/ is untracked, carried by the device tool):
#
#   mkdir -p ab && git archive HEAD -o ab/head.tar && git diff HEAD -- <paths> > ab/change.patch
#
# and on the device (repository root; the environment passes on to tools/gpu_ab.sh, TensorRT headers
# default to third_party/TensorRT, TensorRT_ROOT= turns the plugin harness off):
#
#   OUT_DIR=$OUT ONLY=ssd bash tools/gpu_ab_head.sh ab/change.patch
#
# The logs that matter (benchmarks a1 b1 a2 b2, check, plugin harness, tests, decode, GEMV) are copied to
# $OUT_DIR under short names.
R=$PWD
P=$(realpath "${1:?usage: tools/gpu_ab_head.sh PATCH}")
: "${OUT_DIR:?set OUT_DIR (where the logs go)}"
# A second call with the same head.tar keeps tree A and its kernel build (ninja then has nothing to do).
sum=$(md5sum < ab/head.tar)
if [ "$(cat /tmp/ab_a.md5 2>/dev/null)" != "$sum" ]; then
  rm -rf /tmp/ab_a && mkdir -p /tmp/ab_a && tar -xf ab/head.tar -C /tmp/ab_a && echo "$sum" > /tmp/ab_a.md5 || exit 2
fi
cd /tmp/ab_a || exit 2
cp "$R/tools/gpu_ab.sh" "$R/tools/ab_table.py" tools/  # this tree's A/B driver (its options), on tree A's files
export TensorRT_ROOT=${TensorRT_ROOT-$R/third_party/TensorRT} OUT=/tmp/ab_out
rm -rf /tmp/ab_out
bash tools/gpu_ab.sh "$P" > /tmp/ab.log 2>&1
echo "gpu_ab rc=$?"
grep -v "^    " /tmp/ab.log | tail -30
cd /tmp/ab_out || exit 2
for f in a1 b1 a2 b2; do [ -f $f/bench_kernels.log ] && cp $f/bench_kernels.log "$OUT_DIR/bench_$f.log"; done
for f in b/check_kernels.log b/trt_harness.log b/tests.log; do [ -f $f ] && cp $f "$OUT_DIR/$(basename $f)"; done
for s in a b a2 b2; do [ -f $s/gpu_decode.log ] && cp $s/gpu_decode.log "$OUT_DIR/decode_$s.log"; done
for s in a1 b1 a2 b2; do [ -f $s/gpu_gemv.log ] && cp $s/gpu_gemv.log "$OUT_DIR/gemv_$s.log"; done
cp /tmp/ab.log "$OUT_DIR/ab.log"
