/* Coordinator restart (fault), with the real daemons on loopback and the tiny job of
 * train_util.h: a coordinator with --state-dir is killed with kill -9 in the middle of a 40-step
 * job on 3 workers and started again on the same directory and ports; it takes the job up (the
 * same run, the workers keep their state, a new generation with the placement as it was) and the
 * job ends as an uninterrupted run of it does: every worker's loss of every step within 1e-5 of
 * the reference's, no step lost or repeated, every process exits 0. With a worker killed too,
 * the restarted coordinator counts it dead after the liveness (or, when a new process with its
 * id joins, at once) and the others finish the job from the last checkpoint. A fresh directory
 * gets a state file and is locked; a damaged, foreign-version, other-job or inconsistent state
 * stops the coordinator with exit 2, naming the file, which is left as it was; without --config
 * the saved job is taken. docs/control-plane.md, "Coordinator restart". */
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <string.h>
#include <sys/stat.h>

#include "actors/err.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"
#include "tests/train_util.h"

#define S_STEPS 40
#define S_EVAL 5
#define S_CKPT 10
#define S_WORKERS 3
/* The coordinator is killed once a worker logged this step. The workers train on without it
 * (their steps need no coordinator) until it is back: early enough that they are still at it. */
#define S_KILL_AT 8
#define S_REL_TOL 1e-5     /* every step's loss and eval loss against the reference */
#define S_START_MS 15000   /* for a coordinator's status socket to answer */
#define S_STEP_MS 30000    /* for a run to reach a step */
#define S_RUN_MS 60000     /* for a run to end, the coordinator's exit included */
#define S_EXIT_MS 15000    /* a worker's exit once its coordinator is gone */
#define S_BAD_MS 10000     /* a coordinator refusing its state directory */

static uint64_t s_seed;
static char s_corpus[PATH_MAX];
static char s_control_ep[64]; /* the run's, for a worker started again (s_start_again) */

/* One run of the job: its coordinator (started again after a kill), its workers, its files. */
typedef struct {
    const char *name;
    char job[PATH_MAX], ck[PATH_MAX], state[PATH_MAX], log[PATH_MAX];
    proc_ports_t pp;
    proc_t *coord;
    train_util_worker_t w[S_WORKERS];
} s_run_t;

/* The number after the last `prefix` in p's stderr, or -1 when there is none. */
static long long s_log_num(const proc_t *p, const char *prefix)
{
    char *text = proc_read_file(proc_err_path(p), NULL);
    long long v = -1;
    for (const char *at = text ? strstr(text, prefix) : NULL; at; at = strstr(at + 1, prefix))
        v = strtoll(at + strlen(prefix), NULL, 10);
    free(text);
    return v;
}

/* <run's state dir>/state.json into buf. */
static char *s_state_file(const s_run_t *r, char *buf)
{
    return train_util_join(buf, PATH_MAX, r->state, "state.json");
}

/* Starts r's coordinator (its label: "<run>-<what>") on its ports with --state-dir and
 * --metrics-log and waits for its status socket. */
static bool s_start_coord(s_run_t *r, const char *what)
{
    char label[64];
    snprintf(label, sizeof label, "%s-%s", r->name, what);
    const char *extra[] = {"--state-dir", r->state, "--metrics-log", r->log, NULL};
    r->coord = proc_start_coordinator(label, r->job, &r->pp, extra);
    cJSON *st = r->coord ? test_status_wait(r->pp.status_ep, test_status_any, NULL, S_START_MS,
                                            20) : NULL;
    CHECK(st != NULL, "%s: %s does not answer on %s", r->name, label, r->pp.status_ep);
    cJSON_Delete(st);
    return st != NULL;
}

/* A second coordinator on r's state dir (on other ports) while r's runs: exit 2, naming the
 * lock. */
