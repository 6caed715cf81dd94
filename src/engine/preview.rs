//! Live previews: the sampler's current denoised estimate x̂0, mapped from latent channels to
//! pixel channels by one fixed linear projection per VAE (the way ComfyUI and A1111 preview SD
//! latents), at latent resolution. No VAE decode per preview, so previews cost a few thousand
//! multiply-adds per image on the host, next to a network forward over the whole batch.
//!
//! The projection is fitted once, when an engine starts, by least squares between random
//! latents and the VAE's own decodes of them, averaged over each latent cell's f×f pixel block.
//! It needs no file shipped with the model and follows whatever VAE is loaded.

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::model::VaeDecoder;

/// Random latents decoded for the fit: each gives h·w (latent, pixel-block) pairs, so a few
/// are plenty for the (C + 1) × out_channels unknowns.
const FIT_LATENTS: usize = 4;
/// Ridge term: keeps the normal equations well-posed with any VAE.
const RIDGE: f64 = 1e-3;

/// A preview image: planar u8 pixels at latent resolution.
#[derive(Debug, Clone)]
pub struct PreviewImage {
    pub pixels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// The fitted latent → pixel projection.
#[derive(Debug, Clone)]
pub struct LatentPreview {
    in_channels: usize,
    out_channels: usize,
    /// Row-major [out_channels][in_channels + 1]; the last column is the bias.
    weights: Vec<f64>,
}

impl LatentPreview {
    /// Fits the projection for `vae` from its own decodes of random latents of shape
    /// (C, h, w). Deterministic: the latents come from a fixed seed.
    pub fn fit(
        vae: &VaeDecoder,
        latent: (usize, usize, usize),
        device: &Device,
    ) -> anyhow::Result<Self> {
        use rand::SeedableRng;
        use rand_distr::{Distribution, StandardNormal};
        let (c, h, w) = latent;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
        let z: Vec<f32> = (0..FIT_LATENTS * c * h * w)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let zt = Tensor::from_vec(z.clone(), (FIT_LATENTS, c, h, w), device)?;
        let decoded = vae
            .decode_chunked(&zt, FIT_LATENTS)
            .context("decoding the preview fit's latents")?
            .to_dtype(DType::F32)?;
        let (_, out_c, ph, pw) = decoded.dims4()?;
        anyhow::ensure!(
            ph % h == 0 && pw % w == 0 && ph / h == pw / w,
            "the VAE decodes {h}x{w} latents to {ph}x{pw} pixels, not an integer scale"
        );
        let f = ph / h;
        let px = decoded.flatten_all()?.to_vec1::<f32>()?;
        // Normal equations A·W = B: A = XᵀX + λI over features [z_0 … z_{C−1}, 1].
        let k = c + 1;
        let mut a = vec![0f64; k * k];
        let mut b = vec![0f64; k * out_c];
        let mut x = vec![0f64; k];
        for n in 0..FIT_LATENTS {
            for i in 0..h {
                for j in 0..w {
                    for ch in 0..c {
                        x[ch] = z[((n * c + ch) * h + i) * w + j] as f64;
                    }
                    x[c] = 1.0;
                    for r in 0..k {
                        for s in 0..k {
                            a[r * k + s] += x[r] * x[s];
                        }
                    }
                    for o in 0..out_c {
                        let mut sum = 0f64;
                        for di in 0..f {
                            let row = ((n * out_c + o) * ph + i * f + di) * pw + j * f;
                            sum += px[row..row + f].iter().map(|&v| v as f64).sum::<f64>();
                        }
                        let target = sum / (f * f) as f64;
                        for r in 0..k {
                            b[r * out_c + o] += x[r] * target;
                        }
                    }
                }
            }
        }
        for r in 0..k {
            a[r * k + r] += RIDGE;
        }
        let solved = solve(a, b, k, out_c).context("fitting the preview projection")?;
        // Transpose [k][out_c] to [out_c][k].
        let mut weights = vec![0f64; out_c * k];
        for r in 0..k {
            for o in 0..out_c {
                weights[o * k + r] = solved[r * out_c + o];
            }
        }
        Ok(Self {
            in_channels: c,
            out_channels: out_c,
            weights,
        })
    }

