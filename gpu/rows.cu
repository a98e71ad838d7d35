/* The MoE block's row moves on the GPU in fp32 (gpu/ops.h, contracts in model/backend.h):
 * gather rows into an expert's batch, the weighted scatter-add back to the tokens, and their
 * backward, in the arithmetic of cpu/backend.c. */
#include "gpu/ops.h"
#include "gpu/reduce.cuh"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <stdint.h>

#define S_THREADS 256
#define S_MAX_BLOCKS (1u << 20)

static unsigned s_grid(size_t n)
{
    size_t b = (n + S_THREADS - 1) / S_THREADS;
    return (unsigned)(b < S_MAX_BLOCKS ? b : S_MAX_BLOCKS);
}

#define S_FOR_EACH(i, n)                                                                       \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n);                    \
         i += (size_t)gridDim.x * blockDim.x)

/* Elements of an (n, D) operand; 0 for an empty one. */
static size_t s_total(int n, int D)
{
    return (size_t)(n > 0 ? n : 0) * (size_t)(D > 0 ? D : 0);
}

/* out row i = x row rows[i]. */
__global__ static void s_gather(float *out, const float *x, const int32_t *rows, size_t total,
                                int D)
{
    S_FOR_EACH(j, total) {
        size_t i = j / (size_t)D, c = j % (size_t)D;
        out[j] = x[(size_t)rows[i] * D + c];
    }
}

extern "C" void gpu_gather_rows(float *out, const float *x, const int32_t *rows, int n, int D)
{
    size_t total = s_total(n, D);
    if (total == 0)
        return;
    s_gather<<<s_grid(total), S_THREADS, 0, gpu_stream()>>>(out, x, rows, total, D);
    GPU_CHECK_LAUNCH();
}

/* dx row rows[i] += dout row i. A row may be gathered more than once (a token routed to
 * several experts of one batch), hence the atomics: the order of the additions, and so the
 * last bits, may vary from run to run. */
__global__ static void s_gather_bwd(float *dx, const float *dout, const int32_t *rows,
                                    size_t total, int D)
{
    S_FOR_EACH(j, total) {
        size_t i = j / (size_t)D, c = j % (size_t)D;
        atomicAdd(dx + (size_t)rows[i] * D + c, dout[j]);
    }
}

extern "C" void gpu_gather_rows_bwd(float *dx, const float *dout, const int32_t *rows, int n,
                                    int D)
{
    size_t total = s_total(n, D);
    if (total == 0)
        return;
    s_gather_bwd<<<s_grid(total), S_THREADS, 0, gpu_stream()>>>(dx, dout, rows, total, D);
    GPU_CHECK_LAUNCH();
}

/* out row rows[i] += w[slots[i]] * y row i: a token's K expert outputs meet in its row, hence
 * the atomics (as above). */
__global__ static void s_scatter(float *out, const float *y, const int32_t *rows,
                                 const float *w, const int32_t *slots, size_t total, int D)
{
    S_FOR_EACH(j, total) {
        size_t i = j / (size_t)D, c = j % (size_t)D;
        atomicAdd(out + (size_t)rows[i] * D + c, w[slots[i]] * y[j]);
    }
}

extern "C" void gpu_scatter_rows(float *out, const float *y, const int32_t *rows, const float *w,
                                 const int32_t *slots, int n, int D)
{
    size_t total = s_total(n, D);
    if (total == 0)
        return;
    s_scatter<<<s_grid(total), S_THREADS, 0, gpu_stream()>>>(out, y, rows, w, slots, total, D);
    GPU_CHECK_LAUNCH();
}

/* dy row i += w[slots[i]] * dout row rows[i]: each element written by one thread. */
__global__ static void s_scatter_bwd_dy(float *dy, const float *dout, const int32_t *rows,
                                        const float *w, const int32_t *slots, size_t total,
                                        int D)
{
    S_FOR_EACH(j, total) {
        size_t i = j / (size_t)D, c = j % (size_t)D;
        dy[j] += w[slots[i]] * dout[(size_t)rows[i] * D + c];
    }
}

/* One block per row i: dw[slots[i]] += dot(dout row rows[i], y row i). Slots are distinct in
 * the graph's use (token * K + k); the atomic only keeps a repeated slot correct. */
__global__ static void s_scatter_bwd_dw(float *dw, const float *dout, const float *y,
                                        const int32_t *rows, const int32_t *slots, int D)
{
    size_t i = blockIdx.x;
    const float *g = dout + (size_t)rows[i] * D;
    const float *s = y + i * D;
    float acc = 0.0f;
    for (int c = threadIdx.x; c < D; c += blockDim.x)
        acc += g[c] * s[c];
    acc = gpu_block_sum(acc);
    if (threadIdx.x == 0)
        atomicAdd(dw + slots[i], acc);
}

extern "C" void gpu_scatter_rows_bwd(float *dy, float *dw, const float *dout, const float *y,
                                     const int32_t *rows, const float *w, const int32_t *slots,
                                     int n, int D)
{
    size_t total = s_total(n, D);
    if (total == 0)
        return;
    cudaStream_t st = gpu_stream();
    if (dy) {
        s_scatter_bwd_dy<<<s_grid(total), S_THREADS, 0, st>>>(dy, dout, rows, w, slots, total,
                                                              D);
        GPU_CHECK_LAUNCH();
    }
    if (dw) {
        s_scatter_bwd_dw<<<(unsigned)n, S_THREADS, 0, st>>>(dw, dout, y, rows, slots, D);
        GPU_CHECK_LAUNCH();
    }
}
