/* Training end to end (net) with the real daemons on loopback, a tiny model and a seeded corpus:
 * one job on 1 and on 4 workers gives the same losses, grad norms and checkpointed weights; the
 * 4-worker run's dispatch accounting (load, routed, rows and bytes out) adds up; a job restarted
 * from a checkpoint resumes bit for bit on 1 worker and within float rounding on 2; a truncated
 * checkpoint makes a restarted job fail clearly, without a crash. */
#include <cjson/cJSON.h>
#include <errno.h>
#include <ftw.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"
#include "tests/train_util.h"

/* The job (tests/train_util.h): the tiny model, one global micro-batch per step. */
#define S_LAYERS TRAIN_UTIL_LAYERS
#define S_EXPERTS TRAIN_UTIL_EXPERTS
#define S_TOPK TRAIN_UTIL_TOPK
#define S_HIDDEN TRAIN_UTIL_HIDDEN
#define S_SEQ TRAIN_UTIL_SEQ
#define S_BATCH TRAIN_UTIL_BATCH
#define S_STEPS 20
#define S_EVAL 5
#define S_CKPT 10
#define S_LE TRAIN_UTIL_LE
#define S_MAXW 4

#define S_REL_TOL 1e-5     /* losses across worker counts */
#define S_WEIGHT_TOL 1e-5  /* checkpoint weights across worker counts */
#define S_RUN_MS 60000     /* a whole run, coordinator exit included */
#define S_EXIT_MS 15000    /* a worker's exit once its coordinator is gone or it got SIGTERM */

static uint64_t s_seed;
static char s_corpus[PATH_MAX];

typedef struct {
    const char *name;
    int n;
    train_util_worker_t w[S_MAXW];
} s_run_t;

/* --- files ---------------------------------------------------------------------------------- */

/* The job spec for `workers` workers with its checkpoints under ckdir. The placement stays as
 * the first PLAN made it (an elastic threshold no imbalance reaches: no rebalancing on load
 * skew), so one generation runs and the accounting below sees one holder per expert. */
static bool s_write_job(const char *path, int workers, const char *ckdir)
{
    train_util_job_t job = {.seed = s_seed, .corpus = s_corpus, .checkpoint_dir = ckdir,
                            .steps = S_STEPS, .eval_interval = S_EVAL,
                            .checkpoint_interval = S_CKPT, .expected_workers = workers,
                            .threshold = 1e9};
    return train_util_write_job(path, &job);
}

static int s_rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path) == 0 || errno == ENOENT ? 0 : -1;
}

/* Points <root>/latest at step-NNNNNNNN the way a writer does (a symlink under a temporary name
 * renamed over it) and removes the step directories after it up to the end of the run. */
static bool s_rewind(const char *root, int step)
{
    char target[32], tmpname[64], tmp[PATH_MAX], latest[PATH_MAX], dir[PATH_MAX];
    snprintf(target, sizeof target, "step-%08d", step);
    snprintf(tmpname, sizeof tmpname, "latest.test-%d", (int)getpid());
    train_util_join(tmp, sizeof tmp, root, tmpname);
    train_util_join(latest, sizeof latest, root, "latest");
    unlink(tmp);
    if (symlink(target, tmp) != 0 || rename(tmp, latest) != 0) {
        fprintf(stderr, "cannot point %s at %s: %s\n", latest, target, strerror(errno));
        return false;
    }
    for (int s = step + 1; s <= S_STEPS; s++) {
        train_util_step_dir(dir, root, s);
        if (access(dir, F_OK) == 0 && nftw(dir, s_rm_entry, 16, FTW_DEPTH | FTW_PHYS) != 0) {
            fprintf(stderr, "cannot remove %s: %s\n", dir, strerror(errno));
            return false;
        }
    }
    return true;
}

/* What <root>/latest names ("" when it is not a symlink) into buf. */
static const char *s_latest(const char *root, char *buf, size_t n)
{
    char path[PATH_MAX];
    train_util_join(path, sizeof path, root, "latest");
    ssize_t len = readlink(path, buf, n - 1);
    buf[len > 0 ? len : 0] = 0;
    return buf;
}

