/* bench_control: load on the coordinator's control plane. Starts a real semoe-coordinator,
 * simulates N workers (DEALER sockets over several ZeroMQ contexts, driven by a few actor
 * threads), and measures coordinator CPU per heartbeat, reconfiguration time after a join, a
 * LEAVE and a death, and status-query latency. Prints a table and writes JSON. bench/README.md
 * has the numbers and the commands. */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/actor.h"
#include "actors/log.h"
#include "bench/coordproc.h"
#include "bench/simworker.h"

#define S_MAX_SIZES 16
/* The bench's model: MoE layers x experts per layer, enough that a PLAN at 1024 workers
 * carries a realistic holder table. */
#define S_LAYERS 4
#define S_EXPERTS 64

typedef struct {
    const char *coord_bin;
    int sizes[S_MAX_SIZES];
    int n_sizes;
    int contexts, threads;
    const char *json_path;
    uint32_t heartbeat_ms, liveness;
    double window_s;   /* the steady window for CPU per heartbeat */
    int queries;       /* status queries for the latency percentiles */
} s_opts_t;

typedef struct {
    double wall_ms;    /* event at the client -> last live worker received the new PLAN */
    double first_ms;   /* event at the client -> first live worker received it */
    double coord_ms;   /* the coordinator's own last_reconfig_ms */
    uint64_t generation;
} s_event_t;

typedef struct {
    int workers;
    double ramp_ms;            /* all N JOINs sent -> status running with N active */
    uint64_t ramp_generations; /* generations the ramp took */
    double window_s;
    uint64_t heartbeats;       /* received by the coordinator in the window */
    double cpu_ms;             /* coordinator CPU (all threads) in the window */
    double utime_stime_ms;     /* the same from /proc/PID/stat (10 ms ticks) */
    s_event_t join, leave, death;
    double detect_ms;          /* death: silence -> coordinator acted (wall - coord) */
    double st_p50, st_p99, st_max, st_mean;
    size_t st_bytes;
    uint64_t peak_rss_kb;
    uint64_t errors, rejoins, refused; /* at the simulated workers; all should stay 0 */
} s_result_t;

/* The simulated workers: one actor per thread, over the contexts. */
typedef struct {
    void *pipe_ctx;
    void **ctxs;
    int n_ctxs;
    actor_t **drivers;
    simworker_args_t *args;
    void ***driver_ctxs;
    int n_drivers;
} s_sim_t;

typedef struct {
    long live, marked;
    int64_t first, last;
    uint64_t gen_min, gen_max, errors, rejoins, refused;
} s_agg_t;

static void s_usage(FILE *out)
{
    fprintf(out,
            "usage: bench_control [--coordinator-bin PATH] [--workers 64,256,1024] [--contexts 8]\n"
            "                     [--threads 2] [--heartbeat-ms 1000] [--liveness 3] [--window-s 5]\n"
            "                     [--queries 1000] [--json FILE]\n"
            "Starts a semoe-coordinator per worker count, simulates the workers over DEALER\n"
            "sockets and measures CPU per heartbeat, reconfiguration time (join, LEAVE, death)\n"
            "and status latency. Default coordinator: $SEMOE_BUILD/coordinator/semoe-coordinator,\n"
            "else the one beside this build's bench/.\n");
}

