//! The HTTP layer (axum on tokio: the de-facto standard Rust web stack, with multipart, server-sent events and
//! graceful shutdown built in): an OpenAI-compatible `POST /v1/images/edits` in front of an [`EditService`].
//!
//! | route | answer |
//! |---|---|
//! | `POST /v1/images/edits` | multipart (OpenAI's fields + `steps`, `seed`, `cfg`, `negative_prompt`, `schedule`) or JSON with base64 images; `stream=true` for server-sent progress |
//! | `GET /v1/models` | the served model |
//! | `GET /health` | 200 while the process serves (liveness) |
//! | `GET /ready` | 200 when the model is loaded, jobs are accepted and the queue has room; 503 otherwise (with the queue depth) |
//! | `GET /metrics` | Prometheus text format |
//!
//! Every error is a JSON object with a 4xx/5xx status ([`ApiError`]).

pub mod edits;
pub mod error;
pub mod params;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tower_http::trace::{DefaultMakeSpan, DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use error::ApiError;
pub use params::{Defaults, EditParams, Limits};

use crate::service::EditService;

/// How the HTTP layer serves.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpConfig {
    /// The model id `/v1/models` lists and requests may name.
    pub model_name: String,
    /// Request limits.
    pub limits: Limits,
    /// Values of the fields a request leaves out.
    pub defaults: Defaults,
    /// Longest time from submission to the image (the job is cancelled after it: 504).
    pub request_timeout: Duration,
    /// On shutdown, how long queued and running jobs may go on before they are cancelled.
    pub shutdown_grace: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            model_name: "qwen-image-edit".into(),
            limits: Limits::default(),
            defaults: Defaults::default(),
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What the handlers share.
#[derive(Debug)]
pub struct AppState {
    /// The service.
    pub service: Arc<EditService>,
    /// The served model's id.
    pub model_name: String,
    /// Request limits.
    pub limits: Limits,
    /// Defaults of the request fields.
    pub defaults: Defaults,
    /// See [`HttpConfig::request_timeout`].
    pub request_timeout: Duration,
}

/// The routes on `service`.
pub fn router(service: Arc<EditService>, config: &HttpConfig) -> Router {
    let state = Arc::new(AppState {
        service,
        model_name: config.model_name.clone(),
        limits: config.limits.clone(),
        defaults: config.defaults.clone(),
        request_timeout: config.request_timeout,
    });
    Router::new()
        .route("/v1/images/edits", post(edits::edits))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), record))
        .layer(DefaultBodyLimit::max(config.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), check_length))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(DefaultMakeSpan::new().level(Level::INFO))
                .on_response(DefaultOnResponse::new().level(Level::INFO)),
        )
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves, then shuts down gracefully: no new connections, new
/// jobs refused, queued and running jobs finish within `config.shutdown_grace` (then they are cancelled and their
/// requests get a 503), open responses are completed, and the worker is joined.
pub async fn serve(
    listener: tokio::net::TcpListener,
    service: Arc<EditService>,
    config: &HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(service.clone(), config);
    let grace = config.shutdown_grace;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = stopping_tx.send(());
    };
    let drain = {
        let service = service.clone();
        async move {
            if stopping_rx.await.is_ok() {
                tracing::info!(grace_seconds = grace.as_secs_f64(), "shutting down: finishing queued jobs");
                let _ = tokio::task::spawn_blocking(move || service.shutdown(grace)).await;
            }
        }
    };
    let drain = tokio::spawn(drain);
    let result = axum::serve(listener, app).with_graceful_shutdown(signal).await;
    let _ = drain.await;
    let service_for_join = service.clone();
    let _ = tokio::task::spawn_blocking(move || service_for_join.shutdown(Duration::ZERO)).await;
    tracing::info!("stopped");
    result
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

/// Refuses a body whose declared length is over the limit before reading it (413, so a client that waits for
/// `100 Continue` sends nothing).
async fn check_length(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let max = state.limits.max_body_bytes;
    if let Some(len) = declared.filter(|len| *len > max as u64) {
        let message = format!("the body has {len} bytes; at most {max} are accepted");
        return ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", message).into_response();
    }
    next.run(request).await
}

/// Counts and times each response by route and status.
async fn record(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map_or("other", |p| route_name(p.as_str()));
    let start = Instant::now();
    let response = next.run(request).await;
    state.service.metrics().http(route, response.status().as_u16(), start.elapsed().as_secs_f64());
    response
}

/// A fixed label per route (so that unknown paths do not add label values).
fn route_name(path: &str) -> &'static str {
    ["/v1/images/edits", "/v1/models", "/health", "/ready", "/metrics"]
        .into_iter()
        .find(|r| *r == path)
        .unwrap_or("other")
}

async fn models(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"object": "list", "data": [{
        "id": state.model_name, "object": "model", "created": 0, "owned_by": "qwen-image-edit-rs",
    }]}))
    .into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    Json(json!({"status": "ok", "service": state.service.status()})).into_response()
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    let status = state.service.status();
    let code = if status.ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({"ready": status.ready(), "service": status}))).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let body = state.service.metrics().render();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see /v1/images/edits, /v1/models, /health, /ready, /metrics",
    )
}