static char *s_read_in(const char *dir, const char *name, size_t *len)
{
    char path[PATH_MAX];
    train_util_join(path, sizeof path, dir, name);
    return proc_read_file(path, len);
}

/* --- metrics logs --------------------------------------------------------------------------- */

/* The time split of a metrics line: every part there and >= 0, together within the step (the
 * profiled ops, the exchange and the all-reduce nest inside step_time_s); gemm_flops exactly
 * the step's linear ops on this worker (an evaluation's forward would add to it): every token
 * through the dense projections (6 FLOPs per weight: forward, input and weight gradients) and
 * every row the experts held here received through w1, w3, w2 (18 D F). */
static bool s_check_split(const train_util_line_t *l, const char *run, const char *id)
{
    bool ok = !isnan(l->step_time) && !isnan(l->gemm_flops) && !isnan(l->tokens);
    double sum = 0;
    for (int k = 0; ok && k < TRAIN_UTIL_NSPLIT; k++) {
        ok = !isnan(l->split[k]);
        CHECK(ok, "%s: %s: step %" PRIu64 ": %s missing or negative", run, id, l->step,
              train_util_split_keys[k]);
        sum += ok ? l->split[k] : 0;
    }
    CHECK(!isnan(l->step_time) && !isnan(l->gemm_flops) && !isnan(l->tokens), "%s: %s: step %"
          PRIu64 ": step_time_s, gemm_flops or tokens missing", run, id, l->step);
    if (!ok)
        return false;
    CHECK(sum <= l->step_time + 1e-3, "%s: %s: step %" PRIu64 ": the split adds up to %.6f s, "
          "more than the step's %.6f s", run, id, l->step, sum, l->step_time);
    const double D = S_HIDDEN, F = TRAIN_UTIL_FFN, V = TRAIN_UTIL_VOCAB, Q = S_HIDDEN;
    const double KV = S_HIDDEN / 2;
    double dense = S_LAYERS * (D * Q + 2 * D * KV + Q * D + D * S_EXPERTS) + D * V;
    double rows = 0;
    for (int e = 0; e < S_LE; e++)
        rows += (double)l->load[e];
    double want = 6 * l->tokens * dense + 18 * D * F * rows;
    CHECK(l->gemm_flops == want, "%s: %s: step %" PRIu64 ": gemm_flops %.0f, want %.0f (%.0f "
          "tokens through %.0f dense weights, %.0f expert rows)", run, id, l->step,
          l->gemm_flops, want, l->tokens, dense, rows);
    return sum <= l->step_time + 1e-3 && l->gemm_flops == want;
}

/* Reads w's metrics log: every line whole, steps consecutive from first_step + 1. */
static bool s_read_log(train_util_worker_t *w, const char *run, int first_step)
{
    bool ok = train_util_read_log(w, run);
    CHECK(w->n <= S_STEPS, "%s: %s: %d lines in %s, want at most %d", run, w->id, w->n, w->log,
          S_STEPS);
    ok = ok && w->n <= S_STEPS;
    for (int k = 0; ok && k < w->n; k++) {
        const train_util_line_t *l = &w->line[k];
        ok = s_check_split(l, run, w->id);
        CHECK(!ok || l->step == (uint64_t)(first_step + k + 1), "%s: %s: line %d says step %"
              PRIu64 ", want %d", run, w->id, k + 1, l->step, first_step + k + 1);
        ok = ok && l->step == (uint64_t)(first_step + k + 1);
        bool want_eval = l->step % S_EVAL == 0 || l->step == S_STEPS;
        CHECK(!ok || (l->eval[0] != 0) == want_eval, "%s: %s: step %" PRIu64 " %s eval_loss",
              run, w->id, l->step, want_eval ? "lacks" : "has an unexpected");
    }
    CHECK(!ok || w->n == S_STEPS - first_step, "%s: %s logged %d steps, want %d (steps %d..%d)",
          run, w->id, w->n, S_STEPS - first_step, first_step + 1, S_STEPS);
    return ok && w->n == S_STEPS - first_step;
}

