//! `llava serve`: the OpenAI chat-completions API over a LLaVA checkpoint.
//!
//! HTTP handlers ([`routes`]) only parse and check requests ([`validate`]), fetch and decode
//! their images ([`media`]), and enqueue them; one thread owns the model ([`scheduler`]) and
//! decodes every running request together, a request joining or leaving the batch at any step.

pub mod auth;
pub mod config;
pub mod error;
pub mod media;
pub mod metrics;
pub mod prompt_pool;
pub mod remote;
pub mod routes;
pub mod scheduler;
pub mod server;
pub mod sse;
pub mod validate;
pub mod wire;

pub use config::{MediaPolicy, ServeConfig};
pub use error::{ApiError, ServeError};
pub use server::{Loader, Server};
