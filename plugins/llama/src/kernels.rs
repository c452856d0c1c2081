//! Fused RMS norm, SwiGLU, rope and LoRA-linear ops, each one graph node with its own backward.
//!
//! Written with basic ops, an RMS norm is seven graph nodes, a rope twelve, and each node keeps
//! its output alive until the backward pass and gets its gradient through a fresh zeroed buffer:
//! most of a layer's memory and much of its time went there. Each op here keeps only its
//! inputs, and on the CPU runs a kernel parallel over rows. Off the CPU the same values come
//! from the basic-op versions in [`crate::model`] (forward) and candle's autograd through them
//! (backward).

use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, Var,
};
use num_traits::Float;
use rayon::prelude::*;

use crate::error::{LlamaError, Result};
use crate::fused::{KernelFloat, Precomputed, host, precomputed_forward, work_dtype};
use crate::gguf::RopeStyle;

/// Gradients of `basic` at `inputs` against `grad`, by candle's autograd on detached copies.
fn basic_backward(
    inputs: &[&Tensor],
    grad: &Tensor,
    basic: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> candle_core::Result<Vec<Tensor>> {
    let wrap = candle_core::Error::wrap;
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.detach()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = basic(&tensors).map_err(wrap)?;
    let grads = (y * grad.detach())?.sum_all()?.backward()?;
    vars.iter()
        .map(|v| match grads.get(v.as_tensor()) {
            Some(g) => Ok(g.clone()),
            None => v.zeros_like(),
        })
        .collect()
}

/// Runs a host kernel on `inputs` converted to the working precision and returns its result
/// in `dtype` with `shape`.
fn on_host(
    inputs: &[&Tensor],
    shape: &Shape,
    dtype: DType,
    kernel32: impl Fn(&[Vec<f32>]) -> Vec<f32>,
    kernel64: impl Fn(&[Vec<f64>]) -> Vec<f64>,
) -> Result<Tensor> {
    let device = inputs[0].device();
    let work = work_dtype(inputs[0]);
    let out = if work == DType::F64 {
        let xs = inputs
            .iter()
            .map(|t| host::<f64>(&t.detach().to_dtype(work)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::from_vec(kernel64(&xs), shape, device)?
    } else {
        let xs = inputs
            .iter()
            .map(|t| host::<f32>(&t.detach().to_dtype(work)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::from_vec(kernel32(&xs), shape, device)?
    };
    Ok(out.to_dtype(dtype)?)
}

/// Rows processed per parallel task in the row-wise kernels.
const ROWS_PER_TASK: usize = 16;

/// RMS norm over the last dimension, `x / sqrt(mean(x²) + eps) · weight`, with a frozen weight.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let weight = weight.detach();
    let out = if x.device().is_cpu() {
        rms_norm_host(x, &weight, eps, x, false)?
    } else {
        crate::model::rms_norm(&x.detach(), &weight, eps)?
    };
    Ok(x.apply_op1(RmsNorm {
        weight,
        eps,
        out: Precomputed::new(out)?,
    })?)
}

struct RmsNorm {
    weight: Tensor,
    eps: f64,
    out: Precomputed,
}

fn rms_norm_rows<F: KernelFloat>(x: &[F], w: &[F], eps: f64) -> Vec<F> {
    let h = w.len();
    let eps = F::from(eps).unwrap_or_else(F::zero);
    let mut y = vec![F::zero(); x.len()];
    y.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(x.par_chunks(h * ROWS_PER_TASK))
        .for_each(|(ys, xs)| {
            for (y, x) in ys.chunks_mut(h).zip(xs.chunks(h)) {
                let inv = inv_rms(x, eps);
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * inv * w;
                }
            }
        });
    y
}

fn inv_rms<F: KernelFloat>(x: &[F], eps: F) -> F {
    let n = F::from(x.len()).unwrap_or_else(F::one);
    Float::recip(Float::sqrt(crate::fused::dot(x, x) / n + eps))
}

/// `dx = r (w·dy) - x r³ mean(x·w·dy)` with `r = 1/sqrt(mean(x²) + eps)`.
fn rms_norm_rows_backward<F: KernelFloat>(x: &[F], w: &[F], dy: &[F], eps: f64) -> Vec<F> {
    let h = w.len();
    let n = F::from(h).unwrap_or_else(F::one);
    let eps = F::from(eps).unwrap_or_else(F::zero);
    let mut dx = vec![F::zero(); x.len()];
    dx.par_chunks_mut(h * ROWS_PER_TASK)
        .zip(
            x.par_chunks(h * ROWS_PER_TASK)
                .zip(dy.par_chunks(h * ROWS_PER_TASK)),
        )
        .for_each(|(dxs, (xs, dys))| {
            for ((dx, x), dy) in dxs.chunks_mut(h).zip(xs.chunks(h)).zip(dys.chunks(h)) {
                let r = inv_rms(x, eps);
                let mut projected = F::zero();
                for ((&x, &w), &g) in x.iter().zip(w).zip(dy) {
                    projected += x * w * g;
                }
                let coeff = r * r * r * projected / n;
                for (((dx, &x), &w), &g) in dx.iter_mut().zip(x).zip(w).zip(dy) {
                    *dx = r * w * g - x * coeff;
                }
            }
        });
    dx
}

/// The norm of `x` on the host, or with `backward` the gradient `grad` sends back to `x`.
fn rms_norm_host(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    grad: &Tensor,
    backward: bool,
) -> Result<Tensor> {
    if backward {
        on_host(
            &[x, weight, grad],
            x.shape(),
            x.dtype(),
            |v| rms_norm_rows_backward(&v[0], &v[1], &v[2], eps),
            |v| rms_norm_rows_backward(&v[0], &v[1], &v[2], eps),
        )
    } else {
        on_host(
            &[x, weight],
            x.shape(),
            x.dtype(),
            |v| rms_norm_rows(&v[0], &v[1], eps),
            |v| rms_norm_rows(&v[0], &v[1], eps),
        )
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    precomputed_forward!(1);

    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (weight, eps) = (&self.weight, self.eps);
        if x.device().is_cpu() {
            let dx = rms_norm_host(x, weight, eps, grad, true);
            return dx.map(Some).map_err(candle_core::Error::wrap);
        }
        let mut grads = basic_backward(&[x], grad, |v| crate::model::rms_norm(&v[0], weight, eps))?;
        Ok(grads.pop())
    }
}

/// `silu(gate) · up`.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(LlamaError::InvalidInput(format!(
            "swiglu of {:?} and {:?}",
            gate.dims(),
            up.dims()
        )));
    }
    let out = if gate.device().is_cpu() {
        on_host(
            &[gate, up],
            gate.shape(),
            gate.dtype(),
            |v| swiglu_values(&v[0], &v[1]),
            |v| swiglu_values(&v[0], &v[1]),
        )?
    } else {
        (gate.detach().silu()? * up.detach())?
    };
    Ok(gate.apply_op2(
        up,
        SwiGlu {
            out: Precomputed::new(out)?,
        },
    )?)
}

