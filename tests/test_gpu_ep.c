/* Expert parallelism on GPUs over NCCL (suite gpu; skipped, 77, with fewer than two devices),
 * the real daemons on loopback, the tiny model of train_util.h and a seeded corpus:
 *   (1) the job on 2 workers (cuda:0 and cuda:1, train.collectives "nccl": experts split, the
 *       expert rows and the dense gradients over NCCL) gives the losses, eval losses and grad
 *       norms of the same job on 1 worker (cuda:0, over ZeroMQ), within 1e-5, every step;
 *   (2) the same 2 workers with every expert on both (elastic.min_replicas 2), one killed
 *       (kill -9) mid-run: the survivor does not hang, trains on alone in a new generation (a
 *       new communicator of one rank), and a worker that joins on the freed GPU gets the experts
 *       and a new communicator of two (it logs steps of world 2); every step up to (1)'s last
 *       within 1e-5 of the reference, no step missing, every loss finite; the time from the
 *       kill to the first step of the new generation is printed.
 * Every worker must say that its NCCL communicator came up. */
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "actors/err.h"
#include "gpu/device.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"
#include "tests/train_util.h"

#define S_STEPS 20  /* the reference and (1) */
#define S_LONG 400  /* (2): long enough for a death, a recovery and a join to happen mid-run */
#define S_EVAL 5
#define S_TOL 1e-5
#define S_RUN_MS 180000   /* a whole run */
#define S_STEP_MS 120000  /* until a step or a generation shows */
#define S_EXIT_MS 20000
#define S_MAXW 3

static uint64_t s_seed;
static char s_corpus[PATH_MAX];

typedef struct {
    const char *name;
    char job[PATH_MAX];
    proc_ports_t pp;
    proc_t *coord;
    int n;
    train_util_worker_t w[S_MAXW];
    int victim; /* killed, -1: none */
} s_run_t;

static double s_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

/* Starts the run's coordinator and n workers, worker i on cuda:i. */
static bool s_start(s_run_t *r, const char *name, int n, const char *collectives,
                    int min_replicas, int steps)
{
    memset(r, 0, sizeof *r);
    r->name = name;
    r->victim = -1;
    char file[96];
    snprintf(file, sizeof file, "%s.json", name);
    proc_tmp_path(r->job, sizeof r->job, file);
    train_util_job_t job = {.seed = s_seed, .corpus = s_corpus, .checkpoint_dir = "",
                            .steps = steps, .eval_interval = steps > S_STEPS ? 50 : S_EVAL,
                            .expected_workers = n, .min_replicas = min_replicas,
                            .threshold = 1e9, .collectives = collectives};
    CHECK(train_util_write_job(r->job, &job), "%s: cannot write %s", name, r->job);
    cJSON *st = test_status_start_coordinator(r->job, &r->pp, &r->coord);
    CHECK(st != NULL, "%s: no coordinator answering on its status socket", name);
    cJSON_Delete(st);
    if (!st)
        return false;
    for (int i = 0; i < n; i++) {
        char dev[16];
        snprintf(dev, sizeof dev, "cuda:%d", i);
        if (!train_util_start_worker_on(&r->w[i], name, i, &r->pp, dev))
            return false;
        r->n++;
    }
    return true;
}

/* Waits until some worker logged step `step` (and, if gen > 0, a step of generation >= gen). */
static bool s_wait(s_run_t *r, uint64_t step, uint64_t gen)
{
    int64_t deadline = proc_now_ms() + S_STEP_MS;
    uint64_t s = 0, g = 0;
    while (proc_now_ms() < deadline && proc_running(r->coord)) {
        train_util_progress(r->w, r->n, &s, &g);
        if (s >= step && g >= gen)
            return true;
        proc_sleep_ms(5);
    }
    CHECK(false, "%s: no step %" PRIu64 " of generation %" PRIu64 "+ within %d s (the most: "
          "step %" PRIu64 ", generation %" PRIu64 ")", r->name, step, gen, S_STEP_MS / 1000, s, g);
    return false;
}

/* The coordinator exits 0, then every worker but the victim; reads the logs. */
static bool s_finish(s_run_t *r)
{
    int st = 0;
    bool exited = proc_wait(r->coord, S_RUN_MS, &st);
    CHECK(exited && proc_exit_code(st) == 0, "%s: the coordinator %s (exit %d)", r->name,
          exited ? "exited" : "still runs", exited ? proc_exit_code(st) : -1);
    bool ok = exited && proc_exit_code(st) == 0;
    for (int i = 0; i < r->n; i++) {
        if (i == r->victim)
            continue;
        bool gone = proc_wait(r->w[i].proc, S_EXIT_MS, &st);
        CHECK(gone && proc_exit_code(st) == 0, "%s: worker %s %s (exit %d)", r->name,
              r->w[i].id, gone ? "exited" : "still runs", gone ? proc_exit_code(st) : -1);
        ok = ok && gone && proc_exit_code(st) == 0;
        CHECK(train_util_output_has(r->w[i].proc, "NCCL communicator of") ||
                  strstr(r->name, "ref"),
              "%s: worker %s never said its NCCL communicator came up", r->name, r->w[i].id);
    }
    for (int i = 0; i < r->n; i++)
        ok = train_util_read_log(&r->w[i], r->name) && ok;
    return ok;
}

