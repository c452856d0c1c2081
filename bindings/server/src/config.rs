//! Server settings: where to listen, request limits, the shutdown grace period, and the optional
//! API key.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    time::Duration,
};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{Result, ServerError};

/// How the HTTP server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The address to listen on (port 0 picks a free port).
    pub bind: SocketAddr,
    /// Largest request body accepted; a larger one gets 413.
    pub body_limit_bytes: usize,
    /// Longest a request may run; a slower one gets 504 and its episode is abandoned.
    pub request_timeout: Duration,
    /// When set, every `/v1/*` and `/metrics` request must present this key.
    pub api_key: Option<ApiKey>,
    /// After shutdown begins, how long in-flight requests may still run before they are
    /// answered with 503 and abandoned.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            // A question with sampling overrides is well under 1 KiB; 64 KiB leaves room for
            // long questions while keeping a flood of large bodies cheap to refuse.
            body_limit_bytes: 64 * 1024,
            // One real-model episode takes about 8 s on a 2-core CPU; two minutes leaves room
            // for a queue of concurrent episodes without letting a stuck one hold a connection
            // forever.
            request_timeout: Duration::from_secs(120),
            api_key: None,
            shutdown_grace: Duration::from_secs(60),
        }
    }
}

impl ServerConfig {
    /// Checks every value, so a bad setting fails before the server starts.
    pub fn validate(&self) -> Result<()> {
        if self.body_limit_bytes == 0 {
            return Err(ServerError::Config(
                "the body limit must be at least 1 byte".into(),
            ));
        }
        if self.request_timeout.is_zero() {
            return Err(ServerError::Config(
                "the request timeout must be longer than zero".into(),
            ));
        }
        Ok(())
    }
}

/// A secret API key. Only its SHA-256 digest is kept, so the key never appears in logs or
/// debug output, and comparing digests takes the same time whatever the presented key's length
/// or content.
#[derive(Clone)]
pub struct ApiKey {
    digest: [u8; 32],
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// A key from its text. Surrounding whitespace is dropped (a key file usually ends with a
    /// newline); the rest must be 1-1024 visible ASCII characters, since clients send it in an
    /// HTTP header. The error says what is wrong without showing the key.
    pub fn new(key: &str) -> std::result::Result<Self, String> {
        let key = key.trim();
        if key.is_empty() {
            return Err("the key is empty".into());
        }
        if key.len() > 1024 {
            return Err(format!(
                "the key is {} bytes long; at most 1024 are accepted",
                key.len()
            ));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the key must be visible ASCII characters without spaces (it travels in an HTTP header)"
                    .into(),
            );
        }
        Ok(Self {
            digest: Sha256::digest(key.as_bytes()).into(),
        })
    }

    /// The key held by the environment variable `name`.
    pub fn from_env(name: &str) -> Result<Self> {
        let error = |reason: String| ServerError::ApiKeyEnv {
            name: name.to_string(),
            reason,
        };
        match std::env::var(name) {
            Ok(value) => Self::new(&value).map_err(error),
            Err(std::env::VarError::NotPresent) => Err(error("it is not set".into())),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(error("its value is not valid Unicode".into()))
            }
        }
    }

    /// The key held by the file at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let error = |reason: String| ServerError::ApiKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        Self::new(&text).map_err(error)
    }

    /// Whether `presented` is the key, in time independent of where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_matches_itself_only() {
        let key = ApiKey::new(" s3cret-key\n").unwrap();
        assert!(key.matches(b"s3cret-key"));
        assert!(!key.matches(b"s3cret-kez"));
        assert!(!key.matches(b"s3cret-key "));
        assert!(!key.matches(b""));
        assert_eq!(format!("{key:?}"), "ApiKey(<redacted>)");
    }

    #[test]
    fn unusable_keys_are_refused_without_showing_them() {
        for empty in ["", "  \n"] {
            assert!(ApiKey::new(empty).unwrap_err().contains("empty"));
        }
        for bad in ["two words", "tab\there", "caf\u{e9}"] {
            let err = ApiKey::new(bad).unwrap_err();
            assert!(err.contains("visible ASCII") && !err.contains(bad), "{err}");
        }
        assert!(
            ApiKey::new(&"k".repeat(1025))
                .unwrap_err()
                .contains("1025 bytes")
        );
    }

    #[test]
    fn key_sources_name_what_is_wrong() {
        let err = ApiKey::from_env("SEARCHLOOP_SERVER_TEST_UNSET_KEY")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SEARCHLOOP_SERVER_TEST_UNSET_KEY") && err.contains("not set"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.key");
        let err = ApiKey::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing.key"), "{err}");
        let empty = dir.path().join("empty.key");
        std::fs::write(&empty, "\n").unwrap();
        let err = ApiKey::from_file(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.key") && err.contains("empty"), "{err}");
        let good = dir.path().join("good.key");
        std::fs::write(&good, "abc123\n").unwrap();
        assert!(ApiKey::from_file(&good).unwrap().matches(b"abc123"));
    }

    #[test]
    fn zero_limits_are_refused() {
        assert!(ServerConfig::default().validate().is_ok());
        let config = ServerConfig {
            body_limit_bytes: 0,
            ..ServerConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("body limit")
        );
        let config = ServerConfig {
            request_timeout: Duration::ZERO,
            ..ServerConfig::default()
        };
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("timeout")
        );
    }
}
