//! Statistics of a generated set (`llava instruct stats`), to compare it with
//! LLaVA-Instruct-158K: counts per type, turns per conversation, question and answer lengths
//! in words, and the most frequent root verb–noun pairs of the questions.
//!
//! A LLaVA JSON file does not say which type a record is; it is inferred: one exchange whose
//! question is one of the detail (brief) instructions is `detail` (`brief`); any other single
//! exchange is `complex`; several exchanges are a `conversation`. (A one-turn conversation
//! therefore counts as complex.)
//!
//! **Verb–noun pairs** come from a heuristic, not a parser. Each question (its first line,
//! `<image>` removed) is split into lower-case words. An imperative ("Describe the scene")
//! takes its first word as the verb and the next content word as the noun. A question opening
//! with a wh-word or an auxiliary ("What is the man holding?") skips those; its verb is the
//! first later word ending in `-ing`/`-ed` or in a short list of common verbs, else the
//! first auxiliary of the question (`is`/`are`/`was`/`were` become `be`, `does`/`did` become `do`); its noun is the
//! first content word after that verb, else the subject (the first content word).

use std::collections::{BTreeMap, HashMap, HashSet};

use llava_data::record::{IMAGE_PLACEHOLDER, LlavaRecord};
use serde::Serialize;

use crate::prompts::PromptLibrary;
use crate::types::InstructType;

/// A distribution of word counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Dist {
    pub count: usize,
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub median: f64,
    pub p90: usize,
    /// Counts per bucket of `bucket_width` words: `histogram[i]` counts values in
    /// `[i * width, (i + 1) * width)`.
    pub bucket_width: usize,
    pub histogram: Vec<usize>,
}

impl Dist {
    pub fn of(mut v: Vec<usize>, bucket_width: usize) -> Self {
        if v.is_empty() {
            return Dist {
                bucket_width,
                ..Default::default()
            };
        }
        v.sort_unstable();
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2] as f64
        } else {
            (v[n / 2 - 1] + v[n / 2]) as f64 / 2.0
        };
        // nearest-rank 90th percentile
        let p90 = v[(9 * n).div_ceil(10).max(1) - 1];
        let width = bucket_width.max(1);
        let mut histogram = vec![0; v[n - 1] / width + 1];
        for &x in &v {
            histogram[x / width] += 1;
        }
        Dist {
            count: n,
            min: v[0],
            max: v[n - 1],
            mean: v.iter().sum::<usize>() as f64 / n as f64,
            median,
            p90,
            bucket_width: width,
            histogram,
        }
    }
}

/// One root verb–noun pair and how many questions have it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerbNoun {
    pub verb: String,
    pub noun: String,
    pub count: usize,
}

/// The statistics of a set.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    pub records: usize,
    pub per_type: BTreeMap<InstructType, usize>,
    /// Question/answer exchanges per record → number of records.
    pub turns: BTreeMap<usize, usize>,
    pub question_words: Dist,
    pub answer_words: Dist,
    pub answer_words_per_type: BTreeMap<InstructType, Dist>,
    pub top_verb_noun: Vec<VerbNoun>,
}

/// The type a record most likely is (see the module docs).
pub fn infer_type(pairs: &[(String, String)], lib: &PromptLibrary) -> InstructType {
    match pairs {
        [(q, _)] if lib.detail_instructions.iter().any(|i| i == q) => InstructType::Detail,
        [(q, _)] if lib.brief_instructions.iter().any(|i| i == q) => InstructType::Brief,
        [_] => InstructType::Complex,
        _ => InstructType::Conversation,
    }
}

/// The (question, answer) exchanges of a record, `<image>` removed from the questions.
pub fn exchanges(r: &LlavaRecord) -> Vec<(String, String)> {
    r.conversations
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| {
            let q = c[0].value.replace(IMAGE_PLACEHOLDER, "");
            (q.trim().to_string(), c[1].value.trim().to_string())
        })
        .collect()
}

fn words(s: &str) -> usize {
    s.split_whitespace().count()
}

const WH: &[&str] = &[
    "what", "which", "who", "whom", "whose", "where", "when", "why", "how",
];
const AUX: &[&str] = &[
    "is", "are", "was", "were", "be", "am", "do", "does", "did", "can", "could", "will", "would",
    "should", "shall", "may", "might", "must", "has", "have", "had",
];
const STOP: &[&str] = &[
    "a", "an", "the", "this", "that", "these", "those", "there", "it", "its", "they", "them",
    "their", "he", "she", "his", "her", "him", "you", "your", "i", "we", "our", "me", "my", "of",
    "in", "on", "at", "to", "for", "with", "by", "from", "about", "into", "over", "under", "near",
    "as", "and", "or", "any", "some", "all", "each", "other", "another", "one", "two", "several",
    "many", "much", "more", "most", "very", "not", "s", "kind", "type", "sort",
];
const VERBS: &[&str] = &[
    "see", "do", "make", "hold", "wear", "use", "look", "happen", "say", "tell", "show",
    "describe", "explain", "suggest", "indicate", "need", "consider", "think", "play", "sit",
    "stand", "eat", "ride", "take", "go", "get", "help", "keep", "seem", "appear", "mean",
];

