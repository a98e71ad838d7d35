/* Tests the Mixtral parameter table (model/params.c): names and shapes as transformers' state_dict
 * has them for random configs, tied and untied, counts against the formula and Mixtral-8x7B's
 * published size, the slab layout for random expert subsets, and an init that does not depend
 * on which worker holds a tensor. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/config.h"
#include "model/params.h"
#include "tests/harness.h"

static bool s_one_line(const char *msg)
{
    return msg && *msg && !strchr(msg, '\n');
}

static void s_random_config(model_config_t *c)
{
    model_config_defaults(c);
    c->vocab_size = 1 + (uint32_t)test_rand_below(300);
    c->num_key_value_heads = 1 + (uint32_t)test_rand_below(3);
    c->num_attention_heads = c->num_key_value_heads * (1 + (uint32_t)test_rand_below(3));
    c->head_dim = 1 + (uint32_t)test_rand_below(8);
    c->hidden_size = 1 + (uint32_t)test_rand_below(40);
    c->intermediate_size = 1 + (uint32_t)test_rand_below(40);
    c->num_hidden_layers = 1 + (uint32_t)test_rand_below(5);
    c->num_local_experts = 1 + (uint32_t)test_rand_below(9);
    c->num_experts_per_tok = 1 + (uint32_t)test_rand_below(c->num_local_experts);
    c->tie_word_embeddings = test_rand_below(2);
    c->initializer_range = 0.01 + 0.05 * test_rand_unit();
}

/* Checks one table entry: present under name with the given shape and kind. */
static void s_expect(const model_params_t *p, const char *name, uint64_t r, uint64_t c,
                     model_param_kind kind, int layer, int expert)
{
    const model_param_t *t = model_params_lookup(p, name);
    CHECK(t != NULL, "%s missing from the table", name);
    if (!t)
        return;
    CHECK(t->ndim == (c ? 2u : 1u) && t->shape[0] == r && (c == 0 || t->shape[1] == c) &&
              t->numel == (c ? r * c : r),
          "%s: shape (%llu, %llu) ndim %u, want (%llu, %llu)", name,
          (unsigned long long)t->shape[0], (unsigned long long)t->shape[1], t->ndim,
          (unsigned long long)r, (unsigned long long)c);
    CHECK(t->kind == kind && t->layer == layer && t->expert == expert,
          "%s: kind %d layer %d expert %d", name, t->kind, t->layer, t->expert);
}

