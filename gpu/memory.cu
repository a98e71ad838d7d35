/* Device memory for the CUDA backend (gpu/ops.h): allocation, zeroing and copies, and the
 * stream every gpu/ op is enqueued on (gpu/stream.h). A failing CUDA call here is a broken
 * invariant (the backend table's memory functions cannot fail): it aborts with what and why. */
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* Enough for any host we run on (8 GPUs); a device index past it is a broken invariant. */
#define S_MAX_DEVICES 64

static void s_die(const char *what, cudaError_t e, size_t bytes)
{
    int dev = -1;
    (void)cudaGetDevice(&dev);
    fprintf(stderr, "semoe gpu: %s of %zu bytes (%.3f GiB) on cuda:%d failed: %s\n", what, bytes,
            (double)bytes / (1024.0 * 1024.0 * 1024.0), dev, cudaGetErrorString(e));
    abort();
}

#define S_CHECK(call, what, bytes)                                                             \
    do {                                                                                       \
        cudaError_t e_ = (call);                                                               \
        if (e_ != cudaSuccess)                                                                 \
            s_die((what), e_, (bytes));                                                        \
    } while (0)

/* One stream per (thread, device), created on first use with cudaStreamNonBlocking so that it
 * never waits on the legacy default stream (which nothing here uses). Everything a thread
 * enqueues on one device is therefore ordered on one stream, and the copies to the host below
 * synchronise it before they return. The streams are never destroyed: they live as long as
 * the process (a thread that ends leaks its stream; threads that drive a GPU live that long). */
extern "C" cudaStream_t gpu_stream(void)
{
    static thread_local cudaStream_t streams[S_MAX_DEVICES];
    int dev = 0;
    S_CHECK(cudaGetDevice(&dev), "cudaGetDevice", (size_t)0);
    if (dev < 0 || dev >= S_MAX_DEVICES) {
        fprintf(stderr, "semoe gpu: device index %d out of range (max %d)\n", dev,
                S_MAX_DEVICES - 1);
        abort();
    }
    if (!streams[dev])
        S_CHECK(cudaStreamCreateWithFlags(&streams[dev], cudaStreamNonBlocking),
                "cudaStreamCreateWithFlags", (size_t)0);
    return streams[dev];
}

/* cudaMalloc, zeroed on the stream and waited for, so that the memory reads as zero from any
 * thread's stream (allocations are rare: the wait costs nothing that matters). At least one
 * byte so that a zero-byte allocation is still a distinct non-NULL pointer, as on the CPU. */
extern "C" void *gpu_alloc(size_t bytes)
{
    void *p = NULL;
    size_t n = bytes ? bytes : 1;
    cudaStream_t st = gpu_stream();
    S_CHECK(cudaMalloc(&p, n), "cudaMalloc", n);
    S_CHECK(cudaMemsetAsync(p, 0, n, st), "cudaMemsetAsync", n);
    S_CHECK(cudaStreamSynchronize(st), "cudaStreamSynchronize after zeroing", n);
    return p;
}

extern "C" void *gpu_alloc_slab(const size_t *sz, void **const *ptrs, int n, size_t *total)
{
    size_t all = 0;
    for (int i = 0; i < n; i++)
        all += (sz[i] + 255) & ~(size_t)255;
    if (total)
        *total = all;
    char *q = NULL;
    if (cudaMalloc((void **)&q, all ? all : 1) != cudaSuccess) {
        cudaGetLastError();
        return NULL;
    }
    cudaStream_t st = gpu_stream();
    S_CHECK(cudaMemsetAsync(q, 0, all ? all : 1, st), "cudaMemsetAsync", all);
    S_CHECK(cudaStreamSynchronize(st), "cudaStreamSynchronize after zeroing", all);
    void *base = q;
    for (int i = 0; i < n; i++) {
        *ptrs[i] = q;
        q += (sz[i] + 255) & ~(size_t)255;
    }
    return base;
}

/* Waits for the stream first: ops enqueued before the free may still read or write p. */
extern "C" void gpu_free(void *p)
{
    if (!p)
        return;
    S_CHECK(cudaStreamSynchronize(gpu_stream()), "cudaStreamSynchronize before cudaFree",
            (size_t)0);
    S_CHECK(cudaFree(p), "cudaFree", (size_t)0);
}

extern "C" void gpu_zero(void *p, size_t bytes)
{
    if (bytes)
        S_CHECK(cudaMemsetAsync(p, 0, bytes, gpu_stream()), "cudaMemsetAsync", bytes);
}

/* memmove semantics, as the CPU backend's copy: overlapping ranges (not something the graph
 * does) go through a temporary so that the result is the source as it was. */
extern "C" void gpu_copy(void *dst, const void *src, size_t bytes)
{
    if (!bytes || dst == src)
        return;
    cudaStream_t st = gpu_stream();
    uintptr_t d = (uintptr_t)dst, s = (uintptr_t)src;
    if (d < s + bytes && s < d + bytes) {
        void *tmp = NULL;
        S_CHECK(cudaMallocAsync(&tmp, bytes, st), "cudaMallocAsync (overlapping copy)", bytes);
        S_CHECK(cudaMemcpyAsync(tmp, src, bytes, cudaMemcpyDeviceToDevice, st),
                "cudaMemcpyAsync device to device", bytes);
        S_CHECK(cudaMemcpyAsync(dst, tmp, bytes, cudaMemcpyDeviceToDevice, st),
                "cudaMemcpyAsync device to device", bytes);
        S_CHECK(cudaFreeAsync(tmp, st), "cudaFreeAsync", bytes);
        return;
    }
    S_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st),
            "cudaMemcpyAsync device to device", bytes);
}

/* Ordered after everything enqueued before it; synchronises so that the caller may reuse or
 * free src (pageable or pinned) as soon as this returns. */
extern "C" void gpu_to_device(void *dst, const void *src, size_t bytes)
{
    if (!bytes)
        return;
    cudaStream_t st = gpu_stream();
    S_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st),
            "cudaMemcpyAsync host to device", bytes);
    S_CHECK(cudaStreamSynchronize(st), "cudaStreamSynchronize after a copy to the device",
            bytes);
}

/* Waits for every op enqueued before it (on this thread's stream), so dst holds the result. */
extern "C" void gpu_to_host(void *dst, const void *src, size_t bytes)
{
    if (!bytes)
        return;
    cudaStream_t st = gpu_stream();
    S_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st),
            "cudaMemcpyAsync device to host", bytes);
    S_CHECK(cudaStreamSynchronize(st), "cudaStreamSynchronize after a copy to the host", bytes);
}
