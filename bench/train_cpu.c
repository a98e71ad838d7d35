/* bench_train_cpu: single-process training throughput of the CPU float backend against
 * OpenBLAS sgemm's own peak measured in the same run, with the step's time split by op kind
 * (GEMM, attention, routing, elementwise/norms, optimizer) through a timing copy of the
 * backend table. A benchmark: it measures and prints, it does not pass or fail. */
#include <cblas.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/job.h"
#include "model/params.h"
#include "model/train.h"

/* --- timing backend -------------------------------------------------------------------------- */

enum { C_GEMM, C_ATTN, C_ROUTE, C_ELEM, C_OPT, C_MEM, C_N };
static const char *const s_cat_name[C_N] = {"gemm", "attention", "routing", "elementwise",
                                            "optimizer", "memory"};

static model_backend_f32_t s_real;  /* cpu_backend_f32 */
static double s_time[C_N];          /* seconds per category since the last reset */
static double s_gemm_flops;         /* FLOPs the linear ops did */

static double s_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define TIMED(cat, call)                                                                     \
    do {                                                                                       \
        double t0_ = s_now();                                                                  \
        call;                                                                                  \
        s_time[cat] += s_now() - t0_;                                                          \
    } while (0)

static void *s_alloc(size_t b) { void *p; TIMED(C_MEM, p = s_real.alloc(b)); return p; }
static void s_free(void *p) { TIMED(C_MEM, s_real.free(p)); }
static void s_zero(void *p, size_t b) { TIMED(C_MEM, s_real.zero(p, b)); }
static void s_copy(void *d, const void *s, size_t b) { TIMED(C_MEM, s_real.copy(d, s, b)); }
static void s_to_device(void *d, const void *s, size_t b) { TIMED(C_MEM, s_real.to_device(d, s, b)); }
static void s_to_host(void *d, const void *s, size_t b) { TIMED(C_MEM, s_real.to_host(d, s, b)); }
static void s_axpy(float *y, float a, const float *x, size_t n) { TIMED(C_ELEM, s_real.axpy(y, a, x, n)); }
static void s_add(float *o, const float *a, const float *b, size_t n) { TIMED(C_ELEM, s_real.add(o, a, b, n)); }
static void s_embedding_fwd(float *out, const int32_t *tok, const float *wte, int N, int D) {
    TIMED(C_ELEM, s_real.embedding_fwd(out, tok, wte, N, D));
}
static void s_embedding_bwd(float *dwte, const float *dout, const int32_t *tok, int N, int D) {
    TIMED(C_ELEM, s_real.embedding_bwd(dwte, dout, tok, N, D));
}
static void s_rmsnorm_fwd(float *out, float *rstd, const float *x, const float *w, int N, int D,
                          float eps) {
    TIMED(C_ELEM, s_real.rmsnorm_fwd(out, rstd, x, w, N, D, eps));
}
static void s_rmsnorm_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                          const float *rstd, int N, int D) {
    TIMED(C_ELEM, s_real.rmsnorm_bwd(dx, dw, dout, x, w, rstd, N, D));
}
static void s_linear_fwd(float *out, const float *x, const float *w, int N, int IN, int OUT) {
    TIMED(C_GEMM, s_real.linear_fwd(out, x, w, N, IN, OUT));
    s_gemm_flops += 2.0 * N * IN * OUT;
}
static void s_linear_bwd(float *dx, float *dw, const float *dout, const float *x, const float *w,
                         int N, int IN, int OUT) {
    TIMED(C_GEMM, s_real.linear_bwd(dx, dw, dout, x, w, N, IN, OUT));
    s_gemm_flops += ((dx ? 2.0 : 0.0) + (dw ? 2.0 : 0.0)) * N * IN * OUT;
}
static void s_rope_fwd(float *out, const float *x, const int32_t *pos, int N, int H, int hd,
                       double theta) {
    TIMED(C_ATTN, s_real.rope_fwd(out, x, pos, N, H, hd, theta));
}
static void s_rope_bwd(float *dx, const float *dout, const int32_t *pos, int N, int H, int hd,
                       double theta) {
    TIMED(C_ATTN, s_real.rope_bwd(dx, dout, pos, N, H, hd, theta));
}
static void s_attention_fwd(float *out, float *probs, const float *q, const float *k,
                            const float *v, int B, int Tn, int H, int KVH, int hd) {
    TIMED(C_ATTN, s_real.attention_fwd(out, probs, q, k, v, B, Tn, H, KVH, hd));
}
static void s_attention_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                            const float *k, const float *v, const float *probs, int B, int Tn,
                            int H, int KVH, int hd) {
    TIMED(C_ATTN, s_real.attention_bwd(dq, dk, dv, dout, q, k, v, probs, B, Tn, H, KVH, hd));
}
static void s_router_fwd(float *probs, int32_t *idx, float *w, const float *logits, int N, int E,
                         int K) {
    TIMED(C_ROUTE, s_real.router_fwd(probs, idx, w, logits, N, E, K));
}
static void s_router_bwd(float *dlogits, const float *dw, const float *dprobs, const float *probs,
                         const int32_t *idx, const float *w, int N, int E, int K) {
    TIMED(C_ROUTE, s_real.router_bwd(dlogits, dw, dprobs, probs, idx, w, N, E, K));
}
static void s_swiglu_fwd(float *h, const float *a, const float *b, size_t n) {
    TIMED(C_ELEM, s_real.swiglu_fwd(h, a, b, n));
}
static void s_swiglu_bwd(float *da, float *db, const float *dh, const float *a, const float *b,
                         size_t n) {
    TIMED(C_ELEM, s_real.swiglu_bwd(da, db, dh, a, b, n));
}
static float s_crossentropy_fwd(float *losses, const float *logits, const int32_t *t, int N, int V) {
    float r;
    TIMED(C_ELEM, r = s_real.crossentropy_fwd(losses, logits, t, N, V));
    return r;
}
static void s_crossentropy_bwd(float *dlogits, const float *logits, const int32_t *t, float dl,
                               int N, int V) {
    TIMED(C_ELEM, s_real.crossentropy_bwd(dlogits, logits, t, dl, N, V));
}
static float s_auxloss_fwd(const float *probs, const int32_t *idx, int M, int E, int K) {
    float r;
    TIMED(C_ROUTE, r = s_real.auxloss_fwd(probs, idx, M, E, K));
    return r;
}
static void s_auxloss_bwd(float *dprobs, const int32_t *idx, float dl, int M, int E, int K) {
    TIMED(C_ROUTE, s_real.auxloss_bwd(dprobs, idx, dl, M, E, K));
}
static void s_gather_rows(float *out, const float *x, const int32_t *rows, int n, int D) {
    TIMED(C_ROUTE, s_real.gather_rows(out, x, rows, n, D));
}
static void s_gather_rows_bwd(float *dx, const float *dout, const int32_t *rows, int n, int D) {
    TIMED(C_ROUTE, s_real.gather_rows_bwd(dx, dout, rows, n, D));
}
static void s_scatter_rows(float *out, const float *y, const int32_t *rows, const float *w,
                           const int32_t *slots, int n, int D) {
    TIMED(C_ROUTE, s_real.scatter_rows(out, y, rows, w, slots, n, D));
}
static void s_scatter_rows_bwd(float *dy, float *dw, const float *dout, const float *y,
                               const int32_t *rows, const float *w, const int32_t *slots, int n,
                               int D) {
    TIMED(C_ROUTE, s_real.scatter_rows_bwd(dy, dw, dout, y, rows, w, slots, n, D));
}
static void s_adamw(float *p, const float *g, float *m, float *v, size_t n, double lr, double b1,
                    double b2, double eps, double wd, int t, double gscale) {
    TIMED(C_OPT, s_real.adamw(p, g, m, v, n, lr, b1, b2, eps, wd, t, gscale));
}
static double s_sumsq(const float *g, size_t n) {
    double r;
    TIMED(C_OPT, r = s_real.sumsq(g, n));
    return r;
}

