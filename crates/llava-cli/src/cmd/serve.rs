//! `llava serve`: the OpenAI chat-completions API (with images) over a checkpoint, for the
//! official clients and anything built on them ([`llava_serve`]).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use llava_model::pipeline::Pipeline;
use llava_serve::{MediaPolicy, ServeConfig, Server};

use super::model_args::ModelArgs;

#[derive(clap::Args, Debug)]
pub struct ServeCommand {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; anything but loopback exposes the server to the network.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The model name that /v1/models lists and requests must name (default: the --model
    /// directory's name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1/* and /metrics.
    #[arg(long, conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// As --api-key, with the key (first line) read from a file, out of the process list.
    #[arg(long)]
    pub api_key_file: Option<PathBuf>,
    /// Allow browser pages from this origin (repeatable); CORS is off without it.
    #[arg(long = "cors-origin")]
    pub cors_origin: Vec<String>,
    /// Sequences decoded together; memory grows with it.
    #[arg(long, default_value_t = 8)]
    pub max_running: usize,
    /// Requests waiting beyond --max-running; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Conversations whose keys and values are kept, so that a next turn prefills only its new
    /// tokens (least recently used dropped first); 0 turns the prompt cache off.
    #[arg(long, default_value_t = 16)]
    pub prompt_cache: usize,
    /// Prompt tokens prefilled per step between the running sequences' decode steps (chunked
    /// prefill), so that a long prompt does not stall every stream; 0 prefills each prompt whole.
    #[arg(long, default_value_t = 256)]
    pub prefill_chunk: usize,
    /// Largest request body in bytes (images included); larger gets 413.
    #[arg(long, default_value_t = 20 << 20)]
    pub max_body_bytes: usize,
    #[arg(long, default_value_t = 8)]
    pub max_images_per_request: usize,
    /// Largest image in pixels (width x height), read from its header before decoding.
    #[arg(long, default_value_t = 4096 * 4096)]
    pub max_image_pixels: u64,
    /// Largest image file or download in bytes.
    #[arg(long, default_value_t = 20 << 20)]
    pub max_image_bytes: usize,
    /// Read file:// and plain-path images, but only from under this folder (after resolving
    /// `..` and symlinks).
    #[arg(long)]
    pub allowed_local_media_path: Option<PathBuf>,
    /// Fetch http(s) image URLs (public addresses only, unless --allowed-media-domains).
    #[arg(long)]
    pub allow_remote_images: bool,
    /// Hosts that may resolve to loopback or private addresses (comma-separated or repeated).
    #[arg(long, value_delimiter = ',')]
    pub allowed_media_domains: Vec<String>,
    /// Seconds per image download (each redirect included).
    #[arg(long, default_value_t = 10)]
    pub image_fetch_timeout: u64,
}

pub fn run(c: ServeCommand) -> Result<()> {
    let api_keys = match (&c.api_key, &c.api_key_file) {
        (Some(key), _) => vec![key.clone()],
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--api-key-file {}", path.display()))?;
            let key = text.lines().next().unwrap_or_default().trim().to_string();
            if key.is_empty() {
                bail!("--api-key-file {}: the file has no key", path.display());
            }
            vec![key]
        }
        (None, None) => Vec::new(),
    };
    if let Some(dir) = &c.allowed_local_media_path
        && !dir.is_dir()
    {
        bail!(
            "--allowed-local-media-path {}: not a directory",
            dir.display()
        );
    }
    let model_name = c.served_model_name.clone().unwrap_or_else(|| {
        let path = std::path::Path::new(&c.model.checkpoint.model);
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| c.model.checkpoint.model.clone())
    });
    let config = ServeConfig {
        model_name,
        api_keys,
        cors_origins: c.cors_origin.clone(),
        max_body_bytes: c.max_body_bytes,
        max_images_per_request: c.max_images_per_request,
        max_image_pixels: c.max_image_pixels,
        max_running: c.max_running,
        max_queue: c.max_queue,
        prompt_cache: c.prompt_cache,
        prefill_chunk: c.prefill_chunk,
        media: MediaPolicy {
            allowed_local_media_path: c.allowed_local_media_path.clone(),
            allow_remote_images: c.allow_remote_images,
            allowed_media_domains: c.allowed_media_domains.clone(),
            max_image_bytes: c.max_image_bytes,
            fetch_timeout: Duration::from_secs(c.image_fetch_timeout),
            max_redirects: 3,
        },
    };
    let addr = format!("{}:{}", c.host, c.port);
    let listener =
        std::net::TcpListener::bind(&addr).with_context(|| format!("cannot listen on {addr}"))?;
    let model = c.model.clone();
    let limits = config.clone();
    let loader = Box::new(move || -> Result<Pipeline, String> {
        let pipeline = model.load().map_err(|e| crate::one_line(&e))?;
        eprintln!(
            "ready: {}",
            llava_serve::server::capacity(&pipeline, &limits)
        );
        Ok(pipeline)
    });
    let server = Server::start(config, listener, loader, true)?;
    eprintln!(
        "llava serve: listening on http://{} (loading {}; /health answers 503 until ready)",
        server.addr(),
        c.model.checkpoint.model
    );
    server.wait()?;
    Ok(())
}
