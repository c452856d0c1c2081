//! Running the server: binding the socket, serving, and shutting down gracefully.

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    config::ServerConfig,
    error::{Result, ServerError},
    routes::router,
    state::AppState,
};

/// How long abandoned requests get to send their 503 before [`serve`] returns.
const ABANDON_FLUSH: Duration = Duration::from_secs(2);

/// Opens the listening socket named by `config.bind`.
pub async fn bind(config: &ServerConfig) -> Result<TcpListener> {
    TcpListener::bind(config.bind)
        .await
        .map_err(|source| ServerError::Bind {
            addr: config.bind,
            source,
        })
}

/// Serves requests on `listener` until `shutdown` completes, then shuts down gracefully.
///
/// Shutdown stops accepting connections, answers new questions on open connections with 503,
/// reports 503 from `/healthz`, and waits for the requests in flight (their episodes finish and
/// are recorded). Requests still running after `config.shutdown_grace` are answered with 503 and
/// abandoned, and the result is [`ServerError::ShutdownTimeout`].
pub async fn serve<F>(
    listener: TcpListener,
    state: AppState,
    config: &ServerConfig,
    shutdown: F,
) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    config.validate()?;
    let app = router(state.clone(), config);
    let begun = CancellationToken::new();
    let signal = {
        let state = state.clone();
        let begun = begun.clone();
        async move {
            shutdown.await;
            tracing::info!(
                in_flight = state.metrics().in_flight(),
                "shutting down: finishing the requests in flight"
            );
            state.begin_shutdown();
            begun.cancel();
        }
    };
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, app).with_graceful_shutdown(signal),
    );
    tokio::pin!(server);
    let grace = config.shutdown_grace;
    tokio::select! {
        result = &mut server => return result.map_err(ServerError::Serve),
        () = async {
            begun.cancelled().await;
            tokio::time::sleep(grace).await;
        } => {}
    }
    let abandoned = state.metrics().in_flight();
    state.abandon_token().cancel();
    if tokio::time::timeout(ABANDON_FLUSH, &mut server)
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close after their requests were abandoned");
    }
    Err(ServerError::ShutdownTimeout { grace, abandoned })
}
