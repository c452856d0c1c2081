//! Finite-difference check of LoRA gradients through the whole model and the GRPO + SAPO loss.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::loss::{LossConfig, PolicyLossInputs, policy_loss};
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

fn check(architecture: Architecture) {
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
    let mask = Tensor::new(&[[0f64, 1., 1., 1., 1.], [0., 0., 1., 1., 1.]], &dev).unwrap();
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
    // on both sides of the SAPO threshold, away from every kink.
    let offsets = Tensor::new(
        &[[0.0f64, 0.3, -0.5, 0.05, 0.6], [0.0, 0.0, -0.4, 0.35, 0.1]],
        &dev,
    )
    .unwrap();
    let old = (start.detach() + offsets).unwrap();
    let cfg = LossConfig {
        clip_eps: 0.2,
        sapo_weight: 0.3,
        sapo_threshold: 0.8,
        kl_beta: 0.05,
        ..LossConfig::default()
    };
    let loss = || -> Tensor {
        let logp = model
            .token_logprobs(&ids, Some(&attention), Some(&adapter))
            .unwrap()
            .logprobs;
        let inputs = PolicyLossInputs {
            logp: &logp,
            logp_old: &old,
            mask: &mask,
            advantages: &advantages,
            ref_logp: Some(&reference),
            entropy: None,
            normalizer: None,
        };
        policy_loss(&inputs, &cfg).unwrap().0
    };
    let (l0, metrics) = {
        let logp = model
            .token_logprobs(&ids, Some(&attention), Some(&adapter))
            .unwrap()
            .logprobs;
        let inputs = PolicyLossInputs {
            logp: &logp,
            logp_old: &old,
            mask: &mask,
            advantages: &advantages,
            ref_logp: Some(&reference),
            entropy: None,
            normalizer: None,
        };
        policy_loss(&inputs, &cfg).unwrap()
    };
    assert!(metrics.clip_frac > 0.0 && metrics.sapo_active_frac > 0.0);
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
                    "{architecture:?} layer {layer} {module:?} {which}[{k}]: backprop {} vs \
                     finite difference {numeric}",
                    analytic[k]
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 7 * config.n_layer * 3);
    println!("{architecture:?}: {checked} LoRA gradient entries, worst relative error {worst:.1e}");
}

#[test]
fn lora_gradients_match_central_differences_llama() {
    check(Architecture::Llama);
}

#[test]
fn lora_gradients_match_central_differences_qwen2() {
    check(Architecture::Qwen2);
}
