//! Training data: LLaVA records → tokenised samples with their images → padded batches.
//!
//! A bad record (missing or undecodable image, wrong role order, misplaced `<image>`) is skipped
//! with a counted warning naming its id, never aborting an epoch, unless `strict` is set; so is
//! a record that is not a LLaVA record at all (`usable_records`).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use llava_data::image::{ImageProcessor, ProcessedImage};
use llava_data::record::{LlavaRecord, MalformedRecord};
use llava_data::sample::{IGNORE_INDEX, SampleOptions, TokenizedSample, tokenize_record};
use llava_data::tokenizer::Tokenizer;
use llava_model::LlavaConfig;
use llava_model::image_inputs::ImageInputs;
use rand::SeedableRng;
use rand::seq::SliceRandom;

use crate::error::{Result, TrainError};

pub struct TrainDataset {
    pub records: Vec<LlavaRecord>,
    pub image_folder: Option<PathBuf>,
    pub tokenizer: Tokenizer,
    pub image_processor: ImageProcessor,
    /// Tokenisation; its `image_seq_len` is replaced per image by what the model's config
    /// says an image of that size takes (LLaVA-NeXT's count depends on the size).
    pub sample: SampleOptions,
    pub model_config: LlavaConfig,
    pub pad_id: u32,
    pub strict: bool,
}

/// `--group-by-modality-length` sorts by length within runs of this many batches, as HF's
/// `LengthGroupedSampler` does, so that the order stays random at a larger scale.
const MEGABATCH_BATCHES: usize = 50;

/// A record's length for grouping, in words, as LLaVA estimates it (no tokenising needed).
fn word_length(record: &LlavaRecord) -> usize {
    record
        .conversations
        .iter()
        .map(|t| t.value.split_whitespace().count())
        .sum()
}

/// LLaVA's `--group_by_modality_length`: reorders an epoch so that each run of
/// `batch_size` records has one modality (all with an image, or all text-only) and similar
/// lengths, which cuts the padding of mixed data. Records are sorted by length within
/// megabatches of [`MEGABATCH_BATCHES`] batches taken in `order`, so the epoch stays
/// shuffled; full batches then come in a seeded random order, and the two modalities'
/// incomplete last batches come at the end.
pub fn group_by_modality_length(
    records: &[LlavaRecord],
    order: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
) -> Vec<usize> {
    let batch_size = batch_size.max(1);
    let mut full: Vec<Vec<usize>> = Vec::new();
    let mut rest: Vec<usize> = Vec::new();
    for with_image in [true, false] {
        let of_modality: Vec<usize> = order
            .iter()
            .copied()
            .filter(|&i| records[i].image.is_some() == with_image)
            .collect();
        let mut batches: Vec<Vec<usize>> = Vec::new();
        for mega in of_modality.chunks(batch_size * MEGABATCH_BATCHES) {
            let mut mega = mega.to_vec();
            mega.sort_by_key(|&i| std::cmp::Reverse(word_length(&records[i])));
            batches.extend(mega.chunks(batch_size).map(<[usize]>::to_vec));
        }
        if batches.last().is_some_and(|b| b.len() < batch_size) {
            rest.extend(batches.pop().unwrap_or_default());
        }
        full.extend(batches);
    }
    let mut rng =
        rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ epoch);
    full.shuffle(&mut rng);
    full.into_iter().flatten().chain(rest).collect()
}

/// One usable sample.
pub struct Item {
    pub sample: TokenizedSample,
    pub image: Option<ProcessedImage>,
}

/// Model inputs for one micro-batch (right-padded, as LLaVA trains).
pub struct Batch {
    pub input_ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    pub attention_mask: Tensor,
    /// The images of the samples that have one, in batch order.
    pub images: Option<ImageInputs>,
    /// Positions that take loss, over the whole batch.
    pub supervised_tokens: usize,
    pub tokens: usize,
}

/// Counts of what loading skipped or cut, for the warnings at the end of an epoch.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DataStats {
    pub skipped: usize,
    pub truncated: usize,
}

/// Skips a bad record with a counted warning naming its id, or with `strict` fails on it.
fn skip_record(id: &str, reason: &str, strict: bool, stats: &mut DataStats) -> Result<()> {
    if strict {
        return Err(TrainError::Data(format!("record {id}: {reason}")));
    }
    stats.skipped += 1;
    tracing::warn!(id = %id, "skipping record: {reason}");
    Ok(())
}

/// The records of a dataset file (`read_records`), its malformed ones skipped as any bad
/// record is: a counted warning naming each, or with `strict` an error on the first.
pub fn usable_records(
    entries: Vec<std::result::Result<LlavaRecord, MalformedRecord>>,
    strict: bool,
    stats: &mut DataStats,
) -> Result<Vec<LlavaRecord>> {
    let mut records = Vec::with_capacity(entries.len());
    for entry in entries {
        match entry {
            Ok(record) => records.push(record),
            Err(bad) => skip_record(&bad.id, &bad.reason(), strict, stats)?,
        }
    }
    Ok(records)
}