static int s_parse(int argc, char **argv, s_opts_t *o, char *bin_buf, size_t bin_size)
{
    *o = (s_opts_t){.sizes = {64, 256, 1024}, .n_sizes = 3, .contexts = 8, .threads = 2,
                    .heartbeat_ms = 1000, .liveness = 3, .window_s = 5, .queries = 1000};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            s_usage(stdout);
            exit(0);
        }
        if (!v) {
            fprintf(stderr, "bench_control: %s: needs a value (or unknown flag; see --help)\n", a);
            return 2;
        }
        i++;
        if (!strcmp(a, "--coordinator-bin")) {
            o->coord_bin = v;
        } else if (!strcmp(a, "--workers")) {
            char *copy = semoe_xstrdup(v), *save = NULL;
            o->n_sizes = 0;
            for (char *t = strtok_r(copy, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
                int n = atoi(t);
                if (n < 2 || n > 60000 || o->n_sizes == S_MAX_SIZES) {
                    fprintf(stderr, "bench_control: --workers %s: want up to %d counts in "
                            "[2, 60000], e.g. 64,256,1024\n", v, S_MAX_SIZES);
                    free(copy);
                    return 2;
                }
                o->sizes[o->n_sizes++] = n;
            }
            free(copy);
        } else if (!strcmp(a, "--contexts")) {
            o->contexts = atoi(v);
        } else if (!strcmp(a, "--threads")) {
            o->threads = atoi(v);
        } else if (!strcmp(a, "--json")) {
            o->json_path = v;
        } else if (!strcmp(a, "--heartbeat-ms")) {
            o->heartbeat_ms = (uint32_t)atoi(v);
        } else if (!strcmp(a, "--liveness")) {
            o->liveness = (uint32_t)atoi(v);
        } else if (!strcmp(a, "--window-s")) {
            o->window_s = atof(v);
        } else if (!strcmp(a, "--queries")) {
            o->queries = atoi(v);
        } else {
            fprintf(stderr, "bench_control: unknown flag %s (see --help)\n", a);
            return 2;
        }
    }
    if (o->n_sizes == 0 || o->contexts < 1 || o->threads < 1 || o->heartbeat_ms < 10 ||
        o->liveness < 1 || o->window_s <= 0 || o->queries < 1) {
        fprintf(stderr, "bench_control: --contexts, --threads, --liveness, --window-s, --queries "
                        "must be positive, --heartbeat-ms at least 10\n");
        return 2;
    }
    if (!o->coord_bin) {
        coordproc_bin("coordinator/semoe-coordinator", bin_buf, bin_size);
        o->coord_bin = bin_buf;
    }
    if (access(o->coord_bin, X_OK) != 0) {
        fprintf(stderr, "bench_control: %s: not an executable (--coordinator-bin PATH, or build "
                        "it: ninja -C BUILD coordinator/semoe-coordinator)\n", o->coord_bin);
        return 2;
    }
    return 0;
}

/* Raises the open-file limit to what n workers need on both sides (the coordinator, a child,
 * inherits it): a DEALER socket costs the bench two descriptors, the coordinator one. */
static void s_raise_nofile(int n)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    rlim_t want = (rlim_t)n * 4 + 1024;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < want) {
        struct rlimit up = {want, want};
        if (setrlimit(RLIMIT_NOFILE, &up) == 0)
            return;
        fprintf(stderr, "bench_control: open files limited to %llu (< %llu for %d workers); "
                "raise the hard limit (ulimit -Hn) or run as root\n",
                (unsigned long long)rl.rlim_max, (unsigned long long)want, n);
    }
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

/* --- the simulated workers ---------------------------------------------------------------- */

static semoe_rc s_sim_start(s_sim_t *sim, const s_opts_t *o, const char *endpoint, int total)
{
    memset(sim, 0, sizeof *sim);
    sim->pipe_ctx = zmq_ctx_new();
    sim->n_ctxs = o->contexts;
    sim->n_drivers = o->threads;
    sim->ctxs = semoe_xcalloc((size_t)sim->n_ctxs, sizeof *sim->ctxs);
    int per_ctx = total / sim->n_ctxs + 64;
    for (int c = 0; c < sim->n_ctxs; c++) {
        sim->ctxs[c] = zmq_ctx_new();
        zmq_ctx_set(sim->ctxs[c], ZMQ_MAX_SOCKETS, per_ctx);
    }
    sim->drivers = semoe_xcalloc((size_t)sim->n_drivers, sizeof *sim->drivers);
    sim->args = semoe_xcalloc((size_t)sim->n_drivers, sizeof *sim->args);
    sim->driver_ctxs = semoe_xcalloc((size_t)sim->n_drivers, sizeof *sim->driver_ctxs);
    for (int t = 0; t < sim->n_drivers; t++) {
        /* Driver t takes the contexts c with c % threads == t (or shares one when fewer). */
        int n = 0;
        sim->driver_ctxs[t] = semoe_xcalloc((size_t)sim->n_ctxs + 1, sizeof(void *));
        for (int c = t; c < sim->n_ctxs; c += sim->n_drivers)
            sim->driver_ctxs[t][n++] = sim->ctxs[c];
        if (n == 0)
            sim->driver_ctxs[t][n++] = sim->ctxs[t % sim->n_ctxs];
        sim->args[t] = (simworker_args_t){.endpoint = endpoint, .ctxs = sim->driver_ctxs[t],
                                          .n_ctxs = n, .first = t, .stride = sim->n_drivers,
                                          .total = total, .n_loads = S_LAYERS * S_EXPERTS,
                                          .seed = 0x5EED0000u + (uint64_t)t};
        sim->drivers[t] = actor_new(sim->pipe_ctx, simworker_actor, &sim->args[t]);
        if (!sim->drivers[t])
            return semoe_err(SEMOE_ESYS, "simulated workers: driver %d: %s", t, semoe_err_msg());
    }
    return SEMOE_OK;
}

