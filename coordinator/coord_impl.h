/* The coordinator's own state (struct coord) and what its two files share: coord.c, the
 * server (sockets, the members' messages, heartbeats, stop), and restart.c, the state on disk
 * that a restarted coordinator takes up (--state-dir). Not for other callers: coord.h is the
 * coordinator's interface. */
#ifndef SEMOE_COORDINATOR_COORD_IMPL_H
#define SEMOE_COORDINATOR_COORD_IMPL_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "actors/zloop.h"
#include "coordinator/coord.h"
#include "coordinator/members.h"
#include "coordinator/metrics.h"
#include "coordinator/progress.h"
#include "coordinator/reconfig.h"
#include "coordinator/state.h"
#include "coordinator/status.h"
#include "model/job.h"

struct coord {
    uv_loop_t loop;
    bool loop_open, handles_open;
    void *ctx, *control, *status;
    zloop_watch_t *control_watch, *status_watch;
    metrics_t *metrics;
    uv_timer_t heartbeat_timer, stop_timer, save_timer;
    uv_signal_t sigterm, sigint;

    model_job_t *job;
    char *job_json;     // the job as workers get it in WELCOME: the model written out in full
    uint32_t L, E;      // MoE layers, experts per layer
    uint64_t n_total;   // L * E
    uint32_t heartbeat_ms, liveness;

    members_t *members;
    reconfig_t *reconfig; // generations, PLANs, PAUSE/RESUME, load skew
    progress_t *progress; // the training's: step, losses, the last step's loads, the log
    uint64_t run_id, seq;
    status_counters_t counters;
    bool started;          // training may start: cluster.expected_workers were members once
    bool finished;         // every placed worker finished train.steps; STOP went out
    int64_t start_ms;
    int64_t tick_ms;       // the last heartbeat tick
    uint64_t ticks;        // heartbeat ticks so far: members are served by slices
    bool stopping;

    state_store_t *store;  // --state-dir, or NULL
    bool restoring;        // restarted on a state: waiting for its members to come back
    uint32_t restored;     // members the state listed
    uint32_t returned;     // ... that came back
};

/* coord.c: removes m (fence: ignore its connection until it JOINs again); why says how it went. */
void coord_remove(coord_t *self, member_t *m, reconfig_gone_t why, bool fence);

/* restart.c: the job and its WELCOME text from the flags or the saved state; taking up a saved
 * state; writing it (now, or soon with whatever else changes meanwhile; reconfig's persist
 * callback); and the end of a restart's wait for its members. */
semoe_rc coord_take_job(coord_t *self, const state_t *st);
void coord_restore(coord_t *self, state_t *st);
semoe_rc coord_save(coord_t *self);
void coord_save_serving(coord_t *self);
void coord_save_soon(coord_t *self);
void coord_persist(void *arg, bool now);
void coord_check_restored(coord_t *self);

#endif
