/* The bf16 MoE layer of gpu/moe_layer.h: the workspaces, the expert GEMMs through cuBLAS (in
 * order, on two streams, or grouped) and the forward and backward passes; the kernels are
 * gpu/moe_kernels.cuh's, the benchmark helpers gpu/moe_bench.cu's. */
#include "gpu/moe_layer.h"
#include "gpu/moe_kernels.cuh"
#include "gpu/moe_gemm.h"
#include "gpu/cublas.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One expert-GEMM call: per nonempty expert one problem C = op(A) op(B) in cuBLAS's
 * column-major terms; the leading dimensions, ops, C type and beta are the same for every
 * expert. */
typedef struct {
    cublasOperation_t ta, tb;
    int lda, ldb, ldc;
    cudaDataType_t ct; /* C's type: bf16 (beta 0) or fp32 (beta 1, accumulating) */
    float beta;
    int n; /* problems (nonempty experts) */
    int m[S_MAX_E], nn[S_MAX_E], k[S_MAX_E];
    const void *A[S_MAX_E], *B[S_MAX_E];
    void *C[S_MAX_E];
} s_problem_t;

/* The most parts (gpu_moe_exchange_t.parts) a layer's tokens go in. */
#define S_MAX_PARTS 16

/* fwd: W13, W2; bwd: dW2, dG, dW13 (or dW1), dW3, dH */
enum { P_W13, P_W2, P_DW2, P_DG, P_DW13, P_DW3, P_DH, S_NPROB };

/* What lives only within one fwd or bwd call, shared by the layers of one model. g is the
 * SwiGLU output of the last forward that wrote it (g_owner; NULL after a backward, which
 * reuses the buffer for dg). The expert side's buffers (g, dab) are those of the local rows
 * (gl, dabl: M rows) or, in a call with an exchange, of the rows received (gx, dabx: Rs rows,
 * in xslab, grown with the largest layer's capacity). */
typedef struct {
    int refs;
    void *slab;
    int32_t *hist;  // (nblk, E) per-block counts, then per-block row offsets
    float *dwt;     // (T, k) d loss / d weight, fp32
    bf16 *g, *dab;  // the call's: gl, dabl or gx, dabx
    bf16 *gl;       // (M, f) silu(a) b in forward; dg in backward
    bf16 *dy;       // (M, d)
    bf16 *dabl;     // (M, 2f) [da | db]
    bf16 *dh;       // (M, d) dab W13
    bf16 *dlog;     // (T, E)
    float *dxr;     // (T, d) dlog wg
    int ep;         // whether g and dab are gx and dabx (the last call had an exchange)
    int Rs;         // EP: the rows of xslab's buffers
    void *xslab;
    bf16 *gx;       // EP: (Rs, f)
    bf16 *dgx;      // EP: (Rs, f) dg (g stays for the weight gradients)
    bf16 *dabx;     // EP: (Rs, 2f)
    bf16 *stg;      // EP: (Rs, d) a part's rows in its own layout, on their way in or out
    bf16 *ye;       // EP: (Rs, d) the experts' outputs before combine
    bf16 *dye;      // EP: (Rs, d) dy for the rows received
    bf16 *dhe;      // EP: (Rs, d) dh of the rows received, before combine
    void **dptr;    // (S_NPROB, 3, E) device pointer arrays of the grouped calls
    void **hptr;    // same, pinned host staging
    const gpu_moe_t *g_owner;
    cublasHandle_t blas;
    cudaEvent_t ev_fwd, ev_bwd; /* after each staging copy: the host may rewrite it */
    /* GPU_MOE_GEMM_STREAMS: a second stream with its own cuBLAS handle (and workspace), and
     * the events that fork it from the layer's stream and join it back */
    cudaStream_t side;
    cublasHandle_t blas2;
    cudaEvent_t fork, join;
    /* parts (expert parallelism, gpu_moe_exchange_t.parts > 1): the experts of each part run on
     * xst (with blasx) while the layer's stream moves the next part's rows; ev_part[p] marks
     * part p's experts done */
    cudaStream_t xst;
    cublasHandle_t blasx;
    cudaEvent_t xfork, ev_part[S_MAX_PARTS];
} s_scratch_t;

struct gpu_moe {
    int T, d, f, E, k, M, nblk; /* M = T k rows; nblk: blocks of the counting sort */
    int R;      /* EP: the rows received the layer has room for (gpu_moe_new_ep's, grown as
                 * needed); 0: every expert here */
    gpu_moe_gemm_t gemm;
    int round_logits;
    s_scratch_t *sc;
    void *slab; /* the layer's own device allocation, pointed into below */
    float *logits;  // (T, E) fp32
    float *probs;   // (T, E) softmax, fp32
    int32_t *idx;   // (T, k) expert per slot
    bf16 *wts;      // (T, k) routing weights, bf16
    int32_t *pos;   // (T, k) row of each (token, slot) in expert order
    int32_t *rowtok; // (M) token of each row
    int32_t *counts; // (S_MAX_PARTS, E) per part (part 0: all tokens when in one part)
    bf16 *h;        // (M, d) tokens in expert order
    bf16 *ab;       // the call's: abl or abx, [xe W1^T | xe W3^T]
    bf16 *abl;      // (M, 2f)
    bf16 *y;        // (M, d) the experts' outputs, rows as h
    int32_t *hcounts; // (E) pinned host: rows routed per expert, every part
    int32_t *hcc;     // (S_MAX_PARTS, E) pinned host: per part
    /* The expert side: its input rows xe (h, or with EP the rows received, hr), Me of them;
     * with EP expert-major over the parts (s_ep_layout): expert e's rows at eoff[e], part p's
     * rcc[p] (host) per expert. */
    void *xslab;      // EP: hr and abx
    bf16 *hr;         // EP: (R, d)
    bf16 *abx;        // EP: (R, 2f)
    int32_t *rcc;     // EP: (S_MAX_PARTS, E) pinned host
    int eoff[S_MAX_E + 1];
    int32_t *rt_h;    // EP: (S_MAX_PARTS, 2E + 1) pinned host: per part coff (E + 1), moff (E)
    int32_t *rt_d;    // EP: the same on the device
    int32_t *rcnt_d;  // EP in one part: rcc[0] on the device (our kernel's counts)
    bf16 *xe;
    int Me;
    int P;                        /* parts of the last forward */
    int t0[S_MAX_PARTS + 1];      /* part p's tokens: [t0[p], t0[p + 1]) */
    int roff[S_MAX_PARTS + 1];    /* EP: rows received before part p (its own layout) */
    int phases;                 /* gpu_moe_set_phases: record pev at each phase boundary */
    cudaEvent_t pev[GPU_MOE_NPHASES + 1]; /* made on first enable; [0] fwd start */
    s_problem_t prob[S_NPROB];
    int prow0[S_MAX_E], prows[S_MAX_E]; /* rows of the i-th problem's expert (nonempty ones) */
};

/* ---------------------------------------------------------------------- GEMMs */

