#!/bin/bash
# On the GPU machine, in a copy of this repository: unpacks carry/cuda/wick-cuda.tar.xz (made by
# scripts/build-cuda.sh) into /tmp/wick, makes the default model folder from
# models/SmolLM2-135M-Instruct.Q4_1.gguf with the CUDA wick, and runs the CUDA tests.
#   usage: scripts/gpu-check.sh [TEST-FILTER]
set -uo pipefail
cd "$(dirname "$0")/.."
W=/tmp/wick; mkdir -p $W
tar xJf carry/cuda/wick-cuda.tar.xz -C $W || exit 1
# cuBLAS and the CUDA runtime come from the Python environment's nvidia wheels
export LD_LIBRARY_PATH=$(python3 -c 'import glob,site; print(":".join(g for sp in site.getsitepackages() for g in glob.glob(sp+"/nvidia/*/lib")))'):${LD_LIBRARY_PATH:-}
# the test binary reads tests/golden and models/ under the folder it was built in
root=$(cat $W/build-root)
if [ "$root" != "$PWD" ] && [ ! -e "$root" ]; then mkdir -p "$(dirname "$root")" && ln -s "$PWD" "$root"; fi
WICK=$W/wick models/fetch-default.sh || exit 1
$W/cuda-tests --nocapture ${1:-}
