/* The Mixtral parameter table and its slab (see params.h): the table is built once from the
 * config, then the held tensors are laid out back to back in one float32 allocation and each
 * entry points into it, as llm.c's malloc_and_point_parameters does. */
#include "model/params.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct model_params {
    model_config_t cfg;
    model_param_t *t;     /* the table, state_dict order */
    size_t n;
    uint32_t *hash_slot;  /* open addressing over names: index + 1, 0 = empty */
    size_t hash_cap;      /* a power of two >= 2n */
    uint8_t *held;        /* per global expert id layer * E + j */
    float *slab;
    uint64_t slab_floats;
};

/* FNV-1a over a NUL-terminated name: the table's hash and the init RNG's per-tensor key. */
static uint64_t s_name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++) {
        h ^= (uint8_t)*s;
        h *= 1099511628211ull;
    }
    return h;
}

static void s_add(model_params_t *self, model_param_kind kind, int32_t layer, int32_t expert,
                  uint64_t rows, uint64_t cols, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));

static void s_add(model_params_t *self, model_param_kind kind, int32_t layer, int32_t expert,
                  uint64_t rows, uint64_t cols, const char *fmt, ...)
{
    model_param_t *p = &self->t[self->n++];
    memset(p, 0, sizeof *p);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(p->name, sizeof p->name, fmt, ap);
    va_end(ap);
    p->kind = kind;
    p->layer = layer;
    p->expert = expert;
    p->ndim = cols ? 2 : 1;
    p->shape[0] = rows;
    p->shape[1] = cols;
    p->numel = cols ? rows * cols : rows;
    p->offset = UINT64_MAX;
}

static size_t s_table_size(const model_config_t *c)
{
    size_t per_layer = 7 + 3 * (size_t)c->num_local_experts;
    return 1 + (size_t)c->num_hidden_layers * per_layer + 1 + (c->tie_word_embeddings ? 0 : 1);
}

static void s_build(model_params_t *self)
{
    const model_config_t *c = &self->cfg;
    uint64_t V = c->vocab_size, D = c->hidden_size, F = c->intermediate_size;
    uint64_t Q = (uint64_t)c->num_attention_heads * c->head_dim;
    uint64_t KV = (uint64_t)c->num_key_value_heads * c->head_dim;
    uint64_t E = c->num_local_experts;

    s_add(self, MODEL_PARAM_DENSE, -1, -1, V, D, "model.embed_tokens.weight");
    for (uint32_t i = 0; i < c->num_hidden_layers; i++) {
        int32_t l = (int32_t)i;
        s_add(self, MODEL_PARAM_DENSE, l, -1, D, 0, "model.layers.%u.input_layernorm.weight", i);
        s_add(self, MODEL_PARAM_DENSE, l, -1, Q, D, "model.layers.%u.self_attn.q_proj.weight", i);
        s_add(self, MODEL_PARAM_DENSE, l, -1, KV, D, "model.layers.%u.self_attn.k_proj.weight", i);
        s_add(self, MODEL_PARAM_DENSE, l, -1, KV, D, "model.layers.%u.self_attn.v_proj.weight", i);
        s_add(self, MODEL_PARAM_DENSE, l, -1, D, Q, "model.layers.%u.self_attn.o_proj.weight", i);
        s_add(self, MODEL_PARAM_DENSE, l, -1, D, 0,
              "model.layers.%u.post_attention_layernorm.weight", i);
        s_add(self, MODEL_PARAM_DENSE, l, -1, E, D,
              "model.layers.%u.block_sparse_moe.gate.weight", i);
        for (uint32_t j = 0; j < c->num_local_experts; j++) {
            int32_t x = (int32_t)j;
            s_add(self, MODEL_PARAM_EXPERT, l, x, F, D,
                  "model.layers.%u.block_sparse_moe.experts.%u.w1.weight", i, j);
            s_add(self, MODEL_PARAM_EXPERT, l, x, D, F,
                  "model.layers.%u.block_sparse_moe.experts.%u.w2.weight", i, j);
            s_add(self, MODEL_PARAM_EXPERT, l, x, F, D,
                  "model.layers.%u.block_sparse_moe.experts.%u.w3.weight", i, j);
        }
    }
    s_add(self, MODEL_PARAM_DENSE, -1, -1, D, 0, "model.norm.weight");
    if (!c->tie_word_embeddings)
        s_add(self, MODEL_PARAM_DENSE, -1, -1, V, D, "lm_head.weight");

    self->hash_cap = 16;
    while (self->hash_cap < 2 * self->n)
        self->hash_cap *= 2;
    self->hash_slot = semoe_xcalloc(self->hash_cap, sizeof *self->hash_slot);
    for (size_t i = 0; i < self->n; i++) {
        size_t h = (size_t)s_name_hash(self->t[i].name) & (self->hash_cap - 1);
        while (self->hash_slot[h])
            h = (h + 1) & (self->hash_cap - 1);
        self->hash_slot[h] = (uint32_t)(i + 1);
    }
}