/* --- runs ----------------------------------------------------------------------------------- */

/* Runs the job on n workers to the end: the coordinator exits 0 once they finished, every
 * worker exits 0, and each logged steps first_step+1..S_STEPS. False when a step of that
 * failed (said why). */
static bool s_run(s_run_t *r, const char *name, const char *job, int n, int first_step)
{
    for (int i = 0; i < S_MAXW; i++)
        train_util_free_log(&r->w[i]);
    memset(r, 0, sizeof *r);
    r->name = name;
    r->n = n;
    proc_ports_t pp;
    proc_t *coord;
    cJSON *st = test_status_start_coordinator(job, &pp, &coord);
    CHECK(st != NULL, "%s: no coordinator answering on its status socket", name);
    cJSON_Delete(st);
    if (!st)
        return false;
    int64_t t0 = proc_now_ms();
    for (int i = 0; i < n; i++)
        if (!train_util_start_worker(&r->w[i], name, i, &pp))
            return false;
    int cst = 0;
    bool exited = proc_wait(coord, S_RUN_MS, &cst);
    CHECK(exited, "%s: the coordinator still runs %d s after %d workers started", name,
          S_RUN_MS / 1000, n);
    CHECK(!exited || proc_exit_code(cst) == 0, "%s: the coordinator exited %d, want 0", name,
          proc_exit_code(cst));
    bool ok = exited && proc_exit_code(cst) == 0;
    for (int i = 0; i < n; i++) {
        int wst = 0;
        bool gone = proc_wait(r->w[i].proc, S_EXIT_MS, &wst);
        CHECK(gone, "%s: worker %s still runs after its coordinator exited", name, r->w[i].id);
        CHECK(!gone || proc_exit_code(wst) == 0, "%s: worker %s exited %d, want 0", name,
              r->w[i].id, proc_exit_code(wst));
        ok = ok && gone && proc_exit_code(wst) == 0;
    }
    fprintf(stderr, "  %s: %d worker%s, steps %d..%d, %.2f s\n", name, n, n == 1 ? "" : "s",
            first_step + 1, S_STEPS, (double)(proc_now_ms() - t0) / 1000.0);
    for (int i = 0; i < n; i++)
        ok = s_read_log(&r->w[i], name, first_step) && ok;
    return ok;
}

/* Within one run: every line of a worker shows the same rank and generation, world == n, the
 * ranks are 0..n-1, and every worker logged the same loss and eval loss strings per step. */
static void s_check_consistent(const s_run_t *r)
{
    bool seen[S_MAXW] = {false};
    for (int i = 0; i < r->n; i++) {
        const train_util_worker_t *w = &r->w[i];
        long long rank = w->line[0].rank;
        CHECK(rank >= 0 && rank < r->n && !seen[rank], "%s: %s has rank %lld: ranks must be "
              "0..%d, each once", r->name, w->id, rank, r->n - 1);
        if (rank >= 0 && rank < r->n)
            seen[rank] = true;
        for (int k = 0; k < w->n; k++) {
            const train_util_line_t *l = &w->line[k], *l0 = &r->w[0].line[k];
            CHECK(l->world == r->n && l->rank == rank, "%s: %s step %" PRIu64 ": rank %lld of "
                  "world %lld, want rank %lld of %d", r->name, w->id, l->step, l->rank, l->world,
                  rank, r->n);
            CHECK(l->generation == r->w[0].line[0].generation, "%s: %s step %" PRIu64 ": "
                  "generation %" PRIu64 ", the run started in %" PRIu64, r->name, w->id, l->step,
                  l->generation, r->w[0].line[0].generation);
            CHECK(strcmp(l->loss, l0->loss) == 0 && strcmp(l->eval, l0->eval) == 0,
                  "%s step %" PRIu64 ": %s logged loss %s eval %s, %s logged %s eval %s", r->name,
                  l->step, w->id, l->loss, l->eval, r->w[0].id, l0->loss, l0->eval);
            /* the global gradient norm: dense counted once, every expert once, on every rank */
            CHECK(strcmp(l->gnorm, l0->gnorm) == 0, "%s step %" PRIu64 ": %s logged grad_norm "
                  "%s, %s logged %s", r->name, l->step, w->id, l->gnorm, r->w[0].id, l0->gnorm);
            CHECK(isfinite(l->lossv) && l->lossv > 0, "%s: %s step %" PRIu64 ": loss %s",
                  r->name, w->id, l->step, l->loss);
        }
    }
}

