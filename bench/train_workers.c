/* bench_train_workers: training throughput of the real daemons, a semoe-coordinator and N
 * semoe-worker processes on loopback, against OpenBLAS sgemm's own rate measured in the same
 * run before they start; each step's time split by the workers' metrics lines (profiled ops,
 * expert exchange, gradient all-reduce). A benchmark: it measures and prints, it does not pass
 * or fail. */
#include <cblas.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "actors/err.h"
#include "actors/log.h"
#include "bench/benchutil.h"
#include "bench/coordproc.h"
#include "bench/flops.h"
#include "model/job.h"
#include "model/params.h"

#define S_MAX_WORKERS 64
#define S_MAX_SHAPES 32

typedef struct {
    const char *job, *json, *dir, *coord_bin, *worker_bin, *label;
    int hidden, intermediate, heads, kv_heads, micro_batch, global_batch, seq_len;
    int workers, threads, steps, warmup, timeout_s;
} s_opts_t;

/* The split of a step (seconds, means over the kept steps), as the metrics lines give it. */
enum { K_GEMM, K_ATTN, K_ROUTE, K_ELEM, K_MEM, K_OPT, K_EXCH, K_AR, K_N };
static const char *const s_key[K_N] = {"t_gemm",    "t_attention", "t_routing",
                                       "t_elementwise", "t_memory", "t_optimizer",
                                       "t_exchange", "t_allreduce"};
static const char *const s_short[K_N] = {"gemm", "attn", "route", "elem",
                                         "mem",  "opt",  "exch",  "allred"};

typedef struct {
    int lines;              /* steps kept */
    double step_s;          /* mean step_time_s */
    double t[K_N], other;   /* means; other = step_s - sum t */
    double t_fwd, t_bwd;
    double gemm_flops;      /* sum over the kept steps */
    double gemm_s;          /* sum of t_gemm */
    double tokens;          /* mean per step */
    bool have_first;        /* the line of step `warmup` was there (none when warmup is 0) */
    double wall_first;      /* its "time" */
    double wall_last;       /* "time" of the last kept line before the last step's */
    int wall_steps;         /* steps between the two */
    double loss_last;
    uint64_t generation;
} s_worker_t;

/* --- the job ---------------------------------------------------------------------------------- */

/* Writes o->job with the overrides into path: --hidden sets a model of that width (4 layers of
 * 8 experts top-2, heads of 64, half as many kv heads, intermediate 2 x hidden unless given),
 * the train section gets the steps, no checkpoints and no evaluation before the last step, the
 * cluster section the expected workers. */
static semoe_rc s_write_job(const s_opts_t *o, const char *path)
{
    cJSON *root = NULL;
    SEMOE_CHECK(bench_job_read(o->job, &root));
    cJSON *m = bench_job_section(root, "model"), *t = bench_job_section(root, "train"),
          *c = bench_job_section(root, "cluster");
    if (o->hidden > 0) {
        int heads = o->heads ? o->heads : (o->hidden >= 128 ? o->hidden / 64 : 2);
        int kv = o->kv_heads ? o->kv_heads : (heads / 2 ? heads / 2 : 1);
        bench_job_set_num(m, "hidden_size", o->hidden);
        bench_job_set_num(m, "intermediate_size",
                          o->intermediate ? o->intermediate : 2 * o->hidden);
        bench_job_set_num(m, "num_attention_heads", heads);
        bench_job_set_num(m, "num_key_value_heads", kv);
        bench_job_set(m, "head_dim", cJSON_CreateNull());
        bench_job_set_num(m, "num_hidden_layers", 4);
        bench_job_set_num(m, "num_local_experts", 8);
        bench_job_set_num(m, "num_experts_per_tok", 2);
    } else {
        if (o->intermediate)
            bench_job_set_num(m, "intermediate_size", o->intermediate);
        if (o->heads)
            bench_job_set_num(m, "num_attention_heads", o->heads);
        if (o->kv_heads)
            bench_job_set_num(m, "num_key_value_heads", o->kv_heads);
    }
    if (o->micro_batch)
        bench_job_set_num(t, "micro_batch", o->micro_batch);
    if (o->global_batch)
        bench_job_set_num(t, "global_batch", o->global_batch);
    if (o->seq_len)
        bench_job_set_num(t, "seq_len", o->seq_len);
    bench_job_set_num(t, "steps", o->steps);
    bench_job_set_num(t, "eval_interval", 1000000);
    bench_job_set(t, "checkpoint_dir", cJSON_CreateString(""));
    bench_job_set_num(c, "expected_workers", o->workers);
    return bench_job_write(root, path);
}

