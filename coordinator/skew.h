/* Load skew: the experts' loads smoothed over the steps, and the patience rule that says when
 * the placement's imbalance under them has stayed above the job's threshold long enough to
 * rebalance (job spec `elastic`: threshold, window, patience). */
#ifndef SEMOE_COORDINATOR_SKEW_H
#define SEMOE_COORDINATOR_SKEW_H

#include <stdbool.h>
#include <stdint.h>

typedef struct skew skew_t;

/* No loads yet, for n_total experts; threshold >= 1, window >= 1 steps, patience steps (0 acts
 * as 1). The caller owns it (skew_destroy). */
skew_t *skew_new(uint64_t n_total, double threshold, uint32_t window, uint32_t patience);
void skew_destroy(skew_t **self_p);

/* Folds a step's tokens per expert (n_total, every expert's holders reported), taken `steps`
 * (>= 1) steps after the previous one, into the smoothed loads: an exponential moving average
 * with alpha = 2 / (window + 1) per step (the weight a window-step moving average gives its
 * newest sample, with the same centre of mass), alpha_k = 1 - (1 - alpha)^steps when steps
 * were skipped; the first sample is taken as it is. */
void skew_take(skew_t *self, const uint64_t *raw, uint64_t steps);

/* Takes up smoothed loads saved earlier (n_total, as skew_load gave them), as if their steps
 * had been taken here (a coordinator restarted on its state). */
void skew_restore(skew_t *self, const double *load);

/* The smoothed tokens per step per expert (n_total), or NULL until a step was taken. */
const double *skew_load(const skew_t *self);

/* Notes the current placement's imbalance under the smoothed loads, `steps` steps after the
 * last note: steps above the threshold add up, a note at or below it starts the count again.
 * Returns true once the count reached patience. */
bool skew_observe(skew_t *self, double imbalance, uint64_t steps);
/* The last imbalance noted (NaN: none since the last reset) and the steps above the threshold
 * counted so far. */
double skew_imbalance(const skew_t *self);
uint64_t skew_above(const skew_t *self);
double skew_threshold(const skew_t *self);
/* Starts the count again (a new placement, or a rebalance that was not worth it). */
void skew_reset(skew_t *self);

#endif
