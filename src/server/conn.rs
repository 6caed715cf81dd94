//! Client connections: the accept loop, per-connection read timeouts, the bound on open
//! connections, and the switch the drain uses to close them.
//!
//! axum's `serve` has no knobs for any of this, so connections are driven here with hyper's
//! HTTP/1 builder (the only protocol the server speaks). Each connection runs in its own task
//! that also enforces its timeouts, because hyper's own `header_read_timeout` doubles as the
//! keep-alive idle timeout and cannot tell the two apart:
//! - a new connection must deliver a complete request head within the header timeout;
//! - an idle keep-alive connection is closed after the idle timeout, and once the first byte
//!   of its next request arrives that head too must be complete within the header timeout;
//! - while a request is being handled no connection timeout runs (the body timeout and the
//!   request deadline belong to the handler).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use super::io::ConnIo;

/// The connection-level limits of `serve`.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub header_read: Duration,
    pub idle: Duration,
}

/// Largest request head (request line and headers) accepted; 431 beyond. hyper's default
/// read buffer (~400 KB) would let every slow connection pin that much memory; 64 KiB is far
/// above any real request head here (a few hundred bytes).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Longest a new connection waits for an evicted one to close before it is refused.
const ADMIT_WAIT: Duration = Duration::from_millis(200);

/// What a connection's task is asked to do.
const RUN: u8 = 0;
/// Finish the request in flight (if any), then close.
const GRACEFUL: u8 = 1;
/// Close now.
const CLOSE: u8 = 2;

/// One connection's state, shared by its task, its IO wrapper and its requests' guards.
pub struct ConnState {
    /// Accept order: the oldest idle connection is the first to go when the table is full.
    id: u64,
    origin: Instant,
    /// Requests on this connection whose handling (response body included) is not finished.
    busy: AtomicUsize,
    /// Requests handed to the service whose response head hyper has not written yet; a head
    /// written while this is 0 is one of hyper's own error responses (400/414/431).
    heads_owed: AtomicUsize,
    /// Milliseconds after `origin` when the current wait began: accept, the end of the last
    /// response, or the first byte of the next request head.
    since_ms: AtomicU64,
    /// Bytes of a new request head arrived while idle.
    head_started: AtomicBool,
    /// At least one request was handled (the idle timeout applies only after that).
    served: AtomicBool,
    /// The request in flight announced it is the last one (HTTP/1.0 or `Connection: close`),
    /// so a read EOF is the client half-closing, not leaving.
    last_request: AtomicBool,
    mode: AtomicU8,
    wake: Notify,
}

impl ConnState {
    fn new(id: u64) -> Self {
        Self {
            id,
            origin: Instant::now(),
            busy: AtomicUsize::new(0),
            heads_owed: AtomicUsize::new(0),
            since_ms: AtomicU64::new(0),
            head_started: AtomicBool::new(false),
            served: AtomicBool::new(false),
            last_request: AtomicBool::new(false),
            mode: AtomicU8::new(RUN),
            wake: Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }

    /// Bytes arrived from the client (called by the IO wrapper).
    pub(super) fn on_bytes(&self) {
        if self.is_busy() || self.head_started.swap(true, Ordering::SeqCst) {
            return;
        }
        // A kept-alive connection's head timeout runs from the head's first byte; a new
        // connection's from its accept (so one that sends a byte a second never gets longer).
        if self.served.load(Ordering::SeqCst) {
            self.since_ms.store(self.now_ms(), Ordering::SeqCst);
        }
        self.wake.notify_one();
    }

    /// Whether a read EOF should be hidden from hyper (the client half-closed after its last
    /// request, which is still being answered).
    pub(super) fn eof_is_half_close(&self) -> bool {
        self.is_busy() && self.last_request.load(Ordering::SeqCst)
    }

    /// hyper is writing a response head; true if no request asked for it (hyper's own error).
    pub(super) fn take_head(&self) -> bool {
        self.heads_owed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
    }

    /// A request was handed to the service.
    fn request_started(self: &Arc<Self>, last: bool) -> RequestGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.heads_owed.fetch_add(1, Ordering::SeqCst);
        self.head_started.store(false, Ordering::SeqCst);
        self.last_request.store(last, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    /// When this connection should be closed if nothing changes (None while a request runs).
    fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.is_busy() {
            return None;
        }
        let since = self.origin + Duration::from_millis(self.since_ms.load(Ordering::SeqCst));
        let waiting_for_head =
            self.head_started.load(Ordering::SeqCst) || !self.served.load(Ordering::SeqCst);
        Some(
            since
                + if waiting_for_head {
                    limits.header_read
                } else {
                    limits.idle
                },
        )
    }

    fn ask(&self, mode: u8) {
        self.mode.fetch_max(mode, Ordering::SeqCst);
        self.wake.notify_one();
    }
}

/// Held while a request is handled, until its response body is finished or dropped.
pub struct RequestGuard(Arc<ConnState>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let s = &self.0;
        s.served.store(true, Ordering::SeqCst);
        s.since_ms.store(s.now_ms(), Ordering::SeqCst);
        s.busy.fetch_sub(1, Ordering::SeqCst);
        s.wake.notify_one();
    }
}

