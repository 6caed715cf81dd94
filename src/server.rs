//! `serve`: load the model, start the engine, serve HTTP, drain on SIGTERM.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::{self, AppState};
use crate::config::{open_devices, resolve_model_paths, ServeArgs};
use crate::engine::{self, EngineConfig, EngineHandle};
use crate::pipeline::{LoadOptions, Pipeline};
use crate::telemetry;

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("diffit-http")
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics()?;
    let (model, vae) = resolve_model_paths(args.model.clone(), args.vae.clone())?;
    let devices = open_devices(&args.device_specs())?;
    let opts = LoadOptions {
        model,
        vae,
        vae_config: args.vae_config.clone(),
        device: devices[0].clone(),
        dtype: args.dtype.into(),
        decode_chunk: args.decode_chunk,
        kernels: args.kernels,
    };
    let t0 = Instant::now();
    let pipelines =
        tokio::task::spawn_blocking(move || Pipeline::load_on_each(&opts, &devices)).await??;
    let (engine, engines) = engine::start(
        pipelines,
        EngineConfig {
            max_batch: args.max_batch as usize,
            max_queue: args.max_queue as usize,
            request_level: args.request_level_batching,
        },
    )?;
    let info = engine.info().clone();
    tracing::info!(model = %info.name, config = ?info.config, devices = %info.device, dtype = %info.dtype,
        engines = engine.devices().len(), elapsed = ?t0.elapsed(), "model loaded");
    metrics::gauge!("diffit_model_info",
        "model" => info.name.clone(), "dtype" => info.dtype.clone(), "device" => info.device.clone(),
        "image_size" => info.image_size.to_string(), "num_classes" => info.config.num_classes.to_string())
    .set(1.0);

    let state = app_state(engine.clone(), metrics.clone(), &args);
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    // A fixed line on stdout: scripts and tests read the bound port from it.
    println!("diffit-server listening on http://{addr}");
    tracing::info!(%addr, "listening");

    let upkeep = metrics.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });

    let drain_state = state.clone();
    let drain_timeout = args.drain_timeout();
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(drain(drain_state, drain_timeout))
        .await?;
    // Dropping the last handle lets every engine finish what it holds and exit.
    drop(engine);
    let _ = tokio::task::spawn_blocking(move || engines.join()).await;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// The HTTP side's shared state for `serve`'s settings.
pub fn app_state(engine: EngineHandle, metrics: PrometheusHandle, args: &ServeArgs) -> AppState {
    AppState {
        engine,
        metrics,
        api_keys: Arc::new(
            args.api_keys
                .iter()
                .filter(|k| !k.is_empty())
                .cloned()
                .collect(),
        ),
        max_images_per_request: args.max_images_per_request as usize,
        max_body_bytes: args.max_body_bytes,
        request_timeout: args.request_timeout(),
        max_request_timeout: args.max_request_timeout(),
        started_unix: api_unix_now(),
        inflight: Default::default(),
    }
}

fn api_unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// After SIGTERM: stop admitting (readyz and new requests get 503) but keep answering, until
/// every accepted request is answered or the drain timeout passes; then stop the listener.
async fn drain(state: AppState, timeout: Duration) {
    shutdown_signal().await;
    let engine: &EngineHandle = &state.engine;
    engine.start_draining();
    metrics::gauge!("diffit_ready").set(0.0);
    tracing::info!(
        inflight = state.inflight.load(Ordering::SeqCst),
        "SIGTERM: draining"
    );
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        let busy = state.inflight.load(Ordering::SeqCst)
            + engine.stats().queued_images.load(Ordering::SeqCst)
            + engine.stats().active_samples();
        if busy == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!("drained; closing the listener");
}
