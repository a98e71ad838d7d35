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

#include "actors/procfs.h"
#include "proto/msg.h"
#include "tests/harness.h"
#include "tests/hostile_client.h"
#include "tests/proc.h"
#include "tests/status_client.h"

#define S_WORKERS 3
#define S_HEARTBEAT_MS 200
/* Missed heartbeats before death: 1 s, so a loaded 2-core machine (the sanitizer build runs
 * beside) does not kill a worker while a coordinator stall of a second still shows. */
#define S_LIVENESS 5
#define S_CLIENTS 6
#define S_FUZZ_SENDS 12000
#define S_SYNC_EVERY 500
#define S_RSS_LIMIT_KB (256 * 1024)

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

static struct {
    hostile_t h;       /* the job under attack, and the clients' counts */
    proc_ports_t ports;
    proc_t *coord;
    hostile_client_t clients[S_CLIENTS];
    bool phase_a_broken; /* a status snapshot during phase A already failed; say it once */
} S;

/* --- status ----------------------------------------------------------------------------- */

static cJSON *s_status(void) { return test_status_query(S.ports.status_ep, 3000); }

static uint64_t s_vmhwm_kb(void) { return procfs_peak_rss_kb(proc_pid(S.coord)); }

/* The live workers as they were: all three listed and active, the generation unchanged. */
static bool s_untouched(const cJSON *st, char *why, size_t n)
{
    if (!st)
        return snprintf(why, n, "no status answer: %s", test_status_error()), false;
    if ((uint64_t)test_status_generation(st) != S.h.gen)
        return snprintf(why, n, "generation %lld, was %" PRIu64, test_status_generation(st),
                        S.h.gen), false;
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

/* --- attacks ---------------------------------------------------------------------------- */

/* Every prefix of a valid encoding of every type a client may send (JOIN too: no prefix of
 * it is a message). */
static void s_truncation_sweep(void)
{
    static const uint32_t types[] = {PROTO_JOIN,  PROTO_WELCOME, PROTO_HEARTBEAT, PROTO_PLAN,
                                     PROTO_COMM,  PROTO_ACK,     PROTO_PAUSE,     PROTO_RESUME,
                                     PROTO_LEAVE, PROTO_ERROR,   PROTO_STOP};
    long before = S.h.sends;
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++) {
        proto_msg_t m;
        msgpack_sbuffer sb;
        hostile_valid(types[t], S.h.run_id, S.h.gen, &m);
        if (types[t] == PROTO_STOP)
            m.stop.checkpoint = 0;
        if (!hostile_encode(&m, &sb))
            continue;
        hostile_client_t *c = &S.clients[t % S_CLIENTS];
        for (size_t len = 0; len < sb.size; len++) {
            hostile_client_send(c, sb.data, len, 0);
            if (len % 64 == 63)
                hostile_client_drain(c);
        }
        msgpack_sbuffer_destroy(&sb);
    }
    for (int i = 0; i < S_CLIENTS; i++)
        CHECK(hostile_client_sync(&S.clients[i]), "client %d: no NOT_MEMBER reply after the truncation "
              "sweep (coordinator stuck?)", i);
    printf("truncation sweep: %ld prefixes sent\n", S.h.sends - before);
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
    long before = S.h.sends;
    for (int i = 0; i < S_FUZZ_SENDS; i++) {
        hostile_client_t *c = &S.clients[test_rand_below(S_CLIENTS)];
        if (test_rand_below(50) == 0) { /* reconnect with a fresh identity */
            hostile_client_close(c);
            hostile_client_open(c, NULL, 0);
        }
        msgpack_sbuffer sb = {0};
        bool single = true;
        switch (test_rand_below(7)) {
        case 0: hostile_build_random(&sb); break;
        case 1: hostile_build_bomb(&sb); break;
        case 2: hostile_build_bad_header(&sb); break;
        case 3: hostile_build_mutant(&sb); break;
        case 4: hostile_build_generation(&sb); break;
        case 5: {
            proto_msg_t m;
            hostile_valid(hostile_rand_nonjoin_type(), S.h.run_id, S.h.gen, &m);
            if (hostile_encode(&m, &sb))
                sb.size = (size_t)test_rand_below(sb.size);
            break;
        }
        default:
            hostile_send_multipart(c);
            single = false;
            break;
        }
        if (single)
            hostile_client_send(c, sb.data ? sb.data : "", sb.size, 0);
        msgpack_sbuffer_destroy(&sb);
        hostile_client_drain(c);
        if (i % S_SYNC_EVERY == S_SYNC_EVERY - 1) {
            CHECK(hostile_client_sync(c), "fuzz %d: no NOT_MEMBER reply to a valid HEARTBEAT", i);
            s_check_phase_a("fuzz");
        }
    }
    for (int i = 0; i < S_CLIENTS; i++)
        hostile_client_drain(&S.clients[i]);
    printf("fuzz: %ld messages sent (%ld dropped on a full queue)\n", S.h.sends - before, S.h.dropped);
}

