//! Serving-time forward passes: many sequences at once, each with its own cache of keys and
//! values, so a step decodes every running sequence's next token in one pass and a new prompt is
//! prefilled in the same pass, after whatever prefix of it is already cached.
//!
//! The weights are those of [`crate::gguf`], dense f32 or quantized ([`WeightsEncoding`]), in
//! GGUF layout: llama's q/k rows are permuted for the interleaved rope, as in the trainer.
//!
//! A step is a flat [`TokenBatch`]: every token names its sequence's cache slot and position.
//! Projections and the MLP run on all of them together; attention runs per token over its own
//! sequence's keys up to its position, so the tokens of a prompt attend causally to each other
//! and to the cached prefix. Two caches implement that:
//!
//! - [`KvCache::host`] (the CPU): each slot's keys and values are growable host vectors, and a
//!   parallel kernel reads exactly the keys each query sees: no padding, no copies.
//! - [`KvCache::device`] (a GPU; also runnable on the CPU, which is how it is tested): every slot
//!   is a fixed-size region of one tensor per layer; a step writes its rows with one scatter and
//!   attends with batched tensor ops, decode tokens of all slots together over a padded, masked
//!   gather, prompt segments each over their slot.

use std::{path::Path, sync::Arc};

use candle_core::{
    DType, Device, Module, Tensor,
    quantized::{GgmlDType, QMatMul, QStorage, QTensor},
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use wide::f32x8;

use crate::{
    error::{LlamaError, Result},
    few_rows::{BlockRows, FEW_ROWS, FewRowsTimesWeight, dot},
    fused::axpy,
    gguf::{GgufFile, LlamaConfig, RopeStyle},
};

/// How the weights are encoded in memory while serving.
///
/// candle 0.10 has SIMD dot products for Q4_0, Q8_0 and the K-quants but not for Q4_1 (the
/// default model's encoding), so re-encoding can be several times faster. The candle engine
/// re-encodes in memory at load; mistral.rs loads a re-encoded copy written once to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightsEncoding {
    /// The file as it is.
    #[default]
    Original,
    /// Every quantized matrix re-encoded to Q8_0 (8-bit, one scale per 32 values): nearly
    /// lossless from a 4-bit source, and fast.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// Every quantized matrix re-encoded to Q4_0 (4-bit, one scale per 32 values): smallest and
    /// fast, but a second rounding of a 4-bit source.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// Every matrix dequantized to f32: exactly the weights the trainer computes with, at four
    /// bytes per parameter.
    #[serde(rename = "f32")]
    F32,
}

impl WeightsEncoding {
    /// The name used in configs, file names and model ids.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::F32 => "f32",
        }
    }
}

impl std::fmt::Display for WeightsEncoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WeightsEncoding {
    type Err = LlamaError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "original" => Ok(Self::Original),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "f32" => Ok(Self::F32),
            other => Err(LlamaError::Config(format!(
                "unknown weights encoding {other:?}; expected original, q8_0, q4_0 or f32"
            ))),
        }
    }
}

impl WeightsEncoding {
    /// The GGML type matrices are re-encoded to (`None`: as stored; F32: dense).
    pub fn reencoded_type(self) -> Option<GgmlDType> {
        match self {
            Self::Original => None,
            Self::Q8_0 => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::F32 => Some(GgmlDType::F32),
        }
    }
}

/// One linear layer, `x @ W^T + b`.
#[derive(Debug)]
enum Projection {
    /// Dense weights `(out, in)`, and on the CPU the file's own blocks of the same values
    /// when it stores them in an encoding [`BlockRows`] reads: a decoding step reads those,
    /// a fraction of the bytes, and gets the same products up to the order of summation.
    Dense {
        weight: Tensor,
        blocks: Option<BlockRows>,
        bias: Option<Tensor>,
    },
    /// Quantized weights, multiplied by candle's quantized kernels.
    Quantized {
        weight: QMatMul,
        bias: Option<Tensor>,
    },
}

impl Projection {
    /// `x: (n, in)` to `(n, out)`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = match self {
            Projection::Dense {
                weight,
                blocks,
                bias,
            } if x.device().is_cpu() && x.dim(0)? <= FEW_ROWS => match blocks {
                Some(blocks) => (blocks.few_rows_times(x)?, bias),
                None => (x.apply_op2_no_bwd(weight, &FewRowsTimesWeight)?, bias),
            },
            Projection::Dense { weight, bias, .. } => (x.matmul(&weight.t()?)?, bias),
            Projection::Quantized { weight, bias } => (weight.forward(x)?, bias),
        };
        Ok(match bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Projections of one input: computed as one product, whose output columns are the parts'
/// side by side, when the weights are dense (one parallel pass over the joined matrix costs
/// less than one per part: a decoding step's small products are dominated by starting them);
/// one product per part in quantized encodings, whose matrices candle cannot join.
#[derive(Debug)]
enum SameInput {
    Joined {
        projection: Projection,
        widths: Vec<usize>,
    },
    Separate(Vec<Projection>),
}

impl SameInput {
    /// Each part's `(n, out)` output, in order.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            SameInput::Joined { projection, widths } => {
                let y = projection.forward(x)?;
                let mut start = 0;
                widths
                    .iter()
                    .map(|&width| {
                        let part = y.narrow(1, start, width)?.contiguous()?;
                        start += width;
                        Ok(part)
                    })
                    .collect()
            }
            SameInput::Separate(parts) => parts.iter().map(|p| p.forward(x)).collect(),
        }
    }
}

#[derive(Debug)]
struct ServingLayer {
    attn_norm: Tensor,
    /// Queries, keys and values.
    qkv: SameInput,
    o: Projection,
    ffn_norm: Tensor,
    /// The MLP's gate and up projections.
    gate_up: SameInput,
    down: Projection,
}

/// A llama-family model loaded for serving.
#[derive(Debug)]
pub struct ServingModel {
    config: LlamaConfig,
    encoding: WeightsEncoding,
    device: Device,
    embed: Tensor,
    layers: Vec<ServingLayer>,
    output_norm: Tensor,
    head: Projection,
    inv_freq: Vec<f32>,
}

/// Reads tensors of a GGUF file into the requested encoding on the serving device.
struct Loader<'a> {
    file: GgufFile,
    device: &'a Device,
    encoding: WeightsEncoding,
}

