/* Expert parallelism (worker/exchange.c) against one process: W ranks as threads on loopback,
 * each holding a share of the experts and of the batch, must give the single process's global
 * loss and gradients (dense ones after an all-reduce, expert ones on their holders, replicas'
 * shares summed), receive exactly the rows the routing implies between them, and train to the
 * same losses over several AdamW steps. Each world size runs with one holder per expert and
 * again with random replicas, each two or three ways: the rows as host messages over the comm;
 * through a direct transport (worker_exchange_set_xfer, the path NCCL takes on GPUs) that here
 * moves them between the threads' buffers in host memory, pairing sends and receives in order;
 * and for even W the same in two hops, the ranks split into two emulated hosts
 * (worker_exchange_set_hosts: within hosts first, then across). */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "model/backend.h"
#include "model/graph.h"
#include "model/job.h"
#include "model/params.h"
#include "model/train.h"
#include "tests/ep_util.h"
#include "tests/harness.h"
#include "worker/comm.h"
#include "worker/exchange.h"

#define MAXW 4
#define T_TIMEOUT 30000
#define B_SEQ 6     /* sequences in the global batch */
#define T_SEQ 16    /* tokens per sequence */
#define N_STEPS 5
#define TOL 1e-5
#define S_TIE 1e-6  /* a router margin within fp32 noise: the ranks may route otherwise */


static const model_backend_f32_t *be = &cpu_backend_f32;

/* What every rank compares with: the single process's results (read-only in the threads). */
typedef struct {
    model_job_t job;
    model_params_t *full;          /* every expert, perturbed weights */
    int32_t tok[B_SEQ * (T_SEQ + 1)];          /* the batch of the gradient check */
    uint8_t steps_tok[N_STEPS][B_SEQ * (T_SEQ + 1)]; /* the batches of the training steps */
    model_loss_t loss;
    float *grads;                  /* params-shaped, full */
    int32_t *routed;               /* (L, E) rows routed to each expert over the batch */
    double step_loss[N_STEPS], step_norm[N_STEPS];
    int tight_steps;               /* steps compared within TOL: those before a routing near tie */
    /* per world size */
    test_ep_place_t pl;            /* the experts' holders, as a PLAN gives them */
    int64_t recv_sum[64];          /* rows each expert received, summed over its holders */
    double max_loss_err, max_dense_err, max_expert_err, max_step_err;
} s_ref_t;

static double s_unif(double a)
{
    return a * (2.0 * test_rand_unit() - 1.0);
}

static void s_job(model_job_t *job)
{
    model_job_defaults(job);
    model_config_t *c = &job->model;
    c->vocab_size = 64;
    c->hidden_size = 32;
    c->intermediate_size = 48;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->head_dim = 8;
    c->num_local_experts = 8;
    c->num_experts_per_tok = 2;
    c->max_position_embeddings = 64;
    c->router_aux_loss_coef = 0.1; /* large enough that a wrong aux shows */
    c->tie_word_embeddings = false;
    job->train.seq_len = T_SEQ;
    job->train.global_batch = B_SEQ;
    job->train.micro_batch = B_SEQ;
    job->train.lr = 1e-2;
    job->train.min_lr = 1e-3;
    job->train.warmup_steps = 1;
    snprintf(job->train.schedule, sizeof job->train.schedule, "cosine");
    /* weight decay, betas and eps: model_job_defaults (0.1, 0.9, 0.95, 1e-8) */
    job->train.grad_clip = 1.0;
    job->train.steps = 10;
}

/* ||a - b|| / ||b|| over n floats (0 when both are zero). */
static double s_rel(const float *a, const float *b, size_t n)
{
    double d = 0, r = 0;
    for (size_t i = 0; i < n; i++) {
        d += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        r += (double)b[i] * b[i];
    }
    return r > 0 ? sqrt(d / r) : sqrt(d);
}

/* The smallest gap, over n rows of E router probabilities, between a row's K-th and (K+1)-th
 * largest. */
