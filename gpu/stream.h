/* The CUDA stream every gpu/ kernel runs on, and the checks the .cu files share.
 * gpu_stream() is defined in gpu/memory.cu; this header is for the .cu files only (C callers
 * go through gpu/ops.h, which synchronises where a host value is returned). */
#ifndef SEMOE_GPU_STREAM_H
#define SEMOE_GPU_STREAM_H

#ifdef __cplusplus
#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>

/* The stream this thread's ops on its current device are enqueued on (one per thread and
 * device, created on first use). */
extern "C" cudaStream_t gpu_stream(void);

/* After a kernel launch: a launch that failed (bad configuration, no device, an earlier
 * asynchronous fault) is a broken invariant here, so abort with where and why. */
#define GPU_CHECK_LAUNCH()                                                                     \
    do {                                                                                       \
        cudaError_t e_ = cudaGetLastError();                                                   \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d: CUDA kernel launch failed: %s\n", __FILE__, __LINE__,     \
                    cudaGetErrorString(e_));                                                   \
            abort();                                                                           \
        }                                                                                      \
    } while (0)

/* A CUDA runtime call that cannot fail short of a broken invariant or out of memory (a
 * stream-ordered scratch allocation, a copy): abort with the call, where and why. */
#define GPU_CHECK(call)                                                                        \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d: %s failed: %s\n", __FILE__, __LINE__, #call,              \
                    cudaGetErrorString(e_));                                                   \
            abort();                                                                           \
        }                                                                                      \
    } while (0)
#endif

#endif
