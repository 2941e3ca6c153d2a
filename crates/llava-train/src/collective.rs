//! The processes of one data-parallel job and the sums they compute together. One trainer loop
//! serves one process or many: a single process is a world of one, whose sums are the values
//! themselves. `mpirun -np N llava train ...` makes N ranks ([`crate::mpi_world`], feature
//! `mpi`); each walks the same seeded order, takes its slice of every global batch, and adds
//! its gradients into the global sum before the same update on every rank.

use candle_core::{DType, Tensor};

use crate::error::Result;

pub trait Collective {
    /// This process's index, 0 for the one that writes logs and checkpoints.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `values` on every rank with their element-wise sum over all ranks.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// [`Collective::all_reduce_sum_f64`] for the gradients.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()>;
    /// Sums `values` over all ranks into rank `root`'s copy; the other ranks' copies are left
    /// as they were. With [`Collective::broadcast_f32`] it is the sharded optimizer's
    /// reduce-scatter (a tensor's gradient goes to the rank that owns its moments) and
    /// all-gather (the owner's updated tensor goes to everyone).
    fn reduce_sum_f32(&self, values: &mut [f32], root: usize) -> Result<()>;
    /// Replaces `values` on every rank with rank `root`'s.
    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()>;
    /// Returns once every rank has called it: a sharded checkpoint is complete only when every
    /// rank has written its part.
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum_f64(&mut [0.0])
    }
    /// Ends every rank of the job now, for a rank that cannot go on: the others would
    /// otherwise wait for it in their next sum. A world of one just exits.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A world of one: every sum is the value itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }

    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }

    fn reduce_sum_f32(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }

    fn broadcast_f32(&self, _: &mut [f32], _: usize) -> Result<()> {
        Ok(())
    }
}

/// Appends a tensor's gradient as the ranks sum it: its `elem_count` values in f32, then one
/// more value that counts the ranks holding a gradient (all zeros from a rank without one).
/// A tensor no rank reached then stays without a gradient, as in a single process, and AdamW
/// leaves it alone (LLaVA-NeXT's row separator in a text-only step).
pub fn push_gradient(flat: &mut Vec<f32>, grad: Option<&Tensor>, elem_count: usize) -> Result<()> {
    match grad {
        Some(g) => {
            flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            flat.push(1.0);
        }
        None => flat.extend(std::iter::repeat_n(0.0, elem_count + 1)),
    }
    Ok(())
}

/// The summed gradient that [`push_gradient`] packed for `like` (the parameter, whose shape and
/// dtype it takes), or `None` when no rank had one.
pub fn summed_gradient(packed: &[f32], like: &Tensor) -> Result<Option<Tensor>> {
    let n = like.elem_count();
    if packed[n] <= 0.0 {
        return Ok(None);
    }
    let g = Tensor::from_slice(&packed[..n], like.shape(), like.device())?;
    Ok(Some(g.to_dtype(like.dtype())?))
}
