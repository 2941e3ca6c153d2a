//! Continuous batching's two steps on a left-padded batch ([`KvCache::left_padded`]): a
//! sequence prefilled on its own [`join`]s the batch that is already decoding, and
//! [`decode_step`] advances every row by one token. A server runs these between requests
//! arriving and leaving; finished rows leave through [`KvCache::keep_rows`].
//!
//! Joining pads the shorter side on the left to the longer one's length (one copy of the
//! cache), so the cost is paid when a sequence arrives, not at every step. The padding slots are
//! masked and each row keeps its own positions, so a row's logits are those it would have alone,
//! up to rounding.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::pool;
use crate::model::kv_cache::LayerKv;
use crate::model::language_model::KvCache;
use crate::model::llava::Llava;
use crate::model::nn::Mode;

/// Rows in `cache`: 0 when nothing has been run through it.
pub fn rows(cache: &KvCache) -> usize {
    match cache.first_keys() {
        Some(Ok(k)) => k.dim(0).unwrap_or(0),
        _ => 0,
    }
}

/// Appends the rows of `other` (a prefilled sequence or batch) to `batch`, below its own. An
/// empty `batch` becomes `other`. Both must come from the same model and dtype.
pub fn join(batch: &mut KvCache, other: KvCache) -> Result<()> {
    let (a_rows, b_rows) = (rows(batch), rows(&other));
    if b_rows == 0 {
        return Err(ModelError::Input(
            "only a prefilled cache can join a batch".into(),
        ));
    }
    if a_rows == 0 {
        *batch = padded(other, 0)?;
        return Ok(());
    }
    if batch.layers.len() != other.layers.len() {
        return Err(ModelError::Input(format!(
            "a cache of {} layers cannot join one of {}",
            other.layers.len(),
            batch.layers.len()
        )));
    }
    let len = batch.seq_len().max(other.seq_len());
    let a = std::mem::take(batch);
    let a_pad = len - a.seq_len();
    let a = padded(a, a_pad)?;
    let b_pad = len - other.seq_len();
    let b = padded(other, b_pad)?;
    let mut layers = Vec::with_capacity(a.layers.len());
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        let (la, lb) = match (la, lb) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(ModelError::Input(
                    "a cache with an empty layer cannot join".into(),
                ));
            }
        };
        layers.push(Some(LayerKv::new(
            Tensor::cat(&[la.keys()?, lb.keys()?], 0)?,
            Tensor::cat(&[la.values()?, lb.values()?], 0)?,
        )?));
    }
    let mask = match (&a.mask, &b.mask) {
        (Some(ma), Some(mb)) => Some(Tensor::cat(&[ma, mb], 0)?),
        _ => return Err(ModelError::Input("a padded cache has a mask".into())),
    };
    *batch = KvCache {
        layers,
        mask,
        left_pad: [a.left_pad, b.left_pad].concat(),
    };
    Ok(())
}

/// Row `row` of a left-padded batch as a cache of its own, without its padding: what a
/// sequence leaving the batch leaves behind for a prompt cache
/// ([`crate::generate::prompt_cache::PromptCache::from_kv`]). Its tensors are copies, so
/// keeping it does not keep the batch's alive.
pub fn take_row(batch: &KvCache, row: usize) -> Result<KvCache> {
    let mut one = batch.clone();
    if one.left_pad.is_empty() {
        one.left_pad = vec![0; rows(&one)];
    }
    one.keep_rows(&[row])?;
    // A lone row with no padding: numbered from 0 and unmasked, as a fresh prefill leaves it.
    one.mask = None;
    one.left_pad.clear();
    Ok(one)
}

/// `cache` with `pad` more masked slots on the left of every row, an explicit mask and one
/// `left_pad` entry per row.
fn padded(mut cache: KvCache, pad: usize) -> Result<KvCache> {
    let (r, t) = (rows(&cache), cache.seq_len());
    let device = match cache.first_keys() {
        Some(k) => k?.device().clone(),
        None => return Err(ModelError::Input("the cache is empty".into())),
    };
    if cache.left_pad.is_empty() {
        cache.left_pad = vec![0; r];
    }
    for p in &mut cache.left_pad {
        *p += pad;
    }
    let mask = match cache.mask.take() {
        Some(m) => m,
        None => Tensor::ones((r, t), DType::U8, &device)?,
    };
    if pad == 0 {
        cache.mask = Some(mask);
        return Ok(cache);
    }
    let zeros = Tensor::zeros((r, pad), DType::U8, &device)?;
    cache.mask = Some(Tensor::cat(&[&zeros, &mask], 1)?);
    // Masked slots are never attended to; zeros keep them finite.
    let pad_left = |x: &Tensor| -> Result<Tensor> {
        let (b, h, _, d) = x.dims4()?;
        let zeros = Tensor::zeros((b, h, pad, d), x.dtype(), x.device())?;
        Ok(Tensor::cat(&[&zeros, x], 2)?)
    };
    cache.map_layers(pad_left)?;
    Ok(cache)
}

