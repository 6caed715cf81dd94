//! Launchers for fp8.cu and the FP8 cuBLASLt matmul (`linear::cublaslt::fp8_matmul`).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CudaDevice, CudaStorage, Result, Tensor};
use float8::F8E4M3;

use super::{Fp8Linear, Fp8Scaling, Prologue};
use crate::kernels::launch::{
    aligned, dispatch_half, flat, module, on_gpu, view, warp_rows, Buf, In, Module,
};
use crate::kernels::linear::cublaslt::{fp8_matmul, Fp8Operands, Fp8Output};
use crate::kernels::tiling::{FP8_WIDE_PACKS, LN_PACKS};
use crate::kernels::Activation;

const KERNELS: Module = module!("fp8");

/// Elements of a 2-byte type in one 16-byte pack (the packed kernels are for bf16/f16 only).
const PACK: usize = 8;

/// Launches `fp8_quantize_scaled` for f32 w [rows, cols] and scale [rows].
pub fn quantize_scaled(w: In, scale: In, rows: usize, cols: usize) -> Result<CudaStorage> {
    let dev = w.0.device().clone();
    let (wv, sv) = (view::<f32>(w)?, view::<f32>(scale)?);
    let q = unsafe { dev.alloc::<F8E4M3>(rows * cols)? };
    // SAFETY: reads rows × cols of w and rows of scale, writes rows × cols.
    unsafe {
        KERNELS.launch::<f32>(
            &dev,
            "fp8_quantize_scaled",
            flat(rows * cols),
            &[&wv, &sv, &q],
            &[rows, cols],
            &[],
        )
    }?;
    Ok(CudaStorage {
        slice: CudaStorageSlice::F8E4M3(q),
        device: dev,
    })
}

pub fn fp8_linear(op: &Fp8Linear, x: In, w: In, [m, n, k]: [usize; 3]) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    dispatch_half!(dev, x.0, "fp8_linear", |T| run::<T>(
        op,
        &dev,
        x,
        w,
        [m, n, k]
    )?)
}

fn run<T>(
    op: &Fp8Linear,
    dev: &CudaDevice,
    x: In,
    w: In,
    [m, n, k]: [usize; 3],
) -> Result<candle_core::cuda_backend::cudarc::driver::CudaSlice<T>>
where
    T: candle_core::cuda_backend::CudaDType
        + candle_core::WithDType
        + candle_core::cuda_backend::cudarc::driver::DeviceRepr,
    candle_core::cuda_backend::cudarc::cublaslt::CudaBlasLT:
        candle_core::cuda_backend::cudarc::cublaslt::Matmul<T>,
{
    let xv = view::<T>(x)?;
    // x's rows in e4m3 and their scales: temporaries of this one op.
    let xq = unsafe { dev.alloc::<F8E4M3>(m * k)? };
    let xs = unsafe { dev.alloc::<f32>(m)? };
    let packed = k.is_multiple_of(PACK) && aligned::<T>(x.1) && std::mem::size_of::<T>() == 2;
    let in_registers = packed && k <= 32 * LN_PACKS * PACK;
    // The MLP's hidden rows (4·D) fit the wide register kernel: one read of the row, where the
    // pack kernel reads it twice.
    let in_wide_registers = packed && k <= 32 * FP8_WIDE_PACKS * PACK;
    let (name, eps) = match op.prologue {
        Prologue::LayerNorm { eps } if in_registers => ("fp8_ln_quant_r", eps),
        Prologue::LayerNorm { eps } => ("fp8_ln_quant", eps),
        Prologue::Quantize if in_registers => ("fp8_quant_r", 0.0),
        Prologue::Quantize if in_wide_registers => ("fp8_quant_rw", 0.0),
        Prologue::Quantize if packed => ("fp8_quant_v", 0.0),
        Prologue::Quantize => ("fp8_quant", 0.0),
    };
    // SAFETY: reads m × k of x, writes m × k of xq and m of xs.
    unsafe { KERNELS.launch::<T>(dev, name, warp_rows(m), &[&xv, &xq, &xs], &[m, k], &[eps]) }?;

    let wq = w.0.as_cuda_slice::<F8E4M3>()?;
    let (wlo, whi) =
        w.1.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("fp8_linear: weight not contiguous".into()))?;
    let (scale_s, scale_l) = op.scale.storage_and_layout();
    let (bias_s, bias_l) = op.bias.storage_and_layout();
    let res = op.residual.as_ref().map(Tensor::storage_and_layout);
    let scale_c = on_gpu(&scale_s, "fp8_linear: the weight scale")?;
    let bias_c = on_gpu(&bias_s, "fp8_linear: the bias")?;
    let ws = view::<f32>((scale_c, scale_l))?;
    let bias = view::<T>((bias_c, bias_l))?;
    let res_in = match &res {
        Some((s, l)) => Some((on_gpu(s, "fp8_linear: the residual")?, *l)),
        None => None,
    };
    let res_view = res_in.map(view::<T>).transpose()?;
    let wq = wq.slice(wlo..whi);
    let ops = Fp8Operands {
        xq: &xq,
        xs: &xs,
        wq: &wq,
        ws: &ws,
    };
    let gelu = op.act == Activation::GeluTanh;
    let scaled = Fp8Output::Scaled {
        bias: &bias,
        gelu,
        residual: res_view.as_ref(),
    };
    // cuBLASLt's epilogue adds C before GELU: a GELU layer with a residual takes the pass.
    let in_cublaslt = op.scaling == Fp8Scaling::Cublaslt && !(gelu && res_view.is_some());
    if in_cublaslt {
        if let Some(out) = fp8_matmul(dev, &ops, &scaled, [m, n, k])? {
            return Ok(out);
        }
    }
    // The product unscaled (also where cuBLASLt has no outer-vector scale mode), then one pass.
    let Some(raw) = fp8_matmul::<T>(dev, &ops, &Fp8Output::Raw, [m, n, k])? else {
        candle_core::bail!("fp8_linear: cuBLASLt has no FP8 matmul for [{m}, {k}] x [{n}, {k}] on this GPU (needs sm_89 or newer)");
    };
    let out = unsafe { dev.alloc::<T>(m * n)? };
    let flags = usize::from(gelu) | (usize::from(res_view.is_some()) << 1);
    let res_buf: &dyn Buf = match &res_view {
        Some(r) => r,
        None => &raw,
    };
    let packed = n.is_multiple_of(PACK)
        && std::mem::size_of::<T>() == 2
        && aligned::<T>(bias_l)
        && res_in.is_none_or(|(_, l)| aligned::<T>(l));
    let (name, items) = match packed {
        true => ("fp8_scale_epilogue_v", m * n / PACK),
        false => ("fp8_scale_epilogue", m * n),
    };
    // SAFETY: reads m × n of raw (and res), m of xs, n of ws and bias; writes m × n.
    unsafe {
        KERNELS.launch::<T>(
            dev,
            name,
            flat(items),
            &[&raw, &xs, &ws, &bias, res_buf, &out],
            &[m, n, flags],
            &[],
        )
    }?;
    Ok(out)
}
