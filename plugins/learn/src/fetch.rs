//! Adapters through the registry: the PEFT files a round publishes into the store, and the
//! served model a replica on another machine makes from them.
//!
//! A fleet shares one PostgreSQL store, not a disk. A round keeps its adapter's PEFT files in
//! the registry next to its record ([`read_adapter_files`]); a replica that must serve a version
//! it did not train fetches those files, checks them against the record's content hash (the
//! store refuses bytes that do not match), merges them into its own copy of the base GGUF with
//! the trainer's merge code, and keeps the merged model in a cache folder named after the
//! adapter's and the base model's hashes ([`fetch_adapter`]). A second promotion of the
//! same adapter, or a restart, finds the merged model there and loads it at once.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use searchloop_llama::{
    GgufFile, LoraAdapter,
    gguf::file_sha256,
    lora::{ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE},
    merge_into_gguf,
};
use searchloop_store_sql::{AdapterFiles, AdapterRecord, Store};

use crate::{
    MergedWeights,
    error::{LearnError, Result},
    round::{MERGED_FILE, publish, sync_files},
};

/// The prefix of a fetch's hidden folder in the cache while it is being written.
const FETCH_PREFIX: &str = ".fetch-";

/// Reads the PEFT files a round wrote into `dir`, as the registry keeps them.
pub(crate) fn read_adapter_files(dir: &Path) -> Result<AdapterFiles> {
    let config = dir.join(ADAPTER_CONFIG_FILE);
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    Ok(AdapterFiles {
        peft_config: std::fs::read_to_string(&config)
            .map_err(|e| LearnError::io(format!("cannot read {}", config.display()), e))?,
        weights: std::fs::read(&weights)
            .map_err(|e| LearnError::io(format!("cannot read {}", weights.display()), e))?,
    })
}

/// The base model's content hash, which names the merged models made from it: read once per
/// process by its caller, since hashing a GGUF reads all of it.
pub async fn base_model_hash(base_gguf: &Path) -> Result<String> {
    let path = base_gguf.to_path_buf();
    tokio::task::spawn_blocking(move || file_sha256(&path))
        .await
        .map_err(|e| LearnError::Thread(e.to_string()))?
        .map_err(|e| LearnError::io(format!("cannot read {}", base_gguf.display()), e))
}

/// The folder of adapter `record` on this machine (its PEFT files, and its merged model as
/// [`MERGED_FILE`]): in `cache_dir` when an earlier fetch made it, else made now from the
/// registry's files and the base model at `base_gguf` (whose [`base_model_hash`] is
/// `base_hash`), merged in the encoding the adapter's round used. `None` when the registry
/// holds no files for the adapter; an error, leaving nothing behind, when its bytes do not
/// match its content hash.
pub async fn fetch_adapter(
    store: &Store,
    record: &AdapterRecord,
    base_gguf: &Path,
    base_hash: &str,
    cache_dir: &Path,
) -> Result<Option<PathBuf>> {
    // A cache hit reads nothing from the store. A content hash that is not a digest was never
    // published with files, so it can only be a miss.
    let folder = cache_name(&record.content_hash, base_hash).map(|name| cache_dir.join(name));
    if let Ok(folder) = &folder
        && folder.join(MERGED_FILE).is_file()
    {
        return Ok(Some(folder.clone()));
    }
    let Some(files) = store.adapter_files(record.version).await? else {
        return Ok(None);
    };
    let folder = folder?;
    let encoding = merged_weights_of(record)?;
    let base = base_gguf.to_path_buf();
    let cache = cache_dir.to_path_buf();
    let version = record.version;
    tokio::task::spawn_blocking(move || {
        write_merged(&files, &base, &cache, &folder, encoding)?;
        tracing::info!(version, folder = %folder.display(), "fetched and merged an adapter");
        Ok(Some(folder))
    })
    .await
    .map_err(|e| LearnError::Thread(e.to_string()))?
}

/// The cache folder's name: the adapter's content hash and the start of the base model's hash,
/// so a replica whose base model changed never serves a model merged into the old one.
fn cache_name(content_hash: &str, base_hash: &str) -> Result<String> {
    if content_hash.is_empty() || !content_hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(LearnError::Config(format!(
            "the adapter's content hash {content_hash:?} is not a hex digest"
        )));
    }
    Ok(format!(
        "{content_hash}-{}",
        &base_hash[..base_hash.len().min(16)]
    ))
}

/// How adapter `record`'s round wrote its merged model (its recorded round config).
fn merged_weights_of(record: &AdapterRecord) -> Result<MergedWeights> {
    let value = record
        .training_config
        .get("merged_weights")
        .cloned()
        .ok_or_else(|| {
            LearnError::Config(format!(
                "adapter v{}'s training config does not say how its merged model is encoded",
                record.version
            ))
        })?;
    serde_json::from_value(value).map_err(|e| {
        LearnError::Config(format!(
            "adapter v{}'s merged_weights is not one this build knows: {e}",
            record.version
        ))
    })
}

/// Writes the PEFT files and their merged model into a hidden folder of `cache`, then renames
/// it to `folder`, so a reader never sees a half-written model.
fn write_merged(
    files: &AdapterFiles,
    base: &Path,
    cache: &Path,
    folder: &Path,
    encoding: MergedWeights,
) -> Result<()> {
    std::fs::create_dir_all(cache)
        .map_err(|e| LearnError::io(format!("cannot create {}", cache.display()), e))?;
    let staging = tempfile::Builder::new()
        .prefix(FETCH_PREFIX)
        .tempdir_in(cache)
        .map_err(|e| LearnError::io(format!("cannot create a folder in {}", cache.display()), e))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = staging.path().join(name);
        std::fs::write(&path, bytes)
            .map_err(|e| LearnError::io(format!("cannot write {}", path.display()), e))
    };
    write(ADAPTER_CONFIG_FILE, files.peft_config.as_bytes())?;
    write(ADAPTER_WEIGHTS_FILE, &files.weights)?;
    let config = GgufFile::open(base)?.config()?;
    let adapter = LoraAdapter::load_peft(staging.path(), &config, &Device::Cpu, DType::F32)?;
    merge_into_gguf(
        base,
        &adapter,
        staging.path().join(MERGED_FILE),
        encoding.encoding(),
    )?;
    sync_files(staging.path())?;
    publish(staging, folder)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_names_refuse_what_is_not_a_hash() {
        assert_eq!(
            cache_name("ab12", "0123456789abcdef0123").unwrap(),
            "ab12-0123456789abcdef"
        );
        for bad in ["", "../x", "ab/12", "v1"] {
            assert!(cache_name(bad, "00").is_err(), "{bad:?} was accepted");
        }
    }
}
