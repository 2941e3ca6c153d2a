//! The LLaVA model: CLIP vision tower → projector → LLaMA, on candle, with weights in the HF
//! llava layout or the original liuhaotian layout. One model serves inference and training.

pub mod amx;
pub mod anyres;
pub mod attention;
pub mod batch_decode;
pub mod checkpoint;
pub mod config;
pub mod cuda_kernels;
pub mod error;
pub mod fused;
pub mod gemm_layout;
pub mod gemv;
pub mod generation;
pub mod image_inputs;
pub mod init;
pub mod language_model;
pub mod llava;
pub mod lora;
pub mod loss;
pub mod nn;
pub mod pipeline;
pub mod projector;
pub mod prompt_cache;
pub mod pytorch_file;
pub mod q8;
pub mod quantized;
pub mod reply_text;
pub mod rope;
pub mod safetensors_file;
pub mod save;
pub mod vision_tower;
pub mod weights;

pub use candle_core::{DType, Device, Tensor};
pub use checkpoint::{Checkpoint, Layout};
pub use config::LlavaConfig;
pub use error::{ModelError, Result};
pub use llava::Llava;
