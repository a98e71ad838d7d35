/* Elastic reconfiguration (reconfig.h): a plan timer that turns a burst of changes into one
 * generation once the control socket has been drained (and the last PLAN acked), the states
 * RUNNING -> PAUSING -> SYNCING -> RUNNING of a graceful change, the plan at once of a death,
 * RESUME at the end of every generation, and the load-skew rule that asks for a rebalance.
 *
 * Every wait is bounded: a PAUSE by the liveness plus two of the slowest worker's steps (then
 * the plan goes out without it), a PLAN's ACKs by S_SYNC_MIN_MS or S_SYNC_LIVENESS liveness
 * periods (then the members that did not ack are expelled, which plans again), and a member
 * that stops talking is dead by the heartbeat rule (coord.c), which plans at once. */
#include "coordinator/reconfig.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "actors/log.h"
#include "coordinator/plan.h"
#include "coordinator/skew.h"

/* A plan waits until the control socket is drained and no change came for a moment, so that
 * 1000 JOINs arriving together (over many connections, which ZeroMQ hands over one at a time)
 * make one generation; but it waits no longer than the most, so that a flood cannot postpone
 * it for ever. */
#define S_PLAN_QUIET_US 1000
#define S_PLAN_DEFER_MAX_US 50000
/* While members still apply the last PLAN, a new one waits for their ACKs (so that a join
 * storm makes a few generations, each paced by how fast workers take them, not hundreds that
 * bury them), but no longer than this after the last PLAN went out. */
#define S_PLAN_ACK_WAIT_US 500000
/* A PAUSE waits for PAUSED this long: the liveness, plus this many of the slowest member's
 * last step time (a member reports PAUSED at its next step boundary). */
#define S_PAUSE_STEPS 2
/* A PLAN's ACKs (migrations take a while) wait at most the larger of these. */
#define S_SYNC_MIN_MS 60000
#define S_SYNC_LIVENESS 20
/* A rebalance on skew goes ahead only when it predicts at most this x the current imbalance. */
#define S_REBALANCE_GAIN 0.95

struct reconfig {
    reconfig_opts_t o;
    plan_t *plan;
    skew_t *skew;
    uint32_t L, E;
    uint64_t n_total;
    uv_timer_t plan_timer;  // runs while a plan is due
    uv_timer_t wait_timer;  // bounds a pause or a sync
    bool timers_open;

    reconfig_state_t state;
    uint64_t generation;
    uint32_t world;         // ranks in the current plan
    uint32_t pending_acks;  // placed members that have not acked the current PLAN
    bool started, stopping;
    bool dirty;             // a change since the last plan
    bool urgent;            // ... that cannot wait for a pause (a member of the plan is gone)
    int64_t dirty_us;       // when it first changed since the last plan
    int64_t last_change_us; // when it last changed
    int64_t plan_us;        // when the last PLAN went out
    bool resumed;           // the current generation got its RESUME: its members may train
    uint64_t plan_step;     // the current PLAN's step, which its RESUME carries

    /* the reconfiguration under way, for the log and the history */
    int64_t change_us;      // when it began (0: none)
    int64_t pause_us;       // when its PAUSE went out (0: none)
    double change_wall;     // Unix seconds when it began
    char why[STATUS_WHY_MAX];
    uint32_t why_more;      // reasons that did not fit
    char skew_why[96];      // a rebalance decided, noted at its plan
    uint32_t joined, left, died, removed; // since the last plan, for its log line
    uint64_t moved;
    uint64_t bytes; // training state the members received, as their PLAN ACKs say
    double before, after;
    bool have_before;
    double last_reconfig_ms;

    /* loads */
    bool load_fresh;        // no complete step of loads since the plan
    uint64_t load_step;     // the last step every member of the plan reported a load for
    bool skip_logged;       // a rebalance that was not worth it was logged

    status_rebalance_t hist[RECONFIG_HISTORY]; // oldest first
    uint32_t n_hist;
    uint64_t by_kind[STATUS_WHY_KINDS]; // every reconfiguration done, by kind

