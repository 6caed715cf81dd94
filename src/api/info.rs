//! Read-only routes: models, classes, health, readiness, metrics.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::generate::unix_now;
use super::AppState;
use crate::diffusion::schedule::{MAX_STEPS, MIN_STEPS};
use crate::engine::EngineHandle;

/// One served model as `/v1/models` lists it, with the request limits a client (the
/// playground page) needs to build valid requests for it.
fn model_json(state: &AppState, engine: &EngineHandle) -> serde_json::Value {
    let info = engine.info();
    let limits = state.limits(engine);
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
        "devices": engine.devices(),
        "limits": {
            "max_images_per_request": limits.max_images.min(limits.max_queue),
            "min_steps": MIN_STEPS,
            "max_steps": MAX_STEPS,
            "max_guidance_scale": crate::diffusion::guidance::MAX_GUIDANCE_SCALE,
            "queue_floor": engine.queue_floor(),
            "queue_max": engine.max_queue(),
            "queue_capacity": engine.queue_capacity(),
        },
    })
}

pub async fn models(State(state): State<AppState>) -> Response {
    let data: Vec<_> = state
        .models
        .all()
        .iter()
        .map(|engine| model_json(&state, engine))
        .collect();
    axum::Json(json!({ "object": "list", "data": data })).into_response()
}

/// `GET /v1/models/{id}`, as OpenAI's SDK `models.retrieve(id)` calls it.
pub async fn model(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.models.get(&id) {
        Some(engine) => axum::Json(model_json(&state, engine)).into_response(),
        None => state.models.not_found(&id, "model").into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct ClassesQuery {
    model: Option<String>,
}

/// `GET /v1/classes?model=ID`: the model's class names (`model` may be left out when one model
/// is served).
pub async fn classes(
    State(state): State<AppState>,
    query: Result<Query<ClassesQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let engine = state.models.resolve(query.model.as_deref(), "model")?;
    let info = engine.info();
    let classes: Vec<_> = (0..info.classes.len())
        .map(|i| {
            json!({
                "label": i,
                "name": info.classes.label(i),
                "synonyms": &info.classes.synonyms(i)[1.min(info.classes.synonyms(i).len())..],
            })
        })
        .collect();
    Ok(axum::Json(json!({
        "model": info.name,
        "num_classes": info.classes.len(),
        "classes": classes,
    }))
    .into_response())
}

pub async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok", "time": unix_now() })).into_response()
}

/// 200 only when every engine of every model is warmed up (and the server is not draining).
pub async fn readyz(State(state): State<AppState>) -> Response {
    let models = &state.models;
    let (status, word) = if models.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !models.ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "warming up")
    } else {
        (StatusCode::OK, "ready")
    };
    let warming: Vec<&str> = models
        .all()
        .iter()
        .filter(|h| !h.stats().ready())
        .map(EngineHandle::name)
        .collect();
    let mut body = json!({ "status": word });
    if !warming.is_empty() && word == "warming up" {
        body["warming"] = json!(warming);
    }
    (status, axum::Json(body)).into_response()
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
