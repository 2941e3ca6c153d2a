//! The demo's datasets, as LLaVA record files and `llava eval` question files.
//!
//! - **Left-to-right captions** (stages 0 and 1): every object of a picture, in order, behind
//!   a description instruction with `<image>`, laid out as the paper's stage-1 data.
//! - **Text-only questions** (part of stage 2): a scene described in words, then questions about
//!   it, as LLaVA-1.5 mixes text-only conversations into stage 2. They stand in for what the
//!   paper's LLM (Vicuna) brings: reading a description and answering questions about it.
//! - **Probes** (part of stage 2): every kind of probe about one training image asked in one
//!   multi-turn record, each turn either short-answer or multiple-choice, as LLaVA-1.5 packs
//!   its academic VQA data.
//! - **Benchmark** (test split): the same probes written as a short-answer file and a
//!   multiple-choice file, with `category` = the question kind.

use llava_data::record::{IMAGE_PLACEHOLDER, LlavaRecord, Turn};
use llava_eval::mc::{mc_prompt, option_letter};
use llava_eval::vqa::vqa_prompt;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::questions::{Probe, probes};
use crate::world::Scene;
use crate::world::captions::order;

/// One record per scene whose answer is its left-to-right caption, behind a description
/// instruction: stage 0's captioning target. Every word of it depends on the picture (which
/// objects, in which order), so the tower gets a signal from every token; a paragraph of all
/// five captions was mostly predictable from its own first sentence, and the model learned to
/// ignore the picture.
pub fn order_caption_records(
    scenes: &[(Scene, Vec<String>)],
    instructions: &[String],
    seed: u64,
) -> Vec<LlavaRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    scenes
        .iter()
        .map(|(s, _)| {
            let instruction = instructions
                .choose(&mut rng)
                .map_or("Describe the image in detail.", String::as_str);
            LlavaRecord {
                id: json!(format!("order_{}", s.id)),
                image: Some(s.file_name.clone()),
                conversations: vec![
                    Turn::human(format!("{IMAGE_PLACEHOLDER}\n{instruction}")),
                    Turn::gpt(order(s, &mut rng)),
                ],
            }
        })
        .collect()
}

/// A scene's probes in a random order. Were the kinds always asked colour first, the model
/// would learn which answer the first turn takes instead of reading the question, and the
/// benchmark, which asks each question as the first turn, would get a colour to every kind.
fn shuffled_probes(scene: &Scene, rng: &mut StdRng) -> Vec<Probe> {
    let mut ps = probes(scene, rng);
    ps.shuffle(rng);
    ps
}

/// One question as a short-answer or a multiple-choice prompt, with its answer.
fn ask(p: &Probe, mc: bool) -> (String, String) {
    if mc {
        let letter = option_letter(p.answer_index).unwrap_or('A');
        (mc_prompt(&p.question, &p.options, None), letter.to_string())
    } else {
        (vqa_prompt(&p.question), p.answer.clone())
    }
}

/// A question about a scene given in words instead of a picture.
fn in_words(description: &str, question: &str) -> String {
    format!("The picture: {description}\n{question}")
}

/// One text-only record per scene: the scene in words (its left-to-right caption), then every
/// kind of probe about it.
pub fn text_probe_records(scenes: &[Scene], seed: u64, mc_share: f64) -> Vec<LlavaRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    scenes
        .iter()
        .map(|s| {
            let description = order(s, &mut rng);
            let mut turns = Vec::new();
            for p in shuffled_probes(s, &mut rng) {
                let (q, a) = ask(&p, rng.random_bool(mc_share));
                let q = if turns.is_empty() {
                    in_words(&description, &q)
                } else {
                    q
                };
                turns.push(Turn::human(q));
                turns.push(Turn::gpt(a));
            }
            LlavaRecord {
                id: json!(format!("text_{}", s.id)),
                image: None,
                conversations: turns,
            }
        })
        .collect()
}

/// One multi-turn probe record per scene; `mc_share` of the turns are multiple-choice.
pub fn probe_records(scenes: &[Scene], seed: u64, mc_share: f64) -> Vec<LlavaRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    scenes
        .iter()
        .map(|s| {
            let mut turns = Vec::new();
            for p in shuffled_probes(s, &mut rng) {
                let (q, a) = ask(&p, rng.random_bool(mc_share));
                let q = if turns.is_empty() {
                    format!("{IMAGE_PLACEHOLDER}\n{q}")
                } else {
                    q
                };
                turns.push(Turn::human(q));
                turns.push(Turn::gpt(a));
            }
            LlavaRecord {
                id: json!(format!("probe_{}", s.id)),
                image: Some(s.file_name.clone()),
                conversations: turns,
            }
        })
        .collect()
}

/// The benchmark's question files, one probe per kind per scene, with shared ids.
pub struct Benchmark {
    /// Short-answer lines, with the picture.
    pub short: Vec<serde_json::Value>,
    /// The same questions as multiple choice, with the picture.
    pub mc: Vec<serde_json::Value>,
    /// The same short-answer questions with the scene written out in words, as the text-only
    /// stage-2 records give it, and no picture. It separates the decoder's part from the
    /// tower's: a model that cannot find "the square" in a sentence listing the objects will
    /// not find it among image patches either.
    pub in_words: Vec<serde_json::Value>,
}

