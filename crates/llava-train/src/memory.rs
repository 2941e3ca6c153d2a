//! The memory plan (`llava train ... --dry-run`): the peak a training run will need, from the
//! checkpoint's `config.json` and the flags alone, before a single weight is read. It answers
//! "will this fit on my card" before a 20-minute load.
//!
//! Parameters are counted from the config exactly as the loader reads them (the vision tower
//! only up to the layer LLaVA takes its features from). Each trainable parameter costs its f32
//! master copy, its f32 gradient and AdamW's two f32 moments: 16 bytes, as in the paper's
//! arithmetic. Activations are what autograd keeps for the backward pass, counted per token
//! from the tensors a decoder layer's training forward leaves in the graph (f32 here), plus
//! the attention scores, which grow with the square of the length. The logits are those of
//! the supervised positions, with their log-softmax and gradient.
//!
//! Under `--bf16` the frozen weights are bf16 (2 bytes), each trainable weight adds a bf16
//! working copy (2 bytes, made at its use and kept by the graph) to its 16, and the graph's
//! tensors are bf16 except where the step upcasts: the norms' f32 insides, the f32 attention
//! softmax and the f32 log-softmax of the logits.

use llava_model::config::LlavaConfig;

use crate::trainer::Stage;

/// What a run trains and how, as the flags say.
#[derive(Debug, Clone)]
pub struct PlanSettings {
    pub stage: Stage,
    pub unfreeze_vision: bool,
    pub gradient_checkpointing: bool,
    /// Per device, per micro-batch.
    pub batch_size: usize,
    pub max_length: usize,
    /// Bytes of one frozen weight as loaded (4 for f32, 2 for bf16).
    pub frozen_bytes: f64,
    /// `--lora-r`: the language model's seven projections train as rank-r pairs, the
    /// projector in full, and nothing else.
    pub lora_r: Option<usize>,
    /// `--bits`: the decoder's frozen projections in 4-bit (Q4_K/Q4_0: 144 bytes per 256
    /// weights) or 8-bit blocks (32 int8 and an f32 scale).
    pub bits: Option<u8>,
    /// `--bf16`: mixed precision (bf16 activations and working copies, f32 masters).
    pub bf16: bool,
    /// The ranks the AdamW moments are split over (`--zero 1` in a job of N ranks; 1
    /// otherwise): each rank keeps 1/N of them. The weights and the gradients stay whole on
    /// every rank, as in DeepSpeed's stage 1.
    pub zero_ranks: usize,
}

/// Bytes per weight of a projection held in `bits`.
fn block_bytes(bits: u8) -> f64 {
    match bits {
        4 => 144.0 / 256.0,
        _ => 36.0 / 32.0,
    }
}

/// Parameter counts by part, as the loader reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParamCounts {
    pub vision_tower: u64,
    pub projector: u64,
    pub embed_tokens: u64,
    /// Every decoder layer, norms and biases included.
    pub layers: u64,
    /// The final norm, `lm_head` (none when tied) and LLaVA-NeXT's `image_newline`.
    pub head: u64,
}

impl ParamCounts {
    pub fn of(config: &LlavaConfig) -> Self {
        let v = &config.vision_config;
        let (vh, vi) = (v.hidden_size as u64, v.intermediate_size as u64);
        let patches = v.num_patches() as u64;
        let embeddings = vh // class_embedding
            + vh * v.num_channels as u64 * (v.patch_size * v.patch_size) as u64
            + (patches + 1) * vh
            + 2 * vh; // pre_layrnorm
        let vision_layer = 4 * (vh * vh + vh) + 2 * vh * vi + vi + vh + 4 * vh;
        let used =
            llava_model::vision_tower::layers_needed(v, &config.vision_feature_layer.layers())
                as u64;
        let t = &config.text_config;
        let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
        let (q, kv) = (
            (t.num_attention_heads * t.head_dim()) as u64,
            (t.num_kv_heads() * t.head_dim()) as u64,
        );
        let p = config.projector();
        let input = config.projector_input_size() as u64;
        let projector =
            input * h + (p.depth as u64 - 1) * h * h + u64::from(p.bias) * p.depth as u64 * h;
        let attention_bias = u64::from(t.attention_bias) * (2 * q + 2 * kv + h - q);
        let mlp_bias = u64::from(t.mlp_bias) * (2 * i + h);
        let layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h + attention_bias + mlp_bias;
        let vocab = t.vocab_size as u64;
        let lm_head = if t.tie_word_embeddings { 0 } else { vocab * h };
        let newline = if config.is_next() { h } else { 0 };
        Self {
            vision_tower: embeddings + used * vision_layer,
            projector,
            embed_tokens: vocab * h,
            layers: t.num_hidden_layers as u64 * layer,
            head: h + lm_head + newline,
        }
    }

