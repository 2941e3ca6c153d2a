//! The one weight loader: safetensors (single file or sharded with an index),
//! with every naming scheme in the wild mapped onto one canonical set of names.
//!
//! Canonical names follow HF's module tree without the wrapper prefixes that changed between
//! transformers versions: `vision_tower.*` (inside `vision_model`), `multi_modal_projector.*`,
//! `language_model.*` (inside the decoder `model`) and `lm_head.*`.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{ModelError, Result};
use crate::load::lora::{DropoutKey, LoraInit, LoraTraining};
use crate::load::precision::Quantize;
use crate::load::pytorch_file::PytorchFile;
use crate::load::safetensors_file::SafetensorsFile;

/// Maps a stored tensor name to its canonical name, or `None` to ignore the tensor.
pub type Renamer = fn(&str) -> Option<String>;

struct Source {
    dir: PathBuf,
    /// One entry per shard, so that an error can name the shard at fault.
    shards: Vec<Shard>,
}

/// One weight file: safetensors, or a PyTorch `.bin` as the original LLaVA releases ship.
enum Shard {
    Safetensors(SafetensorsFile),
    Pytorch(PytorchFile),
}

impl Shard {
    /// Opens `path` by its extension: `.safetensors`, else a PyTorch checkpoint.
    fn open(path: &Path) -> Result<Self> {
        Ok(if path.extension().is_some_and(|x| x == "safetensors") {
            Self::Safetensors(SafetensorsFile::open(path)?)
        } else {
            Self::Pytorch(PytorchFile::open(path)?)
        })
    }

    fn names(&self) -> Vec<&str> {
        match self {
            Self::Safetensors(f) => f.names().collect(),
            Self::Pytorch(f) => f.names().collect(),
        }
    }

    fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        match self {
            Self::Safetensors(f) => f.load(name, device),
            Self::Pytorch(f) => f.load(name, device),
        }
    }

    /// The tensor in [`crate::kernels::gemm_layout`], where the format can read it that way.
    fn load_transposed(&self, name: &str, via_bf16: bool) -> Result<Option<Tensor>> {
        match self {
            Self::Safetensors(f) => f.load_transposed(name, via_bf16),
            Self::Pytorch(_) => Ok(None),
        }
    }
}

/// Canonical name → where it is stored.
#[derive(Clone)]
struct Location {
    source: usize,
    shard: usize,
    stored: String,
}

pub struct Weights {
    sources: Vec<Source>,
    index: HashMap<String, Location>,
    dtype: DType,
    device: Device,
    /// Set for random initialisation: tensors are made on request and remembered.
    random: Option<std::cell::RefCell<RandomInit>>,
    /// Which canonical names become trainable `Var`s, and the vars made so far.
    trainable: Option<Trainable>,
    /// Canonical names read so far, so that a checkpoint's leftovers can be reported.
    used: std::cell::RefCell<std::collections::HashSet<String>>,
    /// LoRA deltas to merge into a weight as it is read, by the weight's canonical name.
    lora: HashMap<String, LoraDelta>,
    /// The decoder's projections are quantized as they are read (`--load-8bit`/`--load-4bit`).
    quantize: Option<Quantize>,
    /// `lm_head` and the embedding rows too (inference; QLoRA training keeps them dense, as
    /// bitsandbytes does).
    quantize_vocab: bool,
    /// `llava train --lora`: trainable pairs handed to the adapted projections.
    lora_training: Option<LoraSource>,
    /// Mixed precision (`llava train --bf16`): trainable weights are made in this dtype (f32
    /// master copies) while frozen ones stay in `dtype`, and activations flow in `dtype` on
    /// every device. The layers cast a master to the activations' dtype where they use it.
    master: Option<DType>,
    /// Modules computed in another dtype than `dtype` (`--vision-dtype`), by name prefix.
    dtype_under: Vec<(String, DType)>,
}

/// Where a training run's LoRA pairs come from.
struct LoraSource {
    setting: LoraTraining,
    /// For [`LoraInit::From`]: the adapter file's source and its pairs' stored names, by the
    /// adapted module's canonical name.
    pairs: HashMap<String, (usize, String, String)>,
}

/// One adapted projection's trainable pair, handed to the layer that adds `B·A·x`.
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    pub dropout_key: DropoutKey,
    /// Mixed into the dropout key, so that every layer draws its own mask.
    pub salt: u64,
}

/// One adapted weight's `B` and `A`, in an adapter file added as a source.
struct LoraDelta {
    source: usize,
    a: String,
    b: String,
    scale: f64,
}

/// Trainable weights are loaded as candle `Var`s, which autograd tracks; everything else stays a
/// plain tensor, so frozen parts get no gradient and no optimizer state.
struct Trainable {
    select: Box<dyn Fn(&str) -> bool>,
    vars: std::cell::RefCell<Vec<(String, Var)>>,
}

/// Random weights at the shapes the model asks for: `llava init` builds a model through the same
/// loading code as a real checkpoint, so the two can never disagree about names or shapes.
struct RandomInit {
    rng: rand::rngs::StdRng,
    /// The standard deviation of each weight, by canonical name.
    std_of: Box<dyn Fn(&str) -> f32>,
    made: Vec<(String, Tensor)>,
}

