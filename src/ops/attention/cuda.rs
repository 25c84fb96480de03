//! The attention kernels on CUDA (attention.cu): decode attention (split keys + combine), the
//! device-position cache write, a replayed decode step's attention in one launch, and prefill's
//! flash attention.

use crate::backend::cuda::{by_dtype, contiguous_view, cuda_of, cuda_only_op3, dtype_suffix, function, Launch, Module};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
use candle_core::{DType, Layout, Result, Shape, WithDType};
use std::sync::Arc;

/// Keys per block of the first pass and threads per block (attention.cu's CHUNK and THREADS).
const ATTN_CHUNK: usize = 64;
const ATTN_THREADS: u32 = 128;
/// The head dimension limit of the kernel.
pub const ATTN_MAX_HEAD_DIM: usize = 256;

/// Decode attention: `q` (B, H, 1, D) contiguous over `k` (B, KV, T, D), `v` (B, KV, T, DV)
/// views with unit last stride. `starts[b]`: the first key row `b` may see. `device_pos`: a u32
/// on the device, the position this step wrote (only keys up to it are seen; `T` is then the
/// cache's capacity: a replayed CUDA graph reads the count at run time), and the rows' starts on
/// the device (u32, one per row), used instead of `starts`.
pub fn decode_attention(
    q: (&CudaStorage, &Layout),
    k: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    scale: f32,
    softcap: Option<f32>,
    starts: Option<&[usize]>,
    device_pos: Option<(&candle_core::Tensor, &candle_core::Tensor)>,
) -> Result<(CudaStorage, Shape)> {
    let dev = q.0.device().clone();
    let guards = device_pos.map(|(p, s)| (p.storage_and_layout().0, s.storage_and_layout().0));
    let on_device = match &guards {
        Some((p, s)) => Some((
            cuda_of(p, "decode attention: the device position")?.as_cuda_slice::<u32>()?,
            cuda_of(s, "decode attention: the device row starts")?.as_cuda_slice::<u32>()?,
        )),
        None => None,
    };
    // host starts go up for this call; a replayed step's are on the device already
    let uploaded = match (starts, on_device) {
        (Some(s), None) => Some(upload_starts(&dev, s)?),
        _ => None,
    };
    let starts = on_device.map(|(_, s)| s).or(uploaded.as_ref());
    let pos = on_device.map(|(p, _)| p);
    let out = by_dtype!(
        q.0.dtype(),
        "decode attention",
        dev,
        attention_typed(&dev, q, k, v, scale, softcap, starts, pos, None)
    );
    let (b, h, _, _) = q.1.shape().dims4()?;
    let dv = v.1.shape().dims4()?.3;
    Ok((out, Shape::from((b, h, 1, dv))))
}

/// The rows' first keys (left padding) as device u32s, for the attention kernels.
fn upload_starts(dev: &CudaDevice, starts: &[usize]) -> Result<CudaSlice<u32>> {
    let s: Vec<u32> = starts.iter().map(|&x| x as u32).collect();
    let mut buf = unsafe { dev.alloc::<u32>(s.len())? };
    dev.memcpy_htod(&s, &mut buf)?;
    Ok(buf)
}

