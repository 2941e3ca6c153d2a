//! The COCO-format fixtures (written by the project, 2014 and 2017 layouts) through the
//! source loader, the context formatter, the preview messages and a teacher-free run.

use std::path::PathBuf;

use llava_instruct::pipeline::{context_for, messages_for};
use llava_instruct::source::load_coco;
use llava_instruct::{InstructType, PromptLibrary, RunConfig, SourceSpec, run_blocking};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

#[test]
fn coco_2017_contexts() {
    let entries = load_coco(
        Some(&fixture("captions_train2017_mini.json")),
        Some(&fixture("instances_train2017_mini.json")),
    )
    .unwrap();
    let ids: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["000000000025", "000000000872", "000000001000"]);
    let giraffe = &entries[0];
    assert_eq!(giraffe.image, "000000000025.jpg");
    assert_eq!(
        context_for(giraffe, InstructType::Conversation),
        "A giraffe reaching up to eat from a tree.\n\
         A giraffe eating leaves from the top of a tree.\n\
         A tall giraffe stands next to a leafy tree in the sun."
    );
    assert_eq!(
        context_for(giraffe, InstructType::Detail),
        "A giraffe reaching up to eat from a tree.\n\
         A giraffe eating leaves from the top of a tree.\n\
         A tall giraffe stands next to a leafy tree in the sun.\n\
         giraffe: [0.602, 0.141, 0.938, 0.838]\n\
         giraffe: [0.083, 0.837, 0.289, 0.966]"
    );
    // portrait image, boxes in annotation-id order, crowd kept, exact duplicate dropped
    let street = &entries[1];
    assert_eq!(
        context_for(street, InstructType::Complex),
        "A man on a bicycle rides past a red bus.\n\
         A cyclist and a double decker bus on a city street.\n\
         person: [0.2, 0.391, 0.417, 0.906]\n\
         bicycle: [0.083, 0.469, 0.417, 0.969]\n\
         bus: [0.375, 0.156, 1, 0.781]"
    );
    // an image without instances gets captions only
    assert_eq!(
        context_for(&entries[2], InstructType::Detail),
        "Two kites fly over a grassy field."
    );
}

#[test]
fn preview_messages_are_system_examples_query() {
    let entries = SourceSpec {
        captions: Some(fixture("captions_train2017_mini.json")),
        instances: Some(fixture("instances_train2017_mini.json")),
        ..Default::default()
    }
    .load()
    .unwrap();
    let lib = PromptLibrary::builtin().unwrap();
    for ty in [
        InstructType::Conversation,
        InstructType::Detail,
        InstructType::Complex,
    ] {
        let m = messages_for(&entries[1], ty, &lib).unwrap();
        let set = lib.set(ty).unwrap();
        assert_eq!(m[0].content, set.system);
        assert_eq!(m.len(), 2 + 2 * set.examples.len());
        assert_eq!(m.last().unwrap().content, context_for(&entries[1], ty));
    }
    assert!(messages_for(&entries[1], InstructType::Brief, &lib).is_none());
}

#[test]
fn brief_baseline_over_coco_2014_captions_needs_no_teacher() {
    let entries = SourceSpec {
        captions: Some(fixture("captions_val2014_mini.json")),
        ..Default::default()
    }
    .load()
    .unwrap();
    assert_eq!(entries[0].image, "COCO_val2014_000000000042.jpg");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let mut cfg = RunConfig::new(vec![InstructType::Brief], &out);
    cfg.seed = 3;
    let lib = PromptLibrary::builtin().unwrap();
    let s = run_blocking(entries.clone(), lib.clone(), None, &cfg).unwrap();
    assert_eq!(s.written_total(), 3);
    assert_eq!(s.final_records, 3);
    let all: Vec<llava_data::record::LlavaRecord> =
        serde_json::from_slice(&std::fs::read(out.join("llava_instruct.json")).unwrap()).unwrap();
    for (r, e) in all.iter().zip(&entries) {
        assert_eq!(r.id, serde_json::json!(e.id));
        assert_eq!(r.conversations.len(), 2);
        let q = r.conversations[0].value.replace("<image>", "");
        assert!(lib.brief_instructions.iter().any(|i| i == q.trim()), "{q}");
        assert!(e.captions.contains(&r.conversations[1].value));
    }
    // teacher types without a teacher are refused up front
    let cfg = RunConfig::new(vec![InstructType::Detail], dir.path().join("o2"));
    assert!(run_blocking(entries, lib, None, &cfg).is_err());
}
