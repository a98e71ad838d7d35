/* The raw clients of test_hostile and the messages they forge (tests/hostile_client.h). Every
 * value a message carries comes from the test's seeded random source, so a failing run replays. */
#include "tests/hostile_client.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "tests/harness.h"
#include "tests/proc.h"

static hostile_t *s_h;
static uint32_t s_zeros[HOSTILE_MAX_EXPERTS];
static uint32_t s_offsets[HOSTILE_MAX_EXPERTS + 1];
static const uint32_t s_batch[2] = {0, 8};
static const char *const s_peer_ids[1] = {"hx"};
static const char *const s_peer_eps[1] = {"tcp://127.0.0.1:9"};
static uint8_t s_comm_id[128];

void hostile_init(hostile_t *h)
{
    s_h = h;
    for (uint32_t i = 0; i <= HOSTILE_MAX_EXPERTS; i++)
        s_offsets[i] = i;
    for (size_t i = 0; i < sizeof s_comm_id; i++)
        s_comm_id[i] = (uint8_t)test_rand();
}

/* --- messages --------------------------------------------------------------------------- */

void hostile_valid(uint32_t type, uint64_t run, uint64_t gen, proto_msg_t *m)
{
    uint32_t ne = s_h->layers * s_h->experts;
    memset(m, 0, sizeof *m);
    m->hdr = (proto_header_t){.type = type, .run_id = run, .generation = gen,
                              .seq = test_rand_below(1000)};
    switch (type) {
    case PROTO_JOIN:
        snprintf(m->join.id, sizeof m->join.id, "hostile%04u", (unsigned)test_rand_below(10000));
        snprintf(m->join.host, sizeof m->join.host, "127.0.0.1");
        m->join.pid = 1;
        snprintf(m->join.device_kind, sizeof m->join.device_kind, "cpu");
        snprintf(m->join.device_name, sizeof m->join.device_name, "cpu");
        snprintf(m->join.data_endpoint, sizeof m->join.data_endpoint, "tcp://127.0.0.1:9");
        break;
    case PROTO_WELCOME:
        snprintf(m->welcome.worker_id, sizeof m->welcome.worker_id, "w1");
        m->welcome.heartbeat_ms = s_h->heartbeat_ms;
        m->welcome.liveness = 3;
        m->welcome.job = (proto_bytes_t){.data = (const uint8_t *)"{}", .size = 2};
        break;
    case PROTO_HEARTBEAT:
        m->heartbeat.step = test_rand_below(100);
        m->heartbeat.load = PROTO_U32S(s_zeros, ne);
        break;
    case PROTO_PLAN:
        m->plan.rank = 0;
        m->plan.world = 1;
        m->plan.num_layers = s_h->layers;
        m->plan.num_experts = s_h->experts;
        m->plan.global_batch = 8;
        m->plan.batch_offsets = PROTO_U32S(s_batch, 2);
        m->plan.holder_offsets = PROTO_U32S(s_offsets, ne + 1);
        m->plan.holders = PROTO_U32S(s_zeros, ne);
        m->plan.peers = PROTO_PEERS(s_peer_ids, s_peer_eps, 1);
        break;
    case PROTO_COMM:
        m->comm.world = 1;
        m->comm.comm_id = (proto_bytes_t){.data = s_comm_id, .size = sizeof s_comm_id};
        break;
    case PROTO_ACK:
        m->ack.acked_type = PROTO_PLAN;
        break;
    case PROTO_PAUSE:
        m->pause.step = 2 + test_rand_below(1000);
        break;
    case PROTO_RESUME:
        m->resume.step = 2 + test_rand_below(1000);
        break;
    case PROTO_LEAVE:
        snprintf(m->leave.reason, sizeof m->leave.reason, "hostile");
        break;
    case PROTO_ERROR:
        m->error.code = PROTO_ERR_MALFORMED;
        snprintf(m->error.text, sizeof m->error.text, "hostile");
        break;
    default:
        break;
    }
}

bool hostile_encode(const proto_msg_t *m, msgpack_sbuffer *sb)
{
    msgpack_sbuffer_init(sb);
    semoe_rc rc = proto_encode(m, sb);
    CHECK(rc == SEMOE_OK, "proto_encode %s: %s", proto_type_name(m->hdr.type), semoe_err_msg());
    return rc == SEMOE_OK;
}

uint32_t hostile_rand_nonjoin_type(void)
{
    static const uint32_t types[] = {PROTO_WELCOME, PROTO_HEARTBEAT, PROTO_PLAN,  PROTO_COMM,
                                     PROTO_ACK,     PROTO_PAUSE,     PROTO_RESUME, PROTO_LEAVE,
                                     PROTO_ERROR};
    return types[test_rand_below(sizeof types / sizeof types[0])];
}

