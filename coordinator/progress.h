/* The training's progress as the workers report it in their HEARTBEATs: the job's step, the
 * loss of the most steps, the latest evaluation, tokens per second, the last step's tokens per
 * expert; and the metrics log (--metrics-log), a JSON line each time the job's step advances
 * (docs/control-plane.md). */
#ifndef SEMOE_COORDINATOR_PROGRESS_H
#define SEMOE_COORDINATOR_PROGRESS_H

#include <stdbool.h>
#include <stdint.h>

#include "actors/err.h"
#include "coordinator/members.h"
#include "coordinator/status.h"

typedef struct progress progress_t;

/* No progress yet, for n_total experts; with log_path (not NULL) the metrics log, opened for
 * appending (created 0644) or SEMOE_EINVAL with a message naming --metrics-log. *self_p gets
 * the progress, the caller's (progress_destroy). */
semoe_rc progress_new(uint64_t n_total, const char *log_path, progress_t **self_p);
/* Closes the log, frees everything, nulls *self_p. */
void progress_destroy(progress_t **self_p);

/* Takes the last step's tokens of m's experts from a HEARTBEAT's load (n_total entries: the
 * tokens each copy m holds received) into m->load_last. A new plan drops them (its holders
 * report anew). */
void progress_take_load(progress_t *self, member_t *m, proto_u32s_t load);
/* The last step's tokens per expert (n_total), summed over its holders' last reports of this
 * plan (0 before any); valid until the next call. */
const uint64_t *progress_loads(progress_t *self, const members_t *members);
/* The last step's imbalance: the most tokens the copies of any placed worker took, over the
 * mean over placed workers. NaN until every one of them reported a load of this plan, or when
 * the loads are all zero. */
double progress_imbalance(const members_t *members);
/* Takes m's progress, just copied from its HEARTBEAT (members_set_progress), into the job's;
 * when the job's step advances, appends the log's line, with generation and world (workers in
 * the current plan) and the rates and loads of members. Returns whether the step advanced. */
bool progress_take(progress_t *self, const member_t *m, const members_t *members,
                   uint64_t generation, uint32_t world);

/* Takes up the step and whether training began from a coordinator's saved state (the workers'
 * next reports go on from there). */
void progress_restore(progress_t *self, uint64_t step, bool training);

/* The most steps any worker reported done. */
uint64_t progress_step(const progress_t *self);
/* Whether a worker reported training or a step done (sticky). */
bool progress_training(const progress_t *self);
/* Fills the view's step, loss, evaluation and tokens per second, and its phase ("training"
 * once a worker reported training or a step done, "waiting" before; the caller knows
 * "finished"). v->members must be set. */
void progress_view(const progress_t *self, status_view_t *v);

/* True when every placed member reported finishing (phase finished at steps or more), and
 * one is placed at least. */
bool progress_all_finished(const members_t *members, uint64_t steps);

#endif