static double s_router_gap(const float *p, int n, int E, int K)
{
    double gap = 1.0;
    for (int i = 0; i < n && K < E; i++) {
        float top[65];
        int m = 0;
        for (int e = 0; e < E; e++) { /* insertion, descending */
            float v = p[(size_t)i * E + e];
            int j = m++;
            while (j > 0 && top[j - 1] < v) {
                top[j] = top[j - 1];
                j--;
            }
            top[j] = v;
        }
        gap = fmin(gap, (double)top[K - 1] - top[K]);
    }
    return gap;
}

static void s_max(double *m, double v)
{
    test_lock();
    if (v > *m || isnan(v))
        *m = v;
    test_unlock();
}


/* The held dense tensors of a params-shaped slab, for comm_allreduce_buckets. */
static int s_dense(const model_params_t *p, float *slab, float **bufs, size_t *lens)
{
    int n = 0;
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->data && t->kind == MODEL_PARAM_DENSE) {
            bufs[n] = slab + t->offset;
            lens[n++] = (size_t)t->numel;
        }
    }
    return n;
}

/* --- a direct transport in host memory --------------------------------------------------- */

#define Q_CAP 256 /* posted sends per (sender, receiver) pair at a time */

/* What every rank of a world posts and takes: per (from, to) pair a FIFO of sends. */
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    const void *buf[MAXW][MAXW][Q_CAP];
    size_t bytes[MAXW][MAXW][Q_CAP];
    uint64_t head[MAXW][MAXW], tail[MAXW][MAXW]; /* taken, posted */
} s_board_t;

typedef struct {
    s_board_t *b;
    int me;
} s_board_rank_t;

/* Waits on the board's condition until deadline (CLOCK_REALTIME); false once it passed. */
static bool s_board_wait(s_board_t *b, const struct timespec *deadline)
{
    return pthread_cond_timedwait(&b->cv, &b->mu, deadline) != ETIMEDOUT;
}

/* worker_xfer_t's run: posts this rank's sends, takes its receives in the order listed (each
 * waits for the sender's next post to this rank and must match its size), copies its own
 * chunks, and returns once the others took all it posted (the buffers are its caller's). */
static semoe_rc s_board_run(void *state, const worker_xfer_op_t *ops, int n, int timeout_ms)
{
    s_board_rank_t *br = state;
    s_board_t *b = br->b;
    int me = br->me;
    struct timespec dl;
    clock_gettime(CLOCK_REALTIME, &dl);
    dl.tv_sec += timeout_ms / 1000 + 1;
    semoe_rc rc = SEMOE_OK;
    pthread_mutex_lock(&b->mu);
    for (int i = 0; i < n; i++) {
        const worker_xfer_op_t *o = &ops[i];
        if (o->peer == me || !o->send)
            continue;
        uint64_t t = b->tail[me][o->peer]++;
        if (t - b->head[me][o->peer] >= Q_CAP) {
            rc = semoe_err(SEMOE_EPROTO, "board: more than %d sends to rank %d", Q_CAP, o->peer);
            break;
        }
        b->buf[me][o->peer][t % Q_CAP] = o->send;
        b->bytes[me][o->peer][t % Q_CAP] = o->bytes;
    }
    pthread_cond_broadcast(&b->cv);
    for (int i = 0; i < n && rc == SEMOE_OK; i++) {
        const worker_xfer_op_t *o = &ops[i];
        if (o->peer == me) {
            memcpy(o->recv, o->send, o->bytes);
            continue;
        }
        if (!o->recv)
            continue;
        int p = o->peer;
        while (b->head[p][me] == b->tail[p][me] && rc == SEMOE_OK)
            if (!s_board_wait(b, &dl))
                rc = semoe_err(SEMOE_ETIMEDOUT, "board: rank %d: nothing from rank %d", me, p);
        if (rc != SEMOE_OK)
            break;
        uint64_t h = b->head[p][me]++;
        if (b->bytes[p][me][h % Q_CAP] != o->bytes) {
            rc = semoe_err(SEMOE_EPROTO, "board: rank %d expects %zu bytes from rank %d, which "
                           "sent %zu", me, o->bytes, p, b->bytes[p][me][h % Q_CAP]);
            break;
        }
        memcpy(o->recv, b->buf[p][me][h % Q_CAP], o->bytes);
        pthread_cond_broadcast(&b->cv);
    }
    for (int p = 0; p < MAXW && rc == SEMOE_OK; p++) /* ours taken: our buffers are free */
        while (b->head[me][p] != b->tail[me][p] && rc == SEMOE_OK)
            if (!s_board_wait(b, &dl))
                rc = semoe_err(SEMOE_ETIMEDOUT, "board: rank %d's sends to %d not taken", me, p);
    pthread_mutex_unlock(&b->mu);
    return rc;
}

