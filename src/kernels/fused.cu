// Fused kernels for the DiffiT block (see src/kernels/mod.rs for what each computes and why).
// Every kernel reads and writes the run dtype and computes in f32. Compiled to PTX by build.rs
// with the same nvcc as candle's kernels; loaded at run time as a custom module.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <mma.h>

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const __half *p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void st(__half *p, size_t i, float v) { p[i] = __float2half(v); }

// GELU, tanh approximation (what the network's MLP uses).
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;
    const float k1 = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// 16 bytes of T: one 128-bit load or store (8 bf16/f16 or 4 f32). The vectorised kernels
// (suffix _v) need every row length a multiple of PACK<T> and 16-byte aligned pointers; the
// launcher checks and falls back to the scalar kernels otherwise.
template <typename T>
struct alignas(16) Pack {
    static constexpr int N = 16 / sizeof(T);
    T v[N];
};

template <typename T>
__device__ __forceinline__ Pack<T> ldp(const T *p, size_t i) {
    return *reinterpret_cast<const Pack<T> *>(p + i);
}

template <typename T>
__device__ __forceinline__ void stp(T *p, size_t i, const Pack<T> &v) {
    *reinterpret_cast<Pack<T> *>(p + i) = v;
}

__device__ __forceinline__ float f(float v) { return v; }
__device__ __forceinline__ float f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float f(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T cast(float v);
template <> __device__ __forceinline__ float cast<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 cast<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half cast<__half>(float v) { return __float2half(v); }

// bias_act over packs: the flat tensor in 16-byte packs, grid-stride.
template <typename T, bool GELU, bool RES>
__device__ void bias_act_v(const T *y, const T *bias, const T *res, T *out, uint32_t rows,
                           uint32_t cols, uint32_t rows_per_group) {
    constexpr int N = Pack<T>::N;
    const uint32_t packs = rows * (cols / N);
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < packs; p += gridDim.x * blockDim.x) {
        const size_t i = (size_t)p * N;
        const uint32_t r = (uint32_t)(i / cols);
        const uint32_t c = (uint32_t)(i - (size_t)r * cols);
        const Pack<T> a = ldp(y, i);
        const Pack<T> b = ldp(bias, (size_t)(r / rows_per_group) * cols + c);
        Pack<T> o;
        if (RES) {
            const Pack<T> q = ldp(res, i);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = f(a.v[k]) + f(b.v[k]);
                if (GELU) v = gelu_tanh(v);
                o.v[k] = cast<T>(v + f(q.v[k]));
            }
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                float v = f(a.v[k]) + f(b.v[k]);
                if (GELU) v = gelu_tanh(v);
                o.v[k] = cast<T>(v);
            }
        }
        stp(out, i, o);
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
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(FULL_MASK, m, o);
            const float l2 = __shfl_xor_sync(FULL_MASK, l, o);
            const float nm = fmaxf(m, m2);
            const float a = (m == -INFINITY) ? 0.0f : l * __expf(m - nm);
            const float b = (m2 == -INFINITY) ? 0.0f : l2 * __expf(m2 - nm);
            l = a + b;
            m = nm;
        }
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

// out[r, c] = act(y[r, c] + bias[r / rows_per_group, c]) (+ res[r, c])
// Grid: x over column tiles, y strides over rows.
template <typename T, bool GELU, bool RES>
__device__ void bias_act(const T *y, const T *bias, const T *res, T *out, uint32_t rows,
                         uint32_t cols, uint32_t rows_per_group) {
    for (uint32_t r = blockIdx.y; r < rows; r += gridDim.y) {
        const T *b = bias + (size_t)(r / rows_per_group) * cols;
        const size_t base = (size_t)r * cols;
        for (uint32_t c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
            float v = ld(y, base + c) + ld(b, c);
            if (GELU) v = gelu_tanh(v);
            if (RES) v += ld(res, base + c);
            st(out, base + c, v);
        }
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
        for (int o = 16; o > 0; o >>= 1) {
            const float m2 = __shfl_xor_sync(FULL_MASK, m, o);
            const float l2 = __shfl_xor_sync(FULL_MASK, l, o);
            const float nm = fmaxf(m, m2);
            // A lane that saw no column (cols < 32) holds m = -inf, l = 0: it adds nothing.
            const float a = (m == -INFINITY) ? 0.0f : l * __expf(m - nm);
            const float b = (m2 == -INFINITY) ? 0.0f : l2 * __expf(m2 - nm);
            l = a + b;
            m = nm;
        }
        const float inv = 1.0f / l;
        T *orow = out + (size_t)r * cols;
        for (uint32_t c = lane; c < cols; c += 32) {
            st(orow, c, __expf(ld(sr, c) * scale + ld(br, c) - m) * inv);
        }
    }
}

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

