/* Collectives over ZeroMQ peer sockets (worker/comm.c): all-reduce bit-exact against a sum in
 * rank order, all-to-all with random per-peer sizes, barrier, bucketed all-reduce, generation
 * fencing, timeouts that name the silent rank, abort; ranks as threads and as processes. */
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/log.h"
#include "tests/harness.h"
#include "worker/comm.h"

#define MAXW 8
#define T_TIMEOUT 20000

static uint64_t s_seed;

/* splitmix64 of a tuple: every rank regenerates any rank's inputs without sharing state. */
static uint64_t s_mix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}
static uint64_t s_hash(uint64_t a, uint64_t b, uint64_t c, uint64_t d)
{
    return s_mix(s_mix(s_mix(s_mix(s_seed ^ a) ^ b) ^ c) ^ d);
}
/* A float with a random sign, mantissa and exponent (2^-8..2^8), so that the order of a sum
 * shows; element i of rank r's input under tag. s_base once per (tag, rank), one mix per value. */
static uint64_t s_base(uint64_t tag, uint32_t rank)
{
    return s_hash(tag, rank, 0, 1);
}
static float s_val_at(uint64_t base, size_t i)
{
    uint64_t h = s_mix(base + i * 0x9e3779b97f4a7c15ull);
    uint32_t bits = (uint32_t)(h >> 63) << 31 | (uint32_t)(127 - 8 + (h >> 32) % 17) << 23 |
                    (uint32_t)(h & 0x7fffff);
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}
static void s_fill(float *buf, size_t n, uint64_t tag, uint32_t rank)
{
    uint64_t b = s_base(tag, rank);
    for (size_t i = 0; i < n; i++)
        buf[i] = s_val_at(b, i);
}
/* The reference: ((x0 + x1) + x2) + ... for each element. */
static float s_ref(const uint64_t *bases, uint32_t world, size_t i)
{
    float s = s_val_at(bases[0], i);
    for (uint32_t r = 1; r < world; r++)
        s += s_val_at(bases[r], i);
    return s;
}
/* Index of the first element that differs from the reference in its bits; n if none. */
static size_t s_mismatch(const float *buf, size_t n, uint64_t tag, uint32_t world, float *want)
{
    uint64_t bases[MAXW];
    for (uint32_t r = 0; r < world; r++)
        bases[r] = s_base(tag, r);
    for (size_t i = 0; i < n; i++) {
        *want = s_ref(bases, world, i);
        if (memcmp(&buf[i], want, sizeof *want) != 0)
            return i;
    }
    return n;
}

/* Bytes from s to r in alltoallv round `it`: zeros often, sometimes across chunks. */
static size_t s_a2a_len(uint64_t it, uint32_t s, uint32_t r)
{
    uint64_t h = s_hash(it, s, r, 2);
    switch (h % 8) {
    case 0: case 1: return 0;
    case 2: return 1;
    case 3: return (size_t)(h >> 8) % 64;
    case 4: return COMM_CHUNK_BYTES + (size_t)(h >> 8) % 4099 - 2049; /* around a chunk edge */
    default: return (size_t)(h >> 8) % 100003;
    }
}
static uint8_t s_a2a_byte(uint64_t it, uint32_t s, uint32_t r, size_t i)
{
    return (uint8_t)(s_mix(s_hash(it, s, r, 3) + i) >> 13);
}

/* --- a group of ranks as threads ----------------------------------------------------------- */

typedef struct s_rank s_rank_t;
typedef void (*s_body_fn)(s_rank_t *me, comm_t *c);

typedef struct {
    void *ctx;
    uint32_t world;
    comm_port_t *ports[MAXW];
    const char *eps[MAXW];
    char ep_text[MAXW][256]; /* copies: a port may be closed while the others still dial it */
    uint64_t gen;
    s_body_fn body;
    bool skip[MAXW]; /* ranks that never build their comm */
} s_group_t;

