/* One MoE layer's placement by load, for balance.c: the working state, and the reference
 * placement built on it from the loads alone (replicate, pack longest-first, improve locally).
 * Internal to coordinator/balance*.c; balance_sticky.h keeps copies in place on the same state. */
#ifndef SEMOE_COORDINATOR_BALANCE_LAYER_H
#define SEMOE_COORDINATOR_BALANCE_LAYER_H

#include <stdbool.h>
#include <stdint.h>

/* A placement of one layer: the arrays balance_layer_t works on, swapped in and out whole. */
typedef struct {
    uint8_t *held;    // (n, E) worker w holds expert j
    uint32_t *bin;    // (n, S) the experts on worker w, cnt[w] of them
    uint32_t *cnt;    // (n)
    uint32_t *copies; // (E)
    double *wload;    // (n) predicted load
    double *lpc;      // (E) load per copy
} balance_sol_t;

/* One layer's working state; the arrays are allocated once for all layers, and every function
 * here works on the current placement (the fields that mirror balance_sol_t). */
typedef struct {
    uint32_t E, n, S, m;   // experts, workers, slots (at most E), min replicas
    const double *load;    // (E) this layer's
    uint8_t *held;         // the current placement, as in balance_sol_t
    uint32_t *bin;
    uint32_t *cnt;
    uint32_t *copies;
    double *wload;
    double *lpc;
    balance_sol_t alt;     // a second placement, for balance_layer_swap
    // scratch
    uint32_t *order;       // (E)
    uint32_t *heap;        // (E)
    uint32_t *cand;        // (n)
    uint32_t *hh;          // (n)
    uint8_t *mark;         // (n) zero between uses
    uint32_t *remc;        // (n + 1) experts still to pack, by copy count
    uint32_t *ge;          // (S + 2)
    // the previous placement of this layer (balance_sticky_read_prev)
    uint8_t *pheld;        // (n, E)
    uint32_t *pcopies;     // (E)
    uint32_t *pl_off;      // (E + 1) expert j's distinct live previous holders: pl[pl_off[j]..)
    uint32_t *pl;          // (the most previous holder entries of one layer)
    double *pwload;        // (n)
    // relabelling
    balance_sol_t tmp;     // held, bin, cnt and wload only
    uint32_t *perm;        // (n) bin b goes to worker perm[b]
} balance_layer_t;

/* Allocates the state for layers of E experts on n workers with S slots (S <= E) and
 * min_replicas m; prev_longest bounds the previous holder entries of one layer. Aborts on
 * out-of-memory. */
void balance_layer_init(balance_layer_t *ly, uint32_t E, uint32_t n, uint32_t S, uint32_t m,
                        uint32_t prev_longest);
void balance_layer_free(balance_layer_t *ly);

/* Swaps the current placement with ly->alt. */
void balance_layer_swap(balance_layer_t *ly);

/* The reference placement of one layer (load: E entries, kept by ly until the next call) into
 * the current placement: for a few replica plans (hot copies by load per copy, then cold
 * fillers, until the slots are full), copies packed longest first with the Gale-Ryser check,
 * then balance_layer_improve to the end; the plan with the lightest busiest worker wins.
 * Depends on the loads only; uses ly->alt. */
void balance_layer_reference(balance_layer_t *ly, const double *load);

/* Local search on the busiest worker (moves, swaps, re-replication), each step leaving every
 * worker it touches strictly below the busiest's load, until the busiest is at most target or
 * no step helps (or a fixed budget of look-ups is spent). Keeps every constraint. */
void balance_layer_improve(balance_layer_t *ly, double target);

/* Every worker's load under (held, copies), summed in expert order so that equal contents give
 * equal bits whatever the labels, into wload (n); returns the busiest worker's. */
double balance_layer_eval(const balance_layer_t *ly, const uint8_t *held,
                          const uint32_t *copies, double *wload);

/* Sums worker w's load afresh from bin and lpc. */
void balance_layer_reload(balance_layer_t *ly, uint32_t w);

/* Expert j gains (delta = +1) or loses (-1) a copy in copies: lpc[j] and its holders' loads
 * follow (held must already show the change). */
void balance_layer_recopy(balance_layer_t *ly, uint32_t j, int delta);

/* qsort_r order of workers (arg: the layer): lighter first, then fewer copies, then lower
 * rank. */
int balance_layer_cmp_light(const void *a, const void *b, void *arg);

#endif
