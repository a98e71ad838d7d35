/* Expert parallelism over the CPU collectives (worker/exchange.h): dispatch and combine of an
 * MoE layer's expert rows as one comm_alltoallv each, messages [E int32 counts][rows], and the
 * global sum of the loss statistics. With a direct transport (worker_exchange_set_xfer; NCCL's,
 * worker_exchange_set_nccl), the rows go straight between the graph's buffers instead: the
 * counts first, over the comm (the host needs them to lay the rows out), then one group of
 * sends and receives, a chunk per (peer, expert). */
#include "worker/exchange.h"

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"

struct worker_exchange {
    comm_t *comm;
    const model_backend_f32_t *be;
    int L, E, W, me, timeout_ms;
    uint32_t *hoff;   /* (L*E + 1) expert e's holders: hold[hoff[e] .. hoff[e+1]) */
    uint32_t *hold;   /* ranks, ascending per expert */
    bool *mine;       /* (L*E) whether this rank holds expert e */
    int32_t *cnt;     /* (L, W, E) rows of expert j from rank s in layer l's last dispatch */
    int32_t *sent;    /* (L, E) this rank's send_counts in layer l's last dispatch */
    int32_t *to;      /* (L, E, W) of those, the rows of expert e that went to rank r */
    float *rows;      /* host copy of the rows handed in by the graph */
    size_t rows_cap;  /* bytes */
    float *out;       /* host rows regrouped for the graph */
    size_t out_cap;
    uint8_t *smsg, *rmsg; /* packed messages, in rank order */
    size_t smsg_cap, rmsg_cap;
    size_t *sbytes, *rbytes; /* (W) */
    uint64_t *acc;    /* (L, E) rows received per expert by dispatch since the last take */
    uint64_t *routed; /* (L, E) rows this rank's dispatches sent per expert, since then */
    worker_exchange_traffic_t traffic; /* since the last take */
    worker_xfer_t xfer; /* run NULL: the rows go through the host and the comm */
    worker_xfer_op_t *ops;
    size_t ops_cap;   /* bytes */
    /* the direct path in two hops (worker_exchange_set_hosts): H hosts of G ranks each */
    int H, G;         /* H 0: one hop */
    int *host, *lidx; /* (W) each rank's host and index among its host's ranks */
    int *at;          /* (H, G) the rank of (host, index) */
    int32_t *stage;   /* (L, G, H, E) rows the rank of my host with index g sends through me to
                       * host h's rank of my index, per expert (g = mine: my own) */
    size_t *rp;       /* (E, W) where sender s's rows of expert e start in dispatch's recv */
    size_t *soff;     /* (H, G, E) where they sit in the staging buffer */
    float *stg;       /* the staging buffer, the backend's memory */
    size_t stg_cap;   /* floats */
    /* A layer's rows may go in parts (model_exchange_f32's part), several dispatched before the
     * first is combined: each part's records (cnt, sent, to, stage) are kept here after its
     * dispatch and put back before its combine. */
    int P;            /* parts with room */
    int32_t *pcnt, *psent, *pto, *pstage; /* (P, L, record) */
    uint8_t *pdone;   /* (P, L) whether the part's dispatch stored its records */
    int *nparts;      /* (L) parts dispatched since the layer's last part 0 */
    /* (P, L) on the direct path, a part whose counts a dispatch with recv NULL announced (its
     * records kept): the rows' call for it skips the counts' exchange */
    uint8_t *announced;
#if SEMOE_HAVE_CUDA
    gpu_nccl_t *nccl; /* not owned: the xfer's, and the replicas' sums */
    float *zero;      /* device zeros standing in for replicated tensors not held here */
    size_t zero_cap;  /* floats */
    /* the replicas' sums layer by layer during backward (worker_exchange_sum_replicas_layer) */
    int bylayer;      /* -1: not decided yet for this exchange; 0: after backward; 1: by layer */
    bool *rstarted;   /* (L) layers whose sums this step's backward started */
    float *lzero;     /* zeros for every layer's tensors not held here, a region per layer */
    size_t *loff;     /* (L + 1) the regions */
#endif
};

static void *s_reserve(void *p, size_t *cap, size_t need)
{
    if (need <= *cap && p)
        return p;
    free(p);
    *cap = need > *cap * 2 ? need : *cap * 2;
    return semoe_xmalloc(*cap ? *cap : 1);
}

semoe_rc worker_exchange_new(comm_t *comm, const model_backend_f32_t *be, int L, int E,
                             const uint32_t *holder_off, const uint32_t *holders, int timeout_ms,
                             worker_exchange_t **out)
{
    *out = NULL;
    int W = (int)comm_world(comm);
    if (L < 0 || E < 1)
        return semoe_err(SEMOE_EINVAL, "exchange: %d layers of %d experts: need E >= 1", L, E);
    size_t le = (size_t)L * E;
    if (holder_off[0] != 0)
        return semoe_err(SEMOE_EINVAL, "exchange: holder offsets start at %u", holder_off[0]);
    for (size_t e = 0; e < le; e++) {
        uint32_t lo = holder_off[e], hi = holder_off[e + 1];
        if (hi <= lo || hi - lo > (uint32_t)W)
            return semoe_err(SEMOE_EINVAL, "exchange: expert %zu of layer %zu has %d holders: "
                             "need 1 to %d", e % (size_t)E, e / (size_t)E, (int)(hi - lo), W);
        for (uint32_t i = lo; i < hi; i++)
            if (holders[i] >= (uint32_t)W || (i > lo && holders[i] <= holders[i - 1]))
                return semoe_err(SEMOE_EINVAL, "exchange: expert %zu of layer %zu placed on "
                                 "rank %u: need distinct ascending ranks 0..%d", e % (size_t)E,
                                 e / (size_t)E, holders[i], W - 1);
    }
    worker_exchange_t *x = semoe_xcalloc(1, sizeof *x);
    x->comm = comm;
    x->be = be;
    x->L = L;
    x->E = E;
    x->W = W;
    x->me = (int)comm_rank(comm);
    x->timeout_ms = timeout_ms;
    x->hoff = semoe_xmalloc((le + 1) * sizeof *x->hoff);
    memcpy(x->hoff, holder_off, (le + 1) * sizeof *x->hoff);
    x->hold = semoe_xmalloc((holder_off[le] + 1) * sizeof *x->hold);
    memcpy(x->hold, holders, holder_off[le] * sizeof *x->hold);
    x->mine = semoe_xcalloc(le + 1, sizeof *x->mine);
    for (size_t e = 0; e < le; e++)
        for (uint32_t i = holder_off[e]; i < holder_off[e + 1]; i++)
            x->mine[e] = x->mine[e] || holders[i] == (uint32_t)x->me;
    x->cnt = semoe_xcalloc(le * W + 1, sizeof(int32_t));
    x->to = semoe_xcalloc(le * W + 1, sizeof(int32_t));
    x->acc = semoe_xcalloc(le + 1, sizeof(uint64_t));
    x->routed = semoe_xcalloc(le + 1, sizeof(uint64_t));
    x->sent = semoe_xcalloc(le + 1, sizeof(int32_t));
    x->sbytes = semoe_xcalloc((size_t)W, sizeof(size_t));
    x->rbytes = semoe_xcalloc((size_t)W, sizeof(size_t));
#if SEMOE_HAVE_CUDA
    x->bylayer = -1;
#endif
    x->nparts = semoe_xcalloc((size_t)L + 1, sizeof(int));
    *out = x;
    return SEMOE_OK;
}

void worker_exchange_destroy(worker_exchange_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    worker_exchange_t *x = *self_p;
    free(x->hoff);
    free(x->hold);
    free(x->mine);
    free(x->pcnt), free(x->psent), free(x->pto), free(x->pstage), free(x->pdone);
    free(x->announced);
    free(x->nparts);
    free(x->cnt);
    free(x->to);
    free(x->acc);
    free(x->routed);
    free(x->sent);
    free(x->rows);
    free(x->out);
    free(x->smsg);
    free(x->rmsg);
    free(x->sbytes);
    free(x->rbytes);
    free(x->ops);
    free(x->host);
    free(x->lidx);
    free(x->at);
    free(x->stage);
    free(x->rp);
    free(x->soff);
    if (x->stg)
        x->be->free(x->stg);
#if SEMOE_HAVE_CUDA
    if (x->zero)
        x->be->free(x->zero);
    if (x->lzero)
        x->be->free(x->lzero);
    free(x->rstarted);
    free(x->loff);
#endif
    free(x);
    *self_p = NULL;
}

