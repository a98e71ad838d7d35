/* Load skew (skew.h): an exponential moving average per expert and a counter of steps above
 * the threshold. */
#include "coordinator/skew.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"

struct skew {
    uint64_t n_total;
    double threshold, alpha;
    uint64_t patience;
    double *load;      // (n_total) smoothed tokens per step
    bool known;        // a step was taken
    double imbalance;  // the last noted; NaN: none
    uint64_t above;    // steps above the threshold in a row
};

skew_t *skew_new(uint64_t n_total, double threshold, uint32_t window, uint32_t patience)
{
    skew_t *self = semoe_xcalloc(1, sizeof *self);
    self->n_total = n_total;
    self->threshold = threshold;
    self->alpha = 2.0 / ((window ? window : 1) + 1.0);
    self->patience = patience ? patience : 1;
    self->load = semoe_xcalloc(n_total ? n_total : 1, sizeof *self->load);
    self->imbalance = NAN;
    return self;
}

void skew_destroy(skew_t **self_p)
{
    skew_t *self = *self_p;
    if (!self)
        return;
    free(self->load);
    free(self);
    *self_p = NULL;
}

void skew_take(skew_t *self, const uint64_t *raw, uint64_t steps)
{
    double a = self->known ? 1 - pow(1 - self->alpha, (double)(steps ? steps : 1)) : 1.0;
    for (uint64_t e = 0; e < self->n_total; e++)
        self->load[e] += a * ((double)raw[e] - self->load[e]);
    self->known = true;
}

void skew_restore(skew_t *self, const double *load)
{
    memcpy(self->load, load, self->n_total * sizeof *self->load);
    self->known = true;
}

const double *skew_load(const skew_t *self) { return self->known ? self->load : NULL; }

bool skew_observe(skew_t *self, double imbalance, uint64_t steps)
{
    self->imbalance = imbalance;
    if (isfinite(imbalance) && imbalance > self->threshold)
        self->above += steps ? steps : 1;
    else
        self->above = 0;
    return self->above >= self->patience;
}

double skew_imbalance(const skew_t *self) { return self->imbalance; }
uint64_t skew_above(const skew_t *self) { return self->above; }
double skew_threshold(const skew_t *self) { return self->threshold; }

void skew_reset(skew_t *self)
{
    self->above = 0;
    self->imbalance = NAN;
}
