/* COMM relay (net): the new rank 0 of a generation sends its communicator id up and every
 * member of that generation gets the same bytes back; a COMM from another rank breaks
 * protocol (ERROR, removed, new generation); a COMM of an older generation is dropped. The
 * workers are scripted DEALER clients speaking proto/, so the test sees every message. */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "proto/msg.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"

typedef struct {
    void *sock;
    char id[32];
    uint64_t run_id, generation, seq;
    uint32_t rank, world;
    uint8_t raw[1 << 16]; /* the last message received; views in msg point here */
    proto_msg_t msg;
} client_t;

/* Receives the next message of the given type (skipping heartbeats and others), up to
 * timeout_ms; false on timeout. */
static bool s_recv_type(client_t *c, uint32_t type, int timeout_ms)
{
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        int64_t left = deadline - proc_now_ms();
        if (left <= 0)
            return false;
        zmq_pollitem_t it = {c->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, (long)left) <= 0)
            continue;
        int n = zmq_recv(c->sock, c->raw, sizeof c->raw, 0);
        if (n < 0 || (size_t)n > sizeof c->raw)
            continue;
        if (proto_decode(c->raw, (size_t)n, &c->msg) != PROTO_OK)
            continue;
        if (c->msg.hdr.type == type)
            return true;
    }
}

static void s_send(client_t *c, proto_msg_t *m)
{
    m->hdr.run_id = c->run_id;
    m->hdr.seq = ++c->seq;
    if (!m->hdr.generation)
        m->hdr.generation = c->generation;
    if (proto_send(c->sock, NULL, 0, m) != SEMOE_OK)
        fprintf(stderr, "send %s: %s\n", proto_type_name(m->hdr.type), semoe_err_msg());
}

static bool s_join(client_t *c, void *ctx, const char *endpoint, const char *id)
{
    snprintf(c->id, sizeof c->id, "%s", id);
    c->sock = zmq_socket(ctx, ZMQ_DEALER);
    proto_socket_setup(c->sock);
    if (zmq_connect(c->sock, endpoint) != 0)
        return false;
    proto_msg_t m = {.hdr = {.type = PROTO_JOIN}};
    snprintf(m.join.id, sizeof m.join.id, "%s", id);
    strcpy(m.join.host, "127.0.0.1");
    m.join.pid = (uint32_t)getpid();
    strcpy(m.join.device_kind, "cpu");
    strcpy(m.join.device_name, "scripted");
    snprintf(m.join.data_endpoint, sizeof m.join.data_endpoint, "tcp://127.0.0.1:%d",
             1024 + (int)test_rand_below(60000));
    s_send(c, &m);
    if (!s_recv_type(c, PROTO_WELCOME, 5000))
        return false;
    c->run_id = c->msg.hdr.run_id;
    return true;
}

/* Waits for a PLAN of a newer generation than the client has, takes rank and world, ACKs. */
static bool s_take_plan(client_t *c, uint32_t want_world)
{
    int64_t deadline = proc_now_ms() + 5000;
    while (proc_now_ms() < deadline) {
        if (!s_recv_type(c, PROTO_PLAN, (int)(deadline - proc_now_ms())))
            return false;
        if (c->msg.plan.world != want_world || c->msg.hdr.generation <= c->generation)
            continue;
        c->generation = c->msg.hdr.generation;
        c->rank = c->msg.plan.rank;
        c->world = c->msg.plan.world;
        proto_msg_t ack = {.hdr = {.type = PROTO_ACK, .generation = c->generation}};
        ack.ack.acked_type = PROTO_PLAN;
        s_send(c, &ack);
        return true;
    }
    return false;
}

static void s_random_bytes(uint8_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        b[i] = (uint8_t)test_rand();
}