    /* a coordinator restarted on its state (reconfig_restore) */
    bool held;              // no plan until the restored members are back (reconfig_release)
    bool keep;              // the restart's plan keeps the placement, if plan_keep still can
    bool restore_urgent;    // ... but a rank's holder had gone: no pause before it
};

static const char *s_state_names[] = {"running", "pausing", "syncing"};

static void s_on_plan_timer(uv_timer_t *timer);

/* --- sending ----------------------------------------------------------------------------------- */

static void s_send(reconfig_t *self, const member_t *m, proto_type_t type, uint64_t step)
{
    if (!members_bound(m))
        return;
    proto_msg_t msg = {.hdr = {.type = type, .run_id = self->o.run_id,
                               .generation = self->generation, .seq = ++*self->o.seq}};
    if (type == PROTO_PAUSE)
        msg.pause.step = step;
    else
        msg.resume.step = step;
    if (proto_send(self->o.control, m->rid, m->rid_len, &msg) != SEMOE_OK)
        log_debug("sending %s to %s: %s", proto_type_name(type), m->id, semoe_err_msg());
}

static bool s_control_pending(reconfig_t *self)
{
    int events = 0;
    size_t len = sizeof events;
    return zmq_getsockopt(self->o.control, ZMQ_EVENTS, &events, &len) == 0 &&
           (events & ZMQ_POLLIN);
}

/* --- the change under way ---------------------------------------------------------------------- */

/* Adds "what id" (id may be NULL) to the reasons of the reconfiguration under way. */
static void s_note(reconfig_t *self, const char *what, const char *id)
{
    char item[STATUS_WHY_MAX];
    int n = snprintf(item, sizeof item, "%s%s%s", what, id ? " " : "", id ? id : "");
    size_t len = strlen(self->why), room = sizeof self->why - 24; // room for " (+N more)"
    if (len + (len ? 2 : 0) + (size_t)n >= room) {
        self->why_more++;
        return;
    }
    snprintf(self->why + len, sizeof self->why - len, "%s%s", len ? ", " : "", item);
}

/* Notes a change; the plan follows once the changes stop coming (and, for a graceful one while
 * training runs, once the members paused). */
static void s_changed(reconfig_t *self, bool urgent)
{
    if (self->stopping)
        return;
    int64_t now = clock_mono_us();
    self->last_change_us = now;
    if (!self->dirty) {
        self->dirty = true;
        self->dirty_us = now;
    }
    self->urgent = self->urgent || urgent;
    if (!uv_is_active((uv_handle_t *)&self->plan_timer))
        uv_timer_start(&self->plan_timer, s_on_plan_timer, S_PLAN_QUIET_US / 1000, 0);
    if (!self->change_us) {
        self->change_us = now;
        self->change_wall = (double)clock_wall_ms() / 1000.0;
    }
}

/* Forgets the reconfiguration under way (after its RESUME, or when nobody is left). */
static void s_forget(reconfig_t *self)
{
    self->change_us = self->pause_us = 0;
    self->why[0] = 0;
    self->why_more = 0;
    self->moved = 0;
    self->bytes = 0;
    self->have_before = false;
}

static void s_history(reconfig_t *self, double ms)
{
    if (self->n_hist == RECONFIG_HISTORY) {
        memmove(self->hist, self->hist + 1, (RECONFIG_HISTORY - 1) * sizeof *self->hist);
        self->n_hist--;
    }
    status_rebalance_t *h = &self->hist[self->n_hist++];
    *h = (status_rebalance_t){.generation = self->generation, .at_step = self->plan_step,
                              .time = self->change_wall, .moved = self->moved,
                              .bytes = self->bytes,
                              .before = self->have_before ? self->before : NAN,
                              .after = self->after, .duration_ms = ms};
    if (self->why_more)
        snprintf(h->why, sizeof h->why, "%.*s (+%u more)", STATUS_WHY_MAX - 24, self->why,
                 self->why_more);
    else
        snprintf(h->why, sizeof h->why, "%s", self->why[0] ? self->why : "-");
    self->by_kind[status_why_kind(h->why)]++;
    if (self->o.persist)
        self->o.persist(self->o.remove_arg, false);
}

/* --- plans ------------------------------------------------------------------------------------- */

