//! Writing a merged GGUF for serving: base weights plus a LoRA update folded in.
//!
//! mistral.rs 0.8.1 cannot apply a LoRA to a GGUF model at run time (its merge discards the
//! result), so promotion serves a new file. Every targeted projection becomes
//! `W + (alpha / r) · B · A` in GGUF layout (the adapter's `B` rows are already in GGUF order,
//! see [`crate::lora`]); every other tensor is copied byte for byte and every metadata entry is
//! copied unchanged. Metadata is written in key order: GGUF readers look keys up by name, and a
//! fixed order makes the output reproducible.
//!
//! A file mixing F32 and quantized tensors loads in mistral.rs and llama.cpp alike, so
//! [`MergeEncoding::F32`] is exact and servable; the quantized encodings trade exactness for size
//! and speed.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device};

use crate::error::{LlamaError, Result};
use crate::gguf::GgufFile;
use crate::lora::{LoraAdapter, TargetModule};

/// How the merged projections are encoded in the output file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeEncoding {
    /// Dense f32: exact, larger, and slower to serve on CPU.
    #[default]
    F32,
    /// Re-quantized to Q8_0 (near-exact, half the size of f16).
    Q8_0,
    /// Re-quantized to each tensor's own encoding in the base file.
    SameAsBase,
}

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Names of the tensors that were replaced by merged weights, in file order.
    pub merged: Vec<String>,
    /// How many tensors were copied unchanged.
    pub copied: usize,
    /// Where the merged model was written.
    pub path: PathBuf,
}

/// Merges `adapter` into the GGUF at `base` and writes the result to `out`.
///
/// The file is written next to `out` under a temporary name and renamed into place, so a reader
/// never sees a half-written model.
pub fn merge_into_gguf(
    base: impl AsRef<Path>,
    adapter: &LoraAdapter,
    out: impl AsRef<Path>,
    encoding: MergeEncoding,
) -> Result<MergeReport> {
    let out = out.as_ref();
    let mut file = GgufFile::open(base)?;
    let config = file.config()?;
    let a = adapter.model_config();
    let fits = a.architecture == config.architecture
        && a.n_layer == config.n_layer
        && a.hidden_size == config.hidden_size
        && a.n_head == config.n_head
        && a.n_kv_head == config.n_kv_head
        && a.head_dim == config.head_dim
        && a.ffn_hidden == config.ffn_hidden;
    if !fits {
        return Err(LlamaError::Adapter(
            "the adapter was built for a model with a different shape".to_string(),
        ));
    }
    // candle's writer always pads to 32 bytes; a file declaring another alignment would be
    // misread if its metadata were copied, and rewriting the key would change the metadata.
    if let Some(v) = file.metadata().get("general.alignment") {
        let is_32 = matches!(
            v,
            Value::U32(32) | Value::U64(32) | Value::I32(32) | Value::U8(32)
        );
        if !is_32 {
            return Err(LlamaError::Config(format!(
                "cannot merge into a GGUF with general.alignment {v:?} (only 32 is supported)"
            )));
        }
    }

    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut merged = Vec::new();
    let mut copied = 0usize;
    for name in file.tensor_names() {
        let q = file.qtensor(&name)?;
        match targeted(&name) {
            Some((layer, module)) => match adapter.delta(layer, module)? {
                Some(delta) => {
                    let base = q.dequantize(&Device::Cpu)?;
                    let delta = delta.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                    if delta.dims() != base.dims() {
                        return Err(LlamaError::Adapter(format!(
                            "delta for {name} has shape {:?}, the weight {:?}",
                            delta.dims(),
                            base.dims()
                        )));
                    }
                    let w = (base + delta)?;
                    let dtype = match encoding {
                        MergeEncoding::F32 => GgmlDType::F32,
                        MergeEncoding::Q8_0 => GgmlDType::Q8_0,
                        MergeEncoding::SameAsBase => q.dtype(),
                    };
                    tensors.push((name.clone(), QTensor::quantize(&w, dtype)?));
                    merged.push(name);
                }
                None => {
                    tensors.push((name, q));
                    copied += 1;
                }
            },
            None => {
                tensors.push((name, q));
                copied += 1;
            }
        }
    }

    let mut metadata: Vec<(&str, &Value)> = file
        .metadata()
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    metadata.sort_by(|x, y| x.0.cmp(y.0));
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();

    let file_name = out
        .file_name()
        .ok_or_else(|| LlamaError::InvalidInput(format!("{} is not a file path", out.display())))?;
    let mut tmp_name = file_name.to_os_string();
    tmp_name.push(".partial");
    let tmp = out.with_file_name(tmp_name);
    {
        let mut w = BufWriter::new(File::create(&tmp)?);
        gguf_file::write(&mut w, &metadata, &tensor_refs)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, out)?;
    Ok(MergeReport {
        merged,
        copied,
        path: out.to_path_buf(),
    })
}

