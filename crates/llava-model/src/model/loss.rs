//! The training objective: autoregressive cross-entropy on the supervised positions only.

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};
use crate::model::quantized::Projection;

pub use llava_data::sample::IGNORE_INDEX;

/// Mean cross-entropy of predicting token t+1 from position t, over every position whose next
/// label is not [`IGNORE_INDEX`] — transformers' `ForCausalLMLoss` with mean reduction.
///
/// `logits`: `[batch, seq, vocab]`; `labels`: `batch` rows of `seq` labels. Returns a scalar and
/// the number of supervised tokens it averages over.
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<(Tensor, usize)> {
    let (b, s, v) = logits.dims3()?;
    let (rows, targets) = supervised_positions(labels, b, s, v)?;
    let picked = logits
        .reshape((b * s, v))?
        .index_select(&rows.to_device(logits.device())?, 0)?;
    nll(&picked, &targets)
}

/// The same loss from the final hidden states: only the supervised rows go through `lm_head`.
/// Most of a LLaVA sample (system prompt, questions, 576 image positions) is unsupervised, and
/// the vocabulary projection is the widest matmul of a small model, so this skips most of it.
pub fn causal_lm_loss_from_hidden(
    hidden: &Tensor,
    lm_head: &Projection,
    labels: &[Vec<i64>],
) -> Result<(Tensor, usize)> {
    let (b, s, h) = hidden.dims3()?;
    let v = lm_head.out_dim()?;
    let (rows, targets) = supervised_positions(labels, b, s, v)?;
    let rows = rows.to_device(hidden.device())?;
    let picked = lm_head.forward(&hidden.reshape((b * s, h))?.index_select(&rows, 0)?)?;
    nll(&picked, &targets)
}

/// Flat indices of positions whose next label is supervised, and those labels.
fn supervised_positions(
    labels: &[Vec<i64>],
    b: usize,
    s: usize,
    v: usize,
) -> Result<(Tensor, Tensor)> {
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
    if rows.is_empty() {
        return Err(ModelError::Input(
            "the batch has no supervised tokens".into(),
        ));
    }
    let n = rows.len();
    let cpu = candle_core::Device::Cpu;
    Ok((
        Tensor::from_vec(rows, n, &cpu)?,
        Tensor::from_vec(targets, (n, 1), &cpu)?,
    ))
}

/// Mean cross-entropy of classifying each row of `logits` (`[n, classes]`) as its `targets`
/// entry: the loss of a classification head, such as the demo tower's dense pretraining.
pub fn cross_entropy(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, classes) = logits.dims2()?;
    if targets.len() != n {
        return Err(ModelError::Input(format!(
            "{} targets for {n} rows of logits",
            targets.len()
        )));
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= classes) {
        return Err(ModelError::Input(format!(
            "class {t} is outside 0..{classes}"
        )));
    }
    let targets = Tensor::from_slice(targets, (n, 1), logits.device())?;
    Ok(nll(logits, &targets)?.0)
}

/// Mean negative log-likelihood of `targets` (`[n, 1]`) under `logits` (`[n, vocab]`), in f32.
fn nll(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, usize)> {
    let n = logits.dim(0)?;
    let targets = targets.to_device(logits.device())?;
    let log_probs = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let nll = log_probs.gather(&targets, 1)?.neg()?;
    Ok((nll.mean_all()?, n))
}