void worker_exchange_take(worker_exchange_t *x, uint64_t *rows_in, uint64_t *rows_out,
                          worker_exchange_traffic_t *traffic)
{
    size_t n = (size_t)x->L * x->E;
    if (rows_in)
        memcpy(rows_in, x->acc, n * sizeof *rows_in);
    if (rows_out)
        memcpy(rows_out, x->routed, n * sizeof *rows_out);
    memset(x->acc, 0, n * sizeof *x->acc);
    memset(x->routed, 0, n * sizeof *x->routed);
    if (traffic)
        *traffic = x->traffic;
    memset(&x->traffic, 0, sizeof x->traffic);
}

int64_t worker_exchange_received(const worker_exchange_t *x, int layer, int j)
{
    if (layer < 0 || layer >= x->L || j < 0 || j >= x->E)
        return 0;
    int64_t n = 0;
    for (int p = 0; p < x->nparts[layer]; p++) {
        size_t rec = (size_t)p * x->L + (size_t)layer;
        if (!x->pdone[rec])
            continue;
        for (int s = 0; s < x->W; s++)
            n += x->pcnt[(rec * x->W + s) * x->E + j];
    }
    return n;
}

/* --- parts ----------------------------------------------------------------------------- */

/* The sizes (int32s) of one layer's records: cnt, sent, to, stage. */
static void s_rec_sizes(const worker_exchange_t *x, size_t sz[4])
{
    size_t W = (size_t)x->W, E = (size_t)x->E;
    sz[0] = W * E, sz[1] = E, sz[2] = E * W, sz[3] = x->H ? (size_t)x->G * x->H * E : 0;
}

/* Room for part `part`'s records. */
static void s_parts_reserve(worker_exchange_t *x, int part)
{
    if (part < x->P)
        return;
    size_t sz[4], L = (size_t)x->L, P = (size_t)part + 1, old = (size_t)x->P;
    s_rec_sizes(x, sz);
    int32_t **arr[4] = {&x->pcnt, &x->psent, &x->pto, &x->pstage};
    for (int i = 0; i < 4; i++) {
        *arr[i] = semoe_xrealloc(*arr[i], (P * L * sz[i] + 1) * sizeof(int32_t));
        memset(*arr[i] + old * L * sz[i], 0, (P - old) * L * sz[i] * sizeof(int32_t));
    }
    x->pdone = semoe_xrealloc(x->pdone, P * L + 1);
    memset(x->pdone + old * L, 0, (P - old) * L);
    x->announced = semoe_xrealloc(x->announced, P * L + 1);
    memset(x->announced + old * L, 0, (P - old) * L);
    x->P = (int)P;
}

/* Copies layer's records to (store) or from part `part`'s slot. */
static void s_part_copy(worker_exchange_t *x, int layer, int part, bool store)
{
    size_t sz[4], rec = (size_t)part * x->L + (size_t)layer;
    s_rec_sizes(x, sz);
    int32_t *live[4] = {x->cnt, x->sent, x->to, x->stage};
    int32_t *kept[4] = {x->pcnt, x->psent, x->pto, x->pstage};
    for (int i = 0; i < 4; i++) {
        if (!sz[i])
            continue;
        int32_t *a = live[i] + (size_t)layer * sz[i], *b = kept[i] + rec * sz[i];
        memcpy(store ? b : a, store ? a : b, sz[i] * sizeof(int32_t));
    }
}

/* After part `part` of layer's dispatch: its records kept (a part 0 starts the layer's series). */
static void s_part_store(worker_exchange_t *x, int layer, int part)
{
    s_parts_reserve(x, part);
    if (part == 0) {
        for (int p = 1; p < x->P; p++)
            x->pdone[(size_t)p * x->L + (size_t)layer] = 0;
        x->nparts[layer] = 0;
    }
    s_part_copy(x, layer, part, true);
    x->pdone[(size_t)part * x->L + (size_t)layer] = 1;
    if (x->nparts[layer] < part + 1)
        x->nparts[layer] = part + 1;
}

/* Before part `part` of layer's combine: its dispatch's records back in place. */
static semoe_rc s_part_load(worker_exchange_t *x, int layer, int part)
{
    if (layer < 0 || layer >= x->L || part < 0 || part >= x->P ||
        !x->pdone[(size_t)part * x->L + (size_t)layer])
        return semoe_err(SEMOE_EINVAL, "exchange combine: layer %d part %d: no dispatch of it "
                         "to reverse", layer, part);
    s_part_copy(x, layer, part, false);
    return SEMOE_OK;
}

/* Forgets every part's records (the hosts changed the record layout). */
static void s_parts_reset(worker_exchange_t *x)
{
    free(x->pcnt), free(x->psent), free(x->pto), free(x->pstage), free(x->pdone);
    free(x->announced);
    x->pcnt = x->psent = x->pto = x->pstage = NULL;
    x->pdone = x->announced = NULL;
    x->P = 0;
    memset(x->nparts, 0, (size_t)x->L * sizeof(int));
}

static semoe_rc s_check_call(const worker_exchange_t *x, const char *what, int layer, int E,
                             int D, const int32_t *counts)
{
    if (layer < 0 || layer >= x->L || E != x->E || D < 1)
        return semoe_err(SEMOE_EINVAL,
                         "exchange %s: layer %d of %d, %d experts (placement has %d), D %d",
                         what, layer, x->L, E, x->E, D);
    for (int e = 0; e < E; e++)
        if (counts[e] < 0)
            return semoe_err(SEMOE_EINVAL, "exchange %s: layer %d: %d rows for expert %d",
                             what, layer, counts[e], e);
    return SEMOE_OK;
}

/* Moves the packed messages; afterwards rmsg holds rbytes[s] bytes from each rank s. */
static semoe_rc s_alltoallv(worker_exchange_t *x, size_t recv_cap)
{
    x->rmsg = s_reserve(x->rmsg, &x->rmsg_cap, recv_cap);
    int64_t t0 = clock_mono_us();
    semoe_rc rc = comm_alltoallv(x->comm, x->smsg, x->sbytes, x->rmsg, x->rbytes, recv_cap,
                                 x->timeout_ms);
    x->traffic.seconds += (double)(clock_mono_us() - t0) / 1e6;
    return rc;
}

/* The header of rank s's message in rmsg (at byte offset off), checked: at least the header,
 * then exactly the rows it announces. */
static semoe_rc s_header(const worker_exchange_t *x, const char *what, int layer, int s,
                         size_t off, int D, int32_t *counts, int64_t *rows)
{
    size_t hb = (size_t)x->E * sizeof(int32_t);
    if (x->rbytes[s] < hb)
        return semoe_err(SEMOE_EPROTO, "exchange %s: layer %d: %zu bytes from rank %d: less "
                         "than the %zu-byte header", what, layer, x->rbytes[s], s, hb);
    memcpy(counts, x->rmsg + off, hb);
    int64_t n = 0;
    for (int e = 0; e < x->E; e++) {
        if (counts[e] < 0)
            return semoe_err(SEMOE_EPROTO, "exchange %s: layer %d: rank %d announces %d rows "
                             "of expert %d", what, layer, s, counts[e], e);
        n += counts[e];
    }
    if (x->rbytes[s] != hb + (size_t)n * D * sizeof(float))
        return semoe_err(SEMOE_EPROTO, "exchange %s: layer %d: rank %d sent %zu bytes for %lld "
                         "rows of %d floats", what, layer, s, x->rbytes[s], (long long)n, D);
    *rows = n;
    return SEMOE_OK;
}

/* How this rank's c rows of expert e split over its k holders: cut in k contiguous chunks, the
 * first c % k one row longer, chunk i to holder (i + me) % k of the list, so that the longer
 * chunks of different senders land on different replicas. Fills to[r] (W entries, zeroed
 * first) with the rows rank r gets. */
static void s_split(const worker_exchange_t *x, size_t e, int32_t c, int32_t *to)
{
    uint32_t lo = x->hoff[e], k = x->hoff[e + 1] - lo;
    memset(to, 0, (size_t)x->W * sizeof *to);
    for (uint32_t i = 0; i < k; i++)
        to[x->hold[lo + (i + (uint32_t)x->me) % k]] = c / (int32_t)k + ((int32_t)i < c % (int32_t)k);
}

