/* The CUDA backend's fp32 table (gpu/backend.h) against the CPU reference (cpu_backend_f32), as
 * llm.c's test_gpt2.cu checks its kernels: memory functions; linear, attention and router forward
 * and backward on random inputs of odd sizes; then the whole Mixtral graph (loss, logits, routing,
 * every parameter gradient) and 20 steps of the trainer, loss by loss. fp32 against fp32, so the
 * tolerances are fp32's: 1e-5 relative, norm-wise. Skipped (77) without a CUDA device. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "model/backend.h"
#include "model/graph.h"
#include "model/job.h"
#include "model/params.h"
#include "model/train.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"
#include "tests/tiny_model.h"

#define S_TOL 1e-5
/* Below this norm a gradient tensor counts as zero up to fp32 rounding: its error is measured
 * against the floor (as test_model.c does for float against double). */
#define S_GRAD_FLOOR 1e-3

static const model_backend_f32_t *const s_cpu = &cpu_backend_f32;
static const model_backend_f32_t *const s_gpu = &gpu_backend_f32;

/* ---- helpers ------------------------------------------------------------------------- */

/* Downloads device got (n floats) and compares it with host want; returns the error. For an
 * accumulated result init is what the buffers held before (else NULL): the error is then
 * relative to the larger of the result and the increment, so that an increment cancelling
 * its start value (one element of a 1x1 GEMM) does not turn rounding into a failure. */
static double s_cmp_acc(const char *what, const float *got_dev, const float *want,
                        const float *init, size_t n)
{
    float *got = test_gpu_downf(got_dev, n);
    double floor = 1e-30;
    if (init) {
        double inc = 0;
        for (size_t i = 0; i < n; i++)
            inc += ((double)want[i] - init[i]) * ((double)want[i] - init[i]);
        floor = fmax(floor, sqrt(inc));
    }
    double rel = test_rel_err(got, want, n, floor);
    bool finite = true;
    for (size_t i = 0; i < n; i++)
        finite = finite && isfinite(got[i]);
    CHECK(finite && rel < S_TOL, "%s: GPU vs CPU rel %.3g (n %zu%s)", what, rel, n,
          finite ? "" : ", not finite");
    free(got);
    return rel;
}

static double s_cmp(const char *what, const float *got_dev, const float *want, size_t n)
{
    return s_cmp_acc(what, got_dev, want, NULL, n);
}

/* ---- (0) the table and the memory functions --------------------------------------------- */

static void s_check_table(void)
{
    const model_backend_f32_t *b = s_gpu;
    CHECK(strcmp(b->name, "cuda") == 0, "name %s", b->name);
    const void *fns[] = {
        (const void *)b->alloc, (const void *)b->free, (const void *)b->zero,
        (const void *)b->copy, (const void *)b->to_device, (const void *)b->to_host,
        (const void *)b->axpy, (const void *)b->add, (const void *)b->add_bias,
        (const void *)b->embedding_fwd, (const void *)b->embedding_bwd,
        (const void *)b->rmsnorm_fwd, (const void *)b->rmsnorm_bwd,
        (const void *)b->linear_fwd, (const void *)b->linear_bwd, (const void *)b->rope_fwd,
        (const void *)b->rope_bwd, (const void *)b->attention_fwd,
        (const void *)b->attention_bwd, (const void *)b->router_fwd,
        (const void *)b->router_bwd, (const void *)b->swiglu_fwd, (const void *)b->swiglu_bwd,
        (const void *)b->crossentropy_fwd, (const void *)b->crossentropy_bwd,
        (const void *)b->auxloss_fwd, (const void *)b->auxloss_bwd,
        (const void *)b->gather_rows, (const void *)b->gather_rows_bwd,
        (const void *)b->scatter_rows, (const void *)b->scatter_rows_bwd,
        (const void *)b->adamw, (const void *)b->sumsq,
    };
    for (size_t i = 0; i < sizeof fns / sizeof fns[0]; i++)
        CHECK(fns[i] != NULL, "gpu_backend_f32: function %zu (in model/backend.h order after "
              "name) is NULL", i);
}

