/* The CUDA backend's elementwise, per-row, MoE-row and optimizer ops (gpu/ops.h) against the
 * CPU backend (cpu_backend_f32) on the same fresh random inputs (seed printed; replay with
 * SEMOE_TEST_SEED): odd sizes and realistic ones, backward outputs pre-filled with random
 * values on both sides (backward ops accumulate). fp32 against fp32, so 1e-5 relative,
 * norm-wise. Skipped (77) without a CUDA device. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/ops.h"
#include "model/backend.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"

#define S_TOL 1e-5
/* Both sides sum squares in double, in different orders: the CPU's sequential sum of 8M
 * positive terms drifts by up to n * 1.1e-16 ~ 1e-9 relative (8e-13 seen on an H200), still
 * far below anything fp32 could show. */
#define S_SUMSQ_TOL 1e-10

static const model_backend_f32_t *const s_cpu = &cpu_backend_f32;

/* ---- helpers ------------------------------------------------------------------------- */

static double s_rel1(double got, double want)
{
    return want != 0 ? fabs(got - want) / fabs(want) : fabs(got);
}

static void s_expect(const char *op, const char *what, const char *size, double err, double tol)
{
    printf("  %-18s %-8s %-26s %.2e (tol %.0e)\n", op, what, size, err, tol);
    CHECK(err < tol, "%s %s [%s]: relative error %.3e >= %.1e", op, what, size, err, tol);
}

/* Downloads device got (n floats) and compares it with host want. */
static void s_cmp(const char *op, const char *what, const char *size, const float *got,
                  const float *want, size_t n)
{
    float *h = test_gpu_downf(got, n);
    s_expect(op, what, size, test_rel_err(h, want, n, 0), S_TOL);
    free(h);
}

/* ---- vector helpers ------------------------------------------------------------------ */

static void test_vector(void)
{
    static const size_t sizes[] = {1, 1000, 4097, (size_t)4096 * 2048 + 3};
    for (size_t c = 0; c < sizeof sizes / sizeof *sizes; c++) {
        size_t n = sizes[c];
        char sz[64];
        snprintf(sz, sizeof sz, "n=%zu", n);
        float *x = test_rand_floats(n, 1), *y = test_rand_floats(n, 1), *b = test_rand_floats(n, 1);
        float a = (float)(2 * test_rand_unit() - 1);
        float *dx = test_gpu_upf(x, n), *dy = test_gpu_upf(y, n), *db = test_gpu_upf(b, n);

        /* axpy: y += a x */
        float *yc = test_dup_floats(y, n);
        s_cpu->axpy(yc, a, x, n);
        gpu_axpy(dy, a, dx, n);
        s_cmp("axpy", "y", sz, dy, yc, n);

        /* add: out = x + b, into a fresh buffer and in place (out aliasing a) */
        float *outc = test_rand_floats(n, 1);
        s_cpu->add(outc, x, b, n);
        float *dout = gpu_alloc(n * sizeof(float));
        gpu_add(dout, dx, db, n);
        s_cmp("add", "out", sz, dout, outc, n);
        gpu_add(dx, dx, db, n);
        s_cmp("add (out = a)", "out", sz, dx, outc, n);

        free(x), free(y), free(b), free(yc), free(outc);
        gpu_free(dx), gpu_free(dy), gpu_free(db), gpu_free(dout);
    }

    static const int nc[][2] = {{1, 1}, {37, 65}, {4096, 8}, {4096, 2048}};
    for (size_t c = 0; c < sizeof nc / sizeof *nc; c++) {
        int N = nc[c][0], C = nc[c][1];
        size_t n = (size_t)N * C;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d C=%d", N, C);
        float *out = test_rand_floats(n, 1), *bias = test_rand_floats((size_t)C, 1);
        float *dout = test_gpu_upf(out, n), *dbias = test_gpu_upf(bias, (size_t)C);
        s_cpu->add_bias(out, bias, N, C);
        gpu_add_bias(dout, dbias, N, C);
        s_cmp("add_bias", "out", sz, dout, out, n);
        free(out), free(bias);
        gpu_free(dout), gpu_free(dbias);
    }
}

/* ---- embedding ----------------------------------------------------------------------- */

