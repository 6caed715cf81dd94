//! Per-sample sampler state and the batched denoising step.
//!
//! Every sampler update is written as one linear combination with per-sample coefficients,
//!   x0 = r1·x − r2·ε
//!   x' = a·x + b·ε + c·x0 + d·x0_prev + m·σ(v)·n
//! so a batch whose samples are at different steps, with different samplers and guidance,
//! advances with a fixed number of tensor ops whatever its size.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::guidance::{guided_eps, per_row, Guidance, GUIDED_CHANNELS};
use super::noise::NoiseSource;
use super::schedule::Schedule;
use super::DiffusionError;
use crate::model::DiffiT;

/// What the sampler needs of a network: an ε (and v) prediction for a batch at per-sample
/// timesteps and labels. DiffiT implements it; tests substitute analytic denoisers.
pub trait Denoiser {
    /// [B, out_channels, H, W] for x [B, C, H, W].
    fn predict(&self, x: &Tensor, t: &[i64], y: &[i64]) -> candle_core::Result<Tensor>;
    fn in_channels(&self) -> usize;
    /// Whether channels C..2C of the output are the variance interpolation v.
    fn learn_sigma(&self) -> bool;
    fn null_class(&self) -> i64;
    fn device(&self) -> &Device;
}

impl Denoiser for DiffiT {
    fn predict(&self, x: &Tensor, t: &[i64], y: &[i64]) -> candle_core::Result<Tensor> {
        self.forward(x, t, y)
    }
    fn in_channels(&self) -> usize {
        self.config().in_channels
    }
    fn learn_sigma(&self) -> bool {
        self.config().learn_sigma()
    }
    fn null_class(&self) -> i64 {
        self.config().null_class() as i64
    }
    fn device(&self) -> &Device {
        DiffiT::device(self)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SamplerKind {
    /// Ancestral DDPM with the model's learned-range (or fixed) variance, as released.
    #[serde(rename = "ddpm")]
    Ddpm,
    /// Deterministic DDIM, η = 0.
    #[serde(rename = "ddim")]
    Ddim,
    /// DPM-Solver++(2M), deterministic multistep.
    #[serde(rename = "dpm-solver++")]
    DpmSolverPP,
}

impl SamplerKind {
    pub const ALL: [SamplerKind; 3] = [Self::Ddpm, Self::Ddim, Self::DpmSolverPP];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::DpmSolverPP => "dpm-solver++",
        }
    }
}

impl std::fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SamplerKind {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self, DiffusionError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| DiffusionError::Sampler(s.to_string()))
    }
}

/// One image being generated: its latent, where it is in its schedule, and its own noise.
pub struct SampleState {
    label: i64,
    sampler: SamplerKind,
    guidance: Guidance,
    schedule: Arc<Schedule>,
    /// [1, C, H, W], f32, on the model's device.
    x: Tensor,
    /// DPM-Solver++(2M) keeps the previous step's x0 prediction.
    x0_prev: Option<Tensor>,
    done: usize,
    noise: Box<dyn NoiseSource>,
    /// Keep the last step's denoised estimate (for live previews); costs no computation, as
    /// every step computes it anyway, and never changes the sample's own path.
    keep_estimate: bool,
    estimate: Option<Tensor>,
    /// The next step's noise, drawn ahead while the device runs this step
    /// (`predraw_noise`); the generator's sequence is the same either way.
    next_noise: Option<Vec<f32>>,
}

impl SampleState {
    /// Draws the starting latent of shape `latent` = (C, H, W) from `noise`.
    pub fn new(
        label: i64,
        sampler: SamplerKind,
        guidance: Guidance,
        schedule: Arc<Schedule>,
        mut noise: Box<dyn NoiseSource>,
        latent: (usize, usize, usize),
        device: &Device,
    ) -> candle_core::Result<Self> {
        let (c, h, w) = latent;
        let x = Tensor::from_vec(noise.initial(c * h * w), (1, c, h, w), device)?;
        Ok(Self {
            label,
            sampler,
            guidance,
            schedule,
            x,
            x0_prev: None,
            done: 0,
            noise,
            keep_estimate: false,
            estimate: None,
            next_noise: None,
        })
    }

