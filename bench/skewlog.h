/* The workers' metrics lines as bench_skew reads them (docs/training.md "Metrics"): each
 * worker's log read as it grows, and what the lines of one step say: the load imbalance as the
 * coordinator measures it, the hot experts' share of the routed rows, the step and exchange
 * times; and a phase's figures over a range of steps of one generation. */
#ifndef SEMOE_BENCH_SKEWLOG_H
#define SEMOE_BENCH_SKEWLOG_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>

/* One metrics line, what the bench uses of it. */
typedef struct {
    uint64_t gen, step;
    int rank, world;
    double time;            /* Unix seconds the line was written (after the step) */
    double step_s, exch_s;  /* step_time_s, t_exchange */
    uint32_t *load;         /* (L * E) tokens the experts held there received; owned */
} skewlog_line_t;

/* A worker process of the bench and the lines it logged so far. */
typedef struct {
    char id[32], metrics[PATH_MAX], log[PATH_MAX];
    int pid;                /* 0: not running (exited, killed and reaped, or never started) */
    bool killed;            /* by the bench */
    double spawned;         /* Unix seconds */
    long off;               /* bytes of the metrics log read so far */
    skewlog_line_t *lines;  /* owned (skewlog_free) */
    int n, cap;
} skewlog_worker_t;

/* The workers w[0..n) of a run and the model's shape: L layers of E experts, experts 0..hot-1
 * the hot ones. */
typedef struct {
    const skewlog_worker_t *w;
    int n;
    uint32_t L, E, hot;
} skewlog_run_t;

/* What the lines of one step say (skewlog_step). */
typedef struct {
    double imbalance;       /* sum over layers of the busiest worker's tokens / of the mean */
    double hot;             /* the hot experts' share of the routed rows */
    double step_s, exch_s;  /* means over the ranks */
} skewlog_step_t;

/* A phase's figures over steps [from, to] of generation gen (skewlog_phase). */
typedef struct {
    uint64_t gen, from, to;
    int steps;               /* steps with every rank's line (imbalance counted) */
    double imb_mean, imb_min, imb_max, hot_mean;
    double wall_step_s;      /* a worker's wall time per step between its lines */
    double step_s, exch_s;   /* means over the ranks and steps of step_time_s, t_exchange */
    double tok_s;            /* tokens_per_step / wall_step_s */
} skewlog_phase_t;

/* Appends the whole lines written to w's metrics log since the last call (lines whose "load"
 * does not have le entries are skipped). */
void skewlog_read(skewlog_worker_t *w, uint32_t le);
/* Frees w's lines. */
void skewlog_free(skewlog_worker_t *w);

/* Whether every rank of generation gen logged step; then *out says what the lines say. */
bool skewlog_step(const skewlog_run_t *r, uint64_t gen, uint64_t step, skewlog_step_t *out);
/* The newest generation in any line (0: none), its first step (*first) and how many steps from
 * there every one of its ranks logged (*done). */
uint64_t skewlog_newest(const skewlog_run_t *r, uint64_t *first, uint64_t *done);
/* The figures of steps [from, to] of gen (from >= 2: the wall time per step counts from the line
 * of step from - 1); tokens_per_step gives tok_s. */
void skewlog_phase(const skewlog_run_t *r, uint64_t gen, uint64_t from, uint64_t to,
                   double tokens_per_step, skewlog_phase_t *p);

#endif
