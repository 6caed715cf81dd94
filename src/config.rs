//! Every setting of `serve`, as a flag and an environment variable, in one place.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};

use crate::kernels::{Att90Rows, ConvTiling, Fp8Scaling};

/// Where a network runs: `auto` (the first GPU if built with CUDA and one is present, else the
/// CPU), `cpu`, `cuda`, `cuda:N`, or a bare GPU ordinal `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let ordinal = s
            .strip_prefix("cuda:")
            .or_else(|| (s == "cuda").then_some("0"))
            .or_else(|| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s));
        match (s, ordinal) {
            ("auto", _) => Ok(Self::Auto),
            ("cpu", _) => Ok(Self::Cpu),
            (_, Some(n)) => n.parse().map(Self::Cuda).map_err(|_| bad_device(s)),
            _ => Err(bad_device(s)),
        }
    }
}

fn bad_device(s: &str) -> String {
    if s.is_empty() {
        return "empty entry in the device list; use e.g. cuda:0,cuda:1 or 0,1".into();
    }
    format!("device must be auto, cpu, cuda:N or a GPU ordinal N, got '{s}'")
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    pub fn open(self) -> anyhow::Result<Device> {
        match self {
            Self::Auto => Ok(Device::cuda_if_available(0)?),
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => Device::new_cuda(n)
                .with_context(|| format!("cannot open {self} (built without the cuda feature?)")),
        }
    }
}

/// Opens each device of a `--devices` list. A GPU may appear once (one engine per GPU: a
/// device is only ever driven from one host thread); `cpu` may repeat (several CPU engines,
/// for tests).
pub fn open_devices(specs: &[DeviceSpec]) -> anyhow::Result<Vec<Device>> {
    anyhow::ensure!(!specs.is_empty(), "no device given");
    let mut seen = std::collections::HashSet::new();
    specs
        .iter()
        .map(|spec| {
            let device = spec.open()?;
            let name = device_name(&device);
            anyhow::ensure!(
                device.is_cpu() || seen.insert(name.clone()),
                "{name} is listed twice in the device list: one engine per GPU"
            );
            Ok(device)
        })
        .collect()
}

/// `cpu` or `cuda:N`, as devices are named in logs, metrics and the API.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// The precision weights are converted to at load, and activations run in.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Precision {
    F32,
    Bf16,
    F16,
    /// bf16, with the DiffiT blocks' linear layers in FP8 (e4m3; see docs/fp8.md).
    Fp8,
}

/// The dtype activations run in (fp8: bf16; FP8 is only the linear layers' operand format,
/// carried in [`KernelOptions::fp8`]).
impl From<Precision> for DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => DType::F32,
            Precision::Bf16 | Precision::Fp8 => DType::BF16,
            Precision::F16 => DType::F16,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
            Self::Fp8 => "fp8",
        })
    }
}

/// Device and precision of the one-shot commands (`generate`, `forward`, `decode`).
#[derive(Debug, Clone, Copy, Args)]
pub struct RuntimeArgs {
    /// auto | cpu | cuda:N
    #[arg(long, env = "DIFFIT_DEVICE", default_value = "auto")]
    pub device: DeviceSpec,
    /// Weights are converted to this at load.
    #[arg(long, env = "DIFFIT_DTYPE", value_enum, default_value = "f32")]
    pub dtype: Precision,
    #[command(flatten)]
    pub kernels: KernelOptions,
}

impl RuntimeArgs {
    pub fn open(&self) -> anyhow::Result<(Device, DType)> {
        Ok((self.device.open()?, self.dtype.into()))
    }

    /// The kernel options with the precision's FP8 choice applied.
    pub fn kernels(&self) -> KernelOptions {
        self.kernels.with_precision(self.dtype)
    }
}

/// A DiffiT block's linear layers, as `--fp8-layers` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockLinear {
    Qkv,
    Proj,
    Fc1,
    Fc2,
}

