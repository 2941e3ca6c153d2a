//! Prompt sets: for each teacher type a system message and few-shot examples, plus the
//! instruction paraphrase lists of the detail and brief types.
//!
//! Layout (the built-in set is in `crates/llava-instruct/prompts/`, embedded at build time):
//!
//! ```text
//! DIR/conversation/system.txt
//! DIR/conversation/fewshot_001_context.txt   DIR/conversation/fewshot_001_reply.txt
//! DIR/conversation/fewshot_002_context.txt   ...
//! DIR/detail/...        DIR/complex/...      (same files)
//! DIR/detail_instructions.txt                one instruction per line
//! DIR/brief_instructions.txt                 one instruction per line
//! ```
//!
//! With `--prompts DIR`, each type folder present in DIR replaces that type's whole set
//! (a requested type without its folder is an error), and each instruction list present
//! replaces the built-in list. Examples are used in the order of their number. Every
//! `fewshot_N_context.txt` needs its `fewshot_N_reply.txt` and the other way round.
//!
//! The messages are: system, then each example as a user/assistant pair, then the query
//! context as the last user message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::client::ChatMessage;
use crate::error::InstructError;
use crate::types::InstructType;

macro_rules! builtin {
    ($($p:literal),* $(,)?) => {
        &[$(($p, include_str!(concat!("../prompts/", $p)))),*]
    };
}

/// The built-in prompt files as (relative path, contents).
pub const BUILTIN_FILES: &[(&str, &str)] = builtin![
    "conversation/system.txt",
    "conversation/fewshot_001_context.txt",
    "conversation/fewshot_001_reply.txt",
    "conversation/fewshot_002_context.txt",
    "conversation/fewshot_002_reply.txt",
    "detail/system.txt",
    "detail/fewshot_001_context.txt",
    "detail/fewshot_001_reply.txt",
    "detail/fewshot_002_context.txt",
    "detail/fewshot_002_reply.txt",
    "complex/system.txt",
    "complex/fewshot_001_context.txt",
    "complex/fewshot_001_reply.txt",
    "complex/fewshot_002_context.txt",
    "complex/fewshot_002_reply.txt",
    "detail_instructions.txt",
    "brief_instructions.txt",
];

/// One few-shot example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub context: String,
    pub reply: String,
}

/// A system message and its examples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptSet {
    pub system: String,
    pub examples: Vec<Example>,
}

impl PromptSet {
    /// The messages sent for a query context.
    pub fn messages(&self, context: &str) -> Vec<ChatMessage> {
        let mut m = Vec::with_capacity(2 + 2 * self.examples.len());
        m.push(ChatMessage::system(self.system.clone()));
        for ex in &self.examples {
            m.push(ChatMessage::user(ex.context.clone()));
            m.push(ChatMessage::assistant(ex.reply.clone()));
        }
        m.push(ChatMessage::user(context.to_string()));
        m
    }
}

/// All prompt material of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptLibrary {
    pub conversation: PromptSet,
    pub detail: PromptSet,
    pub complex: PromptSet,
    pub detail_instructions: Vec<String>,
    pub brief_instructions: Vec<String>,
}

fn instruction_list(text: &str, origin: &Path) -> Result<Vec<String>, InstructError> {
    let list: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    if list.is_empty() {
        return Err(InstructError::Prompts {
            path: origin.to_path_buf(),
            message: "instruction list is empty".into(),
        });
    }
    Ok(list)
}

/// Builds a prompt set from the files of one type folder, given as (file name, contents).
fn prompt_set(files: &[(String, String)], origin: &Path) -> Result<PromptSet, InstructError> {
    let err = |message: String| InstructError::Prompts {
        path: origin.to_path_buf(),
        message,
    };
    let mut system = None;
    let mut contexts: BTreeMap<u32, String> = BTreeMap::new();
    let mut replies: BTreeMap<u32, String> = BTreeMap::new();
    for (name, text) in files {
        if name == "system.txt" {
            system = Some(text.trim().to_string());
            continue;
        }
        let Some(rest) = name.strip_prefix("fewshot_") else {
            continue;
        };
        let (num, kind) = match rest.split_once('_') {
            Some((n, k)) => (n, k),
            None => return Err(err(format!("unexpected file name `{name}`"))),
        };
        let n: u32 = num
            .parse()
            .map_err(|_| err(format!("`{name}`: `{num}` is not an example number")))?;
        let text = text.trim().to_string();
        if text.is_empty() {
            return Err(err(format!("`{name}` is empty")));
        }
        match kind {
            "context.txt" => contexts.insert(n, text),
            "reply.txt" => replies.insert(n, text),
            _ => return Err(err(format!("unexpected file name `{name}`"))),
        };
    }
    let system = system
        .filter(|s| !s.is_empty())
        .ok_or_else(|| err("missing or empty system.txt".into()))?;
    let mut examples = Vec::new();
    for (n, context) in contexts {
        let reply = replies
            .remove(&n)
            .ok_or_else(|| err(format!("example {n:03} has a context but no reply")))?;
        examples.push(Example { context, reply });
    }
    if let Some(n) = replies.keys().next() {
        return Err(err(format!("example {n:03} has a reply but no context")));
    }
    Ok(PromptSet { system, examples })
}

