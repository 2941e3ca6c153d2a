//! The crate's rooms import downward only: kernels, then config, then load, then model, then
//! generate (ARCHITECTURE.md). This reads every `crate::…` path in the sources, comments
//! aside, and fails on one that reaches a room above its own, or a path that names no room.

use std::path::{Path, PathBuf};

/// The rooms, lowest first; a file may use its own room and the ones before it. `error` is
/// everyone's.
const ROOMS: [&str; 6] = ["error", "kernels", "config", "load", "model", "generate"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/model/llava.rs` and `src/model.rs` are both in `model`.
fn room_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("a component");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// Every room named right after `crate::` in the code of `text`, with its line number.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        for (at, _) in code.match_indices("crate::") {
            let before = code[..at].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue; // `llava_crate::`, not ours
            }
            let rest = &code[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push((i + 1, name));
        }
    }
    found
}

#[test]
fn rooms_import_downward_only() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    files.sort();
    assert!(files.len() > 30, "found only {} sources", files.len());
    let mut wrong = Vec::new();
    for file in &files {
        let room = room_of(&src, file);
        if room == "lib" {
            continue; // the crate root declares the rooms and re-exports the old paths
        }
        let Some(level) = ROOMS.iter().position(|r| *r == room) else {
            wrong.push(format!("{}: not in a room", file.display()));
            continue;
        };
        let text = std::fs::read_to_string(file).expect("read source");
        for (line, target) in crate_paths(&text) {
            match ROOMS.iter().position(|r| *r == target) {
                Some(t) if t <= level || target == "error" => {}
                Some(_) => wrong.push(format!(
                    "{}:{line}: `{room}` imports `{target}`, a room above it",
                    file.display()
                )),
                None => wrong.push(format!(
                    "{}:{line}: `crate::{target}` names no room (use the room's path)",
                    file.display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "imports against the rooms:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_sees_a_wrong_import() {
    // The scanner itself: an upward import is found, a comment is not, a longer name is not.
    let text = "use crate::model::nn::Mode;\n// see crate::generate\nlet x = my_crate::y;\n";
    assert_eq!(crate_paths(text), vec![(1, "model".to_string())]);
}