/* b's lines against a's for the same steps: loss, eval loss and grad norm within tol relative
 * (tol 0: the same printed strings). Returns the largest relative difference of the losses,
 * and that of the grad norms in *worst_gnorm. */
static double s_compare(const s_run_t *a, const s_run_t *b, double tol, double *worst_gnorm)
{
    double worst = 0;
    *worst_gnorm = 0;
    const train_util_worker_t *wa = &a->w[0], *wb = &b->w[0];
    for (int k = 0; k < wb->n; k++) {
        const train_util_line_t *lb = &wb->line[k];
        const train_util_line_t *la = NULL;
        for (int j = 0; j < wa->n; j++)
            if (wa->line[j].step == lb->step)
                la = &wa->line[j];
        CHECK(la != NULL, "%s has step %" PRIu64 ", %s not", b->name, lb->step, a->name);
        if (!la)
            continue;
        double d = fabs(la->lossv - lb->lossv) / fabs(la->lossv);
        worst = d > worst ? d : worst;
        if (tol == 0)
            CHECK(strcmp(la->loss, lb->loss) == 0, "step %" PRIu64 ": loss %s in %s, %s in %s",
                  lb->step, la->loss, a->name, lb->loss, b->name);
        else
            CHECK(d < tol, "step %" PRIu64 ": loss %s in %s, %s in %s: relative difference "
                  "%.3g >= %g", lb->step, la->loss, a->name, lb->loss, b->name, d, tol);
        double g = fabs(la->gnormv - lb->gnormv) / fabs(la->gnormv);
        *worst_gnorm = g > *worst_gnorm ? g : *worst_gnorm;
        if (tol == 0)
            CHECK(strcmp(la->gnorm, lb->gnorm) == 0, "step %" PRIu64 ": grad_norm %s in %s, %s "
                  "in %s", lb->step, la->gnorm, a->name, lb->gnorm, b->name);
        else
            CHECK(g < tol, "step %" PRIu64 ": grad_norm %s in %s, %s in %s: relative difference "
                  "%.3g >= %g", lb->step, la->gnorm, a->name, lb->gnorm, b->name, g, tol);
        if (la->eval[0] && lb->eval[0]) {
            double e = fabs(la->evalv - lb->evalv) / fabs(la->evalv);
            worst = e > worst ? e : worst;
            if (tol == 0)
                CHECK(strcmp(la->eval, lb->eval) == 0, "step %" PRIu64 ": eval_loss %s in %s, "
                      "%s in %s", lb->step, la->eval, a->name, lb->eval, b->name);
            else
                CHECK(e < tol, "step %" PRIu64 ": eval_loss %s in %s, %s in %s: relative "
                      "difference %.3g >= %g", lb->step, la->eval, a->name, lb->eval, b->name, e,
                      tol);
        }
    }
    return worst;
}

/* --- check 2: dispatch accounting ----------------------------------------------------------- */

