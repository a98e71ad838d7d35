/* bf16 causal grouped-query attention, FlashAttention-2 style (gpu/flash_attn.h), on the
 * tensor cores through mma.sync m16n8k16 (inline PTX) with ldmatrix operands and cp.async
 * double-buffered tiles; scores, probabilities and the accumulators stay in registers. hd is a
 * template parameter, instantiated for 64 and 128. The first (WMMA) kernels are in
 * gpu/flash_attn_wmma.cuh, kept for comparison. */
#include "gpu/flash_attn.h"
#include "gpu/stream.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

#include "gpu/flash_attn_wmma.cuh"

#define S_THREADS 256   /* 8 warps, every kernel here */
#define S_PAD 8         /* bf16 row padding of every shared tile: rows 16 bytes apart in the */
                        /* banks, so ldmatrix's 8 row reads and the 16-byte stores are      */
                        /* conflict-free (a row of 64 or 128 bf16 alone maps to one bank)   */
#define S_FWD_BM 128    /* forward: query rows per block, 16 per warp */
#define S_FWD_BN 64     /* forward: key rows per tile */
#define S_BWD_BN 128    /* backward: key rows per block, 16 per warp */
#define S_BWD_BM 64     /* backward: query rows per tile */
#define S_LOG2E 1.4426950408889634f
#define S_LN2 0.6931471805599453f

/* ---- PTX wrappers ---------------------------------------------------------------------------
 * mma.sync.m16n8k16 with bf16 A, B and fp32 C, D (PTX ISA, "matrix fragments for mma.m16n8k16").
 * lane = 4 g + t (g = lane / 4, t = lane % 4). Each 32-bit register holds two bf16, the lower
 * column (or k) index in the low half.
 *   A (16 x 16, m x k):  a0 = A[g][2t, 2t+1]    a1 = A[g+8][2t, 2t+1]
 *                        a2 = A[g][2t+8, 2t+9]  a3 = A[g+8][2t+8, 2t+9]
 *   B (16 x 8, k x n):   b0 = B[2t, 2t+1][g]    b1 = B[2t+8, 2t+9][g]
 *   C, D (16 x 8):       c0, c1 = C[g][2t, 2t+1]   c2, c3 = C[g+8][2t, 2t+1]
 * ldmatrix.x4: lanes 8i..8i+7 give the addresses of rows 0..7 of 8 x 8 matrix i (16 bytes a
 * row); register i of a lane is M_i[g][2t, 2t+1], or with .trans M_i[2t][g], M_i[2t+1][g].
 * From these, with (r, c) the row and column a lane addresses relative to a 16 x 16 block:
 * - s_ld_a, A stored row-major ([m][k], as Q): r = lane & 15, c = 8 (lane >> 4). Matrices:
 *   (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0, a1, a2, a3.
 * - s_ld_b, two n-tiles of B stored as B^T row-major ([n][k], as K in Q K^T):
 *   r = (lane & 7) + 8 (lane >> 4), c = 8 ((lane >> 3) & 1). Matrices (n 0-7, k 0-7) = b0 and
 *   (n 0-7, k 8-15) = b1 of n-tile 0, then (n 8-15, ...) = b0, b1 of n-tile 1.
 * - s_ld_bt, two n-tiles of B stored row-major ([k][n], as V in P V), .trans:
 *   r = (lane & 7) + 8 ((lane >> 3) & 1), c = 8 (lane >> 4). Matrices (k 0-7, n 0-7) = b0,
 *   (k 8-15, n 0-7) = b1 of n-tile 0, then the same at n 8-15 for n-tile 1.
 * - s_ld_at, A stored as A^T row-major ([k][m], as dS^T in dS K), .trans:
 *   r = (lane & 7) + 8 (lane >> 4), c = 8 ((lane >> 3) & 1). Matrices (k 0-7, m 0-7) = a0,
 *   (k 0-7, m 8-15) = a1, (k 8-15, m 0-7) = a2, (k 8-15, m 8-15) = a3.
 * - an accumulator is an A operand without moving: n-tiles 2j and 2j+1 of C (16 rows by 16
 *   columns j) are, as rows by k, a0 = C_2j[g][2t, 2t+1] = (c0, c1) of n-tile 2j,
 *   a1 = (c2, c3) of 2j, a2 = (c0, c1) of 2j+1, a3 = (c2, c3) of 2j+1 (s_pack_a). */

static __device__ __forceinline__ uint32_t s_smem_addr(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

/* 16 bytes global -> shared, asynchronously; zeros when !valid (src is then not read, but
 * must still be a mapped address). */
static __device__ __forceinline__ void s_cp16(void *dst, const void *src, bool valid)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s_smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

/* 4 bytes global -> shared, asynchronously; zero when !valid. */
static __device__ __forceinline__ void s_cp4(void *dst, const void *src, bool valid)
{
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s_smem_addr(dst)),
                 "l"(src), "r"(valid ? 4 : 0)
                 : "memory");
}

static __device__ __forceinline__ void s_cp_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N>
static __device__ __forceinline__ void s_cp_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

