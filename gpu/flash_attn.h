/* Causal grouped-query attention in bf16 with flash-style tiling (FlashAttention-2): memory
 * linear in T, no (B, H, T, T) probabilities; forward saves only the log-sum-exp per row.
 * cpu/ops.h's attention contract (query head h reads kv head h / (H/KVH), scale 1/sqrt(hd)).
 * Two implementations: mma.sync kernels (the default) and the first WMMA ones, kept for
 * comparison; SEMOE_FLASH=wmma in the environment at the first gpu_flash_fwd/bwd call selects
 * the latter for the whole process (read once), and gpu_flash_wmma_* call them directly. */
#ifndef SEMOE_GPU_FLASH_ATTN_H
#define SEMOE_GPU_FLASH_ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Pointers are device memory; bf16 tensors are uint16_t bit patterns, row-major, 16-byte
 * aligned (gpu_alloc's are). q, out (B, T, H, hd); k, v (B, T, KVH, hd); lse (B, H, T) fp32.
 * Needs hd 64 or 128, H a multiple of KVH, T >= 1: anything else is a broken invariant and
 * aborts with a message naming the value. Enqueued on gpu_stream(); returns at once. */

/* out = softmax(q k^T / sqrt(hd), causal) v, written (bf16, fp32 accumulation); lse[b,h,t] =
 * log sum_j exp(score[t, j]) in fp32, kept for gpu_flash_bwd. */
void gpu_flash_fwd(uint16_t *out, float *lse, const uint16_t *q, const uint16_t *k,
                   const uint16_t *v, int B, int T, int H, int KVH, int hd);

/* Bytes of the workspace gpu_flash_bwd (and gpu_flash_wmma_bwd) needs: fp32 dq accumulation
 * (B, T, H, hd) and D = rowsum(dout * out) (B, H, T). */
size_t gpu_flash_bwd_workspace(int B, int T, int H, int KVH, int hd);

/* The gradients of gpu_flash_fwd given dout (B, T, H, hd), from the forward's q, k, v, out and
 * lse: dq (B, T, H, hd), dk, dv (B, T, KVH, hd), all OVERWRITTEN (not accumulated), bf16.
 * dk, dv sum over the H/KVH query heads of their group inside one thread block (no atomics,
 * deterministic); dq is accumulated in fp32 with atomics in workspace (at least
 * gpu_flash_bwd_workspace bytes, device memory, contents on entry ignored) and then cast. */
void gpu_flash_bwd(uint16_t *dq, uint16_t *dk, uint16_t *dv, const uint16_t *dout,
                   const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *out,
                   const float *lse, int B, int T, int H, int KVH, int hd, float *workspace);

/* The WMMA kernels whatever SEMOE_FLASH says, with the contracts above (same lse, workspace):
 * for bench_flash and tests/test_gpu_flash.c to compare against; several times slower. */
void gpu_flash_wmma_fwd(uint16_t *out, float *lse, const uint16_t *q, const uint16_t *k,
                        const uint16_t *v, int B, int T, int H, int KVH, int hd);
void gpu_flash_wmma_bwd(uint16_t *dq, uint16_t *dk, uint16_t *dv, const uint16_t *dout,
                        const uint16_t *q, const uint16_t *k, const uint16_t *v,
                        const uint16_t *out, const float *lse, int B, int T, int H, int KVH,
                        int hd, float *workspace);

#ifdef __cplusplus
}
#endif

#endif
