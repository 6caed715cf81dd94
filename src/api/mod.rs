//! The HTTP face of the server: routes, middleware (request id, auth, metrics, tracing) and
//! shared state. Everything model-related goes through the [`EngineHandle`].

mod body;
pub mod error;
mod generate;
mod info;
mod jobs;
mod openai;
mod page;
mod spec;
pub mod types;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// The request's id: the client's `x-request-id` if it sent a sane one, else a new UUID.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

#[derive(Clone)]
pub struct AppState {
    pub engine: EngineHandle,
    pub metrics: PrometheusHandle,
    pub api_keys: Arc<Vec<String>>,
    pub max_images_per_request: usize,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub max_request_timeout: Duration,
    pub started_unix: u64,
    /// Generation requests not yet answered: the drain waits for zero.
    pub inflight: Arc<AtomicUsize>,
}

pub struct InflightGuard(Arc<AtomicUsize>);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    pub fn limits(&self) -> types::Limits {
        types::Limits {
            max_images: self.max_images_per_request,
            max_queue: self.engine.max_queue(),
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
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// Request id, one tracing span per request, and the request metrics.
async fn observe(mut req: Request, next: Next) -> Response {
    let id = request_id(&req);
    req.extensions_mut().insert(RequestId(id.clone()));
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().clone();
    let span = tracing::info_span!("request", id = %id, %method, route = %route);
    let start = Instant::now();
    let mut resp = {
        let _enter = span.enter();
        drop(_enter);
        tracing::Instrument::instrument(next.run(req), span.clone()).await
    };
    let elapsed = start.elapsed();
    let code = resp.status().as_u16();
    if GENERATE_ROUTES.contains(&route.as_str()) && matches!(code, 400 | 413 | 422) {
        metrics::counter!("diffit_rejections_total", "reason" => "invalid").increment(1);
    }
    let status = code.to_string();
    metrics::counter!("diffit_requests_total", "route" => route.clone(), "status" => status.clone())
        .increment(1);
    metrics::histogram!("diffit_request_duration_seconds", "route" => route.clone())
        .record(elapsed.as_secs_f64());
    span.in_scope(
        || tracing::info!(status = %status, elapsed_ms = elapsed.as_millis() as u64, "done"),
    );
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
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
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
