//! Launcher for linear.cu (the bias/activation/residual epilogue as its own pass).

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, Result};

use super::Activation;
pub use crate::kernels::launch::In;
use crate::kernels::launch::{
    aligned, config, dispatch, flat, module, pack, view, Buf, Module, MAX_GRID,
};
use crate::kernels::tiling::ROW_BLOCK;

const KERNELS: Module = module!("linear");

pub fn bias_act(
    act: Activation,
    y: In,
    bias: In,
    res: Option<In>,
    rows: usize,
    cols: usize,
    rows_per_group: usize,
) -> Result<CudaStorage> {
    let kernel = match (act, res.is_some()) {
        (Activation::Identity, false) => "bias_add",
        (Activation::GeluTanh, false) => "bias_gelu",
        (Activation::Identity, true) => "bias_add_res",
        (Activation::GeluTanh, true) => "bias_gelu_res",
    };
    let dev = y.0.device().clone();
    dispatch!(dev, y.0, |T| {
        let (yv, bv) = (view::<T>(y)?, view::<T>(bias)?);
        let rv = res.map(view::<T>).transpose()?;
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let vector = cols.is_multiple_of(pack::<T>())
            && rows * cols < u32::MAX as usize
            && aligned::<T>(y.1)
            && aligned::<T>(bias.1)
            && res.is_none_or(|(_, l)| aligned::<T>(l));
        // Packs: the flat tensor grid-stride; scalar: column tiles by rows.
        let (name, cfg) = if vector {
            (format!("{kernel}_v"), flat(rows * cols / pack::<T>()))
        } else {
            let grid = (
                cols.div_ceil(ROW_BLOCK as usize).max(1) as u32,
                rows.clamp(1, MAX_GRID) as u32,
                1,
            );
            (kernel.to_string(), config(grid, ROW_BLOCK, 0))
        };
        let bufs: Vec<&dyn Buf> = match &rv {
            Some(rv) => vec![&yv as &dyn Buf, &bv, rv, &out],
            None => vec![&yv as &dyn Buf, &bv, &out],
        };
        let sizes = [rows, cols, rows_per_group];
        // SAFETY: the kernel reads rows × cols of y (and res) and groups × cols of bias, all
        // checked by the caller, and writes the rows × cols it was given.
        unsafe { KERNELS.launch::<T>(&dev, &name, cfg, &bufs, &sizes, &[]) }?;
        out
    })
}
