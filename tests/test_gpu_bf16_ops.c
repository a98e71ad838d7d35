/* The mixed-precision graph's kernels (gpu/bf16_ops.h) against the CPU reference (cpu/ops.h,
 * fp32) on fresh random inputs (seed printed; replay with SEMOE_TEST_SEED): the bf16 inputs are
 * rounded on the host first and the CPU gets the rounded values, so only the output rounding
 * and the order of the fp32 sums differ. bf16 outputs within 1e-2 norm-wise (bf16's own
 * rounding is ~2e-3), fp32 outputs within 1e-5, copies and casts bit for bit; accumulating
 * outputs pre-filled with random values, overwritten ones with garbage. Skipped (77) without a
 * CUDA device. */
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "cpu/ops.h"
#include "gpu/backend.h"
#include "gpu/bf16_ops.h"
#include "gpu/device.h"
#include "gpu/ops.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"

#define S_TOL_BF16 1e-2 /* bf16 outputs against the CPU's fp32 ones */
#define S_TOL_F32 1e-5  /* fp32 outputs */

/* ---- helpers ------------------------------------------------------------------------- */

static void s_expect(const char *op, const char *what, const char *size, double err, double tol)
{
    printf("  %-16s %-8s %-30s %.2e (tol %.0e)\n", op, what, size, err, tol);
    CHECK(err < tol, "%s %s [%s]: relative error %.3e >= %.1e", op, what, size, err, tol);
}

/* got (host) against want, norm-wise; frees got. */
static void s_cmp(const char *op, const char *what, const char *size, float *got,
                  const float *want, size_t n, double tol)
{
    s_expect(op, what, size, test_rel_err(got, want, n, 0), tol);
    free(got);
}

/* got (host) equal to want value for value; frees got. */
static void s_cmp_exact(const char *op, const char *what, const char *size, float *got,
                        const float *want, size_t n)
{
    size_t bad = 0;
    for (size_t i = 0; i < n; i++)
        bad += got[i] != want[i];
    printf("  %-16s %-8s %-30s %zu of %zu differ (exact)\n", op, what, size, bad, n);
    CHECK(bad == 0, "%s %s [%s]: %zu of %zu values differ, want bit-exact", op, what, size, bad,
          n);
    free(got);
}

/* ---- casts --------------------------------------------------------------------------- */

static void test_casts(void)
{
    static const size_t sizes[] = {1, 7, 1000, (size_t)4096 * 2048 + 3};
    for (size_t c = 0; c < sizeof sizes / sizeof *sizes; c++) {
        /* skew 0: 16-byte aligned buffers (vectors); 1: one element in (scalar path) */
        for (int skew = 0; skew < 2; skew++) {
            size_t n = sizes[c];
            char sz[64];
            snprintf(sz, sizeof sz, "n=%zu%s", n, skew ? " unaligned" : "");
            float *x = test_rand_floats(n, 3);
            for (size_t i = 0; i < n; i += 5) { /* exact ties: to even, up or down */
                uint32_t u;
                memcpy(&u, &x[i], sizeof u);
                u = (u & 0xffff0000u) | 0x8000u;
                memcpy(&x[i], &u, sizeof u);
            }
            float *want = semoe_xmalloc(n * sizeof *want);
            for (size_t i = 0; i < n; i++)
                want[i] = test_bf16_round(x[i]);
            float *d_x = gpu_alloc((n + 1) * sizeof(float));
            gpu_to_device(d_x + skew, x, n * sizeof(float));
            uint16_t *d_b = test_gpu_garbage_bf16(n + 1);
            gpu_bf16_from_f32(d_b + skew, d_x + skew, n);
            float *got = test_gpu_downb(d_b, n + 1);
            memmove(got, got + skew, n * sizeof *got);
            s_cmp_exact("bf16_from_f32", "dst", sz, got, want, n);

            /* add_to_f32: dst (random) += the bf16 values just made */
            float *dst = test_rand_floats(n, 3);
            gpu_to_device(d_x + skew, dst, n * sizeof(float));
            gpu_bf16_add_to_f32(d_x + skew, d_b + skew, n);
            for (size_t i = 0; i < n; i++)
                dst[i] += want[i];
            float *sum = test_gpu_downf(d_x, n + 1);
            memmove(sum, sum + skew, n * sizeof *sum);
            s_cmp_exact("bf16_add_to_f32", "dst", sz, sum, dst, n);

            free(x), free(want), free(dst);
            gpu_free(d_x), gpu_free(d_b);
        }
    }
}

