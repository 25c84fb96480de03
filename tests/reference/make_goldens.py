#!/usr/bin/env python3
"""Regenerates wick's golden files from mlx / mlx_lm (the oracle) on CPU.

Usage (from the repository root, after `models/fetch-default.sh`):
    pip install "mlx[cpu]" mlx-lm gguf numpy sentencepiece tokenizers
    python3 tests/reference/make_goldens.py [--only foundation|quant|gguf_tiny|...]

Writes tests/golden/*. Nothing here reads wick's outputs except the default model folder that
`wick convert --gguf` imported; that import is itself checked against the `gguf` package below.
"""
import argparse
import math
import re
import hashlib
import copy
import json
import os
import sys

# float32 matmuls in float32: mlx's CUDA backend otherwise uses TF32 tensor cores (about 5e-4
# relative error), which moves a training run's losses by percents (lora_run_default)
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct")
GGUF = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# Prompts: chat-templated (as mlx_lm.generate does by default) and raw. Chosen to cover ASCII,
# digits, code, whitespace runs and multi-byte UTF-8.
CHAT_PROMPTS = [
    ("What is the capital of France?", None),
    ("Write a haiku about the sea.", None),
    ("List three prime numbers greater than 100.", "You are a terse math tutor."),
    ("Translate 'good morning' into German and Japanese.", None),
]
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a café near Zürich, 42 travellers",
    "日本の首都は",
]
N_GREEDY = 32


def to_f32(model):
    """Computes in f32: float parameters (weights, scales, biases, norms) cast; packed ints kept."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))


def greedy(model, ids, n):
    from mlx_lm.generate import generate_step

    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=n):
        out.append(int(tok))
    return out


def last_logits(model, ids):
    logits = model(mx.array(ids)[None])
    return np.array(logits[0, -1].astype(mx.float32))


def prompt_ids(tok, prompt, system):
    """As mlx_lm.generate's main(): chat template with no added special tokens, else raw with them."""
    if system is not None or prompt in [p for p, _ in CHAT_PROMPTS]:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return text, tok.encode(text, add_special_tokens=False)
    return prompt, tok.encode(prompt, add_special_tokens=True)


def save_f32(path, arrays):
    mx.save_safetensors(path, {k: mx.array(v.astype(np.float32)) for k, v in arrays.items()})


def foundation():
    from mlx_lm import load

    model, tok = load(MODEL)
    to_f32(model)
    cases = []
    logits = {}
    for i, (prompt, system) in enumerate(CHAT_PROMPTS + [(p, None) for p in RAW_PROMPTS]):
        chat = i < len(CHAT_PROMPTS)
        text, ids = prompt_ids(tok, prompt, system) if chat else (prompt, tok.encode(prompt, add_special_tokens=True))
        toks = greedy(model, ids, N_GREEDY)
        cases.append({"prompt": prompt, "system_prompt": system, "chat": chat, "rendered": text,
                      "prompt_ids": ids, "greedy_f32": toks, "greedy_text": tok.decode(toks)})
        if i in (0, len(CHAT_PROMPTS)):
            logits[f"case{i}"] = last_logits(model, ids)
        print(f"[{i}] {prompt!r} -> {tok.decode(toks)!r}")
    json.dump({"model": "SmolLM2-135M-Instruct (imported from the Q4_1 GGUF, float16)", "dtype": "float32",
               "cases": cases}, open(os.path.join(GOLDEN, "smollm2_greedy.json"), "w"), indent=1, ensure_ascii=False)
    save_f32(os.path.join(GOLDEN, "smollm2_logits.safetensors"), logits)


def gguf_import():
    """Per-tensor sha256 of the GGUF's tensors dequantized by the `gguf` package, with llama.cpp's
    Q/K row permutation undone, cast to float16 — what `wick convert --gguf` must write."""
    import gguf
    from gguf.quants import dequantize

    r = gguf.GGUFReader(GGUF)
    f = r.fields
    heads = int(f["llama.attention.head_count"].contents())
    kv = int(f["llama.attention.head_count_kv"].contents())
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    per = {"attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
           "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
           "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
           "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
           "ffn_norm.weight": "post_attention_layernorm.weight"}

    def unpermute(w, n):
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    out = {}
    for t in r.tensors:
        if t.name in names:
            hf = names[t.name]
        else:
            _, i, rest = t.name.split(".", 2)
            hf = f"model.layers.{i}.{per[rest]}"
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        if t.name.endswith("attn_q.weight"):
            w = unpermute(w, heads)
        elif t.name.endswith("attn_k.weight"):
            w = unpermute(w, kv)
        w16 = np.ascontiguousarray(w.astype(np.float16))
        out[hf] = {"shape": list(w16.shape), "ggml_type": t.tensor_type.name,
                   "sha256_f16": hashlib.sha256(w16.tobytes()).hexdigest()}
    json.dump(out, open(os.path.join(GOLDEN, "gguf_import_f16.json"), "w"), indent=1, sort_keys=True)
    print(f"gguf import: {len(out)} tensors hashed")


