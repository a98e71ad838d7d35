/* bench_flash: the bf16 flash attention of gpu/flash_attn.h on one GPU, the mma.sync kernels
 * (gpu_flash_fwd/bwd) against the first WMMA ones (gpu_flash_wmma_fwd/bwd) on the model's
 * shapes: both checked against each other first, then forward and forward+backward timed,
 * causal TFLOP/s and the ratio. Exits 1 when the two disagree. */
#include "gpu/device.h"
#include "gpu/flash_attn.h"
#include "gpu/moe_layer.h"
#include "gpu/ops.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_WARM 3
#define S_ITERS 10
#define S_TOL 2e-2 /* norm-wise, new against wmma: both bf16 with fp32 accumulation */

typedef struct {
    int B, T, H, KVH, hd;
} s_shape_t;

static const s_shape_t s_shapes[] = {
    {32, 2048, 16, 4, 128},
    {16, 4096, 16, 4, 128},
    {32, 2048, 16, 4, 64},
};

/* One case's device buffers: shared inputs, outputs per implementation (0 mma, 1 wmma). */
typedef struct {
    int B, T, H, KVH, hd;
    int impl; /* which one s_fwd / s_fwd_bwd run */
    uint16_t *q, *k, *v, *dout;
    uint16_t *out[2], *dq[2], *dk[2], *dv[2];
    float *lse[2], *ws;
} s_case_t;

static void s_fwd(void *ctx)
{
    s_case_t *c = ctx;
    int i = c->impl;
    if (i == 0)
        gpu_flash_fwd(c->out[i], c->lse[i], c->q, c->k, c->v, c->B, c->T, c->H, c->KVH, c->hd);
    else
        gpu_flash_wmma_fwd(c->out[i], c->lse[i], c->q, c->k, c->v, c->B, c->T, c->H, c->KVH,
                           c->hd);
}

static void s_fwd_bwd(void *ctx)
{
    s_case_t *c = ctx;
    int i = c->impl;
    s_fwd(ctx);
    if (i == 0)
        gpu_flash_bwd(c->dq[i], c->dk[i], c->dv[i], c->dout, c->q, c->k, c->v, c->out[i],
                      c->lse[i], c->B, c->T, c->H, c->KVH, c->hd, c->ws);
    else
        gpu_flash_wmma_bwd(c->dq[i], c->dk[i], c->dv[i], c->dout, c->q, c->k, c->v, c->out[i],
                           c->lse[i], c->B, c->T, c->H, c->KVH, c->hd, c->ws);
}

/* The median of S_ITERS timed calls of fn after S_WARM untimed ones. */
static float s_median_ms(void (*fn)(void *), void *ctx)
{
    return gpu_moe_median_ms(fn, ctx, S_WARM, S_ITERS);
}

static float s_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ||a - b|| / ||b|| of two device tensors (bf16 when f32 is 0, else fp32) of n elements, in
 * double on the host; infinite when a has a non-finite value, -1 when out of host memory. */
static double s_rel(const void *a_dev, const void *b_dev, size_t n, int f32)
{
    size_t esz = f32 ? 4 : 2;
    void *a = malloc(n * esz), *b = malloc(n * esz);
    if (!a || !b) {
        free(a);
        free(b);
        return -1.0;
    }
    gpu_to_host(a, a_dev, n * esz);
    gpu_to_host(b, b_dev, n * esz);
    double dd = 0.0, bb = 0.0;
    for (size_t i = 0; i < n; i++) {
        double x = f32 ? ((const float *)a)[i] : s_bf16(((const uint16_t *)a)[i]);
        double y = f32 ? ((const float *)b)[i] : s_bf16(((const uint16_t *)b)[i]);
        if (!isfinite(x)) {
            dd = INFINITY;
            break;
        }
        dd += (x - y) * (x - y);
        bb += y * y;
    }
    free(a);
    free(b);
    return bb > 0.0 ? sqrt(dd / bb) : sqrt(dd);
}

