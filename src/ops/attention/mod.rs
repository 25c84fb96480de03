//! Attention: causal scaled dot-product attention over a KV cache's keys and values (prefill:
//! matmul + mask + softmax, or flash attention on CUDA), the decode step's own kernel (CPU and
//! CUDA), a CUDA graph's fused step (RoPE, cache write and attention in one launch), and the
//! device-position cache write.

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::ops::rope::RopeTables;
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use std::sync::Arc;

/// Which keys the queries of one forward pass may see: query `i` sits at index `offset + i` of
/// the keys attention is given and sees key `j` when `j <= offset + i` and,
/// with a window, `j > offset + i - window`, with a chunk size only keys of the query's chunk.
/// In a left-padded batch, row `b` also never sees keys before `left_padding[b]` (a padding
/// query sees only itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskSpec {
    pub offset: usize,
    pub window: Option<usize>,
    /// chunked attention (llama 4): a query sees only the keys of its own chunk of this many
    /// positions (positions counted from each row's first, after its padding)
    pub chunk: Option<usize>,
    pub left_padding: Option<Arc<[usize]>>,
    /// a decode step captured into a CUDA graph: the keys seen end at this device position
    /// (the step's keys are the cache's whole buffer)
    pub pos: Option<DevicePos>,
}

/// What a replayed decode step reads on the device instead of taking as kernel arguments (a
/// CUDA graph replays one captured step at every position): `pos`, one u32, the position the
/// step writes and attends up to; `starts`, one u32 per batch row, the first key the row may
/// see (its left padding); `done`, u32 zeros the fused step attention counts its blocks in
/// ([`cuda::STEP_COUNTERS`] of them, left at zero by every launch). Compared by identity.
#[derive(Debug, Clone)]
pub struct DevicePos {
    pub pos: Tensor,
    pub starts: Tensor,
    pub done: Tensor,
}

impl PartialEq for DevicePos {
    fn eq(&self, other: &Self) -> bool {
        self.pos.id() == other.pos.id() && self.starts.id() == other.starts.id()
    }
}

impl Eq for DevicePos {}

/// Writes a decode step's keys or values into the cache buffer at the [`DevicePos`].
struct KvWrite;

impl candle_core::InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        _: &mut candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        candle_core::bail!("device-position cache writes exist for CUDA graphs only")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &candle_core::Layout,
        src: &candle_core::CudaStorage,
        sl: &candle_core::Layout,
        pos: &candle_core::CudaStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        cuda::kv_write((cache, cl), (src, sl), pos)
    }
}

/// Writes `src`, a decode step's keys or values (B, heads, 1, d), into the cache buffer `buf`
/// at the device position `pos` (CUDA graphs only).
pub fn write_at_device_pos(buf: &Tensor, src: &Tensor, pos: &Tensor) -> Result<()> {
    Ok(buf.inplace_op3(&src.contiguous()?, pos, &KvWrite)?)
}

/// A decode step captured into a CUDA graph ([`MaskSpec::pos`]): RoPE of `q` and `k`, the
/// cache write of `k` and `v` and the attention of `q` over the cache in one kernel
/// (`cuda::DecodeStep`); returns the attention's output (B, H, 1, D). `None`: the step
/// does not fit the kernel (RoPE over part of the head, another cache dtype, value heads of
/// another size, too many heads); apply RoPE, update the cache and attend the usual way.
#[allow(clippy::too_many_arguments)]
pub fn decode_step_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    rope: &RopeTables,
    mask: &MaskSpec,
    buffers: Option<(Tensor, Tensor)>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if let (Some(pos), Some((keys, values))) = (&mask.pos, &buffers) {
        let (b, h, _, d) = q.dims4()?;
        if rope.dims == d
            && k.dim(3)? == d
            && v.dim(3)? == d
            && b * h <= cuda::STEP_COUNTERS
            && rope.cos.dtype() == q.dtype()
            && own_decode_attention(q, keys, values)?
        {
            let op = cuda::DecodeStep {
                cos: rope.cos.clone(),
                sin: rope.sin.clone(),
                traditional: rope.traditional,
                pos: pos.pos.clone(),
                starts: pos.starts.clone(),
                done: pos.done.clone(),
                keys: keys.clone(),
                values: values.clone(),
                scale: scale as f32,
                softcap: softcap.map(|c| c as f32),
            };
            let out = q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &op)?;
            return Ok(Some(out));
        }
    }
    let _ = (q, k, v, rope, mask, buffers, scale, softcap);
    Ok(None)
}