impl Loader<'_> {
    /// A dense f32 tensor (norms, biases, the embedding table).
    fn dense(&mut self, name: &str) -> Result<Tensor> {
        self.file.dense(name, self.device, DType::F32)
    }

    /// Weight matrices that multiply the same input, as [`SameInput`]: joined when the serving
    /// encoding is dense f32.
    fn same_input(&mut self, parts: &[(String, Option<String>)]) -> Result<SameInput> {
        if self.encoding != WeightsEncoding::F32 {
            return parts
                .iter()
                .map(|(name, bias)| self.projection(name, bias.as_deref()))
                .collect::<Result<_>>()
                .map(SameInput::Separate);
        }
        let mut weights = Vec::with_capacity(parts.len());
        let mut blocks = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for (name, bias) in parts {
            let (weight, part_blocks) = self.dense_weight(name)?;
            weights.push(weight);
            blocks.push(part_blocks);
            biases.push(self.bias(bias.as_deref())?);
        }
        let widths = weights
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        // A part without a bias adds zeros, so that one bias covers the joined output.
        let bias = if biases.iter().any(Option::is_some) {
            let filled = biases
                .into_iter()
                .zip(&widths)
                .map(|(b, &width)| match b {
                    Some(b) => Ok(b),
                    None => Tensor::zeros(width, DType::F32, self.device),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&filled, 0)?)
        } else {
            None
        };
        let blocks = blocks
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .and_then(BlockRows::joined);
        Ok(SameInput::Joined {
            projection: Projection::Dense {
                weight: Tensor::cat(&weights, 0)?,
                blocks,
                bias,
            },
            widths,
        })
    }

    /// The bias `name` names, when the file has it.
    fn bias(&mut self, name: Option<&str>) -> Result<Option<Tensor>> {
        match name {
            Some(b) if self.file.has_tensor(b) => Ok(Some(self.dense(b)?)),
            _ => Ok(None),
        }
    }

    /// Matrix `name` dequantized to f32 on the serving device, and on the CPU its
    /// [`BlockRows`] for decoding steps when the file stores it in blocks they read.
    fn dense_weight(&mut self, name: &str) -> Result<(Tensor, Option<BlockRows>)> {
        let stored = self.file.qtensor(name)?;
        let weight = stored.dequantize(&Device::Cpu)?.to_device(self.device)?;
        let blocks = match self.device {
            Device::Cpu => BlockRows::of(&stored)?,
            _ => None,
        };
        Ok((weight, blocks))
    }

    /// A weight matrix as a projection in the serving encoding.
    fn projection(&mut self, name: &str, bias: Option<&str>) -> Result<Projection> {
        let bias = self.bias(bias)?;
        if self.encoding == WeightsEncoding::F32 {
            let (weight, blocks) = self.dense_weight(name)?;
            return Ok(Projection::Dense {
                weight,
                blocks,
                bias,
            });
        }
        let stored = self.file.qtensor(name)?;
        let quantized = match self.encoding.reencoded_type() {
            Some(target) if stored.dtype() != target => {
                let dense = stored.dequantize(&Device::Cpu)?;
                QTensor::quantize_onto(&dense, target, self.device)?
            }
            // Stored as wanted: the bytes move to the device unchanged.
            _ => {
                let storage = QStorage::from_data(stored.data()?, self.device, stored.dtype())?;
                QTensor::new(storage, stored.shape().clone())?
            }
        };
        Ok(Projection::Quantized {
            weight: QMatMul::from_qtensor(quantized)?,
            bias,
        })
    }
}

impl ServingModel {
    /// Loads the GGUF file at `path` onto `device` with its matrices in `encoding` (norms,
    /// biases and the embedding table are always dense f32).
    pub fn load(path: &Path, device: &Device, encoding: WeightsEncoding) -> Result<Self> {
        let file = GgufFile::open(path)?;
        let config = file.config()?;
        let mut loader = Loader {
            file,
            device,
            encoding,
        };
        let embed = loader.dense("token_embd.weight")?;
        let head_name = if loader.file.has_tensor("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        let head = loader.projection(head_name, None)?;
        let output_norm = loader.dense("output_norm.weight")?;
        let mut layers = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let name = |stem: &str| format!("blk.{i}.{stem}.weight");
            let bias = |stem: &str| format!("blk.{i}.{stem}.bias");
            let with_bias = |stem: &str| (name(stem), Some(bias(stem)));
            layers.push(ServingLayer {
                attn_norm: loader.dense(&name("attn_norm"))?,
                qkv: loader.same_input(&[
                    with_bias("attn_q"),
                    with_bias("attn_k"),
                    with_bias("attn_v"),
                ])?,
                o: loader.projection(&name("attn_output"), Some(&bias("attn_output")))?,
                ffn_norm: loader.dense(&name("ffn_norm"))?,
                gate_up: loader.same_input(&[(name("ffn_gate"), None), (name("ffn_up"), None)])?,
                down: loader.projection(&name("ffn_down"), None)?,
            });
        }
        let d = config.head_dim;
        // The same angles as the trainer's, computed in f32 as GGML and candle do.
        let inv_freq = (0..d)
            .step_by(2)
            .map(|i| 1f32 / (config.rope_theta as f32).powf(i as f32 / d as f32))
            .collect();
        Ok(Self {
            config,
            encoding,
            device: device.clone(),
            embed,
            layers,
            output_norm,
            head,
            inv_freq,
        })
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How the matrices are encoded.
    pub fn encoding(&self) -> WeightsEncoding {
        self.encoding
    }

    /// Runs `batch` through the model, writing its keys and values into `kv`, and returns the
    /// logits of the tokens at the indices `wanted` (in that order), one vocabulary-wide row
    /// each. Every slot's tokens must continue its cache: positions `len, len + 1, ...` in
    /// order. On an error the cache is left as it was before the step.
    pub fn forward(
        &self,
        batch: &TokenBatch,
        kv: &mut KvCache,
        wanted: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let n = batch.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        if let Some(bad) = wanted.iter().find(|&&i| i >= n) {
            return Err(LlamaError::InvalidInput(format!(
                "logits asked for token {bad} of a batch of {n}"
            )));
        }
        if let Some(bad) = batch
            .ids
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(LlamaError::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let plan = kv.plan(batch)?;
        let result = self.run(batch, kv, &plan, wanted);
        match result {
            Ok(logits) => {
                kv.commit(&plan);
                Ok(logits)
            }
            Err(e) => {
                kv.rewind(&plan);
                Err(e)
            }
        }
    }

    fn run(
        &self,
        batch: &TokenBatch,
        kv: &mut KvCache,
        plan: &StepPlan,
        wanted: &[usize],
    ) -> Result<Vec<Vec<f32>>> {
        let c = &self.config;
        let n = batch.len();
        let ids = Tensor::from_slice(&batch.ids, n, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let (cos, sin) = self.rope_tables(&batch.positions)?;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let eps = c.rms_eps as f32;
        for (index, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let [q, k, v] = outputs(layer.qkv.forward(&h)?)?;
            let q = (self.rope(&q, c.n_head, &cos, &sin)? * scale)?;
            let k = self.rope(&k, c.n_kv_head, &cos, &sin)?;
            kv.append(index, &k, &v.contiguous()?, plan)?;
            let attended = kv.attend(index, &q, plan)?;
            x = (x + layer.o.forward(&attended)?)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, eps)?;
            let [gate, up] = outputs(layer.gate_up.forward(&h)?)?;
            let mlp = (gate.silu()? * up)?;
            x = (x + layer.down.forward(&mlp)?)?;
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<u32> = wanted.iter().map(|&i| i as u32).collect();
        let picked = x.index_select(&Tensor::from_vec(rows, wanted.len(), &self.device)?, 0)?;
        let h = candle_nn::ops::rms_norm(&picked, &self.output_norm, eps)?;
        Ok(self.head.forward(&h)?.to_vec2::<f32>()?)
    }

    /// cos/sin tables `(n, 1, head_dim / 2)`, one row per token position.
    fn rope_tables(&self, positions: &[usize]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(cos, (n, 1, half), &self.device)?,
            Tensor::from_vec(sin, (n, 1, half), &self.device)?,
        ))
    }

    /// Rotates `x: (n, heads * head_dim)`, each token at its own position.
    fn rope(&self, x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (n, _) = x.dims2()?;
        let d = self.config.head_dim;
        let x = x.reshape((n, heads, 1, d))?.contiguous()?;
        let rotated = match self.config.architecture.rope_style() {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        };
        Ok(rotated.reshape((n, heads * d))?)
    }
}

/// The `N` outputs of a [`SameInput`] of `N` parts.
fn outputs<const N: usize>(parts: Vec<Tensor>) -> Result<[Tensor; N]> {
    <[Tensor; N]>::try_from(parts)
        .map_err(|p| LlamaError::Config(format!("{N} projections expected, {} found", p.len())))
}

/// The tokens of one forward step, flattened: token `i` is `ids[i]` at `positions[i]` of the
/// sequence in cache slot `slots[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenBatch {
    /// Token ids.
    pub ids: Vec<u32>,
    /// The cache slot of each token's sequence.
    pub slots: Vec<SlotId>,
    /// Each token's position in its sequence.
    pub positions: Vec<usize>,
}