struct SwiGlu {
    out: Precomputed,
}

/// Elements processed per parallel task in the element-wise kernels.
const ELEMENTS_PER_TASK: usize = 1 << 14;

fn sigmoid<F: KernelFloat>(x: F) -> F {
    Float::recip(F::one() + Float::exp(-x))
}

fn swiglu_values<F: KernelFloat>(gate: &[F], up: &[F]) -> Vec<F> {
    let mut y = vec![F::zero(); gate.len()];
    y.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(
            gate.par_chunks(ELEMENTS_PER_TASK)
                .zip(up.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|(ys, (gs, us))| {
            for ((y, &g), &u) in ys.iter_mut().zip(gs).zip(us) {
                *y = g * sigmoid(g) * u;
            }
        });
    y
}

/// `[d gate; d up]`, concatenated: `d gate = dy·u·σ(g)(1 + g(1 - σ(g)))`, `d up = dy·silu(g)`.
fn swiglu_backward<F: KernelFloat>(gate: &[F], up: &[F], dy: &[F]) -> Vec<F> {
    let n = gate.len();
    let mut out = vec![F::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    dg.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(du.par_chunks_mut(ELEMENTS_PER_TASK))
        .zip(
            gate.par_chunks(ELEMENTS_PER_TASK)
                .zip(up.par_chunks(ELEMENTS_PER_TASK))
                .zip(dy.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|((dgs, dus), ((gs, us), dys))| {
            for ((((dg, du), &g), &u), &d) in dgs.iter_mut().zip(dus).zip(gs).zip(us).zip(dys) {
                let s = sigmoid(g);
                *dg = d * u * s * (F::one() + g * (F::one() - s));
                *du = d * g * s;
            }
        });
    out
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    precomputed_forward!(2);

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        if gate.device().is_cpu() {
            let mut doubled = gate.dims().to_vec();
            doubled.insert(0, 2);
            let both = on_host(
                &[gate, up, grad],
                &Shape::from(doubled),
                gate.dtype(),
                |v| swiglu_backward(&v[0], &v[1], &v[2]),
                |v| swiglu_backward(&v[0], &v[1], &v[2]),
            )
            .map_err(candle_core::Error::wrap)?;
            return Ok((Some(both.get(0)?), Some(both.get(1)?)));
        }
        let mut grads = basic_backward(&[gate, up], grad, |v| Ok((v[0].silu()? * &v[1])?))?;
        let du = grads.pop();
        Ok((grads.pop(), du))
    }
}

/// Rotary embedding of a projection laid out `(B, T, H, D)`, returned as `(B, H, T, D)` times
/// `scale`: the head transpose and the query scaling ride along with the rotation. `cos` and
/// `sin` are `(B, 1, T, D/2)`.
pub fn rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, h, d) = x.dims4()?;
    let (cos, sin) = (cos.detach(), sin.detach());
    let out = if x.device().is_cpu() {
        rope_host(
            x,
            &cos,
            &sin,
            style,
            scale,
            &Shape::from((b, h, t, d)),
            false,
        )?
    } else {
        rope_basic(&x.detach(), &cos, &sin, style, scale)?
    };
    Ok(x.apply_op1(Rope {
        cos,
        sin,
        style,
        scale,
        out: Precomputed::new(out)?,
    })?)
}

