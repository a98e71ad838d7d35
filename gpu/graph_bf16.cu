/* gpu/graph_bf16.h: the mixed-precision pass. The GEMMs are cublasGemmEx in cuBLAS's
 * column-major view of row-major data: a row-major (r, c) matrix is the column-major (c, r), so
 * y (N, out) = x (N, in) W^T (W nn.Linear's (out, in)) is the column-major
 * y^T (out, N) = op_T(W stored as (in, out)) x^T (in, N). */
#include "gpu/graph_bf16.h"
#include "gpu/bf16_ops.h"
#include "gpu/cublas.h"
#include "gpu/flash_attn.h"
#include "gpu/moe_layer.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef uint16_t bf16_t; /* bit patterns on this side */

/* Where one layer's tensors are: fp32 offsets into the master/gradient slabs, bf16 pointers
 * into the graph's weight copy. */
typedef struct {
    size_t ln1, qkv, o, ln2, gate;                /* slab offsets; qkv: q_proj, k, v follow */
    size_t *w1, *w2, *w3;                         /* (E) slab offsets per expert (SIZE_MAX:
                                                   * not held) */
    int32_t *slot;                                /* (E) index among the held experts, or -1 */
    int held;                                     /* experts held */
    bf16_t *bqkv, *bo, *bgate, *bw13, *bw2;       /* into the bf16 copy (held experts only) */
    void **gp;                                    /* (3E) gradient pointers for the MoE layer */
} s_layer_t;

struct gpu_graph_bf16 {
    const model_params_t *params;
    int B, T, N, L, D, H, KVH, hd, Q, KV, QKV, E, K, F, V;
    int R; /* expert rows per MoE layer from an exchange (expert parallelism); 0: local */
    int missing; /* the first expert (l E + e) params does not hold, or -1 */
    float eps, aux_coef;
    double theta;
    size_t embed, norm, lm;
    s_layer_t *layer;
    const float *rbias;

    void *wslab;    /* the bf16 weight copy */
    bf16_t *blm;    /* (V, D) */
    void *aslab;    /* activations and scratch */
    int32_t *tok;   /* (3N) device: inputs, targets, positions */
    float *res;     /* (2L + 1, N, D) fp32: x0, then per layer res1, res2 */
    bf16_t *ln1, *ln2; /* (L, N, D) */
    float *rstd1, *rstd2; /* (L, N) */
    bf16_t *qkv_r;  /* (L, N, QKV): per layer q (N, H, hd), k, v (N, KVH, hd) after RoPE */
    bf16_t *att;    /* (L, N, Q) */
    float *lse;     /* (L, B, H, T) */
    bf16_t *lnf;    /* (N, D) */
    float *rstdf;   /* (N) */
    bf16_t *logits; /* (N, V); dlogits in place during backward */
    float *ce_lse, *losses; /* (N) */
    float *psum;    /* (L, E) router probability sums per layer */
    float *colwork; /* gpu_bf16_column_sum's workspace */
    float *daux;    /* (E) */
    /* backward scratch */
    float *dres;    /* (N, D) fp32: the residual stream's gradient */
    bf16_t *dres_b; /* (N, D) its bf16 rounding, for the GEMMs */
    bf16_t *dln;    /* (N, D) */
    bf16_t *datt;   /* (N, Q) */
    bf16_t *dqkv;   /* (N, QKV): the q, k, v gradients, then (in place of qkv) the projection's */
    bf16_t *dqkv_s; /* (N, QKV): split dq, dk, dv from flash */
    float *fwork;   /* flash backward workspace */
    gpu_moe_t **moe; /* (L) */

    float *h_losses;   /* (N) host */
    float *h_psum;     /* (L E) host */
    int32_t *h_tok;    /* (3N) host */
    double ce_scale;   /* d loss / d ce per row: 1 / N locally, 1 / global targets with stats */
    double *aux_grad;  /* (E) host: E f_e / M */
    int fwd_done;
    const model_exchange_f32 *ex; /* the last forward's, for backward's load accounting */
    void (*ready)(void *arg, int layer); /* model_pass_t's on_dense_ready */
    void *ready_arg;
};

/* ---------------------------------------------------------------------- setup */

/* A tensor's offset in the slabs; one not held is an error unless `may_lack` (an expert: SIZE_MAX,
 * and the forward refuses to run without expert rows). */
static semoe_rc s_off(const model_params_t *params, size_t *off, int may_lack, const char *fmt,
                      int a, int b)
{
    char name[MODEL_PARAM_NAME_MAX];
    snprintf(name, sizeof name, fmt, a, b);
    const model_param_t *p = model_params_lookup(params, name);
    if (!p)
        return semoe_err(SEMOE_EINVAL, "bf16 graph: parameter %s missing from the table", name);
    if (!p->data && !may_lack)
        return semoe_err(SEMOE_EINVAL,
                         "bf16 graph: %s is not held here", name);
    *off = p->data ? (size_t)p->offset : SIZE_MAX;
    return SEMOE_OK;
}


