//! Where the kernels' parallel loops start.
//!
//! A rayon loop started from a thread outside rayon's pool is injected into the pool, and the
//! caller sleeps until it ends: every product wakes a worker and then the caller again. A
//! decoded token runs about 155 products (tiny-1b), so those wake-ups were 5–9% of decoding
//! in a profile (BENCHMARKS.md). Started from a worker, the same loop forks there: the worker
//! runs one half itself and only the idle worker has to wake.

use candle_core::Device;

/// Runs `f` on one of rayon's worker threads while the caller waits, so that every parallel
/// loop inside it forks from within the pool. On a worker already, or for a GPU device (whose
/// work is queued, and whose context belongs to the calling thread), `f` runs here.
pub fn on_worker<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_worker_and_nests() {
        assert_eq!(rayon::current_thread_index(), None);
        let (outer, inner) = on_worker(&Device::Cpu, || {
            let outer = rayon::current_thread_index();
            (outer, on_worker(&Device::Cpu, rayon::current_thread_index))
        });
        assert!(outer.is_some());
        assert_eq!(inner, outer, "nested calls stay on the same worker");
    }
}
