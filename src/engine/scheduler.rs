//! The batching loop. Each iteration: take new jobs, drop what is cancelled or late, fill
//! free batch slots from the queue (FIFO), run one denoising step over every active sample,
//! then hand whatever finished to the decode worker.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::decoder::{DecodeWork, Decoder};
use super::{EngineError, EngineStats, Job, JobEvent};
use crate::diffusion::{denoise_step, SampleState};
use crate::pipeline::Pipeline;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most samples (images) denoised together; guided ones cost two network rows.
    pub max_batch: usize,
    /// Most images waiting for a slot.
    pub max_queue: usize,
    /// Request-level batching: admit only when the batch is empty (for benchmarks).
    pub request_level: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_queue: 256,
            request_level: false,
        }
    }
}

/// A job while the engine holds it.
struct JobState {
    job: Job,
    /// Index of the next image to admit.
    next_image: usize,
    /// Images admitted and not yet finished.
    in_flight: usize,
    started: Option<Instant>,
    last_progress: usize,
}

impl JobState {
    fn waiting(&self) -> usize {
        self.job.specs.len() - self.next_image
    }

    fn abandoned(&self) -> bool {
        self.job.events.is_closed()
    }
}

struct Active {
    job: usize,
    index: usize,
    sample: SampleState,
}

struct Scheduler {
    pipe: Pipeline,
    config: EngineConfig,
    stats: Arc<EngineStats>,
    /// Jobs in arrival order; a slot is `None` once the job is finished.
    jobs: VecDeque<Option<JobState>>,
    /// Indices into `jobs` still holding images to admit, FIFO.
    queue: VecDeque<usize>,
    active: Vec<Active>,
    recent: VecDeque<(Instant, usize)>,
    decoder: Decoder,
}

pub(super) fn run(
    pipe: Pipeline,
    config: EngineConfig,
    mut rx: mpsc::UnboundedReceiver<Job>,
    stats: Arc<EngineStats>,
) {
    let decoder = Decoder::new(pipe.vae.clone(), pipe.decode_chunk);
    let mut s = Scheduler {
        decoder,
        pipe,
        config,
        stats,
        jobs: VecDeque::new(),
        queue: VecDeque::new(),
        active: Vec::new(),
        recent: VecDeque::new(),
    };
    if let Err(e) = s.warm_up() {
        tracing::error!(error = %e, "engine warm-up failed");
        s.decoder.finish();
        return;
    }
    s.stats.ready.store(true, Ordering::SeqCst);
    metrics::gauge!("diffit_ready").set(1.0);
    tracing::info!("engine ready");
    loop {
        // Block only when there is nothing to do.
        if s.active.is_empty() && s.queue.is_empty() {
            match rx.blocking_recv() {
                Some(job) => s.accept(job),
                None => break,
            }
        }
        while let Ok(job) = rx.try_recv() {
            s.accept(job);
        }
        s.reap();
        s.admit();
        if s.active.is_empty() {
            continue;
        }
        if let Err(e) = s.step() {
            tracing::error!(error = %e, "denoising step failed");
            s.fail_active(EngineError::Internal(e.to_string()));
        }
    }
    s.stats.ready.store(false, Ordering::SeqCst);
    s.decoder.finish();
    tracing::info!("engine stopped");
}

