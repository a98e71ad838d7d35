/* The coordinator server (coord.h): ZeroMQ sockets watched through zloop, the membership
 * messages, heartbeats and liveness on a timer, and the training's progress from the workers'
 * HEARTBEATs (status, the metrics log, completion). Generations, their PLANs and the way from
 * one to the next (PAUSE, PLAN, RESUME) are reconfig.c's; the state on disk that a restart
 * takes up (--state-dir) is restart.c's. */
#include "coordinator/coord_impl.h"

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <uv.h>
#include <zmq.h>

#include "actors/log.h"
#include "actors/zloop.h"
#include "coordinator/members.h"
#include "coordinator/metrics.h"
#include "coordinator/progress.h"
#include "coordinator/reconfig.h"
#include "coordinator/state.h"
#include "coordinator/status.h"
#include "proto/msg.h"

/* After STOP: how long to wait for the workers to go, whatever the liveness settings say. */
#define S_STOP_WAIT_MIN_MS 1000
#define S_STOP_WAIT_MAX_MS 15000
/* ... and after a STOP with checkpoint at least this long (the workers' grace for it) */
#define S_STOP_CKPT_MIN_MS 30000
/* At exit after a STOP, the control socket gets this long to deliver the last messages. */
#define S_STOP_LINGER_MS 500
/* Pending connections a listening socket queues (the kernel caps it at somaxconn). */
#define S_BACKLOG 4096
/* Control messages handled per drain before other sockets and timers get a turn. */
#define S_CONTROL_BUDGET 16
/* HEARTBEATs go out in this many slices of the interval, one slice per tick. */
#define S_HEARTBEAT_SLICES 32
/* --- sending ----------------------------------------------------------------------------------- */

static proto_header_t s_header(coord_t *self, proto_type_t type)
{
    return (proto_header_t){.type = type, .run_id = self->run_id,
                            .generation = reconfig_generation(self->reconfig),
                            .seq = ++self->seq};
}

/* Sends msg to a routing id. Failures are logged only: the ROUTER drops what it cannot route,
 * and the peer's liveness takes care of the rest. */
static void s_send(coord_t *self, const void *rid, size_t rid_len, proto_msg_t *msg)
{
    if (rid_len == 0) // a restored member that has not come back: no connection yet
        return;
    if (proto_send(self->control, rid, rid_len, msg) != SEMOE_OK)
        log_debug("sending %s: %s", proto_type_name(msg->hdr.type), semoe_err_msg());
}

static void __attribute__((format(printf, 5, 6)))
s_send_error(coord_t *self, const void *rid, size_t rid_len, uint32_t code, const char *fmt, ...)
{
    proto_msg_t msg = {.hdr = s_header(self, PROTO_ERROR)};
    msg.error.code = code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg.error.text, sizeof msg.error.text, fmt, ap);
    va_end(ap);
    s_send(self, rid, rid_len, &msg);
}

/* --- membership changes ------------------------------------------------------------------------ */

static void s_quit(coord_t *self) { uv_stop(&self->loop); }

/* Removes m (fence: ignore its connection until it JOINs again); why says how it went. */
void coord_remove(coord_t *self, member_t *m, reconfig_gone_t why, bool fence)
{
    reconfig_removing(self->reconfig, m, why);
    if (fence)
        members_fence(self->members, m->rid, m->rid_len);
    members_remove(self->members, m);
    coord_save_soon(self);
    coord_check_restored(self);
    if (self->stopping && members_count(self->members) == 0) {
        log_info("every worker is gone: exiting");
        s_quit(self);
    }
}

/* A member broke protocol: tell it why, remove it, ignore its connection until it JOINs. */
static void __attribute__((format(printf, 3, 4)))
s_break(coord_t *self, member_t *m, const char *fmt, ...)
{
    char text[PROTO_MAX_TEXT + 1];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    self->counters.protocol_errors++;
    s_send_error(self, m->rid, m->rid_len, PROTO_ERR_UNEXPECTED, "%s", text);
    log_warn("worker %s: %s: removed", m->id, text);
    coord_remove(self, m, RECONFIG_REMOVED, true);
}

/* reconfig's way to remove a member: one that did not apply a PLAN in time, or one leaving
 * with handover that nobody is left to take the state of. */
static void s_reconfig_remove(void *arg, member_t *m, reconfig_gone_t why, const char *text)
{
    coord_t *self = arg;
    if (why == RECONFIG_REMOVED) {
        s_break(self, m, "%s", text);
        return;
    }
    log_warn("worker %s left: %s (the last checkpoint keeps the job)", m->id, text);
    self->counters.leaves++;
    coord_remove(self, m, why, false);
}

