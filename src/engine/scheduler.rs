//! One engine's batching loop. Each iteration: drop queued jobs that are late or abandoned,
//! fill free batch slots from the shared queue (oldest job first, splitting a job that does not
//! fit), drop what is cancelled or late among the samples held, run one denoising step over
//! every active sample, then hand whatever finished to the decode worker.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::decoder::{DecodeWork, Decoder};
use super::preview::LatentPreview;
use super::queue::{JobQueue, Take};
use super::{EngineError, EngineSlot, EngineStats, Job, JobEvent};
use crate::config::WarmupBuckets;
use crate::diffusion::SampleState;
use crate::pipeline::Pipeline;

/// About how many previews an image that asked for them gets over its steps.
pub const PREVIEWS_PER_IMAGE: usize = 10;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most samples (images) one engine denoises together; guided ones cost two network rows.
    pub max_batch: usize,
    /// Most images waiting for a slot, all engines (of every model) together.
    pub max_queue: usize,
    /// Request-level batching: admit only when the batch is empty (for benchmarks).
    pub request_level: bool,
    /// Which step buckets the warm-up prepares (`--warmup-buckets`).
    pub warmup: WarmupBuckets,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 256,
            request_level: false,
            warmup: WarmupBuckets::All,
        }
    }
}

/// Where an engine sits among the others: its index, its model's id, queue and counters, and
/// how many engines of the server (every model's) are still warming up.
pub(super) struct EngineContext {
    pub index: usize,
    pub model: String,
    pub queue: Arc<JobQueue>,
    pub stats: Arc<EngineStats>,
    pub warming: Arc<std::sync::atomic::AtomicUsize>,
}

/// A part of a job while this engine holds it: all of its images are in the batch.
struct Part {
    job: Job,
    /// Batch sizes of the steps this part ran in (for its log line when it finishes).
    batches: BatchSizes,
    /// Images not yet finished.
    in_flight: usize,
    started: Instant,
}

struct Active {
    part: u64,
    /// The image's index within its request.
    index: usize,
    sample: SampleState,
}

struct Scheduler {
    pipe: Pipeline,
    config: EngineConfig,
    ctx: EngineContext,
    /// Labels of this engine's metrics.
    engine_label: String,
    device_label: String,
    parts: HashMap<u64, Part>,
    next_part: u64,
    active: Vec<Active>,
    recent: VecDeque<Instant>,
    decoder: Decoder,
    /// The latent → pixel projection for previews; None if its fit failed (then jobs get no
    /// previews, and nothing else changes).
    preview: Option<LatentPreview>,
}

pub(super) fn run(pipe: Pipeline, config: EngineConfig, ctx: EngineContext) {
    let decoder = Decoder::new(
        pipe.vae.clone(),
        pipe.decode_chunk,
        pipe.info.config.input_size,
    );
    let mut s = Scheduler {
        decoder,
        engine_label: ctx.index.to_string(),
        device_label: pipe.info.device.clone(),
        pipe,
        config,
        ctx,
        parts: HashMap::new(),
        next_part: 0,
        active: Vec::new(),
        recent: VecDeque::new(),
        preview: None,
    };
    let engine = s.ctx.index;
    let device = s.device_label.clone();
    match s.warm_up() {
        Ok(()) => {
            s.slot().ready.store(true, Ordering::SeqCst);
            if s.ctx.warming.fetch_sub(1, Ordering::SeqCst) == 1 {
                // The last engine of the last model: the server is ready.
                metrics::gauge!("diffit_ready").set(1.0);
            }
            tracing::info!(engine, %device, model = %s.ctx.model, "engine ready");
            s.serve();
            s.slot().ready.store(false, Ordering::SeqCst);
        }
        Err(e) => {
            tracing::error!(engine, %device, model = %s.ctx.model, error = %e, "engine warm-up failed");
            s.ctx.stats.report_failure(format!(
                "model '{}': engine {engine} on {device} could not start: warm-up failed: {e:#}",
                s.ctx.model
            ));
        }
    }
    let Scheduler {
        decoder, ctx, pipe, ..
    } = s;
    decoder.finish();
    drop(pipe);
    if ctx.stats.alive.fetch_sub(1, Ordering::SeqCst) == 1 {
        // The last engine: nothing will ever run what is still queued.
        for job in ctx.queue.close_and_take_all() {
            ctx.stats
                .queued_images
                .fetch_sub(job.specs.len(), Ordering::SeqCst);
            if job.shared.end() {
                let _ = job.events.send(JobEvent::Failed(EngineError::ShuttingDown));
            }
        }
        metrics::gauge!("diffit_queue_depth", "model" => ctx.model.clone()).set(0.0);
    }
    tracing::info!(engine, %device, model = %ctx.model, "engine stopped");
}

