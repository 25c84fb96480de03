#!/bin/bash
# Type-checks (and lints) wick for Apple Silicon with the `metal` feature, on Linux:
#   scripts/check-apple.sh            cargo check --target aarch64-apple-darwin --features metal --all-targets
#   scripts/check-apple.sh clippy     the same with cargo clippy … -- -D warnings
# Nothing is linked or run: Metal shaders compile only at run time on a Mac (docs/metal.md).
#
# Dependencies with C in their build scripts still compile that C for the target: ring (TLS for
# the hub downloads) is built with clang against its own freestanding headers
# (RING_CORE_NOSTDLIBINC) plus a stand-in TargetConditionals.h; no Apple SDK is needed. On macOS
# the tokenizer uses the pure-Rust fancy-regex engine (Cargo.toml), so Oniguruma's C is not built.
set -euo pipefail
cd "$(dirname "$0")/.."
rustup target add aarch64-apple-darwin >/dev/null || { echo "check-apple.sh: rustup could not add the aarch64-apple-darwin target" >&2; exit 1; }
command -v clang >/dev/null || { echo "check-apple.sh needs clang (apt-get install clang llvm)" >&2; exit 1; }
AR=$(command -v llvm-ar || ls /usr/bin/llvm-ar-* 2>/dev/null | head -1 || true)
[ -n "$AR" ] || { echo "check-apple.sh needs llvm-ar (apt-get install llvm)" >&2; exit 1; }
export CC_aarch64_apple_darwin=clang AR_aarch64_apple_darwin=$AR
export CFLAGS_aarch64_apple_darwin="--target=arm64-apple-macosx11.0 -nostdlibinc -DRING_CORE_NOSTDLIBINC=1 -isystem $PWD/scripts/apple-check-include"
if [ "${1:-check}" = clippy ]; then
  cargo clippy --target aarch64-apple-darwin --features metal --all-targets -- -D warnings
else
  cargo check --target aarch64-apple-darwin --features metal --all-targets
fi
