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
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp3, D, DType, Layout, Shape, Storage, Tensor,
};

use crate::error::Result;

/// The working precision: f64 stays f64 (gradient checks), everything else runs in f32.
fn work_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// A result computed ahead of the op, handed to candle as the op's output.
struct Precomputed(Tensor);

impl Precomputed {
    fn new(t: Tensor) -> Result<Self> {
        // A fresh contiguous tensor starting at offset 0 owns exactly its elements, so its
        // storage can be copied out as is.
        let t = if t.is_contiguous() && t.layout().start_offset() == 0 {
            t
        } else {
            t.copy()?
        };
        Ok(Self(t))
    }

    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let (storage, layout) = self.0.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("fused op: the precomputed result is not on the CPU"),
        }
    }

    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        let (storage, layout) = self.0.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("fused op: the precomputed result is not on the GPU"),
        }
    }
}

/// `softmax(q kᵀ + bias) v` for grouped queries.
///
/// `q` is `(B, KV, R·T, D)`: the `R` query heads sharing each of the `KV` key/value heads,
/// stacked along the time axis and already scaled by `1/sqrt(D)`; `k` and `v` are
/// `(B, KV, T, D)`; `bias` is `(B, 1, T, T)` with 0 for allowed and `-inf` for masked pairs
/// (every row must allow at least one key). Returns `(B, KV, R·T, D)`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let work = work_dtype(q);
    let (out, lse) = {
        let (q, k, v) = (
            q.detach().to_dtype(work)?,
            k.detach().to_dtype(work)?,
            v.detach().to_dtype(work)?,
        );
        let bias = bias.to_dtype(work)?;
        let s = masked_scores(&q, &k, &bias)?;
        let max = s.max_keepdim(D::Minus1)?;
        let e = s.broadcast_sub(&max)?.exp()?;
        let sum = e.sum_keepdim(D::Minus1)?;
        (e.broadcast_div(&sum)?.matmul(&v)?, (max + sum.log()?)?)
    };
    let op = Attention {
        out: Precomputed::new(out.to_dtype(q.dtype())?)?,
        lse,
        bias: bias.detach(),
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

struct Attention {
    out: Precomputed,
    /// `(B, KV, R·T, 1)` log-sum-exp of each row of masked scores.
    lse: Tensor,
    bias: Tensor,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "lean-attention"
    }

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
        let bias = self.bias.to_dtype(work)?;
        let p = masked_scores(&qw, &kw, &bias)?
            .broadcast_sub(&self.lse)?
            .exp()?;
        let dv = p.t()?.matmul(&gw)?;
        let dp = gw.matmul(&vw.t()?)?;
        let row = (&gw * &ow)?.sum_keepdim(D::Minus1)?;
        let ds = (p * dp.broadcast_sub(&row)?)?;
        let dq = ds.matmul(&kw)?;
        let dk = ds.t()?.matmul(&qw)?;
        Ok((
            Some(dq.to_dtype(q.dtype())?),
            Some(dk.to_dtype(k.dtype())?),
            Some(dv.to_dtype(v.dtype())?),
        ))
    }
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

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        self.out.cuda()
    }

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

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn lean_attention_matches_basic_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        let (b, kv, rep, t, d) = (2, 2, 3, 5, 4);
        let q = Var::randn(0f64, 1.0, (b, kv, rep * t, d), &dev).unwrap();
        let k = Var::randn(0f64, 1.0, (b, kv, t, d), &dev).unwrap();
        let v = Var::randn(0f64, 1.0, (b, kv, t, d), &dev).unwrap();
        // Causal, with the second sequence left-padded by two positions.
        let mut bias = vec![0f64; b * t * t];
        for row in 0..b {
            for i in 0..t {
                for j in 0..t {
                    let padded = row == 1 && j < 2;
                    if !(j == i || (j < i && !padded)) {
                        bias[(row * t + i) * t + j] = f64::NEG_INFINITY;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(bias, (b, 1, t, t), &dev).unwrap();
        let weights = Tensor::randn(0f64, 1.0, (b, kv, rep * t, d), &dev).unwrap();
        let reference = softmax_last(&masked_scores(&q, &k, &bias).unwrap())
            .unwrap()
            .matmul(&v)
            .unwrap();
        let lean = attention(&q, &k, &v, &bias).unwrap();
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
