//! The paper's parts and their layers: CLIP `vision_tower`, `multi_modal_projector`, the
//! LLaMA `language_model`, their composition [`llava::Llava`], and the training loss.

pub mod anyres;
pub mod image_inputs;
pub mod init;
pub mod kv_cache;
pub mod language_model;
pub mod llava;
pub mod lora;
pub mod loss;
pub mod nn;
pub mod projector;
pub mod quantized;
pub mod recompute;
pub mod vision_tower;
