//! The cost plan of `--dry-run`: every prompt is built, nothing is sent.
//!
//! Prompt tokens are counted with the teacher's own tokenizer where tiktoken knows the model
//! (`gpt-4o`, `gpt-4.1`, `gpt-4`, `gpt-3.5-turbo`…, through the `tiktoken-rs` crate, which
//! embeds OpenAI's encoding files and needs no network), as OpenAI's cookbook counts chat
//! messages: 3 tokens per message plus its role and content, plus 3 priming the reply. For
//! other models (a vLLM teacher, say) they are counted with `o200k_base` and marked as an
//! approximation.
//!
//! Expected completion tokens per request are the mean length of the type's few-shot replies
//! (what the teacher is shown to imitate), capped at `max_tokens`; `max_tokens` itself gives
//! the upper bound. Prices are per 1M tokens; the Batch API bills half.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
use tiktoken_rs::{ChatCompletionRequestMessage, CoreBPE, num_tokens_from_messages};

use crate::client::{ChatMessage, Role};
use crate::error::InstructError;
use crate::output;
use crate::pipeline::{RunConfig, input_check, messages_for, pairs_to_do};
use crate::prompts::PromptLibrary;
use crate::source::ImageEntry;
use crate::types::InstructType;

/// The Batch API's price relative to live requests.
pub const BATCH_DISCOUNT: f64 = 0.5;

/// Counts chat tokens as a model's tokenizer does.
pub struct TokenCounter {
    /// The model name given to tiktoken-rs (the teacher's, or `gpt-4o` when unknown).
    count_model: String,
    bpe: &'static CoreBPE,
    pub encoding: &'static str,
    /// Whether `encoding` is the teacher's own.
    pub exact: bool,
    cache: HashMap<(&'static str, String), u64>,
}

fn encoding_name(t: Tokenizer) -> Option<&'static str> {
    match t {
        Tokenizer::O200kBase => Some("o200k_base"),
        Tokenizer::O200kHarmony => Some("o200k_harmony"),
        Tokenizer::Cl100kBase => Some("cl100k_base"),
        _ => None,
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

impl TokenCounter {
    /// The counter of `model`: its own encoding when tiktoken knows it as a chat model.
    pub fn for_model(model: &str) -> Result<Self, InstructError> {
        let (count_model, encoding, exact) =
            match get_tokenizer(model).and_then(|t| encoding_name(t).map(|e| (t, e))) {
                Some((_, e)) => (model.to_string(), e, true),
                None => ("gpt-4o".to_string(), "o200k_base", false),
            };
        let bpe = tiktoken_rs::bpe_for_model(&count_model).map_err(|e| {
            InstructError::InvalidArgument(format!("no tokenizer for {count_model}: {e}"))
        })?;
        Ok(Self {
            count_model,
            bpe,
            encoding,
            exact,
            cache: HashMap::new(),
        })
    }

    /// Tokens of plain text.
    pub fn text_tokens(&self, text: &str) -> u64 {
        self.bpe.encode_with_special_tokens(text).len() as u64
    }

    /// Prompt tokens of a chat request. Each message's share is counted once and cached, so
    /// the system message and few-shot examples shared by every request cost nothing more.
    pub fn chat_tokens(&mut self, messages: &[ChatMessage]) -> Result<u64, InstructError> {
        let mut total = 0u64;
        for m in messages {
            let key = (role_name(m.role), m.content.clone());
            let n = match self.cache.get(&key) {
                Some(n) => *n,
                None => {
                    let one = ChatCompletionRequestMessage {
                        role: role_name(m.role).to_string(),
                        content: Some(m.content.clone()),
                        ..Default::default()
                    };
                    // The count of one message includes the reply priming once.
                    let n = num_tokens_from_messages(&self.count_model, &[one])
                        .map_err(|e| InstructError::InvalidArgument(e.to_string()))?
                        .saturating_sub(REPLY_PRIMING) as u64;
                    self.cache.insert(key, n);
                    n
                }
            };
            total += n;
        }
        Ok(total + REPLY_PRIMING as u64)
    }
}

/// Tokens the API adds once per request to prime the reply (OpenAI cookbook).
const REPLY_PRIMING: usize = 3;

/// The plan of one type.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TypePlan {
    pub requests: usize,
    pub prompt_tokens: u64,
    /// Few-shot mean per request (capped at `max_tokens`), times the requests.
    pub completion_tokens: u64,
    /// `max_tokens` times the requests, when `max_tokens` is set.
    pub completion_tokens_max: Option<u64>,
}

/// Costs at the given prices, live and through the Batch API.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Costs {
    pub price_in_per_1m: f64,
    pub price_out_per_1m: f64,
    pub live: f64,
    pub batch: f64,
    pub live_max: Option<f64>,
    pub batch_max: Option<f64>,
}

