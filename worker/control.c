/* The worker's control actor: a zmq_poll loop over its pipe, the DEALER to the coordinator and
 * the pipe of its trainer actor (worker/trainer.c), which it starts and feeds the job and the
 * plans. Paranoid Pirate, worker side: any message is life, HEARTBEAT every interval, silence
 * for liveness intervals: a new socket after a backoff of 1 s doubling to a cap. */
#include "worker/control.h"
#include "worker/commid.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/log.h"
#include "model/job.h"
#include "worker/plan.h"
#include "worker/trainer.h"

#define S_DEFAULT_HEARTBEAT_MS 1000 /* until a WELCOME says otherwise */
#define S_DEFAULT_LIVENESS 3
#define S_BACKOFF_START_MS 1000
#define S_LEAVE_LINGER_MS 1000      /* how long a LEAVE may wait in the socket at exit */
#define S_DRAIN_MAX 256             /* messages handled per socket per loop turn */
#define S_PROGRESS_HB_MS 50         /* a step's progress goes out at once, at most this often */
#define S_HANDOVER_MIN_MS 30000     /* how long a leaving worker waits to hand its state over, at
                                     * least (10 liveness windows when longer) */

typedef enum {
    S_BACKOFF, /* no control socket; a new one at retry_at_ms */
    S_JOINING, /* JOIN sent, waiting for WELCOME */
    S_REFUSED, /* JOIN refused (our id is still live elsewhere); a new JOIN at retry_at_ms */
    S_MEMBER,  /* welcomed: heartbeats, plans */
    S_LEFT,    /* LEAVE sent on request; only the pipe is served */
    S_STOPPED, /* the coordinator sent STOP; only the pipe is served */
} s_state_t;

static const char *s_state_names[] = {"backoff", "joining", "refused", "member", "left", "stopped"};

typedef struct {
    worker_control_config_t *cfg;
    void *pipe;
    void *dealer;                 /* NULL while in backoff, left or stopped */
    actor_t *trainer;             /* owns the data port; trains */
    worker_trainer_config_t tcfg;
    worker_commid_t *commid;      /* COMM's id, from here to the trainer (worker/commid.h) */
    void *poke;                   /* PAIR to the trainer: interrupts its collectives */
    char poke_ep[64];
    bool plan_acked;              /* the current plan's ACK went out (the trainer took it up) */
    bool pause_pending;           /* a PAUSE waits for the trainer to pause before its ACK */
    uint64_t pause_gen;
    bool handing_over;            /* asked to leave with handover: waits for the trainer */
    int64_t handover_deadline_ms;
    bool stopping;                /* a STOP with checkpoint: waits for the trainer's */
    int64_t stop_deadline_ms;
    char leave_reason[PROTO_MAX_TEXT + 1];
    char data_endpoint[PROTO_MAX_ENDPOINT + 1];
    s_state_t state;
    bool terminated;

    /* the coordinator run we are in, and our place in it */
    uint64_t run_id;
    uint64_t generation;
    uint64_t seq;
    uint32_t heartbeat_ms, liveness;
    int64_t life_ms;              /* last time the coordinator showed life (or we dialled) */
    int64_t next_hb_ms;           /* next HEARTBEAT (member) */
    int64_t retry_at_ms;          /* next JOIN (refused) or new socket (backoff) */
    int backoff_ms;
    int backoff_max_ms;           /* --reconnect-max-ms */
    bool refusal_logged;

    /* the job from WELCOME: L and E size the load vector */
    char *job;
    size_t job_len;
    uint32_t num_layers, num_experts;
    uint32_t *load;               /* (L*E) tokens per expert last step; zeros until training */

    /* the current plan */
    bool have_plan;
    worker_plan_t plan;

    /* training progress, as the trainer last reported it (sent in HEARTBEAT) */
    uint64_t step, step_time_us;
    worker_progress_t progress;
    int64_t last_hb_ms;           /* when the last HEARTBEAT went out */
    bool paused;
    uint64_t pause_step;

    uint64_t joins;               /* WELCOMEs received */
} s_ctl_t;

/* --- sending ---------------------------------------------------------------------------- */

static proto_header_t s_header(s_ctl_t *self, uint32_t type, uint64_t generation)
{
    return (proto_header_t){.type = type, .run_id = self->run_id, .generation = generation,
                            .seq = ++self->seq};
}

static void s_send(s_ctl_t *self, const proto_msg_t *msg)
{
    if (!self->dealer)
        return;
    if (proto_send(self->dealer, NULL, 0, msg) != SEMOE_OK)
        log_warn("could not send %s to the coordinator: %s", proto_type_name(msg->hdr.type),
                 semoe_err_msg());
}

