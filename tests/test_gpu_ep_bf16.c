/* Expert parallelism in the bf16 graph (gpu/graph_bf16.h made with expert rows) on one GPU:
 * W ranks as threads, each on its own stream of device 0, holding a share of the experts (one
 * holder each, or random replicas) and of the batch, the rows travelling as bf16 through
 * worker/exchange.c (host messages over its comm on loopback), each layer whole (room for every
 * row that may arrive) or in 3 chunks (model_exchange_f32.parts: Tutel's overlap, the experts
 * of one chunk on a stream of their own beside the next chunk's transfers; room for 8 rows at
 * first, grown as the counts announced need). Against the same bf16 graph
 * holding every expert on the whole batch, every rank must report the global loss, ce and aux
 * (within 1e-5), dispatch each layer once per part forward and backward, route its tokens as the whole-batch graph does, receive exactly the rows the
 * routing sends to the experts it holds, and give its share of every gradient: summed over the
 * ranks (dense tensors) or over an expert's holders, each tensor within 1e-4 norm-wise (the
 * expert GEMMs run on other row groupings, so fp32 sums differ in order and a rounding to bf16
 * may flip). A routing that differs from the reference (a near tie under
 * bf16) redraws weights and tokens. Also: an expert-parallel graph refuses a forward without an
 * exchange, and a graph without expert rows refuses params missing experts. Skipped (77)
 * without a CUDA device. */
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/graph_bf16.h"
#include "gpu/ops.h"
#include "model/params.h"
#include "tests/gpu_util.h"
#include "tests/ep_util.h"
#include "tests/harness.h"
#include "tests/tiny_model.h"
#include "worker/comm.h"
#include "worker/exchange.h"

#define MAXW 3
#define B_SEQ 6 /* sequences in the global batch */
#define T_SEQ 24
#define S_TIMEOUT 60000
/* The same bf16 math on other row groupings: measured within 2e-8 (losses) and 1.5e-7
 * (gradients); a part's rows gone astray would show far above these */
#define S_TOL_LOSS 1e-5
#define S_TOL_GRAD 1e-4
#define S_GRAD_FLOOR 1e-4
#define S_DRAWS 8

