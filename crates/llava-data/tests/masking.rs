//! Label masks: the supervised tokens decode exactly to the assistant answers with their
//! end-of-turn markers, for every template, multi-turn included, with both image-token
//! conventions (an `<image>` token in the vocabulary, or none).

use std::path::{Path, PathBuf};

use llava_data::conversation::ConvTemplate;
use llava_data::record::{LlavaRecord, Turn};
use llava_data::sample::{IGNORE_INDEX, SampleOptions, record_messages, tokenize_record};
use llava_data::tokenizer::{IM_END, IM_START, ImageTokens, Tokenizer};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(case)
        .join("model")
}

fn record(image: bool) -> LlavaRecord {
    let q1 = if image {
        "What is on the table?\n<image>"
    } else {
        "What is on the table?"
    };
    LlavaRecord {
        id: serde_json::json!(7),
        image: image.then(|| "000000000007.jpg".to_string()),
        conversations: vec![
            Turn::human(q1),
            Turn::gpt("A red ball and two blue cups."),
            Turn::human("How many cups?"),
            Turn::gpt("There are two cups."),
        ],
    }
}

/// Contiguous runs of supervised positions, as token ids.
fn supervised_spans(labels: &[i64]) -> Vec<Vec<u32>> {
    let mut spans: Vec<Vec<u32>> = Vec::new();
    let mut open = false;
    for &l in labels {
        if l == IGNORE_INDEX {
            open = false;
        } else {
            if !open {
                spans.push(Vec::new());
                open = true;
            }
            if let Some(last) = spans.last_mut() {
                last.push(l as u32);
            }
        }
    }
    spans
}

fn check(tokenizer: &Tokenizer, image_tokens: ImageTokens) {
    for name in ConvTemplate::NAMES {
        let template = ConvTemplate::from_name(name).expect("template");
        for image in [true, false] {
            let r = record(image);
            let opts = SampleOptions {
                template,
                image_tokens,
                image_seq_len: 25,
                max_length: 2048,
                keep_image_position: false,
            };
            let s = tokenize_record(tokenizer, &r, &opts).expect("tokenizes");
            assert_eq!(s.input_ids.len(), s.labels.len());
            for (&id, &l) in s.input_ids.iter().zip(&s.labels) {
                assert!(
                    l == IGNORE_INDEX || l == id as i64,
                    "{name}: a label is its own token"
                );
            }
            let n_img = s
                .input_ids
                .iter()
                .filter(|&&t| t == image_tokens.id())
                .count();
            assert_eq!(n_img, if image { 25 } else { 0 }, "{name}: image positions");
            assert!(
                s.labels
                    .iter()
                    .zip(&s.input_ids)
                    .all(|(&l, &t)| t != image_tokens.id() || l == IGNORE_INDEX)
            );

            let messages = record_messages(&r, false).expect("messages");
            let eos = tokenizer.eos_token.clone().expect("eos");
            let answers: Vec<String> = template
                .segments(&messages, &eos, false)
                .into_iter()
                .filter(|seg| seg.supervised)
                .map(|seg| seg.text)
                .collect();
            let spans = supervised_spans(&s.labels);
            // Plain supervises only its caption, which is a single answer.
            assert_eq!(
                spans.len(),
                answers.len(),
                "{name}: one supervised span per answer"
            );
            for (span, answer) in spans.iter().zip(&answers) {
                let text = tokenizer.decode(span, false).expect("decodes");
                assert_eq!(text.trim(), answer.trim(), "{name} (image: {image})");
                assert!(
                    answer.contains("cup"),
                    "{name}: the answer text itself is supervised"
                );
            }
        }
    }
}

#[test]
fn supervised_tokens_are_exactly_the_answers_with_image_token() {
    let tokenizer = Tokenizer::from_dir(&fixture("llava15-default")).expect("tokenizer");
    let image_tokens = tokenizer.image_tokens(600, false);
    assert!(matches!(image_tokens, ImageTokens::Expand { id: 600 }));
    check(&tokenizer, image_tokens);
}

#[test]
fn supervised_tokens_are_exactly_the_answers_without_image_token() {
    let tokenizer = Tokenizer::from_dir(&fixture("original-layout")).expect("tokenizer");
    let image_tokens = tokenizer.image_tokens(600, false);
    assert!(matches!(image_tokens, ImageTokens::Split { id: 600, .. }));
    check(&tokenizer, image_tokens);
}

/// LLaVA v0 (`mm_use_im_start_end`): every run of image positions sits between `<im_start>`
/// and `<im_end>`, neither of them supervised, and the answers are unchanged.
#[test]
fn image_positions_sit_between_im_start_and_im_end() {
    let tokenizer = Tokenizer::from_dir(&fixture("original-v0")).expect("tokenizer");
    let image_tokens = tokenizer.image_tokens(603, true);
    assert!(matches!(
        image_tokens,
        ImageTokens::Split {
            id: 603,
            im_start_end: true
        }
    ));
    check(&tokenizer, image_tokens);
    let start = tokenizer.token_to_id(IM_START).expect("<im_start>");
    let end = tokenizer.token_to_id(IM_END).expect("<im_end>");
    for name in ConvTemplate::NAMES {
        let opts = SampleOptions {
            template: ConvTemplate::from_name(name).expect("template"),
            image_tokens,
            image_seq_len: 25,
            max_length: 2048,
            keep_image_position: false,
        };
        let s = tokenize_record(&tokenizer, &record(true), &opts).expect("tokenizes");
        let first = s
            .input_ids
            .iter()
            .position(|&t| t == 603)
            .expect("image positions");
        assert_eq!(s.input_ids[first - 1], start, "{name}");
        assert_eq!(s.input_ids[first + 25], end, "{name}");
        assert_eq!(s.labels[first - 1], IGNORE_INDEX, "{name}");
        assert_eq!(s.labels[first + 25], IGNORE_INDEX, "{name}");
    }
}

#[test]
fn llava_v1_answers_end_with_eos_and_bos_appears_once() {
    let tokenizer = Tokenizer::from_dir(&fixture("llava15-default")).expect("tokenizer");
    let opts = SampleOptions {
        template: ConvTemplate::LlavaV1,
        image_tokens: tokenizer.image_tokens(600, false),
        image_seq_len: 25,
        max_length: 2048,
        keep_image_position: false,
    };
    let s = tokenize_record(&tokenizer, &record(true), &opts).expect("tokenizes");
    let eos = tokenizer.eos_token_id.expect("eos id");
    let bos = tokenizer.token_to_id("<s>").expect("bos");
    assert_eq!(s.input_ids.first(), Some(&bos));
    assert_eq!(s.input_ids.iter().filter(|&&t| t == bos).count(), 1);
    for span in supervised_spans(&s.labels) {
        assert_eq!(
            span.last(),
            Some(&eos),
            "every answer is supervised through its </s>"
        );
    }
    assert_eq!(
        s.labels[0], IGNORE_INDEX,
        "the system prompt is not supervised"
    );
}

#[test]
fn truncation_is_reported() {
    let tokenizer = Tokenizer::from_dir(&fixture("llava15-default")).expect("tokenizer");
    let opts = SampleOptions {
        template: ConvTemplate::LlavaV1,
        image_tokens: tokenizer.image_tokens(600, false),
        image_seq_len: 25,
        max_length: 40,
        keep_image_position: false,
    };
    let s = tokenize_record(&tokenizer, &record(true), &opts).expect("tokenizes");
    assert!(s.truncated);
    assert_eq!((s.input_ids.len(), s.labels.len()), (40, 40));
}
