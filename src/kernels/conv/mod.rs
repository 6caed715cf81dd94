//! 3×3 convolutions of the VAE decoder over channels-last activations: `im2col3x3` (with the
//! nearest ×2 upsampling fused in) so a convolution is one matmul whose output is already in
//! layout; the upsampling convolution as four 2×2 phase matmuls (`im2col_up2_phases`,
//! `up2_phase_weights`, `pixel_shuffle_bias`); and the direct kernel for the output
//! convolution's ≤ 4 channels (`conv3x3_small`); and the implicit-GEMM 3×3 convolution
//! (`conv3x3_implicit`: mma.sync tensor cores, the im2col tiles built in shared memory, by
//! default from one halo of the input per channel block for all 9 taps).

use candle_core::backend::BackendStorage;
use candle_core::Tensor;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape};

use super::cpu::{cpu_f32, cpu_store};
use super::tiling::{CONVH_BK, CONV_BK};

#[cfg(feature = "cuda")]
mod cuda;

/// The columns of a 3×3, padding-1 convolution over channels-last `x` [B, H, W, C], after a
/// nearest upsampling by `up` (1 or 2): [B·H·up·W·up, 9·C], column (ky·3 + kx)·C + c. With the
/// weight as [Cout, 3·3·C] (`[Cout, C, 3, 3]` permuted to (ky, kx, c)) the convolution is one
/// matmul whose output is already channels-last.
pub fn im2col3x3(x: &Tensor, up: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if !(up == 1 || up == 2) {
        candle_core::bail!("im2col3x3: upsampling factor {up} is not 1 or 2");
    }
    let op = Im2col {
        dims: [b, h, w, c],
        up,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// A 3×3 convolution (padding 1) of channels-last `x` [B, H, W, C] with at most 4 output
/// channels: weight [Cout, 3·3·C] in (ky, kx, c) order, bias [Cout]; returns [B, H, W, Cout].
/// One direct kernel on CUDA (no im2col: for the VAE's 128 → 3 output convolution that was
/// nine copies of a full-resolution activation and cuBLAS's unaligned N = 3 path); needs C a
/// multiple of 8 and at most 336 there (`conv3x3_small_fits`).
pub fn conv3x3_small(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (cout, k) = weight.dims2()?;
    if k != 9 * c || bias.dims() != [cout] || !(1..=4).contains(&cout) {
        candle_core::bail!(
            "conv3x3_small: weight {:?} / bias {:?} do not fit {c} channels to 1..=4",
            weight.dims(),
            bias.dims()
        );
    }
    let op = Conv3x3Small {
        dims: [b, h, w, c],
        cout,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

/// A 3×3, padding-1 convolution of channels-last `x` [B, H, W, C] plus `residual` [B, H, W, Cout]
/// if given: weight [Cout, 3·3·C] in (ky, kx, c) order, bias [Cout]; returns [B, H, W, Cout].
/// Where `conv3x3_implicit_fits` (CUDA, bf16/f16, C a multiple of 32, Cout of 8) one
/// tensor-core kernel computes it as an implicit GEMM: the im2col tiles are gathered in shared
/// memory, so the 9× larger column matrix never reaches memory, and bias and residual are added
/// before the single write. Elsewhere `im2col3x3` + one matmul + the adds. `tiling` picks the
/// kernel ([`ConvTiling`]); every choice computes the same function, each in its own summation
/// order, and none lets a sample's pixels depend on the batch.
pub fn conv3x3_implicit(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: Option<&Tensor>,
    tiling: ConvTiling,
) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (cout, k) = weight.dims2()?;
    let out_dims = [b, h, w, cout];
    if k != 9 * c || bias.dims() != [cout] || residual.is_some_and(|r| r.dims() != out_dims) {
        candle_core::bail!(
            "conv3x3_implicit: weight {:?}, bias {:?}, residual {:?} do not fit {:?} to {cout}",
            weight.dims(),
            bias.dims(),
            residual.map(|r| r.dims()),
            x.dims()
        );
    }
    if conv3x3_implicit_fits(x, cout) {
        let op = Conv3x3Implicit {
            dims: [b, h, w, c],
            tiling,
            bias: bias.contiguous()?,
            residual: residual.map(|r| r.contiguous()).transpose()?,
        };
        return x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op);
    }
    let y = im2col3x3(x, 1)?
        .matmul(&weight.t()?)?
        .broadcast_add(bias)?
        .reshape((b, h, w, cout))?;
    match residual {
        Some(r) => y + r,
        None => Ok(y),
    }
}

/// The CUDA kernel and output tile of `conv3x3_implicit` (`--conv-tiling`, hidden: for
/// measuring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ConvTiling {
    /// `conv3x3_igemm`: 128 pixels × 128 channels, K blocks of 32 channels within one tap, the
    /// input gathered again for every tap.
    Gather,
    /// `conv3x3_halo`, 8 × 16 pixels × 128 channels: channel blocks outer, the 9 taps read one
    /// halo of the input in shared memory. The fastest on the H200 (docs/perf.md v0.30).
    #[default]
    #[value(name = "halo128")]
    Halo128,
    /// `conv3x3_halo`, 16 × 16 pixels × 128 channels (one CTA an SM: as fast at B = 64, slower
    /// at 8).
    #[value(name = "halo256")]
    Halo256,
}

impl ConvTiling {
    /// Whether this is a halo tiling and it takes `cin` input channels (a multiple of its
    /// channel block); the launcher runs `Gather` otherwise, and where the GPU lacks the shared
    /// memory.
    pub fn halo_fits(self, cin: usize) -> bool {
        self != Self::Gather && cin.is_multiple_of(CONVH_BK)
    }
}

/// Whether `conv3x3_implicit` runs as its tensor-core kernel for `x` and `cout` outputs.
pub fn conv3x3_implicit_fits(x: &Tensor, cout: usize) -> bool {
    let c = x.dim(candle_core::D::Minus1).unwrap_or(0);
    x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && conv3x3_implicit_channels_fit(c, cout)
}

/// The channel counts the implicit-GEMM kernel takes: a K block of `CONV_BK` within one tap,
/// output pairs within 16-byte rows.
pub fn conv3x3_implicit_channels_fit(cin: usize, cout: usize) -> bool {
    cin > 0 && cin.is_multiple_of(CONV_BK) && cout > 0 && cout.is_multiple_of(8)
}

/// Whether `conv3x3_small` takes a convolution of `c` input and `cout` output channels.
pub fn conv3x3_small_fits(c: usize, cout: usize) -> bool {
    (1..=4).contains(&cout) && c.is_multiple_of(8) && c <= 336
}

/// Nearest ×2 upsampling followed by a 3×3, padding-1 convolution of channels-last `x`
/// [B, H, W, C], as four 2×2 convolutions of `x` itself, one per output phase (py, px): the
/// columns [4, B·H·W, 4·C], column (dy·2 + dx)·C + c = x[b, y + py + dy − 1, x + px + dx − 1, c]
/// (zero outside). Multiplied by `up2_phase_weights` and put back in place by
/// `pixel_shuffle_bias`, it equals the convolution of the upsampled image with 2.25× fewer
/// FLOPs and im2col bytes.
pub fn im2col_up2_phases(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.contiguous()?
        .apply_op1_no_bwd(&Im2colUp2 { dims: [b, h, w, c] })
}

/// The phase weights for `im2col_up2_phases`: a 3×3 weight [O, C, 3, 3] as [4, O, 4·C], each
/// 2×2 tap the sum of the 3×3 taps that read the same low-resolution pixel in that phase.
pub fn up2_phase_weights(weight: &Tensor) -> Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("up2_phase_weights: kernel {kh}×{kw} is not 3×3");
    }
    let wf = weight.to_dtype(DType::F32)?;
    // The 3×3 taps (start, count) that phase p's 2×2 tap d collects, per axis.
    let taps = |p: usize, d: usize| match (p, d) {
        (0, 0) => (0, 1),
        (0, _) => (1, 2),
        (_, 0) => (0, 2),
        _ => (2, 1),
    };
    let mut phases = Vec::with_capacity(4);
    for py in 0..2 {
        for px in 0..2 {
            let mut cols = Vec::with_capacity(4);
            for dy in 0..2 {
                for dx in 0..2 {
                    let ((ys, yl), (xs, xl)) = (taps(py, dy), taps(px, dx));
                    cols.push(wf.narrow(2, ys, yl)?.narrow(3, xs, xl)?.sum((2, 3))?);
                }
            }
            phases.push(Tensor::cat(&cols, 1)?);
        }
    }
    Tensor::stack(&phases, 0)?.to_dtype(weight.dtype())
}