/* --- one rank ------------------------------------------------------------------------------ */

typedef struct {
    const s_ref_t *ref;
    s_ref_t *out; /* the error maxima */
    uint32_t rank;
    comm_port_t *port;
    const char *const *eps;
    s_board_t *board; /* NULL: the rows as host messages over the comm */
    bool hosts;       /* with board: two emulated hosts, two hops */
    pthread_t th;
} s_rank_t;

typedef struct {
    comm_t *comm;
    worker_exchange_t *x;
    model_params_t *p;
    const float *grads; /* the gradient slab the norm is taken of */
} s_hook_t;

static semoe_rc s_reduce_grads(void *arg, float *grads, size_t n)
{
    (void)n;
    s_hook_t *h = arg;
    size_t count = model_params_count(h->p);
    float **bufs = calloc(count, sizeof *bufs);
    size_t *lens = calloc(count, sizeof *lens);
    int nb = s_dense(h->p, grads, bufs, lens);
    semoe_rc rc = comm_allreduce_buckets(h->comm, bufs, lens, nb, (size_t)1 << 16, T_TIMEOUT);
    free(bufs);
    free(lens);
    if (rc == SEMOE_OK)
        rc = worker_exchange_sum_replicas(h->x, h->p, grads);
    return rc;
}

/* Dense gradients are replicated after the all-reduce: counted once; each expert once, on its
 * first holder. */
static semoe_rc s_reduce_sumsq(void *arg, double dense, double expert, double *global)
{
    (void)expert;
    s_hook_t *h = arg;
    model_exchange_f32 ex = worker_exchange_f32(h->x);
    double mine = worker_exchange_expert_sumsq(h->x, h->p, h->grads);
    SEMOE_CHECK(ex.reduce_stats(ex.state, &mine, 1));
    expert = mine;
    *global = dense + expert;
    return SEMOE_OK;
}

/* A layer's rows in parts, several dispatched before the first comes back (the bf16 pass's
 * overlap: dispatch 0, dispatch 1, combine 0, dispatch 2, combine 1, combine 2), every part
 * announcing its counts before any rows move (a dispatch with recv NULL), after a stale announce
 * of part 0 with other counts: each part's rows reach the
 * experts' holders and return bit for bit through their own part's combine, the counts
 * announced are those delivered, and what the holders received adds up over the parts. The counts and values depend on rank, part
 * and expert, so that a part combined with another's records would show. */
