/* bench_nccl: the bus bandwidth of gpu/nccl.h's all-to-all (variable counts, grouped
 * ncclSend / ncclRecv) and bucketed all-reduce against NCCL's own collectives on the same
 * communicator, stream and buffers (ncclAlltoAll with equal counts, ncclAllReduce on one
 * contiguous buffer): NCCL's ceiling at each size, measured in the same run. One thread per
 * GPU of the machine (or --gpus N). Sizes are those a training step sends: the all-to-all's
 * bytes per rank (a Mixtral-shape dispatch of 8192 tokens per GPU is 8192 x 2 x 4096 x 2 =
 * 128 MiB), the all-reduce's the dense gradients of issue 5's 2.3 B model (~215 M fp32 = 860
 * MB) as tensors of mixed sizes in 32 MiB buckets. Per size: 3 warm-ups, the median of 10 (CUDA
 * events on the caller's stream, every rank in lockstep; rank 0's times), bus bandwidth as
 * nccl-tests counts it (all-to-all: bytes (n-1)/n / t; all-reduce: bytes 2 (n-1)/n / t).
 * Then the all-to-all beside the all-reduce: 128 MiB of rows enqueued right after 256 MiB of
 * gradients went to the background lane (gpu_nccl_allreduce_buckets_bg), as a layer's rows in
 * backward follow the previous layer's gradients; timed to the all-to-all's end (the caller's
 * stream does not wait for the lane), against each alone. On one stream it would take both
 * times added up.
 * One JSON line per (collective, size), and --json FILE. --only alltoall|allreduce --mib N: that
 * collective alone at that size (bench/gpu-scale.sh times a step's gradients so, the
 * communication a step would spend without overlap). */
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/moe_layer.h"
#include "gpu/nccl.h"
#include "gpu/ops.h"

#define S_MAXW 8
#define S_WARM 3
#define S_ITERS 10
#define S_TIMEOUT 60000

static size_t s_a2a_mib[] = {4, 32, 128, 512};
static size_t s_ar_mib[] = {32, 256, 860};
static size_t s_n_a2a = 4, s_n_ar = 3;
static bool s_beside_too = true;

static int s_world;
static uint8_t s_id[GPU_NCCL_ID_BYTES];
static pthread_barrier_t s_bar;
static FILE *s_json;

typedef struct {
    int rank, failed;
} s_rank_t;

