//! The engine: one thread owns the model and the device and runs step-level continuous
//! batching over every request in flight. It knows nothing of HTTP: requests arrive as
//! [`Job`]s through an [`EngineHandle`], results leave on each job's event channel.

mod decoder;
mod scheduler;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::pipeline::{ImageSpec, ModelInfo, Pipeline};

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
    /// One finished image: planar u8 pixels and how long its batch took to decode.
    Image {
        index: usize,
        pixels: Vec<u8>,
        denoise: Duration,
        decode: Duration,
    },
    Failed(EngineError),
}

/// A request as the engine sees it: the images to make, a deadline, and where to report.
pub struct Job {
    pub id: String,
    pub specs: Vec<ImageSpec>,
    pub deadline: Instant,
    pub events: mpsc::UnboundedSender<JobEvent>,
    /// Send `Progress` events (only streaming requests want them).
    pub progress: bool,
    pub(crate) enqueued: Instant,
}

impl Job {
    pub fn new(
        id: String,
        specs: Vec<ImageSpec>,
        deadline: Instant,
        progress: bool,
    ) -> (Self, mpsc::UnboundedReceiver<JobEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        let job = Self {
            id,
            specs,
            deadline,
            events,
            progress,
            enqueued: Instant::now(),
        };
        (job, rx)
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error(
        "the queue is full ({queued} images waiting, limit {limit}); retry in {retry_after_secs} s"
    )]
    QueueFull {
        queued: usize,
        limit: usize,
        retry_after_secs: u64,
    },
    #[error("the server is draining and accepts no new work")]
    Draining,
}

/// Counters the HTTP side reads and the engine writes.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Images waiting for a batch slot (the bounded queue, in images).
    pub queued_images: AtomicUsize,
    pub active_samples: AtomicUsize,
    /// Recent throughput in images per second (f64 bits), for Retry-After.
    images_per_sec_bits: AtomicU64,
    pub ready: AtomicBool,
}

impl EngineStats {
    pub fn images_per_sec(&self) -> f64 {
        f64::from_bits(self.images_per_sec_bits.load(Ordering::Relaxed))
    }

    pub(crate) fn set_images_per_sec(&self, v: f64) {
        self.images_per_sec_bits
            .store(v.to_bits(), Ordering::Relaxed);
    }
}

/// The HTTP side's end of the engine: admission control and submission.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::UnboundedSender<Job>,
    stats: Arc<EngineStats>,
    max_queue: usize,
    draining: Arc<AtomicBool>,
    info: Arc<ModelInfo>,
}

impl EngineHandle {
    pub fn info(&self) -> &Arc<ModelInfo> {
        &self.info
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Stop admitting work; what is queued or running still finishes.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Seconds until the queue has room for `n` more images at the current throughput.
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
        let reserved =
            self.stats
                .queued_images
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |q| {
                    (q + n <= self.max_queue).then_some(q + n)
                });
        if let Err(queued) = reserved {
            return Err(SubmitError::QueueFull {
                queued,
                limit: self.max_queue,
                retry_after_secs: self.retry_after_secs(n),
            });
        }
        metrics::gauge!("diffit_queue_depth")
            .set(self.stats.queued_images.load(Ordering::SeqCst) as f64);
        if self.tx.send(job).is_err() {
            self.stats.queued_images.fetch_sub(n, Ordering::SeqCst);
            return Err(SubmitError::Draining);
        }
        Ok(())
    }
}

/// Starts the engine thread around a loaded pipeline. It warms up (one step and one decode)
/// before it reports ready. The thread exits once every handle is dropped and all work is done.
pub fn start(
    pipeline: Pipeline,
    config: EngineConfig,
) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let stats = Arc::new(EngineStats::default());
    let info = Arc::new(pipeline.info.clone());
    let handle = EngineHandle {
        tx,
        stats: stats.clone(),
        max_queue: config.max_queue,
        draining: Arc::new(AtomicBool::new(false)),
        info,
    };
    let thread = std::thread::Builder::new()
        .name("diffit-engine".into())
        .spawn(move || scheduler::run(pipeline, config, rx, stats))
        .expect("spawn engine thread");
    (handle, thread)
}
