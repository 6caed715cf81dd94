//! `decode`: the VAE on latents from a file, for parity checks against the reference.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clap::Args;

use super::{read_tensors, take};
use crate::config::{resolve_vae_path, RuntimeArgs};
use crate::model::{vae, VaeDecoder, WeightsFile};

#[derive(Debug, Args)]
pub struct DecodeArgs {
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

pub fn run(a: DecodeArgs) -> anyhow::Result<()> {
    let (device, dtype) = a.runtime.open()?;
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
