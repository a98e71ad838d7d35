/* The profiled backend (model/profile.h): every op of the table wrapped, results bit-identical
 * to the real backend's on fresh random inputs, each op's time in its category, the linear ops'
 * FLOPs counted exactly (a NULL gradient not counted), take zeroing the sums, and the sums
 * per thread. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "model/backend.h"
#include "model/profile.h"
#include "tests/harness.h"

static float *s_rand(size_t n)
{
    float *p = malloc(n * sizeof *p);
    for (size_t i = 0; i < n; i++)
        p[i] = (float)(test_rand_unit() * 2 - 1);
    return p;
}

/* Every op pointer of the profiled table is set, and none is the real backend's. */
static void s_check_table(const model_backend_f32_t *pb, const model_backend_f32_t *real)
{
    typedef void (*fn_t)(void);
    size_t first = offsetof(model_backend_f32_t, alloc), n = (sizeof *pb - first) / sizeof(fn_t);
    for (size_t i = 0; i < n; i++) {
        fn_t a, b;
        memcpy(&a, (const char *)pb + first + i * sizeof(fn_t), sizeof a);
        memcpy(&b, (const char *)real + first + i * sizeof(fn_t), sizeof b);
        CHECK(a != NULL && a != b, "op %zu of the table is %s", i, a ? "the real one" : "NULL");
    }
}

static void *s_other_thread(void *arg)
{
    const model_backend_f32_t *pb = arg;
    float *y = s_rand(1000), *x = s_rand(1000);
    pb->axpy(y, 0.5f, x, 1000);
    model_profile_t p;
    model_profile_take(&p);
    CHECK(p.calls == 1 && p.seconds[MODEL_PROF_ELEMENTWISE] > 0,
          "another thread's take: %llu calls, elementwise %g s", (unsigned long long)p.calls,
          p.seconds[MODEL_PROF_ELEMENTWISE]);
    free(y);
    free(x);
    return NULL;
}

int main(void)
{
    test_init("profile");
    const model_backend_f32_t *real = &cpu_backend_f32;
    const model_backend_f32_t *pb = model_profile_wrap(real);
    REQUIRE(pb && pb != real, "no profiled table");
    CHECK(model_profile_wrap(real) == pb, "wrapping the same backend again gives another table");
    CHECK(strcmp(pb->name, "cpu-profiled") == 0, "name %s", pb->name);
    s_check_table(pb, real);
    model_profile_take(NULL);

    int N = 37 + (int)test_rand_below(64), IN = 16 + (int)test_rand_below(48),
        OUT = 8 + (int)test_rand_below(40);
    float *x = s_rand((size_t)N * IN), *w = s_rand((size_t)OUT * IN),
          *dout = s_rand((size_t)N * OUT);
    size_t no = (size_t)N * OUT, ni = (size_t)N * IN;
    float *o1 = calloc(no, sizeof(float)), *o2 = calloc(no, sizeof(float));
    float *dx1 = calloc(ni, sizeof(float)), *dx2 = calloc(ni, sizeof(float));
    real->linear_fwd(o1, x, w, N, IN, OUT);
    real->linear_bwd(dx1, NULL, dout, x, w, N, IN, OUT);
    model_profile_t p;
    model_profile_take(&p);
    CHECK(p.calls == 0 && p.gemm_flops == 0, "the real backend's calls were counted");

    pb->linear_fwd(o2, x, w, N, IN, OUT);
    pb->linear_bwd(dx2, NULL, dout, x, w, N, IN, OUT);
    CHECK(memcmp(o1, o2, no * sizeof(float)) == 0, "linear_fwd differs through "
          "the profiled table");
    CHECK(memcmp(dx1, dx2, ni * sizeof(float)) == 0, "linear_bwd differs through "
          "the profiled table");
    model_profile_take(&p);
    double want = 4.0 * N * IN * OUT; /* forward, and the input gradient only */
    CHECK(p.gemm_flops == want, "gemm_flops %.0f, want %.0f (N %d, IN %d, OUT %d)", p.gemm_flops,
          want, N, IN, OUT);
    CHECK(p.calls == 2 && p.seconds[MODEL_PROF_GEMM] > 0, "%llu calls, gemm %g s",
          (unsigned long long)p.calls, p.seconds[MODEL_PROF_GEMM]);
    for (int k = 0; k < MODEL_PROF_N; k++)
        CHECK(k == MODEL_PROF_GEMM || p.seconds[k] == 0, "%s has %g s after two linear ops",
              model_profile_category(k), p.seconds[k]);
    CHECK(model_profile_total(&p) == p.seconds[MODEL_PROF_GEMM], "total %g",
          model_profile_total(&p));

    size_t n = 1000 + test_rand_below(1000);
    float *g = s_rand(n), *pm = s_rand(n);
    float *m = calloc(n, sizeof(float)), *v = calloc(n, sizeof(float));
    double s1 = real->sumsq(g, n), s2 = pb->sumsq(g, n);
    CHECK(s1 == s2, "sumsq %.17g through the profiled table, %.17g without", s2, s1);
    pb->adamw(pm, g, m, v, n, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1, 1.0);
    void *buf = pb->alloc(4096);
    pb->zero(buf, 4096);
    pb->free(buf);
    model_profile_take(&p);
    CHECK(p.seconds[MODEL_PROF_OPTIMIZER] > 0 && p.seconds[MODEL_PROF_MEMORY] > 0 &&
              p.calls == 5 && p.gemm_flops == 0,
          "optimizer %g s, memory %g s, %llu calls", p.seconds[MODEL_PROF_OPTIMIZER],
          p.seconds[MODEL_PROF_MEMORY], (unsigned long long)p.calls);
    model_profile_take(&p);
    CHECK(p.calls == 0 && model_profile_total(&p) == 0, "take did not zero the sums");

    pthread_t th;
    REQUIRE(pthread_create(&th, NULL, s_other_thread, (void *)pb) == 0, "pthread_create");
    pthread_join(th, NULL);
    model_profile_take(&p);
    CHECK(p.calls == 0, "another thread's %llu calls showed up here", (unsigned long long)p.calls);
    CHECK(strcmp(model_profile_category(MODEL_PROF_GEMM), "gemm") == 0 &&
              strcmp(model_profile_category(MODEL_PROF_N), "?") == 0, "category names");

    free(x), free(w), free(dout), free(o1), free(o2), free(dx1), free(dx2);
    free(g), free(pm), free(m), free(v);
    return test_finish();
}