TINY_CONFIGS = {
    # GQA, untied head, Llama-3 RoPE scaling, attention bias
    "tiny_llama3": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
                        rope_theta=500000.0, max_position_embeddings=256, tie_word_embeddings=False,
                        attention_bias=True,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
    # mistral model_type, tied embeddings, explicit head_dim, linear RoPE scaling, no GQA
    "tiny_mistral": dict(model_type="mistral", hidden_size=48, num_hidden_layers=3, intermediate_size=80,
                         num_attention_heads=3, num_key_value_heads=3, head_dim=32, rms_norm_eps=1e-6,
                         vocab_size=100, rope_theta=10000.0, max_position_embeddings=128,
                         tie_word_embeddings=True, rope_scaling=dict(type="linear", factor=2.0)),
    # sliding-window layers (a rotating cache of 8 positions) next to full ones; the window is
    # smaller than the prefill chunks, so windowed masks and cache trimming are both exercised
    "tiny_mistral_swa": dict(model_type="mistral", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
                             rope_theta=10000.0, max_position_embeddings=256, tie_word_embeddings=False,
                             sliding_window=8,
                             layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    # q/k/v biases, untied head
    "tiny_qwen2": dict(model_type="qwen2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128,
                       max_position_embeddings=256, rope_theta=1000000.0, tie_word_embeddings=False),
    # per-head q/k RMSNorm, explicit head_dim != hidden / heads, tied head, yarn RoPE
    "tiny_qwen3": dict(model_type="qwen3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6,
                       vocab_size=128, max_position_embeddings=256, rope_theta=1000000.0,
                       tie_word_embeddings=True,
                       rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32)),
    # dynamic NTK RoPE: the sequence (72) outgrows max_position_embeddings (32) while prefilling and decoding
    "tiny_llama_dynamic": dict(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                               num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=128,
                               rope_theta=10000.0, max_position_embeddings=32, tie_word_embeddings=True,
                               rope_scaling=dict(type="dynamic", factor=2.0)),
    # fused qkv and gate_up, longrope over half of each head
    "tiny_phi3": dict(model_type="phi3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
                      rope_theta=10000.0, partial_rotary_factor=0.5, max_position_embeddings=256,
                      original_max_position_embeddings=64, tie_word_embeddings=False,
                      rope_scaling=dict(type="longrope", short_factor=[1.0, 1.1, 1.3, 1.6],
                                        long_factor=[1.0, 1.5, 2.5, 4.0])),
    # sandwich norms, GELU, soft-capped scores and logits (small caps so they bite)
    "tiny_gemma2": dict(model_type="gemma2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                        vocab_size=128, rope_theta=10000.0, attn_logit_softcapping=2.0,
                        final_logit_softcapping=5.0, query_pre_attn_scalar=16.0),
    # Phi-2: parallel attention and MLP under one LayerNorm, rotary over 40% of each head, biases
    "tiny_phi": dict(model_type="phi", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                     num_attention_heads=4, num_key_value_heads=4, vocab_size=128, partial_rotary_factor=0.4,
                     layer_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256),
    # 4 experts, 2 per token, GQA; stacked (switch_mlp) experts, quantized ones in q4/
    "tiny_mixtral": dict(model_type="mixtral", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
                         num_local_experts=4, num_experts_per_tok=2, rope_theta=1000000.0,
                         tie_word_embeddings=False),
    # local (window 8) and global layers with their own RoPEs, q/k norms
    "tiny_gemma3": dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                        vocab_size=128, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        query_pre_attn_scalar=16.0, sliding_window=8, sliding_window_pattern=2,
                        max_position_embeddings=256, rope_scaling=dict(rope_type="linear", factor=4.0)),
    # Mixtures of experts: >= 8 experts, top-k >= 2, >= 2 MoE layers, each family's special parts
    # 8 experts top-2 + norm_topk_prob; decoder_sparse_step=2 and mlp_only_layers=[3]: MoE at 1,5, dense 0,2,3,4
    "tiny_qwen3_moe": dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=6, intermediate_size=96,
        moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=True,
        rms_norm_eps=1e-6, vocab_size=128, rope_theta=1000000.0, max_position_embeddings=256,
        tie_word_embeddings=False),
    # shared expert with sigmoid gate, q/k/v bias, no top-k renorm
    "tiny_qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        moe_intermediate_size=32, shared_expert_intermediate_size=48, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-6, vocab_size=128,
        rope_theta=1000000.0, tie_word_embeddings=False),
    # q/k RMSNorm over the whole projection, top-k renorm on
    "tiny_olmoe": dict(model_type="olmoe", hidden_size=64, num_hidden_layers=2, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        rms_norm_eps=1e-5, vocab_size=128, rope_theta=10000.0, max_position_embeddings=256,
        tie_word_embeddings=False),
    # sinks, alternating sliding(8)/full layers, yarn, biased router, clamped swiglu, expert biases
    "tiny_gpt_oss": dict(model_type="gpt_oss", hidden_size=64, num_hidden_layers=4, intermediate_size=32,
        head_dim=16, num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=8, rms_norm_eps=1e-5, vocab_size=128, rope_theta=150000,
        rope_scaling=dict(rope_type="yarn", factor=8.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                          original_max_position_embeddings=32),
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
    # sigmoid router + correction bias + group-limited top-k + scaling factor, shared expert, first layer dense,
    # partial rotary (half), q/k norm, qkv bias
    "tiny_glm4_moe": dict(model_type="glm4_moe", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
        moe_intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1, partial_rotary_factor=0.5,
        use_qk_norm=True, attention_bias=True, rms_norm_eps=1e-5, vocab_size=128, rope_theta=1000000.0,
        rope_scaling=None, max_position_embeddings=256, tie_word_embeddings=False),
    # multipliers (embedding, residual, attention scale, logits), fused input_linear, router 8-bit
    "tiny_granitemoe": dict(model_type="granitemoe", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        logits_scaling=4.0, attention_multiplier=0.05, embedding_multiplier=12.0, residual_multiplier=0.22,
        attention_bias=False, rms_norm_eps=1e-6, vocab_size=128, rope_theta=10000.0,
        max_position_embeddings=256, tie_word_embeddings=True),
    # layer 0 dense, 1..3 MoE (softmax in f32, renorm), shared expert, traditional rope, tied head
    "tiny_ernie4_5_moe": dict(model_type="ernie4_5_moe", hidden_size=64, num_hidden_layers=4,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
        rope_theta=500000.0, max_position_embeddings=256, use_bias=False, tie_word_embeddings=True,
        moe_num_experts=8, moe_k=2, moe_layer_start_index=1, moe_layer_end_index=3, moe_layer_interval=1,
        moe_intermediate_size=32, moe_num_shared_experts=1, moe_gate_act="softmax"),
    # sparsemixer routing (jitter 0.2 so the band is not a single expert), LayerNorm, biases, longrope
    "tiny_phimoe": dict(model_type="phimoe", hidden_size=64, num_hidden_layers=2, intermediate_size=32,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        router_jitter_noise=0.2, rms_norm_eps=1e-5, vocab_size=128, rope_theta=10000.0,
        max_position_embeddings=256, original_max_position_embeddings=32,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0],
                          long_factor=[1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0],
                          short_mscale=1.1, long_mscale=1.2)),
    # chunked attention (8) on layers 0,1,2; NoPE + temperature tuning on layer 3; MoE (top-1, sigmoid,
    # shared expert) on odd layers; llama3 rope (traditional); weightless q/k norm
    "tiny_llama4": dict(model_type="llama4", text_config=dict(model_type="llama4_text", hidden_size=64,
        num_hidden_layers=4, intermediate_size=32, intermediate_size_mlp=96, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=1,
        interleave_moe_layer_step=2, attention_chunk_size=8, attention_bias=False, use_qk_norm=True,
        rms_norm_eps=1e-5, vocab_size=128, rope_theta=500000.0, max_position_embeddings=256,
        attn_temperature_tuning=4, floor_scale=16, attn_scale=0.1,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32))),
    # every layer: dense GeGLU MLP + 8-expert MoE (top-2); sliding(8)/full (pattern 3), proportional rope on
    # full layers, k_eq_v full layers, 2 KV-shared layers (double-wide MLP), per-layer inputs, softcap
    "tiny_gemma4_moe": dict(model_type="gemma4_text", hidden_size=64, num_hidden_layers=6, intermediate_size=64,
        num_attention_heads=4, head_dim=16, global_head_dim=32, num_key_value_heads=2,
        num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, use_double_wide_mlp=True,
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
        sliding_window=8, sliding_window_pattern=3, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True),
    # gemma 4 without experts (the dense E2B / E4B shape): per-layer inputs, KV-shared layers
    # with double-wide MLPs, proportional RoPE on the global layers, tied head, soft-capped logits
    "tiny_gemma4": dict(model_type="gemma4_text", hidden_size=64, num_hidden_layers=6, intermediate_size=64,
        num_attention_heads=4, head_dim=16, global_head_dim=32, num_key_value_heads=2, num_kv_shared_layers=2,
        hidden_size_per_layer_input=16, vocab_size_per_layer_input=128, use_double_wide_mlp=True,
        sliding_window=8, sliding_window_pattern=3, final_logit_softcapping=3.0, rms_norm_eps=1e-6,
        vocab_size=128, max_position_embeddings=256, tie_word_embeddings=True),
    # dense llama4 text variant: NoPE layer 3, weightless q/k norm, untied "output" head
    "tiny_llama4_text": dict(model_type="llama4_text", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        intermediate_size_mlp=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rms_norm_eps=1e-5, vocab_size=128, rope_theta=500000.0, tie_word_embeddings=False,
        no_rope_layers=[1, 1, 1, 0], use_qk_norm=True),
    # SmolLM3: llama with a NoPE layer every 3rd layer (no_rope_layer_interval), GQA, untied
    "tiny_smollm3": dict(model_type="smollm3", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128, rope_theta=50000.0,
        max_position_embeddings=256, tie_word_embeddings=False, no_rope_layer_interval=3),
    # Granite (dense): embedding / attention / residual / logits multipliers, attention and MLP biases
    "tiny_granite": dict(model_type="granite", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128, logits_scaling=4.0,
        attention_multiplier=0.05, embedding_multiplier=12.0, residual_multiplier=0.22,
        max_position_embeddings=256, attention_bias=True, mlp_bias=True, rope_theta=10000.0,
        tie_word_embeddings=True),
    # Seed-OSS: llama with head_dim 32 != 64/4, q/k/v biases and the output projection's own bias
    # flag, MLP biases, untied (mlx_lm's tied head breaks once quantized)
    "tiny_seed_oss": dict(model_type="seed_oss", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, vocab_size=128,
        max_position_embeddings=256, rope_theta=10000000.0, attention_bias=True, attention_out_bias=True,
        mlp_bias=True, tie_word_embeddings=False),
    # Helium: traditional RoPE, q/k/v biases without an output bias, MLP biases
    "tiny_helium": dict(model_type="helium", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-8, vocab_size=128,
        attention_bias=True, mlp_bias=True, max_position_embeddings=256, rope_theta=100000.0,
        tie_word_embeddings=False),
    # InternLM3: qkv_bias (o too) and bias (MLP), dynamic NTK RoPE outgrown within 72 tokens
    "tiny_internlm3": dict(model_type="internlm3", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128, bias=True,
        qkv_bias=True, rope_theta=50000.0, max_position_embeddings=32, tie_word_embeddings=False,
        rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    # OLMo 2: post-norms only, q/k norms over the whole projections, q/k/v/o biases
    "tiny_olmo2": dict(model_type="olmo2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128,
        max_position_embeddings=256, rope_theta=500000.0, attention_bias=True, tie_word_embeddings=False),
    # OLMo 3: OLMo 2's layers, sliding(8)/full from layer_types (not the default pattern), yarn on
    # the full layer only
    "tiny_olmo3": dict(model_type="olmo3", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=128,
        max_position_embeddings=256, rope_theta=500000.0, attention_bias=True, tie_word_embeddings=False,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
                          beta_fast=32.0, beta_slow=1.0, attention_factor=1.2)),
    # EXAONE 4: post-norms, per-head q/k norms, pattern "LLG" wrapping over 4 layers: sliding(8)
    # llama3-scaled RoPE layers and a NoPE global layer
    "tiny_exaone4": dict(model_type="exaone4", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, vocab_size=128,
        max_position_embeddings=256, rope_theta=1000000.0, tie_word_embeddings=False, sliding_window=8,
        sliding_window_pattern="LLG",
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)),
    # GLM-4: sandwich norms under GLM's names, fused gate_up, partial (0.5) traditional RoPE
    # (the default), q/k/v biases, head_dim 32 != 64/4
    "tiny_glm4": dict(model_type="glm4", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5,
        attention_bias=True, rms_norm_eps=1e-5, vocab_size=128, rope_theta=10000.0,
        max_position_embeddings=256),
    # Cohere 2: parallel attention + MLP on a bias-free LayerNorm, sliding(8) traditional-RoPE
    # layers and NoPE global ones (pattern 2), tied head scaled by logit_scale
    "tiny_cohere2": dict(model_type="cohere2", hidden_size=64, head_dim=16, num_hidden_layers=4,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
        vocab_size=128, layer_norm_eps=1e-5, logit_scale=0.25, attention_bias=True, layer_norm_bias=False,
        sliding_window=8, sliding_window_pattern=2, max_position_embeddings=256),
    # StarCoder2: biased LayerNorms, biases everywhere, ungated exact-GELU MLP (c_fc, c_proj)
    "tiny_starcoder2": dict(model_type="starcoder2", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, norm_epsilon=1e-5, vocab_size=128, rope_theta=100000.0,
        max_position_embeddings=256, tie_word_embeddings=False),
    # Apertus: norms named attention_/feedforward_layernorm, per-head q/k norms, ungated xIELU MLP
    # (its learned scalars randomized), MLP biases, llama3 RoPE
    "tiny_apertus": dict(model_type="apertus", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128, mlp_bias=True,
        attention_bias=False, post_norm=False, qk_norm=True, tie_word_embeddings=False,
        max_position_embeddings=256, rope_theta=12000000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)),
    # Hunyuan dense: alpha-raised RoPE base, per-head q/k norms after RoPE, q/k/v/o biases,
    # head_dim 32 != 64/4, tied head
    "tiny_hunyuan_v1_dense": dict(model_type="hunyuan_v1_dense", hidden_size=64, num_hidden_layers=2,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5,
        vocab_size=128, rope_theta=10000.0, max_position_embeddings=256, attention_bias=True,
        use_qk_norm=True, tie_word_embeddings=True,
        rope_scaling=dict(alpha=1000.0, factor=1.0, type="dynamic", beta_fast=32, beta_slow=1, mscale=1.0,
                          mscale_all_dim=1.0)),
    # Ministral 3: llama with yarn RoPE from rope_parameters and Llama 4's position scaling of the
    # queries (original_max_position_embeddings 16: the scale steps at 16, 32, 48, 64), sliding(8)
    # layers from layer_types, head_dim 32 != 64/4, tied
    "tiny_ministral3": dict(model_type="ministral3", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, vocab_size=128,
        max_position_embeddings=256, tie_word_embeddings=True, sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        rope_parameters=dict(type="yarn", rope_type="yarn", rope_theta=1000000.0, factor=16.0,
            original_max_position_embeddings=16, max_position_embeddings=256, beta_fast=32.0, beta_slow=1.0,
            mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1)),
    # Mistral 3 (Ministral 3 layout): the ministral3 text model under language_model., untied by the
    # wrapper's default, vision config ignored
    "tiny_mistral3": dict(model_type="mistral3", image_token_index=10, spatial_merge_size=2,
        vision_config=dict(model_type="pixtral", hidden_size=16),
        text_config=dict(model_type="ministral3", hidden_size=64, num_hidden_layers=4, intermediate_size=96,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, vocab_size=128,
            max_position_embeddings=256, sliding_window=8,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters=dict(type="yarn", rope_type="yarn", rope_theta=1000000.0, factor=16.0,
                original_max_position_embeddings=16, max_position_embeddings=256, beta_fast=32.0,
                beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0, llama_4_scaling_beta=0.1))),
    # Mistral 3 (Mistral Small 3.1 layout): a `mistral` text model, the llama path
    "tiny_mistral3_llama": dict(model_type="mistral3", text_config=dict(model_type="mistral", hidden_size=64,
        num_hidden_layers=2, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        rms_norm_eps=1e-5, vocab_size=128, rope_theta=1000000000.0, max_position_embeddings=256)),
    # Gemma 3's multimodal wrapper: gemma3_text under language_model., heads 8 / kv 4 from the
    # wrapper's defaults, the text vocab_size (100) replaced by the top-level one
    "tiny_gemma3_vlm": dict(model_type="gemma3", vocab_size=128, mm_tokens_per_image=4,
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16),
        text_config=dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=3, intermediate_size=96,
            head_dim=16, rms_norm_eps=1e-6, vocab_size=100, rope_theta=1000000.0, rope_local_base_freq=10000.0,
            query_pre_attn_scalar=16.0, sliding_window=8, sliding_window_pattern=2, max_position_embeddings=256,
            rope_scaling=dict(rope_type="linear", factor=8.0))),
    # LFM2: gated short convolutions (kernel 3, all biases) around one attention layer (per-head
    # q/k norms, GQA) from layer_types; the MLP width auto-adjusted (2/3, x1.5, multiple of 16)
    "tiny_lfm2": dict(model_type="lfm2", vocab_size=128, hidden_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, norm_eps=1e-5,
        conv_bias=True, conv_L_cache=3, block_dim=64, block_ff_dim=128, block_multiple_of=16,
        block_ffn_dim_multiplier=1.5, block_auto_adjust_ff_dim=True, rope_theta=1000000.0,
        layer_types=["conv", "conv", "full_attention", "conv"]),
    # LFM2 from full_attn_idxs: attention first and last, kernel 4 without biases, the MLP width
    # as given, rope_theta from rope_parameters
    "tiny_lfm2_idxs": dict(model_type="lfm2", vocab_size=128, hidden_size=64, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, norm_eps=1e-6,
        conv_bias=False, conv_L_cache=4, block_dim=64, block_ff_dim=96, block_multiple_of=32,
        block_ffn_dim_multiplier=None, block_auto_adjust_ff_dim=False,
        rope_parameters=dict(rope_theta=10000.0), full_attn_idxs=[0, 4]),
    # Qwen3-Next: three Gated DeltaNet layers (2 key heads shared by 4 value heads, Dk != Dv,
    # kernel 4) then gated attention (GQA, q/k norms, RoPE over a quarter of each head); MoE with a
    # renormalized top-2 and a gated shared expert, a dense MLP in layer 1 (mlp_only_layers)
    "tiny_qwen3_next": dict(model_type="qwen3_next", hidden_size=64, num_hidden_layers=4,
        full_attention_interval=4, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, partial_rotary_factor=0.25, rope_theta=10000.0, max_position_embeddings=256,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
        mlp_only_layers=[1], moe_intermediate_size=32, shared_expert_intermediate_size=64,
        norm_topk_prob=True, rms_norm_eps=1e-6, vocab_size=128, tie_word_embeddings=False,
        attention_bias=False),
    # Qwen3-Next, held out: an attention layer every 2nd, as many value as key heads, kernel 3,
    # half-head RoPE, attention biases, MoE every 2nd layer without renormalization, tied head
    "tiny_qwen3_next_b": dict(model_type="qwen3_next", hidden_size=64, num_hidden_layers=6,
        full_attention_interval=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, partial_rotary_factor=0.5, rope_theta=100000.0, max_position_embeddings=256,
        linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=16,
        linear_conv_kernel_dim=3, num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2,
        mlp_only_layers=[], moe_intermediate_size=32, shared_expert_intermediate_size=32,
        norm_topk_prob=False, rms_norm_eps=1e-5, vocab_size=128, tie_word_embeddings=True,
        attention_bias=True),
    # Qwen3.5 (text of the multimodal checkpoint): Qwen3-Next's layers with the Gated DeltaNet's
    # projections apart, RoPE from rope_parameters (M-RoPE sections), dense MLPs
    "tiny_qwen3_5": dict(model_type="qwen3_5", tie_word_embeddings=False, text_config=dict(
        model_type="qwen3_5_text", hidden_size=64, num_hidden_layers=4, full_attention_interval=4,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        vocab_size=128, max_position_embeddings=256, linear_num_value_heads=4, linear_num_key_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4, tie_word_embeddings=False,
        attention_bias=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
        partial_rotary_factor=0.25, mrope_section=[1, 1, 0], mrope_interleaved=True))),
    # Qwen3.5-MoE: experts (renormalized top-2, gated shared expert) in every layer, an attention
    # layer every 2nd, tied head, theta and rotary share from rope_parameters
    "tiny_qwen3_5_moe": dict(model_type="qwen3_5_moe", tie_word_embeddings=True, text_config=dict(
        model_type="qwen3_5_moe_text", hidden_size=64, num_hidden_layers=4, full_attention_interval=2,
        intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=128, max_position_embeddings=256, linear_num_value_heads=4, linear_num_key_heads=4,
        linear_key_head_dim=8, linear_value_head_dim=16, linear_conv_kernel_dim=3, tie_word_embeddings=True,
        attention_bias=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, norm_topk_prob=True,
        rope_parameters=dict(rope_type="default", rope_theta=50000.0, partial_rotary_factor=0.5,
        mrope_section=[2, 1, 1], mrope_interleaved=True))),
    # Granite 4.0-H: three Mamba-2 layers (2 groups of 4 heads, conv bias, state 16) then RoPE
    # attention, granite's multipliers, experts (top-2 of 4 by softmaxed logits) plus a shared
    # MLP in every layer, tied head, mlx_lm's default step-size limits
    "tiny_granitemoehybrid": dict(model_type="granitemoehybrid", vocab_size=128, hidden_size=64,
        intermediate_size=32, num_hidden_layers=4, max_position_embeddings=256, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=False, embedding_multiplier=12.0, attention_multiplier=0.0078125,
        logits_scaling=8.0, residual_multiplier=0.22, layer_types=["mamba", "mamba", "mamba", "attention"],
        rms_norm_eps=1e-5, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=64,
        mamba_n_heads=8, mamba_d_head=8, mamba_proj_bias=False, mamba_d_state=16, mamba_d_conv=4,
        mamba_n_groups=2, mamba_conv_bias=True, position_embedding_type="rope", rope_theta=10000.0,
        tie_word_embeddings=True),
    # Granite 4.0-H dense, held out: attention first (NoPE) and in the middle, one group, projection
    # biases, kernel 3, dense MLP with biases, untied, explicit step-size limits
    "tiny_granitemoehybrid_dense": dict(model_type="granitemoehybrid", vocab_size=128, hidden_size=64,
        intermediate_size=96, num_hidden_layers=5, max_position_embeddings=256, num_attention_heads=4,
        num_key_value_heads=4, attention_bias=True, embedding_multiplier=6.0, attention_multiplier=0.125,
        logits_scaling=4.0, residual_multiplier=0.5, layer_types=["attention", "mamba", "attention", "mamba", "mamba"],
        rms_norm_eps=1e-6, num_local_experts=0, num_experts_per_tok=0, mamba_n_heads=4, mamba_d_head=16,
        mamba_proj_bias=True, mamba_d_state=8, mamba_d_conv=3, mamba_n_groups=1, mamba_conv_bias=False,
        mlp_bias=True, position_embedding_type="nope", time_step_limit=[0.01, 10.0], tie_word_embeddings=False),
    # Nemotron-H: attention (no positions) before the first Mamba-2 block (2 groups: a per-group
    # gated norm), a ReLU² MLP block, and an expert block with the grouped sigmoid router, its
    # correction bias, scaling, a latent projection and a shared expert
    "tiny_nemotron_h": dict(model_type="nemotron_h", vocab_size=128, hidden_size=64, intermediate_size=128,
        max_position_embeddings=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attention_bias=False, mamba_num_heads=8, mamba_head_dim=8, mamba_proj_bias=False, ssm_state_size=16,
        conv_kernel=4, n_groups=2, mlp_bias=False, layer_norm_epsilon=1e-5, use_bias=False, use_conv_bias=True,
        hybrid_override_pattern="*M-EM", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=64, n_shared_experts=1, moe_latent_size=32, n_group=2,
        topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5, time_step_limit=[0.0, 1000.0]),
    # Nemotron-H, held out: the pattern by block names starting with MLP blocks, one group, biases,
    # experts without groups, latent space or shared expert, default step-size limits
    "tiny_nemotron_h_b": dict(model_type="nemotron_h", vocab_size=128, hidden_size=64, intermediate_size=96,
        max_position_embeddings=256, num_attention_heads=4, num_key_value_heads=4, attention_bias=True,
        mamba_num_heads=4, mamba_head_dim=16, mamba_proj_bias=True, ssm_state_size=8, conv_kernel=3, n_groups=1,
        mlp_bias=True, layer_norm_epsilon=1e-6, use_bias=True, use_conv_bias=False,
        layers_block_type=["mlp", "mamba", "moe", "attention", "mamba", "mlp"], n_routed_experts=8,
        num_experts_per_tok=2, moe_intermediate_size=32, n_group=1, topk_group=1, norm_topk_prob=False,
        routed_scaling_factor=1.0),
    # MLA (latent cache, absorbed decode) with a low-rank query, yarn (mscale != mscale_all_dim), a
    # large eps (so the latent norms' fixed 1e-6 shows), DeepSeek-V3 routing (sigmoid + bias,
    # 2 of 4 groups, renormalized top-3), a shared expert, layer 0 dense
    "tiny_deepseek_v3": dict(model_type="deepseek_v3", vocab_size=128, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=3,
        moe_layer_freq=1, first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=0.05,
        rope_theta=10000.0, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
            beta_fast=32, beta_slow=1, mscale=0.9, mscale_all_dim=0.7),
        attention_bias=False, topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True),
    # DeepSeek-V3, held out: one q_proj, attention biases, plain RoPE, top-1 routing without groups
    # or renormalization, no shared expert, MoE every 2nd layer (kimi_k2 is remapped to it)
    "tiny_deepseek_v3_b": dict(model_type="kimi_k2", vocab_size=128, hidden_size=64, intermediate_size=64,
        moe_intermediate_size=32, num_hidden_layers=5, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=None, n_routed_experts=4, routed_scaling_factor=1.5, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=64, n_group=1, topk_group=1, num_experts_per_tok=1,
        moe_layer_freq=2, first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=50000.0, rope_scaling=None, attention_bias=True, topk_method="noaux_tc", norm_topk_prob=True),
    # DeepSeek-V2: no absorption (kv_b_proj, per-head cache), softmax routing limited to the 2 of 4
    # groups with the best max score, shared experts, always-yarn RoPE
    "tiny_deepseek_v2": dict(model_type="deepseek_v2", vocab_size=128, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=2, n_routed_experts=8, routed_scaling_factor=2.0, kv_lora_rank=64, q_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=3,
        moe_layer_freq=1, first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64,
            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
        attention_bias=False, topk_method="group_limited_greedy"),
    # DeepSeek-V2-Lite's layout, held out: one q_proj, plain top-k ("greedy"), factor-1 yarn
    "tiny_deepseek_v2_b": dict(model_type="deepseek_v2", vocab_size=128, hidden_size=64, intermediate_size=64,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, num_experts_per_tok=2,
        moe_layer_freq=1, first_k_dense_replace=0, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=dict(type="yarn", factor=1.0, original_max_position_embeddings=64),
        attention_bias=True, topk_method="greedy"),
    # Kimi K2.5: deepseek_v3's text model under language_model. (vision config ignored)
    "tiny_kimi_k25": dict(model_type="kimi_k25", vision_config=dict(hidden_size=16), text_config=dict(
        model_type="kimi_k2", vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.827, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1, num_experts_per_tok=2, moe_layer_freq=1,
        first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=50000.0,
        rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=16, beta_fast=1,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        topk_method="noaux_tc", norm_topk_prob=True, tie_word_embeddings=False)),
    # GLM-4.7-Flash: the latent norms at rms_norm_eps (large, so it shows), RoPE base 1e6 by default,
    # wide nope / v heads, groups, an MTP layer's config entry
    "tiny_glm4_moe_lite": dict(model_type="glm4_moe_lite", vocab_size=128, hidden_size=64,
        intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=1.8,
        kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=64, v_head_dim=64, n_group=2,
        topk_group=1, num_experts_per_tok=3, moe_layer_freq=1, first_k_dense_replace=1,
        max_position_embeddings=256, rms_norm_eps=0.05, rope_scaling=None, attention_bias=False,
        topk_method="noaux_tc", norm_topk_prob=True, num_nextn_predict_layers=1, partial_rotary_factor=1.0),
    # Mistral Small 4 (bare): rope_parameters yarn, position-scaled queries (original 8, so the
    # scale steps inside the prompt), softmax router as a linear layer with 2 of 4 groups
    "tiny_mistral4": dict(model_type="mistral4", vocab_size=128, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=32,
        qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, n_group=4, topk_group=2, num_experts_per_tok=3,
        first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=False,
        tie_word_embeddings=False, norm_topk_prob=True, rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
            original_max_position_embeddings=8, beta_fast=32.0, beta_slow=1.0, mscale=0.9,
            mscale_all_dim=0.7, llama_4_scaling_beta=0.1)),
    # Mistral 4 inside mistral3, held out: non-traditional RoPE, tied head, one q_proj, top-1
    # renormalized, no groups, MoE from layer 0
    "tiny_mistral3_mistral4": dict(model_type="mistral3", vision_config=dict(hidden_size=16), text_config=dict(
        model_type="mistral4", vocab_size=128, hidden_size=64, intermediate_size=64, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=None,
        n_routed_experts=4, routed_scaling_factor=1.0, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16,
        qk_nope_head_dim=32, v_head_dim=32, n_group=1, topk_group=1, num_experts_per_tok=1,
        first_k_dense_replace=0, max_position_embeddings=256, rms_norm_eps=1e-5, attention_bias=False,
        tie_word_embeddings=True, norm_topk_prob=True, rope_interleave=False,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0, original_max_position_embeddings=16,
            llama_4_scaling_beta=0.2))),
}