/* Rows of this rank's expert-e rows that precede the chunk for rank r (to as s_split fills it,
 * chunks in the order of s_split). */
static int32_t s_chunk_start(const worker_exchange_t *x, size_t e, const int32_t *to, int r)
{
    uint32_t lo = x->hoff[e], k = x->hoff[e + 1] - lo;
    int32_t before = 0;
    for (uint32_t i = 0; i < k; i++) {
        uint32_t h = x->hold[lo + (i + (uint32_t)x->me) % k];
        if (h == (uint32_t)r)
            return before;
        before += to[h];
    }
    return before;
}

/* Room for n transfers. */
static worker_xfer_op_t *s_ops(worker_exchange_t *x, size_t n)
{
    x->ops = s_reserve(x->ops, &x->ops_cap, n * sizeof *x->ops);
    return x->ops;
}

/* Runs the n transfers of x->ops through the transport, which waits for them (bounded: a dead
 * peer is an error here, not a hang in the graph's next kernel). */
static semoe_rc s_transfer(worker_exchange_t *x, int n)
{
    int64_t t0 = clock_mono_us();
    semoe_rc rc = x->xfer.run(x->xfer.state, x->ops, n, x->timeout_ms);
    x->traffic.seconds += (double)(clock_mono_us() - t0) / 1e6;
    return rc;
}

/* Appends to ops, for every other rank r and then every expert e (the order that rank lists
 * its transfers with this one in), this rank's chunk of e's rows for r, its rows laid out from
 * start[e] (layer `base`'s splits): sent from send, or received into recv. Returns the new
 * count; adds the rows to *rows (NULL: not counted). */
static int s_own_chunks(const worker_exchange_t *x, size_t base, const size_t *start, int D,
                        const float *send, float *recv, worker_xfer_op_t *ops, int n,
                        uint64_t *rows)
{
    const int W = x->W, E = x->E;
    const int32_t *to = x->to + base * W;
    for (int r = 0; r < W; r++)
        for (int e = 0; e < E && r != x->me; e++) {
            const int32_t *te = to + (size_t)e * W;
            if (te[r] == 0)
                continue;
            size_t first = start[e] + (size_t)s_chunk_start(x, base + e, te, r);
            size_t bytes = (size_t)te[r] * D * sizeof(float);
            ops[n++] = send ? (worker_xfer_op_t){r, send + first * D, NULL, bytes}
                            : (worker_xfer_op_t){r, NULL, recv + first * D, bytes};
            if (rows)
                *rows += (uint64_t)te[r];
        }
    return n;
}

/* --- the direct path in two hops --------------------------------------------------------
 * Hosts of G ranks each. A rank's rows for a rank of another host go first to the rank of its
 * own host with the destination's index (the gateway: maybe itself), which sends on everything
 * its host has for that destination in one go; rows within a host go straight. Dispatch: hop
 * one within hosts (direct rows, and rows to stage at the gateway), hop two across hosts (the
 * staged rows, by original sender and expert). Combine reverses it. Every chunk lands where the
 * one-hop path puts it. */

/* From the counts message of rank s of my host (hdr: E counts for me, then, when s is not me,
 * E counts for each other host's rank of my index): what s stages at me, per host and expert;
 * my own from to. */
static semoe_rc s_take_stage(worker_exchange_t *x, int layer, int s, const int32_t *to,
                             const int32_t *hdr)
{
    const int H = x->H, G = x->G, E = x->E, W = x->W, me = x->me;
    int32_t *st = x->stage + (((size_t)layer * G + (size_t)x->lidx[s]) * H) * E;
    for (int h = 0, k = 1; h < H; h++) {
        if (h == x->host[me]) {
            memset(st + (size_t)h * E, 0, (size_t)E * sizeof *st);
            continue;
        }
        for (int e = 0; e < E; e++) {
            st[(size_t)h * E + e] = s == me ? to[(size_t)e * W + x->at[h * G + x->lidx[me]]]
                                            : hdr[(size_t)k * E + e];
            if (st[(size_t)h * E + e] < 0)
                return semoe_err(SEMOE_EPROTO, "exchange dispatch: layer %d: rank %d stages %d "
                                 "rows of expert %d for host %d", layer, s,
                                 st[(size_t)h * E + e], e, h);
        }
        k++;
    }
    return SEMOE_OK;
}

/* x->rp (where each sender's rows of each expert start in dispatch's recv, and in combine's
 * send) from the layer's counts; x->soff (where each staged block sits) and the staging buffer
 * big enough for them. */
static void s_hops_layout(worker_exchange_t *x, int layer, int D)
{
    const int H = x->H, G = x->G, E = x->E, W = x->W;
    const int32_t *cnt = x->cnt + (size_t)layer * W * E;
    size_t at = 0;
    for (int e = 0; e < E; e++)
        for (int s = 0; s < W; s++) {
            x->rp[(size_t)e * W + s] = at;
            at += (size_t)cnt[(size_t)s * E + e];
        }
    const int32_t *st = x->stage + (size_t)layer * G * H * E;
    size_t rows = 0;
    for (int h = 0; h < H; h++)
        for (int g = 0; g < G; g++)
            for (int e = 0; e < E; e++) {
                x->soff[((size_t)h * G + g) * E + e] = rows;
                if (g != x->lidx[x->me])
                    rows += (size_t)st[((size_t)g * H + h) * E + e];
            }
    if (!x->stg || rows * D > x->stg_cap) { /* at least one float: the chunk pointers into it
                                               * are computed even when nothing is staged */
        if (x->stg)
            x->be->free(x->stg);
        x->stg_cap = rows * D > 0 ? rows * D : 1;
        x->stg = x->be->alloc(x->stg_cap * sizeof(float));
    }
}

/* Appends a transfer unless it is empty. */
static void s_op(worker_xfer_op_t *ops, int *n, int peer, const float *send, float *recv,
                 size_t rows, int D)
{
    if (rows)
        ops[(*n)++] = (worker_xfer_op_t){peer, send, recv, rows * D * sizeof(float)};
}

/* One hop pass's view of layer `layer`: the shape, its splits (to), counts (cnt) and staged
 * counts (st), the layout made (s_hops_layout) and room for its transfers. */
typedef struct {
    int H, G, E, W, me, mh;
    size_t base;
    const int32_t *to, *cnt, *st;
    worker_xfer_op_t *ops;
} s_hops_t;

static s_hops_t s_hops_begin(worker_exchange_t *x, int layer, int D)
{
    const int H = x->H, G = x->G, E = x->E, W = x->W;
    const size_t base = (size_t)layer * E;
    s_hops_layout(x, layer, D);
    return (s_hops_t){.H = H, .G = G, .E = E, .W = W, .me = x->me, .mh = x->host[x->me],
                      .base = base, .to = x->to + base * W,
                      .cnt = x->cnt + (size_t)layer * W * E,
                      .st = x->stage + (size_t)layer * G * H * E,
                      .ops = s_ops(x, (size_t)4 * W * E * (H + 1) + 1)};
}

