//! RoPE as configs ask for it (default, linear, llama3, yarn, longrope, dynamic NTK), giving the
//! tables of a forward pass ([`RopeTables`]).

use crate::ops::rope::RopeTables;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

/// Rotary position embeddings over the first `dims` features of each head, as mlx's `nn.RoPE`
/// (non-traditional: rotate halves) with per-frequency periods (`freqs`, so llama3/linear
/// scaling is folded in) and a position `scale`.
#[derive(Debug, Clone)]
pub struct Rope {
    dims: usize,
    traditional: bool,
    /// inverse periods, one per rotated pair
    inv_freq: Vec<f32>,
    /// position scale (linear scaling)
    scale: f32,
    /// multiplies the rotated features (yarn's mscale, longrope's scale)
    input_scale: f32,
    /// dynamic NTK: (factor, max_position_embeddings, base), the base grows with the sequence
    dynamic: Option<(f64, usize, f64)>,
    /// CUDA: the tables of positions 0..n on the device (see [`Rope::tables`])
    on_device: Arc<Mutex<Option<(Tensor, Tensor)>>>,
}

/// `base^(2i/dims)` for each rotated pair, as mlx computes them (f32).
fn periods(base: f64, dims: usize) -> Vec<f64> {
    (0..dims / 2).map(|i| (base as f32).powf(2.0 * i as f32 / dims as f32) as f64).collect()
}

/// Inverse periods (angular frequencies), in f32 as the tables use them.
fn inverse(periods: &[f64]) -> Vec<f32> {
    periods.iter().map(|p| (1.0 / p) as f32).collect()
}

impl Rope {
    fn with_periods(dims: usize, traditional: bool, periods: &[f64], scale: f64, input_scale: f64) -> Self {
        Self {
            dims,
            traditional,
            inv_freq: inverse(periods),
            scale: scale as f32,
            input_scale: input_scale as f32,
            dynamic: None,
            on_device: Arc::default(),
        }
    }