fn builtin_type_files(ty: InstructType) -> Vec<(String, String)> {
    let prefix = format!("{}/", ty.name());
    BUILTIN_FILES
        .iter()
        .filter_map(|(p, t)| {
            p.strip_prefix(prefix.as_str())
                .map(|n| (n.to_string(), t.to_string()))
        })
        .collect()
}

fn builtin_file(name: &str) -> &'static str {
    BUILTIN_FILES
        .iter()
        .find(|(p, _)| *p == name)
        .map(|(_, t)| *t)
        .unwrap_or("")
}

fn read_type_dir(dir: &Path) -> Result<Vec<(String, String)>, InstructError> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).map_err(InstructError::io(dir))? {
        let e = e.map_err(InstructError::io(dir))?;
        let path = e.path();
        if !path.is_file() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "system.txt" || (name.starts_with("fewshot_") && name.ends_with(".txt")) {
            let text = std::fs::read_to_string(&path).map_err(InstructError::io(&path))?;
            files.push((name, text));
        }
    }
    Ok(files)
}

impl PromptLibrary {
    /// The built-in prompts.
    pub fn builtin() -> Result<Self, InstructError> {
        let origin = PathBuf::from("<built-in>");
        Ok(PromptLibrary {
            conversation: prompt_set(&builtin_type_files(InstructType::Conversation), &origin)?,
            detail: prompt_set(&builtin_type_files(InstructType::Detail), &origin)?,
            complex: prompt_set(&builtin_type_files(InstructType::Complex), &origin)?,
            detail_instructions: instruction_list(
                builtin_file("detail_instructions.txt"),
                &origin,
            )?,
            brief_instructions: instruction_list(builtin_file("brief_instructions.txt"), &origin)?,
        })
    }

    /// The built-in prompts with whatever `dir` provides replacing them. Each type in
    /// `required` must have its folder in `dir`.
    pub fn load(dir: &Path, required: &[InstructType]) -> Result<Self, InstructError> {
        if !dir.is_dir() {
            return Err(InstructError::Prompts {
                path: dir.to_path_buf(),
                message: "not a folder".into(),
            });
        }
        let mut lib = Self::builtin()?;
        for ty in InstructType::TEACHER {
            let sub = dir.join(ty.name());
            if sub.is_dir() {
                let set = prompt_set(&read_type_dir(&sub)?, &sub)?;
                *lib.set_mut(ty) = set;
                tracing::info!(type = %ty, path = %sub.display(), "using custom prompt set");
            } else if required.contains(&ty) {
                return Err(InstructError::Prompts {
                    path: dir.to_path_buf(),
                    message: format!(
                        "has no `{}` folder, needed for the requested types",
                        ty.name()
                    ),
                });
            }
        }
        for (name, slot) in [
            ("detail_instructions.txt", &mut lib.detail_instructions),
            ("brief_instructions.txt", &mut lib.brief_instructions),
        ] {
            let p = dir.join(name);
            if p.is_file() {
                let text = std::fs::read_to_string(&p).map_err(InstructError::io(&p))?;
                *slot = instruction_list(&text, &p)?;
            }
        }
        Ok(lib)
    }

    /// The prompt set of a teacher type; `None` for `brief`.
    pub fn set(&self, ty: InstructType) -> Option<&PromptSet> {
        match ty {
            InstructType::Conversation => Some(&self.conversation),
            InstructType::Detail => Some(&self.detail),
            InstructType::Complex => Some(&self.complex),
            InstructType::Brief => None,
        }
    }

    fn set_mut(&mut self, ty: InstructType) -> &mut PromptSet {
        match ty {
            InstructType::Conversation => &mut self.conversation,
            InstructType::Detail => &mut self.detail,
            // Brief has no set; callers only pass teacher types.
            InstructType::Complex | InstructType::Brief => &mut self.complex,
        }
    }
}

