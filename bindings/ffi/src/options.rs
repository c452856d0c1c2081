//! The typed agent options a host passes instead of (or on top of) a config file, and the
//! scripted policy options of the test and benchmark constructor.

use std::path::{Path, PathBuf};

use searchloop_runtime::{
    AppConfig,
    config::{CatalogSection, ToolFile, ToolSection},
};

use crate::error::{Result, SearchloopError};

/// How to build an agent. Every field is optional: with `config_path` the file is the base and
/// the other fields override it; without it the runtime's defaults are the base, and at least
/// one configured tool is needed. Relative paths are taken from the process's working folder
/// (paths inside a config file stay relative to that file).
#[derive(Debug, Clone, Default, PartialEq, uniffi::Record)]
pub struct AgentOptions {
    /// A `searchloop.toml` (or `.json`) config file.
    #[uniffi(default = None)]
    pub config_path: Option<String>,
    /// A GGUF model file; absent means the config's, or the embedded default model.
    #[uniffi(default = None)]
    pub model_path: Option<String>,
    /// Where the model serves and trains: `"cpu"` or `"cuda:N"` (which needs a library built
    /// with the `cuda` feature); absent means the config's, or the CPU.
    #[uniffi(default = None)]
    pub device: Option<String>,
    /// Product catalogs to search, added after the config's tools.
    #[uniffi(default = [])]
    pub catalogs: Vec<CatalogOptions>,
    /// SQL inventory tool files (the `searchloop-search-sql` format), added after the catalogs.
    #[uniffi(default = [])]
    pub sql_tool_files: Vec<String>,
    /// HTTP search tool files (the `searchloop-search-http` format), added after those.
    #[uniffi(default = [])]
    pub http_tool_files: Vec<String>,
    /// The tool `<search>` calls: a configured tool or a host tool. Absent means the config's
    /// choice, else the first tool.
    #[uniffi(default = None)]
    pub default_tool: Option<String>,
    /// The trajectory store: a SQLite file path, a `sqlite://` URL or a `postgres://` URL.
    #[uniffi(default = None)]
    pub store_url: Option<String>,
    /// Sampling temperature of the model's turns (0 is greedy).
    #[uniffi(default = None)]
    pub temperature: Option<f32>,
    /// Nucleus sampling: draw from the smallest set of tokens holding this much probability
    /// (1 is off).
    #[uniffi(default = None)]
    pub top_p: Option<f32>,
    /// Draw from the `top_k` most likely tokens only (0 is off).
    #[uniffi(default = None)]
    pub top_k: Option<u32>,
    /// Most tool-calling turns before the final, answer-only turn.
    #[uniffi(default = None)]
    pub max_turns: Option<u32>,
    /// A tool call running longer is abandoned and reported to the model as a timeout.
    #[uniffi(default = None)]
    pub tool_timeout_ms: Option<u64>,
}

/// A product catalog tool: a tantivy index folder, filled from catalog files when empty.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct CatalogOptions {
    /// The tool's name.
    #[uniffi(default = "catalog")]
    pub name: String,
    /// The index folder (created if missing).
    pub index: String,
    /// JSONL or CSV catalog files indexed when the index is empty.
    #[uniffi(default = [])]
    pub products: Vec<String>,
    /// Results per search.
    #[uniffi(default = 3)]
    pub results: u32,
}

/// A scripted stand-in for the model, for host tests and overhead benchmarks: every episode
/// searches the default tool for the question itself, then answers `answer`.
#[derive(Debug, Clone, PartialEq, uniffi::Record)]
pub struct ScriptedPolicyOptions {
    /// The answer of every episode.
    #[uniffi(default = "scripted answer")]
    pub answer: String,
    /// Milliseconds every model turn takes, like a model of fixed cost.
    #[uniffi(default = 0)]
    pub turn_delay_ms: u64,
}

