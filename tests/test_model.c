/* The model graph (model/graph.h) over the CPU backend: every parameter gradient in double
 * against central finite differences of the loss (cross-entropy + aux), float against double,
 * also with a router logit bias (train.router_bias) whose routing is held against a direct
 * computation, the loss at init, the exchange refusing rows for experts not held, and a few
 * AdamW steps lowering the loss on a fixed batch. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/ops.h"
#include "model/backend.h"
#include "model/graph.h"
#include "model/params.h"
#include "tests/harness.h"
#include "tests/tiny_model.h"

/* Below these gradient norms a tensor's gradient counts as zero up to rounding (see uses). */
#define S_GRAD_FLOOR 1e-4
#define S_GRAD_FLOOR_F32 1e-3

static double s_unif(double a)
{
    return a * (2.0 * test_rand_unit() - 1.0);
}

/* Tiny configs: 0 the brief's (untied, 2 layers, top-2 of 4), 1 tied embeddings with top-1 of
 * 3 experts, odd T, more sequences. */
static void s_config(model_config_t *c, int which)
{
    test_tiny_config(c);
    if (which == 1) {
        c->hidden_size = 12;
        c->intermediate_size = 20;
        c->num_hidden_layers = 1;
        c->num_attention_heads = 2;
        c->num_key_value_heads = 1;
        c->head_dim = 6;
        c->num_local_experts = 3;
        c->num_experts_per_tok = 1;
        c->router_aux_loss_coef = 0.05;
        c->tie_word_embeddings = true;
    }
}

/* Adds noise to every held tensor so that nothing is trivial: norms around 1, matrices O(0.4). */
static void s_perturb(model_params_t *p)
{
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (!t->data)
            continue;
        for (uint64_t e = 0; e < t->numel; e++)
            t->data[e] = t->ndim == 1 ? (float)(1.0 + s_unif(0.3)) : t->data[e] + (float)s_unif(0.4);
    }
}

/* Smallest gap between the K-th and (K+1)-th router probability over every layer's tokens:
 * finite differences cannot cross a top-k flip. */
static double s_margin(const model_acts_f64 *a)
{
    int E = a->E, K = a->K;
    if (K >= E)
        return INFINITY;
    double m = INFINITY;
    for (size_t r = 0; r < (size_t)a->L * a->N; r++) {
        double p[64];
        memcpy(p, a->a.rprobs + r * E, (size_t)E * sizeof(double));
        for (int i = 0; i < E; i++) /* selection sort, descending: E is tiny */
            for (int j = i + 1; j < E; j++)
                if (p[j] > p[i]) {
                    double t = p[i];
                    p[i] = p[j];
                    p[j] = t;
                }
        if (p[K - 1] - p[K] < m)
            m = p[K - 1] - p[K];
    }
    return m;
}

static void s_tokens(int32_t *tok, size_t n, int V)
{
    for (size_t i = 0; i < n; i++)
        tok[i] = (int32_t)test_rand_below((uint64_t)V);
}

/* With a router bias (E values, host) set on a: every token's router probabilities, top-k ids
 * and renormalised weights against softmax(ln2 gate^T + bias) computed here in double from the
 * acts' ln2 and the weights; returns the largest difference of a probability or weight (an id
 * that differs is a CHECK failure, unless the K-th and (K+1)-th are within 1e-9: a tie). */
