/* The CPU ops (cpu/ops.h), the reference every other backend is checked against. For every
 * op, in double: the backward against central finite differences of a random scalar
 * objective L = sum(out * R), for every input and parameter gradient, with the gradient
 * buffers starting at random values (backward must accumulate); then the float version
 * against the double one on the same inputs; then exact properties (softmax rows sum to 1,
 * rope preserves norms, causality, the aux loss of uniform routing). Inputs are fresh random
 * numbers each run (seed printed; SEMOE_TEST_SEED replays). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "cpu/ops.h"
#include "tests/harness.h"

/* Central differences with h = 1e-5 on O(1) inputs: truncation ~h^2 |L'''| ~ 1e-10 and
 * rounding ~1e-16 |L| / h ~ 1e-10, so 1e-6 leaves four orders of margin. */
#define FD_H 1e-5
#define FD_TOL 1e-6
/* float against double on the same (float-rounded) inputs: ~6e-8 per rounding, growing
 * like sqrt(length) over the short reductions used here (<= 64 terms). Over 300 seeds the
 * worst observed was 2.2e-7 (router dlogits, where softmax backward p (g - sum p g)
 * subtracts nearly equal terms), so 1e-5 keeps a 45x margin and still catches any real
 * slip, which shows up at 1e-3 or more. */
#define F32_TOL 1e-5

/* ---- helpers ------------------------------------------------------------------------ */

/* Uniform in [-scale, scale), never exactly zero. */
static double *rnd(size_t n, double scale)
{
    double *x = semoe_xmalloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) {
        do
            x[i] = (2 * test_rand_unit() - 1) * scale;
        while (x[i] == 0);
    }
    return x;
}

static double *copy_d(const double *x, size_t n)
{
    double *y = semoe_xmalloc(n * sizeof(double));
    memcpy(y, x, n * sizeof(double));
    return y;
}

static float *to_f32(const double *x, size_t n)
{
    float *y = semoe_xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++)
        y[i] = (float)x[i];
    return y;
}

static float *zeros_f32(size_t n) { return semoe_xcalloc(n, sizeof(float)); }

static int32_t *rnd_int(size_t n, int below)
{
    int32_t *x = semoe_xmalloc(n * sizeof(int32_t));
    for (size_t i = 0; i < n; i++)
        x[i] = (int32_t)test_rand_below((uint64_t)below);
    return x;
}

static double dot_d(const double *a, const double *b, size_t n)
{
    double s = 0;
    for (size_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* ||a - b|| / ||b|| */
static double relerr(const double *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1e-300));
}

static double relerr_f(const float *a, const double *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1e-300));
}

static void expect(const char *op, const char *what, double err, double tol)
{
    printf("  %-10s %-24s %.2e (tol %.0e)\n", op, what, err, tol);
    CHECK(err < tol, "%s %s: relative error %.3e >= %.1e", op, what, err, tol);
}

/* The increment a backward call added: grad - start. */
static double *increment(const double *grad, const double *start, size_t n)
{
    double *d = semoe_xmalloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++)
        d[i] = grad[i] - start[i];
    return d;
}

/* Compares the increment of an accumulated gradient with central differences of obj over x. */
typedef double (*objective_fn)(void *ctx);
static void check_fd(const char *op, const char *what, objective_fn obj, void *ctx, double *x,
                     size_t n, const double *grad, const double *start)
{
    double *fd = semoe_xmalloc(n * sizeof(double));
    for (size_t i = 0; i < n; i++) {
        double x0 = x[i];
        x[i] = x0 + FD_H;
        double lp = obj(ctx);
        x[i] = x0 - FD_H;
        double lm = obj(ctx);
        x[i] = x0;
        fd[i] = (lp - lm) / (2 * FD_H);
    }
    double *inc = increment(grad, start, n);
    char label[64];
    snprintf(label, sizeof label, "%s vs fd", what);
    double err = relerr(inc, fd, n);
    expect(op, label, err, FD_TOL);
    if (err >= FD_TOL) { /* show the worst element to start the hunt */
        size_t worst = 0;
        for (size_t i = 1; i < n; i++)
            if (fabs(inc[i] - fd[i]) > fabs(inc[worst] - fd[worst]))
                worst = i;
        fprintf(stderr, "  worst: [%zu] backward %.17g, finite differences %.17g\n", worst,
                inc[worst], fd[worst]);
    }
    free(inc);
    free(fd);
}

static void check_f32(const char *op, const char *what, const float *a, const double *b,
                      size_t n, double tol)
{
    char label[64];
    snprintf(label, sizeof label, "%s f32", what);
    expect(op, label, relerr_f(a, b, n), tol);
}

/* ---- embedding ---------------------------------------------------------------------- */

struct emb_ctx { int N, D, V; int32_t *tok; double *wte, *out, *R; };
static double emb_obj(void *p)
{
    struct emb_ctx *c = p;
    cpu_embedding_fwd_f64(c->out, c->tok, c->wte, c->N, c->D);
    return dot_d(c->out, c->R, (size_t)c->N * c->D);
}

