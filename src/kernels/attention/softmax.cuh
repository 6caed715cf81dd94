// The exponential both flash-attention kernels (flash.cu, flash_sm90.cu) take their softmax with:
// exp(x) = 2^(x · log2 e).
#pragma once

constexpr float LOG2E = 1.4426950408889634f;

// 2^x in one MUFU instruction (exp2f adds denormal handling the softmax does not need);
// 2^−∞ = 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}
