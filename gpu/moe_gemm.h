/* The forward expert GEMMs of gpu/moe_layer.h as one kernel of our own for Hopper (sm_90a):
 * every expert's product in one persistent launch, each CTA walking output tiles of all
 * experts in turn, with TMA loads into a 4-stage shared-memory ring that one warp feeds and
 * two warpgroups of wgmma (bf16 in, fp32 accumulators) drain.
 *   plain:  C (n_e, N) = A_e (n_e, K) B_e^T for every expert e, B_e (N, K) row-major (nn.Linear
 *           layout): the layer's y = g W2^T;
 *   swiglu: [a | b] = A_e W13_e^T with W13_e (2f, K) as W1 over W3, written to C (n_e, 2f), and
 *           G (n_e, f) = bf16(bf16(silu(a)) b) from the same registers: the layer's first GEMM
 *           with the SwiGLU that would otherwise read [a | b] back from memory.
 * A's rows are the experts' in order (expert e's n_e rows after expert e-1's), C's and G's the
 * same; counts (E int32, device memory) gives n_e, so the launch needs nothing from the host.
 * Results equal cuBLAS's GEMM (fp32 accumulation, bf16 rounding) up to the order of the sums.
 * For the .cu files only (CUDA types). */
#ifndef SEMOE_GPU_MOE_GEMM_H
#define SEMOE_GPU_MOE_GEMM_H

#ifdef __cplusplus
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/* Whether this device and shape can take the kernel: compute capability 9.0, K a multiple of 64
 * and N of 256 (plain) or f = N/2 of 128 (swiglu), every row 16-byte aligned. Cached per
 * device. */
bool gpu_moe_gemm_ok(int N, int K, bool swiglu);

/* The products above for the M rows of A (M = sum of counts, at most mrows: the rows the
 * tensors have), enqueued on st. swiglu: N = 2f, G (M, f); plain: G unused (NULL). */
void gpu_moe_gemm(const __nv_bfloat16 *A, int mrows, int K, const __nv_bfloat16 *B, int N,
                  int E, const int32_t *counts, __nv_bfloat16 *C, __nv_bfloat16 *G, bool swiglu,
                  cudaStream_t st);
#endif

#endif