/* The timing table: cpu_backend_f32 with every op routed through a wrapper above. */
static model_backend_f32_t s_timed_backend(void) {
    s_real = cpu_backend_f32;
    model_backend_f32_t b = cpu_backend_f32;
    b.name = "cpu-timed";
    b.alloc = s_alloc; b.free = s_free; b.zero = s_zero; b.copy = s_copy;
    b.to_device = s_to_device; b.to_host = s_to_host; b.axpy = s_axpy; b.add = s_add;
    b.embedding_fwd = s_embedding_fwd; b.embedding_bwd = s_embedding_bwd;
    b.rmsnorm_fwd = s_rmsnorm_fwd; b.rmsnorm_bwd = s_rmsnorm_bwd;
    b.linear_fwd = s_linear_fwd; b.linear_bwd = s_linear_bwd;
    b.rope_fwd = s_rope_fwd; b.rope_bwd = s_rope_bwd;
    b.attention_fwd = s_attention_fwd; b.attention_bwd = s_attention_bwd;
    b.router_fwd = s_router_fwd; b.router_bwd = s_router_bwd;
    b.swiglu_fwd = s_swiglu_fwd; b.swiglu_bwd = s_swiglu_bwd;
    b.crossentropy_fwd = s_crossentropy_fwd; b.crossentropy_bwd = s_crossentropy_bwd;
    b.auxloss_fwd = s_auxloss_fwd; b.auxloss_bwd = s_auxloss_bwd;
    b.gather_rows = s_gather_rows; b.gather_rows_bwd = s_gather_rows_bwd;
    b.scatter_rows = s_scatter_rows; b.scatter_rows_bwd = s_scatter_rows_bwd;
    b.adamw = s_adamw; b.sumsq = s_sumsq;
    return b;
}

