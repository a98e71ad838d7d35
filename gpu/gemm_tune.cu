/* gpu/gemm_tune.cuh: the shape cache, the timed choice among cuBLASLt's candidates and
 * cublasGemmEx, and the runs. */
#include "gpu/gemm_tune.cuh"
#include "gpu/cublas.h"
#include "gpu/stream.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_WORKSPACE ((size_t)64 << 20) /* bytes per stream */
#define S_CANDIDATES 8                 /* cuBLASLt heuristic results timed per shape */
#define S_REPS 3                       /* timed runs per candidate, after one warm */
#define S_SHAPES 256                   /* cached shapes; beyond, cublasGemmEx untimed */
#define S_BUCKETS 8                    /* n buckets per power of two (at least 128 wide) */

typedef struct {
    cublasOperation_t ta, tb;
    int m, nb, k, lda, ldb, ldc;
    cudaDataType_t ct;
    int acc;
} s_key_t;

typedef struct {
    s_key_t key;
    int gemm_ex; /* cublasGemmEx was the fastest */
    cublasLtMatmulAlgo_t algo;
    size_t ws; /* the algorithm's workspace */
} s_entry_t;

struct gpu_gemm_tuner {
    cublasLtHandle_t lt;
    int streams;
    void **ws; /* (streams) workspaces of S_WORKSPACE bytes */
    int n;
    s_entry_t e[S_SHAPES];
    cudaEvent_t t0, t1;
};

static s_key_t s_key(const gpu_gemm_t *g)
{
    s_key_t k;
    memset(&k, 0, sizeof k); /* compared with memcmp */
    k.ta = g->ta, k.tb = g->tb, k.m = g->m, k.k = g->k;
    int w = 128; /* the bucket's width: 128, or an eighth of the power of two below n */
    while (w * 2 * S_BUCKETS <= g->n)
        w *= 2;
    k.nb = (g->n + w - 1) / w * w;
    k.lda = g->lda, k.ldb = g->ldb, k.ldc = g->ldc, k.ct = g->ct, k.acc = g->beta != 0.0f;
    return k;
}

static const s_entry_t *s_find(const gpu_gemm_tuner_t *t, const s_key_t *k)
{
    for (int i = 0; i < t->n; i++)
        if (memcmp(&t->e[i].key, k, sizeof *k) == 0)
            return &t->e[i];
    return NULL;
}

gpu_gemm_tuner_t *gpu_gemm_tuner_new(int streams)
{
    gpu_gemm_tuner_t *t = (gpu_gemm_tuner_t *)calloc(1, sizeof *t);
    void **ws = (void **)calloc((size_t)streams, sizeof *ws);
    if (!t || !ws) {
        fprintf(stderr, "gpu_gemm_tuner_new: out of host memory\n");
        abort();
    }
    t->streams = streams;
    t->ws = ws;
    for (int i = 0; i < streams; i++)
        GPU_CHECK(cudaMalloc(&t->ws[i], S_WORKSPACE));
    GPU_CUBLAS(cublasLtCreate(&t->lt));
    GPU_CHECK(cudaEventCreate(&t->t0));
    GPU_CHECK(cudaEventCreate(&t->t1));
    return t;
}

void gpu_gemm_tuner_destroy(gpu_gemm_tuner_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    gpu_gemm_tuner_t *t = *self_p;
    for (int i = 0; i < t->streams; i++)
        cudaFree(t->ws[i]);
    free(t->ws);
    cublasLtDestroy(t->lt);
    cudaEventDestroy(t->t0);
    cudaEventDestroy(t->t1);
    free(t);
    *self_p = NULL;
}

/* g's descriptors, on the caller's stack (the opaque Init forms: no allocation). */
typedef struct {
    cublasLtMatmulDescOpaque_t op;
    cublasLtMatrixLayoutOpaque_t a, b, c;
} s_desc_t;

