/* Checkpoints across backends: a tiny model trained on the CUDA backend, saved, loads into a CPU
 * trainer and a fresh GPU trainer with its weights and AdamW moments bit for bit, and the next
 * steps' losses agree with the GPU's to fp32 rounding; the reverse from the CPU to the GPU; and
 * `semoe eval` / `semoe generate` give the same loss, logits and text on --device cuda:0 as on
 * --device cpu. Skipped (77) without a CUDA device. */
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "gpu/backend.h"
#include "gpu/device.h"
#include "model/backend.h"
#include "model/checkpoint.h"
#include "model/graph.h"
#include "model/job.h"
#include "model/params.h"
#include "model/shards.h"
#include "model/train.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/tiny_model.h"

#define S_N 5      /* steps before the checkpoint */
#define S_K 3      /* steps after it */
#define S_ROWS 8
#define S_SEQ 12
#define S_TOL 1e-5 /* fp32 against fp32, relative */

static const model_backend_f32_t *const s_cpu = &cpu_backend_f32;
static const model_backend_f32_t *const s_gpu = &gpu_backend_f32;

static uint8_t s_tok[S_N + S_K][S_ROWS * (S_SEQ + 1)];

/* Like REQUIRE inside a check that returns when it cannot go on. */
#define S_NEED(cond, ...)                                                                      \
    do {                                                                                       \
        bool ok_ = (cond);                                                                     \
        CHECK_HELD(ok_, #cond, __VA_ARGS__);                                                   \
        if (!ok_)                                                                              \
            goto done;                                                                         \
    } while (0)

/* The tiny model of test_checkpoint.c. */
static void s_tiny_job(model_job_t *job)
{
    model_job_defaults(job);
    test_tiny_config(&job->model);
    job->train.seq_len = S_SEQ;
    job->train.global_batch = S_ROWS;
    job->train.micro_batch = 4;
    job->train.lr = 1e-2;
    job->train.min_lr = 1e-3;
    job->train.warmup_steps = 2;
    snprintf(job->train.schedule, sizeof job->train.schedule, "cosine");
    job->train.weight_decay = 0.1;
    job->train.grad_clip = 1.0;
    job->train.steps = S_N + S_K;
}

/* A trainer on be over fresh params initialised from seed (*p the caller's), or NULL. */
static model_train_t *s_trainer(const model_backend_f32_t *be, const model_job_t *job,
                                uint64_t seed, model_params_t **p)
{
    model_train_t *tr = NULL;
    if (model_params_new(&job->model, NULL, 0, p) != SEMOE_OK)
        return NULL;
    model_params_init(*p, seed);
    if (model_train_new(be, *p, job, &tr) != SEMOE_OK)
        return NULL;
    return tr;
}

/* A trainer's weights, m and v copied to the host. */
typedef struct {
    float *w, *m, *v;
    size_t n;
    int adam;
} s_state_t;

static void s_snap(const model_backend_f32_t *be, model_train_t *tr, s_state_t *s)
{
    s->n = model_train_slab_floats(tr);
    s->w = malloc(s->n * sizeof(float));
    s->m = malloc(s->n * sizeof(float));
    s->v = malloc(s->n * sizeof(float));
    be->to_host(s->w, model_train_weights(tr), s->n * sizeof(float));
    be->to_host(s->m, model_train_m(tr), s->n * sizeof(float));
    be->to_host(s->v, model_train_v(tr), s->n * sizeof(float));
    s->adam = model_train_adam_step(tr);
}

static void s_snap_free(s_state_t *s)
{
    free(s->w);
    free(s->m);
    free(s->v);
    memset(s, 0, sizeof *s);
}

/* Whether trainer tr (on be) holds exactly want's bits; what names the case. */
static void s_same_bits(const char *what, const model_backend_f32_t *be, model_train_t *tr,
                        const s_state_t *want)
{
    s_state_t got;
    s_snap(be, tr, &got);
    const char *names[3] = {"weights", "exp_avg", "exp_avg_sq"};
    const float *g[3] = {got.w, got.m, got.v}, *w[3] = {want->w, want->m, want->v};
    for (int k = 0; k < 3; k++) {
        size_t bad = 0, first = 0;
        for (size_t i = 0; i < got.n; i++)
            if (memcmp(&g[k][i], &w[k][i], sizeof(float)) != 0 && bad++ == 0)
                first = i;
        CHECK(got.n == want->n && bad == 0, "%s: %s: %zu of %zu floats differ (first at %zu: "
              "%.9g, want %.9g)", what, names[k], bad, got.n, first, (double)g[k][first],
              (double)w[k][first]);
    }
    CHECK(got.adam == want->adam, "%s: adam step %d, want %d", what, got.adam, want->adam);
    s_snap_free(&got);
}

/* |got - want| / |want| norm-wise, in double. */
static double s_rel(const float *got, const float *want, size_t n)
{
    double dd = 0, ww = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)got[i] - want[i];
        dd += d * d;
        ww += (double)want[i] * want[i];
    }
    return ww > 0 ? sqrt(dd / ww) : sqrt(dd);
}