static void s_on_sync_timeout(uv_timer_t *timer);

static uint64_t s_sync_ms(const reconfig_t *self)
{
    uint64_t ms = (uint64_t)S_SYNC_LIVENESS * self->o.liveness * self->o.heartbeat_ms;
    return ms > S_SYNC_MIN_MS ? ms : S_SYNC_MIN_MS;
}

/* Opens a new generation for the current members, starting at step, and sends its PLAN to
 * every member and donor. */
static void s_plan(reconfig_t *self, uint64_t step)
{
    bool staying = false;
    for (const member_t *m = members_first(self->o.members); m; m = m->next)
        staying = staying || !m->leaving;
    for (member_t *m = members_first(self->o.members), *next; !staying && m; m = next) {
        next = m->next; // nobody left to take their state (the others died meanwhile)
        self->o.remove(self->o.remove_arg, m, RECONFIG_LEFT, "nobody is left to take its state");
    }
    for (member_t *m = members_first(self->o.members); m; m = m->next) {
        if (m->leaving && !m->donor)
            s_note(self, "leave", m->id);
        else if (!m->leaving && !m->placed && !m->donor)
            s_note(self, "join", m->id);
    }
    if (self->skew_why[0]) {
        s_note(self, self->skew_why, NULL);
        self->skew_why[0] = 0;
    }
    plan_report_t rep;
    bool kept = self->keep && plan_keep(self->plan, self->o.members, skew_load(self->skew), &rep);
    self->keep = false;
    if (!kept &&
        plan_place(self->plan, self->o.members, skew_load(self->skew), &rep) != SEMOE_OK) {
        log_error("placement: %s", semoe_err_msg()); // a bug: the inputs come from us
        self->dirty = self->urgent = false;
        return;
    }
    self->dirty = self->urgent = false;
    uv_timer_stop(&self->plan_timer);
    uv_timer_stop(&self->wait_timer);
    self->generation++;
    self->o.counters->generations++;
    self->world = rep.world;
    self->pending_acks = rep.world;
    log_info("generation %" PRIu64 ": %u workers, %u donors (%u joined, %u left, %u died, %u "
             "removed) from step %" PRIu64 "; %" PRIu64 " of %" PRIu64 " copies placed anew%s, "
             "%u replicas at least; imbalance %.3f -> %.3f", self->generation, rep.world,
             rep.donors, self->joined, self->left, self->died, self->removed, step, rep.moved,
             rep.copies, kept ? " (the placement kept)" : "", rep.min_replicas, rep.before,
             rep.after);
    self->joined = self->left = self->died = self->removed = 0;
    if (!self->have_before) {
        self->before = rep.before;
        self->have_before = true;
    }
    self->after = rep.after;
    self->moved += rep.moved;
    self->plan_step = step;
    self->resumed = false;
    self->load_fresh = true;
    self->skip_logged = false;
    skew_reset(self->skew);
    if (!self->change_us) { // a plan without a change noted (a rebalance decided at once)
        self->change_us = clock_mono_us();
        self->change_wall = (double)clock_wall_ms() / 1000.0;
    }
    if (self->o.persist) // a restart must not issue this generation again
        self->o.persist(self->o.remove_arg, true);
    if (rep.world == 0) { // nobody to resume
        self->state = RECONFIG_RUNNING;
        s_forget(self);
        return;
    }
    self->state = RECONFIG_SYNCING;
    self->plan_us = clock_mono_us();
    proto_header_t hdr = {.type = PROTO_PLAN, .run_id = self->o.run_id,
                          .generation = self->generation, .seq = *self->o.seq};
    if (plan_send(self->plan, self->o.members, self->o.control, &hdr, step,
                  self->o.job->train.global_batch) != SEMOE_OK)
        log_error("generation %" PRIu64 ": cannot encode the PLAN: %s", self->generation,
                  semoe_err_msg());
    *self->o.seq = hdr.seq;
    uv_timer_start(&self->wait_timer, s_on_sync_timeout, s_sync_ms(self), 0);
}

