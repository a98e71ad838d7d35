/* Chaos (fault) with the real daemons on loopback: a 4-worker run of the tiny job of train_util.h
 * over more than two epochs of its (shortened) corpus suffers kill -9s of random workers at
 * random moments (while training, as a checkpoint is written, during the reconfiguration of a
 * join, while the survivors of the previous kill are still rewinding), each followed by the join
 * of a fresh worker. It must end as an uninterrupted 4-worker run of the same job does: every
 * step done, every process exited 0, the same final weights and optimizer state, the same
 * losses, and every training sample trained on exactly once per epoch by the steps that count
 * (for each step, its last execution). DESIGN.md "Elasticity", docs/training.md "A generation".
 * SEMOE_CHAOS_KILLS sets the number of kills (default 10). */
#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "model/checkpoint.h"
#include "model/data.h"
#include "model/job.h"
#include "model/params.h"
#include "model/safetensors.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"
#include "tests/train_util.h"

#define S_WORKERS 4
#define S_KILLS 10          /* by default; SEMOE_CHAOS_KILLS */
#define S_MAX_KILLS 40
#define S_MAXW (S_WORKERS + S_MAX_KILLS)
#define S_CKPT 5            /* checkpoint_interval: a rewind repeats at most this many steps */
#define S_EVAL 20
#define S_KEPT 1024        /* checkpoints s_keep can keep */
/* The corpus is cut to about this many bytes (whole documents) so that an epoch is ~70 steps of
 * global batch 8, and the job runs S_EPOCHS_X2 / 2 epochs of it. */
#define S_CORPUS_BYTES 20000
#define S_EPOCHS_X2 5
/* Liveness: a kill -9 is noticed by heartbeat expiry after heartbeat_ms x liveness. */
#define S_HEARTBEAT_MS 100
#define S_LIVENESS 5

#define S_REL_TOL 1e-5      /* losses against the reference (test_elastic.c explains it) */
/* ... from a step whose routing flipped on a near tie: the runs drift apart from there as a
 * chaotic system does (one token routed otherwise at step 34 was 1.1e-4 off 8 steps on and
 * 1.8e-3 at the end; one at step 46 of 178 ended 9e-4 off, with the final weights 2.4e-2
 * apart). Only gross errors (a model reset, wrong data) show through that; the checkpoint
 * before the flip is held to the reference's instead (s_check_weights). */
#define S_DRIFT_TOL 1e-2
/* Checkpoints against the reference's: |a - b| / |a| over all the weights, and of each tensor.
 * Ten times test_elastic's: this run is four times longer, its generations have 3 to 5 ranks
 * and replicas of hot experts (other partial sums than the reference's), and a gradient spike
 * amplifies the rounding: after one of norm 4.8 (clipped) at step 160 of 174, 2.2e-6 over all
 * weights and 2.6e-5 in the expert it hit were seen, at losses within 1e-6 all along. A tensor
 * lost, reset or a step stale is off by more than 1e-3. */
#define S_WEIGHT_TOL 1e-5
#define S_TENSOR_TOL 1e-4
/* AdamW's moments of the final checkpoint against the reference's, |a - b| / |a| over all of
 * each: a lost or reset moment is off by O(1). The second moment squares the gradient's
 * rounding, and a rare token's row of embed_tokens nearly cancels: looser than the weights. */
#define S_MOMENT_TOL 1e-3
#define S_WAIT_MS 30000     /* for the condition a kill waits on */
#define S_RUN_MS 120000     /* for a run to end, the coordinator's exit included */
#define S_EXIT_MS 15000     /* for a worker's exit once its coordinator is gone */

static uint64_t s_seed;
static char s_corpus[PATH_MAX];
static int s_steps;         /* train.steps */
static uint64_t s_samples;  /* training samples: an epoch */
static model_data_t *s_data;
static model_job_t *s_job;

/* What the test has read of a worker's metrics log so far (whole lines only). */
typedef struct {
    long off;
    uint64_t gen, step;     /* of its last line */
    long long rank;
} s_tail_t;

/* One run of the job: its coordinator, its workers and what their logs said so far. */
typedef struct {
    const char *name;
    char job[PATH_MAX], ck[PATH_MAX];
    proc_ports_t pp;
    proc_t *coord;
    int n;                          /* workers started */
    train_util_worker_t w[S_MAXW];
    bool killed[S_MAXW];
    s_tail_t tail[S_MAXW];
    uint64_t gen;                   /* the newest generation in a line */
    uint64_t gen_step;              /* the most steps logged in it */
    long long gen_world;
    double gen_first;               /* the time of its first line read (Unix s) */
    int64_t last_line_ms;           /* when s_poll last read a line (proc_now_ms) */
    char kept[PATH_MAX];            /* hard links to every checkpoint seen (s_keep) */
    ino_t kept_ino[S_KEPT];         /* the model file of step-N kept, by N / S_CKPT */
    char *err[S_MAXW];              /* the workers' stderr, once they are gone */
} s_run_t;

/* When a kill comes. */
typedef enum {
    S_AT_STEP,     /* the job resumed on 4 workers after the previous kill, then at a step */
    S_AT_CKPT,     /* ... then as a step that writes a checkpoint is logged (the writer: 1/2) */
    S_IN_JOIN,     /* as soon as the previous joiner is a member: its reconfiguration */
    S_OVERLAP,     /* as soon as the previous victim was declared dead: during the pause */
    S_IN_SYNC,     /* as soon as the coordinator waits for the ACKs of a PLAN newer than the
                    * previous kill: while the workers migrate or rewind */
    S_AT_END,      /* (the last kill, 1/2) as the last step runs and its checkpoint is written
                    * (the writer: 1/2) */
} s_mode_t;

static const char *s_mode_names[] = {"training", "checkpoint", "join", "overlap", "migration",
                                     "last step"};

typedef struct {
    s_mode_t mode;
    int victim, joiner;             /* worker indices */
    long long victim_rank;          /* its rank in the newest generation (-1: none) */
    double time;                    /* Unix seconds */
    uint64_t step, gen;             /* the job's newest generation and its steps at the kill */
    uint64_t latest;                /* the checkpoint <root>/latest named then (0: none) */
    /* from the logs afterwards: the first generation that trained without the victim */
    uint64_t resume_gen, resume_from; /* its generation, and the step its state had */
    double resume_ms;               /* from the kill to its first line (-1: none) */
} s_kill_t;

