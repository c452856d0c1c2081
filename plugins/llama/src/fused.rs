//! Memory-lean differentiable attention and output head.
//!
//! Built from basic ops, attention keeps five `T × T` tensors per head and layer alive for the
//! backward pass (scores, masked scores, shifted scores, their exponentials, probabilities), and
//! the output head keeps four `T × vocab` tensors: for a 1,000-token episode on SmolLM2-135M
//! that is about 20 GB at two sequences per micro-batch. These ops compute their forward pass on
//! detached inputs, keep only what the backward pass cannot cheaply recompute (attention: the
//! output and a log-sum-exp per row; the head: nothing beyond its input), and recompute the rest
//! in the backward pass, as flash attention does. Their results and gradients equal the
//! basic-op versions up to float rounding.
//!
//! Each op is a candle custom op whose forward copies the precomputed result, so it runs on
//! any device the basic ops run on.

use candle_core::backend::BackendStorage;
use std::sync::{Arc, Mutex};

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, D, DType, Layout, Shape, Storage, Tensor,
    WithDType,
};
use num_traits::{Float, NumAssign};
use rayon::prelude::*;

use crate::error::{LlamaError, Result};

/// The working precision: f64 stays f64 (gradient checks), everything else runs in f32.
pub(crate) fn work_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A result computed ahead of the op, handed to candle as the op's output. It is handed over
/// once and then dropped, so the op's graph node does not hold a second copy of its output.
pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(t: Tensor) -> Result<Self> {
        // A fresh contiguous tensor starting at offset 0 owns exactly its elements, so its
        // storage can be copied out as is.
        let t = if t.is_contiguous() && t.layout().start_offset() == 0 {
            t
        } else {
            t.copy()?
        };
        Ok(Self(Mutex::new(Some(t))))
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        self.0
            .lock()
            .ok()
            .and_then(|mut slot| slot.take())
            .ok_or_else(|| candle_core::Error::Msg("fused op: result already taken".to_string()))
    }

    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("fused op: the precomputed result is not on the CPU"),
        }
    }

    pub(crate) fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        let t = self.take()?;
        let (storage, layout) = t.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("fused op: the precomputed result is not on the GPU"),
        }
    }
}

/// Implements a custom op's `cpu_fwd` and `cuda_fwd` (for an op of 1, 2 or 3 inputs) by
/// handing over the op's `out: Precomputed` result.
macro_rules! precomputed_forward {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }

        fn cuda_fwd(
            &self,
            _: &CudaStorage,
            _: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }

        fn cuda_fwd(
            &self,
            _: &CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }

        fn cuda_fwd(
            &self,
            _: &CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
            _: &CudaStorage,
            _: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
}
pub(crate) use precomputed_forward;

/// Which keys each query attends to: for each of the `B·T` query positions, its allowed key
/// positions within its batch row, ascending. Every query must allow at least one key.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyPattern {
    batch: usize,
    len: usize,
    /// `keys[offsets[r]..offsets[r + 1]]` are the keys of query row `r = b·T + t`.
    offsets: Vec<usize>,
    keys: Vec<u32>,
}

