//! Launchers for conv.cu.

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Result};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr};
use candle_core::cuda_backend::CudaDType;
use candle_core::WithDType;

use super::ConvTiling;
use crate::kernels::launch::{
    self, aligned, config, dispatch, dispatch_half, flat, grid_flat, module, pack, view, Buf, In,
    Module, MAX_GRID,
};
use crate::kernels::tiling::{
    conv_halo_smem, conv_igemm_smem, CONVH_BN, CONVH_TW, CONV_BK, CONV_BM, CONV_BN, CONV_THREADS,
    COUT4_PIXELS, ROW_BLOCK,
};
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::CudaDevice;

const KERNELS: Module = module!("conv");

/// `dims` = input [batch, h, w, c].
pub fn im2col3x3(x: In, dims: [usize; 4], up: usize) -> Result<CudaStorage> {
    let [batch, h, w, c] = dims;
    let total = batch * h * up * w * up * 9 * c;
    let dev = x.0.device().clone();
    dispatch!(dev, x.0, |T| {
        let xv = view::<T>(x)?;
        let out = unsafe { dev.alloc::<T>(total)? };
        let vector =
            c.is_multiple_of(pack::<T>()) && aligned::<T>(x.1) && total < u32::MAX as usize;
        let (name, items) = if vector {
            ("im2col3x3_v", total / pack::<T>())
        } else {
            ("im2col3x3", total)
        };
        let sizes = [batch, h, w, c, up];
        // SAFETY: reads batch·h·w·c, writes total = batch·(h·up)·(w·up)·9·c.
        unsafe { KERNELS.launch::<T>(&dev, name, flat(items), &[&xv, &out], &sizes, &[]) }?;
        out
    })
}

/// `dims` = [batch, h, w, c] of the input; weight [cout, 9·c], bias [cout], cout ≤ 4.
pub fn conv3x3_small(x: In, w: In, bias: In, dims: [usize; 4], cout: usize) -> Result<CudaStorage> {
    let [batch, h, wd, c] = dims;
    let pixels = batch * h * wd;
    // conv.cu: the weights as [9·c] float4 in shared memory, within the default 48 KiB.
    let smem = 9 * c * 16;
    let dev = x.0.device().clone();
    dispatch!(dev, x.0, |T| {
        if cout == 0
            || cout > 4
            || !c.is_multiple_of(pack::<T>())
            || !aligned::<T>(x.1)
            || smem > 48 * 1024
            || pixels * c >= u32::MAX as usize
        {
            candle_core::bail!(
                "conv3x3_small: needs 1..=4 outputs, C a multiple of {} and at most 336",
                pack::<T>()
            );
        }
        let (xv, wv, bv) = (view::<T>(x)?, view::<T>(w)?, view::<T>(bias)?);
        let out = unsafe { dev.alloc::<T>(pixels * cout)? };
        // conv.cu: a half-warp a strip of COUT4_PIXELS pixels. At most 1024 blocks, each
        // striding over the image: every block first loads all the weights.
        let threads = pixels.div_ceil(COUT4_PIXELS) * 16;
        let cfg = config((grid_flat(threads).min(1024), 1, 1), ROW_BLOCK, smem);
        let sizes = [batch, h, wd, c, cout];
        // SAFETY: reads batch·h·w·c, cout·9·c weights and cout biases; writes pixels·cout.
        unsafe {
            KERNELS.launch::<T>(
                &dev,
                "conv3x3_cout4_v",
                cfg,
                &[&xv, &wv, &bv, &out],
                &sizes,
                &[],
            )
        }?;
        out
    })
}

/// `dims` = low-resolution input [batch, h, w, c]; vectorised only.
pub fn im2col_up2_phases(x: In, dims: [usize; 4]) -> Result<CudaStorage> {
    let [batch, h, w, c] = dims;
    let total = 4 * batch * h * w * 4 * c;
    let dev = x.0.device().clone();
    dispatch!(dev, x.0, |T| {
        if !c.is_multiple_of(pack::<T>()) || !aligned::<T>(x.1) || total >= u32::MAX as usize {
            candle_core::bail!(
                "im2col_up2_phases: needs C a multiple of {} and a 32-bit size",
                pack::<T>()
            );
        }
        let xv = view::<T>(x)?;
        let out = unsafe { dev.alloc::<T>(total)? };
        let cfg = flat(total / pack::<T>());
        let (name, sizes) = ("im2col_up2_phases_v", [batch, h, w, c]);
        // SAFETY: reads batch·h·w·c, writes total = 16·batch·h·w·c.
        unsafe { KERNELS.launch::<T>(&dev, name, cfg, &[&xv, &out], &sizes, &[]) }?;
        out
    })
}