static bool s_control_pending(coord_t *self)
{
    int events = 0;
    size_t len = sizeof events;
    return zmq_getsockopt(self->control, ZMQ_EVENTS, &events, &len) == 0 &&
           (events & ZMQ_POLLIN);
}

/* --- messages from workers and admins ---------------------------------------------------------- */

static void s_stop(coord_t *self, const void *rid, size_t rid_len, uint32_t checkpoint);

/* WELCOME to m: its name, the heartbeat settings and the job. */
static void s_welcome(coord_t *self, const member_t *m)
{
    proto_msg_t msg = {.hdr = s_header(self, PROTO_WELCOME)};
    snprintf(msg.welcome.worker_id, sizeof msg.welcome.worker_id, "%s", m->id);
    msg.welcome.heartbeat_ms = self->heartbeat_ms;
    msg.welcome.liveness = self->liveness;
    msg.welcome.job = (proto_bytes_t){(const uint8_t *)self->job_json,
                                      (uint32_t)strlen(self->job_json)};
    s_send(self, m->rid, m->rid_len, &msg);
}

/* A member of the saved state is back (its JOIN after a restart): it gets this connection and
 * WELCOME and keeps its place (the same run id: a worker keeps its training state); the
 * restart's plan follows once every member of the state is back or gone. */
static void s_on_return(coord_t *self, const void *rid, size_t rid_len, member_t *m,
                        const proto_join_t *j)
{
    log_info("worker %s is back (pid %u)", m->id, j->pid);
    self->returned++;
    members_bind(self->members, m, rid, rid_len);
    members_set_caps(m, j);
    m->last_seen_ms = clock_mono_ms();
    s_welcome(self, m);
    coord_save_soon(self);
    coord_check_restored(self);
}

/* JOIN from rid; m is the member on that connection, if any. */
static void s_on_join(coord_t *self, const void *rid, size_t rid_len, member_t *m,
                      const proto_join_t *j)
{
    if (self->stopping) {
        s_send_error(self, rid, rid_len, PROTO_ERR_REFUSED, "the coordinator is stopping");
        return;
    }
    const char *bad = members_join_invalid(j);
    if (bad) {
        log_debug("JOIN refused: %s", bad);
        s_send_error(self, rid, rid_len, PROTO_ERR_REFUSED, "JOIN refused: %s", bad);
        return;
    }
    /* what only GPU workers can do: bf16, and NCCL collectives */
    const char *gpu_only = strcmp(self->job->train.precision, "bf16") == 0
                               ? "train.precision \"bf16\""
                           : strcmp(self->job->train.collectives, "nccl") == 0
                               ? "train.collectives \"nccl\""
                               : NULL;
    if (gpu_only && strcmp(j->device_kind, "cuda") != 0) {
        log_debug("JOIN from %s refused: a job with %s and a %s worker", j->id, gpu_only,
                  j->device_kind);
        s_send_error(self, rid, rid_len, PROTO_ERR_REFUSED,
                     "JOIN refused: the job trains with %s, which runs on GPU workers "
                     "(semoe-worker --device cuda:N); this one computes on the %s", gpu_only,
                     j->device_kind);
        return;
    }
    member_t *other = members_by_id(self->members, j->id);
    if (other && !m && !members_bound(other)) {
        if (other->pid == j->pid && strcmp(other->host, j->host) == 0) {
            s_on_return(self, rid, rid_len, other, j);
            return;
        }
        /* The process of the saved state is gone, and its training state with it: a death
         * (the plan cannot wait for its peers to pause: they wait for it), then a join. */
        log_warn("worker %s: another process (pid %u on %s, was %u on %s) since the restart: the "
                 "old one is dead", j->id, j->pid, j->host, other->pid, other->host);
        self->counters.deaths++;
        coord_remove(self, other, RECONFIG_DIED, false);
        other = NULL;
    }
    if (other && other != m) {
        log_debug("JOIN as %s refused: a live member has that id", j->id);
        s_send_error(self, rid, rid_len, PROTO_ERR_REFUSED,
                     "worker id '%s' belongs to a live member; retry once it has left or died",
                     j->id);
        return;
    }
    bool dup = m && strcmp(m->id, j->id) == 0;
    if (dup) {
        // The same worker on the same connection lost track (an ERROR or a reply it missed):
        // no membership change; it gets WELCOME and the current PLAN again (after WELCOME).
        log_debug("worker %s sent JOIN again", m->id);
    } else if (m) { // the connection now speaks for another worker: the old one is gone
        log_info("worker %s joins again as %s", m->id, j->id);
        reconfig_removing(self->reconfig, m, RECONFIG_REMOVED);
        members_rename(self->members, m, j->id);
        m->leaving = false;
        m->state = MEMBER_SYNCING;
        m->acked_gen = 0;
        members_clear_progress(m);
        members_set_experts(m, NULL, 0);
    } else {
        /* every rank needs a sequence of the global batch: no more workers than that, the
         * others wait (their JOIN is retried) until one goes */
        uint32_t staying = 0;
        for (const member_t *w = members_first(self->members); w; w = w->next)
            staying += !w->leaving;
        if (staying >= self->job->train.global_batch) {
            log_debug("JOIN from %s refused: %u workers train a global batch of %u", j->id,
                      staying, self->job->train.global_batch);
            s_send_error(self, rid, rid_len, PROTO_ERR_REFUSED,
                         "JOIN refused: %u workers already train the global batch of %u "
                         "sequences (train.global_batch), one at least each; retry when one "
                         "goes", staying, self->job->train.global_batch);
            return;
        }
        m = members_add(self->members, rid, rid_len, j->id);
        if (!m) {
            s_send_error(self, rid, rid_len, PROTO_ERR_REFUSED, "the job has %u workers already",
                         members_count(self->members));
            return;
        }
        log_info("worker %s joined from %s (pid %u, %s %s, data %s)", j->id, j->host, j->pid,
                 j->device_kind, j->device_name, j->data_endpoint);
    }
    if (!dup)
        self->counters.joins++;
    uint32_t n = members_count(self->members);
    if (!self->started && n >= self->job->cluster.expected_workers) {
        self->started = true;
        reconfig_start(self->reconfig);
        log_info("%u workers have joined, as cluster.expected_workers asks: planning", n);
    }
    members_set_caps(m, j);
    m->last_seen_ms = clock_mono_ms();
    s_welcome(self, m);
    if (dup) { // nothing if it is not placed yet: the plan on its way includes it
        reconfig_rejoined(self->reconfig, m);
    } else {
        reconfig_joined(self->reconfig, m);
        coord_save_soon(self);
    }
}

