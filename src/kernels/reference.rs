//! The unfused candle formulation of every fused op, and a comparison of the two on random
//! inputs of several shapes. Used by the unit tests (CPU fallbacks) and by
//! `diffit-server bench kernels` (CUDA kernels, on the GPU).

use candle_core::{DType, Device, Tensor};

use super::{Activation, Att90Rows, ConvTiling, Flash};

type Result<T> = candle_core::Result<T>;

/// ‖a − b‖ / ‖b‖ over all elements (‖a − b‖ where b is all zeros), summed on the host in
/// f64 so the measure itself adds no rounding worth speaking of. The one error measure of the
/// kernel checks and of the parity tests.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!("rel_err: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()
    };
    let (a, b) = (host(a)?, host(b)?);
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    Ok(if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    })
}

pub fn bias_act(
    y: &Tensor,
    bias: &Tensor,
    rows_per_group: usize,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = y.dims().to_vec();
    let cols = *dims.last().expect("rank ≥ 1");
    let groups = bias.dim(0)?;
    let mut out = y
        .reshape((groups, rows_per_group, cols))?
        .broadcast_add(&bias.unsqueeze(1)?)?;
    if act == Activation::GeluTanh {
        out = out.gelu()?;
    }
    out = out.reshape(dims)?;
    match residual {
        Some(r) => out + r,
        None => Ok(out),
    }
}

pub fn softmax_bias(scores: &Tensor, bias: &Tensor, scale: f32) -> Result<Tensor> {
    let dims = scores.dims().to_vec();
    let cols = *dims.last().expect("rank ≥ 1");
    let bias_rows = bias.dim(0)?;
    let rows = scores.elem_count() / cols;
    let s = (scores.reshape((rows / bias_rows, bias_rows, cols))? * scale as f64)?
        .broadcast_add(&bias.unsqueeze(0)?)?;
    candle_nn::ops::softmax_last_dim(&s)?.reshape(dims)
}

pub fn layer_norm(x: &Tensor, eps: f32) -> Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let ones = Tensor::ones(d, x.dtype(), x.device())?;
    let zeros = Tensor::zeros(d, x.dtype(), x.device())?;
    candle_nn::ops::layer_norm(x, &ones, &zeros, eps)
}

pub fn split_qkv(qkv: &Tensor, sample_bias: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = qkv.dims3()?;
    let hd = c / (3 * heads);
    qkv.broadcast_add(&sample_bias.unsqueeze(1)?)?
        .reshape(vec![b, n, 3, heads, hd])?
        .permute(vec![2, 0, 3, 1, 4])?
        .contiguous()
}

pub fn merge_heads(ctx: &Tensor) -> Result<Tensor> {
    let (b, h, n, hd) = ctx.dims4()?;
    ctx.transpose(1, 2)?.contiguous()?.reshape((b, n, h * hd))
}

/// A 3×3, padding-1 convolution (after a nearest upsampling by `up`) of channels-last `x`
/// through candle's conv2d: [B, H·up, W·up, Cout].
pub fn conv3x3_nhwc(x: &Tensor, weight: &Tensor, up: usize) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let mut nchw = x.permute((0, 3, 1, 2))?.contiguous()?;
    if up > 1 {
        nchw = nchw.upsample_nearest2d(h * up, w * up)?;
    }
    nchw.conv2d(weight, 1, 1, 1, 1)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// The same through `im2col3x3` and one matmul (what the fused VAE path does).
pub fn conv3x3_nhwc_im2col(x: &Tensor, weight: &Tensor, up: usize) -> Result<Tensor> {
    let (b, h, w, _) = x.dims4()?;
    let (o, i, kh, kw) = weight.dims4()?;
    let wm = weight.permute((0, 2, 3, 1))?.reshape((o, kh * kw * i))?;
    super::im2col3x3(x, up)?
        .matmul(&wm.t()?)?
        .reshape((b, h * up, w * up, o))
}