static void s_send_join(s_ctl_t *self)
{
    const worker_control_config_t *cfg = self->cfg;
    proto_msg_t msg = {0};
    /* A JOIN belongs to no run yet: the WELCOME tells us which one we are in. */
    msg.hdr = (proto_header_t){.type = PROTO_JOIN, .seq = ++self->seq};
    proto_join_t *j = &msg.join;
    snprintf(j->id, sizeof j->id, "%s", cfg->id);
    snprintf(j->host, sizeof j->host, "%s", cfg->host);
    j->pid = (uint32_t)getpid();
    snprintf(j->device_kind, sizeof j->device_kind, "%s", cfg->device.kind);
    snprintf(j->device_name, sizeof j->device_name, "%s", cfg->device.name);
    j->device_index = cfg->device.index;
    j->mem_hbm = cfg->device.total[PROTO_TIER_HBM];
    j->mem_host = cfg->device.total[PROTO_TIER_HOST];
    j->mem_ssd = cfg->device.total[PROTO_TIER_SSD];
    snprintf(j->data_endpoint, sizeof j->data_endpoint, "%s", self->data_endpoint);
    s_send(self, &msg);
    self->state = S_JOINING;
    log_debug("JOIN sent to %s", cfg->coordinator);
}

static void s_send_ack(s_ctl_t *self, uint32_t acked_type, uint64_t generation, uint32_t status,
                       uint64_t bytes)
{
    proto_msg_t msg = {0};
    msg.hdr = s_header(self, PROTO_ACK, generation);
    msg.ack.acked_type = acked_type;
    msg.ack.status = status;
    msg.ack.bytes = bytes;
    s_send(self, &msg);
}

static void s_send_heartbeat(s_ctl_t *self)
{
    proto_msg_t msg = {0};
    msg.hdr = s_header(self, PROTO_HEARTBEAT, self->generation);
    uint64_t used[PROTO_TIERS];
    worker_device_used(&self->cfg->device, used);
    msg.heartbeat.step = self->step;
    msg.heartbeat.step_time_us = self->step_time_us;
    msg.heartbeat.mem_hbm = used[PROTO_TIER_HBM];
    msg.heartbeat.mem_host = used[PROTO_TIER_HOST];
    msg.heartbeat.mem_ssd = used[PROTO_TIER_SSD];
    uint32_t n = self->load ? self->num_layers * self->num_experts : 0;
    msg.heartbeat.load = PROTO_U32S(self->load, n);
    msg.heartbeat.loss = self->progress.loss;
    msg.heartbeat.eval_loss = self->progress.eval_loss;
    msg.heartbeat.eval_step = self->progress.eval_step;
    msg.heartbeat.tokens_per_s = self->progress.tokens_per_s;
    msg.heartbeat.phase = self->progress.phase;
    s_send(self, &msg);
    self->last_hb_ms = clock_mono_ms();
}

/* --- the control socket's life ---------------------------------------------------------- */

/* ZeroMQ speaks IPv6 only when asked; an endpoint with a bracketed address needs it. */
static void s_ipv6_if_needed(void *sock, const char *endpoint)
{
    int on = 1;
    if (strchr(endpoint, '['))
        zmq_setsockopt(sock, ZMQ_IPV6, &on, sizeof on);
}

