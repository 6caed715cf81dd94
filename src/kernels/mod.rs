//! Fused kernels for the DiffiT block: each replaces several candle passes (and the broadcasts
//! candle's CUDA backend is slow at) with one pass over memory. Every op is a candle custom op
//! with a CUDA kernel (src/kernels/fused.cu, with the `cuda` feature) and a CPU fallback that
//! computes the same thing, so the fused model path runs, and is tested, on any device.
//!
//! All ops compute in f32 and store the run dtype (f32, bf16 or f16); inputs must be
//! contiguous (the callers pass fresh matmul outputs).

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Shape, Tensor,
};

#[cfg(feature = "cuda")]
mod cuda;
pub mod reference;

type Result<T> = candle_core::Result<T>;

/// What follows the bias add in [`bias_act`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    /// GELU with the tanh approximation.
    GeluTanh,
}

/// `act(y + bias[row / rows_per_group]) (+ residual)` over the rows of `y` (all but its last
/// dimension). `bias` is [groups, cols] with groups · rows_per_group = rows: one bias row for the
/// whole tensor (a layer's bias) or one per sample.
pub fn bias_act(
    y: &Tensor,
    bias: &Tensor,
    rows_per_group: usize,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let cols = y.dim(candle_core::D::Minus1)?;
    let rows = y.elem_count() / cols.max(1);
    let (groups, bcols) = bias.dims2()?;
    if bcols != cols || rows_per_group == 0 || groups * rows_per_group != rows {
        candle_core::bail!(
            "bias_act: bias {:?} does not fit {rows} rows of {cols} in groups of {rows_per_group}",
            bias.dims()
        );
    }
    let op = BiasAct {
        rows_per_group,
        act,
    };
    let (y, bias) = (y.contiguous()?, bias.contiguous()?);
    match residual {
        None => y.apply_op2_no_bwd(&bias, &op),
        Some(res) => {
            if res.dims() != y.dims() {
                candle_core::bail!("bias_act: residual {:?} ≠ {:?}", res.dims(), y.dims());
            }
            y.apply_op3_no_bwd(&bias, &res.contiguous()?, &op)
        }
    }
}

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

/// LayerNorm over the last dimension with no affine parameters.
pub fn layer_norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&LayerNorm { eps })
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