/* COMM: the new rank 0 sends its communicator id up; it goes to every member of the
 * generation (the sender too, as the acknowledgement that all have it on the way). A COMM of
 * an older generation crossed a PLAN and is dropped; one from another rank breaks protocol. */
static void s_on_comm(coord_t *self, member_t *m, const proto_msg_t *msg)
{
    uint64_t gen = reconfig_generation(self->reconfig);
    uint32_t world = reconfig_world(self->reconfig);
    if (msg->hdr.generation < gen)
        return;
    if (msg->hdr.generation > gen || !m->placed || m->rank != 0 || msg->comm.world != world) {
        s_break(self, m, "COMM of generation %" PRIu64 " (world %u) from rank %u; expected "
                "generation %" PRIu64 " (world %u) from rank 0", msg->hdr.generation,
                msg->comm.world, m->rank, gen, world);
        return;
    }
    proto_msg_t relay = {.hdr = s_header(self, PROTO_COMM), .comm = msg->comm};
    for (member_t *w = members_first(self->members); w; w = w->next)
        if (w->placed)
            s_send(self, w->rid, w->rid_len, &relay);
    log_info("generation %" PRIu64 ": relayed the communicator id of %s (%u bytes) to %u workers",
             gen, m->id, msg->comm.comm_id.size, world);
}

/* --- training progress ----------------------------------------------------------------------- */

static void s_stop_workers(coord_t *self, uint32_t checkpoint);

/* Acts on the phase m reports: a failure is logged, once per generation; the last worker to
 * finish ends the job as a STOP without checkpoint would (each wrote its final one). */
static void s_on_phase(coord_t *self, member_t *m)
{
    uint64_t gen = reconfig_generation(self->reconfig);
    if (m->phase == PROTO_PHASE_FAILED && m->failed_logged != gen + 1) {
        m->failed_logged = gen + 1;
        log_warn("worker %s: its training failed at step %" PRIu64 " (its log says why)", m->id,
                 m->step);
    }
    if (m->phase != PROTO_PHASE_FINISHED || self->stopping ||
        !progress_all_finished(self->members, self->job->train.steps))
        return;
    self->finished = true;
    log_info("training finished at step %" PRIu64, progress_step(self->progress));
    s_stop_workers(self, 0);
}

