#!/bin/bash
# On the GPU machine: wick (a CUDA build) and mlx_lm (mlx's CUDA backend) on the same random-weight
# 4-bit g64 folders (bench/make_random_q4_model.py; $SHAPES, default Llama-1B and Llama-8B),
# `-p $PROMPT -g $GEN` (default 512, 128), batches $BATCHES (default 1 and 8), one table.
#   usage: [SHAPES="deepseek_v2_lite ..."] [PROMPT=8192] bench/cuda_side_by_side.sh WICK_BINARY [MLX_SITE]
# MLX_SITE: a folder where mlx, mlx-cuda-13 and mlx-lm are unpacked (see docs/cuda.md for carrying
# them to a machine without package access); without it only wick runs.
# Also times the kernels alone when the `cuda_kernels` example binary is given as $KERNELS.
set -uo pipefail
WICK=${1:?usage: cuda_side_by_side.sh WICK_BINARY [MLX_SITE]}
MLX_SITE=${2:-}
HERE=$(cd "$(dirname "$0")" && pwd)
OUTDIR=${OUT:-/tmp/wick-bench}; mkdir -p "$OUTDIR"
TRIALS=${TRIALS:-3}
SHAPES=${SHAPES:-llama1b llama8b}; PROMPT=${PROMPT:-512}; GEN=${GEN:-128}; BATCHES=${BATCHES:-1 8}
# cuBLAS and the CUDA runtime come from the Python environment's nvidia wheels
export LD_LIBRARY_PATH=$(python3 -c 'import glob,site; print(":".join(g for sp in site.getsitepackages() for g in glob.glob(sp+"/nvidia/*/lib")))'):${LD_LIBRARY_PATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ -n "${KERNELS:-}" ]; then "$KERNELS" | tee "$OUTDIR/kernels.md"; fi
avg() { grep -o "Averages: .*" "$1" | sed -E 's/.*prompt_tps=([0-9.]+), generation_tps=([0-9.]+), peak_memory=([0-9.]+).*/\1 \2 \3/'; }
rows=()
for shape in $SHAPES; do
  [ -f /tmp/$shape/config.json ] || python3 "$HERE/make_random_q4_model.py" /tmp/$shape $shape || exit 1
  for b in $BATCHES; do
    log=$OUTDIR/wick_${shape}_p${PROMPT}_b$b.txt
    echo "== wick bench $shape -b $b"
    RUST_BACKTRACE=1 "$WICK" bench --model /tmp/$shape -p $PROMPT -g $GEN -b $b -n $TRIALS > "$log" 2>&1 || grep -m3 -A30 "^error" "$log"
    read -r wp wg wm <<< "$(avg "$log")"
    mp=-; mg=-; mm=-
    if [ -n "$MLX_SITE" ]; then
      mlog=$OUTDIR/mlx_${shape}_p${PROMPT}_b$b.txt
      echo "== mlx_lm benchmark $shape -b $b"
      PYTHONPATH=$MLX_SITE python3 -m mlx_lm benchmark --model /tmp/$shape -p $PROMPT -g $GEN -b $b -n $TRIALS > "$mlog" 2>&1 \
        && read -r mp mg mm <<< "$(avg "$mlog")" || tail -5 "$mlog"
    fi
    rows+=("| $shape | $PROMPT | $b | $wp | $mp | $wg | $mg | $wm | $mm |")
  done
done
{
  echo "| model (random 4-bit g64) | prompt | batch | prompt tok/s wick | prompt tok/s mlx_lm | decode tok/s wick | decode tok/s mlx_lm | peak GB wick | peak GB mlx_lm |"
  echo "|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee -a "$OUTDIR/side_by_side.md"
if [ -n "${KERNELS:-}" ]; then
  for shape in $SHAPES; do "$KERNELS" /tmp/$shape | tee -a "$OUTDIR/kernels.md"; done
fi
