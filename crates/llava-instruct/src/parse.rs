//! Turning teacher replies into LLaVA records, and rejecting those that do not parse.
//!
//! **Question/answer replies** (conversation, complex) are read line by line. A line that
//! starts with a label opens a new turn: `Question:`/`Q:`/`User:`/`Human:` (optionally
//! numbered, `Question 2:`, and optionally in markdown bold or after `#`) opens a question;
//! `Answer:`/`A:`/`Assistant:`/`GPT:` opens an answer. The text after the label and the lines
//! up to the next label belong to the turn. Separator lines (`===`, `---`) are skipped, and so is
//! any text before the first label (a chatty preamble). The turns must alternate question,
//! answer, question, answer… and end with an answer; every turn must have text.
//!
//! **Rejects**: an empty reply, no turns, unbalanced turns, an empty turn, the wrong number of
//! pairs (complex wants exactly one), a reply cut off by the token limit, and whatever the
//! quality filters ([`crate::filter`]) turn down, such as a reply that gives away the symbolic
//! input: it mentions captions, bounding boxes, bboxes or coordinates, or contains a bracketed
//! list of numbers such as `[0.31, 0.08]`.
//!
//! The first human turn carries `<image>` before (`<image>\nQ`) or after (`Q\n<image>`) the
//! question, chosen at random with the pair's seeded generator.

use std::fmt;

use llava_data::record::{IMAGE_PLACEHOLDER, LlavaRecord, Turn};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::context::caption_lines;
use crate::filter::Filters;
use crate::prompts::PromptLibrary;
use crate::source::ImageEntry;
use crate::types::InstructType;

/// Why a reply did not make it into the dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    Empty,
    Truncated,
    NoTurns,
    Unbalanced(String),
    EmptyTurn(usize),
    WrongPairCount {
        expected: usize,
        got: usize,
    },
    Leak(String),
    NoCaptions,
    /// A refusal or apology instead of an answer (the phrase found).
    Refusal(String),
    TooShort {
        words: usize,
        min: usize,
    },
    TooLong {
        words: usize,
        max: usize,
    },
    /// The 1-based index of a question that repeats an earlier one.
    DuplicateQuestion(usize),
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::Empty => write!(f, "empty reply"),
            RejectReason::Truncated => write!(
                f,
                "reply cut off by the token limit (finish_reason = length)"
            ),
            RejectReason::NoTurns => write!(f, "no question/answer turns found"),
            RejectReason::Unbalanced(m) => write!(f, "unbalanced turns: {m}"),
            RejectReason::EmptyTurn(i) => write!(f, "turn {i} is empty"),
            RejectReason::WrongPairCount { expected, got } => {
                write!(f, "expected {expected} question/answer pair(s), got {got}")
            }
            RejectReason::Leak(w) => write!(f, "reply mentions the symbolic input ({w})"),
            RejectReason::NoCaptions => write!(f, "the image has no captions"),
            RejectReason::Refusal(p) => write!(f, "reply refuses or apologises ({p})"),
            RejectReason::TooShort { words, min } => {
                write!(
                    f,
                    "answer too short for its type ({words} words, min {min})"
                )
            }
            RejectReason::TooLong { words, max } => {
                write!(f, "answer too long for its type ({words} words, max {max})")
            }
            RejectReason::DuplicateQuestion(i) => {
                write!(f, "question {i} repeats an earlier question")
            }
        }
    }
}