int main(void)
{
    test_init("comm");
    proc_init("comm");
    proc_ports_t pp;
    REQUIRE(proc_ports_pick(&pp), "no free ports");
    char job[4096];
    proc_src_path(job, sizeof job, "tests/jobs/control.json");
    proc_t *coord = proc_start_coordinator("coordinator", job, &pp, NULL);
    REQUIRE(coord, "coordinator did not start");

    void *ctx = zmq_ctx_new();
    client_t *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b);
    REQUIRE(s_join(a, ctx, pp.control_ep, "comm-a"), "a: no WELCOME");
    REQUIRE(s_join(b, ctx, pp.control_ep, "comm-b"), "b: no WELCOME");
    REQUIRE(s_take_plan(a, 2) && s_take_plan(b, 2), "no PLAN of world 2");
    CHECK(a->generation == b->generation, "generations %llu and %llu",
          (unsigned long long)a->generation, (unsigned long long)b->generation);
    client_t *r0 = a->rank == 0 ? a : b, *r1 = a->rank == 0 ? b : a;
    CHECK(r0->rank == 0 && r1->rank == 1, "ranks %u and %u", r0->rank, r1->rank);

    /* Rank 0's id reaches both, unchanged, under the generation. */
    uint8_t id[128];
    s_random_bytes(id, sizeof id);
    proto_msg_t comm = {.hdr = {.type = PROTO_COMM}};
    comm.comm.world = 2;
    comm.comm.comm_id = (proto_bytes_t){id, sizeof id};
    s_send(r0, &comm);
    client_t *both[2] = {r0, r1};
    for (int i = 0; i < 2; i++) {
        bool got = s_recv_type(both[i], PROTO_COMM, 5000);
        CHECK(got, "%s: no COMM relayed", both[i]->id);
        if (got) {
            proto_comm_t *c = &both[i]->msg.comm;
            CHECK(c->comm_id.size == sizeof id && !memcmp(c->comm_id.data, id, sizeof id),
                  "%s: relayed id differs", both[i]->id);
            CHECK(both[i]->msg.hdr.generation == r0->generation, "%s: relayed under gen %llu",
                  both[i]->id, (unsigned long long)both[i]->msg.hdr.generation);
        }
    }

    /* A COMM from rank 1 breaks protocol: it gets ERROR and the other a new PLAN of world 1. */
    comm.hdr = (proto_header_t){.type = PROTO_COMM};
    s_send(r1, &comm);
    CHECK(s_recv_type(r1, PROTO_ERROR, 5000), "rank 1's COMM drew no ERROR");
    uint64_t old_gen = r0->generation;
    CHECK(s_take_plan(r0, 1), "no PLAN of world 1 after rank 1 was removed");
    CHECK(r0->generation > old_gen, "generation did not move");

    /* A stale COMM is dropped: the first COMM relayed after it carries the fresh id. */
    uint8_t stale[16], fresh[16];
    s_random_bytes(stale, sizeof stale);
    s_random_bytes(fresh, sizeof fresh);
    comm.hdr = (proto_header_t){.type = PROTO_COMM, .generation = old_gen};
    comm.comm.world = 1;
    comm.comm.comm_id = (proto_bytes_t){stale, sizeof stale};
    s_send(r0, &comm);
    comm.hdr = (proto_header_t){.type = PROTO_COMM};
    comm.comm.comm_id = (proto_bytes_t){fresh, sizeof fresh};
    s_send(r0, &comm);
    bool got = s_recv_type(r0, PROTO_COMM, 5000);
    CHECK(got && r0->msg.comm.comm_id.size == sizeof fresh &&
              !memcmp(r0->msg.comm.comm_id.data, fresh, sizeof fresh),
          "the stale COMM was relayed, or the fresh one was not");

    cJSON *st = test_status_query(pp.status_ep, 2000);
    CHECK(st && test_status_counter(st, "protocol_errors") >= 1, "protocol error not counted");
    cJSON_Delete(st);

    zmq_close(a->sock);
    zmq_close(b->sock);
    zmq_ctx_term(ctx);
    free(a), free(b);
    int status;
    CHECK(proc_signal(coord, SIGTERM) && proc_wait(coord, 10000, &status) &&
              proc_exit_code(status) == 0,
          "coordinator did not exit 0 on SIGTERM");
    return test_finish();
}