static void s_desc(s_desc_t *d, const gpu_gemm_t *g)
{
    GPU_CUBLAS(cublasLtMatmulDescInit(&d->op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    GPU_CUBLAS(cublasLtMatmulDescSetAttribute(&d->op, CUBLASLT_MATMUL_DESC_TRANSA, &g->ta,
                                              sizeof g->ta));
    GPU_CUBLAS(cublasLtMatmulDescSetAttribute(&d->op, CUBLASLT_MATMUL_DESC_TRANSB, &g->tb,
                                              sizeof g->tb));
    int ar = g->ta == CUBLAS_OP_N ? g->m : g->k, ac = g->ta == CUBLAS_OP_N ? g->k : g->m;
    int br = g->tb == CUBLAS_OP_N ? g->k : g->n, bc = g->tb == CUBLAS_OP_N ? g->n : g->k;
    GPU_CUBLAS(cublasLtMatrixLayoutInit(&d->a, CUDA_R_16BF, ar, ac, g->lda));
    GPU_CUBLAS(cublasLtMatrixLayoutInit(&d->b, CUDA_R_16BF, br, bc, g->ldb));
    GPU_CUBLAS(cublasLtMatrixLayoutInit(&d->c, g->ct, g->m, g->n, g->ldc));
}

static void s_gemm_ex(cublasHandle_t hb, const gpu_gemm_t *g)
{
    const float alpha = 1.0f;
    GPU_CUBLAS(cublasGemmEx(hb, g->ta, g->tb, g->m, g->n, g->k, &alpha, g->A, CUDA_R_16BF,
                            g->lda, g->B, CUDA_R_16BF, g->ldb, &g->beta, g->C, g->ct, g->ldc,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static cublasStatus_t s_lt(gpu_gemm_tuner_t *t, s_desc_t *d, const gpu_gemm_t *g,
                           const cublasLtMatmulAlgo_t *algo, void *ws, size_t wsb,
                           cudaStream_t st)
{
    const float alpha = 1.0f;
    return cublasLtMatmul(t->lt, &d->op, &alpha, g->A, &d->a, g->B, &d->b, &g->beta, g->C,
                          &d->c, g->C, &d->c, algo, ws, wsb, st);
}

/* Median ms of S_REPS runs of a candidate after a warm one: -1 when it fails. */
static float s_time(gpu_gemm_tuner_t *t, cudaStream_t st, cublasHandle_t hb, s_desc_t *d,
                    const gpu_gemm_t *g, const cublasLtMatmulHeuristicResult_t *r)
{
    float ms[S_REPS];
    for (int i = -1; i < S_REPS; i++) {
        GPU_CHECK(cudaEventRecord(t->t0, st));
        if (r) {
            if (s_lt(t, d, g, &r->algo, t->ws[0], r->workspaceSize, st) != CUBLAS_STATUS_SUCCESS)
                return -1.0f;
        } else {
            s_gemm_ex(hb, g);
        }
        GPU_CHECK(cudaEventRecord(t->t1, st));
        GPU_CHECK(cudaEventSynchronize(t->t1));
        if (i >= 0)
            GPU_CHECK(cudaEventElapsedTime(&ms[i], t->t0, t->t1));
    }
    for (int i = 1; i < S_REPS; i++) /* insertion sort of three */
        for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
            float x = ms[j];
            ms[j] = ms[j - 1];
            ms[j - 1] = x;
        }
    return ms[S_REPS / 2];
}

int gpu_gemm_tune(gpu_gemm_tuner_t *t, cublasHandle_t hb, cudaStream_t st, const gpu_gemm_t *g)
{
    s_key_t k = s_key(g);
    const s_entry_t *hit = s_find(t, &k);
    if (hit)
        return hit->gemm_ex;
    if (g->beta != 0.0f || t->n == S_SHAPES)
        return 1;
    s_entry_t *e = &t->e[t->n];
    memset(e, 0, sizeof *e);
    e->key = k;
    e->gemm_ex = 1;
    s_desc_t d;
    s_desc(&d, g);
    cublasLtMatmulPreferenceOpaque_t pref;
    GPU_CUBLAS(cublasLtMatmulPreferenceInit(&pref));
    size_t wsb = S_WORKSPACE;
    GPU_CUBLAS(cublasLtMatmulPreferenceSetAttribute(
        &pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsb, sizeof wsb));
    cublasLtMatmulHeuristicResult_t res[S_CANDIDATES];
    int nres = 0;
    if (cublasLtMatmulAlgoGetHeuristic(t->lt, &d.op, &d.a, &d.b, &d.c, &d.c, &pref,
                                       S_CANDIDATES, res, &nres) != CUBLAS_STATUS_SUCCESS)
        nres = 0;
    float best = s_time(t, st, hb, &d, g, NULL);
    for (int i = 0; i < nres; i++) {
        if (res[i].state != CUBLAS_STATUS_SUCCESS)
            continue;
        float ms = s_time(t, st, hb, &d, g, &res[i]);
        if (ms >= 0.0f && ms < best) {
            best = ms;
            e->gemm_ex = 0;
            e->algo = res[i].algo;
            e->ws = res[i].workspaceSize;
        }
    }
    t->n++;
    return e->gemm_ex;
}

void gpu_gemm_run(gpu_gemm_tuner_t *t, cublasHandle_t hb, cudaStream_t st, int slot,
                  const gpu_gemm_t *g)
{
    s_key_t k = s_key(g);
    const s_entry_t *e = s_find(t, &k);
    if (!e || e->gemm_ex) {
        s_gemm_ex(hb, g);
        return;
    }
    s_desc_t d;
    s_desc(&d, g);
    /* an algorithm tuned at the bucket's n may refuse this n: then cublasGemmEx */
    cublasLtMatmulHeuristicResult_t chk;
    if (cublasLtMatmulAlgoCheck(t->lt, &d.op, &d.a, &d.b, &d.c, &d.c, &e->algo, &chk) !=
            CUBLAS_STATUS_SUCCESS ||
        chk.workspaceSize > S_WORKSPACE) {
        s_gemm_ex(hb, g);
        return;
    }
    GPU_CUBLAS(s_lt(t, &d, g, &e->algo, t->ws[slot], chk.workspaceSize, st));
}
