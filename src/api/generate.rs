//! `POST /generate`: JSON with base64 PNGs, the raw PNG for `Accept: image/png` and n = 1,
//! or server-sent progress events with `"stream": true`.

use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use futures::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::body::read_json;
use super::error::ApiError;
use super::jobs::{collect, submit, Outcome};
use super::types::{
    build_specs, check_timeout, resolve_class, resolve_name_off_runtime, GenerateRequest,
    GenerateResponse, ImageJson, SamplingFields,
};
use super::{AppState, RequestId};
use crate::pipeline::ImageSpec;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn wants_png(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|p| p.trim().starts_with("image/png")))
}

pub async fn generate(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: GenerateRequest =
        read_json(body, state.max_body_bytes, state.http.body_read_timeout).await?;
    let info = state.engine.info().clone();
    let label = match (req.class_label, &req.class_name) {
        (None, Some(name)) => {
            resolve_name_off_runtime(info.clone(), name.clone(), "class_name").await?
        }
        (label, name) => resolve_class(&info, label, name.as_deref())?,
    };
    let fields = SamplingFields {
        n: req.n,
        seed: req.seed,
        steps: req.steps,
        sampler: req.sampler.clone(),
        guidance_scale: req.guidance_scale,
        guidance_schedule: req.guidance_schedule.clone(),
    };
    let specs = build_specs(&info, label, &fields, &state.limits())?;
    let timeout = check_timeout(
        req.timeout_secs,
        state.request_timeout,
        state.max_request_timeout,
    )?;
    let (rx, deadline) = submit(&state, &id, specs.clone(), timeout, req.stream)?;
    let _inflight = state.inflight_guard();

    if req.stream {
        return Ok(stream_response(state.clone(), id, rx, specs, deadline));
    }
    let outcome = collect(&state, rx, &specs, deadline, |_, _| {}).await?;
    if specs.len() == 1 && wants_png(&headers) {
        let img = &outcome.images[0];
        let mut resp = (
            [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
            img.png.clone(),
        )
            .into_response();
        let h = resp.headers_mut();
        h.insert("x-seed", HeaderValue::from(img.spec.seed));
        h.insert("x-class-label", HeaderValue::from(img.spec.label));
        return Ok(resp);
    }
    Ok(axum::Json(response_body(&state, id, &specs, outcome)).into_response())
}

pub fn response_body(
    state: &AppState,
    id: String,
    specs: &[ImageSpec],
    outcome: Outcome,
) -> GenerateResponse {
    let info = state.engine.info();
    let first = specs[0];
    GenerateResponse {
        id,
        created: unix_now(),
        model: info.name.clone(),
        steps: first.steps,
        sampler: first.sampler.to_string(),
        guidance_scale: first.guidance.scale(),
        guidance_schedule: first.guidance.schedule().to_string(),
        images: outcome
            .images
            .into_iter()
            .map(|img| ImageJson {
                b64_png: base64::engine::general_purpose::STANDARD.encode(&img.png),
                seed: img.spec.seed,
                class_label: img.spec.label,
                class_name: info.classes.label(img.spec.label).to_string(),
            })
            .collect(),
        timings: outcome.timings,
    }
}

/// `progress` events `{"step", "steps"}`, then one `result` (the JSON response) or `error`.
/// If the client goes away the collector is dropped, and with it the job's samples.
fn stream_response(
    state: AppState,
    id: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<crate::engine::JobEvent>,
    specs: Vec<ImageSpec>,
    deadline: std::time::Instant,
) -> Response {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let _inflight = state.inflight_guard();
        let progress_tx = tx.clone();
        let work = collect(&state, rx, &specs, deadline, move |step, steps| {
            let data = serde_json::json!({ "step": step, "steps": steps }).to_string();
            let _ = progress_tx.send(Event::default().event("progress").data(data));
        });
        let result = tokio::select! {
            r = work => r,
            _ = tx.closed() => return,
        };
        let event = match result {
            Ok(outcome) => {
                let body = response_body(&state, id, &specs, outcome);
                Event::default()
                    .event("result")
                    .data(serde_json::to_string(&body).unwrap_or_default())
            }
            Err(e) => Event::default().event("error").data(e.to_json()),
        };
        let _ = tx.send(event);
    });
    let stream = UnboundedReceiverStream::new(events).map(Ok::<_, Infallible>);
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
