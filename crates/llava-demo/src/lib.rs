//! `llava demo`'s pieces that are not the model: the synthetic shapes world, the offline
//! rule-based teacher, the world's tokenizer and the evaluation questions.

pub mod caption_check;
pub mod data;
pub mod error;
pub mod questions;
pub mod teacher;
pub mod tokenizer;
pub mod words;
pub mod world;
