// FP8 (e4m3) activations for the FP8 linear layers: per-row (per-token) dynamic quantisation of
// a matmul input, alone or with the LayerNorm before it folded in, and the scale epilogue used
// when cuBLASLt cannot apply per-row/per-column scales itself. What each op computes and why:
// mod.rs beside this file. Compiled to PTX by build.rs; loaded at run time as a custom module.

#include "../common.cuh"
#include <cuda_fp8.h>

#if !defined(LN_PACKS) || !defined(FP8_WIDE_PACKS) || !defined(ROW_BLOCK)
#error "LN_PACKS, FP8_WIDE_PACKS and ROW_BLOCK come from src/kernels/tiling.rs through build.rs"
#endif

// The largest finite e4m3 value: a row's absolute maximum maps onto it.
#define E4M3_MAX 448.0f

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

__device__ __forceinline__ uint8_t to_e4m3(float v) {
    return (uint8_t)__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
}

// A row's scale (amax / 448, stored for the matmul) and the factor that quantises it (448 / amax).
// An all-zero row keeps scale 1: its values quantise to zero either way.
__device__ __forceinline__ float row_factor(float amax, float *scale_out) {
    const float scale = amax > 0.0f ? amax / E4M3_MAX : 1.0f;
    *scale_out = scale;
    return amax > 0.0f ? E4M3_MAX / amax : 1.0f;
}

// q[r, :] = e4m3(x[r, :] · 448 / amax_r), scale[r] = amax_r / 448, where x is the row itself
// (LN = false) or its affine-free LayerNorm (LN = true; mean and variance in two passes, as the
// reference computes them). One warp a row, scalar loads: any row length.
template <typename T, bool LN>
__device__ void quant_rows(const T *x, uint8_t *q, float *scale, uint32_t rows, uint32_t cols,
                           float eps) {
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        float mean = 0.0f, rstd = 1.0f;
        if (LN) {
            float sum = 0.0f;
            for (uint32_t c = lane; c < cols; c += 32) sum += ld(xr, c);
            mean = warp_sum(sum) / (float)cols;
            float sq = 0.0f;
            for (uint32_t c = lane; c < cols; c += 32) {
                const float d = ld(xr, c) - mean;
                sq += d * d;
            }
            rstd = rsqrtf(warp_sum(sq) / (float)cols + eps);
        }
        float amax = 0.0f;
        for (uint32_t c = lane; c < cols; c += 32) {
            const float v = LN ? (ld(xr, c) - mean) * rstd : ld(xr, c);
            amax = fmaxf(amax, fabsf(v));
        }
        float s;
        const float inv = row_factor(warp_max(amax), &s);
        if (lane == 0) scale[r] = s;
        uint8_t *qr = q + (size_t)r * cols;
        for (uint32_t c = lane; c < cols; c += 32) {
            const float v = LN ? (ld(xr, c) - mean) * rstd : ld(xr, c);
            qr[c] = to_e4m3(v * inv);
        }
    }
}

// Eight e4m3 values, the output of one 16-byte bf16/f16 pack.
struct alignas(8) Q8 {
    uint8_t v[8];
};

// quant_rows over 16-byte packs of a 2-byte T (cols a multiple of 8), the row held in registers
// (cols ≤ 32 · PACKS · 8): every load of a row is issued at once, then the reductions, then one
// 8-byte store a pack. The row stays as loaded bits and each pass widens (and normalises) it
// again (`widen`): the same arithmetic each time, so the same values.
template <typename T, bool LN, int PACKS>
__device__ void quant_rows_r(const T *x, uint8_t *q, float *scale, uint32_t rows, uint32_t cols,
                             float eps) {
    constexpr int N = Pack<T>::N;
    static_assert(N == 8, "the register path is for 2-byte types");
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        uint4 v[PACKS];
        load_row_packs<T>(v, xr, lane, packs);
        float mean = 0.0f, rstd = 1.0f;
        if (LN) row_moments<T>(v, lane, packs, cols, eps, mean, rstd);
        auto value = [&](int k, int e) { return LN ? (widen<T>(v[k], e) - mean) * rstd : widen<T>(v[k], e); };
        float amax = 0.0f;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            if (lane + 32 * k < packs) {
#pragma unroll
                for (int e = 0; e < N; ++e) amax = fmaxf(amax, fabsf(value(k, e)));
            }
        }
        float s;
        const float inv = row_factor(warp_max(amax), &s);
        if (lane == 0) scale[r] = s;
        uint8_t *qr = q + (size_t)r * cols;
