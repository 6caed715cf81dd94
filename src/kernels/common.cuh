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

// The dtypes of candle's kernel names (`name_f32`, `name_bf16`, `name_f16`).
#define FOR_EACH_DTYPE(M) M(float, f32) M(__nv_bfloat16, bf16) M(__half, f16)
