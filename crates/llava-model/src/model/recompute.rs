//! Gradient checkpointing (`--gradient-checkpointing`, as HF's `gradient_checkpointing_enable`):
//! in training, each decoder layer keeps only its input. Its output is computed without a
//! graph, and the layer is run again, with a graph, when the backward pass reaches it.
//!
//! candle has no checkpoint primitive, so a custom op carries it: its forward hands out the
//! output already computed, and its backward recomputes the layer from the kept input and
//! backpropagates the incoming gradient through that one layer. The input's gradient goes back
//! into candle's backward pass. The layer's own trainable weights are not arguments of the op,
//! so their gradients are collected in [`GradientCheckpointing`], which the trainer adds to
//! the store that `backward()` returns.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape, Tensor, Var};

use crate::error::{ModelError, Result};

/// What one layer needs to run again in backward.
pub(crate) trait Layer: Send + Sync {
    /// The layer's training forward, `x` → output of the same shape.
    fn forward_train(&self, x: &Tensor) -> Result<Tensor>;
}

/// Gradient checkpointing of a decoder, and the weight gradients its recomputations found. Clones share
/// the gathered gradients.
#[derive(Clone)]
pub struct GradientCheckpointing {
    /// A scalar `Var` given to every checkpointed layer as an argument, so that the op joins
    /// the graph even when neither its input nor its output tracks one (a text-only batch over
    /// frozen embeddings, with trainable layers). It never gets a gradient.
    anchor: Var,
    grads: Arc<Mutex<GradStore>>,
}

impl std::fmt::Debug for GradientCheckpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GradientCheckpointing")
    }
}

impl GradientCheckpointing {
    pub fn new(device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            anchor: Var::zeros((), DType::F32, device)?,
            grads: Arc::new(Mutex::new(GradStore::default())),
        })
    }

    /// Moves the weight gradients gathered by the recomputations since the last call into
    /// `grads` (summed where both hold one).
    pub fn add_grads_to(&self, grads: &mut GradStore) -> Result<()> {
        let found = std::mem::take(&mut *self.lock()?);
        Ok(grads.extend(found)?)
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, GradStore>> {
        self.grads
            .lock()
            .map_err(|_| ModelError::Input("a recomputation panicked".into()))
    }

    /// `layer(x)`, keeping only `x` for backward.
    pub(crate) fn run(&self, layer: Arc<dyn Layer>, x: &Tensor) -> Result<Tensor> {
        // Detached: the layer's intermediate tensors are freed as soon as it returns.
        let output = layer.forward_train(&x.detach())?.detach().contiguous()?;
        let op = Recompute {
            layer,
            grads: self.grads.clone(),
        };
        Ok(x.apply_op3_arc(&output, self.anchor.as_tensor(), Arc::new(Box::new(op)))?)
    }
}

/// The op: arguments (layer input, layer output computed without a graph, anchor).
struct Recompute {
    layer: Arc<dyn Layer>,
    grads: Arc<Mutex<GradStore>>,
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "checkpointed-decoder-layer"
    }

    /// The output as computed: a copy of the second argument's buffer, which `run` made
    /// contiguous and whole.
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        output: &CpuStorage,
        layout: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((output.try_clone(layout)?, layout.shape().clone()))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        output: &CudaStorage,
        layout: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        Ok((output.try_clone(layout)?, layout.shape().clone()))
    }

    fn bwd(
        &self,
        input: &Tensor,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The input needs a gradient only where a graph leads back from it (the projector).
        let x = match input.track_op() {
            true => Var::from_tensor(&input.detach())?.as_tensor().clone(),
            false => input.detach(),
        };
        let output = self
            .layer
            .forward_train(&x)
            .map_err(candle_core::Error::wrap)?;
        // d(sum(output · grad))/d(output) is `grad` itself: one pass through this layer.
        let mut found = (output * grad)?.sum_all()?.backward()?;
        let input_grad = found.remove(&x);
        self.grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("a recomputation panicked".into()))?
            .extend(found)?;
        Ok((input_grad, None, None))
    }
}
