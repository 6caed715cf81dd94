// Attention without the flash kernel: biased softmax, head split and merge.
// What each op computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the
// same nvcc as candle's kernels; loaded at run time as a custom module.

#include "../common.cuh"

#ifndef SOFTMAX_PACKS
#error "SOFTMAX_PACKS comes from src/kernels/tiling.rs through build.rs"
#endif

// Merges the lanes' running row maximum m and sum l of exp(v − m) across the warp (online
// softmax). A lane that saw no column (cols < 32) holds m = -inf, l = 0: it adds nothing.
__device__ __forceinline__ void warp_merge_max_sum(float &m, float &l) {
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(FULL_MASK, m, o);
        const float l2 = __shfl_xor_sync(FULL_MASK, l, o);
        const float nm = fmaxf(m, m2);
        const float a = (m == -INFINITY) ? 0.0f : l * __expf(m - nm);
        const float b = (m2 == -INFINITY) ? 0.0f : l2 * __expf(m2 - nm);
        l = a + b;
        m = nm;
    }
}

// out[r, :] = softmax(scale * s[r, :] + bias[r % bias_rows, :]); one warp per row, online
// max/sum in one pass, then a second pass (served from cache) that writes.
template <typename T>
__device__ void softmax_bias(const T *s, const T *bias, T *out, uint32_t rows, uint32_t cols,
                             uint32_t bias_rows, float scale) {
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *sr = s + (size_t)r * cols;
        const T *br = bias + (size_t)(r % bias_rows) * cols;
        float m = -INFINITY, l = 0.0f;
        for (uint32_t c = lane; c < cols; c += 32) {
            const float v = ld(sr, c) * scale + ld(br, c);
            const float nm = fmaxf(m, v);
            l = l * __expf(m - nm) + __expf(v - nm);
            m = nm;
        }
        warp_merge_max_sum(m, l);
        const float inv = 1.0f / l;
        T *orow = out + (size_t)r * cols;
        for (uint32_t c = lane; c < cols; c += 32) {
            st(orow, c, __expf(ld(sr, c) * scale + ld(br, c) - m) * inv);
        }
    }
}

// softmax_bias over packs; one warp per row.
template <typename T>
__device__ void softmax_bias_v(const T *s, const T *bias, T *out, uint32_t rows, uint32_t cols,
                               uint32_t bias_rows, float scale) {
    constexpr int N = Pack<T>::N;
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *sr = s + (size_t)r * cols;
        const T *br = bias + (size_t)(r % bias_rows) * cols;
        float m = -INFINITY, l = 0.0f;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(sr, (size_t)p * N);
            const Pack<T> b = ldp(br, (size_t)p * N);
            float v[N];
            float pm = m;
#pragma unroll
            for (int k = 0; k < N; ++k) {
                v[k] = f(a.v[k]) * scale + f(b.v[k]);
                pm = fmaxf(pm, v[k]);
            }
            float sum = 0.0f;
#pragma unroll
            for (int k = 0; k < N; ++k) sum += __expf(v[k] - pm);
            l = (m == -INFINITY ? 0.0f : l * __expf(m - pm)) + sum;
            m = pm;
        }
        warp_merge_max_sum(m, l);
        const float inv = 1.0f / l;
        T *orow = out + (size_t)r * cols;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(sr, (size_t)p * N);
            const Pack<T> b = ldp(br, (size_t)p * N);
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; ++k) o.v[k] = cast<T>(__expf(f(a.v[k]) * scale + f(b.v[k]) - m) * inv);
            stp(orow, (size_t)p * N, o);
        }
    }
}

// softmax_bias with the row held in registers (at most MAXP = SOFTMAX_PACKS packs per lane), so
// scores are read from memory once.
template <typename T, int MAXP>
__device__ void softmax_bias_r(const T *s, const T *bias, T *out, uint32_t rows, uint32_t cols,
                               uint32_t bias_rows, float scale) {
    constexpr int N = Pack<T>::N;
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *sr = s + (size_t)r * cols;
        const T *br = bias + (size_t)(r % bias_rows) * cols;
        float v[MAXP][N];
        float m = -INFINITY;
#pragma unroll
        for (int j = 0; j < MAXP; ++j) {
            const uint32_t p = lane + 32 * j;
            if (p < packs) {
                const Pack<T> a = ldp(sr, (size_t)p * N);
                const Pack<T> b = ldp(br, (size_t)p * N);
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    v[j][k] = f(a.v[k]) * scale + f(b.v[k]);
                    m = fmaxf(m, v[j][k]);
                }
            }
        }
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, o));
        float l = 0.0f;
#pragma unroll
        for (int j = 0; j < MAXP; ++j) {
            if (lane + 32 * j < packs) {
#pragma unroll
                for (int k = 0; k < N; ++k) {
                    v[j][k] = __expf(v[j][k] - m);
                    l += v[j][k];
                }
            }
        }
        const float inv = 1.0f / warp_sum(l);
        T *orow = out + (size_t)r * cols;
#pragma unroll
        for (int j = 0; j < MAXP; ++j) {
            const uint32_t p = lane + 32 * j;
            if (p < packs) {
                Pack<T> o;
#pragma unroll
                for (int k = 0; k < N; ++k) o.v[k] = cast<T>(v[j][k] * inv);
                stp(orow, (size_t)p * N, o);
            }
        }
    }
}

