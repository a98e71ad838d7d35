/* The coordinator server: one single-threaded libuv loop with the control socket (workers and
 * admins), the status socket, /metrics, heartbeats and the membership table; every membership
 * change, or burst of them, and every rebalance on load skew opens a generation (the first once
 * cluster.expected_workers have joined; while training runs, after pausing the workers) and
 * resumes the workers once they acked its PLAN (reconfig.h); the job stops once every worker
 * finished. */
#ifndef SEMOE_COORDINATOR_COORD_H
#define SEMOE_COORDINATOR_COORD_H

#include "actors/err.h"
#include "model/job.h"

#define COORD_DEFAULT_CONTROL "tcp://127.0.0.1:5555"
#define COORD_DEFAULT_STATUS "tcp://127.0.0.1:5556"
#define COORD_DEFAULT_METRICS "127.0.0.1:5557"

typedef struct {
    const char *control; /* ZeroMQ endpoint the control ROUTER binds */
    const char *status;  /* ZeroMQ endpoint the status socket binds (REQ clients) */
    const char *metrics; /* HTTP "HOST:PORT", or "none" for no metrics listener */
    const char *metrics_log; /* a file to append a JSON line to per step advance, or NULL */
    const char *state_dir;   /* where the state that survives a restart lives (state.h), or
                                NULL: none */
} coord_opts_t;

typedef struct coord coord_t;

/* Binds every endpoint, opens the metrics log and takes *job (nulled, even on failure), its data
 * paths made absolute; *self_p gets the coordinator, the caller's (coord_destroy). With
 * opts->state_dir it takes up the state saved there, if any (the run, its members, its
 * placement: docs/control-plane.md, "Coordinator restart"); *job may then be NULL (the saved
 * job is taken), and must otherwise be the saved one. Fails with SEMOE_EINVAL for an endpoint,
 * log file, job or state directory the coordinator cannot use (the message names the flag,
 * field or file; a state file is left as it is), SEMOE_EIO when an endpoint cannot be bound (in
 * use, say). */
semoe_rc coord_new(const coord_opts_t *opts, model_job_t **job, coord_t **self_p);

/* Serves until a STOP has been carried out (every worker gone, or a bounded wait ran out; the
 * STOP of an admin, or the coordinator's own once every worker finished train.steps) or
 * SIGTERM/SIGINT arrives, then saves the state a last time (after a STOP, saying so). Returns
 * SEMOE_OK in both cases. */
semoe_rc coord_run(coord_t *self);

/* Closes sockets and handles, frees everything, nulls *self_p. */
void coord_destroy(coord_t **self_p);

#endif
