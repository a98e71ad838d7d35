/* The bf16 graph (gpu/graph_bf16.h) against the CPU backend's fp32 graph: one forward and
 * backward on random weights and tokens (loss, logits, every gradient tensor norm-wise, bf16
 * tolerances), with and without a router bias, on two configs (head dims 64 and 128, tied and
 * untied embeddings, top-2 and top-1); then 20 trainer steps (AdamW, warmup and cosine,
 * clipping, two micro-batches) on the CPU and on the GPU through gpu_pass_bf16, loss by loss
 * within 1e-2 (the bound for bf16), the loss falling on both. During each backward, the
 * pass's dense-ready calls (model_pass_t.on_dense_ready, what the trainer starts its all-reduces
 * on) come once each, the head (num_hidden_layers: final norm, untied lm_head) first, then the
 * layers from the last, and every dense tensor they report (all but the embedding) is already
 * bit for bit what the backward ends with. Skipped (77) without a CUDA device. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/graph_bf16.h"
#include "gpu/ops.h"
#include "model/backend.h"
#include "model/graph.h"
#include "model/job.h"
#include "model/params.h"
#include "model/train.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"
#include "tests/tiny_model.h"

#define S_TOL_LOSS 1e-2  /* losses, and the 20 steps */
#define S_TOL_LOGITS 2e-2 /* bf16 logits against fp32 */
#define S_TOL_GRAD 5e-2  /* a gradient tensor, bf16 activations against fp32: over the 76
                          * same-routing comparisons in the device logs the worst tensor was
                          * 0.6-3.0e-2 (the largest a small k_proj of one kv head over 24
                          * tokens, 3.01e-2, failing the 3e-2 this was); a wrong gradient is off
                          * by far more (0.2-0.6 where one routing differs) */
#define S_GRAD_FLOOR 1e-4

