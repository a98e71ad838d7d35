/* bench_moe_layer: the bf16 MoE layer of gpu/moe_layer.h, forward + backward on one GPU, on the
 * shapes of ../shared/peers/moe_layer_torch.py with its inputs, loss and timing, against a dense
 * cuBLAS bf16 GEMM measured in the same run; --dump writes a small shape's inputs, output and
 * gradients for bench/moe_check.py. bench/README.md says what it measures. */
#include "gpu/moe_layer.h"
#include "gpu/ops.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#define S_WARM 3
#define S_ITERS 10

typedef struct {
    int T, d, f, E, k;
    const char *name;
} s_shape_t;

/* The peer's shapes, in its order. */
static const s_shape_t s_shapes[] = {
    {16384, 4096, 14336, 8, 2, "mixtral"},
    {16384, 2048, 1408, 64, 6, "deepseek"},
    {8192, 1024, 2816, 16, 2, "small"},
};
/* Dumped for bench/moe_check.py: the small shape, and a reduced fine-grained one (64 experts,
 * top-6) so that the check covers many small groups too. */
static const s_shape_t s_dump_shapes[] = {
    {8192, 1024, 2816, 16, 2, "small"},
    {4096, 1024, 704, 64, 6, "fine"},
};

typedef struct {
    gpu_moe_t *moe;
    int T, d, f, E, k;
    uint16_t *x, *wg, *w13, *w2; /* inputs (gpu/moe_layer.h's layouts) */
    uint16_t *out, *dout, *dx, *dwg, *dw13, *dw2;
    gpu_moe_weights_t w;
    gpu_moe_grads_t gr;
    void **gp; /* gr's pointer arrays: dw1, dw3, dw2 (E each) */
} s_layer_t;

static void s_layer_init(s_layer_t *L, const s_shape_t *s, uint64_t seed)
{
    memset(L, 0, sizeof *L);
    L->T = s->T, L->d = s->d, L->f = s->f, L->E = s->E, L->k = s->k;
    size_t T = (size_t)s->T, d = (size_t)s->d, f = (size_t)s->f, E = (size_t)s->E;
    L->moe = gpu_moe_new(s->T, s->d, s->f, s->E, s->k);
    if (!L->moe)
        exit(1);
    L->x = gpu_alloc(T * d * 2);
    L->wg = gpu_alloc(d * E * 2);
    L->w13 = gpu_alloc(E * 2 * f * d * 2);
    L->w2 = gpu_alloc(E * f * d * 2);
    L->out = gpu_alloc(T * d * 2);
    L->dout = gpu_alloc(T * d * 2);
    L->dx = gpu_alloc(T * d * 2);
    L->dwg = gpu_alloc(d * E * 2);
    L->dw13 = gpu_alloc(E * 2 * f * d * 2);
    L->dw2 = gpu_alloc(E * f * d * 2);
    /* the peer's scales: x ~ N(0,1), wg, w1, w3 * d^-0.5, w2 * f^-0.5 */
    gpu_moe_fill_randn(L->x, T * d, 1.0f, seed + 1);
    gpu_moe_fill_randn(L->wg, d * E, 1.0f / sqrtf((float)d), seed + 2);
    gpu_moe_fill_randn(L->w13, E * 2 * f * d, 1.0f / sqrtf((float)d), seed + 3);
    gpu_moe_fill_randn(L->w2, E * f * d, 1.0f / sqrtf((float)f), seed + 5);
    gpu_moe_sync();
    L->w = (gpu_moe_weights_t){.wg = L->wg, .w13 = L->w13, .w2 = L->w2};
    L->gp = calloc(3 * E, sizeof *L->gp);
    if (!L->gp)
        exit(1);
    for (size_t e = 0; e < E; e++) { /* W1 and W3 adjacent: one dW13 GEMM */
        L->gp[e] = L->dw13 + e * 2 * f * d;
        L->gp[E + e] = L->dw13 + e * 2 * f * d + f * d;
        L->gp[2 * E + e] = L->dw2 + e * f * d;
    }
    L->gr = (gpu_moe_grads_t){.fp32 = 0, .dwg = L->dwg, .dw1 = L->gp, .dw3 = L->gp + E,
                              .dw2 = L->gp + 2 * E};
}

static void s_layer_free(s_layer_t *L)
{
    gpu_moe_destroy(&L->moe);
    uint16_t **ps[] = {&L->x,  &L->wg,  &L->w13,  &L->w2,  &L->out, &L->dout,
                       &L->dx, &L->dwg, &L->dw13, &L->dw2};
    free(L->gp);
    L->gp = NULL;
    for (size_t i = 0; i < sizeof ps / sizeof ps[0]; i++) {
        gpu_free(*ps[i]);
        *ps[i] = NULL;
    }
}

