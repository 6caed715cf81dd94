//! Launchers for attention.cu (softmax_bias, split_qkv, merge_heads), flash.cu and
//! flash_sm90.cu.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, CudaStorage, Result};

use super::{small_grid, wgmma_tiles_per_cta, Att90Rows};
use crate::kernels::launch::{
    self, aligned, block_rows, config, dispatch, dispatch_half, module, pack, strided_rows, view,
    warp_rows, In, Module,
};
use crate::kernels::tiling::{
    Att90Variant, ATT90_MAX_HDP, ATT90_ROWS128, ATT90_ROWS64, ATT90_VARIANTS, ATT_A_BK, ATT_A_MT,
    ATT_A_STAGES, ATT_A_WARPS, ATT_B_BK, ATT_B_MAX_HDP, ATT_B_MT, ATT_B_STAGES, ATT_B_WARPS,
    ATT_HEAD_DIMS, ATT_S_WARPS, SOFTMAX_PACKS,
};

const KERNELS: Module = module!("attention");
const FLASH: Module = module!("flash");
/// Empty unless the binary is built for compute capability 9.0 (build.rs).
const FLASH90: Module = module!("flash_sm90");

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
        let (sv, bv) = (view::<T>(s)?, view::<T>(bias)?);
        let out = unsafe { dev.alloc::<T>(rows * cols)? };
        let vector = cols.is_multiple_of(pack::<T>()) && aligned::<T>(s.1) && aligned::<T>(bias.1);
        // Rows of up to SOFTMAX_PACKS packs a lane stay in registers.
        let name = match vector {
            true if cols <= 32 * SOFTMAX_PACKS * pack::<T>() => "softmax_bias_r",
            true => "softmax_bias_v",
            false => "softmax_bias",
        };
        let (cfg, sizes) = (warp_rows(rows), [rows, cols, bias_rows]);
        // SAFETY: reads rows × cols scores and bias_rows × cols bias, writes rows × cols.
        unsafe { KERNELS.launch::<T>(&dev, name, cfg, &[&sv, &bv, &out], &sizes, &[scale]) }?;
        out
    })
}

/// `dims` = [batch, tokens, heads, head_dim].
pub fn split_qkv(qkv: In, bias: In, dims: [usize; 4]) -> Result<CudaStorage> {
    let [batch, tokens, heads, hd] = dims;
    let cols = 3 * heads * hd;
    let dev = qkv.0.device().clone();
    let bias_stride = bias.1.stride()[0];
    dispatch!(dev, qkv.0, |T| {
        let qv = view::<T>(qkv)?;
        let bv = strided_rows::<T>(bias, batch, cols, "split_qkv: bias")?;
        let out = unsafe { dev.alloc::<T>(batch * tokens * cols)? };
        let vector = hd.is_multiple_of(pack::<T>())
            && bias_stride.is_multiple_of(pack::<T>())
            && aligned::<T>(qkv.1)
            && aligned::<T>(bias.1);
        let name = if vector { "split_qkv_v" } else { "split_qkv" };
        let sizes = [batch, tokens, heads, hd, bias_stride];
        let cfg = block_rows(batch * tokens);
        // SAFETY: reads batch·tokens rows of qkv and batch strided bias rows (bounds checked
        // by strided_rows), writes 3 · batch · heads · tokens · hd.
        unsafe { KERNELS.launch::<T>(&dev, name, cfg, &[&qv, &bv, &out], &sizes, &[]) }?;
        out
    })
}

/// `dims` = [batch, tokens, heads, head_dim].
pub fn merge_heads(ctx: In, dims: [usize; 4]) -> Result<CudaStorage> {
    let [batch, tokens, heads, hd] = dims;
    let dev = ctx.0.device().clone();
    dispatch!(dev, ctx.0, |T| {
        let cv = view::<T>(ctx)?;
        let out = unsafe { dev.alloc::<T>(batch * tokens * heads * hd)? };
        let vector = hd.is_multiple_of(pack::<T>()) && aligned::<T>(ctx.1);
        let name = if vector {
            "merge_heads_v"
        } else {
            "merge_heads"
        };
        let (cfg, sizes) = (block_rows(batch * tokens), [batch, tokens, heads, hd]);
        // SAFETY: reads and writes batch · tokens · heads · hd.
        unsafe { KERNELS.launch::<T>(&dev, name, cfg, &[&cv, &out], &sizes, &[]) }?;
        out
    })
}

/// The padded head dim the flash kernel runs `hd` at: the next one it is compiled for.
fn padded_head_dim(hd: usize) -> Option<usize> {
    ATT_HEAD_DIMS.into_iter().find(|&p| p >= hd)
}

/// Whether the flash kernel's tiling for head dim `hd` fits the device's shared memory per
/// block: sm_90 allows 227 KiB, sm_86/sm_89 only 99 KiB, below the 102 KiB of the hd-72 tiling
/// (the model then takes the unfused ops).
pub fn attention_fits_device(dev: &CudaDevice, hd: usize, elem: usize) -> bool {
    let Some(hdp) = padded_head_dim(hd) else {
        return false;
    };
    let need = AttTiling::for_head_dim(hdp).smem_bytes(hdp, elem);
    dev.cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .is_ok_and(|max| need <= max as usize)
}

