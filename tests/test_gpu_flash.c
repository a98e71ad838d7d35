/* gpu/flash_attn.h's bf16 flash attention against the CPU reference (cpu_backend_f32's
 * attention_fwd/bwd, fp32, on the same bf16-exact inputs): out, lse, dq, dk, dv, norm-wise,
 * bf16 tolerance, on T that are not multiples of the tile and GQA groups of 1, 2, 4, for the
 * default (mma.sync) kernels and on two shapes the WMMA ones (gpu_flash_wmma_*); then
 * forward and forward+backward timings (printed, not checked). Skipped (77) without a device. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/flash_attn.h"
#include "gpu/moe_layer.h"
#include "gpu/ops.h"
#include "model/backend.h"
#include "tests/harness.h"

#define S_TOL 2e-2 /* bf16 operands of P V, dS, and bf16 outputs */
#define S_WARM 3
#define S_ITERS 10

/* ---- bf16 on the host ------------------------------------------------------------------ */

static uint16_t s_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even; inputs here are finite */
    return (uint16_t)(u >> 16);
}

static float s_from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* n random bf16 values uniform in [-a, a]: bits in *hb, the same values as floats in *f. */
static void s_rand_bf16(uint16_t **hb, float **f, size_t n, double a)
{
    *hb = malloc((n ? n : 1) * sizeof **hb);
    *f = malloc((n ? n : 1) * sizeof **f);
    for (size_t i = 0; i < n; i++) {
        (*hb)[i] = s_to_bf16((float)(a * (2.0 * test_rand_unit() - 1.0)));
        (*f)[i] = s_from_bf16((*hb)[i]);
    }
}

static void *s_up(const void *x, size_t bytes)
{
    void *d = gpu_alloc(bytes);
    gpu_to_device(d, x, bytes);
    return d;
}

/* Device bf16 (n) to host floats, malloc'ed. */
static float *s_down_bf16(const uint16_t *d, size_t n)
{
    uint16_t *h = malloc((n ? n : 1) * sizeof *h);
    float *f = malloc((n ? n : 1) * sizeof *f);
    gpu_to_host(h, d, n * sizeof *h);
    for (size_t i = 0; i < n; i++)
        f[i] = s_from_bf16(h[i]);
    free(h);
    return f;
}

/* ||got - want|| / ||want||, 2-norms in double; infinite when got has a non-finite value. */
static double s_rel(const float *got, const float *want, size_t n)
{
    double dd = 0, ww = 0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(got[i]))
            return INFINITY;
        double d = (double)got[i] - want[i];
        dd += d * d;
        ww += (double)want[i] * want[i];
    }
    return ww > 0 ? sqrt(dd / ww) : sqrt(dd);
}

/* Garbage for outputs that must be overwritten: bf16 values uploaded over the buffer. */
static void s_garbage(uint16_t *d, size_t n)
{
    uint16_t *h = malloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = s_to_bf16((float)(100.0 * (2.0 * test_rand_unit() - 1.0)));
    gpu_to_device(d, h, n * sizeof *h);
    free(h);
}

/* ---- correctness against the CPU ------------------------------------------------------- */

