/* The CPU ops, compiled twice from cpu/ops_impl.h: once for float (what runs), once for
 * double (what the gradient tests use). The template expects T (the element type), SUFFIX
 * (the name suffix), GEMM (cblas_sgemm or cblas_dgemm) and MF(f) (the math function for T:
 * expf or exp). */
#include "cpu/ops.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"

#define CPU_CAT_(a, b) a##_##b
#define CPU_CAT(a, b) CPU_CAT_(a, b)
#define FN(name) CPU_CAT(name, SUFFIX)

#define T float
#define SUFFIX f32
#define GEMM cblas_sgemm
#define MF(fn) fn##f
#include "cpu/ops_impl.h"
#undef T
#undef SUFFIX
#undef GEMM
#undef MF

#define T double
#define SUFFIX f64
#define GEMM cblas_dgemm
#define MF(fn) fn
#include "cpu/ops_impl.h"
#undef T
#undef SUFFIX
#undef GEMM
#undef MF

double cpu_clip_scale(double sumsq, double max_norm)
{
    if (max_norm <= 0)
        return 1.0;
    double scale = max_norm / (sqrt(sumsq) + 1e-6);
    return scale < 1.0 ? scale : 1.0;
}