/* Plain GEMM in column-major terms, bf16 A and B, fp32 compute, C of type ct. */
static void s_gemm(cublasHandle_t hb, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                   int k, const void *A, int lda, const void *B, int ldb, float beta, void *C,
                   cudaDataType_t ct, int ldc)
{
    const float alpha = 1.0f;
    GPU_CUBLAS(cublasGemmEx(hb, ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B, CUDA_R_16BF,
                          ldb, &beta, C, ct, ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* Problems first, first + step, ... of p on handle hb. */
static void s_run_loop(cublasHandle_t hb, const s_problem_t *p, int first, int step)
{
    for (int i = first; i < p->n; i += step)
        s_gemm(hb, p->ta, p->tb, p->m[i], p->nn[i], p->k[i], p->A[i], p->lda, p->B[i], p->ldb,
               p->beta, p->C[i], p->ct, p->ldc);
}

/* Problem `slot`'s device pointer arrays are at dptr + slot*3E (A, B, C, E each), already
 * copied from the staging area; on handle hb (whose stream the staging copy went on). */
static void s_run(gpu_moe_t *m, int slot, cublasHandle_t hb)
{
    const s_problem_t *p = &m->prob[slot];
    if (p->n == 0)
        return;
    if (m->gemm == GPU_MOE_GEMM_GROUPED) {
        int n = p->n;
        cublasOperation_t ta[S_MAX_E], tb[S_MAX_E];
        int lda[S_MAX_E], ldb[S_MAX_E], ldc[S_MAX_E], gs[S_MAX_E];
        float alpha[S_MAX_E], beta[S_MAX_E];
        for (int i = 0; i < n; i++) {
            ta[i] = p->ta;
            tb[i] = p->tb;
            lda[i] = p->lda;
            ldb[i] = p->ldb;
            ldc[i] = p->ldc;
            gs[i] = 1;
            alpha[i] = 1.0f;
            beta[i] = p->beta;
        }
        void **dp = m->sc->dptr + (size_t)slot * 3 * m->E;
        cublasStatus_t st = cublasGemmGroupedBatchedEx(
            hb, ta, tb, p->m, p->nn, p->k, alpha, (const void *const *)dp, CUDA_R_16BF,
            lda, (const void *const *)(dp + m->E), CUDA_R_16BF, ldb, beta,
            (void *const *)(dp + 2 * m->E), p->ct, ldc, n, gs, CUBLAS_COMPUTE_32F);
        if (st == CUBLAS_STATUS_SUCCESS)
            return;
        fprintf(stderr,
                "semoe gpu_moe: cublasGemmGroupedBatchedEx (bf16 in, %d groups) failed: %s; "
                "using a cublasGemmEx per expert from now on\n",
                n, cublasGetStatusString(st));
        m->gemm = GPU_MOE_GEMM_LOOP;
    }
    s_run_loop(hb, p, 0, 1);
}

/* The stream fork and join of GPU_MOE_GEMM_STREAMS. */
static void s_fork(s_scratch_t *sc)
{
    GPU_CHECK(cudaEventRecord(sc->fork, gpu_stream()));
    GPU_CHECK(cudaStreamWaitEvent(sc->side, sc->fork, 0));
}

static void s_join(s_scratch_t *sc)
{
    GPU_CHECK(cudaEventRecord(sc->join, sc->side));
    GPU_CHECK(cudaStreamWaitEvent(gpu_stream(), sc->join, 0));
}

/* Problem i of p alone, on handle hb. */
static void s_run_one(cublasHandle_t hb, const s_problem_t *p, int i)
{
    s_run_loop(hb, p, i, p->n);
}


/* Stages the pointer arrays of problems [first, first+n) and copies them to the device on
 * stream st. */
static void s_stage(gpu_moe_t *m, int first, int n, cudaEvent_t ev, cudaStream_t st)
{
    if (m->gemm != GPU_MOE_GEMM_GROUPED)
        return;
    GPU_CHECK(cudaEventSynchronize(ev)); /* the previous copy from this area is done */
    size_t E = (size_t)m->E;
    for (int s = first; s < first + n; s++) {
        const s_problem_t *p = &m->prob[s];
        void **hp = m->sc->hptr + (size_t)s * 3 * E;
        for (int i = 0; i < p->n; i++) {
            hp[i] = (void *)p->A[i];
            hp[E + i] = (void *)p->B[i];
            hp[2 * E + i] = p->C[i];
        }
    }
    size_t off = (size_t)first * 3 * E;
    GPU_CHECK(cudaMemcpyAsync(m->sc->dptr + off, m->sc->hptr + off,
                              (size_t)n * 3 * E * sizeof(void *), cudaMemcpyHostToDevice, st));
    GPU_CHECK(cudaEventRecord(ev, st));
}

static void s_set(s_problem_t *p, cublasOperation_t ta, cublasOperation_t tb, int lda, int ldb,
                  int ldc, int fp32)
{
    p->ct = fp32 ? CUDA_R_32F : CUDA_R_16BF;
    p->beta = fp32 ? 1.0f : 0.0f;
    p->ta = ta;
    p->tb = tb;
    p->lda = lda;
    p->ldb = ldb;
    p->ldc = ldc;
    p->n = 0;
}

static void s_add(s_problem_t *p, int m, int n, int k, const void *A, const void *B, void *C)
{
    int i = p->n++;
    p->m[i] = m;
    p->nn[i] = n;
    p->k[i] = k;
    p->A[i] = A;
    p->B[i] = B;
    p->C[i] = C;
}

/* ---------------------------------------------------------------------- the layer */

static const char *const s_phase_names[GPU_MOE_NPHASES] = {
    "route",    "sort_gather", "gemm_w13",    "swiglu",      "gemm_w2",
    "combine",  "between",     "combine_bwd", "gemm_dw2_dg", "swiglu_bwd",
    "gemm_dw13_dh", "route_bwd", "gemm_router", "dx"};

/* Phase boundary i (0 <= i <= GPU_MOE_NPHASES) when phase timing is on; a branch when off. */
static inline void s_mark(gpu_moe_t *m, int i)
{
    if (m->phases)
        GPU_CHECK(cudaEventRecord(m->pev[i], gpu_stream()));
}


/* The expert GEMM path for a shape, as measured on an H200 (bench/README.md): experts whose
 * GEMMs fill the GPU for a millisecond or more (Mixtral's: ~1e12 FLOPs each) run fastest one
 * after the other; smaller ones gain from the two-stream pipeline (fine-grained and small
 * shapes, 1.1e10-1.8e10 FLOPs). The split sits at 1e11 FLOPs per expert [a | b] GEMM. */
static gpu_moe_gemm_t s_gemm_for(int T, int d, int f, int E, int k)
{
    double flops = 2.0 * ((double)T * k / E) * d * (2.0 * f);
    return flops < 1e11 ? GPU_MOE_GEMM_STREAMS : GPU_MOE_GEMM_LOOP;
}

/* gpu_alloc_slab, with the message gpu_moe_new's NULL promises when the device is full. */
static void *s_carve(const size_t *sz, void **const *ptrs, int n)
{
    size_t total = 0;
    void *base = gpu_alloc_slab(sz, ptrs, n, &total);
    if (!base) {
        size_t fr = 0, all = 0;
        cudaMemGetInfo(&fr, &all);
        fprintf(stderr, "gpu_moe_new: cannot allocate %.2f GiB on the device (%.2f GiB free): "
                        "fewer tokens per micro-batch\n", total / 1073741824.0,
                fr / 1073741824.0);
    }
    return base;
}

static s_scratch_t *s_scratch_new(const gpu_moe_t *m)
{
    s_scratch_t *sc = (s_scratch_t *)calloc(1, sizeof *sc);
    if (!sc) {
        fprintf(stderr, "gpu_moe_new: out of host memory\n");
        abort();
    }
    size_t M = (size_t)m->M, T = (size_t)m->T, d = (size_t)m->d, f = (size_t)m->f,
           E = (size_t)m->E;
    size_t sz[] = {(size_t)m->nblk * E * 4, M * 4, M * f * 2, M * d * 2, M * 2 * f * 2,
                   M * d * 2, T * E * 2, T * d * 4, (size_t)S_NPROB * 3 * E * sizeof(void *)};
    void **const ptrs[] = {(void **)&sc->hist, (void **)&sc->dwt, (void **)&sc->gl,
                           (void **)&sc->dy,   (void **)&sc->dabl, (void **)&sc->dh,
                           (void **)&sc->dlog, (void **)&sc->dxr, (void **)&sc->dptr};
    sc->slab = s_carve(sz, ptrs, (int)(sizeof sz / sizeof sz[0]));
    if (!sc->slab) {
        free(sc);
        return NULL;
    }
    GPU_CHECK(cudaMallocHost((void **)&sc->hptr, (size_t)S_NPROB * 3 * E * sizeof(void *)));
    GPU_CHECK(cudaEventCreateWithFlags(&sc->ev_fwd, cudaEventDisableTiming));
    GPU_CHECK(cudaEventCreateWithFlags(&sc->ev_bwd, cudaEventDisableTiming));
    GPU_CHECK(cudaEventRecord(sc->ev_fwd, gpu_stream()));
    GPU_CHECK(cudaEventRecord(sc->ev_bwd, gpu_stream()));
    GPU_CUBLAS(cublasCreate(&sc->blas));
    GPU_CUBLAS(cublasSetStream(sc->blas, gpu_stream()));
    GPU_CHECK(cudaStreamCreateWithFlags(&sc->side, cudaStreamNonBlocking));
    GPU_CUBLAS(cublasCreate(&sc->blas2));
    GPU_CUBLAS(cublasSetStream(sc->blas2, sc->side));
    GPU_CHECK(cudaEventCreateWithFlags(&sc->fork, cudaEventDisableTiming));
    GPU_CHECK(cudaEventCreateWithFlags(&sc->join, cudaEventDisableTiming));
    GPU_CHECK(cudaStreamCreateWithFlags(&sc->xst, cudaStreamNonBlocking));
    GPU_CUBLAS(cublasCreate(&sc->blasx));
    GPU_CUBLAS(cublasSetStream(sc->blasx, sc->xst));
    GPU_CHECK(cudaEventCreateWithFlags(&sc->xfork, cudaEventDisableTiming));
    for (int p = 0; p < S_MAX_PARTS; p++)
        GPU_CHECK(cudaEventCreateWithFlags(&sc->ev_part[p], cudaEventDisableTiming));
    sc->refs = 1;
    return sc;
}

/* A new slab of n buffers of rows x width[i] bf16 each into *ptrs[i], whose first keep rows
 * are copied from the old buffers (old[i], NULL: nothing) on the stream, the old slab freed
 * (after the stream's work so far). SEMOE_ENOMEM, nothing changed, when the device is full. */
static semoe_rc s_regrow(void **slab, int n, bf16 **const *ptrs, const size_t *width, size_t rows,
                         size_t keep)
{
    size_t sz[8];
    bf16 *old[8], *fresh[8];
    void **pp[8];
    for (int i = 0; i < n; i++) {
        sz[i] = rows * width[i] * 2;
        old[i] = *ptrs[i];
        pp[i] = (void **)&fresh[i];
    }
    size_t total = 0;
    void *ns = gpu_alloc_slab(sz, pp, n, &total);
    if (!ns) {
        size_t fr = 0, all = 0;
        cudaMemGetInfo(&fr, &all);
        return semoe_err(SEMOE_ENOMEM, "gpu_moe: %.2f GiB on the device for the rows of other "
                         "ranks' tokens (%zu rows; %.2f GiB free): fewer tokens per micro-batch, "
                         "or more ranks holding the hot experts", total / 1073741824.0, rows,
                         fr / 1073741824.0);
    }
    for (int i = 0; i < n; i++) {
        if (old[i] && keep)
            GPU_CHECK(cudaMemcpyAsync(fresh[i], old[i], keep * width[i] * 2,
                                      cudaMemcpyDeviceToDevice, gpu_stream()));
        *ptrs[i] = fresh[i];
    }
    gpu_free(*slab); /* waits for the stream: the copies are done */
    *slab = ns;
    return SEMOE_OK;
}

/* EP: room for `rows` rows received on layer m (its hr and abx) and in the scratch (gx, dgx,
 * dabx, ye, dye, dhe, stg), what they hold kept. */
static semoe_rc s_room(gpu_moe_t *m, int rows)
{
    s_scratch_t *sc = m->sc;
    const size_t d = (size_t)m->d, f = (size_t)m->f;
    if (rows > m->R || !m->xslab) {
        bf16 **const lp[] = {&m->hr, &m->abx};
        const size_t lw[] = {d, 2 * f};
        SEMOE_CHECK(s_regrow(&m->xslab, 2, lp, lw, (size_t)rows, (size_t)(m->xslab ? m->R : 0)));
        m->R = rows;
    }
    if (rows > sc->Rs || !sc->xslab) {
        bf16 **const sp[] = {&sc->gx, &sc->dgx, &sc->dabx, &sc->ye, &sc->dye, &sc->dhe, &sc->stg};
        const size_t sw[] = {f, f, 2 * f, d, d, d, d};
        SEMOE_CHECK(s_regrow(&sc->xslab, 7, sp, sw, (size_t)rows,
                             (size_t)(sc->xslab ? sc->Rs : 0)));
        sc->Rs = rows;
    }
    return SEMOE_OK;
}

/* The layer's own buffers (what its backward needs); sc shared or new. */
static gpu_moe_t *s_layer_new(const gpu_moe_t *shape, s_scratch_t *sc)
{
    gpu_moe_t *m = (gpu_moe_t *)calloc(1, sizeof *m);
    if (!m) {
        fprintf(stderr, "gpu_moe_new: out of host memory\n");
        abort();
    }
    m->T = shape->T, m->d = shape->d, m->f = shape->f, m->E = shape->E, m->k = shape->k;
    m->M = shape->M, m->nblk = shape->nblk, m->gemm = shape->gemm;
    m->round_logits = shape->round_logits;
    size_t M = (size_t)m->M, TE = (size_t)m->T * m->E, d = (size_t)m->d, f = (size_t)m->f,
           E = (size_t)m->E;
    size_t sz[] = {TE * 4, TE * 4, M * 4,     M * 2,         M * 4,    M * 4,
                   S_MAX_PARTS * E * 4, M * d * 2, M * 2 * f * 2, M * d * 2,
                   S_MAX_PARTS * (2 * E + 1) * 4, E * 4};
    void **const ptrs[] = {(void **)&m->logits, (void **)&m->probs, (void **)&m->idx,
                           (void **)&m->wts,    (void **)&m->pos,   (void **)&m->rowtok,
                           (void **)&m->counts, (void **)&m->h,     (void **)&m->abl,
                           (void **)&m->y,      (void **)&m->rt_d,  (void **)&m->rcnt_d};
    m->slab = s_carve(sz, ptrs, (int)(sizeof sz / sizeof sz[0]));
    if (!m->slab) {
        free(m);
        return NULL;
    }
    /* hcounts, hcc, then (EP) rcc and rt_h */
    GPU_CHECK(cudaMallocHost((void **)&m->hcounts,
                             ((1 + 2 * S_MAX_PARTS) * E + S_MAX_PARTS * (2 * E + 1)) *
                                 sizeof(int32_t)));
    m->hcc = m->hcounts + E;
    m->rcc = m->hcc + S_MAX_PARTS * E;
    m->rt_h = m->rcc + S_MAX_PARTS * E;
    m->xe = m->h, m->Me = m->M, m->P = 1;
    m->sc = sc ? sc : s_scratch_new(m);
    if (!m->sc) {
        gpu_free(m->slab);
        cudaFreeHost(m->hcounts);
        free(m);
        return NULL;
    }
    m->sc->refs += sc != NULL;
    m->ab = m->abl, m->sc->g = m->sc->gl, m->sc->dab = m->sc->dabl;
    if (shape->R > 0 && s_room(m, shape->R) != SEMOE_OK) {
        fprintf(stderr, "gpu_moe_new_ep: %s\n", semoe_err_msg());
        gpu_moe_destroy(&m);
        return NULL;
    }
    return m;
}

extern "C" gpu_moe_t *gpu_moe_new_ep(int T, int d, int f, int E, int k, int rows)
{
    if (T < 1 || d < 8 || f < 8 || d % S_VEC || f % S_VEC) {
        fprintf(stderr, "gpu_moe_new: T=%d d=%d f=%d: need T >= 1 and d, f positive multiples "
                        "of 8\n", T, d, f);
        return NULL;
    }
    if (E < 1 || E > S_MAX_E || k < 1 || k > E || k > S_MAX_K) {
        fprintf(stderr, "gpu_moe_new: E=%d k=%d: need 1 <= E <= %d and 1 <= k <= min(E, %d)\n",
                E, k, S_MAX_E, S_MAX_K);
        return NULL;
    }
    if (rows < 0) {
        fprintf(stderr, "gpu_moe_new_ep: rows=%d: need >= 0\n", rows);
        return NULL;
    }
    size_t M = (size_t)T * k, wide = (size_t)(d > 2 * f ? d : 2 * f);
    if (M * wide >= ((size_t)1 << 31) || (size_t)E * 2 * d * f >= ((size_t)1 << 31)) {
        fprintf(stderr, "gpu_moe_new: T*k*max(d,2f)=%zu or E*2f*d=%zu: need both under 2^31 "
                        "(int offsets in the kernels)\n", M * wide, (size_t)E * 2 * d * f);
        return NULL;
    }
    gpu_moe_t shape;
    memset(&shape, 0, sizeof shape);
    shape.T = T, shape.d = d, shape.f = f, shape.E = E, shape.k = k, shape.M = (int)M;
    shape.R = rows;
    shape.nblk = (int)((M + S_SORT_BLOCK - 1) / S_SORT_BLOCK);
    shape.gemm = s_gemm_for(T, d, f, E, k);
    shape.round_logits = 1;
    return s_layer_new(&shape, NULL);
}

extern "C" gpu_moe_t *gpu_moe_new(int T, int d, int f, int E, int k)
{
    return gpu_moe_new_ep(T, d, f, E, k, 0);
}

extern "C" gpu_moe_t *gpu_moe_new_sharing(gpu_moe_t *other)
{
    return s_layer_new(other, other->sc);
}

extern "C" void gpu_moe_destroy(gpu_moe_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    gpu_moe_t *m = *self_p;
    gpu_free(m->slab); /* waits for the stream */
    gpu_free(m->xslab);
    cudaFreeHost(m->hcounts);
    if (m->pev[0])
        for (int i = 0; i <= GPU_MOE_NPHASES; i++)
            cudaEventDestroy(m->pev[i]);
    s_scratch_t *sc = m->sc;
    if (sc->g_owner == m)
        sc->g_owner = NULL;
    if (--sc->refs == 0) {
        gpu_free(sc->slab);
        gpu_free(sc->xslab);
        cudaFreeHost(sc->hptr);
        cudaEventDestroy(sc->ev_fwd);
        cudaEventDestroy(sc->ev_bwd);
        cublasDestroy(sc->blas);
        cublasDestroy(sc->blas2);
        cudaEventDestroy(sc->fork);
        cudaEventDestroy(sc->join);
        cudaStreamDestroy(sc->side);
        GPU_CHECK(cudaStreamSynchronize(sc->xst));
        cublasDestroy(sc->blasx);
        cudaEventDestroy(sc->xfork);
        for (int p = 0; p < S_MAX_PARTS; p++)
            cudaEventDestroy(sc->ev_part[p]);
        cudaStreamDestroy(sc->xst);
        free(sc);
    }
    free(m);
    *self_p = NULL;
}

/* Whether gpu/moe_gemm.h's kernel takes this layer's two forward GEMMs (the backward ones
 * check for themselves and fall back to cuBLAS). */
static bool s_fused_ok(const gpu_moe_t *m)
{
    return gpu_moe_gemm_ok(2 * m->f, m->d) && gpu_moe_gemm_ok(m->d, m->f);
}

/* Whether GEMM `which` of this call runs on our kernel: on GPU_MOE_GEMM_FUSED, each where the
 * shape allows, all of them or the bits of SEMOE_MOE_OWN (for measuring the mixes;
 * bench/gpu-moe-ab.sh). */
enum { S_OWN_W13 = 1, S_OWN_W2 = 2, S_OWN_DG = 4, S_OWN_DH = 8 };

static bool s_own(const gpu_moe_t *m, int which)
{
    static int mask = -1;
    if (mask < 0) {
        const char *v = getenv("SEMOE_MOE_OWN");
        mask = v ? atoi(v) & 15 : S_OWN_W13 | S_OWN_W2 | S_OWN_DG | S_OWN_DH;
    }
    if (m->gemm != GPU_MOE_GEMM_FUSED || !(mask & which))
        return false;
    switch (which) { /* N and K of each (gpu/moe_gemm.h) */
    case S_OWN_W13:
        return gpu_moe_gemm_ok(2 * m->f, m->d);
    case S_OWN_W2:
        return gpu_moe_gemm_ok(m->d, m->f);
    case S_OWN_DG:
        return gpu_moe_gemm_ok(m->f, m->d);
    default: /* S_OWN_DH */
        return gpu_moe_gemm_ok(m->d, 2 * m->f);
    }
}

/* One call's share of the expert side: rows [r0, r0 + rows) of it (of xe, ab, g, dab and the
 * output buffers), cnt (host) and cnt_d (device) of them per expert, run on st with hb (hb's
 * stream). The whole side in one part, or one part of an expert-parallel layer. */
typedef struct {
    int r0, rows;
    const int32_t *cnt, *cnt_d;
    cudaStream_t st;
    cublasHandle_t hb;
} s_view_t;

/* Whether our kernel may run on view v: the slot map is the identity (it indexes the weights by
 * expert) and the rows' offsets fit its int arithmetic (as gpu_moe_new checks for the local
 * rows: the rows received may be more). */
static bool s_own_view(const gpu_moe_t *m, const gpu_moe_weights_t *w, const s_view_t *v)
{
    size_t wide = (size_t)(m->d > 2 * m->f ? m->d : 2 * m->f);
    return !w->slot && (size_t)(v->r0 + v->rows) * wide < ((size_t)1 << 31);
}

/* gpu_moe_gemm on the view's rows and counts (A, C, G, AB at the view's first row). */
static void s_own_gemm(const gpu_moe_t *m, const s_view_t *v, gpu_moe_epi_t epi, const bf16 *A,
                       int K, const bf16 *B, bool b_kn, int N, bf16 *C, bf16 *G, const bf16 *AB)
{
    gpu_moe_gemm_args_t g = {A, v->rows, K, B, b_kn, N, m->E, v->cnt_d, epi, C, G, AB};
    gpu_moe_gemm(&g, v->st);
}

extern "C" gpu_moe_gemm_t gpu_moe_set_gemm(gpu_moe_t *self, gpu_moe_gemm_t mode)
{
    if (mode == GPU_MOE_GEMM_FUSED && !s_fused_ok(self))
        mode = GPU_MOE_GEMM_LOOP;
    self->gemm = mode;
    return self->gemm;
}

extern "C" gpu_moe_gemm_t gpu_moe_gemm(const gpu_moe_t *self) { return self->gemm; }

extern "C" void gpu_moe_set_round_logits(gpu_moe_t *self, int on) { self->round_logits = on != 0; }

extern "C" void gpu_moe_set_phases(gpu_moe_t *self, int on)
{
    if (on && !self->pev[0])
        for (int i = 0; i <= GPU_MOE_NPHASES; i++)
            GPU_CHECK(cudaEventCreate(&self->pev[i]));
    self->phases = on != 0;
}

extern "C" const char *gpu_moe_phase_name(int i)
{
    return i >= 0 && i < GPU_MOE_NPHASES ? s_phase_names[i] : "?";
}

extern "C" int gpu_moe_phase_ms(gpu_moe_t *self, float *ms)
{
    if (!self->phases)
        return -1;
    GPU_CHECK(cudaEventSynchronize(self->pev[GPU_MOE_NPHASES]));
    for (int i = 0; i < GPU_MOE_NPHASES; i++)
        GPU_CHECK(cudaEventElapsedTime(&ms[i], self->pev[i], self->pev[i + 1]));
    return 0;
}
extern "C" const int32_t *gpu_moe_idx(const gpu_moe_t *self) { return self->idx; }
extern "C" const uint16_t *gpu_moe_weights(const gpu_moe_t *self)
{
    return (const uint16_t *)self->wts;
}
extern "C" const int32_t *gpu_moe_counts(const gpu_moe_t *self) { return self->hcounts; }
extern "C" const float *gpu_moe_probs(const gpu_moe_t *self) { return self->probs; }

/* g = silu(a) b from m->ab into the scratch's g; the scratch remembers whose it is. */
static void s_swiglu(gpu_moe_t *m)
{
    size_t n8 = (size_t)m->Me * m->f / S_VEC;
    s_swiglu_kernel<<<s_grid(n8, 256), 256, 0, gpu_stream()>>>(m->sc->g, m->ab, n8,
                                                               m->f / S_VEC);
    GPU_CHECK_LAUNCH();
    m->sc->g_owner = m;
}

/* SwiGLU and its backward on rows [r0, r0 + n) only, on stream st. */
static void s_swiglu_rows(gpu_moe_t *m, int r0, int n, cudaStream_t st)
{
    size_t n8 = (size_t)n * m->f / S_VEC, f = (size_t)m->f;
    s_swiglu_kernel<<<s_grid(n8, 256), 256, 0, st>>>(m->sc->g + r0 * f, m->ab + r0 * 2 * f, n8,
                                                     m->f / S_VEC);
    GPU_CHECK_LAUNCH();
}

static void s_swiglu_bwd_rows(gpu_moe_t *m, int r0, int n, cudaStream_t st)
{
    size_t n8 = (size_t)n * m->f / S_VEC, f = (size_t)m->f;
    s_swiglu_bwd_kernel<<<s_grid(n8, 256), 256, 0, st>>>(m->sc->dab + r0 * 2 * f,
                                                         m->sc->g + r0 * f, m->ab + r0 * 2 * f,
                                                         n8, m->f / S_VEC);
    GPU_CHECK_LAUNCH();
}

/* GPU_MOE_GEMM_STREAMS's forward experts: each expert's [a | b] GEMM, SwiGLU and W2 GEMM in a
 * row on one of two streams, experts alternating, so that one expert's SwiGLU (memory bound)
 * runs beside another's GEMMs (compute bound). */
static void s_experts_fwd_streams(gpu_moe_t *m)
{
    s_scratch_t *sc = m->sc;
    const s_problem_t *p13 = &m->prob[P_W13], *p2 = &m->prob[P_W2];
    s_fork(sc);
    for (int i = 0; i < p13->n; i++) {
        cublasHandle_t hb = i & 1 ? sc->blas2 : sc->blas;
        cudaStream_t s = i & 1 ? sc->side : gpu_stream();
        s_run_one(hb, p13, i);
        s_swiglu_rows(m, m->prow0[i], m->prows[i], s);
        s_run_one(hb, p2, i);
    }
    s_join(sc);
    sc->g_owner = m;
}

/* Its backward: per expert dW2 and dg, SwiGLU's backward, dW13 (or dW1 and dW3) and dh. */
static void s_experts_bwd_streams(gpu_moe_t *m)
{
    s_scratch_t *sc = m->sc;
    const s_problem_t *q = m->prob;
    s_fork(sc);
    for (int i = 0; i < q[P_DW2].n; i++) {
        cublasHandle_t hb = i & 1 ? sc->blas2 : sc->blas;
        cudaStream_t s = i & 1 ? sc->side : gpu_stream();
        s_run_one(hb, &q[P_DW2], i);
        s_run_one(hb, &q[P_DG], i);
        s_swiglu_bwd_rows(m, m->prow0[i], m->prows[i], s);
        s_run_one(hb, &q[P_DW13], i);
        if (q[P_DW3].n)
            s_run_one(hb, &q[P_DW3], i);
        s_run_one(hb, &q[P_DH], i);
    }
    s_join(sc);
    sc->g_owner = NULL; /* g now holds dg */
}

/* Expert e's index in the weights' w13 and w2 (the slot map, or e itself); -1: not held. */
static inline int s_slot(const gpu_moe_weights_t *w, int e)
{
    return w->slot ? w->slot[e] : e;
}

/* EP: the rows of an expert not held here arrived (an exchange that disagrees with the weights'
 * slot map), or more than the room left (cap). */
static semoe_rc s_check_recv(const gpu_moe_t *m, const gpu_moe_weights_t *w, const int32_t *cnt,
                             int cap, int *rows)
{
    int64_t total = 0;
    for (int e = 0; e < m->E; e++) {
        if (cnt[e] < 0 || (cnt[e] > 0 && s_slot(w, e) < 0))
            return semoe_err(SEMOE_EPROTO, "gpu_moe: the exchange delivered %d rows of expert "
                             "%d, which is not held here", cnt[e], e);
        total += cnt[e];
    }
    if (total > cap)
        return semoe_err(SEMOE_EPROTO, "gpu_moe: the exchange delivered %lld rows; the room "
                         "left is %d of %d", (long long)total, cap, m->R);
    *rows = (int)total;
    return SEMOE_OK;
}

/* route: logits, softmax, top-k for every token; then per part p (tokens [t0[p], t0[p+1]))
 * the counting sort of its entries (rows t0[p] K on: pos global, rowtok within the part), h =
 * the part's rows in expert order, its counts into hcc[p]; hcounts the sums (the stream
 * synchronised). */
static void s_route_fwd(gpu_moe_t *m, const gpu_moe_weights_t *w, const bf16 *x)
{
    const int T = m->T, d = m->d, E = m->E, K = m->k;
    s_scratch_t *sc = m->sc;
    cudaStream_t st = gpu_stream();
    s_mark(m, 0);
    /* logits^T (E, T) = wg (E, d) x^T in cuBLAS's column-major view of the row-major data (wg
     * is stored as the column-major (d, E): transposed) */
    s_gemm(sc->blas, CUBLAS_OP_T, CUBLAS_OP_N, E, T, d, w->wg, d, x, d, 0.0f, m->logits,
           CUDA_R_32F, E);
    s_route_kernel<<<(T + 7) / 8, 256, 0, st>>>(m->probs, m->idx, m->wts, m->logits, w->bias,
                                                m->round_logits, T, E, K);
    GPU_CHECK_LAUNCH();
    s_mark(m, 1);
    for (int p = 0; p < m->P; p++) {
        int r0 = m->t0[p] * K, n = (m->t0[p + 1] - m->t0[p]) * K;
        int nblk = (n + S_SORT_BLOCK - 1) / S_SORT_BLOCK;
        int32_t *cnt = m->counts + (size_t)p * E;
        s_hist_kernel<<<nblk, S_SORT_BLOCK, E * sizeof(int32_t), st>>>(sc->hist, m->idx + r0,
                                                                      n, E);
        GPU_CHECK_LAUNCH();
        s_scan_kernel<<<1, 256, 0, st>>>(sc->hist, cnt, nblk, E);
        GPU_CHECK_LAUNCH();
        s_place_kernel<<<nblk, S_SORT_BLOCK, (S_SORT_BLOCK / 32) * E * sizeof(int32_t), st>>>(
            m->pos + r0, m->rowtok + r0, m->idx + r0, sc->hist, n, E, K, r0);
        GPU_CHECK_LAUNCH();
        /* the one host round trip per layer call: cuBLAS takes the group sizes on the host */
        GPU_CHECK(cudaMemcpyAsync(m->hcc + (size_t)p * E, cnt, E * sizeof(int32_t),
                                  cudaMemcpyDeviceToHost, st));
        s_gather_kernel<<<n, 128, 0, st>>>(m->h + (size_t)r0 * d, x + (size_t)m->t0[p] * d,
                                           m->rowtok + r0, d);
        GPU_CHECK_LAUNCH();
    }
    s_mark(m, 2);
    GPU_CHECK(cudaStreamSynchronize(st));
    for (int e = 0; e < E; e++) {
        m->hcounts[e] = 0;
        for (int p = 0; p < m->P; p++)
            m->hcounts[e] += m->hcc[(size_t)p * E + e];
    }
}

/* The experts' forward on view v of the expert side: [a | b] = xe W13[e]^T, g = silu(a) b,
 * ye = g W2[e]^T per expert (row-major; as column-major [a | b]^T (2f, n) = W13[e] (2f, d)
 * xe^T (d, n), W13[e] stored as the column-major (d, 2f) (transposed), xe^T as stored; ye^T
 * (d, n) = W2[e] (d, f) g^T (f, n) likewise). ye is the output's row 0. */
static void s_experts_fwd(gpu_moe_t *m, const gpu_moe_weights_t *w, const s_view_t *v, bf16 *ye)
{
    const bf16 *w13 = (const bf16 *)w->w13, *w2 = (const bf16 *)w->w2;
    const int d = m->d, f = m->f, E = m->E;
    s_scratch_t *sc = m->sc;
    s_problem_t *p13 = &m->prob[P_W13], *p2 = &m->prob[P_W2];
    s_set(p13, CUBLAS_OP_T, CUBLAS_OP_N, d, d, 2 * f, 0);
    s_set(p2, CUBLAS_OP_T, CUBLAS_OP_N, f, f, d, 0);
    size_t o = (size_t)v->r0, df = (size_t)d * f;
    for (int e = 0; e < E; e++) {
        int n = v->cnt[e];
        if (n > 0) {
            size_t s = (size_t)s_slot(w, e);
            m->prow0[p13->n] = (int)o;
            m->prows[p13->n] = n;
            s_add(p13, 2 * f, n, d, w13 + s * 2 * df, m->xe + o * d, m->ab + o * 2 * f);
            s_add(p2, d, n, f, w2 + s * df, sc->g + o * f, ye + o * d);
        }
        o += (size_t)n;
    }
    s_stage(m, P_W13, 2, sc->ev_fwd, v->st);
    if (m->gemm == GPU_MOE_GEMM_STREAMS && v->st == gpu_stream()) { /* the three phases as one */
        s_experts_fwd_streams(m);
        s_mark(m, 3);
        s_mark(m, 4);
        return;
    }
    /* in order; on FUSED, each GEMM on our kernel where s_own says so (with the slot map only
     * where it is the identity: the kernel indexes the weights by expert) */
    const size_t r0 = (size_t)v->r0;
    bool own = s_own_view(m, w, v);
    if (own && s_own(m, S_OWN_W13)) { /* SwiGLU inside the first GEMM */
        s_own_gemm(m, v, GPU_MOE_EPI_SWIGLU, m->xe + r0 * d, d, w13, false, 2 * f,
                   m->ab + r0 * 2 * f, sc->g + r0 * f, NULL);
        s_mark(m, 3);
    } else {
        s_run(m, P_W13, v->hb);
        s_mark(m, 3);
        s_swiglu_rows(m, v->r0, v->rows, v->st);
    }
    sc->g_owner = m;
    s_mark(m, 4);
    if (own && s_own(m, S_OWN_W2))
        s_own_gemm(m, v, GPU_MOE_EPI_PLAIN, sc->g + r0 * f, f, w2, false, d, ye + r0 * d, NULL,
                   NULL);
    else
        s_run(m, P_W2, v->hb);
}

/* The parts a call asking for `parts` runs in: at least 1, at most S_MAX_PARTS and T. */
static int s_parts_for(const gpu_moe_t *m, int parts)
{
    int P = parts < 1 ? 1 : parts;
    P = P > S_MAX_PARTS ? S_MAX_PARTS : P;
    return P > m->T ? m->T : P;
}

/* The parts of a call: tokens split evenly. */
static void s_parts(gpu_moe_t *m, int parts)
{
    int P = s_parts_for(m, parts);
    m->P = P;
    for (int p = 0; p <= P; p++)
        m->t0[p] = (int)((int64_t)m->T * p / P);
}

/* Part p's view of the expert side of an expert-parallel call: on the layer's stream when the
 * call is in one part, else on xst once the stream's work so far (p's rows arrived) is done. */
static s_view_t s_part_view(gpu_moe_t *m, int p)
{
    s_scratch_t *sc = m->sc;
    s_view_t v = {m->roff[p], m->roff[p + 1] - m->roff[p], m->rcc + (size_t)p * m->E, NULL,
                  gpu_stream(), sc->blas};
    if (m->P > 1) {
        GPU_CHECK(cudaEventRecord(sc->xfork, gpu_stream()));
        GPU_CHECK(cudaStreamWaitEvent(sc->xst, sc->xfork, 0));
        v.st = sc->xst;
        v.hb = sc->blasx;
    }
    return v;
}

/* After part p's experts were enqueued on v: its mark; the layer's stream waits for part q's
 * experts (xst) before it sends their output back. */
static void s_part_done(gpu_moe_t *m, const s_view_t *v, int p)
{
    if (m->P > 1)
        GPU_CHECK(cudaEventRecord(m->sc->ev_part[p], v->st));
}

static void s_part_join(gpu_moe_t *m, int q)
{
    if (m->P > 1)
        GPU_CHECK(cudaStreamWaitEvent(gpu_stream(), m->sc->ev_part[q], 0));
}

/* The layer's stream waits for whatever xst has (an error's way out: nothing may run on
 * buffers the caller frees). */
static void s_join_all(gpu_moe_t *m)
{
    if (m->P > 1) {
        GPU_CHECK(cudaEventRecord(m->sc->xfork, m->sc->xst));
        GPU_CHECK(cudaStreamWaitEvent(gpu_stream(), m->sc->xfork, 0));
    }
}

/* The call's expert-side buffers: the rows received (ep) or the local ones. g_owner holds
 * across a growth (s_room copies), not across a switch. */
static void s_active(gpu_moe_t *m, bool ep)
{
    s_scratch_t *sc = m->sc;
    if (sc->ep != (int)ep)
        sc->g_owner = NULL;
    sc->ep = ep;
    sc->g = ep ? sc->gx : sc->gl;
    sc->dab = ep ? sc->dabx : sc->dabl;
    m->ab = ep ? m->abx : m->abl;
    m->xe = ep ? m->hr : m->h;
}

/* ---------------------------------------------------------------------- expert parallelism */

/* The layout of the rows received (EP): expert-major over the parts, so that one expert's rows
 * of every part lie together (its weight gradients: one GEMM): expert e's at eoff[e], of them
 * part p's at moff[p][e]. Part p arrives grouped by expert (expert e's at coff[p][e] of the
 * part's rows) and is regrouped into place; its device table (coff then moff) drives that. */
static void s_ep_layout(gpu_moe_t *m)
{
    const int E = m->E, P = m->P;
    m->eoff[0] = 0;
    for (int e = 0; e < E; e++) {
        int n = 0;
        for (int p = 0; p < P; p++)
            n += m->rcc[(size_t)p * E + e];
        m->eoff[e + 1] = m->eoff[e] + n;
    }
    for (int p = 0; p < P; p++) {
        int32_t *coff = m->rt_h + (size_t)p * (2 * E + 1), *moff = coff + E + 1;
        const int32_t *rc = m->rcc + (size_t)p * E;
        coff[0] = 0;
        for (int e = 0; e < E; e++) {
            coff[e + 1] = coff[e] + rc[e];
            moff[e] = m->eoff[e];
            for (int q = 0; q < p; q++)
                moff[e] += m->rcc[(size_t)q * E + e];
        }
    }
    GPU_CHECK(cudaMemcpyAsync(m->rt_d, m->rt_h, (size_t)P * (2 * E + 1) * sizeof(int32_t),
                              cudaMemcpyHostToDevice, gpu_stream()));
}

/* Part p's rows between its own layout (rows, d) and the expert-major one (major), on the
 * layer's stream: to_major scatters rows into major, else gathers them out. */
static void s_ep_regroup(gpu_moe_t *m, int p, bf16 *rows, bf16 *major, int to_major)
{
    int n = m->roff[p + 1] - m->roff[p];
    if (n == 0)
        return;
    const int32_t *tab = m->rt_d + (size_t)p * (2 * m->E + 1);
    s_regroup_kernel<<<n, 128, 0, gpu_stream()>>>(to_major ? major : rows,
                                                  to_major ? rows : major, tab, m->E, m->d,
                                                  to_major);
    GPU_CHECK_LAUNCH();
}

/* Part p's row of expert e in the expert-major layout. */
static inline size_t s_ep_row(const gpu_moe_t *m, int p, int e)
{
    return (size_t)m->rt_h[(size_t)p * (2 * m->E + 1) + m->E + 1 + e];
}

/* Part p's SwiGLU (backward: dg and [a | b] into [da | db]) on v's stream, one launch over its
 * rows wherever the expert-major layout has them. */
static void s_ep_swiglu(gpu_moe_t *m, const s_view_t *v, int p, bool bwd)
{
    int n = m->roff[p + 1] - m->roff[p];
    if (n == 0)
        return;
    s_scratch_t *sc = m->sc;
    const int32_t *tab = m->rt_d + (size_t)p * (2 * m->E + 1);
    if (bwd)
        s_swiglu_bwd_part_kernel<<<n, 128, 0, v->st>>>(sc->dab, sc->dgx, m->ab, tab, m->E,
                                                       m->f / S_VEC);
    else
        s_swiglu_part_kernel<<<n, 128, 0, v->st>>>(sc->g, m->ab, tab, m->E, m->f / S_VEC);
    GPU_CHECK_LAUNCH();
}

/* Part p's experts forward (on v's stream): [a | b] = xe W13[e]^T for every expert on its rows
 * of the part, g = silu(a) b, ye = g W2[e]^T (row-major as column-major, as s_experts_fwd;
 * per expert, or grouped on GPU_MOE_GEMM_GROUPED). */
static void s_ep_fwd_part(gpu_moe_t *m, const gpu_moe_weights_t *w, const s_view_t *v, int p)
{
    const bf16 *w13 = (const bf16 *)w->w13, *w2 = (const bf16 *)w->w2;
    const int d = m->d, f = m->f, E = m->E;
    const size_t df = (size_t)d * f;
    s_scratch_t *sc = m->sc;
    s_problem_t *p13 = &m->prob[P_W13], *p2 = &m->prob[P_W2];
    s_set(p13, CUBLAS_OP_T, CUBLAS_OP_N, d, d, 2 * f, 0);
    s_set(p2, CUBLAS_OP_T, CUBLAS_OP_N, f, f, d, 0);
    for (int e = 0; e < E; e++) {
        int n = m->rcc[(size_t)p * E + e];
        if (n == 0)
            continue;
        size_t s = (size_t)s_slot(w, e), r = s_ep_row(m, p, e);
        s_add(p13, 2 * f, n, d, w13 + s * 2 * df, m->xe + r * d, m->ab + r * 2 * f);
        s_add(p2, d, n, f, w2 + s * df, sc->g + r * f, sc->ye + r * d);
    }
    s_stage(m, P_W13, 2, sc->ev_fwd, v->st);
    s_run(m, P_W13, v->hb);
    s_ep_swiglu(m, v, p, false);
    s_run(m, P_W2, v->hb);
}

/* Part q's outputs (fwd: ye; bwd: dhe, expert-major) back to its senders' rows (out, part q's
 * t0[q] K rows on), through a gather into the staging rows when there are several parts. */
static semoe_rc s_ep_back(gpu_moe_t *m, const gpu_moe_exchange_t *ex, int q, bf16 *major,
                          bf16 *out)
{
    const int d = m->d, E = m->E, K = m->k;
    s_part_join(m, q);
    const bf16 *send = major; /* one part: its own layout is the expert-major one */
    if (m->P > 1) {
        s_ep_regroup(m, q, m->sc->stg, major, 0);
        send = m->sc->stg;
    }
    return ex->combine(ex->state, q, (const uint16_t *)send, m->rcc + (size_t)q * E,
                       (uint16_t *)(out + (size_t)m->t0[q] * K * d), m->hcc + (size_t)q * E);
}

/* EP forward: every part's counts announced first (the layout and the room), then per part its
 * rows dispatched and regrouped, its experts run (on xst when in parts, beside the next part's
 * dispatch), and the previous part's outputs combined back once they are done. */
static semoe_rc s_fwd_parts(gpu_moe_t *m, const gpu_moe_weights_t *w,
                            const gpu_moe_exchange_t *ex)
{
    const int d = m->d, E = m->E, K = m->k, P = m->P;
    s_scratch_t *sc = m->sc;
    m->roff[0] = 0;
    for (int p = 0; p < P; p++) {
        int rows = 0;
        SEMOE_CHECK(ex->dispatch(ex->state, p, (const uint16_t *)(m->h + (size_t)m->t0[p] * K * d),
                                 m->hcc + (size_t)p * E, NULL, m->rcc + (size_t)p * E, 0));
        SEMOE_CHECK(s_check_recv(m, w, m->rcc + (size_t)p * E, INT_MAX / 2 - m->roff[p], &rows));
        m->roff[p + 1] = m->roff[p] + rows;
    }
    int need = m->roff[P];
    if (need > m->R) /* grown by half at least: few regrowths */
        SEMOE_CHECK(s_room(m, need > m->R + m->R / 2 ? need : m->R + m->R / 2));
    s_active(m, true);
    s_ep_layout(m);
    sc->g_owner = NULL; /* g is about to be this layer's (set again once it all is) */
    for (int p = 0; p < P; p++) {
        int32_t rc[S_MAX_E];
        bf16 *dst = P > 1 ? sc->stg : m->hr;
        SEMOE_CHECK(ex->dispatch(ex->state, p, (const uint16_t *)(m->h + (size_t)m->t0[p] * K * d),
                                 m->hcc + (size_t)p * E, (uint16_t *)dst, rc, m->R));
        if (memcmp(rc, m->rcc + (size_t)p * E, (size_t)E * sizeof(int32_t)) != 0)
            return semoe_err(SEMOE_EPROTO, "gpu_moe: the exchange announced other counts for "
                             "part %d than it delivered", p);
        if (P > 1)
            s_ep_regroup(m, p, sc->stg, m->hr, 1);
        s_view_t v = s_part_view(m, p); /* on xst after the regroup, with several parts */
        if (P > 1) {
            s_ep_fwd_part(m, w, &v, p);
            if (p == 0) { /* the phases' marks on the layer's stream (they time its share) */
                s_mark(m, 3);
                s_mark(m, 4);
            }
        } else { /* one part: the rows as they came, the local path's GEMMs (streams, ours) */
            GPU_CHECK(cudaMemcpyAsync(m->rcnt_d, m->rcc, E * sizeof(int32_t),
                                      cudaMemcpyHostToDevice, gpu_stream()));
            v.cnt_d = m->rcnt_d;
            s_experts_fwd(m, w, &v, sc->ye);
        }
        s_part_done(m, &v, p);
        if (p > 0) /* the previous part's outputs (its experts ran beside this dispatch) */
            SEMOE_CHECK(s_ep_back(m, ex, p - 1, sc->ye, m->y));
    }
    SEMOE_CHECK(s_ep_back(m, ex, P - 1, sc->ye, m->y));
    sc->g_owner = m;
    m->Me = need;
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_moe_fwd_ex(gpu_moe_t *m, const gpu_moe_weights_t *w, const uint16_t *x_,
                                   uint16_t *out_, float *out32, const float *res32,
                                   const gpu_moe_exchange_t *ex)
{
    const bf16 *x = (const bf16 *)x_;
    const int T = m->T, d = m->d, E = m->E, K = m->k;
    cudaStream_t st = gpu_stream();
    if (ex && !m->R)
        return semoe_err(SEMOE_EINVAL, "gpu_moe: an exchange needs a layer from gpu_moe_new_ep");
    s_parts(m, ex ? ex->parts : 1);
    s_active(m, ex != NULL);
    s_route_fwd(m, w, x);
    if (ex) { /* the rows to their experts' holders; the expert side is what arrived */
        semoe_rc rc = s_fwd_parts(m, w, ex);
        if (rc != SEMOE_OK) {
            s_join_all(m);
            return rc;
        }
    } else {
        for (int e = 0; e < E; e++)
            if (m->hcounts[e] > 0 && s_slot(w, e) < 0)
                return semoe_err(SEMOE_EINVAL, "gpu_moe: %d rows routed to expert %d, which "
                                 "is not held here, and no exchange", m->hcounts[e], e);
        m->Me = m->M;
        s_view_t v = {0, m->M, m->hcounts, m->counts, st, m->sc->blas};
        s_experts_fwd(m, w, &v, m->y);
    }
    s_mark(m, 5);
    s_combine_kernel<<<T, s_row_threads(d), 0, st>>>((bf16 *)out_, out32, res32, m->y, m->pos,
                                                      m->wts, d, K);
    GPU_CHECK_LAUNCH();
    s_mark(m, 6);
    return SEMOE_OK;
}

extern "C" void gpu_moe_fwd(gpu_moe_t *m, const gpu_moe_weights_t *w, const uint16_t *x,
                            uint16_t *out, float *out32, const float *res32)
{
    if (gpu_moe_fwd_ex(m, w, x, out, out32, res32, NULL) != SEMOE_OK) {
        fprintf(stderr, "gpu_moe_fwd: %s\n", semoe_err_msg());
        abort();
    }
}

/* The experts' backward on view v, given dye (the gradient of their outputs, row 0 of its
 * buffer): row-major dW2[e] = dye^T g, dg = dye W2[e], dW13[e] = [da | db]^T xe,
 * dhe = [da | db] W13[e]; each in column-major terms, e.g. dW2[e] is the column-major (f, d)
 * g^T (f, n) dye (n, d): g^T as stored (N), dye stored as dye^T (T). dg overwrites g (the dW2
 * GEMM before it on the stream has read g). dW1 and dW3 as one GEMM when their tensors are
 * adjacent. */
static void s_experts_bwd(gpu_moe_t *m, const gpu_moe_weights_t *w, const s_view_t *v,
                          const bf16 *dye, bf16 *dhe, const gpu_moe_grads_t *gr)
{
    const bf16 *w13 = (const bf16 *)w->w13, *w2 = (const bf16 *)w->w2;
    const int d = m->d, f = m->f, E = m->E, f32 = gr->fp32 != 0;
    s_scratch_t *sc = m->sc;
    const size_t df = (size_t)d * f, esz = f32 ? 4 : 2;
    int fuse13 = 1;
    for (int e = 0; e < E; e++)
        if (s_slot(w, e) >= 0 && (char *)gr->dw3[e] != (char *)gr->dw1[e] + df * esz)
            fuse13 = 0;
    s_problem_t *q = m->prob;
    bf16 *dg = sc->g;
    s_set(&q[P_DW2], CUBLAS_OP_N, CUBLAS_OP_T, f, d, f, f32);
    s_set(&q[P_DG], CUBLAS_OP_N, CUBLAS_OP_N, f, d, f, 0);
    s_set(&q[P_DW13], CUBLAS_OP_N, CUBLAS_OP_T, d, 2 * f, d, f32);
    s_set(&q[P_DW3], CUBLAS_OP_N, CUBLAS_OP_T, d, 2 * f, d, f32);
    s_set(&q[P_DH], CUBLAS_OP_N, CUBLAS_OP_N, d, 2 * f, d, 0);
    size_t o = (size_t)v->r0;
    for (int e = 0; e < E; e++) {
        int n = v->cnt[e];
        size_t s = (size_t)s_slot(w, e);
        if (n > 0) {
            const bf16 *dab = sc->dab + o * 2 * f;
            s_add(&q[P_DW2], f, d, n, sc->g + o * f, dye + o * d, gr->dw2[e]);
            s_add(&q[P_DG], f, n, d, w2 + s * df, dye + o * d, dg + o * f);
            if (fuse13) {
                s_add(&q[P_DW13], d, 2 * f, n, m->xe + o * d, dab, gr->dw1[e]);
            } else {
                s_add(&q[P_DW13], d, f, n, m->xe + o * d, dab, gr->dw1[e]);
                s_add(&q[P_DW3], d, f, n, m->xe + o * d, dab + f, gr->dw3[e]);
            }
            s_add(&q[P_DH], d, n, 2 * f, w13 + s * 2 * df, dab, dhe + o * d);
        } else if (!f32 && s_slot(w, e) >= 0) { /* no token: zero gradients, no GEMM writes them */
            GPU_CHECK(cudaMemsetAsync(gr->dw1[e], 0, df * 2, v->st));
            GPU_CHECK(cudaMemsetAsync(gr->dw3[e], 0, df * 2, v->st));
            GPU_CHECK(cudaMemsetAsync(gr->dw2[e], 0, df * 2, v->st));
        }
        o += (size_t)n;
    }
    s_stage(m, P_DW2, S_NPROB - P_DW2, sc->ev_bwd, v->st);
    if (m->gemm == GPU_MOE_GEMM_STREAMS && v->st == gpu_stream()) { /* the three phases as one */
        s_experts_bwd_streams(m);
        s_mark(m, 9);
        s_mark(m, 10);
        return;
    }
    /* in order; on FUSED, dg (with SwiGLU's backward in our epilogue: dg never stored, g kept)
     * and dh on our kernel where s_own says so */
    const size_t r0 = (size_t)v->r0;
    bool own = s_own_view(m, w, v);
    s_run(m, P_DW2, v->hb);
    if (own && s_own(m, S_OWN_DG)) {
        s_own_gemm(m, v, GPU_MOE_EPI_DSWIGLU, dye + r0 * d, d, w2, true, f, sc->dab + r0 * 2 * f,
                   NULL, m->ab + r0 * 2 * f);
        s_mark(m, 9);
    } else {
        s_run(m, P_DG, v->hb);
        s_mark(m, 9);
        s_swiglu_bwd_rows(m, v->r0, v->rows, v->st);
        sc->g_owner = NULL; /* g now holds dg */
    }
    s_mark(m, 10);
    s_run(m, P_DW13, v->hb);
    s_run(m, P_DW3, v->hb);
    if (own && s_own(m, S_OWN_DH))
        s_own_gemm(m, v, GPU_MOE_EPI_PLAIN, sc->dab + r0 * 2 * f, 2 * f, w13, true, d,
                   dhe + r0 * d, NULL, NULL);
    else
        s_run(m, P_DH, v->hb);
}

/* Part p's experts backward for the data (on v's stream): dg = dye W2[e] on every expert's
 * rows of the part (into dgx: g stays for dW2), SwiGLU's backward into dab, dhe = dab W13[e]
 * (per expert, or grouped). */
static void s_ep_bwd_part(gpu_moe_t *m, const gpu_moe_weights_t *w, const s_view_t *v, int p)
{
    const bf16 *w13 = (const bf16 *)w->w13, *w2 = (const bf16 *)w->w2;
    const int d = m->d, f = m->f, E = m->E;
    const size_t df = (size_t)d * f;
    s_scratch_t *sc = m->sc;
    s_problem_t *q = m->prob;
    for (int k = P_DG; k <= P_DH; k++) /* the slots staged below; the weights' stay empty */
        s_set(&q[k], CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, 0);
    s_set(&q[P_DG], CUBLAS_OP_N, CUBLAS_OP_N, f, d, f, 0);
    s_set(&q[P_DH], CUBLAS_OP_N, CUBLAS_OP_N, d, 2 * f, d, 0);
    for (int e = 0; e < E; e++) {
        int n = m->rcc[(size_t)p * E + e];
        if (n == 0)
            continue;
        size_t s = (size_t)s_slot(w, e), r = s_ep_row(m, p, e);
        s_add(&q[P_DG], f, n, d, w2 + s * df, sc->dye + r * d, sc->dgx + r * f);
        s_add(&q[P_DH], d, n, 2 * f, w13 + s * 2 * df, sc->dab + r * 2 * f, sc->dhe + r * d);
    }
    s_stage(m, P_DG, P_DH - P_DG + 1, sc->ev_bwd, v->st);
    s_run(m, P_DG, v->hb);
    s_ep_swiglu(m, v, p, true);
    s_run(m, P_DH, v->hb);
}

/* The weight gradients of every held expert, once over all its rows of every part (on v's
 * stream): dW2[e] = dye^T g, dW13[e] = dab^T xe (dW1 and dW3 as one GEMM when adjacent);
 * fp32 accumulated, or bf16 overwritten (zeros for an expert without rows). */
static void s_ep_weights(gpu_moe_t *m, const gpu_moe_weights_t *w, const s_view_t *v,
                         const gpu_moe_grads_t *gr)
{
    const int d = m->d, f = m->f, E = m->E, f32 = gr->fp32 != 0;
    const size_t df = (size_t)d * f, esz = f32 ? 4 : 2;
    const cudaDataType_t ct = f32 ? CUDA_R_32F : CUDA_R_16BF;
    const float beta = f32 ? 1.0f : 0.0f;
    s_scratch_t *sc = m->sc;
    for (int e = 0; e < E; e++) {
        if (s_slot(w, e) < 0)
            continue;
        size_t r = (size_t)m->eoff[e];
        int n = m->eoff[e + 1] - m->eoff[e];
        if (n == 0) {
            if (!f32) {
                GPU_CHECK(cudaMemsetAsync(gr->dw1[e], 0, df * 2, v->st));
                GPU_CHECK(cudaMemsetAsync(gr->dw3[e], 0, df * 2, v->st));
                GPU_CHECK(cudaMemsetAsync(gr->dw2[e], 0, df * 2, v->st));
            }
            continue;
        }
        s_gemm(v->hb, CUBLAS_OP_N, CUBLAS_OP_T, f, d, n, sc->g + r * f, f, sc->dye + r * d, d,
               beta, gr->dw2[e], ct, f);
        const bf16 *dab = sc->dab + r * 2 * f;
        if ((char *)gr->dw3[e] == (char *)gr->dw1[e] + df * esz) {
            s_gemm(v->hb, CUBLAS_OP_N, CUBLAS_OP_T, d, 2 * f, n, m->xe + r * d, d, dab, 2 * f,
                   beta, gr->dw1[e], ct, d);
        } else {
            s_gemm(v->hb, CUBLAS_OP_N, CUBLAS_OP_T, d, f, n, m->xe + r * d, d, dab, 2 * f, beta,
                   gr->dw1[e], ct, d);
            s_gemm(v->hb, CUBLAS_OP_N, CUBLAS_OP_T, d, f, n, m->xe + r * d, d, dab + f, 2 * f,
                   beta, gr->dw3[e], ct, d);
        }
    }
}

/* EP backward: per part, dy to the experts' holders as the forward's rows went (combine's
 * transpose), regrouped, the experts' data gradients there (on xst when in parts, beside the
 * next part's dispatch), dh back (dispatch's transpose) once the part is done; the weight
 * gradients once per expert over every part's rows, beside the last part's way back. */
static semoe_rc s_bwd_parts(gpu_moe_t *m, const gpu_moe_weights_t *w, const gpu_moe_grads_t *gr,
                            const gpu_moe_exchange_t *ex)
{
    const int d = m->d, E = m->E, K = m->k, P = m->P;
    s_scratch_t *sc = m->sc;
    s_view_t v = {0};
    for (int p = 0; p < P; p++) {
        int32_t cnt[S_MAX_E];
        const int32_t *rc = m->rcc + (size_t)p * E;
        bf16 *dst = P > 1 ? sc->stg : sc->dye;
        SEMOE_CHECK(ex->dispatch(ex->state, p, (const uint16_t *)(sc->dy + (size_t)m->t0[p] * K * d),
                                 m->hcc + (size_t)p * E, (uint16_t *)dst, cnt, m->R));
        for (int e = 0; e < E; e++)
            if (cnt[e] != rc[e])
                return semoe_err(SEMOE_EPROTO, "gpu_moe: backward's exchange delivered %d rows "
                                 "of expert %d in part %d, the forward's %d", cnt[e], e, p,
                                 rc[e]);
        if (P > 1)
            s_ep_regroup(m, p, sc->stg, sc->dye, 1);
        v = s_part_view(m, p);
        if (P > 1) {
            s_ep_bwd_part(m, w, &v, p);
            if (p == 0) {
                s_mark(m, 9);
                s_mark(m, 10);
            }
        } else { /* one part: the local path's GEMMs, the weight gradients among them */
            v.cnt_d = m->rcnt_d;
            s_experts_bwd(m, w, &v, sc->dye, sc->dhe, gr);
        }
        s_part_done(m, &v, p);
        if (p > 0)
            SEMOE_CHECK(s_ep_back(m, ex, p - 1, sc->dhe, sc->dh));
    }
    if (P > 1)
        s_ep_weights(m, w, &v, gr); /* after the last part's data, on its stream */
    SEMOE_CHECK(s_ep_back(m, ex, P - 1, sc->dhe, sc->dh));
    s_join_all(m); /* the weight gradients too, before the caller's stream goes on */
    sc->g_owner = NULL; /* the next forward's g: a layer's backward ends its use */
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_moe_bwd_ex(gpu_moe_t *m, const gpu_moe_weights_t *w, const uint16_t *x_,
                                   const uint16_t *dout_, const float *dout32, uint16_t *dx_,
                                   const gpu_moe_grads_t *gr, const gpu_moe_exchange_t *ex)
{
    bf16 *dx = (bf16 *)dx_;
    const bf16 *x = (const bf16 *)x_, *wg = (const bf16 *)w->wg;
    const int T = m->T, d = m->d, E = m->E, K = m->k, f32 = gr->fp32 != 0;
    s_scratch_t *sc = m->sc;
    cudaStream_t st = gpu_stream();
    if ((ex != NULL) != (m->R && m->xe == m->hr))
        return semoe_err(SEMOE_EINVAL, "gpu_moe: backward %s an exchange after a forward %s "
                         "one", ex ? "with" : "without", ex ? "without" : "with");
    s_active(m, ex != NULL);
    if (ex && s_parts_for(m, ex->parts) != m->P)
        return semoe_err(SEMOE_EINVAL, "gpu_moe: backward in %d parts after a forward in %d",
                         ex->parts, m->P);

    s_mark(m, 7);
    if (dout32)
        s_combine_bwd_kernel<float><<<T, s_row_threads(d), 0, st>>>(sc->dy, sc->dwt, dout32,
                                                                    m->y, m->pos, m->wts, d, K);
    else
        s_combine_bwd_kernel<bf16><<<T, s_row_threads(d), 0, st>>>(
            sc->dy, sc->dwt, (const bf16 *)dout_, m->y, m->pos, m->wts, d, K);
    GPU_CHECK_LAUNCH();
    if (sc->g_owner != m) /* another layer's call used the scratch since our forward */
        s_swiglu(m);
    s_mark(m, 8);

    if (ex) {
        semoe_rc rc = s_bwd_parts(m, w, gr, ex);
        if (rc != SEMOE_OK) {
            s_join_all(m);
            return rc;
        }
    } else {
        s_view_t v = {0, m->M, m->hcounts, m->counts, st, sc->blas};
        s_experts_bwd(m, w, &v, sc->dy, sc->dh, gr);
    }
    s_mark(m, 11);

    /* router: dlogits, then dwg (E, d) as the column-major dwg^T (d, E) = x^T (d, T) dlog
     * (T, E) (dlog stored as its transpose: T), and dxr^T (d, T) = wg^T (d, E) dlog^T (E, T),
     * wg stored as the column-major (d, E) */
    s_route_bwd_kernel<<<(T + 7) / 8, 256, 0, st>>>(sc->dlog, sc->dwt, m->probs, m->idx,
                                                    gr->daux, T, E, K);
    GPU_CHECK_LAUNCH();
    s_mark(m, 12);
    s_gemm(sc->blas, CUBLAS_OP_N, CUBLAS_OP_T, d, E, T, x, d, sc->dlog, E, f32 ? 1.0f : 0.0f,
           gr->dwg, f32 ? CUDA_R_32F : CUDA_R_16BF, d);
    s_gemm(sc->blas, CUBLAS_OP_N, CUBLAS_OP_N, d, T, E, wg, d, sc->dlog, E, 0.0f, sc->dxr,
           CUDA_R_32F, d);
    s_mark(m, 13);
    s_dx_kernel<<<T, s_row_threads(d), 0, st>>>(dx, sc->dxr, sc->dh, m->pos, d, K);
    GPU_CHECK_LAUNCH();
    s_mark(m, 14);
    return SEMOE_OK;
}

extern "C" void gpu_moe_bwd(gpu_moe_t *m, const gpu_moe_weights_t *w, const uint16_t *x,
                            const uint16_t *dout, const float *dout32, uint16_t *dx,
                            const gpu_moe_grads_t *gr)
{
    if (gpu_moe_bwd_ex(m, w, x, dout, dout32, dx, gr, NULL) != SEMOE_OK) {
        fprintf(stderr, "gpu_moe_bwd: %s\n", semoe_err_msg());
        abort();
    }
}