static void test_embedding(void)
{
    /* V, N, D; few tokens and many rows make repeats (rows meeting in dwte). */
    static const int cases[][3] = {{7, 1, 1}, {50, 333, 17}, {1000, 257, 130},
                                   {32000, 4096, 1024}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int V = cases[c][0], N = cases[c][1], D = cases[c][2];
        size_t nw = (size_t)V * D, no = (size_t)N * D;
        char sz[64];
        snprintf(sz, sizeof sz, "V=%d N=%d D=%d", V, N, D);
        int32_t *tok = test_rand_ints((size_t)N, V);
        float *wte = test_rand_floats(nw, 1), *dout = test_rand_floats(no, 1);
        float *dwte = test_rand_floats(nw, 1);
        int32_t *d_tok = test_gpu_upi(tok, (size_t)N);
        float *d_wte = test_gpu_upf(wte, nw), *d_dout = test_gpu_upf(dout, no);
        float *d_dwte = test_gpu_upf(dwte, nw);
        float *out = test_rand_floats(no, 1), *d_out = gpu_alloc(no * sizeof(float));

        s_cpu->embedding_fwd(out, tok, wte, N, D);
        gpu_embedding_fwd(d_out, d_tok, d_wte, N, D);
        s_cmp("embedding_fwd", "out", sz, d_out, out, no);

        s_cpu->embedding_bwd(dwte, dout, tok, N, D);
        gpu_embedding_bwd(d_dwte, d_dout, d_tok, N, D);
        s_cmp("embedding_bwd", "dwte", sz, d_dwte, dwte, nw);

        free(tok), free(wte), free(dout), free(dwte), free(out);
        gpu_free(d_tok), gpu_free(d_wte), gpu_free(d_dout), gpu_free(d_dwte), gpu_free(d_out);
    }
}

/* ---- rmsnorm ------------------------------------------------------------------------- */

static void test_rmsnorm(void)
{
    static const int cases[][2] = {{1, 1}, {3, 31}, {37, 257}, {100, 1000}, {4096, 2048}};
    const float eps = 1e-5f;
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c][0], D = cases[c][1];
        size_t n = (size_t)N * D;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d D=%d", N, D);
        float *x = test_rand_floats(n, 1), *w = test_rand_uniform((size_t)D, -1.5, 1.5);
        float *out = test_rand_floats(n, 1), *rstd = test_rand_floats((size_t)N, 1);
        float *d_x = test_gpu_upf(x, n), *d_w = test_gpu_upf(w, (size_t)D);
        float *d_out = gpu_alloc(n * sizeof(float)), *d_rstd = gpu_alloc((size_t)N * sizeof(float));

        s_cpu->rmsnorm_fwd(out, rstd, x, w, N, D, eps);
        gpu_rmsnorm_fwd(d_out, d_rstd, d_x, d_w, N, D, eps);
        s_cmp("rmsnorm_fwd", "out", sz, d_out, out, n);
        s_cmp("rmsnorm_fwd", "rstd", sz, d_rstd, rstd, (size_t)N);

        /* in place: out aliasing x */
        float *d_xx = test_gpu_upf(x, n);
        gpu_rmsnorm_fwd(d_xx, d_rstd, d_xx, d_w, N, D, eps);
        s_cmp("rmsnorm_fwd (out=x)", "out", sz, d_xx, out, n);
        s_cmp("rmsnorm_fwd (out=x)", "rstd", sz, d_rstd, rstd, (size_t)N);

        /* backward from the CPU's rstd on both sides; dx and dw start random */
        float *dout = test_rand_floats(n, 1), *dx = test_rand_floats(n, 1);
        float *dw = test_rand_floats((size_t)D, 1);
        float *d_dout = test_gpu_upf(dout, n), *d_dx = test_gpu_upf(dx, n);
        float *d_dw = test_gpu_upf(dw, (size_t)D);
        gpu_to_device(d_rstd, rstd, (size_t)N * sizeof(float));
        s_cpu->rmsnorm_bwd(dx, dw, dout, x, w, rstd, N, D);
        gpu_rmsnorm_bwd(d_dx, d_dw, d_dout, d_x, d_w, d_rstd, N, D);
        s_cmp("rmsnorm_bwd", "dx", sz, d_dx, dx, n);
        s_cmp("rmsnorm_bwd", "dw", sz, d_dw, dw, (size_t)D);

        free(x), free(w), free(out), free(rstd), free(dout), free(dx), free(dw);
        gpu_free(d_x), gpu_free(d_w), gpu_free(d_out), gpu_free(d_rstd), gpu_free(d_xx);
        gpu_free(d_dout), gpu_free(d_dx), gpu_free(d_dw);
    }
}

