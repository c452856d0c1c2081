//! LoRA adapters on the attention and MLP projections, saved and loaded in Hugging Face PEFT
//! format.
//!
//! A targeted projection computes `y = x W^T + (alpha / r) · dropout(x) A^T B^T` with
//! `A: (r, in)` and `B: (out, r)`, the orientation of PEFT's `lora_A`/`lora_B` `nn.Linear`
//! weights. The base weights are plain tensors; only `A` and `B` are candle [`Var`]s, so only they
//! receive gradients. Initialisation follows PEFT: `A` is Kaiming-uniform with `a = sqrt(5)`
//! (which reduces to uniform in `±1/sqrt(in)`), `B` is zero, so a new adapter changes nothing.
//!
//! # Row order of q/k adapters
//!
//! llama.cpp's converter stores a llama model's `q_proj`/`k_proj` weights with their output rows
//! permuted, so that rotary embedding can rotate adjacent pairs `(2i, 2i+1)` instead of the
//! Hugging Face pairs `(i, i + d/2)` within each head. Within head `h`, Hugging Face row
//! `h·d + s·d/2 + i` becomes GGUF row `h·d + 2i + s` (`s ∈ {0, 1}`, `i < d/2`); see
//! [`hf_rows_to_gguf`] and [`gguf_rows_to_hf`]. (qwen2 files are not permuted.)
//!
//! This trainer works in GGUF layout, so a `B` trained here has GGUF row order for `q_proj` and
//! `k_proj`. [`LoraAdapter::save_peft`] un-permutes those rows into Hugging Face order, which is
//! what PEFT, vLLM and llama.cpp's `convert_lora_to_gguf.py` expect (the latter re-applies the
//! permutation itself); [`LoraAdapter::load_peft`] re-permutes them. `A` (columns: the input
//! features) and every other module are layout-independent. The permutation uses `n_head` for
//! `q_proj` and `n_kv_head` for `k_proj`, exactly as the converter does.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{LlamaError, Result};
use crate::gguf::LlamaConfig;

/// File name of the PEFT adapter configuration.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the PEFT adapter weights.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// A projection that can carry a LoRA adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetModule {
    /// Query projection (`q_proj`, GGUF `attn_q`).
    QProj,
    /// Key projection (`k_proj`, GGUF `attn_k`).
    KProj,
    /// Value projection (`v_proj`, GGUF `attn_v`).
    VProj,
    /// Attention output projection (`o_proj`, GGUF `attn_output`).
    OProj,
    /// MLP gate projection (`gate_proj`, GGUF `ffn_gate`).
    GateProj,
    /// MLP up projection (`up_proj`, GGUF `ffn_up`).
    UpProj,
    /// MLP down projection (`down_proj`, GGUF `ffn_down`).
    DownProj,
}

impl TargetModule {
    /// Every projection, in Hugging Face module order.
    pub const ALL: [TargetModule; 7] = [
        Self::QProj,
        Self::KProj,
        Self::VProj,
        Self::OProj,
        Self::GateProj,
        Self::UpProj,
        Self::DownProj,
    ];

    /// The Hugging Face module name (`q_proj`, …).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::QProj => "q_proj",
            Self::KProj => "k_proj",
            Self::VProj => "v_proj",
            Self::OProj => "o_proj",
            Self::GateProj => "gate_proj",
            Self::UpProj => "up_proj",
            Self::DownProj => "down_proj",
        }
    }

    /// The GGUF tensor stem (`attn_q`, …); the weight is `blk.{i}.{stem}.weight`.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::QProj => "attn_q",
            Self::KProj => "attn_k",
            Self::VProj => "attn_v",
            Self::OProj => "attn_output",
            Self::GateProj => "ffn_gate",
            Self::UpProj => "ffn_up",
            Self::DownProj => "ffn_down",
        }
    }

    /// Parses a Hugging Face module name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.hf_name() == name)
    }

    /// The Hugging Face parent module (`self_attn` or `mlp`).
    pub fn hf_parent(self) -> &'static str {
        match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj => "mlp",
        }
    }

    /// `(in_features, out_features)` of this projection.
    pub fn in_out(self, c: &LlamaConfig) -> (usize, usize) {
        match self {
            Self::QProj => (c.hidden_size, c.q_dim()),
            Self::KProj | Self::VProj => (c.hidden_size, c.kv_dim()),
            Self::OProj => (c.q_dim(), c.hidden_size),
            Self::GateProj | Self::UpProj => (c.hidden_size, c.ffn_hidden),
            Self::DownProj => (c.ffn_hidden, c.hidden_size),
        }
    }

    /// The number of heads that interleave this projection's rows in a permuted GGUF file, if
    /// the module is permuted at all.
    fn permuted_heads(self, c: &LlamaConfig) -> Option<usize> {
        if !c.architecture.qk_rows_permuted() {
            return None;
        }
        match self {
            Self::QProj => Some(c.n_head),
            Self::KProj => Some(c.n_kv_head),
            _ => None,
        }
    }
}

