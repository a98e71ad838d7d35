/* gpu/moe_gemm.h's grouped expert GEMM for Hopper.
 * A CTA (384 threads, one per SM, persistent) computes 128 x 256 output tiles: rows of one
 * expert's tokens by 256 columns of its weights (for SwiGLU: 128 columns of W1 and the same 128
 * of W3, so that a and b of one element land in one thread). Warpgroup 0 is the producer: one
 * thread issues the TMA loads of A (128 x 64) and B (256 x 64: two 128-row boxes, or four
 * 64 x 64 boxes along N when B is stored (K, N)) per 64-wide K step into a
 * 4-stage ring (128-byte swizzle, the layout wgmma reads), an mbarrier per stage saying full
 * (TMA bytes arrived) and one saying empty (the 8 consumer warps are done with it).
 * Warpgroups 1 and 2 each own 64 of the 128 rows: per stage four wgmma m64n256k16 on shared
 * memory descriptors, one group in flight while the previous stage is released, then the
 * epilogue: the 128 fp32 accumulators per thread rounded to bf16 (SwiGLU on them), each warp
 * staging 16 x 64 slices in shared memory (stmatrix) and storing whole 128-byte rows, masked to
 * the expert's rows. Tiles go expert by expert, within an expert 16 row tiles at a time
 * across all column tiles, so that a wave of CTAs shares A and B in L2. */
#include "gpu/moe_gemm.h"
#include "gpu/stream.h"

#include <cuda.h>
#include <cudaTypedefs.h>
#include <stdio.h>
#include <stdlib.h>

typedef __nv_bfloat16 bf16;

namespace {

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, MAX_E = 256;
constexpr int THREADS = 384;                     /* warpgroup 0 loads, 1 and 2 compute */
constexpr int CONSUMER_WARPS = 8;
constexpr uint32_t A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2;
constexpr int OUT_PITCH = 144; /* bytes per staged output row: 64 bf16 and 16 against conflicts */

struct smem_t {
    bf16 a[STAGES][BM * BK]; /* 16 KiB a stage, 1024-byte aligned as the swizzle needs */
    bf16 b[STAGES][BN * BK]; /* 32 KiB: rows 0-127 one TMA box, 128-255 another */
    uint64_t full[STAGES], empty[STAGES];
    int tile0[MAX_E + 1]; /* each expert's first tile; [E]: the total */
    int row0[MAX_E + 1];  /* each expert's first row; [E]: all rows */
    alignas(16) uint8_t out[CONSUMER_WARPS][16 * OUT_PITCH]; /* each consumer warp's staging */
};
constexpr size_t SMEM_BYTES = sizeof(smem_t) + 1024; /* + the slack to align it */

__device__ __forceinline__ uint32_t s_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void s_bar_init(uint64_t *bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(s_addr(bar)), "r"(count));
}

__device__ __forceinline__ void s_bar_expect(uint64_t *bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(s_addr(bar)),
                 "r"(bytes)
                 : "memory");
}

__device__ __forceinline__ void s_bar_arrive(uint64_t *bar)
{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(s_addr(bar)) : "memory");
}

/* Returns once the barrier's phase of the given parity has completed. */
__device__ __forceinline__ void s_bar_wait(uint64_t *bar, uint32_t parity)
{
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\n"
                     "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done)
                     : "r"(s_addr(bar)), "r"(parity)
                     : "memory");
}

/* The (c0 inner, c1 outer) box of map into dst, counted on bar. */
__device__ __forceinline__ void s_tma(void *dst, const CUtensorMap *map, int c0, int c1,
                                      uint64_t *bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];" ::"r"(s_addr(dst)),
                 "l"((uint64_t)map), "r"(c0), "r"(c1), "r"(s_addr(bar))
                 : "memory");
}