static void s_check_memory(void)
{
    const size_t n = 1000;
    float *d = s_gpu->alloc(n * sizeof(float));
    /* read back through the table's to_host (not test_gpu_downf): it is under test here */
    float *h = malloc(n * sizeof *h);
    s_gpu->to_host(h, d, n * sizeof *h);
    size_t nonzero = 0;
    for (size_t i = 0; i < n; i++)
        nonzero += h[i] != 0.0f;
    CHECK(nonzero == 0, "alloc: %zu of %zu floats not zero", nonzero, n);

    float *x = test_rand_floats(n, 1.0);
    s_gpu->to_device(d, x, n * sizeof(float));
    float *d2 = s_gpu->alloc(n * sizeof(float));
    s_gpu->copy(d2, d, n * sizeof(float));
    s_gpu->zero(d2 + 100, 50 * sizeof(float));
    s_gpu->to_host(h, d2, n * sizeof *h);
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++)
        wrong += h[i] != ((i >= 100 && i < 150) ? 0.0f : x[i]);
    CHECK(wrong == 0, "to_device, copy, zero, to_host: %zu of %zu floats wrong", wrong, n);

    /* memmove semantics, as the CPU backend's copy: overlapping, both directions */
    s_gpu->copy(d + 10, d, 500 * sizeof(float));
    s_gpu->copy(d2, d2 + 7, 600 * sizeof(float));
    float *want = test_dup_floats(x, n);
    memmove(want + 10, want, 500 * sizeof(float));
    s_gpu->to_host(h, d, n * sizeof *h);
    CHECK(memcmp(h, want, n * sizeof(float)) == 0, "overlapping copy forward differs");
    float *want2 = test_dup_floats(x, n);
    memset(want2 + 100, 0, 50 * sizeof(float));
    memmove(want2, want2 + 7, 600 * sizeof(float));
    s_gpu->to_host(h, d2, n * sizeof *h);
    CHECK(memcmp(h, want2, n * sizeof(float)) == 0, "overlapping copy backward differs");
    free(h);

    void *z = s_gpu->alloc(0);
    CHECK(z != NULL, "alloc(0) returned NULL");
    s_gpu->free(z);
    s_gpu->free(NULL);
    s_gpu->free(d);
    s_gpu->free(d2);
    free(want);
    free(want2);
    free(x);
}

/* ---- (a) ops against the CPU -------------------------------------------------------------- */

static void s_check_linear(int N, int IN, int OUT)
{
    char what[96];
    size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, no = (size_t)N * OUT;
    float *x = test_rand_floats(nx, 1.0), *w = test_rand_floats(nw, 1.0);
    float *dout = test_rand_floats(no, 1.0), *out = test_rand_floats(no, 1.0);
    float *x_d = test_gpu_upf(x, nx), *w_d = test_gpu_upf(w, nw), *dout_d = test_gpu_upf(dout, no);
    float *out_d = test_gpu_upf(out, no); /* garbage: forward must overwrite every element */
    s_cpu->linear_fwd(out, x, w, N, IN, OUT);
    s_gpu->linear_fwd(out_d, x_d, w_d, N, IN, OUT);
    snprintf(what, sizeof what, "linear_fwd N=%d IN=%d OUT=%d", N, IN, OUT);
    double e_fwd = s_cmp(what, out_d, out, no);

    /* backward accumulates: start dx, dw from random values; each gradient alone (the other
     * NULL), then both */
    double e_bwd = 0;
    for (int mode = 0; mode < 3; mode++) {
        float *dx = test_rand_floats(nx, 1.0), *dw = test_rand_floats(nw, 1.0);
        float *dx0 = test_dup_floats(dx, nx), *dw0 = test_dup_floats(dw, nw);
        float *dx_d = test_gpu_upf(dx, nx), *dw_d = test_gpu_upf(dw, nw);
        bool want_dx = mode != 1, want_dw = mode != 0;
        s_cpu->linear_bwd(want_dx ? dx : NULL, want_dw ? dw : NULL, dout, x, w, N, IN, OUT);
        s_gpu->linear_bwd(want_dx ? dx_d : NULL, want_dw ? dw_d : NULL, dout_d, x_d, w_d, N, IN,
                          OUT);
        snprintf(what, sizeof what, "linear_bwd dx N=%d IN=%d OUT=%d mode %d", N, IN, OUT, mode);
        e_bwd = fmax(e_bwd, s_cmp_acc(what, dx_d, dx, dx0, nx));
        snprintf(what, sizeof what, "linear_bwd dw N=%d IN=%d OUT=%d mode %d", N, IN, OUT, mode);
        e_bwd = fmax(e_bwd, s_cmp_acc(what, dw_d, dw, dw0, nw));
        s_gpu->free(dx_d);
        s_gpu->free(dw_d);
        free(dx);
        free(dw);
        free(dx0);
        free(dw0);
    }
    printf("linear    N=%4d IN=%4d OUT=%4d: fwd rel %.2e, bwd rel %.2e\n", N, IN, OUT, e_fwd,
           e_bwd);
    s_gpu->free(x_d);
    s_gpu->free(w_d);
    s_gpu->free(dout_d);
    s_gpu->free(out_d);
    free(x);
    free(w);
    free(dout);
    free(out);
}

