#!/usr/bin/env python3
"""Greedy tokens from mlx_lm for wick's tests: loads MODEL with the adapters in ADAPTERS (as
`mlx_lm.generate --adapter-path` does), computes in f32 (as wick does on the CPU), and prints the
N greedy tokens that follow the prompt token ids as a JSON list.

Usage: mlx_greedy.py MODEL ADAPTERS IDS N   (IDS comma-separated)
"""
import json
import sys

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm import load
from mlx_lm.generate import generate_step


def main():
    model_dir, adapters, ids, n = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
    mx.set_default_device(mx.cpu)
    model, _ = load(model_dir, adapter_path=adapters)
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))
    out = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=n)]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
