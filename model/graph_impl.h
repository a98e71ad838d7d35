/* The body of model/graph.h, written once over the element type T; model/graph.c includes it
 * once per type with T and S (the name suffix) defined. No include guard on purpose. */

#define G_CAT_(a, b) a##_##b
#define G_CAT(a, b) G_CAT_(a, b)
#define G(name) G_CAT(name, S)
#define BE_T G_CAT(G_CAT(model_backend, S), t)
#define ACTS_T G(model_acts)
#define BUFS_T G(model_actbufs)
#define EX_T G(model_exchange)

/* Points every field of b into base (NULL: only counts); returns the slab's length in T. */
static size_t G(s_point)(BUFS_T *b, T *base, const ACTS_T *s)
{
    size_t N = (size_t)s->N, L = (size_t)s->L, D = (size_t)s->D, Q = (size_t)s->H * s->hd,
           KV = (size_t)s->KVH * s->hd, E = (size_t)s->E, K = (size_t)s->K,
           F = (size_t)s->F, V = (size_t)s->V, R = (size_t)s->R, NK = N * K;
    size_t tt = (size_t)s->Tn;
    const size_t sizes[] = {
        N * D,                                   /* encoded */
        L * N * D, L * N,                        /* ln1, ln1_rstd */
        L * N * Q, L * N * KV, L * N * KV,       /* q, k, v */
        L * N * Q, L * N * KV,                   /* qr, kr */
        L * N * Q, L * s->B * s->H * tt * tt,    /* att, att_probs */
        L * N * D, L * N * D,                    /* attproj, res1 */
        L * N * D, L * N,                        /* ln2, ln2_rstd */
        L * N * E, L * N * E, L * N * K,         /* rlogits, rprobs, rw */
        L * NK * D, L * R * D,                   /* xs, xr */
        L * R * F, L * R * F, L * R * F,         /* ea, eb, eh */
        L * R * D, L * NK * D,                   /* yr, ys */
        L * N * D, L * N * D,                    /* moe, res2 */
        N * D, N, N * V, N,                      /* lnf, lnf_rstd, logits, losses */
    };
    T **ptrs[] = {
        &b->encoded, &b->ln1, &b->ln1_rstd, &b->q, &b->k, &b->v, &b->qr, &b->kr,
        &b->att, &b->att_probs, &b->attproj, &b->res1, &b->ln2, &b->ln2_rstd,
        &b->rlogits, &b->rprobs, &b->rw, &b->xs, &b->xr, &b->ea, &b->eb, &b->eh,
        &b->yr, &b->ys, &b->moe, &b->res2, &b->lnf, &b->lnf_rstd, &b->logits, &b->losses,
    };
    _Static_assert(sizeof sizes / sizeof sizes[0] == sizeof ptrs / sizeof ptrs[0],
                   "one size per activation");
    size_t total = 0;
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) {
        if (base)
            *ptrs[i] = base + total;
        total += sizes[i];
    }
    return total;
}

