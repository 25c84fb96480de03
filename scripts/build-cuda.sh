#!/bin/bash
# Builds wick with the `cuda` feature on this machine (no GPU needed) and packs what runs on the
# GPU machine into carry/cuda/wick-cuda.tar.xz: the wick binary, the CUDA test binary
# (tests/cuda.rs) and the kernel timing example (bench/cuda_kernels.rs), stripped.
#   usage: scripts/build-cuda.sh            (first build: ~15 minutes on 2 cores)
# On the GPU machine: tar xJf carry/cuda/wick-cuda.tar.xz -C /tmp/wick; see docs/cuda.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda-toolchain.sh
T=target-cuda
cargo build --release --features cuda --target-dir $T --bin wick --example cuda_kernels
tests=$(cargo test --release --features cuda,testing --target-dir $T --test cuda --no-run --message-format=json \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]=="cuda"][-1])')
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
cp $T/release/wick "$stage/wick"; cp $T/release/examples/cuda_kernels "$stage/cuda_kernels"; cp "$tests" "$stage/cuda-tests"
strip --strip-debug "$stage"/*   # symbols kept: readable backtraces
pwd > "$stage/build-root"   # where the test binary looks for tests/golden and models/
mkdir -p carry/cuda
tar cf - -C "$stage" . | xz -T2 -6 > carry/cuda/wick-cuda.tar.xz.part
mv carry/cuda/wick-cuda.tar.xz.part carry/cuda/wick-cuda.tar.xz
ls -la carry/cuda/wick-cuda.tar.xz
