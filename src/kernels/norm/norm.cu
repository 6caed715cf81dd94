// Normalisation: LayerNorm (DiffiT) and GroupNorm + SiLU (VAE, channels-last).
// What each op computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the
// same nvcc as candle's kernels; loaded at run time as a custom module.

#include "../common.cuh"

#ifndef LN_PACKS
#error "LN_PACKS comes from src/kernels/tiling.rs through build.rs"
#endif

// LayerNorm over the last dimension without affine parameters; one warp per row, mean and
// variance in two passes (the second from cache) as the reference computes them.
template <typename T>
__device__ void layer_norm(const T *x, T *out, uint32_t rows, uint32_t cols, float eps) {
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        float sum = 0.0f;
        for (uint32_t c = lane; c < cols; c += 32) sum += ld(xr, c);
        const float mean = warp_sum(sum) / (float)cols;
        float sq = 0.0f;
        for (uint32_t c = lane; c < cols; c += 32) {
            const float d = ld(xr, c) - mean;
            sq += d * d;
        }
        const float rstd = rsqrtf(warp_sum(sq) / (float)cols + eps);
        T *orow = out + (size_t)r * cols;
        for (uint32_t c = lane; c < cols; c += 32) st(orow, c, (ld(xr, c) - mean) * rstd);
    }
}

// layer_norm over packs; one warp per row.
template <typename T>
__device__ void layer_norm_v(const T *x, T *out, uint32_t rows, uint32_t cols, float eps) {
    constexpr int N = Pack<T>::N;
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        float sum = 0.0f;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(xr, (size_t)p * N);
#pragma unroll
            for (int k = 0; k < N; ++k) sum += f(a.v[k]);
        }
        const float mean = warp_sum(sum) / (float)cols;
        float sq = 0.0f;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(xr, (size_t)p * N);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float d = f(a.v[k]) - mean;
                sq += d * d;
            }
        }
        const float rstd = rsqrtf(warp_sum(sq) / (float)cols + eps);
        T *orow = out + (size_t)r * cols;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(xr, (size_t)p * N);
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; ++k) o.v[k] = cast<T>((f(a.v[k]) - mean) * rstd);
            stp(orow, (size_t)p * N, o);
        }
    }
}

// layer_norm_v with the row in registers (cols ≤ 32 · LN_PACKS packs): every load of a row is
// issued at once, then two reductions and one write, instead of three passes over memory
// each waiting on its loads (on an H100 the pass version moved 1.8 of ~3 TB/s). The row stays
// in registers as loaded bits (`widen`); as f32 values, 93 registers a thread (two blocks an
// SM), it moved 3.0 of the H200's 4.8 TB/s at B = 64.
#if !defined(ROW_BLOCK) || !defined(LN_PACKS)
#error "ROW_BLOCK and LN_PACKS come from src/kernels/tiling.rs through build.rs"
#endif

template <typename T>
__device__ void layer_norm_r(const T *x, T *out, uint32_t rows, uint32_t cols, float eps) {
    constexpr int N = Pack<T>::N;
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        uint4 v[LN_PACKS];
        load_row_packs<T>(v, xr, lane, packs);
        float mean, rstd;
        row_moments<T>(v, lane, packs, cols, eps, mean, rstd);
        T *orow = out + (size_t)r * cols;
#pragma unroll
        for (int k = 0; k < LN_PACKS; ++k) {
            const uint32_t p = lane + 32 * k;
            if (p < packs) {
                Pack<T> o;
#pragma unroll
                for (int e = 0; e < N; ++e) o.v[e] = cast<T>((widen<T>(v[k], e) - mean) * rstd);
                stp(orow, (size_t)p * N, o);
            }
        }
    }
}

