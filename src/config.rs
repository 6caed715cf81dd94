//! Every setting of `serve`, as a flag and an environment variable, in one place.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the embedded default model lives, relative to the working directory, the
/// executable, or the source tree it was built from.
pub const DEFAULT_MODEL_FILE: &str = "diffit_fmnist.safetensors";
pub const DEFAULT_VAE_FILE: &str = "vae_fmnist.safetensors";

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// DiffiT checkpoint; the embedded default in weights/ when left out.
    #[arg(long, env = "DIFFIT_MODEL")]
    pub model: Option<PathBuf>,
    /// VAE weights (.safetensors, or a diffusers directory); the embedded default when left out.
    #[arg(long, env = "DIFFIT_VAE")]
    pub vae: Option<PathBuf>,
    #[arg(long, env = "DIFFIT_VAE_CONFIG")]
    pub vae_config: Option<PathBuf>,
    #[arg(long, env = "DIFFIT_HOST", default_value = "0.0.0.0")]
    pub host: String,
    /// 0 picks a free port (printed at start-up).
    #[arg(long, env = "DIFFIT_PORT", default_value_t = 8080)]
    pub port: u16,
    /// auto | cpu | cuda:N
    #[arg(long, env = "DIFFIT_DEVICE", default_value = "auto")]
    pub device: String,
    /// Several devices, one engine (model copy) each, sharing one queue: `cuda:0,cuda:1`,
    /// `0,1` (GPU ordinals) or `cpu,cpu`. Overrides --device when given.
    #[arg(long, env = "DIFFIT_DEVICES", value_delimiter = ',')]
    pub devices: Vec<String>,
    /// f32 | bf16 | f16
    #[arg(long, env = "DIFFIT_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Most images denoised together in one step.
    #[arg(long, env = "DIFFIT_MAX_BATCH", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: u32,
    /// Most images waiting for a batch slot; beyond it requests get 429.
    #[arg(long, env = "DIFFIT_MAX_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_queue: u32,
    /// Most images one request may ask for.
    #[arg(long, env = "DIFFIT_MAX_IMAGES_PER_REQUEST", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_images_per_request: u32,
    /// Bearer keys accepted (repeat the flag, or comma-separate in the env var). None: no auth.
    #[arg(
        long = "api-key",
        env = "DIFFIT_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Deadline of a request that sets none.
    #[arg(long, env = "DIFFIT_REQUEST_TIMEOUT_SECS", default_value_t = 300.0)]
    pub request_timeout_secs: f64,
    /// Longest deadline a request may ask for.
    #[arg(
        long,
        env = "DIFFIT_MAX_REQUEST_TIMEOUT_SECS",
        default_value_t = 3600.0
    )]
    pub max_request_timeout_secs: f64,
    /// After SIGTERM, how long in-flight work may take before the process exits anyway.
    #[arg(long, env = "DIFFIT_DRAIN_TIMEOUT_SECS", default_value_t = 120.0)]
    pub drain_timeout_secs: f64,
    /// A connection must send a complete request head within this long of its first byte
    /// (or of being accepted); slower ones are closed.
    #[arg(long, env = "DIFFIT_HEADER_READ_TIMEOUT_SECS", default_value_t = 10.0)]
    pub header_read_timeout_secs: f64,
    /// A request's whole body must arrive within this long of its head; else 408.
    #[arg(long, env = "DIFFIT_BODY_READ_TIMEOUT_SECS", default_value_t = 30.0)]
    pub body_read_timeout_secs: f64,
    /// A keep-alive connection with no request for this long is closed.
    #[arg(long, env = "DIFFIT_IDLE_TIMEOUT_SECS", default_value_t = 75.0)]
    pub idle_timeout_secs: f64,
    /// Most open client connections. At the limit the oldest idle one is closed to make room;
    /// if none is idle the new one is refused with 503.
    #[arg(long, env = "DIFFIT_MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,
    /// Most HTTP requests handled at once (probes and /metrics not counted); beyond it 503.
    #[arg(long, env = "DIFFIT_MAX_INFLIGHT_REQUESTS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_inflight_requests: u32,
    /// Browser origins (e.g. `https://app.example.com`, or `*`) allowed to call the API
    /// cross-origin. None by default: cross-origin browser requests get 403.
    #[arg(
        long = "cors-allow-origin",
        env = "DIFFIT_CORS_ALLOW_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_allow_origins: Vec<String>,
    /// Largest request body accepted.
    #[arg(long, env = "DIFFIT_MAX_BODY_BYTES", default_value_t = 65536)]
    pub max_body_bytes: usize,
    /// Most latents decoded by the VAE at once (bounds decoder memory).
    #[arg(long, env = "DIFFIT_DECODE_CHUNK", default_value_t = 8)]
    pub decode_chunk: usize,
    #[arg(long, env = "DIFFIT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Batch whole requests only (no joining mid-way): a baseline for benchmarks.
    #[arg(long, hide = true)]
    pub request_level_batching: bool,
}