static void s_on_heartbeat(coord_t *self, member_t *m, const proto_msg_t *msg)
{
    uint64_t gen = reconfig_generation(self->reconfig);
    if (msg->hdr.generation > gen) {
        s_break(self, m, "HEARTBEAT of generation %" PRIu64 ", the current one is %" PRIu64,
                msg->hdr.generation, gen);
        return;
    }
    self->counters.heartbeats++;
    members_set_progress(m, &msg->heartbeat);
    reconfig_on_heartbeat(self->reconfig, m, msg); // may open a generation (a pause ended)
    progress_take(self->progress, m, self->members, reconfig_generation(self->reconfig),
                  reconfig_world(self->reconfig));
    s_on_phase(self, m);
}

static void s_on_ack(coord_t *self, member_t *m, const proto_msg_t *msg)
{
    uint64_t g = msg->hdr.generation, gen = reconfig_generation(self->reconfig);
    if (g > gen) {
        s_break(self, m, "ACK of generation %" PRIu64 ", the current one is %" PRIu64, g, gen);
        return;
    }
    reconfig_on_ack(self->reconfig, m, msg);
}

/* LEAVE: with handover from a member that holds state, it becomes a donor of the next plan
 * and stays until its LEAVE without; otherwise it is gone now. */
static void s_on_leave(coord_t *self, member_t *m, const proto_leave_t *l)
{
    if (l->handover && m->leaving)
        return; // asked already
    if (l->handover && m->placed && !self->stopping) {
        log_info("worker %s asks to leave after handing over: %s", m->id,
                 l->reason[0] ? l->reason : "-");
        reconfig_handover(self->reconfig, m);
        coord_save_soon(self);
        return;
    }
    log_info("worker %s left: %s", m->id, l->reason[0] ? l->reason : "-");
    self->counters.leaves++;
    coord_remove(self, m, RECONFIG_LEFT, false);
}

/* A valid message other than JOIN from a connection that is not a member. */
static void s_from_stranger(coord_t *self, const void *rid, size_t rid_len, const proto_msg_t *msg)
{
    uint32_t type = msg->hdr.type;
    if (type == PROTO_STOP) {
        s_stop(self, rid, rid_len, msg->stop.checkpoint);
        return;
    }
    if (type == PROTO_LEAVE) // it has gone already
        return;
    if (!self->restoring) // after a restart, the members' traffic before their JOIN is no error
        self->counters.protocol_errors++;
    // Fenced connections are ignored; an ERROR is never answered (no ping-pong).
    if (type == PROTO_ERROR || members_fenced(self->members, rid, rid_len))
        return;
    s_send_error(self, rid, rid_len, PROTO_ERR_NOT_MEMBER, "%s from a non-member: send JOIN",
                 proto_type_name(type));
}

/* One message (identity and body) from the control socket. */
static void s_handle(coord_t *self, const uint8_t *rid, size_t rid_len, const void *data,
                     size_t len)
{
    member_t *m = members_by_rid(self->members, rid, rid_len);
    proto_msg_t msg;
    proto_result_t r = proto_decode(data, len, &msg);
    if (r != PROTO_OK) {
        self->counters.protocol_errors++;
        if (!m && members_fenced(self->members, rid, rid_len))
            return;
        s_send_error(self, rid, rid_len, PROTO_ERR_MALFORMED, "malformed message: %s",
                     proto_result_str(r));
        if (m) {
            log_warn("worker %s: malformed message (%s): removed", m->id, proto_result_str(r));
            coord_remove(self, m, RECONFIG_REMOVED, true);
        }
        return;
    }
    if (msg.hdr.type == PROTO_JOIN) {
        s_on_join(self, rid, rid_len, m, &msg.join);
        return;
    }
    if (!m) {
        s_from_stranger(self, rid, rid_len, &msg);
        return;
    }
    m->last_seen_ms = clock_mono_ms();
    if (msg.hdr.run_id != self->run_id && msg.hdr.run_id != 0) {
        s_break(self, m, "%s of run %016" PRIx64 ", this run is %016" PRIx64,
                proto_type_name(msg.hdr.type), msg.hdr.run_id, self->run_id);
        return;
    }
    switch (msg.hdr.type) {
    case PROTO_HEARTBEAT:
        s_on_heartbeat(self, m, &msg);
        break;
    case PROTO_ACK:
        s_on_ack(self, m, &msg);
        break;
    case PROTO_LEAVE:
        s_on_leave(self, m, &msg.leave);
        break;
    case PROTO_STOP:
        s_stop(self, rid, rid_len, msg.stop.checkpoint);
        break;
    case PROTO_COMM:
        s_on_comm(self, m, &msg);
        break;
    case PROTO_ERROR:
        log_warn("worker %s reports error %u: %s", m->id, msg.error.code, msg.error.text);
        break;
    default: // WELCOME, PLAN, PAUSE, RESUME: the coordinator's to send
        s_break(self, m, "%s is not a worker's message", proto_type_name(msg.hdr.type));
        break;
    }
}