static double s_unix_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* --- the job -------------------------------------------------------------------------------- */

/* The test's corpus (train_util_write_corpus) cut after the first document that ends past
 * S_CORPUS_BYTES: a short epoch, so that the job spans several. */
static bool s_write_corpus(const char *path)
{
    if (!train_util_write_corpus(path))
        return false;
    char *text = proc_read_file(path, NULL);
    char *cut = text ? strstr(text + S_CORPUS_BYTES, "\n%\n") : NULL;
    if (cut)
        cut[3] = 0;
    bool ok = cut && proc_write_file(path, text);
    free(text);
    return ok;
}

static void s_job_spec(train_util_job_t *job, const char *ck)
{
    *job = (train_util_job_t){.seed = s_seed, .corpus = s_corpus, .checkpoint_dir = ck,
                              .steps = s_steps, .eval_interval = S_EVAL,
                              .checkpoint_interval = S_CKPT, .expected_workers = S_WORKERS,
                              .threshold = 1e9, .heartbeat_ms = S_HEARTBEAT_MS,
                              .liveness = S_LIVENESS};
}

/* Opens the job's data as the workers do (model/data.h) and sizes the run: S_EPOCHS_X2 / 2
 * epochs of global batches. */
static bool s_open_data(void)
{
    char path[PATH_MAX];
    proc_tmp_path(path, sizeof path, "probe.json");
    s_steps = 1;
    train_util_job_t job;
    s_job_spec(&job, "");
    if (!train_util_write_job(path, &job) || model_job_load(path, &s_job) != SEMOE_OK ||
        model_data_open(s_job, &s_data) != SEMOE_OK) {
        fprintf(stderr, "chaos: the job's data: %s\n", semoe_err_msg());
        return false;
    }
    s_samples = model_data_samples(s_data, MODEL_DATA_TRAIN);
    uint64_t rows = s_samples * S_EPOCHS_X2 / 2;
    s_steps = (int)((rows + TRAIN_UTIL_BATCH - 1) / TRAIN_UTIL_BATCH);
    return true;
}

/* --- runs ----------------------------------------------------------------------------------- */

static bool s_start(s_run_t *r, const char *name)
{
    memset(r, 0, sizeof *r);
    r->name = name;
    char file[96];
    snprintf(file, sizeof file, "%s-ckpt", name);
    proc_tmp_path(r->ck, sizeof r->ck, file);
    snprintf(file, sizeof file, "%s.json", name);
    proc_tmp_path(r->job, sizeof r->job, file);
    snprintf(file, sizeof file, "%s-kept", name);
    proc_tmp_path(r->kept, sizeof r->kept, file);
    mkdir(r->kept, 0755);
    train_util_job_t job;
    s_job_spec(&job, r->ck);
    return train_util_start_run(name, r->job, &job, &r->pp, &r->coord, r->w, S_WORKERS, &r->n);
}

static bool s_add_worker(s_run_t *r)
{
    if (r->n == S_MAXW || !train_util_start_worker(&r->w[r->n], r->name, r->n, &r->pp))
        return false;
    r->n++;
    return true;
}

/* The number after "key": in a metrics line (-1 when absent). */
static double s_field(const char *line, const char *key)
{
    char pat[32];
    snprintf(pat, sizeof pat, "\"%s\":", key);
    const char *p = strstr(line, pat);
    return p ? strtod(p + strlen(pat), NULL) : -1;
}

/* Hard-links the regular files of dir src (and of its semoe/) into dst; false when one could
 * not be (a checkpoint removed meanwhile). */
static bool s_link_tree(const char *src, const char *dst, int depth)
{
    DIR *d = opendir(src);
    bool ok = d && (mkdir(dst, 0755) == 0 || errno == EEXIST);
    struct dirent *e;
    while (ok && (e = readdir(d))) {
        char a[PATH_MAX], b[PATH_MAX];
        train_util_join(a, sizeof a, src, e->d_name);
        train_util_join(b, sizeof b, dst, e->d_name);
        struct stat st;
        if (e->d_name[0] == '.' || stat(a, &st) != 0)
            continue;
        if (S_ISDIR(st.st_mode))
            ok = depth == 0 && strcmp(e->d_name, "semoe") == 0 ? s_link_tree(a, b, 1) : ok;
        else if (unlink(b) == 0 || errno == ENOENT) /* b: an older write of the step */
            ok = link(a, b) == 0;
    }
    if (d)
        closedir(d);
    return ok;
}

/* Hard-links every whole checkpoint under the run's root that it has not kept yet (or that was
 * written again: a step repeated after a rewind) into <kept>/step-N, since the trainer keeps
 * only the newest few: the weights at a routing flip's step are compared from there. A copy
 * that raced with the trainer's cleanup fails verification later and is skipped. */
static void s_keep(s_run_t *r)
{
    DIR *d = opendir(r->ck);
    struct dirent *e;
    while (d && (e = readdir(d))) {
        unsigned step;
        char tail;
        if (sscanf(e->d_name, "step-%8u%c", &step, &tail) != 1 || step % S_CKPT ||
            step / S_CKPT >= S_KEPT)
            continue;
        char src[PATH_MAX], dst[PATH_MAX], model[PATH_MAX];
        train_util_step_dir(src, r->ck, (int)step);
        train_util_step_dir(dst, r->kept, (int)step);
        struct stat st;
        if (stat(train_util_join(model, sizeof model, src, MODEL_ST_SINGLE), &st) != 0 ||
            st.st_ino == r->kept_ino[step / S_CKPT])
            continue;
        r->kept_ino[step / S_CKPT] = s_link_tree(src, dst, 0) ? st.st_ino : 0;
    }
    if (d)
        closedir(d);
}

/* Reads the lines the run's workers appended since the last call: r->gen, gen_step and the
 * tails follow them. */