semoe_rc G(model_acts_new)(const BE_T *be, const model_params_t *params, int B, int Tn,
                           int expert_rows, ACTS_T **out)
{
    *out = NULL;
    const model_config_t *cfg = model_params_config(params);
    if (B <= 0 || Tn <= 0)
        return semoe_err(SEMOE_EINVAL, "model_acts_new: B=%d, T=%d: need at least one token",
                         B, Tn);
    if (cfg->sliding_window && (uint32_t)Tn > cfg->sliding_window)
        return semoe_err(SEMOE_EINVAL,
                         "model_acts_new: T=%d exceeds sliding_window=%u, which the graph "
                         "does not implement: use T <= sliding_window or sliding_window null",
                         Tn, cfg->sliding_window);
    uint64_t *off = NULL;
    SEMOE_CHECK(s_offsets(params, &off));
    ACTS_T *s = semoe_xcalloc(1, sizeof *s);
    s->be = be;
    s->params = params;
    s->off = off;
    s->B = B;
    s->Tn = Tn;
    s->N = B * Tn;
    s->L = (int)cfg->num_hidden_layers;
    s->D = (int)cfg->hidden_size;
    s->H = (int)cfg->num_attention_heads;
    s->KVH = (int)cfg->num_key_value_heads;
    s->hd = (int)cfg->head_dim;
    s->E = (int)cfg->num_local_experts;
    s->K = (int)cfg->num_experts_per_tok;
    s->F = (int)cfg->intermediate_size;
    s->V = (int)cfg->vocab_size;
    s->R = expert_rows > 0 ? expert_rows : s->N * s->K;
    size_t N = (size_t)s->N, L = (size_t)s->L, NK = N * (size_t)s->K;

    size_t nt = G(s_point)(&s->a, NULL, s);
    size_t ni = 3 * N + L * NK * 3; /* inputs, targets, pos; ridx, rows, slots */
    s->mem = be->alloc(nt * sizeof(T) + ni * sizeof(int32_t));
    s->dmem = be->alloc(nt * sizeof(T));
    G(s_point)(&s->a, (T *)s->mem, s);
    G(s_point)(&s->d, (T *)s->dmem, s);
    int32_t *ip = (int32_t *)((T *)s->mem + nt);
    s->inputs = ip;
    s->targets = ip + N;
    s->pos = ip + 2 * N;
    s->ridx = ip + 3 * N;
    s->rows = s->ridx + L * NK;
    s->slots = s->rows + L * NK;

    s->send_counts = semoe_xcalloc(L * (size_t)s->E, sizeof(int32_t));
    s->recv_counts = semoe_xcalloc(L * (size_t)s->E, sizeof(int32_t));
    s->h_idx = semoe_xcalloc(NK, sizeof(int32_t));
    s->h_rows = semoe_xcalloc(NK, sizeof(int32_t));
    s->h_slots = semoe_xcalloc(NK, sizeof(int32_t));
    s->h_probs = semoe_xcalloc(L * N * (size_t)s->E, sizeof(T));
    s->aux_coef = semoe_xcalloc((size_t)s->E, sizeof(double));
    *out = s;
    return SEMOE_OK;
}

void G(model_acts_destroy)(ACTS_T **self_p)
{
    if (!self_p || !*self_p)
        return;
    ACTS_T *s = *self_p;
    s->be->free(s->mem);
    s->be->free(s->dmem);
    free(s->send_counts);
    free(s->recv_counts);
    free(s->h_idx);
    free(s->h_rows);
    free(s->h_slots);
    free(s->h_probs);
    free(s->aux_coef);
    free(s->off);
    free(s);
    *self_p = NULL;
}

T *G(model_slab_new)(const BE_T *be, const model_params_t *params)
{
    return be->alloc((size_t)model_params_slab_floats(params) * sizeof(T));
}

void G(model_slab_load)(const BE_T *be, const model_params_t *params, T *slab)
{
    size_t n = (size_t)model_params_slab_floats(params);
    const float *src = model_params_slab((model_params_t *)params);
    T *tmp = semoe_xcalloc(n ? n : 1, sizeof(T));
    for (size_t i = 0; i < n; i++)
        tmp[i] = (T)src[i];
    be->to_device(slab, tmp, n * sizeof(T));
    free(tmp);
}

void G(model_slab_destroy)(const BE_T *be, T **slab_p)
{
    if (!slab_p || !*slab_p)
        return;
    be->free(*slab_p);
    *slab_p = NULL;
}

void G(model_zero_grad)(const BE_T *be, const model_params_t *params, T *grads)
{
    be->zero(grads, (size_t)model_params_slab_floats(params) * sizeof(T));
}

/* The local exchange: every expert is held here, so rows stay where they are. */
static int64_t G(s_count)(const int32_t *counts, int E)
{
    int64_t n = 0;
    for (int e = 0; e < E; e++)
        n += counts[e];
    return n;
}

static semoe_rc G(s_local_dispatch)(void *state, int layer, int part, int E, int D,
                                    const T *send, const int32_t *send_counts, T *recv,
                                    int32_t *recv_counts, int recv_cap)
{
    (void)part;
    const BE_T *be = state;
    int64_t n = G(s_count)(send_counts, E);
    if (n > recv_cap)
        return semoe_err(SEMOE_EINVAL,
                         "layer %d: %lld expert rows exceed the receive capacity %d: allocate "
                         "the activations with expert_rows >= %lld",
                         layer, (long long)n, recv_cap, (long long)n);
    memcpy(recv_counts, send_counts, (size_t)E * sizeof(int32_t));
    be->copy(recv, send, (size_t)n * (size_t)D * sizeof(T));
    return SEMOE_OK;
}

