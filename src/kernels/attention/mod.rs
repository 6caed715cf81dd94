//! Attention: the DiffiT block's self-attention (`attention`: one flash-attention kernel, or
//! `split_qkv`, two matmuls, `softmax_bias` and `merge_heads`) and the softmax of the VAE
//! decoder's mid-block attention (`softmax_bias` with a zero bias).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape};
use candle_core::{Result, Tensor};

use super::cpu::{cpu_f32, cpu_f32_strided_rows, cpu_store, rows_cols};
use super::tiling::ATT90_MAX_HDP;

#[cfg(feature = "cuda")]
mod cuda;

/// `softmax(scale · scores + bias)` over the last dimension, where score row r takes bias row
/// r mod bias.rows: for scores [B, heads, N, N] and the relative-position bias [heads·N, N] the
/// bias is added per head without being broadcast in memory.
pub fn softmax_bias(scores: &Tensor, bias: &Tensor, scale: f32) -> Result<Tensor> {
    let cols = scores.dim(candle_core::D::Minus1)?;
    let rows = scores.elem_count() / cols.max(1);
    let (bias_rows, bcols) = bias.dims2()?;
    if bcols != cols || bias_rows == 0 || !rows.is_multiple_of(bias_rows) {
        candle_core::bail!(
            "softmax_bias: bias {:?} does not tile {rows} rows of {cols}",
            bias.dims()
        );
    }
    scores
        .contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &SoftmaxBias { scale })
}

/// Splits the qkv matmul output [B, N, 3·heads·hd] into q, k, v of [B, heads, N, hd] each,
/// adding the per-sample bias [B, 3·heads·hd] (row stride free, so a column slice of a wider
/// tensor works). Returns [3, B, heads, N, hd].
pub fn split_qkv(qkv: &Tensor, sample_bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = qkv.dims3()?;
    if c % (3 * heads) != 0 {
        candle_core::bail!("split_qkv: {c} columns are not 3 × {heads} heads");
    }
    if sample_bias.dims() != [b, c] || sample_bias.stride()[1] != 1 {
        candle_core::bail!(
            "split_qkv: sample bias {:?} (stride {:?}) is not [{b}, {c}] with unit column stride",
            sample_bias.dims(),
            sample_bias.stride()
        );
    }
    let op = SplitQkv {
        batch: b,
        tokens: n,
        heads,
        head_dim: c / (3 * heads),
    };
    qkv.contiguous()?.apply_op2_no_bwd(sample_bias, &op)
}

/// Which kernel runs `attention` on CUDA in bf16/f16 (the CPU and f32 always take the unfused
/// ops; every choice computes the same function).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flash {
    /// `split_qkv`, two matmuls, `softmax_bias` and `merge_heads`.
    Off,
    /// One flash-attention kernel on mma.sync tensor cores (flash.cu), on any card whose shared
    /// memory holds its tiling.
    MmaSync,
    /// One flash-attention kernel on Hopper's wgmma (flash_sm90.cu) with CTAs of the given
    /// query rows, on a compute-capability 9.0 device for a multiple of 8 tokens; elsewhere
    /// `MmaSync` ([`wgmma_applies`]).
    Wgmma(Att90Rows),
}

/// Query rows a CTA of the Hopper kernel works on: one warpgroup of 64 (two CTAs an SM, more
/// CTAs for small batches) or two of 128 (each K/V block read once for twice the rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Att90Rows {
    #[value(name = "64")]
    R64,
    #[value(name = "128")]
    R128,
}

impl Att90Rows {
    /// Warpgroups of a CTA (the `_w{n}` of the kernel name).
    pub fn warpgroups(self) -> usize {
        match self {
            Self::R64 => 1,
            Self::R128 => 2,
        }
    }
}

/// Whether `Flash::Wgmma` runs the Hopper kernel rather than falling back to mma.sync: the
/// device is compute capability 9.0 and the binary was built for it (`sm90`), the bias table's
/// rows are whole 16-byte chunks (a multiple of 8 tokens; the kernel copies the bias in such
/// chunks), and the head dim pads to one the kernel is built for (at most `ATT90_MAX_HDP`, 80).
pub fn wgmma_applies(sm90: bool, tokens: usize, head_dim: usize) -> bool {
    sm90 && tokens.is_multiple_of(8) && head_dim <= ATT90_MAX_HDP
}

/// Whether the mma.sync flash kernel takes its small-grid tiling ("s", 4 warps a CTA) rather
/// than "b" (8 warps): where "b"'s `ctas` would leave some of the device's `sms` idle. A row's
/// arithmetic is the same under both, so the choice may follow the batch.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn small_grid(ctas: usize, sms: usize) -> bool {
    ctas < sms
}

