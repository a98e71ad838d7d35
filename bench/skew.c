/* bench_skew: the SE-MoE paper's unbalanced workload on the real daemons (a semoe-coordinator
 * and N semoe-worker processes on loopback): a router that cannot rebalance itself (a job with
 * train.router_bias on a few hot experts, train.freeze_router, no aux loss) trained in one run
 * through four phases: the first PLAN's placement kept for elastic.patience steps (static), the
 * coordinator's rebalance by load and its steady state (rebalanced), a worker killed with
 * SIGKILL (time to training resumed) and a worker joining (time to its first step). Throughput,
 * load imbalance and times come from the workers' metrics lines and the coordinator's status
 * socket. A benchmark: it measures and prints, it does not pass or fail. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
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
#include "bench/skewlog.h"
#include "model/job.h"

#define S_MAX_WORKERS 64
#define S_STATUS_EVERY_MS 250

typedef struct {
    const char *job, *json, *dir, *coord_bin, *worker_bin, *cli_bin;
    int workers, threads, hidden, intermediate, layers, experts, top_k, hot;
    int gpus; /* 0: CPU workers; N: each on a GPU of its own (of cuda:0..N-1), over NCCL */
    bool bf16;      /* with gpus: train.precision bf16 (the bf16 graph, experts split) */
    int a2a_chunks; /* train.a2a_chunks */
    int seq_len, global_batch, micro_batch;
    double bias, threshold;
    int static_steps, window, warmup, settle, measure;
    int heartbeat_ms, liveness, timeout_s;
    bool faults;
} s_opts_t;

typedef struct {
    s_opts_t o;
    model_job_t *job;
    uint32_t L, E;
    coordproc_t *coord;
    skewlog_worker_t w[S_MAX_WORKERS + 1];
    int gpu[S_MAX_WORKERS + 1]; /* with --gpus: the GPU of each worker */
    int n;                   /* workers started */
    cJSON *status;           /* the last status reply */
    int64_t status_at;       /* clock_mono_ms of it */
    skewlog_phase_t st, rb;
    const cJSON *rebalance;  /* in status: the first skew rebalance */
    /* the faults */
    int victim;
    double kill_time, resumed_time, detect_time;
    uint64_t kill_gen, kill_step, resumed_step, resumed_gen;
    double death_reconfig_ms;
    int joiner;
    double join_first_time, join_reconfig_ms;
    uint64_t join_gen, join_step;
    double foreign_cores;    /* other processes' CPU over the run, in cores on average */
} s_bench_t;