static semoe_rc s_hops_dispatch(worker_exchange_t *x, int layer, int D, const float *send,
                                const size_t *start, float *recv)
{
    const s_hops_t k = s_hops_begin(x, layer, D);
    const int H = k.H, G = k.G, E = k.E, W = k.W, me = k.me, mh = k.mh;
    const int32_t *to = k.to, *cnt = k.cnt, *st = k.st;
    const size_t base = k.base;
    worker_xfer_op_t *ops = k.ops;
    int n = 0;
    /* hop one: within my host */
    for (int g = 0; g < G; g++) {
        int r = x->at[mh * G + g];
        for (int e = 0; e < E; e++) { /* r's own rows: straight, into place */
            const int32_t *te = to + (size_t)e * W;
            const float *src = send + (start[e] + (size_t)s_chunk_start(x, base + e, te, r)) * D;
            if (r == me)
                s_op(ops, &n, r, src, recv + x->rp[(size_t)e * W + me] * D, (size_t)te[r], D);
            else {
                s_op(ops, &n, r, src, NULL, (size_t)te[r], D);
                s_op(ops, &n, r, NULL, recv + x->rp[(size_t)e * W + r] * D,
                     (size_t)cnt[(size_t)r * E + e], D);
            }
        }
        if (r == me)
            continue;
        for (int h = 0; h < H; h++) { /* rows for other hosts, staged at r and at me */
            if (h == mh)
                continue;
            int d = x->at[h * G + g];
            for (int e = 0; e < E; e++) {
                const int32_t *te = to + (size_t)e * W;
                s_op(ops, &n, r,
                     send + (start[e] + (size_t)s_chunk_start(x, base + e, te, d)) * D, NULL,
                     (size_t)te[d], D);
            }
            for (int e = 0; e < E; e++)
                s_op(ops, &n, r, NULL, x->stg + x->soff[((size_t)h * G + g) * E + e] * D,
                     (size_t)st[((size_t)g * H + h) * E + e], D);
        }
    }
    SEMOE_CHECK(s_transfer(x, n));
    /* hop two: across hosts, my host's rows for each other host's rank of my index, and the
     * other hosts' for me from their rank of my index */
    n = 0;
    for (int h = 0; h < H; h++) {
        if (h == mh)
            continue;
        int d = x->at[h * G + x->lidx[me]];
        for (int g = 0; g < G; g++) {
            int s = x->at[mh * G + g];
            for (int e = 0; e < E; e++) {
                const int32_t *te = to + (size_t)e * W;
                const float *src = s == me
                    ? send + (start[e] + (size_t)s_chunk_start(x, base + e, te, d)) * D
                    : x->stg + x->soff[((size_t)h * G + g) * E + e] * D;
                s_op(ops, &n, d, src, NULL, (size_t)st[((size_t)g * H + h) * E + e], D);
            }
        }
        for (int g = 0; g < G; g++) {
            int s = x->at[h * G + g];
            for (int e = 0; e < E; e++)
                s_op(ops, &n, d, NULL, recv + x->rp[(size_t)e * W + s] * D,
                     (size_t)cnt[(size_t)s * E + e], D);
        }
    }
    return s_transfer(x, n);
}

static semoe_rc s_hops_combine(worker_exchange_t *x, int layer, int D, const float *send,
                               const size_t *start, float *recv)
{
    const s_hops_t k = s_hops_begin(x, layer, D);
    const int H = k.H, G = k.G, E = k.E, W = k.W, me = k.me, mh = k.mh;
    const int32_t *to = k.to, *cnt = k.cnt, *st = k.st;
    const size_t base = k.base;
    worker_xfer_op_t *ops = k.ops;
    int n = 0;
    /* hop one: across hosts, the outputs of another host's rows to its rank of my index, and
     * from the other hosts' rank of my index the outputs of my host's rows */
    for (int h = 0; h < H; h++) {
        if (h == mh)
            continue;
        int gw = x->at[h * G + x->lidx[me]];
        for (int g = 0; g < G; g++) {
            int s = x->at[h * G + g];
            for (int e = 0; e < E; e++)
                s_op(ops, &n, gw, send + x->rp[(size_t)e * W + s] * D, NULL,
                     (size_t)cnt[(size_t)s * E + e], D);
        }
        for (int g = 0; g < G; g++) {
            int s = x->at[mh * G + g];
            for (int e = 0; e < E; e++) {
                const int32_t *te = to + (size_t)e * W;
                float *dst = s == me
                    ? recv + (start[e] + (size_t)s_chunk_start(x, base + e, te, gw)) * D
                    : x->stg + x->soff[((size_t)h * G + g) * E + e] * D;
                s_op(ops, &n, gw, NULL, dst, (size_t)st[((size_t)g * H + h) * E + e], D);
            }
        }
    }
    SEMOE_CHECK(s_transfer(x, n));
    /* hop two: within my host */
    n = 0;
    for (int g = 0; g < G; g++) {
        int r = x->at[mh * G + g];
        for (int e = 0; e < E; e++) { /* r's rows I hold: straight back, into place */
            const int32_t *te = to + (size_t)e * W;
            float *dst = recv + (start[e] + (size_t)s_chunk_start(x, base + e, te, r)) * D;
            const float *src = send + x->rp[(size_t)e * W + r] * D;
            if (r == me)
                s_op(ops, &n, r, src, dst, (size_t)te[me], D);
            else {
                s_op(ops, &n, r, src, NULL, (size_t)cnt[(size_t)r * E + e], D);
                s_op(ops, &n, r, NULL, dst, (size_t)te[r], D);
            }
        }
        if (r == me)
            continue;
        for (int h = 0; h < H; h++) { /* what I staged for r, and what r staged for me */
            if (h == mh)
                continue;
            int d = x->at[h * G + g];
            for (int e = 0; e < E; e++)
                s_op(ops, &n, r, x->stg + x->soff[((size_t)h * G + g) * E + e] * D, NULL,
                     (size_t)st[((size_t)g * H + h) * E + e], D);
            for (int e = 0; e < E; e++) {
                const int32_t *te = to + (size_t)e * W;
                s_op(ops, &n, r, NULL,
                     recv + (start[e] + (size_t)s_chunk_start(x, base + e, te, d)) * D,
                     (size_t)te[d], D);
            }
        }
    }
    return s_transfer(x, n);
}

semoe_rc worker_exchange_set_hosts(worker_exchange_t *x, const int *host)
{
    const int W = x->W;
    free(x->host), free(x->lidx), free(x->at), free(x->stage), free(x->rp), free(x->soff);
    x->host = x->lidx = x->at = NULL;
    x->stage = NULL, x->rp = x->soff = NULL;
    x->H = x->G = 0;
    s_parts_reset(x);
    if (!host)
        return SEMOE_OK;
    int H = 0, *count = semoe_xcalloc((size_t)W + 1, sizeof *count);
    semoe_rc rc = SEMOE_OK;
    for (int r = 0; r < W && rc == SEMOE_OK; r++) {
        if (host[r] < 0 || host[r] >= W) {
            rc = semoe_err(SEMOE_EINVAL, "exchange: rank %d on host %d: hosts are 0..%d", r,
                           host[r], W - 1);
            break;
        }
        H = host[r] + 1 > H ? host[r] + 1 : H;
        count[host[r]]++;
    }
    for (int h = 0; h < H && rc == SEMOE_OK; h++)
        if (count[h] != count[0])
            rc = semoe_err(SEMOE_EINVAL, "exchange: host %d has %d ranks, host 0 %d: two hops "
                           "need the same on every host", h, count[h], count[0]);
    const int G = count[0];
    free(count);
    if (rc != SEMOE_OK || H < 2)
        return rc; /* one host: one hop */
    x->H = H, x->G = G;
    x->host = semoe_xmalloc((size_t)W * sizeof *x->host);
    x->lidx = semoe_xmalloc((size_t)W * sizeof *x->lidx);
    x->at = semoe_xmalloc((size_t)W * sizeof *x->at);
    int *seen = semoe_xcalloc((size_t)H, sizeof *seen);
    for (int r = 0; r < W; r++) {
        x->host[r] = host[r];
        x->lidx[r] = seen[host[r]]++;
        x->at[host[r] * G + x->lidx[r]] = r;
    }
    free(seen);
    x->stage = semoe_xcalloc((size_t)x->L * G * H * x->E + 1, sizeof *x->stage);
    x->rp = semoe_xcalloc((size_t)x->E * W + 1, sizeof *x->rp);
    x->soff = semoe_xcalloc((size_t)H * G * x->E + 1, sizeof *x->soff);
    return SEMOE_OK;
}

/* s_dispatch over the direct transport, from where the two part: start[e] is where expert e's rows begin in
 * send, x->to (this layer's) how they split over the ranks. The counts go over ZeroMQ and are
 * checked as s_header checks the host messages; then each (rank, expert) chunk goes device to
 * device, laid out as s_dispatch lays the host rows out: by expert, then by sender. */
/* The direct path's counts: to rank r my rows of each expert for r (in two hops, to a rank r
 * of my host also those for each other host's rank of r's index, which r passes on), over the
 * comm; the layer's cnt (and stage) records filled and checked, *total the rows arriving. */
