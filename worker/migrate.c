/* Migration into a new generation (worker/migrate.h): inventories all-gathered, the same
 * transfer table derived on every participant, one all-to-all of tensors. */
#include "worker/migrate.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"

/* The fixed part of an inventory; the held expert ids (uint32) follow. */
typedef struct {
    uint64_t step, has_state, ckpt_step;
    int64_t adam_t;
    uint64_t n_ids;
} s_inv_t;

typedef struct {
    const model_config_t *cfg;
    const model_params_t *table;  /* any participant's table: shapes and names of every tensor */
    uint32_t n, world, me, LE;
    s_inv_t *inv;                 /* (n) */
    uint8_t *has;                 /* (n, LE) participant p holds expert e (at its step) */
    bool *valid;                  /* (n) holds state at step S */
    uint32_t dense_src;           /* participant, or UINT32_MAX */
    uint32_t *src;                /* (LE) participant, or UINT32_MAX */
    const uint32_t *hoff, *hold;
} s_mig_t;

static bool s_holds_new(const s_mig_t *m, uint32_t r, size_t e)
{
    for (uint32_t i = m->hoff[e]; i < m->hoff[e + 1]; i++)
        if (m->hold[i] == r)
            return true;
    return false;
}

/* Whether rank r of the new plan must receive the dense tensors / expert e. */
static bool s_needs_dense(const s_mig_t *m, uint32_t r)
{
    return r < m->world && !m->valid[r];
}

static bool s_needs_expert(const s_mig_t *m, uint32_t r, size_t e)
{
    return r < m->world && s_holds_new(m, r, e) && !(m->valid[r] && m->has[(size_t)r * m->LE + e]);
}

static size_t s_expert_of(const s_mig_t *m, const model_param_t *t)
{
    return (size_t)t->layer * m->cfg->num_local_experts + (size_t)t->expert;
}

/* Calls fn for each tensor p sends to r, in the order both sides walk: the dense tensors (when p
 * is r's dense source), then the experts' tensors in table order. */
static void s_walk(const s_mig_t *m, uint32_t p, uint32_t r,
                   void (*fn)(void *arg, const model_param_t *t), void *arg)
{
    bool dense = m->dense_src == p && s_needs_dense(m, r);
    for (size_t i = 0; i < model_params_count(m->table); i++) {
        const model_param_t *t = model_params_at(m->table, i);
        if (t->kind == MODEL_PARAM_DENSE ? dense
                                         : m->src[s_expert_of(m, t)] == p &&
                                               s_needs_expert(m, r, s_expert_of(m, t)))
            fn(arg, t);
    }
}

static void s_count(void *arg, const model_param_t *t)
{
    *(size_t *)arg += 3 * t->numel * sizeof(float);
}

typedef struct {
    const model_backend_f32_t *be;
    const model_params_t *params; /* this participant's (old: packing; new: unpacking) */
    model_train_t *tr;
    uint8_t *at;
    uint32_t tensors;
} s_io_t;

/* The tensor's three slabs (weights, m, v) of tr at params' offset, to or from the buffer. */
static void s_pack(void *arg, const model_param_t *t)
{
    s_io_t *io = arg;
    const model_param_t *own = model_params_lookup(io->params, t->name);
    float *slab[3] = {model_train_weights(io->tr), model_train_m(io->tr), model_train_v(io->tr)};
    for (int k = 0; k < 3; k++, io->at += t->numel * sizeof(float))
        io->be->to_host(io->at, slab[k] + own->offset, t->numel * sizeof(float));
    io->tensors++;
}

static void s_unpack(void *arg, const model_param_t *t)
{
    s_io_t *io = arg;
    const model_param_t *own = model_params_lookup(io->params, t->name);
    float *slab[3] = {model_train_weights(io->tr), model_train_m(io->tr), model_train_v(io->tr)};
    for (int k = 0; k < 3; k++, io->at += t->numel * sizeof(float))
        io->be->to_device(slab[k] + own->offset, io->at, t->numel * sizeof(float));
    io->tensors++;
}