static double s_check_biased_routing(const model_acts_f64 *a, const model_params_t *p,
                                     const double *w, const double *bias, int which)
{
    int L = a->L, N = a->N, D = a->D, E = a->E, K = a->K;
    double worst = 0;
    int wrong = 0;
    for (int l = 0; l < L; l++) {
        char name[MODEL_PARAM_NAME_MAX];
        snprintf(name, sizeof name, "model.layers.%d.block_sparse_moe.gate.weight", l);
        const double *gate = w + model_params_lookup(p, name)->offset; /* (E, D) */
        for (int n = 0; n < N; n++) {
            const double *x = a->a.ln2 + ((size_t)l * N + n) * D;
            double z[64], pr[64], mx = -INFINITY, sum = 0;
            for (int e = 0; e < E; e++) {
                z[e] = bias[e];
                for (int d = 0; d < D; d++)
                    z[e] += gate[(size_t)e * D + d] * x[d];
                mx = fmax(mx, z[e]);
            }
            for (int e = 0; e < E; e++)
                sum += pr[e] = exp(z[e] - mx);
            size_t r = (size_t)l * N + n;
            for (int e = 0; e < E; e++) {
                pr[e] /= sum;
                worst = fmax(worst, fabs(pr[e] - a->a.rprobs[r * E + e]));
            }
            /* top-k by probability, ties to the lower id; weights renormalised over the k */
            int top[64] = {0};
            bool used[64] = {0};
            double ksum = 0;
            for (int k = 0; k < K; k++) {
                int best = -1;
                for (int e = 0; e < E; e++)
                    if (!used[e] && (best < 0 || pr[e] > pr[best]))
                        best = e;
                used[best] = true;
                top[k] = best;
                ksum += pr[best];
            }
            double kth = pr[top[K - 1]], next = -1;
            for (int e = 0; e < E; e++)
                next = !used[e] ? fmax(next, pr[e]) : next;
            bool tie = K < E && kth - next < 1e-9;
            for (int k = 0; k < K && !tie; k++) {
                bool found = false;
                for (int j = 0; j < K; j++)
                    if (a->ridx[r * K + j] == top[k]) {
                        found = true;
                        worst = fmax(worst, fabs(pr[top[k]] / ksum - a->a.rw[r * K + j]));
                    }
                wrong += !found;
            }
        }
    }
    CHECK(wrong == 0, "config %d with a router bias: %d top-k ids differ from the direct "
          "computation", which, wrong);
    return worst;
}

