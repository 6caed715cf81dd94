//! A loaded model pair (DiffiT + VAE) with its class names, sampling defaults and identity:
//! what `generate` runs directly and what the serving engine owns.

pub mod graphs;
mod info;
mod warm;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

pub use graphs::{StepGraphs, StepMode};
pub use info::{ModelInfo, SamplingDefaults};
pub use warm::{max_step_rows, specs_for_rows, BucketWarmup};

use crate::classes::ClassNames;
use crate::config::{device_name, resolve_vae_path, KernelOptions};
use crate::diffusion::{Guidance, SampleState, SamplerKind, ScheduleCache, SeededNoise};
use crate::model::{vae, DiffiT, DiffitConfig, VaeDecoder, WeightsFile};

impl SamplingDefaults {
    /// Checks settings read from a checkpoint: a request that leaves a field out gets these,
    /// so a bad one would fail every such request (and the engine's warm-up) at run time.
    pub fn validate(&self) -> anyhow::Result<()> {
        use crate::diffusion::schedule::{MAX_STEPS, MIN_STEPS};
        anyhow::ensure!(
            (MIN_STEPS..=MAX_STEPS).contains(&self.steps),
            "steps must be between {MIN_STEPS} and {MAX_STEPS}, got {}",
            self.steps
        );
        Guidance::new(self.guidance_scale, self.guidance_schedule)
            .map_err(|e| anyhow::anyhow!("guidance_scale: {e}"))?;
        Ok(())
    }
}

/// Where the weights come from and how to run them.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub model: PathBuf,
    pub vae: PathBuf,
    pub vae_config: Option<PathBuf>,
    pub device: Device,
    pub dtype: DType,
    /// Most latents decoded at once.
    pub decode_chunk: usize,
    pub kernels: KernelOptions,
}

/// Everything that determines one image.
#[derive(Debug, Clone, Copy)]
pub struct ImageSpec {
    pub label: usize,
    pub seed: u64,
    pub steps: usize,
    pub sampler: SamplerKind,
    pub guidance: Guidance,
}

/// Decodes latents [B, C, h, w] in chunks of `chunk` to planar u8 pixels, one Vec per image.
pub fn decode_pixels(
    vae: &VaeDecoder,
    latents: &Tensor,
    chunk: usize,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let decoded = vae.decode_chunked(latents, chunk)?;
    let b = decoded.dim(0)?;
    let pixels = vae::to_pixels(&decoded)?;
    let per = pixels.len() / b.max(1);
    Ok(pixels.chunks(per).map(<[u8]>::to_vec).collect())
}

pub struct Pipeline {
    pub diffit: DiffiT,
    pub vae: Arc<VaeDecoder>,
    pub info: ModelInfo,
    pub decode_chunk: usize,
    schedules: ScheduleCache,
    /// How steps run (`--cuda-graphs`), with this model's captured graphs.
    steps: Mutex<StepGraphs>,
}