static semoe_rc G(s_local_combine)(void *state, int layer, int part, int E, int D,
                                   const T *send, const int32_t *send_counts, T *recv,
                                   const int32_t *recv_counts)
{
    (void)part;
    const BE_T *be = state;
    int64_t n = G(s_count)(send_counts, E);
    if (n != G(s_count)(recv_counts, E))
        return semoe_err(SEMOE_EINVAL, "layer %d: combine of %lld rows into %lld", layer,
                         (long long)n, (long long)G(s_count)(recv_counts, E));
    be->copy(recv, send, (size_t)n * (size_t)D * sizeof(T));
    return SEMOE_OK;
}

EX_T G(model_exchange_local)(const BE_T *be)
{
    return (EX_T){.state = (void *)be, .dispatch = G(s_local_dispatch),
                  .combine = G(s_local_combine)};
}

/* Tensor pointers into a params-shaped slab (offsets from s_offsets). */
#define W_AT(slab, i) ((slab) + s->off[(i)])
#define W_EMB(slab) W_AT(slab, OFF_EMBED)
#define W_NORM(slab) W_AT(slab, OFF_NORM)
#define W_LM(slab) W_AT(slab, OFF_LM)
#define W_LAYER(slab, l, t) W_AT(slab, s_off_layer((l), (t)))
#define W_EXPERT(slab, l, j, t) W_AT(slab, s_off_expert(s->L, s->E, (l), (j), (t)))

/* Builds layer l's routing plan on the host from the top-k ids: the routed rows grouped by
 * expert, in token order within an expert, and the counts; copies rows and slots to the
 * backend. */
static void G(s_plan)(const BE_T *be, ACTS_T *s, int l)
{
    int N = s->N, K = s->K, E = s->E, NK = N * K;
    int32_t *counts = s->send_counts + (size_t)l * E;
    be->to_host(s->h_idx, s->ridx + (size_t)l * NK, (size_t)NK * sizeof(int32_t));
    memset(counts, 0, (size_t)E * sizeof(int32_t));
    for (int i = 0; i < NK; i++)
        counts[s->h_idx[i]]++;
    int32_t start[E > 0 ? E : 1];
    int32_t at = 0;
    for (int e = 0; e < E; e++) {
        start[e] = at;
        at += counts[e];
    }
    for (int i = 0; i < NK; i++) { /* i = n * K + k: token order within an expert */
        int32_t r = start[s->h_idx[i]]++;
        s->h_rows[r] = i / K;
        s->h_slots[r] = i;
    }
    be->to_device(s->rows + (size_t)l * NK, s->h_rows, (size_t)NK * sizeof(int32_t));
    be->to_device(s->slots + (size_t)l * NK, s->h_slots, (size_t)NK * sizeof(int32_t));
}

/* The held experts of layer l on the received rows xr (R, D), grouped by expert as
 * recv_counts says: ea = xr w1^T, eb = xr w3^T, eh = silu(ea) eb, yr = eh w2^T. */
static semoe_rc G(s_experts_fwd)(const BE_T *be, const ACTS_T *s, const T *w, int l,
                                 const T *xr, T *ea, T *eb, T *eh, T *yr)
{
    int D = s->D, F = s->F;
    const int32_t *rc = s->recv_counts + (size_t)l * s->E;
    size_t r0 = 0;
    for (int j = 0; j < s->E; j++) {
        int n = rc[j];
        if (n == 0)
            continue;
        if (s->off[s_off_expert(s->L, s->E, l, j, X_W1)] == UINT64_MAX)
            return semoe_err(SEMOE_EPROTO,
                             "layer %d: %d rows arrived for expert %d, which this process "
                             "does not hold",
                             l, n, j);
        be->linear_fwd(ea + r0 * F, xr + r0 * D, W_EXPERT(w, l, j, X_W1), n, D, F);
        be->linear_fwd(eb + r0 * F, xr + r0 * D, W_EXPERT(w, l, j, X_W3), n, D, F);
        be->swiglu_fwd(eh + r0 * F, ea + r0 * F, eb + r0 * F, (size_t)n * F);
        be->linear_fwd(yr + r0 * D, eh + r0 * F, W_EXPERT(w, l, j, X_W2), n, F, D);
        r0 += (size_t)n;
    }
    return SEMOE_OK;
}

/* Backward of s_experts_fwd for layer l: from d->yr, accumulates d->xr and the held experts'
 * gradients into g (d->ea, d->eb, d->eh were zeroed with the rest of d). */