/* A shared-memory matrix descriptor in the 128-byte swizzle (start address, leading and stride
 * byte offsets). K-major (A, and B stored (N, K)): 8-row groups of 128-byte rows, 1024 bytes
 * apart (stride; leading unused); stepping 16 elements of K is adding 32 bytes to the start.
 * N-major (B stored (K, N), TMA boxes of 64 N by 64 K): 64 N-elements per 128-byte row, one
 * row per k, 8-k groups 1024 bytes apart (stride), the next 64 N-elements one box (8 KiB) on
 * (leading); stepping 16 of K is 16 rows, 2048 bytes. */
__device__ __forceinline__ uint64_t s_desc(uint32_t addr, uint32_t lead)
{
    return (uint64_t)((addr & 0x3ffff) >> 4) | ((uint64_t)(lead >> 4) << 16) |
           ((uint64_t)(1024 >> 4) << 32) | ((uint64_t)1 << 62);
}

#define S_F8(i)                                                                                \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]),                \
        "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define S_F32(i) S_F8(i), S_F8(i + 8), S_F8(i + 16), S_F8(i + 24)

/* d (64 x 256 per warpgroup, fp32) = (accumulate ? d : 0) + A (64 x 16) B^T (16 x 256); B
 * K-major (TB 0) or N-major (TB 1) in shared memory. */
template <int TB>
__device__ __forceinline__ void s_wgmma(float (&d)[128], uint64_t da, uint64_t db,
                                        int accumulate)
{
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, "
        "%19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, "
        "%36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, "
        "%53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, "
        "%70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, "
        "%87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, "
        "%103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, "
        "%117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
        "%128, %129, p, 1, 1, 0, %131;\n}\n"
        : S_F32(0), S_F32(32), S_F32(64), S_F32(96)
        : "l"(da), "l"(db), "r"(accumulate), "n"(TB));
}

