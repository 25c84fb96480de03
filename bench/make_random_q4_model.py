#!/usr/bin/env python3
"""Writes a random-weight Llama-shaped model, 4-bit affine (group 64), in mlx's format, so wick
and mlx_lm can be timed at a size where memory bandwidth dominates. Weight values do not change
the speed. The tokenizer files are copied from a given folder (the benchmark uses random ids).

Usage: python3 bench/make_random_q4_model.py OUT llama1b|llama8b [TOKENIZER_FOLDER]
"""
import json
import os
import shutil
import sys

import mlx.core as mx

SHAPES = {
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
BITS, GROUP = 4, 64


def quantized(out_f, in_f):
    w = mx.random.normal((out_f, in_f)).astype(mx.bfloat16) * 0.02
    q, s, b = mx.quantize(w, group_size=GROUP, bits=BITS)
    return q, s, b


def main(out, shape, tok_dir=None):
    c = SHAPES[shape]
    os.makedirs(out, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, hidden_act="silu", torch_dtype="bfloat16",
               quantization=dict(group_size=GROUP, bits=BITS, mode="affine"), **c)
    cfg["quantization_config"] = cfg["quantization"]
    h, inter = c["hidden_size"], c["intermediate_size"]
    hd = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * hd
    mx.random.seed(0)
    weights = {}

    def put(prefix, out_f, in_f):
        q, s, b = quantized(out_f, in_f)
        weights[prefix + ".weight"], weights[prefix + ".scales"], weights[prefix + ".biases"] = q, s, b

    put("model.embed_tokens", c["vocab_size"], h)
    weights["model.norm.weight"] = mx.ones((h,), dtype=mx.bfloat16)
    if not c["tie_word_embeddings"]:
        put("lm_head", c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, (o, n) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                             "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                             "mlp.down_proj": (h, inter)}.items():
            put(f"{p}.{name}", o, n)
        weights[f"{p}.input_layernorm.weight"] = mx.ones((h,), dtype=mx.bfloat16)
        weights[f"{p}.post_attention_layernorm.weight"] = mx.ones((h,), dtype=mx.bfloat16)
        mx.eval(weights)
    mx.save_safetensors(os.path.join(out, "model.safetensors"), weights, metadata={"format": "mlx"})
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    if tok_dir:
        for f in ["tokenizer.json", "tokenizer_config.json"]:
            shutil.copy(os.path.join(tok_dir, f), out)


if __name__ == "__main__":
    main(*sys.argv[1:])