/* Trains S_N steps on src (seed), saves to dir with src's backend, loads the checkpoint into a
 * fresh trainer on each backend (other seeds) and checks their bits against src's; then S_K more
 * steps on all three: every loss within S_TOL of src's, and the final weights close. */
static void s_round_trip(const char *what, const model_backend_f32_t *src, const model_job_t *job,
                         const char *dir, uint64_t seed)
{
    model_params_t *ps = NULL, *pc = NULL, *pg = NULL;
    model_train_t *ts = NULL, *tc = NULL, *tg = NULL;
    s_state_t saved = {0}, after_s = {0}, after_c = {0}, after_g = {0};
    ts = s_trainer(src, job, seed, &ps);
    tc = s_trainer(s_cpu, job, seed + 1, &pc);
    tg = s_trainer(s_gpu, job, seed + 2, &pg);
    S_NEED(ts && tc && tg, "%s: trainers: %s", what, semoe_err_msg());
    for (uint64_t s = 0; s < S_N; s++)
        S_NEED(model_train_step(ts, s_tok[s], S_ROWS, s, NULL, NULL) == SEMOE_OK,
               "%s: step %llu: %s", what, (unsigned long long)s, semoe_err_msg());
    model_ckpt_state_t st = {.step = S_N, .seed = seed, .epoch = 1, .position = 3,
                             .rng = {test_rand(), test_rand(), test_rand(), test_rand()},
                             .job_hash = test_rand(), .generation = 2,
                             .layers_per_shard = (uint32_t)test_rand_below(3)};
    S_NEED(model_ckpt_save(dir, src, ps, ts, &st) == SEMOE_OK, "%s: save: %s", what,
           semoe_err_msg());
    s_snap(src, ts, &saved);
    CHECK(saved.adam == S_N, "%s: adam step %d after %d steps", what, saved.adam, S_N);

    model_ckpt_state_t got_c, got_g;
    S_NEED(model_ckpt_load(dir, s_cpu, pc, tc, &got_c) == SEMOE_OK, "%s: load on the CPU: %s",
           what, semoe_err_msg());
    S_NEED(model_ckpt_load(dir, s_gpu, pg, tg, &got_g) == SEMOE_OK, "%s: load on the GPU: %s",
           what, semoe_err_msg());
    for (int k = 0; k < 2; k++) {
        const model_ckpt_state_t *g = k ? &got_g : &got_c;
        CHECK(g->step == st.step && g->seed == st.seed && g->epoch == st.epoch &&
              g->position == st.position && memcmp(g->rng, st.rng, sizeof st.rng) == 0 &&
              g->job_hash == st.job_hash && g->generation == st.generation &&
              g->adam_step == S_N, "%s: state round trip into the %s", what, k ? "GPU" : "CPU");
    }
    char label[128];
    snprintf(label, sizeof label, "%s, loaded on the CPU", what);
    s_same_bits(label, s_cpu, tc, &saved);
    snprintf(label, sizeof label, "%s, loaded on the GPU", what);
    s_same_bits(label, s_gpu, tg, &saved);
    /* the model part too: params' host slab holds the saved weights after load */
    CHECK(memcmp(model_params_slab(pc), saved.w, saved.n * sizeof(float)) == 0 &&
              memcmp(model_params_slab(pg), saved.w, saved.n * sizeof(float)) == 0,
          "%s: params' slab after load is not the saved weights", what);

    double worst_c = 0, worst_g = 0;
    for (uint64_t s = S_N; s < S_N + S_K; s++) {
        model_train_report_t rs, rc, rg;
        S_NEED(model_train_step(ts, s_tok[s], S_ROWS, s, NULL, &rs) == SEMOE_OK &&
                   model_train_step(tc, s_tok[s], S_ROWS, s, NULL, &rc) == SEMOE_OK &&
                   model_train_step(tg, s_tok[s], S_ROWS, s, NULL, &rg) == SEMOE_OK,
               "%s: step %llu: %s", what, (unsigned long long)s, semoe_err_msg());
        double ec = fabs(rc.loss - rs.loss) / fabs(rs.loss);
        double eg = fabs(rg.loss - rs.loss) / fabs(rs.loss);
        worst_c = fmax(worst_c, ec);
        worst_g = fmax(worst_g, eg);
        printf("%s: step %llu: loss %.9f (%s, not stopped) %.9f (CPU, resumed) %.9f (GPU, "
               "resumed); rel %.2e %.2e\n", what, (unsigned long long)s, rs.loss, src->name,
               rc.loss, rg.loss, ec, eg);
        CHECK(ec < S_TOL && eg < S_TOL, "%s: step %llu: loss %.9g (CPU) %.9g (GPU) vs %.9g: rel "
              "%.3g %.3g", what, (unsigned long long)s, rc.loss, rg.loss, rs.loss, ec, eg);
        CHECK(rc.adam_step == (int)s + 1 && rg.adam_step == (int)s + 1,
              "%s: step %llu: adam steps %d %d", what, (unsigned long long)s, rc.adam_step,
              rg.adam_step);
    }
    /* the resumed trainer on src's backend sees what src saw, up to the GPU's atomics */
    s_snap(src, ts, &after_s);
    s_snap(s_cpu, tc, &after_c);
    s_snap(s_gpu, tg, &after_g);
    double wc = s_rel(after_c.w, after_s.w, after_s.n), wg = s_rel(after_g.w, after_s.w, after_s.n);
    /* AdamW divides by sqrt(v): as in test_gpu_model, weights get a looser bound than losses */
    CHECK(wc < 1e-4 && wg < 1e-4, "%s: weights after %d more steps: CPU rel %.3g, GPU rel %.3g",
          what, S_K, wc, wg);
    printf("%s: bits equal after load on both backends; %d more steps: worst loss rel %.2e "
           "(CPU) %.2e (GPU), weights rel %.2e %.2e\n", what, S_K, worst_c, worst_g, wc, wg);
done:
    s_snap_free(&after_g);
    s_snap_free(&after_c);
    s_snap_free(&after_s);
    s_snap_free(&saved);
    model_train_destroy(&tg);
    model_train_destroy(&tc);
    model_train_destroy(&ts);
    model_params_destroy(&pg);
    model_params_destroy(&pc);
    model_params_destroy(&ps);
}