/// Causal attention of `q` (B, H, L, D) over `k`, `v` (B, KV, T, D), the queries at key indices
/// `mask.offset ..` (optionally within a sliding window); grouped-query heads share their KV head
/// without copying it.
///
/// With `softcap`, scores become `softcap · tanh(scores / softcap)` before the mask (gemma2).
/// One query (decode) runs wick's decode-attention kernel (CPU and CUDA); several on CUDA in
/// f16 / bf16 run the flash-attention kernel (`cuda::PrefillAttention`); the rest go
/// through matmul, mask and softmax.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: MaskSpec,
    softcap: Option<f64>,
) -> Result<Tensor> {
    if q.dim(2)? == 1 && !q.track_op() && k.stride()[3] == 1 && v.stride()[3] == 1 && own_decode_attention(q, k, v)? {
        let starts = match mask.chunk {
            // the first key of each row's chunk (positions start after the row's padding)
            Some(c) if mask.pos.is_none() => {
                let pads: Vec<usize> =
                    mask.left_padding.as_deref().map_or_else(|| vec![0; q.dim(0).unwrap_or(1)], |p| p.to_vec());
                Some(pads.iter().map(|&p| p + (mask.offset.saturating_sub(p) / c) * c).collect())
            }
            Some(_) => anyhow::bail!("chunked attention has no CUDA-graph decode kernel"),
            None => mask.left_padding,
        };
        let op = DecodeAttention { scale: scale as f32, softcap: softcap.map(|c| c as f32), starts, pos: mask.pos };
        return Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?);
    }
    if mask.pos.is_some() {
        anyhow::bail!("a decode step captured into a CUDA graph needs wick's decode-attention kernel");
    }
    #[cfg(feature = "cuda")]
    if q.dim(2)? > 1 && mask.chunk.is_none() && cuda::PrefillAttention::fits(q, k, v)? {
        let op = cuda::PrefillAttention {
            scale: scale as f32,
            softcap: softcap.map(|c| c as f32),
            offset: mask.offset,
            window: mask.window,
            starts: mask.left_padding,
        };
        // the kernel writes (B, L, H, D): the callers' transpose back is then free
        return Ok(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2)?);
    }
    matmul_attention(q, k, v, scale, &mask, softcap, None)
}

/// Causal attention as [`scaled_dot_product_attention`] with a learned sink logit per query
/// head (`sinks`, H): each head's softmax also counts `exp(sink)` in its denominator, so a
/// query may attend to nothing (gpt-oss; mlx's `scaled_dot_product_attention(…, sinks)`).
pub fn attention_with_sinks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: MaskSpec,
    sinks: &Tensor,
) -> Result<Tensor> {
    if mask.pos.is_some() {
        anyhow::bail!("attention with sinks has no CUDA-graph decode kernel");
    }
    matmul_attention(q, k, v, scale, &mask, None, Some(sinks))
}

