/* The bf16 MoE layer split around an exchange (gpu_moe_fwd_ex / gpu_moe_bwd_ex) against the
 * same layer without one, on one GPU, through a loopback exchange (one rank holding every
 * expert: dispatch and combine copy the rows on the layer's stream), on fresh random inputs:
 * for every expert GEMM path (grouped, loop, streams, our fused kernel), in 1, 2 and 5 parts
 * (5 uneven ones), with the weights in expert order or permuted behind a slot map, one expert
 * muted by the router bias (no rows in any part), starting from room for 16 rows (grown once,
 * from the counts every part announces first): the output, dx and every weight gradient (fp32
 * accumulated, or bf16 overwritten) within 1e-3 norm-wise of the local layer's (the same
 * math; the GEMMs may see other row groupings), the exchange called as the parts say (counts
 * announced per part, rows per part forward and backward). Two layers sharing one scratch (as
 * a model's do) in parts: forward both, backward both in reverse, against two local ones. Then refusals: an
 * exchange on a layer made without room, a backward whose exchange differs from the forward's
 * (none, or other parts), and counts delivered that differ from those announced. Skipped
 * (77) without a CUDA device. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/moe_layer.h"
#include "gpu/ops.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"

#define S_TOL 1e-3

/* A call that must succeed for the rest to mean anything: else the test ends. */
#define S_NEED_OK(call)                                                                        \
    do {                                                                                       \
        semoe_rc rc_ = (call);                                                                 \
        CHECK_HELD(rc_ == SEMOE_OK, #call, "%s", semoe_err_msg());                             \
        if (rc_ != SEMOE_OK)                                                                   \
            exit(test_finish());                                                               \
    } while (0)
#define T_ 384
#define D_ 256
#define F_ 512
#define E_ 8
#define K_ 2

/* The loopback: what it was asked. */
typedef struct {
    int d;
    int announced, moved, combined; /* calls */
    int lie;                        /* deliver one row more than announced (a refusal case) */
} s_loop_t;

static int s_sum(const int32_t *c)
{
    int n = 0;
    for (int e = 0; e < E_; e++)
        n += c[e];
    return n;
}

static semoe_rc s_dispatch(void *state, int part, const uint16_t *send, const int32_t *sc,
                           uint16_t *recv, int32_t *rc, int cap)
{
    (void)part;
    s_loop_t *l = state;
    memcpy(rc, sc, E_ * sizeof *rc);
    if (!recv) {
        l->announced++;
        return SEMOE_OK;
    }
    l->moved++;
    int n = s_sum(sc);
    if (n > cap)
        return semoe_err(SEMOE_EINVAL, "loopback: %d rows, room for %d", n, cap);
    gpu_copy(recv, send, (size_t)n * l->d * 2);
    if (l->lie)
        rc[0]++;
    return SEMOE_OK;
}

static semoe_rc s_combine(void *state, int part, const uint16_t *send, const int32_t *sc,
                          uint16_t *recv, const int32_t *rc)
{
    (void)part, (void)rc;
    s_loop_t *l = state;
    l->combined++;
    gpu_copy(recv, send, (size_t)s_sum(sc) * l->d * 2);
    return SEMOE_OK;
}

/* One layer's results. */
typedef struct {
    uint16_t *out, *dx;
    float *dwg, *dw13, *dw2;      /* fp32, accumulated from zero */
    uint16_t *bwg, *bw13, *bw2;   /* bf16, overwritten (with bf16 gradients) */
} s_res_t;

static void s_res_new(s_res_t *r)
{
    r->out = test_gpu_garbage_bf16((size_t)T_ * D_);
    r->dx = test_gpu_garbage_bf16((size_t)T_ * D_);
    r->dwg = gpu_alloc((size_t)E_ * D_ * 4);
    r->dw13 = gpu_alloc((size_t)E_ * 2 * F_ * D_ * 4);
    r->dw2 = gpu_alloc((size_t)E_ * D_ * F_ * 4);
    r->bwg = test_gpu_garbage_bf16((size_t)E_ * D_);
    r->bw13 = test_gpu_garbage_bf16((size_t)E_ * 2 * F_ * D_);
    r->bw2 = test_gpu_garbage_bf16((size_t)E_ * D_ * F_);
}

static void s_res_free(s_res_t *r)
{
    gpu_free(r->out);
    gpu_free(r->dx);
    gpu_free(r->dwg);
    gpu_free(r->dw13);
    gpu_free(r->dw2);
    gpu_free(r->bwg);
    gpu_free(r->bw13);
    gpu_free(r->bw2);
}

/* Inputs: x, the router, the experts in expert order (w13, w2) and in the order of a slot map
 * (slot[e]: expert e's place in pw13, pw2), dout. */
typedef struct {
    uint16_t *x, *wg, *w13, *w2, *pw13, *pw2, *dout;
    float *bias;       /* the last expert muted (-100): no rows in any part */
    int32_t slot[E_];
} s_in_t;

/* A layer's weights (permuted: behind the slot map) and gradients into r (bf16: r's bf16
 * buffers, overwritten; else its fp32 ones, accumulated). */
typedef struct {
    gpu_moe_weights_t w;
    void *p1[E_], *p3[E_], *p2[E_];
    gpu_moe_grads_t gr;
} s_wg_t;

static void s_wg(s_wg_t *x, const s_in_t *in, bool permuted, bool bf16, s_res_t *r)
{
    x->w = (gpu_moe_weights_t){.wg = in->wg, .w13 = permuted ? in->pw13 : in->w13,
                               .w2 = permuted ? in->pw2 : in->w2, .bias = in->bias,
                               .slot = permuted ? in->slot : NULL};
    size_t es = bf16 ? 2 : 4; /* the gradients in expert order whatever the weights' */
    char *g13 = bf16 ? (char *)r->bw13 : (char *)r->dw13, *g2 = bf16 ? (char *)r->bw2
                                                                      : (char *)r->dw2;
    for (int e = 0; e < E_; e++) {
        x->p1[e] = g13 + (size_t)e * 2 * F_ * D_ * es;
        x->p3[e] = g13 + ((size_t)e * 2 * F_ * D_ + (size_t)F_ * D_) * es;
        x->p2[e] = g2 + (size_t)e * D_ * F_ * es;
    }
    x->gr = (gpu_moe_grads_t){.fp32 = !bf16, .dwg = bf16 ? (void *)r->bwg : (void *)r->dwg,
                              .dw1 = x->p1, .dw3 = x->p3, .dw2 = x->p2, .daux = NULL};
}

/* Forward and backward of a layer on path mode: with ex NULL locally, else through ex in
 * `parts` parts from room for 16 rows; permuted: the weights behind the slot map. */
static semoe_rc s_layer(const s_in_t *in, gpu_moe_gemm_t mode, const gpu_moe_exchange_t *ex,
                        bool permuted, bool bf16, s_res_t *r)
{
    gpu_moe_t *m = gpu_moe_new_ep(T_, D_, F_, E_, K_, ex ? 16 : 0);
    if (!m)
        return semoe_err(SEMOE_EINVAL, "gpu_moe_new_ep refused the shape");
    gpu_moe_set_gemm(m, mode);
    s_wg_t x;
    s_wg(&x, in, permuted, bf16, r);
    semoe_rc rc = gpu_moe_fwd_ex(m, &x.w, in->x, r->out, NULL, NULL, ex);
    if (rc == SEMOE_OK)
        rc = gpu_moe_bwd_ex(m, &x.w, in->x, in->dout, NULL, r->dx, &x.gr, ex);
    gpu_moe_destroy(&m);
    return rc;
}

/* ||got - want|| / ||want|| of n device values, bf16 or fp32. */
static double s_err(const void *got, const void *want, size_t n, bool bf16)
{
    float *g = bf16 ? test_gpu_downb(got, n) : test_gpu_downf(got, n);
    float *w = bf16 ? test_gpu_downb(want, n) : test_gpu_downf(want, n);
    double e = test_rel_err(g, w, n, 1e-6);
    free(g);
    free(w);
    return e;
}

/* r against ref: out, dx and the gradients (bf16's or fp32's); the worst relative error. */
static double s_compare(const s_res_t *r, const s_res_t *ref, bool bf16, double e[5])
{
    e[0] = s_err(r->out, ref->out, (size_t)T_ * D_, true);
    e[1] = s_err(r->dx, ref->dx, (size_t)T_ * D_, true);
    e[2] = s_err(bf16 ? (void *)r->bwg : (void *)r->dwg, bf16 ? (void *)ref->bwg : (void *)ref->dwg,
                 (size_t)E_ * D_, bf16);
    e[3] = s_err(bf16 ? (void *)r->bw13 : (void *)r->dw13,
                 bf16 ? (void *)ref->bw13 : (void *)ref->dw13, (size_t)E_ * 2 * F_ * D_, bf16);
    e[4] = s_err(bf16 ? (void *)r->bw2 : (void *)r->dw2, bf16 ? (void *)ref->bw2 : (void *)ref->dw2,
                 (size_t)E_ * D_ * F_, bf16);
    double worst = 0;
    for (int k = 0; k < 5; k++)
        worst = fmax(worst, e[k]);
    return worst;
}

static void s_check_paths(const s_in_t *in)
{
    static const gpu_moe_gemm_t modes[] = {GPU_MOE_GEMM_GROUPED, GPU_MOE_GEMM_LOOP,
                                           GPU_MOE_GEMM_STREAMS, GPU_MOE_GEMM_FUSED};
    static const char *const names[] = {"grouped", "loop", "streams", "fused"};
    /* 1, 2 and 5 parts (384 tokens: 5 uneven ones), in order or behind the slot map, fp32
     * gradients; bf16 ones (overwritten, the muted expert's zeroed) in order */
    static const struct {
        int parts;
        bool permuted, bf16;
    } runs[] = {{1, false, false}, {1, true, false}, {2, false, false}, {2, true, false},
                {5, false, false}, {5, true, false}, {2, false, true},  {5, false, true}};
    for (int i = 0; i < 4; i++) {
        /* the local layer on the same path; behind a slot map our kernel gives way to cuBLAS
         * per expert (it indexes the weights by expert): there, the loop's */
        s_res_t refs[2][2];
        for (int permuted = 0; permuted <= 1; permuted++)
            for (int bf16 = 0; bf16 <= 1; bf16++) {
                s_res_new(&refs[permuted][bf16]);
                gpu_moe_gemm_t rm = permuted && modes[i] == GPU_MOE_GEMM_FUSED
                                        ? GPU_MOE_GEMM_LOOP
                                        : modes[i];
                S_NEED_OK(s_layer(in, rm, NULL, permuted, bf16, &refs[permuted][bf16]));
            }
        for (size_t k = 0; k < sizeof runs / sizeof runs[0]; k++) {
            int parts = runs[k].parts;
            bool permuted = runs[k].permuted, bf16 = runs[k].bf16;
            s_loop_t l = {.d = D_};
            gpu_moe_exchange_t ex = {&l, parts, s_dispatch, s_combine};
            s_res_t r;
            s_res_new(&r);
            semoe_rc rc = s_layer(in, modes[i], &ex, permuted, bf16, &r);
            CHECK(rc == SEMOE_OK, "%s, %d parts, permuted %d, bf16 %d: %s", names[i], parts,
                  permuted, bf16, semoe_err_msg());
            if (rc == SEMOE_OK) {
                double e[5], worst = s_compare(&r, &refs[permuted][bf16], bf16, e);
                printf("%-7s %d part(s) %s %s: out %.1e dx %.1e dwg %.1e dW13 %.1e dW2 %.1e\n",
                       names[i], parts, permuted ? "slot map" : "in order",
                       bf16 ? "bf16" : "fp32", e[0], e[1], e[2], e[3], e[4]);
                CHECK(worst < S_TOL, "%s, %d parts, permuted %d, bf16 %d: worst relative "
                      "error %.3g", names[i], parts, permuted, bf16, worst);
                CHECK(l.announced == parts && l.moved == 2 * parts && l.combined == 2 * parts,
                      "%s, %d parts: %d announced, %d moved, %d combined", names[i], parts,
                      l.announced, l.moved, l.combined);
            }
            s_res_free(&r);
        }
        for (int permuted = 0; permuted <= 1; permuted++)
            for (int bf16 = 0; bf16 <= 1; bf16++)
                s_res_free(&refs[permuted][bf16]);
    }
}

/* Two layers sharing one scratch (a model's), in 3 parts from room for 16 rows: forward A,
 * forward B (the shared room grows; g becomes B's), backward B, backward A (A's g recomputed),
 * against two local layers sharing theirs, in the same order. */
static void s_check_sharing(const s_in_t *in)
{
    s_loop_t l = {.d = D_};
    gpu_moe_exchange_t ex = {&l, 3, s_dispatch, s_combine};
    s_res_t res[2][2]; /* [ep][layer] */
    for (int ep = 0; ep <= 1; ep++) {
        gpu_moe_t *a = gpu_moe_new_ep(T_, D_, F_, E_, K_, ep ? 16 : 0);
        gpu_moe_t *b = a ? gpu_moe_new_sharing(a) : NULL;
        if (!a || !b) {
            CHECK(0, "two layers sharing a scratch: refused");
            exit(test_finish());
        }
        gpu_moe_t *m[2] = {a, b};
        s_wg_t x[2];
        for (int k = 0; k < 2; k++) {
            gpu_moe_set_gemm(m[k], GPU_MOE_GEMM_LOOP);
            s_res_new(&res[ep][k]);
            s_wg(&x[k], in, k == 1, false, &res[ep][k]);
        }
        const gpu_moe_exchange_t *e = ep ? &ex : NULL;
        for (int k = 0; k < 2; k++)
            S_NEED_OK(gpu_moe_fwd_ex(m[k], &x[k].w, in->x, res[ep][k].out, NULL, NULL, e));
        for (int k = 1; k >= 0; k--)
            S_NEED_OK(gpu_moe_bwd_ex(m[k], &x[k].w, in->x, in->dout, NULL, res[ep][k].dx,
                                     &x[k].gr, e));
        gpu_moe_destroy(&a);
        gpu_moe_destroy(&b);
    }
    for (int k = 0; k < 2; k++) {
        double e[5], worst = s_compare(&res[1][k], &res[0][k], false, e);
        printf("sharing layer %c: out %.1e dx %.1e dwg %.1e dW13 %.1e dW2 %.1e\n", "AB"[k], e[0],
               e[1], e[2], e[3], e[4]);
        CHECK(worst < S_TOL, "two layers sharing a scratch, layer %c: worst relative error %.3g",
              "AB"[k], worst);
        s_res_free(&res[0][k]);
        s_res_free(&res[1][k]);
    }
}

/* Bad use is refused, with an error and no abort. */
static void s_check_refusals(const s_in_t *in)
{
    s_loop_t l = {.d = D_};
    gpu_moe_exchange_t ex = {&l, 1, s_dispatch, s_combine};
    gpu_moe_weights_t w = {.wg = in->wg, .w13 = in->w13, .w2 = in->w2};
    s_res_t r;
    s_res_new(&r);
    void *p1[E_], *p3[E_], *p2[E_];
    for (int e = 0; e < E_; e++)
        p1[e] = p3[e] = p2[e] = r.dw2;
    gpu_moe_grads_t gb = {.fp32 = 0, .dwg = r.dwg, .dw1 = p1, .dw3 = p3, .dw2 = p2};
    gpu_moe_t *local = gpu_moe_new(T_, D_, F_, E_, K_);
    CHECK(gpu_moe_fwd_ex(local, &w, in->x, r.out, NULL, NULL, &ex) == SEMOE_EINVAL,
          "an exchange on a layer without room for rows");
    gpu_moe_destroy(&local);

    gpu_moe_t *m = gpu_moe_new_ep(T_, D_, F_, E_, K_, 64);
    S_NEED_OK(gpu_moe_fwd_ex(m, &w, in->x, r.out, NULL, NULL, NULL));
    CHECK(gpu_moe_bwd_ex(m, &w, in->x, in->dout, NULL, r.dx, &gb, &ex) == SEMOE_EINVAL,
          "a backward with an exchange after a forward without");
    ex.parts = 3;
    S_NEED_OK(gpu_moe_fwd_ex(m, &w, in->x, r.out, NULL, NULL, &ex));
    ex.parts = 2;
    CHECK(gpu_moe_bwd_ex(m, &w, in->x, in->dout, NULL, r.dx, &gb, &ex) == SEMOE_EINVAL,
          "a backward in 2 parts after a forward in 3");
    printf("refused: %s\n", semoe_err_msg());
    l.lie = 1;
    CHECK(gpu_moe_fwd_ex(m, &w, in->x, r.out, NULL, NULL, &ex) == SEMOE_EPROTO,
          "counts delivered that differ from those announced");
    printf("refused: %s\n", semoe_err_msg());
    gpu_moe_destroy(&m);
    s_res_free(&r);
}

int main(void)
{
    test_init("gpu_moe_ep");
    if (gpu_device_count() == 0) {
        printf("no CUDA device (%s): skipped\n", semoe_err_msg());
        return 77;
    }
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init: %s", semoe_err_msg());
    size_t d = D_, f = F_, E = E_;
    float *x = test_rand_bf16((size_t)T_ * d, 1.0), *wg = test_rand_bf16(E * d, 1.0 / sqrt((double)d));
    float *w13 = test_rand_bf16(E * 2 * f * d, 1.7 / sqrt((double)d));
    float *w2 = test_rand_bf16(E * d * f, 1.7 / sqrt((double)f));
    float *dout = test_rand_bf16((size_t)T_ * d, 1.0);
    s_in_t in;
    /* the slot map: a random permutation */
    for (int e = 0; e < E_; e++)
        in.slot[e] = e;
    for (int e = E_ - 1; e > 0; e--) {
        int j = (int)test_rand_below((uint64_t)e + 1), t = in.slot[e];
        in.slot[e] = in.slot[j];
        in.slot[j] = t;
    }
    float *pw13 = malloc(E * 2 * f * d * sizeof *pw13), *pw2 = malloc(E * d * f * sizeof *pw2);
    for (int e = 0; e < E_; e++) {
        memcpy(pw13 + (size_t)in.slot[e] * 2 * f * d, w13 + (size_t)e * 2 * f * d,
               2 * f * d * sizeof *pw13);
        memcpy(pw2 + (size_t)in.slot[e] * d * f, w2 + (size_t)e * d * f, d * f * sizeof *pw2);
    }
    in.x = test_gpu_upb(x, (size_t)T_ * d), in.wg = test_gpu_upb(wg, E * d);
    in.w13 = test_gpu_upb(w13, E * 2 * f * d), in.w2 = test_gpu_upb(w2, E * d * f);
    in.pw13 = test_gpu_upb(pw13, E * 2 * f * d), in.pw2 = test_gpu_upb(pw2, E * d * f);
    in.dout = test_gpu_upb(dout, (size_t)T_ * d);
    float bias[E_] = {0};
    bias[E_ - 1] = -100.0f;
    in.bias = test_gpu_upf(bias, E_);
    s_check_paths(&in);
    s_check_sharing(&in);
    s_check_refusals(&in);
    uint16_t *bufs[] = {in.x, in.wg, in.w13, in.w2, in.pw13, in.pw2, in.dout};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        gpu_free(bufs[i]);
    gpu_free(in.bias);
    free(x), free(wg), free(w13), free(w2), free(dout), free(pw13), free(pw2);
    return test_finish();
}
