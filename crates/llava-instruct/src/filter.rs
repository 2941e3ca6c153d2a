//! Quality filters on teacher replies, applied after a reply parses and before it becomes a
//! record. Each rejects with its own [`RejectReason`] (and tag in `rejects.jsonl` and the run
//! summary), and each can be switched off:
//!
//! - **refusal**: refusals and apologies ("as an AI", "I cannot see", "I'm sorry, but"), which
//!   real teachers produce now and then and which would otherwise train the model to refuse;
//! - **context** (tag `leak`): replies that mention the symbolic input the paper's prompts tell the
//!   teacher never to mention (captions, bounding boxes, coordinates, `[0.31, 0.08, …]`);
//! - **length**: answers too short or too long for their type, counted in words of the
//!   assistant turns (the defaults bracket the paper's data: detailed descriptions and
//!   complex-reasoning answers are paragraphs, conversation answers sentences);
//! - **duplicates**: exact-duplicate questions within one conversation (case and spacing aside).
//!
//! The checks look at the parsed turns, so a chatty preamble the parser skips is not judged.

use std::collections::HashSet;

use crate::parse::{RejectReason, check_leaks};
use crate::types::InstructType;

/// Word-count bounds of a type's answers (all assistant turns together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LengthLimits {
    pub min_words: usize,
    pub max_words: usize,
}

/// Which filters run, and the length bounds per teacher type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filters {
    pub refusal: bool,
    pub context: bool,
    pub length: bool,
    pub duplicates: bool,
    pub conversation_words: LengthLimits,
    pub detail_words: LengthLimits,
    pub complex_words: LengthLimits,
}

impl Default for Filters {
    /// Every filter on.
    fn default() -> Self {
        Self {
            refusal: true,
            context: true,
            length: true,
            duplicates: true,
            conversation_words: LengthLimits {
                min_words: 10,
                max_words: 1000,
            },
            detail_words: LengthLimits {
                min_words: 30,
                max_words: 600,
            },
            complex_words: LengthLimits {
                min_words: 20,
                max_words: 600,
            },
        }
    }
}

impl Filters {
    /// Only the check the parser has always made (no mention of the symbolic input).
    pub fn context_only() -> Self {
        Self {
            refusal: false,
            length: false,
            duplicates: false,
            ..Self::default()
        }
    }

    /// The length bounds of a teacher type (`None` for `brief`, which has no teacher).
    pub fn limits(&self, ty: InstructType) -> Option<LengthLimits> {
        match ty {
            InstructType::Conversation => Some(self.conversation_words),
            InstructType::Detail => Some(self.detail_words),
            InstructType::Complex => Some(self.complex_words),
            InstructType::Brief => None,
        }
    }

    /// Runs the enabled filters over a parsed reply: its (question, answer) pairs, where a
    /// detailed description is one pair with an empty question.
    pub fn check(&self, ty: InstructType, pairs: &[(String, String)]) -> Result<(), RejectReason> {
        if self.refusal {
            for (q, a) in pairs {
                check_refusal(q)?;
                check_refusal(a)?;
            }
        }
        if self.context {
            for (q, a) in pairs {
                check_leaks(q)?;
                check_leaks(a)?;
            }
        }
        if self.length
            && let Some(lim) = self.limits(ty)
        {
            let words: usize = pairs
                .iter()
                .map(|(_, a)| a.split_whitespace().count())
                .sum();
            if words < lim.min_words {
                return Err(RejectReason::TooShort {
                    words,
                    min: lim.min_words,
                });
            }
            if words > lim.max_words {
                return Err(RejectReason::TooLong {
                    words,
                    max: lim.max_words,
                });
            }
        }
        if self.duplicates {
            check_duplicate_questions(pairs)?;
        }
        Ok(())
    }
}

/// Phrases of a refusal or apology, lower case with straight apostrophes.
const REFUSAL_PHRASES: &[&str] = &[
    "as an ai",
    "as a language model",
    "as a text-based",
    "i cannot see",
    "i can't see",
    "i am unable to see",
    "i'm unable to see",
    "i cannot view",
    "i can't view",
    "i am unable to view",
    "i'm unable to view",
    "i don't have the ability to see",
    "i do not have the ability to see",
    "i don't have access to the image",
    "i do not have access to the image",
    "i'm sorry, but",
    "i am sorry, but",
    "sorry, but i",
    "i apologize",
    "i'm not able to provide",
    "i cannot provide",
    "i can't provide",
    "i cannot assist",
    "i can't assist",
    "i cannot help with",
    "i can't help with",
];

/// Rejects text that refuses or apologises instead of answering.
pub fn check_refusal(text: &str) -> Result<(), RejectReason> {
    let lower = text.to_lowercase().replace(['\u{2019}', '\u{2018}'], "'");
    let lower = lower.split_whitespace().collect::<Vec<_>>().join(" ");
    match REFUSAL_PHRASES.iter().find(|p| lower.contains(*p)) {
        Some(p) => Err(RejectReason::Refusal(format!("\"{p}\""))),
        None => Ok(()),
    }
}