/* ---- rope ---------------------------------------------------------------------------- */

static void test_rope(void)
{
    struct {
        int N, H, hd, maxpos;
        double theta;
    } cases[] = {
        {1, 1, 2, 10, 10000.0},       {7, 3, 6, 100, 10000.0},
        {33, 5, 64, 4096, 1e6},       {4096, 32, 128, 4096, 10000.0},
        {4096, 8, 128, 32768, 1e6},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c].N, H = cases[c].H, hd = cases[c].hd;
        double theta = cases[c].theta;
        size_t n = (size_t)N * H * hd;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d H=%d hd=%d th=%g", N, H, hd, theta);
        int32_t *pos = test_rand_ints((size_t)N, cases[c].maxpos);
        float *x = test_rand_floats(n, 1), *out = test_rand_floats(n, 1);
        int32_t *d_pos = test_gpu_upi(pos, (size_t)N);
        float *d_x = test_gpu_upf(x, n), *d_out = gpu_alloc(n * sizeof(float));

        s_cpu->rope_fwd(out, x, pos, N, H, hd, theta);
        gpu_rope_fwd(d_out, d_x, d_pos, N, H, hd, theta);
        s_cmp("rope_fwd", "out", sz, d_out, out, n);
        gpu_rope_fwd(d_x, d_x, d_pos, N, H, hd, theta); /* in place */
        s_cmp("rope_fwd (out=x)", "out", sz, d_x, out, n);

        float *dout = test_rand_floats(n, 1), *dx = test_rand_floats(n, 1);
        float *d_dout = test_gpu_upf(dout, n), *d_dx = test_gpu_upf(dx, n);
        s_cpu->rope_bwd(dx, dout, pos, N, H, hd, theta);
        gpu_rope_bwd(d_dx, d_dout, d_pos, N, H, hd, theta);
        s_cmp("rope_bwd", "dx", sz, d_dx, dx, n);

        free(pos), free(x), free(out), free(dout), free(dx);
        gpu_free(d_pos), gpu_free(d_x), gpu_free(d_out), gpu_free(d_dout), gpu_free(d_dx);
    }
}

/* ---- SwiGLU -------------------------------------------------------------------------- */

static void test_swiglu(void)
{
    static const size_t sizes[] = {1, 999, (size_t)4096 * 2048 + 1};
    for (size_t c = 0; c < sizeof sizes / sizeof *sizes; c++) {
        size_t n = sizes[c];
        char sz[64];
        snprintf(sz, sizeof sz, "n=%zu", n);
        float *a = test_rand_floats(n, 6), *b = test_rand_floats(n, 2);
        float *h = test_rand_floats(n, 1), *dh = test_rand_floats(n, 1);
        float *da = test_rand_floats(n, 1), *db = test_rand_floats(n, 1);
        float *d_a = test_gpu_upf(a, n), *d_b = test_gpu_upf(b, n);
        float *d_h = gpu_alloc(n * sizeof(float));
        float *d_dh = test_gpu_upf(dh, n), *d_da = test_gpu_upf(da, n), *d_db = test_gpu_upf(db, n);

        s_cpu->swiglu_fwd(h, a, b, n);
        gpu_swiglu_fwd(d_h, d_a, d_b, n);
        s_cmp("swiglu_fwd", "h", sz, d_h, h, n);

        s_cpu->swiglu_bwd(da, db, dh, a, b, n);
        gpu_swiglu_bwd(d_da, d_db, d_dh, d_a, d_b, n);
        s_cmp("swiglu_bwd", "da", sz, d_da, da, n);
        s_cmp("swiglu_bwd", "db", sz, d_db, db, n);

        free(a), free(b), free(h), free(dh), free(da), free(db);
        gpu_free(d_a), gpu_free(d_b), gpu_free(d_h), gpu_free(d_dh), gpu_free(d_da);
        gpu_free(d_db);
    }
}

/* ---- cross-entropy ------------------------------------------------------------------- */

