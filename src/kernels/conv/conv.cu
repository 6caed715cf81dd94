// The VAE decoder's 3×3 convolutions over channels-last ([B, H, W, C]) activations.
// What each op computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the
// same nvcc as candle's kernels; loaded at run time as a custom module.

#include "../common.cuh"
#include "../mma.cuh"

#if !defined(CONV_BM) || !defined(CONV_BN) || !defined(CONV_BK) || !defined(CONV_STAGES) || \
    !defined(CONV_THREADS) || !defined(COUT4_PIXELS) || !defined(CONVH_BK) || !defined(CONVH_STAGES)
#error "the CONV_* tiling comes from src/kernels/tiling.rs through build.rs"
#endif

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
// nine copies of its input and ran cuBLAS's slow unaligned path (N = 3).
//
// A half-warp takes COUT4_PIXELS consecutive pixels: its 16 lanes split each input row into
// 16-byte packs (lane j: packs j, j + 16, …; one coalesced 256-byte row for C = 128 bf16), each
// lane loads a pack's weights once and uses them for all the strip's pixels, and the lanes'
// partial sums are added by a fixed butterfly. A lane issues the strip's four loads of a pack
// before any FMA (zeros at the padding, no branch between them), and three taps are unrolled, so
// several loads are in flight a lane. The weights sit in shared memory as float4 (all
// four outputs) in [tap][element of the pack][pack] order, so the 16 lanes read 16 consecutive
// float4 (no bank conflicts) and the two half-warps read the same ones (a broadcast). One thread
// a pixel, with the weights in [9·C] order, ran ≈ 8× slower: each lane's 256-byte rows were 256
// bytes apart from its neighbours' and every weight load fed four FMAs. C a multiple of the pack;
// 9·C·16 bytes of shared memory. COUT4_PIXELS comes from tiling.rs.

