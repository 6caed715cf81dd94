//! Command line: `generate`, `forward`, `decode` (and `serve`, `bench`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use diffit_server::diffusion::guidance::guide_doubled_batch;
use diffit_server::diffusion::{Guidance, GuidanceSchedule, SamplerKind};
use diffit_server::model::{vae, DiffiT, VaeDecoder, WeightsFile};
use diffit_server::pipeline::{
    parse_device, parse_dtype, resolve_vae_path, ImageSpec, LoadOptions, Pipeline,
};

#[derive(Parser)]
#[command(
    name = "diffit-server",
    version,
    about = "Serve and run class-conditional latent DiffiT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the embedded default model when no model is given).
    Serve(diffit_server::config::ServeArgs),
    /// Generate images from the command line.
    Generate(GenerateArgs),
    /// Run the network on tensors x, t, y from a safetensors file and write `out`.
    Forward(ForwardArgs),
    /// Decode latents `z` with the VAE; writes `decoded` (f32) and `pixels_u8`.
    Decode(DecodeArgs),
}

#[derive(Args, Clone)]
struct RuntimeArgs {
    /// auto | cpu | cuda:N
    #[arg(long, env = "DIFFIT_DEVICE", default_value = "auto")]
    device: String,
    /// f32 | bf16 | f16 (weights are converted at load)
    #[arg(long, env = "DIFFIT_DTYPE", default_value = "f32")]
    dtype: String,
}

#[derive(Args)]
struct GenerateArgs {
    /// DiffiT checkpoint (.safetensors, official key names).
    #[arg(long, env = "DIFFIT_MODEL")]
    model: PathBuf,
    /// VAE: diffusers AutoencoderKL .safetensors, or a directory holding one and config.json.
    #[arg(long, env = "DIFFIT_VAE")]
    vae: PathBuf,
    /// VAE config.json, when it is not beside the weights.
    #[arg(long, env = "DIFFIT_VAE_CONFIG")]
    vae_config: Option<PathBuf>,
    /// Class index.
    #[arg(
        long = "class",
        conflicts_with = "class_name",
        required_unless_present = "class_name"
    )]
    class: Option<usize>,
    /// Class name or synonym (e.g. "golden retriever").
    #[arg(long)]
    class_name: Option<String>,
    /// Seed of the first image; image i uses seed + i. Random when left out.
    #[arg(long)]
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
    /// Number of images; with n > 1 files are named out-0.png, out-1.png, …
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Output PNG path.
    #[arg(short, long, default_value = "out.png")]
    output: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args)]
struct ForwardArgs {
    #[arg(long)]
    model: PathBuf,
    /// safetensors file with `x` [B,C,H,W] f32, `t` [B] i64, `y` [B] i64.
    #[arg(long)]
    input: PathBuf,
    /// Prefix of the input tensor names (e.g. `fwd.` or `cfg.` for the reference fixture).
    #[arg(long, default_value = "")]
    prefix: String,
    #[arg(long)]
    output: PathBuf,
    /// Treat the batch as [cond; uncond] and write the guided output.
    #[arg(long)]
    guidance_scale: Option<f32>,
    #[arg(long, default_value = "power-cosine")]
    guidance_schedule: GuidanceSchedule,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(Args)]
struct DecodeArgs {
    #[arg(long)]
    vae: PathBuf,
    #[arg(long)]
    vae_config: Option<PathBuf>,
    /// safetensors file with latents `z` [B,C,h,w].
    #[arg(long)]
    input: PathBuf,
    #[arg(long)]
    output: PathBuf,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

impl RuntimeArgs {
    fn resolve(&self) -> anyhow::Result<(Device, DType)> {
        Ok((parse_device(&self.device)?, parse_dtype(&self.dtype)?))
    }
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        diffit_server::telemetry::init_logging(diffit_server::config::LogFormat::Text);
    }
    let result = match cli.command {
        Command::Serve(a) => diffit_server::server::run(a),
        Command::Generate(a) => generate(a),
        Command::Forward(a) => forward(a),
        Command::Decode(a) => decode(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn read_tensors(path: &std::path::Path) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read tensors from {}", path.display()))
}

fn take<'a>(
    map: &'a HashMap<String, Tensor>,
    name: &str,
    path: &std::path::Path,
) -> anyhow::Result<&'a Tensor> {
    map.get(name)
        .with_context(|| format!("{}: no tensor '{name}'", path.display()))
}

