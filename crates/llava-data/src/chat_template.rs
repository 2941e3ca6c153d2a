//! The checkpoint's own Jinja chat template, rendered with minijinja as transformers renders it
//! (`apply_chat_template` with `add_generation_prompt`).

use std::path::{Path, PathBuf};

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::conversation::{Message, Role};
use crate::tokenizer::read_optional_json;

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("chat template from {path}: {message}")]
    Render { path: PathBuf, message: String },
}

/// Template instructions one rendering may run: real chat templates take a few hundred per
/// message, and this many take seconds.
const TEMPLATE_FUEL: u64 = 50_000_000;

/// A Jinja chat template and where it came from (for error messages).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: PathBuf,
    pub template: String,
}

/// transformers' message shape: `content` is a list of `{"type": "image"}` / `{"type": "text"}`.
#[derive(Serialize)]
struct HfMessage {
    role: &'static str,
    content: Vec<HfContent>,
}

#[derive(Serialize)]
struct HfContent {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<String>,
}

impl ChatTemplate {
    /// Looks where transformers writes chat templates, newest convention first:
    /// `chat_template.jinja`, `chat_template.json`, `processor_config.json`, `tokenizer_config.json`.
    pub fn find(dir: &Path) -> Result<Option<Self>, TemplateError> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let template = std::fs::read_to_string(&jinja).map_err(|e| TemplateError::Load {
                path: jinja.clone(),
                message: e.to_string(),
            })?;
            return Ok(Some(Self {
                source: jinja,
                template,
            }));
        }
        for name in [
            "chat_template.json",
            "processor_config.json",
            "tokenizer_config.json",
        ] {
            let path = dir.join(name);
            let json = read_optional_json(&path).map_err(|e| TemplateError::Load {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let Some(json) = json else { continue };
            let bad = |message: &str| TemplateError::Load {
                path: path.clone(),
                message: message.into(),
            };
            match json.get("chat_template") {
                Some(value) => {
                    let template = template_from_json(value).ok_or_else(|| {
                        bad("`chat_template` is neither a string nor a list of {name, template}")
                    })?;
                    return Ok(Some(Self {
                        source: path,
                        template,
                    }));
                }
                // The file exists for its template alone.
                None if name == "chat_template.json" => {
                    return Err(bad("has no `chat_template` key"));
                }
                None => {}
            }
        }
        Ok(None)
    }

    /// Renders the conversation. Images become `{"type": "image"}` parts before the text, as
    /// transformers' processors build them.
    pub fn render(
        &self,
        messages: &[Message],
        bos_token: &str,
        eos_token: &str,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        let render_err = |e: JinjaError| TemplateError::Render {
            path: self.source.clone(),
            message: e.to_string(),
        };
        let mut env = Environment::new();
        // A template that loops for ever (or for hours) fails instead of hanging the caller.
        env.set_fuel(Some(TEMPLATE_FUEL));
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // transformers compiles chat templates with trim_blocks and lstrip_blocks.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(render_err)?;
        env.set_syntax(syntax);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, JinjaError> {
                Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let source = strip_generation_tags(&self.template);
        env.add_template("chat", &source).map_err(render_err)?;
        let hf: Vec<HfMessage> = messages
            .iter()
            .map(|m| HfMessage {
                role: match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                },
                content: std::iter::repeat_with(|| HfContent {
                    kind: "image",
                    text: None,
                })
                .take(m.images)
                .chain(std::iter::once(HfContent {
                    kind: "text",
                    text: Some(m.text.clone()),
                }))
                .collect(),
            })
            .collect();
        let tmpl = env.get_template("chat").map_err(render_err)?;
        tmpl.render(context! {
            messages => minijinja::Value::from(minijinja::value::Serde(&hf)),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token,
            eos_token => eos_token,
        })
        .map_err(render_err)
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which `default` is used.
fn template_from_json(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items
            .iter()
            .find(|i| i.get("name").and_then(Value::as_str) == Some("default"))
            .or_else(|| items.first())
            .and_then(|i| i.get("template"))
            .and_then(Value::as_str)
            .map(String::from),
        _ => None,
    }
}

/// transformers' `{% generation %}` extension only marks assistant text for masks; for
/// rendering it is a no-op, so the tags are dropped.
fn strip_generation_tags(t: &str) -> String {
    let mut out = t.to_string();
    for tag in ["generation", "endgeneration"] {
        for (open, close) in [("{%", "%}"), ("{%-", "-%}"), ("{%-", "%}"), ("{%", "-%}")] {
            out = out.replace(&format!("{open} {tag} {close}"), "");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of the llava-1.5 template that llava-hf checkpoints ship (written here from
    /// its documented output, `USER: <image>\n{q} ASSISTANT:`).
    const LLAVA15: &str = "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{% if message['role'] != 'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

    #[test]
    fn renders_the_llava15_template() {
        let t = ChatTemplate {
            source: "test".into(),
            template: LLAVA15.into(),
        };
        let s = t
            .render(&[Message::user("What is shown?", 1)], "<s>", "</s>", true)
            .expect("renders");
        assert_eq!(s, "USER: <image>\nWhat is shown? ASSISTANT:");
        let s = t
            .render(
                &[
                    Message::user("Q", 1),
                    Message::assistant("A"),
                    Message::user("Q2", 0),
                ],
                "<s>",
                "</s>",
                true,
            )
            .expect("renders");
        assert_eq!(s, "USER: <image>\nQ ASSISTANT: A USER: Q2 ASSISTANT:");
    }

    #[test]
    fn raise_exception_is_a_render_error() {
        let t = ChatTemplate {
            source: "x.jinja".into(),
            template: "{{ raise_exception('only user turns') }}".into(),
        };
        let e = t.render(&[], "", "", true).expect_err("raises");
        assert!(e.to_string().contains("only user turns"), "{e}");
    }

    #[test]
    fn a_template_that_runs_for_ever_fails() {
        let t = ChatTemplate {
            source: "slow.jinja".into(),
            template: "{% for i in range(10000) %}{% for j in range(10000) %}{% for k in range(10) %}{% endfor %}{% endfor %}{% endfor %}".into(),
        };
        let e = t.render(&[], "", "", true).expect_err("out of fuel");
        assert!(e.to_string().contains("slow.jinja"), "{e}");
    }

    /// A `chat_template` of the wrong type is an error, not a silent fall-back to a built-in
    /// template.
    #[test]
    fn a_malformed_chat_template_key_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"chat_template": 5}"#,
        )
        .expect("write");
        let e = ChatTemplate::find(dir.path()).expect_err("not a template");
        assert!(
            e.to_string().contains("tokenizer_config.json")
                && e.to_string().contains("chat_template"),
            "{e}"
        );
        std::fs::write(dir.path().join("chat_template.json"), r#"{"foo": "bar"}"#).expect("write");
        let e = ChatTemplate::find(dir.path()).expect_err("no key");
        assert!(e.to_string().contains("chat_template.json"), "{e}");
    }

    #[test]
    fn list_form_picks_default() {
        let v: Value = serde_json::from_str(
            r#"[{"name": "tool_use", "template": "a"}, {"name": "default", "template": "b"}]"#,
        )
        .expect("json");
        assert_eq!(template_from_json(&v).as_deref(), Some("b"));
    }
}