# Wrappers whose mlx_lm arguments fill defaults into the config they are given: their golden
# config.json is the config as written above, so that wick's own defaults are what fills it.
TINY_AS_WRITTEN = {"tiny_mistral3", "tiny_mistral3_llama", "tiny_mistral3_mistral4", "tiny_kimi_k25", "tiny_gemma3_vlm", "tiny_qwen3_5", "tiny_qwen3_5_moe"}

# Seeds whose routing gaps (the k-th vs the (k+1)-th router value over the 72 golden tokens) are
# at least 1e-4 in f32 and in the 4-bit model, so that rounding never flips an expert choice;
# the others use 7.
TINY_SEEDS = dict(tiny_qwen2_moe=9, tiny_ernie4_5_moe=9, tiny_phimoe=8, tiny_llama4=8, tiny_gemma4_moe=27)

NORM_WEIGHT = re.compile(r"norm(_\d+)?\.weight$")


def randomize(params):
    """Non-trivial norms, biases and the MoE parameters mlx_lm initializes to constants, so every
    weight matters: norm weights ~ 1 + 0.2 N, biases ~ 0.2 N."""
    for k in params:
        if NORM_WEIGHT.search(k) or k.endswith(".bias"):
            params[k] = mx.random.normal(params[k].shape) * 0.2 + (1.0 if "norm" in k else 0.0)
        elif k.endswith(("e_score_correction_bias", ".sinks")):
            params[k] = mx.random.normal(params[k].shape) * 0.2
        elif k.endswith(("act_fn.alpha_p", "act_fn.alpha_n", "act_fn.beta")):
            params[k] = params[k] + mx.random.normal(params[k].shape) * 0.3  # apertus's xIELU scalars
        elif k.endswith(("router.scale", "per_expert_scale", "layer_scalar")):
            params[k] = mx.random.normal(params[k].shape) * 0.2 + 1.0
        elif k.endswith(("mlp.gate.weight", "mixer.gate.weight")) and params[k].ndim == 2 and not mx.any(params[k]).item():
            params[k] = mx.random.normal(params[k].shape) * 0.125  # glm4_moe's, nemotron_h's routers start at zeros
    return params


def tiny_logits(model, ids):
    """Full-sequence logits, and logits of a chunked prefill (56 tokens in chunks of 24, 16, 16)
    followed by 16 one-token decode steps through the model's own cache."""
    from mlx_lm.models.cache import make_prompt_cache

    full = np.array(model(mx.array(ids)[None])[0])
    cache = make_prompt_cache(model)
    steps = []
    for a, b in TINY_CHUNKS:
        steps.append(np.array(model(mx.array(ids[a:b])[None], cache=cache)[0]))
    for t in range(TINY_CHUNKS[-1][1], len(ids)):
        steps.append(np.array(model(mx.array(ids[t:t + 1])[None], cache=cache)[0]))
    return {"full": full, "cached": np.concatenate(steps, axis=0)}


# Models whose experts are also written in mlx's mxfp4 mode (as gpt-oss ships): only the expert
# (switch) layers quantized, everything else float, under `mxfp4/`.
TINY_MXFP4 = ["tiny_gpt_oss"]