static void s_sim_stop(s_sim_t *sim)
{
    for (int t = 0; t < sim->n_drivers; t++)
        if (sim->drivers && sim->drivers[t])
            actor_destroy(&sim->drivers[t]);
    for (int c = 0; c < sim->n_ctxs; c++)
        zmq_ctx_term(sim->ctxs[c]);
    if (sim->pipe_ctx)
        zmq_ctx_term(sim->pipe_ctx);
    for (int t = 0; t < sim->n_drivers; t++)
        free(sim->driver_ctxs ? sim->driver_ctxs[t] : NULL);
    free(sim->driver_ctxs);
    free(sim->args);
    free(sim->drivers);
    free(sim->ctxs);
    memset(sim, 0, sizeof *sim);
}

/* One command to driver t and its reply (caller frees). */
static char *s_ask(s_sim_t *sim, int t, const char *cmd)
{
    void *pipe = actor_pipe(sim->drivers[t]);
    if (actor_send_str(pipe, cmd, 0) != SEMOE_OK)
        return NULL;
    return actor_recv_str(pipe);
}

static bool s_ask_all(s_sim_t *sim, const char *cmd)
{
    bool ok = true;
    for (int t = 0; t < sim->n_drivers; t++) {
        char *r = s_ask(sim, t, cmd);
        ok = ok && r && !strncmp(r, "OK", 2);
        free(r);
    }
    return ok;
}

/* Asks driver owner(i) to do verb to worker i; returns the client-side time of it, or 0. */
static int64_t s_do(s_sim_t *sim, const char *verb, int i)
{
    char cmd[64];
    long long t0 = 0;
    if (!strcmp(verb, "JOIN"))
        snprintf(cmd, sizeof cmd, "JOIN %d %d", i, i + 1);
    else
        snprintf(cmd, sizeof cmd, "%s %d", verb, i);
    char *r = s_ask(sim, simworker_owner(i, sim->n_drivers), cmd);
    if (!r || sscanf(r, "OK %lld", &t0) != 1)
        t0 = 0;
    free(r);
    return t0;
}

static void s_query(s_sim_t *sim, s_agg_t *a)
{
    *a = (s_agg_t){.gen_min = UINT64_MAX};
    for (int t = 0; t < sim->n_drivers; t++) {
        char *r = s_ask(sim, t, "QUERY");
        long live = 0, marked = 0;
        long long first = 0, last = 0;
        unsigned long long gmin = 0, gmax = 0, err = 0, rej = 0, ref = 0;
        if (r && sscanf(r, "%ld %ld %lld %lld %llu %llu %llu %llu %llu", &live, &marked, &first,
                        &last, &gmin, &gmax, &err, &rej, &ref) == 9) {
            a->live += live;
            a->marked += marked;
            if (first && (!a->first || first < a->first))
                a->first = first;
            if (last > a->last)
                a->last = last;
            if (live && gmin < a->gen_min)
                a->gen_min = gmin;
            if (gmax > a->gen_max)
                a->gen_max = gmax;
            a->errors += err;
            a->rejoins += rej;
            a->refused += ref;
        }
        free(r);
    }
}