/// Hyper-parameters of a LoRA adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// Config files name only the fields they change, and a misspelt field is an error.
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update.
    pub rank: usize,
    /// Scaling numerator: the update is multiplied by `alpha / r` (or `alpha / sqrt(r)` with
    /// rsLoRA).
    pub alpha: f64,
    /// Dropout probability on the adapter's input (training only).
    pub dropout: f64,
    /// Which projections carry an adapter (in every layer).
    pub targets: Vec<TargetModule>,
    /// Seed for initialisation and dropout masks.
    pub seed: u64,
    /// rsLoRA scaling (`alpha / sqrt(r)`), PEFT's `use_rslora`.
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: vec![
                TargetModule::QProj,
                TargetModule::KProj,
                TargetModule::VProj,
                TargetModule::OProj,
            ],
            seed: 0,
            use_rslora: false,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B·A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LlamaError::Config("LoRA rank must be positive".to_string()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LlamaError::Config(format!(
                "LoRA dropout {} is outside [0, 1)",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(LlamaError::Config(
                "LoRA needs at least one target module".to_string(),
            ));
        }
        Ok(())
    }
}

/// The two factors of one adapted projection.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `(r, in)`, PEFT's `lora_A.weight`.
    pub a: Var,
    /// `(out, r)`, PEFT's `lora_B.weight`, rows in GGUF order.
    pub b: Var,
}

/// A LoRA adapter for every layer of a llama-family model.
#[derive(Debug)]
pub struct LoraAdapter {
    config: LoraConfig,
    model_config: LlamaConfig,
    pairs: BTreeMap<(usize, TargetModule), LoraPair>,
    training: bool,
    dropout_rng: Mutex<ChaCha8Rng>,
}

