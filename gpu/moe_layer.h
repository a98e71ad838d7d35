/* A bf16 Mixture-of-Experts layer on one GPU, forward and backward: the math of
 * ../shared/peers/moe_layer_torch.py's grouped() (torchtitan-style dropless grouped GEMM) with
 * the model's weight layout (nn.Linear's (out, in), as model/params.h stores them).
 *   logits = x wg^T in fp32 (rounded to bf16 as the peer's bf16 matmul is, unless
 *   gpu_moe_set_round_logits turns that off) + an optional per-expert bias, p = softmax(logits)
 *   in fp32, top-k of p (ties to the lower expert index, slots in descending order),
 *   w = topk / sum(topk) cast to bf16; the T*k (token, slot) rows are permuted into expert order
 *   (counting sort by expert, stable by token then slot), and per expert e
 *   [a | b] = h W13[e]^T (W1 and W3 as ONE GEMM of 2f outputs), g = silu(a) * b, y = g W2[e]^T;
 *   out[t] = sum_j w[t,j] y[(t,j)] in fp32 (plus a residual, for the model graph), cast to bf16
 *   or kept fp32. Backward takes dout and gives dx, dwg, dW1, dW3, dW2 (bf16 overwritten, or
 *   fp32 accumulated into a model's gradient slab), the routing weights' gradient included
 *   (through the renormalisation and the softmax into dwg and dx), plus an optional constant
 *   per-expert gradient on p (the auxiliary load-balancing loss), with every bf16 cast an
 *   identity in backward as in autograd.
 * The expert GEMMs are cublasGemmEx calls per expert, in order on one stream
 * (GPU_MOE_GEMM_LOOP: on an H200 it beat cublasGemmGroupedBatchedEx by 1.3-1.8x on every shape
 * bench_moe_layer runs) or pipelined on two (GPU_MOE_GEMM_STREAMS), whichever measured faster
 * for the shape's size (gpu_moe_new picks: streams for experts of under ~1e11 FLOPs a GEMM), or
 * the grouped call (GPU_MOE_GEMM_GROUPED). The host needs the
 * per-expert counts to size them: each gpu_moe_fwd copies the E counts to the host once (one
 * stream synchronisation per layer call); gpu_moe_bwd reuses them.
 * Memory: a layer keeps what its backward needs (routing, the permuted input h, [a | b], y);
 * what lives only within one call (g, the backward's intermediates) is scratch that the layers
 * of one model share (gpu_moe_new_sharing): a layer whose g was overwritten by another's call
 * recomputes it from [a | b] in backward.
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

#include "actors/err.h"

typedef struct gpu_moe gpu_moe_t;

typedef enum {
    GPU_MOE_GEMM_GROUPED = 0, /* cublasGemmGroupedBatchedEx, one group per expert */
    GPU_MOE_GEMM_LOOP = 1,    /* cublasGemmEx per expert, in order on the stream */
    GPU_MOE_GEMM_STREAMS = 2, /* cublasGemmEx per expert, experts alternating between two
                               * streams, each expert's GEMMs and SwiGLU in a row: one
                               * expert's memory-bound SwiGLU runs beside another's GEMMs, and
                               * one GEMM's last wave beside the next's first (phase timing
                               * then puts the GEMMs and SwiGLU of each pass in one phase) */
    GPU_MOE_GEMM_FUSED = 3    /* gpu/moe_gemm.h's kernel of our own, all experts in one
                               * launch, for the GEMMs over the weights' rows: [a | b] with
                               * SwiGLU in its epilogue, y, dg with SwiGLU's backward in its
                               * epilogue, dh (phase timing puts each SwiGLU in its GEMM's
                               * phase); cuBLAS per expert for dW2 and dW13. Hopper only; d a
                               * multiple of 256, f of 128 (of 256 for dg, else cuBLAS) */
} gpu_moe_gemm_t;

/* The weights, bf16, nn.Linear layout. */
typedef struct {
    const uint16_t *wg;  /* (E, d): logits = x wg^T */
    const uint16_t *w13; /* (E, 2f, d): expert e's W1 (f, d) rows, then its W3 (f, d) rows */
    const uint16_t *w2;  /* (E, d, f) */
    const float *bias;   /* (E) fp32 added to every token's logits before the softmax, or NULL */
    /* HOST (E) or NULL: expert e's index into w13 and w2 (slot[e] < 0: not held here; its
     * rows must go elsewhere through an exchange); NULL: e itself (every expert, in order).
     * With a map, the expert GEMMs run on cuBLAS (our kernel indexes by expert). */
    const int32_t *slot;
} gpu_moe_weights_t;

/* Where backward puts the weight gradients. fp32 0: bf16, OVERWRITTEN (an expert without
 * tokens gets zeros); fp32 1: fp32, ACCUMULATED (+=; an expert without tokens is untouched).
 * dw1, dw3, dw2 are HOST arrays of E device pointers, one tensor per expert in the weights'
 * layouts (dw1[e], dw3[e] (f, d), dw2[e] (d, f)); when dw3[e] is dw1[e] + f d elements, dW1
 * and dW3 come from one GEMM. daux (E, device fp32, or NULL): a gradient added to
 * d loss / d p[t, e] for every token t (the aux loss's, E f_e / M times its coefficient). */