static void s_test_table(void)
{
    for (int iter = 0; iter < 50; iter++) {
        model_config_t c;
        s_random_config(&c);
        model_params_t *p = NULL;
        semoe_rc rc = model_params_new(&c, NULL, 0, &p);
        CHECK(rc == SEMOE_OK, "new: %s", semoe_err_msg());
        if (rc != SEMOE_OK)
            return;
        uint64_t V = c.vocab_size, D = c.hidden_size, F = c.intermediate_size;
        uint64_t Q = (uint64_t)c.num_attention_heads * c.head_dim;
        uint64_t KV = (uint64_t)c.num_key_value_heads * c.head_dim, E = c.num_local_experts;
        size_t want_n = 2 + c.num_hidden_layers * (7 + 3 * E) + (c.tie_word_embeddings ? 0 : 1);
        CHECK(model_params_count(p) == want_n, "count %zu, want %zu", model_params_count(p),
              want_n);
        s_expect(p, "model.embed_tokens.weight", V, D, MODEL_PARAM_DENSE, -1, -1);
        s_expect(p, "model.norm.weight", D, 0, MODEL_PARAM_DENSE, -1, -1);
        char name[128];
        for (uint32_t i = 0; i < c.num_hidden_layers; i++) {
#define S_NAME(...) (snprintf(name, sizeof name, __VA_ARGS__), name)
            s_expect(p, S_NAME("model.layers.%u.input_layernorm.weight", i), D, 0,
                     MODEL_PARAM_DENSE, (int)i, -1);
            s_expect(p, S_NAME("model.layers.%u.self_attn.q_proj.weight", i), Q, D,
                     MODEL_PARAM_DENSE, (int)i, -1);
            s_expect(p, S_NAME("model.layers.%u.self_attn.k_proj.weight", i), KV, D,
                     MODEL_PARAM_DENSE, (int)i, -1);
            s_expect(p, S_NAME("model.layers.%u.self_attn.v_proj.weight", i), KV, D,
                     MODEL_PARAM_DENSE, (int)i, -1);
            s_expect(p, S_NAME("model.layers.%u.self_attn.o_proj.weight", i), D, Q,
                     MODEL_PARAM_DENSE, (int)i, -1);
            s_expect(p, S_NAME("model.layers.%u.post_attention_layernorm.weight", i), D, 0,
                     MODEL_PARAM_DENSE, (int)i, -1);
            s_expect(p, S_NAME("model.layers.%u.block_sparse_moe.gate.weight", i), E, D,
                     MODEL_PARAM_DENSE, (int)i, -1);
            for (uint32_t j = 0; j < E; j++) {
                s_expect(p, S_NAME("model.layers.%u.block_sparse_moe.experts.%u.w1.weight", i, j),
                         F, D, MODEL_PARAM_EXPERT, (int)i, (int)j);
                s_expect(p, S_NAME("model.layers.%u.block_sparse_moe.experts.%u.w3.weight", i, j),
                         F, D, MODEL_PARAM_EXPERT, (int)i, (int)j);
                s_expect(p, S_NAME("model.layers.%u.block_sparse_moe.experts.%u.w2.weight", i, j),
                         D, F, MODEL_PARAM_EXPERT, (int)i, (int)j);
            }
#undef S_NAME
        }
        const model_param_t *lm = model_params_lookup(p, "lm_head.weight");
        if (c.tie_word_embeddings)
            CHECK(lm == NULL, "tied: lm_head.weight must not be in the table");
        else
            s_expect(p, "lm_head.weight", V, D, MODEL_PARAM_DENSE, -1, -1);
        CHECK(model_params_lookup(p, "model.layers.0.mlp.gate_proj.weight") == NULL,
              "bogus name found");
        CHECK(model_params_lookup(p, "") == NULL, "empty name found");

        /* Counts: the table's sum against the formula, independently written here. */
        uint64_t dense = 0, expert = 0;
        for (size_t i = 0; i < model_params_count(p); i++) {
            const model_param_t *t = model_params_at(p, i);
            CHECK(model_params_lookup(p, t->name) == t, "%s: lookup finds another entry",
                  t->name);
            if (t->kind == MODEL_PARAM_DENSE)
                dense += t->numel;
            else
                expert += t->numel;
        }
        uint64_t L = c.num_hidden_layers, k = c.num_experts_per_tok;
        uint64_t want_dense = V * D * (c.tie_word_embeddings ? 1 : 2) + D +
                              L * (2 * D + 2 * Q * D + 2 * KV * D + E * D);
        CHECK(dense == want_dense && dense == model_params_dense(&c), "dense %llu want %llu",
              (unsigned long long)dense, (unsigned long long)want_dense);
        CHECK(expert == L * E * 3 * F * D, "expert params %llu", (unsigned long long)expert);
        CHECK(model_params_total(&c) == dense + expert, "total %llu",
              (unsigned long long)model_params_total(&c));
        CHECK(model_params_active(&c) == dense + L * k * 3 * F * D, "active %llu",
              (unsigned long long)model_params_active(&c));
        CHECK(model_params_slab_floats(p) == dense + expert, "slab %llu",
              (unsigned long long)model_params_slab_floats(p));
        model_params_destroy(&p);
        CHECK(p == NULL, "destroy nulls");
    }
}