static void s_check_lock(const s_run_t *r)
{
    proc_ports_t pp;
    CHECK(proc_ports_pick(&pp), "no free ports");
    proc_t *p = NULL;
    int code = proc_run(&p, S_BAD_MS, "second-coordinator", PROC_COORDINATOR, "--config", r->job,
                        "--state-dir", r->state, "--bind", pp.control_ep, "--status",
                        pp.status_ep, "--metrics", pp.metrics_addr, NULL);
    CHECK(code == 2 && p && train_util_output_has(p, "another coordinator uses it"), "%s: a "
          "second coordinator on %s exited %d, want 2 saying another one uses it", r->name,
          r->state, code);
}

/* Writes r's job (its own checkpoint root), makes its empty state dir, picks its ports, and
 * starts its coordinator (and, in the reference, checks the state dir's lock while it waits for
 * its workers) and workers. */
static bool s_start(s_run_t *r, const char *name)
{
    memset(r, 0, sizeof *r);
    r->name = name;
    char file[96];
    snprintf(file, sizeof file, "%s-ckpt", name);
    proc_tmp_path(r->ck, sizeof r->ck, file);
    snprintf(file, sizeof file, "%s-state", name);
    proc_tmp_path(r->state, sizeof r->state, file);
    snprintf(file, sizeof file, "%s.json", name);
    proc_tmp_path(r->job, sizeof r->job, file);
    snprintf(file, sizeof file, "%s-coordinator.jsonl", name);
    proc_tmp_path(r->log, sizeof r->log, file);
    train_util_job_t job = {.seed = s_seed, .corpus = s_corpus, .checkpoint_dir = r->ck,
                            .steps = S_STEPS, .eval_interval = S_EVAL,
                            .checkpoint_interval = S_CKPT, .expected_workers = S_WORKERS,
                            .threshold = 1e9};
    CHECK(train_util_write_job(r->job, &job), "%s: cannot write %s", name, r->job);
    CHECK(mkdir(r->state, 0755) == 0, "%s: cannot make %s", name, r->state);
    if (!proc_ports_pick(&r->pp) || !s_start_coord(r, "coordinator"))
        return false;
    if (strcmp(name, "reference") == 0)
        s_check_lock(r);
    for (int i = 0; i < S_WORKERS; i++)
        if (!train_util_start_worker(&r->w[i], name, i, &r->pp))
            return false;
    return true;
}

/* Polls the workers' logs until one logged step `want`. */
static bool s_wait_step(const s_run_t *r, uint64_t want)
{
    uint64_t step = 0, gen = 0;
    int64_t deadline = proc_now_ms() + S_STEP_MS;
    while (step < want && proc_now_ms() < deadline && proc_running(r->coord)) {
        train_util_progress(r->w, S_WORKERS, &step, &gen);
        proc_sleep_ms(2);
    }
    CHECK(step >= want, "%s: step %" PRIu64 " never logged (the most: %" PRIu64 ")", r->name, want,
          step);
    return step >= want;
}

/* Waits for the coordinator to exit 0, then every worker but `skip` (killed: no exit code),
 * and reads their logs. */
static bool s_finish(s_run_t *r, int skip)
{
    int st = 0;
    bool exited = proc_wait(r->coord, S_RUN_MS, &st);
    CHECK(exited && proc_exit_code(st) == 0, "%s: the coordinator %s", r->name,
          exited ? "exited with another code than 0" : "still runs");
    bool ok = exited && proc_exit_code(st) == 0;
    for (int i = 0; i < S_WORKERS; i++) {
        if (i == skip)
            continue;
        bool gone = proc_wait(r->w[i].proc, S_EXIT_MS, &st);
        CHECK(gone && proc_exit_code(st) == 0, "%s: worker %s %s", r->name, r->w[i].id,
              gone ? "exited with another code than 0" : "still runs after its coordinator");
        ok = ok && gone && proc_exit_code(st) == 0 && train_util_read_log(&r->w[i], r->name);
    }
    return ok;
}

/* The saved state of r, parsed (caller's), or NULL. */
static cJSON *s_read_state(const s_run_t *r)
{
    char path[PATH_MAX];
    char *text = proc_read_file(s_state_file(r, path), NULL);
    cJSON *st = text ? cJSON_Parse(text) : NULL;
    free(text);
    CHECK(st != NULL, "%s: %s is missing or not JSON", r->name, path);
    return st;
}

