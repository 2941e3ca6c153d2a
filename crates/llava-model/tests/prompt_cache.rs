//! A chat's kept keys and values ([`PromptCache`]) against running every turn from scratch, on
//! the tiny llava-hf fixture: the same logits and tokens, with the image and the earlier turn
//! not run again.

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use llava_data::conversation::Message;
use llava_data::image::ImageAspectRatio;
use llava_model::generation::SamplingParams;
use llava_model::image_inputs::ImageInputs;
use llava_model::language_model::KvCache;
use llava_model::nn::Mode;
use llava_model::pipeline::{Pipeline, PipelineOptions};
use llava_model::prompt_cache::PromptCache;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

fn pipeline() -> Pipeline {
    let mut opts = PipelineOptions::new(fixtures().join("llava15-default/model").to_string_lossy());
    opts.image_aspect_ratio = Some(ImageAspectRatio::Square);
    Pipeline::load(&opts).expect("fixture loads")
}

fn pixels(p: &Pipeline, image: &str) -> ImageInputs {
    p.pixel_values(&[fixtures().join("images").join(image)])
        .expect("image")
        .expect("one image")
}

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .expect("difference")
}

/// The last position's logits, the prompt run whole or as a cached beginning and the rest:
/// what makes `llava eval answer`'s reuse of a shared beginning change no answer.
#[test]
fn a_prompt_split_over_the_cache_gives_the_whole_prompts_logits() {
    let p = pipeline();
    let prompt = p
        .render(&[Message::user("What shapes can you see in the image?", 1)])
        .expect("render");
    let images = pixels(&p, "shapes_64x48.png");
    let ids = p.encode(&prompt, Some(&images)).expect("encode");
    let px = images.all_tiles().expect("pixel values");
    let last_logits = |hidden: &Tensor| {
        let s = hidden.dim(1).expect("seq");
        p.model
            .language_model
            .logits(&hidden.narrow(1, s - 1, 1).expect("last"))
            .expect("logits")
            .flatten_all()
            .expect("flat")
    };
    let mut whole = KvCache::new();
    let hidden = p
        .model
        .forward(
            std::slice::from_ref(&ids),
            Some(&px),
            None,
            &mut whole,
            Mode::Infer,
        )
        .expect("forward");
    let want = last_logits(&hidden);
    // Split after the image span and a few text tokens, then run the rest over the cache. The
    // rest is longer than the decoding GEMV's rows (`gemv::MAX_ROWS`): a shorter one takes the
    // GEMV, whose sums are ordered otherwise than the prefill GEMM's (the last bits differ).
    let split = ids.len() - (llava_model::gemv::MAX_ROWS + 2);
    let mut kv = KvCache::new();
    p.model
        .forward(
            &[ids[..split].to_vec()],
            Some(&px),
            None,
            &mut kv,
            Mode::Infer,
        )
        .expect("prefix");
    let rest = p
        .model
        .language_model
        .embed(&[ids[split..].to_vec()])
        .expect("embed");
    // The rest over the cache: the largest difference from the whole prompt's logits.
    let rest_diff = |kv: &mut KvCache| {
        let hidden = p
            .model
            .language_model
            .forward(&rest, None, kv, Mode::Infer)
            .expect("rest");
        max_abs_diff(&last_logits(&hidden), &want)
    };
    // The new tokens take the prefill's products, and every kernel computes a row the same way
    // whatever rows run beside it: no bit differs.
    let diff = rest_diff(&mut kv);
    assert_eq!(diff, 0.0, "logits differ by {diff}");
    // Cut back to the split and run the rest again: the same logits, so truncation forgets
    // exactly the positions after it.
    kv.truncate(split).expect("truncate");
    let again = rest_diff(&mut kv);
    assert_eq!(again, 0.0, "after truncate, logits differ by {again}");
}

