//! `llava init`: random-weight checkpoints of real shapes, in the HF llava layout, for
//! benchmarks and smoke tests where no released weights can be had.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{
    ClipVisionConfig, FeatureLayer, LlamaConfig, LlavaConfig, RopeParameters, SelectStrategy,
    TokenIds,
};
use crate::error::Result;
use crate::load::save::{write_atomic, write_config, write_safetensors};
use crate::load::weights::Weights;
use crate::model::llava::Llava;

pub const SHAPES: [&str; 4] = ["llava-1.5-7b", "tiny-1b", "train-bench", "test"];

/// CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower.
fn clip_l14_336() -> ClipVisionConfig {
    ClipVisionConfig {
        hidden_size: 1024,
        intermediate_size: 4096,
        num_hidden_layers: 24,
        num_attention_heads: 16,
        num_channels: 3,
        image_size: 336,
        patch_size: 14,
        hidden_act: "quick_gelu".into(),
        layer_norm_eps: 1e-5,
        projection_dim: Some(768),
        model_type: "clip_vision_model".into(),
    }
}

#[allow(clippy::too_many_arguments)]
fn llama(
    vocab: usize,
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    ctx: usize,
) -> LlamaConfig {
    LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: Some(kv),
        head_dim: None,
        hidden_act: "silu".into(),
        max_position_embeddings: ctx,
        rms_norm_eps: 1e-5,
        rope_theta: Some(10000.0),
        rope_scaling: None,
        rope_parameters: Some(RopeParameters {
            rope_type: Some("default".into()),
            rope_theta: Some(10000.0),
            ..Default::default()
        }),
        original_max_position_embeddings: None,
        attention_bias: false,
        mlp_bias: false,
        sliding_window: None,
        tie_word_embeddings: false,
        bos_token_id: Some(1),
        eos_token_id: Some(TokenIds::One(2)),
        pad_token_id: Some(0),
        model_type: "llama".into(),
    }
}

/// The config of a named shape. Vocabularies hold the 32000 LLaMA ids plus `<image>` (32000)
/// and `<pad>` (32001), padded to 32064 as llava-hf does.
pub fn shape_config(name: &str) -> Option<LlavaConfig> {
    let (vision, text, image_token) = match name {
        "llava-1.5-7b" => (
            clip_l14_336(),
            llama(32064, 4096, 11008, 32, 32, 32, 4096),
            32000,
        ),
        // TinyLlama-1.1B's decoder behind LLaVA-1.5's tower.
        "tiny-1b" => (
            clip_l14_336(),
            llama(32064, 2048, 5632, 22, 32, 4, 2048),
            32000,
        ),
        // The training benchmark: a ViT-B/16-sized tower and 4 × 512-wide LLaMA layers.
        "train-bench" => (
            ClipVisionConfig {
                hidden_size: 768,
                intermediate_size: 3072,
                num_hidden_layers: 12,
                num_attention_heads: 12,
                image_size: 224,
                patch_size: 16,
                ..clip_l14_336()
            },
            llama(32064, 512, 1376, 4, 8, 8, 2048),
            32000,
        ),
        // Seconds to load: for smoke tests of the CLI.
        "test" => (
            ClipVisionConfig {
                hidden_size: 32,
                intermediate_size: 64,
                num_hidden_layers: 3,
                num_attention_heads: 4,
                image_size: 30,
                patch_size: 6,
                projection_dim: None,
                ..clip_l14_336()
            },
            llama(400, 64, 128, 2, 4, 2, 512),
            398,
        ),
        _ => return None,
    };
    Some(llava_config(vision, text, image_token))
}

/// LLaVA-1.5's arrangement of a tower and a decoder: a 2-layer GELU projector fed by the
/// penultimate layer's patch features.
fn llava_config(vision: ClipVisionConfig, text: LlamaConfig, image_token: u32) -> LlavaConfig {
    LlavaConfig {
        vision_config: vision,
        text_config: text,
        image_token_index: image_token,
        projector_hidden_act: "gelu".into(),
        vision_feature_select_strategy: SelectStrategy::Default,
        vision_feature_layer: FeatureLayer::Single(-2),
        multimodal_projector_bias: true,
        projector_depth: None,
        image_aspect_ratio: None,
        mm_use_im_start_end: false,
        image_grid_pinpoints: None,
        original_unpad: false,
        model_type: "llava".into(),
        architectures: None,
    }
}