impl Weights {
    pub fn new(dtype: DType, device: Device) -> Self {
        Self {
            sources: Vec::new(),
            index: HashMap::new(),
            dtype,
            device,
            random: None,
            trainable: None,
            used: Default::default(),
            lora: HashMap::new(),
            quantize: None,
            quantize_vocab: false,
            lora_training: None,
            master: None,
            dtype_under: Vec::new(),
        }
    }

    /// Mixed precision: trainable weights (and LoRA pairs) are held in `master` (f32) while
    /// frozen weights are read in the weights' dtype (bf16), and the activations flow in that
    /// dtype, the CPU's included: the HF Trainer's `bf16=True` with f32 master weights.
    pub fn set_master_dtype(&mut self, master: DType) {
        self.master = Some(master);
    }

    /// The dtype a trainable weight is made in: the master dtype under mixed precision.
    fn trainable_dtype(&self) -> DType {
        self.master.unwrap_or(self.dtype)
    }

    /// Gives every adapted decoder projection a trainable LoRA pair (`llava train --lora`),
    /// named `{module}.lora_A.weight` / `.lora_B.weight` among the trainable vars. With
    /// [`LoraInit::From`] the adapter's pairs are read by `rename` of the adapted module (the
    /// base's naming), and the modules it saved whole (the projector) replace the base's.
    pub fn set_lora_training(&mut self, setting: LoraTraining, rename: Renamer) -> Result<()> {
        let mut pairs = HashMap::new();
        if let LoraInit::From(dir) = &setting.init {
            let adapter = crate::load::lora::Adapter::read(dir)?;
            let shard = Shard::open(&adapter.weights)?;
            let source = self.sources.len();
            let modules = crate::load::lora::pair_modules(shard.names(), &adapter.modules_to_save)
                .map_err(|m| ModelError::config(&adapter.weights, m))?;
            for (module, a, b) in modules {
                // The base must be added first: a pair for a weight it lacks would be dropped.
                let canonical = rename(&format!("{module}.weight"))
                    .filter(|w| self.index.contains_key(w))
                    .and_then(|w| w.strip_suffix(".weight").map(str::to_string))
                    .ok_or_else(|| {
                        ModelError::config(
                            &adapter.weights,
                            format!("adapts `{module}`, which the base model has no weight for"),
                        )
                    })?;
                pairs.insert(canonical, (source, a, b));
            }
            self.add_saved_modules(&adapter, &shard, source, rename);
            self.sources.push(Source {
                dir: dir.clone(),
                shards: vec![shard],
            });
        }
        if self.trainable.is_none() {
            self.set_trainable(|_| false);
        }
        self.lora_training = Some(LoraSource { setting, pairs });
        Ok(())
    }

    /// Indexes an adapter's whole saved modules (peft's `modules_to_save`) at `source`, so that
    /// they replace the base's.
    fn add_saved_modules(
        &mut self,
        adapter: &crate::load::lora::Adapter,
        shard: &Shard,
        source: usize,
        rename: Renamer,
    ) {
        for stored in shard.names() {
            let name = crate::load::lora::base_name(stored);
            if !crate::load::lora::is_saved_module(name, &adapter.modules_to_save) {
                continue;
            }
            if let Some(canonical) = rename(name) {
                let location = Location {
                    source,
                    shard: 0,
                    stored: stored.to_string(),
                };
                self.index.insert(canonical, location);
            }
        }
    }

