/* The status client of the multi-process tests: asks a coordinator's status socket for its JSON,
 * waits until a reply satisfies a condition, reads the reply's fields, and checks the placement
 * and ranks it shows against the contract (docs/control-plane.md). */
#ifndef SEMOE_TEST_STATUS_CLIENT_H
#define SEMOE_TEST_STATUS_CLIENT_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>

#include "tests/proc.h"

/* Sends "status" on a fresh REQ socket to endpoint and returns the parsed reply (caller owns,
 * cJSON_Delete), or NULL when there is no reply within timeout_ms or it is not JSON
 * (test_status_error says why). Never blocks longer than about timeout_ms. */
cJSON *test_status_query(const char *endpoint, int timeout_ms);
const char *test_status_error(void);

/* Polls the status endpoint (every poll_ms) until pred(status, arg) holds or timeout_ms
 * passes. Returns the status that satisfied it (caller owns) or NULL; on a timeout prints
 * what was last seen and, if not NULL, the reason pred last wrote into why. */
typedef bool (*test_status_pred)(const cJSON *st, void *arg, char *why, size_t why_n);
cJSON *test_status_wait(const char *endpoint, test_status_pred pred, void *arg, int timeout_ms,
                        int poll_ms);
/* A test_status_pred that any reply satisfies: the socket answers. */
bool test_status_any(const cJSON *st, void *arg, char *why, size_t why_n);

/* Picks fresh ports into *pp, starts semoe-coordinator --config job on them (label
 * "coordinator", into *coord) and waits up to 15 s for its status socket to answer. Returns
 * that first reply (caller owns), or NULL when a step failed (which said why on stderr). */
cJSON *test_status_start_coordinator(const char *job, proc_ports_t *pp, proc_t **coord);

/* Fields of a status reply. Numbers read as -1 and strings as NULL when missing. */
long long test_status_num(const cJSON *obj, const char *key);
const char *test_status_str(const cJSON *obj, const char *key);
long long test_status_generation(const cJSON *st);
const char *test_status_run_id(const cJSON *st);
const char *test_status_state(const cJSON *st);     /* the job's state */
long long test_status_counter(const cJSON *st, const char *name); /* counters.name */
int test_status_num_layers(const cJSON *st);
int test_status_num_experts(const cJSON *st);        /* per layer */
/* The workers array and one worker by id (NULL if absent). */
const cJSON *test_status_workers(const cJSON *st);
int test_status_worker_count(const cJSON *st);
const cJSON *test_status_worker(const cJSON *st, const char *id);
const char *test_status_worker_id(const cJSON *w);
const char *test_status_worker_state(const cJSON *w);
long long test_status_worker_rank(const cJSON *w);
/* Copies up to n of the worker's expert ids into out; returns how many it has (-1: none). */
int test_status_worker_experts(const cJSON *w, int *out, int n);
/* Workers in state "active". */
int test_status_active_count(const cJSON *st);
/* The holder of expert id (layer * E + j) if exactly one worker holds it, else NULL. */
const char *test_status_expert_holder(const cJSON *st, int id);

/* Checks the placement against the contract: every expert 0..L*E-1 listed once, held by
 * exactly one worker, that worker listed in workers and listing the expert back; per layer
 * and over all layers max - min <= 1 expert per worker. Returns true, or false with the first
 * problem in why. */
bool test_status_placement_ok(const cJSON *st, char *why, size_t why_n);
/* Checks ranks dense 0..n-1 and, where a worker shows "batch", the contract's split of
 * global_batch by rank. */
bool test_status_ranks_ok(const cJSON *st, char *why, size_t why_n);
/* What test_status_settled waits for: exactly n workers, all active, the job running, every
 * id in ids[0..n_ids) present and `absent` (if not NULL) not, generation > min_gen, run_id
 * different from not_run_id (if not NULL), placement and ranks as the contract says. */
typedef struct {
    int n;
    const char *const *ids;
    int n_ids;
    const char *absent;
    long long min_gen;
    const char *not_run_id;
} test_status_want_t;
/* A test_status_pred over a test_status_want_t. */
bool test_status_settled(const cJSON *st, void *want, char *why, size_t why_n);

/* A one-line summary ("gen=3 state=running workers=[w1:active:r0:4e ...]") into buf. */
char *test_status_summary(const cJSON *st, char *buf, size_t n);

#endif