#define INSTANTIATE(T, SFX)                                                                        \
    extern "C" __global__ void bias_add_##SFX(const T *y, const T *b, T *out, uint32_t rows,       \
                                              uint32_t cols, uint32_t rpg) {                      \
        bias_act<T, false, false>(y, b, nullptr, out, rows, cols, rpg);                            \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_##SFX(const T *y, const T *b, T *out, uint32_t rows,      \
                                               uint32_t cols, uint32_t rpg) {                     \
        bias_act<T, true, false>(y, b, nullptr, out, rows, cols, rpg);                             \
    }                                                                                              \
    extern "C" __global__ void bias_add_res_##SFX(const T *y, const T *b, const T *res, T *out,    \
                                                  uint32_t rows, uint32_t cols, uint32_t rpg) {   \
        bias_act<T, false, true>(y, b, res, out, rows, cols, rpg);                                 \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_res_##SFX(const T *y, const T *b, const T *res, T *out,   \
                                                   uint32_t rows, uint32_t cols, uint32_t rpg) {  \
        bias_act<T, true, true>(y, b, res, out, rows, cols, rpg);                                  \
    }                                                                                              \
    extern "C" __global__ void softmax_bias_##SFX(const T *s, const T *b, T *out, uint32_t rows,   \
                                                  uint32_t cols, uint32_t bias_rows,              \
                                                  float scale) {                                   \
        softmax_bias<T>(s, b, out, rows, cols, bias_rows, scale);                                  \
    }                                                                                              \
    extern "C" __global__ void layer_norm_##SFX(const T *x, T *out, uint32_t rows, uint32_t cols,  \
                                                float eps) {                                       \
        layer_norm<T>(x, out, rows, cols, eps);                                                    \
    }                                                                                              \
    extern "C" __global__ void split_qkv_##SFX(const T *qkv, const T *b, T *out, uint32_t batch,   \
                                               uint32_t tokens, uint32_t heads, uint32_t hd,       \
                                               uint32_t bias_stride) {                             \
        split_qkv<T>(qkv, b, out, batch, tokens, heads, hd, bias_stride);                          \
    }                                                                                              \
    extern "C" __global__ void merge_heads_##SFX(const T *ctx, T *out, uint32_t batch,             \
                                                 uint32_t tokens, uint32_t heads, uint32_t hd) {   \
        merge_heads<T>(ctx, out, batch, tokens, heads, hd);                                        \
    }

// softmax_bias with the row held in registers (at most MAXP packs per lane), so scores are
// read from memory once.
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
        const Pack<T> a = ldp(x, i);
        const Pack<T> gm = ldp(gamma, ch0);
        const Pack<T> bt = ldp(beta, ch0);
        // Walk the pack's channels through their groups without a division per element.
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
        stp(out, i, o);
    }
}


// Nearest ×2 upsampling + 3×3 convolution as four 2×2 convolutions of the low-resolution input
// (one per output phase py, px): out [4, B·H·W, 4·C], phase (py·2 + px), row (b, y, x), column
// (dy·2 + dx)·C + c = x[b, y + py + dy − 1, x + px + dx − 1, c], zero outside. With the phase
// weights (3×3 taps summed into 2×2, built at load) this is 2.25× fewer FLOPs and im2col bytes
// than the 3×3 convolution over the upsampled image.
template <typename T>
__device__ void im2col_up2_phases_v(const T *x, T *out, uint32_t batch, uint32_t h, uint32_t w,
                                    uint32_t c) {
    constexpr int N = Pack<T>::N;
    const uint32_t cp = c / N;
    const uint32_t row_packs = 4 * cp;
    const uint32_t m_total = batch * h * w;
    const uint32_t phase_packs = m_total * row_packs;
    const uint32_t total = 4 * phase_packs;
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < total; p += gridDim.x * blockDim.x) {
        const uint32_t phase = p / phase_packs;
        const uint32_t rem = p - phase * phase_packs;
        const uint32_t m = rem / row_packs;
        const uint32_t r = rem - m * row_packs;
        const uint32_t tap = r / cp;
        const uint32_t ch = (r - tap * cp) * N;
        const uint32_t xo = m % w;
        const uint32_t t = m / w;
        const uint32_t yo = t % h;
        const uint32_t b = t / h;
        const int yy = (int)yo + (int)(phase / 2) + (int)(tap / 2) - 1;
        const int xx = (int)xo + (int)(phase % 2) + (int)(tap % 2) - 1;
        Pack<T> v;
        if (yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)w) {
            v = ldp(x, (((size_t)b * h + yy) * w + xx) * c + ch);
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) v.v[k] = cast<T>(0.0f);
        }
        stp(out, (size_t)p * N, v);
    }
}

