//! Multi-head latent attention (MLA), as mlx_lm's `models/mla.py` and the attention of
//! `deepseek_v3.py` have it, shared by deepseek_v3 (and Kimi K2 / K2.5), glm4_moe_lite and
//! mistral4.
//!
//! Keys and values come from one compressed latent per token: `kv_a_proj_with_mqa` gives the
//! latent (`kv_lora_rank`, normed by `kv_a_layernorm`) and a RoPE key (`qk_rope_head_dim`) that
//! every head shares. The cache keeps only those two (keys: the latent (B, 1, S, r); values:
//! the roped key (B, 1, S, dr)), mlx_lm's layout, so `wick` and mlx_lm read each other's prompt
//! caches. The per-head key and value up-projections (`embed_q`, heads × r × nope;
//! `unembed_out`, heads × v × r) are [`MultiLinear`]s:
//! - a prompt chunk (L > 1) expands the cached latents into per-head keys and values and
//!   attends over them as usual;
//! - a decode step (L = 1) absorbs `embed_q` into the query and `unembed_out` into the output,
//!   and attends over the latents themselves ([`latent_attention`]): no per-head key or value is
//!   formed.
//!
//! Scores are `scale · (q_nope · k_nope + q_pe · k_pe)` on both paths; the scale is
//! `(nope + rope)^-0.5` times yarn's `mscale_all_dim` correction squared.

use super::attention::{llama4_query_scale, row_positions, SelfAttention};
use crate::cache::KvCache;
use crate::io::Weights;
use crate::nn::{Linear, Loader, MultiLinear, Normed, RmsNorm, RopeTables};
use crate::ops::attention::{latent_attention, scaled_dot_product_attention};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

/// The shapes of an MLA layer, from config.json.
#[derive(Debug, Clone, Copy)]
pub struct MlaDims {
    pub heads: usize,
    /// `q_lora_rank`: the queries' low-rank bottleneck, or one `q_proj` without it
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
}

