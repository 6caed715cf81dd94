//! `diffit-server bench serve`: images/s of the serving stack under concurrent load, measured
//! three ways on the same engines and the same workload, so the cost of each layer shows:
//!
//! 1. `engine`: jobs submitted straight to the engine handle; done when the pixels are decoded;
//! 2. `engine+png`: the same, plus PNG encoding on the blocking pool (as the API does it);
//! 3. `http`: `POST /generate` over loopback to an in-process server on those engines, from
//!    `--concurrency` clients (JSON, base64 PNGs; client and server share the process).
//!
//! Each pass is a closed loop of `--concurrency` requests in flight; every pass is bounded by
//! `--max-secs`.
//!
//! With a second model (`--second-model` or `--second-resolution`) both models are served at
//! once, each with its own engines, and a fourth pass, `mixed`, sends the two models' requests
//! interleaved over HTTP: images/s and p50/p99 per model under the mixed workload.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use serde_json::{json, Value};

use super::stats::percentile;
use crate::api::{self, AppState};
use crate::config::{open_devices, DeviceSpec, KernelOptions, Precision};
use crate::diffusion::{Guidance, SamplerKind};
use crate::encode::EncodeOptions;
use crate::engine::{self, EngineConfig, EngineHandle, Job, JobEvent, SubmitError};
use crate::pipeline::{ImageSpec, LoadOptions, Pipeline};
use crate::png::PngCompression;

#[derive(Debug, Clone, Args)]
pub struct ServeBenchArgs {
    /// DiffiT checkpoint; random weights of the ImageNet shapes (--resolution) when left out.
    #[arg(long, requires = "vae")]
    pub model: Option<PathBuf>,
    /// VAE for --model.
    #[arg(long, requires = "model")]
    pub vae: Option<PathBuf>,
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// Random-weight model size without --model: 256 or 512 (the ImageNet checkpoint shapes).
    #[arg(long, default_value_t = 256)]
    pub resolution: usize,
    /// A second model served beside the first (its own engines), for the `mixed` pass.
    #[arg(long, requires = "second_vae", conflicts_with = "second_resolution")]
    pub second_model: Option<PathBuf>,
    /// VAE for --second-model.
    #[arg(long, requires = "second_model")]
    pub second_vae: Option<PathBuf>,
    /// A second model of random weights, 256 or 512, for the `mixed` pass.
    #[arg(long)]
    pub second_resolution: Option<usize>,
    /// auto | cpu | cuda:N
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// One engine per device, sharing one queue (cuda:0,cuda:1 | 0,1 | cpu,cpu); overrides --device.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<DeviceSpec>,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Precision,
    #[command(flatten)]
    pub kernels: KernelOptions,
    /// Denoising steps per image.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// PNG deflate effort in the engine+png and http passes (as `serve --png-compression`).
    #[arg(long, value_enum, default_value = "fast")]
    pub png_compression: PngCompression,
    /// Images per pass.
    #[arg(long, default_value_t = 64)]
    pub images: usize,
    /// Images per request.
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Most images one engine denoises together.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// ddpm | ddim | dpm-solver++ (default: the model's).
    #[arg(long)]
    pub sampler: Option<SamplerKind>,
    /// Guidance scale (default: the model's; 1 = unguided, one network row per image).
    #[arg(long)]
    pub guidance_scale: Option<f32>,
    /// Most latents the VAE decodes at once.
    #[arg(long, default_value_t = crate::model::vae::DEFAULT_DECODE_CHUNK)]
    pub decode_chunk: usize,
    /// Longest any one pass may take.
    #[arg(long, default_value_t = 900.0)]
    pub max_secs: f64,
    /// Also write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PathRow {
    /// `engine`, `engine+png` or `http`.
    pub path: String,
    pub requests: usize,
    pub images: usize,
    pub wall_secs: f64,
    pub images_per_sec: f64,
    /// images/s over the `engine` row's.
    pub relative_to_engine: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// One model's share of the `mixed` pass.
#[derive(Debug, Clone, Serialize)]
pub struct MixedRow {
    pub model: String,
    pub requests: usize,
    pub images: usize,
    pub images_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServeBenchReport {
    pub model: String,
    pub dtype: String,
    pub devices: Vec<String>,
    pub image_size: usize,
    pub steps: usize,
    pub sampler: String,
    pub guidance_scale: f32,
    pub images: usize,
    pub images_per_request: usize,
    pub concurrency: usize,
    pub max_batch: usize,
    pub rows: Vec<PathRow>,
    /// 1 − http / engine images/s, in percent: what HTTP, JSON, base64 and PNG cost.
    pub http_overhead_pct: f64,
    /// Both models' requests interleaved over HTTP (only with a second model).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mixed: Vec<MixedRow>,
    /// Wall time of the mixed pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixed_wall_secs: Option<f64>,
}

impl std::fmt::Display for ServeBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} ({} px, {}) on {}: {} images, {} per request, {} in flight, {} steps {}, guidance {}, max batch {}",
            self.model,
            self.image_size,
            self.dtype,
            self.devices.join(","),
            self.images,
            self.images_per_request,
            self.concurrency,
            self.steps,
            self.sampler,
            self.guidance_scale,
            self.max_batch
        )?;
        writeln!(
            f,
            "| path | requests | images | wall s | images/s | vs engine | p50 ms | p99 ms |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {} | {:.2} | {:.3} | {:.3} | {:.0} | {:.0} |",
                r.path,
                r.requests,
                r.images,
                r.wall_secs,
                r.images_per_sec,
                r.relative_to_engine,
                r.p50_ms,
                r.p99_ms
            )?;
        }
        writeln!(
            f,
            "HTTP end to end runs at {:.1} % of engine-only throughput (overhead {:.1} %)",
            100.0 - self.http_overhead_pct,
            self.http_overhead_pct
        )?;
        if let Some(wall) = self.mixed_wall_secs {
            writeln!(
                f,
                "mixed: both models' requests interleaved over HTTP, {} in flight, {wall:.2} s",
                self.concurrency
            )?;
            writeln!(
                f,
                "| model | requests | images | images/s | p50 ms | p99 ms |"
            )?;
            writeln!(f, "|---|---|---|---|---|---|")?;
            for r in &self.mixed {
                writeln!(
                    f,
                    "| {} | {} | {} | {:.3} | {:.0} | {:.0} |",
                    r.model, r.requests, r.images, r.images_per_sec, r.p50_ms, r.p99_ms
                )?;
            }
        }
        Ok(())
    }
}