#[allow(clippy::too_many_arguments)]
fn attention_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
    scale: f32,
    softcap: Option<f32>,
    starts: Option<&CudaSlice<u32>>,
    pos: Option<&CudaSlice<u32>>,
    step: Option<StepArgs<'_, T>>,
) -> Result<CudaSlice<T>> {
    let (b, h, _, d) = ql.shape().dims4()?;
    let (_, kvh, t, _) = kl.shape().dims4()?;
    let dv = vl.shape().dims4()?.3;
    if h % kvh != 0 || d > ATTN_MAX_HEAD_DIM || dv > ATTN_MAX_HEAD_DIM || t == 0 {
        candle_core::bail!("decode attention on CUDA: {h} heads over {kvh} KV heads of size {d}/{dv} and {t} keys are outside the kernel's limits");
    }
    let q = contiguous_view::<T>(qs, ql, "query")?;
    let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    let splits = t.div_ceil(ATTN_CHUNK);
    let part_o = unsafe { dev.alloc::<f32>(b * h * splits * dv)? };
    let part_ml = unsafe { dev.alloc::<f32>(b * h * splits * 2)? };
    let out = unsafe { dev.alloc::<T>(b * h * dv)? };
    if let Some(s) = starts.filter(|s| s.len() != b) {
        candle_core::bail!("decode attention: {} row starts for {b} rows", s.len());
    }
    let tn = dtype_suffix(T::DTYPE, "decode attention")?;
    let kind = if step.is_some() { "step" } else { "partial" };
    let partial = function(dev, Module::Attention, &format!("wick_attention_{kind}_{tn}"))?;
    let null = 0u64;
    let (h_i, kvh_i, t_i, d_i, dv_i, splits_i) = (h as i32, kvh as i32, t as i32, d as i32, dv as i32, splits as i32);
    let (ks_, vs_) = (outer_strides(kl), outer_strides(vl));
    let cap = softcap.unwrap_or(0.0);
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &partial);
    lb.arg(&q).arg(&k).arg(&v).arg(&part_o).arg(&part_ml);
    match starts {
        Some(s) => lb.arg(s),
        None => lb.arg(&null),
    };
    match pos {
        Some(p) => lb.arg(p),
        None => lb.arg(&null),
    };
    lb.arg(&h_i).arg(&kvh_i).arg(&t_i).arg(&d_i).arg(&dv_i);
    lb.arg(&ks_[0]).arg(&ks_[1]).arg(&ks_[2]).arg(&vs_[0]).arg(&vs_[1]).arg(&vs_[2]);
    // 16-byte loads of key rows (bit 0) and value rows (bit 1): the head size and every stride
    // in whole 16-byte units
    let rows16 =
        |n: usize, l: &Layout| (n * T::DTYPE.size_in_bytes()).is_multiple_of(16) && rows_on_16_bytes(l, T::DTYPE);
    let vec = rows16(d, kl) as i32 | ((rows16(dv, vl) as i32) << 1);
    lb.arg(&scale).arg(&cap).arg(&vec);
    if let Some(st) = &step {
        lb.arg(&st.k_new).arg(&st.v_new).arg(&st.cos).arg(&st.sin).arg(&out).arg(st.done).arg(&st.traditional);
    }
    let cfg = LaunchConfig {
        grid_dim: ((b * h) as u32, splits as u32, 1),
        block_dim: (ATTN_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    if step.is_some() {
        return Ok(out); // the last block of each row combined it
    }
    let combine = function(dev, Module::Attention, &format!("wick_attention_combine_{tn}"))?;
    let mut lb = Launch::new(&stream, &combine);
    lb.arg(&part_o).arg(&part_ml).arg(&out).arg(&splits_i).arg(&dv_i);
    let cfg = LaunchConfig { grid_dim: ((b * h) as u32, 1, 1), block_dim: (ATTN_THREADS, 1, 1), shared_mem_bytes: 0 };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}

/// Writes a decode step's keys or values `src` (B, heads, 1, d) into `cache` (B, heads, T, d,
/// unit last stride) at the position held by the device u32 `pos` (see [`decode_attention`]).
pub fn kv_write(cache: (&mut CudaStorage, &Layout), src: (&CudaStorage, &Layout), pos: &CudaStorage) -> Result<()> {
    match cache.0.dtype() {
        DType::F32 => kv_write_typed::<f32>(cache, src, pos),
        DType::F16 => kv_write_typed::<half::f16>(cache, src, pos),
        DType::BF16 => kv_write_typed::<half::bf16>(cache, src, pos),
        d => candle_core::bail!("kv_write on CUDA: dtype {d:?} is not supported (f32, f16, bf16)"),
    }
}

fn kv_write_typed<T: CudaDType + DeviceRepr + WithDType>(
    (cs, cl): (&mut CudaStorage, &Layout),
    (ss, sl): (&CudaStorage, &Layout),
    pos: &CudaStorage,
) -> Result<()> {
    let (b, heads, _, d) = cl.shape().dims4()?;
    if sl.shape().dims4()? != (b, heads, 1, d) || cl.stride()[3] != 1 {
        candle_core::bail!("kv_write: {:?} into the cache {:?} does not fit", sl.shape(), cl.shape());
    }
    let dev = cs.device().clone();
    let f = function(&dev, Module::Attention, &format!("wick_kv_write_{}", dtype_suffix(T::DTYPE, "kv_write")?))?;
    let [sb, sh, sr] = outer_strides(cl);
    let (heads_i, d_i) = (heads as i32, d as i32);
    let src = contiguous_view::<T>(ss, sl, "kv_write: source")?;
    let pos = pos.as_cuda_slice::<u32>()?;
    let dst = cs.as_cuda_slice_mut::<T>()?.slice_mut(cl.start_offset()..);
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&dst).arg(&src).arg(pos).arg(&heads_i).arg(&d_i).arg(&sb).arg(&sh).arg(&sr);
    let cfg = LaunchConfig {
        grid_dim: ((b * heads) as u32, 1, 1),
        block_dim: (d.min(256) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(())
}

/// Counters a replayed decode step's attention keeps on the device, one per (batch row, query
/// head): [`DecodeStep::done`] holds this many (zeros; each launch leaves them at zero).
pub const STEP_COUNTERS: usize = 16384;

/// A replayed decode step's attention in one launch (`wick_attention_step_*`): RoPE of the
/// query and the key, the key and value written into the cache at the device position, the
/// split-keys pass and its combine (the last block of each row to finish). The op's inputs are
/// q (B, H, 1, D), k and v (B, KV, 1, D), before RoPE; the tables (B, D/2) hold row b's
/// position; the output is (B, H, 1, D). Same arithmetic as RoPE, [`kv_write`] and
/// [`decode_attention`] one after the other, so a replay decodes what the eager step does.
pub struct DecodeStep {
    pub cos: candle_core::Tensor,
    pub sin: candle_core::Tensor,
    pub traditional: bool,
    /// the position, the rows' first keys (u32, see [`decode_attention`]) and the counters
    /// (u32, [`STEP_COUNTERS`] zeros)
    pub pos: candle_core::Tensor,
    pub starts: candle_core::Tensor,
    pub done: candle_core::Tensor,
    pub keys: candle_core::Tensor,
    pub values: candle_core::Tensor,
    pub scale: f32,
    pub softcap: Option<f32>,
}

/// What [`DecodeStep`]'s kernel takes besides the decode-attention pass's arguments.
struct StepArgs<'a, T> {
    k_new: CudaView<'a, T>,
    v_new: CudaView<'a, T>,
    cos: CudaView<'a, T>,
    sin: CudaView<'a, T>,
    done: &'a CudaSlice<u32>,
    traditional: i32,
}

/// The first three element strides of a 4-d (B, heads, T, D) cache layout, as the kernels take
/// them (the last is 1).
fn outer_strides(l: &Layout) -> [i64; 3] {
    let st = l.stride();
    [st[0] as i64, st[1] as i64, st[2] as i64]
}

/// Whether every row of a 4-d (B, heads, T, D) layout of `dtype` starts on a 16-byte boundary
/// (its start and its first three strides in whole 16-byte units): the attention kernels' 16-byte
/// row loads.
fn rows_on_16_bytes(l: &Layout, dtype: DType) -> bool {
    let st = l.stride();
    [st[0], st[1], st[2], l.start_offset()].iter().all(|&e| (e * dtype.size_in_bytes()).is_multiple_of(16))
}

cuda_only_op3!(
    DecodeStep,
    "decode-step-attention",
    "the fused decode step's attention runs on CUDA only",
    |op, (qs, ql), k, v| {
        let dev = qs.device().clone();
        let out = by_dtype!(qs.dtype(), "decode step attention", dev, step_typed(&dev, op, (qs, ql), k, v));
        Ok((out, ql.shape().clone()))
    }
);

fn step_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &DecodeStep,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let (b, h, l, d) = ql.shape().dims4()?;
    let (_, kvh, _, _) = kl.shape().dims4()?;
    let ((cos_s, cos_l), (sin_s, sin_l)) = (op.cos.storage_and_layout(), op.sin.storage_and_layout());
    let (pos_s, _) = op.pos.storage_and_layout();
    let ((starts_s, starts_l), (done_s, done_l)) = (op.starts.storage_and_layout(), op.done.storage_and_layout());
    let ((kc_s, kc_l), (vc_s, vc_l)) = (op.keys.storage_and_layout(), op.values.storage_and_layout());
    let (cos_s, sin_s) = (cuda_of(&cos_s, "decode step: cos")?, cuda_of(&sin_s, "decode step: sin")?);
    let pos = cuda_of(&pos_s, "decode step: the position")?.as_cuda_slice::<u32>()?;
    let starts = cuda_of(&starts_s, "decode step: the row starts")?.as_cuda_slice::<u32>()?;
    let done = cuda_of(&done_s, "decode step: the counters")?.as_cuda_slice::<u32>()?;
    let (kc_s, vc_s) = (cuda_of(&kc_s, "the key cache")?, cuda_of(&vc_s, "the value cache")?);
    let half = d / 2;
    let cache = kc_l.shape().dims4()?;
    if l != 1
        || d % 2 != 0
        || cos_l.shape().elem_count() != b * half
        || sin_l.shape().elem_count() != b * half
        || kl.shape().dims4()? != (b, kvh, 1, d)
        || vl.shape().dims4()? != (b, kvh, 1, d)
        || (cache.0, cache.1, cache.3) != (b, kvh, d)
        || vc_l.shape().dims4()? != cache
        || kc_l.stride()[3] != 1
        || vc_l.stride()[3] != 1
        || starts_l.shape().elem_count() != b
        || done_l.shape().elem_count() < b * h
        || done_l.start_offset() != 0
    {
        candle_core::bail!(
            "decode step attention: shapes q {:?}, k {:?}, cache {:?}, {} counters do not fit",
            ql.shape(),
            kl.shape(),
            kc_l.shape(),
            done_l.shape().elem_count()
        );
    }
    let slice = |s, l, what: &str| contiguous_view::<T>(s, l, &format!("decode step: {what}"));
    let step = StepArgs {
        k_new: slice(ks, kl, "k")?,
        v_new: slice(vs, vl, "v")?,
        cos: slice(cos_s, cos_l, "cos")?,
        sin: slice(sin_s, sin_l, "sin")?,
        done,
        traditional: op.traditional as i32,
    };
    // the kernel writes the step's key and value into the caches in place
    let (k, v) = ((kc_s, kc_l), (vc_s, vc_l));
    let out = attention_typed(dev, (qs, ql), k, v, op.scale, op.softcap, Some(starts), Some(pos), Some(step))?;
    crate::backend::stats::count(crate::backend::stats::Counter::StepAttention);
    Ok(out)
}

