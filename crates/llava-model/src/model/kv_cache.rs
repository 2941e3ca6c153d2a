//! The decoder's KV cache: each layer's keys and values for the positions seen so far, with
//! room for the next ones.
//!
//! Appending a decoded token by concatenation copies the whole cache: at 617 positions of
//! tiny-1b that is 28 MB read and written per token, several milliseconds of a 4-bit step that
//! takes 30. So each layer keeps its keys and values in buffers with room for [`ROOM`] more
//! positions, a new position is written in place, and the cache is copied only when the room
//! runs out or a clone of the cache still shares the buffers.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{ModelError, Result};

/// Positions a layer's buffers grow by when they run out of room: a copy of the cache every
/// `ROOM` decoded tokens instead of every token, and at most `ROOM` unused positions.
pub const ROOM: usize = 128;

/// One layer's keys and values: the first `len` positions of buffers `[batch, kv_heads,
/// capacity, head_dim]`.
#[derive(Debug, Clone)]
pub(crate) struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
    /// Shared by the clones of this layer: while a clone holds the same buffers (a prompt
    /// cache that several requests continue), appending copies them first.
    owner: Arc<()>,
}

impl LayerKv {
    /// Holds `k` and `v` (`[batch, kv_heads, seq, head_dim]`) as they are, with no room: what a
    /// prefill or a training step stores, with nothing copied.
    pub(crate) fn new(k: Tensor, v: Tensor) -> Result<Self> {
        let len = k.dim(2)?;
        Ok(Self {
            k,
            v,
            len,
            owner: Arc::new(()),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The cached keys, `[batch, kv_heads, len, head_dim]` (a view of the buffer).
    pub(crate) fn keys(&self) -> Result<Tensor> {
        Ok(self.k.narrow(2, 0, self.len)?)
    }

    /// The cached values, as [`Self::keys`].
    pub(crate) fn values(&self) -> Result<Tensor> {
        Ok(self.v.narrow(2, 0, self.len)?)
    }

    /// Appends the new positions `k` and `v` (`[batch, kv_heads, s, head_dim]`) and returns
    /// every cached key and value. In place where there is room and no clone shares the
    /// buffers; otherwise into new buffers with [`ROOM`] positions to spare.
    ///
    /// The write is not differentiable, so training (whose steps start from an empty cache)
    /// appends by concatenation.
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
        in_place: bool,
    ) -> Result<(Tensor, Tensor)> {
        let s = k.dim(2)?;
        if !in_place {
            let (k, v) = (
                Tensor::cat(&[&self.keys()?, k], 2)?,
                Tensor::cat(&[&self.values()?, v], 2)?,
            );
            *self = Self::new(k.clone(), v.clone())?;
            return Ok((k, v));
        }
        let room = self.k.dim(2)? - self.len;
        if s > room || Arc::strong_count(&self.owner) > 1 {
            let grow = |old: &Tensor, new: &Tensor| -> Result<Tensor> {
                let (b, h, _, d) = new.dims4()?;
                // Up to the next multiple of ROOM past the new positions.
                let spare = ROOM - (self.len + s) % ROOM;
                let spare = Tensor::zeros((b, h, spare, d), new.dtype(), new.device())?;
                Ok(Tensor::cat(&[old, new, &spare], 2)?)
            };
            let (k, v) = (grow(&self.keys()?, k)?, grow(&self.values()?, v)?);
            *self = Self {
                k,
                v,
                len: self.len + s,
                owner: Arc::new(()),
            };
        } else {
            self.k.slice_set(&k.contiguous()?, 2, self.len)?;
            self.v.slice_set(&v.contiguous()?, 2, self.len)?;
            self.len += s;
        }
        Ok((self.keys()?, self.values()?))
    }

    /// The same positions in buffers of their own, exactly as long: after rows or positions
    /// were cut, so that what was cut is freed now.
    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Self::new(f(&self.keys()?)?, f(&self.values()?)?)
    }
}

/// Keys and values of every layer for the positions seen so far: `[batch, kv_heads, seq, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
    /// The attention mask over cached positions (1 = real token), kept for padded batches.
    pub(crate) mask: Option<Tensor>,
    /// Each row's padding slots at the left of a batch that is generated together; empty when
    /// nothing is padded on the left. Row `r`'s slot `j` holds position `j - left_pad[r]`:
    /// transformers' generate numbers positions from the attention mask the same way, so a
    /// padded row sees the rotary angles it would see alone. (Rotary scores depend only on
    /// the distance between positions, so numbering from the first slot instead would change
    /// the logits by rounding only; the batch tests cannot tell the two apart.)
    pub(crate) left_pad: Vec<usize>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty cache for a batch whose row `r` starts with `left_pad[r]` padding slots.
    pub fn left_padded(left_pad: Vec<usize>) -> Self {
        Self {
            left_pad,
            ..Self::default()
        }
    }

    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, LayerKv::len)
    }

    /// The first layer's keys, `[rows, kv_heads, seq, head_dim]`: every layer's have that
    /// shape. `None` when nothing has been run through the cache.
    pub(crate) fn first_keys(&self) -> Option<Result<Tensor>> {
        self.layers.iter().flatten().next().map(LayerKv::keys)
    }

    /// Replaces every layer's keys and values by `f` of them.
    pub(crate) fn map_layers(&mut self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        for layer in self.layers.iter_mut().flatten() {
            *layer = layer.map(&f)?;
        }
        Ok(())
    }

    /// Forgets every position from `len` on, so that a prompt which shares only the first `len`
    /// tokens with what is cached can go on from there.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.seq_len() {
            return Ok(());
        }
        if len == 0 {
            *self = Self::default();
            return Ok(());
        }
        // Copied out rather than kept as views, so that the memory of the forgotten positions is
        // freed now, not only when the next forward pass appends to the cache: the next
        // question's vision tower would otherwise run beside it.
        self.map_layers(|x| Ok(x.narrow(2, 0, len)?.contiguous()?))?;
        if let Some(m) = &mut self.mask {
            *m = m.narrow(1, 0, len)?;
        }
        Ok(())
    }

    /// Keeps only the batch rows `rows` (in that order), as a batch whose finished rows stop
    /// being computed. Leading slots that are padding in every kept row are dropped too.
    pub fn keep_rows(&mut self, rows: &[usize]) -> Result<()> {
        let batch = self.left_pad.len();
        if rows.is_empty() || rows.iter().any(|&r| r >= batch) {
            return Err(ModelError::Input(format!(
                "rows {rows:?} are not rows of a left-padded batch of {batch}"
            )));
        }
        let drop = rows.iter().map(|&r| self.left_pad[r]).min().unwrap_or(0);
        let Some(keys) = self.first_keys() else {
            return Err(ModelError::Input("the cache is empty".into()));
        };
        let device = keys?.device().clone();
        let t = self.seq_len();
        let index = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &device,
        )?;
        // `index_select` takes contiguous tensors: the cache's keys are views with room.
        let keep = |x: &Tensor, dim: usize| -> Result<Tensor> {
            Ok(x.narrow(dim, drop, t - drop)?
                .contiguous()?
                .index_select(&index, 0)?)
        };
        self.map_layers(|x| keep(x, 2))?;
        if let Some(m) = &mut self.mask {
            *m = keep(m, 1)?;
        }
        self.left_pad = rows.iter().map(|&r| self.left_pad[r] - drop).collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn positions(from: usize, s: usize) -> Tensor {
        // [1, 2, s, 3]: each value names its head, position and lane.
        let v: Vec<f32> = (0..2)
            .flat_map(|h| {
                (from..from + s)
                    .flat_map(move |p| (0..3).map(move |l| (h * 10_000 + p * 10 + l) as f32))
            })
            .collect();
        Tensor::from_vec(v, (1, 2, s, 3), &Device::Cpu).unwrap()
    }

    /// Appending in place, across the growth of the buffers, and into a clone gives what
    /// concatenation gives, and a clone never sees the other's later positions.
    #[test]
    fn appends_equal_concatenation_and_clones_stay_apart() -> Result<()> {
        let mut layer = LayerKv::new(positions(0, 5), positions(0, 5))?;
        let mut at = 5;
        for s in [1, 1, ROOM - 3, 1, 1, 2 * ROOM + 1, 1] {
            let (k, v) = layer.append(&positions(at, s), &positions(at, s), true)?;
            at += s;
            let want = positions(0, at).flatten_all()?.to_vec1::<f32>()?;
            assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, want);
            assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, want);
            assert!(layer.k.dim(2)? >= at && layer.k.dim(2)? <= at + ROOM);
        }
        let mut clone = layer.clone();
        let (a, _) = layer.append(&positions(at, 1), &positions(at, 1), true)?;
        let (b, _) = clone.append(&(positions(at, 1) + 0.5)?, &positions(at, 1), true)?;
        let last = |x: &Tensor| -> Result<Vec<f32>> {
            Ok(x.narrow(2, at, 1)?.flatten_all()?.to_vec1::<f32>()?)
        };
        assert_eq!(last(&a)?, positions(at, 1).flatten_all()?.to_vec1::<f32>()?);
        assert_eq!(
            last(&b)?,
            (positions(at, 1) + 0.5)?.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
