//! A differentiable llama-family forward pass over padded batches or packed sequences.
//!
//! candle's fused `softmax_last_dim`, `rms_norm` and rope kernels have no backward. The layers
//! run on this crate's own fused ops ([`crate::kernels`], [`crate::fused`]), each one graph node
//! with a hand-written backward; the basic-op versions of RMS norm, softmax, log-softmax and
//! both rope layouts here check them in tests and compute them off the CPU.
//!
//! Layout conventions:
//! - weights stay in GGUF layout; for llama files the q/k rows are permuted for the interleaved
//!   rope (see [`crate::gguf::Architecture::qk_rows_permuted`]), so interleaved rope is applied;
//! - padding is described by an attention mask `(B, T)`, 1 for real tokens and 0 for padding.
//!   Positions are counted over real tokens only, so both right and left padding work. Padded
//!   queries still attend to themselves, which keeps every softmax row finite (their outputs are
//!   meaningless and must be masked out of any loss).

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, D, DType, Device, Layout, Shape, Storage, Tensor,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{LlamaError, Result};
use crate::fused::KeyPattern;
use crate::gguf::{self, LayerWeights, Linear, LlamaConfig, LlamaWeights, RopeStyle};
use crate::kernels;
use crate::lora::{LoraAdapter, TargetModule};
use crate::pack::PackedSequences;

/// Per-position statistics of the next-token distribution.
#[derive(Debug, Clone)]
pub struct TokenStats {
    /// `(B, T-1)` natural-log probability of `ids[:, t+1]` given `ids[:, ..=t]`; carries gradient.
    pub logprobs: Tensor,
    /// `(B, T-1)` entropy (nats) of the next-token distribution at each position; detached.
    pub entropy: Tensor,
}

/// A llama-family decoder with dense (dequantized) weights.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    weights: LlamaWeights,
    inv_freq: Vec<f32>,
}

impl Llama {
    /// Wraps already loaded weights, checking their shapes against the configuration.
    pub fn new(config: LlamaConfig, weights: LlamaWeights) -> Result<Self> {
        config.validate()?;
        check_shapes(&config, &weights)?;
        let d = config.head_dim;
        // Computed in f32 exactly as GGML and candle do, so that the angles match theirs bit for
        // bit; positions are small integers and exact in f32.
        let inv_freq = (0..d)
            .step_by(2)
            .map(|i| 1f32 / (config.rope_theta as f32).powf(i as f32 / d as f32))
            .collect();
        Ok(Self {
            config,
            weights,
            inv_freq,
        })
    }

    /// Loads a GGUF file and dequantizes its weights to `dtype` on `device`.
    pub fn load(path: impl AsRef<std::path::Path>, device: &Device, dtype: DType) -> Result<Self> {
        let (config, weights) = gguf::load_llama(path, device, dtype)?;
        Self::new(config, weights)
    }

    /// Builds a model with seeded random weights, for tests and toy experiments.
    ///
    /// Linear weights are uniform in `±1/sqrt(in_features)`, the embedding in `±1/sqrt(hidden)`,
    /// norm weights are `1 ± 0.1`; the output projection is tied to the embedding.
    pub fn random(config: LlamaConfig, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        config.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = |shape: (usize, usize), bound: f64| -> Result<Tensor> {
            let data: Vec<f64> = (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
        };
        let c = &config;
        let h = c.hidden_size;
        let lin = |t: Tensor| Linear {
            weight: t,
            bias: None,
        };
        let token_embd = uniform((c.vocab_size, h), 1.0 / (h as f64).sqrt())?;
        let mut layers = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            let inv = |n: usize| 1.0 / (n as f64).sqrt();
            let attn_norm = (uniform((1, h), 0.1)? + 1.0)?.squeeze(0)?;
            let q = lin(uniform((c.q_dim(), h), inv(h))?);
            let k = lin(uniform((c.kv_dim(), h), inv(h))?);
            let v = lin(uniform((c.kv_dim(), h), inv(h))?);
            let o = lin(uniform((h, c.q_dim()), inv(c.q_dim()))?);
            let ffn_norm = (uniform((1, h), 0.1)? + 1.0)?.squeeze(0)?;
            let gate = lin(uniform((c.ffn_hidden, h), inv(h))?);
            let up = lin(uniform((c.ffn_hidden, h), inv(h))?);
            let down = lin(uniform((h, c.ffn_hidden), inv(c.ffn_hidden))?);
            layers.push(LayerWeights {
                attn_norm,
                q,
                k,
                v,
                o,
                ffn_norm,
                gate,
                up,
                down,
            });
        }
        let output_norm = (uniform((1, h), 0.1)? + 1.0)?.squeeze(0)?;
        let weights = LlamaWeights {
            output: token_embd.clone(),
            token_embd,
            layers,
            output_norm,
            tied_embeddings: true,
        };
        Self::new(config, weights)
    }

