/* A fake training worker over a raw ZeroMQ DEALER (see fake_worker.h). */
#include "tests/fake_worker.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/harness.h"

static void *s_ctx; /* the fakes' ZeroMQ context */

bool fake_worker_open(fake_worker_t *self, const char *endpoint, const char *id)
{
    memset(self, 0, sizeof *self);
    self->id = id;
    if (!s_ctx)
        s_ctx = zmq_ctx_new();
    CHECK(s_ctx, "zmq_ctx_new");
    if (!s_ctx)
        return false;
    self->sock = zmq_socket(s_ctx, ZMQ_DEALER);
    if (!self->sock || proto_socket_setup(self->sock) != SEMOE_OK)
        return false;
    return zmq_connect(self->sock, endpoint) == 0;
}

void fake_worker_close(fake_worker_t *self)
{
    if (self->sock)
        zmq_close(self->sock);
    self->sock = NULL;
    free(self->job);
    self->job = NULL;
}

void fake_worker_term(void)
{
    if (s_ctx)
        zmq_ctx_term(s_ctx);
    s_ctx = NULL;
}

void fake_worker_send(fake_worker_t *self, proto_msg_t *m)
{
    m->hdr.run_id = self->run;
    m->hdr.generation = self->gen;
    m->hdr.seq = ++self->seq;
    CHECK(proto_send(self->sock, NULL, 0, m) == SEMOE_OK, "%s: send %s: %s", self->id,
          proto_type_name(m->hdr.type), semoe_err_msg());
}

void fake_worker_join(fake_worker_t *self)
{
    fake_worker_join_as(self, "cpu");
}

void fake_worker_join_as(fake_worker_t *self, const char *device_kind)
{
    proto_msg_t m = {.hdr.type = PROTO_JOIN};
    snprintf(m.join.id, sizeof m.join.id, "%s", self->id);
    snprintf(m.join.host, sizeof m.join.host, "127.0.0.1");
    m.join.pid = (uint32_t)getpid();
    snprintf(m.join.device_kind, sizeof m.join.device_kind, "%s", device_kind);
    snprintf(m.join.device_name, sizeof m.join.device_name, "fake");
    snprintf(m.join.data_endpoint, sizeof m.join.data_endpoint, "tcp://127.0.0.1:9");
    fake_worker_send(self, &m);
}

void fake_worker_ack(fake_worker_t *self, uint32_t type)
{
    proto_msg_t m = {.hdr.type = PROTO_ACK};
    m.ack.acked_type = type;
    m.ack.bytes = type == PROTO_PLAN ? self->ack_bytes : 0;
    fake_worker_send(self, &m);
}

void fake_worker_heartbeat(fake_worker_t *self, const proto_heartbeat_t *hb)
{
    proto_msg_t m = {.hdr.type = PROTO_HEARTBEAT};
    m.heartbeat = *hb;
    fake_worker_send(self, &m);
}

fake_worker_recv_t fake_worker_recv(fake_worker_t *self, int timeout_ms, zmq_msg_t *msg,
                                    proto_msg_t *m)
{
    zmq_pollitem_t it = {.socket = self->sock, .events = ZMQ_POLLIN};
    if (timeout_ms > 0 && zmq_poll(&it, 1, timeout_ms) <= 0)
        return FAKE_WORKER_NONE;
    zmq_msg_init(msg);
    if (zmq_msg_recv(msg, self->sock, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(msg);
        return FAKE_WORKER_NONE;
    }
    if (proto_decode(zmq_msg_data(msg), zmq_msg_size(msg), m) != PROTO_OK) {
        CHECK(false, "%s: a message that does not decode", self->id);
        zmq_msg_close(msg);
        return FAKE_WORKER_MALFORMED;
    }
    return FAKE_WORKER_MSG;
}

void fake_worker_count(fake_worker_t *self, const proto_msg_t *m)
{
    switch (m->hdr.type) {
    case PROTO_WELCOME:
        self->welcomes++;
        self->run = m->hdr.run_id;
        free(self->job);
        self->job = strndup((const char *)m->welcome.job.data, m->welcome.job.size);
        break;
    case PROTO_PLAN:
        self->plans++;
        self->gen = m->hdr.generation;
        self->rank = m->plan.rank;
        break;
    case PROTO_PAUSE:
        self->pauses++;
        break;
    case PROTO_RESUME:
        self->resumes++;
        self->resume_gen = m->hdr.generation;
        self->resume_step = m->resume.step;
        break;
    case PROTO_HEARTBEAT:
        self->heartbeats++;
        self->heartbeat_gen = m->hdr.generation;
        break;
    case PROTO_STOP:
        self->stops++;
        self->stop_checkpoint = m->stop.checkpoint;
        break;
    case PROTO_ERROR:
        self->errors++;
        fprintf(stderr, "  %s: ERROR %u: %s\n", self->id, m->error.code, m->error.text);
        break;
    default:
        break;
    }
}