/* zloop callback: receives one whole message from the control ROUTER. Anything but an
 * identity and one body frame is counted and dropped. */
static void s_on_control(void *sock, void *arg)
{
    coord_t *self = arg;
    zmq_msg_t id, body;
    zmq_msg_init(&id);
    zmq_msg_init(&body);
    int frames = 0;
    if (zmq_msg_recv(&id, sock, ZMQ_DONTWAIT) >= 0) {
        frames = 1;
        if (zmq_msg_more(&id) && zmq_msg_recv(&body, sock, ZMQ_DONTWAIT) >= 0) {
            frames = 2;
            if (zmq_msg_more(&body)) {
                zmq_msg_t extra;
                zmq_msg_init(&extra);
                do {
                    frames++;
                } while (zmq_msg_recv(&extra, sock, ZMQ_DONTWAIT) >= 0 && zmq_msg_more(&extra));
                zmq_msg_close(&extra);
            }
        }
    }
    size_t rid_len = zmq_msg_size(&id);
    if (frames == 2 && rid_len > 0 && rid_len <= MEMBERS_MAX_RID) {
        s_handle(self, zmq_msg_data(&id), rid_len, zmq_msg_data(&body), zmq_msg_size(&body));
    } else if (frames > 0) {
        self->counters.protocol_errors++;
        log_debug("control: dropped a message of %d frames", frames);
    }
    zmq_msg_close(&body);
    zmq_msg_close(&id);
}

/* --- heartbeats, stop, signals ------------------------------------------------------------------ */

/* Every slice of the heartbeat interval: declare the silent dead, and send a HEARTBEAT to the
 * members of this slice, so that each member gets one per interval and a thousand of them do
 * not leave in one burst (status queries would queue behind it). Silence is only held against
 * a worker when we were listening: not when this tick comes two intervals late (the loop
 * itself stalled), and, up to twice the limit, not while messages wait unread on the control
 * socket (its heartbeat may be among them). */
static void s_on_heartbeat_timer(uv_timer_t *timer)
{
    coord_t *self = timer->data;
    int64_t now = clock_mono_ms(), limit = (int64_t)self->liveness * self->heartbeat_ms;
    bool stalled = self->tick_ms && now - self->tick_ms > 2 * (int64_t)self->heartbeat_ms;
    bool backlog = s_control_pending(self);
    uint64_t slice = self->ticks++ % S_HEARTBEAT_SLICES;
    self->tick_ms = now;
    for (member_t *m = members_first(self->members), *next; m; m = next) {
        next = m->next;
        int64_t silent = now - m->last_seen_ms;
        if (silent > limit && !stalled && (!backlog || silent > 2 * limit)) {
            if (members_bound(m))
                log_warn("worker %s: silent for %" PRId64 " ms (%u x %u ms): dead", m->id, silent,
                         self->liveness, self->heartbeat_ms);
            else
                log_warn("worker %s: not back %" PRId64 " ms after the restart (%u x %u ms): "
                         "dead", m->id, silent, self->liveness, self->heartbeat_ms);
            self->counters.deaths++;
            coord_remove(self, m, RECONFIG_DIED, false);
            continue;
        }
        if (m->join_seq % S_HEARTBEAT_SLICES != slice)
            continue;
        proto_msg_t msg = {.hdr = s_header(self, PROTO_HEARTBEAT)};
        msg.heartbeat.step = progress_step(self->progress);
        msg.heartbeat.loss = msg.heartbeat.eval_loss = NAN; // a worker's to report
        s_send(self, m->rid, m->rid_len, &msg);
    }
}

static void s_on_stop_timeout(uv_timer_t *timer)
{
    coord_t *self = timer->data;
    log_warn("%u workers still there after STOP: exiting anyway", members_count(self->members));
    s_quit(self);
}

/* Tells every worker to stop (to checkpoint first when checkpoint is 1) and exits once they are
 * gone, or after a bounded wait. */
