//! Logging and Prometheus metrics set-up.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;

pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    // Colour codes only for a person at a terminal: in files, pipes and log collectors they
    // are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests, repeated calls) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Installs the global recorder and describes every metric the server emits.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("diffit_batch_size".into()), &BATCH_BUCKETS)?
        .install_recorder()?;
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "diffit_requests_total",
        "HTTP requests by route and status (and model, for generation requests that named one)"
    );
    describe_histogram!(
        "diffit_request_duration_seconds",
        Unit::Seconds,
        "HTTP request latency by route (and model)"
    );
    describe_gauge!(
        "diffit_queue_depth",
        "Images waiting for a batch slot, by model (sum for the server's queue)"
    );
    describe_histogram!(
        "diffit_queue_wait_seconds",
        Unit::Seconds,
        "Time from admission to first denoising step, by model"
    );
    describe_gauge!(
        "diffit_active_samples",
        "Images being denoised now, by model"
    );
    describe_histogram!(
        "diffit_batch_size",
        "Images per denoising step, by engine, device and model"
    );
    describe_histogram!(
        "diffit_step_duration_seconds",
        Unit::Seconds,
        "Latency of one batched denoising step, by engine, device and model"
    );
    describe_gauge!(
        "diffit_engines",
        "Engines (one per device per model, each with its own model copy)"
    );
    describe_counter!(
        "diffit_images_generated_total",
        "Images returned to clients, by model"
    );
    describe_histogram!(
        "diffit_decode_duration_seconds",
        Unit::Seconds,
        "VAE decode latency per batch"
    );
    describe_histogram!(
        "diffit_encode_duration_seconds",
        Unit::Seconds,
        "PNG encode latency per image"
    );
    describe_histogram!(
        "diffit_preview_duration_seconds",
        Unit::Seconds,
        "Time per denoising step spent on live previews (only steps that made some)"
    );
    describe_counter!(
        "diffit_rejections_total",
        "Requests refused or ended early, by reason"
    );
    describe_gauge!(
        "diffit_ready",
        "1 when every model is loaded, warmed up and not draining"
    );
    describe_gauge!(
        "diffit_model_info",
        "One series per served model (labels); always 1"
    );
    describe_gauge!("diffit_connections_open", "Open client connections");
    describe_counter!(
        "diffit_connections_refused_total",
        "Connections refused because every open connection was busy"
    );
    describe_counter!(
        "diffit_connections_closed_total",
        "Connections closed by the server, by reason (header_timeout, idle_timeout, evicted)"
    );
    for reason in [
        "queue_full",
        "deadline",
        "disconnected",
        "unauthorized",
        "draining",
        "invalid",
        "overloaded",
        "cross_origin",
        "drain_timeout",
    ] {
        metrics::counter!("diffit_rejections_total", "reason" => reason).absolute(0);
    }
    // The per-model series (queue depth, active samples, images) start at 0 when each model's
    // engines start (`engine::start_models`).
    metrics::gauge!("diffit_ready").set(0.0);
    metrics::gauge!("diffit_connections_open").set(0.0);
    metrics::counter!("diffit_connections_refused_total").absolute(0);
    for reason in ["header_timeout", "idle_timeout", "evicted"] {
        metrics::counter!("diffit_connections_closed_total", "reason" => reason).absolute(0);
    }
    Ok(handle)
}