/// One decoding step of every row: `next[r]` is row `r`'s latest token (not yet in the cache).
/// Returns the logits of each row's next position, `[rows, vocab]`. Every decoding loop
/// (`generate`, `generate_batch`, the server's scheduler) steps through here.
pub fn decode_step(model: &Llava, cache: &mut KvCache, next: &[u32]) -> Result<Tensor> {
    if next.len() != rows(cache) {
        return Err(ModelError::Input(format!(
            "a decode step takes one token per row: {} token(s) for {} row(s)",
            next.len(),
            rows(cache)
        )));
    }
    let ids: Vec<Vec<u32>> = next.iter().map(|&id| vec![id]).collect();
    let lm = &model.language_model;
    // A step is ~7 products per layer, each too short to pay for waking the caller.
    pool::on_worker(lm.device(), || {
        let hidden = lm.forward(&lm.embed(&ids)?, None, cache, Mode::Infer)?;
        Ok(lm.logits(&hidden)?.squeeze(1)?)
    })
}

#[cfg(test)]
mod tests {
    use std::ops::ControlFlow;
    use std::path::Path;

    use llava_data::conversation::Message;

    use super::*;
    use crate::generate::generation::{
        BatchPrompt, PrefilledBatch, Sampler, SamplingParams, generate, prefill_batch,
    };
    use crate::generate::pipeline::{Pipeline, PipelineOptions};

    const STEPS: usize = 8;

    fn pipeline() -> Pipeline {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/llava15-default/model");
        Pipeline::load(&PipelineOptions::new(dir.to_string_lossy())).expect("fixture loads")
    }

    fn greedy() -> Sampler {
        Sampler::new(SamplingParams::default()).expect("greedy sampler")
    }

    /// One text prompt prefilled alone, as the server prefills an arriving request.
    fn prefill_alone(p: &Pipeline, ids: &[u32]) -> PrefilledBatch {
        prefill_batch(
            &p.model,
            &[BatchPrompt {
                input_ids: ids,
                images: None,
            }],
        )
        .expect("prefill")
    }

    /// One decode step of every row of `batch`, each row's greedy token appended to its list.
    fn step_greedy(p: &Pipeline, batch: &mut KvCache, tokens: &mut [Vec<u32>]) {
        let next: Vec<u32> = tokens.iter().map(|t| *t.last().expect("token")).collect();
        let logits = decode_step(&p.model, batch, &next).expect("step");
        for (row, t) in tokens.iter_mut().enumerate() {
            t.push(
                greedy()
                    .sample(&logits.get(row).expect("row"))
                    .expect("sample"),
            );
        }
    }

    /// A sequence that arrives while another decodes, joins it, decodes beside it and outlives
    /// it gets the tokens each gets alone.
    #[test]
    fn joined_rows_decode_as_they_would_alone() {
        let p = pipeline();
        let image_path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/images/small_24x20.png");
        let images = p.pixel_values(&[image_path]).expect("image").expect("one");
        let long = p
            .render(&[Message::user("What is in this picture, in detail?", 1)])
            .expect("render");
        let short = p.render(&[Message::user("Hi", 0)]).expect("render");
        let a_ids = p.encode(&long, Some(&images)).expect("encode");
        let b_ids = p.encode(&short, None).expect("encode");
        assert_ne!(a_ids.len(), b_ids.len(), "the rows need different padding");
        let alone = |ids: &[u32], images| {
            generate(&p.model, ids, images, &mut greedy(), STEPS, &[], |_| {
                ControlFlow::Continue(())
            })
            .expect("generate")
            .0
        };
        let (a_alone, b_alone) = (alone(&a_ids, Some(&images)), alone(&b_ids, None));

        let prefill = |ids: &[u32], images| {
            let out = prefill_batch(
                &p.model,
                &[BatchPrompt {
                    input_ids: ids,
                    images,
                }],
            )
            .expect("prefill");
            let first = greedy()
                .sample(&out.logits.get(0).expect("row"))
                .expect("sample");
            (out.cache, first)
        };
        let mut batch = KvCache::new();
        let (cache, a0) = prefill(&a_ids, Some(&images));
        join(&mut batch, cache).expect("join an empty batch");
        let mut a = vec![a0];
        // A decodes alone for two steps, then B arrives.
        for _ in 0..2 {
            let logits = decode_step(&p.model, &mut batch, &[*a.last().expect("a")]).expect("step");
            a.push(
                greedy()
                    .sample(&logits.get(0).expect("row"))
                    .expect("sample"),
            );
        }
        let (cache, b0) = prefill(&b_ids, None);
        join(&mut batch, cache).expect("join");
        assert_eq!(rows(&batch), 2);
        let mut b = vec![b0];
        while a.len() < STEPS {
            let next = [*a.last().expect("a"), *b.last().expect("b")];
            let logits = decode_step(&p.model, &mut batch, &next).expect("step");
            a.push(
                greedy()
                    .sample(&logits.get(0).expect("row"))
                    .expect("sample"),
            );
            b.push(
                greedy()
                    .sample(&logits.get(1).expect("row"))
                    .expect("sample"),
            );
        }
        // A is done and leaves; B goes on alone.
        batch.keep_rows(&[1]).expect("keep B");
        while b.len() < STEPS {
            let logits = decode_step(&p.model, &mut batch, &[*b.last().expect("b")]).expect("step");
            b.push(
                greedy()
                    .sample(&logits.get(0).expect("row"))
                    .expect("sample"),
            );
        }
        assert_eq!(a, a_alone, "the longer, earlier row");
        assert_eq!(b, b_alone, "the shorter row that joined later");
    }

