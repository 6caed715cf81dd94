// Flash attention for the DiffiT block on Hopper's warpgroup tensor-core instructions (wgmma).
// What the op computes and why: mod.rs beside this file; the mma.sync kernel (flash.cu) computes
// the same on every card. build.rs compiles this file only for sm_90, with -arch=sm_90a (wgmma
// needs the "a" target); the launcher (cuda.rs) picks it only on a 9.0 device. Design and
// measurements: docs/attention.md.

#include "../common.cuh"
#include "../mma.cuh"
#include "softmax.cuh"
#include <type_traits>

#if !defined(ATT90_MAX_HDP)
#error "ATT90_MAX_HDP comes from src/kernels/tiling.rs through build.rs"
#endif

// ---- The kernel ----
//
// A CTA is WG warpgroups (128 threads each) of 64 query rows each, of one (sample, head). Key
// blocks of BK rows stream through a cp.async ring of ST stages in shared memory, shared by the
// warpgroups; a stage holds the block's K, its V and the CTA's BQ × BK tile of the
// relative-position bias table (tiling.rs's ATT90_VARIANTS name each (WG, BK, ST) built). Per
// block, each warpgroup:
//   S = Q·Kᵀ      wgmma m64n{BK}k16, A = the Q tile (q's bias added once) and B = the K block,
//                 both from shared memory (K-major);
//   softmax       scale, + the bias tile from the stage, online maximum and sum as flash.cu;
//   O += P·V      wgmma m64n{HDP}k16, A = P in registers (the m64nNk16 f32 accumulator layout
//                 is the A-fragment layout of the next wgmma, so P never leaves registers),
//                 B = the V block from shared memory (MN-major: the transpose bit).
// Either one step after another, or (OV) with the softmax of block n running while block
// n − 1's P·V is on the tensor cores (FlashAttention-3's intra-warpgroup overlap).
// Q, K and V sit in shared memory in the no-swizzle ("interleave") canonical layout: 8 rows × 16
// bytes core matrices, each 128 contiguous bytes; core matrix (r, c) of a block (rows 8r…8r+7,
// columns 8c…8c+7) at (r · HDP/8 + c) · 128 bytes. For Q and K (A and B of Q·Kᵀ, K-major: M or
// N = rows, K = head dim) the descriptor's leading offset (next core matrix along K) is 128
// bytes and its stride offset (along M or N) HDP · 16; for V (B of P·V, MN-major: N = head dim,
// K = keys) the two swap. The same layout serves K and V, so a K row and a V row are copied alike.

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
    if constexpr (N == 80) {
        if constexpr (BF) wgmma_bf16_n80<TR>(d, a, desc, acc); else wgmma_f16_n80<TR>(d, a, desc, acc);
    } else if constexpr (N == 64) {
        if constexpr (BF) wgmma_bf16_n64<TR>(d, a, desc, acc); else wgmma_f16_n64<TR>(d, a, desc, acc);
    } else {
        static_assert(N == 32, "P·V wrappers exist for N = 32, 64 and 80 (the padded head dims)");
        if constexpr (BF) wgmma_bf16_n32<TR>(d, a, desc, acc); else wgmma_f16_n32<TR>(d, a, desc, acc);
    }
}

// The same with A from shared memory too (`adesc`, K-major, no transpose): Q·Kᵀ with the Q tile
// in shared memory, so no register holds Q across the key loop.
#define WGMMA_SS_N128(SFX) \
__device__ __forceinline__ void wgmma_ss_##SFX##_n128(float (&d)[64], uint64_t adesc, uint64_t bdesc, uint32_t acc) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n128k16.f32." #SFX "." #SFX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
        "%64, %65, p, 1, 1, 0, 0;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
        : "l"(adesc), "l"(bdesc), "r"(acc)); \
}
WGMMA_SS_N128(bf16)
WGMMA_SS_N128(f16)

#define WGMMA_SS_N64(SFX) \
__device__ __forceinline__ void wgmma_ss_##SFX##_n64(float (&d)[32], uint64_t adesc, uint64_t bdesc, uint32_t acc) { \
    asm volatile( \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n" \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." #SFX "." #SFX " " \
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, " \
        "%32, %33, p, 1, 1, 0, 0;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
        : "l"(adesc), "l"(bdesc), "r"(acc)); \
}
WGMMA_SS_N64(bf16)
WGMMA_SS_N64(f16)

