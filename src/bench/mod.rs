//! `diffit-server bench …`: one file per bench, the statistics they share in `stats`. Speed
//! targets live here (and in docs/perf.md), never in timed unit tests.

pub mod batching;
pub mod encode;
pub mod kernels;
pub mod model;
pub mod ops;
pub mod serve;
pub mod stats;

use std::path::Path;

use anyhow::Context;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Step-level continuous batching against request-level batching on one mixed workload.
    Batching(batching::BatchingArgs),
    /// Guided step time, images/s and VAE decode on random weights of the released shapes.
    Model(model::ModelArgs),
    /// Serving images/s under concurrent load: engine only, engine + PNG, and HTTP end to end.
    Serve(serve::ServeBenchArgs),
    /// Writing one image: ms and size per output format and PNG deflate effort.
    Encode(encode::EncodeArgs),
    /// Every fused kernel against its unfused candle version on random inputs (fails if any
    /// differs by more than the tolerance of its dtype).
    Kernels(kernels::KernelsArgs),
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Batching(a) => batching::run(a),
        BenchCommand::Model(a) => model::cli(a),
        BenchCommand::Serve(a) => serve::cli(a),
        BenchCommand::Kernels(a) => kernels::run(a),
        BenchCommand::Encode(a) => encode::run(a),
    }
}

/// Writes a report as pretty JSON (the `--json` option of every bench).
fn write_json(path: &Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(report)?)
        .with_context(|| format!("cannot write {}", path.display()))
}
