/* The mixed-precision graph's kernels (gpu/bf16_ops.h): bf16 activations beside the fp32
 * residual stream, each op in the arithmetic of its fp32 twin (gpu/elementwise.cu, cpu/ops_impl.h)
 * with bf16 loads widened exactly to fp32 and one round-to-nearest-even per output. Rows move
 * as 16-byte vectors (8 bf16) where shapes and alignment allow, as single elements otherwise. */
#include "gpu/bf16_ops.h"
#include "gpu/bf16.cuh"
#include "gpu/reduce.cuh"
#include "gpu/stream.h"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef __nv_bfloat16 bf16;

#define S_VEC GPU_VEC           /* bf16 per 16-byte vector */
#define S_THREADS 256           /* elementwise kernels */
#define S_ROW_THREADS 512       /* at most, one block per row */
#define S_MAX_BLOCKS (1u << 20) /* grid-stride beyond this */
#define S_SUM_COLS 32           /* partial sums: columns per block of the second pass */
#define S_SUM_GROUPS 8          /* partial sums: chunk groups per column */

#define S_FOR_EACH(i, n)                                                                       \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                    \
         i += (size_t)gridDim.x * blockDim.x)

/* A broken shape invariant in the caller: say which and abort, as a failed launch does. */
#define S_REQUIRE(cond, ...)                                                                   \
    do {                                                                                       \
        if (!(cond)) {                                                                         \
            fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);                                   \
            fprintf(stderr, __VA_ARGS__);                                                      \
            fprintf(stderr, "\n");                                                             \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

static bool s_aligned(const void *p)
{
    return ((uintptr_t)p & 15u) == 0;
}

/* Blocks of S_THREADS for n > 0 work items; the kernels loop when n needs more. */
static unsigned s_grid(size_t n)
{
    size_t b = (n + S_THREADS - 1) / S_THREADS;
    return (unsigned)(b < 1 ? 1 : b < S_MAX_BLOCKS ? b : S_MAX_BLOCKS);
}

/* Threads for one block per row of `units` work items: whole warps (the block reductions
 * need them), 32 to S_ROW_THREADS. */
static unsigned s_row_threads(size_t units)
{
    size_t t = (units + 31) / 32 * 32;
    return (unsigned)(t < 32 ? 32 : t > S_ROW_THREADS ? S_ROW_THREADS : t);
}

/* ---- casts ---------------------------------------------------------------------------- */

/* n / VEC vectors over the grid, then the n % VEC left by the grid's first threads. */
template <int VEC> __global__ static void s_from_f32(bf16 *dst, const float *src, size_t n)
{
    size_t nv = n / VEC;
    S_FOR_EACH(i, nv) {
        float v[VEC];
        gpu_ld<VEC>(v, src + i * VEC);
        gpu_st<VEC>(dst + i * VEC, v);
    }
    size_t t = nv * VEC + (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n)
        dst[t] = __float2bfloat16_rn(src[t]);
}

extern "C" void gpu_bf16_from_f32(uint16_t *dst, const float *src, size_t n)
{
    if (n == 0)
        return;
    bf16 *d = (bf16 *)dst;
    if (s_aligned(dst) && s_aligned(src))
        s_from_f32<S_VEC><<<s_grid(n / S_VEC), S_THREADS, 0, gpu_stream()>>>(d, src, n);
    else
        s_from_f32<1><<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(d, src, n);
    GPU_CHECK_LAUNCH();
}

template <int VEC> __global__ static void s_add_to_f32(float *dst, const bf16 *src, size_t n)
{
    size_t nv = n / VEC;
    S_FOR_EACH(i, nv) {
        float a[VEC], b[VEC];
        gpu_ld<VEC>(a, dst + i * VEC);
        gpu_ld<VEC>(b, src + i * VEC);
#pragma unroll
        for (int q = 0; q < VEC; q++)
            a[q] += b[q];
        gpu_st<VEC>(dst + i * VEC, a);
    }
    size_t t = nv * VEC + (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n)
        dst[t] += __bfloat162float(src[t]);
}

extern "C" void gpu_bf16_add_to_f32(float *dst, const uint16_t *src, size_t n)
{
    if (n == 0)
        return;
    const bf16 *s = (const bf16 *)src;
    if (s_aligned(dst) && s_aligned(src))
        s_add_to_f32<S_VEC><<<s_grid(n / S_VEC), S_THREADS, 0, gpu_stream()>>>(dst, s, n);
    else
        s_add_to_f32<1><<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(dst, s, n);
    GPU_CHECK_LAUNCH();
}

/* ---- deterministic column sums of per-chunk partials ---------------------------------- */

/* dst[c] (+)= sum over j of partial[j, c], partial (chunks, C): block (S_SUM_COLS,
 * S_SUM_GROUPS) over S_SUM_COLS columns, group g summing chunks g, g + S_SUM_GROUPS, ... in
 * order, then the groups in order: the same result on every run. Acc is the accumulator type;
 * the result is rounded to fp32 once. */
template <typename Acc>
__global__ static void s_sum_chunks(float *dst, const float *partial, int chunks, int C,
                                    int accumulate)
{
    __shared__ Acc part[S_SUM_GROUPS][S_SUM_COLS];
    int col = blockIdx.x * S_SUM_COLS + threadIdx.x;
    Acc acc = 0;
    if (col < C)
        for (int j = threadIdx.y; j < chunks; j += S_SUM_GROUPS)
            acc += (Acc)partial[(size_t)j * C + col];
    part[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < C) {
        Acc s = 0;
        for (int g = 0; g < S_SUM_GROUPS; g++)
            s += part[g][threadIdx.x];
        dst[col] = accumulate ? (float)(dst[col] + s) : (float)s;
    }
}

template <typename Acc>
static void s_sum_chunks_launch(float *dst, const float *partial, int chunks, int C,
                                int accumulate, cudaStream_t st)
{
    dim3 block(S_SUM_COLS, S_SUM_GROUPS);
    unsigned grid = (unsigned)((C + S_SUM_COLS - 1) / S_SUM_COLS);
    s_sum_chunks<Acc><<<grid, block, 0, st>>>(dst, partial, chunks, C, accumulate);
    GPU_CHECK_LAUNCH();
}

/* ---- rmsnorm -------------------------------------------------------------------------- */

/* One block per row, VEC elements per thread and step: rstd = 1/sqrt(mean(x^2) + eps),
 * out = bf16(w * (x * rstd)) as the CPU computes it (sum order aside). */
template <int VEC>
__global__ static void s_rmsnorm_fwd(bf16 *out, float *rstd, const float *x, const float *w,
                                     int D, float eps)
{
    size_t off = (size_t)blockIdx.x * D;
    int nv = D / VEC;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < nv; c += blockDim.x) {
        float xv[VEC];
        gpu_ld<VEC>(xv, x + off + (size_t)c * VEC);
#pragma unroll
        for (int q = 0; q < VEC; q++)
            ss += xv[q] * xv[q];
    }
    ss = gpu_block_sum(ss);
    float r = 1.0f / sqrtf(ss / D + eps);
    for (int c = threadIdx.x; c < nv; c += blockDim.x) {
        float xv[VEC], wv[VEC], ov[VEC];
        gpu_ld<VEC>(xv, x + off + (size_t)c * VEC);
        gpu_ld<VEC>(wv, w + (size_t)c * VEC);
#pragma unroll
        for (int q = 0; q < VEC; q++)
            ov[q] = wv[q] * (xv[q] * r);
        gpu_st<VEC>(out + off + (size_t)c * VEC, ov);
    }
    if (threadIdx.x == 0)
        rstd[blockIdx.x] = r;
}

