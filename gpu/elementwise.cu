/* The CUDA backend's elementwise and per-row ops in fp32 (gpu/ops.h): vector helpers,
 * embedding, RMSNorm, rotary embedding, SwiGLU, cross-entropy and the load-balancing loss,
 * each to the contract and in the arithmetic of its CPU twin (cpu/ops.h, cpu/ops_impl.h and
 * cpu/backend.c). Plain kernels: one thread per element, or one block per row where a row
 * is reduced. */
#include "gpu/ops.h"
#include "gpu/reduce.cuh"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define S_THREADS 256    /* elementwise kernels */
#define S_ROW_THREADS 512 /* one block per row (rmsnorm, cross-entropy) */
#define S_MAX_BLOCKS (1u << 20) /* grid-stride beyond this */

/* Blocks for n > 0 elements, S_THREADS each; the kernels loop when n needs more. */
static unsigned s_grid(size_t n)
{
    size_t b = (n + S_THREADS - 1) / S_THREADS;
    return (unsigned)(b < S_MAX_BLOCKS ? b : S_MAX_BLOCKS);
}

#define S_FOR_EACH(i, n)                                                                       \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                    \
         i += (size_t)gridDim.x * blockDim.x)

/* ---- vector helpers (cpu/backend.c) ---------------------------------------------------- */

__global__ static void s_axpy(float *y, float a, const float *x, size_t n)
{
    S_FOR_EACH(i, n)
        y[i] += a * x[i];
}

extern "C" void gpu_axpy(float *y, float a, const float *x, size_t n)
{
    if (n == 0)
        return;
    s_axpy<<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(y, a, x, n);
    GPU_CHECK_LAUNCH();
}

/* out may alias a or b: each element is read and written by one thread. */
__global__ static void s_add(float *out, const float *a, const float *b, size_t n)
{
    S_FOR_EACH(i, n)
        out[i] = a[i] + b[i];
}

extern "C" void gpu_add(float *out, const float *a, const float *b, size_t n)
{
    if (n == 0)
        return;
    s_add<<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(out, a, b, n);
    GPU_CHECK_LAUNCH();
}

__global__ static void s_add_bias(float *out, const float *bias, size_t total, int C)
{
    S_FOR_EACH(i, total)
        out[i] += bias[i % (size_t)C];
}

extern "C" void gpu_add_bias(float *out, const float *bias, int N, int C)
{
    size_t total = (size_t)(N > 0 ? N : 0) * (size_t)(C > 0 ? C : 0);
    if (total == 0)
        return;
    s_add_bias<<<s_grid(total), S_THREADS, 0, gpu_stream()>>>(out, bias, total, C);
    GPU_CHECK_LAUNCH();
}

/* ---- embedding ------------------------------------------------------------------------- */

/* A lookup is a gather of the table's rows (gpu/rows.cu); its backward the gather's, whose
 * atomics meet a token that repeats within the batch. */
extern "C" void gpu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, int N,
                                  int D)
{
    gpu_gather_rows(out, wte, tokens, N, D);
}

extern "C" void gpu_embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int N,
                                  int D)
{
    gpu_gather_rows_bwd(dwte, dout, tokens, N, D);
}

/* ---- rmsnorm --------------------------------------------------------------------------- */

/* One block per row. out may alias x: every thread reads its elements of x for the sum of
 * squares before the reduction's barriers, and afterwards writes only the elements it
 * reads again itself. */
__global__ static void s_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w,
                                     int D, float eps)
{
    size_t off = (size_t)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        ss += x[off + i] * x[off + i];
    ss = gpu_block_sum(ss);
    float r = 1.0f / sqrtf(ss / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        out[off + i] = w[i] * (x[off + i] * r);
    if (threadIdx.x == 0)
        rstd[blockIdx.x] = r;
}

extern "C" void gpu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int N,
                                int D, float eps)
{
    if (N <= 0 || D <= 0)
        return;
    s_rmsnorm_fwd<<<(unsigned)N, S_ROW_THREADS, 0, gpu_stream()>>>(out, rstd, x, w, D, eps);
    GPU_CHECK_LAUNCH();
}

/* dx, one block per row: dx_j += dout_j w_j r - c x_j, c = r^3 / D sum_i dout_i w_i x_i. */
__global__ static void s_rmsnorm_bwd_dx(float *dx, const float *dout, const float *x,
                                        const float *w, const float *rstd, int D)
{
    size_t off = (size_t)blockIdx.x * D;
    float r = rstd[blockIdx.x];
    float dot = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        dot += dout[off + i] * w[i] * x[off + i];
    dot = gpu_block_sum(dot);
    float c = dot * r * r * r / D;
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        dx[off + i] += dout[off + i] * w[i] * r - c * x[off + i];
}