/* wmma: gpu_flash_wmma_fwd/bwd instead of gpu_flash_fwd/bwd. */
static void s_check(int B, int T, int H, int KVH, int hd, bool wmma)
{
    const size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * KVH * hd;
    const size_t nl = (size_t)B * H * T, np = (size_t)B * H * T * T;
    uint16_t *qh, *kh, *vh, *doh;
    float *q, *k, *v, *dout;
    s_rand_bf16(&qh, &q, nq, 2.0); /* a little peakier than uniform softmax */
    s_rand_bf16(&kh, &k, nk, 1.0);
    s_rand_bf16(&vh, &v, nk, 1.0);
    s_rand_bf16(&doh, &dout, nq, 1.0);

    /* the reference: fp32 on the same values; backward accumulates, so from zeros */
    float *out = calloc(nq, sizeof *out), *probs = calloc(np, sizeof *probs);
    float *dq = calloc(nq, sizeof *dq), *dk = calloc(nk, sizeof *dk), *dv = calloc(nk, sizeof *dv);
    cpu_backend_f32.attention_fwd(out, probs, q, k, v, B, T, H, KVH, hd);
    cpu_backend_f32.attention_bwd(dq, dk, dv, dout, q, k, v, probs, B, T, H, KVH, hd);
    /* lse in double from the scores */
    float *lse = malloc(nl * sizeof *lse);
    double *sc = malloc((size_t)T * sizeof *sc);
    const double scale = 1.0 / sqrt((double)hd);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++)
            for (int t = 0; t < T; t++) {
                const float *qr = q + (((size_t)b * T + t) * H + h) * hd;
                double mx = -INFINITY;
                for (int j = 0; j <= t; j++) {
                    const float *kr = k + (((size_t)b * T + j) * KVH + h / (H / KVH)) * hd;
                    double s = 0;
                    for (int d = 0; d < hd; d++)
                        s += (double)qr[d] * kr[d];
                    sc[j] = s * scale;
                    mx = fmax(mx, sc[j]);
                }
                double sum = 0;
                for (int j = 0; j <= t; j++)
                    sum += exp(sc[j] - mx);
                lse[((size_t)b * H + h) * T + t] = (float)(mx + log(sum));
            }

    uint16_t *q_d = s_up(qh, nq * 2), *k_d = s_up(kh, nk * 2), *v_d = s_up(vh, nk * 2);
    uint16_t *do_d = s_up(doh, nq * 2);
    uint16_t *out_d = gpu_alloc(nq * 2), *dq_d = gpu_alloc(nq * 2), *dk_d = gpu_alloc(nk * 2);
    uint16_t *dv_d = gpu_alloc(nk * 2);
    float *lse_d = gpu_alloc(nl * sizeof(float));
    s_garbage(out_d, nq);
    s_garbage(dq_d, nq);
    s_garbage(dk_d, nk);
    s_garbage(dv_d, nk);
    size_t wsb = gpu_flash_bwd_workspace(B, T, H, KVH, hd);
    unsigned char *ws_h = malloc(wsb);
    memset(ws_h, 0xff, wsb); /* NaN everywhere: the workspace's contents must not matter */
    float *ws_d = s_up(ws_h, wsb);
    free(ws_h);

    if (wmma) {
        gpu_flash_wmma_fwd(out_d, lse_d, q_d, k_d, v_d, B, T, H, KVH, hd);
        gpu_flash_wmma_bwd(dq_d, dk_d, dv_d, do_d, q_d, k_d, v_d, out_d, lse_d, B, T, H, KVH, hd,
                           ws_d);
    } else {
        gpu_flash_fwd(out_d, lse_d, q_d, k_d, v_d, B, T, H, KVH, hd);
        gpu_flash_bwd(dq_d, dk_d, dv_d, do_d, q_d, k_d, v_d, out_d, lse_d, B, T, H, KVH, hd,
                      ws_d);
    }

    float *g_out = s_down_bf16(out_d, nq), *g_dq = s_down_bf16(dq_d, nq);
    float *g_dk = s_down_bf16(dk_d, nk), *g_dv = s_down_bf16(dv_d, nk);
    float *g_lse = malloc(nl * sizeof *g_lse);
    gpu_to_host(g_lse, lse_d, nl * sizeof *g_lse);
    double e_out = s_rel(g_out, out, nq), e_lse = s_rel(g_lse, lse, nl);
    double e_dq = s_rel(g_dq, dq, nq), e_dk = s_rel(g_dk, dk, nk), e_dv = s_rel(g_dv, dv, nk);
    const char *impl = wmma ? "wmma" : "dflt"; /* dflt: mma.sync unless SEMOE_FLASH=wmma */
    printf("flash %-4s B=%d T=%4d H=%d KVH=%d hd=%3d: out %.2e lse %.2e dq %.2e dk %.2e dv %.2e\n",
           impl, B, T, H, KVH, hd, e_out, e_lse, e_dq, e_dk, e_dv);
    const char *names[] = {"out", "lse", "dq", "dk", "dv"};
    double errs[] = {e_out, e_lse, e_dq, e_dk, e_dv};
    for (int i = 0; i < 5; i++)
        CHECK(errs[i] < S_TOL, "flash %s %s B=%d T=%d H=%d KVH=%d hd=%d: rel %.3g >= %.0e", impl,
              names[i], B, T, H, KVH, hd, errs[i], S_TOL);

    void *dbufs[] = {q_d, k_d, v_d, do_d, out_d, dq_d, dk_d, dv_d, lse_d, ws_d};
    for (size_t i = 0; i < sizeof dbufs / sizeof dbufs[0]; i++)
        gpu_free(dbufs[i]);
    void *hbufs[] = {qh, kh, vh, doh, q, k, v, dout, out, probs, dq, dk, dv, lse, sc,
                     g_out, g_dq, g_dk, g_dv, g_lse};
    for (size_t i = 0; i < sizeof hbufs / sizeof hbufs[0]; i++)
        free(hbufs[i]);
}

/* The bf16mm table's attention (gpu/attention_flash.cu) in the fp32 graph's contract: inputs
 * already bf16 values (so the reference sees the same), the output written, the gradients
 * accumulated onto random values; tol: the flash kernels' (T large enough) or the fp32
 * fallback's (T small: 1e-5). */
