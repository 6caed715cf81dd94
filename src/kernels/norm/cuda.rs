//! Launchers for norm.cu.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Result};

use crate::kernels::launch::{
    aligned, config, dispatch, flat, module, pack, view, warp_rows, Buf, In, Module,
};
use crate::kernels::tiling::{LN_PACKS, ROW_BLOCK};

const KERNELS: Module = module!("norm");

/// Pixels a block of the scalar statistics kernel sums.
const GN_TILE: usize = 32;

pub fn layer_norm(x: In, rows: usize, cols: usize, eps: f32) -> Result<CudaStorage> {
    let dev = x.0.device().clone();
    dispatch!(dev, x.0, |T| {
        let xv = view::<T>(x)?;
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let vector = cols.is_multiple_of(pack::<T>()) && aligned::<T>(x.1);
        // The register-resident kernel holds up to LN_PACKS packs a lane.
        let name = match vector {
            true if cols <= 32 * LN_PACKS * pack::<T>() => "layer_norm_r",
            true => "layer_norm_v",
            false => "layer_norm",
        };
        // SAFETY: reads and writes rows × cols.
        unsafe {
            KERNELS.launch::<T>(
                &dev,
                name,
                warp_rows(rows),
                &[&xv, &out],
                &[rows, cols],
                &[eps],
            )
        }?;
        out
    })
}

/// `dims` = [batch, hw, channels, groups]. With `im2col` = Some((h, w)) (h · w = hw; SiLU on,
/// C a multiple of the pack) the output is the 3×3 im2col columns of the result, [batch·hw, 9·C].
pub fn group_norm(
    x: In,
    gamma: In,
    beta: In,
    dims: [usize; 4],
    eps: f32,
    silu: bool,
    im2col: Option<(usize, usize)>,
) -> Result<CudaStorage> {
    let [batch, hw, c, groups] = dims;
    let dev = x.0.device().clone();
    let stream = dev.cuda_stream();
    // Per-(sample, group) mean and 1/std, in f32, from each tile's shifted moments.
    // SAFETY (these and the partials below): every element is written by gn_moments /
    // gn_finalize before anything reads it, so no memsets.
    let sums = unsafe { stream.alloc::<f32>(batch * groups) }.w()?;
    let sq = unsafe { stream.alloc::<f32>(batch * groups) }.w()?;
    dispatch!(dev, x.0, |T| {
        let (xv, gv, bv) = (view::<T>(x)?, view::<T>(gamma)?, view::<T>(beta)?);
        let taps = if im2col.is_some() { 9 } else { 1 };
        let out = unsafe { dev.alloc::<T>(batch * hw * c * taps)? };
        // Packs where the channels allow: tiles of up to 256 pixels, smaller where that would
        // leave fewer than ~512 blocks. Shared memory holds each thread's per-channel sums
        // (per lane of pixels for packs): the block adds them in a fixed order (deterministic).
        let vector = c.is_multiple_of(pack::<T>()) && aligned::<T>(x.1);
        let (name, threads, tile, slots) = if vector {
            let lanes = (ROW_BLOCK as usize / (c / pack::<T>())).max(1);
            let tile = (hw * batch / 512).clamp(16, 256);
            ("gn_moments_v", ROW_BLOCK, tile, lanes)
        } else {
            let threads = c.next_multiple_of(32).min(512) as u32;
            ("gn_moments", threads, GN_TILE, 1)
        };
        let tiles = hw.div_ceil(tile).max(1);
        let partial_a = unsafe { stream.alloc::<f32>(batch * tiles * groups) }.w()?;
        let partial_q = unsafe { stream.alloc::<f32>(batch * tiles * groups) }.w()?;
        let grid = (tiles as u32, batch as u32, 1);
        let cfg = config(grid, threads, 2 * slots * c * std::mem::size_of::<f32>());
        let sizes = [hw, c, groups, tile];
        // SAFETY: reads batch·hw·c, writes every one of the batch·tiles·groups partials.
        let bufs = [&xv as &dyn Buf, &partial_a, &partial_q];
        unsafe { KERNELS.launch::<T>(&dev, name, cfg, &bufs, &sizes, &[]) }?;
        let cfg = warp_rows(batch * groups);
        let sizes = [batch, hw, c, groups, tiles];
        // SAFETY: reads the partials and one value of x per (sample, group), writes sums and sq.
        let bufs = [&xv as &dyn Buf, &partial_a, &partial_q, &sums, &sq];
        unsafe { KERNELS.launch::<T>(&dev, "gn_finalize", cfg, &bufs, &sizes, &[eps]) }?;
        let sizes = [batch, hw, c, groups];
        let vector = c.is_multiple_of(pack::<T>())
            && batch * hw * c < u32::MAX as usize
            && aligned::<T>(x.1)
            && aligned::<T>(gamma.1)
            && aligned::<T>(beta.1);
        if let Some((h, w)) = im2col {
            if !(silu && vector && h * w == hw) {
                candle_core::bail!(
                    "group_norm → im2col: needs SiLU, {c} channels a multiple of the pack, aligned \
                     inputs and {h}×{w} = {hw} pixels (the caller checks)"
                );
            }
            let bufs = [&xv as &dyn Buf, &sums, &sq, &gv, &bv, &out];
            let items = batch * hw * c / pack::<T>();
            // SAFETY: reads batch·hw·c and c-long gamma/beta, writes every one of the
            // batch·hw·9·c im2col columns exactly once (the kernel's comment says how).
            unsafe {
                KERNELS.launch::<T>(
                    &dev,
                    "gn_silu_im2col3x3_v",
                    flat(items),
                    &bufs,
                    &[batch, h, w, c, groups],
                    &[],
                )
            }?;
        } else {
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
            let bufs = [&xv as &dyn Buf, &sums, &sq, &gv, &bv, &out];
            // SAFETY: reads batch·hw·c and c-long gamma/beta, writes batch·hw·c.
            unsafe { KERNELS.launch::<T>(&dev, name, flat(items), &bufs, &sizes, &[eps]) }?;
        }
        out
    })
}
