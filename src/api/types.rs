//! Request and response bodies of the native API, and their validation into engine specs.

use serde::{Deserialize, Serialize};

use super::error::ApiError;
use crate::config::MIN_REQUEST_TIMEOUT_SECS;
use crate::diffusion::guidance::MAX_GUIDANCE_SCALE;
use crate::diffusion::schedule::{MAX_STEPS, MIN_STEPS};
use crate::diffusion::{random_seed, Guidance, GuidanceSchedule, SamplerKind};
use crate::encode::{OutputFormat, DEFAULT_QUALITY};
use crate::pipeline::{ImageSpec, ModelInfo};

/// `POST /generate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateRequest {
    /// The model's id: optional when one model is served.
    pub model: Option<String>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub class_label: Option<i64>,
    pub class_name: Option<String>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub n: Option<i64>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub seed: Option<u64>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub steps: Option<i64>,
    pub sampler: Option<String>,
    pub guidance_scale: Option<f64>,
    pub guidance_schedule: Option<String>,
    #[serde(default)]
    pub stream: bool,
    /// Streamed `progress` events also carry previews of the denoised estimate.
    #[serde(default)]
    pub preview: bool,
    pub output_format: Option<String>,
    #[serde(default, deserialize_with = "super::body::opt_integer")]
    pub output_compression: Option<i64>,
    pub timeout_secs: Option<f64>,
}

/// The sampling fields shared by the native and OpenAI routes, validated.
#[derive(Debug, Default)]
pub struct SamplingFields {
    pub n: Option<i64>,
    pub seed: Option<u64>,
    pub steps: Option<i64>,
    pub sampler: Option<String>,
    pub guidance_scale: Option<f64>,
    pub guidance_schedule: Option<String>,
}

pub struct Limits {
    pub max_images: usize,
    pub max_queue: usize,
}

/// Builds one spec per image (image i uses seed + i), checking every field against its limits.
pub fn build_specs(
    info: &ModelInfo,
    label: usize,
    f: &SamplingFields,
    limits: &Limits,
) -> Result<Vec<ImageSpec>, ApiError> {
    let max_n = limits.max_images.min(limits.max_queue);
    let n = f.n.unwrap_or(1);
    if n < 1 || n as usize > max_n {
        return Err(ApiError::invalid_field(
            "n",
            format!("n must be between 1 and {max_n}, got {n}"),
        ));
    }
    let d = info.defaults;
    let steps = f.steps.unwrap_or(d.steps as i64);
    if steps < MIN_STEPS as i64 || steps > MAX_STEPS as i64 {
        return Err(ApiError::invalid_field(
            "steps",
            format!("steps must be between {MIN_STEPS} and {MAX_STEPS}, got {steps}"),
        ));
    }
    let sampler = match &f.sampler {
        None => d.sampler,
        Some(s) => s.parse::<SamplerKind>().map_err(|_| {
            ApiError::invalid_field(
                "sampler",
                format!("sampler must be one of ddpm, ddim, dpm-solver++; got '{s}'"),
            )
        })?,
    };
    let schedule = match &f.guidance_schedule {
        None => d.guidance_schedule,
        Some(s) => s.parse::<GuidanceSchedule>().map_err(|_| {
            ApiError::invalid_field(
                "guidance_schedule",
                format!("guidance_schedule must be power-cosine or constant; got '{s}'"),
            )
        })?,
    };
    let scale = f.guidance_scale.unwrap_or(d.guidance_scale as f64);
    // Checked as given (f64): converting 1e308 to f32 first would report it as "inf".
    if !scale.is_finite() || !(0.0..=MAX_GUIDANCE_SCALE as f64).contains(&scale) {
        return Err(ApiError::invalid_field(
            "guidance_scale",
            format!(
                "guidance_scale must be between 0 and {MAX_GUIDANCE_SCALE}, got {}",
                show_number(scale)
            ),
        ));
    }
    let guidance = Guidance::new(scale as f32, schedule)
        .map_err(|e| ApiError::invalid_field("guidance_scale", e.to_string()))?;
    let seed = match f.seed {
        Some(seed) => seed,
        None => random_seed(n as u64),
    };
    // Image i uses seed + i: refuse rather than wrap past 2^64 − 1.
    if seed.checked_add(n as u64 - 1).is_none() {
        return Err(ApiError::invalid_field(
            "seed",
            format!(
                "seed + n - 1 must be at most {} (image i uses seed + i); got seed {seed} with n {n}",
                u64::MAX
            ),
        ));
    }
    Ok((0..n as u64)
        .map(|i| ImageSpec {
            label,
            seed: seed + i,
            steps: steps as usize,
            sampler,
            guidance,
        })
        .collect())
}

/// How to encode the images: `output_format` (png, jpeg, webp; `jpg` too) and
/// `output_compression` (0–100, the JPEG quality; PNG and WebP are lossless here).
#[derive(Debug, Clone, Copy)]
pub struct Encoding {
    pub format: OutputFormat,
    pub quality: u8,
}