def tiny_mxfp4(model_class, args_class, cfg, params, d, ids):
    from mlx.utils import tree_flatten
    from mlx_lm.models.switch_layers import SwitchLinear
    from mlx_lm.utils import quantize_model

    model = model_class(args_class.from_dict(cfg))
    model.load_weights(list(params.items()))
    model, qcfg = quantize_model(model, cfg, None, None, mode="mxfp4",
                                 quant_predicate=lambda p, m: isinstance(m, SwitchLinear))
    md = os.path.join(d, "mxfp4")
    os.makedirs(md, exist_ok=True)
    mx.save_safetensors(os.path.join(md, "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    json.dump(qcfg, open(os.path.join(md, "config.json"), "w"), indent=1)
    to_f32(model)
    save_f32(os.path.join(md, "logits.safetensors"), tiny_logits(model, ids))
    json.dump(tiny_greedy(model, ids), open(os.path.join(md, "greedy.json"), "w"))


# Models also written by mlx_lm's quantize_model in its float modes (every layer it quantizes in
# that mode, the architecture's own predicate kept: e.g. qwen3_moe's router at affine 8 bits),
# from the float16 weights, under `<mode>/` (`nvfp4_global/`: nvfp4 with one global scale per
# expert on the switch layers, mlx_lm's `global_scale=True`).
TINY_MODES = {
    "tiny_qwen3": ["mxfp4", "nvfp4", "mxfp8"],
    "tiny_qwen3_moe": ["mxfp4", "nvfp4", "mxfp8", "nvfp4_global"],
    "tiny_gpt_oss": ["nvfp4", "mxfp8"],
    "tiny_deepseek_v3": ["mxfp4"],
}


def tiny_mode(model_class, args_class, cfg, params, d, ids, folder):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    mode, global_scale = folder.split("_")[0], folder.endswith("_global")
    model = model_class(args_class.from_dict(cfg))
    model.load_weights(list(params.items()))
    model, qcfg = quantize_model(model, cfg, None, None, mode=mode, global_scale=global_scale)
    md = os.path.join(d, folder)
    os.makedirs(md, exist_ok=True)
    mx.save_safetensors(os.path.join(md, "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    json.dump(qcfg, open(os.path.join(md, "config.json"), "w"), indent=1)
    if global_scale:
        # mlx's gather_qmm takes a global scale on the GPU only: the reference runs the experts
        # dequantized by mx.dequantize (each with its global scale, which the CPU does take)
        dequantize_global_experts(model)
    to_f32(model)
    save_f32(os.path.join(md, "logits.safetensors"), tiny_logits(model, ids))
    json.dump(tiny_greedy(model, ids), open(os.path.join(md, "greedy.json"), "w"))


def dequantize_global_experts(model):
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, QuantizedSwitchLinear) and m.global_scale is not None:
            w = mx.stack([mx.dequantize(m.weight[e], m.scales[e], None, group_size=m.group_size, bits=m.bits,
                                        mode=m.mode, global_scale=m.global_scale[e])
                          for e in range(m.weight.shape[0])])
            lin = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in m)
            lin.weight = w
            if "bias" in m:
                lin.bias = m.bias
            swaps.append((name, lin))
    model.update_modules(__import__("mlx.utils", fromlist=["tree_unflatten"]).tree_unflatten(swaps))


def tiny_greedy(model, ids):
    """32 greedy tokens after the first 8 golden ids, by mlx_lm's generate_step (f32)."""
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(ids[:TINY_GREEDY_PROMPT]), model, max_tokens=TINY_GREEDY_TOKENS)
    return {"prompt": ids[:TINY_GREEDY_PROMPT], "tokens": [int(t) for t, _ in steps]}


TINY_GREEDY_PROMPT = 8
TINY_GREEDY_TOKENS = 32
TINY_CHUNKS = [(0, 24), (24, 40), (40, 56)]
TINY_LEN = 72
TINY_Q = dict(group_size=32, bits=4)


def tiny_models():
    """Tiny random models of every architecture, made by mlx_lm from TINY_CONFIGS: weights
    (float16), logits in f32 for 72 tokens (whole sequence; chunked prefill + 16 decode steps),
    and the same for the model quantized by mlx_lm (4-bit, group 32) under `q4/`."""
    from mlx_lm.utils import _get_classes, quantize_model
    from mlx.utils import tree_flatten

    for name, cfg in TINY_CONFIGS.items():
        if ONLY_NAMES and name not in ONLY_NAMES:
            continue
        mx.random.seed(TINY_SEEDS.get(name, 7))
        written = copy.deepcopy(cfg) if name in TINY_AS_WRITTEN else cfg
        model_class, args_class = _get_classes(cfg)
        model = model_class(args_class.from_dict(cfg))
        params = randomize(dict(tree_flatten(model.parameters())))
        model.load_weights(list(params.items()))
        # Store weights in float16 (small); compute in float32 on both sides.
        params = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
        d = os.path.join(GOLDEN, name)
        os.makedirs(d, exist_ok=True)
        mx.save_safetensors(os.path.join(d, "model.safetensors"), params, metadata={"format": "mlx"})
        json.dump(written, open(os.path.join(d, "config.json"), "w"), indent=1)
        model.load_weights([(k, v.astype(mx.float32)) for k, v in params.items()])
        rng = np.random.default_rng(3)
        vocab = cfg.get("vocab_size") or cfg["text_config"]["vocab_size"]
        ids = rng.integers(0, vocab, size=TINY_LEN).tolist()
        save_f32(os.path.join(d, "logits.safetensors"), tiny_logits(model, ids))
        json.dump({"ids": ids, "chunks": TINY_CHUNKS}, open(os.path.join(d, "inputs.json"), "w"))
        json.dump(tiny_greedy(model, ids), open(os.path.join(d, "greedy.json"), "w"))

        # 4-bit: quantized by mlx_lm from the float16 weights, run in f32 (scales cast up)
        model.load_weights(list(params.items()))
        model, qcfg = quantize_model(model, cfg, **TINY_Q)
        qd = os.path.join(d, "q4")
        os.makedirs(qd, exist_ok=True)
        mx.save_safetensors(os.path.join(qd, "model.safetensors"), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        json.dump(qcfg, open(os.path.join(qd, "config.json"), "w"), indent=1)
        to_f32(model)
        save_f32(os.path.join(qd, "logits.safetensors"), tiny_logits(model, ids))
        json.dump(tiny_greedy(model, ids), open(os.path.join(qd, "greedy.json"), "w"))
        if name in TINY_MXFP4:
            tiny_mxfp4(model_class, args_class, cfg, params, d, ids)
        for folder in TINY_MODES.get(name, []):
            tiny_mode(model_class, args_class, cfg, params, d, ids, folder)
        print(f"{name}: {sum(v.size for v in params.values())} params")


def raw_bytes(a):
    """The bytes of an mx array as stored (bf16 through a uint16 view)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.array(a).tobytes()


def sha(a):
    return hashlib.sha256(raw_bytes(a)).hexdigest()


QUANT_INPUT_SHAPES = [(16, 384), (12, 640)]


def quant_vectors():
    """mx.quantize / mx.dequantize on random matrices of three dtypes, every bits x group size."""
    rng = np.random.default_rng(11)
    inputs, cases = {}, []
    for dt in ["float32", "float16", "bfloat16"]:
        for si, (r, c) in enumerate(QUANT_INPUT_SHAPES):
            w = (rng.standard_normal((r, c)) * rng.uniform(0.01, 2.0)).astype(np.float32)
            w[0, :] = 0.0  # an all-zero row
            w[1, :] = 0.5  # a constant row
            w[2, :64] = rng.uniform(-3.0, -1.0, 64)  # groups with no positive value
            w[3, :] += 40.0  # large offset
            wm = mx.array(w).astype(getattr(mx, dt))
            name = f"{dt}_{si}"
            inputs[name] = wm
            for bits in [2, 3, 4, 5, 6, 8]:
                for gs in [32, 64, 128]:
                    q, sc, bi = mx.quantize(wm, group_size=gs, bits=bits)
                    deq = mx.dequantize(q, sc, bi, group_size=gs, bits=bits)
                    cases.append({"input": name, "bits": bits, "group_size": gs,
                                  "packed_shape": list(q.shape), "packed_sha256": sha(q),
                                  "packed_head": np.array(q).reshape(-1)[:4].tolist(),
                                  "scales_sha256": sha(sc), "biases_sha256": sha(bi),
                                  "dequantized_sha256": sha(deq)})
    mx.save_safetensors(os.path.join(GOLDEN, "quant_inputs.safetensors"), inputs)
    json.dump({"mlx_version": mx.__version__, "cases": cases},
              open(os.path.join(GOLDEN, "quant_vectors.json"), "w"), indent=1)
    print(f"quant vectors: {len(cases)} cases")


QUANT_MODE_DTYPES = ["float32", "float16", "bfloat16"]


def quant_mode_inputs(rng, dt):
    """Matrices that reach every rule of mlx's float modes: normal values at scales from 1e-3 to
    1e3, a per-group log-uniform scale, values on the E2M1 grid times powers of two (exact ties),
    and rows of zeros, -0.0, E2M1 / E4M3 ties, maxima one ulp around 6·2^k and 448·2^k, and
    magnitudes near the dtype's limits."""
    big, small = (1e4, 1e-6) if dt == "float16" else (1e30, 1e-30)
    out = {}
    w = rng.standard_normal((16, 256)).astype(np.float32)
    w *= np.array([1e-3, 1e-2, 1.0, 1e2, 1e3, 1.0, 1.0, 1.0] * 2, dtype=np.float32)[:, None]
    w[5] = 0.0
    w[6] = -0.0
    grid = np.array([0, .25, .5, .75, 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, -.25, -.75, -2.5, -5, -6], np.float32)
    w[7] = np.resize(grid, 256) * 2.0 ** rng.integers(-3, 4, 256)
    w[8] = np.resize(np.array([448, 1.0625, 1.1875, -3 * 2.0 ** -10, 2.0 ** -10, 240, 232], np.float32), 256)
    w[9] = np.resize(np.array([6 * 32, np.nextafter(np.float32(6 * 32), np.float32(1e9)), 1, -2], np.float32), 256)
    w[10] = rng.standard_normal(256) * big
    w[11] = rng.standard_normal(256) * small
    w[12] = rng.standard_normal(256) * np.repeat(10.0 ** rng.uniform(-3, 3, 16), 16)
    out["mixed"] = w
    out["normal"] = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    return out


def quant_modes():
    """mx.quantize / mx.dequantize in the float modes (mxfp4, nvfp4 with and without a global
    scale, mxfp8) on matrices of three dtypes, dequantized into three dtypes; and mlx's refusal
    for every mode × group size × bits it does not allow."""
    rng = np.random.default_rng(23)
    inputs, cases = {}, []
    for dt in QUANT_MODE_DTYPES:
        for key, w in quant_mode_inputs(rng, dt).items():
            wm = mx.array(w).astype(getattr(mx, dt))
            name = f"{dt}_{key}"
            inputs[name] = wm
            for mode, gs, bits in [("mxfp4", 32, 4), ("nvfp4", 16, 4), ("mxfp8", 32, 8), ("nvfp4_global", 16, 4)]:
                kw = {}
                if mode == "nvfp4_global":
                    kw["global_scale"] = mx.max(mx.abs(wm)).astype(mx.float32)
                m = mode.split("_")[0]
                q, sc = mx.quantize(wm, group_size=gs, bits=bits, mode=m, **kw)
                case = {"input": name, "mode": mode, "packed_sha256": sha(q), "scales_sha256": sha(sc),
                        "packed_head": np.array(q).reshape(-1)[:4].tolist(),
                        "scales_head": np.array(sc).reshape(-1)[:8].tolist()}
                if kw:
                    case["global_scale"] = float(kw["global_scale"].item())
                for odt in QUANT_MODE_DTYPES:
                    deq = mx.dequantize(q, sc, None, group_size=gs, bits=bits, mode=m, dtype=getattr(mx, odt), **kw)
                    case[f"dequantized_{odt}_sha256"] = sha(deq)
                    case[f"dequantized_{odt}_dtype"] = str(deq.dtype)
                cases.append(case)
    errors = []
    w = mx.zeros((4, 128))
    for mode in ["affine", "mxfp4", "nvfp4", "mxfp8"]:
        for gs in [16, 32, 64, 128]:
            for bits in [2, 3, 4, 5, 6, 7, 8]:
                try:
                    mx.quantize(w, group_size=gs, bits=bits, mode=mode)
                except ValueError as e:
                    errors.append({"mode": mode, "group_size": gs, "bits": bits, "error": str(e)})
    mx.save_safetensors(os.path.join(GOLDEN, "quant_modes_inputs.safetensors"), inputs)
    json.dump({"mlx_version": mx.__version__, "cases": cases, "errors": errors},
              open(os.path.join(GOLDEN, "quant_modes.json"), "w"), indent=1)
    print(f"quant modes: {len(cases)} cases, {len(errors)} refusals")


QUANT_MODE_MODELS = ["mxfp4", "nvfp4", "mxfp8"]


def quant_mode_models():
    """mlx_lm.convert -q --q-mode of the default model in each float mode: per-tensor hashes, the
    quantization block, and greedy tokens (f32 activations) on the golden prompts."""
    import shutil
    import tempfile

    from mlx_lm import convert, load

    g = json.load(open(os.path.join(GOLDEN, "smollm2_greedy.json")))
    out = {}
    tmp = tempfile.mkdtemp()
    for mode in QUANT_MODE_MODELS:
        path = os.path.join(tmp, mode)
        convert(MODEL, path, quantize=True, q_mode=mode)
        weights = mx.load(os.path.join(path, "model.safetensors"))
        cfg = json.load(open(os.path.join(path, "config.json")))
        model, tok = load(path)
        to_f32(model)
        out[mode] = {"convert_args": {"q_mode": mode}, "quantization": cfg["quantization"],
                     "quantization_config": cfg.get("quantization_config"),
                     "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": sha(v)}
                                 for k, v in sorted(weights.items())},
                     "greedy_f32": [greedy(model, c["prompt_ids"], N_GREEDY) for c in g["cases"]]}
        print(mode, [tok.decode(t) for t in out[mode]["greedy_f32"][:2]])
    shutil.rmtree(tmp)
    json.dump(out, open(os.path.join(GOLDEN, "smollm2_quantized_modes.json"), "w"), indent=1)


QUANT_MODELS = {
    "q4g64": dict(q_bits=4, q_group_size=64),
    "q8g64": dict(q_bits=8, q_group_size=64),
    "mixed_3_6": dict(q_group_size=64, quant_predicate="mixed_3_6"),
    "q3g32_bf16": dict(q_bits=3, q_group_size=32, dtype="bfloat16"),
}


def quant_models():
    """mlx_lm.convert -q of the default model: per-tensor hashes of the output, its quantization
    block, and greedy tokens (computed in f32) on the golden prompts for 4- and 8-bit."""
    import shutil
    import tempfile

    from mlx_lm import convert, load

    g = json.load(open(os.path.join(GOLDEN, "smollm2_greedy.json")))
    out = {}
    tmp = tempfile.mkdtemp()
    for name, kw in QUANT_MODELS.items():
        path = os.path.join(tmp, name)
        convert(MODEL, path, quantize=True, **kw)
        weights = mx.load(os.path.join(path, "model.safetensors"))
        cfg = json.load(open(os.path.join(path, "config.json")))
        entry = {"convert_args": kw, "quantization": cfg["quantization"],
                 "quantization_config": cfg.get("quantization_config"),
                 "tensors": {k: {"dtype": str(v.dtype), "shape": list(v.shape), "sha256": sha(v)}
                             for k, v in sorted(weights.items())}}
        if name in ("q4g64", "q8g64"):
            model, tok = load(path)
            to_f32(model)
            entry["greedy_f32"] = [greedy(model, c["prompt_ids"], N_GREEDY) for c in g["cases"]]
            print(name, [tok.decode(t) for t in entry["greedy_f32"][:2]])
        out[name] = entry
    shutil.rmtree(tmp)
    json.dump(out, open(os.path.join(GOLDEN, "smollm2_quantized.json"), "w"), indent=1)