impl Scheduler {
    fn slot(&self) -> &EngineSlot {
        &self.ctx.stats.engines[self.ctx.index]
    }

    fn warm_up(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        let d = self.pipe.info.defaults;
        let spec = crate::pipeline::ImageSpec {
            label: 0,
            seed: 0,
            steps: 2,
            sampler: d.sampler,
            guidance: crate::diffusion::Guidance::new(
                if d.guidance_scale == 1.0 {
                    2.0
                } else {
                    d.guidance_scale
                },
                d.guidance_schedule,
            )?,
        };
        let mut s = self.pipe.new_sample(&spec)?;
        // Both steps: that also captures the one-image steps' graphs (`pipeline::graphs`), where
        // graphs are on — one row at t = 999 where the schedule's scale is still 1 there
        // (`Guidance::scale_for_step`), two rows (guided) at t = 0.
        while !s.is_done() {
            self.pipe.step(&mut [&mut s])?;
        }
        self.warm_buckets()?;
        self.pipe.decode(s.latent())?;
        self.warm_decode_passes(s.latent())?;
        let cfg = &self.pipe.info.config;
        let latent = (cfg.in_channels, cfg.input_size, cfg.input_size);
        let fit_start = Instant::now();
        match LatentPreview::fit(&self.pipe.vae, latent, self.pipe.device()) {
            Ok(p) => {
                tracing::debug!(engine = self.ctx.index, elapsed = ?fit_start.elapsed(), "preview projection fitted");
                self.preview = Some(p);
            }
            Err(e) => {
                tracing::warn!(engine = self.ctx.index, error = %e, "no live previews: fitting the projection failed")
            }
        }
        tracing::info!(engine = self.ctx.index, elapsed = ?start.elapsed(), "warm-up done");
        Ok(())
    }

    /// Under `--warmup-buckets all`, decodes once at every batch size a decode chunk can hand
    /// the VAE (2 up to `--decode-chunk`; 1 above), so that where the VAE captures its passes
    /// as CUDA graphs (`VaeDecoder`, one per latent shape) no request pays a capture.
    fn warm_decode_passes(&self, latent: &candle_core::Tensor) -> anyhow::Result<()> {
        if !matches!(self.config.warmup, WarmupBuckets::All) || !self.pipe.vae.captures_passes() {
            return Ok(());
        }
        let start = Instant::now();
        for n in 2..=self.pipe.decode_chunk {
            self.pipe
                .decode(&candle_core::Tensor::cat(&vec![latent; n], 0)?)?;
        }
        tracing::info!(
            engine = self.ctx.index,
            sizes = self.pipe.decode_chunk,
            elapsed = ?start.elapsed(),
            graph_memory_mib = crate::kernels::graph::graph_memory_mib(self.pipe.device()),
            "decode passes ready"
        );
        Ok(())
    }

    /// Prepares the step buckets `--warmup-buckets` asks for (none more than one image's under
    /// `minimal`, which the steps above took) and logs which are ready; nothing where steps
    /// are not bucketed.
    fn warm_buckets(&self) -> anyhow::Result<()> {
        let engine = self.ctx.index;
        let list = |b: &[usize]| b.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        match self.config.warmup {
            WarmupBuckets::All => {
                if let Some(w) = self.pipe.warm_buckets(self.config.max_batch)? {
                    tracing::info!(
                        engine,
                        warmup = "all",
                        buckets = %list(&w.buckets),
                        count = w.buckets.len(),
                        stepped = w.stepped,
                        elapsed = ?w.elapsed,
                        graph_memory_mib = w.graph_memory_mib,
                        "step buckets ready"
                    );
                }
            }
            WarmupBuckets::Minimal => {
                let ready = self.pipe.ready_buckets();
                if !ready.is_empty() {
                    tracing::info!(
                        engine,
                        warmup = "minimal",
                        buckets = %list(&ready),
                        count = ready.len(),
                        "step buckets ready (a batch needing another pays its first step)"
                    );
                }
            }
        }
        Ok(())
    }

