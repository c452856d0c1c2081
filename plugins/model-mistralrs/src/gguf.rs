//! Local GGUF files: checking that a path really is one (so mistral.rs never reaches for the
//! Hugging Face hub), naming it by content hash, reading its metadata, and re-encoding its
//! weights to a faster encoding once, cached on disk.

use std::{
    fs::File,
    io::{BufReader, BufWriter, Read},
    path::{Path, PathBuf},
};

use candle_core::{
    Device,
    quantized::{GgmlDType, QTensor, gguf_file},
};

use crate::{
    config::WeightsEncoding,
    error::{ModelError, Result},
};

/// The four bytes every GGUF file starts with.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// The GGUF architectures mistral.rs 0.8.1 serves (its `GGUFLoader`).
const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama",
    "mistral3",
    "phi2",
    "phi3",
    "starcoder2",
    "qwen2",
    "qwen3",
    "qwen3moe",
];

/// Hex digits of the content hash kept in model ids and cache file names.
const SHORT_HASH_LEN: usize = 12;

/// Checks that `path` is an absolute path to an existing regular file that starts with the GGUF
/// magic, and returns it canonicalized.
///
/// mistral.rs treats a path that does not exist as a Hugging Face repository id and tries the
/// network, so every path is checked here first.
pub(crate) fn checked_model_path(path: &Path) -> Result<PathBuf> {
    let refuse = |reason: &str| ModelError::ModelPath {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    if !path.is_absolute() {
        return Err(refuse("the path must be absolute"));
    }
    let metadata = std::fs::metadata(path).map_err(|e| refuse(&format!("cannot be read ({e})")))?;
    if metadata.is_dir() {
        return Err(refuse("is a directory, not a GGUF file"));
    }
    if !metadata.is_file() {
        return Err(refuse("is not a regular file"));
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .map_err(|e| refuse(&format!("cannot read its header ({e})")))?;
    if &magic != GGUF_MAGIC {
        return Err(refuse(
            "is not a GGUF file (it does not start with the GGUF magic)",
        ));
    }
    path.canonicalize()
        .map_err(|e| refuse(&format!("cannot be resolved ({e})")))
}

/// The SHA-256 of the file's content, as lowercase hex.
pub(crate) fn sha256_hex(path: &Path) -> Result<String> {
    searchloop_llama::gguf::file_sha256(path)
        .map_err(|e| ModelError::io(format!("hashing {}", path.display()), e))
}

/// The first hex digits of a content hash, enough to tell model files apart.
pub(crate) fn short_hash(hash: &str) -> &str {
    &hash[..hash.len().min(SHORT_HASH_LEN)]
}

/// What the serving policy needs from a GGUF header.
#[derive(Debug, Clone)]
pub(crate) struct GgufHeader {
    /// `{architecture}.context_length`, when present.
    pub context_length: Option<usize>,
    /// `tokenizer.chat_template`, when present.
    pub chat_template: Option<String>,
    /// The text of `tokenizer.ggml.bos_token_id`, when present.
    pub bos_token: Option<String>,
    /// The text of `tokenizer.ggml.eos_token_id`, when present.
    pub eos_token: Option<String>,
}

/// Reads the metadata of the GGUF file at `path`.
pub(crate) fn read_header(path: &Path) -> Result<GgufHeader> {
    let content = read_content(path)?;
    let metadata = &content.metadata;
    let string = |key: &str| -> Option<String> {
        metadata
            .get(key)
            .and_then(|value| value.to_string().ok())
            .cloned()
    };
    let architecture = string("general.architecture")
        .ok_or_else(|| ModelError::gguf(path, "metadata has no general.architecture"))?;
    if !SUPPORTED_ARCHITECTURES.contains(&architecture.to_ascii_lowercase().as_str()) {
        return Err(ModelError::gguf(
            path,
            format!(
                "architecture {architecture:?} is not served by mistral.rs (supported: {})",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        ));
    }
    let context_length = metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|value| value.to_u64().ok())
        .and_then(|n| usize::try_from(n).ok());
    let token_text = |key: &str| -> Option<String> {
        let id = usize::try_from(metadata.get(key)?.to_u64().ok()?).ok()?;
        let tokens = metadata.get("tokenizer.ggml.tokens")?.to_vec().ok()?;
        tokens.get(id)?.to_string().ok().cloned()
    };
    Ok(GgufHeader {
        context_length,
        chat_template: string("tokenizer.chat_template"),
        bos_token: token_text("tokenizer.ggml.bos_token_id"),
        eos_token: token_text("tokenizer.ggml.eos_token_id"),
    })
}

fn read_content(path: &Path) -> Result<gguf_file::Content> {
    let file =
        File::open(path).map_err(|e| ModelError::io(format!("opening {}", path.display()), e))?;
    gguf_file::Content::read(&mut BufReader::new(file)).map_err(|e| ModelError::gguf(path, e))
}

/// The GGUF file to load for `encoding`: the original itself, or a re-encoded copy in `dir`,
/// written on first use and reused afterwards.
///
/// The copy's name carries the original's content hash, so a changed original never reuses a
/// stale copy. It is written to a temporary name and renamed into place, so a crash never leaves
/// a truncated copy under the final name.
pub(crate) fn weights_file(
    original: &Path,
    original_hash: &str,
    encoding: WeightsEncoding,
    dir: &Path,
) -> Result<PathBuf> {
    let Some(target_dtype) = target_dtype(encoding) else {
        return Ok(original.to_path_buf());
    };
    let stem = original
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    let target = dir.join(format!(
        "{stem}.{}.{}.gguf",
        short_hash(original_hash),
        encoding.as_str()
    ));
    if target.is_file() && read_content(&target).is_ok() {
        return Ok(target);
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| ModelError::io(format!("creating {}", dir.display()), e))?;
    let temporary = dir.join(format!(
        ".{}.tmp-{}",
        target
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let written = write_reencoded(original, &temporary, target_dtype);
    if let Err(err) = written {
        // The partial file is useless; failing to remove it changes nothing for the caller.
        let _ = std::fs::remove_file(&temporary);
        return Err(err);
    }
    std::fs::rename(&temporary, &target).map_err(|e| {
        ModelError::io(
            format!("moving {} to {}", temporary.display(), target.display()),
            e,
        )
    })?;
    Ok(target)
}

fn target_dtype(encoding: WeightsEncoding) -> Option<GgmlDType> {
    match encoding {
        WeightsEncoding::Original => None,
        WeightsEncoding::Q8_0 => Some(GgmlDType::Q8_0),
        WeightsEncoding::Q4_0 => Some(GgmlDType::Q4_0),
        WeightsEncoding::F32 => Some(GgmlDType::F32),
    }
}

/// llama.cpp's `general.file_type` code for a file whose matrices are all `dtype`.
fn llama_file_type(dtype: GgmlDType) -> Option<u32> {
    match dtype {
        GgmlDType::F32 => Some(0),
        GgmlDType::Q4_0 => Some(2),
        GgmlDType::Q8_0 => Some(7),
        _ => None,
    }
}

fn write_reencoded(source: &Path, destination: &Path, dtype: GgmlDType) -> Result<()> {
    let file = File::open(source)
        .map_err(|e| ModelError::io(format!("opening {}", source.display()), e))?;
    let mut reader = BufReader::new(file);
    let content = gguf_file::Content::read(&mut reader).map_err(|e| ModelError::gguf(source, e))?;

    // Tensors keep their order in the file, which keeps the copy's layout like the original's.
    let mut names: Vec<(&String, u64)> = content
        .tensor_infos
        .iter()
        .map(|(name, info)| (name, info.offset))
        .collect();
    names.sort_by_key(|(_, offset)| *offset);
    let mut tensors = Vec::with_capacity(names.len());
    for (name, _) in names {
        let tensor = content
            .tensor(&mut reader, name, &Device::Cpu)
            .map_err(|e| ModelError::gguf(source, format!("reading tensor {name}: {e}")))?;
        let tensor = reencode_tensor(tensor, dtype)
            .map_err(|e| ModelError::gguf(source, format!("re-encoding tensor {name}: {e}")))?;
        tensors.push((name.as_str(), tensor));
    }

    // candle's writer always aligns to 32 bytes, the GGUF default, so an explicit alignment
    // entry from the source would describe the copy wrongly.
    let file_type = llama_file_type(dtype).map(gguf_file::Value::U32);
    let mut metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .filter(|(key, _)| {
            key.as_str() != "general.alignment" && key.as_str() != "general.file_type"
        })
        .map(|(key, value)| (key.as_str(), value))
        .collect();
    if let Some(file_type) = &file_type {
        metadata.push(("general.file_type", file_type));
    }
    metadata.sort_by_key(|(key, _)| *key);

    let file = File::create(destination)
        .map_err(|e| ModelError::io(format!("creating {}", destination.display()), e))?;
    let mut writer = BufWriter::new(file);
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    gguf_file::write(&mut writer, &metadata, &tensor_refs)
        .map_err(|e| ModelError::gguf(destination, e))?;
    let file = writer.into_inner().map_err(|e| {
        ModelError::io(format!("writing {}", destination.display()), e.into_error())
    })?;
    file.sync_all()
        .map_err(|e| ModelError::io(format!("syncing {}", destination.display()), e))
}

/// Re-encodes one tensor to `dtype`.
///
/// One-dimensional tensors (norm weights, biases) are left alone: they are tiny and already
/// read as f32. So are matrices whose rows do not split into whole quantization blocks, which
/// the target encoding cannot represent.
fn reencode_tensor(tensor: QTensor, dtype: GgmlDType) -> candle_core::Result<QTensor> {
    if tensor.dtype() == dtype || tensor.shape().rank() < 2 {
        return Ok(tensor);
    }
    let row_length = tensor.shape().dims().last().copied().unwrap_or(0);
    if !row_length.is_multiple_of(dtype.block_size()) {
        return Ok(tensor);
    }
    let values = tensor.dequantize(&Device::Cpu)?;
    QTensor::quantize(&values, dtype)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_that_are_not_local_gguf_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.gguf");
        let err = checked_model_path(&missing).unwrap_err().to_string();
        assert!(
            err.contains("missing.gguf") && err.contains("cannot be read"),
            "{err}"
        );

        let err = checked_model_path(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");

        let text = dir.path().join("notes.gguf");
        std::fs::write(&text, "not a model").unwrap();
        let err = checked_model_path(&text).unwrap_err().to_string();
        assert!(err.contains("GGUF magic"), "{err}");

        let err = checked_model_path(Path::new("models/m.gguf"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("absolute"), "{err}");

        let short = dir.path().join("short.gguf");
        std::fs::write(&short, "GG").unwrap();
        assert!(checked_model_path(&short).is_err());
    }

    #[test]
    fn a_written_gguf_is_accepted_and_reencoded() {
        let dir = tempfile::tempdir().unwrap();
        let original = dir.path().join("tiny.gguf");
        let values: Vec<f32> = (0..2 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
        let matrix = candle_core::Tensor::from_vec(values, (2, 64), &Device::Cpu).unwrap();
        let matrix = QTensor::quantize(&matrix, GgmlDType::Q4_1).unwrap();
        let norm = candle_core::Tensor::ones(64, candle_core::DType::F32, &Device::Cpu).unwrap();
        let norm = QTensor::quantize(&norm, GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let mut file = File::create(&original).unwrap();
        gguf_file::write(
            &mut file,
            &[("general.architecture", &arch)],
            &[
                ("blk.0.ffn_up.weight", &matrix),
                ("output_norm.weight", &norm),
            ],
        )
        .unwrap();
        drop(file);

        let checked = checked_model_path(&original).unwrap();
        let hash = sha256_hex(&checked).unwrap();
        assert_eq!(hash.len(), 64);
        assert_eq!(read_header(&checked).unwrap().context_length, None);

        let same = weights_file(&checked, &hash, WeightsEncoding::Original, dir.path()).unwrap();
        assert_eq!(same, checked);
        let copy = weights_file(&checked, &hash, WeightsEncoding::Q8_0, dir.path()).unwrap();
        assert!(
            copy.file_name()
                .unwrap()
                .to_string_lossy()
                .ends_with(".q8_0.gguf")
        );
        let mut reader = BufReader::new(File::open(&copy).unwrap());
        let content = gguf_file::Content::read(&mut reader).unwrap();
        let up = content
            .tensor(&mut reader, "blk.0.ffn_up.weight", &Device::Cpu)
            .unwrap();
        assert_eq!(up.dtype(), GgmlDType::Q8_0);
        let norm = content
            .tensor(&mut reader, "output_norm.weight", &Device::Cpu)
            .unwrap();
        assert_eq!(norm.dtype(), GgmlDType::F32);
        assert_eq!(content.metadata["general.file_type"].to_u32().unwrap(), 7);

        // Q8_0 of a Q4_1 matrix is close to it: the second rounding is far below 4-bit steps.
        let before = matrix.dequantize(&Device::Cpu).unwrap();
        let after = up.dequantize(&Device::Cpu).unwrap();
        let max_diff = (before - after)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(max_diff < 0.01, "max difference {max_diff}");

        // The second call reuses the cached copy instead of writing another one.
        let modified = std::fs::metadata(&copy).unwrap().modified().unwrap();
        let again = weights_file(&checked, &hash, WeightsEncoding::Q8_0, dir.path()).unwrap();
        assert_eq!(again, copy);
        assert_eq!(
            std::fs::metadata(&copy).unwrap().modified().unwrap(),
            modified
        );
    }
}