static __device__ __forceinline__ void s_ldsm(uint32_t r[4], const bf16 *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s_smem_addr(p)));
}

static __device__ __forceinline__ void s_ldsm_t(uint32_t r[4], const bf16 *p)
{
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(s_smem_addr(p)));
}

/* c (16 x 8) += a (16 x 16) b (16 x 8), b = (b0, b1). */
static __device__ __forceinline__ void s_mma(float c[4], const uint32_t a[4], uint32_t b0,
                                             uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 2^x (ex2.approx: 2 ulp; 2^-inf = 0). */
static __device__ __forceinline__ float s_exp2(float x)
{
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* ---- fragments ------------------------------------------------------------------------------
 * p points at element (0, 0) of the 16 x 16 block, ld is the row stride in elements; the
 * lane's (r, c) are those of the table above. */

static __device__ __forceinline__ void s_ld_a(uint32_t a[4], const bf16 *p, int ld)
{
    const int lane = threadIdx.x & 31;
    s_ldsm(a, p + (lane & 15) * ld + (lane >> 4) * 8);
}

static __device__ __forceinline__ void s_ld_b(uint32_t b[4], const bf16 *p, int ld)
{
    const int lane = threadIdx.x & 31;
    s_ldsm(b, p + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
}

static __device__ __forceinline__ void s_ld_bt(uint32_t b[4], const bf16 *p, int ld)
{
    const int lane = threadIdx.x & 31;
    s_ldsm_t(b, p + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8);
}

static __device__ __forceinline__ void s_ld_at(uint32_t a[4], const bf16 *p, int ld)
{
    const int lane = threadIdx.x & 31;
    s_ldsm_t(a, p + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
}

/* Two floats as a bf16 pair, lo in the low half (round to nearest even). */
static __device__ __forceinline__ uint32_t s_pack(float lo, float hi)
{
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

/* The A operand (rows by k 16j..16j+15) that accumulator n-tiles 2j, 2j+1 form. */
static __device__ __forceinline__ void s_pack_a(uint32_t a[4], const float c0[4],
                                                const float c1[4])
{
    a[0] = s_pack(c0[0], c0[1]);
    a[1] = s_pack(c0[2], c0[3]);
    a[2] = s_pack(c1[0], c1[1]);
    a[3] = s_pack(c1[2], c1[3]);
}

/* ROWS rows [r0, r0 + ROWS) of a (T, ..., D) tensor whose row t starts at src + t * stride, into
 * dst (ROWS, D + S_PAD) asynchronously, by the whole block; rows at or past T are zeros. */
template <int D, int ROWS>
static __device__ __forceinline__ void s_load_rows(bf16 *dst, const bf16 *src, int r0, int T,
                                                   size_t stride)
{
    constexpr int VPR = D / 8, N = ROWS * VPR; /* 16-byte vectors per row, in all */
    static_assert(N % S_THREADS == 0, "whole rounds of the block");
#pragma unroll
    for (int i = 0; i < N / S_THREADS; i++) {
        const int v = (int)threadIdx.x + i * S_THREADS, r = v / VPR, c = (v % VPR) * 8;
        const bool ok = r0 + r < T;
        s_cp16(dst + r * (D + S_PAD) + c, src + (size_t)(ok ? r0 + r : 0) * stride + c, ok);
    }
}

/* ---- forward --------------------------------------------------------------------------------
 * One block per (batch, head, S_FWD_BM query rows), the latest query blocks first (they have
 * the most key tiles); warp w owns query rows 16w..16w+15, its Q fragments in registers. Key
 * and value tiles of S_FWD_BN rows stream through two shared stages each (cp.async, K two
 * tiles ahead, V one), two barriers a tile. Per tile, per warp: S = Q K^T (16 x BN, fp32
 * registers), the online softmax in base 2 (x = s scale log2 e; m the running row max of x,
 * l the running row sum of 2^(x - m), both per row), P = 2^(x - m) as bf16 A fragments
 * straight from S, O += P V.
 * Causal: key tiles past the block's last row are not loaded, a warp skips a tile whose keys
 * all lie after its rows, and only tiles crossing the diagonal are masked. Keys at or past T
 * are zeros and masked for every real row (key > row); rows at or past T are computed, not
 * written. lse = (m + log2 l) ln 2, the natural log of sum_j exp(score_j). */
template <int D>
static constexpr size_t s_fwd_smem()
{
    return (size_t)(S_FWD_BM + 4 * S_FWD_BN) * (D + S_PAD) * sizeof(bf16); /* Q, 2 x (K, V) */
}

template <int D>
__global__ void __launch_bounds__(S_THREADS, D == 64 ? 2 : 1)
    s_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int T,
                 int H, int KVH, float scale_log2)
{
    constexpr int LD = D + S_PAD, BM = S_FWD_BM, BN = S_FWD_BN;
    constexpr int NS = BN / 8;  /* n-tiles of S */
    constexpr int NO = D / 8;   /* n-tiles of O */
    constexpr int KQ = D / 16;  /* k-steps of Q K^T */
    constexpr int KP = BN / 16; /* k-steps of P V */
    extern __shared__ __align__(128) unsigned char s_smem[];
    bf16 *Qs = (bf16 *)s_smem;   /* (BM, LD); the output tile at the end */
    bf16 *Ks = Qs + BM * LD;     /* 2 stages of (BN, LD) */
    bf16 *Vs = Ks + 2 * BN * LD; /* 2 stages of (BN, LD) */

    const int b = blockIdx.x / H, h = blockIdx.x % H, kvh = h / (H / KVH);
    const int q0 = (gridDim.y - 1 - blockIdx.y) * BM;
    const size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;
    const bf16 *qb = q + ((size_t)b * T * H + h) * D;
    const bf16 *kb = k + ((size_t)b * T * KVH + kvh) * D;
    const bf16 *vb = v + ((size_t)b * T * KVH + kvh) * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wq = q0 + 16 * warp; /* the warp's first query row */
    const int nkv = (min(T, q0 + BM) + BN - 1) / BN;

    /* cp.async groups in commit order: Q, K 0, V 0, K 1, then per tile j: V j+1, K j+2 (empty
     * past the end). Tile j waits for K j with two groups younger (V j, K j+1), for V j with
     * two younger (K j+1, V j+1). Barrier A(j) (K j visible) also means every warp is done with
     * P V of tile j-1, so V's other stage may be refilled; barrier M(j) (V j visible) means
     * every warp is done with Q K^T of tile j, so K's stage j % 2 may take K j+2. */
    s_load_rows<D, BM>(Qs, qb, q0, T, qstride);
    s_cp_commit();
    s_load_rows<D, BN>(Ks, kb, 0, T, kstride);
    s_cp_commit();
    s_load_rows<D, BN>(Vs, vb, 0, T, kstride);
    s_cp_commit();
    if (nkv > 1)
        s_load_rows<D, BN>(Ks + BN * LD, kb, BN, T, kstride);
    s_cp_commit();
    s_cp_wait<3>(); /* Q */
    __syncthreads();
    uint32_t qf[KQ][4];
#pragma unroll
    for (int kk = 0; kk < KQ; kk++)
        s_ld_a(qf[kk], Qs + 16 * warp * LD + 16 * kk, LD);

    float o[NO][4];
#pragma unroll
    for (int n = 0; n < NO; n++)
        o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}; /* rows g, g + 8 */

    for (int j = 0; j < nkv; j++) {
        const int kv0 = j * BN, st = j & 1;
        const bf16 *Kt = Ks + st * BN * LD, *Vt = Vs + st * BN * LD;
        s_cp_wait<2>(); /* K j */
        __syncthreads(); /* A(j) */
        if (j + 1 < nkv)
            s_load_rows<D, BN>(Vs + (st ^ 1) * BN * LD, vb, kv0 + BN, T, kstride);
        s_cp_commit();
        /* some key of the tile is at or before some row of the warp */
        const bool active = kv0 <= wq + 15;
        uint32_t pf[KP][4];
        if (active) {
            float s[NS][4];
#pragma unroll
            for (int n = 0; n < NS; n++)
                s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KQ; kk++)
#pragma unroll
                for (int np = 0; np < NS / 2; np++) {
                    uint32_t bb[4];
                    s_ld_b(bb, Kt + 16 * np * LD + 16 * kk, LD);
                    s_mma(s[2 * np], qf[kk], bb[0], bb[1]);
                    s_mma(s[2 * np + 1], qf[kk], bb[2], bb[3]);
                }
            if (kv0 + BN - 1 > wq) { /* crosses the diagonal: key > row is masked */
#pragma unroll
                for (int n = 0; n < NS; n++)
#pragma unroll
                    for (int e = 0; e < 4; e++)
                        if (kv0 + 8 * n + 2 * t + (e & 1) > wq + g + 8 * (e >> 1))
                            s[n][e] = -INFINITY;
            }
            /* online softmax; the row max over the quad that shares a row (lanes 4g..4g+3) */
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = -INFINITY;
#pragma unroll
                for (int n = 0; n < NS; n++)
                    mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mnew = fmaxf(m[r], mx * scale_log2);
                /* a row with nothing visible yet keeps m = -inf; subtract 0 then (p = 0) */
                const float base = mnew == -INFINITY ? 0.0f : mnew;
                const float alpha = s_exp2(m[r] - base); /* 0 while m was -inf */
                m[r] = mnew;
                float sum = 0.0f;
#pragma unroll
                for (int n = 0; n < NS; n++)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; e++) {
                        const float p = s_exp2(fmaf(s[n][e], scale_log2, -base));
                        s[n][e] = p;
                        sum += p;
                    }
                l[r] = l[r] * alpha + sum; /* the lane's own columns; the quad sums at the end */
#pragma unroll
                for (int n = 0; n < NO; n++) {
                    o[n][2 * r] *= alpha;
                    o[n][2 * r + 1] *= alpha;
                }
            }
#pragma unroll
            for (int kk = 0; kk < KP; kk++)
                s_pack_a(pf[kk], s[2 * kk], s[2 * kk + 1]);
        }

        s_cp_wait<2>(); /* V j */
        __syncthreads(); /* M(j) */
        if (j + 2 < nkv)
            s_load_rows<D, BN>(Ks + st * BN * LD, kb, kv0 + 2 * BN, T, kstride);
        s_cp_commit();
        if (active) {
#pragma unroll
            for (int kk = 0; kk < KP; kk++)
#pragma unroll
                for (int np = 0; np < NO / 2; np++) {
                    uint32_t bb[4];
                    s_ld_bt(bb, Vt + 16 * kk * LD + 16 * np, LD);
                    s_mma(o[2 * np], pf[kk], bb[0], bb[1]);
                    s_mma(o[2 * np + 1], pf[kk], bb[2], bb[3]);
                }
        }
    }

    /* O / l through the warp's own rows of Qs (no other warp reads them) into 16-byte stores */
    bf16 *Os = Qs + 16 * warp * LD;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
        for (int n = 0; n < NO; n++)
            *(uint32_t *)(Os + (g + 8 * r) * LD + 8 * n + 2 * t) =
                s_pack(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        const int row = wq + g + 8 * r;
        if (t == 0 && row < T)
            lse[((size_t)b * H + h) * T + row] = m[r] * S_LN2 + logf(l[r]);
    }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * (D / 8); i += 32) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8;
        if (wq + r < T)
            *(uint4 *)(out + ((size_t)b * T + wq + r) * qstride + (size_t)h * D + c) =
                *(const uint4 *)(Os + r * LD + c);
    }
}