    /// The trainable LoRA pair of the projection `module` (`language_model.layers.3.mlp.up_proj`,
    /// of `[out, in]`), or `None` where no pair is set up for it.
    pub fn lora_pair(
        &self,
        module: &str,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<Option<LoraPair>> {
        let Some(lora) = &self.lora_training else {
            return Ok(None);
        };
        let setting = &lora.setting;
        let adapted = module.starts_with("language_model.layers.")
            && module
                .rsplit('.')
                .next()
                .is_some_and(|leaf| setting.targets.iter().any(|t| t == leaf));
        if !adapted {
            return Ok(None);
        }
        let r = setting.r;
        let (a, b) = match &setting.init {
            LoraInit::Fresh(seed) => {
                use rand::{Rng, SeedableRng};
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ name_hash(module));
                // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/in) = 1/√in.
                let bound = 1.0 / (in_dim as f32).sqrt();
                let a: Vec<f32> = (0..r * in_dim)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let dtype = self.trainable_dtype();
                let a = Tensor::from_vec(a, (r, in_dim), &self.device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out_dim, r), dtype, &self.device)?;
                (a, b)
            }
            LoraInit::From(_) => {
                let Some((source, a, b)) = lora.pairs.get(module) else {
                    return Ok(None);
                };
                let shard = &self.sources[*source].shards[0];
                let load = |stored: &str, want: [usize; 2]| -> Result<Tensor> {
                    let t = shard
                        .load(stored, &self.device)?
                        .to_dtype(self.trainable_dtype())?;
                    check_shape(stored, &t, &want)?;
                    Ok(t)
                };
                (load(a, [r, in_dim])?, load(b, [out_dim, r])?)
            }
        };
        let trainable = self.trainable.as_ref().map(|t| &t.vars);
        let var = |suffix: &str, t: Tensor| -> Result<Tensor> {
            let var = Var::from_tensor(&t)?;
            let tensor = var.as_tensor().clone();
            if let Some(vars) = trainable {
                vars.borrow_mut().push((format!("{module}.{suffix}"), var));
            }
            Ok(tensor)
        };
        Ok(Some(LoraPair {
            a: var("lora_A.weight", a)?,
            b: var("lora_B.weight", b)?,
            scaling: setting.scaling(),
            dropout: setting.lora_dropout,
            dropout_key: setting.dropout_key.clone(),
            salt: name_hash(module),
        }))
    }

    /// The LoRA setting of a training run, if any.
    pub fn lora_training(&self) -> Option<&LoraTraining> {
        self.lora_training.as_ref().map(|l| &l.setting)
    }

    /// Loads the decoder's linear layers quantized ([`crate::model::quantized`]), for inference on
    /// the CPU.
    pub fn set_quantize(&mut self, quantize: Option<Quantize>) {
        self.quantize = quantize;
    }

    /// With [`Weights::set_quantize`], also quantizes the two vocabulary matrices, as
    /// llama.cpp does (for inference): `lm_head`, which decoding reads whole for every token,
    /// and the embedding rows, held in 8 bits for memory.
    pub fn set_quantize_vocab(&mut self, on: bool) {
        self.quantize_vocab = on;
    }

    /// Makes every weight whose canonical name satisfies `select` a trainable `Var`.
    pub fn set_trainable(&mut self, select: impl Fn(&str) -> bool + 'static) {
        self.trainable = Some(Trainable {
            select: Box::new(select),
            vars: Default::default(),
        });
    }

    /// The trainable weights loaded so far, in load order, by canonical name.
    pub fn take_vars(&self) -> Vec<(String, Var)> {
        self.trainable
            .as_ref()
            .map(|t| std::mem::take(&mut *t.vars.borrow_mut()))
            .unwrap_or_default()
    }

    /// Weights that do not exist yet: each `get` makes a tensor — ones for norm weights, zeros
    /// for biases, uniform noise of standard deviation `std` elsewhere.
    pub fn random(dtype: DType, device: Device, seed: u64, std: f32) -> Self {
        Self::random_with(dtype, device, seed, move |_| std)
    }

    /// As [`Weights::random`], with a standard deviation per canonical weight name.
    pub fn random_with(
        dtype: DType,
        device: Device,
        seed: u64,
        std_of: impl Fn(&str) -> f32 + 'static,
    ) -> Self {
        use rand::SeedableRng;
        let init = RandomInit {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            std_of: Box::new(std_of),
            made: Vec::new(),
        };
        Self {
            random: Some(std::cell::RefCell::new(init)),
            ..Self::new(dtype, device)
        }
    }

    /// The tensors a random `Weights` made, in request order.
    pub fn take_random(&self) -> Vec<(String, Tensor)> {
        self.random
            .as_ref()
            .map(|r| std::mem::take(&mut r.borrow_mut().made))
            .unwrap_or_default()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Loads the module under `prefix` (a canonical name such as `vision_tower`) in `dtype`
    /// instead of [`Self::dtype`], its activations following (`--vision-dtype`).
    pub fn set_dtype_under(&mut self, prefix: &str, dtype: DType) {
        self.dtype_under.push((prefix.to_string(), dtype));
    }

    /// The compute dtype of the tensor or module `name`.
    pub fn dtype_of(&self, name: &str) -> DType {
        self.dtype_under
            .iter()
            .find(|(prefix, _)| {
                name.strip_prefix(prefix.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
            .map_or(self.dtype, |&(_, dtype)| dtype)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Adds the weight files of a checkpoint directory (safetensors, else PyTorch `.bin`),
    /// renaming each tensor.
    pub fn add_dir(&mut self, dir: &Path, rename: Renamer) -> Result<()> {
        let WeightFiles { paths, index } = weight_files(dir)?;
        self.add_files(dir, paths, rename)?;
        match (index, self.sources.last()) {
            (Some(index), Some(source)) => index.check(&source.shards),
            _ => Ok(()),
        }
    }

    /// Adds one weight file (e.g. a stage-1 `projector.safetensors`, or the original's
    /// `mm_projector.bin`); its tensors replace any of the same canonical name added before.
    pub fn add_file(&mut self, path: &Path, rename: Renamer) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        self.add_files(&dir, vec![path.to_path_buf()], rename)
    }

    fn add_files(&mut self, dir: &Path, files: Vec<PathBuf>, rename: Renamer) -> Result<()> {
        let source = self.sources.len();
        let mut shards = Vec::with_capacity(files.len());
        for (shard, path) in files.into_iter().enumerate() {
            let st = Shard::open(&path)?;
            for stored in st.names() {
                if let Some(canonical) = rename(stored) {
                    self.index.insert(
                        canonical,
                        Location {
                            source,
                            shard,
                            stored: stored.to_string(),
                        },
                    );
                }
            }
            shards.push(st);
        }
        self.sources.push(Source {
            dir: dir.to_path_buf(),
            shards,
        });
        Ok(())
    }

    /// Adds a peft LoRA adapter directory: each weight it adapts is merged as it is read.
    /// `rename` maps the base model's stored names (the adapted module plus `.weight`), so the
    /// base must have been added first.
    pub fn add_lora(&mut self, dir: &Path, rename: Renamer) -> Result<()> {
        let adapter = crate::load::lora::Adapter::read(dir)?;
        let shard = Shard::open(&adapter.weights)?;
        let modules = crate::load::lora::pair_modules(shard.names(), &adapter.modules_to_save)
            .map_err(|m| ModelError::config(&adapter.weights, m))?;
        let source = self.sources.len();
        self.add_saved_modules(&adapter, &shard, source, rename);
        for (module, a, b) in modules {
            let target = rename(&format!("{module}.weight"))
                .filter(|t| self.index.contains_key(t))
                .ok_or_else(|| {
                    ModelError::config(
                        &adapter.weights,
                        format!("adapts `{module}`, which the base model has no weight for"),
                    )
                })?;
            let delta = LoraDelta {
                source,
                a,
                b,
                scale: adapter.scale,
            };
            self.lora.insert(target, delta);
        }
        self.sources.push(Source {
            dir: dir.to_path_buf(),
            shards: vec![shard],
        });
        Ok(())
    }

    /// `W + scale · B·A`, summed in f32 and rounded once to `W`'s dtype.
    fn merge_lora(&self, name: &str, w: Tensor, delta: &LoraDelta) -> Result<Tensor> {
        let shard = &self.sources[delta.source].shards[0];
        let a = shard.load(&delta.a, &self.device)?.to_dtype(DType::F32)?;
        let b = shard.load(&delta.b, &self.device)?.to_dtype(DType::F32)?;
        let (out, inp) = w.dims2()?;
        let rank = a.dim(0)?;
        for (t, label, want) in [(&a, &delta.a, [rank, inp]), (&b, &delta.b, [out, rank])] {
            if t.dims() != want {
                return Err(ModelError::WrongShape {
                    name: format!("{label} (adapting {name})"),
                    expected: want.to_vec(),
                    got: t.dims().to_vec(),
                });
            }
        }
        let merged = (w.to_dtype(DType::F32)? + (b.matmul(&a)? * delta.scale)?)?;
        Ok(merged.to_dtype(w.dtype())?)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Canonical names of everything loaded, sorted.
    pub fn names(&self) -> BTreeSet<&str> {
        self.index.keys().map(String::as_str).collect()
    }

    /// Loads one tensor in the compute dtype, checking its shape against what the config implies.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let trains = self.trainable.as_ref().is_some_and(|tr| (tr.select)(name));
        // A master copy is read from the file, not through the narrower compute dtype.
        let dtype = match trains {
            true => self.trainable_dtype(),
            false => self.dtype_of(name),
        };
        let t = match &self.random {
            Some(random) => random.borrow_mut().make(name, shape, dtype, &self.device)?,
            None => self.get_stored(name)?.to_dtype(dtype)?,
        };
        check_shape(name, &t, shape)?;
        match &self.trainable {
            Some(tr) if trains => {
                let var = Var::from_tensor(&t)?;
                let tensor = var.as_tensor().clone();
                tr.vars.borrow_mut().push((name.to_string(), var));
                Ok(tensor)
            }
            _ => Ok(t),
        }
    }

    /// Whether nothing loaded through these weights trains (no trainable selection): the
    /// model only runs inference, so layers may take a layout or drop what only training reads.
    pub fn inference_only(&self) -> bool {
        self.trainable.is_none()
    }

    /// A linear layer's `[out, in]` weight. Where it only serves inference (not trainable, not
    /// random) and the CPU computes in f32 (or bf16 without bf16 products, the values rounded through
    /// bf16), it is read into [`crate::kernels::gemm_layout`], the layout the CPU products run fastest
    /// from. Only safetensors shards of F32, F16 or BF16 are read that way; anything else keeps
    /// the stored layout, which every product also takes.
    pub fn get_linear(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let dtype = self.dtype_of(name);
        if self.inference_only()
            && self.random.is_none()
            && crate::kernels::gemm_layout::applies(dtype, &self.device)
            && !self.lora.contains_key(name)
            && let Some(loc) = self.index.get(name)
            && let Some(t) = self.sources[loc.source].shards[loc.shard]
                .load_transposed(&loc.stored, dtype == DType::BF16)?
        {
            check_shape(name, &t, shape)?;
            self.used.borrow_mut().insert(name.to_string());
            return Ok(t);
        }
        self.get(name, shape)
    }

    /// A tensor exactly as stored (its file dtype, no conversion): what a checkpoint writer
    /// copies for frozen weights so that they stay bit-identical.
    pub fn get_stored(&self, name: &str) -> Result<Tensor> {
        let loc = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                dir: self
                    .sources
                    .first()
                    .map(|s| s.dir.clone())
                    .unwrap_or_default(),
            })?;
        self.used.borrow_mut().insert(name.to_string());
        let t = self.sources[loc.source].shards[loc.shard].load(&loc.stored, &self.device)?;
        match self.lora.get(name) {
            Some(delta) => self.merge_lora(name, t, delta),
            None => Ok(t),
        }
    }

    /// Canonical names in the files that nothing has read, sorted.
    pub fn unused(&self) -> Vec<&str> {
        let used = self.used.borrow();
        let mut names: Vec<&str> = self
            .index
            .keys()
            .filter(|n| !used.contains(n.as_str()))
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }

    pub fn get_unchecked(&self, name: &str) -> Result<Tensor> {
        Ok(self.get_stored(name)?.to_dtype(self.dtype_of(name))?)
    }

    /// A view that prepends `prefix.` to every name, mirroring the module tree.
    pub fn pp(&self, prefix: &str) -> WeightsView<'_> {
        WeightsView {
            weights: self,
            prefix: prefix.to_string(),
        }
    }
}