static semoe_rc s_direct_counts(worker_exchange_t *x, int layer, int64_t *total_out)
{
    int W = x->W, E = x->E;
    size_t base = (size_t)layer * E, hb = (size_t)E * sizeof(int32_t);
    const int32_t *to = x->to + base * W;
    const int H = x->H, me = x->me;
    size_t mb = H ? (size_t)H * hb : hb, off = 0;
    x->smsg = s_reserve(x->smsg, &x->smsg_cap, (size_t)W * mb);
    for (int r = 0; r < W; r++) {
        int32_t *hdr = (int32_t *)(x->smsg + off);
        for (int e = 0; e < E; e++)
            hdr[e] = to[(size_t)e * W + r];
        x->sbytes[r] = hb;
        if (H && r != me && x->host[r] == x->host[me])
            for (int h = 0, k = 1; h < H; h++) {
                if (h == x->host[me])
                    continue;
                int d = x->at[h * x->G + x->lidx[r]];
                for (int e = 0; e < E; e++)
                    hdr[(size_t)k * E + e] = to[(size_t)e * W + d];
                k++;
                x->sbytes[r] += hb;
            }
        off += x->sbytes[r];
    }
    SEMOE_CHECK(s_alltoallv(x, (size_t)W * mb));
    int32_t *cnt = x->cnt + (size_t)layer * W * E;
    int64_t total = 0;
    size_t roff = 0;
    for (int s = 0; s < W; s++) {
        size_t want = H && s != me && x->host[s] == x->host[me] ? mb : hb;
        if (x->rbytes[s] != want)
            return semoe_err(SEMOE_EPROTO, "exchange dispatch: layer %d: %zu bytes of counts "
                             "from rank %d, want %zu", layer, x->rbytes[s], s, want);
        memcpy(cnt + (size_t)s * E, x->rmsg + roff, hb);
        if (H && x->host[s] == x->host[me])
            SEMOE_CHECK(s_take_stage(x, layer, s, to, (const int32_t *)(x->rmsg + roff)));
        roff += x->rbytes[s];
        for (int e = 0; e < E; e++) {
            int32_t c = cnt[(size_t)s * E + e];
            if (c < 0 || (c > 0 && !x->mine[base + e]))
                return semoe_err(SEMOE_EPROTO, "exchange dispatch: layer %d: rank %d announces "
                                 "%d rows of expert %d (held here: %s)", layer, s, c, e,
                                 x->mine[base + e] ? "yes" : "no");
            total += c;
        }
    }
    *total_out = total;
    return SEMOE_OK;
}

/* The layer's recv_counts from its cnt record. */
static void s_recv_counts(const worker_exchange_t *x, int layer, int32_t *recv_counts)
{
    const int32_t *cnt = x->cnt + (size_t)layer * x->W * x->E;
    for (int e = 0; e < x->E; e++) {
        recv_counts[e] = 0;
        for (int s = 0; s < x->W; s++)
            recv_counts[e] += cnt[(size_t)s * x->E + e];
    }
}

static semoe_rc s_dispatch_direct(worker_exchange_t *x, int layer, int part, int D,
                                  const float *send, const int32_t *send_counts,
                                  const size_t *start, float *recv, int32_t *recv_counts,
                                  int recv_cap)
{
    int W = x->W, E = x->E;
    size_t base = (size_t)layer * E, hb = (size_t)E * sizeof(int32_t), rowb = (size_t)D * 4;
    const int32_t *to = x->to + base * W;
    const int H = x->H, me = x->me;
    int64_t total = 0;
    size_t rec = (size_t)part * x->L + (size_t)layer;
    /* the rows of a part announced before: its records back in place (an announce always
     * exchanges the counts anew) */
    bool counted = recv && part < x->P && x->announced[rec];
    if (counted) {
        s_part_copy(x, layer, part, false);
        x->announced[rec] = 0;
        if (memcmp(x->sent + base, send_counts, hb) != 0)
            return semoe_err(SEMOE_EINVAL, "exchange dispatch: layer %d part %d: the rows' "
                             "counts differ from those announced", layer, part);
        s_recv_counts(x, layer, recv_counts);
        for (int e = 0; e < E; e++)
            total += recv_counts[e];
    } else {
        SEMOE_CHECK(s_direct_counts(x, layer, &total));
    }
    if (!recv) { /* the counts alone, kept with the part's records until its rows go */
        s_recv_counts(x, layer, recv_counts);
        s_parts_reserve(x, part);
        for (int p = 0; part == 0 && p < x->P; p++) /* a new series: none announced before */
            x->announced[(size_t)p * x->L + (size_t)layer] = 0;
        memcpy(x->sent + base, send_counts, hb); /* kept with the part, checked by its rows */
        s_part_copy(x, layer, part, true);
        x->announced[rec] = 1;
        return SEMOE_OK;
    }
    const int32_t *cnt = x->cnt + (size_t)layer * W * E;
    if (total > recv_cap)
        return semoe_err(SEMOE_EINVAL, "exchange dispatch: layer %d: %lld rows arrive, the "
                         "receive capacity is %d: allocate the activations with expert_rows "
                         ">= %lld", layer, (long long)total, recv_cap, (long long)total);
    if (H) {
        for (int e = 0; e < E; e++) {
            recv_counts[e] = 0;
            for (int s2 = 0; s2 < W; s2++)
                recv_counts[e] += cnt[(size_t)s2 * E + e];
            x->acc[base + e] += (uint64_t)recv_counts[e];
        }
        uint64_t out = 0;
        for (int r = 0; r < W; r++)
            for (int e = 0; e < E && r != me; e++)
                out += (uint64_t)to[(size_t)e * W + r];
        x->traffic.dispatch_rows_out += out;
        x->traffic.dispatch_bytes_out += out * rowb;
        x->traffic.dispatches++;
        for (int e = 0; e < E; e++)
            x->routed[base + e] += (uint64_t)send_counts[e];
        memcpy(x->sent + base, send_counts, hb);
        return s_hops_dispatch(x, layer, D, send, start, recv);
    }
    worker_xfer_op_t *ops = s_ops(x, (size_t)2 * W * E + 1);
    int n = 0;
    size_t at = 0; /* rows of recv laid out so far */
    for (int e = 0; e < E; e++) {
        recv_counts[e] = 0;
        for (int s = 0; s < W; s++) {
            int32_t c = cnt[(size_t)s * E + e];
            if (c > 0 && s == x->me) { /* our own chunk: a local copy */
                size_t first = start[e] + (size_t)s_chunk_start(x, base + e, to + (size_t)e * W, s);
                ops[n++] = (worker_xfer_op_t){s, send + first * D, recv + at * D, (size_t)c * rowb};
            } else if (c > 0) {
                ops[n++] = (worker_xfer_op_t){s, NULL, recv + at * D, (size_t)c * rowb};
            }
            at += (size_t)c;
            recv_counts[e] += c;
        }
        x->acc[base + e] += (uint64_t)recv_counts[e];
    }
    uint64_t out = 0;
    n = s_own_chunks(x, base, start, D, send, NULL, ops, n, &out);
    x->traffic.dispatch_rows_out += out;
    x->traffic.dispatch_bytes_out += out * rowb;
    x->traffic.dispatches++;
    for (int e = 0; e < E; e++)
        x->routed[base + e] += (uint64_t)send_counts[e];
    memcpy(x->sent + base, send_counts, hb);
    return s_transfer(x, n);
}

/* s_combine over the direct transport: every chunk back the way its dispatch came (the counts are that
 * dispatch's, on both sides: nothing to announce). rstart[e] is where expert e's rows begin in
 * send (by sender within it), start[e] where this rank's own rows of e begin in recv. */
static semoe_rc s_combine_direct(worker_exchange_t *x, int layer, int D, const float *send,
                               const size_t *rstart, const size_t *start, float *recv)
{
    if (x->H)
        return s_hops_combine(x, layer, D, send, start, recv);
    int W = x->W, E = x->E;
    size_t base = (size_t)layer * E, rowb = (size_t)D * 4;
    const int32_t *to = x->to + base * W;
    const int32_t *cnt = x->cnt + (size_t)layer * W * E;
    worker_xfer_op_t *ops = s_ops(x, (size_t)2 * W * E + 1);
    int n = 0;
    for (int e = 0; e < E; e++) {
        size_t before = 0; /* rows of e from senders before s */
        for (int s = 0; s < W; s++) {
            int32_t c = cnt[(size_t)s * E + e];
            const float *src = send + (rstart[e] + before) * D;
            before += (size_t)(c > 0 ? c : 0);
            if (c <= 0)
                continue;
            if (s == x->me) {
                size_t first = start[e] + (size_t)s_chunk_start(x, base + e, to + (size_t)e * W, s);
                ops[n++] = (worker_xfer_op_t){s, src, recv + first * D, (size_t)c * rowb};
            } else {
                ops[n++] = (worker_xfer_op_t){s, src, NULL, (size_t)c * rowb};
            }
        }
    }
    n = s_own_chunks(x, base, start, D, NULL, recv, ops, n, NULL); /* ours back */
    return s_transfer(x, n);
}