static void test_embedding(void)
{
    struct emb_ctx c = {.N = 13, .D = 8, .V = 11};
    size_t nw = (size_t)c.V * c.D, no = (size_t)c.N * c.D;
    c.tok = rnd_int(c.N, c.V);
    c.tok[1] = c.tok[0]; /* a repeated token must accumulate twice */
    c.wte = rnd(nw, 1);
    c.out = rnd(no, 1);
    c.R = rnd(no, 1);
    double *g0 = rnd(nw, 1), *dwte = copy_d(g0, nw);
    emb_obj(&c);
    int rows_ok = 1;
    for (int n = 0; n < c.N; n++)
        rows_ok &= memcmp(c.out + (size_t)n * c.D, c.wte + (size_t)c.tok[n] * c.D,
                          c.D * sizeof(double)) == 0;
    CHECK(rows_ok, "embedding rows are not copies of wte[tokens]");
    cpu_embedding_bwd_f64(dwte, c.R, c.tok, c.N, c.D);
    check_fd("embedding", "dwte", emb_obj, &c, c.wte, nw, dwte, g0);

    emb_obj(&c); /* the finite differences left out at a perturbed point */
    float *wte32 = to_f32(c.wte, nw), *R32 = to_f32(c.R, no), *out32 = zeros_f32(no),
          *dwte32 = zeros_f32(nw);
    cpu_embedding_fwd_f32(out32, c.tok, wte32, c.N, c.D);
    cpu_embedding_bwd_f32(dwte32, R32, c.tok, c.N, c.D);
    double *inc = increment(dwte, g0, nw);
    check_f32("embedding", "out", out32, c.out, no, F32_TOL);
    check_f32("embedding", "dwte", dwte32, inc, nw, F32_TOL);
    free(inc); free(wte32); free(R32); free(out32); free(dwte32);
    free(g0); free(dwte); free(c.tok); free(c.wte); free(c.out); free(c.R);
}

/* ---- rmsnorm ------------------------------------------------------------------------ */

struct rms_ctx { int N, D; double eps; double *x, *w, *out, *rstd, *R; };
static double rms_obj(void *p)
{
    struct rms_ctx *c = p;
    cpu_rmsnorm_fwd_f64(c->out, c->rstd, c->x, c->w, c->N, c->D, c->eps);
    return dot_d(c->out, c->R, (size_t)c->N * c->D);
}

static void test_rmsnorm(void)
{
    struct rms_ctx c = {.N = 6, .D = 16, .eps = 1e-5};
    size_t nx = (size_t)c.N * c.D;
    c.x = rnd(nx, 2);
    c.w = rnd(c.D, 1.5);
    c.out = rnd(nx, 1);
    c.rstd = rnd(c.N, 1);
    c.R = rnd(nx, 1);
    rms_obj(&c);
    /* Independent forward: x / sqrt(mean(x^2) + eps) * w. */
    double ferr = 0;
    for (int n = 0; n < c.N; n++) {
        double ms = 0;
        for (int i = 0; i < c.D; i++)
            ms += c.x[n * c.D + i] * c.x[n * c.D + i] / c.D;
        for (int i = 0; i < c.D; i++)
            ferr = fmax(ferr, fabs(c.out[n * c.D + i] -
                                   c.x[n * c.D + i] / sqrt(ms + c.eps) * c.w[i]));
    }
    CHECK(ferr < 1e-12, "rmsnorm forward differs from the formula by %.3e", ferr);

    double *gx0 = rnd(nx, 1), *gw0 = rnd(c.D, 1);
    double *dx = copy_d(gx0, nx), *dw = copy_d(gw0, c.D);
    cpu_rmsnorm_bwd_f64(dx, dw, c.R, c.x, c.w, c.rstd, c.N, c.D);
    check_fd("rmsnorm", "dx", rms_obj, &c, c.x, nx, dx, gx0);
    check_fd("rmsnorm", "dw", rms_obj, &c, c.w, c.D, dw, gw0);

    rms_obj(&c); /* the finite differences left out at a perturbed point */
    float *x32 = to_f32(c.x, nx), *w32 = to_f32(c.w, c.D), *R32 = to_f32(c.R, nx);
    float *out32 = zeros_f32(nx), *rstd32 = zeros_f32(c.N), *dx32 = zeros_f32(nx),
          *dw32 = zeros_f32(c.D);
    cpu_rmsnorm_fwd_f32(out32, rstd32, x32, w32, c.N, c.D, (float)c.eps);
    cpu_rmsnorm_bwd_f32(dx32, dw32, R32, x32, w32, rstd32, c.N, c.D);
    double *idx_ = increment(dx, gx0, nx), *idw = increment(dw, gw0, c.D);
    check_f32("rmsnorm", "out", out32, c.out, nx, F32_TOL);
    check_f32("rmsnorm", "dx", dx32, idx_, nx, F32_TOL);
    check_f32("rmsnorm", "dw", dw32, idw, c.D, F32_TOL);
    free(idx_); free(idw); free(x32); free(w32); free(R32); free(out32); free(rstd32);
    free(dx32); free(dw32); free(gx0); free(gw0); free(dx); free(dw);
    free(c.x); free(c.w); free(c.out); free(c.rstd); free(c.R);
}

/* ---- linear ------------------------------------------------------------------------- */

struct lin_ctx { int N, IN, OUT; double *x, *w, *out, *R; };
static double lin_obj(void *p)
{
    struct lin_ctx *c = p;
    cpu_linear_fwd_f64(c->out, c->x, c->w, c->N, c->IN, c->OUT);
    return dot_d(c->out, c->R, (size_t)c->N * c->OUT);
}

