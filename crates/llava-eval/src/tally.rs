//! What the benchmark scorers share: pairing questions with their answers, and keeping a
//! score overall and per category.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::jsonl::{Answer, QuestionId};

/// A score kept overall and per category; a blank category is counted overall only.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ByCategory<M> {
    pub categories: BTreeMap<String, M>,
    pub overall: M,
}

impl<M: Default> ByCategory<M> {
    /// Adds one item to the overall score and to its category's.
    pub fn record(&mut self, category: Option<&str>, mut add: impl FnMut(&mut M)) {
        add(&mut self.overall);
        if let Some(c) = category.map(str::trim).filter(|c| !c.is_empty()) {
            add(self.categories.entry(c.to_string()).or_default());
        }
    }

    /// Applies `f` to every score, e.g. to work out rates once all items are in.
    pub fn for_each(&mut self, mut f: impl FnMut(&mut M)) {
        f(&mut self.overall);
        self.categories.values_mut().for_each(f);
    }
}

/// Each question that has an answer, with it, and how many have none (which are not scored).
pub fn answered<'a, Q>(
    questions: &'a [Q],
    answers: &'a HashMap<QuestionId, Answer>,
    id: impl Fn(&Q) -> &QuestionId,
) -> (Vec<(&'a Q, &'a Answer)>, usize) {
    let pairs: Vec<_> = questions
        .iter()
        .filter_map(|q| answers.get(id(q)).map(|a| (q, a)))
        .collect();
    let missing = questions.len() - pairs.len();
    (pairs, missing)
}
