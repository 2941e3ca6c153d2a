//! A conversation's decoder state, kept from one turn to the next.
//!
//! Each turn of a chat renders the whole conversation again, so its prompt begins with the
//! previous prompt and reply. With their keys and values kept, only the tokens after that shared
//! beginning need a forward pass, and an image inside it needs no second pass through the vision
//! tower: a follow-up question costs its own few tokens, not the image's hundreds.
//!
//! The shared beginning is found by comparing token ids, not text, so the tokens that run are
//! exactly the new prompt's, whatever the template and tokenizer did to the earlier reply. Every
//! image is the same placeholder id, so an image inside the shared part must also have the same
//! pixels, or the cache is cut where its span begins.
//!
//! How exact it is, on the CPU: positions that an earlier prefill computed (a system prompt and
//! image that questions share, as in `llava eval answer`) give the logits of a fresh run bit for
//! bit, since the new tokens always take the prefill's products. Positions that decoding
//! computed one at a time (a chat's earlier reply) went through the GEMV instead, and agree with
//! a fresh prefill of them to rounding (tests/prompt_cache.rs checks the first to the bit, the
//! second by the tokens a chat generates).

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::model::image_inputs::ImageInputs;
use crate::model::language_model::KvCache;

#[derive(Debug, Clone, Default)]
pub struct PromptCache {
    pub(crate) kv: KvCache,
    /// The ids whose keys and values `kv` holds, in order.
    ids: Vec<u32>,
    /// The pixel values (`[tiles, 3, H, W]`) of each image whose span `ids` holds, in order.
    images: Vec<Tensor>,
}

/// How much of a new prompt the cache already holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reuse {
    /// Leading prompt positions whose keys and values are kept.
    pub tokens: usize,
    /// Images among them, whose features need not be computed again.
    pub images: usize,
}

