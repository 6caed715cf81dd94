//! Decode chunking: `--decode-chunk N` decodes N latents in one pass on both paths, up to the
//! documented im2col bound of the channels-last path.

use candle_core::{DType, Device, Tensor};

use super::{nhwc, split_passes, VaeConfig, VaeDecoder};
use crate::config::KernelOptions;

/// A two-level decoder small enough to run on the CPU; its upsampling conv has 16 channels, so
/// the channels-last path takes its 2×2-phase route as kl-f8 does.
pub(crate) fn tiny_decoder(kernels: &KernelOptions) -> VaeDecoder {
    let config = VaeConfig {
        latent_channels: 4,
        out_channels: 3,
        block_out_channels: vec![8, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        scaling_factor: 0.18215,
        mid_attention: true,
        post_quant_conv: true,
    };
    VaeDecoder::random(config, DType::F32, &Device::Cpu, kernels).unwrap()
}

#[test]
fn the_channels_last_bound_for_kl_f8() {
    let cfg = VaeConfig::sd_kl_f8();
    // 9·256 im2col columns per pixel at 8× the latent side: 151 M elements per 32×32 latent.
    assert_eq!(nhwc::max_batch(&cfg, (32, 32), 0), 14);
    assert_eq!(nhwc::max_batch(&cfg, (64, 64), 0), 3);
    // Implicit GEMMs: the largest buffer is the last upsampling's phase columns, 4·256 per
    // pixel at 4× the latent side: 32 latents of 32×32, 8 of 64×64.
    assert_eq!(nhwc::max_batch(&cfg, (32, 32), usize::MAX), 32);
    assert_eq!(nhwc::max_batch(&cfg, (64, 64), usize::MAX), 8);
    // Only the 128-channel convolutions (the default): the 512 → 256 conv1 at 4× keeps its
    // 9·512 columns per pixel.
    assert_eq!(nhwc::max_batch(&cfg, (32, 32), 128), 28);
    assert_eq!(nhwc::max_batch(&cfg, (64, 64), 128), 7);
}

#[test]
fn passes_are_chunks_split_evenly_where_they_do_not_fit() {
    assert_eq!(split_passes(16, 16, usize::MAX), vec![16]);
    assert_eq!(split_passes(16, 5, usize::MAX), vec![5, 5, 5, 1]);
    // ImageNet-256 on the channels-last path: 16 do not fit one pass of at most 14.
    assert_eq!(split_passes(16, 16, 14), vec![8, 8]);
    assert_eq!(split_passes(12, 16, 14), vec![12]);
    assert_eq!(split_passes(64, 8, 14), vec![8; 8]);
    // ImageNet-512: at most 3 a pass.
    assert_eq!(split_passes(8, 8, 3), vec![3, 3, 2]);
    assert_eq!(split_passes(0, 8, 3), Vec::<usize>::new());
}

#[test]
fn decode_chunk_n_decodes_n_latents_in_one_pass() {
    let z = Tensor::randn(0f32, 1.0, (16, 4, 4, 4), &Device::Cpu).unwrap();
    for kernels in [KernelOptions::fused(), KernelOptions::plain()] {
        let vae = tiny_decoder(&kernels);
        assert_eq!(vae.is_fused(), kernels == KernelOptions::fused());
        assert_eq!(vae.pass_sizes(16, 16, (4, 4)), vec![16]);
        let whole = vae.decode_chunked(&z, 16).unwrap();
        assert_eq!(whole.dims(), &[16, 3, 8, 8]);
        assert_eq!(vae.take_passes(), vec![16], "fused: {}", vae.is_fused());
        let parts = vae.decode_chunked(&z, 5).unwrap();
        assert_eq!(vae.take_passes(), vec![5, 5, 5, 1]);
        let diff = (parts - &whole)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "chunked decode differs by {diff}");
        // `decode` hands over the default chunk at a time.
        vae.decode(&z).unwrap();
        assert_eq!(vae.take_passes(), vec![8, 8]);
    }
}

/// CUDA-graph decode passes only where there is a GPU to capture on: on the CPU `--cuda-graphs
/// on` leaves passes direct, as it leaves steps uncaptured.
#[test]
fn the_cpu_never_captures_decode_passes() {
    let z = Tensor::randn(0f32, 1.0, (3, 4, 4, 4), &Device::Cpu).unwrap();
    for graphs in [
        crate::config::Toggle::On,
        crate::config::Toggle::Auto,
        crate::config::Toggle::Off,
    ] {
        let kernels = KernelOptions {
            cuda_graphs: graphs,
            ..KernelOptions::fused()
        };
        let vae = tiny_decoder(&kernels);
        assert!(!vae.captures_passes(), "{graphs:?}");
        assert_eq!(vae.decode(&z).unwrap().dims(), &[3, 3, 8, 8]);
        assert_eq!(vae.take_passes(), vec![3]);
    }
}
