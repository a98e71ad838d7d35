/* gpu/moe_layer.h's benchmark helpers: seeded normal bf16 fills, the loss gradient's scaling,
 * CUDA-event timing and its median, and a dense cuBLAS bf16 GEMM's rate. */
#include "gpu/moe_layer.h"
#include "gpu/bf16.cuh"
#include "gpu/cublas.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef __nv_bfloat16 bf16;

static unsigned s_grid(size_t n, int threads)
{
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 132 * 32 ? (g ? g : 1) : 132 * 32);
}

__device__ __forceinline__ uint64_t s_mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__global__ void s_randn_kernel(bf16 *p, size_t n, float scale, uint64_t seed)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t r = s_mix(seed * 0x100000001b3ull + i);
        float u1 = ((float)(r >> 40) + 0.5f) * (1.0f / 16777216.0f); /* (0, 1) */
        float u2 = (float)((r >> 16) & 0xffffffu) * (1.0f / 16777216.0f);
        float z = sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
        p[i] = __float2bfloat16(scale * z);
    }
}

/* y = bf16(scale x): 8 per thread when both pointers are 16-byte aligned (vec), the rest (or
 * everything, when not) one by one. */
__global__ void s_scale_kernel(bf16 *y, const bf16 *x, size_t n, float scale, int vec)
{
    size_t i0 = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t n8 = vec ? n / GPU_VEC : 0;
    for (size_t i = i0; i < n8; i += stride) {
        float v[GPU_VEC];
        gpu_ld<GPU_VEC>(v, x + i * GPU_VEC);
#pragma unroll
        for (int q = 0; q < GPU_VEC; q++)
            v[q] = scale * v[q];
        gpu_st<GPU_VEC>(y + i * GPU_VEC, v);
    }
    for (size_t i = n8 * GPU_VEC + i0; i < n; i += stride)
        y[i] = __float2bfloat16(scale * __bfloat162float(x[i]));
}

extern "C" void gpu_moe_fill_randn(uint16_t *p, size_t n, float scale, uint64_t seed)
{
    s_randn_kernel<<<s_grid(n, 256), 256, 0, gpu_stream()>>>((bf16 *)p, n, scale, seed);
    GPU_CHECK_LAUNCH();
}

extern "C" void gpu_moe_scale(uint16_t *y, const uint16_t *x, size_t n, float scale)
{
    int vec = (((uintptr_t)y | (uintptr_t)x) & 15) == 0;
    s_scale_kernel<<<s_grid(vec ? n / GPU_VEC + n % GPU_VEC : n, 256), 256, 0, gpu_stream()>>>(
        (bf16 *)y, (const bf16 *)x, n, scale, vec);
    GPU_CHECK_LAUNCH();
}

extern "C" float gpu_moe_time_ms(void (*fn)(void *ctx), void *ctx)
{
    cudaEvent_t a, b;
    cudaStream_t st = gpu_stream();
    GPU_CHECK(cudaEventCreate(&a));
    GPU_CHECK(cudaEventCreate(&b));
    GPU_CHECK(cudaEventRecord(a, st));
    fn(ctx);
    GPU_CHECK(cudaEventRecord(b, st));
    GPU_CHECK(cudaEventSynchronize(b));
    float ms = 0.0f;
    GPU_CHECK(cudaEventElapsedTime(&ms, a, b));
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms;
}

extern "C" void gpu_moe_sync(void) { GPU_CHECK(cudaStreamSynchronize(gpu_stream())); }

static int s_cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

extern "C" float gpu_moe_median_ms(void (*fn)(void *ctx), void *ctx, int warm, int iters)
{
    float ts[64];
    iters = iters < 1 ? 1 : iters > 64 ? 64 : iters;
    for (int i = 0; i < warm; i++)
        fn(ctx);
    gpu_moe_sync();
    for (int i = 0; i < iters; i++)
        ts[i] = gpu_moe_time_ms(fn, ctx);
    qsort(ts, (size_t)iters, sizeof(float), s_cmp_float);
    return ts[iters / 2];
}

typedef struct {
    cublasHandle_t h;
    int n;
    const void *a, *b;
    void *c;
} s_dense_t;

