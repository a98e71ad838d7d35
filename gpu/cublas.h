/* cuBLAS for the gpu/ .cu files (C++ only): the calling thread's handle and the check every
 * call goes through. The handle lives in gpu/linear.cu. */
#ifndef SEMOE_GPU_CUBLAS_H
#define SEMOE_GPU_CUBLAS_H

#include <cublas_v2.h>

/* The calling thread's cuBLAS handle on its current device (one per thread and device, made on
 * first use, never destroyed, like the streams), bound to gpu_stream() so that GEMMs are
 * ordered with every other op; default math: fp32 GEMMs compute in fp32 (no TF32), bf16 ones
 * with fp32 accumulation as their compute type says. */
cublasHandle_t gpu_cublas(void);

/* A failed cuBLAS call is a broken invariant here: abort with where, what and why. */
void gpu_cublas_check(cublasStatus_t st, const char *what, const char *file, int line);
#define GPU_CUBLAS(call) gpu_cublas_check((call), #call, __FILE__, __LINE__)

#endif
