//! The router: the endpoints, and the layers around them (metrics outermost, then the
//! request time limit, then the API key check on protected routes, then the body limit).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, MatchedPath, Path, Request, State, rejection::PathRejection},
    http::{Method, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use searchloop_core::{AgentConfig, EpisodeRequest, Trajectory, tool::truncate_chars};
use searchloop_runtime::{Runtime, SwapReport};
use searchloop_store_sql::FeedbackInput;

use crate::{
    api::{
        AdaptersResponse, ApiError, AskRequest, AskResponse, FeedbackRequest, FeedbackResponse,
        HealthResponse, JsonBody, JsonBodyOrDefault, LastRound, RollbackRequest, TrainStatus,
    },
    config::{ApiKey, ServerConfig},
    metrics::{StoreSnapshot, render_loop},
    state::AppState,
};

/// Longest trajectory id the store accepts; a longer one cannot name a trajectory.
const MAX_ID_LEN: usize = 256;

/// The server's routes with all their layers, ready for [`axum::serve`].
///
/// `/healthz` is always open; `/v1/*` and `/metrics` need the API key when one is configured.
pub fn router(state: AppState, config: &ServerConfig) -> Router {
    let mut protected = Router::new()
        .route("/v1/ask", post(ask))
        .route("/v1/feedback", post(feedback))
        .route("/v1/trajectories/{id}", get(trajectory))
        .route("/v1/adapters", get(adapters))
        .route("/v1/adapters/{version}/promote", post(promote))
        .route("/v1/adapters/rollback", post(rollback))
        .route("/v1/train", post(train).get(train_status))
        .route("/metrics", get(metrics));
    if let Some(key) = &config.api_key {
        protected = protected.route_layer(middleware::from_fn_with_state(
            Arc::new(key.clone()),
            require_api_key,
        ));
    }
    let limit = TimeLimit {
        timeout: config.request_timeout,
        state: state.clone(),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(config.body_limit_bytes))
        .layer(middleware::from_fn_with_state(limit, limit_time))
        .layer(middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// `POST /v1/ask`: runs one episode and returns its answer and trajectory id.
async fn ask(
    State(state): State<AppState>,
    Extension(arrival): Extension<Arrival>,
    JsonBody(request): JsonBody<AskRequest>,
) -> Result<Json<AskResponse>, ApiError> {
    if arrival.during_shutdown {
        return Err(ApiError::shutting_down(
            "the server is shutting down and takes no new questions",
        ));
    }
    let agent = state.agent();
    let sampling = request.sampling(&agent.config().sampling)?;
    let overrides = request.overrides_sampling();
    let episode = EpisodeRequest {
        seed: request.seed,
        ..EpisodeRequest::new(request.question)
    };
    let started = Instant::now();
    let result = if overrides {
        let config = AgentConfig {
            sampling,
            ..agent.config().clone()
        };
        match agent.reconfigured(config) {
            Ok(agent) => agent.run(episode).await,
            Err(e) => Err(e),
        }
    } else {
        agent.run(episode).await
    };
    let trajectory = result.map_err(|e| {
        state.metrics().episode_failed();
        ApiError::from_episode(e)
    })?;
    state.metrics().episode_finished(&trajectory);
    Ok(Json(AskResponse {
        answer: trajectory.answer,
        trajectory_id: trajectory.id,
        end: trajectory.end,
        turns: trajectory.turns,
        tool_calls: trajectory.tool_calls,
        latency_ms: started.elapsed().as_secs_f64() * 1e3,
        adapter_version: trajectory.adapter_version,
        model_id: trajectory.model_id,
    }))
}

/// `POST /v1/feedback`: adds a host reward to a trajectory's ledger.
async fn feedback(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<FeedbackRequest>,
) -> Result<Json<FeedbackResponse>, ApiError> {
    let input = FeedbackInput {
        source: request.source,
        value: request.value,
        weight: request.weight.unwrap_or(1.0),
        idempotency_key: request.idempotency_key,
        at: None,
    };
    let outcome = state
        .store()
        .add_feedback(&request.trajectory_id, input)
        .await
        .map_err(ApiError::from_store)?;
    state.metrics().feedback(outcome);
    Ok(Json(FeedbackResponse {
        trajectory_id: request.trajectory_id,
        outcome,
    }))
}

/// `GET /v1/trajectories/{id}`: the stored trajectory with its whole reward ledger.
async fn trajectory(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Trajectory>, ApiError> {
    let Path(id) =
        id.map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", e.body_text()))?;
    if id.len() > MAX_ID_LEN {
        return Err(ApiError::unknown_trajectory(&truncate_chars(&id, 64)));
    }
    match state
        .store()
        .get_trajectory(&id)
        .await
        .map_err(ApiError::from_store)?
    {
        Some(trajectory) => Ok(Json(trajectory)),
        None => Err(ApiError::unknown_trajectory(&id)),
    }
}

/// The runtime behind adapter and training requests; a server over a bare agent has none.
fn runtime_of(state: &AppState) -> Result<Arc<Runtime>, ApiError> {
    state.runtime().cloned().ok_or_else(|| {
        ApiError::learning_unavailable(
            "this server runs a bare agent, without the runtime that owns adapters and training",
        )
    })
}

/// `GET /v1/adapters`: the adapter registry and the version serving here.
async fn adapters(State(state): State<AppState>) -> Result<Json<AdaptersResponse>, ApiError> {
    let runtime = runtime_of(&state)?;
    let adapters = runtime.adapters().await.map_err(ApiError::from_runtime)?;
    Ok(Json(AdaptersResponse {
        serving_version: runtime.loop_metrics().serving_version,
        adapters,
    }))
}

/// `POST /v1/adapters/{version}/promote`: promotes a candidate (or superseded) adapter and
/// swaps it in; episodes in flight finish on the model they started with.
async fn promote(
    State(state): State<AppState>,
    version: Result<Path<u64>, PathRejection>,
) -> Result<Json<SwapReport>, ApiError> {
    let Path(version) = version.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_version",
            format!(
                "the adapter version must be a whole number: {}",
                e.body_text()
            ),
        )
    })?;
    let runtime = runtime_of(&state)?;
    let swap = runtime
        .promote(version)
        .await
        .map_err(ApiError::from_runtime)?;
    Ok(Json(swap))
}

/// `POST /v1/adapters/rollback`: returns to an earlier promoted adapter (or the base model).
async fn rollback(
    State(state): State<AppState>,
    JsonBodyOrDefault(request): JsonBodyOrDefault<RollbackRequest>,
) -> Result<Json<SwapReport>, ApiError> {
    let runtime = runtime_of(&state)?;
    let swap = runtime
        .rollback(request.to)
        .await
        .map_err(ApiError::from_runtime)?;
    Ok(Json(swap))
}

/// `POST /v1/train`: starts a training round (with its eval gate) in the background and
/// answers 202 at once, since a round takes minutes; `GET /v1/train` tells how it ended.
async fn train(State(state): State<AppState>) -> Result<Response, ApiError> {
    let runtime = runtime_of(&state)?;
    if state.is_shutting_down() {
        return Err(ApiError::shutting_down(
            "the server is shutting down and starts no training round",
        ));
    }
    if !runtime.learning_configured() {
        return Err(ApiError::learning_unavailable(
            "training needs a [learn] section in the server's config",
        ));
    }
    if runtime.loop_metrics().round_running || !state.claim_round() {
        return Err(ApiError::round_busy());
    }
    let background = state.clone();
    tokio::spawn(async move {
        let last = match runtime.train_now().await {
            Ok(report) => LastRound {
                report: Some(report),
                error: None,
            },
            Err(e) => {
                tracing::warn!(error = %e, "training round started over HTTP failed");
                LastRound {
                    report: None,
                    error: Some(e.to_string()),
                }
            }
        };
        background.round_finished(last);
    });
    let (running, last) = state.rounds();
    Ok((StatusCode::ACCEPTED, Json(TrainStatus { running, last })).into_response())
}

/// `GET /v1/train`: whether a round started over HTTP runs, and how the last one ended.
async fn train_status(State(state): State<AppState>) -> Result<Json<TrainStatus>, ApiError> {
    runtime_of(&state)?;
    let (running, last) = state.rounds();
    Ok(Json(TrainStatus { running, last }))
}

/// `GET /healthz`: 200 while serving, 503 once shutdown has begun.
async fn healthz(State(state): State<AppState>) -> Response {
    let policy = state.agent().policy().current();
    let (status, label) = if state.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    } else {
        (StatusCode::OK, "ok")
    };
    let body = HealthResponse {
        status: label.to_string(),
        model_id: policy.model_id().to_string(),
        adapter_version: policy.adapter_version(),
        replica_id: state.agent().replica_id().map(str::to_string),
        in_flight: state.metrics().in_flight(),
        registry_error: state
            .runtime()
            .and_then(|runtime| runtime.loop_metrics().registry_sync_error),
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text. A store that cannot be read is reported as
/// `searchloop_store_up 0`, not as a failed scrape.
async fn metrics(State(state): State<AppState>) -> Response {
    let store = state.store();
    let snapshot = match tokio::try_join!(store.stats(), store.reward_counts_by_source()) {
        Ok((stats, by_source)) => StoreSnapshot::Read { stats, by_source },
        Err(e) => {
            tracing::warn!(error = %e, "metrics: the store could not be read");
            StoreSnapshot::Unavailable
        }
    };
    let policy = state.agent().policy().current();
    let mut text = state.metrics().render(
        policy.model_id(),
        policy.adapter_version(),
        state.agent().replica_id(),
        &snapshot,
    );
    if let Some(runtime) = state.runtime() {
        render_loop(&mut text, &runtime.loop_metrics());
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {method} {}", truncate_chars(uri.path(), 200)),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} does not accept {method}",
            truncate_chars(uri.path(), 200)
        ),
    )
}

/// Lets a request through only with the API key, as `Authorization: Bearer <key>` or
/// `X-API-Key: <key>`.
async fn require_api_key(State(key): State<Arc<ApiKey>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    // An Authorization header of another scheme is a wrong credential, not a missing one.
    let authorization = headers.get(header::AUTHORIZATION).map(|v| {
        let bytes = v.as_bytes();
        match bytes.iter().position(|b| *b == b' ') {
            Some(at) if bytes[..at].eq_ignore_ascii_case(b"bearer") => bytes[at..].trim_ascii(),
            _ => bytes,
        }
    });
    let presented: Vec<&[u8]> = authorization
        .into_iter()
        .chain(headers.get("x-api-key").map(|v| v.as_bytes()))
        .collect();
    let error = if presented.is_empty() {
        "missing API key: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
    } else if presented.iter().any(|p| key.matches(p)) {
        return next.run(request).await;
    } else {
        "invalid API key"
    };
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", error).into_response()
}

/// The per-request time limit, and the shutdown grace period's end.
#[derive(Clone)]
struct TimeLimit {
    timeout: Duration,
    state: AppState,
}

/// Answers 504 when a request runs past the timeout, and 503 when the shutdown grace period
/// ends first. Either way the request's future is dropped, which abandons its episode: a
/// timed-out episode is not recorded, since nobody will receive its answer.
async fn limit_time(State(limit): State<TimeLimit>, request: Request, next: Next) -> Response {
    tokio::select! {
        result = tokio::time::timeout(limit.timeout, next.run(request)) => match result {
            Ok(response) => response,
            Err(_) => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!(
                    "the request did not finish within {:.1} s",
                    limit.timeout.as_secs_f64()
                ),
            )
            .into_response(),
        },
        () = limit.state.abandon_token().cancelled() => ApiError::shutting_down(
            "the server shut down before this request finished",
        )
        .into_response(),
    }
}

/// When a request arrived, relative to the start of shutdown.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    during_shutdown: bool,
}

impl Arrival {
    fn new(during_shutdown: bool) -> Self {
        Self { during_shutdown }
    }
}

/// Counts a request in the metrics when it ends, or as status 499 (nginx's "client closed
/// request") when the client hangs up first and its future is dropped.
async fn track(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    // Whether shutdown had begun when the request arrived: a request counted in flight before
    // that is served to the end, however long its body takes to read.
    request
        .extensions_mut()
        .insert(Arrival::new(state.is_shutting_down()));
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_string();
    let mut guard = RequestGuard {
        state,
        route,
        method: method_label(request.method()),
        started: Instant::now(),
        status: 499,
    };
    guard.state.metrics().request_started();
    let response = next.run(request).await;
    guard.status = response.status().as_u16();
    response
}

struct RequestGuard {
    state: AppState,
    route: String,
    method: &'static str,
    started: Instant,
    status: u16,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.state.metrics().request_finished(
            &self.route,
            self.method,
            self.status,
            self.started.elapsed(),
        );
    }
}

/// The method as a metrics label; any non-standard method is `other`, so a client cannot
/// create series at will.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}
