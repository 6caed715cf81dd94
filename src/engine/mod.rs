//! The engines: one thread per device owns that device's model copy and runs step-level
//! continuous batching over the requests it holds. Every engine pulls from one shared queue,
//! and only as many images as it has free batch slots, so the load spreads over the devices.
//! It knows nothing of HTTP: requests arrive as [`Job`]s through an [`EngineHandle`], results
//! leave on each job's event channel.
//!
//! A server with several models runs one such engine set per model ([`start_models`]): each
//! model has its own queue, its own engine threads (one per device) and so its own batches;
//! only the queue capacity is shared, under the fair admission of [`admission`].

mod admission;
mod decoder;
pub mod preview;
mod queue;
mod scheduler;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::sync::mpsc;

use crate::pipeline::{ImageSpec, ModelInfo, Pipeline};
use admission::Admission;
use queue::JobQueue;

pub use scheduler::EngineConfig;

/// Why a job ended without all its images.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the request passed its deadline before it finished")]
    Deadline,
    #[error("the engine is shutting down")]
    ShuttingDown,
    #[error("generation failed: {0}")]
    Internal(String),
}

/// What the engine tells a job's owner, in order: `Started`, any number of `Progress`,
/// then one `Image` per requested image, or a `Failed`.
#[derive(Debug)]
pub enum JobEvent {
    /// The job's first sample joined the batch after `queue_wait` in the queue.
    Started {
        queue_wait: Duration,
    },
    /// Steps completed by the job's slowest sample, of `total`.
    Progress {
        step: usize,
        total: usize,
    },
    /// A preview of image `index`'s denoised estimate after `step` of `total` steps (jobs that
    /// asked for previews only; see [`preview`]).
    Preview {
        index: usize,
        step: usize,
        total: usize,
        image: preview::PreviewImage,
    },
    /// One finished image: planar u8 pixels and how long its batch (of `decode_batch` latents)
    /// took to decode.
    Image {
        index: usize,
        pixels: Vec<u8>,
        denoise: Duration,
        decode: Duration,
        decode_batch: usize,
    },
    Failed(EngineError),
}

/// A request as the engine sees it: the images to make, a deadline, and where to report.
/// A job larger than an engine's free batch slots is split into parts (see [`Job::split_front`]);
/// the parts share one [`JobShared`] and one event channel.
pub struct Job {
    pub id: String,
    pub specs: Vec<ImageSpec>,
    pub deadline: Instant,
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// Send `Progress` events (only streaming requests want them).
    pub progress: bool,
    /// Send `Preview` events every few steps (see [`Job::with_previews`]).
    pub(crate) previews: bool,
    pub(crate) enqueued: Instant,
    /// Index (within the whole request) of `specs[0]`: non-zero for a later part.
    pub(crate) first_index: usize,
    pub(crate) shared: Arc<JobShared>,
}

/// State every part of one job sees, whichever engine holds it.
#[derive(Debug)]
pub(crate) struct JobShared {
    /// The job failed, passed its deadline or lost its client: whoever sets this reports it
    /// (once); every engine then drops the job's samples.
    ended: AtomicBool,
    /// The first part admitted sends `Started`.
    started: AtomicBool,
    /// Steps done by each image (streaming jobs only): progress is the slowest image's.
    steps_done: Vec<AtomicUsize>,
    /// Last progress step sent, so that parts on different engines never send it backwards.
    reported: AtomicUsize,
    /// The span of the request that made the job (the current span at `Job::new`): the engine
    /// logs the job's admission, steps, batch sizes and decode inside it, so a request id's log
    /// lines tell its whole story, and each step's span follows from the jobs it ran.
    pub(crate) span: tracing::Span,
}

impl JobShared {
    fn new(images: usize, progress: bool) -> Self {
        Self {
            ended: AtomicBool::new(false),
            started: AtomicBool::new(false),
            steps_done: (0..if progress { images } else { 0 })
                .map(|_| AtomicUsize::new(0))
                .collect(),
            reported: AtomicUsize::new(0),
            span: tracing::Span::current(),
        }
    }

    /// Marks the job ended; true for the one caller that should report why.
    pub(crate) fn end(&self) -> bool {
        !self.ended.swap(true, Ordering::SeqCst)
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }

    /// True for the first part to start.
    pub(crate) fn start(&self) -> bool {
        !self.started.swap(true, Ordering::SeqCst)
    }