extern "C" void gpu_bf16_rmsnorm_fwd(uint16_t *out, float *rstd, const float *x, const float *w,
                                     int N, int D, float eps)
{
    if (N <= 0 || D <= 0)
        return;
    bf16 *o = (bf16 *)out;
    cudaStream_t st = gpu_stream();
    if (D % S_VEC == 0 && s_aligned(out) && s_aligned(x) && s_aligned(w))
        s_rmsnorm_fwd<S_VEC><<<(unsigned)N, s_row_threads((size_t)D / S_VEC), 0, st>>>(
            o, rstd, x, w, D, eps);
    else
        s_rmsnorm_fwd<1><<<(unsigned)N, s_row_threads((size_t)D), 0, st>>>(o, rstd, x, w, D,
                                                                            eps);
    GPU_CHECK_LAUNCH();
}

/* One block per chunk of rows_per rows, row by row: dx_j += dout_j w_j r - c x_j with
 * c = r^3 / D sum_i dout_i w_i x_i (cpu_rmsnorm_bwd), and the chunk's dw partial
 * sum_n dout_j x_j r_n kept in shared memory (D floats, element q of vector c at q nv + c so
 * that a warp's accesses fall in distinct banks), then written to partial[chunk]. Each thread
 * owns the same columns in every row, so the partial needs no barrier. */