static void s_poll(s_run_t *r)
{
    static char buf[1 << 16];
    s_keep(r);
    for (int i = 0; i < r->n; i++) {
        s_tail_t *t = &r->tail[i];
        FILE *f = fopen(r->w[i].log, "r");
        if (!f)
            continue;
        size_t got;
        while (fseek(f, t->off, SEEK_SET) == 0 && (got = fread(buf, 1, sizeof buf - 1, f)) > 0) {
            buf[got] = 0;
            char *line = buf, *end;
            while ((end = strchr(line, '\n'))) {
                *end = 0;
                t->gen = (uint64_t)s_field(line, "generation");
                t->step = (uint64_t)s_field(line, "step");
                t->rank = (long long)s_field(line, "rank");
                if (t->gen > r->gen) {
                    r->gen = t->gen;
                    r->gen_step = t->step;
                    r->gen_world = (long long)s_field(line, "world");
                    r->gen_first = s_field(line, "time");
                } else if (t->gen == r->gen && t->step > r->gen_step) {
                    r->gen_step = t->step;
                }
                r->last_line_ms = proc_now_ms();
                line = end + 1;
            }
            if (line == buf) /* a line longer than the buffer: not a metrics line */
                break;
            t->off += line - buf;
        }
        fclose(f);
    }
}

typedef bool (*s_cond_t)(s_run_t *r, const void *arg);

/* Polls the logs (s_poll) until cond holds; false after S_WAIT_MS (said why) or once the
 * coordinator exited (the job is over). */
static bool s_wait(s_run_t *r, s_cond_t cond, const void *arg, const char *what)
{
    int64_t deadline = proc_now_ms() + S_WAIT_MS;
    while (proc_now_ms() < deadline) {
        s_poll(r);
        if (cond(r, arg))
            return true;
        if (!proc_running(r->coord))
            return false;
        proc_sleep_ms(2);
    }
    CHECK(false, "%s: %s: not within %d s (newest generation %" PRIu64 " at step %" PRIu64
          ", world %lld)", r->name, what, S_WAIT_MS / 1000, r->gen, r->gen_step, r->gen_world);
    return false;
}

/* The job trains on S_WORKERS workers in a generation that started after the kill. */
static bool s_resumed(s_run_t *r, const void *arg)
{
    const s_kill_t *k = arg;
    return r->gen > k->gen && r->gen_first > k->time && r->gen_world == S_WORKERS;
}

static bool s_at_step(s_run_t *r, const void *arg)
{
    return r->gen_step >= *(const uint64_t *)arg;
}

/* A status predicate: worker id arg listed (listed true) or not (false). */
typedef struct {
    const char *id;
    bool listed;
} s_listed_t;

static bool s_listed(const cJSON *st, void *arg, char *why, size_t n)
{
    const s_listed_t *l = arg;
    if ((test_status_worker(st, l->id) != NULL) == l->listed)
        return true;
    snprintf(why, n, "%s %slisted", l->id, l->listed ? "not " : "");
    return false;
}

/* Waits for the coordinator to exit 0 and for every worker not killed to exit 0 after it, then
 * reads every worker's metrics log. False when one of that failed. */
static bool s_finish(s_run_t *r)
{
    int st = 0;
    int64_t deadline = proc_now_ms() + S_RUN_MS;
    r->last_line_ms = proc_now_ms();
    bool stalled = false;
    while (proc_running(r->coord) && proc_now_ms() < deadline && !stalled) {
        s_poll(r);
        stalled = proc_now_ms() - r->last_line_ms > S_WAIT_MS;
        proc_sleep_ms(2);
    }
    bool exited = proc_wait(r->coord, 0, &st);
    s_keep(r);
    CHECK(!stalled, "%s: no worker logged a step for %d s (the newest: step %" PRIu64 " of "
          "generation %" PRIu64 "): the job hangs", r->name, S_WAIT_MS / 1000, r->gen_step,
          r->gen);
    CHECK(exited || stalled, "%s: the coordinator still runs %d s on", r->name,
          S_RUN_MS / 1000);
    CHECK(!exited || proc_exit_code(st) == 0, "%s: the coordinator exited %d, want 0", r->name,
          proc_exit_code(st));
    bool ok = exited && proc_exit_code(st) == 0;
    if (!exited) { /* hung: everything goes, the logs say where */
        proc_kill(r->coord);
        for (int i = 0; i < r->n; i++)
            r->killed[i] = r->killed[i] || !proc_running(r->w[i].proc) || proc_kill(r->w[i].proc);
    }
    for (int i = 0; i < r->n; i++) {
        if (r->killed[i])
            continue;
        /* the last joiner may come after the job's end, when a kill hit its last step: it waits
         * for a coordinator then (as a worker does) and leaves on SIGTERM */
        bool late = i == r->n - 1 && i >= S_WORKERS && !proc_wait(r->w[i].proc, 2000, &st) &&
                    !train_util_output_has(r->w[i].proc, ": joined ");
        if (late) {
            fprintf(stderr, "%s: %s never joined before the job ended: SIGTERM\n", r->name,
                    r->w[i].id);
            proc_signal(r->w[i].proc, SIGTERM);
        }
        bool gone = proc_wait(r->w[i].proc, S_EXIT_MS, &st);
        CHECK(gone, "%s: worker %s still runs %d s after its coordinator exited", r->name,
              r->w[i].id, S_EXIT_MS / 1000);
        CHECK(!gone || proc_exit_code(st) == 0, "%s: worker %s exited %d, want 0", r->name,
              r->w[i].id, proc_exit_code(st));
        ok = ok && gone && proc_exit_code(st) == 0;
    }
    for (int i = 0; i < r->n; i++) {
        CHECK(!proc_running(r->w[i].proc), "%s: %s is still running", r->name, r->w[i].id);
        r->err[i] = proc_read_file(proc_err_path(r->w[i].proc), NULL);
        if (r->killed[i] && access(r->w[i].log, F_OK) != 0)
            continue; /* killed before its trainer opened the log */
        ok = train_util_read_log(&r->w[i], r->name) && ok;
    }
    CHECK(!proc_running(r->coord), "%s: the coordinator is still running", r->name);
    return ok;
}

/* --- the runs ------------------------------------------------------------------------------- */

/* The uninterrupted run: every worker logs steps 1..s_steps once, with the same losses. */
static bool s_reference(s_run_t *ref)
{
    int64_t t0 = proc_now_ms();
    if (!s_start(ref, "reference") || !s_finish(ref))
        return false;
    bool ok = train_util_check_uninterrupted("reference", ref->w, ref->n, s_steps);
    fprintf(stderr, "reference: %d workers, %d steps in %.1f s, loss %s at step 1, %s at the "
            "last\n", ref->n, s_steps, (double)(proc_now_ms() - t0) / 1000.0,
            ref->w[0].line[0].loss, ok ? ref->w[0].line[s_steps - 1].loss : "?");
    return ok;
}