impl KeyPattern {
    /// Builds a pattern from each query row's keys, `batch · len` rows in order.
    pub fn from_rows<'a>(
        batch: usize,
        len: usize,
        rows: impl IntoIterator<Item = &'a [u32]>,
    ) -> Result<Self> {
        let mut offsets = vec![0];
        let mut keys = Vec::new();
        for row in rows {
            let sorted = row.windows(2).all(|w| w[0] < w[1]);
            if row.is_empty() || !sorted || row.iter().any(|&k| k as usize >= len) {
                return Err(LlamaError::InvalidInput(format!(
                    "attention row {} must list ascending keys below {len}",
                    offsets.len() - 1
                )));
            }
            keys.extend_from_slice(row);
            offsets.push(keys.len());
        }
        if offsets.len() != batch * len + 1 {
            return Err(LlamaError::InvalidInput(format!(
                "{} attention rows for {batch} x {len} queries",
                offsets.len() - 1
            )));
        }
        Ok(Self {
            batch,
            len,
            offsets,
            keys,
        })
    }

    /// Causal attention over padded rows: a query sees the valid keys before it and itself
    /// (a padded query sees only itself, which keeps its softmax finite).
    pub fn causal(valid: &[bool], batch: usize, len: usize) -> Result<Self> {
        if valid.len() != batch * len {
            return Err(LlamaError::InvalidInput(format!(
                "{} validity flags for {batch} x {len} tokens",
                valid.len()
            )));
        }
        let rows: Vec<Vec<u32>> = (0..batch * len)
            .map(|r| {
                let (row, q) = (r / len, r % len);
                (0..=q)
                    .filter(|&k| k == q || valid[row * len + k])
                    .map(|k| k as u32)
                    .collect()
            })
            .collect();
        Self::from_rows(batch, len, rows.iter().map(Vec::as_slice))
    }

    /// The keys of query `t` of row `b`.
    pub fn keys(&self, b: usize, t: usize) -> &[u32] {
        let r = b * self.len + t;
        &self.keys[self.offsets[r]..self.offsets[r + 1]]
    }

    /// The same pattern as an additive bias `(B, 1, T, T)`: 0 where allowed, `-inf` elsewhere.
    pub fn bias(&self, device: &candle_core::Device, dtype: DType) -> Result<Tensor> {
        let (b, t) = (self.batch, self.len);
        let mut bias = vec![f32::NEG_INFINITY; b * t * t];
        for row in 0..b {
            for q in 0..t {
                for &k in self.keys(row, q) {
                    bias[(row * t + q) * t + k as usize] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?.to_dtype(dtype)?)
    }
}

/// `softmax(q kᵀ + mask) v` for grouped queries, where the mask allows what `pattern` lists.
///
/// `q` is `(B, KV, R·T, D)`: the `R` query heads sharing each of the `KV` key/value heads,
/// stacked along the time axis and already scaled by `1/sqrt(D)`; `k` and `v` are
/// `(B, KV, T, D)`. Returns `(B, KV, R·T, D)`.
///
/// On the CPU a kernel visits allowed pairs only, in parallel over queries (forward) and heads
/// (backward), and keeps no `T × T` tensor; elsewhere the same values come from basic ops.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, pattern: &Arc<KeyPattern>) -> Result<Tensor> {
    let work = work_dtype(q);
    let (b, kv, rt, d) = q.dims4()?;
    let t = k.dim(2)?;
    if (b, t) != (pattern.batch, pattern.len) || rt % t != 0 || k.dims4()? != (b, kv, t, d) {
        return Err(LlamaError::InvalidInput(format!(
            "attention over q {:?}, k {:?} with a {}x{} pattern",
            q.dims(),
            k.dims(),
            pattern.batch,
            pattern.len
        )));
    }
    let (qw, kw, vw) = (
        q.detach().to_dtype(work)?,
        k.detach().to_dtype(work)?,
        v.detach().to_dtype(work)?,
    );
    let shape = AttentionShape {
        heads: kv * (rt / t),
        kv_heads: kv,
        head_dim: d,
    };
    let (out, lse) = if q.device().is_cpu() {
        match work {
            DType::F64 => kernel_forward::<f64>(&qw, &kw, &vw, pattern, shape)?,
            _ => kernel_forward::<f32>(&qw, &kw, &vw, pattern, shape)?,
        }
    } else {
        let bias = pattern.bias(q.device(), work)?;
        let s = masked_scores(&qw, &kw, &bias)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        (e.broadcast_div(&sum)?.matmul(&vw)?, (max + sum.log()?)?)
    };
    let op = Attention {
        out: Precomputed::new(out.to_dtype(q.dtype())?)?,
        lse,
        pattern: Arc::clone(pattern),
        shape,
    };
    Ok(q.apply_op3(k, v, op)?)
}

