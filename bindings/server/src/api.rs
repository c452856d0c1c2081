//! The wire format: request and response bodies of every endpoint, the JSON error body, and the
//! JSON body extractor that turns every malformed request into one of those errors. API.md in
//! this crate documents the same types as JSON schemas.

use axum::{
    body::Bytes,
    extract::{FromRequest, Request},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use searchloop_core::{EpisodeEnd, SamplingParams, ToolCallRecord};
use searchloop_loop::LoopError;
use searchloop_runtime::{RoundReport, RuntimeError};
use searchloop_store_sql::{AdapterRecord, FeedbackOutcome, StoreError};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Highest sampling temperature a request may ask for: beyond it a model's output is noise,
/// and the episode only burns model time.
pub const MAX_TEMPERATURE: f32 = 2.0;

/// Body of `POST /v1/ask`: a question and optional sampling overrides for this episode only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AskRequest {
    /// The customer's question (not blank).
    pub question: String,
    /// Softmax temperature in `[0, 2]`; 0 is greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Nucleus truncation in `(0, 1]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    /// Keep only the `top_k` most likely tokens (0 = off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Seed of the episode's sampling, for a reproducible answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl AskRequest {
    /// Whether the request changes the agent's sampling (a seed alone does not: it travels in
    /// the episode request).
    pub fn overrides_sampling(&self) -> bool {
        self.temperature.is_some() || self.top_p.is_some() || self.top_k.is_some()
    }

    /// `base` with this request's overrides, checked. The error names the value at fault.
    pub fn sampling(&self, base: &SamplingParams) -> Result<SamplingParams, ApiError> {
        if self.question.trim().is_empty() {
            return Err(ApiError::invalid_request("question must not be blank"));
        }
        if let Some(t) = self.temperature.filter(|t| *t > MAX_TEMPERATURE) {
            return Err(ApiError::invalid_request(format!(
                "temperature must be at most {MAX_TEMPERATURE}, got {t}"
            )));
        }
        let params = SamplingParams {
            temperature: self.temperature.unwrap_or(base.temperature),
            top_p: self.top_p.unwrap_or(base.top_p),
            top_k: self.top_k.unwrap_or(base.top_k),
            ..base.clone()
        };
        params
            .validate()
            .map_err(|e| ApiError::invalid_request(e.to_string()))?;
        Ok(params)
    }
}

/// Body of a `200` answer to `POST /v1/ask`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AskResponse {
    /// The model's answer; `null` when the episode ended without one.
    pub answer: Option<String>,
    /// The recorded trajectory, for `GET /v1/trajectories/{id}` and `POST /v1/feedback`.
    pub trajectory_id: String,
    /// How the episode ended.
    pub end: EpisodeEnd,
    /// Model turns taken.
    pub turns: u32,
    /// The tool calls, in order, with what each returned.
    pub tool_calls: Vec<ToolCallRecord>,
    /// Milliseconds from the start of the episode to its durable record.
    pub latency_ms: f64,
    /// The adapter that served the episode; `null` for the base model.
    pub adapter_version: Option<u64>,
    /// The base model.
    pub model_id: String,
}

/// Body of `POST /v1/feedback`: a reward for one trajectory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The trajectory the feedback is about.
    pub trajectory_id: String,
    /// The feedback kind (`purchase`, `resolved`, `thumbs`, ...): 1-64 characters of letters,
    /// digits, `_`, `-` or `.`.
    pub source: String,
    /// The value, inside the store's feedback range (by default `[-1, 1]`).
    pub value: f64,
    /// Its weight in the training reward (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// Deliveries with the same key for the same trajectory count once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Body of a `200` answer to `POST /v1/feedback`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedbackResponse {
    /// The trajectory.
    pub trajectory_id: String,
    /// `recorded`, or `duplicate` when the idempotency key was seen with the same feedback.
    pub outcome: FeedbackOutcome,
}