/* A random worker the test has not killed; with prefer_writer, rank 0 of the newest generation
 * when there is one. */
static int s_pick_victim(const s_run_t *r, bool prefer_writer)
{
    int live[S_MAXW], n = 0;
    for (int i = 0; i < r->n; i++) {
        if (r->killed[i])
            continue;
        if (prefer_writer && r->tail[i].gen == r->gen && r->tail[i].rank == 0)
            return i;
        live[n++] = i;
    }
    return live[test_rand_below((uint64_t)n)];
}

/* A status predicate: the coordinator waits for the ACKs of a PLAN newer than generation
 * *arg (its reconfiguration is "syncing"). */
static bool s_syncing(const cJSON *st, void *arg, char *why, size_t n)
{
    const char *rc = test_status_str(st, "reconfig");
    long long gen = test_status_generation(st);
    if (rc && strcmp(rc, "syncing") == 0 && gen > *(const long long *)arg)
        return true;
    snprintf(why, n, "reconfig %s in generation %lld", rc ? rc : "?", gen);
    return false;
}

/* Waits for the moment of kill k (after kill k - 1: prev; the step-moded ones at `floor` at the
 * earliest), then kills its victim and starts a joiner. False when the job ended first or a
 * wait timed out (said why). */
static bool s_kill(s_run_t *r, s_kill_t *k, const s_kill_t *prev, uint64_t floor)
{
    if (k->mode == S_AT_STEP || k->mode == S_AT_CKPT || k->mode == S_AT_END) {
        if (prev && !s_wait(r, s_resumed, prev, "resume on 4 workers after the kill"))
            return false;
        uint64_t at = r->gen_step + test_rand_below(3);
        at = at > floor ? at : floor;
        if (k->mode == S_AT_CKPT)
            at += (S_CKPT - at % S_CKPT) % S_CKPT;
        if (k->mode == S_AT_END)
            at = (uint64_t)s_steps - 1;
        else if (at >= (uint64_t)s_steps - 1)
            return false;
        if (!s_wait(r, s_at_step, &at, "the step a kill waits for"))
            return false;
    } else if (k->mode == S_IN_SYNC) {
        /* a short window: when the job resumed before a status showed it, the kill is one of
         * training at the step it reached */
        long long gen = (long long)prev->gen;
        char why[128];
        bool syncing = false, resumed = false;
        int64_t deadline = proc_now_ms() + S_WAIT_MS;
        while (!syncing && !resumed && proc_now_ms() < deadline && proc_running(r->coord)) {
            cJSON *st = test_status_query(r->pp.status_ep, 1000);
            syncing = st && s_syncing(st, &gen, why, sizeof why);
            cJSON_Delete(st);
            s_poll(r);
            resumed = !syncing && s_resumed(r, prev);
        }
        CHECK(syncing || resumed || !proc_running(r->coord), "%s: no PLAN after generation %lld "
              "within %d s", r->name, gen, S_WAIT_MS / 1000);
        if (resumed)
            k->mode = S_AT_STEP;
    } else {
        s_listed_t want = {.id = r->w[k->mode == S_IN_JOIN ? prev->joiner : prev->victim].id,
                           .listed = k->mode == S_IN_JOIN};
        cJSON *st = test_status_wait(r->pp.status_ep, s_listed, &want, S_WAIT_MS, 2);
        CHECK(st != NULL, "%s: %s was not %s within %d s", r->name, want.id,
              want.listed ? "a member" : "declared dead", S_WAIT_MS / 1000);
        cJSON_Delete(st);
        if (!st)
            return false;
        s_poll(r);
    }
    if ((k->mode != S_AT_END && r->gen_step >= (uint64_t)s_steps - 1) ||
        r->gen_step >= (uint64_t)s_steps || !proc_running(r->coord))
        return false;
    k->victim = s_pick_victim(r, (k->mode == S_AT_CKPT || k->mode == S_AT_END) &&
                                     test_rand_below(2));
    k->victim_rank = r->tail[k->victim].gen == r->gen ? r->tail[k->victim].rank : -1;
    k->step = r->gen_step;
    k->gen = r->gen;
    char dir[PATH_MAX];
    if (model_ckpt_latest(r->ck, dir, sizeof dir, &k->latest) != SEMOE_OK)
        k->latest = 0;
    k->time = s_unix_now();
    r->killed[k->victim] = proc_kill(r->w[k->victim].proc);
    CHECK(r->killed[k->victim], "%s: cannot kill %s", r->name, r->w[k->victim].id);
    k->joiner = r->n;
    CHECK(s_add_worker(r), "%s: cannot start a joiner", r->name);
    return r->killed[k->victim];
}

/* The chaos run: 4 workers, want kills, each followed by a join; the kills that wait for a step
 * are spread over the run (kill n not before step n x the run's steps / want, roughly), the
 * others follow the previous kill at once. Returns the kills done. */
static int s_chaos(s_run_t *r, s_kill_t *kills, int want)
{
    if (!s_start(r, "chaos"))
        return 0;
    uint64_t span = want ? ((uint64_t)s_steps - 2 * S_CKPT) / (uint64_t)want : 0;
    int n = 0;
    for (; n < want; n++) {
        s_kill_t *k = &kills[n];
        memset(k, 0, sizeof *k);
        uint64_t u = test_rand_below(20);
        k->mode = n == 0 || u < 5 ? S_AT_STEP : u < 10 ? S_AT_CKPT : u < 13 ? S_IN_JOIN
                                                               : u < 16 ? S_OVERLAP : S_IN_SYNC;
        if (n > 0 && n == want - 1 && test_rand_below(2))
            k->mode = S_AT_END;
        uint64_t floor = 1 + (uint64_t)n * span + test_rand_below(span ? span : 1);
        if (!s_kill(r, k, n ? &kills[n - 1] : NULL, floor))
            break;
        fprintf(stderr, "  kill %d (%s): %s (rank %lld of generation %" PRIu64 ") at step %"
                PRIu64 "; %s joins\n", n + 1, s_mode_names[k->mode], r->w[k->victim].id,
                k->victim_rank, k->gen, k->step, r->w[k->joiner].id);
    }
    return n;
}

/* --- checks --------------------------------------------------------------------------------- */

