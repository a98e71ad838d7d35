/* Hostile input on the coordinator's control port from raw ZeroMQ DEALER clients: random bytes,
 * truncated, mutated and oversized messages, msgpack bombs, valid messages out of order or with
 * stale and future generations, JOINs that steal a live id, multipart garbage. The coordinator
 * must stay up under 256 MB peak RSS, keep answering status and /metrics, count the protocol
 * errors, answer non-members with ERROR, and its live workers must never notice. */
#include <arpa/inet.h>
#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <msgpack.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <zmq.h>

#include "proto/msg.h"
#include "tests/harness.h"
#include "tests/proc.h"

#define S_WORKERS 3
#define S_HEARTBEAT_MS 200
/* Missed heartbeats before death: 1 s, so a loaded 2-core machine (the sanitizer build runs
 * beside) does not kill a worker while a coordinator stall of a second still shows. */
#define S_LIVENESS 5
#define S_CLIENTS 6
#define S_FUZZ_SENDS 12000
#define S_SYNC_EVERY 500
#define S_RSS_LIMIT_KB (256 * 1024)
#define S_REPLY_MS 3000
#define S_MAX_EXPERTS 4096

/* Under AddressSanitizer every freed block waits in a quarantine (256 MB by default) before it
 * is reused, so the daemons' RSS measures the sanitizer, not them: a sanitizer build starts them
 * with a small quarantine. */
#if defined(__SANITIZE_ADDRESS__)
#define S_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define S_ASAN 1
#endif
#endif

static const char *const s_ids[S_WORKERS] = {"w1", "w2", "w3"};

typedef struct {
    void *sock;
    long sent;
} s_client_t;

/* Replies the hostile clients got. */
typedef struct {
    long total, undecodable, not_error, by_code[8];
} s_tally_t;

static struct {
    void *ctx;
    proc_ports_t ports;
    proc_t *coord;
    uint64_t run_id;   /* the coordinator's, from status */
    uint64_t gen;      /* generation of the settled job before the attack */
    uint32_t layers, experts;
    s_client_t clients[S_CLIENTS];
    s_tally_t tally;
    long sends, dropped;
    bool phase_a_broken; /* a status snapshot during phase A already failed; say it once */
} S;

static uint32_t s_zeros[S_MAX_EXPERTS];
static uint32_t s_offsets[S_MAX_EXPERTS + 1];
static const uint32_t s_batch[2] = {0, 8};
static const char *const s_peer_ids[1] = {"hx"};
static const char *const s_peer_eps[1] = {"tcp://127.0.0.1:9"};
static uint8_t s_comm_id[128];

/* --- status ----------------------------------------------------------------------------- */

static cJSON *s_status(void) { return test_status_query(S.ports.status_ep, 3000); }

static uint64_t s_vmhwm_kb(void)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)proc_pid(S.coord));
    FILE *f = fopen(path, "r");
    unsigned long long kb = 0;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "VmHWM: %llu kB", &kb) == 1)
            break;
    if (f)
        fclose(f);
    return kb;
}

/* The live workers as they were: all three listed and active, the generation unchanged. */
static bool s_untouched(const cJSON *st, char *why, size_t n)
{
    if (!st)
        return snprintf(why, n, "no status answer: %s", test_status_error()), false;
    if ((uint64_t)test_status_generation(st) != S.gen)
        return snprintf(why, n, "generation %lld, was %" PRIu64, test_status_generation(st),
                        S.gen), false;
    for (int i = 0; i < S_WORKERS; i++) {
        const cJSON *w = test_status_worker(st, s_ids[i]);
        const char *state = w ? test_status_worker_state(w) : NULL;
        if (!state || strcmp(state, "active") != 0)
            return snprintf(why, n, "worker %s %s", s_ids[i], w ? state : "not listed"), false;
    }
    if (test_status_worker_count(st) != S_WORKERS)
        return snprintf(why, n, "%d workers listed", test_status_worker_count(st)), false;
    return true;
}

/* --- messages --------------------------------------------------------------------------- */

/* A valid message of type (never STOP: from anyone it stops the job, by contract). PAUSE and
 * RESUME carry a step above 1 so that no mutation of their type byte makes a valid STOP. */
static void s_valid(uint32_t type, uint64_t run, uint64_t gen, proto_msg_t *m)
{
    uint32_t ne = S.layers * S.experts;
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
        m->welcome.heartbeat_ms = S_HEARTBEAT_MS;
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
        m->plan.num_layers = S.layers;
        m->plan.num_experts = S.experts;
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

/* Encodes m into sb (initialised here; the caller destroys it). */
static bool s_encode(const proto_msg_t *m, msgpack_sbuffer *sb)
{
    msgpack_sbuffer_init(sb);
    semoe_rc rc = proto_encode(m, sb);
    CHECK(rc == SEMOE_OK, "proto_encode %s: %s", proto_type_name(m->hdr.type), semoe_err_msg());
    return rc == SEMOE_OK;
}

/* Any type a hostile client may send valid (all but JOIN, which would make it a member, and
 * STOP). */
static uint32_t s_rand_nonjoin_type(void)
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
    msgpack_pack_uint64(pk, S.run_id);
    msgpack_pack_uint64(pk, gen);
    msgpack_pack_uint64(pk, test_rand_below(100));
}

