//! `diffit-server bench model`: the network's guided step time, images/s and VAE decode speed on
//! random weights of the released shapes (speed does not depend on the values).

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::diffusion::{
    denoise_step, Guidance, GuidanceSchedule, SampleState, SamplerKind, Schedule, SeededNoise,
};
use crate::config::KernelOptions;
use crate::model::{DiffiT, DiffitConfig, VaeConfig, VaeDecoder};

#[derive(Debug, Clone)]
pub struct ModelBench {
    /// 32 for ImageNet-256, 64 for -512.
    pub latent: usize,
    pub device: Device,
    pub dtype: DType,
    pub batches: Vec<usize>,
    pub vae_batches: Vec<usize>,
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    let t0 = Instant::now();
    let model = DiffiT::random(cfg.clone(), b.dtype, &b.device, &b.kernels)?;
    b.device.synchronize()?;
    eprintln!(
        "random ImageNet-{} DiffiT built in {:.1?}",
        b.latent * 8,
        t0.elapsed()
    );
    let flop = forward_flop(&cfg);
    let schedule = Arc::new(Schedule::new(250)?);
    let guidance = Guidance::new(4.4, GuidanceSchedule::PowerCosine)?;
    let mut steps = Vec::new();
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
            denoise_step(&model, &mut refs)?;
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
        eprintln!("{row:?}");
        steps.push(row);
    }
    drop(model);
    let mut decode = Vec::new();
    if !b.vae_batches.is_empty() {
        let vae = VaeDecoder::random(VaeConfig::sd_kl_f8(), b.dtype, &b.device, &b.kernels)?;
        for &n in &b.vae_batches {
            let z = Tensor::randn(0f32, 1.0, (n, 4, b.latent, b.latent), &b.device)?;
            let mut times = Vec::new();
            for it in 0..b.warmup.max(1) + b.iters.min(5) {
                let start = Instant::now();
                let out = vae.decode(&z)?;
                b.device.synchronize()?;
                drop(out);
                if it >= b.warmup.max(1) {
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
            let med = median(times);
            let row = DecodeRow {
                images: n,
                ms_median: med,
                images_per_sec: n as f64 / (med * 1e-3),
            };
            eprintln!("{row:?}");
            decode.push(row);
        }
    }
    Ok(ModelBenchReport {
        latent: b.latent,
        dtype: format!("{:?}", b.dtype).to_lowercase(),
        device: crate::pipeline::device_name(&b.device),
        gflop_per_image_forward: flop / 1e9,
        steps,
        decode,
    })
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
            writeln!(f, "| VAE decode B | ms | images/s |")?;
            writeln!(f, "|---|---|---|")?;
            for r in &self.decode {
                writeln!(
                    f,
                    "| {} | {:.1} | {:.1} |",
                    r.images, r.ms_median, r.images_per_sec
                )?;
            }
        }
        Ok(())
    }
}