impl BlockLinear {
    pub const ALL: [Self; 4] = [Self::Qkv, Self::Proj, Self::Fc1, Self::Fc2];

    fn name(self) -> &'static str {
        match self {
            Self::Qkv => "qkv",
            Self::Proj => "proj",
            Self::Fc1 => "fc1",
            Self::Fc2 => "fc2",
        }
    }
}

/// A set of [`BlockLinear`]s: the layers that run in FP8 under `--dtype fp8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fp8Layers(u8);

impl Fp8Layers {
    pub const NONE: Self = Self(0);
    pub const ALL: Self = Self(0b1111);

    pub fn contains(self, layer: BlockLinear) -> bool {
        self.0 & (1 << layer as u8) != 0
    }
}

impl FromStr for Fp8Layers {
    type Err = String;

    /// A comma-separated list of qkv, proj, fc1, fc2; `all` or `none`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "all" => return Ok(Self::ALL),
            "none" => return Ok(Self::NONE),
            _ => {}
        }
        let mut set = 0u8;
        for part in s.split(',') {
            let part = part.trim();
            let layer = BlockLinear::ALL
                .into_iter()
                .find(|l| l.name() == part)
                .ok_or_else(|| {
                    format!(
                        "FP8 layers are a list of qkv, proj, fc1, fc2 (or all, none), got '{part}'"
                    )
                })?;
            set |= 1 << layer as u8;
        }
        Ok(Self(set))
    }
}

impl fmt::Display for Fp8Layers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = BlockLinear::ALL
            .into_iter()
            .filter(|&l| self.contains(l))
            .map(BlockLinear::name)
            .collect();
        f.write_str(if names.is_empty() { "none" } else { "" })?;
        f.write_str(&names.join(","))
    }
}

/// On, off, or the device's default.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum Toggle {
    /// On for GPUs, off on the CPU.
    #[default]
    Auto,
    #[value(alias = "1", alias = "true")]
    On,
    #[value(alias = "0", alias = "false")]
    Off,
}

impl Toggle {
    pub fn on_for(self, device: &candle_core::Device) -> bool {
        match self {
            Self::Auto => !device.is_cpu(),
            Self::On => true,
            Self::Off => false,
        }
    }
}

/// Default of `KernelOptions::implicit_gemm_conv_max_cout`.
pub const IMPLICIT_GEMM_CONV_MAX_COUT: usize = 128;

