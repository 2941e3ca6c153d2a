//! The demo's steps, in order. Each is skipped when its output is already complete.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use llava_data::record::LlavaRecord;
use llava_demo::data::{
    benchmark, jsonl, order_caption_records, probe_records, text_probe_records,
};
use llava_demo::teacher::server::{ServerConfig, TeacherServer};
use llava_demo::tokenizer::{IMAGE_TOKEN_INDEX, PAD_TOKEN_ID, save_tokenizer, train_tokenizer};
use llava_demo::world::{self, WorldConfig, WorldPaths};
use llava_model::{DType, Device, Llava};

use super::report_data::{ReportBuilder, SampleChat, StageReport};
use super::{Layout, Plan};
use crate::run_args;

pub type StepFn = fn(&Plan, &Layout, &mut ReportBuilder) -> Result<()>;

/// The name the teacher's model is asked for by.
const TEACHER_MODEL: &str = "shapes-teacher";

fn world_config(plan: &Plan) -> WorldConfig {
    WorldConfig {
        seed: plan.seed,
        image_size: plan.model.image_size as u32,
        train: plan.train_scenes,
        val: plan.val_scenes,
        test: plan.test_scenes,
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|a| a.to_string()).collect()
}

fn write(path: &Path, text: &str) -> Result<()> {
    world::write_file(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn write_records(path: &Path, records: &[LlavaRecord]) -> Result<()> {
    write(path, &serde_json::to_string(records)?)
}

/// Step 1: Scenes, images and COCO annotation files.
pub fn world(plan: &Plan, layout: &Layout, _: &mut ReportBuilder) -> Result<()> {
    let done = layout.world().join("done");
    if done.exists() {
        eprintln!("world already written");
        return Ok(());
    }
    let paths = WorldPaths::new(layout.world());
    world::write_world(&world_config(plan), &paths)?;
    write(&done, "")?;
    eprintln!(
        "{} train, {} val, {} test scenes in {}",
        plan.train_scenes,
        plan.val_scenes,
        plan.test_scenes,
        layout.world().display()
    );
    Ok(())
}

/// Step 2: Instruction data from the offline teacher over HTTP, then every dataset file.
pub fn instruct(plan: &Plan, layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let paths = WorldPaths::new(layout.world());
    // Every 40th request is refused with a 429, so the run shows the client's retry path.
    let server = TeacherServer::start(&ServerConfig {
        fail_every: Some(40),
        ..ServerConfig::default()
    })?;
    eprintln!("offline teacher listening on {}", server.api_base());
    let api = server.api_base();
    for (split, limit, dir) in [
        (
            "train",
            plan.instruct_images,
            layout.instruct().join("train"),
        ),
        ("test", plan.bench_images, layout.instruct().join("test")),
    ] {
        let limit = limit.to_string();
        run_args(&args(&[
            "instruct",
            "--captions",
            &s(&paths.captions(split)),
            "--instances",
            &s(&paths.instances(split)),
            "--api-base",
            &api,
            "--model",
            TEACHER_MODEL,
            "--out",
            &s(&dir),
            "--limit",
            &limit,
            "--seed",
            &plan.seed.to_string(),
            "--no-progress",
        ]))?;
    }
    let stats = server.stats();
    report.teacher_requests = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    report.teacher_refused = stats.refused.load(std::sync::atomic::Ordering::Relaxed);
    server.stop()?;

    let data = layout.data();
    std::fs::create_dir_all(&data)?;
    let train = world::sample_split(&world_config(plan), "train");
    let test = world::sample_split(&world_config(plan), "test");
    let prompts = llava_instruct::PromptLibrary::builtin()?;
    let ordered = order_caption_records(&train, &prompts.detail_instructions, plan.seed ^ 0xd37a);
    write_records(&data.join("stage0.json"), &ordered)?;
    let scenes: Vec<_> = train.iter().map(|(s, _)| s.clone()).collect();
    let instruct: Vec<LlavaRecord> =
        llava_data::record::read_dataset(&layout.instruct().join("train/llava_instruct.json"))?;
    // Text-only probes about scenes given in words join stage 2, as LLaVA-1.5 mixes ShareGPT's
    // text-only conversations into its stage 2: they teach reading and answering.
    let text_scenes = &scenes[..scenes.len().min(plan.text_records)];
    let text = text_probe_records(text_scenes, plan.seed ^ 0x7e47, 0.5);
    let probes = probe_records(
        &scenes[..scenes.len().min(plan.probe_images)],
        plan.seed,
        0.5,
    );
    let mut stage2 = instruct.clone();
    stage2.extend(probes.iter().cloned());
    stage2.extend(text.iter().cloned());
    write_records(&data.join("stage2.json"), &stage2)?;
    let test_scenes: Vec<_> = test.iter().map(|(s, _)| s.clone()).collect();
    let bench = benchmark(&test_scenes, plan.seed ^ 0x7e57);
    write(&data.join("bench_short.jsonl"), &jsonl(&bench.short))?;
    write(&data.join("bench_mc.jsonl"), &jsonl(&bench.mc))?;
    write(&data.join("bench_words.jsonl"), &jsonl(&bench.in_words))?;
    report.datasets = vec![
        (
            "left-to-right captions (stages 0 and 1)".into(),
            ordered.len(),
        ),
        ("text-only question records (stage 2)".into(), text.len()),
        ("teacher instruction data".into(), instruct.len()),
        ("short-answer / multiple-choice probes".into(), probes.len()),
        ("benchmark questions (per form)".into(), bench.short.len()),
    ];
    eprintln!(
        "{} left-to-right captions (stages 0 and 1), {} instruction records + {} probe records + {} text question records (stage 2), {} benchmark questions",
        ordered.len(),
        instruct.len(),
        probes.len(),
        text.len(),
        bench.short.len()
    );
    Ok(())
}

/// Step 3: The world's tokenizer and a random-weight model of the demo's shape.
pub fn init(plan: &Plan, layout: &Layout, _: &mut ReportBuilder) -> Result<()> {
    let dir = layout.init();
    if dir.join("done").exists() {
        eprintln!("model already initialised");
        return Ok(());
    }
    let mut texts: Vec<String> = Vec::new();
    let mut stage2_records = 0;
    for f in ["stage0.json", "stage2.json"] {
        let records = llava_data::record::read_dataset(&layout.data().join(f))?;
        if f == "stage2.json" {
            stage2_records = records.len();
        }
        texts.extend(
            records
                .into_iter()
                .flat_map(|r| r.conversations)
                .map(|t| t.value),
        );
    }
    // The words stage 2's template adds to every sample, as often as it adds them, so that
    // its system prompt gets whole-word tokens rather than letters.
    texts.extend(std::iter::repeat_n(
        format!(
            "{} USER: ASSISTANT:",
            llava_data::conversation::VICUNA_SYSTEM
        ),
        stage2_records,
    ));
    let tokenizer = train_tokenizer(texts.iter().map(String::as_str), plan.vocab_size)?;
    let config = llava_model::init::demo_config(
        &plan.model,
        tokenizer.get_vocab_size(true),
        IMAGE_TOKEN_INDEX,
        PAD_TOKEN_ID,
    );
    llava_model::init::write_random_checkpoint(&config, &dir, DType::F32, plan.seed)?;
    save_tokenizer(&tokenizer, &dir, config.text_config.max_position_embeddings)?;
    // No chat template: llava-rs then uses llava_v1, the template stage 2 trains with.
    let template = dir.join("chat_template.jinja");
    if template.exists() {
        std::fs::remove_file(&template)?;
    }
    write(&dir.join("done"), "")?;
    eprintln!(
        "vocabulary of {} tokens; model written to {}",
        tokenizer.get_vocab_size(true),
        dir.display()
    );
    Ok(())
}

/// Runs one `llava train`, resuming from the stage's last checkpoint when one exists.
fn train_stage(
    name: &str,
    output: &Path,
    mut train_args: Vec<String>,
    report: &mut ReportBuilder,
) -> Result<()> {
    if !output.join("trainer_state.json").exists() {
        match last_checkpoint(output)? {
            Some(ckpt) => {
                eprintln!("resuming {name} from {}", ckpt.display());
                train_args.extend(["--resume".into(), s(&ckpt)]);
            }
            None if output.exists() => std::fs::remove_dir_all(output)
                .with_context(|| format!("clearing the unfinished {}", output.display()))?,
            None => {}
        }
        eprintln!("llava {}", train_args.join(" "));
        run_args(&train_args)?;
    } else {
        eprintln!("{name} already trained");
    }
    let command = format!("llava {}", train_args.join(" "));
    report
        .stages
        .push(StageReport::read(name, output, command)?);
    Ok(())
}

fn last_checkpoint(output: &Path) -> Result<Option<PathBuf>> {
    let Ok(entries) = std::fs::read_dir(output) else {
        return Ok(None);
    };
    let mut best: Option<(u64, PathBuf)> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(n) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse::<u64>().ok())
            && best.as_ref().is_none_or(|(b, _)| n > *b)
        {
            best = Some((n, e.path()));
        }
    }
    Ok(best.map(|(_, p)| p))
}

