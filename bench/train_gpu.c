/* bench_train_gpu: single-process training throughput on one GPU (issue 5's first end-to-end
 * number): the trainer (model/train.h) on gpu_backend_f32_bf16mm or gpu_backend_f32, synthetic
 * tokens, tokens/s and MFU against cuBLAS's dense bf16 GEMM peak measured in the same run, and
 * one extra step with every op synchronised to split the time by op kind. Measures, never fails. */
#include <getopt.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "actors/err.h"
#include "bench/flops.h"
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/graph_bf16.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/job.h"
#include "model/params.h"
#include "model/profile.h"
#include "model/train.h"

enum { C_GEMM = MODEL_PROF_GEMM, C_ATTN = MODEL_PROF_ATTENTION, C_ROUTE = MODEL_PROF_ROUTING,
       C_ELEM = MODEL_PROF_ELEMENTWISE, C_OPT = MODEL_PROF_OPTIMIZER, C_MEM = MODEL_PROF_MEMORY,
       C_N = MODEL_PROF_N };

#define S_GIB (1024.0 * 1024.0 * 1024.0)
#define S_MAX_STEPS 1000

/* ---- the synchronising table ------------------------------------------------------------ */

/* The table the trainer runs on: a copy of the real one for the timed steps, the profiled
 * synchronising one for the split step (the trainer keeps the pointer, we swap the contents
 * between steps). */
static model_backend_f32_t s_live;
static const model_backend_f32_t *s_real;
static int s_dev;
static uint64_t s_mem_peak; /* device memory in use (total - free), the highest sample */

static void s_mem_sample(void)
{
    uint64_t total = 0, fr = 0;
    if (gpu_device_mem(s_dev, &total, &fr) == SEMOE_OK && total - fr > s_mem_peak)
        s_mem_peak = total - fr;
}

/* After each op: wait for the stream, so that profile's clock reads around the op (it wraps
 * this table) see the kernels' time, not just the launch; then sample the memory in use. */
static void s_done(void)
{
    gpu_backend_sync();
    s_mem_sample();
}

