//! Linear layers and their epilogues: `bias_act` (bias, GELU and residual add in one pass over
//! a matmul output) and `linear_bias_act` / `linear_bias_residual`, which on CUDA in bf16/f16
//! run the epilogue inside the cuBLASLt matmul. The DiffiT block's projection and MLP layers use
//! them, and so does every channels-last VAE convolution (its im2col matmul with the bias and
//! the resnet residual) and linear layer. `linear_no_bias` takes the epilogue-free matmuls (the
//! qkv layer) through the same cuBLASLt path, so every one of them gets its algorithm timed per
//! shape (`set_matmul_autotune`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu::{cpu_f32, cpu_store, rows_cols};

/// Choosing cuBLASLt algorithms by measurement: the device-independent part.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod autotune;
#[cfg(feature = "cuda")]
pub(super) mod cublaslt;
#[cfg(feature = "cuda")]
mod cuda;

/// What follows the bias add in [`bias_act`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// GELU with the tanh approximation.
    GeluTanh,
}

/// `act(y + bias[row / rows_per_group]) (+ residual)` over the rows of `y` (all but its last
/// dimension). `bias` is [groups, cols] with groups · rows_per_group = rows: one bias row for the
/// whole tensor (a layer's bias) or one per sample.
pub fn bias_act(
    y: &Tensor,
    bias: &Tensor,
    rows_per_group: usize,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let cols = y.dim(candle_core::D::Minus1)?;
    let rows = y.elem_count() / cols.max(1);
    let (groups, bcols) = bias.dims2()?;
    if bcols != cols || rows_per_group == 0 || groups * rows_per_group != rows {
        candle_core::bail!(
            "bias_act: bias {:?} does not fit {rows} rows of {cols} in groups of {rows_per_group}",
            bias.dims()
        );
    }
    let op = BiasAct {
        rows_per_group,
        act,
    };
    let (y, bias) = (y.contiguous()?, bias.contiguous()?);
    match residual {
        None => y.apply_op2_no_bwd(&bias, &op),
        Some(res) => {
            if res.dims() != y.dims() {
                candle_core::bail!("bias_act: residual {:?} ≠ {:?}", res.dims(), y.dims());
            }
            y.apply_op3_no_bwd(&bias, &res.contiguous()?, &op)
        }
    }
}

/// `act(x·Wᵀ + b)` for x [.., K], weight [N, K], bias [N]. On CUDA in bf16/f16 the bias and
/// the activation run in the matmul's epilogue (cuBLASLt `BIAS` / `GELU_BIAS`), so the
/// [rows, N] output is written once; elsewhere (the CPU, f32 — where cuBLASLt would compute
/// in TF32 — or with `lt_epilogue` off) it is the matmul followed by `bias_act`.
pub fn linear_bias_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: Activation,
    lt_epilogue: bool,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let (n, wk) = weight.dims2()?;
    if wk != k || bias.dims() != [n] {
        candle_core::bail!(
            "linear_bias_act: x {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let rows = x.elem_count() / k.max(1);
    *dims.last_mut().expect("rank ≥ 1") = n;
    let x2 = x.reshape((rows, k))?;
    if lt_epilogue && lt_epilogue_applies(x) {
        return x2
            .contiguous()?
            .apply_op3_no_bwd(
                &weight.contiguous()?,
                &bias.contiguous()?,
                &LtLinear::Act(act),
            )?
            .reshape(dims);
    }
    bias_act(
        &x2.matmul(&weight.t()?)?,
        &bias.unsqueeze(0)?,
        rows,
        act,
        None,
    )?
    .reshape(dims)
}

/// `x·Wᵀ` for x [.., K], weight [N, K]: on CUDA in bf16/f16 with `lt` the cuBLASLt matmul
/// (its algorithm timed per shape like the epilogue variants'), elsewhere candle's matmul.
pub fn linear_no_bias(x: &Tensor, weight: &Tensor, lt: bool) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let (n, wk) = weight.dims2()?;
    if dims.is_empty() || wk != k {
        candle_core::bail!(
            "linear_no_bias: x {:?} and weight {:?} do not fit",
            x.dims(),
            weight.dims()
        );
    }
    let rows = x.elem_count() / k.max(1);
    *dims.last_mut().expect("rank ≥ 1") = n;
    let x2 = x.reshape((rows, k))?;
    let y = match lt && lt_epilogue_applies(x) {
        true => x2
            .contiguous()?
            .apply_op2_no_bwd(&weight.contiguous()?, &LtPlain)?,
        false => x2.matmul(&weight.t()?)?,
    };
    y.reshape(dims)
}

/// Whether each not yet seen cuBLASLt matmul shape gets its algorithm by timing the heuristic's
/// top candidates (on) or as the heuristic's first (off). Process-wide, like the algorithm
/// cache, which keeps a shape's choice for the life of the process either way.
pub fn set_matmul_autotune(on: bool) {
    autotune::set_enabled(on);
}

/// Runs `f` with new matmul shapes taking the algorithm of the nearest shape chosen already
/// rather than being timed (`autotune::borrowing`): for exact-size steps, whose row counts lie
/// between the warmed buckets'.
pub fn with_borrowed_matmul_algorithms<R>(f: impl FnOnce() -> R) -> R {
    autotune::borrowing(f)
}