/// The decode step of multi-head latent attention, over a latent cache whose one "head" serves
/// every query head: query head `h` scores key `j` as
/// `scale · (q_lat[h] · latent[j] + q_pe[h] · k_pe[j])` and takes the softmax-weighted sum of
/// the latents. `q_lat` (B, H, 1, r) is the query already absorbed into latent space, `q_pe`
/// (B, H, 1, dr) its RoPE part; `latent` (B, 1, S, r) and `k_pe` (B, 1, S, dr) are the cache's
/// keys and values. Returns (B, H, 1, r). The heads are the rows of one matmul per batch row, so
/// no per-head keys or values are ever formed.
pub fn latent_attention(
    q_lat: &Tensor,
    q_pe: &Tensor,
    latent: &Tensor,
    k_pe: &Tensor,
    scale: f64,
    mask: MaskSpec,
) -> Result<Tensor> {
    let (b, h, l, r) = q_lat.dims4()?;
    let dr = q_pe.dim(3)?;
    if l != 1 || latent.dim(1)? != 1 || k_pe.dim(1)? != 1 {
        anyhow::bail!("latent attention: one query position over one latent head (got {l} and {})", latent.dim(1)?);
    }
    let t = latent.dim(2)?;
    if mask.pos.is_some() || mask.chunk.is_some() || mask.window.is_some_and(|w| w < t) {
        anyhow::bail!("latent attention has no CUDA-graph, chunked or windowed decode step");
    }
    let q = q_lat.reshape((b, 1, h, r))?;
    let qp = q_pe.reshape((b, 1, h, dr))?;
    let scores = (q.matmul(&latent.t()?)?.to_dtype(DType::F32)? + qp.matmul(&k_pe.t()?)?.to_dtype(DType::F32)?)?;
    let scores = (scores * scale)?;
    let scores = match mask.left_padding {
        Some(_) => scores.broadcast_add(&causal_mask(h, 1, t, &mask, q.device())?)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(latent.dtype())?;
    Ok(probs.matmul(&latent.contiguous()?)?.reshape((b, h, 1, r))?)
}

/// Attention through matmul, mask and softmax (in f32), optionally soft-capped and with sinks.
fn matmul_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: &MaskSpec,
    softcap: Option<f64>,
    sinks: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, h, l, d) = q.dims4()?;
    let kv = k.dim(1)?;
    let t = k.dim(2)?;
    let n_rep = h / kv;
    let q = (q.reshape((b, kv, n_rep * l, d))? * scale)?;
    let scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
    let scores = match softcap {
        Some(c) => ((scores / c)?.tanh()? * c)?,
        None => scores,
    };
    let scores = if l > 1 || mask.left_padding.is_some() {
        let mask = causal_mask(n_rep, l, t, mask, q.device())?;
        scores.broadcast_add(&mask)?
    } else {
        scores
    };
    // the sinks as one more key column: head `kv·n_rep + r`'s logit on rows `r·L .. (r+1)·L`
    let scores = match sinks {
        Some(s) => {
            let col = s.to_dtype(DType::F32)?.reshape((1, kv, n_rep, 1, 1))?;
            let col = col.broadcast_as((b, kv, n_rep, l, 1))?.reshape((b, kv, n_rep * l, 1))?;
            Tensor::cat(&[&scores.broadcast_as((b, kv, n_rep * l, t))?, &col], D::Minus1)?
        }
        None => scores,
    };
    let probs = if scores.track_op() {
        candle_nn::ops::softmax(&scores, D::Minus1)? // differentiable (training)
    } else {
        candle_nn::ops::softmax_last_dim(&scores)?
    };
    let probs = if sinks.is_some() { probs.narrow(D::Minus1, 0, t)?.contiguous()? } else { probs };
    let probs = probs.to_dtype(v.dtype())?;
    let out = probs.matmul(&v.contiguous()?)?;
    Ok(out.reshape((b, h, l, v.dim(3)?))?)
}

