//! The CUDA side the op families share: the kernel modules build.rs compiles, element-type
//! dispatch over candle storages, views of their inputs, launch geometry and the one launch
//! helper every kernel goes through ([`Module::launch`]).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{kernel_name, CudaDType, DeviceId, WrapErr};
use candle_core::{CudaDevice, CudaStorage, Layout, Result, Storage, WithDType};

use super::tiling::ROW_BLOCK;

/// An input of a launcher: a candle CUDA storage and its layout.
pub type In<'a> = (&'a CudaStorage, &'a Layout);

/// Most blocks launched along a grid axis; kernels stride over the rest.
pub const MAX_GRID: usize = 65_535;

/// One compiled `.cu` file: a fat binary with the machine code (SASS) for the build's compute
/// capability and its PTX (build.rs). The driver loads the SASS as it is; only a GPU of another
/// architecture JIT-compiles the PTX. Loading PTX alone cost every module a JIT compile at its
/// first use in a process wherever the driver's JIT cache was cold or not writable — a fresh
/// machine, or the shipped container with its read-only root (docs/perf.md v0.28).
pub struct Module {
    /// The file's name (for errors).
    pub name: &'static str,
    /// The fat binary; empty where the file is not built for this capability (flash_sm90).
    pub image: &'static [u8],
}

/// The [`Module`] build.rs made of `<family>/<file>.cu`.
macro_rules! module {
    ($file:literal) => {
        $crate::kernels::launch::Module {
            name: $file,
            image: include_bytes!(concat!(env!("OUT_DIR"), "/", $file, ".fatbin")),
        }
    };
}
pub(crate) use module;

/// Every module loaded so far, by device and file: loaded once into a device's context, at the
/// first launch of one of its kernels there.
type Loaded = RwLock<HashMap<(DeviceId, &'static str), Arc<CudaModule>>>;

fn loaded() -> &'static Loaded {
    static LOADED: OnceLock<Loaded> = OnceLock::new();
    LOADED.get_or_init(Loaded::default)
}

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

/// The CUDA storage of a tensor a custom op reads beside its inputs (a bias, a residual, a
/// parameter buffer); `what` names it in the error ("op: the bias").
pub fn on_gpu<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{what} is not on the GPU"),
    }
}

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

impl Module {
    /// Kernel `name` of this module for element type T (`name_f32`, `name_bf16`, `name_f16`:
    /// the suffixes of candle's `kernel_name` that the `.cu` instantiations use).
    pub fn func<T: CudaDType + WithDType>(
        &self,
        dev: &CudaDevice,
        name: &str,
    ) -> Result<CudaFunction> {
        let name = kernel_name::<T>(name);
        self.loaded_on(dev)?
            .load_function(&name)
            .map_err(|e| candle_core::Error::Msg(format!("kernel {name} of {}: {e}", self.name)))
    }

    /// [`Module::func`] for a kernel launched with `smem_bytes` of dynamic shared memory: the
    /// function allowed that much (past the 48 KiB default where the kernel needs it).
    pub fn func_with_smem<T: CudaDType + WithDType>(
        &self,
        dev: &CudaDevice,
        name: &str,
        smem_bytes: usize,
    ) -> Result<CudaFunction> {
        let func = self.func::<T>(dev, name)?;
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem_bytes as i32,
        )
        .w()?;
        Ok(func)
    }

    /// This module in `dev`'s context, loaded there on first use.
    fn loaded_on(&self, dev: &CudaDevice) -> Result<Arc<CudaModule>> {
        let key = (dev.id(), self.name);
        if let Some(m) = loaded().read().ok().and_then(|l| l.get(&key).cloned()) {
            return Ok(m);
        }
        let mut all = loaded()
            .write()
            .map_err(|_| candle_core::Error::Msg("the kernel module table is poisoned".into()))?;
        if let Some(m) = all.get(&key) {
            return Ok(m.clone());
        }
        if self.image.is_empty() {
            candle_core::bail!("kernel module {} is not built for this GPU", self.name);
        }
        let start = std::time::Instant::now();
        let module = dev
            .cuda_stream()
            .context()
            .load_module(Ptx::from_binary(self.image.to_vec()))
            .w()?;
        tracing::debug!(module = self.name, elapsed = ?start.elapsed(), "kernel module loaded");
        all.insert(key, module.clone());
        Ok(module)
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
