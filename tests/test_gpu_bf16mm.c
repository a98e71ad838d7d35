/* gpu_backend_f32_bf16mm (bf16 tensor-core GEMMs under the fp32 graph) against the CPU reference:
 * linear forward and backward on inputs already representable in bf16 (then only the fp32
 * accumulation differs: 1e-5, scaled with the sums' length) and on plain fp32 inputs (against
 * the CPU on their bf16 roundings, as tight; on themselves, 1e-2), then 20 training steps of a
 * small Mixtral, loss by loss within 1e-2 of the CPU's (the first within 5e-4 of the CPU's with
 * the same bf16 roundings of the linear ops' inputs). Skipped (77) without a device. */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "model/backend.h"
#include "model/job.h"
#include "model/params.h"
#include "model/train.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"
#include "tests/tiny_model.h"

#define S_TOL_EXACT 1e-5 /* bf16-representable inputs, sums of <= 64 terms */
#define S_TOL_ROUND 1e-2 /* fp32 inputs rounded to bf16 (2^-9 relative each) */
#define S_TOL_LOSS 1e-2  /* training losses against fp32, relative */
#define S_TOL_EMU 5e-4   /* the first loss against the CPU with the same bf16 roundings */

static const model_backend_f32_t *const s_cpu = &cpu_backend_f32;
static const model_backend_f32_t *const s_gpu = &gpu_backend_f32_bf16mm;

/* ---- helpers ------------------------------------------------------------------------- */

/* f rounded to the nearest bf16 (ties to even), as __float2bfloat16_rn; inf and NaN kept. */
static float s_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7f800000u) != 0x7f800000u) {
        u += 0x7fffu + ((u >> 16) & 1u);
        u &= 0xffff0000u;
    }
    memcpy(&f, &u, sizeof f);
    return f;
}

/* n uniform values in (-a, a), rounded to bf16 when round is set; malloc'ed. */
static float *s_rand(size_t n, double a, bool round)
{
    float *x = malloc((n ? n : 1) * sizeof *x);
    for (size_t i = 0; i < n; i++) {
        x[i] = (float)(a * (2.0 * test_rand_unit() - 1.0));
        if (round)
            x[i] = s_bf16(x[i]);
    }
    return x;
}

static float *s_dup(const float *x, size_t n)
{
    float *y = malloc((n ? n : 1) * sizeof *y);
    memcpy(y, x, n * sizeof *y);
    return y;
}

static float *s_up(const float *x, size_t n)
{
    float *d = s_gpu->alloc(n * sizeof(float));
    s_gpu->to_device(d, x, n * sizeof(float));
    return d;
}

/* Downloads device got (n floats) and checks it against host want within tol. For an
 * accumulated result init is what the buffer held before (else NULL): the error is relative to
 * the larger of the result and the increment (an increment may cancel its start value). */
static double s_cmp(const char *what, const float *got_dev, const float *want,
                    const float *init, size_t n, double tol)
{
    float *got = malloc((n ? n : 1) * sizeof *got);
    s_gpu->to_host(got, got_dev, n * sizeof *got);
    double floor = 1e-30;
    if (init) {
        double inc = 0;
        for (size_t i = 0; i < n; i++)
            inc += ((double)want[i] - init[i]) * ((double)want[i] - init[i]);
        floor = fmax(floor, sqrt(inc));
    }
    double rel = test_rel_err(got, want, n, floor);
    bool finite = true;
    for (size_t i = 0; i < n; i++)
        finite = finite && isfinite(got[i]);
    CHECK(finite && rel < tol, "%s: bf16mm vs CPU rel %.3g, tolerance %.0e (n %zu%s)", what,
          rel, tol, n, finite ? "" : ", not finite");
    free(got);
    return rel;
}

/* ---- (a) linear --------------------------------------------------------------------------- */

/* The tolerance against the CPU on the same bf16 values: only the order and rounding of the
 * fp32 accumulation differ, and tensor cores accumulate with truncation (round toward zero),
 * whose error grows with the length k of the sums; still far below bf16 rounding (~2e-3). */
static double s_tol_exact(int k)
{
    return S_TOL_EXACT * fmax(1.0, k / 64.0);
}

/* What the CPU computes for one case: the forward, both gradients together from (dx0, dw0),
 * then each alone from the same start. */
typedef struct {
    float *out, *dx, *dw, *dx1, *dw1;
} s_ref_t;