/* REQUIRE outside main: what later checks depend on ends the test */
#define S_NEED(cond, ...)                                                                      \
    do {                                                                                       \
        bool held_ = (cond);                                                                   \
        CHECK_HELD(held_, #cond, __VA_ARGS__);                                                 \
        if (!held_)                                                                            \
            exit(test_finish());                                                               \
    } while (0)

static const model_backend_f32_t *const s_cpu = &cpu_backend_f32;
static const model_backend_f32_t *const s_gpu = &gpu_backend_f32;

/* config 0: hd 64, 4 query heads on 2 kv heads, top-2 of 6 experts, untied; config 1: hd 128,
 * 2 heads on 1, top-1 of 4, tied, 3 layers */
static void s_config(model_config_t *c, int which)
{
    model_config_defaults(c);
    c->vocab_size = 96;
    c->hidden_size = 64;
    c->intermediate_size = 96;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->head_dim = 64;
    c->num_local_experts = 6;
    c->num_experts_per_tok = 2;
    c->max_position_embeddings = 128;
    c->router_aux_loss_coef = 0.02;
    c->tie_word_embeddings = false;
    if (which == 1) {
        c->vocab_size = 128;
        c->hidden_size = 128;
        c->intermediate_size = 64;
        c->num_hidden_layers = 3;
        c->num_attention_heads = 2;
        c->num_key_value_heads = 1;
        c->head_dim = 128;
        c->num_local_experts = 4;
        c->num_experts_per_tok = 1;
        c->router_aux_loss_coef = 0.05;
        c->tie_word_embeddings = true;
    }
}

/* One forward and backward on each side from the same weights. Near ties in the router may
 * go the other way under bf16 (a flipped top-k choice moves a token's whole MoE output, far
 * past bf16 rounding), so the routing is compared on its own first, every layer's ids: on any
 * difference the pair is redrawn (new weights and tokens), up to S_DRAWS times, and the
 * tolerances apply to the first draw that routed identically. Returns false when a draw's
 * run failed. */
#define S_DRAWS 24
/* What the dense-ready calls of one backward saw: each dense tensor's gradient when its layer
 * was reported, and the layers in the order reported. */
typedef struct {
    const model_params_t *p;
    const float *gd; /* the gradient slab on the device */
    int L;
    float **seen;    /* per tensor: its gradient at the report (NULL: not reported) */
    int order[64], n;
} s_ready_t;

static void s_on_ready(void *arg, int layer)
{
    s_ready_t *r = arg;
    if (r->n < 64)
        r->order[r->n] = layer;
    r->n++;
    for (size_t i = 0; i < model_params_count(r->p); i++) {
        const model_param_t *t = model_params_at(r->p, i);
        if (t->kind == MODEL_PARAM_DENSE && model_train_dense_layer(t, (uint32_t)r->L) == layer &&
            !r->seen[i])
            r->seen[i] = test_gpu_downf(r->gd + t->offset, t->numel);
    }
}

/* The calls came once each, L first and then L-1 .. 0, and what they reported is final. */
static void s_check_ready(int which, s_ready_t *r, const float *final)
{
    bool order = r->n == r->L + 1;
    for (int k = 0; k < r->n && k < 64 && order; k++)
        order = r->order[k] == r->L - k;
    CHECK(order, "config %d: %d dense-ready calls, want %d from the head (%d) down", which,
          r->n, r->L + 1, r->L);
    for (size_t i = 0; i < model_params_count(r->p); i++) {
        const model_param_t *t = model_params_at(r->p, i);
        if (t->kind != MODEL_PARAM_DENSE || model_train_dense_layer(t, (uint32_t)r->L) < 0)
            continue;
        CHECK(r->seen[i], "config %d: %s never reported", which, t->name);
        CHECK(!r->seen[i] || !memcmp(r->seen[i], final + t->offset, t->numel * sizeof(float)),
              "config %d: %s reported before its gradient was final", which, t->name);
        free(r->seen[i]);
    }
    free(r->seen);
}

static bool s_pass_once(int which, int B, int T, bool bias, int draw, bool *same_route)
{
    model_config_t cfg;
    s_config(&cfg, which);
    size_t N = (size_t)B * T, V = cfg.vocab_size, E = cfg.num_local_experts;
    size_t L = cfg.num_hidden_layers, K = cfg.num_experts_per_tok;
    model_params_t *p = test_tiny_params(&cfg, test_rand(), 0.1);
    S_NEED(p, "params: %s", semoe_err_msg());
    size_t nf = model_params_slab_floats(p);
    int32_t *tok = test_rand_ints(B * ((size_t)T + 1), (int)V);
    float hb[64] = {0};
    for (size_t e = 0; e < E; e++)
        hb[e] = bias ? (float)(2.0 * test_rand_unit() - 1.0) : 0.0f;

    /* the CPU's fp32 graph */
    model_acts_f32 *a = NULL;
    S_NEED(model_acts_new_f32(s_cpu, p, B, T, 0, &a) == SEMOE_OK, "acts: %s", semoe_err_msg());
    if (bias)
        a->router_bias = hb;
    float *wc = model_slab_new_f32(s_cpu, p), *gc = model_slab_new_f32(s_cpu, p);
    model_slab_load_f32(s_cpu, p, wc);
    model_loss_t lc, lg;
    S_NEED(model_forward_f32(s_cpu, p, wc, a, tok, NULL, &lc) == SEMOE_OK &&
                model_backward_f32(s_cpu, p, wc, gc, a, NULL) == SEMOE_OK,
            "cpu pass: %s", semoe_err_msg());

    /* the bf16 graph */
    gpu_graph_bf16_t *g = NULL;
    S_NEED(gpu_graph_bf16_new(p, B, T, 0, &g) == SEMOE_OK, "bf16 graph: %s", semoe_err_msg());
    float *wd = test_gpu_upf(wc, nf), *gd = gpu_alloc(nf * sizeof(float));
    float *bd = test_gpu_upf(hb, E);
    if (bias)
        gpu_graph_bf16_set_router_bias(g, bd);
    S_NEED(gpu_graph_bf16_forward(g, wd, tok, NULL, &lg) == SEMOE_OK, "bf16 forward: %s",
            semoe_err_msg());
    /* the routing, layer by layer, token by token */
    int32_t *ids = malloc(N * K * sizeof *ids);
    size_t differ = 0;
    for (size_t l = 0; l < L; l++) {
        gpu_to_host(ids, gpu_graph_bf16_route(g, (int)l), N * K * sizeof *ids);
        for (size_t n = 0; n < N; n++)
            differ += memcmp(ids + n * K, a->ridx + (l * N + n) * K, K * sizeof *ids) != 0;
    }
    free(ids);
    *same_route = differ == 0;
    uint16_t *hl = malloc(N * V * sizeof *hl);
    float *logits = malloc(N * V * sizeof *logits);
    gpu_to_host(hl, gpu_graph_bf16_logits(g), N * V * sizeof *hl);
    for (size_t i = 0; i < N * V; i++)
        logits[i] = test_bf16_value(hl[i]);
    s_ready_t rd = {.p = p, .gd = gd, .L = (int)L,
                    .seen = calloc(model_params_count(p), sizeof(float *))};
    gpu_pass_bf16.on_dense_ready(g, s_on_ready, &rd);
    S_NEED(gpu_graph_bf16_backward(g, wd, gd, 1.0) == SEMOE_OK, "bf16 backward: %s",
            semoe_err_msg());
    float *gg = test_gpu_downf(gd, nf);
    s_check_ready(which, &rd, gg);

    double lrel = fabs(lg.loss - lc.loss) / fabs(lc.loss);
    double arel = fabs(lg.aux - lc.aux) / fmax(fabs(lc.aux), 1e-12);
    double grel = test_rel_err(logits, a->a.logits, N * V, 1e-30);
    double worst = 0, all = test_rel_err(gg, gc, nf, 1e-30);
    const char *wname = "";
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        double r = test_rel_err(gg + t->offset, gc + t->offset, t->numel, S_GRAD_FLOOR);
        if (*same_route)
            CHECK(r < S_TOL_GRAD, "config %d: gradient %s rel %.3g", which, t->name, r);
        if (r > worst) {
            worst = r;
            wname = t->name;
        }
    }
    printf("config %d B=%d T=%d bias=%d draw %d: %zu of %zu (token, layer) routings differ%s; "
           "loss %.6f (cpu) %.6f (bf16) rel %.2e; aux rel %.2e; logits rel %.2e; gradients rel "
           "%.2e overall, worst tensor %.2e (%s)\n", which, B, T, bias, draw, differ, N * L,
           *same_route ? "" : " (not compared: redrawn)", lc.loss, lg.loss, lrel, arel, grel,
           all, worst, wname);
    if (*same_route) {
        CHECK(lrel < S_TOL_LOSS, "config %d: loss rel %.3g", which, lrel);
        CHECK(arel < S_TOL_LOSS, "config %d: aux %.6g vs %.6g", which, lg.aux, lc.aux);
        CHECK(grel < S_TOL_LOGITS, "config %d: logits rel %.3g", which, grel);
        CHECK(lg.tokens == (int64_t)N, "tokens %lld", (long long)lg.tokens);
    }

    free(gg);
    free(hl);
    free(logits);
    gpu_free(wd);
    gpu_free(gd);
    gpu_free(bd);
    gpu_graph_bf16_destroy(&g);
    model_slab_destroy_f32(s_cpu, &wc);
    model_slab_destroy_f32(s_cpu, &gc);
    model_acts_destroy_f32(&a);
    model_params_destroy(&p);
    free(tok);
    return true;
}

