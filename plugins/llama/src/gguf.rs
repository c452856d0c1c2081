//! Reading llama-family GGUF files: the model configuration from metadata and dense weights.
//!
//! The trainer needs gradients, and candle's quantized matmul has no backward, so every weight is
//! dequantized here into an ordinary tensor (f32 by default; bf16 or f16 are options meant for
//! CUDA). The same code path serves `llama` and `qwen2` files; they differ in the rope layout
//! (see [`RopeStyle`]) and in qwen2's q/k/v biases, which are loaded when present.
//!
//! Tensor names follow llama.cpp: `token_embd.weight`, `blk.{i}.attn_q.weight`, …,
//! `output_norm.weight`, `output.weight`. A file without `output.weight` ties the output
//! projection to the token embedding, as SmolLM2 and the small Qwen2.5 models do.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek};
use std::path::{Path, PathBuf};

use candle_core::quantized::QTensor;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{LlamaError, Result};

/// The model families this trainer has a forward pass for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama and its relatives (SmolLM2, Mistral-style dense models) as llama.cpp converts them.
    Llama,
    /// Qwen2 and Qwen2.5: llama's structure plus q/k/v biases and half-split rope.
    Qwen2,
}

impl Architecture {
    /// Parses the value of `general.architecture`.
    pub fn from_gguf_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            other => Err(LlamaError::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The name used as the metadata key prefix (`llama.block_count`, …).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }

    /// How rotary embeddings pair up the dimensions of a head in this family's GGUF layout.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Self::Llama => RopeStyle::Interleaved,
            Self::Qwen2 => RopeStyle::Half,
        }
    }

    /// Whether llama.cpp's converter permuted the rows of `attn_q`/`attn_k` away from the Hugging
    /// Face order. It does so for llama so that an interleaved rope kernel can be used; qwen2 is
    /// stored in Hugging Face order and uses the half-split (NeoX) rope instead.
    pub fn qk_rows_permuted(self) -> bool {
        matches!(self, Self::Llama)
    }
}

/// Which dimensions of a head a rotary embedding rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)` rotate together (GGML's "normal" rope; llama GGUF files).
    Interleaved,
    /// Pairs `(i, i + d/2)` rotate together (GGML's NeoX rope; Hugging Face llama and qwen2).
    Half,
}

/// The hyper-parameters of a llama-family decoder, as read from GGUF metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The model family.
    pub architecture: Architecture,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Number of query heads.
    pub n_head: usize,
    /// Number of key/value heads (grouped-query attention when below `n_head`).
    pub n_kv_head: usize,
    /// Dimension of one attention head.
    pub head_dim: usize,
    /// Inner width of the SiLU-gated MLP.
    pub ffn_hidden: usize,
    /// Vocabulary size (rows of the token embedding).
    pub vocab_size: usize,
    /// Epsilon of every RMS norm.
    pub rms_eps: f64,
    /// Base of the rotary embedding frequencies.
    pub rope_theta: f64,
}

impl LlamaConfig {
    /// Checks that the sizes fit together (heads divide evenly, head dimension is even).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("n_layer", self.n_layer),
            ("hidden_size", self.hidden_size),
            ("n_head", self.n_head),
            ("n_kv_head", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("ffn_hidden", self.ffn_hidden),
            ("vocab_size", self.vocab_size),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(LlamaError::Config(format!("{name} must be positive")));
            }
        }
        if !self.n_head.is_multiple_of(self.n_kv_head) {
            return Err(LlamaError::Config(format!(
                "n_head {} is not a multiple of n_kv_head {}",
                self.n_head, self.n_kv_head
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(LlamaError::Config(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim
            )));
        }
        if !(self.rms_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(LlamaError::Config(
                "rms_eps and rope_theta must be positive".to_string(),
            ));
        }
        Ok(())
    }

    /// Output width of the query projection (`n_head * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Output width of the key and value projections (`n_kv_head * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// A dense linear layer in `nn.Linear` orientation: `weight` is `(out_features, in_features)`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The weight, `(out, in)`.
    pub weight: Tensor,
    /// The optional bias, `(out,)`.
    pub bias: Option<Tensor>,
}

/// The dense weights of one transformer block, in GGUF layout.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// RMS norm before attention, `(hidden,)`.
    pub attn_norm: Tensor,
    /// Query projection (`attn_q`).
    pub q: Linear,
    /// Key projection (`attn_k`).
    pub k: Linear,
    /// Value projection (`attn_v`).
    pub v: Linear,
    /// Attention output projection (`attn_output`).
    pub o: Linear,
    /// RMS norm before the MLP, `(hidden,)`.
    pub ffn_norm: Tensor,
    /// MLP gate projection (`ffn_gate`).
    pub gate: Linear,
    /// MLP up projection (`ffn_up`).
    pub up: Linear,
    /// MLP down projection (`ffn_down`).
    pub down: Linear,
}

