/* Where the experts live: a pure function from the previous placement and the live workers to
 * the next one. This stage places one holder per expert, balanced per layer and over layers,
 * moving as few experts as it can; a later stage places by measured load. */
#ifndef SEMOE_COORDINATOR_PLACEMENT_H
#define SEMOE_COORDINATOR_PLACEMENT_H

#include <stdint.h>

#include "actors/err.h"

#define PLACEMENT_NONE UINT32_MAX /* an expert with no live holder */

/* Places the num_layers * num_experts experts (expert e = layer * num_experts + j) on n workers
 * (ranks 0..n-1). prev[e] is the rank of the live worker that held expert e before, in the new
 * numbering, or PLACEMENT_NONE when its holder is gone or it was never placed. On return out[e]
 * is the rank holding expert e (PLACEMENT_NONE for every expert when n is 0), such that:
 *  - within each layer every worker holds q or q + 1 experts (q = num_experts / n);
 *  - over all layers every worker holds T or T + 1 experts (the layers' "q + 1" slots are
 *    spread evenly);
 *  - among all such placements, it keeps the most experts where they were (fewest moves);
 *    experts that must move land on the lowest ranks with room;
 *  - the result depends only on the inputs.
 * prev and out are the caller's and must not overlap. Fails (SEMOE_EINVAL) when a prev entry is
 * neither a rank below n nor PLACEMENT_NONE, or the sizes overflow. */
semoe_rc placement_compute(uint32_t num_layers, uint32_t num_experts, uint32_t n,
                           const uint32_t *prev, uint32_t *out);

/* The global batch split by rank: rank r takes sequences [off[r], off[r + 1]) with
 * off[r] = r * global_batch / n. off has n + 1 entries. */
void placement_batch_offsets(uint32_t global_batch, uint32_t n, uint32_t *off);

#endif
