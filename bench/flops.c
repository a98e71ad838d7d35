/* sgemm's own rate and a model's FLOPs per token, for the training benchmarks (flops.h). */
#include "bench/flops.h"

#include <cblas.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "model/params.h"

const int flops_sizes[FLOPS_NSIZES] = {256, 512, 1024, 1536, 2048};

double flops_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* n floats of a fixed pattern in [-0.5, 0.5): not zeros, not denormals. */
static float *s_fill(size_t n, unsigned mul)
{
    float *p = malloc(sizeof(float) * (n ? n : 1));
    if (!p)
        abort();
    for (size_t i = 0; i < n; i++)
        p[i] = (float)((i * mul) % 1000) / 1000.0f - 0.5f;
    return p;
}

/* Best seconds of one call over repeats for at least min_s (and 3 calls), after a warm-up. */
static double s_best(int m, int n, int k, int ta, int tb, const float *a, const float *b,
                     float *c, double min_s)
{
    int lda = ta ? m : k, ldb = tb ? k : n;
    enum CBLAS_TRANSPOSE TA = ta ? CblasTrans : CblasNoTrans, TB = tb ? CblasTrans : CblasNoTrans;
    cblas_sgemm(CblasRowMajor, TA, TB, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, n);
    double best = 1e30, start = flops_now();
    for (int reps = 0; reps < 3 || flops_now() - start < min_s; reps++) {
        double t0 = flops_now();
        cblas_sgemm(CblasRowMajor, TA, TB, m, n, k, 1.0f, a, lda, b, ldb, 0.0f, c, n);
        double dt = flops_now() - t0;
        if (dt < best)
            best = dt;
    }
    return best;
}

void flops_sgemm_peak(int threads, flops_peak_t *pk)
{
    openblas_set_num_threads(threads);
    memset(pk, 0, sizeof *pk);
    pk->threads = threads;
    size_t nmax = (size_t)flops_sizes[FLOPS_NSIZES - 1];
    float *a = s_fill(nmax * nmax, 7919u), *b = s_fill(nmax * nmax, 104729u);
    float *c = s_fill(nmax * nmax, 1u);
    for (int s = 0; s < FLOPS_NSIZES; s++) {
        int n = flops_sizes[s];
        double g = 2.0 * n * n * n / s_best(n, n, n, 0, 0, a, b, c, 0.3) * 1e-9;
        pk->gflops[s] = g;
        if (g > pk->best_gflops) {
            pk->best_gflops = g;
            pk->best_n = n;
        }
    }
    free(a);
    free(b);
    free(c);
}

/* The three GEMMs of a linear op (N, IN) -> (N, OUT), `calls` times per micro-batch. */
static int s_linear(flops_shape_t *out, int at, int cap, const char *what, int N, int IN,
                    int OUT, double calls)
{
    const flops_shape_t three[3] = {
        {what, N, OUT, IN, 0, 1, calls, 0},   /* out = x W^T */
        {what, N, IN, OUT, 0, 0, calls, 0},   /* dx = dout W */
        {what, OUT, IN, N, 1, 0, calls, 0},   /* dW = dout^T x */
    };
    for (int i = 0; i < 3 && at < cap; i++)
        out[at++] = three[i];
    return at;
}

int flops_model_shapes(const model_config_t *c, int tokens, int experts_held, int expert_rows,
                       flops_shape_t *out, int cap)
{
    int D = (int)c->hidden_size, H = (int)c->num_attention_heads, KVH = (int)c->num_key_value_heads;
    int hd = c->head_dim ? (int)c->head_dim : D / H, F = (int)c->intermediate_size;
    double L = c->num_hidden_layers;
    int n = 0;
    n = s_linear(out, n, cap, "q_proj", tokens, D, H * hd, L);
    n = s_linear(out, n, cap, "k_proj,v_proj", tokens, D, KVH * hd, 2 * L);
    n = s_linear(out, n, cap, "o_proj", tokens, H * hd, D, L);
    n = s_linear(out, n, cap, "gate", tokens, D, (int)c->num_local_experts, L);
    if (expert_rows > 0 && experts_held > 0) {
        n = s_linear(out, n, cap, "w1,w3", expert_rows, D, F, 2 * L * experts_held);
        n = s_linear(out, n, cap, "w2", expert_rows, F, D, L * experts_held);
    }
    n = s_linear(out, n, cap, "lm_head", tokens, D, (int)c->vocab_size, 1);
    return n;
}

double flops_sgemm_shapes(int threads, flops_shape_t *s, int n)
{
    openblas_set_num_threads(threads);
    size_t na = 1, nb = 1, nc = 1;
    for (int i = 0; i < n; i++) {
        size_t a = (size_t)s[i].m * s[i].k, b = (size_t)s[i].k * s[i].n,
               c = (size_t)s[i].m * s[i].n;
        na = a > na ? a : na;
        nb = b > nb ? b : nb;
        nc = c > nc ? c : nc;
    }
    float *a = s_fill(na, 7919u), *b = s_fill(nb, 104729u), *c = s_fill(nc, 1u);
    double flops = 0, secs = 0;
    for (int i = 0; i < n; i++) {
        double f = 2.0 * s[i].m * s[i].n * s[i].k;
        double t = s_best(s[i].m, s[i].n, s[i].k, s[i].ta, s[i].tb, a, b, c, 0.1);
        s[i].gflops = f / t * 1e-9;
        flops += s[i].calls * f;
        secs += s[i].calls * t;
    }
    free(a);
    free(b);
    free(c);
    return secs > 0 ? flops / secs * 1e-9 : 0;
}

double flops_per_token(const model_config_t *c, uint32_t seq_len)
{
    double hd = c->head_dim ? c->head_dim : (double)c->hidden_size / c->num_attention_heads;
    uint64_t active = model_params_active(c);
    return 6.0 * (double)(active - (uint64_t)c->vocab_size * c->hidden_size) +
           6.0 * c->num_hidden_layers * (double)seq_len * c->num_attention_heads * hd;
}