static void s_check_model(int which, int B, int Tn, bool with_bias)
{
    const model_backend_f64_t *be = &cpu_backend_f64;
    const model_backend_f32_t *bf = &cpu_backend_f32;
    model_config_t cfg;
    s_config(&cfg, which);
    CHECK(model_config_validate(&cfg, "test") == SEMOE_OK, "config %d: %s", which,
          semoe_err_msg());
    size_t ntok = (size_t)B * (Tn + 1);
    int32_t *tok = calloc(ntok, sizeof *tok);
    model_params_t *p = NULL;
    model_acts_f64 *a = NULL;
    double *w = NULL;
    model_loss_t loss = {0};
    double margin = 0;
    int attempt;
    /* a router bias: fresh values, large against the logits (O(1) here) so that it decides
     * much of the routing, drawn again with every draw of the weights (two values close at the
     * top-k boundary would keep every draw's margin small); a backend buffer for each
     * precision */
    int E = (int)cfg.num_local_experts;
    double bias[64] = {0};
    float biasf[64] = {0};
    double *bias_be = with_bias ? be->alloc((size_t)E * sizeof(double)) : NULL;
    float *biasf_be = with_bias ? bf->alloc((size_t)E * sizeof(float)) : NULL;
    for (attempt = 0; attempt < 50; attempt++) {
        if (with_bias) {
            for (int e = 0; e < E; e++) {
                biasf[e] = (float)s_unif(3.0);
                bias[e] = biasf[e]; /* the float path sees the same values */
            }
            be->to_device(bias_be, bias, (size_t)E * sizeof(double));
            bf->to_device(biasf_be, biasf, (size_t)E * sizeof(float));
        }
        model_params_destroy(&p);
        model_acts_destroy_f64(&a);
        model_slab_destroy_f64(be, &w);
        if (model_params_new(&cfg, NULL, 0, &p) != SEMOE_OK ||
            model_acts_new_f64(be, p, B, Tn, 0, &a) != SEMOE_OK) {
            CHECK(0, "setup: %s", semoe_err_msg());
            goto done;
        }
        a->router_bias = bias_be;
        model_params_init(p, test_rand());
        s_perturb(p);
        w = model_slab_new_f64(be, p);
        model_slab_load_f64(be, p, w);
        s_tokens(tok, ntok, (int)cfg.vocab_size);
        if (model_forward_f64(be, p, w, a, tok, NULL, &loss) != SEMOE_OK) {
            CHECK(0, "forward: %s", semoe_err_msg());
            goto done;
        }
        margin = s_margin(a);
        if (margin > 2e-3)
            break;
    }
    if (attempt == 50) {
        CHECK(0, "config %d: no draw with a top-k margin > 2e-3 in 50", which);
        goto done;
    }
    printf("config %d%s: loss %.6f (ce %.6f, aux %.6f), top-k margin %.3g after %d redraws\n",
           which, with_bias ? " with a router bias" : "", loss.loss, loss.ce, loss.aux, margin,
           attempt);
    if (with_bias) {
        double rd = s_check_biased_routing(a, p, w, bias, which);
        CHECK(rd < 1e-12, "config %d: biased router probs or weights off the direct computation "
              "by %.3g", which, rd);
        /* the bias does change the routing: without it some token goes elsewhere */
        size_t nidx = (size_t)a->L * a->N * a->K;
        int32_t *with = malloc(nidx * sizeof *with);
        memcpy(with, a->ridx, nidx * sizeof *with);
        model_loss_t l0;
        a->router_bias = NULL;
        model_forward_f64(be, p, w, a, tok, NULL, &l0);
        CHECK(memcmp(with, a->ridx, nidx * sizeof *with) != 0 && l0.loss != loss.loss,
              "config %d: the router bias changed no routing", which);
        a->router_bias = bias_be;
        model_forward_f64(be, p, w, a, tok, NULL, &loss);
        free(with);
        printf("config %d with a router bias: routing matches the direct computation (max "
               "difference %.3g)\n", which, rd);
    }
    CHECK(fabs(loss.loss - (loss.ce + cfg.router_aux_loss_coef * loss.aux)) < 1e-12,
          "loss %.17g != ce + coef aux", loss.loss);

    size_t nslab = (size_t)model_params_slab_floats(p);
    double *g = model_slab_new_f64(be, p);
    model_zero_grad_f64(be, p, g);
    CHECK(model_backward_f64(be, p, w, g, a, NULL) == SEMOE_OK, "backward: %s", semoe_err_msg());

    /* backward accumulates: a second pass doubles the gradient */
    double *g2 = model_slab_new_f64(be, p);
    memcpy(g2, g, nslab * sizeof(double));
    CHECK(model_backward_f64(be, p, w, g2, a, NULL) == SEMOE_OK, "backward: %s", semoe_err_msg());
    double acc_err = 0;
    for (size_t i = 0; i < nslab; i++)
        acc_err = fmax(acc_err, fabs(g2[i] - 2 * g[i]));
    CHECK(acc_err < 1e-12, "second backward did not accumulate: max |g2 - 2g| %.3g", acc_err);

    /* finite differences of every parameter; the routing must not change at +-eps */
    size_t nidx = (size_t)a->L * a->N * a->K;
    int32_t *idx0 = malloc(nidx * sizeof *idx0);
    memcpy(idx0, a->ridx, nidx * sizeof *idx0);
    const double eps = 1e-5;
    double worst = 0;
    const char *worst_name = "";
    int flips = 0, zero_tensors = 0, ntensors = 0;
    size_t nfd = 0;
    for (size_t ti = 0; ti < model_params_count(p); ti++) {
        const model_param_t *t = model_params_at(p, ti);
        if (!t->data)
            continue;
        double dd = 0, gg = 0, ff = 0;
        for (uint64_t e = 0; e < t->numel; e++) {
            double *x = w + t->offset + e, x0 = *x;
            model_loss_t lp, lm;
            *x = x0 + eps;
            model_forward_f64(be, p, w, a, tok, NULL, &lp);
            flips += memcmp(idx0, a->ridx, nidx * sizeof *idx0) != 0;
            *x = x0 - eps;
            model_forward_f64(be, p, w, a, tok, NULL, &lm);
            flips += memcmp(idx0, a->ridx, nidx * sizeof *idx0) != 0;
            *x = x0;
            double fd = (lp.loss - lm.loss) / (2 * eps), an = g[t->offset + e];
            dd += (fd - an) * (fd - an);
            gg += an * an;
            ff += fd * fd;
            nfd++;
        }
        double den = fmax(sqrt(gg), sqrt(ff));
        /* A gradient can be zero up to rounding (top-1 routing with perfectly balanced
         * counts leaves the gate only the aux term, which then cancels): there the finite
         * differences are noise of ~1e-11 per entry, so the error is taken relative to at
         * least S_GRAD_FLOOR, i.e. checked absolutely for such tensors. */
        double rel = sqrt(dd) / fmax(den, S_GRAD_FLOOR);
        ntensors++;
        zero_tensors += den == 0;
        /* zero exactly for the experts no token was routed to */
        int routed = t->kind != MODEL_PARAM_EXPERT ||
                     a->send_counts[(size_t)t->layer * a->E + (size_t)t->expert] > 0;
        CHECK((den > 0) == routed, "config %d: %s: gradient norm %.3g with %s", which, t->name,
              den, routed ? "tokens routed to it" : "no tokens routed to it");
        if (rel > worst) {
            worst = rel;
            worst_name = t->name;
        }
        CHECK(rel < 1e-6, "config %d: %s: gradient vs finite differences: rel %.3g (|g| %.3g)",
              which, t->name, rel, sqrt(gg));
    }
    CHECK(flips == 0, "config %d: %d perturbations changed the top-k selection", which, flips);
    printf("config %d: %zu entries in %d tensors by finite differences: worst rel %.3g (%s), "
           "%d zero tensors\n",
           which, nfd, ntensors, worst, worst_name, zero_tensors);
    /* restore acts to the unperturbed forward for the float comparison */
    model_forward_f64(be, p, w, a, tok, NULL, &loss);

    /* float against double, same weights (the float slab is what the double one came from) */
    model_acts_f32 *af = NULL;
    CHECK(model_acts_new_f32(bf, p, B, Tn, 0, &af) == SEMOE_OK, "acts f32: %s", semoe_err_msg());
    if (af)
        af->router_bias = biasf_be;
    float *gf = model_slab_new_f32(bf, p);
    model_loss_t lf;
    float *wf = model_params_slab(p);
    CHECK(model_forward_f32(bf, p, wf, af, tok, NULL, &lf) == SEMOE_OK, "f32 forward: %s",
          semoe_err_msg());
    model_zero_grad_f32(bf, p, gf);
    CHECK(model_backward_f32(bf, p, wf, gf, af, NULL) == SEMOE_OK, "f32 backward: %s",
          semoe_err_msg());
    double lrel = fabs(lf.loss - loss.loss) / fabs(loss.loss);
    CHECK(lrel < 1e-5, "config %d: f32 loss %.9g vs f64 %.9g: rel %.3g", which, lf.loss,
          loss.loss, lrel);
    double fworst = 0;
    const char *fworst_name = "";
    for (size_t ti = 0; ti < model_params_count(p); ti++) {
        const model_param_t *t = model_params_at(p, ti);
        if (!t->data)
            continue;
        double dd = 0, gg = 0;
        for (uint64_t e = 0; e < t->numel; e++) {
            double d = (double)gf[t->offset + e] - g[t->offset + e];
            dd += d * d;
            gg += g[t->offset + e] * g[t->offset + e];
        }
        /* float rounding of a gradient that is zero up to rounding: relative to a floor */
        double rel = sqrt(dd) / fmax(sqrt(gg), S_GRAD_FLOOR_F32);
        if (rel > fworst) {
            fworst = rel;
            fworst_name = t->name;
        }
        CHECK(rel < 1e-5, "config %d: %s: f32 vs f64 gradient rel %.3g", which, t->name, rel);
    }
    printf("config %d: f32 vs f64: loss rel %.3g, worst gradient rel %.3g (%s)\n", which, lrel,
           fworst, fworst_name);

    model_slab_destroy_f32(bf, &gf);
    model_acts_destroy_f32(&af);
    free(idx0);
    model_slab_destroy_f64(be, &g2);
    model_slab_destroy_f64(be, &g);
done:
    model_slab_destroy_f64(be, &w);
    model_acts_destroy_f64(&a);
    model_params_destroy(&p);
    be->free(bias_be);
    bf->free(biasf_be);
    free(tok);
}

