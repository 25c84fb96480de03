#!/bin/bash
# Unpacks mlx, mlx-cuda-13 and mlx-lm on the GPU machine (no package access there) from pieces
# carried over two runs, because the CUDA wheel is larger than one run may carry:
#   STASH/part1.chunk.aa (first run) and CARRY/{part1.chunk.ab, part2.tar.xz, mlx-*.whl, mlx_lm-*.whl}.
# The pieces come from ../shared/bench/prepare-mlx-carry.sh (see docs/cuda.md).
#   usage: bench/unpack_mlx.sh STASH CARRY SITE      then: bench/cuda_side_by_side.sh WICK SITE
set -euo pipefail
STASH=${1:?usage: unpack_mlx.sh STASH CARRY SITE}; CARRY=${2:?}; SITE=${3:?}
mkdir -p "$SITE"
cat "$STASH"/part1.chunk.aa "$CARRY"/part1.chunk.ab | xz -d | tar xf - -C "$SITE"
xz -dc "$CARRY"/part2.tar.xz | tar xf - -C "$SITE"
for w in "$CARRY"/mlx-*.whl "$CARRY"/mlx_lm-*.whl; do python3 -m zipfile -e "$w" "$SITE"; done
echo "mlx unpacked into $SITE"