    /// A full server batch (`llava serve --max-running 8`): eight prompts of different lengths
    /// join one by one, as the server admits them, and each row gets the tokens it gets alone.
    #[test]
    fn eight_joined_rows_decode_as_they_would_alone() {
        let p = pipeline();
        let ids: Vec<Vec<u32>> = (0..8)
            .map(|i| {
                let text = format!("Question {i}: {}?", "what is there ".repeat(i));
                let prompt = p.render(&[Message::user(&text, 0)]).expect("render");
                p.encode(&prompt, None).expect("encode")
            })
            .collect();
        let alone: Vec<Vec<u32>> = ids
            .iter()
            .map(|ids| {
                generate(&p.model, ids, None, &mut greedy(), STEPS, &[], |_| {
                    ControlFlow::Continue(())
                })
                .expect("generate")
                .0
            })
            .collect();
        let mut batch = KvCache::new();
        let mut tokens: Vec<Vec<u32>> = Vec::new();
        for ids in &ids {
            // Everyone already in the batch takes a step before the next one arrives.
            if !tokens.is_empty() {
                step_greedy(&p, &mut batch, &mut tokens);
            }
            let out = prefill_alone(&p, ids);
            let first = greedy()
                .sample(&out.logits.get(0).expect("row"))
                .expect("sample");
            join(&mut batch, out.cache).expect("join");
            tokens.push(vec![first]);
        }
        assert_eq!(rows(&batch), 8);
        while tokens.iter().any(|t| t.len() < STEPS) {
            step_greedy(&p, &mut batch, &mut tokens);
        }
        for (i, (got, want)) in tokens.iter().zip(&alone).enumerate() {
            assert_eq!(&got[..want.len()], &want[..], "row {i}");
        }
    }

    /// A row taken out of a padded batch is that prompt's cache alone: unpadded, and a
    /// prompt cache built from it gives the tokens a fresh run gives.
    #[test]
    fn a_row_taken_from_the_batch_is_its_own_cache() {
        use crate::generate::generation::prefill_with_cache;
        use crate::generate::prompt_cache::PromptCache;
        let p = pipeline();
        let long = p
            .render(&[Message::user("Say something long about the weather", 0)])
            .expect("render");
        let short = p.render(&[Message::user("Hi", 0)]).expect("render");
        let a_ids = p.encode(&long, None).expect("encode");
        let b_ids = p.encode(&short, None).expect("encode");
        let mut batch = KvCache::new();
        for ids in [&a_ids, &b_ids] {
            join(&mut batch, prefill_alone(&p, ids).cache).expect("join");
        }
        let b = take_row(&batch, 1).expect("row");
        assert_eq!(b.seq_len(), b_ids.len(), "the padding is gone");
        assert!(b.mask.is_none() && b.left_pad.is_empty());
        assert!(take_row(&batch, 2).is_err());
        // The short prompt and a follow-up: the cached part is not run again.
        let mut cache = PromptCache::from_kv(b, &b_ids, None, &[]).expect("cache");
        let follow = [b_ids.clone(), vec![5; 20]].concat();
        let cached = prefill_with_cache(&p.model, &mut cache, &follow, None).expect("prefill");
        assert!(cached.cached_tokens > 0);
        let fresh =
            prefill_with_cache(&p.model, &mut PromptCache::new(), &follow, None).expect("prefill");
        assert_eq!(
            greedy().sample(&cached.logits).expect("sample"),
            greedy().sample(&fresh.logits).expect("sample")
        );
    }

    #[test]
    fn a_step_needs_one_token_per_row() {
        let p = pipeline();
        let mut cache = KvCache::new();
        assert!(decode_step(&p.model, &mut cache, &[1]).is_err());
        assert!(join(&mut cache, KvCache::new()).is_err());
    }
}