    /// Asks the sampler to keep each step's denoised estimate x̂0 (see [`Self::estimate`]).
    pub fn keep_estimate(&mut self) {
        self.keep_estimate = true;
    }

    /// The denoised estimate x̂0 [1, C, H, W] of the last step, if asked to keep it.
    pub fn estimate(&self) -> Option<&Tensor> {
        self.estimate.as_ref()
    }

    pub fn label(&self) -> i64 {
        self.label
    }

    pub fn sampler(&self) -> SamplerKind {
        self.sampler
    }

    pub fn guidance(&self) -> Guidance {
        self.guidance
    }

    pub fn latent(&self) -> &Tensor {
        &self.x
    }

    pub fn steps_done(&self) -> usize {
        self.done
    }

    pub fn steps_total(&self) -> usize {
        self.schedule.steps()
    }

    pub fn is_done(&self) -> bool {
        self.done >= self.schedule.steps()
    }

    /// Respaced index of the next step (S−1 first, 0 last).
    fn index(&self) -> usize {
        self.schedule.steps() - 1 - self.done
    }

    /// The original DDPM timestep the network is fed for the next step.
    pub fn model_timestep(&self) -> i64 {
        self.schedule.timestep_map[self.index()]
    }

    /// The guidance scale the next step applies; None where that step takes one network row
    /// (`Guidance::scale_for_step`).
    pub fn next_step_scale(&self) -> Option<f32> {
        self.guidance.scale_for_step(self.model_timestep())
    }

    fn coefficients(&self, learn_sigma: bool) -> Coefs {
        let s = &*self.schedule;
        let i = self.index();
        let mut k = Coefs {
            r1: s.sqrt_recip_alphas_cumprod[i],
            r2: s.sqrt_recipm1_alphas_cumprod[i],
            ..Coefs::default()
        };
        match self.sampler {
            SamplerKind::Ddpm => {
                k.a = s.posterior_mean_coef2[i];
                k.c = s.posterior_mean_coef1[i];
                k.noise = self.adds_noise(i);
                if learn_sigma {
                    k.log_var_max = s.log_betas[i];
                    k.log_var_min = s.posterior_log_variance_clipped[i];
                } else {
                    k.log_var_max = s.fixed_large_log_variance(i);
                    k.log_var_min = k.log_var_max;
                }
            }
            SamplerKind::Ddim => {
                k.c = s.alphas_cumprod_prev[i].sqrt();
                k.b = (1.0 - s.alphas_cumprod_prev[i]).sqrt();
            }
            SamplerKind::DpmSolverPP => {
                let lambda = |ac: f64| 0.5 * (ac / (1.0 - ac)).ln();
                let (ac_s, ac_t) = (s.alphas_cumprod[i], s.alphas_cumprod_prev[i]);
                if i == 0 {
                    // σ_t = 0: the update is the denoised estimate itself.
                    k.c = 1.0;
                } else {
                    let h = lambda(ac_t) - lambda(ac_s);
                    let (alpha_t, sigma_t) = (ac_t.sqrt(), (1.0 - ac_t).sqrt());
                    let sigma_s = (1.0 - ac_s).sqrt();
                    let kk = -alpha_t * (-h).exp_m1();
                    k.a = sigma_t / sigma_s;
                    match &self.x0_prev {
                        None => k.c = kk,
                        Some(_) => {
                            // The previous step went from i+1 to i.
                            let h_prev = lambda(ac_s) - lambda(s.alphas_cumprod[i + 1]);
                            let r = h_prev / h;
                            k.c = kk * (1.0 + 1.0 / (2.0 * r));
                            k.d = -kk / (2.0 * r);
                        }
                    }
                }
            }
        }
        k
    }
}

/// One sample's share of a fixed-shape step (`pipeline::graphs`), gathered on the host: the
/// same numbers `denoise_step` uses, as the f32 values it uploads.
pub(crate) struct StepRow {
    pub timestep: i64,
    pub label: i64,
    /// The guidance scale at this step, for a guided sample.
    pub guidance: Option<f32>,
    /// r1, r2, a, b, c, d, log_var_max, log_var_min of the sampler update (module docs).
    pub coefs: [f32; 8],
    /// This step's noise, for a sample whose update adds noise (drawn from its own generator,
    /// exactly as `denoise_step` draws it).
    pub noise: Option<Vec<f32>>,
    /// The previous x0 estimate, for a DPM-Solver++ sample whose update uses it (d ≠ 0).
    pub x0_prev: Option<Tensor>,
}

