//! Batch input files: one `{"custom_id", "method", "url", "body"}` line per request.

use serde::Serialize;

use crate::client::{ChatRequest, request_json};
use crate::error::InstructError;
use crate::types::InstructType;

/// The endpoint every request line targets.
pub const ENDPOINT: &str = "/v1/chat/completions";

/// How much one input file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_requests: usize,
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    /// OpenAI's limits per batch: 50,000 requests and 200 MB of input file.
    fn default() -> Self {
        Self {
            max_requests: 50_000,
            max_bytes: 200 * 1000 * 1000,
        }
    }
}

/// The `custom_id` of a pair: the record id and the type, `<id>:<type>`.
pub fn custom_id(id: &str, ty: InstructType) -> String {
    format!("{id}:{ty}")
}

/// The (record id, type) a `custom_id` names (ids may themselves hold `:`; the type is last).
pub fn parse_custom_id(s: &str) -> Option<(String, InstructType)> {
    let (id, ty) = s.rsplit_once(':')?;
    let ty: InstructType = ty.parse().ok()?;
    (ty.needs_teacher() && !id.is_empty()).then(|| (id.to_string(), ty))
}

#[derive(Serialize)]
struct Line<'a> {
    custom_id: &'a str,
    method: &'static str,
    url: &'static str,
    body: serde_json::Value,
}

/// One input line, newline included.
pub fn request_line(custom_id: &str, model: &str, req: &ChatRequest) -> Vec<u8> {
    let line = Line {
        custom_id,
        method: "POST",
        url: ENDPOINT,
        body: request_json(model, req),
    };
    // A struct of strings and a JSON value always serialises.
    let mut v = serde_json::to_vec(&line).unwrap_or_default();
    v.push(b'\n');
    v
}

/// Splits lines into files that each respect `limits`, keeping their order.
pub fn split_lines(
    lines: Vec<Vec<u8>>,
    limits: BatchLimits,
) -> Result<Vec<Vec<Vec<u8>>>, InstructError> {
    if limits.max_requests == 0 || limits.max_bytes == 0 {
        return Err(InstructError::InvalidArgument(
            "batch limits must allow at least one request".into(),
        ));
    }
    let mut files: Vec<Vec<Vec<u8>>> = Vec::new();
    let mut bytes = 0usize;
    for line in lines {
        if line.len() > limits.max_bytes {
            return Err(InstructError::InvalidArgument(format!(
                "one request is {} bytes, over the batch file limit of {} bytes",
                line.len(),
                limits.max_bytes
            )));
        }
        let fits = files.last().is_some_and(|f| {
            f.len() < limits.max_requests && bytes + line.len() <= limits.max_bytes
        });
        if !fits {
            files.push(Vec::new());
            bytes = 0;
        }
        bytes += line.len();
        if let Some(f) = files.last_mut() {
            f.push(line);
        }
    }
    Ok(files)
}

/// The `custom_id` of every line of an input file (lines that are not requests are skipped).
pub fn custom_ids(file: &[u8]) -> Vec<String> {
    file.split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok())
        .filter_map(|v| v["custom_id"].as_str().map(String::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ChatMessage;

    #[test]
    fn custom_ids_name_image_and_type() {
        let c = custom_id("000000000042", InstructType::Detail);
        assert_eq!(c, "000000000042:detail");
        assert_eq!(
            parse_custom_id(&c),
            Some(("000000000042".to_string(), InstructType::Detail))
        );
        assert_eq!(
            parse_custom_id("a:b:complex"),
            Some(("a:b".to_string(), InstructType::Complex))
        );
        assert_eq!(parse_custom_id("x:brief"), None);
        assert_eq!(parse_custom_id("nocolon"), None);
        assert_eq!(parse_custom_id(":detail"), None);
    }

    #[test]
    fn request_lines_are_batch_input() {
        let req = ChatRequest {
            messages: vec![ChatMessage::user("hi")],
            temperature: Some(0.2),
            max_tokens: Some(10),
        };
        let line = request_line("7:detail", "gpt-4o", &req);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["custom_id"], "7:detail");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["url"], "/v1/chat/completions");
        assert_eq!(v["body"]["model"], "gpt-4o");
        assert_eq!(v["body"]["temperature"], 0.2);
        assert_eq!(v["body"]["messages"][0]["content"], "hi");
        assert_eq!(custom_ids(&line), vec!["7:detail"]);
    }

    #[test]
    fn files_split_at_request_and_byte_limits() {
        let lines: Vec<Vec<u8>> = (0..7).map(|i| vec![b'a' + i; 10]).collect();
        let by_count = split_lines(
            lines.clone(),
            BatchLimits {
                max_requests: 3,
                max_bytes: 1000,
            },
        )
        .unwrap();
        assert_eq!(by_count.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
        let by_bytes = split_lines(
            lines.clone(),
            BatchLimits {
                max_requests: 100,
                max_bytes: 25,
            },
        )
        .unwrap();
        assert_eq!(
            by_bytes.iter().map(Vec::len).collect::<Vec<_>>(),
            [2, 2, 2, 1]
        );
        assert_eq!(by_bytes.concat(), lines, "order kept, nothing lost");
        assert!(
            split_lines(
                lines,
                BatchLimits {
                    max_requests: 100,
                    max_bytes: 5
                }
            )
            .is_err()
        );
        assert!(
            split_lines(Vec::new(), BatchLimits::default())
                .unwrap()
                .is_empty()
        );
    }
}