MAX_KV = [
    # (prompt index in smollm2_greedy.json or a raw text, max_kv_size, prefill_step_size)
    (0, 24, 2048),
    ("In the beginning the Universe was created. This has made a lot of people very angry and been "
     "widely regarded as a bad move. Many races believe that it was created by some sort of god, "
     "though the Jatravartid people of Viltvodle VI believe that the entire Universe was in fact "
     "sneezed out of the nose of a being called the Great Green Arkleseizure.", 40, 2048),
    ("In the beginning the Universe was created. This has made a lot of people very angry and been "
     "widely regarded as a bad move. Many races believe that it was created by some sort of god, "
     "though the Jatravartid people of Viltvodle VI believe that the entire Universe was in fact "
     "sneezed out of the nose of a being called the Great Green Arkleseizure.", 40, 16),
]
N_MAX_KV = 48


def max_kv():
    """Greedy tokens on the default model with a rotating cache of `max_kv_size` positions, as
    `make_prompt_cache(model, max_kv_size)` builds it for models without their own `make_cache`
    (RotatingKVCache(max_size, keep=4)). mlx_lm 0.32's llama defines `make_cache`, so its
    `--max-kv-size` flag is ignored for llama; the caches are built here directly."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import RotatingKVCache

    model, tok = load(MODEL)
    to_f32(model)
    g = json.load(open(os.path.join(GOLDEN, "smollm2_greedy.json")))
    cases = []
    for prompt, size, step in MAX_KV:
        ids = g["cases"][prompt]["prompt_ids"] if isinstance(prompt, int) else tok.encode(prompt)
        runs = {}
        for kind, cache in [("rotating", [RotatingKVCache(max_size=size, keep=4) for _ in model.layers]),
                            ("full", None)]:
            runs[kind] = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=N_MAX_KV,
                                                           prompt_cache=cache, prefill_step_size=step)]
        cases.append({"prompt_ids": ids, "max_kv_size": size, "prefill_step_size": step,
                      "greedy_f32": runs["rotating"], "greedy_f32_full_cache": runs["full"]})
        print(f"max_kv {size}/{step}: {len(ids)} prompt tokens -> {tok.decode(runs['rotating'])!r}")
    json.dump({"keep": 4, "cases": cases}, open(os.path.join(GOLDEN, "smollm2_max_kv.json"), "w"), indent=1)


CHAT_TURNS = ["What is the capital of France?", "And of Germany?", "r", "Name a color.", "Why that one?"]
N_CHAT = 24


def chat():
    """mlx_lm.chat's loop without its UI: one prompt cache for the session, each turn the
    template applied to the new user message only, `r` a fresh cache; greedy, f32."""
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = load(MODEL)
    to_f32(model)
    cache = make_prompt_cache(model)
    turns = []
    for q in CHAT_TURNS:
        if q == "r":
            cache = make_prompt_cache(model)
            turns.append({"query": q})
            continue
        prompt = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
        out = [r for r in stream_generate(model, tok, prompt, max_tokens=N_CHAT, prompt_cache=cache)]
        toks = [r.token for r in out if r.token not in tok.eos_token_ids]
        turns.append({"query": q, "prompt_ids": list(prompt), "tokens": toks, "text": tok.decode(toks),
                      "finish_reason": out[-1].finish_reason, "cache_offset_after": cache[0].offset})
        print(f"chat {q!r} -> {tok.decode(toks)!r} ({out[-1].finish_reason})")
    json.dump({"max_tokens": N_CHAT, "turns": turns}, open(os.path.join(GOLDEN, "smollm2_chat.json"), "w"),
              indent=1, ensure_ascii=False)


def sampling():
    """mlx_lm's samplers and logits processors on fixed logits: the filtered log-probabilities
    (-inf where a token is removed) and the processed logits."""
    from mlx_lm.sample_utils import (apply_min_p, apply_top_k, apply_top_p, apply_xtc,
                                     make_logits_processors)

    rng = np.random.default_rng(5)
    logits = (rng.standard_normal(64) * 2.0).astype(np.float32)
    logits[9] = 4.0  # a clear favourite
    tokens = [3, 7, 7, 12, 3, 40, 7, 5, 22, 12, 9]
    x = mx.array(logits)[None]
    lp = x - mx.logsumexp(x, axis=-1, keepdims=True)
    out = {"logits": logits.tolist(), "tokens": tokens, "filters": [], "processors": []}
    filters = [
        ("top_p", {"top_p": 0.9}, lambda v: apply_top_p(v, 0.9)),
        ("top_p", {"top_p": 0.5}, lambda v: apply_top_p(v, 0.5)),
        ("min_p", {"min_p": 0.05, "keep": 1}, lambda v: apply_min_p(v, 0.05, 1)),
        ("min_p", {"min_p": 0.3, "keep": 4}, lambda v: apply_min_p(v, 0.3, 4)),
        ("top_k", {"k": 5}, lambda v: apply_top_k(v, 5)),
        ("xtc", {"threshold": 0.02, "special": [5]}, lambda v: apply_xtc(v, 1.0, 0.02, [5])),
        ("xtc", {"threshold": 0.45, "special": []}, lambda v: apply_xtc(v, 1.0, 0.45, [])),
    ]
    for name, args, f in filters:
        r = np.array(f(lp)[0])
        out["filters"].append({"name": name, "args": args, "logprobs": [None if not np.isfinite(v) else float(v) for v in r]})
    procs = [
        {"logit_bias": {3: 2.5, 10: -1.0}},
        {"repetition_penalty": 1.3, "repetition_context_size": 6},
        {"presence_penalty": 0.7, "presence_context_size": 6},
        {"frequency_penalty": 0.4, "frequency_context_size": 8},
        {"logit_bias": {7: 1.0}, "repetition_penalty": 1.5, "repetition_context_size": 20,
         "presence_penalty": 0.2, "frequency_penalty": 0.3},
    ]
    for kw in procs:
        y = mx.array(logits)[None]  # a fresh array: some processors assign into their input
        for p in make_logits_processors(**kw):
            y = p(mx.array(tokens), y)
        out["processors"].append({"args": {k: ({str(a): b for a, b in v.items()} if isinstance(v, dict) else v)
                                           for k, v in kw.items()}, "logits": np.array(y[0]).tolist()})
    json.dump(out, open(os.path.join(GOLDEN, "sampling.json"), "w"), indent=1)
    print(f"sampling: {len(out['filters'])} filters, {len(out['processors'])} processor sets")


# (bits, group size, quantized_kv_start). 4-bit caches are left out: a 4-bit code flips when a
# key sits near a rounding boundary, so f32 keys that differ in the last bit (another summation
# order) can change the tokens without any near tie; 8 bits keep the same noise below that.
KV_QUANT = [(8, 64, 0), (8, 32, 20)]
CACHED_PROMPT = "Answer in one short sentence. "
CACHED_QUERY = "What colour is the sky on a clear day?"
PPL_TEXT = os.path.join(ROOT, "tests", "data", "perplexity.txt")
PPL_SEQ = 256
N_GEN = 24


GENERATION = os.path.join(GOLDEN, "smollm2_generation.json")


def update_generation(key, value):
    """smollm2_generation.json holds one entry per job below; each job rewrites only its own."""
    out = json.load(open(GENERATION)) if os.path.exists(GENERATION) else {}
    out = {k: v for k, v in out.items() if k in ("kv_quant", "prompt_cache", "perplexity")}
    out[key] = value
    json.dump(out, open(GENERATION, "w"), indent=1, ensure_ascii=False)


def kv_quant():
    """Greedy tokens on the default model (f32) with a quantized KV cache for every golden
    prompt, with mlx_lm's top-2 log-probability margins (near ties)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model, tok = load(MODEL)
    to_f32(model)
    g = json.load(open(os.path.join(GOLDEN, "smollm2_greedy.json")))
    out = {"runs": [], "n_greedy": N_GREEDY}
    for bits, group, start in KV_QUANT:
        runs, margins = [], []
        for case in g["cases"]:
            steps = list(generate_step(mx.array(case["prompt_ids"]), model, max_tokens=N_GREEDY,
                                       kv_bits=bits, kv_group_size=group, quantized_kv_start=start))
            runs.append([int(t) for t, _ in steps])
            # how far the chosen token's log-probability is ahead of the runner-up: a near tie
            # may go either way under a different (equally exact) summation order
            margins.append([round(float(d), 5) for d in (mx.sort(lp)[-1] - mx.sort(lp)[-2] for _, lp in steps)])
        same = sum(r == c["greedy_f32"] for r, c in zip(runs, g["cases"]))
        print(f"kv_bits {bits} g{group} start {start}: {same}/{len(runs)} equal to the float cache")
        out["runs"].append({"bits": bits, "group_size": group, "quantized_kv_start": start, "greedy_f32": runs,
                            "top2_margin": margins})
    update_generation("kv_quant", out)