static void s_check_dispatch(const s_run_t *r)
{
    int W = r->n;
    int holder[S_LE];
    for (int e = 0; e < S_LE; e++)
        holder[e] = -1;
    /* the holder of an expert: the one worker whose load for it is ever nonzero */
    for (int i = 0; i < W; i++)
        for (int k = 0; k < r->w[i].n; k++)
            for (int e = 0; e < S_LE; e++) {
                if (r->w[i].line[k].load[e] == 0 || holder[e] == i)
                    continue;
                CHECK(holder[e] < 0, "%s: expert %d (layer %d) has load on %s and on %s", r->name,
                      e, e / S_EXPERTS, holder[e] >= 0 ? r->w[holder[e]].id : "?", r->w[i].id);
                holder[e] = i;
            }
    int held[S_MAXW][S_LAYERS] = {{0}}, known = 0;
    for (int e = 0; e < S_LE; e++)
        if (holder[e] >= 0) {
            held[holder[e]][e / S_EXPERTS]++;
            known++;
        }
    CHECK(known == S_LE, "%s: only %d of %d experts ever received a token", r->name, known, S_LE);
    for (int i = 0; i < W; i++)
        for (int l = 0; l < S_LAYERS; l++)
            CHECK(held[i][l] <= (S_EXPERTS + W - 1) / W, "%s: %s holds %d experts of layer %d: "
                  "a balanced placement gives at most %d", r->name, r->w[i].id, held[i][l], l,
                  (S_EXPERTS + W - 1) / W);

    uint64_t header = 2ull * S_LAYERS * (uint64_t)(W - 1) * S_EXPERTS * sizeof(int32_t);
    uint64_t min_rows = UINT64_MAX, max_rows = 0;
    int checked = 0;
    for (int k = 0; k < r->w[0].n; k++) {
        uint64_t step = r->w[0].line[k].step;
        long long per_layer[S_LAYERS] = {0};
        for (int e = 0; e < S_LE; e++) {
            long long routed = 0, load = 0;
            for (int i = 0; i < W; i++) {
                routed += r->w[i].line[k].routed[e];
                load += r->w[i].line[k].load[e];
            }
            per_layer[e / S_EXPERTS] += routed;
            long long hl = holder[e] >= 0 ? r->w[holder[e]].line[k].load[e] : 0;
            CHECK(hl == routed && load == hl, "%s step %" PRIu64 ": expert %d: its holder %s "
                  "received %lld tokens (all workers: %lld), the workers routed %lld to it",
                  r->name, step, e, holder[e] >= 0 ? r->w[holder[e]].id : "(none)", hl, load,
                  routed);
        }
        for (int l = 0; l < S_LAYERS; l++)
            CHECK(per_layer[l] == (long long)S_BATCH * S_SEQ * S_TOPK, "%s step %" PRIu64 ": "
                  "layer %d: %lld tokens routed in all, want global_batch %d x seq_len %d x top-%d "
                  "= %d", r->name, step, l, per_layer[l], S_BATCH, S_SEQ, S_TOPK,
                  S_BATCH * S_SEQ * S_TOPK);
        for (int i = 0; i < W; i++) {
            const train_util_line_t *ln = &r->w[i].line[k];
            uint64_t away = 0;
            for (int e = 0; e < S_LE; e++)
                if (holder[e] != i)
                    away += (uint64_t)ln->routed[e];
            CHECK(ln->rows_out == 2 * away, "%s step %" PRIu64 ": %s: dispatch_rows_out %" PRIu64
                  ", want 2 x %" PRIu64 " (forward and backward) tokens routed to experts held "
                  "elsewhere", r->name, step, r->w[i].id, ln->rows_out, away);
            uint64_t want = ln->rows_out * S_HIDDEN * sizeof(float) + header;
            CHECK(ln->bytes_out == want, "%s step %" PRIu64 ": %s: dispatch_bytes_out %" PRIu64
                  ", want %" PRIu64 " rows x %d floats + %" PRIu64 " header bytes = %" PRIu64,
                  r->name, step, r->w[i].id, ln->bytes_out, ln->rows_out, S_HIDDEN, header,
                  want);
            min_rows = ln->rows_out < min_rows ? ln->rows_out : min_rows;
            max_rows = ln->rows_out > max_rows ? ln->rows_out : max_rows;
            checked++;
        }
    }
    fprintf(stderr, "  dispatch: %d worker-steps of %s checked; %d experts held, rows out per "
            "step %" PRIu64 "..%" PRIu64 ", %" PRIu64 " header bytes per step\n", checked,
            r->name, known, min_rows, max_rows, header);
}