static semoe_rc s_offsets(gpu_graph_bf16_t *g)
{
    const model_params_t *P = g->params;
    const model_config_t *cfg = model_params_config(P);
    SEMOE_CHECK(s_off(P, &g->embed, 0, "model.embed_tokens.weight%.0d%.0d", 0, 0));
    SEMOE_CHECK(s_off(P, &g->norm, 0, "model.norm.weight%.0d%.0d", 0, 0));
    if (cfg->tie_word_embeddings)
        g->lm = g->embed;
    else
        SEMOE_CHECK(s_off(P, &g->lm, 0, "lm_head.weight%.0d%.0d", 0, 0));
    for (int l = 0; l < g->L; l++) {
        s_layer_t *ly = &g->layer[l];
        size_t k = 0, v = 0;
        SEMOE_CHECK(s_off(P, &ly->ln1, 0, "model.layers.%d.input_layernorm.weight%.0d", l, 0));
        SEMOE_CHECK(s_off(P, &ly->qkv, 0, "model.layers.%d.self_attn.q_proj.weight%.0d", l, 0));
        SEMOE_CHECK(s_off(P, &k, 0, "model.layers.%d.self_attn.k_proj.weight%.0d", l, 0));
        SEMOE_CHECK(s_off(P, &v, 0, "model.layers.%d.self_attn.v_proj.weight%.0d", l, 0));
        if (k != ly->qkv + (size_t)g->Q * g->D || v != k + (size_t)g->KV * g->D)
            return semoe_err(SEMOE_EINVAL, "bf16 graph: layer %d: q_proj, k_proj and v_proj are "
                             "not adjacent in the slab", l);
        SEMOE_CHECK(s_off(P, &ly->o, 0, "model.layers.%d.self_attn.o_proj.weight%.0d", l, 0));
        SEMOE_CHECK(s_off(P, &ly->ln2, 0, "model.layers.%d.post_attention_layernorm.weight%.0d", l,
                          0));
        SEMOE_CHECK(s_off(P, &ly->gate, 0, "model.layers.%d.block_sparse_moe.gate.weight%.0d", l,
                          0));
        ly->held = 0;
        for (int e = 0; e < g->E; e++) {
            SEMOE_CHECK(s_off(P, &ly->w1[e], 1,
                              "model.layers.%d.block_sparse_moe.experts.%d.w1.weight", l, e));
            SEMOE_CHECK(s_off(P, &ly->w2[e], 1,
                              "model.layers.%d.block_sparse_moe.experts.%d.w2.weight", l, e));
            SEMOE_CHECK(s_off(P, &ly->w3[e], 1,
                              "model.layers.%d.block_sparse_moe.experts.%d.w3.weight", l, e));
            int has = ly->w1[e] != SIZE_MAX;
            if (has != (ly->w2[e] != SIZE_MAX) || has != (ly->w3[e] != SIZE_MAX))
                return semoe_err(SEMOE_EINVAL, "bf16 graph: layer %d expert %d: w1, w2 and w3 "
                                 "not all held, or all not", l, e);
            ly->slot[e] = has ? ly->held++ : -1;
            if (!has && g->missing < 0)
                g->missing = l * g->E + e;
        }
    }
    return SEMOE_OK;
}

/* The bf16 weight copy's layout: per layer qkv (QKV, D), o (D, Q), gate (E, D), w13 (held, 2F,
 * D), w2 (held, D, F) for the experts held, in expert order (s_layer_t's slot); then the LM
 * head (V, D). */
static semoe_rc s_weights_new(gpu_graph_bf16_t *g)
{
    size_t D = (size_t)g->D, F = (size_t)g->F, E = (size_t)g->E, L = (size_t)g->L;
    size_t n = 5 * L + 1;
    size_t *sz = (size_t *)semoe_xcalloc(n, sizeof *sz);
    void ***ptrs = (void ***)semoe_xcalloc(n, sizeof *ptrs);
    for (size_t l = 0; l < L; l++) {
        s_layer_t *ly = &g->layer[l];
        size_t i = 5 * l;
        sz[i] = (size_t)g->QKV * D * 2, ptrs[i] = (void **)&ly->bqkv;
        sz[i + 1] = D * g->Q * 2, ptrs[i + 1] = (void **)&ly->bo;
        sz[i + 2] = E * D * 2, ptrs[i + 2] = (void **)&ly->bgate;
        sz[i + 3] = (size_t)ly->held * 2 * F * D * 2, ptrs[i + 3] = (void **)&ly->bw13;
        sz[i + 4] = (size_t)ly->held * D * F * 2, ptrs[i + 4] = (void **)&ly->bw2;
    }
    sz[5 * L] = (size_t)g->V * D * 2, ptrs[5 * L] = (void **)&g->blm;
    size_t total = 0;
    g->wslab = gpu_alloc_slab(sz, ptrs, (int)n, &total);
    free(sz);
    free(ptrs);
    if (!g->wslab)
        return semoe_err(SEMOE_ENOMEM, "bf16 graph: cannot allocate the bf16 weights (%.2f GiB)",
                         total / 1073741824.0);
    return SEMOE_OK;
}