static void s_check_table(int B, int T, int H, int KVH, int hd, double tol)
{
    const model_backend_f32_t *be = &gpu_backend_f32_bf16mm;
    const size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * KVH * hd;
    const size_t np = (size_t)B * H * T * T;
    uint16_t *hq, *hk, *hv, *hd_out, *h0q, *h0k, *h0v;
    float *q, *k, *v, *dout, *g0q, *g0k, *g0v;
    s_rand_bf16(&hq, &q, nq, 2.0);
    s_rand_bf16(&hk, &k, nk, 1.0);
    s_rand_bf16(&hv, &v, nk, 1.0);
    s_rand_bf16(&hd_out, &dout, nq, 1.0);
    s_rand_bf16(&h0q, &g0q, nq, 1.0); /* what the gradients hold before: accumulated onto */
    s_rand_bf16(&h0k, &g0k, nk, 1.0);
    s_rand_bf16(&h0v, &g0v, nk, 1.0);
    float *out = calloc(nq, sizeof *out), *probs = calloc(np, sizeof *probs);
    float *dq = malloc(nq * sizeof *dq), *dk = malloc(nk * sizeof *dk);
    float *dv = malloc(nk * sizeof *dv);
    memcpy(dq, g0q, nq * sizeof *dq);
    memcpy(dk, g0k, nk * sizeof *dk);
    memcpy(dv, g0v, nk * sizeof *dv);
    cpu_backend_f32.attention_fwd(out, probs, q, k, v, B, T, H, KVH, hd);
    cpu_backend_f32.attention_bwd(dq, dk, dv, dout, q, k, v, probs, B, T, H, KVH, hd);

    float *d[9];
    const float *src[9] = {q, k, v, dout, NULL, NULL, g0q, g0k, g0v};
    size_t len[9] = {nq, nk, nk, nq, nq, np, nq, nk, nk};
    for (int i = 0; i < 9; i++) {
        d[i] = be->alloc(len[i] * sizeof(float));
        if (src[i])
            be->to_device(d[i], src[i], len[i] * sizeof(float));
    }
    be->attention_fwd(d[4], d[5], d[0], d[1], d[2], B, T, H, KVH, hd);
    be->attention_bwd(d[6], d[7], d[8], d[3], d[0], d[1], d[2], d[5], B, T, H, KVH, hd);
    float *g_out = malloc(nq * sizeof *g_out), *g_dq = malloc(nq * sizeof *g_dq);
    float *g_dk = malloc(nk * sizeof *g_dk), *g_dv = malloc(nk * sizeof *g_dv);
    be->to_host(g_out, d[4], nq * sizeof(float));
    be->to_host(g_dq, d[6], nq * sizeof(float));
    be->to_host(g_dk, d[7], nk * sizeof(float));
    be->to_host(g_dv, d[8], nk * sizeof(float));
    /* the gradients' own part, compared after taking what was there before away on both sides */
    for (size_t i = 0; i < nq; i++) {
        g_dq[i] -= g0q[i];
        dq[i] -= g0q[i];
    }
    for (size_t i = 0; i < nk; i++) {
        g_dk[i] -= g0k[i];
        dk[i] -= g0k[i];
        g_dv[i] -= g0v[i];
        dv[i] -= g0v[i];
    }
    double e[4] = {s_rel(g_out, out, nq), s_rel(g_dq, dq, nq), s_rel(g_dk, dk, nk),
                   s_rel(g_dv, dv, nk)};
    printf("table %s B=%d T=%4d H=%d KVH=%d hd=%3d: out %.2e dq %.2e dk %.2e dv %.2e (tol %.0e)\n",
           be->name, B, T, H, KVH, hd, e[0], e[1], e[2], e[3], tol);
    const char *names[] = {"out", "dq", "dk", "dv"};
    for (int i = 0; i < 4; i++)
        CHECK(e[i] < tol, "table attention %s B=%d T=%d H=%d KVH=%d hd=%d: rel %.3g >= %.0e",
              names[i], B, T, H, KVH, hd, e[i], tol);
    for (int i = 0; i < 9; i++)
        be->free(d[i]);
    void *hbufs[] = {hq, hk, hv, hd_out, h0q, h0k, h0v, q, k, v, dout, g0q, g0k, g0v,
                     out, probs, dq, dk, dv, g_out, g_dq, g_dk, g_dv};
    for (size_t i = 0; i < sizeof hbufs / sizeof hbufs[0]; i++)
        free(hbufs[i]);
}

/* ---- timing ------------------------------------------------------------------------------ */

typedef struct {
    int B, T, H, KVH, hd;
    uint16_t *q, *k, *v, *out, *dout, *dq, *dk, *dv;
    float *lse, *ws;
} s_bench_t;