/// The four phase outputs y [4, B·H·W, C] interleaved into [B, 2H, 2W, C], plus `bias` [C].
pub fn pixel_shuffle_bias(
    y: &Tensor,
    bias: &Tensor,
    b: usize,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    let (phases, m, c) = y.dims3()?;
    if phases != 4 || m != b * h * w || bias.dims() != [c] {
        candle_core::bail!(
            "pixel_shuffle_bias: y {:?} and bias {:?} do not fit [4, {}, C]",
            y.dims(),
            bias.dims(),
            b * h * w
        );
    }
    y.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &PixelShuffle { dims: [b, h, w, c] })
}

struct Im2col {
    /// Input [B, H, W, C].
    dims: [usize; 4],
    up: usize,
}

struct Conv3x3Small {
    /// Input [B, H, W, C].
    dims: [usize; 4],
    cout: usize,
}

// Read only by `cuda_fwd`: a build without CUDA routes through im2col before making one.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Conv3x3Implicit {
    /// Input [B, H, W, C].
    dims: [usize; 4],
    tiling: ConvTiling,
    bias: Tensor,
    residual: Option<Tensor>,
}

struct Im2colUp2 {
    /// Input [B, H, W, C].
    dims: [usize; 4],
}

struct PixelShuffle {
    /// Low-resolution [B, H, W, C].
    dims: [usize; 4],
}