/// The benchmark of `scenes`.
pub fn benchmark(scenes: &[Scene], seed: u64) -> Benchmark {
    let mut rng = StdRng::seed_from_u64(seed);
    // Its own stream, so that adding the words form left the pictures' questions unchanged.
    let mut words_rng = StdRng::seed_from_u64(seed ^ 0x3077);
    let mut b = Benchmark {
        short: Vec::new(),
        mc: Vec::new(),
        in_words: Vec::new(),
    };
    for s in scenes {
        let description = order(s, &mut words_rng);
        for p in probes(s, &mut rng) {
            let id = format!("{}_{}", s.id, p.kind.name());
            b.short.push(
                json!({"question_id": id, "image": s.file_name, "question": p.question,
                            "answer": p.answer, "category": p.kind.name()}),
            );
            b.mc.push(json!({"question_id": id, "image": s.file_name, "question": p.question,
                           "options": p.options, "answer": p.answer_index, "category": p.kind.name()}));
            b.in_words.push(json!({"question_id": id,
                "question": in_words(&description, &p.question),
                "answer": p.answer, "category": p.kind.name()}));
        }
    }
    b
}

/// JSON Lines text.
pub fn jsonl(lines: &[serde_json::Value]) -> String {
    lines.iter().map(|l| format!("{l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{WorldConfig, sample_split};

    fn world() -> Vec<(Scene, Vec<String>)> {
        let config = WorldConfig {
            seed: 5,
            image_size: 64,
            train: 40,
            val: 0,
            test: 0,
        };
        sample_split(&config, "train")
    }

    #[test]
    fn order_captions_name_every_object_left_to_right() {
        let w = world();
        let records = order_caption_records(&w, &["Tell me everything.".to_string()], 1);
        assert_eq!(records.len(), w.len());
        for (r, (s, _)) in records.iter().zip(&w) {
            assert_eq!(r.image.as_deref(), Some(s.file_name.as_str()));
            assert_eq!(r.conversations[0].value, "<image>\nTell me everything.");
            let text = &r.conversations[1].value;
            let at: Vec<usize> = s
                .objects
                .iter()
                .map(|o| text.find(&o.name()).expect("named"))
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
        }
    }

    #[test]
    fn text_records_describe_the_scene_and_answer_from_it() {
        let w = world();
        let scenes: Vec<Scene> = w.iter().map(|(s, _)| s.clone()).collect();
        let records = text_probe_records(&scenes, 2, 0.5);
        assert_eq!(records.len(), scenes.len());
        let (mut mc, mut short) = (0, 0);
        for (r, s) in records.iter().zip(&scenes) {
            assert!(r.image.is_none());
            let first = &r.conversations[0].value;
            assert!(first.starts_with("The picture: "), "{first}");
            for o in &s.objects {
                assert!(first.contains(&o.name()), "{first} lacks {}", o.name());
            }
            for pair in r.conversations.chunks(2) {
                if pair[0].value.ends_with(llava_eval::vqa::VQA_SUFFIX) {
                    short += 1;
                } else {
                    mc += 1;
                    assert_eq!(pair[1].value.len(), 1, "a letter: {}", pair[1].value);
                }
            }
            // The count probe's answer is the number of objects.
            let count = r
                .conversations
                .chunks(2)
                .find(|p| kind_of(&p[0].value) == "count")
                .expect("a count question");
            let n = s.objects.len();
            assert!(
                count[1].value == n.to_string()
                    || llava_eval::mc::parse_choice(&count[1].value, 5) == Some(n - 1),
                "{count:?} for {n} objects"
            );
        }
        assert!(mc > 20 && short > 20, "both forms: {mc} mc, {short} short");
    }

    /// Which kind a probe question asks, from its wording.
    fn kind_of(question: &str) -> &'static str {
        if question.contains("left or to the right") {
            "position"
        } else if question.contains("How many") || question.contains("Count") {
            "count"
        } else if question.contains("colour") {
            "colour"
        } else {
            "shape"
        }
    }

    #[test]
    fn every_kind_of_question_comes_first_in_some_record() {
        let w = world();
        let scenes: Vec<Scene> = w.iter().map(|(s, _)| s.clone()).collect();
        for records in [
            probe_records(&scenes, 4, 0.5),
            text_probe_records(&scenes, 4, 0.5),
        ] {
            let first: std::collections::BTreeSet<&str> = records
                .iter()
                .map(|r| kind_of(&r.conversations[0].value))
                .collect();
            assert_eq!(first.len(), 4, "first questions only ask {first:?}");
        }
    }

    #[test]
    fn benchmark_forms_share_ids_and_answers() {
        let w = world();
        let scenes: Vec<Scene> = w.iter().map(|(s, _)| s.clone()).collect();
        let bench = benchmark(&scenes, 3);
        assert_eq!(bench.short.len(), bench.mc.len());
        assert_eq!(bench.short.len(), bench.in_words.len());
        for ((a, b), w) in bench.short.iter().zip(&bench.mc).zip(&bench.in_words) {
            assert_eq!(a["question_id"], b["question_id"]);
            let i = b["answer"].as_u64().unwrap() as usize;
            assert_eq!(b["options"][i], a["answer"]);
            // The words form asks the same question of the same scene, without the picture.
            assert_eq!(w["question_id"], a["question_id"]);
            assert_eq!(w["answer"], a["answer"]);
            assert!(w.get("image").is_none(), "{w}");
            let q = w["question"].as_str().unwrap();
            let (scene, question) = q.split_once('\n').unwrap();
            assert_eq!(question, a["question"].as_str().unwrap());
            let id: u64 = a["question_id"]
                .as_str()
                .unwrap()
                .split('_')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            let s = scenes.iter().find(|s| s.id == id).unwrap();
            for o in &s.objects {
                assert!(scene.contains(&o.name()), "{scene} lacks {}", o.name());
            }
        }
    }
}
