// The constants that a kernel is compiled with and its launcher sizes grids, register paths and
// shared memory by. They are defined here once: build.rs `include!`s this file and passes every
// entry of `CUDA_DEFINES` to nvcc as `-DNAME=value`, so a `.cu` file cannot drift from its
// launcher (the `.cu` files `#error` when a define is missing). This file is compiled by build.rs
// too, so it holds constants only.

/// Threads per block of the row-wise kernels (8 warps, one row each) and the grid-stride ones.
pub const ROW_BLOCK: u32 = 256;

/// Packs a lane holds in registers in `softmax_bias_r`: rows of up to 32 · 4 packs are read from
/// memory once; longer rows take `softmax_bias_v`.
pub const SOFTMAX_PACKS: usize = 4;

/// Packs a lane holds in registers in `layer_norm_r` and the FP8 `quant_rows_r` kernels (rows of
/// up to 32 · 8 packs).
pub const LN_PACKS: usize = 8;

/// Packs a lane holds in `fp8_quant_rw`, the FP8 quantisation of the MLP's hidden rows: 32 · 18
/// packs of 8 = 4608 columns, the ImageNet models' 4 · 1152.
pub const FP8_WIDE_PACKS: usize = 18;

/// The padded head dims the flash-attention kernel is compiled for (`hd` is zero-padded to the
/// next one; flash.cu instantiates each, and build.rs fails when the two lists differ).
pub const ATT_HEAD_DIMS: [usize; 4] = [32, 64, 80, 128];

/// Flash-attention tiling "b", for padded head dims up to [`ATT_B_MAX_HDP`]: 8 warps of one
/// m-tile (16 query rows) each, key blocks of 64 in a ring of 2 stages (two CTAs an SM: 16
/// warps). Chosen on the H200 among 17 tilings (docs/perf.md v0.28): against 4 warps of two
/// m-tiles and key blocks of 32 in 4 stages (the tiling before), the attention op took 0.285
/// against 0.332 ms at B = 64 and 0.826 against 0.904 ms at ImageNet-512 B = 16, and was no
/// slower at B = 1.
pub const ATT_B_WARPS: usize = 8;
pub const ATT_B_MT: usize = 1;
pub const ATT_B_BK: usize = 64;
pub const ATT_B_STAGES: usize = 2;
pub const ATT_B_MAX_HDP: usize = 80;

/// Flash-attention tiling "s": tiling "b" with [`ATT_S_WARPS`] warps a CTA, for grids that would
/// leave SMs idle with "b" (a B = 1 guided step: 64 CTAs of "b" for 132 SMs). A warp owns its 16
/// query rows and runs the key blocks in the same order under either, so a row's bits do not
/// depend on which one ran (the batch-independence rule).
pub const ATT_S_WARPS: usize = 4;

/// Flash-attention tiling "a", above [`ATT_B_MAX_HDP`]: 4 warps of 1 m-tile, key blocks of 64
/// in 2 stages.
pub const ATT_A_WARPS: usize = 4;
pub const ATT_A_MT: usize = 1;
pub const ATT_A_BK: usize = 64;
pub const ATT_A_STAGES: usize = 2;

/// A variant of the Hopper flash attention (flash_sm90.cu, wgmma): `warpgroups` of 64 query rows
/// a CTA, key blocks of `block_keys` through a cp.async ring of `stages` (each stage the block's K,
/// V and the CTA's bias tile), and whether a warpgroup overlaps its softmax of a block with its
/// P·V of the block before (`overlap`, FlashAttention-3's intra-warpgroup pipelining).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Att90Variant {
    pub warpgroups: usize,
    pub block_keys: usize,
    pub stages: usize,
    pub overlap: bool,
}

impl Att90Variant {
    /// The kernel-name part, `w{warpgroups}k{block_keys}s{stages}o{0|1}`.
    pub fn name(&self) -> String {
        format!(
            "w{}k{}s{}o{}",
            self.warpgroups, self.block_keys, self.stages, self.overlap as u8
        )
    }
}

const fn att90(warpgroups: usize, block_keys: usize, stages: usize, overlap: bool) -> Att90Variant {
    Att90Variant {
        warpgroups,
        block_keys,
        stages,
        overlap,
    }
}

