/* The CPU backend's tables (model/backend.h): cpu/ops.h's ops for float and double, host memory,
 * and the MoE row helpers (gather, weighted scatter-add and their backward), defined here once
 * over T. */
#include "model/backend.h"

#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "cpu/ops.h"

static void *s_alloc(size_t bytes)
{
    return semoe_xcalloc(bytes ? bytes : 1, 1);
}

static void s_free(void *p)
{
    free(p);
}

static void s_zero(void *p, size_t bytes)
{
    if (bytes)
        memset(p, 0, bytes);
}

static void s_copy(void *dst, const void *src, size_t bytes)
{
    if (bytes && dst != src)
        memmove(dst, src, bytes);
}

#define CPU_BE_DEFINE(T, S)                                                                    \
    static void s_axpy_##S(T *y, T a, const T *x, size_t n)                                    \
    {                                                                                          \
        for (size_t i = 0; i < n; i++)                                                         \
            y[i] += a * x[i];                                                                  \
    }                                                                                          \
    static void s_add_##S(T *out, const T *a, const T *b, size_t n)                            \
    {                                                                                          \
        for (size_t i = 0; i < n; i++)                                                         \
            out[i] = a[i] + b[i];                                                              \
    }                                                                                          \
    static void s_add_bias_##S(T *out, const T *bias, int N, int C)                            \
    {                                                                                          \
        for (int n = 0; n < N; n++) {                                                          \
            T *o = out + (size_t)n * C;                                                        \
            for (int c = 0; c < C; c++)                                                        \
                o[c] += bias[c];                                                               \
        }                                                                                      \
    }                                                                                          \
    static void s_gather_##S(T *out, const T *x, const int32_t *rows, int n, int D)            \
    {                                                                                          \
        for (int i = 0; i < n; i++)                                                            \
            memcpy(out + (size_t)i * D, x + (size_t)rows[i] * D, (size_t)D * sizeof(T));       \
    }                                                                                          \
    static void s_gather_bwd_##S(T *dx, const T *dout, const int32_t *rows, int n, int D)      \
    {                                                                                          \
        for (int i = 0; i < n; i++) {                                                          \
            T *d = dx + (size_t)rows[i] * D;                                                   \
            const T *s = dout + (size_t)i * D;                                                 \
            for (int c = 0; c < D; c++)                                                        \
                d[c] += s[c];                                                                  \
        }                                                                                      \
    }                                                                                          \
    static void s_scatter_##S(T *out, const T *y, const int32_t *rows, const T *w,             \
                              const int32_t *slots, int n, int D)                              \
    {                                                                                          \
        for (int i = 0; i < n; i++) {                                                          \
            T *o = out + (size_t)rows[i] * D;                                                  \
            const T *s = y + (size_t)i * D;                                                    \
            T wi = w[slots[i]];                                                                \
            for (int c = 0; c < D; c++)                                                        \
                o[c] += wi * s[c];                                                             \
        }                                                                                      \
    }                                                                                          \
    static void s_scatter_bwd_##S(T *dy, T *dw, const T *dout, const T *y,                     \
                                  const int32_t *rows, const T *w, const int32_t *slots,       \
                                  int n, int D)                                                \
    {                                                                                          \
        for (int i = 0; i < n; i++) {                                                          \
            const T *g = dout + (size_t)rows[i] * D;                                           \
            if (dy) {                                                                          \
                T *d = dy + (size_t)i * D;                                                     \
                T wi = w[slots[i]];                                                            \
                for (int c = 0; c < D; c++)                                                    \
                    d[c] += wi * g[c];                                                         \
            }                                                                                  \
            if (dw) {                                                                          \
                const T *s = y + (size_t)i * D;                                                \
                T acc = 0;                                                                     \
                for (int c = 0; c < D; c++)                                                    \
                    acc += g[c] * s[c];                                                        \
                dw[slots[i]] += acc;                                                           \
            }                                                                                  \
        }                                                                                      \
    }                                                                                          \
    const model_backend_##S##_t cpu_backend_##S = {                                            \
        .name = "cpu",                                                                         \
        .alloc = s_alloc,                                                                      \
        .free = s_free,                                                                        \
        .zero = s_zero,                                                                        \
        .copy = s_copy,                                                                        \
        .to_device = s_copy,                                                                   \
        .to_host = s_copy,                                                                     \
        .axpy = s_axpy_##S,                                                                    \
        .add = s_add_##S,                                                                      \
        .add_bias = s_add_bias_##S,                                                            \
        .embedding_fwd = cpu_embedding_fwd_##S,                                                \
        .embedding_bwd = cpu_embedding_bwd_##S,                                                \
        .rmsnorm_fwd = cpu_rmsnorm_fwd_##S,                                                    \
        .rmsnorm_bwd = cpu_rmsnorm_bwd_##S,                                                    \
        .linear_fwd = cpu_linear_fwd_##S,                                                      \
        .linear_bwd = cpu_linear_bwd_##S,                                                      \
        .rope_fwd = cpu_rope_fwd_##S,                                                          \
        .rope_bwd = cpu_rope_bwd_##S,                                                          \
        .attention_fwd = cpu_attention_fwd_##S,                                                \
        .attention_bwd = cpu_attention_bwd_##S,                                                \
        .router_fwd = cpu_router_fwd_##S,                                                      \
        .router_bwd = cpu_router_bwd_##S,                                                      \
        .swiglu_fwd = cpu_swiglu_fwd_##S,                                                      \
        .swiglu_bwd = cpu_swiglu_bwd_##S,                                                      \
        .crossentropy_fwd = cpu_crossentropy_fwd_##S,                                          \
        .crossentropy_bwd = cpu_crossentropy_bwd_##S,                                          \
        .auxloss_fwd = cpu_auxloss_fwd_##S,                                                    \
        .auxloss_bwd = cpu_auxloss_bwd_##S,                                                    \
        .gather_rows = s_gather_##S,                                                           \
        .gather_rows_bwd = s_gather_bwd_##S,                                                   \
        .scatter_rows = s_scatter_##S,                                                         \
        .scatter_rows_bwd = s_scatter_bwd_##S,                                                 \
        .adamw = cpu_adamw_##S,                                                                \
        .sumsq = cpu_sumsq_##S,                                                                \
    };

CPU_BE_DEFINE(float, f32)
CPU_BE_DEFINE(double, f64)