struct s_rank {
    s_group_t *g;
    uint32_t rank;
    pthread_t th;
    comm_stats_t st;
    _Atomic(comm_t *) comm;
    void *arg;
};

static void *s_rank_main(void *arg)
{
    s_rank_t *me = arg;
    s_group_t *g = me->g;
    comm_t *c = NULL;
    semoe_rc rc = comm_new(g->ports[me->rank], g->gen, me->rank, g->world, g->eps, &c);
    TCHECK(rc == SEMOE_OK, "comm_new rank %u: %s", me->rank, semoe_err_msg());
    if (rc != SEMOE_OK)
        return NULL;
    atomic_store(&me->comm, c);
    g->body(me, c);
    comm_stats(c, &me->st);
    atomic_store(&me->comm, NULL);
    comm_destroy(&c);
    return NULL;
}

static void s_group_open(s_group_t *g, void *ctx, uint32_t world)
{
    memset(g, 0, sizeof *g);
    g->ctx = ctx;
    g->world = world;
    for (uint32_t r = 0; r < world; r++) {
        semoe_rc rc = comm_port_new(ctx, "tcp://127.0.0.1:*", &g->ports[r]);
        if (rc != SEMOE_OK) {
            fprintf(stderr, "comm_port_new: %s\n", semoe_err_msg());
            exit(1);
        }
        snprintf(g->ep_text[r], sizeof g->ep_text[r], "%s", comm_port_endpoint(g->ports[r]));
        g->eps[r] = g->ep_text[r];
    }
}

static void s_group_close(s_group_t *g)
{
    for (uint32_t r = 0; r < g->world; r++)
        comm_port_destroy(&g->ports[r]);
}

/* Runs body on every rank (a thread each; ports move to them, pthread_create is the barrier). */
static void s_group_run(s_group_t *g, uint64_t gen, s_body_fn body, s_rank_t *ranks, void *arg)
{
    g->gen = gen;
    g->body = body;
    for (uint32_t r = 0; r < g->world; r++) {
        ranks[r] = (s_rank_t){.g = g, .rank = r, .arg = arg};
        atomic_init(&ranks[r].comm, NULL);
        if (!g->skip[r])
            pthread_create(&ranks[r].th, NULL, s_rank_main, &ranks[r]);
    }
    for (uint32_t r = 0; r < g->world; r++)
        if (!g->skip[r])
            pthread_join(ranks[r].th, NULL);
}

/* --- bodies -------------------------------------------------------------------------------- */

static const size_t s_sizes[] = {0, 1, 2, 3, 7, 1001, 65537, 1000003};

static void s_check_allreduce(s_rank_t *me, comm_t *c, size_t n, uint64_t tag)
{
    float *buf = malloc((n ? n : 1) * sizeof *buf);
    s_fill(buf, n, tag, me->rank);
    semoe_rc rc = comm_allreduce_sum(c, buf, n, T_TIMEOUT);
    TCHECK(rc == SEMOE_OK, "allreduce n=%zu rank %u: %s", n, me->rank, semoe_err_msg());
    float want = 0;
    size_t bad = s_mismatch(buf, n, tag, me->g->world, &want);
    TCHECK(bad == n, "allreduce n=%zu world %u rank %u: element %zu = %a, want %a", n,
           me->g->world, me->rank, bad, bad < n ? buf[bad] : 0.0f, want);
    free(buf);
}

