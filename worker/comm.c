/* Collectives for CPU workers over ZeroMQ: a data ROUTER per worker (the port) receives, one
 * DEALER per peer per generation sends. Messages are matched by (sequence, op, sender, chunk);
 * older generations are fenced off, newer ones kept for the next communicator. See comm.h. */
#include "worker/comm.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "actors/log.h"

#define S_MAGIC 0x4c434d53u /* "SMCL" little endian */
#define S_HDR_BYTES 40
#define S_MAX_WORLD 65536u
#define S_CHUNK_FLOATS (COMM_CHUNK_BYTES / sizeof(float))
#define S_DRAIN_BITE 256 /* messages read per wake-up before checking progress again */

enum { S_OP_AR_RS = 1, S_OP_AR_AG, S_OP_A2A, S_OP_BARRIER, S_OP_END };
static const char *const s_op_names[] = {"?", "allreduce (reduce-scatter)",
                                         "allreduce (all-gather)", "alltoallv", "barrier"};

typedef struct {
    uint16_t op;
    uint64_t gen;
    uint32_t src, seq, chunk, nchunks;
    uint64_t total; /* payload bytes over all chunks of this (sender, collective) */
} s_hdr_t;

/* A received message, header decoded, payload still in its zmq_msg_t (no copy). */
typedef struct s_msg {
    struct s_msg *next;
    s_hdr_t h;
    zmq_msg_t body;
} s_msg_t;

typedef struct {
    s_msg_t *head, *tail;
    size_t bytes;
} s_queue_t;

struct comm_port {
    void *ctx;
    void *router;
    char endpoint[512];
    s_queue_t stash; /* newer-generation messages, for the next comm */
    comm_t *comm;    /* the comm built on it, if any */
    void *interrupt; /* a socket whose input interrupts a waiting call, or NULL */
};

/* Called for each message of the running collective; owns m from then on. */
typedef semoe_rc (*s_accept_fn)(comm_t *c, void *st, s_msg_t *m);

struct comm {
    comm_port_t *port;
    uint64_t gen;
    uint32_t rank, world;
    void **dealers;        /* by rank; NULL at this rank */
    uint32_t seq;          /* sequence number of the running (or next) collective */
    s_accept_fn accept;    /* non-NULL while a collective runs */
    void *accept_st;
    s_queue_t pending;     /* this generation, later collectives */
    atomic_bool aborted;
    bool interrupted;      /* the port's interrupt socket had input while a call waited */
    bool broken;
    comm_stats_t st;
    float *scratch;        /* one chunk: a rank's own contribution while it is reduced */
    float *bucket;         /* comm_allreduce_buckets */
    size_t bucket_cap;     /* floats */
};

/* --- small helpers ------------------------------------------------------------------------- */

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
static uint32_t s_get32(const uint8_t *p)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}
static uint64_t s_get64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static void s_hdr_encode(const s_hdr_t *h, uint8_t out[S_HDR_BYTES])
{
    s_put32(out, S_MAGIC);
    out[4] = (uint8_t)h->op;
    out[5] = (uint8_t)(h->op >> 8);
    out[6] = out[7] = 0;
    s_put64(out + 8, h->gen);
    s_put32(out + 16, h->src);
    s_put32(out + 20, h->seq);
    s_put32(out + 24, h->chunk);
    s_put32(out + 28, h->nchunks);
    s_put64(out + 32, h->total);
}

static bool s_hdr_decode(const uint8_t *p, size_t len, s_hdr_t *h)
{
    if (len != S_HDR_BYTES || s_get32(p) != S_MAGIC || p[6] || p[7])
        return false;
    h->op = (uint16_t)(p[4] | p[5] << 8);
    h->gen = s_get64(p + 8);
    h->src = s_get32(p + 16);
    h->seq = s_get32(p + 20);
    h->chunk = s_get32(p + 24);
    h->nchunks = s_get32(p + 28);
    h->total = s_get64(p + 32);
    return h->op > 0 && h->op < S_OP_END && h->nchunks > 0 && h->chunk < h->nchunks;
}

static void s_routing_id(uint64_t gen, uint32_t rank, char *out, size_t cap)
{
    snprintf(out, cap, "g%llur%u", (unsigned long long)gen, rank);
}

static void s_msg_free(s_msg_t *m)
{
    if (!m)
        return;
    zmq_msg_close(&m->body);
    free(m);
}

static void s_queue_push(s_queue_t *q, s_msg_t *m)
{
    m->next = NULL;
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
    q->bytes += zmq_msg_size(&m->body);
}

static void s_queue_clear(s_queue_t *q)
{
    while (q->head) {
        s_msg_t *m = q->head;
        q->head = m->next;
        s_msg_free(m);
    }
    q->tail = NULL;
    q->bytes = 0;
}

/* Chunks needed for `bytes`: at least one, so that a zero-size message still says "nothing". */
static uint32_t s_nchunks(size_t bytes)
{
    return bytes == 0 ? 1 : (uint32_t)((bytes + COMM_CHUNK_BYTES - 1) / COMM_CHUNK_BYTES);
}

static size_t s_chunk_bytes(size_t total, uint32_t chunk)
{
    size_t off = (size_t)chunk * COMM_CHUNK_BYTES;
    size_t left = total > off ? total - off : 0;
    return left < COMM_CHUNK_BYTES ? left : COMM_CHUNK_BYTES;
}