impl SampleState {
    /// This sample's inputs to the next step; draws its noise (advancing its generator), so
    /// call it once per step, then `advance` with the step's results.
    pub(crate) fn step_row(&mut self, learn_sigma: bool) -> candle_core::Result<StepRow> {
        if self.is_done() {
            candle_core::bail!("sample already finished its {} steps", self.steps_total());
        }
        let k = self.coefficients(learn_sigma);
        let noise = k.noise.then(|| self.take_noise());
        Ok(StepRow {
            timestep: self.model_timestep(),
            label: self.label,
            guidance: self.next_step_scale(),
            coefs: [k.r1, k.r2, k.a, k.b, k.c, k.d, k.log_var_max, k.log_var_min].map(|v| v as f32),
            noise,
            x0_prev: (k.d != 0.0).then(|| self.x0_prev.clone()).flatten(),
        })
    }

    /// Draws the noise of the step after the one `step_row` began, if that step adds noise:
    /// called while the device runs this step, so the host's draw overlaps it.
    pub(crate) fn predraw_noise(&mut self) {
        let next = self.done + 1;
        if next < self.steps_total() && self.adds_noise(self.steps_total() - 1 - next) {
            self.next_noise = Some(self.noise.step(next, self.x.elem_count()));
        }
    }

    /// This step's noise: drawn ahead by `predraw_noise`, or now.
    fn take_noise(&mut self) -> Vec<f32> {
        match self.next_noise.take() {
            Some(n) => n,
            None => self.noise.step(self.done, self.x.elem_count()),
        }
    }

    /// Whether the update at respaced index `i` adds noise (DDPM's, but for the last step).
    fn adds_noise(&self, i: usize) -> bool {
        self.sampler == SamplerKind::Ddpm && i > 0
    }

    /// Whether `advance` needs this step's x0 estimate (DPM-Solver++ keeps it; so does a
    /// sample keeping estimates for previews).
    pub(crate) fn wants_x0(&self) -> bool {
        self.sampler == SamplerKind::DpmSolverPP || self.keep_estimate
    }