static void s_ref(s_ref_t *r, const float *x, const float *w, const float *dout,
                  const float *dx0, const float *dw0, int N, int IN, int OUT)
{
    size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, no = (size_t)N * OUT;
    r->out = calloc(no ? no : 1, sizeof(float));
    r->dx = s_dup(dx0, nx);
    r->dw = s_dup(dw0, nw);
    r->dx1 = s_dup(dx0, nx);
    r->dw1 = s_dup(dw0, nw);
    s_cpu->linear_fwd(r->out, x, w, N, IN, OUT);
    s_cpu->linear_bwd(r->dx, r->dw, dout, x, w, N, IN, OUT);
    s_cpu->linear_bwd(r->dx1, NULL, dout, x, w, N, IN, OUT);
    s_cpu->linear_bwd(NULL, r->dw1, dout, x, w, N, IN, OUT);
}

static void s_ref_free(s_ref_t *r)
{
    free(r->out);
    free(r->dx);
    free(r->dw);
    free(r->dx1);
    free(r->dw1);
}

static float *s_rounded(const float *x, size_t n)
{
    float *y = s_dup(x, n);
    for (size_t i = 0; i < n; i++)
        y[i] = s_bf16(y[i]);
    return y;
}

/* Forward and backward (both gradients, then each alone) of one (N, IN, OUT) on fresh inputs,
 * drawn as bf16 values (round) or as plain fp32; backward outputs pre-filled (fp32) to check
 * accumulation. Always against the CPU on the bf16-rounded inputs (the same products: tight);
 * for fp32 inputs also against the CPU on the inputs themselves (bf16's rounding: 1e-2). */
static void s_check_linear(int N, int IN, int OUT, bool round)
{
    size_t nx = (size_t)N * IN, nw = (size_t)OUT * IN, no = (size_t)N * OUT;
    float *x = s_rand(nx, 1.0, round), *w = s_rand(nw, 0.5, round);
    float *dout = s_rand(no, 1.0, round);
    float *dx0 = s_rand(nx, 0.3, false), *dw0 = s_rand(nw, 0.3, false);
    float *xr = s_rounded(x, nx), *wr = s_rounded(w, nw), *doutr = s_rounded(dout, no);
    s_ref_t ref[2];
    s_ref(&ref[0], xr, wr, doutr, dx0, dw0, N, IN, OUT);
    if (!round)
        s_ref(&ref[1], x, w, dout, dx0, dw0, N, IN, OUT);

    float *gx = s_up(x, nx), *gw = s_up(w, nw), *gdout = s_up(dout, no);
    float *gout = s_gpu->alloc((no ? no : 1) * sizeof(float));
    float *gdx = s_up(dx0, nx), *gdw = s_up(dw0, nw);
    float *gdx1 = s_up(dx0, nx), *gdw1 = s_up(dw0, nw);
    s_gpu->linear_fwd(gout, gx, gw, N, IN, OUT);
    s_gpu->linear_bwd(gdx, gdw, gdout, gx, gw, N, IN, OUT);
    s_gpu->linear_bwd(gdx1, NULL, gdout, gx, gw, N, IN, OUT);
    s_gpu->linear_bwd(NULL, gdw1, gdout, gx, gw, N, IN, OUT);

    double worst[2] = {0, 0};
    for (int k = 0; k < (round ? 1 : 2); k++) {
        const s_ref_t *r = &ref[k];
        const char *kind = k == 0 ? (round ? "bf16 inputs" : "fp32 inputs vs CPU on their bf16")
                                  : "fp32 inputs vs CPU on fp32";
        double tf = k ? S_TOL_ROUND : s_tol_exact(IN), tdx = k ? S_TOL_ROUND : s_tol_exact(OUT);
        double tdw = k ? S_TOL_ROUND : s_tol_exact(N);
        char what[160];
        double e;
        snprintf(what, sizeof what, "linear fwd N=%d IN=%d OUT=%d (%s)", N, IN, OUT, kind);
        e = s_cmp(what, gout, r->out, NULL, no, tf);
        worst[k] = fmax(worst[k], e);
        snprintf(what, sizeof what, "linear bwd dx N=%d IN=%d OUT=%d (%s)", N, IN, OUT, kind);
        e = s_cmp(what, gdx, r->dx, dx0, nx, tdx);
        worst[k] = fmax(worst[k], e);
        snprintf(what, sizeof what, "linear bwd dw N=%d IN=%d OUT=%d (%s)", N, IN, OUT, kind);
        e = s_cmp(what, gdw, r->dw, dw0, nw, tdw);
        worst[k] = fmax(worst[k], e);
        snprintf(what, sizeof what, "linear bwd dx only N=%d IN=%d OUT=%d (%s)", N, IN, OUT,
                 kind);
        e = s_cmp(what, gdx1, r->dx1, dx0, nx, tdx);
        worst[k] = fmax(worst[k], e);
        snprintf(what, sizeof what, "linear bwd dw only N=%d IN=%d OUT=%d (%s)", N, IN, OUT,
                 kind);
        e = s_cmp(what, gdw1, r->dw1, dw0, nw, tdw);
        worst[k] = fmax(worst[k], e);
    }
    if (round)
        printf("linear N=%-5d IN=%-5d OUT=%-5d bf16 inputs: worst rel %.2e (tol fwd %.1e)\n", N,
               IN, OUT, worst[0], s_tol_exact(IN));
    else
        printf("linear N=%-5d IN=%-5d OUT=%-5d fp32 inputs: worst rel %.2e against the CPU on "
               "their bf16 roundings, %.2e against the CPU on fp32\n", N, IN, OUT, worst[0],
               worst[1]);

    s_ref_free(&ref[0]);
    if (!round)
        s_ref_free(&ref[1]);
    float *dev[] = {gx, gw, gdout, gout, gdx, gdw, gdx1, gdw1};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        s_gpu->free(dev[i]);
    float *host[] = {x, w, dout, dx0, dw0, xr, wr, doutr};
    for (size_t i = 0; i < sizeof host / sizeof host[0]; i++)
        free(host[i]);
}

