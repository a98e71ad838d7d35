/* Causal grouped-query self-attention on the GPU, fp32, to the contracts of
 * cpu_attention_fwd/bwd (cpu/ops.h): the full (B, H, T, T) probabilities are materialised and
 * saved for backward. Plain kernels, one warp per score row and one thread per output element,
 * chosen to be obviously right; a fused flash-style kernel is a later step.
 *
 * Layouts (row-major): q, out, dq (B, T, H, hd); k, v, dk, dv (B, T, KVH, hd); probs and the
 * backward's scratch dS (B, H, T, T). Query head h reads key/value head h / (H / KVH). */
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define S_THREADS 256
#define S_WARP 32

/* Blocks for `threads` threads in all, capped: every kernel here loops grid-stride. */
static unsigned s_blocks(size_t threads)
{
    size_t b = (threads + S_THREADS - 1) / S_THREADS;
    if (b < 1)
        b = 1;
    if (b > (1u << 20))
        b = 1u << 20;
    return (unsigned)b;
}

__device__ static float s_warp_sum(float x)
{
    for (int o = S_WARP / 2; o > 0; o /= 2)
        x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

__device__ static float s_warp_max(float x)
{
    for (int o = S_WARP / 2; o > 0; o /= 2)
        x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

/* Offset of (b, t, head, 0) in a (B, T, heads, hd) tensor. */
__device__ static size_t s_at(int b, int t, int head, int Tn, int heads, int hd)
{
    return (((size_t)b * Tn + t) * heads + head) * hd;
}

/* One warp per row r = (b, h, t) of probs: s_t2 = scale q_t . k_t2 for t2 <= t, softmax over
 * those (max subtracted), 0 above the diagonal. Each lane owns columns lane, lane + 32, ...,
 * so it re-reads only what it wrote itself. The row loop is uniform across the warp (all its
 * lanes share r), so the shuffles see every lane. */
__global__ static void s_fwd_probs(float *probs, const float *q, const float *k, int B, int Tn,
                                   int H, int KVH, int hd, float scale)
{
    int rep = H / KVH, lane = threadIdx.x % S_WARP;
    size_t rows = (size_t)B * H * Tn;
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / S_WARP;
    size_t nwarps = ((size_t)gridDim.x * blockDim.x) / S_WARP;
    for (size_t r = warp; r < rows; r += nwarps) {
        int t = (int)(r % Tn), h = (int)((r / Tn) % H), b = (int)(r / ((size_t)Tn * H));
        int g = h / rep;
        const float *qv = q + s_at(b, t, h, Tn, H, hd);
        float *p = probs + r * Tn;
        float maxv = -INFINITY;
        for (int t2 = lane; t2 <= t; t2 += S_WARP) {
            const float *kv = k + s_at(b, t2, g, Tn, KVH, hd);
            float s = 0.0f;
            for (int d = 0; d < hd; d++)
                s += qv[d] * kv[d];
            s *= scale;
            p[t2] = s;
            maxv = fmaxf(maxv, s);
        }
        maxv = s_warp_max(maxv); /* lane 0 always holds t2 = 0: finite */
        float sum = 0.0f;
        for (int t2 = lane; t2 <= t; t2 += S_WARP) {
            float e = expf(p[t2] - maxv);
            p[t2] = e;
            sum += e;
        }
        float inv = 1.0f / s_warp_sum(sum);
        for (int t2 = lane; t2 <= t; t2 += S_WARP)
            p[t2] *= inv;
        for (int t2 = t + 1 + lane; t2 < Tn; t2 += S_WARP)
            p[t2] = 0.0f;
    }
}

/* out (b, t, h, d) = (or +=, accumulate) sum_{t2 <= t} P[b, h, t, t2] src (b, t2, g, d): the
 * forward's P v and the backward's dS k; one thread per element. */
__global__ static void s_rows_times(float *out, const float *P, const float *src, int B, int Tn,
                                    int H, int KVH, int hd, bool accumulate)
{
    int rep = H / KVH;
    size_t n = (size_t)B * Tn * H * hd;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int d = (int)(i % hd), h = (int)((i / hd) % H);
        size_t bt = i / ((size_t)hd * H);
        int t = (int)(bt % Tn), b = (int)(bt / Tn), g = h / rep;
        const float *p = P + (((size_t)b * H + h) * Tn + t) * Tn;
        float acc = 0.0f;
        for (int t2 = 0; t2 <= t; t2++)
            acc += p[t2] * src[s_at(b, t2, g, Tn, KVH, hd) + d];
        out[i] = accumulate ? out[i] + acc : acc;
    }
}

extern "C" void gpu_attention_fwd(float *out, float *probs, const float *q, const float *k,
                                  const float *v, int B, int Tn, int H, int KVH, int hd)
{
    if (B <= 0 || Tn <= 0 || H <= 0)
        return;
    cudaStream_t st = gpu_stream();
    float scale = 1.0f / sqrtf((float)hd);
    size_t rows = (size_t)B * H * Tn;
    s_fwd_probs<<<s_blocks(rows * S_WARP), S_THREADS, 0, st>>>(probs, q, k, B, Tn, H, KVH, hd,
                                                               scale);
    GPU_CHECK_LAUNCH();
    s_rows_times<<<s_blocks((size_t)B * Tn * H * hd), S_THREADS, 0, st>>>(out, probs, v, B, Tn,
                                                                          H, KVH, hd, false);
    GPU_CHECK_LAUNCH();
}

/* One warp per row r = (b, h, t): dP_t2 = dout_t . v_t2, then
 * dS_t2 = scale P_t2 (dP_t2 - sum_t2' P_t2' dP_t2') for t2 <= t, 0 above the diagonal. */
__global__ static void s_bwd_ds(float *dS, const float *probs, const float *dout,
                                const float *v, int B, int Tn, int H, int KVH, int hd,
                                float scale)
{
    int rep = H / KVH, lane = threadIdx.x % S_WARP;
    size_t rows = (size_t)B * H * Tn;
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / S_WARP;
    size_t nwarps = ((size_t)gridDim.x * blockDim.x) / S_WARP;
    for (size_t r = warp; r < rows; r += nwarps) {
        int t = (int)(r % Tn), h = (int)((r / Tn) % H), b = (int)(r / ((size_t)Tn * H));
        int g = h / rep;
        const float *dov = dout + s_at(b, t, h, Tn, H, hd);
        const float *p = probs + r * Tn;
        float *ds = dS + r * Tn;
        float pdp = 0.0f;
        for (int t2 = lane; t2 <= t; t2 += S_WARP) {
            const float *vv = v + s_at(b, t2, g, Tn, KVH, hd);
            float dp = 0.0f;
            for (int d = 0; d < hd; d++)
                dp += dov[d] * vv[d];
            ds[t2] = dp;
            pdp += p[t2] * dp;
        }
        pdp = s_warp_sum(pdp);
        for (int t2 = lane; t2 <= t; t2 += S_WARP)
            ds[t2] = p[t2] * (ds[t2] - pdp) * scale;
        for (int t2 = t + 1 + lane; t2 < Tn; t2 += S_WARP)
            ds[t2] = 0.0f;
    }
}

/* dk (b, t2, g, d) += sum over the query heads h of group g and t >= t2 of
 * dS[b, h, t, t2] q (b, t, h, d); dv likewise with P and dout. One thread per element of the
 * (B, T, KVH, hd) tensors: every sum is owned by one thread (no atomics, deterministic). */
__global__ static void s_bwd_dkv(float *dk, float *dv, const float *dS, const float *probs,
                                 const float *q, const float *dout, int B, int Tn, int H,
                                 int KVH, int hd)
{
    int rep = H / KVH;
    size_t n = (size_t)B * Tn * KVH * hd;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        int d = (int)(i % hd), g = (int)((i / hd) % KVH);
        size_t bt = i / ((size_t)hd * KVH);
        int t2 = (int)(bt % Tn), b = (int)(bt / Tn);
        float acc_k = 0.0f, acc_v = 0.0f;
        for (int j = 0; j < rep; j++) {
            int h = g * rep + j;
            size_t prow = ((size_t)b * H + h) * Tn; /* row (b, h, 0) of probs / dS */
            for (int t = t2; t < Tn; t++) {
                size_t pt = (prow + t) * Tn + t2;
                size_t qt = s_at(b, t, h, Tn, H, hd) + d;
                acc_k += dS[pt] * q[qt];
                acc_v += probs[pt] * dout[qt];
            }
        }
        dk[i] += acc_k;
        dv[i] += acc_v;
    }
}

