/* The linear layer with bf16 tensor-core GEMMs under the fp32 graph (gpu_backend_f32_bf16mm):
 * cpu_linear_fwd/bwd's contracts (cpu/ops.h), fp32 in and out, but x, W and dout are rounded
 * to bf16 (round to nearest even) into per-thread scratch and multiplied by cuBLAS with fp32
 * accumulation and fp32 outputs. Also the dense GEMM peak the training benchmark divides by. */
#include "gpu/backend.h"
#include "gpu/cublas.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define S_MAX_DEVICES 64
#define S_THREADS 256

typedef __nv_bfloat16 bf16;


static int s_device(void)
{
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess || dev < 0 || dev >= S_MAX_DEVICES) {
        fprintf(stderr, "semoe gpu: cudaGetDevice: %s (device %d)\n", cudaGetErrorString(e),
                dev);
        abort();
    }
    return dev;
}

/* The calling thread's scratch on its current device: the bf16 copies of x, W and dout, grown
 * on demand and never shrunk or freed (they live as long as the thread, like the streams). The
 * GEMMs go through the thread's cuBLAS handle (gpu/cublas.h). */
typedef struct {
    bf16 *buf[3];
    size_t cap[3]; /* elements */
} s_scratch_t;

enum { S_X = 0, S_W = 1, S_D = 2 };

static s_scratch_t *s_scratch(void)
{
    static thread_local s_scratch_t per_dev[S_MAX_DEVICES];
    s_scratch_t *s = &per_dev[s_device()];
    return s;
}

/* Scratch slot `which` with room for n bf16. Growing waits for the stream first: GEMMs
 * enqueued earlier may still read the old buffer. */
static bf16 *s_buf(s_scratch_t *s, int which, size_t n)
{
    if (n > s->cap[which]) {
        size_t want = n + n / 8; /* some headroom: shapes vary (expert rows) */
        GPU_CHECK(cudaStreamSynchronize(gpu_stream()));
        if (s->buf[which])
            GPU_CHECK(cudaFree(s->buf[which]));
        s->buf[which] = NULL;
        cudaError_t e = cudaMalloc((void **)&s->buf[which], want * sizeof(bf16));
        if (e != cudaSuccess) {
            fprintf(stderr, "semoe gpu: bf16 GEMM scratch of %zu bytes failed: %s\n",
                    want * sizeof(bf16), cudaGetErrorString(e));
            abort();
        }
        s->cap[which] = want;
    }
    return s->buf[which];
}

/* dst (n) = src rounded to bf16, to nearest even (NaN stays NaN, overflow goes to inf). */
__global__ static void s_to_bf16(bf16 *dst, const float *src, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

static const bf16 *s_round(s_scratch_t *s, int which, const float *src, size_t n)
{
    bf16 *dst = s_buf(s, which, n);
    size_t blocks = (n + S_THREADS - 1) / S_THREADS;
    if (blocks > 65536)
        blocks = 65536;
    if (blocks < 1)
        blocks = 1;
    s_to_bf16<<<(unsigned)blocks, S_THREADS, 0, gpu_stream()>>>(dst, src, n);
    GPU_CHECK_LAUNCH();
    return dst;
}

/* C (fp32) = op(A) op(B) + beta C, column-major, A and B bf16, fp32 compute. */
static void s_gemm(s_scratch_t *s, cublasOperation_t ta, cublasOperation_t tb, int m, int n,
                   int k, const bf16 *A, int lda, const bf16 *B, int ldb, float beta, float *C,
                   int ldc)
{
    const float alpha = 1.0f;
    GPU_CUBLAS(cublasGemmEx(gpu_cublas(), ta, tb, m, n, k, &alpha, A, CUDA_R_16BF, lda, B,
                          CUDA_R_16BF, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT));
}

/* The operand layouts are gpu/linear.cu's (row-major viewed as column-major transposes):
 *   out^T (OUT, N) = W x^T:          A = W (T, lda IN), B = x (N, ldb IN). */
extern "C" void gpu_linear_bf16_fwd(float *out, const float *x, const float *w, int N, int IN,
                                    int OUT)
{
    if (N == 0 || OUT == 0)
        return;
    if (IN == 0) {
        gpu_zero(out, (size_t)N * OUT * sizeof(float));
        return;
    }
    s_scratch_t *s = s_scratch();
    const bf16 *xb = s_round(s, S_X, x, (size_t)N * IN);
    const bf16 *wb = s_round(s, S_W, w, (size_t)OUT * IN);
    s_gemm(s, CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, wb, IN, xb, IN, 0.0f, out, OUT);
}

/*   dx^T (IN, N) += W^T dout^T:      A = W (N, lda IN), B = dout (N, ldb OUT), beta 1.
 *   dw^T (IN, OUT) += x^T dout:      A = x (N, lda IN), B = dout (T, ldb OUT), beta 1. */
extern "C" void gpu_linear_bf16_bwd(float *dx, float *dw, const float *dout, const float *x,
                                    const float *w, int N, int IN, int OUT)
{
    if (N == 0 || IN == 0 || OUT == 0 || (!dx && !dw))
        return;
    s_scratch_t *s = s_scratch();
    const bf16 *db = s_round(s, S_D, dout, (size_t)N * OUT);
    if (dx) {
        const bf16 *wb = s_round(s, S_W, w, (size_t)OUT * IN);
        s_gemm(s, CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, wb, IN, db, OUT, 1.0f, dx, IN);
    }
    if (dw) {
        const bf16 *xb = s_round(s, S_X, x, (size_t)N * IN);
        s_gemm(s, CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, xb, IN, db, OUT, 1.0f, dw, IN);
    }
}

/* ---- for the benchmarks ----------------------------------------------------------------- */

/* Fills n elements with a hash of the index in [-1, 1): not zeros (the tensor cores' power,
 * hence clocks, depend on the data). */
template <typename TT>
__global__ static void s_fill(TT *p, size_t n, uint32_t seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15;
        h *= 2246822519u;
        h ^= h >> 13;
        float v = (float)(h & 0xffffu) / 32768.0f - 1.0f;
        p[i] = (TT)v;
    }
}