/* --- measurements ------------------------------------------------------------------------ */

static void s_sleep_ms(double ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms * 1e6) % 1000000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Waits until the job runs with n active workers at a generation >= min_gen and no acks
 * pending; returns its status (caller deletes) or NULL after timeout_ms. */
static cJSON *s_wait_steady(coordproc_t *c, int n, uint64_t min_gen, int timeout_ms)
{
    int64_t end = clock_mono_ms() + timeout_ms;
    do {
        cJSON *st = coordproc_status(c, 2000, NULL, NULL);
        if (st && coordproc_steady(st, n, min_gen))
            return st;
        cJSON_Delete(st);
        if (!coordproc_alive(c))
            return NULL;
        s_sleep_ms(20);
    } while (clock_mono_ms() < end);
    return NULL;
}

/* Marks the next generation, makes the event happen to worker i, then waits until every
 * live worker (expect of them) has the new PLAN and the coordinator has its acks. */
static semoe_rc s_event(coordproc_t *c, s_sim_t *sim, const char *verb, int i, int expect,
                        int timeout_ms, s_event_t *ev)
{
    cJSON *st = coordproc_status(c, 2000, NULL, NULL);
    if (!st)
        return semoe_err(SEMOE_EIO, "%s: status before the event: no answer", verb);
    uint64_t g0 = coordproc_u64(st, "generation");
    cJSON_Delete(st);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "MARK %" PRIu64, g0 + 1);
    if (!s_ask_all(sim, cmd))
        return semoe_err(SEMOE_EIO, "%s: a driver did not take MARK", verb);
    int64_t t0 = s_do(sim, verb, i);
    if (!t0)
        return semoe_err(SEMOE_EINVAL, "%s %d: the driver refused it", verb, i);

    /* Client side first: polling the drivers costs the coordinator nothing. */
    s_agg_t a;
    int64_t end = clock_mono_ms() + timeout_ms;
    for (;;) {
        s_query(sim, &a);
        if (a.live == expect && a.marked == a.live)
            break;
        if (clock_mono_ms() > end || !coordproc_alive(c))
            return semoe_err(SEMOE_ETIMEDOUT, "%s %d: after %d ms %ld of %ld live workers have "
                             "a PLAN of generation > %" PRIu64 " (want %d live)", verb, i,
                             timeout_ms, a.marked, a.live, g0, expect);
        s_sleep_ms(1);
    }
    ev->wall_ms = (double)(a.last - t0) / 1000.0;
    ev->first_ms = (double)(a.first - t0) / 1000.0;
    st = s_wait_steady(c, expect, g0 + 1, 10000);
    if (!st)
        return semoe_err(SEMOE_ETIMEDOUT, "%s %d: the coordinator never reported the new "
                         "generation acked by %d workers", verb, i, expect);
    ev->coord_ms = coordproc_f64(st, "last_reconfig_ms");
    ev->generation = coordproc_u64(st, "generation");
    cJSON_Delete(st);
    return SEMOE_OK;
}

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static semoe_rc s_status_latency(coordproc_t *c, int queries, s_result_t *r)
{
    double *lat = semoe_xcalloc((size_t)queries, sizeof *lat);
    double sum = 0;
    for (int q = 0; q < queries; q++) {
        int64_t us = 0;
        size_t bytes = 0;
        cJSON *st = coordproc_status(c, 5000, &us, &bytes);
        if (!st) {
            free(lat);
            return semoe_err(SEMOE_ETIMEDOUT, "status query %d of %d: no answer in 5 s", q + 1,
                             queries);
        }
        cJSON_Delete(st);
        lat[q] = (double)us / 1000.0;
        sum += lat[q];
        r->st_bytes = bytes;
    }
    qsort(lat, (size_t)queries, sizeof *lat, s_cmp_double);
    r->st_p50 = lat[(queries - 1) / 2];
    r->st_p99 = lat[(size_t)((queries - 1) * 0.99)];
    r->st_max = lat[queries - 1];
    r->st_mean = sum / queries;
    free(lat);
    return SEMOE_OK;
}

/* One worker count: a fresh coordinator, the ramp, the steady window, status latency, then a
 * join, a LEAVE and a death. */