template <int VEC>
__global__ static void s_rmsnorm_bwd(float *dx, float *partial, const bf16 *dout,
                                     const float *x, const float *w, const float *rstd, int N,
                                     int D, int rows_per)
{
    extern __shared__ float s_dw[];
    int nv = D / VEC;
    for (int c = threadIdx.x; c < nv; c += blockDim.x)
#pragma unroll
        for (int q = 0; q < VEC; q++)
            s_dw[q * nv + c] = 0.0f;
    int n0 = blockIdx.x * rows_per;
    int n1 = n0 + rows_per < N ? n0 + rows_per : N;
    for (int n = n0; n < n1; n++) { /* the same bounds for the whole block: the sums see all */
        size_t off = (size_t)n * D;
        float r = rstd[n];
        float dot = 0.0f;
        for (int c = threadIdx.x; c < nv; c += blockDim.x) {
            float dv[VEC], xv[VEC], wv[VEC];
            gpu_ld<VEC>(dv, dout + off + (size_t)c * VEC);
            gpu_ld<VEC>(xv, x + off + (size_t)c * VEC);
            gpu_ld<VEC>(wv, w + (size_t)c * VEC);
#pragma unroll
            for (int q = 0; q < VEC; q++)
                dot += dv[q] * wv[q] * xv[q];
        }
        dot = gpu_block_sum(dot);
        float k = dot * r * r * r / D;
        for (int c = threadIdx.x; c < nv; c += blockDim.x) {
            float dv[VEC], xv[VEC], wv[VEC], gv[VEC];
            gpu_ld<VEC>(dv, dout + off + (size_t)c * VEC);
            gpu_ld<VEC>(xv, x + off + (size_t)c * VEC);
            gpu_ld<VEC>(wv, w + (size_t)c * VEC);
            gpu_ld<VEC>(gv, dx + off + (size_t)c * VEC);
#pragma unroll
            for (int q = 0; q < VEC; q++) {
                gv[q] += dv[q] * wv[q] * r - k * xv[q];
                s_dw[q * nv + c] += dv[q] * xv[q] * r;
            }
            gpu_st<VEC>(dx + off + (size_t)c * VEC, gv);
        }
    }
    for (int c = threadIdx.x; c < nv; c += blockDim.x) {
        float pv[VEC];
#pragma unroll
        for (int q = 0; q < VEC; q++)
            pv[q] = s_dw[q * nv + c];
        gpu_st<VEC>(partial + (size_t)blockIdx.x * D + (size_t)c * VEC, pv);
    }
}

/* Shared memory beyond the default 48 KiB per block is opted into per kernel. */
template <typename K> static void s_allow_smem(K kernel, size_t bytes, const char *what)
{
    if (bytes <= 48 * 1024)
        return;
    int dev = 0, optin = 0;
    GPU_CHECK(cudaGetDevice(&dev));
    GPU_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    S_REQUIRE(bytes <= (size_t)optin, "%s: %zu bytes of shared memory, the device allows %d",
              what, bytes, optin);
    GPU_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   (int)bytes));
}

