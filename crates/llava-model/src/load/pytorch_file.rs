//! Reading one PyTorch `.bin` checkpoint (`torch.save` of a state dict), the format of the
//! original LLaVA releases (`pytorch_model-0000N-of-0000M.bin`, `mm_projector.bin`) and of
//! OpenAI's CLIP on the hub.
//!
//! The file is a zip archive holding a pickled dict and one entry per tensor storage. candle's
//! `pickle` module interprets the pickle without running any code from it (only the opcodes of a
//! state dict are understood) and reads a tensor's storage when it is asked for.

use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};

pub struct PytorchFile {
    path: PathBuf,
    tensors: PthTensors,
}

impl std::fmt::Debug for PytorchFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PytorchFile")
            .field("path", &self.path)
            .finish()
    }
}

impl PytorchFile {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::Io {
                path: path.to_path_buf(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        let tensors = PthTensors::new(path, None).map_err(|e| bad(path, e))?;
        if tensors.tensor_infos().is_empty() {
            return Err(bad(path, "it holds no state dict of tensors"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.tensor_infos().keys().map(String::as_str)
    }

    /// Reads one tensor in its stored dtype.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let missing = || bad(&self.path, format!("no tensor `{name}`"));
        let info = self.tensors.tensor_infos().get(name).ok_or_else(missing)?;
        if !matches!(
            info.dtype,
            DType::F32 | DType::F16 | DType::BF16 | DType::F64
        ) {
            return Err(bad(
                &self.path,
                format!(
                    "tensor `{name}` has dtype {:?}; weights must be F32, F16, BF16 or F64",
                    info.dtype
                ),
            ));
        }
        let tensor = self
            .tensors
            .get(name)
            .map_err(|e| bad(&self.path, e))?
            .ok_or_else(missing)?;
        // A transposed (Fortran-order) storage comes back as a strided view.
        Ok(tensor.contiguous()?.to_device(device)?)
    }
}

fn bad(path: &Path, message: impl ToString) -> ModelError {
    ModelError::Pytorch {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_a_zip_archive_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("llava-pth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("pytorch_model.bin");
        std::fs::write(&path, b"not a checkpoint").expect("write");
        let err = PytorchFile::open(&path).expect_err("must fail").to_string();
        assert!(err.contains("pytorch_model.bin"), "{err}");
        assert!(err.contains("PyTorch"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