static void s_stop_workers(coord_t *self, uint32_t checkpoint)
{
    if (self->stopping)
        return;
    self->stopping = true;
    reconfig_stop(self->reconfig);
    uint32_t n = members_count(self->members);
    log_info("STOP%s: stopping %u workers", checkpoint ? " with checkpoint" : "", n);
    for (member_t *m = members_first(self->members); m; m = m->next) {
        proto_msg_t msg = {.hdr = s_header(self, PROTO_STOP)};
        msg.stop.checkpoint = checkpoint;
        s_send(self, m->rid, m->rid_len, &msg);
    }
    if (n == 0) {
        s_quit(self);
        return;
    }
    uint64_t window = (uint64_t)self->liveness * self->heartbeat_ms;
    uint64_t wait = window + self->heartbeat_ms;
    wait = wait < S_STOP_WAIT_MIN_MS ? S_STOP_WAIT_MIN_MS
           : wait > S_STOP_WAIT_MAX_MS ? S_STOP_WAIT_MAX_MS
                                       : wait;
    /* a checkpoint first: the workers finish their step, agree on the boundary and write it,
     * within their own grace (worker/control.c: 10 liveness windows, at least 30 s); they
     * heartbeat meanwhile, so one that dies is still noticed */
    if (checkpoint) {
        uint64_t grace = 10 * window > S_STOP_CKPT_MIN_MS ? 10 * window : S_STOP_CKPT_MIN_MS;
        wait = grace + window + self->heartbeat_ms;
    }
    uv_timer_start(&self->stop_timer, s_on_stop_timeout, wait, 0);
}

/* STOP from anyone: ack it, then stop the workers. */
static void s_stop(coord_t *self, const void *rid, size_t rid_len, uint32_t checkpoint)
{
    proto_msg_t ack = {.hdr = s_header(self, PROTO_ACK)};
    ack.ack.acked_type = PROTO_STOP;
    s_send(self, rid, rid_len, &ack);
    s_stop_workers(self, checkpoint);
}

static void s_on_signal(uv_signal_t *handle, int signum)
{
    coord_t *self = handle->data;
    log_info("%s: exiting", signum == SIGTERM ? "SIGTERM" : "SIGINT");
    s_quit(self);
}

/* --- status and metrics ------------------------------------------------------------------------ */

static void s_view(void *arg, status_view_t *v)
{
    coord_t *self = arg;
    uint32_t n = members_count(self->members);
    const char *state = self->stopping                     ? "stopping"
                        : self->restoring                  ? "restoring"
                        : n == 0 || !self->started         ? "waiting"
                        : reconfig_busy(self->reconfig)    ? "reconfiguring"
                                                           : "running";
    int64_t now = clock_mono_ms();
    *v = (status_view_t){
        .run_id = self->run_id, .state = state,
        .target_steps = self->job->train.steps,
        .uptime_ms = now - self->start_ms, .now_ms = now,
        .heartbeat_ms = self->heartbeat_ms, .liveness = self->liveness,
        .num_layers = self->L, .num_experts = self->E,
        .top_k = self->job->model.num_experts_per_tok,
        .global_batch = self->job->train.global_batch,
        .counters = self->counters, .members = self->members,
        .imbalance = progress_imbalance(self->members),
    };
    reconfig_view(self->reconfig, v);
    progress_view(self->progress, v);
    if (self->finished)
        v->phase = "finished";
}

/* zloop callback: one request on the status socket. */
static void s_on_status(void *sock, void *arg) { status_serve(sock, s_view, arg); }

static char *s_render_metrics(void *arg, size_t *len)
{
    status_view_t v;
    s_view(arg, &v);
    return metrics_format(&v, len);
}

/* --- life cycle -------------------------------------------------------------------------------- */

/* Creates and binds a ZeroMQ socket into *out; flag names the endpoint in messages. An
 * endpoint that does not parse is SEMOE_EINVAL, one that cannot be bound SEMOE_EIO. */
static semoe_rc s_socket(coord_t *self, int type, const char *endpoint, const char *flag,
                         void **out)
{
    void *sock = zmq_socket(self->ctx, type);
    if (!sock)
        return semoe_err(SEMOE_EIO, "%s: zmq_socket: %s", flag, zmq_strerror(zmq_errno()));
    // Unroutable replies are dropped (MANDATORY off), and the listen backlog takes a thousand
    // workers connecting at once: at ZeroMQ's default of 100, the SYNs beyond it are dropped
    // and their senders retry after 1, 3, 7, 15 s...
    int off = 0, backlog = S_BACKLOG;
    semoe_rc rc = proto_socket_setup(sock);
    if (rc == SEMOE_OK && (zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &off, sizeof off) != 0 ||
                           zmq_setsockopt(sock, ZMQ_BACKLOG, &backlog, sizeof backlog) != 0))
        rc = semoe_err(SEMOE_EIO, "%s: socket options: %s", flag, zmq_strerror(zmq_errno()));
    if (rc == SEMOE_OK && zmq_bind(sock, endpoint) != 0) {
        int e = zmq_errno();
        bool bad = e == EINVAL || e == EPROTONOSUPPORT || e == ENOCOMPATPROTO || e == ENODEV;
        rc = semoe_err(bad ? SEMOE_EINVAL : SEMOE_EIO, "%s %s: %s%s", flag, endpoint,
                       bad ? "not a usable endpoint: " : "cannot bind: ", zmq_strerror(e));
    }
    if (rc != SEMOE_OK) {
        zmq_close(sock);
        return rc;
    }
    *out = sock;
    return SEMOE_OK;
}