/* --- checks --------------------------------------------------------------------------------- */

/* Every worker of r logged steps 1..S_STEPS, one line each in order, each loss (and eval loss)
 * within S_REL_TOL of the reference's line of its step. Returns the largest relative
 * difference. */
static double s_check_losses(const s_run_t *r, const s_run_t *ref)
{
    double worst = 0;
    const train_util_worker_t *rw = &ref->w[0];
    for (int i = 0; i < S_WORKERS; i++) {
        const train_util_worker_t *w = &r->w[i];
        CHECK(w->n == S_STEPS, "%s: %s logged %d lines, want %d (one per step)", r->name, w->id,
              w->n, S_STEPS);
        for (int k = 0; k < w->n; k++) {
            const train_util_line_t *l = &w->line[k], *rl = train_util_find_step(rw, l->step);
            CHECK(l->step == (uint64_t)k + 1, "%s: %s line %d is of step %" PRIu64 ", want %d "
                  "(a step lost or repeated)", r->name, w->id, k + 1, l->step, k + 1);
            if (!rl)
                continue;
            double d = fabs(l->lossv - rl->lossv) / fabs(rl->lossv);
            worst = d > worst || isnan(d) ? d : worst;
            CHECK(d < S_REL_TOL, "%s: %s step %" PRIu64 " (generation %" PRIu64 "): loss %s, "
                  "the reference %s: relative difference %.3g", r->name, w->id, l->step,
                  l->generation, l->loss, rl->loss, d);
            if (l->eval[0] && rl->eval[0]) {
                double e = fabs(l->evalv - rl->evalv) / fabs(rl->evalv);
                worst = e > worst || isnan(e) ? e : worst;
                CHECK(e < S_REL_TOL, "%s: %s step %" PRIu64 ": eval_loss %s, the reference %s",
                      r->name, w->id, l->step, l->eval, rl->eval);
            }
        }
    }
    return worst;
}

/* The reference: the same job, uninterrupted; its fresh state dir gets a state file that says,
 * at the end, that the job was stopped. */
static bool s_reference(s_run_t *ref)
{
    if (!s_start(ref, "reference") || !s_finish(ref, -1))
        return false;
    bool ok = train_util_check_uninterrupted("reference", ref->w, S_WORKERS, S_STEPS);
    cJSON *st = s_read_state(ref);
    CHECK(st && test_status_num(st, "version") == 1 && cJSON_IsTrue(cJSON_GetObjectItem(st,
          "stopped")) && test_status_num(st, "generation") >= 1, "reference: the state file "
          "lacks version 1, stopped true or a generation");
    cJSON_Delete(st);
    return ok;
}

/* Kill -9 of the coordinator after step S_KILL_AT, started again on the same state dir and
 * ports: the job goes on in the same run, from a newer generation, to the reference's losses. */