/* A HEARTBEAT body after the given header values. */
static void s_pack_heartbeat(msgpack_sbuffer *sb, uint64_t magic, uint64_t version, uint64_t type)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    s_pack_header(&pk, 12, magic, version, type, S.gen);
    for (int i = 0; i < 5; i++)
        msgpack_pack_uint64(&pk, 0);
    uint32_t bytes = 4 * S.layers * S.experts;
    msgpack_pack_bin(&pk, bytes);
    msgpack_pack_bin_body(&pk, s_zeros, bytes);
}

/* --- clients ---------------------------------------------------------------------------- */

static void s_client_open(s_client_t *c, const void *routing_id, size_t id_len)
{
    int linger = 0, sndtimeo = 200;
    c->sock = zmq_socket(S.ctx, ZMQ_DEALER);
    if (!c->sock) {
        CHECK(false, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        return;
    }
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    if (routing_id)
        zmq_setsockopt(c->sock, ZMQ_ROUTING_ID, routing_id, id_len);
    CHECK(zmq_connect(c->sock, S.ports.control_ep) == 0, "connect %s: %s", S.ports.control_ep,
          zmq_strerror(zmq_errno()));
    c->sent = 0;
}

static void s_client_close(s_client_t *c)
{
    if (c->sock)
        zmq_close(c->sock);
    c->sock = NULL;
}

/* Queues one frame (flags: ZMQ_SNDMORE for a part); a full queue drops it (counted). */
static void s_client_send(s_client_t *c, const void *buf, size_t len, int flags)
{
    if (!c->sock)
        return;
    if (zmq_send(c->sock, buf, len, flags) < 0)
        S.dropped++;
    else if (!(flags & ZMQ_SNDMORE))
        c->sent++;
    S.sends++;
}

/* Receives one reply if one comes within timeout_ms; tallies it. Returns its decoded type
 * (0: none or undecodable) and *code for an ERROR. */
static uint32_t s_client_recv(s_client_t *c, int timeout_ms, uint32_t *code)
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
        S.tally.total++;
        if (more || proto_decode(zmq_msg_data(&msg), zmq_msg_size(&msg), &m) != PROTO_OK) {
            S.tally.undecodable++;
        } else {
            type = m.hdr.type;
            if (type == PROTO_ERROR) {
                S.tally.by_code[m.error.code < 8 ? m.error.code : 0]++;
                if (code)
                    *code = m.error.code;
            } else {
                S.tally.not_error++;
            }
        }
        while (more && zmq_msg_recv(&msg, c->sock, ZMQ_DONTWAIT) >= 0)
            more = zmq_msg_more(&msg);
    }
    zmq_msg_close(&msg);
    return type;
}

static void s_client_drain(s_client_t *c)
{
    while (s_client_recv(c, 0, NULL))
        ;
}

/* Sends a valid HEARTBEAT and waits for the ERROR that a non-member gets: the coordinator has
 * then handled everything this client sent before it. */
static bool s_client_sync(s_client_t *c)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    s_valid(PROTO_HEARTBEAT, S.run_id, S.gen, &m);
    if (!s_encode(&m, &sb))
        return false;
    s_client_drain(c);
    s_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    int64_t end = proc_now_ms() + S_REPLY_MS;
    uint32_t code = 0;
    while (proc_now_ms() < end)
        if (s_client_recv(c, 50, &code) == PROTO_ERROR && code == PROTO_ERR_NOT_MEMBER)
            return true;
    return false;
}

/* Sends one valid message and returns the type of the first reply (0: none in S_REPLY_MS). */
static uint32_t s_ask(s_client_t *c, const proto_msg_t *m, uint32_t *code)
{
    msgpack_sbuffer sb;
    if (!s_encode(m, &sb))
        return 0;
    s_client_drain(c);
    s_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    return s_client_recv(c, S_REPLY_MS, code);
}

/* A LEAVE from a non-member, then a HEARTBEAT: the only reply may be the HEARTBEAT's
 * NOT_MEMBER (or one for the LEAVE too). */
static void s_leave_then_sync(s_client_t *c, const char *what)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    s_valid(PROTO_LEAVE, S.run_id, S.gen, &m);
    if (!s_encode(&m, &sb))
        return;
    s_client_drain(c);
    long other = S.tally.total - S.tally.by_code[PROTO_ERR_NOT_MEMBER];
    s_client_send(c, sb.data, sb.size, 0);
    msgpack_sbuffer_destroy(&sb);
    CHECK(s_client_sync(c), "%s: no NOT_MEMBER reply to the HEARTBEAT after it", what);
    s_client_drain(c);
    CHECK(S.tally.total - S.tally.by_code[PROTO_ERR_NOT_MEMBER] == other,
          "%s: a reply other than ERROR NOT_MEMBER", what);
}

