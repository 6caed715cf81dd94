//! `diffit-server bench model`: the network's guided step time, images/s and VAE decode speed on
//! random weights of the released shapes (speed does not depend on the values).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Args;
use serde::Serialize;

use super::stats::median;
use crate::config::{device_name, DeviceSpec, KernelOptions, Precision};
use crate::diffusion::{
    Guidance, GuidanceSchedule, SampleState, SamplerKind, Schedule, SeededNoise,
};
use crate::model::{DiffiT, DiffitConfig, VaeConfig, VaeDecoder};
use crate::pipeline::{StepGraphs, StepMode};

#[derive(Debug, Args)]
pub struct ModelArgs {
    /// 256 or 512 (the ImageNet checkpoint shapes).
    #[arg(long, default_value_t = 256)]
    pub resolution: usize,
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: Precision,
    /// Images per guided step (comma-separated; the flag with no value skips the steps and the
    /// DiffiT build, e.g. to profile the decode alone).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,4,16,32,64")]
    pub batches: Vec<usize>,
    /// VAE decode batch sizes (comma-separated; the flag with no value skips the decode).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "1,8")]
    pub vae_batches: Vec<usize>,
    /// Latents per VAE decode chunk (as `serve --decode-chunk`); each chunk is one pass where
    /// it fits the decoder's buffers.
    #[arg(long, default_value_t = crate::model::vae::DEFAULT_DECODE_CHUNK)]
    pub decode_chunk: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
    /// Also time single ops at the B = 64 shapes (where a step's time goes).
    #[arg(long)]
    pub ops: bool,
    #[command(flatten)]
    pub kernels: KernelOptions,
}

