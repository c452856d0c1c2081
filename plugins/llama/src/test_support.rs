//! Shared helpers for the tests of this crate and the crates built on it: the real model's
//! location and tiny random models.

use std::path::PathBuf;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

use crate::gguf::{Architecture, LlamaConfig};
use crate::lora::LoraAdapter;
use crate::model::Llama;

/// The default model: `$SEARCHLOOP_MODEL`, else the project's model cache under `$HOME`.
/// Panics with instructions when it is missing, because the real-model tests must not be
/// skipped silently.
pub fn real_model_path() -> PathBuf {
    let path = match std::env::var_os("SEARCHLOOP_MODEL") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("HOME").unwrap_or_default();
            PathBuf::from(home)
                .join(".cache")
                .join("searchloop")
                .join("models")
                .join("SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        path.is_file(),
        "the default model is missing at {}: run the project's model fetch script first, or \
         point SEARCHLOOP_MODEL at a llama-family GGUF",
        path.display()
    );
    path
}

/// A tiny llama configuration whose matrix widths are multiples of 32, so that its weights can
/// be stored quantized in a GGUF.
pub fn tiny_config(architecture: Architecture) -> LlamaConfig {
    LlamaConfig {
        architecture,
        n_layer: 2,
        hidden_size: 64,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 16,
        ffn_hidden: 96,
        vocab_size: 64,
        // The value an f32 metadata entry round-trips to.
        rms_eps: f64::from(1e-5f32),
        rope_theta: 10_000.0,
    }
}

/// Writes `model` as a GGUF: 2-D weights in `dtype`, norms in F32, plus the metadata the loader
/// reads and keys it ignores (which must survive merges).
pub fn write_gguf(model: &Llama, dtype: GgmlDType, path: &std::path::Path) {
    write_gguf_with(model, dtype, path, &[], None);
}

/// [`write_gguf`] leaving out the tensors named in `skip` and optionally declaring another
/// architecture name, to produce broken files.
pub fn write_gguf_with(
    model: &Llama,
    dtype: GgmlDType,
    path: &std::path::Path,
    skip: &[&str],
    arch_name: Option<&str>,
) {
    let c = model.config();
    let w = model.weights();
    let arch = c.architecture.gguf_name();
    let declared = arch_name.unwrap_or(arch);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let q = |t: &candle_core::Tensor, dt: GgmlDType| {
        QTensor::quantize(&t.to_dtype(DType::F32).unwrap(), dt).unwrap()
    };
    tensors.push((
        "token_embd.weight".into(),
        q(&w.token_embd, GgmlDType::Q8_0),
    ));
    for (i, l) in w.layers.iter().enumerate() {
        tensors.push((
            format!("blk.{i}.attn_norm.weight"),
            q(&l.attn_norm, GgmlDType::F32),
        ));
        tensors.push((
            format!("blk.{i}.ffn_norm.weight"),
            q(&l.ffn_norm, GgmlDType::F32),
        ));
        for (stem, lin) in [
            ("attn_q", &l.q),
            ("attn_k", &l.k),
            ("attn_v", &l.v),
            ("attn_output", &l.o),
            ("ffn_gate", &l.gate),
            ("ffn_up", &l.up),
            ("ffn_down", &l.down),
        ] {
            tensors.push((format!("blk.{i}.{stem}.weight"), q(&lin.weight, dtype)));
            if let Some(b) = &lin.bias {
                tensors.push((format!("blk.{i}.{stem}.bias"), q(b, GgmlDType::F32)));
            }
        }
    }
    tensors.push((
        "output_norm.weight".into(),
        q(&w.output_norm, GgmlDType::F32),
    ));
    let metadata: Vec<(String, Value)> = vec![
        (
            "general.architecture".into(),
            Value::String(declared.into()),
        ),
        ("general.name".into(), Value::String("tiny".into())),
        (format!("{arch}.block_count"), Value::U32(c.n_layer as u32)),
        (
            format!("{arch}.embedding_length"),
            Value::U32(c.hidden_size as u32),
        ),
        (
            format!("{arch}.feed_forward_length"),
            Value::U32(c.ffn_hidden as u32),
        ),
        (
            format!("{arch}.attention.head_count"),
            Value::U32(c.n_head as u32),
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            Value::U32(c.n_kv_head as u32),
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(c.rms_eps as f32),
        ),
        (
            format!("{arch}.rope.freq_base"),
            Value::F32(c.rope_theta as f32),
        ),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(
                (0..c.vocab_size)
                    .map(|i| Value::String(format!("t{i}")))
                    .collect(),
            ),
        ),
    ];
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

/// The CPU device every unit test runs on.
pub fn cpu() -> Device {
    Device::Cpu
}

/// Fills every `B` of `adapter` with seeded noise so that the adapter does something.
pub fn randomize_b(adapter: &LoraAdapter, seed: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    for (_, pair) in adapter.pairs() {
        let dims = pair.b.as_tensor().dims2().unwrap();
        let data: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-0.5..0.5))
            .collect();
        pair.b
            .set(&candle_core::Tensor::from_vec(data, dims, &cpu()).unwrap())
            .unwrap();
    }
}

/// The largest absolute element-wise difference of two tensors of the same shape, as f64.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
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