/* Above PROTO_MAX_MSG: libzmq on the coordinator (ZMQ_MAXMSGSIZE) drops the connection. The
 * client's monitor sees that as a disconnect. */
static void s_oversized(void)
{
    static const size_t sizes[] = {(size_t)PROTO_MAX_MSG + 1, (size_t)48 << 20};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        hostile_client_t c = {0};
        char mon_ep[64];
        hostile_client_open(&c, NULL, 0);
        snprintf(mon_ep, sizeof mon_ep, "inproc://hostile-monitor-%zu", k);
        if (zmq_socket_monitor(c.sock, mon_ep, ZMQ_EVENT_CONNECTED | ZMQ_EVENT_DISCONNECTED) != 0) {
            CHECK(false, "zmq_socket_monitor: %s", zmq_strerror(zmq_errno()));
            hostile_client_close(&c);
            return;
        }
        void *mon = zmq_socket(S.h.ctx, ZMQ_PAIR);
        zmq_connect(mon, mon_ep);
        /* First a valid message, so we know the connection is up and served. */
        CHECK(hostile_client_sync(&c), "oversized: no reply before the big message");
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
        hostile_client_close(&c);
    }
    printf("after oversized frames: coordinator VmHWM %" PRIu64 " kB\n", s_vmhwm_kb());
    /* Frames each under the limit, together far above it. libzmq delivers a multipart message
     * whole, so the coordinator holds all of it at once: 6 x 15 MB stays under the RSS limit;
     * SEMOE_HOSTILE_BIG_FRAMES=24 shows what more does. */
    const char *env = getenv("SEMOE_HOSTILE_BIG_FRAMES");
    int frames = env && atoi(env) > 0 ? atoi(env) : 6;
    hostile_client_t c = {0};
    hostile_client_open(&c, NULL, 0);
    size_t frame = (size_t)15 << 20;
    char *buf = malloc(frame);
    if (!buf) {
        hostile_client_close(&c);
        return;
    }
    memset(buf, 0x91, frame);
    for (int f = 0; f < frames; f++)
        hostile_client_send(&c, buf, frame, f + 1 < frames ? ZMQ_SNDMORE : 0);
    free(buf);
    CHECK(hostile_client_sync(&c), "multipart of %d x 15 MB: no reply to a valid HEARTBEAT after it",
          frames);
    printf("after the multipart of %d x 15 MB: coordinator VmHWM %" PRIu64 " kB\n", frames,
           s_vmhwm_kb());
    hostile_client_close(&c);
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
        hostile_client_t c = {0};
        hostile_client_open(&c, NULL, 0);
        proto_msg_t m;
        uint32_t code = 0;
        hostile_valid(types[t], S.h.run_id, S.h.gen, &m);
        if (types[t] == PROTO_LEAVE) {
            hostile_leave_then_sync(&c, "LEAVE before JOIN");
        } else {
            uint32_t got = hostile_ask(&c, &m, &code);
            CHECK(got == PROTO_ERROR && code == PROTO_ERR_NOT_MEMBER,
                  "%s before JOIN: reply %s code %u, want ERROR NOT_MEMBER (%d)",
                  proto_type_name(types[t]), got ? proto_type_name(got) : "(none)", code,
                  PROTO_ERR_NOT_MEMBER);
        }
        hostile_client_close(&c);
    }
}

