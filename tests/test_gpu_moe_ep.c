/* The bf16 MoE layer split around an exchange (gpu_moe_fwd_ex / gpu_moe_bwd_ex) against the
 * same layer without one, on one GPU, through a loopback exchange (one rank holding every
 * expert: dispatch and combine copy the rows on the layer's stream), on fresh random inputs:
 * for every expert GEMM path (grouped, loop, streams, our fused kernel), in 1 and in 3 parts,
 * with the weights in expert order or permuted behind a slot map, starting from room for 16
 * rows (so that the room grows, part by part, keeping the parts received before): the output,
 * dx and every weight gradient (fp32, accumulated) within 1e-3 norm-wise of the local layer's
 * (the same math; the GEMMs see other row groupings), the exchange called as the parts say
 * (counts announced, then rows, per part forward; rows per part backward). Then refusals: an
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
    float *dwg, *dw13, *dw2; /* fp32, accumulated from zero */
} s_res_t;

static void s_res_new(s_res_t *r)
{
    r->out = test_gpu_garbage_bf16((size_t)T_ * D_);
    r->dx = test_gpu_garbage_bf16((size_t)T_ * D_);
    r->dwg = gpu_alloc((size_t)E_ * D_ * 4);
    r->dw13 = gpu_alloc((size_t)E_ * 2 * F_ * D_ * 4);
    r->dw2 = gpu_alloc((size_t)E_ * D_ * F_ * 4);
}

static void s_res_free(s_res_t *r)
{
    gpu_free(r->out);
    gpu_free(r->dx);
    gpu_free(r->dwg);
    gpu_free(r->dw13);
    gpu_free(r->dw2);
}

/* Inputs: x, the router, the experts in expert order (w13, w2) and in the order of a slot map
 * (slot[e]: expert e's place in pw13, pw2), dout. */
typedef struct {
    uint16_t *x, *wg, *w13, *w2, *pw13, *pw2, *dout;
    int32_t slot[E_];
} s_in_t;

/* Forward and backward of a layer on path mode: with ex NULL locally, else through ex in
 * `parts` parts from room for 16 rows; permuted: the weights behind the slot map. */
static semoe_rc s_layer(const s_in_t *in, gpu_moe_gemm_t mode, const gpu_moe_exchange_t *ex,
                        bool permuted, s_res_t *r)
{
    gpu_moe_t *m = gpu_moe_new_ep(T_, D_, F_, E_, K_, ex ? 16 : 0);
    if (!m)
        return semoe_err(SEMOE_EINVAL, "gpu_moe_new_ep refused the shape");
    gpu_moe_set_gemm(m, mode);
    gpu_moe_weights_t w = {.wg = in->wg, .w13 = permuted ? in->pw13 : in->w13,
                           .w2 = permuted ? in->pw2 : in->w2, .bias = NULL,
                           .slot = permuted ? in->slot : NULL};
    void *p1[E_], *p3[E_], *p2[E_];
    for (int e = 0; e < E_; e++) { /* the gradients in expert order whatever the weights' */
        p1[e] = r->dw13 + (size_t)e * 2 * F_ * D_;
        p3[e] = r->dw13 + (size_t)e * 2 * F_ * D_ + (size_t)F_ * D_;
        p2[e] = r->dw2 + (size_t)e * D_ * F_;
    }
    gpu_moe_grads_t gr = {.fp32 = 1, .dwg = r->dwg, .dw1 = p1, .dw3 = p3, .dw2 = p2,
                          .daux = NULL};
    semoe_rc rc = gpu_moe_fwd_ex(m, &w, in->x, r->out, NULL, NULL, ex);
    if (rc == SEMOE_OK)
        rc = gpu_moe_bwd_ex(m, &w, in->x, in->dout, NULL, r->dx, &gr, ex);
    gpu_moe_destroy(&m);
    return rc;
}