/* ---- (b) the trainer ---------------------------------------------------------------------- */

/* cpu_backend_f32 with the linear ops' inputs rounded to bf16 on the host first: the CPU's model
 * of gpu_backend_f32_bf16mm (the same products; only the fp32 accumulation differs). */
static model_backend_f32_t s_emu;

static void s_emu_linear_fwd(float *out, const float *x, const float *w, int N, int IN, int OUT)
{
    float *xr = s_rounded(x, (size_t)N * IN), *wr = s_rounded(w, (size_t)OUT * IN);
    cpu_backend_f32.linear_fwd(out, xr, wr, N, IN, OUT);
    free(xr);
    free(wr);
}

static void s_emu_linear_bwd(float *dx, float *dw, const float *dout, const float *x,
                             const float *w, int N, int IN, int OUT)
{
    float *xr = s_rounded(x, (size_t)N * IN), *wr = s_rounded(w, (size_t)OUT * IN);
    float *dr = s_rounded(dout, (size_t)N * OUT);
    cpu_backend_f32.linear_bwd(dx, dw, dr, xr, wr, N, IN, OUT);
    free(xr);
    free(wr);
    free(dr);
}

/* 20 AdamW steps (2 micro-batches each, warmup and cosine, clipping, weight decay) on the CPU,
 * the CPU with bf16-rounded GEMM inputs and bf16mm, from the same weights on one batch: every
 * step's loss within S_TOL_LOSS of the CPU's (lr 1e-3: at 3e-3 the paths drift apart by up to
 * 1.2e-2 over 20 steps on some seeds), and the loss falls. The first step's loss (same weights
 * everywhere) within S_TOL_EMU of the emulation's: only the accumulation differs there, but a
 * last-bit difference can flip a bf16 rounding and, rarely, a top-k choice (5e-5 seen on the
 * CPU with 3e-6 noise on every product). Later steps drift from the emulation as much as from
 * the CPU: training amplifies those flips. */