    /// Records image `index`'s steps; returns the job's new progress (its slowest image's step
    /// count) if it advanced and this caller should send it.
    pub(crate) fn record_progress(&self, index: usize, steps: usize) -> Option<usize> {
        self.steps_done.get(index)?.store(steps, Ordering::SeqCst);
        let slowest = self
            .steps_done
            .iter()
            .map(|s| s.load(Ordering::SeqCst))
            .min()?;
        (slowest > 0 && self.reported.fetch_max(slowest, Ordering::SeqCst) < slowest)
            .then_some(slowest)
    }
}

impl Job {
    pub fn new(
        id: String,
        specs: Vec<ImageSpec>,
        deadline: Instant,
        progress: bool,
    ) -> (Self, mpsc::UnboundedReceiver<JobEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(JobShared::new(specs.len(), progress));
        let job = Self {
            id,
            specs,
            deadline,
            events,
            progress,
            previews: false,
            enqueued: Instant::now(),
            first_index: 0,
            shared,
        };
        (job, rx)
    }

    /// Asks for `Preview` events: each image's denoised estimate, projected to pixels, about
    /// [`scheduler::PREVIEWS_PER_IMAGE`] times over its steps. The images themselves are
    /// unchanged (bit for bit): previews only read what each step computes anyway.
    pub fn with_previews(mut self) -> Self {
        self.previews = true;
        self
    }

    /// Splits off the first `k` images as a part of their own (same id, deadline, events and
    /// shared state); `self` keeps the rest.
    pub(crate) fn split_front(&mut self, k: usize) -> Job {
        let rest = self.specs.split_off(k.min(self.specs.len()));
        let front = std::mem::replace(&mut self.specs, rest);
        let part = Job {
            id: self.id.clone(),
            specs: front,
            deadline: self.deadline,
            events: self.events.clone(),
            progress: self.progress,
            previews: self.previews,
            enqueued: self.enqueued,
            first_index: self.first_index,
            shared: self.shared.clone(),
        };
        self.first_index += part.specs.len();
        part
    }

    /// Why the job should stop now, if it should: its deadline passed or its client left.
    pub(crate) fn end_reason(&self, now: Instant) -> Option<&'static str> {
        if now >= self.deadline {
            Some("deadline")
        } else if self.events.is_closed() {
            Some("disconnected")
        } else {
            None
        }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error(
        "the queue is full for model '{model}' ({queued} images waiting, {limit} allowed now); \
         retry in {retry_after_secs} s"
    )]
    QueueFull {
        model: String,
        queued: usize,
        limit: usize,
        retry_after_secs: u64,
    },
    #[error("the server is draining and accepts no new work")]
    Draining,
}

/// What one engine reports about itself.
#[derive(Debug, Default)]
pub struct EngineSlot {
    active: AtomicUsize,
    /// Recent throughput in images per second (f64 bits).
    images_per_sec_bits: AtomicU64,
    ready: AtomicBool,
    /// Images this engine finished denoising.
    images_done: AtomicU64,
}

