// The end of a bucketed denoising step: guidance and the sampler update, fused.
// What it computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the same
// nvcc as candle's kernels; loaded at run time as a custom module.
//
// Every product, sum and difference is its own correctly rounded f32 operation (__fmul_rn and
// friends are never contracted into fused multiply-adds), in the order candle's separate
// kernels evaluate the same expressions; candle's affine kernels (x·mul + add) contract, so
// those three are written as fmaf. expf as candle's exp kernel. The result is bit-identical to
// the unfused step.

#include "../common.cuh"

// Column offsets into params (UpdateColumns, in its field order; passed as separate kernel
// arguments, one launch argument each).
struct Columns {
    uint32_t k0, k1, k2, k3, k4, d, log_var_max, log_var_min, noise_weight, prev, guided, scale, uncond, noise;
};

__device__ __forceinline__ void guided_update(const float *out, const float *x, const float *prev,
                                              const float *params, float *res, uint32_t rows,
                                              uint32_t c, uint32_t hw, uint32_t learn_sigma,
                                              uint32_t guided_channels, Columns col) {
    const uint32_t per_row = c * hw, total = rows * per_row;
    const uint32_t out_c = learn_sigma ? 2 * c : c;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        const uint32_t r = i / per_row, ch = (i / hw) % c, px = i % hw;
        auto p = [&](uint32_t column) { return params[column + r]; };
        const float cond = out[((size_t)r * out_c + ch) * hw + px];
        float eps = cond;
        if (ch < guided_channels && p(col.guided) > 0.5f) {
            const uint32_t u = min((uint32_t)p(col.uncond), rows - 1);
            const float unc = out[((size_t)u * out_c + ch) * hw + px];
            eps = __fadd_rn(unc, __fmul_rn(__fsub_rn(cond, unc), p(col.scale)));
        }
        const float xv = x[i];
        const float x0 = __fsub_rn(__fmul_rn(xv, p(col.k0)), __fmul_rn(eps, p(col.k1)));
        float next = __fadd_rn(__fadd_rn(__fmul_rn(xv, p(col.k2)), __fmul_rn(eps, p(col.k3))),
                               __fmul_rn(x0, p(col.k4)));
        if (p(col.prev) > 0.5f) next = __fadd_rn(next, __fmul_rn(prev[i], p(col.d)));
        if (p(col.noise_weight) > 0.5f) {
            float log_var = p(col.log_var_max);
            if (learn_sigma) {
                const float v = out[((size_t)r * out_c + c + ch) * hw + px];
                const float frac = fmaf(fmaf(v, 1.0f, 1.0f), 0.5f, 0.0f);
                log_var = __fadd_rn(__fmul_rn(frac, p(col.log_var_max)),
                                    __fmul_rn(fmaf(frac, -1.0f, 1.0f), p(col.log_var_min)));
            }
            const float e = expf(fmaf(log_var, 0.5f, 0.0f));
            next = __fadd_rn(next, __fmul_rn(__fmul_rn(e, params[col.noise + i]), p(col.noise_weight)));
        }
        res[i] = next;
        res[total + i] = x0;
    }
}

extern "C" __global__ void guided_update_f32(
    const float *out, const float *x, const float *prev, const float *params, float *res, uint32_t rows,
    uint32_t c, uint32_t hw, uint32_t learn_sigma, uint32_t guided_channels, uint32_t k0, uint32_t k1,
    uint32_t k2, uint32_t k3, uint32_t k4, uint32_t d, uint32_t log_var_max, uint32_t log_var_min,
    uint32_t noise_weight, uint32_t prev_flag, uint32_t guided, uint32_t scale, uint32_t uncond,
    uint32_t noise) {
    const Columns col{k0, k1, k2, k3, k4, d, log_var_max, log_var_min, noise_weight, prev_flag, guided, scale, uncond, noise};
    guided_update(out, x, prev, params, res, rows, c, hw, learn_sigma, guided_channels, col);
}