fn forward(a: ForwardArgs) -> anyhow::Result<()> {
    let (device, dtype) = a.runtime.resolve()?;
    let model = DiffiT::load(&WeightsFile::open(&a.model)?, dtype, &device)?;
    let inputs = read_tensors(&a.input)?;
    let p = &a.prefix;
    let x = take(&inputs, &format!("{p}x"), &a.input)?
        .to_dtype(DType::F32)?
        .to_device(&device)?;
    let ints = |n: &str| -> anyhow::Result<Vec<i64>> {
        Ok(take(&inputs, &format!("{p}{n}"), &a.input)?
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?)
    };
    let (t, y) = (ints("t")?, ints("y")?);
    let out = match a.guidance_scale {
        None => model.forward(&x, &t, &y)?,
        Some(scale) => {
            let g = Guidance::new(scale, a.guidance_schedule)?;
            anyhow::ensure!(
                t.len() % 2 == 0,
                "a guided batch [cond; uncond] needs an even batch size"
            );
            // As released: the first half of x runs twice, with labels [y; null].
            let half = x.narrow(0, 0, t.len() / 2)?;
            let doubled = Tensor::cat(&[&half, &half], 0)?;
            let raw = model.forward(&doubled, &t, &y)?.to_dtype(DType::F32)?;
            let scales: Vec<f64> = t[..t.len() / 2].iter().map(|&ti| g.scale_at(ti)).collect();
            guide_doubled_batch(&raw, &scales)?
        }
    }
    .to_dtype(DType::F32)?;
    let out = out.to_device(&Device::Cpu)?;
    candle_core::safetensors::save(&HashMap::from([("out", out)]), &a.output)?;
    eprintln!("wrote out {:?} to {}", t.len(), a.output.display());
    Ok(())
}

fn decode(a: DecodeArgs) -> anyhow::Result<()> {
    let (device, dtype) = a.runtime.resolve()?;
    let file = WeightsFile::open(resolve_vae_path(&a.vae))?;
    let vae = VaeDecoder::load(&file, a.vae_config.as_deref(), dtype, &device)?;
    let inputs = read_tensors(&a.input)?;
    let z = take(&inputs, "z", &a.input)?.to_device(&device)?;
    let decoded = vae.decode(&z)?.to_device(&Device::Cpu)?;
    let pixels = vae::to_pixels(&decoded)?;
    let pixels = Tensor::from_vec(pixels, decoded.shape(), &Device::Cpu)?;
    candle_core::safetensors::save(
        &HashMap::from([("decoded", decoded), ("pixels_u8", pixels)]),
        &a.output,
    )?;
    eprintln!("wrote decoded and pixels_u8 to {}", a.output.display());
    Ok(())
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    let (device, dtype) = a.runtime.resolve()?;
    anyhow::ensure!(
        (1..=64).contains(&a.n),
        "--n must be between 1 and 64, got {}",
        a.n
    );
    let pipe = Pipeline::load(&LoadOptions {
        model: a.model.clone(),
        vae: a.vae.clone(),
        vae_config: a.vae_config.clone(),
        device,
        dtype,
        decode_chunk: 8,
    })?;
    let label = match (&a.class, &a.class_name) {
        (Some(c), _) => *c,
        (None, Some(name)) => pipe.info.classes.resolve(name).with_context(|| {
            format!(
                "unknown class name '{name}'; close matches: {}",
                pipe.info.classes.close_matches(name, 5).join(", ")
            )
        })?,
        (None, None) => unreachable!("clap requires --class or --class-name"),
    };
    let d = pipe.info.defaults;
    let guidance = Guidance::new(
        a.guidance_scale.unwrap_or(d.guidance_scale),
        a.guidance_schedule.unwrap_or(d.guidance_schedule),
    )?;
    let seed = a.seed.unwrap_or_else(rand::random);
    let specs: Vec<ImageSpec> = (0..a.n as u64)
        .map(|i| ImageSpec {
            label,
            seed: seed.wrapping_add(i),
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
        let path = if a.n == 1 {
            a.output.clone()
        } else {
            let stem = a
                .output
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("out");
            a.output.with_file_name(format!("{stem}-{i}.png"))
        };
        std::fs::write(&path, pipe.info.encode(px, spec)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "wrote {} (class {} '{}', seed {})",
            path.display(),
            spec.label,
            pipe.info.classes.label(spec.label),
            spec.seed
        );
    }
    eprintln!("{} image(s) in {:.2?}", specs.len(), start.elapsed());
    Ok(())
}
