//! `POST /generate`: JSON with base64 images, the raw image for `Accept: image/png` (or
//! `image/jpeg`, `image/webp`) and n = 1, or server-sent progress events with `"stream": true`,
//! carrying live previews with `"preview": true`.

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
use super::jobs::{collect, submit, Outcome, Update};
use super::types::{
    build_specs, check_encoding, check_timeout, resolve_class, resolve_name_off_runtime, Encoding,
    GenerateRequest, GenerateResponse, ImageJson, SamplingFields,
};
use super::{AppState, RequestId, RequestModel};
use crate::encode::OutputFormat;
use crate::pipeline::{ImageSpec, ModelInfo};

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The first image type the `Accept` header names, if any: the client wants the raw file.
fn accepted_image(headers: &HeaderMap) -> Option<OutputFormat> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    accept
        .split(',')
        .filter_map(|p| p.split(';').next())
        .find_map(|m| OutputFormat::from_mime(m.trim()))
}

pub async fn generate(
    State(state): State<AppState>,
    Extension(RequestId(id)): Extension<RequestId>,
    Extension(routed): Extension<RequestModel>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: GenerateRequest =
        read_json(body, state.max_body_bytes, state.http.body_read_timeout).await?;
    let engine = state.models.resolve(req.model.as_deref(), "model")?;
    routed.set(engine.name());
    let info = engine.info().clone();
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
    let specs = build_specs(&info, label, &fields, &state.limits(&engine))?;
    let timeout = check_timeout(
        req.timeout_secs,
        state.request_timeout,
        state.max_request_timeout,
    )?;
    let raw = accepted_image(&headers).filter(|_| specs.len() == 1 && !req.stream);
    let encoding = check_encoding(
        req.output_format.as_deref(),
        req.output_compression,
        raw.unwrap_or_default(),
    )?;
    // Previews travel in progress events: without a stream there is nowhere to send them, so
    // none are made (as OpenAI's partial_images without stream).
    let previews = req.preview && req.stream;
    let (rx, deadline) = submit(&engine, &id, specs.clone(), timeout, req.stream, previews)?;
    let _inflight = state.inflight_guard();

    if req.stream {
        return Ok(stream_response(
            state.clone(),
            info,
            id,
            rx,
            specs,
            deadline,
            encoding,
        ));
    }
    let outcome = collect(&state, &info, rx, &specs, deadline, encoding, |_| {}).await?;
    if let (Some(img), true) = (outcome.images.first(), raw.is_some()) {
        let mut resp = (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(encoding.format.mime()),
            )],
            img.bytes.clone(),
        )
            .into_response();
        let h = resp.headers_mut();
        h.insert("x-seed", HeaderValue::from(img.spec.seed));
        h.insert("x-class-label", HeaderValue::from(img.spec.label));
        return Ok(resp);
    }
    Ok(axum::Json(response_body(&info, id, &specs, encoding.format, outcome)).into_response())
}

pub fn response_body(
    info: &ModelInfo,
    id: String,
    specs: &[ImageSpec],
    format: OutputFormat,
    outcome: Outcome,
) -> GenerateResponse {
    let first = specs[0];
    GenerateResponse {
        id,
        created: unix_now(),
        model: info.name.clone(),
        steps: first.steps,
        sampler: first.sampler.to_string(),
        guidance_scale: first.guidance.scale(),
        guidance_schedule: first.guidance.schedule().to_string(),
        output_format: format.to_string(),
        images: outcome
            .images
            .into_iter()
            .map(|img| {
                let b64 = Some(base64::engine::general_purpose::STANDARD.encode(&img.bytes));
                let pick = |f: OutputFormat| if f == format { b64.clone() } else { None };
                ImageJson {
                    b64_png: pick(OutputFormat::Png),
                    b64_jpeg: pick(OutputFormat::Jpeg),
                    b64_webp: pick(OutputFormat::Webp),
                    seed: img.spec.seed,
                    seed_str: img.spec.seed.to_string(),
                    class_label: img.spec.label,
                    class_name: info.classes.label(img.spec.label).to_string(),
                }
            })
            .collect(),
        timings: outcome.timings,
    }
}

/// The `data` of one `progress` event: `{"step", "steps"}` (the job's slowest image), plus
/// `"preview": {"index", "step", "width", "height", "b64_png"}` when it carries a preview of
/// image `index` (its own step count; `step` stays the job's).
fn progress_data(update: Update, job_step: &mut usize) -> serde_json::Value {
    match update {
        Update::Step { step, total } => {
            *job_step = step;
            serde_json::json!({ "step": step, "steps": total })
        }
        Update::Preview {
            index,
            step,
            total,
            png,
            width,
            height,
        } => serde_json::json!({
            "step": *job_step,
            "steps": total,
            "preview": {
                "index": index,
                "step": step,
                "width": width,
                "height": height,
                "b64_png": base64::engine::general_purpose::STANDARD.encode(png),
            },
        }),
    }
}

/// `progress` events, then one `result` (the JSON response) or `error`. If the client goes
/// away the collector is dropped, and with it the job's samples.
fn stream_response(
    state: AppState,
    info: std::sync::Arc<ModelInfo>,
    id: String,
    rx: tokio::sync::mpsc::UnboundedReceiver<crate::engine::JobEvent>,
    specs: Vec<ImageSpec>,
    deadline: std::time::Instant,
    encoding: Encoding,
) -> Response {
    let (tx, events) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let _inflight = state.inflight_guard();
        let progress_tx = tx.clone();
        let mut job_step = 0;
        let work = collect(
            &state,
            &info,
            rx,
            &specs,
            deadline,
            encoding,
            move |update| {
                let data = progress_data(update, &mut job_step).to_string();
                let _ = progress_tx.send(Event::default().event("progress").data(data));
            },
        );
        let result = tokio::select! {
            r = work => r,
            _ = tx.closed() => return,
        };
        let event = match result {
            Ok(outcome) => {
                let body = response_body(&info, id, &specs, encoding.format, outcome);
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