static double s_wall(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* --- the job ---------------------------------------------------------------------------------- */

/* o->job (its data) with the bench's model, router and elastic settings into path. The training
 * runs until the bench stops it (train.steps 10^9), without checkpoints or evaluations. */
static semoe_rc s_write_job(const s_opts_t *o, const char *path)
{
    cJSON *root = NULL;
    SEMOE_CHECK(bench_job_read(o->job, &root));
    cJSON *m = bench_job_section(root, "model"), *t = bench_job_section(root, "train"),
          *c = bench_job_section(root, "cluster"), *e = bench_job_section(root, "elastic");
    int heads = o->hidden >= 128 ? o->hidden / 64 : 2;
    bench_job_set_num(m, "hidden_size", o->hidden);
    bench_job_set_num(m, "intermediate_size", o->intermediate);
    bench_job_set_num(m, "num_attention_heads", heads);
    bench_job_set_num(m, "num_key_value_heads", heads / 2 ? heads / 2 : 1);
    bench_job_set(m, "head_dim", cJSON_CreateNull());
    bench_job_set_num(m, "num_hidden_layers", o->layers);
    bench_job_set_num(m, "num_local_experts", o->experts);
    bench_job_set_num(m, "num_experts_per_tok", o->top_k);
    bench_job_set_num(m, "router_aux_loss_coef", 0);
    bench_job_set_num(m, "max_position_embeddings", o->seq_len > 1024 ? o->seq_len : 1024);
    bench_job_set_num(t, "seq_len", o->seq_len);
    bench_job_set_num(t, "global_batch", o->global_batch);
    bench_job_set_num(t, "micro_batch", o->micro_batch);
    bench_job_set_num(t, "steps", 1e9);
    bench_job_set_num(t, "warmup_steps", 10);
    bench_job_set(t, "schedule", cJSON_CreateString("constant"));
    bench_job_set_num(t, "eval_interval", 1e9);
    bench_job_set_num(t, "checkpoint_interval", 1e9);
    bench_job_set(t, "checkpoint_dir", cJSON_CreateString(""));
    cJSON *bias = cJSON_CreateArray();
    for (int j = 0; j < o->experts; j++)
        cJSON_AddItemToArray(bias, cJSON_CreateNumber(j < o->hot ? o->bias : 0));
    bench_job_set(t, "router_bias", bias);
    bench_job_set(t, "freeze_router", cJSON_CreateBool(1));
    bench_job_set_num(c, "expected_workers", o->workers);
    bench_job_set_num(c, "heartbeat_ms", o->heartbeat_ms);
    bench_job_set_num(c, "liveness", o->liveness);
    bench_job_set_num(e, "threshold", o->threshold);
    bench_job_set_num(e, "window", o->window);
    bench_job_set_num(e, "patience", o->static_steps);
    bench_job_set_num(e, "min_replicas", 1);
    if (o->gpus > 0)
        bench_job_set(t, "collectives", cJSON_CreateString("nccl"));
    if (o->bf16)
        bench_job_set(t, "precision", cJSON_CreateString("bf16"));
    bench_job_set_num(t, "a2a_chunks", o->a2a_chunks);
    return bench_job_write(root, path);
}

/* --- the workers ------------------------------------------------------------------------------ */

static semoe_rc s_spawn(s_bench_t *b, int i)
{
    skewlog_worker_t *w = &b->w[i];
    char threads[16];
    snprintf(w->id, sizeof w->id, "w%d", i);
    snprintf(threads, sizeof threads, "%d", b->o.threads);
    snprintf(w->metrics, sizeof w->metrics, "%s/w%d.jsonl", b->o.dir, i);
    snprintf(w->log, sizeof w->log, "%s/w%d.log", b->o.dir, i);
    unlink(w->metrics); /* the worker appends */
    char dev[24] = "cpu";
    if (b->o.gpus > 0) { /* the lowest GPU no live worker of the bench is on (a joiner after a
                          * kill takes the dead one's) */
        int g = 0;
        for (bool used = true; used && g < b->o.gpus; g += used) {
            used = false;
            for (int k = 0; k < b->n; k++)
                used |= k != i && b->w[k].pid > 0 && b->gpu[k] == g;
        }
        if (g >= b->o.gpus)
            return semoe_err(SEMOE_EINVAL, "bench_skew: no free GPU of %d for worker %d",
                             b->o.gpus, i);
        b->gpu[i] = g;
        snprintf(dev, sizeof dev, "cuda:%d", g);
    }
    char *const argv[] = {(char *)b->o.worker_bin, "--coordinator",
                          (char *)coordproc_control(b->coord), "--id", w->id, "--threads",
                          threads, "--device", dev, "--metrics-log", w->metrics, "--log-level",
                          "warn", NULL};
    w->spawned = s_wall();
    SEMOE_CHECK(coordproc_spawn(w->log, argv, &w->pid));
    if (i >= b->n)
        b->n = i + 1;
    return SEMOE_OK;
}

/* Reads every worker's new lines and, every S_STATUS_EVERY_MS, the status; fails when a worker
 * the bench did not kill exited, or the coordinator did. */
static semoe_rc s_poll(s_bench_t *b)
{
    for (int i = 0; i < b->n; i++) {
        skewlog_worker_t *w = &b->w[i];
        skewlog_read(w, b->L * b->E);
        int st;
        if (w->pid > 0 && waitpid(w->pid, &st, WNOHANG) == w->pid) {
            w->pid = 0;
            if (!w->killed)
                return semoe_err(SEMOE_EIO, "worker %s exited (status 0x%x): see %s", w->id, st,
                                 w->log);
        }
    }
    if (!coordproc_alive(b->coord))
        return semoe_err(SEMOE_EIO, "the coordinator exited: see %s", coordproc_log_path(b->coord));
    if (clock_mono_ms() - b->status_at >= S_STATUS_EVERY_MS) {
        cJSON *st = coordproc_status(b->coord, 2000, NULL, NULL);
        if (st) {
            cJSON_Delete(b->status);
            b->status = st;
        }
        b->status_at = clock_mono_ms();
        /* a worker that cannot train the job (its data missing, ...) says so: stop waiting */
        const cJSON *ws = cJSON_GetObjectItemCaseSensitive(b->status, "workers"), *w;
        cJSON_ArrayForEach(w, ws)
        {
            const cJSON *ph = cJSON_GetObjectItemCaseSensitive(w, "phase");
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(w, "id");
            if (cJSON_IsString(ph) && strcmp(ph->valuestring, "failed") == 0)
                return semoe_err(SEMOE_EIO, "worker %s cannot train the job (phase failed): "
                                 "see its log in %s", cJSON_IsString(id) ? id->valuestring : "?",
                                 b->o.dir);
        }
    }
    return SEMOE_OK;
}

/* --- what the lines say ----------------------------------------------------------------------- */

static skewlog_run_t s_lines(const s_bench_t *b)
{
    return (skewlog_run_t){.w = b->w, .n = b->n, .L = b->L, .E = b->E, .hot = (uint32_t)b->o.hot};
}

static bool s_step(const s_bench_t *b, uint64_t gen, uint64_t step)
{
    skewlog_run_t r = s_lines(b);
    skewlog_step_t x;
    return skewlog_step(&r, gen, step, &x);
}

static uint64_t s_newest(const s_bench_t *b, uint64_t *first, uint64_t *done)
{
    skewlog_run_t r = s_lines(b);
    return skewlog_newest(&r, first, done);
}

static void s_phase(const s_bench_t *b, uint64_t gen, uint64_t from, uint64_t to,
                    skewlog_phase_t *p)
{
    skewlog_run_t r = s_lines(b);
    skewlog_phase(&r, gen, from, to, (double)b->job->train.global_batch * b->job->train.seq_len,
                  p);
}

/* The first entry of the status's reconfiguration history whose why starts with prefix, or
 * contains it (anywhere) when anywhere. */
static const cJSON *s_history(const cJSON *st, const char *needle, bool anywhere)
{
    const cJSON *hist = cJSON_GetObjectItemCaseSensitive(st, "rebalances"), *e;
    cJSON_ArrayForEach(e, hist)
    {
        const cJSON *why = cJSON_GetObjectItemCaseSensitive(e, "why");
        if (cJSON_IsString(why) && (anywhere ? strstr(why->valuestring, needle) != NULL
                                             : strncmp(why->valuestring, needle,
                                                       strlen(needle)) == 0))
            return e;
    }
    return NULL;
}

/* --- the phases ------------------------------------------------------------------------------- */

/* Polls until done(b) or the deadline; fails on a timeout naming what. */
static semoe_rc s_until(s_bench_t *b, bool (*done)(s_bench_t *), int64_t deadline,
                        const char *what)
{
    for (;;) {
        SEMOE_CHECK(s_poll(b));
        if (done(b))
            return SEMOE_OK;
        if (clock_mono_ms() >= deadline)
            return semoe_err(SEMOE_ETIMEDOUT, "timed out waiting for %s (--timeout-s %d; files "
                             "in %s)", what, b->o.timeout_s, b->o.dir);
        bench_sleep_ms(20);
    }
}

/* A newer generation than the static one has lines: the rebalance happened. */
static bool s_rebalanced(s_bench_t *b)
{
    uint64_t first, done;
    return b->st.gen && s_newest(b, &first, &done) > b->st.gen;
}

/* The first generation has lines. */
static bool s_started(s_bench_t *b)
{
    uint64_t first, done;
    return s_newest(b, &first, &done) > 0;
}

/* The newest generation has settle + measure steps of every rank. */
static bool s_steady(s_bench_t *b)
{
    uint64_t first, done;
    s_newest(b, &first, &done);
    return done >= (uint64_t)(b->o.settle + b->o.measure);
}

/* A survivor logged a step of a generation newer than the one the victim died in. */
static bool s_resumed(s_bench_t *b)
{
    for (int i = 0; i < b->n; i++)
        for (int k = 0; i != b->victim && k < b->w[i].n; k++) {
            const skewlog_line_t *l = &b->w[i].lines[k];
            if (l->gen > b->kill_gen && (!b->resumed_time || l->time < b->resumed_time)) {
                b->resumed_time = l->time;
                b->resumed_step = l->step;
                b->resumed_gen = l->gen;
            }
        }
    return b->resumed_time > 0;
}

/* The newest generation has `settle` steps of every rank. */
static bool s_settled(s_bench_t *b)
{
    uint64_t first, done;
    s_newest(b, &first, &done);
    return done >= (uint64_t)b->o.settle;
}

static bool s_joined(s_bench_t *b)
{
    const skewlog_worker_t *w = &b->w[b->joiner];
    if (w->n == 0)
        return false;
    b->join_first_time = w->lines[0].time;
    b->join_gen = w->lines[0].gen;
    b->join_step = w->lines[0].step;
    return true;
}

static semoe_rc s_run(s_bench_t *b)
{
    const s_opts_t *o = &b->o;
    int64_t deadline = clock_mono_ms() + (int64_t)o->timeout_s * 1000;
    /* static: from the first step until the coordinator rebalances */
    SEMOE_CHECK(s_until(b, s_started, deadline, "the first step"));
    uint64_t first, done;
    b->st.gen = s_newest(b, &first, &done);
    printf("training: generation %" PRIu64 " (the first PLAN's placement) from step %" PRIu64
           "; waiting for the rebalance (elastic.patience %d steps) ...\n", b->st.gen, first,
           o->static_steps);
    fflush(stdout);
    SEMOE_CHECK(s_until(b, s_rebalanced, deadline, "a rebalance"));
    uint64_t last = first;
    while (s_step(b, b->st.gen, last + 1))
        last++;
    uint64_t from = first + (uint64_t)o->warmup;
    if (last < from + 1)
        return semoe_err(SEMOE_EINVAL, "the static placement lasted steps %" PRIu64 "..%" PRIu64
                         ": fewer than --warmup %d + 2 (raise --static-steps)", first, last,
                         o->warmup);
    s_phase(b, b->st.gen, from + 1, last, &b->st);
    /* rebalanced: the newest generation's steady state */
    SEMOE_CHECK(s_until(b, s_steady, deadline, "the rebalanced steady state"));
    uint64_t gen = s_newest(b, &first, &done);
    s_phase(b, gen, first + (uint64_t)o->settle, first + (uint64_t)(o->settle + o->measure) - 1,
            &b->rb);
    SEMOE_CHECK(s_poll(b));
    printf("rebalanced: generation %" PRIu64 " from step %" PRIu64 " (%.2f -> %.2f)\n", gen,
           first, b->st.imb_mean, b->rb.imb_mean);
    fflush(stdout);
    if (!o->faults || o->workers < 2)
        return SEMOE_OK;

    /* a death: kill -9 of the last worker, to the survivors' first step of a new generation */
    b->victim = b->n - 1;
    b->kill_gen = s_newest(b, &first, &done);
    b->kill_step = first + done - 1;
    skewlog_worker_t *v = &b->w[b->victim];
    v->killed = true;
    b->kill_time = s_wall();
    kill(v->pid, SIGKILL);
    waitpid(v->pid, NULL, 0);
    v->pid = 0;
    SEMOE_CHECK(s_until(b, s_resumed, deadline, "training to resume after the kill"));
    printf("death: %s killed after step %" PRIu64 "; training resumed %.2f s later at step "
           "%" PRIu64 " (generation %" PRIu64 ")\n", v->id, b->kill_step,
           b->resumed_time - b->kill_time, b->resumed_step, b->resumed_gen);
    fflush(stdout);

    /* a join, once the survivors are steady: to the joiner's first step */
    SEMOE_CHECK(s_until(b, s_settled, deadline, "the survivors' steady state"));
    b->joiner = b->n;
    SEMOE_CHECK(s_spawn(b, b->joiner));
    SEMOE_CHECK(s_until(b, s_joined, deadline, "the joiner's first step"));
    printf("join: %s started; its first step (%" PRIu64 ", generation %" PRIu64 ") %.2f s "
           "later\n", b->w[b->joiner].id, b->join_step, b->join_gen,
           b->join_first_time - b->w[b->joiner].spawned);
    /* the coordinator's side of both, from its history (a generation is noted once done) */
    for (int64_t end = clock_mono_ms() + 5000; clock_mono_ms() < end;) {
        b->status_at = 0;
        SEMOE_CHECK(s_poll(b));
        char want[64];
        snprintf(want, sizeof want, "join %s", b->w[b->joiner].id);
        if (b->status && s_history(b->status, want, true))
            break;
        bench_sleep_ms(50);
    }
    return SEMOE_OK;
}

/* Stops the job: `semoe stop` (every worker exits 0, then the coordinator), else SIGTERM; then
 * reaps what is left, SIGKILL after a bound. */
static void s_stop(s_bench_t *b)
{
    if (b->coord && coordproc_alive(b->coord) && access(b->o.cli_bin, X_OK) == 0) {
        char log[PATH_MAX];
        snprintf(log, sizeof log, "%s/stop.log", b->o.dir);
        char *const argv[] = {(char *)b->o.cli_bin, "stop", "--endpoint",
                              (char *)coordproc_control(b->coord), NULL};
        int pid = 0, code = 0;
        if (coordproc_spawn(log, argv, &pid) == SEMOE_OK)
            waitpid(pid, NULL, 0);
        coordproc_wait_exit(b->coord, 30000, &code);
    }
    for (int pass = 0; pass < 3; pass++) {
        int64_t end = clock_mono_ms() + (pass == 0 ? 15000 : 5000);
        for (;;) {
            int left = 0;
            for (int i = 0; i < b->n; i++) {
                if (b->w[i].pid > 0 && waitpid(b->w[i].pid, NULL, WNOHANG) == b->w[i].pid)
                    b->w[i].pid = 0;
                left += b->w[i].pid > 0;
            }
            if (!left || clock_mono_ms() >= end)
                break;
            bench_sleep_ms(20);
        }
        for (int i = 0; i < b->n; i++)
            if (b->w[i].pid > 0)
                kill(b->w[i].pid, pass == 0 ? SIGTERM : SIGKILL);
    }
    coordproc_stop(&b->coord);
}

/* --- output ----------------------------------------------------------------------------------- */

/* Fills the fault figures the status history knows. */
static void s_history_figures(s_bench_t *b)
{
    b->rebalance = b->status ? s_history(b->status, "skew ", false) : NULL;
    b->detect_time = NAN;
    b->death_reconfig_ms = b->join_reconfig_ms = NAN;
    if (!b->status || !b->kill_time)
        return;
    char want[64];
    snprintf(want, sizeof want, "death %s", b->w[b->victim].id);
    const cJSON *d = s_history(b->status, want, true);
    if (d) {
        b->detect_time = bench_num(d, "time", NAN);
        b->death_reconfig_ms = bench_num(d, "duration_ms", NAN);
    }
    snprintf(want, sizeof want, "join %s", b->w[b->joiner].id);
    const cJSON *j = s_history(b->status, want, true);
    if (j)
        b->join_reconfig_ms = bench_num(j, "duration_ms", NAN);
}

static void s_print_phase(const char *name, const skewlog_phase_t *p)
{
    printf("%-11s %4" PRIu64 " %5" PRIu64 "..%-5" PRIu64 " %6.3f %6.3f %6.3f %6.3f %9.1f %9.1f "
           "%6.1f%% %9.0f\n", name, p->gen, p->from, p->to, p->imb_mean, p->imb_min, p->imb_max,
           p->hot_mean, p->wall_step_s * 1e3, p->step_s * 1e3,
           p->step_s > 0 ? 100 * p->exch_s / p->step_s : 0, p->tok_s);
}

static void s_print(const s_bench_t *b)
{
    const s_opts_t *o = &b->o;
    const model_config_t *c = &b->job->model;
    printf("\nskew: hidden %u, layers %u, experts %u (top-%u) of intermediate %u; batch %u x %u "
           "tokens (micro %u); %d workers x %d threads%s; %s, %s, a2a_chunks %u; router_bias %g "
           "on experts 0..%d, frozen router, no aux loss; elastic threshold %g, window %d, "
           "patience %d\n\n",
           c->hidden_size, c->num_hidden_layers, c->num_local_experts, c->num_experts_per_tok,
           c->intermediate_size, b->job->train.global_batch, b->job->train.seq_len,
           b->job->train.micro_batch, o->workers, o->threads, o->gpus ? " (each on a GPU)" : "",
           b->job->train.precision, b->job->train.collectives, b->job->train.a2a_chunks, o->bias,
           o->hot - 1, o->threshold, o->window, o->static_steps);
    printf("other processes on the machine during the run: %.2f cores on average%s\n\n",
           b->foreign_cores, b->foreign_cores > 0.1 ? " (WARNING: the times are disturbed)"
                                                    : "");
    printf("%-11s %4s %12s %6s %6s %6s %6s %9s %9s %7s %9s\n", "phase", "gen", "steps",
           "imb", "min", "max", "hot", "wall ms", "in-step", "exch", "tok/s");
    s_print_phase("static", &b->st);
    s_print_phase("rebalanced", &b->rb);
    printf("(imb: per step, sum over layers of the busiest worker's tokens / sum over layers of "
           "the mean, as the coordinator measures it, from the workers' \"load\"; hot: the hot "
           "experts' share of the routed rows; wall ms: a worker's time per step between its "
           "metrics lines; in-step: the mean step_time_s; exch: the expert exchange's share of "
           "it, mostly waiting for the busiest worker)\n");
    printf("\nthroughput rebalanced / static: %.2fx; imbalance %.2f -> %.2f\n",
           b->rb.tok_s / b->st.tok_s, b->st.imb_mean, b->rb.imb_mean);
    if (b->rebalance)
        printf("rebalance: \"%s\" at step %.0f, predicted %.2f -> %.2f, %.0f copies moved, "
               "%.0f ms from the decision to the last ACK\n",
               cJSON_GetObjectItemCaseSensitive(b->rebalance, "why")->valuestring,
               bench_num(b->rebalance, "at_step", NAN), bench_num(b->rebalance, "before", NAN),
               bench_num(b->rebalance, "after", NAN), bench_num(b->rebalance, "moved", NAN),
               bench_num(b->rebalance, "duration_ms", NAN));
    if (b->kill_time) {
        printf("death: kill -9 of %s after step %" PRIu64 ": the coordinator noticed it %.2f s "
               "later (heartbeat %d ms x liveness %d), replanned in %.0f ms; training resumed "
               "%.2f s after the kill at step %" PRIu64 "%s\n", b->w[b->victim].id,
               b->kill_step, b->detect_time - b->kill_time, o->heartbeat_ms, o->liveness,
               b->death_reconfig_ms, b->resumed_time - b->kill_time, b->resumed_step,
               b->resumed_step <= b->kill_step ? " (a rewind: some expert had no live replica "
                                                 "and the job keeps no checkpoints)" : "");
        printf("join: %s's first step %.2f s after it was started (the coordinator's "
               "reconfiguration %.0f ms)\n", b->w[b->joiner].id,
               b->join_first_time - b->w[b->joiner].spawned, b->join_reconfig_ms);
    }
}

static void s_json_phase(FILE *f, const char *key, const skewlog_phase_t *p)
{
    fprintf(f, "  \"%s\": {\"generation\": %" PRIu64 ", \"from_step\": %" PRIu64 ", \"to_step\": "
               "%" PRIu64 ", \"steps\": %d, \"imbalance\": %.4f, \"imbalance_min\": %.4f, "
               "\"imbalance_max\": %.4f, \"hot_share\": %.4f, \"wall_step_s\": %.6f, "
               "\"step_s\": %.6f, \"exchange_s\": %.6f, \"tokens_per_s\": %.1f},\n",
            key, p->gen, p->from, p->to, p->steps, p->imb_mean, p->imb_min, p->imb_max,
            p->hot_mean, p->wall_step_s, p->step_s, p->exch_s, p->tok_s);
}

/* A number or null. */
static void s_jnum(FILE *f, const char *key, double v, const char *sep)
{
    if (isfinite(v))
        fprintf(f, "\"%s\": %.4f%s", key, v, sep);
    else
        fprintf(f, "\"%s\": null%s", key, sep);
}

static int s_write_json(const s_bench_t *b)
{
    const s_opts_t *o = &b->o;
    FILE *f = fopen(o->json, "w");
    if (!f) {
        perror(o->json);
        return -1;
    }
    const model_config_t *c = &b->job->model;
    fprintf(f, "{\n  \"workers\": %d, \"threads\": %d, \"foreign_cores\": %.3f,\n",
            o->workers, o->threads, b->foreign_cores);
    fprintf(f, "  \"model\": {\"hidden\": %u, \"layers\": %u, \"experts\": %u, \"top_k\": %u, "
               "\"intermediate\": %u},\n", c->hidden_size, c->num_hidden_layers,
            c->num_local_experts, c->num_experts_per_tok, c->intermediate_size);
    fprintf(f, "  \"train\": {\"global_batch\": %u, \"micro_batch\": %u, \"seq_len\": %u, "
               "\"precision\": \"%s\", \"collectives\": \"%s\", \"a2a_chunks\": %u, \"gpus\": %d},\n",
            b->job->train.global_batch, b->job->train.micro_batch, b->job->train.seq_len,
            b->job->train.precision, b->job->train.collectives, b->job->train.a2a_chunks,
            o->gpus);
    fprintf(f, "  \"skew\": {\"hot_experts\": %d, \"bias\": %g, \"threshold\": %g, \"window\": "
               "%d, \"patience\": %d},\n", o->hot, o->bias, o->threshold, o->window,
            o->static_steps);
    s_json_phase(f, "static", &b->st);
    s_json_phase(f, "rebalanced", &b->rb);
    fprintf(f, "  ");
    s_jnum(f, "throughput_ratio", b->rb.tok_s / b->st.tok_s, ",\n");
    fprintf(f, "  \"rebalance\": {");
    if (b->rebalance) {
        s_jnum(f, "at_step", bench_num(b->rebalance, "at_step", NAN), ", ");
        s_jnum(f, "predicted_before", bench_num(b->rebalance, "before", NAN), ", ");
        s_jnum(f, "predicted_after", bench_num(b->rebalance, "after", NAN), ", ");
        s_jnum(f, "moved", bench_num(b->rebalance, "moved", NAN), ", ");
        s_jnum(f, "duration_ms", bench_num(b->rebalance, "duration_ms", NAN), "");
    }
    fprintf(f, "},\n  \"death\": ");
    if (b->kill_time) {
        fprintf(f, "{\"victim\": \"%s\", \"after_step\": %" PRIu64 ", ", b->w[b->victim].id,
                b->kill_step);
        s_jnum(f, "detect_s", b->detect_time - b->kill_time, ", ");
        s_jnum(f, "reconfig_ms", b->death_reconfig_ms, ", ");
        s_jnum(f, "resumed_s", b->resumed_time - b->kill_time, ", ");
        fprintf(f, "\"resumed_step\": %" PRIu64 "},\n  \"join\": {\"worker\": \"%s\", ",
                b->resumed_step, b->w[b->joiner].id);
        s_jnum(f, "first_step_s", b->join_first_time - b->w[b->joiner].spawned, ", ");
        s_jnum(f, "reconfig_ms", b->join_reconfig_ms, ", ");
        fprintf(f, "\"first_step\": %" PRIu64 "}\n", b->join_step);
    } else {
        fprintf(f, "null,\n  \"join\": null\n");
    }
    fprintf(f, "}\n");
    return fclose(f) ? -1 : 0;
}

/* --- options ---------------------------------------------------------------------------------- */

static void s_usage(FILE *f)
{
    fprintf(f,
            "usage: bench_skew [--workers 2] [--threads 1] [--gpus N] [--bf16]\n"
            "                  [--a2a-chunks 1] [--hidden 256] [--intermediate F]\n"
            "                  [--layers 4] [--experts 16] [--top-k 2] [--hot 2] [--bias B]\n"
            "                  [--seq-len 128] [--global-batch G] [--micro-batch 8]\n"
            "                  [--static-steps 10] [--window 4] [--threshold 1.3]\n"
            "                  [--warmup 2] [--settle 2] [--measure 8] [--no-faults]\n"
            "                  [--heartbeat-ms 200] [--liveness 5] [--job deploy/jobs/demo.json]\n"
            "                  [--json FILE] [--dir DIR] [--coordinator-bin PATH]\n"
            "                  [--worker-bin PATH] [--cli-bin PATH] [--timeout-s 3600]\n"
            "  --hot, --bias   train.router_bias: B on experts 0..hot-1, 0 on the others (default\n"
            "                  B = 2.5 x 0.02 x sqrt(hidden), 2.5 times the logits' spread at\n"
            "                  init)\n"
            "  --global-batch  default 8 x workers; --intermediate default 2 x hidden\n"
            "  --bf16          with --gpus: train.precision bf16 (--hidden a multiple of 64,\n"
            "                  at least 128: heads of 64); --a2a-chunks: train.a2a_chunks\n"
            "  --static-steps  elastic.patience: the steps above the threshold, under the first\n"
            "                  PLAN's placement, before the coordinator rebalances\n"
            "  --warmup        static steps not counted; --settle: steps of the rebalanced\n"
            "                  generation not counted; --measure: steps counted after them\n"
            "  --no-faults     stop after the rebalanced phase (no kill -9, no join)\n"
            "  --job           the data (and defaults) of the job; model, train, cluster and\n"
            "                  elastic are the bench's\n"
            "Binaries default to $SEMOE_BUILD/..., else this build tree's.\n");
}

static int s_parse(int argc, char **argv, s_opts_t *o)
{
    static const struct option opts[] = {
        {"workers", required_argument, 0, 'n'},      {"threads", required_argument, 0, 't'},
        {"gpus", required_argument, 0, 'G'},         {"bf16", no_argument, 0, 'f' + 256},
        {"a2a-chunks", required_argument, 0, 'c' + 256},
        {"hidden", required_argument, 0, 'H'},       {"intermediate", required_argument, 0, 'F'},
        {"layers", required_argument, 0, 'L'},       {"experts", required_argument, 0, 'E'},
        {"top-k", required_argument, 0, 'k'},        {"hot", required_argument, 0, 'h' + 256},
        {"bias", required_argument, 0, 'b'},         {"seq-len", required_argument, 0, 'T'},
        {"global-batch", required_argument, 0, 'g'}, {"micro-batch", required_argument, 0, 'm'},
        {"static-steps", required_argument, 0, 'p'}, {"window", required_argument, 0, 'w' + 256},
        {"threshold", required_argument, 0, 'r'},    {"warmup", required_argument, 0, 'u'},
        {"settle", required_argument, 0, 'S'},       {"measure", required_argument, 0, 'M'},
        {"no-faults", no_argument, 0, 'N'},          {"heartbeat-ms", required_argument, 0, 'B'},
        {"liveness", required_argument, 0, 'V'},     {"job", required_argument, 0, 'j'},
        {"json", required_argument, 0, 'o'},         {"dir", required_argument, 0, 'd'},
        {"coordinator-bin", required_argument, 0, 'C'},
        {"worker-bin", required_argument, 0, 'W'},   {"cli-bin", required_argument, 0, 'I'},
        {"timeout-s", required_argument, 0, 'x'},    {"help", no_argument, 0, '?' + 256},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 'n': o->workers = atoi(optarg); break;
        case 'G': o->gpus = atoi(optarg); break;
        case 'f' + 256: o->bf16 = true; break;
        case 'c' + 256: o->a2a_chunks = atoi(optarg); break;
        case 't': o->threads = atoi(optarg); break;
        case 'H': o->hidden = atoi(optarg); break;
        case 'F': o->intermediate = atoi(optarg); break;
        case 'L': o->layers = atoi(optarg); break;
        case 'E': o->experts = atoi(optarg); break;
        case 'k': o->top_k = atoi(optarg); break;
        case 'h' + 256: o->hot = atoi(optarg); break;
        case 'b': o->bias = atof(optarg); break;
        case 'T': o->seq_len = atoi(optarg); break;
        case 'g': o->global_batch = atoi(optarg); break;
        case 'm': o->micro_batch = atoi(optarg); break;
        case 'p': o->static_steps = atoi(optarg); break;
        case 'w' + 256: o->window = atoi(optarg); break;
        case 'r': o->threshold = atof(optarg); break;
        case 'u': o->warmup = atoi(optarg); break;
        case 'S': o->settle = atoi(optarg); break;
        case 'M': o->measure = atoi(optarg); break;
        case 'N': o->faults = false; break;
        case 'B': o->heartbeat_ms = atoi(optarg); break;
        case 'V': o->liveness = atoi(optarg); break;
        case 'j': o->job = optarg; break;
        case 'o': o->json = optarg; break;
        case 'd': o->dir = optarg; break;
        case 'C': o->coord_bin = optarg; break;
        case 'W': o->worker_bin = optarg; break;
        case 'I': o->cli_bin = optarg; break;
        case 'x': o->timeout_s = atoi(optarg); break;
        case '?' + 256: s_usage(stdout); exit(0);
        default: s_usage(stderr); return 2;
        }
    }
    if (!o->intermediate)
        o->intermediate = 2 * o->hidden;
    if (!o->global_batch)
        o->global_batch = 8 * o->workers;
    if (isnan(o->bias))
        o->bias = 2.5 * 0.02 * sqrt((double)o->hidden);
    if (o->workers < 1 || o->workers > S_MAX_WORKERS || o->threads < 1 || o->hidden < 1 ||
        o->gpus < 0 || (o->gpus > 0 && o->gpus < o->workers) ||
        o->layers < 1 || o->experts < 2 || o->top_k < 1 || o->top_k > o->experts ||
        o->hot < 1 || o->hot >= o->experts || o->seq_len < 1 || o->micro_batch < 1 ||
        o->global_batch < o->workers || o->static_steps < 1 || o->window < 1 ||
        o->threshold < 1 || o->warmup < 0 || o->settle < 1 || o->measure < 1 ||
        o->heartbeat_ms < 10 || o->liveness < 1 || o->timeout_s < 1 || !isfinite(o->bias) ||
        (o->bf16 && (o->gpus < 1 || o->hidden < 128 || o->hidden % 64)) ||
        o->a2a_chunks < 1 || o->a2a_chunks > 16) {
        fprintf(stderr, "bench_skew: --workers 1..%d, --threads, --hidden, --layers >= 1, "
                        "--experts >= 2, 1 <= --top-k <= experts, 1 <= --hot < experts, "
                        "--global-batch >= workers, --static-steps, --window, --settle, "
                        "--measure >= 1, --threshold >= 1, --heartbeat-ms >= 10, --gpus 0 "
                        "(CPU workers) or at least --workers, --bf16 with --gpus and --hidden "
                        "a multiple of 64 >= 128, --a2a-chunks 1..16\n",
                S_MAX_WORKERS);
        return 2;
    }
    return 0;
}

