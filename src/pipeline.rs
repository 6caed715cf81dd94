//! A loaded model pair (DiffiT + VAE) with its class names, sampling defaults and identity:
//! what `generate` runs directly and what the serving engine owns.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::KernelOptions;
use crate::classes::ClassNames;
use crate::diffusion::{
    denoise_step, Guidance, GuidanceSchedule, SampleState, SamplerKind, ScheduleCache, SeededNoise,
};
use crate::model::{vae, DiffiT, DiffitConfig, VaeDecoder, WeightsFile};
use crate::png::encode_png;

/// Sampling settings used when a request leaves them out.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SamplingDefaults {
    pub steps: usize,
    pub sampler: SamplerKind,
    pub guidance_scale: f32,
    pub guidance_schedule: GuidanceSchedule,
}

impl SamplingDefaults {
    /// The released settings: 250 DDPM steps; 4.4 power-cosine at 256 (latent ≤ 32), 1.49
    /// constant at 512.
    pub fn release(input_size: usize) -> Self {
        let (guidance_scale, guidance_schedule) = if input_size <= 32 {
            (4.4, GuidanceSchedule::PowerCosine)
        } else {
            (1.49, GuidanceSchedule::Constant)
        };
        Self {
            steps: 250,
            sampler: SamplerKind::Ddpm,
            guidance_scale,
            guidance_schedule,
        }
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

/// What the rest of the server needs to know about the loaded model, without the model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The DiffiT file's stem, e.g. `diffit_256`: the model id in the API.
    pub name: String,
    pub config: DiffitConfig,
    pub classes: ClassNames,
    pub defaults: SamplingDefaults,
    /// SHA-256 of the DiffiT file: names the model in every PNG.
    pub model_sha256: String,
    pub image_size: usize,
    pub image_channels: usize,
    pub dtype: String,
    pub device: String,
}

impl ModelInfo {
    /// The tEXt entries recorded in every PNG.
    pub fn png_text(&self, spec: &ImageSpec) -> Vec<(&'static str, String)> {
        vec![
            ("seed", spec.seed.to_string()),
            ("class_label", spec.label.to_string()),
            ("class_name", self.classes.label(spec.label).to_string()),
            ("steps", spec.steps.to_string()),
            ("sampler", spec.sampler.to_string()),
            ("guidance_scale", spec.guidance.scale().to_string()),
            ("guidance_schedule", spec.guidance.schedule().to_string()),
            ("model", self.name.clone()),
            ("model_sha256", self.model_sha256.clone()),
            (
                "Software",
                format!("diffit-server {}", env!("CARGO_PKG_VERSION")),
            ),
        ]
    }