/* Mixtral-8x7B: 46.7B parameters in all, 12.9B active per token. */
static void s_test_mixtral_8x7b(void)
{
    model_config_t c;
    model_config_hf_defaults(&c);
    c.vocab_size = 32000, c.hidden_size = 4096, c.intermediate_size = 14336;
    c.num_hidden_layers = 32, c.num_attention_heads = 32, c.num_key_value_heads = 8;
    c.head_dim = 128, c.num_local_experts = 8, c.num_experts_per_tok = 2;
    c.tie_word_embeddings = false;
    CHECK(model_params_total(&c) == 46702792704ull, "8x7B total %llu",
          (unsigned long long)model_params_total(&c));
    CHECK(model_params_active(&c) == 12879925248ull, "8x7B active %llu",
          (unsigned long long)model_params_active(&c));
}

/* A random subset of experts: held ones point into one slab, back to back in table order. */
static void s_test_subsets(void)
{
    for (int iter = 0; iter < 50; iter++) {
        model_config_t c;
        s_random_config(&c);
        uint32_t G = c.num_hidden_layers * c.num_local_experts;
        uint32_t *ids = calloc(G, sizeof *ids);
        uint8_t *want = calloc(G, 1);
        size_t m = 0;
        for (uint32_t g = 0; g < G; g++)
            if (test_rand_below(2))
                ids[m++] = g, want[g] = 1;
        for (size_t i = m; i > 1; i--) { /* order must not matter */
            size_t j = test_rand_below(i);
            uint32_t t = ids[i - 1];
            ids[i - 1] = ids[j], ids[j] = t;
        }
        model_params_t *p = NULL;
        semoe_rc rc = model_params_new(&c, ids, m, &p);
        CHECK(rc == SEMOE_OK, "new subset: %s", semoe_err_msg());
        if (rc == SEMOE_OK) {
            uint64_t off = 0;
            float *slab = model_params_slab(p);
            for (size_t i = 0; i < model_params_count(p); i++) {
                const model_param_t *t = model_params_at(p, i);
                bool held = t->kind == MODEL_PARAM_DENSE ||
                            want[(uint32_t)t->layer * c.num_local_experts + (uint32_t)t->expert];
                CHECK(held == (t->data != NULL), "%s: held %d data %p", t->name, held,
                      (void *)t->data);
                if (t->kind == MODEL_PARAM_EXPERT)
                    CHECK(model_params_holds_expert(p, (uint32_t)t->layer, (uint32_t)t->expert) ==
                              held, "%s: holds_expert", t->name);
                if (!held)
                    continue;
                CHECK(t->offset == off && t->data == slab + off, "%s: offset %llu want %llu",
                      t->name, (unsigned long long)t->offset, (unsigned long long)off);
                off += t->numel;
            }
            CHECK(off == model_params_slab_floats(p), "slab floats %llu want %llu",
                  (unsigned long long)model_params_slab_floats(p), (unsigned long long)off);
            CHECK(off == model_params_dense(&c) + m * model_params_per_expert(&c),
                  "slab size against formula");
        }
        model_params_destroy(&p);
        if (G > 0) {
            uint32_t bad[2] = {G, 0};
            rc = model_params_new(&c, bad, 1, &p);
            CHECK(rc == SEMOE_EINVAL && p == NULL && s_one_line(semoe_err_msg()),
                  "out of range id accepted: %s", semoe_err_msg());
            bad[0] = bad[1] = G - 1;
            rc = model_params_new(&c, bad, 2, &p);
            CHECK(rc == SEMOE_EINVAL && p == NULL && s_one_line(semoe_err_msg()),
                  "repeated id accepted: %s", semoe_err_msg());
        }
        free(ids);
        free(want);
    }
}

