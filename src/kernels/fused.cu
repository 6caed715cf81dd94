// Fused kernels for the DiffiT block (see src/kernels/mod.rs for what each computes and why).
// Every kernel reads and writes the run dtype and computes in f32. Compiled to PTX by build.rs
// with the same nvcc as candle's kernels; loaded at run time as a custom module.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <type_traits>

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

template <typename T>
__device__ __forceinline__ Pack<T> zero_pack() {
    Pack<T> z;
#pragma unroll
    for (int k = 0; k < Pack<T>::N; ++k) z.v[k] = cast<T>(0.0f);
    return z;
}

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

// layer_norm_v with the row in registers (cols ≤ 32 · LN_PACKS packs): every load of a row is
// issued at once, then two reductions and one write, instead of three passes over memory
// each waiting on its loads (on an H100 the pass version moved 1.8 of ~3 TB/s).
constexpr int LN_PACKS = 8;
template <typename T>
__device__ void layer_norm_r(const T *x, T *out, uint32_t rows, uint32_t cols, float eps) {
    constexpr int N = Pack<T>::N;
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        float v[LN_PACKS][N];
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < LN_PACKS; ++k) {
            const uint32_t p = lane + 32 * k;
            if (p < packs) {
                const Pack<T> a = ldp(xr, (size_t)p * N);
#pragma unroll
                for (int e = 0; e < N; ++e) v[k][e] = f(a.v[e]);
            } else {
#pragma unroll
                for (int e = 0; e < N; ++e) v[k][e] = 0.0f;
            }
        }
#pragma unroll
        for (int k = 0; k < LN_PACKS; ++k)
#pragma unroll
            for (int e = 0; e < N; ++e) sum += v[k][e];
        const float mean = warp_sum(sum) / (float)cols;
        float sq = 0.0f;
#pragma unroll
        for (int k = 0; k < LN_PACKS; ++k) {
            if (lane + 32 * k < packs) {
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    const float d = v[k][e] - mean;
                    sq += d * d;
                }
            }
        }
        const float rstd = rsqrtf(warp_sum(sq) / (float)cols + eps);
        T *orow = out + (size_t)r * cols;
#pragma unroll
        for (int k = 0; k < LN_PACKS; ++k) {
            const uint32_t p = lane + 32 * k;
            if (p < packs) {
                Pack<T> o;
#pragma unroll
                for (int e = 0; e < N; ++e) o.v[e] = cast<T>((v[k][e] - mean) * rstd);
                stp(orow, (size_t)p * N, o);
            }
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
        if (yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)w) {
            stp(out, (size_t)p * N, ldp(x, (((size_t)b * h + yy) * w + xx) * c + ch));
        } else {
            stp(out, (size_t)p * N, zero_pack<T>());
        }
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

// ---- Fused attention (flash attention on mma.sync tensor cores) ----
//
// One CTA of 4 warps takes BQ query rows (16 or 32 a warp) of one (sample, head); key/value
// blocks and the matching bias tile stream through a cp.async ring in shared memory (with
// tiling b at N = 256, half the key blocks are in flight from the start). Q·Kᵀ and P·V are
// m16n8k16 mma.sync with f32 accumulators; scores, the softmax and the output stay in
// registers (online softmax: running row maximum and sum, the output rescaled when the maximum
// grows), so no score ever reaches memory and the keys are read once. Inputs come straight from
// the qkv matmul output [B·N, 3·D]; the per-sample bias is added to q on load and, because each
// softmax row sums to one, added to the output for v (softmax(s)·(V + 1·bᵥᵀ) = softmax(s)·V + bᵥ);
// k's bias shifts a whole score row by q·bₖ, which the softmax ignores, so it is not read. The
// relative-position bias comes from its [H·N, N] table (copied into the ring in 16-byte rows
// where N is a multiple of 8, read per element otherwise); the output is written merged,
// [B·N, D], through shared memory in 16-byte rows. The head dim is zero-padded to HDP (a
// multiple of 16). Needs hd a multiple of 8 and 16-byte aligned rows (the launcher checks;
// otherwise the unfused ops run).

