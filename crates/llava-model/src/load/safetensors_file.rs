//! Reading one safetensors file tensor by tensor with positioned reads.
//!
//! Not memory-mapped on purpose: the pages of a mapped file count towards the process's
//! resident memory while the copy into tensor storage exists too, so mmap loading peaks at twice
//! the model's size. Reading each tensor straight into its typed buffer peaks at the model plus
//! one tensor. The header is validated against the file's length up front, so a truncated shard
//! is reported when it is opened, naming the file.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, WithDType};
use serde::Deserialize;

use crate::error::{ModelError, Result};
use crate::kernels::gemm_layout::ViaBf16;
use crate::kernels::gemv::Widen;

/// Headers are JSON; anything near this size is not a real header.
const MAX_HEADER: u64 = 100 << 20;

#[derive(Debug, Deserialize)]
struct Entry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    data_start: u64,
    entries: HashMap<String, Entry>,
}

fn dtype_size(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| ModelError::Safetensors {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let len = file
            .metadata()
            .map_err(|source| ModelError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        let mut n = [0u8; 8];
        read_at(&file, &mut n, 0)
            .map_err(|_| bad(format!("only {len} bytes, too short for a header")))?;
        let header_len = u64::from_le_bytes(n);
        if header_len > MAX_HEADER || 8 + header_len > len {
            return Err(bad(format!(
                "header claims {header_len} bytes but the file has {len}"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        read_at(&file, &mut header, 8).map_err(|e| bad(e.to_string()))?;
        let mut raw: HashMap<String, serde_json::Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        raw.remove("__metadata__");
        let data_start = 8 + header_len;
        let data_len = len - data_start;
        let mut entries = HashMap::with_capacity(raw.len());
        for (name, value) in raw {
            let entry: Entry = serde_json::from_value(value)
                .map_err(|e| bad(format!("tensor `{name}`: bad header entry: {e}")))?;
            let [begin, end] = entry.data_offsets;
            let size = dtype_size(&entry.dtype)
                .ok_or_else(|| bad(format!("tensor `{name}`: unknown dtype {}", entry.dtype)))?;
            // Checked: a corrupt shape must not wrap around to a size that fits.
            let bytes = entry
                .shape
                .iter()
                .try_fold(size, |n, &d| n.checked_mul(d as u64));
            if end < begin || bytes != Some(end - begin) {
                return Err(bad(format!(
                    "tensor `{name}`: offsets {begin}..{end} do not fit shape {:?}",
                    entry.shape
                )));
            }
            if end > data_len {
                return Err(bad(format!(
                    "tensor `{name}` ends at byte {end} of the data, but the file holds only {data_len}"
                )));
            }
            entries.insert(name, entry);
        }
        check_layout(&entries, data_len).map_err(bad)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            data_start,
            entries,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Reads one tensor in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let bad = |message: String| ModelError::Safetensors {
            path: self.path.clone(),
            message,
        };
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| bad(format!("no tensor `{name}`")))?;
        let offset = self.data_start + entry.data_offsets[0];
        match entry.dtype.as_str() {
            "F32" => self.read_typed::<f32>(entry, offset, device),
            "F16" => self.read_typed::<half::f16>(entry, offset, device),
            "BF16" => self.read_typed::<half::bf16>(entry, offset, device),
            "F64" => self.read_typed::<f64>(entry, offset, device),
            other => Err(bad(format!(
                "tensor `{name}` has dtype {other}; weights must be F32, F16, BF16 or F64"
            ))),
        }
    }

    /// A rank-2 F32, F16 or BF16 tensor in [`crate::kernels::gemm_layout`] (f32, transposed block by
    /// block as it is read); `None` for any other tensor, which the caller loads as stored.
    /// `via_bf16` rounds F32 and F16 values to bf16 on the way, as a bf16 compute dtype would.
    pub fn load_transposed(&self, name: &str, via_bf16: bool) -> Result<Option<Tensor>> {
        let Some(entry) = self.entries.get(name) else {
            return Ok(None);
        };
        let &[n, k] = entry.shape.as_slice() else {
            return Ok(None);
        };
        let offset = self.data_start + entry.data_offsets[0];
        match (entry.dtype.as_str(), via_bf16) {
            ("F32", false) => self.read_transposed::<f32>(offset, n, k).map(Some),
            ("F32", true) => self.read_transposed::<ViaBf16<f32>>(offset, n, k).map(Some),
            ("F16", false) => self.read_transposed::<half::f16>(offset, n, k).map(Some),
            ("F16", true) => self
                .read_transposed::<ViaBf16<half::f16>>(offset, n, k)
                .map(Some),
            ("BF16", _) => self.read_transposed::<half::bf16>(offset, n, k).map(Some),
            _ => Ok(None),
        }
    }

    fn read_transposed<T: Widen + Default + bytemuck::Pod>(
        &self,
        offset: u64,
        n: usize,
        k: usize,
    ) -> Result<Tensor> {
        let row_bytes = (k * std::mem::size_of::<T>()) as u64;
        crate::kernels::gemm_layout::from_row_blocks(n, k, |first, block: &mut [T]| {
            self.read_values(block, offset + first as u64 * row_bytes)
        })
    }

    fn read_typed<T: WithDType + bytemuck::Pod>(
        &self,
        entry: &Entry,
        offset: u64,
        device: &Device,
    ) -> Result<Tensor> {
        let numel: usize = entry.shape.iter().product();
        let mut data = vec![T::zeroed(); numel];
        self.read_values(&mut data, offset)?;
        Ok(Tensor::from_vec(data, entry.shape.as_slice(), device)?)
    }

    /// Fills `values` from the file at byte `offset`. safetensors stores little-endian data,
    /// the byte order of every platform candle runs on.
    fn read_values<T: bytemuck::Pod>(&self, values: &mut [T], offset: u64) -> Result<()> {
        read_at(&self.file, bytemuck::cast_slice_mut(values), offset).map_err(|source| {
            ModelError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// The tensors must tile the data exactly, as the safetensors format requires: overlapping or
/// shared bytes (or a key written twice, whose first bytes are then nobody's) mean a damaged
/// header, and reading through it would load the wrong numbers without an error.
fn check_layout(
    entries: &HashMap<String, Entry>,
    data_len: u64,
) -> std::result::Result<(), String> {
    let mut spans: Vec<(u64, u64, &str)> = entries
        .iter()
        .map(|(name, e)| (e.data_offsets[0], e.data_offsets[1], name.as_str()))
        .collect();
    spans.sort_unstable();
    let mut covered = 0;
    let mut previous = None;
    for (begin, end, name) in spans {
        if begin < covered {
            let other = previous.unwrap_or("?");
            return Err(format!(
                "tensors `{other}` and `{name}` share bytes (the header is damaged)"
            ));
        }
        if begin > covered {
            return Err(format!(
                "bytes {covered}..{begin} of the data belong to no tensor (the header is damaged, or names a tensor twice)"
            ));
        }
        covered = end;
        previous = Some(name);
    }
    if covered != data_len {
        return Err(format!(
            "the tensors end at byte {covered} of the data, but the file holds {data_len}"
        ));
    }
    Ok(())
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        let n = file.seek_read(buf, offset)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
        offset += n as u64;
    }
    Ok(())
}