static void s_check_attention(int B, int Tn, int H, int KVH, int hd)
{
    char what[128];
    size_t nq = (size_t)B * Tn * H * hd, nk = (size_t)B * Tn * KVH * hd;
    size_t np = (size_t)B * H * Tn * Tn;
    float *q = test_rand_floats(nq, 1.0), *k = test_rand_floats(nk, 1.0);
    float *v = test_rand_floats(nk, 1.0), *out = test_rand_floats(nq, 1.0);
    float *probs = test_rand_floats(np, 1.0);
    float *q_d = test_gpu_upf(q, nq), *k_d = test_gpu_upf(k, nk), *v_d = test_gpu_upf(v, nk);
    float *out_d = test_gpu_upf(out, nq); /* garbage to overwrite, as probs_d */
    float *probs_d = test_gpu_upf(probs, np);
    s_cpu->attention_fwd(out, probs, q, k, v, B, Tn, H, KVH, hd);
    s_gpu->attention_fwd(out_d, probs_d, q_d, k_d, v_d, B, Tn, H, KVH, hd);
#define S_ATT_WHAT(name)                                                                       \
    snprintf(what, sizeof what, "attention %s B=%d T=%d H=%d KVH=%d hd=%d", name, B, Tn, H,    \
             KVH, hd)
    S_ATT_WHAT("fwd out");
    double e_fwd = s_cmp(what, out_d, out, nq);
    S_ATT_WHAT("fwd probs");
    e_fwd = fmax(e_fwd, s_cmp(what, probs_d, probs, np));
    float *gp = test_gpu_downf(probs_d, np);
    size_t above = 0;
    for (size_t r = 0; r < (size_t)B * H * Tn; r++)
        for (int t2 = (int)(r % Tn) + 1; t2 < Tn; t2++)
            above += gp[r * Tn + t2] != 0.0f;
    CHECK(above == 0, "attention B=%d T=%d H=%d: %zu probs above the diagonal not 0", B, Tn, H,
          above);
    free(gp);

    /* backward from the CPU's probs on both sides (the same saved input), accumulating into
     * random gradients */
    float *dout = test_rand_floats(nq, 1.0), *dq = test_rand_floats(nq, 1.0);
    float *dk = test_rand_floats(nk, 1.0), *dv = test_rand_floats(nk, 1.0);
    float *dq0 = test_dup_floats(dq, nq), *dk0 = test_dup_floats(dk, nk);
    float *dv0 = test_dup_floats(dv, nk);
    float *dout_d = test_gpu_upf(dout, nq), *dq_d = test_gpu_upf(dq, nq);
    float *dk_d = test_gpu_upf(dk, nk), *dv_d = test_gpu_upf(dv, nk);
    s_gpu->to_device(probs_d, probs, np * sizeof(float));
    s_cpu->attention_bwd(dq, dk, dv, dout, q, k, v, probs, B, Tn, H, KVH, hd);
    s_gpu->attention_bwd(dq_d, dk_d, dv_d, dout_d, q_d, k_d, v_d, probs_d, B, Tn, H, KVH, hd);
    S_ATT_WHAT("bwd dq");
    double e_bwd = s_cmp_acc(what, dq_d, dq, dq0, nq);
    S_ATT_WHAT("bwd dk");
    e_bwd = fmax(e_bwd, s_cmp_acc(what, dk_d, dk, dk0, nk));
    S_ATT_WHAT("bwd dv");
    e_bwd = fmax(e_bwd, s_cmp_acc(what, dv_d, dv, dv0, nk));
#undef S_ATT_WHAT
    printf("attention B=%d T=%3d H=%2d KVH=%2d hd=%3d: fwd rel %.2e, bwd rel %.2e\n", B, Tn, H,
           KVH, hd, e_fwd, e_bwd);
    float *bufs_d[] = {q_d, k_d, v_d, out_d, probs_d, dout_d, dq_d, dk_d, dv_d};
    for (size_t i = 0; i < sizeof bufs_d / sizeof bufs_d[0]; i++)
        s_gpu->free(bufs_d[i]);
    float *bufs[] = {q, k, v, out, probs, dout, dq, dk, dv, dq0, dk0, dv0};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        free(bufs[i]);
}

