//! Launchers for src/kernels/fused.cu. Each takes candle CUDA storages with their layouts,
//! picks the kernel for the dtype and returns the output storage.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublaslt::{
    Activation as LtActivation, CudaBlasLT, Matmul, MatmulConfig,
};
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{kernel_name, CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const MODULE: &str = "diffit_fused";
/// Threads per block of the row-wise kernels (8 warps, one row each).
const ROW_BLOCK: u32 = 256;
/// Most blocks launched along a grid axis; kernels stride over the rest.
const MAX_GRID: usize = 65_535;

type In<'a> = (&'a CudaStorage, &'a Layout);

fn contiguous<'a, T>(s: &'a CudaSlice<T>, l: &Layout) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(s.slice(lo..hi)),
        None => candle_core::bail!("fused kernel: input is not contiguous"),
    }
}

/// Evaluates `$body` (a `CudaSlice<$t>`) with `$t` the storage's element type (f32, bf16 or
/// f16) and wraps the result as a storage on `$dev`.
macro_rules! dispatch {
    ($dev:expr, $first:expr, |$t:ident| $body:expr) => {{
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
        Ok(CudaStorage {
            slice,
            device: $dev.clone(),
        })
    }};
}

fn slice<T: candle_core::cuda_backend::CudaDType>(s: &CudaStorage) -> Result<&CudaSlice<T>> {
    s.as_cuda_slice::<T>()
}

/// Elements of T in one 16-byte pack (the vectorised kernels' unit).
fn pack<T>() -> usize {
    16 / std::mem::size_of::<T>()
}

/// Whether a contiguous view starts on a 16-byte boundary (allocations are at least 256-byte
/// aligned, so only the view's offset matters).
fn aligned<T>(l: &Layout) -> bool {
    (l.start_offset() * std::mem::size_of::<T>()).is_multiple_of(16)
}

/// Blocks for a grid-stride kernel over `items` with ROW_BLOCK threads.
fn grid_flat(items: usize) -> u32 {
    items.div_ceil(ROW_BLOCK as usize).clamp(1, 16_384) as u32
}

fn grid_rows(rows: usize) -> u32 {
    rows.div_ceil((ROW_BLOCK / 32) as usize).clamp(1, MAX_GRID) as u32
}