/// How the flash kernel tiles one (sample, head): flash.cu's instantiations, from the same
/// constants (tiling.rs).
struct AttTiling {
    /// Kernel name suffix.
    name: &'static str,
    /// Warps a CTA.
    warps: usize,
    /// Query rows a CTA.
    bq: usize,
    /// Key rows a block.
    bk: usize,
    /// Key blocks in flight.
    stages: usize,
}

impl AttTiling {
    /// For a padded head dim: tiling "b" up to ATT_B_MAX_HDP, "a" above.
    fn for_head_dim(hdp: usize) -> Self {
        let (name, warps, mt, bk, stages) = if hdp <= ATT_B_MAX_HDP {
            ("b", ATT_B_WARPS, ATT_B_MT, ATT_B_BK, ATT_B_STAGES)
        } else {
            ("a", ATT_A_WARPS, ATT_A_MT, ATT_A_BK, ATT_A_STAGES)
        };
        Self {
            name,
            warps,
            bq: warps * 16 * mt,
            bk,
            stages,
        }
    }

    /// Tiling "s": "b" with fewer warps a CTA, so a small grid spreads over more SMs.
    fn small() -> Self {
        Self {
            name: "s",
            warps: ATT_S_WARPS,
            bq: ATT_S_WARPS * 16 * ATT_B_MT,
            bk: ATT_B_BK,
            stages: ATT_B_STAGES,
        }
    }

    /// The tiling that runs `batch` × `heads` × `tokens` on `dev`: "s" where "b"'s grid would
    /// leave SMs idle ([`small_grid`]); the hidden environment variable DIFFIT_ATT_TILING (`b`
    /// or `s`) forces one where the head dim allows (for measuring).
    fn choose(
        dev: &CudaDevice,
        hdp: usize,
        batch: usize,
        heads: usize,
        tokens: usize,
    ) -> Result<Self> {
        let b = Self::for_head_dim(hdp);
        if b.name != "b" {
            return Ok(b);
        }
        // Read once: it is a per-launch decision on the step's hot path.
        static FORCED: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
        let forced = *FORCED.get_or_init(|| match std::env::var("DIFFIT_ATT_TILING").as_deref() {
            Ok("b") => Some(false),
            Ok("s") => Some(true),
            _ => None,
        });
        let small = match forced {
            Some(small) => small,
            None => small_grid(tokens.div_ceil(b.bq) * heads * batch, sm_count(dev)?),
        };
        Ok(if small { Self::small() } else { b })
    }

    /// Dynamic shared memory: the Q tile, `stages` × (K and V blocks, the bias tile) and the
    /// q and v bias slices of the (sample, head).
    fn smem_bytes(&self, hdp: usize, elem: usize) -> usize {
        let ld = hdp + 8;
        (self.bq * ld + self.stages * (2 * self.bk * ld + self.bq * (self.bk + 8)) + 2 * hdp) * elem
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
    let [batch, tokens, heads, hd] = dims;
    let hdp = padded_head_dim(hd)
        .ok_or_else(|| candle_core::Error::Msg(format!("attention: head dim {hd} > 128")))?;
    let dev = qkv.0.device().clone();
    let tiling = AttTiling::choose(&dev, hdp, batch, heads, tokens)?;
    let sb_stride = sbias.1.stride()[0];
    dispatch!(dev, qkv.0, |T| {
        let qv = view::<T>(qkv)?;
        let sbv = strided_rows::<T>(sbias, batch, 3 * heads * hd, "attention: sample bias")?;
        let av = view::<T>(abias)?;
        let out = unsafe { dev.alloc::<T>(batch * tokens * heads * hd)? };
        let bytes = tiling.smem_bytes(hdp, std::mem::size_of::<T>());
        let func =
            FLASH.func_with_smem::<T>(&dev, &format!("attention_{hdp}{}", tiling.name), bytes)?;
        let grid = (
            tokens.div_ceil(tiling.bq) as u32,
            heads as u32,
            batch as u32,
        );
        let cfg = config(grid, (tiling.warps * 32) as u32, bytes);
        let sizes = [batch, tokens, heads, hd, sb_stride];
        // SAFETY: reads batch·tokens rows of 3·heads·hd (qkv), batch strided bias rows (bounds
        // checked by strided_rows) and the [heads·tokens, tokens] table; writes
        // batch·tokens·heads·hd.
        unsafe { launch::launch(&dev, &func, cfg, &[&qv, &sbv, &av, &out], &sizes, &[scale]) }?;
        out
    })
}

/// The multiprocessors of `dev` (both attention kernels size their grids by it).
fn sm_count(dev: &CudaDevice) -> Result<usize> {
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    Ok(sms as usize)
}

/// Whether the Hopper kernel can run on `dev`: its code was built (CUDA_COMPUTE_CAP 90) and the
/// device is compute capability 9.0 (sm_90a code runs on no other).
pub fn wgmma_available(dev: &CudaDevice) -> bool {
    let stream = dev.cuda_stream();
    let attr = |a| stream.context().attribute(a).ok();
    !FLASH90.image.is_empty()
        && attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) == Some(9)
        && attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR) == Some(0)
}

