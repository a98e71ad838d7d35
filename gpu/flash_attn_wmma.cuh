/* The first bf16 flash attention kernels (nvcuda::wmma 16x16x16 through shared memory), kept
 * to compare the mma.sync kernels of gpu/flash_attn.cu against: gpu_flash_wmma_fwd/bwd and
 * SEMOE_FLASH=wmma (gpu/flash_attn.h). Included by gpu/flash_attn.cu only, after its typedefs
 * and gpu/stream.h. Tiles of W_BR query rows by W_BC key rows, online softmax in fp32. */
#ifndef SEMOE_GPU_FLASH_ATTN_WMMA_CUH
#define SEMOE_GPU_FLASH_ATTN_WMMA_CUH

#include <mma.h>

namespace wmma = nvcuda::wmma;

/* Four warps per block, each owning 16 rows of a 64-row tile: 16 query rows in forward and
 * in the dq product, 16 key rows for dk and dv in backward. */
#define W_BR 64                  /* query rows per tile */
#define W_BC 64                  /* key rows per tile */
#define W_THREADS 128            /* 4 warps */
#define W_PAD_H 8                /* bf16 row padding: keeps wmma ldm a multiple of 8 and     \
                                    shifts rows across banks */
#define W_PAD_F 4                /* fp32 row padding (ldm a multiple of 4) */
#define W_LDP (W_BC + W_PAD_H)   /* ldm of the bf16 (W_BR, W_BC) tiles P, dS */
#define W_LDS (W_BC + W_PAD_F)   /* ldm of the fp32 (W_BR, W_BC) tiles S, dP */

typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major> w_a_row;
typedef wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major> w_a_col;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major> w_b_row;
typedef wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major> w_b_col;
typedef wmma::fragment<wmma::accumulator, 16, 16, 16, float> w_acc;

/* Rows [row0, row0 + n) of a (T, ..., D) tensor whose row t starts at src + t * stride, into
 * dst (n, D + W_PAD_H) by the whole block, 16 bytes a thread; rows at or past T read as 0. */
template <int D>
__device__ __forceinline__ void s_wmma_load_tile(bf16 *dst, const bf16 *src, int row0, int n,
                                                 int T, size_t stride)
{
    constexpr int VPR = D / 8; /* 16-byte vectors per row */
    for (int i = threadIdx.x; i < n * VPR; i += W_THREADS) {
        int r = i / VPR, c = (i % VPR) * 8;
        uint4 val = make_uint4(0, 0, 0, 0);
        if (row0 + r < T)
            val = *(const uint4 *)(src + (size_t)(row0 + r) * stride + c);
        *(uint4 *)(dst + r * (D + W_PAD_H) + c) = val;
    }
}

template <int D>
static constexpr size_t s_wmma_fwd_smem()
{
    return (size_t)(W_BR + 2 * W_BC) * (D + W_PAD_H) * sizeof(bf16) /* Q, K, V */
           + (size_t)W_BR * W_LDP * sizeof(bf16)                   /* P */
           + (size_t)W_BR * W_LDS * sizeof(float)                  /* S */
           + (size_t)W_BR * (D + W_PAD_F) * sizeof(float);         /* O accumulator */
}

/* One block per (query tile, head, batch). The O accumulator lives in shared memory (fp32) so
 * that the online-softmax rescale by exp(m_old - m_new) is a plain per-row loop (a wmma
 * accumulator's element-to-row map is opaque); each warp touches only its own 16 rows of S, P
 * and O, so only the K/V loads need the block barrier. */