    /// The model's configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The model's dense weights (GGUF layout).
    pub fn weights(&self) -> &LlamaWeights {
        &self.weights
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.weights.token_embd.device()
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.weights.token_embd.dtype()
    }

    /// Final hidden states `(B, T, hidden)` after the output norm.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t == 0 {
            return Err(LlamaError::InvalidInput("empty sequence".to_string()));
        }
        let (pattern, positions) = self.attention_inputs(b, t, attention_mask)?;
        self.run_layers(ids, &Arc::new(pattern), &positions, adapter)
    }

    /// The decoder over ids `(B, T)` with an attention pattern and a rope position per token;
    /// returns the final hidden states after the output norm.
    fn run_layers(
        &self,
        ids: &Tensor,
        pattern: &Arc<KeyPattern>,
        positions: &[f32],
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.to_dtype(DType::U32)?;
        let (cos, sin) = self.rope_tables(positions, b, t)?;
        let mut x = self
            .weights
            .token_embd
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden_size))?;
        let eps = self.config.rms_eps;
        for (i, layer) in self.weights.layers.iter().enumerate() {
            let h = kernels::rms_norm(&x, &layer.attn_norm, eps)?;
            let attn = self.attention(i, layer, &h, pattern, &cos, &sin, adapter)?;
            x = (x + attn)?;
            let h = kernels::rms_norm(&x, &layer.ffn_norm, eps)?;
            let gate = linear(&h, &layer.gate, adapter, i, TargetModule::GateProj)?;
            let up = linear(&h, &layer.up, adapter, i, TargetModule::UpProj)?;
            let mlp = linear(
                &kernels::swiglu(&gate, &up)?,
                &layer.down,
                adapter,
                i,
                TargetModule::DownProj,
            )?;
            x = (x + mlp)?;
        }
        kernels::rms_norm(&x, &self.weights.output_norm, eps)
    }

    /// Logits `(B, T, vocab)` for input ids `(B, T)`, with an optional LoRA adapter.
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let h = self.hidden_states(ids, attention_mask, adapter)?;
        self.lm_head(&h)
    }

    /// Log-probabilities of each next token and the entropy at each position, `(B, T-1)` each,
    /// computed in f32 whatever the weights' dtype.
    pub fn token_logprobs(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&LoraAdapter>,
    ) -> Result<TokenStats> {
        self.token_logprobs_tempered(ids, attention_mask, adapter, None)
    }

    /// [`Llama::token_logprobs`] under a sampling temperature per sequence: the distribution at
    /// each position is `softmax(logits / temperature)`, the one a sampler at that temperature
    /// draws from, so its log-probs are comparable with the sampler's recorded ones. `None` (or
    /// a temperature of 1) is the model's own distribution. Temperatures must be positive and
    /// finite: a greedy (temperature 0) sample has no distribution to score.
    pub fn token_logprobs_tempered(
        &self,
        ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapter: Option<&LoraAdapter>,
        temperatures: Option<&[f64]>,
    ) -> Result<TokenStats> {
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Err(LlamaError::InvalidInput(
                "token_logprobs needs at least two tokens per sequence".to_string(),
            ));
        }
        if let Some(temps) = temperatures {
            if temps.len() != b {
                return Err(LlamaError::InvalidInput(format!(
                    "{} temperatures for a batch of {b} sequences",
                    temps.len()
                )));
            }
            check_temperatures(temps)?;
        }
        let h = self.hidden_states(ids, attention_mask, adapter)?;
        // The last position predicts nothing we can score, so its logits are never formed.
        let h = h
            .narrow(1, 0, t - 1)?
            .reshape((b * (t - 1), self.config.hidden_size))?;
        let targets: Vec<u32> = ids
            .to_dtype(DType::U32)?
            .narrow(1, 1, t - 1)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        // Multiplying by the inverse (1 in the common case) keeps temperature 1 exact.
        let inv_temp: Vec<f64> = (0..b)
            .flat_map(|row| {
                let temp = temperatures.map_or(1.0, |temps| temps[row]);
                std::iter::repeat_n(1.0 / temp, t - 1)
            })
            .collect();
        let (logprobs, entropy) =
            crate::fused::head_logprobs(&h, &self.weights.output, &targets, &inv_temp)?;
        let logprobs = logprobs.to_dtype(work_dtype(logprobs.dtype()))?;
        Ok(TokenStats {
            logprobs: logprobs.reshape((b, t - 1))?,
            entropy: entropy.reshape((b, t - 1))?,
        })
    }

    /// Log-probs and entropies of sequences packed along their shared prefixes, scored at the
    /// positions `scored[i]` flags for sequence `i` (a flag per predicted token, so one fewer
    /// than its tokens), each under its sampling temperature. Returns `(B, L-1)` tensors for
    /// `B` sequences of at most `L` tokens, zero at unscored positions: the output head, a
    /// fifth of the model's work per token, runs at scored positions only.
    pub fn packed_token_logprobs(
        &self,
        pack: &PackedSequences,
        scored: &[&[bool]],
        adapter: Option<&LoraAdapter>,
        temperatures: &[f64],
    ) -> Result<TokenStats> {
        let b = pack.sequences();
        if scored.len() != b || temperatures.len() != b {
            return Err(LlamaError::InvalidInput(format!(
                "{} score masks and {} temperatures for {b} packed sequences",
                scored.len(),
                temperatures.len()
            )));
        }
        check_temperatures(temperatures)?;
        let width = (0..b).map(|i| pack.chain(i).len()).max().unwrap_or(0);
        if width < 2 {
            return Err(LlamaError::InvalidInput(
                "packed scoring needs a sequence of at least two tokens".to_string(),
            ));
        }
        let n = pack.len();
        let device = self.device();
        let ids = Tensor::from_slice(pack.ids(), (1, n), device)?;
        let pattern = Arc::new(pack.key_pattern()?);
        let h = self
            .run_layers(&ids, &pattern, pack.positions(), adapter)?
            .squeeze(0)?;
        // Row `i * (width - 1) + j` of the result reads element `slot[..]` of the scored values
        // behind a leading zero: 0 for an unscored position, 1 + k for the k-th scored one.
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        let mut inv_temp = Vec::new();
        let mut slot = Vec::with_capacity(b * (width - 1));
        for (i, (flags, &temp)) in scored.iter().zip(temperatures).enumerate() {
            let chain = pack.chain(i);
            let predicted = chain.len().saturating_sub(1);
            if flags.len() != predicted {
                return Err(LlamaError::InvalidInput(format!(
                    "sequence {i} has {} tokens and {} score flags",
                    chain.len(),
                    flags.len()
                )));
            }
            for j in 0..width - 1 {
                if j < predicted && flags[j] {
                    rows.push(chain[j] as u32);
                    slot.push(rows.len() as u32);
                    targets.push(pack.ids()[chain[j + 1]]);
                    inv_temp.push(1.0 / temp);
                } else {
                    slot.push(0);
                }
            }
        }
        let slot = Tensor::from_vec(slot, b * (width - 1), device)?;
        let work = work_dtype(h.dtype());
        let zero = Tensor::zeros(1, work, device)?;
        let (logprobs, entropy) = if rows.is_empty() {
            (zero.clone(), zero)
        } else {
            let n_rows = rows.len();
            let picked = h.index_select(&Tensor::from_vec(rows, n_rows, device)?, 0)?;
            let (lp, ent) =
                crate::fused::head_logprobs(&picked, &self.weights.output, &targets, &inv_temp)?;
            (
                Tensor::cat(&[&zero, &lp.to_dtype(work)?], 0)?,
                Tensor::cat(&[&zero, &ent.to_dtype(work)?], 0)?,
            )
        };
        Ok(TokenStats {
            logprobs: logprobs.index_select(&slot, 0)?.reshape((b, width - 1))?,
            entropy: entropy.index_select(&slot, 0)?.reshape((b, width - 1))?,
        })
    }

    fn lm_head(&self, h: &Tensor) -> Result<Tensor> {
        let (b, t, hidden) = h.dims3()?;
        let logits = frozen_matmul(&h.reshape((b * t, hidden))?, &self.weights.output)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// The causal attention pattern over padded rows and per-token positions `(B, T)`.
    fn attention_inputs(
        &self,
        b: usize,
        t: usize,
        attention_mask: Option<&Tensor>,
    ) -> Result<(KeyPattern, Vec<f32>)> {
        let valid: Vec<bool> = match attention_mask {
            Some(mask) => {
                let (mb, mt) = mask.dims2()?;
                if (mb, mt) != (b, t) {
                    return Err(LlamaError::InvalidInput(format!(
                        "attention mask is {mb}x{mt}, ids are {b}x{t}"
                    )));
                }
                mask.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into_iter()
                    .map(|v| v > 0.0)
                    .collect()
            }
            None => vec![true; b * t],
        };
        let mut positions = vec![0f32; b * t];
        for row in 0..b {
            let mut next = 0f32;
            for q in 0..t {
                positions[row * t + q] = next;
                if valid[row * t + q] {
                    next += 1.0;
                }
            }
        }
        Ok((KeyPattern::causal(&valid, b, t)?, positions))
    }

    /// cos/sin tables `(B, 1, T, head_dim/2)` in the model dtype.
    fn rope_tables(&self, positions: &[f32], b: usize, t: usize) -> Result<(Tensor, Tensor)> {
        let half = self.config.head_dim / 2;
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let dev = self.device();
        let dtype = self.dtype();
        let cos = Tensor::from_vec(cos, (b, 1, t, half), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (b, 1, t, half), dev)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer_idx: usize,
        layer: &LayerWeights,
        x: &Tensor,
        pattern: &Arc<KeyPattern>,
        cos: &Tensor,
        sin: &Tensor,
        adapter: Option<&LoraAdapter>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let rep = nh / nkv;
        let q = linear(x, &layer.q, adapter, layer_idx, TargetModule::QProj)?;
        let k = linear(x, &layer.k, adapter, layer_idx, TargetModule::KProj)?;
        let v = linear(x, &layer.v, adapter, layer_idx, TargetModule::VProj)?;
        let style = c.architecture.rope_style();
        let q = kernels::rope(
            &q.reshape((b, t, nh, hd))?,
            cos,
            sin,
            style,
            1.0 / (hd as f64).sqrt(),
        )?;
        let k = kernels::rope(&k.reshape((b, t, nkv, hd))?, cos, sin, style, 1.0)?;
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        // Grouped-query attention without copying keys and values: the `rep` query heads that
        // share a kv head (head h uses kv head h / rep, as in GGML) are stacked along the time
        // axis, so one pass per kv head serves all of them.
        let q = q.reshape((b, nkv, rep * t, hd))?;
        let out = crate::fused::attention(&q, &k, &v, pattern)?
            .reshape((b, nh, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, nh * hd))?;
        linear(&out, &layer.o, adapter, layer_idx, TargetModule::OProj)
    }
}