impl PromptCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything, e.g. when the conversation starts over.
    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keeps the longest beginning of `ids` that the cache holds, and forgets the rest. At least
    /// the last `rerun` tokens (and never fewer than one, whose position gives the next
    /// token's logits) are left to run. `images` are the prompt's images, in the order of
    /// their spans of placeholder ids `image_token`, whose lengths `spans` gives.
    pub(crate) fn reuse(
        &mut self,
        ids: &[u32],
        images: Option<&ImageInputs>,
        spans: (u32, &[usize]),
        rerun: usize,
    ) -> Result<Reuse> {
        let reuse = self.shared(ids, images, spans, rerun)?;
        self.kv.truncate(reuse.tokens)?;
        self.ids.truncate(reuse.tokens);
        self.images.truncate(reuse.images);
        Ok(reuse)
    }

    /// What [`PromptCache::reuse`] would keep, leaving the cache as it is.
    pub(crate) fn shared(
        &self,
        ids: &[u32],
        images: Option<&ImageInputs>,
        (image_token, spans): (u32, &[usize]),
        rerun: usize,
    ) -> Result<Reuse> {
        let mut keep = self
            .ids
            .iter()
            .zip(ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(ids.len().saturating_sub(rerun.max(1)));
        let mut n_images = 0;
        let mut p = 0;
        while p < keep {
            if ids[p] != image_token {
                p += 1;
                continue;
            }
            // An image is kept whole, and only if it is the same picture.
            let span = spans.get(n_images).copied().unwrap_or(0);
            let same = p + span <= keep
                && match (
                    self.images.get(n_images),
                    images.and_then(|i| i.pixel_values.get(n_images)),
                ) {
                    (Some(cached), Some(new)) => same_pixels(cached, new)?,
                    _ => false,
                };
            if !same {
                keep = p;
                break;
            }
            n_images += 1;
            p += span.max(1);
        }
        Ok(Reuse {
            tokens: keep,
            images: n_images,
        })
    }

    /// The keys and values, leaving the cache empty: after
    /// [`crate::generate::generation::prefill_with_cache`], a server moves them into its batch.
    pub fn take_kv(&mut self) -> KvCache {
        let kv = std::mem::take(&mut self.kv);
        self.clear();
        kv
    }

    /// A cache of `kv`, which holds the keys and values of `prompt` (with its `images`) and then
    /// of `fed`, the generated tokens that went through the model: a sequence that leaves a
    /// server's batch ([`crate::generate::batch_decode::take_row`]) is kept this way.
    pub fn from_kv(
        kv: KvCache,
        prompt: &[u32],
        images: Option<&ImageInputs>,
        fed: &[u32],
    ) -> Result<Self> {
        if kv.seq_len() != prompt.len() + fed.len() {
            return Err(ModelError::Input(format!(
                "a cache of {} positions cannot hold {} prompt and {} generated tokens",
                kv.seq_len(),
                prompt.len(),
                fed.len()
            )));
        }
        let mut cache = Self {
            kv,
            ..Self::default()
        };
        cache.record(prompt, images, fed)?;
        Ok(cache)
    }

    /// Whether this cache holds everything `earlier` does (its tokens, then more, with the same
    /// pictures), so that `earlier` is of no more use beside it.
    pub fn extends(&self, earlier: &PromptCache) -> Result<bool> {
        if !self.ids.starts_with(&earlier.ids) || self.images.len() < earlier.images.len() {
            return Ok(false);
        }
        for (a, b) in self.images.iter().zip(&earlier.images) {
            if !same_pixels(a, b)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Records what a generation added after [`PromptCache::reuse`]: the whole prompt, its
    /// images, and the generated tokens that went through the model (all but the last).
    pub(crate) fn record(
        &mut self,
        prompt: &[u32],
        images: Option<&ImageInputs>,
        fed: &[u32],
    ) -> Result<()> {
        self.ids.clear();
        self.ids.extend_from_slice(prompt);
        self.ids.extend_from_slice(fed);
        self.images = images.map(|i| i.pixel_values.clone()).unwrap_or_default();
        Ok(())
    }
}

fn same_pixels(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() {
        return Ok(false);
    }
    let values = |t: &Tensor| t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>();
    Ok(values(a)? == values(b)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const IMG: u32 = 99;
    /// Image placeholder id and the span lengths of the images in these tests.
    const SPAN: (u32, &[usize]) = (IMG, &[2, 2]);

    /// One-pixel, one-tile images.
    fn pixels(values: &[f32]) -> ImageInputs {
        let t = Tensor::from_vec(values.to_vec(), (values.len(), 1, 1, 1), &Device::Cpu)
            .expect("pixels");
        ImageInputs::from_tensor(&t).expect("images")
    }

    fn cached(ids: &[u32], images: &ImageInputs) -> PromptCache {
        let mut c = PromptCache::new();
        c.record(ids, Some(images), &[]).expect("record");
        c
    }

    #[test]
    fn keeps_the_shared_beginning_and_leaves_the_last_token_to_run() {
        let mut c = PromptCache::new();
        c.record(&[1, 2, 3, 4], None, &[5]).expect("record");
        let r = c
            .reuse(&[1, 2, 3, 4, 5, 6, 7], None, SPAN, 1)
            .expect("reuse");
        assert_eq!(
            r,
            Reuse {
                tokens: 5,
                images: 0
            }
        );
        // The same prompt again: everything but its last token.
        let r = c.reuse(&[1, 2, 3, 4, 5], None, SPAN, 1).expect("reuse");
        assert_eq!(r.tokens, 4);
        assert_eq!(c.len(), 4);
        // Asked to run the last five again, it keeps two of the four it could.
        let r = c
            .reuse(&[1, 2, 3, 4, 9, 9, 9], None, SPAN, 5)
            .expect("reuse");
        assert_eq!(r.tokens, 2);
        // A different beginning keeps nothing.
        assert_eq!(c.reuse(&[7, 2], None, SPAN, 1).expect("reuse").tokens, 0);
        assert!(c.is_empty());
    }

    #[test]
    fn a_later_turn_extends_an_earlier_one_only_with_the_same_pictures() {
        let ids = [1, IMG, IMG, 2];
        let earlier = cached(&ids, &pixels(&[0.5]));
        let later = cached(&[1, IMG, IMG, 2, 3, 4], &pixels(&[0.5]));
        assert!(later.extends(&earlier).expect("compare"));
        assert!(!earlier.extends(&later).expect("compare"));
        let other = cached(&[1, IMG, IMG, 2, 3, 4], &pixels(&[0.75]));
        assert!(!other.extends(&earlier).expect("compare"));
        // from_kv refuses keys and values of another length than the tokens.
        assert!(PromptCache::from_kv(KvCache::new(), &ids, None, &[]).is_err());
    }

    #[test]
    fn an_image_is_kept_only_whole_and_with_the_same_pixels() {
        let ids = [1, IMG, IMG, 2, IMG, IMG, 3];
        let two = pixels(&[0.5, 0.25]);
        let mut c = cached(&ids, &two);
        let next = [1, IMG, IMG, 2, IMG, IMG, 3, 4, 5];
        assert_eq!(
            c.reuse(&next, Some(&two), SPAN, 1).expect("reuse"),
            Reuse {
                tokens: 7,
                images: 2
            }
        );
        // The second picture changed: cut where its span begins.
        let mut c = cached(&ids, &two);
        let other = pixels(&[0.5, 0.75]);
        assert_eq!(
            c.reuse(&next, Some(&other), SPAN, 1).expect("reuse"),
            Reuse {
                tokens: 4,
                images: 1
            }
        );
        // A prompt that shares only half of an image's span keeps nothing of it.
        let mut c = cached(&ids, &two);
        assert_eq!(
            c.reuse(&[1, IMG, 7], Some(&pixels(&[0.5])), SPAN, 1)
                .expect("reuse"),
            Reuse {
                tokens: 1,
                images: 0
            }
        );
    }
}