/* --- the workers' metrics --------------------------------------------------------------------- */

/* Reads a worker's metrics lines: of the last generation, the steps after `warmup` (the step
 * field counts steps done, so the first is 1). wall_* come from the lines of steps warmup ..
 * steps - 1 (the last step's line is written after the final evaluation). */
static semoe_rc s_read_metrics(const char *path, int warmup, int steps, s_worker_t *w)
{
    memset(w, 0, sizeof *w);
    FILE *f = fopen(path, "r");
    if (!f)
        return semoe_err_errno(SEMOE_EIO, "%s", path);
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    /* the last generation wins: a restart rewinds the steps */
    while ((n = getline(&line, &cap, f)) > 0) {
        cJSON *o = cJSON_ParseWithLength(line, (size_t)n);
        if (!o)
            continue;
        uint64_t gen = (uint64_t)bench_num(o, "generation", 0);
        if (gen > w->generation) {
            memset(w, 0, sizeof *w);
            w->generation = gen;
        }
        int step = (int)bench_num(o, "step", 0);
        double time = bench_num(o, "time", 0);
        if (step == warmup) {
            w->have_first = true;
            w->wall_first = time;
        }
        if (w->have_first && step > warmup && step < steps) {
            w->wall_last = time;
            w->wall_steps = step - warmup;
        }
        if (step > warmup) {
            w->lines++;
            w->step_s += bench_num(o, "step_time_s", 0);
            for (int k = 0; k < K_N; k++)
                w->t[k] += bench_num(o, s_key[k], 0);
            w->t_fwd += bench_num(o, "t_forward", 0);
            w->t_bwd += bench_num(o, "t_backward", 0);
            w->gemm_flops += bench_num(o, "gemm_flops", 0);
            w->gemm_s += bench_num(o, "t_gemm", 0);
            w->tokens += bench_num(o, "tokens", 0);
            w->loss_last = bench_num(o, "loss", 0);
        }
        cJSON_Delete(o);
    }
    free(line);
    fclose(f);
    if (w->lines == 0)
        return semoe_err(SEMOE_EIO, "%s: no step after the %d warm-up steps", path, warmup);
    double k = w->lines, sum = 0;
    w->step_s /= k;
    for (int i = 0; i < K_N; i++) {
        w->t[i] /= k;
        sum += w->t[i];
    }
    w->other = w->step_s - sum;
    w->t_fwd /= k;
    w->t_bwd /= k;
    w->tokens /= k;
    return SEMOE_OK;
}

/* --- processes -------------------------------------------------------------------------------- */

/* Waits up to timeout_ms for every worker to exit, then SIGTERM, then SIGKILL. */
static void s_reap(int *pids, int n, int timeout_ms)
{
    for (int pass = 0; pass < 3; pass++) {
        int64_t end = clock_mono_ms() + (pass == 0 ? timeout_ms : 5000);
        for (;;) {
            int left = 0;
            for (int i = 0; i < n; i++) {
                if (pids[i] > 0 && waitpid(pids[i], NULL, WNOHANG) == pids[i])
                    pids[i] = 0;
                left += pids[i] > 0;
            }
            if (!left)
                return;
            if (clock_mono_ms() >= end)
                break;
            bench_sleep_ms(20);
        }
        for (int i = 0; i < n; i++)
            if (pids[i] > 0)
                kill(pids[i], pass == 0 ? SIGTERM : SIGKILL);
    }
}

/* --- output ----------------------------------------------------------------------------------- */

