/* The fp32 graph's attention through the bf16 flash kernels (gpu/flash_attn.h), for
 * gpu_backend_f32_bf16mm: q, k, v (and dout) are rounded to bf16, the flash kernels run, and
 * the results come back as fp32 (the output written, the gradients ACCUMULATED, as the table's
 * contract says). The table's probabilities buffer (B, H, T, T) is not needed for
 * probabilities: it holds what the backward needs instead (the forward's log-sum-exp, its bf16
 * output and the backward's workspace), so no memory is added. When that does not fit (T below
 * about 1.5 hd) or hd is not one the kernels have (64, 128), the fp32 kernels of
 * gpu/attention.cu run instead: forward and backward decide alike from (T, hd). */
#include "gpu/flash_attn.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cuda_bf16.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define S_THREADS 256
#define S_MAX_BLOCKS 4096

static unsigned s_grid(size_t n)
{
    size_t b = (n + S_THREADS - 1) / S_THREADS;
    return (unsigned)(b == 0 ? 1 : b < S_MAX_BLOCKS ? b : S_MAX_BLOCKS);
}

__global__ static void s_to_bf16(uint16_t *out, const float *x, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        __nv_bfloat16 h = __float2bfloat16_rn(x[i]);
        out[i] = *(const uint16_t *)&h;
    }
}

/* out = (or +=, accumulate) the bf16 values of h */
__global__ static void s_from_bf16(float *out, const uint16_t *h, size_t n, bool accumulate)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint16_t bits = h[i];
        float v = __bfloat162float(*(const __nv_bfloat16 *)&bits);
        out[i] = accumulate ? out[i] + v : v;
    }
}

static void s_round(uint16_t *out, const float *x, size_t n)
{
    s_to_bf16<<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(out, x, n);
    GPU_CHECK_LAUNCH();
}

static void s_widen(float *out, const uint16_t *h, size_t n, bool accumulate)
{
    s_from_bf16<<<s_grid(n), S_THREADS, 0, gpu_stream()>>>(out, h, n, accumulate);
    GPU_CHECK_LAUNCH();
}

/* Per-thread bf16 copies of the inputs and the gradients, grown on demand (growing waits for
 * the stream: an op in flight may still read the old buffer). */
typedef struct {
    uint16_t *buf[7];
    size_t cap[7];
} s_scratch_t;

static thread_local s_scratch_t s_scr;

static uint16_t *s_buf(int which, size_t n)
{
    if (s_scr.cap[which] < n) {
        cudaStreamSynchronize(gpu_stream());
        gpu_free(s_scr.buf[which]);
        size_t want = n + n / 8;
        s_scr.buf[which] = (uint16_t *)gpu_alloc(want * sizeof(uint16_t));
        s_scr.cap[which] = want;
    }
    return s_scr.buf[which];
}

/* Where the backward's state lives in the probabilities buffer: lse (B*H*T floats), then the
 * bf16 output, then the workspace, each at a 16-byte boundary. Whether it fits. */
typedef struct {
    size_t lse, out, ws; /* offsets in floats */
    size_t end;
} s_layout_t;

static size_t s_up4(size_t x) { return (x + 3) / 4 * 4; }

static bool s_flash(int B, int T, int H, int KVH, int hd, s_layout_t *l)
{
    if (hd != 64 && hd != 128)
        return false;
    size_t nq = (size_t)B * T * H * hd, nl = (size_t)B * H * T;
    l->lse = 0;
    l->out = s_up4(nl);
    l->ws = l->out + s_up4((nq + 1) / 2);
    l->end = l->ws + s_up4((gpu_flash_bwd_workspace(B, T, H, KVH, hd) + 3) / 4);
    return l->end <= (size_t)B * H * T * T;
}

extern "C" void gpu_attention_flash_fwd(float *out, float *probs, const float *q, const float *k,
                                        const float *v, int B, int T, int H, int KVH, int hd)
{
    s_layout_t l;
    if (!s_flash(B, T, H, KVH, hd, &l)) {
        gpu_attention_fwd(out, probs, q, k, v, B, T, H, KVH, hd);
        return;
    }
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * KVH * hd;
    uint16_t *q16 = s_buf(0, nq), *k16 = s_buf(1, nk), *v16 = s_buf(2, nk);
    s_round(q16, q, nq);
    s_round(k16, k, nk);
    s_round(v16, v, nk);
    uint16_t *o16 = (uint16_t *)(probs + l.out);
    gpu_flash_fwd(o16, probs + l.lse, q16, k16, v16, B, T, H, KVH, hd);
    s_widen(out, o16, nq, false);
}

extern "C" void gpu_attention_flash_bwd(float *dq, float *dk, float *dv, const float *dout,
                                        const float *q, const float *k, const float *v,
                                        const float *probs, int B, int T, int H, int KVH, int hd)
{
    s_layout_t l;
    if (!s_flash(B, T, H, KVH, hd, &l)) {
        gpu_attention_bwd(dq, dk, dv, dout, q, k, v, probs, B, T, H, KVH, hd);
        return;
    }
    size_t nq = (size_t)B * T * H * hd, nk = (size_t)B * T * KVH * hd;
    uint16_t *q16 = s_buf(0, nq), *k16 = s_buf(1, nk), *v16 = s_buf(2, nk);
    uint16_t *do16 = s_buf(3, nq), *dq16 = s_buf(4, nq), *dk16 = s_buf(5, nk);
    uint16_t *dv16 = s_buf(6, nk);
    s_round(q16, q, nq); /* as the forward rounded them */
    s_round(k16, k, nk);
    s_round(v16, v, nk);
    s_round(do16, dout, nq);
    /* the buffer is the graph's, const in the contract; its state is this op's own */
    float *state = (float *)probs;
    gpu_flash_bwd(dq16, dk16, dv16, do16, q16, k16, v16, (const uint16_t *)(state + l.out),
                  state + l.lse, B, T, H, KVH, hd, state + l.ws);
    s_widen(dq, dq16, nq, true);
    s_widen(dk, dk16, nk, true);
    s_widen(dv, dv16, nk, true);
}
