/* What the multi-process training tests (test_training.c, test_elastic.c, test_skew.c) share:
 * the tiny job they train (a seeded corpus and the job spec), workers started with a metrics
 * log, reading those logs back line by line, and comparing two checkpoints' weights tensor by
 * tensor. */
#ifndef SEMOE_TESTS_TRAIN_UTIL_H
#define SEMOE_TESTS_TRAIN_UTIL_H

#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "tests/proc.h"

/* The model: small enough that a step takes a few ms on one core. The tests set global_batch ==
 * micro_batch, so any number of workers runs one global micro-batch per step and the router's
 * aux term sees the same tokens: the losses agree across worker counts. */
#define TRAIN_UTIL_LAYERS 2
#define TRAIN_UTIL_EXPERTS 8
#define TRAIN_UTIL_TOPK 2
#define TRAIN_UTIL_HIDDEN 32
#define TRAIN_UTIL_FFN 64    /* intermediate_size */
#define TRAIN_UTIL_VOCAB 256
#define TRAIN_UTIL_SEQ 32
#define TRAIN_UTIL_BATCH 8   /* global_batch and micro_batch */
#define TRAIN_UTIL_LE (TRAIN_UTIL_LAYERS * TRAIN_UTIL_EXPERTS)
/* The parts of a step's time a metrics line splits it into (train_util_line_t.split). */
#define TRAIN_UTIL_NSPLIT 8

/* The job spec's knobs the tests turn; the rest is the model above. */
typedef struct {
    uint64_t seed;
    const char *corpus;          /* data.paths[0] */
    const char *checkpoint_dir;
    int steps, eval_interval, checkpoint_interval;
    int expected_workers;
    int min_replicas;            /* elastic.min_replicas; 0: the default */
    double threshold;            /* elastic.threshold; 0: the default */
    int window, patience;        /* elastic.window, elastic.patience; 0: the defaults */
    int top_k;                   /* model.num_experts_per_tok; 0: TRAIN_UTIL_TOPK */
    bool no_aux;                 /* model.router_aux_loss_coef 0 (else the default) */
    const double *router_bias;   /* train.router_bias: TRAIN_UTIL_EXPERTS values, or NULL */
    bool freeze_router;          /* train.freeze_router */
    int heartbeat_ms, liveness;  /* cluster.*; 0: 200 ms and 5 */
    const char *collectives;     /* train.collectives, or NULL (the default, zmq) */
    bool bf16;                   /* train.precision "bf16" (GPU workers), with attention the
                                  * bf16 graph takes: 2 heads on 1 of 64 (else 4 on 2 of 8) */
    int a2a_chunks;              /* train.a2a_chunks; 0: the default */
} train_util_job_t;

/* One line of a worker's --metrics-log, as docs/training.md "Metrics" lists the fields. */
typedef struct {
    uint64_t step, generation;
    long long rank, world;
    double time;              /* Unix seconds */
    char loss[40], eval[40];  /* as printed (%.9g); eval[0] == 0: no eval_loss on this step */
    char gnorm[40];           /* grad_norm as printed */
    double lossv, evalv, gnormv;
    uint64_t rows_out, bytes_out;
    long long load[TRAIN_UTIL_LE], routed[TRAIN_UTIL_LE];
    double step_time, gemm_flops, tokens; /* NaN when missing */
    double split[TRAIN_UTIL_NSPLIT];      /* train_util_split_keys; NaN when missing or < 0 */
    int n_samples;                        /* the ids of the rank's rows (-1: no "samples") */
    uint64_t samples[TRAIN_UTIL_BATCH];
} train_util_line_t;

/* The names of split[]: t_gemm ... t_allreduce. */
extern const char *const train_util_split_keys[TRAIN_UTIL_NSPLIT];

/* One worker of a run and what it logged (line[0..n), owned; train_util_read_log fills it). */
typedef struct {
    char id[48];
    char log[PATH_MAX];
    proc_t *proc;
    int n;
    train_util_line_t *line;
} train_util_worker_t;