typedef struct {
    model_job_t *job;
    flops_peak_t peak1, peakT;   /* 1 thread, T threads (T = 1: the same) */
    flops_shape_t shapes[S_MAX_SHAPES];
    int n_shapes;
    double shapes_gflops;        /* the model's GEMM mix at T threads */
    int tokens_micro, expert_rows, experts_held;
    s_worker_t w[S_MAX_WORKERS];
    double wall_s;               /* coordinator start to exit */
    double foreign_cores;        /* other processes' CPU over the run, in cores on average */
    double step_wall_s;          /* end to end: rank 0's time between kept lines per step */
    double step_s;               /* mean over workers of the in-step time */
    double global_tokens;        /* per step */
    double tok_s, flops_tok, gflops, gflops_core, gemm_gflops;
    int cores, online;           /* the cores the run used; the CPUs online */
} s_result_t;

static void s_print(const s_opts_t *o, const s_result_t *r)
{
    const model_config_t *c = &r->job->model;
    printf("\n%s: hidden %u, layers %u, heads %u/%u kv, experts %u (top-%u) of intermediate %u, "
           "vocab %u; params %.2f M total, %.2f M active; batch %u x %u tokens (micro %u); "
           "%d workers x %d threads\n",
           o->label, c->hidden_size, c->num_hidden_layers, c->num_attention_heads,
           c->num_key_value_heads, c->num_local_experts, c->num_experts_per_tok,
           c->intermediate_size, c->vocab_size, model_params_total(c) * 1e-6,
           model_params_active(c) * 1e-6, r->job->train.global_batch, r->job->train.seq_len,
           r->job->train.micro_batch, o->workers, o->threads);
    printf("\nper worker, seconds per step (means over steps %d..%d) and shares of the step:\n",
           o->warmup + 1, o->steps);
    printf("%-4s %8s |", "rank", "step");
    for (int k = 0; k < K_N; k++)
        printf(" %7s", s_short[k]);
    printf(" %7s | %8s\n", "other", "gemm GF");
    for (int i = 0; i < o->workers; i++) {
        const s_worker_t *w = &r->w[i];
        printf("%-4d %8.4f |", i, w->step_s);
        for (int k = 0; k < K_N; k++)
            printf(" %7.4f", w->t[k]);
        printf(" %7.4f | %8.2f\n", w->other, w->gemm_s > 0 ? w->gemm_flops / w->gemm_s * 1e-9 : 0);
        printf("%-4s %8s |", "", "");
        for (int k = 0; k < K_N; k++)
            printf(" %6.1f%%", 100 * w->t[k] / w->step_s);
        printf(" %6.1f%% |\n", 100 * w->other / w->step_s);
    }
    printf("\nother processes on the machine during the run: %.2f cores on average%s\n",
           r->foreign_cores, r->foreign_cores > 0.1 ? " (WARNING: the figures are disturbed)"
                                                    : "");
    printf("\n%-10s %9s %9s %9s %9s %10s %10s %8s %8s %9s %9s\n", "model", "tok/s", "step ms",
           "in-step", "MFLOP/tok", "GFLOP/s", "per core", "%peak1", "%peakT", "gemm GF",
           "%shapes");
    printf("%-10s %9.0f %9.1f %9.1f %9.1f %10.2f %10.2f %7.1f%% %7.1f%% %9.2f %8.1f%%\n",
           o->label, r->tok_s, r->step_wall_s * 1e3, r->step_s * 1e3, r->flops_tok * 1e-6,
           r->gflops, r->gflops_core, 100 * r->gflops_core / r->peak1.best_gflops,
           100 * r->gflops / (o->workers * r->peakT.best_gflops), r->gemm_gflops,
           100 * r->gemm_gflops / r->shapes_gflops);
    printf("(tok/s = %.0f global tokens per step / step ms, rank 0's wall time per step between "
           "its metrics lines; in-step: the workers' mean step_time_s; GFLOP/s = tok/s x model "
           "FLOPs per token; per core: over %d cores (workers x threads, at most the %d online); "
           "%%peak1: per core against sgemm's 1-thread peak, %.2f GFLOP/s; %%peakT: GFLOP/s "
           "against %d x the %d-thread peak, %.2f GFLOP/s; gemm GF: the linear ops' FLOPs / "
           "their time, over all workers; %%shapes: against sgemm at the model's GEMM shapes "
           "with %d threads, %.2f GFLOP/s)\n",
           r->global_tokens, r->cores, r->online, r->peak1.best_gflops, o->workers, o->threads,
           r->peakT.best_gflops, o->threads, r->shapes_gflops);
}

