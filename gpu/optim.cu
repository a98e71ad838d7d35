/* The optimizer's ops on the GPU (gpu/ops.h): the AdamW step in cpu_adamw's arithmetic
 * (cpu/ops_impl.h) and the sum of squares in double for the global gradient norm. */
#include "gpu/ops.h"
#include "gpu/reduce.cuh"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#define S_THREADS 256
#define S_MAX_BLOCKS (1u << 20)
#define S_SUMSQ_BLOCKS 1024u /* first stage of the sum of squares; the second is one block */

static unsigned s_grid(size_t n, unsigned max_blocks)
{
    size_t b = (n + S_THREADS - 1) / S_THREADS;
    return (unsigned)(b < max_blocks ? b : max_blocks);
}

#define S_FOR_EACH(i, n)                                                                       \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                    \
         i += (size_t)gridDim.x * blockDim.x)

/* The hyperparameters arrive rounded to float on the host, as cpu_adamw rounds them. */
__global__ static void s_adamw(float *p, const float *g, float *m, float *v, size_t n, float lr,
                               float b1, float b2, float b1c, float b2c, float eps, float wd,
                               float gs)
{
    S_FOR_EACH(i, n) {
        float gi = g[i] * gs;
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float mhat = mi / b1c, vhat = vi / b2c;
        p[i] -= lr * (mhat / (sqrtf(vhat) + eps) + wd * p[i]);
    }
}

extern "C" void gpu_adamw(float *p, const float *g, float *m, float *v, size_t n, double lr,
                          double beta1, double beta2, double eps, double wd, int t,
                          double gscale)
{
    if (n == 0)
        return;
    float b1c = (float)(1 - pow(beta1, t)), b2c = (float)(1 - pow(beta2, t));
    s_adamw<<<s_grid(n, S_MAX_BLOCKS), S_THREADS, 0, gpu_stream()>>>(
        p, g, m, v, n, (float)lr, (float)beta1, (float)beta2, b1c, b2c, (float)eps, (float)wd,
        (float)gscale);
    GPU_CHECK_LAUNCH();
}

/* First stage: partial[block] = sum of g^2 over the block's grid-stride share, in double. */
__global__ static void s_sumsq_part(double *partial, const float *g, size_t n)
{
    double s = 0.0;
    S_FOR_EACH(i, n)
        s += (double)g[i] * g[i];
    s = gpu_block_sum(s);
    if (threadIdx.x == 0)
        partial[blockIdx.x] = s;
}

/* Second stage, one block: *total = sum of partial (nparts). */
__global__ static void s_sumsq_total(double *total, const double *partial, unsigned nparts)
{
    double s = 0.0;
    for (unsigned i = threadIdx.x; i < nparts; i += blockDim.x)
        s += partial[i];
    s = gpu_block_sum(s);
    if (threadIdx.x == 0)
        *total = s;
}

/* Synchronises; the order of the additions differs from the CPU's, in double. */
extern "C" double gpu_sumsq(const float *g, size_t n)
{
    if (n == 0)
        return 0.0;
    cudaStream_t st = gpu_stream();
    unsigned blocks = s_grid(n, S_SUMSQ_BLOCKS);
    double *partial = NULL, total = 0.0;
    GPU_CHECK(cudaMallocAsync((void **)&partial, ((size_t)blocks + 1) * sizeof(double), st));
    s_sumsq_part<<<blocks, S_THREADS, 0, st>>>(partial, g, n);
    GPU_CHECK_LAUNCH();
    s_sumsq_total<<<1, S_THREADS, 0, st>>>(partial + blocks, partial, blocks);
    GPU_CHECK_LAUNCH();
    GPU_CHECK(cudaMemcpyAsync(&total, partial + blocks, sizeof(double), cudaMemcpyDeviceToHost,
                              st));
    GPU_CHECK(cudaFreeAsync(partial, st));
    GPU_CHECK(cudaStreamSynchronize(st));
    return total;
}
