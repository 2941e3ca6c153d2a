//! Small pieces of English shared by the world's captions and the teacher's readers and
//! writers: splitting text into sentences and words, number words, articles and lists.
//!
//! Reading and writing use the same vocabulary on purpose: what the captions and the teacher
//! write, the teacher's knowledge and judge can read back.

/// Number words that are read and written; beyond ten, digits.
pub const NUMBER_WORDS: [&str; 11] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
];

/// `three`, or `11` past ten.
pub fn number_word(n: usize) -> String {
    NUMBER_WORDS
        .get(n)
        .map_or_else(|| n.to_string(), |w| (*w).to_string())
}

/// The number a word stands for: a number word or plain digits.
pub fn parse_number(word: &str) -> Option<usize> {
    if let Some(n) = NUMBER_WORDS.iter().position(|w| *w == word) {
        return Some(n);
    }
    if word.is_empty() || word.len() > 3 || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

/// `a, b and c`.
pub fn join_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `a` or `an` for the word that follows.
pub fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// `an orange star`.
pub fn with_article(words: &str) -> String {
    format!("{} {words}", article(words))
}

/// `shape` or `shapes`.
pub fn plural_if(word: &str, n: usize) -> String {
    if n == 1 {
        word.to_string()
    } else {
        format!("{word}s")
    }
}

/// Upper-cases the first letter.
pub fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Splits text into sentences (and lines), so that a claim never spans two of them.
pub fn sentences(text: &str) -> Vec<&str> {
    text.split(['.', '!', '?', ';', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// The lower-case words of a sentence, with punctuation dropped; `isn't` stays one word.
pub fn words(sentence: &str) -> Vec<String> {
    sentence
        .split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '’'))
        .filter(|w| !w.is_empty())
        .map(|w| w.replace('’', "'").to_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_articles() {
        assert_eq!(number_word(3), "three");
        assert_eq!(number_word(12), "12");
        assert_eq!(parse_number("five"), Some(5));
        assert_eq!(parse_number("7"), Some(7));
        assert_eq!(parse_number("seventy"), None);
        assert_eq!(parse_number("1234"), None);
        assert_eq!(with_article("orange star"), "an orange star");
        assert_eq!(with_article("large star"), "a large star");
        assert_eq!(plural_if("shape", 1), "shape");
        assert_eq!(plural_if("shape", 2), "shapes");
    }

    #[test]
    fn sentences_and_words() {
        assert_eq!(sentences("One. Two!\nThree? "), vec!["One", "Two", "Three"]);
        assert_eq!(
            words("No, there isn't a Red circle: none."),
            vec!["no", "there", "isn't", "a", "red", "circle", "none"]
        );
    }
}