static void s_print_peaks(const s_opts_t *o, const s_result_t *r)
{
    printf("sgemm peak (square, row-major NN, best of >= 0.3 s per size):\n");
    printf("%8s %8s", "threads", "best");
    for (int s = 0; s < FLOPS_NSIZES; s++)
        printf(" %7d", flops_sizes[s]);
    printf("\n");
    const flops_peak_t *pk[2] = {&r->peak1, &r->peakT};
    for (int i = 0; i < (o->threads == 1 ? 1 : 2); i++) {
        printf("%8d %8.2f", pk[i]->threads, pk[i]->best_gflops);
        for (int s = 0; s < FLOPS_NSIZES; s++)
            printf(" %7.2f", pk[i]->gflops[s]);
        printf("   GFLOP/s\n");
    }
    printf("\nsgemm at the model's GEMM shapes, %d thread(s) (micro-batch of %d tokens per "
           "worker, %d experts held per layer of %d rows each):\n",
           o->threads, r->tokens_micro, r->experts_held, r->expert_rows);
    printf("%-14s %6s %6s %6s %3s %7s %8s\n", "op", "m", "n", "k", "tr", "calls", "GFLOP/s");
    for (int i = 0; i < r->n_shapes; i++) {
        const flops_shape_t *s = &r->shapes[i];
        printf("%-14s %6d %6d %6d  %c%c %7.0f %8.2f\n", s->what, s->m, s->n, s->k,
               s->ta ? 'T' : 'N', s->tb ? 'T' : 'N', s->calls, s->gflops);
    }
    printf("%-14s %38.2f GFLOP/s (calls x FLOPs / calls x time)\n", "mix",
           r->shapes_gflops);
}

static void s_json_peak(FILE *f, const char *key, const flops_peak_t *pk)
{
    fprintf(f, "  \"%s\": {\"threads\": %d, \"best_gflops\": %.3f, \"best_n\": %d, \"by_n\": {",
            key, pk->threads, pk->best_gflops, pk->best_n);
    for (int s = 0; s < FLOPS_NSIZES; s++)
        fprintf(f, "%s\"%d\": %.3f", s ? ", " : "", flops_sizes[s], pk->gflops[s]);
    fprintf(f, "}},\n");
}