#pragma unroll
        for (int k = 0; k < PACKS; ++k) {
            const uint32_t p = lane + 32 * k;
            if (p < packs) {
                Q8 o;
#pragma unroll
                for (int e = 0; e < N; ++e) o.v[e] = to_e4m3(value(k, e) * inv);
                *reinterpret_cast<Q8 *>(qr + (size_t)p * N) = o;
            }
        }
    }
}

// quant_rows (no LayerNorm) over 16-byte packs of a 2-byte T for rows too long for registers:
// the amax pass, then the quantising pass over the same row (from cache).
template <typename T>
__device__ void quant_rows_v(const T *x, uint8_t *q, float *scale, uint32_t rows, uint32_t cols) {
    constexpr int N = Pack<T>::N;
    static_assert(N == 8, "the pack path is for 2-byte types");
    const uint32_t warps = blockDim.x / 32;
    const uint32_t lane = threadIdx.x % 32;
    const uint32_t packs = cols / N;
    for (uint32_t r = blockIdx.x * warps + threadIdx.x / 32; r < rows; r += gridDim.x * warps) {
        const T *xr = x + (size_t)r * cols;
        float amax = 0.0f;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(xr, (size_t)p * N);
#pragma unroll
            for (int e = 0; e < N; ++e) amax = fmaxf(amax, fabsf(f(a.v[e])));
        }
        float s;
        const float inv = row_factor(warp_max(amax), &s);
        if (lane == 0) scale[r] = s;
        uint8_t *qr = q + (size_t)r * cols;
        for (uint32_t p = lane; p < packs; p += 32) {
            const Pack<T> a = ldp(xr, (size_t)p * N);
            Q8 o;
#pragma unroll
            for (int e = 0; e < N; ++e) o.v[e] = to_e4m3(f(a.v[e]) * inv);
            *reinterpret_cast<Q8 *>(qr + (size_t)p * N) = o;
        }
    }
}

// q[r, c] = e4m3(w[r, c] / scale[r]): a weight at load, its scales from its rows' maxima.
template <typename T>
__device__ void quantize_scaled(const T *w, const float *scale, uint8_t *q, uint32_t rows,
                                uint32_t cols) {
    const size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        q[i] = to_e4m3(ld(w, i) / scale[i / cols]);
    }
}

// GELU, tanh approximation (the MLP's), as linear.cu computes it.
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;
    const float k1 = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
}

// out[r, c] = act(y[r, c] · xs[r] · ws[c] + bias[c]) (+ res[r, c]): the scales and epilogue of
// an FP8 matmul whose product y was computed unscaled (when cuBLASLt offers no per-row/column
// scale mode). flags: bit 0 GELU, bit 1 add res (else res is not read). Grid-stride.
template <typename T>
__device__ void scale_epilogue(const T *y, const float *xs, const float *ws, const T *bias,
                               const T *res, T *out, uint32_t rows, uint32_t cols, uint32_t flags) {
    const bool gelu = flags & 1, add_res = flags & 2;
    const size_t n = (size_t)rows * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        const uint32_t r = (uint32_t)(i / cols);
        const uint32_t c = (uint32_t)(i - (size_t)r * cols);
        float v = ld(y, i) * xs[r] * ws[c] + ld(bias, c);
        if (gelu) v = gelu_tanh(v);
        if (add_res) v += ld(res, i);
        st(out, i, v);
    }
}

