//! Producing text: sampling, left-padded batches (and a running batch that sequences join and
//! leave, for a server), the prompt cache between chat turns, a reply's text cut at stop
//! strings, and the end-to-end pipeline from prompt to answer.

pub mod batch_decode;
pub mod generation;
pub mod pipeline;
pub mod prompt_cache;
pub mod reply_text;
