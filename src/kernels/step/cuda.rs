//! Launcher for step.cu.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaStorageSlice;
use candle_core::{CudaStorage, Result};

use super::UpdateSpec;
use crate::kernels::launch::{flat, module, view, In, Module};

const KERNELS: Module = module!("step");

/// `out` [rows, C or 2C, H·W], `x` and `prev` [rows, C, H·W], `params` the step's buffer (all
/// f32, contiguous); returns [2, rows, C, H·W].
pub fn guided_update(
    out: In,
    x: In,
    prev: In,
    params: In,
    rows: usize,
    pixels: usize,
    spec: &UpdateSpec,
) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    let total = rows * spec.channels * pixels;
    if 2 * total >= u32::MAX as usize {
        candle_core::bail!("guided_update: {total} elements need 64-bit indices");
    }
    let (ov, xv, pv, prm) = (
        view::<f32>(out)?,
        view::<f32>(x)?,
        view::<f32>(prev)?,
        view::<f32>(params)?,
    );
    let res = unsafe { dev.alloc::<f32>(2 * total)? };
    let mut sizes = vec![
        rows,
        spec.channels,
        pixels,
        usize::from(spec.learn_sigma),
        spec.guided_channels,
    ];
    sizes.extend(spec.columns.offsets());
    // SAFETY: reads out, x, prev (their sizes checked by the caller) and params up to the
    // columns' ends (checked by the caller); writes 2·total.
    unsafe {
        KERNELS.launch::<f32>(
            &dev,
            "guided_update",
            flat(total),
            &[&ov, &xv, &pv, &prm, &res],
            &sizes,
            &[],
        )
    }?;
    Ok(CudaStorage {
        slice: CudaStorageSlice::F32(res),
        device: dev,
    })
}