// y: [4, B·H·W, C] (the phase GEMM outputs) → out [B, 2H, 2W, C] with the bias added.
template <typename T>
__device__ void pixel_shuffle_bias_v(const T *y, const T *bias, T *out, uint32_t batch, uint32_t h,
                                     uint32_t w, uint32_t c) {
    constexpr int N = Pack<T>::N;
    const uint32_t cp = c / N;
    const uint32_t wo = 2 * w, ho = 2 * h;
    const uint32_t total = batch * ho * wo * cp;
    const uint32_t m_total = batch * h * w;
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < total; p += gridDim.x * blockDim.x) {
        const uint32_t q = p / cp;
        const uint32_t co = (p - q * cp) * N;
        const uint32_t X = q % wo;
        const uint32_t t = q / wo;
        const uint32_t Y = t % ho;
        const uint32_t b = t / ho;
        const uint32_t phase = (Y % 2) * 2 + (X % 2);
        const uint32_t m = (b * h + Y / 2) * w + X / 2;
        const Pack<T> a = ldp(y, ((size_t)phase * m_total + m) * c + co);
        const Pack<T> bb = ldp(bias, co);
        Pack<T> o;
#pragma unroll
        for (int k = 0; k < N; ++k) o.v[k] = cast<T>(f(a.v[k]) + f(bb.v[k]));
        stp(out, (size_t)p * N, o);
    }
}

// ---- Fused attention (tensor cores through WMMA) ----
//
// One CTA of 4 warps (16 query rows each) takes BQ = 64 query rows of one (sample, head); keys
// stream through shared memory in blocks of BK = 64. q, k and v are read straight from the qkv
// matmul output [B·N, 3·D] with the per-sample bias added on load (no head split pass), the
// relative-position bias is read from its [H·N, N] table, scores live in shared memory only,
// and the output is written merged, [B·N, D]. Two passes over the keys: the first finds each
// row's maximum, the second accumulates exp(s − max)·V in tensor-core fragments, so the
// output never needs rescaling. In the softmax steps two lanes share a row (32 keys each).
// The head dim is zero-padded to HDP (a multiple of 16). Needs hd a multiple of 8 and
// 16-byte aligned rows (the launcher checks; otherwise the unfused ops run).

template <typename T> struct WmmaType;
template <> struct WmmaType<__nv_bfloat16> { using type = __nv_bfloat16; };
template <> struct WmmaType<__half> { using type = __half; };

constexpr int ATT_BQ = 64;
constexpr int ATT_BK = 64;
constexpr int ATT_SLD = ATT_BK + 4;  // score row stride (floats): fewer bank conflicts

// Rows [r0, r0 + ROWS) of q (s = 0), k (1) or v (2) of head h into dst [ROWS][LD] (LD = HDP + 8
// elements: padded against shared-memory bank conflicts), per-sample bias added, zero beyond
// the sequence and beyond hd. Every load is issued before the first store (one memory latency
// per tile, not one per pack).
template <typename T, int HDP, int ROWS, int THREADS>
__device__ __forceinline__ void attention_load_tile(T *dst, const T *qkv, const T *sbs, uint32_t b,
                                                    uint32_t h, uint32_t s, uint32_t r0,
                                                    uint32_t tokens, uint32_t d, uint32_t hd) {
    constexpr int N8 = Pack<T>::N;
    constexpr int LD = HDP + 8;
    constexpr int PPR = HDP / N8;
    constexpr int TOTAL = ROWS * PPR;
    constexpr int ITER = (TOTAL + THREADS - 1) / THREADS;
    const uint32_t row_len = 3 * d;
    Pack<T> a[ITER];
    bool ok[ITER];
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
        const uint32_t i = threadIdx.x + it * THREADS;
        const uint32_t r = i / PPR;
        const uint32_t e = (i % PPR) * N8;
        ok[it] = i < TOTAL && r0 + r < tokens && e < hd;
        if (ok[it]) {
            const size_t col = (size_t)s * d + h * hd + e;
            a[it] = ldp(qkv, ((size_t)b * tokens + r0 + r) * row_len + col);
        }
    }
