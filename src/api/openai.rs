//! `POST /v1/images/generations`, shaped like OpenAI's Images API: `prompt` names a class,
//! matched as a person means it ("sneakers", "a photo of a red sneaker").

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
use super::types::{build_specs, check_encoding, SamplingFields};
use super::{AppState, RequestId, RequestModel};
use crate::classes::PromptError;
use crate::encode::OutputFormat;

/// The Images API's request: every field some version of it has is accepted (and checked);
/// fields it never had are refused as unknown.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesRequest {
    pub prompt: String,
    pub model: Option<String>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub n: Option<i64>,
    pub size: Option<String>,
    pub response_format: Option<String>,
    pub output_format: Option<String>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub output_compression: Option<i64>,
    pub background: Option<String>,
    pub quality: Option<String>,
    pub style: Option<String>,
    pub moderation: Option<String>,
    /// An end-user id for abuse monitoring (`safety_identifier` is its newer name); logged
    /// with the request, nothing more.
    pub user: Option<String>,
    pub safety_identifier: Option<String>,
    pub stream: Option<bool>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub partial_images: Option<i64>,
    pub complexity: Option<String>,
    /// Animation and vector output, which a class-conditional image model cannot make.
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub frame_count: Option<i64>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub frame_duration_ms: Option<i64>,
    pub svg: Option<serde_json::Value>,
    // Extensions.
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub seed: Option<u64>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub steps: Option<i64>,
    pub guidance_scale: Option<f64>,
    pub sampler: Option<String>,
}

/// One image: base64 bytes (`b64_json`) or a `data:` URL (`url`, for
/// `response_format: "url"`: this server hosts no files), with its seed as number and string.
#[derive(Debug, Serialize)]
pub struct ImageData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub revised_prompt: String,
    pub seed: u64,
    pub seed_str: String,
}

#[derive(Debug, Serialize)]
pub struct ImagesResponse {
    pub created: u64,
    pub data: Vec<ImageData>,
    pub output_format: String,
    pub size: String,
    pub background: String,
    pub quality: String,
}

/// OpenAI reports every client error as 400.
fn as_400(mut e: ApiError) -> ApiError {
    if e.status == StatusCode::UNPROCESSABLE_ENTITY {
        e.status = StatusCode::BAD_REQUEST;
    }
    e
}

/// A field whose value must be one of `allowed` (None is always fine).
fn one_of(param: &str, value: Option<&str>, allowed: &[&str]) -> Result<(), ApiError> {
    match value {
        Some(v) if !allowed.contains(&v) => Err(ApiError::bad_request(format!(
            "{param} must be one of {}; got '{v}'",
            allowed.join(", ")
        ))
        .with_param(param)),
        _ => Ok(()),
    }
}

/// The fields that only select among OpenAI's own models' options: each accepted with the
/// values that API has, checked, and otherwise without effect on a class-conditional model.
fn check_openai_options(req: &ImagesRequest, side: usize) -> Result<(), ApiError> {
    if let Some(size) = &req.size {
        if size != "auto" && size != &format!("{side}x{side}") {
            return Err(ApiError::bad_request(format!(
                "size must be auto or {side}x{side} for this model, got '{size}'"
            ))
            .with_param("size"));
        }
    }
    one_of(
        "response_format",
        req.response_format.as_deref(),
        &["b64_json", "url"],
    )?;
    if req.background.as_deref() == Some("transparent") {
        // A real option of the API that this model cannot honour: its images are opaque.
        return Err(ApiError::invalid_field(
            "background",
            "background 'transparent' is not available: this model makes opaque images; use auto or opaque",
        ));
    }
    one_of(
        "background",
        req.background.as_deref(),
        &["auto", "opaque", "transparent"],
    )?;
    one_of(
        "quality",
        req.quality.as_deref(),
        &[
            "auto", "low", "medium", "high", "xhigh", "max", "standard", "hd",
        ],
    )?;
    one_of(
        "complexity",
        req.complexity.as_deref(),
        &["low", "medium", "high"],
    )?;
    if req.frame_count.is_some_and(|f| f != 1) {
        return Err(
            ApiError::bad_request("frame_count must be 1: this model makes still images")
                .with_param("frame_count"),
        );
    }
    if req.frame_duration_ms.is_some_and(|d| d < 0) {
        return Err(
            ApiError::bad_request("frame_duration_ms must not be negative")
                .with_param("frame_duration_ms"),
        );
    }
    if req.svg.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::bad_request(
            "svg options are not available: this model makes raster images (png, jpeg, webp)",
        )
        .with_param("svg"));
    }
    one_of("style", req.style.as_deref(), &["vivid", "natural"])?;
    one_of("moderation", req.moderation.as_deref(), &["auto", "low"])?;
    if req.stream == Some(true) {
        return Err(ApiError::bad_request(
            "stream is not supported on this route; POST /generate with \"stream\": true streams progress and previews",
        )
        .with_param("stream"));
    }
    if let Some(p) = req.partial_images {
        if !(0..=3).contains(&p) {
            return Err(ApiError::bad_request(format!(
                "partial_images must be between 0 and 3, got {p}"
            ))
            .with_param("partial_images"));
        }
    }
    for (param, value) in [
        ("user", &req.user),
        ("safety_identifier", &req.safety_identifier),
    ] {
        if let Some(v) = value.as_ref().filter(|v| v.len() > MAX_USER_LEN) {
            return Err(ApiError::bad_request(format!(
                "{param} must be at most {MAX_USER_LEN} bytes, got {}",
                v.len()
            ))
            .with_param(param));
        }
    }
    Ok(())
}

