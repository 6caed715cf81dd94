//! The end of a bucketed denoising step (`pipeline::graphs`) in one op: classifier-free guidance
//! on the first guided channels, the sampler's linear update, DPM-Solver++'s previous-estimate
//! term and DDPM's noise term, each sample row with its own coefficients read from the step's
//! parameter buffer. As ≈ 35 candle ops on [rows, C, H, W] f32 tensors this was ≈ 30 kernels a
//! step (≈ 0.08 ms of a 2 ms B = 1 step on an H200); fused it is one.
//!
//! The op computes exactly the candle expressions `graphs::step_body` used (and
//! `diffusion::denoise_step` computes): every product, sum and difference rounded to f32 on its
//! own, in the same order — no fused multiply-adds — so the bucketed step stays bit-identical to
//! the direct one (tests/sampling.rs) on the CPU and on the GPU.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::cpu::cpu_f32;

#[cfg(feature = "cuda")]
mod cuda;

/// Where each per-row parameter of the update sits in the step's f32 parameter buffer: the
/// offset of a column of `rows` values (one per network row; sample rows come first), and of
/// the noise [rows, C, H, W].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateColumns {
    /// The sampler's linear coefficients: x0 = k0·x − k1·ε, next = (k2·x + k3·ε) + k4·x0.
    pub coefs: [usize; 5],
    /// Weight of the previous x0 estimate (added where `prev` is set).
    pub d: usize,
    pub log_var_max: usize,
    pub log_var_min: usize,
    /// Noise weight; above 0.5 the update adds noise.
    pub noise_weight: usize,
    /// Above 0.5: add the previous x0 estimate.
    pub prev: usize,
    /// Above 0.5: the sample is guided.
    pub guided: usize,
    /// The sample's guidance scale.
    pub scale: usize,
    /// The network row holding the sample's unconditional output (as f32).
    pub uncond: usize,
    /// The noise, [rows, C, H, W].
    pub noise: usize,
}

impl UpdateColumns {
    /// Every offset in the field order (the CUDA kernel's argument order); the noise last.
    pub fn offsets(&self) -> [usize; 14] {
        let [k0, k1, k2, k3, k4] = self.coefs;
        [
            k0,
            k1,
            k2,
            k3,
            k4,
            self.d,
            self.log_var_max,
            self.log_var_min,
            self.noise_weight,
            self.prev,
            self.guided,
            self.scale,
            self.uncond,
            self.noise,
        ]
    }
}

/// What the update needs besides its tensors.
#[derive(Debug, Clone, Copy)]
pub struct UpdateSpec {
    pub columns: UpdateColumns,
    /// Latent channels C; the network output has 2·C (ε, then the variance interpolation) when
    /// `learn_sigma`, else C.
    pub channels: usize,
    pub learn_sigma: bool,
    /// Channels guidance applies to (the first ones).
    pub guided_channels: usize,
}

/// One step's update for every row: `out` the network output [rows, C or 2C, H, W] (f32), `x`
/// and `x0_prev` [rows, C, H, W] (f32), `params` the step's parameter buffer. Returns [2, rows,
/// C, H, W]: the next latents, then the x0 estimates.
pub fn guided_update(
    out: &Tensor,
    x: &Tensor,
    x0_prev: &Tensor,
    params: &Tensor,
    spec: UpdateSpec,
) -> Result<Tensor> {
    let (rows, c, h, w) = x.dims4()?;
    let out_c = if spec.learn_sigma { 2 * c } else { c };
    if out.dims() != [rows, out_c, h, w] || x0_prev.dims() != x.dims() || c != spec.channels {
        candle_core::bail!(
            "guided_update: output {:?}, x {:?}, x0_prev {:?} do not fit {} channels",
            out.dims(),
            x.dims(),
            x0_prev.dims(),
            spec.channels
        );
    }
    let offsets = spec.columns.offsets();
    let (columns, noise) = offsets.split_at(13);
    let needed = columns
        .iter()
        .map(|o| o + rows)
        .chain([noise[0] + x.elem_count()])
        .max()
        .unwrap_or(0);
    if params.rank() != 1 || params.dim(0)? < needed {
        candle_core::bail!(
            "guided_update: a parameter buffer of {:?} is shorter than its columns ({needed})",
            params.dims()
        );
    }
    for t in [out, x, x0_prev, params] {
        if t.dtype() != DType::F32 {
            candle_core::bail!(
                "guided_update: every tensor must be f32, got {:?}",
                t.dtype()
            );
        }
    }
    let op = GuidedUpdate {
        rows,
        pixels: h * w,
        hw: (h, w),
        spec,
        params: params.contiguous()?,
    };
    out.contiguous()?
        .apply_op3_no_bwd(&x.contiguous()?, &x0_prev.contiguous()?, &op)
}

