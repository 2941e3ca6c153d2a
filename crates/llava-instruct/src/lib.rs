//! GPT-assisted multimodal instruction data generation (LLaVA paper, section 3).
//!
//! A text-only teacher LLM is shown an image through symbolic representations (its captions
//! and its object boxes, see [`context`]) and asked, with a system message and few-shot
//! examples per response type ([`prompts`]), for a conversation, a detailed description or a
//! complex-reasoning question/answer. Replies are parsed into LLaVA records ([`parse`]);
//! unusable ones go to `rejects.jsonl`. [`pipeline`] runs this resumably over a COCO or JSONL
//! source ([`source`]), and [`convert`] turns image–caption pairs into stage-1 data.
//!
//! [`client`] is the project's one OpenAI-compatible chat client, shared with the evaluator's
//! LLM judge.

pub mod batch;
pub mod client;
pub mod context;
pub mod convert;
pub mod cost;
pub mod error;
pub mod filter;
pub mod output;
pub mod parse;
pub mod pipeline;
pub mod prompts;
pub mod source;
pub mod stats;
pub mod stats_plot;
pub mod types;

pub use client::{
    ChatClient, ChatMessage, ChatRequest, ChatResponse, ClientConfig, ClientError, Role, Usage,
};
pub use error::InstructError;
pub use filter::Filters;
pub use pipeline::{Price, RunConfig, RunSummary, run, run_blocking};
pub use prompts::PromptLibrary;
pub use source::{ImageEntry, SourceSpec};
pub use types::{InstructType, Shard};
