/* The benchmark's simulated workers (simworker.h): one actor drives many DEALER sockets from a
 * zmq_poll loop, speaking just enough of the worker side of the control protocol to be a
 * member: JOIN, heartbeats from WELCOME on, an ACK for every PLAN, COMM and PAUSE. */
#include "bench/simworker.h"

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/actor.h"
#include "actors/log.h"
#include "proto/msg.h"

/* Never block a driver on one slow socket: a send that cannot be queued within this is
 * counted as an error and dropped. */
#define S_SNDTIMEO_MS 100
/* The poll wakes at least this often (commands arrive on the pipe and wake it anyway). */
#define S_MAX_WAIT_US 100000

typedef struct {
    int index;         /* global index: the worker is "simNNNNN" */
    void *ctx;
    void *sock;        /* NULL until JOIN, and after LEAVE, KILL or STOP */
    char id[32];
    uint64_t run_id;   /* from WELCOME and PLAN */
    uint64_t generation;
    uint64_t seq;
    uint32_t heartbeat_ms;
    int64_t next_hb_us; /* 0 until WELCOME */
    int64_t mark_us;   /* first PLAN of a generation >= the mark; 0: none since MARK */
} s_worker_t;

typedef struct {
    const simworker_args_t *args;
    s_worker_t *w;     /* local index k is global index first + k * stride */
    int n;
    uint32_t *zeros;   /* the heartbeat load: no steps run, so no tokens */
    uint64_t mark;
    uint64_t errors, rejoins, refused;
    uint64_t rng;
    bool dirty;        /* a socket opened or closed: rebuild the poll items */
    zmq_pollitem_t *items;
    int *map;          /* items[i] (i >= 1) belongs to w[map[i]] */
    int nitems;
} s_driver_t;

static uint64_t s_rand(s_driver_t *d)
{
    d->rng ^= d->rng >> 12;
    d->rng ^= d->rng << 25;
    d->rng ^= d->rng >> 27;
    return d->rng * 0x2545F4914F6CDD1Dull;
}

static void s_send(s_driver_t *d, s_worker_t *w, proto_msg_t *m)
{
    m->hdr.run_id = w->run_id;
    if (m->hdr.type != PROTO_ACK)
        m->hdr.generation = w->generation;
    m->hdr.seq = ++w->seq;
    if (proto_send(w->sock, NULL, 0, m) != SEMOE_OK)
        d->errors++;
}

