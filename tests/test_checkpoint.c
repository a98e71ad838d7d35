/* Training checkpoints (model/checkpoint.h): a tiny model trained N steps, saved, and resumed
 * by a fresh trainer gives K more steps bit-identical to the uninterrupted run; every kind of
 * damage (a flipped byte in each file, truncation, a missing file, no manifest, another
 * model's config) is refused with one line naming the file; the model part stays a Hugging Face
 * folder that `semoe eval` reads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

    model_train_destroy(&t3);
    model_params_destroy(&p3);
    model_train_destroy(&t2);
    model_params_destroy(&p2);
    model_train_destroy(&t1);
    model_params_destroy(&p1);
    return test_finish();
}