/// Query tiles one CTA of the Hopper kernel works through (tiles of 64 · `warpgroups` rows; the kernel's
/// `tile_count`), for `batch_heads` (sample, head) pairs on `sms` multiprocessors. Where every
/// key block of the sequence stays in the kernel's ring (`tokens` ≤ `ring_keys`) a CTA can take
/// all the tiles of its (sample, head), reading K and V once instead of once a tile; that pays
/// while the grid still fills the GPU twice over (two CTAs an SM at 64 rows, one at 128).
/// Otherwise one tile a CTA.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub fn wgmma_tiles_per_cta(
    tokens: usize,
    warpgroups: usize,
    batch_heads: usize,
    sms: usize,
    ring_keys: usize,
) -> usize {
    let tiles = tokens.div_ceil(64 * warpgroups);
    let ctas_per_sm = 2 / warpgroups;
    match tokens <= ring_keys && batch_heads >= 2 * sms * ctas_per_sm {
        true => tiles,
        false => 1,
    }
}

/// Self-attention of one DiffiT block from the qkv matmul output: q, k, v are the column
/// thirds of `qkv` [B, N, 3·D] plus the per-sample bias [B, 3·D] (any row stride), split into
/// `heads`; scores are `scale · q·kᵀ + attn_bias` ([heads·N, N] table, row h·N + i); returns
/// softmax(scores)·v merged back to [B, N, D]. Unless `flash` is `Off`, on CUDA in bf16/f16
/// (head dim a multiple of 8, at most 128) this is one flash-attention kernel (online softmax
/// in registers): no head split, no scores in memory, no merge pass — 0.34 against 0.78 ms a
/// block at B = 64 on an H100 with mma.sync (docs/perf.md v0.12; wgmma: docs/attention.md).
/// Otherwise it is `split_qkv`, two matmuls, `softmax_bias` and `merge_heads`.
pub fn attention(
    qkv: &Tensor,
    sample_bias: &Tensor,
    attn_bias: &Tensor,
    heads: usize,
    scale: f32,
    flash: Flash,
) -> Result<Tensor> {
    let (b, n, c) = qkv.dims3()?;
    let hd = c / (3 * heads).max(1);
    if attn_bias.dims() != [heads * n, n] {
        candle_core::bail!(
            "attention: bias {:?} is not [{}, {n}]",
            attn_bias.dims(),
            heads * n
        );
    }
    if flash != Flash::Off
        && flash_attention_fits(qkv, sample_bias, hd)
        && attn_bias.layout().start_offset().is_multiple_of(8)
    {
        let wgmma = match flash {
            Flash::Wgmma(rows) if wgmma_applies(wgmma_device(qkv.device()), n, hd) => Some(rows),
            _ => None,
        };
        let op = FlashAttention {
            dims: [b, n, heads, hd],
            scale,
            wgmma,
        };
        return qkv
            .contiguous()?
            .apply_op3_no_bwd(sample_bias, &attn_bias.contiguous()?, &op);
    }
    let split = split_qkv(qkv, sample_bias, heads)?;
    let (q, k, v) = (split.get(0)?, split.get(1)?, split.get(2)?);
    let probs = softmax_bias(&q.matmul(&k.t()?)?, attn_bias, scale)?;
    merge_heads(&probs.matmul(&v)?)
}

/// [B, heads, N, hd] → [B, N, heads·hd].
pub fn merge_heads(ctx: &Tensor) -> Result<Tensor> {
    ctx.contiguous()?.apply_op1_no_bwd(&MergeHeads)
}

/// Whether the fused attention kernel takes these inputs (see `attention`).
fn flash_attention_fits(qkv: &Tensor, sample_bias: &Tensor, hd: usize) -> bool {
    let strides_ok = sample_bias.rank() == 2
        && sample_bias.stride()[1] == 1
        && sample_bias.stride()[0].is_multiple_of(8)
        && sample_bias.layout().start_offset().is_multiple_of(8)
        && qkv.layout().start_offset().is_multiple_of(8);
    qkv.device().is_cuda()
        && matches!(qkv.dtype(), DType::BF16 | DType::F16)
        && hd.is_multiple_of(8)
        && (8..=128).contains(&hd)
        && strides_ok
        && attention_fits_device(qkv.device(), hd)
}

