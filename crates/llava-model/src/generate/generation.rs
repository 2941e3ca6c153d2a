//! Decoding: greedy or sampled (temperature, top-k, top-p, seed), one token at a time over the
//! KV cache. Stop strings need detokenisation, so the caller decides when to stop.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{ModelError, Result};
use crate::generate::batch_decode::decode_step;
use crate::generate::prompt_cache::PromptCache;
use crate::kernels::pool;
use crate::model::image_inputs::ImageInputs;
use crate::model::language_model::KvCache;
use crate::model::llava::Llava;
use crate::model::nn::Mode;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 1.0 disables nucleus filtering.
    pub top_p: f64,
    /// 0 disables top-k filtering.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        // An infinite temperature would sample uniformly over the vocabulary.
        let valid = params.temperature.is_finite()
            && params.temperature >= 0.0
            && params.top_p > 0.0
            && params.top_p <= 1.0;
        if !valid {
            return Err(ModelError::Input(format!(
                "temperature must be finite and >= 0, and top_p in (0, 1]; got temperature {} and top_p {}",
                params.temperature, params.top_p
            )));
        }
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Picks the next token from one position's logits (`[vocab]`).
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
        if logits.is_empty() {
            return Err(ModelError::Input("empty logits".into()));
        }
        // NaN compares false with everything, so greedy would answer token 0 and sampling
        // nonsense: a broken weight or config value must not pass for an answer.
        if logits.iter().any(|l| l.is_nan()) {
            return Err(ModelError::Input(
                "the model computed NaN logits: a weight in the checkpoint or a config value (an eps, rope_theta, a rope factor) is not finite or out of range".into(),
            ));
        }
        if self.params.temperature == 0.0 {
            return Ok(argmax(&logits));
        }
        // Softmax at temperature, then keep the top-k and the smallest nucleus of mass top_p.
        let t = self.params.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        if self.params.top_k > 0 {
            probs.truncate(self.params.top_k);
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            let mut keep = 0;
            for p in &probs {
                keep += 1;
                mass += p.1 / total;
                if mass >= self.params.top_p as f32 {
                    break;
                }
            }
            probs.truncate(keep.max(1));
        }
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, p) in &probs {
            if r < p {
                return Ok(id);
            }
            r -= p;
        }
        Ok(probs.last().map(|p| p.0).unwrap_or(0))
    }
}

/// Index of the largest value; the first on ties, as `torch.argmax` does.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// What one generation call measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// Leading prompt tokens whose keys and values were kept from an earlier turn, and so
    /// were not prefilled again.
    pub cached_tokens: usize,
    pub vision_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub generated: usize,
    /// Prompts generated together: 0 or 1 for one prompt.
    pub rows: usize,
}

impl GenerationStats {
    pub fn decode_tok_s(&self) -> f64 {
        // Each row's first token comes out of prefill; decode speed counts the tokens after.
        let steps = self.generated.saturating_sub(self.rows.max(1));
        if self.decode_ms > 0.0 {
            steps as f64 / (self.decode_ms / 1000.0)
        } else {
            0.0
        }
    }
}

/// Runs prefill on one prompt and then decodes up to `max_new_tokens`, calling `on_token` with
/// each new id; it stops early when `on_token` breaks or an id in `eos` is produced (the EOS id
/// is passed to `on_token` too, then generation ends).
pub fn generate(
    model: &Llava,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
    sampler: &mut Sampler,
    max_new_tokens: usize,
    eos: &[u32],
    on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    let mut cache = PromptCache::new();
    generate_with_cache(
        model,
        &mut cache,
        input_ids,
        images,
        sampler,
        max_new_tokens,
        eos,
        on_token,
    )
}