// The GroupNorm statistics are deterministic: no float atomics anywhere, so the same input gives
// the same bits on every run (atomic adds summed in whatever order the blocks and threads came,
// and a bf16 decode differed from run to run by up to 0.012). A block owns one tile of pixels of
// one sample; its threads keep per-channel partial sums in shared memory (each slot written by
// one thread), the block then adds them per group in a fixed order and writes its tile's partial
// to p1/p2[(b·tiles + tile)·G + g]; gn_finalize adds the tiles in order.
__device__ __forceinline__ void gn_write_tile_sums(const float *ch_a, const float *ch_q, float *p1,
                                                   float *p2, uint32_t b, uint32_t c,
                                                   uint32_t groups, uint32_t slots) {
    __syncthreads();
    const uint32_t cg = c / groups;
    const size_t base = ((size_t)b * gridDim.x + blockIdx.x) * groups;
    for (uint32_t g = threadIdx.x; g < groups; g += blockDim.x) {
        float a = 0.0f, q = 0.0f;
        for (uint32_t s = 0; s < slots; ++s) {
            for (uint32_t ch = g * cg; ch < (g + 1) * cg; ++ch) {
                a += ch_a[s * c + ch];
                q += ch_q[s * c + ch];
            }
        }
        p1[base + g] = a;
        p2[base + g] = q;
    }
}

// GroupNorm statistics over x [B, HW, C] (channels-last) in one pass: blockIdx.y = sample,
// blockIdx.x = a tile of pixels; each thread owns channels and sums (x − x0) and (x − x0)² over
// the tile. x0 is the group's first value (pixel 0, first channel): shifting by it keeps
// E[(x−x0)²] − E[x−x0]² from cancelling when the mean is large against the spread.
template <typename T>
__device__ void gn_moments(const T *x, float *p1, float *p2, uint32_t hw, uint32_t c,
                           uint32_t groups, uint32_t tile) {
    extern __shared__ float sh[];  // [2·C]: per-channel sums, then sums of squares
    const uint32_t b = blockIdx.y;
    const uint32_t p0 = blockIdx.x * tile;
    const uint32_t pe = min(p0 + tile, hw);
    const uint32_t cg = c / groups;
    for (uint32_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
        const uint32_t g = ch / cg;
        const float x0 = ld(x, (size_t)b * hw * c + g * cg);
        float a = 0.0f, q = 0.0f;
        for (uint32_t p = p0; p < pe; ++p) {
            const float v = ld(x, ((size_t)b * hw + p) * c + ch) - x0;
            a += v;
            q += v * v;
        }
        sh[ch] = a;
        sh[c + ch] = q;
    }
    gn_write_tile_sums(sh, sh + c, p1, p2, b, c, groups, 1);
}

// gn_moments over 16-byte packs (C a multiple of the pack): a thread sums one pack of
// channels over every `lanes`-th pixel of the tile, per element; the block then adds the lanes
// and channels of each group. The scalar version (one 2-byte load a thread a pixel, 32-pixel
// tiles) moved ~1 TB/s on an H100, 10 % of a VAE decode.
template <typename T>
__device__ void gn_moments_v(const T *x, float *p1, float *p2, uint32_t hw, uint32_t c,
                             uint32_t groups, uint32_t tile) {
    constexpr int N = Pack<T>::N;
    extern __shared__ float sh[];  // [2·lanes·C]: per (lane, channel) sums, then squares
    const uint32_t b = blockIdx.y;
    const uint32_t p0 = blockIdx.x * tile;
    const uint32_t pe = min(p0 + tile, hw);
    const uint32_t cg = c / groups, packs = c / N;
    const uint32_t lanes = max(1u, blockDim.x / packs);
    float *ch_a = sh, *ch_q = sh + (size_t)lanes * c;
    const T *xb = x + (size_t)b * hw * c;
    for (uint32_t i = threadIdx.x; i < packs * lanes; i += blockDim.x) {
        const uint32_t q = i % packs, lane = i / packs;
        float x0[N], a[N], sq[N];
#pragma unroll
        for (int e = 0; e < N; ++e) {
            x0[e] = ld(xb, ((q * N + e) / cg) * cg);
            a[e] = 0.0f;
            sq[e] = 0.0f;
        }
        for (uint32_t p = p0 + lane; p < pe; p += lanes) {
            const Pack<T> v = ldp(xb, (size_t)p * c + q * N);
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float d = f(v.v[e]) - x0[e];
                a[e] += d;
                sq[e] += d * d;
            }
        }
#pragma unroll
        for (int e = 0; e < N; ++e) {
            ch_a[(size_t)lane * c + q * N + e] = a[e];
            ch_q[(size_t)lane * c + q * N + e] = sq[e];
        }
    }
    gn_write_tile_sums(ch_a, ch_q, p1, p2, b, c, groups, lanes);
}

