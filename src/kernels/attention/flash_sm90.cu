// Flash attention for the DiffiT block on Hopper's warpgroup tensor-core instructions (wgmma).
// What the op computes and why: mod.rs beside this file; the mma.sync kernel (flash.cu) computes
// the same on every card. build.rs compiles this file only for sm_90, with -arch=sm_90a (wgmma
// needs the "a" target); the launcher (cuda.rs) picks it only on a 9.0 device. Design and
// measurements: docs/attention.md.

#include "../common.cuh"
#include "../mma.cuh"
#include "softmax.cuh"
#include <type_traits>

#if !defined(ATT90_BK) || !defined(ATT90_STAGES) || !defined(ATT90_MAX_HDP)
#error "the ATT90_* tiling comes from src/kernels/tiling.rs through build.rs"
#endif

// ---- The kernel ----
//
// A CTA is WG warpgroups (128 threads each) of 64 query rows each, of one (sample, head). Key
// and value blocks of ATT90_BK rows stream through a cp.async ring of ATT90_STAGES in shared
// memory (at N = 256 every block is in flight from the start), shared by the warpgroups. Per
// block, each warpgroup:
//   S = Q·Kᵀ      wgmma m64n{BK}k16, A = Q from registers (loaded once, q's bias added),
//                 B = the K block from shared memory (K-major);
//   softmax       scale, + the relative-position bias (read from global memory straight into
//                 the accumulator layout, issued before the wgmma so its latency hides),
//                 online maximum and sum as flash.cu;
//   O += P·V      wgmma m64n{HDP}k16, A = P in registers (the m64nNk16 f32 accumulator layout
//                 is the A-fragment layout of the next wgmma, so P never leaves registers),
//                 B = the V block from shared memory (MN-major: the transpose bit).
// K and V sit in shared memory in the no-swizzle ("interleave") canonical layout: 8 rows × 16
// bytes core matrices, each 128 contiguous bytes; core matrix (r, c) of a block (rows 8r…8r+7,
// columns 8c…8c+7) at (r · HDP/8 + c) · 128 bytes. For K (B of Q·Kᵀ, K-major: N = keys,
// K = head dim) the descriptor's leading offset (next core matrix along K) is 128 bytes and its
// stride offset (along N) HDP · 16; for V (B of P·V, MN-major: N = head dim, K = keys) the two
// swap. The same layout serves both, so a K row and a V row are copied alike.

// A shared-memory matrix descriptor, no swizzle: start address, leading and stride byte
// offsets, each in 16-byte units (bits 0–13, 16–29, 32–45); base offset and layout type 0.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

// cp.async writes shared memory through the generic proxy, wgmma reads it through the async
// proxy: each writer fences before the barrier that publishes a stage.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

