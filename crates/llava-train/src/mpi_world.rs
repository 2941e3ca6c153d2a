//! MPI ranks (OpenMPI through the `mpi` crate, feature `mpi`): `mpirun -np N llava train ...`
//! starts N processes, and their sums go through `MPI_Allreduce` (`MPI_Reduce` and `MPI_Bcast`
//! for the sharded optimizer). A rank that dies or fails
//! ends the whole job: OpenMPI's mpirun stops every other rank when one exits with an error or
//! a signal, so no rank waits for ever in a sum.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};

use crate::collective::Collective;
use crate::error::{Result, TrainError};

pub struct MpiWorld {
    world: SimpleCommunicator,
    /// Finalizes MPI when dropped; kept for the life of the job.
    _universe: Universe,
}

impl MpiWorld {
    /// Joins the job that `mpirun` started (a process started alone is a world of one).
    pub fn init() -> Result<Self> {
        let universe = mpi::initialize().ok_or_else(|| {
            TrainError::Data("MPI was already initialized in this process".into())
        })?;
        Ok(Self {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Collective for MpiWorld {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn world_size(&self) -> usize {
        self.world.size() as usize
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let local = values.to_vec();
        self.world
            .all_reduce_into(&local[..], values, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f32(&self, values: &mut [f32]) -> Result<()> {
        let local = values.to_vec();
        self.world
            .all_reduce_into(&local[..], values, SystemOperation::sum());
        Ok(())
    }

    fn reduce_sum_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        let process = self.world.process_at_rank(root as i32);
        let local = values.to_vec();
        if self.rank() == root {
            process.reduce_into_root(&local[..], values, SystemOperation::sum());
        } else {
            process.reduce_into(&local[..], SystemOperation::sum());
        }
        Ok(())
    }

    fn broadcast_f32(&self, values: &mut [f32], root: usize) -> Result<()> {
        self.world
            .process_at_rank(root as i32)
            .broadcast_into(values);
        Ok(())
    }

    /// `MPI_Abort`: mpirun ends every rank of the job.
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