template <typename T>
__device__ void conv3x3_cout4_v(const T *x, const T *w, const T *bias, T *out, uint32_t batch,
                                uint32_t h, uint32_t wd, uint32_t c, uint32_t cout) {
    constexpr int N = Pack<T>::N;
    extern __shared__ float4 wsm[];
    const uint32_t k = 9 * c, packs = c / N;
    for (uint32_t i = threadIdx.x; i < k; i += blockDim.x) {
        const uint32_t tap = i / c, ch = i % c;
        float4 v;
        v.x = cout > 0 ? ld(w, i) : 0.0f;
        v.y = cout > 1 ? ld(w, (size_t)k + i) : 0.0f;
        v.z = cout > 2 ? ld(w, 2 * (size_t)k + i) : 0.0f;
        v.w = cout > 3 ? ld(w, 3 * (size_t)k + i) : 0.0f;
        wsm[(tap * N + ch % N) * packs + ch / N] = v;
    }
    __syncthreads();
    const uint32_t pixels = batch * h * wd;
    const uint32_t j = threadIdx.x % 16;  // lane within the half-warp
    const uint32_t half = (blockIdx.x * blockDim.x + threadIdx.x) / 16, halves = gridDim.x * blockDim.x / 16;
    // Every lane runs the same number of iterations (the butterfly needs the whole warp).
    const uint32_t strips = (pixels + COUT4_PIXELS - 1) / COUT4_PIXELS;
    const uint32_t rounds = (strips + halves - 1) / halves;
    for (uint32_t r = 0; r < rounds; ++r) {
        const uint32_t p0 = (r * halves + half) * COUT4_PIXELS;
        float acc[COUT4_PIXELS][4];
        uint32_t xo[COUT4_PIXELS], yo[COUT4_PIXELS], bo[COUT4_PIXELS];
#pragma unroll
        for (int i = 0; i < COUT4_PIXELS; ++i) {
            const uint32_t p = p0 + i;
            xo[i] = p % wd;
            yo[i] = (p / wd) % h;
            bo[i] = p / (wd * h);
            acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
        }
#pragma unroll 3
        for (int tap = 0; tap < 9; ++tap) {
            const T *src[COUT4_PIXELS];  // the strip's neighbours at this tap (null: padding)
#pragma unroll
            for (int i = 0; i < COUT4_PIXELS; ++i) {
                const int yy = (int)yo[i] + tap / 3 - 1, xx = (int)xo[i] + tap % 3 - 1;
                const bool ok = p0 + i < pixels && yy >= 0 && xx >= 0 && yy < (int)h && xx < (int)wd;
                src[i] = ok ? x + (((size_t)bo[i] * h + yy) * wd + xx) * c : nullptr;
            }
            for (uint32_t q = j; q < packs; q += 16) {
                // The strip's loads first, all in flight together (zeros at the padding).
                Pack<T> a[COUT4_PIXELS];
#pragma unroll
                for (int i = 0; i < COUT4_PIXELS; ++i) a[i] = src[i] ? ldp(src[i], (size_t)q * N) : zero_pack<T>();
                float4 ww[N];
#pragma unroll
                for (int e = 0; e < N; ++e) ww[e] = wsm[(tap * N + e) * packs + q];
#pragma unroll
                for (int i = 0; i < COUT4_PIXELS; ++i)
#pragma unroll
                    for (int e = 0; e < N; ++e) {
                        const float v = f(a[i].v[e]);
                        acc[i][0] += v * ww[e].x;
                        acc[i][1] += v * ww[e].y;
                        acc[i][2] += v * ww[e].z;
                        acc[i][3] += v * ww[e].w;
                    }
            }
        }
#pragma unroll
        for (int i = 0; i < COUT4_PIXELS; ++i)
#pragma unroll
            for (int co = 0; co < 4; ++co)
#pragma unroll
                for (int o = 8; o > 0; o >>= 1) acc[i][co] += __shfl_xor_sync(FULL_MASK, acc[i][co], o);
        if (j == 0) {
#pragma unroll
            for (int i = 0; i < COUT4_PIXELS; ++i)
                // A constant trip count keeps acc in registers (a run-time index would put it in
                // local memory).
#pragma unroll
                for (uint32_t co = 0; co < 4; ++co)
                    if (p0 + i < pixels && co < cout) st(out, (size_t)(p0 + i) * cout + co, acc[i][co] + ld(bias, co));
        }
    }
}

// The B fragments of NT n-tiles of 8 for one 16-wide k step: bs points at the step's first
// column of W rows [n][k], ld elements apart. W rows are k-contiguous, i.e. B column-major: each
// ldmatrix_x4 gives (n 0–7, k 0–7) as b0 of n-tile 2·np, (n 0–7, k 8–15) its b1, then the same
// for n 8–15.
template <int NT, typename T>
__device__ __forceinline__ void ldmatrix_b(uint32_t b[NT][2], const T *bs, uint32_t ld, uint32_t lane) {
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
        uint32_t r[4];
        const uint32_t row = np * 16 + lane % 8 + (lane / 16) * 8;
        ldmatrix_x4(r, bs + row * ld + ((lane / 8) % 2) * 8);
        b[2 * np][0] = r[0];
        b[2 * np][1] = r[1];
        b[2 * np + 1][0] = r[2];
        b[2 * np + 1][1] = r[3];
    }
}