/* The six header values, with an array header claiming n elements. */
static void s_pack_header(msgpack_packer *pk, uint32_t n, uint64_t magic, uint64_t version,
                          uint64_t type, uint64_t gen)
{
    msgpack_pack_array(pk, n);
    msgpack_pack_uint64(pk, magic);
    msgpack_pack_uint64(pk, version);
    msgpack_pack_uint64(pk, type);
    msgpack_pack_uint64(pk, s_h->run_id);
    msgpack_pack_uint64(pk, gen);
    msgpack_pack_uint64(pk, test_rand_below(100));
}

/* A HEARTBEAT body after the given header values. */
static void s_pack_heartbeat(msgpack_sbuffer *sb, uint64_t magic, uint64_t version, uint64_t type)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    s_pack_header(&pk, 6 + 11, magic, version, type, s_h->gen);
    for (int i = 0; i < 5; i++)
        msgpack_pack_uint64(&pk, 0);
    uint32_t bytes = 4 * s_h->layers * s_h->experts;
    msgpack_pack_bin(&pk, bytes);
    msgpack_pack_bin_body(&pk, s_zeros, bytes);
    msgpack_pack_double(&pk, 2.5); /* loss, eval_loss, eval_step, tokens_per_s, phase */
    msgpack_pack_double(&pk, 2.75);
    msgpack_pack_uint64(&pk, 0);
    msgpack_pack_double(&pk, 100.0);
    msgpack_pack_uint32(&pk, PROTO_PHASE_TRAINING);
}

/* --- malformed messages ----------------------------------------------------------------- */

typedef struct {
    const char *name;
    const char *hex;
} s_bomb_t;

/* Containers and strings that claim far more than the bytes behind them. */
static const s_bomb_t s_bombs[] = {
    {"array32 of 4G elements", "ddffffffff"},
    {"array32 of 4G, 96 GB to msgpack-c", "ddff000000"},
    {"array16 of 64K elements", "dcffff"},
    {"str32 of 4 GB", "dbffffffff41"},
    {"bin32 of 4 GB", "c6ffffffff00"},
    {"ext32 of 4 GB", "c9ffffffff01"},
    {"map32 of 4G pairs", "dfffffffff"},
    {"map16 of 64K pairs", "deffff"},
    {"str16 of 64 KB", "daffff41"},
    {"bin16 of 64 KB", "c5ffff00"},
    {"str8 of 255 B", "d9ff"},
    {"fixarray 15, empty", "9f"},
    {"never-used byte", "c1"},
};

static size_t s_hex(const char *hex, uint8_t *out)
{
    size_t n = 0;
    for (; hex[0] && hex[1]; hex += 2) {
        unsigned v;
        sscanf(hex, "%2x", &v);
        out[n++] = (uint8_t)v;
    }
    return n;
}

/* Nested arrays (91 91 ... ) or maps of arrays (81 91 81 91 ...), depth deep. */
static void s_nest(msgpack_sbuffer *sb, int depth, bool maps)
{
    for (int i = 0; i < depth; i++) {
        uint8_t b[2] = {0x81, 0x91};
        msgpack_sbuffer_write(sb, maps ? (const char *)b : (const char *)b + 1, maps ? 2 : 1);
    }
}

void hostile_build_bomb(msgpack_sbuffer *sb)
{
    msgpack_packer pk;
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    int where = (int)test_rand_below(4);
    if (where == 1 || where == 2) {
        uint32_t type = hostile_rand_nonjoin_type();
        if (test_rand_below(2))
            type = PROTO_JOIN; /* a bomb where the id goes can never make a valid JOIN */
        uint32_t k = (uint32_t)test_rand_below(10);
        s_pack_header(&pk, 6 + k + 1 + (uint32_t)test_rand_below(4), PROTO_MAGIC, PROTO_VERSION,
                      type, s_h->gen);
        for (uint32_t i = 0; i < k; i++)
            msgpack_pack_uint32(&pk, 0);
    } else if (where == 3) {
        /* The message's own array claims 4G elements, then a valid-looking header. */
        uint8_t b[5] = {0xdd, 0xff, 0xff, 0xff, 0xff};
        msgpack_sbuffer_write(sb, (const char *)b, sizeof b);
        msgpack_pack_uint32(&pk, PROTO_MAGIC);
        msgpack_pack_uint32(&pk, PROTO_VERSION);
        msgpack_pack_uint32(&pk, PROTO_HEARTBEAT);
    }
    uint64_t pick = test_rand_below(sizeof s_bombs / sizeof s_bombs[0] + 2);
    if (pick < sizeof s_bombs / sizeof s_bombs[0]) {
        uint8_t b[16];
        size_t n = s_hex(s_bombs[pick].hex, b);
        msgpack_sbuffer_write(sb, (const char *)b, n);
        /* Sometimes a few real bytes follow, as if the claim were being honoured. */
        for (uint64_t i = 0, extra = test_rand_below(64); i < extra; i++) {
            char x = (char)test_rand();
            msgpack_sbuffer_write(sb, &x, 1);
        }
    } else {
        s_nest(sb, 10000 + (int)test_rand_below(1000), pick % 2);
    }
}

