//! `serve`: load the models, start their engines, serve HTTP, drain on SIGTERM.

mod conn;
mod drain;
mod fdlimit;
mod io;
mod load;
mod trim;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::api::{self, AppState, HttpGuards, Models};
use crate::config::{open_devices, ServeArgs, Timeouts};
use crate::engine::{self, EngineConfig};
use crate::telemetry;
use conn::{ConnLimits, Connections};

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    telemetry::init_logging(args.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("diffit-http")
        .build()?;
    let result = runtime.block_on(serve(args));
    // A PNG encode still running on the blocking pool must not hold the exit past the drain.
    runtime.shutdown_timeout(Duration::from_millis(200));
    result
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Settings first: a bad value ends start-up before seconds of model loading.
    let timeouts = args.timeouts()?;
    let cors_origins = args.cors_origins()?;
    let entries = args.model_entries()?;
    let metrics = telemetry::init_metrics()?;
    let devices = open_devices(&args.device_specs())?;
    let (decode_chunk, kernels) = (args.decode_chunk, args.kernels);
    let t0 = Instant::now();
    let pipelines = tokio::task::spawn_blocking(move || {
        let shared = load::Shared {
            devices: &devices,
            decode_chunk,
            kernels,
        };
        load::load_all(&entries, &shared)
    })
    .await??;
    let (handles, engines) = engine::start_models(
        pipelines,
        EngineConfig {
            max_batch: args.max_batch as usize,
            max_queue: args.max_queue as usize,
            request_level: args.request_level_batching,
            warmup: args.warmup_buckets,
        },
    )?;
    for h in &handles {
        let info = h.info();
        tracing::info!(model = %info.name, config = ?info.config, devices = %info.device, dtype = %info.dtype,
            engines = h.devices().len(), queue_floor = h.queue_floor(), queue_max = h.max_queue(), "model ready to warm up");
        metrics::gauge!("diffit_model_info",
            "model" => info.name.clone(), "dtype" => info.dtype.clone(), "device" => info.device.clone(),
            "image_size" => info.image_size.to_string(), "num_classes" => info.config.num_classes.to_string())
        .set(1.0);
    }
    tracing::info!(models = handles.len(), elapsed = ?t0.elapsed(), "models loaded");
    let models = Models::new(handles)?;

    let (cutoff, cutoff_rx) = tokio::sync::watch::channel(false);
    let mut state = app_state(models.clone(), metrics.clone(), &args, &timeouts);
    state.http = HttpGuards {
        body_read_timeout: timeouts.body_read,
        inflight_requests: Arc::new(tokio::sync::Semaphore::new(
            args.max_inflight_requests as usize,
        )),
        cors_origins: Arc::new(cors_origins),
        cutoff: cutoff_rx,
    };
    let listener = conn::bind(&args.host, args.port)
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    // A fixed line on stdout: scripts and tests read the bound port from it.
    println!("diffit-server listening on http://{addr}");
    tracing::info!(%addr, "listening");

    let conns = Connections::new(ConnLimits {
        max_connections: fdlimit::fit_connections(args.max_connections as usize),
        header_read: timeouts.header_read,
        idle: timeouts.idle,
    });
    let upkeep = metrics.clone();
    let watched = conns.clone();
    tokio::spawn(async move {
        let mut peak = 0;
        for tick in 1u64.. {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if tick % 5 == 0 {
                upkeep.run_upkeep();
            }
            peak = trim::after_connection_surge(peak, watched.open()).await;
        }
    });

    let (stop_accepting, stop) = tokio::sync::oneshot::channel::<()>();
    let accept = tokio::spawn(conn::accept_loop(
        listener,
        api::router(state.clone()),
        conns.clone(),
        async {
            let _ = stop.await;
        },
    ));

    // Serve until SIGTERM, or until an engine cannot start: a server whose model never gets
    // ready must not linger half-alive (listening, healthy, never ready).
    let failure = tokio::select! {
        _ = shutdown_signal() => None,
        reason = models.failed() => Some(reason),
    };
    if let Some(reason) = failure {
        models.start_draining();
        let _ = stop_accepting.send(());
        conns.close_all();
        let _ = accept.await;
        anyhow::bail!("{reason}; exiting");
    }
    let outcome = drain::run(&state, &conns, timeouts.drain, &cutoff, stop_accepting).await;
    let _ = accept.await;
    // Not left to the last handle's drop: a closed connection's task may still hold one.
    models.close_queues();
    drop(state);
    drop(models);
    if let drain::Outcome::CutOff {
        requests,
        generations,
    } = outcome
    {
        anyhow::bail!(
            "the drain timeout ({} s) passed: {requests} requests cut off ({generations} generations)",
            timeouts.drain.as_secs_f64()
        );
    }
    // With the queues closed every engine finishes what it holds and exits; nothing is left
    // to finish, but a step may be running.
    let joined = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::task::spawn_blocking(move || engines.join()),
    )
    .await;
    if joined.is_err() {
        tracing::warn!("an engine did not stop within 2 s; exiting anyway");
    }
    tracing::info!("shut down cleanly");
    Ok(())
}

/// The HTTP side's shared state for `serve`'s settings.
pub fn app_state(
    models: Models,
    metrics: PrometheusHandle,
    args: &ServeArgs,
    timeouts: &Timeouts,
) -> AppState {
    AppState {
        models,
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
        png_compression: args.png_compression,
        request_timeout: timeouts.request,
        max_request_timeout: timeouts.max_request,
        started_unix: api::unix_now(),
        inflight: Default::default(),
        http: HttpGuards::default(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot install a SIGTERM handler; only Ctrl-C drains");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