/// Attention of several query positions (a prefill chunk) in one launch of
/// `wick_attention_prefill_*` (attention.cu: flash attention on the tensor cores), with the
/// causal mask of [`crate::ops::attention::scaled_dot_product_attention`]: query row `r` sits at key index
/// `offset + r` and sees keys up to it, within `window` and not before its row's `starts`
/// entry. Inputs `q` (B, H, L, D), `k`, `v` (B, KV, T, D) as [`PrefillAttention::fits`] takes
/// them; the output is (B, L, H, D) (the caller's transpose of (B, H, L, D)).
pub struct PrefillAttention {
    pub scale: f32,
    pub softcap: Option<f32>,
    pub offset: usize,
    pub window: Option<usize>,
    pub starts: Option<Arc<[usize]>>,
}

/// Query rows per block and threads per block of prefill attention (attention.cu's PF_ROWS, 4 warps).
const PREFILL_ROWS: usize = 64;
const PREFILL_THREADS: u32 = 128;
/// The head sizes `wick_attention_prefill_*` is built for.
pub const PREFILL_HEAD_DIMS: [usize; 3] = [64, 96, 128];

impl PrefillAttention {
    /// Whether the kernel takes these inputs: on CUDA, f16 or bf16 alike, no gradient to track,
    /// query and key heads of one size in [`PREFILL_HEAD_DIMS`], whole query heads per KV head,
    /// keys and values with unit last stride and rows on 16-byte boundaries.
    pub fn fits(q: &candle_core::Tensor, k: &candle_core::Tensor, v: &candle_core::Tensor) -> Result<bool> {
        let dtype = q.dtype();
        if !q.device().is_cuda()
            || !matches!(dtype, DType::F16 | DType::BF16)
            || k.dtype() != dtype
            || v.dtype() != dtype
            || q.track_op()
            || k.track_op()
            || v.track_op()
        {
            return Ok(false);
        }
        let ((_, h, _, d), (_, kvh, t, dk), dv) = (q.dims4()?, k.dims4()?, v.dim(3)?);
        let aligned = |x: &candle_core::Tensor| x.stride()[3] == 1 && rows_on_16_bytes(x.layout(), dtype);
        Ok(PREFILL_HEAD_DIMS.contains(&d)
            && dk == d
            && dv == d
            && t > 0
            && kvh > 0
            && h % kvh == 0
            && aligned(k)
            && aligned(v))
    }
}