/* --- sgemm peak ------------------------------------------------------------------------------ */

typedef struct {
    int threads;
    double best_gflops;
    int best_n;
    double gflops[5];
} peak_t;

static const int s_peak_sizes[5] = {256, 512, 1024, 1536, 2048};

/* Best GFLOP/s of C = A B (square, row-major, no transposes) over s_peak_sizes with `threads`
 * OpenBLAS threads; each size repeated for at least 0.3 s after one warm-up call. */
static void s_sgemm_peak(int threads, peak_t *pk) {
    openblas_set_num_threads(threads);
    memset(pk, 0, sizeof *pk);
    pk->threads = threads;
    int nmax = s_peak_sizes[4];
    float *a = malloc(sizeof(float) * (size_t)nmax * nmax);
    float *b = malloc(sizeof(float) * (size_t)nmax * nmax);
    float *c = malloc(sizeof(float) * (size_t)nmax * nmax);
    if (!a || !b || !c) abort();
    for (size_t i = 0; i < (size_t)nmax * nmax; i++) {
        a[i] = (float)((i * 7919u) % 1000) / 1000.0f - 0.5f;
        b[i] = (float)((i * 104729u) % 1000) / 1000.0f - 0.5f;
    }
    for (int s = 0; s < 5; s++) {
        int n = s_peak_sizes[s];
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n, 0.0f,
                    c, n);
        double best = 0;
        double t_start = s_now();
        int reps = 0;
        while (reps < 3 || s_now() - t_start < 0.3) {
            double t0 = s_now();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n, b, n,
                        0.0f, c, n);
            double dt = s_now() - t0;
            double g = 2.0 * n * n * n / dt * 1e-9;
            if (g > best) best = g;
            reps++;
        }
        pk->gflops[s] = best;
        if (best > pk->best_gflops) {
            pk->best_gflops = best;
            pk->best_n = n;
        }
    }
    free(a);
    free(b);
    free(c);
}

/* --- training -------------------------------------------------------------------------------- */

typedef struct {
    const char *label;
    model_config_t cfg;
    uint32_t rows, seq_len, micro_batch;
    uint64_t active, total;
    double flops_per_token;          /* 6 x (active - embedding) + causal attention */
    double step_s, tok_s, gflops, gemm_gflops;
    double t_fwd, t_bwd, t_opt;      /* per step, from the report */
    double cat[C_N], other;          /* per step */
    double loss_first, loss_last;
} run_t;

static uint64_t s_rng = 0x9e3779b97f4a7c15ull;
static uint8_t s_byte(void) {
    s_rng ^= s_rng << 13;
    s_rng ^= s_rng >> 7;
    s_rng ^= s_rng << 17;
    return (uint8_t)(s_rng >> 24);
}

/* Trains job->model for warmup + steps steps of job->train.global_batch random byte rows on the
 * timing backend and fills r (times per timed step). */