// scale_epilogue over 16-byte packs of a 2-byte T (cols a multiple of 8).
template <typename T>
__device__ void scale_epilogue_v(const T *y, const float *xs, const float *ws, const T *bias,
                                 const T *res, T *out, uint32_t rows, uint32_t cols,
                                 uint32_t flags) {
    constexpr int N = Pack<T>::N;
    const bool gelu = flags & 1, add_res = flags & 2;
    const size_t packs = (size_t)rows * (cols / N);
    for (size_t p = blockIdx.x * (size_t)blockDim.x + threadIdx.x; p < packs;
         p += (size_t)gridDim.x * blockDim.x) {
        const size_t i = p * N;
        const uint32_t r = (uint32_t)(i / cols);
        const uint32_t c = (uint32_t)(i - (size_t)r * cols);
        const Pack<T> a = ldp(y, i);
        const Pack<T> b = ldp(bias, c);
        const float sr = xs[r];
        Pack<T> q;
        if (add_res) q = ldp(res, i);
        Pack<T> o;
#pragma unroll
        for (int e = 0; e < N; ++e) {
            float v = f(a.v[e]) * sr * ws[c + e] + f(b.v[e]);
            if (gelu) v = gelu_tanh(v);
            if (add_res) v += f(q.v[e]);
            o.v[e] = cast<T>(v);
        }
        stp(out, i, o);
    }
}

#define INSTANTIATE_FP8(T, SFX)                                                                    \
    extern "C" __global__ void fp8_quantize_scaled_##SFX(const T *w, const float *scale,           \
                                                         uint8_t *q, uint32_t rows,                \
                                                         uint32_t cols) {                          \
        quantize_scaled<T>(w, scale, q, rows, cols);                                               \
    }                                                                                              \
    extern "C" __global__ void fp8_quant_##SFX(const T *x, uint8_t *q, float *s, uint32_t rows,    \
                                               uint32_t cols, float eps) {                         \
        quant_rows<T, false>(x, q, s, rows, cols, eps);                                            \
    }                                                                                              \
    extern "C" __global__ void fp8_ln_quant_##SFX(const T *x, uint8_t *q, float *s, uint32_t rows, \
                                                  uint32_t cols, float eps) {                      \
        quant_rows<T, true>(x, q, s, rows, cols, eps);                                             \
    }                                                                                              \
    extern "C" __global__ void fp8_scale_epilogue_##SFX(const T *y, const float *xs,               \
                                                        const float *ws, const T *bias,            \
                                                        const T *res, T *out, uint32_t rows,       \
                                                        uint32_t cols, uint32_t flags) {           \
        scale_epilogue<T>(y, xs, ws, bias, res, out, rows, cols, flags);                            \
    }

#define INSTANTIATE_FP8_PACKED(T, SFX)                                                             \
    extern "C" __global__ void __launch_bounds__(ROW_BLOCK, 4)                                     \
        fp8_quant_r_##SFX(const T *x, uint8_t *q, float *s, uint32_t rows, uint32_t cols,          \
                          float eps) {                                                             \
        quant_rows_r<T, false, LN_PACKS>(x, q, s, rows, cols, eps);                                \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(ROW_BLOCK, 4)                                     \
        fp8_ln_quant_r_##SFX(const T *x, uint8_t *q, float *s, uint32_t rows, uint32_t cols,       \
                             float eps) {                                                          \
        quant_rows_r<T, true, LN_PACKS>(x, q, s, rows, cols, eps);                                 \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(ROW_BLOCK, 2)                                     \
        fp8_quant_rw_##SFX(const T *x, uint8_t *q, float *s, uint32_t rows, uint32_t cols,         \
                           float eps) {                                                            \
        quant_rows_r<T, false, FP8_WIDE_PACKS>(x, q, s, rows, cols, eps);                          \
    }                                                                                              \
    extern "C" __global__ void fp8_scale_epilogue_v_##SFX(const T *y, const float *xs,             \
                                                          const float *ws, const T *bias,          \
                                                          const T *res, T *out, uint32_t rows,     \
                                                          uint32_t cols, uint32_t flags) {         \
        scale_epilogue_v<T>(y, xs, ws, bias, res, out, rows, cols, flags);                         \
    }                                                                                              \
    extern "C" __global__ void fp8_quant_v_##SFX(const T *x, uint8_t *q, float *s, uint32_t rows,  \
                                                 uint32_t cols, float eps) {                       \
        quant_rows_v<T>(x, q, s, rows, cols);                                                      \
    }

FOR_EACH_DTYPE(INSTANTIATE_FP8)
INSTANTIATE_FP8_PACKED(__nv_bfloat16, bf16)
INSTANTIATE_FP8_PACKED(__half, f16)
