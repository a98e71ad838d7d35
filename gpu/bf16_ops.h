/* The CUDA kernels of the mixed-precision (bf16) graph, behind a plain C header: casts between
 * the fp32 residual stream and bf16 activations, RMSNorm from fp32 into bf16, the fused QKV
 * split with RoPE, cross-entropy on bf16 logits and a deterministic column sum.
 *
 * Conventions:
 * - bf16 tensors are uint16_t bit patterns on the C side (__nv_bfloat16 in the .cu); fp32 to
 *   bf16 rounds to nearest even (__float2bfloat16_rn), each output once; bf16 to fp32 is exact.
 *   Every sum, product and exponential is computed in fp32 (the column sum in double).
 * - Pointers are device memory (gpu_alloc); every function is enqueued on the calling thread's
 *   stream (gpu/stream.h) and returns at once, never synchronising; a CUDA failure or a broken
 *   shape invariant aborts with a message.
 * - Unlike cpu/ops.h, not every backward accumulates: each comment says ACCUMULATES (+=) or
 *   OVERWRITES. Shapes: N rows, D hidden, H query heads, KVH key/value heads, hd head dim,
 *   V vocabulary, row-major, as in cpu/ops.h.
 * - The math is cpu/ops.h's (cpu/ops_impl.h), up to the order of the fp32 sums and the final
 *   rounding. 16-byte vector loads are used where the row length and the pointers allow (D or
 *   hd/2 a multiple of 8, 16-byte aligned buffers: gpu_alloc's are); other shapes take a scalar
 *   path, slower but the same results. Compiled only when the build found CUDA. */
#ifndef SEMOE_GPU_BF16_OPS_H
#define SEMOE_GPU_BF16_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dst (n) = bf16(src (n)), OVERWRITES. */
void gpu_bf16_from_f32(uint16_t *dst, const float *src, size_t n);

/* dst (n) += src (n) read as fp32, ACCUMULATES (a bf16 branch into the fp32 residual). */
void gpu_bf16_add_to_f32(float *dst, const uint16_t *src, size_t n);

/* cpu_rmsnorm_fwd on the fp32 residual x (N, D) with fp32 weights w (D): rstd (N) =
 * 1/sqrt(mean(x^2) + eps) in fp32 (saved for backward), out (N, D) = bf16(w * (x * rstd)),
 * computed in fp32 and rounded once; both OVERWRITTEN. out must not alias x. */
void gpu_bf16_rmsnorm_fwd(uint16_t *out, float *rstd, const float *x, const float *w, int N,
                          int D, float eps);

/* cpu_rmsnorm_bwd with dout (N, D) bf16: dx (N, D) ACCUMULATES (the residual's gradient),
 * dw (D) ACCUMULATES; x, w, rstd as in forward. dw is deterministic (per-chunk partial sums in
 * stream-ordered scratch, then summed in a fixed order; no atomics). */
void gpu_bf16_rmsnorm_bwd(float *dx, float *dw, const uint16_t *dout, const float *x,
                          const float *w, const float *rstd, int N, int D);

/* Splits the fused projection qkv (N, (H + 2 KVH) hd), row n = [q heads (H hd) | k heads
 * (KVH hd) | v heads (KVH hd)], into q (N, H, hd) and k (N, KVH, hd) rotated at position
 * pos[n] (cpu_rope_fwd: rotate-half pairs (i, i + hd/2), angle pos * theta^(-2i/hd) in double,
 * cos and sin rounded to fp32, rotation in fp32, one bf16 rounding) and v (N, KVH, hd) copied
 * bit for bit; all OVERWRITTEN. hd even. */
void gpu_bf16_qkv_rope_fwd(uint16_t *q, uint16_t *k, uint16_t *v, const uint16_t *qkv,
                           const int32_t *pos, int N, int H, int KVH, int hd, double theta);

/* The transpose: dqkv (N, (H + 2 KVH) hd) OVERWRITTEN with row n = [rope_bwd(dq[n]) |
 * rope_bwd(dk[n]) | dv[n]] (cpu_rope_bwd's inverse rotation; dv copied bit for bit). */
void gpu_bf16_qkv_rope_bwd(uint16_t *dqkv, const uint16_t *dq, const uint16_t *dk,
                           const uint16_t *dv, const int32_t *pos, int N, int H, int KVH,
                           int hd, double theta);

/* Per row n of logits (N, V) bf16, targets (N) in [0, V): lse[n] = logsumexp(logits[n, :])
 * (fp32, max-subtracted) and losses[n] = lse[n] - logits[n, targets[n]], both OVERWRITTEN (the
 * mean over rows is the caller's). */
void gpu_bf16_ce_fwd(float *losses, float *lse, const uint16_t *logits, const int32_t *targets,
                     int N, int V);

/* dlogits (N, V) = bf16(dloss * (exp(logits - lse[n]) - onehot(targets[n]))), OVERWRITTEN;
 * dloss is the per-row scale (1/N for the mean loss; cpu_crossentropy_bwd's dloss / N).
 * lse from gpu_bf16_ce_fwd. dlogits may be logits itself (in place). */
void gpu_bf16_ce_bwd(uint16_t *dlogits, const uint16_t *logits, const float *lse,
                     const int32_t *targets, float dloss, int N, int V);

/* The bytes of workspace gpu_bf16_column_sum needs for M rows of E columns (0 when M <= 0);
 * it depends on M and E only. */
size_t gpu_bf16_column_sum_work(int M, int E);

/* sums (E) = the sum over the M rows of x (M, E) fp32, OVERWRITTEN (zeros when M is 0);
 * E <= 256. Deterministic: per-chunk partials into work (gpu_bf16_column_sum_work(M, E)
 * bytes; NULL takes stream-ordered scratch), then summed in a fixed order; the sums are
 * accumulated in double and rounded once. */
void gpu_bf16_column_sum(float *sums, const float *x, int M, int E, float *work);

#ifdef __cplusplus
}
#endif

#endif
