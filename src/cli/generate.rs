//! `generate`: images from the command line, through the same pipeline the server runs.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Tensor;
use clap::{ArgGroup, Args};

use crate::config::{resolve_model_paths, RuntimeArgs};
use crate::diffusion::{random_seed, Guidance, GuidanceSchedule, SamplerKind};
use crate::pipeline::{ImageSpec, LoadOptions, Pipeline};

/// Most images one `generate` makes (they are denoised as one batch).
const MAX_IMAGES: usize = 64;

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("which_class")
        .required(true)
        .args(["class", "class_name"])
))]
pub struct GenerateArgs {
    /// DiffiT checkpoint (.safetensors, official key names); the embedded model when left out.
    #[arg(long, env = "DIFFIT_MODEL")]
    model: Option<PathBuf>,
    /// VAE: diffusers AutoencoderKL .safetensors, or a directory holding one and config.json.
    #[arg(long, env = "DIFFIT_VAE")]
    vae: Option<PathBuf>,
    /// VAE config.json, when it is not beside the weights.
    #[arg(long, env = "DIFFIT_VAE_CONFIG")]
    vae_config: Option<PathBuf>,
    /// Class index (or give --class-name).
    #[arg(long = "class")]
    class: Option<usize>,
    /// Class name or synonym, e.g. "golden retriever" (or give --class).
    #[arg(long)]
    class_name: Option<String>,
    /// Seed of the first image (0 to 18446744073709551615); image i uses seed + i. Random
    /// (below 2^53) when left out.
    #[arg(long, allow_hyphen_values = true, value_parser = parse_seed)]
    seed: Option<u64>,
    /// Denoising steps (2..=1000); the model's default when left out.
    #[arg(long)]
    steps: Option<usize>,
    /// ddpm | ddim | dpm-solver++
    #[arg(long)]
    sampler: Option<SamplerKind>,
    /// Classifier-free guidance scale (1 = none).
    #[arg(long)]
    guidance_scale: Option<f32>,
    /// power-cosine | constant
    #[arg(long)]
    guidance_schedule: Option<GuidanceSchedule>,
    /// Number of images (1..=64); with n > 1 files are named out-0.png, out-1.png, …
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Output PNG path.
    #[arg(short, long, default_value = "out.png")]
    output: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("a seed is an integer from 0 to {}, got '{s}'", u64::MAX))
}

/// Where image `i` of `n` goes: the path itself for one image, `stem-i.png` beside it else.
fn output_path(output: &Path, n: usize, i: usize) -> PathBuf {
    if n == 1 {
        return output.to_path_buf();
    }
    let stem = output.file_stem().and_then(|s| s.to_str()).unwrap_or("out");
    output.with_file_name(format!("{stem}-{i}.png"))
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=MAX_IMAGES).contains(&a.n),
        "--n must be between 1 and {MAX_IMAGES}, got {}",
        a.n
    );
    // Fail before minutes of denoising, not after.
    if let Some(dir) = a.output.parent().filter(|d| !d.as_os_str().is_empty()) {
        anyhow::ensure!(
            dir.is_dir(),
            "cannot write {}: the directory {} does not exist",
            a.output.display(),
            dir.display()
        );
    }
    let seed = a.seed.unwrap_or_else(|| random_seed(a.n as u64));
    anyhow::ensure!(
        seed.checked_add(a.n as u64 - 1).is_some(),
        "--seed {seed} with --n {}: image i uses seed + i, which passes {}",
        a.n,
        u64::MAX
    );
    let (device, dtype) = a.runtime.open()?;
    let (model, vae) = resolve_model_paths(a.model.clone(), a.vae.clone())?;
    let pipe = Pipeline::load(&LoadOptions {
        model,
        vae,
        vae_config: a.vae_config.clone(),
        device,
        dtype,
        decode_chunk: crate::model::vae::DEFAULT_DECODE_CHUNK,
        kernels: a.runtime.kernels(),
    })?;
    let classes = &pipe.info.classes;
    let label = match (a.class, &a.class_name) {
        (Some(c), _) => c,
        (None, Some(name)) => classes.resolve(name).with_context(|| {
            format!(
                "unknown class name '{name}'; close matches: {}",
                classes.close_matches(name, 5).join(", ")
            )
        })?,
        (None, None) => anyhow::bail!("give --class N or --class-name NAME"),
    };
    let d = pipe.info.defaults;
    let guidance = Guidance::new(
        a.guidance_scale.unwrap_or(d.guidance_scale),
        a.guidance_schedule.unwrap_or(d.guidance_schedule),
    )?;
    let specs: Vec<ImageSpec> = (0..a.n as u64)
        .map(|i| ImageSpec {
            label,
            seed: seed + i,
            steps: a.steps.unwrap_or(d.steps),
            sampler: a.sampler.unwrap_or(d.sampler),
            guidance,
        })
        .collect();
    let mut samples = specs
        .iter()
        .map(|s| pipe.new_sample(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let bar = indicatif::ProgressBar::new(specs[0].steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps {elapsed} ({eta} left)",
        )
        .expect("static template"),
    );
    let start = std::time::Instant::now();
    pipe.run_to_end(&mut samples, |_| bar.inc(1))?;
    bar.finish_and_clear();
    let latents: Vec<Tensor> = samples.iter().map(|s| s.latent().clone()).collect();
    let pixels = pipe.decode(&Tensor::cat(&latents, 0)?)?;
    for (i, (spec, px)) in specs.iter().zip(&pixels).enumerate() {
        let path = output_path(&a.output, a.n, i);
        std::fs::write(&path, pipe.info.encode(px, spec)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "wrote {} (class {} '{}', seed {})",
            path.display(),
            spec.label,
            classes.label(spec.label),
            spec.seed
        );
    }
    eprintln!("{} image(s) in {:.2?}", specs.len(), start.elapsed());
    Ok(())
}