impl TokenBatch {
    /// Adds the tokens `ids` of slot `slot`, starting at position `start`.
    pub fn push_run(&mut self, slot: SlotId, start: usize, ids: &[u32]) {
        for (offset, &id) in ids.iter().enumerate() {
            self.ids.push(id);
            self.slots.push(slot);
            self.positions.push(start + offset);
        }
    }

    /// Tokens in the batch.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A sequence's place in a [`KvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(usize);

impl SlotId {
    /// The slot's index.
    pub fn index(self) -> usize {
        self.0
    }
}

/// What a step writes: each slot's run of new tokens, in batch order.
#[derive(Debug, Clone)]
struct StepPlan {
    /// `(slot, first position, first token index, count)` of each run.
    runs: Vec<Run>,
    /// The run of each token.
    run_of: Vec<usize>,
    /// Each token's position.
    positions: Vec<usize>,
    /// Each token's slot.
    slots: Vec<SlotId>,
}

#[derive(Debug, Clone, Copy)]
struct Run {
    slot: SlotId,
    start: usize,
    first: usize,
    count: usize,
}

/// Keys and values of the sequences being served, by slot.
#[derive(Debug)]
pub struct KvCache {
    kv_dim: usize,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
    storage: Storage,
}

#[derive(Debug)]
enum Storage {
    Host(HostKv),
    Device(DeviceKv),
}

/// Host vectors per slot and layer, `len * kv_dim` floats each.
#[derive(Debug)]
struct HostKv {
    layers: usize,
    slots: Vec<Option<HostSlot>>,
}

#[derive(Debug)]
struct HostSlot {
    /// Tokens cached, shared ones included.
    len: usize,
    /// Keys and values of the first positions, shared with the slots they were copied from or
    /// into, and how many of its positions this slot uses. A group's samples and the prefix
    /// cache entry they continue hold one copy of their prompt, so a decoding step of the group
    /// reads it once from memory rather than once per sample.
    shared: Option<(Arc<SharedRows>, usize)>,
    /// Keys and values of the positions after the shared ones, per layer.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// Keys and values of a run of first positions, per layer, never written again.
#[derive(Debug)]
struct SharedRows {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl HostSlot {
    fn shared_tokens(&self) -> usize {
        self.shared.as_ref().map_or(0, |(_, tokens)| *tokens)
    }

    /// Floats of a layer's own rows that hold positions before `tokens`, which is not before
    /// the shared ones (a step writes only after a slot's length).
    fn own_floats(&self, tokens: usize, kv_dim: usize) -> usize {
        tokens.saturating_sub(self.shared_tokens()) * kv_dim
    }

    /// Drops the own rows of every layer past position `tokens`.
    fn truncate(&mut self, tokens: usize, kv_dim: usize) {
        let keep = self.own_floats(tokens, kv_dim);
        self.k.iter_mut().for_each(|l| l.truncate(keep));
        self.v.iter_mut().for_each(|l| l.truncate(keep));
    }

    /// Makes the first `n` positions shared rows, moving own rows into them where the shared
    /// ones end before `n`, and returns them for another slot to use.
    fn share(&mut self, n: usize, kv_dim: usize) -> Arc<SharedRows> {
        let shared_tokens = self.shared_tokens();
        if let Some((rows, _)) = &self.shared
            && n <= shared_tokens
        {
            return Arc::clone(rows);
        }
        let moved = (n - shared_tokens) * kv_dim;
        let join = |shared: Option<&Vec<f32>>, own: &mut Vec<f32>| {
            let mut rows = Vec::with_capacity(n * kv_dim);
            rows.extend_from_slice(shared.map_or(&[][..], |s| &s[..shared_tokens * kv_dim]));
            rows.extend(own.drain(..moved));
            rows
        };
        let before = self.shared.take().map(|(rows, _)| rows);
        let rows = Arc::new(SharedRows {
            k: (self.k.iter_mut().enumerate())
                .map(|(layer, own)| join(before.as_ref().map(|b| &b.k[layer]), own))
                .collect(),
            v: (self.v.iter_mut().enumerate())
                .map(|(layer, own)| join(before.as_ref().map(|b| &b.v[layer]), own))
                .collect(),
        });
        self.shared = Some((Arc::clone(&rows), n));
        rows
    }

    /// Layer `layer`'s cached keys and values, for queries that see `visible` positions.
    fn rows(&self, layer: usize, kv_dim: usize, visible: usize) -> LayerRows<'_> {
        let (shared_k, shared_v, tokens) = match &self.shared {
            Some((rows, tokens)) => (
                &rows.k[layer][..tokens * kv_dim],
                &rows.v[layer][..tokens * kv_dim],
                *tokens,
            ),
            None => (&[][..], &[][..], 0),
        };
        LayerRows {
            shared: [shared_k, shared_v],
            own: [&self.k[layer], &self.v[layer]],
            shared_tokens: tokens,
            stride: kv_dim,
            visible,
        }
    }
}

/// One `(slots * capacity, kv_dim)` tensor per layer for keys and one for values.
#[derive(Debug)]
struct DeviceKv {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    capacity: usize,
    lens: Vec<Option<usize>>,
    device: Device,
}

impl KvCache {
    /// The CPU cache: slots grow as their sequences do, and any number may exist.
    pub fn host(config: &LlamaConfig) -> Self {
        Self::with(
            config,
            Storage::Host(HostKv {
                layers: config.n_layer,
                slots: Vec::new(),
            }),
        )
    }