/// Which of the hand-written kernels (`crate::kernels`) the networks run through. Every
/// choice computes the same function; these exist to measure and to rule a kernel out when a
/// new card or driver misbehaves. Shared by `serve`, `generate` and the benches.
#[derive(Debug, Clone, Copy, Args, PartialEq, Eq)]
pub struct KernelOptions {
    /// Fused DiffiT block and channels-last VAE kernels (auto: on GPUs; the CPU runs their
    /// fallbacks when on, which the tests use).
    #[arg(
        long = "fused-kernels",
        env = "DIFFIT_FUSED",
        value_enum,
        default_value = "auto"
    )]
    pub fused: Toggle,
    /// Attention as one flash-attention kernel (CUDA, bf16/f16) when the fused path runs.
    #[arg(
        long = "flash-attention",
        env = "DIFFIT_FLASH_ATTENTION",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub flash_attention: bool,
    /// With --flash-attention on a compute-capability 9.0 GPU (H100, H200): the flash-attention
    /// kernel on Hopper's wgmma instructions, with CTAs of 64 or 128 query rows (`off`: the
    /// mma.sync kernel every card runs). Token counts not a multiple of 8 and head dims over 80 take the mma.sync
    /// kernel. Off by default: on the H200 as fast as mma.sync at ImageNet-512 and ≈ 10 % slower at
    /// ImageNet-256 (docs/perf.md v0.32).
    #[arg(
        long = "wgmma-attention",
        env = "DIFFIT_WGMMA_ATTENTION",
        value_enum,
        default_value_t = WgmmaAttention::default()
    )]
    pub wgmma_attention: WgmmaAttention,
    /// Bias, GELU and residual adds inside the cuBLASLt matmul (CUDA, bf16/f16).
    #[arg(
        long = "lt-epilogue",
        env = "DIFFIT_LT_EPILOGUE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub lt_epilogue: bool,
    /// With --lt-epilogue: the DiffiT MLP's bias + GELU in cuBLASLt's GELU_BIAS epilogue too
    /// (false: its plain matmul, then our bias + GELU kernel).
    #[arg(
        long = "lt-gelu-epilogue",
        env = "DIFFIT_LT_GELU_EPILOGUE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub lt_gelu_epilogue: bool,
    /// The cuBLASLt matmuls' algorithm per shape by timing the heuristic's top candidates once
    /// (at the shape's first call) instead of taking its first; the choice is kept for the process.
    #[arg(
        long = "matmul-autotune",
        env = "DIFFIT_MATMUL_AUTOTUNE",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub matmul_autotune: bool,
    /// The VAE's 3×3 convolutions as implicit GEMMs (CUDA, bf16/f16): the im2col tiles are
    /// gathered in shared memory instead of a 9× larger column matrix in memory.
    #[arg(
        long = "implicit-gemm-conv",
        env = "DIFFIT_IMPLICIT_GEMM_CONV",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub implicit_gemm_conv: bool,
    /// Only convolutions with at most this many output channels take the implicit GEMM: on an
    /// H200 it beats im2col + cuBLAS at 128 and loses at 512 (docs/perf.md, v0.20 and v0.30).
    /// Hidden: for measuring where it pays.
    #[arg(long, hide = true, default_value_t = IMPLICIT_GEMM_CONV_MAX_COUT)]
    pub implicit_gemm_conv_max_cout: usize,
    /// The implicit-GEMM convolution's kernel and output tile (docs/perf.md v0.30). Hidden: for
    /// measuring.
    #[arg(long, hide = true, value_enum, default_value_t = ConvTiling::default())]
    pub conv_tiling: ConvTiling,
    /// Denoising steps padded to a few batch shapes and replayed as CUDA graphs, one launch a
    /// step (auto: on GPUs; `on` on the CPU runs the padded steps uncaptured, for the tests).
    #[arg(
        long = "cuda-graphs",
        env = "DIFFIT_CUDA_GRAPHS",
        value_enum,
        default_value = "auto"
    )]
    pub cuda_graphs: Toggle,
    /// Set from `--dtype fp8` ([`KernelOptions::with_precision`]), not a flag of its own: the
    /// DiffiT blocks' linear layers in FP8.
    #[arg(skip)]
    pub fp8: bool,
    /// Under --dtype fp8: the block layers that run in FP8 (qkv, proj, fc1, fc2, comma-separated;
    /// all or none); the others stay bf16.
    #[arg(long = "fp8-layers", env = "DIFFIT_FP8_LAYERS", default_value = "all")]
    pub fp8_layers: Fp8Layers,
    /// Under --dtype fp8: this many first and as many last blocks stay bf16 entirely.
    #[arg(
        long = "fp8-bf16-edge-blocks",
        env = "DIFFIT_FP8_BF16_EDGE_BLOCKS",
        default_value_t = 0
    )]
    pub fp8_edge_blocks: usize,
    /// Under --dtype fp8 on CUDA: where the FP8 layers' scales, bias, GELU and residual are
    /// applied (cublaslt: inside the matmul; pass: after an unscaled FP8 matmul).
    #[arg(long = "fp8-scales", env = "DIFFIT_FP8_SCALES", value_enum, default_value_t = Fp8Scaling::default())]
    pub fp8_scaling: Fp8Scaling,
}