static void test_linear(void)
{
    struct lin_ctx c = {.N = 7, .IN = 12, .OUT = 9};
    size_t nx = (size_t)c.N * c.IN, nw = (size_t)c.OUT * c.IN, no = (size_t)c.N * c.OUT;
    c.x = rnd(nx, 1);
    c.w = rnd(nw, 1);
    c.out = rnd(no, 1);
    c.R = rnd(no, 1);
    lin_obj(&c);
    /* Independent forward: out[n][o] = sum_i x[n][i] W[o][i] (nn.Linear layout). */
    double ferr = 0;
    for (int n = 0; n < c.N; n++)
        for (int o = 0; o < c.OUT; o++) {
            double s = 0;
            for (int i = 0; i < c.IN; i++)
                s += c.x[n * c.IN + i] * c.w[o * c.IN + i];
            ferr = fmax(ferr, fabs(s - c.out[n * c.OUT + o]));
        }
    CHECK(ferr < 1e-12, "linear forward differs from x W^T by %.3e", ferr);

    double *gx0 = rnd(nx, 1), *gw0 = rnd(nw, 1);
    double *dx = copy_d(gx0, nx), *dw = copy_d(gw0, nw);
    cpu_linear_bwd_f64(dx, dw, c.R, c.x, c.w, c.N, c.IN, c.OUT);
    check_fd("linear", "dx", lin_obj, &c, c.x, nx, dx, gx0);
    check_fd("linear", "dw", lin_obj, &c, c.w, nw, dw, gw0);

    lin_obj(&c); /* the finite differences left out at a perturbed point */
    float *x32 = to_f32(c.x, nx), *w32 = to_f32(c.w, nw), *R32 = to_f32(c.R, no);
    float *out32 = zeros_f32(no), *dx32 = zeros_f32(nx), *dw32 = zeros_f32(nw);
    cpu_linear_fwd_f32(out32, x32, w32, c.N, c.IN, c.OUT);
    cpu_linear_bwd_f32(dx32, dw32, R32, x32, w32, c.N, c.IN, c.OUT);
    double *idx_ = increment(dx, gx0, nx), *idw = increment(dw, gw0, nw);
    check_f32("linear", "out", out32, c.out, no, F32_TOL);
    check_f32("linear", "dx", dx32, idx_, nx, F32_TOL);
    check_f32("linear", "dw", dw32, idw, nw, F32_TOL);
    /* An expert that received no tokens: N = 0 must be a no-op. */
    cpu_linear_fwd_f32(out32, x32, w32, 0, c.IN, c.OUT);
    cpu_linear_bwd_f32(dx32, dw32, R32, x32, w32, 0, c.IN, c.OUT);
    free(idx_); free(idw); free(x32); free(w32); free(R32); free(out32); free(dx32);
    free(dw32); free(gx0); free(gw0); free(dx); free(dw);
    free(c.x); free(c.w); free(c.out); free(c.R);
}

/* ---- rope --------------------------------------------------------------------------- */

struct rope_ctx { int N, H, hd; double theta; int32_t *pos; double *x, *out, *R; };
static double rope_obj(void *p)
{
    struct rope_ctx *c = p;
    cpu_rope_fwd_f64(c->out, c->x, c->pos, c->N, c->H, c->hd, c->theta);
    return dot_d(c->out, c->R, (size_t)c->N * c->H * c->hd);
}

static void test_rope(void)
{
    struct rope_ctx c = {.N = 5, .H = 3, .hd = 8, .theta = 10000.0};
    size_t nx = (size_t)c.N * c.H * c.hd;
    c.pos = rnd_int(c.N, 100);
    c.pos[0] = 0;
    c.x = rnd(nx, 1);
    c.out = rnd(nx, 1);
    c.R = rnd(nx, 1);
    rope_obj(&c);

    /* Norms preserved per head; position 0 is the identity. */
    double nerr = 0;
    for (size_t r = 0; r < (size_t)c.N * c.H; r++) {
        double a = dot_d(c.x + r * c.hd, c.x + r * c.hd, c.hd);
        double b = dot_d(c.out + r * c.hd, c.out + r * c.hd, c.hd);
        nerr = fmax(nerr, fabs(sqrt(a) - sqrt(b)) / sqrt(a));
    }
    CHECK(nerr < 1e-14, "rope changed a head's norm by %.3e", nerr);
    CHECK(memcmp(c.out, c.x, (size_t)c.H * c.hd * sizeof(double)) == 0,
          "rope at position 0 is not the identity");

    /* The rotate-half convention on a worked example: hd = 4, position 1, theta = 10000:
     * angles (1, 0.01); x = (1, 2, 3, 4) -> (x1 cos - x3 sin, x2 cos' - x4 sin',
     * x3 cos + x1 sin, x4 cos' + x2 sin'). */
    {
        double x4[4] = {1, 2, 3, 4}, o4[4];
        int32_t p1 = 1;
        cpu_rope_fwd_f64(o4, x4, &p1, 1, 1, 4, 10000.0);
        double want[4] = {cos(1) - 3 * sin(1), 2 * cos(0.01) - 4 * sin(0.01),
                          3 * cos(1) + sin(1), 4 * cos(0.01) + 2 * sin(0.01)};
        CHECK(relerr(o4, want, 4) < 1e-15, "rope worked example: relative error %.3e",
              relerr(o4, want, 4));
    }
    /* Relative positions: <rope(q, m), rope(k, n)> depends only on m - n. */
    {
        double *qk = rnd(2 * c.hd, 1), ra[16], rb[16], sa[16], sb[16];
        int32_t p[4] = {7, 3, 57, 53};
        cpu_rope_fwd_f64(ra, qk, &p[0], 1, 1, c.hd, c.theta);
        cpu_rope_fwd_f64(rb, qk + c.hd, &p[1], 1, 1, c.hd, c.theta);
        cpu_rope_fwd_f64(sa, qk, &p[2], 1, 1, c.hd, c.theta);
        cpu_rope_fwd_f64(sb, qk + c.hd, &p[3], 1, 1, c.hd, c.theta);
        double d1 = dot_d(ra, rb, c.hd), d2 = dot_d(sa, sb, c.hd);
        CHECK(fabs(d1 - d2) < 1e-12, "rope scores at the same offset differ: %.17g vs %.17g",
              d1, d2);
        free(qk);
    }
    /* In place. */
    {
        double *y = copy_d(c.x, nx);
        cpu_rope_fwd_f64(y, y, c.pos, c.N, c.H, c.hd, c.theta);
        CHECK(memcmp(y, c.out, nx * sizeof(double)) == 0, "rope in place differs");
        free(y);
    }

    double *g0 = rnd(nx, 1), *dx = copy_d(g0, nx);
    cpu_rope_bwd_f64(dx, c.R, c.pos, c.N, c.H, c.hd, c.theta);
    check_fd("rope", "dx", rope_obj, &c, c.x, nx, dx, g0);

    rope_obj(&c); /* the finite differences left out at a perturbed point */
    float *x32 = to_f32(c.x, nx), *R32 = to_f32(c.R, nx), *out32 = zeros_f32(nx),
          *dx32 = zeros_f32(nx);
    cpu_rope_fwd_f32(out32, x32, c.pos, c.N, c.H, c.hd, c.theta);
    cpu_rope_bwd_f32(dx32, R32, c.pos, c.N, c.H, c.hd, c.theta);
    double *inc = increment(dx, g0, nx);
    check_f32("rope", "out", out32, c.out, nx, F32_TOL);
    check_f32("rope", "dx", dx32, inc, nx, F32_TOL);
    free(inc); free(x32); free(R32); free(out32); free(dx32); free(g0); free(dx);
    free(c.pos); free(c.x); free(c.out); free(c.R);
}

