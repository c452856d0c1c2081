//! The SQLite files this process holds open as stores, so that the raw header check never opens
//! and closes a file this process already has SQLite connections on.
//!
//! SQLite coordinates processes with POSIX advisory locks, and those belong to the process and
//! the file, not to a descriptor: closing *any* descriptor of the database file drops every lock
//! the process holds on it, including the locks of its live SQLite connections. Another process
//! may then take the exclusive lock, checkpoint, and delete the WAL and its index while this
//! process still has them mapped; from then on this process's connections read a deleted WAL
//! and never see commits made elsewhere. A store opened a second time in a process that already
//! has it open (a host that opens the store next to a running runtime, a restart inside one
//! process) would trigger exactly that, so the header check runs only for the first opening.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex, PoisonError},
};

/// Open stores per file (by canonical path) in this process.
static OPEN: LazyLock<Mutex<HashMap<PathBuf, usize>>> = LazyLock::new(Mutex::default);

/// One store's claim on its SQLite file; dropping it gives the claim back.
#[derive(Debug)]
pub(crate) struct OpenFile {
    key: PathBuf,
}

impl OpenFile {
    /// Claims `path` for a store being opened. `first_open` runs (under the registry's lock, so
    /// no other opening in this process can race it) only when no store in this process holds
    /// the file; its error leaves no claim behind.
    pub(crate) fn claim<E>(
        path: &Path,
        first_open: impl FnOnce() -> Result<(), E>,
    ) -> Result<Self, E> {
        let key = canonical(path);
        let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
        let holders = open.get(&key).copied().unwrap_or(0);
        if holders == 0 {
            first_open()?;
        }
        open.insert(key.clone(), holders + 1);
        Ok(Self { key })
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
        match open.get_mut(&self.key) {
            Some(holders) if *holders > 1 => *holders -= 1,
            _ => {
                open.remove(&self.key);
            }
        }
    }
}

/// One name per file: symbolic links and relative paths resolve to the same key. A file that
/// does not exist yet is named through its (existing) folder.
fn canonical(path: &Path) -> PathBuf {
    if let Ok(path) = path.canonicalize() {
        return path;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            parent
                .canonicalize()
                .map_or_else(|_| path.to_path_buf(), |p| p.join(name))
        }
        _ => path.to_path_buf(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn only_the_first_claim_of_a_file_runs_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("store.db");
        std::fs::write(&file, b"").unwrap();
        let link = dir.path().join("link.db");
        std::os::unix::fs::symlink(&file, &link).unwrap();

        let mut checks = 0;
        let first = OpenFile::claim(&file, || {
            checks += 1;
            Ok::<_, ()>(())
        })
        .unwrap();
        // The same file under another name is the same claim.
        let second = OpenFile::claim(&link, || {
            checks += 1;
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(checks, 1);
        drop(first);
        drop(second);
        let _third = OpenFile::claim(&file, || {
            checks += 1;
            Ok::<_, ()>(())
        })
        .unwrap();
        assert_eq!(checks, 2, "a file nobody holds is checked again");
    }

    #[test]
    fn a_failed_check_leaves_no_claim() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("new.db");
        assert!(OpenFile::claim(&file, || Err("refused")).is_err());
        let mut checked = false;
        let _claim = OpenFile::claim(&file, || {
            checked = true;
            Ok::<_, ()>(())
        })
        .unwrap();
        assert!(checked, "the refused opening left no claim behind");
    }
}