/// The variant `rows` runs: tiling.rs's for it, unless the hidden environment variable
/// DIFFIT_ATT90_VARIANT names another of `ATT90_VARIANTS` (`w1k64s2o1`…; for measuring).
fn variant(rows: Att90Rows) -> Att90Variant {
    static FORCED: std::sync::OnceLock<Option<Att90Variant>> = std::sync::OnceLock::new();
    let forced = FORCED.get_or_init(|| {
        let name = std::env::var("DIFFIT_ATT90_VARIANT").ok()?;
        ATT90_VARIANTS.into_iter().find(|v| v.name() == name)
    });
    forced.unwrap_or(match rows {
        Att90Rows::R64 => ATT90_ROWS64,
        Att90Rows::R128 => ATT90_ROWS128,
    })
}

/// Dynamic shared memory of the Hopper kernel: per stage a K and a V block in the core-matrix
/// layout (no padding) and the CTA's bias tile (rows padded by 8 elements); the Q tile, rows
/// padded by 8; q's and v's per-sample bias slices.
fn sm90_smem_bytes(hdp: usize, v: Att90Variant, elem: usize) -> usize {
    let bq = 64 * v.warpgroups;
    (v.stages * (2 * v.block_keys * hdp + bq * (v.block_keys + 8)) + bq * (hdp + 8) + 2 * hdp)
        * elem
}

/// [`wgmma_tiles_per_cta`] for `dev`; the hidden environment variable
/// DIFFIT_WGMMA_TILES_PER_CTA overrides it where the keys stay resident (for measuring).
fn tiles_per_cta(
    dev: &CudaDevice,
    tokens: usize,
    v: Att90Variant,
    batch_heads: usize,
) -> Result<usize> {
    let ring_keys = v.block_keys * v.stages;
    let sms = sm_count(dev)?;
    let forced = std::env::var("DIFFIT_WGMMA_TILES_PER_CTA")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&t| t >= 1 && tokens <= ring_keys);
    Ok(forced
        .unwrap_or_else(|| wgmma_tiles_per_cta(tokens, v.warpgroups, batch_heads, sms, ring_keys)))
}

/// [`attention`] on the Hopper kernel (flash_sm90.cu), CTAs of `rows` query rows. The caller
/// checked the inputs as for [`attention`] and the rest of `super::wgmma_applies` (device,
/// `tokens` a multiple of 8, head dim).
pub fn attention_sm90(
    qkv: In,
    sbias: In,
    abias: In,
    dims: [usize; 4],
    scale: f32,
    rows: Att90Rows,
) -> Result<CudaStorage> {
    let [batch, tokens, heads, hd] = dims;
    let hdp = padded_head_dim(hd)
        .ok_or_else(|| candle_core::Error::Msg(format!("attention: head dim {hd} > 128")))?;
    if !tokens.is_multiple_of(8) || hdp > ATT90_MAX_HDP {
        candle_core::bail!(
            "attention_sm90: {tokens} tokens, head dim {hd}: the kernel needs a multiple of 8 \
             tokens and a head dim up to {ATT90_MAX_HDP}"
        );
    }
    let dev = qkv.0.device().clone();
    let sb_stride = sbias.1.stride()[0];
    let v = variant(rows);
    let wg = v.warpgroups;
    dispatch_half!(dev, qkv.0, "attention_sm90", |T| {
        let qv = view::<T>(qkv)?;
        let sbv = strided_rows::<T>(sbias, batch, 3 * heads * hd, "attention: sample bias")?;
        let av = view::<T>(abias)?;
        let out = unsafe { dev.alloc::<T>(batch * tokens * heads * hd)? };
        let bytes = sm90_smem_bytes(hdp, v, std::mem::size_of::<T>());
        let func =
            FLASH90.func_with_smem::<T>(&dev, &format!("attention90_{hdp}_{}", v.name()), bytes)?;
        let tiles = tiles_per_cta(&dev, tokens, v, batch * heads)?;
        let grid = (
            tokens.div_ceil(64 * wg * tiles) as u32,
            heads as u32,
            batch as u32,
        );
        let cfg = config(grid, (128 * wg) as u32, bytes);
        let sizes = [batch, tokens, heads, hd, sb_stride, tiles];
        // SAFETY: as for `attention`: reads batch·tokens rows of 3·heads·hd (qkv), batch strided
        // bias rows (bounds checked by strided_rows) and the [heads·tokens, tokens] table (in
        // 16-byte chunks: tokens is a multiple of 8, the table 16-byte aligned); writes
        // batch·tokens·heads·hd.
        unsafe { launch::launch(&dev, &func, cfg, &[&qv, &sbv, &av, &out], &sizes, &[scale]) }?;
        out
    })
}
