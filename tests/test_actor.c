/* Tests for actors/actor.c and actors/zloop.c: deterministic start and stop of many actors,
 * start failures, and ZeroMQ sockets on a libuv loop under random bursts, including the ZMQ_FD
 * edge that a timer's own sends consume, the drain budget, and watches destroyed mid-drain. */
#include <poll.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>
#include <zmq.h>

#include "actors/actor.h"
#include "actors/log.h"
#include "actors/zloop.h"
#include "tests/harness.h"

static void *s_ctx;

/* REQUIRE for the void test functions: the later tests still run. */
#define REQUIRE_VOID(cond, ...)                                                 \
    do {                                                                        \
        CHECK(cond, __VA_ARGS__);                                               \
        if (!(cond))                                                            \
            return;                                                             \
    } while (0)

/* test_rand is for the main thread; actor threads draw from their own xorshift64*. */
static uint64_t s_next(uint64_t *state)
{
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return *state * 0x2545F4914F6CDD1Dull;
}

static int s_events(void *sock)
{
    int events = 0;
    size_t len = sizeof events;
    zmq_getsockopt(sock, ZMQ_EVENTS, &events, &len);
    return events;
}

static void s_pair(void **a, void **b, const char *endpoint)
{
    int linger = 0;
    *a = zmq_socket(s_ctx, ZMQ_PAIR);
    *b = zmq_socket(s_ctx, ZMQ_PAIR);
    zmq_setsockopt(*a, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(*b, ZMQ_LINGER, &linger, sizeof linger);
    zmq_bind(*a, endpoint);
    zmq_connect(*b, endpoint);
}

/* Closes what a test's loop still holds and checks every handle really closed. */
static void s_loop_close(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_NOWAIT);
    int rc = uv_loop_close(loop);
    CHECK(rc == 0, "uv_loop_close: %s (a handle was left open)", uv_strerror(rc));
}

static void s_close_handle(uv_handle_t *handle) { uv_close(handle, NULL); }

/* --- 1. many actors: deterministic start, echo, deterministic stop ------------------------ */

#define ECHO_ACTORS 50
#define ECHO_MSGS   3 /* queued per actor per round before any echo is read */
#define ECHO_FRAMES 4
#define ECHO_BYTES  300

static atomic_int s_started, s_ended;

/* Echoes every message back whole until "$TERM". */
static void s_echo(void *pipe, void *args)
{
    (void)args;
    atomic_fetch_add(&s_started, 1);
    if (actor_signal(pipe, 0) != SEMOE_OK)
        return;
    bool first = true;
    for (;;) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, pipe, 0) == -1) {
            zmq_msg_close(&msg);
            break;
        }
        bool more = zmq_msg_more(&msg);
        if (first && !more && zmq_msg_size(&msg) == 5 && !memcmp(zmq_msg_data(&msg), "$TERM", 5)) {
            zmq_msg_close(&msg);
            break;
        }
        first = !more;
        if (zmq_msg_send(&msg, pipe, more ? ZMQ_SNDMORE : 0) == -1) {
            zmq_msg_close(&msg);
            break;
        }
    }
    atomic_fetch_add(&s_ended, 1);
}

typedef struct {
    int frames;
    size_t len[ECHO_FRAMES];
    unsigned char data[ECHO_FRAMES][ECHO_BYTES];
} echo_msg_t;

static echo_msg_t s_echo_sent[ECHO_ACTORS][ECHO_MSGS];

static void s_echo_round(actor_t **actors)
{
    for (int a = 0; a < ECHO_ACTORS; a++)
        for (int m = 0; m < ECHO_MSGS; m++) {
            echo_msg_t *msg = &s_echo_sent[a][m];
            msg->frames = 1 + (int)test_rand_below(ECHO_FRAMES);
            for (int f = 0; f < msg->frames; f++) {
                msg->len[f] = test_rand_below(ECHO_BYTES + 1);
                for (size_t i = 0; i < msg->len[f]; i++)
                    msg->data[f][i] = (unsigned char)test_rand();
                int more = f + 1 < msg->frames ? ZMQ_SNDMORE : 0;
                int n = zmq_send(actor_pipe(actors[a]), msg->data[f], msg->len[f], more);
                CHECK(n == (int)msg->len[f], "send to actor %d: %s", a, zmq_strerror(zmq_errno()));
            }
        }
    unsigned char buf[ECHO_BYTES + 1];
    int bad = 0;
    for (int a = 0; a < ECHO_ACTORS; a++)
        for (int m = 0; m < ECHO_MSGS; m++) {
            echo_msg_t *msg = &s_echo_sent[a][m];
            for (int f = 0; f < msg->frames; f++) {
                void *pipe = actor_pipe(actors[a]);
                int n = zmq_recv(pipe, buf, sizeof buf, 0);
                int more = f + 1 < msg->frames;
                int rcvmore = 0;
                size_t len = sizeof rcvmore;
                zmq_getsockopt(pipe, ZMQ_RCVMORE, &rcvmore, &len);
                if (n != (int)msg->len[f] || memcmp(buf, msg->data[f], msg->len[f]) != 0 ||
                    rcvmore != more)
                    bad++;
            }
        }
    CHECK(bad == 0, "%d echoed frames differ from what was sent", bad);
}