/// GroupNorm (+ SiLU) of channels-last `x` through candle_nn's GroupNorm on NCHW.
pub fn group_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    use candle_core::Module;
    let c = x.dim(3)?;
    let gn = candle_nn::GroupNorm::new(gamma.clone(), beta.clone(), c, groups, eps as f64)?;
    let mut y = gn.forward(&x.permute((0, 3, 1, 2))?.contiguous()?)?;
    if silu {
        y = y.silu()?;
    }
    y.permute((0, 2, 3, 1))?.contiguous()
}

/// One fused-versus-unfused comparison.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: String,
    /// ‖fused − unfused‖ / ‖unfused‖, the unfused op run in f32 on the same (rounded) inputs.
    pub rel_err: f64,
}

/// Compares every fused op on `device` in `dtype` with its unfused formulation in f32, over
/// shapes that include sizes that are not multiples of a warp (32) or a block (256).
pub fn check_all(device: &Device, dtype: DType) -> Result<Vec<CaseReport>> {
    let mut out = Vec::new();
    // Random inputs made in f32, rounded to `dtype`: both formulations see the same values.
    // Seeded, so a failure reproduces: the same inputs on every run and device.
    let rng = std::cell::RefCell::new(
        <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(20261125),
    );
    let rnd = |shape: &[usize], std: f32| -> Result<(Tensor, Tensor)> {
        use rand_distr::Distribution;
        let normal = rand_distr::Normal::new(0f32, std).map_err(candle_core::Error::wrap)?;
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = {
            let mut rng = rng.borrow_mut();
            (0..n).map(|_| normal.sample(&mut *rng)).collect()
        };
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)?;
        let f = t.to_dtype(DType::F32)?;
        Ok((t, f))
    };
    let mut push = |name: String, fused: Tensor, unfused: Tensor| -> Result<()> {
        if fused.dims() != unfused.dims() {
            candle_core::bail!("{name}: shapes {:?} vs {:?}", fused.dims(), unfused.dims());
        }
        out.push(CaseReport {
            rel_err: rel_err(&fused, &unfused)?,
            name,
        });
        Ok(())
    };

    for (rows, cols, groups) in [(7, 5, 1), (66, 100, 3), (300, 1152, 1), (512, 257, 2)] {
        let (y, yf) = rnd(&[rows, cols], 1.0)?;
        let (b, bf) = rnd(&[groups, cols], 1.0)?;
        let (r, rf) = rnd(&[rows, cols], 1.0)?;
        for act in [Activation::Identity, Activation::GeluTanh] {
            let rpg = rows / groups;
            push(
                format!("bias_act {act:?} [{rows},{cols}] groups {groups}"),
                super::bias_act(&y, &b, rpg, act, None)?,
                bias_act(&yf, &bf, rpg, act, None)?,
            )?;
            push(
                format!("bias_act {act:?} + residual [{rows},{cols}] groups {groups}"),
                super::bias_act(&y, &b, rpg, act, Some(&r))?,
                bias_act(&yf, &bf, rpg, act, Some(&rf))?,
            )?;
        }
    }
    for (b, n, heads, hd) in [
        (2, 256, 4, 72),
        (1, 1024, 2, 72),
        (3, 256, 16, 72),
        (8, 256, 16, 72),
        (1, 136, 1, 128),
        (1, 200, 2, 64),
        (1, 192, 2, 64),
        (1, 200, 2, 72),
        (2, 264, 2, 32),
        (1, 100, 3, 64),
        (2, 17, 2, 16),
        (1, 70, 1, 128),
        (1, 5, 2, 8),
    ] {
        let c = 3 * heads * hd;
        let (q, qf) = rnd(&[b, n, c], 1.0)?;
        // The per-sample bias as a column slice of a wider tensor, as the model passes it.
        let (wide, widef) = rnd(&[b, 3 * c], 1.0)?;
        let (sb, sbf) = (wide.narrow(1, c, c)?, widef.narrow(1, c, c)?);
        let (ab, abf) = rnd(&[heads * n, n], 1.0)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let unfused = {
            let split = split_qkv(&qf, &sbf.contiguous()?, heads)?;
            let (qq, kk, vv) = (split.get(0)?, split.get(1)?, split.get(2)?);
            let probs = softmax_bias(&qq.matmul(&kk.t()?)?.contiguous()?, &abf, scale)?;
            merge_heads(&probs.matmul(&vv)?)?
        };
        let wgmma_runs = super::wgmma_applies(super::attention::wgmma_device(device), n, hd);
        for flash in [
            Flash::Off,
            Flash::MmaSync,
            Flash::Wgmma(Att90Rows::R64),
            Flash::Wgmma(Att90Rows::R128),
        ] {
            // Name the kernel that ran: off a 9.0 device (or at odd N) wgmma is mma.sync.
            let ran = match flash {
                Flash::Wgmma(_) if !wgmma_runs => "wgmma → mma.sync".to_string(),
                _ => format!("{flash:?}"),
            };
            push(
                format!("attention [{b},{n},{c}] heads {heads} hd {hd} {ran}"),
                super::attention(&q, &sb, &ab, heads, scale, flash)?,
                unfused.clone(),
            )?;
        }
    }
    for (rows, k, n) in [(7, 5, 9), (130, 72, 100), (300, 1152, 4608)] {
        let (x, xf) = rnd(&[rows, k], 1.0)?;
        let (w, wf) = rnd(&[n, k], 0.05)?;
        let (b, bf) = rnd(&[n], 1.0)?;
        push(
            format!("linear, no bias [{rows},{k}]x[{n},{k}]"),
            super::linear_no_bias(&x, &w, true)?,
            xf.matmul(&wf.t()?)?,
        )?;
        for act in [Activation::Identity, Activation::GeluTanh] {
            let unfused = bias_act(&xf.matmul(&wf.t()?)?, &bf.unsqueeze(0)?, rows, act, None)?;
            push(
                format!("linear + bias + {act:?} [{rows},{k}]x[{n},{k}]"),
                super::linear_bias_act(&x, &w, &b, act, true)?,
                unfused,
            )?;
        }
    }
    for (rows, k, n) in [(7, 5, 9), (130, 72, 104), (300, 1152, 1152)] {
        let (x, xf) = rnd(&[rows, k], 1.0)?;
        let (w, wf) = rnd(&[n, k], 0.05)?;
        let (b, bf) = rnd(&[n], 1.0)?;
        let (r, rf) = rnd(&[rows, n], 1.0)?;
        let unfused = bias_act(
            &xf.matmul(&wf.t()?)?,
            &bf.unsqueeze(0)?,
            rows,
            Activation::Identity,
            Some(&rf),
        )?;
        push(
            format!("linear + bias + residual [{rows},{k}]x[{n},{k}]"),
            super::linear_bias_residual(&x, &w, &b, &r, true)?,
            unfused,
        )?;
    }
    for (batch, heads, n) in [(1, 1, 1), (2, 3, 17), (3, 2, 33), (2, 4, 256), (1, 2, 1040)] {
        let (s, sf) = rnd(&[batch, heads, n, n], 3.0)?;
        let (b, bf) = rnd(&[heads * n, n], 1.0)?;
        push(
            format!("softmax_bias [{batch},{heads},{n},{n}]"),
            super::softmax_bias(&s, &b, 0.3)?,
            softmax_bias(&sf, &bf, 0.3)?,
        )?;
    }
    for (b, h, w, c, cout) in [
        (1, 5, 7, 8, 1),
        (2, 9, 4, 16, 3),
        (1, 33, 17, 128, 3),
        (1, 6, 6, 64, 4),
        (1, 9, 10, 336, 4),
        // More pixels than one round of the CUDA kernel's grid (16 384 half-warps × 4 pixels).
        (3, 160, 160, 128, 3),
    ] {
        let (x, xf) = rnd(&[b, h, w, c], 1.0)?;
        let (k, kf) = rnd(&[cout, c, 3, 3], 0.05)?;
        let (bias, biasf) = rnd(&[cout], 1.0)?;
        // The kernel's weight layout: [Cout, 3·3·C] in (ky, kx, c) order.
        let wt = k.permute((0, 2, 3, 1))?.reshape((cout, 9 * c))?;
        push(
            format!("conv3x3_small [{b},{h},{w},{c}] -> {cout}"),
            super::conv3x3_small(&x, &wt, &bias)?,
            conv3x3_nhwc(&xf, &kf, 1)?.broadcast_add(&biasf)?,
        )?;
    }
    // Partial pixel and channel tiles, borders on every side, one and several taps a K block;
    // for the halo tilings also blocks that the image's height and width do not divide, several
    // images, two channel blocks an output block and many channel blocks (both halo buffers
    // reused). C = 32 takes `Gather` whatever the tiling.
    for (b, h, w, c, cout, with_residual) in [
        (1, 5, 7, 32, 8, false),
        (2, 9, 4, 64, 24, true),
        (1, 16, 16, 128, 128, true),
        (2, 11, 13, 32, 136, false),
        (1, 33, 17, 256, 64, true),
        (3, 19, 21, 64, 136, true),
        (2, 32, 32, 128, 256, false),
        (1, 7, 40, 128, 128, true),
        (2, 17, 9, 512, 64, false),
    ] {
        let (x, xf) = rnd(&[b, h, w, c], 1.0)?;
        let (k, kf) = rnd(&[cout, c, 3, 3], 0.05)?;
        let (bias, biasf) = rnd(&[cout], 1.0)?;
        let (res, resf) = rnd(&[b, h, w, cout], 1.0)?;
        let wt = k.permute((0, 2, 3, 1))?.reshape((cout, 9 * c))?;
        let want = conv3x3_nhwc(&xf, &kf, 1)?.broadcast_add(&biasf)?;
        let (res, want) = if with_residual {
            (Some(&res), (want + resf)?)
        } else {
            (None, want)
        };
        for tiling in [ConvTiling::Gather, ConvTiling::Halo128, ConvTiling::Halo256] {
            if tiling != ConvTiling::Gather && !tiling.halo_fits(c) {
                continue;
            }
            push(
                format!(
                    "conv3x3_implicit {tiling:?} [{b},{h},{w},{c}] -> {cout}{}",
                    if with_residual { " + residual" } else { "" }
                ),
                super::conv3x3_implicit(&x, &wt, &bias, res, tiling)?,
                want.clone(),
            )?;
        }
    }
    for (rows, cols) in [(1, 1), (5, 31), (40, 1152), (9, 1000), (3, 4608)] {
        let (x, xf) = rnd(&[rows, cols], 2.0)?;
        // An offset mean, as activations have: a one-pass variance would lose precision.
        let (x, xf) = ((x + 3.0)?, (xf + 3.0)?);
        push(
            format!("layer_norm [{rows},{cols}]"),
            super::layer_norm(&x, 1e-6)?,
            layer_norm(&xf, 1e-6)?,
        )?;
    }
    for (batch, n, heads, hd) in [(1, 1, 1, 1), (2, 17, 3, 5), (3, 64, 4, 72)] {
        let c = 3 * heads * hd;
        let (q, qf) = rnd(&[batch, n, c], 1.0)?;
        let (b, bf) = rnd(&[batch, c], 1.0)?;
        push(
            format!("split_qkv [{batch},{n},{c}] heads {heads}"),
            super::split_qkv(&q, &b, heads)?,
            split_qkv(&qf, &bf, heads)?,
        )?;
        let (x, xf) = rnd(&[batch, heads, n, hd], 1.0)?;
        push(
            format!("merge_heads [{batch},{heads},{n},{hd}]"),
            super::merge_heads(&x)?,
            merge_heads(&xf)?,
        )?;
    }
    for (b, h, w, c, up) in [
        (1, 3, 3, 1, 1),
        (2, 5, 4, 3, 2),
        (2, 8, 8, 16, 1),
        (1, 6, 7, 32, 2),
    ] {
        let (x, xf) = rnd(&[b, h, w, c], 1.0)?;
        let (k, kf) = rnd(&[5, c, 3, 3], 0.3)?;
        push(
            format!("conv3x3 via im2col3x3 [{b},{h},{w},{c}] up {up}"),
            conv3x3_nhwc_im2col(&x, &k, up)?,
            conv3x3_nhwc(&xf, &kf, up)?,
        )?;
    }
    for (b, h, w, c) in [(1, 1, 1, 8), (2, 5, 4, 8), (1, 6, 7, 32), (2, 3, 9, 16)] {
        let (x, xf) = rnd(&[b, h, w, c], 1.0)?;
        // Output channels a multiple of the 16-byte pack, as the CUDA pixel shuffle needs.
        let (k, kf) = rnd(&[16, c, 3, 3], 0.3)?;
        let (bias, biasf) = rnd(&[16], 1.0)?;
        let phases = super::up2_phase_weights(&k)?;
        let y = super::im2col_up2_phases(&x)?.matmul(&phases.transpose(1, 2)?)?;
        push(
            format!("upsample ×2 + conv3x3 as 4 phase convs [{b},{h},{w},{c}]"),
            super::pixel_shuffle_bias(&y, &bias, b, h, w)?,
            conv3x3_nhwc(&xf, &kf, 2)?.broadcast_add(&biasf)?,
        )?;
    }
    for (b, h, w, c, groups) in [
        (1, 1, 3, 4, 1),
        (2, 5, 5, 8, 4),
        (2, 16, 16, 64, 32),
        (3, 7, 9, 96, 32),
        (2, 64, 48, 128, 32),
    ] {
        let (x, xf) = rnd(&[b, h, w, c], 2.0)?;
        let (x, xf) = ((x + 1.5)?, (xf + 1.5)?);
        let (g, gf) = rnd(&[c], 1.0)?;
        let (be, bef) = rnd(&[c], 1.0)?;
        for silu in [false, true] {
            push(
                format!("group_norm [{b},{h},{w},{c}] groups {groups} silu {silu}"),
                super::group_norm(&x, &g, &be, groups, 1e-6, silu)?,
                group_norm(&xf, &gf, &bef, groups, 1e-6, silu)?,
            )?;
        }
        // GroupNorm + SiLU written as im2col columns (one kernel on CUDA where C is a
        // multiple of the pack: the border zeros and every tap of the 9).
        push(
            format!("group_norm + silu → im2col3x3 [{b},{h},{w},{c}] groups {groups}"),
            super::group_norm_silu_im2col3x3(&x, &g, &be, groups, 1e-6)?,
            super::im2col3x3(&group_norm(&xf, &gf, &bef, groups, 1e-6, true)?, 1)?,
        )?;
    }
    // The fused end of a bucketed step (f32 only: the sampler runs in f32), against the candle
    // expressions it replaces; every flag on and off across the rows, with and without learned
    // variances. Expected bit-identical (rel err 0).
    if dtype == DType::F32 {
        for learn_sigma in [true, false] {
            let (rows, c, h, w) = (6, 4, 3, 5);
            let (base, count) = (7, 14);
            let columns = super::UpdateColumns {
                coefs: std::array::from_fn(|i| base + i * rows),
                d: base + 5 * rows,
                log_var_max: base + 6 * rows,
                log_var_min: base + 7 * rows,
                noise_weight: base + 8 * rows,
                prev: base + 9 * rows,
                guided: base + 10 * rows,
                scale: base + 11 * rows,
                uncond: base + 12 * rows,
                noise: base + count * rows,
            };
            let (params, _) = rnd(&[base + count * rows + rows * c * h * w], 1.0)?;
            let mut host = params.to_vec1::<f32>()?;
            for r in 0..rows {
                host[columns.noise_weight + r] = (r % 2) as f32;
                host[columns.prev + r] = (r % 3 == 0) as u8 as f32;
                host[columns.guided + r] = (r < 4) as u8 as f32;
                host[columns.uncond + r] = if r < 2 { (r + 4) as f32 } else { r as f32 };
                host[columns.log_var_min + r] = -host[columns.log_var_min + r].abs() - 1.0;
            }
            let params = Tensor::from_vec(host, params.shape(), device)?;
            let out_c = if learn_sigma { 2 * c } else { c };
            let (out, _) = rnd(&[rows, out_c, h, w], 1.0)?;
            let (x, _) = rnd(&[rows, c, h, w], 1.0)?;
            let (prev, _) = rnd(&[rows, c, h, w], 1.0)?;
            let spec = super::UpdateSpec {
                columns,
                channels: c,
                learn_sigma,
                guided_channels: 3,
            };
            push(
                format!("guided_update [{rows},{c},{h},{w}] learn_sigma {learn_sigma}"),
                super::guided_update(&out, &x, &prev, &params, spec)?,
                guided_update(&out, &x, &prev, &params, spec)?,
            )?;
        }
    }
    Ok(out)
}