/// Rejects a conversation that asks the same question twice (case and spacing aside).
pub fn check_duplicate_questions(pairs: &[(String, String)]) -> Result<(), RejectReason> {
    let mut seen = HashSet::new();
    for (i, (q, _)) in pairs.iter().enumerate() {
        if q.trim().is_empty() {
            continue;
        }
        let norm = q
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        if !seen.insert(norm) {
            return Err(RejectReason::DuplicateQuestion(i + 1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_qa;
    use crate::prompts::PromptLibrary;

    fn detail(text: &str) -> Vec<(String, String)> {
        vec![(String::new(), text.to_string())]
    }

    const GOOD_DETAIL: &str = "The image shows a busy city street at dusk. A red double-decker bus \
        waits at a traffic light while several pedestrians cross in front of it, some carrying \
        shopping bags. Shop windows along the left side are lit, and a cyclist rides in the bike \
        lane next to the bus.";

    #[test]
    fn refusals_and_apologies_are_rejected() {
        let f = Filters::default();
        for reply in [
            "Sorry, as an AI I cannot see images.",
            "I\u{2019}m sorry, but I can\u{2019}t help with identifying people in this image.",
            "As an AI language model, I don't have the ability to see the picture, but based on \
             the description it is probably a kitchen with a woman preparing food for dinner.",
            "I apologize, but I am unable to view the image you provided. If you describe it I \
             will gladly write a detailed description of the scene for you.",
        ] {
            let r = f.check(InstructType::Detail, &detail(reply));
            assert!(matches!(r, Err(RejectReason::Refusal(_))), "{reply}: {r:?}");
            assert_eq!(r.unwrap_err().tag(), "refusal");
        }
        // in a conversation answer, too
        let pairs = parse_qa(
            "Question: What is the man holding?\nAnswer: I'm sorry, but I cannot see the image.",
        )
        .unwrap();
        assert!(matches!(
            f.check(InstructType::Conversation, &pairs),
            Err(RejectReason::Refusal(_))
        ));
        // "sorry" in an ordinary answer is fine
        assert!(check_refusal("The sign on the door reads \"Sorry, we're closed\".").is_ok());
        assert!(check_refusal(GOOD_DETAIL).is_ok());
        let off = Filters {
            refusal: false,
            length: false,
            ..Filters::default()
        };
        assert!(
            off.check(
                InstructType::Detail,
                &detail("Sorry, as an AI I cannot see images.")
            )
            .is_ok()
        );
    }

    #[test]
    fn mentions_of_the_symbolic_context_are_rejected() {
        let f = Filters::default();
        for reply in [
            "Question: Where is the dog?\nAnswer: According to the caption, the dog is lying on \
             the grass next to a red frisbee in a sunny park.",
            "Question: Where is the dog?\nAnswer: The dog is at [0.12, 0.40, 0.55, 0.91], lying \
             on the grass next to a red frisbee in the park.",
            "Question: How big is the bus?\nAnswer: Its bounding box covers most of the picture, \
             so the bus is very close to the camera and fills the frame.",
        ] {
            let pairs = parse_qa(reply).unwrap();
            let r = f.check(InstructType::Complex, &pairs);
            assert!(matches!(r, Err(RejectReason::Leak(_))), "{reply}: {r:?}");
        }
        let off = Filters {
            context: false,
            ..Filters::default()
        };
        let pairs = parse_qa(
            "Question: Where is the dog?\nAnswer: According to the caption, the dog is lying on \
             the grass next to a red frisbee in a sunny park.",
        )
        .unwrap();
        assert!(off.check(InstructType::Complex, &pairs).is_ok());
    }

    #[test]
    fn lengths_are_bounded_per_type() {
        let f = Filters::default();
        let r = f.check(
            InstructType::Detail,
            &detail("A dog on a sofa in a living room."),
        );
        assert_eq!(r, Err(RejectReason::TooShort { words: 9, min: 30 }));
        assert_eq!(r.unwrap_err().tag(), "too_short");
        assert!(f.check(InstructType::Detail, &detail(GOOD_DETAIL)).is_ok());
        let rambling = GOOD_DETAIL.repeat(20);
        let words = rambling.split_whitespace().count();
        assert_eq!(
            f.check(InstructType::Detail, &detail(&rambling)),
            Err(RejectReason::TooLong { words, max: 600 })
        );
        // a conversation of short answers is fine as a whole
        let pairs = parse_qa(
            "Question: What animal is this?\nAnswer: It is a brown dog.\nQuestion: Where is it?\n\
             Answer: It is lying on a sofa in a living room.",
        )
        .unwrap();
        assert!(f.check(InstructType::Conversation, &pairs).is_ok());
        let pairs = parse_qa("Question: Why?\nAnswer: Because it is raining.").unwrap();
        assert!(matches!(
            f.check(InstructType::Complex, &pairs),
            Err(RejectReason::TooShort { .. })
        ));
        let off = Filters {
            length: false,
            ..Filters::default()
        };
        assert!(off.check(InstructType::Complex, &pairs).is_ok());
    }

    #[test]
    fn repeated_questions_within_a_conversation_are_rejected() {
        let f = Filters::default();
        let pairs = parse_qa(
            "Question: What color is the bus?\nAnswer: The bus is red with white stripes.\n\
             Question: How many people are waiting?\nAnswer: About five people stand at the stop.\n\
             Question: what  color is the bus?\nAnswer: It is red.",
        )
        .unwrap();
        let r = f.check(InstructType::Conversation, &pairs);
        assert_eq!(r, Err(RejectReason::DuplicateQuestion(3)));
        assert_eq!(r.unwrap_err().tag(), "duplicate_question");
        let off = Filters {
            duplicates: false,
            ..Filters::default()
        };
        assert!(off.check(InstructType::Conversation, &pairs).is_ok());
    }

    #[test]
    fn the_builtin_few_shot_replies_pass_every_filter() {
        let lib = PromptLibrary::builtin().unwrap();
        let f = Filters::default();
        for ty in InstructType::TEACHER {
            for ex in &lib.set(ty).unwrap().examples {
                let pairs = match ty {
                    InstructType::Detail => detail(ex.reply.trim()),
                    _ => parse_qa(&ex.reply).unwrap(),
                };
                assert_eq!(f.check(ty, &pairs), Ok(()), "{ty}: {}", ex.reply);
            }
        }
    }
}