// ---- Implicit-GEMM 3×3 convolution (mma.sync tensor cores) ----
//
// out [M = B·H·W, Cout] = bias + A·Wᵀ (+ residual), with A [M, 9·C] the im2col matrix of x
// (row m, column (ky·3 + kx)·C + c: the input at pixel m's neighbour (ky − 1, kx − 1), zero
// outside) and W [Cout, 9·C] the weight in (ky, kx, c) order. A is never written to memory: each
// CTA gathers its BM × BK tiles of it straight from x with cp.async (16-byte copies of 8
// channels; a copy whose neighbour falls outside the image or whose row is past M writes zeros),
// next to the BN × BK tiles of W, through a ring of STAGES in shared memory. A K block lies
// within one tap (C a multiple of BK), so one tap offset serves a whole tile. 8 warps as 2 × 4,
// each a 64 × 32 output tile of 4 × 4 m16n8k16 mma with f32 accumulators; bias and residual are
// added in registers and the result is written as pairs. Needs C a multiple of BK and Cout of 8
// (the launcher checks; the im2col path runs otherwise).
template <typename T>
__device__ void conv3x3_igemm(const T *x, const T *w, const T *bias, const T *res, T *out,
                              uint32_t batch, uint32_t h, uint32_t wd, uint32_t c, uint32_t cout,
                              uint32_t has_res) {
    constexpr int BM = CONV_BM, BN = CONV_BN, BK = CONV_BK, STAGES = CONV_STAGES;
    constexpr int LD = BK + 8;  // row stride: 16-byte multiple, ldmatrix rows on distinct banks
    static_assert(BM == 128 && BN == 128 && BK % 32 == 0, "the warp layout below is for 128 × 128 × 32k");
    extern __shared__ __align__(16) unsigned char smem[];
    T *as_ring = reinterpret_cast<T *>(smem);   // [STAGES][BM][LD]
    T *bs_ring = as_ring + STAGES * BM * LD;    // [STAGES][BN][LD]

    const uint32_t m_total = batch * h * wd;
    const uint32_t m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t wm = warp / 4, wn = warp % 4;
    const uint32_t kdim = 9 * c, kblocks = kdim / BK;

    // Each thread copies rows lrow + i·RPP (i < PASSES) of both tiles, 16-byte chunk lchunk of BK.
    constexpr int CHUNKS = BK / 8, RPP = CONV_THREADS / CHUNKS, PASSES = BM / RPP;
    static_assert(BM == BN && BM % RPP == 0, "the copy passes must tile both operands");
    const uint32_t lrow = tid / CHUNKS, lchunk = tid % CHUNKS;
    int py[PASSES], px[PASSES];
    const T *pimg[PASSES];
    const T *wrow[PASSES];
    bool mok[PASSES], nok[PASSES];
#pragma unroll
    for (int i = 0; i < PASSES; ++i) {
        const uint32_t m = m0 + lrow + RPP * i;
        mok[i] = m < m_total;
        const uint32_t mm = mok[i] ? m : 0;
        px[i] = (int)(mm % wd);
        const uint32_t t = mm / wd;
        py[i] = (int)(t % h);
        pimg[i] = x + (size_t)(t / h) * h * wd * c;
        const uint32_t n = n0 + lrow + RPP * i;
        nok[i] = n < cout;
        wrow[i] = w + (size_t)(nok[i] ? n : 0) * kdim;
    }
    auto load = [&](uint32_t kb, uint32_t stage) {
        const uint32_t k0 = kb * BK;
        const uint32_t tap = k0 / c;
        const uint32_t ch = k0 - tap * c + lchunk * 8;
        const int dy = (int)(tap / 3) - 1, dx = (int)(tap % 3) - 1;
        T *as = as_ring + stage * BM * LD;
        T *bs = bs_ring + stage * BN * LD;
#pragma unroll
        for (int i = 0; i < PASSES; ++i) {
            const int yy = py[i] + dy, xx = px[i] + dx;
            const bool ok = mok[i] && yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)wd;
            const T *src = ok ? pimg[i] + ((size_t)yy * wd + xx) * c + ch : x;
            cp_async16(as + (lrow + RPP * i) * LD + lchunk * 8, src, ok ? 16 : 0);
            cp_async16(bs + (lrow + RPP * i) * LD + lchunk * 8, nok[i] ? wrow[i] + k0 + lchunk * 8 : w,
                       nok[i] ? 16 : 0);
        }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < kblocks) load(s, s);
        cp_async_commit();
    }
    for (uint32_t kb = 0; kb < kblocks; ++kb) {
        // Block kb has landed, and every warp is done with the stage the next load overwrites.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t next = kb + STAGES - 1;
        if (next < kblocks) load(next, next % STAGES);
        cp_async_commit();
        const T *as = as_ring + (kb % STAGES) * BM * LD + (wm * 64) * LD;
        const T *bs = bs_ring + (kb % STAGES) * BN * LD + (wn * 32) * LD;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            uint32_t a[4][4], b[4][2];
#pragma unroll
            for (int mt = 0; mt < 4; ++mt) {
                // Matrices (rows 0–7, k 0–7), (8–15, 0–7), (0–7, 8–15), (8–15, 8–15): a0..a3.
                const uint32_t row = mt * 16 + lane % 8 + ((lane / 8) % 2) * 8;
                ldmatrix_x4(a[mt], as + row * LD + ks * 16 + (lane / 16) * 8);
            }
            ldmatrix_b<4>(b, bs + ks * 16, LD, lane);
#pragma unroll
            for (int mt = 0; mt < 4; ++mt)
#pragma unroll
                for (int nt = 0; nt < 4; ++nt) mma16816<T>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
        }
    }
    cp_async_wait<0>();

    const uint32_t g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
        const uint32_t n = n0 + wn * 32 + nt * 8 + 2 * t;
        if (n >= cout) continue;  // cout is a multiple of 8, so n + 1 < cout too
        const float b0 = f(bias[n]), b1 = f(bias[n + 1]);