static void test_many_actors(void)
{
    actor_t *actors[ECHO_ACTORS];
    int made = 0;
    for (int i = 0; i < ECHO_ACTORS; i++) {
        actors[i] = actor_new(s_ctx, s_echo, NULL);
        CHECK(actors[i] != NULL, "actor_new %d: %s", i, semoe_err_msg());
        if (!actors[i])
            break;
        made++;
        /* The body counts itself before it signals, so this holds only if actor_new waited. */
        CHECK(atomic_load(&s_started) == i + 1, "actor_new %d returned before the body ran", i);
    }
    if (made == ECHO_ACTORS) {
        for (int round = 0; round < 10; round++)
            s_echo_round(actors);
        for (int a = 0; a < ECHO_ACTORS; a++) {
            char want[64];
            snprintf(want, sizeof want, "hello %d %llu", a, (unsigned long long)test_rand());
            CHECK(actor_send_str(actor_pipe(actors[a]), want, 0) == SEMOE_OK, "%s",
                  semoe_err_msg());
            char *got = actor_recv_str(actor_pipe(actors[a]));
            CHECK(got && strcmp(got, want) == 0, "actor %d echoed '%s' for '%s'", a,
                  got ? got : "(null)", want);
            free(got);
        }
    }
    /* Stop in random order; each destroy returns only once that body has returned. */
    for (int i = made - 1; i > 0; i--) {
        int j = (int)test_rand_below((uint64_t)i + 1);
        actor_t *t = actors[i];
        actors[i] = actors[j];
        actors[j] = t;
    }
    for (int i = 0; i < made; i++) {
        actor_destroy(&actors[i]);
        CHECK(actors[i] == NULL, "actor_destroy must null the caller's pointer");
        CHECK(atomic_load(&s_ended) == i + 1, "actor_destroy %d returned before the body ended",
              i);
    }
    actor_destroy(&actors[0]); /* already NULL: nothing to do */
}

/* --- 2. actors that fail to start, end early, or are slow to read ----------------------- */

static void s_fails_setup(void *pipe, void *args)
{
    (void)args;
    semoe_err(SEMOE_EIO, "bind tcp://127.0.0.1:1: Permission denied");
    actor_signal(pipe, 7);
}

static void s_never_signals(void *pipe, void *args)
{
    (void)pipe;
    (void)args;
}

/* Talks before it fails: actor_new must skip its messages, an 8-byte string frame among them. */
static void s_noisy_fail(void *pipe, void *args)
{
    (void)args;
    actor_send_str(pipe, "hello", 0);
    actor_send_str(pipe, "12345678", 1);
    actor_send_str(pipe, "12345678", 0);
    actor_send_str(pipe, "12345678", 0);
    actor_signal(pipe, 3);
}

static atomic_int s_early_ended;

/* Ready, then returns at once without waiting for "$TERM". */
static void s_ends_early(void *pipe, void *args)
{
    (void)args;
    actor_signal(pipe, 0);
    atomic_fetch_add(&s_early_ended, 1);
}

#define FLOOD 5000 /* more than the pipe holds (two HWMs of 1000) */

typedef struct {
    int received; /* commands before "$TERM"; read after actor_destroy joined */
    bool saw_term;
} flooder_t;

/* Floods its creator, who is not reading, so it blocks before it reads a single command: its
 * mailbox fills, and "$TERM" finds no room until the creator drains what the actor sent. */
static void s_flooder(void *pipe, void *args)
{
    flooder_t *f = args;
    actor_signal(pipe, 0);
    for (int i = 0; i < FLOOD; i++)
        if (zmq_send(pipe, "out", 3, 0) != 3)
            return;
    for (;;) {
        char *s = actor_recv_str(pipe);
        if (!s)
            break;
        bool term = strcmp(s, "$TERM") == 0;
        free(s);
        if (term) {
            f->saw_term = true;
            break;
        }
        f->received++;
    }
}

