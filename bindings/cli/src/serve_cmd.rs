//! `searchloop serve`: the HTTP service (ask, feedback, trajectories, adapters, training, health,
//! metrics) over the config's agent and store, with `--learn` the training scheduler attached,
//! until Ctrl-C or SIGTERM, then a graceful shutdown that lets the episodes in flight finish.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use searchloop_runtime::{AppConfig, Runtime};
use searchloop_server::{ApiKey, AppState, ServerConfig};

/// Options of `searchloop serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The address to listen on (port 0 picks a free one).
    #[arg(long, default_value_t = ServerConfig::default().bind)]
    pub bind: SocketAddr,
    /// Require the API key held by this environment variable on /v1/* and /metrics.
    #[arg(long, value_name = "VAR", conflicts_with = "api_key_file")]
    pub api_key_env: Option<String>,
    /// Require the API key held by this file on /v1/* and /metrics.
    #[arg(long, value_name = "PATH")]
    pub api_key_file: Option<PathBuf>,
    /// The largest request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().body_limit_bytes)]
    pub body_limit: usize,
    /// The longest a request may run, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = ServerConfig::default().request_timeout.as_secs_f64())]
    pub timeout: f64,
    /// After Ctrl-C or SIGTERM, how long the requests in flight may still run, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = ServerConfig::default().shutdown_grace.as_secs_f64())]
    pub shutdown_grace: f64,
    /// Attach the training scheduler of the config's [learn] section: rounds start on its
    /// triggers, and candidates that pass the eval gate are promoted while serving goes on.
    #[arg(long)]
    pub learn: bool,
    /// Without --learn: check the adapter registry every this many seconds, and serve what
    /// another process (the fleet's trainer) promoted or rolled back (0: never).
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub follow: f64,
    /// This replica's name in a fleet, recorded with every trajectory it serves and reported
    /// by /healthz and /metrics; default: the config's `replica_id`, else `HOSTNAME:PORT`.
    #[arg(long, value_name = "ID", env = "SEARCHLOOP_REPLICA_ID")]
    pub replica_id: Option<String>,
}

impl ServeArgs {
    /// The server settings, with the API key read and every value checked.
    fn server_config(&self) -> anyhow::Result<ServerConfig> {
        let api_key = match (&self.api_key_env, &self.api_key_file) {
            (Some(name), _) => Some(ApiKey::from_env(name)?),
            (None, Some(path)) => Some(ApiKey::from_file(path)?),
            (None, None) => None,
        };
        let config = ServerConfig {
            bind: self.bind,
            body_limit_bytes: self.body_limit,
            request_timeout: seconds("--timeout", self.timeout)?,
            api_key,
            shutdown_grace: seconds("--shutdown-grace", self.shutdown_grace)?,
        };
        config.validate()?;
        Ok(config)
    }
}

fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .with_context(|| format!("{flag} must be a number of seconds >= 0, got {value}"))
}

/// Runs the server until Ctrl-C or SIGTERM.
pub async fn run(mut config: AppConfig, args: ServeArgs) -> anyhow::Result<()> {
    let server_config = args.server_config()?;
    let follow = seconds("--follow", args.follow)?;
    let learn = match (args.learn, &config.learn) {
        (false, _) => None,
        (true, Some(learn)) => Some(learn.clone()),
        (true, None) => anyhow::bail!("--learn needs a [learn] section in the config"),
    };
    // Bind before loading the model, so a taken port fails at once; connections that arrive
    // during the load wait in the listen queue and are served when it is done.
    let listener = searchloop_server::bind(&server_config).await?;
    let addr = listener
        .local_addr()
        .context("cannot read the listening address")?;
    if let Some(replica) = args.replica_id {
        config.replica_id = Some(replica);
    }
    if config.replica_id.is_none() {
        let host = whoami::fallible::hostname().context(
            "cannot read this machine's host name for the default replica id; name the replica \
             with --replica-id",
        )?;
        config.replica_id = Some(format!("{host}:{}", addr.port()));
    }
    eprintln!("loading the model…");
    let runtime = Arc::new(Runtime::start(config).await?);
    if let Some(learn) = learn {
        runtime.attach_scheduler(learn).await?;
        eprintln!("training scheduler attached");
    } else if !follow.is_zero() {
        runtime.learning().follow_registry(follow);
    }
    println!("searchloop serving on http://{addr}");
    let state = AppState::from_runtime(runtime.clone());
    let served = searchloop_server::serve(listener, state, &server_config, shutdown_signal()).await;
    // A round still running is cancelled: it leaves nothing but its log, and the next start
    // begins from the registry as it is.
    runtime.detach_scheduler().await;
    runtime.store().close().await;
    served?;
    eprintln!("stopped: every request in flight was answered");
    Ok(())
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM. A signal handler that cannot be installed is
/// reported and waits forever instead, so it never stops the server by itself.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
    eprintln!("shutting down: finishing the requests in flight…");
}