extern "C" void gpu_bf16_rmsnorm_bwd(float *dx, float *dw, const uint16_t *dout, const float *x,
                                     const float *w, const float *rstd, int N, int D)
{
    if (N <= 0 || D <= 0)
        return;
    cudaStream_t st = gpu_stream();
    const bf16 *d = (const bf16 *)dout;
    /* Chunks of at least 8 rows, at most 512 of them: the scratch stays at 512 D floats and
     * the chunking depends on N alone (the same sums on every device). */
    int rows_per = (N + 511) / 512;
    if (rows_per < 8)
        rows_per = 8;
    int chunks = (N + rows_per - 1) / rows_per;
    float *partial = NULL;
    GPU_CHECK(cudaMallocAsync((void **)&partial, (size_t)chunks * D * sizeof(float), st));
    size_t smem = (size_t)D * sizeof(float);
    if (D % S_VEC == 0 && s_aligned(dx) && s_aligned(dout) && s_aligned(x) && s_aligned(w)) {
        s_allow_smem(s_rmsnorm_bwd<S_VEC>, smem, "gpu_bf16_rmsnorm_bwd");
        s_rmsnorm_bwd<S_VEC><<<(unsigned)chunks, s_row_threads((size_t)D / S_VEC), smem, st>>>(
            dx, partial, d, x, w, rstd, N, D, rows_per);
    } else {
        s_allow_smem(s_rmsnorm_bwd<1>, smem, "gpu_bf16_rmsnorm_bwd");
        s_rmsnorm_bwd<1><<<(unsigned)chunks, s_row_threads((size_t)D), smem, st>>>(
            dx, partial, d, x, w, rstd, N, D, rows_per);
    }
    GPU_CHECK_LAUNCH();
    s_sum_chunks_launch<float>(dw, partial, chunks, D, 1, st);
    GPU_CHECK(cudaFreeAsync(partial, st));
}

/* ---- fused QKV split with rope -------------------------------------------------------- */

/* Head h of row n: in the fused layout (packed not NULL: row n = heads q | k | v, H + 2 KVH
 * of them) or in the separate q (N, H, hd), k, v (N, KVH, hd). */
template <typename P>
__device__ __forceinline__ P *s_head(P *packed, P *q, P *k, P *v, int n, int h, int H, int KVH,
                                     int hd)
{
    if (packed)
        return packed + ((size_t)n * (H + 2 * KVH) + h) * hd;
    if (h < H)
        return q + ((size_t)n * H + h) * hd;
    h -= H;
    if (h < KVH)
        return k + ((size_t)n * KVH + h) * hd;
    return v + ((size_t)n * KVH + h - KVH) * hd;
}

/* One block per row n. First cos and sin of the row's angles pos[n] * theta^(-2i/hd),
 * i < hd/2, in double and rounded to fp32 as cpu_rope does (sin times sign: -1 turns back),
 * into shared memory; then every q and k head's pairs (i, i + hd/2), VEC consecutive i per
 * work item, turned in fp32 and rounded once, and the v heads copied. Forward reads the fused
 * layout and writes the separate one; backward the other way round. */
