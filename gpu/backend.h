/* The CUDA backend's fp32 table (model/backend.h), filled with gpu/ops.h's device
 * implementations: hand &gpu_backend_f32 to the model graph or the trainer exactly where
 * &cpu_backend_f32 goes. Compiled only with CUDA (SEMOE_HAVE_CUDA); link gpu_dep. */
#ifndef SEMOE_GPU_BACKEND_H
#define SEMOE_GPU_BACKEND_H

/* model/backend.h and actors/err.h have no C++ guards of their own: backend.cu sees them (and
 * the table's function pointer types) with C linkage through here. */
#ifdef __cplusplus
extern "C" {
#endif

#include "actors/err.h"
#include "model/backend.h"

/* name "cuda". Its buffers live on the calling thread's current CUDA device and its ops are
 * ordered on that thread's stream (gpu/stream.h): use it from a thread that called
 * gpu_backend_init, and pass device buffers between threads only after a to_host (or
 * another synchronising call) on the producing thread. Errors inside an op (a failed launch,
 * cuBLAS, out of memory) abort with a message: the table's functions cannot fail. */
extern const model_backend_f32_t gpu_backend_f32;

/* Makes device the calling thread's current device and creates its context and stream (the
 * cuBLAS handle follows on the first GEMM). SEMOE_EINVAL when this host has no CUDA device or
 * device is out of range (the message says how many there are), SEMOE_ECUDA when the runtime
 * fails. Call it on every thread that uses gpu_backend_f32. */
semoe_rc gpu_backend_init(int device);

#ifdef __cplusplus
}
#endif

#endif