impl MlaDims {
    /// A query head's width: its non-RoPE and RoPE parts.
    pub fn q_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// The softmax scale `q_head_dim^-0.5`, times `s²` with `s = 0.1 · mscale_all_dim · ln(factor) + 1`
/// where `rope_scaling` has a non-zero `mscale_all_dim` and a `factor` above 1 (yarn's
/// attention-temperature correction, as DeepSeek's attention applies it).
pub fn softmax_scale(q_head_dim: usize, rope_scaling: Option<&serde_json::Value>) -> Result<f64> {
    let scale = (q_head_dim as f64).powf(-0.5);
    let Some(s) = rope_scaling else { return Ok(scale) };
    let mscale_all_dim = s.get("mscale_all_dim").and_then(|v| v.as_f64()).unwrap_or(0.0);
    if mscale_all_dim == 0.0 {
        return Ok(scale);
    }
    let Some(factor) = s.get("factor").and_then(|v| v.as_f64()) else {
        bail!("config.json: rope_scaling has `mscale_all_dim` but no `factor`")
    };
    if factor <= 1.0 {
        return Ok(scale);
    }
    let m = 0.1 * mscale_all_dim * factor.ln() + 1.0;
    Ok(scale * m * m)
}

/// The queries' projection: one `q_proj`, or with `q_lora_rank` the low-rank pair
/// `q_b_proj(q_a_layernorm(q_a_proj(x)))`.
pub enum QueryProj {
    Direct(Linear),
    LowRank { q_a_proj: Linear, q_a_layernorm: RmsNorm, q_b_proj: Linear },
}

impl QueryProj {
    /// The projection of layer prefix `p` (`{p}.q_proj` or `{p}.q_a_proj` …); `bias`: whether
    /// `q_a_proj` has one (`attention_bias`); `eps`: the `q_a_layernorm`'s.
    pub fn load(ld: &Loader, p: &str, dims: &MlaDims, hidden: usize, bias: bool, eps: f64) -> Result<Self> {
        let out = dims.heads * dims.q_head_dim();
        Ok(match dims.q_lora_rank {
            None => Self::Direct(Linear::load(ld, &format!("{p}.q_proj"), hidden, out, false)?),
            Some(rank) => Self::LowRank {
                q_a_proj: Linear::load(ld, &format!("{p}.q_a_proj"), hidden, rank, bias)?,
                q_a_layernorm: RmsNorm::load(ld, &format!("{p}.q_a_layernorm"), rank, eps)?,
                q_b_proj: Linear::load(ld, &format!("{p}.q_b_proj"), rank, out, false)?,
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Direct(q) => q.forward(x),
            Self::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
                q_b_proj.forward(&q_a_layernorm.forward(&q_a_proj.forward(x)?)?)
            }
        }
    }

    /// The queries of `x` (B, L, hidden) split into heads: their non-RoPE and RoPE parts,
    /// (B, H, L, nope) and (B, H, L, rope).
    pub fn heads(&self, x: &Tensor, dims: &MlaDims) -> Result<(Tensor, Tensor)> {
        let (b, l, _) = x.dims3()?;
        let q = self.forward(x)?.reshape((b, l, dims.heads, dims.q_head_dim()))?.transpose(1, 2)?;
        let nope = q.narrow(D::Minus1, 0, dims.qk_nope_head_dim)?;
        Ok((nope, q.narrow(D::Minus1, dims.qk_nope_head_dim, dims.qk_rope_head_dim)?.contiguous()?))
    }
}

/// `kv_a_proj_with_mqa`'s output (B, L, r + dr) split into the latent (B, L, r) and the shared
/// RoPE key (B, 1, L, dr), not yet roped.
pub fn split_latent(ckv: &Tensor, dims: &MlaDims) -> Result<(Tensor, Tensor)> {
    let (b, l, _) = ckv.dims3()?;
    let latent = ckv.narrow(D::Minus1, 0, dims.kv_lora_rank)?.contiguous()?;
    let k_pe = ckv.narrow(D::Minus1, dims.kv_lora_rank, dims.qk_rope_head_dim)?;
    Ok((latent, k_pe.reshape((b, l, 1, dims.qk_rope_head_dim))?.transpose(1, 2)?.contiguous()?))
}

/// One MLA layer.
pub struct MlaAttention {
    pub q: QueryProj,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    pub embed_q: MultiLinear,
    pub unembed_out: MultiLinear,
    pub o_proj: Linear,
    pub dims: MlaDims,
    pub scale: f64,
    /// Mistral 4: the queries scaled with their position, `(β, original_max_position_embeddings)`
    /// of [`llama4_query_scale`]
    pub position_scaling: Option<(f64, f64)>,
}

impl MlaAttention {
    /// The layer of prefix `p` (`{p}.q_a_proj` …); `bias`: `attention_bias` (on `q_a_proj`,
    /// `kv_a_proj_with_mqa` and `o_proj`); `eps`: the `q_a_layernorm` / `kv_a_layernorm`
    /// epsilon.
    pub fn load(ld: &Loader, p: &str, dims: MlaDims, hidden: usize, bias: bool, eps: f64, scale: f64) -> Result<Self> {
        let (h, r) = (dims.heads, dims.kv_lora_rank);
        let (dn, dr, dv) = (dims.qk_nope_head_dim, dims.qk_rope_head_dim, dims.v_head_dim);
        let q = format!("num_attention_heads {h} × (qk_nope_head_dim {dn} + qk_rope_head_dim {dr})");
        check_rows(ld, &format!("{p}.q_proj"), &[h * (dn + dr)], &q)?;
        check_rows(ld, &format!("{p}.q_b_proj"), &[h * (dn + dr)], &q)?;
        if let Some(rank) = dims.q_lora_rank {
            check_rows(ld, &format!("{p}.q_a_proj"), &[rank], &format!("q_lora_rank {rank}"))?;
        }
        let kv_a = format!("kv_lora_rank {r} + qk_rope_head_dim {dr}");
        check_rows(ld, &format!("{p}.kv_a_proj_with_mqa"), &[r + dr], &kv_a)?;
        check_rows(ld, &format!("{p}.embed_q"), &[h, r], &format!("num_attention_heads {h}, kv_lora_rank {r}"))?;
        check_rows(ld, &format!("{p}.unembed_out"), &[h, dv], &format!("num_attention_heads {h}, v_head_dim {dv}"))?;
        Ok(Self {
            q: QueryProj::load(ld, p, &dims, hidden, bias, eps)?,
            kv_a_proj_with_mqa: Linear::load(
                ld,
                &format!("{p}.kv_a_proj_with_mqa"),
                hidden,
                r + dims.qk_rope_head_dim,
                bias,
            )?,
            kv_a_layernorm: RmsNorm::load(ld, &format!("{p}.kv_a_layernorm"), r, eps)?,
            embed_q: MultiLinear::load(ld, &format!("{p}.embed_q"), dims.qk_nope_head_dim, r, h)?,
            unembed_out: MultiLinear::load(ld, &format!("{p}.unembed_out"), r, dims.v_head_dim, h)?,
            o_proj: Linear::load(ld, &format!("{p}.o_proj"), h * dims.v_head_dim, hidden, bias)?,
            dims,
            scale,
            position_scaling: None,
        })
    }
}

impl SelfAttention for MlaAttention {
    fn forward(&self, x: &Normed, rope: &RopeTables, cache: &mut KvCache) -> Result<Tensor> {
        let x = x.tensor()?;
        let (b, l, _) = x.dims3()?;
        let d = &self.dims;
        let (mut q_nope, q_pe) = self.q.heads(&x, d)?;
        let (latent, k_pe) = split_latent(&self.kv_a_proj_with_mqa.forward(&x)?, d)?;
        let latent = self.kv_a_layernorm.forward(&latent)?.unsqueeze(1)?; // (B, 1, L, r)
        let mut q_pe = rope.apply(&q_pe)?;
        let k_pe = rope.apply(&k_pe)?;
        if let Some((beta, original)) = self.position_scaling {
            let s = row_positions(cache, b, l).into_iter().map(|p| llama4_query_scale(p, beta, original));
            let s = Tensor::from_iter(s, q_pe.device())?.reshape((b, 1, l, 1))?.to_dtype(q_pe.dtype())?;
            (q_nope, q_pe) = (q_nope.broadcast_mul(&s)?, q_pe.broadcast_mul(&s)?);
        }
        let mask = cache.mask(l);
        let (latent, k_pe) = cache.update_and_fetch(&latent, &k_pe)?;
        let out = if l == 1 {
            // absorbed: the query into latent space, attention over the latents, back out
            let q_lat = self.embed_q.forward(&q_nope.contiguous()?)?; // (B, H, 1, r)
            let out = latent_attention(&q_lat, &q_pe, &latent, &k_pe, self.scale, mask)?;
            self.unembed_out.forward(&out)? // (B, H, 1, dv)
        } else {
            let k_nope = self.embed_q.forward_untransposed(&latent)?; // (B, H, S, nope)
            let v = self.unembed_out.forward(&latent)?; // (B, H, S, dv)
            let (s, h) = (latent.dim(2)?, d.heads);
            let k_pe = k_pe.broadcast_as((b, h, s, d.qk_rope_head_dim))?.contiguous()?;
            let q = Tensor::cat(&[&q_nope.contiguous()?, &q_pe], D::Minus1)?;
            let k = Tensor::cat(&[&k_nope.contiguous()?, &k_pe], D::Minus1)?;
            scaled_dot_product_attention(&q, &k, &v.contiguous()?, self.scale, mask, None)?
        };
        Ok(out.transpose(1, 2)?.reshape((b, l, d.heads * d.v_head_dim))?)
    }