/// Every open connection, by accept order.
pub struct Connections {
    limits: ConnLimits,
    table: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
    /// Signalled whenever a connection closes (the drain waits on it).
    closed: Notify,
}

impl Connections {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            table: Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            closed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<ConnState>>> {
        // Every change is one insert or remove: a poisoned table is still consistent.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open(&self) -> usize {
        self.lock().len()
    }

    /// Requests being handled on all connections together.
    pub fn busy_requests(&self) -> usize {
        self.lock()
            .values()
            .map(|c| c.busy.load(Ordering::SeqCst))
            .sum()
    }

    /// Admits a new connection: at the limit, the oldest idle connection is closed to make
    /// room (a flood of silent or slow connections then only ever evicts its own kind, while
    /// a real client's request completes in the moment its connection is the newest); if
    /// every connection is handling a request, the new one is refused. An evicted connection
    /// counts until its socket is closed, so open descriptors never exceed the limit: the new
    /// one waits (briefly) for that.
    async fn admit(&self) -> Option<Arc<ConnState>> {
        let until = tokio::time::Instant::now() + ADMIT_WAIT;
        loop {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            {
                let mut table = self.lock();
                if table.len() < self.limits.max_connections {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let state = Arc::new(ConnState::new(id));
                    table.insert(id, state.clone());
                    metrics::gauge!("diffit_connections_open").set(table.len() as f64);
                    return Some(state);
                }
                let closing = table
                    .values()
                    .any(|c| c.mode.load(Ordering::SeqCst) == CLOSE);
                if !closing {
                    let victim = table.values().find(|c| !c.is_busy())?;
                    victim.ask(CLOSE);
                    metrics::counter!("diffit_connections_closed_total", "reason" => "evicted")
                        .increment(1);
                }
            }
            if tokio::time::timeout_at(until, closed).await.is_err() {
                return None;
            }
        }
    }

    fn remove(&self, id: u64) {
        let mut table = self.lock();
        table.remove(&id);
        metrics::gauge!("diffit_connections_open").set(table.len() as f64);
        drop(table);
        self.closed.notify_waiters();
    }

    /// Idle connections close now; busy ones after their current response.
    pub fn close_gracefully(&self) {
        for c in self.lock().values() {
            c.ask(if c.is_busy() { GRACEFUL } else { CLOSE });
        }
    }

    /// Every connection closes now, whatever it is doing.
    pub fn close_all(&self) {
        for c in self.lock().values() {
            c.ask(CLOSE);
        }
    }

    /// Waits until no connection is open or `until` passes; whether none is open.
    pub async fn wait_closed(&self, until: tokio::time::Instant) -> bool {
        loop {
            let notified = self.closed.notified();
            if self.open() == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.open() == 0;
            }
        }
    }
}

