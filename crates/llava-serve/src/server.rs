//! Starting and stopping the server: it listens at once (answering `/health` with 503), loads
//! the model on the thread that will own it, and serves until stopped or the load fails.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use llava_model::pipeline::Pipeline;
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::config::ServeConfig;
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::routes::{self, AppState, ModelHandle};
use crate::scheduler;

/// Loads the checkpoint; run on the model thread.
pub type Loader = Box<dyn FnOnce() -> Result<Pipeline, String> + Send>;

/// A running server. Dropping it stops it.
pub struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServeError>>>,
}

impl Server {
    /// Serves on `listener` (already bound, so a test can pick a free port) on a thread of its
    /// own. With `ctrl_c`, an interrupt stops it too.
    pub fn start(
        config: ServeConfig,
        listener: std::net::TcpListener,
        loader: Loader,
        ctrl_c: bool,
    ) -> Result<Self, ServeError> {
        if config.max_running == 0 {
            return Err(ServeError::Config(
                "--max-running must be at least 1".into(),
            ));
        }
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let state = Arc::new(AppState {
            slots: Arc::new(Semaphore::new(config.max_running + config.max_queue)),
            config,
            model: OnceLock::new(),
            metrics: Arc::new(Metrics::default()),
            started,
        });
        let router = routes::router(state.clone())?;
        let (stop, stop_rx) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(ServeError::Runtime)?;
        let thread = std::thread::spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                let (load_failed, failed_rx) = oneshot::channel();
                spawn_model_thread(state, loader, load_failed);
                let failure = Arc::new(std::sync::Mutex::new(None));
                let failed = failure.clone();
                let shutdown = async move {
                    tokio::select! {
                        _ = stop_rx => {}
                        Ok(e) = failed_rx => {
                            if let Ok(mut slot) = failed.lock() {
                                *slot = Some(e);
                            }
                        }
                        _ = interrupted(ctrl_c) => {}
                    }
                };
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await?;
                match failure.lock().ok().and_then(|mut f| f.take()) {
                    Some(e) => Err(ServeError::Load(e)),
                    None => Ok(()),
                }
            })
        });
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Blocks until the server stops: an interrupt, or the model failing to load.
    pub fn wait(mut self) -> Result<(), ServeError> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(ServeError::Config("the server thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn interrupted(enabled: bool) {
    if enabled {
        let _ = tokio::signal::ctrl_c().await;
    } else {
        std::future::pending::<()>().await;
    }
}

/// Loads the model on its own thread, then hands the routes its inbox and runs the scheduler.
fn spawn_model_thread(state: Arc<AppState>, loader: Loader, failed: oneshot::Sender<String>) {
    std::thread::spawn(move || {
        let pipeline = match loader() {
            Ok(p) => p,
            Err(e) => {
                let _ = failed.send(e);
                return;
            }
        };
        let (jobs, rx) = mpsc::unbounded_channel();
        let max_running = state.config.max_running;
        let prompt_cache = state.config.prompt_cache;
        let prefill_chunk = state.config.prefill_chunk;
        let metrics = state.metrics.clone();
        tracing::info!("{}", capacity(&pipeline, &state.config));
        let _ = state.model.set(ModelHandle {
            jobs,
            processor: pipeline.image_processor.clone(),
        });
        // The routes hold the only sender now: when the server stops, the scheduler does too.
        drop(state);
        metrics.running.store(0, Ordering::Relaxed);
        scheduler::run(
            &pipeline,
            rx,
            max_running,
            prompt_cache,
            prefill_chunk,
            metrics,
        );
    });
}

/// What the limits allow, for start-up: the KV cache of `max_running` sequences at full context
/// bounds the memory that requests can take.
pub fn capacity(pipeline: &Pipeline, config: &ServeConfig) -> String {
    let text = &pipeline.model.config.text_config;
    let context = pipeline.model.language_model.context_len();
    // The activations' dtype is the cache's.
    let dtype_size = pipeline
        .model
        .language_model
        .embed(&[vec![0]])
        .map(|t| t.dtype().size_in_bytes())
        .unwrap_or(4);
    let bytes_per_token =
        2 * text.num_hidden_layers * text.num_kv_heads() * text.head_dim() * dtype_size;
    let total = bytes_per_token * context * config.max_running;
    let cached = bytes_per_token * context * config.prompt_cache;
    format!(
        "up to {} running sequences of at most {context} tokens each and {} queued; the KV cache of a full batch takes at most {:.1} MiB, and the prompt cache of {} conversations at most {:.1} MiB",
        config.max_running,
        config.max_queue,
        total as f64 / (1 << 20) as f64,
        config.prompt_cache,
        cached as f64 / (1 << 20) as f64
    )
}