static semoe_rc s_run(const s_opts_t *o, const char *dir, int n, s_result_t *r)
{
    semoe_rc rc = SEMOE_OK;
    coordproc_t *c = NULL;
    s_sim_t sim = {0};
    cJSON *st = NULL;
    memset(r, 0, sizeof *r);
    r->workers = n;
    int round_ms = (int)o->heartbeat_ms;
    SEMOE_CHECK_GOTO(coordproc_start(o->coord_bin, dir, n, o->heartbeat_ms, o->liveness,
                                     S_LAYERS, S_EXPERTS, &c), rc, fail);
    /* Worker n is the spare that joins later. */
    SEMOE_CHECK_GOTO(s_sim_start(&sim, o, coordproc_control(c), n + 1), rc, fail);

    st = coordproc_status(c, 2000, NULL, NULL);
    uint64_t g_start = st ? coordproc_u64(st, "generation") : 0;
    cJSON_Delete(st);
    char cmd[64];
    snprintf(cmd, sizeof cmd, "JOIN 0 %d", n);
    int64_t t0 = clock_mono_us();
    if (!s_ask_all(&sim, cmd)) {
        rc = semoe_err(SEMOE_EIO, "ramp: a driver did not take JOIN");
        goto fail;
    }
    st = s_wait_steady(c, n, g_start + 1, 60000 + n * 100);
    if (!st) {
        rc = semoe_err(SEMOE_ETIMEDOUT, "ramp: %d workers never all active", n);
        goto fail;
    }
    r->ramp_ms = (double)(clock_mono_us() - t0) / 1000.0;
    r->ramp_generations = coordproc_u64(st, "generation") - g_start;
    uint64_t hb_ramp = coordproc_counter(st, "heartbeats");
    cJSON_Delete(st);
    st = NULL;

    /* Wait for a full round of heartbeats so the window sees the steady rate. */
    int64_t end = clock_mono_ms() + 3 * round_ms + 5000;
    for (;;) {
        st = coordproc_status(c, 2000, NULL, NULL);
        bool round = st && coordproc_counter(st, "heartbeats") >= hb_ramp + (uint64_t)n;
        cJSON_Delete(st);
        st = NULL;
        if (round)
            break;
        if (clock_mono_ms() > end) {
            rc = semoe_err(SEMOE_ETIMEDOUT, "no full round of %d heartbeats in %d ms", n,
                           3 * round_ms + 5000);
            goto fail;
        }
        s_sleep_ms(round_ms / 10.0);
    }

    /* (a) CPU per heartbeat over a steady window. */
    coordproc_cpu_t cpu0, cpu1;
    st = coordproc_status(c, 2000, NULL, NULL);
    coordproc_cpu(c, &cpu0);
    uint64_t hb0 = st ? coordproc_counter(st, "heartbeats") : 0;
    cJSON_Delete(st);
    int64_t w0 = clock_mono_us();
    s_sleep_ms(o->window_s * 1000);
    coordproc_cpu(c, &cpu1);
    int64_t w1 = clock_mono_us();
    st = coordproc_status(c, 2000, NULL, NULL);
    uint64_t hb1 = st ? coordproc_counter(st, "heartbeats") : 0;
    cJSON_Delete(st);
    st = NULL;
    r->window_s = (double)(w1 - w0) / 1e6;
    r->heartbeats = hb1 - hb0;
    r->cpu_ms = (double)(cpu1.task_ns - cpu0.task_ns) / 1e6;
    r->utime_stime_ms = (double)(cpu1.ticks - cpu0.ticks) * 1000.0 / (double)sysconf(_SC_CLK_TCK);

    /* (c) status latency while heartbeats flow. */
    SEMOE_CHECK_GOTO(s_status_latency(c, o->queries, r), rc, fail);

    /* (b) reconfiguration: a join (the spare), a LEAVE, a death. */
    int ev_ms = 10000 + n * 20;
    SEMOE_CHECK_GOTO(s_event(c, &sim, "JOIN", n, n + 1, ev_ms, &r->join), rc, fail);
    SEMOE_CHECK_GOTO(s_event(c, &sim, "LEAVE", n / 2, n, ev_ms, &r->leave), rc, fail);
    int death_ms = (int)(o->liveness + 2) * round_ms + ev_ms;
    SEMOE_CHECK_GOTO(s_event(c, &sim, "KILL", n / 4, n - 1, death_ms, &r->death), rc, fail);
    r->detect_ms = r->death.wall_ms - r->death.coord_ms;

    s_agg_t a;
    s_query(&sim, &a);
    r->errors = a.errors;
    r->rejoins = a.rejoins;
    r->refused = a.refused;
    r->peak_rss_kb = coordproc_peak_rss_kb(c);
fail:
    if (rc != SEMOE_OK && c)
        fprintf(stderr, "bench_control: %d workers: %s%s\n  coordinator log: %s\n", n,
                semoe_err_msg(), coordproc_alive(c) ? "" : " (the coordinator is gone)",
                coordproc_log_path(c));
    s_sim_stop(&sim);
    coordproc_stop(&c);
    return rc;
}