/* Runs `semoe ARGS...` (NULL-ended) and returns its stdout (*len bytes; caller frees) when it
 * exits 0, else NULL after a failed check. The log starts with a header line, the command
 * (tests/proc.c), before what semoe wrote. */
static char *s_cli(const char *label, size_t *len, ...)
{
    const char *argv[32];
    int argc = 0;
    va_list ap;
    va_start(ap, len);
    for (const char *a; argc < 31 && (a = va_arg(ap, const char *));)
        argv[argc++] = a;
    va_end(ap);
    proc_t *p = proc_startv(label, PROC_CLI, argc, argv);
    int st = 0;
    bool done = p && proc_wait(p, 120000, &st);
    if (p && !done)
        proc_kill(p);
    int code = done ? proc_exit_code(st) : -1;
    char *err = p ? proc_read_file(proc_err_path(p), NULL) : NULL;
    CHECK(code == 0, "semoe %s (%s): exit %d: %s", argv[0], label, code, err ? err : "");
    free(err);
    if (code != 0)
        return NULL;
    return proc_read_file(proc_out_path(p), len);
}

/* "cross-entropy X nats/byte ..." in eval's output into *ce. */
static bool s_ce(const char *out, double *ce)
{
    const char *line = out ? strstr(out, "cross-entropy ") : NULL;
    return line && sscanf(line, "cross-entropy %lf", ce) == 1;
}