    /// A cache of `slots` slots of `capacity` tokens each, preallocated on `device`.
    pub fn device(
        config: &LlamaConfig,
        device: &Device,
        slots: usize,
        capacity: usize,
    ) -> Result<Self> {
        if slots == 0 || capacity == 0 {
            return Err(LlamaError::Config(
                "a device cache needs at least one slot of at least one token".into(),
            ));
        }
        let rows = slots * capacity;
        let zeros = || Tensor::zeros((rows, config.kv_dim()), DType::F32, device);
        let mut k = Vec::with_capacity(config.n_layer);
        let mut v = Vec::with_capacity(config.n_layer);
        for _ in 0..config.n_layer {
            k.push(zeros()?);
            v.push(zeros()?);
        }
        Ok(Self::with(
            config,
            Storage::Device(DeviceKv {
                k,
                v,
                capacity,
                lens: vec![None; slots],
                device: device.clone(),
            }),
        ))
    }

    fn with(config: &LlamaConfig, storage: Storage) -> Self {
        Self {
            kv_dim: config.kv_dim(),
            n_head: config.n_head,
            n_kv_head: config.n_kv_head,
            head_dim: config.head_dim,
            storage,
        }
    }

    /// Bytes one cached token takes (keys and values of every layer).
    pub fn bytes_per_token(config: &LlamaConfig) -> usize {
        2 * config.n_layer * config.kv_dim() * std::mem::size_of::<f32>()
    }

    /// Most tokens one slot holds (`None`: unbounded, the host cache).
    pub fn slot_capacity(&self) -> Option<usize> {
        match &self.storage {
            Storage::Host(_) => None,
            Storage::Device(d) => Some(d.capacity),
        }
    }

    /// A free slot for a sequence of up to `tokens` tokens, or `None` when none is free (the
    /// device cache is full) or it does not fit a slot.
    pub fn allocate(&mut self, tokens: usize) -> Option<SlotId> {
        match &mut self.storage {
            Storage::Host(h) => {
                let slot = HostSlot {
                    len: 0,
                    shared: None,
                    k: (0..h.layers)
                        .map(|_| Vec::with_capacity(tokens * self.kv_dim))
                        .collect(),
                    v: (0..h.layers)
                        .map(|_| Vec::with_capacity(tokens * self.kv_dim))
                        .collect(),
                };
                let index = match h.slots.iter().position(Option::is_none) {
                    Some(free) => free,
                    None => {
                        h.slots.push(None);
                        h.slots.len() - 1
                    }
                };
                h.slots[index] = Some(slot);
                Some(SlotId(index))
            }
            Storage::Device(d) => {
                if tokens > d.capacity {
                    return None;
                }
                let index = d.lens.iter().position(Option::is_none)?;
                d.lens[index] = Some(0);
                Some(SlotId(index))
            }
        }
    }

    /// Frees `slot`; its contents are gone.
    pub fn release(&mut self, slot: SlotId) {
        match &mut self.storage {
            Storage::Host(h) => {
                if let Some(s) = h.slots.get_mut(slot.0) {
                    *s = None;
                }
            }
            Storage::Device(d) => {
                if let Some(len) = d.lens.get_mut(slot.0) {
                    *len = None;
                }
            }
        }
    }

    /// Tokens cached in `slot` (0 for a free slot).
    pub fn len(&self, slot: SlotId) -> usize {
        match &self.storage {
            Storage::Host(h) => h
                .slots
                .get(slot.0)
                .and_then(Option::as_ref)
                .map_or(0, |s| s.len),
            Storage::Device(d) => d.lens.get(slot.0).copied().flatten().unwrap_or(0),
        }
    }

    /// Slots in use.
    pub fn slots_in_use(&self) -> usize {
        match &self.storage {
            Storage::Host(h) => h.slots.iter().filter(|s| s.is_some()).count(),
            Storage::Device(d) => d.lens.iter().filter(|s| s.is_some()).count(),
        }
    }

    /// Copies the first `n` cached tokens of `from` into `to`, which must be empty: `to` then
    /// continues from position `n` exactly as if it had computed them itself.
    pub fn copy_prefix(&mut self, from: SlotId, to: SlotId, n: usize) -> Result<()> {
        if from == to {
            return Err(LlamaError::InvalidInput("a slot cannot copy itself".into()));
        }
        if n > self.len(from) || self.len(to) != 0 || !self.in_use(to) {
            return Err(LlamaError::InvalidInput(format!(
                "cannot copy {n} tokens from slot {} (holding {}) into slot {} (holding {})",
                from.0,
                self.len(from),
                to.0,
                self.len(to)
            )));
        }
        let kv_dim = self.kv_dim;
        match &mut self.storage {
            Storage::Host(h) => {
                // The rows are shared, not copied: neither slot writes before its length again.
                let source = h.slots[from.0].as_mut().ok_or_else(|| free_slot(from))?;
                let rows = (n > 0).then(|| source.share(n, kv_dim));
                let target = h.slots[to.0].as_mut().ok_or_else(|| free_slot(to))?;
                target.shared = rows.map(|rows| (rows, n));
                target.len = n;
            }
            Storage::Device(d) => {
                if n > 0 {
                    let (a, b) = (from.0 * d.capacity, to.0 * d.capacity);
                    for layer in 0..d.k.len() {
                        for cache in [&d.k[layer], &d.v[layer]] {
                            let rows = cache.narrow(0, a, n)?.copy()?;
                            cache.slice_set(&rows, 0, b)?;
                        }
                    }
                }
                d.lens[to.0] = Some(n);
            }
        }
        Ok(())
    }

    fn in_use(&self, slot: SlotId) -> bool {
        match &self.storage {
            Storage::Host(h) => h.slots.get(slot.0).is_some_and(Option::is_some),
            Storage::Device(d) => d.lens.get(slot.0).is_some_and(Option::is_some),
        }
    }