/* One training step of the layer as the peer times it: route, permute, experts, combine, the
 * loss gradient d mean(out^2) / d out = 2 out / (T d), and the whole backward. */
static void s_step(void *ctx)
{
    s_layer_t *L = ctx;
    size_t n = (size_t)L->T * L->d;
    gpu_moe_fwd(L->moe, &L->w, L->x, L->out, NULL, NULL);
    gpu_moe_scale(L->dout, L->out, n, 2.0f / (float)n);
    gpu_moe_bwd(L->moe, &L->w, L->x, L->dout, NULL, L->dx, &L->gr);
}

static int s_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static float s_median_ms(s_layer_t *L)
{
    return gpu_moe_median_ms(s_step, L, S_WARM, S_ITERS);
}

/* --hold S: steps back to back for S seconds after the timed ones (each timed alone, as
 * gpu_moe_median_ms does), so that the GPU settles at what it sustains; the median over the
 * second half, and the wall-clock window (Unix ms) for matching a clock and power log. */
static void s_hold(s_layer_t *L, const s_shape_t *sh, const char *path, double seconds, FILE *jf)
{
    size_t cap = 4096, n = 0;
    float *ts = malloc(cap * sizeof *ts);
    if (!ts)
        exit(1);
    struct timespec t0, t;
    clock_gettime(CLOCK_REALTIME, &t0);
    double el = 0.0, mid_ms = 0.0;
    while (el < seconds && n < cap) {
        ts[n++] = gpu_moe_time_ms(s_step, L);
        clock_gettime(CLOCK_REALTIME, &t);
        el = (double)(t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) * 1e-9;
        if (!mid_ms && el >= seconds / 2)
            mid_ms = t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
    }
    size_t h = n / 2;
    qsort(ts + h, n - h, sizeof(float), s_cmp_float);
    char line[512];
    snprintf(line, sizeof line, "{\"impl\": \"semoe_hold\", \"gemm\": \"%s\", \"shape\": \"%s\", "
             "\"seconds\": %.1f, \"steps\": %zu, \"ms\": %.3f, \"from_unix_ms\": %.0f, "
             "\"to_unix_ms\": %.0f}", path, sh->name, el, n, ts[h + (n - h) / 2], mid_ms,
             t.tv_sec * 1e3 + t.tv_nsec * 1e-6);
    puts(line);
    if (jf)
        fprintf(jf, "%s\n", line);
    fflush(stdout);
    free(ts);
}

static const char *s_gemm_name(gpu_moe_gemm_t g)
{
    return g == GPU_MOE_GEMM_GROUPED ? "grouped"
           : g == GPU_MOE_GEMM_LOOP  ? "loop"
           : g == GPU_MOE_GEMM_FUSED ? "fused"
                                     : "streams";
}

#define S_PHASE_ITERS 5

/* The median over S_PHASE_ITERS steps of each phase's ms (gpu_moe_set_phases), as one JSON
 * line: where the non-GEMM time of a step goes. Runs after the timed steps, not during them. */
static void s_phases(s_layer_t *L, const s_shape_t *sh, gpu_moe_gemm_t used, FILE *jf)
{
    float ph[S_PHASE_ITERS][GPU_MOE_NPHASES], col[S_PHASE_ITERS];
    gpu_moe_set_phases(L->moe, 1);
    for (int i = 0; i < S_PHASE_ITERS; i++) {
        s_step(L);
        if (gpu_moe_phase_ms(L->moe, ph[i]) != 0)
            memset(ph[i], 0, sizeof ph[i]);
    }
    gpu_moe_set_phases(L->moe, 0);
    char line[2048];
    int n = snprintf(line, sizeof line, "{\"impl\": \"semoe_phases\", \"gemm\": \"%s\", "
                     "\"shape\": \"%s\", \"ms\": {", s_gemm_name(used), sh->name);
    double total = 0.0;
    for (int p = 0; p < GPU_MOE_NPHASES && n > 0 && (size_t)n < sizeof line; p++) {
        for (int i = 0; i < S_PHASE_ITERS; i++)
            col[i] = ph[i][p];
        qsort(col, S_PHASE_ITERS, sizeof(float), s_cmp_float);
        total += col[S_PHASE_ITERS / 2];
        n += snprintf(line + n, sizeof line - (size_t)n, "%s\"%s\": %.3f", p ? ", " : "",
                      gpu_moe_phase_name(p), col[S_PHASE_ITERS / 2]);
    }
    if (n > 0 && (size_t)n < sizeof line)
        snprintf(line + n, sizeof line - (size_t)n, "}, \"sum_ms\": %.3f}", total);
    puts(line);
    if (jf)
        fprintf(jf, "%s\n", line);
    fflush(stdout);
}

static int s_mkdir(const char *dir)
{
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "bench_moe_layer: mkdir %s: %s\n", dir, strerror(errno));
        return -1;
    }
    return 0;
}