/* Every participant's inventory, all-gathered. */
static semoe_rc s_inventories(comm_t *comm, s_mig_t *m, const worker_state_t *old,
                              int timeout_ms)
{
    uint32_t n = m->n, LE = m->LE;
    uint32_t *ids = semoe_xmalloc((LE + 1) * sizeof *ids);
    s_inv_t mine = {.step = old->step, .has_state = old->params != NULL,
                    .ckpt_step = old->ckpt_step,
                    .adam_t = old->tr ? model_train_adam_step(old->tr) : 0};
    for (size_t e = 0; old->params && e < LE; e++)
        if (model_params_holds_expert(old->params, (uint32_t)(e / m->cfg->num_local_experts),
                                      (uint32_t)(e % m->cfg->num_local_experts)))
            ids[mine.n_ids++] = (uint32_t)e;
    size_t one = sizeof mine + mine.n_ids * sizeof *ids;
    uint8_t *send = semoe_xmalloc(n * one);
    size_t *sb = semoe_xcalloc(n, sizeof *sb), *rb = semoe_xcalloc(n, sizeof *rb);
    for (uint32_t p = 0; p < n; p++) {
        memcpy(send + p * one, &mine, sizeof mine);
        memcpy(send + p * one + sizeof mine, ids, mine.n_ids * sizeof *ids);
        sb[p] = one;
    }
    size_t cap = (size_t)n * (sizeof mine + LE * sizeof *ids);
    uint8_t *recv = semoe_xmalloc(cap + 1);
    semoe_rc rc = comm_alltoallv(comm, send, sb, recv, rb, cap, timeout_ms);
    size_t off = 0;
    for (uint32_t p = 0; rc == SEMOE_OK && p < n; p++) {
        s_inv_t v;
        if (rb[p] < sizeof v) {
            rc = semoe_err(SEMOE_EPROTO, "migrate: participant %u sent %zu inventory bytes", p,
                           rb[p]);
            break;
        }
        memcpy(&v, recv + off, sizeof v);
        if (v.n_ids > LE || rb[p] != sizeof v + v.n_ids * sizeof *ids) {
            rc = semoe_err(SEMOE_EPROTO, "migrate: participant %u's inventory lists %" PRIu64
                           " experts in %zu bytes", p, v.n_ids, rb[p]);
            break;
        }
        m->inv[p] = v;
        for (uint64_t i = 0; i < v.n_ids; i++) {
            uint32_t e;
            memcpy(&e, recv + off + sizeof v + i * sizeof e, sizeof e);
            if (e >= LE) {
                rc = semoe_err(SEMOE_EPROTO, "migrate: participant %u holds expert %u of %u", p,
                               e, LE);
                break;
            }
            m->has[(size_t)p * LE + e] = 1;
        }
        off += rb[p];
    }
    free(recv);
    free(send);
    free(sb);
    free(rb);
    free(ids);
    return rc;
}

/* S, the valid participants and every tensor's source; false when some tensor has none. */
static bool s_sources(s_mig_t *m, uint64_t *S)
{
    *S = 0;
    bool any = false;
    for (uint32_t p = 0; p < m->n; p++)
        if (m->inv[p].has_state) {
            *S = any && *S > m->inv[p].step ? *S : m->inv[p].step;
            any = true;
        }
    m->dense_src = UINT32_MAX;
    for (uint32_t p = 0; p < m->n; p++) {
        m->valid[p] = any && m->inv[p].has_state && m->inv[p].step == *S;
        if (m->valid[p] && m->dense_src == UINT32_MAX)
            m->dense_src = p;
    }
    if (m->dense_src == UINT32_MAX)
        return false;
    for (size_t e = 0; e < m->LE; e++) {
        m->src[e] = UINT32_MAX;
        for (uint32_t p = 0; p < m->n && m->src[e] == UINT32_MAX; p++)
            if (m->valid[p] && m->has[(size_t)p * m->LE + e])
                m->src[e] = p;
        if (m->src[e] == UINT32_MAX)
            return false;
    }
    return true;
}

