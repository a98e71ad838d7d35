/* The CUDA backend's ops for fp32, behind a plain C header: one gpu_<field> per field of
 * model/backend.h's table, with cpu/ops.h's contracts (same argument order, shapes and
 * accumulation; backward functions ACCUMULATE). Pointers are device memory from gpu_alloc
 * unless a comment says host. Every op is enqueued on the calling thread's stream
 * (gpu/stream.h) and returns at once, except those that hand a value to the host
 * (gpu_to_host, gpu_crossentropy_fwd, gpu_auxloss_fwd, gpu_sumsq), which synchronise. A CUDA or
 * cuBLAS failure aborts with a message: the table's functions cannot fail. Compiled only when
 * the build found CUDA (SEMOE_HAVE_CUDA). */
#ifndef SEMOE_GPU_OPS_H
#define SEMOE_GPU_OPS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* memory (gpu/memory.cu): alloc returns zeroed device memory and aborts when it cannot;
 * free(NULL) is a no-op; to_device and to_host take host pointers on the host side and
 * return once the host buffer may be reused (to_host: holds the result). */
void *gpu_alloc(size_t bytes);
/* One zeroed allocation cut into n pieces of sz[i] bytes, each 256-byte aligned: *ptrs[i]
 * points at piece i. NULL (nothing allocated, the CUDA error cleared) when the device cannot
 * hold it; *total (when not NULL) gets the bytes asked either way. Free the result with
 * gpu_free. For workspaces made once (the MoE layer's, the bf16 graph's). */
void *gpu_alloc_slab(const size_t *sz, void **const *ptrs, int n, size_t *total);
void gpu_free(void *p);
void gpu_zero(void *p, size_t bytes);
void gpu_copy(void *dst, const void *src, size_t bytes);
void gpu_to_device(void *dst, const void *src, size_t bytes);
void gpu_to_host(void *dst, const void *src, size_t bytes);

/* elementwise (gpu/elementwise.cu) */
void gpu_axpy(float *y, float a, const float *x, size_t n);
void gpu_add(float *out, const float *a, const float *b, size_t n);
void gpu_add_bias(float *out, const float *bias, int N, int C);
void gpu_embedding_fwd(float *out, const int32_t *tokens, const float *wte, int N, int D);
void gpu_embedding_bwd(float *dwte, const float *dout, const int32_t *tokens, int N, int D);
void gpu_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int N, int D,
                     float eps);
void gpu_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                     const float *rstd, int N, int D);
void gpu_rope_fwd(float *out, const float *x, const int32_t *pos, int N, int H, int hd,
                  double theta);
void gpu_rope_bwd(float *dx, const float *dout, const int32_t *pos, int N, int H, int hd,
                  double theta);
void gpu_swiglu_fwd(float *h, const float *a, const float *b, size_t n);
void gpu_swiglu_bwd(float *da, float *db, const float *dh, const float *a, const float *b,
                    size_t n);
float gpu_crossentropy_fwd(float *losses, const float *logits, const int32_t *targets, int N,
                           int V);
void gpu_crossentropy_bwd(float *dlogits, const float *logits, const int32_t *targets,
                          float dloss, int N, int V);
float gpu_auxloss_fwd(const float *probs, const int32_t *idx, int M, int E, int K);
void gpu_auxloss_bwd(float *dprobs, const int32_t *idx, float dloss, int M, int E, int K);

/* linear through cuBLAS, fp32 compute (gpu/linear.cu) */
void gpu_linear_fwd(float *out, const float *x, const float *w, int N, int IN, int OUT);
void gpu_linear_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                    int N, int IN, int OUT);

/* causal grouped-query attention (gpu/attention.cu) */
void gpu_attention_fwd(float *out, float *probs, const float *q, const float *k,
                       const float *v, int B, int Tn, int H, int KVH, int hd);
void gpu_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                       const float *k, const float *v, const float *probs, int B, int Tn,
                       int H, int KVH, int hd);

/* MoE router (gpu/router.cu) */
void gpu_router_fwd(float *probs, int32_t *idx, float *w, const float *logits, int N, int E,
                    int K);
void gpu_router_bwd(float *dlogits, const float *dw, const float *dprobs, const float *probs,
                    const int32_t *idx, const float *w, int N, int E, int K);

/* MoE rows: model/backend.h's gather/scatter contracts (gpu/rows.cu) */
void gpu_gather_rows(float *out, const float *x, const int32_t *rows, int n, int D);
void gpu_gather_rows_bwd(float *dx, const float *dout, const int32_t *rows, int n, int D);
void gpu_scatter_rows(float *out, const float *y, const int32_t *rows, const float *w,
                      const int32_t *slots, int n, int D);
void gpu_scatter_rows_bwd(float *dy, float *dw, const float *dout, const float *y,
                          const int32_t *rows, const float *w, const int32_t *slots, int n,
                          int D);

/* optimizer (gpu/optim.cu) */
void gpu_adamw(float *p, const float *g, float *m, float *v, size_t n, double lr, double beta1,
               double beta2, double eps, double wd, int t, double gscale);
double gpu_sumsq(const float *g, size_t n);

#ifdef __cplusplus
}
#endif

#endif
