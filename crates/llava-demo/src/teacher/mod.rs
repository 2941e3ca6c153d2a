//! The offline teacher: a rule-based stand-in for GPT, so that the whole LLaVA pipeline runs
//! without a network on the shapes world.
//!
//! It answers OpenAI-style chat requests exactly where `llava instruct` and `llava eval judge`
//! would call GPT, and like GPT it knows only the text it is sent:
//!
//! - [`task`] tells from the system message which reply is wanted;
//! - [`knowledge`] rebuilds the scene from the captions and box lines of the last user message;
//! - [`conversation`], [`detail`] and [`complex`] write the three kinds of instruction data in
//!   the form `llava_instruct::parse` reads;
//! - [`claims`] and [`judge`] score two answers for `llava eval judge`;
//! - [`server`] serves it all over HTTP (`llava teacher serve`, or in-process for `llava demo`).
//!
//! Replies are seeded from a hash of the user message, so the same request always gets the
//! same reply, and different images get varied wording.

pub mod claims;
pub mod complex;
pub mod conversation;
pub mod detail;
pub mod judge;
pub mod knowledge;
pub mod server;
pub mod task;

use rand::SeedableRng;
use rand::rngs::StdRng;

pub use knowledge::Knowledge;
pub use server::{ServerConfig, TeacherServer};
pub use task::Task;

/// 64-bit FNV-1a: a hash that is the same on every platform and run.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The seed of a reply: the user message and the task, so that the detail and complex
/// replies for one image do not share their random choices.
fn seed(task: Task, user: &str) -> u64 {
    fnv1a(format!("{task:?}\0{user}").as_bytes())
}

/// The reply to a request with these system and last user messages.
pub fn respond(system: &str, user: &str) -> String {
    let task = task::detect(system, user);
    let mut rng = StdRng::seed_from_u64(seed(task, user));
    match task {
        Task::Judge => judge::reply(user),
        Task::Conversation => conversation::reply(&Knowledge::from_context(user), &mut rng),
        Task::Detail => detail::reply(&Knowledge::from_context(user), &mut rng),
        Task::Complex => complex::reply(&Knowledge::from_context(user), &mut rng),
        Task::Other => {
            let k = Knowledge::from_context(user);
            if k.objects.is_empty() {
                "I am an offline teacher for the shapes world: I can describe pictures of \
                 coloured shapes, ask and answer questions about them, and compare two answers. \
                 Send me a picture's descriptions to work with."
                    .into()
            } else {
                detail::reply(&k, &mut rng)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_request_same_reply_and_never_empty() {
        let user = "From left to right: a red circle, a blue square and a green star.";
        for system in [
            "Write a conversation.",
            "Write a description.",
            "Write one question needing reasoning.",
            "Be helpful.",
            "",
        ] {
            let a = respond(system, user);
            assert_eq!(a, respond(system, user));
            assert!(!a.trim().is_empty(), "{system}");
        }
        assert_ne!(
            respond("Write a description.", user),
            respond("Write one question needing reasoning.", user)
        );
        for junk in [
            "",
            "\u{0}",
            "[[[",
            ": [1, 2, 3, 4]",
            "red red circle circle",
        ] {
            for system in ["Write a conversation.", "describe", "one question", ""] {
                assert!(!respond(system, junk).trim().is_empty());
            }
        }
    }
}
