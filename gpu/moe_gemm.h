/* The expert GEMMs of gpu/moe_layer.h as one kernel of our own for Hopper (sm_90a): every
 * expert's product in one persistent launch, each CTA walking 128 x 256 output tiles of all
 * experts in turn, with TMA loads into a 4-stage shared-memory ring that one thread feeds and
 * two warpgroups of wgmma (bf16 in, fp32 accumulators) drain, and an epilogue that can fuse
 * the elementwise op around the GEMM:
 *   PLAIN:   C (n_e, N) = A_e (n_e, K) B_e^T: the layer's y = g W2^T (B_e (N, K) = W2[e]) and
 *            its dh = [da | db] W13[e] (B_e stored (K, N) = W13[e] (2f, d));
 *   SWIGLU:  [a | b] = A_e W13[e]^T (N = 2f, W13[e] (2f, K) as W1 over W3) into C (n_e, 2f)
 *            and G (n_e, f) = bf16(bf16(silu(a)) b) from the same registers;
 *   DSWIGLU: dg = A_e B_e with A = dy, B_e = W2[e] stored (K, N) = (d, f), N = f; dg (rounded to
 *            bf16) never stored: [da | db] (SwiGLU's backward, as s_swiglu_bwd_kernel) into
 *            C (n_e, 2f) from AB = [a | b] (n_e, 2f).
 * A's rows are the experts' in order (expert e's n_e rows after expert e-1's), C's, G's and
 * AB's the same; counts (E int32, device memory) gives n_e, so the launch needs nothing from
 * the host. Results equal cuBLAS's (fp32 accumulation, bf16 rounding) up to the order of the
 * sums and a few fp32 ulp in the fast exp of SwiGLU. For the .cu files only (CUDA types). */
#ifndef SEMOE_GPU_MOE_GEMM_H
#define SEMOE_GPU_MOE_GEMM_H

#ifdef __cplusplus
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

typedef enum { GPU_MOE_EPI_PLAIN, GPU_MOE_EPI_SWIGLU, GPU_MOE_EPI_DSWIGLU } gpu_moe_epi_t;

typedef struct {
    const __nv_bfloat16 *A; /* (mrows, K): the tensor's rows, of which sum(counts) are used */
    int mrows, K;
    const __nv_bfloat16 *B; /* E experts' (N, K) row-major, or (K, N) with b_kn */
    bool b_kn;
    int N, E;
    const int32_t *counts;   /* (E) device */
    gpu_moe_epi_t epi;       /* SWIGLU needs !b_kn, DSWIGLU b_kn */
    __nv_bfloat16 *C;        /* the output, as above */
    __nv_bfloat16 *G;        /* SWIGLU: g (mrows, N/2); else NULL */
    const __nv_bfloat16 *AB; /* DSWIGLU: [a | b] (mrows, 2N); else NULL */
} gpu_moe_gemm_args_t;

/* Whether this device and GEMM width and depth can take the kernel: compute capability 9.0, K
 * a multiple of 64 and N of 256 (N as in the args: 2f for SWIGLU, f for DSWIGLU), every row
 * 16-byte aligned. Cached per device. */
bool gpu_moe_gemm_ok(int N, int K);

/* The product g describes, enqueued on st. */
void gpu_moe_gemm(const gpu_moe_gemm_args_t *g, cudaStream_t st);
#endif

#endif