static void s_check_pass(int which, int B, int T, bool bias)
{
    bool same = false;
    int d = 0;
    for (; d < S_DRAWS && !same; d++)
        s_pass_once(which, B, T, bias, d, &same);
    CHECK(same, "config %d B=%d T=%d: the routing differed from the CPU's in all %d draws",
          which, B, T, S_DRAWS);
}

/* Bad input changes nothing: a token out of range is refused before anything runs. */
static void s_check_refusals(void)
{
    model_config_t cfg;
    s_config(&cfg, 0);
    model_params_t *p = test_tiny_params(&cfg, 7, 0.1);
    gpu_graph_bf16_t *g = NULL;
    CHECK(gpu_graph_bf16_new(p, 0, 4, 0, &g) == SEMOE_EINVAL && !g, "B=0 accepted");
    /* 33.5 M tokens: far more activations than the device holds, an error and not an abort */
    semoe_rc big = gpu_graph_bf16_new(p, 4096, 8192, 0, &g);
    CHECK(big != SEMOE_OK && !g, "a graph for 4096 x 8192 tokens: rc %d", (int)big);
    printf("4096 x 8192 tokens: %s\n", semoe_err_msg());
    S_NEED(gpu_graph_bf16_new(p, 1, 4, 0, &g) == SEMOE_OK, "graph: %s", semoe_err_msg());
    int32_t tok[5] = {1, 2, 96, 3, 4};
    size_t nf = model_params_slab_floats(p);
    float *wd = gpu_alloc(nf * sizeof(float)), *gd = gpu_alloc(nf * sizeof(float));
    model_loss_t l;
    CHECK(gpu_graph_bf16_forward(g, wd, tok, NULL, &l) == SEMOE_EINVAL, "token 96 of 96");
    CHECK(gpu_graph_bf16_backward(g, wd, gd, 1.0) == SEMOE_EINVAL, "backward without forward");
    gpu_free(wd);
    gpu_free(gd);
    gpu_graph_bf16_destroy(&g);
    model_params_destroy(&p);
    /* experts not held: tests/test_gpu_ep_bf16.c */
}