typedef struct {
    int fp32;
    void *dwg; /* (E, d) */
    void *const *dw1, *const *dw3, *const *dw2;
    const float *daux;
} gpu_moe_grads_t;

/* A layer for T tokens of width d, E experts of hidden width f, top-k routing, with its own
 * scratch: every buffer is allocated here, once, so that fwd/bwd allocate nothing. Needs
 * 1 <= k <= min(E, 16), E <= 256, d and f multiples of 8, T*k*2f and E*2f*d under 2^31, and
 * the device memory. Returns NULL (with a message on stderr naming the value or the size)
 * otherwise. Caller owns it. */
gpu_moe_t *gpu_moe_new(int T, int d, int f, int E, int k);
/* Expert parallelism: gpu_moe_new's layer that may run its experts on rows other processes
 * send (gpu_moe_fwd_ex), with room for `rows` of them at first; a call that receives more
 * grows the room (by half at least; never shrunk), the exchange announcing the counts before
 * the rows. rows 0 is gpu_moe_new. */
gpu_moe_t *gpu_moe_new_ep(int T, int d, int f, int E, int k, int rows);
/* Another layer of other's shape sharing other's scratch (other's settings copied). Destroy
 * the layers in any order; the scratch goes with the last. */
gpu_moe_t *gpu_moe_new_sharing(gpu_moe_t *other);
void gpu_moe_destroy(gpu_moe_t **self_p);

/* The expert GEMM path; returns the path in use: LOOP for FUSED where the device or the
 * shape cannot take it (the grouped one falls back to LOOP by itself, once, with a message,
 * when cuBLAS does not support it here). */
gpu_moe_gemm_t gpu_moe_set_gemm(gpu_moe_t *self, gpu_moe_gemm_t mode);
gpu_moe_gemm_t gpu_moe_gemm(const gpu_moe_t *self);
/* on (the default): the fp32 logits are rounded to bf16 before the softmax, as the peer's
 * bf16 matmul rounds them; off: the softmax takes them as computed (the model graph). */
void gpu_moe_set_round_logits(gpu_moe_t *self, int on);

/* The layer on x (T, d). Exactly one of out and out32: out (T, d) bf16 gets the layer's
 * output; out32 (T, d) fp32 gets res32 + the output (res32 (T, d) fp32, may be out32: the
 * model's residual stream). Keeps the routing and the activations for gpu_moe_bwd.
 * Synchronises the stream once (the expert counts to the host); returns with the rest
 * enqueued. */
void gpu_moe_fwd(gpu_moe_t *self, const gpu_moe_weights_t *w, const uint16_t *x, uint16_t *out,
                 float *out32, const float *res32);

/* The exchange of an expert-parallel layer (model/graph.h's model_exchange_f32 for one layer,
 * on rows of d bf16): dispatch sends the rows of one part of the layer's tokens, grouped by
 * expert 0..E-1 (send_counts, host), to the processes holding each expert and writes into recv
 * the rows for the experts held here, grouped by expert, with recv_counts (host, E); combine is
 * the reverse of that part's dispatch (send grouped as its recv, recv as its send). Both are
 * collectives. A dispatch with recv NULL announces a part's counts alone (recv_counts filled,
 * nothing moved): the layer announces every part first, makes room once, then moves each
 * part's rows with the same call and recv.
 * parts (1, or 0: one; at most 16 and T): the tokens go in that many even parts (Tutel's
 * overlap). After the announces, each part's rows are dispatched, its experts run on a stream
 * of their own (the scratch's, shared by the layers of a model), and it is combined after the
 * next part's dispatch, so that one part's transfers run beside another's expert GEMMs:
 * dispatch 0, experts 0, dispatch 1, experts 1, combine 0, dispatch 2, ...; the backward goes
 * the same way, the weight gradients once per expert after the last part. More parts: more
 * overlap, smaller GEMMs, more launches. */
typedef struct {
    void *state;
    int parts;
    semoe_rc (*dispatch)(void *state, int part, const uint16_t *send, const int32_t *send_counts,
                         uint16_t *recv, int32_t *recv_counts, int recv_cap);
    semoe_rc (*combine)(void *state, int part, const uint16_t *send, const int32_t *send_counts,
                        uint16_t *recv, const int32_t *recv_counts);
} gpu_moe_exchange_t;

/* gpu_moe_fwd, with the experts' rows through ex when ex is not NULL (a layer of
 * gpu_moe_new_ep): routed and sorted here, dispatched, the held experts run on the rows that
 * arrive (from every process), their outputs combined back, weighted and summed here. Returns
 * SEMOE_OK, the exchange's error, SEMOE_EPROTO when rows arrive for an expert not held
 * (w->slot) or the counts delivered differ from those announced, SEMOE_ENOMEM when the room
 * for the rows received cannot grow (the device is full), SEMOE_EINVAL for rows routed to an
 * expert not held without an exchange. (gpu_moe_fwd is this with ex NULL and aborts on an error.) */