/* Router logits without near ties, so that both sides must pick the same experts: each row a
 * random permutation of 0.05 * rank plus noise under 0.01 (neighbouring probabilities 4% to 6%
 * apart). Rows n % 5 == 0 are exact ties everywhere and rows n % 5 == 1 have one exact tie
 * between two experts: equal logits give bit-equal probabilities on each side, and both must
 * break the tie towards the lower index. */
static void s_router_logits(float *l, int N, int E)
{
    int *perm = malloc((size_t)E * sizeof *perm);
    for (int n = 0; n < N; n++) {
        float *row = l + (size_t)n * E;
        for (int e = 0; e < E; e++)
            perm[e] = e;
        for (int e = E - 1; e > 0; e--) {
            int j = (int)test_rand_below((uint64_t)e + 1), t = perm[e];
            perm[e] = perm[j];
            perm[j] = t;
        }
        float base = (float)(2.0 * test_rand_unit() - 1.0);
        for (int e = 0; e < E; e++)
            row[e] = n % 5 == 0 ? base
                                : base + 0.05f * (float)perm[e] + (float)(0.01 * test_rand_unit());
        if (n % 5 == 1 && E >= 2) {
            int a = (int)test_rand_below((uint64_t)E), b = (int)test_rand_below((uint64_t)E - 1);
            b += b >= a;
            row[b] = row[a];
        }
    }
    free(perm);
}