/// As [`generate`], going on from whatever beginning of the prompt `cache` holds (a
/// conversation's earlier turns): only the rest is prefilled, and only the images not in the
/// cached part go through the vision tower. Afterwards the cache holds this prompt and reply.
/// On an error it is emptied, since a forward pass may have stopped half-way through it.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_cache(
    model: &Llava,
    cache: &mut PromptCache,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
    sampler: &mut Sampler,
    max_new_tokens: usize,
    eos: &[u32],
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    // Each image's span of placeholder ids: what the cache compares with the cached prompt's.
    let spans = image_spans(model, input_ids, images)?;
    let mut stats = GenerationStats {
        prompt_tokens: input_ids.len(),
        ..Default::default()
    };
    if max_new_tokens == 0 {
        return Ok((Vec::new(), stats));
    }
    let mut run = || -> Result<Vec<u32>> {
        let CachedPrefill {
            mut logits,
            cached_tokens,
            vision_ms,
            prefill_ms,
        } = prefill_cached(model, cache, input_ids, images, &spans)?;
        stats.cached_tokens = cached_tokens;
        stats.vision_ms = vision_ms;
        stats.prefill_ms = prefill_ms;

        let clock = std::time::Instant::now();
        let mut tokens = Vec::new();
        loop {
            let next = sampler.sample(&logits)?;
            tokens.push(next);
            let flow = on_token(next);
            if flow.is_break() || eos.contains(&next) || tokens.len() >= max_new_tokens {
                break;
            }
            logits = decode_step(model, &mut cache.kv, &[next])?.flatten_all()?;
        }
        stats.decode_ms = clock.elapsed().as_secs_f64() * 1000.0;
        stats.generated = tokens.len();
        // Every token but the last went through the model.
        cache.record(input_ids, images, &tokens[..tokens.len() - 1])?;
        Ok(tokens)
    };
    match run() {
        Ok(tokens) => Ok((tokens, stats)),
        Err(e) => {
            cache.clear();
            Err(e)
        }
    }
}

/// What [`prefill_with_cache`] computed.
pub struct CachedPrefill {
    /// The logits of the prompt's last position, `[vocab]`.
    pub logits: Tensor,
    /// Leading prompt tokens whose keys and values came from the cache.
    pub cached_tokens: usize,
    pub vision_ms: f64,
    pub prefill_ms: f64,
}

/// Prefills `input_ids` on top of whatever beginning of it `cache` holds: only the rest runs,
/// and only the images not in the cached part go through the vision tower. Afterwards the
/// cache's keys and values hold the whole prompt (take them with [`PromptCache::take_kv`]).
/// On an error the cache is emptied, since a forward pass may have stopped half-way through it.
pub fn prefill_with_cache(
    model: &Llava,
    cache: &mut PromptCache,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
) -> Result<CachedPrefill> {
    let spans = image_spans(model, input_ids, images)?;
    prefill_cached(model, cache, input_ids, images, &spans).inspect_err(|_| cache.clear())
}

/// How many leading tokens of `input_ids` a [`prefill_with_cache`] from `cache` would reuse,
/// without changing it: what a server compares to pick among several cached conversations.
pub fn reusable_tokens(
    model: &Llava,
    cache: &PromptCache,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
) -> Result<usize> {
    if !rope_keeps(model, cache, input_ids) {
        return Ok(0);
    }
    let spans = image_spans(model, input_ids, images)?;
    Ok(cache
        .shared(
            input_ids,
            images,
            (model.config.image_token_index, &spans),
            RERUN,
        )?
        .tokens)
}

/// Tokens always run again: more than the decoding GEMV takes, so that the new tokens go
/// through the same products as in a prefill of the whole prompt, and on the CPU the logits
/// are bit for bit those of a fresh run (tests/prompt_cache.rs).
const RERUN: usize = crate::kernels::gemv::MAX_ROWS + 1;

/// Dynamic NTK rope rotates each key by frequencies set by the longest sequence of its pass:
/// keys cached past the trained context, or reused by a prompt longer than it, are not those a
/// fresh run of this prompt computes.
fn rope_keeps(model: &Llava, cache: &PromptCache, input_ids: &[u32]) -> bool {
    match model.language_model.rope().stable_len() {
        Some(stable) => cache.kv.seq_len() <= stable && input_ids.len() <= stable,
        None => true,
    }
}

/// [`prefill_with_cache`] once the prompt's image `spans` are known.
fn prefill_cached(
    model: &Llava,
    cache: &mut PromptCache,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
    spans: &[usize],
) -> Result<CachedPrefill> {
    let mut prefill = start_cached(model, cache, input_ids, images, spans)?;
    loop {
        if let Some(done) = prefill.advance(model, cache, usize::MAX)? {
            return Ok(done);
        }
    }
}

