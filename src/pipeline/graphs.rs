//! Fixed-shape denoising steps, replayed as CUDA graphs (`--cuda-graphs`).
//!
//! A step is padded to a bucket of network rows (`bucket`): the batch's samples, then the
//! unconditional twins of its guided samples, then padding. Everything a step reads lives in
//! device buffers of the bucket's shape, written before it runs: the latents (one device copy
//! per sample), and one upload of everything else (timestep features, labels, which latent
//! feeds each network row, guidance scales, sampler coefficients, noise). The step itself —
//! the network forward, classifier-free guidance and every sample's sampler update — then
//! reads only those buffers and writes two output buffers, so on a GPU it is captured once per
//! bucket and replayed as one graph launch instead of hundreds of kernel launches.
//!
//! The step computes the same expressions as `diffusion::denoise_step`, row by row; terms a
//! row does not use (guidance of an unguided sample, DPM-Solver++'s previous estimate, noise)
//! are selected away rather than multiplied by zero, so a sample's numbers depend neither on
//! its neighbours nor on the padding (tests below; on the GPU `scripts/gpu-determinism.sh`).
//!
//! Past `PADDED_ROWS_MAX` rows a step whose row count is not itself a bucket runs at its own
//! size, uncaptured (`StepShape::Exact`, the direct step): there the GPU time of a step hides
//! its launches, so a graph saves nothing and padding only adds work. That matters under
//! staggered arrivals: a guided image takes one row while its scale is exactly 1
//! (`Guidance::scale_for_step`), so a full batch of 64 guided images often needs ≈ 122 rows,
//! which bucket 128 would pad back to the cost of 128 (docs/cuda-graphs.md#exact-steps).
//!
//! Graphs are captured lazily, per (model, device, bucket): the first step of a bucket runs
//! uncaptured with candle's host-to-device parameter cache on (so the capture finds every
//! small upload candle makes cached) and is captured right after; later steps of that bucket
//! replay it. Memory allocated inside a graph is graph-owned and freed inside it; CUDA maps
//! it when the graph is uploaded (logged per capture).

use std::collections::HashMap;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::config::Toggle;
use crate::diffusion::guidance::GUIDED_CHANNELS;
use crate::diffusion::sampler::StepRow;
use crate::diffusion::SampleState;
use crate::kernels;
use crate::kernels::graph as capture;
use crate::model::diffit::{timestep_features, TIME_FREQ_DIM};
use crate::model::DiffiT;

/// Network rows a step of `rows` rows is padded to: few shapes (one graph each), and past 8
/// rows at most a third of a padded step is padding.
pub fn bucket(rows: usize) -> usize {
    const BUCKETS: [usize; 12] = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128];
    BUCKETS
        .iter()
        .copied()
        .find(|&b| b >= rows)
        .unwrap_or_else(|| rows.div_ceil(64) * 64)
}

/// Most network rows a step is padded for; a larger step is padded only where its row count is
/// a bucket already (no padding), else it runs at its own size (`step_shape`). At 48 rows a step
/// takes ≈ 20 ms of H200 time against ≈ 4 ms of launches, which the device hides; the next
/// bucket (64) would pad 49 rows by 30 %.
pub const PADDED_ROWS_MAX: usize = 48;

/// How a bucketed or captured step of some number of network rows runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepShape {
    /// Padded to this bucket's buffers (and graph, on a GPU).
    Padded(usize),
    /// At its own size, uncaptured: the direct step (`diffusion::denoise_step`), which gives
    /// every sample the same bits as a padded step does.
    Exact(usize),
}

/// The shape a step of `rows` network rows takes: padded up to `PADDED_ROWS_MAX` rows and
/// wherever `rows` is itself a bucket (a full batch), else exact.
pub fn step_shape(rows: usize) -> StepShape {
    match bucket(rows) {
        b if rows <= PADDED_ROWS_MAX || b == rows => StepShape::Padded(b),
        _ => StepShape::Exact(rows),
    }
}

/// Every bucket a step of 1..=`max_rows` network rows is padded to, ascending: the padded
/// shapes an engine can ever run (`max_rows` = two per image of its largest batch,
/// `Pipeline::warm_buckets`).
pub fn buckets_up_to(max_rows: usize) -> Vec<usize> {
    let mut all: Vec<usize> = (1..=max_rows)
        .filter_map(|rows| match step_shape(rows) {
            StepShape::Padded(b) => Some(b),
            StepShape::Exact(_) => None,
        })
        .collect();
    // Padded buckets never decrease with the rows, so equal ones are neighbours.
    all.dedup();
    all
}