/* A line of a run and the worker that logged it. */
typedef struct {
    int w;
    const train_util_line_t *l;
} s_at_t;

/* The lines of the last execution of step s (1-based: steps done) in r: those of the newest
 * generation that logged it, into out (S_MAXW at most); returns how many. */
static int s_committed(const s_run_t *r, uint64_t s, s_at_t *out)
{
    uint64_t gen = 0;
    bool any = false;
    for (int i = 0; i < r->n; i++)
        for (int k = 0; k < r->w[i].n; k++)
            if (r->w[i].line[k].step == s && (!any || r->w[i].line[k].generation > gen)) {
                gen = r->w[i].line[k].generation;
                any = true;
            }
    int n = 0;
    for (int i = 0; any && i < r->n; i++)
        for (int k = 0; k < r->w[i].n; k++)
            if (r->w[i].line[k].step == s && r->w[i].line[k].generation == gen && n < S_MAXW)
                out[n++] = (s_at_t){i, &r->w[i].line[k]};
    return n;
}

/* Worker i's plan of generation gen, from its log (worker_plan_log): its rank, its rows
 * [lo, hi) of the global batch and the peers' ids by rank (space-separated, into peers). False
 * when it logged none. */
static bool s_plan(const s_run_t *r, int i, uint64_t gen, long long *rank, unsigned *lo,
                   unsigned *hi, char *peers, size_t n)
{
    char pat[64];
    snprintf(pat, sizeof pat, ": generation %" PRIu64 ": rank ", gen);
    const char *p = r->err[i] ? strstr(r->err[i], pat) : NULL;
    if (!p)
        return false;
    p += strlen(pat);
    const char *nl = strchr(p, '\n'), *b = strstr(p, "batch ["), *pe = strstr(p, "peers ");
    nl = nl ? nl : p + strlen(p);
    if (!b || b > nl || !pe || pe > nl || sscanf(b, "batch [%u, %u)", lo, hi) != 2)
        return false;
    *rank = strtoll(p, NULL, 10);
    snprintf(peers, n, "%.*s", (int)(nl - pe - 6), pe + 6);
    return true;
}

/* The id of rank `rank` in a peers list, into out. */
static void s_peer(const char *peers, long long rank, char *out, size_t n)
{
    const char *p = peers;
    for (long long k = 0; k < rank && p; k++)
        p = strchr(p, ' ') ? strchr(p, ' ') + 1 : NULL;
    snprintf(out, n, "%.*s", p ? (int)strcspn(p, " ") : 0, p ? p : "");
}

static int s_worker_by_id(const s_run_t *r, const char *id)
{
    for (int i = 0; i < r->n; i++)
        if (strcmp(r->w[i].id, id) == 0)
            return i;
    return -1;
}

/* What the analysis found. */
typedef struct {
    int flip_step, flip_tokens; /* the first step routed otherwise than the reference's (0) */
    double max_rel, max_rel_flip;
    int lines, executions;      /* metrics lines; step executions (lines of rank 0) */
    int inferred;               /* rows of committed steps whose rank died before its line */
    int epochs_whole, partial_seen;
    int weights_step;           /* the checkpoint held to the reference's (0: none) */
    double weights, tensor, m_rel, v_rel;
    char worst[96];
    double final_weights;       /* the final checkpoint's weights against the reference's */
} s_figures_t;

/* Step s's last execution in r: each line of it trained on its rank's rows of the step's global
 * batch (model_data_batch_rows; the rows from the rank's plan in its log), no row twice; a rank
 * without a line must be a worker the test killed (it died after the step's collectives, which
 * then counted: a checkpoint or live replicas kept them), its rows are inferred. The samples of
 * the batch's rows into ids (TRAIN_UTIL_BATCH). False (CHECKed) when something is wrong. */
static bool s_check_step(const s_run_t *r, uint64_t s, uint64_t *ids, s_figures_t *f)
{
    s_at_t at[S_MAXW];
    int n = s_committed(r, s, at);
    CHECK(n > 0, "chaos: step %" PRIu64 " was never logged", s);
    if (n == 0)
        return false;
    uint64_t gen = at[0].l->generation;
    long long world = at[0].l->world;
    uint8_t tokens[TRAIN_UTIL_BATCH * (TRAIN_UTIL_SEQ + 1)];
    CHECK(model_data_batch_rows(s_data, s - 1, 0, TRAIN_UTIL_BATCH, tokens, ids, NULL) ==
          SEMOE_OK, "chaos: step %" PRIu64 ": %s", s, semoe_err_msg());
    bool covered[TRAIN_UTIL_BATCH] = {0}, ranked[S_MAXW] = {0}, ok = true;
    char peers[1024] = "";
    for (int i = 0; i < n; i++) {
        const train_util_line_t *l = at[i].l;
        long long rank = -1;
        unsigned lo = 0, hi = 0;
        char pl[1024];
        bool planned = s_plan(r, at[i].w, gen, &rank, &lo, &hi, pl, sizeof pl);
        bool fits = planned && l->world == world && l->rank == rank && rank >= 0 &&
                    rank < world && rank < S_MAXW && !ranked[rank] && lo < hi &&
                    hi <= TRAIN_UTIL_BATCH && l->n_samples == (int)(hi - lo);
        CHECK(fits, "chaos: step %" PRIu64 ", generation %" PRIu64 ": %s's line (rank %lld of "
              "%lld, %d samples) does not match its plan (%s: rank %lld, rows [%u, %u)) or "
              "another line", s, gen, r->w[at[i].w].id, l->rank, l->world, l->n_samples,
              planned ? "logged" : "not logged", rank, lo, hi);
        if (!fits) {
            ok = false;
            continue;
        }
        ranked[rank] = true;
        snprintf(peers, sizeof peers, "%s", pl);
        for (unsigned j = lo; j < hi; j++) {
            bool same = !covered[j] && l->samples[j - lo] == ids[j];
            CHECK(same, "chaos: step %" PRIu64 ", generation %" PRIu64 ": %s (rank %lld) trained "
                  "on sample %" PRIu64 " as row %u of the batch, %s %" PRIu64, s, gen,
                  r->w[at[i].w].id, rank, l->samples[j - lo], j,
                  covered[j] ? "which another rank trained on, sample" : "whose sample is",
                  ids[j]);
            ok = ok && same;
            covered[j] = true;
        }
    }
    int missing = 0, uncovered = 0;
    for (int j = 0; j < TRAIN_UTIL_BATCH; j++)
        uncovered += !covered[j];
    for (long long k = 0; k < world; k++)
        missing += !ranked[k];
    bool fair = missing <= uncovered && (missing > 0) == (uncovered > 0);
    CHECK(!ok || fair, "chaos: step %" PRIu64 ", generation %" PRIu64 ": %d rows of its batch "
          "are in no line's plan, %d ranks logged no line: want none for none, at least one "
          "row each", s, gen, uncovered, missing);
    ok = ok && fair;
    for (long long k = 0; ok && k < world; k++) {
        if (ranked[k])
            continue;
        char id[64];
        s_peer(peers, k, id, sizeof id);
        int w = s_worker_by_id(r, id);
        CHECK(w >= 0 && r->killed[w], "chaos: step %" PRIu64 ", generation %" PRIu64 ": rank "
              "%lld (%s) logged no line for the step's last execution, and the test did not "
              "kill it", s, gen, k, id[0] ? id : "?");
        ok = ok && w >= 0 && r->killed[w];
    }
    f->inferred += ok ? uncovered : 0;
    return ok;
}

