// Flash attention for the DiffiT block.
// What each op computes and why: mod.rs beside this file. Compiled to PTX by build.rs with the
// same nvcc as candle's kernels; loaded at run time as a custom module.

#include "../common.cuh"
#include "../mma.cuh"
#include "softmax.cuh"
#include <type_traits>

#if !defined(ATT_B_WARPS) || !defined(ATT_S_WARPS) || !defined(ATT_B_MT) || !defined(ATT_B_BK) || !defined(ATT_B_STAGES) || \
    !defined(ATT_B_MAX_HDP) || !defined(ATT_A_WARPS) || !defined(ATT_A_MT) || !defined(ATT_A_BK) ||  \
    !defined(ATT_A_STAGES)
#error "the ATT_* tiling comes from src/kernels/tiling.rs through build.rs"
#endif

// ---- Fused attention (flash attention on mma.sync tensor cores) ----
//
// One CTA of WARPS warps takes BQ query rows (16 or 32 a warp) of one (sample, head); key/value
// blocks and the matching bias tile stream through a cp.async ring in shared memory. Q·Kᵀ and P·V are
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

// Tiling of attention_fused: MT m-tiles of 16 query rows a warp (with two, each K/V fragment
// read from shared memory feeds twice the mma work, at the cost of registers), WARPS warps,
// key blocks of BK rows in a ring of STAGES. The values come from tiling.rs, which the launcher
// (cuda.rs, AttTiling) sizes the grid and the shared memory by.

