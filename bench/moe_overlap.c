/* bench_moe_overlap: how much of the expert all-to-all the bf16 MoE layer's chunks
 * (gpu_moe_exchange_t.parts, train.a2a_chunks) hide behind its expert GEMMs, on one GPU,
 * through an emulated link (gpu_moe_link_t: each dispatch and combine copies the rows on a
 * stream of its own and keeps it busy for the time the remote share of them would take at the
 * given bandwidth, the host waiting as the NCCL path does). Per shape of the PyTorch peers'
 * table and per number of parts, forward + backward (fp32 weight gradients), medians of CUDA
 * event times:
 *   t_local  the layer without an exchange;
 *   t_copy   through the link with the copies alone (the schedule's own cost: sorting per
 *            part, smaller GEMMs, the host's waits);
 *   t_link   through the link at --gbps (default 331, NCCL's all-to-all bus bandwidth on two
 *            H200s) with --remote of the rows leaving (default 0.5: two ranks, even routing);
 *   comm     the link's busy time per step at --gbps less that with the copies alone (the
 *            emulated transfers' own time);
 *   hidden   1 - (t_link - t_copy) / comm: the share of it the schedule hides.
 * --no-host-wait: the host does not wait for each transfer (the streams alone order them),
 * what the NCCL path would gain by bounding its waits per layer instead of per transfer.
 * Not a network: the schedule's overlap, measured; the hidden share over NCCL needs two
 * GPUs (bench/gpu-nccl.sh). JSON lines to --json. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/moe_layer.h"
#include "gpu/ops.h"

typedef struct {
    const char *name;
    int T, d, f, E, k;
} s_shape_t;

static const s_shape_t s_shapes[] = {
    {"mixtral", 16384, 4096, 14336, 8, 2},
    {"deepseek", 16384, 2048, 1408, 64, 6},
    {"small", 8192, 1024, 2816, 16, 2},
};

typedef struct {
    gpu_moe_t *m;
    gpu_moe_weights_t w;
    uint16_t *x, *out, *dout, *dx;
    void *p1[256], *p3[256], *p2[256];
    gpu_moe_grads_t gr;
    const gpu_moe_exchange_t *ex;
    int failed;
} s_ctx_t;

static void s_step(void *arg)
{
    s_ctx_t *c = arg;
    if (c->failed)
        return;
    if (gpu_moe_fwd_ex(c->m, &c->w, c->x, c->out, NULL, NULL, c->ex) != SEMOE_OK ||
        gpu_moe_bwd_ex(c->m, &c->w, c->x, c->dout, NULL, c->dx, &c->gr, c->ex) != SEMOE_OK) {
        fprintf(stderr, "bench_moe_overlap: %s\n", semoe_err_msg());
        c->failed = 1;
    }
}

/* The median step time through ex (NULL: none); *busy the link's time per step. */
static double s_time(s_ctx_t *c, const gpu_moe_exchange_t *ex, gpu_moe_link_t *l, int warm,
                     int iters, double *busy)
{
    c->ex = ex;
    if (l)
        gpu_moe_link_take_ms(l);
    double ms = gpu_moe_median_ms(s_step, c, warm, iters);
    if (busy)
        *busy = l ? gpu_moe_link_take_ms(l) / (warm + iters) : 0.0;
    return c->failed ? -1.0 : ms;
}

