/* bf16 GEMMs whose cuBLAS algorithm is picked by timing (C++, for the .cu files): cuBLASLt's
 * heuristic candidates for a shape and cublasGemmEx's own choice, each timed on the real
 * operands, the fastest kept for that shape. The MoE layer's expert GEMMs go through it.
 *
 * A shape is (op A, op B, m, n's bucket, k, leading dimensions, C's type, whether C
 * accumulates): per-expert token counts change every step, so n is rounded up to a bucket (128
 * wide, or an eighth of the power of two below n when that is wider). Only GEMMs that
 * overwrite C (beta 0) are timed, since the trial runs write C; one that accumulates (beta 1)
 * takes cublasGemmEx. Tuning waits for the device (once per new shape); gpu_gemm_run never
 * does. One tuner per thread and device (its workspaces are on that device). */
#ifndef SEMOE_GPU_GEMM_TUNE_CUH
#define SEMOE_GPU_GEMM_TUNE_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

typedef struct gpu_gemm_tuner gpu_gemm_tuner_t;

/* One C = op(A) op(B) (+ C when beta is 1) in cuBLAS's column-major terms, bf16 A and B, fp32
 * compute, C bf16 or fp32. */
typedef struct {
    cublasOperation_t ta, tb;
    int m, n, k, lda, ldb, ldc;
    const void *A, *B;
    void *C;
    cudaDataType_t ct;
    float beta; /* 0 or 1 */
} gpu_gemm_t;

/* A tuner with `streams` workspaces (one per stream it runs on, index 0.. streams-1). */
gpu_gemm_tuner_t *gpu_gemm_tuner_new(int streams);
void gpu_gemm_tuner_destroy(gpu_gemm_tuner_t **self_p);

/* Times the candidates for g's shape on stream st unless it has been tuned; the trial runs
 * write g's C. Returns whether the choice is cublasGemmEx's (for reports). */
int gpu_gemm_tune(gpu_gemm_tuner_t *self, cublasHandle_t hb, cudaStream_t st, const gpu_gemm_t *g);

/* g on stream st with workspace `slot` (the stream's), by the shape's tuned choice, or
 * cublasGemmEx on hb (bound to st) when the shape was not tuned. */
void gpu_gemm_run(gpu_gemm_tuner_t *self, cublasHandle_t hb, cudaStream_t st, int slot,
                  const gpu_gemm_t *g);

#endif
