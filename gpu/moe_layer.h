/* A bf16 Mixture-of-Experts layer on one GPU, forward and backward: the math of
 * ../shared/peers/moe_layer_torch.py's grouped() (torchtitan-style dropless grouped GEMM).
 *   logits = x wg (fp32 accumulate, rounded to bf16 as the peer's bf16 matmul is), p =
 *   softmax(logits) in fp32, top-k of p (ties to the lower expert index, slots in descending
 *   order), w = topk / sum(topk) cast to bf16; the T*k (token, slot) rows are permuted into
 *   expert order (counting sort by expert, stable by token then slot), and per expert e
 *   g = silu(h W1[e]) * (h W3[e]), y = g W2[e]; out[t] = sum_j w[t,j] y[(t,j)] in fp32, cast
 *   to bf16. Backward takes dout and gives dx, dwg, dW1, dW3, dW2 (bf16, fp32 accumulation),
 *   the routing-weight gradient included (through the renormalisation and the softmax into
 *   dwg and dx), with every bf16 cast an identity in backward as in autograd.
 * The expert GEMMs are grouped GEMMs: cublasGemmGroupedBatchedEx, one group per expert with
 * tokens (bf16 in and out, CUBLAS_COMPUTE_32F), or a loop of cublasGemmEx per expert
 * (GPU_MOE_GEMM_LOOP, and the fallback when cuBLAS refuses the grouped call). The host needs
 * the per-expert counts to size them: each gpu_moe_fwd copies the E counts to the host once
 * (one stream synchronisation per layer call); gpu_moe_bwd reuses them.
 * Pointers are device memory unless a comment says host; bf16 tensors are uint16_t bit
 * patterns, row-major. Everything runs on the calling thread's gpu_stream() (gpu/stream.h)
 * and a gpu_moe_t is used from the thread that created it. CUDA or cuBLAS failures abort
 * (gpu/ops.h's rule); a bad shape is a NULL from gpu_moe_new with a message. */
#ifndef SEMOE_GPU_MOE_LAYER_H
#define SEMOE_GPU_MOE_LAYER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct gpu_moe gpu_moe_t;

typedef enum {
    GPU_MOE_GEMM_GROUPED = 0, /* cublasGemmGroupedBatchedEx, one group per expert */
    GPU_MOE_GEMM_LOOP = 1     /* cublasGemmEx per expert, in order on the stream */
} gpu_moe_gemm_t;

/* A workspace for T tokens of width d, E experts of hidden width f, top-k routing: every
 * activation, index and pointer buffer is allocated here, once, so that fwd/bwd allocate
 * nothing. Needs 1 <= k <= min(E, 16), E <= 256, d and f multiples of 8, T*k*max(d,f) under
 * 2^31. Returns NULL (with a message on stderr naming the value) otherwise. Caller owns it. */
gpu_moe_t *gpu_moe_new(int T, int d, int f, int E, int k);
void gpu_moe_destroy(gpu_moe_t **self_p);

/* The expert GEMM path; LOOP is the default (on an H200, cuBLAS 13.1, it beat the grouped call
 * by 1.3-1.8x on every shape bench_moe_layer runs). Returns the path in use (the grouped one
 * falls back to LOOP by itself, once, with a message, when cuBLAS does not support it here). */
gpu_moe_gemm_t gpu_moe_set_gemm(gpu_moe_t *self, gpu_moe_gemm_t mode);
gpu_moe_gemm_t gpu_moe_gemm(const gpu_moe_t *self);

/* out (T, d) = the layer on x (T, d) with wg (d, E), w1 (E, d, f), w3 (E, d, f), w2 (E, f, d).
 * Keeps the routing and the activations in the workspace for gpu_moe_bwd. Synchronises the
 * stream once (the expert counts to the host); returns with the rest enqueued. */
void gpu_moe_fwd(gpu_moe_t *self, uint16_t *out, const uint16_t *x, const uint16_t *wg,
                 const uint16_t *w1, const uint16_t *w3, const uint16_t *w2);

/* The gradients of the last gpu_moe_fwd (same x and weights, unchanged since) given dout
 * (T, d): dx (T, d), dwg (d, E), dw1, dw3 (E, d, f), dw2 (E, f, d), all OVERWRITTEN (not
 * accumulated; an expert with no token gets zeros). Enqueued; returns at once. */
void gpu_moe_bwd(gpu_moe_t *self, uint16_t *dx, uint16_t *dwg, uint16_t *dw1, uint16_t *dw3,
                 uint16_t *dw2, const uint16_t *dout, const uint16_t *x, const uint16_t *wg,
                 const uint16_t *w1, const uint16_t *w3, const uint16_t *w2);

/* The last forward's routing, device memory owned by the workspace: idx (T, k) int32 and the
 * bf16 weights (T, k); counts on the host (E ints, valid after gpu_moe_fwd returns). */
const int32_t *gpu_moe_idx(const gpu_moe_t *self);
const uint16_t *gpu_moe_weights(const gpu_moe_t *self);
const int32_t *gpu_moe_counts(const gpu_moe_t *self);

/* Phase timing (bench_moe_layer --phases). With on, gpu_moe_fwd and gpu_moe_bwd record a CUDA
 * event at each of GPU_MOE_NPHASES + 1 phase boundaries (creating them on the first call); off
 * (the default) costs a branch per boundary. Phase i runs from boundary i to i + 1:
 * gpu_moe_phase_name(i) names it; "between" is whatever the caller enqueued between the
 * forward and the backward; "sort_gather" ends before the host waits for the counts, so that
 * wait and the GEMM launches after it count in "gemm_w1_w3". gpu_moe_phase_ms waits for the
 * last boundary and fills ms[GPU_MOE_NPHASES] for the last fwd + bwd pair; -1 when off. */
#define GPU_MOE_NPHASES 15
void gpu_moe_set_phases(gpu_moe_t *self, int on);
const char *gpu_moe_phase_name(int i);
int gpu_moe_phase_ms(gpu_moe_t *self, float *ms);

/* Benchmark helpers (bench/moe_layer.c stays C, without CUDA headers). */
/* p[i] = bf16(scale * N(0,1)), a counter-based generator: the same seed gives the same values. */
void gpu_moe_fill_randn(uint16_t *p, size_t n, float scale, uint64_t seed);
/* y[i] = bf16(scale * x[i]) (the peer's loss gradient: 2 out / (T d)). */
void gpu_moe_scale(uint16_t *y, const uint16_t *x, size_t n, float scale);
/* Milliseconds of the work fn(ctx) enqueues on the stream, between two CUDA events. */
float gpu_moe_time_ms(void (*fn)(void *ctx), void *ctx);
/* One dense bf16 GEMM (n, n) x (n, n) through cublasGemmEx, fp32 compute, bf16 out; the median
 * of iters timed calls after warm ones, in TFLOP/s. Allocates and frees its operands. */
double gpu_moe_dense_tflops(int n, int warm, int iters);
/* Waits for everything enqueued on the stream. */
void gpu_moe_sync(void);

#ifdef __cplusplus
}
#endif

#endif