static void s_case_init(s_case_t *c, const s_shape_t *s)
{
    memset(c, 0, sizeof *c);
    c->B = s->B, c->T = s->T, c->H = s->H, c->KVH = s->KVH, c->hd = s->hd;
    size_t nq = (size_t)s->B * s->T * s->H * s->hd, nk = (size_t)s->B * s->T * s->KVH * s->hd;
    size_t nl = (size_t)s->B * s->H * s->T;
    c->q = gpu_alloc(nq * 2);
    c->k = gpu_alloc(nk * 2);
    c->v = gpu_alloc(nk * 2);
    c->dout = gpu_alloc(nq * 2);
    for (int i = 0; i < 2; i++) {
        c->out[i] = gpu_alloc(nq * 2);
        c->dq[i] = gpu_alloc(nq * 2);
        c->dk[i] = gpu_alloc(nk * 2);
        c->dv[i] = gpu_alloc(nk * 2);
        c->lse[i] = gpu_alloc(nl * sizeof(float));
    }
    c->ws = gpu_alloc(gpu_flash_bwd_workspace(s->B, s->T, s->H, s->KVH, s->hd));
    /* N(0, 1) q and k: scores q.k / sqrt(hd) of unit variance */
    gpu_moe_fill_randn(c->q, nq, 1.0f, 11);
    gpu_moe_fill_randn(c->k, nk, 1.0f, 12);
    gpu_moe_fill_randn(c->v, nk, 1.0f, 13);
    gpu_moe_fill_randn(c->dout, nq, 1.0f, 14);
    gpu_moe_sync();
}

static void s_case_free(s_case_t *c)
{
    void *bufs[] = {c->q,     c->k,     c->v,     c->dout,   c->out[0], c->out[1], c->dq[0],
                    c->dq[1], c->dk[0], c->dk[1], c->dv[0],  c->dv[1],  c->lse[0], c->lse[1],
                    c->ws};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
        gpu_free(bufs[i]);
    memset(c, 0, sizeof *c);
}

static void s_usage(void) { fprintf(stderr, "usage: bench_flash [--json FILE]\n"); }