/* The committed lines of every step (s_check_step), and over each epoch every training sample
 * trained on exactly once (a partial last epoch: at most once). Routing flips against the
 * reference are found on the way. */
static void s_check_lineage(const s_run_t *r, const s_run_t *ref, s_figures_t *f)
{
    uint64_t epochs = ((uint64_t)s_steps * TRAIN_UTIL_BATCH + s_samples - 1) / s_samples;
    uint32_t *seen = calloc(epochs * s_samples, sizeof *seen);
    int bad = 0;
    for (uint64_t s = 1; s <= (uint64_t)s_steps; s++) {
        uint64_t ids[TRAIN_UTIL_BATCH];
        if (!s_check_step(r, s, ids, f)) {
            bad++;
            continue;
        }
        for (int j = 0; j < TRAIN_UTIL_BATCH; j++) {
            uint64_t pos = (s - 1) * TRAIN_UTIL_BATCH + (uint64_t)j;
            if (ids[j] < s_samples)
                seen[(pos / s_samples) * s_samples + ids[j]]++;
        }
        /* routing: where the step's tokens went, against the reference's (whole lines only) */
        s_at_t a[S_MAXW], b[S_MAXW];
        int na = s_committed(r, s, a), nb = s_committed(ref, s, b);
        long long moved = 0;
        for (int e = 0; e < TRAIN_UTIL_LE && na == a[0].l->world && nb == b[0].l->world; e++) {
            long long x = 0, y = 0;
            for (int i = 0; i < na; i++)
                x += a[i].l->routed[e];
            for (int i = 0; i < nb; i++)
                y += b[i].l->routed[e];
            moved += llabs(x - y);
        }
        if (moved && !f->flip_step) {
            f->flip_step = (int)s;
            f->flip_tokens = (int)(moved / 2);
        }
    }
    uint64_t rows = (uint64_t)s_steps * TRAIN_UTIL_BATCH;
    for (uint64_t e = 0; e < epochs; e++) {
        bool whole = (e + 1) * s_samples <= rows;
        uint64_t missing = 0, twice = 0, once = 0, first = UINT64_MAX;
        for (uint64_t id = 0; id < s_samples; id++) {
            uint32_t c = seen[e * s_samples + id];
            once += c == 1;
            twice += c > 1;
            missing += whole && c == 0;
            if ((c > 1 || (whole && c == 0)) && first == UINT64_MAX)
                first = id;
        }
        CHECK(twice == 0 && missing == 0, "chaos: epoch %" PRIu64 ": %" PRIu64 " samples trained "
              "on more than once, %" PRIu64 " never (the first: %" PRIu64 ")", e, twice,
              missing, first);
        if (whole)
            f->epochs_whole++;
        else
            f->partial_seen = (int)once;
    }
    CHECK(bad == 0, "chaos: %d steps' last executions are wrong (above)", bad);
    free(seen);
}

/* Every line of r against the reference's line of its step: loss and eval loss within
 * S_REL_TOL relative, S_DRIFT_TOL from a routing flip on. */
static void s_check_losses(const s_run_t *r, const s_run_t *ref, s_figures_t *f)
{
    const train_util_worker_t *rw = &ref->w[0];
    for (int i = 0; i < r->n; i++) {
        const train_util_worker_t *w = &r->w[i];
        for (int k = 0; k < w->n; k++) {
            const train_util_line_t *l = &w->line[k], *rl = train_util_find_step(rw, l->step);
            f->lines++;
            f->executions += l->rank == 0;
            CHECK(rl != NULL, "chaos: %s logged step %" PRIu64 ", the reference has none", w->id,
                  l->step);
            if (!rl)
                continue;
            bool flipped = f->flip_step && l->step >= (uint64_t)f->flip_step;
            double tol = flipped ? S_DRIFT_TOL : S_REL_TOL;
            double *worst = flipped ? &f->max_rel_flip : &f->max_rel;
            double d = fabs(l->lossv - rl->lossv) / fabs(rl->lossv);
            *worst = d > *worst || isnan(d) ? d : *worst;
            CHECK(d < tol, "chaos: %s step %" PRIu64 " (line %d, generation %" PRIu64 ", rank %lld "
                  "of %lld): loss %s, the reference %s: relative difference %.3g >= %g%s", w->id,
                  l->step, k + 1, l->generation, l->rank, l->world, l->loss, rl->loss, d, tol,
                  flipped ? " (after a routing flip)" : "");
            if (l->eval[0] && rl->eval[0]) {
                double e = fabs(l->evalv - rl->evalv) / fabs(rl->evalv);
                *worst = e > *worst || isnan(e) ? e : *worst;
                CHECK(e < tol, "chaos: %s step %" PRIu64 ": eval_loss %s, the reference %s: "
                      "relative difference %.3g >= %g", w->id, l->step, l->eval, rl->eval, e,
                      tol);
            }
        }
    }
}

/* |a - b| / |a| over n floats. */
static double s_rel(const float *a, const float *b, uint64_t n)
{
    double d2 = 0, a2 = 0;
    for (uint64_t i = 0; i < n; i++) {
        double d = (double)a[i] - b[i];
        d2 += d * d;
        a2 += (double)a[i] * a[i];
    }
    return a2 > 0 ? sqrt(d2 / a2) : sqrt(d2);
}

