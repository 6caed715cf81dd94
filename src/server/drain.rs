//! The drain after SIGTERM, bounded by `--drain-timeout-secs` whatever clients do.
//!
//! 1. Stop admitting: `/readyz` and new generation requests get 503, everything else is still
//!    served (a load balancer sees the 503 and moves traffic away).
//! 2. Wait until no request is being handled and the engines hold nothing. A connection that
//!    holds only part of a request head is not work and does not delay this.
//! 3. Clean: stop accepting, close every connection (idle ones at once, a busy one after its
//!    response) and exit 0.
//! 4. Deadline: a short grace before it, every request still running is answered 503 (the
//!    handlers watch the cut-off signal), connections are closed, and at the deadline whatever
//!    is still open is dropped. The cut-off requests are counted and logged and the process
//!    exits non-zero.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::conn::Connections;
use crate::api::AppState;

pub enum Outcome {
    Clean,
    CutOff {
        /// HTTP requests still being handled at the cut-off.
        requests: usize,
        /// Of them, generation requests (their images were abandoned).
        generations: usize,
    },
}

/// How long before the deadline the remaining requests are answered, so that the 503s have
/// time to reach their clients before the sockets close.
fn answer_grace(timeout: Duration) -> Duration {
    (timeout / 5).min(Duration::from_millis(500))
}

pub async fn run(
    state: &AppState,
    conns: &Arc<Connections>,
    timeout: Duration,
    cutoff: &tokio::sync::watch::Sender<bool>,
    stop_accepting: tokio::sync::oneshot::Sender<()>,
) -> Outcome {
    let models = &state.models;
    models.start_draining();
    metrics::gauge!("diffit_ready").set(0.0);
    let start = Instant::now();
    let deadline = start + timeout;
    let answer_at = deadline - answer_grace(timeout);
    tracing::info!(
        requests = conns.busy_requests(),
        generations = state.inflight.load(Ordering::SeqCst),
        connections = conns.open(),
        timeout_secs = timeout.as_secs_f64(),
        "SIGTERM: draining"
    );
    let busy = || {
        conns.busy_requests()
            + state.inflight.load(Ordering::SeqCst)
            + models.queued_images()
            + models.active_samples()
    };
    while busy() > 0 && Instant::now() < answer_at {
        tokio::time::sleep_until((Instant::now() + Duration::from_millis(20)).min(answer_at)).await;
    }
    let _ = stop_accepting.send(());
    if busy() == 0 {
        conns.close_gracefully();
        if !conns.wait_closed(deadline).await {
            conns.close_all();
        }
        tracing::info!(elapsed = ?start.elapsed(), "drained: every accepted request was answered");
        return Outcome::Clean;
    }

    let requests = conns.busy_requests();
    let generations = state.inflight.load(Ordering::SeqCst);
    tracing::warn!(
        requests,
        generations,
        queued_images = models.queued_images(),
        active_samples = models.active_samples(),
        "drain timeout: answering the remaining requests 503 and closing every connection"
    );
    metrics::counter!("diffit_rejections_total", "reason" => "drain_timeout")
        .increment(generations as u64);
    let _ = cutoff.send(true);
    conns.close_gracefully();
    // Keep a moment before the deadline for the connection tasks to close their sockets.
    let last_call = deadline - (timeout / 10).min(Duration::from_millis(50));
    if !conns.wait_closed(last_call).await {
        let left = conns.open();
        conns.close_all();
        conns.wait_closed(deadline).await;
        tracing::warn!(
            connections = left,
            "closed connections still open at the deadline"
        );
    }
    Outcome::CutOff {
        requests,
        generations,
    }
}