/* ---- rmsnorm ------------------------------------------------------------------------- */

static void test_rmsnorm(void)
{
    /* N, D: realistic and odd (D 31: the scalar path; 16384: past 48 KiB of shared memory in
     * backward; N 5000: chunks of rows that do not divide it) */
    static const int cases[][2] = {{1, 64},   {7, 64},    {4096, 64},  {1, 2048}, {7, 2048},
                                   {4096, 2048}, {3, 31}, {5000, 1024}, {33, 16384}};
    const float eps = 1e-5f;
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c][0], D = cases[c][1];
        size_t n = (size_t)N * D;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d D=%d", N, D);
        float *x = test_rand_floats(n, 2), *w = test_rand_uniform((size_t)D, -1.5, 1.5);
        float *out = semoe_xmalloc(n * sizeof *out), *rstd = semoe_xmalloc(N * sizeof *rstd);
        cpu_rmsnorm_fwd_f32(out, rstd, x, w, N, D, eps);

        float *d_x = test_gpu_upf(x, n), *d_w = test_gpu_upf(w, (size_t)D);
        float *g_rstd = test_rand_floats((size_t)N, 9), *d_rstd = test_gpu_upf(g_rstd, (size_t)N);
        uint16_t *d_out = test_gpu_garbage_bf16(n);
        gpu_bf16_rmsnorm_fwd(d_out, d_rstd, d_x, d_w, N, D, eps);
        s_cmp("rmsnorm_fwd", "out", sz, test_gpu_downb(d_out, n), out, n, S_TOL_BF16);
        s_cmp("rmsnorm_fwd", "rstd", sz, test_gpu_downf(d_rstd, (size_t)N), rstd, (size_t)N,
              S_TOL_F32);

        /* backward from bf16 dout on the CPU's rstd; dx and dw accumulate into random values */
        float *dout = test_rand_bf16(n, 1), *dx = test_rand_floats(n, 1);
        float *dw = test_rand_floats((size_t)D, 1);
        uint16_t *d_dout = test_gpu_upb(dout, n);
        float *d_dx = test_gpu_upf(dx, n), *d_dw = test_gpu_upf(dw, (size_t)D);
        float *d_dw2 = test_gpu_upf(dw, (size_t)D);
        gpu_to_device(d_rstd, rstd, (size_t)N * sizeof(float));
        cpu_rmsnorm_bwd_f32(dx, dw, dout, x, w, rstd, N, D);
        gpu_bf16_rmsnorm_bwd(d_dx, d_dw, d_dout, d_x, d_w, d_rstd, N, D);
        s_cmp("rmsnorm_bwd", "dx", sz, test_gpu_downf(d_dx, n), dx, n, S_TOL_F32);
        float *got_dw = test_gpu_downf(d_dw, (size_t)D);
        s_cmp("rmsnorm_bwd", "dw", sz, test_gpu_downf(d_dw, (size_t)D), dw, (size_t)D, S_TOL_F32);
        /* deterministic: a second run from the same start gives the same bits */
        gpu_bf16_rmsnorm_bwd(d_dx, d_dw2, d_dout, d_x, d_w, d_rstd, N, D);
        s_cmp_exact("rmsnorm_bwd", "dw again", sz, test_gpu_downf(d_dw2, (size_t)D), got_dw,
                    (size_t)D);

        free(x), free(w), free(out), free(rstd), free(g_rstd), free(dout), free(dx), free(dw);
        free(got_dw);
        gpu_free(d_x), gpu_free(d_w), gpu_free(d_rstd), gpu_free(d_out), gpu_free(d_dout);
        gpu_free(d_dx), gpu_free(d_dw), gpu_free(d_dw2);
    }
}

