/* Placement by load: a pure function from the measured expert loads (and the previous placement)
 * to which workers hold which experts, hot experts replicated, each layer's busiest worker as
 * lightly loaded as the slots allow, moving little. The elastic coordinator calls it when the
 * load is skewed; placement.h is the count-balanced placement used before any load is known. */
#ifndef SEMOE_COORDINATOR_BALANCE_H
#define SEMOE_COORDINATOR_BALANCE_H

#include <stdint.h>

#include "actors/err.h"
#include "coordinator/placement.h"

typedef struct {
    uint32_t num_layers, num_experts; /* L, E: expert e = layer * E + j */
    uint32_t workers;                 /* n >= 1, ranks 0..n-1 */
    uint32_t slots;                   /* experts one worker may hold per layer, at least
                                         ceil(E * min_replicas / n); more than E counts as E */
    uint32_t min_replicas;            /* every expert on at least this many distinct workers,
                                         1 <= min_replicas <= n */
    double keep_slack;                /* >= 0: a layer built from the previous placement is
                                         taken when its busiest worker is within this fraction
                                         of the fresh placement's (0: only when no busier) */
} balance_shape_t;

/* What balance_place predicts; every field is filled on success. */
typedef struct {
    double cost;          /* sum over layers of the busiest worker's load in that layer: the
                             tokens per step on the critical path of the all-to-alls */
    double *worker_load;  /* the caller's (n entries) or NULL: each worker's load summed over
                             layers */
    uint32_t copies;      /* expert copies placed, all layers */
    uint32_t moves;       /* copies on a worker that did not hold that expert in prev (weights
                             and optimizer state to ship); every copy when prev is NULL */
    uint32_t layers_kept; /* layers whose previous placement was kept as it was */
    uint32_t layers_seeded; /* layers built by repairing the previous placement */
} balance_report_t;

/* Places the L * E experts on n workers by load. load[e] >= 0 (finite) is the smoothed number
 * of tokens per step routed to expert e; a copy's predicted load is load[e] / copies(e), the
 * exchange splitting an expert's tokens evenly over its holders.
 *
 * prev_off / prev_holders give the previous placement in the CSR form of PROTO PLAN's
 * holder_offsets / holders: expert e was held by prev_holders[prev_off[e] .. prev_off[e + 1])
 * (prev_off has L * E + 1 non-decreasing entries), ranks in the NEW numbering, PLACEMENT_NONE
 * for holders that are gone; prev_off NULL means no history.
 *
 * On return expert e is held by holders[off[e] .. off[e + 1]) with off[0] = 0, ascending and
 * distinct, such that:
 *  - every expert has between min_replicas and n holders; no worker holds more than slots
 *    experts of one layer;
 *  - in every layer where some expert has load, all n * slots slots are used (up to n copies
 *    of every expert): more copies split the load finer, and the slots no copy of a loaded
 *    expert helps go to zero-load experts (they add no load); in a layer without load, every
 *    expert keeps min_replicas copies;
 *  - each layer's busiest worker is at most (1 + keep_slack) x that of the reference placement
 *    R, which depends on the loads alone (balance.c: replicate, pack longest-first, improve);
 *  - a layer's previous placement is kept whole when it is valid, fills as many slots and is
 *    within that bound under the new loads (so feeding the output back in with the same loads
 *    moves nothing); otherwise the layer is rebuilt from R or from the previous placement,
 *    whichever keeps more copies in place;
 *  - the result depends only on the inputs.
 * The caller allocates off (L * E + 1 entries) and holders (room for L * E * n ranks); report
 * may be NULL. Fails with SEMOE_EINVAL and a message naming the field on a bad shape (n = 0,
 * min_replicas outside 1..n, too few slots, sizes past 32 bits, keep_slack negative), a
 * negative or non-finite load, decreasing prev_off, or a prev rank that is neither below n nor
 * PLACEMENT_NONE. */
semoe_rc balance_place(const balance_shape_t *shape, const double *load, const uint32_t *prev_off,
                       const uint32_t *prev_holders, uint32_t *off, uint32_t *holders,
                       balance_report_t *report);

/* The job's imbalance figure, layer by layer: the sum over layers of the max over workers of the
 * tokens their experts of that layer receive (a replicated expert's load split evenly over its
 * holders), divided by the sum over layers of the mean over workers. Each layer's all-to-all
 * waits for its busiest worker, so this is the step's cost against a perfect balance; with one
 * layer it is the max over workers ÷ the mean. 1.0 when all are equal, when every load is 0, or
 * when n is 0. Holder entries
 * that are not ranks below n (PLACEMENT_NONE) are skipped: an expert's load is split over its
 * live holders, and lost when it has none. off / holders are in balance_place's CSR form. */
double balance_imbalance(uint32_t num_layers, uint32_t num_experts, uint32_t n,
                         const double *load, const uint32_t *off, const uint32_t *holders);

#endif
