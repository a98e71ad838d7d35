/* One training step on one process (model/train.h): micro-batch gradient accumulation scaled to
 * the global batch's mean loss, global-norm clipping and AdamW with decoupled weight decay on
 * the matrices, over the float backend table. */
#include "model/train.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* A run of held tensors contiguous in the slab that share a weight-decay rule and a kind:
 * AdamW and the sum of squares go run by run (few calls, even on a device). */
typedef struct {
    size_t off, len;
    int decay;  /* matrices: 1; RMSNorm weights (1-D): 0 */
    int expert; /* MODEL_PARAM_EXPERT: summed apart for reduce_sumsq */
    int frozen; /* the router's gate under train.freeze_router: no update, not in the norm */
} s_run_t;

/* The state of one forward/backward for a number of rows: the graph's activations, or the
 * pass's own. */
typedef struct {
    int rows; /* 0: none */
    model_acts_f32 *acts;
    void *ps;
} s_acts_t;

struct model_train {
    const model_backend_f32_t *be;
    model_params_t *params;
    const model_job_t *job;
    uint32_t mb, seq, gb;
    size_t n;         /* floats per slab */
    float *w, *g, *m, *v;
    float *gtmp;      /* one micro-batch's gradient, before scaling into g (made on first use) */
    const model_pass_t *pass; /* NULL: model/graph.h's pass over be */
    s_acts_t acts;    /* micro_batch x seq_len */
    s_acts_t tail[2]; /* other micro-batch sizes (a shorter last one, or the two sizes of an
                       * even spread), made on demand, least recent replaced */
    int tail_next;           /* the entry the next new size replaces */
    int32_t *tok;     /* (micro_batch, seq_len + 1) host tokens for the graph */
    s_run_t *runs;
    size_t n_runs;
    int t;            /* AdamW step count */
    int R;            /* expert rows an exchange may deliver per micro-batch (0: local) */
    float *rbias;     /* (E) backend memory: train.router_bias, or NULL */
};

static double s_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

double model_train_lr(const model_job_t *job, uint64_t step)
{
    double lr = job->train.lr, min_lr = job->train.min_lr;
    uint64_t warm = job->train.warmup_steps, steps = job->train.steps;
    if (step < warm)
        return lr * (double)step / (double)warm;
    if (strcmp(job->train.schedule, "constant") == 0)
        return lr;
    double p = steps > warm ? (double)(step - warm) / (double)(steps - warm) : 1.0;
    if (p > 1.0)
        p = 1.0;
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + cos(M_PI * p));
}

/* The router's gate of an MoE layer (what train.freeze_router keeps as it is). */
static bool s_is_router(const model_param_t *p)
{
    static const char suffix[] = ".block_sparse_moe.gate.weight";
    size_t n = strlen(p->name), k = sizeof suffix - 1;
    return p->kind == MODEL_PARAM_DENSE && n > k && strcmp(p->name + n - k, suffix) == 0;
}

static semoe_rc s_acts_new(model_train_t *tr, int rows, s_acts_t *a)
{
    *a = (s_acts_t){0};
    if (tr->pass) {
        SEMOE_CHECK(tr->pass->create(tr->params, rows, (int)tr->seq, tr->R, &a->ps));
        tr->pass->set_router_bias(a->ps, tr->rbias);
    } else {
        SEMOE_CHECK(model_acts_new_f32(tr->be, tr->params, rows, (int)tr->seq, tr->R, &a->acts));
        a->acts->router_bias = tr->rbias;
    }
    a->rows = rows;
    return SEMOE_OK;
}

static void s_acts_destroy(model_train_t *tr, s_acts_t *a)
{
    if (tr->pass && a->ps)
        tr->pass->destroy(&a->ps);
    model_acts_destroy_f32(&a->acts);
    *a = (s_acts_t){0};
}

static semoe_rc s_forward(model_train_t *tr, s_acts_t *a, const model_exchange_f32 *ex,
                          model_loss_t *loss)
{
    if (tr->pass)
        return tr->pass->forward(a->ps, tr->w, tr->tok, ex, loss);
    return model_forward_f32(tr->be, tr->params, tr->w, a->acts, tr->tok, ex, loss);
}