static void *s_alloc(size_t b) { void *p = s_real->alloc(b); s_done(); return p; }
static void s_free(void *p) { s_real->free(p); s_done(); }
static void s_zero(void *p, size_t b) { s_real->zero(p, b); s_done(); }
static void s_copy(void *d, const void *s, size_t b) { s_real->copy(d, s, b); s_done(); }
static void s_to_device(void *d, const void *s, size_t b) { s_real->to_device(d, s, b); s_done(); }
static void s_to_host(void *d, const void *s, size_t b) { s_real->to_host(d, s, b); s_done(); }
static void s_axpy(float *y, float a, const float *x, size_t n)
{
    s_real->axpy(y, a, x, n);
    s_done();
}
static void s_add(float *o, const float *a, const float *b, size_t n)
{
    s_real->add(o, a, b, n);
    s_done();
}
static void s_add_bias(float *o, const float *b, int N, int C)
{
    s_real->add_bias(o, b, N, C);
    s_done();
}
static void s_embedding_fwd(float *o, const int32_t *t, const float *w, int N, int D)
{
    s_real->embedding_fwd(o, t, w, N, D);
    s_done();
}
static void s_embedding_bwd(float *dw, const float *d, const int32_t *t, int N, int D)
{
    s_real->embedding_bwd(dw, d, t, N, D);
    s_done();
}
static void s_rmsnorm_fwd(float *o, float *r, const float *x, const float *w, int N, int D,
                          float eps)
{
    s_real->rmsnorm_fwd(o, r, x, w, N, D, eps);
    s_done();
}
static void s_rmsnorm_bwd(float *dx, float *dw, const float *d, const float *x, const float *w,
                          const float *r, int N, int D)
{
    s_real->rmsnorm_bwd(dx, dw, d, x, w, r, N, D);
    s_done();
}
static void s_linear_fwd(float *o, const float *x, const float *w, int N, int IN, int OUT)
{
    s_real->linear_fwd(o, x, w, N, IN, OUT);
    s_done();
}
static void s_linear_bwd(float *dx, float *dw, const float *d, const float *x, const float *w,
                         int N, int IN, int OUT)
{
    s_real->linear_bwd(dx, dw, d, x, w, N, IN, OUT);
    s_done();
}
static void s_rope_fwd(float *o, const float *x, const int32_t *p, int N, int H, int hd,
                       double th)
{
    s_real->rope_fwd(o, x, p, N, H, hd, th);
    s_done();
}
static void s_rope_bwd(float *dx, const float *d, const int32_t *p, int N, int H, int hd,
                       double th)
{
    s_real->rope_bwd(dx, d, p, N, H, hd, th);
    s_done();
}
static void s_attention_fwd(float *o, float *pr, const float *q, const float *k, const float *v,
                            int B, int Tn, int H, int KVH, int hd)
{
    s_real->attention_fwd(o, pr, q, k, v, B, Tn, H, KVH, hd);
    s_done();
}
static void s_attention_bwd(float *dq, float *dk, float *dv, const float *d, const float *q,
                            const float *k, const float *v, const float *pr, int B, int Tn,
                            int H, int KVH, int hd)
{
    s_real->attention_bwd(dq, dk, dv, d, q, k, v, pr, B, Tn, H, KVH, hd);
    s_done();
}
static void s_router_fwd(float *pr, int32_t *idx, float *w, const float *lg, int N, int E, int K)
{
    s_real->router_fwd(pr, idx, w, lg, N, E, K);
    s_done();
}
static void s_router_bwd(float *dl, const float *dw, const float *dp, const float *pr,
                         const int32_t *idx, const float *w, int N, int E, int K)
{
    s_real->router_bwd(dl, dw, dp, pr, idx, w, N, E, K);
    s_done();
}
static void s_swiglu_fwd(float *h, const float *a, const float *b, size_t n)
{
    s_real->swiglu_fwd(h, a, b, n);
    s_done();
}
static void s_swiglu_bwd(float *da, float *db, const float *dh, const float *a, const float *b,
                         size_t n)
{
    s_real->swiglu_bwd(da, db, dh, a, b, n);
    s_done();
}
static float s_crossentropy_fwd(float *l, const float *lg, const int32_t *t, int N, int V)
{
    float r = s_real->crossentropy_fwd(l, lg, t, N, V);
    s_done();
    return r;
}
static void s_crossentropy_bwd(float *dl, const float *lg, const int32_t *t, float d, int N,
                               int V)
{
    s_real->crossentropy_bwd(dl, lg, t, d, N, V);
    s_done();
}
static float s_auxloss_fwd(const float *pr, const int32_t *idx, int M, int E, int K)
{
    float r = s_real->auxloss_fwd(pr, idx, M, E, K);
    s_done();
    return r;
}
static void s_auxloss_bwd(float *dp, const int32_t *idx, float d, int M, int E, int K)
{
    s_real->auxloss_bwd(dp, idx, d, M, E, K);
    s_done();
}
static void s_gather_rows(float *o, const float *x, const int32_t *rows, int n, int D)
{
    s_real->gather_rows(o, x, rows, n, D);
    s_done();
}
static void s_gather_rows_bwd(float *dx, const float *d, const int32_t *rows, int n, int D)
{
    s_real->gather_rows_bwd(dx, d, rows, n, D);
    s_done();
}
static void s_scatter_rows(float *o, const float *y, const int32_t *rows, const float *w,
                           const int32_t *slots, int n, int D)
{
    s_real->scatter_rows(o, y, rows, w, slots, n, D);
    s_done();
}
static void s_scatter_rows_bwd(float *dy, float *dw, const float *d, const float *y,
                               const int32_t *rows, const float *w, const int32_t *slots, int n,
                               int D)
{
    s_real->scatter_rows_bwd(dy, dw, d, y, rows, w, slots, n, D);
    s_done();
}
static void s_adamw(float *p, const float *g, float *m, float *v, size_t n, double lr, double b1,
                    double b2, double eps, double wd, int t, double gs)
{
    s_real->adamw(p, g, m, v, n, lr, b1, b2, eps, wd, t, gs);
    s_done();
}
static double s_sumsq(const float *g, size_t n)
{
    double r = s_real->sumsq(g, n);
    s_done();
    return r;
}

static model_backend_f32_t s_sync_table(void)
{
    model_backend_f32_t b = *s_real;
    b.name = "sync";
    b.alloc = s_alloc;
    b.free = s_free;
    b.zero = s_zero;
    b.copy = s_copy;
    b.to_device = s_to_device;
    b.to_host = s_to_host;
    b.axpy = s_axpy;
    b.add = s_add;
    b.add_bias = s_add_bias;
    b.embedding_fwd = s_embedding_fwd;
    b.embedding_bwd = s_embedding_bwd;
    b.rmsnorm_fwd = s_rmsnorm_fwd;
    b.rmsnorm_bwd = s_rmsnorm_bwd;
    b.linear_fwd = s_linear_fwd;
    b.linear_bwd = s_linear_bwd;
    b.rope_fwd = s_rope_fwd;
    b.rope_bwd = s_rope_bwd;
    b.attention_fwd = s_attention_fwd;
    b.attention_bwd = s_attention_bwd;
    b.router_fwd = s_router_fwd;
    b.router_bwd = s_router_bwd;
    b.swiglu_fwd = s_swiglu_fwd;
    b.swiglu_bwd = s_swiglu_bwd;
    b.crossentropy_fwd = s_crossentropy_fwd;
    b.crossentropy_bwd = s_crossentropy_bwd;
    b.auxloss_fwd = s_auxloss_fwd;
    b.auxloss_bwd = s_auxloss_bwd;
    b.gather_rows = s_gather_rows;
    b.gather_rows_bwd = s_gather_rows_bwd;
    b.scatter_rows = s_scatter_rows;
    b.scatter_rows_bwd = s_scatter_rows_bwd;
    b.adamw = s_adamw;
    b.sumsq = s_sumsq;
    return b;
}

