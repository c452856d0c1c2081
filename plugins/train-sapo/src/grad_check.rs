//! Finite-difference check of LoRA gradients through the whole model and every policy loss, with
//! and without a sampler correction.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::correction::IsCorrection;
use crate::loss::{LossConfig, LossKind, LossMetrics, PolicyLossInputs, policy_loss};
use searchloop_llama::Llama;
use searchloop_llama::{Architecture, LlamaConfig};
use searchloop_llama::{LoraAdapter, LoraConfig, TargetModule};

fn tiny(architecture: Architecture) -> LlamaConfig {
    LlamaConfig {
        architecture,
        n_layer: 2,
        hidden_size: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn_hidden: 32,
        vocab_size: 32,
        rms_eps: 1e-6,
        rope_theta: 10_000.0,
    }
}

/// Checks LoRA gradients of `cfg`'s loss against central differences. The data exercise every
/// branch `exercised` asks for.
fn check(architecture: Architecture, cfg: &LossConfig, exercised: fn(&LossMetrics) -> bool) {
    let dev = Device::Cpu;
    let config = tiny(architecture);
    let model = Llama::random(config.clone(), 11, &dev, DType::F64).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: TargetModule::ALL.to_vec(),
        seed: 3,
        use_rslora: false,
    };
    let adapter = LoraAdapter::new(lora, &config, &dev, DType::F64).unwrap();
    // A non-zero B makes A's gradient non-zero too, so both factors are checked.
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for (_, pair) in adapter.pairs() {
        let dims = pair.b.as_tensor().dims2().unwrap();
        let b: Vec<f64> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-0.4..0.4))
            .collect();
        pair.b
            .set(&Tensor::from_vec(b, dims, &dev).unwrap())
            .unwrap();
    }
    // Two sequences, the second left-padded, so masking and positions are exercised too.
    let ids = Tensor::new(&[[3u32, 1, 4, 1, 5, 9], [0, 0, 2, 6, 5, 3]], &dev).unwrap();
    let attention = Tensor::new(&[[1u8; 6], [0, 0, 1, 1, 1, 1]], &dev).unwrap();
    // The first sequence's trained positions form two actions, split by an observation.
    let mask = Tensor::new(&[[0f64, 1., 1., 0., 1.], [0., 0., 1., 1., 1.]], &dev).unwrap();
    let advantages = Tensor::new(&[1.0f64, -0.5], &dev).unwrap();
    let reference = model
        .token_logprobs(&ids, Some(&attention), None)
        .unwrap()
        .logprobs;
    let start = model
        .token_logprobs(&ids, Some(&attention), Some(&adapter))
        .unwrap()
        .logprobs;
    // Fixed stale behaviour log-probs put the ratios inside, above and below the clip range and
    // on both sides of the SAPO threshold, away from every kink; the first sequence's first
    // action has a negative summed displacement (-0.2) and its second a positive one (0.6).
    let offsets = Tensor::new(
        &[[0.0f64, 0.3, -0.5, 0.05, 0.6], [0.0, 0.0, -0.4, 0.35, 0.1]],
        &dev,
    )
    .unwrap();
    let old = (start.detach() + offsets).unwrap();
    // Sampler log-probs with ratios w = exp(-offset) from 0.74 to 2.46.
    let sampler_offsets = Tensor::new(
        &[[0.0f64, -0.8, 0.1, 0.0, -0.2], [0.0, 0.0, 0.3, -0.9, 0.05]],
        &dev,
    )
    .unwrap();
    let sampler = (&old + sampler_offsets).unwrap();
    let loss = || -> Tensor {
        let logp = model
            .token_logprobs(&ids, Some(&attention), Some(&adapter))
            .unwrap()
            .logprobs;
        let inputs = PolicyLossInputs {
            logp: &logp,
            logp_old: &old,
            logp_sampler: Some(&sampler),
            mask: &mask,
            advantages: &advantages,
            ref_logp: Some(&reference),
            entropy: None,
            normalizer: None,
        };
        policy_loss(&inputs, cfg).unwrap().0
    };
    let (l0, metrics) = {
        let logp = model
            .token_logprobs(&ids, Some(&attention), Some(&adapter))
            .unwrap()
            .logprobs;
        let inputs = PolicyLossInputs {
            logp: &logp,
            logp_old: &old,
            logp_sampler: Some(&sampler),
            mask: &mask,
            advantages: &advantages,
            ref_logp: Some(&reference),
            entropy: None,
            normalizer: None,
        };
        policy_loss(&inputs, cfg).unwrap()
    };
    assert!(
        exercised(&metrics),
        "{cfg:?} leaves branches out: {metrics:?}"
    );
    let grads = l0.backward().unwrap();

    let h = 1e-5;
    let mut checked = 0;
    let mut worst = 0f64;
    for ((layer, module), pair) in adapter.pairs() {
        for (which, var) in [("A", &pair.a), ("B", &pair.b)] {
            let analytic = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {layer} {module:?} {which}"))
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let shape = var.as_tensor().shape().clone();
            for _ in 0..3 {
                let k = rng.random_range(0..base.len());
                let eval_at = |v: f64, var: &Var| {
                    let mut p = base.clone();
                    p[k] = v;
                    var.set(&Tensor::from_vec(p, shape.clone(), &dev).unwrap())
                        .unwrap();
                    loss().to_scalar::<f64>().unwrap()
                };
                let plus = eval_at(base[k] + h, var);
                let minus = eval_at(base[k] - h, var);
                var.set(&Tensor::from_vec(base.clone(), shape.clone(), &dev).unwrap())
                    .unwrap();
                let numeric = (plus - minus) / (2.0 * h);
                let err = (analytic[k] - numeric).abs();
                worst = worst.max(err / (1e-6 + numeric.abs()));
                assert!(
                    err <= 1e-7 + 1e-5 * numeric.abs(),
                    "{architecture:?} {:?} layer {layer} {module:?} {which}[{k}]: backprop {} vs \
                     finite difference {numeric}",
                    cfg.kind,
                    analytic[k]
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 7 * config.n_layer * 3);
    println!(
        "{architecture:?} {:?} {:?}: {checked} LoRA gradient entries, worst relative error \
         {worst:.1e}",
        cfg.kind, cfg.is_correction
    );
}

/// GRPO + SAPO with a KL penalty, both SAPO branches and clipping.
fn sapo() -> LossConfig {
    LossConfig {
        clip_eps: 0.2,
        sapo_weight: 0.3,
        sapo_threshold: 0.8,
        kl_beta: 0.05,
        ..LossConfig::default()
    }
}

fn sapo_exercised(m: &LossMetrics) -> bool {
    m.clip_frac > 0.0 && m.sapo_active_frac > 0.0
}

#[test]
fn lora_gradients_match_central_differences_llama() {
    check(Architecture::Llama, &sapo(), sapo_exercised);
}

#[test]
fn lora_gradients_match_central_differences_qwen2() {
    check(Architecture::Qwen2, &sapo(), sapo_exercised);
}

/// Some but not all tokens clipped.
fn partly_clipped(m: &LossMetrics) -> bool {
    m.clip_frac > 0.0 && m.clip_frac < 1.0
}

/// Some but not all tokens truncated or masked by the correction.
fn partly_corrected(m: &LossMetrics) -> bool {
    let hit = m.is_clip_frac_pos.unwrap_or(0.0) + m.is_clip_frac_neg.unwrap_or(0.0);
    hit > 0.0 && m.is_weight_mean.is_some_and(|w| w > 0.0)
}

#[test]
fn grpo_with_clip_higher_and_tis_gradients_match_central_differences() {
    let cfg = LossConfig {
        kind: LossKind::Grpo,
        clip_eps_high: Some(0.3),
        is_correction: IsCorrection::Tis,
        ..sapo()
    };
    check(Architecture::Llama, &cfg, |m| {
        partly_clipped(m) && partly_corrected(m)
    });
}

#[test]
fn gspo_with_mis_gradients_match_central_differences() {
    // Sequence ratios are 0.88 (A > 0, kept) and 0.98 (A < 0, clipped below 0.99); the
    // sequences' sampler ratios 2.46 and 1.73 are both inside the band.
    let cfg = LossConfig {
        kind: LossKind::Gspo,
        gspo_clip_eps: 0.01,
        gspo_clip_eps_high: 0.01,
        is_correction: IsCorrection::Mis,
        is_max: Some(3.0),
        ..sapo()
    };
    check(Architecture::Llama, &cfg, |m| {
        partly_clipped(m) && m.is_weight_mean.is_some_and(|w| w > 1.5)
    });
}

#[test]
fn cispo_with_icepop_gradients_match_central_differences() {
    let cfg = LossConfig {
        kind: LossKind::Cispo,
        cispo_min_weight: 0.8,
        cispo_max_weight: 1.2,
        is_correction: IsCorrection::Icepop,
        is_max: Some(2.0),
        ..sapo()
    };
    check(Architecture::Llama, &cfg, |m| {
        partly_clipped(m) && partly_corrected(m)
    });
}

#[test]
fn llds_with_geo_gradients_match_central_differences() {
    // Geometric-mean sampler ratios 1.35 and 1.20: the first sequence is rejected, which leaves
    // its LLDS term (the correction weighs the policy gradient only).
    let cfg = LossConfig {
        kind: LossKind::Llds,
        is_correction: IsCorrection::Geo,
        is_min: Some(0.5),
        is_max: Some(1.3),
        ..sapo()
    };
    check(Architecture::Llama, &cfg, |m| {
        m.llds_active_frac > 0.0 && partly_clipped(m) && partly_corrected(m)
    });
}
