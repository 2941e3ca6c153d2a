//! How big each step of the demo is: the full run (under 10 minutes on 2 cores) and `--quick`
//! (under 2, for CI, which only checks that every stage runs and beats chance).

use llava_model::init::DemoShape;
use serde::{Deserialize, Serialize};

/// One training stage's budget.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StagePlan {
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub seed: u64,
    pub train_scenes: usize,
    pub val_scenes: usize,
    pub test_scenes: usize,
    /// Training images sent to the teacher (each gets a conversation, a detail and a complex
    /// request).
    pub instruct_images: usize,
    /// Test images for the LLaVA-Bench-style judged set.
    pub bench_images: usize,
    pub vocab_size: usize,
    pub model: DemoShape,
    pub stage0: StagePlan,
    pub stage1: StagePlan,
    pub stage2: StagePlan,
}

/// 64-px images in 8-px patches (64 image tokens), a 3-layer tower of width 128 feeding
/// LLaVA's penultimate-layer features, and a 3-layer LLaMA of width 192.
fn shape() -> DemoShape {
    DemoShape {
        image_size: 64,
        patch_size: 8,
        vision_hidden: 128,
        vision_layers: 4,
        text_hidden: 192,
        text_intermediate: 512,
        text_layers: 3,
        text_heads: 3,
    }
}

impl Plan {
    pub fn full(seed: u64) -> Plan {
        Plan {
            seed,
            train_scenes: 3000,
            val_scenes: 50,
            test_scenes: 100,
            instruct_images: 1000,
            bench_images: 20,
            vocab_size: 512,
            model: shape(),
            stage0: StagePlan {
                steps: 300,
                batch_size: 32,
                lr: 1e-3,
            },
            stage1: StagePlan {
                steps: 60,
                batch_size: 32,
                lr: 1e-3,
            },
            stage2: StagePlan {
                steps: 200,
                batch_size: 32,
                lr: 3e-4,
            },
        }
    }

    pub fn quick(seed: u64) -> Plan {
        Plan {
            seed,
            train_scenes: 400,
            val_scenes: 10,
            test_scenes: 40,
            instruct_images: 60,
            bench_images: 5,
            vocab_size: 512,
            model: shape(),
            stage0: StagePlan {
                steps: 40,
                batch_size: 16,
                lr: 1e-3,
            },
            stage1: StagePlan {
                steps: 10,
                batch_size: 16,
                lr: 1e-3,
            },
            stage2: StagePlan {
                steps: 30,
                batch_size: 16,
                lr: 3e-4,
            },
        }
    }
}
