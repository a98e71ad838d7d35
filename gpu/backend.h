/* The CUDA backend's fp32 tables (model/backend.h), filled with gpu/ops.h's device
 * implementations: hand &gpu_backend_f32 (or &gpu_backend_f32_bf16mm, its bf16-GEMM variant) to
 * the model graph or the trainer exactly where &cpu_backend_f32 goes. Compiled only with CUDA
 * (SEMOE_HAVE_CUDA); link gpu_dep. */
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

/* name "cuda-bf16mm": gpu_backend_f32 with bf16 tensor-core GEMMs under the fp32 graph. Every
 * buffer, the master weights and every other op stay fp32; only linear_fwd/linear_bwd differ:
 * they round x, W and dout to bf16 (round to nearest even, into per-thread device scratch that
 * grows as needed and is kept) and multiply with cuBLAS (bf16 inputs, fp32 accumulation, fp32
 * outputs, backward accumulating into fp32 with beta 1); attention_fwd/attention_bwd run the
 * bf16 flash kernels (gpu/flash_attn.h) on bf16-rounded q, k, v, keeping their state in the
 * probabilities buffer, when hd is 64 or 128 and T is at least about 1.5 hd (else the fp32
 * kernels). The same threading rules as gpu_backend_f32; a step before bf16 activations
 * (docs/gpu.md). */
extern const model_backend_f32_t gpu_backend_f32_bf16mm;

/* Its two linear ops (gpu/linear_bf16.cu), cpu/ops.h's contracts up to the bf16 rounding. */
void gpu_linear_bf16_fwd(float *out, const float *x, const float *w, int N, int IN, int OUT);
void gpu_linear_bf16_bwd(float *dx, float *dw, const float *dout, const float *x,
                         const float *w, int N, int IN, int OUT);

/* Its attention ops (gpu/attention_flash.cu): cpu/ops.h's contract up to the bf16 rounding,
 * except that probs holds the flash kernels' state, not the probabilities. */
void gpu_attention_flash_fwd(float *out, float *probs, const float *q, const float *k,
                             const float *v, int B, int T, int H, int KVH, int hd);
void gpu_attention_flash_bwd(float *dq, float *dk, float *dv, const float *dout, const float *q,
                             const float *k, const float *v, const float *probs, int B, int T,
                             int H, int KVH, int hd);

/* For benchmarks, on the calling thread's device and stream (gpu/linear_bf16.cu):
 * gpu_backend_sync waits until every op the thread enqueued there has finished (the table's
 * ops return before the device is done). gpu_gemm_peak_tflops: the best rate of a square n^3
 * cuBLAS GEMM (bf16_inputs: bf16 A, B and C, else fp32 throughout without TF32; fp32
 * compute), timed with CUDA events over `iters` calls, best of three rounds after a warm-up
 * round; allocates and frees 3 n^2 elements. */
void gpu_backend_sync(void);
double gpu_gemm_peak_tflops(int n, int bf16_inputs, int iters);

/* Makes device the calling thread's current device and creates its context and stream (the
 * cuBLAS handle follows on the first GEMM). SEMOE_EINVAL when this host has no CUDA device or
 * device is out of range (the message says how many there are), SEMOE_ECUDA when the runtime
 * fails. Call it on every thread that uses gpu_backend_f32 or gpu_backend_f32_bf16mm. */
semoe_rc gpu_backend_init(int device);

#ifdef __cplusplus
}
#endif

#endif