def prompt_cache():
    """A prompt cache file written by mlx_lm (as mlx_lm.cache_prompt builds it, stored in
    float16 and cut to its length to stay small) and mlx_lm.generate's tokens when continuing it
    with a query (default model, f32)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    model, tok = load(MODEL)
    to_f32(model)
    # mlx_lm.cache_prompt: the prompt as an open user message, processed with max_tokens=0
    rel_model = os.path.relpath(MODEL, ROOT)
    ids = tok.apply_chat_template([{"role": "user", "content": CACHED_PROMPT}], add_generation_prompt=False,
                                  continue_final_message=True)
    cache = make_prompt_cache(model)
    for _ in generate_step(mx.array(ids), model, max_tokens=0, prompt_cache=cache):
        pass
    for c in cache:
        c.keys = c.keys[..., : c.offset, :].astype(mx.float16)
        c.values = c.values[..., : c.offset, :].astype(mx.float16)
    path = os.path.join(GOLDEN, "smollm2_prompt_cache.safetensors")
    save_prompt_cache(path, cache, {"model": rel_model, "tokenizer_config": json.dumps({"trust_remote_code": False})})
    # mlx_lm.generate --prompt-cache-file: the query is the rest of the user message
    cache, meta = load_prompt_cache(path, return_metadata=True)
    messages = [{"role": "user", "content": CACHED_QUERY}]
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages[-1]["content"] = "<query>"
    test = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    query_ids = tok.encode(full[test.index("<query>"):], add_special_tokens=False)
    toks = [int(t) for t, _ in generate_step(mx.array(query_ids), model, max_tokens=N_GEN, prompt_cache=cache)]
    update_generation("prompt_cache", {"file": os.path.basename(path), "model": rel_model, "prompt": CACHED_PROMPT,
                                       "cached_ids": ids, "query": CACHED_QUERY, "query_ids": query_ids,
                                       "greedy_f32": toks, "text": tok.decode(toks)})
    print(f"prompt cache: {len(ids)} cached + {len(query_ids)} query tokens -> {tok.decode(toks)!r}")


def perplexity():
    """mlx_lm.perplexity's eval_ppl on one text record (default model, f32): encode, append eos,
    rows of PPL_SEQ tokens."""
    from mlx_lm import load
    from mlx_lm.perplexity import eval_ppl

    model, tok = load(MODEL)
    to_f32(model)

    text = open(PPL_TEXT, encoding="utf-8").read()
    data = tok.encode(text)
    if data[-1] != tok.eos_token_id:
        data.append(tok.eos_token_id)
    n = len(data) // PPL_SEQ * PPL_SEQ
    rows = mx.array(data[:n]).reshape(-1, PPL_SEQ)
    ppl, se = eval_ppl(model, rows, batch_size=2)
    update_generation("perplexity", {"file": os.path.relpath(PPL_TEXT, ROOT), "sequence_length": PPL_SEQ,
                                     "tokens": len(data), "rows": int(rows.shape[0]), "ppl": float(ppl),
                                     "se": float(se)})
    print(f"perplexity: {ppl:.4f} ± {se:.4f} over {rows.shape[0]} rows of {PPL_SEQ}")


# Adapters made by mlx_lm (random, not trained: the low-rank factors and DoRA magnitudes are
# perturbed so every adapted layer changes the output), on tiny models and the default model.
ADAPTER_CASES = [
    # (golden folder, base model folder under tests/golden, fine_tune_type, num_layers, lora_parameters)
    ("tiny_llama3_lora", "tiny_llama3", "lora", 1, dict(rank=4, scale=2.0, dropout=0.0)),
    ("tiny_llama3_q4_dora", "tiny_llama3/q4", "dora", -1,
     dict(rank=4, scale=1.5, dropout=0.0, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])),
    ("tiny_qwen2_dora", "tiny_qwen2", "dora", 2, dict(rank=2, scale=3.0, dropout=0.0)),
    ("tiny_qwen2_q4_lora", "tiny_qwen2/q4", "lora", -1, dict(rank=4, scale=2.0, dropout=0.0)),
    # mixtures of experts: the router and the stacked experts (LoRASwitchLinear) adapted too
    ("tiny_qwen3_moe_lora", "tiny_qwen3_moe", "lora", 2, dict(rank=4, scale=2.0, dropout=0.0)),
    ("tiny_gpt_oss_q4_lora", "tiny_gpt_oss/q4", "lora", -1, dict(rank=4, scale=2.0, dropout=0.0)),
]
SMOLLM2_ADAPTER = ("smollm2_lora", "lora", 2, dict(rank=4, scale=20.0, dropout=0.0))


def make_adapter(model, out_dir, fine_tune_type, num_layers, params, b_std):
    """Adds mlx_lm's adapter layers to `model`, perturbs them and saves them as mlx_lm.lora
    does (trainable parameters, adapter_config.json)."""
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    adapters = {}
    for k, v in tree_flatten(model.trainable_parameters()):
        if k.endswith("lora_b"):
            v = mx.random.normal(v.shape) * b_std
        elif k.endswith(".m"):
            v = v * (1.0 + 0.1 * mx.random.normal(v.shape))
        adapters[k] = v.astype(mx.float32)
    model.load_weights(list(adapters.items()), strict=False)
    os.makedirs(out_dir, exist_ok=True)
    mx.save_safetensors(os.path.join(out_dir, "adapters.safetensors"), adapters)
    json.dump({"fine_tune_type": fine_tune_type, "num_layers": num_layers, "lora_parameters": params},
              open(os.path.join(out_dir, "adapter_config.json"), "w"), indent=4)
    return sorted({k.rsplit(".", 1)[0] for k in adapters})


def fuse_model(model):
    """mlx_lm.fuse's step: every adapter layer replaced by its fused linear."""
    from mlx.utils import tree_unflatten

    fused = [(n, m.fuse(dequantize=False)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    model.update_modules(tree_unflatten(fused))


def adapters():
    """Per case: the adapter folder, f32 logits of the adapted model on the tiny model's inputs,
    the fused layers' tensors as mlx_lm.fuse writes them, and f32 logits of the fused model.
    For the default model: greedy tokens with the adapter (f32)."""
    from pathlib import Path
    from mlx.utils import tree_flatten
    from mlx_lm import load
    from mlx_lm.utils import load_model

    for name, base, kind, num_layers, params in ADAPTER_CASES:
        mx.random.seed(11)
        base_dir = os.path.join(GOLDEN, base)
        out = os.path.join(GOLDEN, name)
        ids = json.load(open(os.path.join(GOLDEN, base.split("/")[0], "inputs.json")))["ids"]
        model, _ = load_model(Path(base_dir))
        layers = make_adapter(model, out, kind, num_layers, params, b_std=0.1)
        fuse_model(model)  # in the stored dtypes, as mlx_lm.fuse
        fused = {k: v for k, v in tree_flatten(model.parameters())
                 if k.rsplit(".", 1)[0] in layers and not k.endswith(".bias")}
        mx.save_safetensors(os.path.join(out, "fused.safetensors"), fused)
        to_f32(model)
        fused_logits = np.array(model(mx.array(ids)[None])[0])
        model, _ = load_model(Path(base_dir))
        from mlx_lm.tuner.utils import load_adapters
        load_adapters(model, out)
        to_f32(model)
        adapted = np.array(model(mx.array(ids)[None])[0])
        save_f32(os.path.join(out, "logits.safetensors"), {"adapted": adapted, "fused": fused_logits})
        json.dump({"base": base, "layers": layers}, open(os.path.join(out, "case.json"), "w"), indent=1)
        print(f"{name}: {len(layers)} adapted layers")

    name, kind, num_layers, params = SMOLLM2_ADAPTER
    mx.random.seed(5)
    out = os.path.join(GOLDEN, name)
    model, tok = load(MODEL)
    make_adapter(model, out, kind, num_layers, params, b_std=0.01)
    model, tok = load(MODEL, adapter_path=out)
    to_f32(model)
    cases = []
    for prompt, system in CHAT_PROMPTS[:2]:
        text, ids = prompt_ids(tok, prompt, system)
        toks = greedy(model, ids, 24)
        cases.append({"prompt": prompt, "prompt_ids": ids, "greedy_f32": toks, "greedy_text": tok.decode(toks)})
        print(f"{name}: {prompt!r} -> {tok.decode(toks)!r}")
    json.dump({"model": "SmolLM2-135M-Instruct", "dtype": "float32", "cases": cases},
              open(os.path.join(out, "greedy.json"), "w"), indent=1, ensure_ascii=False)


# Gradient goldens: one batch through mlx_lm's default_loss, gradients w.r.t. the adapter
# parameters (B perturbed so A's gradient is not zero), in f32.
GRAD_CASES = [("tiny_llama3", "lora"), ("tiny_llama3/q4", "lora"), ("tiny_qwen2", "dora"), ("tiny_qwen2/q4", "dora"),
              ("tiny_llama3", "full"), ("tiny_qwen2", "full"), ("tiny_qwen3_moe", "lora"), ("tiny_qwen3_moe", "full")]


def lora_grads():
    from pathlib import Path
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.trainer import default_loss
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    for base, kind in GRAD_CASES:
        mx.random.seed(13)
        model, cfg = load_model(Path(os.path.join(GOLDEN, base)))
        to_f32(model)
        model.freeze()
        params = dict(rank=4, scale=2.0, dropout=0.0)
        if kind == "full":
            # mlx_lm.lora's full fine-tuning: the last num_layers blocks unfrozen whole (on a
            # quantized model mlx fails: "no gradient wrt the quantized weights")
            for layer in model.layers[-2:]:
                layer.unfreeze()
        else:
            linear_to_lora_layers(model, 2, params, use_dora=kind == "dora")
        init = {}
        for k, v in tree_flatten(model.trainable_parameters()):
            if k.endswith("lora_b"):
                v = mx.random.normal(v.shape) * 0.1
            init[k] = v.astype(mx.float32)
        model.load_weights(list(init.items()), strict=False)
        rng = np.random.default_rng(17)
        lengths = [(0, 40), (5, 27)]
        batch = np.zeros((2, 41), np.int32)
        for r, (_, n) in enumerate(lengths):
            batch[r, :n] = rng.integers(0, cfg["vocab_size"], size=n)
        loss_and_grad = nn.value_and_grad(model, default_loss)
        (loss, ntoks), grads = loss_and_grad(model, mx.array(batch), mx.array(lengths))
        out = os.path.join(GOLDEN, "lora_grads", base.replace("/", "_") + "_" + kind)
        os.makedirs(out, exist_ok=True)
        mx.save_safetensors(os.path.join(out, "adapters.safetensors"), init)
        mx.save_safetensors(os.path.join(out, "grads.safetensors"), dict(tree_flatten(grads)))
        json.dump({"base": base, "fine_tune_type": kind, "num_layers": 2, "lora_parameters": params,
                   "batch": batch.tolist(), "lengths": lengths, "loss": loss.item(), "ntoks": ntoks.item()},
                  open(os.path.join(out, "case.json"), "w"))
        print(f"grads {base} {kind}: loss {loss.item():.5f} over {ntoks.item()} tokens")


# A short LoRA run of mlx_lm's trainer, from saved initial adapters, on the committed dataset
# tests/data/lora, computing in f32: the reported training losses and validation losses. The model
# is a tiny random llama in the default model's vocabulary (its tokenizer files copied), 4-bit
# (group 32) quantized by mlx_lm: mlx's CPU matmul runs at about 0.6 GFLOP/s here, so one step of
# the 135M default model takes mlx_lm 80 s and a 50-step reference run on it is out of reach.
LORA_RUN = dict(iters=50, batch_size=4, learning_rate=1e-3, steps_per_report=5, steps_per_eval=25, val_batches=-1,
                num_layers=2, seed=0, lora_parameters=dict(rank=8, scale=20.0, dropout=0.0))
TINY_SMOL = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=2,
                 num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=49152, rope_theta=10000.0,
                 tie_word_embeddings=True, max_position_embeddings=2048)


def lora_train():
    from pathlib import Path
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_tokenizer
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _get_classes, quantize_model

    r = LORA_RUN
    out = os.path.join(GOLDEN, "lora_run")
    mdir = os.path.join(out, "model")
    os.makedirs(mdir, exist_ok=True)
    mx.random.seed(21)
    model_class, args_class = _get_classes(TINY_SMOL)
    model = model_class(args_class.from_dict(TINY_SMOL))
    model.set_dtype(mx.float16)
    model, qcfg = quantize_model(model, dict(TINY_SMOL), group_size=32, bits=4)
    mx.save_safetensors(os.path.join(mdir, "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    json.dump(qcfg, open(os.path.join(mdir, "config.json"), "w"), indent=1)
    # the default model's tokenizer (the test puts its files next to the model)
    tok = load_tokenizer(Path(MODEL))
    to_f32(model)
    model.freeze()
    linear_to_lora_layers(model, r["num_layers"], r["lora_parameters"])
    init = {k: v for k, v in tree_flatten(model.trainable_parameters())}
    mx.save_safetensors(os.path.join(out, "init_adapters.safetensors"), init)

    _mlx_lora_run(model, tok, r, out)


def _mlx_lora_run(model, tok, r, out):
    """mlx_lm's trainer on the committed dataset (tests/data/lora) with config `r`, from the
    model's current adapters; the reported training and validation losses go to OUT/run.json."""
    import tempfile
    import types
    import mlx.optimizers as optim
    from mlx_lm.tuner.datasets import CacheDataset, load_dataset
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train

    np.random.seed(r["seed"])
    args = types.SimpleNamespace(data=os.path.join(ROOT, "tests", "data", "lora"), train=True, test=False,
                                 mask_prompt=False, hf_dataset=None)
    train_set, valid_set, _ = load_dataset(args, tok)

    class Record(TrainingCallback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_loss_report(self, info):
            self.train.append({"iteration": info["iteration"], "train_loss": info["train_loss"],
                               "learning_rate": float(info["learning_rate"])})

        def on_val_loss_report(self, info):
            self.val.append({"iteration": info["iteration"] + 1, "val_loss": info["val_loss"]})

    rec = Record()
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArgs(batch_size=r["batch_size"], iters=r["iters"], val_batches=r["val_batches"],
                             steps_per_report=r["steps_per_report"], steps_per_eval=r["steps_per_eval"],
                             steps_per_save=10_000, max_seq_length=2048,
                             adapter_file=os.path.join(tmp, "adapters.safetensors"))
        train(model=model, optimizer=optim.Adam(learning_rate=r["learning_rate"]),
              train_dataset=CacheDataset(train_set), val_dataset=CacheDataset(valid_set), args=targs,
              training_callback=rec)
    json.dump({"config": r, "device": str(mx.default_device()), "train": rec.train, "val": rec.val},
              open(os.path.join(out, "run.json"), "w"), indent=1)
    for t in rec.train:
        print(f"iter {t['iteration']}: train loss {t['train_loss']:.4f}")
    for v in rec.val:
        print(f"iter {v['iteration']}: val loss {v['val_loss']:.4f}")


# The same comparison on the default model itself, 4-bit g64 (mlx_lm's quantization, which
# wick's equals bit for bit), computing in f32. mlx's CPU backend needs over an hour for this, so
# the job runs on a GPU when mlx has one (mlx's CUDA backend on the GPU machine, docs/cuda.md).
LORA_RUN_DEFAULT = dict(iters=50, batch_size=4, learning_rate=5e-5, steps_per_report=5, steps_per_eval=25,
                        val_batches=-1, num_layers=4, seed=0, lora_parameters=dict(rank=8, scale=20.0, dropout=0.0))


def lora_run_default():
    from pathlib import Path
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model, load_tokenizer, quantize_model

    r = LORA_RUN_DEFAULT
    out = os.path.join(GOLDEN, "lora_run_default")
    os.makedirs(out, exist_ok=True)
    mx.random.seed(22)
    # quantized and initialised on the CPU (the quantization wick reproduces), trained on the GPU.
    # LORA_RUN_DEFAULT_Q4: a folder holding that 4-bit model already (`wick convert -q` of the
    # default model, equal to mlx_lm's bit for bit), where carrying it is cheaper than the GGUF
    q4 = os.environ.get("LORA_RUN_DEFAULT_Q4")
    if q4:
        model, cfg = load_model(Path(q4))
    else:
        model, cfg = load_model(Path(MODEL))
        model, _ = quantize_model(model, cfg, group_size=64, bits=4)
    tok = load_tokenizer(Path(q4 or MODEL))
    to_f32(model)
    model.freeze()
    linear_to_lora_layers(model, r["num_layers"], r["lora_parameters"])
    init = {k: v for k, v in tree_flatten(model.trainable_parameters())}
    mx.eval(model.parameters())
    mx.save_safetensors(os.path.join(out, "init_adapters.safetensors"), init)
    if mx.cuda.is_available() or mx.metal.is_available():
        mx.set_default_device(mx.gpu)
    else:
        print("lora_run_default: no GPU for mlx; mlx's CPU backend takes over an hour for this job")
    _mlx_lora_run(model, tok, r, out)
    mx.set_default_device(mx.cpu)


# --- gguf_tiny: GGUF files in llama.cpp's layout, written from the tiny golden models ---------
#
# Each tiny model is written the way llama.cpp's convert_hf_to_gguf.py writes its family
# (re-implemented here from reading that converter, not from wick): tensor names through the
# `gguf` package's own name map, Q/K rows permuted for the llama family, gemma norms stored +1,
# phi3's fused projections kept fused, stacked experts, llama 3's rope_freqs and phi3's longrope
# factors as tensors, 2-D weights in float16 and 1-D tensors in float32. What llama.cpp fixes
# instead of reading from the file (gemma 3's every-sixth-layer global attention, SmolLM3's
# every-fourth NoPE layer, OLMoE's unnormalized top-k, llama 3's original context of 8192 when
# the config has no top-level `original_max_position_embeddings`) is what the file means; where
# that differs from the tiny model's config, mlx_lm recomputes the greedy tokens with the
# config the file stands for.

GGUF_DIR = os.path.join(GOLDEN, "gguf")

# source model -> (gguf arch, llama.cpp permutes Q/K, norm shift, vocabulary, pre-tokenizer)
GGUF_TINY = {
    "tiny_llama3": ("llama", True, 0.0, "bpe", "llama-bpe"),
    "tiny_mistral": ("llama", True, 0.0, "spm", None),
    "tiny_mixtral": ("llama", True, 0.0, "spm", None),
    "tiny_smollm3": ("smollm3", True, 0.0, "bpe", "llama-bpe"),
    "tiny_granite": ("granite", True, 0.0, "bpe", "refact"),
    "tiny_qwen2": ("qwen2", False, 0.0, "bpe", "qwen2"),
    "tiny_qwen3": ("qwen3", False, 0.0, "bpe", "qwen2"),
    "tiny_qwen2_moe": ("qwen2moe", False, 0.0, "bpe", "qwen2"),
    "tiny_qwen3_moe": ("qwen3moe", False, 0.0, "bpe", "qwen2"),
    "tiny_phi3": ("phi3", False, 0.0, "spm", None),
    "tiny_gemma2": ("gemma2", False, 1.0, "spm_gemma", None),
    "tiny_gemma3": ("gemma3", False, 1.0, "spm_gemma", None),
    "tiny_olmo2": ("olmo2", False, 0.0, "bpe", "olmo"),
    "tiny_olmo3": ("olmo2", False, 0.0, "bpe", "olmo"),
    "tiny_glm4": ("glm4", False, 0.0, "bpe", "gpt-2"),
    "tiny_starcoder2": ("starcoder2", False, 0.0, "bpe", "starcoder"),
    "tiny_cohere2": ("cohere2", False, 0.0, "bpe", "gpt-2"),
    "tiny_exaone4": ("exaone4", False, 0.0, "bpe", "gpt-2"),
    "tiny_seed_oss": ("seed_oss", False, 0.0, "bpe", "gpt-2"),
    "tiny_hunyuan_v1_dense": ("hunyuan-dense", False, 0.0, "bpe", "gpt-2"),
    "tiny_apertus": ("apertus", False, 0.0, "bpe", "gpt-2"),
}

# Where the tiny model is not what llama.cpp's converter accepts: Cohere2Model refuses nonzero
# biases (llama.cpp runs Command R7B without them) and reads `rotary_pct`, which the tiny config
# lacks (1.0 here, the whole head as mlx_lm rotates it); HunYuanModel asserts the real models'
# context lengths. The files are written as the converter writes them otherwise (biases left
# out), and mlx_lm's tokens are those of the model the file describes.

BPE_CORPUS = ("The quick brown fox jumps over the lazy dog. I've seen 12 cats and 345 dogs; "
              "they're here, we'll go. Hello world! def main():\n    return 42\n") * 4
TOKENIZER_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "I've 12345 apples, they're  here\n\n  and   there",
    "héllo wörld — ünïcode 你好 🚀",
    " leading space and trailing ",
    "def f(x):\n\treturn x**2 # 3.14",
]


def _llama_permute(w, n_head):
    """convert_hf_to_gguf's LlamaModel.permute: rows (heads, 2, half) -> (heads, half, 2)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _bpe_vocab(size, specials):
    """A byte-level BPE trained by `tokenizers` on BPE_CORPUS (its alphabet only when small),
    padded with llama.cpp's `[PAD{i}]` unused tokens to `size`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet() if size > 300 else []
    tr = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, initial_alphabet=alphabet,
                             show_progress=False)
    tok.train_from_iterator([BPE_CORPUS], tr)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    types = [gguf_token_type("CONTROL") if t in specials else gguf_token_type("NORMAL") for t in tokens]
    while len(tokens) < size:
        tokens.append(f"[PAD{len(tokens)}]")
        types.append(gguf_token_type("UNUSED"))
    return tokens[:size], types[:size], merges


def gguf_token_type(name):
    import gguf
    return int(getattr(gguf.TokenType, name))


def _spm_synthetic(size, gemma):
    """A SentencePiece (`llama`) vocabulary of exactly `size` tokens: specials, a few byte-fallback
    tokens, letters and some merged pieces with descending scores."""
    if gemma:
        specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    else:
        specials = ["<unk>", "<s>", "</s>"]
    tokens = list(specials)
    types = [gguf_token_type("UNKNOWN") if t == "<unk>" else gguf_token_type("CONTROL") for t in tokens]
    scores = [0.0] * len(tokens)
    for b in range(16):
        tokens.append(f"<0x{b:02X}>")
        types.append(gguf_token_type("BYTE"))
        scores.append(0.0)
    pieces = ["▁t", "he", "▁the", "in", "er", "▁a", "on", "re", "at", "en", "▁s", "▁w", "or", "▁o", "it", "is"]
    letters = ["▁"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    for i, p in enumerate(pieces + letters):
        tokens.append(p)
        types.append(gguf_token_type("NORMAL"))
        scores.append(-float(i))
    while len(tokens) < size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(gguf_token_type("UNUSED"))
        scores.append(-1000.0)
    return tokens[:size], types[:size], scores[:size], specials


def _write_bpe_vocab(w, tokens, types, merges, pre, bos, eos):
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)


def _write_spm_vocab(w, tokens, types, scores, specials, gemma):
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(tokens.index("<unk>"))
    w.add_bos_token_id(tokens.index("<bos>" if gemma else "<s>"))
    w.add_eos_token_id(tokens.index("<eos>" if gemma else "</s>"))
    if gemma:
        w.add_add_space_prefix(False)


def _effective_config(name, arch, cfg):
    """The config a llama.cpp reader of the file runs (see the section's comment)."""
    eff = dict(cfg)
    if arch == "llama" and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        eff["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=cfg.get(
            "original_max_position_embeddings", 8192))
    if arch == "smollm3":
        eff["no_rope_layer_interval"] = 4
    if arch == "gemma3":
        eff["sliding_window_pattern"] = 6
        eff["rope_local_base_freq"] = 10000.0
        eff["query_pre_attn_scalar"] = cfg["head_dim"]
    if arch == "gemma2":
        eff["query_pre_attn_scalar"] = cfg["head_dim"]
    if arch == "olmoe":
        eff["norm_topk_prob"] = False
    if arch in ("exaone4", "apertus") and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        eff["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=cfg.get(
            "original_max_position_embeddings", 8192))
    if arch == "cohere2":
        eff["attention_bias"] = False
        eff["sliding_window_pattern"] = 4  # llama.cpp's fixed pattern
    if arch == "hunyuan-dense" and (cfg.get("rope_scaling") or {}).get("type") == "dynamic":
        eff.pop("rope_scaling")
        eff["rope_theta"] = _hunyuan_base(cfg)
        eff["max_position_embeddings"] = 256 * 1024
    return eff


