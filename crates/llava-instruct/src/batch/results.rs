//! Batch output and error files: `{"id", "custom_id", "response": {"status_code", "body"},
//! "error"}` lines, as OpenAI and `vllm run-batch` write them.

use serde::Deserialize;

use crate::client::{ChatResponse, completion_from_value};

/// What one result line says about its request.
#[derive(Debug, Clone, PartialEq)]
pub enum LineResult {
    /// A chat completion.
    Reply(ChatResponse),
    /// An error line (e.g. `batch_expired`), a non-200 status, or a body that is not a chat
    /// completion. Worth another batch.
    Failed(String),
}

#[derive(Deserialize)]
struct WireLine {
    custom_id: String,
    #[serde(default)]
    response: Option<WireResponse>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireResponse {
    status_code: u16,
    #[serde(default)]
    body: serde_json::Value,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

fn error_text(code: Option<&str>, message: Option<&str>) -> String {
    match (code, message) {
        (Some(c), Some(m)) => format!("{c}: {m}"),
        (Some(c), None) => c.to_string(),
        (None, Some(m)) => m.to_string(),
        (None, None) => "unspecified error".to_string(),
    }
}

/// Reads one result line: its `custom_id` and result, or why the line is malformed.
pub fn parse_line(line: &[u8]) -> Result<(String, LineResult), String> {
    let w: WireLine = serde_json::from_slice(line).map_err(|e| e.to_string())?;
    if let Some(e) = w.error {
        let text = error_text(e.code.as_deref(), e.message.as_deref());
        return Ok((w.custom_id, LineResult::Failed(text)));
    }
    let Some(resp) = w.response else {
        return Ok((
            w.custom_id,
            LineResult::Failed("no response and no error".into()),
        ));
    };
    if resp.status_code != 200 {
        let err = &resp.body["error"];
        let text = error_text(err["code"].as_str(), err["message"].as_str());
        return Ok((
            w.custom_id,
            LineResult::Failed(format!("HTTP {}: {text}", resp.status_code)),
        ));
    }
    let result = match completion_from_value(resp.body) {
        Ok(r) => LineResult::Reply(r),
        Err(e) => LineResult::Failed(e.to_string()),
    };
    Ok((w.custom_id, result))
}

/// Every non-blank line of a result file: `Ok` lines and, for malformed ones, their 1-based
/// line number and error.
pub fn parse_file(bytes: &[u8]) -> Vec<Result<(String, LineResult), (usize, String)>> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, l)| !l.iter().all(u8::is_ascii_whitespace))
        .map(|(i, l)| parse_line(l).map_err(|e| (i + 1, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_error_lines() {
        let ok = br#"{"id":"batch_req_1","custom_id":"7:detail","response":{"status_code":200,"request_id":"r","body":{"id":"chatcmpl-1","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"A dog."},"finish_reason":"stop"}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}},"error":null}"#;
        let (id, r) = parse_line(ok).unwrap();
        assert_eq!(id, "7:detail");
        match r {
            LineResult::Reply(c) => {
                assert_eq!(c.content, "A dog.");
                assert_eq!(c.usage.prompt_tokens, 12);
                assert_eq!(c.finish_reason.as_deref(), Some("stop"));
            }
            other => panic!("{other:?}"),
        }
        let expired = br#"{"id":"batch_req_2","custom_id":"8:complex","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}"#;
        let (id, r) = parse_line(expired).unwrap();
        assert_eq!(id, "8:complex");
        assert!(matches!(r, LineResult::Failed(m) if m.starts_with("batch_expired")));
        let status = br#"{"id":"x","custom_id":"9:detail","response":{"status_code":500,"body":{"error":{"message":"server error","type":"server_error"}}},"error":null}"#;
        let (_, r) = parse_line(status).unwrap();
        assert_eq!(r, LineResult::Failed("HTTP 500: server error".into()));
        let no_choices =
            br#"{"custom_id":"9:detail","response":{"status_code":200,"body":{"choices":[]}}}"#;
        assert!(matches!(
            parse_line(no_choices).unwrap().1,
            LineResult::Failed(_)
        ));
        assert!(parse_line(b"{\"custom_id\": 5}").is_err());
        assert!(parse_line(b"not json").is_err());
        let file = [&ok[..], b"\n\ngarbage\n", &expired[..], b"\n"].concat();
        let parsed = parse_file(&file);
        assert_eq!(parsed.len(), 3);
        assert!(parsed[0].is_ok() && parsed[2].is_ok());
        assert_eq!(parsed[1].as_ref().unwrap_err().0, 3);
    }
}