/* A single worker sends nothing and receives exactly what it routes. */
static void s_check_alone(const s_run_t *r)
{
    const train_util_worker_t *w = &r->w[0];
    for (int k = 0; k < w->n; k++) {
        const train_util_line_t *l = &w->line[k];
        CHECK(l->rows_out == 0 && l->bytes_out == 0, "%s step %" PRIu64 ": a lone worker "
              "dispatched %" PRIu64 " rows, %" PRIu64 " bytes to others", r->name, l->step,
              l->rows_out, l->bytes_out);
        long long per_layer[S_LAYERS] = {0};
        for (int e = 0; e < S_LE; e++) {
            per_layer[e / S_EXPERTS] += l->routed[e];
            CHECK(l->load[e] == l->routed[e], "%s step %" PRIu64 ": expert %d: load %lld, "
                  "routed %lld on a lone worker", r->name, l->step, e, l->load[e], l->routed[e]);
        }
        for (int j = 0; j < S_LAYERS; j++)
            CHECK(per_layer[j] == (long long)S_BATCH * S_SEQ * S_TOPK, "%s step %" PRIu64
                  ": layer %d: %lld tokens routed", r->name, l->step, j, per_layer[j]);
    }
}

/* --- checkpoints ---------------------------------------------------------------------------- */

/* Two model.safetensors of the same model written by different worker counts: the same tensors
 * with weights within tol. Returns the largest difference. */
static double s_compare_weights(const char *a_dir, const char *b_dir, double tol)
{
    train_util_weights_diff_t d;
    if (!train_util_compare_weights(a_dir, b_dir, &d))
        return -1;
    CHECK(d.max_abs <= tol, "weights of %s and %s differ by up to %.3g > %g", a_dir, b_dir,
          d.max_abs, tol);
    return d.max_abs;
}

/* A status predicate: the worker `arg` reports phase "failed". */
static bool s_failed(const cJSON *st, void *arg, char *why, size_t n)
{
    const cJSON *w = test_status_worker(st, arg);
    const char *phase = w ? test_status_str(w, "phase") : NULL;
    if (phase && strcmp(phase, "failed") == 0)
        return true;
    snprintf(why, n, "%s: phase %s", (const char *)arg, phase ? phase : "(not listed)");
    return false;
}

/* --- the test ------------------------------------------------------------------------------- */