static int s_write_json(const s_opts_t *o, const s_result_t *r)
{
    FILE *f = fopen(o->json, "w");
    if (!f) {
        perror(o->json);
        return -1;
    }
    const model_config_t *c = &r->job->model;
    fprintf(f, "{\n  \"label\": \"%s\", \"workers\": %d, \"threads\": %d, \"steps\": %d, "
               "\"warmup\": %d,\n",
            o->label, o->workers, o->threads, o->steps, o->warmup);
    fprintf(f, "  \"model\": {\"hidden\": %u, \"layers\": %u, \"heads\": %u, \"kv_heads\": %u, "
               "\"experts\": %u, \"top_k\": %u, \"intermediate\": %u, \"vocab\": %u, "
               "\"params_total\": %llu, \"params_active\": %llu},\n",
            c->hidden_size, c->num_hidden_layers, c->num_attention_heads,
            c->num_key_value_heads, c->num_local_experts, c->num_experts_per_tok,
            c->intermediate_size, c->vocab_size, (unsigned long long)model_params_total(c),
            (unsigned long long)model_params_active(c));
    fprintf(f, "  \"train\": {\"global_batch\": %u, \"micro_batch\": %u, \"seq_len\": %u},\n",
            r->job->train.global_batch, r->job->train.micro_batch, r->job->train.seq_len);
    s_json_peak(f, "sgemm_peak_1thread", &r->peak1);
    s_json_peak(f, "sgemm_peak_threads", &r->peakT);
    fprintf(f, "  \"sgemm_shapes\": {\"threads\": %d, \"gflops\": %.3f, \"tokens_micro\": %d, "
               "\"expert_rows\": %d, \"experts_held\": %d, \"shapes\": [\n",
            o->threads, r->shapes_gflops, r->tokens_micro, r->expert_rows, r->experts_held);
    for (int i = 0; i < r->n_shapes; i++) {
        const flops_shape_t *s = &r->shapes[i];
        fprintf(f, "    {\"op\": \"%s\", \"m\": %d, \"n\": %d, \"k\": %d, \"ta\": %d, \"tb\": %d, "
                   "\"calls\": %.0f, \"gflops\": %.3f}%s\n",
                s->what, s->m, s->n, s->k, s->ta, s->tb, s->calls, s->gflops,
                i + 1 < r->n_shapes ? "," : "");
    }
    fprintf(f, "  ]},\n");
    fprintf(f, "  \"foreign_cores\": %.3f,\n", r->foreign_cores);
    fprintf(f, "  \"wall_s\": %.3f, \"step_wall_s\": %.6f, \"step_s\": %.6f, "
               "\"global_tokens_per_step\": %.0f,\n"
               "  \"tokens_per_s\": %.1f, \"flops_per_token\": %.0f, \"gflops\": %.3f, "
               "\"cores\": %d, \"gflops_per_core\": %.3f, \"share_of_peak_1thread\": %.4f, "
               "\"share_of_peak_threads\": %.4f,\n  \"gemm_gflops\": %.3f, "
               "\"gemm_share_of_shapes\": %.4f,\n  \"workers_split\": [\n",
            r->wall_s, r->step_wall_s, r->step_s, r->global_tokens, r->tok_s, r->flops_tok,
            r->gflops, r->cores, r->gflops_core, r->gflops_core / r->peak1.best_gflops,
            r->gflops / (o->workers * r->peakT.best_gflops), r->gemm_gflops,
            r->gemm_gflops / r->shapes_gflops);
    for (int i = 0; i < o->workers; i++) {
        const s_worker_t *w = &r->w[i];
        fprintf(f, "    {\"rank\": %d, \"steps\": %d, \"step_s\": %.6f, \"forward_s\": %.6f, "
                   "\"backward_s\": %.6f, ",
                i, w->lines, w->step_s, w->t_fwd, w->t_bwd);
        for (int k = 0; k < K_N; k++)
            fprintf(f, "\"%s\": %.6f, ", s_short[k], w->t[k]);
        fprintf(f, "\"other\": %.6f, \"gemm_gflops\": %.3f, \"loss_last\": %.4f}%s\n", w->other,
                w->gemm_s > 0 ? w->gemm_flops / w->gemm_s * 1e-9 : 0, w->loss_last,
                i + 1 < o->workers ? "," : "");
    }
    fprintf(f, "  ]\n}\n");
    return fclose(f) ? -1 : 0;
}

/* --- the run ---------------------------------------------------------------------------------- */

/* The sgemm rates before any worker runs: 1 thread and T threads over square sizes, T threads
 * at the model's own GEMM shapes. */
static void s_measure_blas(const s_opts_t *o, s_result_t *r)
{
    const model_config_t *c = &r->job->model;
    flops_sgemm_peak(1, &r->peak1);
    r->peakT = r->peak1;
    if (o->threads != 1)
        flops_sgemm_peak(o->threads, &r->peakT);
    /* as the trainer splits the batch: every rank runs the largest slice's micro-steps */
    int gb = (int)r->job->train.global_batch, mb = (int)r->job->train.micro_batch;
    int rows = (gb + o->workers - 1) / o->workers;
    int micro_steps = (rows + mb - 1) / mb;
    int per_micro = (rows + micro_steps - 1) / micro_steps;
    int E = (int)c->num_local_experts;
    r->tokens_micro = per_micro * (int)r->job->train.seq_len;
    r->experts_held = (E + o->workers - 1) / o->workers;
    r->expert_rows = r->tokens_micro * o->workers * (int)c->num_experts_per_tok / E;
    r->n_shapes = flops_model_shapes(c, r->tokens_micro, r->experts_held, r->expert_rows,
                                     r->shapes, S_MAX_SHAPES);
    r->shapes_gflops = flops_sgemm_shapes(o->threads, r->shapes, r->n_shapes);
    openblas_set_num_threads(1);
}

