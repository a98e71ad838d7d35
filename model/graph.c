/* The model graph (model/graph.h), compiled twice from model/graph_impl.h: for float (what
 * runs) and double (what the gradient tests use). Here: what does not depend on the type, the
 * offsets of the tensors in a params-shaped slab. */
#include "model/graph.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* s->off[]: embed, norm, lm_head (= embed when tied), then per layer the L_* tensors, then per
 * (layer, expert) the X_* tensors. UINT64_MAX: not held. */
enum { OFF_EMBED = 0, OFF_NORM, OFF_LM, OFF_LAYERS };
enum { L_LN1 = 0, L_Q, L_K, L_V, L_O, L_LN2, L_GATE, L_COUNT };
enum { X_W1 = 0, X_W2, X_W3, X_COUNT };

static size_t s_off_layer(int l, int t)
{
    return OFF_LAYERS + (size_t)l * L_COUNT + (size_t)t;
}

static size_t s_off_expert(int L, int E, int l, int j, int t)
{
    return OFF_LAYERS + (size_t)L * L_COUNT + ((size_t)l * E + (size_t)j) * X_COUNT + (size_t)t;
}

static semoe_rc s_find(const model_params_t *params, uint64_t *dst, int need, const char *fmt,
                       int a, int b)
{
    char name[MODEL_PARAM_NAME_MAX];
    snprintf(name, sizeof name, fmt, a, b);
    const model_param_t *p = model_params_lookup(params, name);
    if (!p)
        return semoe_err(SEMOE_EINVAL, "model graph: parameter %s missing from the table", name);
    *dst = p->data ? p->offset : UINT64_MAX;
    if (need && *dst == UINT64_MAX)
        return semoe_err(SEMOE_EINVAL, "model graph: dense parameter %s not held", name);
    return SEMOE_OK;
}

/* Fills *out (caller frees) with the offsets of every tensor of params' config. */
static semoe_rc s_offsets(const model_params_t *params, uint64_t **out)
{
    const model_config_t *cfg = model_params_config(params);
    int L = (int)cfg->num_hidden_layers, E = (int)cfg->num_local_experts;
    uint64_t *off = semoe_xcalloc(s_off_expert(L, E, L, 0, 0), sizeof(uint64_t));
    static const char *const layer_fmt[L_COUNT] = {
        "model.layers.%d.input_layernorm.weight%.0d",
        "model.layers.%d.self_attn.q_proj.weight%.0d",
        "model.layers.%d.self_attn.k_proj.weight%.0d",
        "model.layers.%d.self_attn.v_proj.weight%.0d",
        "model.layers.%d.self_attn.o_proj.weight%.0d",
        "model.layers.%d.post_attention_layernorm.weight%.0d",
        "model.layers.%d.block_sparse_moe.gate.weight%.0d",
    };
    static const char *const expert_fmt[X_COUNT] = {
        "model.layers.%d.block_sparse_moe.experts.%d.w1.weight",
        "model.layers.%d.block_sparse_moe.experts.%d.w2.weight",
        "model.layers.%d.block_sparse_moe.experts.%d.w3.weight",
    };
    semoe_rc rc;
    SEMOE_CHECK_GOTO(s_find(params, &off[OFF_EMBED], 1, "model.embed_tokens.weight%.0d%.0d", 0,
                            0), rc, fail);
    SEMOE_CHECK_GOTO(s_find(params, &off[OFF_NORM], 1, "model.norm.weight%.0d%.0d", 0, 0), rc,
                     fail);
    if (cfg->tie_word_embeddings)
        off[OFF_LM] = off[OFF_EMBED];
    else
        SEMOE_CHECK_GOTO(s_find(params, &off[OFF_LM], 1, "lm_head.weight%.0d%.0d", 0, 0), rc,
                         fail);
    for (int l = 0; l < L; l++) {
        for (int t = 0; t < L_COUNT; t++)
            SEMOE_CHECK_GOTO(s_find(params, &off[s_off_layer(l, t)], 1, layer_fmt[t], l, 0), rc,
                             fail);
        for (int j = 0; j < E; j++)
            for (int t = 0; t < X_COUNT; t++)
                SEMOE_CHECK_GOTO(s_find(params, &off[s_off_expert(L, E, l, j, t)], 0,
                                        expert_fmt[t], l, j),
                                 rc, fail);
    }
    *out = off;
    return SEMOE_OK;
fail:
    free(off);
    return rc;
}

semoe_rc model_losses_from_stats(double *st, int E, int L, double coef,
                                 semoe_rc (*reduce)(void *state, double *buf, size_t n),
                                 void *state, double *aux_grad, double *per_target,
                                 model_loss_t *loss)
{
    if (reduce)
        SEMOE_CHECK(reduce(state, st, 2 * (size_t)E + 2));
    double tokens = st[2 * E + 1];
    if (!(tokens >= 1))
        return semoe_err(SEMOE_EPROTO, "reduce_stats: %g targets over the global batch", tokens);
    double M = tokens * L, aux = 0;
    for (int e = 0; e < E; e++) {
        aux += (st[e] / M) * (st[E + e] / M);
        aux_grad[e] = E * (st[e] / M) / M;
    }
    aux *= E;
    *per_target = 1.0 / tokens;
    loss->ce = st[2 * E] / tokens;
    loss->aux = aux;
    loss->loss = loss->ce + coef * aux;
    loss->tokens = (int64_t)tokens;
    return SEMOE_OK;
}

#define T float
#define S f32
#include "model/graph_impl.h"
#undef T
#undef S

#define T double
#define S f64
#include "model/graph_impl.h"
#undef T
#undef S
