//! Reading the two scores out of a judge's reply.
//!
//! The judge is asked for "s1 s2" on the first line, but real models drift: they add
//! commas, "Scores: 8 and 7", "8/10", or label each score on its own line, sometimes in the
//! other order. Each shape from which the two numbers can be recovered without guessing is
//! accepted; anything else is `None`, so the caller can ask again.

/// A number found in the text, with where it starts and whether it reads as a label
/// ("Assistant 1") or a denominator ("/10") rather than a score.
struct Num {
    value: f64,
    start: usize,
    end: usize,
}

/// Every plain decimal number in `s` (`7`, `7.5`), left to right.
fn numbers(s: &str) -> Vec<Num> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i + 1 < b.len() && b[i] == b'.' && b[i + 1].is_ascii_digit() {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            if let Ok(value) = s[start..i].parse::<f64>() {
                out.push(Num {
                    value,
                    start,
                    end: i,
                });
            }
        } else {
            i += 1;
        }
    }
    out
}

fn is_score(v: f64) -> bool {
    v.is_finite() && (0.0..=10.0).contains(&v)
}

/// Numbers of one line that read as scores: not an "Assistant N" label, not a "/10"
/// denominator, not part of a word such as "GPT4".
fn score_numbers(line: &str) -> Vec<f64> {
    let lower = line.to_ascii_lowercase();
    numbers(line)
        .into_iter()
        .filter(|n| {
            let before = lower[..n.start].trim_end();
            let label = before.ends_with("assistant") || before.ends_with('#');
            let denominator = lower[..n.start].ends_with('/');
            let glued = lower[..n.start]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphabetic())
                || lower[n.end..]
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic());
            !(label || denominator || glued)
        })
        .map(|n| n.value)
        .collect()
}

/// The score right after "assistant N" on a line: only a few non-digit characters may
/// separate them ("Assistant 1: 8", "Assistant 1 receives a score of 8"), and no clause
/// break, so prose such as "Assistant 1 missed 3 objects" is not read as a score.
fn labelled(line: &str, which: char) -> Option<f64> {
    let lower = line.to_ascii_lowercase();
    let pat = format!("assistant {which}");
    let mut from = 0;
    while let Some(pos) = lower[from..].find(&pat) {
        let after = from + pos + pat.len();
        from = after;
        let rest = &lower[after..];
        // "Assistant 10" is not "Assistant 1".
        if rest.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            continue;
        }
        let gap: String = rest.chars().take_while(|c| !c.is_ascii_digit()).collect();
        let within = gap.len() <= 24 && !gap.contains(['.', ',', ';', '\n']);
        if !within || gap.len() == rest.len() {
            continue;
        }
        let n = numbers(&line[after + gap.len()..]);
        if let Some(first) = n.first()
            && is_score(first.value)
        {
            return Some(first.value);
        }
    }
    None
}

/// The pair `[reference, model]` (Assistant 1, Assistant 2) from a judge reply, or `None`
/// when it cannot be recovered unambiguously.
pub fn parse_scores(reply: &str) -> Option<[f64; 2]> {
    let first = reply.lines().map(str::trim).find(|l| !l.is_empty())?;
    // 1. The requested shape: exactly two scores on the first line ("8 7", "8, 7",
    //    "Scores: 8 and 7", "Assistant 1: 8, Assistant 2: 7", "8/10 7/10").
    let on_first = score_numbers(first);
    if on_first.len() == 2 && on_first.iter().all(|v| is_score(*v)) {
        // A first line that names the assistants in reverse order is read by label.
        if let (Some(a), Some(b)) = (labelled(first, '1'), labelled(first, '2')) {
            return Some([a, b]);
        }
        return Some([on_first[0], on_first[1]]);
    }
    // 2. One labelled score per assistant anywhere, in either order.
    let one = reply.lines().find_map(|l| labelled(l, '1'));
    let two = reply.lines().find_map(|l| labelled(l, '2'));
    if let (Some(a), Some(b)) = (one, two) {
        return Some([a, b]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_shapes() {
        assert_eq!(parse_scores("8 7"), Some([8.0, 7.0]));
        assert_eq!(
            parse_scores("8, 7\nAssistant 1 was better."),
            Some([8.0, 7.0])
        );
        assert_eq!(parse_scores("Scores: 8 and 7"), Some([8.0, 7.0]));
        assert_eq!(parse_scores("\n\n  9 6.5  \nbecause"), Some([9.0, 6.5]));
        assert_eq!(parse_scores("7.5 8"), Some([7.5, 8.0]));
        assert_eq!(parse_scores("8/10 7/10"), Some([8.0, 7.0]));
        assert_eq!(
            parse_scores("Assistant 1: 8, Assistant 2: 7"),
            Some([8.0, 7.0])
        );
        assert_eq!(
            parse_scores("Assistant 2: 4, Assistant 1: 9"),
            Some([9.0, 4.0])
        );
    }

    #[test]
    fn prose_after_the_scores_is_ignored() {
        let r = "8 6\nAssistant 1 listed 3 objects correctly, while Assistant 2 missed 2 of them.";
        assert_eq!(parse_scores(r), Some([8.0, 6.0]));
    }

    #[test]
    fn labelled_lines_in_either_order() {
        assert_eq!(
            parse_scores("Assistant 1: 8\nAssistant 2: 7"),
            Some([8.0, 7.0])
        );
        assert_eq!(
            parse_scores("Here is my review.\nAssistant 2: 5\nAssistant 1: 9\nDone."),
            Some([9.0, 5.0])
        );
        assert_eq!(
            parse_scores(
                "My ratings follow.\nAssistant 1 receives a score of 8.\nAssistant 2 receives a score of 7.5."
            ),
            Some([8.0, 7.5])
        );
    }

    #[test]
    fn garbage_is_none() {
        assert_eq!(parse_scores(""), None);
        assert_eq!(parse_scores("   \n "), None);
        assert_eq!(parse_scores("I cannot rate these answers."), None);
        assert_eq!(parse_scores("8"), None);
        assert_eq!(parse_scores("8 7 6"), None);
        assert_eq!(parse_scores("80 70"), None);
        assert_eq!(parse_scores("GPT4 says 7"), None);
        // Prose counts are not scores.
        assert_eq!(
            parse_scores(
                "Both are fine.\nAssistant 1 gave a long answer, Assistant 2 missed 3 objects."
            ),
            None
        );
    }
}
