/* The backend table: one function pointer per op the model graph (model/graph.h) calls, for
 * float (model_backend_f32_t) and double (model_backend_f64_t). The CPU backend fills both
 * (cpu/backend.c); a CUDA backend fills the f32 table with device implementations. The graph
 * computes ONLY through the table and touches buffers it got from the table's alloc only
 * through the table (copies to and from the host included), so those buffers may live on a
 * device.
 *
 * The ops' contracts are cpu/ops.h's (same names, same argument order, backward functions
 * ACCUMULATE); the row helpers below are the MoE block's gather/scatter, declared here. */
#ifndef SEMOE_MODEL_BACKEND_H
#define SEMOE_MODEL_BACKEND_H

#include <stddef.h>
#include <stdint.h>

#define MODEL_BACKEND_DECLARE(T, S)                                                            \
    typedef struct {                                                                           \
        const char *name; /* "cpu", "cuda" */                                                 \
        /* memory: bytes, zeroed on allocation; free(NULL) is a no-op. to_device/to_host     \
         * copy between host memory and the backend's; copy within the backend's. */         \
        void *(*alloc)(size_t bytes);                                                          \
        void (*free)(void *p);                                                                 \
        void (*zero)(void *p, size_t bytes);                                                   \
        void (*copy)(void *dst, const void *src, size_t bytes);                                \
        void (*to_device)(void *dst, const void *src, size_t bytes);                           \
        void (*to_host)(void *dst, const void *src, size_t bytes);                             \
        /* y (n) += a x (n) */                                                                 \
        void (*axpy)(T *y, T a, const T *x, size_t n);                                         \
        /* out (n) = a (n) + b (n); out may alias a or b */                                    \
        void (*add)(T *out, const T *a, const T *b, size_t n);                                 \
        /* out (N, C) row n += bias (C), every row (the router's constant logit bias) */      \
        void (*add_bias)(T *out, const T *bias, int N, int C);                                 \
                                                                                               \
        void (*embedding_fwd)(T *out, const int32_t *tokens, const T *wte, int N, int D);     \
        void (*embedding_bwd)(T *dwte, const T *dout, const int32_t *tokens, int N, int D);   \
        void (*rmsnorm_fwd)(T *out, T *rstd, const T *x, const T *w, int N, int D, T eps);    \
        void (*rmsnorm_bwd)(T *dx, T *dw, const T *dout, const T *x, const T *w,              \
                            const T *rstd, int N, int D);                                      \
        void (*linear_fwd)(T *out, const T *x, const T *w, int N, int IN, int OUT);           \
        void (*linear_bwd)(T *dx, T *dw, const T *dout, const T *x, const T *w, int N,        \
                           int IN, int OUT);                                                   \
        void (*rope_fwd)(T *out, const T *x, const int32_t *pos, int N, int H, int hd,        \
                         double theta);                                                        \
        void (*rope_bwd)(T *dx, const T *dout, const int32_t *pos, int N, int H, int hd,      \
                         double theta);                                                        \
        void (*attention_fwd)(T *out, T *probs, const T *q, const T *k, const T *v, int B,    \
                              int Tn, int H, int KVH, int hd);                                 \
        void (*attention_bwd)(T *dq, T *dk, T *dv, const T *dout, const T *q, const T *k,     \
                              const T *v, const T *probs, int B, int Tn, int H, int KVH,      \
                              int hd);                                                         \
        void (*router_fwd)(T *probs, int32_t *idx, T *w, const T *logits, int N, int E,       \
                           int K);                                                             \
        void (*router_bwd)(T *dlogits, const T *dw, const T *dprobs, const T *probs,          \
                           const int32_t *idx, const T *w, int N, int E, int K);               \
        void (*swiglu_fwd)(T *h, const T *a, const T *b, size_t n);                           \
        void (*swiglu_bwd)(T *da, T *db, const T *dh, const T *a, const T *b, size_t n);      \
        T (*crossentropy_fwd)(T *losses, const T *logits, const int32_t *targets, int N,      \
                              int V);                                                          \
        void (*crossentropy_bwd)(T *dlogits, const T *logits, const int32_t *targets,         \
                                 T dloss, int N, int V);                                       \
        T (*auxloss_fwd)(const T *probs, const int32_t *idx, int M, int E, int K);             \
        void (*auxloss_bwd)(T *dprobs, const int32_t *idx, T dloss, int M, int E, int K);      \
                                                                                               \
        /* MoE rows. gather: out (n, D) row i = x row rows[i] (x (N, D)).                    \
         * gather_bwd: dx row rows[i] += dout row i.                                          \
         * scatter: out row rows[i] += w[slots[i]] * y row i (y (n, D), w (N*K) the routing  \
         * weights, slots[i] = token * K + k): the weighted, dropless combine.                \
         * scatter_bwd: dy row i += w[slots[i]] * dout row rows[i] (dy or NULL);             \
         * dw[slots[i]] += dot(dout row rows[i], y row i) (dw or NULL). */                    \
        void (*gather_rows)(T *out, const T *x, const int32_t *rows, int n, int D);           \
        void (*gather_rows_bwd)(T *dx, const T *dout, const int32_t *rows, int n, int D);     \
        void (*scatter_rows)(T *out, const T *y, const int32_t *rows, const T *w,             \
                             const int32_t *slots, int n, int D);                              \
        void (*scatter_rows_bwd)(T *dy, T *dw, const T *dout, const T *y,                     \
                                 const int32_t *rows, const T *w, const int32_t *slots,       \
                                 int n, int D);                                                \
                                                                                               \
        /* optimizer (cpu/ops.h cpu_adamw, cpu_sumsq) */                                       \
        void (*adamw)(T *p, const T *g, T *m, T *v, size_t n, double lr, double beta1,        \
                      double beta2, double eps, double wd, int t, double gscale);              \
        double (*sumsq)(const T *g, size_t n);                                                 \
    } model_backend_##S##_t;

MODEL_BACKEND_DECLARE(float, f32)
MODEL_BACKEND_DECLARE(double, f64)

/* The CPU backend's tables, defined by cpu/backend.c (link cpu_dep to use them). */
extern const model_backend_f32_t cpu_backend_f32;
extern const model_backend_f64_t cpu_backend_f64;

#endif