/* --- attacks ---------------------------------------------------------------------------- */

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

/* A bomb alone, or inside a valid-looking header after k valid u32 fields, or as the header's
 * own array count. */
static void s_build_bomb(msgpack_sbuffer *sb)
{
    msgpack_packer pk;
    msgpack_sbuffer_init(sb);
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    int where = (int)test_rand_below(4);
    if (where == 1 || where == 2) {
        uint32_t type = s_rand_nonjoin_type();
        if (test_rand_below(2))
            type = PROTO_JOIN; /* a bomb where the id goes can never make a valid JOIN */
        uint32_t k = (uint32_t)test_rand_below(10);
        s_pack_header(&pk, 6 + k + 1 + (uint32_t)test_rand_below(4), PROTO_MAGIC, PROTO_VERSION,
                      type, S.gen);
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

/* Wrong magic, version or type around a valid HEARTBEAT body, or the magic as a string. */
static void s_build_bad_header(msgpack_sbuffer *sb)
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

/* A valid non-JOIN message with random byte changes, insertions or a cut. */
static void s_build_mutant(msgpack_sbuffer *sb)
{
    proto_msg_t m;
    s_valid(s_rand_nonjoin_type(), S.run_id, S.gen, &m);
    if (!s_encode(&m, sb))
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

/* Valid non-JOIN messages with stale, current and future generations and right, zero and
 * wrong run ids: from a non-member all are refused with ERROR. */
static void s_build_generation(msgpack_sbuffer *sb)
{
    uint64_t gens[] = {0, S.gen ? S.gen - 1 : 0, S.gen, S.gen + 1, S.gen + 1000, UINT64_MAX};
    uint64_t runs[] = {S.run_id, 0, S.run_id ^ 0x5a5a5a5a5a5a5a5aull, test_rand()};
    proto_msg_t m;
    s_valid(s_rand_nonjoin_type(), runs[test_rand_below(4)], gens[test_rand_below(6)], &m);
    s_encode(&m, sb);
}

static void s_build_random(msgpack_sbuffer *sb)
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

/* 3 to 8 frames: garbage, or a valid non-JOIN message followed by garbage. */
static void s_send_multipart(s_client_t *c)
{
    int frames = 3 + (int)test_rand_below(6);
    for (int f = 0; f < frames; f++) {
        msgpack_sbuffer sb;
        if (f == 0 && test_rand_below(2))
            s_build_generation(&sb);
        else
            s_build_random(&sb);
        s_client_send(c, sb.data, sb.size, f + 1 < frames ? ZMQ_SNDMORE : 0);
        msgpack_sbuffer_destroy(&sb);
    }
}

/* Every prefix of a valid encoding of every type a client may send (JOIN too: no prefix of
 * it is a message). */
static void s_truncation_sweep(void)
{
    static const uint32_t types[] = {PROTO_JOIN,  PROTO_WELCOME, PROTO_HEARTBEAT, PROTO_PLAN,
                                     PROTO_COMM,  PROTO_ACK,     PROTO_PAUSE,     PROTO_RESUME,
                                     PROTO_LEAVE, PROTO_ERROR,   PROTO_STOP};
    long before = S.sends;
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        proto_msg_t m;
        msgpack_sbuffer sb;
        s_valid(types[t], S.run_id, S.gen, &m);
        if (types[t] == PROTO_STOP)
            m.stop.checkpoint = 0;
        if (!s_encode(&m, &sb))
            continue;
        s_client_t *c = &S.clients[t % S_CLIENTS];
        for (size_t len = 0; len < sb.size; len++) {
            s_client_send(c, sb.data, len, 0);
            if (len % 64 == 63)
                s_client_drain(c);
        }
        msgpack_sbuffer_destroy(&sb);
    }
    for (int i = 0; i < S_CLIENTS; i++)
        CHECK(s_client_sync(&S.clients[i]), "client %d: no NOT_MEMBER reply after the truncation "
              "sweep (coordinator stuck?)", i);
    printf("truncation sweep: %ld prefixes sent\n", S.sends - before);
}

/* Status after the coordinator handled a batch: the live workers untouched. */
static void s_check_phase_a(const char *when)
{
    cJSON *st = s_status();
    char why[512];
    bool ok = s_untouched(st, why, sizeof why);
    if (!ok && !S.phase_a_broken) {
        char sum[1024] = "";
        if (st)
            test_status_summary(st, sum, sizeof sum);
        CHECK(ok, "%s: live workers disturbed: %s (%s)", when, why, sum);
        S.phase_a_broken = true;
    }
    cJSON_Delete(st);
}

static void s_fuzz(void)
{
    long before = S.sends;
    for (int i = 0; i < S_FUZZ_SENDS; i++) {
        s_client_t *c = &S.clients[test_rand_below(S_CLIENTS)];
        if (test_rand_below(50) == 0) { /* reconnect with a fresh identity */
            s_client_close(c);
            s_client_open(c, NULL, 0);
        }
        msgpack_sbuffer sb = {0};
        bool single = true;
        switch (test_rand_below(7)) {
        case 0: s_build_random(&sb); break;
        case 1: s_build_bomb(&sb); break;
        case 2: s_build_bad_header(&sb); break;
        case 3: s_build_mutant(&sb); break;
        case 4: s_build_generation(&sb); break;
        case 5: {
            proto_msg_t m;
            s_valid(s_rand_nonjoin_type(), S.run_id, S.gen, &m);
            if (s_encode(&m, &sb))
                sb.size = (size_t)test_rand_below(sb.size);
            break;
        }
        default:
            s_send_multipart(c);
            single = false;
            break;
        }
        if (single)
            s_client_send(c, sb.data ? sb.data : "", sb.size, 0);
        msgpack_sbuffer_destroy(&sb);
        s_client_drain(c);
        if (i % S_SYNC_EVERY == S_SYNC_EVERY - 1) {
            CHECK(s_client_sync(c), "fuzz %d: no NOT_MEMBER reply to a valid HEARTBEAT", i);
            s_check_phase_a("fuzz");
        }
    }
    for (int i = 0; i < S_CLIENTS; i++)
        s_client_drain(&S.clients[i]);
    printf("fuzz: %ld messages sent (%ld dropped on a full queue)\n", S.sends - before, S.dropped);
}

/* Above PROTO_MAX_MSG: libzmq on the coordinator (ZMQ_MAXMSGSIZE) drops the connection. The
 * client's monitor sees that as a disconnect. */
static void s_oversized(void)
{
    static const size_t sizes[] = {(size_t)PROTO_MAX_MSG + 1, (size_t)48 << 20};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        s_client_t c = {0};
        char mon_ep[64];
        s_client_open(&c, NULL, 0);
        snprintf(mon_ep, sizeof mon_ep, "inproc://hostile-monitor-%zu", k);
        if (zmq_socket_monitor(c.sock, mon_ep, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) != 0) {
            CHECK(false, "zmq_socket_monitor: %s", zmq_strerror(zmq_errno()));
            s_client_close(&c);
            return;
        }
        void *mon = zmq_socket(S.ctx, ZMQ_PAIR);
        zmq_connect(mon, mon_ep);
        /* First a valid message, so we know the connection is up and served. */
        CHECK(s_client_sync(&c), "oversized: no reply before the big message");
        zmq_msg_t big;
        zmq_msg_init_size(&big, sizes[k]);
        memset(zmq_msg_data(&big), 0xdd, sizes[k]);
        int rc = zmq_msg_send(&big, c.sock, 0);
        CHECK(rc >= 0, "oversized: send %zu bytes: %s", sizes[k], zmq_strerror(zmq_errno()));
        if (rc < 0)
            zmq_msg_close(&big);
        bool disconnected = false;
        int64_t end = proc_now_ms() + 5000;
        while (!disconnected && proc_now_ms() < end) {
            zmq_pollitem_t it = {.socket = mon, .events = ZMQ_POLLIN};
            if (zmq_poll(&it, 1, 100) <= 0)
                continue;
            zmq_msg_t ev;
            zmq_msg_init(&ev);
            if (zmq_msg_recv(&ev, mon, 0) >= 0 && zmq_msg_size(&ev) >= 2) {
                uint16_t event;
                memcpy(&event, zmq_msg_data(&ev), 2);
                disconnected = event == ZMQ_EVENT_DISCONNECTED;
            }
            while (zmq_msg_more(&ev) && zmq_msg_recv(&ev, mon, 0) >= 0)
                ;
            zmq_msg_close(&ev);
        }
        CHECK(disconnected, "oversized: the coordinator kept the connection after a %zu-byte "
              "message (> PROTO_MAX_MSG %d): is ZMQ_MAXMSGSIZE set on its ROUTER?", sizes[k],
              PROTO_MAX_MSG);
        zmq_socket_monitor(c.sock, NULL, 0);
        zmq_close(mon);
        s_client_close(&c);
    }
    printf("after oversized frames: coordinator VmHWM %" PRIu64 " kB\n", s_vmhwm_kb());
    /* Frames each under the limit, together far above it. libzmq delivers a multipart message
     * whole, so the coordinator holds all of it at once: 6 x 15 MB stays under the RSS limit;
     * SEMOE_HOSTILE_BIG_FRAMES=24 shows what more does. */
    const char *env = getenv("SEMOE_HOSTILE_BIG_FRAMES");
    int frames = env && atoi(env) > 0 ? atoi(env) : 6;
    s_client_t c = {0};
    s_client_open(&c, NULL, 0);
    size_t frame = (size_t)15 << 20;
    char *buf = malloc(frame);
    if (!buf) {
        s_client_close(&c);
        return;
    }
    memset(buf, 0x91, frame);
    for (int f = 0; f < frames; f++)
        s_client_send(&c, buf, frame, f + 1 < frames ? ZMQ_SNDMORE : 0);
    free(buf);
    CHECK(s_client_sync(&c), "multipart of %d x 15 MB: no reply to a valid HEARTBEAT after it",
          frames);
    printf("after the multipart of %d x 15 MB: coordinator VmHWM %" PRIu64 " kB\n", frames,
           s_vmhwm_kb());
    s_client_close(&c);
    s_check_phase_a("oversized");
}

/* Valid non-JOIN messages before any JOIN, each from a fresh identity: ERROR NOT_MEMBER. A
 * LEAVE from a non-member is the exception the coordinator makes (the sender has gone): no
 * reply, or NOT_MEMBER, and nothing else happens. */
static void s_wrong_order(void)
{
    static const uint32_t types[] = {PROTO_HEARTBEAT, PROTO_ACK,    PROTO_PLAN,  PROTO_WELCOME,
                                     PROTO_COMM,      PROTO_PAUSE,  PROTO_RESUME, PROTO_LEAVE};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        s_client_t c = {0};
        s_client_open(&c, NULL, 0);
        proto_msg_t m;
        uint32_t code = 0;
        s_valid(types[t], S.run_id, S.gen, &m);
        if (types[t] == PROTO_LEAVE) {
            s_leave_then_sync(&c, "LEAVE before JOIN");
        } else {
            uint32_t got = s_ask(&c, &m, &code);
            CHECK(got == PROTO_ERROR && code == PROTO_ERR_NOT_MEMBER,
                  "%s before JOIN: reply %s code %u, want ERROR NOT_MEMBER (%d)",
                  proto_type_name(types[t]), got ? proto_type_name(got) : "(none)", code,
                  PROTO_ERR_NOT_MEMBER);
        }
        s_client_close(&c);
    }
}

