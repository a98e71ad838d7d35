/* Moving training state into a new generation, peer to peer (DESIGN.md "Elasticity", step 4):
 * every participant (the new plan's ranks, then its donors) tells every other what it holds
 * (an inventory), all derive the same transfers from the inventories and the new placement,
 * and one all-to-all moves each expert's weights and AdamW moments, and the dense tensors, from
 * a holder of the newest state to whoever needs them. No coordinator decides the moves: the
 * inventories do, so a crash that left some workers a step ahead or without state is handled
 * the same way as a join.
 *
 * The newest state wins: S = the most steps any participant's state has done. A tensor's
 * source is the lowest participant holding it at step S. When some tensor has no source at S
 * (its only holders died, or were a step behind) nothing moves and every participant rewinds
 * to the checkpoint participant 0 named (its latest under train.checkpoint_dir), or to the
 * seeded initialisation when there is none: consistently, since everyone decides from the same
 * inventories. */
#ifndef SEMOE_WORKER_MIGRATE_H
#define SEMOE_WORKER_MIGRATE_H

#include <stdbool.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/params.h"
#include "model/train.h"
#include "worker/comm.h"

/* What a participant brings: its trainer's tensors at step `step` (params and tr NULL: no
 * state, e.g. a worker that just joined), and, for participant 0 only, the step of the latest
 * checkpoint (0: none) in case of a rewind. */
typedef struct {
    model_params_t *params;
    model_train_t *tr;
    uint64_t step;
    uint64_t ckpt_step;
} worker_state_t;

typedef struct {
    bool rewind;          /* nothing moved: load checkpoint ckpt_step (0: initialise) */
    uint64_t step;        /* migrated: the state's step (S); rewind: ckpt_step */
    uint64_t ckpt_step;
    uint64_t bytes_out, bytes_in; /* tensor bytes this participant sent and received */
    uint32_t tensors_in;  /* tensors it received */
} worker_migrate_result_t;

/* The collective: comm's ranks are the participants (the plan's ranks 0..world-1, then the
 * donors); holder_off/holders (the new plan's, over ranks 0..world-1; L*E+1 and holders) say
 * who needs which expert; every rank below world needs the dense tensors. old is this
 * participant's state. When this participant has a rank (me < world), into (params, tr): new
 * ones built for its experts of the new plan (the caller's, allocated, zeroed or initialised,
 * not yet loaded) it copies what it kept and what it received, weights and moments, and sets
 * AdamW's step count; on rewind it fills nothing (the caller loads the checkpoint). Donors
 * (me >= world) pass params and tr NULL. be moves tensors between the trainers and the
 * host. timeout_ms bounds each collective. */
semoe_rc worker_migrate(comm_t *comm, const model_backend_f32_t *be, const model_config_t *cfg,
                        uint32_t world, const uint32_t *holder_off, const uint32_t *holders,
                        const worker_state_t *old, model_params_t *params, model_train_t *tr,
                        int timeout_ms, worker_migrate_result_t *out);

#endif