static void G(s_experts_bwd)(const BE_T *be, const ACTS_T *s, const T *w, T *g, int l,
                             const BUFS_T *a, BUFS_T *d)
{
    int D = s->D, F = s->F, R = s->R;
    const int32_t *rc = s->recv_counts + (size_t)l * s->E;
    size_t base_d = (size_t)l * R * D, base_f = (size_t)l * R * F;
    size_t r0 = 0;
    for (int j = 0; j < s->E; j++) {
        int n = rc[j];
        if (n == 0)
            continue;
        size_t od = base_d + r0 * D, of = base_f + r0 * F;
        be->linear_bwd(d->eh + of, W_EXPERT(g, l, j, X_W2), d->yr + od, a->eh + of,
                       W_EXPERT(w, l, j, X_W2), n, F, D);
        be->swiglu_bwd(d->ea + of, d->eb + of, d->eh + of, a->ea + of, a->eb + of,
                       (size_t)n * F);
        be->linear_bwd(d->xr + od, W_EXPERT(g, l, j, X_W1), d->ea + of, a->xr + od,
                       W_EXPERT(w, l, j, X_W1), n, D, F);
        be->linear_bwd(d->xr + od, W_EXPERT(g, l, j, X_W3), d->eb + of, a->xr + od,
                       W_EXPERT(w, l, j, X_W3), n, D, F);
        r0 += (size_t)n;
    }
}

/* The losses of the global batch through ex->reduce_stats: one sum over processes of
 * [routed rows per expert (E), router prob sums per expert (E), ce sum, targets], every layer's
 * tokens pooled as load_balancing_loss_func pools them. aux = E sum_e f_e P_e with
 * f_e = count_e / M, P_e = psum_e / M, M = L * global targets; d aux / d probs[m, e] =
 * E f_e / M, kept in s->aux_coef for backward, with s->ce_scale = N / global targets. */
static semoe_rc G(s_global_losses)(const BE_T *be, ACTS_T *s, const EX_T *ex, double coef,
                                   T ce, model_loss_t *loss)
{
    int N = s->N, L = s->L, E = s->E;
    size_t n = 2 * (size_t)E + 2;
    double *st = semoe_xcalloc(n, sizeof(double));
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++)
            st[e] += s->send_counts[(size_t)l * E + e];
    size_t M = (size_t)L * N;
    be->to_host(s->h_probs, s->a.rprobs, M * E * sizeof(T));
    for (size_t m = 0; m < M; m++)
        for (int e = 0; e < E; e++)
            st[E + e] += (double)s->h_probs[m * E + e];
    st[2 * E] = (double)ce * N;
    st[2 * E + 1] = N;
    double per_target = 0;
    semoe_rc rc = model_losses_from_stats(st, E, L, coef, ex->reduce_stats, ex->state,
                                          s->aux_coef, &per_target, loss);
    s->ce_scale = N * per_target;
    free(st);
    return rc;
}