/* Copies n bytes of device memory to DIR/NAME. */
static int s_write(const char *dir, const char *name, const void *dev, size_t n)
{
    char path[1200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    void *h = malloc(n ? n : 1);
    if (!h) {
        fprintf(stderr, "bench_moe_layer: out of host memory (%zu bytes for %s)\n", n, path);
        return -1;
    }
    gpu_to_host(h, dev, n);
    FILE *fp = fopen(path, "wb");
    int rc = fp && fwrite(h, 1, n, fp) == n ? 0 : -1;
    if (fp && fclose(fp) != 0)
        rc = -1;
    if (rc)
        fprintf(stderr, "bench_moe_layer: writing %s: %s\n", path, strerror(errno));
    free(h);
    return rc;
}

/* One step of shape s with path g, everything to DIR/<shape>-<gemm>/ as raw little-endian
 * bf16 (idx as int32) with a meta.json naming the files and shapes. */
static int s_dump(const char *dir, const s_shape_t *s, gpu_moe_gemm_t g)
{
    s_layer_t L;
    s_layer_init(&L, s, 1234);
    gpu_moe_set_gemm(L.moe, g);
    s_step(&L);
    gpu_moe_sync();
    char sub[1024];
    snprintf(sub, sizeof sub, "%s/%s-%s", dir, s->name, s_gemm_name(g));
    int rc = s_mkdir(dir) || s_mkdir(sub) ? -1 : 0;
    size_t T = (size_t)s->T, d = (size_t)s->d, f = (size_t)s->f, E = (size_t)s->E;
    struct {
        const char *name;
        const void *p;
        size_t bytes;
    } files[] = {
        {"x.bin", L.x, T * d * 2},           {"wg.bin", L.wg, d * E * 2},
        {"w13.bin", L.w13, E * 2 * f * d * 2}, {"w2.bin", L.w2, E * f * d * 2},
        {"out.bin", L.out, T * d * 2},       {"dx.bin", L.dx, T * d * 2},
        {"dwg.bin", L.dwg, d * E * 2},       {"dw13.bin", L.dw13, E * 2 * f * d * 2},
        {"dw2.bin", L.dw2, E * f * d * 2},   {"idx.bin", gpu_moe_idx(L.moe), T * s->k * 4},
    };
    for (size_t i = 0; !rc && i < sizeof files / sizeof files[0]; i++)
        rc = s_write(sub, files[i].name, files[i].p, files[i].bytes);
    if (!rc) {
        char path[1100];
        snprintf(path, sizeof path, "%s/meta.json", sub);
        FILE *fp = fopen(path, "w");
        if (!fp) {
            fprintf(stderr, "bench_moe_layer: %s: %s\n", path, strerror(errno));
            rc = -1;
        } else {
            fprintf(fp,
                    "{\"T\": %d, \"d\": %d, \"f\": %d, \"E\": %d, \"k\": %d, \"gemm\": \"%s\", "
                    "\"dtype\": \"bfloat16\", \"idx_dtype\": \"int32\", \"layout\": "
                    "\"row-major: x,out,dx (T,d); wg,dwg (E,d); w13,dw13 (E,2f,d) = [W1; W3] "
                    "(nn.Linear); w2,dw2 (E,d,f); idx (T,k)\"}\n",
                    s->T, s->d, s->f, s->E, s->k, s_gemm_name(gpu_moe_gemm(L.moe)));
            rc = fclose(fp) ? -1 : 0;
        }
    }
    if (!rc)
        printf("{\"dump\": \"%s\", \"T\": %d, \"d\": %d, \"f\": %d, \"E\": %d, \"k\": %d}\n", sub,
               s->T, s->d, s->f, s->E, s->k);
    s_layer_free(&L);
    return rc;
}

static void s_usage(void)
{
    fprintf(stderr, "usage: bench_moe_layer [--json FILE] [--dump DIR] "
                    "[--gemm grouped|loop|streams|fused|all]"
                    " [--shapes all|mixtral|deepseek|small] [--phases] [--hold SECONDS]\n");
}

int main(int argc, char **argv)
{
    const char *json = NULL, *dump = NULL, *gemm = "all", *shapes = "all", *hold = NULL;
    int phases = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--phases")) {
            phases = 1;
            continue;
        }
        const char **dst = !strcmp(a, "--json")     ? &json
                           : !strcmp(a, "--dump")   ? &dump
                           : !strcmp(a, "--gemm")   ? &gemm
                           : !strcmp(a, "--shapes") ? &shapes
                           : !strcmp(a, "--hold")   ? &hold
                                                    : NULL;
        if (!dst || i + 1 >= argc) {
            s_usage();
            return 2;
        }
        *dst = argv[++i];
    }
    gpu_moe_gemm_t modes[4];
    int nmodes = 0;
    if (!strcmp(gemm, "grouped") || !strcmp(gemm, "all"))
        modes[nmodes++] = GPU_MOE_GEMM_GROUPED;
    if (!strcmp(gemm, "loop") || !strcmp(gemm, "all"))
        modes[nmodes++] = GPU_MOE_GEMM_LOOP;
    if (!strcmp(gemm, "streams") || !strcmp(gemm, "all"))
        modes[nmodes++] = GPU_MOE_GEMM_STREAMS;
    if (!strcmp(gemm, "fused") || !strcmp(gemm, "all"))
        modes[nmodes++] = GPU_MOE_GEMM_FUSED;
    char *end = NULL;
    double hold_s = hold ? strtod(hold, &end) : 0.0;
    if (hold && (end == hold || *end || !(hold_s > 0.0 && hold_s <= 600.0))) {
        fprintf(stderr, "bench_moe_layer: --hold %s: need seconds in (0, 600]\n", hold);
        return 2;
    }
    int known = !strcmp(shapes, "all");
    for (size_t s = 0; s < sizeof s_shapes / sizeof s_shapes[0]; s++)
        known |= !strcmp(shapes, s_shapes[s].name);
    if (!nmodes || !known) {
        fprintf(stderr, "bench_moe_layer: --gemm %s --shapes %s: need grouped, loop, streams, "
                        "fused or all, and all, mixtral, deepseek or small\n", gemm, shapes);
        return 2;
    }
    FILE *jf = NULL;
    if (json && !(jf = fopen(json, "w"))) {
        fprintf(stderr, "bench_moe_layer: --json %s: %s\n", json, strerror(errno));
        return 1;
    }
    char line[1024];
    double peak = gpu_moe_dense_tflops(8192, 3, 20);
    snprintf(line, sizeof line, "{\"impl\": \"dense_gemm_8192\", \"tflops\": %.1f}", peak);
    puts(line);
    if (jf)
        fprintf(jf, "%s\n", line);
    fflush(stdout);

    int rc = 0;
    for (size_t s = 0; s < sizeof s_shapes / sizeof s_shapes[0]; s++) {
        const s_shape_t *sh = &s_shapes[s];
        if (strcmp(shapes, "all") && strcmp(sh->name, shapes))
            continue;
        s_layer_t L;
        s_layer_init(&L, sh, 42);
        for (int m = 0; m < nmodes; m++) {
            gpu_moe_set_gemm(L.moe, modes[m]);
            float ms = s_median_ms(&L);
            gpu_moe_gemm_t used = gpu_moe_gemm(L.moe);
            /* the peer's count: fwd + bwd (2x) for three GEMMs per (token, expert) */
            double flops = 3.0 * 2.0 * sh->T * sh->k * 3.0 * sh->d * sh->f;
            double tflops = flops / ((double)ms * 1e9);
            const int32_t *c = gpu_moe_counts(L.moe);
            int cmin = c[0], cmax = c[0];
            for (int e = 1; e < sh->E; e++) {
                cmin = c[e] < cmin ? c[e] : cmin;
                cmax = c[e] > cmax ? c[e] : cmax;
            }
            snprintf(line, sizeof line,
                     "{\"impl\": \"semoe\", \"gemm\": \"%s\", \"asked\": \"%s\", \"shape\": \"%s\", "
                     "\"T\": %d, \"d\": %d, \"f\": %d, \"E\": %d, \"k\": %d, \"ms\": %.3f, "
                     "\"tok_s\": %.0f, \"tflops\": %.1f, \"dense_tflops\": %.1f, "
                     "\"pct_dense\": %.1f, \"rows_min\": %d, \"rows_max\": %d}",
                     s_gemm_name(used), s_gemm_name(modes[m]), sh->name, sh->T, sh->d, sh->f,
                     sh->E, sh->k, ms, sh->T / (double)ms * 1e3, tflops, peak,
                     peak > 0 ? 100.0 * tflops / peak : 0.0, cmin, cmax);
            puts(line);
            if (jf)
                fprintf(jf, "%s\n", line);
            fflush(stdout);
            if (phases)
                s_phases(&L, sh, used, jf);
            if (hold_s > 0.0)
                s_hold(&L, sh, s_gemm_name(used), hold_s, jf);
        }
        s_layer_free(&L);
    }
    if (dump)
        for (size_t s = 0; s < sizeof s_dump_shapes / sizeof s_dump_shapes[0]; s++)
            for (int m = 0; m < nmodes; m++)
                if (s_dump(dump, &s_dump_shapes[s], modes[m]))
                    rc = 1;
    if (jf && fclose(jf) != 0) {
        fprintf(stderr, "bench_moe_layer: --json %s: %s\n", json, strerror(errno));
        rc = 1;
    }
    return rc;
}