/// `q kᵀ + bias`, with the bias broadcast over the stacked query heads.
fn masked_scores(q: &Tensor, k: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (b, kv, rt, _) = q.dims4()?;
    let t = k.dim(2)?;
    let rep = rt / t;
    q.matmul(&k.t()?)?
        .reshape((b, kv * rep, t, t))?
        .broadcast_add(bias)?
        .reshape((b, kv, rt, t))
}

#[derive(Debug, Clone, Copy)]
struct AttentionShape {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

struct Attention {
    out: Precomputed,
    /// `(B, KV, R·T, 1)` log-sum-exp of each row of masked scores.
    lse: Tensor,
    pattern: Arc<KeyPattern>,
    shape: AttentionShape,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "lean-attention"
    }

    precomputed_forward!(3);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let work = self.lse.dtype();
        // Detached, so that nothing computed here is kept alive by the returned gradients.
        let d = |t: &Tensor| t.detach().to_dtype(work);
        let (qw, kw, vw, ow, gw) = (d(q)?, d(k)?, d(v)?, d(out)?, d(grad)?);
        let (dq, dk, dv) = if q.device().is_cpu() {
            let inputs = BackwardInputs {
                q: &qw,
                k: &kw,
                v: &vw,
                out: &ow,
                grad: &gw,
                lse: &self.lse,
            };
            let result = match work {
                DType::F64 => kernel_backward::<f64>(&inputs, &self.pattern, self.shape),
                _ => kernel_backward::<f32>(&inputs, &self.pattern, self.shape),
            };
            result.map_err(candle_core::Error::wrap)?
        } else {
            let bias = self
                .pattern
                .bias(q.device(), work)
                .map_err(candle_core::Error::wrap)?;
            let p = masked_scores(&qw, &kw, &bias)?
                .broadcast_sub(&self.lse)?
                .exp()?;
            let dv = p.t()?.matmul(&gw)?;
            let dp = gw.matmul(&vw.t()?)?;
            let row = (&gw * &ow)?.sum_keepdim(D::Minus1)?;
            let ds = (p * dp.broadcast_sub(&row)?)?;
            (ds.matmul(&kw)?, ds.t()?.matmul(&qw)?, dv)
        };
        Ok((
            Some(dq.to_dtype(q.dtype())?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
}

/// A float the CPU attention kernel runs in.
pub(crate) trait KernelFloat:
    Float + NumAssign + WithDType + Send + Sync + std::iter::Sum
{
}
impl KernelFloat for f32 {}
impl KernelFloat for f64 {}

/// `x · y`, in eight independent lanes so that the compiler can vectorise the reduction.
pub(crate) fn dot<F: KernelFloat>(x: &[F], y: &[F]) -> F {
    let mut lanes = [F::zero(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail: F = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .map(|(&a, &b)| a * b)
        .sum();
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            lanes[l] += a[l] * b[l];
        }
    }
    lanes.into_iter().sum::<F>() + tail
}

/// `y += a · x`.
pub(crate) fn axpy<F: KernelFloat>(y: &mut [F], a: F, x: &[F]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

pub(crate) fn host<F: KernelFloat>(t: &Tensor) -> Result<Vec<F>> {
    Ok(t.flatten_all()?.to_vec1::<F>()?)
}

/// Output `(B, KV, R·T, D)` and log-sum-exp `(B, KV, R·T, 1)` of each query row.
fn kernel_forward<F: KernelFloat>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    pattern: &KeyPattern,
    shape: AttentionShape,
) -> Result<(Tensor, Tensor)> {
    let (q_host, k_host, v_host) = (host::<F>(q)?, host::<F>(k)?, host::<F>(v)?);
    let (t, d) = (pattern.len, shape.head_dim);
    let rep = shape.heads / shape.kv_heads;
    let rows = pattern.batch * shape.heads * t;
    let mut out = vec![F::zero(); rows * d];
    let mut lse = vec![F::zero(); rows];
    out.par_chunks_mut(d)
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each_init(Vec::new, |scores, (row, (o, l))| {
            // Query rows are ordered (batch, head, position), head = kv head · R + r.
            let (bh, i) = (row / t, row % t);
            let (b, h) = (bh / shape.heads, bh % shape.heads);
            let kv_row = (b * shape.kv_heads + h / rep) * t;
            let qi = &q_host[row * d..(row + 1) * d];
            let keys = pattern.keys(b, i);
            scores.clear();
            let mut max = F::neg_infinity();
            for &j in keys {
                let start = (kv_row + j as usize) * d;
                let s = dot(qi, &k_host[start..start + d]);
                max = Float::max(max, s);
                scores.push(s);
            }
            let mut sum = F::zero();
            for (s, &j) in scores.iter().zip(keys) {
                let p = Float::exp(*s - max);
                sum += p;
                let start = (kv_row + j as usize) * d;
                axpy(o, p, &v_host[start..start + d]);
            }
            let inv = Float::recip(sum);
            o.iter_mut().for_each(|x| *x *= inv);
            *l = max + Float::ln(sum);
        });
    let dev = q.device();
    let dims = q.dims4()?;
    Ok((
        Tensor::from_vec(out, dims, dev)?,
        Tensor::from_vec(lse, (dims.0, dims.1, dims.2, 1), dev)?,
    ))
}

struct BackwardInputs<'a> {
    q: &'a Tensor,
    k: &'a Tensor,
    v: &'a Tensor,
    out: &'a Tensor,
    grad: &'a Tensor,
    lse: &'a Tensor,
}

/// Gradients of q, k and v. Each query head is one parallel task writing its own rows of `dq`
/// and its own partial `dk`, `dv`; the `R` partials of a kv head are summed afterwards.
fn kernel_backward<F: KernelFloat>(
    inputs: &BackwardInputs<'_>,
    pattern: &KeyPattern,
    shape: AttentionShape,
) -> Result<(Tensor, Tensor, Tensor)> {
    let q = host::<F>(inputs.q)?;
    let k = host::<F>(inputs.k)?;
    let v = host::<F>(inputs.v)?;
    let out = host::<F>(inputs.out)?;
    let grad = host::<F>(inputs.grad)?;
    let lse = host::<F>(inputs.lse)?;
    let (t, d) = (pattern.len, shape.head_dim);
    let rep = shape.heads / shape.kv_heads;
    let head_block = t * d;
    let units = pattern.batch * shape.heads;
    let mut dq = vec![F::zero(); units * head_block];
    let mut dk_part = vec![F::zero(); units * head_block];
    let mut dv_part = vec![F::zero(); units * head_block];
    dq.par_chunks_mut(head_block)
        .zip(dk_part.par_chunks_mut(head_block))
        .zip(dv_part.par_chunks_mut(head_block))
        .enumerate()
        .for_each(|(unit, ((dq_u, dk_u), dv_u))| {
            let (b, h) = (unit / shape.heads, unit % shape.heads);
            let kv_row = (b * shape.kv_heads + h / rep) * t;
            for i in 0..t {
                let row = unit * t + i;
                let span = row * d..(row + 1) * d;
                let (qi, oi, gi) = (&q[span.clone()], &out[span.clone()], &grad[span]);
                let row_dot = dot(gi, oi);
                let dqi = &mut dq_u[i * d..(i + 1) * d];
                for &j in pattern.keys(b, i) {
                    let j = j as usize;
                    let kv_span = (kv_row + j) * d..(kv_row + j + 1) * d;
                    let (kj, vj) = (&k[kv_span.clone()], &v[kv_span]);
                    let p = Float::exp(dot(qi, kj) - lse[row]);
                    axpy(&mut dv_u[j * d..(j + 1) * d], p, gi);
                    let ds = p * (dot(gi, vj) - row_dot);
                    axpy(dqi, ds, kj);
                    axpy(&mut dk_u[j * d..(j + 1) * d], ds, qi);
                }
            }
        });
    let kv_units = pattern.batch * shape.kv_heads;
    let mut dk = vec![F::zero(); kv_units * head_block];
    let mut dv = vec![F::zero(); kv_units * head_block];
    for (kv_unit, (dk_u, dv_u)) in dk
        .chunks_mut(head_block)
        .zip(dv.chunks_mut(head_block))
        .enumerate()
    {
        // Query heads kv·R .. kv·R + R-1 of the same batch row share this kv head.
        for unit in kv_unit * rep..(kv_unit + 1) * rep {
            let part = unit * head_block..(unit + 1) * head_block;
            axpy(dk_u, F::one(), &dk_part[part.clone()]);
            axpy(dv_u, F::one(), &dv_part[part]);
        }
    }
    let dev = inputs.q.device();
    Ok((
        Tensor::from_vec(dq, inputs.q.dims4()?, dev)?,
        Tensor::from_vec(dk, inputs.k.dims4()?, dev)?,
        Tensor::from_vec(dv, inputs.v.dims4()?, dev)?,
    ))
}

/// Rows of the head processed at once: bounds the `rows × vocab` temporaries (256 rows of a
/// 49k vocabulary are 50 MB in f32).
const HEAD_CHUNK: usize = 256;

/// Log-probabilities of `targets` under `softmax(h Wᵀ · inv_temp)` and the (detached) entropy
/// of each row's distribution, for `h: (N, hidden)`, a frozen output projection
/// `weight: (vocab, hidden)`, one target and one inverse temperature per row.
pub fn head_logprobs(
    h: &Tensor,
    weight: &Tensor,
    targets: &[u32],
    inv_temp: &[f64],
) -> Result<(Tensor, Tensor)> {
    let work = work_dtype(h);
    let n = h.dim(0)?;
    let device = h.device();
    let w = weight.to_dtype(work)?;
    let hd = h.detach().to_dtype(work)?;
    let mut logps = Vec::new();
    let mut entropies = Vec::new();
    for start in (0..n).step_by(HEAD_CHUNK) {
        let len = HEAD_CHUNK.min(n - start);
        let scale =
            Tensor::from_slice(&inv_temp[start..start + len], (len, 1), device)?.to_dtype(work)?;
        let logits = hd
            .narrow(0, start, len)?
            .matmul(&w.t()?)?
            .broadcast_mul(&scale)?;
        let logp = crate::model::log_softmax_last(&logits)?;
        let idx = Tensor::from_slice(&targets[start..start + len], (len, 1), device)?;
        logps.push(logp.gather(&idx, 1)?.squeeze(1)?);
        entropies.push((logp.exp()? * &logp)?.sum(1)?.neg()?);
    }
    let logp = Tensor::cat(&logps, 0)?;
    let entropy = Tensor::cat(&entropies, 0)?;
    let op = Head {
        out: Precomputed::new(logp.to_dtype(h.dtype())?)?,
        weight: w,
        targets: targets.to_vec(),
        inv_temp: inv_temp.to_vec(),
    };
    Ok((h.apply_op1(op)?, entropy))
}

struct Head {
    out: Precomputed,
    weight: Tensor,
    targets: Vec<u32>,
    inv_temp: Vec<f64>,
}

impl CustomOp1 for Head {
    fn name(&self) -> &'static str {
        "lean-head"
    }

    precomputed_forward!(1);

    /// `d logp_i / d h_i = s_i g_i (W[y_i] - softmax(s_i h_i Wᵀ) W)` with `s_i` the inverse
    /// temperature, computed chunk by chunk.
    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let work = self.weight.dtype();
        let device = h.device();
        let n = h.dim(0)?;
        let hd = h.detach().to_dtype(work)?;
        let g = grad.detach().to_dtype(work)?;
        let mut parts = Vec::new();
        for start in (0..n).step_by(HEAD_CHUNK) {
            let len = HEAD_CHUNK.min(n - start);
            let scale = Tensor::from_slice(&self.inv_temp[start..start + len], (len, 1), device)?
                .to_dtype(work)?;
            let logits = hd
                .narrow(0, start, len)?
                .matmul(&self.weight.t()?)?
                .broadcast_mul(&scale)?;
            let max = logits.max_keepdim(1)?;
            let e = logits.broadcast_sub(&max)?.exp()?;
            let p = e.broadcast_div(&e.sum_keepdim(1)?)?;
            // The per-row factor s_i g_i.
            let sg = g.narrow(0, start, len)?.unsqueeze(1)?.mul(&scale)?;
            let idx = Tensor::from_slice(&self.targets[start..start + len], len, device)?;
            let picked = self.weight.index_select(&idx, 0)?;
            let expected = p.matmul(&self.weight)?;
            parts.push((picked - expected)?.broadcast_mul(&sg)?);
        }
        Ok(Some(Tensor::cat(&parts, 0)?.to_dtype(h.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::model::{log_softmax_last, softmax_last};
    use crate::test_support::max_diff;

    #[test]
    fn lean_attention_matches_basic_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, kv, rep, t, d) = (2, 2, 3, 5, 4);
        let q = Var::randn(0f64, 1.0, (b, kv, rep * t, d), &dev).unwrap();
        let k = Var::randn(0f64, 1.0, (b, kv, t, d), &dev).unwrap();
        let v = Var::randn(0f64, 1.0, (b, kv, t, d), &dev).unwrap();
        // Causal, with the second sequence left-padded by two positions.
        let valid: Vec<bool> = (0..b * t).map(|r| !(r / t == 1 && r % t < 2)).collect();
        let pattern = Arc::new(KeyPattern::causal(&valid, b, t).unwrap());
        let bias = pattern.bias(&dev, DType::F64).unwrap();
        let weights = Tensor::randn(0f64, 1.0, (b, kv, rep * t, d), &dev).unwrap();
        let reference = softmax_last(&masked_scores(&q, &k, &bias).unwrap())
            .unwrap()
            .matmul(&v)
            .unwrap();
        let lean = attention(&q, &k, &v, &pattern).unwrap();
        assert!(max_diff(&reference, &lean) < 1e-12);
        let g_ref = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_lean = (lean * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in [&q, &k, &v] {
            let (a, b) = (g_ref.get(var).unwrap(), g_lean.get(var).unwrap());
            assert!(max_diff(a, b) < 1e-12, "{}", max_diff(a, b));
        }
    }

    #[test]
    fn lean_head_matches_basic_ops_in_value_entropy_and_gradient() {
        let dev = Device::Cpu;
        // More rows than a chunk, so the chunk seams are exercised.
        let (n, hidden, vocab) = (HEAD_CHUNK + 7, 6, 11);
        let h = Var::randn(0f64, 1.0, (n, hidden), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (vocab, hidden), &dev).unwrap();
        let targets: Vec<u32> = (0..n).map(|i| (i * 7 % vocab) as u32).collect();
        let inv: Vec<f64> = (0..n)
            .map(|i| if i % 2 == 0 { 1.0 } else { 1.0 / 0.3 })
            .collect();
        let scale = Tensor::from_slice(&inv, (n, 1), &dev).unwrap();
        let logp_all = log_softmax_last(
            &h.matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_mul(&scale)
                .unwrap(),
        )
        .unwrap();
        let idx = Tensor::from_slice(&targets, (n, 1), &dev).unwrap();
        let reference = logp_all.gather(&idx, 1).unwrap().squeeze(1).unwrap();
        let ref_entropy = (logp_all.exp().unwrap() * &logp_all)
            .unwrap()
            .sum(1)
            .unwrap()
            .neg()
            .unwrap();
        let (lean, entropy) = head_logprobs(&h, &w, &targets, &inv).unwrap();
        assert!(max_diff(&reference, &lean) < 1e-12);
        assert!(max_diff(&ref_entropy, &entropy) < 1e-12);
        let weights = Tensor::randn(0f64, 1.0, n, &dev).unwrap();
        let g_ref = (reference * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_lean = (lean * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = max_diff(g_ref.get(&h).unwrap(), g_lean.get(&h).unwrap());
        assert!(diff < 1e-12, "{diff}");
    }
}