static void s_dense_once(void *ctx)
{
    s_dense_t *g = (s_dense_t *)ctx;
    const float alpha = 1.0f, beta = 0.0f;
    GPU_CUBLAS(cublasGemmEx(g->h, CUBLAS_OP_N, CUBLAS_OP_N, g->n, g->n, g->n, &alpha, g->a,
                            CUDA_R_16BF, g->n, g->b, CUDA_R_16BF, g->n, &beta, g->c, CUDA_R_16BF,
                            g->n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

extern "C" double gpu_moe_dense_tflops(int n, int warm, int iters)
{
    size_t nn = (size_t)n * n;
    s_dense_t g;
    g.n = n;
    g.a = gpu_alloc(nn * 2);
    g.b = gpu_alloc(nn * 2);
    g.c = gpu_alloc(nn * 2);
    gpu_moe_fill_randn((uint16_t *)g.a, nn, 1.0f, 101);
    gpu_moe_fill_randn((uint16_t *)g.b, nn, 1.0f, 102);
    GPU_CUBLAS(cublasCreate(&g.h));
    GPU_CUBLAS(cublasSetStream(g.h, gpu_stream()));
    double ms = iters > 0 ? gpu_moe_median_ms(s_dense_once, &g, warm, iters) : 0.0;
    cublasDestroy(g.h);
    gpu_free((void *)g.a);
    gpu_free((void *)g.b);
    gpu_free(g.c);
    return ms > 0 ? 2.0 * (double)n * n * n / (ms * 1e9) : 0.0;
}

/* ---------------------------------------------------------------------- the emulated link */

#define S_LINK_MARKS 1024 /* transfers timed between two takes */

struct gpu_moe_link {
    int E, d;
    double ns_per_byte; /* remote / gbps, in ns per byte of rows; 0: the copies alone */
    int host_wait;      /* the host waits for each transfer (else the streams alone order) */
    cudaStream_t st;
    cudaEvent_t ready, t0[S_LINK_MARKS], t1[S_LINK_MARKS];
    int n;              /* transfers since the last take */
};

/* Spins one block for ns nanoseconds of the GPU's global timer. */
__global__ void s_spin_kernel(unsigned long long ns)
{
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}

/* One transfer: after the caller's stream's work so far, on the link's stream, the copy and
 * the spin; the caller's stream waits for it, and so does the host (as the NCCL path does). */
static void s_link_move(gpu_moe_link_t *l, void *dst, const void *src, size_t bytes)
{
    cudaStream_t main = gpu_stream();
    int i = l->n < S_LINK_MARKS ? l->n++ : S_LINK_MARKS - 1;
    GPU_CHECK(cudaEventRecord(l->ready, main));
    GPU_CHECK(cudaStreamWaitEvent(l->st, l->ready, 0));
    GPU_CHECK(cudaEventRecord(l->t0[i], l->st));
    if (bytes)
        GPU_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, l->st));
    if (l->ns_per_byte > 0 && bytes) {
        s_spin_kernel<<<1, 32, 0, l->st>>>((unsigned long long)(l->ns_per_byte * bytes));
        GPU_CHECK_LAUNCH();
    }
    GPU_CHECK(cudaEventRecord(l->t1[i], l->st));
    GPU_CHECK(cudaStreamWaitEvent(main, l->t1[i], 0));
    if (l->host_wait)
        GPU_CHECK(cudaEventSynchronize(l->t1[i]));
}

static int s_link_rows(const gpu_moe_link_t *l, const int32_t *c)
{
    int n = 0;
    for (int e = 0; e < l->E; e++)
        n += c[e];
    return n;
}

static semoe_rc s_link_dispatch(void *state, int part, const uint16_t *send,
                                const int32_t *send_counts, uint16_t *recv, int32_t *recv_counts,
                                int recv_cap)
{
    (void)part;
    gpu_moe_link_t *l = (gpu_moe_link_t *)state;
    memcpy(recv_counts, send_counts, (size_t)l->E * sizeof(int32_t));
    if (!recv)
        return SEMOE_OK;
    int n = s_link_rows(l, send_counts);
    if (n > recv_cap)
        return semoe_err(SEMOE_EINVAL, "link: %d rows, room for %d", n, recv_cap);
    s_link_move(l, recv, send, (size_t)n * l->d * 2);
    return SEMOE_OK;
}

static semoe_rc s_link_combine(void *state, int part, const uint16_t *send,
                               const int32_t *send_counts, uint16_t *recv,
                               const int32_t *recv_counts)
{
    (void)part, (void)recv_counts;
    gpu_moe_link_t *l = (gpu_moe_link_t *)state;
    s_link_move(l, recv, send, (size_t)s_link_rows(l, send_counts) * l->d * 2);
    return SEMOE_OK;
}

extern "C" gpu_moe_link_t *gpu_moe_link_new(int E, int d, double gbps, double remote,
                                            int host_wait)
{
    gpu_moe_link_t *l = (gpu_moe_link_t *)calloc(1, sizeof *l);
    if (!l)
        abort();
    l->E = E, l->d = d, l->host_wait = host_wait;
    l->ns_per_byte = gbps > 0 ? remote / gbps : 0.0;
    GPU_CHECK(cudaStreamCreateWithFlags(&l->st, cudaStreamNonBlocking));
    GPU_CHECK(cudaEventCreateWithFlags(&l->ready, cudaEventDisableTiming));
    for (int i = 0; i < S_LINK_MARKS; i++) {
        GPU_CHECK(cudaEventCreate(&l->t0[i]));
        GPU_CHECK(cudaEventCreate(&l->t1[i]));
    }
    return l;
}

extern "C" void gpu_moe_link_destroy(gpu_moe_link_t **l_p)
{
    if (!l_p || !*l_p)
        return;
    gpu_moe_link_t *l = *l_p;
    GPU_CHECK(cudaStreamSynchronize(l->st));
    cudaEventDestroy(l->ready);
    for (int i = 0; i < S_LINK_MARKS; i++) {
        cudaEventDestroy(l->t0[i]);
        cudaEventDestroy(l->t1[i]);
    }
    cudaStreamDestroy(l->st);
    free(l);
    *l_p = NULL;
}

extern "C" gpu_moe_exchange_t gpu_moe_link_exchange(gpu_moe_link_t *l, int parts)
{
    gpu_moe_exchange_t x = {l, parts, s_link_dispatch, s_link_combine};
    return x;
}

extern "C" double gpu_moe_link_take_ms(gpu_moe_link_t *l)
{
    GPU_CHECK(cudaStreamSynchronize(l->st));
    double ms = 0.0;
    for (int i = 0; i < l->n; i++) {
        float t = 0.0f;
        GPU_CHECK(cudaEventElapsedTime(&t, l->t0[i], l->t1[i]));
        ms += t;
    }
    l->n = 0;
    return ms;
}