static void s_close_dealer(s_ctl_t *self, int linger_ms)
{
    if (!self->dealer)
        return;
    zmq_setsockopt(self->dealer, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    zmq_close(self->dealer);
    self->dealer = NULL;
}

/* Opens a fresh DEALER to the coordinator and sends JOIN. On failure the actor stays in
 * backoff and tries again later. */
static void s_dial(s_ctl_t *self, int64_t now)
{
    const char *ep = self->cfg->coordinator;
    self->dealer = zmq_socket(self->cfg->ctx, ZMQ_DEALER);
    if (self->dealer)
        s_ipv6_if_needed(self->dealer, ep);
    if (!self->dealer || proto_socket_setup(self->dealer) != SEMOE_OK ||
        zmq_connect(self->dealer, ep) != 0) {
        log_error("cannot open a socket to %s: %s", ep, zmq_strerror(zmq_errno()));
        s_close_dealer(self, 0);
        self->state = S_BACKOFF;
        self->retry_at_ms = now + self->backoff_ms;
        return;
    }
    self->life_ms = now; /* the coordinator gets a full liveness window to answer */
    s_send_join(self);
}

/* Drops the socket (and what is queued in it) and dials again after the backoff, which
 * doubles each time up to the cap. */
static void s_backoff(s_ctl_t *self, int64_t now)
{
    s_close_dealer(self, 0);
    self->state = S_BACKOFF;
    self->retry_at_ms = now + self->backoff_ms;
    int cap = self->backoff_max_ms;
    self->backoff_ms = self->backoff_ms > cap / 2 ? cap : self->backoff_ms * 2;
}

/* The coordinator has been silent too long: reconnect after the backoff. */
static void s_lost(s_ctl_t *self, int64_t now)
{
    int64_t silent = now - self->life_ms;
    if (self->state == S_JOINING)
        log_warn("no answer from %s for %" PRId64 " ms (is semoe-coordinator running?): "
                 "trying again in %.1f s", self->cfg->coordinator, silent,
                 self->backoff_ms / 1000.0);
    else
        log_warn("no word from the coordinator at %s for %" PRId64 " ms: reconnecting in %.1f s",
                 self->cfg->coordinator, silent, self->backoff_ms / 1000.0);
    s_backoff(self, now);
}

static void s_leave(s_ctl_t *self, const char *reason)
{
    if (self->dealer && self->state != S_BACKOFF) {
        proto_msg_t msg = {0};
        msg.hdr = s_header(self, PROTO_LEAVE, self->generation);
        snprintf(msg.leave.reason, sizeof msg.leave.reason, "%s", reason);
        s_send(self, &msg);
        log_info("left the job (%s)", reason);
    }
    /* linger so that the LEAVE still goes out after close; zmq_ctx_term waits at most this.
     * Short when the coordinator has not answered lately: there may be nobody to tell. */
    bool heard = self->state == S_MEMBER || self->state == S_REFUSED;
    s_close_dealer(self, heard ? S_LEAVE_LINGER_MS : 100);
    self->state = S_LEFT;
}

/* Leaves now and tells the creator ("LEFT"). */
static void s_leave_done(s_ctl_t *self, const char *reason)
{
    self->handing_over = false;
    s_leave(self, reason);
    actor_send_str(self->pipe, "LEFT", 0);
}

/* How long the trainer gets for what must happen before this worker goes (a handover, a
 * STOP's checkpoint): 10 liveness windows, at least S_HANDOVER_MIN_MS; the deadline. */
static int64_t s_grace_deadline(const s_ctl_t *self)
{
    int64_t window = 10 * (int64_t)self->liveness * self->heartbeat_ms;
    return clock_mono_ms() + (window > S_HANDOVER_MIN_MS ? window : S_HANDOVER_MIN_MS);
}

/* A worker asked to leave: with training state, first LEAVE with handover (the coordinator
 * plans it out and makes it a donor of the next generation), then, once the trainer has handed
 * the state over (or after the deadline), LEAVE for good. Without state, at once. */
static void s_leave_requested(s_ctl_t *self, const char *reason)
{
    uint32_t ph = self->progress.phase;
    bool state = ph == PROTO_PHASE_TRAINING || ph == PROTO_PHASE_PAUSED;
    if (self->state != S_MEMBER || !state || !self->dealer) {
        s_leave_done(self, reason);
        return;
    }
    snprintf(self->leave_reason, sizeof self->leave_reason, "%s", reason);
    proto_msg_t msg = {0};
    msg.hdr = s_header(self, PROTO_LEAVE, self->generation);
    snprintf(msg.leave.reason, sizeof msg.leave.reason, "%s", reason);
    msg.leave.handover = 1;
    s_send(self, &msg);
    self->handing_over = true;
    self->handover_deadline_ms = s_grace_deadline(self);
    log_info("leaving (%s): handing this worker's experts over first", reason);
}

/* --- applying what the coordinator sends ------------------------------------------------ */

static void s_forget_plan(s_ctl_t *self)
{
    self->have_plan = false;
    worker_plan_clear(&self->plan);
}

/* Keeps the job text and sizes the load vector from its model (L layers x E experts). */
static void s_take_job(s_ctl_t *self, proto_bytes_t job)
{
    if (self->job && self->job_len == job.size && memcmp(self->job, job.data, job.size) == 0)
        return;
    free(self->job);
    self->job = semoe_xmalloc((size_t)job.size + 1);
    memcpy(self->job, job.data, job.size);
    self->job[job.size] = 0;
    self->job_len = job.size;
    free(self->load);
    self->load = NULL;
    self->num_layers = self->num_experts = 0;
    model_job_t *spec = NULL;
    if (model_job_parse(self->job, self->job_len, "job from WELCOME", &spec) != SEMOE_OK) {
        log_error("%s (the load vector will follow the PLAN's size)", semoe_err_msg());
        return;
    }
    self->num_layers = spec->model.num_hidden_layers;
    self->num_experts = spec->model.num_local_experts;
    model_job_destroy(&spec);
    self->load = semoe_xcalloc((size_t)self->num_layers * self->num_experts, sizeof(uint32_t));
}

static void s_on_welcome(s_ctl_t *self, const proto_msg_t *msg, int64_t now)
{
    const proto_welcome_t *w = &msg->welcome;
    self->heartbeat_ms = w->heartbeat_ms ? w->heartbeat_ms : S_DEFAULT_HEARTBEAT_MS;
    self->liveness = w->liveness ? w->liveness : S_DEFAULT_LIVENESS;
    self->run_id = msg->hdr.run_id;
    self->generation = msg->hdr.generation;
    worker_commid_reset(self->commid); /* a new run's generations may count from lower */
    s_take_job(self, w->job);
    actor_send_str(actor_pipe(self->trainer), "JOB", ZMQ_SNDMORE);
    zmq_send(actor_pipe(self->trainer), w->job.data, w->job.size, 0);
    s_forget_plan(self);
    if (strcmp(w->worker_id, self->cfg->id) != 0)
        log_warn("the coordinator calls this worker %s, not %s", w->worker_id, self->cfg->id);
    self->state = S_MEMBER;
    self->refusal_logged = false;
    self->backoff_ms = S_BACKOFF_START_MS < self->backoff_max_ms ? S_BACKOFF_START_MS
                                                                 : self->backoff_max_ms;
    self->next_hb_ms = now + self->heartbeat_ms;
    self->joins++;
    log_info("joined %s (run %016" PRIx64 ", generation %" PRIu64 ", heartbeat %u ms x %u, "
             "model %u layers x %u experts)", self->cfg->coordinator, self->run_id,
             self->generation, self->heartbeat_ms, self->liveness, self->num_layers,
             self->num_experts);
}

static void s_on_plan(s_ctl_t *self, const proto_msg_t *msg)
{
    const proto_plan_t *p = &msg->plan;
    uint64_t gen = msg->hdr.generation;
    if (gen < self->generation || (self->have_plan && gen < self->plan.generation)) {
        log_debug("ignoring a PLAN of generation %" PRIu64 " (we are in %" PRIu64 ")", gen,
                  self->generation);
        return;
    }
    if (self->have_plan && gen == self->plan.generation) {
        if (self->plan_acked) /* a repeat: our ACK may have crossed it */
            s_send_ack(self, PROTO_PLAN, gen, 0, self->progress.moved_bytes);
        return;
    }
    const char *problem = worker_plan_check(p, self->load ? self->num_layers : 0,
                                            self->load ? self->num_experts : 0);
    if (problem) {
        log_error("PLAN of generation %" PRIu64 " refused: %s", gen, problem);
        s_send_ack(self, PROTO_PLAN, gen, 1, 0);
        return;
    }
    worker_plan_take(&self->plan, gen, p, self->cfg->id);
    self->plan.run_id = msg->hdr.run_id;
    self->have_plan = true;
    self->generation = gen;
    self->step = self->step > p->step ? self->step : p->step;
    if (!self->load) { /* the job did not parse: size the load vector from the plan */
        self->num_layers = p->num_layers;
        self->num_experts = p->num_experts;
        self->load = semoe_xcalloc((size_t)p->num_layers * p->num_experts, sizeof(uint32_t));
    }
    worker_plan_log(&self->plan);
    worker_plan_t *copy = semoe_xmalloc(sizeof *copy); /* the trainer's from here */
    worker_plan_copy(copy, &self->plan);
    /* the poke first: out of any wait on the old generation. Queued before the PLAN, it is
     * there when the trainer reads the PLAN and drains it, so it cannot interrupt the new
     * generation's own migration. */
    zmq_send(self->poke, "P", 1, ZMQ_DONTWAIT);
    actor_send_str(actor_pipe(self->trainer), "PLAN", ZMQ_SNDMORE);
    zmq_send(actor_pipe(self->trainer), &copy, sizeof copy, 0);
    /* the ACK goes out once the trainer has taken the plan up (s_on_trainer) */
    self->plan_acked = false;
}

/* ACKs what the trainer's last report completes: the current PLAN once it is taken up (its
 * state migrated), a PAUSE once it has paused. */
static void s_ack_progress(s_ctl_t *self)
{
    if (self->state != S_MEMBER)
        return;
    if (self->have_plan && !self->plan_acked &&
        self->progress.ready_gen == self->plan.generation) {
        s_send_ack(self, PROTO_PLAN, self->plan.generation, 0, self->progress.moved_bytes);
        self->plan_acked = true;
    }
    if (self->pause_pending && self->progress.phase == PROTO_PHASE_PAUSED) {
        s_send_ack(self, PROTO_PAUSE, self->pause_gen, 0, 0);
        self->pause_pending = false;
    }
}

static void s_on_error(s_ctl_t *self, const proto_msg_t *msg, int64_t now)
{
    const proto_error_t *e = &msg->error;
    switch (e->code) {
    case PROTO_ERR_NOT_MEMBER:
        /* While joining this answers a heartbeat sent before our JOIN: the WELCOME follows. */
        if (self->state == S_MEMBER && self->handing_over) { /* it let us go already */
            s_leave_done(self, self->leave_reason);
        } else if (self->state == S_MEMBER) {
            log_warn("the coordinator no longer counts this worker as a member (%s): rejoining",
                     e->text);
            s_send_join(self);
        }
        break;
    case PROTO_ERR_REFUSED:
        if (!self->refusal_logged)
            log_warn("JOIN refused: %s; retrying every %u ms", e->text, self->heartbeat_ms);
        self->refusal_logged = true;
        self->state = S_REFUSED;
        self->retry_at_ms = now + self->heartbeat_ms;
        break;
    default:
        /* It removed us for what we sent and ignores this connection until we JOIN again;
         * a new connection after the backoff keeps a bug of ours from spinning. */
        if (self->state == S_MEMBER) {
            log_error("the coordinator removed this worker: %s (error %u); rejoining in %.1f s",
                      e->text, e->code, self->backoff_ms / 1000.0);
            s_backoff(self, now);
        } else {
            log_error("the coordinator says: %s (error %u)", e->text, e->code);
        }
        break;
    }
}

static void s_stop_done(s_ctl_t *self)
{
    log_info("stopping");
    /* LEAVE tells the coordinator at once that we are gone, so it can exit without waiting
     * out our liveness window. */
    s_leave(self, "stopped by the coordinator");
    self->stopping = false;
    self->state = S_STOPPED;
    actor_send_str(self->pipe, "STOPPED", 0);
}

/* STOP: with checkpoint and training state, the trainer checkpoints first (at a step boundary
 * the ranks agree on) and we stop once it says so (or at the deadline); else at once. */
static void s_on_stop(s_ctl_t *self, uint32_t checkpoint)
{
    if (self->stopping)
        return;
    uint32_t ph = self->progress.phase;
    bool state = ph == PROTO_PHASE_TRAINING || ph == PROTO_PHASE_PAUSED;
    log_info("STOP from the coordinator%s", checkpoint && state ? ": checkpoint first" : "");
    if (!checkpoint || !state || self->progress.stopped) {
        s_stop_done(self);
        return;
    }
    actor_send_str(actor_pipe(self->trainer), "STOP", 0);
    self->stopping = true;
    self->stop_deadline_ms = s_grace_deadline(self);
}

static void s_on_message(s_ctl_t *self, const proto_msg_t *msg, int64_t now)
{
    self->life_ms = now; /* any message counts as life */
    uint32_t type = msg->hdr.type;
    if (type == PROTO_STOP) {
        if (self->state != S_STOPPED)
            s_on_stop(self, msg->stop.checkpoint);
        return;
    }
    if (type == PROTO_WELCOME) {
        if (self->state == S_JOINING || self->state == S_REFUSED || self->state == S_MEMBER)
            s_on_welcome(self, msg, now);
        return;
    }
    if (type == PROTO_ERROR) {
        s_on_error(self, msg, now);
        return;
    }
    if (self->state != S_MEMBER) {
        log_debug("ignoring %s while %s", proto_type_name(type), s_state_names[self->state]);
        return;
    }
    if (msg->hdr.run_id != self->run_id) {
        log_warn("the coordinator's run changed (%016" PRIx64 " -> %016" PRIx64 "): rejoining",
                 self->run_id, msg->hdr.run_id);
        s_send_join(self);
        return;
    }
    switch (type) {
    case PROTO_HEARTBEAT:
        break;
    case PROTO_PLAN:
        s_on_plan(self, msg);
        break;
    case PROTO_COMM: /* the relayed id of this generation's communicator: for the trainer */
        if (worker_commid_put(self->commid, msg->hdr.generation, msg->comm.comm_id.data,
                              msg->comm.comm_id.size) != SEMOE_OK)
            log_warn("COMM of generation %" PRIu64 ": %s", msg->hdr.generation,
                     semoe_err_msg());
        s_send_ack(self, PROTO_COMM, msg->hdr.generation, 0, 0);
        break;
    case PROTO_PAUSE:
        self->paused = true;
        self->pause_step = msg->pause.step;
        self->pause_pending = true;
        self->pause_gen = msg->hdr.generation;
        log_info("pausing at the next step boundary");
        actor_send_str(actor_pipe(self->trainer), "PAUSE", 0);
        if (self->progress.phase == PROTO_PHASE_PAUSED) { /* already paused: say so at once */
            s_ack_progress(self);
            s_send_heartbeat(self);
        }
        break;
    case PROTO_RESUME:
        self->paused = false;
        self->pause_pending = false;
        log_info("resuming (step %" PRIu64 ")", msg->resume.step);
        actor_send_str(actor_pipe(self->trainer), "RESUME", 0);
        break;
    default:
        log_warn("ignoring %s, which the coordinator does not send", proto_type_name(type));
        break;
    }
}

/* Reads what is waiting on the DEALER, one control message per ZeroMQ message. */
static void s_drain_dealer(s_ctl_t *self)
{
    for (int i = 0; i < S_DRAIN_MAX && self->dealer; i++) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, self->dealer, ZMQ_DONTWAIT) == -1) {
            if (zmq_errno() != EAGAIN)
                log_warn("receive from the coordinator: %s", zmq_strerror(zmq_errno()));
            zmq_msg_close(&frame);
            return;
        }
        bool more = zmq_msg_more(&frame);
        int64_t now = clock_mono_ms();
        proto_msg_t msg;
        proto_result_t r = proto_decode(zmq_msg_data(&frame), zmq_msg_size(&frame), &msg);
        if (r != PROTO_OK) {
            self->life_ms = now;
            log_warn("ignoring a malformed message from the coordinator: %s",
                     proto_result_str(r));
        } else {
            log_debug("got %s of generation %" PRIu64, proto_type_name(msg.hdr.type),
                      msg.hdr.generation);
            s_on_message(self, &msg, now);
        }
        zmq_msg_close(&frame);
        while (more && self->dealer) { /* frames after the first belong to a later data plane */
            zmq_msg_t extra;
            zmq_msg_init(&extra);
            if (zmq_msg_recv(&extra, self->dealer, ZMQ_DONTWAIT) == -1)
                more = false;
            else
                more = zmq_msg_more(&extra);
            zmq_msg_close(&extra);
        }
    }
}

