/* Loads and stores of VEC (8: one 16-byte vector, or 1) elements as fp32 in registers, for
 * the .cu files' bf16 kernels (bf16 = __nv_bfloat16). C++ only. */
#ifndef SEMOE_GPU_BF16_CUH
#define SEMOE_GPU_BF16_CUH

#include <cuda_bf16.h>

#define GPU_VEC 8 /* bf16 per 16-byte vector */

/* bf16 -> fp32 is exact (the bits shifted up), the value __bfloat162float gives; p 16-byte
 * aligned when VEC is 8. */
template <int VEC> __device__ __forceinline__ void gpu_ld(float v[VEC], const __nv_bfloat16 *p)
{
    static_assert(VEC == 1 || VEC == GPU_VEC, "8 or 1 elements");
    if constexpr (VEC == GPU_VEC) {
        uint4 u = *(const uint4 *)p;
        unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) { /* little-endian: element 2i is the low half */
            v[2 * i] = __uint_as_float(w[i] << 16);
            v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    } else {
        v[0] = __bfloat162float(p[0]);
    }
}

template <int VEC> __device__ __forceinline__ void gpu_ld(float v[VEC], const float *p)
{
    if constexpr (VEC == GPU_VEC) {
        float4 a = ((const float4 *)p)[0], b = ((const float4 *)p)[1];
        v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
        v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
    } else {
        v[0] = p[0];
    }
}

__device__ __forceinline__ unsigned gpu_bf16_bits(float v)
{
    return (unsigned)__bfloat16_as_ushort(__float2bfloat16_rn(v));
}

/* Rounds to bf16, to nearest even. */
template <int VEC> __device__ __forceinline__ void gpu_st(__nv_bfloat16 *p, const float v[VEC])
{
    if constexpr (VEC == GPU_VEC) {
        unsigned w[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = gpu_bf16_bits(v[2 * i]) | gpu_bf16_bits(v[2 * i + 1]) << 16;
        *(uint4 *)p = make_uint4(w[0], w[1], w[2], w[3]);
    } else {
        p[0] = __float2bfloat16_rn(v[0]);
    }
}

template <int VEC> __device__ __forceinline__ void gpu_st(float *p, const float v[VEC])
{
    if constexpr (VEC == GPU_VEC) {
        ((float4 *)p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        ((float4 *)p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        p[0] = v[0];
    }
}

/* The bits as they are (no trip through fp32: NaN payloads kept). */
template <int VEC>
__device__ __forceinline__ void gpu_copy_bits(__nv_bfloat16 *dst, const __nv_bfloat16 *src)
{
    if constexpr (VEC == GPU_VEC)
        *(uint4 *)dst = *(const uint4 *)src;
    else
        dst[0] = src[0];
}

#endif