/* The host path's counts alone (a dispatch with recv NULL): each rank's rows per expert for
 * every other, over the comm; recv_counts the sums, checked against the placement. */
static semoe_rc s_host_counts(worker_exchange_t *x, int layer, const int32_t *to,
                              int32_t *recv_counts)
{
    int W = x->W, E = x->E;
    size_t base = (size_t)layer * E, hb = (size_t)E * sizeof(int32_t);
    x->smsg = s_reserve(x->smsg, &x->smsg_cap, (size_t)W * hb);
    for (int r = 0; r < W; r++) {
        int32_t *hdr = (int32_t *)(x->smsg + (size_t)r * hb);
        for (int e = 0; e < E; e++)
            hdr[e] = to[(size_t)e * W + r];
        x->sbytes[r] = hb;
    }
    SEMOE_CHECK(s_alltoallv(x, (size_t)W * hb));
    for (int e = 0; e < E; e++)
        recv_counts[e] = 0;
    for (int s = 0; s < W; s++) {
        if (x->rbytes[s] != hb)
            return semoe_err(SEMOE_EPROTO, "exchange dispatch: layer %d: %zu bytes of counts "
                             "from rank %d, want %zu", layer, x->rbytes[s], s, hb);
        const int32_t *c = (const int32_t *)(x->rmsg + (size_t)s * hb);
        for (int e = 0; e < E; e++) {
            if (c[e] < 0 || (c[e] > 0 && !x->mine[base + e]))
                return semoe_err(SEMOE_EPROTO, "exchange dispatch: layer %d: rank %d announces "
                                 "%d rows of expert %d (held here: %s)", layer, s, c[e], e,
                                 x->mine[base + e] ? "yes" : "no");
            recv_counts[e] += c[e];
        }
    }
    return SEMOE_OK;
}

static semoe_rc s_dispatch(void *state, int layer, int part, int E, int D, const float *send,
                           const int32_t *send_counts, float *recv, int32_t *recv_counts,
                           int recv_cap)
{
    worker_exchange_t *x = state;
    SEMOE_CHECK(s_check_call(x, "dispatch", layer, E, D, send_counts));
    int W = x->W;
    size_t base = (size_t)layer * E;
    size_t rowb = (size_t)D * sizeof(float), hb = (size_t)E * sizeof(int32_t);
    size_t start[E];
    size_t n = 0;
    int32_t *to = x->to + base * W;
    for (int e = 0; e < E; e++) {
        start[e] = n;
        n += (size_t)send_counts[e];
        s_split(x, base + e, send_counts[e], to + (size_t)e * W);
    }
    if (x->xfer.run)
        return s_dispatch_direct(x, layer, part, D, send, send_counts, start, recv, recv_counts,
                                 recv_cap);
    if (!recv) /* the counts alone; the rows' message carries them again */
        return s_host_counts(x, layer, to, recv_counts);
    x->rows = s_reserve(x->rows, &x->rows_cap, n * rowb);
    x->be->to_host(x->rows, send, n * rowb);

    /* pack: to rank r its experts' rows in expert order, after the counts */
    x->smsg = s_reserve(x->smsg, &x->smsg_cap, (size_t)W * hb + n * rowb);
    size_t off = 0;
    for (int r = 0; r < W; r++) {
        size_t begin = off;
        int32_t *hdr = (int32_t *)(x->smsg + off);
        off += hb;
        for (int e = 0; e < E; e++) {
            const int32_t *te = to + (size_t)e * W;
            hdr[e] = te[r];
            if (hdr[e] == 0)
                continue;
            size_t first = start[e] + (size_t)s_chunk_start(x, base + e, te, r);
            memcpy(x->smsg + off, x->rows + first * D, (size_t)hdr[e] * rowb);
            off += (size_t)hdr[e] * rowb;
        }
        x->sbytes[r] = off - begin;
        if (r != x->me) {
            x->traffic.dispatch_rows_out += (x->sbytes[r] - hb) / rowb;
            x->traffic.dispatch_bytes_out += x->sbytes[r];
        }
    }
    x->traffic.dispatches++;
    for (int e = 0; e < E; e++)
        x->routed[(size_t)layer * E + e] += (uint64_t)send_counts[e];
    SEMOE_CHECK(s_alltoallv(x, (size_t)W * hb + (size_t)(recv_cap > 0 ? recv_cap : 0) * rowb));

    /* unpack: counts per (sender, expert), checked against the placement */
    int32_t *cnt = x->cnt + (size_t)layer * W * E;
    size_t moff[W];
    int64_t total = 0;
    off = 0;
    for (int s = 0; s < W; s++) {
        int64_t rows;
        moff[s] = off;
        SEMOE_CHECK(s_header(x, "dispatch", layer, s, off, D, cnt + (size_t)s * E, &rows));
        for (int e = 0; e < E; e++)
            if (cnt[(size_t)s * E + e] > 0 && !x->mine[base + e])
                return semoe_err(SEMOE_EPROTO, "exchange dispatch: layer %d: rank %d sent %d "
                                 "rows of expert %d, which rank %d does not hold", layer, s,
                                 cnt[(size_t)s * E + e], e, x->me);
        total += rows;
        off += x->rbytes[s];
    }
    if (total > recv_cap)
        return semoe_err(SEMOE_EINVAL, "exchange dispatch: layer %d: %lld rows arrived, the "
                         "receive capacity is %d: allocate the activations with expert_rows "
                         ">= %lld", layer, (long long)total, recv_cap, (long long)total);

    /* regroup: by expert, then by sender in rank order */
    x->out = s_reserve(x->out, &x->out_cap, (size_t)total * rowb);
    size_t at = 0;
    for (int e = 0; e < E; e++) {
        recv_counts[e] = 0;
        for (int s = 0; s < W; s++) {
            const int32_t *c = cnt + (size_t)s * E;
            size_t before = 0;
            for (int k = 0; k < e; k++)
                before += (size_t)c[k];
            memcpy(x->out + at * D, x->rmsg + moff[s] + hb + before * rowb, (size_t)c[e] * rowb);
            at += (size_t)c[e];
            recv_counts[e] += c[e];
        }
        x->acc[(size_t)layer * E + e] += (uint64_t)recv_counts[e];
    }
    x->be->to_device(recv, x->out, (size_t)total * rowb);
    memcpy(x->sent + (size_t)layer * E, send_counts, hb);
    return SEMOE_OK;
}

/* A pass that ran layer `layer`'s experts here, standing in for a dispatch to this rank: the
 * rows count as sent and received. */
static void s_note_local(void *state, int layer, int E, const int32_t *counts)
{
    worker_exchange_t *x = state;
    if (layer < 0 || layer >= x->L || E != x->E)
        return;
    for (int e = 0; e < E; e++) {
        x->routed[(size_t)layer * E + e] += (uint64_t)counts[e];
        x->acc[(size_t)layer * E + e] += (uint64_t)counts[e];
    }
}