/* A JOIN with a live worker's id, from another connection: ERROR REFUSED; also from a client
 * that sets its ZeroMQ routing id to the worker's name. */
static void s_steal_ids(void)
{
    for (int i = 0; i < S_WORKERS; i++) {
        for (int variant = 0; variant < 2; variant++) {
            s_client_t c = {0};
            s_client_open(&c, variant ? s_ids[i] : NULL, variant ? strlen(s_ids[i]) : 0);
            proto_msg_t m;
            uint32_t code = 0;
            s_valid(PROTO_JOIN, 0, 0, &m);
            snprintf(m.join.id, sizeof m.join.id, "%s", s_ids[i]);
            uint32_t got = s_ask(&c, &m, &code);
            CHECK(got == PROTO_ERROR && code == PROTO_ERR_REFUSED,
                  "JOIN as live %s%s: reply %s code %u, want ERROR REFUSED (%d)", s_ids[i],
                  variant ? " (routing id set to it)" : "", got ? proto_type_name(got) : "(none)",
                  code, PROTO_ERR_REFUSED);
            /* Then a LEAVE on that connection: it is not the member, nothing may happen. */
            s_leave_then_sync(&c, "LEAVE after a refused JOIN");
            s_client_close(&c);
        }
    }
    s_check_phase_a("JOIN with live ids");
}