int main(int argc, char **argv)
{
    const char *json = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            json = argv[++i];
            continue;
        }
        s_usage();
        return 2;
    }
    const char *env = getenv("SEMOE_FLASH");
    if (env && !strcmp(env, "wmma")) {
        fprintf(stderr, "bench_flash: SEMOE_FLASH=wmma would make gpu_flash_fwd/bwd the WMMA "
                        "kernels too: unset it (this bench compares both itself)\n");
        return 2;
    }
    if (gpu_device_count() == 0) {
        fprintf(stderr, "bench_flash: no CUDA device: %s\n", semoe_err_msg());
        return 1;
    }
    char name[256] = "";
    if (gpu_device_info(0, name, sizeof name, NULL, NULL) != SEMOE_OK) {
        fprintf(stderr, "bench_flash: cuda:0: %s\n", semoe_err_msg());
        return 1;
    }
    FILE *jf = NULL;
    if (json && !(jf = fopen(json, "w"))) {
        fprintf(stderr, "bench_flash: --json %s: %s\n", json, strerror(errno));
        return 1;
    }
    printf("bench_flash: cuda:0 %s; causal bf16 attention, mma (gpu_flash_fwd/bwd) vs wmma "
           "(gpu_flash_wmma_*), median of %d after %d warm-up; causal FLOPs: fwd 2 B H T^2 hd, "
           "bwd 2.5 fwd\n", name, S_ITERS, S_WARM);
    fflush(stdout);

    int rc = 0;
    for (size_t si = 0; si < sizeof s_shapes / sizeof s_shapes[0]; si++) {
        const s_shape_t *s = &s_shapes[si];
        s_case_t c;
        s_case_init(&c, s);
        size_t nq = (size_t)s->B * s->T * s->H * s->hd;
        size_t nk = (size_t)s->B * s->T * s->KVH * s->hd, nl = (size_t)s->B * s->H * s->T;

        /* both implementations once on the same inputs, then compared */
        for (c.impl = 0; c.impl < 2; c.impl++)
            s_fwd_bwd(&c);
        gpu_moe_sync();
        double e[5] = {s_rel(c.out[0], c.out[1], nq, 0), s_rel(c.lse[0], c.lse[1], nl, 1),
                       s_rel(c.dq[0], c.dq[1], nq, 0), s_rel(c.dk[0], c.dk[1], nk, 0),
                       s_rel(c.dv[0], c.dv[1], nk, 0)};
        int agree = 1;
        for (int i = 0; i < 5; i++)
            agree &= e[i] >= 0.0 && e[i] < S_TOL;
        char line[1024];
        int n = snprintf(line, sizeof line,
                         "B=%d T=%d H=%d KVH=%d hd=%d: mma vs wmma out %.1e lse %.1e dq %.1e "
                         "dk %.1e dv %.1e", s->B, s->T, s->H, s->KVH, s->hd, e[0], e[1], e[2],
                         e[3], e[4]);
        if (!agree) {
            printf("%s: DISAGREE (tolerance %.0e), not timed\n", line, S_TOL);
            if (jf)
                fprintf(jf, "{\"B\": %d, \"T\": %d, \"H\": %d, \"KVH\": %d, \"hd\": %d, "
                            "\"agree\": false, \"err\": {\"out\": %.3e, \"lse\": %.3e, "
                            "\"dq\": %.3e, \"dk\": %.3e, \"dv\": %.3e}}\n", s->B, s->T, s->H,
                        s->KVH, s->hd, e[0], e[1], e[2], e[3], e[4]);
            fflush(stdout);
            rc = 1;
            s_case_free(&c);
            continue;
        }

        float fwd_ms[2], all_ms[2];
        for (c.impl = 0; c.impl < 2; c.impl++) {
            fwd_ms[c.impl] = s_median_ms(s_fwd, &c);
            all_ms[c.impl] = s_median_ms(s_fwd_bwd, &c);
        }
        const double fwd_flop = 2.0 * s->B * s->H * (double)s->T * s->T * s->hd;
        double tf[2][3]; /* fwd, fwd+bwd, bwd alone (the difference) */
        for (int i = 0; i < 2; i++) {
            tf[i][0] = fwd_flop / (fwd_ms[i] * 1e9);
            tf[i][1] = 3.5 * fwd_flop / (all_ms[i] * 1e9);
            tf[i][2] = all_ms[i] > fwd_ms[i] ? 2.5 * fwd_flop / ((all_ms[i] - fwd_ms[i]) * 1e9)
                                             : 0.0;
        }
        if (n > 0 && (size_t)n < sizeof line)
            snprintf(line + n, sizeof line - (size_t)n,
                     " | mma fwd %.3f ms %.1f TF/s, fwd+bwd %.3f ms %.1f TF/s (bwd %.1f) | wmma "
                     "fwd %.3f ms %.1f TF/s, fwd+bwd %.3f ms %.1f TF/s (bwd %.1f) | new/wmma fwd "
                     "%.2fx fwd+bwd %.2fx", fwd_ms[0], tf[0][0], all_ms[0], tf[0][1], tf[0][2],
                     fwd_ms[1], tf[1][0], all_ms[1], tf[1][1], tf[1][2],
                     fwd_ms[1] / fwd_ms[0], all_ms[1] / all_ms[0]);
        puts(line);
        fflush(stdout);
        if (jf)
            fprintf(jf, "{\"B\": %d, \"T\": %d, \"H\": %d, \"KVH\": %d, \"hd\": %d, "
                        "\"agree\": true, \"err\": {\"out\": %.3e, \"lse\": %.3e, \"dq\": %.3e, "
                        "\"dk\": %.3e, \"dv\": %.3e}, "
                        "\"mma\": {\"fwd_ms\": %.4f, \"fwd_bwd_ms\": %.4f, \"fwd_tflops\": %.2f, "
                        "\"fwd_bwd_tflops\": %.2f, \"bwd_tflops\": %.2f}, "
                        "\"wmma\": {\"fwd_ms\": %.4f, \"fwd_bwd_ms\": %.4f, \"fwd_tflops\": %.2f, "
                        "\"fwd_bwd_tflops\": %.2f, \"bwd_tflops\": %.2f}, "
                        "\"speedup_fwd\": %.3f, \"speedup_fwd_bwd\": %.3f}\n",
                    s->B, s->T, s->H, s->KVH, s->hd, e[0], e[1], e[2], e[3], e[4], fwd_ms[0],
                    all_ms[0], tf[0][0], tf[0][1], tf[0][2], fwd_ms[1], all_ms[1], tf[1][0],
                    tf[1][1], tf[1][2], fwd_ms[1] / fwd_ms[0], all_ms[1] / all_ms[0]);
        s_case_free(&c);
    }
    if (jf && fclose(jf) != 0) {
        fprintf(stderr, "bench_flash: --json %s: %s\n", json, strerror(errno));
        rc = 1;
    }
    return rc;
}