/* REQUIRE for functions without a result: what later checks depend on ends the test */
#define S_NEED(cond, ...)                                                                      \
    do {                                                                                       \
        bool held_ = (cond);                                                                   \
        CHECK_HELD(held_, #cond, __VA_ARGS__);                                                 \
        if (!held_)                                                                            \
            exit(test_finish());                                                               \
    } while (0)

/* hd 64, D 64 (the bf16 graph's limits), 8 experts top-2 */
static void s_config(model_config_t *c)
{
    model_config_defaults(c);
    c->vocab_size = 96;
    c->hidden_size = 64;
    c->intermediate_size = 96;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 2;
    c->num_key_value_heads = 1;
    c->head_dim = 64;
    c->num_local_experts = 8;
    c->num_experts_per_tok = 2;
    c->max_position_embeddings = 64;
    c->router_aux_loss_coef = 0.1; /* large enough that a wrong aux shows */
    c->tie_word_embeddings = false;
}

/* The reference and what the ranks report (each rank writes its own slots). */
typedef struct {
    model_config_t cfg;
    model_params_t *full;
    int32_t tok[B_SEQ * (T_SEQ + 1)];
    model_loss_t loss;
    float *grads;          /* host, full params-shaped */
    int32_t *route;        /* (L, N, K) expert ids */
    int64_t routed[64];    /* (L * E) rows routed to each expert */
    test_ep_place_t pl;
    int parts;             /* the exchange's */
    int room;              /* the graphs' expert rows at first */
    uint64_t dispatches[MAXW];
    /* per rank */
    model_params_t *p[MAXW];
    float *g[MAXW];        /* host copy of the rank's gradient slab */
    model_loss_t l[MAXW];
    int64_t recv[MAXW][64];
    bool same_route[MAXW];
} s_ref_t;


typedef struct {
    s_ref_t *ref;
    uint32_t rank;
    comm_port_t *port;
    const char *const *eps;
    pthread_t th;
} s_rank_t;

static void s_rank_body(s_rank_t *me, comm_t *comm)
{
    s_ref_t *ref = me->ref;
    const model_config_t *cfg = &ref->cfg;
    uint32_t W = ref->pl.world, r = me->rank;
    int L = (int)cfg->num_hidden_layers, E = (int)cfg->num_local_experts;
    int K = (int)cfg->num_experts_per_tok;
    int b0 = (int)(r * B_SEQ / W), b1 = (int)((r + 1) * B_SEQ / W), nb = b1 - b0;
    int N = nb * T_SEQ;
    model_params_t *p = ref->p[r];
    worker_exchange_t *x = NULL;
    gpu_graph_bf16_t *g = NULL;
    size_t nf = model_params_slab_floats(p);
    float *wd = test_gpu_upf(model_params_slab(p), nf), *gd = gpu_alloc(nf * sizeof(float));
    semoe_rc rc = worker_exchange_new(comm, &gpu_backend_f32, L, E, ref->pl.hoff, ref->pl.hold,
                                      S_TIMEOUT, &x);
    TCHECK(rc == SEMOE_OK, "rank %u: exchange: %s", r, semoe_err_msg());
    if (rc == SEMOE_OK)
        rc = gpu_graph_bf16_new(p, nb, T_SEQ, ref->room, &g);
    TCHECK(rc == SEMOE_OK, "rank %u: graph: %s", r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;
    model_exchange_f32 ex = worker_exchange_f32(x);
    ex.parts = ref->parts;
    rc = gpu_graph_bf16_forward(g, wd, ref->tok + (size_t)b0 * (T_SEQ + 1), &ex, &ref->l[r]);
    TCHECK(rc == SEMOE_OK, "W %u rank %u: forward: %s", W, r, semoe_err_msg());
    if (rc == SEMOE_OK)
        rc = gpu_graph_bf16_backward(g, wd, gd, 1.0);
    TCHECK(rc == SEMOE_OK, "W %u rank %u: backward: %s", W, r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;
    ref->g[r] = test_gpu_downf(gd, nf);
    int32_t *ids = malloc((size_t)N * K * sizeof *ids);
    ref->same_route[r] = true;
    for (int l = 0; l < L; l++) {
        gpu_to_host(ids, gpu_graph_bf16_route(g, l), (size_t)N * K * sizeof *ids);
        const int32_t *want = ref->route + ((size_t)l * B_SEQ * T_SEQ + (size_t)b0 * T_SEQ) * K;
        ref->same_route[r] &= memcmp(ids, want, (size_t)N * K * sizeof *ids) == 0;
        for (int j = 0; j < E; j++)
            ref->recv[r][l * E + j] = worker_exchange_received(x, l, j);
    }
    worker_exchange_traffic_t tr;
    worker_exchange_take(x, NULL, NULL, &tr);
    ref->dispatches[r] = tr.dispatches;
    free(ids);
done:
    gpu_graph_bf16_destroy(&g);
    worker_exchange_destroy(&x);
    gpu_free(wd);
    gpu_free(gd);
}

static void *s_rank_main(void *arg)
{
    s_rank_t *me = arg;
    TCHECK(gpu_backend_init(0) == SEMOE_OK, "rank %u: device: %s", me->rank, semoe_err_msg());
    comm_t *c = NULL;
    semoe_rc rc = comm_new(me->port, 1, me->rank, me->ref->pl.world, me->eps, &c);
    TCHECK(rc == SEMOE_OK, "comm_new rank %u: %s", me->rank, semoe_err_msg());
    if (rc != SEMOE_OK)
        return NULL;
    s_rank_body(me, c);
    comm_destroy(&c);
    return NULL;
}

/* New weights and tokens, and the reference's pass over them. */
static void s_draw(s_ref_t *ref)
{
    model_params_destroy(&ref->full);
    ref->full = test_tiny_params(&ref->cfg, test_rand(), 0.1);
    S_NEED(ref->full != NULL, "params: %s", semoe_err_msg());
    for (size_t i = 0; i < sizeof ref->tok / sizeof ref->tok[0]; i++)
        ref->tok[i] = (int32_t)test_rand_below(ref->cfg.vocab_size);
    const model_config_t *c = &ref->cfg;
    int L = (int)c->num_hidden_layers, E = (int)c->num_local_experts;
    int K = (int)c->num_experts_per_tok, N = B_SEQ * T_SEQ;
    size_t nf = model_params_slab_floats(ref->full);
    gpu_graph_bf16_t *g = NULL;
    S_NEED(gpu_graph_bf16_new(ref->full, B_SEQ, T_SEQ, 0, &g) == SEMOE_OK,
                 "reference graph: %s", semoe_err_msg());
    float *wd = test_gpu_upf(model_params_slab(ref->full), nf);
    float *gd = gpu_alloc(nf * sizeof(float));
    S_NEED(gpu_graph_bf16_forward(g, wd, ref->tok, NULL, &ref->loss) == SEMOE_OK &&
                     gpu_graph_bf16_backward(g, wd, gd, 1.0) == SEMOE_OK,
                 "reference pass: %s", semoe_err_msg());
    free(ref->grads);
    ref->grads = test_gpu_downf(gd, nf);
    free(ref->route);
    ref->route = malloc((size_t)L * N * K * sizeof *ref->route);
    memset(ref->routed, 0, sizeof ref->routed);
    for (int l = 0; l < L; l++) {
        int32_t *ids = ref->route + (size_t)l * N * K;
        gpu_to_host(ids, gpu_graph_bf16_route(g, l), (size_t)N * K * sizeof *ids);
        for (int i = 0; i < N * K; i++)
            ref->routed[l * E + ids[i]]++;
    }
    gpu_free(wd);
    gpu_free(gd);
    gpu_graph_bf16_destroy(&g);
}

/* Rank results against the reference; false when a routing differed (nothing compared). */
static bool s_compare(s_ref_t *ref, bool replicas)
{
    uint32_t W = ref->pl.world;
    const model_config_t *c = &ref->cfg;
    int L = (int)c->num_hidden_layers, E = (int)c->num_local_experts;
    for (uint32_t r = 0; r < W; r++)
        if (!ref->g[r] || !ref->same_route[r]) {
            printf("W=%u replicas=%d parts=%d: rank %u %s: redrawn\n", W, replicas, ref->parts, r,
                   ref->g[r] ? "routed differently from the reference" : "failed");
            return !ref->g[r]; /* a failure was reported already: no redraw */
        }
    double wl = 0;
    for (uint32_t r = 0; r < W; r++) {
        const model_loss_t *l = &ref->l[r];
        double el = fabs(l->loss - ref->loss.loss) / fabs(ref->loss.loss);
        double ec = fabs(l->ce - ref->loss.ce) / fabs(ref->loss.ce);
        double ea = fabs(l->aux - ref->loss.aux) / fabs(ref->loss.aux);
        wl = fmax(wl, fmax(el, fmax(ec, ea)));
        CHECK(el < S_TOL_LOSS && ec < S_TOL_LOSS && ea < S_TOL_LOSS &&
                  l->tokens == B_SEQ * T_SEQ,
              "W %u rank %u: loss %.7g ce %.7g aux %.7g over %lld, the whole batch's %.7g %.7g "
              "%.7g", W, r, l->loss, l->ce, l->aux, (long long)l->tokens, ref->loss.loss,
              ref->loss.ce, ref->loss.aux);
    }
    for (uint32_t r = 0; r < W; r++) /* a forward and a backward, each layer in its parts */
        CHECK(ref->dispatches[r] == (uint64_t)(2 * L * ref->parts), "W %u rank %u: %llu "
              "dispatches, %d layers in %d parts want %d", W, r,
              (unsigned long long)ref->dispatches[r], L, ref->parts, 2 * L * ref->parts);
    for (int e = 0; e < L * E; e++) {
        int64_t sum = 0;
        for (uint32_t r = 0; r < W; r++) {
            CHECK(test_ep_holds(&ref->pl, e, r) || ref->recv[r][e] == 0, "W %u rank %u received %lld rows "
                  "of expert %d, which it does not hold", W, r, (long long)ref->recv[r][e], e);
            sum += ref->recv[r][e];
        }
        CHECK(sum == ref->routed[e], "W %u: expert %d: %lld rows received, %lld routed", W, e,
              (long long)sum, (long long)ref->routed[e]);
    }
    /* every tensor: the ranks' shares summed */
    double worst = 0;
    const char *wname = "";
    for (size_t i = 0; i < model_params_count(ref->full); i++) {
        const model_param_t *t = model_params_at(ref->full, i);
        float *sum = calloc(t->numel, sizeof *sum);
        int holders = 0;
        for (uint32_t r = 0; r < W; r++) {
            const model_param_t *q = model_params_at(ref->p[r], i);
            if (!q->data)
                continue;
            holders++;
            for (uint64_t k = 0; k < t->numel; k++)
                sum[k] += ref->g[r][q->offset + k];
        }
        double err = test_rel_err(sum, ref->grads + t->offset, t->numel, S_GRAD_FLOOR);
        CHECK(holders > 0 && err < S_TOL_GRAD, "W %u: gradient of %s (%d holders): rel %.3g", W,
              t->name, holders, err);
        if (err > worst) {
            worst = err;
            wname = t->name;
        }
        free(sum);
    }
    printf("W=%u replicas=%d parts=%d room %d (%u copies of %d experts): loss rel %.2e; "
           "gradients worst %.2e (%s)\n", W, replicas, ref->parts, ref->room,
           ref->pl.hoff[L * E], L * E, wl, worst, wname);
    return true;
}

static void s_world(s_ref_t *ref, void *ctx, uint32_t W, bool replicas, int parts)
{
    const model_config_t *c = &ref->cfg;
    ref->parts = parts;
    /* every row that may arrive with one part; with several, room for 8 rows at first: the
     * graph grows it part by part */
    ref->room = parts == 1 ? B_SEQ * T_SEQ * (int)c->num_experts_per_tok : 8;
    for (int d = 0; d < S_DRAWS; d++) {
        s_draw(ref);
        test_ep_place(&ref->pl, (int)(ref->cfg.num_hidden_layers * ref->cfg.num_local_experts),
                      W, replicas);
        comm_port_t *ports[MAXW] = {0};
        char text[MAXW][256];
        const char *eps[MAXW];
        for (uint32_t r = 0; r < W; r++) {
            S_NEED(comm_port_new(ctx, "tcp://127.0.0.1:*", &ports[r]) == SEMOE_OK,
                         "comm_port_new: %s", semoe_err_msg());
            snprintf(text[r], sizeof text[r], "%s", comm_port_endpoint(ports[r]));
            eps[r] = text[r];
            ref->p[r] = test_ep_rank_params(&ref->pl, ref->full, r);
            S_NEED(ref->p[r] != NULL, "rank params: %s", semoe_err_msg());
            ref->g[r] = NULL;
        }
        s_rank_t ranks[MAXW];
        for (uint32_t r = 0; r < W; r++) {
            ranks[r] = (s_rank_t){.ref = ref, .rank = r, .port = ports[r], .eps = eps};
            pthread_create(&ranks[r].th, NULL, s_rank_main, &ranks[r]);
        }
        for (uint32_t r = 0; r < W; r++)
            pthread_join(ranks[r].th, NULL);
        bool done = s_compare(ref, replicas);
        for (uint32_t r = 0; r < W; r++) {
            comm_port_destroy(&ports[r]);
            model_params_destroy(&ref->p[r]);
            free(ref->g[r]);
            ref->g[r] = NULL;
        }
        if (done)
            return;
    }
    CHECK(false, "W %u: the routing differed from the reference's in all %d draws", W, S_DRAWS);
}

/* Bad use is refused before anything runs. */
static void s_refusals(s_ref_t *ref)
{
    uint32_t held[] = {0, 1, 2};
    model_params_t *part = NULL;
    gpu_graph_bf16_t *g = NULL;
    S_NEED(model_params_new(&ref->cfg, held, 3, &part) == SEMOE_OK, "params: %s",
                 semoe_err_msg());
    CHECK(gpu_graph_bf16_new(part, 1, 4, -1, &g) == SEMOE_EINVAL && !g, "expert rows -1");
    size_t nf = model_params_slab_floats(part);
    float *wd = gpu_alloc(nf * sizeof(float));
    int32_t tok[5] = {1, 2, 3, 4, 5};
    model_loss_t l;
    for (int rows = 0; rows <= 8; rows += 8) {
        S_NEED(gpu_graph_bf16_new(part, 1, 4, rows, &g) == SEMOE_OK, "graph: %s",
               semoe_err_msg());
        CHECK(gpu_graph_bf16_forward(g, wd, tok, NULL, &l) == SEMOE_EINVAL,
              "a forward over 3 of 16 experts without %s", rows ? "an exchange" : "expert rows");
        printf("refusals: %s\n", semoe_err_msg());
        gpu_graph_bf16_destroy(&g);
    }
    gpu_free(wd);
    model_params_destroy(&part);
}

int main(void)
{
    test_init("gpu_ep_bf16");
    if (gpu_device_count() == 0) {
        printf("no CUDA device (%s): skipped\n", semoe_err_msg());
        return 77;
    }
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init: %s", semoe_err_msg());
    static s_ref_t ref;
    s_config(&ref.cfg);
    s_refusals(&ref);
    void *ctx = zmq_ctx_new();
    for (int parts = 1; parts <= 3; parts += 2) {
        s_world(&ref, ctx, 2, false, parts);
        s_world(&ref, ctx, 2, true, parts);
        s_world(&ref, ctx, 3, false, parts);
        s_world(&ref, ctx, 3, true, parts);
    }
    zmq_ctx_term(ctx);
    model_params_destroy(&ref.full);
    free(ref.grads);
    free(ref.route);
    return test_finish();
}