/* PROGRESS from the trainer: keep it for the heartbeats, and send one at once (a step's news
 * reaches the coordinator without waiting for the timer, at most every S_PROGRESS_HB_MS). */
/* The trainer, as the new rank 0, made its generation's communicator id: [generation, 8 bytes
 * little endian][id]. Up in COMM, for the coordinator to relay to every rank (this one too). */
static void s_send_comm(s_ctl_t *self, const uint8_t *body, size_t len)
{
    uint64_t gen = 0;
    memcpy(&gen, body, 8);
    if (self->state != S_MEMBER || !self->have_plan || gen != self->plan.generation) {
        log_debug("dropping the communicator id of generation %" PRIu64 " (plan %" PRIu64 ")",
                  gen, self->have_plan ? self->plan.generation : 0);
        return;
    }
    proto_msg_t msg = {0};
    msg.hdr = s_header(self, PROTO_COMM, gen);
    msg.comm.world = self->plan.world;
    msg.comm.comm_id = (proto_bytes_t){body + 8, (uint32_t)(len - 8)};
    s_send(self, &msg);
    log_info("generation %" PRIu64 ": sent the communicator id (%zu bytes) up", gen, len - 8);
}

static void s_on_trainer(s_ctl_t *self)
{
    void *pipe = actor_pipe(self->trainer);
    zmq_msg_t f[3];
    int n = 0;
    for (bool more = true; more && n < 3; n++) {
        zmq_msg_init(&f[n]);
        if (zmq_msg_recv(&f[n], pipe, 0) == -1) {
            zmq_msg_close(&f[n]);
            break;
        }
        more = zmq_msg_more(&f[n]);
    }
    if (n == 2 && zmq_msg_size(&f[0]) == 6 && !memcmp(zmq_msg_data(&f[0]), "COMMID", 6) &&
        zmq_msg_size(&f[1]) > 8 && zmq_msg_size(&f[1]) <= 8 + PROTO_MAX_COMM) {
        s_send_comm(self, zmq_msg_data(&f[1]), zmq_msg_size(&f[1]));
        for (int i = 0; i < n; i++)
            zmq_msg_close(&f[i]);
        return;
    }
    bool ok = n == 3 && zmq_msg_size(&f[0]) == 8 && memcmp(zmq_msg_data(&f[0]), "PROGRESS", 8) == 0 &&
              zmq_msg_size(&f[1]) == sizeof(worker_progress_t);
    if (ok) {
        memcpy(&self->progress, zmq_msg_data(&f[1]), sizeof self->progress);
        self->step = self->progress.step;
        self->step_time_us = self->progress.step_time_us;
        uint32_t want = self->load ? self->num_layers * self->num_experts : 0;
        if (zmq_msg_size(&f[2]) == (size_t)want * sizeof(uint32_t) && want)
            memcpy(self->load, zmq_msg_data(&f[2]), zmq_msg_size(&f[2]));
        /* ACKs first: the coordinator counts a member paused on a HEARTBEAT after its ACK */
        s_ack_progress(self);
        int64_t now = clock_mono_ms();
        bool urgent = self->progress.phase == PROTO_PHASE_PAUSED; /* the coordinator waits */
        if (self->state == S_MEMBER && (urgent || now - self->last_hb_ms >= S_PROGRESS_HB_MS)) {
            s_send_heartbeat(self);
            self->next_hb_ms = now + self->heartbeat_ms;
        }
        if (self->handing_over && self->progress.handed_over) {
            log_info("experts handed over");
            s_leave_done(self, self->leave_reason);
        }
        if (self->stopping && self->progress.stopped)
            s_stop_done(self);
    } else {
        log_warn("control actor: a malformed report from the trainer");
    }
    for (int i = 0; i < n; i++)
        zmq_msg_close(&f[i]);
}