/// All dense weights of a llama-family model, in GGUF layout.
#[derive(Debug, Clone)]
pub struct LlamaWeights {
    /// Token embedding, `(vocab, hidden)`.
    pub token_embd: Tensor,
    /// The transformer blocks.
    pub layers: Vec<LayerWeights>,
    /// Final RMS norm, `(hidden,)`.
    pub output_norm: Tensor,
    /// Output projection, `(vocab, hidden)`; the same tensor as `token_embd` when tied.
    pub output: Tensor,
    /// Whether the file had no `output.weight` and the embedding is reused.
    pub tied_embeddings: bool,
}

/// An opened GGUF file: its parsed header and a reader for tensor data.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .field("metadata_keys", &self.content.metadata.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens and parses the header of a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.is_file() {
            return Err(LlamaError::ModelNotFound { path });
        }
        let mut reader = BufReader::new(File::open(&path)?);
        // Check the magic ourselves first: candle's message for a foreign file is terse, and a
        // file shorter than four bytes would otherwise surface as a bare I/O error.
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(LlamaError::NotGguf {
                path,
                reason: "the file does not start with the GGUF magic".to_string(),
            });
        }
        reader.rewind()?;
        let content = Content::read(&mut reader).map_err(|e| LlamaError::NotGguf {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            path,
            content,
            reader,
        })
    }

    /// The path this file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header (metadata and tensor directory).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// All metadata key/value pairs.
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    /// Tensor names in the order their data appears in the file.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<(&String, u64)> = self
            .content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name, info.offset))
            .collect();
        names.sort_by_key(|(_, offset)| *offset);
        names.into_iter().map(|(name, _)| name.clone()).collect()
    }

    /// Whether a tensor of this name exists.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// Reads one tensor in its stored (possibly quantized) encoding, on the CPU.
    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(LlamaError::MissingTensor(name.to_string()));
        }
        Ok(self.content.tensor(&mut self.reader, name, &Device::Cpu)?)
    }

    /// Reads one tensor and dequantizes it to `dtype` on `device`.
    pub fn dense(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        let q = self.qtensor(name)?;
        // Dequantizing on the CPU keeps this independent of which quantized kernels a GPU
        // backend has; the result is copied to the device once.
        let t = q.dequantize(&Device::Cpu)?.to_dtype(dtype)?;
        Ok(t.to_device(device)?)
    }

    /// The declared architecture (`general.architecture`).
    pub fn architecture(&self) -> Result<Architecture> {
        let key = "general.architecture";
        match self.content.metadata.get(key) {
            Some(Value::String(name)) => Architecture::from_gguf_name(name),
            Some(_) => Err(bad_metadata(key, "not a string")),
            None => Err(bad_metadata(key, "absent")),
        }
    }

    /// Reads the model configuration from metadata and the embedding's shape.
    pub fn config(&self) -> Result<LlamaConfig> {
        let architecture = self.architecture()?;
        let arch = architecture.gguf_name();
        let key = |suffix: &str| format!("{arch}.{suffix}");
        let n_layer = self.meta_usize(&key("block_count"))?;
        let hidden_size = self.meta_usize(&key("embedding_length"))?;
        let n_head = self.meta_usize(&key("attention.head_count"))?;
        let n_kv_head = self.meta_usize(&key("attention.head_count_kv"))?;
        let ffn_hidden = self.meta_usize(&key("feed_forward_length"))?;
        let rms_eps = self.meta_f64(&key("attention.layer_norm_rms_epsilon"))?;
        // llama.cpp's default base frequency applies when a converter left the key out.
        let rope_theta = match self.content.metadata.get(&key("rope.freq_base")) {
            Some(_) => self.meta_f64(&key("rope.freq_base"))?,
            None => 10_000.0,
        };
        if n_head == 0 {
            return Err(bad_metadata(&key("attention.head_count"), "zero heads"));
        }
        let head_dim = match self.content.metadata.get(&key("attention.key_length")) {
            Some(_) => self.meta_usize(&key("attention.key_length"))?,
            None => hidden_size / n_head,
        };
        if let Some(rope_dims) = self.content.metadata.get(&key("rope.dimension_count")) {
            let rope_dims = value_usize(rope_dims)
                .ok_or_else(|| bad_metadata(&key("rope.dimension_count"), "not an integer"))?;
            // A partial rotary embedding would need a different forward pass; refuse it
            // rather than silently computing something else.
            if rope_dims != head_dim {
                return Err(bad_metadata(
                    &key("rope.dimension_count"),
                    &format!("partial rope ({rope_dims} of {head_dim} dims) is not supported"),
                ));
            }
        }
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| LlamaError::MissingTensor("token_embd.weight".to_string()))?;
        let (vocab_size, embd_width) = embd.shape.dims2()?;
        if embd_width != hidden_size {
            return Err(bad_metadata(
                &key("embedding_length"),
                &format!("{hidden_size} disagrees with token_embd width {embd_width}"),
            ));
        }
        let config = LlamaConfig {
            architecture,
            n_layer,
            hidden_size,
            n_head,
            n_kv_head,
            head_dim,
            ffn_hidden,
            vocab_size,
            rms_eps,
            rope_theta,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads and dequantizes every weight the forward pass needs.
    pub fn load_weights(
        &mut self,
        config: &LlamaConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<LlamaWeights> {
        let token_embd = self.dense("token_embd.weight", device, dtype)?;
        let output_norm = self.dense("output_norm.weight", device, dtype)?;
        let tied_embeddings = !self.has_tensor("output.weight");
        let output = if tied_embeddings {
            token_embd.clone()
        } else {
            self.dense("output.weight", device, dtype)?
        };
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut linear = |name: &str| -> Result<Linear> {
                let weight = self.dense(&format!("blk.{i}.{name}.weight"), device, dtype)?;
                let bias_name = format!("blk.{i}.{name}.bias");
                let bias = if self.has_tensor(&bias_name) {
                    Some(self.dense(&bias_name, device, dtype)?)
                } else {
                    None
                };
                Ok(Linear { weight, bias })
            };
            let q = linear("attn_q")?;
            let k = linear("attn_k")?;
            let v = linear("attn_v")?;
            let o = linear("attn_output")?;
            let gate = linear("ffn_gate")?;
            let up = linear("ffn_up")?;
            let down = linear("ffn_down")?;
            layers.push(LayerWeights {
                attn_norm: self.dense(&format!("blk.{i}.attn_norm.weight"), device, dtype)?,
                q,
                k,
                v,
                o,
                ffn_norm: self.dense(&format!("blk.{i}.ffn_norm.weight"), device, dtype)?,
                gate,
                up,
                down,
            });
        }
        Ok(LlamaWeights {
            token_embd,
            layers,
            output_norm,
            output,
            tied_embeddings,
        })
    }

    fn meta_usize(&self, key: &str) -> Result<usize> {
        let value = self
            .content
            .metadata
            .get(key)
            .ok_or_else(|| bad_metadata(key, "absent"))?;
        value_usize(value).ok_or_else(|| bad_metadata(key, "not a non-negative integer"))
    }

    fn meta_f64(&self, key: &str) -> Result<f64> {
        match self.content.metadata.get(key) {
            Some(Value::F32(v)) => Ok(f64::from(*v)),
            Some(Value::F64(v)) => Ok(*v),
            Some(_) => Err(bad_metadata(key, "not a float")),
            None => Err(bad_metadata(key, "absent")),
        }
    }
}