/* 20 steps of the trainer on the CPU and through gpu_pass_bf16 from the same weights on one
 * batch: every loss within 1e-2 of the CPU's, and the loss falls. */
static void s_check_training(void)
{
    model_job_t job;
    test_tiny_train20(&job, 32, 1e-3);
    s_config(&job.model, 0);
    const int steps = 20;
    int V = (int)job.model.vocab_size, rows = (int)job.train.global_batch;
    size_t row_len = job.train.seq_len + 1;

    model_params_t *p = test_tiny_params(&job.model, test_rand(), 0.1);
    model_train_t *tc = NULL, *tg = NULL;
    uint8_t *tok = malloc((size_t)rows * row_len);
    if (!p || model_train_new(s_cpu, p, &job, &tc) != SEMOE_OK ||
        model_train_new_pass(s_gpu, &gpu_pass_bf16, p, &job, &tg) != SEMOE_OK) {
        CHECK(0, "trainers: %s", semoe_err_msg());
        goto done;
    }
    for (size_t i = 0; i < (size_t)rows * row_len; i++)
        tok[i] = (uint8_t)test_rand_below((uint64_t)V);
    /* with expert rows the pass needs an exchange: a step without one fails and changes nothing
     * (the 20 steps below start from the same state as the CPU's) */
    CHECK(model_train_set_expert_rows(tg, 100) == SEMOE_OK, "expert rows: %s", semoe_err_msg());
    CHECK(model_train_step(tg, tok, (uint32_t)rows, 0, NULL, NULL) == SEMOE_EINVAL,
          "an expert-parallel step without an exchange");
    printf("without an exchange: %s\n", semoe_err_msg());
    CHECK(model_train_set_expert_rows(tg, 0) == SEMOE_OK, "expert rows 0: %s", semoe_err_msg());
    double worst = 0, first_c = 0, first_g = 0, last_c = 0, last_g = 0;
    for (int s = 0; s < steps; s++) {
        model_train_report_t rc, rg;
        if (model_train_step(tc, tok, (uint32_t)rows, (uint64_t)s, NULL, &rc) != SEMOE_OK ||
            model_train_step(tg, tok, (uint32_t)rows, (uint64_t)s, NULL, &rg) != SEMOE_OK) {
            CHECK(0, "step %d: %s", s, semoe_err_msg());
            goto done;
        }
        double rel = fabs(rg.loss - rc.loss) / fabs(rc.loss);
        worst = fmax(worst, rel);
        if (s == 0) {
            first_c = rc.loss;
            first_g = rg.loss;
        }
        last_c = rc.loss;
        last_g = rg.loss;
        printf("step %2d: loss %.6f (CPU fp32) %.6f (GPU bf16) rel %.2e; grad norm %.5f %.5f\n",
               s, rc.loss, rg.loss, rel, rc.grad_norm, rg.grad_norm);
        CHECK(isfinite(rg.loss) && rel < S_TOL_LOSS,
              "step %d: loss %.9g (bf16) vs %.9g (CPU): rel %.3g", s, rg.loss, rc.loss, rel);
    }
    CHECK(last_c < first_c && last_g < first_g, "loss did not fall: CPU %.4f -> %.4f, bf16 "
          "%.4f -> %.4f", first_c, last_c, first_g, last_g);
    double ce_c = 0, ce_g = 0;
    CHECK(model_train_eval(tc, tok, (uint32_t)rows, NULL, 0, &ce_c) == SEMOE_OK &&
              model_train_eval(tg, tok, (uint32_t)rows, NULL, 0, &ce_g) == SEMOE_OK,
          "eval: %s", semoe_err_msg());
    double erel = fabs(ce_g - ce_c) / fabs(ce_c);
    CHECK(erel < S_TOL_LOSS, "eval ce %.6g (bf16) vs %.6g: rel %.3g", ce_g, ce_c, erel);
    printf("training: %d steps, worst loss rel %.2e (tolerance %.0e); eval ce rel %.2e\n", steps,
           worst, S_TOL_LOSS, erel);
done:
    model_train_destroy(&tg);
    model_train_destroy(&tc);
    model_params_destroy(&p);
    free(tok);
}

int main(void)
{
    test_init("gpu_bf16_graph");
    if (gpu_device_count() == 0) {
        printf("no CUDA device (%s): skipped\n", semoe_err_msg());
        return 77;
    }
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init: %s", semoe_err_msg());
    s_check_refusals();
    s_check_pass(0, 1, 32, false);
    s_check_pass(0, 3, 17, true);
    s_check_pass(1, 1, 24, false);
    s_check_pass(1, 1, 1, true);
    s_check_training();
    return test_finish();
}