/// What a run would send.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CostPlan {
    pub model: String,
    pub encoding: String,
    /// Whether the encoding is the model's own (else an approximation).
    pub exact_tokenizer: bool,
    pub images: usize,
    pub pairs: usize,
    pub already_done: usize,
    /// Pairs settled without the teacher (`brief`, images lacking captions).
    pub no_teacher: usize,
    pub per_type: BTreeMap<InstructType, TypePlan>,
    pub total: TypePlan,
    pub cost: Option<Costs>,
}

/// Builds every prompt of the run `cfg` describes (without writing anything) and counts it.
pub fn plan(
    entries: &[ImageEntry],
    lib: &PromptLibrary,
    cfg: &RunConfig,
    model: &str,
    prices: Option<(f64, f64)>,
) -> Result<CostPlan, InstructError> {
    let mut counter = TokenCounter::for_model(model)?;
    let existing = output::scan_readonly(&cfg.out_dir)?;
    let (summary, todo) = pairs_to_do(entries, cfg, &existing);
    let mut expected: BTreeMap<InstructType, u64> = BTreeMap::new();
    for ty in InstructType::TEACHER {
        if let Some(set) = lib.set(ty)
            && !set.examples.is_empty()
        {
            let sum: u64 = set
                .examples
                .iter()
                .map(|e| counter.text_tokens(&e.reply))
                .sum();
            let mean = sum.div_ceil(set.examples.len() as u64);
            let capped = cfg.max_tokens.map_or(mean, |m| mean.min(u64::from(m)));
            expected.insert(ty, capped);
        }
    }
    let mut per_type: BTreeMap<InstructType, TypePlan> = BTreeMap::new();
    let mut no_teacher = 0;
    for (entry, ty) in &todo {
        let messages = match input_check(entry, *ty) {
            Ok(()) => messages_for(entry, *ty, lib),
            Err(_) => None,
        };
        let Some(messages) = messages else {
            no_teacher += 1;
            continue;
        };
        let p = per_type.entry(*ty).or_default();
        p.requests += 1;
        p.prompt_tokens += counter.chat_tokens(&messages)?;
        p.completion_tokens += expected.get(ty).copied().unwrap_or(0);
        p.completion_tokens_max = cfg
            .max_tokens
            .map(|m| p.completion_tokens_max.unwrap_or(0) + u64::from(m));
    }
    let mut total = TypePlan::default();
    for p in per_type.values() {
        total.requests += p.requests;
        total.prompt_tokens += p.prompt_tokens;
        total.completion_tokens += p.completion_tokens;
        total.completion_tokens_max = p
            .completion_tokens_max
            .map(|m| total.completion_tokens_max.unwrap_or(0) + m);
    }
    let cost = prices.map(|(pin, pout)| {
        let at = |prompt: u64, completion: u64| {
            prompt as f64 / 1e6 * pin + completion as f64 / 1e6 * pout
        };
        let live = at(total.prompt_tokens, total.completion_tokens);
        let live_max = total
            .completion_tokens_max
            .map(|m| at(total.prompt_tokens, m));
        Costs {
            price_in_per_1m: pin,
            price_out_per_1m: pout,
            live,
            batch: live * BATCH_DISCOUNT,
            live_max,
            batch_max: live_max.map(|c| c * BATCH_DISCOUNT),
        }
    });
    Ok(CostPlan {
        model: model.to_string(),
        encoding: counter.encoding.to_string(),
        exact_tokenizer: counter.exact,
        images: summary.images,
        pairs: summary.pairs,
        already_done: summary.already_done,
        no_teacher,
        per_type,
        total,
        cost,
    })
}

