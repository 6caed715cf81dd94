// What every kernel file shares: conversions between the run dtype and f32 (every kernel reads
// and writes the run dtype and computes in f32), the 16-byte packs of the vectorised kernels,
// a warp reduction, and FOR_EACH_DTYPE for the extern "C" instantiations. Included by the
// family .cu files; each is compiled to its own PTX module by build.rs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float ld(const float *p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16 *p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const __half *p, size_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float *p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16 *p, size_t i, float v) { p[i] = __float2bfloat16(v); }
__device__ __forceinline__ void st(__half *p, size_t i, float v) { p[i] = __float2half(v); }

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

// Element e of a 16-byte pack of a 2-byte T (the pack's raw bits), widened to f32 where it is
// used: the row kernels (LayerNorm, FP8 quantisation) keep a row in registers as raw packs, 4
// registers a pack, and widen it again in each pass. Held as bf16/f16 values instead, nvcc widened
// the whole row at the load and kept an f32 copy across every pass (twice the registers, spilling
// in bf16). The same values as f() either way.
template <typename T> __device__ __forceinline__ float widen(const uint4 &p, int e);
template <> __device__ __forceinline__ float widen<float>(const uint4 &p, int e) {
    return __uint_as_float((&p.x)[e]);
}
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(const uint4 &p, int e) {
    const uint32_t w = (&p.x)[e / 2];
    return __uint_as_float(e % 2 ? w & 0xffff0000u : w << 16);
}
template <> __device__ __forceinline__ float widen<__half>(const uint4 &p, int e) {
    const uint32_t w = (&p.x)[e / 2];
    return __half2float(__ushort_as_half((unsigned short)(e % 2 ? w >> 16 : w & 0xffffu)));
}

// A warp's row of `packs` 16-byte packs of T in registers as raw bits, lane l holding packs l,
// l + 32, …; packs past the row are zero. Every load is issued at once (the row kernels: the
// LayerNorm and the FP8 quantisers).
template <typename T, int PACKS>
__device__ __forceinline__ void load_row_packs(uint4 (&v)[PACKS], const T *row, uint32_t lane, uint32_t packs) {
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
        const uint32_t p = lane + 32 * k;
        v[k] = p < packs ? *reinterpret_cast<const uint4 *>(row + (size_t)p * Pack<T>::N) : make_uint4(0, 0, 0, 0);
    }
}

// The affine-free LayerNorm's mean and 1/std of a row of `cols` values held by load_row_packs,
// in two passes (the variance around the mean) as the reference computes them.
template <typename T, int PACKS>
__device__ __forceinline__ void row_moments(const uint4 (&v)[PACKS], uint32_t lane, uint32_t packs, uint32_t cols,
                                            float eps, float &mean, float &rstd) {
    constexpr int N = Pack<T>::N;
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < PACKS; ++k)
#pragma unroll
        for (int e = 0; e < N; ++e) sum += widen<T>(v[k], e);
    mean = warp_sum(sum) / (float)cols;
    float sq = 0.0f;
#pragma unroll
    for (int k = 0; k < PACKS; ++k) {
        if (lane + 32 * k < packs) {
#pragma unroll
            for (int e = 0; e < N; ++e) {
                const float d = widen<T>(v[k], e) - mean;
                sq += d * d;
            }
        }
    }
    rstd = rsqrtf(warp_sum(sq) / (float)cols + eps);
}

// The dtypes of candle's kernel names (`name_f32`, `name_bf16`, `name_f16`).
#define FOR_EACH_DTYPE(M) M(float, f32) M(__nv_bfloat16, bf16) M(__half, f16)