impl Default for KernelOptions {
    fn default() -> Self {
        Self {
            fused: Toggle::Auto,
            flash_attention: true,
            wgmma_attention: WgmmaAttention::default(),
            lt_epilogue: true,
            lt_gelu_epilogue: true,
            matmul_autotune: true,
            implicit_gemm_conv: true,
            implicit_gemm_conv_max_cout: IMPLICIT_GEMM_CONV_MAX_COUT,
            conv_tiling: ConvTiling::default(),
            cuda_graphs: Toggle::Auto,
            fp8: false,
            fp8_layers: Fp8Layers::ALL,
            fp8_edge_blocks: 0,
            fp8_scaling: Fp8Scaling::default(),
        }
    }
}

/// `--wgmma-attention`: the Hopper flash-attention kernel and its CTA size, or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum WgmmaAttention {
    #[default]
    Off,
    #[value(name = "64")]
    Rows64,
    #[value(name = "128")]
    Rows128,
}

impl WgmmaAttention {
    /// The CTA rows of the Hopper kernel, `None` when off.
    pub fn rows(self) -> Option<Att90Rows> {
        match self {
            Self::Off => None,
            Self::Rows64 => Some(Att90Rows::R64),
            Self::Rows128 => Some(Att90Rows::R128),
        }
    }
}

impl KernelOptions {
    /// The plain candle ops everywhere: the readable reference the fused path is tested against.
    pub fn plain() -> Self {
        Self {
            fused: Toggle::Off,
            ..Self::default()
        }
    }

    /// The fused kernels (their CPU fallbacks on the CPU).
    pub fn fused() -> Self {
        Self {
            fused: Toggle::On,
            ..Self::default()
        }
    }

    /// These options for a network run at `precision`: FP8 linear layers for `fp8`.
    pub fn with_precision(self, precision: Precision) -> Self {
        Self {
            fp8: precision == Precision::Fp8,
            ..self
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--warmup-buckets`: which batch-size buckets of the padded steps (`--cuda-graphs`) an
/// engine prepares before it reports ready (`Pipeline::warm_buckets`).
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq, Default)]
pub enum WarmupBuckets {
    /// Every bucket a batch of up to --max-batch images can need: no request pays a bucket's
    /// first step (an uncaptured run, matmul autotuning and the capture).
    #[default]
    All,
    /// Only one image's (buckets 1 and 2): a faster start-up, for development; the first
    /// batch of each other size pays its bucket's first step.
    Minimal,
}

/// Where the embedded default model lives, relative to the working directory, the
/// executable, or the source tree it was built from.
pub const DEFAULT_MODEL_FILE: &str = "diffit_fmnist.safetensors";
pub const DEFAULT_VAE_FILE: &str = "vae_fmnist.safetensors";

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// A model to serve: `NAME=PATH[,vae=PATH][,dtype=..][,steps=..][,sampler=..]
    /// [,guidance_scale=..][,guidance_schedule=..]`, or a bare PATH (named after the file);
    /// PATH `embedded` is the embedded model. Repeat for several models (the env var separates
    /// them with `;`). With no --model and no --models: the embedded model.
    #[arg(long, env = "DIFFIT_MODEL", value_delimiter = ';')]
    pub model: Vec<String>,
    /// A model file (.toml or .json) listing models to serve: `[[models]]` entries with
    /// `name`, `path` and the keys of --model.
    #[arg(long, env = "DIFFIT_MODELS")]
    pub models: Option<PathBuf>,
    /// VAE weights (.safetensors, or a diffusers directory) of every model that names none;
    /// the embedded default when left out.
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
    pub device: DeviceSpec,
    /// Several devices, one engine (model copy) each, sharing one queue: `cuda:0,cuda:1`,
    /// `0,1` (GPU ordinals) or `cpu,cpu`. Overrides --device when given.
    #[arg(long, env = "DIFFIT_DEVICES", value_delimiter = ',')]
    pub devices: Vec<DeviceSpec>,
    /// Weights are converted to this at load (a model's own `dtype=` overrides it).
    #[arg(long, env = "DIFFIT_DTYPE", value_enum, default_value = "f32")]
    pub dtype: Precision,
    /// Most images denoised together in one step.
    #[arg(long, env = "DIFFIT_MAX_BATCH", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub max_batch: u32,
    /// Most images waiting for a batch slot, all models together; beyond it requests get 429.
    /// With several models each is guaranteed an equal share of half of it (docs/models.md).
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
    #[arg(long, env = "DIFFIT_DECODE_CHUNK", default_value_t = crate::model::vae::DEFAULT_DECODE_CHUNK)]
    pub decode_chunk: usize,
    /// Deflate effort of PNG responses: fast (fdeflate, the default), default (zlib 6) or best
    /// (zlib 9, adaptive filters). Lossless at every level; only time and size change.
    #[arg(
        long,
        env = "DIFFIT_PNG_COMPRESSION",
        value_enum,
        default_value = "fast"
    )]
    pub png_compression: crate::png::PngCompression,
    #[arg(long, env = "DIFFIT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(flatten)]
    pub kernels: KernelOptions,
    /// With --cuda-graphs: the step buckets each engine prepares before the server reports
    /// ready: `all` (every one a batch of up to --max-batch images can need) or `minimal`
    /// (one image's; a faster start-up, for development).
    #[arg(long, env = "DIFFIT_WARMUP_BUCKETS", value_enum, default_value = "all")]
    pub warmup_buckets: WarmupBuckets,
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