/* The same seed gives the same values for a tensor whoever holds it. */
static void s_test_init(void)
{
    for (int iter = 0; iter < 20; iter++) {
        model_config_t c;
        s_random_config(&c);
        c.num_hidden_layers = 2 + (uint32_t)test_rand_below(3);
        c.num_local_experts = 4 + (uint32_t)test_rand_below(5);
        c.num_experts_per_tok = 2;
        uint64_t seed = test_rand();
        model_params_t *all = NULL, *some = NULL, *other = NULL;
        uint32_t ids[2] = {7, 3}, ids2[3] = {3, 1, 5};
        CHECK(model_params_new(&c, NULL, 0, &all) == SEMOE_OK, "%s", semoe_err_msg());
        CHECK(model_params_new(&c, ids, 2, &some) == SEMOE_OK, "%s", semoe_err_msg());
        CHECK(model_params_new(&c, ids2, 3, &other) == SEMOE_OK, "%s", semoe_err_msg());
        if (!all || !some || !other)
            return;
        model_params_init(all, seed);
        model_params_init(some, seed);
        model_params_init(other, seed);
        size_t compared = 0;
        for (size_t i = 0; i < model_params_count(all); i++) {
            const model_param_t *a = model_params_at(all, i);
            const model_param_t *b = model_params_at(some, i), *o = model_params_at(other, i);
            if (b->data) {
                CHECK(memcmp(a->data, b->data, a->numel * 4) == 0, "%s differs holding {3,7}",
                      a->name);
                compared++;
            }
            if (o->data)
                CHECK(memcmp(a->data, o->data, a->numel * 4) == 0, "%s differs holding {1,3,5}",
                      a->name);
            for (uint64_t k = 0; k < a->numel && k < 5; k++)
                CHECK(a->data[k] == model_params_init_value(&c, a, seed, k),
                      "%s[%llu]: init_value disagrees", a->name, (unsigned long long)k);
            if (a->ndim == 1) {
                bool ones = true;
                for (uint64_t k = 0; k < a->numel; k++)
                    ones = ones && a->data[k] == 1.0f;
                CHECK(ones, "%s: norm weights not all 1", a->name);
            }
        }
        CHECK(compared > 0, "nothing compared");

        /* A big matrix: mean ~ 0, std ~ initializer_range, all finite, not all equal. */
        const model_param_t *w = model_params_lookup(all, "model.layers.1.block_sparse_moe."
                                                          "experts.3.w1.weight");
        CHECK(w != NULL, "expert tensor missing");
        uint64_t n = 0;
        double sum = 0, sq = 0;
        for (size_t i = 0; i < model_params_count(all); i++) {
            const model_param_t *t = model_params_at(all, i);
            if (t->ndim != 2)
                continue;
            for (uint64_t k = 0; k < t->numel; k++) {
                double v = t->data[k];
                CHECK(isfinite(v), "%s[%llu] not finite", t->name, (unsigned long long)k);
                sum += v, sq += v * v, n++;
            }
        }
        double mean = sum / (double)n, sd = sqrt(sq / (double)n - mean * mean);
        double r = c.initializer_range;
        CHECK(fabs(mean) < 6 * r / sqrt((double)n) + 1e-9, "mean %g over %llu (range %g)", mean,
              (unsigned long long)n, r);
        CHECK(fabs(sd / r - 1) < 0.05 + 6 / sqrt((double)n), "std %g want %g over %llu", sd, r,
              (unsigned long long)n);

        /* Another seed, and two tensors of one seed, differ. */
        model_params_init(other, seed + 1);
        const model_param_t *a0 = model_params_at(all, 0), *o0 = model_params_at(other, 0);
        CHECK(memcmp(a0->data, o0->data, a0->numel * 4) != 0 || a0->numel == 1,
              "seed does not change the embedding");
        const model_param_t *q = model_params_lookup(all, "model.layers.0.self_attn.q_proj.weight");
        const model_param_t *k = model_params_lookup(all, "model.layers.0.self_attn.k_proj.weight");
        uint64_t nn = q->numel < k->numel ? q->numel : k->numel;
        CHECK(nn < 2 || memcmp(q->data, k->data, nn * 4) != 0, "q_proj and k_proj equal");
        model_params_destroy(&all);
        model_params_destroy(&some);
        model_params_destroy(&other);
    }
}

int main(void)
{
    test_init("test_params");
    s_test_table();
    s_test_mixtral_8x7b();
    s_test_subsets();
    s_test_init();
    return test_finish();
}
