/* gpu/gemm_tuned.h: cuBLASLt GEMMs with the algorithm chosen by timing. A shape's first call
 * asks cuBLASLt's heuristic for up to CANDIDATES algorithms, times each and cublasGemmEx twice
 * (forward, then backward, keeping each one's best), and caches the winner: a cuBLASLt algorithm
 * only where it beats cublasGemmEx by more than the timing noise (NOISE), cublasGemmEx
 * otherwise, so that tuning never picks worse than cuBLAS's own choice by more than the noise. */
#include "gpu/gemm_tuned.h"
#include "gpu/cublas.h"
#include "gpu/stream.h"

#include <cublasLt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

namespace {

constexpr size_t WS_BYTES = (size_t)32 << 20; /* cuBLASLt's workspace, per stream */
constexpr int CANDIDATES = 24, MAX_SHAPES = 1024;
constexpr float NOISE = 0.005f;  /* a candidate must be this much faster than cublasGemmEx */
constexpr float TIME_MS = 2.0f;  /* per candidate and pass: repeats to fill this much */

/* One call's arguments. */
struct call_t {
    cublasOperation_t ta, tb;
    int m, n, k;
    const void *A;
    int lda;
    const void *B;
    int ldb;
    float beta;
    void *C;
    cudaDataType_t ct;
    int ldc;
};

/* A cache key: the call's shape with m, n and k bucketed (s_bucket). */
struct key_t {
    int dev, ta, tb, m, n, k, lda, ldb, ldc, ct, beta0;
};

struct entry_t {
    key_t key;
    bool lt; /* false: cublasGemmEx */
    cublasLtMatmulAlgo_t algo;
};

struct desc_t {
    cublasLtMatmulDesc_t op;
    cublasLtMatrixLayout_t a, b, c;
};

pthread_mutex_t s_lock = PTHREAD_MUTEX_INITIALIZER;
entry_t s_cache[MAX_SHAPES];
int s_ncache, s_nshapes, s_npicks;
int s_on = -1; /* tuning: -1 from SEMOE_GEMM_TUNE on first use */
double s_saved_ms;

/* x rounded up to a multiple of 1/16 of the power of two at or above it (at least 64). */
int s_bucket(int x)
{
    int p = 64;
    while (p < x && p < (1 << 30))
        p <<= 1;
    int g = p / 16 < 64 ? 64 : p / 16;
    return (x + g - 1) / g * g;
}

bool s_env(const char *name, bool dflt)
{
    const char *v = getenv(name);
    return v && *v ? strcmp(v, "0") != 0 : dflt;
}

void s_desc_free(desc_t *d)
{
    if (d->a)
        cublasLtMatrixLayoutDestroy(d->a);
    if (d->b)
        cublasLtMatrixLayoutDestroy(d->b);
    if (d->c)
        cublasLtMatrixLayoutDestroy(d->c);
    if (d->op)
        cublasLtMatmulDescDestroy(d->op);
    memset(d, 0, sizeof *d);
}

/* The descriptors of call c (D = C, same layout); false where cuBLASLt refuses them. */
bool s_desc(desc_t *d, const call_t *c)
{
    memset(d, 0, sizeof *d);
    bool ta = c->ta != CUBLAS_OP_N, tb = c->tb != CUBLAS_OP_N;
    bool ok = cublasLtMatmulDescCreate(&d->op, CUBLAS_COMPUTE_32F, CUDA_R_32F) ==
                  CUBLAS_STATUS_SUCCESS &&
              cublasLtMatmulDescSetAttribute(d->op, CUBLASLT_MATMUL_DESC_TRANSA, &c->ta,
                                             sizeof c->ta) == CUBLAS_STATUS_SUCCESS &&
              cublasLtMatmulDescSetAttribute(d->op, CUBLASLT_MATMUL_DESC_TRANSB, &c->tb,
                                             sizeof c->tb) == CUBLAS_STATUS_SUCCESS &&
              cublasLtMatrixLayoutCreate(&d->a, CUDA_R_16BF, ta ? c->k : c->m,
                                         ta ? c->m : c->k, c->lda) == CUBLAS_STATUS_SUCCESS &&
              cublasLtMatrixLayoutCreate(&d->b, CUDA_R_16BF, tb ? c->n : c->k,
                                         tb ? c->k : c->n, c->ldb) == CUBLAS_STATUS_SUCCESS &&
              cublasLtMatrixLayoutCreate(&d->c, c->ct, c->m, c->n, c->ldc) ==
                  CUBLAS_STATUS_SUCCESS;
    if (!ok)
        s_desc_free(d);
    return ok;
}

} // namespace

