/* The MoE layer's GPU_MOE_GEMM_FUSED path (gpu/moe_gemm.h: our own grouped GEMM with SwiGLU in
 * its epilogue) on fresh random inputs (seed printed; replay with SEMOE_TEST_SEED):
 *   - its forward output against a host reference of the layer computed in fp32 from the same
 *     bf16 inputs and the layer's own routing, with the layer's bf16 roundings (a, b, silu(a),
 *     g, y, each weighted term): within 1e-2 norm-wise; the cuBLAS path (LOOP) is held to the
 *     same reference, so that the reference is checked too;
 *   - the routing of both paths identical, and experts muted through the router bias getting
 *     no rows (the kernel's empty experts), the others row counts that leave partial tiles;
 *   - its backward (dg with SwiGLU's backward fused and dh on our kernel, dW on cuBLAS reading
 *     the [a | b] and g our forward wrote) against LOOP's: dx and every weight gradient within
 *     1e-2. f = 384 leaves dg to cuBLAS (f not a multiple of 256), the other cases do not.
 * Skipped (77) without a CUDA device. */
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

#define S_TOL 1e-2

typedef struct {
    int T, d, f, E, k, muted; /* the last `muted` experts get a router bias of -100 */
} s_case_t;

static float s_silu_bf(float a) { return test_bf16_round(a / (1.0f + expf(-a))); }

/* The layer's forward on the host for the given routing: out (T, d), bf16 values. */
static void s_reference(float *out, const s_case_t *c, const float *x, const float *w13,
                        const float *w2, const int32_t *idx, const float *wts)
{
    int d = c->d, f = c->f;
    float *g = semoe_xmalloc((size_t)f * sizeof *g), *y = semoe_xmalloc((size_t)d * sizeof *y);
    float *acc_out = semoe_xmalloc((size_t)d * sizeof *acc_out);
    for (int t = 0; t < c->T; t++) {
        const float *xt = x + (size_t)t * d;
        memset(acc_out, 0, (size_t)d * sizeof *acc_out);
        for (int j = 0; j < c->k; j++) {
            int e = idx[t * c->k + j];
            const float *W1 = w13 + (size_t)e * 2 * f * d, *W3 = W1 + (size_t)f * d;
            const float *W2 = w2 + (size_t)e * d * f;
            for (int i = 0; i < f; i++) {
                float a = 0, b = 0;
                for (int q = 0; q < d; q++) {
                    a += xt[q] * W1[(size_t)i * d + q];
                    b += xt[q] * W3[(size_t)i * d + q];
                }
                g[i] = test_bf16_round(s_silu_bf(test_bf16_round(a)) * test_bf16_round(b));
            }
            for (int o = 0; o < d; o++) {
                float s = 0;
                for (int i = 0; i < f; i++)
                    s += g[i] * W2[(size_t)o * f + i];
                y[o] = test_bf16_round(s);
            }
            for (int o = 0; o < d; o++)
                acc_out[o] += test_bf16_round(wts[t * c->k + j] * y[o]);
        }
        for (int o = 0; o < d; o++)
            out[(size_t)t * d + o] = test_bf16_round(acc_out[o]);
    }
    free(g);
    free(y);
    free(acc_out);
}

typedef struct {
    gpu_moe_t *moe;
    uint16_t *out, *dx, *dwg, *dw13, *dw2;
    void *p1[64], *p3[64], *p2[64];
    gpu_moe_grads_t gr;
} s_run_t;

/* A layer on the given path with garbage-filled outputs; the process exits when the layer
 * cannot be made or the path is refused (the fused path must take these shapes on a Hopper). */
static void s_run_new(s_run_t *r, const s_case_t *c, gpu_moe_gemm_t mode)
{
    size_t T = (size_t)c->T, d = (size_t)c->d, f = (size_t)c->f, E = (size_t)c->E;
    r->moe = gpu_moe_new(c->T, c->d, c->f, c->E, c->k);
    gpu_moe_gemm_t used = r->moe ? gpu_moe_set_gemm(r->moe, mode) : GPU_MOE_GEMM_LOOP;
    if (!r->moe || used != mode) {
        CHECK(0, "gpu_moe_new(%d, %d, %d, %d, %d) %s, path %d asked, %d given", c->T, c->d,
              c->f, c->E, c->k, r->moe ? "made" : "failed", (int)mode, (int)used);
        exit(test_finish());
    }
    r->out = test_gpu_garbage_bf16(T * d);
    r->dx = test_gpu_garbage_bf16(T * d);
    r->dwg = test_gpu_garbage_bf16(E * d);
    r->dw13 = test_gpu_garbage_bf16(E * 2 * f * d);
    r->dw2 = test_gpu_garbage_bf16(E * d * f);
    for (size_t e = 0; e < E; e++) {
        r->p1[e] = r->dw13 + e * 2 * f * d;
        r->p3[e] = r->dw13 + e * 2 * f * d + f * d;
        r->p2[e] = r->dw2 + e * d * f;
    }
    r->gr = (gpu_moe_grads_t){.fp32 = 0, .dwg = r->dwg, .dw1 = r->p1, .dw3 = r->p3,
                              .dw2 = r->p2, .daux = NULL};
}

static void s_run_free(s_run_t *r)
{
    gpu_moe_destroy(&r->moe);
    gpu_free(r->out);
    gpu_free(r->dx);
    gpu_free(r->dwg);
    gpu_free(r->dw13);
    gpu_free(r->dw2);
}

