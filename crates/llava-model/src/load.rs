//! Reading and writing checkpoints: finding a model's files, reading tensors by their
//! canonical names from every layout in the wild, peft adapters, and writing the HF layout.
//! The loader hands out tensors; it knows nothing of the layers built from them.

pub mod checkpoint;
pub mod json;
pub mod lora;
pub mod precision;
pub mod pytorch_file;
pub mod safetensors_file;
pub mod save;
pub mod weights;