static semoe_rc s_combine(void *state, int layer, int E, int D, const float *send,
                          const int32_t *send_counts, float *recv, const int32_t *recv_counts)
{
    worker_exchange_t *x = state;
    SEMOE_CHECK(s_check_call(x, "combine", layer, E, D, send_counts));
    int W = x->W;
    size_t base = (size_t)layer * E;
    const int32_t *to = x->to + base * W;
    const int32_t *cnt = x->cnt + (size_t)layer * W * E, *sent = x->sent + (size_t)layer * E;
    size_t rowb = (size_t)D * sizeof(float), hb = (size_t)E * sizeof(int32_t);
    size_t rstart[E], start[E];
    size_t nr = 0, n = 0;
    for (int e = 0; e < E; e++) {
        int64_t got = 0;
        for (int s = 0; s < W; s++)
            got += cnt[(size_t)s * E + e];
        if (send_counts[e] != got || recv_counts[e] != sent[e])
            return semoe_err(SEMOE_EINVAL, "exchange combine: layer %d, expert %d: %d rows in "
                             "and %d out, but the last dispatch received %lld and sent %d",
                             layer, e, send_counts[e], recv_counts[e], (long long)got, sent[e]);
        rstart[e] = nr;
        nr += (size_t)send_counts[e];
        start[e] = n;
        n += (size_t)sent[e];
    }
    if (x->xfer.run)
        return s_combine_direct(x, layer, D, send, rstart, start, recv);
    x->rows = s_reserve(x->rows, &x->rows_cap, nr * rowb);
    x->be->to_host(x->rows, send, nr * rowb);

    /* pack: to rank s the outputs of the rows it sent, expert by expert */
    x->smsg = s_reserve(x->smsg, &x->smsg_cap, (size_t)W * hb + nr * rowb);
    size_t off = 0;
    for (int s = 0; s < W; s++) {
        size_t begin = off;
        memcpy(x->smsg + off, cnt + (size_t)s * E, hb);
        off += hb;
        for (int e = 0; e < E; e++) {
            size_t c = (size_t)cnt[(size_t)s * E + e];
            if (c == 0)
                continue;
            size_t before = 0;
            for (int k = 0; k < s; k++)
                before += (size_t)cnt[(size_t)k * E + e];
            memcpy(x->smsg + off, x->rows + (rstart[e] + before) * D, c * rowb);
            off += c * rowb;
        }
        x->sbytes[s] = off - begin;
    }
    SEMOE_CHECK(s_alltoallv(x, (size_t)W * hb + n * rowb));

    /* unpack: from rank r the rows of its experts, back where the dispatch took them */
    x->out = s_reserve(x->out, &x->out_cap, n * rowb);
    off = 0;
    for (int r = 0; r < W; r++) {
        int32_t c[E];
        int64_t rows;
        SEMOE_CHECK(s_header(x, "combine", layer, r, off, D, c, &rows));
        size_t at = off + hb;
        for (int e = 0; e < E; e++) {
            const int32_t *te = to + (size_t)e * W;
            if (c[e] != te[r])
                return semoe_err(SEMOE_EPROTO, "exchange combine: layer %d: rank %d returned "
                                 "%d rows of expert %d, %d were sent", layer, r, c[e], e,
                                 te[r]);
            size_t first = start[e] + (size_t)s_chunk_start(x, base + e, te, r);
            memcpy(x->out + first * D, x->rmsg + at, (size_t)c[e] * rowb);
            at += (size_t)c[e] * rowb;
        }
        off += x->rbytes[r];
    }
    x->be->to_device(recv, x->out, n * rowb);
    return SEMOE_OK;
}

/* Every rank's vector goes to every rank (an all-gather through alltoallv) and each sums them
 * in rank order in double: the same bits everywhere, no float rounding of the statistics. */
static semoe_rc s_reduce_stats(void *state, double *buf, size_t n)
{
    worker_exchange_t *x = state;
    int W = x->W;
    size_t b = n * sizeof(double);
    x->smsg = s_reserve(x->smsg, &x->smsg_cap, (size_t)W * b);
    for (int r = 0; r < W; r++) {
        memcpy(x->smsg + (size_t)r * b, buf, b);
        x->sbytes[r] = b;
    }
    SEMOE_CHECK(s_alltoallv(x, (size_t)W * b));
    for (int r = 0; r < W; r++)
        if (x->rbytes[r] != b)
            return semoe_err(SEMOE_EPROTO, "exchange reduce_stats: %zu bytes from rank %d, "
                             "want %zu (%zu values)", x->rbytes[r], r, b, n);
    for (size_t i = 0; i < n; i++) {
        double s = 0;
        for (int r = 0; r < W; r++) {
            double v;
            memcpy(&v, x->rmsg + (size_t)r * b + i * sizeof(double), sizeof v);
            s += v;
        }
        buf[i] = s;
    }
    return SEMOE_OK;
}

void worker_exchange_set_xfer(worker_exchange_t *x, const worker_xfer_t *xfer)
{
    x->xfer = xfer ? *xfer : (worker_xfer_t){0};
}

#if SEMOE_HAVE_CUDA
/* The NCCL transport: one gpu_nccl_sendrecv group, waited for (not the reductions that
 * backward started in the background: they go on beside the rows). */
static semoe_rc s_nccl_run(void *state, const worker_xfer_op_t *ops, int n, int timeout_ms)
{
    _Static_assert(sizeof(worker_xfer_op_t) == sizeof(gpu_nccl_op_t) &&
                       offsetof(worker_xfer_op_t, peer) == offsetof(gpu_nccl_op_t, peer) &&
                       offsetof(worker_xfer_op_t, send) == offsetof(gpu_nccl_op_t, send) &&
                       offsetof(worker_xfer_op_t, recv) == offsetof(gpu_nccl_op_t, recv) &&
                       offsetof(worker_xfer_op_t, bytes) == offsetof(gpu_nccl_op_t, bytes),
                   "the same transfers");
    gpu_nccl_t *c = state;
    semoe_rc rc = gpu_nccl_sendrecv(c, (const gpu_nccl_op_t *)ops, n);
    return rc == SEMOE_OK ? gpu_nccl_wait_fg(c, timeout_ms) : rc;
}

void worker_exchange_set_nccl(worker_exchange_t *x, gpu_nccl_t *nccl)
{
    x->nccl = nccl;
    worker_xfer_t t = {nccl, s_nccl_run};
    worker_exchange_set_xfer(x, nccl ? &t : NULL);
}
#endif

/* The table's dispatch: the layer's part goes, and its records are kept for its combine. */
static semoe_rc s_dispatch_part(void *state, int layer, int part, int E, int D,
                                const float *send, const int32_t *send_counts, float *recv,
                                int32_t *recv_counts, int recv_cap)
{
    worker_exchange_t *x = state;
    if (part < 0 || part >= MODEL_EXCHANGE_MAX_PARTS)
        return semoe_err(SEMOE_EINVAL, "exchange dispatch: part %d: need 0..%d", part,
                         MODEL_EXCHANGE_MAX_PARTS - 1);
    SEMOE_CHECK(s_dispatch(x, layer, part, E, D, send, send_counts, recv, recv_counts,
                           recv_cap));
    if (recv) /* the rows went: the part's records are complete */
        s_part_store(x, layer, part);
    return SEMOE_OK;
}

static semoe_rc s_combine_part(void *state, int layer, int part, int E, int D,
                               const float *send, const int32_t *send_counts, float *recv,
                               const int32_t *recv_counts)
{
    worker_exchange_t *x = state;
    SEMOE_CHECK(s_part_load(x, layer, part));
    return s_combine(x, layer, E, D, send, send_counts, recv, recv_counts);
}

model_exchange_f32 worker_exchange_f32(worker_exchange_t *self)
{
    return (model_exchange_f32){.state = self, .dispatch = s_dispatch_part,
                                .combine = s_combine_part, .reduce_stats = s_reduce_stats,
                                .note_local = s_note_local};
}

/* --- replicated experts' gradients --------------------------------------------------------- */

/* Whether rank is the first (lowest) holder of expert e. */
static bool s_first_holder(const worker_exchange_t *x, size_t e, int rank)
{
    return x->hold[x->hoff[e]] == (uint32_t)rank;
}

static bool s_replicated(const worker_exchange_t *x, size_t e)
{
    return x->hoff[e + 1] - x->hoff[e] > 1;
}

#if SEMOE_HAVE_CUDA
#define S_SCRATCH_FLOATS ((size_t)64 << 20) /* tensors per group: 256 MiB at most, or one */

/* Whether rank holds expert e. */
static bool s_holds(const worker_exchange_t *x, size_t e, int rank)
{
    for (uint32_t i = x->hoff[e]; i < x->hoff[e + 1]; i++)
        if (x->hold[i] == (uint32_t)rank)
            return true;
    return false;
}

/* The floats of layer's replicated expert tensors that rank does not hold. */
static size_t s_absent(const worker_exchange_t *x, const model_params_t *p, int layer, int rank)
{
    size_t n = 0;
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        size_t e = (size_t)t->layer * x->E + (size_t)t->expert;
        if (t->kind == MODEL_PARAM_EXPERT && (int)t->layer == layer && s_replicated(x, e) &&
            !s_holds(x, e, rank))
            n += t->numel;
    }
    return n;
}