/// Longest `user` id kept: it goes into the logs.
const MAX_USER_LEN: usize = 256;

/// Most characters of a prompt quoted back in an error.
const MAX_QUOTED_PROMPT: usize = 80;

/// The prompt's class, or a 400 naming `prompt` with the candidates or close matches.
/// Characters of a prompt that the class matcher reads.
const MAX_PROMPT_MATCH_CHARS: usize = 1000;

fn prompt_class(info: &crate::pipeline::ModelInfo, prompt: &str) -> Result<usize, ApiError> {
    info.classes.match_prompt(prompt).map_err(|e| {
        // Quote (the start of) the prompt: the client may not know what its SDK sent.
        let quoted: String = prompt.chars().take(MAX_QUOTED_PROMPT).collect();
        let more = if prompt.chars().count() > MAX_QUOTED_PROMPT {
            "…"
        } else {
            ""
        };
        let message = match e {
            PromptError::NoMatch(_) => format!(
                "prompt '{quoted}{more}': {e} (GET /v1/classes lists all {})",
                info.classes.len()
            ),
            _ => format!("prompt '{quoted}{more}': {e}"),
        };
        ApiError::bad_request(message).with_param("prompt")
    })
}

pub async fn images_generations(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    Extension(routed): Extension<RequestModel>,
    body: Body,
) -> Result<Response, ApiError> {
    let req: ImagesRequest =
        read_json(body, state.max_body_bytes, state.http.body_read_timeout).await?;
    let engine = state
        .models
        .resolve(req.model.as_deref(), "model")
        .map_err(as_400)?;
    routed.set(engine.name());
    let info = engine.info().clone();
    let side = info.image_size;
    check_openai_options(&req, side)?;
    let encoding = check_encoding(
        req.output_format.as_deref(),
        req.output_compression,
        OutputFormat::Png,
    )
    .map_err(as_400)?;
    if let Some(user) = req.safety_identifier.as_ref().or(req.user.as_ref()) {
        tracing::info!(user = %user, "images request");
    }
    // Matching a prompt walks every class name: on the blocking pool, so that no prompt, however
    // long or odd, holds up the async runtime.
    let label = {
        // Only the start of a prompt is matched (DALL-E 2's whole limit): a class named later
        // in 60 KB of text is not worth the seconds of CPU such a prompt would cost.
        let prompt = match req.prompt.char_indices().nth(MAX_PROMPT_MATCH_CHARS) {
            Some((end, _)) => req.prompt[..end].to_string(),
            None => req.prompt.clone(),
        };
        let info = info.clone();
        tokio::task::spawn_blocking(move || prompt_class(&info, &prompt))
            .await
            .map_err(|e| ApiError::internal(format!("prompt matching failed: {e}")))??
    };
    let fields = SamplingFields {
        n: req.n,
        seed: req.seed,
        steps: req.steps,
        sampler: req.sampler.clone(),
        guidance_scale: req.guidance_scale,
        guidance_schedule: None,
    };
    let specs = build_specs(&info, label, &fields, &state.limits(&engine)).map_err(as_400)?;
    let (rx, deadline) = submit(
        &engine,
        &id,
        specs.clone(),
        state.request_timeout,
        false,
        false,
    )?;
    let _inflight = state.inflight_guard();
    let outcome = collect(&state, &info, rx, &specs, deadline, encoding, |_| {}).await?;
    let as_url = req.response_format.as_deref() == Some("url");
    let mime = encoding.format.mime();
    let data = outcome
        .images
        .into_iter()
        .map(|img| {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&img.bytes);
            let (b64_json, url) = match as_url {
                true => (None, Some(format!("data:{mime};base64,{b64}"))),
                false => (Some(b64), None),
            };
            ImageData {
                b64_json,
                url,
                revised_prompt: info.classes.label(img.spec.label).to_string(),
                seed: img.spec.seed,
                seed_str: img.spec.seed.to_string(),
            }
        })
        .collect();
    Ok(axum::Json(ImagesResponse {
        created: unix_now(),
        data,
        output_format: encoding.format.to_string(),
        size: format!("{side}x{side}"),
        background: "opaque".into(),
        quality: req.quality.clone().unwrap_or_else(|| "auto".into()),
    })
    .into_response())
}
