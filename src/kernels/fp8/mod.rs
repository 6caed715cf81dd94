//! FP8 linear layers (`--dtype fp8`): `y = act(x·Wᵀ + b) (+ residual)` with W and x in e4m3.
//!
//! Scaling: one f32 scale per output channel of W (its row's absolute maximum / 448, computed at
//! load by [`Fp8Weight::quantize`]) and one per token of x (the same, computed on the fly by the
//! kernel that quantises x). A token's LayerNorm, where one comes before the layer, is computed
//! in that same kernel (the `LayerNorm` [`Prologue`]): the normalised row is quantised without
//! ever being written in the run dtype. On CUDA one cuBLASLt FP8 matmul then applies both scale
//! vectors (its outer-vector scale modes), the bias and GELU (its epilogue) and the residual (C
//! with beta = 1) and writes the run dtype; where cuBLASLt offers no such algorithm the product
//! is computed unscaled and one pass applies scales and epilogue.
//!
//! The CPU fallback computes the same function in f32: it rounds the normalised, scaled
//! activations and the weights to e4m3 exactly as the GPU does (round to nearest even,
//! saturating at ±448, as CUDA's `__nv_cvt_float_to_fp8`), multiplies the dequantised values in
//! f32, and stores the run dtype. The tests bound the network's error through it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

use super::cpu::{cpu_f32, cpu_store, rows_cols};
use super::Activation;

#[cfg(feature = "cuda")]
mod cuda;

/// The largest finite e4m3 value: a row's absolute maximum maps onto it.
pub const E4M3_MAX: f32 = 448.0;

/// Whether a [n, k] weight can run in FP8: cuBLASLt's FP8 matmul needs K and N multiples of 16
/// (16-byte aligned rows of e4m3 operands and of the output).
pub fn fp8_fits(n: usize, k: usize) -> bool {
    n > 0 && k > 0 && n.is_multiple_of(16) && k.is_multiple_of(16)
}

/// A weight [N, K] in e4m3 with one f32 scale per output channel (row).
#[derive(Debug, Clone)]
pub struct Fp8Weight {
    /// e4m3 [N, K]: `round(w[n, :] / scale[n])`.
    q: Tensor,
    /// f32 [N]: amax(|w[n, :]|) / 448.
    scale: Tensor,
}

impl Fp8Weight {
    /// Quantises `w` [N, K] (any float dtype, on its device) per output channel.
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        if !fp8_fits(n, k) {
            candle_core::bail!("FP8 weight [{n}, {k}]: both dims must be multiples of 16");
        }
        let wf = w.to_dtype(DType::F32)?;
        // An all-zero row gets a tiny scale: its values quantise to zero either way.
        let amax = wf
            .abs()?
            .max_keepdim(1)?
            .clamp(f32::MIN_POSITIVE, f32::MAX)?;
        let scale = (amax / E4M3_MAX as f64)?.contiguous()?;
        let q = wf.contiguous()?.apply_op2_no_bwd(&scale, &QuantizeScaled)?;
        Ok(Self {
            q,
            scale: scale.squeeze(1)?,
        })
    }

    /// [N, K].
    pub fn dims(&self) -> Result<(usize, usize)> {
        self.q.dims2()
    }

    /// The weight the FP8 layer multiplies by, in f32 [N, K] on the CPU (for references and
    /// tests; candle's CUDA build has no e4m3 casts).
    pub fn dequantize(&self) -> Result<Tensor> {
        let cpu = candle_core::Device::Cpu;
        self.q
            .to_device(&cpu)?
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.scale.to_device(&cpu)?.unsqueeze(1)?)
    }
}

/// `e4m3(w[r, c] / scale[r])` for f32 w [rows, cols] and scale [rows, 1]: a weight's
/// quantisation (candle's CUDA build has no casts to e4m3).
struct QuantizeScaled;

impl CustomOp2 for QuantizeScaled {
    fn name(&self) -> &'static str {
        "diffit-fp8-quantize-scaled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l1);
        let (w, scale) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?);
        let q = w
            .iter()
            .enumerate()
            .map(|(i, v)| float8::F8E4M3::from_f32(v / scale[i / cols]))
            .collect();
        Ok((CpuStorage::F8E4M3(q), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(l1);
        let q = cuda::quantize_scaled((s1, l1), (s2, l2), rows, cols)?;
        Ok((q, l1.shape().clone()))
    }
}

/// Where an FP8 layer's per-token and per-channel scales (and its epilogue) are applied on
/// CUDA. Both compute the same function; the choice exists to measure (docs/fp8.md: on the
/// H200 a B = 64 step took 47 ms with `Cublaslt`, 59 ms with `Pass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Fp8Scaling {
    /// Inside the cuBLASLt matmul: its outer-vector scale modes, BIAS/GELU_BIAS epilogue and
    /// the residual as C (falls back to `Pass` where cuBLASLt has no such algorithm).
    #[default]
    Cublaslt,
    /// An unscaled FP8 matmul (cuBLASLt's per-tensor path) writing the run dtype, then one pass
    /// for scales, bias, GELU and residual.
    Pass,
}

/// What the kernel that quantises x computes first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Prologue {
    /// x as it is.
    Quantize,
    /// x's affine-free LayerNorm over its last dimension (the block's norm, folded in).
    LayerNorm { eps: f32 },
}

