//! A chat-completions request body, checked field by field into what the scheduler needs.
//! A parameter this server does not implement gets a 400 naming it; none is silently ignored.

use llava_data::conversation::{Message, Role};
use llava_model::generation::SamplingParams;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// An image of the request, in prompt order, with the field it came from (for errors).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRef {
    pub url: String,
    pub param: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    pub model: Option<String>,
    /// Text with each message's image count, as the chat template renders them.
    pub messages: Vec<Message>,
    pub images: Vec<ImageRef>,
    pub sampling: SamplingParams,
    /// `max_completion_tokens` (or the older `max_tokens`); `None` runs to the context's end.
    pub max_tokens: Option<usize>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// OpenAI's default; llama.cpp's is 0.8.
const DEFAULT_TEMPERATURE: f64 = 1.0;
/// OpenAI's limit on stop sequences.
const MAX_STOP: usize = 4;

/// Parameters OpenAI defines that this server refuses unless they ask for the default, with
/// why.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("tools", "this server does not call tools"),
    ("tool_choice", "this server does not call tools"),
    ("parallel_tool_calls", "this server does not call tools"),
    ("functions", "this server does not call functions"),
    ("function_call", "this server does not call functions"),
    ("logprobs", "log probabilities are not returned"),
    ("top_logprobs", "log probabilities are not returned"),
    ("audio", "only text is generated"),
    ("modalities", "only text is generated"),
    ("prediction", "predicted outputs are not implemented"),
    ("reasoning_effort", "this model does not reason separately"),
    ("web_search_options", "there is no web search"),
];