/* A run id orders runs by start time: the wall clock's milliseconds above 20 random bits. The
 * checkpoint root's fence (model/checkpoint.h) compares (run, generation), so that a job
 * resumed by a new coordinator, whose generations start again at 1, still fences out the
 * workers of the run before it. */
static uint64_t s_run_id(void)
{
    uint64_t r = 0;
    if (getrandom(&r, sizeof r, 0) != (ssize_t)sizeof r)
        r = (uint64_t)clock_mono_us() * 0x9E3779B97F4A7C15ull;
    return ((uint64_t)clock_wall_ms() << 20) | (r & 0xfffffu) | 1u; /* never 0 */
}

semoe_rc coord_new(const coord_opts_t *opts, model_job_t **job, coord_t **self_p)
{
    semoe_rc rc = SEMOE_EINVAL;
    *self_p = NULL;
    coord_t *self = semoe_xcalloc(1, sizeof *self);
    self->job = *job;
    *job = NULL;
    state_t *st = NULL;
    if (opts->state_dir) {
        SEMOE_CHECK_GOTO(state_store_open(opts->state_dir, &self->store), rc, fail);
        SEMOE_CHECK_GOTO(state_store_load(self->store, &st), rc, fail);
    }
    SEMOE_CHECK_GOTO(coord_take_job(self, st), rc, fail);
    rc = SEMOE_EINVAL;
    const model_job_t *j = self->job;
    self->L = j->model.num_hidden_layers;
    self->E = j->model.num_local_experts;
    self->n_total = (uint64_t)self->L * self->E;
    self->heartbeat_ms = j->cluster.heartbeat_ms ? j->cluster.heartbeat_ms : 1000;
    self->liveness = j->cluster.liveness ? j->cluster.liveness : 3;
    self->started = j->cluster.expected_workers == 0;
    if (self->n_total == 0 || self->n_total > PROTO_MAX_EXPERTS || self->L > 65536 ||
        self->E > 65536) {
        semoe_err(SEMOE_EINVAL, "job: model.num_hidden_layers=%u x model.num_local_experts=%u: "
                  "need 1 to %u experts in all", self->L, self->E, PROTO_MAX_EXPERTS);
        goto fail;
    }
    if (self->heartbeat_ms > 3600000 || self->liveness > 1000) {
        semoe_err(SEMOE_EINVAL, "job: cluster.heartbeat_ms=%u, cluster.liveness=%u: need at most "
                  "3600000 ms and 1000 intervals", self->heartbeat_ms, self->liveness);
        goto fail;
    }
    if (j->json_len > PROTO_MAX_MSG / 2) {
        semoe_err(SEMOE_EINVAL, "job: the spec is %zu bytes; at most %d fit in a WELCOME",
                  j->json_len, PROTO_MAX_MSG / 2);
        goto fail;
    }
    self->run_id = st ? st->run_id : s_run_id(); // the workers keep their state for this run
    self->members = st && !st->stopped ? st->members : members_new();
    if (st && self->members == st->members)
        st->members = NULL; // ours now
    SEMOE_CHECK_GOTO(progress_new(self->n_total, opts->metrics_log, &self->progress), rc, fail);
    if (uv_loop_init(&self->loop) != 0) {
        rc = semoe_err(SEMOE_ESYS, "uv_loop_init failed");
        goto fail;
    }
    self->loop_open = true;
    self->ctx = zmq_ctx_new();
    if (!self->ctx) {
        rc = semoe_err(SEMOE_EIO, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    SEMOE_CHECK_GOTO(s_socket(self, ZMQ_ROUTER, opts->control, "--bind", &self->control), rc,
                     fail);
    SEMOE_CHECK_GOTO(s_socket(self, ZMQ_ROUTER, opts->status, "--status", &self->status), rc,
                     fail);
    rc = SEMOE_EIO;
    self->control_watch = zloop_watch_new(&self->loop, self->control, s_on_control, self);
    self->status_watch = self->control_watch
                             ? zloop_watch_new(&self->loop, self->status, s_on_status, self)
                             : NULL;
    if (!self->status_watch)
        goto fail;
    /* A burst of a thousand ACKs or heartbeats is drained in small bites so that a status
     * query waiting beside it is answered within a bite, not after the whole burst. */
    zloop_watch_set_budget(self->control_watch, S_CONTROL_BUDGET);
    if (opts->metrics && opts->metrics[0] && strcmp(opts->metrics, "none") != 0) {
        SEMOE_CHECK_GOTO(metrics_new(&self->loop, opts->metrics, s_render_metrics, self,
                                     &self->metrics),
                         rc, fail);
    }
    uv_timer_init(&self->loop, &self->heartbeat_timer);
    uv_timer_init(&self->loop, &self->stop_timer);
    uv_timer_init(&self->loop, &self->save_timer);
    uv_signal_init(&self->loop, &self->sigterm);
    uv_signal_init(&self->loop, &self->sigint);
    self->handles_open = true;
    self->heartbeat_timer.data = self->stop_timer.data = self->save_timer.data = self;
    reconfig_opts_t ro = {.loop = &self->loop, .control = self->control,
                          .members = self->members, .progress = self->progress, .job = j,
                          .run_id = self->run_id, .seq = &self->seq,
                          .counters = &self->counters, .heartbeat_ms = self->heartbeat_ms,
                          .liveness = self->liveness, .remove = s_reconfig_remove,
                          .persist = self->store ? coord_persist : NULL, .remove_arg = self};
    self->reconfig = reconfig_new(&ro);
    self->sigterm.data = self->sigint.data = self;
    uint64_t tick = self->heartbeat_ms / S_HEARTBEAT_SLICES;
    uv_timer_start(&self->heartbeat_timer, s_on_heartbeat_timer, tick ? tick : 1, tick ? tick : 1);
    uv_signal_start(&self->sigterm, s_on_signal, SIGTERM);
    uv_signal_start(&self->sigint, s_on_signal, SIGINT);
    self->start_ms = clock_mono_ms();
    if (st)
        coord_restore(self, st);
    state_destroy(&st);
    /* a fresh start creates the file, a restart counts itself; a directory that cannot take it
     * is found now rather than at the first generation */
    if (coord_save(self) != SEMOE_OK) {
        rc = SEMOE_EINVAL;
        goto fail;
    }
    log_info("run %016" PRIx64 ": control %s, status %s, metrics %s; %u layers x %u experts, "
             "heartbeat %u ms x %u", self->run_id, opts->control, opts->status,
             self->metrics ? opts->metrics : "off", self->L, self->E, self->heartbeat_ms,
             self->liveness);
    *self_p = self;
    return SEMOE_OK;
fail:
    state_destroy(&st);
    coord_destroy(&self);
    return rc;
}

semoe_rc coord_run(coord_t *self)
{
    uv_run(&self->loop, UV_RUN_DEFAULT);
    coord_save_serving(self); // after a STOP it says so: a restart waits for none of these workers
    return SEMOE_OK;
}

void coord_destroy(coord_t **self_p)
{
    coord_t *self = *self_p;
    if (!self)
        return;
    zloop_watch_destroy(&self->control_watch);
    zloop_watch_destroy(&self->status_watch);
    metrics_destroy(&self->metrics);
    if (self->handles_open) {
        uv_close((uv_handle_t *)&self->heartbeat_timer, NULL);
        uv_close((uv_handle_t *)&self->stop_timer, NULL);
        uv_close((uv_handle_t *)&self->save_timer, NULL);
        uv_close((uv_handle_t *)&self->sigterm, NULL);
        uv_close((uv_handle_t *)&self->sigint, NULL);
    }
    reconfig_close(self->reconfig);
    if (self->loop_open) {
        // Closing handles finish on the next turns; a bounded number of them is plenty.
        for (int i = 0; i < 100 && uv_loop_close(&self->loop) == UV_EBUSY; i++)
            uv_run(&self->loop, UV_RUN_NOWAIT);
    }
    if (self->control) {
        int linger = self->stopping ? S_STOP_LINGER_MS : 0;
        zmq_setsockopt(self->control, ZMQ_LINGER, &linger, sizeof linger);
        zmq_close(self->control);
    }
    if (self->status)
        zmq_close(self->status);
    if (self->ctx)
        zmq_ctx_term(self->ctx);
    reconfig_destroy(&self->reconfig);
    members_destroy(&self->members);
    progress_destroy(&self->progress);
    model_job_destroy(&self->job);
    free(self->job_json);
    state_store_close(&self->store);
    free(self);
    *self_p = NULL;
}