/* --- output ------------------------------------------------------------------------------ */

static void s_print_header(void)
{
    printf("%7s %8s %5s %9s %6s | %-21s | %-21s | %-27s | %-20s\n", "", "ramp", "gens",
           "cpu/hb", "cpu", "join ms", "leave ms", "death ms", "status ms");
    printf("%7s %8s %5s %9s %6s | %6s %6s %7s | %6s %6s %7s | %6s %6s %6s %7s | %5s %5s %8s\n",
           "workers", "ms", "", "us", "%", "first", "last", "coord", "first", "last", "coord",
           "detect", "first", "last", "coord", "p50", "p99", "KB");
}

static void s_print(const s_result_t *r)
{
    double per_hb = r->heartbeats ? r->cpu_ms * 1000.0 / (double)r->heartbeats : 0;
    printf("%7d %8.0f %5" PRIu64 " %9.1f %6.1f | %6.1f %6.1f %7.1f | %6.1f %6.1f %7.1f | %6.0f "
           "%6.1f %6.1f %7.1f | %5.2f %5.2f %8.1f\n",
           r->workers, r->ramp_ms, r->ramp_generations, per_hb,
           100.0 * r->cpu_ms / 1000.0 / r->window_s, r->join.first_ms, r->join.wall_ms,
           r->join.coord_ms, r->leave.first_ms, r->leave.wall_ms, r->leave.coord_ms,
           r->detect_ms, r->death.first_ms, r->death.wall_ms, r->death.coord_ms, r->st_p50,
           r->st_p99, (double)r->st_bytes / 1024.0);
    fflush(stdout);
}

static cJSON *s_event_json(const s_event_t *e)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "first_plan_ms", e->first_ms);
    cJSON_AddNumberToObject(j, "last_plan_ms", e->wall_ms);
    cJSON_AddNumberToObject(j, "coordinator_reconfig_ms", e->coord_ms);
    cJSON_AddNumberToObject(j, "generation", (double)e->generation);
    return j;
}

