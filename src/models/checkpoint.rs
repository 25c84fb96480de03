//! Gradient checkpointing (`--grad-checkpoint`): a decoder layer runs as one custom op whose
//! forward keeps no graph (the layer's activations are freed at once) and whose backward runs
//! the layer again on its saved input, differentiates it there, and hands back the input's
//! gradient. The adapter tensors' gradients found in that inner pass are collected here and
//! added to the outer pass's ([`take_grads`]), as mlx's `mx.checkpoint` does for mlx_lm.

use super::decoder::Layer;
use crate::cache::KvCache;
use crate::nn::RopeTables;
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};
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
/// and a whole sequence from position 0 being differentiated.
pub fn active(_h: &Tensor, offset: usize) -> bool {
    offset == 0 && STATE.with_borrow(|s| s.on)
}

/// The gradients the inner passes found for `v` since the last call, removed.
pub fn take_grads(v: &Var) -> Option<Tensor> {
    STATE.with_borrow_mut(|s| s.grads.remove(&v.as_tensor().id()))
}

/// `layer(x)` as a checkpointed op.
pub fn run(layer: Arc<dyn Layer>, x: &Tensor, rope: &RopeTables) -> Result<Tensor> {
    // a copy: the op's input storage then holds exactly the input, from offset 0
    Ok(x.copy()?.apply_op1(Checkpoint { layer, rope: rope.clone() })?)
}

struct Checkpoint {
    layer: Arc<dyn Layer>,
    rope: RopeTables,
}

fn wrap(e: anyhow::Error) -> candle_core::Error {
    candle_core::Error::Msg(format!("{e:#}"))
}

impl Checkpoint {
    /// The layer on the op's input (`input`: a copy of the storage, which holds exactly the
    /// input from offset 0, see [`run`]), no graph kept: the output's values in a storage of
    /// their own.
    fn forward_storage(&self, input: Storage, l: &Layout) -> candle_core::Result<(Storage, Shape)> {
        if l.start_offset() != 0 || !l.is_contiguous() {
            candle_core::bail!("checkpoint: the input must be contiguous from offset 0");
        }
        let x = Tensor::from_storage(input, l.shape().clone(), candle_core::op::BackpropOp::none(), false);
        let y = self.layer.forward_tensor(&x, &self.rope, &mut KvCache::new()).map_err(wrap)?.copy()?;
        let shape = y.shape().clone();
        let (st, yl) = y.storage_and_layout();
        let out = match &*st {
            Storage::Cpu(c) => Storage::Cpu(c.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(c) => Storage::Cuda(candle_core::backend::BackendStorage::try_clone(c, yl)?),
            #[cfg(feature = "metal")]
            Storage::Metal(m) => Storage::Metal(candle_core::backend::BackendStorage::try_clone(m, yl)?),
            #[allow(unreachable_patterns)]
            _ => candle_core::bail!("checkpoint: unsupported device"),
        };
        let _ = yl;
        Ok((out, shape))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "grad-checkpoint"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, shape) = self.forward_storage(Storage::Cpu(s.clone()), l)?;
        match y {
            Storage::Cpu(c) => Ok((c, shape)),
            _ => candle_core::bail!("checkpoint: the layer left the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (y, shape) = self.forward_storage(Storage::Cuda(s.try_clone(l)?), l)?;
        match y {
            Storage::Cuda(c) => Ok((c, shape)),
            _ => candle_core::bail!("checkpoint: the layer left the CUDA device"),
        }
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        s: &candle_core::MetalStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (y, shape) = self.forward_storage(Storage::Metal(s.try_clone(l)?), l)?;
        match y {
            Storage::Metal(m) => Ok((m, shape)),
            _ => candle_core::bail!("checkpoint: the layer left the Metal device"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let x = Var::from_tensor(&arg.detach())?;
        let y = self.layer.forward_tensor(x.as_tensor(), &self.rope, &mut KvCache::new()).map_err(wrap)?;
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
