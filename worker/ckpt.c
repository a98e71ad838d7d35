/* Checkpoint snapshots and their background writer (worker/ckpt.h). */
#include "worker/ckpt.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"

struct worker_snapshot_t {
    model_params_t *full; /* every tensor; its slab holds the weights */
    float *m, *v;         /* AdamW's moments in the same layout */
};

/* Floats of the expert tensors rank sends for a checkpoint, times 3 (weights, m, v). */
static size_t s_expert_floats(const model_params_t *p, const int32_t *owner, uint32_t E,
                              int32_t rank)
{
    size_t n = 0;
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->kind == MODEL_PARAM_EXPERT &&
            owner[(size_t)t->layer * E + (size_t)t->expert] == rank)
            n += 3 * t->numel;
    }
    return n;
}

/* Whether rank sends tensor t (an expert it owns). */
static bool s_sends(const model_param_t *t, const int32_t *owner, uint32_t E, int32_t rank)
{
    return t->kind == MODEL_PARAM_EXPERT &&
           owner[(size_t)t->layer * E + (size_t)t->expert] == rank;
}

/* Rank 0: the snapshot from its own tensors and what the others sent (recv, rb[r] bytes from
 * rank r, in table order). */
static semoe_rc s_assemble(const model_backend_f32_t *be, const model_params_t *params,
                           model_train_t *tr, const int32_t *owner, uint32_t W,
                           const uint8_t *recv, const size_t *rb, worker_snapshot_t **out)
{
    const model_config_t *cfg = model_params_config(params);
    uint32_t E = cfg->num_local_experts;
    size_t n = model_params_count(params);
    worker_snapshot_t *s = semoe_xcalloc(1, sizeof *s);
    semoe_rc rc = model_params_new(cfg, NULL, 0, &s->full);
    if (rc != SEMOE_OK) {
        free(s);
        return rc;
    }
    size_t floats = model_params_slab_floats(s->full);
    s->m = semoe_xcalloc(floats + 1, sizeof(float));
    s->v = semoe_xcalloc(floats + 1, sizeof(float));
    float *fw = model_params_slab(s->full);
    const float *w = model_train_weights(tr), *m = model_train_m(tr), *v = model_train_v(tr);
    for (size_t i = 0; i < n; i++) { /* what rank 0 holds itself: same table, same order */
        const model_param_t *t = model_params_at(params, i);
        const model_param_t *ft = model_params_at(s->full, i);
        if (!t->data)
            continue;
        be->to_host(fw + ft->offset, w + t->offset, t->numel * sizeof(float));
        be->to_host(s->m + ft->offset, m + t->offset, t->numel * sizeof(float));
        be->to_host(s->v + ft->offset, v + t->offset, t->numel * sizeof(float));
    }
    size_t roff = 0;
    for (uint32_t r = 1; r < W && rc == SEMOE_OK; r++) { /* the others' experts */
        const float *src = (const float *)(recv + roff);
        size_t want = s_expert_floats(s->full, owner, E, (int32_t)r);
        if (rb[r] != want * sizeof(float)) {
            rc = semoe_err(SEMOE_EPROTO, "checkpoint: rank %u sent %zu bytes of experts, its "
                           "plan says %zu", r, rb[r], want * sizeof(float));
            break;
        }
        for (size_t i = 0; i < n; i++) {
            const model_param_t *ft = model_params_at(s->full, i);
            if (!s_sends(ft, owner, E, (int32_t)r))
                continue;
            float *dst[3] = {fw, s->m, s->v};
            for (int k = 0; k < 3; k++, src += ft->numel)
                memcpy(dst[k] + ft->offset, src, ft->numel * sizeof(float));
        }
        roff += rb[r];
    }
    if (rc != SEMOE_OK)
        worker_snapshot_destroy(&s);
    *out = s;
    return rc;
}