static void test_start_failures(void)
{
    for (int i = 0; i < 20; i++) {
        actor_t *a = actor_new(s_ctx, s_fails_setup, NULL);
        CHECK(a == NULL, "an actor that signalled 7 must not start");
        CHECK(strstr(semoe_err_msg(), "actor failed to start: status 7"), "message: %s",
              semoe_err_msg());
        CHECK(strstr(semoe_err_msg(), "Permission denied"),
              "the actor's own reason should be passed on: %s", semoe_err_msg());

        a = actor_new(s_ctx, s_never_signals, NULL);
        CHECK(a == NULL, "an actor that returned without signalling must not start");
        CHECK(strstr(semoe_err_msg(), "actor failed to start: status -1"), "message: %s",
              semoe_err_msg());

        a = actor_new(s_ctx, s_noisy_fail, NULL);
        CHECK(a == NULL, "an actor that signalled 3 must not start");
        CHECK(strstr(semoe_err_msg(), "status 3"), "message: %s", semoe_err_msg());

        a = actor_new(s_ctx, s_ends_early, NULL);
        CHECK(a != NULL, "actor_new: %s", semoe_err_msg());
        actor_destroy(&a); /* must not hang on a body that is gone */
        CHECK(a == NULL && atomic_load(&s_early_ended) == i + 1, "early actor %d", i);
    }
    CHECK(actor_new(NULL, s_echo, NULL) == NULL, "actor_new without a context");
    CHECK(actor_new(s_ctx, NULL, NULL) == NULL, "actor_new without a body");

    /* Both directions full: the actor is blocked sending to us and has not read its mailbox.
     * actor_destroy must still deliver "$TERM", after every command already queued. */
    flooder_t flood = {.received = 0};
    actor_t *a = actor_new(s_ctx, s_flooder, &flood);
    REQUIRE_VOID(a != NULL, "actor_new: %s", semoe_err_msg());
    int queued = 0;
    while (queued < 100000 && zmq_send(actor_pipe(a), "cmd", 3, ZMQ_DONTWAIT) == 3)
        queued++;
    CHECK(queued > 0 && queued < 100000, "the mailbox should fill up (queued %d)", queued);
    actor_destroy(&a);
    CHECK(flood.saw_term && flood.received == queued, "flooder read %d of %d, then %s",
          flood.received, queued, flood.saw_term ? "$TERM" : "no $TERM");
}

static void test_signals(void)
{
    void *a, *b;
    s_pair(&a, &b, "inproc://test-signals");
    actor_send_str(b, "x", 0);
    actor_send_str(b, "12345678", 1);
    actor_send_str(b, "12345678", 0);
    CHECK(actor_signal(b, 5) == SEMOE_OK, "%s", semoe_err_msg());
    CHECK(actor_signal(b, -2) == SEMOE_OK, "%s", semoe_err_msg());
    CHECK(actor_signal(b, 128) == SEMOE_EINVAL, "status 128 does not fit the signal");
    CHECK(actor_signal(b, -129) == SEMOE_EINVAL, "status -129 does not fit the signal");
    actor_send_str(b, "tail", 0);
    int st = actor_wait(a);
    CHECK(st == 5, "actor_wait skipped to the first signal: got %d", st);
    st = actor_wait(a);
    CHECK(st == -2, "second signal: got %d", st);
    char *s = actor_recv_str(a);
    CHECK(s && strcmp(s, "tail") == 0, "actor_wait must not read past its signal: '%s'",
          s ? s : "(null)");
    free(s);
    zmq_close(a);
    zmq_close(b);
}

/* --- 3a. a ROUTER on a libuv loop: bursts from DEALERs, replies sent only from a timer ------ */

#define PEERS       8
#define BURSTS      40
#define BURST_MAX   64
#define PAYLOAD_MAX 256
#define XOR_BYTE    0xA5

typedef struct {
    const char *endpoint;
    uint64_t seed;
    /* Results, read after actor_destroy joined the thread. */
    long sent, answered, bad;
} peers_t;

typedef struct {
    void *sock;
    uint64_t rng;
    int bursts_left;
    int count, next; /* messages in this burst; the next one to be answered */
    uint64_t seq;
    size_t len[BURST_MAX];
    unsigned char data[BURST_MAX][8 + PAYLOAD_MAX];
} peer_t;

static void s_burst(peer_t *p, peers_t *a)
{
    p->bursts_left--;
    p->count = 1 + (int)(s_next(&p->rng) % BURST_MAX);
    p->next = 0;
    for (int i = 0; i < p->count; i++) {
        p->len[i] = 8 + s_next(&p->rng) % (PAYLOAD_MAX + 1);
        memcpy(p->data[i], &p->seq, 8);
        p->seq++;
        for (size_t j = 8; j < p->len[i]; j++)
            p->data[i][j] = (unsigned char)s_next(&p->rng);
        if (zmq_send(p->sock, p->data[i], p->len[i], 0) == (int)p->len[i])
            a->sent++;
        else
            a->bad++;
    }
}

