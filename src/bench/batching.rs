//! `bench batching`: step-level continuous batching against request-level batching on one
//! mixed workload (Poisson arrivals, mixed steps, samplers and guidance), each through a real
//! `serve` child process on a loopback port, so the comparison includes HTTP and the queue.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::config::{resolve_model_paths, DeviceSpec, Precision};
use crate::loadgen::{self, LoadConfig, Workload};

#[derive(Debug, Args)]
pub struct BatchingArgs {
    /// DiffiT model (default: the embedded model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub vae: Option<PathBuf>,
    #[arg(long, default_value_t = 120)]
    pub requests: usize,
    /// Poisson arrival rate, requests/s.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 16)]
    pub max_batch: u32,
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also write both reports as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// A `serve` child process on a free loopback port, killed on drop.
struct ChildServer {
    child: std::process::Child,
    url: String,
}

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
        Ok(Self { child, url })
    }

    /// Waits for readiness (at most a minute), then asks how many classes the model has.
    async fn ready_classes(&self) -> anyhow::Result<usize> {
        let client = reqwest::Client::new();
        for _ in 0..600 {
            if let Ok(r) = client.get(format!("{}/readyz", self.url)).send().await {
                if r.status() == 200 {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let v: serde_json::Value = client
            .get(format!("{}/v1/classes", self.url))
            .send()
            .await?
            .json()
            .await?;
        Ok(v["num_classes"].as_u64().unwrap_or(10) as usize)
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn run(a: BatchingArgs) -> anyhow::Result<()> {
    let (model, vae) = resolve_model_paths(a.model.clone(), a.vae.clone())?;
    let rt = crate::cli::tokio_runtime()?;
    let mut rows = Vec::new();
    for (name, request_level) in [("continuous (step-level)", false), ("request-level", true)] {
        let mut args: Vec<String> = vec![
            "--model".into(),
            model.display().to_string(),
            "--vae".into(),
            vae.display().to_string(),
            "--device".into(),
            a.device.to_string(),
            "--dtype".into(),
            a.dtype.to_string(),
            "--max-batch".into(),
            a.max_batch.to_string(),
            "--max-queue".into(),
            "100000".into(),
        ];
        if request_level {
            args.push("--request-level-batching".into());
        }
        let server = ChildServer::start(&args)?;
        let classes = rt.block_on(server.ready_classes())?;
        let cfg = LoadConfig {
            url: server.url.clone(),
            requests: a.requests,
            concurrency: 100_000,
            rate: Some(a.rate),
            max_duration: Duration::from_secs(1800),
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
        super::write_json(p, &v)?;
    }
    Ok(())
}
