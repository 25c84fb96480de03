//! One description per GGUF architecture: which mlx_lm `model_type` it becomes, how llama.cpp's
//! tensor names map to the names wick's model files load, what llama.cpp's converter did to the
//! tensors (Q/K row permutation, norms stored with +1), and which metadata keys become which
//! config.json fields. The import driver (`mod.rs`) is the same for every architecture.

use super::GgufFile;
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

/// How one llama.cpp architecture is imported.
pub struct Arch {
    /// `general.architecture`
    pub gguf: &'static str,
    /// only when the file has stacked experts (`ffn_*_exps`): llama.cpp writes mixtral as `llama`
    pub experts: Option<bool>,
    pub model_type: &'static str,
    /// config.json's `architectures`
    pub class: &'static str,
    /// config.json's `hidden_act` (informative: each model has its own activation)
    pub act: &'static str,
    /// llama.cpp's converter permutes the rows of Q and K (weights and biases) for its rotary
    /// layout (`LlamaModel.permute`); the import undoes it
    pub unpermute_qk: bool,
    /// llama.cpp stores `norm.weight` tensors plus this (gemma's `1 + w`); the import subtracts it
    pub norm_offset: f32,
    /// where the router and stacked experts live (`mlp` or `block_sparse_moe`)
    pub moe: &'static str,
    /// the router's name under `moe`
    pub router: &'static str,
    /// per-layer tensors named differently from [`LAYER`] (GGUF stem → mlx path)
    pub layer: &'static [(&'static str, &'static str)],
    /// the model reads `tie_word_embeddings` (else a missing `output.weight` is written out as a
    /// copy of the embedding)
    pub ties: bool,
    /// config.json field for `{arch}.expert_count`
    pub expert_count: &'static str,
    /// `{arch}.<key>` → config field, copied when present
    pub keys: &'static [(&'static str, &'static str, Kind)],
    /// what the architecture derives (llama.cpp's fixed values, tensors read as config)
    pub derive: fn(&Meta, &mut Map<String, Value>) -> Result<()>,
    /// tensors the file keeps as metadata (Apertus's xIELU scalars), as mlx_lm tensors
    pub extra: fn(&Meta) -> Result<Tensors>,
    /// the weights' dtype unless `--dtype` says otherwise: Gemma's activations overflow
    /// float16 within its first layers, so the gemma family imports to bfloat16 (as its Hugging
    /// Face configs say)
    pub dtype: DType,
}

/// mlx_lm tensors by name
pub type Tensors = Vec<(String, Tensor)>;

#[derive(Clone, Copy)]
pub enum Kind {
    Int,
    Float,
    Bool,
}

/// Per-layer GGUF tensor stems and their mlx_lm paths under `model.layers.N.`; `{moe}` and
/// `{router}` are the architecture's.
const LAYER: &[(&str, &str)] = &[
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_qkv", "self_attn.qkv_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_gate_inp", "{moe}.{router}"),
    ("ffn_gate_exps", "{moe}.switch_mlp.gate_proj"),
    ("ffn_up_exps", "{moe}.switch_mlp.up_proj"),
    ("ffn_down_exps", "{moe}.switch_mlp.down_proj"),
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj"),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj"),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate"),
];

