//! `load`: a bounded load test of a server on this machine (`crate::loadgen`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::loadgen::{self, LoadConfig, Workload};

#[derive(Debug, Args)]
pub struct LoadArgs {
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
    #[arg(long, env = "DIFFIT_LOAD_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

pub fn run(a: LoadArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.max_secs.is_finite() && a.max_secs > 0.0 && a.max_secs <= 86_400.0,
        "--max-secs must be a number of seconds in (0, 86400], got {}",
        a.max_secs
    );
    if let Some(rate) = a.rate {
        anyhow::ensure!(
            rate.is_finite() && rate > 0.0,
            "--rate must be a positive number of requests per second, got {rate}"
        );
    }
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
        max_duration: Duration::from_secs_f64(a.max_secs),
        workload,
        api_key: a.api_key.clone(),
        seed: a.seed,
    };
    let report = super::tokio_runtime()?.block_on(loadgen::run(&cfg))?;
    println!("{report}");
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    Ok(())
}