static double s_err_b(const uint16_t *got, const uint16_t *want, size_t n)
{
    float *g = test_gpu_downb(got, n), *w = test_gpu_downb(want, n);
    double e = test_rel_err(g, w, n, 1e-6);
    free(g);
    free(w);
    return e;
}

static double s_err_f(const float *got, const float *want, size_t n)
{
    float *g = test_gpu_downf(got, n), *w = test_gpu_downf(want, n);
    double e = test_rel_err(g, w, n, 1e-6);
    free(g);
    free(w);
    return e;
}

static void s_check_paths(const s_in_t *in)
{
    static const gpu_moe_gemm_t modes[] = {GPU_MOE_GEMM_GROUPED, GPU_MOE_GEMM_LOOP,
                                           GPU_MOE_GEMM_STREAMS, GPU_MOE_GEMM_FUSED};
    static const char *const names[] = {"grouped", "loop", "streams", "fused"};
    for (int i = 0; i < 4; i++) {
        /* the local layer on the same path; behind a slot map our kernel gives way to cuBLAS
         * per expert (it indexes the weights by expert): there, the loop's */
        s_res_t refs[2];
        for (int permuted = 0; permuted <= 1; permuted++) {
            s_res_new(&refs[permuted]);
            gpu_moe_gemm_t rm = permuted && modes[i] == GPU_MOE_GEMM_FUSED ? GPU_MOE_GEMM_LOOP
                                                                           : modes[i];
            S_NEED_OK(s_layer(in, rm, NULL, false, &refs[permuted]));
        }
        for (int parts = 1; parts <= 3; parts += 2)
            for (int permuted = 0; permuted <= 1; permuted++) {
                const s_res_t ref = refs[permuted];
                s_loop_t l = {.d = D_};
                gpu_moe_exchange_t ex = {&l, parts, s_dispatch, s_combine};
                s_res_t r;
                s_res_new(&r);
                semoe_rc rc = s_layer(in, modes[i], &ex, permuted, &r);
                CHECK(rc == SEMOE_OK, "%s, %d parts, permuted %d: %s", names[i], parts,
                      permuted, semoe_err_msg());
                if (rc == SEMOE_OK) {
                    double e[5] = {s_err_b(r.out, ref.out, (size_t)T_ * D_),
                                   s_err_b(r.dx, ref.dx, (size_t)T_ * D_),
                                   s_err_f(r.dwg, ref.dwg, (size_t)E_ * D_),
                                   s_err_f(r.dw13, ref.dw13, (size_t)E_ * 2 * F_ * D_),
                                   s_err_f(r.dw2, ref.dw2, (size_t)E_ * D_ * F_)};
                    double worst = 0;
                    for (int k = 0; k < 5; k++)
                        worst = fmax(worst, e[k]);
                    printf("%-7s %d part(s) %s: out %.1e dx %.1e dwg %.1e dW13 %.1e dW2 %.1e\n",
                           names[i], parts, permuted ? "slot map" : "in order", e[0], e[1],
                           e[2], e[3], e[4]);
                    CHECK(worst < S_TOL, "%s, %d parts, permuted %d: worst relative error "
                          "%.3g", names[i], parts, permuted, worst);
                    CHECK(l.announced == parts && l.moved == 2 * parts &&
                              l.combined == 2 * parts,
                          "%s, %d parts: %d announced, %d moved, %d combined", names[i], parts,
                          l.announced, l.moved, l.combined);
                }
                s_res_free(&r);
            }
        s_res_free(&refs[0]);
        s_res_free(&refs[1]);
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
    s_check_paths(&in);
    s_check_refusals(&in);
    uint16_t *bufs[] = {in.x, in.wg, in.w13, in.w2, in.pw13, in.pw2, in.dout};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        gpu_free(bufs[i]);
    free(x), free(wg), free(w13), free(w2), free(dout), free(pw13), free(pw2);
    return test_finish();
}