/// `x·Wᵀ + b + residual` for x [.., K], weight [N, K], bias [N], residual [.., N]. On CUDA in
/// bf16/f16 one cuBLASLt call (C = residual with beta = 1, the `BIAS` epilogue) writes the result,
/// so neither the bias nor the residual add costs a pass; elsewhere the matmul and `bias_act`.
pub fn linear_bias_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    lt_epilogue: bool,
) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let (n, wk) = weight.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = n;
    if wk != k || bias.dims() != [n] || residual.dims() != dims.as_slice() {
        candle_core::bail!(
            "linear_bias_residual: x {:?}, weight {:?}, bias {:?}, residual {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims(),
            residual.dims()
        );
    }
    let x2 = x.reshape((rows, k))?;
    let r2 = residual.reshape((rows, n))?;
    if lt_epilogue && lt_epilogue_applies(x) {
        let op = LtLinear::Residual(bias.contiguous()?);
        return x2
            .contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &r2.contiguous()?, &op)?
            .reshape(dims);
    }
    bias_act(
        &x2.matmul(&weight.t()?)?,
        &bias.unsqueeze(0)?,
        rows,
        Activation::Identity,
        Some(&r2),
    )?
    .reshape(dims)
}

/// cuBLASLt epilogues run on CUDA in bf16/f16 only (f32 would compute in TF32 there).
fn lt_epilogue_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

struct BiasAct {
    rows_per_group: usize,
    act: Activation,
}

/// The cuBLASLt matmul with its epilogue (CUDA only), applied to x, weight and a third tensor.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
enum LtLinear {
    /// BIAS or GELU_BIAS, the third tensor the bias (`linear_bias_act`).
    Act(Activation),
    /// BIAS with C = the third tensor, the residual (`linear_bias_residual`). Custom ops take
    /// three tensors, so the bias rides along in the op.
    Residual(Tensor),
}

/// The cuBLASLt matmul without epilogue (CUDA only), x and weight.
struct LtPlain;

impl CustomOp2 for LtPlain {
    fn name(&self) -> &'static str {
        "diffit-linear-no-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("linear_no_bias routes the CPU through candle's matmul")
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
        let out = cublaslt::linear_plain((s1, l1), (s2, l2), [m, n, k])?;
        Ok((out, Shape::from((m, n))))
    }
}

pub(super) fn gelu_tanh(x: f32) -> f32 {
    const K0: f32 = 0.797_884_6;
    const K1: f32 = 0.044_715;
    0.5 * x * (1.0 + (K0 * (x + K1 * x * x * x)).tanh())
}

type CpuIn<'a> = (&'a CpuStorage, &'a Layout);

impl BiasAct {
    /// Both arities' CPU fallback: y, bias and the optional residual.
    fn cpu(&self, y: CpuIn, bias: CpuIn, res: Option<CpuIn>) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(y.1);
        let bias = cpu_f32(bias.0, bias.1)?;
        let res = res.map(|(s, l)| cpu_f32(s, l)).transpose()?;
        let mut out = cpu_f32(y.0, y.1)?;
        for (r, row) in out.chunks_mut(cols).enumerate() {
            let b = &bias[(r / self.rows_per_group) * cols..][..cols];
            for (c, v) in row.iter_mut().enumerate() {
                let mut x = *v + b[c];
                if self.act == Activation::GeluTanh {
                    x = gelu_tanh(x);
                }
                if let Some(res) = &res {
                    x += res[r * cols + c];
                }
                *v = x;
            }
        }
        Ok((cpu_store(out, y.0.dtype())?, y.1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda(
        &self,
        y: cuda::In,
        bias: cuda::In,
        res: Option<cuda::In>,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(y.1);
        let out = cuda::bias_act(self.act, y, bias, res, rows, cols, self.rows_per_group)?;
        Ok((out, y.1.shape().clone()))
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "diffit-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.cuda((s1, l1), (s2, l2), None)
    }
}

impl CustomOp3 for BiasAct {
    fn name(&self) -> &'static str {
        "diffit-bias-act-residual"
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
        self.cpu((s1, l1), (s2, l2), Some((s3, l3)))
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
        self.cuda((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

impl CustomOp3 for LtLinear {
    fn name(&self) -> &'static str {
        match self {
            Self::Act(_) => "diffit-linear-bias-act",
            Self::Residual(_) => "diffit-linear-bias-residual",
        }
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let public = match self {
            Self::Act(_) => "linear_bias_act",
            Self::Residual(_) => "linear_bias_residual",
        };
        candle_core::bail!("{public} routes the CPU through matmul + bias_act")
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
        let (m, k) = l1.shape().dims2()?;
        let n = l2.shape().dims2()?.0;
        let (x, w, third) = ((s1, l1), (s2, l2), (s3, l3));
        let out = match self {
            Self::Act(act) => {
                let gelu = *act == Activation::GeluTanh;
                cublaslt::linear_bias_act(x, w, third, [m, n, k], gelu)?
            }
            Self::Residual(bias) => {
                let (bias, bias_l) = bias.storage_and_layout();
                let candle_core::Storage::Cuda(bias) = &*bias else {
                    candle_core::bail!("linear_bias_residual: bias is not on the GPU");
                };
                cublaslt::linear_bias_residual(x, w, (bias, bias_l), third, [m, n, k])?
            }
        };
        Ok((out, Shape::from((m, n))))
    }
}