/* Every member acked the PLAN: RESUME to all of them, and the history entry. */
static void s_resume(reconfig_t *self)
{
    uv_timer_stop(&self->wait_timer);
    for (member_t *m = members_first(self->o.members); m; m = m->next)
        if (m->placed)
            s_send(self, m, PROTO_RESUME, self->plan_step);
    self->resumed = true;
    self->state = RECONFIG_RUNNING;
    int64_t from = self->pause_us ? self->pause_us : self->change_us;
    double ms = from ? (double)(clock_mono_us() - from) / 1000.0 : 0;
    self->last_reconfig_ms = ms;
    s_history(self, ms);
    log_info("generation %" PRIu64 ": all %u workers acked: RESUME at step %" PRIu64 "; the "
             "reconfiguration took %.1f ms (%s)", self->generation, self->world, self->plan_step,
             ms, self->hist[self->n_hist - 1].why);
    s_forget(self);
}

/* Whether every placed member reported PAUSED after acking the PAUSE; *step gets the most
 * steps any reported (they should all be at the same). False when none is placed. */
static bool s_all_paused(const reconfig_t *self, uint64_t *lo, uint64_t *hi)
{
    uint32_t n = 0;
    *lo = UINT64_MAX, *hi = 0;
    for (const member_t *m = members_first(self->o.members); m; m = m->next) {
        if (!m->placed)
            continue;
        if (!m->paused)
            return false;
        *lo = m->step < *lo ? m->step : *lo;
        *hi = m->step > *hi ? m->step : *hi;
        n++;
    }
    return n > 0;
}

/* The pause is complete: plan at the step the members paused at. */
static void s_check_paused(reconfig_t *self)
{
    uint64_t lo, hi;
    if (self->state != RECONFIG_PAUSING || !s_all_paused(self, &lo, &hi))
        return;
    if (lo != hi)
        log_warn("generation %" PRIu64 ": workers paused at steps %" PRIu64 " to %" PRIu64
                 ": planning at %" PRIu64, self->generation, lo, hi, hi);
    log_info("generation %" PRIu64 ": all workers paused at step %" PRIu64 " after %.1f ms",
             self->generation, hi, (double)(clock_mono_us() - self->pause_us) / 1000.0);
    s_plan(self, hi);
}

static void s_on_pause_timeout(uv_timer_t *timer)
{
    reconfig_t *self = timer->data;
    if (self->state != RECONFIG_PAUSING)
        return;
    char names[256] = "";
    uint32_t late = 0, n = 0;
    for (const member_t *m = members_first(self->o.members); m; m = m->next) {
        if (!m->placed)
            continue;
        n++;
        if (m->paused)
            continue;
        size_t len = strlen(names);
        if (late++ < 8)
            snprintf(names + len, sizeof names - len, "%s%s", len ? " " : "", m->id);
    }
    log_warn("generation %" PRIu64 ": %u of %u workers did not report PAUSED within %.0f ms "
             "(%s%s): planning without the pause", self->generation, late, n,
             (double)(clock_mono_us() - self->pause_us) / 1000.0, names, late > 8 ? " ..." : "");
    s_plan(self, progress_step(self->o.progress));
}

/* PAUSE to every member of the current generation: they stop at their next step boundary and
 * report PAUSED; the plan follows (s_check_paused), or the timeout. */
static void s_pause(reconfig_t *self)
{
    self->state = RECONFIG_PAUSING;
    self->pause_us = clock_mono_us();
    uint64_t slowest_us = 0;
    uint32_t n = 0, joining = 0, leaving = 0;
    for (member_t *m = members_first(self->o.members); m; m = m->next) {
        joining += !m->placed && !m->leaving && !m->donor;
        leaving += m->leaving && !m->donor;
        if (!m->placed)
            continue;
        m->pause_acked = m->paused = false;
        slowest_us = m->step_time_us > slowest_us ? m->step_time_us : slowest_us;
        s_send(self, m, PROTO_PAUSE, 0);
        n++;
    }
    uint64_t ms = (uint64_t)self->o.liveness * self->o.heartbeat_ms +
                  S_PAUSE_STEPS * (slowest_us / 1000);
    uv_timer_start(&self->wait_timer, s_on_pause_timeout, ms, 0);
    log_info("generation %" PRIu64 ": pausing %u workers (%u joining, %u leaving%s%s; at most "
             "%" PRIu64 " ms)", self->generation, n, joining, leaving,
             self->skew_why[0] ? ", " : "", self->skew_why, ms);
}

