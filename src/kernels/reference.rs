//! The unfused candle formulation of every fused op, and a comparison of the two on random
//! inputs of several shapes. Used by the unit tests (CPU fallbacks) and by
//! `diffit-server bench kernels` (CUDA kernels, on the GPU).

use candle_core::{DType, Device, Tensor};

use super::Activation;

type Result<T> = candle_core::Result<T>;

/// ‖a − b‖ / ‖b‖, computed in f32.
pub fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let num = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    Ok(if den == 0.0 { num } else { num / den })
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

/// One fused-versus-unfused comparison.
#[derive(Debug, Clone)]
pub struct CaseReport {
    pub name: String,
    /// ‖fused − unfused‖ / ‖unfused‖, the unfused op run in f32 on the same (rounded) inputs.
    pub rel_err: f32,
}

/// Compares every fused op on `device` in `dtype` with its unfused formulation in f32, over
/// shapes that include sizes that are not multiples of a warp (32) or a block (256).
pub fn check_all(device: &Device, dtype: DType) -> Result<Vec<CaseReport>> {
    let mut out = Vec::new();
    // Random inputs made in f32, rounded to `dtype`: both formulations see the same values.
    let rnd = |shape: &[usize], std: f32| -> Result<(Tensor, Tensor)> {
        let t = Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype)?;
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
    for (batch, heads, n) in [(1, 1, 1), (2, 3, 17), (3, 2, 33), (2, 4, 256)] {
        let (s, sf) = rnd(&[batch, heads, n, n], 3.0)?;
        let (b, bf) = rnd(&[heads * n, n], 1.0)?;
        push(
            format!("softmax_bias [{batch},{heads},{n},{n}]"),
            super::softmax_bias(&s, &b, 0.3)?,
            softmax_bias(&sf, &bf, 0.3)?,
        )?;
    }
    for (rows, cols) in [(1, 1), (5, 31), (40, 1152), (9, 1000)] {
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
    Ok(out)
}