/* The loss at init (small weights) is about log V; AdamW on a fixed batch lowers it. */
static void s_check_train(void)
{
    const model_backend_f32_t *be = &cpu_backend_f32;
    model_config_t cfg;
    s_config(&cfg, 0);
    /* 64 targets: the init CE's sampling spread is about 0.08 / sqrt(64) = 0.01 */
    int B = 4, Tn = 16;
    int32_t tok[4 * 17];
    s_tokens(tok, 4 * 17, (int)cfg.vocab_size);
    model_params_t *p = NULL;
    model_acts_f32 *a = NULL;
    if (model_params_new(&cfg, NULL, 0, &p) != SEMOE_OK ||
        model_acts_new_f32(be, p, B, Tn, 0, &a) != SEMOE_OK) {
        CHECK(0, "setup: %s", semoe_err_msg());
        goto done;
    }
    model_params_init(p, test_rand());
    float *w = model_params_slab(p);
    size_t n = (size_t)model_params_slab_floats(p);
    float *g = model_slab_new_f32(be, p), *m = model_slab_new_f32(be, p),
          *v = model_slab_new_f32(be, p);
    model_loss_t l0, l;
    CHECK(model_forward_f32(be, p, w, a, tok, NULL, &l0) == SEMOE_OK, "forward: %s",
          semoe_err_msg());
    CHECK(fabs(l0.ce - log(cfg.vocab_size)) < 0.05, "ce at init %.5f, log V %.5f", l0.ce,
          log(cfg.vocab_size));
    /* aux at near-uniform routing: E * sum_e f_e P_e with P_e ~ 1/E, sum f_e = K */
    CHECK(fabs(l0.aux - cfg.num_experts_per_tok) < 0.1, "aux at init %.5f, K %u", l0.aux,
          cfg.num_experts_per_tok);
    l = l0;
    for (int step = 1; step <= 40; step++) {
        model_zero_grad_f32(be, p, g);
        CHECK(model_backward_f32(be, p, w, g, a, NULL) == SEMOE_OK, "backward: %s",
              semoe_err_msg());
        be->adamw(w, g, m, v, n, 1e-2, 0.9, 0.999, 1e-8, 0.0, step, 1.0);
        CHECK(model_forward_f32(be, p, w, a, tok, NULL, &l) == SEMOE_OK, "forward: %s",
              semoe_err_msg());
    }
    printf("train: loss %.4f (ce %.4f) at init, %.4f (ce %.4f) after 40 AdamW steps\n", l0.loss,
           l0.ce, l.loss, l.ce);
    CHECK(l.ce < 0.5 * l0.ce, "40 AdamW steps took ce from %.4f only to %.4f", l0.ce, l.ce);
    model_slab_destroy_f32(be, &g);
    model_slab_destroy_f32(be, &m);
    model_slab_destroy_f32(be, &v);
done:
    model_acts_destroy_f32(&a);
    model_params_destroy(&p);
}