impl Im2col {
    fn out_shape(&self) -> Shape {
        let [b, h, w, c] = self.dims;
        Shape::from((b * h * self.up * w * self.up, 9 * c))
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "diffit-im2col3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let [b, h, w, c] = self.dims;
        let (ho, wo) = (h * self.up, w * self.up);
        let mut out = vec![0f32; b * ho * wo * 9 * c];
        for (m, row) in out.chunks_mut(9 * c).enumerate() {
            let (bi, yo, xo) = (m / (ho * wo), (m / wo) % ho, m % wo);
            for tap in 0..9 {
                let yy = yo as isize + (tap / 3) as isize - 1;
                let xx = xo as isize + (tap % 3) as isize - 1;
                if yy < 0 || xx < 0 || yy >= ho as isize || xx >= wo as isize {
                    continue;
                }
                let (ys, xs) = (yy as usize / self.up, xx as usize / self.up);
                let src = &x[((bi * h + ys) * w + xs) * c..][..c];
                row[tap * c..][..c].copy_from_slice(src);
            }
        }
        Ok((cpu_store(out, s.dtype())?, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::im2col3x3((s, l), self.dims, self.up)?;
        Ok((out, self.out_shape()))
    }
}

impl CustomOp3 for Conv3x3Small {
    fn name(&self) -> &'static str {
        "diffit-conv3x3-small"
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
        let (x, wt, bias) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let [b, h, w, c] = self.dims;
        let cout = self.cout;
        let mut out = vec![0f32; b * h * w * cout];
        for (p, o) in out.chunks_mut(cout).enumerate() {
            let (bi, y, xo) = (p / (h * w), (p / w) % h, p % w);
            o.copy_from_slice(&bias);
            for tap in 0..9 {
                let (yy, xx) = (y as isize + tap / 3 - 1, xo as isize + tap % 3 - 1);
                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                    continue;
                }
                let src = &x[((bi * h + yy as usize) * w + xx as usize) * c..][..c];
                for (co, acc) in o.iter_mut().enumerate() {
                    let wrow = &wt[co * 9 * c + tap as usize * c..][..c];
                    *acc += src.iter().zip(wrow).map(|(a, b)| a * b).sum::<f32>();
                }
            }
        }
        Ok((cpu_store(out, s1.dtype())?, Shape::from((b, h, w, cout))))
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
        let out = cuda::conv3x3_small((s1, l1), (s2, l2), (s3, l3), self.dims, self.cout)?;
        let [b, h, w, _] = self.dims;
        Ok((out, Shape::from((b, h, w, self.cout))))
    }
}