static void s_check_alltoallv(s_rank_t *me, comm_t *c, uint64_t it)
{
    uint32_t w = me->g->world, my = me->rank;
    size_t send_bytes[MAXW], recv_bytes[MAXW], stot = 0, rtot = 0;
    for (uint32_t r = 0; r < w; r++) {
        send_bytes[r] = s_a2a_len(it, my, r);
        stot += send_bytes[r];
        rtot += s_a2a_len(it, r, my);
    }
    uint8_t *send = calloc(stot + 1, 1), *recv = calloc(rtot + 1, 1);
    for (uint32_t r = 0, off = 0; r < w; off += (uint32_t)send_bytes[r], r++)
        for (size_t i = 0; i < send_bytes[r]; i++)
            send[off + i] = s_a2a_byte(it, my, r, i);
    semoe_rc rc = comm_alltoallv(c, send, send_bytes, recv, recv_bytes, rtot, T_TIMEOUT);
    TCHECK(rc == SEMOE_OK, "alltoallv rank %u: %s", my, semoe_err_msg());
    size_t off = 0;
    for (uint32_t s = 0; s < w && rc == SEMOE_OK; s++) {
        size_t want = s_a2a_len(it, s, my);
        TCHECK(recv_bytes[s] == want, "alltoallv %u->%u: %zu bytes, want %zu", s, my,
               recv_bytes[s], want);
        size_t bad = want;
        for (size_t i = 0; i < want && recv_bytes[s] == want; i++)
            if (recv[off + i] != s_a2a_byte(it, s, my, i)) {
                bad = i;
                break;
            }
        TCHECK(bad == want, "alltoallv %u->%u: byte %zu of %zu differs", s, my, bad, want);
        off += recv_bytes[s];
    }
    free(send);
    free(recv);
}

static void s_check_buckets(s_rank_t *me, comm_t *c, uint64_t tag)
{
    enum { NT = 6 };
    const size_t lens[NT] = {0, 1, 1000, 300001, 5, 600007};
    float *a[NT], *b[NT];
    for (int t = 0; t < NT; t++) {
        a[t] = malloc((lens[t] + 1) * sizeof(float));
        b[t] = malloc((lens[t] + 1) * sizeof(float));
        s_fill(a[t], lens[t], tag + (uint64_t)t, me->rank);
        memcpy(b[t], a[t], lens[t] * sizeof(float));
    }
    semoe_rc rc = comm_allreduce_buckets(c, a, lens, NT, 1 << 20, T_TIMEOUT);
    TCHECK(rc == SEMOE_OK, "allreduce_buckets: %s", semoe_err_msg());
    for (int t = 0; t < NT; t++) {
        rc = comm_allreduce_sum(c, b[t], lens[t], T_TIMEOUT);
        TCHECK(rc == SEMOE_OK, "allreduce tensor %d: %s", t, semoe_err_msg());
        TCHECK(memcmp(a[t], b[t], lens[t] * sizeof(float)) == 0,
               "tensor %d: bucketed differs from unbucketed", t);
        float want = 0;
        size_t bad = s_mismatch(a[t], lens[t], tag + (uint64_t)t, me->g->world, &want);
        TCHECK(bad == lens[t], "tensor %d element %zu differs from the reference", t, bad);
        free(a[t]);
        free(b[t]);
    }
}

/* Back to back: allreduce, alltoallv and barrier of random sizes (the same on every rank). */
static void s_body_mixed(s_rank_t *me, comm_t *c)
{
    int rounds = *(int *)me->arg;
    s_check_allreduce(me, c, (size_t)2 << 20, 999); /* 8 MB */
    for (int it = 0; it < rounds; it++) {
        size_t n = s_sizes[s_hash((uint64_t)it, 7, 7, 7) % (sizeof s_sizes / sizeof *s_sizes)];
        s_check_allreduce(me, c, n, (uint64_t)it);
        s_check_alltoallv(me, c, (uint64_t)it);
        if (it % 3 == 0) {
            semoe_rc rc = comm_barrier(c, T_TIMEOUT);
            TCHECK(rc == SEMOE_OK, "barrier: %s", semoe_err_msg());
        }
    }
    s_check_buckets(me, c, 5000);
}