impl Pipeline {
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        let file = WeightsFile::open(&opts.model)?;
        // Each stage of a load logged (DEBUG) with its device: where a start-up stops is then
        // visible (docs/fp8.md: an FP8 start-up that hung before its model was built).
        let device = device_name(&opts.device);
        tracing::debug!(%device, model = %opts.model.display(), "building the DiffiT");
        let diffit = DiffiT::load(&file, opts.dtype, &opts.device, &opts.kernels)?;
        tracing::debug!(%device, "DiffiT built");
        let cfg = diffit.config().clone();
        let defaults = match file.metadata().get("defaults") {
            Some(text) => {
                let d: SamplingDefaults = serde_json::from_str(text).with_context(|| {
                    format!("{}: metadata 'defaults' is not valid", opts.model.display())
                })?;
                d.validate().with_context(|| {
                    format!("{}: metadata 'defaults' is not valid", opts.model.display())
                })?;
                d
            }
            None => SamplingDefaults::release(cfg.input_size),
        };
        let classes = info::class_names(&file, cfg.num_classes)?;
        let vae_file = WeightsFile::open(resolve_vae_path(&opts.vae))?;
        let vae = VaeDecoder::load(
            &vae_file,
            opts.vae_config.as_deref(),
            opts.dtype,
            &opts.device,
            &opts.kernels,
        )?;
        tracing::debug!(%device, "VAE decoder built");
        anyhow::ensure!(
            vae.config().latent_channels == cfg.in_channels,
            "VAE {} decodes {}-channel latents but the DiffiT model makes {}-channel ones",
            opts.vae.display(),
            vae.config().latent_channels,
            cfg.in_channels
        );
        let info = ModelInfo {
            name: opts
                .model
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("diffit")
                .to_string(),
            config: cfg.clone(),
            classes,
            defaults,
            model_sha256: file.sha256(),
            image_size: cfg.input_size * vae.config().upscale(),
            image_channels: vae.config().out_channels,
            dtype: match opts.kernels.fp8 {
                true => "fp8".into(),
                false => format!("{:?}", opts.dtype).to_lowercase(),
            },
            device: device_name(&opts.device),
        };
        Ok(Self {
            diffit,
            vae: Arc::new(vae),
            info,
            decode_chunk: opts.decode_chunk.max(1),
            schedules: ScheduleCache::default(),
            steps: Mutex::new(StepGraphs::new(StepMode::resolve(
                opts.kernels.cuda_graphs,
                &opts.device,
            ))),
        })
    }

    /// One pipeline per device, loaded in parallel (each device gets its own copy).
    pub fn load_on_each(opts: &LoadOptions, devices: &[Device]) -> anyhow::Result<Vec<Self>> {
        Self::build_on_each(devices, |device| {
            Self::load(&LoadOptions {
                device: device.clone(),
                ..opts.clone()
            })
        })
    }

    /// Runs `build` once per device, in parallel, keeping the devices' order.
    pub fn build_on_each(
        devices: &[Device],
        build: impl Fn(&Device) -> anyhow::Result<Self> + Sync,
    ) -> anyhow::Result<Vec<Self>> {
        anyhow::ensure!(!devices.is_empty(), "no device to load the model on");
        let build = &build;
        std::thread::scope(|scope| {
            let loads: Vec<_> = devices
                .iter()
                .map(|device| {
                    scope.spawn(move || {
                        let name = device_name(device);
                        let pipeline = build(device).with_context(|| format!("on {name}"))?;
                        // The build only queues its device work (random weights, FP8
                        // quantisation, uploads). Finish it on this thread before the thread
                        // ends: on the H200, FP8 start-ups whose loading thread ended with that
                        // work still queued hung with the GPU idle (docs/fp8.md). It also
                        // means that "built" covers the weights being on the device, and that
                        // an error in that work surfaces here, naming the device.
                        let start = std::time::Instant::now();
                        device
                            .synchronize()
                            .with_context(|| format!("finishing the model's upload to {name}"))?;
                        tracing::debug!(device = %name, elapsed = ?start.elapsed(), "model on the device");
                        Ok(pipeline)
                    })
                })
                .collect();
            loads
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a model loading thread panicked"))?
                })
                .collect()
        })
    }

    /// Random weights of the released ImageNet shapes (`latent` 32 for 256 px, 64 for 512 px)
    /// and the SD VAE's: for benchmarks, where speed does not depend on the values.
    pub fn random(
        latent: usize,
        dtype: DType,
        device: &Device,
        decode_chunk: usize,
        kernels: &KernelOptions,
    ) -> anyhow::Result<Self> {
        let cfg = DiffitConfig::imagenet(latent);
        let name = device_name(device);
        tracing::debug!(device = %name, latent, "building a random DiffiT");
        let diffit = DiffiT::random(cfg.clone(), dtype, device, kernels)
            .context("building a random DiffiT")?;
        tracing::debug!(device = %name, "random DiffiT built; building a random VAE decoder");
        let vae = VaeDecoder::random(crate::model::VaeConfig::sd_kl_f8(), dtype, device, kernels)
            .context("building a random VAE decoder")?;
        tracing::debug!(device = %name, "random VAE decoder built");
        let info = ModelInfo {
            name: format!("random-imagenet-{}", latent * vae.config().upscale()),
            classes: if cfg.num_classes == 1000 {
                ClassNames::imagenet()
            } else {
                ClassNames::numbered(cfg.num_classes)
            },
            defaults: SamplingDefaults::release(cfg.input_size),
            model_sha256: "random-weights".into(),
            image_size: cfg.input_size * vae.config().upscale(),
            image_channels: vae.config().out_channels,
            dtype: match kernels.fp8 {
                true => "fp8".into(),
                false => format!("{dtype:?}").to_lowercase(),
            },
            device: device_name(device),
            config: cfg,
        };
        Ok(Self {
            diffit,
            vae: Arc::new(vae),
            info,
            decode_chunk: decode_chunk.max(1),
            schedules: ScheduleCache::default(),
            steps: Mutex::new(StepGraphs::new(StepMode::resolve(
                kernels.cuda_graphs,
                device,
            ))),
        })
    }

    pub fn device(&self) -> &Device {
        self.diffit.device()
    }

    /// A fresh sample whose latent and noise come from `spec.seed` alone.
    pub fn new_sample(&self, spec: &ImageSpec) -> anyhow::Result<SampleState> {
        let cfg = self.diffit.config();
        anyhow::ensure!(
            spec.label < cfg.num_classes,
            "class {} is outside 0..{}",
            spec.label,
            cfg.num_classes - 1
        );
        let schedule = self.schedules.get(spec.steps)?;
        Ok(SampleState::new(
            spec.label as i64,
            spec.sampler,
            spec.guidance,
            schedule,
            Box::new(SeededNoise::new(spec.seed)),
            (cfg.in_channels, cfg.input_size, cfg.input_size),
            self.device(),
        )?)
    }

    /// Runs samples to completion together (no joining mid-way); `on_step` sees progress.
    pub fn run_to_end(
        &self,
        samples: &mut [SampleState],
        mut on_step: impl FnMut(usize),
    ) -> anyhow::Result<()> {
        let mut step = 0;
        loop {
            let mut active: Vec<&mut SampleState> =
                samples.iter_mut().filter(|s| !s.is_done()).collect();
            if active.is_empty() {
                return Ok(());
            }
            self.step(&mut active)?;
            step += 1;
            on_step(step);
        }
    }

    /// Advances every sample by one step: one network forward over all of them (guided
    /// samples twice), guidance and each sample's sampler update; as a CUDA graph replay
    /// where `--cuda-graphs` says so (`graphs`).
    pub fn step(&self, samples: &mut [&mut SampleState]) -> anyhow::Result<()> {
        self.steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .step(&self.diffit, samples)
    }

    /// How steps run now (a failed capture in `auto` falls back to `Direct`).
    pub fn step_mode(&self) -> StepMode {
        self.steps.lock().unwrap_or_else(|e| e.into_inner()).mode()
    }

    /// The step buckets ready to run without first-use work (`StepGraphs::ready_buckets`).
    pub fn ready_buckets(&self) -> Vec<usize> {
        self.steps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .ready_buckets()
    }

    /// Decodes finished latents [B, C, h, w] to planar u8 pixels, one Vec per image.
    pub fn decode(&self, latents: &Tensor) -> anyhow::Result<Vec<Vec<u8>>> {
        decode_pixels(&self.vae, latents, self.decode_chunk)
    }
}
