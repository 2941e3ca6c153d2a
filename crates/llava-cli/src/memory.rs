//! The allocator, and when it hands freed memory back to the kernel.

/// candle allocates a fresh buffer for every tensor op; glibc's malloc hands large freed
/// buffers back to the kernel, so each training step paid page faults for memory it had just
/// freed. mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (v2 and v3); the Rust bindings skip it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// By default mimalloc still returns freed memory to the kernel after 10 ms, so every training
/// step re-faulted (and the kernel re-zeroed) the pages of its largest tensors: about 15% of a
/// demo step in a profile (BENCHMARKS.md). Never purging keeps them; the process's peak is
/// what it holds.
///
/// A server is the exception: its load comes in bursts (a prompt with an image joins the
/// batch, then leaves), and holding each burst's peak for ever makes its resident memory a
/// high-water mark. It hands back what stayed unused for a second: longer than any decode
/// step, so a step's buffers are still reused by the next one. `MIMALLOC_PURGE_DELAY`, when
/// set, decides for every command.
pub fn set_purge_delay(serving: bool) {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    let delay_ms = if serving { 1000 } else { -1 };
    // SAFETY: sets an integer option; mimalloc reads options at each use.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay_ms) };
}

/// Runs `load` with freed memory handed back at once, then restores the command's delay.
///
/// Loading reads each tensor in the file's dtype and converts or quantizes it; kept, those
/// freed copies stayed resident through the whole run (0.1–0.3 GB on tiny-1b, BENCHMARKS.md),
/// and the steps after loading allocate other sizes than loading did.
pub fn while_loading<T>(load: impl FnOnce() -> T) -> T {
    // SAFETY: reads and sets an integer option; mimalloc reads options at each use.
    let delay = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) };
    let loaded = load();
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay) };
    loaded
}
