//! The rule-based judge for `llava eval judge` prompts.
//!
//! It reads the image description, Assistant 1's and Assistant 2's answers out of the judge
//! prompt, rebuilds the scene from the description ([`Knowledge`]), and checks each answer's
//! checkable statements ([`claims`]) against it. The rule:
//!
//! - an answer with checkable statements scores `1 + 9 × (true statements / checked
//!   statements)`, rounded to a whole number: 10 when all hold, 1 when none do;
//! - an answer with none scores 5: it may be fine, but nothing in it can be verified.
//!
//! It judges accuracy only, not helpfulness, detail or style, and says so in its explanation.
//! The two scores go alone on the first line, Assistant 1's first, as the prompt asks.

use super::claims::{self, Claim};
use super::knowledge::Knowledge;

/// The score of an answer with no checkable statements.
pub const UNCHECKABLE_SCORE: u32 = 5;

/// The parts of a judge prompt the judge needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    pub context: String,
    pub answer1: String,
    pub answer2: String,
}

/// The text between `start` and `end` (or the end of the text).
fn between<'a>(text: &'a str, start: &str, end: &[&str]) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let rest = &text[from..];
    let to = end
        .iter()
        .filter_map(|e| rest.find(e))
        .min()
        .unwrap_or(rest.len());
    Some(rest[..to].trim())
}

/// Finds the description and both answers in the prompt; `None` when the answers are not
/// marked as `llava eval judge` marks them.
pub fn read_case(user: &str) -> Option<Case> {
    let answer1 = between(
        user,
        "Assistant 1's answer ---",
        &[
            "--- end of Assistant 1's answer",
            "--- Assistant 2's answer",
        ],
    )?;
    let answer2 = between(
        user,
        "Assistant 2's answer ---",
        &["--- end of Assistant 2's answer"],
    )?;
    let before_answers = &user[..user.find("--- Assistant 1").unwrap_or(user.len())];
    let context = between(before_answers, "Image description:", &["\nQuestion:"])
        .unwrap_or(before_answers)
        .to_string();
    Some(Case {
        context,
        answer1: answer1.to_string(),
        answer2: answer2.to_string(),
    })
}

/// How an answer fared.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub checked: usize,
    pub correct: usize,
    /// The statements that do not hold.
    pub wrong: Vec<Claim>,
    pub score: u32,
}

/// Checks one answer against the scene.
pub fn assess(answer: &str, k: &Knowledge) -> Verdict {
    let mut checked = 0;
    let mut correct = 0;
    let mut wrong = Vec::new();
    for c in claims::extract(answer) {
        match c.check(k) {
            Some(true) => {
                checked += 1;
                correct += 1;
            }
            Some(false) => {
                checked += 1;
                wrong.push(c);
            }
            None => {}
        }
    }
    let score = if checked == 0 {
        UNCHECKABLE_SCORE
    } else {
        (1.0 + 9.0 * correct as f64 / checked as f64).round() as u32
    };
    Verdict {
        checked,
        correct,
        wrong,
        score,
    }
}

fn explain(who: &str, v: &Verdict) -> String {
    if v.checked == 0 {
        return format!(
            "{who} makes no statement about the objects, their number or their order that can \
             be checked against the description, so it gets a middling score."
        );
    }
    let mut s = format!(
        "{who}: {} of {} checkable statements agree with the description.",
        v.correct, v.checked
    );
    if !v.wrong.is_empty() {
        let shown: Vec<String> = v.wrong.iter().take(3).map(Claim::describe).collect();
        s.push_str(&format!(" It wrongly says that {}.", shown.join("; that ")));
    }
    s
}

/// The judge's reply: both scores on the first line, then the reasons.
pub fn reply(user: &str) -> String {
    let Some(case) = read_case(user) else {
        return format!(
            "{UNCHECKABLE_SCORE} {UNCHECKABLE_SCORE}\nThe two answers could not be told apart \
             in the request, so both get a middling score."
        );
    };
    let k = Knowledge::from_context(&case.context);
    let v1 = assess(&case.answer1, &k);
    let v2 = assess(&case.answer2, &k);
    format!(
        "{} {}\n{} {} Only accuracy is judged: which objects are present, how many there are \
         and how they are ordered.",
        v1.score,
        v2.score,
        explain("Assistant 1", &v1),
        explain("Assistant 2", &v2)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(a1: &str, a2: &str) -> String {
        format!(
            "Image description:\nFrom left to right: a red circle and a blue square.\n\
             square: [0.6, 0.1, 0.8, 0.3]\ncircle: [0.1, 0.1, 0.3, 0.3]\n\n\
             Question:\nWhat is there?\n\n\
             --- Assistant 1's answer ---\n{a1}\n--- end of Assistant 1's answer ---\n\n\
             --- Assistant 2's answer ---\n{a2}\n--- end of Assistant 2's answer ---\n\nScore them."
        )
    }

    #[test]
    fn reads_the_case() {
        let c = read_case(&prompt("A one.", "A two.")).unwrap();
        assert_eq!(c.answer1, "A one.");
        assert_eq!(c.answer2, "A two.");
        assert!(c.context.starts_with("From left to right"));
        assert!(c.context.ends_with("0.3]"), "{}", c.context);
        assert_eq!(read_case("no markers here"), None);
    }

    #[test]
    fn scores_follow_the_rule() {
        let r = reply(&prompt(
            "There are two shapes: a red circle and a blue square.",
            "There are three shapes, and the red circle is to the right of the blue square.",
        ));
        let first = r.lines().next().unwrap();
        // all 3 hold -> 10; 2 of 4 hold (the objects, not the count or the order) -> 1 + 4.5 -> 6
        assert_eq!(first, "10 6", "{r}");
        assert!(
            r.contains("wrongly says that there are three shapes"),
            "{r}"
        );
        let r = reply(&prompt("It looks nice.", "There is a green star."));
        assert_eq!(r.lines().next().unwrap(), "5 1", "{r}");
        assert!(reply("garbage").starts_with("5 5\n"));
    }
}
