//! Classifier-free guidance as released (spec §2): the network runs on [x; x] with labels
//! [y; null]; only ε channels 0–2 are guided.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::DiffusionError;

/// ε channels the release guides (channel 3 and the variance keep the conditional value).
pub const GUIDED_CHANNELS: usize = 3;
/// Exponent of the power-cosine ramp.
pub const POWER_COSINE_EXPONENT: f64 = 4.0;
pub const MAX_GUIDANCE_SCALE: f32 = 50.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GuidanceSchedule {
    /// s(t) = 1 + (scale − 1)·½·(1 − cos(π·(1 − t/1000)^4)): ≈1 for noisy steps, `scale` at t = 0.
    #[default]
    PowerCosine,
    Constant,
}

impl std::str::FromStr for GuidanceSchedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "power-cosine" => Ok(Self::PowerCosine),
            "constant" => Ok(Self::Constant),
            other => Err(format!(
                "unknown guidance schedule '{other}' (power-cosine | constant)"
            )),
        }
    }
}

impl std::fmt::Display for GuidanceSchedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::PowerCosine => "power-cosine",
            Self::Constant => "constant",
        })
    }
}

/// A validated guidance setting. A scale of exactly 1 means "no guidance" and the
/// sample is run without its unconditional twin.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    scale: f32,
    schedule: GuidanceSchedule,
}

impl Guidance {
    pub fn new(scale: f32, schedule: GuidanceSchedule) -> Result<Self, DiffusionError> {
        if !scale.is_finite() || !(0.0..=MAX_GUIDANCE_SCALE).contains(&scale) {
            return Err(DiffusionError::GuidanceScale(scale));
        }
        Ok(Self { scale, schedule })
    }

    pub fn none() -> Self {
        Self {
            scale: 1.0,
            schedule: GuidanceSchedule::Constant,
        }
    }

    pub fn scale(&self) -> f32 {
        self.scale
    }

    pub fn schedule(&self) -> GuidanceSchedule {
        self.schedule
    }

    pub fn is_guided(&self) -> bool {
        self.scale != 1.0
    }

    /// The scale a step at model timestep `t` (0..999) applies, as the f32 the update multiplies by;
    /// None when the step needs no unconditional pass: an unguided sample, or a step whose
    /// scale is exactly 1 in f32, where ε_u + 1·(ε_c − ε_u) is ε_c (the power-cosine ramp at
    /// scale 4.4 is 1 in f32 above t ≈ 904: the first ≈ 10 % of a 250-step DDPM run, where
    /// skipping the unconditional rows halves the network's work).
    pub fn scale_for_step(&self, t: i64) -> Option<f32> {
        let s = self.scale_at(t) as f32;
        (self.is_guided() && s != 1.0).then_some(s)
    }

    pub fn scale_at(&self, t: i64) -> f64 {
        let scale = self.scale as f64;
        match self.schedule {
            GuidanceSchedule::Constant => scale,
            GuidanceSchedule::PowerCosine => {
                let ramp = (1.0 - t as f64 / 1000.0).powf(POWER_COSINE_EXPONENT);
                1.0 + (scale - 1.0) * 0.5 * (1.0 - (std::f64::consts::PI * ramp).cos())
            }
        }
    }
}

/// Guided ε channels 0–2: ε_u + s·(ε_c − ε_u), for rows of `cond`/`uncond` [G, C, H, W] with
/// one scale per row. Returns [G, min(3, C), H, W].
pub fn guided_eps(cond: &Tensor, uncond: &Tensor, scales: &[f64]) -> candle_core::Result<Tensor> {
    let g = cond.dim(0)?;
    // Latents narrower than the release's 4 channels have every ε channel guided.
    let n = GUIDED_CHANNELS.min(cond.dim(1)?);
    let c3 = cond.narrow(1, 0, n)?;
    let u3 = uncond.narrow(1, 0, n)?;
    let s = per_row(scales, cond.device())?.reshape((g, 1, 1, 1))?;
    &u3 + (c3 - &u3)?.broadcast_mul(&s)?
}