/* What this participant keeps: its own tensors at S that it still holds, old slabs to new. */
static void s_keep(const s_mig_t *m, const model_backend_f32_t *be, const worker_state_t *old,
                   model_params_t *params, model_train_t *tr)
{
    if (!m->valid[m->me])
        return;
    float *from[3] = {model_train_weights(old->tr), model_train_m(old->tr),
                      model_train_v(old->tr)};
    float *to[3] = {model_train_weights(tr), model_train_m(tr), model_train_v(tr)};
    for (size_t i = 0; i < model_params_count(params); i++) {
        const model_param_t *t = model_params_at(params, i);
        const model_param_t *o = model_params_at(old->params, i);
        if (!t->data || !o->data)
            continue;
        for (int k = 0; k < 3; k++)
            be->copy(to[k] + t->offset, from[k] + o->offset, t->numel * sizeof(float));
    }
}

semoe_rc worker_migrate(comm_t *comm, const model_backend_f32_t *be, const model_config_t *cfg,
                        uint32_t world, const uint32_t *holder_off, const uint32_t *holders,
                        const worker_state_t *old, model_params_t *params, model_train_t *tr,
                        int timeout_ms, worker_migrate_result_t *out)
{
    *out = (worker_migrate_result_t){0};
    uint32_t n = comm_world(comm), me = comm_rank(comm);
    s_mig_t m = {.cfg = cfg, .table = old->params ? old->params : params, .n = n,
                 .world = world, .me = me,
                 .LE = cfg->num_hidden_layers * cfg->num_local_experts, .hoff = holder_off,
                 .hold = holders};
    if (!m.table || world > n || (me < world) != (params != NULL))
        return semoe_err(SEMOE_EINVAL, "migrate: participant %u of %u, world %u: a rank needs "
                         "new tensors, a donor state", me, n, world);
    m.inv = semoe_xcalloc(n, sizeof *m.inv);
    m.has = semoe_xcalloc((size_t)n * m.LE + 1, 1);
    m.valid = semoe_xcalloc(n, sizeof *m.valid);
    m.src = semoe_xcalloc(m.LE + 1, sizeof *m.src);
    size_t *sb = semoe_xcalloc(n, sizeof *sb), *rb = semoe_xcalloc(n, sizeof *rb);
    uint8_t *send = NULL, *recv = NULL;
    uint64_t S = 0;
    semoe_rc rc = s_inventories(comm, &m, old, timeout_ms);
    if (rc != SEMOE_OK)
        goto out;
    if (!s_sources(&m, &S)) {
        out->rewind = true;
        out->step = out->ckpt_step = m.inv[0].ckpt_step;
        goto out;
    }
    out->step = S;

    /* pack what this participant sources for each rank, in participant order */
    size_t total = 0;
    for (uint32_t r = 0; r < n; r++) {
        sb[r] = 0;
        s_walk(&m, me, r, s_count, &sb[r]);
        total += sb[r];
    }
    send = semoe_xmalloc(total + 1);
    s_io_t io = {.be = be, .params = old->params, .tr = old->tr, .at = send};
    for (uint32_t r = 0; r < n && total; r++)
        s_walk(&m, me, r, s_pack, &io);
    size_t cap = 0;
    for (uint32_t p = 0; p < n; p++)
        s_walk(&m, p, me, s_count, &cap);
    recv = semoe_xmalloc(cap + 1);
    rc = comm_alltoallv(comm, send, sb, recv, rb, cap, timeout_ms);
    if (rc != SEMOE_OK)
        goto out;
    out->bytes_out = total;
    out->bytes_in = cap;
    if (me >= world)
        goto out;
    s_keep(&m, be, old, params, tr);
    s_io_t in = {.be = be, .params = params, .tr = tr, .at = recv};
    for (uint32_t p = 0; p < n; p++) {
        size_t want = 0;
        s_walk(&m, p, me, s_count, &want);
        if (rb[p] != want) {
            rc = semoe_err(SEMOE_EPROTO, "migrate: participant %u sent %zu bytes of tensors, the "
                           "inventories say %zu", p, rb[p], want);
            goto out;
        }
        s_walk(&m, p, me, s_unpack, &in);
    }
    out->tensors_in = in.tensors;
    model_train_set_adam_step(tr, (int)m.inv[m.dense_src].adam_t);
out:
    free(recv);
    free(send);
    free(sb);
    free(rb);
    free(m.src);
    free(m.valid);
    free(m.has);
    free(m.inv);
    return rc;
}