/// `bench model`: the op table (with `--ops`), then the step and decode table.
pub fn cli(a: ModelArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        matches!(a.resolution, 256 | 512),
        "--resolution must be 256 or 512, got {}",
        a.resolution
    );
    let (device, dtype) = (a.device.open()?, DType::from(a.dtype));
    if a.ops {
        println!("| op at the B = 64 shapes ({}) | ms |", a.dtype);
        println!("|---|---|");
        for (name, ms) in super::ops::op_micro(&device, dtype, a.iters)? {
            println!("| {name} | {ms:.3} |");
        }
    }
    let report = run(&ModelBench {
        latent: a.resolution / 8,
        device,
        dtype,
        batches: a.batches,
        vae_batches: a.vae_batches,
        decode_chunk: a.decode_chunk,
        warmup: a.warmup,
        iters: a.iters,
        kernels: a.kernels.with_precision(a.dtype),
    })?;
    print!("{report}");
    if let Some(p) = &a.json {
        super::write_json(p, &report)?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct ModelBench {
    /// 32 for ImageNet-256, 64 for -512.
    pub latent: usize,
    pub device: Device,
    pub dtype: DType,
    pub batches: Vec<usize>,
    pub vae_batches: Vec<usize>,
    pub decode_chunk: usize,
    pub warmup: usize,
    pub iters: usize,
    pub kernels: KernelOptions,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRow {
    pub images: usize,
    pub step_ms_median: f64,
    pub step_ms_min: f64,
    /// Host time until the step's work is queued (median): where it nears the step time, the
    /// GPU waits on the host.
    pub enqueue_ms_median: f64,
    pub tflops: f64,
    pub images_per_sec_250: f64,
    pub images_per_sec_50: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeRow {
    pub images: usize,
    /// The pass sizes the decode ran in (`VaeDecoder::pass_sizes` for the chunk asked).
    pub passes: Vec<usize>,
    pub ms_median: f64,
    pub images_per_sec: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelBenchReport {
    pub latent: usize,
    pub dtype: String,
    pub device: String,
    pub gflop_per_image_forward: f64,
    pub steps: Vec<StepRow>,
    pub decode: Vec<DecodeRow>,
}

/// 2·m·n·k FLOP of one forward for one image (all matmuls, attention included).
pub fn forward_flop(cfg: &DiffitConfig) -> f64 {
    let (n, d, m) = (
        cfg.num_tokens() as f64,
        cfg.hidden_size as f64,
        cfg.mlp_hidden as f64,
    );
    let p2c = (cfg.patch_size * cfg.patch_size) as f64;
    let per_block = 2.0 * n * d * 3.0 * d
        + 2.0 * d * 3.0 * d
        + 2.0 * 2.0 * n * n * d
        + 2.0 * n * d * d
        + 2.0 * 2.0 * n * d * m;
    let other = 2.0 * n * d * p2c * cfg.in_channels as f64
        + 2.0 * (256.0 * d + d * d)
        + 2.0 * n * d * p2c * cfg.out_channels as f64;
    cfg.depth as f64 * per_block + other
}

pub fn run(b: &ModelBench) -> anyhow::Result<ModelBenchReport> {
    let cfg = DiffitConfig::imagenet(b.latent);
    let flop = forward_flop(&cfg);
    Ok(ModelBenchReport {
        latent: b.latent,
        dtype: match b.kernels.fp8 {
            true => "fp8".into(),
            false => format!("{:?}", b.dtype).to_lowercase(),
        },
        device: device_name(&b.device),
        gflop_per_image_forward: flop / 1e9,
        steps: time_steps(b, &cfg, flop)?,
        decode: time_decode(b)?,
    })
}

/// The guided step at each of `b.batches` (none: the model is not built).
fn time_steps(b: &ModelBench, cfg: &DiffitConfig, flop: f64) -> anyhow::Result<Vec<StepRow>> {
    let mut steps = Vec::new();
    if b.batches.is_empty() {
        return Ok(steps);
    }
    let t0 = Instant::now();
    let model = DiffiT::random(cfg.clone(), b.dtype, &b.device, &b.kernels)?;
    b.device.synchronize()?;
    eprintln!(
        "random ImageNet-{} DiffiT built in {:.1?}",
        b.latent * 8,
        t0.elapsed()
    );
    let schedule = Arc::new(Schedule::new(250)?);
    // A constant scale: every timed step is guided (2B network rows). The power-cosine ramp is
    // exactly 1 over the first ≈ 10 % of a run, where a step takes only B rows
    // (`Guidance::scale_for_step`), and the timed steps are a run's first ones.
    let guidance = Guidance::new(4.4, GuidanceSchedule::Constant)?;
    // The serving step: padded and replayed as a CUDA graph unless --cuda-graphs off.
    let mode = StepMode::resolve(b.kernels.cuda_graphs, &b.device);
    eprintln!("steps: {mode:?}");
    let mut stepper = StepGraphs::new(mode);
    for &n in &b.batches {
        let mut samples: Vec<SampleState> = (0..n)
            .map(|i| {
                SampleState::new(
                    (i % 1000) as i64,
                    SamplerKind::Ddpm,
                    guidance,
                    schedule.clone(),
                    Box::new(SeededNoise::new(i as u64)),
                    (cfg.in_channels, cfg.input_size, cfg.input_size),
                    &b.device,
                )
            })
            .collect::<candle_core::Result<_>>()?;
        let (mut times, mut enqueue) = (Vec::new(), Vec::new());
        for it in 0..b.warmup + b.iters {
            let start = Instant::now();
            let mut refs: Vec<&mut SampleState> = samples.iter_mut().collect();
            stepper.step(&model, &mut refs)?;
            let queued = start.elapsed();
            b.device.synchronize()?;
            if it >= b.warmup {
                times.push(start.elapsed().as_secs_f64() * 1e3);
                enqueue.push(queued.as_secs_f64() * 1e3);
            }
        }
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let med = median(times);
        let row = StepRow {
            images: n,
            step_ms_median: med,
            step_ms_min: min,
            enqueue_ms_median: median(enqueue),
            tflops: 2.0 * n as f64 * flop / (med * 1e-3) / 1e12,
            images_per_sec_250: n as f64 / (med * 1e-3 * 250.0),
            images_per_sec_50: n as f64 / (med * 1e-3 * 50.0),
        };
        eprintln!(
            "{row:?} (steps: {:?}; (bucket, graph nodes): {:?}, graph memory {:?} MiB)",
            stepper.mode(),
            stepper.captured(),
            StepGraphs::graph_memory_mib(&b.device)
        );
        steps.push(row);
    }
    // The graphs first: they hold the model's weights' addresses.
    drop(stepper);
    drop(model);
    Ok(steps)
}

/// The VAE decode at each of `b.vae_batches` (none: the decoder is not built).
fn time_decode(b: &ModelBench) -> anyhow::Result<Vec<DecodeRow>> {
    let mut decode = Vec::new();
    if !b.vae_batches.is_empty() {
        let vae = VaeDecoder::random(VaeConfig::sd_kl_f8(), b.dtype, &b.device, &b.kernels)?;
        for &n in &b.vae_batches {
            let z = Tensor::randn(0f32, 1.0, (n, 4, b.latent, b.latent), &b.device)?;
            let mut times = Vec::new();
            for it in 0..b.warmup.max(1) + b.iters.min(5) {
                let start = Instant::now();
                let out = vae.decode_chunked(&z, b.decode_chunk)?;
                b.device.synchronize()?;
                drop(out);
                if it >= b.warmup.max(1) {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let med = median(times);
            let row = DecodeRow {
                images: n,
                passes: vae.pass_sizes(n, b.decode_chunk, (b.latent, b.latent)),
                ms_median: med,
                images_per_sec: n as f64 / (med * 1e-3),
            };
            eprintln!("{row:?}");
            decode.push(row);
        }
    }
    Ok(decode)
}

impl std::fmt::Display for ModelBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "ImageNet-{} DiffiT, {} on {}, guided step (2B network rows), {:.1} GFLOP/image forward",
            self.latent * 8,
            self.dtype,
            self.device,
            self.gflop_per_image_forward
        )?;
        writeln!(
            f,
            "| B | step ms (median) | min | host ms | TFLOP/s | img/s @250 | img/s @50 |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|")?;
        for r in &self.steps {
            writeln!(
                f,
                "| {} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
                r.images,
                r.step_ms_median,
                r.step_ms_min,
                r.enqueue_ms_median,
                r.tflops,
                r.images_per_sec_250,
                r.images_per_sec_50
            )?;
        }
        if !self.decode.is_empty() {
            writeln!(f, "| VAE decode B | passes | ms | images/s |")?;
            writeln!(f, "|---|---|---|---|")?;
            for r in &self.decode {
                let passes: Vec<String> = r.passes.iter().map(usize::to_string).collect();
                writeln!(
                    f,
                    "| {} | {} | {:.1} | {:.1} |",
                    r.images,
                    passes.join("+"),
                    r.ms_median,
                    r.images_per_sec
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_with_no_value_skip_the_steps_and_the_model() -> anyhow::Result<()> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            model: ModelArgs,
        }
        let a =
            <Cli as clap::Parser>::try_parse_from(["bench", "--batches", "--vae-batches"])?.model;
        assert!(a.batches.is_empty() && a.vae_batches.is_empty());
        let a = <Cli as clap::Parser>::try_parse_from(["bench", "--batches", "2,8"])?.model;
        assert_eq!(a.batches, [2, 8]);
        assert_eq!(a.vae_batches, [1, 8], "the default decode batches");
        // Nothing to time: no ImageNet model (561 M parameters) or decoder is built, so this
        // returns at once even on the CPU.
        let report = run(&ModelBench {
            latent: 32,
            device: Device::Cpu,
            dtype: DType::F32,
            batches: vec![],
            vae_batches: vec![],
            decode_chunk: 8,
            warmup: 1,
            iters: 1,
            kernels: KernelOptions::default(),
        })?;
        assert!(report.steps.is_empty() && report.decode.is_empty());
        assert!((report.gflop_per_image_forward - 237.0).abs() < 0.5);
        Ok(())
    }

    #[test]
    fn flop_count_matches_the_release() {
        // FlopCounterMode on the released code: 237,014,581,248 per image at 256.
        let f = forward_flop(&DiffitConfig::imagenet(32));
        assert!((f - 237_014_581_248.0).abs() / f < 1e-3, "{f}");
    }
}