/// A prefill run a piece at a time, so that a server can decode its running sequences between
/// the pieces instead of stalling them for a whole prompt (chunked prefill). Each piece appends
/// its keys and values to the prompt's own [`PromptCache`]; the logits come with the last.
pub struct ChunkedPrefill {
    /// The embeddings of the positions still to run (image features in place), `[1, len, hidden]`.
    embeds: Tensor,
    /// Positions of `embeds` already run.
    done: usize,
    cached_tokens: usize,
    vision_ms: f64,
    prefill_ms: f64,
    /// Dynamic NTK rope past the trained context rotates by the longest sequence of a pass:
    /// such a prompt runs whole.
    whole: bool,
}

/// Starts a [`prefill_with_cache`] to be run in pieces with [`ChunkedPrefill::advance`]: finds
/// what `cache` holds of the prompt and runs the vision tower over the images after it (that
/// part is not split). On an error the cache is emptied.
pub fn start_prefill_with_cache(
    model: &Llava,
    cache: &mut PromptCache,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
) -> Result<ChunkedPrefill> {
    let spans = image_spans(model, input_ids, images)?;
    start_cached(model, cache, input_ids, images, &spans).inspect_err(|_| cache.clear())
}

impl ChunkedPrefill {
    /// Positions still to run.
    pub fn remaining(&self) -> usize {
        self.embeds.dim(1).unwrap_or(0) - self.done
    }

    /// Runs about `chunk` more positions (at least `RERUN`, and the rest whole when less
    /// than `chunk + RERUN` would remain, so that no piece goes through the decoding GEMV and
    /// the logits are bit for bit those of one whole prefill on the CPU). `Some` once the
    /// prompt is done: its last position's logits. On an error the cache is emptied.
    pub fn advance(
        &mut self,
        model: &Llava,
        cache: &mut PromptCache,
        chunk: usize,
    ) -> Result<Option<CachedPrefill>> {
        self.run_piece(model, cache, chunk)
            .inspect_err(|_| cache.clear())
    }

    fn run_piece(
        &mut self,
        model: &Llava,
        cache: &mut PromptCache,
        chunk: usize,
    ) -> Result<Option<CachedPrefill>> {
        let clock = std::time::Instant::now();
        let remaining = self.remaining();
        let chunk = if self.whole {
            usize::MAX
        } else {
            chunk.max(RERUN)
        };
        let take = if remaining < chunk.saturating_add(RERUN) {
            remaining
        } else {
            chunk
        };
        let piece = self.embeds.narrow(1, self.done, take)?;
        let lm = &model.language_model;
        let hidden = pool::on_worker(lm.device(), || {
            lm.forward(&piece, None, &mut cache.kv, Mode::Infer)
        })?;
        self.done += take;
        if self.remaining() > 0 {
            hidden.device().synchronize()?;
            self.prefill_ms += clock.elapsed().as_secs_f64() * 1000.0;
            return Ok(None);
        }
        let last = hidden.narrow(1, take - 1, 1)?;
        let logits = model.language_model.logits(&last)?.flatten_all()?;
        logits.device().synchronize()?;
        self.prefill_ms += clock.elapsed().as_secs_f64() * 1000.0;
        Ok(Some(CachedPrefill {
            logits,
            cached_tokens: self.cached_tokens,
            vision_ms: self.vision_ms,
            prefill_ms: self.prefill_ms,
        }))
    }
}

/// [`start_prefill_with_cache`] once the prompt's image `spans` are known.
fn start_cached(
    model: &Llava,
    cache: &mut PromptCache,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
    spans: &[usize],
) -> Result<ChunkedPrefill> {
    if !rope_keeps(model, cache, input_ids) {
        cache.clear();
    }
    let reuse = cache.reuse(
        input_ids,
        images,
        (model.config.image_token_index, spans),
        RERUN,
    )?;
    let clock = std::time::Instant::now();
    // Only the images after the cached part.
    let features = match images {
        Some(images) if images.len() > reuse.images => {
            Some(model.image_features(&images.skip(reuse.images), Mode::Infer)?)
        }
        _ => None,
    };
    // A GPU queues work and returns: wait for it, or the time lands in the next phase.
    if let Some(f) = &features {
        f.device().synchronize()?;
    }
    let vision_ms = clock.elapsed().as_secs_f64() * 1000.0;

    let clock = std::time::Instant::now();
    let new_ids = [input_ids[reuse.tokens..].to_vec()];
    let embeds = model.embed(&new_ids, features.as_ref())?;
    Ok(ChunkedPrefill {
        embeds,
        done: 0,
        cached_tokens: reuse.tokens,
        vision_ms,
        prefill_ms: clock.elapsed().as_secs_f64() * 1000.0,
        whole: model
            .language_model
            .rope()
            .stable_len()
            .is_some_and(|stable| input_ids.len() > stable),
    })
}

