/* The MoE layer's kernels (gpu/moe_layer.cu includes this, once): routing (softmax, top-k,
 * renormalised weights, and its backward), the counting sort into expert order and the
 * gather, SwiGLU and its backward on [a | b] rows, the weighted combine (optionally into an
 * fp32 residual) and its backward, and dx. C++ only; bf16 = __nv_bfloat16. */
#ifndef SEMOE_GPU_MOE_KERNELS_CUH
#define SEMOE_GPU_MOE_KERNELS_CUH

#include "gpu/bf16.cuh"
#include "gpu/reduce.cuh"

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#define S_MAX_E 256
#define S_MAX_K 16
#define S_SORT_BLOCK 256 /* flat (token, slot) entries per block of the counting sort */
#define S_VEC GPU_VEC    /* bf16 per 16-byte vector */

__device__ __forceinline__ float s_bf(float v) { return __bfloat162float(__float2bfloat16(v)); }

/* One warp per token: logits rounded to bf16 (the peer's bf16 matmul output) when round,
 * plus bias (or NULL), softmax in fp32, top-k with ties to the lower index, weights
 * renormalised and cast to bf16. */
__global__ void s_route_kernel(float *probs, int32_t *idx, bf16 *wts, const float *logits,
                               const float *bias, int round, int T, int E, int K)
{
    int t = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (t >= T)
        return; /* whole warps leave together: T is per warp */
    const int per = (E + 31) / 32;
    float pl[S_MAX_E / 32];
    float mx = -INFINITY;
    for (int i = 0; i < per; i++) {
        int e = lane + 32 * i;
        float l = 0.0f;
        if (e < E) {
            l = logits[(size_t)t * E + e];
            l = (round ? s_bf(l) : l) + (bias ? bias[e] : 0.0f);
        }
        pl[i] = e < E ? l : -INFINITY;
        mx = fmaxf(mx, pl[i]);
    }
    mx = gpu_warp_reduce(mx, gpu_op_max());
    float sum = 0.0f;
    for (int i = 0; i < per; i++) {
        int e = lane + 32 * i;
        pl[i] = e < E ? expf(pl[i] - mx) : 0.0f;
        sum += pl[i];
    }
    sum = gpu_warp_reduce(sum, gpu_op_sum());
    for (int i = 0; i < per; i++) {
        int e = lane + 32 * i;
        pl[i] = pl[i] / sum;
        if (e < E)
            probs[(size_t)t * E + e] = pl[i];
    }
    float topv[S_MAX_K];
    int topi[S_MAX_K];
    unsigned taken = 0; /* bit i: this lane's entry i is chosen */
    float tsum = 0.0f;
    for (int j = 0; j < K; j++) {
        float bv = -1.0f;
        int bi = 0x7fffffff;
        for (int i = 0; i < per; i++) {
            int e = lane + 32 * i;
            if (e < E && !(taken >> i & 1u) && pl[i] > bv) { /* i ascending: lower e wins ties */
                bv = pl[i];
                bi = e;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) {
                bv = ov;
                bi = oi;
            }
        }
        if ((bi & 31) == lane)
            taken |= 1u << (bi >> 5);
        topv[j] = bv;
        topi[j] = bi;
        tsum += bv;
    }
    if (lane == 0)
        for (int j = 0; j < K; j++) {
            idx[(size_t)t * K + j] = topi[j];
            wts[(size_t)t * K + j] = __float2bfloat16(topv[j] / tsum);
        }
}