/// Sampling temperatures must be positive and finite: a greedy (temperature 0) sample has no
/// distribution to score.
fn check_temperatures(temperatures: &[f64]) -> Result<()> {
    match temperatures.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
        Some(bad) => Err(LlamaError::InvalidInput(format!(
            "temperature {bad} must be a positive finite number"
        ))),
        None => Ok(()),
    }
}

/// f64 stays f64; every other float type is scored in f32.
fn work_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `x @ W^T (+ bias) (+ LoRA delta)` for `x` of shape `(B, T, in)`.
fn linear(
    x: &Tensor,
    lin: &Linear,
    adapter: Option<&LoraAdapter>,
    layer: usize,
    module: TargetModule,
) -> Result<Tensor> {
    let (b, t, input) = x.dims3()?;
    let x2 = x.reshape((b * t, input))?;
    if let Some(adapter) = adapter
        && let Some(pair) = adapter.pair(layer, module)
        && !adapter.drops_out()
        && pair.a.dtype() == x.dtype()
    {
        let y = kernels::lora_linear(
            &x2,
            &lin.weight,
            lin.bias.as_ref(),
            pair.a.as_tensor(),
            pair.b.as_tensor(),
            adapter.scale(),
        )?;
        let out = y.dim(1)?;
        return Ok(y.reshape((b, t, out))?);
    }
    let mut y = frozen_matmul(&x2, &lin.weight)?;
    if let Some(bias) = &lin.bias {
        y = y.broadcast_add(bias)?;
    }
    if let Some(adapter) = adapter
        && let Some(delta) = adapter.forward_delta(layer, module, &x2)?
    {
        y = (y + delta)?;
    }
    let out = y.dim(1)?;
    Ok(y.reshape((b, t, out))?)
}

