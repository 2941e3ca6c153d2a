//! The processes of one data-parallel job and the sums they compute together. One trainer loop
//! serves one process or many: a single process is a world of one, whose sums are the values
//! themselves. `mpirun -np N llava train ...` makes N ranks ([`crate::mpi_world`], feature
//! `mpi`); each walks the same seeded order, takes its slice of every global batch, and adds
//! its gradients into the global sum before the same update on every rank.

use crate::error::Result;

pub trait Collective {
    /// This process's index, 0 for the one that writes logs and checkpoints.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Replaces `values` on every rank with their element-wise sum over all ranks.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// [`Collective::all_reduce_sum_f64`] for the gradients.
    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()>;
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
}