/* Plans once changes have settled: the control socket drained, no change for
 * S_PLAN_QUIET_US (or the first change S_PLAN_DEFER_MAX_US old). Then, by state:
 *  - RUNNING with training under way and nothing urgent: PAUSE first;
 *  - RUNNING otherwise: plan now, at the job's step;
 *  - PAUSING: the pause's end plans; an urgent change (a member gone) plans now, at the
 *    paused step when everyone left is paused, else at the job's step;
 *  - SYNCING: once the last PLAN is acked by everyone (or S_PLAN_ACK_WAIT_US old), plan again
 *    at its step: its members are not training, no PAUSE is needed.
 * Before cluster.expected_workers have been members there is no plan at all; the JOIN that
 * makes them so starts the timer again. */
static void s_on_plan_timer(uv_timer_t *timer)
{
    reconfig_t *self = timer->data;
    if (!self->dirty || self->stopping || !self->started) {
        self->dirty = self->urgent = false;
        if (!self->started)
            self->change_us = 0; // the reconfiguration begins when the wait ends
        return;
    }
    if (self->held) // reconfig_release starts the timer again
        return;
    int64_t now = clock_mono_us();
    bool settling = (now - self->last_change_us < S_PLAN_QUIET_US || s_control_pending(self)) &&
                    now - self->dirty_us < S_PLAN_DEFER_MAX_US;
    if (settling) {
        uv_timer_start(&self->plan_timer, s_on_plan_timer, 1, 0);
        return;
    }
    uint64_t lo, hi;
    switch (self->state) {
    case RECONFIG_PAUSING:
        if (!self->urgent)
            return;
        if (s_all_paused(self, &lo, &hi)) {
            s_plan(self, hi);
        } else {
            log_info("generation %" PRIu64 ": a worker went during the pause: planning now",
                     self->generation);
            s_plan(self, progress_step(self->o.progress));
        }
        return;
    case RECONFIG_SYNCING:
        if (self->pending_acks > 0 && now - self->plan_us < S_PLAN_ACK_WAIT_US) {
            uv_timer_start(&self->plan_timer, s_on_plan_timer, 1, 0);
            return;
        }
        s_plan(self, self->plan_step);
        return;
    case RECONFIG_RUNNING:
        if (!self->urgent && self->resumed && self->world > 0 &&
            progress_training(self->o.progress)) {
            s_pause(self);
            return;
        }
        s_plan(self, progress_step(self->o.progress));
        return;
    }
}

/* Members that did not ack the PLAN in time are expelled (which plans again). */
static void s_on_sync_timeout(uv_timer_t *timer)
{
    reconfig_t *self = timer->data;
    if (self->state != RECONFIG_SYNCING)
        return;
    char why[128];
    snprintf(why, sizeof why, "did not ack the PLAN of generation %" PRIu64 " within %" PRIu64
             " ms", self->generation, s_sync_ms(self));
    for (member_t *m = members_first(self->o.members), *next; m; m = next) {
        next = m->next;
        if (m->placed && m->state == MEMBER_SYNCING)
            self->o.remove(self->o.remove_arg, m, RECONFIG_REMOVED, why);
    }
}

/* --- loads ------------------------------------------------------------------------------------- */

/* A rebalance is due by the skew rule: go ahead (as a graceful change) when the placement by
 * load predicts at least 5% better than the current one under the same loads. */