// The compiler does not know a wgmma reads and writes its registers after the instruction
// issues: these empty volatile statements pin accumulators (and A fragments) in place between
// the fence before the issue and the wait after it, as a use and a redefinition.
template <int R>
__device__ __forceinline__ void pin(float (&r)[R]) {
#pragma unroll
    for (int i = 0; i < R; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int R>
__device__ __forceinline__ void pin(uint32_t (&r)[R][4]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) asm volatile("" : "+r"(r[i][j])::"memory");
}

// wgmma m64nNk16, f32 accumulators d (N/2 a thread), A (64×16) from registers, B from the
// shared memory `desc` points at, TR = 1 for an MN-major B; d = A·B + (acc ? d : 0).
// (Operand lists written out by a small script: one macro per N, for bf16 and f16.)
#define WGMMA_N128(SFX) \
template <int TR> \
__device__ __forceinline__ void wgmma_##SFX##_n128(float (&d)[64], const uint32_t (&a)[4], uint64_t desc, uint32_t acc) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." #SFX "." #SFX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
        "{%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc), "n"(TR)); \
}
WGMMA_N128(bf16)
WGMMA_N128(f16)

#define WGMMA_N80(SFX) \
template <int TR> \
__device__ __forceinline__ void wgmma_##SFX##_n80(float (&d)[40], const uint32_t (&a)[4], uint64_t desc, uint32_t acc) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %45, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n80k16.f32." #SFX "." #SFX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39}, " \
        "{%40, %41, %42, %43}, %44, p, 1, 1, %46;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc), "n"(TR)); \
}
WGMMA_N80(bf16)
WGMMA_N80(f16)

#define WGMMA_N64(SFX) \
template <int TR> \
__device__ __forceinline__ void wgmma_##SFX##_n64(float (&d)[32], const uint32_t (&a)[4], uint64_t desc, uint32_t acc) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." #SFX "." #SFX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
        "{%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc), "n"(TR)); \
}
WGMMA_N64(bf16)
WGMMA_N64(f16)

#define WGMMA_N32(SFX) \
template <int TR> \
__device__ __forceinline__ void wgmma_##SFX##_n32(float (&d)[16], const uint32_t (&a)[4], uint64_t desc, uint32_t acc) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." #SFX "." #SFX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, " \
        "{%16, %17, %18, %19}, %20, p, 1, 1, %22;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(acc), "n"(TR)); \
}
WGMMA_N32(bf16)
WGMMA_N32(f16)

template <typename T, int N, int TR>
__device__ __forceinline__ void wgmma(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc, uint32_t acc) {
    constexpr bool BF = std::is_same<T, __nv_bfloat16>::value;
    if constexpr (N == 128) {
        if constexpr (BF) wgmma_bf16_n128<TR>(d, a, desc, acc); else wgmma_f16_n128<TR>(d, a, desc, acc);
    } else if constexpr (N == 80) {
        if constexpr (BF) wgmma_bf16_n80<TR>(d, a, desc, acc); else wgmma_f16_n80<TR>(d, a, desc, acc);
    } else if constexpr (N == 64) {
        if constexpr (BF) wgmma_bf16_n64<TR>(d, a, desc, acc); else wgmma_f16_n64<TR>(d, a, desc, acc);
    } else {
        static_assert(N == 32, "wgmma wrappers exist for N = 32, 64, 80, 128");
        if constexpr (BF) wgmma_bf16_n32<TR>(d, a, desc, acc); else wgmma_f16_n32<TR>(d, a, desc, acc);
    }
}

template <typename T, int HDP, int WG>
__device__ void attention_wgmma(const T *qkv, const T *sbias, const T *abias, T *out, uint32_t batch,
                                uint32_t tokens, uint32_t heads, uint32_t hd, uint32_t sb_stride,
                                uint32_t tile_count, float scale) {
    constexpr int BK = ATT90_BK, STAGES = ATT90_STAGES;
    constexpr int THREADS = WG * 128;
    constexpr int BQ = WG * 64;
    constexpr int LD = HDP + 8;       // Q / output staging row stride (ldmatrix on distinct banks)
    constexpr int CPR = HDP / 8;      // 16-byte chunks a padded row
    constexpr int KSTEPS = HDP / 16;  // k-steps of Q·Kᵀ
    constexpr int KV = BK * HDP;      // elements of one K or V block
    constexpr int SR = BK / 2;        // score registers a thread
    constexpr int OR = HDP / 2;       // output registers a thread
    static_assert(CPR % 2 == 0 && BK % 16 == 0, "head dims a multiple of 16, key blocks of 16");
    static_assert(HDP <= ATT90_MAX_HDP, "head dims up to ATT90_MAX_HDP (tiling.rs says why)");
    static_assert((2 * BK * CPR) % THREADS == 0 && (BQ * CPR) % THREADS == 0, "copies tile the CTA");
    extern __shared__ __align__(128) unsigned char smem[];
    T *ring = reinterpret_cast<T *>(smem);  // [STAGES][K, V], core-matrix layout
    T *qs = ring + STAGES * 2 * KV;         // [BQ][LD] row-major; output staging at the end
    T *bs = qs + BQ * LD;                   // [BQ][BK + 8]: each warp's bias rows of a block

    const uint32_t b = blockIdx.z, h = blockIdx.y;
    const uint32_t d = heads * hd, row_len = 3 * d;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t g = lane / 4, t = lane % 4;
    const uint32_t wr = warp * 16;  // the warp's first row in the tile (warpgroup w: rows 64w…)
    const uint32_t chunks = hd / 8;
    const T *sb = sbias + (size_t)b * sb_stride;
    const T *x = qkv + (size_t)b * tokens * row_len + h * hd;
    const T *bias_rows = abias + (size_t)h * tokens * tokens;

    // The Q tile from row q0 (zero past the sequence and in the padding columns: cp.async of
    // 0 bytes writes zeros).
    auto load_q = [&](uint32_t q0) {
#pragma unroll
        for (int p = 0; p < BQ * CPR / THREADS; ++p) {
            const uint32_t i = tid + p * THREADS, r = i / CPR, c = i % CPR;
            const bool ok = q0 + r < tokens && c < chunks;
            cp_async16(qs + r * LD + c * 8, ok ? x + (size_t)(q0 + r) * row_len + c * 8 : x, ok ? 16 : 0);
        }
    };
    // Key block blk (K and V) into its stage as one cp.async group (empty past the last block).
    // Copy slot i → chunk c of key row kr: two neighbouring lanes take one 32-byte sector of a
    // row, eight rows make the 16 lanes of a core-matrix pair, so a warp writes 512 contiguous
    // bytes of shared memory.
    const uint32_t blocks = (tokens + BK - 1) / BK;
    auto load_block = [&](uint32_t blk) {
        if (blk < blocks) {
            T *ks = ring + (blk % STAGES) * 2 * KV;
            const uint32_t kb = blk * BK;
#pragma unroll
            for (int p = 0; p < 2 * BK * CPR / THREADS; ++p) {
                const uint32_t i = tid + p * THREADS;
                const uint32_t which = i / (BK * CPR), j = i % (BK * CPR);  // 0: K, 1: V
                const uint32_t rest = j / 16, pair = rest % (CPR / 2), r8 = rest / (CPR / 2);
                const uint32_t c = 2 * pair + j % 2, kr = r8 * 8 + (j / 2) % 8;
                const bool ok = kb + kr < tokens && c < chunks;
                const T *src = x + (size_t)(kb + kr) * row_len + (1 + which) * d + c * 8;
                cp_async16(ks + which * KV + ((r8 * CPR + c) * 8 + kr % 8) * 8, ok ? src : x, ok ? 16 : 0);
            }
        }
        cp_async_commit();
    };
    // The CTA's query tiles: tile_count of them from tile blockIdx.x · tile_count. More than one
    // only where every key block stays in the ring (the launcher checks), so K and V are read
    // once for all of them.
    load_q(blockIdx.x * tile_count * BQ);
#pragma unroll
    for (int st = 0; st < STAGES; ++st) load_block(st);  // Q travels in block 0's group
    for (uint32_t tile = 0; tile < tile_count; ++tile) {
        const uint32_t q0 = (blockIdx.x * tile_count + tile) * BQ;
        if (q0 >= tokens) break;
        if (tile > 0) {
            __syncthreads();  // every warp has written its rows of the last tile out of qs
            load_q(q0);
            cp_async_commit();
            cp_async_wait<0>();
        } else {
            cp_async_wait<STAGES - 1>();
        }
        __syncthreads();
        uint32_t qf[KSTEPS][4];
        {
            const T *qb = sb + h * hd;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                const uint32_t c0 = kk * 16 + 2 * t, c1 = c0 + 8;
                const float b00 = c0 < hd ? ld(qb, c0) : 0.0f, b01 = c0 + 1 < hd ? ld(qb, c0 + 1) : 0.0f;
                const float b10 = c1 < hd ? ld(qb, c1) : 0.0f, b11 = c1 + 1 < hd ? ld(qb, c1 + 1) : 0.0f;
                uint32_t r[4];
                ldmatrix_x4(r, qs + (wr + lane % 8 + (lane / 8) % 2 * 8) * LD + kk * 16 + lane / 16 * 8);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const T *e = reinterpret_cast<const T *>(&r[i]);
                    const float lo = i < 2 ? b00 : b10, hi = i < 2 ? b01 : b11;
                    qf[kk][i] = pack2<T>(f(e[0]) + lo, f(e[1]) + hi);
                }
            }
        }

        float o[OR];
#pragma unroll
        for (int i = 0; i < OR; ++i) o[i] = 0.0f;
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows g and g + 8
        // The bias goes through shared memory, each warp its own 16 rows: a lane loads 16 bytes
        // of a row (16 lanes a 256-byte row, coalesced), stores them to the warp's rows of bs,
        // and reads back its pairs in the accumulator layout (rows padded by 8 elements: the 32
        // lanes' reads fall on 32 banks). Lane l copies chunk l % 16 of rows 2p + l / 16 (table
        // rows clamped past the sequence: never written out).
        constexpr int BLD = BK + 8;
        const uint32_t b_chunk = lane % 16;
        const T *bias_lane = bias_rows + b_chunk * 8;
        T *bs_warp = bs + wr * BLD;

        for (uint32_t blk = 0; blk < blocks; ++blk) {
            const uint32_t kb = blk * BK;
            const bool tail = kb + BK > tokens;
            // This block's bias chunks of the warp's rows, loaded before the wgmma so they land
            // while it runs; tokens is a multiple of 8 (the launcher checks), so a chunk is in or
            // out of the sequence whole.
            uint4 bv[8];
            const bool chunk_ok = !tail || kb + b_chunk * 8 < tokens;
#pragma unroll
            for (int p = 0; p < 8; ++p) {
                const uint32_t row = min(q0 + wr + 2 * p + lane / 16, tokens - 1);
                bv[p] = chunk_ok ? __ldg(reinterpret_cast<const uint4 *>(bias_lane + (size_t)row * tokens + kb))
                                 : make_uint4(0, 0, 0, 0);
            }
            cp_async_wait<STAGES - 1>();
            fence_proxy_async();
            __syncthreads();
            const T *ks = ring + (blk % STAGES) * 2 * KV;
            // Descriptors of the block's first k-step; a k-step further is a start address
            // (16-byte units, the low bits) further: 2 core matrices of K, 2 · HDP/8 of V.
            const uint64_t kdesc = smem_desc(smem_addr(ks), 128, HDP * 16);
            const uint64_t vdesc = smem_desc(smem_addr(ks + KV), HDP * 16, 128);

            float s[SR];
#pragma unroll
            for (int i = 0; i < SR; ++i) s[i] = 0.0f;
            pin(s);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk)
                wgmma<T, BK, 0>(s, qf[kk], kdesc + kk * 16, 1);
            wgmma_commit();
            __syncwarp();  // the warp is done reading the last block's bias rows
#pragma unroll
            for (int p = 0; p < 8; ++p)
                *reinterpret_cast<uint4 *>(bs_warp + (2 * p + lane / 16) * BLD + b_chunk * 8) = bv[p];
            __syncwarp();
            wgmma_wait_all();
            pin(s);

            // Logits; keys past the sequence (only in the last block) get −∞.
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                const uint32_t w0 = *reinterpret_cast<const uint32_t *>(bs_warp + g * BLD + j * 8 + 2 * t);
                const uint32_t w1 = *reinterpret_cast<const uint32_t *>(bs_warp + (g + 8) * BLD + j * 8 + 2 * t);
                const T *e0 = reinterpret_cast<const T *>(&w0), *e1 = reinterpret_cast<const T *>(&w1);
                s[4 * j + 0] = fmaf(s[4 * j + 0], scale, f(e0[0]));
                s[4 * j + 1] = fmaf(s[4 * j + 1], scale, f(e0[1]));
                s[4 * j + 2] = fmaf(s[4 * j + 2], scale, f(e1[0]));
                s[4 * j + 3] = fmaf(s[4 * j + 3], scale, f(e1[1]));
                if (tail && kb + j * 8 + 2 * t >= tokens)
                    s[4 * j] = s[4 * j + 1] = s[4 * j + 2] = s[4 * j + 3] = -INFINITY;
            }
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                mx0 = fmaxf(mx0, fmaxf(s[4 * j], s[4 * j + 1]));
                mx1 = fmaxf(mx1, fmaxf(s[4 * j + 2], s[4 * j + 3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
            // Every block holds a key of the sequence, so the maxima are finite from here on.
            const float a0 = fast_exp2((m0 - mx0) * LOG2E), a1 = fast_exp2((m1 - mx1) * LOG2E);
            const float n0 = -mx0 * LOG2E, n1 = -mx1 * LOG2E;
            m0 = mx0;
            m1 = mx1;
            l0 *= a0;
            l1 *= a1;
#pragma unroll
            for (int i = 0; i < OR; i += 4) {
                o[i] *= a0;
                o[i + 1] *= a0;
                o[i + 2] *= a1;
                o[i + 3] *= a1;
            }
            uint32_t pf[BK / 16][4];
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                const float p0 = fast_exp2(fmaf(s[4 * j + 0], LOG2E, n0)), p1 = fast_exp2(fmaf(s[4 * j + 1], LOG2E, n0));
                const float p2 = fast_exp2(fmaf(s[4 * j + 2], LOG2E, n1)), p3 = fast_exp2(fmaf(s[4 * j + 3], LOG2E, n1));
                l0 += p0 + p1;
                l1 += p2 + p3;
                // Score n-tiles 2kk and 2kk + 1 are A fragment kk: {row g, row g + 8} × {cols 0–7, 8–15}.
                pf[j / 2][2 * (j % 2)] = pack2<T>(p0, p1);
                pf[j / 2][2 * (j % 2) + 1] = pack2<T>(p2, p3);
            }

            pin(o);
            pin(pf);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk)
                wgmma<T, HDP, 1>(o, pf[kk], vdesc + kk * 2 * HDP, 1);
            wgmma_commit();
            wgmma_wait_all();
            pin(o);
            pin(pf);
            __syncthreads();  // every warpgroup is done with this stage: refill it
            load_block(blk + STAGES);
        }
        cp_async_wait<0>();

        // Normalise, add v's bias, stage the warp's rows in its own rows of qs, write 16 bytes a lane.
        l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
        l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
        l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
        l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
        const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
        const T *vb = sb + 2 * d + h * hd;