/// Reads a GGUF file's configuration and dense weights in one call.
pub fn load_llama(
    path: impl AsRef<Path>,
    device: &Device,
    dtype: DType,
) -> Result<(LlamaConfig, LlamaWeights)> {
    let mut file = GgufFile::open(path)?;
    let config = file.config()?;
    let weights = file.load_weights(&config, device, dtype)?;
    Ok((config, weights))
}

fn value_usize(value: &Value) -> Option<usize> {
    let v: u64 = match value {
        Value::U8(v) => u64::from(*v),
        Value::U16(v) => u64::from(*v),
        Value::U32(v) => u64::from(*v),
        Value::U64(v) => *v,
        Value::I8(v) => u64::try_from(*v).ok()?,
        Value::I16(v) => u64::try_from(*v).ok()?,
        Value::I32(v) => u64::try_from(*v).ok()?,
        Value::I64(v) => u64::try_from(*v).ok()?,
        _ => return None,
    };
    usize::try_from(v).ok()
}

fn bad_metadata(key: &str, reason: &str) -> LlamaError {
    LlamaError::BadMetadata {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// The SHA-256 of a file's content as lowercase hex, read in 1 MiB blocks: the identity the
/// servers record for a model file, and the check of a downloaded one.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Llama;
    use crate::test_support::{cpu, real_model_path, tiny_config, write_gguf, write_gguf_with};
    use candle_core::quantized::GgmlDType;

    #[test]
    fn reads_the_default_models_config() {
        let path = real_model_path();
        let mut f = GgufFile::open(&path).unwrap();
        let c = f.config().unwrap();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(
            (
                c.n_layer,
                c.hidden_size,
                c.n_head,
                c.n_kv_head,
                c.head_dim,
                c.ffn_hidden
            ),
            (30, 576, 9, 3, 64, 1536)
        );
        assert_eq!(c.vocab_size, 49152);
        assert!((c.rms_eps - 1e-5).abs() < 1e-9);
        assert_eq!(c.rope_theta, 100_000.0);
        assert!(!f.has_tensor("output.weight"));
        let norm = f.dense("output_norm.weight", &cpu(), DType::F32).unwrap();
        assert_eq!(norm.dims(), &[576]);
        assert_eq!(f.tensor_names().len(), 272);
    }

    #[test]
    fn round_trips_a_tiny_model_and_its_qwen2_biases() {
        let dir = tempfile::tempdir().unwrap();
        for arch in [Architecture::Llama, Architecture::Qwen2] {
            let c = tiny_config(arch);
            let mut model = Llama::random(c.clone(), 4, &cpu(), DType::F32).unwrap();
            if arch == Architecture::Qwen2 {
                // Give q/k/v biases, as Qwen2 files have.
                let mut w = model.weights().clone();
                for l in &mut w.layers {
                    for lin in [&mut l.q, &mut l.k, &mut l.v] {
                        let out = lin.weight.dim(0).unwrap();
                        lin.bias = Some(Tensor::randn(0f32, 0.1, out, &cpu()).unwrap());
                    }
                }
                model = Llama::new(c.clone(), w).unwrap();
            }
            let path = dir.path().join(format!("{arch:?}.gguf"));
            write_gguf(&model, GgmlDType::F32, &path);
            let (config, weights) = load_llama(&path, &cpu(), DType::F32).unwrap();
            assert_eq!(config, c);
            assert!(weights.tied_embeddings);
            let q = &weights.layers[1].q;
            let diff = (&q.weight - &model.weights().layers[1].q.weight)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0);
            assert_eq!(q.bias.is_some(), arch == Architecture::Qwen2);
            // Half precision is an option for accelerators; candle's CPU matmul has f16 but no
            // bf16, so the forward is exercised in f16 here.
            let bf16 = load_llama(&path, &cpu(), DType::BF16).unwrap().1;
            assert_eq!(bf16.layers[0].q.weight.dtype(), DType::BF16);
            let half = Llama::load(&path, &cpu(), DType::F16).unwrap();
            let ids = Tensor::new(&[[1u32, 2, 3]], &cpu()).unwrap();
            let lp = half.token_logprobs(&ids, None, None).unwrap().logprobs;
            assert_eq!(lp.dtype(), DType::F32);
        }
    }

    #[test]
    fn clear_errors_for_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.gguf");
        let err = GgufFile::open(&missing).unwrap_err();
        assert!(matches!(err, LlamaError::ModelNotFound { .. }));
        assert!(err.to_string().contains("nope.gguf"));

        let junk = dir.path().join("junk.gguf");
        std::fs::write(&junk, b"this is not a model").unwrap();
        assert!(matches!(
            GgufFile::open(&junk).unwrap_err(),
            LlamaError::NotGguf { .. }
        ));
        let truncated = dir.path().join("truncated.gguf");
        std::fs::write(&truncated, b"GGUF\x03\x00\x00\x00\x05").unwrap();
        assert!(matches!(
            GgufFile::open(&truncated).unwrap_err(),
            LlamaError::NotGguf { .. }
        ));

        let model = Llama::random(tiny_config(Architecture::Llama), 1, &cpu(), DType::F32).unwrap();
        let gpt2 = dir.path().join("gpt2.gguf");
        write_gguf_with(&model, GgmlDType::F32, &gpt2, &[], Some("gpt2"));
        let err = load_llama(&gpt2, &cpu(), DType::F32).unwrap_err();
        assert!(matches!(err, LlamaError::UnsupportedArchitecture(ref a) if a == "gpt2"));

        let holes = dir.path().join("holes.gguf");
        write_gguf_with(
            &model,
            GgmlDType::F32,
            &holes,
            &["blk.1.ffn_down.weight"],
            None,
        );
        let err = load_llama(&holes, &cpu(), DType::F32).unwrap_err();
        assert!(matches!(err, LlamaError::MissingTensor(ref n) if n == "blk.1.ffn_down.weight"));
    }
}