    fn o_proj(&self) -> &Linear {
        &self.o_proj
    }

    /// Not captured: the latent decode step has no CUDA-graph kernel yet.
    fn graphable(&self) -> bool {
        false
    }
}

/// An older MLX conversion's quantized `{p}.kv_b_proj` (affine, heads·(nope + v) × r): as mlx_lm's
/// sanitize, dequantized, split into the per-head key (transposed) and value parts, and each
/// quantized again with the same bits and group size along its own last axis (lossy: the
/// groups now run along another axis).
fn requantize_kv_b(weights: &mut Weights, p: &str, d: &MlaDims) -> Result<()> {
    let (h, dn, dv, r) = (d.heads, d.qk_nope_head_dim, d.v_head_dim, d.kv_lora_rank);
    let cpu = candle_core::Device::Cpu;
    let part = |n: &str| weights.raw(&format!("{p}.kv_b_proj.{n}"), &cpu);
    let (w, scales, biases) = (part("weight")?, part("scales")?, part("biases")?);
    let (rows, words) = w.dims2()?;
    let groups = scales.dim(1)?;
    if rows != h * (dn + dv) || words * 32 % r != 0 || groups == 0 || r % groups != 0 {
        bail!(
            "quantized `{p}.kv_b_proj.weight` is [{rows}, {words}] u32 with {groups} scale groups per row, but config.json's num_attention_heads {h} × (qk_nope_head_dim {dn} + v_head_dim {dv}) and kv_lora_rank {r} make it [{}, r·bits/32]",
            h * (dn + dv)
        );
    }
    let params = crate::quant::QuantParams::new(words * 32 / r, r / groups, &format!("layer `{p}.kv_b_proj`"))?;
    let v = crate::ops::qmatmul::dequantize_tensor(&w, &scales, &biases, params)?.reshape((h, dn + dv, r))?;
    let wk = v.narrow(1, 0, dn)?.transpose(1, 2)?.contiguous()?; // (H, r, nope)
    let wv = v.narrow(1, dn, dv)?.contiguous()?; // (H, v, r)
    for (name, t, last) in [("embed_q", wk, dn), ("unembed_out", wv, r)] {
        if last % params.group_size != 0 {
            bail!(
                "`{p}.kv_b_proj` is quantized in groups of {}, which do not divide the {last} inputs of its `{name}` part",
                params.group_size
            );
        }
        let (packed, s, b) = crate::quant::quantize_tensor(&t, params)?;
        weights.insert(&format!("{p}.{name}.weight"), packed)?;
        weights.insert(&format!("{p}.{name}.scales"), s)?;
        weights.insert(&format!("{p}.{name}.biases"), b)?;
    }
    for n in ["weight", "scales", "biases"] {
        weights.remove(&format!("{p}.kv_b_proj.{n}"));
    }
    Ok(())
}

/// Fails, naming the tensor and the config fields (`fields`) that size it, unless the leading
/// dimensions of the layer `{prefix}.weight` (its rows, the same packed or not) are `want`; a
/// missing tensor is left to the loader's own error.
fn check_rows(ld: &Loader, prefix: &str, want: &[usize], fields: &str) -> Result<()> {
    let name = format!("{prefix}.weight");
    if !ld.weights.contains(&name) {
        return Ok(());
    }
    let shape = ld.weights.shape(&name)?;
    if shape.len() != want.len() + 1 || shape[..want.len()] != *want {
        bail!(
            "tensor `{name}` in {} has shape {shape:?}, but config.json's {fields} make its leading dimensions {want:?}",
            ld.weights.dir.display()
        );
    }
    Ok(())
}

/// Splits Hugging Face's `{p}.kv_b_proj.weight` (heads·(nope + v) × r, each head's key rows then
/// its value rows) into mlx's `{p}.embed_q.weight` (heads × r × nope, the key part transposed)
/// and `{p}.unembed_out.weight` (heads × v × r), as mlx_lm's `sanitize` does; nothing is read
/// until the tensors are.
pub fn split_kv_b(weights: &mut Weights, p: &str, d: &MlaDims) -> Result<()> {
    let kv_b = format!("{p}.kv_b_proj.weight");
    if !weights.contains(&kv_b) {
        return Ok(());
    }
    let (h, dn, dv, r) = (d.heads, d.qk_nope_head_dim, d.v_head_dim, d.kv_lora_rank);
    if weights.contains(&format!("{p}.kv_b_proj.scales")) {
        return requantize_kv_b(weights, p, d);
    }
    let shape = weights.shape(&kv_b)?;
    if shape != [h * (dn + dv), r] {
        bail!(
            "`{kv_b}` is {shape:?}, but config.json's num_attention_heads {h} × (qk_nope_head_dim {dn} + v_head_dim {dv}) and kv_lora_rank {r} make it [{}, {r}]",
            h * (dn + dv)
        );
    }
    weights.split_first(&kv_b, h)?;
    let (embed_q, unembed_out) = (format!("{p}.embed_q.weight"), format!("{p}.unembed_out.weight"));
    weights.split_sizes(&kv_b, 1, &[(embed_q.clone(), dn), (unembed_out, dv)])?;
    weights.transpose(&embed_q, 1, 2)
}
