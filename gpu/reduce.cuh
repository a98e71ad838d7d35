/* Block-wide reductions shared by the gpu/ kernels (C++ only, included by .cu files): every
 * thread of the block must call them (no early return before), blockDim.x a multiple of 32
 * and at most 1024. Each call returns the result to every thread of the block. */
#ifndef SEMOE_GPU_REDUCE_CUH
#define SEMOE_GPU_REDUCE_CUH

#include <cuda_runtime.h>
#include <math.h>

struct gpu_op_sum {
    template <typename T> __device__ T operator()(T a, T b) const { return a + b; }
};
struct gpu_op_max {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

template <typename T, typename Op> __device__ T gpu_warp_reduce(T v, Op op)
{
    for (int o = 16; o > 0; o >>= 1)
        v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* identity: 0 for a sum, -INFINITY for a max. Safe to call several times in a row: the
 * first barrier keeps this call's writes from overtaking readers of the previous result. */
template <typename T, typename Op> __device__ T gpu_block_reduce(T v, Op op, T identity)
{
    __shared__ T warp_res[32];
    __shared__ T result;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = gpu_warp_reduce(v, op);
    __syncthreads();
    if (lane == 0)
        warp_res[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int nwarps = (int)(blockDim.x >> 5);
        v = lane < nwarps ? warp_res[lane] : identity;
        v = gpu_warp_reduce(v, op);
        if (lane == 0)
            result = v;
    }
    __syncthreads();
    return result;
}

template <typename T> __device__ T gpu_block_sum(T v)
{
    return gpu_block_reduce(v, gpu_op_sum(), (T)0);
}

__device__ inline float gpu_block_max(float v)
{
    return gpu_block_reduce(v, gpu_op_max(), -INFINITY);
}

#endif