static void s_check_router(int N, int E, int K)
{
    char what[96];
    size_t nE = (size_t)N * E, nK = (size_t)N * K;
    float *logits = malloc(nE * sizeof *logits);
    s_router_logits(logits, N, E);
    float *probs = test_rand_floats(nE, 1.0), *w = test_rand_floats(nK, 1.0);
    int32_t *idx = calloc(nK, sizeof *idx), *gidx = calloc(nK, sizeof *gidx);
    float *logits_d = test_gpu_upf(logits, nE), *probs_d = test_gpu_upf(probs, nE);
    float *w_d = test_gpu_upf(w, nK);
    int32_t *idx_d = test_gpu_upi(idx, nK);
    s_cpu->router_fwd(probs, idx, w, logits, N, E, K);
    s_gpu->router_fwd(probs_d, idx_d, w_d, logits_d, N, E, K);
    snprintf(what, sizeof what, "router_fwd probs N=%d E=%d K=%d", N, E, K);
    double e_fwd = s_cmp(what, probs_d, probs, nE);
    snprintf(what, sizeof what, "router_fwd w N=%d E=%d K=%d", N, E, K);
    e_fwd = fmax(e_fwd, s_cmp(what, w_d, w, nK));
    s_gpu->to_host(gidx, idx_d, nK * sizeof *gidx);
    size_t wrong = 0;
    for (size_t i = 0; i < nK; i++)
        wrong += gidx[i] != idx[i];
    CHECK(wrong == 0, "router_fwd N=%d E=%d K=%d: %zu of %zu top-k ids differ", N, E, K, wrong,
          nK);
    if (N > 0 && K <= E) { /* row 0 is all ties: the first K experts in order */
        size_t bad = 0;
        for (int j = 0; j < K; j++)
            bad += gidx[j] != j;
        CHECK(bad == 0, "router_fwd E=%d K=%d: a row of ties did not pick experts 0..K-1", E,
              K);
    }

    /* backward from the CPU's forward outputs on both sides; with and without dprobs */
    double e_bwd = 0;
    s_gpu->to_device(probs_d, probs, nE * sizeof(float));
    s_gpu->to_device(w_d, w, nK * sizeof(float));
    s_gpu->to_device(idx_d, idx, nK * sizeof *idx);
    float *dw = test_rand_floats(nK, 1.0), *dprobs = test_rand_floats(nE, 1.0);
    float *dw_d = test_gpu_upf(dw, nK), *dprobs_d = test_gpu_upf(dprobs, nE);
    for (int with_dp = 0; with_dp < 2; with_dp++) {
        float *dl = test_rand_floats(nE, 1.0);
        float *dl0 = test_dup_floats(dl, nE);
        float *dl_d = test_gpu_upf(dl, nE);
        s_cpu->router_bwd(dl, dw, with_dp ? dprobs : NULL, probs, idx, w, N, E, K);
        s_gpu->router_bwd(dl_d, dw_d, with_dp ? dprobs_d : NULL, probs_d, idx_d, w_d, N, E, K);
        snprintf(what, sizeof what, "router_bwd N=%d E=%d K=%d dprobs %s", N, E, K,
                 with_dp ? "yes" : "NULL");
        e_bwd = fmax(e_bwd, s_cmp_acc(what, dl_d, dl, dl0, nE));
        s_gpu->free(dl_d);
        free(dl);
        free(dl0);
    }
    printf("router    N=%4d E=%3d K=%d: fwd rel %.2e (ids equal: %s), bwd rel %.2e\n", N, E, K,
           e_fwd, wrong ? "no" : "yes", e_bwd);
    s_gpu->free(logits_d);
    s_gpu->free(probs_d);
    s_gpu->free(w_d);
    s_gpu->free(idx_d);
    s_gpu->free(dw_d);
    s_gpu->free(dprobs_d);
    free(logits);
    free(probs);
    free(w);
    free(idx);
    free(gidx);
    free(dw);
    free(dprobs);
}

/* ---- (b) the whole model ----------------------------------------------------------------- */

/* The configs are test_gpu_config's (tests/tiny_model.h): config 0 runs at T 19, config 1 at
 * T 37 (more than a warp of keys) with a router bias. */

/* One forward and backward of the graph on backend be; the results copied to the host. */
typedef struct {
    model_loss_t loss;
    float *logits; /* (N, V) */
    float *grads;  /* params-shaped slab */
    float *rprobs; /* (L, N, E) */
    int32_t *ridx; /* (L, N, K) */
} s_graph_out_t;

static bool s_run_graph(const model_backend_f32_t *be, const model_params_t *p, int B, int Tn,
                        const int32_t *tok, const float *bias, s_graph_out_t *o)
{
    const model_config_t *c = model_params_config(p);
    size_t N = (size_t)B * Tn, L = c->num_hidden_layers, E = c->num_local_experts;
    size_t K = c->num_experts_per_tok, nf = model_params_slab_floats(p);
    memset(o, 0, sizeof *o);
    model_acts_f32 *a = NULL;
    if (model_acts_new_f32(be, p, B, Tn, 0, &a) != SEMOE_OK) {
        CHECK(0, "%s: acts: %s", be->name, semoe_err_msg());
        return false;
    }
    float *bias_d = NULL;
    if (bias) {
        bias_d = be->alloc(E * sizeof(float));
        be->to_device(bias_d, bias, E * sizeof(float));
        a->router_bias = bias_d;
    }
    float *w = model_slab_new_f32(be, p), *g = model_slab_new_f32(be, p);
    model_slab_load_f32(be, p, w);
    model_zero_grad_f32(be, p, g);
    bool ok = model_forward_f32(be, p, w, a, tok, NULL, &o->loss) == SEMOE_OK &&
              model_backward_f32(be, p, w, g, a, NULL) == SEMOE_OK;
    CHECK(ok, "%s: forward/backward: %s", be->name, semoe_err_msg());
    if (ok) {
        o->logits = malloc(N * c->vocab_size * sizeof(float));
        o->grads = malloc(nf * sizeof(float));
        o->rprobs = malloc(L * N * E * sizeof(float));
        o->ridx = malloc(L * N * K * sizeof(int32_t));
        be->to_host(o->logits, a->a.logits, N * c->vocab_size * sizeof(float));
        be->to_host(o->grads, g, nf * sizeof(float));
        be->to_host(o->rprobs, a->a.rprobs, L * N * E * sizeof(float));
        be->to_host(o->ridx, a->ridx, L * N * K * sizeof(int32_t));
    }
    model_slab_destroy_f32(be, &w);
    model_slab_destroy_f32(be, &g);
    be->free(bias_d);
    model_acts_destroy_f32(&a);
    return ok;
}