void hostile_build_bad_header(msgpack_sbuffer *sb)
{
    static const uint64_t magics[] = {0, PROTO_MAGIC ^ 1, 0x454f4d53u, UINT64_MAX};
    static const uint64_t versions[] = {0, PROTO_VERSION + 1, 255, 1ull << 32};
    static const uint64_t types[] = {0, PROTO_TYPE_END, 255, (1ull << 32) + PROTO_HEARTBEAT,
                                     UINT64_MAX};
    msgpack_sbuffer_init(sb);
    switch (test_rand_below(4)) {
    case 0:
        s_pack_heartbeat(sb, magics[test_rand_below(4)], PROTO_VERSION, PROTO_HEARTBEAT);
        break;
    case 1:
        s_pack_heartbeat(sb, PROTO_MAGIC, versions[test_rand_below(4)], PROTO_HEARTBEAT);
        break;
    case 2:
        s_pack_heartbeat(sb, PROTO_MAGIC, PROTO_VERSION, types[test_rand_below(5)]);
        break;
    default: {
        msgpack_packer pk;
        msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
        msgpack_pack_array(&pk, 12);
        msgpack_pack_str_with_body(&pk, "SMOE", 4);
        break;
    }
    }
}

void hostile_build_mutant(msgpack_sbuffer *sb)
{
    proto_msg_t m;
    hostile_valid(hostile_rand_nonjoin_type(), s_h->run_id, s_h->gen, &m);
    if (!hostile_encode(&m, sb))
        return;
    for (uint64_t i = 0, n = 1 + test_rand_below(4); i < n && sb->size; i++) {
        size_t at = (size_t)test_rand_below(sb->size);
        switch (test_rand_below(3)) {
        case 0:
            sb->data[at] = (char)test_rand();
            break;
        case 1:
            sb->data[at] = (char)(0x80 | (test_rand() & 0x7f)); /* a container or a long header */
            break;
        default:
            sb->size = at;
            break;
        }
    }
}

void hostile_build_generation(msgpack_sbuffer *sb)
{
    uint64_t gen = s_h->gen;
    uint64_t gens[] = {0, gen ? gen - 1 : 0, gen, gen + 1, gen + 1000, UINT64_MAX};
    uint64_t runs[] = {s_h->run_id, 0, s_h->run_id ^ 0x5a5a5a5a5a5a5a5aull, test_rand()};
    proto_msg_t m;
    hostile_valid(hostile_rand_nonjoin_type(), runs[test_rand_below(4)], gens[test_rand_below(6)],
                  &m);
    hostile_encode(&m, sb);
}

void hostile_build_random(msgpack_sbuffer *sb)
{
    uint64_t r = test_rand_below(100);
    size_t len = r < 70 ? test_rand_below(64) : r < 95 ? test_rand_below(4096)
                                                        : test_rand_below(65536);
    msgpack_sbuffer_init(sb);
    for (size_t i = 0; i < len; i++) {
        char x = (char)test_rand();
        if (i == 0 && test_rand_below(4) == 0)
            x = (char)(0x90 | (test_rand() & 0x0f)); /* looks like a message's array */
        msgpack_sbuffer_write(sb, &x, 1);
    }
}

/* --- clients ---------------------------------------------------------------------------- */

void hostile_client_open(hostile_client_t *c, const void *routing_id, size_t id_len)
{
    int linger = 0, sndtimeo = 200;
    c->sock = zmq_socket(s_h->ctx, ZMQ_DEALER);
    if (!c->sock) {
        CHECK(false, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        return;
    }
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    if (routing_id)
        zmq_setsockopt(c->sock, ZMQ_ROUTING_ID, routing_id, id_len);
    CHECK(zmq_connect(c->sock, s_h->control_ep) == 0, "connect %s: %s", s_h->control_ep,
          zmq_strerror(zmq_errno()));
    c->sent = 0;
}

void hostile_client_close(hostile_client_t *c)
{
    if (c->sock)
        zmq_close(c->sock);
    c->sock = NULL;
}

void hostile_client_send(hostile_client_t *c, const void *buf, size_t len, int flags)
{
    if (!c->sock)
        return;
    if (zmq_send(c->sock, buf, len, flags) < 0)
        s_h->dropped++;
    else if (!(flags & ZMQ_SNDMORE))
        c->sent++;
    s_h->sends++;
}

uint32_t hostile_client_recv(hostile_client_t *c, int timeout_ms, uint32_t *code)
{
    zmq_pollitem_t it = {.socket = c->sock, .events = ZMQ_POLLIN};
    if (!c->sock || zmq_poll(&it, 1, timeout_ms) <= 0)
        return 0;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    uint32_t type = 0;
    if (zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) >= 0) {
        proto_msg_t m;
        bool more = zmq_msg_more(&msg);
        s_h->tally.total++;
        if (more || proto_decode(zmq_msg_data(&msg), zmq_msg_size(&msg), &m) != PROTO_OK) {
            s_h->tally.undecodable++;
        } else {
            type = m.hdr.type;
            if (type == PROTO_ERROR) {
                s_h->tally.by_code[m.error.code < 8 ? m.error.code : 0]++;
                if (code)
                    *code = m.error.code;
            } else {
                s_h->tally.not_error++;
            }
        }
        while (more && zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) >= 0)
            more = zmq_msg_more(&msg);
    }
    zmq_msg_close(&msg);
    return type;
}