impl LoraAdapter {
    /// A freshly initialised adapter (`A` random, `B` zero) in `dtype` on `device`.
    pub fn new(
        config: LoraConfig,
        model_config: &LlamaConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let mut pairs = BTreeMap::new();
        let targets = dedup_targets(&config.targets);
        for layer in 0..model_config.n_layer {
            for &module in &targets {
                let (input, out) = module.in_out(model_config);
                // PEFT: kaiming_uniform_(a = sqrt(5)) gives bound = gain * sqrt(3 / fan_in) with
                // gain = sqrt(2 / (1 + 5)), i.e. 1 / sqrt(fan_in).
                let bound = 1.0 / (input as f64).sqrt();
                let a: Vec<f64> = (0..config.rank * input)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Tensor::from_vec(a, (config.rank, input), device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, config.rank), dtype, device)?;
                pairs.insert(
                    (layer, module),
                    LoraPair {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                    },
                );
            }
        }
        let dropout_rng = Mutex::new(ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_d409));
        Ok(Self {
            config: LoraConfig { targets, ..config },
            model_config: model_config.clone(),
            pairs,
            training: false,
            dropout_rng,
        })
    }

    /// The adapter's hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// The configuration of the model this adapter fits.
    pub fn model_config(&self) -> &LlamaConfig {
        &self.model_config
    }

    /// The factor applied to `B·A`.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// Turns dropout on (training) or off (evaluation, log-prob recomputation). Off by default.
    pub fn set_training(&mut self, training: bool) {
        self.training = training;
    }

    /// Whether dropout is active.
    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Every trainable variable, in a fixed order (layer, module, then A before B).
    pub fn vars(&self) -> Vec<Var> {
        self.pairs
            .values()
            .flat_map(|p| [p.a.clone(), p.b.clone()])
            .collect()
    }

    /// The factors of one projection, if it is adapted.
    pub fn pair(&self, layer: usize, module: TargetModule) -> Option<&LoraPair> {
        self.pairs.get(&(layer, module))
    }

    /// Iterates over `((layer, module), pair)` in a fixed order.
    pub fn pairs(&self) -> impl Iterator<Item = (&(usize, TargetModule), &LoraPair)> {
        self.pairs.iter()
    }

    /// `scale · B · A` in GGUF layout, `(out, in)`, or `None` when the projection is not adapted.
    pub fn delta(&self, layer: usize, module: TargetModule) -> Result<Option<Tensor>> {
        match self.pairs.get(&(layer, module)) {
            Some(p) => Ok(Some(
                (p.b.as_tensor().matmul(p.a.as_tensor())? * self.scale())?,
            )),
            None => Ok(None),
        }
    }

    /// The adapter's contribution `scale · dropout(x) A^T B^T` for `x: (N, in)`, cast back to
    /// `x`'s dtype; `None` when the projection is not adapted.
    pub fn forward_delta(
        &self,
        layer: usize,
        module: TargetModule,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some(pair) = self.pairs.get(&(layer, module)) else {
            return Ok(None);
        };
        let a = pair.a.as_tensor();
        let x_dtype = x.dtype();
        let mut h = x.to_dtype(a.dtype())?;
        if self.drops_out() {
            h = self.dropout(&h)?;
        }
        // Scaling the rank-r intermediate instead of the output touches r values per token
        // rather than one per output feature.
        let h = (h.matmul(&a.t()?)? * self.scale())?.matmul(&pair.b.as_tensor().t()?)?;
        Ok(Some(h.to_dtype(x_dtype)?))
    }

    /// Whether [`LoraAdapter::forward_delta`] applies dropout to its input (training with a
    /// non-zero rate).
    pub fn drops_out(&self) -> bool {
        self.training && self.config.dropout > 0.0
    }

    fn dropout(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.config.dropout;
        let keep_scale = 1.0 / (1.0 - p);
        let n = x.elem_count();
        // Masks come from the adapter's own seeded stream so that runs are reproducible on any
        // device; candle's device RNGs are not seedable on the CPU.
        let mask: Vec<f32> = {
            let mut rng = self
                .dropout_rng
                .lock()
                .map_err(|_| LlamaError::Config("dropout RNG lock poisoned".to_string()))?;
            (0..n)
                .map(|_| {
                    if rng.random::<f64>() < p {
                        0.0
                    } else {
                        keep_scale as f32
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` (f32) in PEFT format into
    /// `dir` (created if needed). q/k `B` rows are converted to Hugging Face order.
    pub fn save_peft(&self, dir: impl AsRef<Path>, base_model_name: &str) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir)?;
        let peft = PeftConfig {
            peft_type: "LORA".to_string(),
            task_type: Some("CAUSAL_LM".to_string()),
            r: self.config.rank,
            lora_alpha: alpha_json(self.config.alpha),
            lora_dropout: self.config.dropout,
            target_modules: serde_json::Value::Array(
                self.config
                    .targets
                    .iter()
                    .map(|m| serde_json::Value::String(m.hf_name().to_string()))
                    .collect(),
            ),
            bias: "none".to_string(),
            base_model_name_or_path: Some(base_model_name.to_string()),
            fan_in_fan_out: false,
            inference_mode: true,
            use_rslora: self.config.use_rslora,
            init_lora_weights: serde_json::Value::Bool(true),
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: serde_json::Map::new(),
            alpha_pattern: serde_json::Map::new(),
            revision: None,
        };
        std::fs::write(
            dir.join(ADAPTER_CONFIG_FILE),
            serde_json::to_string_pretty(&peft)?,
        )?;

        let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (&(layer, module), pair) in &self.pairs {
            let a = pair.a.as_tensor().to_dtype(DType::F32)?;
            let mut b = pair.b.as_tensor().to_dtype(DType::F32)?;
            if let Some(heads) = module.permuted_heads(&self.model_config) {
                b = gguf_rows_to_hf(&b, heads)?;
            }
            for (suffix, t) in [("lora_A", a), ("lora_B", b)] {
                let bytes: Vec<u8> = t
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .flat_map(f32::to_le_bytes)
                    .collect();
                buffers.push((peft_key(layer, module, suffix), t.dims().to_vec(), bytes));
            }
        }
        let views = buffers
            .iter()
            .map(|(name, shape, bytes)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .map(|view| (name.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // transformers refuses safetensors files whose `format` is not a known framework.
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::serialize_to_file(views, Some(metadata), &dir.join(ADAPTER_WEIGHTS_FILE))?;
        Ok(())
    }

    /// Reads a PEFT LoRA adapter from `dir` for a model with configuration `model_config`,
    /// converting q/k `B` rows to GGUF order; tensors are cast to `dtype` on `device`.
    pub fn load_peft(
        dir: impl AsRef<Path>,
        model_config: &LlamaConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let peft: PeftConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join(ADAPTER_CONFIG_FILE))?)?;
        if peft.peft_type != "LORA" {
            return Err(LlamaError::Adapter(format!(
                "peft_type is {}, expected LORA",
                peft.peft_type
            )));
        }
        if peft.bias != "none" {
            return Err(LlamaError::Adapter(format!(
                "bias {} is not supported (only \"none\")",
                peft.bias
            )));
        }
        if peft.fan_in_fan_out {
            return Err(LlamaError::Adapter(
                "fan_in_fan_out adapters are not supported".to_string(),
            ));
        }
        if !peft.rank_pattern.is_empty() || !peft.alpha_pattern.is_empty() {
            return Err(LlamaError::Adapter(
                "per-module rank_pattern/alpha_pattern is not supported".to_string(),
            ));
        }
        if peft
            .layers_to_transform
            .as_ref()
            .is_some_and(|v| !v.is_null())
        {
            return Err(LlamaError::Adapter(
                "layers_to_transform is not supported".to_string(),
            ));
        }
        let serde_json::Value::Array(names) = &peft.target_modules else {
            return Err(LlamaError::Adapter(
                "target_modules must be a list of module names".to_string(),
            ));
        };
        let mut targets = Vec::new();
        for name in names {
            let module = name
                .as_str()
                .and_then(TargetModule::from_hf_name)
                .ok_or_else(|| LlamaError::Adapter(format!("unsupported target module {name}")))?;
            targets.push(module);
        }
        let alpha = peft
            .lora_alpha
            .as_f64()
            .ok_or_else(|| LlamaError::Adapter("lora_alpha is not a number".to_string()))?;
        let config = LoraConfig {
            rank: peft.r,
            alpha,
            dropout: peft.lora_dropout,
            targets: dedup_targets(&targets),
            seed: 0,
            use_rslora: peft.use_rslora,
        };
        config.validate()?;
        let tensors = candle_core::safetensors::load(dir.join(ADAPTER_WEIGHTS_FILE), device)?;
        let mut pairs = BTreeMap::new();
        for layer in 0..model_config.n_layer {
            for &module in &config.targets {
                let (input, out) = module.in_out(model_config);
                let fetch = |suffix: &str, dims: (usize, usize)| -> Result<Tensor> {
                    let key = peft_key(layer, module, suffix);
                    let t = tensors
                        .get(&key)
                        .ok_or_else(|| LlamaError::Adapter(format!("missing tensor {key}")))?;
                    if t.dims2()? != dims {
                        return Err(LlamaError::Adapter(format!(
                            "{key} has shape {:?}, expected {dims:?}",
                            t.dims()
                        )));
                    }
                    Ok(t.to_dtype(dtype)?)
                };
                let a = fetch("lora_A", (config.rank, input))?;
                let mut b = fetch("lora_B", (out, config.rank))?;
                if let Some(heads) = module.permuted_heads(model_config) {
                    b = hf_rows_to_gguf(&b, heads)?;
                }
                pairs.insert(
                    (layer, module),
                    LoraPair {
                        a: Var::from_tensor(&a)?,
                        b: Var::from_tensor(&b)?,
                    },
                );
            }
        }
        Ok(Self {
            config,
            model_config: model_config.clone(),
            pairs,
            training: false,
            dropout_rng: Mutex::new(ChaCha8Rng::seed_from_u64(0x5eed_d409)),
        })
    }
}

/// Reorders the rows of a q/k weight (or LoRA `B`, or bias) from Hugging Face order into
/// llama.cpp's interleaved-rope GGUF order: within each of `n_head` heads of size `d`, row
/// `s·d/2 + i` moves to `2i + s`. This is llama.cpp's `permute(w, n_head, n_head)`.
pub fn hf_rows_to_gguf(t: &Tensor, n_head: usize) -> Result<Tensor> {
    permute_rows(t, n_head, false)
}

/// The inverse of [`hf_rows_to_gguf`]: GGUF row `2i + s` of each head moves to `s·d/2 + i`.
pub fn gguf_rows_to_hf(t: &Tensor, n_head: usize) -> Result<Tensor> {
    permute_rows(t, n_head, true)
}

fn permute_rows(t: &Tensor, n_head: usize, to_hf: bool) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = *dims
        .first()
        .ok_or_else(|| LlamaError::InvalidInput("cannot permute a scalar".to_string()))?;
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) {
        return Err(LlamaError::InvalidInput(format!(
            "{rows} rows do not split into {n_head} heads of even size"
        )));
    }
    let half = rows / n_head / 2;
    let rest: usize = dims[1..].iter().product();
    // HF rows of one head are laid out as (2, half); GGUF rows as (half, 2). Swapping those two
    // axes converts one layout into the other.
    let from = if to_hf {
        (n_head, half, 2, rest)
    } else {
        (n_head, 2, half, rest)
    };
    let out = t
        .reshape(from)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?;
    Ok(out)
}

fn dedup_targets(targets: &[TargetModule]) -> Vec<TargetModule> {
    let mut v = targets.to_vec();
    v.sort();
    v.dedup();
    v
}

fn peft_key(layer: usize, module: TargetModule, suffix: &str) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.{suffix}.weight",
        module.hf_parent(),
        module.hf_name()
    )
}

fn alpha_json(alpha: f64) -> serde_json::Value {
    // PEFT writes lora_alpha as an integer; keep that form when the value allows it.
    if alpha.fract() == 0.0 && alpha.abs() < 1e15 {
        serde_json::Value::from(alpha as i64)
    } else {
        serde_json::Value::from(alpha)
    }
}

/// The subset of PEFT's `LoraConfig` JSON this crate reads and writes.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfig {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: serde_json::Value,
    #[serde(default)]
    lora_dropout: f64,
    target_modules: serde_json::Value,
    #[serde(default = "default_bias")]
    bias: String,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default = "default_true")]
    init_lora_weights: serde_json::Value,
    #[serde(default)]
    modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    layers_pattern: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    revision: Option<String>,
}

fn default_bias() -> String {
    "none".to_string()
}

fn default_true() -> serde_json::Value {
    serde_json::Value::Bool(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Architecture, RopeStyle};
    use crate::model::{Llama, apply_rope};
    use crate::test_support::{cpu, randomize_b, tiny_config};

    fn all_targets(seed: u64) -> LoraConfig {
        LoraConfig {
            rank: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: TargetModule::ALL.to_vec(),
            seed,
            use_rslora: false,
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn peft_initialisation_is_identity_and_bounded() {
        let c = tiny_config(Architecture::Llama);
        let model = Llama::random(c.clone(), 1, &cpu(), DType::F32).unwrap();
        let adapter = LoraAdapter::new(all_targets(7), &c, &cpu(), DType::F32).unwrap();
        assert_eq!(adapter.vars().len(), 2 * 7 * c.n_layer);
        for (&(_, module), pair) in adapter.pairs() {
            let (input, _) = module.in_out(&c);
            let bound = 1.0 / (input as f32).sqrt();
            let a = pair
                .a
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(a.iter().all(|v| v.abs() <= bound));
            assert!(a.iter().any(|v| v.abs() > bound / 2.0));
            let b = pair.b.as_tensor().abs().unwrap().max_all().unwrap();
            assert_eq!(b.to_scalar::<f32>().unwrap(), 0.0);
        }
        let ids = Tensor::new(&[[3u32, 1, 4, 1, 5]], &cpu()).unwrap();
        let base = model.forward(&ids, None, None).unwrap();
        let with = model.forward(&ids, None, Some(&adapter)).unwrap();
        assert_eq!(max_diff(&base, &with), 0.0);
        // The same seed gives the same adapter.
        let again = LoraAdapter::new(all_targets(7), &c, &cpu(), DType::F32).unwrap();
        for (x, y) in adapter.vars().iter().zip(again.vars()) {
            assert_eq!(max_diff(x.as_tensor(), y.as_tensor()), 0.0);
        }
    }

    #[test]
    fn permutation_matches_llama_cpp_index_formula() {
        // Two heads of size 4: HF rows per head are [x0, x1 | y0, y1] (first half, second half);
        // GGUF interleaves them as [x0, y0, x1, y1].
        let hf = Tensor::arange(0f32, 8.0, &cpu())
            .unwrap()
            .reshape((8, 1))
            .unwrap();
        let gguf = hf_rows_to_gguf(&hf, 2).unwrap().flatten_all().unwrap();
        assert_eq!(
            gguf.to_vec1::<f32>().unwrap(),
            [0., 2., 1., 3., 4., 6., 5., 7.]
        );
        let back = gguf_rows_to_hf(&gguf.reshape((8, 1)).unwrap(), 2).unwrap();
        assert_eq!(max_diff(&back, &hf), 0.0);
        // Works for 1-D biases and for wide matrices alike.
        let w = Tensor::randn(0f32, 1.0, (12, 5), &cpu()).unwrap();
        let round = gguf_rows_to_hf(&hf_rows_to_gguf(&w, 3).unwrap(), 3).unwrap();
        assert_eq!(max_diff(&round, &w), 0.0);
        assert!(hf_rows_to_gguf(&w, 5).is_err());
    }

    #[test]
    fn interleaved_rope_on_gguf_rows_equals_half_rope_on_hf_rows() {
        // This is why the converter permutes: rope_i(P·q) = P·rope_half(q). If the permutation
        // (or its direction) were wrong, an HF-order adapter would be applied to the wrong rows.
        let (heads, d, t) = (3, 8, 5);
        let w_hf = Tensor::randn(0f32, 1.0, (heads * d, 16), &cpu()).unwrap();
        let w_gguf = hf_rows_to_gguf(&w_hf, heads).unwrap();
        let x = Tensor::randn(0f32, 1.0, (t, 16), &cpu()).unwrap();
        let angles = Tensor::randn(0f32, 2.0, (1, 1, t, d / 2), &cpu()).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let to_heads = |y: Tensor| {
            y.reshape((1, t, heads, d))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let q_hf = to_heads(x.matmul(&w_hf.t().unwrap()).unwrap());
        let q_gguf = to_heads(x.matmul(&w_gguf.t().unwrap()).unwrap());
        let r_hf = apply_rope(&q_hf, &cos, &sin, RopeStyle::Half).unwrap();
        let r_gguf = apply_rope(&q_gguf, &cos, &sin, RopeStyle::Interleaved).unwrap();
        // Bring the interleaved result back to HF order, per head, along the feature axis.
        let back = r_gguf
            .transpose(1, 2)
            .unwrap()
            .reshape((t, heads * d))
            .unwrap()
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        let back = gguf_rows_to_hf(&back, heads).unwrap().t().unwrap();
        let want = r_hf
            .transpose(1, 2)
            .unwrap()
            .reshape((t, heads * d))
            .unwrap();
        assert!(max_diff(&back.contiguous().unwrap(), &want) < 1e-5);
    }

    #[test]
    fn peft_round_trip_and_hf_orientation() {
        let c = tiny_config(Architecture::Llama);
        let adapter = LoraAdapter::new(all_targets(3), &c, &cpu(), DType::F32).unwrap();
        randomize_b(&adapter, 11);
        let dir = tempfile::tempdir().unwrap();
        adapter
            .save_peft(dir.path(), "HuggingFaceTB/SmolLM2-135M-Instruct")
            .unwrap();

        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG_FILE)).unwrap(),
        )
        .unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["r"], 4);
        assert_eq!(json["lora_alpha"], 8);
        assert_eq!(json["bias"], "none");
        assert_eq!(
            json["base_model_name_or_path"],
            "HuggingFaceTB/SmolLM2-135M-Instruct"
        );
        assert_eq!(
            json["target_modules"],
            serde_json::json!([
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj"
            ])
        );

        let raw =
            candle_core::safetensors::load(dir.path().join(ADAPTER_WEIGHTS_FILE), &cpu()).unwrap();
        assert_eq!(raw.len(), 2 * 7 * c.n_layer);
        let a_key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
        let b_key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
        assert_eq!(raw[a_key].dims(), &[4, c.hidden_size]);
        assert_eq!(raw[b_key].dims(), &[c.q_dim(), 4]);
        let mlp = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight";
        assert_eq!(raw[mlp].dims(), &[c.hidden_size, 4]);

        // The HF-order delta is the GGUF-order delta with its rows un-permuted, for q (n_head)
        // and k (n_kv_head); v and the MLP are stored as they are.
        for (module, heads) in [
            (TargetModule::QProj, Some(c.n_head)),
            (TargetModule::KProj, Some(c.n_kv_head)),
            (TargetModule::VProj, None),
            (TargetModule::UpProj, None),
        ] {
            let key = |s: &str| peft_key(1, module, s);
            let delta_hf = (raw[&key("lora_B")].matmul(&raw[&key("lora_A")]).unwrap()
                * adapter.scale())
            .unwrap();
            let delta_gguf = adapter.delta(1, module).unwrap().unwrap();
            let expect = match heads {
                Some(h) => gguf_rows_to_hf(&delta_gguf, h).unwrap(),
                None => delta_gguf.clone(),
            };
            assert!(max_diff(&delta_hf, &expect) < 1e-6, "{module:?}");
            if heads.is_some() {
                assert!(
                    max_diff(&delta_hf, &delta_gguf) > 1e-3,
                    "{module:?} was not permuted"
                );
            }
        }

        let loaded = LoraAdapter::load_peft(dir.path(), &c, &cpu(), DType::F32).unwrap();
        assert_eq!(loaded.config().rank, 4);
        assert_eq!(loaded.config().alpha, 8.0);
        assert_eq!(loaded.config().targets, TargetModule::ALL.to_vec());
        for (x, y) in adapter.vars().iter().zip(loaded.vars()) {
            assert_eq!(max_diff(x.as_tensor(), y.as_tensor()), 0.0);
        }
    }

    #[test]
    fn qwen2_adapters_are_not_permuted() {
        let c = tiny_config(Architecture::Qwen2);
        let adapter = LoraAdapter::new(all_targets(5), &c, &cpu(), DType::F32).unwrap();
        randomize_b(&adapter, 2);
        let dir = tempfile::tempdir().unwrap();
        adapter
            .save_peft(dir.path(), "Qwen/Qwen2.5-0.5B-Instruct")
            .unwrap();
        let raw =
            candle_core::safetensors::load(dir.path().join(ADAPTER_WEIGHTS_FILE), &cpu()).unwrap();
        let b = &raw[&peft_key(0, TargetModule::QProj, "lora_B")];
        let ours = adapter.pair(0, TargetModule::QProj).unwrap().b.as_tensor();
        assert_eq!(max_diff(b, ours), 0.0);
    }

    #[test]
    fn malformed_adapters_are_rejected() {
        let c = tiny_config(Architecture::Llama);
        let adapter = LoraAdapter::new(all_targets(3), &c, &cpu(), DType::F32).unwrap();
        let dir = tempfile::tempdir().unwrap();
        adapter.save_peft(dir.path(), "x").unwrap();
        let mut other = c.clone();
        other.hidden_size = 32;
        other.head_dim = 8;
        assert!(matches!(
            LoraAdapter::load_peft(dir.path(), &other, &cpu(), DType::F32),
            Err(LlamaError::Adapter(_))
        ));
        let path = dir.path().join(ADAPTER_CONFIG_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"q_proj\"", "\"lm_head\"")).unwrap();
        assert!(matches!(
            LoraAdapter::load_peft(dir.path(), &c, &cpu(), DType::F32),
            Err(LlamaError::Adapter(_))
        ));
    }

    #[test]
    fn dropout_is_seeded_and_only_active_in_training() {
        let c = tiny_config(Architecture::Llama);
        let cfg = LoraConfig {
            dropout: 0.5,
            ..all_targets(9)
        };
        let model = Llama::random(c.clone(), 1, &cpu(), DType::F32).unwrap();
        let ids = Tensor::new(&[[3u32, 1, 4, 1, 5]], &cpu()).unwrap();
        let run = |training: bool| {
            let mut a = LoraAdapter::new(cfg.clone(), &c, &cpu(), DType::F32).unwrap();
            randomize_b(&a, 4);
            a.set_training(training);
            let x = model.forward(&ids, None, Some(&a)).unwrap();
            let y = model.forward(&ids, None, Some(&a)).unwrap();
            (x, y)
        };
        let (e1, e2) = run(false);
        assert_eq!(max_diff(&e1, &e2), 0.0);
        let (t1, t2) = run(true);
        assert!(
            max_diff(&t1, &t2) > 1e-4,
            "successive dropout masks must differ"
        );
        let (u1, _) = run(true);
        assert_eq!(
            max_diff(&t1, &u1),
            0.0,
            "the same seed must give the same masks"
        );
        assert!(max_diff(&t1, &e1) > 1e-4);
    }
}