static void s_free_graph(s_graph_out_t *o)
{
    free(o->logits);
    free(o->grads);
    free(o->rprobs);
    free(o->ridx);
    memset(o, 0, sizeof *o);
}

/* Smallest gap between the K-th and (K+1)-th router probability of any row (CPU's): below
 * fp32 noise the two backends may route a token differently, and then nothing compares. */
static double s_margin(const float *rprobs, size_t rows, int E, int K)
{
    if (K >= E)
        return INFINITY;
    double m = INFINITY;
    for (size_t r = 0; r < rows; r++) {
        float p[256];
        memcpy(p, rprobs + r * E, (size_t)E * sizeof(float));
        for (int i = 0; i < E; i++) /* selection sort, descending: E is tiny */
            for (int j = i + 1; j < E; j++)
                if (p[j] > p[i]) {
                    float t = p[i];
                    p[i] = p[j];
                    p[j] = t;
                }
        m = fmin(m, (double)p[K - 1] - p[K]);
    }
    return m;
}

static void s_check_graph(int which)
{
    model_config_t cfg;
    test_gpu_config(&cfg, which);
    int B = which == 0 ? 3 : 2, Tn = which == 0 ? 19 : 37;
    int V = (int)cfg.vocab_size, E = (int)cfg.num_local_experts, K = (int)cfg.num_experts_per_tok;
    size_t N = (size_t)B * Tn, L = cfg.num_hidden_layers;
    int32_t *tok = malloc((size_t)B * (Tn + 1) * sizeof *tok);
    float bias[16];
    for (int e = 0; e < E; e++)
        bias[e] = (float)(0.5 * (2 * test_rand_unit() - 1));

    /* draw until no token is within fp32 noise of a routing flip (almost always the first) */
    model_params_t *p = NULL;
    s_graph_out_t c, g;
    memset(&c, 0, sizeof c);
    memset(&g, 0, sizeof g);
    bool ready = false;
    for (int attempt = 0; attempt < 8 && !ready; attempt++) {
        model_params_destroy(&p);
        s_free_graph(&c);
        p = test_tiny_params(&cfg, test_rand(), 0.1);
        if (!p) {
            CHECK(0, "config %d: params: %s", which, semoe_err_msg());
            break;
        }
        for (size_t i = 0; i < (size_t)B * (Tn + 1); i++)
            tok[i] = (int32_t)test_rand_below((uint64_t)V);
        if (!s_run_graph(s_cpu, p, B, Tn, tok, which == 1 ? bias : NULL, &c))
            break;
        double margin = s_margin(c.rprobs, L * N, E, K);
        ready = margin > 2e-5; /* fp32 noise in a probability: ~1e-7 */
        if (!ready)
            printf("config %d: routing margin %.3g: near a tie, drawing again\n", which, margin);
    }
    if (!ready) {
        CHECK(0, "config %d: no draw without a near routing tie", which);
        goto done;
    }
    if (!s_run_graph(s_gpu, p, B, Tn, tok, which == 1 ? bias : NULL, &g))
        goto done;

    double lrel = fabs(g.loss.loss - c.loss.loss) / fabs(c.loss.loss);
    double cerel = fabs(g.loss.ce - c.loss.ce) / fabs(c.loss.ce);
    double auxrel = fabs(g.loss.aux - c.loss.aux) / fmax(fabs(c.loss.aux), 1e-30);
    CHECK(lrel < S_TOL && cerel < S_TOL && auxrel < S_TOL,
          "config %d: loss %.9g (GPU) vs %.9g (CPU) rel %.3g; ce rel %.3g, aux rel %.3g", which,
          g.loss.loss, c.loss.loss, lrel, cerel, auxrel);
    double logrel = test_rel_err(g.logits, c.logits, N * V, 1e-30);
    CHECK(logrel < S_TOL, "config %d: logits rel %.3g", which, logrel);
    double prel = test_rel_err(g.rprobs, c.rprobs, L * N * E, 1e-30);
    CHECK(prel < S_TOL, "config %d: router probs rel %.3g", which, prel);
    size_t wrong = 0;
    for (size_t i = 0; i < L * N * K; i++)
        wrong += g.ridx[i] != c.ridx[i];
    CHECK(wrong == 0, "config %d: %zu of %zu top-k ids differ", which, wrong, L * N * K);

    double worst = 0;
    const char *worst_name = "";
    int ntensors = 0, zero = 0;
    for (size_t ti = 0; ti < model_params_count(p); ti++) {
        const model_param_t *t = model_params_at(p, ti);
        if (!t->data)
            continue;
        ntensors++;
        double gn = 0;
        for (uint64_t e = 0; e < t->numel; e++)
            gn += (double)c.grads[t->offset + e] * c.grads[t->offset + e];
        zero += gn == 0;
        double rel = test_rel_err(g.grads + t->offset, c.grads + t->offset, t->numel, S_GRAD_FLOOR);
        if (rel > worst) {
            worst = rel;
            worst_name = t->name;
        }
        CHECK(rel < S_TOL, "config %d: %s: gradient GPU vs CPU rel %.3g (|g| %.3g)", which,
              t->name, rel, sqrt(gn));
    }
    printf("config %d (B=%d T=%d): loss %.9f (CPU) %.9f (GPU) rel %.2e; ce rel %.2e, aux rel "
           "%.2e; logits rel %.2e; router probs rel %.2e, ids equal: %s\n",
           which, B, Tn, c.loss.loss, g.loss.loss, lrel, cerel, auxrel, logrel, prel,
           wrong ? "no" : "yes");
    printf("config %d: %d gradient tensors (%d zero on the CPU), worst rel %.2e (%s)\n", which,
           ntensors, zero, worst, worst_name);
done:
    s_free_graph(&c);
    s_free_graph(&g);
    model_params_destroy(&p);
    free(tok);
}