    /// Projects one latent [1, C, h, w] (or [C, h, w]) to a preview image.
    pub fn render(&self, latent: &Tensor) -> anyhow::Result<PreviewImage> {
        let latent = match latent.rank() {
            3 => latent.unsqueeze(0)?,
            _ => latent.clone(),
        };
        let mut images = self.render_many(&[&latent])?;
        images
            .pop()
            .ok_or_else(|| anyhow::anyhow!("no preview rendered"))
    }

    /// Projects latents [1, C, h, w] to preview images with one copy to the host: on a GPU
    /// that is one synchronisation per step, however many images want previews.
    pub fn render_many(&self, latents: &[&Tensor]) -> anyhow::Result<Vec<PreviewImage>> {
        let Some(first) = latents.first() else {
            return Ok(Vec::new());
        };
        let dims = first.dims();
        let (c, h, w) = match dims {
            [1, c, h, w] => (*c, *h, *w),
            _ => anyhow::bail!("a preview needs latents of shape [1, C, h, w], got {dims:?}"),
        };
        anyhow::ensure!(
            c == self.in_channels,
            "the preview projection takes {} channels, the latent has {c}",
            self.in_channels
        );
        let z = Tensor::cat(latents, 0)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let per = c * h * w;
        Ok(z.chunks(per)
            .map(|one| self.project(one, c, h * w, h, w))
            .collect())
    }

    fn project(&self, z: &[f32], c: usize, plane: usize, h: usize, w: usize) -> PreviewImage {
        let k = c + 1;
        let mut pixels = vec![0u8; self.out_channels * plane];
        for o in 0..self.out_channels {
            let wrow = &self.weights[o * k..(o + 1) * k];
            for p in 0..plane {
                let mut v = wrow[c];
                for ch in 0..c {
                    v += wrow[ch] * z[ch * plane + p] as f64;
                }
                pixels[o * plane + p] = ((v + 1.0) * 127.5).clamp(0.0, 255.0) as u8;
            }
        }
        PreviewImage {
            pixels,
            channels: self.out_channels,
            height: h,
            width: w,
        }
    }
}

/// Solves A·X = B for X (A: k×k, B: k×m, row-major) by Gaussian elimination with partial
/// pivoting.
fn solve(mut a: Vec<f64>, mut b: Vec<f64>, k: usize, m: usize) -> anyhow::Result<Vec<f64>> {
    for col in 0..k {
        let pivot = (col..k)
            .max_by(|&r, &s| a[r * k + col].abs().total_cmp(&a[s * k + col].abs()))
            .unwrap_or(col);
        anyhow::ensure!(
            a[pivot * k + col].abs() > 1e-12,
            "singular system (column {col})"
        );
        if pivot != col {
            for j in 0..k {
                a.swap(col * k + j, pivot * k + j);
            }
            for j in 0..m {
                b.swap(col * m + j, pivot * m + j);
            }
        }
        for r in 0..k {
            if r == col {
                continue;
            }
            let factor = a[r * k + col] / a[col * k + col];
            if factor == 0.0 {
                continue;
            }
            for j in 0..k {
                a[r * k + j] -= factor * a[col * k + j];
            }
            for j in 0..m {
                b[r * m + j] -= factor * b[col * m + j];
            }
        }
    }
    for r in 0..k {
        let d = a[r * k + r];
        for j in 0..m {
            b[r * m + j] /= d;
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn solves_small_systems() {
        // [[2, 1], [1, 3]] · X = [[3, 5], [4, 10]]  →  X = [[1, 1], [1, 3]]
        let x = solve(vec![2., 1., 1., 3.], vec![3., 5., 4., 10.], 2, 2).unwrap();
        for (got, want) in x.iter().zip([1., 1., 1., 3.]) {
            assert!((got - want).abs() < 1e-12, "{x:?}");
        }
        assert!(solve(vec![0., 0., 0., 0.], vec![1., 1.], 2, 1).is_err());
    }

    #[test]
    fn renders_with_a_known_projection() {
        let p = LatentPreview {
            in_channels: 2,
            out_channels: 1,
            weights: vec![1.0, -1.0, 0.0],
        };
        let z =
            Tensor::from_vec(vec![1f32, 0., -1., 0., 0., 0.], (1, 2, 1, 3), &Device::Cpu).unwrap();
        let img = p.render(&z).unwrap();
        assert_eq!((img.channels, img.height, img.width), (1, 1, 3));
        assert_eq!(img.pixels, vec![255, 127, 0]);
        assert!(p
            .render(&Tensor::zeros((1, 3, 1, 1), DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
