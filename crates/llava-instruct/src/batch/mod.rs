//! OpenAI's Batch API (also read by `vllm run-batch`): the same requests as the live run, at
//! half the price, submitted as JSONL files and collected within 24 hours.
//!
//! - [`input`]: one request line per (image, type), named by its `custom_id`
//!   (`<record id>:<type>`), split at the API's limits (50,000 requests, 200 MB per file);
//! - [`results`]: output and error file lines, back to replies or failures;
//! - [`api`]: `/v1/files` and `/v1/batches` through the project's one HTTP client;
//! - [`state`]: `batch/state.json` in the output folder, which records every file and batch id
//!   as soon as it exists, so a killed run picks up the same batches;
//! - [`run`]: the resumable submit–poll–import loop with retry batches, and the offline halves
//!   (`export-batch`, `import-batch`).

pub mod api;
pub mod input;
pub mod results;
pub mod run;
pub mod state;

pub use input::{BatchLimits, custom_id, parse_custom_id};
pub use run::{BatchConfig, export_batch, import_batch, run_batch, run_batch_blocking};
