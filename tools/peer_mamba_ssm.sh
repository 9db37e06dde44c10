#!/usr/bin/env bash
# Prepares third_party/peer/ (git-ignored): the Triton kernels of state-spaces/mamba (mamba_ssm), the
# peer that plugins/harness/bench_kernels.py times beside edgessm's kernels in the same run
# (`--peer third_party/peer`), plus the pure-Python wheels they import (einops). Run it here, where
# there is a network; the device machine has none, so carry the folder:
#
#   fetch github:state-spaces/mamba              # the search tool's fetch: a bare mirror
#   bash tools/peer_mamba_ssm.sh /work/.mirror/state-spaces+mamba/repo
#   device run ... carry=["third_party/peer", ...]  PEER=third_party/peer bash tools/gpu_check.sh
#
# Only mamba_ssm/ops/triton (the Mamba-3 folder left out) and the two utils modules it imports are
# taken, under empty package __init__ files: mamba_ssm's own __init__ imports its CUDA extensions,
# which are not built here. Nothing of it is committed (third_party/ is ignored).
set -euo pipefail
MIRROR="${1:?usage: tools/peer_mamba_ssm.sh PATH_OF_A_STATE_SPACES_MAMBA_GIT_DIR [REV]}"
REV="${2:-HEAD}"
cd "$(dirname "$0")/.."
DEST=third_party/peer
PYTHON="${PYTHON:-python3}"
rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp"
files=$(git --git-dir="$MIRROR" ls-tree -r --name-only "$REV" -- mamba_ssm/ops/triton mamba_ssm/utils/torch.py \
          mamba_ssm/utils/determinism.py | grep -v '/mamba3/' | grep '\.py$')
# shellcheck disable=SC2086
git --git-dir="$MIRROR" archive "$REV" $files | tar -x -C "$DEST.tmp"
for pkg in mamba_ssm mamba_ssm/ops mamba_ssm/ops/triton mamba_ssm/utils; do : > "$DEST.tmp/$pkg/__init__.py"; done
git --git-dir="$MIRROR" rev-parse "$REV" > "$DEST.tmp/MAMBA_SSM_COMMIT"
"$PYTHON" -m pip download --no-deps --quiet -d "$DEST.tmp/wheels" einops==0.8.2
for w in "$DEST.tmp"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$w" "$DEST.tmp"; done
rm -rf "$DEST.tmp/wheels" "$DEST" && mv "$DEST.tmp" "$DEST"
echo "peer ready: $DEST (mamba_ssm $(cat "$DEST/MAMBA_SSM_COMMIT"))"