impl ServeBenchArgs {
    fn check(&self) -> anyhow::Result<()> {
        let within = |name: &str, v: usize, lo: usize, hi: usize| {
            anyhow::ensure!(
                (lo..=hi).contains(&v),
                "--{name} must be between {lo} and {hi}, got {v}"
            );
            Ok(())
        };
        within("images", self.images, 1, 1_000_000)?;
        within("n", self.n, 1, 1024)?;
        within("concurrency", self.concurrency, 1, 4096)?;
        within("max-batch", self.max_batch, 1, 4096)?;
        within("steps", self.steps, 2, 1000)?;
        within("decode-chunk", self.decode_chunk, 1, 4096)?;
        anyhow::ensure!(
            self.max_secs.is_finite() && self.max_secs > 0.0,
            "--max-secs must be positive"
        );
        anyhow::ensure!(
            self.model.is_some() || matches!(self.resolution, 256 | 512),
            "--resolution must be 256 or 512"
        );
        anyhow::ensure!(
            self.second_resolution
                .is_none_or(|r| matches!(r, 256 | 512)),
            "--second-resolution must be 256 or 512"
        );
        Ok(())
    }

    fn device_specs(&self) -> Vec<DeviceSpec> {
        if self.devices.is_empty() {
            vec![self.device]
        } else {
            self.devices.clone()
        }
    }
}

/// One request of the workload: its body over HTTP and its specs for the engine.
struct Request {
    body: Value,
    specs: Vec<ImageSpec>,
}

fn workload(a: &ServeBenchArgs, handle: &EngineHandle) -> anyhow::Result<Vec<Request>> {
    workload_for(a, handle, a.images)
}

/// `images` images of `handle`'s model in requests of `--n`, each body naming the model.
fn workload_for(
    a: &ServeBenchArgs,
    handle: &EngineHandle,
    images: usize,
) -> anyhow::Result<Vec<Request>> {
    let info = handle.info();
    let d = info.defaults;
    let sampler = a.sampler.unwrap_or(d.sampler);
    let guidance = Guidance::new(
        a.guidance_scale.unwrap_or(d.guidance_scale),
        d.guidance_schedule,
    )?;
    let requests = images.div_ceil(a.n);
    Ok((0..requests)
        .map(|r| {
            let n = a.n.min(images - r * a.n);
            let label = r % info.config.num_classes;
            let seed = (r * a.n) as u64;
            let specs = (0..n as u64)
                .map(|i| ImageSpec {
                    label,
                    seed: seed + i,
                    steps: a.steps,
                    sampler,
                    guidance,
                })
                .collect();
            let body = json!({
                "model": info.name,
                "class_label": label, "seed": seed, "n": n, "steps": a.steps,
                "sampler": sampler.to_string(), "guidance_scale": guidance.scale(),
                "guidance_schedule": guidance.schedule().to_string(),
            });
            Request { body, specs }
        })
        .collect())
}