static void s_compare(const char *what, const s_case_t *c, const uint16_t *got,
                      const uint16_t *want, size_t n)
{
    float *g = test_gpu_downb(got, n), *w = test_gpu_downb(want, n);
    double err = test_rel_err(g, w, n, 1e-6);
    printf("  T=%d d=%d f=%d E=%d k=%d  %-6s fused vs loop  %.2e\n", c->T, c->d, c->f, c->E,
           c->k, what, err);
    CHECK(err < S_TOL, "%s: fused against loop %.3e (tolerance %.0e)", what, err, S_TOL);
    free(g);
    free(w);
}

static void test_case(const s_case_t *c)
{
    size_t T = (size_t)c->T, d = (size_t)c->d, f = (size_t)c->f, E = (size_t)c->E,
           k = (size_t)c->k;
    float *x = test_rand_bf16(T * d, 1.0), *wg = test_rand_bf16(E * d, 1.0 / sqrt((double)d));
    float *w13 = test_rand_bf16(E * 2 * f * d, 1.7 / sqrt((double)d));
    float *w2 = test_rand_bf16(E * d * f, 1.7 / sqrt((double)f));
    float *dout = test_rand_bf16(T * d, 1.0);
    float bias[64];
    for (size_t e = 0; e < E; e++)
        bias[e] = (int)e >= c->E - c->muted ? -100.0f : 0.0f;
    uint16_t *dx_ = test_gpu_upb(x, T * d), *dwg = test_gpu_upb(wg, E * d);
    uint16_t *dw13 = test_gpu_upb(w13, E * 2 * f * d), *dw2 = test_gpu_upb(w2, E * d * f);
    uint16_t *ddout = test_gpu_upb(dout, T * d);
    float *dbias = test_gpu_upf(bias, E);
    gpu_moe_weights_t w = {.wg = dwg, .w13 = dw13, .w2 = dw2, .bias = dbias};

    s_run_t fu, lo;
    s_run_new(&fu, c, GPU_MOE_GEMM_FUSED);
    s_run_new(&lo, c, GPU_MOE_GEMM_LOOP);
    gpu_moe_fwd(fu.moe, &w, dx_, fu.out, NULL, NULL);
    gpu_moe_fwd(lo.moe, &w, dx_, lo.out, NULL, NULL);

    /* the routing: the same in both, muted experts empty, partial tiles somewhere */
    int32_t *idx = semoe_xmalloc(T * k * sizeof *idx), *idx2 = semoe_xmalloc(T * k * sizeof *idx2);
    gpu_to_host(idx, gpu_moe_idx(fu.moe), T * k * sizeof *idx);
    gpu_to_host(idx2, gpu_moe_idx(lo.moe), T * k * sizeof *idx2);
    CHECK(memcmp(idx, idx2, T * k * sizeof *idx) == 0, "the two paths routed differently");
    const int32_t *cnt = gpu_moe_counts(fu.moe);
    int partial = 0;
    for (int e = 0; e < c->E; e++) {
        if (e >= c->E - c->muted)
            CHECK(cnt[e] == 0, "muted expert %d got %d rows", e, cnt[e]);
        partial += cnt[e] % 128 != 0;
    }
    CHECK(partial > 0, "no expert with a partial row tile: the case tests less than it says");
    float *wts = test_gpu_downb(gpu_moe_weights(fu.moe), T * k);

    float *ref = semoe_xmalloc(T * d * sizeof *ref);
    s_reference(ref, c, x, w13, w2, idx, wts);
    float *of = test_gpu_downb(fu.out, T * d), *ol = test_gpu_downb(lo.out, T * d);
    double ef = test_rel_err(of, ref, T * d, 1e-6), el = test_rel_err(ol, ref, T * d, 1e-6);
    printf("  T=%d d=%d f=%d E=%d k=%d  out    fused %.2e, loop %.2e against the host\n", c->T,
           c->d, c->f, c->E, c->k, ef, el);
    CHECK(ef < S_TOL, "fused forward against the host reference: %.3e (tolerance %.0e)", ef,
          S_TOL);
    CHECK(el < S_TOL, "loop forward against the host reference: %.3e (tolerance %.0e)", el,
          S_TOL);

    gpu_moe_bwd(fu.moe, &w, dx_, ddout, NULL, fu.dx, &fu.gr);
    gpu_moe_bwd(lo.moe, &w, dx_, ddout, NULL, lo.dx, &lo.gr);
    s_compare("dx", c, fu.dx, lo.dx, T * d);
    s_compare("dwg", c, fu.dwg, lo.dwg, E * d);
    s_compare("dW13", c, fu.dw13, lo.dw13, E * 2 * f * d);
    s_compare("dW2", c, fu.dw2, lo.dw2, E * d * f);

    s_run_free(&fu);
    s_run_free(&lo);
    gpu_free(dx_);
    gpu_free(dwg);
    gpu_free(dw13);
    gpu_free(dw2);
    gpu_free(ddout);
    gpu_free(dbias);
    free(x);
    free(wg);
    free(w13);
    free(w2);
    free(dout);
    free(idx);
    free(idx2);
    free(wts);
    free(ref);
    free(of);
    free(ol);
}

int main(void)
{
    if (gpu_device_count() == 0) {
        printf("gpu_moe_fused: skipped: no CUDA device (%s)\n", semoe_err_msg());
        return 77;
    }
    test_init("gpu_moe_fused");
    semoe_rc rc = gpu_backend_init(0);
    REQUIRE(rc == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    /* d a multiple of 256, f of 128 (the kernel's tiles); row counts of a few tiles, ragged */
    static const s_case_t cases[] = {
        {777, 256, 384, 8, 2, 1},
        {600, 512, 256, 16, 4, 3},
        {1000, 256, 512, 8, 2, 2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        test_case(&cases[i]);
    return test_finish();
}
