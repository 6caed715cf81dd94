//! `bench model --ops`: single ops at the shapes of an ImageNet-256 guided step at B = 64, to
//! find where a step's time goes and which formulation of an op is cheaper.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::stats::median;
use crate::kernels::{self, Activation, Att90Rows, Flash};

/// Times one candle op formulation at the shapes of an ImageNet-256 guided step at B = 64
/// (2B = 128 network rows), to find where the step's time goes and which rewrite is cheaper.
pub fn op_micro(device: &Device, dtype: DType, iters: usize) -> anyhow::Result<Vec<(String, f64)>> {
    let rows = 128usize;
    let (h, n, d, m) = (16usize, 256usize, 1152usize, 4608usize);
    let t = rows * n;
    let rnd = |shape: &[usize]| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)
    };
    let scores = rnd(&[rows, h, n, n])?;
    let attn_bias = rnd(&[1, h, n, n])?;
    let attn_bias_full = attn_bias.broadcast_as((rows, h, n, n))?.contiguous()?;
    let y4 = rnd(&[t, m])?;
    let b4 = rnd(&[m])?;
    let b4_full = b4.broadcast_as((t, m))?.contiguous()?;
    let qkv = rnd(&[rows, n, 3 * d])?;
    let sample_bias = rnd(&[rows, 1, 3 * d])?;
    let x = rnd(&[t, d])?;
    let w1 = rnd(&[m, d])?;
    let ones = rnd(&[d])?;
    let zeros = rnd(&[d])?;
    let ctx = rnd(&[rows, h, n, d / h])?;
    let mut out = Vec::new();
    let mut time =
        |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<()> {
            f()?;
            device.synchronize()?;
            let mut v = Vec::new();
            for _ in 0..iters {
                let s = Instant::now();
                let r = f()?;
                device.synchronize()?;
                v.push(s.elapsed().as_secs_f64() * 1e3);
                drop(r);
            }
            let ms = median(v);
            eprintln!("{name}: {ms:.3} ms");
            out.push((name.to_string(), ms));
            Ok(())
        };
    time(
        "attn bias: broadcast_add [128,16,256,256]+[1,16,256,256]",
        &|| scores.broadcast_add(&attn_bias),
    )?;
    time("attn bias: add pre-expanded contiguous", &|| {
        scores.add(&attn_bias_full)
    })?;
    time("attn bias: broadcast_as+contiguous (materialise)", &|| {
        attn_bias.broadcast_as((rows, h, n, n))?.contiguous()
    })?;
    time("attn scale: scores * 0.118", &|| scores.affine(0.118, 0.0))?;
    time("softmax_last_dim [128,16,256,256]", &|| {
        candle_nn::ops::softmax_last_dim(&scores)
    })?;
    time("fc1 bias: broadcast_add [32768,4608]+[4608]", &|| {
        y4.broadcast_add(&b4)
    })?;
    time("fc1 bias: add pre-expanded contiguous", &|| {
        y4.add(&b4_full)
    })?;
    time("gelu (tanh) [32768,4608]", &|| y4.gelu())?;
    time(
        "qkv sample bias: broadcast_add [128,256,3456]+[128,1,3456]",
        &|| qkv.broadcast_add(&sample_bias),
    )?;
    time("layer_norm [32768,1152]", &|| {
        candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-6)
    })?;
    time("matmul fc1 [32768,1152]x[1152,4608]ᵀ", &|| {
        x.matmul(&w1.t()?)
    })?;
    time("residual add [32768,1152]", &|| x.add(&x))?;
    time(
        "merge heads: transpose + contiguous [128,16,256,72]",
        &|| ctx.transpose(1, 2)?.contiguous(),
    )?;
    // The fused kernels that replace the passes above (crate::kernels).
    let attn_bias_rows = attn_bias.reshape((h * n, n))?;
    let sample_bias2 = sample_bias.squeeze(1)?;
    let b1 = rnd(&[d])?.unsqueeze(0)?;
    let b4_row = b4.unsqueeze(0)?;
    time("fused: scale + bias + softmax [128,16,256,256]", &|| {
        kernels::softmax_bias(&scores, &attn_bias_rows, 0.118)
    })?;
    time("fused: bias + GELU [32768,4608]", &|| {
        kernels::bias_act(&y4, &b4_row, t, Activation::GeluTanh, None)
    })?;
    time("fused: bias + residual [32768,1152]", &|| {
        kernels::bias_act(&x, &b1, t, Activation::Identity, Some(&x))
    })?;
    time(
        "fused: per-sample qkv bias + head split [128,256,3456]",
        &|| kernels::split_qkv(&qkv, &sample_bias2, h),
    )?;
    time("fused: merge heads [128,16,256,72]", &|| {
        kernels::merge_heads(&ctx)
    })?;
    // The flash-attention kernels at IN-256 (B = 64 guided) and IN-512 (B = 16 guided) shapes;
    // the wgmma ones fall back to mma.sync off compute capability 9.0.
    let flashes = [
        ("mma.sync", Flash::MmaSync),
        ("wgmma 64 rows", Flash::Wgmma(Att90Rows::R64)),
        ("wgmma 128 rows", Flash::Wgmma(Att90Rows::R128)),
    ];
    for (name, flash) in flashes {
        time(
            &format!("fused: attention from qkv (flash, {name}) [128,256,3456] -> [128,256,1152]"),
            &|| kernels::attention(&qkv, &sample_bias2, &attn_bias_rows, h, 0.118, flash),
        )?;
    }
    {
        let n512 = 1024;
        let qkv512 = rnd(&[32, n512, 3 * d])?;
        let sb512 = rnd(&[32, 3 * d])?;
        let ab512 = rnd(&[h * n512, n512])?;
        for (name, flash) in flashes {
            time(
                &format!(
                    "fused: attention from qkv (flash, {name}) [32,1024,3456] -> [32,1024,1152]"
                ),
                &|| kernels::attention(&qkv512, &sb512, &ab512, h, 0.118, flash),
            )?;
        }
    }
    time(
        "same, unfused: split + QK^T + softmax + AV + merge",
        &|| {
            let split = kernels::split_qkv(&qkv, &sample_bias2, h)?;
            let (q, k, v) = (split.get(0)?, split.get(1)?, split.get(2)?);
            let p = kernels::softmax_bias(&q.matmul(&k.t()?)?, &attn_bias_rows, 0.118)?;
            kernels::merge_heads(&p.matmul(&v)?)
        },
    )?;
    time("fused: layer_norm [32768,1152]", &|| {
        kernels::layer_norm(&x, 1e-6)
    })?;
    // A whole fused block as the model runs it, four in a row (one sync per four): against the
    // sum of its ops timed one by one, this shows what running back to back costs or saves.
    let x3 = x.reshape((rows, n, d))?;
    let (w_qkv, w_proj, w2) = (rnd(&[3 * d, d])?, rnd(&[d, d])?, rnd(&[d, m])?);
    let (b_proj, b2) = (rnd(&[d])?, rnd(&[d])?);
    // The blocks' attention: today's default kernel.
    let attend = |qkv: &Tensor| {
        kernels::attention(
            qkv,
            &sample_bias2,
            &attn_bias_rows,
            h,
            0.118,
            Flash::MmaSync,
        )
    };
    let block = |hin: &Tensor| -> candle_core::Result<Tensor> {
        let qkv = kernels::layer_norm(hin, 1e-6)?
            .reshape((t, d))?
            .matmul(&w_qkv.t()?)?
            .reshape((rows, n, 3 * d))?;
        let ctx = attend(&qkv)?;
        let h1 = kernels::linear_bias_residual(&ctx, &w_proj, &b_proj, hin, true)?;
        let hidden = kernels::linear_bias_act(
            &kernels::layer_norm(&h1, 1e-6)?,
            &w1,
            &b4,
            Activation::GeluTanh,
            true,
        )?;
        kernels::linear_bias_residual(&hidden, &w2, &b2, &h1, true)
    };
    time(
        "fused block x4 [128,256,1152] (per block: divide by 4)",
        &|| {
            let mut hcur = x3.clone();
            for _ in 0..4 {
                hcur = block(&hcur)?;
            }
            Ok(hcur)
        },
    )?;
    if !matches!(dtype, DType::BF16 | DType::F16) {
        return Ok(out);
    }
    // The block's linear layers in bf16 (cuBLASLt epilogues) and in FP8 (`--dtype fp8`: the
    // quantising kernel, LayerNorm folded in where one precedes, then one FP8 matmul).
    use kernels::{fp8_linear, Fp8Scaling, Fp8Weight, Prologue};
    let ln = Prologue::LayerNorm { eps: 1e-6 };
    let hidden = rnd(&[t, m])?;
    let b_qkv = rnd(&[3 * d])?;
    let zero_qkv = Tensor::zeros(3 * d, dtype, device)?;
    let (q_qkv, q_proj) = (Fp8Weight::quantize(&w_qkv)?, Fp8Weight::quantize(&w_proj)?);
    let (q1, q2) = (Fp8Weight::quantize(&w1)?, Fp8Weight::quantize(&w2)?);
    let (gelu, id) = (Activation::GeluTanh, Activation::Identity);
    time("bf16: qkv LN + matmul [32768,1152]x[3456,1152]ᵀ", &|| {
        kernels::linear_bias_act(&kernels::layer_norm(&x, 1e-6)?, &w_qkv, &b_qkv, id, true)
    })?;
    time(
        "bf16: proj + bias + residual [32768,1152]x[1152,1152]ᵀ",
        &|| kernels::linear_bias_residual(&x, &w_proj, &b_proj, &x, true),
    )?;
    time(
        "bf16: fc1 LN + matmul + bias + GELU [32768,1152]x[4608,1152]ᵀ",
        &|| kernels::linear_bias_act(&kernels::layer_norm(&x, 1e-6)?, &w1, &b4, gelu, true),
    )?;
    time(
        "bf16: fc2 + bias + residual [32768,4608]x[1152,4608]ᵀ",
        &|| kernels::linear_bias_residual(&hidden, &w2, &b2, &x, true),
    )?;
    let quant = Prologue::Quantize;
    for sc in [Fp8Scaling::Cublaslt, Fp8Scaling::Pass] {
        time(&format!("fp8 ({sc:?}): qkv LN+quantise, matmul"), &|| {
            fp8_linear(&x, &q_qkv, &zero_qkv, ln, id, None, sc)
        })?;
        time(
            &format!("fp8 ({sc:?}): proj quantise, matmul + bias + residual"),
            &|| fp8_linear(&x, &q_proj, &b_proj, quant, id, Some(&x), sc),
        )?;
        time(
            &format!("fp8 ({sc:?}): fc1 LN+quantise, matmul + bias + GELU"),
            &|| fp8_linear(&x, &q1, &b4, ln, gelu, None, sc),
        )?;
        time(
            &format!("fp8 ({sc:?}): fc2 quantise, matmul + bias + residual"),
            &|| fp8_linear(&hidden, &q2, &b2, quant, id, Some(&x), sc),
        )?;
        let fp8_block = |hin: &Tensor| -> candle_core::Result<Tensor> {
            let qkv = fp8_linear(hin, &q_qkv, &zero_qkv, ln, id, None, sc)?;
            let ctx = attend(&qkv)?;
            let h1 = fp8_linear(&ctx, &q_proj, &b_proj, quant, id, Some(hin), sc)?;
            let hidden = fp8_linear(&h1, &q1, &b4, ln, gelu, None, sc)?;
            fp8_linear(&hidden, &q2, &b2, quant, id, Some(&h1), sc)
        };
        time(
            &format!("fp8 ({sc:?}) block x4 [128,256,1152] (per block: divide by 4)"),
            &|| {
                let mut hcur = x3.clone();
                for _ in 0..4 {
                    hcur = fp8_block(&hcur)?;
                }
                Ok(hcur)
            },
        )?;
    }
    Ok(out)
}