#[allow(clippy::too_many_arguments)]
fn stage_args(
    stage: &str,
    model: &Path,
    data: &Path,
    layout: &Layout,
    output: &Path,
    p: &super::plan::StagePlan,
    seed: u64,
    extra: &[&str],
) -> Vec<String> {
    let save = (p.steps / 4).max(1).to_string();
    let mut a = args(&[
        "train",
        "--stage",
        stage,
        "--model",
        &s(model),
        "--data",
        &s(data),
        "--image-folder",
        &s(&layout.images()),
        "--output",
        &s(output),
        "--max-steps",
        &p.steps.to_string(),
        "--batch-size",
        &p.batch_size.to_string(),
        "--lr",
        &format!("{:e}", p.lr),
        "--warmup-ratio",
        "0.05",
        "--save-steps",
        &save,
        "--seed",
        &seed.to_string(),
        "--max-length",
        "512",
    ]);
    a.extend(extra.iter().map(|e| e.to_string()));
    a
}

/// Step 5: Stage 0, standing in for the language prior that Vicuna brings: behind the tower of
/// stage 0a (frozen unless the plan says otherwise), the projector and decoder learn to name the
/// objects of each picture left to right. The `plain` template keeps the samples short
/// (picture, then caption), so more pictures fit in the budget. Its projector is then thrown
/// away, so that stage 1 aligns a fresh one.
pub fn stage0(plan: &Plan, layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let out = layout.stage(0);
    let mut extra = vec!["--template", "plain"];
    if plan.stage0_unfreeze_vision {
        extra.push("--unfreeze-vision");
    }
    let a = stage_args(
        "finetune",
        &layout.tower(),
        &layout.data().join("stage0.json"),
        layout,
        &out,
        &plan.stage0,
        plan.seed,
        &extra,
    );
    train_stage(
        "stage 0: decoder pretraining (left-to-right captions)",
        &out,
        a,
        report,
    )?;
    let fresh = layout.data().join("projector_fresh.safetensors");
    if !fresh.exists() {
        write_fresh_projector(&out, &fresh, plan.seed ^ 0xf00d)?;
    }
    Ok(())
}