def _hunyuan_base(cfg):
    """HunYuanModel's NTK-alpha RoPE base (its dynamic `rope_scaling` written as a plain base)."""
    alpha = cfg["rope_scaling"].get("alpha", 50)
    dim = cfg["head_dim"]
    return cfg.get("rope_theta", 10000.0) * (alpha ** (dim / (dim - 2)))


def _write_tiny_gguf(name, path):
    import gguf

    arch, permute, shift, vocab_kind, pre = GGUF_TINY[name]
    d = os.path.join(GOLDEN, name)
    cfg = json.load(open(os.path.join(d, "config.json")))
    params = {k: np.array(v.astype(mx.float32)) if v.dtype != mx.float16 else np.array(v)
              for k, v in mx.load(os.path.join(d, "model.safetensors")).items()}
    n_layer = cfg["num_hidden_layers"]
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads", n_head)
    hidden = cfg["hidden_size"]
    vocab = cfg["vocab_size"]
    gguf_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(gguf_arch, n_layer)
    w = gguf.GGUFWriter(path, arch)

    # hyperparameters as TextModel.set_gguf_parameters and the family's converter write them
    w.add_block_count(n_layer)
    if "max_position_embeddings" in cfg:
        w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    if "rms_norm_eps" in cfg:
        w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    for k in ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"):
        if k in cfg:
            w.add_layer_norm_eps(cfg[k])
            break
    if "rope_theta" in cfg:
        w.add_rope_freq_base(cfg["rope_theta"])
    if "head_dim" in cfg and arch not in ("granite", "granitemoe"):
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    for k in ("num_local_experts", "num_experts"):
        if k in cfg:
            w.add_expert_count(cfg[k])
            break
    if "num_experts_per_tok" in cfg:
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    rs = cfg.get("rope_scaling") or {}
    rtype = rs.get("rope_type", rs.get("type"))
    if rtype == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rs["factor"])
    elif rtype == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rs["factor"])
        w.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
    elif rtype == "longrope":
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if arch in ("llama", "smollm3", "granite", "granitemoe", "apertus"):
        w.add_vocab_size(vocab)
        w.add_rope_dimension_count(cfg.get("head_dim", hidden // n_head))
    if arch in ("qwen2moe", "qwen3moe"):
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    if arch == "qwen2moe":
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
    if arch in ("granite", "granitemoe"):
        w.add_attention_scale(cfg["attention_multiplier"])
        w.add_embedding_scale(cfg["embedding_multiplier"])
        w.add_residual_scale(cfg["residual_multiplier"])
        w.add_logit_scale(cfg["logits_scaling"])
    if arch == "phi3":
        w.add_rope_scaling_orig_ctx_len(cfg["original_max_position_embeddings"])
        w.add_rope_dimension_count(int(cfg.get("partial_rotary_factor", 1.0) * hidden) // n_head)
        w.add_sliding_window(cfg.get("sliding_window") or 0)
        scale = cfg["max_position_embeddings"] / cfg["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(cfg["original_max_position_embeddings"]))
                                        if scale > 1.0 else 1.0)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        w.add_sliding_window(cfg.get("sliding_window", 4096))  # Gemma2Config's default
    if arch == "gemma3":
        w.add_sliding_window(cfg["sliding_window"])
    if arch == "olmo2":  # Olmo2Model, which OLMo 3 converts through too
        if rtype == "yarn":
            w.add_rope_scaling_attn_factors(rs["attention_factor"])
        if "sliding_window" in cfg:
            w.add_sliding_window(cfg["sliding_window"])
            if "layer_types" in cfg:
                w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg["layer_types"]])
            else:
                w.add_sliding_window_pattern([(i + 1) % 4 != 0 for i in range(n_layer)])
    if arch == "glm4":
        w.add_rope_dimension_count(int(cfg.get("head_dim", hidden // n_head) * cfg.get("partial_rotary_factor", 0.5)))
    if arch == "cohere2":
        w.add_logit_scale(cfg["logit_scale"])
        w.add_sliding_window(cfg["sliding_window"])
        w.add_vocab_size(vocab)
        w.add_rope_dimension_count(int(cfg.get("rotary_pct", 1.0) * (hidden // n_head)))
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
    if arch == "exaone4":
        w.add_vocab_size(vocab)
        if cfg.get("sliding_window") is not None:
            w.add_sliding_window(cfg["sliding_window"])
            pat = cfg.get("sliding_window_pattern")
            flags = []
            if "layer_types" in cfg:
                flags = [t == "sliding_attention" for t in cfg["layer_types"]]
            elif isinstance(pat, str):
                flags = [pat[i % len(pat)] == "L" for i in range(n_layer)]
            elif isinstance(pat, int):
                flags = [(i + 1) % pat != 0 for i in range(n_layer)]
            if len(flags) == n_layer:
                w.add_sliding_window_pattern(flags)
    if arch == "hunyuan-dense" and rs.get("type") == "dynamic":
        w.add_rope_freq_base(_hunyuan_base(cfg))  # overwrites TextModel's
        w.add_rope_scaling_type(gguf.RopeScalingType.NONE)
        w.add_rope_scaling_factor(1)
        w.add_rope_scaling_orig_ctx_len(256 * 1024)
        w.add_context_length(256 * 1024)
    if arch == "apertus":  # LlamaModel's, then the xIELU parameters as per-layer arrays
        for p, add_arr in (("alpha_n", w.add_xielu_alpha_n), ("alpha_p", w.add_xielu_alpha_p),
                           ("beta", w.add_xielu_beta), ("eps", w.add_xielu_eps)):
            add_arr([float(params[f"model.layers.{i}.mlp.act_fn.{p}"]) for i in range(n_layer)])

    # vocabulary
    if vocab_kind == "bpe":
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        tokens, types, merges = _bpe_vocab(vocab, specials)
        _write_bpe_vocab(w, tokens, types, merges, pre, tokens.index("<|im_start|>"), tokens.index("<|im_end|>"))
        w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    else:
        gemma = vocab_kind == "spm_gemma"
        tokens, types, scores, specials = _spm_synthetic(vocab, gemma)
        _write_spm_vocab(w, tokens, types, scores, specials, gemma)

    # tensors
    def add(gname, a):
        a = np.ascontiguousarray(a)
        w.add_tensor(gname, a.astype(np.float32) if a.ndim <= 1 else a.astype(np.float16))

    exps = {"gate_proj": gguf.MODEL_TENSOR.FFN_GATE_EXP, "up_proj": gguf.MODEL_TENSOR.FFN_UP_EXP,
            "down_proj": gguf.MODEL_TENSOR.FFN_DOWN_EXP}
    for k in sorted(params):
        a = params[k].astype(np.float32)
        if arch in ("gemma2",) and k == "lm_head.weight":
            continue  # Gemma2Model skips lm_head
        if arch == "hunyuan-dense" and k == "lm_head.weight" and cfg.get("tie_word_embeddings", False):
            continue
        if arch == "cohere2" and k.endswith(".bias"):
            continue  # Cohere2Model drops the (in its models zero) biases
        if arch == "apertus" and ".act_fn." in k:
            continue  # written as metadata above
        m = re.match(r"model\.layers\.(\d+)\..*switch_mlp\.(\w+)\.weight$", k)
        if m:
            add(gguf.TENSOR_NAMES[exps[m.group(2)]].format(bid=int(m.group(1))) + ".weight", a)
            continue
        if permute and re.search(r"q_proj\.(weight|bias)$", k):
            a = _llama_permute(a, n_head)
        if permute and re.search(r"k_proj\.(weight|bias)$", k):
            a = _llama_permute(a, n_kv)
        if shift and k.endswith("norm.weight"):
            a = a + shift
        gname = tmap.get_name(k, try_suffixes=(".weight", ".bias"))
        m = re.match(r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$", k)
        if gname is None and m:
            # qwen3moe's dense layers (mlp_only_layers), which llama.cpp's name map lacks: its
            # plain feed-forward names
            ffn = {"gate": gguf.MODEL_TENSOR.FFN_GATE, "up": gguf.MODEL_TENSOR.FFN_UP, "down": gguf.MODEL_TENSOR.FFN_DOWN}
            gname = gguf.TENSOR_NAMES[ffn[m.group(2)]].format(bid=int(m.group(1))) + ".weight"
        assert gname is not None, f"{name}: no GGUF name for {k}"
        add(gname, a)

    # RoPE factors as tensors
    if arch in ("llama", "exaone4", "apertus") and rtype == "llama3":
        base = cfg.get("rope_theta", 10000.0)
        dim = cfg.get("head_dim", hidden // n_head)
        freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = rs.get("factor", 16.0 if arch == "exaone4" else 8.0)
        lo, hi = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old = cfg.get("original_max_position_embeddings", 8192)
        out = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < old / hi:
                out.append(1.0)
            elif wl > old / lo:
                out.append(factor)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append(1 / ((1 - s) / factor + s))
        w.add_tensor("rope_freqs.weight", np.array(out, dtype=np.float32))
    if arch == "phi3" and rtype == "longrope":
        w.add_tensor("rope_factors_long.weight", np.array(rs["long_factor"], dtype=np.float32))
        w.add_tensor("rope_factors_short.weight", np.array(rs["short_factor"], dtype=np.float32))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if arch == "cohere2":
        params = {k: v for k, v in params.items() if not k.endswith(".bias")}
    return cfg, params


def _greedy_with(cfg, params, ids):
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(cfg)
    model = model_class(args_class.from_dict(cfg))
    model.load_weights([(k, mx.array(v).astype(mx.float32)) for k, v in params.items()])
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    class Caches(list):
        """mlx_lm's gemma3_text builds its (here unused) global mask from cache[pattern - 1],
        past the end when every layer is a sliding one (pattern above the layer count)."""

        def __getitem__(self, i):
            return super().__getitem__(min(i, len(self) - 1) if isinstance(i, int) else i)

    steps = generate_step(mx.array(ids[:TINY_GREEDY_PROMPT]), model, max_tokens=TINY_GREEDY_TOKENS,
                          prompt_cache=Caches(make_prompt_cache(model)))
    return {"prompt": ids[:TINY_GREEDY_PROMPT], "tokens": [int(t) for t, _ in steps]}


def _tokenizer_goldens():
    """Vocabulary-only GGUFs and the ids Python tokenizers give for TOKENIZER_TEXTS: byte-level BPE
    under each family's pre-tokenizer (`tokenizers`, built as the family's tokenizer.json is),
    and SentencePiece BPE models with byte fallback (the `sentencepiece` package itself)."""
    import io
    import gguf
    import sentencepiece as spm
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, decoders, Regex

    out = {}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens, types, merges = _bpe_vocab(400, specials)
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = lambda p: pre_tokenizers.Sequence([  # noqa: E731
        pre_tokenizers.Split(Regex(p), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    families = {
        "gpt-2": (None, gpt2),
        "smollm": (None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])),
        "llama-bpe": (None, split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
        "qwen2": (normalizers.NFC(), split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")),
    }
    for pre, (norm, pt) in families.items():
        fname = f"vocab_bpe_{pre}.gguf"
        w = gguf.GGUFWriter(os.path.join(GGUF_DIR, fname), "llama")
        _write_bpe_vocab(w, tokens, types, merges, pre, tokens.index("<|endoftext|>"), tokens.index("<|im_end|>"))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[tuple(m.split(" ")) for m in merges]))
        if norm is not None:
            tok.normalizer = norm
        tok.pre_tokenizer = pt
        tok.decoder = decoders.ByteLevel()
        out[fname] = {"texts": TOKENIZER_TEXTS, "ids": [tok.encode(t).ids for t in TOKENIZER_TEXTS]}

    for style in ("llama", "gemma"):
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(BPE_CORPUS.split("\n") * 3), model_writer=buf, model_type="bpe", vocab_size=330,
            byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=(style == "llama"), split_digits=True,
            unk_id=0 if style == "llama" else 3, bos_id=1 if style == "llama" else 2,
            eos_id=2 if style == "llama" else 1, pad_id=-1 if style == "llama" else 0,
            allow_whitespace_only_pieces=True, minloglevel=2)
        sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
        toks, scores, ttypes = [], [], []
        for i in range(sp.vocab_size()):  # as llama.cpp's _set_vocab_sentencepiece
            toks.append(sp.id_to_piece(i))
            scores.append(sp.get_score(i))
            t = "NORMAL"
            if sp.is_unknown(i):
                t = "UNKNOWN"
            elif sp.is_control(i):
                t = "CONTROL"
            elif sp.is_unused(i):
                t = "UNUSED"
            elif sp.is_byte(i):
                t = "BYTE"
            ttypes.append(gguf_token_type(t))
        fname = f"vocab_spm_{style}.gguf"
        w = gguf.GGUFWriter(os.path.join(GGUF_DIR, fname), "llama")
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(toks)
        w.add_token_scores(scores)
        w.add_token_types(ttypes)
        w.add_unk_token_id(sp.unk_id())
        w.add_bos_token_id(sp.bos_id())
        w.add_eos_token_id(sp.eos_id())
        w.add_add_bos_token(False)
        if style == "gemma":
            w.add_add_space_prefix(False)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        out[fname] = {"texts": TOKENIZER_TEXTS, "ids": [sp.encode(t) for t in TOKENIZER_TEXTS]}
    json.dump(out, open(os.path.join(GGUF_DIR, "tokenizers.json"), "w"), indent=1, ensure_ascii=False)


# GGML types of quant_types.gguf's tensors: quantized by the gguf package where it can, random
# blocks (with small f16 scales) for the k-quants it only dequantizes.
QUANT_TYPES = {
    "token_embd.weight": "Q4_1", "output.weight": "Q8_0", "output_norm.weight": "F32",
    "blk.0.attn_norm.weight": "F32", "blk.0.ffn_norm.weight": "F32",
    "blk.0.attn_q.weight": "Q2_K", "blk.0.attn_k.weight": "Q3_K", "blk.0.attn_v.weight": "Q4_K",
    "blk.0.attn_output.weight": "Q4_0", "blk.0.ffn_gate.weight": "Q5_K", "blk.0.ffn_up.weight": "Q6_K",
    "blk.0.ffn_down.weight": "Q5_0",
    "blk.1.attn_norm.weight": "F32", "blk.1.ffn_norm.weight": "F32",
    "blk.1.attn_q.weight": "Q4_K", "blk.1.attn_k.weight": "BF16", "blk.1.attn_v.weight": "Q5_1",
    "blk.1.attn_output.weight": "Q8_0", "blk.1.ffn_gate.weight": "Q3_K", "blk.1.ffn_up.weight": "Q2_K",
    "blk.1.ffn_down.weight": "F16",
}
# byte offsets of the f16 scale fields in each k-quant block (ggml-common.h)
KQUANT_F16 = {"Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}
QUANT_SAMPLE_STRIDE = 61


def _quant_types_gguf():
    """A 2-layer llama (256 inputs where k-quant blocks of 256 must fit) whose tensors cover every GGML type
    candle dequantizes in files; the `gguf` package's dequantization of each (Q/K unpermuted) is
    what the import must give, sampled every QUANT_SAMPLE_STRIDE values."""
    import gguf
    from gguf.quants import quantize, dequantize

    rng = np.random.default_rng(11)
    hidden, n_head, n_kv, hd, ff, vocab = 256, 2, 1, 32, 64, 48
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for b in range(2):
        shapes.update({f"blk.{b}.attn_norm.weight": (hidden,), f"blk.{b}.ffn_norm.weight": (hidden,),
                       f"blk.{b}.attn_q.weight": (n_head * hd, hidden), f"blk.{b}.attn_k.weight": (n_kv * hd, hidden),
                       f"blk.{b}.attn_v.weight": (n_kv * hd, hidden), f"blk.{b}.attn_output.weight": (hidden, n_head * hd),
                       f"blk.{b}.ffn_gate.weight": (ff, hidden), f"blk.{b}.ffn_up.weight": (ff, hidden),
                       f"blk.{b}.ffn_down.weight": (hidden, ff)})
    path = os.path.join(GGUF_DIR, "quant_types.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_key_length(hd)
    w.add_value_length(hd)
    tokens, types, scores, specials = _spm_synthetic(vocab, False)
    _write_spm_vocab(w, tokens, types, scores, specials, False)
    for name, shape in shapes.items():
        qt = gguf.GGMLQuantizationType[QUANT_TYPES[name]]
        if qt.name in KQUANT_F16:
            block, size = gguf.GGML_QUANT_SIZES[qt]
            nb = shape[0] * shape[1] // block
            raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
            for off in KQUANT_F16[qt.name]:
                raw[:, off:off + 2] = rng.uniform(0.001, 0.01, size=nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
            w.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=qt)
        else:
            a = (rng.standard_normal(shape) * 0.05 + (1.0 if "norm" in name else 0.0)).astype(np.float32)
            if qt == gguf.GGMLQuantizationType.F32:
                w.add_tensor(name, a)
            elif qt == gguf.GGMLQuantizationType.F16:
                w.add_tensor(name, a.astype(np.float16))
            else:
                w.add_tensor(name, quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    hf = {"token_embd": "model.embed_tokens", "output": "lm_head", "output_norm": "model.norm", "attn_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
          "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        a = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(x) for x in reversed(t.shape)])
        parts = t.name.split(".")
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{hf[parts[2]]}.weight"
            if parts[2] == "attn_q":
                a = a.reshape(n_head, a.shape[0] // n_head // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
            if parts[2] == "attn_k":
                a = a.reshape(n_kv, a.shape[0] // n_kv // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
        else:
            name = f"{hf[parts[0]]}.weight"
        flat = a.reshape(-1)
        out[name] = {"ggml_type": t.tensor_type.name, "shape": list(a.shape),
                     "max_abs": float(np.abs(flat).max()),
                     "samples": [float(x) for x in flat[::QUANT_SAMPLE_STRIDE]]}
    json.dump({"stride": QUANT_SAMPLE_STRIDE, "tensors": out}, open(os.path.join(GGUF_DIR, "quant_types.json"), "w"))


def gguf_tiny():
    """tests/golden/gguf/: one GGUF per imported architecture from the tiny models (with the
    greedy tokens the file's model gives under mlx_lm), vocabulary-only GGUFs with Python
    tokenizers' ids, and quant_types.gguf with the `gguf` package's dequantization."""
    os.makedirs(GGUF_DIR, exist_ok=True)
    for name, (arch, *_rest) in GGUF_TINY.items():
        path = os.path.join(GGUF_DIR, f"{name}.gguf")
        cfg, params = _write_tiny_gguf(name, path)
        gold = json.load(open(os.path.join(GOLDEN, name, "greedy.json")))
        eff = _effective_config(name, arch, cfg)
        if eff != cfg:
            inputs = json.load(open(os.path.join(GOLDEN, name, "inputs.json")))
            gold = _greedy_with(eff, params, inputs["ids"])
        else:
            # the tiny model's own tokens, checked once more through mlx_lm
            inputs = json.load(open(os.path.join(GOLDEN, name, "inputs.json")))
            assert _greedy_with(cfg, params, inputs["ids"]) == gold, name
        changed = {k: eff[k] for k in eff if eff.get(k) != cfg.get(k)}
        json.dump({"gguf": f"{name}.gguf", "prompt": gold["prompt"], "tokens": gold["tokens"], "config_as_read": changed},
                  open(os.path.join(GGUF_DIR, f"{name}.json"), "w"), indent=1)
        print(f"gguf_tiny: {name} ({arch}) {os.path.getsize(path)} bytes{' ' + str(changed) if changed else ''}")
    _tokenizer_goldens()
    _quant_types_gguf()


ONLY_NAMES = set()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["foundation", "gguf", "tiny", "quant", "quant_models", "quant_modes", "quant_mode_models", "max_kv", "chat", "sampling",
                                         "kv_quant", "prompt_cache", "perplexity", "adapters", "lora_grads", "lora_train", "lora_run_default", "gguf_tiny"],
                    default=None)
    ap.add_argument("--names", nargs="*", default=None, help="with --only tiny: only these tiny models")
    a = ap.parse_args()
    global ONLY_NAMES
    ONLY_NAMES = set(a.names or [])
    os.makedirs(GOLDEN, exist_ok=True)
    mx.set_default_device(mx.cpu)
    jobs = {"tiny": tiny_models, "gguf": gguf_import, "foundation": foundation, "quant": quant_vectors,
            "quant_models": quant_models, "quant_modes": quant_modes, "quant_mode_models": quant_mode_models,
            "max_kv": max_kv, "chat": chat, "sampling": sampling,
            "kv_quant": kv_quant, "prompt_cache": prompt_cache, "perplexity": perplexity,
            "adapters": adapters, "lora_grads": lora_grads, "lora_train": lora_train,
            "lora_run_default": lora_run_default, "gguf_tiny": gguf_tiny}
    for k, f in jobs.items():
        if a.only in (None, k):
            f()


if __name__ == "__main__":
    sys.exit(main())