/// `act(P(x)·Wᵀ + b) (+ residual)` for x [.., K] (bf16/f16; any float dtype on the CPU), W an
/// [`Fp8Weight`] [N, K], bias [N] and residual [.., N] in x's dtype, where P is the prologue;
/// P(x) and W are rounded to e4m3 with per-token and per-channel scales (see the module docs).
pub fn fp8_linear(
    x: &Tensor,
    w: &Fp8Weight,
    bias: &Tensor,
    prologue: Prologue,
    act: Activation,
    residual: Option<&Tensor>,
    scaling: Fp8Scaling,
) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let (n, wk) = w.dims()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = n;
    if wk != k || bias.dims() != [n] || residual.is_some_and(|r| r.dims() != dims.as_slice()) {
        candle_core::bail!(
            "fp8_linear: x {:?}, weight [{n}, {wk}], bias {:?}, residual {:?} do not fit",
            x.dims(),
            bias.dims(),
            residual.map(Tensor::dims)
        );
    }
    if bias.dtype() != x.dtype() || residual.is_some_and(|r| r.dtype() != x.dtype()) {
        candle_core::bail!("fp8_linear: bias and residual must be in x's dtype");
    }
    if x.device().is_cuda() && !matches!(x.dtype(), DType::BF16 | DType::F16) {
        candle_core::bail!(
            "fp8_linear: on CUDA x must be bf16 or f16, got {:?}",
            x.dtype()
        );
    }
    let op = Fp8Linear {
        scale: w.scale.clone(),
        bias: bias.contiguous()?,
        residual: residual
            .map(|r| r.reshape((rows, n))?.contiguous())
            .transpose()?,
        prologue,
        act,
        scaling,
    };
    x.reshape((rows, k))?
        .contiguous()?
        .apply_op2_no_bwd(&w.q, &op)?
        .reshape(dims)
}

/// The custom op on (x [m, k], W's e4m3 [n, k]); the rest rides along.
struct Fp8Linear {
    scale: Tensor,
    bias: Tensor,
    residual: Option<Tensor>,
    prologue: Prologue,
    act: Activation,
    /// CUDA only: the CPU computes the same function either way.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    scaling: Fp8Scaling,
}

/// A row's scale (amax / 448) and the factor that quantises it (448 / amax), as the kernels
/// compute them; an all-zero row keeps scale 1.
pub fn row_scale(amax: f32) -> (f32, f32) {
    if amax > 0.0 {
        (amax / E4M3_MAX, E4M3_MAX / amax)
    } else {
        (1.0, 1.0)
    }
}

/// Rounds to the nearest e4m3 value (ties to even, saturating at ±448), as f32.
pub fn round_e4m3(v: f32) -> f32 {
    float8::F8E4M3::from_f32(v).to_f32()
}

/// The dequantised rows the FP8 matmul multiplies: each row of `x` [rows, cols] (after the
/// prologue) rounded to e4m3 with its own scale, then scaled back.
pub fn quantize_rows_f32(x: &mut [f32], cols: usize, prologue: Prologue) {
    for row in x.chunks_mut(cols.max(1)) {
        if let Prologue::LayerNorm { eps } = prologue {
            let mean = row.iter().sum::<f32>() / cols as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            row.iter_mut().for_each(|v| *v = (*v - mean) * rstd);
        }
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        let (scale, inv) = row_scale(amax);
        row.iter_mut()
            .for_each(|v| *v = round_e4m3(*v * inv) * scale);
    }
}

impl Fp8Linear {
    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        w: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = rows_cols(x.1);
        let (n, _) = w.1.shape().dims2()?;
        let mut xd = cpu_f32(x.0, x.1)?;
        quantize_rows_f32(&mut xd, k, self.prologue);
        let CpuStorage::F8E4M3(wq) = w.0 else {
            candle_core::bail!("fp8_linear: the weight is not e4m3");
        };
        let (lo, hi) = w
            .1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fp8_linear: weight not contiguous".into()))?;
        let scale = self
            .scale
            .to_device(&candle_core::Device::Cpu)?
            .to_vec1::<f32>()?;
        let wd: Vec<f32> = wq[lo..hi]
            .iter()
            .enumerate()
            .map(|(i, q)| q.to_f32() * scale[i / k])
            .collect();
        let cpu = candle_core::Device::Cpu;
        let y = Tensor::from_vec(xd, (m, k), &cpu)?
            .matmul(&Tensor::from_vec(wd, (n, k), &cpu)?.t()?)?;
        let mut y = y.flatten_all()?.to_vec1::<f32>()?;
        let host = |t: &Tensor| -> Result<Vec<f32>> {
            t.to_device(&cpu)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let bias = host(&self.bias)?;
        let res = self.residual.as_ref().map(host).transpose()?;
        for (r, row) in y.chunks_mut(n).enumerate() {
            for (c, v) in row.iter_mut().enumerate() {
                let mut t = *v + bias[c];
                if self.act == Activation::GeluTanh {
                    t = super::linear::gelu_tanh(t);
                }
                if let Some(res) = &res {
                    t += res[r * n + c];
                }
                *v = t;
            }
        }
        Ok((cpu_store(y, x.0.dtype())?, Shape::from((m, n))))
    }
}

impl CustomOp2 for Fp8Linear {
    fn name(&self) -> &'static str {
        "diffit-fp8-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let n = l2.shape().dims2()?.0;
        let out = cuda::fp8_linear(self, (s1, l1), (s2, l2), [m, n, k])?;
        Ok((out, Shape::from((m, n))))
    }
}