/* A multipart message whose first frame is a valid JOIN: a control message is one frame, so
 * nobody may join this way. */
static void s_multipart_join(void)
{
    s_client_t c = {0};
    s_client_open(&c, NULL, 0);
    proto_msg_t m;
    msgpack_sbuffer sb;
    s_valid(PROTO_JOIN, 0, 0, &m);
    snprintf(m.join.id, sizeof m.join.id, "mpjoin");
    if (s_encode(&m, &sb)) {
        s_client_send(&c, sb.data, sb.size, ZMQ_SNDMORE);
        s_client_send(&c, "x", 1, ZMQ_SNDMORE);
        s_client_send(&c, "", 0, 0);
        msgpack_sbuffer_destroy(&sb);
    }
    CHECK(s_client_sync(&c), "multipart JOIN: no NOT_MEMBER reply to the HEARTBEAT after it "
          "(did the coordinator take the first frame as a JOIN?)");
    cJSON *st = s_status();
    CHECK(st && !test_status_worker(st, "mpjoin"),
          "a 3-frame message starting with a JOIN made 'mpjoin' a member");
    cJSON_Delete(st);
    s_client_close(&c);
}

/* --- phase B: a hostile member ---------------------------------------------------------- */

/* Joins as id, takes WELCOME and PLAN; returns the PLAN's generation (0 if it never came). */
static uint64_t s_intruder_join(s_client_t *c, const char *id, uint64_t *run)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    s_valid(PROTO_JOIN, 0, 0, &m);
    snprintf(m.join.id, sizeof m.join.id, "%s", id);
    if (!s_encode(&m, &sb))
        return 0;
    s_client_send(c, sb.data, sb.size, 0);
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