/// The per-row columns of the parameter buffer, each `rows` long. Sample columns are indexed
/// by sample row (0..n the batch's samples), network columns by network row.
mod col {
    /// Sampler coefficients r1, r2, a, b, c, d, log_var_max, log_var_min (sample rows).
    pub const COEFS: usize = 0;
    pub const D: usize = COEFS + 5;
    pub const LOG_VAR_MAX: usize = COEFS + 6;
    pub const LOG_VAR_MIN: usize = COEFS + 7;
    /// 1 where the update adds noise (sample rows).
    pub const NOISE: usize = 8;
    /// 1 where the update uses the previous x0 estimate, d ≠ 0 (sample rows).
    pub const PREV: usize = 9;
    /// 1 for a guided sample (sample rows).
    pub const GUIDED: usize = 10;
    /// Its guidance scale at this step (sample rows).
    pub const SCALE: usize = 11;
    /// The label of each network row (the null class for unconditional twins).
    pub const LABEL: usize = 12;
    /// The sample row whose latent feeds each network row.
    pub const SOURCE: usize = 13;
    /// The network row holding each sample row's unconditional output (itself if unguided).
    pub const UNCOND: usize = 14;
    pub const COUNT: usize = 15;
}

/// How steps run, resolved from `--cuda-graphs` for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepMode {
    /// Today's variable-shape `denoise_step` (graphs off, and the CPU's default).
    Direct,
    /// Padded to buckets, uncaptured: the CPU with graphs on (what the tests check).
    Bucketed,
    /// Padded and captured; `required`: a failed capture is an error, else a warning and
    /// the direct path from then on.
    Captured { required: bool },
}

impl StepMode {
    pub fn resolve(setting: Toggle, device: &Device) -> Self {
        match (setting, device.is_cuda()) {
            (Toggle::Off, _) | (Toggle::Auto, false) => Self::Direct,
            (Toggle::On, false) => Self::Bucketed,
            (Toggle::Auto, true) => Self::Captured { required: false },
            (Toggle::On, true) => Self::Captured { required: true },
        }
    }
}

/// The fixed buffers of one bucket, and its graph once captured.
struct Bucket {
    rows: usize,
    /// Sample latents [rows, C, H, W], f32; rows past the batch hold stale values that only
    /// padding rows read.
    x: Tensor,
    /// DPM-Solver++'s previous x0 estimates, same shape (read only where `col::PREV` is set).
    x0_prev: Tensor,
    /// f32: timestep features [rows·256], then the `col` columns [COUNT·rows], then the noise
    /// [rows·C·H·W]; written by one upload a step.
    params: Tensor,
    /// Outputs: the updated latents and the x0 estimates, [rows, C, H, W].
    next: Tensor,
    x0: Tensor,
    graph: Option<capture::Graph>,
}

impl Bucket {
    fn new(
        rows: usize,
        latent: (usize, usize, usize),
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (c, h, w) = latent;
        let image = || Tensor::zeros((rows, c, h, w), DType::F32, device);
        let params = rows * (TIME_FREQ_DIM + col::COUNT + c * h * w);
        Ok(Self {
            rows,
            x: image()?,
            x0_prev: image()?,
            params: Tensor::zeros(params, DType::F32, device)?,
            next: image()?,
            x0: image()?,
            graph: None,
        })
    }
}

/// The bucketed (and, on a GPU, graph-captured) steps of one model on one device.
pub struct StepGraphs {
    mode: StepMode,
    buckets: HashMap<usize, Bucket>,
}

impl StepGraphs {
    pub fn new(mode: StepMode) -> Self {
        Self {
            mode,
            buckets: HashMap::new(),
        }
    }

    pub fn mode(&self) -> StepMode {
        self.mode
    }

    /// (bucket, graph nodes) of every captured step (for logs and tests).
    pub fn captured(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> = self
            .buckets
            .values()
            .filter_map(|b| Some((b.rows, b.graph.as_ref()?.nodes())))
            .collect();
        v.sort_unstable();
        v
    }

