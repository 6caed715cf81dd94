//! Preparing every step bucket an engine can meet before it serves (`--warmup-buckets all`).
//!
//! With `--cuda-graphs`, a step of R network rows runs padded to `bucket(R)` rows where
//! `graphs::step_shape` pads it (up to 48 rows, or R a bucket; larger steps run at their own
//! size with borrowed matmul algorithms and need nothing prepared), and the first step at a
//! bucket costs an uncaptured run (where the cuBLASLt autotuner times every new matmul shape),
//! then a capture and an upload (`graphs`). The warm-up pays that before the engine
//! reports ready, for every bucket a batch can land in. A batch holds 1..=max_batch images and
//! an image takes one network row at a step (unguided, or guided where the step's scale is 1)
//! or two (guided), so a step takes R rows for every R in 1..=2·max_batch and no other: R rows
//! are ⌈R/2⌉ images, ⌊R/2⌋ of them guided. Each bucket is stepped by such images through
//! `Pipeline::step`, the path serving takes, so what is tuned and captured is what requests
//! replay.

use std::time::{Duration, Instant};

use anyhow::Context;

use super::graphs::{buckets_up_to, StepGraphs, StepMode};
use super::{ImageSpec, Pipeline};
use crate::diffusion::{Guidance, GuidanceSchedule, SamplerKind};

/// Steps of each warm-up image: the first prepares its bucket (uncaptured run, capture), the
/// second replays it, so a replay that fails shows at start-up rather than in a request.
const WARM_STEPS: usize = 2;

/// What a bucket warm-up left ready.
#[derive(Debug, Clone)]
pub struct BucketWarmup {
    /// Every bucket ready afterwards, ascending: all that the engine's batches can need.
    pub buckets: Vec<usize>,
    /// How many of them this warm-up stepped (the others were ready before it).
    pub stepped: usize,
    pub elapsed: Duration,
    /// The device's graph memory afterwards, all graphs (None without CUDA).
    pub graph_memory_mib: Option<u64>,
}

/// Most network rows one step of up to `max_batch` images takes: two a guided image.
pub fn max_step_rows(max_batch: usize) -> usize {
    2 * max_batch
}

/// Images whose steps take exactly `rows` network rows each: ⌈rows/2⌉ images, the first
/// ⌊rows/2⌋ guided at a constant scale (two rows at every timestep,
/// `Guidance::scale_for_step`), the others unguided (one row). Label 0, seeds 0, 1, …
pub fn specs_for_rows(rows: usize, sampler: SamplerKind) -> anyhow::Result<Vec<ImageSpec>> {
    let guided = Guidance::new(2.0, GuidanceSchedule::Constant)?;
    Ok((0..rows.div_ceil(2))
        .map(|i| ImageSpec {
            label: 0,
            seed: i as u64,
            steps: WARM_STEPS,
            sampler,
            guidance: match i < rows / 2 {
                true => guided,
                false => Guidance::none(),
            },
        })
        .collect())
}

impl Pipeline {
    /// Steps every bucket a batch of up to `max_batch` images can need and that is not ready
    /// yet, then checks that all are. None where steps are not bucketed (`StepMode::Direct`,
    /// also after a failed capture under `--cuda-graphs auto` fell back to it).
    pub fn warm_buckets(&self, max_batch: usize) -> anyhow::Result<Option<BucketWarmup>> {
        let start = Instant::now();
        let max_rows = max_step_rows(max_batch);
        let wanted = buckets_up_to(max_rows);
        let mut stepped = 0;
        for &b in &wanted {
            if self.step_mode() == StepMode::Direct {
                return Ok(None);
            }
            if self.ready_buckets().contains(&b) {
                continue;
            }
            // The largest row count of the bucket that a batch can have: a full bucket, or the
            // last one's 2·max_batch rows (`bucket` of either is `b`).
            let specs = specs_for_rows(b.min(max_rows), self.info.defaults.sampler)?;
            let mut samples = specs
                .iter()
                .map(|s| self.new_sample(s))
                .collect::<anyhow::Result<Vec<_>>>()?;
            self.run_to_end(&mut samples, |_| {})
                .with_context(|| format!("warming up step bucket {b}"))?;
            stepped += 1;
        }
        if self.step_mode() == StepMode::Direct {
            return Ok(None);
        }
        let buckets = self.ready_buckets();
        let missing: Vec<usize> = wanted
            .into_iter()
            .filter(|b| !buckets.contains(b))
            .collect();
        anyhow::ensure!(
            missing.is_empty(),
            "the warm-up left step buckets {missing:?} unprepared (ready: {buckets:?})"
        );
        Ok(Some(BucketWarmup {
            buckets,
            stepped,
            elapsed: start.elapsed(),
            graph_memory_mib: StepGraphs::graph_memory_mib(self.device()),
        }))
    }
}