static semoe_rc s_backward(model_train_t *tr, s_acts_t *a, float *g, const model_exchange_f32 *ex)
{
    return model_backward_f32(tr->be, tr->params, tr->w, g, a->acts, ex);
}

semoe_rc model_train_new(const model_backend_f32_t *be, model_params_t *params,
                         const model_job_t *job, model_train_t **out)
{
    return model_train_new_pass(be, NULL, params, job, out);
}

semoe_rc model_train_new_pass(const model_backend_f32_t *be, const model_pass_t *pass,
                              model_params_t *params, const model_job_t *job,
                              model_train_t **out)
{
    *out = NULL;
    uint32_t mb = job->train.micro_batch, seq = job->train.seq_len, gb = job->train.global_batch;
    if (mb == 0 || seq == 0 || gb == 0)
        return semoe_err(SEMOE_EINVAL,
                         "model train: micro_batch=%u seq_len=%u global_batch=%u: each must be "
                         ">= 1",
                         mb, seq, gb);
    if (strcmp(job->train.schedule, "cosine") != 0 && strcmp(job->train.schedule, "constant") != 0)
        return semoe_err(SEMOE_EINVAL,
                         "model train: schedule=\"%s\": use \"cosine\" or \"constant\"",
                         job->train.schedule);
    const model_config_t *cfg = model_params_config(params);
    if (job->train.router_bias && job->model.num_local_experts != cfg->num_local_experts)
        return semoe_err(SEMOE_EINVAL, "model train: train.router_bias has %u values (the job's "
                         "model.num_local_experts), the model %u experts per layer",
                         job->model.num_local_experts, cfg->num_local_experts);
    model_train_t *tr = semoe_xcalloc(1, sizeof *tr);
    tr->be = be;
    tr->params = params;
    tr->job = job;
    tr->mb = mb;
    tr->seq = seq;
    tr->gb = gb;
    tr->pass = pass;
    tr->n = (size_t)model_params_slab_floats(params);
    if (job->train.router_bias) {
        uint32_t E = cfg->num_local_experts;
        float *h = semoe_xcalloc(E, sizeof *h);
        for (uint32_t e = 0; e < E; e++)
            h[e] = (float)job->train.router_bias[e];
        tr->rbias = be->alloc(E * sizeof *h);
        be->to_device(tr->rbias, h, E * sizeof *h);
        free(h);
    }
    semoe_rc rc = s_acts_new(tr, (int)mb, &tr->acts);
    if (rc != SEMOE_OK) {
        be->free(tr->rbias);
        free(tr);
        return rc;
    }
    tr->w = model_slab_new_f32(be, params);
    tr->g = model_slab_new_f32(be, params);
    tr->m = model_slab_new_f32(be, params);
    tr->v = model_slab_new_f32(be, params);
    if (!tr->w || !tr->g || !tr->m || !tr->v) {
        size_t n = tr->n;
        model_train_destroy(&tr);
        return semoe_err(SEMOE_ENOMEM, "model train: cannot allocate 4 slabs of %zu floats", n);
    }
    model_slab_load_f32(be, params, tr->w);
    tr->tok = semoe_xcalloc((size_t)mb * (seq + 1), sizeof *tr->tok);

    size_t count = model_params_count(params);
    tr->runs = semoe_xcalloc(count ? count : 1, sizeof *tr->runs);
    for (size_t i = 0; i < count; i++) {
        const model_param_t *p = model_params_at(params, i);
        if (!p->data)
            continue;
        int decay = p->ndim >= 2, expert = p->kind == MODEL_PARAM_EXPERT;
        int frozen = job->train.freeze_router && s_is_router(p);
        s_run_t *last = tr->n_runs ? &tr->runs[tr->n_runs - 1] : NULL;
        if (last && last->off + last->len == p->offset && last->decay == decay &&
            last->expert == expert && last->frozen == frozen) {
            last->len += (size_t)p->numel;
        } else {
            tr->runs[tr->n_runs++] =
                (s_run_t){(size_t)p->offset, (size_t)p->numel, decay, expert, frozen};
        }
    }
    *out = tr;
    return SEMOE_OK;
}