    /// The buckets whose next step runs without first-use work, ascending: captured ones
    /// under `Captured` (each has its graph), every one stepped so far under `Bucketed`, none
    /// under `Direct` (also after a failed capture's fallback).
    pub fn ready_buckets(&self) -> Vec<usize> {
        let mut v: Vec<usize> = self
            .buckets
            .values()
            .filter(|b| match self.mode {
                StepMode::Direct => false,
                StepMode::Bucketed => true,
                StepMode::Captured { .. } => b.graph.is_some(),
            })
            .map(|b| b.rows)
            .collect();
        v.sort_unstable();
        v
    }

    /// Graph memory the device holds for all captured steps (every model's), MiB; None
    /// without CUDA.
    pub fn graph_memory_mib(device: &Device) -> Option<u64> {
        capture::graph_memory_mib(device)
    }

    /// Advances every sample by one step, as `denoise_step` does.
    pub fn step(&mut self, model: &DiffiT, samples: &mut [&mut SampleState]) -> anyhow::Result<()> {
        if samples.is_empty() {
            return Ok(());
        }
        if self.mode == StepMode::Direct {
            return Ok(crate::diffusion::denoise_step(model, samples)?);
        }
        if let Some(s) = samples.iter().find(|s| s.is_done()) {
            anyhow::bail!("sample already finished its {} steps", s.steps_total());
        }
        let n = samples.len();
        // Decided before `step_row`, which draws each sample's noise for the step.
        let guided = samples
            .iter()
            .filter(|s| s.next_step_scale().is_some())
            .count();
        let rows = match step_shape(n + guided) {
            StepShape::Padded(rows) => rows,
            StepShape::Exact(_) => {
                return Ok(kernels::with_borrowed_matmul_algorithms(|| {
                    crate::diffusion::denoise_step(model, samples)
                })?)
            }
        };
        let cfg = model.config();
        let latent = (cfg.in_channels, cfg.input_size, cfg.input_size);
        let learn_sigma = cfg.learn_sigma();
        let steps: Vec<StepRow> = samples
            .iter_mut()
            .map(|s| s.step_row(learn_sigma))
            .collect::<candle_core::Result<_>>()?;
        let device = model.device();
        let b = match self.buckets.entry(rows) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(
                Bucket::new(rows, latent, device)
                    .with_context(|| format!("allocating the buffers of step bucket {rows}"))?,
            ),
        };
        let per_sample = latent.0 * latent.1 * latent.2;
        // One host-to-device copy (from pageable memory, into a fresh buffer), then one
        // device copy into the fixed buffer the graph reads.
        let host = fill_params(&steps, rows, per_sample, cfg.null_class() as i64);
        b.params.slice_set(
            &Tensor::from_vec(host, b.params.elem_count(), device)?,
            0,
            0,
        )?;
        for (i, (s, row)) in samples.iter().zip(&steps).enumerate() {
            b.x.slice_set(s.latent(), 0, i)?;
            if let Some(prev) = &row.x0_prev {
                b.x0_prev.slice_set(prev, 0, i)?;
            }
        }
        drop(steps);

        match (self.mode, b.graph.as_ref()) {
            (_, Some(graph)) => graph.launch()?,
            (StepMode::Captured { required }, None) => {
                // The first step of a bucket: run it with candle's parameter cache on, then
                // capture it for the next ones.
                capture::warm_run(device, || step_body(model, b))?;
                match capture::Graph::capture(device, || step_body(model, b)) {
                    Ok(graph) => {
                        tracing::info!(
                            bucket = rows,
                            nodes = graph.nodes(),
                            graph_memory_mib = capture::graph_memory_mib(device),
                            "captured a CUDA graph of the denoising step"
                        );
                        b.graph = Some(graph);
                    }
                    Err(e) if !required => {
                        tracing::warn!(
                            bucket = rows,
                            error = %format!("{e:#}"),
                            "capturing the denoising step failed; steps run uncaptured from \
                             now on (--cuda-graphs on makes this an error)"
                        );
                        self.mode = StepMode::Direct;
                    }
                    Err(e) => {
                        return Err(
                            e.context(format!("capturing the denoising step (bucket {rows})"))
                        )
                    }
                }
            }
            _ => step_body(model, b)?,
        }

        // While the device runs the step: the next step's noise (DDPM draws C·H·W normals a
        // sample, milliseconds of host time at 64 samples; the old step drew them after
        // enqueueing its forward, overlapping them the same way).
        for s in samples.iter_mut() {
            s.predraw_noise();
        }
        // Fresh copies: the buffers are overwritten by the next step of this bucket.
        let b = &self.buckets[&rows];
        let next = b.next.narrow(0, 0, n)?.copy()?;
        let x0 = match samples.iter().any(|s| s.wants_x0()) {
            true => Some(b.x0.narrow(0, 0, n)?.copy()?),
            false => None,
        };
        for (i, s) in samples.iter_mut().enumerate() {
            let est = match (&x0, s.wants_x0()) {
                (Some(x0), true) => Some(x0.narrow(0, i, 1)?),
                _ => None,
            };
            s.advance(next.narrow(0, i, 1)?, est);
        }
        Ok(())
    }
}

