//! Which data-parallel job this process belongs to: under `mpirun` (a build with the `mpi`
//! feature) one rank of N, otherwise a world of one.

use anyhow::Result;
use llava_train::collective::{Collective, SingleProcess};

/// The world size mpirun (OpenMPI, or a PMIx launcher) gave this process, if it started it.
fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

pub fn join_job() -> Result<Box<dyn Collective>> {
    #[cfg(feature = "mpi")]
    if launched_size().is_some() {
        return Ok(Box::new(llava_train::mpi_world::MpiWorld::init()?));
    }
    if let Some(n) = launched_size().filter(|&n| n > 1) {
        anyhow::bail!(
            "started as one of {n} ranks, but this llava was built without MPI: build it with \
             `cargo build --release -p llava-cli --features mpi` (needs OpenMPI's development files)"
        );
    }
    Ok(Box::new(SingleProcess))
}