/// Shortest deadline a request (or `--request-timeout-secs`) may set: catches milliseconds
/// given for seconds, and a deadline no server could meet.
pub const MIN_REQUEST_TIMEOUT_SECS: f64 = 0.1;
/// Longest any configured duration may be (a week): far beyond any sane setting, and small
/// enough that adding it to an `Instant` can never overflow.
pub const MAX_DURATION_SECS: f64 = 7.0 * 24.0 * 3600.0;

/// A duration flag in seconds, checked to be finite and within `[min, max]`.
pub fn duration_secs(flag: &str, secs: f64, min: f64, max: f64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        secs.is_finite() && (min..=max).contains(&secs),
        "--{flag} must be a number of seconds between {min} and {max}, got {secs}"
    );
    Ok(Duration::from_secs_f64(secs))
}

/// Every duration setting of `serve`, validated.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub request: Duration,
    pub max_request: Duration,
    pub drain: Duration,
    pub header_read: Duration,
    pub body_read: Duration,
    pub idle: Duration,
}

impl ServeArgs {
    /// Checks every duration (finite, bounded, above its minimum) before anything is loaded,
    /// so a bad value ends start-up at once with the flag's name.
    pub fn timeouts(&self) -> anyhow::Result<Timeouts> {
        let max_request = duration_secs(
            "max-request-timeout-secs",
            self.max_request_timeout_secs,
            MIN_REQUEST_TIMEOUT_SECS,
            MAX_DURATION_SECS,
        )?;
        let request = duration_secs(
            "request-timeout-secs",
            self.request_timeout_secs,
            MIN_REQUEST_TIMEOUT_SECS,
            MAX_DURATION_SECS,
        )?;
        Ok(Timeouts {
            // The default deadline is never longer than the maximum.
            request: request.min(max_request),
            max_request,
            drain: duration_secs("drain-timeout-secs", self.drain_timeout_secs, 0.0, 86400.0)?,
            header_read: duration_secs(
                "header-read-timeout-secs",
                self.header_read_timeout_secs,
                0.1,
                3600.0,
            )?,
            body_read: duration_secs(
                "body-read-timeout-secs",
                self.body_read_timeout_secs,
                0.1,
                3600.0,
            )?,
            idle: duration_secs("idle-timeout-secs", self.idle_timeout_secs, 0.1, 86400.0)?,
        })
    }

    /// The allowed cross-origin browser origins, normalised (no trailing slash, lower case).
    pub fn cors_origins(&self) -> anyhow::Result<Vec<String>> {
        self.cors_allow_origins
            .iter()
            .map(|o| o.trim().trim_end_matches('/').to_ascii_lowercase())
            .filter(|o| !o.is_empty())
            .map(|o| {
                anyhow::ensure!(
                    o == "*" || o.starts_with("http://") || o.starts_with("https://"),
                    "--cors-allow-origin takes origins like https://app.example.com (or *), got '{o}'"
                );
                Ok(o)
            })
            .collect()
    }

    /// The devices to start an engine on: `--devices` if given, else `--device`.
    pub fn device_specs(&self) -> Vec<String> {
        if self.devices.iter().any(|d| !d.trim().is_empty()) {
            self.devices.clone()
        } else {
            vec![self.device.clone()]
        }
    }
}

/// The embedded default weights: `weights/` in the working directory, beside or above the
/// executable (`/app/weights` in the image), or in the source tree it was built from.
pub fn default_weights_dir() -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from("weights")];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(4) {
            candidates.push(dir.join("weights"));
        }
    }
    candidates.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights"));
    candidates
        .into_iter()
        .find(|d| d.join(DEFAULT_MODEL_FILE).is_file())
}

/// The model and VAE to load: what was given, else the embedded default.
pub fn resolve_model_paths(
    model: Option<PathBuf>,
    vae: Option<PathBuf>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    match (model, vae) {
        (Some(m), Some(v)) => Ok((m, v)),
        (Some(_), None) => anyhow::bail!("--model needs --vae (the VAE that decodes its latents)"),
        (m, v) => {
            let dir = default_weights_dir().ok_or_else(|| {
                anyhow::anyhow!(
                    "no --model given and the embedded default model (weights/{DEFAULT_MODEL_FILE}) \
                     was not found; pass --model M --vae V"
                )
            })?;
            Ok((
                m.unwrap_or_else(|| dir.join(DEFAULT_MODEL_FILE)),
                v.unwrap_or_else(|| dir.join(DEFAULT_VAE_FILE)),
            ))
        }
    }
}