/// The host side of `Bucket::params` for one step: sample rows 0..n are `steps`' samples;
/// network rows 0..n feed them conditionally, n.. the guided ones' unconditional twins (in
/// order), the rest is padding (label 0 of sample 0's latent at timestep 0).
fn fill_params(steps: &[StepRow], rows: usize, per_sample: usize, null: i64) -> Vec<f32> {
    let n = steps.len();
    let mut net_t = vec![0i64; rows];
    let mut cols = vec![0f32; col::COUNT * rows];
    let mut noise = vec![0f32; rows * per_sample];
    let mut set = |c: usize, row: usize, v: f32| cols[c * rows + row] = v;
    let mut twin = n;
    for i in 0..rows {
        set(col::UNCOND, i, i as f32);
    }
    for (i, r) in steps.iter().enumerate() {
        for (k, &v) in r.coefs.iter().enumerate() {
            set(col::COEFS + k, i, v);
        }
        set(col::PREV, i, f32::from(u8::from(r.x0_prev.is_some())));
        set(col::SCALE, i, r.guidance.unwrap_or(1.0));
        net_t[i] = r.timestep;
        set(col::LABEL, i, r.label as f32);
        set(col::SOURCE, i, i as f32);
        if let Some(n_i) = &r.noise {
            set(col::NOISE, i, 1.0);
            noise[i * per_sample..][..per_sample].copy_from_slice(n_i);
        }
        if r.guidance.is_some() {
            set(col::GUIDED, i, 1.0);
            set(col::UNCOND, i, twin as f32);
            net_t[twin] = r.timestep;
            set(col::LABEL, twin, null as f32);
            set(col::SOURCE, twin, i as f32);
            twin += 1;
        }
    }
    let mut host = timestep_features(&net_t);
    host.extend_from_slice(&cols);
    host.extend_from_slice(&noise);
    host
}

/// One step over a bucket's buffers: reads `x`, `x0_prev` and `params`, writes `next` and
/// `x0`. Nothing here reads from the host or waits on the device (it is what gets captured):
/// labels and indices travel as f32 (exact below 2^24) and are cast on the device.
fn step_body(model: &DiffiT, b: &Bucket) -> candle_core::Result<()> {
    let (r, cin) = (b.rows, model.config().in_channels);
    let base = r * TIME_FREQ_DIM;
    let at = |c: usize| base + c * r;
    let index = |c: usize| b.params.narrow(0, at(c), r)?.to_dtype(DType::U32);
    let features = b.params.narrow(0, 0, base)?.reshape((r, TIME_FREQ_DIM))?;

    let net_in = b.x.index_select(&index(col::SOURCE)?, 0)?;
    let out = model
        .forward_features(&net_in, &features, &index(col::LABEL)?)?
        .to_dtype(DType::F32)?;
    // Network rows 0..n are sample rows 0..n; past n a sample row is padding either way.
    // Classifier-free guidance (`guidance::guided_eps`) where the sample is guided, then the
    // sampler update as `denoise_step` writes it: one fused op (kernels::guided_update).
    let columns = kernels::UpdateColumns {
        coefs: std::array::from_fn(|i| at(col::COEFS + i)),
        d: at(col::D),
        log_var_max: at(col::LOG_VAR_MAX),
        log_var_min: at(col::LOG_VAR_MIN),
        noise_weight: at(col::NOISE),
        prev: at(col::PREV),
        guided: at(col::GUIDED),
        scale: at(col::SCALE),
        uncond: at(col::UNCOND),
        noise: at(col::COUNT),
    };
    let spec = kernels::UpdateSpec {
        columns,
        channels: cin,
        learn_sigma: model.config().learn_sigma(),
        guided_channels: GUIDED_CHANNELS.min(cin),
    };
    let both = kernels::guided_update(&out, &b.x, &b.x0_prev, &b.params, spec)?;
    b.next.slice_set(&both.get(0)?, 0, 0)?;
    b.x0.slice_set(&both.get(1)?, 0, 0)
}