/* A JOIN with a live worker's id, from another connection: ERROR REFUSED; also from a client
 * that sets its ZeroMQ routing id to the worker's name. */
static void s_steal_ids(void)
{
    for (int i = 0; i < S_WORKERS; i++) {
        for (int variant = 0; variant < 2; variant++) {
            hostile_client_t c = {0};
            hostile_client_open(&c, variant ? s_ids[i] : NULL, variant ? strlen(s_ids[i]) : 0);
            proto_msg_t m;
            uint32_t code = 0;
            hostile_valid(PROTO_JOIN, 0, 0, &m);
            snprintf(m.join.id, sizeof m.join.id, "%s", s_ids[i]);
            uint32_t got = hostile_ask(&c, &m, &code);
            CHECK(got == PROTO_ERROR && code == PROTO_ERR_REFUSED,
                  "JOIN as live %s%s: reply %s code %u, want ERROR REFUSED (%d)", s_ids[i],
                  variant ? " (routing id set to it)" : "", got ? proto_type_name(got) : "(none)",
                  code, PROTO_ERR_REFUSED);
            /* Then a LEAVE on that connection: it is not the member, nothing may happen. */
            hostile_leave_then_sync(&c, "LEAVE after a refused JOIN");
            hostile_client_close(&c);
        }
    }
    s_check_phase_a("JOIN with live ids");
}

/* A multipart message whose first frame is a valid JOIN: a control message is one frame, so
 * nobody may join this way. */
static void s_multipart_join(void)
{
    hostile_client_t c = {0};
    hostile_client_open(&c, NULL, 0);
    proto_msg_t m;
    msgpack_sbuffer sb;
    hostile_valid(PROTO_JOIN, 0, 0, &m);
    snprintf(m.join.id, sizeof m.join.id, "mpjoin");
    if (hostile_encode(&m, &sb)) {
        hostile_client_send(&c, sb.data, sb.size, ZMQ_SNDMORE);
        hostile_client_send(&c, "x", 1, ZMQ_SNDMORE);
        hostile_client_send(&c, "", 0, 0);
        msgpack_sbuffer_destroy(&sb);
    }
    CHECK(hostile_client_sync(&c), "multipart JOIN: no NOT_MEMBER reply to the HEARTBEAT after it "
          "(did the coordinator take the first frame as a JOIN?)");
    cJSON *st = s_status();
    CHECK(st && !test_status_worker(st, "mpjoin"),
          "a 3-frame message starting with a JOIN made 'mpjoin' a member");
    cJSON_Delete(st);
    hostile_client_close(&c);
}

