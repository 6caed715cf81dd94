//! Each fused op against the unfused candle ops it replaces, on random inputs of several shapes
//! (including sizes that are not multiples of a warp or a block). On the CPU this checks the
//! fallbacks; `diffit-server bench kernels` runs the same comparisons on a GPU.

use super::*;
use crate::kernels::reference;
use candle_core::Device;
use candle_core::{DType, Tensor};

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    reference::rel_err(a, b).unwrap()
}

#[test]
fn every_fused_op_matches_its_unfused_version_on_the_cpu() {
    let report = reference::check_all(&Device::Cpu, DType::F32).unwrap();
    assert!(report.len() >= 15, "too few cases: {}", report.len());
    for case in &report {
        assert!(
            case.rel_err <= 1e-5,
            "{}: rel err {}",
            case.name,
            case.rel_err
        );
    }
    // The fused step update promises the candle expressions' exact bits.
    let update: Vec<_> = report
        .iter()
        .filter(|c| c.name.starts_with("guided_update"))
        .collect();
    assert_eq!(update.len(), 2);
    for case in update {
        assert_eq!(case.rel_err, 0.0, "{}", case.name);
    }
}

#[test]
fn fp8_fallback_matches_its_emulation_and_bounds_the_fp8_error() {
    let report = reference::check_fp8(&Device::Cpu).unwrap();
    assert!(report.len() >= 10, "too few cases: {}", report.len());
    for (case, tol) in &report {
        assert!(
            case.rel_err <= *tol,
            "{}: rel err {}",
            case.name,
            case.rel_err
        );
    }
}

#[test]
fn e4m3_rounding_and_row_scales_are_cuda_s() {
    use super::fp8::{quantize_rows_f32, round_e4m3, Prologue, E4M3_MAX};
    // Round to nearest even on the 3-bit mantissa, saturating at ±448, subnormals below 2^-6.
    for (v, want) in [
        (1.0625, 1.0),
        (1.1875, 1.25),
        (448.0, 448.0),
        (460.0, 448.0),
        (1e6, 448.0),
        (-1e6, -448.0),
        (0.0, 0.0),
        (3.0 / 1024.0, 4.0 / 1024.0),
        (1e-4, 0.0),
    ] {
        assert_eq!(round_e4m3(v), want, "round_e4m3({v})");
    }
    // Each row's largest magnitude maps onto 448 · scale = amax; every value keeps a relative
    // error of at most 2^-4 (half a step of the mantissa) above the subnormal range.
    let mut rows: Vec<f32> = (0..3 * 64)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * (1 + i / 64) as f32)
        .collect();
    let orig = rows.clone();
    quantize_rows_f32(&mut rows, 64, Prologue::Quantize);
    for (r, (q, x)) in rows.chunks(64).zip(orig.chunks(64)).enumerate() {
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let qmax = q.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(
            (qmax - amax).abs() <= amax * 1e-6,
            "row {r}: {qmax} vs {amax}"
        );
        let step = amax / E4M3_MAX * 2f32.powi(-9);
        for (a, b) in q.iter().zip(x) {
            assert!(
                (a - b).abs() <= (b.abs() / 16.0).max(step),
                "row {r}: {b} -> {a}"
            );
        }
    }
    // An all-zero row stays zero.
    let mut zeros = vec![0f32; 32];
    quantize_rows_f32(&mut zeros, 32, Prologue::LayerNorm { eps: 1e-6 });
    assert!(zeros.iter().all(|&v| v == 0.0));
}

#[test]
fn bf16_fallbacks_round_once() {
    let report = reference::check_all(&Device::Cpu, DType::BF16).unwrap();
    for case in &report {
        assert!(
            case.rel_err <= 1e-2,
            "{}: rel err {}",
            case.name,
            case.rel_err
        );
    }
}

#[test]
fn bias_act_rejects_a_bias_that_does_not_fit() {
    let dev = Device::Cpu;
    let y = Tensor::zeros((6, 5), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
    let err = bias_act(&y, &b, 2, Activation::Identity, None).unwrap_err();
    assert!(err.to_string().contains("does not fit"), "{err}");
    let b = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
    assert!(bias_act(&y, &b, 2, Activation::Identity, None).is_err());
}

#[test]
fn split_qkv_takes_a_column_slice_of_a_wider_bias() {
    let dev = Device::Cpu;
    let (b, n, heads, hd) = (3, 5, 2, 3);
    let c = 3 * heads * hd;
    let qkv = Tensor::randn(0f32, 1.0, (b, n, c), &dev).unwrap();
    let wide = Tensor::randn(0f32, 1.0, (b, 4 * c), &dev).unwrap();
    let slice = wide.narrow(1, 2 * c, c).unwrap();
    let fused = split_qkv(&qkv, &slice, heads).unwrap();
    let unfused = reference::split_qkv(&qkv, &slice.contiguous().unwrap(), heads).unwrap();
    assert_eq!(fused.dims(), &[3, b, heads, n, hd]);
    assert!(rel(&fused, &unfused) < 1e-7);
}

#[test]
fn softmax_rows_sum_to_one_even_for_short_rows() {
    let dev = Device::Cpu;
    for cols in [1, 3, 31, 33] {
        let s = Tensor::randn(0f32, 3.0, (4, 2, cols), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, (2, cols), &dev).unwrap();
        let p = softmax_bias(&s, &bias, 0.5).unwrap();
        let sums = p
            .sum(2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            sums.iter().all(|s| (s - 1.0).abs() < 1e-5),
            "{cols}: {sums:?}"
        );
    }
}

#[test]
fn the_halo_convolution_takes_only_whole_channel_blocks() {
    // A halo tiling runs where C is a multiple of its 64-channel block; `Gather` (every C that
    // is a multiple of 32) is never a halo tiling, and it is where the others fall back.
    for tiling in [ConvTiling::Halo128, ConvTiling::Halo256] {
        assert!(tiling.halo_fits(64) && tiling.halo_fits(512), "{tiling:?}");
        assert!(!tiling.halo_fits(32) && !tiling.halo_fits(96), "{tiling:?}");
    }
    assert!(!ConvTiling::Gather.halo_fits(128));
    assert!(conv3x3_implicit_channels_fit(96, 8) && !ConvTiling::Halo128.halo_fits(96));
}