fn rope_basic(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
    scale: f64,
) -> Result<Tensor> {
    let x = x.transpose(1, 2)?.contiguous()?;
    Ok((crate::model::apply_rope(&x, cos, sin, style)? * scale)?)
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
    scale: f64,
    out: Precomputed,
}

/// Dimensions of a rope call: time, heads, head size (the batch follows from the length).
#[derive(Clone, Copy)]
struct RopeDims {
    t: usize,
    h: usize,
    d: usize,
}

/// Rotates every head vector by its position's angles (`inverse`: by the negated angles, for
/// the backward pass), times `scale`. The forward pass reads the token-major `(B, T, H, D)`
/// layout and writes the head-major `(B, H, T, D)` one; the backward pass the other way round.
fn rope_values<F: KernelFloat>(
    x: &[F],
    cos: &[F],
    sin: &[F],
    dims: RopeDims,
    style: RopeStyle,
    scale: F,
    inverse: bool,
) -> Vec<F> {
    let RopeDims { t, h, d } = dims;
    let half = d / 2;
    let token_major = |bi: usize, hi: usize, ti: usize| ((bi * t + ti) * h + hi) * d;
    let mut y = vec![F::zero(); x.len()];
    // One task per (batch, head) writes that head's (T, D) block of the head-major layout.
    y.par_chunks_mut(t * d).enumerate().for_each(|(bh, block)| {
        let (bi, hi) = (bh / h, bh % h);
        for (ti, out) in block.chunks_mut(d).enumerate() {
            let from = if inverse {
                (bh * t + ti) * d
            } else {
                token_major(bi, hi, ti)
            };
            let src = &x[from..from + d];
            let angles = (bi * t + ti) * half;
            for i in 0..half {
                let (c, sn) = (cos[angles + i], sin[angles + i]);
                let sn = if inverse { -sn } else { sn };
                let (a, z) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Half => (i, i + half),
                };
                let (x0, x1) = (src[a], src[z]);
                out[a] = (x0 * c - x1 * sn) * scale;
                out[z] = (x0 * sn + x1 * c) * scale;
            }
        }
    });
    if !inverse {
        return y;
    }
    // The gradient goes back to the token-major layout of the op's input.
    let mut out = vec![F::zero(); x.len()];
    for (bh, block) in y.chunks(t * d).enumerate() {
        let (bi, hi) = (bh / h, bh % h);
        for (ti, row) in block.chunks(d).enumerate() {
            let to = token_major(bi, hi, ti);
            out[to..to + d].copy_from_slice(row);
        }
    }
    out
}

/// The rope of `x` on the host (token-major in, head-major out), or with `inverse` the
/// gradient of a head-major `x` sent back to the token-major input, shaped `shape`.
fn rope_host(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    style: RopeStyle,
    scale: f64,
    shape: &Shape,
    inverse: bool,
) -> Result<Tensor> {
    let (_, h, t, d) = if inverse {
        x.dims4()?
    } else {
        let (b, t, h, d) = x.dims4()?;
        (b, h, t, d)
    };
    let dims = RopeDims { t, h, d };
    on_host(
        &[x, cos, sin],
        shape,
        x.dtype(),
        |v| rope_values(&v[0], &v[1], &v[2], dims, style, scale as f32, inverse),
        |v| rope_values(&v[0], &v[1], &v[2], dims, style, scale, inverse),
    )
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    precomputed_forward!(1);

    /// A rotation's transpose is the rotation by the negated angles.
    fn bwd(&self, x: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (cos, sin, style, scale) = (&self.cos, &self.sin, self.style, self.scale);
        if x.device().is_cpu() {
            let dx = rope_host(&grad.contiguous()?, cos, sin, style, scale, x.shape(), true)
                .map_err(candle_core::Error::wrap)?;
            return Ok(Some(dx));
        }
        let mut grads = basic_backward(&[x], grad, |v| rope_basic(&v[0], cos, sin, style, scale))?;
        Ok(grads.pop())
    }
}

