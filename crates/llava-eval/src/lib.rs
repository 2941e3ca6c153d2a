//! Evaluation as the LLaVA paper does it (MISSION §4).
//!
//! - [`answer`]: answering benchmark questions with a checkpoint, as `llava generate` does.
//! - [`judge`]: LLaVA-Bench. A text-only LLM judge sees a description of the image, the
//!   question, the reference answer (Assistant 1) and the model's answer (Assistant 2), and
//!   scores both 1–10. It talks through the project's one client, [`llava_instruct::client`].
//! - [`score`]: reading the two scores out of a judge reply.
//! - [`review`]: the reviews file and the relative-score summary.
//! - [`mc`]: multiple-choice (ScienceQA-style) prompts, answer-letter parsing and accuracy.
//! - [`vqa`]: short-answer prompting and exact-match scoring after normalisation.
//! - [`yes_no`]: the yes/no question files of POPE and MME.
//! - [`pope`]: POPE's object-hallucination scores: accuracy, precision, recall, F1.
//! - [`mmbench`]: MMBench's TSV as rotated multiple-choice lines, and circular accuracy.
//! - [`mme`]: MME's yes/no subtasks: acc + acc+ per subtask, perception and cognition totals.
//! - [`jsonl`]: the question and answer file formats.

pub mod answer;
pub mod append;
pub mod error;
pub mod jsonl;
pub mod judge;
pub mod mc;
pub mod mmbench;
pub mod mme;
pub mod pope;
pub mod review;
pub mod score;
pub mod tally;
pub mod vqa;
pub mod yes_no;

pub use error::EvalError;
pub use jsonl::{Answer, Question, QuestionId};
pub use review::{Review, Summary, format_summary, read_reviews, summarize};
pub use score::parse_scores;