__device__ __forceinline__ void s_wgmma_fence()
{
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void s_wgmma_commit()
{
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

template <int N> __device__ __forceinline__ void s_wgmma_wait()
{
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ float s_bf(float v) { return __bfloat162float(__float2bfloat16(v)); }

__device__ __forceinline__ uint32_t s_pack(float x, float y)
{
    __nv_bfloat162 p = __floats2bfloat162_rn(x, y);
    return *(uint32_t *)&p;
}

/* silu(a) rounded to bf16, with the fast exp and division (a few ulp of fp32 before the
 * rounding; exp(-a) = inf gives -0) */
__device__ __forceinline__ float s_silu_bf(float a)
{
    return s_bf(__fdividef(a, 1.0f + __expf(-a)));
}

/* The warp's 16 x 64 slice w (s_store_slice's layout) into its staging rows (OUT_PITCH bytes
 * a row: conflict-free), readable by the whole warp on return. */
__device__ __forceinline__ void s_stage_rows(uint8_t *buf, const uint32_t (&w)[8][2], int lane)
{
    const uint32_t base = s_addr(buf);
    const int mi = lane / 8, r = lane % 8;
#pragma unroll
    for (int j = 0; j < 8; j += 2) {
        uint32_t a = base + ((mi & 1) * 8 + r) * OUT_PITCH + (j + (mi >> 1)) * 16;
        asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(a),
                     "r"(w[j][0]), "r"(w[j][1]), "r"(w[j + 1][0]), "r"(w[j + 1][1])
                     : "memory");
    }
    __syncwarp();
}

/* A warp's 16 x 64 slice of bf16 output to dst (row pitch ld elements; rows from `left` on
 * skipped): w[j][h] holds the accumulator fragment's packed pair for columns 8j .. 8j+7 and
 * rows h*8 .. h*8+7 (row lane/4, columns 2(lane%4), +1). stmatrix puts the 16 rows into the
 * warp's staging buffer (OUT_PITCH bytes a row: conflict-free), from where each lane stores
 * 16-byte pieces, a warp covering 4 whole 128-byte rows per instruction. */
__device__ __forceinline__ void s_store_slice(uint8_t *buf, const uint32_t (&w)[8][2], bf16 *dst,
                                              int ld, int left, int lane)
{
    const int r = lane % 8;
    s_stage_rows(buf, w, lane);
#pragma unroll
    for (int q = 0; q < 4; q++) {
        int row = lane / 8 + 4 * q;
        uint4 v = *(const uint4 *)(buf + row * OUT_PITCH + r * 16);
        if (row < left)
            *(uint4 *)(dst + (size_t)row * ld + r * 8) = v;
    }
    __syncwarp();
}

/* SwiGLU's backward on a warp's 16 x 64 slice of dg (w as in s_store_slice, rounded to bf16 as
 * the unfused path stores dg): with a, b from ab (row pitch 2f) at the same rows and columns (b
 * f columns on), [da | db] = [bf16(dg b) s (1 + a (1 - s)) | dg bf16(silu(a))], s = sigmoid(a),
 * to dab (same layout as ab); rows from `left` on skipped. */
__device__ __forceinline__ void s_dswiglu_slice(uint8_t *buf, const uint32_t (&w)[8][2],
                                                const bf16 *ab, bf16 *dab, int f, int left,
                                                int lane)
{
    const int r = lane % 8;
    s_stage_rows(buf, w, lane);
#pragma unroll
    for (int q0 = 0; q0 < 4; q0 += 2) { /* two rows' loads in flight per lane at a time */
        uint4 vg[2], va[2], vb[2];
#pragma unroll
        for (int q = 0; q < 2; q++) {
            int row = lane / 8 + 4 * (q0 + q);
            vg[q] = *(const uint4 *)(buf + row * OUT_PITCH + r * 16);
            if (row < left) {
                const bf16 *p = ab + (size_t)row * 2 * f + r * 8;
                va[q] = *(const uint4 *)p;
                vb[q] = *(const uint4 *)(p + f);
            }
        }
#pragma unroll
        for (int q = 0; q < 2; q++) {
            int row = lane / 8 + 4 * (q0 + q);
            if (row >= left)
                continue;
            const bf16 *g8 = (const bf16 *)&vg[q], *a8 = (const bf16 *)&va[q],
                       *b8 = (const bf16 *)&vb[q];
            uint4 oa, ob;
            bf16 *da8 = (bf16 *)&oa, *db8 = (bf16 *)&ob;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                float a = __bfloat162float(a8[i]), b = __bfloat162float(b8[i]);
                float g = __bfloat162float(g8[i]);
                float sg = __fdividef(1.0f, 1.0f + __expf(-a));
                da8[i] = __float2bfloat16(s_bf(g * b) * sg * (1.0f + a * (1.0f - sg)));
                db8[i] = __float2bfloat16(g * s_bf(a * sg));
            }
            bf16 *p = dab + (size_t)row * 2 * f + r * 8;
            *(uint4 *)p = oa;
            *(uint4 *)(p + f) = ob;
        }
    }
    __syncwarp(); /* the staging rows are free for the next slice */
}

struct tile_t {
    int e, mt, nt;
};

/* Tile t's expert, row tile and column tile (ntiles column tiles per expert): group > 0 takes
 * `group` row tiles at a time across all column tiles (row tiles fastest), group < 0 -group
 * column tiles at a time across all row tiles (column tiles fastest). */
__device__ __forceinline__ tile_t s_tile(const smem_t &s, int ntiles, int group, int t)
{
    int e = 0;
    while (s.tile0[e + 1] <= t)
        e++;
    int lt = t - s.tile0[e], mtiles = (s.row0[e + 1] - s.row0[e] + BM - 1) / BM;
    if (group < 0) {
        int gs = -group, per = gs * mtiles, g = lt / per, r = lt % per;
        int gn = min(gs, ntiles - g * gs);
        return {e, r / gn, g * gs + r % gn};
    }
    int per = group * ntiles, g = lt / per, r = lt % per;
    int gm = min(group, mtiles - g * group);
    return {e, g * group + r % gm, r / gm};
}

/* C = A B_e^T per expert, epilogue EPI (gpu_moe_epi_t), B_e stored (N, K) (BKN 0) or (K, N)
 * (BKN 1). N is the GEMM's own width: for SWIGLU 2f ([a | b]), for DSWIGLU f (dg). */
template <int EPI, int BKN>
__global__ void __launch_bounds__(THREADS, 1)
    s_gemm_kernel(const __grid_constant__ CUtensorMap tma_a,
                  const __grid_constant__ CUtensorMap tma_b, const int32_t *counts, int E, int N,
                  int K, bf16 *C, bf16 *G, const bf16 *AB, int group)
{
    extern __shared__ uint8_t s_raw[];
    smem_t &s = *(smem_t *)(((uintptr_t)s_raw + 1023) & ~(uintptr_t)1023);
    const int ntiles = N / BN, ksteps = K / BK;

    if (threadIdx.x == 0) {
        int t = 0, r = 0;
        for (int e = 0; e < E; e++) {
            int n = counts[e];
            s.tile0[e] = t;
            s.row0[e] = r;
            t += (n + BM - 1) / BM * ntiles;
            r += n;
        }
        s.tile0[E] = t;
        s.row0[E] = r;
        for (int i = 0; i < STAGES; i++) {
            s_bar_init(&s.full[i], 1);
            s_bar_init(&s.empty[i], CONSUMER_WARPS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int total = s.tile0[E], wg = threadIdx.x / 128;

    if (wg == 0) { /* the producer */
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (threadIdx.x != 0)
            return;
        int st = 0;
        uint32_t ph = 0;
        for (int t = blockIdx.x; t < total; t += gridDim.x) {
            tile_t tl = s_tile(s, ntiles, group, t);
            int arow = s.row0[tl.e] + tl.mt * BM;
            /* B rows (BKN 0): 256 of the expert's N, or for SwiGLU 128 of W1's and W3's */
            int b0 = tl.e * N + tl.nt * (EPI == GPU_MOE_EPI_SWIGLU ? BN / 2 : BN);
            int b1 = EPI == GPU_MOE_EPI_SWIGLU ? b0 + N / 2 : b0 + BN / 2;
            for (int kt = 0; kt < ksteps; kt++) {
                s_bar_wait(&s.empty[st], ph ^ 1);
                s_bar_expect(&s.full[st], A_BYTES + B_BYTES);
                s_tma(s.a[st], &tma_a, kt * BK, arow, &s.full[st]);
                if (BKN) { /* four 64 x 64 boxes along N, rows k of expert e */
#pragma unroll
                    for (int q = 0; q < 4; q++)
                        s_tma(s.b[st] + q * 64 * BK, &tma_b, tl.nt * BN + 64 * q,
                              tl.e * K + kt * BK, &s.full[st]);
                } else {
                    s_tma(s.b[st], &tma_b, kt * BK, b0, &s.full[st]);
                    s_tma(s.b[st] + (BN / 2) * BK, &tma_b, kt * BK, b1, &s.full[st]);
                }
                if (++st == STAGES) {
                    st = 0;
                    ph ^= 1;
                }
            }
        }
        return;
    }

    /* the consumers: warpgroup cw owns rows cw*64 .. cw*64+63 of each tile */
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int cw = wg - 1, warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    float d[128];
#pragma unroll
    for (int i = 0; i < 128; i++)
        d[i] = 0.0f;
    int st = 0;
    uint32_t ph = 0;
    for (int t = blockIdx.x; t < total; t += gridDim.x) {
        tile_t tl = s_tile(s, ntiles, group, t);
        int prev = 0;
        for (int kt = 0; kt < ksteps; kt++) {
            s_bar_wait(&s.full[st], ph);
            uint32_t a = s_addr(s.a[st]) + cw * 64 * 128, b = s_addr(s.b[st]);
            s_wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BK / 16; kk++)
                s_wgmma<BKN>(d, s_desc(a + kk * 32, 16),
                             BKN ? s_desc(b + kk * 2048, 64 * BK * 2) : s_desc(b + kk * 32, 16),
                             kt | kk);
            s_wgmma_commit();
            if (kt > 0) { /* the previous stage's products are done: release it */
                s_wgmma_wait<1>();
                if (lane == 0)
                    s_bar_arrive(&s.empty[prev]);
            }
            prev = st;
            if (++st == STAGES) {
                st = 0;
                ph ^= 1;
            }
        }
        s_wgmma_wait<0>();
        if (lane == 0)
            s_bar_arrive(&s.empty[prev]);

        /* the epilogue, 64 columns at a time through the warp's staging rows */
        const int wrow = tl.mt * BM + cw * 64 + warp * 16; /* the warp's first row */
        const int left = s.row0[tl.e + 1] - s.row0[tl.e] - wrow;
        if (left <= 0)
            continue;
        const size_t grow = (size_t)s.row0[tl.e] + wrow;
        uint8_t *buf = s.out[cw * 4 + warp];
        uint32_t w[8][2];
        if (EPI == GPU_MOE_EPI_SWIGLU) { /* accumulator columns 0-127 are a, 128-255 b */
            const int f = N / 2;
            bf16 *ca = C + grow * N + tl.nt * (BN / 2), *gg = G + grow * f + tl.nt * (BN / 2);
#pragma unroll
            for (int sl = 0; sl < 2; sl++) {
                uint32_t wb[8][2], wg[8][2];
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        int ia = 4 * (8 * sl + j) + 2 * h, ib = ia + 64;
                        float a0 = s_bf(d[ia]), a1 = s_bf(d[ia + 1]);
                        float b0 = s_bf(d[ib]), b1 = s_bf(d[ib + 1]);
                        w[j][h] = s_pack(a0, a1);
                        wb[j][h] = s_pack(b0, b1);
                        wg[j][h] = s_pack(s_silu_bf(a0) * b0, s_silu_bf(a1) * b1);
                    }
                s_store_slice(buf, w, ca + 64 * sl, N, left, lane);
                s_store_slice(buf, wb, ca + f + 64 * sl, N, left, lane);
                s_store_slice(buf, wg, gg + 64 * sl, f, left, lane);
            }
        } else {
#pragma unroll
            for (int sl = 0; sl < 4; sl++) {
#pragma unroll
                for (int j = 0; j < 8; j++)
#pragma unroll
                    for (int h = 0; h < 2; h++)
                        w[j][h] = s_pack(d[4 * (8 * sl + j) + 2 * h],
                                         d[4 * (8 * sl + j) + 2 * h + 1]);
                size_t col = (size_t)tl.nt * BN + 64 * sl;
                if (EPI == GPU_MOE_EPI_DSWIGLU)
                    s_dswiglu_slice(buf, w, AB + grow * 2 * N + col, C + grow * 2 * N + col, N,
                                    left, lane);
                else
                    s_store_slice(buf, w, C + grow * N + col, N, left, lane);
            }
        }
    }
}

/* cuTensorMapEncodeTiled from the driver, found once through the runtime (no -lcuda). */
PFN_cuTensorMapEncodeTiled_v12000 s_encode_fn(void)
{
    static PFN_cuTensorMapEncodeTiled_v12000 fn;
    static bool tried;
    if (!tried) {
        tried = true;
        void *p = NULL;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                             cudaEnableDefault, &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            fn = (PFN_cuTensorMapEncodeTiled_v12000)p;
        else
            fprintf(stderr, "semoe gpu_moe_gemm: the driver has no cuTensorMapEncodeTiled; "
                            "the expert GEMMs use cuBLAS\n");
    }
    return fn;
}

/* A 2D row-major bf16 (rows, cols) tensor as boxes of 64 columns by box_rows rows in the
 * 128-byte swizzle. */
CUtensorMap s_map(const bf16 *p, int rows, int cols, int box_rows)
{
    CUtensorMap m;
    cuuint64_t dim[2] = {(cuuint64_t)cols, (cuuint64_t)rows}, stride[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {64, (cuuint32_t)box_rows}, step[2] = {1, 1};
    CUresult r = s_encode_fn()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, (void *)p, dim, stride,
                               box, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
                               CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (r != CUDA_SUCCESS) {
        fprintf(stderr, "semoe gpu_moe_gemm: cuTensorMapEncodeTiled (%d x %d at %p) failed: %d\n",
                rows, cols, (const void *)p, (int)r);
        abort();
    }
    return m;
}

/* The tile order (s_tile's group): 16 row tiles at a time, or SEMOE_MOE_GEMM_GROUP (a nonzero
 * integer within +-64, for measuring others). */
int s_group(void)
{
    static int group;
    if (!group) {
        const char *v = getenv("SEMOE_MOE_GEMM_GROUP");
        int g = v ? atoi(v) : 0;
        group = g && g >= -64 && g <= 64 ? g : 16;
    }
    return group;
}

template <int EPI, int BKN> void s_allow_smem(void)
{
    GPU_CHECK(cudaFuncSetAttribute(s_gemm_kernel<EPI, BKN>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)SMEM_BYTES));
}

template <int EPI, int BKN> void s_launch(const gpu_moe_gemm_args_t *g, int nsm, cudaStream_t st)
{
    CUtensorMap ma = s_map(g->A, g->mrows, g->K, BM);
    CUtensorMap mb = BKN ? s_map(g->B, g->E * g->K, g->N, BK) : s_map(g->B, g->E * g->N, g->K, BN / 2);
    s_gemm_kernel<EPI, BKN><<<nsm, THREADS, SMEM_BYTES, st>>>(ma, mb, g->counts, g->E, g->N, g->K,
                                                             g->C, g->G, g->AB, s_group());
    GPU_CHECK_LAUNCH();
}

} // namespace

bool gpu_moe_gemm_ok(int N, int K)
{
    static signed char ok_dev[64]; /* 0 unknown, 1 yes, -1 no */
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64)
        return false;
    if (!ok_dev[dev]) {
        cudaDeviceProp pr;
        bool yes = cudaGetDeviceProperties(&pr, dev) == cudaSuccess && pr.major == 9 &&
                   pr.minor == 0 && s_encode_fn() != NULL;
        if (yes) {
            s_allow_smem<GPU_MOE_EPI_PLAIN, 0>();
            s_allow_smem<GPU_MOE_EPI_PLAIN, 1>();
            s_allow_smem<GPU_MOE_EPI_SWIGLU, 0>();
            s_allow_smem<GPU_MOE_EPI_DSWIGLU, 1>();
        }
        ok_dev[dev] = yes ? 1 : -1;
    }
    return ok_dev[dev] > 0 && K >= BK && K % BK == 0 && N >= BN && N % BN == 0;
}