/// Connections the kernel may hold for us before `accept` (capped by net.core.somaxconn).
/// tokio's default of 1024 fills within a second under a connection flood on a small machine;
/// past it the kernel drops SYNs, and a probe's connection then waits for the 1 s SYN retry.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listening socket on the first address `host` resolves to.
pub async fn bind(host: &str, port: u16) -> std::io::Result<TcpListener> {
    let addr = tokio::net::lookup_host((host, port))
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std's and tokio's own bind do: a restarted server can bind while old connections
    // linger in TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Answer to a connection refused at the limit: written without waiting (a full socket buffer
/// just loses it), then the socket is closed.
fn refused_response() -> Vec<u8> {
    let body = r#"{"error":{"type":"unavailable_error","message":"too many open connections; retry shortly","param":null,"code":null}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         connection: close\r\nretry-after: 1\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Accepts connections until `stop` fires, each served by `router` in its own task.
pub async fn accept_loop(
    listener: TcpListener,
    router: Router,
    conns: Arc<Connections>,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let refused = refused_response();
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut stop => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors (EMFILE) or a connection reset before it was
                    // accepted: back off briefly instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(state) = conns.admit().await else {
            metrics::counter!("diffit_connections_refused_total").increment(1);
            tracing::debug!(%peer, "connection refused: every open connection is busy");
            let _ = stream.try_write(&refused);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            stream,
            router.clone(),
            state,
            conns.clone(),
        ));
    }
}

fn is_last_request<B>(req: &hyper::Request<B>) -> bool {
    let close = req
        .headers()
        .get_all(hyper::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("close"));
    close || req.version() <= hyper::Version::HTTP_10
}

async fn serve_connection(
    stream: TcpStream,
    router: Router,
    state: Arc<ConnState>,
    conns: Arc<Connections>,
) {
    let limits = conns.limits;
    let io = TokioIo::new(ConnIo::new(stream, state.clone()));
    let svc_state = state.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let guard = svc_state.request_started(is_last_request(&req));
        let router = router.clone();
        async move {
            use tower::ServiceExt;
            let resp = router.oneshot(req.map(Body::new)).await;
            // The guard lives until hyper has sent (or dropped) the whole response body.
            resp.map(|r| r.map(|b| Body::new(super::io::GuardedBody::new(b, guard))))
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .max_header_size(MAX_HEAD_BYTES)
        // Also bounds the buffer a head is read into (hyper checks the head size only once
        // it has parsed, so the buffer must be able to hold a head of the limit and a bit).
        .max_buf_size(MAX_HEAD_BYTES + 16 * 1024)
        .header_read_timeout(None)
        .keep_alive(true);
    // The connection lives in this block: leaving it drops the connection, which closes the
    // socket and drops any request still in flight.
    let reason = {
        let conn = builder.serve_connection(io, service).with_upgrades();
        tokio::pin!(conn);
        let mut graceful = false;
        loop {
            let deadline = state.deadline(&limits);
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    break None;
                }
                _ = state.wake.notified() => {
                    match state.mode.load(Ordering::SeqCst) {
                        CLOSE => break Some("closed"),
                        GRACEFUL if !graceful => {
                            graceful = true;
                            conn.as_mut().graceful_shutdown();
                        }
                        _ => {}
                    }
                }
                _ = sleep => {
                    if state.deadline(&limits).is_some_and(|d| d <= Instant::now()) {
                        let head = state.head_started.load(Ordering::SeqCst)
                            || !state.served.load(Ordering::SeqCst);
                        break Some(if head { "header_timeout" } else { "idle_timeout" });
                    }
                }
            }
        }
    };
    if let Some(reason) = reason {
        if reason != "closed" {
            metrics::counter!("diffit_connections_closed_total", "reason" => reason).increment(1);
        }
    }
    conns.remove(state.id);
}
