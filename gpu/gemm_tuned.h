/* bf16 GEMMs through cuBLASLt with the algorithm measured, not guessed: the first call of a
 * shape times cuBLASLt's heuristic candidates (and cublasGemmEx's own pick) on that call's
 * operands and keeps the fastest for every later call of the shape. Shapes are bucketed
 * (m, n and k each rounded up to 1/16 of their power of two), so that the expert GEMMs, whose
 * row counts move from step to step, are timed once per bucket and not once per step.
 * Process-wide cache, one per device, safe from several threads. For the .cu files only. */
#ifndef SEMOE_GPU_GEMM_TUNED_H
#define SEMOE_GPU_GEMM_TUNED_H

#ifdef __cplusplus
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stddef.h>

/* A cuBLASLt handle and its workspace, bound to one cuBLAS handle's stream: one per stream
 * that GEMMs are enqueued on (a workspace is not shared between streams). */
typedef struct gpu_lt gpu_lt_t;

/* On the stream of hb, which must outlive it (it also runs the cublasGemmEx fallback). */
gpu_lt_t *gpu_lt_new(cublasHandle_t hb);
void gpu_lt_destroy(gpu_lt_t **lt);

/* The calling thread's on gpu_cublas() (gpu/cublas.h), per device, made on first use and never
 * destroyed, like the handle. */
gpu_lt_t *gpu_lt_thread(void);

/* C (m, n) = op(A) op(B) + beta C in cuBLAS's column-major terms (cublasGemmEx's arguments),
 * A and B bf16, fp32 compute and scale, C bf16 or fp32 (ct). With tuning off
 * (SEMOE_GEMM_TUNE=0 in the environment) or where cuBLASLt cannot, it is cublasGemmEx.
 * SEMOE_GEMM_TUNE_LOG=1 prints each measured shape's candidates to stderr. The first call of
 * a shape synchronises the device (it allocates, and waits for its timings); never inside
 * stream capture. */
void gpu_lt_gemm(gpu_lt_t *lt, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                 const void *A, int lda, const void *B, int ldb, float beta, void *C,
                 cudaDataType_t ct, int ldc);

#endif

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* For C callers (the tests): gpu_lt_gemm on the calling thread's (gpu_lt_thread), ta and tb 'N'
 * or 'T', A and B device bf16, C device fp32 when c32, else bf16. */
void gpu_lt_gemm_c(char ta, char tb, int m, int n, int k, const uint16_t *A, int lda,
                   const uint16_t *B, int ldb, float beta, void *C, int c32, int ldc);

/* Tuning on (1) or off (0: cublasGemmEx, the cache kept) from now on, over SEMOE_GEMM_TUNE;
 * for measuring the two side by side in one process. */
void gpu_lt_set_tuning(int on);

/* How many shapes this process has measured, how many of them took a cuBLASLt algorithm over
 * cublasGemmEx's, and the sum over those of the time saved per run (ms), for tests and logs. */
void gpu_lt_stats(int *shapes, int *lt_picks, double *saved_ms);

#ifdef __cplusplus
}
#endif

#endif