/// Body of `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthResponse {
    /// `ok`, or `shutting_down` (with status 503) once shutdown has begun.
    pub status: String,
    /// The served base model.
    pub model_id: String,
    /// The served adapter; `null` for the base model.
    pub adapter_version: Option<u64>,
    /// This replica's name in a fleet; absent when it has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica_id: Option<String>,
    /// Requests being answered right now.
    pub in_flight: u64,
    /// Why this process cannot serve the adapter the registry promoted (it keeps serving
    /// `adapter_version` meanwhile); absent when it serves what the registry says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_error: Option<String>,
}

/// Body of `GET /v1/adapters`: the registry, oldest first, and what this process serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptersResponse {
    /// The adapter version serving new episodes here; `null` for the base model.
    pub serving_version: Option<u64>,
    /// Every registered adapter.
    pub adapters: Vec<AdapterRecord>,
}

/// Body of `POST /v1/adapters/rollback` (the body may also be empty).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The formerly promoted (superseded) version to return to; by default the one promoted
    /// before the current one, or the base model when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<u64>,
}

/// Body of `GET /v1/train`, and of the `202` answer to `POST /v1/train`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainStatus {
    /// Whether a round started over HTTP is running.
    pub running: bool,
    /// How the last round started over HTTP ended; `null` before the first has ended.
    pub last: Option<LastRound>,
}

/// How a round started over HTTP ended: its report, or the error that stopped it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastRound {
    /// What the round did (candidate, scores, the gate's verdict, the swap).
    pub report: Option<RoundReport>,
    /// Why it failed, when it did.
    pub error: Option<String>,
}

/// The body of every error response: `{"error": {"code": ..., "message": ...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// A stable machine-readable code (`invalid_json`, `unknown_trajectory`, ...).
    pub code: String,
    /// A sentence for people, naming the value at fault.
    pub message: String,
}

/// A failed request: a status, a stable code and a message, sent as an [`ErrorBody`].
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// The message.
    pub message: String,
}

impl ApiError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// 422: the request is well-formed JSON but a value is missing, unknown or out of range.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    /// 404: no trajectory has this id.
    pub fn unknown_trajectory(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_trajectory",
            format!("unknown trajectory id '{id}'"),
        )
    }

    /// 503: the server is shutting down and takes no new work.
    pub fn shutting_down(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", message)
    }

    /// An episode failure: the store refusing the record is 503 (retry later), a broken model
    /// or trajectory is 500 (a server bug, never a client's doing).
    pub fn from_episode(error: searchloop_core::Error) -> Self {
        match error {
            searchloop_core::Error::Config(message) => Self::invalid_request(message),
            too_long @ searchloop_core::Error::QuestionTooLong { .. } => Self::new(
                StatusCode::BAD_REQUEST,
                "question_too_long",
                too_long.to_string(),
            ),
            searchloop_core::Error::Sink(message) => Self::store_unavailable(message),
            other => Self::internal("episode_failed", other.to_string()),
        }
    }

    /// A store failure, by kind.
    pub fn from_store(error: StoreError) -> Self {
        match error {
            StoreError::UnknownTrajectory(id) => Self::unknown_trajectory(&id),
            StoreError::InvalidFeedback { .. } | StoreError::InvalidArgument(_) => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_feedback",
                error.to_string(),
            ),
            StoreError::IdempotencyConflict { .. } => Self::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                error.to_string(),
            ),
            StoreError::Database { .. } | StoreError::Io { .. } => {
                Self::store_unavailable(error.to_string())
            }
            other => Self::internal("store_error", other.to_string()),
        }
    }

    /// A failure of the learning loop or the adapter registry, by kind.
    pub fn from_runtime(error: RuntimeError) -> Self {
        match error {
            RuntimeError::Loop(LoopError::UnknownAdapter(_)) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_adapter", error.to_string())
            }
            RuntimeError::Loop(LoopError::Adapter(_)) => {
                Self::new(StatusCode::CONFLICT, "adapter_refused", error.to_string())
            }
            RuntimeError::Loop(LoopError::RoundBusy) => Self::round_busy(),
            RuntimeError::Loop(LoopError::TrainerElsewhere) => {
                Self::new(StatusCode::CONFLICT, "trainer_elsewhere", error.to_string())
            }
            RuntimeError::Config(_) | RuntimeError::Loop(LoopError::Config(_)) => {
                Self::learning_unavailable(error.to_string())
            }
            RuntimeError::Store(store) | RuntimeError::Loop(LoopError::Store(store)) => {
                Self::from_store(store)
            }
            other => Self::internal("learning_failed", other.to_string()),
        }
    }

    /// 409: a training round is already running.
    pub fn round_busy() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "round_busy",
            "a training round is already running; rounds run one at a time",
        )
    }

    /// 409: this server cannot train or change adapters (no runtime, or no `[learn]` config).
    pub fn learning_unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "learning_unavailable", message)
    }

    fn store_unavailable(message: String) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            message,
        )
    }

    fn internal(code: &'static str, message: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

/// A JSON request body. Unlike axum's own `Json`, every way a body can be wrong becomes an
/// [`ApiError`] with a JSON body: a missing or foreign content type (415), a body over the
/// limit (413), a syntax error (400), a value of the wrong shape or an unknown field (422).
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        check_json_content_type(request.headers())?;
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "payload_too_large",
                        "the request body is larger than the server's limit",
                    )
                } else {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "unreadable_body",
                        format!("cannot read the request body: {}", rejection.body_text()),
                    )
                }
            })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            if e.is_data() {
                ApiError::invalid_request(format!("the request body does not fit the schema: {e}"))
            } else {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("the request body is not valid JSON: {e}"),
                )
            }
        })
    }
}