    /// The loop, until the queue is closed and everything taken from it is done.
    fn serve(&mut self) {
        loop {
            self.sweep_queue();
            if !self.fill() && self.active.is_empty() {
                return;
            }
            self.reap();
            if self.active.is_empty() {
                continue;
            }
            if let Err(e) = self.step() {
                tracing::error!(engine = self.ctx.index, error = %e, "denoising step failed");
                self.fail_active(EngineError::Internal(e.to_string()));
            }
        }
    }

    /// Takes work from the shared queue into free slots; blocks only while this engine has
    /// nothing to do. False once the queue is closed and empty. Request-level batching admits
    /// only into an empty batch, but then fills it as far as the queue allows.
    fn fill(&mut self) -> bool {
        let admitting = !self.config.request_level || self.active.is_empty();
        loop {
            let room = match admitting {
                true => self.config.max_batch.saturating_sub(self.active.len()),
                false => 0,
            };
            if room == 0 {
                return true;
            }
            match self.ctx.queue.take(room, self.active.is_empty()) {
                Take::Part(part) => self.admit(part),
                Take::Empty => return true,
                Take::Closed => return false,
            }
        }
    }

    fn set_gauges(&self) {
        self.slot()
            .active
            .store(self.active.len(), Ordering::SeqCst);
        let model = self.ctx.model.clone();
        metrics::gauge!("diffit_queue_depth", "model" => model.clone())
            .set(self.ctx.stats.queued_images.load(Ordering::SeqCst) as f64);
        metrics::gauge!("diffit_active_samples", "model" => model)
            .set(self.ctx.stats.active_samples() as f64);
    }

    /// Reports why a job of `model` ended (once, whichever engine or part notices first).
    fn report_end(job: &Job, reason: &'static str, model: &str) {
        if !job.shared.end() {
            return;
        }
        tracing::info!(job = %job.id, reason, "job ended early");
        metrics::counter!("diffit_rejections_total", "reason" => reason, "model" => model.to_string())
            .increment(1);
        if reason == "deadline" {
            let _ = job.events.send(JobEvent::Failed(EngineError::Deadline));
        }
    }

    /// Drops queued jobs that ended elsewhere, passed their deadline or lost their client.
    fn sweep_queue(&mut self) {
        let now = Instant::now();
        let gone = self
            .ctx
            .queue
            .remove_where(|j| j.shared.is_ended() || j.end_reason(now).is_some());
        if gone.is_empty() {
            return;
        }
        // Count and free first: the client may look at the metrics as soon as it hears.
        for job in &gone {
            self.ctx
                .stats
                .queued_images
                .fetch_sub(job.specs.len(), Ordering::SeqCst);
        }
        self.set_gauges();
        for job in &gone {
            if let Some(reason) = job.end_reason(now) {
                Self::report_end(job, reason, &self.ctx.model);
            }
        }
    }