struct gpu_lt {
    cublasHandle_t hb;
    cublasLtHandle_t h;
    cudaStream_t st;
    void *ws;
    int dev;
    cudaEvent_t ev[2];
};

namespace {

cublasStatus_t s_ex(gpu_lt_t *lt, const call_t *c, void *C)
{
    const float alpha = 1.0f;
    return cublasGemmEx(lt->hb, c->ta, c->tb, c->m, c->n, c->k, &alpha, c->A, CUDA_R_16BF, c->lda,
                        c->B, CUDA_R_16BF, c->ldb, &c->beta, C, c->ct, c->ldc,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t s_lt(gpu_lt_t *lt, const call_t *c, const desc_t *d,
                    const cublasLtMatmulAlgo_t *algo, void *C)
{
    const float alpha = 1.0f;
    return cublasLtMatmul(lt->h, d->op, &alpha, c->A, d->a, c->B, d->b, &c->beta, C, d->c, C,
                          d->c, algo, lt->ws, WS_BYTES, lt->st);
}

/* ms per run of algo (NULL: cublasGemmEx) writing into C, over repeats filling about TIME_MS
 * after one untimed run; < 0 when it fails to launch. */
float s_time(gpu_lt_t *lt, const call_t *c, const desc_t *d, const cublasLtMatmulAlgo_t *algo,
             void *C)
{
    auto run = [&]() { return algo ? s_lt(lt, c, d, algo, C) : s_ex(lt, c, C); };
    if (run() != CUBLAS_STATUS_SUCCESS)
        return -1.0f;
    float one = 0.0f, ms = 0.0f;
    GPU_CHECK(cudaEventRecord(lt->ev[0], lt->st));
    run();
    GPU_CHECK(cudaEventRecord(lt->ev[1], lt->st));
    GPU_CHECK(cudaEventSynchronize(lt->ev[1]));
    GPU_CHECK(cudaEventElapsedTime(&one, lt->ev[0], lt->ev[1]));
    int reps = one > 0.0f ? (int)(TIME_MS / one) : 20;
    reps = reps < 2 ? 2 : reps > 20 ? 20 : reps;
    GPU_CHECK(cudaEventRecord(lt->ev[0], lt->st));
    for (int r = 0; r < reps; r++)
        run();
    GPU_CHECK(cudaEventRecord(lt->ev[1], lt->st));
    GPU_CHECK(cudaEventSynchronize(lt->ev[1]));
    GPU_CHECK(cudaEventElapsedTime(&ms, lt->ev[0], lt->ev[1]));
    return ms / reps;
}

void s_log(const call_t *c, int ncand, float ex_ms, float best_ms, const entry_t *e)
{
    uint32_t tile = 0, stages = 0, swz = 0;
    uint16_t cluster = 0;
    int32_t id = -1, splitk = 1;
    if (e->lt) {
        const cublasLtMatmulAlgo_t *a = &e->algo;
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_ID, &id, sizeof id, NULL);
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_TILE_ID, &tile, sizeof tile,
                                             NULL);
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_STAGES_ID, &stages,
                                             sizeof stages, NULL);
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_CLUSTER_SHAPE_ID, &cluster,
                                             sizeof cluster, NULL);
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splitk,
                                             sizeof splitk, NULL);
        cublasLtMatmulAlgoConfigGetAttribute(a, CUBLASLT_ALGO_CONFIG_CTA_SWIZZLING, &swz,
                                             sizeof swz, NULL);
    }
    fprintf(stderr,
            "semoe gemm tune: %c%c m %d n %d k %d C %s beta %g: cublasGemmEx %.4f ms, %d "
            "cuBLASLt candidates, best %.4f ms; using %s",
            c->ta == CUBLAS_OP_N ? 'N' : 'T', c->tb == CUBLAS_OP_N ? 'N' : 'T', c->m, c->n, c->k,
            c->ct == CUDA_R_32F ? "fp32" : "bf16", c->beta, ex_ms, ncand, best_ms,
            e->lt ? "cuBLASLt" : "cublasGemmEx\n");
    if (e->lt)
        fprintf(stderr, " (algo %d, tile %u, stages %u, cluster %u, split-k %d, swizzle %u)\n",
                id, tile, stages, (unsigned)cluster, splitk, swz);
}