static semoe_rc s_run(const model_job_t *job, int warmup, int steps, run_t *r) {
    semoe_rc rc = SEMOE_OK;
    model_params_t *params = NULL;
    model_train_t *tr = NULL;
    uint8_t *tokens = NULL;
    static model_backend_f32_t be;
    be = s_timed_backend();
    const model_config_t *c = &job->model;
    r->cfg = *c;
    r->rows = job->train.global_batch;
    r->seq_len = job->train.seq_len;
    r->micro_batch = job->train.micro_batch;
    r->active = model_params_active(c);
    r->total = model_params_total(c);
    double hd = c->head_dim ? c->head_dim : (double)c->hidden_size / c->num_attention_heads;
    r->flops_per_token = 6.0 * (double)(r->active - (uint64_t)c->vocab_size * c->hidden_size) +
                         6.0 * c->num_hidden_layers * (double)r->seq_len *
                             c->num_attention_heads * hd;

    rc = model_params_new(c, NULL, 0, &params);
    if (rc) goto fail;
    model_params_init(params, job->train.seed);
    rc = model_train_new(&be, params, job, &tr);
    if (rc) goto fail;
    size_t row = (size_t)r->seq_len + 1;
    tokens = malloc(row * r->rows);
    if (!tokens) abort();

    double sum_f = 0, sum_b = 0, sum_o = 0, t_timed = 0;
    uint64_t toks = 0;
    for (int s = 0; s < warmup + steps; s++) {
        for (size_t i = 0; i < row * r->rows; i++) tokens[i] = s_byte();
        if (s == warmup) {
            memset(s_time, 0, sizeof s_time);
            s_gemm_flops = 0;
        }
        model_train_report_t rep;
        double t0 = s_now();
        rc = model_train_step(tr, tokens, r->rows, (uint64_t)s, NULL, &rep);
        double dt = s_now() - t0;
        if (rc) goto fail;
        if (s == 0) r->loss_first = rep.loss;
        r->loss_last = rep.loss;
        if (s >= warmup) {
            t_timed += dt;
            sum_f += rep.t_forward;
            sum_b += rep.t_backward;
            sum_o += rep.t_optimizer;
            toks += rep.tokens;
        }
    }
    r->step_s = t_timed / steps;
    r->tok_s = (double)toks / t_timed;
    r->gflops = r->tok_s * r->flops_per_token * 1e-9;
    r->gemm_gflops = s_time[C_GEMM] > 0 ? s_gemm_flops / s_time[C_GEMM] * 1e-9 : 0;
    r->t_fwd = sum_f / steps;
    r->t_bwd = sum_b / steps;
    r->t_opt = sum_o / steps;
    double tracked = 0;
    for (int k = 0; k < C_N; k++) {
        r->cat[k] = s_time[k] / steps;
        tracked += r->cat[k];
    }
    r->other = r->step_s - tracked;
fail:
    if (rc) fprintf(stderr, "bench_train_cpu: %s: %s (%s)\n", r->label, semoe_err_msg(),
                    semoe_err_where());
    free(tokens);
    model_train_destroy(&tr);
    model_params_destroy(&params);
    return rc;
}

/* --- output ---------------------------------------------------------------------------------- */

static void s_print_config(const run_t *r) {
    const model_config_t *c = &r->cfg;
    printf("%s: hidden %u, layers %u, heads %u/%u kv, experts %u (top-%u) of intermediate %u, "
           "vocab %u; params %.2f M total, %.2f M active; batch %u x %u tokens (micro %u)\n",
           r->label, c->hidden_size, c->num_hidden_layers, c->num_attention_heads,
           c->num_key_value_heads, c->num_local_experts, c->num_experts_per_tok,
           c->intermediate_size, c->vocab_size, r->total * 1e-6, r->active * 1e-6, r->rows,
           r->seq_len, r->micro_batch);
}

static void s_print_table(const run_t *runs, int n, double peak) {
    printf("\n%-10s %9s %8s %9s %8s %7s %8s | %7s %7s %7s %7s %7s %7s %7s %7s\n", "model",
           "tok/s", "step ms", "MFLOP/tok", "GFLOP/s", "%peak", "gemm GF", "gemm%", "attn%",
           "route%", "elem%", "opt%", "mem%", "comm%", "other%");
    for (int i = 0; i < n; i++) {
        const run_t *r = &runs[i];
        double st = r->step_s;
        printf("%-10s %9.0f %8.1f %9.1f %8.2f %6.1f%% %8.2f | %6.1f%% %6.1f%% %6.1f%% %6.1f%% "
               "%6.1f%% %6.1f%% %6.1f%% %6.1f%%\n",
               r->label, r->tok_s, st * 1e3, r->flops_per_token * 1e-6, r->gflops,
               100.0 * r->gflops / peak, r->gemm_gflops, 100 * r->cat[C_GEMM] / st,
               100 * r->cat[C_ATTN] / st, 100 * r->cat[C_ROUTE] / st, 100 * r->cat[C_ELEM] / st,
               100 * r->cat[C_OPT] / st, 100 * r->cat[C_MEM] / st, 0.0, 100 * r->other / st);
    }
    printf("(GFLOP/s = tok/s x model FLOPs per token; %%peak against the sgemm peak at the "
           "training's thread count, %.1f GFLOP/s; gemm GF = FLOPs of the linear ops / their "
           "time; comm: single process, none)\n", peak);
}