static void test_crossentropy(void)
{
    static const int cases[][2] = {{1, 1}, {3, 7}, {33, 1000}, {5, 32001}, {2048, 32000}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c][0], V = cases[c][1];
        size_t n = (size_t)N * V;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d V=%d", N, V);
        float *logits = test_rand_floats(n, 4), *losses = test_rand_floats((size_t)N, 1);
        int32_t *tgt = test_rand_ints((size_t)N, V);
        float *d_logits = test_gpu_upf(logits, n), *d_losses = gpu_alloc((size_t)N * sizeof(float));
        int32_t *d_tgt = test_gpu_upi(tgt, (size_t)N);

        float mean_c = s_cpu->crossentropy_fwd(losses, logits, tgt, N, V);
        float mean_g = gpu_crossentropy_fwd(d_losses, d_logits, d_tgt, N, V);
        s_cmp("crossentropy_fwd", "losses", sz, d_losses, losses, (size_t)N);
        s_expect("crossentropy_fwd", "mean", sz, s_rel1(mean_g, mean_c), S_TOL);
        float mean_null = gpu_crossentropy_fwd(NULL, d_logits, d_tgt, N, V);
        s_expect("crossentropy_fwd", "mean", "(losses NULL)", s_rel1(mean_null, mean_c), S_TOL);

        /* dlogits starts random at about the scale of what backward adds to it */
        float dloss = (float)(0.5 + test_rand_unit());
        float *dl = test_rand_floats(n, dloss / N / sqrt((double)V));
        float *d_dl = test_gpu_upf(dl, n);
        s_cpu->crossentropy_bwd(dl, logits, tgt, dloss, N, V);
        gpu_crossentropy_bwd(d_dl, d_logits, d_tgt, dloss, N, V);
        s_cmp("crossentropy_bwd", "dlogits", sz, d_dl, dl, n);

        free(logits), free(losses), free(tgt), free(dl);
        gpu_free(d_logits), gpu_free(d_losses), gpu_free(d_tgt), gpu_free(d_dl);
    }
}

/* ---- load-balancing aux loss --------------------------------------------------------- */

/* idx (M, K): K distinct experts per row, in random order. */
static int32_t *s_topk_idx(int M, int E, int K)
{
    int32_t *idx = semoe_xmalloc((size_t)M * K * sizeof *idx);
    int32_t *perm = semoe_xmalloc((size_t)E * sizeof *perm);
    for (int m = 0; m < M; m++) {
        for (int e = 0; e < E; e++)
            perm[e] = e;
        for (int j = 0; j < K; j++) {
            int r = j + (int)test_rand_below((uint64_t)(E - j));
            int32_t t = perm[j];
            perm[j] = perm[r];
            perm[r] = t;
            idx[(size_t)m * K + j] = perm[j];
        }
    }
    free(perm);
    return idx;
}

static void test_auxloss(void)
{
    static const int cases[][3] = {{1, 1, 1}, {37, 8, 2}, {1000, 64, 6}, {32 * 4096, 8, 2}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int M = cases[c][0], E = cases[c][1], K = cases[c][2];
        size_t n = (size_t)M * E;
        char sz[64];
        snprintf(sz, sizeof sz, "M=%d E=%d K=%d", M, E, K);
        float *probs = test_rand_uniform(n, 0, 1);
        int32_t *idx = s_topk_idx(M, E, K);
        float *d_probs = test_gpu_upf(probs, n);
        int32_t *d_idx = test_gpu_upi(idx, (size_t)M * K);

        float lc = s_cpu->auxloss_fwd(probs, idx, M, E, K);
        float lg = gpu_auxloss_fwd(d_probs, d_idx, M, E, K);
        s_expect("auxloss_fwd", "loss", sz, s_rel1(lg, lc), S_TOL);

        float dloss = (float)(0.01 + 0.1 * test_rand_unit());
        float *dp = test_rand_floats(n, dloss * K / M);
        float *d_dp = test_gpu_upf(dp, n);
        s_cpu->auxloss_bwd(dp, idx, dloss, M, E, K);
        gpu_auxloss_bwd(d_dp, d_idx, dloss, M, E, K);
        s_cmp("auxloss_bwd", "dprobs", sz, d_dp, dp, n);

        free(probs), free(idx), free(dp);
        gpu_free(d_probs), gpu_free(d_idx), gpu_free(d_dp);
    }
}