/* ---- backward -------------------------------------------------------------------------------
 * s_pre_kernel: Dsum[b, h, t] = sum_d dout * out (fp32, the bf16 output as saved), and the row
 * of dqacc zeroed; D / 8 threads per (b, t, h) row, 16 bytes each. */
template <int D>
__global__ void __launch_bounds__(S_THREADS)
    s_pre_kernel(float *Dsum, float *dqacc, const bf16 *dout, const bf16 *out, int T, int H,
                 size_t rows)
{
    constexpr int TPR = D / 8;
    const size_t i = (size_t)blockIdx.x * S_THREADS + threadIdx.x, row = i / TPR;
    const int c = (int)(i % TPR) * 8;
    float s = 0.0f;
    if (row < rows) {
        const uint4 a = *(const uint4 *)(dout + row * D + c);
        const uint4 o = *(const uint4 *)(out + row * D + c);
        __nv_bfloat162 a2[4], o2[4]; /* the 16 bytes as bf16 pairs (memcpy: no aliasing games) */
        memcpy(a2, &a, sizeof a2);
        memcpy(o2, &o, sizeof o2);
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float2 x = __bfloat1622float2(a2[e]), y = __bfloat1622float2(o2[e]);
            s += x.x * y.x + x.y * y.y;
        }
        float4 *z = (float4 *)(dqacc + row * D + c);
        z[0] = z[1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off /= 2) /* TPR lanes of a warp per row */
        s += __shfl_xor_sync(0xffffffffu, s, off);
    if (row < rows && c == 0) {
        const int h = (int)(row % H);
        const size_t bt = row / H;
        const int tt = (int)(bt % T);
        const size_t b = bt / T;
        Dsum[(b * H + h) * T + tt] = s;
    }
}