/// Self-attention of one DiffiT block from the qkv matmul output: q, k, v are the column
/// thirds of `qkv` [B, N, 3·D] plus the per-sample bias [B, 3·D] (any row stride), split into
/// `heads`; scores are `scale · q·kᵀ + attn_bias` ([heads·N, N] table, row h·N + i); returns
/// softmax(scores)·v merged back to [B, N, D]. With `flash`, on CUDA in bf16/f16 (head dim a
/// multiple of 8, at most 128) this is one flash-attention kernel (mma.sync tensor cores,
/// online softmax in registers): no head split, no scores in memory, no merge pass — 0.34
/// against 0.78 ms a block at B = 64 on an H100 (docs/perf.md v0.12). Otherwise it is
/// `split_qkv`, two matmuls, `softmax_bias` and `merge_heads`.
pub fn attention(
    qkv: &Tensor,
    sample_bias: &Tensor,
    attn_bias: &Tensor,
    heads: usize,
    scale: f32,
    flash: bool,
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
    if flash
        && flash_attention_fits(qkv, sample_bias, hd)
        && attn_bias.layout().start_offset().is_multiple_of(8)
    {
        let op = FlashAttention {
            dims: [b, n, heads, hd],
            scale,
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

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct FlashAttention {
    /// [batch, tokens, heads, head_dim]
    dims: [usize; 4],
    scale: f32,
}

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
        let out = cuda::attention((s1, l1), (s2, l2), (s3, l3), self.dims, self.scale)?;
        Ok((out, Shape::from((b, n, h * hd))))
    }
}

/// [B, heads, N, hd] → [B, N, heads·hd].
pub fn merge_heads(ctx: &Tensor) -> Result<Tensor> {
    ctx.contiguous()?.apply_op1_no_bwd(&MergeHeads)
}

/// The columns of a 3×3, padding-1 convolution over channels-last `x` [B, H, W, C], after a
/// nearest upsampling by `up` (1 or 2): [B·H·up·W·up, 9·C], column (ky·3 + kx)·C + c. With the
/// weight as [Cout, 3·3·C] (`[Cout, C, 3, 3]` permuted to (ky, kx, c)) the convolution is one
/// matmul whose output is already channels-last.
pub fn im2col3x3(x: &Tensor, up: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    if !(up == 1 || up == 2) {
        candle_core::bail!("im2col3x3: upsampling factor {up} is not 1 or 2");
    }
    let op = Im2col {
        dims: [b, h, w, c],
        up,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// A 3×3 convolution (padding 1) of channels-last `x` [B, H, W, C] with at most 4 output
/// channels: weight [Cout, 3·3·C] in (ky, kx, c) order, bias [Cout]; returns [B, H, W, Cout].
/// One direct kernel on CUDA (no im2col: for the VAE's 128 → 3 output convolution that was
/// nine copies of a full-resolution activation and cuBLAS's unaligned N = 3 path); needs C a
/// multiple of 8 and at most 336 there (`conv3x3_small_fits`).
pub fn conv3x3_small(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (cout, k) = weight.dims2()?;
    if k != 9 * c || bias.dims() != [cout] || !(1..=4).contains(&cout) {
        candle_core::bail!(
            "conv3x3_small: weight {:?} / bias {:?} do not fit {c} channels to 1..=4",
            weight.dims(),
            bias.dims()
        );
    }
    let op = Conv3x3Small {
        dims: [b, h, w, c],
        cout,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &op)
}

/// Whether `conv3x3_small` takes a convolution of `c` input and `cout` output channels.
pub fn conv3x3_small_fits(c: usize, cout: usize) -> bool {
    (1..=4).contains(&cout) && c.is_multiple_of(8) && c <= 336
}

/// GroupNorm with affine parameters over channels-last `x` [B, spatial…, C] (statistics per
/// sample and group of C / groups channels), then SiLU when `silu`.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let c = x.dim(candle_core::D::Minus1)?;
    let b = x.dim(0)?;
    if x.rank() < 2 || groups == 0 || c % groups != 0 {
        candle_core::bail!("group_norm: {groups} groups do not divide {c} channels");
    }
    if gamma.dims() != [c] || beta.dims() != [c] {
        candle_core::bail!(
            "group_norm: gamma {:?} / beta {:?} are not [{c}]",
            gamma.dims(),
            beta.dims()
        );
    }
    let op = GroupNormOp {
        batch: b,
        hw: x.elem_count() / (b * c).max(1),
        channels: c,
        groups,
        eps,
        silu,
    };
    x.contiguous()?
        .apply_op3_no_bwd(&gamma.contiguous()?, &beta.contiguous()?, &op)
}

/// `act(x·Wᵀ + b)` for x [.., K], weight [N, K], bias [N]. On CUDA in bf16/f16 the bias and
/// the activation run in the matmul's epilogue (cuBLASLt `BIAS` / `GELU_BIAS`), so the
/// [rows, N] output is written once; elsewhere (the CPU, f32 — where cuBLASLt would compute
/// in TF32 — or with `lt_epilogue` off) it is the matmul followed by `bias_act`.
pub fn linear_bias_act(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    act: Activation,
    lt_epilogue: bool,
) -> Result<Tensor> {
    let mut dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let (n, wk) = weight.dims2()?;
    if wk != k || bias.dims() != [n] {
        candle_core::bail!(
            "linear_bias_act: x {:?}, weight {:?}, bias {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let rows = x.elem_count() / k.max(1);
    *dims.last_mut().expect("rank ≥ 1") = n;
    let x2 = x.reshape((rows, k))?;
    if lt_epilogue && lt_epilogue_applies(x) {
        return x2
            .contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &bias.contiguous()?, &LinearAct(act))?
            .reshape(dims);
    }
    bias_act(
        &x2.matmul(&weight.t()?)?,
        &bias.unsqueeze(0)?,
        rows,
        act,
        None,
    )?
    .reshape(dims)
}

/// `x·Wᵀ + b + residual` for x [.., K], weight [N, K], bias [N], residual [.., N]. On CUDA in
/// bf16/f16 one cuBLASLt call (C = residual with beta = 1, the `BIAS` epilogue) writes the result,
/// so neither the bias nor the residual add costs a pass; elsewhere the matmul and `bias_act`.
pub fn linear_bias_residual(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    residual: &Tensor,
    lt_epilogue: bool,
) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let (n, wk) = weight.dims2()?;
    let rows = x.elem_count() / k.max(1);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank ≥ 1") = n;
    if wk != k || bias.dims() != [n] || residual.dims() != dims.as_slice() {
        candle_core::bail!(
            "linear_bias_residual: x {:?}, weight {:?}, bias {:?}, residual {:?} do not fit",
            x.dims(),
            weight.dims(),
            bias.dims(),
            residual.dims()
        );
    }
    let x2 = x.reshape((rows, k))?;
    let r2 = residual.reshape((rows, n))?;
    if lt_epilogue && lt_epilogue_applies(x) {
        let op = LinearResidual {
            bias: bias.contiguous()?,
        };
        return x2
            .contiguous()?
            .apply_op3_no_bwd(&weight.contiguous()?, &r2.contiguous()?, &op)?
            .reshape(dims);
    }
    bias_act(
        &x2.matmul(&weight.t()?)?,
        &bias.unsqueeze(0)?,
        rows,
        Activation::Identity,
        Some(&r2),
    )?
    .reshape(dims)
}

/// The cuBLASLt matmul + bias + residual (CUDA only; see `linear_bias_residual`). Custom ops
/// take three tensors, so the bias rides along in the op.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct LinearResidual {
    bias: Tensor,
}

impl CustomOp3 for LinearResidual {
    fn name(&self) -> &'static str {
        "diffit-linear-bias-residual"
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
        candle_core::bail!("linear_bias_residual routes the CPU through matmul + bias_act")
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
        let (m, k) = l1.shape().dims2()?;
        let n = l2.shape().dims2()?.0;
        let (bias, bias_l) = self.bias.storage_and_layout();
        let candle_core::Storage::Cuda(bias) = &*bias else {
            candle_core::bail!("linear_bias_residual: bias is not on the GPU");
        };
        let out =
            cuda::linear_bias_residual((s1, l1), (s2, l2), (bias, bias_l), (s3, l3), [m, n, k])?;
        Ok((out, Shape::from((m, n))))
    }
}

