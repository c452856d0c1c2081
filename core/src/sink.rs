//! Where finished episodes go: the [`TrajectorySink`] contract, and a durable JSONL file sink
//! for hosts that want no database.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Mutex,
};

use async_trait::async_trait;

use crate::{
    error::{Error, Result},
    trajectory::Trajectory,
};

/// Receives every finished episode. `record` returns only once the episode is durable, so an
/// acknowledged episode survives a crash.
#[async_trait]
pub trait TrajectorySink: Send + Sync {
    /// Stores one trajectory (with the rewards computed at episode end).
    async fn record(&self, trajectory: &Trajectory) -> Result<()>;
}

/// Appends trajectories to a JSON-lines file, one object per line, synced to disk per record.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl JsonlSink {
    /// Opens (or creates) `path` for appending.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| Error::Io {
                context: format!("cannot open trajectory file {}", path.display()),
                source,
            })?;
        Ok(Self {
            path,
            file: Mutex::new(file),
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[async_trait]
impl TrajectorySink for JsonlSink {
    async fn record(&self, trajectory: &Trajectory) -> Result<()> {
        let mut line = serde_json::to_vec(trajectory).map_err(|e| Error::Sink(e.to_string()))?;
        line.push(b'\n');
        let mut file = self
            .file
            .lock()
            .map_err(|_| Error::Sink("trajectory file lock poisoned".into()))?;
        // One write call per line keeps lines whole under O_APPEND, and the sync makes the
        // record durable before it is acknowledged.
        file.write_all(&line)
            .and_then(|()| file.sync_data())
            .map_err(|source| Error::Io {
                context: format!("cannot append to {}", self.path.display()),
                source,
            })
    }
}