/* A file of n floats, or NULL. */
static float *s_floats(const char *path, size_t n)
{
    size_t len = 0;
    char *b = proc_read_file(path, &len);
    if (!b || len != n * sizeof(float)) {
        free(b);
        return NULL;
    }
    float *x = malloc(n * sizeof *x);
    memcpy(x, b, n * sizeof *x);
    free(b);
    return x;
}

/* Random bytes 1..V-1 (argv strings end at a NUL), n of them, NUL-terminated. */
static void s_text(char *buf, size_t n, int V)
{
    for (size_t i = 0; i < n; i++)
        buf[i] = (char)(1 + test_rand_below((uint64_t)(V - 1)));
    buf[n] = 0;
}

/* semoe eval and generate on --device cuda:0 against --device cpu over the checkpoint dir. */
static void s_cli_devices(const char *dir)
{
    model_config_t cfg;
    model_params_t *p = NULL;
    float *lc = NULL, *lg = NULL, *ref = NULL;
    char *oc = NULL, *og = NULL;
    int32_t *ids = NULL;
    S_NEED(model_shards_load_model(dir, &cfg, &p) == SEMOE_OK, "load %s: %s", dir,
           semoe_err_msg());
    int V = (int)cfg.vocab_size;
    const int T = 40; /* within max_position_embeddings (64) */
    char text[64], lpc[4200], lpg[4200];
    s_text(text, (size_t)T, V);
    proc_tmp_path(lpc, sizeof lpc, "logits-cpu.f32");
    proc_tmp_path(lpg, sizeof lpg, "logits-gpu.f32");
    oc = s_cli("eval-cpu", NULL, "eval", "--checkpoint", dir, "--text", text, "--logits", lpc,
               "--device", "cpu", (char *)NULL);
    og = s_cli("eval-gpu", NULL, "eval", "--checkpoint", dir, "--text", text, "--logits", lpg,
               "--device", "cuda:0", (char *)NULL);
    double cc = NAN, cg = NAN;
    S_NEED(s_ce(oc, &cc) && s_ce(og, &cg), "eval printed: [%s] [%s]", oc ? oc : "",
           og ? og : "");
    /* printed with 6 decimals: the rounding adds up to 1e-6 */
    CHECK(fabs(cc - cg) <= S_TOL, "semoe eval: cross-entropy %.6f (cuda:0) vs %.6f (cpu)", cg,
          cc);
    CHECK(strstr(og, "(float, cuda:0)") != NULL, "semoe eval --device cuda:0 does not say so: %s",
          og);
    size_t n = (size_t)T * V;
    lc = s_floats(lpc, n);
    lg = s_floats(lpg, n);
    S_NEED(lc && lg, "logits files %s, %s: missing or not %zu floats", lpc, lpg, n);
    /* and the CLI's CPU logits are this process's of the checkpoint's weights */
    ids = malloc((size_t)T * sizeof *ids);
    for (int i = 0; i < T; i++)
        ids[i] = (unsigned char)text[i];
    ref = malloc(n * sizeof *ref);
    S_NEED(model_logits_f32(s_cpu, p, model_params_slab(p), ids, T, ref) == SEMOE_OK,
           "logits: %s", semoe_err_msg());
    double rg = s_rel(lg, lc, n), rr = s_rel(lc, ref, n);
    CHECK(rg < S_TOL, "semoe eval --logits: cuda:0 vs cpu rel %.3g", rg);
    CHECK(rr < 1e-6, "semoe eval --logits (cpu) vs model_logits_f32 here: rel %.3g", rr);
    printf("semoe eval: cross-entropy %.6f (cpu) %.6f (cuda:0); logits rel %.2e (cpu vs "
           "in-process %.2e)\n", cc, cg, rg, rr);

    /* generate: greedy, and seeded sampling (a draw lands within fp32 rounding of a boundary
     * with odds of about 1e-6 per token, so the text is the same too) */
    char prompt[8], seed[32];
    s_text(prompt, 4, V);
    snprintf(seed, sizeof seed, "%llu", (unsigned long long)test_rand());
    static const char *const temps[] = {"0", "1"};
    for (int k = 0; k < 2; k++) {
        free(oc);
        free(og);
        size_t nc = 0, ng = 0;
        oc = s_cli("generate-cpu", &nc, "generate", "--checkpoint", dir, "--prompt", prompt,
                   "--tokens", "24", "--temperature", temps[k], "--seed", seed, "--device",
                   "cpu", (char *)NULL);
        og = s_cli("generate-gpu", &ng, "generate", "--checkpoint", dir, "--prompt", prompt,
                   "--tokens", "24", "--temperature", temps[k], "--seed", seed, "--device",
                   "cuda:0", (char *)NULL);
        /* what semoe wrote: the prompt, 24 bytes and a newline, after the log's header */
        const size_t want = 4 + 24 + 1;
        S_NEED(oc && og && nc >= want && ng >= want, "generate --temperature %s: %zu and %zu "
               "bytes of output", temps[k], nc, ng);
        const char *tc = oc + nc - want, *tg = og + ng - want;
        size_t first = 0;
        while (first < want && tc[first] == tg[first])
            first++;
        CHECK(memcmp(tc, prompt, 4) == 0 && tc[want - 1] == '\n', "semoe generate (cpu) did not "
              "write the prompt, 24 bytes and a newline");
        CHECK(first == want, "semoe generate --temperature %s --seed %s: cuda:0 and cpu differ "
              "from byte %zu of %zu", temps[k], seed, first, want);
        printf("semoe generate --temperature %s --seed %s: the same %zu bytes on cuda:0 and "
               "cpu (%zu equal)\n", temps[k], seed, want, first);
    }
done:
    free(ref);
    free(ids);
    free(lg);
    free(lc);
    free(og);
    free(oc);
    model_params_destroy(&p);
}

int main(void)
{
    test_init("gpu_ckpt");
    if (gpu_device_count() == 0) {
        printf("no CUDA device (%s): skipped\n", semoe_err_msg());
        return 77;
    }
    proc_init("gpu_ckpt");
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init: %s", semoe_err_msg());
    model_job_t job;
    s_tiny_job(&job);
    for (size_t s = 0; s < S_N + S_K; s++)
        for (size_t i = 0; i < sizeof s_tok[s]; i++)
            s_tok[s][i] = (uint8_t)test_rand_below(job.model.vocab_size);
    char gdir[4096], cdir[4096];
    proc_tmp_path(gdir, sizeof gdir, "from-gpu");
    proc_tmp_path(cdir, sizeof cdir, "from-cpu");
    uint64_t seed = test_rand();
    s_round_trip("GPU -> CPU", s_gpu, &job, gdir, seed);
    s_round_trip("CPU -> GPU", s_cpu, &job, cdir, seed + 10);
    s_cli_devices(gdir);
    return test_finish();
}
