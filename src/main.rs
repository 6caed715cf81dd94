//! Command line: `generate`, `forward`, `decode` (and `serve`, `bench`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::{Args, Parser, Subcommand};
use diffit_server::config::KernelOptions;
use diffit_server::diffusion::guidance::guide_doubled_batch;
use diffit_server::diffusion::{Guidance, GuidanceSchedule, SamplerKind};
use diffit_server::loadgen::{self, LoadConfig, Workload};
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
    /// Load-test a running server on this machine (loopback only; bounded in requests and time).
    Load(LoadArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Step-level continuous batching against request-level batching on one mixed workload.
    Batching(BatchingArgs),
    /// Guided step time, images/s and VAE decode on random weights of the released shapes.
    Model(ModelArgs),
    /// Serving images/s under concurrent load: engine only, engine + PNG, and HTTP end to end.
    Serve(diffit_server::serve_bench::ServeBenchArgs),
    /// Every fused kernel against its unfused candle version on random inputs (fails if any
    /// differs by more than the tolerance of its dtype).
    Kernels(KernelsArgs),
}

#[derive(Args)]
struct KernelsArgs {
    #[arg(long, default_value = "auto")]
    device: String,
    /// Dtypes to check (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,f16")]
    dtypes: Vec<String>,
}

#[derive(Args)]
struct ModelArgs {
    /// 256 or 512 (the ImageNet checkpoint shapes).
    #[arg(long, default_value_t = 256)]
    resolution: usize,
    #[arg(long, default_value = "auto")]
    device: String,
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Images per guided step (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32,64")]
    batches: Vec<usize>,
    /// VAE decode batch sizes (comma-separated; empty to skip).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    vae_batches: Vec<usize>,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also time single ops at the B = 64 shapes (where a step's time goes).
    #[arg(long)]
    ops: bool,
    #[command(flatten)]
    kernels: KernelOptions,
}

#[derive(Args)]
struct LoadArgs {
    /// Server base URL (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, default_value_t = 100)]
    requests: usize,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open-loop Poisson arrivals at this many requests per second (default: closed loop).
    #[arg(long)]
    rate: Option<f64>,
    /// Stop sending after this many seconds; requests time out after it too.
    #[arg(long, default_value_t = 300.0)]
    max_secs: f64,
    /// JSON body for every request (default: the mixed workload).
    #[arg(long)]
    body: Option<String>,
    /// Classes of the mixed workload.
    #[arg(long, default_value_t = 10)]
    num_classes: usize,
    #[arg(long, env = "DIFFIT_LOAD_API_KEY")]
    api_key: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BatchingArgs {
    /// DiffiT model (default: the embedded model).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    vae: Option<PathBuf>,
    #[arg(long, default_value_t = 120)]
    requests: usize,
    /// Poisson arrival rate, requests/s.
    #[arg(long, default_value_t = 4.0)]
    rate: f64,
    #[arg(long, default_value_t = 16)]
    max_batch: u32,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value = "f32")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Also write both reports as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct RuntimeArgs {
    /// auto | cpu | cuda:N
    #[arg(long, env = "DIFFIT_DEVICE", default_value = "auto")]
    device: String,
    /// f32 | bf16 | f16 (weights are converted at load)
    #[arg(long, env = "DIFFIT_DTYPE", default_value = "f32")]
    dtype: String,
    #[command(flatten)]
    kernels: KernelOptions,
}

#[derive(Args)]
struct GenerateArgs {
    /// DiffiT checkpoint (.safetensors, official key names); the embedded model when left out.
    #[arg(long, env = "DIFFIT_MODEL")]
    model: Option<PathBuf>,
    /// VAE: diffusers AutoencoderKL .safetensors, or a directory holding one and config.json.
    #[arg(long, env = "DIFFIT_VAE")]
    vae: Option<PathBuf>,
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
        Command::Load(a) => load(a),
        Command::Bench(BenchCommand::Batching(a)) => bench_batching(a),
        Command::Bench(BenchCommand::Model(a)) => bench_model(a),
        Command::Bench(BenchCommand::Serve(a)) => bench_serve(a),
        Command::Bench(BenchCommand::Kernels(a)) => bench_kernels(a),
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
    let model = DiffiT::load(
        &WeightsFile::open(&a.model)?,
        dtype,
        &device,
        &a.runtime.kernels,
    )?;
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
    let vae = VaeDecoder::load(
        &file,
        a.vae_config.as_deref(),
        dtype,
        &device,
        &a.runtime.kernels,
    )?;
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
    let (model, vae) = diffit_server::config::resolve_model_paths(a.model.clone(), a.vae.clone())?;
    let pipe = Pipeline::load(&LoadOptions {
        model,
        vae,
        vae_config: a.vae_config.clone(),
        device,
        dtype,
        decode_chunk: 8,
        kernels: a.runtime.kernels,
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

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn load(a: LoadArgs) -> anyhow::Result<()> {
    let workload = match &a.body {
        Some(b) => Workload::Fixed(serde_json::from_str(b).context("--body is not JSON")?),
        None => Workload::Mixed {
            num_classes: a.num_classes,
        },
    };
    let cfg = LoadConfig {
        url: a.url.trim_end_matches('/').to_string(),
        requests: a.requests,
        concurrency: a.concurrency,
        rate: a.rate,
        max_duration: std::time::Duration::from_secs_f64(a.max_secs),
        workload,
        api_key: a.api_key.clone(),
        seed: a.seed,
    };
    let report = tokio_runtime()?.block_on(loadgen::run(&cfg))?;
    println!("{report}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}

/// A `serve` child process on a free loopback port, killed on drop.
struct ChildServer(std::process::Child, String);

impl ChildServer {
    fn start(args: &[String]) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().context("child stdout")?;
        let mut lines = std::io::BufReader::new(out).lines();
        let line = lines.next().context("server exited before listening")??;
        std::thread::spawn(move || for _ in lines {});
        let url = line.rsplit(' ').next().unwrap_or_default().to_string();
        Ok(Self(child, url))
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn bench_batching(a: BatchingArgs) -> anyhow::Result<()> {
    let (model, vae) = diffit_server::config::resolve_model_paths(a.model.clone(), a.vae.clone())?;
    let rt = tokio_runtime()?;
    let mut rows = Vec::new();
    for (name, extra) in [("continuous (step-level)", false), ("request-level", true)] {
        let mut args: Vec<String> = vec![
            "--model".into(),
            model.display().to_string(),
            "--vae".into(),
            vae.display().to_string(),
            "--device".into(),
            a.device.clone(),
            "--dtype".into(),
            a.dtype.clone(),
            "--max-batch".into(),
            a.max_batch.to_string(),
            "--max-queue".into(),
            "100000".into(),
        ];
        if extra {
            args.push("--request-level-batching".into());
        }
        let server = ChildServer::start(&args)?;
        let classes = rt.block_on(async {
            let client = reqwest::Client::new();
            for _ in 0..600 {
                if let Ok(r) = client.get(format!("{}/readyz", server.1)).send().await {
                    if r.status() == 200 {
                        break;
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            let v: serde_json::Value = client
                .get(format!("{}/v1/classes", server.1))
                .send()
                .await?
                .json()
                .await?;
            anyhow::Ok(v["num_classes"].as_u64().unwrap_or(10) as usize)
        })?;
        let cfg = LoadConfig {
            url: server.1.clone(),
            requests: a.requests,
            concurrency: 100_000,
            rate: Some(a.rate),
            max_duration: std::time::Duration::from_secs(1800),
            workload: Workload::Mixed {
                num_classes: classes,
            },
            api_key: None,
            seed: a.seed,
        };
        eprintln!("running {name} …");
        let report = rt.block_on(loadgen::run(&cfg))?;
        eprintln!("{name}: {report}");
        rows.push((name, report));
    }
    println!(
        "mixed workload: {} requests, Poisson arrivals at {}/s, steps 10/20/50/100, 3 samplers, guidance 1 or 4, max batch {}",
        a.requests, a.rate, a.max_batch
    );
    println!("| batching | images/s | p50 ms | p95 ms | p99 ms | max ms |");
    println!("|---|---|---|---|---|---|");
    for (name, r) in &rows {
        println!(
            "| {name} | {:.2} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.images_per_sec, r.p50_ms, r.p95_ms, r.p99_ms, r.max_ms
        );
    }
    if let Some(p) = &a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, r)| serde_json::json!({"batching": n, "report": r}))
            .collect();
        std::fs::write(p, serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

fn bench_serve(a: diffit_server::serve_bench::ServeBenchArgs) -> anyhow::Result<()> {
    let report = diffit_server::serve_bench::run(&a)?;
    print!("{report}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}

fn bench_kernels(a: KernelsArgs) -> anyhow::Result<()> {
    let device = parse_device(&a.device)?;
    println!(
        "| fused op ({}) | dtype | rel err vs unfused f32 | ok |",
        diffit_server::pipeline::device_name(&device)
    );
    println!("|---|---|---|---|");
    let mut failed = 0;
    for name in &a.dtypes {
        let dtype = parse_dtype(name)?;
        // f32: the kernels differ from candle's ops only in summation order and fast exp;
        // half types: one rounding of the output.
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        for case in diffit_server::kernels::reference::check_all(&device, dtype)? {
            let ok = case.rel_err <= tol;
            failed += usize::from(!ok);
            println!(
                "| {} | {name} | {:.2e} | {} |",
                case.name,
                case.rel_err,
                if ok { "yes" } else { "NO" }
            );
        }
    }
    anyhow::ensure!(failed == 0, "{failed} fused kernel case(s) over tolerance");
    Ok(())
}

fn bench_model(a: ModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(a.resolution, 256 | 512),
        "--resolution must be 256 or 512"
    );
    let (device, dtype) = (parse_device(&a.device)?, parse_dtype(&a.dtype)?);
    if a.ops {
        println!("| op at the B = 64 shapes ({}) | ms |", a.dtype);
        println!("|---|---|");
        for (name, ms) in diffit_server::bench::op_micro(&device, dtype, a.iters)? {
            println!("| {name} | {ms:.3} |");
        }
    }
    let report = diffit_server::bench::run(&diffit_server::bench::ModelBench {
        latent: a.resolution / 8,
        device,
        dtype,
        batches: a.batches.clone(),
        vae_batches: a.vae_batches.clone(),
        warmup: a.warmup,
        iters: a.iters,
        kernels: a.kernels,
    })?;
    print!("{report}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)?;
    }
    Ok(())
}
