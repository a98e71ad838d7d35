/* A coordinator's state on disk (--state-dir, coordinator/state.h) from the server's side:
 * written when it matters (a generation about to go out at once, other changes batched), and
 * taken up by a coordinator started again on it (docs/control-plane.md "Coordinator
 * restart"). */
#include "coordinator/coord_impl.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"

/* --state-dir: changes other than a new generation are written this long after the first, so
 * that a burst of joins costs a few writes, not one each. */
#define S_SAVE_DELAY_MS 10

/* --- writing ----------------------------------------------------------------------------------- */

/* Writes the state now (with --state-dir). */
semoe_rc coord_save(coord_t *self)
{
    if (!self->store)
        return SEMOE_OK;
    uv_timer_stop(&self->save_timer);
    state_t st = {.run_id = self->run_id, .job = self->job_json, .started = self->started,
                  .stopped = self->stopping, .step = progress_step(self->progress),
                  .training = progress_training(self->progress), .counters = self->counters,
                  .members = self->members};
    reconfig_save(self->reconfig, &st);
    return state_store_save(self->store, &st);
}

/* coord_save while serving: a failure is logged and the job goes on (a restart would take up the
 * state as it was last written). */
void coord_save_serving(coord_t *self)
{
    if (coord_save(self) != SEMOE_OK)
        log_error("--state-dir: %s (a restart would take up the state written before)",
                  semoe_err_msg());
}

static void s_on_save_timer(uv_timer_t *timer) { coord_save_serving(timer->data); }

/* Writes the state soon (S_SAVE_DELAY_MS), with whatever else changes meanwhile. */
void coord_save_soon(coord_t *self)
{
    if (self->store && !uv_is_active((uv_handle_t *)&self->save_timer))
        uv_timer_start(&self->save_timer, s_on_save_timer, S_SAVE_DELAY_MS, 0);
}

/* reconfig's: a generation is about to go out (now), or the history grew. */
void coord_persist(void *arg, bool now)
{
    if (now)
        coord_save_serving(arg);
    else
        coord_save_soon(arg);
}

/* A restarted coordinator plans once every member its state listed is back or gone. */
void coord_check_restored(coord_t *self)
{
    if (!self->restoring || members_unbound(self->members) > 0)
        return;
    self->restoring = false;
    if (self->restored)
        log_info("restart: %u of the %u workers of the saved state are back: planning",
                 self->returned, self->restored);
    reconfig_release(self->reconfig);
}

/* --- taking it up ------------------------------------------------------------------------------ */

/* Makes the job's data paths absolute, so that workers started in another directory read the
 * same files. A path that does not resolve stays as it is, for the data loader to name. */
static void s_data_paths_absolute(model_job_t *job)
{
    for (uint32_t i = 0; i < job->data.n_paths; i++) {
        char *abs = realpath(job->data.paths[i], NULL);
        if (!abs)
            continue;
        free(job->data.paths[i]);
        job->data.paths[i] = abs;
    }
}

/* The job and its text for WELCOME: the one given, which must be the saved state's when there
 * is one, or else the state's. With a state, its text goes out as it is: a worker that gets
 * another text for its job starts the job again. */
semoe_rc coord_take_job(coord_t *self, const state_t *st)
{
    if (!self->job && !st)
        return semoe_err(SEMOE_EINVAL, "--config JOB.json is required%s", self->store ?
                         " (--state-dir holds no saved job yet)" : "");
    if (!self->job)
        SEMOE_CHECK(model_job_parse(st->job, strlen(st->job), state_store_path(self->store),
                                    &self->job));
    /* Not the spec's own text: its "model" may name a config.json only this host has. */
    s_data_paths_absolute(self->job);
    self->job_json = model_job_to_json(self->job);
    if (!st)
        return SEMOE_OK;
    SEMOE_CHECK(state_check_job(self->store, st, self->job_json));
    free(self->job_json);
    self->job_json = semoe_xstrdup(st->job);
    return SEMOE_OK;
}

/* Takes up a saved state after the members went into the table (unbound, or none when the
 * state says its job was stopped): counters, progress, the placement and the history; the
 * members get a liveness window from now to come back. Members that were leaving with handover
 * are let go: their next message gets NOT_MEMBER, on which they leave. */
void coord_restore(coord_t *self, state_t *st)
{
    self->counters = st->counters;
    self->counters.heartbeats = self->counters.protocol_errors = 0; // this process's own
    self->counters.restarts++;
    self->started = self->started || st->started;
    if (self->started)
        reconfig_start(self->reconfig);
    progress_restore(self->progress, st->step, st->training);
    if (st->stopped) // its workers were told to stop: nobody comes back to the placement
        st->world = 0;
    reconfig_restore(self->reconfig, st);
    int64_t now = clock_mono_ms();
    for (member_t *m = members_first(self->members); m; m = m->next)
        m->last_seen_ms = now;
    self->restored = members_count(self->members);
    self->restoring = true;
    log_info("restart %" PRIu64 " of run %016" PRIx64 " from %s: generation %" PRIu64 ", step %"
             PRIu64 "%s; %u workers to come back within %u ms", self->counters.restarts,
             self->run_id, state_store_path(self->store), st->generation, st->step,
             st->stopped ? " (the job was stopped: its workers are not waited for)" : "",
             self->restored, self->liveness * self->heartbeat_ms);
    for (member_t *m = members_first(self->members), *next; m; m = next) {
        next = m->next;
        if (!m->leaving)
            continue;
        log_warn("worker %s was leaving with handover: it is let go (a replica or the last "
                 "checkpoint restores what it held)", m->id);
        self->counters.leaves++;
        coord_remove(self, m, RECONFIG_LEFT, false);
    }
    coord_check_restored(self);
}