/// Random projector weights for the checkpoint in `dir`.
fn write_fresh_projector(dir: &Path, path: &Path, seed: u64) -> Result<()> {
    let checkpoint = llava_model::Checkpoint::open(&s(dir), None)?;
    let weights = llava_model::weights::Weights::random(DType::F32, Device::Cpu, seed, 0.02);
    Llava::load(&checkpoint.config, &weights)?;
    let tensors: Vec<_> = weights
        .take_random()
        .into_iter()
        .filter(|(n, _)| n.starts_with("multi_modal_projector."))
        .collect();
    if tensors.is_empty() {
        bail!("the demo model has no projector weights");
    }
    llava_model::save::write_tensors_file(path, &tensors)?;
    Ok(())
}

/// Step 6: Stage 1, feature alignment: only the fresh projector trains, with LLaVA-1.5's `plain`
/// template (picture, then caption), on the left-to-right captions the decoder learned to write
/// in stage 0. On the world's human-style captions behind llava_v1 instructions, text the
/// decoder never learned, the loss stayed at 3.5 and the projector learned their wording
/// instead of the alignment: stage 2 then read colour at chance (BENCHMARKS.md).
pub fn stage1(plan: &Plan, layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let out = layout.stage(1);
    let fresh = s(&layout.data().join("projector_fresh.safetensors"));
    let a = stage_args(
        "pretrain",
        &layout.stage(0),
        &layout.data().join("stage0.json"),
        layout,
        &out,
        &plan.stage1,
        plan.seed,
        &["--projector", &fresh, "--template", "plain"],
    );
    train_stage("stage 1: feature alignment (projector)", &out, a, report)
}

