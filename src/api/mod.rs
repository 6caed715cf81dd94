//! The HTTP face of the server: routes, middleware (request id, auth, metrics, tracing) and
//! shared state. Everything model-related goes through the [`EngineHandle`] of the model a
//! request names, which [`Models`] resolves.

mod body;
pub mod error;
mod generate;
pub use generate::unix_now;
mod guard;
mod info;
mod jobs;
pub mod models;
mod openai;
mod page;
mod spec;
pub mod types;

use crate::png::PngCompression;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use subtle::ConstantTimeEq;

use crate::engine::EngineHandle;
use error::ApiError;
pub use models::Models;

/// The request's id: the client's `x-request-id` if it sent a sane one, else a new UUID.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The model a generation request was routed to, once known: the `model` label of its
/// request metrics (only served ids ever land here, so the label stays bounded).
#[derive(Debug, Clone, Default)]
pub struct RequestModel(Arc<OnceLock<String>>);

impl RequestModel {
    pub fn set(&self, id: &str) {
        let _ = self.0.set(id.to_string());
    }

    fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

#[derive(Clone)]
pub struct AppState {
    /// Every served model (at least one).
    pub models: Models,
    pub metrics: PrometheusHandle,
    pub api_keys: Arc<Vec<String>>,
    pub max_images_per_request: usize,
    pub max_body_bytes: usize,
    /// Deflate effort of PNG images (a server setting, not a request field).
    pub png_compression: PngCompression,
    pub request_timeout: Duration,
    pub max_request_timeout: Duration,
    pub started_unix: u64,
    /// Generation requests not yet answered: the drain waits for zero.
    pub inflight: Arc<AtomicUsize>,
    pub http: HttpGuards,
}

/// Limits and switches that protect the HTTP side from slow, numerous or foreign clients.
#[derive(Clone)]
pub struct HttpGuards {
    /// A request body must arrive within this long (408 otherwise).
    pub body_read_timeout: Duration,
    /// One permit per request handled at once (probes and /metrics take none).
    pub inflight_requests: Arc<tokio::sync::Semaphore>,
    /// Origins allowed to call the API from a browser on another site (`*`: any).
    pub cors_origins: Arc<Vec<String>>,
    /// Becomes true when the drain timeout is about to pass: every request still waiting for
    /// its images is answered 503 at once.
    pub cutoff: tokio::sync::watch::Receiver<bool>,
}

impl Default for HttpGuards {
    fn default() -> Self {
        Self {
            body_read_timeout: Duration::from_secs(30),
            inflight_requests: Arc::new(tokio::sync::Semaphore::new(512)),
            cors_origins: Arc::new(Vec::new()),
            cutoff: tokio::sync::watch::channel(false).1,
        }
    }
}

impl HttpGuards {
    /// Resolves once the drain timeout cuts off the remaining requests (never, if the server
    /// has no drain).
    pub async fn cut_off(&self) {
        let mut rx = self.cutoff.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

pub struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    /// The request limits for `engine`'s model (its share of the queue bounds `n`).
    pub fn limits(&self, engine: &EngineHandle) -> types::Limits {
        types::Limits {
            max_images: self.max_images_per_request,
            max_queue: engine.max_queue(),
        }
    }

    pub fn inflight_guard(&self) -> InflightGuard {
        self.inflight.fetch_add(1, Ordering::SeqCst);
        InflightGuard(self.inflight.clone())
    }
}

/// Routes that take generation work (their bad input counts as an `invalid` rejection).
const GENERATE_ROUTES: [&str; 2] = ["/generate", "/v1/images/generations"];

/// Routes that probes and scrapers reach without an API key; the playground page and the
/// contract too (the page asks for a key itself).
const OPEN_ROUTES: [&str; 5] = ["/healthz", "/readyz", "/metrics", "/", "/openapi.yaml"];

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/generate", post(generate::generate))
        .route("/v1/images/generations", post(openai::images_generations))
        .route("/", get(page::page))
        .route("/openapi.yaml", get(spec::openapi))
        .route("/v1/models", get(info::models))
        .route("/v1/models/{id}", get(info::model))
        .route("/v1/classes", get(info::classes))
        .route("/healthz", get(info::healthz))
        .route("/readyz", get(info::readyz))
        .route("/metrics", get(info::metrics))
        .fallback(|| async { ApiError::not_found("no such route; see openapi.yaml") })
        .method_not_allowed_fallback(|| async {
            ApiError::bad_request("method not allowed on this route")
                .with_status(axum::http::StatusCode::METHOD_NOT_ALLOWED)
        })
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::cross_origin,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::limit_inflight,
        ))
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