impl Default for Encoding {
    fn default() -> Self {
        Self {
            format: OutputFormat::Png,
            quality: DEFAULT_QUALITY,
        }
    }
}

/// Validates `output_format` and `output_compression`; `fallback` is the format when none is
/// named (e.g. from the Accept header).
pub fn check_encoding(
    format: Option<&str>,
    compression: Option<i64>,
    fallback: OutputFormat,
) -> Result<Encoding, ApiError> {
    let format = match format {
        None => fallback,
        Some(f) => f.parse().map_err(|_| {
            ApiError::invalid_field(
                "output_format",
                format!("output_format must be png, jpeg or webp; got '{f}'"),
            )
        })?,
    };
    let quality = match compression {
        None => DEFAULT_QUALITY,
        Some(c @ 0..=100) => (c as u8).max(1),
        Some(c) => {
            return Err(ApiError::invalid_field(
                "output_compression",
                format!("output_compression must be between 0 and 100, got {c}"),
            ))
        }
    };
    Ok(Encoding { format, quality })
}

/// Resolves `class_label` / `class_name` (exactly one) to a class index.
pub fn resolve_class(
    info: &ModelInfo,
    label: Option<i64>,
    name: Option<&str>,
) -> Result<usize, ApiError> {
    let n = info.config.num_classes;
    match (label, name) {
        (Some(_), Some(_)) => Err(ApiError::invalid_field(
            "class_label",
            "give class_label or class_name, not both",
        )),
        (None, None) => Err(ApiError::invalid_field(
            "class_label",
            format!("class_label (0..{}) or class_name is required", n - 1),
        )),
        (Some(l), None) => {
            if l < 0 || l as usize >= n {
                Err(ApiError::invalid_field(
                    "class_label",
                    format!("class_label must be between 0 and {}, got {l}", n - 1),
                ))
            } else {
                Ok(l as usize)
            }
        }
        (None, Some(s)) => resolve_name(info, s, "class_name"),
    }
}

/// A class by name, synonym or number; an unknown name lists close matches.
pub fn resolve_name(info: &ModelInfo, s: &str, param: &str) -> Result<usize, ApiError> {
    info.classes.resolve(s).ok_or_else(|| {
        let close = info.classes.close_matches(s, 5);
        ApiError::invalid_field(
            param,
            format!(
                "unknown class '{s}'; close matches: {} (GET /v1/classes lists all {})",
                close.join(", "),
                info.classes.len()
            ),
        )
    })
}

/// [`resolve_name`], with the close-match search of an unknown name run on the blocking pool
/// so that no name, however long or odd, holds up the async runtime.
pub async fn resolve_name_off_runtime(
    info: std::sync::Arc<ModelInfo>,
    name: String,
    param: &'static str,
) -> Result<usize, ApiError> {
    if name.len() <= 256 {
        if let Some(i) = info.classes.resolve(&name) {
            return Ok(i);
        }
    }
    tokio::task::spawn_blocking(move || resolve_name(&info, &name, param))
        .await
        .map_err(|e| ApiError::internal(format!("class name lookup failed: {e}")))?
}

/// A number as a person would write it back: 1e308 rather than 309 digits.
fn show_number(x: f64) -> String {
    if x != 0.0 && !(1e-4..1e6).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

pub fn check_timeout(
    secs: Option<f64>,
    default: std::time::Duration,
    max: std::time::Duration,
) -> Result<std::time::Duration, ApiError> {
    match secs {
        None => Ok(default),
        Some(s) if s.is_finite() && s >= MIN_REQUEST_TIMEOUT_SECS && s <= max.as_secs_f64() => {
            Ok(std::time::Duration::from_secs_f64(s))
        }
        Some(s) => Err(ApiError::invalid_field(
            "timeout_secs",
            format!(
                "timeout_secs must be at least {MIN_REQUEST_TIMEOUT_SECS} and at most {}, got {}",
                max.as_secs_f64(),
                show_number(s)
            ),
        )),
    }
}

/// One image: its bytes in `b64_<output_format>` (one of the three), its seed as a number and
/// as a string (`seed_str`, for clients whose JSON numbers are float64).
#[derive(Debug, Serialize)]
pub struct ImageJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_jpeg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_webp: Option<String>,
    pub seed: u64,
    pub seed_str: String,
    pub class_label: usize,
    pub class_name: String,
}

#[derive(Debug, Serialize, Default, Clone, Copy)]
pub struct Timings {
    pub queue_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    pub encode_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct GenerateResponse {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub steps: usize,
    pub sampler: String,
    pub guidance_scale: f32,
    pub guidance_schedule: String,
    pub output_format: String,
    pub images: Vec<ImageJson>,
    pub timings: Timings,
}