#pragma unroll
    for (int it = 0; it < ITER; ++it) {
        const uint32_t i = threadIdx.x + it * THREADS;
        if (i < TOTAL) {
            const uint32_t r = i / PPR;
            const uint32_t e = (i % PPR) * N8;
            const Pack<T> bias = ldp(sbs, (size_t)s * HDP + e);
            Pack<T> o;
#pragma unroll
            for (int k = 0; k < N8; ++k) o.v[k] = cast<T>(ok[it] ? f(a[it].v[k]) + f(bias.v[k]) : 0.0f);
            stp(dst, (size_t)r * LD + e, o);
        }
    }
}

template <typename T, int HDP>
__device__ void attention_fused(const T *qkv, const T *sbias, const T *abias, T *out, uint32_t batch,
                                uint32_t tokens, uint32_t heads, uint32_t hd, uint32_t sb_stride,
                                float scale) {
    using namespace nvcuda;
    using W = typename WmmaType<T>::type;
    constexpr int N8 = 8;  // elements per 16-byte pack
    extern __shared__ __align__(32) unsigned char smem[];
    constexpr int LD = HDP + 8;                                 // tile row stride
    T *qs = reinterpret_cast<T *>(smem);                        // [BQ][LD]
    T *ks = qs + ATT_BQ * LD;                                   // [BK][LD]
    T *vs = ks + ATT_BK * LD;                                   // [BK][LD]
    float *ss = reinterpret_cast<float *>(vs + ATT_BK * LD);    // [BQ][SLD] scores, then P
    float *row_m = ss + ATT_BQ * ATT_SLD;                       // [BQ]
    float *row_l = row_m + ATT_BQ;                              // [BQ]
    T *sbs = reinterpret_cast<T *>(row_l + ATT_BQ);             // [3][HDP] this head's q/k/v bias
    float *os = reinterpret_cast<float *>(ks);                  // [BQ][HDP] at the end

    const uint32_t b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * ATT_BQ;
    const uint32_t d = heads * hd;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t nthreads = blockDim.x;
    const T *sb = sbias + (size_t)b * sb_stride;

    auto load_q = [&]() {
        attention_load_tile<T, HDP, ATT_BQ, 128>(qs, qkv, sbs, b, h, 0, q0, tokens, d, hd);
    };
    auto load_k = [&](uint32_t kb) {
        attention_load_tile<T, HDP, ATT_BK, 128>(ks, qkv, sbs, b, h, 1, kb, tokens, d, hd);
    };
    auto load_v = [&](uint32_t kb) {
        attention_load_tile<T, HDP, ATT_BK, 128>(vs, qkv, sbs, b, h, 2, kb, tokens, d, hd);
    };

    const uint32_t wr = warp * 16;  // this warp's first query row in the tile
    // S = Q · Kᵀ for the warp's 16 rows of the current key block, into ss.
    auto scores = [&]() {
        for (int j = 0; j < ATT_BK / 16; ++j) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int kk = 0; kk < HDP / 16; ++kk) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::col_major> fb;
                wmma::load_matrix_sync(fa, reinterpret_cast<const W *>(qs + wr * LD + kk * 16), LD);
                wmma::load_matrix_sync(fb, reinterpret_cast<const W *>(ks + j * 16 * LD + kk * 16), LD);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(ss + wr * ATT_SLD + j * 16, acc, ATT_SLD, wmma::mem_row_major);
        }
        __syncwarp();
    };
    // This lane's row (two lanes per row) and its 32 keys of the block.
    const uint32_t my_row = wr + lane / 2;
    const uint32_t half = lane % 2;
    const uint32_t q = q0 + my_row;
    const T *brow = abias + ((size_t)h * tokens + (q < tokens ? q : 0)) * tokens;
    // The bias row is read in 16-byte packs where the block is whole and aligned (scalar
    // 2-byte loads from 16 rows per warp instruction wasted most of each memory sector).
    const bool bias_packs = tokens % N8 == 0;
    auto logits = [&](uint32_t kb, float v[32]) {
        const float4 *srow = reinterpret_cast<const float4 *>(ss + my_row * ATT_SLD + half * 32);
#pragma unroll
        for (int c = 0; c < 32; c += 4) {
            const float4 x = srow[c / 4];
            v[c] = x.x * scale;
            v[c + 1] = x.y * scale;
            v[c + 2] = x.z * scale;
            v[c + 3] = x.w * scale;
        }
        const uint32_t k0 = kb + half * 32;
        if (bias_packs && k0 + 32 <= tokens) {
#pragma unroll
            for (int c = 0; c < 32; c += N8) {
                const Pack<T> bp = ldp(brow, k0 + c);
#pragma unroll
                for (int k = 0; k < N8; ++k) v[c + k] += f(bp.v[k]);
            }
        } else {
#pragma unroll
            for (int c = 0; c < 32; ++c) v[c] = k0 + c < tokens ? v[c] + ld(brow, k0 + c) : -INFINITY;
        }
    };

    // The per-sample bias of this head's q, k and v columns, once per CTA.
    for (uint32_t i = tid; i < 3 * HDP; i += nthreads) {
        const uint32_t sidx = i / HDP, e = i % HDP;
        sbs[i] = e < hd ? sb[(size_t)sidx * d + h * hd + e] : cast<T>(0.0f);
    }
    __syncthreads();
    load_q();
    __syncthreads();

    // Pass 1: each row's maximum logit.
    float m = -INFINITY;
    for (uint32_t kb = 0; kb < tokens; kb += ATT_BK) {
        load_k(kb);
        __syncthreads();
        scores();
        float v[32];
        logits(kb, v);
#pragma unroll
        for (int c = 0; c < 32; ++c) m = fmaxf(m, v[c]);
        __syncthreads();
    }
    m = fmaxf(m, __shfl_xor_sync(FULL_MASK, m, 1));

    // Pass 2: O = Σ exp(logit − max) · V, l = Σ exp(logit − max).
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> o[HDP / 16];
#pragma unroll
    for (int e = 0; e < HDP / 16; ++e) wmma::fill_fragment(o[e], 0.0f);
    float l = 0.0f;
    for (uint32_t kb = 0; kb < tokens; kb += ATT_BK) {
        load_k(kb);
        load_v(kb);
        __syncthreads();
        scores();
        float v[32];
        logits(kb, v);
#pragma unroll
        for (int c = 0; c < 32; ++c) {
            v[c] = __expf(v[c] - m);
            l += v[c];
        }
        __syncwarp();
        // P over the row's scores (T, row stride 2·SLD elements).
        T *prow = reinterpret_cast<T *>(ss + my_row * ATT_SLD) + half * 32;
#pragma unroll
        for (int c = 0; c < 32; c += N8) {
            Pack<T> pk;
#pragma unroll
            for (int k = 0; k < N8; ++k) pk.v[k] = cast<T>(v[c + k]);
            stp(prow, c, pk);
        }
        __syncwarp();
#pragma unroll
        for (int kk = 0; kk < ATT_BK / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, W, wmma::row_major> fa;
            wmma::load_matrix_sync(
                fa, reinterpret_cast<const W *>(reinterpret_cast<const T *>(ss + wr * ATT_SLD) + kk * 16),
                2 * ATT_SLD);
#pragma unroll
            for (int e = 0; e < HDP / 16; ++e) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, W, wmma::row_major> fb;
                wmma::load_matrix_sync(fb, reinterpret_cast<const W *>(vs + kk * 16 * LD + e * 16), LD);
                wmma::mma_sync(o[e], fa, fb, o[e]);
            }
        }
        __syncthreads();
    }
    l += __shfl_xor_sync(FULL_MASK, l, 1);
    if (half == 0) row_l[my_row] = l;
    // Stage O through shared memory (over the K/V/S tiles, no longer needed), then write.