semoe_rc G(model_forward)(const BE_T *be, const model_params_t *params, const T *w,
                          ACTS_T *s, const int32_t *tokens, const EX_T *ex, model_loss_t *loss)
{
    const model_config_t *cfg = model_params_config(params);
    EX_T local = G(model_exchange_local)(be);
    if (!ex)
        ex = &local;
    int B = s->B, Tn = s->Tn, N = s->N, L = s->L, D = s->D, H = s->H, KVH = s->KVH,
        hd = s->hd, E = s->E, K = s->K, F = s->F, V = s->V, R = s->R;
    int Q = H * hd, KV = KVH * hd, NK = N * K;
    size_t ND = (size_t)N * D;
    T eps = (T)cfg->rms_norm_eps;
    double theta = cfg->rope_theta;

    /* inputs, targets and positions, checked on the host */
    int32_t *h = semoe_xcalloc(3 * (size_t)N, sizeof(int32_t));
    for (int b = 0; b < B; b++)
        for (int t = 0; t < Tn; t++) {
            int32_t in = tokens[(size_t)b * (Tn + 1) + t];
            int32_t tg = tokens[(size_t)b * (Tn + 1) + t + 1];
            if (in < 0 || in >= V || tg < 0 || tg >= V) {
                free(h);
                return semoe_err(SEMOE_EINVAL,
                                 "model_forward: token %d at (%d, %d) outside the vocabulary "
                                 "[0, %d)",
                                 (in < 0 || in >= V) ? in : tg, b, t, V);
            }
            h[b * Tn + t] = in;
            h[N + b * Tn + t] = tg;
            h[2 * N + b * Tn + t] = t;
        }
    be->to_device(s->inputs, h, 3 * (size_t)N * sizeof(int32_t));
    free(h);

    BUFS_T *a = &s->a;
    be->embedding_fwd(a->encoded, s->inputs, W_EMB(w), N, D);
    const T *x = a->encoded;
    for (int l = 0; l < L; l++) {
        T *ln1 = a->ln1 + l * ND, *ln1_rstd = a->ln1_rstd + (size_t)l * N;
        T *q = a->q + (size_t)l * N * Q, *k = a->k + (size_t)l * N * KV;
        T *v = a->v + (size_t)l * N * KV, *qr = a->qr + (size_t)l * N * Q;
        T *kr = a->kr + (size_t)l * N * KV, *att = a->att + (size_t)l * N * Q;
        T *probs = a->att_probs + (size_t)l * B * H * Tn * Tn;
        T *attproj = a->attproj + l * ND, *res1 = a->res1 + l * ND;
        T *ln2 = a->ln2 + l * ND, *ln2_rstd = a->ln2_rstd + (size_t)l * N;
        T *rlogits = a->rlogits + (size_t)l * N * E, *rprobs = a->rprobs + (size_t)l * N * E;
        T *rw = a->rw + (size_t)l * NK;
        int32_t *ridx = s->ridx + (size_t)l * NK;
        T *xs = a->xs + (size_t)l * NK * D, *ys = a->ys + (size_t)l * NK * D;
        T *xr = a->xr + (size_t)l * R * D, *yr = a->yr + (size_t)l * R * D;
        T *ea = a->ea + (size_t)l * R * F, *eb = a->eb + (size_t)l * R * F;
        T *eh = a->eh + (size_t)l * R * F;
        T *moe = a->moe + l * ND, *res2 = a->res2 + l * ND;
        const int32_t *rows = s->rows + (size_t)l * NK, *slots = s->slots + (size_t)l * NK;

        /* attention */
        be->rmsnorm_fwd(ln1, ln1_rstd, x, W_LAYER(w, l, L_LN1), N, D, eps);
        be->linear_fwd(q, ln1, W_LAYER(w, l, L_Q), N, D, Q);
        be->linear_fwd(k, ln1, W_LAYER(w, l, L_K), N, D, KV);
        be->linear_fwd(v, ln1, W_LAYER(w, l, L_V), N, D, KV);
        be->rope_fwd(qr, q, s->pos, N, H, hd, theta);
        be->rope_fwd(kr, k, s->pos, N, KVH, hd, theta);
        be->attention_fwd(att, probs, qr, kr, v, B, Tn, H, KVH, hd);
        be->linear_fwd(attproj, att, W_LAYER(w, l, L_O), N, Q, D);
        be->add(res1, x, attproj, ND);

        /* MoE: route, gather by expert, exchange, experts, exchange back, weighted scatter */
        be->rmsnorm_fwd(ln2, ln2_rstd, res1, W_LAYER(w, l, L_LN2), N, D, eps);
        be->linear_fwd(rlogits, ln2, W_LAYER(w, l, L_GATE), N, D, E);
        if (s->router_bias)
            be->add_bias(rlogits, s->router_bias, N, E);
        be->router_fwd(rprobs, ridx, rw, rlogits, N, E, K);
        G(s_plan)(be, s, l);
        int32_t *sc = s->send_counts + (size_t)l * E, *rc = s->recv_counts + (size_t)l * E;
        be->gather_rows(xs, ln2, rows, NK, D);
        SEMOE_CHECK(ex->dispatch(ex->state, l, 0, E, D, xs, sc, xr, rc, R));
        SEMOE_CHECK(G(s_experts_fwd)(be, s, w, l, xr, ea, eb, eh, yr));
        SEMOE_CHECK(ex->combine(ex->state, l, 0, E, D, yr, rc, ys, sc));
        be->zero(moe, ND * sizeof(T));
        be->scatter_rows(moe, ys, rows, rw, slots, NK, D);
        be->add(res2, res1, moe, ND);
        x = res2;
    }
    be->rmsnorm_fwd(a->lnf, a->lnf_rstd, x, W_NORM(w), N, D, eps);
    be->linear_fwd(a->logits, a->lnf, W_LM(w), N, D, V);
    T ce = be->crossentropy_fwd(a->losses, a->logits, s->targets, N, V);
    s->global = ex->reduce_stats != NULL;
    if (!s->global) {
        T aux = be->auxloss_fwd(a->rprobs, s->ridx, L * N, E, K);
        loss->ce = (double)ce;
        loss->aux = (double)aux;
        loss->loss = (double)(ce + (T)cfg->router_aux_loss_coef * aux);
        loss->tokens = N;
        return SEMOE_OK;
    }
    return G(s_global_losses)(be, s, ex, (double)cfg->router_aux_loss_coef, ce, loss);
}