/// The variants flash_sm90.cu instantiates for every padded head dim (build.rs checks).
pub const ATT90_VARIANTS: [Att90Variant; 4] = [
    att90(1, 64, 2, false),
    att90(2, 64, 2, false),
    att90(2, 64, 2, true),
    att90(2, 128, 2, true),
];
/// The variants `--wgmma-attention 64` and `128` run: the fastest of each CTA size on the H200
/// (docs/perf.md v0.32; the overlapped loop and 128-key blocks measured slower at both sizes).
pub const ATT90_ROWS64: Att90Variant = ATT90_VARIANTS[0];
pub const ATT90_ROWS128: Att90Variant = ATT90_VARIANTS[1];
/// The padded head dims of [`ATT_HEAD_DIMS`] the Hopper kernel is built for: up to 80 (the model's
/// 72 pads to 80). At 128 its output was 6 % off the reference on the H200 once a sequence had
/// two key blocks (docs/perf.md v0.24; cause not found), so larger head dims take the mma.sync
/// kernel.
pub const ATT90_MAX_HDP: usize = 80;

/// Implicit-GEMM 3×3 convolution (conv.cu `conv3x3_igemm`): an output tile of CONV_BM pixels by
/// CONV_BN channels a CTA of 8 warps (2 × 4, each 64 × 32), K in blocks of CONV_BK (within one
/// tap: C must be a multiple of it) through a ring of CONV_STAGES in shared memory.
pub const CONV_BM: usize = 128;
pub const CONV_BN: usize = 128;
pub const CONV_BK: usize = 32;
pub const CONV_STAGES: usize = 3;
/// Threads of a `conv3x3_igemm` CTA (the warp layout above is written for 8 warps).
pub const CONV_THREADS: u32 = 256;

/// Halo-tiled implicit GEMM (conv.cu `conv3x3_halo`): channel blocks of CONVH_BK (C must be a
/// multiple of it) outer, the 9 taps inner; the weight tiles through a ring of CONVH_STAGES.
pub const CONVH_BK: usize = 64;
pub const CONVH_STAGES: usize = 3;
/// Columns of a `conv3x3_halo` output block (one 16-row m-tile of mma a block row).
pub const CONVH_TW: usize = 16;
/// Output channels of a `conv3x3_halo` CTA (both tilings).
pub const CONVH_BN: usize = 128;

/// Pixels a half-warp of `conv3x3_cout4_v` (the ≤ 4-output convolution) takes at once: each
/// weight it loads from shared memory feeds this many pixels.
pub const COUT4_PIXELS: usize = 4;

/// Shared memory of one `conv3x3_igemm` CTA: the A and B rings, rows padded by 8 elements.
pub const fn conv_igemm_smem(elem_bytes: usize) -> usize {
    CONV_STAGES * (CONV_BM + CONV_BN) * (CONV_BK + 8) * elem_bytes
}

/// Shared memory of one `conv3x3_halo` CTA whose output block has `rows` rows of
/// [`CONVH_TW`]: two halo buffers of (rows + 2) × (CONVH_TW + 2) pixels and the weight ring,
/// rows padded by 8 elements.
pub const fn conv_halo_smem(rows: usize, elem_bytes: usize) -> usize {
    (2 * (rows + 2) * (CONVH_TW + 2) + CONVH_STAGES * CONVH_BN) * (CONVH_BK + 8) * elem_bytes
}

/// What nvcc gets as `-DNAME=value` (read by build.rs only).
#[allow(dead_code)]
pub const CUDA_DEFINES: &[(&str, usize)] = &[
    ("SOFTMAX_PACKS", SOFTMAX_PACKS),
    ("LN_PACKS", LN_PACKS),
    ("ROW_BLOCK", ROW_BLOCK as usize),
    ("FP8_WIDE_PACKS", FP8_WIDE_PACKS),
    ("ATT_B_WARPS", ATT_B_WARPS),
    ("ATT_B_MT", ATT_B_MT),
    ("ATT_B_BK", ATT_B_BK),
    ("ATT_B_STAGES", ATT_B_STAGES),
    ("ATT_B_MAX_HDP", ATT_B_MAX_HDP),
    ("ATT_S_WARPS", ATT_S_WARPS),
    ("ATT_A_WARPS", ATT_A_WARPS),
    ("ATT_A_MT", ATT_A_MT),
    ("ATT_A_BK", ATT_A_BK),
    ("ATT_A_STAGES", ATT_A_STAGES),
    ("ATT90_MAX_HDP", ATT90_MAX_HDP),
    ("CONV_BM", CONV_BM),
    ("CONV_BN", CONV_BN),
    ("CONV_BK", CONV_BK),
    ("CONV_STAGES", CONV_STAGES),
    ("CONV_THREADS", CONV_THREADS as usize),
    ("COUT4_PIXELS", COUT4_PIXELS),
    ("CONVH_BK", CONVH_BK),
    ("CONVH_STAGES", CONVH_STAGES),
];