pub fn parse(body: &[u8], max_images: usize) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::invalid("the body must be a JSON object"));
    };
    // A field sent as null is a field not sent, as the OpenAI API treats it.
    let obj: Map<String, Value> = obj.into_iter().filter(|(_, v)| !v.is_null()).collect();
    check_parameters(&obj)?;

    let (messages, images) = messages(obj.get("messages"))?;
    if images.len() > max_images {
        return Err(ApiError::invalid_param(
            "messages",
            format!(
                "{} images, more than the {max_images} this server takes in one request",
                images.len()
            ),
        ));
    }
    let temperature = match obj.get("temperature") {
        Some(v) => number_in(v, "temperature", 0.0, 2.0)?,
        None => DEFAULT_TEMPERATURE,
    };
    let top_p = match obj.get("top_p") {
        Some(v) => number_in(v, "top_p", 0.0, 1.0)?,
        None => 1.0,
    };
    let seed = match obj.get("seed") {
        Some(v) => v
            .as_i64()
            .map(|s| s as u64)
            .or_else(|| v.as_u64())
            .ok_or_else(|| ApiError::invalid_param("seed", "`seed` must be an integer"))?,
        // Unseeded requests differ from one another, as OpenAI's do.
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    let sampling = SamplingParams {
        // top_p 0 keeps only the likeliest token: greedy.
        temperature: if top_p == 0.0 { 0.0 } else { temperature },
        top_p: if top_p == 0.0 { 1.0 } else { top_p },
        top_k: 0,
        seed,
    };
    let max_tokens = match (obj.get("max_completion_tokens"), obj.get("max_tokens")) {
        (Some(v), _) => Some(positive(v, "max_completion_tokens")?),
        (None, Some(v)) => Some(positive(v, "max_tokens")?),
        (None, None) => None,
    };
    let stream = match obj.get("stream") {
        Some(v) => v
            .as_bool()
            .ok_or_else(|| ApiError::invalid_param("stream", "`stream` must be a boolean"))?,
        None => false,
    };
    let include_usage = match obj.get("stream_options") {
        None => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` is only allowed when `stream` is true",
            ));
        }
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| *k != "include_usage") {
                return Err(ApiError::unsupported(
                    &format!("stream_options.{k}"),
                    "only include_usage is implemented",
                ));
            }
            match o.get("include_usage") {
                None | Some(Value::Null) => false,
                Some(v) => v.as_bool().ok_or_else(|| {
                    ApiError::invalid_param(
                        "stream_options.include_usage",
                        "`include_usage` must be a boolean",
                    )
                })?,
            }
        }
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stream_options",
                "`stream_options` must be an object",
            ));
        }
    };
    let model = match obj.get("model") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(ApiError::invalid_param("model", "`model` must be a string")),
        None => None,
    };
    Ok(ChatRequest {
        model,
        messages,
        images,
        sampling,
        max_tokens,
        stop: stop(obj.get("stop"))?,
        stream,
        include_usage,
    })
}

/// Refuses unknown parameters, and known ones this server does not implement unless they ask
/// for what it does anyway (`n: 1`, zero penalties, `logprobs: false`, text output).
fn check_parameters(obj: &Map<String, Value>) -> Result<(), ApiError> {
    const KNOWN: &[&str] = &[
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "user",
        "n",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "response_format",
    ];
    for (key, value) in obj {
        let is_default = match key.as_str() {
            "n" => value.as_u64() == Some(1),
            "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
            "logit_bias" => value.as_object().is_some_and(Map::is_empty),
            "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
            "logprobs" => value.as_bool() == Some(false),
            "tool_choice" => value.as_str() == Some("none"),
            "tools" | "functions" => value.as_array().is_some_and(Vec::is_empty),
            _ => true,
        };
        if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| k == key) {
            if !is_default {
                return Err(ApiError::unsupported(key, why));
            }
            continue;
        }
        if !KNOWN.contains(&key.as_str()) {
            return Err(ApiError::invalid_param(
                key.clone(),
                format!("unrecognized request argument `{key}`"),
            ));
        }
        if !is_default {
            let why = match key.as_str() {
                "n" => "one choice per request (n = 1)",
                "presence_penalty" | "frequency_penalty" => "penalties are not implemented (0)",
                "logit_bias" => "logit biases are not implemented",
                _ => "only the `text` response format is implemented",
            };
            return Err(ApiError::unsupported(key, why));
        }
    }
    Ok(())
}

/// The conversation, and its images in order.
fn messages(value: Option<&Value>) -> Result<(Vec<Message>, Vec<ImageRef>), ApiError> {
    let Some(Value::Array(list)) = value else {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must be a non-empty array",
        ));
    };
    if list.is_empty() {
        return Err(ApiError::invalid_param(
            "messages",
            "`messages` must be a non-empty array",
        ));
    }
    let mut messages = Vec::new();
    let mut images = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(ApiError::invalid_param(at, "a message must be an object"));
        };
        for (key, v) in m {
            let ok = matches!(key.as_str(), "role" | "content" | "name")
                || (v.is_null() || v.as_array().is_some_and(Vec::is_empty));
            if !ok {
                return Err(ApiError::unsupported(
                    &format!("{at}.{key}"),
                    "messages take a role, content and name",
                ));
            }
        }
        let role = match m.get("role").and_then(Value::as_str) {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(r @ ("tool" | "function")) => {
                return Err(ApiError::unsupported(
                    &format!("{at}.role"),
                    &format!("`{r}` messages need tool calling"),
                ));
            }
            _ => {
                return Err(ApiError::invalid_param(
                    format!("{at}.role"),
                    "`role` must be system, developer, user or assistant",
                ));
            }
        };
        let mut text = Vec::new();
        let mut count = 0;
        match m.get("content") {
            Some(Value::String(s)) => text.push(s.clone()),
            None | Some(Value::Null) if role == Role::Assistant => {}
            Some(Value::Array(parts)) => {
                for (j, part) in parts.iter().enumerate() {
                    let at = format!("{at}.content[{j}]");
                    match part.get("type").and_then(Value::as_str) {
                        Some("text") => match part.get("text").and_then(Value::as_str) {
                            Some(t) => text.push(t.to_string()),
                            None => {
                                return Err(ApiError::invalid_param(
                                    format!("{at}.text"),
                                    "a text part needs a string `text`",
                                ));
                            }
                        },
                        Some("image_url") => {
                            if role != Role::User {
                                return Err(ApiError::invalid_param(
                                    at,
                                    "images are only allowed in user messages",
                                ));
                            }
                            // The object form is OpenAI's; the bare string is vLLM's too.
                            let url = match part.get("image_url") {
                                Some(Value::String(u)) => Some(u.as_str()),
                                Some(o) => o.get("url").and_then(Value::as_str),
                                None => None,
                            };
                            let Some(url) = url.map(str::to_string) else {
                                return Err(ApiError::invalid_param(
                                    format!("{at}.image_url.url"),
                                    "an image_url part needs `image_url.url`",
                                ));
                            };
                            images.push(ImageRef {
                                url,
                                param: format!("{at}.image_url.url"),
                            });
                            count += 1;
                        }
                        Some(other) => {
                            return Err(ApiError::unsupported(
                                &format!("{at}.type"),
                                &format!("`{other}` parts; this server takes text and image_url"),
                            ));
                        }
                        None => {
                            return Err(ApiError::invalid_param(
                                format!("{at}.type"),
                                "a content part needs a `type`",
                            ));
                        }
                    }
                }
            }
            _ => {
                return Err(ApiError::invalid_param(
                    format!("{at}.content"),
                    "`content` must be a string or an array of parts",
                ));
            }
        }
        messages.push(Message {
            role,
            text: text.join("\n"),
            images: count,
        });
    }
    Ok((messages, images))
}

fn number_in(v: &Value, name: &str, lo: f64, hi: f64) -> Result<f64, ApiError> {
    match v.as_f64() {
        Some(x) if (lo..=hi).contains(&x) => Ok(x),
        _ => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be a number from {lo} to {hi}"),
        )),
    }
}

fn positive(v: &Value, name: &str) -> Result<usize, ApiError> {
    match v.as_u64() {
        Some(n) if n >= 1 => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        _ => Err(ApiError::invalid_param(
            name,
            format!("`{name}` must be an integer of at least 1"),
        )),
    }
}

fn stop(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list: Vec<String> = match v {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::invalid_param("stop", "`stop` must hold strings"))?,
        Some(_) => {
            return Err(ApiError::invalid_param(
                "stop",
                "`stop` must be a string or an array of strings",
            ));
        }
    };
    if list.len() > MAX_STOP || list.iter().any(String::is_empty) {
        return Err(ApiError::invalid_param(
            "stop",
            format!("`stop` takes at most {MAX_STOP} non-empty strings"),
        ));
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(v: Value) -> Result<ChatRequest, ApiError> {
        parse(v.to_string().as_bytes(), 4)
    }

    #[test]
    fn parts_and_strings_become_messages_with_images() {
        let r = parse_json(serde_json::json!({
            "model": "m",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": "data:a", "detail": "low"}},
                    {"type": "text", "text": "What is it?"}
                ]},
                {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": [{"type": "image_url", "image_url": "data:b"}]}
            ],
            "max_tokens": 5, "temperature": 0, "stop": "###", "n": 1, "stream": true,
            "stream_options": {"include_usage": true}, "tools": null
        }))
        .expect("valid");
        assert_eq!(r.messages[1], Message::user("What is it?", 1));
        assert_eq!(r.messages[3].images, 1);
        assert_eq!(r.images.len(), 2);
        assert_eq!(r.images[1].param, "messages[3].content[0].image_url.url");
        assert_eq!(r.max_tokens, Some(5));
        assert_eq!(r.sampling.temperature, 0.0);
        assert_eq!(r.stop, vec!["###"]);
        assert!(r.stream && r.include_usage);
    }

    #[test]
    fn unsupported_parameters_are_named() {
        let base = || serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
        for (key, value) in [
            ("n", serde_json::json!(2)),
            ("tools", serde_json::json!([{"type": "function"}])),
            ("logprobs", serde_json::json!(true)),
            ("presence_penalty", serde_json::json!(0.5)),
            (
                "response_format",
                serde_json::json!({"type": "json_object"}),
            ),
            ("frobnicate", serde_json::json!(1)),
        ] {
            let mut body = base();
            body[key] = value;
            let e = parse_json(body).expect_err(key);
            assert_eq!(e.status, 400);
            assert_eq!(e.param.as_deref(), Some(key), "{e:?}");
        }
        let mut body = base();
        body["stream_options"] = serde_json::json!({"include_usage": true});
        assert_eq!(
            parse_json(body).expect_err("no stream").param.as_deref(),
            Some("stream_options")
        );
    }

    #[test]
    fn bad_values_are_refused() {
        let with = |k: &str, v: Value| {
            let mut body = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
            body[k] = v;
            parse_json(body).expect_err(k).param
        };
        assert_eq!(
            with("temperature", serde_json::json!(3)).as_deref(),
            Some("temperature")
        );
        assert_eq!(
            with("max_tokens", serde_json::json!(0)).as_deref(),
            Some("max_tokens")
        );
        assert_eq!(
            with("stop", serde_json::json!(["a", ""])).as_deref(),
            Some("stop")
        );
        assert_eq!(
            with("messages", serde_json::json!([])).as_deref(),
            Some("messages")
        );
        let images = serde_json::json!([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "image_url", "image_url": {"url": "x"}},
            {"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert_eq!(with("messages", images).as_deref(), Some("messages"));
        assert!(parse(b"{not json", 1).is_err());
    }
}
