//! Short-answer VQA prompting (LLaVA-1.5's VQAv2/GQA style) and exact-match scoring after
//! normalisation, so that "Two." and "2" or "the dog" and "dog" count as the same answer.

/// The instruction LLaVA-1.5 appends to short-answer questions.
pub const VQA_SUFFIX: &str = "Answer the question using a single word or phrase.";

/// The question with the short-answer instruction on its own line.
pub fn vqa_prompt(question: &str) -> String {
    format!("{}\n{VQA_SUFFIX}", question.trim())
}

const NUMBERS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// Lower case, punctuation to spaces (a decimal point between digits is kept), articles
/// dropped, number words as digits, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.trim().to_lowercase();
    let chars: Vec<char> = lower.chars().collect();
    let mut cleaned = String::with_capacity(lower.len());
    for (i, &c) in chars.iter().enumerate() {
        let decimal_point = c == '.'
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c.is_alphanumeric() || c.is_whitespace() || decimal_point {
            cleaned.push(c);
        } else if c == '\'' {
            // "dog's" → "dogs", as the VQA evaluation does
        } else {
            cleaned.push(' ');
        }
    }
    cleaned
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(|w| match NUMBERS.iter().position(|n| *n == w) {
            Some(d) => d.to_string(),
            None => w.to_string(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether the prediction equals any reference answer after [`normalize_answer`].
pub fn exact_match(prediction: &str, references: &[String]) -> bool {
    let p = normalize_answer(prediction);
    !p.is_empty() && references.iter().any(|r| normalize_answer(r) == p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_has_the_suffix_line() {
        assert_eq!(
            vqa_prompt(" What colour is the bus? "),
            "What colour is the bus?\nAnswer the question using a single word or phrase."
        );
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize_answer("Two."), "2");
        assert_eq!(normalize_answer("  The Red  Bus! "), "red bus");
        assert_eq!(normalize_answer("3.5"), "3.5");
        assert_eq!(normalize_answer("dog's"), "dogs");
        assert_eq!(normalize_answer("yes, it is"), "yes it is");
        assert_eq!(normalize_answer("..."), "");
    }

    #[test]
    fn matching() {
        let refs = vec!["2".to_string(), "two dogs".to_string()];
        assert!(exact_match("Two", &refs));
        assert!(exact_match("two dogs.", &refs));
        assert!(!exact_match("three", &refs));
        assert!(!exact_match("", &["".to_string()]));
        assert!(exact_match("A cat", &["cat".to_string()]));
    }
}