/* dw, first pass: partial[chunk][i] = sum over the chunk's rows of dout x r, one thread per
 * column (coalesced along the row), chunk = blockIdx.y. */
__global__ static void s_rmsnorm_bwd_dw_part(float *partial, const float *dout, const float *x,
                                             const float *rstd, int N, int D, int rows_per)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D)
        return;
    int n0 = blockIdx.y * rows_per;
    int n1 = n0 + rows_per < N ? n0 + rows_per : N;
    float acc = 0.0f;
    for (int n = n0; n < n1; n++) {
        size_t off = (size_t)n * D + i;
        acc += dout[off] * x[off] * rstd[n];
    }
    partial[(size_t)blockIdx.y * D + i] = acc;
}

/* dw, second pass: dw[i] += the chunks' partials in chunk order (deterministic). */
__global__ static void s_rmsnorm_bwd_dw_sum(float *dw, const float *partial, int chunks, int D)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D)
        return;
    float acc = 0.0f;
    for (int c = 0; c < chunks; c++)
        acc += partial[(size_t)c * D + i];
    dw[i] += acc;
}

extern "C" void gpu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x,
                                const float *w, const float *rstd, int N, int D)
{
    if (N <= 0 || D <= 0)
        return;
    cudaStream_t st = gpu_stream();
    s_rmsnorm_bwd_dx<<<(unsigned)N, S_ROW_THREADS, 0, st>>>(dx, dout, x, w, rstd, D);
    GPU_CHECK_LAUNCH();

    /* At most 256 chunks of at least 32 rows: the scratch stays at 256 D floats. */
    int chunks = (N + 31) / 32;
    if (chunks > 256)
        chunks = 256;
    int rows_per = (N + chunks - 1) / chunks;
    chunks = (N + rows_per - 1) / rows_per;
    float *partial = NULL;
    GPU_CHECK(cudaMallocAsync((void **)&partial, (size_t)chunks * D * sizeof(float), st));
    dim3 grid((unsigned)((D + S_THREADS - 1) / S_THREADS), (unsigned)chunks);
    s_rmsnorm_bwd_dw_part<<<grid, S_THREADS, 0, st>>>(partial, dout, x, rstd, N, D, rows_per);
    GPU_CHECK_LAUNCH();
    s_rmsnorm_bwd_dw_sum<<<grid.x, S_THREADS, 0, st>>>(dw, partial, chunks, D);
    GPU_CHECK_LAUNCH();
    GPU_CHECK(cudaFreeAsync(partial, st));
}

/* ---- rope ------------------------------------------------------------------------------ */

/* One thread per (row n, pair i): the angle pos[n] * theta^(-2i/hd) in double, exactly as
 * the CPU computes it, then pair (i, i + hd/2) of every head turned by it (rotate-half
 * convention); sign -1 turns back (backward), accumulating. out may alias x when not
 * accumulating: each thread reads its two elements before writing them. */
__global__ static void s_rope(float *out, const float *x, const int32_t *pos, int N, int H,
                              int hd, double theta, float sign, int accumulate)
{
    int half = hd / 2;
    size_t total = (size_t)N * half;
    S_FOR_EACH(t, total) {
        size_t n = t / (size_t)half;
        int i = (int)(t % (size_t)half);
        double angle = pos[n] * pow(theta, -2.0 * i / hd);
        float c = (float)cos(angle), s = sign * (float)sin(angle);
        for (int h = 0; h < H; h++) {
            size_t off = (n * H + h) * hd;
            float x1 = x[off + i], x2 = x[off + i + half];
            float y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s;
            if (accumulate) {
                out[off + i] += y1;
                out[off + i + half] += y2;
            } else {
                out[off + i] = y1;
                out[off + i + half] = y2;
            }
        }
    }
}

static void s_rope_launch(float *out, const float *x, const int32_t *pos, int N, int H, int hd,
                          double theta, float sign, int accumulate)
{
    size_t total = (size_t)(N > 0 ? N : 0) * (size_t)(hd > 1 ? hd / 2 : 0);
    if (total == 0 || H <= 0)
        return;
    s_rope<<<s_grid(total), S_THREADS, 0, gpu_stream()>>>(out, x, pos, N, H, hd, theta, sign,
                                                          accumulate);
    GPU_CHECK_LAUNCH();
}