/* dq (bf16) = scale dqacc (fp32), n a multiple of 4. */
__global__ void __launch_bounds__(S_THREADS)
    s_dq_cast_kernel(bf16 *dq, const float *dqacc, size_t n, float scale)
{
    for (size_t i = (size_t)blockIdx.x * S_THREADS + threadIdx.x; i < n / 4;
         i += (size_t)gridDim.x * S_THREADS) {
        const float4 a = ((const float4 *)dqacc)[i];
        uint2 w;
        w.x = s_pack(a.x * scale, a.y * scale);
        w.y = s_pack(a.z * scale, a.w * scale);
        ((uint2 *)dq)[i] = w;
    }
}

/* s_bwd_kernel: one block per (batch, kv head, S_BWD_BN key rows), the first key blocks (the
 * most query tiles) first. Warp w owns key rows 16w..16w+15 and their dK, dV (fp32 registers)
 * while the block walks the H/KVH query heads of the group and, for each, the query tiles of
 * S_BWD_BM rows from the diagonal on (Q, dO, lse, Dsum in two cp.async stages). Everything is
 * computed transposed, keys as rows, so that the accumulators feed the next product directly:
 *   S^T = K Q^T, P^T = 2^(S^T scale log2 e - lse log2 e) (0 where key > query or query >= T),
 *   dP^T = V dO^T, dS^T = P^T (dP^T - Dsum)   (16 keys x BM queries per warp, registers)
 *   dV += P^T dO, dK += dS^T Q                 (A operands straight from P^T, dS^T)
 * dS^T also goes to shared memory (bf16), and after a barrier warp w computes
 *   dQ[16 (w % 4).., (D / 2)(w / 4)..] = dS K  (16 queries x D/2, over all BN keys)
 * added into dqacc with float2 atomics. The softmax scale of dS is applied at the end: to dK
 * here, to dq in s_dq_cast_kernel. */
