//! The linear-β noise schedule and its respacing (spec §2), computed in f64.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::DiffusionError;

pub const TRAIN_STEPS: usize = 1000;
const BETA_START: f64 = 1e-4;
const BETA_END: f64 = 0.02;
/// Fewest and most respaced steps a request may ask for.
pub const MIN_STEPS: usize = 2;
pub const MAX_STEPS: usize = TRAIN_STEPS;

/// β over the 1000 training steps, exactly as `numpy.linspace` lays them out
/// (start + i·step, with the last value pinned to the end point).
fn linear_betas() -> Vec<f64> {
    let step = (BETA_END - BETA_START) / (TRAIN_STEPS - 1) as f64;
    let mut b: Vec<f64> = (0..TRAIN_STEPS)
        .map(|i| i as f64 * step + BETA_START)
        .collect();
    b[TRAIN_STEPS - 1] = BETA_END;
    b
}

fn cumprod_alphas(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc
        })
        .collect()
}

/// The training timesteps kept when respacing to `steps`: round(i·999/(steps−1)),
/// accumulating the stride and rounding half to even as the reference does.
pub fn respaced_timesteps(steps: usize) -> Vec<usize> {
    let stride = (TRAIN_STEPS - 1) as f64 / (steps - 1) as f64;
    let mut cur = 0.0f64;
    let mut out = Vec::with_capacity(steps);
    for _ in 0..steps {
        out.push(cur.round_ties_even() as usize);
        cur += stride;
    }
    out
}

/// Every per-step table a sampler needs for one respacing, index i = 0 (cleanest) … S−1.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub timestep_map: Vec<i64>,
    pub betas: Vec<f64>,
    pub alphas_cumprod: Vec<f64>,
    pub alphas_cumprod_prev: Vec<f64>,
    pub sqrt_recip_alphas_cumprod: Vec<f64>,
    pub sqrt_recipm1_alphas_cumprod: Vec<f64>,
    pub posterior_variance: Vec<f64>,
    pub posterior_log_variance_clipped: Vec<f64>,
    pub posterior_mean_coef1: Vec<f64>,
    pub posterior_mean_coef2: Vec<f64>,
    pub log_betas: Vec<f64>,
}

impl Schedule {
    pub fn new(steps: usize) -> Result<Self, DiffusionError> {
        if !(MIN_STEPS..=MAX_STEPS).contains(&steps) {
            return Err(DiffusionError::Steps(steps));
        }
        let base_ac = cumprod_alphas(&linear_betas());
        let keep = respaced_timesteps(steps);
        let mut betas = Vec::with_capacity(steps);
        let mut last = 1.0;
        for &k in &keep {
            betas.push(1.0 - base_ac[k] / last);
            last = base_ac[k];
        }
        let ac = cumprod_alphas(&betas);
        let ac_prev: Vec<f64> = std::iter::once(1.0)
            .chain(ac[..steps - 1].iter().copied())
            .collect();
        let map = |f: &dyn Fn(usize) -> f64| (0..steps).map(f).collect::<Vec<f64>>();
        let posterior_variance = map(&|i| betas[i] * (1.0 - ac_prev[i]) / (1.0 - ac[i]));
        // β̃_0 is 0; the reference "clips" its log by reusing β̃_1.
        let posterior_log_variance_clipped =
            map(&|i| posterior_variance[if i == 0 { 1 } else { i }].ln());
        Ok(Self {
            timestep_map: keep.iter().map(|&k| k as i64).collect(),
            sqrt_recip_alphas_cumprod: map(&|i| (1.0 / ac[i]).sqrt()),
            sqrt_recipm1_alphas_cumprod: map(&|i| (1.0 / ac[i] - 1.0).sqrt()),
            posterior_mean_coef1: map(&|i| betas[i] * ac_prev[i].sqrt() / (1.0 - ac[i])),
            posterior_mean_coef2: map(&|i| {
                (1.0 - ac_prev[i]) * (1.0 - betas[i]).sqrt() / (1.0 - ac[i])
            }),
            log_betas: map(&|i| betas[i].ln()),
            posterior_variance,
            posterior_log_variance_clipped,
            betas,
            alphas_cumprod: ac,
            alphas_cumprod_prev: ac_prev,
        })
    }

    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// log of the "fixed large" variance (β̃_1 at i = 0, β_i elsewhere), used by models
    /// trained without learned sigma.
    pub fn fixed_large_log_variance(&self, i: usize) -> f64 {
        if i == 0 {
            self.posterior_variance[1].ln()
        } else {
            self.log_betas[i]
        }
    }
}

/// Schedules are pure functions of the step count; requests share them.
#[derive(Default)]
pub struct ScheduleCache {
    inner: Mutex<HashMap<usize, Arc<Schedule>>>,
}

impl ScheduleCache {
    pub fn get(&self, steps: usize) -> Result<Arc<Schedule>, DiffusionError> {
        let mut map = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&steps) {
            return Ok(s.clone());
        }
        let s = Arc::new(Schedule::new(steps)?);
        map.insert(steps, s.clone());
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn respacing_250_matches_spec() {
        let t = respaced_timesteps(250);
        assert_eq!(&t[..4], &[0, 4, 8, 12]);
        assert_eq!(t[248], 995);
        assert_eq!(t[249], 999);
        let mut sorted = t.clone();
        sorted.dedup();
        assert_eq!(sorted.len(), 250);
    }

    #[test]
    fn full_schedule_is_the_base_schedule() {
        let s = Schedule::new(1000).unwrap();
        let base = cumprod_alphas(&linear_betas());
        for i in [0, 1, 500, 999] {
            assert!((s.alphas_cumprod[i] - base[i]).abs() < 1e-15);
        }
        assert!((s.betas[0] - 1e-4).abs() < 1e-15); // 1 − (1 − β) is not exact in f64
        assert!((s.betas[999] - 0.02).abs() < 1e-15);
    }

    #[test]
    fn step_count_limits() {
        assert!(Schedule::new(1).is_err());
        assert!(Schedule::new(1001).is_err());
        assert_eq!(Schedule::new(2).unwrap().timestep_map, vec![0, 999]);
    }
}