/* Decides, once per exchange and the same on every rank (from the placement alone), whether
 * the replicas' sums go layer by layer during backward: over NCCL, some expert replicated, and
 * the zeros standing in for the tensors a rank does not hold, a region per layer, within
 * S_SCRATCH_FLOATS on every rank (with every expert everywhere, data parallel: none at all).
 * Allocates this rank's zeros. */
static bool s_bylayer(worker_exchange_t *x, const model_params_t *p)
{
    if (x->bylayer >= 0)
        return x->bylayer == 1;
    x->bylayer = 0;
    bool any = false;
    for (size_t e = 0; e < (size_t)x->L * x->E && !any; e++)
        any = s_replicated(x, e);
    if (!x->nccl || !any)
        return false;
    size_t worst = 0;
    for (int r = 0; r < x->W; r++) {
        size_t n = 0;
        for (int l = 0; l < x->L; l++)
            n += s_absent(x, p, l, r);
        worst = n > worst ? n : worst;
    }
    if (worst > S_SCRATCH_FLOATS)
        return false;
    x->loff = semoe_xcalloc((size_t)x->L + 1, sizeof *x->loff);
    for (int l = 0; l < x->L; l++)
        x->loff[l + 1] = x->loff[l] + s_absent(x, p, l, x->me);
    if (x->loff[x->L])
        x->lzero = x->be->alloc(x->loff[x->L] * sizeof(float));
    x->rstarted = semoe_xcalloc((size_t)x->L + 1, sizeof *x->rstarted);
    x->bylayer = 1;
    return true;
}

semoe_rc worker_exchange_sum_replicas_layer(worker_exchange_t *x, const model_params_t *p,
                                            float *grads, int layer)
{
    if (layer < 0 || layer >= x->L)
        return semoe_err(SEMOE_EINVAL, "exchange: replica sums of layer %d of %d", layer, x->L);
    if (!s_bylayer(x, p) || x->rstarted[layer])
        return SEMOE_OK;
    size_t n = model_params_count(p), k = 0, used = 0;
    float **bufs = semoe_xcalloc(n + 1, sizeof *bufs);
    size_t *lens = semoe_xcalloc(n + 1, sizeof *lens);
    float *zero = x->lzero ? x->lzero + x->loff[layer] : NULL;
    size_t absent = x->loff[layer + 1] - x->loff[layer];
    if (absent) /* on the caller's stream, which the all-reduce waits for */
        x->be->zero(zero, absent * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind != MODEL_PARAM_EXPERT || (int)t->layer != layer ||
            !s_replicated(x, (size_t)t->layer * x->E + (size_t)t->expert))
            continue;
        bufs[k] = t->data ? grads + t->offset : zero + used;
        used += t->data ? 0 : t->numel;
        lens[k++] = t->numel;
    }
    x->rstarted[layer] = true;
    semoe_rc rc = k ? gpu_nccl_allreduce_buckets_bg(x->nccl, bufs, lens, (int)k, 0) : SEMOE_OK;
    free(bufs);
    free(lens);
    return rc;
}

void worker_exchange_sum_replicas_cancel(worker_exchange_t *x)
{
    if (x->rstarted)
        memset(x->rstarted, 0, (size_t)x->L * sizeof *x->rstarted);
}

/* worker_exchange_sum_replicas over NCCL, on the device: every replicated expert's tensors in
 * table order (but those of layers whose sums backward started already), in place where this rank holds them, zeros from a device scratch where it does
 * not. The tensors go in groups of at most S_SCRATCH_FLOATS (or one larger tensor), cut by their
 * lengths alone so that every rank cuts the same groups and buckets; within a group each tensor
 * not held here has a region of the scratch of its own (the sums the all-reduce writes back
 * there are dropped), zeroed before the group. NCCL's sum is not taken in rank order, but it is
 * the same on every rank: the replicas stay identical. */
static semoe_rc s_sum_replicas_nccl(worker_exchange_t *x, const model_params_t *p, float *grads)
{
    size_t n = model_params_count(p), k = 0, cap = S_SCRATCH_FLOATS;
    float **bufs = semoe_xcalloc(n + 1, sizeof *bufs);
    size_t *lens = semoe_xcalloc(n + 1, sizeof *lens);
    bool started = false;
    for (int l = 0; x->rstarted && l < x->L; l++)
        started = started || x->rstarted[l];
    for (size_t i = 0; i < n; i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind != MODEL_PARAM_EXPERT ||
            !s_replicated(x, (size_t)t->layer * x->E + (size_t)t->expert) ||
            (x->rstarted && x->rstarted[t->layer]))
            continue;
        bufs[k] = t->data ? grads + t->offset : NULL;
        lens[k++] = t->numel;
        cap = t->numel > cap ? t->numel : cap;
    }
    semoe_rc rc = SEMOE_OK;
    int64_t t0 = clock_mono_us();
    for (size_t i = 0; i < k && rc == SEMOE_OK;) {
        size_t j = i, sum = 0, absent = 0;
        while (j < k && (j == i || sum + lens[j] <= cap)) {
            absent += bufs[j] ? 0 : lens[j];
            sum += lens[j++];
        }
        if (absent > x->zero_cap) { /* kept for the next steps: grown, never shrunk */
            x->be->free(x->zero);
            x->zero = x->be->alloc(absent * sizeof(float));
            x->zero_cap = absent;
        }
        if (absent)
            x->be->zero(x->zero, absent * sizeof(float));
        for (size_t t = i, used = 0; t < j; t++)
            if (!bufs[t]) {
                bufs[t] = x->zero + used;
                used += lens[t];
            }
        rc = gpu_nccl_allreduce_buckets(x->nccl, bufs + i, lens + i, (int)(j - i), 0);
        if (rc == SEMOE_OK) /* the scratch is zeroed again for the next group */
            rc = gpu_nccl_wait(x->nccl, x->timeout_ms);
        i = j;
    }
    if (started) { /* what backward started is done before the gradients are used */
        gpu_nccl_join(x->nccl);
        if (rc == SEMOE_OK)
            rc = gpu_nccl_wait(x->nccl, x->timeout_ms);
        worker_exchange_sum_replicas_cancel(x);
    }
    x->traffic.seconds += (double)(clock_mono_us() - t0) / 1e6;
    free(bufs);
    free(lens);
    return rc;
}
#endif

semoe_rc worker_exchange_sum_replicas(worker_exchange_t *x, const model_params_t *p,
                                      float *grads)
{
    size_t n = model_params_count(p), total = 0;
    for (size_t i = 0; i < n; i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind == MODEL_PARAM_EXPERT &&
            s_replicated(x, (size_t)t->layer * x->E + (size_t)t->expert))
            total += t->numel;
    }
    if (total == 0)
        return SEMOE_OK;
#if SEMOE_HAVE_CUDA
    if (x->nccl)
        return s_sum_replicas_nccl(x, p, grads);
#endif
    /* every replicated expert's tensors back to back in table order: this rank's where it
     * holds them, zeros elsewhere (x + 0 = x exactly: the rank-order sum is the holders' sum) */
    float *buf = semoe_xcalloc(total, sizeof *buf), *at = buf;
    for (size_t i = 0; i < n; i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind != MODEL_PARAM_EXPERT ||
            !s_replicated(x, (size_t)t->layer * x->E + (size_t)t->expert))
            continue;
        if (t->data)
            x->be->to_host(at, grads + t->offset, t->numel * sizeof(float));
        at += t->numel;
    }
    int64_t t0 = clock_mono_us();
    semoe_rc rc = comm_allreduce_sum(x->comm, buf, total, x->timeout_ms);
    x->traffic.seconds += (double)(clock_mono_us() - t0) / 1e6;
    at = buf;
    for (size_t i = 0; rc == SEMOE_OK && i < n; i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind != MODEL_PARAM_EXPERT ||
            !s_replicated(x, (size_t)t->layer * x->E + (size_t)t->expert))
            continue;
        if (t->data)
            x->be->to_device(grads + t->offset, at, t->numel * sizeof(float));
        at += t->numel;
    }
    free(buf);
    return rc;
}

double worker_exchange_expert_sumsq(const worker_exchange_t *x, const model_params_t *p,
                                    const float *grads)
{
    double s = 0;
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind == MODEL_PARAM_EXPERT && t->data &&
            s_first_holder(x, (size_t)t->layer * x->E + (size_t)t->expert, x->me))
            s += x->be->sumsq(grads + t->offset, t->numel);
    }
    return s;
}