static semoe_rc s_run(const s_opts_t *o, const char *dir, s_result_t *r)
{
    semoe_rc rc = SEMOE_OK;
    coordproc_t *coord = NULL;
    int pids[S_MAX_WORKERS] = {0};
    char job[PATH_MAX], log[PATH_MAX], metrics[S_MAX_WORKERS][PATH_MAX];
    snprintf(job, sizeof job, "%s/job.json", dir);
    SEMOE_CHECK(s_write_job(o, job));
    SEMOE_CHECK(model_job_load(job, &r->job));
    s_measure_blas(o, r);
    s_print_peaks(o, r);
    fflush(stdout);

    snprintf(log, sizeof log, "%s/coordinator.log", dir);
    double t0 = flops_now(), busy0, own0;
    bench_cpu(&busy0, &own0);
    SEMOE_CHECK_GOTO(coordproc_start_job(o->coord_bin, job, log, &coord), rc, out);
    for (int i = 0; i < o->workers; i++) {
        char id[32], threads[16], wlog[PATH_MAX];
        snprintf(id, sizeof id, "w%d", i);
        snprintf(threads, sizeof threads, "%d", o->threads);
        snprintf(metrics[i], sizeof metrics[i], "%s/w%d.jsonl", dir, i);
        snprintf(wlog, sizeof wlog, "%s/w%d.log", dir, i);
        unlink(metrics[i]); /* the worker appends */
        char *const argv[] = {(char *)o->worker_bin, "--coordinator",
                              (char *)coordproc_control(coord), "--id", id, "--threads", threads,
                              "--metrics-log", metrics[i], "--log-level", "warn", NULL};
        SEMOE_CHECK_GOTO(coordproc_spawn(wlog, argv, &pids[i]), rc, out);
    }
    printf("\ntraining: coordinator and %d workers started (files in %s) ...\n", o->workers,
           dir);
    fflush(stdout);
    /* The workers exit (0) on the coordinator's STOP once training is done, then it does. */
    int code = 0;
    for (int64_t end = clock_mono_ms() + (int64_t)o->timeout_s * 1000;;) {
        if (coordproc_wait_exit(coord, 500, &code))
            break;
        for (int i = 0; i < o->workers; i++) {
            int st;
            if (pids[i] <= 0 || waitpid(pids[i], &st, WNOHANG) != pids[i])
                continue;
            pids[i] = 0;
            if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                rc = semoe_err(SEMOE_EIO, "worker w%d died (status 0x%x): see %s/w%d.log", i, st,
                               dir, i);
                goto out;
            }
        }
        if (clock_mono_ms() >= end) {
            rc = semoe_err(SEMOE_ETIMEDOUT, "the coordinator did not finish %d steps in %d s "
                           "(see %s and %s/w*.log)", o->steps, o->timeout_s, log, dir);
            goto out;
        }
    }
    r->wall_s = flops_now() - t0;
    if (code != 0) {
        rc = semoe_err(SEMOE_EIO, "the coordinator exited %d (see %s)", code, log);
        goto out;
    }
    s_reap(pids, o->workers, 30000);
    double busy1, own1;
    bench_cpu(&busy1, &own1);
    r->foreign_cores = (busy1 - busy0 - (own1 - own0)) / (flops_now() - t0);

    double step_sum = 0, flops = 0, gemm_s = 0;
    r->global_tokens = 0;
    for (int i = 0; i < o->workers; i++) {
        SEMOE_CHECK_GOTO(s_read_metrics(metrics[i], o->warmup, o->steps, &r->w[i]), rc, out);
        step_sum += r->w[i].step_s;
        flops += r->w[i].gemm_flops;
        gemm_s += r->w[i].gemm_s;
        r->global_tokens += r->w[i].tokens;
    }
    r->step_s = step_sum / o->workers;
    const s_worker_t *w0 = &r->w[0];
    r->step_wall_s = w0->wall_steps > 0 ? (w0->wall_last - w0->wall_first) / w0->wall_steps
                                        : r->step_s;
    r->tok_s = r->global_tokens / r->step_wall_s;
    r->flops_tok = flops_per_token(&r->job->model, r->job->train.seq_len);
    r->gflops = r->tok_s * r->flops_tok * 1e-9;
    r->online = (int)sysconf(_SC_NPROCESSORS_ONLN);
    r->cores = o->workers * o->threads;
    if (r->online > 0 && r->cores > r->online)
        r->cores = r->online;
    r->gflops_core = r->gflops / r->cores;
    r->gemm_gflops = gemm_s > 0 ? flops / gemm_s * 1e-9 : 0;