/// `dims` = low-resolution [batch, h, w, c]; y is [4, batch·h·w, c]; vectorised only.
pub fn pixel_shuffle_bias(y: In, bias: In, dims: [usize; 4]) -> Result<CudaStorage> {
    let [batch, h, w, c] = dims;
    let total = 4 * batch * h * w * c;
    let dev = y.0.device().clone();
    dispatch!(dev, y.0, |T| {
        if !c.is_multiple_of(pack::<T>())
            || !aligned::<T>(y.1)
            || !aligned::<T>(bias.1)
            || total >= u32::MAX as usize
        {
            candle_core::bail!(
                "pixel_shuffle_bias: needs C a multiple of {} and a 32-bit size",
                pack::<T>()
            );
        }
        let (yv, bv) = (view::<T>(y)?, view::<T>(bias)?);
        let out = unsafe { dev.alloc::<T>(total)? };
        let cfg = flat(total / pack::<T>());
        let (name, sizes) = ("pixel_shuffle_bias_v", [batch, h, w, c]);
        // SAFETY: reads 4·batch·h·w·c and c bias values, writes the same count.
        unsafe { KERNELS.launch::<T>(&dev, name, cfg, &[&yv, &bv, &out], &sizes, &[]) }?;
        out
    })
}

/// The implicit-GEMM 3×3 convolution: `dims` = input [batch, h, w, c], weight [cout, 9·c],
/// bias [cout], residual (if any) [batch·h·w, cout]. bf16/f16 only (tensor cores).
pub fn conv3x3_igemm(
    x: In,
    w: In,
    bias: In,
    residual: Option<In>,
    dims: [usize; 4],
    cout: usize,
    tiling: ConvTiling,
) -> Result<CudaStorage> {
    dispatch_half!(x.0.device(), x.0, "conv3x3_igemm", |T| igemm::<T>(
        x, w, bias, residual, dims, cout, tiling
    )?)
}

/// The kernel, its grid and its dynamic shared memory for `tiling`: the halo kernel where C is
/// a multiple of its channel block and the device has the shared memory, `conv3x3_igemm`
/// otherwise.
fn igemm_plan(
    dev: &CudaDevice,
    tiling: ConvTiling,
    dims: [usize; 4],
    cout: usize,
    elem: usize,
) -> (&'static str, (usize, usize), usize) {
    let [batch, h, wd, c] = dims;
    let halo = match tiling {
        ConvTiling::Gather => None,
        ConvTiling::Halo128 => Some(("conv3x3_halo128", 8)),
        ConvTiling::Halo256 => Some(("conv3x3_halo256", 16)),
    };
    if let Some((name, rows)) = halo.filter(|_| tiling.halo_fits(c)) {
        let smem = conv_halo_smem(rows, elem);
        let optin = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .ok()
            .and_then(|v| usize::try_from(v).ok())
            .unwrap_or(0);
        if smem <= optin {
            // One CTA an output block of one image and CONVH_BN channels, the channel blocks
            // of a pixel block adjacent in launch order (they read the same halo).
            let tiles = batch * h.div_ceil(rows) * wd.div_ceil(CONVH_TW);
            return (name, (tiles * cout.div_ceil(CONVH_BN), 1), smem);
        }
    }
    let grid = ((batch * h * wd).div_ceil(CONV_BM), cout.div_ceil(CONV_BN));
    ("conv3x3_igemm", grid, conv_igemm_smem(elem))
}

fn igemm<T: CudaDType + WithDType + DeviceRepr>(
    x: In,
    w: In,
    bias: In,
    residual: Option<In>,
    dims: [usize; 4],
    cout: usize,
    tiling: ConvTiling,
) -> Result<CudaSlice<T>> {
    let [batch, h, wd, c] = dims;
    let pixels = batch * h * wd;
    let dev = x.0.device().clone();
    let (name, grid, smem) = igemm_plan(&dev, tiling, dims, cout, std::mem::size_of::<T>());
    let aligned_all = aligned::<T>(x.1)
        && aligned::<T>(w.1)
        && aligned::<T>(bias.1)
        && residual.is_none_or(|r| aligned::<T>(r.1));
    if !(aligned_all
        && c.is_multiple_of(CONV_BK)
        && cout.is_multiple_of(8)
        && pixels * c.max(cout) < u32::MAX as usize
        && grid.0 < u32::MAX as usize
        && grid.1 <= MAX_GRID)
    {
        candle_core::bail!(
            "conv3x3_igemm: needs C a multiple of {CONV_BK}, Cout of 8, 16-byte aligned inputs \
             and 32-bit sizes (got C {c}, Cout {cout}, {pixels} pixels)"
        );
    }
    let (xv, wv, bv) = (view::<T>(x)?, view::<T>(w)?, view::<T>(bias)?);
    let rv = residual.map(view::<T>).transpose()?;
    let out = unsafe { dev.alloc::<T>(pixels * cout)? };
    let func = KERNELS.func_with_smem::<T>(&dev, name, smem)?;
    let cfg = config((grid.0 as u32, grid.1 as u32, 1), CONV_THREADS, smem);
    let sizes = [batch, h, wd, c, cout, usize::from(rv.is_some())];
    // Without a residual the kernel never reads its pointer: pass the bias in its place.
    let res: &dyn Buf = match &rv {
        Some(r) => r,
        None => &bv,
    };
    // SAFETY: reads pixels·c inputs, cout·9·c weights, cout biases and (with has_res)
    // pixels·cout residuals; writes pixels·cout. The checks above keep every index in 32 bits.
    unsafe { launch::launch(&dev, &func, cfg, &[&xv, &wv, &bv, res, &out], &sizes, &[]) }?;
    Ok(out)
}