/* --- the pipe ----------------------------------------------------------------------------- */

static void s_reply_status(s_ctl_t *self)
{
    const worker_plan_t *plan = &self->plan;
    char experts[1024];
    worker_plan_ids_str(plan->experts, plan->n_experts, experts, sizeof experts);
    char rank[16] = "-";
    if (self->have_plan && plan->rank != PROTO_NO_RANK)
        snprintf(rank, sizeof rank, "%u", plan->rank);
    char line[2048];
    snprintf(line, sizeof line,
             "state=%s id=%s run=%016" PRIx64 " generation=%" PRIu64 " rank=%s world=%u "
             "experts=%s batch=%" PRIu64 "-%" PRIu64 " joins=%" PRIu64 " paused=%d "
             "heartbeat_ms=%u backoff_ms=%d data=%s step=%" PRIu64 " phase=%u",
             s_state_names[self->state], self->cfg->id, self->run_id, self->generation, rank,
             plan->world, experts, plan->batch_lo, plan->batch_hi, self->joins, self->paused,
             self->heartbeat_ms, self->backoff_ms, self->data_endpoint, self->step,
             self->progress.phase);
    actor_send_str(self->pipe, line, 0);
}

static void s_on_pipe(s_ctl_t *self)
{
    char *cmd = actor_recv_str(self->pipe);
    if (!cmd) { /* the pipe broke: nobody is left to serve */
        self->terminated = true;
        return;
    }
    if (strcmp(cmd, "$TERM") == 0) {
        if (self->state != S_LEFT && self->state != S_STOPPED)
            s_leave(self, "worker shutting down");
        self->terminated = true;
    } else if (strcmp(cmd, "LEAVE") == 0) {
        char *reason = actor_recv_str(self->pipe);
        if (self->state == S_LEFT || self->state == S_STOPPED)
            actor_send_str(self->pipe, "LEFT", 0);
        else if (self->handing_over) /* asked again: go now */
            s_leave_done(self, reason ? reason : "worker shutting down");
        else if (self->stopping) /* a signal while the STOP's checkpoint is written: go now */
            s_stop_done(self);
        else
            s_leave_requested(self, reason ? reason : "worker shutting down");
        free(reason);
    } else if (strcmp(cmd, "STATUS") == 0) {
        s_reply_status(self);
    } else {
        log_warn("control actor: unknown command %s", cmd);
    }
    free(cmd);
}