/* ---- fused QKV split with rope ------------------------------------------------------- */

/* Rows of the fused layout (N, (H + 2 KVH) hd) to q (N, H hd), k, v (N, KVH hd) and back
 * (to_fused). */
static void s_split(float *qkv, float *q, float *k, float *v, int N, int H, int KVH, int hd,
                    bool to_fused)
{
    size_t nq = (size_t)H * hd, nk = (size_t)KVH * hd, W = nq + 2 * nk;
    for (int n = 0; n < N; n++) {
        float *row = qkv + (size_t)n * W;
        float *parts[3] = {q + (size_t)n * nq, k + (size_t)n * nk, v + (size_t)n * nk};
        size_t offs[3] = {0, nq, nq + nk}, lens[3] = {nq, nk, nk};
        for (int p = 0; p < 3; p++) {
            if (to_fused)
                memcpy(row + offs[p], parts[p], lens[p] * sizeof(float));
            else
                memcpy(parts[p], row + offs[p], lens[p] * sizeof(float));
        }
    }
}

static void test_qkv_rope(void)
{
    /* N, H, KVH, hd; hd 6 and 8 (hd/2 not a multiple of 8) take the scalar path */
    static const int cases[][4] = {{1, 16, 4, 128}, {7, 16, 4, 128}, {4096, 16, 4, 128},
                                   {1, 4, 2, 64},   {7, 4, 2, 64},   {4096, 4, 2, 64},
                                   {5, 3, 1, 6},    {9, 2, 1, 8},    {33, 32, 8, 128}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c][0], H = cases[c][1], KVH = cases[c][2], hd = cases[c][3];
        double theta = hd == 128 ? 1e6 : 1e4;
        size_t nq = (size_t)N * H * hd, nk = (size_t)N * KVH * hd, nall = nq + 2 * nk;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d H=%d KVH=%d hd=%d", N, H, KVH, hd);
        int32_t *pos = test_rand_ints((size_t)N, 32768);
        int32_t *d_pos = test_gpu_upi(pos, (size_t)N);

        /* forward: the CPU ropes q and k split out of the rounded fused rows */
        float *qkv = test_rand_bf16(nall, 2);
        float *q = semoe_xmalloc(nq * sizeof *q), *k = semoe_xmalloc(nk * sizeof *k);
        float *v = semoe_xmalloc(nk * sizeof *v);
        s_split(qkv, q, k, v, N, H, KVH, hd, false);
        cpu_rope_fwd_f32(q, q, pos, N, H, hd, theta);
        cpu_rope_fwd_f32(k, k, pos, N, KVH, hd, theta);
        uint16_t *d_qkv = test_gpu_upb(qkv, nall), *d_q = test_gpu_garbage_bf16(nq);
        uint16_t *d_k = test_gpu_garbage_bf16(nk), *d_v = test_gpu_garbage_bf16(nk);
        gpu_bf16_qkv_rope_fwd(d_q, d_k, d_v, d_qkv, d_pos, N, H, KVH, hd, theta);
        s_cmp("qkv_rope_fwd", "q", sz, test_gpu_downb(d_q, nq), q, nq, S_TOL_BF16);
        s_cmp("qkv_rope_fwd", "k", sz, test_gpu_downb(d_k, nk), k, nk, S_TOL_BF16);
        s_cmp_exact("qkv_rope_fwd", "v", sz, test_gpu_downb(d_v, nk), v, nk);

        /* backward: dqkv rows = [rope_bwd(dq) | rope_bwd(dk) | dv], overwriting garbage */
        float *dq = test_rand_bf16(nq, 1), *dk = test_rand_bf16(nk, 1), *dv = test_rand_bf16(nk, 1);
        uint16_t *d_dq = test_gpu_upb(dq, nq), *d_dk = test_gpu_upb(dk, nk), *d_dv = test_gpu_upb(dv, nk);
        float *rq = semoe_xcalloc(nq, sizeof *rq), *rk = semoe_xcalloc(nk, sizeof *rk);
        cpu_rope_bwd_f32(rq, dq, pos, N, H, hd, theta);
        cpu_rope_bwd_f32(rk, dk, pos, N, KVH, hd, theta);
        uint16_t *d_dqkv = test_gpu_garbage_bf16(nall);
        gpu_bf16_qkv_rope_bwd(d_dqkv, d_dq, d_dk, d_dv, d_pos, N, H, KVH, hd, theta);
        float *got = test_gpu_downb(d_dqkv, nall);
        float *gq = semoe_xmalloc(nq * sizeof *gq), *gk = semoe_xmalloc(nk * sizeof *gk);
        float *gv = semoe_xmalloc(nk * sizeof *gv);
        s_split(got, gq, gk, gv, N, H, KVH, hd, false);
        s_cmp("qkv_rope_bwd", "dq part", sz, gq, rq, nq, S_TOL_BF16);
        s_cmp("qkv_rope_bwd", "dk part", sz, gk, rk, nk, S_TOL_BF16);
        s_cmp_exact("qkv_rope_bwd", "dv part", sz, gv, dv, nk);

        free(pos), free(qkv), free(q), free(k), free(v), free(dq), free(dk), free(dv);
        free(rq), free(rk), free(got);
        gpu_free(d_pos), gpu_free(d_qkv), gpu_free(d_q), gpu_free(d_k), gpu_free(d_v);
        gpu_free(d_dq), gpu_free(d_dk), gpu_free(d_dv), gpu_free(d_dqkv);
    }
}

