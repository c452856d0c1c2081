//! Where a served episode's model time goes, on the embedded model: the serving forward pass
//! at prefill and decode shapes, for each weights encoding, beside candle's own matrix product
//! at the shapes of one layer (the rate a prefill could reach if nothing but the projections
//! cost time).
//!
//! `cargo bench -p searchloop-llama --bench forward [-- --encodings f32,original --prompt 400]`
//! with `SEARCHLOOP_MODEL` naming the GGUF file (the embedded model by default).

// A benchmark reports by panicking on a broken setup, like a test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use searchloop_llama::{KvCache, ServingModel, TokenBatch, WeightsEncoding, test_support};

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

/// Best of `runs` timings of `f`, in seconds.
fn best_of(runs: usize, mut f: impl FnMut()) -> f64 {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Token ids spread over the vocabulary, deterministic.
fn ids(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Seconds for one prefill of `prompt` tokens into a fresh slot (logits of the last token).
fn prefill(model: &ServingModel, prompt: usize) -> f64 {
    let ids = ids(prompt, model.config().vocab_size);
    best_of(3, || {
        let mut kv = KvCache::host(model.config());
        let slot = kv.allocate(prompt).unwrap();
        let mut batch = TokenBatch::default();
        batch.push_run(slot, 0, &ids);
        model.forward(&batch, &mut kv, &[prompt - 1]).unwrap();
    })
}

/// Seconds for one decoding step of `rows` sequences, each after a context of `context`
/// tokens (logits of every row, as serving asks for them).
fn decode_step(model: &ServingModel, rows: usize, context: usize) -> f64 {
    let vocab = model.config().vocab_size;
    let mut kv = KvCache::host(model.config());
    let slots: Vec<_> = (0..rows)
        .map(|r| {
            let slot = kv.allocate(context + 64).unwrap();
            let mut batch = TokenBatch::default();
            batch.push_run(slot, 0, &ids(context + r, vocab)[r..]);
            model.forward(&batch, &mut kv, &[]).unwrap();
            slot
        })
        .collect();
    let mut position = context;
    let wanted: Vec<usize> = (0..rows).collect();
    best_of(16, || {
        let mut batch = TokenBatch::default();
        for (r, &slot) in slots.iter().enumerate() {
            batch.push_run(slot, position, &[(r * 31 + position) as u32 % vocab as u32]);
        }
        model.forward(&batch, &mut kv, &wanted).unwrap();
        position += 1;
    })
}

/// candle's f32 matrix product rate, in GFLOP/s, over the projections of one layer for
/// `rows` tokens.
fn matmul_rate(model: &ServingModel, rows: usize) -> f64 {
    let c = model.config();
    let shapes = [
        (c.n_head * c.head_dim, c.hidden_size),
        (c.kv_dim(), c.hidden_size),
        (c.kv_dim(), c.hidden_size),
        (c.hidden_size, c.n_head * c.head_dim),
        (c.ffn_hidden, c.hidden_size),
        (c.ffn_hidden, c.hidden_size),
        (c.hidden_size, c.ffn_hidden),
    ];
    let weights: Vec<(Tensor, Tensor)> = shapes
        .iter()
        .map(|&(out, inp)| {
            let w = Tensor::randn(0f32, 0.02, (out, inp), &Device::Cpu).unwrap();
            let x = Tensor::randn(0f32, 1.0, (rows, inp), &Device::Cpu).unwrap();
            (w, x)
        })
        .collect();
    let flops: f64 = shapes
        .iter()
        .map(|&(out, inp)| 2.0 * (rows * out * inp) as f64)
        .sum();
    let seconds = best_of(5, || {
        for (w, x) in &weights {
            let y = x.matmul(&w.t().unwrap()).unwrap();
            assert_eq!(y.dtype(), DType::F32);
        }
    });
    flops / seconds / 1e9
}

fn main() {
    // Measured from a worker of the pool the kernels run on, as the serving engine runs.
    rayon::ThreadPoolBuilder::new()
        .build()
        .unwrap()
        .install(measure);
}

fn measure() {
    let path = test_support::real_model_path();
    let prompt: usize = arg("--prompt", "400").parse().unwrap();
    let context: usize = arg("--context", "600").parse().unwrap();
    let encodings = arg("--encodings", "f32,original");
    println!(
        "{}, {} threads, prompt {prompt} tokens, decode after {context}",
        path.display(),
        rayon::current_num_threads()
    );
    println!(
        "\n| encoding | prefill s | prefill tok/s | decode 1 row ms | decode 8 rows ms | 8 rows tok/s |"
    );
    println!("|---|---|---|---|---|---|");
    for name in encodings.split(',') {
        let encoding: WeightsEncoding = name.parse().unwrap();
        let model = ServingModel::load(&path, &Device::Cpu, encoding).unwrap();
        let p = prefill(&model, prompt);
        let d1 = decode_step(&model, 1, context);
        let d8 = decode_step(&model, 8, context);
        println!(
            "| {name} | {p:.3} | {:.0} | {:.1} | {:.1} | {:.0} |",
            prompt as f64 / p,
            d1 * 1e3,
            d8 * 1e3,
            8.0 / d8
        );
        if encoding == WeightsEncoding::F32 {
            let c = model.config();
            let per_token = 2.0
                * c.n_layer as f64
                * (c.hidden_size * (2 * c.n_head * c.head_dim + 2 * c.kv_dim())
                    + 3 * c.hidden_size * c.ffn_hidden) as f64;
            let rate = matmul_rate(&model, prompt);
            println!(
                "|   projections alone at candle's matmul rate ({rate:.1} GFLOP/s) | {:.3} | {:.0} | | | |",
                per_token * prompt as f64 / (rate * 1e9),
                rate * 1e9 / per_token
            );
        }
    }
}