int main(void)
{
    test_init("training");
    proc_init("training");
    s_seed = 1 + test_rand_below(1000000000);
    fprintf(stderr, "  train.seed %" PRIu64 "\n", s_seed);
    char job1[PATH_MAX], job2[PATH_MAX], job4[PATH_MAX], ck1[PATH_MAX], ck4[PATH_MAX];
    proc_tmp_path(s_corpus, sizeof s_corpus, "corpus.txt");
    proc_tmp_path(ck1, sizeof ck1, "ckpt-1");
    proc_tmp_path(ck4, sizeof ck4, "ckpt-4");
    proc_tmp_path(job1, sizeof job1, "job-1.json");
    proc_tmp_path(job2, sizeof job2, "job-2.json");
    proc_tmp_path(job4, sizeof job4, "job-4.json");
    REQUIRE(train_util_write_corpus(s_corpus), "cannot write the corpus");
    REQUIRE(s_write_job(job1, 1, ck1) && s_write_job(job2, 2, ck1) && s_write_job(job4, 4, ck4),
            "cannot write the job specs");
    static s_run_t one, four, again, two;
    int64_t t0 = proc_now_ms();

    /* 1. The same job on 1 and on 4 workers. */
    REQUIRE(s_run(&one, "one", job1, 1, 0), "the 1-worker run did not complete");
    REQUIRE(s_run(&four, "four", job4, 4, 0), "the 4-worker run did not complete");
    s_check_consistent(&one);
    s_check_consistent(&four);
    double g14;
    double d14 = s_compare(&one, &four, S_REL_TOL, &g14);
    const train_util_line_t *first = &one.w[0].line[0], *last = &one.w[0].line[S_STEPS - 1];
    CHECK(last->lossv < first->lossv, "loss %s at step 1, %s at step %d: training did not lower "
          "it", first->loss, last->loss, S_STEPS);
    fprintf(stderr, "check 1: loss %s -> %s, eval %s; 1 vs 4 workers: max relative difference "
            "%.3g of the losses, %.3g of the grad norms (tolerance %g)\n", first->loss,
            last->loss, last->eval, d14, g14, S_REL_TOL);

    /* 2. Dispatch accounting. */
    s_check_alone(&one);
    s_check_dispatch(&four);
    fprintf(stderr, "check 2: dispatch accounting of %d steps x 4 workers done\n", four.w[0].n);

    /* 3. Resume from step 10: bit for bit on 1 worker, within rounding on 2. */
    char ck1_10[PATH_MAX], ck1_20[PATH_MAX], ck4_10[PATH_MAX], ck4_20[PATH_MAX], buf[64];
    train_util_step_dir(ck1_10, ck1, S_CKPT);
    train_util_step_dir(ck1_20, ck1, S_STEPS);
    train_util_step_dir(ck4_10, ck4, S_CKPT);
    train_util_step_dir(ck4_20, ck4, S_STEPS);
    for (int i = 0; i < 2; i++) {
        const char *root = i ? ck4 : ck1;
        CHECK(access(i ? ck4_10 : ck1_10, F_OK) == 0 && access(i ? ck4_20 : ck1_20, F_OK) == 0,
              "%s lacks step-%08d or step-%08d", root, S_CKPT, S_STEPS);
        CHECK(strcmp(s_latest(root, buf, sizeof buf), "step-00000020") == 0,
              "%s/latest names \"%s\", want step-00000020", root, buf);
    }
    double dw10 = s_compare_weights(ck1_10, ck4_10, S_WEIGHT_TOL);
    double dw20 = s_compare_weights(ck1_20, ck4_20, S_WEIGHT_TOL);
    static const char *kept_names[] = {"model.safetensors", "semoe/optimizer.safetensors"};
    char *kept[2];
    size_t kept_len[2];
    for (int i = 0; i < 2; i++) {
        kept[i] = s_read_in(ck1_20, kept_names[i], &kept_len[i]);
        REQUIRE(kept[i] && kept_len[i] > 0, "cannot read %s/%s", ck1_20, kept_names[i]);
    }
    REQUIRE(s_rewind(ck1, S_CKPT), "cannot rewind %s", ck1);
    REQUIRE(s_run(&again, "again", job1, 1, S_CKPT), "the resumed 1-worker run did not complete");
    CHECK(train_util_output_has(again.w[0].proc, "step-00000010"), "the resumed worker %s never "
          "names step-00000010 in its log", again.w[0].id);
    s_check_consistent(&again);
    double g_again;
    s_compare(&one, &again, 0, &g_again);
    int same_files = 0;
    for (int i = 0; i < 2; i++) {
        size_t n = 0;
        char *now = s_read_in(ck1_20, kept_names[i], &n);
        bool same = now && n == kept_len[i] && memcmp(now, kept[i], n) == 0;
        CHECK(same, "%s/%s after the resumed run: %zu bytes%s, the uninterrupted run wrote %zu",
              ck1_20, kept_names[i], n, now && n == kept_len[i] ? " that differ" : "",
              kept_len[i]);
        same_files += same;
        free(now);
        free(kept[i]);
    }
    REQUIRE(s_rewind(ck1, S_CKPT), "cannot rewind %s", ck1);
    REQUIRE(s_run(&two, "two", job2, 2, S_CKPT), "the resumed 2-worker run did not complete");
    s_check_consistent(&two);
    double g12;
    double d12 = s_compare(&one, &two, S_REL_TOL, &g12);
    fprintf(stderr, "check 3: resumed at step %d on 1 worker: losses bit-identical, %d of 2 "
            "step-%d files byte-identical; on 2 workers: max relative difference %.3g (grad "
            "norms %.3g); 4-worker checkpoint weights vs 1-worker: max difference %.3g (step %d), "
            "%.3g (step %d)\n", S_CKPT, same_files, S_STEPS, d12, g12, dw10, S_CKPT, dw20,
            S_STEPS);

    /* 4. A truncated checkpoint: the restarted worker fails clearly, nothing crashes. */
    char model[PATH_MAX];
    train_util_join(model, sizeof model, ck1_20, "model.safetensors");
    struct stat sb;
    int cut = 1 + (int)test_rand_below(16);
    REQUIRE(strcmp(s_latest(ck1, buf, sizeof buf), "step-00000020") == 0 &&
                stat(model, &sb) == 0 && sb.st_size > 64 &&
                truncate(model, sb.st_size - cut) == 0,
            "cannot truncate %s (latest names \"%s\")", model, buf);
    proc_ports_t pp;
    proc_t *coord;
    cJSON *st = test_status_start_coordinator(job1, &pp, &coord);
    REQUIRE(st, "corrupt: no coordinator answering on its status socket");
    cJSON_Delete(st);
    train_util_worker_t bad = {0};
    REQUIRE(train_util_start_worker(&bad, "corrupt", 0, &pp), "cannot start a worker");
    int64_t tf = proc_now_ms();
    st = test_status_wait(pp.status_ep, s_failed, bad.id, 30000, 50);
    CHECK(st != NULL, "worker %s never reported phase \"failed\" on a checkpoint cut by %d bytes",
          bad.id, cut);
    int64_t took = proc_now_ms() - tf;
    cJSON_Delete(st);
    char named[64];
    snprintf(named, sizeof named, "step-%08d/model.safetensors", S_STEPS);
    CHECK(train_util_output_has(bad.proc, named), "worker %s's log does not name %s", bad.id,
          named);
    proc_t *stop[2] = {bad.proc, coord};
    for (int i = 0; i < 2; i++) {
        int status = 0;
        bool alive = proc_running(stop[i]);
        CHECK(alive, "%s is gone (exit code %d) after the worker met a corrupt checkpoint: the "
              "worker should report the failure and both wait to be stopped", proc_label(stop[i]),
              proc_wait(stop[i], 0, &status) ? proc_exit_code(status) : -1);
    }
    char *mlog = proc_read_file(bad.log, NULL);
    CHECK(!mlog || mlog[0] == 0, "worker %s logged steps from a corrupt checkpoint: %.200s",
          bad.id, mlog);
    free(mlog);
    int codes[2] = {-1, -1};
    for (int i = 0; i < 2; i++) {
        if (!proc_running(stop[i]))
            continue; /* said above */
        int status = 0;
        bool ok = proc_signal(stop[i], SIGTERM);
        bool gone = ok && proc_wait(stop[i], S_EXIT_MS, &status);
        CHECK(gone, "%s still runs %d s after SIGTERM", proc_label(stop[i]), S_EXIT_MS / 1000);
        CHECK(!gone || proc_exit_code(status) == 0, "%s exited %d after SIGTERM, want 0%s",
              proc_label(stop[i]), proc_exit_code(status),
              proc_exit_code(status) == 128 + SIGTERM ? " (killed by the signal itself: some "
              "thread of it does not block SIGTERM, so it never got to handle it)" : "");
        codes[i] = gone ? proc_exit_code(status) : -1;
    }
    fprintf(stderr, "check 4: checkpoint cut by %d bytes: worker failed %lld ms after it started, "
            "its log names %s; after SIGTERM the worker exited %d, the coordinator %d\n", cut,
            (long long)took, named, codes[0], codes[1]);
    fprintf(stderr, "  total %.1f s\n", (double)(proc_now_ms() - t0) / 1000.0);
    return test_finish();
}