int main(int argc, char **argv)
{
    const char *json = NULL, *only = "all", *gemm = "auto";
    double gbps = 331.0, remote = 0.5;
    int warm = 2, iters = 7, host_wait = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--json") && i + 1 < argc)
            json = argv[++i];
        else if (!strcmp(argv[i], "--shapes") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--gbps") && i + 1 < argc)
            gbps = atof(argv[++i]);
        else if (!strcmp(argv[i], "--remote") && i + 1 < argc)
            remote = atof(argv[++i]);
        else if (!strcmp(argv[i], "--no-host-wait"))
            host_wait = 0;
        else if (!strcmp(argv[i], "--gemm") && i + 1 < argc)
            gemm = argv[++i];
        else {
            fprintf(stderr, "usage: bench_moe_overlap [--json FILE] [--shapes "
                            "all|mixtral|deepseek|small] [--gbps 331] [--remote 0.5] "
                            "[--no-host-wait] [--gemm auto|loop|grouped|streams|fused]\n");
            return 2;
        }
    }
    if (!(gbps > 0) || !(remote > 0 && remote <= 1)) {
        fprintf(stderr, "bench_moe_overlap: --gbps > 0 and --remote in (0, 1]\n");
        return 2;
    }
    if (gpu_device_count() == 0 || gpu_backend_init(0) != SEMOE_OK) {
        fprintf(stderr, "bench_moe_overlap: no CUDA device: %s\n", semoe_err_msg());
        return 1;
    }
    FILE *jf = json ? fopen(json, "w") : NULL;
    printf("| shape | parts | t_local ms | t_copy ms | t_link ms | comm ms | hidden | "
           "t_link / t_local |\n|---|---|---|---|---|---|---|---|\n");
    for (size_t si = 0; si < sizeof s_shapes / sizeof s_shapes[0]; si++) {
        const s_shape_t *s = &s_shapes[si];
        if (strcmp(only, "all") && strcmp(only, s->name))
            continue;
        size_t T = (size_t)s->T, d = (size_t)s->d, f = (size_t)s->f, E = (size_t)s->E;
        s_ctx_t c;
        memset(&c, 0, sizeof c);
        c.m = gpu_moe_new_ep(s->T, s->d, s->f, s->E, s->k, s->T * s->k);
        if (!c.m)
            return 1;
        static const char *const paths[] = {"grouped", "loop", "streams", "fused"};
        for (int g = 0; g < 4; g++)
            if (!strcmp(gemm, paths[g]))
                gpu_moe_set_gemm(c.m, (gpu_moe_gemm_t)g);
        uint16_t *wg = gpu_alloc(E * d * 2), *w13 = gpu_alloc(E * 2 * f * d * 2);
        uint16_t *w2 = gpu_alloc(E * d * f * 2);
        c.x = gpu_alloc(T * d * 2), c.out = gpu_alloc(T * d * 2);
        c.dout = gpu_alloc(T * d * 2), c.dx = gpu_alloc(T * d * 2);
        gpu_moe_fill_randn(wg, E * d, 0.02f, 1);
        gpu_moe_fill_randn(w13, E * 2 * f * d, 0.02f, 2);
        gpu_moe_fill_randn(w2, E * d * f, 0.02f, 3);
        gpu_moe_fill_randn(c.x, T * d, 1.0f, 4);
        gpu_moe_fill_randn(c.dout, T * d, 1e-3f, 5);
        float *dwg = gpu_alloc(E * d * 4), *dw13 = gpu_alloc(E * 2 * f * d * 4);
        float *dw2 = gpu_alloc(E * d * f * 4);
        for (size_t e = 0; e < E; e++) {
            c.p1[e] = dw13 + e * 2 * f * d;
            c.p3[e] = dw13 + e * 2 * f * d + f * d;
            c.p2[e] = dw2 + e * d * f;
        }
        c.w = (gpu_moe_weights_t){.wg = wg, .w13 = w13, .w2 = w2};
        c.gr = (gpu_moe_grads_t){.fp32 = 1, .dwg = dwg, .dw1 = c.p1, .dw3 = c.p3, .dw2 = c.p2};
        double t_local = s_time(&c, NULL, NULL, warm, iters, NULL);
        for (int parts = 1; parts <= 4; parts *= 2) {
            gpu_moe_link_t *l0 = gpu_moe_link_new(s->E, s->d, 0.0, remote, host_wait);
            gpu_moe_link_t *lb = gpu_moe_link_new(s->E, s->d, gbps, remote, host_wait);
            gpu_moe_exchange_t x0 = gpu_moe_link_exchange(l0, parts);
            gpu_moe_exchange_t xb = gpu_moe_link_exchange(lb, parts);
            double b0 = 0, bb = 0;
            double t_copy = s_time(&c, &x0, l0, warm, iters, &b0);
            double t_link = s_time(&c, &xb, lb, warm, iters, &bb);
            double comm = bb - b0, hidden = comm > 0 ? 1.0 - (t_link - t_copy) / comm : 0.0;
            printf("| %s%s%s%s | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.3f |\n", s->name,
                   host_wait ? "" : " (no host wait)", strcmp(gemm, "auto") ? " " : "",
                   strcmp(gemm, "auto") ? gemm : "", parts, t_local, t_copy, t_link, comm, hidden, t_link / t_local);
            if (jf)
                fprintf(jf, "{\"shape\": \"%s\", \"T\": %d, \"d\": %d, \"f\": %d, \"E\": %d, "
                            "\"k\": %d, \"parts\": %d, \"gbps\": %g, \"remote\": %g, "
                            "\"t_local_ms\": %.3f, \"t_copy_ms\": %.3f, \"t_link_ms\": %.3f, "
                            "\"comm_ms\": %.3f, \"hidden\": %.4f, \"host_wait\": %d, "
                            "\"gemm\": \"%s\"}\n",
                        s->name, s->T, s->d, s->f, s->E, s->k, parts, gbps, remote, t_local,
                        t_copy, t_link, comm, hidden, host_wait, gemm);
            gpu_moe_link_destroy(&l0);
            gpu_moe_link_destroy(&lb);
        }
        if (c.failed)
            return 1;
        gpu_moe_destroy(&c.m);
        void *bufs[] = {wg, w13, w2, c.x, c.out, c.dout, c.dx, dwg, dw13, dw2};
        for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
            gpu_free(bufs[i]);
    }
    if (jf)
        fclose(jf);
    return 0;
}