/* Per block of S_SORT_BLOCK flat entries: how many go to each expert. */
__global__ void s_hist_kernel(int32_t *hist, const int32_t *idx, int M, int E)
{
    extern __shared__ int32_t cnt[];
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    int i = blockIdx.x * S_SORT_BLOCK + threadIdx.x;
    if (i < M)
        atomicAdd(&cnt[idx[i]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        hist[(size_t)blockIdx.x * E + e] = cnt[e];
}

/* One block: hist becomes each block's first row per expert (expert start + the earlier
 * blocks' counts); counts gets the totals. */
__global__ void s_scan_kernel(int32_t *hist, int32_t *counts, int nblk, int E)
{
    __shared__ int32_t start[S_MAX_E];
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        int run = 0;
        for (int b = 0; b < nblk; b++) {
            int c = hist[(size_t)b * E + e];
            hist[(size_t)b * E + e] = run;
            run += c;
        }
        counts[e] = run;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int run = 0;
        for (int e = 0; e < E; e++) {
            start[e] = run;
            run += counts[e];
        }
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        for (int b = 0; b < nblk; b++)
            hist[(size_t)b * E + e] += start[e];
}

/* Each flat entry i = t k + j gets its row: its block's first row for its expert plus the
 * entries of the same expert before it in the block (earlier warps, then earlier lanes), so
 * rows are in (token, slot) order within an expert; pos holds row0 + that row (a part's rows
 * start at row0), rowtok the entry's token (i / K, within the entries given). blockDim.x ==
 * S_SORT_BLOCK. */
__global__ void s_place_kernel(int32_t *pos, int32_t *rowtok, const int32_t *idx,
                               const int32_t *hist, int M, int E, int K, int row0)
{
    extern __shared__ int32_t wc[]; /* (S_SORT_BLOCK / 32, E) */
    const int nw = S_SORT_BLOCK / 32;
    for (int q = threadIdx.x; q < nw * E; q += blockDim.x)
        wc[q] = 0;
    __syncthreads();
    int i = blockIdx.x * S_SORT_BLOCK + threadIdx.x;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int e = i < M ? idx[i] : -1;
    unsigned same = __match_any_sync(0xffffffffu, e);
    int rank = __popc(same & ((1u << lane) - 1u));
    if (e >= 0 && rank == 0)
        wc[warp * E + e] = __popc(same);
    __syncthreads();
    if (e >= 0) {
        int r = hist[(size_t)blockIdx.x * E + e] + rank;
        for (int w = 0; w < warp; w++)
            r += wc[w * E + e];
        pos[i] = row0 + r;
        rowtok[r] = i / K;
    }
}

/* Rows between a part's own layout (grouped by expert: expert e's rows at coff[e] .. coff[e+1])
 * and the expert-major layout (that part's rows of e at moff[e] on): to_major scatters,
 * dst[moff[e] + i - coff[e]] = src[i]; else gathers, dst[i] = src[moff[e] + i - coff[e]]. A
 * block per row i of the part; tab is coff (E + 1) then moff (E); 16-byte vectors. */
/* Row i of a part in the expert-major layout (tab: coff (E + 1) then moff (E)). */
__device__ __forceinline__ size_t s_major_row(const int32_t *tab, int E, int i)
{
    const int32_t *coff = tab, *moff = tab + E + 1;
    int lo = 0, hi = E - 1; /* the last expert whose rows start at or before i: i's */
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (coff[mid] <= i)
            lo = mid;
        else
            hi = mid - 1;
    }
    return (size_t)moff[lo] + (size_t)(i - coff[lo]);
}

__global__ void s_regroup_kernel(bf16 *dst, const bf16 *src, const int32_t *tab, int E, int d,
                                 int to_major)
{
    int i = blockIdx.x;
    size_t major = s_major_row(tab, E, i);
    const uint4 *s = (const uint4 *)(src + (to_major ? (size_t)i : major) * d);
    uint4 *t = (uint4 *)(dst + (to_major ? major : (size_t)i) * d);
    for (int c = threadIdx.x; c < d / S_VEC; c += blockDim.x)
        t[c] = s[c];
}

/* h[r] = x[rowtok[r]]: a block per row, 16-byte vectors. */
__global__ void s_gather_kernel(bf16 *h, const bf16 *x, const int32_t *rowtok, int d)
{
    int r = blockIdx.x;
    const uint4 *src = (const uint4 *)(x + (size_t)rowtok[r] * d);
    uint4 *dst = (uint4 *)(h + (size_t)r * d);
    for (int c = threadIdx.x; c < d / S_VEC; c += blockDim.x)
        dst[c] = src[c];
}

/* g = silu(a) * b with the peer's roundings: silu(a) to bf16, then the product; a and b are the
 * halves of ab's rows (M, 2f). n8 vectors of 8 over g (M, f), f8 = f / 8 of them per row (f a
 * multiple of 8; the buffers are slab pointers, 256-byte aligned). */
/* Vector c (8 columns) of row r: g from [a | b]. */
__device__ __forceinline__ void s_swiglu_vec(bf16 *g, const bf16 *ab, size_t r, size_t c, int f8)
{
    const bf16 *a = ab + (r * 2 * f8 + c) * S_VEC, *b = a + (size_t)f8 * S_VEC;
    float av[S_VEC], bv[S_VEC], gv[S_VEC];
    gpu_ld<S_VEC>(av, a);
    gpu_ld<S_VEC>(bv, b);
#pragma unroll
    for (int q = 0; q < S_VEC; q++) {
        float s = s_bf(av[q] / (1.0f + expf(-av[q])));
        gv[q] = s * bv[q];
    }
    gpu_st<S_VEC>(g + (r * f8 + c) * S_VEC, gv);
}

__global__ void s_swiglu_kernel(bf16 *g, const bf16 *ab, size_t n8, int f8)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i < n8; i += (size_t)gridDim.x * blockDim.x)
        s_swiglu_vec(g, ab, i / f8, i % f8, f8);
}