#pragma unroll
        for (int mt = 0; mt < 4; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const uint32_t m = m0 + wm * 64 + mt * 16 + g + half * 8;
                if (m >= m_total) continue;
                const size_t at = (size_t)m * cout + n;
                float v0 = acc[mt][nt][2 * half] + b0, v1 = acc[mt][nt][2 * half + 1] + b1;
                if (has_res) {
                    v0 += f(res[at]);
                    v1 += f(res[at + 1]);
                }
                *reinterpret_cast<uint32_t *>(out + at) = pack2<T>(v0, v1);
            }
    }
}

// ---- Halo-tiled implicit-GEMM 3×3 convolution ----
//
// The same product as conv3x3_igemm, with the K loop turned around: channel blocks outer, taps
// inner. A CTA's BM output pixels are a TH × TW block of one image (TW = 16: a 16-row m-tile of
// mma is one row of the block), so the 9 taps of a channel block read one (TH + 2) × (TW + 2)
// halo of the input: it is copied to shared memory once per channel block (double-buffered: the
// next block's halo lands while this one's 9 taps run) and each tap's A fragments are ldmatrix
// reads of shifted halo rows. conv3x3_igemm gathered the input again for every tap (9× the
// input bytes from L2 a tile); here it is (TH + 2)(TW + 2) / (TH·TW) ≈ 1.3–1.4×. The weights
// stream as before, one BN × BK tile a step (tap, channel block) through a ring of STAGES.
// A tile never spans two images, and every pixel's sum runs in the same order (channel block,
// tap, 16-channel step) whatever the batch. WM × WN warps, each MT × NT m16n8k16 tiles; needs C a
// multiple of BK and Cout of 8 (the launcher checks; conv3x3_igemm runs otherwise).
template <typename T, int TH, int WM, int WN, int MT, int NT>
__device__ void conv3x3_halo(const T *x, const T *w, const T *bias, const T *res, T *out,
                             uint32_t batch, uint32_t h, uint32_t wd, uint32_t c, uint32_t cout,
                             uint32_t has_res) {
    constexpr int TW = 16, HW = TW + 2, HP = (TH + 2) * HW;
    constexpr int BM = TH * TW, BN = WN * NT * 8, BK = CONVH_BK, STAGES = CONVH_STAGES;
    constexpr int LD = BK + 8;  // row stride: 16-byte multiple, ldmatrix rows on distinct banks
    constexpr int THREADS = WM * WN * 32;
    static_assert(BM == WM * MT * 16 && BK % 16 == 0 && NT % 2 == 0,
                  "the warp layout must tile the block");
    extern __shared__ __align__(16) unsigned char smem[];
    T *halo_buf = reinterpret_cast<T *>(smem);  // [2][HP][LD]
    T *ws_ring = halo_buf + 2 * HP * LD;        // [STAGES][BN][LD]

    const uint32_t nblocks = (cout + BN - 1) / BN;
    const uint32_t tiles_x = (wd + TW - 1) / TW, tiles_y = (h + TH - 1) / TH;
    const uint32_t nb = blockIdx.x % nblocks, tile = blockIdx.x / nblocks;
    const uint32_t tx = tile % tiles_x, ty = (tile / tiles_x) % tiles_y, img = tile / (tiles_x * tiles_y);
    const int y0 = (int)(ty * TH), x0 = (int)(tx * TW);
    const uint32_t n0 = nb * BN;
    const T *ximg = x + (size_t)img * h * wd * c;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t wm = warp / WN, wn = warp % WN;
    const uint32_t kdim = 9 * c, cblocks = c / BK, steps = 9 * cblocks;

    constexpr int CHUNKS = BK / 8, RPP = THREADS / CHUNKS;
    static_assert(BN % RPP == 0, "the weight copy passes must tile BN");
    const uint32_t lchunk = tid % CHUNKS, lrow = tid / CHUNKS;
    auto load = [&](uint32_t step) {
        const uint32_t cb = step / 9, tap = step - cb * 9;
        if (tap == 0) {  // this channel block's halo, into the buffer of its parity
            T *hs = halo_buf + (cb % 2) * HP * LD;
            for (uint32_t i = tid; i < (uint32_t)(HP * CHUNKS); i += THREADS) {
                const uint32_t hp = i / CHUNKS, ch = i - hp * CHUNKS;
                const int yy = y0 + (int)(hp / HW) - 1, xx = x0 + (int)(hp % HW) - 1;
                const bool ok = yy >= 0 && yy < (int)h && xx >= 0 && xx < (int)wd;
                const T *src = ok ? ximg + ((size_t)yy * wd + xx) * c + cb * BK + ch * 8 : x;
                cp_async16(hs + hp * LD + ch * 8, src, ok ? 16 : 0);
            }
        }
        const uint32_t k0 = tap * c + cb * BK + lchunk * 8;
        T *bs = ws_ring + (step % STAGES) * BN * LD;
#pragma unroll
        for (int i = 0; i < BN / RPP; ++i) {
            const uint32_t r = lrow + RPP * i, n = n0 + r;
            const bool ok = n < cout;
            cp_async16(bs + r * LD + lchunk * 8, ok ? w + (size_t)n * kdim + k0 : w, ok ? 16 : 0);
        }
    };

    float acc[MT][NT][4];
#pragma unroll
    for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // This lane's ldmatrix row of m-tile mt: block row wm·MT + mt, column lane % 16 in the order
    // a0..a3 want (rows 0–7, 8–15 at k 0–7, then at k 8–15), as a halo row at tap (0, 0).
    uint32_t arow[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
        arow[mt] = ((wm * MT + mt) * HW + lane % 8 + ((lane / 8) % 2) * 8) * LD + (lane / 16) * 8;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if ((uint32_t)s < steps) load(s);
        cp_async_commit();
    }
    for (uint32_t kb = 0; kb < steps; ++kb) {
        // Step kb (and its channel block's halo, loaded with the block's first tap) has landed,
        // and every warp is done with the stage and halo buffer the next load overwrites (the
        // halo of block cb + 1 goes where block cb − 1's was, ≥ 9 − STAGES steps ago).
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const uint32_t next = kb + STAGES - 1;
        if (next < steps) load(next);
        cp_async_commit();
        const uint32_t cb = kb / 9, tap = kb - cb * 9;
        const T *hs = halo_buf + (cb % 2) * HP * LD + ((tap / 3) * HW + tap % 3) * LD;
        const T *bs = ws_ring + (kb % STAGES) * BN * LD + (wn * NT * 8) * LD;
#pragma unroll
        for (int ks = 0; ks < BK / 16; ++ks) {
            uint32_t a[MT][4], b[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], hs + arow[mt] + ks * 16);
            ldmatrix_b<NT>(b, bs + ks * 16, LD, lane);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma16816<T>(acc[mt][nt], a[mt], b[nt][0], b[nt][1]);
        }
    }
    cp_async_wait<0>();

    const uint32_t g = lane / 4, t = lane % 4;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        const uint32_t n = n0 + wn * NT * 8 + nt * 8 + 2 * t;
        if (n >= cout) continue;  // cout is a multiple of 8, so n + 1 < cout too
        const float b0 = f(bias[n]), b1 = f(bias[n + 1]);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            const int yy = y0 + (int)(wm * MT + mt);
            if (yy >= (int)h) continue;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int xx = x0 + (int)(g + half * 8);
                if (xx >= (int)wd) continue;
                const size_t at = (((size_t)img * h + yy) * wd + xx) * cout + n;
                float v0 = acc[mt][nt][2 * half] + b0, v1 = acc[mt][nt][2 * half + 1] + b1;
                if (has_res) {
                    v0 += f(res[at]);
                    v1 += f(res[at + 1]);
                }
                *reinterpret_cast<uint32_t *>(out + at) = pack2<T>(v0, v1);
            }
        }
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

