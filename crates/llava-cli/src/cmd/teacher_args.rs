//! The teacher/judge endpoint flags, shared by `llava instruct` and `llava eval judge` so that
//! both talk to an OpenAI-compatible server the same way (one client, one set of flags).

use std::time::Duration;

use anyhow::bail;
use clap::Args;
use llava_instruct::client::ClientConfig;

#[derive(Args)]
pub struct TeacherArgs {
    /// OpenAI-compatible API base, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1.
    /// The key is read from OPENAI_API_KEY when set.
    #[arg(long, value_name = "URL")]
    pub api_base: Option<String>,
    /// Model name at the endpoint (the teacher, or the judge).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value_t = 0.2)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: u32,
    /// Maximum requests in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Maximum requests started per minute.
    #[arg(long, value_name = "N")]
    pub rpm: Option<u32>,
    /// Timeout of one request attempt, in seconds.
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    pub timeout: f64,
    /// Retries per request on 429/5xx/timeouts/connection errors.
    #[arg(long, default_value_t = 6)]
    pub max_retries: u32,
}

impl TeacherArgs {
    pub fn client_config(&self) -> anyhow::Result<Option<ClientConfig>> {
        let (base, model) = match (&self.api_base, &self.model) {
            (Some(b), Some(m)) => (b, m),
            (None, None) => return Ok(None),
            _ => bail!("--api-base and --model go together"),
        };
        if !(self.timeout.is_finite() && self.timeout > 0.0) {
            bail!("--timeout must be a positive number of seconds");
        }
        let mut c = ClientConfig::new(base.clone(), model.clone()).with_env_api_key();
        c.concurrency = self.concurrency;
        c.requests_per_minute = self.rpm;
        c.timeout = Duration::from_secs_f64(self.timeout);
        c.max_retries = self.max_retries;
        Ok(Some(c))
    }
}