/// Each image's count of placeholder positions, once the prompt is checked to be non-empty and
/// to hold exactly that many image tokens.
fn image_spans(
    model: &Llava,
    input_ids: &[u32],
    images: Option<&ImageInputs>,
) -> Result<Vec<usize>> {
    if input_ids.is_empty() {
        return Err(ModelError::Input("the prompt has no tokens".into()));
    }
    let spans = match images {
        Some(images) => model.image_token_counts(images)?,
        None => Vec::new(),
    };
    let expected: usize = spans.iter().sum();
    let found = input_ids
        .iter()
        .filter(|&&i| i == model.config.image_token_index)
        .count();
    if found != expected {
        return Err(ModelError::Input(format!(
            "the prompt has {found} image tokens but {} image(s) need {expected}: put one <image> in the prompt per image",
            spans.len()
        )));
    }
    Ok(spans)
}

/// One prompt of a batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchPrompt<'a> {
    pub input_ids: &'a [u32],
    pub images: Option<&'a ImageInputs>,
}

/// A left-padded batch after prefill: what [`generate_batch`] decodes from.
pub struct PrefilledBatch {
    /// The prompts' keys and values, with each row's padding.
    pub cache: KvCache,
    /// Each row's logits at its last prompt position, `[rows, vocab]`.
    pub logits: Tensor,
    pub vision_ms: f64,
    pub prefill_ms: f64,
}