/* --- phase B: a hostile member ---------------------------------------------------------- */

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
    hostile_client_t c = {0};
    uint64_t run = 0;
    proto_msg_t m;
    uint32_t code = 0;
    hostile_client_open(&c, NULL, 0);
    uint64_t g1 = hostile_join(&c, "intruder1", &run);
    if (!g1) {
        CHECK(false, "intruder1: no WELCOME and PLAN after a valid JOIN");
        hostile_client_close(&c);
        return;
    }
    /* An ACK of the generation before: stale, ignored (no ERROR); then the real one. */
    hostile_valid(PROTO_ACK, run, g1 - 1, &m);
    uint32_t got = hostile_ask(&c, &m, &code);
    CHECK(got != PROTO_ERROR, "a stale ACK (generation %" PRIu64 " < %" PRIu64 ") got ERROR %u",
          g1 - 1, g1, code);
    hostile_valid(PROTO_ACK, run, g1, &m);
    hostile_ask(&c, &m, &code);
    /* A stale heartbeat: life, nothing else. */
    hostile_valid(PROTO_HEARTBEAT, run, 0, &m);
    hostile_ask(&c, &m, &code);
    /* A type only the coordinator sends: ERROR UNEXPECTED, and out. */
    code = 0;
    hostile_valid(PROTO_PLAN, run, g1, &m);
    bool error = hostile_ask_error(&c, &m, &code, &got);
    CHECK(error && code == PROTO_ERR_UNEXPECTED, "intruder1 sent a PLAN: reply %s code %u, "
          "want ERROR UNEXPECTED (%d)", got ? proto_type_name(got) : "(none)", code,
          PROTO_ERR_UNEXPECTED);
    CHECK(s_settled_without("intruder1", g1), "after intruder1 was removed the job did not settle "
          "with w1..w3");
    hostile_client_close(&c);

    /* The second ACKs a future generation: ERROR, and out. */
    hostile_client_open(&c, NULL, 0);
    uint64_t g2 = hostile_join(&c, "intruder2", &run);
    CHECK(g2 > g1, "intruder2: no PLAN after a valid JOIN");
    hostile_valid(PROTO_ACK, run, g2 + 1000, &m);
    error = hostile_ask_error(&c, &m, &code, &got);
    CHECK(error, "intruder2 ACKed a future generation: no ERROR");
    CHECK(s_settled_without("intruder2", g2), "after intruder2 was removed the job did not settle "
          "with w1..w3");
    hostile_client_close(&c);

    /* The third sends another run's heartbeat, then falls silent: out either way (ERROR now,
     * or dead after the liveness window). */
    hostile_client_open(&c, NULL, 0);
    uint64_t g3 = hostile_join(&c, "intruder3", &run);
    CHECK(g3 > g2, "intruder3: no PLAN after a valid JOIN");
    hostile_valid(PROTO_HEARTBEAT, run ^ 0xffff, g3, &m);
    hostile_ask(&c, &m, &code);
    CHECK(s_settled_without("intruder3", g3), "after intruder3 was removed the job did not settle "
          "with w1..w3");
    hostile_client_close(&c);
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
    proc_src_path(src, sizeof src, "tests/jobs/control.json");
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
    S.h.gen = (uint64_t)test_status_generation(st0);
    const char *run = test_status_run_id(st0);
    S.h.run_id = run ? strtoull(run, NULL, 16) : 0;
    S.h.layers = (uint32_t)test_status_num_layers(st0);
    S.h.experts = (uint32_t)test_status_num_experts(st0);
    REQUIRE(S.h.layers * S.h.experts > 0 && S.h.layers * S.h.experts <= HOSTILE_MAX_EXPERTS,
            "model %u x %u experts", S.h.layers, S.h.experts);
    S.h.control_ep = S.ports.control_ep;
    S.h.heartbeat_ms = S_HEARTBEAT_MS;
    hostile_init(&S.h);
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

    S.h.ctx = zmq_ctx_new();
    for (int i = 0; i < S_CLIENTS; i++) {
        /* Two of them with routing ids of their own choosing. */
        char rid[16];
        snprintf(rid, sizeof rid, "hostile-%d", i);
        hostile_client_open(&S.clients[i], i < 2 ? rid : NULL, i < 2 ? strlen(rid) : 0);
    }
    for (int i = 0; i < S_CLIENTS; i++)
        REQUIRE(hostile_client_sync(&S.clients[i]), "client %d: no NOT_MEMBER reply to a valid "
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
           S.h.sends, perr0, perr1, S.h.tally.total, S.h.tally.by_code[PROTO_ERR_NOT_MEMBER],
           S.h.tally.by_code[PROTO_ERR_MALFORMED], S.h.tally.by_code[PROTO_ERR_REFUSED],
           S.h.tally.by_code[PROTO_ERR_UNEXPECTED], S.h.tally.not_error, S.h.tally.undecodable);
    CHECK(S.h.tally.not_error == 0, "non-members got %ld replies other than ERROR",
          S.h.tally.not_error);
    CHECK(S.h.tally.undecodable == 0, "%ld replies did not decode", S.h.tally.undecodable);

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
        hostile_client_close(&S.clients[i]);
    zmq_ctx_term(S.h.ctx);
    printf("hostile: %.1f s\n", (double)(proc_now_ms() - t_start) / 1000.0);
    return test_finish();
}