    /// Phi-3's "su" / "longrope" scaling (mlx_lm's SuScaledRoPE, which always uses the long
    /// factors): periods times `long_factor`, features scaled by `long_mscale` or
    /// `sqrt(1 + ln(max / original) / ln(original))`.
    pub fn su_scaled(
        dims: usize,
        base: f64,
        max_position_embeddings: usize,
        original: usize,
        long_factor: &serde_json::Value,
        long_mscale: Option<f64>,
    ) -> Result<Self> {
        let base_periods = periods(base, dims);
        let factors: Vec<f64> = match long_factor {
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_f64().context("long_factor: expected numbers")).collect::<Result<_>>()?
            }
            v => vec![v.as_f64().context("long_factor: expected a number or a list")?; base_periods.len()],
        };
        if factors.len() != base_periods.len() {
            anyhow::bail!(
                "rope_scaling.long_factor has {} entries, expected {} (rotary dims / 2)",
                factors.len(),
                base_periods.len()
            );
        }
        let p: Vec<f64> = factors.iter().zip(&base_periods).map(|(f, p)| (*f as f32 * *p as f32) as f64).collect();
        let factor = max_position_embeddings as f64 / original as f64;
        let mscale = long_mscale.unwrap_or(if factor <= 1.0 {
            1.0
        } else {
            (1.0 + factor.ln() / (original as f64).ln()).sqrt()
        });
        Ok(Self::with_periods(dims, false, &p, 1.0, mscale))
    }

    /// Builds the RoPE an mlx_lm config asks for (`rope_theta`, `rope_scaling`), as mlx_lm's
    /// `initialize_rope`: default, linear, llama3, yarn, longrope, dynamic.
    pub fn from_config(
        dims: usize,
        base: f64,
        traditional: bool,
        scaling: Option<&serde_json::Value>,
        max_position_embeddings: Option<usize>,
    ) -> Result<Self> {
        let kind = scaling
            .and_then(|s| s.get("type").or_else(|| s.get("rope_type")))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let get = |k: &str| -> Option<f64> { scaling.and_then(|s| s.get(k)).and_then(|v| v.as_f64()) };
        let need = |k: &str| get(k).with_context(|| format!("rope_scaling of type {kind} needs `{k}`"));
        let mut p = periods(base, dims);
        match kind {
            "default" => Ok(Self::with_periods(dims, traditional, &p, 1.0, 1.0)),
            "linear" => Ok(Self::with_periods(dims, traditional, &p, 1.0 / need("factor")?, 1.0)),
            // gemma 4's global layers: only the first `partial_rotary_factor` of the pairs
            // rotate, their periods as over the whole head (times `factor`)
            "proportional" => {
                let rotated = (dims as f64 * get("partial_rotary_factor").unwrap_or(1.0)) as usize;
                let factor = get("factor").unwrap_or(1.0) as f32;
                for (i, p) in p.iter_mut().enumerate() {
                    *p = if 2 * i < rotated { (factor * *p as f32) as f64 } else { f64::INFINITY };
                }
                Ok(Self::with_periods(dims, traditional, &p, 1.0, 1.0))
            }
            "llama3" => {
                let factor = need("factor")?;
                let low = get("low_freq_factor").unwrap_or(1.0);
                let high = get("high_freq_factor").unwrap_or(4.0);
                let old_ctx = get("original_max_position_embeddings").unwrap_or(8192.0);
                let (low_wl, high_wl) = (old_ctx / low, old_ctx / high);
                for p in p.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI * *p;
                    let f = if wavelen > low_wl { *p * factor } else { *p };
                    *p = if wavelen > high_wl && wavelen < low_wl {
                        let smooth = (old_ctx / wavelen - low) / (high - low);
                        f / ((1.0 - smooth) / factor + smooth)
                    } else {
                        f
                    };
                }
                Ok(Self::with_periods(dims, traditional, &p, 1.0, 1.0))
            }
            "yarn" | "deepseek_yarn" => {
                let factor = need("factor")?;
                let orig = get("original_max_position_embeddings").unwrap_or(4096.0);
                let (beta_fast, beta_slow) = (get("beta_fast").unwrap_or(32.0), get("beta_slow").unwrap_or(1.0));
                let (mscale, mscale_all) = (get("mscale").unwrap_or(1.0), get("mscale_all_dim").unwrap_or(0.0));
                let corr = |rot: f64| dims as f64 * (orig / (rot * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln());
                let low = corr(beta_fast).floor().max(0.0);
                let high = corr(beta_slow).ceil().min(dims as f64 - 1.0);
                let high = if low == high { high + 0.001 } else { high };
                let get_mscale = |m: f64| if factor <= 1.0 { 1.0 } else { 0.1 * m * factor.ln() + 1.0 };
                for (i, p) in p.iter_mut().enumerate() {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let mask = 1.0 - ramp;
                    let (extra, inter) = (*p, factor * *p);
                    *p = inter * extra / (inter * mask + extra * (1.0 - mask));
                }
                Ok(Self::with_periods(dims, traditional, &p, 1.0, get_mscale(mscale) / get_mscale(mscale_all)))
            }
            "longrope" => {
                let s = scaling.expect("a kind other than default comes from a scaling block");
                let orig = need("original_max_position_embeddings")? as usize;
                let max = max_position_embeddings.context("longrope RoPE needs max_position_embeddings")?;
                let long = s.get("long_factor").context("rope_scaling of type longrope needs `long_factor`")?;
                Self::su_scaled(dims, base, max, orig, long, None)
            }
            "dynamic" => {
                let max = max_position_embeddings.context("dynamic RoPE needs max_position_embeddings")?;
                let mut r = Self::with_periods(dims, traditional, &p, 1.0, 1.0);
                r.dynamic = Some((need("factor")?, max, base));
                Ok(r)
            }
            other => anyhow::bail!(
                "rope_scaling type `{other}` is not supported (supported: default, linear, llama3, yarn, longrope, dynamic)"
            ),
        }
    }

    /// cos/sin tables for positions `offset .. offset + len`, computed once per forward pass and
    /// shared by every layer that uses this RoPE.
    pub fn tables(&self, offset: usize, len: usize, dtype: DType, device: &Device) -> Result<RopeTables> {
        if device.is_cuda() && self.dynamic.is_none() {
            // the same values as below, computed once for positions 0..n (a power of two)
            // and kept on the device: a prompt's tables are then a view, instead of ~0.3 µs of
            // host trigonometry per position and an upload before every prefill
            let mut kept = self.on_device.lock().unwrap_or_else(|e| e.into_inner());
            let fits = |(c, _): &(Tensor, Tensor)| {
                c.dtype() == dtype && c.device().same_device(device) && c.dim(0).is_ok_and(|n| n >= offset + len)
            };
            if !kept.as_ref().is_some_and(fits) {
                let n = (offset + len).next_power_of_two().max(1024);
                let t = self.tables_at(&(0..n).collect::<Vec<_>>(), &[n], n, dtype, device)?;
                *kept = Some((t.cos, t.sin));
            }
            let (cos, sin) = kept.as_ref().expect("kept above");
            let (cos, sin) = (cos.narrow(0, offset, len)?, sin.narrow(0, offset, len)?);
            return Ok(RopeTables { cos, sin, dims: self.dims, traditional: self.traditional });
        }
        let positions: Vec<usize> = (offset..offset + len).collect();
        self.tables_at(&positions, &[len], offset + len, dtype, device)
    }

    /// Tables for a left-padded batch: row `b`'s query `i` sits at index `offset + i` of the
    /// cache, which is its position `offset + i - left_padding[b]` (padding queries get 0).
    pub fn batch_tables(
        &self,
        offset: usize,
        len: usize,
        left_padding: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let positions: Vec<usize> =
            left_padding.iter().flat_map(|&p| (offset..offset + len).map(move |i| i.saturating_sub(p))).collect();
        self.tables_at(&positions, &[left_padding.len(), len], offset + len, dtype, device)
    }

    /// cos/sin for the given positions, shaped `lead` × half the rotated dims; `seq` is the
    /// sequence length the dynamic-NTK base is computed for.
    fn tables_at(
        &self,
        positions: &[usize],
        lead: &[usize],
        seq: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<RopeTables> {
        let (cos, sin) = self.host_tables(positions, seq);
        let shape = [lead, &[self.inv_freq.len()]].concat();
        let cos = Tensor::from_vec(cos, shape.clone(), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?;
        Ok(RopeTables { cos, sin, dims: self.dims, traditional: self.traditional })
    }

    /// Tables of one position per batch row whose values are written in place before each
    /// replay of a captured decode step ([`RopeTables::write_positions`]).
    pub fn position_tables(&self, rows: usize, dtype: DType, device: &Device) -> Result<RopeTables> {
        let half = self.inv_freq.len();
        let cos = Tensor::zeros((rows, 1, half), dtype, device)?;
        Ok(RopeTables { cos: cos.clone(), sin: cos.zeros_like()?, dims: self.dims, traditional: self.traditional })
    }

    /// The f32 cos/sin values for `positions` (row-major, half the rotated dims per position).
    fn host_tables(&self, positions: &[usize], seq: usize) -> (Vec<f32>, Vec<f32>) {
        let dyn_freq;
        let inv_freq = match self.dynamic {
            Some((factor, max, base)) => {
                // mlx_lm's DynamicNTKScalingRoPE: the base for this call's sequence length
                let seq = seq.max(max) as f64;
                let d = self.dims as f64;
                let b = base * ((factor * seq / max as f64) - (factor - 1.0)).powf(d / (d - 2.0));
                dyn_freq = inverse(&periods(b, self.dims));
                &dyn_freq
            }
            None => &self.inv_freq,
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            let pos = p as f32 * self.scale;
            for f in inv_freq {
                let theta = pos * f;
                cos.push(theta.cos() * self.input_scale);
                sin.push(theta.sin() * self.input_scale);
            }
        }
        (cos, sin)
    }
}

impl RopeTables {
    /// Writes each row's position into tables made by [`Rope::position_tables`] (host to device
    /// copies outside any kernel, so a captured graph reads them at replay); `seq`: the
    /// sequence length of the step, as [`Rope::batch_tables`] takes it (offset + 1).
    #[cfg(feature = "cuda")]
    pub fn write_positions(&self, rope: &Rope, positions: &[usize], seq: usize) -> Result<()> {
        let (cos, sin) = rope.host_tables(positions, seq);
        crate::backend::cuda::upload_f32(&self.cos, &cos)?;
        crate::backend::cuda::upload_f32(&self.sin, &sin)?;
        Ok(())
    }
}