/* ---- (c) the trainer ----------------------------------------------------------------------- */

/* 20 AdamW steps (2 micro-batches per step, warmup and cosine decay, clipping at 1, weight
 * decay) of config 0 on both backends from the same weights on the same batch: every step's
 * loss and gradient norm, then an evaluation and the final weights. */
static void s_check_training(void)
{
    model_job_t job;
    test_tiny_train20(&job, 16, 3e-3);
    test_gpu_config(&job.model, 0);
    const int steps = 20;
    int V = (int)job.model.vocab_size, rows = (int)job.train.global_batch;
    size_t row_len = job.train.seq_len + 1;

    model_params_t *p = test_tiny_params(&job.model, test_rand(), 0.1);
    model_train_t *tc = NULL, *tg = NULL;
    uint8_t *tok = malloc((size_t)rows * row_len);
    if (!p || model_train_new(s_cpu, p, &job, &tc) != SEMOE_OK ||
        model_train_new(s_gpu, p, &job, &tg) != SEMOE_OK) {
        CHECK(0, "trainers: %s", semoe_err_msg());
        goto done;
    }
    /* one batch throughout, so that the loss visibly falls */
    for (size_t i = 0; i < (size_t)rows * row_len; i++)
        tok[i] = (uint8_t)test_rand_below((uint64_t)V);
    double worst = 0, worst_norm = 0;
    for (int s = 0; s < steps; s++) {
        model_train_report_t rc, rg;
        if (model_train_step(tc, tok, (uint32_t)rows, (uint64_t)s, NULL, &rc) != SEMOE_OK ||
            model_train_step(tg, tok, (uint32_t)rows, (uint64_t)s, NULL, &rg) != SEMOE_OK) {
            CHECK(0, "step %d: %s", s, semoe_err_msg());
            goto done;
        }
        double rel = fabs(rg.loss - rc.loss) / fabs(rc.loss);
        double nrel = fabs(rg.grad_norm - rc.grad_norm) / fabs(rc.grad_norm);
        worst = fmax(worst, rel);
        worst_norm = fmax(worst_norm, nrel);
        printf("step %2d: loss %.9f (CPU) %.9f (GPU) rel %.2e; grad norm %.6f %.6f rel %.2e; "
               "clip %.4f; lr %.2e\n",
               s, rc.loss, rg.loss, rel, rc.grad_norm, rg.grad_norm, nrel, rc.clip_scale, rc.lr);
        CHECK(rel < S_TOL, "step %d: loss %.9g (GPU) vs %.9g (CPU): rel %.3g", s, rg.loss,
              rc.loss, rel);
        CHECK(nrel < S_TOL, "step %d: grad norm %.9g (GPU) vs %.9g (CPU): rel %.3g", s,
              rg.grad_norm, rc.grad_norm, nrel);
        CHECK(rg.adam_step == rc.adam_step && rg.adam_step == s + 1, "step %d: adam step %d/%d",
              s, rg.adam_step, rc.adam_step);
    }
    double ce_c = 0, ce_g = 0;
    CHECK(model_train_eval(tc, tok, (uint32_t)rows, NULL, 0, &ce_c) == SEMOE_OK &&
              model_train_eval(tg, tok, (uint32_t)rows, NULL, 0, &ce_g) == SEMOE_OK,
          "eval: %s", semoe_err_msg());
    double erel = fabs(ce_g - ce_c) / fabs(ce_c);
    CHECK(erel < S_TOL, "eval after %d steps: ce %.9g (GPU) vs %.9g (CPU): rel %.3g", steps, ce_g,
          ce_c, erel);
    size_t n = model_train_slab_floats(tc);
    float *wg = test_gpu_downf(model_train_weights(tg), n);
    double wrel = test_rel_err(wg, model_train_weights(tc), n, 1e-30);
    /* AdamW divides by sqrt(v): a gradient element near zero may take a visibly different
     * step on each side, so the weights get a looser bound than the losses */
    CHECK(wrel < 1e-4, "weights after %d steps: GPU vs CPU rel %.3g", steps, wrel);
    printf("training: %d steps, worst loss rel %.2e, worst grad norm rel %.2e, weights rel "
           "%.2e; eval ce %.9f (CPU) %.9f (GPU) rel %.2e\n", steps, worst, worst_norm, wrel,
           ce_c, ce_g, erel);
    free(wg);
done:
    model_train_destroy(&tg);
    model_train_destroy(&tc);
    model_params_destroy(&p);
    free(tok);
}

