//! Two-stage visual instruction tuning: data and batching, the optimizer, schedule and clipping
//! with PyTorch's semantics, the training loop with the paper's freezing rules, and checkpoints
//! with exact resume.

pub mod adamw_cpu;
pub mod checkpoint;
pub mod clip;
pub mod collective;
pub mod data;
pub mod error;
pub mod memory;
#[cfg(feature = "mpi")]
pub mod mpi_world;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod smoothing;
pub mod tower;
pub mod trainer;
pub mod zero;