semoe_rc model_params_new(const model_config_t *cfg, const uint32_t *experts, size_t n_experts,
                          model_params_t **out)
{
    *out = NULL;
    if (cfg->num_hidden_layers == 0 || cfg->num_local_experts == 0 || cfg->hidden_size == 0 ||
        cfg->head_dim == 0 || cfg->vocab_size == 0 || cfg->intermediate_size == 0)
        return semoe_err(SEMOE_EINVAL, "model params: config has a zero dimension");
    uint64_t n_global = (uint64_t)cfg->num_hidden_layers * cfg->num_local_experts;
    if (n_global > UINT32_MAX)
        return semoe_err(SEMOE_EINVAL, "model params: %llu experts in all: too many",
                         (unsigned long long)n_global);

    model_params_t *self = semoe_xcalloc(1, sizeof *self);
    self->cfg = *cfg;
    self->held = semoe_xcalloc((size_t)n_global, 1);
    if (!experts) {
        memset(self->held, 1, (size_t)n_global);
    } else {
        for (size_t i = 0; i < n_experts; i++) {
            if (experts[i] >= n_global) {
                semoe_rc rc = semoe_err(SEMOE_EINVAL,
                                        "model params: expert id %u out of range: %u layers x "
                                        "%u experts have ids 0..%llu",
                                        experts[i], cfg->num_hidden_layers,
                                        cfg->num_local_experts,
                                        (unsigned long long)(n_global - 1));
                model_params_destroy(&self);
                return rc;
            }
            if (self->held[experts[i]]) {
                semoe_rc rc = semoe_err(SEMOE_EINVAL, "model params: expert id %u listed twice",
                                        experts[i]);
                model_params_destroy(&self);
                return rc;
            }
            self->held[experts[i]] = 1;
        }
    }

    self->t = semoe_xcalloc(s_table_size(cfg), sizeof *self->t);
    s_build(self);

    /* Lay out the held tensors, then one allocation, then point. */
    uint64_t off = 0;
    for (size_t i = 0; i < self->n; i++) {
        model_param_t *p = &self->t[i];
        if (p->kind == MODEL_PARAM_EXPERT &&
            !self->held[(uint64_t)p->layer * cfg->num_local_experts + (uint64_t)p->expert])
            continue;
        p->offset = off;
        off += p->numel;
    }
    if (off > SIZE_MAX / sizeof(float)) {
        model_params_destroy(&self);
        return semoe_err(SEMOE_ENOMEM, "model params: slab of %llu floats does not fit",
                         (unsigned long long)off);
    }
    self->slab_floats = off;
    self->slab = semoe_xcalloc(off ? (size_t)off : 1, sizeof(float));
    for (size_t i = 0; i < self->n; i++)
        if (self->t[i].offset != UINT64_MAX)
            self->t[i].data = self->slab + self->t[i].offset;
    *out = self;
    return SEMOE_OK;
}

void model_params_destroy(model_params_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    model_params_t *self = *self_p;
    free(self->slab);
    free(self->hash_slot);
    free(self->t);
    free(self->held);
    free(self);
    *self_p = NULL;
}

const model_config_t *model_params_config(const model_params_t *self)
{
    return &self->cfg;
}

size_t model_params_count(const model_params_t *self)
{
    return self->n;
}

const model_param_t *model_params_at(const model_params_t *self, size_t i)
{
    return i < self->n ? &self->t[i] : NULL;
}

long model_params_index(const model_params_t *self, const char *name)
{
    size_t h = (size_t)s_name_hash(name) & (self->hash_cap - 1);
    while (self->hash_slot[h]) {
        size_t i = self->hash_slot[h] - 1;
        if (strcmp(self->t[i].name, name) == 0)
            return (long)i;
        h = (h + 1) & (self->hash_cap - 1);
    }
    return -1;
}

const model_param_t *model_params_lookup(const model_params_t *self, const char *name)
{
    long i = model_params_index(self, name);
    return i < 0 ? NULL : &self->t[i];
}

int model_params_holds_expert(const model_params_t *self, uint32_t layer, uint32_t j)
{
    if (layer >= self->cfg.num_hidden_layers || j >= self->cfg.num_local_experts)
        return 0;
    return self->held[(uint64_t)layer * self->cfg.num_local_experts + j];
}

semoe_rc model_params_foreach(model_params_t *self,
                              semoe_rc (*fn)(model_param_t *p, void *arg), void *arg)
{
    for (size_t i = 0; i < self->n; i++)
        if (self->t[i].data)
            SEMOE_CHECK(fn(&self->t[i], arg));
    return SEMOE_OK;
}

float *model_params_slab(model_params_t *self)
{
    return self->slab;
}