impl AgentOptions {
    /// The application config these options describe, not yet validated (starting the
    /// runtime validates it).
    pub(crate) fn app_config(&self) -> Result<AppConfig> {
        let mut config = match &self.config_path {
            Some(path) => AppConfig::load(Path::new(path))?,
            None => AppConfig::default(),
        };
        if let Some(path) = &self.model_path {
            config.model.path = Some(PathBuf::from(path));
        }
        if let Some(device) = &self.device {
            config.model.device = device
                .parse()
                .map_err(|e: searchloop_core::Error| SearchloopError::Config(e.to_string()))?;
        }
        for catalog in &self.catalogs {
            config.tools.push(ToolSection::Catalog(CatalogSection {
                name: catalog.name.clone(),
                index: PathBuf::from(&catalog.index),
                products: catalog.products.iter().map(PathBuf::from).collect(),
                default_limit: catalog.results as usize,
                blocking_pool: false,
            }));
        }
        let files = |paths: &[String]| -> Vec<ToolFile> {
            paths
                .iter()
                .map(|file| ToolFile {
                    file: PathBuf::from(file),
                })
                .collect()
        };
        config.tools.extend(
            files(&self.sql_tool_files)
                .into_iter()
                .map(ToolSection::Sql),
        );
        config.tools.extend(
            files(&self.http_tool_files)
                .into_iter()
                .map(ToolSection::Http),
        );
        if let Some(name) = &self.default_tool {
            config.default_tool = Some(name.clone());
        }
        if let Some(url) = &self.store_url {
            config.store.url = url.clone();
        }
        if let Some(temperature) = self.temperature {
            config.agent.sampling.temperature = temperature;
        }
        if let Some(top_p) = self.top_p {
            config.agent.sampling.top_p = top_p;
        }
        if let Some(top_k) = self.top_k {
            config.agent.sampling.top_k = top_k as usize;
        }
        if let Some(max_turns) = self.max_turns {
            config.agent.protocol.max_turns = max_turns as usize;
        }
        if let Some(timeout_ms) = self.tool_timeout_ms {
            config.tool_limits.timeout_ms = timeout_ms;
        }
        let cwd = std::env::current_dir().map_err(|e| {
            SearchloopError::Config(format!(
                "cannot read the working folder to resolve relative paths: {e}"
            ))
        })?;
        config.resolve_paths(&cwd);
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_override_the_file_and_relative_paths_resolve() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("searchloop.toml");
        std::fs::write(
            &path,
            "[[tools]]\nkind = \"catalog\"\nindex = \"index\"\n[store]\nurl = \"a.db\"\n",
        )
        .unwrap();
        let options = AgentOptions {
            config_path: Some(path.to_string_lossy().into_owned()),
            catalogs: vec![CatalogOptions {
                name: "more".into(),
                index: "more-index".into(),
                products: vec![],
                results: 5,
            }],
            sql_tool_files: vec!["inventory.toml".into()],
            default_tool: Some("more".into()),
            store_url: Some("sqlite://elsewhere.db".into()),
            temperature: Some(0.0),
            top_p: Some(0.9),
            top_k: Some(40),
            max_turns: Some(2),
            tool_timeout_ms: Some(500),
            device: Some("cpu".into()),
            ..AgentOptions::default()
        };
        let config = options.app_config().unwrap();
        assert_eq!(config.model.device, searchloop_core::Device::Cpu);
        let cwd = std::env::current_dir().unwrap();
        let [
            ToolSection::Catalog(first),
            ToolSection::Catalog(more),
            ToolSection::Sql(sql),
        ] = config.tools.as_slice()
        else {
            panic!("three tools in order: {:?}", config.tools);
        };
        assert_eq!(first.index, dir.path().join("index"));
        assert_eq!(more.index, cwd.join("more-index"));
        assert_eq!(more.default_limit, 5);
        assert_eq!(sql.file, cwd.join("inventory.toml"));
        assert_eq!(config.default_tool.as_deref(), Some("more"));
        assert_eq!(config.store.url, "sqlite://elsewhere.db");
        assert_eq!(config.agent.sampling.temperature, 0.0);
        assert_eq!(config.agent.sampling.top_p, 0.9);
        assert_eq!(config.agent.sampling.top_k, 40);
        assert_eq!(config.agent.protocol.max_turns, 2);
        assert_eq!(config.tool_limits.timeout_ms, 500);
    }

    #[test]
    fn a_bad_device_is_a_config_error() {
        let options = AgentOptions {
            device: Some("gpu0".into()),
            ..AgentOptions::default()
        };
        let err = options.app_config().unwrap_err();
        assert!(matches!(err, SearchloopError::Config(_)), "{err:?}");
        assert!(err.to_string().contains("not a device"), "{err}");
    }

    #[test]
    fn a_bad_file_is_a_config_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, "[model]\nweigths = \"q8_0\"\n").unwrap();
        let options = AgentOptions {
            config_path: Some(path.to_string_lossy().into_owned()),
            ..AgentOptions::default()
        };
        let err = options.app_config().unwrap_err();
        assert!(matches!(err, SearchloopError::Config(_)), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("broken.toml") && message.contains("weigths"),
            "{message}"
        );
    }
}