/* ---- setup ---------------------------------------------------------------------------------- */

/* model_params_init over threads: it is per element (model_params_init_value), and one core
 * takes minutes for 2.4 B Box-Muller draws. */
typedef struct {
    model_params_t *p;
    uint64_t seed;
    int i, n;
} s_init_arg_t;

static void *s_init_part(void *arg)
{
    s_init_arg_t *a = arg;
    const model_config_t *c = model_params_config(a->p);
    for (size_t t = 0; t < model_params_count(a->p); t++) {
        const model_param_t *pt = model_params_at(a->p, t);
        if (!pt->data)
            continue;
        uint64_t lo = pt->numel * (uint64_t)a->i / (uint64_t)a->n;
        uint64_t hi = pt->numel * (uint64_t)(a->i + 1) / (uint64_t)a->n;
        for (uint64_t k = lo; k < hi; k++)
            pt->data[k] = model_params_init_value(c, pt, a->seed, k);
    }
    return NULL;
}

static void s_init_params(model_params_t *p, uint64_t seed, int threads)
{
    pthread_t th[64];
    s_init_arg_t args[64];
    if (threads > 64)
        threads = 64;
    int started = 0;
    for (int i = 0; i < threads; i++) {
        args[i] = (s_init_arg_t){p, seed, i, threads};
        if (pthread_create(&th[i], NULL, s_init_part, &args[i]) != 0)
            break;
        started++;
    }
    for (int i = started; i < threads; i++) /* the rest on this thread */
        s_init_part(&args[i]);
    for (int i = 0; i < started; i++)
        pthread_join(th[i], NULL);
}

static uint64_t s_rng;
static uint32_t s_next(void)
{
    s_rng ^= s_rng << 13;
    s_rng ^= s_rng >> 7;
    s_rng ^= s_rng << 17;
    return (uint32_t)(s_rng >> 32);
}

/* ---- results --------------------------------------------------------------------------------- */

typedef struct {
    const char *backend;
    char device[128];         /* the GPU's name */
    const char *attention;    /* which kernels the attention ran on */
    model_config_t cfg;
    uint32_t seq, batch, micro, micro_steps;
    int warmup, steps, split;
    uint64_t total, active;
    double flops_per_token, peak_bf16, peak_f32;
    double step_s[S_MAX_STEPS], loss[S_MAX_STEPS];
    double mean_s, tok_s, tflops, mfu;
    double split_step_s, cat[C_N], other, gemm_tflops, calls;
    int pass;                 /* the bf16 graph: graph[] splits its share */
    double graph[GPU_GRAPH_NKIND];
    uint64_t mem_total, mem_base, mem_model, mem_peak;
    double init_s, load_s;
} s_result_t;