static void s_consider_rebalance(reconfig_t *self, double imbalance)
{
    plan_report_t rep;
    uint64_t above = skew_above(self->skew);
    double threshold = skew_threshold(self->skew);
    skew_reset(self->skew);
    if (plan_compute(self->plan, self->o.members, skew_load(self->skew), &rep) != SEMOE_OK) {
        log_error("placement: %s", semoe_err_msg());
        return;
    }
    if (!(rep.after <= rep.before * S_REBALANCE_GAIN)) {
        if (!self->skip_logged)
            log_info("load skew: imbalance %.2f > %.2f for %" PRIu64 " steps, but the best "
                     "placement found predicts %.2f, not 5%% better: keeping this one",
                     imbalance, threshold, above, rep.after);
        self->skip_logged = true;
        return;
    }
    snprintf(self->skew_why, sizeof self->skew_why, "skew %.2f > %.2f for %" PRIu64 " steps",
             imbalance, threshold, above);
    log_info("load skew: imbalance %.2f > %.2f for %" PRIu64 " steps; a placement by load "
             "predicts %.2f (%" PRIu64 " copies to move): rebalancing", imbalance, threshold,
             above, rep.after, rep.moved);
    s_changed(self, false);
}

/* Once every member of the plan has reported a load for a step past the last one taken, the
 * step's loads go into the smoothed ones, and the skew rule looks at the placement. */
static void s_skew(reconfig_t *self)
{
    uint64_t lo = UINT64_MAX;
    uint32_t n = 0;
    for (const member_t *m = members_first(self->o.members); m; m = m->next) {
        if (!m->placed)
            continue;
        if (!m->has_load)
            return;
        lo = m->load_step < lo ? m->load_step : lo;
        n++;
    }
    if (n == 0 || (!self->load_fresh && lo <= self->load_step))
        return;
    uint64_t steps = self->load_fresh ? 1 : lo - self->load_step;
    self->load_fresh = false;
    self->load_step = lo;
    skew_take(self->skew, progress_loads(self->o.progress, self->o.members), steps);
    double imbalance = plan_imbalance(self->plan, skew_load(self->skew));
    bool due = skew_observe(self->skew, imbalance, steps);
    if (!(imbalance > skew_threshold(self->skew)))
        self->skip_logged = false;
    if (due && self->state == RECONFIG_RUNNING && self->resumed && !self->dirty && !self->held &&
        !self->stopping && progress_training(self->o.progress))
        s_consider_rebalance(self, imbalance);
}

/* A worker reports the tokens its copies took in its last step: take them once per step, only
 * from the current plan (an older one's loads belong to other holders) and only for steps done
 * in it (before its first, the report is of the last plan's holdings). */
static void s_take_load(reconfig_t *self, member_t *m, const proto_msg_t *msg)
{
    const proto_heartbeat_t *h = &msg->heartbeat;
    if (msg->hdr.generation != self->generation || !m->placed || h->load.count != self->n_total ||
        h->step <= self->plan_step || (m->has_load && m->load_step == h->step))
        return;
    progress_take_load(self->o.progress, m, h->load);
    m->has_load = true;
    m->load_step = h->step;
    s_skew(self);
}

/* --- events ------------------------------------------------------------------------------------ */

void reconfig_joined(reconfig_t *self, member_t *m)
{
    (void)m;
    self->joined++;
    s_changed(self, false);
}

void reconfig_handover(reconfig_t *self, member_t *m)
{
    bool others = false;
    for (const member_t *o = members_first(self->o.members); o; o = o->next)
        others = others || (o != m && !o->leaving);
    if (!others) {
        self->o.remove(self->o.remove_arg, m, RECONFIG_LEFT, "nobody would be left to take its "
                       "state");
        return;
    }
    m->leaving = true;
    log_info("worker %s leaves with handover: a donor of the next generation", m->id);
    s_changed(self, false);
}

void reconfig_removing(reconfig_t *self, member_t *m, reconfig_gone_t why)
{
    static const char *what[] = {"leave", "death", "removed"};
    if (m->placed) {
        if (m->state == MEMBER_SYNCING && self->pending_acks > 0)
            self->pending_acks--;
        self->left += why == RECONFIG_LEFT;
        self->died += why == RECONFIG_DIED;
        self->removed += why == RECONFIG_REMOVED;
        s_note(self, what[why], m->id);
        s_changed(self, true);
    } else if (m->donor) {
        if (why == RECONFIG_LEFT) {
            log_info("worker %s handed its state over and left", m->id);
        } else if (self->state == RECONFIG_SYNCING) {
            // the members may be waiting for its state: a new plan tells them it is gone
            self->died += why == RECONFIG_DIED;
            self->removed += why == RECONFIG_REMOVED;
            s_note(self, what[why], m->id);
            s_changed(self, true);
        }
    }
    m->placed = m->donor = false;
}