/* Checkpoint b of the chaos run against a, the reference's of the same step: b is whole
 * (manifest and checksums) and loads every tensor with its AdamW moments and the same step and
 * AdamW step; with strict, its weights are within S_WEIGHT_TOL (S_TENSOR_TOL in each tensor)
 * and its moments within S_MOMENT_TOL of a's. The differences into f. False when either could
 * not be loaded (CHECKed for b; a kept copy of a that raced with its removal is skipped). */
static bool s_compare_ckpt(const char *a, const char *b, int step, bool strict, s_figures_t *f)
{
    if (model_ckpt_verify(a) != SEMOE_OK)
        return false;
    semoe_rc rc = model_ckpt_verify(b);
    CHECK(rc == SEMOE_OK, "chaos: the checkpoint of step %d, %s: %s", step, b, semoe_err_msg());
    if (rc != SEMOE_OK)
        return false;
    model_params_t *pa = NULL, *pb = NULL;
    rc = model_params_new(&s_job->model, NULL, 0, &pa);
    if (rc == SEMOE_OK)
        rc = model_params_new(&s_job->model, NULL, 0, &pb);
    uint64_t nf = rc == SEMOE_OK ? model_params_slab_floats(pa) : 0;
    float *ma = calloc(nf + 1, sizeof(float)), *va = calloc(nf + 1, sizeof(float));
    float *mb = calloc(nf + 1, sizeof(float)), *vb = calloc(nf + 1, sizeof(float));
    model_ckpt_state_t sa = {0}, sb = {0};
    if (rc == SEMOE_OK)
        rc = model_ckpt_load_host(a, pa, ma, va, &sa);
    CHECK(rc == SEMOE_OK, "reference: its checkpoint %s: %s", a, semoe_err_msg());
    if (rc == SEMOE_OK) {
        rc = model_ckpt_load_host(b, pb, mb, vb, &sb);
        CHECK(rc == SEMOE_OK, "chaos: the checkpoint %s does not load: %s", b, semoe_err_msg());
    }
    train_util_weights_diff_t d;
    if (rc == SEMOE_OK && train_util_compare_weights(a, b, &d)) {
        CHECK(sb.step == (uint64_t)step && sb.adam_step == sa.adam_step, "chaos: the checkpoint "
              "of step %d says step %" PRIu64 ", AdamW step %d; the reference's %" PRIu64 ", %d",
              step, sb.step, sb.adam_step, sa.step, sa.adam_step);
        f->weights_step = step;
        f->weights = d.rel_norm;
        f->tensor = d.max_rel_norm;
        snprintf(f->worst, sizeof f->worst, "%s", d.worst);
        f->m_rel = s_rel(ma, mb, nf);
        f->v_rel = s_rel(va, vb, nf);
        CHECK(!strict || (f->m_rel < S_MOMENT_TOL && f->v_rel < S_MOMENT_TOL), "chaos: AdamW's "
              "moments of the checkpoint of step %d differ from the reference's by %.3g "
              "(exp_avg) and %.3g (exp_avg_sq) >= %g", step, f->m_rel, f->v_rel, S_MOMENT_TOL);
        CHECK(!strict || d.rel_norm < S_WEIGHT_TOL, "chaos: the weights of step %d differ from "
              "the reference's by %.3g (|a - b| / |a| over all weights) >= %g", step, d.rel_norm,
              S_WEIGHT_TOL);
        CHECK(!strict || d.max_rel_norm < S_TENSOR_TOL, "chaos: %s of step %d differs from the "
              "reference's by %.3g >= %g", d.worst, step, d.max_rel_norm, S_TENSOR_TOL);
    }
    free(ma);
    free(va);
    free(mb);
    free(vb);
    model_params_destroy(&pa);
    model_params_destroy(&pb);
    return rc == SEMOE_OK;
}

/* The final checkpoint, whole and loading every tensor, held to the reference's; after a
 * routing flip (nothing stays within S_WEIGHT_TOL from there) the newest checkpoint before the
 * flip that both runs kept is held to it instead. */
static void s_check_weights(const s_run_t *r, const s_run_t *ref, s_figures_t *f)
{
    char a[PATH_MAX], b[PATH_MAX];
    train_util_step_dir(a, ref->ck, s_steps);
    train_util_step_dir(b, r->ck, s_steps);
    bool loaded = s_compare_ckpt(a, b, s_steps, !f->flip_step, f);
    CHECK(loaded, "chaos: the final checkpoints could not be compared");
    f->final_weights = f->weights;
    if (!f->flip_step)
        return;
    f->weights_step = 0;
    for (int step = (f->flip_step - 1) / S_CKPT * S_CKPT; step > 0 && !f->weights_step;
         step -= S_CKPT) {
        train_util_step_dir(a, ref->kept, step);
        train_util_step_dir(b, r->kept, step);
        if (access(a, F_OK) == 0 && access(b, F_OK) == 0)
            s_compare_ckpt(a, b, step, true, f);
    }
}

/* Each kill's outcome from the logs: the first generation newer than the one the kill hit that
 * trained without the victim and started after the kill. */
static void s_kill_figures(const s_run_t *r, s_kill_t *k)
{
    k->resume_ms = -1;
    for (uint64_t g = k->gen + 1; g <= r->gen + 64 && k->resume_ms < 0; g++) {
        double first = INFINITY;
        uint64_t from = UINT64_MAX;
        bool victim = false, any = false;
        for (int i = 0; i < r->n; i++)
            for (int j = 0; j < r->w[i].n; j++) {
                const train_util_line_t *l = &r->w[i].line[j];
                if (l->generation != g)
                    continue;
                any = true;
                victim = victim || i == k->victim;
                first = l->time < first ? l->time : first;
                from = l->step - 1 < from ? l->step - 1 : from;
            }
        if (any && !victim && first > k->time) {
            k->resume_gen = g;
            k->resume_from = from;
            k->resume_ms = (first - k->time) * 1000;
        }
    }
    /* a rewind goes to the newest whole checkpoint: at least the one latest named at the kill */
    CHECK(k->resume_ms < 0 || k->resume_from >= k->latest, "chaos: after the kill of %s at "
          "step %" PRIu64 ", generation %" PRIu64 " went on from step %" PRIu64 ", but the "
          "checkpoint of step %" PRIu64 " was whole and published then", r->w[k->victim].id,
          k->step, k->resume_gen, k->resume_from, k->latest);
}

