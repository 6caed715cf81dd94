//! Fused kernels for the two networks the server runs: the DiffiT denoiser's transformer
//! blocks and the VAE decoder's channels-last path. Each replaces several candle passes (and
//! the broadcasts candle's CUDA backend is slow at) with one pass over memory. Every op is a
//! candle custom op with a CUDA kernel (with the `cuda` feature) and a CPU fallback that
//! computes the same thing, so the fused paths run, and are tested, on any device.
//!
//! All ops compute in f32 and store the run dtype (f32, bf16 or f16); inputs must be
//! contiguous (the callers pass fresh matmul outputs).
//!
//! One module per op family, each with its public functions, custom ops and CPU fallbacks in
//! `mod.rs`, its launchers in `cuda.rs` and its kernels in `.cu` files beside them:
//! - `attention`: the DiffiT block's attention (flash kernel or split heads,
//!   biased softmax, merge heads); the softmax also serves the VAE's mid-block attention.
//! - `norm`: LayerNorm (DiffiT) and GroupNorm + SiLU (VAE).
//! - `linear`: bias, GELU and residual epilogues, as a pass or inside a
//!   cuBLASLt matmul (DiffiT qkv/projection/MLP; the VAE's 1×1 layers and im2col convolutions).
//! - `fp8`: the DiffiT block's linear layers in FP8 (`--dtype fp8`): e4m3 weights with
//!   per-channel scales, activations quantised per token (with the LayerNorm before them folded
//!   in), one cuBLASLt FP8 matmul with the scales and the epilogues.
//! - `conv`: the VAE's 3×3 convolutions (im2col, the ×2 upsampling phases, the
//!   small output convolution).
//! - `step`: the end of a bucketed denoising step (guidance and the sampler update) as one op.
//!
//! Shared: `cpu` (the fallbacks' f32 in and out), `launch` (PTX modules, dispatch and the one
//! launch helper), `tiling` (the constants kernels and launchers share, defined once),
//! `common.cuh` (the kernels' 16-byte packs and conversions); `reference` holds the unfused
//! formulation of every op and `check_all`, which compares the two.

pub(crate) mod attention;
mod conv;
mod cpu;
pub(crate) mod fp8;
pub mod graph;
#[cfg(feature = "cuda")]
mod launch;
mod linear;
mod norm;
pub mod reference;
mod step;
/// The tiling constants kernels and launchers share (build.rs passes them to nvcc).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod tiling;

pub use attention::{
    attention, merge_heads, softmax_bias, split_qkv, wgmma_applies, Att90Rows, Flash,
};
pub use conv::{
    conv3x3_implicit, conv3x3_implicit_channels_fit, conv3x3_implicit_fits, conv3x3_small,
    conv3x3_small_fits, im2col3x3, im2col_up2_phases, pixel_shuffle_bias, up2_phase_weights,
    ConvTiling,
};
pub use fp8::{fp8_fits, fp8_linear, Fp8Scaling, Fp8Weight, Prologue};
pub use linear::{
    bias_act, linear_bias_act, linear_bias_residual, linear_no_bias, set_matmul_autotune,
    with_borrowed_matmul_algorithms, Activation,
};
pub use norm::{group_norm, group_norm_silu_im2col3x3, layer_norm};
pub use step::{guided_update, UpdateColumns, UpdateSpec};

#[cfg(test)]
mod tests;