/// Most characters of a client's `x-request-id`.
const MAX_REQUEST_ID: usize = 128;

/// The client's `x-request-id` if it is short and made only of characters that need no
/// escaping in any log format or header (letters, digits, `-_.:/+=@`), else a new UUID.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(&b))
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Records a request's metrics and its `done` log line exactly once: when its response is
/// ready, or, if the client leaves first and the handler is dropped, as status 499 (nginx's
/// "client closed request").
struct Completion {
    route: String,
    model: RequestModel,
    span: tracing::Span,
    start: Instant,
    recorded: bool,
}

impl Completion {
    fn record(&mut self, code: u16) {
        self.recorded = true;
        let elapsed = self.start.elapsed();
        // A generation request's model, when it got as far as naming a served one.
        let model: Vec<(&'static str, String)> = self
            .model
            .get()
            .map(|m| ("model", m.to_string()))
            .into_iter()
            .collect();
        if GENERATE_ROUTES.contains(&self.route.as_str()) && matches!(code, 400 | 413 | 422) {
            let mut labels = vec![("reason", "invalid".to_string())];
            labels.extend(model.iter().cloned());
            metrics::counter!("diffit_rejections_total", &labels).increment(1);
        }
        let status = code.to_string();
        let mut labels = vec![("route", self.route.clone()), ("status", status.clone())];
        labels.extend(model.iter().cloned());
        metrics::counter!("diffit_requests_total", &labels).increment(1);
        labels.remove(1);
        metrics::histogram!("diffit_request_duration_seconds", &labels)
            .record(elapsed.as_secs_f64());
        let ms = elapsed.as_millis() as u64;
        self.span.in_scope(|| {
            if code == CLIENT_CLOSED {
                tracing::info!(status = %status, elapsed_ms = ms, "done: the client disconnected")
            } else {
                tracing::info!(status = %status, elapsed_ms = ms, "done")
            }
        });
    }
}

/// The status recorded for a request whose client left before its answer.
const CLIENT_CLOSED: u16 = 499;

impl Drop for Completion {
    fn drop(&mut self) {
        if !self.recorded {
            self.record(CLIENT_CLOSED);
        }
    }
}

/// Request id, one tracing span per request, and the request metrics.
async fn observe(mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    req.extensions_mut().insert(RequestId(id.clone()));
    let model = RequestModel::default();
    req.extensions_mut().insert(model.clone());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let span = tracing::info_span!("request", id = %id, %method, route = %route);
    let mut completion = Completion {
        route,
        model,
        span: span.clone(),
        start: Instant::now(),
        recorded: false,
    };
    let mut resp = tracing::Instrument::instrument(next.run(req), span).await;
    completion.record(resp.status().as_u16());
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn authenticate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if state.api_keys.is_empty() || OPEN_ROUTES.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    // Compare against every key without stopping early, in constant time per key.
    let ok = state
        .api_keys
        .iter()
        .fold(subtle::Choice::from(0u8), |acc, k| {
            acc | k.as_bytes().ct_eq(presented.as_bytes())
        });
    if bool::from(ok) && !presented.is_empty() {
        next.run(req).await
    } else {
        metrics::counter!("diffit_rejections_total", "reason" => "unauthorized").increment(1);
        ApiError::unauthorized().into_response()
    }
}

/// The token of an `Authorization: Bearer <token>` value; the scheme name is case-insensitive
/// (RFC 9110 §11.1).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer k1"), Some("k1"));
        assert_eq!(bearer_token("bearer k1"), Some("k1"));
        assert_eq!(bearer_token("BEARER   k1 "), Some("k1"));
        assert_eq!(bearer_token("Basic k1"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearerk1"), None);
    }
}
