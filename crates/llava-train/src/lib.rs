//! Two-stage visual instruction tuning: the optimizer, learning-rate schedule and gradient
//! clipping with PyTorch's exact semantics. The training loop, freezing rules per stage and
//! checkpoints build on these.

pub mod clip;
pub mod optim;
pub mod schedule;
