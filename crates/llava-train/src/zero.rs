//! The sharded optimizer (`--zero 1`, DeepSpeed's ZeRO stage 1): each rank keeps the AdamW
//! moments of its share of the trainable tensors only. A step sums each tensor's gradient into
//! the rank that owns it (the reduce-scatter), the owner updates the tensor, and the new values
//! go to every rank (the all-gather). AdamW works element by element, so the result is the
//! unsharded update, bit for bit on every rank; the moments take 1/N of the memory.
//!
//! Unlike DeepSpeed, which cuts one flat buffer into equal slices, whole tensors are dealt
//! out, largest first, to the rank holding the fewest values so far: a checkpoint then names
//! every moment by its tensor, and a resume with another rank count deals them out again.

use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::clip::{clip_coefficient, grad_sum_sq};
use crate::collective::{Collective, push_gradient, summed_gradient};
use crate::error::Result;
use crate::optim::AdamW;

/// The rank that owns each tensor, for tensors of `sizes` values over `world` ranks.
pub fn owners(sizes: &[usize], world: usize) -> Vec<usize> {
    let world = world.max(1);
    let mut by_size: Vec<usize> = (0..sizes.len()).collect();
    // Largest first; equal sizes in their own order, so every rank deals alike.
    by_size.sort_by(|&a, &b| sizes[b].cmp(&sizes[a]).then(a.cmp(&b)));
    let mut load = vec![0usize; world];
    let mut owner = vec![0; sizes.len()];
    for i in by_size {
        let rank = (0..world).min_by_key(|&r| (load[r], r)).unwrap_or(0);
        load[rank] += sizes[i];
        owner[i] = rank;
    }
    owner
}

/// The owner of each of the optimizer's tensors, in its order.
fn owner_of_each(optimizer: &AdamW, world: usize) -> Vec<usize> {
    let sizes: Vec<usize> = optimizer
        .params
        .iter()
        .map(|p| p.var.as_tensor().elem_count())
        .collect();
    owners(&sizes, world)
}

/// Keeps only this rank's moments: the others are freed and their tensors marked not owned.
pub fn shard(optimizer: &mut AdamW, rank: usize, world: usize) -> Result<()> {
    let owner = owner_of_each(optimizer, world);
    for (p, owner) in optimizer.params.iter_mut().zip(owner) {
        p.owned = owner == rank;
        if !p.owned {
            let empty = Tensor::zeros(0, p.exp_avg.dtype(), p.exp_avg.device())?;
            p.exp_avg = empty.clone();
            p.exp_avg_sq = empty;
        }
    }
    Ok(())
}

/// One sharded optimizer step over this rank's summed micro-batch gradients `grads`: reduce
/// to the owners, clip by the global norm, update the owned tensors, gather them back.
/// Returns the global gradient norm before clipping, and the time spent in the sums between
/// ranks.
pub fn step(
    optimizer: &mut AdamW,
    grads: &mut GradStore,
    collective: &dyn Collective,
    lr: f64,
    max_norm: f64,
) -> Result<(f64, Duration)> {
    let mut comm = Duration::ZERO;
    let mut timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        let started = Instant::now();
        f()?;
        comm += started.elapsed();
        Ok(())
    };
    let owner = owner_of_each(optimizer, collective.world_size());
    let rank = collective.rank();
    for (p, &owner) in optimizer.params.iter().zip(&owner) {
        let t = p.var.as_tensor();
        let n = t.elem_count();
        let mut flat = Vec::with_capacity(n + 1);
        push_gradient(&mut flat, grads.remove(t).as_ref(), n)?;
        timed(&mut || collective.reduce_sum_f32(&mut flat, owner))?;
        if owner == rank
            && let Some(g) = summed_gradient(&flat, t)?
        {
            grads.insert(t, g);
        }
    }
    let owned: Vec<&Var> = optimizer.params.iter().map(|p| &p.var).collect();
    let mut sum_sq = [grad_sum_sq(grads, &owned)?];
    timed(&mut || collective.all_reduce_sum_f64(&mut sum_sq))?;
    let norm = sum_sq[0].sqrt();
    optimizer.step(grads, lr, clip_coefficient(norm, max_norm))?;
    for (p, &owner) in optimizer.params.iter().zip(&owner) {
        let t = p.var.as_tensor();
        let mut flat = match owner == rank {
            true => t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
            false => vec![0.0; t.elem_count()],
        };
        timed(&mut || collective.broadcast_f32(&mut flat, owner))?;
        if owner != rank {
            let new = Tensor::from_slice(&flat, t.shape(), t.device())?;
            p.var.set(&new.to_dtype(t.dtype())?)?;
        }
    }
    Ok((norm, comm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn tensors_are_dealt_largest_first_to_the_least_loaded_rank() {
        // 100 → r0; 60 → r1; 50 → r1 (60 < 100); 10 → r0 (100 < 110); 10 → r0 (110 = 110,
        // the lower rank).
        assert_eq!(owners(&[10, 100, 50, 60, 10], 2), vec![0, 0, 1, 1, 0]);
        assert_eq!(owners(&[5, 5, 5], 1), vec![0, 0, 0]);
        // More ranks than tensors: some ranks own nothing.
        assert_eq!(owners(&[7, 3], 4), vec![0, 1]);
    }

    #[test]
    fn a_shard_keeps_the_moments_of_its_own_tensors_only() {
        let cpu = Device::Cpu;
        let vars = [("a", 100), ("b", 60), ("c", 50)]
            .into_iter()
            .map(|(name, n)| {
                let var = Var::from_tensor(&Tensor::zeros(n, DType::F32, &cpu).expect("zeros"))
                    .expect("var");
                (name.to_string(), var)
            })
            .collect();
        let mut optimizer = AdamW::new(vars, Default::default()).expect("optimizer");
        shard(&mut optimizer, 1, 2).expect("shard");
        let kept: Vec<(bool, usize)> = optimizer
            .params
            .iter()
            .map(|p| (p.owned, p.exp_avg.elem_count() + p.exp_avg_sq.elem_count()))
            .collect();
        assert_eq!(kept, vec![(false, 0), (true, 120), (true, 100)]);
    }

    /// In a world of one the sharded step is the plain one: same norm, same weights.
    #[test]
    fn a_world_of_one_steps_as_the_unsharded_optimizer() {
        let cpu = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (7, 5), &cpu).expect("init");
        let grad = Tensor::randn(0f32, 3.0, (7, 5), &cpu).expect("grad");
        let make = || {
            let var = Var::from_tensor(&init).expect("var");
            AdamW::new(vec![("w".into(), var)], Default::default()).expect("optimizer")
        };
        let (mut plain, mut sharded) = (make(), make());
        let grads_for = |o: &AdamW| {
            let mut g = GradStore::default();
            g.insert(o.params[0].var.as_tensor(), grad.clone());
            g
        };
        let (g1, mut g2) = (grads_for(&plain), grads_for(&sharded));
        let norm = plain.clip_and_step(&g1, 1e-2, 1.0).expect("plain");
        shard(&mut sharded, 0, 1).expect("shard");
        let (sharded_norm, _) = step(
            &mut sharded,
            &mut g2,
            &crate::collective::SingleProcess,
            1e-2,
            1.0,
        )
        .expect("sharded");
        assert!(
            (norm - sharded_norm).abs() <= 1e-9 * norm,
            "{norm} vs {sharded_norm}"
        );
        let a: Vec<f32> = plain.params[0]
            .var
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = sharded.params[0]
            .var
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, init.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