/* ---- attention ---------------------------------------------------------------------- */

struct att_ctx { int B, Tn, H, KVH, hd; double *q, *k, *v, *out, *probs, *R; };
static double att_obj(void *p)
{
    struct att_ctx *c = p;
    cpu_attention_fwd_f64(c->out, c->probs, c->q, c->k, c->v, c->B, c->Tn, c->H, c->KVH, c->hd);
    return dot_d(c->out, c->R, (size_t)c->B * c->Tn * c->H * c->hd);
}

/* Independent reference: repeat k and v to H heads (repeat_interleave, as repeat_kv), then
 * masked softmax(q k^T / sqrt(hd)) v per (b, h). */
static void att_reference(double *out, const struct att_ctx *c)
{
    int rep = c->H / c->KVH;
    size_t nq = (size_t)c->B * c->Tn * c->H * c->hd;
    double *kr = semoe_xmalloc(nq * sizeof(double)), *vr = semoe_xmalloc(nq * sizeof(double));
    for (int b = 0; b < c->B; b++)
        for (int t = 0; t < c->Tn; t++)
            for (int kh = 0; kh < c->KVH; kh++)
                for (int r = 0; r < rep; r++)
                    for (int i = 0; i < c->hd; i++) {
                        size_t dst = (((size_t)b * c->Tn + t) * c->H + kh * rep + r) * c->hd + i;
                        size_t src = (((size_t)b * c->Tn + t) * c->KVH + kh) * c->hd + i;
                        kr[dst] = c->k[src];
                        vr[dst] = c->v[src];
                    }
    double s[64];
    for (int b = 0; b < c->B; b++)
        for (int h = 0; h < c->H; h++)
            for (int t = 0; t < c->Tn; t++) {
                size_t qo = (((size_t)b * c->Tn + t) * c->H + h) * c->hd;
                double z = 0;
                for (int u = 0; u <= t; u++) {
                    size_t ko = (((size_t)b * c->Tn + u) * c->H + h) * c->hd;
                    s[u] = exp(dot_d(c->q + qo, kr + ko, c->hd) / sqrt(c->hd));
                    z += s[u];
                }
                for (int i = 0; i < c->hd; i++) {
                    double o = 0;
                    for (int u = 0; u <= t; u++)
                        o += s[u] / z * vr[(((size_t)b * c->Tn + u) * c->H + h) * c->hd + i];
                    out[qo + i] = o;
                }
            }
    free(kr);
    free(vr);
}