    /// Ends the parts whose job ended elsewhere, passed its deadline or lost its client,
    /// freeing their samples.
    fn reap(&mut self) {
        let now = Instant::now();
        let ended: Vec<(u64, Option<&'static str>)> = self
            .parts
            .iter()
            .filter_map(|(&id, p)| {
                let reason = p.job.end_reason(now);
                (p.job.shared.is_ended() || reason.is_some()).then_some((id, reason))
            })
            .collect();
        if ended.is_empty() {
            return;
        }
        let mut removed = Vec::with_capacity(ended.len());
        for (id, reason) in ended {
            self.active.retain(|a| a.part != id);
            if let Some(part) = self.parts.remove(&id) {
                removed.push((part, reason));
            }
        }
        self.set_gauges();
        for (part, reason) in removed {
            if let Some(reason) = reason {
                tracing::info!(job = %part.job.id, freed = part.in_flight, "samples freed");
                Self::report_end(&part.job, reason, &self.ctx.model);
            }
        }
    }

    /// Puts every image of a part taken from the queue into the batch.
    fn admit(&mut self, job: Job) {
        let n = job.specs.len();
        self.ctx.stats.queued_images.fetch_sub(n, Ordering::SeqCst);
        let samples: anyhow::Result<Vec<SampleState>> = job
            .specs
            .iter()
            .map(|s| {
                let mut sample = self.pipe.new_sample(s)?;
                if job.previews && self.preview.is_some() {
                    sample.keep_estimate();
                }
                Ok(sample)
            })
            .collect();
        let samples = match samples {
            Ok(s) => s,
            Err(e) => {
                if job.shared.end() {
                    let _ = job
                        .events
                        .send(JobEvent::Failed(EngineError::Internal(e.to_string())));
                }
                self.set_gauges();
                return;
            }
        };
        let now = Instant::now();
        job.shared.span.in_scope(|| {
            tracing::info!(
                engine = self.ctx.index,
                images = n,
                queue_wait_ms = (now - job.enqueued).as_millis() as u64,
                batch_before = self.active.len(),
                "admitted to a batch"
            )
        });
        if job.shared.start() {
            let wait = now - job.enqueued;
            metrics::histogram!("diffit_queue_wait_seconds", "model" => self.ctx.model.clone())
                .record(wait.as_secs_f64());
            let _ = job.events.send(JobEvent::Started { queue_wait: wait });
        }
        let id = self.next_part;
        self.next_part += 1;
        for (k, sample) in samples.into_iter().enumerate() {
            self.active.push(Active {
                part: id,
                index: job.first_index + k,
                sample,
            });
        }
        self.parts.insert(
            id,
            Part {
                job,
                batches: BatchSizes::default(),
                in_flight: n,
                started: now,
            },
        );
        self.set_gauges();
    }

    fn step(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let batch = self.active.len();
        // One span per step, following from every job in it (TGI-style): a trace viewer links
        // a request to the batches it joined; the jobs' own logs get the batch size at DEBUG.
        let step_span = tracing::debug_span!("step", engine = self.ctx.index, batch);
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        for part in self.parts.values_mut() {
            part.batches.record(batch);
            if debug {
                step_span.follows_from(&part.job.shared.span);
                part.job.shared.span.in_scope(|| {
                    tracing::debug!(engine = self.ctx.index, batch, "step");
                });
            }
        }
        step_span.in_scope(|| {
            let mut refs: Vec<&mut SampleState> =
                self.active.iter_mut().map(|a| &mut a.sample).collect();
            self.pipe.step(&mut refs)
        })?;
        let labels = [
            ("engine", self.engine_label.clone()),
            ("device", self.device_label.clone()),
            ("model", self.ctx.model.clone()),
        ];
        metrics::histogram!("diffit_batch_size", &labels).record(batch as f64);
        metrics::histogram!("diffit_step_duration_seconds", &labels)
            .record(started.elapsed().as_secs_f64());
        self.report_progress();
        self.send_previews();

        let (done, running): (Vec<Active>, Vec<Active>) = std::mem::take(&mut self.active)
            .into_iter()
            .partition(|a| a.sample.is_done());
        self.active = running;
        if !done.is_empty() {
            self.finish(done)?;
        }
        self.set_gauges();
        Ok(())
    }

    /// Streams each job's progress as the step count of its slowest image, once every image
    /// of the job is in a batch (on this engine or another).
    fn report_progress(&self) {
        for a in &self.active {
            let Some(part) = self.parts.get(&a.part) else {
                continue;
            };
            if !part.job.progress {
                continue;
            }
            if let Some(step) = part
                .job
                .shared
                .record_progress(a.index, a.sample.steps_done())
            {
                let total = a.sample.steps_total();
                let _ = part.job.events.send(JobEvent::Progress { step, total });
            }
        }
    }

    /// Sends a preview of every image that asked for them and reached a preview step
    /// (`PREVIEWS_PER_IMAGE` spread over its steps; none after the last, whose image follows).
    fn send_previews(&self) {
        let Some(projection) = &self.preview else {
            return;
        };
        let started = Instant::now();
        // (job, image index, step, total, estimate) of every image at a preview step.
        let due: Vec<_> = self
            .active
            .iter()
            .filter_map(|a| {
                let part = self.parts.get(&a.part)?;
                let (step, total) = (a.sample.steps_done(), a.sample.steps_total());
                let every = total.div_ceil(PREVIEWS_PER_IMAGE).max(1);
                let due = part.job.previews && step % every == 0 && step < total;
                let estimate = a.sample.estimate().filter(|_| due)?;
                Some((&part.job, a.index, step, total, estimate))
            })
            .collect();
        if due.is_empty() {
            return;
        }
        let latents: Vec<&candle_core::Tensor> = due.iter().map(|d| d.4).collect();
        match projection.render_many(&latents) {
            Ok(images) => {
                for ((job, index, step, total, _), image) in due.iter().zip(images) {
                    let _ = job.events.send(JobEvent::Preview {
                        index: *index,
                        step: *step,
                        total: *total,
                        image,
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "previews failed"),
        }
        metrics::histogram!("diffit_preview_duration_seconds", "model" => self.ctx.model.clone())
            .record(started.elapsed().as_secs_f64());
    }

    /// Hands finished latents to the decode worker; a part leaves the engine once all of its
    /// images have been handed over.
    fn finish(&mut self, done: Vec<Active>) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut work = Vec::with_capacity(done.len());
        for a in done {
            let Some(part) = self.parts.get_mut(&a.part) else {
                continue;
            };
            part.in_flight -= 1;
            work.push(DecodeWork {
                latent: a.sample.latent().clone(),
                index: a.index,
                denoise: now - part.started,
                events: part.job.events.clone(),
                model: self.ctx.model.clone(),
            });
            self.recent.push_back(now);
            if part.in_flight == 0 {
                let b = &part.batches;
                part.job.shared.span.in_scope(|| {
                    tracing::info!(
                        engine = self.ctx.index,
                        steps = b.steps,
                        batch_min = b.min,
                        batch_max = b.max,
                        batch_mean = format_args!("{:.1}", b.mean()),
                        denoise_ms = (now - part.started).as_millis() as u64,
                        "denoised"
                    )
                });
                self.parts.remove(&a.part);
            }
        }
        self.slot()
            .images_done
            .fetch_add(work.len() as u64, Ordering::Relaxed);
        self.decoder.submit(work)?;
        self.update_throughput(now);
        Ok(())
    }

    fn update_throughput(&mut self, now: Instant) {
        const WINDOW: Duration = Duration::from_secs(30);
        while self.recent.front().is_some_and(|t| now - *t > WINDOW) {
            self.recent.pop_front();
        }
        if let Some(first) = self.recent.front() {
            let span = (now - *first).as_secs_f64().max(1.0);
            let rate = self.recent.len() as f64 / span;
            self.slot().set_images_per_sec(rate);
        }
    }

    /// A step failed: every job with a sample on this engine fails (its parts elsewhere and
    /// in the queue are dropped too).
    fn fail_active(&mut self, err: EngineError) {
        let ids: std::collections::BTreeSet<u64> = self.active.iter().map(|a| a.part).collect();
        self.active.clear();
        for id in ids {
            if let Some(part) = self.parts.remove(&id) {
                if part.job.shared.end() {
                    let _ = part.job.events.send(JobEvent::Failed(err.clone()));
                }
            }
        }
        self.set_gauges();
    }
}

/// The batch sizes of the steps a part ran in.
#[derive(Debug, Default)]
struct BatchSizes {
    steps: usize,
    min: usize,
    max: usize,
    sum: usize,
}

impl BatchSizes {
    fn record(&mut self, batch: usize) {
        self.min = if self.steps == 0 {
            batch
        } else {
            self.min.min(batch)
        };
        self.max = self.max.max(batch);
        self.sum += batch;
        self.steps += 1;
    }

    fn mean(&self) -> f64 {
        self.sum as f64 / self.steps.max(1) as f64
    }
}
