//! The training objective: autoregressive cross-entropy on the supervised positions only.

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};

pub use llava_data::sample::IGNORE_INDEX;

/// Mean cross-entropy of predicting token t+1 from position t, over every position whose next
/// label is not [`IGNORE_INDEX`] — transformers' `ForCausalLMLoss` with mean reduction.
///
/// `logits`: `[batch, seq, vocab]`; `labels`: `batch` rows of `seq` labels. Returns a scalar and
/// the number of supervised tokens it averages over. The rows are gathered before the softmax,
/// so unsupervised positions (most of a LLaVA sample: system prompt, questions, 576 image
/// positions) cost nothing.
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    if labels.len() != b || labels.iter().any(|row| row.len() != s) {
        return Err(ModelError::Input(format!("labels must be {b} rows of {s}")));
    }
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in labels.iter().enumerate() {
        for t in 0..s.saturating_sub(1) {
            let label = row[t + 1];
            if label == IGNORE_INDEX {
                continue;
            }
            if label < 0 || label as usize >= v {
                return Err(ModelError::Input(format!(
                    "label {label} is outside the vocabulary (0..{v})"
                )));
            }
            rows.push((bi * s + t) as u32);
            targets.push(label as u32);
        }
    }
    let n = rows.len();
    if n == 0 {
        return Err(ModelError::Input(
            "the batch has no supervised tokens".into(),
        ));
    }
    let dev = logits.device();
    let picked = logits
        .reshape((b * s, v))?
        .index_select(&Tensor::from_vec(rows, n, dev)?, 0)?;
    let log_probs = candle_nn::ops::log_softmax(&picked.to_dtype(DType::F32)?, D::Minus1)?;
    let targets = Tensor::from_vec(targets, (n, 1), dev)?;
    let nll = log_probs.gather(&targets, 1)?.neg()?;
    Ok((nll.mean_all()?, n))
}