void reconfig_rejoined(reconfig_t *self, member_t *m)
{
    if (self->held) // this coordinator sent no PLAN yet: the restart's includes it
        return;
    if (m->placed && m->state == MEMBER_ACTIVE) {
        m->state = MEMBER_SYNCING;
        self->pending_acks++;
    }
    proto_header_t hdr = {.run_id = self->o.run_id, .generation = self->generation,
                          .seq = *self->o.seq};
    plan_resend(self->plan, m, self->o.control, &hdr);
    *self->o.seq = hdr.seq;
}

void reconfig_on_ack(reconfig_t *self, member_t *m, const proto_msg_t *msg)
{
    uint64_t g = msg->hdr.generation;
    if (g < self->generation || !m->placed)
        return; // an older generation's ACK crossed the new PLAN: life, nothing more
    if (msg->ack.acked_type == PROTO_PAUSE) {
        if (self->state == RECONFIG_PAUSING)
            m->pause_acked = true;
        return;
    }
    if (msg->ack.acked_type != PROTO_PLAN || m->state == MEMBER_ACTIVE)
        return;
    if (msg->ack.status != 0)
        log_warn("worker %s: applying the PLAN of generation %" PRIu64 " returned %u", m->id, g,
                 msg->ack.status);
    m->state = MEMBER_ACTIVE;
    m->acked_gen = g;
    if (msg->ack.status == 0)
        self->bytes += msg->ack.bytes;
    if (self->pending_acks > 0)
        self->pending_acks--;
    switch (self->state) {
    case RECONFIG_SYNCING:
        if (self->pending_acks == 0 && !self->dirty)
            s_resume(self);
        break;
    case RECONFIG_RUNNING: // it got the PLAN again (a duplicate JOIN): it waits for RESUME
        if (self->resumed && !self->held) // (held: an ACK of the PLAN before a restart)
            s_send(self, m, PROTO_RESUME, self->plan_step);
        break;
    case RECONFIG_PAUSING: // ... while the others pause: so does it
        m->pause_acked = m->paused = false;
        s_send(self, m, PROTO_PAUSE, 0);
        break;
    }
}

void reconfig_on_heartbeat(reconfig_t *self, member_t *m, const proto_msg_t *msg)
{
    s_take_load(self, m, msg);
    /* a member gave up the current generation's step (a collective ran past its bound): when
     * nothing else is changing, nobody else will plan again, so this does */
    if (msg->heartbeat.phase == PROTO_PHASE_STALLED && self->state == RECONFIG_RUNNING &&
        self->resumed && !self->dirty && m->placed && msg->hdr.generation == self->generation) {
        log_warn("worker %s abandoned generation %" PRIu64 " at step %" PRIu64 ": planning a "
                 "new one", m->id, self->generation, msg->heartbeat.step);
        s_note(self, "stalled", m->id);
        s_changed(self, true);
    }
    if (self->state == RECONFIG_PAUSING && msg->hdr.generation == self->generation &&
        m->placed && m->pause_acked && !m->paused && m->phase == PROTO_PHASE_PAUSED) {
        m->paused = true;
        s_check_paused(self);
    }
}

void reconfig_start(reconfig_t *self) { self->started = true; }

void reconfig_save(const reconfig_t *self, state_t *st)
{
    st->generation = self->generation;
    st->plan_step = self->plan_step;
    st->last_reconfig_ms = self->last_reconfig_ms;
    memcpy(st->by_kind, self->by_kind, sizeof st->by_kind);
    st->rebalances = self->hist;
    st->n_rebalances = self->n_hist;
    st->n_total = self->n_total;
    st->load = skew_load(self->skew);
    st->world = plan_world(self->plan);
    st->holder_offsets = st->world ? plan_offsets(self->plan) : NULL;
    st->holders = st->world ? plan_holders(self->plan) : NULL;
}

