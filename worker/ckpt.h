/* A distributed trainer's checkpoints (DESIGN.md "Elasticity"): training pauses only for a
 * snapshot, one collective that copies every expert's weights and AdamW moments, and the dense
 * tensors rank 0 holds itself, into host memory on rank 0; a writer thread then writes that
 * snapshot under the job's checkpoint root while the steps go on, fenced by the generation
 * (model/checkpoint.h model_ckpt_commit): a worker of an older generation cannot put its
 * checkpoint in place once a newer generation has claimed the root.
 *
 * Files hold whole tensors by name, so any number of workers resumes from them. One write is
 * in flight at a time: a snapshot taken while the last is still being written waits for it
 * (memory stays bounded by one model copy). */
#ifndef SEMOE_WORKER_CKPT_H
#define SEMOE_WORKER_CKPT_H

#include <stdbool.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/checkpoint.h"
#include "model/params.h"
#include "model/train.h"
#include "worker/comm.h"

/* The whole model and its AdamW moments in host memory (rank 0's). */
typedef struct worker_snapshot_t worker_snapshot_t;

/* The collective: every rank sends the weights, m and v of the experts it owns (owner: L*E, the
 * rank that sends each expert; one per expert even when replicated) to rank 0, which copies
 * them and its own tensors into a new snapshot (*out; NULL on the other ranks). params/tr are
 * the rank's trainer; be moves its tensors to the host. An error is the comm's (a peer gone)
 * or a rank that sent what the plan does not say (EPROTO). */
semoe_rc worker_snapshot_gather(comm_t *comm, const model_backend_f32_t *be,
                                const model_params_t *params, model_train_t *tr,
                                const int32_t *owner, int timeout_ms, worker_snapshot_t **out);

void worker_snapshot_destroy(worker_snapshot_t **self_p);

/* Bytes of host memory a snapshot holds (weights, m and v of the whole model). */
size_t worker_snapshot_bytes(const worker_snapshot_t *s);

/* The thread that writes snapshots. */
typedef struct worker_ckpt_writer_t worker_ckpt_writer_t;

worker_ckpt_writer_t *worker_ckpt_writer_new(void);

/* Waits for the write in flight (if any), then destroys. */
void worker_ckpt_writer_destroy(worker_ckpt_writer_t **self_p);

/* Writes snap (taken over) as the checkpoint of state->step under root (model_ckpt_commit,
 * fenced by state->generation, keep the newest `keep`) on the writer's thread. Waits for the
 * previous write first. adam_step is AdamW's step count at the snapshot. The outcome is logged
 * (a failed or fenced write does not stop training: the next interval tries again) and kept
 * for worker_ckpt_writer_wait. */
void worker_ckpt_writer_start(worker_ckpt_writer_t *self, worker_snapshot_t *snap,
                              const char *root, uint32_t keep, int adam_step,
                              const model_ckpt_state_t *state);

/* Waits for the write in flight; returns its result (SEMOE_OK when there was none), with its
 * error message set on this thread. */
semoe_rc worker_ckpt_writer_wait(worker_ckpt_writer_t *self);

/* Whether a write is in flight. */
bool worker_ckpt_writer_busy(const worker_ckpt_writer_t *self);

#endif