/* [da | db] = [dg b silu'(a) | dg silu(a)]; silu'(a) = s (1 + a (1 - s)), s = sigmoid(a). n8
 * vectors of 8 over dg (M, f), as s_swiglu_kernel. */
__device__ __forceinline__ void s_swiglu_bwd_vec(bf16 *dab, const bf16 *dg, const bf16 *ab,
                                                 size_t r, size_t c, int f8)
{
    size_t o = (r * 2 * f8 + c) * S_VEC, ob = o + (size_t)f8 * S_VEC;
    float av[S_VEC], bv[S_VEC], gvv[S_VEC], dav[S_VEC], dbv[S_VEC];
    gpu_ld<S_VEC>(av, ab + o);
    gpu_ld<S_VEC>(bv, ab + ob);
    gpu_ld<S_VEC>(gvv, dg + (r * f8 + c) * S_VEC);
#pragma unroll
    for (int q = 0; q < S_VEC; q++) {
        float s = 1.0f / (1.0f + expf(-av[q]));
        float silu = s_bf(av[q] * s);
        float dsilu = s_bf(gvv[q] * bv[q]);
        dav[q] = dsilu * s * (1.0f + av[q] * (1.0f - s));
        dbv[q] = gvv[q] * silu;
    }
    gpu_st<S_VEC>(dab + o, dav);
    gpu_st<S_VEC>(dab + ob, dbv);
}

__global__ void s_swiglu_bwd_kernel(bf16 *dab, const bf16 *dg, const bf16 *ab, size_t n8,
                                    int f8)
{
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    for (; i < n8; i += (size_t)gridDim.x * blockDim.x)
        s_swiglu_bwd_vec(dab, dg, ab, i / f8, i % f8, f8);
}

/* SwiGLU and its backward on a part's rows where the expert-major layout has them (tab as
 * s_regroup_kernel's): a block per row of the part, one launch for all its experts. */
__global__ void s_swiglu_part_kernel(bf16 *g, const bf16 *ab, const int32_t *tab, int E, int f8)
{
    size_t r = s_major_row(tab, E, blockIdx.x);
    for (int c = threadIdx.x; c < f8; c += blockDim.x)
        s_swiglu_vec(g, ab, r, c, f8);
}

__global__ void s_swiglu_bwd_part_kernel(bf16 *dab, const bf16 *dg, const bf16 *ab,
                                         const int32_t *tab, int E, int f8)
{
    size_t r = s_major_row(tab, E, blockIdx.x);
    for (int c = threadIdx.x; c < f8; c += blockDim.x)
        s_swiglu_bwd_vec(dab, dg, ab, r, c, f8);
}

/* out[t] = sum_j bf16(w[t,j] y[pos[t,j]]), summed in fp32 in slot order, bf16 out; or, when
 * out32 is set, out32[t] = res32[t] + that sum in fp32 (res32 may be out32): a block per
 * token, 8 columns per thread (d a multiple of 8; rows 16-byte aligned). */
__global__ void s_combine_kernel(bf16 *out, float *out32, const float *res32, const bf16 *y,
                                 const int32_t *pos, const bf16 *wts, int d, int K)
{
    int t = blockIdx.x;
    for (int c = threadIdx.x * S_VEC; c < d; c += blockDim.x * S_VEC) {
        float acc[S_VEC] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = 0; j < K; j++) {
            size_t r = (size_t)pos[(size_t)t * K + j];
            float w = __bfloat162float(wts[(size_t)t * K + j]);
            float yv[S_VEC];
            gpu_ld<S_VEC>(yv, y + r * d + c);
#pragma unroll
            for (int q = 0; q < S_VEC; q++)
                acc[q] += s_bf(yv[q] * w);
        }
        if (out32) {
            float rv[S_VEC];
            gpu_ld<S_VEC>(rv, res32 + (size_t)t * d + c);
            float4 *o = (float4 *)(out32 + (size_t)t * d + c);
            o[0] = make_float4(rv[0] + acc[0], rv[1] + acc[1], rv[2] + acc[2], rv[3] + acc[3]);
            o[1] = make_float4(rv[4] + acc[4], rv[5] + acc[5], rv[6] + acc[6], rv[7] + acc[7]);
        } else {
            gpu_st<S_VEC>(out + (size_t)t * d + c, acc);
        }
    }
}