/// `fp8_linear`'s computation in f32 with candle ops: `x` (after the prologue) rounded to e4m3
/// per row with the kernels' scales, times the dequantised weight, then bias, act, residual.
pub fn fp8_linear(
    x: &Tensor,
    weight: &super::Fp8Weight,
    bias: &Tensor,
    prologue: super::Prologue,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let x = match prologue {
        super::Prologue::LayerNorm { eps } => layer_norm(x, eps)?,
        super::Prologue::Quantize => x.clone(),
    };
    let amax = x.abs()?.max_keepdim(candle_core::D::Minus1)?;
    let max = super::fp8::E4M3_MAX as f64;
    let xq = x
        .broadcast_mul(&amax.recip()?.affine(max, 0.0)?)?
        .to_dtype(DType::F8E4M3)?
        .to_dtype(DType::F32)?
        .broadcast_mul(&(amax / max)?)?;
    let w = weight.dequantize()?.to_device(x.device())?;
    let rows = x.elem_count() / x.dim(candle_core::D::Minus1)?;
    let y = xq.matmul(&w.t()?)?;
    bias_act(&y, &bias.unsqueeze(0)?, rows, act, residual)
}

/// The FP8 linear layer on `device` (bf16 in and out) against the same arithmetic in f32 on the
/// CPU (`fp8_linear` above: only rounding order and bf16 outputs differ) and against the exact
/// f32 layer (the error FP8 adds, for the record). Each case with the tolerance it must meet.
pub fn check_fp8(device: &Device) -> Result<Vec<(CaseReport, f64)>> {
    use super::Prologue;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(20261130);
    let mut rnd = |shape: &[usize], std: f32, mean: f32| -> Result<(Tensor, Tensor)> {
        use rand_distr::Distribution;
        let normal = rand_distr::Normal::new(mean, std).map_err(candle_core::Error::wrap)?;
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
        let t = Tensor::from_vec(values, shape, &Device::Cpu)?.to_dtype(DType::BF16)?;
        let f = t.to_dtype(DType::F32)?;
        Ok((t.to_device(device)?, f))
    };
    let ln = Prologue::LayerNorm { eps: 1e-6 };
    let q = Prologue::Quantize;
    let (gelu, id) = (Activation::GeluTanh, Activation::Identity);
    let mut out = Vec::new();
    // (rows, k, n, prologue, act, residual): the block's four layers at small and IN-256 widths,
    // a row too long for the LayerNorm register kernel (and, quantised alone, part-filling the
    // wide one), one too long for every register kernel, an odd row count.
    for (rows, k, n, prologue, act, res) in [
        (7, 16, 32, q, id, false),
        (130, 192, 576, ln, id, false),
        (130, 192, 768, ln, gelu, false),
        (129, 768, 192, q, id, true),
        (300, 1152, 3456, ln, id, false),
        (300, 1152, 4608, ln, gelu, false),
        (300, 4608, 1152, q, id, true),
        (300, 1152, 1152, q, id, true),
        (33, 2080, 64, ln, gelu, true),
        (33, 2080, 64, q, id, false),
        (17, 4624, 64, q, id, true),
    ] {
        // Activations with an offset mean (as a block's input has) for the LayerNorm cases.
        let mean = if prologue == ln { 3.0 } else { 0.0 };
        let (x, xf) = rnd(&[rows, k], 1.0, mean)?;
        let (w, wf) = rnd(&[n, k], 0.05, 0.0)?;
        let (b, bf) = rnd(&[n], 1.0, 0.0)?;
        let (r, rf) = rnd(&[rows, n], 1.0, 0.0)?;
        let weight = super::Fp8Weight::quantize(&w)?;
        let (res, resf) = match res {
            true => (Some(&r), Some(&rf)),
            false => (None, None),
        };
        let emulated = fp8_linear(&xf, &weight, &bf, prologue, act, resf)?;
        let exact = {
            let xn = match prologue {
                Prologue::LayerNorm { eps } => layer_norm(&xf, eps)?,
                Prologue::Quantize => xf.clone(),
            };
            bias_act(&xn.matmul(&wf.t()?)?, &bf.unsqueeze(0)?, rows, act, resf)?
        };
        let what = match prologue {
            Prologue::LayerNorm { .. } => "LN + quantise",
            Prologue::Quantize => "quantise",
        };
        let name = format!(
            "fp8 linear ({what}, {act:?}{}) [{rows},{k}]x[{n},{k}]",
            if res.is_some() { ", + residual" } else { "" }
        );
        for scaling in [super::Fp8Scaling::Cublaslt, super::Fp8Scaling::Pass] {
            let got = super::fp8_linear(&x, &weight, &b, prologue, act, res, scaling)?;
            out.push((
                CaseReport {
                    name: format!("{name} {scaling:?} vs emulated"),
                    rel_err: rel_err(&got, &emulated)?,
                },
                1e-2,
            ));
            out.push((
                CaseReport {
                    name: format!("{name} {scaling:?} vs f32"),
                    rel_err: rel_err(&got, &exact)?,
                },
                8e-2,
            ));
        }
    }
    Ok(out)
}