// The tiles' shifted moments (p1, p2 [B, tiles, G]) → mean and 1/std per (sample, group) in s1,
// s2, so the apply passes do no division or square root per element. One warp a (sample, group):
// lane l adds tiles l, l + 32, … in order, then the lanes are added by warp_sum's fixed butterfly,
// so the result is the same bits on every run. (One thread a group, adding every tile in turn,
// was one block of 256 threads for a whole decode pass: ≈ 10 % of the GroupNorm time at 256²
// for a kernel that moves a few kilobytes.)
template <typename T>
__device__ void gn_finalize(const T *x, const float *p1, const float *p2, float *s1, float *s2,
                            uint32_t batch, uint32_t hw, uint32_t c, uint32_t groups,
                            uint32_t tiles, float eps) {
    const uint32_t cg = c / groups;
    const float count = (float)hw * (float)cg;
    const uint32_t warps = blockDim.x / 32, lane = threadIdx.x % 32;
    for (uint32_t i = blockIdx.x * warps + threadIdx.x / 32; i < batch * groups; i += gridDim.x * warps) {
        const uint32_t b = i / groups, g = i % groups;
        float a = 0.0f, q = 0.0f;
        for (uint32_t t = lane; t < tiles; t += 32) {
            a += p1[((size_t)b * tiles + t) * groups + g];
            q += p2[((size_t)b * tiles + t) * groups + g];
        }
        a = warp_sum(a);
        q = warp_sum(q);
        if (lane == 0) {
            const float x0 = ld(x, (size_t)b * hw * c + g * cg);
            const float m1 = a / count;
            const float var = fmaxf(q / count - m1 * m1, 0.0f);
            s1[i] = x0 + m1;
            s2[i] = rsqrtf(var + eps);
        }
    }
}

// out = (x − mean)·rstd·gamma[c] + beta[c], then SiLU if asked; grid-stride over elements.
template <typename T, bool SILU>
__device__ void gn_apply(const T *x, const float *sums, const float *sq, const T *gamma,
                         const T *beta, T *out, uint32_t batch, uint32_t hw, uint32_t c,
                         uint32_t groups, float eps) {
    const uint32_t cg = c / groups;
    const size_t total = (size_t)batch * hw * c;
    const size_t per_sample = (size_t)hw * c;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t ch = (uint32_t)(i % c);
        const uint32_t b = (uint32_t)(i / per_sample);
        const uint32_t k = b * groups + ch / cg;
        const float mean = sums[k];  // finalised by gn_finalize
        const float rstd = sq[k];
        float v = (ld(x, i) - mean) * rstd * ld(gamma, ch) + ld(beta, ch);
        if (SILU) v = v / (1.0f + __expf(-v));
        st(out, i, v);
    }
}