int main(int argc, char **argv)
{
    static s_bench_t b;
    s_opts_t *o = &b.o;
    *o = (s_opts_t){.job = "deploy/jobs/demo.json", .workers = 2, .threads = 1, .hidden = 256,
                    .layers = 4, .experts = 16, .top_k = 2, .hot = 2, .seq_len = 128,
                    .micro_batch = 8, .bias = NAN, .threshold = 1.3, .static_steps = 10,
                    .window = 4, .warmup = 2, .settle = 2, .measure = 8, .heartbeat_ms = 200,
                    .liveness = 5, .timeout_s = 3600, .faults = true, .a2a_chunks = 1};
    int prc = s_parse(argc, argv, o);
    if (prc)
        return prc;
    static char bins[3][PATH_MAX], dir_buf[PATH_MAX];
    const char *rel[3] = {"coordinator/semoe-coordinator", "worker/semoe-worker", "cli/semoe"};
    const char **bin[3] = {&o->coord_bin, &o->worker_bin, &o->cli_bin};
    for (int i = 0; i < 3; i++) {
        if (!*bin[i]) {
            coordproc_bin(rel[i], bins[i], sizeof bins[i]);
            *bin[i] = bins[i];
        }
        if (i < 2 && access(*bin[i], X_OK) != 0) {
            fprintf(stderr, "bench_skew: %s: not an executable (--coordinator-bin, "
                            "--worker-bin, or build them)\n", *bin[i]);
            return 2;
        }
    }
    bool made_dir = !o->dir;
    if (made_dir) {
        snprintf(dir_buf, sizeof dir_buf, "/tmp/bench-skew-XXXXXX");
        if (!mkdtemp(dir_buf)) {
            perror("mkdtemp");
            return 1;
        }
        o->dir = dir_buf;
    } else if (mkdir(o->dir, 0755) != 0 && errno != EEXIST) {
        perror(o->dir);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);

    char job[PATH_MAX], log[PATH_MAX];
    snprintf(job, sizeof job, "%s/job.json", o->dir);
    snprintf(log, sizeof log, "%s/coordinator.log", o->dir);
    semoe_rc rc = s_write_job(o, job);
    if (rc == SEMOE_OK)
        rc = model_job_load(job, &b.job);
    if (rc == SEMOE_OK) {
        b.L = b.job->model.num_hidden_layers;
        b.E = b.job->model.num_local_experts;
        rc = coordproc_start_job(o->coord_bin, job, log, &b.coord);
    }
    for (int i = 0; rc == SEMOE_OK && i < o->workers; i++)
        rc = s_spawn(&b, i);
    double busy0, own0, busy1, own1, t0 = s_wall();
    bench_cpu(&busy0, &own0);
    if (rc == SEMOE_OK) {
        printf("bench_skew: coordinator and %d workers started (files in %s)\n", o->workers,
               o->dir);
        fflush(stdout);
        rc = s_run(&b);
    }
    if (rc != SEMOE_OK)
        fprintf(stderr, "bench_skew: %s (%s); files kept in %s\n", semoe_err_msg(),
                semoe_err_where(), o->dir);
    s_stop(&b);
    bench_cpu(&busy1, &own1);
    b.foreign_cores = (busy1 - busy0 - (own1 - own0)) / (s_wall() - t0);
    int out = rc == SEMOE_OK ? 0 : 1;
    if (rc == SEMOE_OK) {
        s_history_figures(&b);
        s_print(&b);
        if (o->json && s_write_json(&b))
            out = 1;
    }
    if (rc == SEMOE_OK && made_dir) {
        char p[PATH_MAX + 64];
        const char *names[] = {"job.json", "coordinator.log", "stop.log"};
        for (int i = 0; i < 3; i++) {
            snprintf(p, sizeof p, "%s/%s", o->dir, names[i]);
            unlink(p);
        }
        for (int i = 0; i < b.n; i++) {
            unlink(b.w[i].metrics);
            unlink(b.w[i].log);
        }
        rmdir(o->dir);
    }
    for (int i = 0; i < b.n; i++)
        skewlog_free(&b.w[i]);
    cJSON_Delete(b.status);
    model_job_destroy(&b.job);
    return out;
}