template <int D>
static constexpr size_t s_bwd_smem()
{
    return (size_t)(2 * S_BWD_BN + 4 * S_BWD_BM) * (D + S_PAD) * sizeof(bf16) /* K, V, 2 Q, dO */
           + (size_t)S_BWD_BN * (S_BWD_BM + S_PAD) * sizeof(bf16)             /* dS^T */
           + (size_t)4 * S_BWD_BM * sizeof(float);                            /* 2 lse, Dsum */
}

/* Query rows [q0, q0 + S_BWD_BM) of head h, asynchronously: q, dout into Qs, dOs (S_BWD_BM,
 * D + S_PAD), lse, Dsum into Ls, Ds (S_BWD_BM); rows at or past T are zeros. */
template <int D>
static __device__ __forceinline__ void s_bwd_load(bf16 *Qs, bf16 *dOs, float *Ls, float *Ds,
                                                  const bf16 *q, const bf16 *dout,
                                                  const float *lse, const float *Dsum, int b,
                                                  int T, int H, int h, int q0)
{
    const size_t qstride = (size_t)H * D, off = ((size_t)b * T * H + h) * D;
    s_load_rows<D, S_BWD_BM>(Qs, q + off, q0, T, qstride);
    s_load_rows<D, S_BWD_BM>(dOs, dout + off, q0, T, qstride);
    const int i = threadIdx.x % S_BWD_BM, qi = q0 + i;
    const size_t lrow = ((size_t)b * H + h) * T;
    if (threadIdx.x < S_BWD_BM)
        s_cp4(Ls + i, lse + lrow + (qi < T ? qi : 0), qi < T);
    else if (threadIdx.x < 2 * S_BWD_BM)
        s_cp4(Ds + i, Dsum + lrow + (qi < T ? qi : 0), qi < T);
}

template <int D>
__global__ void __launch_bounds__(S_THREADS, 1)
    s_bwd_kernel(bf16 *dk, bf16 *dv, float *dqacc, const bf16 *dout, const bf16 *q,
                 const bf16 *k, const bf16 *v, const float *lse, const float *Dsum, int T, int H,
                 int KVH, float scale_log2, float scale)
{
    constexpr int LD = D + S_PAD, BN = S_BWD_BN, BM = S_BWD_BM, LDS = BM + S_PAD;
    constexpr int NS = BM / 8;  /* n-tiles of S^T, dP^T (queries) */
    constexpr int NK = D / 8;   /* n-tiles of dK, dV */
    constexpr int KD = D / 16;  /* k-steps over the head dim */
    constexpr int KM = BM / 16; /* k-steps over queries */
    constexpr int NQ = D / 16;  /* n-tiles of a warp's dQ (D / 2 columns) */
    static_assert(BN == 16 * (S_THREADS / 32) && BM * 2 == BN, "warp layout");
    extern __shared__ __align__(128) unsigned char s_smem[];
    bf16 *Ks = (bf16 *)s_smem;       /* (BN, LD) */
    bf16 *Vs = Ks + BN * LD;         /* (BN, LD) */
    bf16 *Qs = Vs + BN * LD;         /* 2 stages of (BM, LD); dK staging at the end */
    bf16 *dOs = Qs + 2 * BM * LD;    /* 2 stages of (BM, LD); dV staging at the end */
    bf16 *dSs = dOs + 2 * BM * LD;   /* (BN, LDS): dS^T, keys as rows */
    float *Ls = (float *)(dSs + BN * LDS); /* 2 stages of (BM) */
    float *Ds = Ls + 2 * BM;               /* 2 stages of (BM) */

    const int b = blockIdx.x / KVH, kvh = blockIdx.x % KVH, G = H / KVH;
    const int k0 = blockIdx.y * BN;
    const int it0 = k0 / BM, nqt = (T + BM - 1) / BM, per = nqt - it0, niter = G * per;
    const size_t kstride = (size_t)KVH * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int wk = 16 * warp;                  /* the warp's first key row in the tile */
    const int qw = 16 * (warp % 4), dh = (D / 2) * (warp / 4); /* its dQ rows, columns */

    /* cp.async groups in commit order: K and V, iteration 0, then iteration it + 1 at the start
     * of iteration it (empty past the end) into the other stage: its last readers (S^T, dP^T,
     * dV, dK of iteration it - 1) finished before that iteration's second barrier. The first
     * barrier of an iteration (its loads visible) also means every warp is done with the
     * previous dQ, so dSs may be rewritten. */
    s_load_rows<D, BN>(Ks, k + ((size_t)b * T * KVH + kvh) * D, k0, T, kstride);
    s_load_rows<D, BN>(Vs, v + ((size_t)b * T * KVH + kvh) * D, k0, T, kstride);
    s_cp_commit();
    s_bwd_load<D>(Qs, dOs, Ls, Ds, q, dout, lse, Dsum, b, T, H, kvh * G, it0 * BM);
    s_cp_commit();

    float dka[NK][4], dva[NK][4];
#pragma unroll
    for (int n = 0; n < NK; n++)
#pragma unroll
        for (int e = 0; e < 4; e++)
            dka[n][e] = dva[n][e] = 0.0f;

    for (int it = 0; it < niter; it++) {
        const int st = it & 1, h = kvh * G + it / per, q0 = (it0 + it % per) * BM;
        if (it + 1 < niter)
            s_bwd_load<D>(Qs + (st ^ 1) * BM * LD, dOs + (st ^ 1) * BM * LD, Ls + (st ^ 1) * BM,
                          Ds + (st ^ 1) * BM, q, dout, lse, Dsum, b, T, H,
                          kvh * G + (it + 1) / per, (it0 + (it + 1) % per) * BM);
        s_cp_commit();
        s_cp_wait<1>();
        __syncthreads();
        const bf16 *Qt = Qs + st * BM * LD, *dOt = dOs + st * BM * LD;
        const float *Lt = Ls + st * BM, *Dt = Ds + st * BM;

        /* S^T = K Q^T: 16 keys x BM queries */
        float s[NS][4];
#pragma unroll
        for (int n = 0; n < NS; n++)
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t a[4];
            s_ld_a(a, Ks + wk * LD + 16 * kk, LD);
#pragma unroll
            for (int np = 0; np < NS / 2; np++) {
                uint32_t bb[4];
                s_ld_b(bb, Qt + 16 * np * LD + 16 * kk, LD);
                s_mma(s[2 * np], a, bb[0], bb[1]);
                s_mma(s[2 * np + 1], a, bb[2], bb[3]);
            }
        }
        /* P^T; element e of n-tile n is key wk + g + 8 (e / 2), query 8 n + 2 t + e % 2 */
        const bool mask = q0 < k0 + BN || q0 + BM > T;
#pragma unroll
        for (int n = 0; n < NS; n++) {
            const float2 lq = *(const float2 *)(Lt + 8 * n + 2 * t);
            const float l2[2] = {lq.x * S_LOG2E, lq.y * S_LOG2E};
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = s_exp2(fmaf(s[n][e], scale_log2, -l2[e & 1]));
                const int kj = k0 + wk + g + 8 * (e >> 1), qi = q0 + 8 * n + 2 * t + (e & 1);
                if (mask && (kj > qi || qi >= T))
                    p = 0.0f;
                s[n][e] = p;
            }
        }

        /* dP^T = V dO^T, then dS^T = P^T (dP^T - Dsum) in place */
        float ds[NS][4];