#[cfg(feature = "cuda")]
fn attention_fits_device(device: &Device, hd: usize) -> bool {
    match device {
        Device::Cuda(d) => cuda::attention_fits_device(d, hd, 2),
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn attention_fits_device(_: &Device, _: usize) -> bool {
    false
}

/// Whether `device` can run the Hopper kernel (see [`wgmma_applies`]).
#[cfg(feature = "cuda")]
pub fn wgmma_device(device: &Device) -> bool {
    match device {
        Device::Cuda(d) => cuda::wgmma_available(d),
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
pub fn wgmma_device(_: &Device) -> bool {
    false
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttention {
    /// [batch, tokens, heads, head_dim]
    dims: [usize; 4],
    scale: f32,
    /// The Hopper kernel with CTAs of these rows; `None`: the mma.sync kernel.
    wgmma: Option<Att90Rows>,
}

struct SoftmaxBias {
    scale: f32,
}

struct SplitQkv {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

struct MergeHeads;

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "diffit-flash-attention"
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
        candle_core::bail!("attention routes the CPU through the unfused ops")
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
        let [b, n, h, hd] = self.dims;
        let out = match self.wgmma {
            Some(rows) => {
                cuda::attention_sm90((s1, l1), (s2, l2), (s3, l3), self.dims, self.scale, rows)?
            }
            None => cuda::attention((s1, l1), (s2, l2), (s3, l3), self.dims, self.scale)?,
        };
        Ok((out, Shape::from((b, n, h * hd))))
    }
}

impl CustomOp2 for SoftmaxBias {
    fn name(&self) -> &'static str {
        "diffit-softmax-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l1);
        let bias = cpu_f32(s2, l2)?;
        let bias_rows = bias.len() / cols;
        let mut out = cpu_f32(s1, l1)?;
        for (r, row) in out.chunks_mut(cols).enumerate() {
            let b = &bias[(r % bias_rows) * cols..][..cols];
            let mut max = f32::NEG_INFINITY;
            for (v, &bv) in row.iter_mut().zip(b) {
                *v = *v * self.scale + bv;
                max = max.max(*v);
            }
            let mut sum = 0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            row.iter_mut().for_each(|v| *v /= sum);
        }
        Ok((cpu_store(out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(l1);
        let bias_rows = l2.shape().elem_count() / cols;
        let out = cuda::softmax_bias((s1, l1), (s2, l2), rows, cols, bias_rows, self.scale)?;
        Ok((out, l1.shape().clone()))
    }
}

impl SplitQkv {
    fn out_shape(&self) -> Shape {
        Shape::from((3, self.batch, self.heads, self.tokens, self.head_dim))
    }
}

impl CustomOp2 for SplitQkv {
    fn name(&self) -> &'static str {
        "diffit-split-qkv"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = cpu_f32(s1, l1)?;
        let (heads, hd, tokens, batch) = (self.heads, self.head_dim, self.tokens, self.batch);
        let d = heads * hd;
        let cols = 3 * d;
        // The bias may be a column slice: read it row by row through its layout.
        let bias_all = cpu_f32_strided_rows(s2, l2, batch, cols)?;
        let mut out = vec![0f32; qkv.len()];
        for b in 0..batch {
            let brow = &bias_all[b * cols..][..cols];
            for n in 0..tokens {
                let row = &qkv[(b * tokens + n) * cols..][..cols];
                for (c, (&v, &bv)) in row.iter().zip(brow).enumerate() {
                    let (s, h, e) = (c / d, (c % d) / hd, c % hd);
                    out[(((s * batch + b) * heads + h) * tokens + n) * hd + e] = v + bv;
                }
            }
        }
        Ok((cpu_store(out, s1.dtype())?, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::split_qkv(
            (s1, l1),
            (s2, l2),
            [self.batch, self.tokens, self.heads, self.head_dim],
        )?;
        Ok((out, self.out_shape()))
    }
}

impl CustomOp1 for MergeHeads {
    fn name(&self) -> &'static str {
        "diffit-merge-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, tokens, hd) = l.shape().dims4()?;
        let ctx = cpu_f32(s, l)?;
        let d = heads * hd;
        let mut out = vec![0f32; ctx.len()];
        for b in 0..batch {
            for h in 0..heads {
                for n in 0..tokens {
                    let src = &ctx[((b * heads + h) * tokens + n) * hd..][..hd];
                    out[(b * tokens + n) * d + h * hd..][..hd].copy_from_slice(src);
                }
            }
        }
        Ok((cpu_store(out, s.dtype())?, Shape::from((batch, tokens, d))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (batch, heads, tokens, hd) = l.shape().dims4()?;
        let out = cuda::merge_heads((s, l), [batch, tokens, heads, hd])?;
        Ok((out, Shape::from((batch, tokens, heads * hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wgmma_runs_only_on_sm90_for_token_counts_of_8s_and_head_dims_to_80() {
        assert!(wgmma_applies(true, 256, 72));
        assert!(wgmma_applies(true, 1024, 72));
        assert!(wgmma_applies(true, 200, 8));
        assert!(wgmma_applies(true, 200, 80));
        assert!(
            !wgmma_applies(true, 17, 72),
            "bias chunks would straddle rows"
        );
        assert!(
            !wgmma_applies(true, 70, 72),
            "bias chunks would straddle rows"
        );
        assert!(!wgmma_applies(false, 256, 72), "not a 9.0 device: mma.sync");
        assert!(!wgmma_applies(true, 136, 88), "pads to 128: not built");
        assert!(!wgmma_applies(true, 136, 128), "pads to 128: not built");
        assert_eq!(Att90Rows::R64.warpgroups(), 1);
        assert_eq!(Att90Rows::R128.warpgroups(), 2);
    }

    #[test]
    fn the_hopper_variants_have_distinct_kernel_names_and_the_row_options_their_cta_sizes() {
        use crate::kernels::tiling::{ATT90_ROWS128, ATT90_ROWS64, ATT90_VARIANTS};
        let names: std::collections::HashSet<String> =
            ATT90_VARIANTS.iter().map(|v| v.name()).collect();
        assert_eq!(names.len(), ATT90_VARIANTS.len());
        assert!(names.contains("w2k64s2o0") && names.contains("w2k64s2o1"));
        assert!(ATT90_VARIANTS.contains(&ATT90_ROWS64) && ATT90_VARIANTS.contains(&ATT90_ROWS128));
        assert_eq!(ATT90_ROWS64.warpgroups, Att90Rows::R64.warpgroups());
        assert_eq!(ATT90_ROWS128.warpgroups, Att90Rows::R128.warpgroups());
    }

    #[test]
    fn the_small_grid_tiling_runs_only_where_tiling_b_leaves_sms_idle() {
        // A B = 1 guided step at IN-256: 2 rows × 16 heads × 2 tiles of 128 queries.
        assert!(small_grid(64, 132));
        assert!(small_grid(131, 132));
        assert!(!small_grid(132, 132));
        // B = 16 guided: 32 × 16 × 2.
        assert!(!small_grid(1024, 132));
    }

    #[test]
    fn a_cta_takes_every_query_tile_only_when_the_keys_stay_resident_and_the_grid_is_full() {
        let tiles = |n, wg, bh| wgmma_tiles_per_cta(n, wg, bh, 132, 256);
        // IN-256 at B = 64 guided: 128 samples × 16 heads.
        assert_eq!(tiles(256, 1, 2048), 4);
        assert_eq!(tiles(256, 2, 2048), 2);
        // B = 1 guided: 32 pairs would leave most SMs idle.
        assert_eq!(tiles(256, 1, 32), 1);
        assert_eq!(tiles(256, 2, 32), 1);
        // 64 rows run two CTAs an SM, so need twice the pairs.
        assert_eq!(tiles(256, 1, 300), 1);
        assert_eq!(tiles(256, 2, 300), 2);
        // IN-512: 1024 keys do not fit the ring, K and V stream through it once a tile.
        assert_eq!(tiles(1024, 1, 4096), 1);
        // A partial last tile counts.
        assert_eq!(tiles(200, 1, 2048), 4);
    }

    #[test]
    fn every_flash_choice_computes_the_unfused_attention_on_the_cpu() -> Result<()> {
        let dev = Device::Cpu;
        let (b, n, heads, hd) = (2, 6, 2, 8);
        let qkv = Tensor::randn(0f32, 1.0, (b, n, 3 * heads * hd), &dev)?;
        let sb = Tensor::randn(0f32, 1.0, (b, 3 * heads * hd), &dev)?;
        let ab = Tensor::randn(0f32, 1.0, (heads * n, n), &dev)?;
        let want = attention(&qkv, &sb, &ab, heads, 0.3, Flash::Off)?;
        for flash in [
            Flash::MmaSync,
            Flash::Wgmma(Att90Rows::R64),
            Flash::Wgmma(Att90Rows::R128),
        ] {
            let got = attention(&qkv, &sb, &ab, heads, 0.3, flash)?;
            let diff = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(diff, 0.0, "{flash:?}: the CPU takes the unfused ops");
        }
        Ok(())
    }
}
