/* The coordinator under benchmark: a real semoe-coordinator started on fresh loopback ports
 * with a generated job spec, a status client on one long-lived REQ socket (so a query's latency
 * is the coordinator's, not a connect's), and its CPU time and peak memory from /proc. */
#ifndef SEMOE_BENCH_COORDPROC_H
#define SEMOE_BENCH_COORDPROC_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"

typedef struct coordproc coordproc_t;

typedef struct {
    uint64_t task_ns; /* sum over the process's threads of /proc/PID/task/TID/schedstat */
    uint64_t ticks;   /* utime + stime from /proc/PID/stat, in clock ticks */
} coordproc_cpu_t;

/* Writes DIR/job-N.json (heartbeat_ms, liveness, layers x experts, a global batch of 4 per
 * worker), starts bin on three free loopback ports with its log in DIR/coordinator-N.log, and
 * waits until its status socket answers. The caller owns *self (coordproc_stop). */
semoe_rc coordproc_start(const char *bin, const char *dir, int n, uint32_t heartbeat_ms,
                         uint32_t liveness, int layers, int experts, coordproc_t **self);
/* The same with the job spec at job (the caller's, not removed) and the log at log. */
semoe_rc coordproc_start_job(const char *bin, const char *job, const char *log,
                             coordproc_t **self);
/* SIGTERM, a bounded wait, then SIGKILL; frees and nulls *self_p. */
void coordproc_stop(coordproc_t **self_p);
/* Waits up to timeout_ms for the coordinator to exit on its own (it does once training is
 * done); true with *code its exit status (128 + the signal when one killed it) when it did. */
bool coordproc_wait_exit(coordproc_t *self, int timeout_ms, int *code);

/* Any other process of a bench (the workers): fork/exec argv[0] with argv, stdout and stderr
 * to log, killed when the bench dies. *pid gets the child (the caller reaps it). */
semoe_rc coordproc_spawn(const char *log, char *const argv[], int *pid);
/* Where a binary of this build tree is: $SEMOE_BUILD/rel, else rel next to the bench's own
 * build folder (<dir of /proc/self/exe>/../rel). Writes it into out. */
void coordproc_bin(const char *rel, char *out, size_t cap);

const char *coordproc_control(const coordproc_t *self); /* "tcp://127.0.0.1:P" */
const char *coordproc_log_path(const coordproc_t *self);
bool coordproc_alive(coordproc_t *self);

/* Asks for status and parses the reply (caller owns), or NULL after timeout_ms. latency_us
 * and bytes, when not NULL, get the round trip and the reply size. */
cJSON *coordproc_status(coordproc_t *self, int timeout_ms, int64_t *latency_us, size_t *bytes);
/* Running, no acks pending, generation >= min_gen, exactly n workers, all active. */
bool coordproc_steady(const cJSON *st, int n, uint64_t min_gen);
uint64_t coordproc_u64(const cJSON *st, const char *key);
double coordproc_f64(const cJSON *st, const char *key);
uint64_t coordproc_counter(const cJSON *st, const char *name);

void coordproc_cpu(const coordproc_t *self, coordproc_cpu_t *cpu);
/* VmHWM of the coordinator, in KB (0 if unreadable). */
uint64_t coordproc_peak_rss_kb(const coordproc_t *self);

/* Removes the files this module wrote into dir, then dir if empty. */
void coordproc_remove_dir(const char *dir);

#endif