/* ---- cross-entropy ------------------------------------------------------------------- */

static void test_ce(void)
{
    /* N, V; V 1001 and 3: rows that start off 16 bytes (scalar heads and tails) */
    static const int cases[][2] = {{1, 1000}, {7, 1000},  {4096, 1000},  {1, 32000},
                                   {7, 32000}, {4096, 32000}, {7, 1001}, {3, 128256},
                                   {5, 3}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int N = cases[c][0], V = cases[c][1];
        size_t n = (size_t)N * V;
        char sz[64];
        snprintf(sz, sizeof sz, "N=%d V=%d", N, V);
        float *logits = test_rand_bf16(n, 4);
        int32_t *tgt = test_rand_ints((size_t)N, V);
        uint16_t *d_logits = test_gpu_upb(logits, n);
        int32_t *d_tgt = test_gpu_upi(tgt, (size_t)N);

        /* forward: losses from the CPU, lse in double here */
        float *losses = semoe_xmalloc(N * sizeof *losses), *lse = semoe_xmalloc(N * sizeof *lse);
        (void)cpu_crossentropy_fwd_f32(losses, logits, tgt, N, V);
        for (int r = 0; r < N; r++) {
            const float *l = logits + (size_t)r * V;
            double m = l[0], s = 0;
            for (int j = 1; j < V; j++)
                m = l[j] > m ? l[j] : m;
            for (int j = 0; j < V; j++)
                s += exp(l[j] - m);
            lse[r] = (float)(m + log(s));
        }
        float *garbage = test_rand_floats((size_t)N, 50);
        float *d_losses = test_gpu_upf(garbage, (size_t)N);
        float *d_lse = test_gpu_upf(garbage, (size_t)N);
        gpu_bf16_ce_fwd(d_losses, d_lse, d_logits, d_tgt, N, V);
        s_cmp("ce_fwd", "losses", sz, test_gpu_downf(d_losses, (size_t)N), losses, (size_t)N,
              S_TOL_F32);
        s_cmp("ce_fwd", "lse", sz, test_gpu_downf(d_lse, (size_t)N), lse, (size_t)N, S_TOL_F32);

        /* backward, scale dloss per row: the CPU's dloss / N with dloss' = dloss N */
        float dloss = (float)((0.5 + test_rand_unit()) / N);
        float *dl = semoe_xcalloc(n, sizeof *dl);
        cpu_crossentropy_bwd_f32(dl, logits, tgt, dloss * (float)N, N, V);
        uint16_t *d_dl = test_gpu_garbage_bf16(n + 8);
        gpu_bf16_ce_bwd(d_dl, d_logits, d_lse, d_tgt, dloss, N, V);
        float *got = test_gpu_downb(d_dl, n);
        s_expect("ce_bwd", "dlogits", sz, test_rel_err(got, dl, n, 0), S_TOL_BF16);
        /* in place: the same bits as out of place */
        gpu_bf16_ce_bwd(d_logits, d_logits, d_lse, d_tgt, dloss, N, V);
        s_cmp_exact("ce_bwd in place", "dlogits", sz, test_gpu_downb(d_logits, n), got, n);
        /* dlogits off logits' alignment by one element: the scalar path, the same bits */
        uint16_t *d_logits2 = test_gpu_upb(logits, n);
        gpu_bf16_ce_bwd(d_dl + 1, d_logits2, d_lse, d_tgt, dloss, N, V);
        float *skew = test_gpu_downb(d_dl, n + 1);
        memmove(skew, skew + 1, n * sizeof *skew);
        s_cmp_exact("ce_bwd unaligned", "dlogits", sz, skew, got, n);

        free(logits), free(tgt), free(losses), free(lse), free(garbage), free(dl), free(got);
        gpu_free(d_logits), gpu_free(d_logits2), gpu_free(d_tgt), gpu_free(d_losses);
        gpu_free(d_lse), gpu_free(d_dl);
    }
}

