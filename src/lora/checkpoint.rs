//! Gradient checkpointing (`--grad-checkpoint`): a decoder layer runs as one custom op whose
//! forward keeps no graph (the layer's activations are freed at once) and whose backward runs
//! the layer again on its saved input, differentiates it there, and hands back the input's
//! gradient. The adapter tensors' gradients found in that inner pass are collected here and
//! added to the outer pass's ([`take_grads`]), as mlx's `mx.checkpoint` does for mlx_lm.

use crate::cache::KvCache;
use crate::models::blocks::Layer;
use crate::nn::RopeTables;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, TensorId, Var};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

struct State {
    on: bool,
    /// The trainable tensors whose gradients the inner passes collect.
    vars: Vec<TensorId>,
    grads: HashMap<TensorId, Tensor>,
}

thread_local! {
    /// Per thread: a training loop, its forward and its backward pass run on one thread.
    static STATE: RefCell<State> = RefCell::new(State { on: false, vars: vec![], grads: HashMap::new() });
}

/// Turns checkpointing on for the trainable tensors `vars` (off with an empty list).
pub fn enable(vars: &[Var]) {
    STATE.with_borrow_mut(|s| {
        s.on = !vars.is_empty();
        s.vars = vars.iter().map(|v| v.as_tensor().id()).collect();
        s.grads.clear();
    })
}

/// Whether a forward pass starting at `h` with a cache at `offset` checkpoints its layers: on,
/// on the CPU, a whole sequence from position 0 being differentiated.
pub fn active(h: &Tensor, offset: usize) -> bool {
    offset == 0 && h.device().is_cpu() && h.dtype() == candle_core::DType::F32 && STATE.with_borrow(|s| s.on)
}

/// The gradients the inner passes found for `v` since the last call, removed.
pub fn take_grads(v: &Var) -> Option<Tensor> {
    STATE.with_borrow_mut(|s| s.grads.remove(&v.as_tensor().id()))
}

/// `layer(x)` as a checkpointed op.
pub fn run(layer: Arc<dyn Layer>, x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Checkpoint { layer, rope: rope.clone() })?)
}

struct Checkpoint {
    layer: Arc<dyn Layer>,
    rope: RopeTables,
}

fn wrap(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "grad-checkpoint"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) =
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("checkpoint: input not contiguous".into()))?;
        let x = Tensor::from_slice(&s.as_slice::<f32>()?[a..b], l.shape(), &candle_core::Device::Cpu)?;
        // the graph through the adapters ends here: only the output values are kept
        let y = self.layer.forward(&x, &self.rope, &mut KvCache::new()).map_err(wrap)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.layer.forward(x.as_tensor(), &self.rope, &mut KvCache::new()).map_err(wrap)?;
        let grads = (y * grad_res.detach())?.sum_all()?.backward()?;
        STATE.with_borrow_mut(|s| -> candle_core::Result<()> {
            for id in s.vars.clone() {
                if let Some(g) = grads.get_id(id) {
                    let g = g.detach();
                    let sum = match s.grads.remove(&id) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    s.grads.insert(id, sum);
                }
            }
            Ok(())
        })?;
        Ok(grads.get(x.as_tensor()).map(|g| g.detach()))
    }
}
