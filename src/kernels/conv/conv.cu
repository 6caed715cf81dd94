// The VAE decoder's 3×3 convolutions over channels-last ([B, H, W, C]) activations.
// What each op computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the
// same nvcc as candle's kernels; loaded at run time as a custom module.

#include "../common.cuh"

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

// im2col3x3 scalar and over packs, the ×2 upsampling phases, their pixel shuffle, and the
// direct convolution to at most 4 channels.
#define INSTANTIATE_IM2COL(T, SFX, NAME)                                                           \
    extern "C" __global__ void NAME##_##SFX(const T *x, T *out, uint32_t batch, uint32_t hi,       \
                                            uint32_t wi, uint32_t c, uint32_t up) {                \
        NAME<T>(x, out, batch, hi, wi, c, up);                                                     \
    }
#define INSTANTIATE_CONV(T, SFX)                                                                   \
    INSTANTIATE_IM2COL(T, SFX, im2col3x3)                                                          \
    INSTANTIATE_IM2COL(T, SFX, im2col3x3_v)                                                        \
    extern "C" __global__ void im2col_up2_phases_v_##SFX(const T *x, T *out, uint32_t batch,       \
                                                         uint32_t h, uint32_t w, uint32_t c) {     \
        im2col_up2_phases_v<T>(x, out, batch, h, w, c);                                            \
    }                                                                                              \
    extern "C" __global__ void pixel_shuffle_bias_v_##SFX(const T *y, const T *b, T *out,          \
                                                          uint32_t batch, uint32_t h, uint32_t w,  \
                                                          uint32_t c) {                            \
        pixel_shuffle_bias_v<T>(y, b, out, batch, h, w, c);                                        \
    }                                                                                              \
    extern "C" __global__ void conv3x3_cout4_v_##SFX(const T *x, const T *w, const T *b, T *out,   \
                                                     uint32_t batch, uint32_t h, uint32_t wd,      \
                                                     uint32_t c, uint32_t cout) {                  \
        conv3x3_cout4_v<T>(x, w, b, out, batch, h, wd, c, cout);                                   \
    }

FOR_EACH_DTYPE(INSTANTIATE_CONV)