/* --- timers and the loop ------------------------------------------------------------------ */

static void s_on_timers(s_ctl_t *self, int64_t now)
{
    if (self->handing_over && now >= self->handover_deadline_ms) {
        log_warn("no handover before the deadline: leaving without it (a replica or the last "
                 "checkpoint restores the experts)");
        s_leave_done(self, self->leave_reason);
    }
    if (self->stopping && now >= self->stop_deadline_ms) {
        log_warn("no checkpoint before the deadline: stopping without it (the last one "
                 "stands)");
        s_stop_done(self);
    }
    int64_t dead_after = (int64_t)self->liveness * self->heartbeat_ms;
    switch (self->state) {
    case S_BACKOFF:
        if (now >= self->retry_at_ms)
            s_dial(self, now);
        break;
    case S_JOINING:
        if (now - self->life_ms >= dead_after)
            s_lost(self, now);
        break;
    case S_REFUSED:
        if (now - self->life_ms >= dead_after)
            s_lost(self, now);
        else if (now >= self->retry_at_ms)
            s_send_join(self);
        break;
    case S_MEMBER:
        if (now - self->life_ms >= dead_after) {
            s_lost(self, now);
        } else if (now >= self->next_hb_ms) {
            s_send_heartbeat(self);
            /* from now, not from the missed deadline: no burst after a SIGSTOP */
            self->next_hb_ms = now + self->heartbeat_ms;
        }
        break;
    case S_LEFT:
    case S_STOPPED:
        break;
    }
}

