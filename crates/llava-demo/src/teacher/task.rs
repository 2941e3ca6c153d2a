//! Which reply a request wants, told from its text as a chat model would tell it.
//!
//! The cues are the gist of each instruction, not its exact wording, so that a user's own
//! prompt files (`llava instruct --prompts DIR`) still get the right kind of reply:
//!
//! - **judge**: the user message sets two assistants' answers side by side (`Assistant 1`,
//!   `Assistant 2`), or the system message asks to review, judge or score answers;
//! - **conversation**: the system message asks for a conversation or a dialogue;
//! - **complex**: it asks for one question needing reasoning;
//! - **detail**: it asks for a description;
//! - **other**: anything else (including no system message at all).
//!
//! The checks run in that order: the built-in conversation prompt speaks of "descriptions
//! written by others", so "conversation" must win over "description".

/// The kind of reply asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    Conversation,
    Detail,
    Complex,
    Judge,
    Other,
}

/// Tells the task from the system message(s) and the last user message.
pub fn detect(system: &str, user: &str) -> Task {
    let s = system.to_lowercase();
    let u = user.to_lowercase();
    let two_answers = u.contains("assistant 1") && u.contains("assistant 2");
    let review = [
        "review answers",
        "judge",
        "score each",
        "evaluate the answers",
    ]
    .iter()
    .any(|c| s.contains(c));
    if two_answers || review {
        Task::Judge
    } else if s.contains("conversation") || s.contains("dialogue") || s.contains("multi-turn") {
        Task::Conversation
    } else if s.contains("one question") || s.contains("reason") {
        Task::Complex
    } else if s.contains("descri") {
        Task::Detail
    } else {
        Task::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cues() {
        assert_eq!(
            detect(
                "Write a conversation. Never use descriptions written by others.",
                ""
            ),
            Task::Conversation
        );
        assert_eq!(
            detect("Write one question and answer it.", ""),
            Task::Complex
        );
        assert_eq!(detect("Write a rich description.", ""), Task::Detail);
        assert_eq!(
            detect(
                "",
                "--- Assistant 1's answer ---\nx\n--- Assistant 2's answer ---\ny"
            ),
            Task::Judge
        );
        assert_eq!(detect("You are a helpful assistant.", "hi"), Task::Other);
        assert_eq!(detect("", ""), Task::Other);
    }
}