static void test_attention(void)
{
    struct att_ctx c = {.B = 2, .Tn = 6, .H = 4, .KVH = 2, .hd = 8};
    size_t nq = (size_t)c.B * c.Tn * c.H * c.hd, nk = (size_t)c.B * c.Tn * c.KVH * c.hd;
    size_t np = (size_t)c.B * c.H * c.Tn * c.Tn;
    c.q = rnd(nq, 1.5);
    c.k = rnd(nk, 1.5);
    c.v = rnd(nk, 1);
    c.out = rnd(nq, 1);
    c.probs = rnd(np, 1);
    c.R = rnd(nq, 1);
    att_obj(&c);

    double *ref = semoe_xmalloc(nq * sizeof(double));
    att_reference(ref, &c);
    expect("attention", "out vs reference", relerr(c.out, ref, nq), 1e-13);
    double serr = 0;
    for (size_t r = 0; r < (size_t)c.B * c.H * c.Tn; r++) {
        double s = 0;
        for (int u = 0; u < c.Tn; u++)
            s += c.probs[r * c.Tn + u];
        serr = fmax(serr, fabs(s - 1));
    }
    CHECK(serr < 1e-14, "attention probability rows sum to 1 +- %.3e", serr);

    /* Causality: perturbing q, k, v at position 3 leaves every output at t < 3 bit-identical. */
    {
        struct att_ctx d = c;
        d.q = copy_d(c.q, nq);
        d.k = copy_d(c.k, nk);
        d.v = copy_d(c.v, nk);
        d.out = rnd(nq, 1);
        d.probs = rnd(np, 1);
        for (int b = 0; b < c.B; b++) {
            for (int i = 0; i < c.H * c.hd; i++)
                d.q[((size_t)b * c.Tn + 3) * c.H * c.hd + i] += 0.5;
            for (int i = 0; i < c.KVH * c.hd; i++) {
                d.k[((size_t)b * c.Tn + 3) * c.KVH * c.hd + i] -= 0.7;
                d.v[((size_t)b * c.Tn + 3) * c.KVH * c.hd + i] += 0.9;
            }
        }
        att_obj(&d);
        int same = 1, later_changed = 0;
        for (int b = 0; b < c.B; b++) {
            size_t row = (size_t)c.H * c.hd, base = (size_t)b * c.Tn * row;
            same &= memcmp(d.out + base, c.out + base, 3 * row * sizeof(double)) == 0;
            later_changed |= memcmp(d.out + base + 3 * row, c.out + base + 3 * row,
                                    row * sizeof(double)) != 0;
        }
        CHECK(same, "attention output before t=3 changed when position 3 was perturbed");
        CHECK(later_changed, "attention output at t=3 did not change when it was perturbed");
        free(d.q); free(d.k); free(d.v); free(d.out); free(d.probs);
    }

    double *gq0 = rnd(nq, 1), *gk0 = rnd(nk, 1), *gv0 = rnd(nk, 1);
    double *dq = copy_d(gq0, nq), *dk = copy_d(gk0, nk), *dv = copy_d(gv0, nk);
    att_obj(&c);
    cpu_attention_bwd_f64(dq, dk, dv, c.R, c.q, c.k, c.v, c.probs, c.B, c.Tn, c.H, c.KVH, c.hd);
    check_fd("attention", "dq", att_obj, &c, c.q, nq, dq, gq0);
    check_fd("attention", "dk", att_obj, &c, c.k, nk, dk, gk0);
    check_fd("attention", "dv", att_obj, &c, c.v, nk, dv, gv0);

    att_obj(&c);
    float *q32 = to_f32(c.q, nq), *k32 = to_f32(c.k, nk), *v32 = to_f32(c.v, nk),
          *R32 = to_f32(c.R, nq);
    float *out32 = zeros_f32(nq), *p32 = zeros_f32(np), *dq32 = zeros_f32(nq),
          *dk32 = zeros_f32(nk), *dv32 = zeros_f32(nk);
    cpu_attention_fwd_f32(out32, p32, q32, k32, v32, c.B, c.Tn, c.H, c.KVH, c.hd);
    cpu_attention_bwd_f32(dq32, dk32, dv32, R32, q32, k32, v32, p32, c.B, c.Tn, c.H, c.KVH,
                          c.hd);
    double *iq = increment(dq, gq0, nq), *ik = increment(dk, gk0, nk),
           *iv = increment(dv, gv0, nk);
    check_f32("attention", "out", out32, c.out, nq, F32_TOL);
    check_f32("attention", "probs", p32, c.probs, np, F32_TOL);
    check_f32("attention", "dq", dq32, iq, nq, F32_TOL);
    check_f32("attention", "dk", dk32, ik, nk, F32_TOL);
    check_f32("attention", "dv", dv32, iv, nk, F32_TOL);
    free(iq); free(ik); free(iv); free(q32); free(k32); free(v32); free(R32); free(out32);
    free(p32); free(dq32); free(dk32); free(dv32); free(gq0); free(gk0); free(gv0);
    free(dq); free(dk); free(dv); free(ref);
    free(c.q); free(c.k); free(c.v); free(c.out); free(c.probs); free(c.R);
}

/* ---- router ------------------------------------------------------------------------- */

struct router_ctx {
    int N, E, K, flipped;
    double *logits, *probs, *w, *R1, *R2;
    int32_t *idx, *idx0;
};
/* L = sum(w * R1) + sum(probs * R2); records whether the top-k selection moved. */
static double router_obj(void *p)
{
    struct router_ctx *c = p;
    cpu_router_fwd_f64(c->probs, c->idx, c->w, c->logits, c->N, c->E, c->K);
    if (memcmp(c->idx, c->idx0, (size_t)c->N * c->K * sizeof(int32_t)) != 0)
        c->flipped = 1;
    return dot_d(c->w, c->R1, (size_t)c->N * c->K) + dot_d(c->probs, c->R2, (size_t)c->N * c->E);
}

/* True when every row's K+1 largest logits are at least gap apart (no near-ties that a
 * finite-difference step could flip). */
static int well_separated(const double *logits, int N, int E, int K, double gap)
{
    double s[64];
    for (int n = 0; n < N; n++) {
        memcpy(s, logits + (size_t)n * E, E * sizeof(double));
        for (int i = 1; i < E; i++) /* insertion sort, descending */
            for (int j = i; j > 0 && s[j] > s[j - 1]; j--) {
                double t = s[j]; s[j] = s[j - 1]; s[j - 1] = t;
            }
        for (int j = 0; j < K && j + 1 < E; j++)
            if (s[j] - s[j + 1] < gap)
                return 0;
    }
    return 1;
}