extern "C" void gpu_attention_bwd(float *dq, float *dk, float *dv, const float *dout,
                                  const float *q, const float *k, const float *v,
                                  const float *probs, int B, int Tn, int H, int KVH, int hd)
{
    if (B <= 0 || Tn <= 0 || H <= 0)
        return;
    cudaStream_t st = gpu_stream();
    float scale = 1.0f / sqrtf((float)hd);
    size_t rows = (size_t)B * H * Tn, bytes = rows * (size_t)Tn * sizeof(float);
    float *dS = NULL;
    cudaError_t e = cudaMallocAsync((void **)&dS, bytes, st);
    if (e != cudaSuccess) {
        fprintf(stderr, "semoe gpu: attention backward: cudaMallocAsync of %zu bytes for dS "
                "(B=%d, H=%d, T=%d) failed: %s\n", bytes, B, H, Tn, cudaGetErrorString(e));
        abort();
    }
    s_bwd_ds<<<s_blocks(rows * S_WARP), S_THREADS, 0, st>>>(dS, probs, dout, v, B, Tn, H, KVH,
                                                            hd, scale);
    GPU_CHECK_LAUNCH();
    s_rows_times<<<s_blocks((size_t)B * Tn * H * hd), S_THREADS, 0, st>>>(dq, dS, k, B, Tn, H,
                                                                          KVH, hd, true);
    GPU_CHECK_LAUNCH();
    s_bwd_dkv<<<s_blocks((size_t)B * Tn * KVH * hd), S_THREADS, 0, st>>>(dk, dv, dS, probs, q,
                                                                         dout, B, Tn, H, KVH,
                                                                         hd);
    GPU_CHECK_LAUNCH();
    e = cudaFreeAsync(dS, st);
    if (e != cudaSuccess) {
        fprintf(stderr, "semoe gpu: attention backward: cudaFreeAsync: %s\n",
                cudaGetErrorString(e));
        abort();
    }
}
