/* bench_train_cpu: single-process training throughput of the CPU float backend against
 * OpenBLAS sgemm's own peak measured in the same run, with the step's time split by op kind
 * (GEMM, attention, routing, elementwise/norms, optimizer, memory) through the profiled backend
 * (model/profile.h). A benchmark: it measures and prints, it does not pass or fail. */
#include <cblas.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "bench/flops.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/job.h"
#include "model/params.h"
#include "model/profile.h"
#include "model/train.h"

enum { C_GEMM = MODEL_PROF_GEMM, C_ATTN = MODEL_PROF_ATTENTION, C_ROUTE = MODEL_PROF_ROUTING,
       C_ELEM = MODEL_PROF_ELEMENTWISE, C_OPT = MODEL_PROF_OPTIMIZER, C_MEM = MODEL_PROF_MEMORY,
       C_N = MODEL_PROF_N };


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
    double calls;                    /* op calls per step through the profiled backend */
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
 * profiled CPU backend (profile 0: on cpu_backend_f32 itself, no split) and fills r (times per
 * timed step). */
static semoe_rc s_run(const model_job_t *job, int warmup, int steps, int profile, run_t *r) {
    semoe_rc rc = SEMOE_OK;
    model_params_t *params = NULL;
    model_train_t *tr = NULL;
    uint8_t *tokens = NULL;
    const model_backend_f32_t *be = profile ? model_profile_wrap(&cpu_backend_f32)
                                            : &cpu_backend_f32;
    const model_config_t *c = &job->model;
    r->cfg = *c;
    r->rows = job->train.global_batch;
    r->seq_len = job->train.seq_len;
    r->micro_batch = job->train.micro_batch;
    r->active = model_params_active(c);
    r->total = model_params_total(c);
    r->flops_per_token = flops_per_token(c, r->seq_len);

    rc = model_params_new(c, NULL, 0, &params);
    if (rc) goto fail;
    model_params_init(params, job->train.seed);
    rc = model_train_new(be, params, job, &tr);
    if (rc) goto fail;
    size_t row = (size_t)r->seq_len + 1;
    tokens = malloc(row * r->rows);
    if (!tokens) abort();

    double sum_f = 0, sum_b = 0, sum_o = 0, t_timed = 0;
    uint64_t toks = 0;
    for (int s = 0; s < warmup + steps; s++) {
        for (size_t i = 0; i < row * r->rows; i++) tokens[i] = s_byte();
        if (s == warmup)
            model_profile_take(NULL);
        model_train_report_t rep;
        double t0 = flops_now();
        rc = model_train_step(tr, tokens, r->rows, (uint64_t)s, NULL, &rep);
        double dt = flops_now() - t0;
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
    model_profile_t prof;
    model_profile_take(&prof);
    r->gemm_gflops = prof.seconds[C_GEMM] > 0 ? prof.gemm_flops / prof.seconds[C_GEMM] * 1e-9
                                              : 0;
    r->t_fwd = sum_f / steps;
    r->t_bwd = sum_b / steps;
    r->t_opt = sum_o / steps;
    double tracked = 0;
    for (int k = 0; k < C_N; k++) {
        r->cat[k] = prof.seconds[k] / steps;
        tracked += r->cat[k];
    }
    r->other = r->step_s - tracked;
    r->calls = (double)prof.calls / steps;
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

static int s_write_json(const char *path, const flops_peak_t *pk, int npk, int threads,
                        double peak, const run_t *runs, int n, int steps, int warmup,
                        int profile) {
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return -1;
    }
    fprintf(f, "{\n  \"threads\": %d, \"steps\": %d, \"warmup\": %d, \"profiled\": %s,\n"
               "  \"sgemm_peak\": [\n",
            threads, steps, warmup, profile ? "true" : "false");
    for (int i = 0; i < npk; i++) {
        fprintf(f, "    {\"threads\": %d, \"best_gflops\": %.3f, \"best_n\": %d, \"by_n\": {",
                pk[i].threads, pk[i].best_gflops, pk[i].best_n);
        for (int s = 0; s < FLOPS_NSIZES; s++)
            fprintf(f, "%s\"%d\": %.3f", s ? ", " : "", flops_sizes[s], pk[i].gflops[s]);
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
        for (int k = 0; k < C_N; k++)
            fprintf(f, "\"%s\": %.6f, ", model_profile_category(k), r->cat[k]);
        fprintf(f, "\"communication\": 0, \"other\": %.6f},\n", r->other);
        fprintf(f, "     \"op_calls_per_step\": %.0f,\n", r->calls);
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
            "                       [--no-profile]\n"
            "  --job      job spec whose model and train sections are the demo model\n"
            "  --steps    timed steps per model (after --warmup untimed ones)\n"
            "  --threads  OpenBLAS threads for training (default: OpenBLAS's own count)\n"
            "  --hidden   hidden size of the second model (0: skip it); 4 layers, hidden/64\n"
            "             heads of 64, half as many kv heads, 8 experts top-2 of 2 x hidden\n"
            "  --batch    rows per step of the second model (default 8; the demo model\n"
            "             keeps its job's global_batch)\n"
            "  --no-profile  train on cpu_backend_f32 itself, without the profiled backend\n"
            "             (no split: to measure what the profiling costs)\n");
}

int main(int argc, char **argv) {
    const char *job_path = "deploy/jobs/demo.json", *json = NULL;
    int steps = 5, warmup = 2, threads = 0, hidden = 512, batch = 8, profile = 1;
    static const struct option opts[] = {
        {"job", required_argument, 0, 'j'},    {"steps", required_argument, 0, 's'},
        {"warmup", required_argument, 0, 'w'}, {"threads", required_argument, 0, 't'},
        {"hidden", required_argument, 0, 'H'}, {"batch", required_argument, 0, 'b'},
        {"json", required_argument, 0, 'o'},   {"no-profile", no_argument, 0, 'P'},
        {"help", no_argument, 0, 'h'},         {0, 0, 0, 0}};
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
        case 'P': profile = 0; break;
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

    flops_peak_t pk[3];
    int npk = 0;
    flops_sgemm_peak(1, &pk[npk++]);
    if (def_threads != 1) flops_sgemm_peak(def_threads, &pk[npk++]);
    if (threads != 1 && threads != def_threads) flops_sgemm_peak(threads, &pk[npk++]);
    double peak = 0;
    printf("\nsgemm peak (square, row-major NN, best of >= 0.3 s per size):\n");
    printf("%8s %8s", "threads", "best");
    for (int s = 0; s < FLOPS_NSIZES; s++) printf(" %7d", flops_sizes[s]);
    printf("\n");
    for (int i = 0; i < npk; i++) {
        printf("%8d %8.2f", pk[i].threads, pk[i].best_gflops);
        for (int s = 0; s < FLOPS_NSIZES; s++) printf(" %7.2f", pk[i].gflops[s]);
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
    if (s_run(job, warmup, steps, profile, &runs[n])) goto fail;
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
        if (s_run(job, warmup, steps, profile, &runs[n])) goto fail;
        s_print_config(&runs[n]);
        n++;
    }
    s_print_table(runs, n, peak);
    printf("\nseconds per step by op kind (the step's own clock; forward/backward/optimizer "
           "from the report):\n");
    printf("%-10s %8s %8s %8s %8s | %8s %8s %8s %8s %8s %8s %8s | %8s\n", "model", "step",
           "fwd", "bwd", "opt", "gemm", "attn", "route", "elem", "opt", "mem", "other", "op calls");
    for (int i = 0; i < n; i++) {
        const run_t *r = &runs[i];
        printf("%-10s %8.4f %8.4f %8.4f %8.4f | %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f %8.4f | "
               "%8.0f\n",
               r->label, r->step_s, r->t_fwd, r->t_bwd, r->t_opt, r->cat[C_GEMM],
               r->cat[C_ATTN], r->cat[C_ROUTE], r->cat[C_ELEM], r->cat[C_OPT], r->cat[C_MEM],
               r->other, r->calls);
    }
    if (json && s_write_json(json, pk, npk, threads, peak, runs, n, steps, warmup, profile))
        goto fail;
    model_job_destroy(&job);
    return 0;
fail:
    model_job_destroy(&job);
    return 1;
}