/* Milliseconds until the next timer, -1 when none is armed. */
static long s_timeout(const s_ctl_t *self, int64_t now)
{
    int64_t dead_at = self->life_ms + (int64_t)self->liveness * self->heartbeat_ms;
    int64_t at;
    switch (self->state) {
    case S_BACKOFF: at = self->retry_at_ms; break;
    case S_JOINING: at = dead_at; break;
    case S_REFUSED: at = self->retry_at_ms < dead_at ? self->retry_at_ms : dead_at; break;
    case S_MEMBER: at = self->next_hb_ms < dead_at ? self->next_hb_ms : dead_at; break;
    default: return -1;
    }
    return at > now ? (long)(at - now) : 0;
}

/* The poll came back late_ms after its deadline: this process was frozen (SIGSTOP, a paused
 * VM) or starved. The coordinator's silence over that time says nothing about it, so instead
 * of giving it up we check in at once: a HEARTBEAT, which a coordinator that dropped us meanwhile
 * answers with NOT_MEMBER (and we rejoin), and a fresh liveness window for its answer. */
static void s_on_stall(s_ctl_t *self, int64_t now, int64_t late_ms)
{
    if (self->state != S_MEMBER && self->state != S_JOINING && self->state != S_REFUSED)
        return;
    log_info("this process was frozen for %" PRId64 " ms: checking in with the coordinator",
             late_ms);
    self->life_ms = now > self->life_ms ? now : self->life_ms;
    if (self->state == S_MEMBER) {
        s_send_heartbeat(self);
        self->next_hb_ms = now + self->heartbeat_ms;
    }
}

static void s_loop(s_ctl_t *self)
{
    while (!self->terminated) {
        int64_t now = clock_mono_ms();
        zmq_pollitem_t items[3] = {{self->pipe, 0, ZMQ_POLLIN, 0},
                                   {actor_pipe(self->trainer), 0, ZMQ_POLLIN, 0},
                                   {self->dealer, 0, ZMQ_POLLIN, 0}};
        int n = self->dealer ? 3 : 2;
        long timeout = s_timeout(self, now);
        int rc = zmq_poll(items, n, timeout);
        int64_t woke = clock_mono_ms();
        if (rc == -1 && zmq_errno() != EINTR) {
            log_error("control actor: zmq_poll: %s", zmq_strerror(zmq_errno()));
            break;
        }
        if (rc > 0 && (items[0].revents & ZMQ_POLLIN))
            s_on_pipe(self);
        if (self->terminated)
            break;
        if (rc > 0 && (items[1].revents & ZMQ_POLLIN))
            s_on_trainer(self);
        /* messages first, then timers: what waited in the socket during a SIGSTOP is life */
        if (rc > 0 && n == 3 && (items[2].revents & ZMQ_POLLIN))
            s_drain_dealer(self);
        int64_t late = woke - now - timeout;
        if (timeout >= 0 && late > (int64_t)self->heartbeat_ms)
            s_on_stall(self, clock_mono_ms(), late);
        s_on_timers(self, clock_mono_ms());
    }
}

/* --- setup ----------------------------------------------------------------------------------- */