static bool s_settled_without(const char *absent, uint64_t min_gen)
{
    test_status_want_t want = {.n = S_WORKERS, .ids = s_ids, .n_ids = S_WORKERS,
                               .absent = absent, .min_gen = (long long)min_gen};
    cJSON *st = test_status_wait(S.ports.status_ep, test_status_settled, &want, 10000, 20);
    cJSON_Delete(st);
    return st != NULL;
}

/* A client that joins for real, then sends stale and future generations, another run id, and
 * types a worker must not send. It is removed; the live workers stay members throughout. */
static void s_phase_b(void)
{
    s_client_t c = {0};
    uint64_t run = 0;
    proto_msg_t m;
    uint32_t code = 0;
    s_client_open(&c, NULL, 0);
    uint64_t g1 = s_intruder_join(&c, "intruder1", &run);
    if (!g1) {
        CHECK(false, "intruder1: no WELCOME and PLAN after a valid JOIN");
        s_client_close(&c);
        return;
    }
    /* An ACK of the generation before: stale, ignored (no ERROR); then the real one. */
    s_valid(PROTO_ACK, run, g1 - 1, &m);
    uint32_t got = s_ask(&c, &m, &code);
    CHECK(got != PROTO_ERROR, "a stale ACK (generation %" PRIu64 " < %" PRIu64 ") got ERROR %u",
          g1 - 1, g1, code);
    s_valid(PROTO_ACK, run, g1, &m);
    s_ask(&c, &m, &code);
    /* A stale heartbeat: life, nothing else. */
    s_valid(PROTO_HEARTBEAT, run, 0, &m);
    s_ask(&c, &m, &code);
    /* A type only the coordinator sends: ERROR UNEXPECTED, and out. */
    code = 0;
    s_valid(PROTO_PLAN, run, g1, &m);
    bool error = false;
    got = s_ask(&c, &m, &code);
    for (int64_t end = proc_now_ms() + S_REPLY_MS; got && !error && proc_now_ms() < end;)
        if (!(error = got == PROTO_ERROR))
            got = s_client_recv(&c, 100, &code); /* heartbeats may come first */
    CHECK(error && code == PROTO_ERR_UNEXPECTED, "intruder1 sent a PLAN: reply %s code %u, "
          "want ERROR UNEXPECTED (%d)", got ? proto_type_name(got) : "(none)", code,
          PROTO_ERR_UNEXPECTED);
    CHECK(s_settled_without("intruder1", g1), "after intruder1 was removed the job did not settle "
          "with w1..w3");
    s_client_close(&c);

    /* The second ACKs a future generation: ERROR, and out. */
    s_client_open(&c, NULL, 0);
    uint64_t g2 = s_intruder_join(&c, "intruder2", &run);
    CHECK(g2 > g1, "intruder2: no PLAN after a valid JOIN");
    s_valid(PROTO_ACK, run, g2 + 1000, &m);
    error = false;
    got = s_ask(&c, &m, &code);
    for (int64_t end = proc_now_ms() + S_REPLY_MS; got && !error && proc_now_ms() < end;)
        if (!(error = got == PROTO_ERROR))
            got = s_client_recv(&c, 100, &code);
    CHECK(error, "intruder2 ACKed a future generation: no ERROR");
    CHECK(s_settled_without("intruder2", g2), "after intruder2 was removed the job did not settle "
          "with w1..w3");
    s_client_close(&c);

    /* The third sends another run's heartbeat, then falls silent: out either way (ERROR now,
     * or dead after the liveness window). */
    s_client_open(&c, NULL, 0);
    uint64_t g3 = s_intruder_join(&c, "intruder3", &run);
    CHECK(g3 > g2, "intruder3: no PLAN after a valid JOIN");
    s_valid(PROTO_HEARTBEAT, run ^ 0xffff, g3, &m);
    s_ask(&c, &m, &code);
    CHECK(s_settled_without("intruder3", g3), "after intruder3 was removed the job did not settle "
          "with w1..w3");
    s_client_close(&c);
}

/* --- /metrics --------------------------------------------------------------------------- */

/* GET /metrics; returns the body's value of semoe_protocol_errors_total, or -1. */
static long long s_metrics_protocol_errors(bool *ok_200)
{
    *ok_200 = false;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)S.ports.metrics),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    const char *req = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, req, strlen(req)) != (ssize_t)strlen(req)) {
        close(fd);
        return -1;
    }
    static char buf[1 << 16];
    size_t len = 0;
    int64_t end = proc_now_ms() + 3000;
    while (len < sizeof buf - 1 && proc_now_ms() < end) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, 100) <= 0)
            continue;
        ssize_t n = read(fd, buf + len, sizeof buf - 1 - len);
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    *ok_200 = !strncmp(buf, "HTTP/1.", 7) && strstr(buf, " 200") == buf + 8;
    const char *p = strstr(buf, "\nsemoe_protocol_errors_total");
    long long v = -1;
    if (p && sscanf(p, "\nsemoe_protocol_errors_total %lld", &v) != 1)
        sscanf(p, "\nsemoe_protocol_errors_total{%*[^}]} %lld", &v);
    return v;
}