/// A human-readable rendering of the plan.
pub fn format_plan(p: &CostPlan) -> String {
    let mut out = format!(
        "dry run: nothing sent. images {}  pairs {}  already done {}  without teacher {}\n",
        p.images, p.pairs, p.already_done, p.no_teacher
    );
    out.push_str(&format!(
        "tokenizer {} ({})\n",
        p.encoding,
        if p.exact_tokenizer {
            format!("{}'s own", p.model)
        } else {
            format!("approximation: tiktoken does not know {}", p.model)
        }
    ));
    out.push_str(&format!(
        "{:<14} {:>9} {:>14} {:>18} {:>16}\n",
        "type", "requests", "prompt tok", "completion tok", "max completion"
    ));
    let row = |name: &str, t: &TypePlan| {
        format!(
            "{:<14} {:>9} {:>14} {:>18} {:>16}\n",
            name,
            t.requests,
            t.prompt_tokens,
            t.completion_tokens,
            t.completion_tokens_max
                .map_or("-".to_string(), |m| m.to_string())
        )
    };
    for (ty, t) in &p.per_type {
        out.push_str(&row(ty.name(), t));
    }
    out.push_str(&row("total", &p.total));
    match &p.cost {
        Some(c) => {
            out.push_str(&format!(
                "cost at {} in / {} out per 1M tokens: live {:.4}, Batch API {:.4}",
                c.price_in_per_1m, c.price_out_per_1m, c.live, c.batch
            ));
            if let (Some(l), Some(b)) = (c.live_max, c.batch_max) {
                out.push_str(&format!(
                    " (at most {l:.4} live, {b:.4} batch if every reply ran to max_tokens)"
                ));
            }
        }
        None => out.push_str("no prices given (--price-in, --price-out per 1M tokens): no cost"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompts::BUILTIN_FILES;

    fn fixture() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiktoken_counts.json"
        );
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// Counts made by pip `tiktoken` (tools/make_tiktoken_fixture.py).
    #[test]
    fn text_counts_equal_tiktoken() {
        let f = fixture();
        for (model, enc) in [("gpt-4o", "o200k_base"), ("gpt-4", "cl100k_base")] {
            let c = TokenCounter::for_model(model).unwrap();
            assert!(c.exact);
            assert_eq!(c.encoding, enc);
            let expected = f["text"][enc].as_object().unwrap();
            assert_eq!(expected.len(), BUILTIN_FILES.len());
            for (name, text) in BUILTIN_FILES {
                assert_eq!(
                    Some(c.text_tokens(text)),
                    expected[*name].as_u64(),
                    "{enc} {name}"
                );
            }
        }
    }

    #[test]
    fn chat_counts_equal_the_cookbook_formula_over_tiktoken() {
        let f = fixture();
        let query = f["query"].as_str().unwrap();
        let file = |p: &str| {
            BUILTIN_FILES
                .iter()
                .find(|(n, _)| *n == p)
                .map(|(_, t)| t.to_string())
                .unwrap()
        };
        for (model, enc) in [("gpt-4o-mini", "o200k_base"), ("gpt-4", "cl100k_base")] {
            let mut c = TokenCounter::for_model(model).unwrap();
            for ty in ["conversation", "detail", "complex"] {
                let mut m = vec![ChatMessage::system(file(&format!("{ty}/system.txt")))];
                for n in 1..=2 {
                    m.push(ChatMessage::user(file(&format!(
                        "{ty}/fewshot_{n:03}_context.txt"
                    ))));
                    m.push(ChatMessage::assistant(file(&format!(
                        "{ty}/fewshot_{n:03}_reply.txt"
                    ))));
                }
                m.push(ChatMessage::user(query));
                let expected = f["chat"][enc][ty].as_u64().unwrap();
                assert_eq!(c.chat_tokens(&m).unwrap(), expected, "{enc} {ty}");
                // cached shares give the same answer
                assert_eq!(c.chat_tokens(&m).unwrap(), expected, "{enc} {ty} cached");
            }
        }
    }

    #[test]
    fn unknown_models_are_approximated_and_say_so() {
        let c = TokenCounter::for_model("Qwen/Qwen2.5-72B-Instruct").unwrap();
        assert!(!c.exact);
        assert_eq!(c.encoding, "o200k_base");
    }
}