#[allow(clippy::too_many_arguments)]
pub fn bias_act(
    kernel: &str,
    y: In,
    bias: In,
    res: Option<In>,
    rows: usize,
    cols: usize,
    rows_per_group: usize,
) -> Result<CudaStorage> {
    let dev = y.0.device().clone();
    dispatch!(dev, y.0, |T| {
        let yv = contiguous(slice::<T>(y.0)?, y.1)?;
        let bv = contiguous(slice::<T>(bias.0)?, bias.1)?;
        let rv = match res {
            Some((s, l)) => Some(contiguous(slice::<T>(s)?, l)?),
            None => None,
        };
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let vector = cols.is_multiple_of(pack::<T>())
            && rows * cols < u32::MAX as usize
            && aligned::<T>(y.1)
            && aligned::<T>(bias.1)
            && res.is_none_or(|(_, l)| aligned::<T>(l));
        let (name, grid) = if vector {
            let grid = (grid_flat(rows * cols / pack::<T>()), 1, 1);
            (format!("{kernel}_v"), grid)
        } else {
            let grid = (
                cols.div_ceil(ROW_BLOCK as usize).max(1) as u32,
                rows.clamp(1, MAX_GRID) as u32,
                1,
            );
            (kernel.to_string(), grid)
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(&name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols, rpg) = (rows as u32, cols as u32, rows_per_group as u32);
        let mut b = func.builder();
        b.arg(&yv);
        b.arg(&bv);
        if let Some(rv) = &rv {
            b.arg(rv);
        }
        b.arg(&out);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&rpg);
        // SAFETY: the kernel reads rows × cols of y (and res) and groups × cols of bias, all
        // checked by the caller, and writes the rows × cols it was given.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

pub fn softmax_bias(
    s: In,
    bias: In,
    rows: usize,
    cols: usize,
    bias_rows: usize,
    scale: f32,
) -> Result<CudaStorage> {
    let dev = s.0.device().clone();
    dispatch!(dev, s.0, |T| {
        let sv = contiguous(slice::<T>(s.0)?, s.1)?;
        let bv = contiguous(slice::<T>(bias.0)?, bias.1)?;
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let vector = cols.is_multiple_of(pack::<T>()) && aligned::<T>(s.1) && aligned::<T>(bias.1);
        // Rows of up to 4 packs per lane stay in registers (the kernel's MAXP).
        let name = match vector {
            true if cols <= 32 * 4 * pack::<T>() => "softmax_bias_r",
            true => "softmax_bias_v",
            false => "softmax_bias",
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_rows(rows), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols, bias_rows) = (rows as u32, cols as u32, bias_rows as u32);
        let mut b = func.builder();
        b.arg(&sv);
        b.arg(&bv);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&bias_rows);
        b.arg(&scale);
        // SAFETY: reads rows × cols scores and bias_rows × cols bias, writes rows × cols.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

pub fn layer_norm(x: In, rows: usize, cols: usize, eps: f32) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    dispatch!(dev, x.0, |T| {
        let xv = contiguous(slice::<T>(x.0)?, x.1)?;
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let vector = cols.is_multiple_of(pack::<T>()) && aligned::<T>(x.1);
        // fused.cu LN_PACKS: the register-resident kernel holds up to 8 packs a lane.
        let name = match vector {
            true if cols <= 32 * 8 * pack::<T>() => "layer_norm_r",
            true => "layer_norm_v",
            false => "layer_norm",
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_rows(rows), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols) = (rows as u32, cols as u32);
        let mut b = func.builder();
        b.arg(&xv);
        b.arg(&out);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&eps);
        // SAFETY: reads and writes rows × cols.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// `dims` = [batch, tokens, heads, head_dim].
pub fn split_qkv(qkv: In, bias: In, dims: [usize; 4]) -> Result<CudaStorage> {
    let [batch, tokens, heads, hd] = dims;
    let cols = 3 * heads * hd;
    let dev = qkv.0.device().clone();
    let (bias_start, bias_stride) = (bias.1.start_offset(), bias.1.stride()[0]);
    dispatch!(dev, qkv.0, |T| {
        let qv = contiguous(slice::<T>(qkv.0)?, qkv.1)?;
        let bslice = slice::<T>(bias.0)?;
        let bend = bias_start + (batch - 1) * bias_stride + cols;
        if bend > bslice.len() {
            candle_core::bail!("split_qkv: bias view runs past its storage");
        }
        let bv = bslice.slice(bias_start..bend);
        let out = unsafe { dev.alloc::<T>(batch * tokens * cols)? };
        let vector = hd.is_multiple_of(pack::<T>())
            && bias_stride.is_multiple_of(pack::<T>())
            && aligned::<T>(qkv.1)
            && (bias_start * std::mem::size_of::<T>()).is_multiple_of(16);
        let name = if vector { "split_qkv_v" } else { "split_qkv" };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: ((batch * tokens).clamp(1, MAX_GRID) as u32, 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, t32, h32, d32, s32) = (
            batch as u32,
            tokens as u32,
            heads as u32,
            hd as u32,
            bias_stride as u32,
        );
        let mut b = func.builder();
        b.arg(&qv);
        b.arg(&bv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&t32);
        b.arg(&h32);
        b.arg(&d32);
        b.arg(&s32);
        // SAFETY: reads batch·tokens rows of qkv and batch strided bias rows (bounds checked
        // above), writes 3 · batch · heads · tokens · hd.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// `dims` = [batch, tokens, heads, head_dim].
pub fn merge_heads(ctx: In, dims: [usize; 4]) -> Result<CudaStorage> {
    let [batch, tokens, heads, hd] = dims;
    let dev = ctx.0.device().clone();
    dispatch!(dev, ctx.0, |T| {
        let cv = contiguous(slice::<T>(ctx.0)?, ctx.1)?;
        let out = unsafe { dev.alloc::<T>(batch * tokens * heads * hd)? };
        let vector = hd.is_multiple_of(pack::<T>()) && aligned::<T>(ctx.1);
        let name = if vector {
            "merge_heads_v"
        } else {
            "merge_heads"
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: ((batch * tokens).clamp(1, MAX_GRID) as u32, 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, t32, h32, d32) = (batch as u32, tokens as u32, heads as u32, hd as u32);
        let mut b = func.builder();
        b.arg(&cv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&t32);
        b.arg(&h32);
        b.arg(&d32);
        // SAFETY: reads and writes batch · tokens · heads · hd.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// `dims` = input [batch, h, w, c].
pub fn im2col3x3(x: In, dims: [usize; 4], up: usize) -> Result<CudaStorage> {
    let [batch, h, w, c] = dims;
    let total = batch * h * up * w * up * 9 * c;
    let dev = x.0.device().clone();
    dispatch!(dev, x.0, |T| {
        let xv = contiguous(slice::<T>(x.0)?, x.1)?;
        let out = unsafe { dev.alloc::<T>(total)? };
        let vector =
            c.is_multiple_of(pack::<T>()) && aligned::<T>(x.1) && total < u32::MAX as usize;
        let (name, items) = if vector {
            ("im2col3x3_v", total / pack::<T>())
        } else {
            ("im2col3x3", total)
        };
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_flat(items), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, h32, w32, c32, up32) = (batch as u32, h as u32, w as u32, c as u32, up as u32);
        let mut b = func.builder();
        b.arg(&xv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&h32);
        b.arg(&w32);
        b.arg(&c32);
        b.arg(&up32);
        // SAFETY: reads batch·h·w·c, writes total = batch·(h·up)·(w·up)·9·c.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// `dims` = [batch, h, w, c] of the input; weight [cout, 9·c], bias [cout], cout ≤ 4.
pub fn conv3x3_small(x: In, w: In, bias: In, dims: [usize; 4], cout: usize) -> Result<CudaStorage> {
    let [batch, h, wd, c] = dims;
    let pixels = batch * h * wd;
    // fused.cu: the weights as [9·c] float4 in shared memory, within the default 48 KiB.
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
        let xv = contiguous(slice::<T>(x.0)?, x.1)?;
        let wv = contiguous(slice::<T>(w.0)?, w.1)?;
        let bv = contiguous(slice::<T>(bias.0)?, bias.1)?;
        let out = unsafe { dev.alloc::<T>(pixels * cout)? };
        let func =
            dev.get_or_load_custom_func(&kernel_name::<T>("conv3x3_cout4_v"), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_flat(pixels), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (b32, h32, w32, c32, o32) = (batch as u32, h as u32, wd as u32, c as u32, cout as u32);
        let mut b = func.builder();
        b.arg(&xv);
        b.arg(&wv);
        b.arg(&bv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&h32);
        b.arg(&w32);
        b.arg(&c32);
        b.arg(&o32);
        // SAFETY: reads batch·h·w·c, cout·9·c weights and cout biases; writes pixels·cout.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// Pixels a block of the scalar statistics kernel sums.
const GN_TILE: usize = 32;

/// `dims` = [batch, hw, channels, groups].
pub fn group_norm(
    x: In,
    gamma: In,
    beta: In,
    dims: [usize; 4],
    eps: f32,
    silu: bool,
) -> Result<CudaStorage> {
    let [batch, hw, c, groups] = dims;
    let dev = x.0.device().clone();
    let stream = dev.cuda_stream();
    // Per-(sample, group) shifted moments, then (in place) mean and 1/std, in f32.
    let sums = stream.alloc_zeros::<f32>(batch * groups).w()?;
    let sq = stream.alloc_zeros::<f32>(batch * groups).w()?;
    dispatch!(dev, x.0, |T| {
        let xv = contiguous(slice::<T>(x.0)?, x.1)?;
        let gv = contiguous(slice::<T>(gamma.0)?, gamma.1)?;
        let bv = contiguous(slice::<T>(beta.0)?, beta.1)?;
        let out = unsafe { dev.alloc::<T>(batch * hw * c)? };
        // Packs where the channels allow: tiles of up to 256 pixels, smaller where that would
        // leave fewer than ~512 blocks.
        let vector = c.is_multiple_of(pack::<T>()) && aligned::<T>(x.1);
        let (name, threads, tile) = if vector {
            ("gn_moments_v", ROW_BLOCK, (hw * batch / 512).clamp(16, 256))
        } else {
            (
                "gn_moments",
                c.next_multiple_of(32).min(512) as u32,
                GN_TILE,
            )
        };
        let stats_cfg = LaunchConfig {
            grid_dim: (hw.div_ceil(tile).max(1) as u32, batch as u32, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: (2 * groups * std::mem::size_of::<f32>()) as u32,
        };
        let (hw32, c32, g32, tile32, b32) = (
            hw as u32,
            c as u32,
            groups as u32,
            tile as u32,
            batch as u32,
        );
        let f = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&sums);
        b.arg(&sq);
        b.arg(&hw32);
        b.arg(&c32);
        b.arg(&g32);
        b.arg(&tile32);
        // SAFETY: reads batch·hw·c, adds into the batch·groups sums.
        unsafe { b.launch(stats_cfg) }.w()?;
        let f = dev.get_or_load_custom_func(&kernel_name::<T>("gn_finalize"), MODULE, PTX)?;
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&sums);
        b.arg(&sq);
        b.arg(&b32);
        b.arg(&hw32);
        b.arg(&c32);
        b.arg(&g32);
        b.arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (grid_flat(batch * groups), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: reads one value of x per (sample, group), rewrites sums and sq in place.
        unsafe { b.launch(cfg) }.w()?;
        let vector = c.is_multiple_of(pack::<T>())
            && batch * hw * c < u32::MAX as usize
            && aligned::<T>(x.1)
            && aligned::<T>(gamma.1)
            && aligned::<T>(beta.1);
        let name = match (silu, vector) {
            (true, true) => "gn_apply_silu_v",
            (false, true) => "gn_apply_v",
            (true, false) => "gn_apply_silu",
            (false, false) => "gn_apply",
        };
        let items = if vector {
            batch * hw * c / pack::<T>()
        } else {
            batch * hw * c
        };
        let f = dev.get_or_load_custom_func(&kernel_name::<T>(name), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_flat(items), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&sums);
        b.arg(&sq);
        b.arg(&gv);
        b.arg(&bv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&hw32);
        b.arg(&c32);
        b.arg(&g32);
        b.arg(&eps);
        // SAFETY: reads batch·hw·c and c-long gamma/beta, writes batch·hw·c.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// One cuBLASLt handle (with its 32 MiB workspace) per device, on the device's stream.
fn cublaslt(dev: &candle_core::CudaDevice) -> Result<std::sync::Arc<CudaBlasLT>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static HANDLES: OnceLock<Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<CudaBlasLT>>>> =
        OnceLock::new();
    let mut map = HANDLES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(h) = map.get(&dev.id()) {
        return Ok(h.clone());
    }
    let h = Arc::new(CudaBlasLT::new(dev.cuda_stream()).map_err(candle_core::Error::wrap)?);
    map.insert(dev.id(), h.clone());
    Ok(h)
}

/// y [m, n] = act(x [m, k] · w [n, k]ᵀ + b [n]) through cuBLASLt's BIAS or GELU_BIAS epilogue.
/// Row-major y is column-major yᵀ [n, m] = w · xᵀ: A = w (stored as column-major [k, n],
/// transposed), B = x (column-major [k, m]).
pub fn linear_bias_act(x: In, w: In, b: In, dims: [usize; 3], gelu: bool) -> Result<CudaStorage> {
    let act = gelu.then_some(LtActivation::Gelu);
    let [m, n, k] = dims;
    let dev = x.0.device().clone();
    let lt = cublaslt(&dev)?;
    let cfg = MatmulConfig {
        transa: true,
        transb: false,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: k as i64,
        ldb: k as i64,
        beta: 0.0,
        ldc: n as i64,
        stride_a: None,
        stride_b: None,
        stride_c: None,
        stride_bias: None,
        batch_size: None,
    };
    let slice = match &x.0.slice {
        CudaStorageSlice::BF16(_) => {
            type T = half::bf16;
            let (xv, wv, bv) = (
                contiguous(slice::<T>(x.0)?, x.1)?,
                contiguous(slice::<T>(w.0)?, w.1)?,
                contiguous(slice::<T>(b.0)?, b.1)?,
            );
            let mut out = unsafe { dev.alloc::<T>(m * n)? };
            // SAFETY: the layouts above describe exactly the m·k, n·k and n elements the views
            // hold; out holds m·n.
            unsafe { lt.matmul(cfg, &wv, &xv, &mut out, Some(&bv), act.as_ref()) }
                .map_err(candle_core::Error::wrap)?;
            CudaStorageSlice::BF16(out)
        }
        CudaStorageSlice::F16(_) => {
            type T = half::f16;
            let (xv, wv, bv) = (
                contiguous(slice::<T>(x.0)?, x.1)?,
                contiguous(slice::<T>(w.0)?, w.1)?,
                contiguous(slice::<T>(b.0)?, b.1)?,
            );
            let mut out = unsafe { dev.alloc::<T>(m * n)? };
            // SAFETY: as above.
            unsafe { lt.matmul(cfg, &wv, &xv, &mut out, Some(&bv), act.as_ref()) }
                .map_err(candle_core::Error::wrap)?;
            CudaStorageSlice::F16(out)
        }
        _ => candle_core::bail!("linear_bias_act: cuBLASLt path is for bf16/f16"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

/// Threads of the fused attention kernel (fused.cu, ATT_WARPS).
const ATT_THREADS: u32 = 128;

/// The head dims the fused attention kernel is compiled for (fused.cu, INSTANTIATE_ATT_ALL):
/// `hd` zero-padded to the next one.
fn padded_head_dim(hd: usize) -> Option<usize> {
    [32, 64, 80, 128].into_iter().find(|&p| p >= hd)
}

/// Whether the fused attention kernel's tiling for head dim `hd` fits the device's shared memory
/// per block: sm_90 allows 227 KiB, sm_86/sm_89 only 99 KiB, below the 106 KiB of the hd-72 tiling
/// (the model then takes the unfused ops).
pub fn attention_fits_device(dev: &candle_core::CudaDevice, hd: usize, elem: usize) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let Some(hdp) = padded_head_dim(hd) else {
        return false;
    };
    let need = AttTiling::for_head_dim(hdp).smem_bytes(hdp, elem);
    dev.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .is_ok_and(|max| need <= max as usize)
}

/// How the fused attention kernel tiles one (sample, head) (fused.cu, INSTANTIATE_ATT_ALL).
struct AttTiling {
    /// Kernel name suffix.
    name: &'static str,
    /// Query rows a CTA.
    bq: usize,
    /// Key rows a block.
    bk: usize,
    /// Key blocks in flight.
    stages: usize,
}

impl AttTiling {
    /// For a padded head dim: 32 query rows a warp up to 80 (each K/V fragment feeds two
    /// m-tiles), 16 at 128, where 32 would not fit the registers.
    fn for_head_dim(hdp: usize) -> Self {
        if hdp <= 80 {
            Self {
                name: "b",
                bq: 128,
                bk: 32,
                stages: 4,
            }
        } else {
            Self {
                name: "a",
                bq: 64,
                bk: 64,
                stages: 2,
            }
        }
    }

    /// Dynamic shared memory: the Q tile and `stages` × (K and V blocks, the bias tile).
    fn smem_bytes(&self, hdp: usize, elem: usize) -> usize {
        let ld = hdp + 8;
        (self.bq * ld + self.stages * (2 * self.bk * ld + self.bq * (self.bk + 8))) * elem
    }
}

/// `dims` = [batch, tokens, heads, head_dim]; output [batch·tokens, heads·head_dim].
pub fn attention(
    qkv: In,
    sbias: In,
    abias: In,
    dims: [usize; 4],
    scale: f32,
) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
    let [batch, tokens, heads, hd] = dims;
    let hdp = padded_head_dim(hd)
        .ok_or_else(|| candle_core::Error::Msg(format!("attention: head dim {hd} > 128")))?;
    let tiling = AttTiling::for_head_dim(hdp);
    let dev = qkv.0.device().clone();
    let (sb_start, sb_stride) = (sbias.1.start_offset(), sbias.1.stride()[0]);
    let d3 = 3 * heads * hd;
    dispatch!(dev, qkv.0, |T| {
        let qv = contiguous(slice::<T>(qkv.0)?, qkv.1)?;
        let sbs = slice::<T>(sbias.0)?;
        let sb_end = sb_start + (batch - 1) * sb_stride + d3;
        if sb_end > sbs.len() {
            candle_core::bail!("attention: sample bias view runs past its storage");
        }
        let sbv = sbs.slice(sb_start..sb_end);
        let av = contiguous(slice::<T>(abias.0)?, abias.1)?;
        let out = unsafe { dev.alloc::<T>(batch * tokens * heads * hd)? };
        let name = format!("attention_{hdp}{}", tiling.name);
        let func = dev.get_or_load_custom_func(&kernel_name::<T>(&name), MODULE, PTX)?;
        let bytes = tiling.smem_bytes(hdp, std::mem::size_of::<T>());
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )
        .w()?;
        let cfg = LaunchConfig {
            grid_dim: (
                tokens.div_ceil(tiling.bq) as u32,
                heads as u32,
                batch as u32,
            ),
            block_dim: (ATT_THREADS, 1, 1),
            shared_mem_bytes: bytes as u32,
        };
        let (b32, t32, h32, d32, s32) = (
            batch as u32,
            tokens as u32,
            heads as u32,
            hd as u32,
            sb_stride as u32,
        );
        let mut b = func.builder();
        b.arg(&qv);
        b.arg(&sbv);
        b.arg(&av);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&t32);
        b.arg(&h32);
        b.arg(&d32);
        b.arg(&s32);
        b.arg(&scale);
        // SAFETY: reads batch·tokens rows of 3·heads·hd (qkv), batch strided bias rows (bounds
        // checked above) and the [heads·tokens, tokens] table; writes batch·tokens·heads·hd.
        unsafe { b.launch(cfg) }.w()?;
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
        let xv = contiguous(slice::<T>(x.0)?, x.1)?;
        let out = unsafe { dev.alloc::<T>(total)? };
        let f =
            dev.get_or_load_custom_func(&kernel_name::<T>("im2col_up2_phases_v"), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_flat(total / pack::<T>()), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, h32, w32, c32) = (batch as u32, h as u32, w as u32, c as u32);
        let mut b = f.builder();
        b.arg(&xv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&h32);
        b.arg(&w32);
        b.arg(&c32);
        // SAFETY: reads batch·h·w·c, writes total = 16·batch·h·w·c.
        unsafe { b.launch(cfg) }.w()?;
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
        let yv = contiguous(slice::<T>(y.0)?, y.1)?;
        let bv = contiguous(slice::<T>(bias.0)?, bias.1)?;
        let out = unsafe { dev.alloc::<T>(total)? };
        let f =
            dev.get_or_load_custom_func(&kernel_name::<T>("pixel_shuffle_bias_v"), MODULE, PTX)?;
        let cfg = LaunchConfig {
            grid_dim: (grid_flat(total / pack::<T>()), 1, 1),
            block_dim: (ROW_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let (b32, h32, w32, c32) = (batch as u32, h as u32, w as u32, c as u32);
        let mut b = f.builder();
        b.arg(&yv);
        b.arg(&bv);
        b.arg(&out);
        b.arg(&b32);
        b.arg(&h32);
        b.arg(&w32);
        b.arg(&c32);
        // SAFETY: reads 4·batch·h·w·c and c bias values, writes the same count.
        unsafe { b.launch(cfg) }.w()?;
        out
    })
}

/// Owns a cuBLASLt descriptor and destroys it on every path out.
struct LtHandle<T: Copy>(T, unsafe fn(T) -> std::result::Result<(), CublasErr>);

type CublasErr = candle_core::cuda_backend::cudarc::cublaslt::result::CublasError;

impl<T: Copy> Drop for LtHandle<T> {
    fn drop(&mut self) {
        // SAFETY: created by the matching create function and destroyed only here.
        let _ = unsafe { (self.1)(self.0) };
    }
}

/// A 32 MiB cuBLASLt workspace per device (cudarc keeps its own private to its matmul).
fn lt_workspace(dev: &candle_core::CudaDevice) -> Result<std::sync::Arc<CudaSlice<u8>>> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};
    static SPACES: OnceLock<
        Mutex<HashMap<candle_core::cuda_backend::DeviceId, Arc<CudaSlice<u8>>>>,
    > = OnceLock::new();
    let mut map = SPACES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(w) = map.get(&dev.id()) {
        return Ok(w.clone());
    }
    let w = Arc::new(dev.cuda_stream().alloc_zeros::<u8>(LT_WORKSPACE).w()?);
    map.insert(dev.id(), w.clone());
    Ok(w)
}

const LT_WORKSPACE: usize = 32 << 20;

/// D [m, n] = x [m, k] · w [n, k]ᵀ + b [n] + res [m, n] in one cuBLASLt call (C = res with
/// beta = 1, the BIAS epilogue, D a new buffer): the bias and the residual add cost no pass of
/// their own. bf16/f16 only. Column-major view as in `linear_bias_act`.
pub fn linear_bias_residual(x: In, w: In, b: In, res: In, dims: [usize; 3]) -> Result<CudaStorage> {
    use candle_core::cuda_backend::cudarc::cublaslt::{result as lt, sys, MatmulShared};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    let [m, n, k] = dims;
    let dev = x.0.device().clone();
    let handle = cublaslt(&dev)?;
    let ws = lt_workspace(&dev)?;
    let stream = dev.cuda_stream();
    let wrap = candle_core::Error::wrap;
    macro_rules! run {
        ($t:ty, $dt:expr, $variant:ident) => {{
            let (xv, wv, bv, rv) = (
                contiguous(slice::<$t>(x.0)?, x.1)?,
                contiguous(slice::<$t>(w.0)?, w.1)?,
                contiguous(slice::<$t>(b.0)?, b.1)?,
                contiguous(slice::<$t>(res.0)?, res.1)?,
            );
            let mut out = unsafe { dev.alloc::<$t>(m * n)? };
            let layout = |rows: usize, cols: usize, ld: usize| {
                lt::create_matrix_layout($dt, rows as u64, cols as u64, ld as i64)
                    .map(|l| LtHandle(l, lt::destroy_matrix_layout))
                    .map_err(wrap)
            };
            // A = w stored column-major [k, n], used transposed; B = x column-major [k, m];
            // C = res and D = out column-major [n, m].
            let (a_l, b_l, c_l) = (layout(k, n, k)?, layout(k, m, k)?, layout(n, m, n)?);
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map(|d| LtHandle(d, lt::destroy_matmul_desc))
            .map_err(wrap)?;
            let (bias_ptr, _bias_sync) = bv.device_ptr(&stream);
            let transpose: i32 = 1;
            let epilogue = sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            // SAFETY: attribute values of the documented types, live for the calls.
            unsafe {
                lt::set_matmul_desc_attribute(
                    desc.0,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    (&transpose) as *const i32 as *const _,
                    std::mem::size_of::<i32>(),
                )
                .map_err(wrap)?;
                lt::set_matmul_desc_attribute(
                    desc.0,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                    (&epilogue) as *const _ as *const _,
                    std::mem::size_of::<sys::cublasLtEpilogue_t>(),
                )
                .map_err(wrap)?;
                lt::set_matmul_desc_attribute(
                    desc.0,
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias_ptr) as *const _ as *const _,
                    std::mem::size_of_val(&bias_ptr),
                )
                .map_err(wrap)?;
            }
            let pref = lt::create_matmul_pref()
                .map(|p| LtHandle(p, lt::destroy_matmul_pref))
                .map_err(wrap)?;
            let ws_size = LT_WORKSPACE;
            // SAFETY: as above.
            unsafe {
                lt::set_matmul_pref_attribute(
                    pref.0,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&ws_size) as *const usize as *const _,
                    std::mem::size_of::<usize>(),
                )
                .map_err(wrap)?;
            }
            // SAFETY: the descriptors are live; the layouts describe exactly the views' sizes.
            let heuristic = unsafe {
                lt::get_matmul_algo_heuristic(*handle.handle(), desc.0, a_l.0, b_l.0, c_l.0, c_l.0, pref.0)
            }
            .map_err(wrap)?;
            let (alpha, beta) = (1f32, 1f32);
            {
                let (a_ptr, _a) = wv.device_ptr(&stream);
                let (b_ptr, _b) = xv.device_ptr(&stream);
                let (c_ptr, _c) = rv.device_ptr(&stream);
                let (ws_ptr, _w) = ws.device_ptr(&stream);
                let (d_ptr, _d) = out.device_ptr_mut(&stream);
                // SAFETY: every pointer is a live allocation of the size its layout states, on
                // this stream; the workspace is LT_WORKSPACE bytes.
                unsafe {
                    lt::matmul(
                        *handle.handle(),
                        desc.0,
                        (&alpha) as *const f32 as *const _,
                        (&beta) as *const f32 as *const _,
                        a_ptr as *const _,
                        a_l.0,
                        b_ptr as *const _,
                        b_l.0,
                        c_ptr as *const _,
                        c_l.0,
                        d_ptr as *mut _,
                        c_l.0,
                        (&heuristic.algo) as *const _,
                        ws_ptr as *mut _,
                        ws_size,
                        stream.cu_stream() as *mut _,
                    )
                }
                .map_err(wrap)?;
            }
            CudaStorageSlice::$variant(out)
        }};
    }
    let slice = match &x.0.slice {
        CudaStorageSlice::BF16(_) => run!(half::bf16, sys_dt_bf16(), BF16),
        CudaStorageSlice::F16(_) => run!(half::f16, sys_dt_f16(), F16),
        _ => candle_core::bail!("linear_bias_residual: cuBLASLt path is for bf16/f16"),
    };
    Ok(CudaStorage {
        slice,
        device: dev.clone(),
    })
}

fn sys_dt_bf16() -> candle_core::cuda_backend::cudarc::cublaslt::sys::cudaDataType {
    candle_core::cuda_backend::cudarc::cublaslt::sys::cudaDataType_t::CUDA_R_16BF
}

fn sys_dt_f16() -> candle_core::cuda_backend::cudarc::cublaslt::sys::cudaDataType {
    candle_core::cuda_backend::cudarc::cublaslt::sys::cudaDataType_t::CUDA_R_16F
}