constexpr float LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared without a register round trip; src_bytes = 0 writes zeros.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8×8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// 2^x in one MUFU instruction (exp2f adds denormal handling the softmax does not need);
// 2^−∞ = 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Two floats as one register of two T (the lower column in the low half).
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// d += a·b, m16n8k16, a row-major 16×16, b column-major 16×8, f32 accumulators.
template <typename T> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Tiling of attention_fused: MT m-tiles of 16 query rows a warp (with two, each K/V fragment
// read from shared memory feeds twice the mma work, at the cost of registers), 4 warps, key
// blocks of BK rows in a ring of STAGES. The launcher (cuda.rs, AttTiling) mirrors these.
constexpr int ATT_WARPS = 4;

template <typename T, int HDP, int MT, int BK, int STAGES>
__device__ void attention_fused(const T *qkv, const T *sbias, const T *abias, T *out, uint32_t batch,
                                uint32_t tokens, uint32_t heads, uint32_t hd, uint32_t sb_stride,
                                float scale) {
    constexpr int BQ = ATT_WARPS * 16 * MT;
    constexpr int LD = HDP + 8;        // row stride: 16-byte multiple, ldmatrix rows on distinct banks
    constexpr int BLD = BK + 8;        // bias tile row stride: a warp's pair reads on distinct banks
    constexpr int KSTEPS = HDP / 16;   // k-steps of Q·Kᵀ
    constexpr int SN = BK / 8;         // score n-tiles a key block
    constexpr int ON = HDP / 8;        // output n-tiles
    constexpr int CPR = HDP / 8;       // 16-byte chunks a padded row
    constexpr int STAGE = 2 * BK * LD + BQ * BLD;  // elements of a stage: K, V, bias tile
    extern __shared__ __align__(16) unsigned char smem[];
    T *qs = reinterpret_cast<T *>(smem);   // [BQ][LD]; at the end each warp stages its output rows
    T *ring = qs + BQ * LD;                // [STAGES][K [BK][LD], V [BK][LD], bias [BQ][BLD]]

    const uint32_t b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BQ;
    const uint32_t d = heads * hd, row_len = 3 * d;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t g = lane / 4, t = lane % 4;  // mma fragment row group and column pair
    const uint32_t chunks = hd / 8;             // 16-byte chunks of a real row
    const T *sb = sbias + (size_t)b * sb_stride;
    const T *x = qkv + (size_t)b * tokens * row_len + h * hd;  // this sample's q columns of head h
    const T *bias_rows = abias + (size_t)h * tokens * tokens;   // this head's [N, N] table

    // cp.async never writes the padding columns [hd, HDP) of Q, K and V: zero them once.
    // (Loops run over the padded row, CPR chunks, and skip the padding: dividing by a
    // compile-time CPR costs a multiply where a run-time hd / 8 costs a long division.)
    if (chunks < CPR) {
        for (uint32_t i = tid; i < (BQ + 2 * STAGES * BK) * CPR; i += ATT_WARPS * 32) {
            const uint32_t r = i / CPR, c = i % CPR;
            T *row = r < BQ ? qs + r * LD : ring + ((r - BQ) / (2 * BK)) * STAGE + ((r - BQ) % (2 * BK)) * LD;
            if (c >= chunks) stp(row, (size_t)c * 8, zero_pack<T>());
        }
    }
    // Q rows without their bias (added to the fragments), zero past the sequence.
    for (uint32_t i = tid; i < BQ * CPR; i += ATT_WARPS * 32) {
        const uint32_t r = i / CPR, c = i % CPR;
        const bool ok = q0 + r < tokens;
        if (c < chunks)
            cp_async16(qs + r * LD + c * 8, x + (size_t)(ok ? q0 + r : 0) * row_len + c * 8, ok ? 16 : 0);
    }
    // Key block blk (K, V and the bias tile) into its stage, as one cp.async group; past the last
    // block an empty group, so "all but the newest STAGES − 1 groups done" means "block blk is in".
    const uint32_t blocks = (tokens + BK - 1) / BK;
    const bool bias_async = tokens % 8 == 0;  // table rows 16-byte aligned
    // Fixed per-thread copy slots, so a block's copy is a few adds a chunk: K/V rows are split
    // into KV_SLOTS 16-byte slots (those past hd idle), bias rows into BK / 8.
    constexpr int KV_SLOTS = CPR <= 4 ? 4 : CPR <= 8 ? 8 : 16;
    constexpr int KV_RPP = ATT_WARPS * 32 / KV_SLOTS;  // rows a pass
    constexpr int B_SLOTS = BK / 8;
    constexpr int B_RPP = ATT_WARPS * 32 / B_SLOTS;
    static_assert(BK % KV_RPP == 0 && BQ % B_RPP == 0, "copy passes must tile the blocks");
    const uint32_t kv_c = tid % KV_SLOTS, kv_r = tid / KV_SLOTS;
    const uint32_t b_c = tid % B_SLOTS, b_r = tid / B_SLOTS;
    auto load_block = [&](uint32_t blk) {
        if (blk < blocks) {
            T *ks = ring + (blk % STAGES) * STAGE;
            T *bs = ks + 2 * BK * LD;
            const uint32_t kb = blk * BK;
            if (kv_c < chunks) {
#pragma unroll
                for (int p = 0; p < 2 * BK / KV_RPP; ++p) {
                    const uint32_t which = p / (BK / KV_RPP);  // 0: K, 1: V
                    const uint32_t r = kv_r + (p % (BK / KV_RPP)) * KV_RPP;
                    const bool ok = kb + r < tokens;
                    const T *src = x + (size_t)(ok ? kb + r : 0) * row_len + (1 + which) * d + kv_c * 8;
                    cp_async16(ks + (which * BK + r) * LD + kv_c * 8, src, ok ? 16 : 0);
                }
            }
            if (bias_async) {
#pragma unroll
                for (int p = 0; p < BQ / B_RPP; ++p) {
                    const uint32_t r = b_r + p * B_RPP;
                    const bool ok = q0 + r < tokens && kb + b_c * 8 < tokens;
                    const T *src = bias_rows + (ok ? (size_t)(q0 + r) * tokens + kb + b_c * 8 : 0);
                    cp_async16(bs + r * BLD + b_c * 8, src, ok ? 16 : 0);
                }
            } else {
                for (uint32_t i = tid; i < BQ * BK; i += ATT_WARPS * 32) {
                    const uint32_t r = i / BK, c = i % BK;
                    const bool ok = q0 + r < tokens && kb + c < tokens;
                    bs[r * BLD + c] = ok ? bias_rows[(size_t)(q0 + r) * tokens + kb + c] : cast<T>(0.0f);
                }
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int st = 0; st < STAGES; ++st) load_block(st);  // Q travels in block 0's group

    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const uint32_t wr = warp * 16 * MT;  // the warp's first row in the tile
    uint32_t qf[MT][KSTEPS][4];
    {
        const T *qb = sb + h * hd;  // q's per-sample bias, added here in f32 then rounded
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const uint32_t c0 = kk * 16 + 2 * t, c1 = c0 + 8;
            const float b00 = c0 < hd ? ld(qb, c0) : 0.0f, b01 = c0 + 1 < hd ? ld(qb, c0 + 1) : 0.0f;
            const float b10 = c1 < hd ? ld(qb, c1) : 0.0f, b11 = c1 + 1 < hd ? ld(qb, c1 + 1) : 0.0f;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t r[4];
                ldmatrix_x4(r, qs + (wr + mt * 16 + lane % 8 + (lane / 8) % 2 * 8) * LD + kk * 16 + lane / 16 * 8);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const T *e = reinterpret_cast<const T *>(&r[i]);
                    const float lo = i < 2 ? b00 : b10, hi = i < 2 ? b01 : b11;
                    qf[mt][kk][i] = pack2<T>(f(e[0]) + lo, f(e[1]) + hi);
                }
            }
        }
    }

    float o[MT][ON][4];
    float m[MT][2], l[MT][2];  // rows g and g + 8 of each m-tile: running maximum and sum
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int n = 0; n < ON; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
    }

    for (uint32_t blk = 0; blk < blocks; ++blk) {
        cp_async_wait<STAGES - 1>();
        __syncthreads();
        const T *ks = ring + (blk % STAGES) * STAGE;
        const T *vs = ks + BK * LD;
        const T *bs = vs + BK * LD;
        const uint32_t kb = blk * BK;

        float s[MT][SN][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int j = 0; j < SN; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
            for (int j = 0; j < SN; j += 2) {
                uint32_t kf[4];
                ldmatrix_x4(kf, ks + (j * 8 + lane / 16 * 8 + lane % 8) * LD + kk * 16 + (lane / 8) % 2 * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(s[mt][j], qf[mt][kk], kf[0], kf[1]);
                    mma16816<T>(s[mt][j + 1], qf[mt][kk], kf[2], kf[3]);
                }
            }
        }

        // Logits and the rows' new maxima (the four lanes of a row group share a row);
        // keys past the sequence (only in the last block) get −∞.
        auto logits = [&](auto masked) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const T *b0 = bs + (wr + mt * 16 + g) * BLD, *b1 = b0 + 8 * BLD;
#pragma unroll
                for (int j = 0; j < SN; ++j) {
                    const uint32_t c = j * 8 + 2 * t;
                    const uint32_t w0 = *reinterpret_cast<const uint32_t *>(b0 + c);
                    const uint32_t w1 = *reinterpret_cast<const uint32_t *>(b1 + c);
                    const T *e0 = reinterpret_cast<const T *>(&w0), *e1 = reinterpret_cast<const T *>(&w1);
                    s[mt][j][0] = fmaf(s[mt][j][0], scale, f(e0[0]));
                    s[mt][j][1] = fmaf(s[mt][j][1], scale, f(e0[1]));
                    s[mt][j][2] = fmaf(s[mt][j][2], scale, f(e1[0]));
                    s[mt][j][3] = fmaf(s[mt][j][3], scale, f(e1[1]));
                    if (decltype(masked)::value) {
                        if (kb + c >= tokens) s[mt][j][0] = s[mt][j][2] = -INFINITY;
                        if (kb + c + 1 >= tokens) s[mt][j][1] = s[mt][j][3] = -INFINITY;
                    }
                }
            }
        };
        if (kb + BK <= tokens) {
            logits(std::false_type{});
        } else {
            logits(std::true_type{});
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            float mx0 = m[mt][0], mx1 = m[mt][1];
#pragma unroll
            for (int j = 0; j < SN; ++j) {
                mx0 = fmaxf(mx0, fmaxf(s[mt][j][0], s[mt][j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][j][2], s[mt][j][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
            // Every block holds a key of the sequence, so the maxima are finite from here on.
            const float a0 = fast_exp2((m[mt][0] - mx0) * LOG2E), a1 = fast_exp2((m[mt][1] - mx1) * LOG2E);
            const float n0 = -mx0 * LOG2E, n1 = -mx1 * LOG2E;  // exp(s − max) = 2^(s·log2 e − max·log2 e)
            m[mt][0] = mx0;
            m[mt][1] = mx1;
            l[mt][0] *= a0;
            l[mt][1] *= a1;
#pragma unroll
            for (int n = 0; n < ON; ++n) {
                o[mt][n][0] *= a0;
                o[mt][n][1] *= a0;
                o[mt][n][2] *= a1;
                o[mt][n][3] *= a1;
            }
#pragma unroll
            for (int j = 0; j < SN; ++j) {
                s[mt][j][0] = fast_exp2(fmaf(s[mt][j][0], LOG2E, n0));
                s[mt][j][1] = fast_exp2(fmaf(s[mt][j][1], LOG2E, n0));
                s[mt][j][2] = fast_exp2(fmaf(s[mt][j][2], LOG2E, n1));
                s[mt][j][3] = fast_exp2(fmaf(s[mt][j][3], LOG2E, n1));
                l[mt][0] += s[mt][j][0] + s[mt][j][1];
                l[mt][1] += s[mt][j][2] + s[mt][j][3];
            }
        }

        // O += P·V: two score n-tiles are one A fragment of 16 keys.
#pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {
            uint32_t pf[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                pf[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                pf[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                pf[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                pf[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
#pragma unroll
            for (int n = 0; n < ON; n += 2) {
                uint32_t vf[4];
                ldmatrix_x4_trans(vf, vs + (kk * 16 + (lane / 8) % 2 * 8 + lane % 8) * LD + (n + lane / 16) * 8);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma16816<T>(o[mt][n], pf[mt], vf[0], vf[1]);
                    mma16816<T>(o[mt][n + 1], pf[mt], vf[2], vf[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with this stage: refill it
        load_block(blk + STAGES);
    }
    cp_async_wait<0>();

    // Normalise, add v's bias, stage the warp's rows in its own rows of qs, write 16 bytes a lane.
    const T *vb = sb + 2 * d + h * hd;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        float inv[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float sum = l[mt][hr];
            sum += __shfl_xor_sync(FULL_MASK, sum, 1);
            sum += __shfl_xor_sync(FULL_MASK, sum, 2);
            inv[hr] = 1.0f / sum;
        }
#pragma unroll
        for (int n = 0; n < ON; ++n) {
            const uint32_t c = n * 8 + 2 * t;
            const float v0 = c < hd ? ld(vb, c) : 0.0f, v1 = c + 1 < hd ? ld(vb, c + 1) : 0.0f;
            T *row = qs + (wr + mt * 16 + g) * LD + c;
            *reinterpret_cast<uint32_t *>(row) = pack2<T>(o[mt][n][0] * inv[0] + v0, o[mt][n][1] * inv[0] + v1);
            *reinterpret_cast<uint32_t *>(row + 8 * LD) =
                pack2<T>(o[mt][n][2] * inv[1] + v0, o[mt][n][3] * inv[1] + v1);
        }
    }
    __syncwarp();
    for (uint32_t i = lane; i < 16 * MT * CPR; i += 32) {
        const uint32_t r = i / CPR, c = i % CPR;
        const uint32_t q = q0 + wr + r;
        if (q < tokens && c < chunks) stp(out, ((size_t)b * tokens + q) * d + h * hd + c * 8, ldp(qs, (size_t)(wr + r) * LD + c * 8));
    }
}

// ---- VAE decoder, channels-last ([B, H, W, C]) ----

// A 3×3 convolution (padding 1) with at most 4 output channels, straight from the
// channels-last input: out[p, co] = bias[co] + Σ_{tap, c} x[p + tap, c] · w[co, tap·C + c].
// The VAE's conv_out (128 → 3 channels at full resolution) as im2col + matmul wrote and read
// nine copies of its input and ran cuBLAS's slow unaligned path (N = 3): 1.5 ms a chunk of 8
// on an H100. One thread a pixel; the weights sit in shared memory as [9·C] float4 (one
// broadcast load feeds all four outputs). C a multiple of the pack; 9·C·16 bytes of shared memory.
template <typename T>
__device__ void conv3x3_cout4_v(const T *x, const T *w, const T *bias, T *out, uint32_t batch,
                                uint32_t h, uint32_t wd, uint32_t c, uint32_t cout) {
    constexpr int N = Pack<T>::N;
    extern __shared__ float4 wsm[];
    const uint32_t k = 9 * c;
    for (uint32_t i = threadIdx.x; i < k; i += blockDim.x) {
        float4 v;
        v.x = cout > 0 ? ld(w, i) : 0.0f;
        v.y = cout > 1 ? ld(w, (size_t)k + i) : 0.0f;
        v.z = cout > 2 ? ld(w, 2 * (size_t)k + i) : 0.0f;
        v.w = cout > 3 ? ld(w, 3 * (size_t)k + i) : 0.0f;
        wsm[i] = v;
    }
    __syncthreads();
    const uint32_t pixels = batch * h * wd;
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < pixels; p += gridDim.x * blockDim.x) {
        const uint32_t xo = p % wd, yo = (p / wd) % h, b = p / (wd * h);
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int tap = 0; tap < 9; ++tap) {
            const int yy = (int)yo + tap / 3 - 1, xx = (int)xo + tap % 3 - 1;
            if (yy < 0 || xx < 0 || yy >= (int)h || xx >= (int)wd) continue;
            const T *src = x + (((size_t)b * h + yy) * wd + xx) * c;
            const float4 *wt = wsm + tap * c;
            for (uint32_t q = 0; q < c; q += N) {
                const Pack<T> a = ldp(src, q);
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    const float v = f(a.v[e]);
                    const float4 ww = wt[q + e];
                    acc[0] += v * ww.x;
                    acc[1] += v * ww.y;
                    acc[2] += v * ww.z;
                    acc[3] += v * ww.w;
                }
            }
        }
        // A constant trip count keeps acc in registers (a run-time index would put it in local memory).
#pragma unroll
        for (uint32_t co = 0; co < 4; ++co)
            if (co < cout) st(out, (size_t)p * cout + co, acc[co] + ld(bias, co));
    }
}

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
        if (yy >= 0 && yy < (int)ho && xx >= 0 && xx < (int)wo) {
            stp(out, (size_t)p * N, ldp(x, (((size_t)b * hi + yy / up) * wi + xx / up) * c + ch));
        } else {
            stp(out, (size_t)p * N, zero_pack<T>());
        }
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

// gn_moments over 16-byte packs (C a multiple of the pack): a thread sums one pack of
// channels over every `lanes`-th pixel of the tile, per element, then adds them into its
// channels' groups. The scalar version (one 2-byte load a thread a pixel, 32-pixel tiles)
// moved ~1 TB/s on an H100, 10 % of a VAE decode.
template <typename T>
__device__ void gn_moments_v(const T *x, float *s1, float *s2, uint32_t hw, uint32_t c,
                             uint32_t groups, uint32_t tile) {
    constexpr int N = Pack<T>::N;
    extern __shared__ float sh[];  // [2·groups]
    for (uint32_t i = threadIdx.x; i < 2 * groups; i += blockDim.x) sh[i] = 0.0f;
    __syncthreads();
    const uint32_t b = blockIdx.y;
    const uint32_t p0 = blockIdx.x * tile;
    const uint32_t p1 = min(p0 + tile, hw);
    const uint32_t cg = c / groups, packs = c / N;
    const uint32_t lanes = max(1u, blockDim.x / packs);
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
        for (uint32_t p = p0 + lane; p < p1; p += lanes) {
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
            const uint32_t g = (q * N + e) / cg;
            atomicAdd(&sh[g], a[e]);
            atomicAdd(&sh[groups + g], sq[e]);
        }
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
    extern "C" __global__ void conv3x3_cout4_v_##SFX(const T *x, const T *w, const T *b, T *out,   \
                                                     uint32_t batch, uint32_t h, uint32_t wd,      \
                                                     uint32_t c, uint32_t cout) {                  \
        conv3x3_cout4_v<T>(x, w, b, out, batch, h, wd, c, cout);                                   \
    }                                                                                              \
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
    extern "C" __global__ void gn_moments_v_##SFX(const T *x, float *s1, float *s2, uint32_t hw,   \
                                                  uint32_t c, uint32_t groups, uint32_t tile) {    \
        gn_moments_v<T>(x, s1, s2, hw, c, groups, tile);                                           \
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
    }                                                                                              \
    extern "C" __global__ void layer_norm_r_##SFX(const T *x, T *out, uint32_t rows,               \
                                                  uint32_t cols, float eps) {                      \
        layer_norm_r<T>(x, out, rows, cols, eps);                                                  \
    }

INSTANTIATE_R(float, f32)
INSTANTIATE_R(__nv_bfloat16, bf16)
INSTANTIATE_R(__half, f16)

// The tiling by padded head dim (AttTiling in cuda.rs mirrors it): "b" = 32 query rows a warp,
// key blocks of 32 in four stages (two CTAs an SM); "a" = 16 rows a warp, key blocks of 64 in
// two stages, where "b" would not fit the registers. On an H100 at B = 64, hd 72: b 0.339 ms,
// a 0.340 ms, but b gave the faster steps (docs/perf.md v0.12).
#define INSTANTIATE_ATT(T, SFX, HDP, NAME, MT, BK, STAGES, MINB)                                   \
    extern "C" __global__ void __launch_bounds__(128, MINB) attention_##HDP##NAME##_##SFX(        \
        const T *qkv, const T *sb, const T *ab, T *out, uint32_t batch, uint32_t tokens,           \
        uint32_t heads, uint32_t hd, uint32_t sb_stride, float scale) {                            \
        attention_fused<T, HDP, MT, BK, STAGES>(qkv, sb, ab, out, batch, tokens, heads, hd,        \
                                                sb_stride, scale);                                 \
    }
#define INSTANTIATE_ATT_ALL(T, SFX)                                                                \
    INSTANTIATE_ATT(T, SFX, 32, b, 2, 32, 4, 2)                                                    \
    INSTANTIATE_ATT(T, SFX, 64, b, 2, 32, 4, 2)                                                    \
    INSTANTIATE_ATT(T, SFX, 80, b, 2, 32, 4, 2)                                                    \
    INSTANTIATE_ATT(T, SFX, 128, a, 1, 64, 2, 2)

INSTANTIATE_ATT_ALL(__nv_bfloat16, bf16)
INSTANTIATE_ATT_ALL(__half, f16)

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