out:
    s_reap(pids, o->workers, 0);
    coordproc_stop(&coord);
    return rc;
}

static void s_usage(FILE *f)
{
    fprintf(f,
            "usage: bench_train_workers [--job deploy/jobs/demo.json] [--hidden 512]\n"
            "                           [--intermediate F] [--heads H] [--kv-heads K]\n"
            "                           [--micro-batch M] [--global-batch G] [--seq-len T]\n"
            "                           [--workers 2] [--threads 1] [--steps 20] [--warmup 3]\n"
            "                           [--json FILE] [--dir DIR] [--label NAME]\n"
            "                           [--coordinator-bin PATH] [--worker-bin PATH]\n"
            "                           [--timeout-s 1800]\n"
            "  --job        the job spec to train (its data paths must exist)\n"
            "  --hidden     a model of this width instead of the job's: 4 layers, hidden/64 heads\n"
            "               of 64, half as many kv heads, 8 experts top-2 of --intermediate\n"
            "               (default 2 x hidden)\n"
            "  --workers    semoe-worker processes, each with --threads BLAS threads\n"
            "  --steps      train.steps; the first --warmup are not counted\n"
            "  --dir        where the job, the logs and the metrics go (default a fresh\n"
            "               /tmp/bench-train-workers-XXXXXX, removed unless the run fails)\n"
            "Binaries default to $SEMOE_BUILD/{coordinator,worker}/..., else this build tree's.\n");
}

static int s_parse(int argc, char **argv, s_opts_t *o)
{
    static const struct option opts[] = {
        {"job", required_argument, 0, 'j'},          {"hidden", required_argument, 0, 'H'},
        {"intermediate", required_argument, 0, 'F'}, {"heads", required_argument, 0, 'A'},
        {"kv-heads", required_argument, 0, 'K'},     {"micro-batch", required_argument, 0, 'm'},
        {"global-batch", required_argument, 0, 'g'}, {"seq-len", required_argument, 0, 'T'},
        {"workers", required_argument, 0, 'n'},      {"threads", required_argument, 0, 't'},
        {"steps", required_argument, 0, 's'},        {"warmup", required_argument, 0, 'w'},
        {"json", required_argument, 0, 'o'},         {"dir", required_argument, 0, 'd'},
        {"label", required_argument, 0, 'l'},        {"coordinator-bin", required_argument, 0, 'C'},
        {"worker-bin", required_argument, 0, 'W'},   {"timeout-s", required_argument, 0, 'x'},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'j': o->job = optarg; break;
        case 'H': o->hidden = atoi(optarg); break;
        case 'F': o->intermediate = atoi(optarg); break;
        case 'A': o->heads = atoi(optarg); break;
        case 'K': o->kv_heads = atoi(optarg); break;
        case 'm': o->micro_batch = atoi(optarg); break;
        case 'g': o->global_batch = atoi(optarg); break;
        case 'T': o->seq_len = atoi(optarg); break;
        case 'n': o->workers = atoi(optarg); break;
        case 't': o->threads = atoi(optarg); break;
        case 's': o->steps = atoi(optarg); break;
        case 'w': o->warmup = atoi(optarg); break;
        case 'o': o->json = optarg; break;
        case 'd': o->dir = optarg; break;
        case 'l': o->label = optarg; break;
        case 'C': o->coord_bin = optarg; break;
        case 'W': o->worker_bin = optarg; break;
        case 'x': o->timeout_s = atoi(optarg); break;
        case 'h': s_usage(stdout); exit(0);
        default: s_usage(stderr); return 2;
        }
    }
    if (o->workers < 1 || o->workers > S_MAX_WORKERS || o->threads < 1 || o->steps < 2 ||
        o->warmup < 0 || o->warmup >= o->steps || o->hidden < 0 || o->intermediate < 0 ||
        o->heads < 0 || o->kv_heads < 0 || o->micro_batch < 0 || o->global_batch < 0 ||
        o->seq_len < 0 || o->timeout_s < 1) {
        fprintf(stderr, "bench_train_workers: --workers 1..%d, --threads >= 1, --steps >= 2, "
                        "0 <= --warmup < --steps, sizes >= 0, --timeout-s >= 1\n",
                S_MAX_WORKERS);
        return 2;
    }
    return 0;
}