impl TrainDataset {
    /// The record order of one epoch: shuffled from (seed, epoch), so a resumed run sees the
    /// same order without storing it.
    pub fn order(&self, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.records.len()).collect();
        if shuffle {
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch);
            order.shuffle(&mut rng);
        }
        order
    }

    /// Loads record `i`, or `None` (with a warning) when it is bad and not `strict`.
    pub fn item(&self, i: usize, stats: &mut DataStats) -> Result<Option<Item>> {
        let record = &self.records[i];
        match self.try_item(record) {
            Ok(item) => {
                if item.sample.truncated {
                    stats.truncated += 1;
                    tracing::warn!(id = %record.id_string(), "sample truncated at --max-length {}", self.sample.max_length);
                }
                if !item.sample.labels.iter().any(|&l| l != IGNORE_INDEX) {
                    return self.skip(
                        record,
                        "no supervised token left (truncated away?)".into(),
                        stats,
                    );
                }
                Ok(Some(item))
            }
            Err(e) => self.skip(record, e.to_string(), stats),
        }
    }

    fn skip(
        &self,
        record: &LlavaRecord,
        reason: String,
        stats: &mut DataStats,
    ) -> Result<Option<Item>> {
        skip_record(&record.id_string(), &reason, self.strict, stats)?;
        Ok(None)
    }

    fn try_item(&self, record: &LlavaRecord) -> std::result::Result<Item, String> {
        // The image first: its size sets how many positions it takes.
        let image = match record.image_path(self.image_folder.as_deref()) {
            None => None,
            Some(path) => Some(
                self.image_processor
                    .process_path(&path)
                    .map_err(|e| e.to_string())?,
            ),
        };
        let opts = match &image {
            Some(image) => SampleOptions {
                image_seq_len: self
                    .model_config
                    .image_token_count(image.image_size)
                    .map_err(|e| e.to_string())?,
                ..self.sample.clone()
            },
            None => self.sample.clone(),
        };
        let sample = tokenize_record(&self.tokenizer, record, &opts).map_err(|e| e.to_string())?;
        // A cut through the image's positions leaves features with nowhere to go.
        if image.is_some() {
            let id = opts.image_tokens.id();
            let kept = sample.input_ids.iter().filter(|&&t| t == id).count();
            if kept < opts.image_seq_len {
                return Err(format!(
                    "--max-length {} cuts through its image",
                    opts.max_length
                ));
            }
        }
        Ok(Item { sample, image })
    }

    /// Pads items to the longest one: `pad_id` and label -100 on the right, mask 0 there.
    pub fn collate(&self, items: &[Item], device: &Device) -> Result<Batch> {
        let width = items
            .iter()
            .map(|it| it.sample.input_ids.len())
            .max()
            .unwrap_or(0);
        let mut input_ids = Vec::with_capacity(items.len());
        let mut labels = Vec::with_capacity(items.len());
        let mut mask = Vec::with_capacity(items.len() * width);
        let mut images = Vec::new();
        let mut supervised_tokens = 0;
        let mut tokens = 0;
        for it in items {
            let s = &it.sample;
            let pad = width - s.input_ids.len();
            let mut ids = s.input_ids.clone();
            ids.extend(std::iter::repeat_n(self.pad_id, pad));
            let mut lab = s.labels.clone();
            lab.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
            mask.extend(
                std::iter::repeat_n(1u8, s.input_ids.len()).chain(std::iter::repeat_n(0u8, pad)),
            );
            supervised_tokens += s
                .labels
                .iter()
                .skip(1)
                .filter(|&&l| l != IGNORE_INDEX)
                .count();
            tokens += s.input_ids.len();
            input_ids.push(ids);
            labels.push(lab);
            if let Some(image) = &it.image {
                images.push(image.clone());
            }
        }
        let attention_mask =
            Tensor::from_vec(mask, (items.len(), width), device)?.to_dtype(DType::U8)?;
        let images = if images.is_empty() {
            None
        } else {
            Some(ImageInputs::new(&images, device)?)
        };
        Ok(Batch {
            input_ids,
            labels,
            attention_mask,
            images,
            supervised_tokens,
            tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_data::record::Turn;

    fn record(words: usize, image: bool) -> LlavaRecord {
        LlavaRecord {
            id: serde_json::json!(words),
            image: image.then(|| "x.png".to_string()),
            conversations: vec![Turn::human("q"), Turn::gpt(vec!["w"; words].join(" "))],
        }
    }

    #[test]
    fn grouped_batches_have_one_modality_and_sorted_lengths() {
        let records: Vec<LlavaRecord> = (0..103).map(|i| record(i * 7 % 31, i % 3 == 0)).collect();
        let order: Vec<usize> = (0..records.len()).rev().collect();
        let grouped = group_by_modality_length(&records, &order, 4, 1, 0);
        let mut sorted = grouped.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (0..records.len()).collect::<Vec<_>>(),
            "a permutation"
        );
        // 35 records with an image and 68 without: 8 + 17 full batches, then 3 left over.
        let (full, rest) = grouped.split_at(25 * 4);
        for batch in full.chunks(4) {
            let modality = records[batch[0]].image.is_some();
            assert!(
                batch
                    .iter()
                    .all(|&i| records[i].image.is_some() == modality)
            );
            let lengths: Vec<usize> = batch.iter().map(|&i| word_length(&records[i])).collect();
            assert!(lengths.windows(2).all(|w| w[0] >= w[1]), "{lengths:?}");
        }
        assert_eq!(rest.len(), 3);
        // The batch order is shuffled, not all image batches first.
        let first_modalities: Vec<bool> = full
            .chunks(4)
            .map(|b| records[b[0]].image.is_some())
            .collect();
        assert!(
            first_modalities[..8].iter().any(|m| !m),
            "{first_modalities:?}"
        );
        // Seeded: the same call gives the same order, another epoch another.
        assert_eq!(grouped, group_by_modality_length(&records, &order, 4, 1, 0));
        assert_ne!(grouped, group_by_modality_length(&records, &order, 4, 1, 1));
    }
}