/// Runs `requests` calls of `one` with at most `concurrency` in flight; each returns the images
/// it got. Latencies of the successful ones, images, and the wall time.
async fn closed_loop<F, Fut>(
    requests: usize,
    concurrency: usize,
    one: F,
) -> anyhow::Result<(Vec<f64>, usize, f64)>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = anyhow::Result<usize>> + Send + 'static,
{
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(requests);
    for r in 0..requests {
        let permit = sem.clone().acquire_owned().await?;
        let fut = one(r);
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let result = fut.await;
            drop(permit);
            result.map(|images| (t0.elapsed().as_secs_f64() * 1e3, images))
        }));
    }
    let mut latencies = Vec::with_capacity(requests);
    let mut images = 0;
    for t in tasks {
        let (ms, n) = t.await.context("a request task failed")??;
        latencies.push(ms);
        images += n;
    }
    let wall = start.elapsed().as_secs_f64();
    latencies.sort_by(|a, b| a.total_cmp(b));
    Ok((latencies, images, wall))
}

/// Submits one job to the engines (waiting while the queue is full) and waits for its images,
/// PNG-encoding them if asked.
async fn engine_request(
    handle: EngineHandle,
    specs: Vec<ImageSpec>,
    deadline: Instant,
    encode: Option<PngCompression>,
) -> anyhow::Result<usize> {
    let mut rx = loop {
        let (job, rx) = Job::new("bench".into(), specs.clone(), deadline, false);
        match handle.submit(job) {
            Ok(()) => break rx,
            Err(SubmitError::QueueFull { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut images = 0;
    while images < specs.len() {
        match rx.recv().await {
            Some(JobEvent::Image { index, pixels, .. }) => {
                if let Some(png) = encode {
                    let info = handle.info().clone();
                    let spec = *specs.get(index).context("image index out of range")?;
                    let options = EncodeOptions {
                        png,
                        ..Default::default()
                    };
                    tokio::task::spawn_blocking(move || info.encode_as(&pixels, &spec, options))
                        .await
                        .context("the PNG encoder task failed")??;
                }
                images += 1;
            }
            Some(JobEvent::Failed(e)) => return Err(e.into()),
            Some(_) => {}
            None => anyhow::bail!("the engines stopped before the job finished"),
        }
    }
    Ok(images)
}

async fn http_request(
    client: reqwest::Client,
    url: String,
    body: Value,
    expected: usize,
) -> anyhow::Result<usize> {
    let r = client
        .post(url)
        .json(&body)
        .send()
        .await
        .context("POST /generate")?;
    let status = r.status();
    let v: Value = r.json().await.context("reading the response")?;
    anyhow::ensure!(status == 200, "POST /generate answered {status}: {v}");
    let images = v["images"].as_array().map(Vec::len).unwrap_or(0);
    anyhow::ensure!(
        images == expected,
        "asked for {expected} images, got {images}"
    );
    Ok(images)
}

fn row(path: &str, requests: usize, (lat, images, wall): (Vec<f64>, usize, f64)) -> PathRow {
    PathRow {
        path: path.into(),
        requests,
        images,
        wall_secs: wall,
        images_per_sec: images as f64 / wall.max(1e-9),
        relative_to_engine: 1.0,
        p50_ms: percentile(&lat, 50.0),
        p99_ms: percentile(&lat, 99.0),
        max_ms: lat.last().copied().unwrap_or(0.0),
    }
}

/// The first model's pipelines, and the second model's if one is asked for (renamed if both
/// would share a name).
fn load_models(a: &ServeBenchArgs) -> anyhow::Result<Vec<Vec<Pipeline>>> {
    let first = load_pipelines(a, a.model.as_ref().zip(a.vae.as_ref()), a.resolution)?;
    let second = match (&a.second_model, &a.second_vae, a.second_resolution) {
        (Some(m), Some(v), _) => Some(load_pipelines(a, Some((m, v)), a.resolution)?),
        (_, _, Some(r)) => Some(load_pipelines(a, None, r)?),
        _ => None,
    };
    let mut models = vec![first];
    if let Some(mut second) = second {
        if second[0].info.name == models[0][0].info.name {
            for p in &mut second {
                p.info.name.push_str("-2");
            }
        }
        models.push(second);
    }
    Ok(models)
}

fn load_pipelines(
    a: &ServeBenchArgs,
    files: Option<(&PathBuf, &PathBuf)>,
    resolution: usize,
) -> anyhow::Result<Vec<Pipeline>> {
    let devices = open_devices(&a.device_specs())?;
    let dtype = a.dtype.into();
    match files {
        Some((model, vae)) => Pipeline::load_on_each(
            &LoadOptions {
                model: model.clone(),
                vae: vae.clone(),
                vae_config: a.vae_config.clone(),
                device: devices[0].clone(),
                dtype,
                decode_chunk: a.decode_chunk,
                kernels: a.kernels.with_precision(a.dtype),
            },
            &devices,
        ),
        None => Pipeline::build_on_each(&devices, |device| {
            Pipeline::random(
                resolution / 8,
                dtype,
                device,
                a.decode_chunk,
                &a.kernels.with_precision(a.dtype),
            )
        }),
    }
}

/// A metrics handle for the in-process server: the global recorder if this process has none
/// yet, else one of its own (its series then stay empty; the bench does not read them).
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    crate::telemetry::init_metrics().unwrap_or_else(|_| {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle()
    })
}

async fn wait_ready(handle: &EngineHandle, engines: usize) -> anyhow::Result<()> {
    if let Some(reason) = handle.stats().failure() {
        anyhow::bail!("{reason}");
    }
    let until = Instant::now() + Duration::from_secs(1800);
    while !handle.stats().ready() {
        anyhow::ensure!(
            handle.stats().engines_alive() == engines,
            "an engine stopped during warm-up (see the log)"
        );
        anyhow::ensure!(
            Instant::now() < until,
            "the engines did not warm up in 30 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `bench serve`: the table, and the JSON report with `--json`.
pub fn cli(a: ServeBenchArgs) -> anyhow::Result<()> {
    let report = run(&a)?;
    print!("{report}");
    if let Some(p) = &a.json {
        super::write_json(p, &report)?;
    }
    Ok(())
}

pub fn run(a: &ServeBenchArgs) -> anyhow::Result<ServeBenchReport> {
    a.check()?;
    let t0 = Instant::now();
    let models = load_models(a)?;
    let engines = models[0].len();
    eprintln!(
        "{} model(s), {engines} pipeline(s) each, ready in {:.1?}",
        models.len(),
        t0.elapsed()
    );
    let metrics = metrics_handle();
    let (handles, threads) = engine::start_models(
        models,
        EngineConfig {
            max_batch: a.max_batch,
            // Room for every request in flight even within one model's share of the queue.
            max_queue: 2 * ((a.concurrency * a.n).max(a.max_batch * engines) + 1024),
            request_level: false,
            // Every bucket, as `serve` prepares by default: the engine's numbers stay
            // comparable with the HTTP ones.
            warmup: crate::config::WarmupBuckets::All,
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(measure(a, &handles, metrics, engines));
    drop(handles);
    threads.join();
    result
}

async fn measure(
    a: &ServeBenchArgs,
    handles: &[EngineHandle],
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    engines: usize,
) -> anyhow::Result<ServeBenchReport> {
    for h in handles {
        wait_ready(h, engines).await?;
    }
    let handle = &handles[0];
    let requests = workload(a, handle)?;
    let max = Duration::from_secs_f64(a.max_secs);

    // Warm-up: a full batch on every engine, two steps each, not measured.
    let warm: Vec<ImageSpec> = (0..a.max_batch * engines)
        .map(|i| ImageSpec {
            steps: 2,
            ..requests[i % requests.len()].specs[0]
        })
        .collect();
    engine_request(handle.clone(), warm, Instant::now() + max, None).await?;

    let mut rows = Vec::new();
    for (path, encode) in [("engine", None), ("engine+png", Some(a.png_compression))] {
        eprintln!("measuring {path} …");
        let deadline = Instant::now() + max;
        let measured = closed_loop(requests.len(), a.concurrency, |r| {
            engine_request(handle.clone(), requests[r].specs.clone(), deadline, encode)
        })
        .await
        .with_context(|| format!("{path} pass"))?;
        rows.push(row(path, requests.len(), measured));
    }

    eprintln!("measuring http …");
    let state = AppState {
        models: api::Models::new(handles.to_vec())?,
        metrics,
        api_keys: Arc::new(Vec::new()),
        max_images_per_request: a.n,
        max_body_bytes: 65536,
        png_compression: a.png_compression,
        request_timeout: max,
        max_request_timeout: max,
        started_unix: 0,
        inflight: Default::default(),
        http: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("cannot listen on 127.0.0.1")?;
    let url = format!("http://{}/generate", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    let client = reqwest::Client::builder()
        .timeout(max)
        .pool_max_idle_per_host(a.concurrency)
        .build()?;
    let measured = closed_loop(requests.len(), a.concurrency, |r| {
        http_request(
            client.clone(),
            url.clone(),
            requests[r].body.clone(),
            requests[r].specs.len(),
        )
    })
    .await
    .context("http pass");
    let mixed = match (&measured, handles.get(1)) {
        (Ok(_), Some(second)) => {
            eprintln!("measuring mixed …");
            let mixed = mixed_pass(a, &client, &url, handles, second, max).await;
            Some(mixed.context("mixed pass"))
        }
        _ => None,
    };
    let _ = stop.send(());
    server
        .await
        .context("the HTTP server task failed")?
        .context("the HTTP server failed")?;
    rows.push(row("http", requests.len(), measured?));
    let mixed = mixed.transpose()?;

    let engine_rate = rows[0].images_per_sec;
    for r in &mut rows {
        r.relative_to_engine = r.images_per_sec / engine_rate.max(1e-12);
    }
    let spec = requests[0].specs[0];
    let info = handle.info();
    Ok(ServeBenchReport {
        model: info.name.clone(),
        dtype: info.dtype.clone(),
        devices: handle.devices().to_vec(),
        image_size: info.image_size,
        steps: a.steps,
        sampler: spec.sampler.to_string(),
        guidance_scale: spec.guidance.scale(),
        images: a.images,
        images_per_request: a.n,
        concurrency: a.concurrency,
        max_batch: a.max_batch,
        http_overhead_pct: 100.0 * (1.0 - rows[2].relative_to_engine),
        rows,
        mixed_wall_secs: mixed.as_ref().map(|m| m.1),
        mixed: mixed.map(|m| m.0).unwrap_or_default(),
    })
}

/// Both models' workloads (`--images` each), interleaved request by request, over HTTP with
/// `--concurrency` in flight: per model, images/s over the pass's wall time and p50/p99.
async fn mixed_pass(
    a: &ServeBenchArgs,
    client: &reqwest::Client,
    url: &str,
    handles: &[EngineHandle],
    second: &EngineHandle,
    max: Duration,
) -> anyhow::Result<(Vec<MixedRow>, f64)> {
    let per_model = [
        workload_for(a, &handles[0], a.images)?,
        workload_for(a, second, a.images)?,
    ];
    // Request k alternates between the models while both have requests left.
    let order: Vec<(usize, usize)> = (0..per_model[0].len().max(per_model[1].len()))
        .flat_map(|r| [(0, r), (1, r)])
        .filter(|&(m, r)| r < per_model[m].len())
        .collect();
    let sem = Arc::new(tokio::sync::Semaphore::new(a.concurrency.max(1)));
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(order.len());
    for &(m, r) in &order {
        let permit = sem.clone().acquire_owned().await?;
        let req = &per_model[m][r];
        let fut = http_request(
            client.clone(),
            url.to_string(),
            req.body.clone(),
            req.specs.len(),
        );
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let result = tokio::time::timeout(max, fut).await;
            drop(permit);
            let images = result.context("the mixed pass passed --max-secs")??;
            anyhow::Ok((m, t0.elapsed().as_secs_f64() * 1e3, images))
        }));
    }
    let mut latencies = [Vec::new(), Vec::new()];
    let mut images = [0usize; 2];
    for t in tasks {
        let (m, ms, n) = t.await.context("a request task failed")??;
        latencies[m].push(ms);
        images[m] += n;
    }
    let wall = start.elapsed().as_secs_f64();
    let rows = [&handles[0], second]
        .iter()
        .enumerate()
        .map(|(m, h)| {
            latencies[m].sort_by(|x, y| x.total_cmp(y));
            MixedRow {
                model: h.name().to_string(),
                requests: latencies[m].len(),
                images: images[m],
                images_per_sec: images[m] as f64 / wall.max(1e-9),
                p50_ms: percentile(&latencies[m], 50.0),
                p99_ms: percentile(&latencies[m], 99.0),
            }
        })
        .collect();
    Ok((rows, wall))
}
