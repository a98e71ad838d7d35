/* CUDA device probing for plain C callers (gpu/device.h): counts devices and reads a device's
 * name and HBM through the CUDA runtime. No kernels here. */
#include "gpu/device.h"

#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

/* cudaGetDeviceCount fails (rather than returning 0) when there is no driver or no device;
 * callers only need the count and a reason, so the error is cleared and turned into one. */
extern "C" int gpu_device_count(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        semoe_err(SEMOE_ECUDA, "%s", cudaGetErrorString(e));
        return 0;
    }
    if (n == 0)
        semoe_err(SEMOE_ECUDA, "the CUDA runtime sees no device");
    return n;
}

extern "C" semoe_rc gpu_device_mem(int index, uint64_t *hbm_total, uint64_t *hbm_free)
{
    cudaError_t e = cudaSetDevice(index);
    if (e != cudaSuccess)
        return semoe_err(SEMOE_ECUDA, "cuda:%d: cudaSetDevice: %s", index, cudaGetErrorString(e));
    size_t free_b = 0, total_b = 0;
    e = cudaMemGetInfo(&free_b, &total_b);
    if (e != cudaSuccess)
        return semoe_err(SEMOE_ECUDA, "cuda:%d: cudaMemGetInfo: %s", index, cudaGetErrorString(e));
    if (hbm_total)
        *hbm_total = total_b;
    if (hbm_free)
        *hbm_free = free_b;
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_device_info(int index, char *name, size_t n, uint64_t *hbm_total,
                                    uint64_t *hbm_free)
{
    int count = gpu_device_count();
    if (count == 0) {
        char why[256]; /* semoe_err must not format its own buffer into itself */
        snprintf(why, sizeof why, "%s", semoe_err_msg());
        return semoe_err(SEMOE_EINVAL, "cuda:%d: no CUDA device: %s", index, why);
    }
    if (index < 0 || index >= count)
        return semoe_err(SEMOE_EINVAL, "cuda:%d: this host has %d CUDA device%s (cuda:0..cuda:%d)",
                         index, count, count == 1 ? "" : "s", count - 1);
    cudaDeviceProp prop;
    cudaError_t e = cudaGetDeviceProperties(&prop, index);
    if (e != cudaSuccess)
        return semoe_err(SEMOE_ECUDA, "cuda:%d: cudaGetDeviceProperties: %s", index,
                         cudaGetErrorString(e));
    if (name && n > 0)
        snprintf(name, n, "%s", prop.name);
    uint64_t total = 0, free_b = 0;
    SEMOE_CHECK(gpu_device_mem(index, &total, &free_b));
    if (hbm_total)
        *hbm_total = total ? total : (uint64_t)prop.totalGlobalMem;
    if (hbm_free)
        *hbm_free = free_b;
    return SEMOE_OK;
}