static void s_check_training(void)
{
    model_job_t job;
    test_tiny_train20(&job, 16, 1e-3);
    test_gpu_config(&job.model, 0); /* test_gpu_model.c's config 0 */
    const int steps = 20;
    int V = (int)job.model.vocab_size, rows = (int)job.train.global_batch;
    size_t row_len = job.train.seq_len + 1;

    model_params_t *p = test_tiny_params(&job.model, test_rand(), 0.1);
    model_train_t *tc = NULL, *te = NULL, *tg = NULL;
    uint8_t *tok = malloc((size_t)rows * row_len);
    s_emu = cpu_backend_f32;
    s_emu.name = "cpu-bf16-emulated";
    s_emu.linear_fwd = s_emu_linear_fwd;
    s_emu.linear_bwd = s_emu_linear_bwd;
    if (!p || model_train_new(s_cpu, p, &job, &tc) != SEMOE_OK ||
        model_train_new(&s_emu, p, &job, &te) != SEMOE_OK ||
        model_train_new(s_gpu, p, &job, &tg) != SEMOE_OK) {
        CHECK(0, "trainers: %s", semoe_err_msg());
        goto done;
    }
    for (size_t i = 0; i < (size_t)rows * row_len; i++)
        tok[i] = (uint8_t)test_rand_below((uint64_t)V);
    double worst = 0, worst_emu = 0, first_c = 0, first_g = 0, last_c = 0, last_g = 0;
    for (int s = 0; s < steps; s++) {
        model_train_report_t rc, re, rg;
        if (model_train_step(tc, tok, (uint32_t)rows, (uint64_t)s, NULL, &rc) != SEMOE_OK ||
            model_train_step(te, tok, (uint32_t)rows, (uint64_t)s, NULL, &re) != SEMOE_OK ||
            model_train_step(tg, tok, (uint32_t)rows, (uint64_t)s, NULL, &rg) != SEMOE_OK) {
            CHECK(0, "step %d: %s", s, semoe_err_msg());
            goto done;
        }
        double rel = fabs(rg.loss - rc.loss) / fabs(rc.loss);
        double erel = fabs(rg.loss - re.loss) / fabs(re.loss);
        worst = fmax(worst, rel);
        worst_emu = fmax(worst_emu, erel);
        if (s == 0) {
            first_c = rc.loss;
            first_g = rg.loss;
        }
        last_c = rc.loss;
        last_g = rg.loss;
        printf("step %2d: loss %.6f (CPU) %.6f (CPU, bf16 GEMM inputs) %.6f (bf16mm) rel %.2e, "
               "%.2e; grad norm %.5f %.5f %.5f\n", s, rc.loss, re.loss, rg.loss, rel, erel,
               rc.grad_norm, re.grad_norm, rg.grad_norm);
        CHECK(isfinite(rg.loss) && rel < S_TOL_LOSS,
              "step %d: loss %.9g (bf16mm) vs %.9g (CPU): rel %.3g", s, rg.loss, rc.loss, rel);
        if (s == 0)
            CHECK(erel < S_TOL_EMU,
                  "step 0: loss %.9g (bf16mm) vs %.9g (CPU with bf16 GEMM inputs): rel %.3g",
                  rg.loss, re.loss, erel);
    }
    CHECK(last_c < first_c && last_g < first_g, "loss did not fall: CPU %.4f -> %.4f, bf16mm "
          "%.4f -> %.4f", first_c, last_c, first_g, last_g);
    printf("training: %d steps, worst loss rel %.2e against the CPU (tolerance %.0e), %.2e "
           "against the CPU with bf16 GEMM inputs (step 0 within %.0e)\n", steps, worst,
           S_TOL_LOSS, worst_emu, S_TOL_EMU);
done:
    model_train_destroy(&tg);
    model_train_destroy(&te);
    model_train_destroy(&tc);
    model_params_destroy(&p);
    free(tok);
}

int main(void)
{
    test_init("gpu_bf16mm");
    if (gpu_device_count() == 0) {
        printf("no CUDA device (%s): skipped\n", semoe_err_msg());
        return 77;
    }
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init: %s", semoe_err_msg());
    CHECK(strcmp(s_gpu->name, "cuda-bf16mm") == 0, "name %s", s_gpu->name);
    CHECK(s_gpu->linear_fwd == gpu_linear_bf16_fwd && s_gpu->linear_bwd == gpu_linear_bf16_bwd &&
              s_gpu->attention_fwd == gpu_attention_flash_fwd &&
              s_gpu->attention_bwd == gpu_attention_flash_bwd &&
              s_gpu->adamw == gpu_backend_f32.adamw && s_gpu->alloc == gpu_backend_f32.alloc,
          "bf16mm: the linear and attention ops are its own, the rest gpu_backend_f32's");

    /* odd sizes (cuBLAS off its aligned tensor-core paths) and the model's own (aligned) */
    static const int lin[][3] = {
        {1, 1, 1}, {7, 13, 5}, {64, 96, 48}, {33, 130, 257}, {300, 40, 67}, {5, 1000, 3},
        {256, 2048, 512}, {384, 1024, 1408},
    };
    for (size_t i = 0; i < sizeof lin / sizeof lin[0]; i++) {
        s_check_linear(lin[i][0], lin[i][1], lin[i][2], true);
        s_check_linear(lin[i][0], lin[i][1], lin[i][2], false);
    }
    /* the scratch buffers shrink back to a small shape after a large one */
    s_check_linear(7, 13, 5, true);

    s_check_training();
    return test_finish();
}
