/* Elastic reconfiguration, the coordinator's side (docs/control-plane.md, "Reconfiguration"):
 * generations and their PLANs, and how the job gets from one to the next. While training runs,
 * a graceful change (a JOIN, a LEAVE with handover, a rebalance on load skew) pauses the
 * members at a step boundary (PAUSE), plans at that step with the leaving ones as donors, and
 * resumes once every member acked (RESUME); a death plans at once. Every generation ends with
 * RESUME. Also the load-skew rule (skew.h) and the history of reconfigurations. */
#ifndef SEMOE_COORDINATOR_RECONFIG_H
#define SEMOE_COORDINATOR_RECONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <uv.h>

#include "coordinator/members.h"
#include "coordinator/progress.h"
#include "coordinator/state.h"
#include "coordinator/status.h"
#include "model/job.h"
#include "proto/msg.h"

/* History entries kept (the oldest go first). */
#define RECONFIG_HISTORY 32

typedef enum {
    RECONFIG_RUNNING = 0, /* no reconfiguration under way */
    RECONFIG_PAUSING,     /* PAUSE sent, waiting for the members to report PAUSED */
    RECONFIG_SYNCING,     /* PLAN sent, waiting for the members' ACKs; RESUME follows */
} reconfig_state_t;

/* Why a member goes. */
typedef enum {
    RECONFIG_LEFT = 0, /* LEAVE with handover 0 */
    RECONFIG_DIED,     /* silent past the liveness */
    RECONFIG_REMOVED,  /* broke protocol, or its connection now speaks for another worker */
} reconfig_gone_t;

/* Removes m as the coordinator does (reconfig_removing is called on the way): RECONFIG_LEFT
 * as a leave, RECONFIG_REMOVED as a member that broke protocol (ERROR with text, fence). */
typedef void(reconfig_remove_fn)(void *arg, member_t *m, reconfig_gone_t why, const char *text);
/* The state on disk is out of date: now (a generation is about to be issued: it must be on disk
 * before its PLAN goes out) or soon (the history grew). */
typedef void(reconfig_persist_fn)(void *arg, bool now);

typedef struct {
    uv_loop_t *loop;           /* its timers run here */
    void *control;             /* the ROUTER that PAUSE, PLAN and RESUME go out on */
    members_t *members;
    progress_t *progress;
    const model_job_t *job;    /* train.global_batch, elastic.*, the model's shape */
    uint64_t run_id;
    uint64_t *seq;             /* the coordinator's message counter, advanced per message */
    status_counters_t *counters; /* generations are counted here */
    uint32_t heartbeat_ms, liveness;
    reconfig_remove_fn *remove;
    reconfig_persist_fn *persist; /* NULL: no state on disk */
    void *remove_arg;          /* for remove and persist */
} reconfig_opts_t;

typedef struct reconfig reconfig_t;

/* Generation 0, nothing planned, no plan before reconfig_start. The caller owns it: close
 * (reconfig_close) while the loop can still run, then reconfig_destroy. */
reconfig_t *reconfig_new(const reconfig_opts_t *opts);
/* Closes its timers (the loop completes the close). */
void reconfig_close(reconfig_t *self);
/* Frees it (after reconfig_close and a turn of the loop); nulls *self_p. */
void reconfig_destroy(reconfig_t **self_p);

/* cluster.expected_workers have been members at once: plans may go out. */
void reconfig_start(reconfig_t *self);

/* Fills st's generation, plan_step, last_reconfig_ms, reconfigurations by kind, history,
 * smoothed loads and placement, borrowed from self (valid until it changes). */
void reconfig_save(const reconfig_t *self, state_t *st);
/* Takes up a saved state (state_store_load) after its members went into the table, unbound:
 * the generation (the next one is larger), the placement (each placed member gets its
 * experts, SYNCING until it acks the next PLAN), the history and the loads. Plans are then
 * held until reconfig_release, as a change that may pause the job (members may be training). */
void reconfig_restore(reconfig_t *self, const state_t *st);
/* Every restored member came back or was removed: the restart's generation goes out (a PAUSE
 * first when training runs and nobody went; the placement stays as it was when the members are
 * all back and nobody joined or left meanwhile). */
void reconfig_release(reconfig_t *self);
/* STOP: no more plans; timers stop. */
void reconfig_stop(reconfig_t *self);

/* m joined (or its connection now speaks for a new worker): it gets a rank at the next plan. */
void reconfig_joined(reconfig_t *self, member_t *m);
/* m asked to leave with handover (LEAVE handover 1) and holds state (placed): it becomes a
 * donor of the next plan, then sends LEAVE handover 0. When no member would be left to take
 * its state it is let go at once (a leave; the last checkpoint keeps the job). */
void reconfig_handover(reconfig_t *self, member_t *m);
/* m is about to be removed (members_remove follows): acks, pauses and plans adjust; a member
 * of the current plan, or a donor the members may still wait for, makes a plan at once. */
void reconfig_removing(reconfig_t *self, member_t *m, reconfig_gone_t why);
/* A duplicate JOIN on m's connection: it gets the current PLAN again and must ack it. */
void reconfig_rejoined(reconfig_t *self, member_t *m);
/* An ACK from m of a generation no newer than the current one. */
void reconfig_on_ack(reconfig_t *self, member_t *m, const proto_msg_t *msg);
/* A HEARTBEAT from m, of a generation no newer than the current one, after
 * members_set_progress: loads, pause progress, and the load-skew rule. */
void reconfig_on_heartbeat(reconfig_t *self, member_t *m, const proto_msg_t *msg);

uint64_t reconfig_generation(const reconfig_t *self);
/* Workers with a rank in the current plan. */
uint32_t reconfig_world(const reconfig_t *self);
/* A reconfiguration is under way or due (changes not planned yet, PAUSE or PLAN unanswered). */
bool reconfig_busy(const reconfig_t *self);
/* Fills the view's generation, world, last_reconfig_ms, pending_acks, load, reconfig,
 * imbalance_smoothed, rebalances and rebalances_by_kind. */
void reconfig_view(const reconfig_t *self, status_view_t *v);

#endif
