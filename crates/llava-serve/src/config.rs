//! What `llava serve`'s flags set: where to listen, who may call, and every cap on a request.

use std::path::PathBuf;
use std::time::Duration;

/// Where images may come from besides `data:` URLs, which are always accepted.
#[derive(Debug, Clone, Default)]
pub struct MediaPolicy {
    /// `file://` URLs and plain paths are read only under this directory (canonicalised).
    pub allowed_local_media_path: Option<PathBuf>,
    /// `http(s)://` URLs are fetched only when this is set.
    pub allow_remote_images: bool,
    /// Hosts whose addresses may be loopback, private or link-local (a lab's own image server).
    pub allowed_media_domains: Vec<String>,
    /// A remote image larger than this is refused while it downloads.
    pub max_image_bytes: usize,
    /// For each hop of a download, body included.
    pub fetch_timeout: Duration,
    /// Redirects followed, each checked as the first URL is.
    pub max_redirects: usize,
}

#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// The name `/v1/models` lists and responses carry.
    pub model_name: String,
    /// Bearer keys accepted on `/v1/*` and `/metrics`; none means no auth.
    pub api_keys: Vec<String>,
    /// Origins allowed by CORS; none means no CORS headers at all.
    pub cors_origins: Vec<String>,
    /// Request bodies above this get a 413.
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    /// Checked from the image header, before decoding.
    pub max_image_pixels: u64,
    /// Sequences decoded together.
    pub max_running: usize,
    /// Requests waiting for a place in the batch; beyond it, 429.
    pub max_queue: usize,
    /// Conversations whose keys and values are kept for their next turn ([`crate::prompt_pool`]);
    /// 0 turns the prompt cache off.
    pub prompt_cache: usize,
    /// Prompt tokens prefilled per step while others decode (chunked prefill); 0: whole.
    pub prefill_chunk: usize,
    pub media: MediaPolicy,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            model_name: "llava".into(),
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            max_body_bytes: 20 << 20,
            max_images_per_request: 8,
            // 4096 x 4096: far above what the vision tower looks at.
            max_image_pixels: 4096 * 4096,
            max_running: 8,
            max_queue: 64,
            prompt_cache: 16,
            prefill_chunk: 256,
            media: MediaPolicy {
                max_image_bytes: 20 << 20,
                fetch_timeout: Duration::from_secs(10),
                max_redirects: 3,
                ..MediaPolicy::default()
            },
        }
    }
}