/// Step 7: Stage 2, visual instruction tuning: projector and decoder on the teacher's data, the
/// probes and the text-only questions, the tower frozen. Batches hold one modality and similar
/// lengths, as LLaVA-1.5 trains its mixture.
pub fn stage2(plan: &Plan, layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let out = layout.stage(2);
    let a = stage_args(
        "finetune",
        &layout.stage(1),
        &layout.data().join("stage2.json"),
        layout,
        &out,
        &plan.stage2,
        plan.seed,
        &["--group-by-modality-length"],
    );
    train_stage(
        "stage 2: instruction tuning (projector + decoder)",
        &out,
        a,
        report,
    )
}

/// Step 8: Short-answer and multiple-choice accuracy before and after stage 2, judged answers and
/// sample chats.
pub fn eval(_plan: &Plan, layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let dir = layout.eval();
    std::fs::create_dir_all(&dir)?;
    stage0_captions(layout, report)?;
    for (model_name, tag, model, forms) in [
        (
            "before stage 2",
            "stage1",
            layout.stage(1),
            &["short", "mc"][..],
        ),
        // The words form goes to the final model only: before stage 2 the model only captions.
        (
            "after stage 2",
            "stage2",
            layout.stage(2),
            &["short", "mc", "words"][..],
        ),
    ] {
        for &form in forms {
            let questions = layout.data().join(format!("bench_{form}.jsonl"));
            let answers = dir.join(format!("{tag}_{form}_answers.jsonl"));
            let sub = if form == "mc" { "mc" } else { "vqa" };
            run_args(&args(&[
                "eval",
                sub,
                "--model",
                &s(&model),
                "--questions",
                &s(&questions),
                "--image-folder",
                &s(&layout.images()),
                "--out",
                &s(&answers),
                "--max-new-tokens",
                "8",
                "--json",
            ]))?;
            let found = llava_eval::jsonl::read_answers(&answers)?;
            let summary = if form == "mc" {
                let qs = llava_eval::mc::read_mc_questions(&questions)?;
                llava_eval::mc::score_answers(&qs, &found).0
            } else {
                let qs = llava_eval::vqa::read_vqa_questions(&questions)?;
                llava_eval::vqa::score_vqa(&qs, &found).0
            };
            report.add_accuracy(model_name, form, &summary);
        }
    }
    judge(layout, report)?;
    sample_chats(layout, report)
}

/// Stage 0's captions of the held-out pictures, scored against their scenes: whether the tower
/// learned to see before its projector was replaced.
fn stage0_captions(layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let dir = layout.eval();
    let test = world::read_scenes(&WorldPaths::new(layout.world()).scenes("test"))?;
    let questions: String = test
        .iter()
        .map(|scene| {
            format!(
                "{}\n",
                serde_json::json!({"question_id": caption_id(scene), "image": scene.file_name,
                                   "text": "Describe the image in detail.", "category": "caption"})
            )
        })
        .collect();
    let qf = dir.join("stage0_caption_questions.jsonl");
    write(&qf, &questions)?;
    let answers = dir.join("stage0_captions.jsonl");
    eval_answer(
        layout,
        &layout.stage(0),
        &qf,
        &answers,
        60,
        &["--template", "plain"],
    )?;
    let found = llava_eval::jsonl::read_answers(&answers)?;
    let mut score = llava_demo::caption_check::CaptionScore::default();
    for scene in &test {
        if let Some(a) = found.get(&llava_eval::jsonl::QuestionId::Str(caption_id(scene))) {
            score.add(scene, &a.text);
        }
    }
    report.stage0_captions = Some(score);
    Ok(())
}

/// `llava eval answer` with `model` on the demo's pictures.
fn eval_answer(
    layout: &Layout,
    model: &Path,
    questions: &Path,
    answers: &Path,
    max_new_tokens: usize,
    extra: &[&str],
) -> Result<()> {
    let max_new_tokens = max_new_tokens.to_string();
    let mut a = args(&[
        "eval",
        "answer",
        "--model",
        &s(model),
        "--questions",
        &s(questions),
        "--image-folder",
        &s(&layout.images()),
        "--out",
        &s(answers),
        "--max-new-tokens",
        &max_new_tokens,
    ]);
    a.extend(extra.iter().map(|e| e.to_string()));
    run_args(&a)
}

fn caption_id(scene: &world::Scene) -> String {
    format!("{}_caption", scene.id)
}