impl RandomInit {
    fn make(
        &mut self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let is_norm = name.contains("norm") && name.ends_with(".weight");
        let data: Vec<f32> = if is_norm {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            // Uniform on [-a, a] has standard deviation a/√3.
            let a = (self.std_of)(name) * 3f32.sqrt();
            (0..n).map(|_| self.rng.random_range(-a..a)).collect()
        };
        let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
        self.made.push((name.to_string(), t.clone()));
        Ok(t)
    }
}

/// FNV-1a of a name: a seed per module that does not depend on load order.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn check_shape(name: &str, t: &Tensor, shape: &[usize]) -> Result<()> {
    if t.dims() != shape {
        return Err(ModelError::WrongShape {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

/// `Weights` under a module path, e.g. `language_model.layers.3`.
#[derive(Clone)]
pub struct WeightsView<'a> {
    weights: &'a Weights,
    prefix: String,
}

impl<'a> WeightsView<'a> {
    pub fn pp(&self, name: impl std::fmt::Display) -> WeightsView<'a> {
        WeightsView {
            weights: self.weights,
            prefix: format!("{}.{name}", self.prefix),
        }
    }
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights.get(&format!("{}.{name}", self.prefix), shape)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.weights.contains(&format!("{}.{name}", self.prefix))
    }
    pub fn dtype(&self) -> DType {
        self.weights.dtype_of(&self.prefix)
    }
    pub fn quantize(&self) -> Option<Quantize> {
        self.weights.quantize
    }
    /// The quantization of `lm_head` and the embeddings, if any ([`Weights::set_quantize_vocab`]).
    pub fn quantize_vocab(&self) -> Option<Quantize> {
        self.weights
            .quantize
            .filter(|_| self.weights.quantize_vocab)
    }
    /// See [`Weights::inference_only`].
    pub fn inference_only(&self) -> bool {
        self.weights.inference_only()
    }
    /// This module's trainable LoRA pair; see [`Weights::lora_pair`].
    pub fn lora_pair(&self, in_dim: usize, out_dim: usize) -> Result<Option<LoraPair>> {
        self.weights.lora_pair(&self.prefix, in_dim, out_dim)
    }
    pub fn device(&self) -> &Device {
        &self.weights.device
    }
    /// The dtype that activations flow in between the products; see [`activation_dtype`].
    /// Under mixed precision it is the weights' dtype on every device.
    pub fn activation_dtype(&self) -> DType {
        match self.weights.master {
            Some(_) => self.weights.dtype,
            None => activation_dtype(self.dtype(), &self.weights.device),
        }
    }
    /// A linear layer's `[out, in]` weight; see [`Weights::get_linear`].
    pub fn get_linear(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.weights
            .get_linear(&format!("{}.{name}", self.prefix), shape)
    }
    /// A tensor that meets activations elementwise (a norm's scale, a bias, an added
    /// embedding), loaded in the activation dtype. A trainable one is handed out as its master
    /// (a cast here would be made once, and go stale at the first update); the layer casts it
    /// where it meets the activations.
    pub fn get_elementwise(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name, shape)?;
        match t.is_variable() {
            true => Ok(t),
            false => Ok(t.to_dtype(self.activation_dtype())?),
        }
    }
}

