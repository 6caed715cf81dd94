//! `forward`: the network on tensors from a file, for parity checks against the reference.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use clap::Args;

use super::{read_tensors, take};
use crate::config::RuntimeArgs;
use crate::diffusion::guidance::guide_doubled_batch;
use crate::diffusion::{Guidance, GuidanceSchedule};
use crate::model::{DiffiT, WeightsFile};

#[derive(Debug, Args)]
pub struct ForwardArgs {
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

pub fn run(a: ForwardArgs) -> anyhow::Result<()> {
    let (device, dtype) = a.runtime.open()?;
    let model = DiffiT::load(
        &WeightsFile::open(&a.model)?,
        dtype,
        &device,
        &a.runtime.kernels(),
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