    /// Every model to serve, checked (names, keys, files) before any is loaded.
    pub fn model_entries(&self) -> anyhow::Result<Vec<crate::catalog::ModelEntry>> {
        crate::catalog::entries(
            &self.model,
            self.models.as_deref(),
            &crate::catalog::Globals {
                vae: self.vae.clone(),
                vae_config: self.vae_config.clone(),
                dtype: Some(self.dtype),
            },
        )
    }

    /// The devices to start an engine on: `--devices` if given, else `--device`.
    pub fn device_specs(&self) -> Vec<DeviceSpec> {
        if self.devices.is_empty() {
            vec![self.device]
        } else {
            self.devices.clone()
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

/// A VAE given as a diffusers directory means the weights file inside it.
pub fn resolve_vae_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("diffusion_pytorch_model.safetensors")
    } else {
        p.to_path_buf()
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(s: &str) -> Result<Vec<DeviceSpec>, String> {
        s.split(',').map(str::parse).collect()
    }

    #[test]
    fn device_specs_parse_and_open() {
        assert_eq!(
            specs("auto,cpu,cuda,cuda:3,7").unwrap(),
            [
                DeviceSpec::Auto,
                DeviceSpec::Cpu,
                DeviceSpec::Cuda(0),
                DeviceSpec::Cuda(3),
                DeviceSpec::Cuda(7)
            ]
        );
        for bad in ["gpu0", "cuda:x", "cpu,tpu", "-1"] {
            let e = specs(bad).unwrap_err();
            assert!(e.contains("auto, cpu, cuda:N"), "{bad}: {e}");
        }
        for empty in ["", "cpu,", "cpu,,cpu"] {
            assert!(specs(empty).unwrap_err().contains("empty entry"), "{empty}");
        }
        let two_cpus = open_devices(&specs("cpu, cpu").unwrap()).unwrap();
        assert!(two_cpus.len() == 2 && two_cpus.iter().all(Device::is_cpu));
        assert!(open_devices(&[]).is_err());
        if !candle_core::utils::cuda_is_available() {
            let e = open_devices(&specs("0,1").unwrap())
                .unwrap_err()
                .to_string();
            assert!(e.contains("cuda:0"), "{e}");
        }
    }

    #[test]
    fn kernel_options_parse_like_the_old_env_vars() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            k: KernelOptions,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["x"], args].concat()).map(|c| c.k);
        assert_eq!(parse(&[]).unwrap(), KernelOptions::default());
        let k = parse(&["--fused-kernels", "0", "--flash-attention", "off"]).unwrap();
        assert_eq!(
            (k.fused, k.flash_attention, k.lt_epilogue),
            (Toggle::Off, false, true)
        );
        assert_eq!(parse(&["--fused-kernels", "1"]).unwrap().fused, Toggle::On);
        let rows = |v| parse(&["--wgmma-attention", v]).map(|k| k.wgmma_attention.rows());
        assert_eq!(rows("off").unwrap(), None);
        assert_eq!(rows("64").unwrap(), Some(Att90Rows::R64));
        assert_eq!(rows("128").unwrap(), Some(Att90Rows::R128));
        assert!(rows("96").is_err(), "only 64 and 128 rows a CTA exist");
        assert!(!parse(&["--lt-epilogue", "0"]).unwrap().lt_epilogue);
        assert!(
            !parse(&["--matmul-autotune", "false"])
                .unwrap()
                .matmul_autotune
        );
        assert!(parse(&["--matmul-autotune", "maybe"]).is_err());
        assert_eq!(
            parse(&["--cuda-graphs", "off"]).unwrap().cuda_graphs,
            Toggle::Off
        );
        assert!(parse(&["--fused-kernels", "maybe"]).is_err());
        assert!(!Toggle::Auto.on_for(&Device::Cpu) && Toggle::On.on_for(&Device::Cpu));
        let tiling = |v| parse(&["--conv-tiling", v]).map(|k| k.conv_tiling);
        assert_eq!(KernelOptions::default().conv_tiling, ConvTiling::Halo128);
        assert_eq!(tiling("gather").unwrap(), ConvTiling::Gather);
        assert_eq!(tiling("halo256").unwrap(), ConvTiling::Halo256);
        assert!(tiling("halo64").is_err(), "only the built tilings exist");
    }

    #[test]
    fn warmup_buckets_default_to_all_and_refuse_other_values() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["x"], args].concat()).map(|c| c.serve);
        assert_eq!(parse(&[]).unwrap().warmup_buckets, WarmupBuckets::All);
        assert_eq!(
            parse(&["--warmup-buckets", "minimal"])
                .unwrap()
                .warmup_buckets,
            WarmupBuckets::Minimal
        );
        let e = parse(&["--warmup-buckets", "some"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("--warmup-buckets") && e.contains("all") && e.contains("minimal"),
            "{e}"
        );
    }

    #[test]
    fn fp8_options_parse_and_follow_the_precision() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            k: KernelOptions,
        }
        let parse = |args: &[&str]| Cli::try_parse_from([&["x"], args].concat()).map(|c| c.k);
        let k = parse(&["--fp8-layers", "qkv, fc1", "--fp8-bf16-edge-blocks", "1"]).unwrap();
        assert!(k.fp8_layers.contains(BlockLinear::Qkv) && k.fp8_layers.contains(BlockLinear::Fc1));
        assert!(
            !k.fp8_layers.contains(BlockLinear::Fc2) && !k.fp8_layers.contains(BlockLinear::Proj)
        );
        assert_eq!(
            (k.fp8_layers.to_string(), k.fp8_edge_blocks),
            ("qkv,fc1".into(), 1)
        );
        assert_eq!(
            parse(&["--fp8-layers", "none"]).unwrap().fp8_layers,
            Fp8Layers::NONE
        );
        let e = parse(&["--fp8-layers", "qkv,mlp"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("qkv, proj, fc1, fc2") && e.contains("'mlp'"),
            "{e}"
        );
        // Only the precision turns FP8 on; it runs in bf16 otherwise.
        assert!(!k.fp8 && k.with_precision(Precision::Fp8).fp8);
        assert!(!k.with_precision(Precision::Bf16).fp8);
        assert_eq!(DType::from(Precision::Fp8), DType::BF16);
        assert_eq!(Precision::Fp8.to_string(), "fp8");
    }
}