/// A JSON body that may be left out: a request with no body and no Content-Type gets
/// `T::default()`; any other request is read as a [`JsonBody`].
#[derive(Debug, Clone)]
pub struct JsonBodyOrDefault<T>(pub T);

impl<S, T> FromRequest<S> for JsonBodyOrDefault<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let headers = request.headers();
        let no_body = !headers.contains_key(header::CONTENT_TYPE)
            && !headers.contains_key(header::TRANSFER_ENCODING)
            && headers
                .get(header::CONTENT_LENGTH)
                .is_none_or(|length| length.as_bytes() == b"0");
        if no_body {
            return Ok(Self(T::default()));
        }
        JsonBody::from_request(request, state)
            .await
            .map(|JsonBody(body)| Self(body))
    }
}

/// Accepts `application/json` and `application/*+json`, with any parameters.
fn check_json_content_type(headers: &HeaderMap) -> Result<(), ApiError> {
    let unsupported = |found: &str| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("the request body must be JSON (Content-Type: application/json), got {found}"),
        )
    };
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(unsupported("no Content-Type"));
    };
    let Ok(value) = value.to_str() else {
        return Err(unsupported("an unreadable Content-Type"));
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let is_json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if is_json {
        Ok(())
    } else {
        Err(unsupported(&format!("'{value}'")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content_type(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, value.parse().unwrap());
        headers
    }

    #[test]
    fn json_content_types_are_recognised() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
        ] {
            assert!(check_json_content_type(&content_type(ok)).is_ok(), "{ok}");
        }
        for bad in ["text/plain", "application/jsonp", "multipart/form-data"] {
            let err = check_json_content_type(&content_type(bad)).unwrap_err();
            assert_eq!(err.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        assert!(check_json_content_type(&HeaderMap::new()).is_err());
    }

    #[test]
    fn overrides_are_applied_and_checked() {
        let base = SamplingParams::default();
        let ask = |json: &str| serde_json::from_str::<AskRequest>(json).unwrap();
        let params = ask(r#"{"question": "q", "temperature": 0.7, "top_k": 5}"#)
            .sampling(&base)
            .unwrap();
        assert_eq!(
            (params.temperature, params.top_p, params.top_k),
            (0.7, 1.0, 5)
        );
        for (bad, fault) in [
            (r#"{"question": "q", "temperature": 2.5}"#, "temperature"),
            (r#"{"question": "q", "temperature": -0.1}"#, "temperature"),
            (r#"{"question": "q", "top_p": 0}"#, "top_p"),
            (r#"{"question": "  "}"#, "question"),
        ] {
            let err = ask(bad).sampling(&base).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}");
            assert!(err.message.contains(fault), "{bad}: {}", err.message);
        }
        assert!(!ask(r#"{"question": "q", "seed": 3}"#).overrides_sampling());
    }
}