static void s_restart(const s_run_t *ref)
{
    static s_run_t r;
    if (!s_start(&r, "restart") || !s_wait_step(&r, S_KILL_AT))
        return;
    cJSON *before = test_status_query(r.pp.status_ep, 2000);
    char run[24] = "?";
    snprintf(run, sizeof run, "%s", before && test_status_run_id(before) ?
             test_status_run_id(before) : "?");
    long long gen_before = before ? test_status_generation(before) : -1;
    cJSON_Delete(before);
    uint64_t killed_at = 0, gen = 0;
    train_util_progress(r.w, S_WORKERS, &killed_at, &gen);
    int64_t t_kill = proc_now_ms();
    CHECK(proc_kill(r.coord), "restart: cannot kill the coordinator");
    bool up = s_start_coord(&r, "coordinator-again");
    int64_t t_up = proc_now_ms();
    if (!up)
        return;
    bool done = s_finish(&r, -1);
    fprintf(stderr, "restart: killed at step %" PRIu64 " (generation %lld, run %s); started again "
            "%.0f ms later\n", killed_at, gen_before, run, (double)(t_up - t_kill));
    if (!done)
        return;
    double worst = s_check_losses(&r, ref);
    /* The restart's generation resumed at the step the workers paused at; every step after it
     * was trained in that generation (on a loaded machine the workers may have finished the job
     * before the coordinator was back: then there is none). */
    long long resumed = s_log_num(r.coord, "acked: RESUME at step ");
    CHECK(resumed >= S_KILL_AT, "restart: the new coordinator's log has no RESUME after step %d",
          S_KILL_AT);
    for (int i = 0; i < S_WORKERS; i++)
        for (int k = 0; k < r.w[i].n; k++) {
            const train_util_line_t *l = &r.w[i].line[k];
            CHECK(resumed < 0 || (long long)l->step <= resumed ||
                      (long long)l->generation > gen_before,
                  "restart: %s logged step %" PRIu64 " in generation %" PRIu64 ", after the "
                  "restart's RESUME at step %lld", r.w[i].id, l->step, l->generation, resumed);
        }
    if (resumed >= S_STEPS)
        fprintf(stderr, "restart: NOTE: the workers finished before the coordinator was back; "
                "no step was trained in the restart's generation\n");
    for (int i = 0; i < S_WORKERS; i++) {
        CHECK(!train_util_output_has(r.w[i].proc, "run changed"), "restart: %s saw another run",
              r.w[i].id);
        CHECK(!train_util_output_has(r.w[i].proc, "rewinds to the checkpoint"), "restart: %s "
              "rewound to a checkpoint", r.w[i].id);
    }
    CHECK(train_util_output_has(r.coord, "(the placement kept)"), "restart: the restart's plan "
          "did not keep the placement");
    cJSON *st = s_read_state(&r);
    const char *saved_run = st ? test_status_str(st, "run_id") : NULL;
    CHECK(saved_run && strcmp(saved_run, run) == 0, "restart: the saved run is %s, was %s",
          saved_run ? saved_run : "?", run);
    CHECK(st && test_status_counter(st, "restarts") == 1 &&
              test_status_num(st, "generation") > gen_before,
          "restart: the state file counts %lld restarts (want 1), generation %lld (want > %lld)",
          st ? test_status_counter(st, "restarts") : -1,
          st ? test_status_num(st, "generation") : -1, gen_before);
    cJSON_Delete(st);
    fprintf(stderr, "restart: every worker logged steps 1..%d once; the restart's generation "
            "resumed at step %lld; max relative loss difference %.3g\n", S_STEPS, resumed, worst);
}

/* Starts worker w again: a new process with its id and metrics log (appended to). */
static bool s_start_again(train_util_worker_t *w)
{
    char label[64];
    snprintf(label, sizeof label, "%s-again", w->id);
    const char *argv[] = {"--coordinator", s_control_ep, "--id", w->id, "--device", "cpu",
                          "--data-bind", "tcp://127.0.0.1:*", "--threads", "1",
                          "--metrics-log", w->log};
    w->proc = proc_startv(label, PROC_WORKER, (int)(sizeof argv / sizeof argv[0]), argv);
    return w->proc != NULL;
}

/* Kill -9 of the coordinator and of a worker after step S_KILL_AT, the coordinator started
 * again. Lost: the dead one is not back within the liveness and dies the normal way after the
 * restart. Replaced (`replace`): a new process with its id joins the restarted coordinator,
 * which counts the old one dead and the new one a join. Either way the survivors rewind to the
 * last checkpoint (or the start) and finish the job. Two workers sum in another order than
 * three: the losses are held to S_FLIP_TOL (a near tie of the router decided the other way by
 * float rounding drifts them apart by about 1e-5, test_elastic.c); lost or stale state is off
 * by far more. */