template <int VEC>
__global__ static void s_qkv_rope(const bf16 *in_packed, const bf16 *in_q, const bf16 *in_k,
                                  const bf16 *in_v, bf16 *out_packed, bf16 *out_q, bf16 *out_k,
                                  bf16 *out_v, const int32_t *pos, int H, int KVH, int hd,
                                  double theta, float sign)
{
    extern __shared__ float s_cs[]; /* cos (hd/2), then sign * sin (hd/2) */
    int n = blockIdx.x, half = hd / 2;
    float *cs = s_cs, *sn = s_cs + half;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double angle = pos[n] * pow(theta, -2.0 * i / hd);
        cs[i] = (float)cos(angle);
        sn[i] = sign * (float)sin(angle);
    }
    __syncthreads();
    int per_head = half / VEC;
    int rope_units = (H + KVH) * per_head, copy_units = KVH * hd / VEC;
    for (int u = threadIdx.x; u < rope_units + copy_units; u += blockDim.x) {
        if (u < rope_units) {
            int h = u / per_head, i0 = (u % per_head) * VEC;
            const bf16 *src = s_head(in_packed, in_q, in_k, in_v, n, h, H, KVH, hd);
            bf16 *dst = s_head(out_packed, out_q, out_k, out_v, n, h, H, KVH, hd);
            float x1[VEC], x2[VEC], y1[VEC], y2[VEC];
            gpu_ld<VEC>(x1, src + i0);
            gpu_ld<VEC>(x2, src + half + i0);
#pragma unroll
            for (int q = 0; q < VEC; q++) {
                float c = cs[i0 + q], s = sn[i0 + q];
                y1[q] = x1[q] * c - x2[q] * s;
                y2[q] = x2[q] * c + x1[q] * s;
            }
            gpu_st<VEC>(dst + i0, y1);
            gpu_st<VEC>(dst + half + i0, y2);
        } else { /* hd a multiple of VEC: a vector never straddles two heads */
            int e = (u - rope_units) * VEC;
            int h = H + KVH + e / hd, i = e % hd;
            gpu_copy_bits<VEC>(s_head(out_packed, out_q, out_k, out_v, n, h, H, KVH, hd) + i,
                        s_head(in_packed, in_q, in_k, in_v, n, h, H, KVH, hd) + i);
        }
    }
}

static void s_qkv_rope_launch(const bf16 *in_packed, const bf16 *in_q, const bf16 *in_k,
                              const bf16 *in_v, bf16 *out_packed, bf16 *out_q, bf16 *out_k,
                              bf16 *out_v, const int32_t *pos, int N, int H, int KVH, int hd,
                              double theta, float sign, const char *what)
{
    if (N <= 0)
        return;
    S_REQUIRE(H > 0 && KVH > 0 && hd > 0 && hd % 2 == 0,
              "%s: H=%d KVH=%d hd=%d: need at least one head of each kind and an even hd",
              what, H, KVH, hd);
    const void *ptrs[] = {in_packed, in_q, in_k, in_v, out_packed, out_q, out_k, out_v};
    bool vec = (hd / 2) % S_VEC == 0;
    for (size_t i = 0; i < sizeof ptrs / sizeof *ptrs; i++)
        vec = vec && s_aligned(ptrs[i]); /* NULL is aligned */
    int per = vec ? S_VEC : 1;
    size_t units = (size_t)(H + KVH) * (hd / 2 / per) + (size_t)KVH * hd / per;
    unsigned threads = s_row_threads(units);
    if (threads > S_THREADS)
        threads = S_THREADS;
    size_t smem = (size_t)hd * sizeof(float);
    cudaStream_t st = gpu_stream();
    if (vec)
        s_qkv_rope<S_VEC><<<(unsigned)N, threads, smem, st>>>(in_packed, in_q, in_k, in_v,
                                                              out_packed, out_q, out_k, out_v,
                                                              pos, H, KVH, hd, theta, sign);
    else
        s_qkv_rope<1><<<(unsigned)N, threads, smem, st>>>(in_packed, in_q, in_k, in_v,
                                                          out_packed, out_q, out_k, out_v, pos,
                                                          H, KVH, hd, theta, sign);
    GPU_CHECK_LAUNCH();
}

extern "C" void gpu_bf16_qkv_rope_fwd(uint16_t *q, uint16_t *k, uint16_t *v, const uint16_t *qkv,
                                      const int32_t *pos, int N, int H, int KVH, int hd,
                                      double theta)
{
    s_qkv_rope_launch((const bf16 *)qkv, NULL, NULL, NULL, NULL, (bf16 *)q, (bf16 *)k,
                      (bf16 *)v, pos, N, H, KVH, hd, theta, 1.0f, "gpu_bf16_qkv_rope_fwd");
}

extern "C" void gpu_bf16_qkv_rope_bwd(uint16_t *dqkv, const uint16_t *dq, const uint16_t *dk,
                                      const uint16_t *dv, const int32_t *pos, int N, int H,
                                      int KVH, int hd, double theta)
{
    s_qkv_rope_launch(NULL, (const bf16 *)dq, (const bf16 *)dk, (const bf16 *)dv, (bf16 *)dqkv,
                      NULL, NULL, NULL, pos, N, H, KVH, hd, theta, -1.0f,
                      "gpu_bf16_qkv_rope_bwd");
}