/// `x @ weight^T` for `x: (m, k)` and a frozen `weight: (n, k)`.
///
/// candle's matmul backward always forms the gradient of both operands, so a plain matmul
/// against a frozen weight would compute (and allocate) a full weight gradient in every layer
/// that is then thrown away: about as much work as the forward pass itself. This op's backward
/// returns only the input's gradient, `grad @ weight`.
pub(crate) fn frozen_matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let (_, k) = x.dims2()?;
    let (_, k2) = weight.dims2()?;
    if k != k2 || x.dtype() != weight.dtype() || !x.device().same_device(weight.device()) {
        return Err(LlamaError::InvalidInput(format!(
            "cannot multiply {:?} {:?} by the transpose of {:?} {:?}",
            x.dims(),
            x.dtype(),
            weight.dims(),
            weight.dtype()
        )));
    }
    Ok(x.apply_op1(FrozenMatmul {
        weight: weight.clone(),
    })?)
}

struct FrozenMatmul {
    weight: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, layout: &Layout) -> candle_core::Result<(usize, usize, usize, Layout)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, _) = self.weight.dims2()?;
        Ok((m, n, k, self.weight.layout().transpose(0, 1)?))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, w_t) = self.dims(layout)?;
        let (w, _) = self.weight.storage_and_layout();
        let Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen-matmul: the weight is not on the CPU")
        };
        Ok((
            storage.matmul(w, (1, m, n, k), layout, &w_t)?,
            Shape::from((m, n)),
        ))
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (m, n, k, w_t) = self.dims(layout)?;
        let (w, _) = self.weight.storage_and_layout();
        let Storage::Cuda(w) = &*w else {
            candle_core::bail!("frozen-matmul: the weight is not on the GPU")
        };
        Ok((
            storage.matmul(w, (1, m, n, k), layout, &w_t)?,
            Shape::from((m, n)),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// RMS norm over the last dimension: `x / sqrt(mean(x^2) + eps) * weight`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    // Low-precision inputs are normalised in f32, as GGML does, to keep the mean of squares exact.
    let work = if dtype == DType::F64 {
        x.clone()
    } else {
        x.to_dtype(DType::F32)?
    };
    let inv_rms = (work.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = work.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(weight)?)
}

/// Softmax over the last dimension, stabilised by subtracting the (detached) row maximum; the
/// reference the fused attention's softmax is checked against.
#[cfg(test)]
pub(crate) fn softmax_last(x: &Tensor) -> Result<Tensor> {
    // The shift does not change the value, so its gradient is zero and detaching it is exact;
    // it also keeps the max reduction out of the backward graph.
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Log-softmax over the last dimension: `x - max - log(sum(exp(x - max)))`.
pub(crate) fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Applies a rotary embedding to `x` of shape `(B, H, T, D)` with `cos`/`sin` of shape
/// `(B, 1, T, D/2)`.
pub(crate) fn apply_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    let half = d / 2;
    match style {
        RopeStyle::Interleaved => {
            let x = x.reshape((b, h, t, half, 2))?;
            let x0 = x.narrow(D::Minus1, 0, 1)?;
            let x1 = x.narrow(D::Minus1, 1, 1)?;
            let cos = cos.unsqueeze(D::Minus1)?;
            let sin = sin.unsqueeze(D::Minus1)?;
            let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Ok(Tensor::cat(&[y0, y1], D::Minus1)?.reshape((b, h, t, d))?)
        }
        RopeStyle::Half => {
            let x0 = x.narrow(D::Minus1, 0, half)?;
            let x1 = x.narrow(D::Minus1, half, half)?;
            let y0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
            let y1 = (x0.broadcast_mul(sin)? + x1.broadcast_mul(cos)?)?;
            Ok(Tensor::cat(&[y0, y1], D::Minus1)?)
        }
    }
}

fn check_shapes(c: &LlamaConfig, w: &LlamaWeights) -> Result<()> {
    let expect = |name: &str, t: &Tensor, dims: &[usize]| -> Result<()> {
        if t.dims() != dims {
            return Err(LlamaError::InvalidInput(format!(
                "{name} has shape {:?}, expected {dims:?}",
                t.dims()
            )));
        }
        Ok(())
    };
    let h = c.hidden_size;
    expect("token_embd", &w.token_embd, &[c.vocab_size, h])?;
    expect("output", &w.output, &[c.vocab_size, h])?;
    expect("output_norm", &w.output_norm, &[h])?;
    if w.layers.len() != c.n_layer {
        return Err(LlamaError::InvalidInput(format!(
            "{} layers, config says {}",
            w.layers.len(),
            c.n_layer
        )));
    }
    for (i, l) in w.layers.iter().enumerate() {
        expect(&format!("blk.{i}.attn_norm"), &l.attn_norm, &[h])?;
        expect(&format!("blk.{i}.ffn_norm"), &l.ffn_norm, &[h])?;
        for module in TargetModule::ALL {
            let lin = match module {
                TargetModule::QProj => &l.q,
                TargetModule::KProj => &l.k,
                TargetModule::VProj => &l.v,
                TargetModule::OProj => &l.o,
                TargetModule::GateProj => &l.gate,
                TargetModule::UpProj => &l.up,
                TargetModule::DownProj => &l.down,
            };
            let (input, out) = module.in_out(c);
            let name = format!("blk.{i}.{}", module.gguf_name());
            expect(&name, &lin.weight, &[out, input])?;
            if let Some(bias) = &lin.bias {
                expect(&format!("{name}.bias"), bias, &[out])?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{Architecture, GgufFile};
    use crate::lora::{LoraAdapter, LoraConfig};
    use crate::test_support::{cpu, randomize_b, real_model_path, tiny_config};
    use candle_core::Module;
    use candle_core::quantized::QMatMul;
    use candle_core::quantized::gguf_file::Value;

    /// An independent reference built from candle's own quantized matmul and fused kernels
    /// (rms_norm, rope_i, softmax_last_dim) and a plain repeat-kv, as candle's quantized llama
    /// does it. With `dequantize` the matmuls use dense weights instead.
    fn reference_logprobs(path: &std::path::Path, ids: &[u32], dequantize: bool) -> Vec<Vec<f32>> {
        let dev = cpu();
        let mut f = GgufFile::open(path).unwrap();
        let c = f.config().unwrap();
        let mm = |f: &mut GgufFile, name: &str| {
            let q = f.qtensor(name).unwrap();
            if dequantize {
                QMatMul::Tensor(q.dequantize(&cpu()).unwrap())
            } else {
                QMatMul::from_qtensor(q).unwrap()
            }
        };
        let dense = |f: &mut GgufFile, name: &str| f.dense(name, &cpu(), DType::F32).unwrap();
        let t = ids.len();
        let embd_q = mm(&mut f, "token_embd.weight");
        let embd = dense(&mut f, "token_embd.weight");
        let ids_t = Tensor::new(ids, &dev).unwrap();
        let mut x = embd.index_select(&ids_t, 0).unwrap().unsqueeze(0).unwrap();
        let d = c.head_dim;
        let inv: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1f32 / (c.rope_theta as f32).powf(i as f32 / d as f32))
            .collect();
        let inv = Tensor::new(inv.as_slice(), &dev)
            .unwrap()
            .reshape((1, d / 2))
            .unwrap();
        let pos = Tensor::arange(0u32, t as u32, &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .reshape((t, 1))
            .unwrap();
        let angles = pos.matmul(&inv).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), &dev).unwrap();
        let eps = c.rms_eps as f32;
        let (nh, nkv) = (c.n_head, c.n_kv_head);
        for i in 0..c.n_layer {
            let lin = |f: &mut GgufFile, stem: &str| mm(f, &format!("blk.{i}.{stem}.weight"));
            let attn_norm = dense(&mut f, &format!("blk.{i}.attn_norm.weight"));
            let ffn_norm = dense(&mut f, &format!("blk.{i}.ffn_norm.weight"));
            let h = candle_nn::ops::rms_norm(&x, &attn_norm, eps).unwrap();
            let heads = |y: Tensor, n: usize| {
                y.reshape((1, t, n, d))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
                    .contiguous()
                    .unwrap()
            };
            let q = heads(lin(&mut f, "attn_q").forward(&h).unwrap(), nh);
            let k = heads(lin(&mut f, "attn_k").forward(&h).unwrap(), nkv);
            let v = heads(lin(&mut f, "attn_v").forward(&h).unwrap(), nkv);
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin).unwrap();
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin).unwrap();
            let rep = nh / nkv;
            let repeat = |y: Tensor| {
                y.unsqueeze(2)
                    .unwrap()
                    .broadcast_as((1, nkv, rep, t, d))
                    .unwrap()
                    .reshape((1, nh, t, d))
                    .unwrap()
            };
            let (k, v) = (repeat(k), repeat(v));
            let att = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
            let att = att.broadcast_add(&mask).unwrap();
            let att = candle_nn::ops::softmax_last_dim(&att).unwrap();
            let y = att
                .matmul(&v)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((1, t, nh * d))
                .unwrap();
            x = (x + lin(&mut f, "attn_output").forward(&y).unwrap()).unwrap();
            let h = candle_nn::ops::rms_norm(&x, &ffn_norm, eps).unwrap();
            let g = lin(&mut f, "ffn_gate").forward(&h).unwrap();
            let u = lin(&mut f, "ffn_up").forward(&h).unwrap();
            let m = lin(&mut f, "ffn_down")
                .forward(&(candle_nn::ops::silu(&g).unwrap() * u).unwrap())
                .unwrap();
            x = (x + m).unwrap();
        }
        let norm = dense(&mut f, "output_norm.weight");
        let h = candle_nn::ops::rms_norm(&x, &norm, eps).unwrap();
        let logits = embd_q.forward(&h).unwrap();
        candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    }

    fn vocab_ids(path: &std::path::Path, words: &[&str]) -> Vec<u32> {
        let f = GgufFile::open(path).unwrap();
        let Some(Value::Array(tokens)) = f.metadata().get("tokenizer.ggml.tokens") else {
            panic!("no vocabulary in the GGUF");
        };
        words
            .iter()
            .map(|w| {
                tokens
                    .iter()
                    .position(|t| matches!(t, Value::String(s) if s == w))
                    .unwrap_or_else(|| panic!("{w} is not a single token")) as u32
            })
            .collect()
    }

    #[test]
    fn f32_forward_reproduces_candles_quantized_model() {
        let path = real_model_path();
        let ids = vocab_ids(&path, &["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]);
        let paris = vocab_ids(&path, &["ĠParis"])[0];
        let model = Llama::load(&path, &cpu(), DType::F32).unwrap();
        let t = ids.len();
        let input = Tensor::new(ids.as_slice(), &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&input, None, None).unwrap();
        let ours = log_softmax_last(&logits).unwrap().squeeze(0).unwrap();
        let ours = ours.to_vec2::<f32>().unwrap();
        let dense_ref = reference_logprobs(&path, &ids, true);
        let quant_ref = reference_logprobs(&path, &ids, false);
        let argmax = |row: &[f32]| {
            row.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(i, _)| i as u32)
                .unwrap()
        };
        assert_eq!(
            argmax(&ours[t - 1]),
            paris,
            "our greedy continuation is not Paris"
        );
        assert_eq!(argmax(&quant_ref[t - 1]), paris);
        // Gaps: on the log-probs of the actual next tokens, on the plausible part (logp > -10)
        // of the last position's distribution, and KL(reference || ours) there.
        let gap = |r: &[Vec<f32>]| {
            let mut next = 0f32;
            for p in 0..t - 1 {
                next = next.max((ours[p][ids[p + 1] as usize] - r[p][ids[p + 1] as usize]).abs());
            }
            let last = ours[t - 1]
                .iter()
                .zip(&r[t - 1])
                .filter(|(_, b)| **b > -10.0)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let kl: f64 = ours[t - 1]
                .iter()
                .zip(&r[t - 1])
                .map(|(a, b)| f64::from(*b).exp() * f64::from(b - a))
                .sum();
            (next, last, kl)
        };
        let (dense_next, dense_last, dense_kl) = gap(&dense_ref);
        let (quant_next, quant_last, quant_kl) = gap(&quant_ref);
        let ours_paris = ours[t - 1][paris as usize];
        let quant_paris = quant_ref[t - 1][paris as usize];
        println!(
            "log-prob gap vs candle dense reference: next-token max {dense_next:.2e}, \
             last-position max {dense_last:.2e}, KL {dense_kl:.1e}; vs candle quantized \
             (Q8_1 activations) reference: next-token max {quant_next:.3}, last-position \
             max {quant_last:.3}, KL {quant_kl:.1e}; logp(Paris) ours {ours_paris:.4} \
             quantized {quant_paris:.4}"
        );
        // Same weights, different kernels: only float rounding may differ.
        assert!(
            dense_next < 1e-3 && dense_last < 1e-3,
            "{dense_next} {dense_last}"
        );
        // The quantized path also rounds activations to 8 bits, so a small gap remains.
        assert!(
            quant_next < 0.15 && quant_last < 0.5,
            "{quant_next} {quant_last}"
        );
        assert!(quant_kl < 0.02, "{quant_kl}");
    }

    #[test]
    fn padding_left_or_right_does_not_change_log_probs() {
        let model = Llama::random(tiny_config(Architecture::Llama), 3, &cpu(), DType::F32).unwrap();
        let a = [5u32, 9, 2, 33, 7];
        let b = [1u32, 4, 60];
        let single = |s: &[u32]| {
            let ids = Tensor::new(s, &cpu()).unwrap().unsqueeze(0).unwrap();
            model
                .token_logprobs(&ids, None, None)
                .unwrap()
                .logprobs
                .squeeze(0)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (la, lb) = (single(&a), single(&b));
        // Right-pad b and left-pad b in two batches with a.
        let right = Tensor::new(&[a, [1, 4, 60, 0, 0]], &cpu()).unwrap();
        let right_mask = Tensor::new(&[[1u8; 5], [1, 1, 1, 0, 0]], &cpu()).unwrap();
        let out = model
            .token_logprobs(&right, Some(&right_mask), None)
            .unwrap();
        let out = out.logprobs.to_vec2::<f32>().unwrap();
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&out[0], &la));
        assert!(close(&out[1][..2], &lb));
        let left = Tensor::new(&[a, [0, 0, 1, 4, 60]], &cpu()).unwrap();
        let left_mask = Tensor::new(&[[1u8; 5], [0, 0, 1, 1, 1]], &cpu()).unwrap();
        let out = model.token_logprobs(&left, Some(&left_mask), None).unwrap();
        let out = out.logprobs.to_vec2::<f32>().unwrap();
        assert!(close(&out[0], &la));
        assert!(close(&out[1][2..], &lb));
        assert!(out.iter().flatten().all(|v| v.is_finite()));
    }

    #[test]
    fn packed_sequences_score_and_differentiate_as_if_run_alone() {
        let model = Llama::random(tiny_config(Architecture::Llama), 5, &cpu(), DType::F32).unwrap();
        let lora = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: TargetModule::ALL.to_vec(),
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::new(lora, model.config(), &cpu(), DType::F32).unwrap();
        randomize_b(&adapter, 9);
        // Two sequences sharing a four-token prefix, a repeat of the first, and one sharing
        // nothing; sampled at different temperatures.
        let seqs: [&[u32]; 4] = [
            &[5, 9, 2, 33, 7, 1, 8],
            &[5, 9, 2, 33, 40, 41],
            &[5, 9, 2, 33, 7, 1, 8],
            &[3, 12, 6],
        ];
        let temps = [1.0, 0.7, 1.0, 1.3];
        let flags: Vec<Vec<bool>> = seqs
            .iter()
            .map(|s| (0..s.len() - 1).map(|j| j % 3 != 1).collect())
            .collect();
        let flag_refs: Vec<&[bool]> = flags.iter().map(Vec::as_slice).collect();
        let pack = PackedSequences::new(&seqs).unwrap();
        assert_eq!(pack.len(), 7 + 2 + 3);
        let packed = model
            .packed_token_logprobs(&pack, &flag_refs, Some(&adapter), &temps)
            .unwrap();
        let mut packed_rows = packed.logprobs.to_vec2::<f32>().unwrap();
        let packed_grads = packed.logprobs.sum_all().unwrap().backward().unwrap();

        // Each sequence alone, through the padded path, summed over its flagged positions.
        let mut total: Option<Tensor> = None;
        for ((seq, flags), temp) in seqs.iter().zip(&flags).zip(temps) {
            let ids = Tensor::new(*seq, &cpu()).unwrap().unsqueeze(0).unwrap();
            let alone = model
                .token_logprobs_tempered(&ids, None, Some(&adapter), Some(&[temp]))
                .unwrap()
                .logprobs
                .squeeze(0)
                .unwrap();
            let weights: Vec<f32> = flags.iter().map(|&f| f32::from(u8::from(f))).collect();
            let scored = (&alone * Tensor::new(weights.as_slice(), &cpu()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            total = Some(match total {
                Some(t) => (t + scored).unwrap(),
                None => scored,
            });
            let row = packed_rows.remove(0);
            let alone = alone.to_vec1::<f32>().unwrap();
            for (j, &flag) in flags.iter().enumerate() {
                let expected = if flag { alone[j] } else { 0.0 };
                assert!(
                    (row[j] - expected).abs() < 1e-5,
                    "{seq:?} {j}: {} vs {expected}",
                    row[j]
                );
            }
            assert!(row[flags.len()..].iter().all(|&v| v == 0.0));
        }
        let alone_grads = total.unwrap().backward().unwrap();
        let mut largest = 0f32;
        for var in adapter.vars() {
            let a = packed_grads.get(var.as_tensor()).unwrap();
            let b = alone_grads.get(var.as_tensor()).unwrap();
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() <= 1e-4 * scale.max(1.0));
            largest = largest.max(scale);
        }
        assert!(
            largest > 1e-3,
            "the gradients compared must not all be zero"
        );
    }

    #[test]
    fn hand_written_softmax_and_norm_match_candles_kernels() {
        let x = Tensor::randn(0f32, 3.0, (3, 7, 11), &cpu()).unwrap();
        let w = Tensor::randn(1f32, 0.1, 11, &cpu()).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        let sm = candle_nn::ops::softmax_last_dim(&x).unwrap();
        assert!(diff(&softmax_last(&x).unwrap(), &sm) < 1e-6);
        let lsm = candle_nn::ops::log_softmax(&x, D::Minus1).unwrap();
        assert!(diff(&log_softmax_last(&x).unwrap(), &lsm) < 1e-5);
        let rn = candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap();
        assert!(diff(&rms_norm(&x, &w, 1e-5).unwrap(), &rn) < 1e-5);
        let (cos, sin) = (
            Tensor::randn(0f32, 1.0, (7, 3), &cpu()).unwrap(),
            Tensor::randn(0f32, 1.0, (7, 3), &cpu()).unwrap(),
        );
        let q = Tensor::randn(0f32, 1.0, (2, 4, 7, 6), &cpu()).unwrap();
        let c4 = cos
            .unsqueeze(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((2, 1, 7, 3))
            .unwrap();
        let s4 = sin
            .unsqueeze(0)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((2, 1, 7, 3))
            .unwrap();
        let ours = apply_rope(&q, &c4, &s4, RopeStyle::Interleaved).unwrap();
        let theirs = candle_nn::rotary_emb::rope_i(&q, &cos, &sin).unwrap();
        assert!(diff(&ours, &theirs) < 1e-6);
        let ours = apply_rope(&q, &c4, &s4, RopeStyle::Half).unwrap();
        let theirs = candle_nn::rotary_emb::rope(&q, &cos, &sin).unwrap();
        assert!(diff(&ours, &theirs) < 1e-6);
    }

    #[test]
    fn real_model_forward_backward_timing_256_tokens() {
        let path = real_model_path();
        let model = Llama::load(&path, &cpu(), DType::F32).unwrap();
        let lora = LoraConfig {
            targets: crate::lora::TargetModule::ALL.to_vec(),
            ..LoraConfig::default()
        };
        let adapter = LoraAdapter::new(lora, model.config(), &cpu(), DType::F32).unwrap();
        let ids: Vec<u32> = (0..256u32).map(|i| (i * 7919 + 13) % 49152).collect();
        let ids = Tensor::new(ids.as_slice(), &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let t0 = std::time::Instant::now();
        let stats = model.token_logprobs(&ids, None, Some(&adapter)).unwrap();
        let loss = stats.logprobs.sum_all().unwrap();
        let fwd = t0.elapsed();
        let t1 = std::time::Instant::now();
        let grads = loss.backward().unwrap();
        let bwd = t1.elapsed();
        let t2 = std::time::Instant::now();
        let plain = model.token_logprobs(&ids, None, None).unwrap();
        let base_fwd = t2.elapsed();
        let n_with_grad = adapter
            .vars()
            .iter()
            .filter(|v| grads.get(v.as_tensor()).is_some())
            .count();
        println!(
            "real model, 1x256 tokens, LoRA r=8 on all 7 projections: forward {:.2}s, \
             backward {:.2}s; base forward without adapter {:.2}s",
            fwd.as_secs_f64(),
            bwd.as_secs_f64(),
            base_fwd.as_secs_f64()
        );
        assert_eq!(n_with_grad, adapter.vars().len());
        let d = (stats.logprobs - plain.logprobs)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(
            d.to_scalar::<f32>().unwrap(),
            0.0,
            "a zero-B adapter must change nothing"
        );
    }
}
