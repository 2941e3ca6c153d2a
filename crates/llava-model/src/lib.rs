//! The LLaVA model: CLIP vision tower → projector → LLaMA, on candle, with weights in the HF
//! llava layout or the original liuhaotian layout. One model serves inference and training.
//!
//! Five rooms, each importing only the ones before it (`tests/rooms.rs` checks this):
//! - [`kernels`]: hand-written CPU/GPU kernels and their dispatch checks;
//! - [`config`]: `config.json` and what it implies (rope, LLaVA-NeXT's grid, token counts);
//! - [`load`]: checkpoint discovery, weight files and names, adapters, saving;
//! - [`model`]: the paper's parts, built from the loader's tensors;
//! - [`generate`]: sampling, batches, the prompt cache and the end-to-end pipeline.

pub mod error;

pub mod kernels;

pub mod config;

pub mod load;

pub mod model;

pub mod generate;

// The flat paths other crates have used since before the rooms (`llava_model::pipeline::…`).
pub use config::rope;
pub use generate::{batch_decode, generation, pipeline, prompt_cache, reply_text};
pub use kernels::{
    amx, attention, bf16_linear, cuda_kernels, decode_attention, fused, gemm_layout, gemv, q8,
};
pub use load::{checkpoint, lora, pytorch_file, safetensors_file, save, weights};
pub use model::{
    image_inputs, init, language_model, llava, loss, nn, projector, quantized, vision_tower,
};

pub use candle_core::{DType, Device, Tensor};
pub use checkpoint::{Checkpoint, Layout};
pub use config::LlavaConfig;
pub use error::{ModelError, Result};
pub use llava::Llava;
