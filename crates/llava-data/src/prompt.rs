//! Choosing how a conversation becomes prompt text: the checkpoint's Jinja chat template, or a
//! named original-LLaVA template (`--conv-mode` / `--template`).

use std::path::Path;

use crate::chat_template::{ChatTemplate, TemplateError};
use crate::conversation::{ConvTemplate, Message};

#[derive(Debug, Clone)]
pub enum PromptTemplate {
    Chat(ChatTemplate),
    Named(ConvTemplate),
}

impl PromptTemplate {
    /// `name` wins when given; otherwise the checkpoint's chat template; otherwise `fallback`
    /// (the original layout ships no template and was trained with `llava_v1`).
    pub fn select(
        dir: &Path,
        name: Option<&str>,
        fallback: ConvTemplate,
    ) -> Result<Self, TemplateError> {
        if let Some(name) = name {
            return ConvTemplate::parse(name)
                .map(Self::Named)
                .map_err(|message| TemplateError::Load {
                    path: name.into(),
                    message,
                });
        }
        Ok(match ChatTemplate::find(dir)? {
            Some(t) => Self::Chat(t),
            None => Self::Named(fallback),
        })
    }

    pub fn render(
        &self,
        messages: &[Message],
        bos: &str,
        eos: &str,
        add_generation_prompt: bool,
    ) -> Result<String, TemplateError> {
        match self {
            Self::Chat(t) => t.render(messages, bos, eos, add_generation_prompt),
            Self::Named(t) => Ok(t.render(messages, eos, add_generation_prompt)),
        }
    }

    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self {
            Self::Chat(_) => &[],
            Self::Named(t) => t.stop_strings(),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Chat(t) => format!("chat template from {}", t.source.display()),
            Self::Named(t) => format!("named template {}", t.name()),
        }
    }
}
