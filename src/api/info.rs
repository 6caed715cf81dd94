//! Read-only routes: models, classes, health, readiness, metrics.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::error::ApiError;
use super::generate::unix_now;
use super::AppState;
use crate::diffusion::schedule::{MAX_STEPS, MIN_STEPS};

/// The served model as `/v1/models` lists it, with the request limits a client (the
/// playground page) needs to build valid requests.
fn model_json(state: &AppState) -> serde_json::Value {
    let info = state.engine.info();
    let limits = state.limits();
    json!({
        "id": info.name,
        "object": "model",
        "created": state.started_unix,
        "owned_by": "diffit-server",
        "image_size": info.image_size,
        "num_classes": info.config.num_classes,
        "config": info.config,
        "defaults": info.defaults,
        "sha256": info.model_sha256,
        "dtype": info.dtype,
        "device": info.device,
        "devices": state.engine.devices(),
        "limits": {
            "max_images_per_request": limits.max_images.min(limits.max_queue),
            "min_steps": MIN_STEPS,
            "max_steps": MAX_STEPS,
            "max_guidance_scale": crate::diffusion::guidance::MAX_GUIDANCE_SCALE,
        },
    })
}

pub async fn models(State(state): State<AppState>) -> Response {
    axum::Json(json!({ "object": "list", "data": [model_json(&state)] })).into_response()
}

/// `GET /v1/models/{id}`, as OpenAI's SDK `models.retrieve(id)` calls it.
pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    let info = state.engine.info();
    if id != info.name {
        return ApiError::not_found(format!(
            "model '{id}' is not served here; GET /v1/models lists '{}'",
            info.name
        ))
        .with_param("model")
        .with_code("model_not_found")
        .into_response();
    }
    axum::Json(model_json(&state)).into_response()
}

pub async fn classes(State(state): State<AppState>) -> Response {
    let info = state.engine.info();
    let classes: Vec<_> = (0..info.classes.len())
        .map(|i| {
            json!({
                "label": i,
                "name": info.classes.label(i),
                "synonyms": &info.classes.synonyms(i)[1.min(info.classes.synonyms(i).len())..],
            })
        })
        .collect();
    axum::Json(json!({ "num_classes": info.classes.len(), "classes": classes })).into_response()
}

pub async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok", "time": unix_now() })).into_response()
}

pub async fn readyz(State(state): State<AppState>) -> Response {
    let engine = &state.engine;
    let (status, word) = if engine.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !engine.stats().ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "warming up")
    } else {
        (StatusCode::OK, "ready")
    };
    (status, axum::Json(json!({ "status": word }))).into_response()
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