/// Writes the built-in prompt files under `dir` (for users to edit), refusing to overwrite.
pub fn export_builtin(dir: &Path) -> Result<Vec<PathBuf>, InstructError> {
    let mut written = Vec::new();
    for (rel, _) in BUILTIN_FILES {
        let p = dir.join(rel);
        if p.exists() {
            return Err(InstructError::InvalidArgument(format!(
                "{} already exists; not overwriting",
                p.display()
            )));
        }
    }
    for (rel, text) in BUILTIN_FILES {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(InstructError::io(parent))?;
        }
        std::fs::write(&p, text).map_err(InstructError::io(&p))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Role;

    #[test]
    fn builtin_sets_are_complete() {
        let lib = PromptLibrary::builtin().unwrap();
        for ty in InstructType::TEACHER {
            let s = lib.set(ty).unwrap();
            assert!(s.examples.len() >= 2, "{ty}");
            assert!(
                s.system.contains("caption"),
                "{ty}: the system message must forbid mentioning captions"
            );
        }
        assert_eq!(lib.detail_instructions.len(), 16);
        assert_eq!(lib.brief_instructions.len(), 11);
        // the few-shot replies must themselves pass our reply checks
        for ty in InstructType::TEACHER {
            for ex in &lib.set(ty).unwrap().examples {
                assert!(
                    crate::parse::check_leaks(&ex.reply).is_ok(),
                    "{ty}: {}",
                    ex.reply
                );
            }
        }
        for ex in &lib.conversation.examples {
            assert!(
                !ex.context.contains('['),
                "conversation examples see captions only"
            );
        }
    }

    #[test]
    fn message_order() {
        let lib = PromptLibrary::builtin().unwrap();
        let m = lib.detail.messages("CTX");
        assert_eq!(m.len(), 2 + 2 * lib.detail.examples.len());
        assert_eq!(m[0].role, Role::System);
        assert_eq!(m[1].role, Role::User);
        assert_eq!(m[1].content, lib.detail.examples[0].context);
        assert_eq!(m[2].role, Role::Assistant);
        assert_eq!(m.last().unwrap().role, Role::User);
        assert_eq!(m.last().unwrap().content, "CTX");
    }

    #[test]
    fn custom_dir_replaces_and_validates() {
        let d = tempfile::tempdir().unwrap();
        let conv = d.path().join("conversation");
        std::fs::create_dir_all(&conv).unwrap();
        std::fs::write(conv.join("system.txt"), "SYS\n").unwrap();
        std::fs::write(conv.join("fewshot_010_context.txt"), "c10").unwrap();
        std::fs::write(conv.join("fewshot_010_reply.txt"), "r10").unwrap();
        std::fs::write(conv.join("fewshot_002_context.txt"), "c2").unwrap();
        std::fs::write(conv.join("fewshot_002_reply.txt"), "r2").unwrap();
        std::fs::write(
            d.path().join("brief_instructions.txt"),
            "# comment\nOne.\n\nTwo.\n",
        )
        .unwrap();
        let lib = PromptLibrary::load(d.path(), &[InstructType::Conversation]).unwrap();
        assert_eq!(lib.conversation.system, "SYS");
        let ctx: Vec<&str> = lib
            .conversation
            .examples
            .iter()
            .map(|e| e.context.as_str())
            .collect();
        assert_eq!(ctx, vec!["c2", "c10"]);
        assert_eq!(lib.brief_instructions, vec!["One.", "Two."]);
        assert_eq!(lib.detail, PromptLibrary::builtin().unwrap().detail);

        // a requested type without its folder
        let err = PromptLibrary::load(d.path(), &[InstructType::Detail]).unwrap_err();
        assert!(err.to_string().contains("detail"), "{err}");

        // unpaired example
        std::fs::remove_file(conv.join("fewshot_002_reply.txt")).unwrap();
        let err = PromptLibrary::load(d.path(), &[]).unwrap_err();
        assert!(err.to_string().contains("no reply"), "{err}");
    }

    #[test]
    fn export_roundtrips() {
        let d = tempfile::tempdir().unwrap();
        let files = export_builtin(d.path()).unwrap();
        assert_eq!(files.len(), BUILTIN_FILES.len());
        let lib = PromptLibrary::load(d.path(), &InstructType::TEACHER).unwrap();
        assert_eq!(lib, PromptLibrary::builtin().unwrap());
        assert!(export_builtin(d.path()).is_err(), "must not overwrite");
    }
}