static void s_fwd_once(void *ctx)
{
    s_bench_t *s = ctx;
    gpu_flash_fwd(s->out, s->lse, s->q, s->k, s->v, s->B, s->T, s->H, s->KVH, s->hd);
}

static void s_fwd_bwd_once(void *ctx)
{
    s_bench_t *s = ctx;
    s_fwd_once(ctx);
    gpu_flash_bwd(s->dq, s->dk, s->dv, s->dout, s->q, s->k, s->v, s->out, s->lse, s->B, s->T,
                  s->H, s->KVH, s->hd, s->ws);
}

/* The median of S_ITERS timed calls of fn after S_WARM untimed ones. */
static float s_median_ms(void (*fn)(void *), void *ctx)
{
    return gpu_moe_median_ms(fn, ctx, S_WARM, S_ITERS);
}

static void s_bench(int B, int T, int H, int KVH, int hd)
{
    s_bench_t s = {.B = B, .T = T, .H = H, .KVH = KVH, .hd = hd};
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * KVH * hd;
    s.q = gpu_alloc(nq * 2);
    s.k = gpu_alloc(nk * 2);
    s.v = gpu_alloc(nk * 2);
    s.dout = gpu_alloc(nq * 2);
    s.out = gpu_alloc(nq * 2);
    s.dq = gpu_alloc(nq * 2);
    s.dk = gpu_alloc(nk * 2);
    s.dv = gpu_alloc(nk * 2);
    s.lse = gpu_alloc((size_t)B * H * T * sizeof(float));
    s.ws = gpu_alloc(gpu_flash_bwd_workspace(B, T, H, KVH, hd));
    gpu_moe_fill_randn(s.q, nq, 1.0f, 11);
    gpu_moe_fill_randn(s.k, nk, 1.0f, 12);
    gpu_moe_fill_randn(s.v, nk, 1.0f, 13);
    gpu_moe_fill_randn(s.dout, nq, 1.0f, 14);
    float fwd_ms = s_median_ms(s_fwd_once, &s);
    float all_ms = s_median_ms(s_fwd_bwd_once, &s);
    /* causal: half of the 2 (QK^T) + 2 (PV) B H T^2 hd flops; backward 2.5x forward */
    double fwd_flop = 2.0 * 2.0 * B * H * (double)T * T * hd / 2.0;
    printf("flash timing B=%d T=%d H=%d KVH=%d hd=%d: fwd %.3f ms (%.1f TFLOP/s), fwd+bwd %.3f ms "
           "(%.1f TFLOP/s)\n", B, T, H, KVH, hd, fwd_ms, fwd_flop / (fwd_ms * 1e-3) / 1e12,
           all_ms, 3.5 * fwd_flop / (all_ms * 1e-3) / 1e12);
    void *bufs[] = {s.q, s.k, s.v, s.dout, s.out, s.dq, s.dk, s.dv, s.lse, s.ws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        gpu_free(bufs[i]);
}

int main(void)
{
    if (gpu_device_count() == 0) {
        printf("gpu_flash: skipped: no CUDA device (%s)\n", semoe_err_msg());
        return 77;
    }
    test_init("gpu_flash");
    semoe_rc rc = gpu_backend_init(0);
    REQUIRE(rc == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    char name[256] = "";
    (void)gpu_device_info(0, name, sizeof name, NULL, NULL);
    printf("gpu_flash: cuda:0 %s, bf16 against cpu_backend_f32, tolerance %.0e\n", name, S_TOL);

    static const int cases[][5] = { /* B, T, H, KVH, hd */
        {1, 1, 1, 1, 64},    {1, 1, 2, 1, 128},   {1, 17, 2, 1, 64},    {2, 17, 4, 4, 128},
        {1, 64, 2, 2, 128},  {1, 128, 4, 2, 64},  {2, 130, 4, 2, 64},   {1, 130, 4, 1, 128},
        {2, 333, 8, 2, 128}, {1, 1000, 4, 1, 128}, {2, 1000, 2, 2, 64},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        s_check(cases[i][0], cases[i][1], cases[i][2], cases[i][3], cases[i][4], false);
    s_check(2, 333, 8, 2, 128, true); /* the WMMA kernels, kept for comparison */
    s_check(2, 130, 4, 2, 64, true);
    s_check_table(2, 256, 4, 2, 64, S_TOL);  /* flash: T >= 2 + 1.5 hd */
    s_check_table(1, 300, 4, 1, 128, S_TOL);
    s_check_table(2, 20, 4, 2, 64, 1e-5);    /* too short for the state: the fp32 kernels */

    for (int T = 2048; T <= 4096; T *= 2)
        for (int B = 1; B <= 4; B++)
            s_bench(B, T, 16, 4, 128);
    return test_finish();
}