void reconfig_restore(reconfig_t *self, const state_t *st)
{
    self->generation = st->generation;
    self->plan_step = st->plan_step;
    self->last_reconfig_ms = st->last_reconfig_ms;
    memcpy(self->by_kind, st->by_kind, sizeof self->by_kind);
    self->n_hist = st->n_rebalances < RECONFIG_HISTORY ? st->n_rebalances : RECONFIG_HISTORY;
    memcpy(self->hist, st->rebalances, self->n_hist * sizeof *self->hist);
    if (st->load && st->n_total == self->n_total)
        skew_restore(self->skew, st->load);
    plan_restore(self->plan, self->o.members, st->world, st->holder_offsets, st->holders);
    self->world = st->world;
    uint32_t placed = 0;
    for (member_t *m = members_first(self->o.members); m; m = m->next) {
        placed += m->placed;
        m->state = MEMBER_SYNCING; // until it acks the restart's PLAN
    }
    /* A PLAN this coordinator did not send cannot be sent again: nobody waits for its ACKs. */
    self->pending_acks = 0;
    self->state = RECONFIG_RUNNING;
    self->restore_urgent = placed < self->world; // a holder died before the crash
    self->resumed = self->world > 0;             // its members may be training: pause first
    self->load_fresh = true;
    self->held = true;
}

void reconfig_release(reconfig_t *self)
{
    if (!self->held)
        return;
    self->held = false;
    if (!members_first(self->o.members) && !self->dirty)
        return; // nobody to plan for (a stopped job's state)
    self->keep = true; // plan_keep says whether it still can (nobody joined, left or died)
    s_note(self, "restart", NULL);
    s_changed(self, self->restore_urgent);
}

void reconfig_stop(reconfig_t *self)
{
    self->stopping = true;
    self->dirty = self->urgent = false;
    uv_timer_stop(&self->plan_timer);
    uv_timer_stop(&self->wait_timer);
}

/* --- life cycle and views ---------------------------------------------------------------------- */

reconfig_t *reconfig_new(const reconfig_opts_t *opts)
{
    reconfig_t *self = semoe_xcalloc(1, sizeof *self);
    self->o = *opts;
    const model_job_t *j = opts->job;
    self->L = j->model.num_hidden_layers;
    self->E = j->model.num_local_experts;
    self->n_total = (uint64_t)self->L * self->E;
    self->plan = plan_new(self->L, self->E, j->elastic.min_replicas);
    self->skew = skew_new(self->n_total, j->elastic.threshold, j->elastic.window,
                          j->elastic.patience);
    self->last_reconfig_ms = -1;
    self->started = j->cluster.expected_workers == 0;
    uv_timer_init(opts->loop, &self->plan_timer);
    uv_timer_init(opts->loop, &self->wait_timer);
    self->plan_timer.data = self->wait_timer.data = self;
    self->timers_open = true;
    return self;
}

void reconfig_close(reconfig_t *self)
{
    if (!self || !self->timers_open)
        return;
    uv_close((uv_handle_t *)&self->plan_timer, NULL);
    uv_close((uv_handle_t *)&self->wait_timer, NULL);
    self->timers_open = false;
}

void reconfig_destroy(reconfig_t **self_p)
{
    reconfig_t *self = *self_p;
    if (!self)
        return;
    plan_destroy(&self->plan);
    skew_destroy(&self->skew);
    free(self);
    *self_p = NULL;
}

uint64_t reconfig_generation(const reconfig_t *self) { return self->generation; }
uint32_t reconfig_world(const reconfig_t *self) { return self->world; }

bool reconfig_busy(const reconfig_t *self)
{
    return self->held || self->dirty || self->pending_acks > 0 ||
           self->state != RECONFIG_RUNNING;
}

void reconfig_view(const reconfig_t *self, status_view_t *v)
{
    v->generation = self->generation;
    v->world = self->world;
    v->last_reconfig_ms = self->last_reconfig_ms;
    v->pending_acks = self->pending_acks;
    v->load = skew_load(self->skew);
    v->reconfig = s_state_names[self->state];
    v->imbalance_smoothed = plan_imbalance(self->plan, v->load);
    v->rebalances = self->hist;
    v->n_rebalances = self->n_hist;
    v->rebalances_by_kind = self->by_kind;
}