/// cuBLASLt epilogues run on CUDA in bf16/f16 only (f32 would compute in TF32 there).
fn lt_epilogue_applies(x: &Tensor) -> bool {
    x.device().is_cuda() && matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// The cuBLASLt matmul with a BIAS or GELU_BIAS epilogue (CUDA only; see `linear_bias_act`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct LinearAct(Activation);

impl CustomOp3 for LinearAct {
    fn name(&self) -> &'static str {
        "diffit-linear-bias-act"
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
        candle_core::bail!("linear_bias_act routes the CPU through matmul + bias_act")
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
        let (m, k) = l1.shape().dims2()?;
        let n = l2.shape().dims2()?.0;
        let gelu = self.0 == Activation::GeluTanh;
        let out = cuda::linear_bias_act((s1, l1), (s2, l2), (s3, l3), [m, n, k], gelu)?;
        Ok((out, Shape::from((m, n))))
    }
}

/// Nearest ×2 upsampling followed by a 3×3, padding-1 convolution of channels-last `x`
/// [B, H, W, C], as four 2×2 convolutions of `x` itself, one per output phase (py, px): the
/// columns [4, B·H·W, 4·C], column (dy·2 + dx)·C + c = x[b, y + py + dy − 1, x + px + dx − 1, c]
/// (zero outside). Multiplied by `up2_phase_weights` and put back in place by
/// `pixel_shuffle_bias`, it equals the convolution of the upsampled image with 2.25× fewer
/// FLOPs and im2col bytes.
pub fn im2col_up2_phases(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.contiguous()?
        .apply_op1_no_bwd(&Im2colUp2 { dims: [b, h, w, c] })
}

/// The phase weights for `im2col_up2_phases`: a 3×3 weight [O, C, 3, 3] as [4, O, 4·C], each
/// 2×2 tap the sum of the 3×3 taps that read the same low-resolution pixel in that phase.
pub fn up2_phase_weights(weight: &Tensor) -> Result<Tensor> {
    let (_, _, kh, kw) = weight.dims4()?;
    if (kh, kw) != (3, 3) {
        candle_core::bail!("up2_phase_weights: kernel {kh}×{kw} is not 3×3");
    }
    let wf = weight.to_dtype(DType::F32)?;
    // The 3×3 taps (start, count) that phase p's 2×2 tap d collects, per axis.
    let taps = |p: usize, d: usize| match (p, d) {
        (0, 0) => (0, 1),
        (0, _) => (1, 2),
        (_, 0) => (0, 2),
        _ => (2, 1),
    };
    let mut phases = Vec::with_capacity(4);
    for py in 0..2 {
        for px in 0..2 {
            let mut cols = Vec::with_capacity(4);
            for dy in 0..2 {
                for dx in 0..2 {
                    let ((ys, yl), (xs, xl)) = (taps(py, dy), taps(px, dx));
                    cols.push(wf.narrow(2, ys, yl)?.narrow(3, xs, xl)?.sum((2, 3))?);
                }
            }
            phases.push(Tensor::cat(&cols, 1)?);
        }
    }
    Tensor::stack(&phases, 0)?.to_dtype(weight.dtype())
}