/// The dtype that activations flow in, for weights of `weights` dtype on `device`.
///
/// bf16 weights on the CPU keep their activations in f32: the products take bf16 inputs with
/// f32 sums (`bf16_linear` on AMX or AVX512-BF16, or the GEMV widening the weight as it reads it), and everything between them
/// (norms, softmax, activations, the residual stream, the KV cache) runs in f32, where the CPU
/// kernels are vectorised. CPUs have no bf16 arithmetic outside those products, so computing
/// the rest in bf16 would only add conversions. On a GPU the weights' dtype is used throughout.
pub fn activation_dtype(weights: DType, device: &Device) -> DType {
    if weights == DType::BF16 && device.is_cpu() {
        DType::F32
    } else {
        weights
    }
}

/// The weight files of a directory, and the index that named them, if any.
struct WeightFiles {
    paths: Vec<PathBuf>,
    index: Option<ShardIndex>,
}

/// A `*.index.json`: which shard holds each stored tensor name.
struct ShardIndex {
    path: PathBuf,
    /// The shards it names, in the order of [`WeightFiles::paths`].
    files: Vec<String>,
    weight_map: Vec<(String, String)>,
}

impl ShardIndex {
    /// Every tensor must be in the shard the index names: a wrong entry is the index's fault,
    /// and would otherwise surface as a "missing" weight that names no file.
    fn check(&self, shards: &[Shard]) -> Result<()> {
        let held: HashMap<&str, std::collections::HashSet<&str>> = self
            .files
            .iter()
            .zip(shards)
            .map(|(f, s)| (f.as_str(), s.names().into_iter().collect()))
            .collect();
        for (name, file) in &self.weight_map {
            if !held
                .get(file.as_str())
                .is_some_and(|names| names.contains(name.as_str()))
            {
                return Err(ModelError::config(
                    &self.path,
                    format!("maps `{name}` to `{file}`, which does not hold it"),
                ));
            }
        }
        Ok(())
    }
}

/// The weight files [`Weights::add_dir`] would read from `dir`.
pub(crate) fn weight_file_paths(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(weight_files(dir)?.paths)
}