/// The guided output of a whole released-style batch `[cond; uncond]` (2B rows): both halves
/// carry the guided ε channels 0–2 and keep their own remaining channels.
pub fn guide_doubled_batch(out: &Tensor, scales: &[f64]) -> candle_core::Result<Tensor> {
    let rows = out.dim(0)?;
    let half = rows / 2;
    if rows % 2 != 0 || scales.len() != half {
        candle_core::bail!("a guided batch needs an even number of rows and one scale per pair");
    }
    let channels = out.dim(1)?;
    let cond = out.narrow(0, 0, half)?;
    let uncond = out.narrow(0, half, half)?;
    let eps = guided_eps(&cond, &uncond, scales)?;
    let rest = |t: &Tensor| t.narrow(1, GUIDED_CHANNELS, channels - GUIDED_CHANNELS);
    Tensor::cat(
        &[
            Tensor::cat(&[&eps, &rest(&cond)?], 1)?,
            Tensor::cat(&[&eps, &rest(&uncond)?], 1)?,
        ],
        0,
    )
}

pub(crate) fn per_row(values: &[f64], device: &Device) -> candle_core::Result<Tensor> {
    let v: Vec<f32> = values.iter().map(|&x| x as f32).collect();
    Tensor::from_vec(v, values.len(), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn power_cosine_ramp_endpoints() {
        let g = Guidance::new(4.4, GuidanceSchedule::PowerCosine).unwrap();
        assert!((g.scale_at(0) - 4.4).abs() < 1e-3);
        assert!((g.scale_at(999) - 1.0).abs() < 1e-9);
        assert!((g.scale_at(600) - 1.0).abs() < 0.01);
        let c = Guidance::new(1.49, GuidanceSchedule::Constant).unwrap();
        assert_eq!(c.scale_at(999), 1.49f32 as f64);
    }

    #[test]
    fn steps_whose_scale_is_one_in_f32_skip_the_unconditional_pass() {
        let g = Guidance::new(4.4, GuidanceSchedule::PowerCosine).unwrap();
        // The ramp is exactly 1 in f32 at the first steps of a run, and only there.
        let skipped: Vec<i64> = (0..1000)
            .filter(|&t| g.scale_for_step(t).is_none())
            .collect();
        assert!(skipped.contains(&999) && skipped.contains(&950));
        assert!(!skipped.contains(&0) && !skipped.contains(&500));
        let first = *skipped.first().unwrap();
        assert!((880..=930).contains(&first), "ramp leaves 1 at {first}");
        assert!(
            skipped
                .iter()
                .zip(skipped.iter().skip(1))
                .all(|(a, b)| b - a == 1),
            "one run of timesteps"
        );
        for t in skipped {
            assert_eq!(g.scale_at(t) as f32, 1.0);
        }
        assert_eq!(g.scale_for_step(0), Some(g.scale_at(0) as f32));
        // A constant scale guides every step; scale 1 none.
        let c = Guidance::new(1.49, GuidanceSchedule::Constant).unwrap();
        assert!((0..1000).all(|t| c.scale_for_step(t) == Some(1.49)));
        let none = Guidance::new(1.0, GuidanceSchedule::PowerCosine).unwrap();
        assert!((0..1000).all(|t| none.scale_for_step(t).is_none()));
    }

    #[test]
    fn rejects_bad_scales() {
        assert!(Guidance::new(f32::NAN, GuidanceSchedule::Constant).is_err());
        assert!(Guidance::new(-1.0, GuidanceSchedule::Constant).is_err());
        assert!(Guidance::new(51.0, GuidanceSchedule::Constant).is_err());
        assert!(!Guidance::new(1.0, GuidanceSchedule::PowerCosine)
            .unwrap()
            .is_guided());
    }
}
