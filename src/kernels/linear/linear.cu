// The linear layers' epilogue as a pass: bias, GELU and residual add over a matmul output.
// What each op computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the
// same nvcc as candle's kernels; loaded at run time as a custom module.

#include "../common.cuh"

// GELU, tanh approximation (what the network's MLP uses).
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k0 = 0.7978845608028654f;
    const float k1 = 0.044715f;
    return 0.5f * x * (1.0f + tanhf(k0 * (x + k1 * x * x * x)));
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

// out = act(y + bias) without (_add, _gelu) and with (_add_res, _gelu_res) the residual, each
// scalar and over packs (_v).
#define INSTANTIATE_BIAS_ACT(T, SFX, KERNEL, V)                                                    \
    extern "C" __global__ void bias_add##V##_##SFX(const T *y, const T *b, T *out, uint32_t rows,  \
                                                   uint32_t cols, uint32_t rpg) {                  \
        KERNEL<T, false, false>(y, b, nullptr, out, rows, cols, rpg);                              \
    }                                                                                              \
    extern "C" __global__ void bias_gelu##V##_##SFX(const T *y, const T *b, T *out, uint32_t rows, \
                                                    uint32_t cols, uint32_t rpg) {                 \
        KERNEL<T, true, false>(y, b, nullptr, out, rows, cols, rpg);                               \
    }                                                                                              \
    extern "C" __global__ void bias_add_res##V##_##SFX(const T *y, const T *b, const T *res,       \
                                                       T *out, uint32_t rows, uint32_t cols,       \
                                                       uint32_t rpg) {                             \
        KERNEL<T, false, true>(y, b, res, out, rows, cols, rpg);                                   \
    }                                                                                              \
    extern "C" __global__ void bias_gelu_res##V##_##SFX(const T *y, const T *b, const T *res,      \
                                                        T *out, uint32_t rows, uint32_t cols,      \
                                                        uint32_t rpg) {                            \
        KERNEL<T, true, true>(y, b, res, out, rows, cols, rpg);                                    \
    }
#define INSTANTIATE_LINEAR(T, SFX)                                                                 \
    INSTANTIATE_BIAS_ACT(T, SFX, bias_act, )                                                       \
    INSTANTIATE_BIAS_ACT(T, SFX, bias_act_v, _v)

FOR_EACH_DTYPE(INSTANTIATE_LINEAR)
