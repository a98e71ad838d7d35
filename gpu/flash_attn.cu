/* bf16 causal grouped-query attention, FlashAttention-2 style (gpu/flash_attn.h): tiles of
 * S_BR query rows by S_BC key rows in shared memory, bf16 tensor-core products through
 * nvcuda::wmma (16x16x16, fp32 accumulate), online softmax in fp32; memory linear in T.
 * hd is a template parameter, instantiated for 64 and 128. */
#include "gpu/flash_attn.h"
#include "gpu/stream.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <mma.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

using namespace nvcuda;
typedef __nv_bfloat16 bf16;

/* Four warps per block, each owning 16 rows of a 64-row tile: 16 query rows in forward and
 * in the dq product, 16 key rows for dk and dv in backward. */
#define S_BR 64                  /* query rows per tile */
#define S_BC 64                  /* key rows per tile */
#define S_THREADS 128            /* 4 warps */
#define S_PAD_H 8                /* bf16 row padding: keeps wmma ldm a multiple of 8 and     \
                                    shifts rows across banks */
#define S_PAD_F 4                /* fp32 row padding (ldm a multiple of 4) */
#define S_LDP (S_BC + S_PAD_H)   /* ldm of the bf16 (S_BR, S_BC) tiles P, dS */
#define S_LDS (S_BC + S_PAD_F)   /* ldm of the fp32 (S_BR, S_BC) tiles S, dP */

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> s_a_row;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> s_a_col;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> s_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> s_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> s_acc;

/* Rows [row0, row0 + n) of a (T, ..., D) tensor whose row t starts at src + t * stride, into
 * dst (n, D + S_PAD_H) by the whole block, 16 bytes a thread; rows at or past T read as 0. */
template <int D>
__device__ __forceinline__ void s_load_tile(bf16 *dst, const bf16 *src, int row0, int n, int T,
                                            size_t stride)
{
    constexpr int VPR = D / 8; /* 16-byte vectors per row */
    for (int i = threadIdx.x; i < n * VPR; i += S_THREADS) {
        int r = i / VPR, c = (i % VPR) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (row0 + r < T)
            val = *(const uint4 *)(src + (size_t)(row0 + r) * stride + c);
        *(uint4 *)(dst + r * (D + S_PAD_H) + c) = val;
    }
}

template <int D>
static constexpr size_t s_fwd_smem()
{
    return (size_t)(S_BR + 2 * S_BC) * (D + S_PAD_H) * sizeof(bf16) /* Q, K, V */
           + (size_t)S_BR * S_LDP * sizeof(bf16)                   /* P */
           + (size_t)S_BR * S_LDS * sizeof(float)                  /* S */
           + (size_t)S_BR * (D + S_PAD_F) * sizeof(float);         /* O accumulator */
}

/* One block per (query tile, head, batch). The O accumulator lives in shared memory (fp32) so
 * that the online-softmax rescale by exp(m_old - m_new) is a plain per-row loop (a wmma
 * accumulator's element-to-row map is opaque); each warp touches only its own 16 rows of S, P
 * and O, so only the K/V loads need the block barrier. */
