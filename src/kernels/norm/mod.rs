//! Normalisation: the DiffiT block's LayerNorm (no affine parameters) and the VAE decoder's
//! GroupNorm over channels-last activations, with the SiLU that follows it fused in.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};

use super::cpu::{cpu_f32, cpu_store, rows_cols};

#[cfg(feature = "cuda")]
mod cuda;

/// LayerNorm over the last dimension with no affine parameters.
pub fn layer_norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LayerNorm { eps })
}

/// GroupNorm with affine parameters over channels-last `x` [B, spatial…, C] (statistics per
/// sample and group of C / groups channels), then SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    let b = x.dim(0)?;
    if x.rank() < 2 || groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {groups} groups do not divide {c} channels");
    }
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "group_norm: gamma {:?} / beta {:?} are not [{c}]",
            gamma.dims(),
            beta.dims()
        );
    }
    let op = GroupNorm {
        batch: b,
        hw: x.elem_count() / (b * c).max(1),
        channels: c,
        groups,
        eps,
        silu,
        im2col: None,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &op)
}

/// SiLU(GroupNorm(x)) of channels-last `x` [B, H, W, C] as the im2col columns of a 3×3
/// convolution, [B·H·W, 9·C]: the same values (and bits) as `im2col3x3(&group_norm(x, …, true)?,
/// 1)`, in one pass after the statistics on CUDA where C is a multiple of the 16-byte pack (the
/// normalised activation is never stored on its own); elsewhere those two ops.
pub fn group_norm_silu_im2col3x3(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let fused = x.device().is_cuda()
        && c.is_multiple_of(16 / x.dtype().size_in_bytes())
        && b * h * w * c < u32::MAX as usize
        && groups > 0
        && c.is_multiple_of(groups)
        && gamma.dims() == [c]
        && beta.dims() == [c];
    if !fused {
        return crate::kernels::im2col3x3(&group_norm(x, gamma, beta, groups, eps, true)?, 1);
    }
    let op = GroupNorm {
        batch: b,
        hw: h * w,
        channels: c,
        groups,
        eps,
        silu: true,
        im2col: Some((h, w)),
    };
    x.contiguous()?
        .apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &op)
}

struct LayerNorm {
    eps: f32,
}

struct GroupNorm {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    batch: usize,
    hw: usize,
    channels: usize,
    groups: usize,
    eps: f32,
    silu: bool,
    /// Output the 3×3 im2col columns of an (H, W) image instead (CUDA only:
    /// `group_norm_silu_im2col3x3` composes two ops elsewhere).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    im2col: Option<(usize, usize)>,
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "diffit-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l);
        let mut out = cpu_f32(s, l)?;
        for row in out.chunks_mut(cols) {
            let mean = row.iter().sum::<f32>() / cols as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            row.iter_mut().for_each(|v| *v = (*v - mean) * rstd);
        }
        Ok((cpu_store(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(l);
        let out = cuda::layer_norm((s, l), rows, cols, self.eps)?;
        Ok((out, l.shape().clone()))
    }
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "diffit-group-norm"
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
        if self.im2col.is_some() {
            candle_core::bail!(
                "group_norm → im2col runs on CUDA only (the caller composes two ops)"
            );
        }
        let mut x = cpu_f32(s1, l1)?;
        let (gamma, beta) = (cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (c, cg) = (self.channels, self.channels / self.groups);
        let count = (self.hw * cg) as f64;
        for sample in x.chunks_mut(self.hw * c) {
            for g in 0..self.groups {
                let chans = g * cg..(g + 1) * cg;
                let vals = || {
                    sample
                        .chunks(c)
                        .flat_map(|px| px[chans.clone()].iter().map(|&v| v as f64))
                };
                let mean = vals().sum::<f64>() / count;
                let var = vals().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
                let rstd = 1.0 / (var + self.eps as f64).sqrt();
                for px in sample.chunks_mut(c) {
                    for ch in chans.clone() {
                        let mut v = ((px[ch] as f64 - mean) * rstd) as f32 * gamma[ch] + beta[ch];
                        if self.silu {
                            v /= 1.0 + (-v).exp();
                        }
                        px[ch] = v;
                    }
                }
            }
        }
        Ok((cpu_store(x, s1.dtype())?, l1.shape().clone()))
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
        let out = cuda::group_norm(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            [self.batch, self.hw, self.channels, self.groups],
            self.eps,
            self.silu,
            self.im2col,
        )?;
        let shape = match self.im2col {
            Some(_) => Shape::from((self.batch * self.hw, 9 * self.channels)),
            None => l1.shape().clone(),
        };
        Ok((out, shape))
    }
}
