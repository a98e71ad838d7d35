/* Helpers the gpu suite's tests share (tests/gpu_util.h): random host arrays, device copies up
 * and back, host bf16 rounding, the norm-wise relative error. */
#include "tests/gpu_util.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "gpu/ops.h"
#include "tests/harness.h"

float *test_rand_uniform(size_t n, double lo, double hi)
{
    float *x = semoe_xmalloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = (float)(lo + (hi - lo) * test_rand_unit());
    return x;
}

float *test_rand_floats(size_t n, double a)
{
    return test_rand_uniform(n, -a, a);
}

int32_t *test_rand_ints(size_t n, int below)
{
    int32_t *x = semoe_xmalloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++)
        x[i] = (int32_t)test_rand_below((uint64_t)below);
    return x;
}

float *test_dup_floats(const float *x, size_t n)
{
    float *y = semoe_xmalloc((n ? n : 1) * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    return y;
}

void *test_gpu_up(const void *x, size_t bytes)
{
    void *d = gpu_alloc(bytes);
    gpu_to_device(d, x, bytes);
    return d;
}

float *test_gpu_upf(const float *x, size_t n)
{
    return test_gpu_up(x, n * sizeof(float));
}

int32_t *test_gpu_upi(const int32_t *x, size_t n)
{
    return test_gpu_up(x, n * sizeof(int32_t));
}

float *test_gpu_downf(const float *d, size_t n)
{
    float *h = semoe_xmalloc((n ? n : 1) * sizeof *h);
    gpu_to_host(h, d, n * sizeof *h);
    return h;
}

uint16_t test_bf16_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) == 0x7f800000u) /* inf stays inf, NaN stays a (quiet) NaN */
        return (uint16_t)((u >> 16) | ((u & 0x7fffffu) ? 0x40u : 0u));
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

float test_bf16_value(uint16_t b)
{
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float test_bf16_round(float f)
{
    return test_bf16_value(test_bf16_bits(f));
}

double test_rel_err(const float *got, const float *want, size_t n, double floor)
{
    double dd = 0, ww = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        dd += d * d;
        ww += (double)want[i] * want[i];
    }
    double den = fmax(sqrt(ww), floor);
    return den > 0 ? sqrt(dd) / den : sqrt(dd);
}

float *test_rand_bf16(size_t n, double a)
{
    float *x = test_rand_floats(n, a);
    for (size_t i = 0; i < n; i++)
        x[i] = test_bf16_round(x[i]);
    return x;
}

uint16_t *test_gpu_upb(const float *x, size_t n)
{
    uint16_t *h = semoe_xmalloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = test_bf16_bits(x[i]);
    uint16_t *d = test_gpu_up(h, n * sizeof *h);
    free(h);
    return d;
}

uint16_t *test_gpu_garbage_bf16(size_t n)
{
    float *g = test_rand_floats(n, 100);
    uint16_t *d = test_gpu_upb(g, n);
    free(g);
    return d;
}

float *test_gpu_downb(const uint16_t *d, size_t n)
{
    uint16_t *b = semoe_xmalloc((n ? n : 1) * sizeof *b);
    gpu_to_host(b, d, n * sizeof *b);
    float *h = semoe_xmalloc((n ? n : 1) * sizeof *h);
    for (size_t i = 0; i < n; i++)
        h[i] = test_bf16_value(b[i]);
    free(b);
    return h;
}