/* ---- cross-entropy -------------------------------------------------------------------- */

/* Visits row (V bf16) over the block's threads: eight(j) for each 16-byte vector j..j+7 of the
 * row, one(j) for the elements before the first and after the last (a row of odd V need not
 * start on 16 bytes). VEC 1: one(j) for every element. */
template <int VEC, typename One, typename Eight>
__device__ __forceinline__ void s_row_visit(const bf16 *row, int V, One one, Eight eight)
{
    int head = V, nvec = 0;
    if constexpr (VEC == S_VEC) {
        head = (int)(((16u - ((unsigned)(uintptr_t)row & 15u)) & 15u) >> 1);
        head = head < V ? head : V;
        nvec = (V - head) / S_VEC;
    }
    int tail = head + nvec * S_VEC;
    for (int t = threadIdx.x; t < nvec; t += blockDim.x)
        eight(head + S_VEC * t);
    for (int j = threadIdx.x; j < head; j += blockDim.x)
        one(j);
    for (int j = tail + threadIdx.x; j < V; j += blockDim.x)
        one(j);
}

/* One block per row, one read of the logits: each thread keeps a running max m and the sum
 * s of exp(l - m) over its elements, rescaled when m grows; the block then takes the max M
 * and sums s exp(m - M) (a thread without elements adds 0 exp(-inf) = 0). */
__global__ static void s_ce_fwd(float *losses, float *lse, const bf16 *logits,
                                const int32_t *targets, int V)
{
    const bf16 *row = logits + (size_t)blockIdx.x * V;
    float m = -INFINITY, s = 0.0f;
    auto one = [&](int j) {
        float l = __bfloat162float(row[j]);
        float mn = fmaxf(m, l);
        s = s * expf(m - mn) + expf(l - mn);
        m = mn;
    };
    auto eight = [&](int j) {
        float v[S_VEC];
        gpu_ld<S_VEC>(v, row + j);
        float mn = m;
#pragma unroll
        for (int q = 0; q < S_VEC; q++)
            mn = fmaxf(mn, v[q]);
        float acc = s * expf(m - mn);
#pragma unroll
        for (int q = 0; q < S_VEC; q++)
            acc += expf(v[q] - mn);
        s = acc;
        m = mn;
    };
    s_row_visit<S_VEC>(row, V, one, eight);
    float M = gpu_block_max(m);
    float S = gpu_block_sum(s * expf(m - M));
    if (threadIdx.x == 0) {
        float l = M + logf(S);
        lse[blockIdx.x] = l;
        losses[blockIdx.x] = l - __bfloat162float(row[targets[blockIdx.x]]);
    }
}

extern "C" void gpu_bf16_ce_fwd(float *losses, float *lse, const uint16_t *logits,
                                const int32_t *targets, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    s_ce_fwd<<<(unsigned)N, s_row_threads((size_t)V / S_VEC), 0, gpu_stream()>>>(
        losses, lse, (const bf16 *)logits, targets, V);
    GPU_CHECK_LAUNCH();
}

/* One block per row: dl = bf16(dloss (exp(l - lse) - onehot)). In place (dlogits == logits)
 * is safe: every element is read and then written by the same thread, with no restrict or
 * read-only loads that could reorder them. VEC 8 needs dlogits and logits equally aligned
 * (their rows then split into vectors at the same places). */
template <int VEC>
__global__ static void s_ce_bwd(bf16 *dlogits, const bf16 *logits, const float *lse,
                                const int32_t *targets, float dloss, int V)
{
    size_t off = (size_t)blockIdx.x * V;
    const bf16 *row = logits + off;
    bf16 *drow = dlogits + off;
    float l0 = lse[blockIdx.x];
    int t = targets[blockIdx.x];
    auto one = [&](int j) {
        float p = expf(__bfloat162float(row[j]) - l0);
        drow[j] = __float2bfloat16_rn(dloss * (p - (float)(j == t)));
    };
    auto eight = [&](int j) {
        float v[S_VEC];
        gpu_ld<S_VEC>(v, row + j);
#pragma unroll
        for (int q = 0; q < S_VEC; q++)
            v[q] = dloss * (expf(v[q] - l0) - (float)(j + q == t));
        gpu_st<S_VEC>(drow + j, v);
    };
    s_row_visit<VEC>(row, V, one, eight);
}

