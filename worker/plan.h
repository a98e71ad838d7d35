/* A worker's view of a PLAN: its rank, the experts it holds, its slice of the global batch and
 * its peers, checked and copied out of the decoded message (which only lends views). */
#ifndef SEMOE_WORKER_PLAN_H
#define SEMOE_WORKER_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "proto/msg.h"

typedef struct {
    char id[PROTO_MAX_NAME + 1];
    char endpoint[PROTO_MAX_ENDPOINT + 1];
} worker_peer_t;

typedef struct {
    uint64_t run_id;              /* the coordinator run the plan came from */
    uint64_t generation;
    uint32_t rank;                /* PROTO_NO_RANK: this worker holds no rank */
    uint32_t world;
    uint32_t num_layers, num_experts;
    uint64_t step;                /* first step the plan applies to */
    uint64_t global_batch;
    uint64_t batch_lo, batch_hi;  /* this rank's sequences: [lo, hi) */
    uint32_t *batch_off;          /* (world + 1) rank r's sequences: [off[r], off[r+1]) */
    uint32_t *experts;            /* (n_experts) ids layer*E + j held here, ascending */
    uint32_t n_experts;
    uint32_t *holder_off;         /* (L*E + 1) expert e's holders: holders[off[e] .. off[e+1]) */
    uint32_t *holders;            /* ranks, by expert */
    worker_peer_t *peers;         /* (world) by rank */
    worker_peer_t *donors;        /* (n_donors) workers with state but no rank: they hand over */
    uint32_t n_donors;
    uint32_t donor_index;         /* this worker's place among the donors, or UINT32_MAX */
} worker_plan_t;

/* What is wrong with a decoded PLAN (its tables disagree with each other, or with the job's
 * num_layers x num_experts when those are non-zero), or NULL when it is sound. */
const char *worker_plan_check(const proto_plan_t *p, uint32_t num_layers, uint32_t num_experts);

/* Replaces *plan with the checked PLAN p of generation gen (worker_plan_check passed); self_id
 * (this worker's id) finds it among the donors. The arrays are plan's own (worker_plan_clear
 * frees them). */
void worker_plan_take(worker_plan_t *plan, uint64_t gen, const proto_plan_t *p,
                      const char *self_id);

/* A deep copy of src into *dst (which holds nothing yet), e.g. for another actor to own. */
void worker_plan_copy(worker_plan_t *dst, const worker_plan_t *src);

/* Frees plan's arrays and leaves an empty plan (no rank, world 0). */
void worker_plan_clear(worker_plan_t *plan);

/* ids (ascending) as "0-3,8,10-11" ("none" when n is 0), cut with "..." to fit size. */
void worker_plan_ids_str(const uint32_t *ids, uint32_t n, char *buf, size_t size);

/* Logs the plan in one line at info level: rank, experts, batch slice, peers. */
void worker_plan_log(const worker_plan_t *plan);

#endif