semoe_rc worker_snapshot_gather(comm_t *comm, const model_backend_f32_t *be,
                                const model_params_t *params, model_train_t *tr,
                                const int32_t *owner, int timeout_ms, worker_snapshot_t **out)
{
    *out = NULL;
    uint32_t W = comm_world(comm), me = comm_rank(comm);
    uint32_t E = model_params_config(params)->num_local_experts;
    size_t n = model_params_count(params);
    size_t mine = s_expert_floats(params, owner, E, (int32_t)me);
    const float *w = model_train_weights(tr), *m = model_train_m(tr), *v = model_train_v(tr);
    float *send = semoe_xmalloc((mine + 1) * sizeof(float));
    size_t at = 0;
    for (size_t i = 0; me != 0 && i < n; i++) { /* rank 0 copies its own directly */
        const model_param_t *t = model_params_at(params, i);
        if (!t->data || !s_sends(t, owner, E, (int32_t)me))
            continue;
        const float *src[3] = {w, m, v};
        for (int k = 0; k < 3; k++, at += t->numel)
            be->to_host(send + at, src[k] + t->offset, t->numel * sizeof(float));
    }
    size_t *sb = semoe_xcalloc(W, sizeof *sb), *rb = semoe_xcalloc(W, sizeof *rb);
    size_t cap = 0;
    if (me == 0)
        for (uint32_t r = 1; r < W; r++)
            cap += s_expert_floats(params, owner, E, (int32_t)r) * sizeof(float);
    else
        sb[0] = mine * sizeof(float);
    uint8_t *recv = semoe_xmalloc(cap + 1);
    semoe_rc rc = comm_alltoallv(comm, send, sb, recv, rb, cap, timeout_ms);
    free(send);
    if (rc == SEMOE_OK && me == 0)
        rc = s_assemble(be, params, tr, owner, W, recv, rb, out);
    free(recv);
    free(sb);
    free(rb);
    return rc;
}

void worker_snapshot_destroy(worker_snapshot_t **self_p)
{
    worker_snapshot_t *s = *self_p;
    if (!s)
        return;
    model_params_destroy(&s->full);
    free(s->m);
    free(s->v);
    free(s);
    *self_p = NULL;
}

size_t worker_snapshot_bytes(const worker_snapshot_t *s)
{
    return 3 * model_params_slab_floats(s->full) * sizeof(float);
}

/* --- the writer ----------------------------------------------------------------------------- */

struct worker_ckpt_writer_t {
    pthread_t thread;
    bool busy;             /* a thread runs (or ran and is not yet joined) */
    /* the write: set before the thread starts, read back after the join */
    worker_snapshot_t *snap;
    char *root;
    uint32_t keep;
    int adam_step;
    model_ckpt_state_t state;
    semoe_rc rc;
    char error[1024];
};

static void *s_write(void *arg)
{
    worker_ckpt_writer_t *self = arg;
    int64_t t0 = clock_mono_us();
    const model_ckpt_state_t *st = &self->state;
    self->rc = model_ckpt_commit(self->root, st->step, self->keep, self->snap->full,
                                 self->snap->m, self->snap->v, self->adam_step, st);
    double s = (double)(clock_mono_us() - t0) / 1e6;
    if (self->rc == SEMOE_OK) {
        log_info("checkpoint of step %" PRIu64 " written under %s in %.2f s (in the background)",
                 st->step, self->root, s);
    } else {
        snprintf(self->error, sizeof self->error, "%s", semoe_err_msg());
        if (self->rc == SEMOE_EFENCED)
            log_warn("checkpoint of step %" PRIu64 " dropped: %s", st->step, self->error);
        else
            log_error("checkpoint of step %" PRIu64 " not written: %s", st->step, self->error);
    }
    worker_snapshot_destroy(&self->snap);
    return NULL;
}

worker_ckpt_writer_t *worker_ckpt_writer_new(void)
{
    return semoe_xcalloc(1, sizeof(worker_ckpt_writer_t));
}

void worker_ckpt_writer_destroy(worker_ckpt_writer_t **self_p)
{
    worker_ckpt_writer_t *self = *self_p;
    if (!self)
        return;
    (void)worker_ckpt_writer_wait(self);
    free(self->root);
    free(self);
    *self_p = NULL;
}

semoe_rc worker_ckpt_writer_wait(worker_ckpt_writer_t *self)
{
    if (self->busy) {
        pthread_join(self->thread, NULL);
        self->busy = false;
    }
    semoe_rc rc = self->rc;
    self->rc = SEMOE_OK;
    return rc == SEMOE_OK ? SEMOE_OK : semoe_err(rc, "%s", self->error);
}

bool worker_ckpt_writer_busy(const worker_ckpt_writer_t *self) { return self->busy; }

void worker_ckpt_writer_start(worker_ckpt_writer_t *self, worker_snapshot_t *snap,
                              const char *root, uint32_t keep, int adam_step,
                              const model_ckpt_state_t *state)
{
    (void)worker_ckpt_writer_wait(self); /* its outcome was logged */
    free(self->root);
    self->root = semoe_xstrdup(root);
    self->snap = snap;
    self->keep = keep;
    self->adam_step = adam_step;
    self->state = *state;
    self->rc = SEMOE_OK;
    self->error[0] = '\0';
    int err = pthread_create(&self->thread, NULL, s_write, self);
    if (err != 0) { /* no thread: write here, the steps wait */
        log_warn("checkpoint writer thread: %s: writing in the foreground", strerror(err));
        s_write(self);
        return;
    }
    self->busy = true;
}