/* Returns true when the burst is fully answered. */
static bool s_check_reply(peer_t *p, peers_t *a, const unsigned char *buf, int n)
{
    bool ok = p->next < p->count && n == (int)p->len[p->next] &&
              memcmp(buf, p->data[p->next], 8) == 0;
    for (int j = 8; ok && j < n; j++)
        ok = buf[j] == (p->data[p->next][j] ^ XOR_BYTE);
    if (ok)
        a->answered++;
    else
        a->bad++;
    p->next++;
    return p->next >= p->count;
}

/* PEERS DEALERs, each sending BURSTS random bursts, the next once the last is all answered.
 * Says "DONE" on the pipe when every burst is answered, then waits for "$TERM". */
static void s_peers(void *pipe, void *args)
{
    peers_t *a = args;
    peer_t *peers = semoe_xcalloc(PEERS, sizeof *peers);
    zmq_pollitem_t items[PEERS + 1] = {{pipe, 0, ZMQ_POLLIN, 0}};
    int linger = 0, ok = 1;
    for (int i = 0; i < PEERS; i++) {
        peers[i].sock = zmq_socket(s_ctx, ZMQ_DEALER);
        zmq_setsockopt(peers[i].sock, ZMQ_LINGER, &linger, sizeof linger);
        ok &= zmq_connect(peers[i].sock, a->endpoint) == 0;
        peers[i].rng = a->seed ^ (0x9E3779B97F4A7C15ull * (uint64_t)(i + 1));
        peers[i].bursts_left = BURSTS;
        items[i + 1] = (zmq_pollitem_t){peers[i].sock, 0, ZMQ_POLLIN, 0};
    }
    if (!ok) {
        semoe_err(SEMOE_EIO, "connect %s: %s", a->endpoint, zmq_strerror(zmq_errno()));
        actor_signal(pipe, 1);
        goto done;
    }
    actor_signal(pipe, 0);
    for (int i = 0; i < PEERS; i++)
        s_burst(&peers[i], a);
    int finished = 0;
    unsigned char buf[8 + PAYLOAD_MAX + 1];
    for (;;) {
        if (zmq_poll(items, PEERS + 1, -1) == -1)
            break;
        if (items[0].revents & ZMQ_POLLIN) {
            free(actor_recv_str(pipe)); /* "$TERM" is the only command */
            break;
        }
        for (int i = 0; i < PEERS; i++) {
            if (!(items[i + 1].revents & ZMQ_POLLIN))
                continue;
            int n;
            while ((n = zmq_recv(peers[i].sock, buf, sizeof buf, ZMQ_DONTWAIT)) >= 0) {
                if (!s_check_reply(&peers[i], a, buf, n))
                    continue;
                if (peers[i].bursts_left > 0)
                    s_burst(&peers[i], a);
                else if (++finished == PEERS)
                    actor_send_str(pipe, "DONE", 0);
            }
        }
    }
done:
    for (int i = 0; i < PEERS; i++)
        if (peers[i].sock)
            zmq_close(peers[i].sock);
    free(peers);
}

typedef struct {
    uv_loop_t loop;
    void *router;
    actor_t *peers;
    zloop_watch_t *rwatch, *pwatch;
    uv_timer_t replier, deadline;
    zmq_msg_t (*queue)[2]; /* replies waiting for the timer: routing id, body */
    size_t queued, cap;
    long requests, replies, malformed, send_errors;
    bool done, timed_out;
} server_t;

static void s_on_request(void *sock, void *arg)
{
    server_t *s = arg;
    zmq_msg_t id, body;
    zmq_msg_init(&id);
    zmq_msg_init(&body);
    if (zmq_msg_recv(&id, sock, 0) == -1 || !zmq_msg_more(&id) ||
        zmq_msg_recv(&body, sock, 0) == -1 || zmq_msg_more(&body) || zmq_msg_size(&body) < 8) {
        s->malformed++;
        zmq_msg_close(&id);
        zmq_msg_close(&body);
        return;
    }
    if (s->queued == s->cap) {
        s->cap = s->cap ? 2 * s->cap : 64;
        s->queue = semoe_xrealloc(s->queue, s->cap * sizeof *s->queue);
    }
    zmq_msg_t *reply = s->queue[s->queued++];
    reply[0] = id;
    size_t n = zmq_msg_size(&body);
    zmq_msg_init_size(&reply[1], n);
    const unsigned char *in = zmq_msg_data(&body);
    unsigned char *out = zmq_msg_data(&reply[1]);
    memcpy(out, in, 8);
    for (size_t j = 8; j < n; j++)
        out[j] = in[j] ^ XOR_BYTE;
    zmq_msg_close(&body);
    s->requests++;
}