/// Gemma's four norms per layer.
const GEMMA_NORMS: &[(&str, &str)] = &[
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// OLMo 2's and EXAONE 4's norms after each branch (and none before).
const POST_NORMS: &[(&str, &str)] =
    &[("post_attention_norm", "post_attention_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm")];

const GRANITE_KEYS: &[(&str, &str, Kind)] = &[
    ("attention.scale", "attention_multiplier", Kind::Float),
    ("embedding_scale", "embedding_multiplier", Kind::Float),
    ("residual_scale", "residual_multiplier", Kind::Float),
    ("logit_scale", "logits_scaling", Kind::Float),
];

const LLAMA: Arch = Arch {
    gguf: "llama",
    experts: Some(false),
    model_type: "llama",
    class: "LlamaForCausalLM",
    act: "silu",
    unpermute_qk: true,
    norm_offset: 0.0,
    moe: "mlp",
    router: "gate",
    layer: &[],
    ties: true,
    expert_count: "num_experts",
    keys: &[],
    derive: llama,
    extra: no_extra,
    dtype: DType::F16,
};

/// Every architecture the import knows, in the order the error message lists them.
pub const ARCHS: &[Arch] = &[
    LLAMA,
    Arch {
        experts: Some(true),
        model_type: "mixtral",
        class: "MixtralForCausalLM",
        moe: "block_sparse_moe",
        expert_count: "num_local_experts",
        derive: none,
        ..LLAMA
    },
    Arch {
        gguf: "smollm3",
        experts: None,
        model_type: "smollm3",
        class: "SmolLM3ForCausalLM",
        derive: smollm3,
        ..LLAMA
    },
    Arch {
        gguf: "granite",
        experts: None,
        model_type: "granite",
        class: "GraniteForCausalLM",
        keys: GRANITE_KEYS,
        ..LLAMA
    },
    Arch {
        gguf: "granitemoe",
        experts: None,
        model_type: "granitemoe",
        class: "GraniteMoeForCausalLM",
        moe: "block_sparse_moe",
        router: "router.layer",
        expert_count: "num_local_experts",
        keys: GRANITE_KEYS,
        derive: none,
        ..LLAMA
    },
    Arch {
        gguf: "qwen2",
        experts: None,
        model_type: "qwen2",
        class: "Qwen2ForCausalLM",
        unpermute_qk: false,
        derive: none,
        ..LLAMA
    },
    Arch {
        gguf: "qwen3",
        experts: None,
        model_type: "qwen3",
        class: "Qwen3ForCausalLM",
        unpermute_qk: false,
        derive: none,
        ..LLAMA
    },
    Arch {
        gguf: "qwen2moe",
        experts: None,
        model_type: "qwen2_moe",
        class: "Qwen2MoeForCausalLM",
        unpermute_qk: false,
        ties: false,
        derive: none,
        ..LLAMA
    },
    Arch {
        gguf: "qwen3moe",
        experts: None,
        model_type: "qwen3_moe",
        class: "Qwen3MoeForCausalLM",
        unpermute_qk: false,
        derive: qwen3_moe,
        ..LLAMA
    },
    Arch {
        gguf: "olmoe",
        experts: None,
        model_type: "olmoe",
        class: "OlmoeForCausalLM",
        unpermute_qk: false,
        derive: olmoe,
        ..LLAMA
    },
    Arch {
        gguf: "phi3",
        experts: None,
        model_type: "phi3",
        class: "Phi3ForCausalLM",
        unpermute_qk: false,
        // llama.cpp keeps phi3's fused gate/up projection under ffn_up
        layer: &[("ffn_up", "mlp.gate_up_proj")],
        keys: &[("rope.scaling.original_context_length", "original_max_position_embeddings", Kind::Int)],
        derive: phi3,
        ..LLAMA
    },
    Arch {
        gguf: "gemma2",
        experts: None,
        model_type: "gemma2",
        class: "Gemma2ForCausalLM",
        act: "gelu_pytorch_tanh",
        unpermute_qk: false,
        norm_offset: 1.0,
        layer: GEMMA_NORMS,
        keys: &[
            ("attn_logit_softcapping", "attn_logit_softcapping", Kind::Float),
            ("final_logit_softcapping", "final_logit_softcapping", Kind::Float),
            ("attention.sliding_window", "sliding_window", Kind::Int),
        ],
        derive: gemma,
        dtype: DType::BF16,
        ..LLAMA
    },
    Arch {
        gguf: "gemma3",
        experts: None,
        model_type: "gemma3_text",
        class: "Gemma3ForCausalLM",
        act: "gelu_pytorch_tanh",
        unpermute_qk: false,
        norm_offset: 1.0,
        layer: GEMMA_NORMS,
        keys: &[
            ("attention.sliding_window", "sliding_window", Kind::Int),
            ("final_logit_softcapping", "final_logit_softcapping", Kind::Float),
        ],
        derive: gemma,
        dtype: DType::BF16,
        ..LLAMA
    },
    Arch {
        gguf: "olmo2",
        experts: None,
        model_type: "olmo2",
        class: "Olmo2ForCausalLM",
        unpermute_qk: false,
        layer: POST_NORMS,
        keys: &[("attention.sliding_window", "sliding_window", Kind::Int)],
        derive: olmo2,
        ..LLAMA
    },
    Arch {
        gguf: "glm4",
        experts: None,
        model_type: "glm4",
        class: "Glm4ForCausalLM",
        unpermute_qk: false,
        // llama.cpp keeps GLM-4's fused gate/up projection under ffn_up
        layer: &[
            ("ffn_up", "mlp.gate_up_proj"),
            ("post_attention_norm", "post_self_attn_layernorm"),
            ("post_ffw_norm", "post_mlp_layernorm"),
        ],
        derive: glm4,
        ..LLAMA
    },
    Arch {
        gguf: "starcoder2",
        experts: None,
        model_type: "starcoder2",
        class: "Starcoder2ForCausalLM",
        act: "gelu_pytorch_tanh",
        unpermute_qk: false,
        layer: &[("ffn_up", "mlp.c_fc"), ("ffn_down", "mlp.c_proj")],
        keys: &[("attention.layer_norm_epsilon", "norm_epsilon", Kind::Float)],
        derive: none,
        ..LLAMA
    },
    Arch {
        gguf: "cohere2",
        experts: None,
        model_type: "cohere2",
        class: "Cohere2ForCausalLM",
        unpermute_qk: false,
        keys: &[
            ("attention.layer_norm_epsilon", "layer_norm_eps", Kind::Float),
            ("logit_scale", "logit_scale", Kind::Float),
            ("attention.sliding_window", "sliding_window", Kind::Int),
        ],
        derive: cohere2,
        ..LLAMA
    },
    Arch {
        gguf: "exaone4",
        experts: None,
        model_type: "exaone4",
        class: "Exaone4ForCausalLM",
        unpermute_qk: false,
        layer: POST_NORMS,
        keys: &[("attention.sliding_window", "sliding_window", Kind::Int)],
        derive: exaone4,
        ..LLAMA
    },
    Arch {
        gguf: "seed_oss",
        experts: None,
        model_type: "seed_oss",
        class: "SeedOssForCausalLM",
        unpermute_qk: false,
        // llama.cpp names Seed-OSS's pre-feed-forward norm post_attention_norm
        layer: &[("post_attention_norm", "post_attention_layernorm")],
        derive: seed_oss,
        ..LLAMA
    },
    Arch {
        gguf: "hunyuan-dense",
        experts: None,
        model_type: "hunyuan_v1_dense",
        class: "HunYuanDenseV1ForCausalLM",
        unpermute_qk: false,
        layer: &[("attn_q_norm", "self_attn.query_layernorm"), ("attn_k_norm", "self_attn.key_layernorm")],
        derive: hunyuan,
        ..LLAMA
    },
    Arch {
        gguf: "apertus",
        experts: None,
        model_type: "apertus",
        class: "ApertusForCausalLM",
        act: "xielu",
        unpermute_qk: false,
        layer: &[("attn_norm", "attention_layernorm"), ("ffn_norm", "feedforward_layernorm")],
        derive: apertus,
        extra: xielu,
        ..LLAMA
    },
];

/// The architecture of a file (`experts`: it has stacked expert tensors).
pub fn find(gguf: &str, experts: bool) -> Option<&'static Arch> {
    ARCHS.iter().find(|a| a.gguf == gguf && a.experts.is_none_or(|e| e == experts))
}