static void test_router(void)
{
    struct router_ctx c = {.N = 10, .E = 8, .K = 2};
    size_t nl = (size_t)c.N * c.E, nk = (size_t)c.N * c.K;
    int draws = 0;
    do {
        free(c.logits);
        c.logits = rnd(nl, 3);
        draws++;
    } while (!well_separated(c.logits, c.N, c.E, c.K, 1e-3));
    printf("  router     logits drawn %d time(s) to avoid near-ties\n", draws);
    c.probs = rnd(nl, 1);
    c.w = rnd(nk, 1);
    c.R1 = rnd(nk, 1);
    c.R2 = rnd(nl, 1);
    c.idx = semoe_xcalloc(nk, sizeof(int32_t));
    c.idx0 = semoe_xcalloc(nk, sizeof(int32_t));
    cpu_router_fwd_f64(c.probs, c.idx0, c.w, c.logits, c.N, c.E, c.K);
    router_obj(&c);

    /* Properties: rows of probs and of w sum to 1; idx holds the K largest, descending. */
    double perr = 0, werr = 0;
    int order_ok = 1;
    for (int n = 0; n < c.N; n++) {
        double sp = 0, sw = 0;
        for (int e = 0; e < c.E; e++)
            sp += c.probs[n * c.E + e];
        for (int j = 0; j < c.K; j++)
            sw += c.w[n * c.K + j];
        perr = fmax(perr, fabs(sp - 1));
        werr = fmax(werr, fabs(sw - 1));
        double kth = c.probs[n * c.E + c.idx[n * c.K + c.K - 1]];
        int above = 0;
        for (int e = 0; e < c.E; e++)
            above += c.probs[n * c.E + e] >= kth;
        order_ok &= above == c.K;
        for (int j = 1; j < c.K; j++)
            order_ok &= c.w[n * c.K + j] <= c.w[n * c.K + j - 1];
    }
    CHECK(perr < 1e-14, "router softmax rows sum to 1 +- %.3e", perr);
    CHECK(werr < 1e-14, "router top-k weights sum to 1 +- %.3e", werr);
    CHECK(order_ok, "router idx is not the top-k in descending order");
    /* Ties go to the lower index, deterministically. */
    {
        double l[2][4] = {{0.5, 0.5, 0.5, 0.5}, {0, 1, 1, 0.25}};
        double p[8], w[4];
        int32_t idx[4];
        cpu_router_fwd_f64(p, idx, w, &l[0][0], 2, 4, 2);
        CHECK(idx[0] == 0 && idx[1] == 1 && idx[2] == 1 && idx[3] == 2,
              "router ties: got (%d %d) (%d %d), want (0 1) (1 2)", idx[0], idx[1], idx[2],
              idx[3]);
        CHECK(w[0] == 0.5 && w[1] == 0.5, "router tie weights %.17g %.17g", w[0], w[1]);
    }

    double *g0 = rnd(nl, 1), *dl = copy_d(g0, nl);
    cpu_router_bwd_f64(dl, c.R1, c.R2, c.probs, c.idx, c.w, c.N, c.E, c.K);
    check_fd("router", "dlogits", router_obj, &c, c.logits, nl, dl, g0);
    CHECK(!c.flipped, "a finite-difference step flipped the top-k selection");
    /* Without dprobs (no aux loss): L = sum(w * R1) only. */
    double *R2 = c.R2;
    c.R2 = semoe_xcalloc(nl, sizeof(double));
    double *dl2 = copy_d(g0, nl);
    router_obj(&c); /* the saved probs, idx, w of the unperturbed logits */
    cpu_router_bwd_f64(dl2, c.R1, NULL, c.probs, c.idx, c.w, c.N, c.E, c.K);
    check_fd("router", "dlogits, no dprobs", router_obj, &c, c.logits, nl, dl2, g0);
    CHECK(!c.flipped, "a finite-difference step flipped the top-k selection");
    free(c.R2);
    c.R2 = R2;

    router_obj(&c);
    float *l32 = to_f32(c.logits, nl), *R1_32 = to_f32(c.R1, nk), *R2_32 = to_f32(c.R2, nl);
    float *p32 = zeros_f32(nl), *w32 = zeros_f32(nk), *dl32 = zeros_f32(nl);
    int32_t *idx32 = semoe_xcalloc(nk, sizeof(int32_t));
    cpu_router_fwd_f32(p32, idx32, w32, l32, c.N, c.E, c.K);
    CHECK(memcmp(idx32, c.idx, nk * sizeof(int32_t)) == 0, "router f32 chose other experts");
    cpu_router_bwd_f32(dl32, R1_32, R2_32, p32, idx32, w32, c.N, c.E, c.K);
    double *inc = increment(dl, g0, nl);
    check_f32("router", "probs", p32, c.probs, nl, F32_TOL);
    check_f32("router", "w", w32, c.w, nk, F32_TOL);
    check_f32("router", "dlogits", dl32, inc, nl, F32_TOL);
    free(inc); free(l32); free(R1_32); free(R2_32); free(p32); free(w32); free(dl32);
    free(idx32); free(g0); free(dl); free(dl2);
    free(c.logits); free(c.probs); free(c.w); free(c.R1); free(c.R2); free(c.idx); free(c.idx0);
}

/* ---- swiglu ------------------------------------------------------------------------- */

struct swiglu_ctx { size_t n; double *a, *b, *h, *R; };
static double swiglu_obj(void *p)
{
    struct swiglu_ctx *c = p;
    cpu_swiglu_fwd_f64(c->h, c->a, c->b, c->n);
    return dot_d(c->h, c->R, c->n);
}