/* Measures call c (whose shape has no entry yet) into e. */
void s_tune(gpu_lt_t *lt, const call_t *c, entry_t *e)
{
    e->lt = false;
    desc_t d;
    if (!s_desc(&d, c))
        return;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t heur[CANDIDATES];
    int got = 0;
    size_t ws = WS_BYTES;
    if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws,
                                             sizeof ws) != CUBLAS_STATUS_SUCCESS ||
        cublasLtMatmulAlgoGetHeuristic(lt->h, d.op, d.a, d.b, d.c, d.c, pref, CANDIDATES, heur,
                                       &got) != CUBLAS_STATUS_SUCCESS)
        got = 0;
    if (pref)
        cublasLtMatmulPreferenceDestroy(pref);
    /* the timing runs write C: with beta 0 C itself (the real call overwrites it next on the
     * same stream), otherwise a scratch copy of C's extent, as C's contents are accumulated */
    void *out = c->C, *tmp = NULL;
    if (got > 0 && c->beta != 0.0f) {
        size_t bytes = ((size_t)c->ldc * (c->n - 1) + c->m) * (c->ct == CUDA_R_32F ? 4 : 2);
        if (cudaMalloc(&tmp, bytes) != cudaSuccess) {
            cudaGetLastError(); /* no room to measure: cublasGemmEx */
            got = 0;
        }
        out = tmp;
    }
    float best[CANDIDATES + 1];
    for (int i = 0; i <= got; i++)
        best[i] = -1.0f;
    for (int pass = 0; pass < 2 && got > 0; pass++)
        for (int j = 0; j <= got; j++) {
            int i = pass ? got - j : j; /* [got]: cublasGemmEx */
            float t = s_time(lt, c, &d, i < got && heur[i].state == CUBLAS_STATUS_SUCCESS
                                            ? &heur[i].algo : NULL, out);
            if (i < got && heur[i].state != CUBLAS_STATUS_SUCCESS)
                t = -1.0f;
            if (t > 0.0f && (best[i] < 0.0f || t < best[i]))
                best[i] = t;
        }
    if (tmp)
        GPU_CHECK(cudaFree(tmp));
    float ex = best[got], win = -1.0f;
    for (int i = 0; i < got; i++)
        if (best[i] > 0.0f && (win < 0.0f || best[i] < win)) {
            win = best[i];
            if (ex < 0.0f || best[i] < ex * (1.0f - NOISE)) {
                e->lt = true;
                e->algo = heur[i].algo;
            }
        }
    s_desc_free(&d);
    if (got > 0) {
        s_nshapes++;
        s_npicks += e->lt;
        if (e->lt && ex > 0.0f)
            s_saved_ms += ex - win;
        if (s_env("SEMOE_GEMM_TUNE_LOG", false))
            s_log(c, got, ex, win, e);
    }
}

/* c's cache entry, measured now if its bucket has none; NULL when the cache is full. */
const entry_t *s_entry(gpu_lt_t *lt, const call_t *c)
{
    const key_t k = {lt->dev,         (int)c->ta,      (int)c->tb, s_bucket(c->m), s_bucket(c->n),
         s_bucket(c->k),  c->lda,          c->ldb,     c->ldc,         (int)c->ct,
         c->beta == 0.0f};
    const entry_t *found = NULL;
    pthread_mutex_lock(&s_lock);
    for (int i = 0; i < s_ncache && !found; i++)
        if (!memcmp(&s_cache[i].key, &k, sizeof k))
            found = &s_cache[i];
    if (!found && s_ncache < MAX_SHAPES) {
        entry_t *e = &s_cache[s_ncache];
        e->key = k;
        s_tune(lt, c, e); /* under the lock: one thread measures a shape, the others wait */
        s_ncache++;
        found = e;
    }
    pthread_mutex_unlock(&s_lock);
    return found;
}

} // namespace