semoe_rc worker_control_advertised(const char *bound, const char *advertise, const char *host,
                                   char out[PROTO_MAX_ENDPOINT + 1])
{
    const char *hostpart = strstr(bound, "://");
    const char *colon = strrchr(bound, ':');
    bool tcp = strncmp(bound, "tcp://", 6) == 0 && hostpart && colon > hostpart + 3;
    if (!tcp) { /* ipc:// and friends name a path, not a host */
        if (strlen(bound) > PROTO_MAX_ENDPOINT)
            return semoe_err(SEMOE_EINVAL, "data endpoint %s is longer than %d", bound,
                             PROTO_MAX_ENDPOINT);
        snprintf(out, PROTO_MAX_ENDPOINT + 1, "%s", bound);
        return SEMOE_OK;
    }
    hostpart += 3;
    size_t hlen = (size_t)(colon - hostpart);
    const char *use = NULL;
    if (advertise && *advertise)
        use = advertise;
    else if ((hlen == 7 && strncmp(hostpart, "0.0.0.0", 7) == 0) ||
             (hlen == 4 && strncmp(hostpart, "[::]", 4) == 0) ||
             (hlen == 1 && hostpart[0] == '*'))
        use = host;
    int n;
    if (!use)
        n = snprintf(out, PROTO_MAX_ENDPOINT + 1, "%s", bound);
    else if (strchr(use, ':') && use[0] != '[') /* an IPv6 address goes in brackets */
        n = snprintf(out, PROTO_MAX_ENDPOINT + 1, "tcp://[%s]%s", use, colon);
    else
        n = snprintf(out, PROTO_MAX_ENDPOINT + 1, "tcp://%s%s", use, colon);
    if (n < 0 || n > PROTO_MAX_ENDPOINT)
        return semoe_err(SEMOE_EINVAL, "data endpoint for %s is longer than %d", bound,
                         PROTO_MAX_ENDPOINT);
    return SEMOE_OK;
}

/* Starts the trainer, which binds the data port and works out the endpoint peers will dial. */
static semoe_rc s_start_trainer(s_ctl_t *self)
{
    worker_control_config_t *cfg = self->cfg;
    self->commid = worker_commid_new();
    snprintf(self->poke_ep, sizeof self->poke_ep, "inproc://semoe-poke-%p", (void *)self);
    self->poke = zmq_socket(cfg->ctx, ZMQ_PAIR);
    int linger = 0;
    if (!self->poke || zmq_setsockopt(self->poke, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_bind(self->poke, self->poke_ep) != 0) {
        snprintf(cfg->error, sizeof cfg->error, "control actor: %s: %s", self->poke_ep,
                 zmq_strerror(zmq_errno()));
        cfg->error_exit = 1;
        return SEMOE_EIO;
    }
    self->tcfg = (worker_trainer_config_t){
        .ctx = cfg->ctx, .id = cfg->id, .host = cfg->host, .advertise = cfg->advertise,
        .data_bind = cfg->data_bind, .threads = cfg->threads, .metrics_log = cfg->metrics_log,
        .poke = self->poke_ep, .commid = self->commid,
        .cuda_device = strcmp(cfg->device.kind, "cuda") == 0 ? (int)cfg->device.index : -1};
    self->trainer = actor_new(cfg->ctx, worker_trainer_actor, &self->tcfg);
    if (!self->trainer) {
        snprintf(cfg->error, sizeof cfg->error, "%s",
                 self->tcfg.error[0] ? self->tcfg.error : semoe_err_msg());
        cfg->error_exit = self->tcfg.error[0] ? self->tcfg.error_exit : 1;
        return SEMOE_EINVAL;
    }
    snprintf(self->data_endpoint, sizeof self->data_endpoint, "%s", self->tcfg.data_endpoint);
    return SEMOE_OK;
}

static void s_destroy(s_ctl_t *self)
{
    s_close_dealer(self, 0);
    actor_destroy(&self->trainer);
    worker_commid_destroy(&self->commid); /* the trainer, which waits on it, is gone */
    if (self->poke)
        zmq_close(self->poke);
    s_forget_plan(self);
    free(self->load);
    free(self->job);
}

void worker_control_actor(void *pipe, void *args)
{
    s_ctl_t self = {0};
    self.cfg = args;
    self.pipe = pipe;
    self.heartbeat_ms = S_DEFAULT_HEARTBEAT_MS;
    self.liveness = S_DEFAULT_LIVENESS;
    worker_plan_clear(&self.plan);
    self.backoff_max_ms = self.cfg->reconnect_max_ms > 0 ? self.cfg->reconnect_max_ms : 32000;
    self.backoff_ms = S_BACKOFF_START_MS < self.backoff_max_ms ? S_BACKOFF_START_MS
                                                               : self.backoff_max_ms;

    self.progress = (worker_progress_t){.loss = NAN, .eval_loss = NAN};
    if (s_start_trainer(&self) != SEMOE_OK) {
        s_destroy(&self);
        actor_signal(pipe, 1);
        return;
    }
    log_info("data socket at %s; joining %s", self.data_endpoint, self.cfg->coordinator);
    s_dial(&self, clock_mono_ms());
    actor_signal(pipe, 0);
    s_loop(&self);
    s_destroy(&self);
}