cuda_only_op3!(
    PrefillAttention,
    "prefill-attention",
    "the prefill attention kernel runs on CUDA only",
    |op, (qs, ql), k, v| {
        let dev = qs.device().clone();
        let out = by_dtype!(qs.dtype(), "prefill attention", dev, prefill_typed(&dev, op, (qs, ql), k, v));
        let (b, h, l, d) = ql.shape().dims4()?;
        Ok((out, Shape::from((b, l, h, d))))
    }
);

fn prefill_typed<T: CudaDType + DeviceRepr + WithDType>(
    dev: &CudaDevice,
    op: &PrefillAttention,
    (qs, ql): (&CudaStorage, &Layout),
    (ks, kl): (&CudaStorage, &Layout),
    (vs, vl): (&CudaStorage, &Layout),
) -> Result<CudaSlice<T>> {
    let (b, h, l, d) = ql.shape().dims4()?;
    let (_, kvh, t, _) = kl.shape().dims4()?;
    if T::DTYPE == DType::F32 || !PREFILL_HEAD_DIMS.contains(&d) {
        candle_core::bail!(
            "prefill attention on CUDA: {:?} heads of size {d} are outside the kernel's limits",
            T::DTYPE
        );
    }
    let q = contiguous_view::<T>(qs, ql, "query")?;
    let k = ks.as_cuda_slice::<T>()?.slice(kl.start_offset()..);
    let v = vs.as_cuda_slice::<T>()?.slice(vl.start_offset()..);
    if let Some(s) = op.starts.as_deref().filter(|s| s.len() != b) {
        candle_core::bail!("prefill attention: {} row starts for {b} rows", s.len());
    }
    let starts = op.starts.as_deref().map(|s| upload_starts(dev, s)).transpose()?;
    let out = unsafe { dev.alloc::<T>(b * l * h * d)? };
    let f = function(
        dev,
        Module::Attention,
        &format!("wick_attention_prefill_{}_d{d}", dtype_suffix(T::DTYPE, "prefill attention")?),
    )?;
    let (ks_, vs_) = (outer_strides(kl), outer_strides(vl));
    let ints = [h as i32, kvh as i32, l as i32, t as i32, op.offset as i32, op.window.unwrap_or(0) as i32];
    let (scale, cap, null) = (op.scale, op.softcap.unwrap_or(0.0), 0u64);
    let stream = dev.cuda_stream();
    let mut lb = Launch::new(&stream, &f);
    lb.arg(&q).arg(&k).arg(&v).arg(&out);
    match &starts {
        Some(s) => lb.arg(s),
        None => lb.arg(&null),
    };
    for i in &ints {
        lb.arg(i);
    }
    for s in ks_.iter().chain(&vs_) {
        lb.arg(s);
    }
    lb.arg(&scale).arg(&cap);
    let cfg = LaunchConfig {
        grid_dim: (l.div_ceil(PREFILL_ROWS) as u32, (b * h) as u32, 1),
        block_dim: (PREFILL_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { lb.launch(cfg) }.w()?;
    Ok(out)
}
