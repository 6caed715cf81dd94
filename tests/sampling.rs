//! Sampler behaviour beyond the reference run: every sampler's math on an analytic
//! denoiser, and batch independence on the real network.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{fixture, rel_err};
use diffit_server::config::KernelOptions;
use diffit_server::diffusion::{
    denoise_step, Denoiser, Guidance, GuidanceSchedule, SampleState, SamplerKind, Schedule,
    SeededNoise,
};
use diffit_server::model::{DiffiT, WeightsFile};

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
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(
        bits(target.latent()),
        bits(alone.latent()),
        "batch mates changed the sample"
    );
}