static void s_write_json(const char *path, const s_result_t *r)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        perror(path);
        return;
    }
    const model_config_t *c = &r->cfg;
    char date[32];
    time_t now = time(NULL);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    const char *commit = getenv("SEMOE_COMMIT");
    fprintf(f, "{\n  \"bench\": \"bench_train_gpu\", \"backend\": \"%s\",\n", r->backend);
    fprintf(f, "  \"device\": \"%s\", \"date\": \"%s\", \"commit\": \"%s\",\n", r->device, date,
            commit && *commit ? commit : "?");
    fprintf(f, "  \"attention\": \"%s\",\n", r->attention);
    fprintf(f, "  \"model\": {\"layers\": %u, \"hidden\": %u, \"heads\": %u, \"kv_heads\": %u, "
               "\"head_dim\": %u, \"experts\": %u, \"top_k\": %u, \"intermediate\": %u, "
               "\"vocab\": %u, \"params_total\": %llu, \"params_active\": %llu},\n",
            c->num_hidden_layers, c->hidden_size, c->num_attention_heads,
            c->num_key_value_heads, c->head_dim, c->num_local_experts, c->num_experts_per_tok,
            c->intermediate_size, c->vocab_size, (unsigned long long)r->total,
            (unsigned long long)r->active);
    fprintf(f, "  \"seq_len\": %u, \"global_batch\": %u, \"micro_batch\": %u, "
               "\"micro_steps\": %u, \"tokens_per_step\": %llu, \"warmup\": %d, \"steps\": %d,\n",
            r->seq, r->batch, r->micro, r->micro_steps,
            (unsigned long long)r->batch * r->seq, r->warmup, r->steps);
    fprintf(f, "  \"flops_per_token\": %.0f, \"flops_formula\": \"6 (N_active - V D) + 6 L H hd "
               "T\",\n", r->flops_per_token);
    fprintf(f, "  \"peak_bf16_tflops\": %.2f, \"peak_f32_tflops\": %.2f,\n", r->peak_bf16,
            r->peak_f32);
    fprintf(f, "  \"step_s\": [");
    for (int i = 0; i < r->warmup + r->steps; i++)
        fprintf(f, "%s%.6f", i ? ", " : "", r->step_s[i]);
    fprintf(f, "],\n  \"loss\": [");
    for (int i = 0; i < r->warmup + r->steps; i++)
        fprintf(f, "%s%.5f", i ? ", " : "", r->loss[i]);
    fprintf(f, "],\n  \"mean_step_s\": %.6f, \"tokens_per_s\": %.1f, \"model_tflops\": %.3f, "
               "\"mfu\": %.5f,\n", r->mean_s, r->tok_s, r->tflops, r->mfu);
    if (r->split) {
        fprintf(f, "  \"split\": {\"step_s\": %.6f, ", r->split_step_s);
        for (int k = 0; k < C_N; k++)
            fprintf(f, "\"%s\": %.6f, ", model_profile_category(k), r->cat[k]);
        fprintf(f, "\"other\": %.6f, \"gemm_tflops\": %.3f, \"op_calls\": %.0f", r->other,
                r->gemm_tflops, r->calls);
        if (r->pass) {
            fprintf(f, ", \"bf16_graph\": {");
            for (int k = 0; k < GPU_GRAPH_NKIND; k++)
                fprintf(f, "%s\"%s\": %.6f", k ? ", " : "", gpu_graph_bf16_kind(k), r->graph[k]);
            fprintf(f, "}");
        }
        fprintf(f, "},\n");
    }
    fprintf(f, "  \"memory_gib\": {\"total\": %.3f, \"before_model\": %.3f, \"after_setup\": "
               "%.3f, \"peak_sampled\": %.3f},\n", r->mem_total / S_GIB, r->mem_base / S_GIB,
            r->mem_model / S_GIB, r->mem_peak / S_GIB);
    fprintf(f, "  \"init_s\": %.3f, \"load_s\": %.3f\n}\n", r->init_s, r->load_s);
    if (fclose(f))
        perror(path);
}

static void s_usage(FILE *f)
{
    fprintf(f,
            "usage: bench_train_gpu [--backend bf16|bf16mm|f32] [--steps 5] [--warmup 2]\n"
            "                       [--layers 8] [--hidden 2048] [--heads 16] [--kv-heads 4]\n"
            "                       [--experts 8] [--topk 2] [--intermediate 5632]\n"
            "                       [--vocab 32000] [--seq 2048] [--batch 32] [--micro 4]\n"
            "                       [--device 0] [--seed 1] [--no-split] [--json FILE]\n"
            "  defaults: issue 5's ~2.4 B-parameter MoE, 32 x 2048 tokens a step in 8 micro-steps\n"
            "  --backend  bf16: the bf16 graph (gpu/graph_bf16.h: bf16 weights and activations,\n"
            "             fp32 residual, gradients and master weights; AdamW on gpu_backend_f32);\n"
            "             bf16mm: gpu_backend_f32_bf16mm (bf16 tensor-core GEMMs, fp32 else);\n"
            "             f32: gpu_backend_f32 (fp32 cuBLAS, no TF32)\n"
            "  --batch    sequences per step (global batch); --micro sequences per micro-step\n"
            "  --no-split skip the extra step that synchronises every op to split the time\n"
            "  --json     write the results to FILE\n");
}