// qkv: [batch·tokens, 3·heads·hd] (the qkv matmul without bias); bias: [batch, 3·heads·hd]
// with row stride bias_stride; out: [3, batch, heads, tokens, hd] = q, k, v split into heads
// with the per-sample bias added. One block per token row.
template <typename T>
__device__ void split_qkv(const T *qkv, const T *bias, T *out, uint32_t batch, uint32_t tokens,
                          uint32_t heads, uint32_t hd, uint32_t bias_stride) {
    const uint32_t d = heads * hd;
    const uint32_t cols = 3 * d;
    for (uint32_t row = blockIdx.x; row < batch * tokens; row += gridDim.x) {
        const uint32_t b = row / tokens;
        const uint32_t n = row % tokens;
        for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x) {
            const uint32_t s = c / d;
            const uint32_t rem = c % d;
            const uint32_t h = rem / hd;
            const uint32_t e = rem % hd;
            const float v = ld(qkv, (size_t)row * cols + c) + ld(bias, (size_t)b * bias_stride + c);
            const size_t o = ((((size_t)s * batch + b) * heads + h) * tokens + n) * hd + e;
            st(out, o, v);
        }
    }
}

// split_qkv over packs (head_dim a multiple of the pack); one block per token row.
template <typename T>
__device__ void split_qkv_v(const T *qkv, const T *bias, T *out, uint32_t batch, uint32_t tokens,
                            uint32_t heads, uint32_t hd, uint32_t bias_stride) {
    constexpr int N = Pack<T>::N;
    const uint32_t d = heads * hd;
    const uint32_t cols = 3 * d;
    for (uint32_t row = blockIdx.x; row < batch * tokens; row += gridDim.x) {
        const uint32_t b = row / tokens;
        const uint32_t n = row % tokens;
        for (uint32_t c = threadIdx.x * N; c < cols; c += blockDim.x * N) {
            const uint32_t s = c / d;
            const uint32_t rem = c % d;
            const uint32_t h = rem / hd;
            const uint32_t e = rem % hd;
            const Pack<T> a = ldp(qkv, (size_t)row * cols + c);
            const Pack<T> bb = ldp(bias, (size_t)b * bias_stride + c);
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < N; ++k) o.v[k] = cast<T>(f(a.v[k]) + f(bb.v[k]));
            stp(out, ((((size_t)s * batch + b) * heads + h) * tokens + n) * hd + e, o);
        }
    }
}

// ctx: [batch, heads, tokens, hd] → out: [batch, tokens, heads·hd]. One block per token row.
template <typename T>
__device__ void merge_heads(const T *ctx, T *out, uint32_t batch, uint32_t tokens, uint32_t heads,
                            uint32_t hd) {
    const uint32_t d = heads * hd;
    for (uint32_t row = blockIdx.x; row < batch * tokens; row += gridDim.x) {
        const uint32_t b = row / tokens;
        const uint32_t n = row % tokens;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            const uint32_t h = c / hd;
            const uint32_t e = c % hd;
            out[(size_t)row * d + c] = ctx[(((size_t)b * heads + h) * tokens + n) * hd + e];
        }
    }
}

// merge_heads over packs (head_dim a multiple of the pack); one block per token row.
template <typename T>
__device__ void merge_heads_v(const T *ctx, T *out, uint32_t batch, uint32_t tokens,
                              uint32_t heads, uint32_t hd) {
    constexpr int N = Pack<T>::N;
    const uint32_t d = heads * hd;
    for (uint32_t row = blockIdx.x; row < batch * tokens; row += gridDim.x) {
        const uint32_t b = row / tokens;
        const uint32_t n = row % tokens;
        for (uint32_t c = threadIdx.x * N; c < d; c += blockDim.x * N) {
            const uint32_t h = c / hd;
            const uint32_t e = c % hd;
            stp(out, (size_t)row * d + c, ldp(ctx, (((size_t)b * heads + h) * tokens + n) * hd + e));
        }
    }
}

// softmax_bias scalar, over packs (_v) and with the row in registers (_r); split_qkv and
// merge_heads scalar and over packs.
#define INSTANTIATE_SOFTMAX(T, SFX, NAME, CALL)                                                    \
    extern "C" __global__ void NAME##_##SFX(const T *s, const T *b, T *out, uint32_t rows,         \
                                            uint32_t cols, uint32_t bias_rows, float scale) {      \
        CALL(s, b, out, rows, cols, bias_rows, scale);                                             \
    }
#define INSTANTIATE_SPLIT(T, SFX, NAME)                                                            \
    extern "C" __global__ void NAME##_##SFX(const T *qkv, const T *b, T *out, uint32_t batch,      \
                                            uint32_t tokens, uint32_t heads, uint32_t hd,          \
                                            uint32_t bias_stride) {                                \
        NAME<T>(qkv, b, out, batch, tokens, heads, hd, bias_stride);                               \
    }
#define INSTANTIATE_MERGE(T, SFX, NAME)                                                            \
    extern "C" __global__ void NAME##_##SFX(const T *ctx, T *out, uint32_t batch, uint32_t tokens, \
                                            uint32_t heads, uint32_t hd) {                         \
        NAME<T>(ctx, out, batch, tokens, heads, hd);                                               \
    }
#define INSTANTIATE_ATTENTION(T, SFX)                                                              \
    INSTANTIATE_SOFTMAX(T, SFX, softmax_bias, softmax_bias<T>)                                     \
    INSTANTIATE_SOFTMAX(T, SFX, softmax_bias_v, softmax_bias_v<T>)                                 \
    INSTANTIATE_SOFTMAX(T, SFX, softmax_bias_r, (softmax_bias_r<T, SOFTMAX_PACKS>))                \
    INSTANTIATE_SPLIT(T, SFX, split_qkv)                                                           \
    INSTANTIATE_SPLIT(T, SFX, split_qkv_v)                                                         \
    INSTANTIATE_MERGE(T, SFX, merge_heads)                                                         \
    INSTANTIATE_MERGE(T, SFX, merge_heads_v)

FOR_EACH_DTYPE(INSTANTIATE_ATTENTION)