static void test_threads(void *ctx)
{
    for (uint32_t w = 1; w <= 5; w++) {
        int64_t t0 = clock_mono_ms();
        s_group_t g;
        s_rank_t ranks[MAXW];
        int rounds = w <= 3 ? 12 : 8;
        s_group_open(&g, ctx, w);
        s_group_run(&g, 1, s_body_mixed, ranks, &rounds);
        CHECK(ranks[0].st.stale_dropped == 0 && ranks[0].st.malformed_dropped == 0,
              "world %u: %llu stale, %llu malformed", w,
              (unsigned long long)ranks[0].st.stale_dropped,
              (unsigned long long)ranks[0].st.malformed_dropped);
        s_group_close(&g);
        printf("world %u: %d rounds of allreduce/alltoallv/barrier + 8 MB + buckets: %lld ms\n",
               w, rounds, (long long)(clock_mono_ms() - t0));
    }
}

/* --- fencing: an older generation's message is dropped ------------------------------------- */

static void s_put32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static void s_put64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
/* The wire header of comm.c: magic "SMCL", op u16, 0 u16, gen u64, src, seq, chunk, nchunks
 * u32, total u64; op 1 is the all-reduce's reduce-scatter. */
static void s_fake_header(uint8_t h[40], uint64_t gen, uint32_t src, uint32_t seq, uint32_t op,
                          uint64_t total)
{
    memset(h, 0, 40);
    s_put32(h, 0x4c434d53u);
    h[4] = (uint8_t)op;
    s_put64(h + 8, gen);
    s_put32(h + 16, src);
    s_put32(h + 20, seq);
    s_put32(h + 24, 0);
    s_put32(h + 28, 1);
    s_put64(h + 32, total);
}

static void s_body_small_allreduce(s_rank_t *me, comm_t *c)
{
    for (int i = 0; i < 3; i++)
        s_check_allreduce(me, c, 8, 77 + (uint64_t)i);
}