#pragma unroll
        for (int n = 0; n < HDP / 8; ++n) {
            const uint32_t c = n * 8 + 2 * t;
            const float v0 = c < hd ? ld(vb, c) : 0.0f, v1 = c + 1 < hd ? ld(vb, c + 1) : 0.0f;
            T *row = qs + (wr + g) * LD + c;
            *reinterpret_cast<uint32_t *>(row) = pack2<T>(o[4 * n] * inv0 + v0, o[4 * n + 1] * inv0 + v1);
            *reinterpret_cast<uint32_t *>(row + 8 * LD) = pack2<T>(o[4 * n + 2] * inv1 + v0, o[4 * n + 3] * inv1 + v1);
        }
        __syncwarp();
        for (uint32_t i = lane; i < 16 * CPR; i += 32) {
            const uint32_t r = i / CPR, c = i % CPR;
            const uint32_t q = q0 + wr + r;
            if (q < tokens && c < chunks)
                stp(out, ((size_t)b * tokens + q) * d + h * hd + c * 8, ldp(qs, (size_t)(wr + r) * LD + c * 8));
        }
    }
}

// Kernels attention90_{HDP}_w{WG}_{bf16,f16}: WG = 1 (64 query rows, two CTAs an SM) and 2 (128
// rows sharing each K/V block, one CTA an SM); the launcher (cuda.rs) picks by tiling.rs.
#define INSTANTIATE_ATT90(T, SFX, HDP, WG)                                                          \
    extern "C" __global__ void __launch_bounds__(WG * 128, WG == 1 ? 2 : 1)                         \
        attention90_##HDP##_w##WG##_##SFX(const T *qkv, const T *sb, const T *ab, T *out,           \
                                          uint32_t batch, uint32_t tokens, uint32_t heads,         \
                                          uint32_t hd, uint32_t sb_stride, uint32_t tile_count,    \
                                          float scale) {                                           \
        attention_wgmma<T, HDP, WG>(qkv, sb, ab, out, batch, tokens, heads, hd, sb_stride,          \
                                    tile_count, scale);                                            \
    }
#define INSTANTIATE_FLASH90(T, SFX)                                                                 \
    INSTANTIATE_ATT90(T, SFX, 32, 1)                                                                \
    INSTANTIATE_ATT90(T, SFX, 64, 1)                                                                \
    INSTANTIATE_ATT90(T, SFX, 80, 1)                                                                \
    INSTANTIATE_ATT90(T, SFX, 32, 2)                                                                \
    INSTANTIATE_ATT90(T, SFX, 64, 2)                                                                \
    INSTANTIATE_ATT90(T, SFX, 80, 2)

INSTANTIATE_FLASH90(__nv_bfloat16, bf16)
INSTANTIATE_FLASH90(__half, f16)