extern "C" double gpu_gemm_peak_tflops(int n, int bf16_inputs, int iters)
{
    if (n < 1 || iters < 1)
        return 0;
    s_scratch_t *s = s_scratch();
    cudaStream_t st = gpu_stream();
    size_t nn = (size_t)n * n, esz = bf16_inputs ? sizeof(bf16) : sizeof(float);
    void *A = NULL, *B = NULL, *C = NULL;
    GPU_CHECK(cudaMalloc(&A, nn * esz));
    GPU_CHECK(cudaMalloc(&B, nn * esz));
    GPU_CHECK(cudaMalloc(&C, nn * esz));
    unsigned blocks = 4096;
    if (bf16_inputs) {
        s_fill<bf16><<<blocks, S_THREADS, 0, st>>>((bf16 *)A, nn, 1u);
        s_fill<bf16><<<blocks, S_THREADS, 0, st>>>((bf16 *)B, nn, 2u);
    } else {
        s_fill<float><<<blocks, S_THREADS, 0, st>>>((float *)A, nn, 1u);
        s_fill<float><<<blocks, S_THREADS, 0, st>>>((float *)B, nn, 2u);
    }
    GPU_CHECK_LAUNCH();
    cudaDataType_t t = bf16_inputs ? CUDA_R_16BF : CUDA_R_32F;
    const float alpha = 1.0f, beta = 0.0f;
    cudaEvent_t e0, e1;
    GPU_CHECK(cudaEventCreate(&e0));
    GPU_CHECK(cudaEventCreate(&e1));
    double best = 1e30;
    for (int rep = 0; rep < 4; rep++) { /* the first round warms up (clocks, heuristics) */
        GPU_CHECK(cudaEventRecord(e0, st));
        for (int i = 0; i < iters; i++)
            GPU_CUBLAS(cublasGemmEx(gpu_cublas(), CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, A, t, n,
                                  B, t, n, &beta, C, t, n, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
        GPU_CHECK(cudaEventRecord(e1, st));
        GPU_CHECK(cudaEventSynchronize(e1));
        float ms = 0;
        GPU_CHECK(cudaEventElapsedTime(&ms, e0, e1));
        if (rep > 0 && ms > 0 && ms * 1e-3 / iters < best)
            best = ms * 1e-3 / iters;
    }
    GPU_CHECK(cudaEventDestroy(e0));
    GPU_CHECK(cudaEventDestroy(e1));
    GPU_CHECK(cudaStreamSynchronize(st));
    GPU_CHECK(cudaFree(A));
    GPU_CHECK(cudaFree(B));
    GPU_CHECK(cudaFree(C));
    return 2.0 * (double)n * n * n / best * 1e-12;
}

extern "C" void gpu_backend_sync(void)
{
    GPU_CHECK(cudaStreamSynchronize(gpu_stream()));
}