static void test_fencing(void *ctx)
{
    s_group_t g;
    s_rank_t ranks[MAXW];
    s_group_open(&g, ctx, 2);
    /* A zombie rank 1 of generation 4 writes what would be rank 1's contribution to rank 0's
     * segment (4 floats) of the first all-reduce of generation 5, full of NaNs. */
    void *zombie = zmq_socket(ctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(zombie, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(zombie, ZMQ_ROUTING_ID, "g4r1", 4);
    zmq_connect(zombie, g.eps[0]);
    uint8_t h[40];
    float nan4[4];
    for (int i = 0; i < 4; i++)
        nan4[i] = __builtin_nanf("");
    s_fake_header(h, 4, 1, 0, 1, sizeof nan4);
    zmq_send(zombie, h, sizeof h, ZMQ_SNDMORE);
    zmq_send(zombie, nan4, sizeof nan4, 0);
    /* And one claiming generation 5 from a connection that is not rank 1 of generation 5. */
    void *liar = zmq_socket(ctx, ZMQ_DEALER);
    zmq_setsockopt(liar, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(liar, ZMQ_ROUTING_ID, "intruder", 8);
    zmq_connect(liar, g.eps[0]);
    s_fake_header(h, 5, 1, 0, 1, sizeof nan4);
    zmq_send(liar, h, sizeof h, ZMQ_SNDMORE);
    zmq_send(liar, nan4, sizeof nan4, 0);
    usleep(200 * 1000); /* both are in rank 0's ROUTER queue before the collective starts */
    s_group_run(&g, 5, s_body_small_allreduce, ranks, NULL);
    CHECK(ranks[0].st.stale_dropped == 1, "rank 0 dropped %llu stale messages, want 1",
          (unsigned long long)ranks[0].st.stale_dropped);
    CHECK(ranks[0].st.malformed_dropped == 1, "rank 0 dropped %llu spoofed messages, want 1",
          (unsigned long long)ranks[0].st.malformed_dropped);
    zmq_close(zombie);
    zmq_close(liar);
    s_group_close(&g);
}

/* --- a silent peer: timeout naming it; a newer generation's messages kept ------------------ */

typedef struct {
    semoe_rc rc;
    char msg[1024];
    int64_t ms;
    comm_stats_t st;
} s_outcome_t;

static void s_body_timeout(s_rank_t *me, comm_t *c)
{
    s_outcome_t *out = (s_outcome_t *)me->arg + me->rank;
    float buf[1000];
    s_fill(buf, 1000, 31, me->rank);
    int64_t t0 = clock_mono_ms();
    out->rc = comm_allreduce_sum(c, buf, 1000, 400);
    out->ms = clock_mono_ms() - t0;
    snprintf(out->msg, sizeof out->msg, "%s", semoe_err_msg());
    semoe_rc again = comm_barrier(c, 1000);
    TCHECK(again != SEMOE_OK, "a broken comm accepted another collective");
}

static void test_timeout(void *ctx)
{
    s_group_t g;
    s_rank_t ranks[MAXW];
    s_outcome_t out[3];
    memset(out, 0, sizeof out);
    s_group_open(&g, ctx, 3);
    g.skip[2] = true; /* rank 2 has a port but never joins */
    s_group_run(&g, 9, s_body_timeout, ranks, out);
    for (int r = 0; r < 2; r++) {
        CHECK(out[r].rc == SEMOE_ETIMEDOUT, "rank %d: %s", r, semoe_rc_name(out[r].rc));
        CHECK(strstr(out[r].msg, "waiting for rank(s) 2") != NULL, "rank %d: message: %s", r,
              out[r].msg);
        CHECK(out[r].ms >= 400 && out[r].ms < 400 + 300, "rank %d returned after %lld ms", r,
              (long long)out[r].ms);
        printf("rank %d: %s (%lld ms)\n", r, out[r].msg, (long long)out[r].ms);
    }
    s_group_close(&g);

    /* A dead peer (port closed: nothing listens) is the same. */
    s_group_open(&g, ctx, 2);
    g.skip[1] = true;
    comm_port_destroy(&g.ports[1]);
    memset(out, 0, sizeof out);
    s_group_run(&g, 9, s_body_timeout, ranks, out);
    CHECK(out[0].rc == SEMOE_ETIMEDOUT && strstr(out[0].msg, "waiting for rank(s) 1"),
          "dead peer: %s: %s", semoe_rc_name(out[0].rc), out[0].msg);
    s_group_close(&g);
}

/* Rank 1 moves on to generation 8 while rank 0 still waits in generation 7: rank 0 keeps the
 * generation-8 messages on its port and its generation-8 all-reduce uses them. */
static void *s_gen_rank(void *arg)
{
    s_rank_t *me = arg;
    s_group_t *g = me->g;
    s_outcome_t *out = (s_outcome_t *)me->arg + me->rank;
    comm_t *c = NULL;
    semoe_rc rc = comm_new(g->ports[me->rank], 7, me->rank, 2, g->eps, &c);
    TCHECK(rc == SEMOE_OK, "comm_new: %s", semoe_err_msg());
    rc = comm_barrier(c, T_TIMEOUT);
    TCHECK(rc == SEMOE_OK, "barrier gen 7: %s", semoe_err_msg());
    if (me->rank == 0) { /* a second barrier that rank 1 never joins */
        out->rc = comm_barrier(c, 600);
        snprintf(out->msg, sizeof out->msg, "%s", semoe_err_msg());
    }
    comm_stats(c, &out->st);
    comm_destroy(&c);
    rc = comm_new(g->ports[me->rank], 8, me->rank, 2, g->eps, &c);
    TCHECK(rc == SEMOE_OK, "comm_new: %s", semoe_err_msg());
    s_check_allreduce(me, c, 100, 123);
    comm_destroy(&c);
    return NULL;
}

static void test_newer_generation(void *ctx)
{
    s_group_t g;
    s_rank_t ranks[2];
    s_outcome_t out[2];
    memset(out, 0, sizeof out);
    s_group_open(&g, ctx, 2);
    for (uint32_t r = 0; r < 2; r++) {
        ranks[r] = (s_rank_t){.g = &g, .rank = r, .arg = out};
        pthread_create(&ranks[r].th, NULL, s_gen_rank, &ranks[r]);
    }
    for (uint32_t r = 0; r < 2; r++)
        pthread_join(ranks[r].th, NULL);
    CHECK(out[0].rc == SEMOE_ETIMEDOUT && strstr(out[0].msg, "rank(s) 1"), "%s: %s",
          semoe_rc_name(out[0].rc), out[0].msg);
    CHECK(out[0].st.future_stashed >= 1, "rank 0 kept %llu newer-generation messages",
          (unsigned long long)out[0].st.future_stashed);
    s_group_close(&g);
}

/* --- abort from another thread ------------------------------------------------------------- */

static void s_body_abort(s_rank_t *me, comm_t *c)
{
    s_outcome_t *out = me->arg;
    int64_t t0 = clock_mono_ms();
    out->rc = comm_barrier(c, 10000);
    out->ms = clock_mono_ms() - t0;
    snprintf(out->msg, sizeof out->msg, "%s", semoe_err_msg());
}

static void *s_abort_thread(void *arg)
{
    s_rank_t *r0 = arg;
    usleep(150 * 1000);
    comm_t *c = atomic_load(&r0->comm);
    if (c)
        comm_abort(c);
    return NULL;
}

static void test_abort(void *ctx)
{
    s_group_t g;
    s_rank_t ranks[2];
    s_outcome_t out = {0};
    s_group_open(&g, ctx, 2);
    g.skip[1] = true;
    g.gen = 3;
    g.body = s_body_abort;
    ranks[0] = (s_rank_t){.g = &g, .rank = 0, .arg = &out};
    atomic_init(&ranks[0].comm, NULL);
    pthread_t killer;
    pthread_create(&ranks[0].th, NULL, s_rank_main, &ranks[0]);
    pthread_create(&killer, NULL, s_abort_thread, &ranks[0]);
    pthread_join(killer, NULL);
    pthread_join(ranks[0].th, NULL);
    CHECK(out.rc == SEMOE_ESTOPPED && out.ms < 1000, "abort: %s after %lld ms: %s",
          semoe_rc_name(out.rc), (long long)out.ms, out.msg);
    s_group_close(&g);
}

/* --- bandwidth (informative) --------------------------------------------------------------- */

static void s_body_bw(s_rank_t *me, comm_t *c)
{
    size_t n = (size_t)2 << 20;
    float *buf = malloc(n * sizeof *buf);
    s_fill(buf, n, 1, me->rank);
    comm_allreduce_sum(c, buf, n, T_TIMEOUT); /* warm up: connections */
    enum { ITERS = 8 };
    int64_t t0 = clock_mono_us();
    for (int i = 0; i < ITERS; i++) {
        semoe_rc rc = comm_allreduce_sum(c, buf, n, T_TIMEOUT);
        TCHECK(rc == SEMOE_OK, "bw allreduce: %s", semoe_err_msg());
    }
    double us = (double)(clock_mono_us() - t0) / ITERS;
    if (me->rank == 0) {
        uint32_t w = me->g->world;
        double alg = (double)(n * sizeof(float)) / us / 1e3; /* GB/s */
        printf("bandwidth: allreduce 8 MB over %u ranks (threads, loopback tcp): %.2f ms, "
               "algbw %.2f GB/s, busbw %.2f GB/s\n",
               w, us / 1e3, alg, alg * 2.0 * (w - 1) / w);
    }
    free(buf);
}

static void test_bandwidth(void *ctx)
{
    uint32_t ws[] = {2, 4};
    for (int i = 0; i < 2; i++) {
        s_group_t g;
        s_rank_t ranks[MAXW];
        s_group_open(&g, ctx, ws[i]);
        s_group_run(&g, 1, s_body_bw, ranks, NULL);
        s_group_close(&g);
    }
}

/* --- processes ----------------------------------------------------------------------------- */

static void s_body_proc(s_rank_t *me, comm_t *c)
{
    s_check_allreduce(me, c, 1000003, 42);
    s_check_alltoallv(me, c, 4242);
    s_check_buckets(me, c, 4343);
    semoe_rc rc = comm_barrier(c, T_TIMEOUT);
    TCHECK(rc == SEMOE_OK, "barrier: %s", semoe_err_msg());
}

static bool s_read_full(int fd, void *buf, size_t n)
{
    for (size_t got = 0; got < n;) {
        ssize_t k = read(fd, (char *)buf + got, n - got);
        if (k <= 0)
            return false;
        got += (size_t)k;
    }
    return true;
}

/* Child: binds its port, sends the endpoint up, reads every rank's endpoint, runs s_body_proc. */
static int s_child(uint32_t rank, uint32_t world, int up, int down)
{
    void *ctx = zmq_ctx_new();
    comm_port_t *port = NULL;
    if (comm_port_new(ctx, "tcp://127.0.0.1:*", &port) != SEMOE_OK)
        return 2;
    char ep[256] = {0};
    snprintf(ep, sizeof ep, "%s", comm_port_endpoint(port));
    if (write(up, ep, sizeof ep) != (ssize_t)sizeof ep)
        return 2;
    static char all[MAXW][256];
    if (!s_read_full(down, all, sizeof all[0] * world))
        return 2;
    s_group_t g = {.ctx = ctx, .world = world, .gen = 2, .body = s_body_proc};
    for (uint32_t r = 0; r < world; r++)
        g.eps[r] = all[r];
    g.ports[rank] = port;
    s_rank_t me = {.g = &g, .rank = rank};
    atomic_init(&me.comm, NULL);
    s_rank_main(&me);
    comm_port_destroy(&port);
    zmq_ctx_term(ctx);
    return test_failures ? 1 : 0;
}

/* Must run before this process makes a ZeroMQ context (fork and libzmq threads do not mix). */
static void test_processes(void)
{
    enum { W = 3 };
    int up[W][2], down[W][2];
    pid_t pids[W];
    for (uint32_t r = 0; r < W; r++) {
        if (pipe(up[r]) || pipe(down[r])) {
            CHECK(false, "pipe failed");
            return;
        }
        fflush(NULL);
        pids[r] = fork();
        if (pids[r] == 0) {
            alarm(60);
            _exit(s_child(r, W, up[r][1], down[r][0]));
        }
    }
    char all[W][256];
    for (uint32_t r = 0; r < W; r++)
        if (!s_read_full(up[r][0], all[r], sizeof all[r])) {
            CHECK(false, "rank %u did not report its endpoint", r);
            for (uint32_t k = 0; k < W; k++)
                kill(pids[k], SIGKILL);
            break;
        }
    for (uint32_t r = 0; r < W; r++) {
        ssize_t k = write(down[r][1], all, sizeof all);
        (void)k;
    }
    int64_t deadline = clock_mono_ms() + 30000;
    for (uint32_t r = 0; r < W; r++) {
        int status = -1;
        while (waitpid(pids[r], &status, WNOHANG) == 0) {
            if (clock_mono_ms() > deadline) {
                kill(pids[r], SIGKILL);
                waitpid(pids[r], &status, 0);
                break;
            }
            usleep(10 * 1000);
        }
        CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0, "process rank %u: status %d", r,
              status);
        close(up[r][0]);
        close(up[r][1]);
        close(down[r][0]);
        close(down[r][1]);
    }
    printf("processes: %d ranks: allreduce 1000003, alltoallv, buckets, barrier done\n", W);
}

int main(void)
{
    test_init("collectives");
    s_seed = test_rand(); /* from the printed test seed: SEMOE_TEST_SEED replays it */
    test_processes();
    void *ctx = zmq_ctx_new();
    test_threads(ctx);
    test_fencing(ctx);
    test_timeout(ctx);
    test_newer_generation(ctx);
    test_abort(ctx);
    test_bandwidth(ctx);
    zmq_ctx_term(ctx);
    return test_finish();
}
