#!/usr/bin/env python3
"""Writes a random LFM2-350M-shaped model (16 layers, hidden 1024, attention in 6 of them, short
convolutions in the rest), 4-bit g64, made and quantized by mlx_lm, with a word-level tokenizer,
for `wick bench` against `mlx_lm benchmark` on the CPU.

Usage: python3 bench/make_random_lfm2.py OUT [bfloat16|float32]
"""
import json, os, sys
import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.utils import _get_classes, quantize_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_random_q4_model import write_tokenizer  # noqa: E402

if len(sys.argv) < 2:
    sys.exit(__doc__)
out = sys.argv[1]
dtype = getattr(mx, sys.argv[2] if len(sys.argv) > 2 else "bfloat16")
os.makedirs(out, exist_ok=True)
cfg = dict(model_type="lfm2", vocab_size=65536, hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=8, max_position_embeddings=128000, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
           block_dim=1024, block_ff_dim=6656, block_multiple_of=256, block_ffn_dim_multiplier=1.0,
           block_auto_adjust_ff_dim=True, rope_theta=1000000.0,
           layer_types=["conv","conv","full_attention","conv","conv","full_attention","conv","conv","full_attention",
                        "conv","full_attention","conv","full_attention","conv","full_attention","conv"])
M, A = _get_classes(cfg)
m = M(A.from_dict(cfg))
m.set_dtype(dtype)
m, q = quantize_model(m, cfg, group_size=64, bits=4)
mx.save_safetensors(os.path.join(out, "model.safetensors"), dict(tree_flatten(m.parameters())), metadata={"format": "mlx"})
json.dump(q, open(os.path.join(out, "config.json"), "w"), indent=1)
write_tokenizer(out, cfg["vocab_size"])
print("wrote", out)