template <int D>
__global__ void __launch_bounds__(W_THREADS)
    s_wmma_fwd_kernel(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int T,
                 int H, int KVH, float scale)
{
    constexpr int LDH = D + W_PAD_H, LDO = D + W_PAD_F;
    extern __shared__ __align__(128) unsigned char s_wmma_smem[];
    bf16 *Qs = (bf16 *)s_wmma_smem;
    bf16 *Ks = Qs + W_BR * LDH;
    bf16 *Vs = Ks + W_BC * LDH;
    bf16 *Ps = Vs + W_BC * LDH;
    float *Ss = (float *)(Ps + W_BR * W_LDP);
    float *Os = Ss + W_BR * W_LDS;

    const int qt = gridDim.x - 1 - blockIdx.x; /* the longest rows (most key tiles) first */
    const int h = blockIdx.y, b = blockIdx.z, kvh = h / (H / KVH);
    const int q0 = qt * W_BR;
    const size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;
    const bf16 *qb = q + ((size_t)b * T * H + h) * D;
    const bf16 *kb = k + ((size_t)b * T * KVH + kvh) * D;
    const bf16 *vb = v + ((size_t)b * T * KVH + kvh) * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16;               /* the warp's first row in the tile */
    const int r = lane / 2, half = lane % 2; /* softmax: a lane pair per row, 32 columns each */
    const int row = wr + r, qi = q0 + row;

    s_wmma_load_tile<D>(Qs, qb, q0, W_BR, T, qstride);
    for (int i = threadIdx.x; i < W_BR * LDO; i += W_THREADS)
        Os[i] = 0.0f;
    float m = -INFINITY, l = 0.0f; /* row qi's running max (scaled scores) and sum */
    const int nkv = (min(T, q0 + W_BR) - 1) / W_BC + 1;
    for (int j = 0; j < nkv; j++) {
        const int kv0 = j * W_BC;
        __syncthreads(); /* the previous tile's K, V are read by every warp */
        s_wmma_load_tile<D>(Ks, kb, kv0, W_BC, T, kstride);
        s_wmma_load_tile<D>(Vs, vb, kv0, W_BC, T, kstride);
        __syncthreads();

        w_acc sacc[W_BC / 16];
#pragma unroll
        for (int nt = 0; nt < W_BC / 16; nt++)
            wmma::fill_fragment(sacc[nt], 0.0f);
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            w_a_row a;
            wmma::load_matrix_sync(a, Qs + wr * LDH + kk * 16, LDH);
#pragma unroll
            for (int nt = 0; nt < W_BC / 16; nt++) {
                w_b_col bm; /* K^T: element (kk, n) of K^T is K[n][kk] */
                wmma::load_matrix_sync(bm, Ks + nt * 16 * LDH + kk * 16, LDH);
                wmma::mma_sync(sacc[nt], a, bm, sacc[nt]);
            }
        }
#pragma unroll
        for (int nt = 0; nt < W_BC / 16; nt++)
            wmma::store_matrix_sync(Ss + wr * W_LDS + nt * 16, sacc[nt], W_LDS,
                                    wmma::mem_row_major);
        __syncwarp();

        /* online softmax of row qi over this tile; key kj > qi is masked (keys at or past T
         * are then masked for every real row; rows past T see zero keys, finite, unused) */
        float *srow = Ss + row * W_LDS + half * 32;
        bf16 *prow = Ps + row * W_LDP + half * 32;
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
        w_acc oacc[D / 16];
#pragma unroll
        for (int nt = 0; nt < D / 16; nt++)
            wmma::load_matrix_sync(oacc[nt], Os + wr * LDO + nt * 16, LDO, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < W_BC / 16; kk++) {
            w_a_row a;
            wmma::load_matrix_sync(a, Ps + wr * W_LDP + kk * 16, W_LDP);
#pragma unroll
            for (int nt = 0; nt < D / 16; nt++) {
                w_b_row bm;
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
__global__ void s_wmma_dsum_kernel(float *Dsum, const bf16 *dout, const bf16 *out, int B, int T,
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
__global__ void s_wmma_cast_kernel(bf16 *dq, const float *dqacc, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dq[i] = __float2bfloat16(dqacc[i]);
}

template <int D>
static constexpr size_t s_wmma_bwd_smem()
{
    return (size_t)(2 * W_BR + 2 * W_BC) * (D + W_PAD_H) * sizeof(bf16) /* Q, dO, K, V */
           + (size_t)2 * W_BR * W_LDP * sizeof(bf16)                    /* P, dS */
           + (size_t)2 * W_BR * W_LDS * sizeof(float)                   /* S, dP; dq scratch */
           + (size_t)2 * W_BR * sizeof(float);                          /* lse, Dsum rows */
}

/* One block per (key tile, kv head, batch): dK, dV of the tile stay in wmma accumulators
 * (registers) while the block walks the H/KVH query heads of the group and, for each, the
 * query tiles at or below the diagonal, recomputing P = exp(S scale - lse). dS = P (dP - Dsum)
 * scale; dV += P^T dO, dK += dS^T Q (warp w owns key rows 16w..16w+15), dQ += dS K (warp w owns
 * query rows 16w..), added into dqacc with fp32 atomics. */
template <int D>
__global__ void __launch_bounds__(W_THREADS)
    s_wmma_bwd_kernel(bf16 *dk, bf16 *dv, float *dqacc, const bf16 *dout, const bf16 *q,
                 const bf16 *k, const bf16 *v, const float *lse, const float *Dsum, int T, int H,
                 int KVH, float scale)
{
    constexpr int LDH = D + W_PAD_H, LDO = D + W_PAD_F;
    static_assert(W_BR * LDO <= 2 * W_BR * W_LDS, "dq scratch must fit in S, dP");
    static_assert(W_BC == W_BR, "dk/dv staging reuses the W_BR-row scratch");
    extern __shared__ __align__(128) unsigned char s_wmma_smem[];
    bf16 *Ks = (bf16 *)s_wmma_smem;
    bf16 *Vs = Ks + W_BC * LDH;
    bf16 *Qs = Vs + W_BC * LDH;
    bf16 *dOs = Qs + W_BR * LDH;
    bf16 *Ps = dOs + W_BR * LDH;
    bf16 *dSs = Ps + W_BR * W_LDP;
    float *Ss = (float *)(dSs + W_BR * W_LDP);
    float *dPs = Ss + W_BR * W_LDS;
    float *Ls = dPs + W_BR * W_LDS;
    float *Dl = Ls + W_BR;
    float *scratch = Ss; /* (W_BR, LDO) once S and dP are consumed */

    const int jt = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int G = H / KVH, kv0 = jt * W_BC;
    const size_t qstride = (size_t)H * D, kstride = (size_t)KVH * D;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int wr = warp * 16;
    const int r = lane / 2, half = lane % 2;
    const int row = wr + r;

    s_wmma_load_tile<D>(Ks, k + ((size_t)b * T * KVH + kvh) * D, kv0, W_BC, T, kstride);
    s_wmma_load_tile<D>(Vs, v + ((size_t)b * T * KVH + kvh) * D, kv0, W_BC, T, kstride);

    w_acc dkacc[D / 16], dvacc[D / 16];
#pragma unroll
    for (int nt = 0; nt < D / 16; nt++) {
        wmma::fill_fragment(dkacc[nt], 0.0f);
        wmma::fill_fragment(dvacc[nt], 0.0f);
    }
    const int nq = (T + W_BR - 1) / W_BR;
    for (int g = 0; g < G; g++) {
        const int h = kvh * G + g;
        const bf16 *qb = q + ((size_t)b * T * H + h) * D;
        const bf16 *dob = dout + ((size_t)b * T * H + h) * D;
        const float *lseb = lse + ((size_t)b * H + h) * T;
        const float *Db = Dsum + ((size_t)b * H + h) * T;
        for (int it = kv0 / W_BR; it < nq; it++) {
            const int q0 = it * W_BR;
            __syncthreads(); /* the previous iteration's readers of Q, dO, P, dS, scratch */
            s_wmma_load_tile<D>(Qs, qb, q0, W_BR, T, qstride);
            s_wmma_load_tile<D>(dOs, dob, q0, W_BR, T, qstride);
            if (threadIdx.x < W_BR) {
                int t = q0 + threadIdx.x;
                Ls[threadIdx.x] = t < T ? lseb[t] : 0.0f;
                Dl[threadIdx.x] = t < T ? Db[t] : 0.0f;
            }
            __syncthreads();

            /* S = Q K^T and dP = dO V^T for the warp's 16 query rows */
            w_acc sacc[W_BC / 16], pacc[W_BC / 16];
#pragma unroll
            for (int nt = 0; nt < W_BC / 16; nt++) {
                wmma::fill_fragment(sacc[nt], 0.0f);
                wmma::fill_fragment(pacc[nt], 0.0f);
            }
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                w_a_row aq, ao;
                wmma::load_matrix_sync(aq, Qs + wr * LDH + kk * 16, LDH);
                wmma::load_matrix_sync(ao, dOs + wr * LDH + kk * 16, LDH);
#pragma unroll
                for (int nt = 0; nt < W_BC / 16; nt++) {
                    w_b_col bk, bv;
                    wmma::load_matrix_sync(bk, Ks + nt * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(sacc[nt], aq, bk, sacc[nt]);
                    wmma::load_matrix_sync(bv, Vs + nt * 16 * LDH + kk * 16, LDH);
                    wmma::mma_sync(pacc[nt], ao, bv, pacc[nt]);
                }
            }
#pragma unroll
            for (int nt = 0; nt < W_BC / 16; nt++) {
                wmma::store_matrix_sync(Ss + wr * W_LDS + nt * 16, sacc[nt], W_LDS,
                                        wmma::mem_row_major);
                wmma::store_matrix_sync(dPs + wr * W_LDS + nt * 16, pacc[nt], W_LDS,
                                        wmma::mem_row_major);
            }
            __syncwarp();

            /* P and dS of row qi; masked entries and rows past T are 0 */
            {
                const int qi = q0 + row;
                const float lr = Ls[row], dr = Dl[row];
                const float *srow = Ss + row * W_LDS + half * 32;
                const float *dprow = dPs + row * W_LDS + half * 32;
                bf16 *prow = Ps + row * W_LDP + half * 32;
                bf16 *dsrow = dSs + row * W_LDP + half * 32;
#pragma unroll 8
                for (int c = 0; c < 32; c++) {
                    int kj = kv0 + half * 32 + c;
                    float p = (qi < T && kj <= qi) ? __expf(srow[c] * scale - lr) : 0.0f;
                    prow[c] = __float2bfloat16(p);
                    dsrow[c] = __float2bfloat16(p * (dprow[c] - dr) * scale);
                }
            }
            __syncthreads(); /* dV, dK contract over all W_BR rows of P, dS */

            /* dV += P^T dO, dK += dS^T Q for the warp's 16 key rows */
#pragma unroll
            for (int kk = 0; kk < W_BR / 16; kk++) {
                w_a_col ap, ad; /* (P^T)(m, kk) = P[kk][m]: column-major from P's rows */
                wmma::load_matrix_sync(ap, Ps + kk * 16 * W_LDP + wr, W_LDP);
                wmma::load_matrix_sync(ad, dSs + kk * 16 * W_LDP + wr, W_LDP);
#pragma unroll
                for (int nt = 0; nt < D / 16; nt++) {
                    w_b_row bo, bq;
                    wmma::load_matrix_sync(bo, dOs + kk * 16 * LDH + nt * 16, LDH);
                    wmma::mma_sync(dvacc[nt], ap, bo, dvacc[nt]);
                    wmma::load_matrix_sync(bq, Qs + kk * 16 * LDH + nt * 16, LDH);
                    wmma::mma_sync(dkacc[nt], ad, bq, dkacc[nt]);
                }
            }

            /* dQ (warp's 16 query rows) = dS K, through the scratch into dqacc */
#pragma unroll
            for (int nt = 0; nt < D / 16; nt++) {
                w_acc qa;
                wmma::fill_fragment(qa, 0.0f);
#pragma unroll
                for (int kk = 0; kk < W_BC / 16; kk++) {
                    w_a_row a;
                    w_b_row bk;
                    wmma::load_matrix_sync(a, dSs + wr * W_LDP + kk * 16, W_LDP);
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

/* gpu_flash_wmma_fwd for head dim D: the shape already checked. */
template <int D>
static void s_wmma_fwd(bf16 *out, float *lse, const bf16 *q, const bf16 *k, const bf16 *v, int B,
                       int T, int H, int KVH)
{
    const size_t smem = s_wmma_fwd_smem<D>();
    /* per device, cheap: set on every call so that a thread's other devices get it too */
    GPU_CHECK(cudaFuncSetAttribute(s_wmma_fwd_kernel<D>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((T + W_BR - 1) / W_BR), (unsigned)H, (unsigned)B);
    s_wmma_fwd_kernel<D><<<grid, W_THREADS, smem, gpu_stream()>>>(out, lse, q, k, v, T, H, KVH,
                                                                  1.0f / sqrtf((float)D));
    GPU_CHECK_LAUNCH();
}

/* gpu_flash_wmma_bwd for head dim D: dqacc (B, T, H, D) and Dsum (B, H, T) in the workspace. */
template <int D>
static void s_wmma_bwd(bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *q,
                       const bf16 *k, const bf16 *v, const bf16 *out, const float *lse, int B,
                       int T, int H, int KVH, float *workspace)
{
    cudaStream_t st = gpu_stream();
    const size_t nq = (size_t)B * T * H * D, rows = (size_t)B * T * H;
    float *dqacc = workspace, *Dsum = workspace + nq;
    GPU_CHECK(cudaMemsetAsync(dqacc, 0, nq * sizeof(float), st));
    s_wmma_dsum_kernel<<<(unsigned)((rows * 32 + 255) / 256), 256, 0, st>>>(Dsum, dout, out, B,
                                                                             T, H, D);
    GPU_CHECK_LAUNCH();
    const size_t smem = s_wmma_bwd_smem<D>();
    GPU_CHECK(cudaFuncSetAttribute(s_wmma_bwd_kernel<D>,
                                   cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    dim3 grid((unsigned)((T + W_BC - 1) / W_BC), (unsigned)KVH, (unsigned)B);
    s_wmma_bwd_kernel<D><<<grid, W_THREADS, smem, st>>>(dk, dv, dqacc, dout, q, k, v, lse, Dsum,
                                                        T, H, KVH, 1.0f / sqrtf((float)D));
    GPU_CHECK_LAUNCH();
    size_t blocks = (nq + 255) / 256;
    s_wmma_cast_kernel<<<(unsigned)(blocks < 8192 ? blocks : 8192), 256, 0, st>>>(dq, dqacc, nq);
    GPU_CHECK_LAUNCH();
}

#endif
