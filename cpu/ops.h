/* The CPU backend's ops: forward and backward of every layer of the Mixtral-layout model,
 * written once (cpu/ops_impl.h) and compiled for float (what runs) and double (what the
 * gradient tests use): cpu_<op>_<fwd|bwd>_f32 and _f64.
 *
 * Conventions, as in llm.c train_gpt2.c:
 * - Row-major everywhere; weights in Hugging Face's layout (nn.Linear weight is (out, in),
 *   y = x W^T). Shapes in the comments name the dimensions: N tokens (= B*T), D hidden,
 *   V vocabulary, H query heads, KVH key/value heads, hd head dim, E experts, K top-k.
 * - Backward functions ACCUMULATE (+=) into every gradient they produce, parameter and input
 *   alike; the caller zeroes gradient buffers once per step. A gradient pointer documented as
 *   "or NULL" is skipped when NULL. Gradients never alias the forward buffers.
 * - Sizes are int, as in llm.c; buffer offsets are computed in size_t. */
#ifndef SEMOE_CPU_OPS_H
#define SEMOE_CPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#define CPU_OPS_DECLARE(T, S)                                                                  \
    /* out (N, D) = rows tokens[n] of wte (V, D); tokens (N) in [0, V). */                    \
    void cpu_embedding_fwd_##S(T *out, const int32_t *tokens, const T *wte, int N, int D);    \
    /* dwte (V, D) += dout (N, D) scattered to rows tokens[n]. */                             \
    void cpu_embedding_bwd_##S(T *dwte, const T *dout, const int32_t *tokens, int N, int D);  \
                                                                                               \
    /* out (N, D) = w * (x * rstd), rstd = 1/sqrt(mean(x^2) + eps) per row (MixtralRMSNorm); \
     * x (N, D), w (D); rstd (N) is written and saved for backward. out may alias x. */       \
    void cpu_rmsnorm_fwd_##S(T *out, T *rstd, const T *x, const T *w, int N, int D, T eps);   \
    /* dx (N, D) +=, dw (D) += from dout (N, D), x, w and the saved rstd (N). */              \
    void cpu_rmsnorm_bwd_##S(T *dx, T *dw, const T *dout, const T *x, const T *w,             \
                             const T *rstd, int N, int D);                                     \
                                                                                               \
    /* out (N, OUT) = x (N, IN) W^T, W (OUT, IN) as nn.Linear stores it; no bias. */          \
    void cpu_linear_fwd_##S(T *out, const T *x, const T *w, int N, int IN, int OUT);          \
    /* dx (N, IN) += dout W (or NULL), dw (OUT, IN) += dout^T x (or NULL); dout (N, OUT). */  \
    void cpu_linear_bwd_##S(T *dx, T *dw, const T *dout, const T *x, const T *w, int N,       \
                            int IN, int OUT);                                                  \
                                                                                               \
    /* Rotary embedding, rotate-half convention (transformers apply_rotary_pos_emb):         \
     * out = x cos + rotate_half(x) sin, rotate_half(x) = (-x[hd/2:], x[:hd/2]), angle of     \
     * pair i at position p = p * theta^(-2i/hd), i < hd/2 (computed in double).             \
     * out, x (N, H, hd) (call once for q with H heads, once for k with KVH); pos (N);       \
     * hd even; out may alias x. */                                                           \
    void cpu_rope_fwd_##S(T *out, const T *x, const int32_t *pos, int N, int H, int hd,       \
                          double theta);                                                       \
    /* dx (N, H, hd) += R^T dout (the inverse rotation); dout (N, H, hd). */                  \
    void cpu_rope_bwd_##S(T *dx, const T *dout, const int32_t *pos, int N, int H, int hd,     \
                          double theta);                                                       \
                                                                                               \
    /* Causal self-attention with grouped-query heads: query head h reads key/value head     \
     * h / (H/KVH) (transformers repeat_kv); scale 1/sqrt(hd).                                \
     * out, q (B, T, H, hd); k, v (B, T, KVH, hd); probs (B, H, T, T) softmax probabilities  \
     * written and saved for backward (0 above the diagonal). H a multiple of KVH. */         \
    void cpu_attention_fwd_##S(T *out, T *probs, const T *q, const T *k, const T *v, int B,   \
                               int Tn, int H, int KVH, int hd);                                \
    /* dq (B, T, H, hd) +=, dk, dv (B, T, KVH, hd) += from dout (B, T, H, hd) and the saved  \
     * probs (B, H, T, T). */                                                                 \
    void cpu_attention_bwd_##S(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k,    \
                               const T *v, const T *probs, int B, int Tn, int H, int KVH,     \
                               int hd);                                                        \
                                                                                               \
    /* MoE router: probs (N, E) = softmax(logits (N, E)); idx (N, K) the K largest probs in  \
     * descending order, ties to the lower expert index; w (N, K) = probs[idx] renormalised  \
     * to sum 1 over the K (MixtralSparseMoeBlock). */                                        \
    void cpu_router_fwd_##S(T *probs, int32_t *idx, T *w, const T *logits, int N, int E,      \
                            int K);                                                            \
    /* dlogits (N, E) += from dw (N, K) and dprobs (N, E) (or NULL; from the aux loss), with  \
     * the top-k selection idx held fixed; probs, idx, w as saved by forward. */              \
    void cpu_router_bwd_##S(T *dlogits, const T *dw, const T *dprobs, const T *probs,         \
                            const int32_t *idx, const T *w, int N, int E, int K);              \
                                                                                               \
    /* h (n) = silu(a) * b, silu(a) = a sigmoid(a); a = x W1^T, b = x W3^T come from linear;  \
     * n = N * F elements. */                                                                 \
    void cpu_swiglu_fwd_##S(T *h, const T *a, const T *b, size_t n);                          \
    /* da (n) +=, db (n) += from dh (n). */                                                   \
    void cpu_swiglu_bwd_##S(T *da, T *db, const T *dh, const T *a, const T *b, size_t n);     \
                                                                                               \
    /* Mean cross-entropy of logits (N, V) against targets (N) in [0, V); losses (N) gets    \
     * the per-row losses (or NULL). */                                                       \
    T cpu_crossentropy_fwd_##S(T *losses, const T *logits, const int32_t *targets, int N,     \
                               int V);                                                         \
    /* dlogits (N, V) += dloss * (softmax(logits) - onehot(targets)) / N. */                  \
    void cpu_crossentropy_bwd_##S(T *dlogits, const T *logits, const int32_t *targets,        \
                                  T dloss, int N, int V);                                      \
                                                                                               \
    /* Switch-style load-balancing loss as transformers' load_balancing_loss_func computes   \
     * it for Mixtral: E * sum_e f_e P_e, f_e = (number of top-k selections of e) / M,       \
     * P_e = mean over rows of probs[., e]. probs (M, E), idx (M, K) from router_fwd; pass   \
     * ALL layers' rows together (M = layers * N: transformers concatenates the layers'     \
     * router logits before taking the means). Uniform routing gives K (1 for top-1). */     \
    T cpu_auxloss_fwd_##S(const T *probs, const int32_t *idx, int M, int E, int K);            \
    /* dprobs (M, E) += dloss * E * f_e / M (f is a count, not differentiated). */            \
    void cpu_auxloss_bwd_##S(T *dprobs, const int32_t *idx, T dloss, int M, int E, int K);     \
                                                                                               \
    /* AdamW step t (1-based) on n parameters: g' = g * gscale (the clip scale), m, v (n)    \
     * the moments, bias-corrected; p -= lr * (mhat / (sqrt(vhat) + eps) + wd * p)          \
     * (decoupled weight decay, torch.optim.AdamW). p is the fp32 master copy. */            \
    void cpu_adamw_##S(T *p, const T *g, T *m, T *v, size_t n, double lr, double beta1,        \
                       double beta2, double eps, double wd, int t, double gscale);             \
    /* Sum of squares of g (n), accumulated in double (for the global gradient norm). */      \
    double cpu_sumsq_##S(const T *g, size_t n);

CPU_OPS_DECLARE(float, f32)
CPU_OPS_DECLARE(double, f64)

/* Gradient clipping scale from the global sum of squares, as torch's clip_grad_norm_:
 * min(1, max_norm / (sqrt(sumsq) + 1e-6)); max_norm <= 0 means no clipping (1). */
double cpu_clip_scale(double sumsq, double max_norm);

#endif