impl Scheduler {
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
        denoise_step(&self.pipe.diffit, &mut [&mut s])?;
        self.pipe.decode(s.latent())?;
        tracing::info!(elapsed = ?start.elapsed(), "warm-up done");
        Ok(())
    }

    fn accept(&mut self, job: Job) {
        self.jobs.push_back(Some(JobState {
            job,
            next_image: 0,
            in_flight: 0,
            started: None,
            last_progress: 0,
        }));
        self.queue.push_back(self.jobs.len() - 1);
    }

    fn set_gauges(&self) {
        metrics::gauge!("diffit_queue_depth")
            .set(self.stats.queued_images.load(Ordering::SeqCst) as f64);
        metrics::gauge!("diffit_active_samples").set(self.active.len() as f64);
        self.stats
            .active_samples
            .store(self.active.len(), Ordering::SeqCst);
    }

    /// Ends jobs whose client went away or whose deadline passed, freeing their samples.
    fn reap(&mut self) {
        let now = Instant::now();
        for j in 0..self.jobs.len() {
            let Some(state) = &self.jobs[j] else { continue };
            let reason = if now >= state.job.deadline {
                "deadline"
            } else if state.abandoned() {
                "disconnected"
            } else {
                continue;
            };
            let freed = state.in_flight;
            let waiting = state.waiting();
            tracing::info!(job = %state.job.id, reason, freed, waiting, "job ended early");
            // Count and free first: the client may look at the metrics as soon as it hears.
            metrics::counter!("diffit_rejections_total", "reason" => reason).increment(1);
            self.stats
                .queued_images
                .fetch_sub(waiting, Ordering::SeqCst);
            self.active.retain(|a| a.job != j);
            self.queue.retain(|&q| q != j);
            self.set_gauges();
            if reason == "deadline" {
                let _ = state
                    .job
                    .events
                    .send(JobEvent::Failed(EngineError::Deadline));
            }
            self.jobs[j] = None;
        }
        self.compact();
        self.set_gauges();
    }

    /// Fills free batch slots, oldest job first; a job of n images may be admitted in parts.
    fn admit(&mut self) {
        if self.config.request_level && !self.active.is_empty() {
            return;
        }
        while self.active.len() < self.config.max_batch {
            let Some(&j) = self.queue.front() else { break };
            let state = self.jobs[j].as_mut().expect("queued job exists");
            let index = state.next_image;
            let spec = state.job.specs[index];
            match self.pipe.new_sample(&spec) {
                Ok(sample) => {
                    if state.started.is_none() {
                        let now = Instant::now();
                        let wait = now - state.job.enqueued;
                        state.started = Some(now);
                        metrics::histogram!("diffit_queue_wait_seconds").record(wait.as_secs_f64());
                        let _ = state
                            .job
                            .events
                            .send(JobEvent::Started { queue_wait: wait });
                    }
                    state.next_image += 1;
                    state.in_flight += 1;
                    self.active.push(Active {
                        job: j,
                        index,
                        sample,
                    });
                }
                Err(e) => {
                    let _ = state
                        .job
                        .events
                        .send(JobEvent::Failed(EngineError::Internal(e.to_string())));
                    let waiting = state.waiting();
                    self.stats
                        .queued_images
                        .fetch_sub(waiting, Ordering::SeqCst);
                    self.active.retain(|a| a.job != j);
                    self.jobs[j] = None;
                    self.queue.pop_front();
                    continue;
                }
            }
            self.stats.queued_images.fetch_sub(1, Ordering::SeqCst);
            if self.jobs[j].as_ref().is_some_and(|s| s.waiting() == 0) {
                self.queue.pop_front();
            }
        }
        self.set_gauges();
    }

    fn step(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        let batch = self.active.len();
        {
            let mut refs: Vec<&mut SampleState> =
                self.active.iter_mut().map(|a| &mut a.sample).collect();
            denoise_step(&self.pipe.diffit, &mut refs)?;
        }
        metrics::histogram!("diffit_batch_size").record(batch as f64);
        metrics::histogram!("diffit_step_duration_seconds").record(started.elapsed().as_secs_f64());
        self.report_progress();

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

    /// Streams each job's progress as the step count of its slowest sample, once all of its
    /// images are in the batch.
    fn report_progress(&mut self) {
        let mut slowest: std::collections::HashMap<usize, (usize, usize)> = Default::default();
        for a in &self.active {
            let e = slowest
                .entry(a.job)
                .or_insert((usize::MAX, a.sample.steps_total()));
            e.0 = e.0.min(a.sample.steps_done());
            e.1 = e.1.max(a.sample.steps_total());
        }
        for (j, (step, total)) in slowest {
            if let Some(state) = self.jobs[j].as_mut() {
                if state.job.progress && state.waiting() == 0 && step > state.last_progress {
                    state.last_progress = step;
                    let _ = state.job.events.send(JobEvent::Progress { step, total });
                }
            }
        }
    }

    /// Hands finished latents to the decode worker; a job leaves the engine once all of its
    /// images have been handed over.
    fn finish(&mut self, done: Vec<Active>) -> anyhow::Result<()> {
        let now = Instant::now();
        let mut work = Vec::with_capacity(done.len());
        for a in done {
            let Some(state) = self.jobs[a.job].as_mut() else {
                continue;
            };
            state.in_flight -= 1;
            work.push(DecodeWork {
                latent: a.sample.latent().clone(),
                index: a.index,
                denoise: state.started.map(|s| now - s).unwrap_or_default(),
                events: state.job.events.clone(),
            });
            self.recent.push_back((now, 1));
            if state.in_flight == 0 && state.waiting() == 0 {
                self.jobs[a.job] = None;
            }
        }
        self.decoder.submit(work)?;
        self.update_throughput(now);
        self.compact();
        Ok(())
    }

    fn update_throughput(&mut self, now: Instant) {
        const WINDOW: Duration = Duration::from_secs(30);
        while self.recent.front().is_some_and(|(t, _)| now - *t > WINDOW) {
            self.recent.pop_front();
        }
        if let Some((first, _)) = self.recent.front() {
            let images: usize = self.recent.iter().map(|(_, n)| n).sum();
            let span = (now - *first).as_secs_f64().max(1.0);
            self.stats.set_images_per_sec(images as f64 / span);
        }
    }

    fn fail_active(&mut self, err: EngineError) {
        let jobs: std::collections::BTreeSet<usize> = self.active.iter().map(|a| a.job).collect();
        for j in jobs {
            if let Some(state) = self.jobs[j].take() {
                let _ = state.job.events.send(JobEvent::Failed(err.clone()));
                self.stats
                    .queued_images
                    .fetch_sub(state.waiting(), Ordering::SeqCst);
            }
        }
        self.active.clear();
        self.queue.retain(|&q| self.jobs[q].is_some());
        self.set_gauges();
    }

    /// Drops finished job slots from the front so indices stay small over a long run.
    fn compact(&mut self) {
        let mut shift = 0;
        while self.jobs.front().is_some_and(Option::is_none) {
            self.jobs.pop_front();
            shift += 1;
        }
        if shift > 0 {
            for a in &mut self.active {
                a.job -= shift;
            }
            for q in &mut self.queue {
                *q -= shift;
            }
        }
    }
}