semoe_rc G(model_backward)(const BE_T *be, const model_params_t *params, const T *w, T *g,
                           ACTS_T *s, const EX_T *ex)
{
    const model_config_t *cfg = model_params_config(params);
    EX_T local = G(model_exchange_local)(be);
    if (!ex)
        ex = &local;
    int B = s->B, Tn = s->Tn, N = s->N, L = s->L, D = s->D, H = s->H, KVH = s->KVH,
        hd = s->hd, E = s->E, K = s->K, V = s->V, R = s->R;
    int Q = H * hd, KV = KVH * hd, NK = N * K;
    size_t ND = (size_t)N * D;
    double theta = cfg->rope_theta;
    BUFS_T *a = &s->a, *d = &s->d;

    be->zero(s->dmem, G(s_point)(d, NULL, s) * sizeof(T));

    /* the losses: d loss / d ce = 1, d loss / d aux = router_aux_loss_coef */
    if (!s->global) {
        be->crossentropy_bwd(d->logits, a->logits, s->targets, (T)1, N, V);
        be->auxloss_bwd(d->rprobs, s->ridx, (T)cfg->router_aux_loss_coef, L * N, E, K);
    } else {
        /* this process's share of the global losses' gradient (d was zeroed: a plain
         * write of the aux term is its accumulation) */
        be->crossentropy_bwd(d->logits, a->logits, s->targets, (T)s->ce_scale, N, V);
        size_t M = (size_t)L * N;
        for (size_t m = 0; m < M; m++)
            for (int e = 0; e < E; e++)
                s->h_probs[m * E + e] = (T)(cfg->router_aux_loss_coef * s->aux_coef[e]);
        be->to_device(d->rprobs, s->h_probs, M * E * sizeof(T));
    }

    const T *xlast = L > 0 ? a->res2 + (size_t)(L - 1) * ND : a->encoded;
    T *dxlast = L > 0 ? d->res2 + (size_t)(L - 1) * ND : d->encoded;
    be->linear_bwd(d->lnf, W_LM(g), d->logits, a->lnf, W_LM(w), N, D, V);
    be->rmsnorm_bwd(dxlast, W_NORM(g), d->lnf, xlast, W_NORM(w), a->lnf_rstd, N, D);

    for (int l = L - 1; l >= 0; l--) {
        const T *x = l > 0 ? a->res2 + (size_t)(l - 1) * ND : a->encoded;
        T *dx = l > 0 ? d->res2 + (size_t)(l - 1) * ND : d->encoded;
        size_t oQ = (size_t)l * N * Q, oKV = (size_t)l * N * KV, oD = l * ND;
        size_t oN = (size_t)l * N, oE = (size_t)l * N * E, oK = (size_t)l * NK;
        size_t oS = (size_t)l * NK * D, oR = (size_t)l * R * D;
        size_t oP = (size_t)l * B * H * Tn * Tn;
        const int32_t *rows = s->rows + oK, *slots = s->slots + oK, *ridx = s->ridx + oK;
        int32_t *sc = s->send_counts + (size_t)l * E, *rc = s->recv_counts + (size_t)l * E;
        T *dres2 = d->res2 + oD, *dres1 = d->res1 + oD;

        /* res2 = res1 + moe: moe's gradient is dres2 itself */
        be->axpy(dres1, (T)1, dres2, ND);
        be->scatter_rows_bwd(d->ys + oS, d->rw + oK, dres2, a->ys + oS, rows, a->rw + oK, slots,
                             NK, D);
        /* combine's transpose is a dispatch with the same counts */
        int32_t rcb[E > 0 ? E : 1];
        SEMOE_CHECK(ex->dispatch(ex->state, l, 0, E, D, d->ys + oS, sc, d->yr + oR, rcb, R));
        if (memcmp(rcb, rc, (size_t)E * sizeof(int32_t)) != 0)
            return semoe_err(SEMOE_EPROTO,
                             "layer %d: the exchange returned different counts in backward",
                             l);
        G(s_experts_bwd)(be, s, w, g, l, a, d);
        SEMOE_CHECK(ex->combine(ex->state, l, 0, E, D, d->xr + oR, rc, d->xs + oS, sc));
        be->gather_rows_bwd(d->ln2 + oD, d->xs + oS, rows, NK, D);

        /* router: d rw from the combine, d probs from the aux loss */
        be->router_bwd(d->rlogits + oE, d->rw + oK, d->rprobs + oE, a->rprobs + oE, ridx,
                       a->rw + oK, N, E, K);
        be->linear_bwd(d->ln2 + oD, W_LAYER(g, l, L_GATE), d->rlogits + oE, a->ln2 + oD,
                       W_LAYER(w, l, L_GATE), N, D, E);
        be->rmsnorm_bwd(dres1, W_LAYER(g, l, L_LN2), d->ln2 + oD, a->res1 + oD,
                        W_LAYER(w, l, L_LN2), a->ln2_rstd + oN, N, D);

        /* res1 = x + attproj */
        be->axpy(dx, (T)1, dres1, ND);
        be->linear_bwd(d->att + oQ, W_LAYER(g, l, L_O), dres1, a->att + oQ, W_LAYER(w, l, L_O),
                       N, Q, D);
        be->attention_bwd(d->qr + oQ, d->kr + oKV, d->v + oKV, d->att + oQ, a->qr + oQ,
                          a->kr + oKV, a->v + oKV, a->att_probs + oP, B, Tn, H, KVH, hd);
        be->rope_bwd(d->q + oQ, d->qr + oQ, s->pos, N, H, hd, theta);
        be->rope_bwd(d->k + oKV, d->kr + oKV, s->pos, N, KVH, hd, theta);
        be->linear_bwd(d->ln1 + oD, W_LAYER(g, l, L_Q), d->q + oQ, a->ln1 + oD,
                       W_LAYER(w, l, L_Q), N, D, Q);
        be->linear_bwd(d->ln1 + oD, W_LAYER(g, l, L_K), d->k + oKV, a->ln1 + oD,
                       W_LAYER(w, l, L_K), N, D, KV);
        be->linear_bwd(d->ln1 + oD, W_LAYER(g, l, L_V), d->v + oKV, a->ln1 + oD,
                       W_LAYER(w, l, L_V), N, D, KV);
        be->rmsnorm_bwd(dx, W_LAYER(g, l, L_LN1), d->ln1 + oD, x, W_LAYER(w, l, L_LN1),
                        a->ln1_rstd + oN, N, D);
    }
    be->embedding_bwd(W_EMB(g), d->encoded, s->inputs, N, D);
    return SEMOE_OK;
}

