/* The timing wrapper of a float backend table (model/profile.h): one static table whose ops
 * call the real ones between two clock reads, per-thread sums by category. */
#include "model/profile.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

static const model_backend_f32_t *s_real;
static model_backend_f32_t s_table;
static char s_name[64];

static _Thread_local double s_time[MODEL_PROF_N]; /* seconds since the thread's last take */
static _Thread_local double s_gemm_flops;
static _Thread_local uint64_t s_calls;

enum { C_GEMM = MODEL_PROF_GEMM, C_ATTN = MODEL_PROF_ATTENTION, C_ROUTE = MODEL_PROF_ROUTING,
       C_ELEM = MODEL_PROF_ELEMENTWISE, C_OPT = MODEL_PROF_OPTIMIZER, C_MEM = MODEL_PROF_MEMORY };

static const char *const s_cat_name[MODEL_PROF_N] = {"gemm",        "attention", "routing",
                                                     "elementwise", "optimizer", "memory"};

static double s_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define S_TIMED(cat, call)                                                                     \
    do {                                                                                       \
        double t0_ = s_now();                                                                  \
        call;                                                                                  \
        s_time[cat] += s_now() - t0_;                                                          \
        s_calls++;                                                                             \
    } while (0)

static void *s_alloc(size_t b)
{
    void *p;
    S_TIMED(C_MEM, p = s_real->alloc(b));
    return p;
}
static void s_free(void *p) { S_TIMED(C_MEM, s_real->free(p)); }
static void s_zero(void *p, size_t b) { S_TIMED(C_MEM, s_real->zero(p, b)); }
static void s_copy(void *d, const void *s, size_t b) { S_TIMED(C_MEM, s_real->copy(d, s, b)); }
static void s_to_device(void *d, const void *s, size_t b)
{
    S_TIMED(C_MEM, s_real->to_device(d, s, b));
}
static void s_to_host(void *d, const void *s, size_t b)
{
    S_TIMED(C_MEM, s_real->to_host(d, s, b));
}
static void s_axpy(float *y, float a, const float *x, size_t n)
{
    S_TIMED(C_ELEM, s_real->axpy(y, a, x, n));
}
static void s_add(float *o, const float *a, const float *b, size_t n)
{
    S_TIMED(C_ELEM, s_real->add(o, a, b, n));
}
static void s_add_bias(float *o, const float *bias, int N, int C)
{
    S_TIMED(C_ROUTE, s_real->add_bias(o, bias, N, C));
}
static void s_embedding_fwd(float *out, const int32_t *tok, const float *wte, int N, int D)
{
    S_TIMED(C_ELEM, s_real->embedding_fwd(out, tok, wte, N, D));
}
static void s_embedding_bwd(float *dwte, const float *dout, const int32_t *tok, int N, int D)
{
    S_TIMED(C_ELEM, s_real->embedding_bwd(dwte, dout, tok, N, D));
}
static void s_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int N, int D,
                          float eps)
{
    S_TIMED(C_ELEM, s_real->rmsnorm_fwd(out, rstd, x, w, N, D, eps));
}
static void s_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                          const float *rstd, int N, int D)
{
    S_TIMED(C_ELEM, s_real->rmsnorm_bwd(dx, dw, dout, x, w, rstd, N, D));
}
static void s_linear_fwd(float *out, const float *x, const float *w, int N, int IN, int OUT)
{
    S_TIMED(C_GEMM, s_real->linear_fwd(out, x, w, N, IN, OUT));
    s_gemm_flops += 2.0 * N * IN * OUT;
}
static void s_linear_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                         int N, int IN, int OUT)
{
    S_TIMED(C_GEMM, s_real->linear_bwd(dx, dw, dout, x, w, N, IN, OUT));
    s_gemm_flops += ((dx ? 2.0 : 0.0) + (dw ? 2.0 : 0.0)) * N * IN * OUT;
}
static void s_rope_fwd(float *out, const float *x, const int32_t *pos, int N, int H, int hd,
                       double theta)
{
    S_TIMED(C_ATTN, s_real->rope_fwd(out, x, pos, N, H, hd, theta));
}
static void s_rope_bwd(float *dx, const float *dout, const int32_t *pos, int N, int H, int hd,
                       double theta)
{
    S_TIMED(C_ATTN, s_real->rope_bwd(dx, dout, pos, N, H, hd, theta));
}
static void s_attention_fwd(float *out, float *probs, const float *q, const float *k,
                            const float *v, int B, int Tn, int H, int KVH, int hd)
{
    S_TIMED(C_ATTN, s_real->attention_fwd(out, probs, q, k, v, B, Tn, H, KVH, hd));
}
static void s_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *probs, int B, int Tn,
                            int H, int KVH, int hd)
{
    S_TIMED(C_ATTN, s_real->attention_bwd(dq, dk, dv, dout, q, k, v, probs, B, Tn, H, KVH, hd));
}
static void s_router_fwd(float *probs, int32_t *idx, float *w, const float *logits, int N, int E,
                         int K)
{
    S_TIMED(C_ROUTE, s_real->router_fwd(probs, idx, w, logits, N, E, K));
}
static void s_router_bwd(float *dlogits, const float *dw, const float *dprobs, const float *probs,
                         const int32_t *idx, const float *w, int N, int E, int K)
{
    S_TIMED(C_ROUTE, s_real->router_bwd(dlogits, dw, dprobs, probs, idx, w, N, E, K));
}
static void s_swiglu_fwd(float *h, const float *a, const float *b, size_t n)
{
    S_TIMED(C_ELEM, s_real->swiglu_fwd(h, a, b, n));
}
static void s_swiglu_bwd(float *da, float *db, const float *dh, const float *a, const float *b,
                         size_t n)
{
    S_TIMED(C_ELEM, s_real->swiglu_bwd(da, db, dh, a, b, n));
}
static float s_crossentropy_fwd(float *losses, const float *logits, const int32_t *t, int N, int V)
{
    float r;
    S_TIMED(C_ELEM, r = s_real->crossentropy_fwd(losses, logits, t, N, V));
    return r;
}
static void s_crossentropy_bwd(float *dlogits, const float *logits, const int32_t *t, float dl,
                               int N, int V)
{
    S_TIMED(C_ELEM, s_real->crossentropy_bwd(dlogits, logits, t, dl, N, V));
}
static float s_auxloss_fwd(const float *probs, const int32_t *idx, int M, int E, int K)
{
    float r;
    S_TIMED(C_ROUTE, r = s_real->auxloss_fwd(probs, idx, M, E, K));
    return r;
}
static void s_auxloss_bwd(float *dprobs, const int32_t *idx, float dl, int M, int E, int K)
{
    S_TIMED(C_ROUTE, s_real->auxloss_bwd(dprobs, idx, dl, M, E, K));
}
static void s_gather_rows(float *out, const float *x, const int32_t *rows, int n, int D)
{
    S_TIMED(C_ROUTE, s_real->gather_rows(out, x, rows, n, D));
}
static void s_gather_rows_bwd(float *dx, const float *dout, const int32_t *rows, int n, int D)
{
    S_TIMED(C_ROUTE, s_real->gather_rows_bwd(dx, dout, rows, n, D));
}
static void s_scatter_rows(float *out, const float *y, const int32_t *rows, const float *w,
                           const int32_t *slots, int n, int D)
{
    S_TIMED(C_ROUTE, s_real->scatter_rows(out, y, rows, w, slots, n, D));
}
static void s_scatter_rows_bwd(float *dy, float *dw, const float *dout, const float *y,
                               const int32_t *rows, const float *w, const int32_t *slots, int n,
                               int D)
{
    S_TIMED(C_ROUTE, s_real->scatter_rows_bwd(dy, dw, dout, y, rows, w, slots, n, D));
}
static void s_adamw(float *p, const float *g, float *m, float *v, size_t n, double lr, double b1,
                    double b2, double eps, double wd, int t, double gscale)
{
    S_TIMED(C_OPT, s_real->adamw(p, g, m, v, n, lr, b1, b2, eps, wd, t, gscale));
}
static double s_sumsq(const float *g, size_t n)
{
    double r;
    S_TIMED(C_OPT, r = s_real->sumsq(g, n));
    return r;
}