static void s_close(s_driver_t *d, s_worker_t *w, int linger_ms)
{
    if (!w->sock)
        return;
    zmq_setsockopt(w->sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    zmq_close(w->sock);
    w->sock = NULL;
    w->next_hb_us = 0;
    d->dirty = true;
}

static void s_send_join(s_driver_t *d, s_worker_t *w)
{
    proto_msg_t m;
    memset(&m, 0, sizeof m);
    m.hdr.type = PROTO_JOIN;
    snprintf(m.join.id, sizeof m.join.id, "%s", w->id);
    snprintf(m.join.host, sizeof m.join.host, "127.0.0.1");
    m.join.pid = (uint32_t)getpid();
    snprintf(m.join.device_kind, sizeof m.join.device_kind, "cpu");
    snprintf(m.join.device_name, sizeof m.join.device_name, "bench");
    m.join.mem_host = 1ull << 30;
    /* Nobody connects to it: the coordinator only relays it in PLANs. */
    snprintf(m.join.data_endpoint, sizeof m.join.data_endpoint, "tcp://127.0.0.1:%d",
             20000 + w->index % 40000);
    w->run_id = 0;
    w->generation = 0;
    w->next_hb_us = 0;
    s_send(d, w, &m);
}

static void s_join(s_driver_t *d, s_worker_t *w)
{
    if (!w->sock) {
        int timeout = S_SNDTIMEO_MS;
        w->sock = zmq_socket(w->ctx, ZMQ_DEALER);
        if (!w->sock || proto_socket_setup(w->sock) != SEMOE_OK ||
            zmq_setsockopt(w->sock, ZMQ_SNDTIMEO, &timeout, sizeof timeout) != 0 ||
            zmq_connect(w->sock, d->args->endpoint) != 0) {
            fprintf(stderr, "bench: worker %s: socket: %s\n", w->id, zmq_strerror(zmq_errno()));
            if (w->sock)
                zmq_close(w->sock);
            w->sock = NULL;
            d->errors++;
            return;
        }
        d->dirty = true;
    }
    s_send_join(d, w);
}

static void s_ack(s_driver_t *d, s_worker_t *w, uint32_t type, uint64_t generation)
{
    proto_msg_t m;
    memset(&m, 0, sizeof m);
    m.hdr.type = PROTO_ACK;
    m.hdr.generation = generation;
    m.ack.acked_type = type;
    m.ack.status = 0;
    s_send(d, w, &m);
}

static void s_on_message(s_driver_t *d, s_worker_t *w, const void *buf, size_t len, int64_t now)
{
    proto_msg_t m;
    if (proto_decode(buf, len, &m) != PROTO_OK) {
        d->errors++;
        return;
    }
    switch (m.hdr.type) {
    case PROTO_WELCOME:
        w->run_id = m.hdr.run_id;
        w->heartbeat_ms = m.welcome.heartbeat_ms ? m.welcome.heartbeat_ms : 1000;
        /* Spread the first heartbeats over an interval, as real workers' starts are. */
        if (!w->next_hb_us)
            w->next_hb_us = now + (int64_t)(s_rand(d) % ((uint64_t)w->heartbeat_ms * 1000));
        break;
    case PROTO_PLAN:
        if (d->mark && m.hdr.generation >= d->mark && !w->mark_us)
            w->mark_us = now;
        w->run_id = m.hdr.run_id;
        if (m.hdr.generation > w->generation)
            w->generation = m.hdr.generation;
        s_ack(d, w, PROTO_PLAN, m.hdr.generation);
        break;
    case PROTO_COMM:
    case PROTO_PAUSE:
        s_ack(d, w, m.hdr.type, m.hdr.generation);
        break;
    case PROTO_STOP:
        s_close(d, w, 0);
        break;
    case PROTO_ERROR:
        d->errors++;
        if (m.error.code == PROTO_ERR_NOT_MEMBER) {
            d->rejoins++;
            s_send_join(d, w);
        } else if (m.error.code == PROTO_ERR_REFUSED) {
            d->refused++;
        }
        break;
    default: /* HEARTBEAT, RESUME: life, nothing to do */
        break;
    }
}

static void s_drain(s_driver_t *d, s_worker_t *w)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    while (w->sock && zmq_msg_recv(&msg, w->sock, ZMQ_DONTWAIT) >= 0) {
        if (zmq_msg_more(&msg)) { /* the coordinator sends one frame per message */
            d->errors++;
            while (zmq_msg_more(&msg) && zmq_msg_recv(&msg, w->sock, ZMQ_DONTWAIT) >= 0)
                ;
            continue;
        }
        s_on_message(d, w, zmq_msg_data(&msg), zmq_msg_size(&msg), clock_mono_us());
    }
    zmq_msg_close(&msg);
}

/* Sends the heartbeats that are due; returns when the next one is. */
static int64_t s_heartbeats(s_driver_t *d, int64_t now)
{
    int64_t next = now + S_MAX_WAIT_US;
    for (int k = 0; k < d->n; k++) {
        s_worker_t *w = &d->w[k];
        if (!w->sock || !w->next_hb_us)
            continue;
        if (w->next_hb_us <= now) {
            proto_msg_t m;
            memset(&m, 0, sizeof m);
            m.hdr.type = PROTO_HEARTBEAT;
            m.heartbeat.load = PROTO_U32S(d->zeros, d->args->n_loads);
            s_send(d, w, &m);
            w->next_hb_us += (int64_t)w->heartbeat_ms * 1000;
            if (w->next_hb_us <= now) /* we fell behind: do not burst */
                w->next_hb_us = now + (int64_t)w->heartbeat_ms * 1000;
        }
        if (w->next_hb_us < next)
            next = w->next_hb_us;
    }
    return next;
}

static s_worker_t *s_owned(s_driver_t *d, long i)
{
    long k = i - d->args->first;
    if (k < 0 || k % d->args->stride || k / d->args->stride >= d->n)
        return NULL;
    return &d->w[k / d->args->stride];
}

