//! The CUDA side the op families share: the PTX modules build.rs compiles, element-type
//! dispatch over candle storages, views of their inputs, launch geometry and the one launch
//! helper every kernel goes through ([`Ptx::launch`]).

use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{kernel_name, CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, WithDType};

use super::tiling::ROW_BLOCK;

/// An input of a launcher: a candle CUDA storage and its layout.
pub type In<'a> = (&'a CudaStorage, &'a Layout);

/// Most blocks launched along a grid axis; kernels stride over the rest.
pub const MAX_GRID: usize = 65_535;

/// One compiled `.cu` file: its PTX, and the name candle caches the loaded module under.
pub struct Ptx {
    pub module: &'static str,
    pub code: &'static str,
}

/// The [`Ptx`] build.rs made of `<family>/<file>.cu`.
macro_rules! ptx {
    ($file:literal) => {
        $crate::kernels::launch::Ptx {
            module: concat!("diffit_", $file),
            code: include_str!(concat!(env!("OUT_DIR"), "/", $file, ".ptx")),
        }
    };
}
pub(crate) use ptx;

/// Evaluates `$body` (a `CudaSlice<$t>`) with `$t` the storage's element type (f32, bf16 or
/// f16) and wraps the result as a storage on `$dev`. Callers import `BackendStorage`.
macro_rules! dispatch {
    ($dev:expr, $first:expr, |$t:ident| $body:expr) => {{
        use candle_core::cuda_backend::CudaStorageSlice;
        let slice = match &$first.slice {
            CudaStorageSlice::F32(_) => {
                type $t = f32;
                CudaStorageSlice::F32($body)
            }
            CudaStorageSlice::BF16(_) => {
                type $t = half::bf16;
                CudaStorageSlice::BF16($body)
            }
            CudaStorageSlice::F16(_) => {
                type $t = half::f16;
                CudaStorageSlice::F16($body)
            }
            _ => candle_core::bail!("fused kernel: unsupported dtype {:?}", $first.dtype()),
        };
        Ok(candle_core::CudaStorage {
            slice,
            device: $dev.clone(),
        })
    }};
}
pub(crate) use dispatch;

/// [`dispatch!`] for the tensor-core paths (mma.sync, cuBLASLt epilogues, FP8): bf16 or f16
/// only; any other dtype is an error naming `$op`.
macro_rules! dispatch_half {
    ($dev:expr, $first:expr, $op:literal, |$t:ident| $body:expr) => {{
        use candle_core::cuda_backend::CudaStorageSlice;
        let slice = match &$first.slice {
            CudaStorageSlice::BF16(_) => {
                type $t = half::bf16;
                CudaStorageSlice::BF16($body)
            }
            CudaStorageSlice::F16(_) => {
                type $t = half::f16;
                CudaStorageSlice::F16($body)
            }
            _ => candle_core::bail!(
                "{}: the CUDA path is for bf16/f16, not {:?}",
                $op,
                $first.dtype()
            ),
        };
        Ok(candle_core::CudaStorage {
            slice,
            device: $dev.clone(),
        })
    }};
}
pub(crate) use dispatch_half;

/// A contiguous input as a view of its elements.
pub fn view<'a, T: CudaDType>((s, l): In<'a>) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(s.as_cuda_slice::<T>()?.slice(lo..hi)),
        None => candle_core::bail!("fused kernel: input is not contiguous"),
    }
}

/// The `rows` rows of `cols` elements of a 2-D input with unit column stride and any row
/// stride (a column slice of a wider tensor), as one view from its first row to its last.
pub fn strided_rows<'a, T: CudaDType>(
    (s, l): In<'a>,
    rows: usize,
    cols: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    let start = l.start_offset();
    let end = start + rows.saturating_sub(1) * l.stride()[0] + cols;
    if end > slice.len() {
        candle_core::bail!("{what} view runs past its storage");
    }
    Ok(slice.slice(start..end))
}

/// Elements of T in one 16-byte pack (the vectorised kernels' unit).
pub fn pack<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// Whether a contiguous view starts on a 16-byte boundary (allocations are at least 256-byte
/// aligned, so only the view's offset matters).
pub fn aligned<T>(l: &Layout) -> bool {
    (l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16)
}

/// A launch of `grid` blocks of `threads`, with `smem` bytes of dynamic shared memory.
pub fn config(grid: (u32, u32, u32), threads: u32, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// A grid-stride kernel over `items` with ROW_BLOCK threads a block.
pub fn flat(items: usize) -> LaunchConfig {
    config((grid_flat(items), 1, 1), ROW_BLOCK, 0)
}

/// Blocks for a grid-stride kernel over `items` with ROW_BLOCK threads.
pub fn grid_flat(items: usize) -> u32 {
    items.div_ceil(ROW_BLOCK as usize).clamp(1, 16_384) as u32
}

/// One warp a row.
pub fn warp_rows(rows: usize) -> LaunchConfig {
    let grid = rows.div_ceil((ROW_BLOCK / 32) as usize).clamp(1, MAX_GRID) as u32;
    config((grid, 1, 1), ROW_BLOCK, 0)
}

/// One block a row.
pub fn block_rows(rows: usize) -> LaunchConfig {
    config((rows.clamp(1, MAX_GRID) as u32, 1, 1), ROW_BLOCK, 0)
}

/// A device buffer passed to a kernel: a view or a whole slice, of any element type.
pub trait Buf {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>);
}

impl<T> Buf for CudaView<'_, T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}

impl<T> Buf for CudaSlice<T> {
    fn push<'a>(&'a self, args: &mut LaunchArgs<'a>) {
        args.arg(self);
    }
}

impl Ptx {
    /// Kernel `name` of this module for element type T (`name_f32`, `name_bf16`, `name_f16`:
    /// the suffixes of candle's `kernel_name` that the `.cu` instantiations use).
    pub fn func<T: CudaDType + WithDType>(
        &self,
        dev: &CudaDevice,
        name: &str,
    ) -> Result<CudaFunction> {
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(name), self.module, self.code)?;
        Ok(func.into_cuda_function())
    }

    /// Launches kernel `name` for T with the arguments every kernel in the `.cu` files takes, in
    /// this order: the buffers, the sizes (as u32), the f32 parameters.
    ///
    /// # Safety
    /// The kernel must take exactly these arguments, and the sizes must keep its reads and
    /// writes within the buffers.
    pub unsafe fn launch<T: CudaDType + WithDType>(
        &self,
        dev: &CudaDevice,
        name: &str,
        cfg: LaunchConfig,
        bufs: &[&dyn Buf],
        sizes: &[usize],
        params: &[f32],
    ) -> Result<()> {
        launch(dev, &self.func::<T>(dev, name)?, cfg, bufs, sizes, params)
    }
}

/// [`Ptx::launch`] for a kernel already loaded (one whose attributes were set first).
///
/// # Safety
/// As for [`Ptx::launch`].
pub unsafe fn launch(
    dev: &CudaDevice,
    func: &CudaFunction,
    cfg: LaunchConfig,
    bufs: &[&dyn Buf],
    sizes: &[usize],
    params: &[f32],
) -> Result<()> {
    let sizes: Vec<u32> = sizes.iter().map(|&s| s as u32).collect();
    // On the device's stream, as candle's own launches (`CudaFunc::builder`).
    let stream = dev.cuda_stream();
    let mut args = stream.launch_builder(func);
    for buf in bufs {
        buf.push(&mut args);
    }
    for s in &sizes {
        args.arg(s);
    }
    for p in params {
        args.arg(p);
    }
    args.launch(cfg).w()?;
    Ok(())
}