/// The unfused end of a bucketed step: classifier-free guidance and the sampler update as candle
/// expressions (what `pipeline::graphs` ran before `kernels::guided_update`, and what
/// `diffusion::denoise_step` computes), terms a row does not use selected away per row.
pub fn guided_update(
    out: &Tensor,
    x: &Tensor,
    x0_prev: &Tensor,
    params: &Tensor,
    spec: super::UpdateSpec,
) -> Result<Tensor> {
    let (r, c, _, _) = x.dims4()?;
    let shape = x.dims().to_vec();
    let cols = spec.columns;
    let column = |o: usize| params.narrow(0, o, r);
    let per_row = |o: usize| column(o)?.reshape((r, 1, 1, 1));
    let flag = |o: usize| per_row(o)?.gt(0.5)?.broadcast_as(shape.as_slice());
    let noise = params
        .narrow(0, cols.noise, x.elem_count())?
        .reshape(shape.as_slice())?;
    let cond = out;
    let uncond = out.index_select(&column(cols.uncond)?.to_dtype(DType::U32)?, 0)?;
    let eps = cond.narrow(1, 0, c)?;
    let g = spec.guided_channels.min(c);
    let (c3, u3) = (cond.narrow(1, 0, g)?, uncond.narrow(1, 0, g)?);
    let mut guided = (&u3 + (c3 - &u3)?.broadcast_mul(&per_row(cols.scale)?)?)?;
    if c > g {
        guided = Tensor::cat(&[&guided, &cond.narrow(1, g, c - g)?], 1)?;
    }
    let eps = flag(cols.guided)?.where_cond(&guided, &eps)?;
    let k = |i: usize| per_row(cols.coefs[i]);
    let x0 = (x.broadcast_mul(&k(0)?)? - eps.broadcast_mul(&k(1)?)?)?;
    let next =
        ((x.broadcast_mul(&k(2)?)? + eps.broadcast_mul(&k(3)?)?)? + x0.broadcast_mul(&k(4)?)?)?;
    let with_prev = (&next + x0_prev.broadcast_mul(&per_row(cols.d)?)?)?;
    let next = flag(cols.prev)?.where_cond(&with_prev, &next)?;
    let log_var = match spec.learn_sigma {
        true => {
            let v = cond.narrow(1, c, c)?;
            let frac = ((v + 1.0)? / 2.0)?;
            (frac.broadcast_mul(&per_row(cols.log_var_max)?)?
                + (1.0 - frac)?.broadcast_mul(&per_row(cols.log_var_min)?)?)?
        }
        false => per_row(cols.log_var_max)?
            .broadcast_as(shape.as_slice())?
            .contiguous()?,
    };
    let noisy = (&next
        + (log_var * 0.5)?
            .exp()?
            .mul(&noise)?
            .broadcast_mul(&per_row(cols.noise_weight)?)?)?;
    let next = flag(cols.noise_weight)?.where_cond(&noisy, &next)?;
    Tensor::stack(&[next, x0], 0)
}