/// The sizes of the demo's small LLaVA (see [`demo_config`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DemoShape {
    pub image_size: usize,
    pub patch_size: usize,
    pub vision_hidden: usize,
    pub vision_layers: usize,
    pub text_hidden: usize,
    pub text_intermediate: usize,
    pub text_layers: usize,
    pub text_heads: usize,
}

/// The demo's small LLaVA for the shapes world: a small CLIP-shaped tower (4 heads, MLP 4×
/// wide) and a small LLaMA, over a vocabulary trained for the world, arranged as LLaVA-1.5.
pub fn demo_config(
    shape: &DemoShape,
    vocab_size: usize,
    image_token_index: u32,
    pad_token_id: u32,
) -> LlavaConfig {
    let heads = shape.text_heads.max(1);
    let mut text = llama(
        vocab_size,
        shape.text_hidden,
        shape.text_intermediate,
        shape.text_layers,
        heads,
        heads,
        512,
    );
    text.pad_token_id = Some(pad_token_id);
    let vision = ClipVisionConfig {
        hidden_size: shape.vision_hidden,
        intermediate_size: 4 * shape.vision_hidden,
        num_hidden_layers: shape.vision_layers,
        num_attention_heads: 4,
        image_size: shape.image_size,
        patch_size: shape.patch_size,
        projection_dim: None,
        ..clip_l14_336()
    };
    llava_config(vision, text, image_token_index)
}

/// The standard deviation transformers' `_init_weights` gives each weight of a fresh model
/// (initializer factor 1): CLIP scales its tower's by width and depth, LLaMA and the projector
/// use `initializer_range`. A tower trained from scratch with 0.02 everywhere learned shapes
/// far more slowly (the demo's stage 0a: 52% against 85% after 600 steps, in PyTorch).
pub fn init_std(config: &LlavaConfig) -> impl Fn(&str) -> f32 + 'static {
    let v = &config.vision_config;
    let width = v.hidden_size as f32;
    let depth = v.num_hidden_layers as f32;
    // transformers' default `initializer_range`, for the decoder, projector and embeddings.
    let range = 0.02f32;
    move |name: &str| {
        let Some(tower) = name.strip_prefix("vision_tower.") else {
            return range;
        };
        let in_proj = width.powf(-0.5) * (2.0 * depth).powf(-0.5);
        if tower.ends_with("class_embedding") || tower.contains("out_proj.") {
            width.powf(-0.5)
        } else if tower.contains("_proj.") || tower.contains("mlp.fc2.") {
            in_proj
        } else if tower.contains("mlp.fc1.") {
            (2.0 * width).powf(-0.5)
        } else {
            range
        }
    }
}

/// Writes a complete random-weight checkpoint: weights, config, tokenizer, processor config
/// and the llava-1.5 chat template.
pub fn write_random_checkpoint(
    config: &LlavaConfig,
    dir: &Path,
    dtype: DType,
    seed: u64,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| crate::error::ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights = Weights::random_with(dtype, Device::Cpu, seed, init_std(config));
    Llava::load(config, &weights)?;
    // `Llava::load` skips vision layers LLaVA never runs; HF expects the whole tower.
    let extra = Weights::random_with(dtype, Device::Cpu, seed ^ 0x5eed, init_std(config));
    let v = &config.vision_config;
    crate::model::vision_tower::ClipVisionTower::load(
        &extra.pp("vision_tower"),
        v,
        v.num_hidden_layers,
    )?;
    let mut tensors = weights.take_random();
    let have: std::collections::HashSet<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    tensors.extend(
        extra
            .take_random()
            .into_iter()
            .filter(|(n, _)| !have.contains(n)),
    );
    // CLIPVisionModel also has a post-layernorm, which LLaVA never uses.
    let h = config.vision_config.hidden_size;
    tensors.push((
        "vision_tower.post_layernorm.weight".into(),
        Tensor::ones(h, dtype, &Device::Cpu)?,
    ));
    tensors.push((
        "vision_tower.post_layernorm.bias".into(),
        Tensor::zeros(h, dtype, &Device::Cpu)?,
    ));
    write_safetensors(dir, &tensors, 2 << 30)?;
    write_config(dir, config)?;
    let t = &config.text_config;
    write_json(
        dir,
        "tokenizer.json",
        &tokenizer_json(t.vocab_size, config.image_token_index),
    )?;
    write_json(
        dir,
        "tokenizer_config.json",
        &json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
                "padding_side": "left", "model_max_length": t.max_position_embeddings,
                "tokenizer_class": "LlamaTokenizer", "clean_up_tokenization_spaces": false}),
    )?;
    let side = config.vision_config.image_size;
    write_json(
        dir,
        "preprocessor_config.json",
        &json!({"image_processor_type": "CLIPImageProcessor", "do_resize": true, "size": {"shortest_edge": side},
                "resample": 3, "do_center_crop": true, "crop_size": {"height": side, "width": side},
                "do_rescale": true, "rescale_factor": 1.0 / 255.0, "do_normalize": true,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
                "do_convert_rgb": true}),
    )?;
    write_atomic(
        &dir.join("chat_template.jinja"),
        LLAVA15_CHAT_TEMPLATE.as_bytes(),
    )
}

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| crate::error::ModelError::Input(e.to_string()))?;
    write_atomic(&dir.join(name), text.as_bytes())
}