/// The LLaVA-Bench-style set: the teacher's first question about each held-out image it
/// described, its own answer as the reference, the final model's answer, and the offline
/// teacher as the judge.
fn judge(layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let dir = layout.eval();
    let paths = WorldPaths::new(layout.world());
    let coco = paths.coco("test").load()?;
    let (mut questions, mut references, mut context) =
        (String::new(), String::new(), String::new());
    for category in ["conversation", "detail", "complex"] {
        let file = layout.instruct().join(format!("test/{category}.jsonl"));
        for r in llava_data::record::read_dataset(&file)? {
            let (Some(image), [q, a, ..]) = (&r.image, r.conversations.as_slice()) else {
                continue;
            };
            let id = format!("{}_{category}", r.id_string());
            let text = q.value.replace("<image>", "").trim().to_string();
            questions.push_str(&format!(
                "{}\n",
                serde_json::json!({"question_id": id, "image": image, "text": text, "category": category})
            ));
            references.push_str(&format!(
                "{}\n",
                serde_json::json!({"question_id": id, "text": a.value, "model_id": "teacher"})
            ));
        }
    }
    for e in &coco {
        let instances: Vec<_> = e
            .boxes
            .iter()
            .map(|b| serde_json::json!({"category": b.category, "bbox": b.bbox}))
            .collect();
        context.push_str(&format!(
            "{}\n",
            serde_json::json!({"image": e.image, "width": e.width, "height": e.height,
                               "captions": e.captions, "instances": instances})
        ));
    }
    let (qf, rf, cf) = (
        dir.join("bench_questions.jsonl"),
        dir.join("bench_reference.jsonl"),
        dir.join("bench_context.jsonl"),
    );
    write(&qf, &questions)?;
    write(&rf, &references)?;
    write(&cf, &context)?;
    let answers = dir.join("bench_answers.jsonl");
    eval_answer(layout, &layout.stage(2), &qf, &answers, 160, &[])?;
    let server = TeacherServer::start(&ServerConfig::default())?;
    let reviews = dir.join("bench_reviews.jsonl");
    run_args(&args(&[
        "eval",
        "judge",
        "--questions",
        &s(&qf),
        "--context",
        &s(&cf),
        "--reference",
        &s(&rf),
        "--answers",
        &s(&answers),
        "--out",
        &s(&reviews),
        "--api-base",
        &server.api_base(),
        "--model",
        TEACHER_MODEL,
    ]))?;
    server.stop()?;
    let file = llava_eval::review::read_reviews(&reviews)?;
    report.judge = Some(serde_json::to_value(llava_eval::review::summarize(
        &file.records,
    ))?);
    Ok(())
}

/// Three held-out images, each with a short multi-turn chat with the final model.
fn sample_chats(layout: &Layout, report: &mut ReportBuilder) -> Result<()> {
    let test = world::read_scenes(&WorldPaths::new(layout.world()).scenes("test"))?;
    let pipeline = llava_model::pipeline::Pipeline::load(
        &llava_model::pipeline::PipelineOptions::new(s(&layout.stage(2))),
    )?;
    let questions = [
        "Describe the image in detail.",
        "How many shapes are there?",
        "Which shape is furthest to the left?",
    ];
    for scene in test.iter().take(3) {
        let image = layout.images().join(&scene.file_name);
        let pixels = pipeline.pixel_values(std::slice::from_ref(&image))?;
        let mut messages = Vec::new();
        let mut turns = Vec::new();
        // As `llava chat` does: each turn prefills only what the conversation adds.
        let mut cache = llava_model::prompt_cache::PromptCache::new();
        for q in questions {
            let images = usize::from(messages.is_empty());
            messages.push(llava_data::conversation::Message::user(q, images));
            let prompt = pipeline.render(&messages)?;
            let ids = pipeline.encode(&prompt, pixels.as_ref())?;
            let out = pipeline.generate_with_cache(
                &mut cache,
                &ids,
                pixels.as_ref(),
                &Default::default(),
                160,
                &[],
                |_| {},
            )?;
            let answer = out.text.trim().to_string();
            messages.push(llava_data::conversation::Message::assistant(answer.clone()));
            turns.push((q.to_string(), answer));
        }
        report.samples.push(SampleChat {
            image: scene.file_name.clone(),
            turns,
        });
    }
    Ok(())
}