/// `x Wᵀ (+ bias) + scale · (x Aᵀ) Bᵀ` for `x: (N, in)`, a frozen `weight: (out, in)` and
/// LoRA factors `a: (r, in)`, `b: (out, r)`. One graph node instead of six: it keeps no
/// output-sized intermediate for the backward pass, which recomputes the rank-r product.
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let xd = x.detach();
    let mut y = (xd.matmul(&weight.t()?)? + ((xd.matmul(&a.t()?)? * scale)?.matmul(&b.t()?))?)?;
    if let Some(bias) = bias {
        y = y.broadcast_add(bias)?;
    }
    let op = LoraLinear {
        weight: weight.detach(),
        scale,
        out: Precomputed::new(y)?,
    };
    Ok(x.apply_op3(a, b, op)?)
}

struct LoraLinear {
    weight: Tensor,
    scale: f64,
    out: Precomputed,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    precomputed_forward!(3);

    /// With `g` the output gradient and `gb = scale · g B`: `dx = g W + gb A`,
    /// `dA = gbᵀ x`, `dB = gᵀ (scale · x Aᵀ)`.
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, g) = (x.detach(), a.detach(), b.detach(), grad.detach());
        let gb = (g.matmul(&b)? * self.scale)?;
        let dx = (g.matmul(&self.weight)? + gb.matmul(&a)?)?;
        let da = gb.t()?.matmul(&x)?;
        let db = g.t()?.matmul(&(x.matmul(&a.t()?)? * self.scale)?)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;
    use crate::test_support::max_diff;

    /// Checks a fused op against its basic-op version in value and in the gradient of a random
    /// weighting of its output, for every input.
    fn check(
        inputs: &[Var],
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        basic: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) {
        let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
        let (ours, theirs) = (fused(&tensors).unwrap(), basic(&tensors).unwrap());
        assert_eq!(ours.dims(), theirs.dims());
        assert!(
            max_diff(&ours, &theirs) < 1e-12,
            "{}",
            max_diff(&ours, &theirs)
        );
        let weights = Tensor::randn(0f64, 1.0, ours.shape(), &Device::Cpu).unwrap();
        let g_ours = (ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_theirs = (theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for var in inputs {
            let (a, b) = (g_ours.get(var).unwrap(), g_theirs.get(var).unwrap());
            assert!(max_diff(a, b) < 1e-12, "{}", max_diff(a, b));
            assert!(max_diff(a, &a.zeros_like().unwrap()) > 1e-3);
        }
    }

    #[test]
    fn fused_norm_swiglu_and_rope_match_basic_ops_in_value_and_gradient() {
        let dev = Device::Cpu;
        // More rows than one parallel task holds, so that task seams are crossed.
        let x = Var::randn(0f64, 2.0, (2, 23, 6), &dev).unwrap();
        let w = Tensor::randn(1f64, 0.3, 6, &dev).unwrap();
        check(
            &[x],
            |v| rms_norm(&v[0], &w, 1e-5),
            |v| crate::model::rms_norm(&v[0], &w, 1e-5),
        );

        let gate = Var::randn(0f64, 2.0, (3, 7001), &dev).unwrap();
        let up = Var::randn(0f64, 1.0, (3, 7001), &dev).unwrap();
        check(
            &[gate, up],
            |v| swiglu(&v[0], &v[1]),
            |v| Ok((v[0].silu()? * &v[1])?),
        );

        let x = Var::randn(0f64, 1.0, (9, 6), &dev).unwrap();
        let a = Var::randn(0f64, 1.0, (2, 6), &dev).unwrap();
        let b = Var::randn(0f64, 1.0, (5, 2), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (5, 6), &dev).unwrap();
        let bias = Tensor::randn(0f64, 1.0, 5, &dev).unwrap();
        check(
            &[x, a, b],
            |v| lora_linear(&v[0], &w, Some(&bias), &v[1], &v[2], 2.5),
            |v| {
                let frozen = v[0].matmul(&w.t()?)?.broadcast_add(&bias)?;
                Ok((frozen + (v[0].matmul(&v[1].t()?)?.matmul(&v[2].t()?)? * 2.5)?)?)
            },
        );

        let (b, t, h, d) = (2, 5, 3, 8);
        let angles = Tensor::randn(0f64, 2.0, (b, 1, t, d / 2), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        for style in [RopeStyle::Interleaved, RopeStyle::Half] {
            let x = Var::randn(0f64, 1.0, (b, t, h, d), &dev).unwrap();
            check(
                &[x],
                |v| rope(&v[0], &cos, &sin, style, 0.25),
                |v| rope_basic(&v[0], &cos, &sin, style, 0.25),
            );
        }
    }
}