int main(int argc, char **argv)
{
    s_opts_t o = {.job = "deploy/jobs/demo.json", .workers = 2, .threads = 1, .steps = 20,
                  .warmup = 3, .timeout_s = 1800};
    int prc = s_parse(argc, argv, &o);
    if (prc)
        return prc;
    static char coord_bin[PATH_MAX], worker_bin[PATH_MAX], label[32], dir_buf[PATH_MAX];
    if (!o.coord_bin) {
        coordproc_bin("coordinator/semoe-coordinator", coord_bin, sizeof coord_bin);
        o.coord_bin = coord_bin;
    }
    if (!o.worker_bin) {
        coordproc_bin("worker/semoe-worker", worker_bin, sizeof worker_bin);
        o.worker_bin = worker_bin;
    }
    const char *bins[2] = {o.coord_bin, o.worker_bin};
    for (int i = 0; i < 2; i++)
        if (access(bins[i], X_OK) != 0) {
            fprintf(stderr, "bench_train_workers: %s: not an executable (--coordinator-bin, "
                            "--worker-bin, or build them)\n", bins[i]);
            return 2;
        }
    if (!o.label) {
        if (o.hidden)
            snprintf(label, sizeof label, "hidden%d", o.hidden);
        else
            snprintf(label, sizeof label, "demo");
        o.label = label;
    }
    bool made_dir = !o.dir;
    if (made_dir) {
        snprintf(dir_buf, sizeof dir_buf, "/tmp/bench-train-workers-XXXXXX");
        if (!mkdtemp(dir_buf)) {
            perror("mkdtemp");
            return 1;
        }
        o.dir = dir_buf;
    } else if (mkdir(o.dir, 0755) != 0 && errno != EEXIST) {
        perror(o.dir);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    printf("OpenBLAS %s; %d workers x %d threads, %d steps (first %d not counted)\n\n",
           openblas_get_config(), o.workers, o.threads, o.steps, o.warmup);

    static s_result_t r;
    semoe_rc rc = s_run(&o, o.dir, &r);
    if (rc != SEMOE_OK) {
        fprintf(stderr, "bench_train_workers: %s (%s); files kept in %s\n", semoe_err_msg(),
                semoe_err_where(), o.dir);
        model_job_destroy(&r.job);
        return 1;
    }
    s_print(&o, &r);
    int out = 0;
    if (o.json && s_write_json(&o, &r))
        out = 1;
    if (made_dir) {
        const char *names[] = {"job.json", "coordinator.log"};
        char p[PATH_MAX + 64];
        for (int i = 0; i < 2; i++) {
            snprintf(p, sizeof p, "%s/%s", o.dir, names[i]);
            unlink(p);
        }
        for (int i = 0; i < o.workers; i++) {
            snprintf(p, sizeof p, "%s/w%d.jsonl", o.dir, i);
            unlink(p);
            snprintf(p, sizeof p, "%s/w%d.log", o.dir, i);
            unlink(p);
        }
        rmdir(o.dir);
    }
    model_job_destroy(&r.job);
    return out;
}