/// The architectures the import reads, for error messages.
pub fn supported() -> String {
    let mut names: Vec<String> = vec![];
    for a in ARCHS {
        let n = match a.experts {
            Some(true) => format!("{} with experts (mixtral)", a.gguf),
            _ => a.gguf.to_string(),
        };
        if !names.contains(&n) {
            names.push(n);
        }
    }
    names.join(", ")
}

/// What an architecture's config derivation sees: the file, its architecture prefix, the
/// tensors' shapes (GGUF names, row-major dims) and the dequantized tensors that are metadata.
pub struct Meta<'a> {
    pub g: &'a GgufFile,
    pub arch: &'a str,
    pub shapes: &'a std::collections::BTreeMap<String, Vec<usize>>,
    /// `rope_freqs`, `rope_factors_long`, `rope_factors_short` as f32 vectors
    pub factors: &'a std::collections::BTreeMap<String, Vec<f32>>,
    pub layers: usize,
}

impl Meta<'_> {
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }
    pub fn has(&self, k: &str) -> bool {
        self.g.opt(&self.key(k)).is_some()
    }
    pub fn usize(&self, k: &str) -> Result<usize> {
        self.g.usize(&self.key(k))
    }
    pub fn float(&self, k: &str) -> Result<f64> {
        self.g.float(&self.key(k))
    }
    fn layer_has(&self, i: usize, stem: &str) -> bool {
        self.shapes.contains_key(&format!("blk.{i}.{stem}.weight"))
    }
}