semoe_rc gpu_moe_fwd_ex(gpu_moe_t *self, const gpu_moe_weights_t *w, const uint16_t *x,
                        uint16_t *out, float *out32, const float *res32,
                        const gpu_moe_exchange_t *ex);

/* The gradients of the last gpu_moe_fwd (same x and weights, unchanged since) given the
 * output's gradient, dout (T, d) bf16 or dout32 (T, d) fp32 (exactly one): dx (T, d) bf16
 * OVERWRITTEN, the weights' as gr says. Enqueued; returns at once. */
void gpu_moe_bwd(gpu_moe_t *self, const gpu_moe_weights_t *w, const uint16_t *x,
                 const uint16_t *dout, const float *dout32, uint16_t *dx,
                 const gpu_moe_grads_t *gr);
/* gpu_moe_bwd for a forward through ex (the same exchange, or NULL for a forward without):
 * dy travels to the experts' holders as the forward's rows did, part by part, each part's
 * data gradients computed there beside the next part's transfers, dh comes back; the held
 * experts' weight gradients once each over the rows of every part (the rows received lie
 * expert-major across the parts), as gr says (its pointers of the experts not held are not
 * used). The exchange's error, SEMOE_EPROTO when its counts differ from the forward's,
 * SEMOE_EINVAL when ex does not match the forward's (or its parts). */
semoe_rc gpu_moe_bwd_ex(gpu_moe_t *self, const gpu_moe_weights_t *w, const uint16_t *x,
                        const uint16_t *dout, const float *dout32, uint16_t *dx,
                        const gpu_moe_grads_t *gr, const gpu_moe_exchange_t *ex);

/* The last forward's routing, device memory owned by the layer: idx (T, k) int32, the bf16
 * weights (T, k), the softmax p (T, E) fp32; counts on the host (E ints, valid after
 * gpu_moe_fwd returns). */
const int32_t *gpu_moe_idx(const gpu_moe_t *self);
const uint16_t *gpu_moe_weights(const gpu_moe_t *self);
const float *gpu_moe_probs(const gpu_moe_t *self);
const int32_t *gpu_moe_counts(const gpu_moe_t *self);

/* Phase timing (bench_moe_layer --phases). With on, gpu_moe_fwd and gpu_moe_bwd record a CUDA
 * event at each of GPU_MOE_NPHASES + 1 phase boundaries (creating them on the first call); off
 * (the default) costs a branch per boundary. Phase i runs from boundary i to i + 1:
 * gpu_moe_phase_name(i) names it; "between" is whatever the caller enqueued between the
 * forward and the backward; "sort_gather" ends before the host waits for the counts, so that
 * wait and the GEMM launches after it count in "gemm_w13". gpu_moe_phase_ms waits for the
 * last boundary and fills ms[GPU_MOE_NPHASES] for the last fwd + bwd pair; -1 when off. With
 * an exchange in parts the experts run on another stream than the marks: the phases then time
 * the exchange's share, not the expert GEMMs. */
#define GPU_MOE_NPHASES 14
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
/* The median of iters gpu_moe_time_ms(fn, ctx) after warm untimed calls (iters <= 64). */
float gpu_moe_median_ms(void (*fn)(void *ctx), void *ctx, int warm, int iters);
/* One dense bf16 GEMM (n, n) x (n, n) through cublasGemmEx, fp32 compute, bf16 out; the median
 * of iters timed calls after warm ones, in TFLOP/s. Allocates and frees its operands. */
double gpu_moe_dense_tflops(int n, int warm, int iters);
/* Waits for everything enqueued on the stream. */
void gpu_moe_sync(void);

/* An emulated link (bench_moe_overlap): a gpu_moe_exchange_t of one rank holding every expert
 * whose dispatch and combine copy the rows to where they go on a stream of the link's own,
 * after the caller's stream's work so far, and keep that stream busy for bytes x remote / gbps
 * (one block spinning on the GPU's global timer: the time the remote share of the rows would
 * take at gbps GB/s; gbps <= 0: the copies alone); the caller's stream waits for each transfer,
 * and with host_wait so does the host (as the NCCL path's does). Not a network: a schedule's
 * overlap, measured. */
typedef struct gpu_moe_link gpu_moe_link_t;
gpu_moe_link_t *gpu_moe_link_new(int E, int d, double gbps, double remote, int host_wait);
void gpu_moe_link_destroy(gpu_moe_link_t **l_p);
gpu_moe_exchange_t gpu_moe_link_exchange(gpu_moe_link_t *l, int parts);
/* Milliseconds the link's stream spent on transfers since the last take (CUDA events; the
 * first 1024 transfers). */
double gpu_moe_link_take_ms(gpu_moe_link_t *l);

#ifdef __cplusplus
}
#endif

#endif