/* Sends every queued reply: the only sends on the ROUTER, interleaved with arrivals. */
static void s_on_replier(uv_timer_t *timer)
{
    server_t *s = timer->data;
    for (size_t i = 0; i < s->queued; i++) {
        if (zmq_msg_send(&s->queue[i][0], s->router, ZMQ_SNDMORE) == -1 ||
            zmq_msg_send(&s->queue[i][1], s->router, 0) == -1) {
            s->send_errors++;
            zmq_msg_close(&s->queue[i][0]);
            zmq_msg_close(&s->queue[i][1]);
            continue;
        }
        s->replies++;
    }
    s->queued = 0;
}

static void s_on_peers_pipe(void *sock, void *arg)
{
    server_t *s = arg;
    char *msg = actor_recv_str(sock);
    if (msg && strcmp(msg, "DONE") == 0) {
        s->done = true;
        uv_stop(&s->loop);
    }
    free(msg);
}

static void s_on_deadline(uv_timer_t *timer)
{
    bool *timed_out = timer->data;
    *timed_out = true;
    uv_stop(timer->loop);
}

static void test_router_bursts(void)
{
    server_t *s = semoe_xcalloc(1, sizeof *s);
    uv_loop_init(&s->loop);
    int linger = 0, mandatory = 1;
    s->router = zmq_socket(s_ctx, ZMQ_ROUTER);
    zmq_setsockopt(s->router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->router, ZMQ_ROUTER_MANDATORY, &mandatory, sizeof mandatory);
    REQUIRE_VOID(zmq_bind(s->router, "tcp://127.0.0.1:*") == 0, "bind: %s",
                 zmq_strerror(zmq_errno()));
    char endpoint[256];
    size_t len = sizeof endpoint;
    zmq_getsockopt(s->router, ZMQ_LAST_ENDPOINT, endpoint, &len);

    s->rwatch = zloop_watch_new(&s->loop, s->router, s_on_request, s);
    REQUIRE_VOID(s->rwatch, "zloop_watch_new: %s", semoe_err_msg());
    peers_t peers = {.endpoint = endpoint, .seed = test_rand()};
    s->peers = actor_new(s_ctx, s_peers, &peers);
    REQUIRE_VOID(s->peers, "actor_new: %s", semoe_err_msg());
    s->pwatch = zloop_watch_new(&s->loop, actor_pipe(s->peers), s_on_peers_pipe, s);
    REQUIRE_VOID(s->pwatch, "zloop_watch_new: %s", semoe_err_msg());
    uv_timer_init(&s->loop, &s->replier);
    s->replier.data = s;
    uv_timer_start(&s->replier, s_on_replier, 1, 1);
    uv_timer_init(&s->loop, &s->deadline);
    s->deadline.data = &s->timed_out;
    uv_timer_start(&s->deadline, s_on_deadline, 30000, 0);

    uv_run(&s->loop, UV_RUN_DEFAULT);

    CHECK(s->done && !s->timed_out, "the peers did not finish within 30 s: %ld requests, "
          "%ld replies", s->requests, s->replies);
    zloop_watch_destroy(&s->pwatch);
    zloop_watch_destroy(&s->rwatch);
    CHECK(s->rwatch == NULL && s->pwatch == NULL, "zloop_watch_destroy must null the pointer");
    s_close_handle((uv_handle_t *)&s->replier);
    s_close_handle((uv_handle_t *)&s->deadline);
    s_loop_close(&s->loop);
    actor_destroy(&s->peers);
    CHECK(peers.sent > 0, "nothing was sent");
    CHECK(peers.bad == 0, "%ld replies were wrong or missing", peers.bad);
    CHECK(s->malformed == 0 && s->send_errors == 0, "%ld malformed requests, %ld failed replies",
          s->malformed, s->send_errors);
    CHECK(s->requests == peers.sent && s->replies == peers.sent && peers.answered == peers.sent,
          "sent %ld, handled %ld, replied %ld, answered %ld", peers.sent, s->requests, s->replies,
          peers.answered);
    printf("router bursts: %ld requests from %d peers answered by a 1 ms timer\n", s->requests,
           PEERS);
    for (size_t i = 0; i < s->queued; i++) {
        zmq_msg_close(&s->queue[i][0]);
        zmq_msg_close(&s->queue[i][1]);
    }
    free(s->queue);
    zmq_close(s->router);
    free(s);
}

/* --- 3b. the edge a timer's own send consumes ------------------------------------------- */

#define EDGE_PINGS 200