#define S_FLIP_TOL 1e-4
static void s_restart_lost(const s_run_t *ref, bool replace)
{
    static s_run_t runs[2];
    s_run_t *r = &runs[replace];
    const char *name = replace ? "replaced" : "lost";
    if (!s_start(r, name) || !s_wait_step(r, S_KILL_AT))
        return;
    int victim = (int)test_rand_below(S_WORKERS);
    CHECK(proc_kill(r->coord) && proc_kill(r->w[victim].proc), "%s: cannot kill", name);
    snprintf(s_control_ep, sizeof s_control_ep, "%s", r->pp.control_ep);
    if (replace)
        CHECK(s_start_again(&r->w[victim]), "%s: cannot start %s again", name, r->w[victim].id);
    if (!s_start_coord(r, "coordinator-again") || !s_finish(r, replace ? -1 : victim))
        return;
    char said[160];
    snprintf(said, sizeof said, replace ? "worker %s: another process" : "worker %s: not back",
             r->w[victim].id);
    CHECK(train_util_output_has(r->coord, said), "%s: the coordinator's log lacks \"%s\"", name,
          said);
    double worst = 0;
    for (int i = 0; i < S_WORKERS; i++) {
        const train_util_worker_t *w = &r->w[i];
        if (i == victim && !replace)
            continue;
        CHECK(w->n > 0 && w->line[w->n - 1].step == S_STEPS, "%s: %s ended at step %" PRIu64
              ", want %d", name, w->id, w->n ? w->line[w->n - 1].step : 0, S_STEPS);
        for (int k = 0; k < w->n; k++) {
            const train_util_line_t *l = &w->line[k];
            const train_util_line_t *rl = train_util_find_step(&ref->w[0], l->step);
            double d = rl ? fabs(l->lossv - rl->lossv) / fabs(rl->lossv) : INFINITY;
            worst = d > worst || isnan(d) ? d : worst;
            CHECK(d < S_FLIP_TOL, "%s: %s step %" PRIu64 " (generation %" PRIu64 "): loss %s, "
                  "the reference %s", name, w->id, l->step, l->generation, l->loss,
                  rl ? rl->loss : "none");
        }
    }
    fprintf(stderr, "%s: %s killed with the coordinator%s; the job finished, max relative loss "
            "difference %.3g\n", name, r->w[victim].id, replace ? " and started again" : "",
            worst);
}

/* --- state files the coordinator must refuse ------------------------------------------------ */

/* A state dir holding text as state.json: the coordinator (with job) exits 2 naming the file
 * and saying `want`, and leaves the file as it was. */
static void s_refused(const char *name, const char *job, const char *text, const char *want)
{
    char dir[PATH_MAX], path[PATH_MAX];
    proc_tmp_path(dir, sizeof dir, name);
    train_util_join(path, sizeof path, dir, "state.json");
    if (mkdir(dir, 0755) != 0 || !proc_write_file(path, text)) {
        CHECK(false, "%s: cannot write %s", name, path);
        return;
    }
    proc_ports_t pp;
    CHECK(proc_ports_pick(&pp), "no free ports");
    proc_t *p = NULL;
    int code = proc_run(&p, S_BAD_MS, name, PROC_COORDINATOR, "--config", job, "--state-dir", dir,
                        "--bind", pp.control_ep, "--status", pp.status_ep, "--metrics",
                        pp.metrics_addr, NULL);
    char *after = proc_read_file(path, NULL);
    char *err = p ? proc_read_file(proc_err_path(p), NULL) : NULL;
    CHECK(code == 2, "%s: the coordinator exited %d, want 2", name, code);
    CHECK(err && strstr(err, path) && strstr(err, want), "%s: its message does not name %s and "
          "say \"%s\": %s", name, path, want, err ? err : "(none)");
    CHECK(after && strcmp(after, text) == 0, "%s: %s was changed", name, path);
    fprintf(stderr, "%s: exit %d: %s", name, code, err ? err : "\n");
    free(after);
    free(err);
}

/* A truncated file, another version, another job (the restart run's state with the reference's
 * job, whose checkpoint_dir differs), a placement with a hole. */