impl RejectReason {
    /// A short stable tag for summaries.
    pub fn tag(&self) -> &'static str {
        match self {
            RejectReason::Empty => "empty",
            RejectReason::Truncated => "truncated",
            RejectReason::NoTurns => "no_turns",
            RejectReason::Unbalanced(_) => "unbalanced",
            RejectReason::EmptyTurn(_) => "empty_turn",
            RejectReason::WrongPairCount { .. } => "pair_count",
            RejectReason::Leak(_) => "leak",
            RejectReason::NoCaptions => "no_captions",
            RejectReason::Refusal(_) => "refusal",
            RejectReason::TooShort { .. } => "too_short",
            RejectReason::TooLong { .. } => "too_long",
            RejectReason::DuplicateQuestion(_) => "duplicate_question",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Label {
    Q,
    A,
}

/// Recognises a turn label at the start of a line; returns the label and the rest of the line.
fn label_of(line: &str) -> Option<(Label, &str)> {
    let t = line
        .trim_start()
        .trim_start_matches(['#', '*', '_'])
        .trim_start();
    let word_end = t
        .find(|c: char| !c.is_ascii_alphabetic())
        .unwrap_or(t.len());
    let word = t[..word_end].to_ascii_lowercase();
    let label = match word.as_str() {
        "question" | "q" | "user" | "human" => Label::Q,
        "answer" | "a" | "assistant" | "gpt" => Label::A,
        _ => return None,
    };
    let mut rest = &t[word_end..];
    // optional number: "Question 2:" / "Q2:"
    rest = rest
        .trim_start_matches(' ')
        .trim_start_matches(|c: char| c.is_ascii_digit());
    // optional closing markdown before or after the colon: "**Question:**" / "**Question**:"
    rest = rest.trim_start_matches(['*', '_']);
    let rest = rest.strip_prefix(':')?;
    Some((label, rest.trim_start_matches(['*', '_']).trim()))
}

fn is_separator(line: &str) -> bool {
    let t = line.trim();
    t.len() >= 3 && (t.chars().all(|c| c == '=') || t.chars().all(|c| c == '-'))
}

/// Splits a question/answer reply into (question, answer) pairs.
pub fn parse_qa(reply: &str) -> Result<Vec<(String, String)>, RejectReason> {
    if reply.trim().is_empty() {
        return Err(RejectReason::Empty);
    }
    let mut turns: Vec<(Label, String)> = Vec::new();
    for line in reply.lines() {
        if is_separator(line) {
            continue;
        }
        if let Some((label, rest)) = label_of(line) {
            turns.push((label, rest.to_string()));
        } else if let Some((_, text)) = turns.last_mut() {
            text.push('\n');
            text.push_str(line.trim_end());
        }
    }
    if turns.is_empty() {
        return Err(RejectReason::NoTurns);
    }
    let mut pairs = Vec::with_capacity(turns.len() / 2);
    let mut it = turns.into_iter().enumerate();
    while let Some((i, (label, q))) = it.next() {
        if label != Label::Q {
            return Err(RejectReason::Unbalanced(format!(
                "turn {} is an answer with no question before it",
                i + 1
            )));
        }
        let Some((j, (label, a))) = it.next() else {
            return Err(RejectReason::Unbalanced(format!(
                "question {} has no answer",
                pairs.len() + 1
            )));
        };
        if label != Label::A {
            return Err(RejectReason::Unbalanced(format!(
                "turn {} is a question following a question",
                j + 1
            )));
        }
        let (q, a) = (q.trim().to_string(), a.trim().to_string());
        if q.is_empty() {
            return Err(RejectReason::EmptyTurn(i + 1));
        }
        if a.is_empty() {
            return Err(RejectReason::EmptyTurn(j + 1));
        }
        pairs.push((q, a));
    }
    Ok(pairs)
}

/// Whether `text` has `[n, n, …]` (two or more numbers) somewhere.
fn has_number_list(text: &str) -> bool {
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'[' {
            let mut j = i + 1;
            let mut numbers = 0;
            loop {
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                let start = j;
                while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.' || b[j] == b'-') {
                    j += 1;
                }
                if j == start || !b[start..j].iter().any(u8::is_ascii_digit) {
                    break;
                }
                numbers += 1;
                while j < b.len() && b[j] == b' ' {
                    j += 1;
                }
                if j < b.len() && b[j] == b',' {
                    j += 1;
                    continue;
                }
                if j < b.len() && b[j] == b']' && numbers >= 2 {
                    return true;
                }
                break;
            }
        }
        i += 1;
    }
    false
}

/// Rejects text that gives away the symbolic input.
pub fn check_leaks(text: &str) -> Result<(), RejectReason> {
    let lower = text.to_lowercase();
    for w in [
        "caption",
        "bounding box",
        "bounding-box",
        "bbox",
        "coordinate",
    ] {
        if lower.contains(w) {
            return Err(RejectReason::Leak(format!("\"{w}\"")));
        }
    }
    if has_number_list(text) {
        return Err(RejectReason::Leak("a bracketed list of numbers".into()));
    }
    Ok(())
}

/// Puts `<image>` before or after the question, at random.
pub fn place_image(question: &str, rng: &mut impl Rng) -> String {
    if rng.random_bool(0.5) {
        format!("{IMAGE_PLACEHOLDER}\n{question}")
    } else {
        format!("{question}\n{IMAGE_PLACEHOLDER}")
    }
}

fn record(entry: &ImageEntry, pairs: Vec<(String, String)>, rng: &mut impl Rng) -> LlavaRecord {
    let mut conversations = Vec::with_capacity(pairs.len() * 2);
    for (i, (q, a)) in pairs.into_iter().enumerate() {
        let q = if i == 0 { place_image(&q, rng) } else { q };
        conversations.push(Turn::human(q));
        conversations.push(Turn::gpt(a));
    }
    LlavaRecord {
        id: serde_json::Value::String(entry.id.clone()),
        image: Some(entry.image.clone()),
        conversations,
    }
}