typedef struct {
    uv_loop_t loop;
    void *router;
    actor_t *pong;
    zloop_watch_t *watch;
    uv_timer_t pinger, deadline;
    uv_check_t counter;
    long polls; /* times the loop has polled (blocked, or could have) */
    int pings, pongs, edges;
    long sent_at[EDGE_PINGS], handled_at[EDGE_PINGS];
    bool timed_out;
} edge_t;

/* A DEALER that answers "ping i" with "pong i", then says "sent i" on its pipe. */
static void s_pong(void *pipe, void *args)
{
    int linger = 0;
    void *dealer = zmq_socket(s_ctx, ZMQ_DEALER);
    zmq_setsockopt(dealer, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(dealer, ZMQ_ROUTING_ID, "pong", 4);
    if (zmq_connect(dealer, args) == -1 || zmq_send(dealer, "hello", 5, 0) != 5) {
        actor_signal(pipe, 1);
        zmq_close(dealer);
        return;
    }
    actor_signal(pipe, 0);
    zmq_pollitem_t items[2] = {{pipe, 0, ZMQ_POLLIN, 0}, {dealer, 0, ZMQ_POLLIN, 0}};
    char buf[32], out[32];
    for (;;) {
        if (zmq_poll(items, 2, -1) == -1)
            break;
        if (items[0].revents & ZMQ_POLLIN) {
            free(actor_recv_str(pipe)); /* "$TERM" */
            break;
        }
        int n = zmq_recv(dealer, buf, sizeof buf - 1, ZMQ_DONTWAIT);
        int i;
        if (n < 0)
            continue;
        buf[n] = 0;
        if (sscanf(buf, "ping %d", &i) != 1)
            continue;
        snprintf(out, sizeof out, "pong %d", i);
        zmq_send(dealer, out, strlen(out), 0);
        snprintf(out, sizeof out, "sent %d", i);
        actor_send_str(pipe, out, 0);
    }
    zmq_close(dealer);
}

/* Sends a ping on the ROUTER and waits, inside this callback, until the reply is queued at the
 * ROUTER; then reads ZMQ_EVENTS, as any send on the socket may, which swallows the ZMQ_FD edge
 * that announced the reply. Nothing else will wake the loop for it. */
static void s_on_ping(uv_timer_t *timer)
{
    edge_t *e = timer->data;
    int i = e->pings++;
    char msg[32];
    snprintf(msg, sizeof msg, "ping %d", i);
    int n = zmq_send(e->router, "pong", 4, ZMQ_SNDMORE);
    CHECK(n == 4 && zmq_send(e->router, msg, strlen(msg), 0) > 0, "ping %d: %s", i,
          zmq_strerror(zmq_errno()));
    char *ack = actor_recv_str(actor_pipe(e->pong));
    char want[32];
    snprintf(want, sizeof want, "sent %d", i);
    CHECK(ack && strcmp(ack, want) == 0, "pong actor said '%s'", ack ? ack : "(null)");
    free(ack);
    zmq_fd_t fd;
    size_t len = sizeof fd;
    zmq_getsockopt(e->router, ZMQ_FD, &fd, &len);
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    if ((s_events(e->router) & ZMQ_POLLIN) && poll(&pfd, 1, 0) == 0)
        e->edges++; /* a reply waits and ZMQ_FD says nothing: the case under test */
    e->sent_at[i] = e->polls;
    if (e->pings == EDGE_PINGS)
        uv_timer_stop(timer);
}

static void s_on_pong(void *sock, void *arg)
{
    edge_t *e = arg;
    char id[16], body[32];
    int idn = zmq_recv(sock, id, sizeof id, 0);
    int n = zmq_recv(sock, body, sizeof body - 1, 0);
    int i;
    CHECK(idn == 4 && n > 0, "pong message");
    if (n <= 0)
        return;
    body[n] = 0;
    if (strcmp(body, "hello") == 0) {
        uv_timer_start(&e->pinger, s_on_ping, 1, 1);
    } else if (sscanf(body, "pong %d", &i) == 1 && i >= 0 && i < EDGE_PINGS) {
        e->handled_at[i] = e->polls;
        if (++e->pongs == EDGE_PINGS)
            uv_stop(&e->loop);
    } else {
        CHECK(false, "unexpected '%s'", body);
    }
}

static void s_on_turn(uv_check_t *check) { ((edge_t *)check->data)->polls++; }

static void test_timer_edge(void)
{
    edge_t *e = semoe_xcalloc(1, sizeof *e);
    for (int i = 0; i < EDGE_PINGS; i++)
        e->handled_at[i] = -1;
    uv_loop_init(&e->loop);
    int linger = 0, mandatory = 1;
    e->router = zmq_socket(s_ctx, ZMQ_ROUTER);
    zmq_setsockopt(e->router, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(e->router, ZMQ_ROUTER_MANDATORY, &mandatory, sizeof mandatory);
    zmq_bind(e->router, "inproc://test-edge");
    e->watch = zloop_watch_new(&e->loop, e->router, s_on_pong, e);
    REQUIRE_VOID(e->watch, "zloop_watch_new: %s", semoe_err_msg());
    e->pong = actor_new(s_ctx, s_pong, "inproc://test-edge");
    REQUIRE_VOID(e->pong, "actor_new: %s", semoe_err_msg());
    uv_timer_init(&e->loop, &e->pinger);
    e->pinger.data = e;
    uv_timer_init(&e->loop, &e->deadline);
    e->deadline.data = &e->timed_out;
    uv_timer_start(&e->deadline, s_on_deadline, 10000, 0);
    uv_check_init(&e->loop, &e->counter);
    e->counter.data = e;
    uv_check_start(&e->counter, s_on_turn);

    uv_run(&e->loop, UV_RUN_DEFAULT);

    CHECK(!e->timed_out && e->pongs == EDGE_PINGS, "%d of %d pongs handled within 10 s",
          e->pongs, EDGE_PINGS);
    CHECK(e->edges == e->pings, "the swallowed edge was produced %d times in %d pings", e->edges,
          e->pings);
    /* Handled before the loop polled again: the prepare check ran after the timer. */
    int late = 0;
    long worst = 0;
    for (int i = 0; i < e->pings; i++) {
        long d = e->handled_at[i] < 0 ? 1000000 : e->handled_at[i] - e->sent_at[i];
        late += d != 0;
        worst = d > worst ? d : worst;
    }
    CHECK(late == 0, "%d of %d replies waited past a loop poll (worst %ld)", late, e->pings,
          worst);
    zloop_watch_destroy(&e->watch);
    s_close_handle((uv_handle_t *)&e->pinger);
    s_close_handle((uv_handle_t *)&e->deadline);
    s_close_handle((uv_handle_t *)&e->counter);
    s_loop_close(&e->loop);
    actor_destroy(&e->pong);
    zmq_close(e->router);
    free(e);
}

/* --- 3c. the drain budget lets the loop turn, and the idle handle keeps it from blocking ---- */

#define BUDGET      4
#define BUDGET_MSGS 100

typedef struct {
    uv_loop_t loop;
    uv_check_t counter;
    uv_timer_t guard;
    long turns;
    int handled, this_turn, most_in_a_turn;
    bool timed_out;
} budget_t;

static void s_on_budget_msg(void *sock, void *arg)
{
    budget_t *b = arg;
    char buf[8];
    if (zmq_recv(sock, buf, sizeof buf, 0) >= 0) {
        b->handled++;
        b->this_turn++;
    }
}

static void s_on_budget_turn(uv_check_t *check)
{
    budget_t *b = check->data;
    b->turns++;
    if (b->this_turn > b->most_in_a_turn)
        b->most_in_a_turn = b->this_turn;
    b->this_turn = 0;
}

static void test_budget(void)
{
    budget_t b = {.handled = 0};
    void *in, *out;
    s_pair(&in, &out, "inproc://test-budget");
    uv_loop_init(&b.loop);
    zloop_watch_t *w = zloop_watch_new(&b.loop, in, s_on_budget_msg, &b);
    REQUIRE_VOID(w, "zloop_watch_new: %s", semoe_err_msg());
    zloop_watch_set_budget(w, BUDGET);
    uv_check_init(&b.loop, &b.counter);
    b.counter.data = &b;
    uv_check_start(&b.counter, s_on_budget_turn);
    uv_timer_init(&b.loop, &b.guard);
    b.guard.data = &b.timed_out;
    uv_timer_start(&b.guard, s_on_deadline, 5000, 0);
    for (int i = 0; i < BUDGET_MSGS; i++)
        zmq_send(out, "m", 1, 0);

    int blocking_with_work = 0;
    while (b.handled < BUDGET_MSGS && !b.timed_out && b.turns < 10 * BUDGET_MSGS) {
        uv_run(&b.loop, UV_RUN_ONCE);
        if (b.handled < BUDGET_MSGS && uv_backend_timeout(&b.loop) != 0)
            blocking_with_work++;
    }
    CHECK(b.handled == BUDGET_MSGS && !b.timed_out, "handled %d of %d", b.handled, BUDGET_MSGS);
    CHECK(blocking_with_work == 0, "%d times the loop would have blocked with messages left",
          blocking_with_work);
    CHECK(b.most_in_a_turn <= 2 * BUDGET, "%d messages in one turn with a budget of %d",
          b.most_in_a_turn, BUDGET);
    CHECK(b.turns <= BUDGET_MSGS / BUDGET + 2, "%ld turns for %d messages", b.turns,
          BUDGET_MSGS);
    CHECK(uv_backend_timeout(&b.loop) != 0, "the idle handle must stop once the socket is empty");

    /* poke drains at once, outside any loop callback. */
    int before = b.handled;
    zmq_send(out, "p", 1, 0);
    zloop_watch_poke(w);
    CHECK(b.handled == before + 1, "poke handled %d messages", b.handled - before);

    CHECK(zloop_watch_new(&b.loop, in, s_on_budget_msg, &b) == NULL,
          "a second watch on one socket must fail");
    CHECK(strstr(semoe_err_msg(), "already has a watch"), "message: %s", semoe_err_msg());
    CHECK(zloop_watch_new(&b.loop, NULL, s_on_budget_msg, &b) == NULL, "a watch without socket");

    zloop_watch_destroy(&w);
    zloop_watch_destroy(&w); /* already NULL: nothing to do */
    s_close_handle((uv_handle_t *)&b.counter);
    s_close_handle((uv_handle_t *)&b.guard);
    s_loop_close(&b.loop);
    zmq_close(in);
    zmq_close(out);
}

/* --- 4. watches destroyed from callbacks ------------------------------------------------ */

typedef struct {
    zloop_watch_t *self, **other;
    int calls;
} victim_t;

/* Takes one message, then destroys its own watch (self) or another one (other). */
static void s_on_destroyer(void *sock, void *arg)
{
    victim_t *v = arg;
    char buf[8];
    zmq_recv(sock, buf, sizeof buf, 0);
    v->calls++;
    if (v->other)
        zloop_watch_destroy(v->other);
    else
        zloop_watch_destroy(&v->self);
}

static void test_destroy_in_callback(void)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    uv_timer_t guard;
    bool timed_out = false;
    uv_timer_init(&loop, &guard);
    guard.data = &timed_out;
    uv_timer_start(&guard, s_on_deadline, 5000, 0);
    uv_unref((uv_handle_t *)&guard); /* only fires if a watch keeps the loop alive */

    void *in, *out;
    s_pair(&in, &out, "inproc://test-destroy-self");
    victim_t v = {.calls = 0};
    v.self = zloop_watch_new(&loop, in, s_on_destroyer, &v);
    REQUIRE_VOID(v.self, "zloop_watch_new: %s", semoe_err_msg());
    for (int i = 0; i < 10; i++)
        zmq_send(out, "m", 1, 0);
    uv_run(&loop, UV_RUN_DEFAULT); /* returns once the destroyed watch's handles are closed */
    CHECK(!timed_out, "the watch kept the loop alive after destroying itself");
    CHECK(v.calls == 1 && v.self == NULL, "called %d times after destroying itself", v.calls);
    int left = 0;
    char buf[8];
    while (zmq_recv(in, buf, sizeof buf, ZMQ_DONTWAIT) >= 0)
        left++;
    CHECK(left == 9, "%d messages left in the socket, want 9", left);

    /* Two watches each ready to destroy the other: whichever runs first wins, the other never
     * runs again. */
    void *in2, *out2;
    s_pair(&in2, &out2, "inproc://test-destroy-other");
    victim_t a = {.calls = 0}, b = {.calls = 0};
    a.self = zloop_watch_new(&loop, in, s_on_destroyer, &a);
    b.self = zloop_watch_new(&loop, in2, s_on_destroyer, &b);
    REQUIRE_VOID(a.self && b.self, "zloop_watch_new: %s", semoe_err_msg());
    a.other = &b.self;
    b.other = &a.self;
    for (int i = 0; i < 5; i++) {
        zmq_send(out, "a", 1, 0);
        zmq_send(out2, "b", 1, 0);
    }
    for (int i = 0; i < 3; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    CHECK((a.calls == 0) != (b.calls == 0), "both destroyed watches ran: %d and %d", a.calls,
          b.calls);
    CHECK((a.self == NULL) != (b.self == NULL), "exactly one watch should be gone");
    zloop_watch_destroy(a.self ? &a.self : &b.self);

    s_close_handle((uv_handle_t *)&guard);
    s_loop_close(&loop);
    zmq_close(in);
    zmq_close(out);
    zmq_close(in2);
    zmq_close(out2);
}

int main(void)
{
    test_init("actor");
    log_init("test_actor", LOG_WARN);
    s_ctx = zmq_ctx_new();
    test_many_actors();
    test_start_failures();
    test_signals();
    test_router_bursts();
    test_timer_edge();
    test_budget();
    test_destroy_in_callback();
    /* Hangs if any socket above, an actor's pipe included, was left open. */
    zmq_ctx_term(s_ctx);
    return test_finish();
}