template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t adesc, uint64_t bdesc, uint32_t acc) {
    constexpr bool BF = std::is_same<T, __nv_bfloat16>::value;
    if constexpr (N == 128) {
        if constexpr (BF) wgmma_ss_bf16_n128(d, adesc, bdesc, acc); else wgmma_ss_f16_n128(d, adesc, bdesc, acc);
    } else {
        static_assert(N == 64, "Q·Kᵀ wrappers exist for key blocks of 64 and 128");
        if constexpr (BF) wgmma_ss_bf16_n64(d, adesc, bdesc, acc); else wgmma_ss_f16_n64(d, adesc, bdesc, acc);
    }
}

template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory"); }

// A variant of the kernel: WG warpgroups a CTA, key blocks of BK through a ring of ST stages,
// and OV: whether a warpgroup overlaps its softmax of block n with its P·V of block n − 1
// (FlashAttention-3's intra-warpgroup pipelining) or runs S, softmax, P·V one after another.
// A stage holds the block's K, V and the CTA's BQ × BK tile of the relative-position bias.
template <typename T, int HDP, int WG, int BK, int ST, bool OV>
__device__ void attention_wgmma(const T *qkv, const T *sbias, const T *abias, T *out, uint32_t batch,
                                uint32_t tokens, uint32_t heads, uint32_t hd, uint32_t sb_stride,
                                uint32_t tile_count, float scale) {
    constexpr int THREADS = WG * 128;
    constexpr int BQ = WG * 64;
    constexpr int LD = HDP + 8;       // Q / output staging row stride (ldmatrix on distinct banks)
    constexpr int CPR = HDP / 8;      // 16-byte chunks a padded row
    constexpr int KSTEPS = HDP / 16;  // k-steps of Q·Kᵀ
    constexpr int KV = BK * HDP;      // elements of one K or V block
    constexpr int BLD = BK + 8;       // bias tile row stride: the accumulator-layout reads hit 32 banks
    constexpr int BCH = BK / 8;       // 16-byte chunks of a bias tile row
    constexpr int STAGE = 2 * KV + BQ * BLD;
    constexpr int SR = BK / 2;        // score registers a thread
    constexpr int OR = HDP / 2;       // output registers a thread
    constexpr int R8 = BK / 8;        // core-matrix rows of a block
    constexpr int T16 = THREADS / 16; // copy lanes groups of 16 (one core-matrix pair each)
    static_assert(CPR % 2 == 0 && BK % 16 == 0, "head dims a multiple of 16, key blocks of 16");
    static_assert(HDP <= ATT90_MAX_HDP, "head dims up to ATT90_MAX_HDP (tiling.rs says why)");
    static_assert((BQ * CPR) % THREADS == 0 && (BQ * BCH) % THREADS == 0, "copies tile the CTA");
    static_assert(R8 % T16 == 0 || T16 == 2 * R8, "K/V copy slots: see load_block");
    static_assert(!OV || ST >= 2, "the overlapped loop keeps two blocks in the ring");
    extern __shared__ __align__(128) unsigned char smem[];
    T *ring = reinterpret_cast<T *>(smem);  // [ST][K, V (core-matrix layout), bias tile [BQ][BLD]]
    T *qs = ring + ST * STAGE;              // [BQ][LD] row-major; output staging at the end
    T *sbs = qs + BQ * LD;                  // [2][HDP]: q's and v's per-sample bias of head h

    const uint32_t b = blockIdx.z, h = blockIdx.y;
    const uint32_t d = heads * hd, row_len = 3 * d;
    const uint32_t tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const uint32_t g = lane / 4, t = lane % 4;
    const uint32_t wr = warp * 16;  // the warp's first row in the tile (warpgroup w: rows 64w…)
    const uint32_t chunks = hd / 8;
    const T *sb = sbias + (size_t)b * sb_stride;
    const T *x = qkv + (size_t)b * tokens * row_len + h * hd;
    const T *bias_rows = abias + (size_t)h * tokens * tokens;

    // cp.async never writes the padding chunks [hd, HDP) of Q, K, V and the two bias slices:
    // zero them once, a row a thread (a loop over every chunk was a sixth of the kernel's
    // instructions at N = 256).
    if (chunks < CPR) {
        for (uint32_t r = tid; r < BQ + 2 * ST * BK + 2; r += THREADS) {
            const uint32_t kr = (r - BQ) % BK, kv = (r - BQ) / BK;  // kv: stage · 2 + (0: K, 1: V)
            for (uint32_t c = chunks; c < CPR; ++c) {
                T *dst = r < BQ                 ? qs + r * LD + c * 8
                         : r < BQ + 2 * ST * BK ? ring + (kv / 2) * STAGE + (kv % 2) * KV + ((kr / 8 * CPR + c) * 8 + kr % 8) * 8
                                                : sbs + (r - BQ - 2 * ST * BK) * HDP + c * 8;
                stp(dst, 0, zero_pack<T>());
            }
        }
    }
    if (tid < 2 * chunks) {  // q's and v's bias slices, in block 0's group
        const uint32_t which = tid / chunks, c = tid % chunks;  // 0: q, 1: v
        cp_async16(sbs + which * HDP + c * 8, sb + which * 2 * d + h * hd + c * 8, 16);
    }

    // The Q tile from row q0 (rows past the sequence: zeros).
    auto load_q = [&](uint32_t q0) {
#pragma unroll
        for (int p = 0; p < BQ * CPR / THREADS; ++p) {
            const uint32_t i = tid + p * THREADS, r = i / CPR, c = i % CPR;
            const bool ok = q0 + r < tokens;
            if (c < chunks) cp_async16(qs + r * LD + c * 8, ok ? x + (size_t)(q0 + r) * row_len + c * 8 : x, ok ? 16 : 0);
        }
    };
    const uint32_t blocks = (tokens + BK - 1) / BK;
    // Fixed copy slots, so that a block's copy is a few adds a chunk. K/V: lane l of a group of
    // 16 takes chunk parity l % 2 of key row (l % 16) / 2 of a core-matrix pair (8 rows × 2
    // chunks, 256 contiguous bytes of shared memory, two 32-byte sectors of each of 8 qkv rows);
    // group u of the CTA takes core-matrix row r8 = u + T16 · i (i < R8 / T16) or, where the CTA
    // has twice the groups, row u % R8 of K (u < R8) or V. Every p is then a compile-time
    // (K or V, chunk pair, row step) on top of the thread's own base.
    const uint32_t t16 = tid / 16, kr_in = (tid % 16) / 2, par = tid % 2;
    constexpr int RSTEPS = R8 % T16 == 0 ? R8 / T16 : 1;           // row steps a (K or V, pair)
    constexpr int WHICHES = R8 % T16 == 0 ? 2 : 1;                  // K and V both, or one a thread
    const uint32_t kv_r8 = R8 % T16 == 0 ? t16 : t16 % R8;
    const uint32_t kv_which = R8 % T16 == 0 ? 0 : t16 / R8;
    const uint32_t kv_row = kv_r8 * 8 + kr_in;                      // the thread's first key row
    const uint32_t kv_dst = kv_which * KV + (kv_r8 * CPR * 8 + par * 8 + kr_in) * 8;
    const size_t kv_src = (size_t)kv_row * row_len + (1 + kv_which) * d + par * 8;
    const size_t row_step = (size_t)T16 * 8 * row_len;              // keys a row step further
    // Bias tile: rows b_r + p · B_RPP, chunk b_c.
    constexpr int B_RPP = THREADS / BCH;
    const uint32_t b_c = tid % BCH, b_r = tid / BCH;
    // The bias tile of query tile q0 and key block blk into the block's stage; masked: rows or
    // chunks past the sequence get zeros (tokens is a multiple of 8, so a chunk is in or out).
    auto copy_bias = [&](uint32_t blk, uint32_t q0, auto masked) {
        constexpr bool M = decltype(masked)::value;
        T *bt = ring + (blk % ST) * STAGE + 2 * KV;
        const uint32_t kb = blk * BK;
        const T *bsrc = bias_rows + (size_t)(q0 + b_r) * tokens + kb + b_c * 8;
#pragma unroll
        for (int p = 0; p < BQ / B_RPP; ++p) {
            T *dst = bt + (b_r + p * B_RPP) * BLD + b_c * 8;
            const T *from = bsrc + (size_t)p * B_RPP * tokens;
            if (M) {
                const bool ok = q0 + b_r + p * B_RPP < tokens && kb + b_c * 8 < tokens;
                cp_async16(dst, ok ? from : abias, ok ? 16 : 0);
            } else {
                cp_async16_full(dst, from);
            }
        }
    };
    auto copy_block = [&](uint32_t blk, uint32_t q0, auto masked) {
        constexpr bool M = decltype(masked)::value;
        T *ks = ring + (blk % ST) * STAGE;
        const uint32_t kb = blk * BK;
        const T *src = x + (size_t)kb * row_len + kv_src;
#pragma unroll
        for (int w = 0; w < WHICHES; ++w)
#pragma unroll
            for (int pair = 0; pair < CPR / 2; ++pair)
#pragma unroll
                for (int i = 0; i < RSTEPS; ++i) {
                    T *dst = ks + kv_dst + w * KV + (i * T16 * CPR + 2 * pair) * 64;
                    const T *from = src + i * row_step + w * d + pair * 16;
                    if (M) {
                        const bool ok = kb + kv_row + i * T16 * 8 < tokens;
                        if (2 * pair + par < chunks) cp_async16(dst, ok ? from : x, ok ? 16 : 0);
                    } else {
                        cp_async16_if(2 * pair + par < chunks, dst, from);
                    }
                }
        copy_bias(blk, q0, masked);
    };
    // Key block blk (K, V and the bias tile of q0) into its stage as one cp.async group (empty
    // past the last block). A block whose keys and the tile's queries all lie in the sequence
    // copies without a bound check a chunk.
    auto load_block = [&](uint32_t blk, uint32_t q0) {
        if (blk < blocks) {
            if ((blk + 1) * BK <= tokens && q0 + BQ <= tokens) {
                copy_block(blk, q0, std::false_type{});
            } else {
                copy_block(blk, q0, std::true_type{});
            }
        }
        cp_async_commit();
    };
    // The CTA's query tiles: tile_count of them from tile blockIdx.x · tile_count. More than one
    // only where every key block stays in the ring (the launcher checks), so K and V are read
    // once for all of them; each tile reloads only Q and its bias tiles.
    const uint32_t q_first = blockIdx.x * tile_count * BQ;
    load_q(q_first);
#pragma unroll
    for (int st = 0; st < ST; ++st) load_block(st, q_first);  // Q and the bias slices travel in block 0's group
    for (uint32_t tile = 0; tile < tile_count; ++tile) {
        const uint32_t q0 = q_first + tile * BQ;
        if (q0 >= tokens) break;
        if (tile > 0) {
            __syncthreads();  // every warp has written its rows of the last tile out of qs
            load_q(q0);
            for (uint32_t blk = 0; blk < blocks; ++blk) copy_bias(blk, q0, std::true_type{});
            cp_async_commit();
            cp_async_wait<0>();
        } else {
            cp_async_wait<ST - 1>();
        }
        __syncthreads();
        // Q + q's bias (added in f32, then rounded), rewritten in place into the core-matrix
        // layout wgmma reads A from (as K: core matrix (r8, c) at (r8 · CPR + c) · 64 elements),
        // warpgroup w's 64 rows from qs + w · 64 · HDP.
        {
            constexpr int QP = BQ * CPR / THREADS;
            uint4 qv[QP];
#pragma unroll
            for (int p = 0; p < QP; ++p) {
                const uint32_t i = tid + p * THREADS, r = i / CPR, c = i % CPR;
                const uint4 raw = *reinterpret_cast<const uint4 *>(qs + r * LD + c * 8);
                const uint4 bias = *reinterpret_cast<const uint4 *>(sbs + c * 8);
                uint32_t *w = &qv[p].x;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float2 x = widen_pair<T>((&raw.x)[e]), y = widen_pair<T>((&bias.x)[e]);
                    w[e] = pack2<T>(x.x + y.x, x.y + y.y);
                }
            }
            __syncthreads();  // every row-major chunk is read before any is overwritten
#pragma unroll
            for (int p = 0; p < QP; ++p) {
                const uint32_t i = tid + p * THREADS, r = i / CPR, c = i % CPR;
                *reinterpret_cast<uint4 *>(qs + ((r / 8 * CPR + c) * 8 + r % 8) * 8) = qv[p];
            }
            fence_proxy_async();  // published to wgmma by the first block's barrier
        }

        float o[OR], s[SR];
#pragma unroll
        for (int i = 0; i < OR; ++i) o[i] = 0.0f;
#pragma unroll
        for (int i = 0; i < SR; ++i) s[i] = 0.0f;
        uint32_t pf[BK / 16][4];
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows g and g + 8

        // Block blk's stage is complete in every thread's view: published to wgmma (async proxy).
        auto publish = [&]() {
            fence_proxy_async();
            __syncthreads();
        };
        // S = Q·Kᵀ of block blk, issued as one wgmma group (the caller fences and commits), A
        // and B from shared memory; a k-step further is 2 core matrices further in both. (With
        // Q in registers as A fragments, ptxas gave P the Q fragments' registers wherever P·V's
        // wgmma had Q·Kᵀ's shape, head dim 64 with key blocks of 64, in the non-overlapped loop:
        // every block after the first multiplied P by K.)
        const uint64_t qdesc = smem_desc(smem_addr(qs + warp / 4 * 64 * HDP), 128, HDP * 16);
        auto issue_s = [&](uint32_t blk) {
            const uint64_t kdesc = smem_desc(smem_addr(ring + (blk % ST) * STAGE), 128, HDP * 16);
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) wgmma_ss<T, BK>(s, qdesc + kk * 16, kdesc + kk * 16, kk > 0);
        };
        // O += P·V of block blk (a k-step further is 2 · HDP/8 core matrices of V further).
        auto issue_pv = [&](uint32_t blk) {
            const uint64_t vdesc = smem_desc(smem_addr(ring + (blk % ST) * STAGE + KV), HDP * 16, 128);
#pragma unroll
            for (int kk = 0; kk < BK / 16; ++kk) wgmma<T, HDP, 1>(o, pf[kk], vdesc + kk * 2 * HDP, 1);
        };
        // Logits of block blk in s: scale, + the bias tile from the stage; keys past the
        // sequence (only in a partial last block) get −∞.
        auto logits = [&](uint32_t blk, auto masked) {
            const uint32_t kb = blk * BK;
            const T *b0 = ring + (blk % ST) * STAGE + 2 * KV + (wr + g) * BLD + 2 * t, *b1 = b0 + 8 * BLD;
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                const float2 e0 = widen_pair<T>(*reinterpret_cast<const uint32_t *>(b0 + j * 8));
                const float2 e1 = widen_pair<T>(*reinterpret_cast<const uint32_t *>(b1 + j * 8));
                s[4 * j + 0] = fmaf(s[4 * j + 0], scale, e0.x);
                s[4 * j + 1] = fmaf(s[4 * j + 1], scale, e0.y);
                s[4 * j + 2] = fmaf(s[4 * j + 2], scale, e1.x);
                s[4 * j + 3] = fmaf(s[4 * j + 3], scale, e1.y);
                if (decltype(masked)::value) {
                    const uint32_t c = kb + j * 8 + 2 * t;
                    if (c >= tokens) s[4 * j + 0] = s[4 * j + 2] = -INFINITY;
                    if (c + 1 >= tokens) s[4 * j + 1] = s[4 * j + 3] = -INFINITY;
                }
            }
        };
        // The online softmax of block blk: logits, the new row maxima (a tree, then the four
        // lanes of a row), s ← exp(logit − max), the running sums; returns the factors a0, a1
        // that rescale the output accumulated so far.
        auto softmax = [&](uint32_t blk, float &a0, float &a1) {
            if ((blk + 1) * BK <= tokens) {
                logits(blk, std::false_type{});
            } else {
                logits(blk, std::true_type{});
            }
            float t0[BK / 8], t1[BK / 8];
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                t0[j] = fmaxf(s[4 * j], s[4 * j + 1]);
                t1[j] = fmaxf(s[4 * j + 2], s[4 * j + 3]);
            }
