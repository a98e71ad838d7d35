/* Keeping expert copies where they were, for balance.c: on a layer's working state
 * (balance_layer.h), the previous placement is read, and a new placement is laid over the
 * workers or repaired from the previous one so that few copies move. Internal to
 * coordinator/balance*.c. */
#ifndef SEMOE_COORDINATOR_BALANCE_STICKY_H
#define SEMOE_COORDINATOR_BALANCE_STICKY_H

#include <stdbool.h>
#include <stdint.h>

#include "coordinator/balance_layer.h"

/* Reads this layer's previous placement (offsets off[0..E], ranks below n or PLACEMENT_NONE,
 * checked by the caller) into pheld, pcopies and the distinct live holder lists pl. Returns
 * true when it could be kept as it is: no holder gone, none twice, min_replicas..n holders
 * each, at most S per worker. Sets *live when some previous holder is alive. */
bool balance_sticky_read_prev(balance_layer_t *ly, const uint32_t *off, const uint32_t *holders,
                              bool *live);

/* Permutes the current placement's workers ("bins") so that the most copies stay on a worker
 * that held them before: workers are interchangeable within a layer, so the loads do not
 * change. Hungarian assignment up to a size, greedy by overlap beyond. */
void balance_sticky_relabel(balance_layer_t *ly);

/* Sends copies of the current placement that moved back to a previous holder (into a free
 * slot, or swapped with a copy that is new there), as long as neither worker passes max. */
void balance_sticky_stick(balance_layer_t *ly, double max);

/* Repairs the previous placement into the current one with `target` copies in all: what no
 * longer fits dropped, then copies added where they are needed most. Returns false when it
 * gets stuck (the caller then uses another candidate); the result is not yet improved. */
bool balance_sticky_seed(balance_layer_t *ly, uint64_t target);

/* Copies of the current placement on a worker that did not hold that expert before. */
uint32_t balance_sticky_moves(const balance_layer_t *ly);

#endif
