//! `searchloop adapters`: the adapter registry from the command line: list, show, promote and
//! roll back.
//!
//! These commands change the registry, which is the truth every serving process follows: a
//! process restarts on the promoted adapter, and one with the scheduler attached swaps to it
//! within a poll. Before writing, promote and rollback load the target model, so a model that
//! does not load is never made the one to serve.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use clap::Subcommand;
use searchloop_loop::adapters::merged_model_path;
use searchloop_runtime::{
    AdapterManager, AppConfig, ModelLoader,
    service::{adapter_locator, open_store},
};
use searchloop_store_sql::AdapterRecord;

/// `searchloop adapters …`.
#[derive(Debug, Subcommand)]
pub enum AdaptersCommand {
    /// List every adapter: version, status, parent, held-out scores, and why it was rejected or
    /// rolled back.
    List,
    /// Print one adapter's registry record as JSON.
    Show {
        /// The adapter version.
        version: u64,
    },
    /// Promote an adapter (a candidate, or a formerly promoted one) after checking that its
    /// merged model loads.
    Promote {
        /// The adapter version.
        version: u64,
    },
    /// Roll the promoted adapter back: to the previously promoted one still available, or to
    /// the base model when there is none.
    Rollback {
        /// Roll back to this formerly promoted (superseded) version instead.
        #[arg(long)]
        to: Option<u64>,
        /// Why, recorded in the registry.
        #[arg(long, default_value = "manual rollback from the command line")]
        reason: String,
    },
}

/// Runs an `adapters` command against the config's store.
pub async fn run(config: &AppConfig, command: AdaptersCommand) -> anyhow::Result<()> {
    let store = Arc::new(
        open_store(config)
            .await
            .with_context(|| format!("cannot open the store {}", config.store.url))?,
    );
    let manager = AdapterManager::registry_only(
        adapter_locator(config, store.clone()),
        Arc::new(ModelLoader::new(config.model.clone())),
    );
    let result = execute(&manager, command).await;
    store.close().await;
    result
}

async fn execute(manager: &AdapterManager, command: AdaptersCommand) -> anyhow::Result<()> {
    match command {
        AdaptersCommand::List => {
            let adapters = manager.list().await?;
            if adapters.is_empty() {
                println!("no adapters yet: the base model serves");
            }
            for adapter in &adapters {
                println!("{}", list_line(adapter));
            }
        }
        AdaptersCommand::Show { version } => {
            let record = manager.get(version).await?;
            let mut json = serde_json::to_value(&record)?;
            if let Some(map) = json.as_object_mut() {
                map.insert(
                    "merged_model".into(),
                    merged_model_path(Path::new(&record.path))
                        .display()
                        .to_string()
                        .into(),
                );
            }
            println!("{}", serde_json::to_string_pretty(&json)?);
        }
        AdaptersCommand::Promote { version } => {
            eprintln!("checking that adapter v{version} loads…");
            manager.promote(version).await?;
            println!("adapter v{version} is promoted");
        }
        AdaptersCommand::Rollback { to, reason } => {
            let report = manager.rollback(to, &reason).await?;
            match report.to {
                Some(v) => println!("rolled back: adapter v{v} is promoted"),
                None => println!("rolled back: the base model serves"),
            }
        }
    }
    Ok(())
}

/// One line of `adapters list`.
fn list_line(a: &AdapterRecord) -> String {
    let parent = a
        .parent_version
        .map_or_else(|| "base".to_string(), |p| format!("v{p}"));
    let eval = a
        .eval_results
        .as_ref()
        .and_then(|e| e.get("candidate"))
        .map(|c| {
            let get = |k: &str| c.get(k).and_then(|v| v.as_f64()).unwrap_or(f64::NAN);
            format!("  EM {:.3} F1 {:.3}", get("em"), get("f1"))
        })
        .unwrap_or_default();
    let reason = a
        .status_reason
        .as_deref()
        .map(|r| format!("  ({r})"))
        .unwrap_or_default();
    format!(
        "v{:<4} {:<11} from {:<5} {}{eval}{reason}",
        a.version,
        a.status.as_str(),
        parent,
        a.created_at.format("%Y-%m-%d %H:%M:%S"),
    )
}