void model_train_destroy(model_train_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    model_train_t *tr = *self_p;
    free(tr->runs);
    free(tr->tok);
    tr->be->free(tr->rbias);
    model_slab_destroy_f32(tr->be, &tr->v);
    model_slab_destroy_f32(tr->be, &tr->m);
    model_slab_destroy_f32(tr->be, &tr->gtmp);
    model_slab_destroy_f32(tr->be, &tr->g);
    model_slab_destroy_f32(tr->be, &tr->w);
    s_acts_destroy(tr, &tr->tail[0]);
    s_acts_destroy(tr, &tr->tail[1]);
    s_acts_destroy(tr, &tr->acts);
    free(tr);
    *self_p = NULL;
}

/* The activations for a micro-batch of rows (<= micro_batch) rows, with its tokens widened
 * into tr->tok. */
static semoe_rc s_prepare(model_train_t *tr, const uint8_t *tokens, uint32_t rows,
                          s_acts_t **acts)
{
    for (size_t i = 0; i < (size_t)rows * (tr->seq + 1); i++)
        tr->tok[i] = tokens[i];
    if (rows == tr->mb) {
        if (tr->acts.rows == 0) /* a failed model_train_set_expert_rows could not restore them */
            SEMOE_CHECK(s_acts_new(tr, (int)rows, &tr->acts));
        *acts = &tr->acts;
        return SEMOE_OK;
    }
    for (int k = 0; k < 2; k++)
        if (tr->tail[k].rows == (int)rows) {
            *acts = &tr->tail[k];
            return SEMOE_OK;
        }
    s_acts_t *slot = &tr->tail[tr->tail_next];
    tr->tail_next ^= 1;
    s_acts_destroy(tr, slot);
    SEMOE_CHECK(s_acts_new(tr, (int)rows, slot));
    *acts = slot;
    return SEMOE_OK;
}

/* The micro-batches of n_rows rows: micro_steps of them spread as evenly as possible (the
 * first n_rows % micro_steps one row longer), or with micro_steps 0 chunks of micro_batch and a
 * shorter last one. Fills *n and, for micro-batch i, rows_of(i) via first/len. */
typedef struct {
    uint32_t n, base, extra, mb;
} s_split_t;

static semoe_rc s_split(const model_train_t *tr, uint32_t n_rows, uint32_t micro_steps,
                        s_split_t *sp)
{
    if (micro_steps == 0) {
        *sp = (s_split_t){.n = (n_rows + tr->mb - 1) / tr->mb, .mb = tr->mb};
        return SEMOE_OK;
    }
    if (n_rows < micro_steps || (n_rows + micro_steps - 1) / micro_steps > tr->mb)
        return semoe_err(SEMOE_EINVAL, "model train: %u rows in %u micro-batches: need 1 to "
                         "micro_batch=%u rows in each", n_rows, micro_steps, tr->mb);
    *sp = (s_split_t){.n = micro_steps, .base = n_rows / micro_steps,
                      .extra = n_rows % micro_steps};
    return SEMOE_OK;
}

/* Rows and first row of micro-batch i. */
static void s_micro(const s_split_t *sp, uint32_t n_rows, uint32_t i, uint32_t *first,
                    uint32_t *rows)
{
    if (sp->mb) {
        *first = i * sp->mb;
        *rows = n_rows - *first < sp->mb ? n_rows - *first : sp->mb;
    } else {
        *first = i * sp->base + (i < sp->extra ? i : sp->extra);
        *rows = sp->base + (i < sp->extra);
    }
}

