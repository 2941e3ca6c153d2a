//! The Batch API endpoints, through [`ChatClient`] (the project's one HTTP client: same key,
//! retries, backoff and limits as the chat requests).

use std::time::Duration;

use reqwest::Method;
use reqwest::multipart::{Form, Part};
use serde::{Deserialize, Serialize};

use crate::batch::input::ENDPOINT;
use crate::client::{ChatClient, ClientError};

/// File transfers may take longer than one chat request; they get at least this long.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(600);

/// Request counts of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

/// The fields of a batch object this crate uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub input_file_id: Option<String>,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub errors: Option<serde_json::Value>,
}

impl Batch {
    /// Whether the batch will not change any more (`completed`, `expired`, `failed`,
    /// `cancelled`).
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }
}

/// Whether a batch status is final.
pub fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "expired" | "failed" | "cancelled")
}

#[derive(Deserialize)]
struct FileObject {
    id: String,
}

#[derive(Deserialize)]
struct BatchList {
    #[serde(default)]
    data: Vec<Batch>,
    #[serde(default)]
    has_more: bool,
    #[serde(default)]
    last_id: Option<String>,
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(bytes).map_err(|e| ClientError::Decode(e.to_string()))
}

impl ChatClient {
    fn transfer_timeout(&self) -> Duration {
        self.config().timeout.max(TRANSFER_TIMEOUT)
    }

    /// `POST /files` with purpose `batch` (multipart); returns the file id.
    pub async fn upload_batch_file(&self, name: &str, bytes: &[u8]) -> Result<String, ClientError> {
        let timeout = self.transfer_timeout();
        let (f, _) = self
            .retrying("Batch API request", || async move {
                let part = Part::bytes(bytes.to_vec())
                    .file_name(name.to_string())
                    .mime_str("application/jsonl")
                    .map_err(|e| ClientError::Config(e.to_string()))?;
                let form = Form::new().text("purpose", "batch").part("file", part);
                let rb = self.api_request(Method::POST, "/files").multipart(form);
                decode::<FileObject>(&self.send_once(rb, timeout).await?)
            })
            .await?;
        Ok(f.id)
    }

    /// `POST /batches` for an uploaded input file, with the given completion window.
    pub async fn create_batch(
        &self,
        input_file_id: &str,
        completion_window: &str,
    ) -> Result<Batch, ClientError> {
        let body = serde_json::json!({
            "input_file_id": input_file_id,
            "endpoint": ENDPOINT,
            "completion_window": completion_window,
            "metadata": {"source": "llava instruct"},
        });
        let timeout = self.config().timeout;
        let body = &body;
        let (b, _) = self
            .retrying("Batch API request", || async move {
                let rb = self.api_request(Method::POST, "/batches").json(body);
                decode::<Batch>(&self.send_once(rb, timeout).await?)
            })
            .await?;
        Ok(b)
    }

    /// `GET /batches/{id}`.
    pub async fn get_batch(&self, id: &str) -> Result<Batch, ClientError> {
        let timeout = self.config().timeout;
        let (b, _) = self
            .retrying("Batch API request", || async move {
                let rb = self.api_request(Method::GET, &format!("/batches/{id}"));
                decode::<Batch>(&self.send_once(rb, timeout).await?)
            })
            .await?;
        Ok(b)
    }

    /// The batch made from `input_file_id`, if any, found by paging through `GET /batches`.
    /// This is how a run killed between creating a batch and saving its id finds it again.
    pub async fn find_batch_for_file(
        &self,
        input_file_id: &str,
    ) -> Result<Option<Batch>, ClientError> {
        let timeout = self.config().timeout;
        let mut after: Option<String> = None;
        loop {
            let after_q = after.as_deref();
            let (page, _) = self
                .retrying("Batch API request", || async move {
                    let mut rb = self
                        .api_request(Method::GET, "/batches")
                        .query(&[("limit", "100")]);
                    if let Some(a) = after_q {
                        rb = rb.query(&[("after", a)]);
                    }
                    decode::<BatchList>(&self.send_once(rb, timeout).await?)
                })
                .await?;
            if let Some(b) = page
                .data
                .iter()
                .find(|b| b.input_file_id.as_deref() == Some(input_file_id))
            {
                return Ok(Some(b.clone()));
            }
            let next = page
                .last_id
                .or_else(|| page.data.last().map(|b| b.id.clone()));
            match next {
                Some(n) if page.has_more => after = Some(n),
                _ => return Ok(None),
            }
        }
    }

    /// `GET /files/{id}/content`.
    pub async fn file_content(&self, file_id: &str) -> Result<Vec<u8>, ClientError> {
        let timeout = self.transfer_timeout();
        let (bytes, _) = self
            .retrying("Batch API request", || async move {
                let rb = self.api_request(Method::GET, &format!("/files/{file_id}/content"));
                self.send_once(rb, timeout).await
            })
            .await?;
        Ok(bytes)
    }
}