/// Builds the record of a teacher type from its reply, with the parser's own check that
/// the reply does not mention the symbolic input ([`Filters::context_only`]). `rng` must be
/// the pair's generator (see [`crate::types::pair_seed`]).
pub fn build_record(
    ty: InstructType,
    entry: &ImageEntry,
    reply: &str,
    lib: &PromptLibrary,
    rng: &mut impl Rng,
) -> Result<LlavaRecord, RejectReason> {
    build_record_filtered(ty, entry, reply, lib, &Filters::context_only(), rng)
}

/// Builds the record of a teacher type from its reply after the quality `filters`.
pub fn build_record_filtered(
    ty: InstructType,
    entry: &ImageEntry,
    reply: &str,
    lib: &PromptLibrary,
    filters: &Filters,
    rng: &mut impl Rng,
) -> Result<LlavaRecord, RejectReason> {
    match ty {
        InstructType::Conversation => {
            let pairs = parse_qa(reply)?;
            filters.check(ty, &pairs)?;
            Ok(record(entry, pairs, rng))
        }
        InstructType::Complex => {
            let pairs = parse_qa(reply)?;
            if pairs.len() != 1 {
                return Err(RejectReason::WrongPairCount {
                    expected: 1,
                    got: pairs.len(),
                });
            }
            filters.check(ty, &pairs)?;
            Ok(record(entry, pairs, rng))
        }
        InstructType::Detail => {
            let text = reply.trim();
            if text.is_empty() {
                return Err(RejectReason::Empty);
            }
            filters.check(ty, &[(String::new(), text.to_string())])?;
            let instruction = lib
                .detail_instructions
                .choose(rng)
                .ok_or(RejectReason::Empty)?
                .clone();
            Ok(record(entry, vec![(instruction, text.to_string())], rng))
        }
        InstructType::Brief => brief_record(entry, lib, rng),
    }
}