/* --- the test ------------------------------------------------------------------------------- */

int main(void)
{
    test_init("chaos");
    proc_init("chaos");
    s_seed = 1 + test_rand_below(1000000000);
    int want = S_KILLS;
    const char *env = getenv("SEMOE_CHAOS_KILLS");
    if (env && *env)
        want = atoi(env) < 0 ? 0 : atoi(env) > S_MAX_KILLS ? S_MAX_KILLS : atoi(env);
    proc_tmp_path(s_corpus, sizeof s_corpus, "corpus.txt");
    REQUIRE(s_write_corpus(s_corpus), "cannot write the corpus");
    REQUIRE(s_open_data(), "cannot open the job's data");
    fprintf(stderr, "  train.seed %" PRIu64 "; %" PRIu64 " training samples (an epoch: %.1f "
            "steps of %d), %d steps (%.2f epochs), checkpoint every %d, %d kills\n", s_seed,
            s_samples, (double)s_samples / TRAIN_UTIL_BATCH, TRAIN_UTIL_BATCH, s_steps,
            (double)s_steps * TRAIN_UTIL_BATCH / (double)s_samples, S_CKPT, want);
    int64_t t0 = proc_now_ms();
    static s_run_t ref, r;
    REQUIRE(s_reference(&ref), "the uninterrupted run did not complete");
    int64_t t1 = proc_now_ms();
    static s_kill_t kills[S_MAX_KILLS];
    int done = s_chaos(&r, kills, want);
    CHECK(done == want, "chaos: %d kills of %d before the job ended", done, want);
    s_finish(&r);
    double chaos_s = (double)(proc_now_ms() - t1) / 1000.0;
    s_figures_t f = {0};
    if (r.n) {
        s_check_lineage(&r, &ref, &f);
        s_check_losses(&r, &ref, &f);
        s_check_weights(&r, &ref, &f);
    }
    double sum_ms = 0, max_ms = 0;
    int resumed = 0, rewound = 0, lost = 0;
    for (int i = 0; i < done; i++) {
        s_kill_t *k = &kills[i];
        s_kill_figures(&r, k);
        char out[256] = "no generation trained without it afterwards";
        if (k->resume_ms >= 0) {
            bool shared = i + 1 < done && kills[i + 1].time < k->time + k->resume_ms / 1000;
            long long back = (long long)k->step - (long long)k->resume_from;
            char lost_s[48] = "no step lost";
            if (back > 0)
                snprintf(lost_s, sizeof lost_s, "rewound %lld steps", back);
            snprintf(out, sizeof out, "resumed in generation %" PRIu64 " from step %" PRIu64
                     " (%s; latest checkpoint %" PRIu64 ") %.0f ms later%s", k->resume_gen,
                     k->resume_from, lost_s, k->latest, k->resume_ms,
                     shared ? " (the next kill came first)" : "");
            resumed++;
            rewound += back > 0;
            lost += back > 0 ? (int)back : 0;
            sum_ms += k->resume_ms;
            max_ms = k->resume_ms > max_ms ? k->resume_ms : max_ms;
        }
        fprintf(stderr, "kill %d (%s): %s, rank %lld of generation %" PRIu64 ", at step %"
                PRIu64 ": %s\n", i + 1, s_mode_names[k->mode], r.w[k->victim].id,
                k->victim_rank, k->gen, k->step, out);
    }
    /* deaths the coordinator declared of workers the test did not kill (liveness too tight for
     * this machine: not wrong, but not what the test meant) */
    int deaths = 0, false_deaths = 0;
    char *clog = r.coord ? proc_read_file(proc_err_path(r.coord), NULL) : NULL;
    for (const char *p = clog ? strstr(clog, "): dead") : NULL; p; p = strstr(p + 1, "): dead"))
        deaths++;
    for (int i = 0; clog && i < r.n; i++) {
        char dead[96];
        snprintf(dead, sizeof dead, "worker %s: silent for", r.w[i].id);
        false_deaths += !r.killed[i] && strstr(clog, dead) != NULL;
    }
    free(clog);
    fprintf(stderr, "chaos: %d kills, %d joins, %" PRIu64 " generations in %.1f s; %d resumed "
            "(%d after a rewind, %d steps lost in all), death to resumed %.0f ms on average, "
            "%.0f at most; the coordinator declared %d deaths (%d of workers not killed)\n",
            done, done, r.gen, chaos_s, resumed, rewound, lost, resumed ? sum_ms / resumed : 0,
            max_ms, deaths, false_deaths);
    fprintf(stderr, "  %d step executions for %d steps (%d metrics lines); %d whole epochs of %"
            PRIu64 " samples each trained on once, %d samples of the partial last one once (%d "
            "rows of ranks killed after their step counted, inferred); max relative loss "
            "difference %.3g\n", f.executions, s_steps, f.lines, f.epochs_whole, s_samples,
            f.partial_seen, f.inferred, f.max_rel);
    if (f.flip_step)
        fprintf(stderr, "  the router sent %d token%s elsewhere than the reference at step %d (a "
                "near tie decided the other way by float rounding): losses from there within %g "
                "(max %.3g); the final weights %.3g from the reference's, not held to %g\n",
                f.flip_tokens, f.flip_tokens == 1 ? "" : "s", f.flip_step, S_DRIFT_TOL,
                f.max_rel_flip, f.final_weights, S_WEIGHT_TOL);
    if (f.weights_step)
        fprintf(stderr, "  checkpoint of step %d against the reference's: weights %.3g (worst "
                "tensor %.3g, %s), exp_avg %.3g, exp_avg_sq %.3g\n", f.weights_step, f.weights,
                f.tensor, f.worst, f.m_rel, f.v_rel);
    else
        fprintf(stderr, "  no checkpoint before the flip kept by both runs: weights not held to "
                "the reference's\n");
    fprintf(stderr, "  total %.1f s\n", (double)(proc_now_ms() - t0) / 1000.0);
    for (int i = 0; i < S_MAXW; i++) {
        free(r.err[i]);
        free(ref.err[i]);
    }
    model_data_destroy(&s_data);
    model_job_destroy(&s_job);
    return test_finish();
}
