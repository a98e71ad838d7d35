/* What the coordinator tells people: the status reply (JSON, as docs/control-plane.md shows it)
 * served on the status socket, and the counters /metrics exports, all from one view of the
 * coordinator's state that it fills in per request. */
#ifndef SEMOE_COORDINATOR_STATUS_H
#define SEMOE_COORDINATOR_STATUS_H

#include <stddef.h>
#include <stdint.h>

#include "coordinator/members.h"

typedef struct {
    uint64_t heartbeats;      /* HEARTBEATs received from members */
    uint64_t protocol_errors; /* messages refused or dropped as malformed or out of order */
    uint64_t joins, leaves, deaths;
    uint64_t generations;     /* PLANs generations opened */
    uint64_t restarts;        /* coordinators that took the job up again from --state-dir */
} status_counters_t;

/* The kinds of change a reconfiguration is made for (the first word of each of its reasons):
 * the reason label of semoe_rebalances_total. STATUS_WHY_MIXED: reasons of several kinds. */
typedef enum {
    STATUS_WHY_JOIN = 0,
    STATUS_WHY_LEAVE,
    STATUS_WHY_DEATH,
    STATUS_WHY_REMOVED,
    STATUS_WHY_SKEW,
    STATUS_WHY_RESTART,
    STATUS_WHY_MIXED,
    STATUS_WHY_OTHER,
    STATUS_WHY_KINDS
} status_why_t;
extern const char *const status_why_names[STATUS_WHY_KINDS];
/* The kind of a history entry's why ("join w5, join w6" -> JOIN, "join w5, death w3" -> MIXED,
 * "-" -> OTHER). */
status_why_t status_why_kind(const char *why);

/* One reconfiguration, from the change that began it to the RESUME that ended it. */
#define STATUS_WHY_MAX 256
typedef struct {
    uint64_t generation;  /* the generation that was resumed */
    uint64_t at_step;     /* the step it resumed at (its PLAN's) */
    double time;          /* Unix seconds when it began */
    char why[STATUS_WHY_MAX]; /* "join w5", "leave w2", "death w3", "skew 2.41 > 1.30 for 5
                                 steps", comma-separated */
    uint64_t moved;       /* expert copies placed anew, summed over its PLANs */
    uint64_t bytes;       /* training state moved between workers (their PLAN ACKs' sum) */
    double before, after; /* imbalance under the smoothed loads before, and predicted after;
                             NaN (null) while no loads are known */
    double duration_ms;   /* PAUSE sent (or the change seen, without a pause) -> RESUME sent */
} status_rebalance_t;

/* The coordinator's state at one moment; everything borrowed from the coordinator. */
typedef struct {
    uint64_t run_id;
    uint64_t generation;
    const char *state;         /* "waiting", "restoring", "reconfiguring", "running" or
                                  "stopping" */
    const char *phase;         /* the training's: "waiting", "training" or "finished" */
    uint64_t step;             /* the most steps any worker reported done */
    uint64_t target_steps;     /* train.steps */
    double loss;               /* of the most steps a loss was reported for; NAN: none (null) */
    double eval_loss;          /* the latest evaluation, after eval_step steps; NAN: none */
    uint64_t eval_step;
    double tokens_per_s;       /* the sum over the workers that are training */
    int64_t uptime_ms;
    int64_t now_ms;            /* monotonic, for heartbeat ages */
    uint32_t heartbeat_ms, liveness;
    uint32_t num_layers, num_experts, top_k;
    uint32_t global_batch;
    uint32_t world;            /* workers in the current plan */
    double last_reconfig_ms;   /* < 0: none finished yet (JSON null) */
    uint32_t pending_acks;
    status_counters_t counters;
    const members_t *members;
    const double *load;        /* (num_layers * num_experts) smoothed tokens per step, or NULL */
    const char *reconfig;      /* "running" (none under way), "pausing" or "syncing" */
    double imbalance;          /* the last step's, as reported; NaN (null): unknown */
    double imbalance_smoothed; /* the placement's under the smoothed loads; NaN: unknown */
    const status_rebalance_t *rebalances; /* the last n_rebalances, oldest first */
    uint32_t n_rebalances;
    const uint64_t *rebalances_by_kind; /* (STATUS_WHY_KINDS) every reconfiguration done, by
                                           kind (status_why_kind of its why) */
} status_view_t;

/* The status reply. Returns the JSON text (caller frees) and its length in *len. */
char *status_json(const status_view_t *v, size_t *len);
/* {"error": text}; caller frees. */
char *status_error_json(const char *text, size_t *len);
/* Fills *v with the state now (the coordinator's side of status_serve). */
typedef void(status_view_fn)(void *arg, status_view_t *v);

/* Serves one request waiting on sock (call it from the socket's zloop callback). sock is a
 * ROUTER that answers REQ clients as a REP would: a REP socket wedges for good on some garbage
 * (a frame without the envelope delimiter from a peer that hangs up), a ROUTER hands us
 * whatever comes. A request is routing frames, an empty delimiter and one body frame: the body
 * "status" (a trailing newline or NUL forgiven) gets status_json of view(arg), anything else
 * {"error": ...}; a message without a delimiter is no request and is dropped. */
void status_serve(void *sock, status_view_fn *view, void *arg);

/* Workers of a state (MEMBER_SYNCING or MEMBER_ACTIVE), counting members not yet placed as
 * syncing. */
uint32_t status_workers_in(const status_view_t *v, member_state_t state);

#endif
