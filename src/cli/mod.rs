//! The command line: one file per subcommand behind this dispatcher. `serve` is the server
//! itself (`crate::server`), the benches live in `crate::bench`.

mod decode;
mod forward;
mod generate;
mod load;

use std::collections::HashMap;
use std::path::Path;

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::{Parser, Subcommand};

use crate::bench::BenchCommand;
use crate::config::{LogFormat, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "diffit-server",
    version,
    about = "Serve and run class-conditional latent DiffiT"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (the embedded default model when no model is given).
    Serve(ServeArgs),
    /// Generate images from the command line.
    Generate(generate::GenerateArgs),
    /// Run the network on tensors x, t, y from a safetensors file and write `out`.
    Forward(forward::ForwardArgs),
    /// Decode latents `z` with the VAE; writes `decoded` (f32) and `pixels_u8`.
    Decode(decode::DecodeArgs),
    /// Load-test a running server on this machine (loopback only; bounded in requests and time).
    Load(load::LoadArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(BenchCommand),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    // `serve` sets up its own logging (text or JSON, from its settings).
    if !matches!(cli.command, Command::Serve(_)) {
        crate::telemetry::init_logging(LogFormat::Text);
    }
    match cli.command {
        Command::Serve(a) => crate::server::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Forward(a) => forward::run(a),
        Command::Decode(a) => decode::run(a),
        Command::Load(a) => load::run(a),
        Command::Bench(b) => crate::bench::run(b),
    }
}

/// A multi-threaded runtime for the commands that talk HTTP.
pub fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Every tensor of a safetensors file, on the CPU.
fn read_tensors(path: &Path) -> anyhow::Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read tensors from {}", path.display()))
}

fn take<'a>(
    map: &'a HashMap<String, Tensor>,
    name: &str,
    path: &Path,
) -> anyhow::Result<&'a Tensor> {
    map.get(name)
        .with_context(|| format!("{}: no tensor '{name}'", path.display()))
}