/// Additive mask (n_rep·L, T): query `i` (at key index offset + i) sees keys `j <= offset + i`,
/// and with a window only `j > offset + i - window`. With left padding it is (B, 1, n_rep·L, T)
/// and row `b` sees no key before `left_padding[b]`; a padding query sees only itself, so that
/// its softmax stays finite.
fn causal_mask(n_rep: usize, l: usize, t: usize, spec: &MaskSpec, device: &Device) -> Result<Tensor> {
    // Every layer of one forward pass asks for the same mask: build and upload it once.
    type Key = (usize, usize, usize, MaskSpec);
    thread_local! {
        static LAST: std::cell::RefCell<Option<(Key, Tensor)>> = const { std::cell::RefCell::new(None) };
    }
    let key: Key = (n_rep, l, t, spec.clone());
    let hit = |(k, m): &(Key, Tensor)| *k == key && m.device().same_device(device);
    if let Some(m) = LAST.with_borrow(|last| last.as_ref().filter(|e| hit(e)).map(|(_, m)| m.clone())) {
        return Ok(m);
    }
    let m = build_causal_mask(n_rep, l, t, spec, device)?;
    LAST.with_borrow_mut(|last| *last = Some((key, m.clone())));
    Ok(m)
}

fn build_causal_mask(n_rep: usize, l: usize, t: usize, spec: &MaskSpec, device: &Device) -> Result<Tensor> {
    let pads: &[usize] = spec.left_padding.as_deref().unwrap_or(&[0]);
    let mut m = Vec::with_capacity(pads.len() * n_rep * l * t);
    for &pad in pads {
        for _ in 0..n_rep {
            for i in 0..l {
                let q = spec.offset + i;
                for j in 0..t {
                    let same_chunk = spec.chunk.is_none_or(|c| j < pad || (j - pad) / c == q.saturating_sub(pad) / c);
                    let visible = j <= q && spec.window.is_none_or(|w| j + w > q) && (j >= pad || j == q) && same_chunk;
                    m.push(if visible { 0.0 } else { f32::NEG_INFINITY });
                }
            }
        }
    }
    Ok(match spec.left_padding {
        Some(_) => Tensor::from_vec(m, (pads.len(), 1, n_rep * l, t), device)?,
        None => Tensor::from_vec(m, (n_rep * l, t), device)?,
    })
}