extern "C" void gpu_bf16_ce_bwd(uint16_t *dlogits, const uint16_t *logits, const float *lse,
                                const int32_t *targets, float dloss, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    bf16 *d = (bf16 *)dlogits;
    const bf16 *l = (const bf16 *)logits;
    cudaStream_t st = gpu_stream();
    if ((((uintptr_t)dlogits ^ (uintptr_t)logits) & 15u) == 0)
        s_ce_bwd<S_VEC><<<(unsigned)N, s_row_threads((size_t)V / S_VEC), 0, st>>>(
            d, l, lse, targets, dloss, V);
    else
        s_ce_bwd<1><<<(unsigned)N, s_row_threads((size_t)V), 0, st>>>(d, l, lse, targets,
                                                                       dloss, V);
    GPU_CHECK_LAUNCH();
}

/* ---- column sums ---------------------------------------------------------------------- */

/* Chunks of at least 64 rows, at most 1024 of them; from M alone (the same sums everywhere). */
static int s_column_chunks(int M, int *rows_per)
{
    int rp = (M + 1023) / 1024;
    if (rp < 64)
        rp = 64;
    *rows_per = rp;
    return M > 0 ? (M + rp - 1) / rp : 0;
}

extern "C" size_t gpu_bf16_column_sum_work(int M, int E)
{
    int rows_per;
    return E > 0 ? (size_t)s_column_chunks(M, &rows_per) * E * sizeof(float) : 0;
}

/* One block per chunk, rps = blockDim.x / E rows side by side (thread t: column t % E, rows
 * t / E, + rps, ...: a step reads rps whole rows, coalesced); the rps sums per column are then
 * added in order. In double: M may be a million rows. */
__global__ static void s_column_part(float *partial, const float *x, int M, int E, int rows_per)
{
    __shared__ double part[S_THREADS];
    int rps = blockDim.x / E, col = threadIdx.x % E;
    int n0 = blockIdx.x * rows_per;
    int n1 = n0 + rows_per < M ? n0 + rows_per : M;
    double acc = 0.0;
#pragma unroll 4
    for (int m = n0 + (int)threadIdx.x / E; m < n1; m += rps)
        acc += (double)x[(size_t)m * E + col];
    part[threadIdx.x] = acc;
    __syncthreads();
    if ((int)threadIdx.x < E) {
        double s = 0.0;
        for (int j = 0; j < rps; j++)
            s += part[j * E + threadIdx.x];
        partial[(size_t)blockIdx.x * E + threadIdx.x] = (float)s;
    }
}

extern "C" void gpu_bf16_column_sum(float *sums, const float *x, int M, int E, float *work)
{
    if (E <= 0)
        return;
    S_REQUIRE(E <= S_THREADS, "gpu_bf16_column_sum: E=%d columns: at most %d", E, S_THREADS);
    cudaStream_t st = gpu_stream();
    if (M <= 0) {
        GPU_CHECK(cudaMemsetAsync(sums, 0, (size_t)E * sizeof(float), st));
        return;
    }
    int rows_per, chunks = s_column_chunks(M, &rows_per);
    float *partial = work;
    if (!partial)
        GPU_CHECK(cudaMallocAsync((void **)&partial, (size_t)chunks * E * sizeof(float), st));
    unsigned threads = (unsigned)(S_THREADS / E * E);
    s_column_part<<<(unsigned)chunks, threads, 0, st>>>(partial, x, M, E, rows_per);
    GPU_CHECK_LAUNCH();
    s_sum_chunks_launch<double>(sums, partial, chunks, E, 0, st);
    if (!work)
        GPU_CHECK(cudaFreeAsync(partial, st));
}