/// The llava-1.5 conversation (`USER: <image>\n{q} ASSISTANT: {a}</s>`) as a chat template.
pub const LLAVA15_CHAT_TEMPLATE: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}{% else %}{{ message['role'].upper() + ': ' }}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}";

/// A LLaMA-style byte-fallback tokenizer with a character-level vocabulary: `<unk>`, `<s>`,
/// `</s>`, the 256 byte tokens, printable ASCII (with `▁` for space), filler pieces up to the
/// vocabulary size, and `<image>`/`<pad>` at `image_token` and the id after it.
pub fn tokenizer_json(vocab_size: usize, image_token: u32) -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    let push = |piece: String, vocab: &mut serde_json::Map<String, serde_json::Value>| {
        let id = vocab.len();
        vocab.insert(piece, json!(id));
    };
    for special in ["<unk>", "<s>", "</s>"] {
        push(special.into(), &mut vocab);
    }
    for b in 0..=255u8 {
        push(format!("<0x{b:02X}>"), &mut vocab);
    }
    push("▁".into(), &mut vocab);
    for c in '!'..='~' {
        push(c.to_string(), &mut vocab);
    }
    let base = (image_token as usize).min(vocab_size);
    let mut filler = 0;
    while vocab.len() < base {
        push(format!("▁piece{filler}"), &mut vocab);
        filler += 1;
    }
    let added = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(0, "<unk>"), added(1, "<s>"), added(2, "</s>"),
                         added(image_token, "<image>"), added(image_token + 1, "<pad>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": false},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": []}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_take_transformers_init_scales() {
        let shape = DemoShape {
            image_size: 32,
            patch_size: 8,
            vision_hidden: 128,
            vision_layers: 4,
            text_hidden: 64,
            text_intermediate: 128,
            text_layers: 1,
            text_heads: 2,
        };
        let config = demo_config(&shape, 300, 298, 299);
        let std = init_std(&config);
        let w = 128f32;
        let layer = "vision_tower.encoder.layers.1";
        for (name, expect) in [
            ("vision_tower.embeddings.class_embedding", w.powf(-0.5)),
            ("vision_tower.embeddings.patch_embedding.weight", 0.02),
            (
                &format!("{layer}.self_attn.q_proj.weight"),
                (w * 8.0).powf(-0.5),
            ),
            (&format!("{layer}.self_attn.out_proj.weight"), w.powf(-0.5)),
            (&format!("{layer}.mlp.fc1.weight"), (2.0 * w).powf(-0.5)),
            (&format!("{layer}.mlp.fc2.weight"), (w * 8.0).powf(-0.5)),
            ("language_model.layers.0.self_attn.q_proj.weight", 0.02),
            ("multi_modal_projector.linear_1.weight", 0.02),
        ] {
            assert!((std(name) - expect).abs() < 1e-6, "{name}: {}", std(name));
        }
        // The weights made follow those scales.
        let weights = Weights::random_with(DType::F32, Device::Cpu, 0, init_std(&config));
        Llava::load(&config, &weights).expect("model");
        let made = weights.take_random();
        let fc1 = made
            .iter()
            .find(|(n, _)| n == &format!("{layer}.mlp.fc1.weight"))
            .map(|(_, t)| t)
            .expect("fc1");
        let measured = fc1
            .sqr()
            .and_then(|t| t.mean_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("std")
            .sqrt();
        assert!(
            (measured / (2.0 * w).powf(-0.5) - 1.0).abs() < 0.05,
            "{measured}"
        );
    }
}