semoe_rc G(model_logits)(const BE_T *be, const model_params_t *params, const T *w,
                         const int32_t *tokens, int n, T *logits)
{
    if (n < 1)
        return semoe_err(SEMOE_EINVAL, "logits: need at least one token, not %d", n);
    /* the forward pass wants a target for every position: the last one's is a dummy that
     * neither the logits nor the caller see */
    int32_t *seq = semoe_xmalloc(((size_t)n + 1) * sizeof *seq);
    memcpy(seq, tokens, (size_t)n * sizeof *seq);
    seq[n] = 0;
    ACTS_T *acts = NULL;
    model_loss_t loss;
    semoe_rc rc = G(model_acts_new)(be, params, 1, n, 0, &acts);
    if (rc == SEMOE_OK)
        rc = G(model_forward)(be, params, w, acts, seq, NULL, &loss);
    if (rc == SEMOE_OK)
        be->to_host(logits, acts->a.logits, (size_t)n * (size_t)acts->V * sizeof(T));
    G(model_acts_destroy)(&acts);
    free(seq);
    return rc;
}

#undef W_AT
#undef W_EMB
#undef W_NORM
#undef W_LM
#undef W_LAYER
#undef W_EXPERT
#undef G_CAT_
#undef G_CAT
#undef G
#undef BE_T
#undef ACTS_T
#undef BUFS_T
#undef EX_T