// One 16-byte pack of x normalised with its groups' mean and 1/std (`g` indexes them: sample ·
// groups + the pack's first channel's group), times gamma plus beta, then SiLU if asked; the
// pack's channels walk through their groups without a division per element. gn_apply_v and
// gn_silu_im2col3x3_v both take it, so their values are the same bits.
template <typename T, bool SILU>
__device__ __forceinline__ Pack<T> gn_pack(const Pack<T> &a, const float *mean, const float *rstd,
                                           const T *gamma, const T *beta, uint32_t ch0, uint32_t b,
                                           uint32_t cg, uint32_t groups) {
    constexpr int N = Pack<T>::N;
    const Pack<T> gm = ldp(gamma, ch0);
    const Pack<T> bt = ldp(beta, ch0);
    uint32_t g = ch0 / cg;
    uint32_t in_group = ch0 - g * cg;
    g += b * groups;
    Pack<T> o;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        float v = (f(a.v[k]) - mean[g]) * rstd[g] * f(gm.v[k]) + f(bt.v[k]);
        if (SILU) v = __fdividef(v, 1.0f + __expf(-v));
        o.v[k] = cast<T>(v);
        if (++in_group == cg) {
            in_group = 0;
            ++g;
        }
    }
    return o;
}

// gn_apply over 16-byte packs with 32-bit indices (C a multiple of the pack; the launcher
// checks the element count fits): the scalar version's 64-bit divisions per element made it
// as slow as the im2col pass.
template <typename T, bool SILU>
__device__ void gn_apply_v(const T *x, const float *mean, const float *rstd, const T *gamma,
                           const T *beta, T *out, uint32_t batch, uint32_t hw, uint32_t c,
                           uint32_t groups, float eps) {
    constexpr int N = Pack<T>::N;
    const uint32_t cg = c / groups;
    const uint32_t per_sample = hw * c;
    const uint32_t packs = batch * (per_sample / N);
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += gridDim.x * blockDim.x) {
        const uint32_t i = p * N;
        const uint32_t b = i / per_sample;
        const uint32_t ch0 = i % c;
        stp(out, i, gn_pack<T, SILU>(ldp(x, i), mean, rstd, gamma, beta, ch0, b, cg, groups));
    }
}

// GroupNorm + SiLU written straight as the im2col columns of the 3×3 convolution that reads it
// (the VAE's ResNet convolutions on the im2col path): out [B·H·W, 9·C], row m = output pixel m,
// tap (ky, kx) at columns (3·ky + kx)·C…. Each pack of x is normalised once (the same arithmetic
// as gn_apply_v, so the same bits) and stored to the up to 9 rows that read it; a thread also
// zeroes its own row's taps that fall outside the image, so every column is written once. Saves
// gn_apply's write and im2col's read of the normalised activation. C a multiple of the pack.
template <typename T>
__device__ void gn_silu_im2col3x3_v(const T *x, const float *mean, const float *rstd, const T *gamma,
                                    const T *beta, T *out, uint32_t batch, uint32_t h, uint32_t w,
                                    uint32_t c, uint32_t groups) {
    constexpr int N = Pack<T>::N;
    const uint32_t cg = c / groups;
    const uint32_t cp = c / N;  // packs a pixel (and a tap)
    const uint32_t packs = batch * h * w * cp;
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += gridDim.x * blockDim.x) {
        const uint32_t m = p / cp, q = p - m * cp;
        const uint32_t xo = m % w, t = m / w, yo = t % h, b = t / h;
        const uint32_t ch0 = q * N;
        const Pack<T> o = gn_pack<T, true>(ldp(x, (size_t)p * N), mean, rstd, gamma, beta, ch0, b, cg, groups);
#pragma unroll
        for (int ky = 0; ky < 3; ++ky) {
#pragma unroll
            for (int kx = 0; kx < 3; ++kx) {
                const uint32_t tap = 3 * ky + kx;
                // The output pixel whose tap (ky, kx) reads this one, and this pixel's own tap.
                const int yr = (int)yo - ky + 1, xr = (int)xo - kx + 1;
                if (yr >= 0 && yr < (int)h && xr >= 0 && xr < (int)w) {
                    const size_t row = ((size_t)b * h + yr) * w + xr;
                    stp(out, (row * 9 + tap) * c + ch0, o);
                }
                const int ys = (int)yo + ky - 1, xs = (int)xo + kx - 1;
                if (ys < 0 || ys >= (int)h || xs < 0 || xs >= (int)w)
                    stp(out, ((size_t)m * 9 + tap) * c + ch0, zero_pack<T>());
            }
        }
    }
}