#pragma unroll
            for (int w = 1; w < BK / 8; w *= 2)
#pragma unroll
                for (int j = 0; j + w < BK / 8; j += 2 * w) {
                    t0[j] = fmaxf(t0[j], t0[j + w]);
                    t1[j] = fmaxf(t1[j], t1[j + w]);
                }
            float mx0 = fmaxf(m0, t0[0]), mx1 = fmaxf(m1, t1[0]);
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(FULL_MASK, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(FULL_MASK, mx1, 2));
            // Every block holds a key of the sequence, so the maxima are finite from here on.
            a0 = fast_exp2((m0 - mx0) * LOG2E);
            a1 = fast_exp2((m1 - mx1) * LOG2E);
            const float n0 = -mx0 * LOG2E, n1 = -mx1 * LOG2E;
            m0 = mx0;
            m1 = mx1;
            l0 *= a0;
            l1 *= a1;
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                s[4 * j + 0] = fast_exp2(fmaf(s[4 * j + 0], LOG2E, n0));
                s[4 * j + 1] = fast_exp2(fmaf(s[4 * j + 1], LOG2E, n0));
                s[4 * j + 2] = fast_exp2(fmaf(s[4 * j + 2], LOG2E, n1));
                s[4 * j + 3] = fast_exp2(fmaf(s[4 * j + 3], LOG2E, n1));
                l0 += s[4 * j + 0] + s[4 * j + 1];
                l1 += s[4 * j + 2] + s[4 * j + 3];
            }
        };
        // O ← O · a (skipped before block 1, where O is still zero, and where no row maximum of
        // the warp moved: every factor is then exactly 1), and P packed from s for the P·V wgmma: score n-tiles 2kk and 2kk + 1 are
        // A fragment kk ({row g, row g + 8} × {cols 0–7, 8–15}).
        auto rescale_and_pack = [&](uint32_t blk, float a0, float a1) {
            if (blk > 0 && __any_sync(FULL_MASK, a0 != 1.0f || a1 != 1.0f)) {  // block 0: O is zero
#pragma unroll
                for (int i = 0; i < OR; i += 4) {
                    o[i] *= a0;
                    o[i + 1] *= a0;
                    o[i + 2] *= a1;
                    o[i + 3] *= a1;
                }
            }
#pragma unroll
            for (int j = 0; j < BK / 8; ++j) {
                pf[j / 2][2 * (j % 2)] = pack2<T>(s[4 * j], s[4 * j + 1]);
                pf[j / 2][2 * (j % 2) + 1] = pack2<T>(s[4 * j + 2], s[4 * j + 3]);
            }
        };

        float a0, a1;
        if constexpr (OV) {
            // Block 0 alone, then per block n: issue S(n) and P·V(n − 1) together, run the
            // softmax of S(n) while P·V(n − 1) is on the tensor cores, wait for it, rescale.
            // The ring's wait counts: ST groups in flight at the start, one refill per block
            // from block 1 on.
            publish();
            pin(s);
            wgmma_fence();
            issue_s(0);
            wgmma_commit();
            wgmma_wait<0>();
            pin(s);
            softmax(0, a0, a1);
            rescale_and_pack(0, a0, a1);
            for (uint32_t blk = 1; blk < blocks; ++blk) {
                cp_async_wait<(ST >= 2 ? ST - 2 : 0)>();
                publish();
                pin(s);
                pin(o);
                pin(pf);
                wgmma_fence();
                issue_s(blk);
                wgmma_commit();
                issue_pv(blk - 1);
                wgmma_commit();
                wgmma_wait<1>();
                pin(s);
                softmax(blk, a0, a1);
                wgmma_wait<0>();
                pin(o);
                pin(pf);
                rescale_and_pack(blk, a0, a1);
                __syncthreads();  // every warpgroup is done with block blk − 1's stage: refill it
                load_block(blk - 1 + ST, q0);
            }
            pin(o);
            pin(pf);
            wgmma_fence();
            issue_pv(blocks - 1);
            wgmma_commit();
            wgmma_wait<0>();
            pin(o);
            pin(pf);
        } else {
            for (uint32_t blk = 0; blk < blocks; ++blk) {
                cp_async_wait<ST - 1>();
                publish();
                pin(s);
                wgmma_fence();
                issue_s(blk);
                wgmma_commit();
                wgmma_wait<0>();
                pin(s);
                softmax(blk, a0, a1);
                rescale_and_pack(blk, a0, a1);
                pin(o);
                pin(pf);
                wgmma_fence();
                issue_pv(blk);
                wgmma_commit();
                wgmma_wait<0>();
                pin(o);
                pin(pf);
                __syncthreads();  // every warpgroup is done with this stage: refill it
                load_block(blk + ST, q0);
            }
        }
        cp_async_wait<0>();
        __syncthreads();  // every warpgroup's last Q·Kᵀ has read Q before qs stages the output

        // Normalise, add v's bias, stage the warp's rows in its own rows of qs, write 16 bytes a lane.
        l0 += __shfl_xor_sync(FULL_MASK, l0, 1);
        l0 += __shfl_xor_sync(FULL_MASK, l0, 2);
        l1 += __shfl_xor_sync(FULL_MASK, l1, 1);
        l1 += __shfl_xor_sync(FULL_MASK, l1, 2);
        const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