/* Runs one command from the pipe and answers it. */
static void s_command(s_driver_t *d, void *pipe, const char *cmd)
{
    char reply[256] = "NO";
    long a, b;
    unsigned long long g;
    if (sscanf(cmd, "JOIN %ld %ld", &a, &b) == 2) {
        int64_t t0 = 0;
        for (int k = 0; k < d->n; k++) {
            s_worker_t *w = &d->w[k];
            if (w->index < a || w->index >= b || w->sock)
                continue;
            if (!t0)
                t0 = clock_mono_us();
            s_join(d, w);
        }
        snprintf(reply, sizeof reply, "OK %" PRId64, t0);
    } else if (sscanf(cmd, "LEAVE %ld", &a) == 1) {
        s_worker_t *w = s_owned(d, a);
        if (w && w->sock) {
            proto_msg_t m;
            memset(&m, 0, sizeof m);
            m.hdr.type = PROTO_LEAVE;
            snprintf(m.leave.reason, sizeof m.leave.reason, "bench: leaving");
            int64_t t0 = clock_mono_us();
            s_send(d, w, &m);
            s_close(d, w, 1000); /* linger so the LEAVE goes out */
            snprintf(reply, sizeof reply, "OK %" PRId64, t0);
        }
    } else if (sscanf(cmd, "KILL %ld", &a) == 1) {
        s_worker_t *w = s_owned(d, a);
        if (w && w->sock) {
            int64_t t0 = clock_mono_us();
            s_close(d, w, 0);
            snprintf(reply, sizeof reply, "OK %" PRId64, t0);
        }
    } else if (sscanf(cmd, "MARK %llu", &g) == 1) {
        d->mark = g;
        for (int k = 0; k < d->n; k++)
            d->w[k].mark_us = 0;
        snprintf(reply, sizeof reply, "OK");
    } else if (strcmp(cmd, "QUERY") == 0) {
        long live = 0, marked = 0;
        int64_t first = 0, last = 0;
        uint64_t gmin = UINT64_MAX, gmax = 0;
        for (int k = 0; k < d->n; k++) {
            s_worker_t *w = &d->w[k];
            if (!w->sock)
                continue;
            live++;
            gmin = w->generation < gmin ? w->generation : gmin;
            gmax = w->generation > gmax ? w->generation : gmax;
            if (!w->mark_us)
                continue;
            marked++;
            if (!first || w->mark_us < first)
                first = w->mark_us;
            if (w->mark_us > last)
                last = w->mark_us;
        }
        snprintf(reply, sizeof reply,
                 "%ld %ld %" PRId64 " %" PRId64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64
                 " %" PRIu64,
                 live, marked, first, last, live ? gmin : 0, gmax, d->errors, d->rejoins,
                 d->refused);
    }
    actor_send_str(pipe, reply, 0);
}

static void s_rebuild(s_driver_t *d, void *pipe)
{
    d->nitems = 1;
    d->items[0] = (zmq_pollitem_t){.socket = pipe, .events = ZMQ_POLLIN};
    for (int k = 0; k < d->n; k++) {
        if (!d->w[k].sock)
            continue;
        d->items[d->nitems] = (zmq_pollitem_t){.socket = d->w[k].sock, .events = ZMQ_POLLIN};
        d->map[d->nitems++] = k;
    }
    d->dirty = false;
}

void simworker_actor(void *pipe, void *args_)
{
    const simworker_args_t *args = args_;
    s_driver_t d = {.args = args, .rng = args->seed | 1, .dirty = true};
    for (int i = args->first; i < args->total; i += args->stride)
        d.n++;
    d.w = semoe_xcalloc((size_t)d.n + 1, sizeof *d.w);
    d.items = semoe_xcalloc((size_t)d.n + 1, sizeof *d.items);
    d.map = semoe_xcalloc((size_t)d.n + 1, sizeof *d.map);
    d.zeros = semoe_xcalloc((size_t)args->n_loads + 1, sizeof *d.zeros);
    for (int k = 0; k < d.n; k++) {
        s_worker_t *w = &d.w[k];
        w->index = args->first + k * args->stride;
        w->ctx = args->ctxs[k % args->n_ctxs];
        snprintf(w->id, sizeof w->id, "sim%05d", w->index);
    }
    actor_signal(pipe, 0);

    for (;;) {
        if (d.dirty)
            s_rebuild(&d, pipe);
        int64_t now = clock_mono_us();
        int64_t next = s_heartbeats(&d, now);
        long wait_ms = (long)((next - now + 999) / 1000);
        if (zmq_poll(d.items, d.nitems, wait_ms < 0 ? 0 : wait_ms) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break;
        }
        if (d.items[0].revents & ZMQ_POLLIN) {
            char *cmd = actor_recv_str(pipe);
            bool term = !cmd || strcmp(cmd, "$TERM") == 0;
            if (!term)
                s_command(&d, pipe, cmd);
            free(cmd);
            if (term)
                break;
            continue; /* a command may have closed sockets the items still name */
        }
        for (int i = 1; i < d.nitems; i++)
            if (d.items[i].revents & ZMQ_POLLIN)
                s_drain(&d, &d.w[d.map[i]]);
    }
    for (int k = 0; k < d.n; k++)
        s_close(&d, &d.w[k], 0);
    free(d.zeros);
    free(d.map);
    free(d.items);
    free(d.w);
}