    /// Checks that every slot's tokens continue its cache and fit it, and groups them into runs.
    fn plan(&self, batch: &TokenBatch) -> Result<StepPlan> {
        let n = batch.len();
        if batch.slots.len() != n || batch.positions.len() != n {
            return Err(LlamaError::InvalidInput(
                "a token batch needs one slot and one position per token".into(),
            ));
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut run_of = Vec::with_capacity(n);
        let mut next: std::collections::HashMap<SlotId, usize> = Default::default();
        for i in 0..n {
            let (slot, position) = (batch.slots[i], batch.positions[i]);
            if !self.in_use(slot) {
                return Err(free_slot(slot));
            }
            let expected = *next.entry(slot).or_insert_with(|| self.len(slot));
            if position != expected {
                return Err(LlamaError::InvalidInput(format!(
                    "token {i} is at position {position} of slot {}, which continues at {expected}",
                    slot.0
                )));
            }
            if let Some(capacity) = self.slot_capacity()
                && position >= capacity
            {
                return Err(LlamaError::InvalidInput(format!(
                    "position {position} does not fit a cache slot of {capacity} tokens"
                )));
            }
            next.insert(slot, position + 1);
            match runs.last_mut() {
                Some(run) if run.slot == slot && run.start + run.count == position => {
                    run.count += 1;
                }
                _ => runs.push(Run {
                    slot,
                    start: position,
                    first: i,
                    count: 1,
                }),
            }
            run_of.push(runs.len() - 1);
        }
        Ok(StepPlan {
            runs,
            run_of,
            positions: batch.positions.clone(),
            slots: batch.slots.clone(),
        })
    }

    /// Makes a successful step's tokens part of their slots.
    fn commit(&mut self, plan: &StepPlan) {
        for run in &plan.runs {
            let end = run.start + run.count;
            match &mut self.storage {
                Storage::Host(h) => {
                    if let Some(Some(slot)) = h.slots.get_mut(run.slot.0) {
                        slot.len = slot.len.max(end);
                    }
                }
                Storage::Device(d) => {
                    if let Some(Some(len)) = d.lens.get_mut(run.slot.0) {
                        *len = (*len).max(end);
                    }
                }
            }
        }
    }

    /// Forgets whatever a failed step wrote: host slots drop rows past their length (a device
    /// slot's stale rows are overwritten by the next write to them).
    fn rewind(&mut self, plan: &StepPlan) {
        if let Storage::Host(h) = &mut self.storage {
            for run in &plan.runs {
                if let Some(Some(slot)) = h.slots.get_mut(run.slot.0) {
                    slot.truncate(slot.len, self.kv_dim);
                }
            }
        }
    }

    /// Writes one layer's keys and values `(n, kv_dim)` of the step's tokens.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor, plan: &StepPlan) -> Result<()> {
        let kv_dim = self.kv_dim;
        match &mut self.storage {
            Storage::Host(h) => {
                let (k, v) = (host_rows(k)?, host_rows(v)?);
                for run in &plan.runs {
                    let slot = h.slots[run.slot.0]
                        .as_mut()
                        .ok_or_else(|| free_slot(run.slot))?;
                    let rows = run.first * kv_dim..(run.first + run.count) * kv_dim;
                    let keep = slot.own_floats(run.start, kv_dim);
                    slot.k[layer].truncate(keep);
                    slot.v[layer].truncate(keep);
                    slot.k[layer].extend_from_slice(&k[rows.clone()]);
                    slot.v[layer].extend_from_slice(&v[rows]);
                }
            }
            Storage::Device(d) => {
                let n = plan.positions.len();
                let mut index = Vec::with_capacity(n * kv_dim);
                for (slot, position) in plan.slots.iter().zip(&plan.positions) {
                    let row = (slot.0 * d.capacity + position) as u32;
                    index.extend(std::iter::repeat_n(row, kv_dim));
                }
                let index = Tensor::from_vec(index, (n, kv_dim), &d.device)?;
                d.k[layer].scatter_set(&index, k, 0)?;
                d.v[layer].scatter_set(&index, v, 0)?;
            }
        }
        Ok(())
    }

    /// Attention of the step's queries `(n, n_head * head_dim)` (roped and scaled), each over
    /// its slot's keys up to and including its own position.
    fn attend(&self, layer: usize, q: &Tensor, plan: &StepPlan) -> Result<Tensor> {
        match &self.storage {
            Storage::Host(h) => self.attend_host(h, layer, q, plan),
            Storage::Device(d) => self.attend_device(d, layer, q, plan),
        }
    }

