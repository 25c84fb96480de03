#!/usr/bin/env python3
"""Writes a random-weight Llama-shaped model, 4-bit affine (group 64), in mlx's format, so wick
and mlx_lm can be timed at a size where memory bandwidth dominates. Weight values do not change
the speed. Needs only numpy (it runs on the GPU machine, which has no mlx unless carried): the
packed codes are random u32 words, scales and biases random bf16 values of a realistic size, and
the tokenizer is a word-level one over the whole vocabulary (benchmarks feed random ids).

Usage: python3 bench/make_random_q4_model.py OUT llama1b|llama8b
"""
import json
import os
import sys

import numpy as np

SHAPES = {
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
BITS, GROUP = 4, 64


def bf16(a):
    """float32 array -> its bf16 bit patterns (round to nearest even) as uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tensors(c):
    """(name, dtype, shape, maker) for every tensor, in file order."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * (h // c["num_attention_heads"])
    rng = np.random.default_rng(0)

    def qlinear(prefix, out_f, in_f):
        g = in_f // GROUP
        return [
            (prefix + ".weight", "U32", (out_f, in_f * BITS // 32),
             lambda: rng.integers(0, 2**32, (out_f, in_f * BITS // 32), dtype=np.uint32)),
            (prefix + ".scales", "BF16", (out_f, g), lambda: bf16(rng.uniform(0.002, 0.004, (out_f, g)))),
            (prefix + ".biases", "BF16", (out_f, g), lambda: bf16(rng.uniform(-0.03, -0.02, (out_f, g)))),
        ]

    def ones(name):
        return [(name, "BF16", (h,), lambda: bf16(np.ones(h)))]

    out = qlinear("model.embed_tokens", c["vocab_size"], h) + ones("model.norm.weight")
    if not c["tie_word_embeddings"]:
        out += qlinear("lm_head", c["vocab_size"], h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        for name, (o, n) in {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
                             "self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h),
                             "mlp.down_proj": (h, inter)}.items():
            out += qlinear(f"{p}.{name}", o, n)
        out += ones(f"{p}.input_layernorm.weight") + ones(f"{p}.post_attention_layernorm.weight")
    return out


def write_safetensors(path, items):
    """Streams tensors into one safetensors file (header first, then each tensor as it is made)."""
    size = {"U32": 4, "BF16": 2}
    header, off = {"__metadata__": {"format": "mlx"}}, 0
    for name, dt, shape, _ in items:
        n = int(np.prod(shape)) * size[dt]
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path + ".part", "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for _, _, _, make in items:
            f.write(make().tobytes())
    os.replace(path + ".part", path)


def main(out, shape):
    c = SHAPES[shape]
    os.makedirs(out, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, hidden_act="silu", torch_dtype="bfloat16",
               quantization=dict(group_size=GROUP, bits=BITS, mode="affine"), **c)
    cfg["quantization_config"] = cfg["quantization"]
    write_safetensors(os.path.join(out, "model.safetensors"), tensors(c))
    vocab = {f"t{i}": i for i in range(c["vocab_size"])}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
    json.dump(tok, open(os.path.join(out, "tokenizer.json"), "w"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t1", "bos_token": "t2", "unk_token": "t0"},
              open(os.path.join(out, "tokenizer_config.json"), "w"))
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[2] not in SHAPES:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