/* Writes a seeded English-like corpus (the test's random source) in fortune format (entries
 * separated by "%" lines), ~200 KB from a small vocabulary with a skewed word distribution. */
bool train_util_write_corpus(const char *path);
/* A run's train.seed, random and printed, and the corpus written to the test's tmp dir
 * ("corpus.txt", its path into corpus, PATH_MAX bytes). REQUIREs the corpus. */
uint64_t train_util_begin(char *corpus);
/* Writes the job spec of the model above with job's knobs to path. */
bool train_util_write_job(const char *path, const train_util_job_t *job);

/* Names w "<prefix>-w<i>-<5 random hex digits>", its metrics log <tmp>/<id>.metrics.jsonl, and
 * starts semoe-worker --threads 1 against pp's control endpoint with it (w->proc; the log
 * empty until its first step). False (said why) when it could not be started. */
bool train_util_start_worker(train_util_worker_t *w, const char *prefix, int i,
                             const proc_ports_t *pp);
/* The same on `device` (--device: "cpu", "cuda:N"). */
bool train_util_start_worker_on(train_util_worker_t *w, const char *prefix, int i,
                                const proc_ports_t *pp, const char *device);

/* Reads w's metrics log into w->line[0..w->n) (freeing what was there): every line a whole
 * metrics line of this worker, CHECKed (failures name run); it stops at the first that is not.
 * True when every line was. */
bool train_util_read_log(train_util_worker_t *w, const char *run);
/* Writes job to job_path, starts a coordinator on it (fresh ports into pp, *coord, waiting for
 * its status socket) and n workers into w[0..n) (*started counts them, also on failure). False
 * (CHECKed, naming run) when one of that failed. */
bool train_util_start_run(const char *run, const char *job_path, const train_util_job_t *job,
                          proc_ports_t *pp, proc_t **coord, train_util_worker_t *w, int n,
                          int *started);
/* The most steps and the newest generation in the whole lines of w[0..n)'s metrics logs so far
 * (a line is whole once its newline is there); read again on every call. */
void train_util_progress(const train_util_worker_t *w, int n, uint64_t *step, uint64_t *gen);
/* An uninterrupted run's logs (w[0..n), read): every worker logged steps 1..steps once, each
 * with worker 0's loss for it, to the last digit. CHECKs (naming run) and returns whether. */
bool train_util_check_uninterrupted(const char *run, const train_util_worker_t *w, int n,
                                    int steps);
/* The last of w's lines with this step, or NULL. */
const train_util_line_t *train_util_find_step(const train_util_worker_t *w, uint64_t step);
/* Frees w's lines. */
void train_util_free_log(train_util_worker_t *w);

/* "<dir>/<name>" into buf (n bytes); exits 2 when it does not fit (paths under the test's temp
 * dir always do). Returns buf. */
char *train_util_join(char *buf, size_t n, const char *dir, const char *name);
/* "<root>/step-NNNNNNNN" into buf (PATH_MAX bytes). Returns buf. */
char *train_util_step_dir(char *buf, const char *root, int step);
/* Whether p's output (stdout or stderr) contains needle. */
bool train_util_output_has(const proc_t *p, const char *needle);

/* How far two checkpoints' weights are apart. */
typedef struct {
    size_t tensors;        /* compared */
    double max_abs;        /* the largest difference of one weight */
    double rel_norm;       /* |a - b| / |a| (2-norms) over all the weights */
    double max_rel_norm;   /* the largest |a - b| / |a| of one tensor */
    char worst[96];        /* the tensor of max_rel_norm */
} train_util_weights_diff_t;

/* Compares <a_dir>/model.safetensors with <b_dir>/model.safetensors: the same tensors (names,
 * shapes) is CHECKed; then *out says how far apart their values are. False when the files
 * could not be read or differ in what they hold. */
bool train_util_compare_weights(const char *a_dir, const char *b_dir,
                                train_util_weights_diff_t *out);

#endif