// layer_norm scalar, over packs (_v) and with the row in registers (_r); the GroupNorm
// statistics (scalar and over packs), their finalisation, and the apply pass without and with
// SiLU, scalar and over packs.
#define INSTANTIATE_LAYER_NORM(T, SFX, NAME)                                                       \
    extern "C" __global__ void NAME##_##SFX(const T *x, T *out, uint32_t rows, uint32_t cols,      \
                                            float eps) {                                           \
        NAME<T>(x, out, rows, cols, eps);                                                          \
    }
// layer_norm_r at four blocks an SM (≤ 64 registers; the row as raw packs, `widen`): it ran two
// blocks an SM at 93 registers, too few loads in flight to fill the memory bus.
#define INSTANTIATE_LAYER_NORM_R(T, SFX)                                                           \
    extern "C" __global__ void __launch_bounds__(ROW_BLOCK, 4)                                     \
        layer_norm_r_##SFX(const T *x, T *out, uint32_t rows, uint32_t cols, float eps) {          \
        layer_norm_r<T>(x, out, rows, cols, eps);                                                  \
    }
#define INSTANTIATE_GN_MOMENTS(T, SFX, NAME)                                                       \
    extern "C" __global__ void NAME##_##SFX(const T *x, float *p1, float *p2, uint32_t hw,         \
                                            uint32_t c, uint32_t groups, uint32_t tile) {          \
        NAME<T>(x, p1, p2, hw, c, groups, tile);                                                   \
    }
#define INSTANTIATE_GN_APPLY(T, SFX, NAME, KERNEL, SILU)                                           \
    extern "C" __global__ void NAME##_##SFX(const T *x, const float *sums, const float *sq,        \
                                            const T *gamma, const T *beta, T *out, uint32_t batch, \
                                            uint32_t hw, uint32_t c, uint32_t groups, float eps) { \
        KERNEL<T, SILU>(x, sums, sq, gamma, beta, out, batch, hw, c, groups, eps);                 \
    }
#define INSTANTIATE_NORM(T, SFX)                                                                   \
    INSTANTIATE_LAYER_NORM(T, SFX, layer_norm)                                                     \
    INSTANTIATE_LAYER_NORM(T, SFX, layer_norm_v)                                                   \
    INSTANTIATE_LAYER_NORM_R(T, SFX)                                                               \
    INSTANTIATE_GN_MOMENTS(T, SFX, gn_moments)                                                     \
    INSTANTIATE_GN_MOMENTS(T, SFX, gn_moments_v)                                                   \
    extern "C" __global__ void gn_finalize_##SFX(const T *x, const float *p1, const float *p2,     \
                                                 float *s1, float *s2, uint32_t batch,             \
                                                 uint32_t hw, uint32_t c, uint32_t groups,         \
                                                 uint32_t tiles, float eps) {                      \
        gn_finalize<T>(x, p1, p2, s1, s2, batch, hw, c, groups, tiles, eps);                       \
    }                                                                                              \
    INSTANTIATE_GN_APPLY(T, SFX, gn_apply, gn_apply, false)                                        \
    INSTANTIATE_GN_APPLY(T, SFX, gn_apply_silu, gn_apply, true)                                    \
    INSTANTIATE_GN_APPLY(T, SFX, gn_apply_v, gn_apply_v, false)                                    \
    INSTANTIATE_GN_APPLY(T, SFX, gn_apply_silu_v, gn_apply_v, true)                                \
    extern "C" __global__ void gn_silu_im2col3x3_v_##SFX(const T *x, const float *mean, const float *rstd, \
                                                       const T *gamma, const T *beta, T *out,      \
                                                       uint32_t batch, uint32_t h, uint32_t w,     \
                                                       uint32_t c, uint32_t groups) {              \
        gn_silu_im2col3x3_v<T>(x, mean, rstd, gamma, beta, out, batch, h, w, c, groups);           \
    }

FOR_EACH_DTYPE(INSTANTIATE_NORM)
