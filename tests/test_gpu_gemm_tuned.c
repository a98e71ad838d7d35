/* gpu/gemm_tuned.h (cuBLASLt GEMMs with the algorithm measured per shape bucket) against a host
 * reference in double, on fresh random bf16 inputs (seed printed; replay with SEMOE_TEST_SEED):
 *   - every op combination the layers use (TN, NN, NT), bf16 outputs (beta 0) within 1e-2 of
 *     the rounded reference and fp32 outputs accumulated onto random C (beta 1) within 1e-5,
 *     so that the measuring runs, which write a scratch copy for beta 1, leave C alone;
 *   - the same bucket again with other row counts (the expert GEMMs' case: the algorithm
 *     measured on one member serves the others), ragged sizes and one too small to tile;
 *   - each call twice, the second from the cache, and at least one shape measured.
 * Skipped (77) without a CUDA device. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/gemm_tuned.h"
#include "gpu/ops.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"

#define S_TOL_BF16 1e-2 /* outputs rounded to bf16 (2^-9 relative) */
#define S_TOL_F32 1e-5  /* fp32 accumulation of exact bf16 products */

typedef struct {
    char ta, tb;
    int m, n, k, c32;
} s_case_t;

/* want (m, n) column-major = op(A) op(B) + beta C0, in double, as floats. */
static void s_reference(float *want, const s_case_t *c, const float *A, const float *B,
                        const float *C0, float beta)
{
    int lda = c->ta == 'N' ? c->m : c->k, ldb = c->tb == 'N' ? c->k : c->n;
    for (int j = 0; j < c->n; j++)
        for (int i = 0; i < c->m; i++) {
            double s = 0.0;
            for (int p = 0; p < c->k; p++) {
                double a = c->ta == 'N' ? A[i + (size_t)p * lda] : A[p + (size_t)i * lda];
                double b = c->tb == 'N' ? B[p + (size_t)j * ldb] : B[j + (size_t)p * ldb];
                s += a * b;
            }
            size_t o = i + (size_t)j * c->m;
            want[o] = (float)(s + (C0 ? beta * C0[o] : 0.0));
        }
}

static void test_case(const s_case_t *c)
{
    size_t na = (size_t)c->m * c->k, nb = (size_t)c->k * c->n, nc = (size_t)c->m * c->n;
    int lda = c->ta == 'N' ? c->m : c->k, ldb = c->tb == 'N' ? c->k : c->n;
    float *A = test_rand_bf16(na, 1.0), *B = test_rand_bf16(nb, 1.0);
    float *C0 = c->c32 ? test_rand_floats(nc, 4.0) : NULL;
    float *want = semoe_xmalloc(nc * sizeof *want);
    float beta = c->c32 ? 1.0f : 0.0f;
    s_reference(want, c, A, B, C0, beta);
    uint16_t *dA = test_gpu_upb(A, na), *dB = test_gpu_upb(B, nb);
    for (int rep = 0; rep < 2; rep++) { /* measured, then from the cache */
        void *dC = c->c32 ? (void *)test_gpu_upf(C0, nc) : (void *)test_gpu_garbage_bf16(nc);
        gpu_lt_gemm_c(c->ta, c->tb, c->m, c->n, c->k, dA, lda, dB, ldb, beta, dC, c->c32,
                      c->m);
        float *got = c->c32 ? test_gpu_downf(dC, nc) : test_gpu_downb(dC, nc);
        double err = test_rel_err(got, want, nc, 0.0);
        double tol = c->c32 ? S_TOL_F32 : S_TOL_BF16;
        printf("%c%c m %d n %d k %d %s (call %d): rel %.3g %s\n", c->ta, c->tb, c->m, c->n, c->k,
               c->c32 ? "fp32 C += " : "bf16 C = ", rep + 1, err, err <= tol ? "ok" : "FAIL");
        CHECK(err <= tol, "%c%c %dx%dx%d call %d: rel %.3g > %g", c->ta, c->tb, c->m, c->n, c->k,
              rep + 1, err, tol);
        free(got);
        gpu_free(dC);
    }
    gpu_free(dA);
    gpu_free(dB);
    free(A);
    free(B);
    free(C0);
    free(want);
}

int main(void)
{
    if (gpu_device_count() == 0) {
        printf("gpu_gemm_tuned: skipped: no CUDA device (%s)\n", semoe_err_msg());
        return 77;
    }
    test_init("gpu_gemm_tuned");
    setenv("SEMOE_GEMM_TUNE", "1", 1); /* on whatever the caller's environment says */
    semoe_rc rc = gpu_backend_init(0);
    REQUIRE(rc == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    static const s_case_t cases[] = {
        {'T', 'N', 768, 512, 256, 0},  /* the forward: [a | b]^T = W13 h^T */
        {'T', 'N', 768, 488, 256, 0},  /* the same bucket, fewer rows */
        {'T', 'N', 768, 520, 256, 0},  /* the next bucket up */
        {'N', 'N', 256, 512, 768, 0},  /* dh^T = W13^T dab^T */
        {'N', 'T', 256, 768, 512, 1},  /* dW += h^T dab, fp32 */
        {'N', 'T', 256, 768, 496, 1},  /* the same bucket, fewer rows */
        {'T', 'N', 200, 136, 72, 0},   /* ragged */
        {'N', 'T', 24, 40, 16, 1},     /* smaller than any tile */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        test_case(&cases[i]);
    int shapes = 0, picks = 0;
    double saved = 0.0;
    gpu_lt_stats(&shapes, &picks, &saved);
    printf("measured %d shapes, %d on a cuBLASLt pick (%.4f ms a run saved in all)\n", shapes,
           picks, saved);
    CHECK(shapes > 0, "no shape was measured: tuning never ran");
    return test_finish();
}