/* Backward of the combine, a block per token: dy[pos[t,j]] = dout[t] w[t,j] and
 * dwt[t,j] = <dout[t], y[pos[t,j]]> in fp32; 8 columns per thread; dout bf16 or fp32. */
template <typename DT>
__global__ void s_combine_bwd_kernel(bf16 *dy, float *dwt, const DT *dout, const bf16 *y,
                                     const int32_t *pos, const bf16 *wts, int d, int K)
{
    int t = blockIdx.x;
    for (int j = 0; j < K; j++) {
        size_t r = (size_t)pos[(size_t)t * K + j];
        float w = __bfloat162float(wts[(size_t)t * K + j]);
        float dot = 0.0f;
        for (int c = threadIdx.x * S_VEC; c < d; c += blockDim.x * S_VEC) {
            float o[S_VEC], yv[S_VEC], dv[S_VEC];
            gpu_ld<S_VEC>(o, dout + (size_t)t * d + c);
            gpu_ld<S_VEC>(yv, y + r * d + c);
#pragma unroll
            for (int q = 0; q < S_VEC; q++) {
                dot += o[q] * yv[q];
                dv[q] = o[q] * w;
            }
            gpu_st<S_VEC>(dy + r * d + c, dv);
        }
        dot = gpu_block_sum(dot);
        if (threadIdx.x == 0)
            dwt[(size_t)t * K + j] = dot;
    }
}

/* One warp per token: d loss / d logits from d loss / d w through w = v / sum(v) (v the top-k
 * probabilities), plus daux[e] (or NULL) on every p[e], and the softmax; bf16 out (the peer's
 * logits are bf16). */
__global__ void s_route_bwd_kernel(bf16 *dlog, const float *dwt, const float *probs,
                                   const int32_t *idx, const float *daux, int T, int E, int K)
{
    int t = (int)((blockIdx.x * (size_t)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (t >= T)
        return;
    const float *p = probs + (size_t)t * E;
    const int32_t *ix = idx + (size_t)t * K;
    const float *dw = dwt + (size_t)t * K;
    float s = 0.0f;
    for (int j = 0; j < K; j++)
        s += p[ix[j]];
    float dws = 0.0f; /* sum_i dw_i w_i */
    for (int j = 0; j < K; j++)
        dws += dw[j] * (p[ix[j]] / s);
    float dpp = 0.0f; /* sum_e dp_e p_e = sum_j dv_j v_j */
    for (int j = 0; j < K; j++)
        dpp += (dw[j] - dws) / s * p[ix[j]];
    if (daux) { /* + sum_e daux_e p_e over the whole row */
        float part = 0.0f;
        for (int e = lane; e < E; e += 32)
            part += daux[e] * p[e];
        dpp += gpu_warp_reduce(part, gpu_op_sum());
    }
    for (int e = lane; e < E; e += 32) {
        float dp = daux ? daux[e] : 0.0f;
        for (int j = 0; j < K; j++)
            if (ix[j] == e)
                dp += (dw[j] - dws) / s;
        dlog[(size_t)t * E + e] = __float2bfloat16(p[e] * (dp - dpp));
    }
}

/* dx[t] = dxr[t] + sum_j dh[pos[t,j]]: a block per token, 8 columns per thread (dxr rows are
 * 32-byte aligned: d a multiple of 8, the slab 256-byte aligned). */
__global__ void s_dx_kernel(bf16 *dx, const float *dxr, const bf16 *dh, const int32_t *pos,
                            int d, int K)
{
    int t = blockIdx.x;
    for (int c = threadIdx.x * S_VEC; c < d; c += blockDim.x * S_VEC) {
        const float4 *xr = (const float4 *)(dxr + (size_t)t * d + c);
        float4 lo = xr[0], hi = xr[1];
        float acc[S_VEC] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
        for (int j = 0; j < K; j++) {
            size_t r = (size_t)pos[(size_t)t * K + j];
            float v[S_VEC];
            gpu_ld<S_VEC>(v, dh + r * d + c);
#pragma unroll
            for (int q = 0; q < S_VEC; q++)
                acc[q] += v[q];
        }
        gpu_st<S_VEC>(dx + (size_t)t * d + c, acc);
    }
}

static unsigned s_grid(size_t n, int threads)
{
    size_t g = (n + threads - 1) / threads;
    return (unsigned)(g < 132 * 32 ? (g ? g : 1) : 132 * 32);
}

/* Threads of a block per row of d columns, 8 each: whole warps, at most 256. */
static int s_row_threads(int d)
{
    int w = (d / S_VEC + 31) / 32;
    return 32 * (w < 8 ? w : 8);
}

#endif