impl Arch {
    /// The mlx_lm name of a GGUF tensor: `Some(None)` for tensors that are configuration (RoPE
    /// factors), `None` for a tensor this architecture does not have.
    pub fn hf_name(&self, gguf: &str) -> Option<Option<String>> {
        match gguf {
            "token_embd.weight" => return Some(Some("model.embed_tokens.weight".into())),
            "output_norm.weight" => return Some(Some("model.norm.weight".into())),
            "output_norm.bias" => return Some(Some("model.norm.bias".into())),
            "output.weight" => return Some(Some("lm_head.weight".into())),
            "rope_freqs.weight" | "rope_factors_long.weight" | "rope_factors_short.weight" => return Some(None),
            _ => {}
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (idx, name) = rest.split_once('.')?;
        idx.parse::<usize>().ok()?;
        let (stem, suffix) = name.rsplit_once('.')?;
        if suffix != "weight" && suffix != "bias" {
            return None;
        }
        let path = self.layer.iter().chain(LAYER).find(|(g, _)| *g == stem)?.1;
        let path = path.replace("{moe}", self.moe).replace("{router}", self.router);
        Some(Some(format!("model.layers.{idx}.{path}.{suffix}")))
    }

    /// config.json for this architecture from the file's metadata and tensor shapes.
    pub fn config(&self, m: &Meta, dtype: &str) -> Result<Map<String, Value>> {
        let g = m.g;
        let mut cfg = Map::new();
        cfg.insert("architectures".into(), json!([self.class]));
        cfg.insert("model_type".into(), json!(self.model_type));
        let hidden = m.usize("embedding_length")?;
        let heads = m.usize("attention.head_count")?;
        let kv_heads = if m.has("attention.head_count_kv") { m.usize("attention.head_count_kv")? } else { heads };
        let Some(embd) = m.shapes.get("token_embd.weight") else {
            bail!("{}: the file has no token_embd.weight tensor", g.path.display())
        };
        let head_dim = if m.has("attention.key_length") { m.usize("attention.key_length")? } else { hidden / heads };
        cfg.insert("hidden_size".into(), json!(hidden));
        cfg.insert("num_hidden_layers".into(), json!(m.layers));
        cfg.insert("intermediate_size".into(), json!(intermediate(m)?));
        cfg.insert("num_attention_heads".into(), json!(heads));
        cfg.insert("num_key_value_heads".into(), json!(kv_heads));
        cfg.insert("head_dim".into(), json!(head_dim));
        // LayerNorm architectures (starcoder2, cohere2) have `attention.layer_norm_epsilon` instead
        if m.has("attention.layer_norm_rms_epsilon") || !m.has("attention.layer_norm_epsilon") {
            cfg.insert("rms_norm_eps".into(), json!(m.float("attention.layer_norm_rms_epsilon")?));
        }
        if m.has("rope.freq_base") {
            cfg.insert("rope_theta".into(), json!(m.float("rope.freq_base")?));
        }
        if m.has("context_length") {
            cfg.insert("max_position_embeddings".into(), json!(m.usize("context_length")?));
        }
        cfg.insert("vocab_size".into(), json!(embd[0]));
        cfg.insert("tie_word_embeddings".into(), json!(!m.shapes.contains_key("output.weight")));
        cfg.insert("hidden_act".into(), json!(self.act));
        cfg.insert("torch_dtype".into(), json!(dtype));
        if let Some(s) = rope_scaling(m)? {
            cfg.insert("rope_scaling".into(), s);
        }
        // experts
        if m.has("expert_count") {
            cfg.insert(self.expert_count.into(), json!(m.usize("expert_count")?));
        }
        for (key, field) in [
            ("expert_used_count", "num_experts_per_tok"),
            ("expert_feed_forward_length", "moe_intermediate_size"),
            ("expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
        ] {
            if m.has(key) {
                cfg.insert(field.into(), json!(m.usize(key)?));
            }
        }
        for (key, field, kind) in self.keys {
            if m.has(key) {
                let v = match kind {
                    Kind::Int => json!(m.usize(key)?),
                    Kind::Float => json!(m.float(key)?),
                    Kind::Bool => json!(g.bool(&m.key(key))?),
                };
                cfg.insert(field.to_string(), v);
            }
        }
        (self.derive)(m, &mut cfg)?;
        Ok(cfg)
    }
}

/// `feed_forward_length`, else the first layer's feed-forward rows.
fn intermediate(m: &Meta) -> Result<usize> {
    if m.has("feed_forward_length") {
        return m.usize("feed_forward_length");
    }
    for stem in ["ffn_gate", "ffn_up", "ffn_gate_exps"] {
        if let Some(s) = m.shapes.get(&format!("blk.0.{stem}.weight")) {
            return Ok(s[s.len() - 2]);
        }
    }
    bail!("{}: metadata key `{}` is missing", m.g.path.display(), m.key("feed_forward_length"))
}

/// `rope.scaling.type` linear / yarn as mlx_lm's `rope_scaling`.
fn rope_scaling(m: &Meta) -> Result<Option<Value>> {
    if !m.has("rope.scaling.type") {
        return Ok(None);
    }
    let kind = m.g.string(&m.key("rope.scaling.type"))?;
    Ok(match kind.as_str() {
        "none" => None,
        "linear" => Some(json!({"type": "linear", "factor": m.float("rope.scaling.factor")?})),
        "yarn" => {
            let mut s = Map::new();
            s.insert("rope_type".into(), json!("yarn"));
            s.insert("factor".into(), json!(m.float("rope.scaling.factor")?));
            s.insert(
                "original_max_position_embeddings".into(),
                json!(m.usize("rope.scaling.original_context_length")?),
            );
            for (key, field) in [
                ("rope.scaling.yarn_beta_fast", "beta_fast"),
                ("rope.scaling.yarn_beta_slow", "beta_slow"),
                ("rope.scaling.attn_factor", "attention_factor"),
            ] {
                if m.has(key) {
                    s.insert(field.into(), json!(m.float(key)?));
                }
            }
            Some(Value::Object(s))
        }
        // phi3's factors come as tensors (see `phi3`)
        "longrope" => None,
        other => bail!(
            "{}: {} = `{other}` is not supported (supported: none, linear, yarn, longrope)",
            m.g.path.display(),
            m.key("rope.scaling.type")
        ),
    })
}

fn none(_: &Meta, _: &mut Map<String, Value>) -> Result<()> {
    Ok(())
}

/// Llama 3's `rope_freqs` (one period factor per rotated pair, llama.cpp's form of the
/// `llama3` scaling) as a `longrope` block with those factors and no attention scaling (the
/// original context equals the maximum), which scales each period the same way.
fn rope_freqs(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let Some(f) = m.factors.get("rope_freqs.weight") else { return Ok(()) };
    let ctx = cfg.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(8192);
    cfg.insert("max_position_embeddings".into(), json!(ctx));
    cfg.insert(
        "rope_scaling".into(),
        json!({"type": "longrope", "long_factor": f, "short_factor": f, "original_max_position_embeddings": ctx}),
    );
    Ok(())
}

/// Llama's (and granite's) optional biases, which the file has or not; `rope_freqs`.
fn llama(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    cfg.insert("attention_bias".into(), json!(m.shapes.contains_key("blk.0.attn_q.bias")));
    cfg.insert("mlp_bias".into(), json!(m.shapes.contains_key("blk.0.ffn_up.bias")));
    rope_freqs(m, cfg)
}

/// llama.cpp runs SmolLM3 with RoPE left out of every fourth layer (its fixed
/// `n_no_rope_layer_step`).
fn smollm3(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    cfg.insert("no_rope_layer_interval".into(), json!(4));
    llama(m, cfg)
}

/// Layers without stacked experts are dense; llama.cpp normalizes the top-k weights unless
/// `expert_weights_norm` says otherwise.
fn qwen3_moe(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let dense: Vec<usize> = (0..m.layers).filter(|&i| !m.layer_has(i, "ffn_gate_exps")).collect();
    cfg.insert("decoder_sparse_step".into(), json!(1));
    cfg.insert("mlp_only_layers".into(), json!(dense));
    let norm = if m.has("expert_weights_norm") { m.g.bool(&m.key("expert_weights_norm"))? } else { true };
    cfg.insert("norm_topk_prob".into(), json!(norm));
    Ok(())
}

/// OLMoE: llama.cpp does not normalize the top-k weights unless `expert_weights_norm` says so.
fn olmoe(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let norm = if m.has("expert_weights_norm") { m.g.bool(&m.key("expert_weights_norm"))? } else { false };
    cfg.insert("norm_topk_prob".into(), json!(norm));
    Ok(())
}

/// Phi-3: partial rotary dims, and the longrope factors stored as tensors.
fn phi3(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(1) as f64;
    if m.has("rope.dimension_count") {
        let rot = m.usize("rope.dimension_count")? as f64;
        cfg.insert("partial_rotary_factor".into(), json!(rot / head_dim));
    }
    if let Some(w) = cfg.get("sliding_window").and_then(Value::as_u64) {
        if w == 0 {
            cfg.remove("sliding_window");
        }
    }
    match (m.factors.get("rope_factors_long.weight"), m.factors.get("rope_factors_short.weight")) {
        (Some(long), Some(short)) => {
            cfg.insert("rope_scaling".into(), json!({"type": "longrope", "long_factor": long, "short_factor": short}));
        }
        (None, None) => {}
        _ => bail!("{}: phi3 needs both rope_factors_long and rope_factors_short, or neither", m.g.path.display()),
    }
    Ok(())
}

/// Gemma 2 / 3: llama.cpp's fixed choices: queries scaled by 1/sqrt(head_dim) except in the
/// 27B models (hidden / heads); gemma 3's every sixth layer global and local RoPE base 10000
/// unless the file says otherwise.
fn gemma(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(1);
    let hidden = cfg["hidden_size"].as_u64().unwrap_or(0);
    let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1);
    let is_27b = matches!((m.arch, m.layers), ("gemma2", 46) | ("gemma3", 62));
    cfg.insert("query_pre_attn_scalar".into(), json!(if is_27b { hidden / heads } else { head_dim }));
    if m.arch == "gemma3" {
        let pattern = if m.has("attention.sliding_window_pattern") { sliding_pattern(m)? } else { 6 };
        cfg.insert("sliding_window_pattern".into(), json!(pattern));
        let local = if m.has("rope.freq_base_swa") { m.float("rope.freq_base_swa")? } else { 10000.0 };
        cfg.insert("rope_local_base_freq".into(), json!(local));
    }
    Ok(())
}

/// `attention.sliding_window_pattern`: a period, or one bool per layer (true: sliding) that
/// must repeat with one global layer per period.
fn sliding_pattern(m: &Meta) -> Result<usize> {
    let key = m.key("attention.sliding_window_pattern");
    let v = m.g.opt(&key).expect("checked by the caller");
    if let Ok(n) = m.g.usize(&key) {
        return Ok(n);
    }
    let flags: Vec<bool> = v
        .to_vec()
        .map_err(|_| anyhow::anyhow!("{}: metadata key `{key}` is not an integer or array", m.g.path.display()))?
        .iter()
        .map(|b| b.to_bool().unwrap_or(false))
        .collect();
    let Some(first_global) = flags.iter().position(|s| !s) else { return Ok(flags.len() + 1) };
    let period = first_global + 1;
    if flags.iter().enumerate().any(|(i, &s)| s != ((i + 1) % period != 0)) {
        bail!(
            "{}: metadata key `{key}` is not one global layer every {period} layers, which gemma3 needs",
            m.g.path.display()
        );
    }
    Ok(period)
}

fn no_extra(_: &Meta) -> Result<Tensors> {
    Ok(vec![])
}

fn has_tensor(m: &Meta, name: &str) -> bool {
    m.shapes.contains_key(name)
}

/// `attention.sliding_window_pattern` as one flag per layer (true: sliding), when the file has it
/// as an array.
fn sliding_flags(m: &Meta) -> Result<Option<Vec<bool>>> {
    let key = m.key("attention.sliding_window_pattern");
    let Some(v) = m.g.opt(&key) else { return Ok(None) };
    let flags: Vec<bool> = v
        .to_vec()
        .map_err(|_| anyhow::anyhow!("{}: metadata key `{key}` is not an array of bools", m.g.path.display()))?
        .iter()
        .map(|b| b.to_bool().unwrap_or(false))
        .collect();
    if flags.len() != m.layers {
        bail!("{}: metadata key `{key}` has {} entries for {} layers", m.g.path.display(), flags.len(), m.layers);
    }
    Ok(Some(flags))
}

/// OLMo 2 (llama's optional biases); llama.cpp writes OLMo 3 as `olmo2` with a sliding window
/// and one flag per layer (every fourth layer global when the config had no `layer_types`).
fn olmo2(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    llama(m, cfg)?;
    if cfg.contains_key("sliding_window") {
        let flags = sliding_flags(m)?.unwrap_or_else(|| (0..m.layers).map(|i| (i + 1) % 4 != 0).collect());
        let types: Vec<&str> = flags.iter().map(|&s| if s { "sliding_attention" } else { "full_attention" }).collect();
        cfg.insert("model_type".into(), json!("olmo3"));
        cfg.insert("architectures".into(), json!(["Olmo3ForCausalLM"]));
        cfg.insert("layer_types".into(), json!(types));
    }
    Ok(())
}

/// GLM-4: RoPE over `rope.dimension_count` of each head; optional Q/K/V biases.
fn glm4(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(1) as f64;
    let rot = if m.has("rope.dimension_count") { m.usize("rope.dimension_count")? as f64 } else { head_dim / 2.0 };
    cfg.insert("partial_rotary_factor".into(), json!(rot / head_dim));
    cfg.insert("attention_bias".into(), json!(has_tensor(m, "blk.0.attn_q.bias")));
    Ok(())
}

/// Command R7B: llama.cpp's fixed pattern of three sliding layers and one global (without RoPE);
/// its converter drops the biases; RoPE over whole heads as mlx_lm runs it.
fn cohere2(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    let head_dim = cfg["head_dim"].as_u64().unwrap_or(0) as usize;
    if m.has("rope.dimension_count") && m.usize("rope.dimension_count")? != head_dim {
        bail!(
            "{}: {} = {} is partial RoPE, which mlx_lm's cohere2 does not run (head_dim {head_dim})",
            m.g.path.display(),
            m.key("rope.dimension_count"),
            m.usize("rope.dimension_count")?
        );
    }
    cfg.insert("sliding_window_pattern".into(), json!(4));
    cfg.insert("attention_bias".into(), json!(has_tensor(m, "blk.0.attn_q.bias")));
    cfg.insert("layer_norm_bias".into(), json!(has_tensor(m, "blk.0.attn_norm.bias")));
    Ok(())
}

/// EXAONE 4: the per-layer sliding flags as mlx_lm's `sliding_window_pattern` string (one `L`
/// or `G` per layer); llama 3 RoPE factors as `rope_freqs`.
fn exaone4(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    if let Some(flags) = sliding_flags(m)? {
        let pattern: String = flags.iter().map(|&s| if s { 'L' } else { 'G' }).collect();
        cfg.insert("sliding_window_pattern".into(), json!(pattern));
    }
    rope_freqs(m, cfg)
}

/// Seed-OSS: llama's optional biases, the output projection's on its own.
fn seed_oss(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    cfg.insert("attention_out_bias".into(), json!(has_tensor(m, "blk.0.attn_output.bias")));
    llama(m, cfg)
}

/// Hunyuan dense: llama.cpp writes the NTK-alpha scaling as the RoPE base it gives.
fn hunyuan(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    cfg.insert("attention_bias".into(), json!(has_tensor(m, "blk.0.attn_q.bias")));
    cfg.insert("use_qk_norm".into(), json!(has_tensor(m, "blk.0.attn_q_norm.weight")));
    Ok(())
}

/// Apertus: llama's optional biases and `rope_freqs`; Q/K norms when the file has them.
fn apertus(m: &Meta, cfg: &mut Map<String, Value>) -> Result<()> {
    cfg.insert("qk_norm".into(), json!(has_tensor(m, "blk.0.attn_q_norm.weight")));
    cfg.insert("post_norm".into(), json!(false));
    llama(m, cfg)
}

/// Apertus's xIELU scalars, which llama.cpp keeps as per-layer arrays `xielu.*`.
fn xielu(m: &Meta) -> Result<Tensors> {
    let mut out = vec![];
    for p in ["alpha_n", "alpha_p", "beta", "eps"] {
        let key = format!("xielu.{p}");
        let v = m.g.floats(&key)?;
        if v.len() != m.layers {
            bail!("{}: metadata key `{key}` has {} values for {} layers", m.g.path.display(), v.len(), m.layers);
        }
        for (i, x) in v.into_iter().enumerate() {
            out.push((format!("model.layers.{i}.mlp.act_fn.{p}"), Tensor::new(x, &Device::Cpu)?));
        }
    }
    Ok(out)
}
