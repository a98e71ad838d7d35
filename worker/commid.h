/* The communicator id of a plan generation, from the control actor to the trainer: the new
 * rank 0's trainer makes an NCCL id (gpu/nccl.h) and hands it to its control actor, which sends
 * it up in COMM; the coordinator relays it to every rank, whose control actor puts it here, where
 * the trainer waits for it. One per worker process, shared by its two actors (a mutex and a
 * condition variable: the trainer may be inside a blocking wait when the relay comes). */
#ifndef SEMOE_WORKER_COMMID_H
#define SEMOE_WORKER_COMMID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"

#define WORKER_COMMID_MAX 4096 /* PROTO_MAX_COMM */

typedef struct worker_commid worker_commid_t;

worker_commid_t *worker_commid_new(void);
/* Frees; nulls *self_p; NULL is a no-op. */
void worker_commid_destroy(worker_commid_t **self_p);

/* Forgets the id kept (a new run: its generations may be numbered below the old run's). */
void worker_commid_reset(worker_commid_t *self);

/* Keeps the id of generation gen (len bytes, at most WORKER_COMMID_MAX: longer is refused with
 * SEMOE_EINVAL) and wakes a waiter. An older generation's than the one kept is dropped. */
semoe_rc worker_commid_put(worker_commid_t *self, uint64_t gen, const uint8_t *id, size_t len);

/* Waits at most timeout_ms for generation gen's id, copied into id (cap bytes; *len set).
 * SEMOE_ESTOPPED when a newer generation's id is there (this one is over) or interrupted(arg)
 * returns true (checked every 10 ms; NULL: never); SEMOE_ETIMEDOUT when none came; SEMOE_EPROTO
 * when it is longer than cap. */
semoe_rc worker_commid_wait(worker_commid_t *self, uint64_t gen, uint8_t *id, size_t cap,
                            size_t *len, int timeout_ms, bool (*interrupted)(void *arg),
                            void *arg);

#endif