struct GuidedUpdate {
    rows: usize,
    /// H·W.
    pixels: usize,
    hw: (usize, usize),
    spec: UpdateSpec,
    params: Tensor,
}

impl GuidedUpdate {
    fn out_shape(&self) -> Shape {
        Shape::from((2, self.rows, self.spec.channels, self.hw.0, self.hw.1))
    }
}

/// One element of the update: `cond`/`uncond` the element of the sample's conditional and
/// unconditional ε, `v` its variance interpolation value (when learned), `p(col)` the sample's
/// value of a column, `n` its noise. Returns (next, x0). Plain f32 arithmetic: Rust does not
/// contract `a * b + c`, matching candle's CPU ops one by one.
#[allow(clippy::too_many_arguments)]
fn update_one(
    cols: &UpdateColumns,
    p: impl Fn(usize) -> f32,
    guide: bool,
    learn_sigma: bool,
    x: f32,
    cond: f32,
    uncond: f32,
    v: f32,
    prev: f32,
    n: f32,
) -> (f32, f32) {
    let eps = if guide && p(cols.guided) > 0.5 {
        uncond + (cond - uncond) * p(cols.scale)
    } else {
        cond
    };
    let k = |i: usize| p(cols.coefs[i]);
    let x0 = x * k(0) - eps * k(1);
    let mut next = (x * k(2) + eps * k(3)) + x0 * k(4);
    if p(cols.prev) > 0.5 {
        next += prev * p(cols.d);
    }
    if p(cols.noise_weight) > 0.5 {
        let log_var = if learn_sigma {
            // candle's `(v + 1.0) / 2.0` and `1.0 - frac`: affine ops, one rounding each here.
            let frac = (v + 1.0) * 0.5;
            frac * p(cols.log_var_max) + (1.0 - frac) * p(cols.log_var_min)
        } else {
            p(cols.log_var_max)
        };
        next += ((log_var * 0.5).exp() * n) * p(cols.noise_weight);
    }
    (next, x0)
}

impl CustomOp3 for GuidedUpdate {
    fn name(&self) -> &'static str {
        "diffit-guided-update"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // f32 in (`guided_update` checked), so these are exact copies.
        let (out, x, prev) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (guard, pl) = self.params.storage_and_layout();
        let Storage::Cpu(ps) = &*guard else {
            candle_core::bail!("guided_update: the parameters are not on the CPU");
        };
        let params = cpu_f32(ps, pl)?;
        let UpdateSpec {
            columns: cols,
            channels: c,
            learn_sigma,
            guided_channels,
        } = self.spec;
        let (rows, hw) = (self.rows, self.pixels);
        let out_c = if learn_sigma { 2 * c } else { c };
        let per_row = c * hw;
        let mut res = vec![0f32; 2 * rows * per_row];
        let (next, x0) = res.split_at_mut(rows * per_row);
        for r in 0..rows {
            let p = |col: usize| params[col + r];
            let u = p(cols.uncond) as usize;
            for ch in 0..c {
                for px in 0..hw {
                    let i = (r * c + ch) * hw + px;
                    let at = |row: usize, channel: usize| out[(row * out_c + channel) * hw + px];
                    let cond = at(r, ch);
                    let guide = ch < guided_channels;
                    let uncond = if guide && u < rows { at(u, ch) } else { cond };
                    let v = if learn_sigma { at(r, c + ch) } else { 0.0 };
                    let n = params[cols.noise + i];
                    (next[i], x0[i]) = update_one(
                        &cols,
                        p,
                        guide,
                        learn_sigma,
                        x[i],
                        cond,
                        uncond,
                        v,
                        prev[i],
                        n,
                    );
                }
            }
        }
        Ok((CpuStorage::F32(res), self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (guard, pl) = self.params.storage_and_layout();
        let ps = crate::kernels::launch::on_gpu(&guard, "guided_update: the parameters")?;
        let res = cuda::guided_update(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            (ps, pl),
            self.rows,
            self.pixels,
            &self.spec,
        )?;
        Ok((res, self.out_shape()))
    }
}