/* --- the port ------------------------------------------------------------------------------ */

semoe_rc comm_port_new(void *ctx, const char *bind, comm_port_t **out)
{
    *out = NULL;
    comm_port_t *p = semoe_xcalloc(1, sizeof *p);
    p->ctx = ctx;
    p->router = zmq_socket(ctx, ZMQ_ROUTER);
    if (!p->router) {
        free(p);
        return semoe_err(SEMOE_EIO, "data port: zmq_socket: %s", zmq_strerror(zmq_errno()));
    }
    int64_t max = (int64_t)COMM_MAX_FRAME;
    int linger = 0, on = 1;
    int bufsz = 4 << 20; /* kernel socket buffer: MB-sized frames stream better */
    semoe_rc rc = SEMOE_OK;
    if (zmq_setsockopt(p->router, ZMQ_MAXMSGSIZE, &max, sizeof max) ||
        zmq_setsockopt(p->router, ZMQ_LINGER, &linger, sizeof linger) ||
        zmq_setsockopt(p->router, ZMQ_RCVBUF, &bufsz, sizeof bufsz) ||
        (strchr(bind, '[') && zmq_setsockopt(p->router, ZMQ_IPV6, &on, sizeof on))) {
        rc = semoe_err(SEMOE_EIO, "data port: setsockopt: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (zmq_bind(p->router, bind) != 0) {
        rc = semoe_err(SEMOE_EINVAL, "data port: cannot bind %s: %s", bind,
                       zmq_strerror(zmq_errno()));
        goto fail;
    }
    size_t len = sizeof p->endpoint;
    if (zmq_getsockopt(p->router, ZMQ_LAST_ENDPOINT, p->endpoint, &len) != 0) {
        rc = semoe_err(SEMOE_EIO, "data port: ZMQ_LAST_ENDPOINT: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    p->endpoint[sizeof p->endpoint - 1] = 0;
    *out = p;
    return SEMOE_OK;
fail:
    zmq_close(p->router);
    free(p);
    return rc;
}

const char *comm_port_endpoint(const comm_port_t *port)
{
    return port->endpoint;
}

void comm_port_set_interrupt(comm_port_t *port, void *sock)
{
    port->interrupt = sock;
}

void comm_port_destroy(comm_port_t **port_p)
{
    comm_port_t *p = *port_p;
    if (!p)
        return;
    if (p->comm)
        p->comm->port = NULL; /* a misuse, but do not leave it pointing at freed memory */
    s_queue_clear(&p->stash);
    zmq_close(p->router);
    free(p);
    *port_p = NULL;
}

/* --- the communicator ---------------------------------------------------------------------- */

semoe_rc comm_new(comm_port_t *port, uint64_t gen, uint32_t rank, uint32_t world,
                  const char *const *endpoints, comm_t **out)
{
    *out = NULL;
    if (world == 0 || world > S_MAX_WORLD || rank >= world)
        return semoe_err(SEMOE_EINVAL, "comm: rank %u of world %u: need rank < world <= %u",
                         rank, world, S_MAX_WORLD);
    if (port->comm)
        return semoe_err(SEMOE_EINVAL, "comm: the data port already has the communicator of "
                         "generation %llu: destroy it first",
                         (unsigned long long)port->comm->gen);
    for (uint32_t r = 0; r < world; r++)
        if (r != rank && (!endpoints || !endpoints[r] || !*endpoints[r]))
            return semoe_err(SEMOE_EINVAL, "comm: no data endpoint for rank %u", r);

    comm_t *c = semoe_xcalloc(1, sizeof *c);
    c->port = port;
    c->gen = gen;
    c->rank = rank;
    c->world = world;
    atomic_init(&c->aborted, false);
    c->dealers = semoe_xcalloc(world, sizeof *c->dealers);
    c->scratch = semoe_xmalloc(COMM_CHUNK_BYTES);
    semoe_rc rc = SEMOE_OK;
    char id[64];
    s_routing_id(gen, rank, id, sizeof id);
    for (uint32_t r = 0; r < world; r++) {
        if (r == rank)
            continue;
        void *d = zmq_socket(port->ctx, ZMQ_DEALER);
        if (!d) {
            rc = semoe_err(SEMOE_EIO, "comm: zmq_socket: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
        c->dealers[r] = d;
        int linger = 0, hwm = 0, on = 1, ivl = 50, bufsz = 4 << 20;
        if (zmq_setsockopt(d, ZMQ_ROUTING_ID, id, strlen(id)) ||
            zmq_setsockopt(d, ZMQ_LINGER, &linger, sizeof linger) ||
            zmq_setsockopt(d, ZMQ_SNDHWM, &hwm, sizeof hwm) ||
            zmq_setsockopt(d, ZMQ_SNDBUF, &bufsz, sizeof bufsz) ||
            zmq_setsockopt(d, ZMQ_RECONNECT_IVL, &ivl, sizeof ivl) ||
            (strchr(endpoints[r], '[') && zmq_setsockopt(d, ZMQ_IPV6, &on, sizeof on))) {
            rc = semoe_err(SEMOE_EIO, "comm: setsockopt: %s", zmq_strerror(zmq_errno()));
            goto fail;
        }
        if (zmq_connect(d, endpoints[r]) != 0) {
            rc = semoe_err(SEMOE_EINVAL, "comm: rank %u: cannot connect to %s: %s", r,
                           endpoints[r], zmq_strerror(zmq_errno()));
            goto fail;
        }
    }
    /* Take over what faster peers of this generation already sent; fence off older ones. */
    s_queue_t keep = {0};
    while (port->stash.head) {
        s_msg_t *m = port->stash.head;
        port->stash.head = m->next;
        if (m->h.gen == gen && m->h.src < world && m->h.src != rank) {
            s_queue_push(&c->pending, m);
        } else if (m->h.gen > gen) {
            s_queue_push(&keep, m);
        } else {
            c->st.stale_dropped++;
            s_msg_free(m);
        }
    }
    port->stash = keep;
    port->comm = c;
    *out = c;
    return SEMOE_OK;
fail:
    for (uint32_t r = 0; r < world; r++)
        if (c->dealers[r])
            zmq_close(c->dealers[r]);
    free(c->dealers);
    free(c->scratch);
    free(c);
    return rc;
}

void comm_destroy(comm_t **comm_p)
{
    comm_t *c = *comm_p;
    if (!c)
        return;
    /* A rank may finish a collective before its last messages have left (its peers still wait
     * for them): a healthy comm lets them go for up to COMM_LINGER_MS in the background; a
     * broken one drops them at once. */
    int linger = c->broken || atomic_load(&c->aborted) ? 0 : COMM_LINGER_MS;
    for (uint32_t r = 0; r < c->world; r++)
        if (c->dealers[r]) {
            zmq_setsockopt(c->dealers[r], ZMQ_LINGER, &linger, sizeof linger);
            zmq_close(c->dealers[r]);
        }
    if (c->port && c->port->comm == c)
        c->port->comm = NULL;
    s_queue_clear(&c->pending);
    free(c->dealers);
    free(c->scratch);
    free(c->bucket);
    free(c);
    *comm_p = NULL;
}

uint32_t comm_rank(const comm_t *c) { return c->rank; }
uint32_t comm_world(const comm_t *c) { return c->world; }
uint64_t comm_generation(const comm_t *c) { return c->gen; }
void comm_stats(const comm_t *c, comm_stats_t *out) { *out = c->st; }

void comm_abort(comm_t *c)
{
    atomic_store(&c->aborted, true);
}

/* --- sending and receiving ----------------------------------------------------------------- */

/* Queues [header][payload] to `peer`. The payload is copied into the message: the caller's
 * buffer may change as soon as this returns (a zero-copy send would have to outlive a dead
 * peer's queue). The DEALER's send queue is unbounded, so this never blocks. */
static semoe_rc s_send(comm_t *c, uint32_t peer, uint16_t op, uint32_t chunk, uint32_t nchunks,
                       uint64_t total, const void *data, size_t len)
{
    s_hdr_t h = {.op = op, .gen = c->gen, .src = c->rank, .seq = c->seq, .chunk = chunk,
                 .nchunks = nchunks, .total = total};
    uint8_t hdr[S_HDR_BYTES];
    s_hdr_encode(&h, hdr);
    zmq_msg_t body;
    if (zmq_msg_init_size(&body, len) != 0)
        return semoe_err(SEMOE_ENOMEM, "comm: %zu-byte message: %s", len,
                         zmq_strerror(zmq_errno()));
    if (len)
        memcpy(zmq_msg_data(&body), data, len);
    void *d = c->dealers[peer];
    if (zmq_send(d, hdr, sizeof hdr, ZMQ_SNDMORE | ZMQ_DONTWAIT) != (int)sizeof hdr ||
        zmq_msg_send(&body, d, ZMQ_DONTWAIT) == -1) {
        zmq_msg_close(&body);
        return semoe_err(SEMOE_EIO, "comm: send to rank %u: %s", peer, zmq_strerror(zmq_errno()));
    }
    c->st.msgs_sent++;
    c->st.bytes_sent += len;
    return SEMOE_OK;
}

/* Files one received message: fenced off, stashed for a newer generation, handed to the
 * running collective, or kept for a later one. */
static semoe_rc s_file(comm_t *c, zmq_msg_t *id, s_msg_t *m)
{
    const s_hdr_t *h = &m->h;
    if (h->gen < c->gen) {
        c->st.stale_dropped++;
        log_debug("comm: dropped a message of generation %llu from rank %u (this is %llu)",
                  (unsigned long long)h->gen, h->src, (unsigned long long)c->gen);
        s_msg_free(m);
        return SEMOE_OK;
    }
    char want[64];
    s_routing_id(h->gen, h->src, want, sizeof want);
    if (zmq_msg_size(id) != strlen(want) || memcmp(zmq_msg_data(id), want, strlen(want)) != 0 ||
        h->src >= S_MAX_WORLD) {
        c->st.malformed_dropped++; /* the header does not say who the connection is */
        s_msg_free(m);
        return SEMOE_OK;
    }
    if (h->gen > c->gen) {
        comm_port_t *p = c->port;
        if (p->stash.bytes + zmq_msg_size(&m->body) > COMM_STASH_MAX_BYTES) {
            log_warn("comm: dropped a message of generation %llu: %zu bytes already kept",
                     (unsigned long long)h->gen, p->stash.bytes);
            s_msg_free(m);
            return SEMOE_OK;
        }
        c->st.future_stashed++;
        s_queue_push(&p->stash, m);
        return SEMOE_OK;
    }
    if (h->src >= c->world || h->src == c->rank) {
        c->st.malformed_dropped++;
        s_msg_free(m);
        return SEMOE_OK;
    }
    if (h->seq < c->seq) { /* cannot happen between ranks that follow the protocol */
        c->st.stale_dropped++;
        s_msg_free(m);
        return SEMOE_OK;
    }
    c->st.msgs_recv++;
    c->st.bytes_recv += zmq_msg_size(&m->body);
    if (h->seq == c->seq && c->accept)
        return c->accept(c, c->accept_st, m);
    s_queue_push(&c->pending, m);
    return SEMOE_OK;
}

/* Reads one multipart message [routing id][header][payload] if one is there. *got is false
 * when the socket had nothing. */
static semoe_rc s_read_one(comm_t *c, bool *got)
{
    void *r = c->port->router;
    zmq_msg_t id, hdr;
    zmq_msg_init(&id);
    *got = false;
    if (zmq_msg_recv(&id, r, ZMQ_DONTWAIT) == -1) {
        zmq_msg_close(&id);
        if (zmq_errno() == EAGAIN || zmq_errno() == EINTR)
            return SEMOE_OK;
        return semoe_err(SEMOE_EIO, "comm: receive: %s", zmq_strerror(zmq_errno()));
    }
    *got = true;
    s_msg_t *m = semoe_xcalloc(1, sizeof *m);
    zmq_msg_init(&hdr);
    zmq_msg_init(&m->body);
    int parts = 1;
    bool more = zmq_msg_more(&id);
    if (more && zmq_msg_recv(&hdr, r, ZMQ_DONTWAIT) != -1) {
        parts++;
        more = zmq_msg_more(&hdr);
        if (more && zmq_msg_recv(&m->body, r, ZMQ_DONTWAIT) != -1) {
            parts++;
            more = zmq_msg_more(&m->body);
        }
    }
    while (more) { /* too many frames: drain the rest of the message */
        zmq_msg_t extra;
        zmq_msg_init(&extra);
        if (zmq_msg_recv(&extra, r, ZMQ_DONTWAIT) == -1)
            more = false;
        else
            more = zmq_msg_more(&extra);
        zmq_msg_close(&extra);
        parts++;
    }
    semoe_rc rc = SEMOE_OK;
    if (parts == 3 && s_hdr_decode(zmq_msg_data(&hdr), zmq_msg_size(&hdr), &m->h)) {
        rc = s_file(c, &id, m);
    } else {
        c->st.malformed_dropped++;
        s_msg_free(m);
    }
    zmq_msg_close(&hdr);
    zmq_msg_close(&id);
    return rc;
}

/* Waits at most until deadline (and at most one poll slice) for data, then files everything
 * that arrived (in bites). */
static semoe_rc s_pump(comm_t *c, int64_t deadline)
{
    int64_t wait = deadline - clock_mono_ms();
    if (wait < 0)
        wait = 0;
    if (wait > COMM_POLL_SLICE_MS)
        wait = COMM_POLL_SLICE_MS;
    zmq_pollitem_t it[2] = {{c->port->router, 0, ZMQ_POLLIN, 0},
                            {c->port->interrupt, 0, ZMQ_POLLIN, 0}};
    int rc = zmq_poll(it, c->port->interrupt ? 2 : 1, (long)wait);
    if (rc == -1 && zmq_errno() != EINTR)
        return semoe_err(SEMOE_EIO, "comm: zmq_poll: %s", zmq_strerror(zmq_errno()));
    if (rc > 0 && c->port->interrupt && (it[1].revents & ZMQ_POLLIN))
        c->interrupted = true;
    for (int k = 0; k < S_DRAIN_BITE; k++) {
        bool got;
        SEMOE_CHECK(s_read_one(c, &got));
        if (!got)
            break;
    }
    return SEMOE_OK;
}

/* One collective: its state, how it progresses and who it still waits for. */
typedef struct {
    const char *what;
    s_accept_fn accept;
    semoe_rc (*step)(comm_t *c, void *st, bool *done); /* local progress after arrivals */
    /* miss[r]: 2 = rank r's own input has not arrived, 1 = only what it forwards (it may be
     * waiting itself), 0 = nothing due from it. */
    void (*missing)(comm_t *c, void *st, uint8_t *miss);
    void *st;
} s_coll_t;

static semoe_rc s_run(comm_t *c, const s_coll_t *k, int timeout_ms)
{
    int64_t start = clock_mono_ms(), deadline = start + (timeout_ms < 0 ? 0 : timeout_ms);
    semoe_rc rc = SEMOE_OK;
    c->accept = k->accept;
    c->accept_st = k->st;
    /* Hand over what arrived early, in arrival order (a sender's chunks stay in order). */
    s_queue_t rest = {0};
    while (c->pending.head) {
        s_msg_t *m = c->pending.head;
        c->pending.head = m->next;
        if (m->h.seq != c->seq) {
            s_queue_push(&rest, m);
            continue;
        }
        if (rc == SEMOE_OK)
            rc = k->accept(c, k->st, m);
        else
            s_msg_free(m);
    }
    c->pending = rest;
    for (bool done = false; rc == SEMOE_OK;) {
        rc = k->step(c, k->st, &done);
        if (rc != SEMOE_OK || done)
            break;
        if (atomic_load(&c->aborted) || c->interrupted) {
            rc = semoe_err(SEMOE_ESTOPPED, "comm: %s (generation %llu, collective %u): %s",
                           k->what, (unsigned long long)c->gen, c->seq,
                           c->interrupted ? "interrupted by a message for this worker"
                                          : "aborted");
            break;
        }
        if (clock_mono_ms() >= deadline) {
            uint8_t *miss = semoe_xcalloc(c->world, sizeof *miss);
            k->missing(c, k->st, miss);
            char list[2][400];
            int shown[2] = {0, 0};
            for (int lvl = 0; lvl < 2; lvl++) {
                size_t len = 0;
                list[lvl][0] = 0;
                for (uint32_t r = 0; r < c->world && len < sizeof list[lvl] - 32; r++)
                    if (miss[r] == 2 - lvl)
                        len += (size_t)snprintf(list[lvl] + len, sizeof list[lvl] - len, "%s%u",
                                                shown[lvl]++ ? ", " : "", r);
            }
            free(miss);
            rc = semoe_err(SEMOE_ETIMEDOUT,
                           "comm: %s (generation %llu, collective %u, rank %u of %u): timed out "
                           "after %d ms waiting for rank(s) %s%s%s%s",
                           k->what, (unsigned long long)c->gen, c->seq, c->rank, c->world,
                           timeout_ms, shown[0] ? list[0] : "(none)",
                           shown[1] ? "; results from rank(s) " : "", shown[1] ? list[1] : "",
                           shown[1] ? " also due (they may be waiting too)" : "");
            break;
        }
        rc = s_pump(c, deadline);
    }
    c->accept = NULL;
    c->accept_st = NULL;
    if (rc == SEMOE_OK)
        c->seq++;
    else
        c->broken = true;
    return rc;
}

static semoe_rc s_usable(comm_t *c, const char *what)
{
    if (atomic_load(&c->aborted)) {
        c->broken = true;
        return semoe_err(SEMOE_ESTOPPED, "comm: %s: the communicator of generation %llu was "
                         "aborted", what, (unsigned long long)c->gen);
    }
    if (c->broken)
        return semoe_err(SEMOE_EPROTO, "comm: %s: the communicator of generation %llu is broken "
                         "by an earlier error: build the next one", what,
                         (unsigned long long)c->gen);
    if (!c->port)
        return semoe_err(SEMOE_EINVAL, "comm: %s: its data port was destroyed", what);
    return SEMOE_OK;
}

static semoe_rc s_wrong_op(comm_t *c, const s_msg_t *m, const char *running)
{
    uint16_t op = m->h.op;
    semoe_rc rc = semoe_err(SEMOE_EPROTO, "comm: rank %u sent %s for collective %u of generation "
                            "%llu, where this rank (%u) runs %s: ranks must call the same "
                            "collectives in the same order",
                            m->h.src, s_op_names[op < S_OP_END ? op : 0], m->h.seq,
                            (unsigned long long)c->gen, c->rank, running);
    return rc;
}

/* --- all-reduce ---------------------------------------------------------------------------- */

/* Segment j of n floats over w ranks: balanced, contiguous, in rank order. */
static size_t s_seg_off(size_t n, uint32_t w, uint32_t j)
{
    return (size_t)j * (n / w) + (j < n % w ? j : n % w);
}
static size_t s_seg_len(size_t n, uint32_t w, uint32_t j)
{
    return n / w + (j < n % w ? 1 : 0);
}
static uint32_t s_seg_chunks(size_t len)
{
    return (uint32_t)((len + S_CHUNK_FLOATS - 1) / S_CHUNK_FLOATS); /* 0 for an empty segment */
}

typedef struct {
    float *buf;
    size_t n;
    size_t own_off, own_len;
    uint32_t own_nch;
    s_msg_t **rs;      /* [world][own_nch]: contributions to this rank's segment */
    uint32_t *rs_next; /* by sender: reduce-scatter chunks received so far */
    uint32_t *have;    /* by chunk: contributions received */
    uint32_t next_red; /* next own chunk to reduce */
    uint32_t *ag_next; /* by sender: all-gather chunks received */
} s_ar_t;

static semoe_rc s_ar_accept(comm_t *c, void *stp, s_msg_t *m)
{
    s_ar_t *st = stp;
    const s_hdr_t *h = &m->h;
    semoe_rc rc = SEMOE_OK;
    size_t got = zmq_msg_size(&m->body);
    if (h->op == S_OP_AR_RS) {
        size_t total = st->own_len * sizeof(float);
        if (h->chunk != st->rs_next[h->src] || h->nchunks != st->own_nch ||
            h->total != total || got != s_chunk_bytes(total, h->chunk)) {
            rc = semoe_err(SEMOE_EPROTO, "comm: allreduce: rank %u sent chunk %u/%u of %llu "
                           "bytes (%zu here) where chunk %u/%u of %zu bytes was due: do all "
                           "ranks reduce the same n (%zu here)?",
                           h->src, h->chunk, h->nchunks, (unsigned long long)h->total, got,
                           st->rs_next[h->src], st->own_nch, total, st->n);
        } else {
            st->rs[(size_t)h->src * st->own_nch + h->chunk] = m;
            st->rs_next[h->src]++;
            st->have[h->chunk]++;
            return SEMOE_OK;
        }
    } else if (h->op == S_OP_AR_AG) {
        size_t len = s_seg_len(st->n, c->world, h->src), total = len * sizeof(float);
        uint32_t nch = s_seg_chunks(len);
        if (h->chunk != st->ag_next[h->src] || h->nchunks != nch || h->total != total ||
            got != s_chunk_bytes(total, h->chunk)) {
            rc = semoe_err(SEMOE_EPROTO, "comm: allreduce: rank %u sent result chunk %u/%u of "
                           "%llu bytes (%zu here) where chunk %u/%u of %zu bytes was due",
                           h->src, h->chunk, h->nchunks, (unsigned long long)h->total, got,
                           st->ag_next[h->src], nch, total);
        } else {
            float *dst = st->buf + s_seg_off(st->n, c->world, h->src) +
                         (size_t)h->chunk * S_CHUNK_FLOATS;
            memcpy(dst, zmq_msg_data(&m->body), got);
            st->ag_next[h->src]++;
        }
    } else {
        rc = s_wrong_op(c, m, "allreduce");
    }
    s_msg_free(m);
    return rc;
}

/* out[i] += x[i]; x may be unaligned (libzmq hands out payloads inside its receive buffer). */
static void s_add(float *restrict out, const unsigned char *restrict x, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        float v;
        memcpy(&v, x + i * sizeof v, sizeof v);
        out[i] += v;
    }
}

static semoe_rc s_ar_step(comm_t *c, void *stp, bool *done)
{
    s_ar_t *st = stp;
    uint32_t w = c->world, me = c->rank;
    while (st->next_red < st->own_nch && st->have[st->next_red] == w - 1) {
        uint32_t ch = st->next_red;
        float *out = st->buf + st->own_off + (size_t)ch * S_CHUNK_FLOATS;
        size_t bytes = s_chunk_bytes(st->own_len * sizeof(float), ch), len = bytes / sizeof(float);
        s_msg_t **from = st->rs + ch;
        /* ((x0 + x1) + x2) + ...: keep this rank's contribution aside, start from rank 0's. */
        if (me != 0) {
            memcpy(c->scratch, out, bytes);
            memcpy(out, zmq_msg_data(&from[0]->body), bytes);
        }
        for (uint32_t r = 1; r < w; r++) {
            const void *x = r == me ? (const void *)c->scratch
                                    : zmq_msg_data(&from[(size_t)r * st->own_nch]->body);
            s_add(out, x, len);
        }
        for (uint32_t r = 0; r < w; r++) {
            if (r == me)
                continue;
            s_msg_free(from[(size_t)r * st->own_nch]);
            from[(size_t)r * st->own_nch] = NULL;
        }
        for (uint32_t r = 0; r < w; r++)
            if (r != me)
                SEMOE_CHECK(s_send(c, r, S_OP_AR_AG, ch, st->own_nch,
                                   st->own_len * sizeof(float), out, bytes));
        st->next_red++;
    }
    *done = st->next_red == st->own_nch;
    for (uint32_t r = 0; r < w && *done; r++)
        if (r != me && st->ag_next[r] < s_seg_chunks(s_seg_len(st->n, w, r)))
            *done = false;
    return SEMOE_OK;
}

static void s_ar_missing(comm_t *c, void *stp, uint8_t *miss)
{
    s_ar_t *st = stp;
    for (uint32_t r = 0; r < c->world; r++)
        miss[r] = r == c->rank                      ? 0
                  : st->rs_next[r] < st->own_nch    ? 2
                  : st->ag_next[r] < s_seg_chunks(s_seg_len(st->n, c->world, r)) ? 1
                                                                                  : 0;
}

semoe_rc comm_allreduce_sum(comm_t *c, float *buf, size_t n, int timeout_ms)
{
    SEMOE_CHECK(s_usable(c, "allreduce"));
    uint32_t w = c->world, me = c->rank;
    if (w == 1) {
        c->seq++;
        return SEMOE_OK;
    }
    s_ar_t st = {.buf = buf, .n = n};
    st.own_off = s_seg_off(n, w, me);
    st.own_len = s_seg_len(n, w, me);
    st.own_nch = s_seg_chunks(st.own_len);
    st.rs = semoe_xcalloc((size_t)w * (st.own_nch ? st.own_nch : 1), sizeof *st.rs);
    st.rs_next = semoe_xcalloc(w, sizeof *st.rs_next);
    st.have = semoe_xcalloc(st.own_nch ? st.own_nch : 1, sizeof *st.have);
    st.ag_next = semoe_xcalloc(w, sizeof *st.ag_next);
    semoe_rc rc = SEMOE_OK;
    /* Reduce-scatter: every peer's segment goes to it, chunk by chunk, round robin over peers
     * so that they all start receiving at once. */
    uint32_t maxch = 0;
    for (uint32_t r = 0; r < w; r++)
        if (s_seg_chunks(s_seg_len(n, w, r)) > maxch)
            maxch = s_seg_chunks(s_seg_len(n, w, r));
    for (uint32_t ch = 0; ch < maxch && rc == SEMOE_OK; ch++) {
        for (uint32_t k = 1; k < w && rc == SEMOE_OK; k++) {
            uint32_t r = (me + k) % w;
            size_t len = s_seg_len(n, w, r), total = len * sizeof(float);
            uint32_t nch = s_seg_chunks(len);
            if (ch >= nch)
                continue;
            rc = s_send(c, r, S_OP_AR_RS, ch, nch, total,
                        buf + s_seg_off(n, w, r) + (size_t)ch * S_CHUNK_FLOATS,
                        s_chunk_bytes(total, ch));
        }
    }
    if (rc == SEMOE_OK) {
        s_coll_t k = {"allreduce", s_ar_accept, s_ar_step, s_ar_missing, &st};
        rc = s_run(c, &k, timeout_ms);
    } else {
        c->broken = true;
    }
    for (size_t i = 0; i < (size_t)w * st.own_nch; i++)
        s_msg_free(st.rs[i]);
    free(st.rs);
    free(st.rs_next);
    free(st.have);
    free(st.ag_next);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

/* --- all-to-all ---------------------------------------------------------------------------- */

typedef struct {
    s_queue_t *from;   /* by sender: its chunks in order */
    uint32_t *next;    /* by sender: chunks received */
    uint32_t *nch;     /* by sender: chunks announced (0 until the first arrives) */
    uint64_t *total;   /* by sender: bytes announced */
    size_t announced;  /* sum of totals announced, self included */
    size_t cap;
    uint32_t complete; /* senders done */
} s_a2a_t;

static semoe_rc s_a2a_accept(comm_t *c, void *stp, s_msg_t *m)
{
    s_a2a_t *st = stp;
    const s_hdr_t *h = &m->h;
    uint32_t s = h->src;
    size_t got = zmq_msg_size(&m->body);
    semoe_rc rc = SEMOE_OK;
    if (h->op != S_OP_A2A) {
        rc = s_wrong_op(c, m, "alltoallv");
    } else if (st->next[s] == 0 && h->chunk == 0) {
        if (h->total > st->cap - st->announced)
            rc = semoe_err(SEMOE_EINVAL, "comm: alltoallv: rank %u sends %llu bytes but only %zu "
                           "of recv_cap %zu are left: raise recv_cap",
                           s, (unsigned long long)h->total, st->cap - st->announced, st->cap);
        else if (h->nchunks != s_nchunks(h->total))
            rc = semoe_err(SEMOE_EPROTO, "comm: alltoallv: rank %u announced %u chunks for %llu "
                           "bytes", s, h->nchunks, (unsigned long long)h->total);
        st->nch[s] = h->nchunks;
        st->total[s] = h->total;
        st->announced += rc == SEMOE_OK ? h->total : 0;
    } else if (h->chunk != st->next[s] || h->nchunks != st->nch[s] || h->total != st->total[s]) {
        rc = semoe_err(SEMOE_EPROTO, "comm: alltoallv: rank %u sent chunk %u/%u of %llu bytes "
                       "where chunk %u/%u of %llu was due", s, h->chunk, h->nchunks,
                       (unsigned long long)h->total, st->next[s], st->nch[s],
                       (unsigned long long)st->total[s]);
    }
    if (rc == SEMOE_OK && got != s_chunk_bytes(h->total, h->chunk))
        rc = semoe_err(SEMOE_EPROTO, "comm: alltoallv: rank %u sent %zu bytes in chunk %u of %llu",
                       s, got, h->chunk, (unsigned long long)h->total);
    if (rc != SEMOE_OK) {
        s_msg_free(m);
        return rc;
    }
    s_queue_push(&st->from[s], m);
    if (++st->next[s] == st->nch[s])
        st->complete++;
    return SEMOE_OK;
}

static semoe_rc s_a2a_step(comm_t *c, void *stp, bool *done)
{
    s_a2a_t *st = stp;
    *done = st->complete == c->world - 1;
    return SEMOE_OK;
}

static void s_a2a_missing(comm_t *c, void *stp, uint8_t *miss)
{
    s_a2a_t *st = stp;
    for (uint32_t r = 0; r < c->world; r++)
        miss[r] = r != c->rank && (st->nch[r] == 0 || st->next[r] < st->nch[r]) ? 2 : 0;
}

semoe_rc comm_alltoallv(comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                        size_t *recv_bytes, size_t recv_cap, int timeout_ms)
{
    SEMOE_CHECK(s_usable(c, "alltoallv"));
    uint32_t w = c->world, me = c->rank;
    const unsigned char *src = send;
    size_t self_off = 0;
    for (uint32_t r = 0; r < me; r++)
        self_off += send_bytes[r];
    if (send_bytes[me] > recv_cap) {
        c->broken = true;
        return semoe_err(SEMOE_EINVAL, "comm: alltoallv: %zu bytes to self exceed recv_cap %zu",
                         send_bytes[me], recv_cap);
    }
    s_a2a_t st = {.cap = recv_cap, .announced = send_bytes[me]};
    st.from = semoe_xcalloc(w, sizeof *st.from);
    st.next = semoe_xcalloc(w, sizeof *st.next);
    st.nch = semoe_xcalloc(w, sizeof *st.nch);
    st.total = semoe_xcalloc(w, sizeof *st.total);
    semoe_rc rc = SEMOE_OK;
    /* Chunk by chunk, round robin over peers. */
    size_t *off = semoe_xcalloc(w, sizeof *off);
    uint32_t maxch = 0;
    for (uint32_t r = 0; r < w; r++) {
        off[r] = r ? off[r - 1] + send_bytes[r - 1] : 0;
        if (r != me && s_nchunks(send_bytes[r]) > maxch)
            maxch = s_nchunks(send_bytes[r]);
    }
    for (uint32_t ch = 0; ch < maxch && rc == SEMOE_OK; ch++) {
        for (uint32_t k = 1; k < w && rc == SEMOE_OK; k++) {
            uint32_t r = (me + k) % w;
            uint32_t nch = s_nchunks(send_bytes[r]);
            if (ch < nch)
                rc = s_send(c, r, S_OP_A2A, ch, nch, send_bytes[r],
                            src + off[r] + (size_t)ch * COMM_CHUNK_BYTES,
                            s_chunk_bytes(send_bytes[r], ch));
        }
    }
    free(off);
    if (rc == SEMOE_OK) {
        s_coll_t k = {"alltoallv", s_a2a_accept, s_a2a_step, s_a2a_missing, &st};
        rc = s_run(c, &k, timeout_ms);
    } else {
        c->broken = true;
    }
    if (rc == SEMOE_OK) { /* lay out in rank order */
        unsigned char *dst = recv;
        for (uint32_t r = 0; r < w; r++) {
            if (r == me) {
                if (send_bytes[me])
                    memcpy(dst, src + self_off, send_bytes[me]);
                recv_bytes[r] = send_bytes[me];
                dst += send_bytes[me];
                continue;
            }
            recv_bytes[r] = st.total[r];
            for (s_msg_t *m = st.from[r].head; m; m = m->next) {
                size_t len = zmq_msg_size(&m->body);
                if (len)
                    memcpy(dst, zmq_msg_data(&m->body), len);
                dst += len;
            }
        }
    }
    for (uint32_t r = 0; r < w; r++)
        s_queue_clear(&st.from[r]);
    free(st.from);
    free(st.next);
    free(st.nch);
    free(st.total);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

/* --- barrier ------------------------------------------------------------------------------- */

typedef struct {
    bool *got;
    uint32_t count;
} s_bar_t;

static semoe_rc s_bar_accept(comm_t *c, void *stp, s_msg_t *m)
{
    s_bar_t *st = stp;
    semoe_rc rc = SEMOE_OK;
    if (m->h.op != S_OP_BARRIER)
        rc = s_wrong_op(c, m, "barrier");
    else if (st->got[m->h.src] || zmq_msg_size(&m->body) != 0)
        rc = semoe_err(SEMOE_EPROTO, "comm: barrier: rank %u sent twice or with a payload",
                       m->h.src);
    else {
        st->got[m->h.src] = true;
        st->count++;
    }
    s_msg_free(m);
    return rc;
}

static semoe_rc s_bar_step(comm_t *c, void *stp, bool *done)
{
    *done = ((s_bar_t *)stp)->count == c->world - 1;
    return SEMOE_OK;
}

static void s_bar_missing(comm_t *c, void *stp, uint8_t *miss)
{
    s_bar_t *st = stp;
    for (uint32_t r = 0; r < c->world; r++)
        miss[r] = r != c->rank && !st->got[r] ? 2 : 0;
}

semoe_rc comm_barrier(comm_t *c, int timeout_ms)
{
    SEMOE_CHECK(s_usable(c, "barrier"));
    s_bar_t st = {.got = semoe_xcalloc(c->world, sizeof(bool))};
    semoe_rc rc = SEMOE_OK;
    for (uint32_t k = 1; k < c->world && rc == SEMOE_OK; k++)
        rc = s_send(c, (c->rank + k) % c->world, S_OP_BARRIER, 0, 1, 0, NULL, 0);
    if (rc == SEMOE_OK) {
        s_coll_t k = {"barrier", s_bar_accept, s_bar_step, s_bar_missing, &st};
        rc = s_run(c, &k, timeout_ms);
    } else {
        c->broken = true;
    }
    free(st.got);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

/* --- fused buckets ------------------------------------------------------------------------- */

/* Copies `count` floats between the bucket and the tensors, starting at tensor *t offset *off,
 * and advances (*t, *off). pack: tensors -> bucket; else bucket -> tensors. */
static void s_bucket_move(float *bucket, size_t count, float *const *bufs, const size_t *lens,
                          int n, int *t, size_t *off, bool pack)
{
    size_t done = 0;
    while (done < count && *t < n) {
        size_t take = lens[*t] - *off;
        if (take > count - done)
            take = count - done;
        if (pack)
            memcpy(bucket + done, bufs[*t] + *off, take * sizeof(float));
        else
            memcpy(bufs[*t] + *off, bucket + done, take * sizeof(float));
        done += take;
        *off += take;
        if (*off == lens[*t]) {
            (*t)++;
            *off = 0;
        }
    }
}

semoe_rc comm_allreduce_buckets(comm_t *c, float *const *bufs, const size_t *lens, int n,
                                size_t bucket_bytes, int timeout_ms)
{
    SEMOE_CHECK(s_usable(c, "allreduce_buckets"));
    size_t cap = bucket_bytes / sizeof(float);
    if (cap == 0)
        cap = 1;
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += lens[i];
    if (total < cap)
        cap = total ? total : 1;
    if (cap > c->bucket_cap) {
        free(c->bucket);
        c->bucket = semoe_xmalloc(cap * sizeof(float));
        c->bucket_cap = cap;
    }
    int t = 0, ut = 0;
    size_t off = 0, uoff = 0;
    for (size_t left = total; left > 0;) {
        size_t fill = left < cap ? left : cap;
        s_bucket_move(c->bucket, fill, bufs, lens, n, &t, &off, true);
        SEMOE_CHECK(comm_allreduce_sum(c, c->bucket, fill, timeout_ms));
        s_bucket_move(c->bucket, fill, bufs, lens, n, &ut, &uoff, false);
        left -= fill;
    }
    return SEMOE_OK;
}