#pragma unroll
    for (int e = 0; e < HDP / 16; ++e)
        wmma::store_matrix_sync(os + wr * HDP + e * 16, o[e], HDP, wmma::mem_row_major);
    __syncthreads();
    for (uint32_t i = tid; i < ATT_BQ * hd; i += nthreads) {
        const uint32_t r = i / hd, e = i % hd;
        const uint32_t qq = q0 + r;
        if (qq < tokens) st(out, ((size_t)b * tokens + qq) * d + h * hd + e, os[r * HDP + e] / row_l[r]);
    }
}

// ---- VAE decoder, channels-last ([B, H, W, C]) ----

// out: [B·Ho·Wo, 9·C] with Ho = Hi·up, Wo = Wi·up: column (ky·3 + kx)·C + c of row (b, y, x)
// holds the nearest-upsampled input at (y + ky − 1, x + kx − 1), zero outside (padding 1), so
// a 3×3 convolution is one matmul with the weight as [Cout, 3·3·C]. In packs of 16 bytes
// (C a multiple of the pack); the launcher checks that the element count fits 32 bits.
template <typename T>
__device__ void im2col3x3_v(const T *x, T *out, uint32_t batch, uint32_t hi, uint32_t wi,
                            uint32_t c, uint32_t up) {
    constexpr int N = Pack<T>::N;
    const uint32_t ho = hi * up, wo = wi * up;
    const uint32_t cp = c / N;             // packs per tap
    const uint32_t row_packs = 9 * cp;     // packs per output row
    const uint32_t total = batch * ho * wo * row_packs;
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < total; p += gridDim.x * blockDim.x) {
        const uint32_t m = p / row_packs;
        const uint32_t r = p - m * row_packs;
        const uint32_t tap = r / cp;
        const uint32_t ch = (r - tap * cp) * N;
        const uint32_t xo = m % wo;
        const uint32_t t = m / wo;
        const uint32_t yo = t % ho;
        const uint32_t b = t / ho;
        const int yy = (int)yo + (int)(tap / 3) - 1;
        const int xx = (int)xo + (int)(tap % 3) - 1;
        Pack<T> v;
        if (yy >= 0 && yy < (int)ho && xx >= 0 && xx < (int)wo) {
            v = ldp(x, (((size_t)b * hi + yy / up) * wi + xx / up) * c + ch);
        } else {
#pragma unroll
            for (int k = 0; k < N; ++k) v.v[k] = cast<T>(0.0f);
        }
        stp(out, (size_t)p * N, v);
    }
}

