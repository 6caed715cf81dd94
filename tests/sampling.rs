//! Sampler behaviour beyond the reference run: every sampler's math on an analytic
//! denoiser, and batch independence on the real network.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture, rel_err, tiny_pipeline_with};
use diffit_server::config::{KernelOptions, Toggle};
use diffit_server::diffusion::{
    denoise_step, Denoiser, Guidance, GuidanceSchedule, SampleState, SamplerKind, Schedule,
    SeededNoise,
};
use diffit_server::model::{DiffiT, WeightsFile};
use diffit_server::pipeline::graphs::{bucket, step_shape, StepShape, PADDED_ROWS_MAX};
use diffit_server::pipeline::{specs_for_rows, ImageSpec, Pipeline, StepGraphs, StepMode};

/// The exact ε-predictor for data that is a single point x*: ε = (x − √ᾱ·x*)/√(1 − ᾱ).
/// Every correct sampler must land on x* (the last step has no noise).
struct PointDenoiser {
    target: Tensor,
    base_alphas_cumprod: Vec<f64>,
    device: Device,
}

impl Denoiser for PointDenoiser {
    fn predict(&self, x: &Tensor, t: &[i64], _y: &[i64]) -> candle_core::Result<Tensor> {
        let rows = (0..x.dim(0)?)
            .map(|i| {
                let ac = self.base_alphas_cumprod[t[i] as usize];
                let xi = x.narrow(0, i, 1)?;
                (xi - (&self.target * ac.sqrt())?)? / (1.0 - ac).sqrt()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }
    fn in_channels(&self) -> usize {
        4
    }
    fn learn_sigma(&self) -> bool {
        false
    }
    fn null_class(&self) -> i64 {
        10
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

#[test]
fn every_sampler_recovers_a_point_distribution() {
    let device = Device::Cpu;
    let target = Tensor::arange(0f32, 16.0, &device)
        .unwrap()
        .reshape((1, 4, 2, 2))
        .unwrap();
    let target = ((target / 8.0).unwrap() - 1.0).unwrap();
    let den = PointDenoiser {
        target: target.clone(),
        base_alphas_cumprod: Schedule::new(1000).unwrap().alphas_cumprod,
        device: device.clone(),
    };
    let guided = Guidance::new(3.0, GuidanceSchedule::Constant).unwrap();
    // One mixed batch: each sampler, guided and not, with different step counts.
    let mut samples: Vec<SampleState> = Vec::new();
    for (i, kind) in SamplerKind::ALL.into_iter().enumerate() {
        for (j, g) in [Guidance::none(), guided].into_iter().enumerate() {
            let steps = 10 + 7 * i + 3 * j;
            samples.push(
                SampleState::new(
                    1,
                    kind,
                    g,
                    Arc::new(Schedule::new(steps).unwrap()),
                    Box::new(SeededNoise::new((i * 2 + j) as u64)),
                    (4, 2, 2),
                    &device,
                )
                .unwrap(),
            );
        }
    }
    while samples.iter().any(|s| !s.is_done()) {
        let mut active: Vec<&mut SampleState> =
            samples.iter_mut().filter(|s| !s.is_done()).collect();
        denoise_step(&den, &mut active).unwrap();
    }
    for s in &samples {
        let e = rel_err(s.latent(), &target);
        assert!(
            e < 1e-4,
            "{} guided={} ended {e} away from x*",
            s.sampler(),
            s.guidance().is_guided()
        );
    }
}

fn tiny() -> DiffiT {
    let f = WeightsFile::open(fixture("diffit_tiny_model.safetensors")).unwrap();
    DiffiT::load(&f, DType::F32, &Device::Cpu, &KernelOptions::default()).unwrap()
}

fn sample(label: i64, kind: SamplerKind, steps: usize, scale: f32, seed: u64) -> SampleState {
    SampleState::new(
        label,
        kind,
        Guidance::new(scale, GuidanceSchedule::PowerCosine).unwrap(),
        Arc::new(Schedule::new(steps).unwrap()),
        Box::new(SeededNoise::new(seed)),
        (4, 8, 8),
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn a_sample_does_not_depend_on_its_batch_mates() {
    let model = tiny();
    let mut alone = sample(4, SamplerKind::Ddpm, 20, 4.4, 99);
    while !alone.is_done() {
        denoise_step(&model, &mut [&mut alone]).unwrap();
    }
    // The same sample amid others that join late, leave early, and use other settings.
    let mut target = sample(4, SamplerKind::Ddpm, 20, 4.4, 99);
    let mut others = [
        sample(1, SamplerKind::Ddim, 7, 1.0, 1),
        sample(2, SamplerKind::DpmSolverPP, 30, 2.5, 2),
        sample(9, SamplerKind::Ddpm, 12, 4.4, 3),
    ];
    let mut step = 0;
    while !target.is_done() {
        let mut batch: Vec<&mut SampleState> = vec![&mut target];
        for (k, o) in others.iter_mut().enumerate() {
            if step >= 3 * k && !o.is_done() {
                batch.push(o);
            }
        }
        denoise_step(&model, &mut batch).unwrap();
        step += 1;
    }
    // Bit for bit: the conditioning matmuls run in fixed-shape chunks, so no kernel sees B.
    assert_eq!(
        bits(target.latent()),
        bits(alone.latent()),
        "batch mates changed the sample"
    );
}

/// Runs `samples` to their ends, joining as `joins[i]` says (the step at which each joins)
/// and leaving when done, through `stepper`.
fn run_staggered(
    stepper: &mut StepGraphs,
    model: &DiffiT,
    samples: &mut [SampleState],
    joins: &[usize],
) {
    let mut step = 0;
    loop {
        let mut batch: Vec<&mut SampleState> = samples
            .iter_mut()
            .zip(joins)
            .filter(|(s, &j)| step >= j && !s.is_done())
            .map(|(s, _)| s)
            .collect();
        if batch.is_empty() && step > joins.iter().copied().max().unwrap_or(0) {
            return;
        }
        stepper.step(model, &mut batch).unwrap();
        step += 1;
    }
}

/// `sample` run alone to its end through a stepper of `mode`.
fn run_alone(mode: StepMode, model: &DiffiT, sample: SampleState) -> SampleState {
    let mut one = [sample];
    run_staggered(&mut StepGraphs::new(mode), model, &mut one, &[0]);
    let [done] = one;
    done
}

fn bits(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn mixed_batch() -> Vec<SampleState> {
    vec![
        sample(4, SamplerKind::Ddpm, 20, 4.4, 99),
        sample(1, SamplerKind::Ddim, 7, 1.0, 1),
        sample(2, SamplerKind::DpmSolverPP, 30, 2.5, 2),
        sample(9, SamplerKind::Ddpm, 12, 1.0, 3),
        sample(0, SamplerKind::DpmSolverPP, 9, 1.0, 4),
        sample(5, SamplerKind::Ddim, 15, 7.5, 5),
    ]
}

#[test]
fn padded_steps_give_the_direct_steps_latents() {
    // The padded (graph-shaped) step against today's variable-shape one, on one mixed batch
    // whose size and guided count change as samples join and leave: every sampler, guided
    // and not, so every selected-away term is exercised. Bit for bit.
    let model = tiny();
    let joins = [0, 0, 2, 3, 5, 8];
    let mut direct = mixed_batch();
    let mut padded = mixed_batch();
    for s in direct.iter_mut().chain(padded.iter_mut()) {
        s.keep_estimate();
    }
    run_staggered(
        &mut StepGraphs::new(StepMode::Direct),
        &model,
        &mut direct,
        &joins,
    );
    let mut stepper = StepGraphs::new(StepMode::Bucketed);
    run_staggered(&mut stepper, &model, &mut padded, &joins);
    for (i, (d, p)) in direct.iter().zip(&padded).enumerate() {
        assert!(d.is_done() && p.is_done());
        assert_eq!(bits(p.latent()), bits(d.latent()), "sample {i}: latent");
        assert_eq!(
            bits(p.estimate().unwrap()),
            bits(d.estimate().unwrap()),
            "sample {i}: last x0 estimate"
        );
    }
    assert!(
        stepper.captured().is_empty(),
        "nothing is captured on the CPU"
    );
}

#[test]
fn padding_rows_and_batch_mates_do_not_change_a_padded_sample() {
    // One guided sample alone (bucket 2) and amid five others (buckets up to 12), whose rows
    // leave stale values behind in the bucket buffers as they finish.
    let model = tiny();
    let alone = run_alone(
        StepMode::Bucketed,
        &model,
        sample(4, SamplerKind::Ddpm, 20, 4.4, 99),
    );
    let mut amid = mixed_batch();
    amid.rotate_left(1);
    let joins = [0, 1, 0, 4, 2, 6];
    run_staggered(
        &mut StepGraphs::new(StepMode::Bucketed),
        &model,
        &mut amid,
        &joins,
    );
    assert_eq!(
        bits(amid[5].latent()),
        bits(alone.latent()),
        "padding or batch mates changed the sample"
    );
}

#[test]
fn buckets_are_few_and_cover_every_batch() {
    let mut last = 0;
    for rows in 1..=300 {
        let b = bucket(rows);
        assert!(b >= rows && b >= last, "bucket({rows}) = {b}");
        assert!(
            rows <= 8 || 3 * rows >= 2 * b,
            "bucket({rows}) = {b} pads too much"
        );
        last = b;
    }
    let distinct: std::collections::BTreeSet<usize> = (1..=128).map(bucket).collect();
    assert_eq!(distinct.len(), 12, "{distinct:?}");
}

#[test]
fn large_steps_are_padded_only_where_that_adds_no_rows() {
    for rows in 1..=300 {
        let expected = match bucket(rows) {
            b if rows <= PADDED_ROWS_MAX || b == rows => StepShape::Padded(b),
            _ => StepShape::Exact(rows),
        };
        assert_eq!(step_shape(rows), expected, "{rows} rows");
    }
    // A full batch of 64 guided images, and the same batch with six of them in the steps
    // where their scale is 1 (one row each).
    assert_eq!(step_shape(128), StepShape::Padded(128));
    assert_eq!(step_shape(122), StepShape::Exact(122));
    assert_eq!(step_shape(PADDED_ROWS_MAX + 1), StepShape::Exact(49));
}

#[test]
fn large_steps_off_the_buckets_run_unpadded_with_the_same_bits() {
    // 30 images, 20 of them guided at a constant scale (two rows at every step), joining two
    // at a time: the rows grow through padded buckets to 50 (exact: past PADDED_ROWS_MAX and
    // not a bucket), then shrink as they finish. Bit for bit against the direct steps.
    let model = tiny();
    let batch = || -> Vec<SampleState> {
        (0..30u64)
            .map(|i| {
                let scale = if i % 3 == 0 { 1.0 } else { 3.0 };
                SampleState::new(
                    (i % 10) as i64,
                    [SamplerKind::Ddpm, SamplerKind::Ddim][i as usize % 2],
                    Guidance::new(scale, GuidanceSchedule::Constant).unwrap(),
                    Arc::new(Schedule::new(16).unwrap()),
                    Box::new(SeededNoise::new(i)),
                    (4, 8, 8),
                    &Device::Cpu,
                )
                .unwrap()
            })
            .collect()
    };
    let joins: Vec<usize> = (0..30).map(|i| i / 2).collect();
    let mut direct = batch();
    run_staggered(
        &mut StepGraphs::new(StepMode::Direct),
        &model,
        &mut direct,
        &joins,
    );
    let mut padded = batch();
    let mut stepper = StepGraphs::new(StepMode::Bucketed);
    run_staggered(&mut stepper, &model, &mut padded, &joins);
    for (i, (d, p)) in direct.iter().zip(&padded).enumerate() {
        assert!(d.is_done() && p.is_done());
        assert_eq!(bits(p.latent()), bits(d.latent()), "image {i}");
    }
    // The 49..=50-row steps ran exact: no bucket past PADDED_ROWS_MAX was ever made.
    let buckets = stepper.ready_buckets();
    assert_eq!(buckets.last(), Some(&PADDED_ROWS_MAX), "{buckets:?}");
}

#[test]
fn a_sample_can_switch_between_padded_and_direct_steps() {
    // A failed capture in `auto` falls back to the direct step mid-run: the noise the padded
    // step drew ahead must be the noise the direct step uses next.
    let model = tiny();
    let direct = run_alone(
        StepMode::Direct,
        &model,
        sample(3, SamplerKind::Ddpm, 10, 4.4, 7),
    );
    let mut switched = sample(3, SamplerKind::Ddpm, 10, 4.4, 7);
    let mut padded = StepGraphs::new(StepMode::Bucketed);
    for step in 0..10 {
        match step % 3 {
            0 => padded.step(&model, &mut [&mut switched]).unwrap(),
            _ => denoise_step(&model, &mut [&mut switched]).unwrap(),
        }
    }
    assert!(switched.is_done());
    assert_eq!(bits(switched.latent()), bits(direct.latent()));
}

/// Records the network rows and labels of every `predict` call of the denoiser it wraps.
struct RowLog<'a> {
    inner: &'a PointDenoiser,
    calls: std::cell::RefCell<Vec<(i64, Vec<i64>)>>,
}

impl Denoiser for RowLog<'_> {
    fn predict(&self, x: &Tensor, t: &[i64], y: &[i64]) -> candle_core::Result<Tensor> {
        assert_eq!(x.dim(0)?, y.len());
        self.calls.borrow_mut().push((t[0], y.to_vec()));
        self.inner.predict(x, t, y)
    }
    fn in_channels(&self) -> usize {
        self.inner.in_channels()
    }
    fn learn_sigma(&self) -> bool {
        self.inner.learn_sigma()
    }
    fn null_class(&self) -> i64 {
        self.inner.null_class()
    }
    fn device(&self) -> &Device {
        self.inner.device()
    }
}

#[test]
fn a_guided_sample_skips_the_unconditional_row_only_where_its_scale_is_one() {
    let device = Device::Cpu;
    let den = PointDenoiser {
        target: Tensor::zeros((1, 4, 2, 2), DType::F32, &device).unwrap(),
        base_alphas_cumprod: Schedule::new(1000).unwrap().alphas_cumprod,
        device: device.clone(),
    };
    for schedule in [GuidanceSchedule::PowerCosine, GuidanceSchedule::Constant] {
        let guidance = Guidance::new(4.4, schedule).unwrap();
        let log = RowLog {
            inner: &den,
            calls: Default::default(),
        };
        let mut s = SampleState::new(
            3,
            SamplerKind::Ddpm,
            guidance,
            Arc::new(Schedule::new(250).unwrap()),
            Box::new(SeededNoise::new(5)),
            (4, 2, 2),
            &device,
        )
        .unwrap();
        while !s.is_done() {
            denoise_step(&log, &mut [&mut s]).unwrap();
        }
        let calls = log.calls.into_inner();
        assert_eq!(calls.len(), 250);
        for (t, labels) in &calls {
            // One row (the conditional) exactly where the f32 scale is 1; else [y; null].
            let expected = match guidance.scale_for_step(*t) {
                Some(_) => vec![3, 10],
                None => vec![3],
            };
            assert_eq!(labels, &expected, "{schedule} at t = {t}");
        }
        let single = calls.iter().filter(|(_, l)| l.len() == 1).count();
        match schedule {
            // The power-cosine ramp is 1 in f32 for the first ≈ 10 % of the 250 steps.
            GuidanceSchedule::PowerCosine => assert!((15..=35).contains(&single), "{single}"),
            GuidanceSchedule::Constant => assert_eq!(single, 0),
        }
    }
}

/// Every bucket a step of an engine with batches of up to `max_batch` images can need, from
/// the batches themselves: n images (1..=max_batch), g of them guided at this step (two
/// network rows each), the others one row.
fn reachable_buckets(max_batch: usize) -> Vec<usize> {
    let rows = (1..=max_batch).flat_map(|n| (0..=n).map(move |g| n + g));
    let set: std::collections::BTreeSet<usize> = rows
        .filter_map(|r| match step_shape(r) {
            StepShape::Padded(b) => Some(b),
            StepShape::Exact(_) => None,
        })
        .collect();
    set.into_iter().collect()
}

/// `--cuda-graphs on`: on the CPU, the padded steps uncaptured (`StepMode::Bucketed`).
fn padded_steps() -> KernelOptions {
    KernelOptions {
        cuda_graphs: Toggle::On,
        ..KernelOptions::default()
    }
}

#[test]
fn warm_up_images_take_exactly_the_rows_they_are_made_for() {
    for rows in 1..=20 {
        let specs = specs_for_rows(rows, SamplerKind::Ddpm).unwrap();
        assert!(specs.len() <= rows.div_ceil(2), "{rows} rows: {specs:?}");
        // At every timestep (`Guidance::scale_for_step` decides one row or two).
        for t in [0, 500, 904, 999] {
            let taken: usize = specs
                .iter()
                .map(|s| 1 + usize::from(s.guidance.scale_for_step(t).is_some()))
                .sum();
            assert_eq!(taken, rows, "t = {t}: {specs:?}");
        }
    }
}

#[test]
fn warm_up_prepares_exactly_the_buckets_batches_can_reach() {
    let padded = padded_steps();
    // 30: steps of 49..=60 rows run exact, so 64 is not among them.
    for max_batch in [1, 3, 5, 30] {
        let pipe = tiny_pipeline_with(padded);
        assert_eq!(pipe.step_mode(), StepMode::Bucketed);
        let expected = reachable_buckets(max_batch);
        let w = pipe
            .warm_buckets(max_batch)
            .unwrap()
            .expect("bucketed steps");
        assert_eq!(w.buckets, expected, "max_batch {max_batch}");
        if max_batch == 30 {
            assert_eq!(expected, [1, 2, 4, 8, 12, 16, 24, 32, 48]);
        }
        assert_eq!(pipe.ready_buckets(), expected);
        assert_eq!(w.stepped, expected.len());
        assert_eq!(w.graph_memory_mib, None, "no graphs on the CPU");
        // Nothing is left to do a second time.
        assert_eq!(pipe.warm_buckets(max_batch).unwrap().unwrap().stepped, 0);
    }
    // Unpadded steps have no buckets to prepare.
    let direct = tiny_pipeline_with(KernelOptions::default());
    assert_eq!(direct.step_mode(), StepMode::Direct);
    assert!(direct.warm_buckets(4).unwrap().is_none());
    assert!(direct.ready_buckets().is_empty());
}

#[test]
fn warmed_buckets_give_the_same_images_as_fresh_ones() {
    // Three guided images: 6 rows, bucket 8, whose buffers the warm-up left holding its own
    // images' values.
    let specs: Vec<ImageSpec> = (0..3)
        .map(|i| ImageSpec {
            label: 2 + i,
            seed: 40 + i as u64,
            steps: 9,
            sampler: SamplerKind::DpmSolverPP,
            guidance: Guidance::new(3.0, GuidanceSchedule::Constant).unwrap(),
        })
        .collect();
    let run = |pipe: &Pipeline| {
        let mut samples: Vec<SampleState> =
            specs.iter().map(|s| pipe.new_sample(s).unwrap()).collect();
        pipe.run_to_end(&mut samples, |_| {}).unwrap();
        samples.iter().map(|s| bits(s.latent())).collect::<Vec<_>>()
    };
    let padded = padded_steps();
    let warmed = tiny_pipeline_with(padded);
    warmed.warm_buckets(4).unwrap().unwrap();
    assert!(warmed.ready_buckets().contains(&bucket(6)));
    let fresh = tiny_pipeline_with(padded);
    let direct = tiny_pipeline_with(KernelOptions::default());
    let images = run(&warmed);
    assert_eq!(images, run(&fresh), "the warm-up changed a padded step");
    assert_eq!(images, run(&direct), "padded and direct steps differ");
}