extern "C" void gpu_rope_fwd(float *out, const float *x, const int32_t *pos, int N, int H,
                             int hd, double theta)
{
    s_rope_launch(out, x, pos, N, H, hd, theta, 1.0f, 0);
}

extern "C" void gpu_rope_bwd(float *dx, const float *dout, const int32_t *pos, int N, int H,
                             int hd, double theta)
{
    s_rope_launch(dx, dout, pos, N, H, hd, theta, -1.0f, 1);
}

/* ---- SwiGLU ---------------------------------------------------------------------------- */

__global__ static void s_swiglu_fwd(float *h, const float *a, const float *b, size_t n)
{
    S_FOR_EACH(i, n) {
        float s = 1.0f / (1.0f + expf(-a[i]));
        h[i] = a[i] * s * b[i];
    }
}

extern "C" void gpu_swiglu_fwd(float *h, const float *a, const float *b, size_t n)
{
    if (n == 0)
        return;
    s_swiglu_fwd<<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(h, a, b, n);
    GPU_CHECK_LAUNCH();
}

/* d silu(a)/da = s (1 + a (1 - s)), s = sigmoid(a). */
__global__ static void s_swiglu_bwd(float *da, float *db, const float *dh, const float *a,
                                    const float *b, size_t n)
{
    S_FOR_EACH(i, n) {
        float s = 1.0f / (1.0f + expf(-a[i]));
        da[i] += dh[i] * b[i] * s * (1.0f + a[i] * (1.0f - s));
        db[i] += dh[i] * a[i] * s;
    }
}

extern "C" void gpu_swiglu_bwd(float *da, float *db, const float *dh, const float *a,
                               const float *b, size_t n)
{
    if (n == 0)
        return;
    s_swiglu_bwd<<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(da, db, dh, a, b, n);
    GPU_CHECK_LAUNCH();
}

/* ---- cross-entropy --------------------------------------------------------------------- */

/* Row max and sum of exp(l - max) over the block (every thread gets both). */
__device__ static void s_softmax_stats(const float *l, int V, float *maxv, float *sum)
{
    float m = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        m = fmaxf(m, l[i]);
    m = gpu_block_max(m);
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        s += expf(l[i] - m);
    *sum = gpu_block_sum(s);
    *maxv = m;
}

/* One block per row: losses[n] = max + log(sum exp(l - max)) - l[target]. */
__global__ static void s_crossentropy_fwd(float *losses, const float *logits,
                                          const int32_t *targets, int V)
{
    const float *l = logits + (size_t)blockIdx.x * V;
    float maxv, sum;
    s_softmax_stats(l, V, &maxv, &sum);
    if (threadIdx.x == 0)
        losses[blockIdx.x] = maxv + logf(sum) - l[targets[blockIdx.x]];
}

/* One block: *total = the sum of x (n) in double (the CPU sums the row losses in double). */
__global__ static void s_sum_double(double *total, const float *x, int n)
{
    double s = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        s += (double)x[i];
    s = gpu_block_sum(s);
    if (threadIdx.x == 0)
        *total = s;
}

/* The mean over the N rows, as the CPU returns it; losses (N) written when not NULL (a
 * scratch buffer holds them otherwise). Synchronises. */
extern "C" float gpu_crossentropy_fwd(float *losses, const float *logits,
                                      const int32_t *targets, int N, int V)
{
    double total = 0.0;
    if (N > 0 && V > 0) {
        cudaStream_t st = gpu_stream();
        float *rows = losses;
        double *d_total = NULL;
        if (!rows)
            GPU_CHECK(cudaMallocAsync((void **)&rows, (size_t)N * sizeof(float), st));
        GPU_CHECK(cudaMallocAsync((void **)&d_total, sizeof(double), st));
        s_crossentropy_fwd<<<(unsigned)N, S_ROW_THREADS, 0, st>>>(rows, logits, targets, V);
        GPU_CHECK_LAUNCH();
        s_sum_double<<<1, 1024, 0, st>>>(d_total, rows, N);
        GPU_CHECK_LAUNCH();
        GPU_CHECK(cudaMemcpyAsync(&total, d_total, sizeof(double), cudaMemcpyDeviceToHost, st));
        GPU_CHECK(cudaFreeAsync(d_total, st));
        if (!losses)
            GPU_CHECK(cudaFreeAsync(rows, st));
        GPU_CHECK(cudaStreamSynchronize(st));
    }
    return (float)(total / N);
}