/* ---- MoE rows ------------------------------------------------------------------------ */

static void test_rows(void)
{
    /* N tokens, top-K, D; the rows are the N*K assignments shuffled (as the experts' batches
     * are), or a third of them (one expert's share). */
    static const int cases[][4] = {{1, 1, 1, 0}, {5, 2, 3, 0}, {37, 2, 65, 1},
                                   {4096, 2, 2048, 0}, {4096, 8, 512, 1}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c][0], K = cases[c][1], D = cases[c][2];
        int n = cases[c][3] ? N * K / 3 : N * K;
        size_t nx = (size_t)N * D, ny = (size_t)n * D, nw = (size_t)N * K;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d K=%d D=%d n=%d", N, K, D, n);

        int32_t *slots_all = semoe_xmalloc(nw * sizeof *slots_all);
        for (size_t i = 0; i < nw; i++)
            slots_all[i] = (int32_t)i;
        for (size_t i = nw - 1; i > 0; i--) {
            size_t r = (size_t)test_rand_below(i + 1);
            int32_t t = slots_all[i];
            slots_all[i] = slots_all[r];
            slots_all[r] = t;
        }
        int32_t *slots = semoe_xmalloc(((size_t)n + 1) * sizeof *slots);
        int32_t *rows = semoe_xmalloc(((size_t)n + 1) * sizeof *rows);
        for (int i = 0; i < n; i++) {
            slots[i] = slots_all[i];
            rows[i] = slots_all[i] / K;
        }
        free(slots_all);
        int32_t *d_rows = test_gpu_upi(rows, (size_t)n), *d_slots = test_gpu_upi(slots, (size_t)n);
        float *w = test_rand_uniform(nw, 0, 1), *d_w = test_gpu_upf(w, nw);
        float *x = test_rand_floats(nx, 1), *d_x = test_gpu_upf(x, nx);

        /* gather */
        float *out = test_rand_floats(ny, 1), *d_out = gpu_alloc(ny * sizeof(float));
        s_cpu->gather_rows(out, x, rows, n, D);
        gpu_gather_rows(d_out, d_x, d_rows, n, D);
        s_cmp("gather_rows", "out", sz, d_out, out, ny);

        /* gather backward: rows repeat (a token's K assignments) */
        float *dout = test_rand_floats(ny, 1), *dx = test_rand_floats(nx, 1);
        float *d_dout = test_gpu_upf(dout, ny), *d_dx = test_gpu_upf(dx, nx);
        s_cpu->gather_rows_bwd(dx, dout, rows, n, D);
        gpu_gather_rows_bwd(d_dx, d_dout, d_rows, n, D);
        s_cmp("gather_rows_bwd", "dx", sz, d_dx, dx, nx);

        /* scatter: the weighted combine into out (N, D), which starts random */
        float *y = test_rand_floats(ny, 1), *comb = test_rand_floats(nx, 1);
        float *d_y = test_gpu_upf(y, ny), *d_comb = test_gpu_upf(comb, nx);
        s_cpu->scatter_rows(comb, y, rows, w, slots, n, D);
        gpu_scatter_rows(d_comb, d_y, d_rows, d_w, d_slots, n, D);
        s_cmp("scatter_rows", "out", sz, d_comb, comb, nx);

        /* scatter backward: both gradients, then each alone (the other NULL) */
        float *g = test_rand_floats(nx, 1), *d_g = test_gpu_upf(g, nx);
        for (int mode = 0; mode < 3; mode++) {
            bool want_dy = mode != 2, want_dw = mode != 1;
            const char *name = mode == 0 ? "scatter_rows_bwd"
                               : mode == 1 ? "scatter_bwd (dw NULL)"
                                           : "scatter_bwd (dy NULL)";
            float *dy = test_rand_floats(ny, 1), *dw = test_rand_floats(nw, 1);
            float *d_dy = test_gpu_upf(dy, ny), *d_dw = test_gpu_upf(dw, nw);
            float *dw0 = test_dup_floats(dw, nw), *dy0 = test_dup_floats(dy, ny);
            s_cpu->scatter_rows_bwd(want_dy ? dy : NULL, want_dw ? dw : NULL, g, y, rows, w,
                                    slots, n, D);
            gpu_scatter_rows_bwd(want_dy ? d_dy : NULL, want_dw ? d_dw : NULL, d_g, d_y, d_rows,
                                 d_w, d_slots, n, D);
            /* the skipped one must be untouched: compare with its start */
            s_cmp(name, "dy", sz, d_dy, want_dy ? dy : dy0, ny);
            s_cmp(name, "dw", sz, d_dw, want_dw ? dw : dw0, nw);
            free(dy), free(dw), free(dw0), free(dy0);
            gpu_free(d_dy), gpu_free(d_dw);
        }

        free(rows), free(slots), free(w), free(x), free(out), free(dout), free(dx), free(y);
        free(comb), free(g);
        gpu_free(d_rows), gpu_free(d_slots), gpu_free(d_w), gpu_free(d_x), gpu_free(d_out);
        gpu_free(d_dout), gpu_free(d_dx), gpu_free(d_y), gpu_free(d_comb), gpu_free(d_g);
    }
}