static void test_swiglu(void)
{
    struct swiglu_ctx c = {.n = 48};
    c.a = rnd(c.n, 4);
    c.b = rnd(c.n, 2);
    c.h = rnd(c.n, 1);
    c.R = rnd(c.n, 1);
    swiglu_obj(&c);
    double ferr = 0;
    for (size_t i = 0; i < c.n; i++)
        ferr = fmax(ferr, fabs(c.h[i] - c.a[i] / (1 + exp(-c.a[i])) * c.b[i]));
    CHECK(ferr < 1e-14, "swiglu forward differs from silu(a) * b by %.3e", ferr);

    double *ga0 = rnd(c.n, 1), *gb0 = rnd(c.n, 1), *da = copy_d(ga0, c.n), *db = copy_d(gb0, c.n);
    cpu_swiglu_bwd_f64(da, db, c.R, c.a, c.b, c.n);
    check_fd("swiglu", "da", swiglu_obj, &c, c.a, c.n, da, ga0);
    check_fd("swiglu", "db", swiglu_obj, &c, c.b, c.n, db, gb0);

    swiglu_obj(&c); /* the finite differences left out at a perturbed point */
    float *a32 = to_f32(c.a, c.n), *b32 = to_f32(c.b, c.n), *R32 = to_f32(c.R, c.n);
    float *h32 = zeros_f32(c.n), *da32 = zeros_f32(c.n), *db32 = zeros_f32(c.n);
    cpu_swiglu_fwd_f32(h32, a32, b32, c.n);
    cpu_swiglu_bwd_f32(da32, db32, R32, a32, b32, c.n);
    double *ia = increment(da, ga0, c.n), *ib = increment(db, gb0, c.n);
    check_f32("swiglu", "h", h32, c.h, c.n, F32_TOL);
    check_f32("swiglu", "da", da32, ia, c.n, F32_TOL);
    check_f32("swiglu", "db", db32, ib, c.n, F32_TOL);
    free(ia); free(ib); free(a32); free(b32); free(R32); free(h32); free(da32); free(db32);
    free(ga0); free(gb0); free(da); free(db); free(c.a); free(c.b); free(c.h); free(c.R);
}

/* ---- cross-entropy ------------------------------------------------------------------ */

struct ce_ctx { int N, V; double R; double *logits; int32_t *targets; };
static double ce_obj(void *p)
{
    struct ce_ctx *c = p;
    return c->R * cpu_crossentropy_fwd_f64(NULL, c->logits, c->targets, c->N, c->V);
}

static void test_crossentropy(void)
{
    struct ce_ctx c = {.N = 7, .V = 19};
    size_t nl = (size_t)c.N * c.V;
    c.logits = rnd(nl, 4);
    c.targets = rnd_int(c.N, c.V);
    double *R = rnd(1, 2);
    c.R = R[0];
    double *losses = rnd(c.N, 1);
    double loss = cpu_crossentropy_fwd_f64(losses, c.logits, c.targets, c.N, c.V);
    /* Independent forward: mean of -log softmax(logits)[target]. */
    double want = 0, lerr = 0;
    for (int n = 0; n < c.N; n++) {
        double z = 0;
        for (int v = 0; v < c.V; v++)
            z += exp(c.logits[n * c.V + v]);
        double ln = -log(exp(c.logits[n * c.V + c.targets[n]]) / z);
        lerr = fmax(lerr, fabs(ln - losses[n]));
        want += ln / c.N;
    }
    CHECK(lerr < 1e-13 && fabs(loss - want) < 1e-13,
          "cross-entropy %.17g (rows off by %.3e), want %.17g", loss, lerr, want);
    {
        double u[2 * 19];
        int32_t t[2] = {3, 18};
        for (int i = 0; i < 2 * 19; i++)
            u[i] = 0.375;
        double lu = cpu_crossentropy_fwd_f64(NULL, u, t, 2, 19);
        CHECK(fabs(lu - log(19.0)) < 1e-15, "uniform logits: loss %.17g, want log V", lu);
    }

    double *g0 = rnd(nl, 1), *dl = copy_d(g0, nl);
    cpu_crossentropy_bwd_f64(dl, c.logits, c.targets, c.R, c.N, c.V);
    check_fd("xent", "dlogits", ce_obj, &c, c.logits, nl, dl, g0);

    float *l32 = to_f32(c.logits, nl), *dl32 = zeros_f32(nl);
    float loss32 = cpu_crossentropy_fwd_f32(NULL, l32, c.targets, c.N, c.V);
    cpu_crossentropy_bwd_f32(dl32, l32, c.targets, (float)c.R, c.N, c.V);
    double *inc = increment(dl, g0, nl);
    expect("xent", "loss f32", fabs(loss32 - loss) / fabs(loss), F32_TOL);
    check_f32("xent", "dlogits", dl32, inc, nl, F32_TOL);
    free(inc); free(l32); free(dl32); free(g0); free(dl); free(losses); free(R);
    free(c.logits); free(c.targets);
}

/* ---- load-balancing aux loss -------------------------------------------------------- */

struct aux_ctx { int M, E, K; double R; double *probs; int32_t *idx; };
static double aux_obj(void *p)
{
    struct aux_ctx *c = p;
    return c->R * cpu_auxloss_fwd_f64(c->probs, c->idx, c->M, c->E, c->K);
}

/* transformers' load_balancing_loss_func, transcribed: one_hot(selected) (M, K, E) averaged
 * over tokens -> tokens_per_expert (K, E); mean probs -> (E); E * sum(tpe * prob). */
static double aux_reference(const double *probs, const int32_t *idx, int M, int E, int K)
{
    double loss = 0;
    for (int j = 0; j < K; j++)
        for (int e = 0; e < E; e++) {
            double tpe = 0, pe = 0;
            for (int m = 0; m < M; m++) {
                tpe += (idx[m * K + j] == e) / (double)M;
                pe += probs[m * E + e] / M;
            }
            loss += tpe * pe;
        }
    return loss * E;
}