/// Two turns of a chat about one image, then a turn about another image with the same words.
#[test]
fn a_follow_up_turn_reuses_the_first_and_answers_as_a_fresh_run_does() {
    let p = pipeline();
    let px = pixels(&p, "shapes_64x48.png");
    let mut cache = PromptCache::new();
    let turn = |cache: &mut PromptCache, history: &[Message], px: &ImageInputs| {
        let ids = p
            .encode(&p.render(history).expect("render"), Some(px))
            .expect("encode");
        let cached = p
            .generate_with_cache(cache, &ids, Some(px), &greedy(), 12, &[], |_| {})
            .expect("cached turn");
        let fresh = p
            .generate(&ids, Some(px), &greedy(), 12, &[], |_| {})
            .expect("fresh turn");
        assert_eq!(cached.token_ids, fresh.token_ids);
        assert_eq!(cached.text, fresh.text);
        (ids, cached)
    };

    let mut history = vec![Message::user("What shapes can you see in the image?", 1)];
    let (first_ids, first) = turn(&mut cache, &history, &px);
    assert_eq!(first.stats.cached_tokens, 0);
    // The cache holds the prompt and every generated token the model was fed.
    assert_eq!(
        cache.len(),
        first_ids.len() + first.token_ids.len() - 1,
        "prompt and fed reply"
    );

    history.push(Message::assistant(first.text.trim()));
    history.push(Message::user("And what colour are they?", 0));
    let (second_ids, second) = turn(&mut cache, &history, &px);
    // At least the whole first prompt, image included, was reused.
    assert!(
        second.stats.cached_tokens >= first_ids.len(),
        "{} of {} tokens reused; the first prompt had {}",
        second.stats.cached_tokens,
        second_ids.len(),
        first_ids.len()
    );
    assert!(second.stats.cached_tokens < second_ids.len());

    // The same conversation about another picture: the token ids are the same, but the image
    // span must not be reused.
    let other = pixels(&p, "texture_45x45.png");
    let (_, third) = turn(&mut cache, &history, &other);
    let image_start = second_ids
        .iter()
        .position(|&i| i == p.model.config.image_token_index)
        .expect("image token");
    assert_eq!(third.stats.cached_tokens, image_start);
    assert_ne!(
        third.token_ids, second.token_ids,
        "another image should change this random model's answer"
    );
}

/// A failed turn leaves no half-written state behind.
#[test]
fn an_error_empties_the_cache() {
    let p = pipeline();
    let px = pixels(&p, "shapes_64x48.png");
    let mut cache = PromptCache::new();
    let ids = p
        .encode(
            &p.render(&[Message::user("What shapes can you see?", 1)])
                .expect("render"),
            Some(&px),
        )
        .expect("encode");
    p.generate_with_cache(&mut cache, &ids, Some(&px), &greedy(), 4, &[], |_| {})
        .expect("turn");
    assert!(!cache.is_empty());
    // A prompt longer than the context.
    let mut long = ids.clone();
    long.extend(std::iter::repeat_n(300u32, 400));
    let err = llava_model::generation::generate_with_cache(
        &p.model,
        &mut cache,
        &long,
        Some(&px),
        &mut llava_model::generation::Sampler::new(greedy()).expect("sampler"),
        4,
        &[],
        |_| std::ops::ControlFlow::Continue(()),
    );
    assert!(err.is_err());
    assert!(cache.is_empty());
}

/// A prompt prefilled in pieces between other work (a server's chunked prefill) against the
/// same prompt prefilled whole: bit for bit the same last logits and the same cache length,
/// whatever the piece size.
#[test]
fn a_chunked_prefill_gives_the_whole_prefills_logits() {
    use llava_model::generation::{prefill_with_cache, start_prefill_with_cache};
    let p = pipeline();
    let prompt = p
        .render(&[Message::user(
            "What shapes can you see in the image? Name each one with its colour, say where it \
             lies from left to right, and tell me which is the largest and which the smallest.",
            1,
        )])
        .expect("render");
    let images = pixels(&p, "shapes_64x48.png");
    let ids = p.encode(&prompt, Some(&images)).expect("encode");
    let mut whole = PromptCache::new();
    let want = prefill_with_cache(&p.model, &mut whole, &ids, Some(&images)).expect("whole");
    let min_piece = llava_model::gemv::MAX_ROWS + 1;
    assert!(ids.len() >= 3 * min_piece, "{} tokens", ids.len());
    for chunk in [1, min_piece, 24] {
        let mut cache = PromptCache::new();
        let mut prefill =
            start_prefill_with_cache(&p.model, &mut cache, &ids, Some(&images)).expect("start");
        let mut pieces = 0;
        let got = loop {
            pieces += 1;
            let before = prefill.remaining();
            match prefill.advance(&p.model, &mut cache, chunk).expect("piece") {
                Some(done) => break done,
                // No piece is shorter than the GEMV's rows, nor leaves fewer behind.
                None => assert!(before - prefill.remaining() >= min_piece),
            }
        };
        assert!(pieces >= 2, "chunk {chunk}: {pieces} piece(s)");
        assert_eq!(
            max_abs_diff(&got.logits, &want.logits),
            0.0,
            "chunk {chunk}"
        );
        assert_eq!(cache.take_kv().seq_len(), ids.len());
    }
}