/* One block per row: dl += c (softmax(l) - onehot(target)), c = dloss / N. */
__global__ static void s_crossentropy_bwd(float *dlogits, const float *logits,
                                          const int32_t *targets, float c, int V)
{
    const float *l = logits + (size_t)blockIdx.x * V;
    float *dl = dlogits + (size_t)blockIdx.x * V;
    int target = targets[blockIdx.x];
    float maxv, sum;
    s_softmax_stats(l, V, &maxv, &sum);
    float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
        dl[i] += c * (expf(l[i] - maxv) * inv - (float)(i == target));
}

extern "C" void gpu_crossentropy_bwd(float *dlogits, const float *logits,
                                     const int32_t *targets, float dloss, int N, int V)
{
    if (N <= 0 || V <= 0)
        return;
    float c = dloss / N;
    s_crossentropy_bwd<<<(unsigned)N, S_ROW_THREADS, 0, gpu_stream()>>>(dlogits, logits,
                                                                         targets, c, V);
    GPU_CHECK_LAUNCH();
}

/* ---- load-balancing aux loss ----------------------------------------------------------- */

/* One block per expert e: stats[e] = the number of top-k selections of e in idx (M*K), and
 * when probs is given stats[E + e] = sum over rows of probs[., e], both in double as the CPU
 * keeps them (the count is exact). */
__global__ static void s_aux_stats(double *stats, const float *probs, const int32_t *idx, int M,
                                   int E, int K)
{
    int e = blockIdx.x;
    size_t mk = (size_t)M * K;
    double cnt = 0.0;
    for (size_t i = threadIdx.x; i < mk; i += blockDim.x)
        cnt += idx[i] == e ? 1.0 : 0.0;
    cnt = gpu_block_sum(cnt);
    double psum = 0.0;
    if (probs)
        for (size_t m = threadIdx.x; m < (size_t)M; m += blockDim.x)
            psum += (double)probs[m * E + e];
    psum = gpu_block_sum(psum);
    if (threadIdx.x == 0) {
        stats[e] = cnt;
        stats[E + e] = psum;
    }
}

static double *s_aux_stats_launch(const float *probs, const int32_t *idx, int M, int E, int K)
{
    cudaStream_t st = gpu_stream();
    double *stats = NULL;
    GPU_CHECK(cudaMallocAsync((void **)&stats, (size_t)2 * E * sizeof(double), st));
    s_aux_stats<<<(unsigned)E, S_THREADS, 0, st>>>(stats, probs, idx, M, E, K);
    GPU_CHECK_LAUNCH();
    return stats;
}

/* E * sum_e (cnt_e / M) (psum_e / M), the sum over e on the host in the CPU's order.
 * Synchronises. */
extern "C" float gpu_auxloss_fwd(const float *probs, const int32_t *idx, int M, int E, int K)
{
    if (E <= 0)
        return 0.0f;
    double *host = (double *)calloc((size_t)2 * E, sizeof(double));
    if (!host) {
        fprintf(stderr, "%s:%d: out of memory (%d experts)\n", __FILE__, __LINE__, E);
        abort();
    }
    if (M > 0) {
        cudaStream_t st = gpu_stream();
        double *stats = s_aux_stats_launch(probs, idx, M, E, K);
        GPU_CHECK(cudaMemcpyAsync(host, stats, (size_t)2 * E * sizeof(double),
                                  cudaMemcpyDeviceToHost, st));
        GPU_CHECK(cudaFreeAsync(stats, st));
        GPU_CHECK(cudaStreamSynchronize(st));
    }
    const double *cnt = host, *psum = host + E;
    double loss = 0.0;
    for (int e = 0; e < E; e++)
        loss += (cnt[e] / M) * (psum[e] / M);
    free(host);
    return (float)(E * loss);
}

/* dprobs[m, e] += dloss * E * (cnt_e / M) / M, computed in double per expert as the CPU does. */
__global__ static void s_aux_bwd(float *dprobs, const double *cnt, float dloss, int M, int E)
{
    size_t total = (size_t)M * E;
    S_FOR_EACH(i, total) {
        int e = (int)(i % (size_t)E);
        dprobs[i] += (float)((double)dloss * E * (cnt[e] / M) / M);
    }
}

extern "C" void gpu_auxloss_bwd(float *dprobs, const int32_t *idx, float dloss, int M, int E,
                                int K)
{
    if (M <= 0 || E <= 0)
        return;
    cudaStream_t st = gpu_stream();
    double *stats = s_aux_stats_launch(NULL, idx, M, E, K);
    size_t total = (size_t)M * E;
    s_aux_bwd<<<s_grid(total), S_THREADS, 0, st>>>(dprobs, stats, dloss, M, E);
    GPU_CHECK_LAUNCH();
    GPU_CHECK(cudaFreeAsync(stats, st));
}