/// Whether [`DecodeAttention`] runs this decode step: always on the CPU; on CUDA within the
/// kernel's limits (head size at most 256, whole query heads per KV head, one dtype). The fused
/// step of a CUDA graph ([`decode_step_attention`]) shares them.
fn own_decode_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<bool> {
    if q.device().is_cpu() {
        return Ok(true);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() {
        let (h, kvh) = (q.dim(1)?, k.dim(1)?);
        let ok = h % kvh == 0
            && q.dim(3)? <= cuda::ATTN_MAX_HEAD_DIM
            && v.dim(3)? <= cuda::ATTN_MAX_HEAD_DIM
            && k.dtype() == q.dtype()
            && v.dtype() == q.dtype();
        return Ok(ok);
    }
    let _ = (k, v);
    Ok(false)
}

/// Attention of one query position over the whole cache on the CPU (the decode step): per head,
/// scores by dot products against the strided cache, softmax in f32, weighted sum of values.
struct DecodeAttention {
    scale: f32,
    softcap: Option<f32>,
    /// per batch row, the first key it may see (left padding)
    starts: Option<std::sync::Arc<[usize]>>,
    /// CUDA graphs: the device position the keys end at (`k`, `v` are the whole cache buffer)
    /// and the rows' first keys, read there instead of `starts`
    pos: Option<DevicePos>,
}

impl candle_core::CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &candle_core::CudaStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CudaStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CudaStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        let (starts, pos) = (self.starts.as_deref(), self.pos.as_ref());
        let pos = pos.map(|p| (&p.pos, &p.starts));
        cuda::decode_attention((qs, ql), (ks, kl), (vs, vl), self.scale, self.softcap, starts, pos)
    }

    fn cpu_fwd(
        &self,
        qs: &candle_core::CpuStorage,
        ql: &candle_core::Layout,
        ks: &candle_core::CpuStorage,
        kl: &candle_core::Layout,
        vs: &candle_core::CpuStorage,
        vl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use crate::backend::cpu::Elem;
        use candle_core::CpuStorage as C;
        let (b, h, _, d) = ql.shape().dims4()?;
        let (_, kvh, t, _) = kl.shape().dims4()?;
        let dv = vl.shape().dims4()?.3;
        let n_rep = h / kvh;
        let (qa, _) = ql.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("query not contiguous".into()))?;
        let (scale, softcap) = (self.scale, self.softcap);
        if self.pos.is_some() {
            candle_core::bail!("decode attention at a device position runs on CUDA only");
        }
        let starts: &[usize] = self.starts.as_deref().unwrap_or(&[]);
        #[allow(clippy::too_many_arguments)]
        fn go<T: Elem>(
            q: &[T],
            k: &[T],
            v: &[T],
            kl: &candle_core::Layout,
            vl: &candle_core::Layout,
            dims: (usize, usize, usize, usize, usize, usize, usize),
            (scale, softcap): (f32, Option<f32>),
            starts: &[usize],
        ) -> Vec<T> {
            use rayon::prelude::*;
            let (b, h, d, dv, t, n_rep, _kvh) = dims;
            let (ks, vs) = (kl.stride(), vl.stride());
            let (ko, vo) = (kl.start_offset(), vl.start_offset());
            let mut out = vec![T::from_f32(0.0); b * h * dv];
            // one (batch, head) pair per task (a head over 32+ positions outweighs a rayon
            // dispatch); tiny contexts stay on this thread
            let head = |bh: usize, o: &mut [T]| {
                let (bi, hi) = (bh / h, bh % h);
                let kv = hi / n_rep;
                let mut qf = vec![0f32; d];
                T::to_f32_slice(&q[bh * d..(bh + 1) * d], &mut qf);
                let kbase = ko + bi * ks[0] + kv * ks[1];
                let first = starts.get(bi).copied().unwrap_or(0).min(t.saturating_sub(1));
                let mut scores = vec![0f32; t];
                let mut max = f32::NEG_INFINITY;
                for (ti, sc) in scores.iter_mut().enumerate().skip(first) {
                    let row = &k[kbase + ti * ks[2]..kbase + ti * ks[2] + d];
                    *sc = T::dot(&qf, row) * scale;
                    if let Some(c) = softcap {
                        *sc = c * (*sc / c).tanh();
                    }
                    max = max.max(*sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut().skip(first) {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let mut acc = vec![0f32; dv];
                let vbase = vo + bi * vs[0] + kv * vs[1];
                for (ti, sc) in scores.iter().enumerate().skip(first) {
                    T::axpy(sc / sum, &v[vbase + ti * vs[2]..vbase + ti * vs[2] + dv], &mut acc);
                }
                for (x, a) in o.iter_mut().zip(&acc) {
                    *x = T::from_f32(*a);
                }
            };
            if t * b * h >= 256 {
                out.par_chunks_mut(dv).enumerate().for_each(|(bh, o)| head(bh, o));
            } else {
                out.chunks_mut(dv).enumerate().for_each(|(bh, o)| head(bh, o));
            }
            out
        }
        let dims = (b, h, d, dv, t, n_rep, kvh);
        let out = match (qs, ks, vs) {
            (C::F32(q), C::F32(k), C::F32(v)) => C::F32(go(&q[qa..], k, v, kl, vl, dims, (scale, softcap), starts)),
            (C::F16(q), C::F16(k), C::F16(v)) => C::F16(go(&q[qa..], k, v, kl, vl, dims, (scale, softcap), starts)),
            (C::BF16(q), C::BF16(k), C::BF16(v)) => C::BF16(go(&q[qa..], k, v, kl, vl, dims, (scale, softcap), starts)),
            _ => candle_core::bail!("decode attention: q, k and v must share a float dtype"),
        };
        Ok((out, candle_core::Shape::from((b, h, 1, dv))))
    }
}