    pub fn total(&self) -> u64 {
        self.vision_tower + self.projector + self.embed_tokens + self.layers + self.head
    }

    /// Parameters that train under `settings`, by the stage's freezing rule (LoRA pairs are
    /// not part of [`ParamCounts::total`]; see [`lora_params`]).
    pub fn trainable(&self, settings: &PlanSettings) -> u64 {
        if settings.lora_r.is_some() {
            return self.projector;
        }
        let vision = if settings.unfreeze_vision {
            self.vision_tower
        } else {
            0
        };
        match settings.stage {
            Stage::Pretrain => self.projector + vision,
            Stage::Finetune => {
                self.projector + vision + self.embed_tokens + self.layers + self.head
            }
        }
    }
}

/// The weights of the decoder's seven projections (all layers): what `--bits` quantizes.
pub fn decoder_linears(config: &LlavaConfig) -> u64 {
    let t = &config.text_config;
    let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let (q, kv) = (
        (t.num_attention_heads * t.head_dim()) as u64,
        (t.num_kv_heads() * t.head_dim()) as u64,
    );
    (2 * h * q + 2 * h * kv + 3 * h * i) * t.num_hidden_layers as u64
}

/// The parameters of rank-`r` LoRA pairs on every projection of every decoder layer: `r` times
/// the input plus output width of each.
pub fn lora_params(config: &LlavaConfig, r: usize) -> u64 {
    let t = &config.text_config;
    let (h, i) = (t.hidden_size as u64, t.intermediate_size as u64);
    let (q, kv) = (
        (t.num_attention_heads * t.head_dim()) as u64,
        (t.num_kv_heads() * t.head_dim()) as u64,
    );
    let widths = (h + q) * 2 + (h + kv) * 2 + (h + i) * 3;
    r as u64 * widths * t.num_hidden_layers as u64
}

/// One line of the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub what: String,
    pub bytes: f64,
}

/// The expected peak, part by part.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryPlan {
    pub lines: Vec<Line>,
}

/// Bytes a decoder layer's training forward keeps per token, in units of the hidden size, the
/// key/value width and the MLP width.
/// - f32: 17, 7 and 5 values of 4 bytes: the norms' inputs and outputs, q/k/v and their rotary
///   terms, the attention output and its projection, the residual sums, and the SwiGLU branch
///   (gate, its SiLU, up, their product), the norms, rope and SiLU as fused f32 kernels.
/// - bf16: the same tensors in 2 bytes, but the norms and rope take their composite formulas
///   (the fused kernels are f32): each norm keeps its f32 input, square and quotient (12) and
///   two bf16 results (4); rope keeps the products with cos and sin, the rotated half and
///   the sum (9 for q, per key/value width for k); q, its scaling, the attention output and
///   its contiguous copy, o, down and the two residual sums (2 each), the layer input (2).
const KEPT_BYTES_PER_TOKEN: (f64, f64, f64) = (17.0 * 4.0, 7.0 * 4.0, 5.0 * 4.0);
const KEPT_BYTES_PER_TOKEN_BF16: (f64, f64, f64) = (59.0, 15.0, 8.0);
/// Bytes kept per element of the `[heads, length, length]` attention scores. f32: the scores,
/// the masked scores and the softmax. bf16: the bf16 scores, their f32 copy, the masked
/// scores and the softmax in f32, and the bf16 probabilities.
const KEPT_SCORE_BYTES: f64 = 12.0;
const KEPT_SCORE_BYTES_BF16: f64 = 16.0;
/// Bytes per logit of the supervised positions. f32: the logits, their log-softmax, and in
/// backward their gradient and the softmax it is made from. bf16: the bf16 logits and their
/// gradient besides those four in f32.
const LOGIT_BYTES: f64 = 16.0;
const LOGIT_BYTES_BF16: f64 = 20.0;