/// The root verb and noun of a question, by the heuristic of the module docs.
pub fn verb_noun(question: &str) -> Option<(String, String)> {
    let first = question.lines().find(|l| !l.trim().is_empty())?;
    let toks: Vec<String> = first
        .split(|c: char| !c.is_alphabetic())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect();
    let is = |set: &[&str], w: &str| set.contains(&w);
    let content = |w: &str| !is(STOP, w) && !is(WH, w) && !is(AUX, w);
    let head = toks.first()?;
    if !is(WH, head) && !is(AUX, head) {
        let noun = toks[1..].iter().find(|w| content(w))?;
        return Some((head.clone(), noun.clone()));
    }
    let mut i = 0;
    while i < toks.len() && (is(WH, &toks[i]) || is(AUX, &toks[i])) {
        i += 1;
    }
    let aux = toks.iter().find(|w| is(AUX, w)).map(String::as_str);
    let rest: Vec<&String> = toks[i..].iter().filter(|w| content(w)).collect();
    let subject = rest.first()?;
    let verb_at = rest
        .iter()
        .skip(1)
        .position(|w| (w.len() > 4 && (w.ends_with("ing") || w.ends_with("ed"))) || is(VERBS, w));
    match verb_at {
        Some(k) => {
            let verb = rest[k + 1];
            let noun = rest.get(k + 2).copied().unwrap_or(subject);
            Some((verb.clone(), noun.clone()))
        }
        None => {
            let verb = match aux? {
                "is" | "are" | "was" | "were" | "am" => "be",
                "does" | "did" => "do",
                other => other,
            };
            Some((verb.to_string(), (*subject).clone()))
        }
    }
}

/// Computes the statistics of `records`, keeping the `top` most frequent verb–noun pairs.
pub fn compute(records: &[LlavaRecord], lib: &PromptLibrary, top: usize) -> Stats {
    let mut s = Stats {
        records: records.len(),
        ..Default::default()
    };
    let mut qw = Vec::new();
    let mut aw = Vec::new();
    let mut aw_type: BTreeMap<InstructType, Vec<usize>> = BTreeMap::new();
    let mut pairs: HashMap<(String, String), usize> = HashMap::new();
    let instructions: HashSet<&String> = lib
        .detail_instructions
        .iter()
        .chain(&lib.brief_instructions)
        .collect();
    for r in records {
        let ex = exchanges(r);
        let ty = infer_type(&ex, lib);
        *s.per_type.entry(ty).or_default() += 1;
        *s.turns.entry(ex.len()).or_default() += 1;
        for (q, a) in &ex {
            qw.push(words(q));
            aw.push(words(a));
            aw_type.entry(ty).or_default().push(words(a));
            // The fixed instructions are ours, not the teacher's questions.
            if !instructions.contains(q)
                && let Some(vn) = verb_noun(q)
            {
                *pairs.entry(vn).or_default() += 1;
            }
        }
    }
    s.question_words = Dist::of(qw, 5);
    s.answer_words = Dist::of(aw, 20);
    s.answer_words_per_type = aw_type
        .into_iter()
        .map(|(t, v)| (t, Dist::of(v, 20)))
        .collect();
    let mut ranked: Vec<((String, String), usize)> = pairs.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    s.top_verb_noun = ranked
        .into_iter()
        .take(top)
        .map(|((verb, noun), count)| VerbNoun { verb, noun, count })
        .collect();
    s
}

