//! The named conversation templates of the original LLaVA (`--conv-mode`), for checkpoints
//! without a chat template and for training.
//!
//! A template renders a conversation as a list of [`Segment`]s, each either prompt text or an
//! assistant answer (with its end-of-turn marker). Inference joins them into one string;
//! training tokenises them one by one, so the label mask is derived from the same pieces as
//! the tokens and cannot drift from them.

use crate::record::IMAGE_PLACEHOLDER;

/// The system prompt of `llava_v1` and `llava_v0`: Vicuna's, reworded to say "human".
pub const VICUNA_SYSTEM: &str = "A chat between a curious human and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the human's questions.";

/// Vicuna v1.1's own system prompt, which says "user": `vicuna_v1`'s, with which LLaVA-1.5 was
/// fine-tuned (`--version v1`) and evaluated (`--conv-mode vicuna_v1`).
pub const VICUNA_V1_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// The LLaVA LLaMA-2 system prompt.
pub const LLAMA_2_SYSTEM: &str = "You are a helpful language and vision assistant. You are able to understand \
the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One message; `images` counts the images attached to it (rendered as `<image>`).
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub text: String,
    pub images: usize,
}

impl Message {
    pub fn user(text: impl Into<String>, images: usize) -> Self {
        Self {
            role: Role::User,
            text: text.into(),
            images,
        }
    }
    pub fn assistant(text: impl Into<String>) -> Self {
        Self {
            role: Role::Assistant,
            text: text.into(),
            images: 0,
        }
    }
    pub fn system(text: impl Into<String>) -> Self {
        Self {
            role: Role::System,
            text: text.into(),
            images: 0,
        }
    }