impl MemoryPlan {
    pub fn new(config: &LlavaConfig, s: &PlanSettings) -> Self {
        let counts = ParamCounts::of(config);
        let lora = s.lora_r.map_or(0, |r| lora_params(config, r)) as f64;
        let frozen = (counts.total() - counts.trainable(s)) as f64;
        let trainable = counts.trainable(s) as f64 + lora;
        let t = &config.text_config;
        let tokens = (s.batch_size * s.max_length) as f64;
        let (h, i) = (t.hidden_size as f64, t.intermediate_size as f64);
        let kv = (t.num_kv_heads() * t.head_dim()) as f64;
        // Bytes of one activation value.
        let act = if s.bf16 { 2.0 } else { 4.0 };
        let ((a, b, c), score_bytes, logit_bytes) = match s.bf16 {
            true => (
                KEPT_BYTES_PER_TOKEN_BF16,
                KEPT_SCORE_BYTES_BF16,
                LOGIT_BYTES_BF16,
            ),
            false => (KEPT_BYTES_PER_TOKEN, KEPT_SCORE_BYTES, LOGIT_BYTES),
        };
        // Each of a layer's seven LoRA pairs keeps its dropout mask and dropped-out input (q, k,
        // v, o, gate, up: the hidden width; down: the MLP width), its two r-wide values (A's
        // product and its scaling), and B's product beside the base's output (q, o, down: the
        // hidden width; k, v: the key/value width; gate, up: the MLP width), whose sum then
        // stands where the base's output stood.
        let lora = match s.lora_r {
            Some(r) => {
                act * (2.0 * (6.0 * h + i) + 14.0 * r as f64 + 2.0 * (3.0 * h + 2.0 * kv + 2.0 * i))
            }
            None => 0.0,
        };
        let per_layer = tokens * (a * h + b * kv + c * i + lora)
            + score_bytes
                * (s.batch_size * t.num_attention_heads) as f64
                * (s.max_length as f64).powi(2);
        let layers = t.num_hidden_layers as f64;
        // Checkpointed, each layer keeps its input; one layer's graph exists at a time.
        let activations = if s.gradient_checkpointing {
            act * tokens * h * layers + per_layer
        } else {
            per_layer * layers
        };
        let logits = logit_bytes * tokens * t.vocab_size as f64;
        let (frozen_bytes, dequantized) = match s.bits {
            Some(bits) => {
                let q = decoder_linears(config) as f64;
                let bytes = (frozen - q) * s.frozen_bytes + q * block_bytes(bits);
                // Backward multiplies by one projection's weight dequantized at a time.
                (bytes, 4.0 * h * i)
            }
            None => (frozen * s.frozen_bytes, 0.0),
        };
        let gib = |p: f64, bytes: f64| p * bytes;
        let mut plan = Self {
            lines: vec![
                Line {
                    what: match s.bits {
                        Some(b) => format!(
                            "frozen weights ({:.2}B params, projections in {b} bits)",
                            frozen / 1e9
                        ),
                        None => format!("frozen weights ({:.2}B params)", frozen / 1e9),
                    },
                    bytes: frozen_bytes,
                },
                Line {
                    what: match s.lora_r {
                        Some(r) => format!(
                            "trainable: LoRA r {r} + projector, f32 ({:.1}M params)",
                            trainable / 1e6
                        ),
                        None => format!(
                            "trainable weights, f32{} ({:.2}B params)",
                            if s.bf16 { " masters" } else { "" },
                            trainable / 1e9
                        ),
                    },
                    bytes: gib(trainable, 4.0),
                },
                Line {
                    what: "gradients, f32".into(),
                    bytes: gib(trainable, 4.0),
                },
                Line {
                    what: match s.zero_ranks {
                        0 | 1 => "AdamW moments, f32".into(),
                        n => format!("AdamW moments, f32, this rank's 1/{n} (--zero 1)"),
                    },
                    bytes: gib(trainable, 8.0) / s.zero_ranks.max(1) as f64,
                },
                Line {
                    what: format!(
                        "activations ({} × {} tokens{})",
                        s.batch_size,
                        s.max_length,
                        if s.gradient_checkpointing {
                            ", checkpointed"
                        } else {
                            ""
                        }
                    ),
                    bytes: activations,
                },
                Line {
                    what: "logits (supervised positions)".into(),
                    bytes: logits,
                },
                Line {
                    what: "one projection dequantized in backward".into(),
                    bytes: dequantized,
                },
            ],
        };
        if s.bf16 {
            let copies = Line {
                what: "bf16 working copies of the trainable weights".into(),
                bytes: gib(trainable, 2.0),
            };
            plan.lines.insert(2, copies);
        }
        plan
    }

    pub fn total(&self) -> f64 {
        self.lines.iter().map(|l| l.bytes).sum()
    }