/// Runs several prompts through the model together, as transformers' `generate` does a
/// left-padded batch: padded on the left to one length, masked, and each numbered from its first
/// real token, so that each row's logits are those of the prompt alone up to rounding. All the
/// images go through the vision tower in one pass.
pub fn prefill_batch(model: &Llava, prompts: &[BatchPrompt]) -> Result<PrefilledBatch> {
    if prompts.is_empty() {
        return Err(ModelError::Input(
            "a batch needs at least one prompt".into(),
        ));
    }
    for p in prompts {
        image_spans(model, p.input_ids, p.images)?;
    }
    let clock = std::time::Instant::now();
    let mut all_images = ImageInputs {
        pixel_values: Vec::new(),
        image_sizes: Vec::new(),
    };
    for images in prompts.iter().filter_map(|p| p.images) {
        all_images
            .pixel_values
            .extend(images.pixel_values.iter().cloned());
        all_images.image_sizes.extend(&images.image_sizes);
    }
    let features = match all_images.is_empty() {
        true => None,
        false => Some(model.image_features(&all_images, Mode::Infer)?),
    };
    if let Some(f) = &features {
        f.device().synchronize()?;
    }
    let vision_ms = clock.elapsed().as_secs_f64() * 1000.0;

    let clock = std::time::Instant::now();
    let len = prompts.iter().map(|p| p.input_ids.len()).max().unwrap_or(0);
    // Any id but the image placeholder: padding is masked, so its embedding is never seen.
    let pad_id = u32::from(model.config.image_token_index == 0);
    let left_pad: Vec<usize> = prompts.iter().map(|p| len - p.input_ids.len()).collect();
    let rows: Vec<Vec<u32>> = prompts
        .iter()
        .zip(&left_pad)
        .map(|(p, &pad)| [vec![pad_id; pad], p.input_ids.to_vec()].concat())
        .collect();
    let mask: Vec<u8> = left_pad
        .iter()
        .flat_map(|&pad| (0..len).map(move |j| u8::from(j >= pad)))
        .collect();
    let mask = Tensor::from_vec(mask, (prompts.len(), len), model.language_model.device())?;
    let mut cache = KvCache::left_padded(left_pad);
    let embeds = model.embed(&rows, features.as_ref())?;
    let hidden = model
        .language_model
        .forward(&embeds, Some(&mask), &mut cache, Mode::Infer)?;
    let logits = model
        .language_model
        .logits(&hidden.narrow(1, len - 1, 1)?)?
        .squeeze(1)?;
    logits.device().synchronize()?;
    Ok(PrefilledBatch {
        cache,
        logits,
        vision_ms,
        prefill_ms: clock.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Generates for several prompts together ([`prefill_batch`]); each decoding step runs every
/// unfinished row at once, which reads the weights once for all of them.
///
/// Row `r` samples with `samplers[r]` and stops as [`generate`] does, at the latest after
/// `max_new_tokens[r]` tokens; `on_token(r, id)` sees its ids. A finished row leaves the
/// batch. Returns each row's ids; the stats are the batch's, with `generated` summed over the
/// rows.
pub fn generate_batch(
    model: &Llava,
    prompts: &[BatchPrompt],
    samplers: &mut [Sampler],
    max_new_tokens: &[usize],
    eos: &[u32],
    mut on_token: impl FnMut(usize, u32) -> ControlFlow<()>,
) -> Result<(Vec<Vec<u32>>, GenerationStats)> {
    if samplers.len() != prompts.len() || max_new_tokens.len() != prompts.len() {
        return Err(ModelError::Input(format!(
            "a batch needs one sampler and one max_new_tokens per prompt; got {} prompt(s), {} sampler(s) and {} limit(s)",
            prompts.len(),
            samplers.len(),
            max_new_tokens.len()
        )));
    }
    let mut stats = GenerationStats {
        prompt_tokens: prompts.iter().map(|p| p.input_ids.len()).sum(),
        rows: prompts.len(),
        ..Default::default()
    };
    let mut outputs = vec![Vec::new(); prompts.len()];
    if max_new_tokens.iter().all(|&n| n == 0) {
        for p in prompts {
            image_spans(model, p.input_ids, p.images)?;
        }
        return Ok((outputs, stats));
    }
    let PrefilledBatch {
        mut cache,
        mut logits,
        vision_ms,
        prefill_ms,
    } = prefill_batch(model, prompts)?;
    stats.vision_ms = vision_ms;
    stats.prefill_ms = prefill_ms;

    let clock = std::time::Instant::now();
    // The original row of each row still in the batch.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    loop {
        let mut keep = Vec::new();
        let mut next = Vec::new();
        for (i, &row) in active.iter().enumerate() {
            // Only at the first step: a row with nothing to generate leaves at once.
            if max_new_tokens[row] == 0 {
                continue;
            }
            let id = samplers[row].sample(&logits.get(i)?)?;
            outputs[row].push(id);
            let flow = on_token(row, id);
            if !(flow.is_break() || eos.contains(&id) || outputs[row].len() >= max_new_tokens[row])
            {
                keep.push(i);
                next.push(id);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < active.len() {
            cache.keep_rows(&keep)?;
            active = keep.iter().map(|&i| active[i]).collect();
        }
        logits = decode_step(model, &mut cache, &next)?;
    }
    stats.decode_ms = clock.elapsed().as_secs_f64() * 1000.0;
    stats.generated = outputs.iter().map(Vec::len).sum();
    Ok((outputs, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_first_maximum() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn sampling_is_seeded_and_respects_top_k() {
        let logits =
            Tensor::new(&[1.0f32, 2.0, 3.0, 4.0], &candle_core::Device::Cpu).expect("tensor");
        let params = SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 2,
            seed: 7,
        };
        let draw = |p: &SamplingParams| -> Vec<u32> {
            let mut s = Sampler::new(p.clone()).expect("sampler");
            (0..50)
                .map(|_| s.sample(&logits).expect("sample"))
                .collect()
        };
        let a = draw(&params);
        assert_eq!(a, draw(&params), "same seed, same draws");
        assert!(
            a.iter().all(|&t| t == 2 || t == 3),
            "top-k 2 keeps only the two best: {a:?}"
        );
        assert!(a.contains(&2) && a.contains(&3));
        let nucleus = SamplingParams {
            top_k: 0,
            top_p: 0.5,
            ..params
        };
        assert!(
            draw(&nucleus).iter().all(|&t| t == 3),
            "p(4th)=0.64 alone covers top_p 0.5"
        );
    }

    #[test]
    fn bad_params_are_rejected() {
        assert!(
            Sampler::new(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            Sampler::new(SamplingParams {
                temperature: f64::INFINITY,
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn nan_logits_are_an_error_not_token_zero() {
        let logits = Tensor::new(&[f32::NAN, 1.0, 2.0], &candle_core::Device::Cpu).expect("tensor");
        for temperature in [0.0, 0.7] {
            let mut s = Sampler::new(SamplingParams {
                temperature,
                ..Default::default()
            })
            .expect("sampler");
            let e = s.sample(&logits).expect_err("NaN").to_string();
            assert!(e.contains("NaN"), "{e}");
        }
    }
}