#pragma unroll
        for (int n = 0; n < HDP / 8; ++n) {
            const uint32_t c = n * 8 + 2 * t;
            const float2 v = widen_pair<T>(*reinterpret_cast<const uint32_t *>(sbs + HDP + c));  // zero padded
            T *row = qs + (wr + g) * LD + c;
            *reinterpret_cast<uint32_t *>(row) = pack2<T>(o[4 * n] * inv0 + v.x, o[4 * n + 1] * inv0 + v.y);
            *reinterpret_cast<uint32_t *>(row + 8 * LD) = pack2<T>(o[4 * n + 2] * inv1 + v.x, o[4 * n + 3] * inv1 + v.y);
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

// Kernels attention90_{HDP}_w{WG}k{BK}s{ST}o{OV}_{bf16,f16}, one per variant of tiling.rs's
// ATT90_VARIANTS (build.rs checks the two lists agree); the launcher (cuda.rs) picks one.
// Minimum CTAs an SM: what the variant's shared memory allows at head dim 80 (cuda.rs sizes it),
// so the register cap matches the occupancy the ring permits.
#define INSTANTIATE_ATT90(T, SFX, HDP, WG, BK, ST, OV, MINB)                                         \
    extern "C" __global__ void __launch_bounds__(WG * 128, MINB)                                    \
        attention90_##HDP##_w##WG##k##BK##s##ST##o##OV##_##SFX(                                     \
            const T *qkv, const T *sb, const T *ab, T *out, uint32_t batch, uint32_t tokens,        \
            uint32_t heads, uint32_t hd, uint32_t sb_stride, uint32_t tile_count, float scale) {    \
        attention_wgmma<T, HDP, WG, BK, ST, OV>(qkv, sb, ab, out, batch, tokens, heads, hd,         \
                                                sb_stride, tile_count, scale);                     \
    }
#define INSTANTIATE_VARIANTS(T, SFX, HDP)                                                           \
    INSTANTIATE_ATT90(T, SFX, HDP, 1, 64, 2, 0, 3)                                                  \
    INSTANTIATE_ATT90(T, SFX, HDP, 2, 64, 2, 0, 2)                                                  \
    INSTANTIATE_ATT90(T, SFX, HDP, 2, 64, 2, 1, 2)                                                  \
    INSTANTIATE_ATT90(T, SFX, HDP, 2, 128, 2, 1, 1)
#define INSTANTIATE_FLASH90(T, SFX)                                                                 \
    INSTANTIATE_VARIANTS(T, SFX, 32)                                                                \
    INSTANTIATE_VARIANTS(T, SFX, 64)                                                                \
    INSTANTIATE_VARIANTS(T, SFX, 80)

INSTANTIATE_FLASH90(__nv_bfloat16, bf16)
INSTANTIATE_FLASH90(__half, f16)
