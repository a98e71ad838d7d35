/* The MoE router on the GPU, fp32, to the contracts of cpu_router_fwd/bwd (cpu/ops.h): softmax
 * over the E experts of each token, top-K with ties to the lower expert index, renormalised
 * weights, and the backward with the selection held fixed. One thread per token row running
 * the CPU's loop, in the CPU's order: E and K are small (tens, a few). */
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <stdint.h>

#define S_THREADS 128

static unsigned s_blocks(int N)
{
    int b = (N + S_THREADS - 1) / S_THREADS;
    return (unsigned)(b > 0 ? b : 1);
}

/* probs (N, E) = softmax(logits); idx (N, K) by K passes of "largest not yet taken" (strict >
 * keeps the lower index on ties); w (N, K) = probs[idx] / their sum. */
__global__ static void s_router_fwd(float *probs, int32_t *idx, float *w, const float *logits,
                                    int N, int E, int K)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    const float *l = logits + (size_t)n * E;
    float *p = probs + (size_t)n * E;
    int32_t *idx_n = idx + (size_t)n * K;
    float *w_n = w + (size_t)n * K;

    float maxv = l[0];
    for (int e = 1; e < E; e++)
        if (l[e] > maxv)
            maxv = l[e];
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        p[e] = expf(l[e] - maxv);
        sum += p[e];
    }
    float inv = 1.0f / sum;
    for (int e = 0; e < E; e++)
        p[e] *= inv;

    float wsum = 0.0f;
    for (int j = 0; j < K; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int jj = 0; jj < j; jj++)
                taken |= idx_n[jj] == e;
            if (!taken && (best < 0 || p[e] > p[best]))
                best = e;
        }
        idx_n[j] = best;
        wsum += p[best];
    }
    for (int j = 0; j < K; j++)
        w_n[j] = p[idx_n[j]] / wsum;
}

extern "C" void gpu_router_fwd(float *probs, int32_t *idx, float *w, const float *logits,
                               int N, int E, int K)
{
    if (N <= 0)
        return;
    s_router_fwd<<<s_blocks(N), S_THREADS, 0, gpu_stream()>>>(probs, idx, w, logits, N, E, K);
    GPU_CHECK_LAUNCH();
}

/* w_j = p_{i_j} / S, S = sum_j p_{i_j}: dL/dp_{i_j} (through w) = (dw_j - sum_l dw_l w_l) / S.
 * With g = that plus dprobs, softmax backward: dlogits_e += p_e (g_e - sum_f p_f g_f). */
__global__ static void s_router_bwd(float *dlogits, const float *dw, const float *dprobs,
                                    const float *probs, const int32_t *idx, const float *w,
                                    int N, int E, int K)
{
    int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    const float *p = probs + (size_t)n * E;
    const int32_t *idx_n = idx + (size_t)n * K;
    const float *w_n = w + (size_t)n * K, *dw_n = dw + (size_t)n * K;
    const float *dp_n = dprobs ? dprobs + (size_t)n * E : NULL;
    float *dl = dlogits + (size_t)n * E;

    float S = 0.0f, wdw = 0.0f;
    for (int j = 0; j < K; j++) {
        S += p[idx_n[j]];
        wdw += w_n[j] * dw_n[j];
    }
    float pg = 0.0f; /* sum_f p_f g_f */
    for (int j = 0; j < K; j++)
        pg += p[idx_n[j]] * (dw_n[j] - wdw) / S;
    if (dp_n)
        for (int e = 0; e < E; e++)
            pg += p[e] * dp_n[e];

    for (int e = 0; e < E; e++)
        dl[e] += p[e] * ((dp_n ? dp_n[e] : 0.0f) - pg);
    for (int j = 0; j < K; j++)
        dl[idx_n[j]] += p[idx_n[j]] * (dw_n[j] - wdw) / S;
}

extern "C" void gpu_router_bwd(float *dlogits, const float *dw, const float *dprobs,
                               const float *probs, const int32_t *idx, const float *w, int N,
                               int E, int K)
{
    if (N <= 0)
        return;
    s_router_bwd<<<s_blocks(N), S_THREADS, 0, gpu_stream()>>>(dlogits, dw, dprobs, probs, idx,
                                                              w, N, E, K);
    GPU_CHECK_LAUNCH();
}