    /// The largest batch size whose plan fits `budget` bytes, if even 1 does.
    pub fn largest_batch(config: &LlavaConfig, s: &PlanSettings, budget: f64) -> Option<usize> {
        let fits = |b: usize| {
            let settings = PlanSettings {
                batch_size: b,
                ..s.clone()
            };
            Self::new(config, &settings).total() <= budget
        };
        if !fits(1) {
            return None;
        }
        let mut b = 1;
        while b < 1 << 16 && fits(b * 2) {
            b *= 2;
        }
        // Between b (fits) and 2b (does not).
        let (mut lo, mut hi) = (b, b * 2);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if fits(mid) { lo = mid } else { hi = mid }
        }
        Some(lo)
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in &self.lines {
            writeln!(f, "  {:<52} {:>9.2} GB", line.what, line.bytes / 1e9)?;
        }
        write!(
            f,
            "  {:<52} {:>9.2} GB",
            "expected peak",
            self.total() / 1e9
        )
    }
}

/// Starts the peak resident memory ([`peak_resident_bytes`]) afresh from what the process
/// holds now (Linux's `clear_refs` 5), so that a run inside a longer process (`llava demo`'s
/// stages) reports its own peak. Does nothing where the kernel does not offer it.
pub fn reset_peak_resident() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's peak resident memory so far in bytes (`VmHWM` of `/proc/self/status`): what
/// a run prints beside its plan when it ends. `None` where the kernel does not report it.
pub fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use llava_model::init::shape_config;

    #[test]
    #[cfg(target_os = "linux")]
    fn the_peak_covers_a_buffer_just_touched() {
        let buffer = vec![1u8; 64 << 20];
        let peak = peak_resident_bytes().expect("VmHWM on Linux");
        assert!(peak >= buffer.len() as u64, "{peak} bytes");
        assert_eq!(buffer.iter().map(|&b| b as usize).sum::<usize>(), 64 << 20);
    }

    fn settings(stage: Stage) -> PlanSettings {
        PlanSettings {
            stage,
            unfreeze_vision: false,
            gradient_checkpointing: false,
            batch_size: 1,
            max_length: 2048,
            frozen_bytes: 4.0,
            lora_r: None,
            bits: None,
            bf16: false,
            zero_ranks: 1,
        }
    }

    /// `--zero 1` over 8 ranks: a full 7B fine-tune keeps 1/8 of its 54 GB of moments.
    #[test]
    fn zero_one_splits_the_moments_over_the_ranks() {
        let config = shape_config("llava-1.5-7b").expect("shape");
        let one = MemoryPlan::new(&config, &settings(Stage::Finetune));
        let sharded = MemoryPlan::new(
            &config,
            &PlanSettings {
                zero_ranks: 8,
                ..settings(Stage::Finetune)
            },
        );
        let moments = |p: &MemoryPlan| {
            p.lines
                .iter()
                .find(|l| l.what.starts_with("AdamW moments"))
                .map(|l| l.bytes)
                .expect("a moments line")
        };
        assert!(moments(&one) > 50e9, "{}", moments(&one));
        assert!((moments(&sharded) - moments(&one) / 8.0).abs() < 1.0);
        assert!((one.total() - sharded.total() - moments(&one) * 7.0 / 8.0).abs() < 1.0);
    }

    #[test]
    fn counts_llava_1_5_7b_as_published() {
        let config = shape_config("llava-1.5-7b").expect("shape");
        let counts = ParamCounts::of(&config);
        // llava-hf/llava-1.5-7b-hf has 7,063,427,072 parameters; the loader skips the tower's
        // last layer (12,596,224) and post_layernorm (2,048), which LLaVA never reads.
        assert_eq!(counts.total() + 12_596_224 + 2_048, 7_063_427_072);
        assert_eq!(counts.projector, 20_979_712);
        assert_eq!(counts.trainable(&settings(Stage::Pretrain)), 20_979_712);
        assert_eq!(
            counts.trainable(&settings(Stage::Finetune)),
            counts.total() - counts.vision_tower
        );
    }

    #[test]
    fn lora_r128_on_7b_trains_about_340m_parameters() {
        let config = shape_config("llava-1.5-7b").expect("shape");
        // 32 layers × 128 × (4·(4096+4096) + 3·(4096+11008)): peft's count for LLaMA-7B.
        assert_eq!(lora_params(&config, 128), 319_815_680);
        let mut s = settings(Stage::Finetune);
        s.lora_r = Some(128);
        let plan = MemoryPlan::new(&config, &s);
        assert_eq!(plan.lines[1].bytes, 4.0 * (319_815_680.0 + 20_979_712.0));
        let counts = ParamCounts::of(&config);
        assert_eq!(
            plan.lines[0].bytes,
            4.0 * (counts.total() - counts.projector) as f64
        );
        // QLoRA: the projections (6.48B weights) at 4.5 bits, the rest (embeddings,
        // lm_head, norms, tower) in f32.
        s.bits = Some(4);
        let q = decoder_linears(&config) as f64;
        assert_eq!(q, 32.0 * (4.0 * 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0));
        let qlora = MemoryPlan::new(&config, &s);
        let rest = (counts.total() - counts.projector) as f64 - q;
        assert_eq!(qlora.lines[0].bytes, 4.0 * rest + q * 144.0 / 256.0);
    }

    #[test]
    fn full_fine_tuning_costs_sixteen_bytes_per_trained_parameter() {
        let config = shape_config("llava-1.5-7b").expect("shape");
        let s = settings(Stage::Finetune);
        let plan = MemoryPlan::new(&config, &s);
        let trained = ParamCounts::of(&config).trainable(&s) as f64;
        let states: f64 = plan.lines[1..4].iter().map(|l| l.bytes).sum();
        assert_eq!(states, 16.0 * trained);
        // The paper's arithmetic: about 110 GB before activations.
        assert!((105e9..115e9).contains(&(states + plan.lines[0].bytes)));
    }

    /// `--bf16`: the frozen weights at 2 bytes, a bf16 working copy (2 bytes) beside each
    /// trained parameter's 16, and the plans of LLaVA-1.5-7B that BENCHMARKS.md records (LoRA
    /// r 128 over a bf16 base, QLoRA, full; 2048 tokens, checkpointed).
    #[test]
    fn bf16_halves_the_frozen_weights_and_adds_a_working_copy() {
        let config = shape_config("llava-1.5-7b").expect("shape");
        let mut s = settings(Stage::Finetune);
        s.gradient_checkpointing = true;
        s.lora_r = Some(128);
        let f32_plan = MemoryPlan::new(&config, &s);
        s.bf16 = true;
        s.frozen_bytes = 2.0;
        let plan = MemoryPlan::new(&config, &s);
        eprintln!("LoRA r 128, f32, checkpointed, 1 × 2048:\n{f32_plan}");
        eprintln!("LoRA r 128, bf16, checkpointed, 1 × 2048:\n{plan}");
        assert_eq!(plan.lines[0].bytes, f32_plan.lines[0].bytes / 2.0);
        let trained = lora_params(&config, 128) as f64 + 20_979_712.0;
        assert_eq!(plan.lines[1].bytes, 4.0 * trained);
        assert!(plan.lines[2].what.contains("working copies"));
        assert_eq!(plan.lines[2].bytes, 2.0 * trained);
        assert!(plan.lines[5].what.starts_with("activations"));
        assert!(plan.lines[5].bytes < f32_plan.lines[4].bytes);
        s.bits = Some(4);
        eprintln!(
            "QLoRA 4 bits, bf16, checkpointed, 1 × 2048:\n{}",
            MemoryPlan::new(&config, &s)
        );
        s.bits = None;
        s.lora_r = None;
        eprintln!(
            "full, bf16, checkpointed, 1 × 2048:\n{}",
            MemoryPlan::new(&config, &s)
        );
    }

    #[test]
    fn checkpointing_shrinks_activations_and_batches_grow_with_the_budget() {
        let config = shape_config("train-bench").expect("shape");
        let mut s = settings(Stage::Finetune);
        s.max_length = 512;
        let plain = MemoryPlan::new(&config, &s);
        s.gradient_checkpointing = true;
        let checkpointed = MemoryPlan::new(&config, &s);
        assert!(checkpointed.lines[4].bytes < plain.lines[4].bytes / 2.0);
        assert_eq!(checkpointed.lines[..4], plain.lines[..4]);
        let one = MemoryPlan::new(&config, &s).total();
        assert_eq!(MemoryPlan::largest_batch(&config, &s, one * 0.99), None);
        let b = MemoryPlan::largest_batch(&config, &s, 3.0 * one).expect("fits");
        let fits = |b| {
            MemoryPlan::new(
                &config,
                &PlanSettings {
                    batch_size: b,
                    ..s.clone()
                },
            )
            .total()
        };
        assert!(b > 1 && fits(b) <= 3.0 * one && fits(b + 1) > 3.0 * one);
    }
}