    /// Ends the step `step_row` began: the new latent `x` and, if `wants_x0`, the x0 estimate
    /// (both [1, C, H, W], f32).
    pub(crate) fn advance(&mut self, x: Tensor, x0: Option<Tensor>) {
        self.x = x;
        if self.sampler == SamplerKind::DpmSolverPP {
            self.x0_prev = x0.clone();
        }
        if self.keep_estimate {
            self.estimate = x0;
        }
        self.done += 1;
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Coefs {
    r1: f64,
    r2: f64,
    a: f64,
    b: f64,
    c: f64,
    d: f64,
    log_var_max: f64,
    log_var_min: f64,
    noise: bool,
}

fn column(
    coefs: &[Coefs],
    f: impl Fn(&Coefs) -> f64,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let v: Vec<f64> = coefs.iter().map(f).collect();
    per_row(&v, device)?.reshape((coefs.len(), 1, 1, 1))
}

/// Advances every sample by one step: one network forward over all of them (guided samples
/// twice, with the null label), guidance, then each sample's own sampler update.
pub fn denoise_step(
    model: &dyn Denoiser,
    samples: &mut [&mut SampleState],
) -> Result<(), DiffusionError> {
    if samples.is_empty() {
        return Ok(());
    }
    if let Some(s) = samples.iter().find(|s| s.is_done()) {
        return Err(candle_core::Error::Msg(format!(
            "sample already finished its {} steps",
            s.steps_total()
        ))
        .into());
    }
    let device = model.device();
    let learn_sigma = model.learn_sigma();
    // Samples guided at this step first, so their conditional rows are a prefix of the batch.
    samples.sort_by_cached_key(|s| s.next_step_scale().is_none());
    let b = samples.len();
    // The guided prefix's scales; g of them.
    let scales: Vec<f64> = samples
        .iter()
        .map_while(|s| s.next_step_scale())
        .map(f64::from)
        .collect();
    let g = scales.len();

    let xs: Vec<&Tensor> = samples.iter().map(|s| &s.x).collect();
    let x = Tensor::cat(&xs, 0)?;
    let mut t: Vec<i64> = samples.iter().map(|s| s.model_timestep()).collect();
    let mut y: Vec<i64> = samples.iter().map(|s| s.label).collect();
    let net_in = if g > 0 {
        t.extend_from_within(..g);
        y.extend(std::iter::repeat_n(model.null_class(), g));
        Tensor::cat(&[&x, &x.narrow(0, 0, g)?], 0)?
    } else {
        x.clone()
    };
    let out = model.predict(&net_in, &t, &y)?.to_dtype(DType::F32)?;

    let cin = model.in_channels();
    let cond = out.narrow(0, 0, b)?;
    let mut eps = cond.narrow(1, 0, cin)?;
    if g > 0 {
        let guided = guided_eps(&cond.narrow(0, 0, g)?, &out.narrow(0, b, g)?, &scales)?;
        let guided = if cin > GUIDED_CHANNELS {
            let tail = cond
                .narrow(0, 0, g)?
                .narrow(1, GUIDED_CHANNELS, cin - GUIDED_CHANNELS)?;
            Tensor::cat(&[&guided, &tail], 1)?
        } else {
            guided
        };
        eps = if g < b {
            Tensor::cat(&[&guided, &eps.narrow(0, g, b - g)?], 0)?
        } else {
            guided
        };
    }
    let v = learn_sigma.then(|| cond.narrow(1, cin, cin)).transpose()?;

    let coefs: Vec<Coefs> = samples
        .iter()
        .map(|s| s.coefficients(learn_sigma))
        .collect();
    let col = |f: fn(&Coefs) -> f64| column(&coefs, f, device);
    let x0 = (x.broadcast_mul(&col(|k| k.r1)?)? - eps.broadcast_mul(&col(|k| k.r2)?)?)?;
    let mut next = ((x.broadcast_mul(&col(|k| k.a)?)? + eps.broadcast_mul(&col(|k| k.b)?)?)?
        + x0.broadcast_mul(&col(|k| k.c)?)?)?;
    if coefs.iter().any(|k| k.d != 0.0) {
        let prev: Vec<Tensor> = samples
            .iter()
            .map(|s| match &s.x0_prev {
                Some(p) => Ok(p.clone()),
                None => s.x.zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        next = (next + Tensor::cat(&prev, 0)?.broadcast_mul(&col(|k| k.d)?)?)?;
    }
    if coefs.iter().any(|k| k.noise) {
        let per_sample = x.elem_count() / b;
        let mut n = Vec::with_capacity(x.elem_count());
        for (s, k) in samples.iter_mut().zip(&coefs) {
            if k.noise {
                n.extend(s.take_noise());
            } else {
                n.extend(std::iter::repeat_n(0f32, per_sample));
            }
        }
        let n = Tensor::from_vec(n, x.shape(), device)?;
        let log_var = match &v {
            Some(v) => {
                let frac = ((v + 1.0)? / 2.0)?;
                (frac.broadcast_mul(&col(|k| k.log_var_max)?)?
                    + (1.0 - frac)?.broadcast_mul(&col(|k| k.log_var_min)?)?)?
            }
            None => col(|k| k.log_var_max)?
                .broadcast_as(x.shape())?
                .contiguous()?,
        };
        let mask = col(|k| if k.noise { 1.0 } else { 0.0 })?;
        next = (next + (log_var * 0.5)?.exp()?.mul(&n)?.broadcast_mul(&mask)?)?;
    }

    for (row, s) in samples.iter_mut().enumerate() {
        s.x = next.narrow(0, row, 1)?;
        if s.sampler == SamplerKind::DpmSolverPP {
            s.x0_prev = Some(x0.narrow(0, row, 1)?);
        }
        if s.keep_estimate {
            s.estimate = Some(x0.narrow(0, row, 1)?);
        }
        s.done += 1;
    }
    Ok(())
}