/* Every line of every worker of r against the reference's line for its step (steps past the
 * reference's: finite only): loss, eval loss and grad norm within S_TOL; each step 1..steps
 * logged by some worker. */
static void s_against(const s_run_t *r, const s_run_t *ref, int steps)
{
    bool seen[S_LONG + 1] = {false};
    double worst = 0.0;
    for (int i = 0; i < r->n; i++) {
        const train_util_worker_t *w = &r->w[i];
        for (int k = 0; k < w->n; k++) {
            const train_util_line_t *l = &w->line[k];
            if (l->step >= 1 && l->step <= (uint64_t)steps)
                seen[l->step] = true;
            CHECK(isfinite(l->lossv) && isfinite(l->gnormv), "%s: %s step %" PRIu64 ": loss %s "
                  "grad_norm %s", r->name, w->id, l->step, l->loss, l->gnorm);
            const train_util_line_t *m = train_util_find_step(&ref->w[0], l->step);
            if (!m)
                continue;
            double d = fabs(l->lossv - m->lossv) / fabs(m->lossv);
            double g = fabs(l->gnormv - m->gnormv) / fabs(m->gnormv);
            worst = d > worst ? d : worst;
            CHECK(d < S_TOL && g < S_TOL, "%s: %s step %" PRIu64 ": loss %s grad_norm %s, the "
                  "reference %s %s (relative %.3g, %.3g)", r->name, w->id, l->step, l->loss,
                  l->gnorm, m->loss, m->gnorm, d, g);
            if (l->eval[0] && m->eval[0]) {
                double e = fabs(l->evalv - m->evalv) / fabs(m->evalv);
                CHECK(e < S_TOL, "%s: %s step %" PRIu64 ": eval_loss %s, the reference %s",
                      r->name, w->id, l->step, l->eval, m->eval);
            }
        }
    }
    for (int s = 1; s <= steps; s++)
        CHECK(seen[s], "%s: step %d logged by no worker", r->name, s);
    fprintf(stderr, "  %s: worst relative loss difference to the 1-GPU reference %.3g\n",
            r->name, worst);
}

int main(void)
{
    int n = gpu_device_count();
    if (n < 2) {
        printf("gpu_ep: skipped: %d CUDA device(s), need 2 (%s)\n", n, n ? "" : semoe_err_msg());
        return 77;
    }
    test_init("gpu_ep");
    s_seed = train_util_begin(s_corpus);

    s_run_t ref, ep, el;
    bool ok = s_start(&ref, "ref-1gpu", 1, NULL, 0, S_STEPS) && s_finish(&ref);
    REQUIRE(ok, "the 1-GPU reference run failed");

    /* (1) experts split over two GPUs, NCCL */
    if (s_start(&ep, "ep-2gpu", 2, "nccl", 0, S_STEPS) && s_finish(&ep))
        s_against(&ep, &ref, S_STEPS);

    /* (2) a death and a join */
    if (s_start(&el, "crash-2gpu", 2, "nccl", 2, S_LONG) && s_wait(&el, 10, 0)) {
        uint64_t step = 0, gen = 0, g2 = 0;
        train_util_progress(el.w, el.n, &step, &gen);
        el.victim = 1;
        double t_kill = s_now();
        CHECK(proc_kill(el.w[1].proc), "cannot kill %s", el.w[1].id);
        /* the survivor alone: a step of a newer generation */
        bool back = s_wait(&el, step + 1, gen + 1);
        if (back) {
            fprintf(stderr, "  crash-2gpu: the survivor trained again %.2f s after the kill "
                    "(it was in generation %" PRIu64 ")\n", s_now() - t_kill, gen);
            train_util_progress(el.w, el.n, &step, &g2);
        }
        /* a worker joins on the freed GPU: it trains in a generation of two */
        bool joined = back && train_util_start_worker_on(&el.w[el.n], "crash-2gpu-join", 2,
                                                         &el.pp, "cuda:1");
        if (joined) {
            el.n++;
            CHECK(s_wait(&el, step + 1, g2 + 1), "crash-2gpu: no generation after the join");
        }
        if (s_finish(&el)) {
            s_against(&el, &ref, S_LONG);
            const train_util_worker_t *j = joined ? &el.w[el.n - 1] : NULL;
            bool two = false;
            for (int k = 0; j && k < j->n; k++)
                two |= j->line[k].world == 2;
            CHECK(two, "crash-2gpu: the joining worker logged no step of a world of 2");
        }
    }
    return test_finish();
}