/* ---- column sums --------------------------------------------------------------------- */

static void test_column_sum(void)
{
    /* M, E: router probabilities of M rows (layers x tokens) over E experts */
    static const int cases[][2] = {{1, 8},      {7, 8},        {4096, 64},   {4096, 256},
                                   {12345, 100}, {1000003, 64}, {200003, 256}, {0, 8}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        int M = cases[c][0], E = cases[c][1];
        size_t n = (size_t)M * E;
        char sz[64];
        snprintf(sz, sizeof sz, "M=%d E=%d", M, E);
        float *x = test_rand_uniform(n, 0, 1);
        float *want = semoe_xmalloc((size_t)E * sizeof *want);
        for (int e = 0; e < E; e++) {
            double s = 0;
            for (int m = 0; m < M; m++)
                s += x[(size_t)m * E + e];
            want[e] = (float)s;
        }
        float *d_x = test_gpu_upf(x, n);
        float *d_work = gpu_alloc(gpu_bf16_column_sum_work(M, E));
        float *garbage = test_rand_floats((size_t)E, 50);
        float *d_sums = test_gpu_upf(garbage, (size_t)E);
        float *d_sums2 = test_gpu_upf(garbage, (size_t)E);
        gpu_bf16_column_sum(d_sums, d_x, M, E, d_work);
        float *got = test_gpu_downf(d_sums, (size_t)E);
        s_expect("column_sum", "sums", sz, test_rel_err(got, want, (size_t)E, 0), S_TOL_F32);
        /* without a workspace, and deterministic: the same bits */
        gpu_bf16_column_sum(d_sums2, d_x, M, E, NULL);
        s_cmp_exact("column_sum", "no work", sz, test_gpu_downf(d_sums2, (size_t)E), got,
                    (size_t)E);

        free(x), free(want), free(garbage), free(got);
        gpu_free(d_x), gpu_free(d_work), gpu_free(d_sums), gpu_free(d_sums2);
    }
}

int main(void)
{
    if (gpu_device_count() == 0) {
        printf("gpu_bf16_ops: skipped: no CUDA device (%s)\n", semoe_err_msg());
        return 77;
    }
    test_init("gpu_bf16_ops");
    semoe_rc rc = gpu_backend_init(0);
    REQUIRE(rc == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    char name[256] = "";
    (void)gpu_device_info(0, name, sizeof name, NULL, NULL);
    printf("gpu_bf16_ops: cuda:0 %s, against cpu/ops.h fp32 on bf16-rounded inputs, "
           "tolerance %.0e (bf16 out), %.0e (fp32 out)\n",
           name, S_TOL_BF16, S_TOL_F32);

    test_casts();
    test_rmsnorm();
    test_qkv_rope();
    test_ce();
    test_column_sum();
    return test_finish();
}