impl EngineSlot {
    pub fn active_samples(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn images_per_sec(&self) -> f64 {
        f64::from_bits(self.images_per_sec_bits.load(Ordering::Relaxed))
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    pub fn images_done(&self) -> u64 {
        self.images_done.load(Ordering::Relaxed)
    }

    pub(crate) fn set_images_per_sec(&self, v: f64) {
        self.images_per_sec_bits
            .store(v.to_bits(), Ordering::Relaxed);
    }
}

/// Why an engine could not start (warm-up failed or it panicked): the server exits. One for
/// the whole server, whichever model's engine fails.
#[derive(Debug, Default)]
pub(crate) struct Failure {
    reason: std::sync::Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

/// Counters of one model's engines, which the HTTP side reads and the engines write.
#[derive(Debug)]
pub struct EngineStats {
    /// Images waiting for a batch slot (the bounded queue, in images), all of this model's
    /// engines together.
    pub queued_images: AtomicUsize,
    engines: Vec<EngineSlot>,
    /// Engine threads still running.
    alive: AtomicUsize,
    failure: Arc<Failure>,
}

impl EngineStats {
    pub(crate) fn new(engines: usize, failure: Arc<Failure>) -> Self {
        Self {
            queued_images: AtomicUsize::new(0),
            engines: (0..engines).map(|_| EngineSlot::default()).collect(),
            alive: AtomicUsize::new(engines),
            failure,
        }
    }

    /// Records why an engine cannot run (the first reason is kept) and wakes the server.
    pub(crate) fn report_failure(&self, reason: String) {
        let mut f = self
            .failure
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(reason);
        drop(f);
        self.failure.notify.notify_waiters();
    }

    /// Why an engine (of any model) could not start, if one could not.
    pub fn failure(&self) -> Option<String> {
        self.failure
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn engines(&self) -> &[EngineSlot] {
        &self.engines
    }

    /// Images being denoised now, on every engine.
    pub fn active_samples(&self) -> usize {
        self.engines.iter().map(EngineSlot::active_samples).sum()
    }

    /// Recent throughput of all engines together, for Retry-After.
    pub fn images_per_sec(&self) -> f64 {
        self.engines.iter().map(EngineSlot::images_per_sec).sum()
    }

    /// Engine threads still running (one whose warm-up failed has stopped).
    pub fn engines_alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    /// Every engine warmed up and running.
    pub fn ready(&self) -> bool {
        !self.engines.is_empty() && self.engines.iter().all(EngineSlot::is_ready)
    }
}

/// Closes the shared queue when the last [`EngineHandle`] goes: the engines then finish what
/// they hold and exit.
struct Submitter {
    queue: Arc<JobQueue>,
}

impl Drop for Submitter {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// The HTTP side's end of one model's engines: admission control and submission.
#[derive(Clone)]
pub struct EngineHandle {
    submitter: Arc<Submitter>,
    stats: Arc<EngineStats>,
    /// The queue capacity shared with the other models, and this model's place in it.
    admission: Arc<Admission>,
    slot: usize,
    /// One flag for the whole server: draining stops every model's admission.
    draining: Arc<AtomicBool>,
    info: Arc<ModelInfo>,
    devices: Arc<Vec<String>>,
}

impl EngineHandle {
    /// The model, with `device` naming every engine's device (comma-separated).
    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    /// The model's id (its name in the API and in metric labels).
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// Each engine's device, by engine index.
    pub fn devices(&self) -> &[String] {
        &self.devices
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The most images this model can ever have queued (the capacity less the other models'
    /// guaranteed floors): a larger request could never be admitted.
    pub fn max_queue(&self) -> usize {
        self.admission.most_for(self.slot)
    }

    /// The queue capacity all models share (`--max-queue`).
    pub fn queue_capacity(&self) -> usize {
        self.admission.capacity()
    }

    /// The queue space this model is guaranteed whatever the others queue.
    pub fn queue_floor(&self) -> usize {
        self.admission.floor(self.slot)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Waits until an engine reports that it cannot run, and returns why.
    pub async fn failed(&self) -> String {
        loop {
            let notified = self.stats.failure.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a report between the two is not missed.
            notified.as_mut().enable();
            if let Some(reason) = self.stats.failure() {
                return reason;
            }
            notified.await;
        }
    }

    /// Stop admitting work; what is queued or running still finishes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Closes this model's queue: its engines finish what they hold and exit, even while some
    /// clone of a handle lives on (a connection task the drain has closed but that has not
    /// ended yet). Later submissions are refused as draining.
    pub fn close_queue(&self) {
        self.submitter.queue.close();
    }

    /// Seconds until this model's queue has room for `n` more images at the current
    /// throughput of its engines together.
    pub fn retry_after_secs(&self, n: usize) -> u64 {
        /// Before the first image finishes there is no throughput to go by.
        const UNKNOWN_RATE_RETRY_SECS: u64 = 5;
        let queued = self.stats.queued_images.load(Ordering::Relaxed) + n;
        let rate = self.stats.images_per_sec();
        if rate <= 0.0 {
            return UNKNOWN_RATE_RETRY_SECS;
        }
        ((queued as f64 / rate).ceil() as u64).clamp(1, 300)
    }

    /// Reserves queue space for the job's images or refuses it; never blocks.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.is_draining() {
            return Err(SubmitError::Draining);
        }
        let n = job.specs.len();
        if let Err(refused) = self.admission.reserve(self.slot, n) {
            return Err(SubmitError::QueueFull {
                model: self.info.name.clone(),
                queued: refused.queued,
                limit: refused.limit,
                retry_after_secs: self.retry_after_secs(n),
            });
        }
        metrics::gauge!("diffit_queue_depth", "model" => self.info.name.clone())
            .set(self.stats.queued_images.load(Ordering::SeqCst) as f64);
        if self.submitter.queue.push(job).is_err() {
            self.stats.queued_images.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::Draining);
        }
        Ok(())
    }
}

/// The engine threads, to wait for once every handle is dropped.
pub struct Engines {
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Engines {
    /// Waits for every engine to finish its work and exit.
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Starts one engine thread per loaded pipeline (one per device), all pulling from one queue.
/// Each warms up (its step buckets, `EngineConfig::warmup`, and one decode) before it counts as
/// ready; the server is ready when all are. The threads exit once every handle is dropped and
/// all work is done.
pub fn start(
    pipelines: Vec<Pipeline>,
    config: EngineConfig,
) -> anyhow::Result<(EngineHandle, Engines)> {
    let (mut handles, engines) = start_models(vec![pipelines], config)?;
    Ok((handles.remove(0), engines))
}

/// Starts every model's engines: `models[m]` holds model m's pipelines, one per device, all
/// named alike (`info.name`, the model's id). Each model gets its own queue and engine
/// threads; the queue capacity (`config.max_queue`) is shared under [`admission`]'s floors.
/// One handle per model, in order.
pub fn start_models(
    models: Vec<Vec<Pipeline>>,
    config: EngineConfig,
) -> anyhow::Result<(Vec<EngineHandle>, Engines)> {
    anyhow::ensure!(!models.is_empty(), "no model to start engines for");
    let mut names = std::collections::HashSet::new();
    for pipelines in &models {
        let first = pipelines
            .first()
            .context("no pipeline to start an engine on")?;
        anyhow::ensure!(
            names.insert(first.info.name.clone()),
            "two models are named '{}'",
            first.info.name
        );
        for p in &pipelines[1..] {
            anyhow::ensure!(
                p.info.model_sha256 == first.info.model_sha256
                    && p.info.config == first.info.config,
                "the engines on {} and {} hold different models",
                first.info.device,
                p.info.device
            );
        }
    }
    let failure = Arc::new(Failure::default());
    let draining = Arc::new(AtomicBool::new(false));
    let engines_total: usize = models.iter().map(Vec::len).sum();
    // Engines of every model not yet warmed up: the server is ready at zero.
    let warming = Arc::new(AtomicUsize::new(engines_total));
    let stats: Vec<Arc<EngineStats>> = models
        .iter()
        .map(|p| Arc::new(EngineStats::new(p.len(), failure.clone())))
        .collect();
    let admission = Arc::new(Admission::new(config.max_queue, stats.clone()));
    metrics::gauge!("diffit_engines").set(engines_total as f64);
    let mut handles = Vec::with_capacity(models.len());
    let mut threads = Vec::with_capacity(engines_total);
    for (slot, (pipelines, stats)) in models.into_iter().zip(stats).enumerate() {
        let devices: Vec<String> = pipelines.iter().map(|p| p.info.device.clone()).collect();
        let mut info = pipelines[0].info.clone();
        info.device = devices.join(",");
        let name = info.name.clone();
        for gauge in ["diffit_queue_depth", "diffit_active_samples"] {
            metrics::gauge!(gauge, "model" => name.clone()).set(0.0);
        }
        metrics::counter!("diffit_images_generated_total", "model" => name.clone()).absolute(0);
        let queue = Arc::new(JobQueue::default());
        handles.push(EngineHandle {
            submitter: Arc::new(Submitter {
                queue: queue.clone(),
            }),
            stats: stats.clone(),
            admission: admission.clone(),
            slot,
            draining: draining.clone(),
            info: Arc::new(info),
            devices: Arc::new(devices),
        });
        for (index, pipeline) in pipelines.into_iter().enumerate() {
            let ctx = scheduler::EngineContext {
                index,
                model: name.clone(),
                queue: queue.clone(),
                stats: stats.clone(),
                warming: warming.clone(),
            };
            let config = config.clone();
            let label = name.clone();
            let thread = std::thread::Builder::new()
                .name(format!("diffit-engine-{slot}-{index}"))
                .spawn(move || {
                    let stats = ctx.stats.clone();
                    let device = pipeline.info.device.clone();
                    let run =
                        std::panic::AssertUnwindSafe(|| scheduler::run(pipeline, config, ctx));
                    if std::panic::catch_unwind(run).is_err() {
                        stats.report_failure(format!(
                            "model '{label}': engine {index} on {device} panicked"
                        ));
                    }
                })
                .context("cannot spawn an engine thread")?;
            threads.push(thread);
        }
    }
    Ok((handles, Engines { threads }))
}