impl CustomOp2 for Conv3x3Implicit {
    fn name(&self) -> &'static str {
        "diffit-conv3x3-implicit"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("conv3x3_implicit routes the CPU through im2col3x3 + matmul")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::kernels::launch::on_gpu;
        let (bias_guard, bias_l) = self.bias.storage_and_layout();
        let bias = on_gpu(&bias_guard, "conv3x3_implicit: the bias")?;
        let res_guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &res_guard {
            Some((guard, layout)) => {
                Some((on_gpu(guard, "conv3x3_implicit: the residual")?, *layout))
            }
            None => None,
        };
        let cout = l2.shape().dims2()?.0;
        let out = cuda::conv3x3_igemm(
            (s1, l1),
            (s2, l2),
            (bias, bias_l),
            residual,
            self.dims,
            cout,
            self.tiling,
        )?;
        let [b, h, w, _] = self.dims;
        Ok((out, Shape::from((b, h, w, cout))))
    }
}

impl CustomOp1 for Im2colUp2 {
    fn name(&self) -> &'static str {
        "diffit-im2col-up2-phases"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let [b, h, w, c] = self.dims;
        let m_total = b * h * w;
        let mut out = vec![0f32; 4 * m_total * 4 * c];
        for (row, cols) in out.chunks_mut(4 * c).enumerate() {
            let (phase, m) = (row / m_total, row % m_total);
            let (bi, y, xo) = (m / (h * w), (m / w) % h, m % w);
            for tap in 0..4 {
                let yy = y as isize + (phase / 2) as isize + (tap / 2) as isize - 1;
                let xx = xo as isize + (phase % 2) as isize + (tap % 2) as isize - 1;
                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                    continue;
                }
                let src = &x[((bi * h + yy as usize) * w + xx as usize) * c..][..c];
                cols[tap * c..][..c].copy_from_slice(src);
            }
        }
        Ok((cpu_store(out, s.dtype())?, Shape::from((4, m_total, 4 * c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [b, h, w, c] = self.dims;
        let out = cuda::im2col_up2_phases((s, l), self.dims)?;
        Ok((out, Shape::from((4, b * h * w, 4 * c))))
    }
}

impl CustomOp2 for PixelShuffle {
    fn name(&self) -> &'static str {
        "diffit-pixel-shuffle-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, bias) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?);
        let [b, h, w, c] = self.dims;
        let m_total = b * h * w;
        let mut out = vec![0f32; y.len()];
        for (q, px) in out.chunks_mut(c).enumerate() {
            let (bi, yy, xx) = (q / (4 * h * w), (q / (2 * w)) % (2 * h), q % (2 * w));
            let phase = (yy % 2) * 2 + xx % 2;
            let m = (bi * h + yy / 2) * w + xx / 2;
            let src = &y[(phase * m_total + m) * c..][..c];
            for ((o, &v), &bv) in px.iter_mut().zip(src).zip(&bias) {
                *o = v + bv;
            }
        }
        Ok((
            cpu_store(out, s1.dtype())?,
            Shape::from((b, 2 * h, 2 * w, c)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [b, h, w, c] = self.dims;
        let out = cuda::pixel_shuffle_bias((s1, l1), (s2, l2), self.dims)?;
        Ok((out, Shape::from((b, 2 * h, 2 * w, c))))
    }
}