semoe_rc model_train_step(model_train_t *tr, const uint8_t *tokens, uint32_t n_rows,
                          uint64_t step, const model_train_hooks_t *hooks,
                          model_train_report_t *report)
{
    static const model_train_hooks_t none = {0};
    const model_backend_f32_t *be = tr->be;
    if (!hooks)
        hooks = &none;
    if (n_rows == 0 || n_rows > tr->gb)
        return semoe_err(SEMOE_EINVAL, "model train: step %llu: %u rows: need 1 to "
                         "global_batch=%u", (unsigned long long)step, n_rows, tr->gb);
    model_train_report_t r = {0};
    size_t row_len = (size_t)tr->seq + 1;
    double tf = 0, tb = 0, t0;
    model_zero_grad_f32(be, tr->params, tr->g);
    /* One micro-batch that is the whole global batch needs no scaling: backward straight
     * into g. Otherwise each micro-batch's gradient lands in gtmp and goes into g times
     * rows / global_batch. With an exchange that reduces the losses (reduce_stats) the
     * micro-batch's loss is already that of every worker's rows together, and backward gives
     * this worker's share of its gradient: the factor is the global rows / global_batch.
     * A pass (tr->pass) takes the factor into its loss gradient and accumulates into g. */
    int glob = hooks->ex && hooks->ex->reduce_stats;
    double wsum = 0;
    s_split_t sp = {0}; /* set by s_split; zeroed for gcc -O3's maybe-uninitialized */
    SEMOE_CHECK(s_split(tr, n_rows, hooks->micro_steps, &sp));
    for (uint32_t i = 0; i < sp.n; i++) {
        uint32_t first, rows;
        s_micro(&sp, n_rows, i, &first, &rows);
        s_acts_t *acts;
        SEMOE_CHECK(s_prepare(tr, tokens + (size_t)first * row_len, rows, &acts));
        model_loss_t loss;
        t0 = s_now();
        SEMOE_CHECK(s_forward(tr, acts, hooks->ex, &loss));
        tf += s_now() - t0;
        t0 = s_now();
        double scale = glob ? (double)loss.tokens / ((double)tr->seq * tr->gb)
                              : (double)rows / tr->gb;
        int direct = sp.n == 1 && scale == 1.0;
        if (tr->pass) { /* scales its loss gradient itself: straight into g */
            /* the last micro-batch finishes each layer's gradients: say so as it goes */
            bool tell = i + 1 == sp.n && hooks->dense_ready && tr->pass->on_dense_ready;
            if (tell)
                tr->pass->on_dense_ready(acts->ps, hooks->dense_ready, hooks->arg);
            semoe_rc brc = tr->pass->backward(acts->ps, tr->w, tr->g, scale);
            if (tell)
                tr->pass->on_dense_ready(acts->ps, NULL, NULL);
            SEMOE_CHECK(brc);
        } else if (direct) {
            SEMOE_CHECK(s_backward(tr, acts, tr->g, hooks->ex));
        } else {
            if (!tr->gtmp && !(tr->gtmp = model_slab_new_f32(be, tr->params)))
                return semoe_err(SEMOE_ENOMEM, "model train: cannot allocate a gradient slab of "
                                 "%zu floats for micro-batches", tr->n);
            model_zero_grad_f32(be, tr->params, tr->gtmp);
            SEMOE_CHECK(s_backward(tr, acts, tr->gtmp, hooks->ex));
            be->axpy(tr->g, (float)scale, tr->gtmp, tr->n);
        }
        tb += s_now() - t0;
        double share = (double)rows / n_rows;
        if (glob) { /* weighted by the global targets; normalised after the loop */
            share = (double)loss.tokens;
            wsum += share;
        }
        r.loss += share * loss.loss;
        r.ce += share * loss.ce;
        r.aux += share * loss.aux;
    }

    if (glob && wsum > 0) {
        r.loss /= wsum;
        r.ce /= wsum;
        r.aux /= wsum;
    }
    t0 = s_now();
    if (hooks->reduce_grads)
        SEMOE_CHECK(hooks->reduce_grads(hooks->arg, tr->g, tr->n));
    double dense = 0, expert = 0, global;
    for (size_t i = 0; i < tr->n_runs; i++) {
        if (tr->runs[i].frozen)
            continue;
        double s = be->sumsq(tr->g + tr->runs[i].off, tr->runs[i].len);
        if (tr->runs[i].expert)
            expert += s;
        else
            dense += s;
    }
    if (hooks->reduce_sumsq)
        SEMOE_CHECK(hooks->reduce_sumsq(hooks->arg, dense, expert, &global));
    else
        global = dense + expert;
    double norm = sqrt(global), clip = tr->job->train.grad_clip;
    if (!isfinite(norm))
        return semoe_err(SEMOE_EINVAL, "model train: step %llu: gradient norm %g: not finite "
                         "(lower train.lr or set train.grad_clip)", (unsigned long long)step,
                         norm);
    double scale = clip > 0 && norm + 1e-6 > clip ? clip / (norm + 1e-6) : 1.0;
    double lr = model_train_lr(tr->job, step);
    int t = tr->t + 1;
    const model_job_t *job = tr->job;
    for (size_t i = 0; i < tr->n_runs; i++) {
        const s_run_t *run = &tr->runs[i];
        if (run->frozen)
            continue;
        be->adamw(tr->w + run->off, tr->g + run->off, tr->m + run->off, tr->v + run->off,
                  run->len, lr, job->train.beta1, job->train.beta2, job->train.eps,
                  run->decay ? job->train.weight_decay : 0.0, t, scale);
    }
    tr->t = t;
    double to = s_now() - t0;

    if (report) {
        r.grad_norm = norm;
        r.clip_scale = scale;
        r.lr = lr;
        r.tokens = (uint64_t)n_rows * tr->seq;
        r.adam_step = t;
        r.t_forward = tf;
        r.t_backward = tb;
        r.t_optimizer = to;
        *report = r;
    }
    return SEMOE_OK;
}