static cJSON *s_result_json(const s_result_t *r)
{
    cJSON *j = cJSON_CreateObject();
    cJSON_AddNumberToObject(j, "workers", r->workers);
    cJSON_AddNumberToObject(j, "ramp_ms", r->ramp_ms);
    cJSON_AddNumberToObject(j, "ramp_generations", (double)r->ramp_generations);
    cJSON *cpu = cJSON_AddObjectToObject(j, "cpu");
    cJSON_AddNumberToObject(cpu, "window_s", r->window_s);
    cJSON_AddNumberToObject(cpu, "heartbeats", (double)r->heartbeats);
    cJSON_AddNumberToObject(cpu, "coordinator_cpu_ms", r->cpu_ms);
    cJSON_AddNumberToObject(cpu, "utime_stime_ms", r->utime_stime_ms);
    cJSON_AddNumberToObject(cpu, "us_per_heartbeat",
                            r->heartbeats ? r->cpu_ms * 1000.0 / (double)r->heartbeats : 0);
    cJSON_AddNumberToObject(cpu, "percent_of_one_core", 100.0 * r->cpu_ms / 1000.0 / r->window_s);
    cJSON_AddItemToObject(j, "join", s_event_json(&r->join));
    cJSON_AddItemToObject(j, "leave", s_event_json(&r->leave));
    cJSON *d = s_event_json(&r->death);
    cJSON_AddNumberToObject(d, "detect_ms", r->detect_ms);
    cJSON_AddItemToObject(j, "death", d);
    cJSON *s = cJSON_AddObjectToObject(j, "status");
    cJSON_AddNumberToObject(s, "p50_ms", r->st_p50);
    cJSON_AddNumberToObject(s, "p99_ms", r->st_p99);
    cJSON_AddNumberToObject(s, "max_ms", r->st_max);
    cJSON_AddNumberToObject(s, "mean_ms", r->st_mean);
    cJSON_AddNumberToObject(s, "reply_bytes", (double)r->st_bytes);
    cJSON_AddNumberToObject(j, "coordinator_peak_rss_kb", (double)r->peak_rss_kb);
    cJSON *x = cJSON_AddObjectToObject(j, "client_anomalies");
    cJSON_AddNumberToObject(x, "errors", (double)r->errors);
    cJSON_AddNumberToObject(x, "rejoins", (double)r->rejoins);
    cJSON_AddNumberToObject(x, "refused", (double)r->refused);
    return j;
}

int main(int argc, char **argv)
{
    static char bin[PATH_MAX];
    s_opts_t o;
    int prc = s_parse(argc, argv, &o, bin, sizeof bin);
    if (prc)
        return prc;
    signal(SIGPIPE, SIG_IGN);
    int max_n = 0;
    for (int k = 0; k < o.n_sizes; k++)
        max_n = o.sizes[k] > max_n ? o.sizes[k] : max_n;
    s_raise_nofile(max_n + 1);

    char dir[] = "/tmp/bench-control-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("bench_control: mkdtemp");
        return 1;
    }
    printf("bench_control: coordinator %s, heartbeat %u ms, liveness %u, %d contexts, %d "
           "threads, %ld cpus, model %d x %d experts\n",
           o.coord_bin, o.heartbeat_ms, o.liveness, o.contexts, o.threads,
           sysconf(_SC_NPROCESSORS_ONLN), S_LAYERS, S_EXPERTS);
    printf("  first/last: event -> first/last live worker has the new PLAN (client clock); "
           "coord: the coordinator's last_reconfig_ms; detect: death wall - coord\n");
    s_print_header();

    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "bench", "control");
    cJSON_AddNumberToObject(root, "heartbeat_ms", o.heartbeat_ms);
    cJSON_AddNumberToObject(root, "liveness", o.liveness);
    cJSON_AddNumberToObject(root, "contexts", o.contexts);
    cJSON_AddNumberToObject(root, "threads", o.threads);
    cJSON_AddNumberToObject(root, "cpus", (double)sysconf(_SC_NPROCESSORS_ONLN));
    cJSON_AddNumberToObject(root, "moe_layers", S_LAYERS);
    cJSON_AddNumberToObject(root, "experts_per_layer", S_EXPERTS);
    cJSON *runs = cJSON_AddArrayToObject(root, "runs");
    int failed = 0;
    for (int k = 0; k < o.n_sizes; k++) {
        s_result_t r;
        if (s_run(&o, dir, o.sizes[k], &r) != SEMOE_OK) {
            failed++;
            continue;
        }
        s_print(&r);
        cJSON_AddItemToArray(runs, s_result_json(&r));
    }
    if (o.json_path) {
        char *text = cJSON_Print(root);
        FILE *f = fopen(o.json_path, "w");
        if (!f || fputs(text, f) < 0 || fputc('\n', f) < 0 || fclose(f) != 0) {
            fprintf(stderr, "bench_control: %s: %s\n", o.json_path, strerror(errno));
            failed++;
        }
        free(text);
    }
    cJSON_Delete(root);
    if (!failed)
        coordproc_remove_dir(dir);
    else
        fprintf(stderr, "bench_control: logs and job spec kept in %s\n", dir);
    return failed ? 1 : 0;
}
