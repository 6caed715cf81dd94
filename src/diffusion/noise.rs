//! Per-sample Gaussian noise. Each sample owns its generator, so its image depends only on
//! its own seed and never on which other samples shared a batch.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Largest seed drawn at random: 2^53 − 1, so a seed echoed in JSON survives clients that read
/// numbers as float64 (JavaScript, jq) and reproduces the image. Any u64 is accepted as input.
pub const MAX_RANDOM_SEED: u64 = (1 << 53) - 1;

/// A random first seed for `n` images (seeds s … s + n − 1), all at or below `MAX_RANDOM_SEED`.
pub fn random_seed(n: u64) -> u64 {
    use rand::Rng;
    rand::thread_rng().gen_range(0..=MAX_RANDOM_SEED.saturating_sub(n.saturating_sub(1)))
}

/// Where a sample's initial latent and per-step noise come from.
pub trait NoiseSource: Send {
    /// The starting latent, `len` values.
    fn initial(&mut self, len: usize) -> Vec<f32>;
    /// The noise for sampler iteration `iteration` (0 = the noisiest step), `len` values.
    fn step(&mut self, iteration: usize, len: usize) -> Vec<f32>;
}

/// ChaCha8 (stable across platforms and crate versions) seeded with the sample's seed.
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    fn draw(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect()
    }
}

impl NoiseSource for SeededNoise {
    fn initial(&mut self, len: usize) -> Vec<f32> {
        self.draw(len)
    }

    fn step(&mut self, _iteration: usize, len: usize) -> Vec<f32> {
        self.draw(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_different_seed_differs() {
        let a = SeededNoise::new(7).initial(64);
        let b = SeededNoise::new(7).initial(64);
        let c = SeededNoise::new(8).initial(64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().sum::<f32>() / 64.0;
        assert!(mean.abs() < 0.5, "mean {mean}");
    }
}