static void s_bad_states(const s_run_t *ref)
{
    static s_run_t r; // the restart run's files, written by s_restart
    char path[PATH_MAX];
    snprintf(r.state, sizeof r.state, "%s/restart-state", proc_tmp_dir());
    char *good = proc_read_file(s_state_file(&r, path), NULL);
    if (!good) {
        CHECK(false, "no state file of the restart run at %s", path);
        return;
    }
    char job[PATH_MAX];
    proc_tmp_path(job, sizeof job, "restart.json");
    size_t len = strlen(good);
    char *cut = semoe_xstrdup(good);
    cut[len / 2] = 0;
    s_refused("truncated", job, cut, "not JSON");
    char *ver = semoe_xstrdup(good);
    char *at = strstr(ver, "\"version\":");
    if (at)
        at[strcspn(at, "1")] = '7'; // version 7
    s_refused("version", job, ver, "version 7");
    s_refused("other-job", ref->job, good, "the job differs");
    char *hole = semoe_xstrdup(good);
    at = strstr(hole, "\"holders\":");
    char *digit = at ? at + strcspn(at, "0123456789") : NULL;
    if (digit)
        *digit = '9'; // a rank out of the world
    s_refused("placement", job, hole, "placement");
    free(hole);
    free(ver);
    free(cut);
    free(good);
}

/* Without --config, a coordinator takes the saved job (and run) of a stopped state: its status
 * says so; SIGTERM, exit 0; the state then counts one more restart. */
static void s_saved_job(void)
{
    static s_run_t r; // the restart run's files
    snprintf(r.state, sizeof r.state, "%s/restart-state", proc_tmp_dir());
    r.name = "saved-job";
    cJSON *saved = s_read_state(&r);
    const char *run = saved ? test_status_str(saved, "run_id") : NULL;
    long long restarts = saved ? test_status_counter(saved, "restarts") : -1;
    proc_ports_t pp;
    CHECK(proc_ports_pick(&pp), "no free ports");
    const char *argv[] = {"--state-dir", r.state, "--bind", pp.control_ep, "--status",
                          pp.status_ep, "--metrics", pp.metrics_addr};
    proc_t *p = proc_startv("saved-job", PROC_COORDINATOR, 8, argv);
    cJSON *st = p ? test_status_wait(pp.status_ep, test_status_any, NULL, S_START_MS, 20) : NULL;
    CHECK(st && run && test_status_run_id(st) && strcmp(test_status_run_id(st), run) == 0 &&
              test_status_num(st, "target_steps") == S_STEPS &&
              test_status_counter(st, "restarts") == restarts + 1,
          "saved-job: the status shows run %s, %lld target steps, %lld restarts; want the saved "
          "run %s, %d and %lld", st ? test_status_run_id(st) : "?",
          st ? test_status_num(st, "target_steps") : -1,
          st ? test_status_counter(st, "restarts") : -1, run ? run : "?", S_STEPS, restarts + 1);
    int code = -1;
    if (p && proc_signal(p, SIGTERM) && proc_wait(p, S_EXIT_MS, &code))
        code = proc_exit_code(code);
    CHECK(code == 0, "saved-job: exit %d after SIGTERM, want 0", code);
    cJSON *after = s_read_state(&r);
    CHECK(after && test_status_counter(after, "restarts") == restarts + 1, "saved-job: the state "
          "counts %lld restarts, want %lld", after ? test_status_counter(after, "restarts") : -1,
          restarts + 1);
    cJSON_Delete(after);
    cJSON_Delete(st);
    cJSON_Delete(saved);
}

int main(void)
{
    test_init("coord_restart");
    proc_init("coord_restart");
    s_seed = train_util_begin(s_corpus);
    int64_t t0 = proc_now_ms();
    static s_run_t ref;
    REQUIRE(s_reference(&ref), "the uninterrupted run did not complete");
    int64_t t1 = proc_now_ms();
    s_restart(&ref);
    s_restart_lost(&ref, false);
    s_restart_lost(&ref, true);
    int64_t t2 = proc_now_ms();
    s_bad_states(&ref);
    s_saved_job();
    fprintf(stderr, "  reference %.1f s, restart %.1f s, refusals %.1f s\n",
            (double)(t1 - t0) / 1000.0, (double)(t2 - t1) / 1000.0,
            (double)(proc_now_ms() - t2) / 1000.0);
    return test_finish();
}