static void s_check_parts(const s_ref_t *ref, uint32_t r, const model_exchange_f32 *ex,
                          worker_exchange_t *x)
{
    enum { P = 3, D = 3 };
    const model_config_t *cfg = &ref->job.model;
    int E = (int)cfg->num_local_experts, l = (int)cfg->num_hidden_layers - 1;
    int cap = 4 * E * (int)ref->pl.world;
    int32_t sc[P][64], rc[P][64];
    float *send[P], *recv[P], *back[P];
    int n[P], got[64] = {0};
    for (int p = 0; p < P; p++) {
        n[p] = 0;
        for (int e = 0; e < E; e++)
            n[p] += sc[p][e] = (int32_t)((r * 7 + (uint32_t)p * 3 + (uint32_t)e * 5) % 5);
        send[p] = malloc(((size_t)n[p] + 1) * D * sizeof(float));
        recv[p] = malloc((size_t)cap * D * sizeof(float));
        back[p] = malloc(((size_t)n[p] + 1) * D * sizeof(float));
        for (int i = 0; i < n[p] * D; i++)
            send[p][i] = (float)(r * 100000 + (uint32_t)p * 10000 + (uint32_t)i);
    }
    /* a stale announce of part 0 with other counts (a forward that failed before its rows
     * moved), then every part announced before any rows move, as the bf16 layer does */
    enum { STALE, ANNOUNCE, DISPATCH, COMBINE };
    static const struct {
        int part, op;
    } order[] = {{0, STALE},    {0, ANNOUNCE}, {1, ANNOUNCE}, {2, ANNOUNCE},
                 {0, DISPATCH}, {1, DISPATCH}, {0, COMBINE},  {2, DISPATCH},
                 {1, COMBINE},  {2, COMBINE}};
    int32_t ann[P][64], stale[64];
    for (int e = 0; e < E; e++)
        stale[e] = sc[0][(e + 1) % E] + 1;
    semoe_rc rc0 = SEMOE_OK;
    for (size_t step = 0; step < sizeof order / sizeof order[0] && rc0 == SEMOE_OK; step++) {
        int p = order[step].part;
        bool disp = order[step].op == DISPATCH;
        if (order[step].op == STALE || order[step].op == ANNOUNCE) {
            bool st = order[step].op == STALE;
            rc0 = ex->dispatch(ex->state, l, p, E, D, send[p], st ? stale : sc[p], NULL,
                               st ? ann[0] : ann[p], 0);
            TCHECK(rc0 == SEMOE_OK, "rank %u: part %d's counts: %s", r, p, semoe_err_msg());
            continue;
        }
        if (disp)
            rc0 = ex->dispatch(ex->state, l, p, E, D, send[p], sc[p], recv[p], rc[p], cap);
        else
            rc0 = ex->combine(ex->state, l, p, E, D, recv[p], rc[p], back[p], sc[p]);
        TCHECK(rc0 == SEMOE_OK, "rank %u: part %d %s: %s", r, p, disp ? "dispatch" : "combine",
               semoe_err_msg());
        if (disp)
            for (int e = 0; e < E; e++) {
                got[e] += rc[p][e];
                TCHECK(rc0 != SEMOE_OK || ann[p][e] == rc[p][e], "rank %u: part %d expert %d: "
                       "%d rows announced, %d delivered", r, p, e, ann[p][e], rc[p][e]);
            }
    }
    for (int p = 0; p < P && rc0 == SEMOE_OK; p++)
        TCHECK(memcmp(send[p], back[p], (size_t)n[p] * D * sizeof(float)) == 0,
               "rank %u: part %d's rows came back changed", r, p);
    for (int e = 0; e < E && rc0 == SEMOE_OK; e++)
        TCHECK(worker_exchange_received(x, l, e) == got[e], "rank %u: expert %d: %lld received "
               "over the parts, the dispatches said %d", r, e,
               (long long)worker_exchange_received(x, l, e), got[e]);
    /* a combine of a part never dispatched is refused */
    TCHECK(ex->combine(ex->state, l, P + 1, E, D, recv[0], rc[0], back[0], sc[0]) ==
               SEMOE_EINVAL, "rank %u: a combine of part %d without its dispatch", r, P + 1);
    for (int p = 0; p < P; p++) {
        free(send[p]);
        free(recv[p]);
        free(back[p]);
    }
}

