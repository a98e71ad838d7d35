/* CUDA device probing behind a plain C header: how many devices, and a device's name and
 * memory. Implemented in gpu/device.cu, compiled only when the build found CUDA
 * (SEMOE_HAVE_CUDA in semoe_config.h); callers guard their use with that macro. */
#ifndef SEMOE_GPU_DEVICE_H
#define SEMOE_GPU_DEVICE_H

#include <stddef.h>
#include <stdint.h>

/* actors/err.h has no C++ guards of its own, so device.cu sees it with C linkage through here. */
#ifdef __cplusplus
extern "C" {
#endif

#include "actors/err.h"

/* The number of CUDA devices this process can see; 0 when there are none or no usable driver,
 * and then semoe_err holds the driver's reason ("no CUDA-capable device is detected"). */
int gpu_device_count(void);

/* Name (NUL-terminated, truncated to n bytes), total and free HBM in bytes of device index.
 * Makes index the calling thread's current device and creates its primary context (the first
 * call costs a few hundred ms and some HBM). Fails with SEMOE_EINVAL for an index out of
 * range and SEMOE_ECUDA when the runtime fails; any output pointer may be NULL. */
semoe_rc gpu_device_info(int index, char *name, size_t n, uint64_t *hbm_total,
                         uint64_t *hbm_free);

/* Free and total HBM of the device, cheap once gpu_device_info has run for it. */
semoe_rc gpu_device_mem(int index, uint64_t *hbm_total, uint64_t *hbm_free);

#ifdef __cplusplus
}
#endif

#endif