semoe_rc model_train_eval(model_train_t *tr, const uint8_t *tokens, uint32_t n_rows,
                          const model_exchange_f32 *ex, uint32_t micro_steps, double *ce)
{
    size_t row_len = (size_t)tr->seq + 1;
    double sum = 0, wsum = 0;
    if (n_rows == 0)
        return semoe_err(SEMOE_EINVAL, "model train: eval over 0 rows");
    s_split_t sp = {0}; /* set by s_split; zeroed for gcc -O3's maybe-uninitialized */
    SEMOE_CHECK(s_split(tr, n_rows, micro_steps, &sp));
    for (uint32_t i = 0; i < sp.n; i++) {
        uint32_t first, rows;
        s_micro(&sp, n_rows, i, &first, &rows);
        s_acts_t *acts;
        SEMOE_CHECK(s_prepare(tr, tokens + (size_t)first * row_len, rows, &acts));
        model_loss_t loss;
        SEMOE_CHECK(s_forward(tr, acts, ex, &loss));
        /* with reduce_stats the micro-batch's ce is the global one: weigh by its targets */
        double wt = ex && ex->reduce_stats ? (double)loss.tokens : (double)rows;
        sum += loss.ce * wt;
        wsum += wt;
    }
    *ce = sum / wsum;
    return SEMOE_OK;
}

semoe_rc model_train_set_expert_rows(model_train_t *tr, int rows)
{
    if (rows < 0)
        return semoe_err(SEMOE_EINVAL, "model train: expert_rows=%d: need >= 0", rows);
    /* the old activations go first: on a device, both at once may not fit */
    int keep = tr->R;
    s_acts_destroy(tr, &tr->acts);
    s_acts_destroy(tr, &tr->tail[0]);
    s_acts_destroy(tr, &tr->tail[1]);
    tr->R = rows;
    semoe_rc rc = s_acts_new(tr, (int)tr->mb, &tr->acts);
    if (rc != SEMOE_OK) { /* back to the old capacity: what the trainer had works as before */
        char msg[512];
        snprintf(msg, sizeof msg, "%s", semoe_err_msg());
        tr->R = keep;
        if (s_acts_new(tr, (int)tr->mb, &tr->acts) != SEMOE_OK)
            tr->acts = (s_acts_t){0}; /* s_prepare tries again */
        return semoe_err(rc, "%s", msg);
    }
    return SEMOE_OK;
}

size_t model_train_slab_floats(const model_train_t *tr)
{
    return tr->n;
}

float *model_train_weights(model_train_t *tr)
{
    return tr->w;
}

float *model_train_grads(model_train_t *tr)
{
    return tr->g;
}

int model_train_dense_layer(const model_param_t *t, uint32_t layers)
{
    if (t->layer >= 0)
        return t->layer;
    return strcmp(t->name, "model.embed_tokens.weight") ? (int)layers : -1;
}

float *model_train_m(model_train_t *tr)
{
    return tr->m;
}

float *model_train_v(model_train_t *tr)
{
    return tr->v;
}

int model_train_adam_step(const model_train_t *tr)
{
    return tr->t;
}

void model_train_set_adam_step(model_train_t *tr, int t)
{
    tr->t = t;
}

void model_train_weights_to_params(model_train_t *tr)
{
    tr->be->to_host(model_params_slab(tr->params), tr->w, tr->n * sizeof(float));
}

void model_train_weights_from_params(model_train_t *tr)
{
    model_slab_load_f32(tr->be, tr->params, tr->w);
}