static void s_rank_body(s_rank_t *me, comm_t *comm)
{
    const s_ref_t *ref = me->ref;
    const model_config_t *cfg = &ref->job.model;
    uint32_t W = ref->pl.world, r = me->rank;
    int L = (int)cfg->num_hidden_layers, E = (int)cfg->num_local_experts;
    int K = (int)cfg->num_experts_per_tok;
    int b0 = (int)(r * B_SEQ / W), b1 = (int)((r + 1) * B_SEQ / W), nb = b1 - b0;
    int R = B_SEQ * T_SEQ * K; /* every routed row of the global batch: always enough */
    model_params_t *p = test_ep_rank_params(&ref->pl, ref->full, r);
    worker_exchange_t *x = NULL;
    model_acts_f32 *acts = NULL;
    float *grads = NULL;
    model_train_t *tr = NULL;
    TCHECK(p != NULL, "rank %u: params", r);
    semoe_rc rc = worker_exchange_new(comm, be, L, E, ref->pl.hoff, ref->pl.hold, T_TIMEOUT, &x);
    TCHECK(rc == SEMOE_OK, "rank %u: exchange: %s", r, semoe_err_msg());
    if (!p || rc != SEMOE_OK)
        goto done;
    s_board_rank_t br = {me->board, (int)r};
    if (me->board)
        worker_exchange_set_xfer(x, &(worker_xfer_t){&br, s_board_run});
    if (me->board && me->hosts) { /* two emulated hosts: ranks 0 .. W/2-1 and the rest */
        int host[MAXW];
        for (uint32_t k = 0; k < W; k++)
            host[k] = (int)(k >= W / 2);
        rc = worker_exchange_set_hosts(x, host);
        TCHECK(rc == SEMOE_OK, "rank %u: hosts: %s", r, semoe_err_msg());
    }
    model_exchange_f32 ex = worker_exchange_f32(x);

    /* forward + backward over this rank's rows, dense gradients summed over ranks */
    rc = model_acts_new_f32(be, p, nb, T_SEQ, R, &acts);
    TCHECK(rc == SEMOE_OK, "rank %u: acts: %s", r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;
    model_loss_t loss = {0};
    rc = model_forward_f32(be, p, model_params_slab(p), acts,
                           ref->tok + (size_t)b0 * (T_SEQ + 1), &ex, &loss);
    TCHECK(rc == SEMOE_OK, "W %u rank %u: forward: %s", W, r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;
    grads = model_slab_new_f32(be, p);
    rc = model_backward_f32(be, p, model_params_slab(p), grads, acts, &ex);
    TCHECK(rc == SEMOE_OK, "W %u rank %u: backward: %s", W, r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;
    s_hook_t hook = {comm, x, p, grads};
    rc = s_reduce_grads(&hook, grads, 0);
    TCHECK(rc == SEMOE_OK, "W %u rank %u: all-reduce: %s", W, r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;

    double el = fabs(loss.loss - ref->loss.loss) / fabs(ref->loss.loss);
    double ea = fabs(loss.aux - ref->loss.aux) / fabs(ref->loss.aux);
    double ec = fabs(loss.ce - ref->loss.ce) / fabs(ref->loss.ce);
    TCHECK(el < TOL && ea < TOL && ec < TOL,
           "W %u rank %u: loss %.9g ce %.9g aux %.9g, one process %.9g %.9g %.9g", W, r,
           loss.loss, loss.ce, loss.aux, ref->loss.loss, ref->loss.ce, ref->loss.aux);
    TCHECK(loss.tokens == B_SEQ * T_SEQ, "W %u rank %u: loss over %lld targets", W, r,
           (long long)loss.tokens);
    s_max(&me->out->max_loss_err, fmax(el, fmax(ea, ec)));
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (!t->data)
            continue;
        double e = s_rel(grads + t->offset, ref->grads + model_params_at(ref->full, i)->offset,
                         (size_t)t->numel);
        TCHECK(e < TOL, "W %u rank %u: gradient of %s differs by %.3g (norm-wise)", W, r,
               t->name, e);
        s_max(t->kind == MODEL_PARAM_DENSE ? &me->out->max_dense_err
                                           : &me->out->max_expert_err, e);
    }
    /* a held expert received its share of the rows routed to it (the holders' shares add up
     * to them: checked after the threads); nothing else arrived */
    for (int l = 0; l < L; l++)
        for (int j = 0; j < E; j++) {
            int e = l * E + j, held = test_ep_holds(&ref->pl, e, r);
            int64_t got = worker_exchange_received(x, l, j);
            uint32_t k = ref->pl.hoff[e + 1] - ref->pl.hoff[e];
            TCHECK(got == acts->recv_counts[e] && (held || got == 0) &&
                       (!held || k > 1 || got == ref->routed[e]),
                   "W %u rank %u: layer %d expert %d (%u holders): %lld rows received "
                   "(graph %d), routed %d", W, r, l, j, k, (long long)got,
                   acts->recv_counts[e], ref->routed[e]);
            test_lock();
            me->out->recv_sum[e] += got;
            test_unlock();
            TCHECK(model_params_holds_expert(p, (uint32_t)l, (uint32_t)j) == held,
                   "W %u rank %u: holds expert (%d, %d)", W, r, l, j);
        }

    /* training: the same AdamW steps as one process */
    rc = model_train_new(be, p, &ref->job, &tr);
    TCHECK(rc == SEMOE_OK, "rank %u: trainer: %s", r, semoe_err_msg());
    if (rc == SEMOE_OK)
        rc = model_train_set_expert_rows(tr, R);
    TCHECK(rc == SEMOE_OK, "rank %u: expert rows: %s", r, semoe_err_msg());
    if (rc != SEMOE_OK)
        goto done;
    hook.grads = model_train_grads(tr);
    model_train_hooks_t hooks = {.arg = &hook, .reduce_grads = s_reduce_grads,
                                 .reduce_sumsq = s_reduce_sumsq, .ex = &ex};
    for (int step = 0; step < N_STEPS; step++) {
        model_train_report_t rep;
        rc = model_train_step(tr, ref->steps_tok[step] + (size_t)b0 * (T_SEQ + 1),
                              (uint32_t)nb, (uint64_t)step, &hooks, &rep);
        TCHECK(rc == SEMOE_OK, "W %u rank %u step %d: %s", W, r, step, semoe_err_msg());
        if (rc != SEMOE_OK)
            break;
        double e = fabs(rep.loss - ref->step_loss[step]) / fabs(ref->step_loss[step]);
        double en = fabs(rep.grad_norm - ref->step_norm[step]) / ref->step_norm[step];
        if (step >= ref->tight_steps) {
            TCHECK(isfinite(rep.loss) && isfinite(rep.grad_norm), "W %u rank %u step %d: loss "
                   "%g norm %g", W, r, step, rep.loss, rep.grad_norm);
            continue;
        }
        TCHECK(e < TOL && en < TOL,
               "W %u rank %u step %d: loss %.9g norm %.9g, one process %.9g %.9g", W, r, step,
               rep.loss, rep.grad_norm, ref->step_loss[step], ref->step_norm[step]);
        s_max(&me->out->max_step_err, fmax(e, en));
    }
    if (rc == SEMOE_OK)
        s_check_parts(ref, r, &ex, x);
done:
    model_train_destroy(&tr);
    model_slab_destroy_f32(be, &grads);
    model_acts_destroy_f32(&acts);
    worker_exchange_destroy(&x);
    model_params_destroy(&p);
}

static void *s_rank_main(void *arg)
{
    s_rank_t *me = arg;
    comm_t *c = NULL;
    semoe_rc rc = comm_new(me->port, 1, me->rank, me->ref->pl.world, me->eps, &c);
    TCHECK(rc == SEMOE_OK, "comm_new rank %u: %s", me->rank, semoe_err_msg());
    if (rc != SEMOE_OK)
        return NULL;
    s_rank_body(me, c);
    comm_destroy(&c);
    return NULL;
}

static void s_run_world(s_ref_t *ref, void *ctx, uint32_t W, bool replicas, int direct)
{
    int LE = (int)(ref->job.model.num_hidden_layers * ref->job.model.num_local_experts);
    test_ep_place(&ref->pl, LE, W, replicas);
    static s_board_t board;
    memset(&board, 0, sizeof board);
    pthread_mutex_init(&board.mu, NULL);
    pthread_cond_init(&board.cv, NULL);
    memset(ref->recv_sum, 0, sizeof ref->recv_sum);
    ref->max_loss_err = ref->max_dense_err = ref->max_expert_err = ref->max_step_err = 0;
    comm_port_t *ports[MAXW] = {0};
    char ep_text[MAXW][256];
    const char *eps[MAXW];
    for (uint32_t r = 0; r < W; r++) {
        if (comm_port_new(ctx, "tcp://127.0.0.1:*", &ports[r]) != SEMOE_OK) {
            fprintf(stderr, "comm_port_new: %s\n", semoe_err_msg());
            exit(1);
        }
        snprintf(ep_text[r], sizeof ep_text[r], "%s", comm_port_endpoint(ports[r]));
        eps[r] = ep_text[r];
    }
    s_rank_t ranks[MAXW];
    for (uint32_t r = 0; r < W; r++) {
        ranks[r] = (s_rank_t){.ref = ref, .out = ref, .rank = r, .port = ports[r], .eps = eps,
                              .board = direct ? &board : NULL, .hosts = direct == 2};
        pthread_create(&ranks[r].th, NULL, s_rank_main, &ranks[r]);
    }
    for (uint32_t r = 0; r < W; r++)
        pthread_join(ranks[r].th, NULL);
    for (uint32_t r = 0; r < W; r++)
        comm_port_destroy(&ports[r]);
    uint32_t copies = ref->pl.hoff[LE];
    for (int e = 0; e < LE; e++)
        CHECK(ref->recv_sum[e] == ref->routed[e], "W %u: expert %d: its %u holders received %lld "
              "rows, %d were routed to it", W, e, ref->pl.hoff[e + 1] - ref->pl.hoff[e],
              (long long)ref->recv_sum[e], ref->routed[e]);
    printf("W=%u, %u copies of %d experts, rows %s: relative errors: loss %.2e, dense grads "
           "%.2e, expert grads %.2e, 5 steps %.2e\n", W, copies, LE,
           direct == 2 ? "direct, two hosts" : direct ? "direct" : "over the comm",
           ref->max_loss_err, ref->max_dense_err,
           ref->max_expert_err, ref->max_step_err);
    pthread_cond_destroy(&board.cv);
    pthread_mutex_destroy(&board.mu);
}

/* A local exchange with an identity reduce_stats must give the NULL exchange's results: the
 * global-loss path of the graph against the backend's aux op. */
static semoe_rc s_identity(void *state, double *buf, size_t n)
{
    (void)state;
    (void)buf;
    (void)n;
    return SEMOE_OK;
}

int main(void)
{
    test_init("ep");
    static s_ref_t ref;
    s_job(&ref.job);
    const model_config_t *cfg = &ref.job.model;
    int L = (int)cfg->num_hidden_layers, E = (int)cfg->num_local_experts;
    REQUIRE(model_params_new(cfg, NULL, 0, &ref.full) == SEMOE_OK, "params: %s",
            semoe_err_msg());
    model_params_init(ref.full, test_rand());
    for (size_t i = 0; i < model_params_count(ref.full); i++) {
        const model_param_t *t = model_params_at(ref.full, i);
        for (uint64_t e = 0; e < t->numel; e++)
            t->data[e] = t->ndim == 1 ? (float)(1.0 + s_unif(0.3))
                                      : t->data[e] + (float)s_unif(0.3);
    }
    for (size_t i = 0; i < sizeof ref.tok / sizeof ref.tok[0]; i++)
        ref.tok[i] = (int32_t)test_rand_below(cfg->vocab_size);
    for (int s = 0; s < N_STEPS; s++)
        for (size_t i = 0; i < sizeof ref.steps_tok[s]; i++)
            ref.steps_tok[s][i] = (uint8_t)test_rand_below(cfg->vocab_size);

    /* the reference: one process, every expert, the whole batch */
    model_acts_f32 *acts = NULL;
    REQUIRE(model_acts_new_f32(be, ref.full, B_SEQ, T_SEQ, 0, &acts) == SEMOE_OK, "acts: %s",
            semoe_err_msg());
    float *w = model_params_slab(ref.full);
    REQUIRE(model_forward_f32(be, ref.full, w, acts, ref.tok, NULL, &ref.loss) == SEMOE_OK,
            "forward: %s", semoe_err_msg());
    ref.grads = model_slab_new_f32(be, ref.full);
    REQUIRE(model_backward_f32(be, ref.full, w, ref.grads, acts, NULL) == SEMOE_OK,
            "backward: %s", semoe_err_msg());
    ref.routed = calloc((size_t)L * E, sizeof(int32_t));
    memcpy(ref.routed, acts->send_counts, (size_t)L * E * sizeof(int32_t));
    CHECK(ref.loss.aux > 0.5 && ref.loss.tokens == B_SEQ * T_SEQ, "aux %g tokens %lld",
          ref.loss.aux, (long long)ref.loss.tokens);

    /* the global-loss path with a one-process "sum" equals the backend's ops */
    model_exchange_f32 idx = model_exchange_local_f32(be);
    idx.reduce_stats = s_identity;
    model_loss_t l2;
    float *g2 = model_slab_new_f32(be, ref.full);
    REQUIRE(model_forward_f32(be, ref.full, w, acts, ref.tok, &idx, &l2) == SEMOE_OK,
            "forward: %s", semoe_err_msg());
    REQUIRE(model_backward_f32(be, ref.full, w, g2, acts, &idx) == SEMOE_OK, "backward: %s",
            semoe_err_msg());
    size_t nf = (size_t)model_params_slab_floats(ref.full);
    double eg = s_rel(g2, ref.grads, nf);
    CHECK(fabs(l2.loss - ref.loss.loss) < 1e-6 * fabs(ref.loss.loss) &&
              fabs(l2.aux - ref.loss.aux) < 1e-6 * ref.loss.aux && eg < 1e-6,
          "global path on one process: loss %.9g aux %.9g vs %.9g %.9g, grads %.3g", l2.loss,
          l2.aux, ref.loss.loss, ref.loss.aux, eg);
    model_slab_destroy_f32(be, &g2);
    model_acts_destroy_f32(&acts);

    /* the reference training run; before each step, the router's smallest margin between a
     * token's K-th and (K+1)-th expert over the step's batch: where it is within fp32 noise,
     * the ranks' sums (in another order) may route that token otherwise, and the runs part */
    model_train_t *tr = NULL;
    REQUIRE(model_train_new(be, ref.full, &ref.job, &tr) == SEMOE_OK, "trainer: %s",
            semoe_err_msg());
    REQUIRE(model_acts_new_f32(be, ref.full, B_SEQ, T_SEQ, 0, &acts) == SEMOE_OK, "acts: %s",
            semoe_err_msg());
    ref.tight_steps = N_STEPS;
    int32_t wide[B_SEQ * (T_SEQ + 1)];
    for (int s = 0; s < N_STEPS; s++) {
        for (size_t i = 0; i < sizeof wide / sizeof wide[0]; i++)
            wide[i] = ref.steps_tok[s][i];
        model_loss_t lm;
        REQUIRE(model_forward_f32(be, ref.full, model_train_weights(tr), acts, wide, NULL,
                                  &lm) == SEMOE_OK,
                "margin forward: %s", semoe_err_msg());
        double gap = s_router_gap(acts->a.rprobs, L * B_SEQ * T_SEQ, E,
                                  (int)cfg->num_experts_per_tok);
        if (gap < S_TIE && ref.tight_steps == N_STEPS) {
            ref.tight_steps = s;
            printf("step %d: a router margin of %.2g: the ranks may route otherwise from here; "
                   "steps %d.. are held finite only\n", s, gap, s);
        }
        model_train_report_t rep;
        REQUIRE(model_train_step(tr, ref.steps_tok[s], B_SEQ, (uint64_t)s, NULL, &rep) ==
                    SEMOE_OK,
                "step %d: %s", s, semoe_err_msg());
        ref.step_loss[s] = rep.loss;
        ref.step_norm[s] = rep.grad_norm;
    }
    model_train_destroy(&tr);
    model_acts_destroy_f32(&acts);

    void *ctx = zmq_ctx_new();
    for (uint32_t W = 2; W <= MAXW; W++)
        for (int direct = 0; direct < (W % 2 ? 2 : 3); direct++) {
            s_run_world(&ref, ctx, W, false, direct);
            s_run_world(&ref, ctx, W, true, direct);
        }
    zmq_ctx_term(ctx);

    free(ref.routed);
    model_slab_destroy_f32(be, &ref.grads);
    model_params_destroy(&ref.full);
    return test_finish();
}