    pub fn encode(&self, pixels: &[u8], spec: &ImageSpec) -> anyhow::Result<Vec<u8>> {
        let side = self.image_size;
        Ok(encode_png(
            pixels,
            self.image_channels,
            side,
            side,
            &self.png_text(spec),
        )?)
    }
}

pub struct Pipeline {
    pub diffit: DiffiT,
    pub vae: Arc<VaeDecoder>,
    pub info: ModelInfo,
    pub decode_chunk: usize,
    schedules: ScheduleCache,
}

/// Class names: the checkpoint's metadata `class_names`, else a side file `<model>.classes.json`
/// or `classes.json` beside it (a JSON list of names or of synonym lists), else ImageNet's for a
/// 1000-class model, else "class N".
fn class_names(file: &WeightsFile, num_classes: usize) -> anyhow::Result<ClassNames> {
    let path = file.path();
    let side_files = [
        path.with_extension("classes.json"),
        path.with_file_name("classes.json"),
    ];
    let (text, origin) = if let Some(text) = file.metadata().get("class_names") {
        (
            text.clone(),
            format!("{}: metadata class_names", path.display()),
        )
    } else if let Some(side) = side_files.iter().find(|p| p.is_file()) {
        let text = std::fs::read_to_string(side)
            .with_context(|| format!("cannot read {}", side.display()))?;
        (text, side.display().to_string())
    } else if num_classes == 1000 {
        return Ok(ClassNames::imagenet());
    } else {
        return Ok(ClassNames::numbered(num_classes));
    };
    let names = ClassNames::from_json(&text).map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
    anyhow::ensure!(
        names.len() == num_classes,
        "{origin}: {} class names for a {num_classes}-class model",
        names.len()
    );
    Ok(names)
}

impl Pipeline {
    pub fn load(opts: &LoadOptions) -> anyhow::Result<Self> {
        let file = WeightsFile::open(&opts.model)?;
        let diffit = DiffiT::load(&file, opts.dtype, &opts.device, &opts.kernels)?;
        let cfg = diffit.config().clone();
        let defaults = match file.metadata().get("defaults") {
            Some(text) => serde_json::from_str(text).with_context(|| {
                format!("{}: metadata 'defaults' is not valid", opts.model.display())
            })?,
            None => SamplingDefaults::release(cfg.input_size),
        };
        let classes = class_names(&file, cfg.num_classes)?;
        let vae_file = WeightsFile::open(resolve_vae_path(&opts.vae))?;
        let vae = VaeDecoder::load(
            &vae_file,
            opts.vae_config.as_deref(),
            opts.dtype,
            &opts.device,
            &opts.kernels,
        )?;
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
            dtype: format!("{:?}", opts.dtype).to_lowercase(),
            device: device_name(&opts.device),
        };
        Ok(Self {
            diffit,
            vae: Arc::new(vae),
            info,
            decode_chunk: opts.decode_chunk.max(1),
            schedules: ScheduleCache::default(),
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
                        build(device).with_context(|| format!("on {}", device_name(device)))
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
        let diffit =
            DiffiT::random(cfg.clone(), dtype, device, kernels).context("building a random DiffiT")?;
        let vae = VaeDecoder::random(crate::model::VaeConfig::sd_kl_f8(), dtype, device, kernels)
            .context("building a random VAE decoder")?;
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
            dtype: format!("{dtype:?}").to_lowercase(),
            device: device_name(device),
            config: cfg,
        };
        Ok(Self {
            diffit,
            vae: Arc::new(vae),
            info,
            decode_chunk: decode_chunk.max(1),
            schedules: ScheduleCache::default(),
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
            denoise_step(&self.diffit, &mut active)?;
            step += 1;
            on_step(step);
        }
    }

    /// Decodes finished latents [B, C, h, w] to planar u8 pixels, one Vec per image.
    pub fn decode(&self, latents: &Tensor) -> anyhow::Result<Vec<Vec<u8>>> {
        decode_pixels(&self.vae, latents, self.decode_chunk)
    }
}

pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// `--device` values: `auto` (first GPU if built with CUDA and present, else CPU), `cpu`, `cuda:N`.
pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0)?),
        other => {
            let n = other
                .strip_prefix("cuda:")
                .or_else(|| (other == "cuda").then_some("0"))
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!("device must be auto, cpu or cuda:N, got '{other}'")
                })?;
            Device::new_cuda(n)
                .with_context(|| format!("cannot open {other} (built without the cuda feature?)"))
        }
    }
}

/// `--devices` values: each `auto`, `cpu`, `cuda:N` or a bare GPU ordinal `N`. A GPU may appear
/// once (one engine per GPU: a device is only ever driven from one host thread); `cpu` may
/// repeat (several CPU engines, for tests).
pub fn parse_devices(specs: &[String]) -> anyhow::Result<Vec<Device>> {
    anyhow::ensure!(!specs.is_empty(), "no device given");
    let mut devices = Vec::with_capacity(specs.len());
    let mut seen = std::collections::HashSet::new();
    for spec in specs {
        let spec = spec.trim();
        anyhow::ensure!(
            !spec.is_empty(),
            "empty entry in the device list {specs:?}; use e.g. cuda:0,cuda:1 or 0,1"
        );
        let device = if spec.bytes().all(|b| b.is_ascii_digit()) {
            parse_device(&format!("cuda:{spec}"))?
        } else {
            parse_device(spec)?
        };
        let name = device_name(&device);
        anyhow::ensure!(
            device.is_cpu() || seen.insert(name.clone()),
            "{name} is listed twice in {specs:?}: one engine per GPU"
        );
        devices.push(device);
    }
    Ok(devices)
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => anyhow::bail!("dtype must be f32, bf16 or f16, got '{other}'"),
    }
}

/// Path helper for tools that accept a directory holding a diffusers VAE.
pub fn resolve_vae_path(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("diffusion_pytorch_model.safetensors")
    } else {
        p.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> Vec<String> {
        s.split(',').map(str::to_string).collect()
    }

    #[test]
    fn device_lists() {
        let d = parse_devices(&list("cpu, cpu")).unwrap();
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(Device::is_cpu));
        for bad in ["", "cpu,", "gpu0", "cuda:x", "cpu,tpu"] {
            assert!(parse_devices(&list(bad)).is_err(), "{bad}");
        }
        assert!(parse_devices(&[]).is_err());
        if !candle_core::utils::cuda_is_available() {
            let e = parse_devices(&list("0,1")).unwrap_err().to_string();
            assert!(e.contains("cuda:0"), "{e}");
        }
    }
}
