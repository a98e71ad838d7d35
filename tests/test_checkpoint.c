/* Training checkpoints (model/checkpoint.h): a tiny model trained N steps, saved, and resumed
 * by a fresh trainer gives K more steps bit-identical to the uninterrupted run; every kind of
 * damage (a flipped byte in each file, truncation, a missing file, no manifest, another
 * model's config) is refused with one line naming the file; the model part stays a Hugging Face
 * folder that `semoe eval` reads. The host-memory core writes the same files as the trainer's
 * save and loads any subset of experts; a checkpoint root keeps its newest steps under latest. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "model/backend.h"
#include "model/checkpoint.h"
#include "model/job.h"
#include "model/params.h"
#include "model/shards.h"
#include "model/train.h"
#include "tests/harness.h"
#include "tests/tiny_model.h"
#include "tests/proc.h"

#define S_N 3      /* steps before the checkpoint */
#define S_K 4      /* steps after it */
#define S_ROWS 8

static const model_backend_f32_t *s_be = &cpu_backend_f32;

/* The tiny model of test_train.c. */
static void s_tiny_job(model_job_t *job)
{
    model_job_defaults(job);
    test_tiny_config(&job->model);
    job->train.seq_len = 12;
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

static uint8_t s_tok[S_N + S_K][S_ROWS * 13];

static model_train_t *s_trainer(const model_job_t *job, uint64_t seed, model_params_t **p)
{
    model_train_t *tr = NULL;
    if (model_params_new(&job->model, NULL, 0, p) != SEMOE_OK)
        return NULL;
    model_params_init(*p, seed);
    if (model_train_new(s_be, *p, job, &tr) != SEMOE_OK)
        return NULL;
    return tr;
}

static bool s_one_line(const char *m)
{
    return m && *m && !strchr(m, '\n');
}

/* The load of dir is refused with one line naming fname. */
static void s_refused(const char *dir, model_params_t *p, model_train_t *tr, const char *fname,
                      const char *what)
{
    model_ckpt_state_t st;
    semoe_rc rc = model_ckpt_load(dir, s_be, p, tr, &st);
    const char *m = semoe_err_msg();
    CHECK(rc != SEMOE_OK && s_one_line(m) && strstr(m, fname), "%s: %s: rc %d, message: %s",
          what, fname, rc, rc == SEMOE_OK ? "(none)" : m);
}

static char *s_read(const char *path, size_t *len)
{
    return proc_read_file(path, len);
}

static bool s_write(const char *path, const char *buf, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return false;
    bool ok = fwrite(buf, 1, len, f) == len;
    return fclose(f) == 0 && ok;
}

/* Like REQUIRE inside a check that returns false when it cannot go on. */
#define S_NEED(cond, ...)                                                                      \
    do {                                                                                       \
        bool ok_ = (cond);                                                                     \
        CHECK_HELD(ok_, #cond, __VA_ARGS__);                                                   \
        if (!ok_)                                                                              \
            return false;                                                                      \
    } while (0)

/* A whole checkpoint in host memory: every expert's weights (p's slab), m, v, the adam step
 * and the state, all random. */
typedef struct {
    model_params_t *p;
    float *m, *v;
    int adam;
    model_ckpt_state_t st;
} s_host_t;

static float s_rand_float(void)
{
    return (float)(test_rand_unit() * 2 - 1) * (float)(1 + test_rand_below(1000));
}

/* Whether files a and b have the same bytes. */
static bool s_same_file(const char *a, const char *b)
{
    size_t la = 0, lb = 0;
    char *x = s_read(a, &la), *y = s_read(b, &lb);
    bool same = x && y && la == lb && memcmp(x, y, la) == 0;
    free(x);
    free(y);
    return same;
}

/* The number of regular files in a and a/semoe, each with the same bytes in b at the same name
 * (0 when one differs); *nb the number in b. */
static size_t s_same_tree(const char *a, const char *b, size_t *nb)
{
    size_t n = 0;
    bool same = true;
    *nb = 0;
    for (int sub = 0; sub < 2; sub++) {
        char *da = sub ? model_shards_join(a, "semoe") : strdup(a);
        char *db = sub ? model_shards_join(b, "semoe") : strdup(b);
        for (int side = 0; side < 2; side++) {
            DIR *d = opendir(side ? db : da);
            struct dirent *e;
            while (d && (e = readdir(d))) {
                char *pa = model_shards_join(da, e->d_name), *pb = model_shards_join(db, e->d_name);
                struct stat st;
                if (lstat(side ? pb : pa, &st) == 0 && S_ISREG(st.st_mode)) {
                    if (side) {
                        (*nb)++;
                    } else {
                        n++;
                        if (!s_same_file(pa, pb)) {
                            fprintf(stderr, "  %s and %s differ\n", pa, pb);
                            same = false;
                        }
                    }
                }
                free(pb);
                free(pa);
            }
            if (d)
                closedir(d);
        }
        free(db);
        free(da);
    }
    return same ? n : 0;
}

/* model_ckpt_save_host of random host values writes the very files model_ckpt_save writes for
 * a trainer that holds the same values. Fills *h. */
static bool s_host_matches_trainer(const model_job_t *job, const char *tmp, s_host_t *h)
{
    model_params_t *pt = NULL;
    model_train_t *tr = NULL;
    S_NEED(model_params_new(&job->model, NULL, 0, &pt) == SEMOE_OK, "%s", semoe_err_msg());
    S_NEED(model_train_new(s_be, pt, job, &tr) == SEMOE_OK, "%s", semoe_err_msg());
    S_NEED(model_params_new(&job->model, NULL, 0, &h->p) == SEMOE_OK, "%s", semoe_err_msg());
    size_t nf = model_train_slab_floats(tr);
    S_NEED(nf == model_params_slab_floats(h->p), "slab sizes %zu vs %zu", nf,
           (size_t)model_params_slab_floats(h->p));
    float *w = model_params_slab(h->p);
    h->m = malloc(nf * sizeof(float));
    h->v = malloc(nf * sizeof(float));
    for (size_t i = 0; i < nf; i++) {
        w[i] = s_rand_float();
        h->m[i] = s_rand_float();
        h->v[i] = fabsf(s_rand_float());
    }
    s_be->to_device(model_train_weights(tr), w, nf * sizeof(float));
    s_be->to_device(model_train_m(tr), h->m, nf * sizeof(float));
    s_be->to_device(model_train_v(tr), h->v, nf * sizeof(float));
    h->adam = 1 + (int)test_rand_below(100000);
    model_train_set_adam_step(tr, h->adam);
    h->st = (model_ckpt_state_t){
        .step = test_rand_below(1ull << 40), .seed = test_rand(), .epoch = test_rand_below(99),
        .position = test_rand_below(1ull << 30), .job_hash = test_rand(),
        .generation = test_rand(), .layers_per_shard = (uint32_t)test_rand_below(3)};
    for (int i = 0; i < 4; i++)
        h->st.rng[i] = test_rand();

    char a[4200], b[4200];
    snprintf(a, sizeof a, "%s/by-trainer", tmp);
    snprintf(b, sizeof b, "%s/by-host", tmp);
    S_NEED(model_ckpt_save(a, s_be, pt, tr, &h->st) == SEMOE_OK, "save: %s", semoe_err_msg());
    S_NEED(model_ckpt_save_host(b, h->p, h->m, h->v, h->adam, &h->st) == SEMOE_OK,
           "save_host: %s", semoe_err_msg());
    size_t nb = 0, na = s_same_tree(a, b, &nb);
    CHECK(na >= 5 && na == nb, "save_host and save wrote different files: %zu the same, %zu "
          "written by save_host", na, nb);
    CHECK(model_ckpt_verify(b) == SEMOE_OK, "verify: %s", semoe_err_msg());
    printf("save_host: %zu files byte-identical to the trainer's save (layers_per_shard %u)\n",
           na, h->st.layers_per_shard);

    /* a params without every expert is refused */
    uint32_t one = (uint32_t)test_rand_below(job->model.num_hidden_layers *
                                             job->model.num_local_experts);
    model_params_t *part = NULL;
    S_NEED(model_params_new(&job->model, &one, 1, &part) == SEMOE_OK, "%s", semoe_err_msg());
    snprintf(b, sizeof b, "%s/partial", tmp);
    semoe_rc rc = model_ckpt_save_host(b, part, h->m, h->v, h->adam, &h->st);
    CHECK(rc != SEMOE_OK && s_one_line(semoe_err_msg()) &&
          strstr(semoe_err_msg(), "every expert") && access(b, F_OK) != 0,
          "save_host of one expert: rc %d: %s", rc, semoe_err_msg());
    model_params_destroy(&part);
    model_train_destroy(&tr);
    model_params_destroy(&pt);
    return true;
}

/* model_ckpt_load_host into a params holding a random subset of the experts gives exactly the
 * saved values of the tensors it holds, and the state. */
static bool s_load_host_subset(const model_job_t *job, const char *dir, const s_host_t *h)
{
    uint32_t total = job->model.num_hidden_layers * job->model.num_local_experts;
    uint32_t ids[256], k = 0;
    S_NEED(total >= 2 && total <= 256, "%u experts", total);
    while (k == 0 || k == total) {
        k = 0;
        for (uint32_t g = 0; g < total; g++)
            if (test_rand_below(2))
                ids[k++] = g;
    }
    model_params_t *ps = NULL;
    S_NEED(model_params_new(&job->model, ids, k, &ps) == SEMOE_OK, "%s", semoe_err_msg());
    size_t nf = model_params_slab_floats(ps);
    float *m = malloc(nf * sizeof(float)), *v = malloc(nf * sizeof(float));
    float *w = model_params_slab(ps);
    for (size_t i = 0; i < nf; i++)
        w[i] = m[i] = v[i] = NAN;
    model_ckpt_state_t got;
    memset(&got, 0xa5, sizeof got);
    S_NEED(model_ckpt_load_host(dir, ps, m, v, &got) == SEMOE_OK, "load_host: %s",
           semoe_err_msg());
    size_t held = 0, covered = 0, bad = 0;
    for (size_t i = 0; i < model_params_count(ps); i++) {
        const model_param_t *q = model_params_at(ps, i);
        const model_param_t *r = model_params_lookup(h->p, q->name);
        if (!q->data)
            continue;
        held++;
        covered += q->numel;
        size_t bytes = q->numel * sizeof(float);
        if (!r || memcmp(q->data, r->data, bytes) != 0 ||
            memcmp(m + q->offset, h->m + r->offset, bytes) != 0 ||
            memcmp(v + q->offset, h->v + r->offset, bytes) != 0) {
            if (bad++ < 3)
                fprintf(stderr, "  %s: weights, exp_avg or exp_avg_sq differ\n", q->name);
        }
    }
    bool experts_ok = true;
    for (uint32_t g = 0, j = 0; g < total; g++) {
        bool want = j < k && ids[j] == g;
        j += want;
        experts_ok = experts_ok && !!model_params_holds_expert(
            ps, g / job->model.num_local_experts, g % job->model.num_local_experts) == want;
    }
    CHECK(experts_ok && bad == 0 && covered == nf, "load_host of %u of %u experts: %zu of %zu "
          "tensors differ, %zu of %zu floats filled", k, total, bad, held, covered, nf);
    CHECK(got.step == h->st.step && got.seed == h->st.seed && got.epoch == h->st.epoch &&
          got.position == h->st.position && memcmp(got.rng, h->st.rng, sizeof got.rng) == 0 &&
          got.job_hash == h->st.job_hash && got.generation == h->st.generation &&
          got.adam_step == h->adam, "load_host state: step %llu adam %d",
          (unsigned long long)got.step, got.adam_step);
    printf("load_host: %u of %u experts, %zu tensors bit-identical\n", k, total, held);
    free(v);
    free(m);
    model_params_destroy(&ps);
    return true;
}

static bool s_exists(const char *dir, const char *name)
{
    char p[4400];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return lstat(p, &st) == 0;
}

/* The id of a process that has exited. */
static long s_dead_pid(void)
{
    pid_t pid = fork();
    if (pid == 0)
        _exit(0);
    (void)waitpid(pid, NULL, 0);
    return (long)pid;
}

/* model_ckpt_latest fails with one line holding want. */
static void s_latest_refused(const char *root, const char *want, const char *what)
{
    char out[4200];
    uint64_t step = 0;
    semoe_rc rc = model_ckpt_latest(root, out, sizeof out, &step);
    const char *m = semoe_err_msg();
    CHECK(rc != SEMOE_OK && s_one_line(m) && strstr(m, want), "latest, %s: rc %d: %s", what, rc,
          rc == SEMOE_OK ? "(none)" : m);
}

/* A checkpoint root: steps 10, 20, 30 published with keep 2 leave 20 and 30 and latest naming
 * 30; dead writers' leftovers go, a live one's stay; latest on a missing root or one with
 * nothing published is a fresh start, a dangling or foreign latest a clear error; resolve takes
 * a model folder, a root, and refuses anything else. */
static bool s_root(const char *tmp, const s_host_t *h)
{
    char root[4200], sd[4400], out[4400], want[4400];
    uint64_t step = 0;
    snprintf(root, sizeof root, "%s/runs/a", tmp); /* neither runs/ nor a/ exists yet */
    memset(out, 'x', sizeof out);
    step = 12345;
    CHECK(model_ckpt_latest(root, out, sizeof out, &step) == SEMOE_OK && out[0] == 0 &&
          step == 0, "latest on a missing root: %s", semoe_err_msg());

    long dead = s_dead_pid();
    const uint64_t steps[] = {10, 20, 30};
    for (size_t i = 0; i < 3; i++) {
        S_NEED(model_ckpt_step_dir(root, steps[i], sd, sizeof sd) == SEMOE_OK, "%s",
               semoe_err_msg());
        snprintf(want, sizeof want, "%s/step-%08llu", root, (unsigned long long)steps[i]);
        CHECK(strcmp(sd, want) == 0, "step_dir: %s, want %s", sd, want);
        model_ckpt_state_t st = h->st;
        st.step = steps[i];
        S_NEED(model_ckpt_save_host(sd, h->p, h->m, h->v, h->adam, &st) == SEMOE_OK,
               "save_host %s: %s", sd, semoe_err_msg());
        if (i == 2) { /* leftovers of a writer that died, of one still running, and a user's */
            char p[4400];
            snprintf(p, sizeof p, "%s/step-00000040.tmp-%ld", root, dead);
            mkdir(p, 0755);
            snprintf(p, sizeof p, "%s/step-00000040.tmp-%ld/semoe", root, dead);
            mkdir(p, 0755);
            snprintf(p, sizeof p, "%s/step-00000040.tmp-%ld/semoe/state.json", root, dead);
            proc_write_file(p, "{}");
            snprintf(p, sizeof p, "%s/step-00000020.old-%ld", root, dead);
            mkdir(p, 0755);
            snprintf(p, sizeof p, "%s/latest.tmp-%ld", root, dead);
            CHECK(symlink("step-00000040", p) == 0, "symlink %s", p);
            snprintf(p, sizeof p, "%s/step-00000050.tmp-%ld", root, (long)getpid());
            mkdir(p, 0755);
            snprintf(p, sizeof p, "%s/notes.txt", root);
            proc_write_file(p, "mine");
        }
        S_NEED(model_ckpt_publish(root, steps[i], 2) == SEMOE_OK, "publish %llu: %s",
               (unsigned long long)steps[i], semoe_err_msg());
        step = 0;
        CHECK(model_ckpt_latest(root, out, sizeof out, &step) == SEMOE_OK &&
              strcmp(out, sd) == 0 && step == steps[i], "latest after publishing %llu: %s, "
              "step %llu: %s", (unsigned long long)steps[i], out, (unsigned long long)step,
              semoe_err_msg());
    }
    char link[4400], target[64] = {0};
    snprintf(link, sizeof link, "%s/latest", root);
    ssize_t n = readlink(link, target, sizeof target - 1);
    CHECK(n == 13 && strcmp(target, "step-00000030") == 0, "latest -> %s, want step-00000030",
          n > 0 ? target : "(none)");
    CHECK(!s_exists(root, "step-00000010") && s_exists(root, "step-00000020") &&
          s_exists(root, "step-00000030"), "keep 2: want step-00000020 and 30 only");
    char name[64];
    snprintf(name, sizeof name, "step-00000040.tmp-%ld", dead);
    bool gone = !s_exists(root, name);
    snprintf(name, sizeof name, "step-00000020.old-%ld", dead);
    gone = gone && !s_exists(root, name);
    snprintf(name, sizeof name, "latest.tmp-%ld", dead);
    gone = gone && !s_exists(root, name);
    CHECK(gone, "a dead writer's leftovers (pid %ld) are still there", dead);
    snprintf(name, sizeof name, "step-00000050.tmp-%ld", (long)getpid());
    CHECK(s_exists(root, name) && s_exists(root, "notes.txt"),
          "a live writer's leftover or a user's file was removed");
    snprintf(name, sizeof name, "latest.tmp-%ld", (long)getpid());
    CHECK(!s_exists(root, name), "publish left its temporary link");

    /* what latest names loads */
    model_params_t *pl = NULL;
    S_NEED(model_params_new(model_params_config(h->p), NULL, 0, &pl) == SEMOE_OK, "%s",
           semoe_err_msg());
    size_t nf = model_params_slab_floats(pl);
    float *m = calloc(nf, sizeof(float)), *v = calloc(nf, sizeof(float));
    model_ckpt_state_t got;
    CHECK(model_ckpt_load_host(out, pl, m, v, &got) == SEMOE_OK && got.step == 30 &&
          memcmp(model_params_slab(pl), model_params_slab(h->p), nf * sizeof(float)) == 0,
          "load of latest: %s", semoe_err_msg());
    free(v);
    free(m);
    model_params_destroy(&pl);

    /* keep 0 keeps everything; a step that is not whole is not published */
    model_ckpt_step_dir(root, 40, sd, sizeof sd);
    S_NEED(model_ckpt_save_host(sd, h->p, h->m, h->v, h->adam, &h->st) == SEMOE_OK, "%s",
           semoe_err_msg());
    CHECK(model_ckpt_publish(root, 40, 0) == SEMOE_OK && s_exists(root, "step-00000020") &&
          s_exists(root, "step-00000030") && s_exists(root, "step-00000040"),
          "keep 0 removed a step: %s", semoe_err_msg());
    semoe_rc rc = model_ckpt_publish(root, 99, 1);
    CHECK(rc != SEMOE_OK && s_one_line(semoe_err_msg()) &&
          strstr(semoe_err_msg(), "step-00000099") && s_exists(root, "step-00000020"),
          "publish of a missing step: rc %d: %s", rc, semoe_err_msg());
    n = readlink(link, target, sizeof target - 1);
    target[n > 0 ? n : 0] = '\0';
    CHECK(strcmp(target, "step-00000040") == 0, "latest moved to %s by a failed publish",
          target);

    /* resolve: a step (a model folder), the root, and neither */
    CHECK(model_ckpt_resolve(sd, out, sizeof out) == SEMOE_OK && strcmp(out, sd) == 0,
          "resolve of a model folder: %s: %s", out, semoe_err_msg());
    CHECK(model_ckpt_resolve(root, out, sizeof out) == SEMOE_OK && strcmp(out, sd) == 0,
          "resolve of a root: %s, want %s: %s", out, sd, semoe_err_msg());
    char bad[4200];
    snprintf(bad, sizeof bad, "%s/runs", tmp);
    rc = model_ckpt_resolve(bad, out, sizeof out);
    CHECK(rc != SEMOE_OK && s_one_line(semoe_err_msg()) && strstr(semoe_err_msg(), bad) &&
          strstr(semoe_err_msg(), "neither"), "resolve of %s: rc %d: %s", bad, rc,
          semoe_err_msg());
    snprintf(bad, sizeof bad, "%s/no-such-thing", tmp);
    rc = model_ckpt_resolve(bad, out, sizeof out);
    CHECK(rc != SEMOE_OK && strstr(semoe_err_msg(), "neither"), "resolve of %s: %s", bad,
          semoe_err_msg());

    /* semoe eval and generate take the root */
    char bin[4200];
    snprintf(bin, sizeof bin, "%s/%s", proc_build_dir(), PROC_CLI);
    int ec = proc_run(NULL, 60000, "eval-root", bin, "eval", "--checkpoint", root, "--text",
                      "\x02\x03\x05\x07", (char *)NULL);
    CHECK(ec == 0, "semoe eval --checkpoint on a root: exit %d", ec);
    ec = proc_run(NULL, 60000, "generate-root", bin, "generate", "--checkpoint", root,
                  "--prompt", "\x01\x02", "--tokens", "3", (char *)NULL);
    CHECK(ec == 0, "semoe generate --checkpoint on a root: exit %d", ec);
    proc_t *pr = NULL;
    snprintf(bad, sizeof bad, "%s/runs", tmp);
    ec = proc_run(&pr, 60000, "eval-bad", bin, "eval", "--checkpoint", bad, "--text", "\x02\x03",
                  (char *)NULL);
    char *err = pr ? s_read(proc_err_path(pr), NULL) : NULL;
    CHECK(ec != 0 && err && strstr(err, "neither"), "semoe eval --checkpoint %s: exit %d: %s",
          bad, ec, err ? err : "(no stderr)");
    free(err);

    /* latest: nothing published, dangling, foreign, not a link */
    char r2[4200], p[4400];
    snprintf(r2, sizeof r2, "%s/root2", tmp);
    mkdir(r2, 0755);
    step = 7;
    CHECK(model_ckpt_latest(r2, out, sizeof out, &step) == SEMOE_OK && !out[0] && step == 0,
          "latest on an empty root: %s", semoe_err_msg());
    snprintf(p, sizeof p, "%s/latest", r2);
    S_NEED(symlink("step-00000099", p) == 0, "symlink %s", p);
    s_latest_refused(r2, "step-00000099: missing", "dangling");
    CHECK(model_ckpt_resolve(r2, out, sizeof out) != SEMOE_OK &&
          strstr(semoe_err_msg(), "step-00000099"), "resolve of a dangling root: %s",
          semoe_err_msg());
    unlink(p);
    S_NEED(symlink("../elsewhere", p) == 0, "symlink %s", p);
    s_latest_refused(r2, "not a step directory", "foreign");
    unlink(p);
    proc_write_file(p, "step-00000030");
    s_latest_refused(r2, "not a symbolic link", "a file");
    unlink(p);
    snprintf(p, sizeof p, "%s/step-00000005", r2);
    proc_write_file(p, "not a directory");
    snprintf(p, sizeof p, "%s/latest", r2);
    S_NEED(symlink("step-00000005", p) == 0, "symlink %s", p);
    s_latest_refused(r2, "not a directory", "a step that is a file");
    printf("root: keep 2 of steps 10, 20, 30, leftovers, latest, resolve; refused: %s\n",
           semoe_err_msg());
    return true;
}

/* Generation fencing: a commit claims the fence for its (run, generation) and publishes; one of
 * an older pair than the fence (a zombie of the same run, or any generation of an earlier run)
 * changes nothing under the root (latest, the step directories, no temporary left); a claim
 * never lowers the fence; a fence that is not one is a clear error and blocks commits until
 * fixed. The run, step and generations are random. */
static void s_fence(const char *tmp, const s_host_t *h)
{
    char root[4200], out[4400];
    snprintf(root, sizeof root, "%s/fenced/run", tmp);
    uint64_t run = 1 + test_rand_below(1ull << 40), g = 2 + test_rand_below(1000);
    uint64_t step = 1 + test_rand_below(500), at = 0;
    model_ckpt_fence_t fence = {7, 7};
    CHECK(model_ckpt_fence_read(root, &fence) == SEMOE_OK && fence.run == 0 &&
          fence.generation == 0, "fence of a missing root: %s", semoe_err_msg());
    model_ckpt_state_t st = h->st;
    st.step = step;
    st.generation = g;
    st.run = run;
    CHECK(model_ckpt_commit(root, step, 2, h->p, h->m, h->v, h->adam, &st) == SEMOE_OK,
          "commit of generation %llu: %s", (unsigned long long)g, semoe_err_msg());
    CHECK(model_ckpt_fence_read(root, &fence) == SEMOE_OK && fence.run == run &&
          fence.generation == g && model_ckpt_latest(root, out, sizeof out, &at) == SEMOE_OK &&
          at == step, "after the commit: fence %llx/%llu (want %llx/%llu), latest step %llu "
          "(want %llu): %s", (unsigned long long)fence.run, (unsigned long long)fence.generation,
          (unsigned long long)run, (unsigned long long)g, (unsigned long long)at,
          (unsigned long long)step, semoe_err_msg());

    /* the next generation claims the root; the old one's next checkpoint is refused, and so is
     * any generation of an earlier run */
    CHECK(model_ckpt_fence_claim(root, (model_ckpt_fence_t){run, g + 1}) == SEMOE_OK,
          "claim: %s", semoe_err_msg());
    model_ckpt_state_t old[2] = {st, st};
    old[1].run = run - 1;
    old[1].generation = g + 100;
    for (int k = 0; k < 2; k++) {
        old[k].step = step + 1;
        semoe_rc rc = model_ckpt_commit(root, step + 1, 2, h->p, h->m, h->v, h->adam, &old[k]);
        CHECK(rc == SEMOE_EFENCED && s_one_line(semoe_err_msg()) &&
              strstr(semoe_err_msg(), "fenced out"), "a zombie's commit (%s): rc %d: %s",
              k ? "an earlier run" : "an older generation", rc, semoe_err_msg());
        char name[64], sname[64];
        snprintf(name, sizeof name, "step-%08llu.tmp-%ld", (unsigned long long)step + 1,
                 (long)getpid());
        snprintf(sname, sizeof sname, "step-%08llu", (unsigned long long)step + 1);
        CHECK(!s_exists(root, sname) && !s_exists(root, name) &&
              model_ckpt_latest(root, out, sizeof out, &at) == SEMOE_OK && at == step,
              "a refused commit changed the root (latest step %llu)", (unsigned long long)at);
    }
    CHECK(model_ckpt_fence_claim(root, (model_ckpt_fence_t){run, g}) == SEMOE_EFENCED &&
          model_ckpt_fence_read(root, &fence) == SEMOE_OK && fence.generation == g + 1,
          "an older claim lowered the fence to %llu", (unsigned long long)fence.generation);
    CHECK(model_ckpt_fence_claim(root, (model_ckpt_fence_t){run, g + 1}) == SEMOE_OK,
          "claiming the fence's pair again: %s", semoe_err_msg());
    /* a later run starts its generations at 1 again */
    st.run = run + 1;
    st.generation = 1;
    CHECK(model_ckpt_commit(root, step + 2, 2, h->p, h->m, h->v, h->adam, &st) == SEMOE_OK &&
          model_ckpt_latest(root, out, sizeof out, &at) == SEMOE_OK && at == step + 2,
          "a later run's commit: %s", semoe_err_msg());
    model_ckpt_state_t got;
    CHECK(model_ckpt_load_host(out, h->p, h->m, h->v, &got) == SEMOE_OK && got.run == run + 1 &&
          got.generation == 1, "the checkpoint's run and generation: %s", semoe_err_msg());

    /* a fence that is not one */
    char p[4400];
    snprintf(p, sizeof p, "%s/%s", root, MODEL_CKPT_FENCE);
    const char *bad[] = {"7\n", "seven 1\n", "00000000000000zz 1\n", "0000000000000001 x\n", ""};
    for (int k = 0; k < 5; k++) {
        proc_write_file(p, bad[k]);
        semoe_rc rc = model_ckpt_fence_read(root, &fence);
        CHECK(rc == SEMOE_EINVAL && s_one_line(semoe_err_msg()) && strstr(semoe_err_msg(), p),
              "a corrupt fence \"%s\": rc %d: %s", bad[k], rc, semoe_err_msg());
    }
    st.generation = 5;
    CHECK(model_ckpt_commit(root, step + 3, 2, h->p, h->m, h->v, h->adam, &st) == SEMOE_EINVAL &&
          model_ckpt_latest(root, out, sizeof out, &at) == SEMOE_OK && at == step + 2,
          "a commit past a corrupt fence: %s", semoe_err_msg());
    printf("fence: run %llx generation %llu committed step %llu; the generation before and an "
           "earlier run fenced out, root unchanged\n", (unsigned long long)run,
           (unsigned long long)g, (unsigned long long)step);
}

int main(void)
{
    test_init("checkpoint");
    proc_init("checkpoint");
    model_job_t job;
    s_tiny_job(&job);
    for (size_t s = 0; s < S_N + S_K; s++)
        for (size_t i = 0; i < sizeof s_tok[s]; i++)
            s_tok[s][i] = (uint8_t)test_rand_below(job.model.vocab_size);
    char dir[4096];
    proc_tmp_path(dir, sizeof dir, "ckpt");

    /* the uninterrupted run, with a checkpoint after S_N steps (saved twice: the second save
     * replaces the first, in another shard layout) */
    model_params_t *p1 = NULL;
    model_train_t *t1 = s_trainer(&job, 11, &p1);
    REQUIRE(t1, "trainer: %s", semoe_err_msg());
    double la[S_K], lb[S_K];
    for (uint64_t s = 0; s < S_N; s++)
        REQUIRE(model_train_step(t1, s_tok[s], S_ROWS, s, NULL, NULL) == SEMOE_OK, "step: %s",
                semoe_err_msg());
    model_ckpt_state_t st = {.step = S_N, .seed = 0xfeedfacecafebeefull, .epoch = 2,
                             .position = 17, .rng = {1, UINT64_MAX, 3, 0x8000000000000000ull},
                             .job_hash = 0x123456789abcdef0ull, .generation = 7,
                             .layers_per_shard = 0};
    REQUIRE(model_ckpt_save(dir, s_be, p1, t1, &st) == SEMOE_OK, "save: %s", semoe_err_msg());
    st.layers_per_shard = 1;
    REQUIRE(model_ckpt_save(dir, s_be, p1, t1, &st) == SEMOE_OK, "resave: %s",
            semoe_err_msg());
    char path[4200];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    CHECK(access(path, F_OK) != 0, "the first save's single file is gone");
    snprintf(path, sizeof path, "%s.tmp-%ld", dir, (long)getpid());
    CHECK(access(path, F_OK) != 0, "no temporary directory left");
    for (uint64_t s = S_N; s < S_N + S_K; s++) {
        model_train_report_t r;
        REQUIRE(model_train_step(t1, s_tok[s], S_ROWS, s, NULL, &r) == SEMOE_OK, "step: %s",
                semoe_err_msg());
        la[s - S_N] = r.loss;
    }

    /* a fresh trainer (other init) resumes */
    model_params_t *p2 = NULL;
    model_train_t *t2 = s_trainer(&job, 99, &p2);
    REQUIRE(t2, "trainer: %s", semoe_err_msg());
    model_ckpt_state_t got;
    memset(&got, 0xa5, sizeof got);
    REQUIRE(model_ckpt_load(dir, s_be, p2, t2, &got) == SEMOE_OK, "load: %s", semoe_err_msg());
    CHECK(got.step == st.step && got.seed == st.seed && got.epoch == st.epoch &&
          got.position == st.position && memcmp(got.rng, st.rng, sizeof st.rng) == 0 &&
          got.job_hash == st.job_hash && got.generation == st.generation &&
          got.adam_step == S_N && model_train_adam_step(t2) == S_N, "state round trip");
    for (uint64_t s = S_N; s < S_N + S_K; s++) {
        model_train_report_t r;
        REQUIRE(model_train_step(t2, s_tok[s], S_ROWS, s, NULL, &r) == SEMOE_OK, "step: %s",
                semoe_err_msg());
        lb[s - S_N] = r.loss;
    }
    CHECK(memcmp(la, lb, sizeof la) == 0, "resumed losses differ: %.17g vs %.17g ... %.17g vs "
          "%.17g", la[0], lb[0], la[S_K - 1], lb[S_K - 1]);
    size_t nf = model_train_slab_floats(t1);
    CHECK(memcmp(model_train_weights(t1), model_train_weights(t2), nf * sizeof(float)) == 0 &&
          memcmp(model_train_m(t1), model_train_m(t2), nf * sizeof(float)) == 0 &&
          memcmp(model_train_v(t1), model_train_v(t2), nf * sizeof(float)) == 0,
          "weights and moments after the resumed steps differ");
    printf("resume: %d steps after the checkpoint bit-identical (loss %.6f .. %.6f)\n", S_K,
           la[0], la[S_K - 1]);

    /* the model part is a Hugging Face folder */
    model_config_t cfg;
    model_params_t *pm = NULL;
    CHECK(model_shards_load_model(dir, &cfg, &pm) == SEMOE_OK &&
          memcmp(model_params_slab(pm), model_params_slab(p1),
                 model_params_slab_floats(p1) * sizeof(float)) == 0,
          "load_model: %s", semoe_err_msg());
    model_params_destroy(&pm);
    char bin[4200];
    snprintf(bin, sizeof bin, "%s/%s", proc_build_dir(), PROC_CLI);
    int ec = proc_run(NULL, 60000, "eval", bin, "eval", "--checkpoint", dir, "--text",
                      "\x01\x02\x03\x05\x07\x0b", (char *)NULL); /* bytes of the vocab of 32 */
    CHECK(ec == 0, "semoe eval --checkpoint on the checkpoint: exit %d", ec);

    /* damage, each kind refused naming the file, then undone */
    const char *files[] = {"config.json", "model-00001-of-00002.safetensors",
                           "model-00002-of-00002.safetensors", "model.safetensors.index.json",
                           "semoe/optimizer-00001-of-00002.safetensors",
                           "semoe/optimizer-00002-of-00002.safetensors", "semoe/state.json",
                           "semoe/manifest.json"};
    for (size_t f = 0; f < sizeof files / sizeof files[0]; f++) {
        snprintf(path, sizeof path, "%s/%s", dir, files[f]);
        size_t len = 0;
        char *orig = s_read(path, &len);
        REQUIRE(orig && len > 1, "%s: cannot read", path);
        char *bad = malloc(len);
        for (int rep = 0; rep < 3; rep++) { /* a flipped byte, three places */
            memcpy(bad, orig, len);
            size_t at = rep == 0 ? 0 : rep == 1 ? len - 1 : (size_t)test_rand_below(len);
            bad[at] ^= (char)(1u << test_rand_below(8));
            REQUIRE(s_write(path, bad, len), "write %s", path);
            s_refused(dir, p2, t2, files[f], "flipped byte");
        }
        REQUIRE(s_write(path, orig, len - 1 - test_rand_below(len - 1)), "truncate %s", path);
        s_refused(dir, p2, t2, files[f], "truncated");
        REQUIRE(unlink(path) == 0, "unlink %s", path);
        s_refused(dir, p2, t2, files[f], "deleted");
        REQUIRE(s_write(path, orig, len), "restore %s", path);
        free(bad);
        free(orig);
    }
    CHECK(model_ckpt_load(dir, s_be, p2, t2, &got) == SEMOE_OK, "restored: %s",
          semoe_err_msg());
    CHECK(model_ckpt_verify(dir) == SEMOE_OK, "verify: %s", semoe_err_msg());

    /* another model's config: refused naming config.json */
    model_job_t other = job;
    other.model.num_local_experts = 8;
    model_params_t *p3 = NULL;
    model_train_t *t3 = s_trainer(&other, 5, &p3);
    REQUIRE(t3, "trainer: %s", semoe_err_msg());
    s_refused(dir, p3, t3, "config.json", "another model");
    printf("refused: %s\n", semoe_err_msg());
    /* no checkpoint at all */
    char none[4200];
    snprintf(none, sizeof none, "%s/nothing", proc_tmp_dir());
    mkdir(none, 0755);
    s_refused(none, p2, t2, "semoe/manifest.json", "empty directory");

    /* the host-memory core and a checkpoint root */
    s_host_t h = {0};
    if (s_host_matches_trainer(&job, proc_tmp_dir(), &h)) {
        char hdir[4200];
        snprintf(hdir, sizeof hdir, "%s/by-host", proc_tmp_dir());
        s_load_host_subset(&job, hdir, &h);
        s_root(proc_tmp_dir(), &h);
        s_fence(proc_tmp_dir(), &h);
    }
    free(h.v);
    free(h.m);
    model_params_destroy(&h.p);

    model_train_destroy(&t3);
    model_params_destroy(&p3);
    model_train_destroy(&t2);
    model_params_destroy(&p2);
    model_train_destroy(&t1);
    model_params_destroy(&p1);
    return test_finish();
}