/// Times one candle op formulation at the shapes of an ImageNet-256 guided step at B = 64
/// (2B = 128 network rows), to find where the step's time goes and which rewrite is cheaper.
pub fn op_micro(device: &Device, dtype: DType, iters: usize) -> anyhow::Result<Vec<(String, f64)>> {
    let rows = 128usize;
    let (h, n, d, m) = (16usize, 256usize, 1152usize, 4608usize);
    let t = rows * n;
    let rnd = |shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)
    };
    let scores = rnd(&[rows, h, n, n])?;
    let attn_bias = rnd(&[1, h, n, n])?;
    let attn_bias_full = attn_bias.broadcast_as((rows, h, n, n))?.contiguous()?;
    let y4 = rnd(&[t, m])?;
    let b4 = rnd(&[m])?;
    let b4_full = b4.broadcast_as((t, m))?.contiguous()?;
    let qkv = rnd(&[rows, n, 3 * d])?;
    let sample_bias = rnd(&[rows, 1, 3 * d])?;
    let x = rnd(&[t, d])?;
    let w1 = rnd(&[m, d])?;
    let ones = rnd(&[d])?;
    let zeros = rnd(&[d])?;
    let ctx = rnd(&[rows, h, n, d / h])?;
    let mut out = Vec::new();
    let mut time =
        |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<()> {
            f()?;
            device.synchronize()?;
            let mut v = Vec::new();
            for _ in 0..iters {
                let s = Instant::now();
                let r = f()?;
                device.synchronize()?;
                v.push(s.elapsed().as_secs_f64() * 1e3);
                drop(r);
            }
            let ms = median(v);
            eprintln!("{name}: {ms:.3} ms");
            out.push((name.to_string(), ms));
            Ok(())
        };
    time(
        "attn bias: broadcast_add [128,16,256,256]+[1,16,256,256]",
        &|| scores.broadcast_add(&attn_bias),
    )?;
    time("attn bias: add pre-expanded contiguous", &|| {
        scores.add(&attn_bias_full)
    })?;
    time("attn bias: broadcast_as+contiguous (materialise)", &|| {
        attn_bias.broadcast_as((rows, h, n, n))?.contiguous()
    })?;
    time("attn scale: scores * 0.118", &|| scores.affine(0.118, 0.0))?;
    time("softmax_last_dim [128,16,256,256]", &|| {
        candle_nn::ops::softmax_last_dim(&scores)
    })?;
    time("fc1 bias: broadcast_add [32768,4608]+[4608]", &|| {
        y4.broadcast_add(&b4)
    })?;
    time("fc1 bias: add pre-expanded contiguous", &|| {
        y4.add(&b4_full)
    })?;
    time("gelu (tanh) [32768,4608]", &|| y4.gelu())?;
    time(
        "qkv sample bias: broadcast_add [128,256,3456]+[128,1,3456]",
        &|| qkv.broadcast_add(&sample_bias),
    )?;
    time("layer_norm [32768,1152]", &|| {
        candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6)
    })?;
    time("matmul fc1 [32768,1152]x[1152,4608]ᵀ", &|| {
        x.matmul(&w1.t()?)
    })?;
    time("residual add [32768,1152]", &|| x.add(&x))?;
    time(
        "merge heads: transpose + contiguous [128,16,256,72]",
        &|| ctx.transpose(1, 2)?.contiguous(),
    )?;
    // The fused kernels that replace the passes above (crate::kernels).
    use crate::kernels::{self, Activation};
    let attn_bias_rows = attn_bias.reshape((h * n, n))?;
    let sample_bias2 = sample_bias.squeeze(1)?;
    let b1 = rnd(&[d])?.unsqueeze(0)?;
    let b4_row = b4.unsqueeze(0)?;
    time("fused: scale + bias + softmax [128,16,256,256]", &|| {
        kernels::softmax_bias(&scores, &attn_bias_rows, 0.118)
    })?;
    time("fused: bias + GELU [32768,4608]", &|| {
        kernels::bias_act(&y4, &b4_row, t, Activation::GeluTanh, None)
    })?;
    time("fused: bias + residual [32768,1152]", &|| {
        kernels::bias_act(&x, &b1, t, Activation::Identity, Some(&x))
    })?;
    time(
        "fused: per-sample qkv bias + head split [128,256,3456]",
        &|| kernels::split_qkv(&qkv, &sample_bias2, h),
    )?;
    time("fused: merge heads [128,16,256,72]", &|| {
        kernels::merge_heads(&ctx)
    })?;
    time(
        "fused: attention from qkv (flash) [128,256,3456] -> [128,256,1152]",
        &|| kernels::attention(&qkv, &sample_bias2, &attn_bias_rows, h, 0.118, true),
    )?;
    time(
        "same, unfused: split + QK^T + softmax + AV + merge",
        &|| {
            let split = kernels::split_qkv(&qkv, &sample_bias2, h)?;
            let (q, k, v) = (split.get(0)?, split.get(1)?, split.get(2)?);
            let p = kernels::softmax_bias(&q.matmul(&k.t()?)?, &attn_bias_rows, 0.118)?;
            kernels::merge_heads(&p.matmul(&v)?)
        },
    )?;
    time("fused: layer_norm [32768,1152]", &|| {
        kernels::layer_norm(&x, 1e-6)
    })?;
    // A whole fused block as the model runs it, four in a row (one sync per four): against the
    // sum of its ops timed one by one, this shows what running back to back costs or saves.
    let x3 = x.reshape((rows, n, d))?;
    let (w_qkv, w_proj, w2) = (rnd(&[3 * d, d])?, rnd(&[d, d])?, rnd(&[d, m])?);
    let (b_proj, b2) = (rnd(&[d])?, rnd(&[d])?);
    let block = |hin: &Tensor| -> candle_core::Result<Tensor> {
        let qkv = kernels::layer_norm(hin, 1e-6)?
            .reshape((t, d))?
            .matmul(&w_qkv.t()?)?
            .reshape((rows, n, 3 * d))?;
        let ctx = kernels::attention(&qkv, &sample_bias2, &attn_bias_rows, h, 0.118, true)?;
        let h1 = kernels::linear_bias_residual(&ctx, &w_proj, &b_proj, hin, true)?;
        let hidden = kernels::linear_bias_act(
            &kernels::layer_norm(&h1, 1e-6)?,
            &w1,
            &b4,
            Activation::GeluTanh,
            true,
        )?;
        kernels::linear_bias_residual(&hidden, &w2, &b2, &h1, true)
    };
    time(
        "fused block x4 [128,256,1152] (per block: divide by 4)",
        &|| {
            let mut hcur = x3.clone();
            for _ in 0..4 {
                hcur = block(&hcur)?;
            }
            Ok(hcur)
        },
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flop_count_matches_the_release() {
        // FlopCounterMode on the released code: 237,014,581,248 per image at 256.
        let f = forward_flop(&DiffitConfig::imagenet(32));
        assert!((f - 237_014_581_248.0).abs() / f < 1e-3, "{f}");
    }
}