// The same one element at a time (any C).
template <typename T>
__device__ void im2col3x3(const T *x, T *out, uint32_t batch, uint32_t hi, uint32_t wi, uint32_t c,
                          uint32_t up) {
    const uint32_t ho = hi * up, wo = wi * up;
    const size_t row = 9 * (size_t)c;
    const size_t total = (size_t)batch * ho * wo * row;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / row;
        const uint32_t r = (uint32_t)(i - m * row);
        const uint32_t tap = r / c;
        const uint32_t ch = r % c;
        const uint32_t xo = (uint32_t)(m % wo);
        const size_t t = m / wo;
        const uint32_t yo = (uint32_t)(t % ho);
        const uint32_t b = (uint32_t)(t / ho);
        const int yy = (int)yo + (int)(tap / 3) - 1;
        const int xx = (int)xo + (int)(tap % 3) - 1;
        float v = 0.0f;
        if (yy >= 0 && yy < (int)ho && xx >= 0 && xx < (int)wo)
            v = ld(x, (((size_t)b * hi + yy / up) * wi + xx / up) * c + ch);
        st(out, i, v);
    }
}

// GroupNorm statistics over x [B, HW, C] (channels-last) in one pass: blockIdx.y = sample,
// blockIdx.x = a tile of pixels; each thread owns channels and sums (x − x0) and (x − x0)² over
// its tile, the block reduces per group in shared memory and adds to s1/s2[b·G + g]. x0 is the
// group's first value (pixel 0, first channel): shifting by it keeps E[(x−x0)²] − E[x−x0]² from
// cancelling when the mean is large against the spread.
template <typename T>
__device__ void gn_moments(const T *x, float *s1, float *s2, uint32_t hw, uint32_t c,
                           uint32_t groups, uint32_t tile) {
    extern __shared__ float sh[];  // [2·groups]
    for (uint32_t i = threadIdx.x; i < 2 * groups; i += blockDim.x) sh[i] = 0.0f;
    __syncthreads();
    const uint32_t b = blockIdx.y;
    const uint32_t p0 = blockIdx.x * tile;
    const uint32_t p1 = min(p0 + tile, hw);
    const uint32_t cg = c / groups;
    for (uint32_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
        const uint32_t g = ch / cg;
        const float x0 = ld(x, (size_t)b * hw * c + g * cg);
        float a = 0.0f, q = 0.0f;
        for (uint32_t p = p0; p < p1; ++p) {
            const float v = ld(x, ((size_t)b * hw + p) * c + ch) - x0;
            a += v;
            q += v * v;
        }
        atomicAdd(&sh[g], a);
        atomicAdd(&sh[groups + g], q);
    }
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < groups; i += blockDim.x) {
        atomicAdd(&s1[b * groups + i], sh[i]);
        atomicAdd(&s2[b * groups + i], sh[groups + i]);
    }
}