// The implicit-GEMM convolution: tensor cores, so bf16 and f16 only.
#define INSTANTIATE_IGEMM(T, SFX)                                                                  \
    extern "C" __global__ void __launch_bounds__(CONV_THREADS) conv3x3_igemm_##SFX(                \
        const T *x, const T *w, const T *b, const T *res, T *out, uint32_t batch, uint32_t h,      \
        uint32_t wd, uint32_t c, uint32_t cout, uint32_t has_res) {                                \
        conv3x3_igemm<T>(x, w, b, res, out, batch, h, wd, c, cout, has_res);                       \
    }
INSTANTIATE_IGEMM(__nv_bfloat16, bf16)
INSTANTIATE_IGEMM(__half, f16)

// The halo-tiled convolution in its two tilings (conv/mod.rs `ConvTiling`): 128 pixels (8 × 16)
// by 128 channels as 8 warps (2 × 4) of 64 × 32, two CTAs an SM (≤ 128 registers); 256 pixels
// (16 × 16) by 128 as 8 warps (4 × 2) of 64 × 64, one CTA an SM (208 registers, 149 KB).
#define INSTANTIATE_HALO(T, SFX, NAME, TH, WM, WN, MT, NT, MINB)                                  \
    extern "C" __global__ void __launch_bounds__(WM * WN * 32, MINB) NAME##_##SFX(                 \
        const T *x, const T *w, const T *b, const T *res, T *out, uint32_t batch, uint32_t h,      \
        uint32_t wd, uint32_t c, uint32_t cout, uint32_t has_res) {                                \
        conv3x3_halo<T, TH, WM, WN, MT, NT>(x, w, b, res, out, batch, h, wd, c, cout, has_res);    \
    }
INSTANTIATE_HALO(__nv_bfloat16, bf16, conv3x3_halo128, 8, 2, 4, 4, 4, 2)
INSTANTIATE_HALO(__half, f16, conv3x3_halo128, 8, 2, 4, 4, 4, 2)
INSTANTIATE_HALO(__nv_bfloat16, bf16, conv3x3_halo256, 16, 4, 2, 4, 8, 1)
INSTANTIATE_HALO(__half, f16, conv3x3_halo256, 16, 4, 2, 4, 8, 1)