int main(int argc, char **argv)
{
    const char *backend = "bf16mm", *json = NULL;
    int steps = 5, warmup = 2, split = 1, device = 0;
    long layers = 8, hidden = 2048, heads = 16, kv = 4, experts = 8, topk = 2, inter = 5632,
         vocab = 32000, seq = 2048, batch = 32, micro = 4, seed = 1;
    static const struct option opts[] = {
        {"backend", required_argument, 0, 'B'}, {"steps", required_argument, 0, 's'},
        {"warmup", required_argument, 0, 'w'},  {"layers", required_argument, 0, 'L'},
        {"hidden", required_argument, 0, 'H'},  {"heads", required_argument, 0, 'a'},
        {"kv-heads", required_argument, 0, 'k'}, {"experts", required_argument, 0, 'E'},
        {"topk", required_argument, 0, 'K'},    {"intermediate", required_argument, 0, 'F'},
        {"vocab", required_argument, 0, 'V'},   {"seq", required_argument, 0, 'T'},
        {"batch", required_argument, 0, 'b'},   {"micro", required_argument, 0, 'm'},
        {"device", required_argument, 0, 'd'},  {"seed", required_argument, 0, 'S'},
        {"no-split", no_argument, 0, 'P'},      {"split", no_argument, 0, 'p'},
        {"json", required_argument, 0, 'o'},    {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "h", opts, NULL)) != -1) {
        switch (ch) {
        case 'B': backend = optarg; break;
        case 's': steps = atoi(optarg); break;
        case 'w': warmup = atoi(optarg); break;
        case 'L': layers = atol(optarg); break;
        case 'H': hidden = atol(optarg); break;
        case 'a': heads = atol(optarg); break;
        case 'k': kv = atol(optarg); break;
        case 'E': experts = atol(optarg); break;
        case 'K': topk = atol(optarg); break;
        case 'F': inter = atol(optarg); break;
        case 'V': vocab = atol(optarg); break;
        case 'T': seq = atol(optarg); break;
        case 'b': batch = atol(optarg); break;
        case 'm': micro = atol(optarg); break;
        case 'd': device = atoi(optarg); break;
        case 'S': seed = atol(optarg); break;
        case 'P': split = 0; break;
        case 'p': split = 1; break;
        case 'o': json = optarg; break;
        case 'h': s_usage(stdout); return 0;
        default: s_usage(stderr); return 2;
        }
    }
    if (strcmp(backend, "bf16") && strcmp(backend, "bf16mm") && strcmp(backend, "f32")) {
        fprintf(stderr, "bench_train_gpu: --backend %s: expected bf16, bf16mm or f32\n",
                backend);
        return 2;
    }
    int pass = strcmp(backend, "bf16") == 0;
    if (steps < 1 || warmup < 0 || warmup + steps > S_MAX_STEPS || layers < 1 || hidden < 1 ||
        heads < 1 || kv < 1 || heads % kv || hidden % heads || experts < 1 || topk < 1 ||
        topk > experts || inter < 1 || vocab < 2 || seq < 1 || batch < 1 || micro < 1) {
        fprintf(stderr, "bench_train_gpu: need --steps >= 1, --warmup >= 0 (at most %d in all), "
                        "positive sizes, --heads a multiple of --kv-heads, --hidden a multiple of "
                        "--heads, --topk <= --experts, --vocab >= 2\n", S_MAX_STEPS);
        return 2;
    }
    if ((double)micro * heads * seq * seq >= 2147483648.0)
        fprintf(stderr, "bench_train_gpu: warning: micro x heads x seq^2 = %.3g probabilities "
                        "per layer: past 2^31, check the kernels' index types\n",
                (double)micro * heads * seq * seq);

    static s_result_t r;
    memset(&r, 0, sizeof r);
    r.backend = pass ? "cuda-bf16-graph" : strcmp(backend, "f32") ? "cuda-bf16mm" : "cuda";
    r.attention = pass ? "bf16 flash (gpu/flash_attn.cu)"
                  : strcmp(backend, "f32") ? "bf16 flash (gpu/flash_attn.cu) where hd is 64 or "
                                             "128 and T >= 1.5 hd, else fp32"
                                           : "fp32, probabilities materialised (gpu/attention.cu)";
    s_real = strcmp(backend, "bf16mm") ? &gpu_backend_f32 : &gpu_backend_f32_bf16mm;
    r.pass = pass;
    s_dev = device;
    r.warmup = warmup;
    r.steps = steps;
    r.split = split;

    if (gpu_backend_init(device) != SEMOE_OK) {
        fprintf(stderr, "bench_train_gpu: %s\n", semoe_err_msg());
        return 1;
    }
    char name[128] = "";
    uint64_t total = 0, fr = 0;
    if (gpu_device_info(device, name, sizeof name, &total, &fr) != SEMOE_OK) {
        fprintf(stderr, "bench_train_gpu: %s\n", semoe_err_msg());
        return 1;
    }
    r.mem_total = total;
    snprintf(r.device, sizeof r.device, "%s", name);
    printf("device cuda:%d: %s, %.1f GiB HBM (%.1f GiB free)\n", device, name, total / S_GIB,
           fr / S_GIB);
    printf("backend %s: %s\n", r.backend,
           pass ? "the bf16 graph: bf16 weights (rounded from the fp32 master each forward) and "
                  "activations, fp32 residual stream, fp32 gradients accumulated by the GEMMs, "
                  "the MoE layer of gpu/moe_layer.h, AdamW fp32"
           : s_real == &gpu_backend_f32 ? "fp32 throughout, cuBLAS fp32 GEMMs without TF32"
                                      : "bf16 tensor-core GEMMs (x, W, dout rounded to bf16, fp32 "
                                        "accumulate and output) under the fp32 graph: weights, "
                                        "activations, gradients, AdamW and every other op fp32");
    printf("attention: %s\n", pass ? "bf16 flash kernels (gpu/flash_attn.cu)"
                               : s_real == &gpu_backend_f32
                                   ? "the fp32 kernels (gpu/attention.cu: (B, H, T, T) "
                                     "probabilities materialised, no tensor cores)"
                                   : "bf16 flash kernels (gpu/flash_attn.cu) on bf16-rounded q, "
                                     "k, v when hd is 64 or 128 and T >= 1.5 hd, else fp32");
    fflush(stdout);

    /* the peak first, on an idle device */
    r.peak_bf16 = gpu_gemm_peak_tflops(8192, 1, 20);
    r.peak_f32 = gpu_gemm_peak_tflops(8192, 0, 5);
    printf("dense GEMM peak (cuBLAS 8192^3, CUDA events, best of 3 x 20 after a warm-up round): "
           "bf16 %.1f TFLOP/s (bf16 in/out, fp32 accumulate); fp32 %.1f TFLOP/s (no TF32)\n",
           r.peak_bf16, r.peak_f32);
    fflush(stdout);

    /* the model */
    model_job_t job;
    model_job_defaults(&job);
    model_config_t *c = &job.model;
    model_config_defaults(c);
    c->num_hidden_layers = (uint32_t)layers;
    c->hidden_size = (uint32_t)hidden;
    c->num_attention_heads = (uint32_t)heads;
    c->num_key_value_heads = (uint32_t)kv;
    c->head_dim = (uint32_t)(hidden / heads);
    c->num_local_experts = (uint32_t)experts;
    c->num_experts_per_tok = (uint32_t)topk;
    c->intermediate_size = (uint32_t)inter;
    c->vocab_size = (uint32_t)vocab;
    if (c->max_position_embeddings < (uint32_t)seq)
        c->max_position_embeddings = (uint32_t)seq;
    c->tie_word_embeddings = false;
    if (model_config_validate(c, "bench_train_gpu") != SEMOE_OK) {
        fprintf(stderr, "bench_train_gpu: %s\n", semoe_err_msg());
        return 2;
    }
    job.train.seq_len = (uint32_t)seq;
    job.train.global_batch = (uint32_t)batch;
    job.train.micro_batch = (uint32_t)micro;
    job.train.lr = 3e-4;
    job.train.min_lr = 3e-5;
    job.train.warmup_steps = 2;
    snprintf(job.train.schedule, sizeof job.train.schedule, "cosine");
    job.train.grad_clip = 1.0;
    job.train.steps = (uint64_t)(warmup + steps + 1);
    job.train.seed = (uint64_t)seed;
    r.cfg = *c;
    r.seq = (uint32_t)seq;
    r.batch = (uint32_t)batch;
    r.micro = (uint32_t)micro;
    r.micro_steps = (uint32_t)((batch + micro - 1) / micro);
    r.total = model_params_total(c);
    r.active = model_params_active(c);
    r.flops_per_token = flops_per_token(c, (uint32_t)seq);
    uint64_t tokens_per_step = (uint64_t)batch * (uint64_t)seq;
    printf("model: %u layers, hidden %u, %u heads / %u kv heads of %u, %u experts (top-%u) of "
           "intermediate %u, vocab %u (untied): %.3f B parameters, %.3f B active\n",
           c->num_hidden_layers, c->hidden_size, c->num_attention_heads, c->num_key_value_heads,
           c->head_dim, c->num_local_experts, c->num_experts_per_tok, c->intermediate_size,
           c->vocab_size, r.total * 1e-9, r.active * 1e-9);
    printf("batch: %ld sequences x %ld tokens = %llu tokens a step, micro-batch %ld (%u "
           "micro-steps); synthetic tokens (seed %ld, uniform ids < %ld: bytes); AdamW, "
           "clip 1.0\n", batch, seq, (unsigned long long)tokens_per_step, micro, r.micro_steps,
           seed, vocab < 256 ? vocab : 256L);
    printf("model FLOPs per token = 6 x (N_active - V x D) + 6 x L x H x hd x T (causal "
           "attention, 12 L H hd T / 2) = 6 x %.4g + 6 x %u x %u x %u x %ld = %.4g; %.4g a step\n",
           (double)(r.active - (uint64_t)c->vocab_size * c->hidden_size),
           c->num_hidden_layers, c->num_attention_heads, c->head_dim, seq, r.flops_per_token,
           r.flops_per_token * (double)tokens_per_step);
    /* the trainer's second gradient slab exists only for the graph path's micro-batches */
    int slabs = 4 + (!pass && r.micro_steps > 1);
    printf("memory: weights, gradients, %sAdamW m and v in fp32 = %d B x %.3f B = %.1f GiB, "
           "plus activations and their gradients for one micro-batch\n",
           slabs == 5 ? "one micro-batch's gradient, " : "", 4 * slabs, r.total * 1e-9,
           4.0 * slabs * (double)r.total / S_GIB);
    fflush(stdout);

    semoe_rc rc = SEMOE_OK;
    model_params_t *params = NULL;
    model_train_t *tr = NULL;
    uint8_t *tokens = NULL;
    gpu_device_mem(device, &total, &fr);
    r.mem_base = total - fr;
    double t0 = flops_now();
    rc = model_params_new(c, NULL, 0, &params);
    if (rc)
        goto fail;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    s_init_params(params, job.train.seed, ncpu > 1 ? (int)ncpu : 1);
    r.init_s = flops_now() - t0;
    t0 = flops_now();
    s_live = *s_real;
    rc = model_train_new_pass(&s_live, pass ? &gpu_pass_bf16 : NULL, params, &job, &tr);
    if (rc)
        goto fail;
    gpu_backend_sync();
    r.load_s = flops_now() - t0;
    gpu_device_mem(device, &total, &fr);
    r.mem_model = total - fr;
    s_mem_peak = r.mem_model;
    printf("setup: parameters initialised on the host in %.1f s, trainer on the device in %.1f "
           "s; device memory in use %.2f GiB (%.2f GiB before)\n", r.init_s, r.load_s,
           r.mem_model / S_GIB, r.mem_base / S_GIB);
    fflush(stdout);

    size_t row = (size_t)seq + 1, ntok = row * (size_t)batch;
    tokens = malloc(ntok);
    if (!tokens) {
        rc = semoe_err(SEMOE_ENOMEM, "tokens: %zu bytes", ntok);
        goto fail;
    }
    s_rng = 0x9e3779b97f4a7c15ull ^ ((uint64_t)seed * 0xbf58476d1ce4e5b9ull);
    if (!s_rng)
        s_rng = 1;
    uint32_t tokmax = vocab < 256 ? (uint32_t)vocab : 256u;
    double sum = 0;
    printf("\n%5s %6s %10s %10s %10s %8s %10s\n", "step", "", "loss", "seconds", "tokens/s",
           "MFU", "mem GiB");
    for (int s = 0; s < warmup + steps; s++) {
        for (size_t i = 0; i < ntok; i++)
            tokens[i] = (uint8_t)(s_next() % tokmax);
        model_train_report_t rep;
        gpu_backend_sync();
        double a = flops_now();
        rc = model_train_step(tr, tokens, (uint32_t)batch, (uint64_t)s, NULL, &rep);
        gpu_backend_sync(); /* AdamW's last kernels are still running when the step returns */
        double dt = flops_now() - a;
        if (rc)
            goto fail;
        s_mem_sample();
        r.step_s[s] = dt;
        r.loss[s] = rep.loss;
        if (s >= warmup)
            sum += dt;
        double tps = (double)tokens_per_step / dt;
        printf("%5d %6s %10.4f %10.3f %10.0f %7.2f%% %10.2f\n", s, s < warmup ? "warmup" : "",
               rep.loss, dt, tps, 100.0 * tps * r.flops_per_token * 1e-12 / r.peak_bf16,
               s_mem_peak / S_GIB);
        fflush(stdout);
    }
    r.mean_s = sum / steps;
    r.tok_s = (double)tokens_per_step / r.mean_s;
    r.tflops = r.tok_s * r.flops_per_token * 1e-12;
    r.mfu = r.tflops / r.peak_bf16;

    if (split) {
        /* one more step on the profiled synchronising table: every op's time is its kernels' */
        static model_backend_f32_t sync;
        sync = s_sync_table();
        s_live = *model_profile_wrap(&sync);
        for (size_t i = 0; i < ntok; i++)
            tokens[i] = (uint8_t)(s_next() % tokmax);
        model_profile_take(NULL);
        double gsec[GPU_GRAPH_NKIND];
        gpu_graph_bf16_profile_take(gsec); /* zeroes */
        gpu_graph_bf16_profile(pass);
        model_train_report_t rep;
        gpu_backend_sync();
        double a = flops_now();
        rc = model_train_step(tr, tokens, (uint32_t)batch, (uint64_t)(warmup + steps), NULL,
                              &rep);
        gpu_backend_sync();
        r.split_step_s = flops_now() - a;
        gpu_graph_bf16_profile(0);
        gpu_graph_bf16_profile_take(r.graph);
        s_live = *s_real;
        if (rc)
            goto fail;
        model_profile_t prof;
        model_profile_take(&prof);
        double tracked = 0;
        for (int k = 0; k < C_N; k++) {
            r.cat[k] = prof.seconds[k];
            tracked += prof.seconds[k];
        }
        for (int k = 0; pass && k < GPU_GRAPH_NKIND; k++)
            tracked += r.graph[k];
        r.other = r.split_step_s - tracked;
        r.calls = (double)prof.calls;
        r.gemm_tflops = prof.seconds[C_GEMM] > 0 ? prof.gemm_flops / prof.seconds[C_GEMM] * 1e-12
                                                 : 0;
    }
    r.mem_peak = s_mem_peak;

    printf("\n== %s on %s: %s\n", r.backend, name,
           "single process, one GPU");
    printf("step %.3f s (mean of %d after %d warm-up), %.0f tokens/s, %.1f model TFLOP/s\n",
           r.mean_s, steps, warmup, r.tok_s, r.tflops);
    printf("MFU %.2f%% of the dense bf16 peak %.1f TFLOP/s (%.2f%% of the fp32 peak %.1f)\n",
           100 * r.mfu, r.peak_bf16, 100 * r.tflops / r.peak_f32, r.peak_f32);
    printf("  model FLOPs = tokens x [6 x (N_active - V D) + 6 L H hd T]; N_active %.4g, "
           "%.4g FLOPs/token\n", (double)r.active, r.flops_per_token);
    printf("device memory in use: %.2f GiB peak sampled (after every step%s) of %.1f GiB; "
           "%.2f GiB after setup\n", r.mem_peak / S_GIB, split ? " and every op of the split step"
                                                                : "", r.mem_total / S_GIB,
           r.mem_model / S_GIB);
    if (split) {
        double st = r.split_step_s;
        printf("\ntime split (one extra step, every op synchronised: %.3f s against %.3f s "
               "unsynchronised):\n", st, r.mean_s);
        printf("  %-12s %10s %8s\n", "op kind", "seconds", "share");
        for (int k = 0; k < C_N; k++) /* with the graph, only the trainer's ops are here */
            if (!pass || r.cat[k] > 0)
                printf("  %-12s %10.4f %7.1f%%%s\n", model_profile_category(k), r.cat[k],
                       100 * r.cat[k] / st, pass ? "   (the trainer's table)" : "");
        for (int k = 0; pass && k < GPU_GRAPH_NKIND; k++)
            printf("  %-12s %10.4f %7.1f%%   (bf16 graph)\n", gpu_graph_bf16_kind(k), r.graph[k],
                   100 * r.graph[k] / st);
        printf("  %-12s %10.4f %7.1f%%   (host: routing plans, launches, the trainer)\n", "other",
               r.other, 100 * r.other / st);
        if (!pass) {
            printf("  gemm: %.1f TFLOP/s achieved on the linear ops (%s), %.0f op calls a "
                   "step\n", r.gemm_tflops,
                   s_real == &gpu_backend_f32 ? "fp32" : "bf16 conversions included", r.calls);
            printf("  (gemm: linear_fwd/bwd; attention: attention and RoPE; routing: router, "
                   "aux loss, expert gather/scatter; elementwise: embedding, RMSNorm, SwiGLU, "
                   "cross-entropy, add, axpy; optimizer: AdamW, sum of squares; memory: zero, "
                   "copy, host copies)\n");
        } else {
            printf("  (bf16 graph: gemm q/k/v, o_proj, LM head; moe_gemm the experts' and "
                   "router's; moe_other routing, permutation, SwiGLU, combine; attention flash "
                   "and RoPE; norm_loss RMSNorm, cross-entropy, router sums; convert the bf16 "
                   "weight copy, residual copies, embedding; host token upload, losses read "
                   "back)\n");
        }
    }
    if (json) {
        s_write_json(json, &r);
        printf("\nwrote %s\n", json);
    }
fail:
    if (rc)
        fprintf(stderr, "bench_train_gpu: %s (%s)\n", semoe_err_msg(), semoe_err_where());
    free(tokens);
    model_train_destroy(&tr);
    model_params_destroy(&params);
    return rc ? 1 : 0;
}
