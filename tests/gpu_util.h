/* Helpers the gpu suite's tests share: fresh random host arrays from the harness's seed, device
 * copies up and back (gpu/ops.h), host bf16 rounding as the kernels round, and the norm-wise
 * relative error every GPU-against-CPU comparison reports. */
#ifndef SEMOE_TESTS_GPU_UTIL_H
#define SEMOE_TESTS_GPU_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* n floats uniform in [lo, hi), drawn in order from the test seed. Caller frees; never NULL
 * (room for one value when n is 0). */
float *test_rand_uniform(size_t n, double lo, double hi);
/* n floats uniform in [-a, a): test_rand_uniform(n, -a, a). */
float *test_rand_floats(size_t n, double a);
/* n int32s uniform in [0, below). Caller frees. */
int32_t *test_rand_ints(size_t n, int below);
/* A host copy of x (n floats). Caller frees. */
float *test_dup_floats(const float *x, size_t n);

/* A device copy (gpu_alloc, caller gpu_frees) of host x: bytes bytes, n floats, n int32s. */
void *test_gpu_up(const void *x, size_t bytes);
float *test_gpu_upf(const float *x, size_t n);
int32_t *test_gpu_upi(const int32_t *x, size_t n);
/* A host copy of device d (n floats); synchronises. Caller frees. */
float *test_gpu_downf(const float *d, size_t n);

/* f rounded to the nearest bf16 (ties to even), as __float2bfloat16_rn: the bit pattern. Inf
 * stays inf, a NaN stays a (quiet) NaN. */
uint16_t test_bf16_bits(float f);
/* The float a bf16 bit pattern stands for (exact). */
float test_bf16_value(uint16_t b);
/* f rounded to the nearest bf16, as a float: test_bf16_value(test_bf16_bits(f)). */
float test_bf16_round(float f);

/* n floats uniform in [-a, a), each rounded to bf16. Caller frees. */
float *test_rand_bf16(size_t n, double a);
/* A device bf16 copy (gpu_alloc) of host x, each value rounded to bf16 (exact when x holds
 * bf16 values already). */
uint16_t *test_gpu_upb(const float *x, size_t n);
/* n device bf16 values of garbage (up to +-100), for outputs that must be overwritten. */
uint16_t *test_gpu_garbage_bf16(size_t n);
/* A host float copy of device bf16 d (n values); synchronises. Caller frees. */
float *test_gpu_downb(const uint16_t *d, size_t n);

/* ||got - want|| / max(||want||, floor), 2-norms summed in double; with floor 0, the absolute
 * norm ||got - want|| when want is all zeros. A floor > 0 keeps a tensor that is zero up to
 * rounding from turning rounding into a large relative error. */
double test_rel_err(const float *got, const float *want, size_t n, double floor);

#endif