/* ---- optimizer ----------------------------------------------------------------------- */

static void test_adamw(void)
{
    /* a large lr makes the step a sizable part of p, so that p checks the step itself */
    struct {
        size_t n;
        int t;
        double lr;
    } cases[] = {
        {1, 1, 3e-4}, {1001, 7, 0.5}, {(size_t)4096 * 2048 + 5, 1000, 3e-4},
        {(size_t)4096 * 2048 + 5, 3, 0.5},
    };
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        size_t n = cases[c].n;
        int t = cases[c].t;
        double lr = cases[c].lr, wd = 0.1, gscale = 0.37;
        char sz[64];
        snprintf(sz, sizeof sz, "n=%zu t=%d lr=%g", n, t, lr);
        float *p = test_rand_floats(n, 1), *g = test_rand_floats(n, 3);
        float *m = test_rand_floats(n, 0.1), *v = test_rand_uniform(n, 0, 0.01);
        float *d_p = test_gpu_upf(p, n), *d_g = test_gpu_upf(g, n);
        float *d_m = test_gpu_upf(m, n), *d_v = test_gpu_upf(v, n);
        s_cpu->adamw(p, g, m, v, n, lr, 0.9, 0.95, 1e-8, wd, t, gscale);
        gpu_adamw(d_p, d_g, d_m, d_v, n, lr, 0.9, 0.95, 1e-8, wd, t, gscale);
        s_cmp("adamw", "p", sz, d_p, p, n);
        s_cmp("adamw", "m", sz, d_m, m, n);
        s_cmp("adamw", "v", sz, d_v, v, n);
        free(p), free(g), free(m), free(v);
        gpu_free(d_p), gpu_free(d_g), gpu_free(d_m), gpu_free(d_v);
    }

    static const size_t sizes[] = {0, 1, 1001, (size_t)4096 * 2048 + 7};
    for (size_t c = 0; c < sizeof sizes / sizeof *sizes; c++) {
        size_t n = sizes[c];
        char sz[64];
        snprintf(sz, sizeof sz, "n=%zu", n);
        float *g = test_rand_floats(n, 2), *d_g = test_gpu_upf(g, n);
        double sc = s_cpu->sumsq(g, n), sg = gpu_sumsq(d_g, n);
        s_expect("sumsq", "sum", sz, s_rel1(sg, sc), S_SUMSQ_TOL);
        if (n == 0)
            CHECK(sg == 0.0, "sumsq of nothing: %g, want 0", sg);
        free(g);
        gpu_free(d_g);
    }
}

int main(void)
{
    if (gpu_device_count() == 0) {
        printf("gpu_ops: skipped: no CUDA device (%s)\n", semoe_err_msg());
        return 77;
    }
    test_init("gpu_ops");
    semoe_rc rc = gpu_backend_init(0);
    REQUIRE(rc == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    char name[256] = "";
    (void)gpu_device_info(0, name, sizeof name, NULL, NULL);
    printf("gpu_ops: cuda:0 %s, fp32 against cpu_backend_f32, tolerance %.0e\n", name, S_TOL);

    test_vector();
    test_embedding();
    test_rmsnorm();
    test_rope();
    test_swiglu();
    test_crossentropy();
    test_auxloss();
    test_rows();
    test_adamw();
    return test_finish();
}