void gpu_moe_gemm(const gpu_moe_gemm_args_t *g, cudaStream_t st)
{
    static int nsm;
    if (!nsm) {
        int dev = 0;
        GPU_CHECK(cudaGetDevice(&dev));
        GPU_CHECK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev));
        /* SEMOE_MOE_GEMM_SMS: fewer CTAs than SMs, for measuring what the kernel gains from
         * each SM (the rest left to other streams' kernels) */
        const char *v = getenv("SEMOE_MOE_GEMM_SMS");
        int want = v ? atoi(v) : 0;
        if (want > 0 && want < nsm)
            nsm = want;
    }
    if (g->epi == GPU_MOE_EPI_SWIGLU && !g->b_kn)
        s_launch<GPU_MOE_EPI_SWIGLU, 0>(g, nsm, st);
    else if (g->epi == GPU_MOE_EPI_DSWIGLU && g->b_kn)
        s_launch<GPU_MOE_EPI_DSWIGLU, 1>(g, nsm, st);
    else if (g->epi == GPU_MOE_EPI_PLAIN)
        g->b_kn ? s_launch<GPU_MOE_EPI_PLAIN, 1>(g, nsm, st)
                : s_launch<GPU_MOE_EPI_PLAIN, 0>(g, nsm, st);
    else {
        fprintf(stderr, "semoe gpu_moe_gemm: epilogue %d with B %s is not built\n", (int)g->epi,
                g->b_kn ? "(K, N)" : "(N, K)");
        abort();
    }
}