gpu_lt_t *gpu_lt_new(cublasHandle_t hb)
{
    gpu_lt_t *lt = (gpu_lt_t *)calloc(1, sizeof *lt);
    if (!lt) {
        fprintf(stderr, "semoe gpu_lt_new: out of host memory\n");
        abort();
    }
    lt->hb = hb;
    GPU_CUBLAS(cublasGetStream(hb, &lt->st));
    GPU_CHECK(cudaGetDevice(&lt->dev));
    GPU_CUBLAS(cublasLtCreate(&lt->h));
    GPU_CHECK(cudaMalloc(&lt->ws, WS_BYTES));
    GPU_CHECK(cudaEventCreate(&lt->ev[0]));
    GPU_CHECK(cudaEventCreate(&lt->ev[1]));
    return lt;
}

void gpu_lt_destroy(gpu_lt_t **ltp)
{
    if (!ltp || !*ltp)
        return;
    gpu_lt_t *lt = *ltp;
    cudaStreamSynchronize(lt->st); /* the workspace may still be in use */
    cudaFree(lt->ws);
    cudaEventDestroy(lt->ev[0]);
    cudaEventDestroy(lt->ev[1]);
    cublasLtDestroy(lt->h);
    free(lt);
    *ltp = NULL;
}

gpu_lt_t *gpu_lt_thread(void)
{
    static thread_local gpu_lt_t *per_dev[64];
    int dev = 0;
    GPU_CHECK(cudaGetDevice(&dev));
    if (dev < 0 || dev >= 64) {
        fprintf(stderr, "semoe gpu_lt_thread: device %d out of range\n", dev);
        abort();
    }
    if (!per_dev[dev])
        per_dev[dev] = gpu_lt_new(gpu_cublas());
    return per_dev[dev];
}

void gpu_lt_gemm(gpu_lt_t *lt, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                 const void *A, int lda, const void *B, int ldb, float beta, void *C,
                 cudaDataType_t ct, int ldc)
{
    if (s_on < 0)
        s_on = s_env("SEMOE_GEMM_TUNE", true);
    const call_t c = {ta, tb, m, n, k, A, lda, B, ldb, beta, C, ct, ldc};
    const entry_t *e = s_on && m > 0 && n > 0 && k > 0 ? s_entry(lt, &c) : NULL;
    if (e && e->lt) {
        desc_t d;
        if (s_desc(&d, &c)) {
            cublasStatus_t st = s_lt(lt, &c, &d, &e->algo, C);
            s_desc_free(&d);
            if (st == CUBLAS_STATUS_SUCCESS)
                return;
        }
        /* the bucket's algorithm does not take this member of it: cuBLAS's own choice */
    }
    GPU_CUBLAS(s_ex(lt, &c, C));
}

extern "C" void gpu_lt_gemm_c(char ta, char tb, int m, int n, int k, const uint16_t *A,
                              int lda, const uint16_t *B, int ldb, float beta, void *C, int c32,
                              int ldc)
{
    gpu_lt_gemm(gpu_lt_thread(), ta == 'T' ? CUBLAS_OP_T : CUBLAS_OP_N,
                tb == 'T' ? CUBLAS_OP_T : CUBLAS_OP_N, m, n, k, A, lda, B, ldb, beta, C,
                c32 ? CUDA_R_32F : CUDA_R_16BF, ldc);
}

extern "C" void gpu_lt_set_tuning(int on) { s_on = on != 0; }

extern "C" void gpu_lt_stats(int *shapes, int *lt_picks, double *saved_ms)
{
    pthread_mutex_lock(&s_lock);
    if (shapes)
        *shapes = s_nshapes;
    if (lt_picks)
        *lt_picks = s_npicks;
    if (saved_ms)
        *saved_ms = s_saved_ms;
    pthread_mutex_unlock(&s_lock);
}