/// The weight files of a directory. safetensors first: those its index names, else
/// `model.safetensors`, else every `*.safetensors` file. Then the same for PyTorch `.bin`
/// (`pytorch_model.bin.index.json`, `pytorch_model.bin`, every `*.bin`), the format of the
/// original LLaVA releases.
fn weight_files(dir: &Path) -> Result<WeightFiles> {
    for (index, single, extension) in [
        (
            "model.safetensors.index.json",
            "model.safetensors",
            "safetensors",
        ),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", "bin"),
    ] {
        let index = dir.join(index);
        if index.is_file() {
            return indexed_files(dir, &index);
        }
        let single = dir.join(single);
        if single.is_file() {
            return Ok(WeightFiles {
                paths: vec![single],
                index: None,
            });
        }
        let entries = std::fs::read_dir(dir).map_err(|source| ModelError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == extension))
            // HF's Trainer pickles its arguments beside the weights.
            .filter(|p| p.file_name().is_none_or(|f| f != "training_args.bin"))
            .collect();
        if !paths.is_empty() {
            paths.sort();
            return Ok(WeightFiles { paths, index: None });
        }
    }
    Err(ModelError::config(
        dir,
        "no weights found (*.safetensors or PyTorch *.bin)",
    ))
}

/// The shards a `*.index.json` names in its `weight_map`, each checked to exist.
fn indexed_files(dir: &Path, index: &Path) -> Result<WeightFiles> {
    let text = std::fs::read_to_string(index).map_err(|source| ModelError::Io {
        path: index.to_path_buf(),
        source,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.to_path_buf(),
            source,
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::config(index, "has no `weight_map` object"))?;
    let mut files = BTreeSet::new();
    let mut weight_map = Vec::with_capacity(map.len());
    for (name, file) in map {
        let file = file
            .as_str()
            .ok_or_else(|| ModelError::config(index, "`weight_map` values must be file names"))?;
        files.insert(file.to_string());
        weight_map.push((name.clone(), file.to_string()));
    }
    let mut paths = Vec::new();
    for f in &files {
        let p = dir.join(f);
        if !p.is_file() {
            return Err(ModelError::config(
                index,
                format!("names shard `{f}`, which is missing"),
            ));
        }
        paths.push(p);
    }
    Ok(WeightFiles {
        paths,
        index: Some(ShardIndex {
            path: index.to_path_buf(),
            files: files.into_iter().collect(),
            weight_map,
        }),
    })
}

/// HF llava layout, any transformers version: strips `model.` (4.52+), `vision_model.` and the
/// decoder's inner `model.`, and moves `language_model.lm_head` to `lm_head`.
pub fn hf_llava_name(stored: &str) -> Option<String> {
    let n = stored.strip_prefix("model.").unwrap_or(stored);
    if let Some(rest) = n.strip_prefix("vision_tower.vision_model.") {
        return Some(format!("vision_tower.{rest}"));
    }
    if let Some(rest) = n.strip_prefix("language_model.model.") {
        return Some(format!("language_model.{rest}"));
    }
    if let Some(rest) = n.strip_prefix("language_model.lm_head.") {
        return Some(format!("lm_head.{rest}"));
    }
    Some(n.to_string())
}

/// The inverse of [`hf_llava_name`] for writing: the llava-hf hub naming, which every
/// transformers version loads (4.x natively, 4.52+ and 5.x through their key mappings).
pub fn hub_name(canonical: &str) -> String {
    if let Some(rest) = canonical.strip_prefix("vision_tower.") {
        return format!("vision_tower.vision_model.{rest}");
    }
    if let Some(rest) = canonical.strip_prefix("language_model.") {
        return format!("language_model.model.{rest}");
    }
    if let Some(rest) = canonical.strip_prefix("lm_head.") {
        return format!("language_model.lm_head.{rest}");
    }
    canonical.to_string()
}

/// The original layout's stored name of a canonical language-model or projector weight (the
/// inverse of [`original_llava_name`]); `None` for the vision tower, which the original keeps in
/// its own CLIP checkpoint. `projector_depth` 1 is v1's bare `linear`.
pub fn original_name(canonical: &str, projector_depth: usize) -> Option<String> {
    if let Some(rest) = canonical.strip_prefix("multi_modal_projector.linear_") {
        let (k, leaf) = rest.split_once('.')?;
        let k: usize = k.parse().ok().filter(|&k| k >= 1)?;
        return Some(if projector_depth == 1 {
            format!("model.mm_projector.{leaf}")
        } else {
            format!("model.mm_projector.{}.{leaf}", 2 * (k - 1))
        });
    }
    if canonical.starts_with("vision_tower.") {
        return None;
    }
    if canonical == "image_newline" {
        return Some("model.image_newline".into());
    }
    Some(match canonical.strip_prefix("language_model.") {
        Some(rest) => format!("model.{rest}"),
        None => canonical.to_string(),
    })
}

/// The original liuhaotian layout: a LLaMA checkpoint with `model.mm_projector.*` inside.
/// `mm_projector` is an `nn.Sequential`: linears sit at even indices (0, 2, …) between GELUs, or
/// it is a bare `nn.Linear` for v1's `linear` projector.
pub fn original_llava_name(stored: &str) -> Option<String> {
    if let Some(rest) = stored.strip_prefix("model.mm_projector.") {
        let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
        return match head.parse::<usize>() {
            Ok(_) if tail.is_empty() => None,
            Ok(i) => Some(format!("multi_modal_projector.linear_{}.{tail}", i / 2 + 1)),
            Err(_) => Some(format!("multi_modal_projector.linear_1.{rest}")),
        };
    }
    if let Some(rest) = stored.strip_prefix("model.vision_tower.vision_tower.vision_model.") {
        return Some(format!("vision_tower.{rest}"));
    }
    if stored.starts_with("model.vision_tower.") {
        return None;
    }
    // LLaVA-1.6's end-of-row vector belongs to the LLaVA model, not to the LLaMA inside it.
    if stored == "model.image_newline" {
        return Some("image_newline".into());
    }
    if let Some(rest) = stored.strip_prefix("model.") {
        return Some(format!("language_model.{rest}"));
    }
    Some(stored.to_string())
}

/// A projector file given on its own (`llava train --projector`): ours or llava-hf's
/// (`multi_modal_projector.*`), or the original's `mm_projector.bin` (`model.mm_projector.N.*`).
/// Anything else in the file is ignored, so it cannot replace other weights.
pub fn projector_file_name(stored: &str) -> Option<String> {
    let name = if stored.starts_with("model.mm_projector.") {
        original_llava_name(stored)?
    } else {
        hf_llava_name(stored)?
    };
    name.starts_with("multi_modal_projector.").then_some(name)
}

/// A separate CLIP checkpoint (`CLIPVisionModel` or the full `CLIPModel`): keep the vision part.
pub fn clip_vision_name(stored: &str) -> Option<String> {
    stored
        .strip_prefix("vision_model.")
        .map(|rest| format!("vision_tower.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dir/model.safetensors` holding `tensors`.
    fn safetensors_file(dir: &Path, tensors: &[(&str, Tensor)]) -> PathBuf {
        let tensors: std::collections::HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        std::fs::create_dir_all(dir).expect("dir");
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).expect("save");
        path
    }

    /// A safetensors file holding `w` (`[5, 70]`, distinct integers below 256 in each row) in
    /// f32 and in bf16.
    fn linear_file(dir: &Path) -> (PathBuf, Tensor) {
        let values: Vec<f32> = (0..350).map(|i| ((i * 7) % 251) as f32).collect();
        let w = Tensor::from_vec(values, (5, 70), &Device::Cpu).expect("w");
        let bf16 = w.to_dtype(DType::BF16).expect("bf16");
        let path = safetensors_file(dir, &[("f32.weight", w.clone()), ("bf16.weight", bf16)]);
        (path, w)
    }

    #[test]
    fn inference_weights_are_read_into_the_gemm_layout_and_trainable_ones_are_not() {
        let dir = std::env::temp_dir().join(format!("llava-layout-{}", std::process::id()));
        let (path, w) = linear_file(&dir);
        let same = |name: &str| Some(name.to_string());
        let mut inference = Weights::new(DType::F32, Device::Cpu);
        inference.add_file(&path, same).expect("add");
        let mut training = Weights::new(DType::F32, Device::Cpu);
        training.add_file(&path, same).expect("add");
        training.set_trainable(|_| true);
        for name in ["f32.weight", "bf16.weight"] {
            let t = inference.get_linear(name, &[5, 70]).expect("linear");
            // Integers below 256 are exact in bf16, so both files hold the same values.
            assert_eq!(
                t.to_vec2::<f32>().expect("t"),
                w.to_vec2::<f32>().expect("w")
            );
            assert!(crate::kernels::gemm_layout::is_transposed(&t), "{name}");
            let t = training.get_linear(name, &[5, 70]).expect("linear");
            assert!(t.is_contiguous(), "{name}");
        }
        let err = inference
            .get_linear("f32.weight", &[70, 5])
            .expect_err("shape");
        assert!(err.to_string().contains("f32.weight"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_bf16_compute_dtype_rounds_f32_weights_in_either_layout() {
        let dir = std::env::temp_dir().join(format!("llava-bf16-layout-{}", std::process::id()));
        // Values that bf16 cannot hold, so that a missed rounding shows.
        let values: Vec<f32> = (0..350).map(|i| 1.0 + i as f32 * 1.7e-3).collect();
        let w = Tensor::from_vec(values, (5, 70), &Device::Cpu).expect("w");
        let path = safetensors_file(&dir, &[("w.weight", w.clone())]);
        let mut weights = Weights::new(DType::BF16, Device::Cpu);
        weights
            .add_file(&path, |n: &str| Some(n.to_string()))
            .expect("add");
        let t = weights.get_linear("w.weight", &[5, 70]).expect("linear");
        // Without bf16 products the tower's weights are widened once at load; with them they stay bf16.
        assert_eq!(
            crate::kernels::gemm_layout::is_transposed(&t),
            !crate::kernels::bf16_linear::available()
        );
        let rounded = w.to_dtype(DType::BF16).and_then(|w| w.to_dtype(DType::F32));
        assert_eq!(
            t.to_dtype(DType::F32)
                .and_then(|t| t.to_vec2::<f32>())
                .expect("t"),
            rounded.and_then(|w| w.to_vec2::<f32>()).expect("w")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    /// peft's fresh init: `lora_A` uniform on ±1/√in, `lora_B` zero, both trainable under the
    /// module's name; only the targeted decoder projections get a pair.
    #[test]
    fn fresh_lora_pairs_follow_peft_s_init_and_the_targets() {
        let mut weights = Weights::new(DType::F32, Device::Cpu);
        let setting = LoraTraining {
            r: 4,
            lora_alpha: 8.0,
            use_rslora: false,
            lora_dropout: 0.0,
            targets: vec!["q_proj".into()],
            init: LoraInit::Fresh(1),
            dropout_key: DropoutKey::default(),
        };
        weights
            .set_lora_training(setting, hf_llava_name)
            .expect("setting");
        let q = "language_model.layers.0.self_attn.q_proj";
        let pair = weights
            .lora_pair(q, 64, 32)
            .expect("pair")
            .expect("targeted");
        assert_eq!((pair.a.dims(), pair.b.dims()), (&[4, 64][..], &[32, 4][..]));
        assert_eq!(pair.scaling, 2.0);
        let a: Vec<f32> = pair.a.flatten_all().and_then(|t| t.to_vec1()).expect("a");
        let bound = 1.0 / 8.0;
        assert!(a.iter().all(|v| v.abs() <= bound) && a.iter().any(|v| v.abs() > bound / 2.0));
        let b: Vec<f32> = pair.b.flatten_all().and_then(|t| t.to_vec1()).expect("b");
        assert!(b.iter().all(|&v| v == 0.0));
        for other in [
            "language_model.layers.0.self_attn.k_proj",
            "vision_tower.encoder.layers.0.self_attn.q_proj",
        ] {
            assert!(
                weights.lora_pair(other, 64, 32).expect("none").is_none(),
                "{other}"
            );
        }
        let names: Vec<String> = weights.take_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight")]
        );
    }

    #[test]
    fn every_hf_naming_maps_to_one_canonical_name() {
        for stored in [
            "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            "model.vision_tower.encoder.layers.0.mlp.fc1.weight",
        ] {
            assert_eq!(
                hf_llava_name(stored).as_deref(),
                Some("vision_tower.encoder.layers.0.mlp.fc1.weight")
            );
        }
        for stored in [
            "language_model.model.norm.weight",
            "model.language_model.norm.weight",
        ] {
            assert_eq!(
                hf_llava_name(stored).as_deref(),
                Some("language_model.norm.weight")
            );
        }
        for stored in ["language_model.lm_head.weight", "lm_head.weight"] {
            assert_eq!(hf_llava_name(stored).as_deref(), Some("lm_head.weight"));
        }
        for stored in [
            "multi_modal_projector.linear_2.bias",
            "model.multi_modal_projector.linear_2.bias",
        ] {
            assert_eq!(
                hf_llava_name(stored).as_deref(),
                Some("multi_modal_projector.linear_2.bias")
            );
        }
    }

    #[test]
    fn hub_names_round_trip() {
        for canonical in [
            "vision_tower.encoder.layers.0.mlp.fc1.weight",
            "language_model.layers.1.self_attn.q_proj.weight",
            "lm_head.weight",
            "multi_modal_projector.linear_1.bias",
        ] {
            assert_eq!(
                hf_llava_name(&hub_name(canonical)).as_deref(),
                Some(canonical)
            );
        }
    }

    /// `llava merge-lora` writes original names that read back as the same canonical ones.
    #[test]
    fn original_names_round_trip() {
        for (stored, depth) in [
            ("model.mm_projector.0.weight", 2),
            ("model.mm_projector.2.bias", 2),
            ("model.mm_projector.4.weight", 3),
            ("model.mm_projector.weight", 1),
            ("model.layers.3.mlp.down_proj.weight", 2),
            ("model.embed_tokens.weight", 2),
            ("model.image_newline", 2),
            ("lm_head.weight", 2),
        ] {
            let canonical = original_llava_name(stored).expect("canonical");
            assert_eq!(original_name(&canonical, depth).as_deref(), Some(stored));
        }
        assert_eq!(original_name("vision_tower.post_layernorm.weight", 2), None);
        assert_eq!(
            original_llava_name("model.image_newline").as_deref(),
            Some("image_newline")
        );
    }

    #[test]
    fn original_layout_names() {
        assert_eq!(
            original_llava_name("model.mm_projector.0.weight").as_deref(),
            Some("multi_modal_projector.linear_1.weight")
        );
        assert_eq!(
            original_llava_name("model.mm_projector.2.bias").as_deref(),
            Some("multi_modal_projector.linear_2.bias")
        );
        assert_eq!(
            original_llava_name("model.mm_projector.weight").as_deref(),
            Some("multi_modal_projector.linear_1.weight")
        );
        assert_eq!(
            original_llava_name("model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("language_model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            original_llava_name("lm_head.weight").as_deref(),
            Some("lm_head.weight")
        );
        assert_eq!(
            clip_vision_name("vision_model.post_layernorm.weight").as_deref(),
            Some("vision_tower.post_layernorm.weight")
        );
        assert_eq!(
            clip_vision_name("text_model.embeddings.token_embedding.weight"),
            None
        );
    }

    #[test]
    fn projector_files_of_either_layout_map_to_the_projector_only() {
        for (stored, canonical) in [
            (
                "model.mm_projector.2.weight",
                "multi_modal_projector.linear_2.weight",
            ),
            (
                "multi_modal_projector.linear_1.bias",
                "multi_modal_projector.linear_1.bias",
            ),
            (
                "model.multi_modal_projector.linear_2.bias",
                "multi_modal_projector.linear_2.bias",
            ),
        ] {
            assert_eq!(projector_file_name(stored).as_deref(), Some(canonical));
        }
        for other in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight"] {
            assert_eq!(projector_file_name(other), None, "{other}");
        }
    }
}
