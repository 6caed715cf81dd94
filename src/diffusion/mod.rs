//! Noise schedule, samplers and guidance: everything between the network and a clean latent.

pub mod guidance;
pub mod noise;
pub mod sampler;
pub mod schedule;

pub use guidance::{Guidance, GuidanceSchedule};
pub use noise::{random_seed, NoiseSource, SeededNoise, MAX_RANDOM_SEED};
pub use sampler::{denoise_step, Denoiser, SampleState, SamplerKind};
pub use schedule::{Schedule, ScheduleCache};

#[derive(Debug, thiserror::Error)]
pub enum DiffusionError {
    #[error(
        "steps must be between {} and {}, got {0}",
        schedule::MIN_STEPS,
        schedule::MAX_STEPS
    )]
    Steps(usize),
    #[error(
        "guidance_scale must be a finite number between 0 and {}, got {0}",
        guidance::MAX_GUIDANCE_SCALE
    )]
    GuidanceScale(f32),
    #[error("unknown sampler '{0}' (ddpm | ddim | dpm-solver++)")]
    Sampler(String),
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
}