uint64_t model_params_slab_floats(const model_params_t *self)
{
    return self->slab_floats;
}

/* splitmix64's finaliser: a bijective mix with full avalanche, the core of the counter RNG. */
static uint64_t s_mix(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    x ^= x >> 31;
    return x;
}

/* Uniform in (0, 1) from 53 bits of a mixed counter. */
static double s_unit(uint64_t key, uint64_t ctr)
{
    uint64_t r = s_mix(key ^ s_mix(ctr + 0x9e3779b97f4a7c15ull));
    return ((double)(r >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static int s_is_norm(const model_param_t *p)
{
    return p->ndim == 1;
}

/* A tensor's key for the draws: from the seed and its name. */
static uint64_t s_init_key(const model_param_t *p, uint64_t seed)
{
    return s_mix(seed ^ s_mix(s_name_hash(p->name)));
}

/* Element idx under key: Box-Muller on two draws at counters 2 idx and 2 idx + 1, so that
 * element idx alone decides. */
static float s_init_draw(uint64_t key, double range, uint64_t idx)
{
    double u1 = s_unit(key, 2 * idx), u2 = s_unit(key, 2 * idx + 1);
    double z = sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
    return (float)(z * range);
}

float model_params_init_value(const model_config_t *cfg, const model_param_t *p, uint64_t seed,
                              uint64_t idx)
{
    if (s_is_norm(p))
        return 1.0f;
    return s_init_draw(s_init_key(p, seed), cfg->initializer_range, idx);
}

/* One thread's share of model_params_init: slice k of n of every held tensor. */
typedef struct {
    model_params_t *self;
    uint64_t seed;
    int k, n;
} s_init_part_t;

static void *s_init_part(void *arg)
{
    const s_init_part_t *a = arg;
    model_params_t *self = a->self;
    for (size_t i = 0; i < self->n; i++) {
        model_param_t *p = &self->t[i];
        if (!p->data)
            continue;
        uint64_t lo = p->numel * (uint64_t)a->k / (uint64_t)a->n;
        uint64_t hi = p->numel * (uint64_t)(a->k + 1) / (uint64_t)a->n;
        if (s_is_norm(p)) {
            for (uint64_t j = lo; j < hi; j++)
                p->data[j] = 1.0f;
            continue;
        }
        uint64_t key = s_init_key(p, a->seed);
        double range = self->cfg.initializer_range;
        for (uint64_t j = lo; j < hi; j++)
            p->data[j] = s_init_draw(key, range, j);
    }
    return NULL;
}

/* Every element is model_params_init_value's, whatever the split: a large model's billions of
 * draws go on every core (a 2.3 B model took minutes on one, longer than a PLAN may wait). */
void model_params_init(model_params_t *self, uint64_t seed)
{
    uint64_t total = 0;
    for (size_t i = 0; i < self->n; i++)
        total += self->t[i].data ? self->t[i].numel : 0;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int n = total < ((uint64_t)1 << 22) || cores < 2 ? 1 : cores > 64 ? 64 : (int)cores;
    s_init_part_t parts[64];
    pthread_t th[64];
    int started = 0;
    for (int k = 0; k < n; k++)
        parts[k] = (s_init_part_t){self, seed, k, n};
    for (int k = 1; k < n; k++)
        if (pthread_create(&th[k], NULL, s_init_part, &parts[k]) == 0)
            started = k;
        else
            break;
    /* slices whose thread did not start run here */
    for (int k = started + 1; k < n; k++)
        s_init_part(&parts[k]);
    s_init_part(&parts[0]);
    for (int k = 1; k <= started; k++)
        pthread_join(th[k], NULL);
}

uint64_t model_params_per_expert(const model_config_t *c)
{
    return 3ull * c->intermediate_size * c->hidden_size;
}

uint64_t model_params_dense(const model_config_t *c)
{
    uint64_t V = c->vocab_size, D = c->hidden_size;
    uint64_t Q = (uint64_t)c->num_attention_heads * c->head_dim;
    uint64_t KV = (uint64_t)c->num_key_value_heads * c->head_dim;
    uint64_t per_layer = 2 * D + Q * D + 2 * KV * D + D * Q + (uint64_t)c->num_local_experts * D;
    return V * D + c->num_hidden_layers * per_layer + D + (c->tie_word_embeddings ? 0 : V * D);
}

uint64_t model_params_total(const model_config_t *c)
{
    return model_params_dense(c) + (uint64_t)c->num_hidden_layers * c->num_local_experts *
                                       model_params_per_expert(c);
}

uint64_t model_params_active(const model_config_t *c)
{
    uint64_t k = c->num_experts_per_tok < c->num_local_experts ? c->num_experts_per_tok
                                                               : c->num_local_experts;
    return model_params_dense(c) + (uint64_t)c->num_hidden_layers * k *
                                       model_params_per_expert(c);
}