    /// The text with its images as `<image>\n` in front, as the original prepends them.
    fn text_with_images(&self) -> String {
        let mut s = String::new();
        for _ in 0..self.images {
            s.push_str(IMAGE_PLACEHOLDER);
            s.push('\n');
        }
        s.push_str(&self.text);
        s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    /// True for an assistant answer and its end-of-turn marker: the supervised part.
    pub supervised: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvTemplate {
    /// Vicuna v1: `{system} USER: {q} ASSISTANT: {a}</s>USER: …`
    LlavaV1,
    /// The same format with Vicuna's own system prompt ([`VICUNA_V1_SYSTEM`]): the original's
    /// `vicuna_v1` and `v1`, LLaVA-1.5's training and evaluation template.
    VicunaV1,
    /// Vicuna v0: `{system}###Human: {q}###Assistant: {a}###…`
    LlavaV0,
    /// LLaMA-2 chat: `[INST] <<SYS>>…<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] …`
    Llama2,
    /// The original's `mistral_instruct` (LLaVA-1.6 Mistral): LLaMA-2's `[INST] {q} [/INST] {a} </s>`
    /// with no system prompt and nothing between turns.
    MistralInstruct,
    /// ChatML: `<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n`
    Chatml,
    /// The original's `chatml_direct` (LLaVA-1.6 34B): ChatML's tags joined with no newline
    /// between turns, `<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n`, as
    /// its MPT separator style renders them.
    ChatmlDirect,
    /// Stage-1 pretraining: the image, then the caption and `</s>`. No roles, no system.
    Plain,
}

impl ConvTemplate {
    pub const NAMES: [&'static str; 8] = [
        "llava_v1",
        "vicuna_v1",
        "llava_v0",
        "llama_2",
        "mistral_instruct",
        "chatml",
        "chatml_direct",
        "plain",
    ];

    /// A template by our name or the original's `--conv-mode` name. The original's `v0` and
    /// `default` (Vicuna v0 with a worked example conversation) are not built in, and are not
    /// taken as `llava_v0`, which has no example.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "llava_v1" => Self::LlavaV1,
            "vicuna_v1" | "v1" => Self::VicunaV1,
            "llava_v0" => Self::LlavaV0,
            "llama_2" | "llava_llama_2" => Self::Llama2,
            "mistral_instruct" => Self::MistralInstruct,
            "chatml" => Self::Chatml,
            "chatml_direct" => Self::ChatmlDirect,
            "plain" => Self::Plain,
            _ => return None,
        })
    }

    /// [`Self::from_name`], or a message that says why not and what to choose.
    pub fn parse(name: &str) -> Result<Self, String> {
        Self::from_name(name).ok_or_else(|| {
            let why = match name {
                "v0" | "default" | "vicuna_v0" => {
                    "the original's Vicuna v0 template, with its worked example conversation, is not built in (llava_v0 is the LLaVA v0 releases' template, without one); "
                }
                _ => "",
            };
            format!(
                "unknown template: {why}choose one of {}",
                Self::NAMES.join(", ")
            )
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::LlavaV1 => "llava_v1",
            Self::VicunaV1 => "vicuna_v1",
            Self::LlavaV0 => "llava_v0",
            Self::Llama2 => "llama_2",
            Self::MistralInstruct => "mistral_instruct",
            Self::Chatml => "chatml",
            Self::ChatmlDirect => "chatml_direct",
            Self::Plain => "plain",
        }
    }

    fn default_system(&self) -> &'static str {
        match self {
            Self::LlavaV1 | Self::LlavaV0 => VICUNA_SYSTEM,
            Self::VicunaV1 => VICUNA_V1_SYSTEM,
            Self::Llama2 => LLAMA_2_SYSTEM,
            Self::Chatml | Self::ChatmlDirect => "Answer the questions.",
            Self::MistralInstruct | Self::Plain => "",
        }
    }

    /// Renders `messages` (a system message is optional and overrides the default) as
    /// segments. With `add_generation_prompt`, ends with the cue for the assistant's next turn.
    pub fn segments(
        &self,
        messages: &[Message],
        eos: &str,
        add_generation_prompt: bool,
    ) -> Vec<Segment> {
        let system = messages
            .iter()
            .find(|m| m.role == Role::System)
            .map(|m| m.text.as_str())
            .unwrap_or(self.default_system());
        let turns: Vec<&Message> = messages.iter().filter(|m| m.role != Role::System).collect();
        let mut out = Vec::new();
        let mut prompt = String::new();
        let answer = |prompt: &mut String, text: String, out: &mut Vec<Segment>| {
            out.push(Segment {
                text: std::mem::take(prompt),
                supervised: false,
            });
            out.push(Segment {
                text,
                supervised: true,
            });
        };
        match self {
            Self::LlavaV1 | Self::VicunaV1 => {
                prompt.push_str(system);
                prompt.push(' ');
                for m in &turns {
                    match m.role {
                        Role::User => prompt.push_str(&format!("USER: {} ", m.text_with_images())),
                        _ => {
                            prompt.push_str("ASSISTANT:");
                            answer(&mut prompt, format!(" {}{eos}", m.text), &mut out);
                        }
                    }
                }
                if add_generation_prompt {
                    prompt.push_str("ASSISTANT:");
                }
            }
            Self::LlavaV0 => {
                prompt.push_str(system);
                prompt.push_str("###");
                for m in &turns {
                    match m.role {
                        Role::User => {
                            prompt.push_str(&format!("Human: {}###", m.text_with_images()))
                        }
                        _ => {
                            prompt.push_str("Assistant:");
                            answer(&mut prompt, format!(" {}###", m.text), &mut out);
                        }
                    }
                }
                if add_generation_prompt {
                    prompt.push_str("Assistant:");
                }
            }
            Self::Llama2 | Self::MistralInstruct => {
                // LLaMA-2 opens each later turn with BOS; Mistral's template does not.
                let turn_bos = if *self == Self::Llama2 { "<s>" } else { "" };
                let mut first = true;
                for m in &turns {
                    match m.role {
                        Role::User => {
                            let text = m.text_with_images();
                            if first && !system.is_empty() {
                                prompt.push_str(&format!(
                                    "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{text} [/INST]"
                                ));
                            } else {
                                // BOS is added by the tokenizer for the first turn only.
                                let bos = if first { "" } else { turn_bos };
                                prompt.push_str(&format!("{bos}[INST] {text} [/INST]"));
                            }
                            first = false;
                        }
                        _ => answer(&mut prompt, format!(" {} {eos}", m.text), &mut out),
                    }
                }
            }
            Self::Chatml | Self::ChatmlDirect => {
                // ChatML ends each turn with a newline; the original's chatml_direct does not.
                let end = if *self == Self::Chatml {
                    "<|im_end|>\n"
                } else {
                    "<|im_end|>"
                };
                prompt.push_str(&format!("<|im_start|>system\n{system}{end}"));
                for m in &turns {
                    match m.role {
                        Role::User => prompt
                            .push_str(&format!("<|im_start|>user\n{}{end}", m.text_with_images())),
                        _ => {
                            prompt.push_str("<|im_start|>assistant\n");
                            answer(&mut prompt, format!("{}{end}", m.text), &mut out);
                        }
                    }
                }
                if add_generation_prompt {
                    prompt.push_str("<|im_start|>assistant\n");
                }
            }
            Self::Plain => {
                for m in &turns {
                    match m.role {
                        // The human turn contributes only its image; its text is not used.
                        Role::User => {
                            prompt.push_str(&IMAGE_PLACEHOLDER.repeat(m.images));
                            if m.images == 0 {
                                prompt.push_str(&m.text);
                            }
                        }
                        _ => answer(&mut prompt, format!("{}{eos}", m.text), &mut out),
                    }
                }
            }
        }
        if !prompt.is_empty() {
            out.push(Segment {
                text: prompt,
                supervised: false,
            });
        }
        out
    }

    /// The prompt as one string, for inference.
    pub fn render(&self, messages: &[Message], eos: &str, add_generation_prompt: bool) -> String {
        self.segments(messages, eos, add_generation_prompt)
            .into_iter()
            .map(|s| s.text)
            .collect()
    }

    /// Text at which generation should stop, besides EOS.
    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self {
            Self::LlavaV0 => &["###"],
            Self::Chatml | Self::ChatmlDirect => &["<|im_end|>"],
            _ => &[],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_turns() -> Vec<Message> {
        vec![
            Message::user("What is this?", 1),
            Message::assistant("A cat."),
            Message::user("What colour?", 0),
            Message::assistant("Black."),
        ]
    }

    #[test]
    fn llava_v1_matches_the_vicuna_format() {
        let s = ConvTemplate::LlavaV1.render(&two_turns(), "</s>", false);
        assert_eq!(
            s,
            format!(
                "{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>USER: What colour? ASSISTANT: Black.</s>"
            )
        );
        let q = ConvTemplate::LlavaV1.render(&[Message::user("Hi", 1)], "</s>", true);
        assert_eq!(q, format!("{VICUNA_SYSTEM} USER: <image>\nHi ASSISTANT:"));
    }

    /// The original's `vicuna_v1` (and `v1`) is `llava_v1`'s format with the prompt that says
    /// "user"; its `v0` (with a worked example) is not `llava_v0`.
    #[test]
    fn vicuna_v1_is_llava_v1_with_vicunas_system_prompt() {
        for name in ["vicuna_v1", "v1"] {
            let t = ConvTemplate::from_name(name).expect("known");
            let s = t.render(&two_turns(), "</s>", false);
            let llava = ConvTemplate::LlavaV1.render(&two_turns(), "</s>", false);
            assert_eq!(s, llava.replacen(VICUNA_SYSTEM, VICUNA_V1_SYSTEM, 1));
            assert!(s.starts_with("A chat between a curious user"), "{s}");
        }
        for name in ["v0", "default", "vicuna_v0"] {
            let e = ConvTemplate::parse(name).expect_err(name);
            assert!(
                e.contains("worked example") && e.contains("llava_v0"),
                "{e}"
            );
        }
        let e = ConvTemplate::parse("llava_v9").expect_err("unknown");
        assert!(e.contains("choose one of llava_v1, vicuna_v1"), "{e}");
    }

    #[test]
    fn supervised_segments_are_exactly_the_answers() {
        for t in ConvTemplate::NAMES
            .iter()
            .filter_map(|n| ConvTemplate::from_name(n))
        {
            let segs = t.segments(&two_turns(), "</s>", false);
            let answers: Vec<&str> = segs
                .iter()
                .filter(|s| s.supervised)
                .map(|s| s.text.as_str())
                .collect();
            assert_eq!(answers.len(), 2, "{t:?}");
            assert!(
                answers[0].contains("A cat.") && answers[1].contains("Black."),
                "{t:?}: {answers:?}"
            );
            let all: String = segs.iter().map(|s| s.text.as_str()).collect();
            assert_eq!(all, t.render(&two_turns(), "</s>", false));
        }
    }

    #[test]
    fn other_templates() {
        let m = [Message::user("Q", 1), Message::assistant("A")];
        assert_eq!(
            ConvTemplate::Plain.render(&m, "</s>", false),
            "<image>A</s>"
        );
        assert_eq!(
            ConvTemplate::LlavaV0.render(&m, "</s>", false),
            format!("{VICUNA_SYSTEM}###Human: <image>\nQ###Assistant: A###")
        );
        assert_eq!(
            ConvTemplate::Llama2.render(&m, "</s>", false),
            format!("[INST] <<SYS>>\n{LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nQ [/INST] A </s>")
        );
        // The original's renderings of its LLaVA-1.6 templates (conversation.py's LLAMA_2 style
        // with sep "", and MPT style).
        assert_eq!(
            ConvTemplate::MistralInstruct.render(&two_turns(), "</s>", false),
            "[INST] <image>\nWhat is this? [/INST] A cat. </s>[INST] What colour? [/INST] Black. </s>"
        );
        assert_eq!(
            ConvTemplate::MistralInstruct.render(&[Message::user("Q", 1)], "</s>", true),
            "[INST] <image>\nQ [/INST]"
        );
        assert_eq!(
            ConvTemplate::ChatmlDirect.render(&[Message::user("Q", 1)], "</s>", true),
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\n"
        );
        assert_eq!(
            ConvTemplate::ChatmlDirect.render(&m, "</s>", false),
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
        );
        assert_eq!(
            ConvTemplate::Chatml.render(&[Message::user("Q", 0)], "</s>", true),
            "<|im_start|>system\nAnswer the questions.<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        );
    }
}
