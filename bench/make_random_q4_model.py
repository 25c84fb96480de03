#!/usr/bin/env python3
"""Writes a random-weight Llama-shaped or mixture-of-experts (qwen3_moe, gpt_oss) model, 4-bit
affine (group 64), in mlx's format, so wick and mlx_lm can be timed at a size where memory
bandwidth dominates. Weight values do not change
the speed. Needs only numpy (it runs on the GPU machine, which has no mlx unless carried): the
packed codes are random u32 words, scales and biases random bf16 values of a realistic size, and
the tokenizer is a word-level one over the whole vocabulary (benchmarks feed random ids).

Usage: python3 bench/make_random_q4_model.py OUT SHAPE [MODE]   (SHAPE: one of SHAPES below, or
deepseek_v2_lite_mla: DeepSeek-V2-Lite's shape in deepseek_v3's absorbed-MLA layout; MODE: affine
(default, 4-bit group 64) or one of mlx's float modes mxfp4 / nvfp4 / mxfp8 (u8 scales of a
realistic size, no biases))
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
    # mixtures of experts (mlx's stacked switch_mlp layout)
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, vocab_size=151936, tie_word_embeddings=False),
    "gpt_oss_20b": dict(model_type="gpt_oss", hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                        num_experts_per_tok=4, sliding_window=128, vocab_size=201088,
                        rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                          original_max_position_embeddings=4096)),
    # latent attention (#13): DeepSeek-V2-Lite as published (deepseek_v2: kv_b_proj, a per-head
    # cache) and the same shape as an absorbed-MLA model (deepseek_v3's layout: embed_q /
    # unembed_out, a latent cache)
    "deepseek_v2_lite": dict(model_type="deepseek_v2", hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                             routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                             qk_nope_head_dim=128, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                             num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, vocab_size=102400,
                             max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
                             rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                               beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
                             tie_word_embeddings=False),
    # a small latent-attention MoE for the CPU (deepseek_v3's layout)
    "mla_small": dict(model_type="deepseek_v3", hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=1,
                      n_routed_experts=16, routed_scaling_factor=1.0, kv_lora_rank=256, q_lora_rank=None,
                      qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, topk_method="noaux_tc", n_group=1,
                      topk_group=1, num_experts_per_tok=4, moe_layer_freq=1, first_k_dense_replace=1,
                      norm_topk_prob=True, vocab_size=32000, max_position_embeddings=163840, rms_norm_eps=1e-6,
                      rope_theta=10000.0, rope_scaling=None, tie_word_embeddings=False),
    # a small MoE for the CPU
    "moe_small": dict(model_type="qwen3_moe", hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[],
                      norm_topk_prob=True, vocab_size=32000, tie_word_embeddings=False),
}
BITS, GROUP = 4, 64
MODE = "affine"
# (group size, bits) of the float modes
FP_MODES = {"mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}


def bf16(a):
    """float32 array -> its bf16 bit patterns (round to nearest even) as uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def tensors(c):
    """(name, dtype, shape, maker) for every tensor, in file order."""
    h, inter = c["hidden_size"], c["intermediate_size"]
    hd = c.get("head_dim", h // c["num_attention_heads"])
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    rng = np.random.default_rng(0)
    # values do not change the speed: large tensors repeat one random block (fast to make)
    block = rng.integers(0, 2**32, 1 << 20, dtype=np.uint32)

    def words(shape):
        n = int(np.prod(shape))
        return np.resize(block, n).reshape(shape) if n > block.size else rng.integers(0, 2**32, shape, dtype=np.uint32)

    def qlinear(prefix, out_f, in_f, experts=None):
        g = in_f // GROUP
        lead = (experts,) if experts else ()
        if MODE in FP_MODES:
            gs, bits = FP_MODES[MODE]
            g, w = in_f // gs, lead + (out_f, in_f * bits // 32)
            # mxfp8 codes without E4M3's NaN (0x7f / 0xff); scales near 2^-8 (E8M0 119..121, or
            # E4M3 subnormals of nvfp4)
            mask = np.uint32(0x77777777 if MODE == "mxfp8" else 0xFFFFFFFF)
            lo, hi = (4, 12) if MODE == "nvfp4" else (119, 122)
            return [
                (prefix + ".weight", "U32", w, lambda: words(w) & mask),
                (prefix + ".scales", "U8", lead + (out_f, g), lambda: rng.integers(lo, hi, lead + (out_f, g), dtype=np.uint8)),
            ]
        return [
            (prefix + ".weight", "U32", lead + (out_f, in_f * BITS // 32), lambda: words(lead + (out_f, in_f * BITS // 32))),
            (prefix + ".scales", "BF16", lead + (out_f, g), lambda: bf16(rng.uniform(0.002, 0.004, lead + (out_f, g)))),
            (prefix + ".biases", "BF16", lead + (out_f, g), lambda: bf16(rng.uniform(-0.03, -0.02, lead + (out_f, g)))),
        ]

    def vec(name, n, lo=1.0, hi=1.0):
        return [(name, "BF16", (n,), lambda: bf16(rng.uniform(lo, hi, n)))]

    def ones(name):
        return vec(name, h)

    def attention(p, bias=False):
        out = []
        for name, (o, n) in {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}.items():
            out += qlinear(f"{p}.self_attn.{name}", o, n)
            if bias:
                out += vec(f"{p}.self_attn.{name}.bias", o, -0.01, 0.01)
        return out

    def experts(p, e, inter_e, bias=False):
        out = []
        for name, (o, n) in {"gate_proj": (inter_e, h), "up_proj": (inter_e, h), "down_proj": (h, inter_e)}.items():
            out += qlinear(f"{p}.{name}", o, n, e)
            if bias:
                out += [(f"{p}.{name}.bias", "BF16", (e, o), lambda o=o: bf16(rng.uniform(-0.01, 0.01, (e, o))))]
        return out

    mt = c.get("model_type", "llama")
    if mt in ("deepseek_v2", "deepseek_v3"):
        out = qlinear("model.embed_tokens", c["vocab_size"], h) + ones("model.norm.weight")
        out += qlinear("lm_head", c["vocab_size"], h)
        nh, r, dn, dr, dv = (c["num_attention_heads"], c["kv_lora_rank"], c["qk_nope_head_dim"], c["qk_rope_head_dim"],
                             c["v_head_dim"])
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            a = f"{p}.self_attn"
            out += ones(f"{p}.input_layernorm.weight") + ones(f"{p}.post_attention_layernorm.weight")
            out += qlinear(f"{a}.q_proj", nh * (dn + dr), h) + qlinear(f"{a}.kv_a_proj_with_mqa", r + dr, h)
            out += vec(f"{a}.kv_a_layernorm.weight", r)
            if mt == "deepseek_v2":
                out += qlinear(f"{a}.kv_b_proj", nh * (dn + dv), r)
            else:
                out += qlinear(f"{a}.embed_q", r, dn, nh) + qlinear(f"{a}.unembed_out", dv, r, nh)
            out += qlinear(f"{a}.o_proj", h, nh * dv)
            if i < c["first_k_dense_replace"]:
                for name, (o, n) in {"gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}.items():
                    out += qlinear(f"{p}.mlp.{name}", o, n)
                continue
            e, ie = c["n_routed_experts"], c["moe_intermediate_size"]
            out += [(f"{p}.mlp.gate.weight", "BF16", (e, h), lambda e=e: bf16(rng.normal(0, 0.02, (e, h))))]
            if mt == "deepseek_v3":
                out += vec(f"{p}.mlp.gate.e_score_correction_bias", e, -0.01, 0.01)
            out += experts(f"{p}.mlp.switch_mlp", e, ie)
            se = ie * c["n_shared_experts"]
            for name, (o, n) in {"gate_proj": (se, h), "up_proj": (se, h), "down_proj": (h, se)}.items():
                out += qlinear(f"{p}.mlp.shared_experts.{name}", o, n)
        return out
    if mt in ("qwen3_moe", "gpt_oss"):
        out = qlinear("model.embed_tokens", c["vocab_size"], h) + ones("model.norm.weight")
        out += qlinear("lm_head", c["vocab_size"], h)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            out += ones(f"{p}.input_layernorm.weight") + ones(f"{p}.post_attention_layernorm.weight")
            if mt == "qwen3_moe":
                out += attention(p) + vec(f"{p}.self_attn.q_norm.weight", hd) + vec(f"{p}.self_attn.k_norm.weight", hd)
                e = c["num_experts"]
                out += qlinear(f"{p}.mlp.gate", e, h)
                out += experts(f"{p}.mlp.switch_mlp", e, c["moe_intermediate_size"])
            else:
                out += attention(p, bias=True) + vec(f"{p}.self_attn.sinks", c["num_attention_heads"], -0.5, 0.5)
                e = c["num_local_experts"]
                out += qlinear(f"{p}.mlp.router", e, h) + vec(f"{p}.mlp.router.bias", e, -0.01, 0.01)
                out += experts(f"{p}.mlp.experts", e, inter, bias=True)
        return out

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
    size = {"U32": 4, "BF16": 2, "U8": 1}
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


def write_tokenizer(out, vocab_size):
    """A word-level tokenizer over the whole vocabulary (`t0` … `t{n-1}`) into `out`."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
           "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
           "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}}
    json.dump(tok, open(os.path.join(out, "tokenizer.json"), "w"))
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "t1", "bos_token": "t2", "unk_token": "t0"},
              open(os.path.join(out, "tokenizer_config.json"), "w"))


def main(out, shape):
    if shape == "deepseek_v2_lite_mla":
        c = dict(SHAPES["deepseek_v2_lite"], model_type="deepseek_v3", topk_method="noaux_tc", norm_topk_prob=False)
    else:
        c = SHAPES[shape]
    os.makedirs(out, exist_ok=True)
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=131072, hidden_act="silu", torch_dtype="bfloat16",
               quantization=dict(group_size=GROUP, bits=BITS, mode="affine"))
    if MODE in FP_MODES:
        gs, bits = FP_MODES[MODE]
        cfg["quantization"] = dict(group_size=gs, bits=bits, mode=MODE)
    cfg.update(c)
    cfg["quantization_config"] = cfg["quantization"]
    write_safetensors(os.path.join(out, "model.safetensors"), tensors(c))
    write_tokenizer(out, c["vocab_size"])
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"), indent=2)
    print("wrote", out)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[2] not in list(SHAPES) + ["deepseek_v2_lite_mla"]:
        sys.exit(__doc__)
    MODE = sys.argv[3] if len(sys.argv) == 4 else "affine"
    if MODE not in ["affine"] + list(FP_MODES):
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