static int s_cmp(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

typedef struct {
    int (*fn)(void *);
    void *ctx;
    int failed;
} s_call_t;

static void s_call(void *p)
{
    s_call_t *k = p;
    k->failed |= k->fn(k->ctx);
}

/* Median ms of fn over S_ITERS after S_WARM, every rank starting each together; on the caller's
 * stream, which gpu/nccl.h orders after the collective (gpu_moe_time_ms waits for it). */
static float s_time(int (*fn)(void *), void *ctx, gpu_nccl_t *c)
{
    float ts[S_ITERS];
    s_call_t k = {fn, ctx, 0};
    for (int i = 0; i < S_WARM + S_ITERS; i++) {
        pthread_barrier_wait(&s_bar);
        float ms = gpu_moe_time_ms(s_call, &k);
        if (k.failed || gpu_nccl_wait(c, S_TIMEOUT) != SEMOE_OK)
            return -1.0f;
        if (i >= S_WARM)
            ts[i - S_WARM] = ms;
    }
    qsort(ts, S_ITERS, sizeof ts[0], s_cmp);
    return ts[S_ITERS / 2];
}

typedef struct {
    gpu_nccl_t *c;
    uint8_t *send, *recv;
    size_t per; /* bytes to each rank */
    size_t sb[S_MAXW], so[S_MAXW];
    float **bufs;
    size_t *lens;
    int ntens;
    float *flat;
    size_t nflat;
} s_ctx_t;

static int s_ours_a2a(void *p)
{
    s_ctx_t *x = p;
    return gpu_nccl_alltoallv(x->c, x->send, x->sb, x->so, x->recv, x->sb, x->so) != SEMOE_OK;
}

static int s_nccl_a2a(void *p)
{
    s_ctx_t *x = p;
    return gpu_nccl_ref_alltoall(x->c, x->send, x->recv, x->per) != SEMOE_OK;
}

static int s_ours_ar(void *p)
{
    s_ctx_t *x = p;
    return gpu_nccl_allreduce_buckets(x->c, x->bufs, x->lens, x->ntens, 0) != SEMOE_OK;
}

static int s_nccl_ar(void *p)
{
    s_ctx_t *x = p;
    return gpu_nccl_ref_allreduce(x->c, x->flat, x->nflat) != SEMOE_OK;
}

/* the gradients in the background, then the rows: the stream waits for the rows only */
static int s_beside(void *p)
{
    s_ctx_t *x = p;
    return gpu_nccl_allreduce_buckets_bg(x->c, x->bufs, x->lens, x->ntens, 0) != SEMOE_OK ||
           s_ours_a2a(p);
}

static void s_report(const char *coll, const char *impl, size_t bytes, float ms, double factor)
{
    double bus = ms > 0 ? bytes * factor / (ms * 1e6) : 0.0;
    char line[256];
    snprintf(line, sizeof line,
             "{\"coll\": \"%s\", \"impl\": \"%s\", \"gpus\": %d, \"bytes\": %zu, \"ms\": %.3f, "
             "\"busbw_gbs\": %.1f}", coll, impl, s_world, bytes, ms, bus);
    puts(line);
    fflush(stdout);
    if (s_json)
        fprintf(s_json, "%s\n", line);
}

/* The all-to-all's buffers: `bytes` in all, as much to every rank. */
static void s_rows(s_ctx_t *x, size_t bytes)
{
    x->per = bytes / s_world;
    x->send = gpu_alloc(x->per * s_world);
    x->recv = gpu_alloc(x->per * s_world);
    gpu_zero(x->send, x->per * s_world);
    for (int r = 0; r < s_world; r++)
        x->sb[r] = x->per, x->so[r] = r * x->per;
}

static void s_rows_free(s_ctx_t *x)
{
    gpu_free(x->send);
    gpu_free(x->recv);
}

/* The dense gradients, `total` fp32: one slab in pieces of a transformer's tensor sizes, every
 * fifth tensor elsewhere (packed into a bucket), as a trainer's would be. */
static void s_grads(s_ctx_t *x, size_t total)
{
    const size_t sizes[] = {2048 * 2048, 2048 * 512, 2048, 2048 * 512, 2048 * 2048, 2048};
    size_t cap = 4096, used = 0;
    x->lens = calloc(cap, sizeof *x->lens);
    x->bufs = calloc(cap, sizeof *x->bufs);
    x->ntens = 0;
    while (used < total && x->ntens < (int)cap) {
        size_t l = sizes[x->ntens % 6];
        l = l < total - used ? l : total - used;
        x->lens[x->ntens++] = l;
        used += l;
    }
    x->flat = gpu_alloc(total * sizeof(float));
    gpu_zero(x->flat, total * sizeof(float));
    size_t o = 0;
    for (int t = 0; t < x->ntens; o += x->lens[t++]) {
        x->bufs[t] = t % 5 == 4 ? gpu_alloc(x->lens[t] * sizeof(float)) : x->flat + o;
        if (t % 5 == 4)
            gpu_zero(x->bufs[t], x->lens[t] * sizeof(float));
    }
    x->nflat = total;
}

static void s_grads_free(s_ctx_t *x)
{
    for (int t = 0; t < x->ntens; t++)
        if (t % 5 == 4)
            gpu_free(x->bufs[t]);
    gpu_free(x->flat);
    free(x->lens);
    free(x->bufs);
}

static void *s_rank_main(void *arg)
{
    s_rank_t *R = arg;
    if (gpu_backend_init(R->rank) != SEMOE_OK) {
        fprintf(stderr, "rank %d: %s\n", R->rank, semoe_err_msg());
        exit(1);
    }
    if (R->rank == 0 && gpu_nccl_unique_id(s_id) != SEMOE_OK) {
        fprintf(stderr, "unique id: %s\n", semoe_err_msg());
        exit(1);
    }
    pthread_barrier_wait(&s_bar);
    s_ctx_t x = {0};
    if (gpu_nccl_new(s_id, R->rank, s_world, S_TIMEOUT, NULL, NULL, &x.c) != SEMOE_OK) {
        fprintf(stderr, "rank %d: %s\n", R->rank, semoe_err_msg());
        exit(1);
    }
    double n = s_world, fa = (n - 1) / n, fr = 2 * (n - 1) / n;
    for (size_t s = 0; s < s_n_a2a; s++) {
        s_rows(&x, s_a2a_mib[s] << 20);
        float ours = s_time(s_ours_a2a, &x, x.c), ref = s_time(s_nccl_a2a, &x, x.c);
        if (R->rank == 0) {
            s_report("alltoall", "nccl", x.per * s_world, ref, fa);
            s_report("alltoall", "semoe", x.per * s_world, ours, fa);
        }
        R->failed |= ours < 0 || ref < 0;
        s_rows_free(&x);
    }
    for (size_t s = 0; s < s_n_ar; s++) {
        size_t total = (s_ar_mib[s] << 20) / sizeof(float);
        s_grads(&x, total);
        float ours = s_time(s_ours_ar, &x, x.c), ref = s_time(s_nccl_ar, &x, x.c);
        if (R->rank == 0) {
            s_report("allreduce", "nccl", total * sizeof(float), ref, fr);
            s_report("allreduce", "semoe", total * sizeof(float), ours, fr);
        }
        R->failed |= ours < 0 || ref < 0;
        s_grads_free(&x);
    }
    if (!s_beside_too) {
        gpu_nccl_destroy(&x.c);
        return NULL;
    }
    s_rows(&x, (size_t)128 << 20);
    s_grads(&x, ((size_t)256 << 20) / sizeof(float));
    float a2a = s_time(s_ours_a2a, &x, x.c), ar = s_time(s_ours_ar, &x, x.c);
    float both = s_time(s_beside, &x, x.c);
    if (R->rank == 0) {
        char line[256];
        snprintf(line, sizeof line,
                 "{\"coll\": \"alltoall_beside_allreduce\", \"impl\": \"semoe\", \"gpus\": %d, "
                 "\"bytes\": %zu, \"allreduce_bytes\": %zu, \"ms\": %.3f, \"alone_ms\": %.3f, "
                 "\"allreduce_ms\": %.3f}", s_world, x.per * s_world, x.nflat * sizeof(float),
                 both, a2a, ar);
        puts(line);
        if (s_json)
            fprintf(s_json, "%s\n", line);
    }
    R->failed |= a2a < 0 || ar < 0 || both < 0;
    s_rows_free(&x);
    s_grads_free(&x);
    gpu_nccl_destroy(&x.c);
    return NULL;
}

int main(int argc, char **argv)
{
    int want = 0;
    const char *only = NULL;
    long mib = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--gpus") && i + 1 < argc)
            want = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc)
            only = argv[++i];
        else if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            mib = atol(argv[++i]);
        else if (!strcmp(argv[i], "--json") && i + 1 < argc) {
            if (!(s_json = fopen(argv[++i], "w"))) {
                perror(argv[i]);
                return 1;
            }
        } else {
            fprintf(stderr, "usage: bench_nccl [--gpus N] [--json FILE] "
                            "[--only alltoall|allreduce --mib N]\n");
            return 2;
        }
    }
    if (only) {
        bool a2a = !strcmp(only, "alltoall");
        if ((!a2a && strcmp(only, "allreduce")) || mib < 1 || mib > (1L << 20)) {
            fprintf(stderr, "bench_nccl: --only alltoall|allreduce with --mib 1..%ld\n",
                    1L << 20);
            return 2;
        }
        s_n_a2a = a2a ? 1 : 0;
        s_n_ar = a2a ? 0 : 1;
        s_a2a_mib[0] = s_ar_mib[0] = (size_t)mib;
        s_beside_too = false;
    }
    int n = gpu_device_count();
    s_world = want > 0 && want < n ? want : n;
    if (s_world > S_MAXW)
        s_world = S_MAXW;
    if (s_world < 2) {
        fprintf(stderr, "bench_nccl: %d CUDA device(s): need 2 or more\n", n);
        return 1;
    }
    pthread_barrier_init(&s_bar, NULL, (unsigned)s_world);
    pthread_t th[S_MAXW];
    s_rank_t R[S_MAXW];
    for (int r = 0; r < s_world; r++) {
        R[r] = (s_rank_t){.rank = r};
        pthread_create(&th[r], NULL, s_rank_main, &R[r]);
    }
    int failed = 0;
    for (int r = 0; r < s_world; r++) {
        pthread_join(th[r], NULL);
        failed |= R[r].failed;
    }
    if (s_json)
        fclose(s_json);
    return failed;
}
