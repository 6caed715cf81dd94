//! `POST /v1/images/generations`, shaped like OpenAI's Images API: `prompt` names a class.

use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::body::read_json;
use super::error::ApiError;
use super::generate::unix_now;
use super::jobs::{collect, submit};
use super::types::{build_specs, resolve_name_off_runtime, SamplingFields};
use super::{AppState, RequestId};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    pub prompt: String,
    pub model: Option<String>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub n: Option<i64>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    /// Accepted for SDK compatibility; one quality and style exist here.
    #[allow(dead_code)]
    pub quality: Option<String>,
    #[allow(dead_code)]
    pub style: Option<String>,
    #[allow(dead_code)]
    pub user: Option<String>,
    // Extensions.
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub seed: Option<u64>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub sampler: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ImageData {
    pub b64_json: String,
    pub revised_prompt: String,
    pub seed: u64,
}

#[derive(Debug, Serialize)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
}

/// OpenAI reports every client error as 400.
fn as_400(mut e: ApiError) -> ApiError {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY {
        e.status = StatusCode::BAD_REQUEST;
    }
    e
}

pub async fn images_generations(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ImagesRequest =
        read_json(body, state.max_body_bytes, state.http.body_read_timeout).await?;
    let info = state.engine.info().clone();
    if let Some(m) = &req.model {
        if m != &info.name {
            return Err(ApiError::bad_request(format!(
                "model '{m}' is not served here; use '{}'",
                info.name
            ))
            .with_param("model"));
        }
    }
    let side = info.image_size;
    if let Some(size) = &req.size {
        if size != &format!("{side}x{side}") {
            return Err(ApiError::bad_request(format!(
                "size must be {side}x{side} for this model, got '{size}'"
            ))
            .with_param("size"));
        }
    }
    if let Some(fmt) = &req.response_format {
        if fmt != "b64_json" {
            return Err(ApiError::bad_request(format!(
                "response_format must be b64_json (this server does not host image URLs), got '{fmt}'"
            ))
            .with_param("response_format"));
        }
    }
    let label = resolve_name_off_runtime(info.clone(), req.prompt.clone(), "prompt")
        .await
        .map_err(as_400)?;
    let fields = SamplingFields {
        n: req.n,
        seed: req.seed,
        steps: req.steps,
        sampler: req.sampler.clone(),
        guidance_scale: req.guidance_scale,
        guidance_schedule: None,
    };
    let specs = build_specs(&info, label, &fields, &state.limits()).map_err(as_400)?;
    let (rx, deadline) = submit(&state, &id, specs.clone(), state.request_timeout, false)?;
    let _inflight = state.inflight_guard();
    let outcome = collect(&state, rx, &specs, deadline, |_, _| {}).await?;
    let data = outcome
        .images
        .into_iter()
        .map(|img| ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(&img.png),
            revised_prompt: info.classes.label(img.spec.label).to_string(),
            seed: img.spec.seed,
        })
        .collect();
    Ok(axum::Json(ImagesResponse {
        created: unix_now(),
        data,
    })
    .into_response())
}
