//! Submitting a validated request to the engine and collecting its images, encoded (PNG, JPEG
//! or WebP, with metadata) on the blocking pool.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::error::ApiError;
use super::types::{Encoding, Timings};
use super::AppState;
use crate::encode::EncodeOptions;
use crate::engine::{EngineError, EngineHandle, Job, JobEvent, SubmitError};
use crate::pipeline::{ImageSpec, ModelInfo};
use crate::png::PngCompression;

pub struct EncodedImage {
    /// The file, in the request's output format.
    pub bytes: Vec<u8>,
    pub spec: ImageSpec,
}

/// What a streaming request hears while its images are made.
pub enum Update {
    /// The job's slowest image finished `step` of `total` steps.
    Step { step: usize, total: usize },
    /// A preview of image `index` after `step` of `total` steps, as a small PNG.
    Preview {
        index: usize,
        step: usize,
        total: usize,
        png: Vec<u8>,
        width: usize,
        height: usize,
    },
}

pub struct Outcome {
    pub images: Vec<EncodedImage>,
    pub timings: Timings,
}

/// Admits the job to `engine`'s model or refuses it (429 with Retry-After, 503 while draining).
pub fn submit(
    engine: &EngineHandle,
    id: &str,
    specs: Vec<ImageSpec>,
    timeout: Duration,
    progress: bool,
    previews: bool,
) -> Result<(mpsc::UnboundedReceiver<JobEvent>, Instant), ApiError> {
    // Timeouts are validated to at most a week, so this cannot overflow; stay safe anyway.
    let deadline = Instant::now()
        .checked_add(timeout)
        .ok_or_else(|| ApiError::invalid_field("timeout_secs", "timeout_secs is too large"))?;
    let (job, rx) = Job::new(id.to_string(), specs, deadline, progress);
    let job = if previews { job.with_previews() } else { job };
    match engine.submit(job) {
        Ok(()) => Ok((rx, deadline)),
        Err(SubmitError::Draining) => {
            metrics::counter!("diffit_rejections_total", "reason" => "draining").increment(1);
            Err(ApiError::unavailable(
                "the server is draining; retry on another replica",
            ))
        }
        Err(
            e @ SubmitError::QueueFull {
                retry_after_secs, ..
            },
        ) => {
            metrics::counter!("diffit_rejections_total", "reason" => "queue_full", "model" => engine.name().to_string())
                .increment(1);
            Err(ApiError::queue_full(e.to_string(), retry_after_secs))
        }
    }
}

/// Waits for every image of the job (of model `info`), encoding each as `encoding` says.
/// `on_update` sees the progress (and previews) of streaming requests.
pub async fn collect(
    state: &AppState,
    info: &Arc<ModelInfo>,
    mut rx: mpsc::UnboundedReceiver<JobEvent>,
    specs: &[ImageSpec],
    deadline: Instant,
    encoding: Encoding,
    mut on_update: impl FnMut(Update),
) -> Result<Outcome, ApiError> {
    let start = Instant::now();
    let mut images: Vec<Option<EncodedImage>> = (0..specs.len()).map(|_| None).collect();
    let mut timings = Timings::default();
    let mut remaining = specs.len();
    let options = EncodeOptions {
        format: encoding.format,
        quality: encoding.quality,
        png: state.png_compression,
    };
    let mut encoding_tasks = Vec::with_capacity(specs.len());
    let mut decode_info = vec![(Duration::ZERO, 0); specs.len()];
    // The engine enforces the deadline between steps; this guards a step that overruns it.
    let hard_deadline = tokio::time::Instant::from_std(deadline)
        .checked_add(Duration::from_secs(5))
        .unwrap_or_else(|| tokio::time::Instant::from_std(deadline));
    while remaining > 0 {
        let event = tokio::select! {
            event = tokio::time::timeout_at(hard_deadline, rx.recv()) => {
                event.map_err(|_| ApiError::deadline())?
            }
            _ = state.http.cut_off() => {
                return Err(ApiError::unavailable(
                    "the server is shutting down and its drain timeout passed before the \
                     images were finished; retry on another replica",
                ))
            }
        };
        match event {
            None => {
                return Err(ApiError::unavailable(
                    "the engine stopped before the request finished",
                ))
            }
            Some(JobEvent::Started { queue_wait }) => timings.queue_ms = ms(queue_wait),
            Some(JobEvent::Progress { step, total }) => on_update(Update::Step { step, total }),
            Some(JobEvent::Preview {
                index,
                step,
                total,
                image,
            }) => {
                // A few dozen pixels: cheaper to encode here than to hop to the blocking pool.
                match crate::png::encode_png(
                    &image.pixels,
                    image.channels,
                    image.height,
                    image.width,
                    &[],
                    PngCompression::Fast,
                ) {
                    Ok(png) => on_update(Update::Preview {
                        index,
                        step,
                        total,
                        png,
                        width: image.width,
                        height: image.height,
                    }),
                    Err(e) => tracing::warn!(error = %e, "cannot encode a preview"),
                }
            }
            Some(JobEvent::Failed(EngineError::Deadline)) => return Err(ApiError::deadline()),
            Some(JobEvent::Failed(EngineError::ShuttingDown)) => {
                return Err(ApiError::unavailable("the server is shutting down"))
            }
            Some(JobEvent::Failed(EngineError::Internal(msg))) => {
                return Err(ApiError::internal(msg))
            }
            Some(JobEvent::Image {
                index,
                pixels,
                denoise,
                decode,
                decode_batch,
            }) => {
                // Encoded on the blocking pool while the loop waits for the job's other images:
                // a request's images arrive together after their shared decode, so they encode
                // side by side, and the engine never waits for any of them.
                let spec = specs[index];
                let model = info.clone();
                encoding_tasks.push(tokio::task::spawn_blocking(move || {
                    let t0 = Instant::now();
                    let bytes = model.encode_as(&pixels, &spec, options);
                    (index, bytes, t0.elapsed())
                }));
                timings.denoise_ms = timings.denoise_ms.max(ms(denoise));
                timings.decode_ms = timings.decode_ms.max(ms(decode));
                decode_info[index] = (decode, decode_batch);
                remaining -= 1;
            }
        }
    }
    let format = options.format;
    for task in encoding_tasks {
        let (index, bytes, took) = task
            .await
            .map_err(|e| ApiError::internal(format!("{format} encoder task failed: {e}")))?;
        let bytes =
            bytes.map_err(|e| ApiError::internal(format!("{format} encoding failed: {e}")))?;
        let spec = specs[index];
        let (decode, decode_batch) = decode_info[index];
        tracing::info!(
            image = index,
            seed = spec.seed,
            decode_ms = ms(decode),
            decode_batch,
            encode_ms = ms(took),
            "image decoded and encoded"
        );
        metrics::histogram!("diffit_encode_duration_seconds", "model" => info.name.clone())
            .record(took.as_secs_f64());
        metrics::counter!("diffit_images_generated_total", "model" => info.name.clone())
            .increment(1);
        timings.encode_ms += ms(took);
        images[index] = Some(EncodedImage { bytes, spec });
    }
    timings.total_ms = ms(start.elapsed());
    Ok(Outcome {
        images: images
            .into_iter()
            .map(|i| i.expect("every index filled"))
            .collect(),
        timings,
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}