/// Parses `blk.{i}.{stem}.weight` into a layer index and projection.
fn targeted(name: &str) -> Option<(usize, TargetModule)> {
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let stem = rest.strip_suffix(".weight")?;
    let layer = layer.parse().ok()?;
    let module = TargetModule::ALL
        .into_iter()
        .find(|m| m.gguf_name() == stem)?;
    Some((layer, module))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::Architecture;
    use crate::lora::LoraConfig;
    use crate::model::Llama;
    use crate::test_support::{cpu, real_model_path, tiny_config, write_gguf};
    use candle_core::Tensor;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn adapter_for(c: &crate::gguf::LlamaConfig, targets: Vec<TargetModule>) -> LoraAdapter {
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets,
            ..LoraConfig::default()
        };
        LoraAdapter::new(cfg, c, &Device::Cpu, DType::F32).unwrap()
    }

    fn randomize_b(adapter: &LoraAdapter) {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for (_, pair) in adapter.pairs() {
            let dims = pair.b.as_tensor().dims2().unwrap();
            let data: Vec<f32> = (0..dims.0 * dims.1)
                .map(|_| rng.random_range(-0.3..0.3))
                .collect();
            pair.b
                .set(&Tensor::from_vec(data, dims, &cpu()).unwrap())
                .unwrap();
        }
    }

    fn metadata_debug(f: &GgufFile) -> Vec<(String, String)> {
        let mut m: Vec<(String, String)> = f
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), format!("{v:?}")))
            .collect();
        m.sort();
        m
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn zero_adapter_merge_preserves_everything() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.gguf");
        let c = tiny_config(Architecture::Llama);
        let model = Llama::random(c.clone(), 1, &cpu(), DType::F32).unwrap();
        write_gguf(&model, GgmlDType::Q4_1, &base_path);
        let adapter = adapter_for(&c, vec![TargetModule::QProj, TargetModule::DownProj]);
        for (encoding, tol) in [
            (MergeEncoding::F32, 0.0),
            (MergeEncoding::SameAsBase, 1e-3),
            (MergeEncoding::Q8_0, 2e-2),
        ] {
            let out = dir.path().join("merged.gguf");
            let report = merge_into_gguf(&base_path, &adapter, &out, encoding).unwrap();
            assert_eq!(report.merged.len(), 2 * c.n_layer);
            let mut base = GgufFile::open(&base_path).unwrap();
            let mut merged = GgufFile::open(&out).unwrap();
            assert_eq!(metadata_debug(&base), metadata_debug(&merged));
            assert_eq!(base.tensor_names(), merged.tensor_names());
            for name in base.tensor_names() {
                let (b, m) = (base.qtensor(&name).unwrap(), merged.qtensor(&name).unwrap());
                assert_eq!(b.shape(), m.shape());
                let d = max_diff(
                    &b.dequantize(&cpu()).unwrap(),
                    &m.dequantize(&cpu()).unwrap(),
                );
                assert!(d <= tol, "{encoding:?} {name}: {d}");
                if !report.merged.contains(&name) {
                    assert_eq!(b.dtype(), m.dtype());
                    assert_eq!(
                        b.data().unwrap(),
                        m.data().unwrap(),
                        "{name} was not copied"
                    );
                }
            }
        }
    }

    #[test]
    fn nonzero_merge_changes_exactly_the_targets_and_matches_lora_forward() {
        let dir = tempfile::tempdir().unwrap();
        let base_path = dir.path().join("base.gguf");
        let c = tiny_config(Architecture::Llama);
        let model = Llama::random(c.clone(), 2, &cpu(), DType::F32).unwrap();
        write_gguf(&model, GgmlDType::Q8_0, &base_path);
        let targets = vec![
            TargetModule::QProj,
            TargetModule::KProj,
            TargetModule::UpProj,
        ];
        let adapter = adapter_for(&c, targets.clone());
        randomize_b(&adapter);
        let out = dir.path().join("merged.gguf");
        let report = merge_into_gguf(&base_path, &adapter, &out, MergeEncoding::F32).unwrap();
        let mut want: Vec<String> = (0..c.n_layer)
            .flat_map(|i| {
                targets
                    .iter()
                    .map(move |m| format!("blk.{i}.{}.weight", m.gguf_name()))
            })
            .collect();
        want.sort();
        let mut got = report.merged.clone();
        got.sort();
        assert_eq!(got, want);
        let mut base = GgufFile::open(&base_path).unwrap();
        let mut merged = GgufFile::open(&out).unwrap();
        for name in base.tensor_names() {
            let (b, m) = (base.qtensor(&name).unwrap(), merged.qtensor(&name).unwrap());
            let d = max_diff(
                &b.dequantize(&cpu()).unwrap(),
                &m.dequantize(&cpu()).unwrap(),
            );
            if want.contains(&name) {
                assert!(d > 1e-3, "{name} did not change");
                assert_eq!(m.dtype(), GgmlDType::F32);
            } else {
                assert_eq!(b.data().unwrap(), m.data().unwrap(), "{name} changed");
            }
        }
        // Serving the merged file equals the base with the adapter applied.
        let base_model = Llama::load(&base_path, &cpu(), DType::F32).unwrap();
        let merged_model = Llama::load(&out, &cpu(), DType::F32).unwrap();
        let ids = Tensor::new(&[[1u32, 7, 3, 9, 22, 41, 5]], &cpu()).unwrap();
        let with_lora = base_model
            .token_logprobs(&ids, None, Some(&adapter))
            .unwrap();
        let plain = base_model.token_logprobs(&ids, None, None).unwrap();
        let served = merged_model.token_logprobs(&ids, None, None).unwrap();
        assert!(max_diff(&with_lora.logprobs, &served.logprobs) < 1e-4);
        assert!(max_diff(&with_lora.logprobs, &plain.logprobs) > 1e-2);
    }

    #[test]
    fn real_model_zero_merge_keeps_metadata_and_weights() {
        let path = real_model_path();
        let dir = tempfile::tempdir().unwrap();
        let mut base = GgufFile::open(&path).unwrap();
        let c = base.config().unwrap();
        let adapter = adapter_for(&c, vec![TargetModule::QProj, TargetModule::VProj]);
        let out = dir.path().join("merged.gguf");
        let report = merge_into_gguf(&path, &adapter, &out, MergeEncoding::SameAsBase).unwrap();
        assert_eq!(report.merged.len(), 2 * c.n_layer);
        assert_eq!(report.copied, base.tensor_names().len() - 2 * c.n_layer);
        let mut merged = GgufFile::open(&out).unwrap();
        assert_eq!(metadata_debug(&base), metadata_debug(&merged));
        assert_eq!(merged.config().unwrap(), c);
        let mut worst = 0f32;
        for name in base.tensor_names() {
            let (b, m) = (base.qtensor(&name).unwrap(), merged.qtensor(&name).unwrap());
            assert_eq!(b.dtype(), m.dtype());
            if report.merged.contains(&name) {
                let d = max_diff(
                    &b.dequantize(&cpu()).unwrap(),
                    &m.dequantize(&cpu()).unwrap(),
                );
                worst = worst.max(d);
            } else {
                assert_eq!(b.data().unwrap(), m.data().unwrap(), "{name} changed");
            }
        }
        println!("re-quantizing Q4_1 weights with a zero delta moved them by at most {worst:.2e}");
        assert!(worst < 1e-2);
    }
}