/* --- main ------------------------------------------------------------------------------- */

static bool s_job(char *path, size_t n)
{
    char src[4096];
    size_t len;
    proc_src_path(src, sizeof src, "tests/jobs/small.json");
    char *text = proc_read_file(src, &len);
    cJSON *job = text ? cJSON_ParseWithLength(text, len) : NULL;
    free(text);
    if (!job) {
        CHECK(false, "%s: missing or not JSON", src);
        return false;
    }
    cJSON *cl = cJSON_GetObjectItemCaseSensitive(job, "cluster");
    if (!cl)
        cl = cJSON_AddObjectToObject(job, "cluster");
    cJSON_DeleteItemFromObjectCaseSensitive(cl, "heartbeat_ms");
    cJSON_DeleteItemFromObjectCaseSensitive(cl, "liveness");
    cJSON_AddNumberToObject(cl, "heartbeat_ms", S_HEARTBEAT_MS);
    cJSON_AddNumberToObject(cl, "liveness", S_LIVENESS);
    char *out = cJSON_Print(job);
    cJSON_Delete(job);
    proc_tmp_path(path, n, "job.json");
    bool ok = out && proc_write_file(path, out);
    free(out);
    return ok;
}

int main(void)
{
    test_init("hostile");
    proc_init("hostile");
    int64_t t_start = proc_now_ms();
#ifdef S_ASAN
    char asan[1024];
    const char *prev = getenv("ASAN_OPTIONS");
    snprintf(asan, sizeof asan, "%s%squarantine_size_mb=16", prev ? prev : "",
             prev && *prev ? ":" : "");
    setenv("ASAN_OPTIONS", asan, 1);
#endif
    char job[4096];
    REQUIRE(s_job(job, sizeof job), "job spec");
    REQUIRE(proc_ports_pick(&S.ports), "no free ports");
    static const char *const extra[] = {"--log-level", "warn", NULL};
    S.coord = proc_start_coordinator("coordinator", job, &S.ports, extra);
    REQUIRE(S.coord, "coordinator did not start");
    proc_t *workers[S_WORKERS];
    for (int i = 0; i < S_WORKERS; i++) {
        workers[i] = proc_start_worker(s_ids[i], &S.ports, 0);
        REQUIRE(workers[i], "worker %s did not start", s_ids[i]);
    }
    test_status_want_t want = {.n = S_WORKERS, .ids = s_ids, .n_ids = S_WORKERS, .min_gen = 0};
    cJSON *st0 = test_status_wait(S.ports.status_ep, test_status_settled, &want, 20000, 20);
    REQUIRE(st0, "the job never settled with w1..w3");
    S.gen = (uint64_t)test_status_generation(st0);
    const char *run = test_status_run_id(st0);
    S.run_id = run ? strtoull(run, NULL, 16) : 0;
    S.layers = (uint32_t)test_status_num_layers(st0);
    S.experts = (uint32_t)test_status_num_experts(st0);
    REQUIRE(S.layers * S.experts > 0 && S.layers * S.experts <= S_MAX_EXPERTS,
            "model %u x %u experts", S.layers, S.experts);
    for (uint32_t i = 0; i <= S_MAX_EXPERTS; i++)
        s_offsets[i] = i;
    for (size_t i = 0; i < sizeof s_comm_id; i++)
        s_comm_id[i] = (uint8_t)test_rand();
    long long joins0 = test_status_counter(st0, "joins");
    long long leaves0 = test_status_counter(st0, "leaves");
    long long deaths0 = test_status_counter(st0, "deaths");
    long long perr0 = test_status_counter(st0, "protocol_errors");
    long long ranks0[S_WORKERS];
    for (int i = 0; i < S_WORKERS; i++)
        ranks0[i] = test_status_worker_rank(test_status_worker(st0, s_ids[i]));
    char sum[1024];
    printf("settled: %s\n", test_status_summary(st0, sum, sizeof sum));
    cJSON_Delete(st0);

    S.ctx = zmq_ctx_new();
    for (int i = 0; i < S_CLIENTS; i++) {
        /* Two of them with routing ids of their own choosing. */
        char rid[16];
        snprintf(rid, sizeof rid, "hostile-%d", i);
        s_client_open(&S.clients[i], i < 2 ? rid : NULL, i < 2 ? strlen(rid) : 0);
    }
    for (int i = 0; i < S_CLIENTS; i++)
        REQUIRE(s_client_sync(&S.clients[i]), "client %d: no NOT_MEMBER reply to a valid "
                "HEARTBEAT before any attack", i);

    /* Phase A: non-members only. Nothing may change for the job. */
    s_wrong_order();
    s_steal_ids();
    s_truncation_sweep();
    s_check_phase_a("truncation sweep");
    s_fuzz();
    printf("after the fuzz: coordinator VmHWM %" PRIu64 " kB\n", s_vmhwm_kb());
    s_oversized();
    s_multipart_join();

    cJSON *st = s_status();
    REQUIRE(st, "no status after phase A: %s", test_status_error());
    REQUIRE(proc_running(S.coord), "the coordinator died");
    char why[512];
    CHECK(s_untouched(st, why, sizeof why), "after phase A: %s (%s)", why,
          test_status_summary(st, sum, sizeof sum));
    CHECK(test_status_counter(st, "joins") == joins0, "joins %lld -> %lld after non-member input",
          joins0, test_status_counter(st, "joins"));
    CHECK(test_status_counter(st, "leaves") == leaves0, "leaves %lld -> %lld", leaves0,
          test_status_counter(st, "leaves"));
    CHECK(test_status_counter(st, "deaths") == deaths0, "deaths %lld -> %lld", deaths0,
          test_status_counter(st, "deaths"));
    long long perr1 = test_status_counter(st, "protocol_errors");
    CHECK(perr1 > perr0, "protocol_errors did not grow (%lld -> %lld)", perr0, perr1);
    for (int i = 0; i < S_WORKERS; i++)
        CHECK(test_status_worker_rank(test_status_worker(st, s_ids[i])) == ranks0[i],
              "%s changed rank", s_ids[i]);
    cJSON_Delete(st);
    printf("phase A: %ld sends, protocol_errors %lld -> %lld, replies %ld (ERROR: not_member "
           "%ld, malformed %ld, refused %ld, unexpected %ld), other %ld, undecodable %ld\n",
           S.sends, perr0, perr1, S.tally.total, S.tally.by_code[PROTO_ERR_NOT_MEMBER],
           S.tally.by_code[PROTO_ERR_MALFORMED], S.tally.by_code[PROTO_ERR_REFUSED],
           S.tally.by_code[PROTO_ERR_UNEXPECTED], S.tally.not_error, S.tally.undecodable);
    CHECK(S.tally.not_error == 0, "non-members got %ld replies other than ERROR",
          S.tally.not_error);
    CHECK(S.tally.undecodable == 0, "%ld replies did not decode", S.tally.undecodable);

    /* Phase B: a hostile member. */
    s_phase_b();

    /* Everything still standing. */
    st = s_status();
    REQUIRE(st, "no status at the end: %s", test_status_error());
    CHECK(proc_running(S.coord), "the coordinator died");
    for (int i = 0; i < S_WORKERS; i++)
        CHECK(proc_running(workers[i]), "worker %s exited", s_ids[i]);
    CHECK(test_status_counter(st, "joins") == joins0 + 3,
          "joins %lld -> %lld: only the three intruders should have joined (a live worker "
          "rejoined?)", joins0, test_status_counter(st, "joins"));
    CHECK(test_status_counter(st, "deaths") + test_status_counter(st, "leaves") <=
              deaths0 + leaves0 + 3,
          "deaths %lld -> %lld, leaves %lld -> %lld: more than the three intruders", deaths0,
          test_status_counter(st, "deaths"), leaves0, test_status_counter(st, "leaves"));
    for (int i = 0; i < S_WORKERS; i++) {
        const cJSON *w = test_status_worker(st, s_ids[i]);
        CHECK(w && test_status_worker_rank(w) == ranks0[i], "%s: %s", s_ids[i],
              w ? "changed rank" : "not a member");
    }
    printf("end: %s\n", test_status_summary(st, sum, sizeof sum));
    cJSON_Delete(st);
    uint64_t hwm = s_vmhwm_kb();
    printf("coordinator peak RSS (VmHWM): %" PRIu64 " kB\n", hwm);
    CHECK(hwm > 0 && hwm < S_RSS_LIMIT_KB, "coordinator VmHWM %" PRIu64 " kB (limit %d kB)", hwm,
          S_RSS_LIMIT_KB);
    bool ok_200;
    long long mperr = s_metrics_protocol_errors(&ok_200);
    CHECK(ok_200, "/metrics on %s did not answer 200", S.ports.metrics_addr);
    CHECK(mperr >= perr1, "/metrics semoe_protocol_errors_total %lld, status said %lld", mperr,
          perr1);

    for (int i = 0; i < S_CLIENTS; i++)
        s_client_close(&S.clients[i]);
    zmq_ctx_term(S.ctx);
    printf("hostile: %.1f s\n", (double)(proc_now_ms() - t_start) / 1000.0);
    return test_finish();
}