// Shifted moments → mean and 1/std per (sample, group), in place (s1 ← mean, s2 ← 1/std), so
// the apply passes do no division or square root per element.
template <typename T>
__device__ void gn_finalize(const T *x, float *s1, float *s2, uint32_t batch, uint32_t hw,
                            uint32_t c, uint32_t groups, float eps) {
    const uint32_t cg = c / groups;
    const float count = (float)hw * (float)cg;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < batch * groups;
         i += gridDim.x * blockDim.x) {
        const uint32_t b = i / groups, g = i % groups;
        const float x0 = ld(x, (size_t)b * hw * c + g * cg);
        const float m1 = s1[i] / count;
        const float var = fmaxf(s2[i] / count - m1 * m1, 0.0f);
        s1[i] = x0 + m1;
        s2[i] = rsqrtf(var + eps);
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

#define INSTANTIATE_V(T, SFX)                                                                      \
    extern "C" __global__ void bias_add_v_##SFX(const T *y, const T *b, T *out, uint32_t rows,     \
                                                uint32_t cols, uint32_t rpg) {                    \
        bias_act_v<T, false, false>(y, b, nullptr, out, rows, cols, rpg);                          \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_v_##SFX(const T *y, const T *b, T *out, uint32_t rows,    \
                                                 uint32_t cols, uint32_t rpg) {                   \
        bias_act_v<T, true, false>(y, b, nullptr, out, rows, cols, rpg);                           \
    }                                                                                              \
    extern "C" __global__ void bias_add_res_v_##SFX(const T *y, const T *b, const T *res, T *out,  \
                                                    uint32_t rows, uint32_t cols, uint32_t rpg) { \
        bias_act_v<T, false, true>(y, b, res, out, rows, cols, rpg);                               \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_res_v_##SFX(const T *y, const T *b, const T *res, T *out, \
                                                     uint32_t rows, uint32_t cols,                 \
                                                     uint32_t rpg) {                               \
        bias_act_v<T, true, true>(y, b, res, out, rows, cols, rpg);                                \
    }                                                                                              \
    extern "C" __global__ void softmax_bias_v_##SFX(const T *s, const T *b, T *out, uint32_t rows, \
                                                    uint32_t cols, uint32_t bias_rows,            \
                                                    float scale) {                                 \
        softmax_bias_v<T>(s, b, out, rows, cols, bias_rows, scale);                                \
    }                                                                                              \
    extern "C" __global__ void split_qkv_v_##SFX(const T *qkv, const T *b, T *out, uint32_t batch, \
                                                 uint32_t tokens, uint32_t heads, uint32_t hd,     \
                                                 uint32_t bias_stride) {                           \
        split_qkv_v<T>(qkv, b, out, batch, tokens, heads, hd, bias_stride);                        \
    }

INSTANTIATE_V(float, f32)
INSTANTIATE_V(__nv_bfloat16, bf16)
INSTANTIATE_V(__half, f16)

#define INSTANTIATE_VAE(T, SFX)                                                                    \
    extern "C" __global__ void im2col3x3_v_##SFX(const T *x, T *out, uint32_t batch, uint32_t hi,  \
                                                 uint32_t wi, uint32_t c, uint32_t up) {           \
        im2col3x3_v<T>(x, out, batch, hi, wi, c, up);                                              \
    }                                                                                              \
    extern "C" __global__ void im2col3x3_##SFX(const T *x, T *out, uint32_t batch, uint32_t hi,    \
                                               uint32_t wi, uint32_t c, uint32_t up) {             \
        im2col3x3<T>(x, out, batch, hi, wi, c, up);                                                \
    }                                                                                              \
    extern "C" __global__ void gn_moments_##SFX(const T *x, float *s1, float *s2, uint32_t hw,     \
                                                uint32_t c, uint32_t groups, uint32_t tile) {      \
        gn_moments<T>(x, s1, s2, hw, c, groups, tile);                                             \
    }                                                                                              \
    extern "C" __global__ void gn_finalize_##SFX(const T *x, float *s1, float *s2, uint32_t batch, \
                                                 uint32_t hw, uint32_t c, uint32_t groups,         \
                                                 float eps) {                                      \
        gn_finalize<T>(x, s1, s2, batch, hw, c, groups, eps);                                      \
    }                                                                                              \
    extern "C" __global__ void gn_apply_##SFX(const T *x, const float *sums, const float *sq,      \
                                              const T *gamma, const T *beta, T *out,               \
                                              uint32_t batch, uint32_t hw, uint32_t c,             \
                                              uint32_t groups, float eps) {                        \
        gn_apply<T, false>(x, sums, sq, gamma, beta, out, batch, hw, c, groups, eps);              \
    }                                                                                              \
    extern "C" __global__ void gn_apply_silu_##SFX(const T *x, const float *sums, const float *sq, \
                                                   const T *gamma, const T *beta, T *out,          \
                                                   uint32_t batch, uint32_t hw, uint32_t c,        \
                                                   uint32_t groups, float eps) {                   \
        gn_apply<T, true>(x, sums, sq, gamma, beta, out, batch, hw, c, groups, eps);               \
    }