/* A worker holding only some experts: the local exchange delivers rows for every expert, so
 * the graph must refuse rather than compute with missing weights; bad tokens are refused. */
static void s_check_errors(void)
{
    const model_backend_f32_t *be = &cpu_backend_f32;
    model_config_t cfg;
    s_config(&cfg, 0);
    uint32_t held[] = {0, 5};
    model_params_t *p = NULL;
    model_acts_f32 *a = NULL;
    int32_t tok[2 * 9];
    s_tokens(tok, 18, (int)cfg.vocab_size);
    if (model_params_new(&cfg, held, 2, &p) != SEMOE_OK ||
        model_acts_new_f32(be, p, 2, 8, 0, &a) != SEMOE_OK) {
        CHECK(0, "setup: %s", semoe_err_msg());
        goto done;
    }
    model_params_init(p, 7);
    model_loss_t l;
    semoe_rc rc = model_forward_f32(be, p, model_params_slab(p), a, tok, NULL, &l);
    CHECK(rc == SEMOE_EPROTO, "forward with experts missing: %s", semoe_rc_name(rc));
    CHECK(strstr(semoe_err_msg(), "does not hold") != NULL, "message: %s", semoe_err_msg());
    tok[3] = (int32_t)cfg.vocab_size;
    rc = model_forward_f32(be, p, model_params_slab(p), a, tok, NULL, &l);
    CHECK(rc == SEMOE_EINVAL, "token out of range: %s", semoe_rc_name(rc));
done:
    model_acts_destroy_f32(&a);
    model_params_destroy(&p);
}

int main(void)
{
    test_init("model");
    s_check_model(0, 2, 8, false);
    s_check_model(1, 3, 5, false);
    s_check_model(0, 2, 8, true);
    s_check_model(1, 3, 5, true);
    s_check_train();
    s_check_errors();
    return test_finish();
}