/// The naive baseline: a brief-description instruction answered by one of the image's
/// captions (chosen at random when there are several).
pub fn brief_record(
    entry: &ImageEntry,
    lib: &PromptLibrary,
    rng: &mut impl Rng,
) -> Result<LlavaRecord, RejectReason> {
    let captions = caption_lines(&entry.captions);
    let caption = captions
        .choose(rng)
        .ok_or(RejectReason::NoCaptions)?
        .clone();
    let instruction = lib
        .brief_instructions
        .choose(rng)
        .ok_or(RejectReason::Empty)?
        .clone();
    Ok(record(entry, vec![(instruction, caption)], rng))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn entry() -> ImageEntry {
        ImageEntry {
            id: "000000000042".into(),
            image: "000000000042.jpg".into(),
            width: 10.0,
            height: 10.0,
            captions: vec!["A dog.".into(), "A brown dog.".into()],
            boxes: vec![],
        }
    }

    #[test]
    fn parses_well_formed_conversation() {
        let reply = "Sure, here it is.\n\nQuestion:\nWhat animal is this?\n===\nAnswer:\nIt is a dog.\nIt looks happy.\n===\n**Question 2:** What colour?\n**Answer 2:** Brown.\n";
        let pairs = parse_qa(reply).unwrap();
        assert_eq!(
            pairs,
            vec![
                (
                    "What animal is this?".to_string(),
                    "It is a dog.\nIt looks happy.".to_string()
                ),
                ("What colour?".to_string(), "Brown.".to_string()),
            ]
        );
        let pairs = parse_qa("Q: a?\nA: b\nUser: c?\nAssistant: d").unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1], ("c?".to_string(), "d".to_string()));
    }

    #[test]
    fn words_that_merely_start_like_labels_are_text() {
        let pairs =
            parse_qa("Question: Is it a dog?\nAnswer: Yes.\nAnswers vary: a dog.\nAnother line.")
                .unwrap();
        assert_eq!(pairs[0].1, "Yes.\nAnswers vary: a dog.\nAnother line.");
    }

    #[test]
    fn malformed_replies() {
        assert_eq!(parse_qa("   \n"), Err(RejectReason::Empty));
        assert_eq!(
            parse_qa("The image shows a dog."),
            Err(RejectReason::NoTurns)
        );
        assert!(matches!(
            parse_qa("Answer: yes"),
            Err(RejectReason::Unbalanced(_))
        ));
        assert!(matches!(
            parse_qa("Question: a?\nQuestion: b?\nAnswer: c"),
            Err(RejectReason::Unbalanced(_))
        ));
        assert!(matches!(
            parse_qa("Question: a?\nAnswer: b\nQuestion: c?"),
            Err(RejectReason::Unbalanced(_))
        ));
        assert_eq!(
            parse_qa("Question: a?\nAnswer:\n===\n"),
            Err(RejectReason::EmptyTurn(2))
        );
        assert_eq!(
            parse_qa("Question:\nAnswer: x"),
            Err(RejectReason::EmptyTurn(1))
        );
    }

    #[test]
    fn leaks_are_rejected() {
        assert!(check_leaks("A dog on grass.").is_ok());
        assert!(check_leaks("The list [dog, cat] is fine, and so is [1].").is_ok());
        assert!(matches!(
            check_leaks("As the Captions say, a dog."),
            Err(RejectReason::Leak(_))
        ));
        assert!(matches!(
            check_leaks("the bounding box of the dog"),
            Err(RejectReason::Leak(_))
        ));
        assert!(matches!(
            check_leaks("its coordinates are"),
            Err(RejectReason::Leak(_))
        ));
        assert!(matches!(
            check_leaks("the dog at [0.31, 0.08, 0.5, 0.9]"),
            Err(RejectReason::Leak(_))
        ));
        assert!(matches!(
            check_leaks("at [0.31,0.08]"),
            Err(RejectReason::Leak(_))
        ));
        let lib = PromptLibrary::builtin().unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let r = build_record(
            InstructType::Conversation,
            &entry(),
            "Question: Where is it?\nAnswer: According to the captions, on grass.",
            &lib,
            &mut rng,
        );
        assert!(matches!(r, Err(RejectReason::Leak(_))));
    }

    #[test]
    fn conversation_record_shape_and_image_once() {
        let lib = PromptLibrary::builtin().unwrap();
        let mut rng = StdRng::seed_from_u64(3);
        let r = build_record(
            InstructType::Conversation,
            &entry(),
            "Q: a?\nA: b\nQ: c?\nA: d",
            &lib,
            &mut rng,
        )
        .unwrap();
        assert_eq!(r.id, serde_json::json!("000000000042"));
        assert_eq!(r.image.as_deref(), Some("000000000042.jpg"));
        let froms: Vec<&str> = r.conversations.iter().map(|t| t.from.as_str()).collect();
        assert_eq!(froms, ["human", "gpt", "human", "gpt"]);
        let all: String = r.conversations.iter().map(|t| t.value.clone()).collect();
        assert_eq!(all.matches(IMAGE_PLACEHOLDER).count(), 1);
        let first = &r.conversations[0].value;
        assert!(first == "<image>\na?" || first == "a?\n<image>", "{first}");
        assert_eq!(r.conversations[2].value, "c?");
    }

    #[test]
    fn image_placement_is_seeded_and_uses_both_sides() {
        let mut before = 0;
        for s in 0..200 {
            let a = place_image("Q", &mut StdRng::seed_from_u64(s));
            let b = place_image("Q", &mut StdRng::seed_from_u64(s));
            assert_eq!(a, b, "same seed, same placement");
            if a == "<image>\nQ" {
                before += 1;
            } else {
                assert_eq!(a, "Q\n<image>");
            }
        }
        assert!((60..=140).contains(&before), "{before}");
    }

    #[test]
    fn complex_wants_one_pair_and_detail_samples_instruction() {
        let lib = PromptLibrary::builtin().unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let r = build_record(
            InstructType::Complex,
            &entry(),
            "Q: a?\nA: b\nQ: c?\nA: d",
            &lib,
            &mut rng,
        );
        assert_eq!(
            r,
            Err(RejectReason::WrongPairCount {
                expected: 1,
                got: 2
            })
        );
        let r = build_record(
            InstructType::Complex,
            &entry(),
            "Question: why?\nAnswer: because.",
            &lib,
            &mut rng,
        )
        .unwrap();
        assert_eq!(r.conversations.len(), 2);

        let mut used = std::collections::HashSet::new();
        for s in 0..300 {
            let mut rng = StdRng::seed_from_u64(s);
            let r = build_record(
                InstructType::Detail,
                &entry(),
                "  A brown dog sits.  ",
                &lib,
                &mut rng,
            )
            .unwrap();
            assert_eq!(r.conversations[1].value, "A brown dog sits.");
            let q = r.conversations[0].value.replace(IMAGE_PLACEHOLDER, "");
            let q = q.trim();
            assert!(lib.detail_instructions.iter().any(|i| i == q), "{q}");
            used.insert(q.to_string());
        }
        assert_eq!(
            used.len(),
            lib.detail_instructions.len(),
            "all paraphrases get drawn"
        );
        assert_eq!(
            build_record(InstructType::Detail, &entry(), " \n", &lib, &mut rng),
            Err(RejectReason::Empty)
        );
    }

    #[test]
    fn brief_uses_a_caption() {
        let lib = PromptLibrary::builtin().unwrap();
        let mut rng = StdRng::seed_from_u64(9);
        let r = brief_record(&entry(), &lib, &mut rng).unwrap();
        assert!(["A dog.", "A brown dog."].contains(&r.conversations[1].value.as_str()));
        let mut e = entry();
        e.captions = vec![" ".into()];
        assert_eq!(
            brief_record(&e, &lib, &mut rng),
            Err(RejectReason::NoCaptions)
        );
    }
}
