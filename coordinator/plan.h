/* A generation's plan: ranks for the members that stay, in join order, the experts placed over
 * them (by count, placement.h, until loads are known and while min_replicas is 1; by load with
 * replicas, balance.h, from then on; what a live member held stays put where balance allows),
 * each member's list of experts, and the PLAN message every member and donor gets, its shared
 * body encoded once for all of them. */
#ifndef SEMOE_COORDINATOR_PLAN_H
#define SEMOE_COORDINATOR_PLAN_H

#include <stdint.h>

#include "coordinator/members.h"
#include "proto/msg.h"

/* Balance keeps a layer's previous placement when its busiest worker is within this fraction
 * of a fresh placement's (balance_shape_t.keep_slack): few moves for a small loss. */
#define PLAN_KEEP_SLACK 0.05

typedef struct plan plan_t;

/* What a placement did and predicts. */
typedef struct {
    uint32_t world;      /* ranks: the members that are not leaving */
    uint32_t donors;     /* members leaving with handover: no rank, part of the migration */
    uint64_t copies;     /* expert copies placed (L * E without replicas) */
    uint64_t moved;      /* copies on a worker that did not hold that expert before */
    uint32_t min_replicas; /* what every expert got: the job's, capped at world (and to fit) */
    uint32_t slots;      /* experts one worker may hold per layer (0: placed by count) */
    double before;       /* the current placement's imbalance under the loads; NaN: no loads */
    double after;        /* the new placement's, predicted; NaN: no loads */
} plan_report_t;

/* Plans for num_layers x num_experts experts (at most PROTO_MAX_EXPERTS), every expert on at
 * least min_replicas (>= 1) workers where there are that many. Caller owns it. */
plan_t *plan_new(uint32_t num_layers, uint32_t num_experts, uint32_t min_replicas);
void plan_destroy(plan_t **self_p);

/* Computes the next placement without applying it: ranks 0..n-1 in join order for the members
 * that are not leaving, and the experts placed over them from what the placed members hold
 * now. load (L * E smoothed tokens per step, or NULL while unknown): with NULL and
 * min_replicas 1, one holder per expert balanced by count (placement_compute); otherwise
 * balance_place with min(min_replicas, n) replicas and ceil(E * replicas / n) slots per worker
 * per layer, plus one spare slot per worker per layer for hot replicas when loads are known
 * (fewer when the PLAN would not fit in PROTO_MAX_MSG). Fills *report (may be NULL). */
semoe_rc plan_compute(plan_t *self, const members_t *members, const double *load,
                      plan_report_t *report);

/* plan_compute, then applies it: renumbers the members, gives each its experts (placed and
 * SYNCING), marks the leaving ones donors (no rank, no experts). */
semoe_rc plan_place(plan_t *self, members_t *members, const double *load,
                    plan_report_t *report);

/* Applies the current placement again: when the members that are not leaving are exactly the
 * placed ones, ranks 0..n-1 in join order as they are (a restarted coordinator whose members
 * all came back), each keeps its experts (SYNCING) and it returns true, *report saying nothing
 * moves; otherwise it changes nothing and returns false. */
bool plan_keep(plan_t *self, members_t *members, const double *load, plan_report_t *report);

/* Takes up a saved placement as the current one (a coordinator restarted on its state): world
 * ranks, expert e on holders[off[e] .. off[e + 1]) (off: n_total + 1 entries, ascending, every
 * holder < world), and gives each placed member the experts of its rank (< world). Ranks no
 * member holds are of members gone since. The PLAN itself is not kept: plan_resend sends
 * nothing until the next plan_send. */
void plan_restore(plan_t *self, members_t *members, uint32_t world, const uint32_t *off,
                  const uint32_t *holders);

/* The current placement's imbalance under load (balance_imbalance); NaN when load is NULL or
 * nothing is placed. */
double plan_imbalance(const plan_t *self, const double *load);
/* The current placement: world, and expert e's holder ranks holders[off[e] .. off[e + 1]). */
uint32_t plan_world(const plan_t *self);
const uint32_t *plan_offsets(const plan_t *self);
const uint32_t *plan_holders(const plan_t *self);

/* Encodes the PLAN of the last plan_place or plan_keep (step and global_batch go into its body)
 * and sends every placed member and every donor its copy over sock (a ROUTER): hdr gives the
 * run id and generation, and its seq is advanced per message. A member the PLAN cannot be sent
 * to is logged and skipped (its liveness handles it). Fails only when the PLAN cannot be
 * encoded. */
semoe_rc plan_send(plan_t *self, members_t *members, void *sock, proto_header_t *hdr,
                   uint64_t step, uint32_t global_batch);
/* Sends m its copy of the PLAN last sent (after a duplicate JOIN); nothing if m was neither
 * placed nor a donor in it. hdr as for plan_send. */
void plan_resend(plan_t *self, const member_t *m, void *sock, proto_header_t *hdr);

#endif