static semoe_rc s_acts_new(gpu_graph_bf16_t *g)
{
    size_t N = (size_t)g->N, L = (size_t)g->L, D = (size_t)g->D, E = (size_t)g->E;
    size_t fw = gpu_flash_bwd_workspace(g->B, g->T, g->H, g->KVH, g->hd);
    size_t sz[] = {
        3 * N * 4,                       /* tok */
        (2 * L + 1) * N * D * 4,         /* res */
        L * N * D * 2, L * N * D * 2,    /* ln1, ln2 */
        L * N * 4, L * N * 4,            /* rstd1, rstd2 */
        L * N * g->QKV * 2,              /* qkv_r */
        L * N * g->Q * 2,                /* att */
        L * g->B * g->H * (size_t)g->T * 4, /* lse */
        N * D * 2, N * 4,                /* lnf, rstdf */
        N * g->V * 2,                    /* logits */
        N * 4, N * 4,                    /* ce_lse, losses */
        L * E * 4,                       /* psum */
        gpu_bf16_column_sum_work(g->N, g->E), /* colwork */
        E * 4,                           /* daux */
        N * D * 4, N * D * 2, N * D * 2, /* dres, dres_b, dln */
        N * g->Q * 2,                    /* datt */
        N * g->QKV * 2, N * g->QKV * 2,  /* dqkv, dqkv_s */
        fw,                              /* fwork */
    };
    void **const ptrs[] = {
        (void **)&g->tok,    (void **)&g->res,    (void **)&g->ln1,    (void **)&g->ln2,
        (void **)&g->rstd1,  (void **)&g->rstd2,  (void **)&g->qkv_r,  (void **)&g->att,
        (void **)&g->lse,    (void **)&g->lnf,    (void **)&g->rstdf,  (void **)&g->logits,
        (void **)&g->ce_lse, (void **)&g->losses, (void **)&g->psum,   (void **)&g->colwork,
        (void **)&g->daux,   (void **)&g->dres,   (void **)&g->dres_b, (void **)&g->dln,
        (void **)&g->datt,   (void **)&g->dqkv,   (void **)&g->dqkv_s, (void **)&g->fwork,
    };
    static_assert(sizeof sz / sizeof sz[0] == sizeof ptrs / sizeof ptrs[0], "one size each");
    size_t total = 0;
    g->aslab = gpu_alloc_slab(sz, ptrs, (int)(sizeof sz / sizeof sz[0]), &total);
    if (!g->aslab)
        return semoe_err(SEMOE_ENOMEM, "bf16 graph: cannot allocate the activations (%.2f GiB "
                         "for %d x %d tokens)", total / 1073741824.0, g->B, g->T);
    g->moe = (gpu_moe_t **)semoe_xcalloc(L ? L : 1, sizeof *g->moe);
    for (int l = 0; l < g->L; l++) {
        g->moe[l] = l == 0 ? gpu_moe_new_ep(g->N, g->D, g->F, g->E, g->K, g->R)
                           : gpu_moe_new_sharing(g->moe[0]);
        if (!g->moe[l])
            return semoe_err(SEMOE_EINVAL, "bf16 graph: layer %d: no MoE layer for N=%d D=%d "
                             "F=%d E=%d K=%d (the message above says why: its limits or the "
                             "device memory)", l, g->N, g->D, g->F, g->E, g->K);
        gpu_moe_set_round_logits(g->moe[l], 0);
    }
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_graph_bf16_new(const model_params_t *params, int B, int T,
                                       int expert_rows, gpu_graph_bf16_t **out)
{
    *out = NULL;
    const model_config_t *cfg = model_params_config(params);
    if (B <= 0 || T <= 0 || expert_rows < 0)
        return semoe_err(SEMOE_EINVAL, "bf16 graph: B=%d, T=%d, expert_rows=%d: need at least "
                         "one token and no negative capacity", B, T, expert_rows);
    if (cfg->sliding_window && (uint32_t)T > cfg->sliding_window)
        return semoe_err(SEMOE_EINVAL, "bf16 graph: T=%d exceeds sliding_window=%u, which it "
                         "does not implement", T, cfg->sliding_window);
    gpu_graph_bf16_t *g = (gpu_graph_bf16_t *)semoe_xcalloc(1, sizeof *g);
    g->params = params;
    g->B = B, g->T = T, g->N = B * T, g->R = expert_rows, g->missing = -1;
    g->L = (int)cfg->num_hidden_layers, g->D = (int)cfg->hidden_size;
    g->H = (int)cfg->num_attention_heads, g->KVH = (int)cfg->num_key_value_heads;
    g->hd = (int)cfg->head_dim, g->E = (int)cfg->num_local_experts;
    g->K = (int)cfg->num_experts_per_tok, g->F = (int)cfg->intermediate_size;
    g->V = (int)cfg->vocab_size;
    g->Q = g->H * g->hd, g->KV = g->KVH * g->hd, g->QKV = g->Q + 2 * g->KV;
    g->eps = (float)cfg->rms_norm_eps, g->theta = cfg->rope_theta;
    g->aux_coef = (float)cfg->router_aux_loss_coef;
    semoe_rc rc = SEMOE_OK;
    if (g->hd != 64 && g->hd != 128)
        rc = semoe_err(SEMOE_EINVAL, "bf16 graph: head_dim %d: the flash kernels take 64 or 128",
                       g->hd);
    else if (g->D % 8 || g->F % 8 || g->V % 8)
        rc = semoe_err(SEMOE_EINVAL, "bf16 graph: hidden %d, intermediate %d, vocab %d: each "
                       "must be a multiple of 8", g->D, g->F, g->V);
    if (rc != SEMOE_OK) {
        free(g);
        return rc;
    }
    g->layer = (s_layer_t *)semoe_xcalloc(g->L ? g->L : 1, sizeof *g->layer);
    for (int l = 0; l < g->L; l++) {
        g->layer[l].w1 = (size_t *)semoe_xcalloc(3 * (size_t)g->E, sizeof(size_t));
        g->layer[l].w2 = g->layer[l].w1 + g->E;
        g->layer[l].w3 = g->layer[l].w2 + g->E;
        g->layer[l].gp = (void **)semoe_xcalloc(3 * (size_t)g->E, sizeof(void *));
        g->layer[l].slot = (int32_t *)semoe_xcalloc((size_t)g->E, sizeof(int32_t));
    }
    g->h_losses = (float *)semoe_xcalloc(g->N, sizeof(float));
    g->h_psum = (float *)semoe_xcalloc((size_t)g->L * g->E + 1, sizeof(float));
    g->h_tok = (int32_t *)semoe_xcalloc(3 * (size_t)g->N, sizeof(int32_t));
    g->aux_grad = (double *)semoe_xcalloc((size_t)g->E, sizeof(double));
    rc = s_offsets(g);
    if (rc == SEMOE_OK)
        rc = s_weights_new(g);
    if (rc == SEMOE_OK)
        rc = s_acts_new(g);
    if (rc != SEMOE_OK) {
        gpu_graph_bf16_destroy(&g);
        return rc;
    }
    *out = g;
    return SEMOE_OK;
}

extern "C" void gpu_graph_bf16_destroy(gpu_graph_bf16_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    gpu_graph_bf16_t *g = *self_p;
    if (g->moe)
        for (int l = 0; l < g->L; l++)
            gpu_moe_destroy(&g->moe[l]);
    free(g->moe);
    gpu_free(g->aslab);
    gpu_free(g->wslab);
    for (int l = 0; g->layer && l < g->L; l++) {
        free(g->layer[l].w1);
        free(g->layer[l].gp);
        free(g->layer[l].slot);
    }
    free(g->layer);
    free(g->h_losses);
    free(g->h_psum);
    free(g->h_tok);
    free(g->aux_grad);
    free(g);
    *self_p = NULL;
}

extern "C" void gpu_graph_bf16_set_router_bias(gpu_graph_bf16_t *self, const float *bias)
{
    self->rbias = bias;
}

extern "C" const int32_t *gpu_graph_bf16_route(const gpu_graph_bf16_t *self, int l)
{
    return gpu_moe_idx(self->moe[l]);
}

extern "C" const uint16_t *gpu_graph_bf16_logits(const gpu_graph_bf16_t *self)
{
    return self->logits;
}

/* ---------------------------------------------------------------------- profile */

static int s_prof_on;
static int s_prof_cur = -1; /* the kind of the section running, -1 none */
static double s_prof_t, s_prof[GPU_GRAPH_NKIND];

static double s_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A section of kind (-1: none) starts: the previous one's time (device included) is added. */
static void s_section(int kind)
{
    if (!s_prof_on)
        return;
    GPU_CHECK(cudaStreamSynchronize(gpu_stream()));
    double t = s_now();
    if (s_prof_cur >= 0)
        s_prof[s_prof_cur] += t - s_prof_t;
    s_prof_t = t;
    s_prof_cur = kind;
}

/* After layer m's backward: its fwd + bwd phases split into GEMMs and the rest, moved from
 * the MoE-other sum (where the host clock put the whole layer) to the GEMM one. */
static void s_moe_phases(gpu_moe_t *m)
{
    if (!s_prof_on)
        return;
    float ms[GPU_MOE_NPHASES];
    if (gpu_moe_phase_ms(m, ms) != 0)
        return;
    double gemm = 0;
    for (int i = 0; i < GPU_MOE_NPHASES; i++)
        if (strncmp(gpu_moe_phase_name(i), "gemm", 4) == 0)
            gemm += ms[i] * 1e-3;
    s_prof[GPU_GRAPH_MOE_GEMM] += gemm;
    s_prof[GPU_GRAPH_MOE_OTHER] -= gemm;
}

extern "C" void gpu_graph_bf16_profile(int on)
{
    s_prof_on = on != 0;
    s_prof_cur = -1;
}

extern "C" void gpu_graph_bf16_profile_take(double seconds[GPU_GRAPH_NKIND])
{
    memcpy(seconds, s_prof, sizeof s_prof);
    memset(s_prof, 0, sizeof s_prof);
}

extern "C" const char *gpu_graph_bf16_kind(int kind)
{
    static const char *const names[GPU_GRAPH_NKIND] = {
        "gemm", "moe_gemm", "moe_other", "attention", "norm_loss", "convert", "host"};
    return kind >= 0 && kind < GPU_GRAPH_NKIND ? names[kind] : "?";
}

/* ---------------------------------------------------------------------- the pass */

/* C (m, n) column-major = op(A) op(B), bf16 A and B, fp32 accumulation; C bf16 (beta 0) or,
 * with c32, fp32 accumulated (beta 1). */
static void s_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                   const void *A, int lda, const void *B, int ldb, void *C, int ldc, int c32)
{
    const float alpha = 1.0f, beta = c32 ? 1.0f : 0.0f;
    GPU_CUBLAS(cublasGemmEx(gpu_cublas(), ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B,
                            CUDA_R_16BF, ldb, &beta, C, c32 ? CUDA_R_32F : CUDA_R_16BF, ldc,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

/* y (N, out) = x (N, in) W^T, W (out, in) row-major: bf16 y, or fp32 y += with c32. */
static void s_linear(void *y, const bf16_t *x, const bf16_t *W, int N, int in, int out, int c32)
{
    s_gemm(CUBLAS_OP_T, CUBLAS_OP_N, out, N, in, W, in, x, in, y, out, c32);
}

/* dx (N, in) = dy (N, out) W (bf16, overwritten); dW (out, in) fp32 += dy^T x. */
static void s_linear_bwd(bf16_t *dx, float *dW, const bf16_t *dy, const bf16_t *x,
                         const bf16_t *W, int N, int in, int out)
{
    if (dx)
        s_gemm(CUBLAS_OP_N, CUBLAS_OP_N, in, N, out, W, in, dy, out, dx, in, 0);
    s_gemm(CUBLAS_OP_N, CUBLAS_OP_T, in, out, N, x, in, dy, out, dW, in, 1);
}

/* The master weights rounded into the bf16 copy. */
static void s_round_weights(gpu_graph_bf16_t *g, const float *w)
{
    size_t D = (size_t)g->D, F = (size_t)g->F;
    for (int l = 0; l < g->L; l++) {
        s_layer_t *ly = &g->layer[l];
        gpu_bf16_from_f32(ly->bqkv, w + ly->qkv, (size_t)g->QKV * D);
        gpu_bf16_from_f32(ly->bo, w + ly->o, D * g->Q);
        gpu_bf16_from_f32(ly->bgate, w + ly->gate, (size_t)g->E * D);
        for (int e = 0; e < g->E; e++) {
            if (ly->slot[e] < 0)
                continue;
            size_t s = (size_t)ly->slot[e];
            gpu_bf16_from_f32(ly->bw13 + s * 2 * F * D, w + ly->w1[e], F * D);
            gpu_bf16_from_f32(ly->bw13 + s * 2 * F * D + F * D, w + ly->w3[e], F * D);
            gpu_bf16_from_f32(ly->bw2 + s * D * F, w + ly->w2[e], D * F);
        }
    }
    gpu_bf16_from_f32(g->blm, w + g->lm, (size_t)g->V * D);
}

static gpu_moe_weights_t s_moe_weights(const gpu_graph_bf16_t *g, int l)
{
    const s_layer_t *ly = &g->layer[l];
    gpu_moe_weights_t mw = {ly->bgate, ly->bw13, ly->bw2, g->rbias,
                            ly->held < g->E ? ly->slot : NULL};
    return mw;
}

/* Expert parallelism: one MoE layer's exchange (gpu/moe_layer.h) over the graph's
 * model_exchange_f32, a bf16 row of D passing as D / 2 floats (D is a multiple of 8). */
typedef struct {
    const model_exchange_f32 *ex;
    int layer, E, D;
} s_xch_t;

static semoe_rc s_xch_dispatch(void *state, int part, const uint16_t *send,
                               const int32_t *send_counts, uint16_t *recv, int32_t *recv_counts,
                               int recv_cap)
{
    const s_xch_t *x = (const s_xch_t *)state;
    return x->ex->dispatch(x->ex->state, x->layer, part, x->E, x->D / 2, (const float *)send,
                           send_counts, (float *)recv, recv_counts, recv_cap);
}

static semoe_rc s_xch_combine(void *state, int part, const uint16_t *send,
                              const int32_t *send_counts, uint16_t *recv,
                              const int32_t *recv_counts)
{
    const s_xch_t *x = (const s_xch_t *)state;
    return x->ex->combine(x->ex->state, x->layer, part, x->E, x->D / 2, (const float *)send,
                          send_counts, (float *)recv, recv_counts);
}

/* Layer l's exchange in *mx (state in *st), or NULL when the graph runs its experts locally. */
static const gpu_moe_exchange_t *s_xch(const gpu_graph_bf16_t *g, const model_exchange_f32 *ex,
                                       int l, s_xch_t *st, gpu_moe_exchange_t *mx)
{
    if (!g->R)
        return NULL;
    *st = (s_xch_t){ex, l, g->E, g->D};
    *mx = (gpu_moe_exchange_t){st, ex->parts, s_xch_dispatch, s_xch_combine};
    return mx;
}

/* The losses of the pass: ce from the per-token losses, aux from the layers' expert counts and
 * probability sums, through reduce_stats when the exchange has it (model/graph.h's
 * s_global_losses: the same sums, the same formulas). Sets ce_scale and aux_grad. */
static semoe_rc s_losses(gpu_graph_bf16_t *g, const model_exchange_f32 *ex, model_loss_t *loss)
{
    int N = g->N, L = g->L, E = g->E;
    gpu_to_host(g->h_losses, g->losses, (size_t)N * sizeof(float));
    gpu_to_host(g->h_psum, g->psum, (size_t)L * E * sizeof(float));
    double ce = 0;
    for (int n = 0; n < N; n++)
        ce += g->h_losses[n];
    size_t ns = 2 * (size_t)E + 2;
    double *st = (double *)semoe_xcalloc(ns, sizeof(double));
    for (int l = 0; l < L; l++) {
        const int32_t *c = gpu_moe_counts(g->moe[l]);
        for (int e = 0; e < E; e++) {
            st[e] += c[e];
            st[E + e] += g->h_psum[(size_t)l * E + e];
        }
    }
    st[2 * E] = ce;
    st[2 * E + 1] = N;
    int global = ex && ex->reduce_stats;
    semoe_rc rc = model_losses_from_stats(st, E, L, g->aux_coef, global ? ex->reduce_stats : NULL,
                                          global ? ex->state : NULL, g->aux_grad, &g->ce_scale,
                                          loss);
    free(st);
    return rc;
}

extern "C" semoe_rc gpu_graph_bf16_forward(gpu_graph_bf16_t *g, const float *w,
                                           const int32_t *tokens, const model_exchange_f32 *ex,
                                           model_loss_t *loss)
{
    const int B = g->B, T = g->T, N = g->N, D = g->D, V = g->V, E = g->E;
    const size_t ND = (size_t)N * D;
    g->fwd_done = 0;
    if (g->R && (!ex || !ex->dispatch || !ex->combine))
        return semoe_err(SEMOE_EINVAL, "bf16 graph: made with expert rows (expert parallelism) "
                         "but given no exchange that dispatches and combines");
    if (!g->R && g->missing >= 0)
        return semoe_err(SEMOE_EINVAL, "bf16 graph: expert %d of layer %d is not held here: "
                         "without expert rows (an exchange that sends the rows to the experts' "
                         "holders) the graph runs every expert on this process",
                         g->missing % E, g->missing / E);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int32_t in = tokens[(size_t)b * (T + 1) + t], tg = tokens[(size_t)b * (T + 1) + t + 1];
            if (in < 0 || in >= V || tg < 0 || tg >= V)
                return semoe_err(SEMOE_EINVAL, "bf16 graph: token %d at (%d, %d) outside the "
                                 "vocabulary [0, %d)", (in < 0 || in >= V) ? in : tg, b, t, V);
            g->h_tok[b * T + t] = in;
            g->h_tok[N + b * T + t] = tg;
            g->h_tok[2 * N + b * T + t] = t;
        }
    s_section(GPU_GRAPH_HOST);
    gpu_to_device(g->tok, g->h_tok, 3 * (size_t)N * sizeof(int32_t));
    const int32_t *inputs = g->tok, *targets = g->tok + N, *pos = g->tok + 2 * N;
    s_section(GPU_GRAPH_CONVERT);
    s_round_weights(g, w);
    gpu_embedding_fwd(g->res, inputs, w + g->embed, N, D);
    for (int l = 0; l < g->L; l++) {
        const s_layer_t *ly = &g->layer[l];
        float *x = g->res + 2 * (size_t)l * ND, *res1 = x + ND, *res2 = res1 + ND;
        bf16_t *ln1 = g->ln1 + l * ND, *ln2 = g->ln2 + l * ND;
        bf16_t *qkv_r = g->qkv_r + (size_t)l * N * g->QKV;
        bf16_t *q = qkv_r, *k = q + (size_t)N * g->Q, *v = k + (size_t)N * g->KV;
        bf16_t *att = g->att + (size_t)l * N * g->Q;
        float *lse = g->lse + (size_t)l * B * g->H * T;

        s_section(GPU_GRAPH_NORM_LOSS);
        gpu_bf16_rmsnorm_fwd(ln1, g->rstd1 + (size_t)l * N, x, w + ly->ln1, N, D, g->eps);
        s_section(GPU_GRAPH_GEMM);
        s_linear(g->dqkv, ln1, ly->bqkv, N, D, g->QKV, 0); /* dqkv: scratch until backward */
        s_section(GPU_GRAPH_ATTENTION);
        gpu_bf16_qkv_rope_fwd(q, k, v, g->dqkv, pos, N, g->H, g->KVH, g->hd, g->theta);
        gpu_flash_fwd(att, lse, q, k, v, B, T, g->H, g->KVH, g->hd);
        s_section(GPU_GRAPH_CONVERT);
        gpu_copy(res1, x, ND * sizeof(float));
        s_section(GPU_GRAPH_GEMM);
        s_linear(res1, att, ly->bo, N, g->Q, D, 1); /* res1 = x + att o_proj^T */

        s_section(GPU_GRAPH_NORM_LOSS);
        gpu_bf16_rmsnorm_fwd(ln2, g->rstd2 + (size_t)l * N, res1, w + ly->ln2, N, D, g->eps);
        s_section(GPU_GRAPH_MOE_OTHER);
        gpu_moe_set_phases(g->moe[l], s_prof_on);
        gpu_moe_weights_t mw = s_moe_weights(g, l);
        s_xch_t xs;
        gpu_moe_exchange_t mx;
        const gpu_moe_exchange_t *lx = s_xch(g, ex, l, &xs, &mx);
        semoe_rc mrc = gpu_moe_fwd_ex(g->moe[l], &mw, ln2, NULL, res2, res1, lx); /* res2 =
                                                                                     res1 + moe */
        if (mrc != SEMOE_OK) {
            s_section(-1);
            return mrc;
        }
        if (!lx && ex && ex->note_local)
            ex->note_local(ex->state, l, E, gpu_moe_counts(g->moe[l]));
        s_section(GPU_GRAPH_NORM_LOSS);
        gpu_bf16_column_sum(g->psum + (size_t)l * E, gpu_moe_probs(g->moe[l]), N, E, g->colwork);
    }
    const float *xl = g->res + 2 * (size_t)g->L * ND;
    gpu_bf16_rmsnorm_fwd(g->lnf, g->rstdf, xl, w + g->norm, N, D, g->eps);
    s_section(GPU_GRAPH_GEMM);
    s_linear(g->logits, g->lnf, g->blm, N, D, V, 0);
    s_section(GPU_GRAPH_NORM_LOSS);
    gpu_bf16_ce_fwd(g->losses, g->ce_lse, g->logits, targets, N, V);
    s_section(GPU_GRAPH_HOST);
    semoe_rc rc = s_losses(g, ex, loss);
    s_section(-1);
    SEMOE_CHECK(rc);
    g->fwd_done = 1;
    g->ex = ex;
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_graph_bf16_backward(gpu_graph_bf16_t *g, const float *w, float *gr,
                                            double scale)
{
    if (!g->fwd_done)
        return semoe_err(SEMOE_EINVAL, "bf16 graph: backward without a forward");
    g->fwd_done = 0; /* the logits become their gradient */
    const int B = g->B, T = g->T, N = g->N, D = g->D, V = g->V, E = g->E;
    const size_t ND = (size_t)N * D;
    const int32_t *inputs = g->tok, *targets = g->tok + N, *pos = g->tok + 2 * N;

    /* d loss / d probs from the aux loss, the same for every layer's tokens */
    s_section(GPU_GRAPH_HOST);
    float hdaux[256];
    for (int e = 0; e < E && e < 256; e++)
        hdaux[e] = (float)(scale * g->aux_coef * g->aux_grad[e]);
    gpu_to_device(g->daux, hdaux, (size_t)E * sizeof(float));

    s_section(GPU_GRAPH_NORM_LOSS);
    gpu_bf16_ce_bwd(g->logits, g->logits, g->ce_lse, targets, (float)(scale * g->ce_scale), N,
                    V);
    s_section(GPU_GRAPH_GEMM);
    s_linear_bwd(g->dln, gr + g->lm, g->logits, g->lnf, g->blm, N, D, V);
    s_section(GPU_GRAPH_CONVERT);
    gpu_zero(g->dres, ND * sizeof(float));
    s_section(GPU_GRAPH_NORM_LOSS);
    const float *xl = g->res + 2 * (size_t)g->L * ND;
    gpu_bf16_rmsnorm_bwd(g->dres, gr + g->norm, g->dln, xl, w + g->norm, g->rstdf, N, D);
    if (g->ready) /* the final norm and an untied lm_head are final: the head, "layer" L */
        g->ready(g->ready_arg, g->L);

    for (int l = g->L - 1; l >= 0; l--) {
        s_layer_t *ly = &g->layer[l];
        const float *x = g->res + 2 * (size_t)l * ND, *res1 = x + ND;
        const bf16_t *ln1 = g->ln1 + l * ND, *ln2 = g->ln2 + l * ND;
        const bf16_t *qkv_r = g->qkv_r + (size_t)l * N * g->QKV;
        const bf16_t *q = qkv_r, *k = q + (size_t)N * g->Q, *v = k + (size_t)N * g->KV;
        const bf16_t *att = g->att + (size_t)l * N * g->Q;
        const float *lse = g->lse + (size_t)l * B * g->H * T;

        /* MoE: dres is d loss / d res2; res2 = res1 + moe(ln2) */
        for (int e = 0; e < E; e++) {
            int has = ly->slot[e] >= 0;
            ly->gp[e] = has ? gr + ly->w1[e] : NULL;
            ly->gp[E + e] = has ? gr + ly->w3[e] : NULL;
            ly->gp[2 * E + e] = has ? gr + ly->w2[e] : NULL;
        }
        gpu_moe_grads_t mg = {1, gr + ly->gate, ly->gp, ly->gp + E, ly->gp + 2 * E, g->daux};
        gpu_moe_weights_t mw = s_moe_weights(g, l);
        s_section(GPU_GRAPH_MOE_OTHER);
        s_xch_t xs;
        gpu_moe_exchange_t mx;
        const gpu_moe_exchange_t *lx = s_xch(g, g->ex, l, &xs, &mx);
        semoe_rc mrc = gpu_moe_bwd_ex(g->moe[l], &mw, ln2, NULL, g->dres, g->dln, &mg, lx);
        if (mrc != SEMOE_OK) {
            s_section(-1);
            return mrc;
        }
        if (!lx && g->ex && g->ex->note_local) /* as backward's dispatch (combine's transpose)
                                                * would */
            g->ex->note_local(g->ex->state, l, E, gpu_moe_counts(g->moe[l]));
        s_section(GPU_GRAPH_NORM_LOSS);
        s_moe_phases(g->moe[l]);
        gpu_bf16_rmsnorm_bwd(g->dres, gr + ly->ln2, g->dln, res1, w + ly->ln2,
                             g->rstd2 + (size_t)l * N, N, D);

        /* attention: dres is d loss / d res1; res1 = x + att o_proj^T */
        s_section(GPU_GRAPH_CONVERT);
        gpu_bf16_from_f32(g->dres_b, g->dres, ND);
        s_section(GPU_GRAPH_GEMM);
        s_linear_bwd(g->datt, gr + ly->o, g->dres_b, att, ly->bo, N, g->Q, D);
        s_section(GPU_GRAPH_ATTENTION);
        bf16_t *dq = g->dqkv_s, *dk = dq + (size_t)N * g->Q, *dv = dk + (size_t)N * g->KV;
        gpu_flash_bwd(dq, dk, dv, g->datt, q, k, v, att, lse, B, T, g->H, g->KVH, g->hd,
                      g->fwork);
        gpu_bf16_qkv_rope_bwd(g->dqkv, dq, dk, dv, pos, N, g->H, g->KVH, g->hd, g->theta);
        s_section(GPU_GRAPH_GEMM);
        s_linear_bwd(g->dln, gr + ly->qkv, g->dqkv, ln1, ly->bqkv, N, D, g->QKV);
        s_section(GPU_GRAPH_NORM_LOSS);
        gpu_bf16_rmsnorm_bwd(g->dres, gr + ly->ln1, g->dln, x, w + ly->ln1,
                             g->rstd1 + (size_t)l * N, N, D);
        if (g->ready) /* ln1, q/k/v/o, ln2 and the gate of layer l are final */
            g->ready(g->ready_arg, l);
    }
    s_section(GPU_GRAPH_CONVERT);
    gpu_embedding_bwd(gr + g->embed, g->dres, inputs, N, D);
    s_section(-1);
    return SEMOE_OK;
}

/* ---------------------------------------------------------------------- the trainer's pass */

static semoe_rc s_pass_create(const model_params_t *params, int rows, int seq, int expert_rows,
                              void **out)
{
    return gpu_graph_bf16_new(params, rows, seq, expert_rows, (gpu_graph_bf16_t **)out);
}

static void s_pass_destroy(void **self_p)
{
    gpu_graph_bf16_destroy((gpu_graph_bf16_t **)self_p);
}

static void s_pass_bias(void *self, const float *bias)
{
    gpu_graph_bf16_set_router_bias((gpu_graph_bf16_t *)self, bias);
}

static semoe_rc s_pass_forward(void *self, const float *w, const int32_t *tokens,
                               const model_exchange_f32 *ex, model_loss_t *loss)
{
    return gpu_graph_bf16_forward((gpu_graph_bf16_t *)self, w, tokens, ex, loss);
}

static semoe_rc s_pass_backward(void *self, const float *w, float *g, double scale)
{
    return gpu_graph_bf16_backward((gpu_graph_bf16_t *)self, w, g, scale);
}

static void s_pass_on_ready(void *self, void (*fn)(void *arg, int layer), void *arg)
{
    gpu_graph_bf16_t *g = (gpu_graph_bf16_t *)self;
    g->ready = fn;
    g->ready_arg = arg;
}

extern "C" const model_pass_t gpu_pass_bf16 = {"bf16", s_pass_create, s_pass_destroy, s_pass_bias,
                                               s_pass_forward, s_pass_backward, s_pass_on_ready};