void hostile_client_drain(hostile_client_t *c)
{
    while (hostile_client_recv(c, 0, NULL))
        ;
}

bool hostile_client_sync(hostile_client_t *c)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    hostile_valid(PROTO_HEARTBEAT, s_h->run_id, s_h->gen, &m);
    if (!hostile_encode(&m, &sb))
        return false;
    hostile_client_drain(c);
    hostile_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    int64_t end = proc_now_ms() + HOSTILE_REPLY_MS;
    uint32_t code = 0;
    while (proc_now_ms() < end)
        if (hostile_client_recv(c, 50, &code) == PROTO_ERROR && code == PROTO_ERR_NOT_MEMBER)
            return true;
    return false;
}

uint32_t hostile_ask(hostile_client_t *c, const proto_msg_t *m, uint32_t *code)
{
    msgpack_sbuffer sb;
    if (!hostile_encode(m, &sb))
        return 0;
    hostile_client_drain(c);
    hostile_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    return hostile_client_recv(c, HOSTILE_REPLY_MS, code);
}

bool hostile_ask_error(hostile_client_t *c, const proto_msg_t *m, uint32_t *code, uint32_t *got)
{
    bool error = false;
    *got = hostile_ask(c, m, code);
    for (int64_t end = proc_now_ms() + HOSTILE_REPLY_MS; *got && !error && proc_now_ms() < end;)
        if (!(error = *got == PROTO_ERROR))
            *got = hostile_client_recv(c, 100, code); /* heartbeats may come first */
    return error;
}

void hostile_leave_then_sync(hostile_client_t *c, const char *what)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    hostile_valid(PROTO_LEAVE, s_h->run_id, s_h->gen, &m);
    if (!hostile_encode(&m, &sb))
        return;
    hostile_client_drain(c);
    long other = s_h->tally.total - s_h->tally.by_code[PROTO_ERR_NOT_MEMBER];
    hostile_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    CHECK(hostile_client_sync(c), "%s: no NOT_MEMBER reply to the HEARTBEAT after it", what);
    hostile_client_drain(c);
    CHECK(s_h->tally.total - s_h->tally.by_code[PROTO_ERR_NOT_MEMBER] == other,
          "%s: a reply other than ERROR NOT_MEMBER", what);
}

void hostile_send_multipart(hostile_client_t *c)
{
    int frames = 3 + (int)test_rand_below(6);
    for (int f = 0; f < frames; f++) {
        msgpack_sbuffer sb;
        if (f == 0 && test_rand_below(2))
            hostile_build_generation(&sb);
        else
            hostile_build_random(&sb);
        hostile_client_send(c, sb.data, sb.size, f + 1 < frames ? ZMQ_SNDMORE : 0);
        msgpack_sbuffer_destroy(&sb);
    }
}

uint64_t hostile_join(hostile_client_t *c, const char *id, uint64_t *run)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    hostile_valid(PROTO_JOIN, 0, 0, &m);
    snprintf(m.join.id, sizeof m.join.id, "%s", id);
    if (!hostile_encode(&m, &sb))
        return 0;
    hostile_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    int64_t end = proc_now_ms() + 5000;
    while (proc_now_ms() < end) {
        zmq_pollitem_t it = {.socket = c->sock, .events = ZMQ_POLLIN};
        if (zmq_poll(&it, 1, 100) <= 0)
            continue;
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        uint64_t gen = 0;
        if (zmq_msg_recv(&msg, c->sock, 0) >= 0 &&
            proto_decode(zmq_msg_data(&msg), zmq_msg_size(&msg), &m) == PROTO_OK) {
            *run = m.hdr.run_id;
            if (m.hdr.type == PROTO_PLAN)
                gen = m.hdr.generation;
        }
        zmq_msg_close(&msg);
        if (gen)
            return gen;
    }
    return 0;
}