static void test_auxloss(void)
{
    struct aux_ctx c = {.M = 24, .E = 6, .K = 2};
    size_t np = (size_t)c.M * c.E;
    double *logits = rnd(np, 2), *w = rnd((size_t)c.M * c.K, 1), *R = rnd(1, 2);
    c.R = R[0];
    c.probs = rnd(np, 1);
    c.idx = semoe_xcalloc((size_t)c.M * c.K, sizeof(int32_t));
    cpu_router_fwd_f64(c.probs, c.idx, w, logits, c.M, c.E, c.K);
    double loss = cpu_auxloss_fwd_f64(c.probs, c.idx, c.M, c.E, c.K);
    double want = aux_reference(c.probs, c.idx, c.M, c.E, c.K);
    CHECK(fabs(loss - want) < 1e-13, "aux loss %.17g, transformers' formula gives %.17g", loss,
          want);

    /* Perfectly uniform routing: probs 1/E, every expert chosen equally often. The loss is
     * K (so exactly 1 for top-1), since transformers sums the K one-hot slots. */
    for (int K = 1; K <= 2; K++) {
        double u[24 * 6];
        int32_t ui[24 * 2];
        for (int m = 0; m < 24; m++) {
            for (int e = 0; e < 6; e++)
                u[m * 6 + e] = 1.0 / 6;
            for (int j = 0; j < K; j++)
                ui[m * K + j] = (m + j) % 6;
        }
        double lu = cpu_auxloss_fwd_f64(u, ui, 24, 6, K);
        CHECK(fabs(lu - K) < 1e-14, "uniform routing, top-%d: aux loss %.17g, want %d", K, lu, K);
    }

    double *g0 = rnd(np, 1), *dp = copy_d(g0, np);
    cpu_auxloss_bwd_f64(dp, c.idx, c.R, c.M, c.E, c.K);
    check_fd("auxloss", "dprobs", aux_obj, &c, c.probs, np, dp, g0);

    float *p32 = to_f32(c.probs, np), *dp32 = zeros_f32(np);
    float loss32 = cpu_auxloss_fwd_f32(p32, c.idx, c.M, c.E, c.K);
    cpu_auxloss_bwd_f32(dp32, c.idx, (float)c.R, c.M, c.E, c.K);
    double *inc = increment(dp, g0, np);
    expect("auxloss", "loss f32", fabs(loss32 - loss) / fabs(loss), F32_TOL);
    check_f32("auxloss", "dprobs", dp32, inc, np, F32_TOL);
    free(inc); free(p32); free(dp32); free(g0); free(dp);
    free(logits); free(w); free(R); free(c.probs); free(c.idx);
}

/* ---- AdamW, gradient norm, clipping ------------------------------------------------- */

static void test_adamw(void)
{
    enum { n = 40, steps = 3 };
    const double lr = 3e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1, gscale = 0.7;
    double *p = rnd(n, 1), *g[steps], m[n] = {0}, v[n] = {0};
    double *pref = copy_d(p, n), mref[n] = {0}, vref[n] = {0};
    float *p32 = to_f32(p, n), m32[n] = {0}, v32[n] = {0};
    double *p0 = copy_d(p, n);
    for (int s = 0; s < steps; s++) {
        g[s] = rnd(n, 1);
        float *g32 = to_f32(g[s], n);
        cpu_adamw_f64(p, g[s], m, v, n, lr, b1, b2, eps, wd, s + 1, gscale);
        cpu_adamw_f32(p32, g32, m32, v32, n, lr, b1, b2, eps, wd, s + 1, gscale);
        free(g32);
        /* torch.optim.AdamW's form: decay first, then addcdiv with bias corrections. */
        double bc1 = 1 - pow(b1, s + 1), bc2 = 1 - pow(b2, s + 1);
        for (int i = 0; i < n; i++) {
            double gi = g[s][i] * gscale;
            pref[i] *= 1 - lr * wd;
            mref[i] = b1 * mref[i] + (1 - b1) * gi;
            vref[i] = b2 * vref[i] + (1 - b2) * gi * gi;
            pref[i] -= lr / bc1 * mref[i] / (sqrt(vref[i]) / sqrt(bc2) + eps);
        }
    }
    double *dref = increment(pref, p0, n), *d = increment(p, p0, n);
    double *d32 = semoe_xmalloc(n * sizeof(double));
    for (int i = 0; i < n; i++)
        d32[i] = (double)p32[i] - p0[i];
    expect("adamw", "update vs torch form", relerr(d, dref, n), 1e-12);
    /* The float update is lr * O(1) on O(1) weights: its rounding is ~1e-7 |p|, i.e. ~1e-7/lr
     * relative to the update itself. */
    expect("adamw", "update f32", relerr(d32, dref, n), 1e-7 / lr * 10);

    double *gs = rnd(n, 1), want = 0;
    for (int i = 0; i < n; i++)
        want += gs[i] * gs[i];
    float *gs32 = to_f32(gs, n);
    CHECK(fabs(cpu_sumsq_f64(gs, n) - want) < 1e-12 * want, "sumsq f64");
    CHECK(fabs(cpu_sumsq_f32(gs32, n) - want) < 1e-6 * want, "sumsq f32");
    double sc = cpu_clip_scale(want, 1.0);
    CHECK(fabs(sc - fmin(1.0, 1.0 / (sqrt(want) + 1e-6))) < 1e-15, "clip scale %.17g", sc);
    CHECK(cpu_clip_scale(0.25, 1.0) == 1.0 && cpu_clip_scale(100.0, 0) == 1.0,
          "clip scale must not scale up, and max_norm 0 disables it");
    CHECK(fabs(cpu_clip_scale(16.0, 2.0) - 2.0 / (4.0 + 1e-6)) < 1e-15, "clip scale 16 -> 2");
    free(gs); free(gs32); free(dref); free(d); free(d32); free(p0); free(pref); free(p);
    free(p32);
    for (int s = 0; s < steps; s++)
        free(g[s]);
}

int main(void)
{
    test_init("cpu_ops");
    test_embedding();
    test_rmsnorm();
    test_linear();
    test_rope();
    test_attention();
    test_router();
    test_swiglu();
    test_crossentropy();
    test_auxloss();
    test_adamw();
    return test_finish();
}