const model_backend_f32_t *model_profile_wrap(const model_backend_f32_t *real)
{
    if (s_real == real)
        return &s_table;
    s_real = real;
    snprintf(s_name, sizeof s_name, "%s-profiled", real->name ? real->name : "?");
    s_table = (model_backend_f32_t){
        .name = s_name,
        .alloc = s_alloc, .free = s_free, .zero = s_zero, .copy = s_copy,
        .to_device = s_to_device, .to_host = s_to_host, .axpy = s_axpy, .add = s_add,
        .add_bias = s_add_bias,
        .embedding_fwd = s_embedding_fwd, .embedding_bwd = s_embedding_bwd,
        .rmsnorm_fwd = s_rmsnorm_fwd, .rmsnorm_bwd = s_rmsnorm_bwd,
        .linear_fwd = s_linear_fwd, .linear_bwd = s_linear_bwd,
        .rope_fwd = s_rope_fwd, .rope_bwd = s_rope_bwd,
        .attention_fwd = s_attention_fwd, .attention_bwd = s_attention_bwd,
        .router_fwd = s_router_fwd, .router_bwd = s_router_bwd,
        .swiglu_fwd = s_swiglu_fwd, .swiglu_bwd = s_swiglu_bwd,
        .crossentropy_fwd = s_crossentropy_fwd, .crossentropy_bwd = s_crossentropy_bwd,
        .auxloss_fwd = s_auxloss_fwd, .auxloss_bwd = s_auxloss_bwd,
        .gather_rows = s_gather_rows, .gather_rows_bwd = s_gather_rows_bwd,
        .scatter_rows = s_scatter_rows, .scatter_rows_bwd = s_scatter_rows_bwd,
        .adamw = s_adamw, .sumsq = s_sumsq};
    return &s_table;
}

void model_profile_take(model_profile_t *out)
{
    if (out) {
        memcpy(out->seconds, s_time, sizeof out->seconds);
        out->gemm_flops = s_gemm_flops;
        out->calls = s_calls;
    }
    memset(s_time, 0, sizeof s_time);
    s_gemm_flops = 0;
    s_calls = 0;
}

double model_profile_total(const model_profile_t *p)
{
    double t = 0;
    for (int k = 0; k < MODEL_PROF_N; k++)
        t += p->seconds[k];
    return t;
}

const char *model_profile_category(int cat)
{
    return cat >= 0 && cat < MODEL_PROF_N ? s_cat_name[cat] : "?";
}
