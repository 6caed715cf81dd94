//! A load generator for the HTTP API: bounded in requests and time, and refusing any target
//! but the loopback interface. Used by `diffit-server load` and `diffit-server bench batching`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use serde_json::{json, Value};

use crate::bench::stats::percentile;

#[derive(Debug, Clone)]
pub enum Workload {
    /// Every request sends this body.
    Fixed(Value),
    /// Seeded mix of step counts (10–100), samplers, guidance and classes.
    Mixed { num_classes: usize },
}

#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub url: String,
    pub requests: usize,
    /// Closed loop: at most this many requests in flight.
    pub concurrency: usize,
    /// Open loop: Poisson arrivals at this rate (requests/s), still capped by `concurrency`.
    pub rate: Option<f64>,
    pub max_duration: Duration,
    pub workload: Workload,
    pub api_key: Option<String>,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Requests sent (fewer than planned when the time bound stopped the run).
    pub requests: usize,
    pub planned: usize,
    /// Why sending stopped before every planned request went out, or requests were cut off.
    pub stopped_early: Option<String>,
    pub ok: usize,
    pub by_status: BTreeMap<u16, usize>,
    pub transport_errors: usize,
    pub images: usize,
    pub wall_secs: f64,
    pub requests_per_sec: f64,
    pub images_per_sec: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({} ok, statuses {:?}, {} transport errors) in {:.1} s: {:.2} req/s, {:.2} images/s; \
             latency p50 {:.0} ms, p95 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.requests,
            self.ok,
            self.by_status,
            self.transport_errors,
            self.wall_secs,
            self.requests_per_sec,
            self.images_per_sec,
            self.p50_ms,
            self.p95_ms,
            self.p99_ms,
            self.max_ms
        )?;
        if let Some(why) = &self.stopped_early {
            write!(f, "\nstopped early: {why}")?;
        }
        Ok(())
    }
}

/// Only loopback targets: this tool must never load anything but the machine it runs on.
pub fn check_loopback(url: &str) -> anyhow::Result<()> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// loopback URLs are allowed, got '{url}'"))?;
    let authority = rest.split('/').next().unwrap_or("");
    let host = if let Some(h) = authority.strip_prefix('[') {
        h.split(']').next().unwrap_or("")
    } else {
        authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(authority)
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    anyhow::ensure!(
        loopback,
        "refusing to load '{host}': only loopback targets (127.0.0.0/8, ::1, localhost)"
    );
    Ok(())
}

fn body_for(workload: &Workload, rng: &mut ChaCha8Rng) -> Value {
    match workload {
        Workload::Fixed(v) => v.clone(),
        Workload::Mixed { num_classes } => {
            const STEPS: [u32; 4] = [10, 20, 50, 100];
            const SAMPLERS: [&str; 3] = ["ddpm", "ddim", "dpm-solver++"];
            json!({
                "class_label": rng.gen_range(0..*num_classes),
                "steps": STEPS[rng.gen_range(0..STEPS.len())],
                "sampler": SAMPLERS[rng.gen_range(0..SAMPLERS.len())],
                "guidance_scale": if rng.gen_bool(0.5) { 1.0 } else { 4.0 },
                "seed": rng.gen::<u32>(),
            })
        }
    }
}

/// Sends the workload to `POST {url}/generate` and measures each request end to end.
pub async fn run(cfg: &LoadConfig) -> anyhow::Result<LoadReport> {
    check_loopback(&cfg.url)?;
    anyhow::ensure!(
        cfg.requests > 0 && cfg.requests <= 1_000_000,
        "requests must be 1..=1000000"
    );
    let client = reqwest::Client::builder()
        .timeout(cfg.max_duration)
        .build()?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(cfg.concurrency.max(1)));
    let start = Instant::now();
    let stop_at = start + cfg.max_duration;
    let mut tasks = Vec::with_capacity(cfg.requests);
    let mut next_arrival = start;
    for _ in 0..cfg.requests {
        if let Some(rate) = cfg.rate {
            let gap: f64 = -(1.0 - rng.gen::<f64>()).ln() / rate;
            next_arrival += Duration::from_secs_f64(gap);
            tokio::time::sleep_until(next_arrival.into()).await;
        }
        // Checked after waiting for a slot too: no request starts past the time limit.
        let permit = sem.clone().acquire_owned().await?;
        if Instant::now() >= stop_at {
            break;
        }
        let mut req = client
            .post(format!("{}/generate", cfg.url))
            .json(&body_for(&cfg.workload, &mut rng));
        if let Some(k) = &cfg.api_key {
            req = req.bearer_auth(k);
        }
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let result = match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let images = match r.json::<Value>().await {
                        Ok(v) => v["images"].as_array().map(|a| a.len()).unwrap_or(0),
                        Err(_) => 0,
                    };
                    Some((status, images))
                }
                Err(_) => None,
            };
            drop(permit);
            (t0.elapsed(), result)
        }));
    }
    let mut latencies = Vec::new();
    let mut by_status = BTreeMap::new();
    let (mut ok, mut images, mut transport_errors) = (0, 0, 0);
    let sent = tasks.len();
    for t in tasks {
        let (elapsed, result) = t.await?;
        match result {
            Some((status, n)) => {
                *by_status.entry(status).or_insert(0) += 1;
                if status == 200 {
                    ok += 1;
                    images += n;
                    latencies.push(elapsed.as_secs_f64() * 1e3);
                }
            }
            None => transport_errors += 1,
        }
    }
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    let limit = format!(
        "the time limit of {:.0} s (--max-secs)",
        cfg.max_duration.as_secs_f64()
    );
    let stopped_early = if sent < cfg.requests {
        Some(format!(
            "{sent} of {} requests sent before {limit}",
            cfg.requests
        ))
    } else if transport_errors > 0 && Instant::now() >= stop_at {
        Some(format!(
            "{transport_errors} request(s) were still running at {limit} and were cut off"
        ))
    } else {
        None
    };
    Ok(LoadReport {
        requests: sent,
        planned: cfg.requests,
        stopped_early,
        ok,
        by_status,
        transport_errors,
        images,
        wall_secs: wall,
        requests_per_sec: ok as f64 / wall,
        images_per_sec: images as f64 / wall,
        p50_ms: percentile(&latencies, 50.0),
        p95_ms: percentile(&latencies, 95.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:80/x",
            "http://127.1.2.3",
        ] {
            assert!(check_loopback(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:80",
            "http://example.com",
            "https://127.0.0.1",
            "http://192.168.1.1:8080",
        ] {
            assert!(check_loopback(bad).is_err(), "{bad}");
        }
    }
}