int main(void)
{
    test_init("gpu_model");
    if (gpu_device_count() == 0) {
        printf("no CUDA device (%s): skipped\n", semoe_err_msg());
        return 77;
    }
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init: %s", semoe_err_msg());
    char name[128] = "";
    gpu_device_info(0, name, sizeof name, NULL, NULL);
    printf("device cuda:0: %s\n", name);

    s_check_table();
    s_check_memory();

    static const int lin[][3] = {
        {1, 1, 1}, {7, 13, 5}, {64, 96, 48}, {33, 130, 257}, {300, 40, 67}, {5, 1000, 3},
    };
    for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++)
        s_check_linear(lin[i][0], lin[i][1], lin[i][2]);

    static const int att[][5] = { /* B, T, H, KVH, hd */
        {1, 1, 1, 1, 4},  {2, 5, 4, 2, 3},   {3, 17, 6, 2, 8},  {2, 40, 8, 8, 16},
        {1, 70, 4, 1, 12}, {2, 33, 12, 4, 64}, {1, 129, 3, 3, 10}, {4, 64, 8, 2, 128},
    };
    for (size_t i = 0; i < sizeof att / sizeof att[0]; i++)
        s_check_attention(att[i][0], att[i][1], att[i][2], att[i][3], att[i][4]);

    static const int rt[][3] = { /* N, E, K */
        {1, 1, 1}, {5, 4, 2}, {37, 8, 2}, {100, 3, 1}, {64, 16, 4}, {29, 60, 6}, {513, 8, 8},
    };
    for (size_t i = 0; i < sizeof rt / sizeof rt[0]; i++)
        s_check_router(rt[i][0], rt[i][1], rt[i][2]);

    s_check_graph(0);
    s_check_graph(1);
    s_check_training();
    return test_finish();
}
