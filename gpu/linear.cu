/* The linear layer (nn.Linear without bias) on the GPU through cuBLAS in full fp32: the
 * contracts of cpu_linear_fwd/bwd (cpu/ops.h), row-major, W (OUT, IN) as nn.Linear stores it. */
#include "gpu/cublas.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#define S_MAX_DEVICES 64

void gpu_cublas_check(cublasStatus_t st, const char *what, const char *file, int line)
{
    if (st == CUBLAS_STATUS_SUCCESS)
        return;
    fprintf(stderr, "%s:%d: %s failed: %s\n", file, line, what, cublasGetStatusString(st));
    abort();
}

/* gpu/cublas.h. Default math mode: fp32 GEMMs compute in fp32 (no TF32; that needs
 * CUBLAS_TF32_TENSOR_OP_MATH or CUBLAS_COMPUTE_32F_FAST_TF32, neither used here). */
cublasHandle_t gpu_cublas(void)
{
    static thread_local cublasHandle_t handles[S_MAX_DEVICES];
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess || dev < 0 || dev >= S_MAX_DEVICES) {
        fprintf(stderr, "semoe gpu: cudaGetDevice: %s (device %d)\n", cudaGetErrorString(e),
                dev);
        abort();
    }
    if (!handles[dev]) {
        cublasHandle_t h = NULL;
        GPU_CUBLAS(cublasCreate(&h));
        GPU_CUBLAS(cublasSetStream(h, gpu_stream()));
        GPU_CUBLAS(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
        handles[dev] = h;
    }
    return handles[dev];
}

/* C = alpha op(A) op(B) + beta C in column-major terms, fp32 in, fp32 compute, fp32 out. */
static void s_gemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                   const float *A, int lda, const float *B, int ldb, float beta, float *C,
                   int ldc)
{
    const float alpha = 1.0f;
    GPU_CUBLAS(cublasGemmEx(gpu_cublas(), ta, tb, m, n, k, &alpha, A, CUDA_R_32F, lda, B,
                          CUDA_R_32F, ldb, &beta, C, CUDA_R_32F, ldc, CUBLAS_COMPUTE_32F,
                          CUBLAS_GEMM_DEFAULT));
}

/* cuBLAS is column-major: a row-major (r, c) matrix is, to it, the column-major (c, r) matrix
 * with leading dimension c, its transpose. So each row-major product Y = A B is computed as
 * Y^T = B^T A^T, with the operands' roles swapped:
 *   out (N, OUT) = x W^T       ->  out^T (OUT, N) = W x^T:   W is stored as W^T (IN, OUT), so
 *                                  op(W^T) = T gives W; x^T (IN, N) is x as stored: N.
 */
extern "C" void gpu_linear_fwd(float *out, const float *x, const float *w, int N, int IN,
                               int OUT)
{
    if (N == 0 || OUT == 0)
        return;
    if (IN == 0) { /* an empty sum: cuBLAS need not define C for k = 0 */
        gpu_zero(out, (size_t)N * OUT * sizeof(float));
        return;
    }
    s_gemm(CUBLAS_OP_T, CUBLAS_OP_N, OUT, N, IN, w, IN, x, IN, 0.0f, out, OUT);
}

/*   dx (N, IN) += dout W       ->  dx^T (IN, N) += W^T dout^T: W^T (IN, OUT) and dout^T
 *                                  (OUT, N) are both as stored: N, N; beta = 1.
 *   dw (OUT, IN) += dout^T x   ->  dw^T (IN, OUT) += x^T dout: x^T (IN, N) as stored: N;
 *                                  dout (N, OUT) is the transpose of the stored dout^T: T.
 */
extern "C" void gpu_linear_bwd(float *dx, float *dw, const float *dout, const float *x,
                               const float *w, int N, int IN, int OUT)
{
    if (N == 0 || IN == 0 || OUT == 0) /* every accumulated sum is empty */
        return;
    if (dx)
        s_gemm(CUBLAS_OP_N, CUBLAS_OP_N, IN, N, OUT, w, IN, dout, OUT, 1.0f, dx, IN);
    if (dw)
        s_gemm(CUBLAS_OP_N, CUBLAS_OP_T, IN, OUT, N, x, IN, dout, OUT, 1.0f, dw, IN);
}