/// A human-readable rendering.
pub fn format_stats(s: &Stats) -> String {
    let mut out = format!("{} records\n", s.records);
    let per: Vec<String> = s.per_type.iter().map(|(t, n)| format!("{t} {n}")).collect();
    out.push_str(&format!("per type (inferred): {}\n", per.join(", ")));
    let turns: Vec<String> = s.turns.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    out.push_str(&format!("exchanges per record: {}\n", turns.join(", ")));
    let dist = |name: &str, d: &Dist| {
        format!(
            "{name}: n {}  min {}  median {}  mean {:.1}  p90 {}  max {}\n",
            d.count, d.min, d.median, d.mean, d.p90, d.max
        )
    };
    out.push_str(&dist("question words", &s.question_words));
    out.push_str(&dist("answer words", &s.answer_words));
    for (t, d) in &s.answer_words_per_type {
        out.push_str(&dist(&format!("  {t} answer words"), d));
    }
    out.push_str("most frequent root verb-noun pairs of the questions:\n");
    for vn in &s.top_verb_noun {
        out.push_str(&format!("  {:>6}  {} {}\n", vn.count, vn.verb, vn.noun));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_data::record::Turn;

    fn rec(turns: &[(&str, &str)]) -> LlavaRecord {
        let mut conversations = Vec::new();
        for (q, a) in turns {
            conversations.push(Turn::human(*q));
            conversations.push(Turn::gpt(*a));
        }
        LlavaRecord {
            id: serde_json::json!("x"),
            image: Some("x.jpg".into()),
            conversations,
        }
    }

    #[test]
    fn verb_noun_heuristic() {
        let vn = |q: &str| verb_noun(q).map(|(v, n)| format!("{v} {n}"));
        assert_eq!(
            vn("Describe the image in detail."),
            Some("describe image".into())
        );
        assert_eq!(vn("What is the man holding?"), Some("holding man".into()));
        assert_eq!(vn("What color is the bus?"), Some("be color".into()));
        assert_eq!(
            vn("Why might the dog be wearing a coat?"),
            Some("wearing coat".into())
        );
        assert_eq!(vn("How many people are there?"), Some("be people".into()));
        assert_eq!(vn("Is it raining?"), Some("be raining".into()));
        assert_eq!(vn("Is it?"), None, "no content word at all");
    }

    /// Figures worked out by hand for a four-record file.
    #[test]
    fn hand_computed_figures() {
        let lib = PromptLibrary::builtin().unwrap();
        let detail_q = lib.detail_instructions[0].clone();
        let records = vec![
            rec(&[
                (
                    "<image>\nWhat is the man holding?",
                    "He holds a red umbrella.",
                ),
                ("What color is the bus?", "It is yellow."),
            ]),
            rec(&[
                (
                    "What color is the bus?\n<image>",
                    "The bus is blue and white.",
                ),
                ("Where is the dog?", "On the sofa."),
                ("What is the man holding?", "A cup."),
            ]),
            rec(&[(
                &format!("<image>\n{detail_q}"),
                "A kitchen with a stove, a sink and two windows over the counter.",
            )]),
            rec(&[(
                "Why might the dog be wearing a coat?",
                "Because it is cold outside and the owner wants to keep it warm.",
            )]),
        ];
        let s = compute(&records, &lib, 3);
        assert_eq!(s.records, 4);
        assert_eq!(s.per_type.get(&InstructType::Conversation), Some(&2));
        assert_eq!(s.per_type.get(&InstructType::Detail), Some(&1));
        assert_eq!(s.per_type.get(&InstructType::Complex), Some(&1));
        assert_eq!(s.turns, BTreeMap::from([(1, 2), (2, 1), (3, 1)]));
        // answers: 5, 3, 6, 3, 2, 13, 13 words
        let a = &s.answer_words;
        assert_eq!(
            (a.count, a.min, a.max, a.median, a.p90),
            (7, 2, 13, 5.0, 13)
        );
        assert!((a.mean - 45.0 / 7.0).abs() < 1e-12);
        assert_eq!(a.histogram, vec![7]);
        // questions (detail instruction included): 5, 5, 5, 4, 5, w(detail), 8
        let d = words(&detail_q);
        let q = &s.question_words;
        assert_eq!(q.count, 7);
        assert_eq!(q.max, d.max(8));
        assert_eq!(q.min, d.min(4));
        // verb-noun pairs: "holding man" 2, "be color" 2, "be dog" 1, "wearing coat" 1;
        // the detail instruction is not counted
        assert_eq!(
            s.top_verb_noun,
            vec![
                VerbNoun {
                    verb: "be".into(),
                    noun: "color".into(),
                    count: 2
                },
                VerbNoun {
                    verb: "holding".into(),
                    noun: "man".into(),
                    count: 2
                },
                VerbNoun {
                    verb: "be".into(),
                    noun: "dog".into(),
                    count: 1
                },
            ]
        );
        let c = &s.answer_words_per_type[&InstructType::Conversation];
        assert_eq!((c.count, c.min, c.max), (5, 2, 6));
    }

    #[test]
    fn distributions() {
        let d = Dist::of(vec![1, 2, 3, 4, 10, 11, 12, 13, 14, 30], 10);
        assert_eq!((d.min, d.max, d.median, d.p90), (1, 30, 10.5, 14));
        assert_eq!(d.histogram, vec![4, 5, 0, 1]);
        assert_eq!(Dist::of(vec![], 5).count, 0);
    }
}