template <int D>
__global__ void __launch_bounds__(S_THREADS)
    s_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int T,
                 int H, int KVH, float scale)
{
    constexpr int LDH = D + S_PAD_H, LDO = D + S_PAD_F;
    extern __shared__ __align__(128) unsigned char s_smem[];
    bf16 *Qs = (bf16 *)s_smem;
    bf16 *Ks = Qs + S_BR * LDH;
    bf16 *Vs = Ks + S_BC * LDH;
    bf16 *Ps = Vs + S_BC * LDH;
    float *Ss = (float *)(Ps + S_BR * S_LDP);
    float *Os = Ss + S_BR * S_LDS;

    const int qt = gridDim.x - 1 - blockIdx.x; /* the longest rows (most key tiles) first */
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    const int q0 = qt * S_BR;
    const size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;
    const bf16 *qb = q + ((size_t)b * T * H + h) * D;
    const bf16 *kb = k + ((size_t)b * T * KVH + kvh) * D;
    const bf16 *vb = v + ((size_t)b * T * KVH + kvh) * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16;               /* the warp's first row in the tile */
    const int r = lane / 2, half = lane % 2; /* softmax: a lane pair per row, 32 columns each */
    const int row = wr + r, qi = q0 + row;

    s_load_tile<D>(Qs, qb, q0, S_BR, T, qstride);
    for (int i = threadIdx.x; i < S_BR * LDO; i += S_THREADS)
        Os[i] = 0.0f;
    float m = -INFINITY, l = 0.0f; /* row qi's running max (scaled scores) and sum */
    const int nkv = (min(T, q0 + S_BR) - 1) / S_BC + 1;
    for (int j = 0; j < nkv; j++) {
        const int kv0 = j * S_BC;
        __syncthreads(); /* the previous tile's K, V are read by every warp */
        s_load_tile<D>(Ks, kb, kv0, S_BC, T, kstride);
        s_load_tile<D>(Vs, vb, kv0, S_BC, T, kstride);
        __syncthreads();

        s_acc sacc[S_BC / 16];
#pragma unroll
        for (int nt = 0; nt < S_BC / 16; nt++)
            wmma::fill_fragment(sacc[nt], 0.0f);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            s_a_row a;
            wmma::load_matrix_sync(a, Qs + wr * LDH + kk * 16, LDH);
#pragma unroll
            for (int nt = 0; nt < S_BC / 16; nt++) {
                s_b_col bm; /* K^T: element (kk, n) of K^T is K[n][kk] */
                wmma::load_matrix_sync(bm, Ks + nt * 16 * LDH + kk * 16, LDH);
                wmma::mma_sync(sacc[nt], a, bm, sacc[nt]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < S_BC / 16; nt++)
            wmma::store_matrix_sync(Ss + wr * S_LDS + nt * 16, sacc[nt], S_LDS,
                                    wmma::mem_row_major);
        __syncwarp();

        /* online softmax of row qi over this tile; key kj > qi is masked (keys at or past T
         * are then masked for every real row; rows past T see zero keys, finite, unused) */
        float *srow = Ss + row * S_LDS + half * 32;
        bf16 *prow = Ps + row * S_LDP + half * 32;
        float mx = -INFINITY;
#pragma unroll 8
        for (int c = 0; c < 32; c++) {
            int kj = kv0 + half * 32 + c;
            float s = kj <= qi ? srow[c] * scale : -INFINITY;
            srow[c] = s;
            mx = fmaxf(mx, s);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        /* finite: key 0 lies in tile 0 and is visible to every row */
        const float mnew = fmaxf(m, mx);
        const float alpha = __expf(m - mnew); /* 0 on the first tile (m = -inf) */
        float sum = 0.0f;
#pragma unroll 8
        for (int c = 0; c < 32; c++) {
            float p = __expf(srow[c] - mnew);
            sum += p;
            prow[c] = __float2bfloat16(p);
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * alpha + sum;
        m = mnew;
        float *orow = Os + row * LDO + half * (D / 2);
#pragma unroll 8
        for (int c = 0; c < D / 2; c++)
            orow[c] *= alpha;
        __syncwarp();

        /* O (warp's 16 rows) += P V */
        s_acc oacc[D / 16];
#pragma unroll
        for (int nt = 0; nt < D / 16; nt++)
            wmma::load_matrix_sync(oacc[nt], Os + wr * LDO + nt * 16, LDO, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < S_BC / 16; kk++) {
            s_a_row a;
            wmma::load_matrix_sync(a, Ps + wr * S_LDP + kk * 16, S_LDP);
#pragma unroll
            for (int nt = 0; nt < D / 16; nt++) {
                s_b_row bm;
                wmma::load_matrix_sync(bm, Vs + kk * 16 * LDH + nt * 16, LDH);
                wmma::mma_sync(oacc[nt], a, bm, oacc[nt]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < D / 16; nt++)
            wmma::store_matrix_sync(Os + wr * LDO + nt * 16, oacc[nt], LDO, wmma::mem_row_major);
        __syncwarp();
    }

    if (qi < T) {
        const float inv = 1.0f / l;
        const float *orow = Os + row * LDO + half * (D / 2);
        __nv_bfloat162 *og =
            (__nv_bfloat162 *)(out + ((size_t)(b * (size_t)T + qi) * H + h) * D + half * (D / 2));
#pragma unroll 8
        for (int c = 0; c < D / 2; c += 2)
            og[c / 2] = __floats2bfloat162_rn(orow[c] * inv, orow[c + 1] * inv);
        if (half == 0)
            lse[((size_t)b * H + h) * T + qi] = m + logf(l);
    }
}

/* Dsum[b, h, t] = sum_d dout[b, t, h, d] * out[b, t, h, d] in fp32: a warp per (b, t, h) row. */
__global__ void s_dsum_kernel(float *Dsum, const bf16 *dout, const bf16 *out, int B, int T,
                              int H, int D)
{
    size_t rowi = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    int lane = threadIdx.x % 32;
    if (rowi >= (size_t)B * T * H)
        return;
    const bf16 *a = dout + rowi * D, *o = out + rowi * D;
    float s = 0.0f;
    for (int d = lane; d < D; d += 32)
        s += __bfloat162float(a[d]) * __bfloat162float(o[d]);
    for (int off = 16; off > 0; off /= 2)
        s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
        int h = (int)(rowi % H);
        size_t bt = rowi / H;
        int t = (int)(bt % T), b = (int)(bt / T);
        Dsum[((size_t)b * H + h) * T + t] = s;
    }
}

/* dq (bf16) = dqacc (fp32), n elements. */
__global__ void s_cast_kernel(bf16 *dq, const float *dqacc, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dq[i] = __float2bfloat16(dqacc[i]);
}

template <int D>
static constexpr size_t s_bwd_smem()
{
    return (size_t)(2 * S_BR + 2 * S_BC) * (D + S_PAD_H) * sizeof(bf16) /* Q, dO, K, V */
           + (size_t)2 * S_BR * S_LDP * sizeof(bf16)                    /* P, dS */
           + (size_t)2 * S_BR * S_LDS * sizeof(float)                   /* S, dP; dq scratch */
           + (size_t)2 * S_BR * sizeof(float);                          /* lse, Dsum rows */
}

/* One block per (key tile, kv head, batch): dK, dV of the tile stay in wmma accumulators
 * (registers) while the block walks the H/KVH query heads of the group and, for each, the
 * query tiles at or below the diagonal, recomputing P = exp(S scale - lse). dS = P (dP - Dsum)
 * scale; dV += P^T dO, dK += dS^T Q (warp w owns key rows 16w..16w+15), dQ += dS K (warp w owns
 * query rows 16w..), added into dqacc with fp32 atomics. */
template <int D>
__global__ void __launch_bounds__(S_THREADS)
    s_bwd_kernel(bf16 *dk, bf16 *dv, float *dqacc, const bf16 *dout, const bf16 *q,
                 const bf16 *k, const bf16 *v, const float *lse, const float *Dsum, int T, int H,
                 int KVH, float scale)
{
    constexpr int LDH = D + S_PAD_H, LDO = D + S_PAD_F;
    static_assert(S_BR * LDO <= 2 * S_BR * S_LDS, "dq scratch must fit in S, dP");
    static_assert(S_BC == S_BR, "dk/dv staging reuses the S_BR-row scratch");
    extern __shared__ __align__(128) unsigned char s_smem[];
    bf16 *Ks = (bf16 *)s_smem;
    bf16 *Vs = Ks + S_BC * LDH;
    bf16 *Qs = Vs + S_BC * LDH;
    bf16 *dOs = Qs + S_BR * LDH;
    bf16 *Ps = dOs + S_BR * LDH;
    bf16 *dSs = Ps + S_BR * S_LDP;
    float *Ss = (float *)(dSs + S_BR * S_LDP);
    float *dPs = Ss + S_BR * S_LDS;
    float *Ls = dPs + S_BR * S_LDS;
    float *Dl = Ls + S_BR;
    float *scratch = Ss; /* (S_BR, LDO) once S and dP are consumed */

    const int jt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int G = H / KVH, kv0 = jt * S_BC;
    const size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16;
    const int r = lane / 2, half = lane % 2;
    const int row = wr + r;

    s_load_tile<D>(Ks, k + ((size_t)b * T * KVH + kvh) * D, kv0, S_BC, T, kstride);
    s_load_tile<D>(Vs, v + ((size_t)b * T * KVH + kvh) * D, kv0, S_BC, T, kstride);

    s_acc dkacc[D / 16], dvacc[D / 16];
#pragma unroll
    for (int nt = 0; nt < D / 16; nt++) {
        wmma::fill_fragment(dkacc[nt], 0.0f);
        wmma::fill_fragment(dvacc[nt], 0.0f);
    }
    const int nq = (T + S_BR - 1) / S_BR;
    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        const bf16 *qb = q + ((size_t)b * T * H + h) * D;
        const bf16 *dob = dout + ((size_t)b * T * H + h) * D;
        const float *lseb = lse + ((size_t)b * H + h) * T;
        const float *Db = Dsum + ((size_t)b * H + h) * T;
        for (int it = kv0 / S_BR; it < nq; it++) {
            const int q0 = it * S_BR;
            __syncthreads(); /* the previous iteration's readers of Q, dO, P, dS, scratch */
            s_load_tile<D>(Qs, qb, q0, S_BR, T, qstride);
            s_load_tile<D>(dOs, dob, q0, S_BR, T, qstride);
            if (threadIdx.x < S_BR) {
                int t = q0 + threadIdx.x;
                Ls[threadIdx.x] = t < T ? lseb[t] : 0.0f;
                Dl[threadIdx.x] = t < T ? Db[t] : 0.0f;
            }
            __syncthreads();

            /* S = Q K^T and dP = dO V^T for the warp's 16 query rows */
            s_acc sacc[S_BC / 16], pacc[S_BC / 16];
#pragma unroll
            for (int nt = 0; nt < S_BC / 16; nt++) {
                wmma::fill_fragment(sacc[nt], 0.0f);
                wmma::fill_fragment(pacc[nt], 0.0f);
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                s_a_row aq, ao;
                wmma::load_matrix_sync(aq, Qs + wr * LDH + kk * 16, LDH);
                wmma::load_matrix_sync(ao, dOs + wr * LDH + kk * 16, LDH);
#pragma unroll
                for (int nt = 0; nt < S_BC / 16; nt++) {
                    s_b_col bk, bv;
                    wmma::load_matrix_sync(bk, Ks + nt * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(sacc[nt], aq, bk, sacc[nt]);
                    wmma::load_matrix_sync(bv, Vs + nt * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(pacc[nt], ao, bv, pacc[nt]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < S_BC / 16; nt++) {
                wmma::store_matrix_sync(Ss + wr * S_LDS + nt * 16, sacc[nt], S_LDS,
                                        wmma::mem_row_major);
                wmma::store_matrix_sync(dPs + wr * S_LDS + nt * 16, pacc[nt], S_LDS,
                                        wmma::mem_row_major);
            }
            __syncwarp();

            /* P and dS of row qi; masked entries and rows past T are 0 */
            {
                const int qi = q0 + row;
                const float lr = Ls[row], dr = Dl[row];
                const float *srow = Ss + row * S_LDS + half * 32;
                const float *dprow = dPs + row * S_LDS + half * 32;
                bf16 *prow = Ps + row * S_LDP + half * 32;
                bf16 *dsrow = dSs + row * S_LDP + half * 32;
#pragma unroll 8
                for (int c = 0; c < 32; c++) {
                    int kj = kv0 + half * 32 + c;
                    float p = (qi < T && kj <= qi) ? __expf(srow[c] * scale - lr) : 0.0f;
                    prow[c] = __float2bfloat16(p);
                    dsrow[c] = __float2bfloat16(p * (dprow[c] - dr) * scale);
                }
            }
            __syncthreads(); /* dV, dK contract over all S_BR rows of P, dS */

            /* dV += P^T dO, dK += dS^T Q for the warp's 16 key rows */
#pragma unroll
            for (int kk = 0; kk < S_BR / 16; kk++) {
                s_a_col ap, ad; /* (P^T)(m, kk) = P[kk][m]: column-major from P's rows */
                wmma::load_matrix_sync(ap, Ps + kk * 16 * S_LDP + wr, S_LDP);
                wmma::load_matrix_sync(ad, dSs + kk * 16 * S_LDP + wr, S_LDP);
#pragma unroll
                for (int nt = 0; nt < D / 16; nt++) {
                    s_b_row bo, bq;
                    wmma::load_matrix_sync(bo, dOs + kk * 16 * LDH + nt * 16, LDH);
                    wmma::mma_sync(dvacc[nt], ap, bo, dvacc[nt]);
                    wmma::load_matrix_sync(bq, Qs + kk * 16 * LDH + nt * 16, LDH);
                    wmma::mma_sync(dkacc[nt], ad, bq, dkacc[nt]);
                }
            }

            /* dQ (warp's 16 query rows) = dS K, through the scratch into dqacc */
#pragma unroll
            for (int nt = 0; nt < D / 16; nt++) {
                s_acc qa;
                wmma::fill_fragment(qa, 0.0f);
#pragma unroll
                for (int kk = 0; kk < S_BC / 16; kk++) {
                    s_a_row a;
                    s_b_row bk;
                    wmma::load_matrix_sync(a, dSs + wr * S_LDP + kk * 16, S_LDP);
                    wmma::load_matrix_sync(bk, Ks + kk * 16 * LDH + nt * 16, LDH);
                    wmma::mma_sync(qa, a, bk, qa);
                }
                wmma::store_matrix_sync(scratch + wr * LDO + nt * 16, qa, LDO,
                                        wmma::mem_row_major);
            }
            __syncwarp();
            for (int i = lane; i < 16 * D; i += 32) {
                int rr = i / D, c = i % D, qi = q0 + wr + rr;
                if (qi < T)
                    atomicAdd(dqacc + ((size_t)b * T + qi) * qstride + (size_t)h * D + c,
                              scratch[(wr + rr) * LDO + c]);
            }
        }
    }

    /* dK, dV of the warp's 16 key rows, through the scratch (its own rows only) */
    __syncthreads();
    for (int which = 0; which < 2; which++) {
        bf16 *dst = which == 0 ? dk : dv;
#pragma unroll
        for (int nt = 0; nt < D / 16; nt++)
            wmma::store_matrix_sync(scratch + wr * LDO + nt * 16,
                                    which == 0 ? dkacc[nt] : dvacc[nt], LDO,
                                    wmma::mem_row_major);
        __syncwarp();
        for (int i = lane; i < 16 * D / 2; i += 32) {
            int rr = (2 * i) / D, c = (2 * i) % D, kj = kv0 + wr + rr;
            if (kj < T)
                *(__nv_bfloat162 *)(dst + ((size_t)b * T + kj) * kstride + (size_t)kvh * D + c) =
                    __floats2bfloat162_rn(scratch[(wr + rr) * LDO + c],
                                          scratch[(wr + rr) * LDO + c + 1]);
        }
        __syncwarp();
    }
}

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
    if (B > 65535 || H > 65535) {
        fprintf(stderr, "%s: B=%d H=%d: grid dimensions over 65535\n", fn, B, H);
        abort();
    }
}

template <int D>
static void s_fwd(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int B,
                  int T, int H, int KVH)
{
    const size_t smem = s_fwd_smem<D>();
    /* per device, cheap: set on every call so that a thread's other devices get it too */
    GPU_CHECK(cudaFuncSetAttribute(s_fwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem));
    dim3 grid((unsigned)((T + S_BR - 1) / S_BR), (unsigned)H, (unsigned)B);
    s_fwd_kernel<D><<<grid, S_THREADS, smem, gpu_stream()>>>(out, lse, q, k, v, T, H, KVH,
                                                             1.0f / sqrtf((float)D));
    GPU_CHECK_LAUNCH();
}

template <int D>
static void s_bwd(bf16 *dk, bf16 *dv, float *dqacc, const bf16 *dout, const bf16 *q,
                  const bf16 *k, const bf16 *v, const float *lse, const float *Dsum, int B,
                  int T, int H, int KVH)
{
    const size_t smem = s_bwd_smem<D>();
    GPU_CHECK(cudaFuncSetAttribute(s_bwd_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)smem));
    dim3 grid((unsigned)((T + S_BC - 1) / S_BC), (unsigned)KVH, (unsigned)B);
    s_bwd_kernel<D><<<grid, S_THREADS, smem, gpu_stream()>>>(
        dk, dv, dqacc, dout, q, k, v, lse, Dsum, T, H, KVH, 1.0f / sqrtf((float)D));
    GPU_CHECK_LAUNCH();
}

extern "C" void gpu_flash_fwd(uint16_t *out, float *lse, const uint16_t *q, const uint16_t *k,
                              const uint16_t *v, int B, int T, int H, int KVH, int hd)
{
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
    s_check_shape("gpu_flash_bwd", B, T, H, KVH, hd);
    cudaStream_t st = gpu_stream();
    const size_t nq = (size_t)B * T * H * hd, rows = (size_t)B * T * H;
    float *dqacc = workspace, *Dsum = workspace + nq;
    GPU_CHECK(cudaMemsetAsync(dqacc, 0, nq * sizeof(float), st));
    s_dsum_kernel<<<(unsigned)((rows * 32 + 255) / 256), 256, 0, st>>>(
        Dsum, (const bf16 *)dout, (const bf16 *)out, B, T, H, hd);
    GPU_CHECK_LAUNCH();
    if (hd == 64)
        s_bwd<64>((bf16 *)dk, (bf16 *)dv, dqacc, (const bf16 *)dout, (const bf16 *)q,
                  (const bf16 *)k, (const bf16 *)v, lse, Dsum, B, T, H, KVH);
    else
        s_bwd<128>((bf16 *)dk, (bf16 *)dv, dqacc, (const bf16 *)dout, (const bf16 *)q,
                   (const bf16 *)k, (const bf16 *)v, lse, Dsum, B, T, H, KVH);
    size_t blocks = (nq + 255) / 256;
    s_cast_kernel<<<(unsigned)(blocks < 8192 ? blocks : 8192), 256, 0, st>>>((bf16 *)dq, dqacc,
                                                                             nq);
    GPU_CHECK_LAUNCH();
}