static int s_write_json(const char *path, const peak_t *pk, int npk, int threads, double peak,
                        const run_t *runs, int n, int steps, int warmup) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return -1;
    }
    fprintf(f, "{\n  \"threads\": %d, \"steps\": %d, \"warmup\": %d,\n  \"sgemm_peak\": [\n",
            threads, steps, warmup);
    for (int i = 0; i < npk; i++) {
        fprintf(f, "    {\"threads\": %d, \"best_gflops\": %.3f, \"best_n\": %d, \"by_n\": {",
                pk[i].threads, pk[i].best_gflops, pk[i].best_n);
        for (int s = 0; s < 5; s++)
            fprintf(f, "%s\"%d\": %.3f", s ? ", " : "", s_peak_sizes[s], pk[i].gflops[s]);
        fprintf(f, "}}%s\n", i + 1 < npk ? "," : "");
    }
    fprintf(f, "  ],\n  \"peak_gflops\": %.3f,\n  \"models\": [\n", peak);
    for (int i = 0; i < n; i++) {
        const run_t *r = &runs[i];
        const model_config_t *c = &r->cfg;
        fprintf(f,
                "    {\"label\": \"%s\", \"hidden\": %u, \"layers\": %u, \"heads\": %u, "
                "\"kv_heads\": %u, \"experts\": %u, \"top_k\": %u, \"intermediate\": %u, "
                "\"rows\": %u, \"seq_len\": %u, \"micro_batch\": %u,\n"
                "     \"params_total\": %llu, \"params_active\": %llu, "
                "\"flops_per_token\": %.0f,\n"
                "     \"tokens_per_s\": %.1f, \"step_s\": %.6f, \"gflops\": %.3f, "
                "\"share_of_peak\": %.4f, \"gemm_gflops\": %.3f,\n"
                "     \"forward_s\": %.6f, \"backward_s\": %.6f, \"optimizer_report_s\": %.6f,\n"
                "     \"split_s\": {",
                r->label, c->hidden_size, c->num_hidden_layers, c->num_attention_heads,
                c->num_key_value_heads, c->num_local_experts, c->num_experts_per_tok,
                c->intermediate_size, r->rows, r->seq_len, r->micro_batch,
                (unsigned long long)r->total, (unsigned long long)r->active, r->flops_per_token,
                r->tok_s, r->step_s, r->gflops, r->gflops / peak, r->gemm_gflops, r->t_fwd,
                r->t_bwd, r->t_opt);
        for (int k = 0; k < C_N; k++) fprintf(f, "\"%s\": %.6f, ", s_cat_name[k], r->cat[k]);
        fprintf(f, "\"communication\": 0, \"other\": %.6f},\n", r->other);
        fprintf(f, "     \"loss_first\": %.4f, \"loss_last\": %.4f}%s\n", r->loss_first,
                r->loss_last, i + 1 < n ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    return fclose(f) ? -1 : 0;
}

static void s_usage(FILE *f) {
    fprintf(f,
            "usage: bench_train_cpu [--job deploy/jobs/demo.json] [--steps 5] [--warmup 2]\n"
            "                       [--threads N] [--hidden 512] [--batch ROWS] [--json FILE]\n"
            "  --job      job spec whose model and train sections are the demo model\n"
            "  --steps    timed steps per model (after --warmup untimed ones)\n"
            "  --threads  OpenBLAS threads for training (default: OpenBLAS's own count)\n"
            "  --hidden   hidden size of the second model (0: skip it); 4 layers, hidden/64\n"
            "             heads of 64, half as many kv heads, 8 experts top-2 of 2 x hidden\n"
            "  --batch    rows per step of the second model (default 8; the demo model\n"
            "             keeps its job's global_batch)\n");
}

int main(int argc, char **argv) {
    const char *job_path = "deploy/jobs/demo.json", *json = NULL;
    int steps = 5, warmup = 2, threads = 0, hidden = 512, batch = 8;
    static const struct option opts[] = {
        {"job", required_argument, 0, 'j'},    {"steps", required_argument, 0, 's'},
        {"warmup", required_argument, 0, 'w'}, {"threads", required_argument, 0, 't'},
        {"hidden", required_argument, 0, 'H'}, {"batch", required_argument, 0, 'b'},
        {"json", required_argument, 0, 'o'},   {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'j': job_path = optarg; break;
        case 's': steps = atoi(optarg); break;
        case 'w': warmup = atoi(optarg); break;
        case 't': threads = atoi(optarg); break;
        case 'H': hidden = atoi(optarg); break;
        case 'b': batch = atoi(optarg); break;
        case 'o': json = optarg; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (steps < 1 || warmup < 0 || threads < 0 || hidden < 0 || batch < 1) {
        fprintf(stderr, "bench_train_cpu: --steps >= 1, --warmup >= 0, --threads >= 0, "
                        "--hidden >= 0, --batch >= 1\n");
        return 2;
    }

    int def_threads = openblas_get_num_threads();
    if (threads == 0) threads = def_threads;
    printf("OpenBLAS %s; default threads %d, training with %d\n", openblas_get_config(),
           def_threads, threads);

    peak_t pk[3];
    int npk = 0;
    s_sgemm_peak(1, &pk[npk++]);
    if (def_threads != 1) s_sgemm_peak(def_threads, &pk[npk++]);
    if (threads != 1 && threads != def_threads) s_sgemm_peak(threads, &pk[npk++]);
    double peak = 0;
    printf("\nsgemm peak (square, row-major NN, best of >= 0.3 s per size):\n");
    printf("%8s %8s", "threads", "best");
    for (int s = 0; s < 5; s++) printf(" %7d", s_peak_sizes[s]);
    printf("\n");
    for (int i = 0; i < npk; i++) {
        printf("%8d %8.2f", pk[i].threads, pk[i].best_gflops);
        for (int s = 0; s < 5; s++) printf(" %7.2f", pk[i].gflops[s]);
        printf("   GFLOP/s%s\n", pk[i].threads == def_threads ? " (default threads)" : "");
        if (pk[i].threads == threads) peak = pk[i].best_gflops;
    }
    openblas_set_num_threads(threads);

    model_job_t *job = NULL;
    if (model_job_load(job_path, &job)) {
        fprintf(stderr, "bench_train_cpu: %s\n", semoe_err_msg());
        return 1;
    }
    run_t runs[2];
    memset(runs, 0, sizeof runs);
    int n = 0;
    printf("\n");
    runs[n].label = "demo";
    if (s_run(job, warmup, steps, &runs[n])) goto fail;
    s_print_config(&runs[n]);
    n++;
    if (hidden > 0) {
        model_config_t *c = &job->model;
        c->hidden_size = (uint32_t)hidden;
        c->num_attention_heads = (uint32_t)(hidden >= 128 ? hidden / 64 : 2);
        c->num_key_value_heads = c->num_attention_heads / 2 ? c->num_attention_heads / 2 : 1;
        c->head_dim = (uint32_t)hidden / c->num_attention_heads;
        c->intermediate_size = 2u * (uint32_t)hidden;
        c->num_hidden_layers = 4;
        c->num_local_experts = 8;
        c->num_experts_per_tok = 2;
        job->train.global_batch = (uint32_t)batch;
        job->train.micro_batch = (uint32_t)batch < 8 ? (uint32_t)batch : 8;
        if (model_config_validate(c, "--hidden")) {
            fprintf(stderr, "bench_train_cpu: %s\n", semoe_err_msg());
            goto fail;
        }
        static char label[32];
        snprintf(label, sizeof label, "hidden%d", hidden);
        runs[n].label = label;
        if (s_run(job, warmup, steps, &runs[n])) goto fail;
        s_print_config(&runs[n]);
        n++;
    }
    s_print_table(runs, n, peak);
    printf("\nseconds per step by op kind (the step's own clock; forward/backward/optimizer "
           "from the report):\n");
    printf("%-10s %8s %8s %8s %8s | %8s %8s %8s %8s %8s %8s %8s\n", "model", "step", "fwd",
           "bwd", "opt", "gemm", "attn", "route", "elem", "opt", "mem", "other");
    for (int i = 0; i < n; i++) {
        const run_t *r = &runs[i];
        printf("%-10s %8.4f %8.4f %8.4f %8.4f | %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f\n",
               r->label, r->step_s, r->t_fwd, r->t_bwd, r->t_opt, r->cat[C_GEMM],
               r->cat[C_ATTN], r->cat[C_ROUTE], r->cat[C_ELEM], r->cat[C_OPT], r->cat[C_MEM],
               r->other);
    }
    if (json && s_write_json(json, pk, npk, threads, peak, runs, n, steps, warmup)) goto fail;
    model_job_destroy(&job);
    return 0;
fail:
    model_job_destroy(&job);
    return 1;
}