template <typename T, int HDP, int WARPS, int MT, int BK, int STAGES>
__device__ void attention_fused(const T *qkv, const T *sbias, const T *abias, T *out, uint32_t batch,
                                uint32_t tokens, uint32_t heads, uint32_t hd, uint32_t sb_stride,
                                float scale) {
    constexpr int BQ = WARPS * 16 * MT;
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
    T *sbs = ring + STAGES * STAGE;        // [2][HDP]: q's and v's per-sample bias of head h

    const uint32_t b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BQ;
    const uint32_t d = heads * hd, row_len = 3 * d;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t g = lane / 4, t = lane % 4;  // mma fragment row group and column pair
    const uint32_t chunks = hd / 8;             // 16-byte chunks of a real row
    const T *sb = sbias + (size_t)b * sb_stride;
    const T *x = qkv + (size_t)b * tokens * row_len + h * hd;  // this sample's q columns of head h
    const T *bias_rows = abias + (size_t)h * tokens * tokens;   // this head's [N, N] table

    // cp.async never writes the padding columns [hd, HDP) of Q, K, V and the two bias rows:
    // zero them once (only the padding chunks: a loop over every chunk of every row was a
    // tenth of a B = 1 call's instructions).
    if (chunks < CPR) {
        constexpr uint32_t ROWS = BQ + 2 * STAGES * BK + 2;
        for (uint32_t r = tid; r < ROWS; r += WARPS * 32) {
            T *row = r < BQ                        ? qs + r * LD
                     : r < BQ + 2 * STAGES * BK ? ring + ((r - BQ) / (2 * BK)) * STAGE + ((r - BQ) % (2 * BK)) * LD
                                                 : sbs + (r - BQ - 2 * STAGES * BK) * HDP;
            for (uint32_t c = chunks; c < CPR; ++c) stp(row, (size_t)c * 8, zero_pack<T>());
        }
    }
    // Q rows without their bias (added to the fragments), zero past the sequence; the bias
    // slices of q and v beside them, so neither waits on a global load later.
    for (uint32_t i = tid; i < BQ * CPR; i += WARPS * 32) {
        const uint32_t r = i / CPR, c = i % CPR;
        const bool ok = q0 + r < tokens;
        if (c < chunks)
            cp_async16(qs + r * LD + c * 8, x + (size_t)(ok ? q0 + r : 0) * row_len + c * 8, ok ? 16 : 0);
    }
    if (tid < 2 * chunks) {
        const uint32_t which = tid / chunks, c = tid % chunks;  // 0: q, 1: v
        cp_async16(sbs + which * HDP + c * 8, sb + which * 2 * d + h * hd + c * 8, 16);
    }
    // Key block blk (K, V and the bias tile) into its stage, as one cp.async group; past the last
    // block an empty group, so "all but the newest STAGES − 1 groups done" means "block blk is in".
    const uint32_t blocks = (tokens + BK - 1) / BK;
    const bool bias_async = tokens % 8 == 0;  // table rows 16-byte aligned
    // Fixed per-thread copy slots, so a block's copy is a few adds a chunk: K/V rows are split
    // into KV_SLOTS 16-byte slots (those past hd idle), bias rows into BK / 8.
    constexpr int KV_SLOTS = CPR <= 4 ? 4 : CPR <= 8 ? 8 : 16;
    constexpr int KV_RPP = WARPS * 32 / KV_SLOTS;  // rows a pass
    constexpr int B_SLOTS = BK / 8;
    constexpr int B_RPP = WARPS * 32 / B_SLOTS;
    static_assert(BK % KV_RPP == 0 && BQ % B_RPP == 0, "copy passes must tile the blocks");
    const uint32_t kv_c = tid % KV_SLOTS, kv_r = tid / KV_SLOTS;
    const uint32_t b_c = tid % B_SLOTS, b_r = tid / B_SLOTS;
    // A block whose keys and the tile's queries all lie in the sequence (every block but a
    // partial last one) copies without a bound check or address select per chunk: with them
    // the copies were a fifth of the loop's instructions.
    auto copy_block = [&](uint32_t blk, auto masked) {
        constexpr bool M = decltype(masked)::value;
        T *ks = ring + (blk % STAGES) * STAGE;
        T *bs = ks + 2 * BK * LD;
        const uint32_t kb = blk * BK;
        if (kv_c < chunks) {
            const T *src = x + (size_t)(kb + kv_r) * row_len + d + kv_c * 8;
#pragma unroll
            for (int p = 0; p < BK / KV_RPP; ++p) {
                const uint32_t r = kv_r + p * KV_RPP;
                const T *k = src + (size_t)p * KV_RPP * row_len;
                if (M) {
                    const bool ok = kb + r < tokens;  // rows past the sequence: no bytes, zeros
                    cp_async16(ks + r * LD + kv_c * 8, ok ? k : x, ok ? 16 : 0);
                    cp_async16(ks + (BK + r) * LD + kv_c * 8, ok ? k + d : x, ok ? 16 : 0);
                } else {
                    cp_async16_full(ks + r * LD + kv_c * 8, k);
                    cp_async16_full(ks + (BK + r) * LD + kv_c * 8, k + d);
                }
            }
        }
        if (bias_async) {
            const T *src = bias_rows + (size_t)(q0 + b_r) * tokens + kb + b_c * 8;
#pragma unroll
            for (int p = 0; p < BQ / B_RPP; ++p) {
                T *dst = bs + (b_r + p * B_RPP) * BLD + b_c * 8;
                if (M) {
                    const bool ok = q0 + b_r + p * B_RPP < tokens && kb + b_c * 8 < tokens;
                    cp_async16(dst, ok ? src + (size_t)p * B_RPP * tokens : abias, ok ? 16 : 0);
                } else {
                    cp_async16_full(dst, src + (size_t)p * B_RPP * tokens);
                }
            }
        } else {
            for (uint32_t i = tid; i < BQ * BK; i += WARPS * 32) {
                const uint32_t r = i / BK, c = i % BK;
                const bool ok = q0 + r < tokens && kb + c < tokens;
                bs[r * BLD + c] = ok ? bias_rows[(size_t)(q0 + r) * tokens + kb + c] : cast<T>(0.0f);
            }
        }
    };
    auto load_block = [&](uint32_t blk) {
        if (blk < blocks) {
            if ((blk + 1) * BK <= tokens && q0 + BQ <= tokens) {
                copy_block(blk, std::false_type{});
            } else {
                copy_block(blk, std::true_type{});
            }
        }
        cp_async_commit();
    };
#pragma unroll
    for (int st = 0; st < STAGES; ++st) load_block(st);  // Q and the bias slices travel in block 0's group

    cp_async_wait<STAGES - 1>();
    __syncthreads();
    const uint32_t wr = warp * 16 * MT;  // the warp's first row in the tile
    uint32_t qf[MT][KSTEPS][4];
    {
        const T *qb = sbs;  // q's per-sample bias, added here in f32 then rounded (zero padded)
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const uint32_t c0 = kk * 16 + 2 * t, c1 = c0 + 8;
            const float b00 = f(qb[c0]), b01 = f(qb[c0 + 1]);
            const float b10 = f(qb[c1]), b11 = f(qb[c1 + 1]);
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
                    const float2 e0 = widen_pair<T>(*reinterpret_cast<const uint32_t *>(b0 + c));
                    const float2 e1 = widen_pair<T>(*reinterpret_cast<const uint32_t *>(b1 + c));
                    s[mt][j][0] = fmaf(s[mt][j][0], scale, e0.x);
                    s[mt][j][1] = fmaf(s[mt][j][1], scale, e0.y);
                    s[mt][j][2] = fmaf(s[mt][j][2], scale, e1.x);
                    s[mt][j][3] = fmaf(s[mt][j][3], scale, e1.y);
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
            // The block's row maxima as a tree (a max is exact in any order; a chain of SN
            // dependent steps was latency the warp waited on).
            float t0[SN], t1[SN];
#pragma unroll
            for (int j = 0; j < SN; ++j) {
                t0[j] = fmaxf(s[mt][j][0], s[mt][j][1]);
                t1[j] = fmaxf(s[mt][j][2], s[mt][j][3]);
            }
#pragma unroll
            for (int w = 1; w < SN; w *= 2)
#pragma unroll
                for (int j = 0; j + w < SN; j += 2 * w) {
                    t0[j] = fmaxf(t0[j], t0[j + w]);
                    t1[j] = fmaxf(t1[j], t1[j + w]);
                }
            float mx0 = fmaxf(m[mt][0], t0[0]), mx1 = fmaxf(m[mt][1], t1[0]);
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
            // Where no row maximum of the warp moved every factor is exactly 1: skip the
            // multiplies (the same bits; most blocks past the first few at N = 1024).
            if (__any_sync(FULL_MASK, a0 != 1.0f || a1 != 1.0f)) {
#pragma unroll
                for (int n = 0; n < ON; ++n) {
                    o[mt][n][0] *= a0;
                    o[mt][n][1] *= a0;
                    o[mt][n][2] *= a1;
                    o[mt][n][3] *= a1;
                }
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
    const T *vb = sbs + HDP;  // v's per-sample bias (zero padded)
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
            const float v0 = f(vb[c]), v1 = f(vb[c + 1]);
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

// The tiling by padded head dim (tiling.rs; the head dims are its ATT_HEAD_DIMS): "b" = 8 warps
// of 16 query rows, key blocks of 64 in two stages (two CTAs an SM); "s" = "b" with 4 warps a CTA
// for small grids (the same arithmetic a row); "a" = 4 warps of 16 rows, key blocks of 64 in two
// stages, for the large head dims. Measured on the H200 against 16 other tilings (more rows a
// warp, longer rings, the bias read into registers instead of the ring): docs/perf.md v0.28.
// MINB: CTAs an SM the register cap is sized for (b and s alike: 128 registers a thread).
#define INSTANTIATE_ATT(T, SFX, HDP, NAME, WARPS, MT, BK, STAGES, MINB)                            \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MINB) attention_##HDP##NAME##_##SFX(  \
        const T *qkv, const T *sb, const T *ab, T *out, uint32_t batch, uint32_t tokens,           \
        uint32_t heads, uint32_t hd, uint32_t sb_stride, float scale) {                            \
        attention_fused<T, HDP, WARPS, MT, BK, STAGES>(qkv, sb, ab, out, batch, tokens, heads, hd, \
                                                       sb_stride, scale);                          \
    }
#define INSTANTIATE_ATT_B(T, SFX, HDP)                                                             \
    static_assert(HDP <= ATT_B_MAX_HDP, "tiling b is for head dims up to ATT_B_MAX_HDP");          \
    INSTANTIATE_ATT(T, SFX, HDP, b, ATT_B_WARPS, ATT_B_MT, ATT_B_BK, ATT_B_STAGES, 2)              \
    INSTANTIATE_ATT(T, SFX, HDP, s, ATT_S_WARPS, ATT_B_MT, ATT_B_BK, ATT_B_STAGES, 2 * ATT_B_WARPS / ATT_S_WARPS)
#define INSTANTIATE_ATT_A(T, SFX, HDP)                                                             \
    static_assert(HDP > ATT_B_MAX_HDP, "tiling a is for head dims above ATT_B_MAX_HDP");           \
    INSTANTIATE_ATT(T, SFX, HDP, a, ATT_A_WARPS, ATT_A_MT, ATT_A_BK, ATT_A_STAGES, 2)
#define INSTANTIATE_FLASH(T, SFX)                                                                  \
    INSTANTIATE_ATT_B(T, SFX, 32)                                                                  \
    INSTANTIATE_ATT_B(T, SFX, 64)                                                                  \
    INSTANTIATE_ATT_B(T, SFX, 80)                                                                  \
    INSTANTIATE_ATT_A(T, SFX, 128)

// Tensor cores: bf16 and f16 only.
INSTANTIATE_FLASH(__nv_bfloat16, bf16)
INSTANTIATE_FLASH(__half, f16)