/// The four phase outputs y [4, B·H·W, C] interleaved into [B, 2H, 2W, C], plus `bias` [C].
pub fn pixel_shuffle_bias(
    y: &Tensor,
    bias: &Tensor,
    b: usize,
    h: usize,
    w: usize,
) -> Result<Tensor> {
    let (phases, m, c) = y.dims3()?;
    if phases != 4 || m != b * h * w || bias.dims() != [c] {
        candle_core::bail!(
            "pixel_shuffle_bias: y {:?} and bias {:?} do not fit [4, {}, C]",
            y.dims(),
            bias.dims(),
            b * h * w
        );
    }
    y.contiguous()?
        .apply_op2_no_bwd(&bias.contiguous()?, &PixelShuffle { dims: [b, h, w, c] })
}

struct Im2colUp2 {
    /// Input [B, H, W, C].
    dims: [usize; 4],
}

struct PixelShuffle {
    /// Low-resolution [B, H, W, C].
    dims: [usize; 4],
}

impl CustomOp1 for Im2colUp2 {
    fn name(&self) -> &'static str {
        "diffit-im2col-up2-phases"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let [b, h, w, c] = self.dims;
        let m_total = b * h * w;
        let mut out = vec![0f32; 4 * m_total * 4 * c];
        for (row, cols) in out.chunks_mut(4 * c).enumerate() {
            let (phase, m) = (row / m_total, row % m_total);
            let (bi, y, xo) = (m / (h * w), (m / w) % h, m % w);
            for tap in 0..4 {
                let yy = y as isize + (phase / 2) as isize + (tap / 2) as isize - 1;
                let xx = xo as isize + (phase % 2) as isize + (tap % 2) as isize - 1;
                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                    continue;
                }
                let src = &x[((bi * h + yy as usize) * w + xx as usize) * c..][..c];
                cols[tap * c..][..c].copy_from_slice(src);
            }
        }
        Ok((cpu_store(out, s.dtype())?, Shape::from((4, m_total, 4 * c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [b, h, w, c] = self.dims;
        let out = cuda::im2col_up2_phases((s, l), self.dims)?;
        Ok((out, Shape::from((4, b * h * w, 4 * c))))
    }
}

impl CustomOp2 for PixelShuffle {
    fn name(&self) -> &'static str {
        "diffit-pixel-shuffle-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, bias) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?);
        let [b, h, w, c] = self.dims;
        let m_total = b * h * w;
        let mut out = vec![0f32; y.len()];
        for (q, px) in out.chunks_mut(c).enumerate() {
            let (bi, yy, xx) = (q / (4 * h * w), (q / (2 * w)) % (2 * h), q % (2 * w));
            let phase = (yy % 2) * 2 + xx % 2;
            let m = (bi * h + yy / 2) * w + xx / 2;
            let src = &y[(phase * m_total + m) * c..][..c];
            for ((o, &v), &bv) in px.iter_mut().zip(src).zip(&bias) {
                *o = v + bv;
            }
        }
        Ok((
            cpu_store(out, s1.dtype())?,
            Shape::from((b, 2 * h, 2 * w, c)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let [b, h, w, c] = self.dims;
        let out = cuda::pixel_shuffle_bias((s1, l1), (s2, l2), self.dims)?;
        Ok((out, Shape::from((b, 2 * h, 2 * w, c))))
    }
}

struct Im2col {
    /// Input [B, H, W, C].
    dims: [usize; 4],
    up: usize,
}

struct Conv3x3Small {
    /// Input [B, H, W, C].
    dims: [usize; 4],
    cout: usize,
}

impl CustomOp3 for Conv3x3Small {
    fn name(&self) -> &'static str {
        "diffit-conv3x3-small"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, wt, bias) = (cpu_f32(s1, l1)?, cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let [b, h, w, c] = self.dims;
        let cout = self.cout;
        let mut out = vec![0f32; b * h * w * cout];
        for (p, o) in out.chunks_mut(cout).enumerate() {
            let (bi, y, xo) = (p / (h * w), (p / w) % h, p % w);
            o.copy_from_slice(&bias);
            for tap in 0..9 {
                let (yy, xx) = (y as isize + tap / 3 - 1, xo as isize + tap % 3 - 1);
                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                    continue;
                }
                let src = &x[((bi * h + yy as usize) * w + xx as usize) * c..][..c];
                for (co, acc) in o.iter_mut().enumerate() {
                    let wrow = &wt[co * 9 * c + tap as usize * c..][..c];
                    *acc += src.iter().zip(wrow).map(|(a, b)| a * b).sum::<f32>();
                }
            }
        }
        Ok((cpu_store(out, s1.dtype())?, Shape::from((b, h, w, cout))))
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
        let out = cuda::conv3x3_small((s1, l1), (s2, l2), (s3, l3), self.dims, self.cout)?;
        let [b, h, w, _] = self.dims;
        Ok((out, Shape::from((b, h, w, self.cout))))
    }
}

struct GroupNormOp {
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    batch: usize,
    hw: usize,
    channels: usize,
    groups: usize,
    eps: f32,
    silu: bool,
}

impl Im2col {
    fn out_shape(&self) -> Shape {
        let [b, h, w, c] = self.dims;
        Shape::from((b * h * self.up * w * self.up, 9 * c))
    }
}

impl CustomOp1 for Im2col {
    fn name(&self) -> &'static str {
        "diffit-im2col3x3"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32(s, l)?;
        let [b, h, w, c] = self.dims;
        let (ho, wo) = (h * self.up, w * self.up);
        let mut out = vec![0f32; b * ho * wo * 9 * c];
        for (m, row) in out.chunks_mut(9 * c).enumerate() {
            let (bi, yo, xo) = (m / (ho * wo), (m / wo) % ho, m % wo);
            for tap in 0..9 {
                let yy = yo as isize + (tap / 3) as isize - 1;
                let xx = xo as isize + (tap % 3) as isize - 1;
                if yy < 0 || xx < 0 || yy >= ho as isize || xx >= wo as isize {
                    continue;
                }
                let (ys, xs) = (yy as usize / self.up, xx as usize / self.up);
                let src = &x[((bi * h + ys) * w + xs) * c..][..c];
                row[tap * c..][..c].copy_from_slice(src);
            }
        }
        Ok((cpu_store(out, s.dtype())?, self.out_shape()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = cuda::im2col3x3((s, l), self.dims, self.up)?;
        Ok((out, self.out_shape()))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "diffit-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut x = cpu_f32(s1, l1)?;
        let (gamma, beta) = (cpu_f32(s2, l2)?, cpu_f32(s3, l3)?);
        let (c, cg) = (self.channels, self.channels / self.groups);
        let count = (self.hw * cg) as f64;
        for sample in x.chunks_mut(self.hw * c) {
            for g in 0..self.groups {
                let chans = g * cg..(g + 1) * cg;
                let vals = || {
                    sample
                        .chunks(c)
                        .flat_map(|px| px[chans.clone()].iter().map(|&v| v as f64))
                };
                let mean = vals().sum::<f64>() / count;
                let var = vals().map(|v| (v - mean) * (v - mean)).sum::<f64>() / count;
                let rstd = 1.0 / (var + self.eps as f64).sqrt();
                for px in sample.chunks_mut(c) {
                    for ch in chans.clone() {
                        let mut v = ((px[ch] as f64 - mean) * rstd) as f32 * gamma[ch] + beta[ch];
                        if self.silu {
                            v /= 1.0 + (-v).exp();
                        }
                        px[ch] = v;
                    }
                }
            }
        }
        Ok((cpu_store(x, s1.dtype())?, l1.shape().clone()))
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
        let out = cuda::group_norm(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            [self.batch, self.hw, self.channels, self.groups],
            self.eps,
            self.silu,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

struct BiasAct {
    rows_per_group: usize,
    act: Activation,
}

struct SoftmaxBias {
    scale: f32,
}

struct LayerNorm {
    eps: f32,
}

struct SplitQkv {
    batch: usize,
    tokens: usize,
    heads: usize,
    head_dim: usize,
}

struct MergeHeads;

fn gelu_tanh(x: f32) -> f32 {
    const K0: f32 = 0.797_884_6;
    const K1: f32 = 0.044_715;
    0.5 * x * (1.0 + (K0 * (x + K1 * x * x * x)).tanh())
}

/// A contiguous CPU tensor's values as f32.
fn cpu_f32(s: &CpuStorage, l: &Layout) -> Result<Vec<f32>> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused op: input is not contiguous".into()))?;
    Ok(match s {
        CpuStorage::F32(v) => v[start..end].to_vec(),
        CpuStorage::BF16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        CpuStorage::F16(v) => v[start..end].iter().map(|x| x.to_f32()).collect(),
        other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
    })
}

/// f32 values back in `dtype`.
fn cpu_store(v: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f32).collect()),
        other => candle_core::bail!("fused op: unsupported dtype {other:?}"),
    })
}

/// The rows of `y` the bias-act ops iterate over, and the row length.
fn rows_cols(l: &Layout) -> (usize, usize) {
    let cols = *l.dims().last().unwrap_or(&1);
    (l.shape().elem_count() / cols.max(1), cols)
}

impl BiasAct {
    fn cpu(&self, y: Vec<f32>, bias: &[f32], res: Option<&[f32]>, cols: usize) -> Vec<f32> {
        let mut out = y;
        for (r, row) in out.chunks_mut(cols).enumerate() {
            let b = &bias[(r / self.rows_per_group) * cols..][..cols];
            for (c, v) in row.iter_mut().enumerate() {
                let mut x = *v + b[c];
                if self.act == Activation::GeluTanh {
                    x = gelu_tanh(x);
                }
                if let Some(res) = res {
                    x += res[r * cols + c];
                }
                *v = x;
            }
        }
        out
    }

    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn kernel(&self, residual: bool) -> &'static str {
        match (self.act, residual) {
            (Activation::Identity, false) => "bias_add",
            (Activation::GeluTanh, false) => "bias_gelu",
            (Activation::Identity, true) => "bias_add_res",
            (Activation::GeluTanh, true) => "bias_gelu_res",
        }
    }
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "diffit-bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l1);
        let out = self.cpu(cpu_f32(s1, l1)?, &cpu_f32(s2, l2)?, None, cols);
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
        let out = cuda::bias_act(
            self.kernel(false),
            (s1, l1),
            (s2, l2),
            None,
            rows,
            cols,
            self.rows_per_group,
        )?;
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp3 for BiasAct {
    fn name(&self) -> &'static str {
        "diffit-bias-act-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l1);
        let res = cpu_f32(s3, l3)?;
        let out = self.cpu(cpu_f32(s1, l1)?, &cpu_f32(s2, l2)?, Some(&res), cols);
        Ok((cpu_store(out, s1.dtype())?, l1.shape().clone()))
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
        let (rows, cols) = rows_cols(l1);
        let out = cuda::bias_act(
            self.kernel(true),
            (s1, l1),
            (s2, l2),
            Some((s3, l3)),
            rows,
            cols,
            self.rows_per_group,
        )?;
        Ok((out, l1.shape().clone()))
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

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "diffit-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, cols) = rows_cols(l);
        let mut out = cpu_f32(s, l)?;
        for row in out.chunks_mut(cols) {
            let mean = row.iter().sum::<f32>() / cols as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / cols as f32;
            let rstd = 1.0 / (var + self.eps).sqrt();
            row.iter_mut().for_each(|v| *v = (*v - mean) * rstd);
        }
        Ok((cpu_store(out, s.dtype())?, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, cols) = rows_cols(l);
        let out = cuda::layer_norm((s, l), rows, cols, self.eps)?;
        Ok((out, l.shape().clone()))
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

/// `rows` rows of `cols` values from a 2-D layout with unit column stride and any row stride.
fn cpu_f32_strided_rows(s: &CpuStorage, l: &Layout, rows: usize, cols: usize) -> Result<Vec<f32>> {
    let (start, stride) = (l.start_offset(), l.stride()[0]);
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let lo = start + r * stride;
        match s {
            CpuStorage::F32(v) => out.extend_from_slice(&v[lo..lo + cols]),
            CpuStorage::BF16(v) => out.extend(v[lo..lo + cols].iter().map(|x| x.to_f32())),
            CpuStorage::F16(v) => out.extend(v[lo..lo + cols].iter().map(|x| x.to_f32())),
            other => candle_core::bail!("fused op: unsupported dtype {:?}", other.dtype()),
        }
    }
    Ok(out)
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
mod tests;
