//! `/metrics` in the Prometheus text format: requests by status, queue depth and running
//! sequences, prompt and generated tokens, and time-to-first-token and per-token latency
//! histograms (named as vLLM names them). A dozen series do not need a metrics library.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in seconds.
const TTFT_BOUNDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const TOKEN_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if s <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {count}");
    }
}

#[derive(Debug)]
pub struct Metrics {
    requests: Mutex<BTreeMap<u16, u64>>,
    pub waiting: AtomicU64,
    pub running: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Batched forward passes, and the rows they carried: their ratio is the mean batch size.
    pub decode_steps: AtomicU64,
    pub decode_rows: AtomicU64,
    /// Prefill pieces run (chunked prefill): more than the requests admitted once prompts are
    /// split.
    pub prefill_chunks: AtomicU64,
    /// Requests that found part of their prompt in the prompt cache, the tokens they did not
    /// prefill again, and the conversations cached now.
    pub prompt_cache_hits: AtomicU64,
    pub prompt_cache_reused_tokens: AtomicU64,
    pub prompt_cache_entries: AtomicU64,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests: Mutex::new(BTreeMap::new()),
            waiting: AtomicU64::new(0),
            running: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            decode_steps: AtomicU64::new(0),
            decode_rows: AtomicU64::new(0),
            prefill_chunks: AtomicU64::new(0),
            prompt_cache_hits: AtomicU64::new(0),
            prompt_cache_reused_tokens: AtomicU64::new(0),
            prompt_cache_entries: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            time_per_output_token: Histogram::new(TOKEN_BOUNDS),
        }
    }
}

impl Metrics {
    /// Counts a chat request by the status it was answered with (a stream's is its 200).
    pub fn request(&self, status: u16) {
        if let Ok(mut map) = self.requests.lock() {
            *map.entry(status).or_default() += 1;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP llava_requests_total Chat completion requests by HTTP status.\n# TYPE llava_requests_total counter\n");
        if let Ok(map) = self.requests.lock() {
            for (status, n) in map.iter() {
                let _ = writeln!(out, "llava_requests_total{{status=\"{status}\"}} {n}");
            }
        }
        let gauges = [
            (
                "llava_queue_depth",
                "gauge",
                "Requests waiting for a place in the batch.",
                &self.waiting,
            ),
            (
                "llava_running_sequences",
                "gauge",
                "Sequences being decoded.",
                &self.running,
            ),
            (
                "llava_prompt_tokens_total",
                "counter",
                "Prompt tokens, those taken from the prompt cache included.",
                &self.prompt_tokens,
            ),
            (
                "llava_generation_tokens_total",
                "counter",
                "Tokens generated.",
                &self.generated_tokens,
            ),
            (
                "llava_decode_steps_total",
                "counter",
                "Decoding steps (one forward pass each).",
                &self.decode_steps,
            ),
            (
                "llava_decode_rows_total",
                "counter",
                "Sequences advanced, summed over decoding steps.",
                &self.decode_rows,
            ),
            (
                "llava_prefill_chunks_total",
                "counter",
                "Prefill pieces run between decoding steps (chunked prefill).",
                &self.prefill_chunks,
            ),
            (
                "llava_prompt_cache_hits_total",
                "counter",
                "Requests that took part of their prompt from the prompt cache.",
                &self.prompt_cache_hits,
            ),
            (
                "llava_prompt_cache_reused_tokens_total",
                "counter",
                "Prompt tokens taken from the prompt cache instead of prefilled.",
                &self.prompt_cache_reused_tokens,
            ),
            (
                "llava_prompt_cache_entries",
                "gauge",
                "Conversations in the prompt cache.",
                &self.prompt_cache_entries,
            ),
        ];
        for (name, kind, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        self.time_to_first_token.render(
            &mut out,
            "llava_time_to_first_token_seconds",
            "From a request's arrival to its first token.",
        );
        self.time_per_output_token.render(
            &mut out,
            "llava_time_per_output_token_seconds",
            "Between consecutive tokens of a sequence.",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::default();
        m.time_to_first_token.observe(Duration::from_millis(30));
        m.time_to_first_token.observe(Duration::from_secs(60));
        m.request(200);
        m.request(200);
        m.request(429);
        let text = m.render();
        assert!(text.contains("llava_time_to_first_token_seconds_bucket{le=\"0.025\"} 0"));
        assert!(text.contains("llava_time_to_first_token_seconds_bucket{le=\"0.05\"} 1"));
        assert!(text.contains("llava_time_to_first_token_seconds_bucket{le=\"30\"} 1"));
        assert!(text.contains("llava_time_to_first_token_seconds_bucket{le=\"+Inf\"} 2"));
        assert!(text.contains("llava_requests_total{status=\"200\"} 2"));
        assert!(text.contains("llava_requests_total{status=\"429\"} 1"));
    }
}