INSTANTIATE_VAE(float, f32)
INSTANTIATE_VAE(__nv_bfloat16, bf16)
INSTANTIATE_VAE(__half, f16)

#define INSTANTIATE_R(T, SFX)                                                                      \
    extern "C" __global__ void softmax_bias_r_##SFX(const T *s, const T *b, T *out, uint32_t rows, \
                                                    uint32_t cols, uint32_t bias_rows,            \
                                                    float scale) {                                 \
        softmax_bias_r<T, 4>(s, b, out, rows, cols, bias_rows, scale);                             \
    }                                                                                              \
    extern "C" __global__ void merge_heads_v_##SFX(const T *ctx, T *out, uint32_t batch,           \
                                                   uint32_t tokens, uint32_t heads, uint32_t hd) { \
        merge_heads_v<T>(ctx, out, batch, tokens, heads, hd);                                      \
    }                                                                                              \
    extern "C" __global__ void layer_norm_v_##SFX(const T *x, T *out, uint32_t rows,               \
                                                  uint32_t cols, float eps) {                      \
        layer_norm_v<T>(x, out, rows, cols, eps);                                                  \
    }

INSTANTIATE_R(float, f32)
INSTANTIATE_R(__nv_bfloat16, bf16)
INSTANTIATE_R(__half, f16)

#define INSTANTIATE_ATT(T, SFX, HDP)                                                               \
    extern "C" __global__ void __launch_bounds__(128, 3) attention_##HDP##_##SFX(                                            \
        const T *qkv, const T *sb, const T *ab, T *out, uint32_t batch, uint32_t tokens,            \
        uint32_t heads, uint32_t hd, uint32_t sb_stride, float scale) {                            \
        attention_fused<T, HDP>(qkv, sb, ab, out, batch, tokens, heads, hd, sb_stride, scale);     \
    }

INSTANTIATE_ATT(__nv_bfloat16, bf16, 32)
INSTANTIATE_ATT(__nv_bfloat16, bf16, 64)
INSTANTIATE_ATT(__nv_bfloat16, bf16, 80)
INSTANTIATE_ATT(__nv_bfloat16, bf16, 128)
INSTANTIATE_ATT(__half, f16, 32)
INSTANTIATE_ATT(__half, f16, 64)
INSTANTIATE_ATT(__half, f16, 80)
INSTANTIATE_ATT(__half, f16, 128)

#define INSTANTIATE_GNV(T, SFX)                                                                    \
    extern "C" __global__ void gn_apply_v_##SFX(const T *x, const float *sums, const float *sq,    \
                                                const T *gamma, const T *beta, T *out,             \
                                                uint32_t batch, uint32_t hw, uint32_t c,           \
                                                uint32_t groups, float eps) {                      \
        gn_apply_v<T, false>(x, sums, sq, gamma, beta, out, batch, hw, c, groups, eps);            \
    }                                                                                              \
    extern "C" __global__ void gn_apply_silu_v_##SFX(const T *x, const float *sums,                \
                                                     const float *sq, const T *gamma,              \
                                                     const T *beta, T *out, uint32_t batch,        \
                                                     uint32_t hw, uint32_t c, uint32_t groups,     \
                                                     float eps) {                                  \
        gn_apply_v<T, true>(x, sums, sq, gamma, beta, out, batch, hw, c, groups, eps);             \
    }

INSTANTIATE_GNV(float, f32)
INSTANTIATE_GNV(__nv_bfloat16, bf16)
INSTANTIATE_GNV(__half, f16)

#define INSTANTIATE_UP(T, SFX)                                                                     \
    extern "C" __global__ void im2col_up2_phases_v_##SFX(const T *x, T *out, uint32_t batch,       \
                                                         uint32_t h, uint32_t w, uint32_t c) {     \
        im2col_up2_phases_v<T>(x, out, batch, h, w, c);                                            \
    }                                                                                              \
    extern "C" __global__ void pixel_shuffle_bias_v_##SFX(const T *y, const T *b, T *out,          \
                                                          uint32_t batch, uint32_t h, uint32_t w,  \
                                                          uint32_t c) {                            \
        pixel_shuffle_bias_v<T>(y, b, out, batch, h, w, c);                                        \
    }

INSTANTIATE_UP(float, f32)
INSTANTIATE_UP(__nv_bfloat16, bf16)
INSTANTIATE_UP(__half, f16)


INSTANTIATE(float, f32)
INSTANTIATE(__nv_bfloat16, bf16)
INSTANTIATE(__half, f16)