    fn attend_host(&self, h: &HostKv, layer: usize, q: &Tensor, plan: &StepPlan) -> Result<Tensor> {
        let (n, width) = q.dims2()?;
        let queries = host_rows(q)?;
        let (d, kv_dim) = (self.head_dim, self.kv_dim);
        let rep = self.n_head / self.n_kv_head;
        let mut slots = Vec::with_capacity(plan.runs.len());
        for run in &plan.runs {
            slots.push(
                h.slots[run.slot.0]
                    .as_ref()
                    .ok_or_else(|| free_slot(run.slot))?,
            );
        }
        let mut out = vec![0f32; n * width];
        let by_rows = |token: usize| plan.runs[plan.run_of[token]].count < MATMUL_ATTENTION_RUN;
        let row_tokens = (0..n).filter(|&token| by_rows(token)).count();
        // A task takes the `rep` query heads of a token that share a key-value head, so each
        // cached key and value is read once for all of them while it is in the cache (at a
        // 600-token context a layer's keys and values outgrow it). With too few tokens for the
        // threads to share such tasks, a task takes one head. Either way a head's result is the
        // same operations in the same order.
        let heads_per_task = if row_tokens * self.n_kv_head >= 2 * rayon::current_num_threads() {
            rep
        } else {
            1
        };
        let tasks_per_token = self.n_head / heads_per_task;
        out.par_chunks_mut(heads_per_task * d)
            .enumerate()
            .for_each_init(AttentionScratch::default, |scratch, (task, out)| {
                let (token, first_head) = (
                    task / tasks_per_token,
                    (task % tasks_per_token) * heads_per_task,
                );
                if !by_rows(token) {
                    return;
                }
                let slot = slots[plan.run_of[token]];
                scratch.attend(
                    &queries[token * width + first_head * d..][..heads_per_task * d],
                    &slot
                        .rows(layer, kv_dim, plan.positions[token] + 1)
                        .head((first_head / rep) * d, d),
                    out,
                );
            });
        for (run, slot) in plan.runs.iter().zip(&slots) {
            if run.count >= MATMUL_ATTENTION_RUN {
                let visible = run.start + run.count;
                let [keys, values] = slot.rows(layer, kv_dim, visible).contiguous()?;
                let attended = self.attend_run(q, run, &keys, &values)?;
                out[run.first * width..][..run.count * width]
                    .copy_from_slice(&attended.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        Ok(Tensor::from_vec(out, (n, width), q.device())?)
    }

    /// Attention of one run of a sequence's tokens `(count, n_head * head_dim)` over the keys
    /// and values `(start + count, kv_dim)` of its slot, as matrix products of the run's
    /// queries with the keys and of the causal softmax with the values, per key-value head.
    fn attend_run(&self, q: &Tensor, run: &Run, keys: &Tensor, values: &Tensor) -> Result<Tensor> {
        let (nkv, hd, t) = (self.n_kv_head, self.head_dim, run.count);
        let rep = self.n_head / nkv;
        let visible = run.start + t;
        let heads_first = |rows: &Tensor| -> Result<Tensor> {
            Ok(rows
                .reshape((visible, nkv, hd))?
                .transpose(0, 1)?
                .contiguous()?)
        };
        let (k, v) = (heads_first(keys)?, heads_first(values)?);
        // Rows ordered (key-value head, query head of the group, token).
        let q = q
            .narrow(0, run.first, t)?
            .reshape((t, nkv, rep, hd))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((nkv, rep * t, hd))?;
        let scores = q.matmul(&k.transpose(1, 2)?)?;
        let weights = causal_softmax(&scores, run)?;
        Ok(weights
            .matmul(&v)?
            .reshape((nkv, rep, t, hd))?
            .permute((2, 0, 1, 3))?
            .reshape((t, self.n_head * hd))?)
    }

    fn attend_device(
        &self,
        d: &DeviceKv,
        layer: usize,
        q: &Tensor,
        plan: &StepPlan,
    ) -> Result<Tensor> {
        let (n, width) = q.dims2()?;
        let (nh, nkv, hd) = (self.n_head, self.n_kv_head, self.head_dim);
        let rep = nh / nkv;
        let (keys, values) = (&d.k[layer], &d.v[layer]);
        // Decode tokens (runs of one) of every slot attend together; longer runs (prompts)
        // attend one by one over their own slot.
        let singles: Vec<&Run> = plan.runs.iter().filter(|r| r.count == 1).collect();
        let mut parts: Vec<(Vec<u32>, Tensor)> = Vec::new();
        if !singles.is_empty() {
            let b = singles.len();
            let longest = singles.iter().map(|r| r.start + 1).max().unwrap_or(1);
            let mut rows = Vec::with_capacity(b * longest);
            let mut mask = Vec::with_capacity(b * longest);
            for run in &singles {
                let base = (run.slot.0 * d.capacity) as u32;
                for j in 0..longest {
                    // Past a slot's own keys, read its first row (any valid row) and mask it.
                    let visible = j <= run.start;
                    rows.push(base + if visible { j as u32 } else { 0 });
                    mask.push(if visible { 0f32 } else { f32::NEG_INFINITY });
                }
            }
            let rows = Tensor::from_vec(rows, b * longest, &d.device)?;
            let gather = |cache: &Tensor| -> Result<Tensor> {
                Ok(cache
                    .index_select(&rows, 0)?
                    .reshape((b, longest, nkv, hd))?
                    .transpose(1, 2)?
                    .contiguous()?)
            };
            let (k, v) = (gather(keys)?, gather(values)?);
            let tokens: Vec<u32> = singles.iter().map(|r| r.first as u32).collect();
            let index = Tensor::from_vec(tokens.clone(), b, &d.device)?;
            let q = q.index_select(&index, 0)?.reshape((b, nkv, rep, hd))?;
            let mask = Tensor::from_vec(mask, (b, 1, 1, longest), &d.device)?;
            let scores = q.matmul(&k.transpose(2, 3)?)?.broadcast_add(&mask)?;
            let weights = candle_nn::ops::softmax_last_dim(&scores)?;
            parts.push((tokens, weights.matmul(&v)?.reshape((b, width))?));
        }
        for run in plan.runs.iter().filter(|r| r.count > 1) {
            let rows =
                |cache: &Tensor| cache.narrow(0, run.slot.0 * d.capacity, run.start + run.count);
            let out = self.attend_run(q, run, &rows(keys)?, &rows(values)?)?;
            parts.push((
                (run.first..run.first + run.count)
                    .map(|i| i as u32)
                    .collect(),
                out,
            ));
        }
        // Back into batch order.
        let mut order = vec![0u32; n];
        let mut position = 0u32;
        for (tokens, _) in &parts {
            for &token in tokens {
                order[token as usize] = position;
                position += 1;
            }
        }
        let stacked = Tensor::cat(&parts.iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?;
        Ok(stacked.index_select(&Tensor::from_vec(order, n, &d.device)?, 0)?)
    }
}

/// Runs of at least this many tokens (prompts, observations) attend through matrix products
/// on the CPU: every token of a run reads the same keys, which a matrix product reads once
/// per block of tokens at its full rate, where the per-token path reads them per token.
/// Decoding steps (runs of one token) keep the per-token path, whose result for a sequence
/// does not depend on the others in its batch.
const MATMUL_ATTENTION_RUN: usize = 8;

/// One layer's cached keys and values of a host slot, rows of `stride` floats: the shared
/// first positions, then the slot's own.
struct LayerRows<'a> {
    /// Keys, then values, of the shared positions.
    shared: [&'a [f32]; 2],
    /// Keys, then values, of the positions after them.
    own: [&'a [f32]; 2],
    shared_tokens: usize,
    stride: usize,
    /// Positions the queries see: the first `visible` ones.
    visible: usize,
}

impl<'a> LayerRows<'a> {
    /// Row `j` of the keys (`part` 0) or values (1).
    fn row(&self, part: usize, j: usize) -> &'a [f32] {
        if j < self.shared_tokens {
            &self.shared[part][j * self.stride..][..self.stride]
        } else {
            &self.own[part][(j - self.shared_tokens) * self.stride..][..self.stride]
        }
    }

    /// The keys and values of the visible positions as `(visible, stride)` tensors.
    fn contiguous(&self) -> Result<[Tensor; 2]> {
        let own_rows = self.visible.saturating_sub(self.shared_tokens);
        if self.visible < self.shared_tokens || self.own[0].len() < own_rows * self.stride {
            return Err(LlamaError::InvalidInput(format!(
                "a slot holds fewer than the {} positions its queries see",
                self.visible
            )));
        }
        let part = |p: usize| -> Result<Tensor> {
            let rows = [self.shared[p], &self.own[p][..own_rows * self.stride]].concat();
            Ok(Tensor::from_vec(
                rows,
                (self.visible, self.stride),
                &Device::Cpu,
            )?)
        };
        Ok([part(0)?, part(1)?])
    }

    /// The view of one key-value head: floats `offset..offset + width` of each row.
    fn head(self, offset: usize, width: usize) -> KvRows<'a> {
        KvRows {
            rows: self,
            offset,
            width,
        }
    }
}

/// The cached keys and values one group of query heads attends over: one key-value head's
/// floats of each row.
struct KvRows<'a> {
    rows: LayerRows<'a>,
    offset: usize,
    width: usize,
}

impl KvRows<'_> {
    fn key(&self, j: usize) -> &[f32] {
        &self.rows.row(0, j)[self.offset..][..self.width]
    }

    fn value(&self, j: usize) -> &[f32] {
        &self.rows.row(1, j)[self.offset..][..self.width]
    }
}

/// A host attention task's buffers, kept across the tasks a thread runs.
#[derive(Default)]
struct AttentionScratch {
    /// Each head's scores, one row of `visible` per head.
    scores: Vec<f32>,
    /// Each head's softmax denominator.
    totals: Vec<f32>,
}

impl AttentionScratch {
    /// Softmax attention of the heads in `queries` (rows of `kv.width`, scaled) over `kv`,
    /// added into `out`. Each cached key and value is read once for all the heads; a head's
    /// result does not depend on which other heads it is computed with.
    fn attend(&mut self, queries: &[f32], kv: &KvRows<'_>, out: &mut [f32]) {
        let (d, visible) = (kv.width, kv.rows.visible);
        self.scores.clear();
        self.scores.resize(queries.len() / d * visible, 0.0);
        for j in 0..visible {
            let key = kv.key(j);
            for (h, query) in queries.chunks_exact(d).enumerate() {
                self.scores[h * visible + j] = dot(query, key);
            }
        }
        self.totals.clear();
        self.totals.extend(
            self.scores
                .chunks_exact_mut(visible)
                .map(exp_shifted_in_place),
        );
        for j in 0..visible {
            let value = kv.value(j);
            for (h, head_out) in out.chunks_exact_mut(d).enumerate() {
                axpy(
                    head_out,
                    self.scores[h * visible + j] / self.totals[h],
                    value,
                );
            }
        }
    }
}

/// The softmax of each row of `scores` `(kv heads, rep * count, visible)` of a run over the
/// positions its token sees (its own and earlier ones), 0 past them. On the CPU it runs on the
/// rows in place with the vectorized exponential; elsewhere as a masked tensor softmax.
fn causal_softmax(scores: &Tensor, run: &Run) -> Result<Tensor> {
    let (nkv, rows, visible) = scores.dims3()?;
    // Row `r` of a head belongs to token `r % count` of the run, at position `start + r % count`.
    let seen = |row: usize| run.start + row % run.count + 1;
    if scores.device().is_cpu() {
        let mut weights = scores.flatten_all()?.to_vec1::<f32>()?;
        weights
            .par_chunks_mut(visible)
            .enumerate()
            .for_each(|(row, row_scores)| {
                let (seen_scores, unseen) = row_scores.split_at_mut(seen(row));
                let total = exp_shifted_in_place(seen_scores);
                seen_scores.iter_mut().for_each(|w| *w /= total);
                unseen.fill(0.0);
            });
        return Ok(Tensor::from_vec(
            weights,
            (nkv, rows, visible),
            &Device::Cpu,
        )?);
    }
    let mask: Vec<f32> = (0..rows)
        .flat_map(|row| {
            (0..visible).map(move |j| {
                if j < seen(row) {
                    0f32
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, rows, visible), scores.device())?;
    Ok(candle_nn::ops::softmax_last_dim(
        &scores.broadcast_add(&mask)?,
    )?)
}

/// Replaces each score `s` with `exp(s - max)` and returns their sum: the softmax's
/// numerators and denominator, eight lanes at a time (the last lanes padded with scores of
/// minus infinity, whose exponential is 0), so every score takes the same exponential.
fn exp_shifted_in_place(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let shift = f32x8::splat(max);
    let mut total = f32x8::ZERO;
    let (chunks, tail) = scores.as_chunks_mut::<8>();
    for chunk in chunks {
        let e = (f32x8::new(*chunk) - shift).exp();
        *chunk = e.to_array();
        total += e;
    }
    if !tail.is_empty() {
        let mut padded = [f32::NEG_INFINITY; 8];
        padded[..tail.len()].copy_from_slice(tail);
        let e = (f32x8::new(padded) - shift).exp();
        tail.copy_from_slice(&e.to_array()[..tail.len()]);
        total += e;
    }
    total.reduce_add()
}

fn free_slot(slot: SlotId) -> LlamaError {
    LlamaError::InvalidInput(format!("cache slot {} is not in use", slot.0))
}

/// A 2-D f32 tensor's rows, flattened, on the host.
fn host_rows(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::GgmlDType;

    use super::*;
    use crate::gguf::Architecture;
    use crate::model::Llama;
    use crate::test_support::{cpu, tiny_config, write_gguf};

    /// A tiny random model of `architecture` written as an F32 GGUF, with the trainer's copy.
    fn tiny(
        architecture: Architecture,
        seed: u64,
    ) -> (tempfile::TempDir, std::path::PathBuf, Llama) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        let model = Llama::random(tiny_config(architecture), seed, &cpu(), DType::F32).unwrap();
        write_gguf(&model, GgmlDType::F32, &path);
        // The trainer reads the file back, as serving does, so both see identical weights.
        let trainer = Llama::load(&path, &cpu(), DType::F32).unwrap();
        (dir, path, trainer)
    }

    /// The trainer's logits for the next token after each prefix of `ids`.
    fn trainer_logits(model: &Llama, ids: &[u32]) -> Vec<Vec<f32>> {
        let t = Tensor::new(ids, &cpu()).unwrap().unsqueeze(0).unwrap();
        model
            .forward(&t, None, None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    fn caches(model: &ServingModel) -> Vec<(&'static str, KvCache)> {
        vec![
            ("host", KvCache::host(model.config())),
            (
                "device",
                KvCache::device(model.config(), &cpu(), 6, 40).unwrap(),
            ),
        ]
    }

    /// Prefills `ids` in one step and returns the logits of its last token.
    fn prefill(model: &ServingModel, kv: &mut KvCache, ids: &[u32]) -> (SlotId, Vec<f32>) {
        let slot = kv.allocate(ids.len() + 8).unwrap();
        let mut batch = TokenBatch::default();
        batch.push_run(slot, 0, ids);
        let logits = model.forward(&batch, kv, &[ids.len() - 1]).unwrap();
        (slot, logits.into_iter().next().unwrap())
    }

    #[test]
    fn a_prefill_and_step_by_step_decoding_reproduce_the_trainer() {
        for architecture in [Architecture::Llama, Architecture::Qwen2] {
            let (_dir, path, trainer) = tiny(architecture, 11);
            let model = ServingModel::load(&path, &cpu(), WeightsEncoding::F32).unwrap();
            let ids = [3u32, 17, 42, 8, 8, 61, 0, 29, 5];
            // The whole prompt attends by matrix products on the host, its tail token by token.
            assert!(ids.len() >= MATMUL_ATTENTION_RUN && 4 < MATMUL_ATTENTION_RUN);
            let reference = trainer_logits(&trainer, &ids);
            for (name, mut kv) in caches(&model) {
                let (_, last) = prefill(&model, &mut kv, &ids);
                assert!(
                    max_diff(&last, &reference[8]) < 1e-4,
                    "{name} {architecture:?}"
                );
                // A prompt of four tokens, then one token per step.
                let slot = kv.allocate(ids.len()).unwrap();
                let mut batch = TokenBatch::default();
                batch.push_run(slot, 0, &ids[..4]);
                let first = model.forward(&batch, &mut kv, &[3]).unwrap();
                assert!(max_diff(&first[0], &reference[3]) < 1e-4, "{name}");
                for (position, &id) in ids.iter().enumerate().skip(4) {
                    let mut step = TokenBatch::default();
                    step.push_run(slot, position, &[id]);
                    let logits = model.forward(&step, &mut kv, &[0]).unwrap();
                    assert!(
                        max_diff(&logits[0], &reference[position]) < 1e-4,
                        "{name} {architecture:?} at {position}"
                    );
                }
                assert_eq!(kv.len(slot), ids.len());
            }
        }
    }

    #[test]
    fn sequences_batched_together_score_as_if_alone() {
        let (_dir, path, trainer) = tiny(Architecture::Llama, 12);
        let model = ServingModel::load(&path, &cpu(), WeightsEncoding::F32).unwrap();
        let sequences: [&[u32]; 3] = [&[1, 2, 3, 4, 5, 6, 7], &[9, 9, 9], &[40, 30, 20, 10, 0]];
        for (name, mut kv) in caches(&model) {
            // Every sequence's first two tokens as prompts of one step, then the rest one per
            // step, all sequences in the same steps while they last.
            let slots: Vec<SlotId> = sequences
                .iter()
                .map(|s| kv.allocate(s.len()).unwrap())
                .collect();
            let mut batch = TokenBatch::default();
            let mut wanted = Vec::new();
            for (slot, seq) in slots.iter().zip(sequences) {
                batch.push_run(*slot, 0, &seq[..2]);
                wanted.push(batch.len() - 1);
            }
            let logits = model.forward(&batch, &mut kv, &wanted).unwrap();
            for (row, seq) in logits.iter().zip(sequences) {
                assert!(
                    max_diff(row, &trainer_logits(&trainer, seq)[1]) < 1e-4,
                    "{name}"
                );
            }
            for position in 2..7 {
                let mut step = TokenBatch::default();
                let mut which = Vec::new();
                for (slot, seq) in slots.iter().zip(sequences) {
                    if position < seq.len() {
                        step.push_run(*slot, position, &[seq[position]]);
                        which.push(seq);
                    }
                }
                let wanted: Vec<usize> = (0..step.len()).collect();
                let logits = model.forward(&step, &mut kv, &wanted).unwrap();
                for (row, seq) in logits.iter().zip(which) {
                    let reference = &trainer_logits(&trainer, seq)[position];
                    assert!(max_diff(row, reference) < 1e-4, "{name} at {position}");
                }
            }
        }
    }

    #[test]
    fn slots_sharing_a_prefix_go_on_exactly_like_recomputed_ones() {
        let (_dir, path, _) = tiny(Architecture::Llama, 16);
        let model = ServingModel::load(&path, &cpu(), WeightsEncoding::F32).unwrap();
        let mut kv = KvCache::host(model.config());
        // The logits of `tokens` continuing `slot` at `position`, at the last token.
        let step = |kv: &mut KvCache, slot: SlotId, position: usize, tokens: &[u32]| {
            let mut batch = TokenBatch::default();
            batch.push_run(slot, position, tokens);
            model
                .forward(&batch, kv, &[tokens.len() - 1])
                .unwrap()
                .remove(0)
        };
        let recomputed = |ids: &[u32]| prefill(&model, &mut KvCache::host(model.config()), ids).1;
        let ids: Vec<u32> = (1..=8).collect();
        let (a, _) = prefill(&model, &mut kv, &ids);
        // B shares A's first five positions and goes on its own way.
        let b = kv.allocate(32).unwrap();
        kv.copy_prefix(a, b, 5).unwrap();
        let b_own = [40u32, 41, 42];
        let got = step(&mut kv, b, 5, &b_own);
        assert!(max_diff(&got, &recomputed(&[&ids[..5], &b_own].concat())) < 1e-5);
        // A, whose first five positions are now shared, goes on too.
        let got = step(&mut kv, a, 8, &[50]);
        assert!(max_diff(&got, &recomputed(&[&ids[..], &[50]].concat())) < 1e-5);
        // C takes seven of B's positions, two past what B shares, then a run long enough to
        // attend by matrix products.
        let c = kv.allocate(32).unwrap();
        kv.copy_prefix(b, c, 7).unwrap();
        let c_own: Vec<u32> = (50..50 + MATMUL_ATTENTION_RUN as u32).collect();
        let got = step(&mut kv, c, 7, &c_own);
        let c_ids = [&ids[..5], &b_own[..2], &c_own].concat();
        assert!(max_diff(&got, &recomputed(&c_ids)) < 1e-5);
        // Releasing the slots they came from changes nothing for the others.
        kv.release(a);
        kv.release(b);
        let got = step(&mut kv, c, c_ids.len(), &[33]);
        assert!(max_diff(&got, &recomputed(&[&c_ids[..], &[33]].concat())) < 1e-5);
        assert_eq!(kv.len(c), c_ids.len() + 1);
    }

    #[test]
    fn a_copied_prefix_continues_exactly_like_a_recomputed_one() {
        let (_dir, path, _) = tiny(Architecture::Llama, 13);
        let model = ServingModel::load(&path, &cpu(), WeightsEncoding::F32).unwrap();
        let shared = [5u32, 6, 7, 8, 9, 10];
        let tail = [11u32, 12, 13];
        for (name, mut kv) in caches(&model) {
            let (donor, _) = prefill(&model, &mut kv, &shared);
            let fresh = {
                let ids: Vec<u32> = shared.iter().chain(&tail).copied().collect();
                prefill(&model, &mut kv, &ids).1
            };
            let reuse = kv.allocate(12).unwrap();
            kv.copy_prefix(donor, reuse, 4).unwrap();
            assert_eq!(kv.len(reuse), 4);
            let mut batch = TokenBatch::default();
            let rest: Vec<u32> = shared[4..].iter().chain(&tail).copied().collect();
            batch.push_run(reuse, 4, &rest);
            let reused = model.forward(&batch, &mut kv, &[rest.len() - 1]).unwrap();
            assert!(max_diff(&reused[0], &fresh) < 1e-5, "{name}");
            // The donor is untouched and the copy refuses a slot already in use.
            assert_eq!(kv.len(donor), shared.len());
            assert!(kv.copy_prefix(donor, reuse, 2).is_err());
        }
    }

    #[test]
    fn bad_steps_are_refused_and_change_nothing() {
        let (_dir, path, _) = tiny(Architecture::Llama, 14);
        let model = ServingModel::load(&path, &cpu(), WeightsEncoding::F32).unwrap();
        for (name, mut kv) in caches(&model) {
            let (slot, _) = prefill(&model, &mut kv, &[1, 2, 3]);
            let mut gap = TokenBatch::default();
            gap.push_run(slot, 5, &[4]);
            let err = model.forward(&gap, &mut kv, &[0]).unwrap_err().to_string();
            assert!(err.contains("continues at 3"), "{name}: {err}");
            let mut outside = TokenBatch::default();
            outside.push_run(slot, 3, &[64]);
            let err = model
                .forward(&outside, &mut kv, &[0])
                .unwrap_err()
                .to_string();
            assert!(err.contains("outside the vocabulary"), "{name}: {err}");
            kv.release(slot);
            let mut released = TokenBatch::default();
            released.push_run(slot, 0, &[1]);
            assert!(model.forward(&released, &mut kv, &[0]).is_err(), "{name}");
            let mut fine = TokenBatch::default();
            let again = kv.allocate(4).unwrap();
            fine.push_run(again, 0, &[1, 2]);
            assert!(
                model.forward(&fine, &mut kv, &[2]).is_err(),
                "{name}: index past the batch"
            );
            assert_eq!(kv.len(again), 0, "{name}: a refused step wrote nothing");
        }
        let mut small = KvCache::device(model.config(), &cpu(), 1, 4).unwrap();
        assert!(small.allocate(5).is_none(), "a sequence longer than a slot");
        let one = small.allocate(4).unwrap();
        assert!(small.allocate(1).is_none(), "every slot in use");
        small.release(one);
        assert!(small.allocate(1).is_some());
    }

    #[test]
    fn quantized_encodings_serve_close_to_f32() {
        let (_dir, path, trainer) = tiny(Architecture::Llama, 15);
        let ids = [7u32, 3, 50, 2];
        let reference = &trainer_logits(&trainer, &ids)[3];
        let spread = reference.iter().copied().fold(f32::MIN, f32::max)
            - reference.iter().copied().fold(f32::MAX, f32::min);
        for (encoding, tolerance) in [(WeightsEncoding::Q8_0, 0.02), (WeightsEncoding::Q4_0, 0.25)]
        {
            let model = ServingModel::load(&path, &cpu(), encoding).unwrap();
            assert_eq!(model.encoding(), encoding);
            let mut kv = KvCache::host(model.config());
            let (_, logits) = prefill(&model, &mut kv, &ids);
            let diff = max_diff(&logits, reference);
            assert!(
                diff < tolerance * spread,
                "{encoding:?}: {diff} of {spread}"
            );
        }
    }
}
