/* The coordinator's state on disk (--state-dir DIR): what a coordinator started again after a
 * crash needs to take its job up where it was (the run id, the job, the last generation issued,
 * the members and their placement, the job's step, the history of reconfigurations), in
 * DIR/state.json, JSON with a format name and a version, replaced atomically (a temporary file,
 * fsync, rename, fsync of DIR). DIR/lock keeps a second coordinator off the directory.
 * docs/control-plane.md, "Coordinator restart". */
#ifndef SEMOE_COORDINATOR_STATE_H
#define SEMOE_COORDINATOR_STATE_H

#include <stdbool.h>
#include <stdint.h>

#include "actors/err.h"
#include "coordinator/members.h"
#include "coordinator/status.h"

#define STATE_FILE "state.json"
#define STATE_FORMAT "semoe-coordinator-state"
#define STATE_VERSION 1

/* One snapshot of what survives a restart. For state_store_save everything is borrowed from the
 * coordinator; state_store_load allocates it all (state_destroy). */
typedef struct {
    uint64_t run_id;             /* nonzero; workers see it in every header */
    const char *job;             /* the job as WELCOME carries it (model_job_to_json) */
    bool started;                /* cluster.expected_workers were members once */
    bool stopped;                /* a STOP was carried out (or training finished) */
    uint64_t step;               /* the most steps a worker reported done */
    bool training;               /* a worker reported training or a step done */
    uint64_t generation;         /* the last generation issued: the next must be larger */
    uint64_t plan_step;          /* its PLAN's step */
    double last_reconfig_ms;     /* < 0: none */
    status_counters_t counters;  /* joins, leaves, deaths, generations, restarts (heartbeats and
                                    protocol_errors are each process's own) */
    uint64_t by_kind[STATUS_WHY_KINDS]; /* reconfigurations done, by kind */
    const status_rebalance_t *rebalances; /* the history, oldest first */
    uint32_t n_rebalances;       /* at most RECONFIG_HISTORY */
    uint64_t n_total;            /* the job's L x E */
    const double *load;          /* (n_total) the smoothed loads, or NULL while unknown */
    /* the placement of the last generation (plan_world, plan_offsets, plan_holders): expert e
     * on ranks holders[holder_offsets[e] .. holder_offsets[e + 1]); world 0: none (NULLs) */
    uint32_t world;
    const uint32_t *holder_offsets; /* (n_total + 1) */
    const uint32_t *holders;
    /* in join order: the capabilities of their JOIN, placed and rank (a rank of the placement;
     * ranks whose member has gone since are missing), acked_gen and leaving; experts are the
     * placement's. For load: members without a routing id (members_add_unbound). */
    members_t *members;
} state_t;

typedef struct state_store state_store_t;

/* Opens DIR (created when missing, its parent must exist) and locks DIR/lock, so that one
 * coordinator at a time uses it. SEMOE_EINVAL, naming --state-dir, when DIR cannot be used or
 * another process holds the lock. *self_p gets the store, the caller's (state_store_close). */
semoe_rc state_store_open(const char *dir, state_store_t **self_p);
/* Unlocks and frees; nulls *self_p. */
void state_store_close(state_store_t **self_p);
/* DIR/state.json, for messages. */
const char *state_store_path(const state_store_t *self);

/* Reads DIR/state.json into *out (the caller's: state_destroy), or *out = NULL when there is
 * none (a fresh start). A file that cannot be read, does not parse, has another format or
 * version, or says something inconsistent (an expert out of range, ranks with holes, a job that
 * does not parse) is SEMOE_EINVAL with a message naming the file and what is wrong; the file is
 * left as it is. */
semoe_rc state_store_load(state_store_t *self, state_t **out);

/* Replaces DIR/state.json with st, atomically and durably. SEMOE_EIO naming the file when a
 * step fails (the old file stays whole). */
semoe_rc state_store_save(state_store_t *self, const state_t *st);

/* Whether job_json (model_job_to_json of a --config) is the job st was saved with: SEMOE_OK, or
 * SEMOE_EINVAL with a message naming the file and the first line that differs. */
semoe_rc state_check_job(const state_store_t *self, const state_t *st, const char *job_json);

/* Frees a state that state_store_load returned (its members too, unless the caller took them:
 * set st->members to NULL first); nulls *st_p. */
void state_destroy(state_t **st_p);

#endif