#pragma unroll
        for (int n = 0; n < NS; n++)
            ds[n][0] = ds[n][1] = ds[n][2] = ds[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t a[4];
            s_ld_a(a, Vs + wk * LD + 16 * kk, LD);
#pragma unroll
            for (int np = 0; np < NS / 2; np++) {
                uint32_t bb[4];
                s_ld_b(bb, dOt + 16 * np * LD + 16 * kk, LD);
                s_mma(ds[2 * np], a, bb[0], bb[1]);
                s_mma(ds[2 * np + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int n = 0; n < NS; n++) {
            const float2 dsum = *(const float2 *)(Dt + 8 * n + 2 * t);
            ds[n][0] = s[n][0] * (ds[n][0] - dsum.x);
            ds[n][1] = s[n][1] * (ds[n][1] - dsum.y);
            ds[n][2] = s[n][2] * (ds[n][2] - dsum.x);
            ds[n][3] = s[n][3] * (ds[n][3] - dsum.y);
        }

        /* bf16 A operands (keys by queries), dS^T into shared memory for dQ */
        uint32_t pa[KM][4], da[KM][4];
#pragma unroll
        for (int kk = 0; kk < KM; kk++) {
            s_pack_a(pa[kk], s[2 * kk], s[2 * kk + 1]);
            s_pack_a(da[kk], ds[2 * kk], ds[2 * kk + 1]);
            bf16 *row = dSs + (wk + g) * LDS + 16 * kk + 2 * t;
            *(uint32_t *)row = da[kk][0];
            *(uint32_t *)(row + 8 * LDS) = da[kk][1];
            *(uint32_t *)(row + 8) = da[kk][2];
            *(uint32_t *)(row + 8 * LDS + 8) = da[kk][3];
        }

        /* dV += P^T dO, dK += dS^T Q */
#pragma unroll
        for (int kk = 0; kk < KM; kk++)
#pragma unroll
            for (int np = 0; np < NK / 2; np++) {
                uint32_t bb[4];
                s_ld_bt(bb, dOt + 16 * kk * LD + 16 * np, LD);
                s_mma(dva[2 * np], pa[kk], bb[0], bb[1]);
                s_mma(dva[2 * np + 1], pa[kk], bb[2], bb[3]);
                s_ld_bt(bb, Qt + 16 * kk * LD + 16 * np, LD);
                s_mma(dka[2 * np], da[kk], bb[0], bb[1]);
                s_mma(dka[2 * np + 1], da[kk], bb[2], bb[3]);
            }
        __syncthreads(); /* dSs complete */

        /* dQ rows qw.., columns dh.. = dS K over the BN keys */
        float dqa[NQ][4];
#pragma unroll
        for (int n = 0; n < NQ; n++)
            dqa[n][0] = dqa[n][1] = dqa[n][2] = dqa[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < BN / 16; kk++) {
            uint32_t a[4];
            s_ld_at(a, dSs + 16 * kk * LDS + qw, LDS);
#pragma unroll
            for (int np = 0; np < NQ / 2; np++) {
                uint32_t bb[4];
                s_ld_bt(bb, Ks + 16 * kk * LD + dh + 16 * np, LD);
                s_mma(dqa[2 * np], a, bb[0], bb[1]);
                s_mma(dqa[2 * np + 1], a, bb[2], bb[3]);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int qi = q0 + qw + g + 8 * r;
            if (qi < T) {
                float *dst = dqacc + ((size_t)b * T + qi) * H * D + (size_t)h * D + dh + 2 * t;
#pragma unroll
                for (int n = 0; n < NQ; n++)
                    atomicAdd((float2 *)(dst + 8 * n),
                              make_float2(dqa[n][2 * r], dqa[n][2 * r + 1]));
            }
        }
    }

    /* dK (scaled), dV of the warp's 16 keys through shared rows of its own, 16-byte stores */
    __syncthreads(); /* (already ordered by the last iteration's second barrier; once) */
    bf16 *Kst = Qs + wk * LD, *Vst = dOs + wk * LD; /* 2 BM = BN rows each */
#pragma unroll
    for (int r = 0; r < 2; r++)
#pragma unroll
        for (int n = 0; n < NK; n++) {
            *(uint32_t *)(Kst + (g + 8 * r) * LD + 8 * n + 2 * t) =
                s_pack(dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
            *(uint32_t *)(Vst + (g + 8 * r) * LD + 8 * n + 2 * t) =
                s_pack(dva[n][2 * r], dva[n][2 * r + 1]);
        }
    __syncwarp();
#pragma unroll
    for (int i = lane; i < 16 * (D / 8); i += 32) {
        const int r = i / (D / 8), c = (i % (D / 8)) * 8, kj = k0 + wk + r;
        if (kj < T) {
            const size_t off = ((size_t)b * T + kj) * kstride + (size_t)kvh * D + c;
            *(uint4 *)(dk + off) = *(const uint4 *)(Kst + r * LD + c);
            *(uint4 *)(dv + off) = *(const uint4 *)(Vst + r * LD + c);
        }
    }
}

/* ---- host ------------------------------------------------------------------------------------ */

/* Broken invariants abort with the value and the fix. */
static void s_check_shape(const char *fn, int B, int T, int H, int KVH, int hd)
{
    if (B < 1 || T < 1 || H < 1 || KVH < 1 || H % KVH != 0) {
        fprintf(stderr, "%s: B=%d T=%d H=%d KVH=%d: need B, T, H, KVH >= 1 and H a multiple "
                        "of KVH\n", fn, B, T, H, KVH);
        abort();
    }
    if (hd != 64 && hd != 128) {
        fprintf(stderr, "%s: hd=%d: flash attention is compiled for head dim 64 and 128 only "
                        "(use gpu_attention_fwd/bwd, or add an instantiation in "
                        "gpu/flash_attn.cu)\n", fn, hd);
        abort();
    }
    if (B > 65535 || H > 65535 || (long long)B * H > INT_MAX || (T + 127) / 128 > 65535) {
        fprintf(stderr, "%s: B=%d H=%d T=%d: over the grid's limits (B, H and T / 128 at most "
                        "65535, B H under 2^31)\n", fn, B, H, T);
        abort();
    }
}

/* SEMOE_FLASH=wmma at the first call selects the WMMA kernels for the process; anything but
 * unset, "" or "mma" is a mistake worth a line on stderr. */
static bool s_use_wmma(void)
{
    static const bool wmma = [] {
        const char *e = getenv("SEMOE_FLASH");
        if (!e || !*e || !strcmp(e, "mma"))
            return false;
        if (!strcmp(e, "wmma"))
            return true;
        fprintf(stderr, "SEMOE_FLASH=%s: unknown flash attention kernels; using mma (the "
                        "choices are mma and wmma)\n", e);
        return false;
    }();
    return wmma;
}

template <int D>
static void s_fwd(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int B,
                  int T, int H, int KVH)
{
    const size_t smem = s_fwd_smem<D>();
    /* per device, cheap: set on every call so that a thread's other devices get it too */
    GPU_CHECK(cudaFuncSetAttribute(s_fwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem));
    dim3 grid((unsigned)(B * H), (unsigned)((T + S_FWD_BM - 1) / S_FWD_BM));
    s_fwd_kernel<D><<<grid, S_THREADS, smem, gpu_stream()>>>(
        out, lse, q, k, v, T, H, KVH, S_LOG2E / sqrtf((float)D));
    GPU_CHECK_LAUNCH();
}

template <int D>
static void s_bwd(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q, const bf16 *k,
                  const bf16 *v, const bf16 *out, const float *lse, int B, int T, int H, int KVH,
                  float *workspace)
{
    cudaStream_t st = gpu_stream();
    const size_t nq = (size_t)B * T * H * D, rows = (size_t)B * T * H;
    float *dqacc = workspace, *Dsum = workspace + nq;
    const float scale = 1.0f / sqrtf((float)D);
    s_pre_kernel<D><<<(unsigned)((rows * (D / 8) + S_THREADS - 1) / S_THREADS), S_THREADS, 0,
                      st>>>(Dsum, dqacc, dout, out, T, H, rows);
    GPU_CHECK_LAUNCH();
    const size_t smem = s_bwd_smem<D>();
    GPU_CHECK(cudaFuncSetAttribute(s_bwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem));
    dim3 grid((unsigned)(B * KVH), (unsigned)((T + S_BWD_BN - 1) / S_BWD_BN));
    s_bwd_kernel<D><<<grid, S_THREADS, smem, st>>>(dk, dv, dqacc, dout, q, k, v, lse, Dsum, T,
                                                   H, KVH, scale * S_LOG2E, scale);
    GPU_CHECK_LAUNCH();
    size_t blocks = (nq / 4 + S_THREADS - 1) / S_THREADS;
    s_dq_cast_kernel<<<(unsigned)(blocks < 8192 ? blocks : 8192), S_THREADS, 0, st>>>(
        dq, dqacc, nq, scale);
    GPU_CHECK_LAUNCH();
}

extern "C" void gpu_flash_wmma_fwd(uint16_t *out, float *lse, const uint16_t *q,
                                   const uint16_t *k, const uint16_t *v, int B, int T, int H,
                                   int KVH, int hd)
{
    s_check_shape("gpu_flash_wmma_fwd", B, T, H, KVH, hd);
    if (hd == 64)
        s_wmma_fwd<64>((bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, B,
                       T, H, KVH);
    else
        s_wmma_fwd<128>((bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, B,
                        T, H, KVH);
}

extern "C" void gpu_flash_wmma_bwd(uint16_t *dq, uint16_t *dk, uint16_t *dv,
                                   const uint16_t *dout, const uint16_t *q, const uint16_t *k,
                                   const uint16_t *v, const uint16_t *out, const float *lse,
                                   int B, int T, int H, int KVH, int hd, float *workspace)
{
    s_check_shape("gpu_flash_wmma_bwd", B, T, H, KVH, hd);
    if (hd == 64)
        s_wmma_bwd<64>((bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
                       (const bf16 *)k, (const bf16 *)v, (const bf16 *)out, lse, B, T, H, KVH,
                       workspace);
    else
        s_wmma_bwd<128>((bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
                        (const bf16 *)k, (const bf16 *)v, (const bf16 *)out, lse, B, T, H, KVH,
                        workspace);
}

extern "C" void gpu_flash_fwd(uint16_t *out, float *lse, const uint16_t *q, const uint16_t *k,
                              const uint16_t *v, int B, int T, int H, int KVH, int hd)
{
    if (s_use_wmma()) {
        gpu_flash_wmma_fwd(out, lse, q, k, v, B, T, H, KVH, hd);
        return;
    }
    s_check_shape("gpu_flash_fwd", B, T, H, KVH, hd);
    if (hd == 64)
        s_fwd<64>((bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, B, T, H,
                  KVH);
    else
        s_fwd<128>((bf16 *)out, lse, (const bf16 *)q, (const bf16 *)k, (const bf16 *)v, B, T, H,
                   KVH);
}

extern "C" size_t gpu_flash_bwd_workspace(int B, int T, int H, int KVH, int hd)
{
    (void)KVH;
    return ((size_t)B * T * H * hd + (size_t)B * H * T) * sizeof(float);
}

extern "C" void gpu_flash_bwd(uint16_t *dq, uint16_t *dk, uint16_t *dv, const uint16_t *dout,
                              const uint16_t *q, const uint16_t *k, const uint16_t *v,
                              const uint16_t *out, const float *lse, int B, int T, int H,
                              int KVH, int hd, float *workspace)
{
    if (s_use_wmma()) {
        gpu_flash_wmma_bwd(dq, dk, dv, dout, q, k, v, out, lse, B, T, H, KVH, hd, workspace);
        return;
    }
    s_check_shape("gpu_flash_bwd", B, T, H, KVH, hd);
    if (hd == 64)
        s_bwd<64>((bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
                  (const bf16 *)k, (const bf16 *)v, (const bf16 *)out, lse, B, T, H, KVH,
                  workspace);
    else
        s_bwd<128>((bf16 *)dq, (bf16 *)dk, (bf16 *)dv, (const bf16 *)dout, (const bf16 *)q,
                   (const bf16 *)k, (const bf16 *)v, (const bf16 *)out, lse, B, T, H, KVH,
                   workspace);
}
