/* Tests the job spec and model config readers (model/job.c, model/config.c): the example specs
 * read to the fields they say, every bad spec fails with one line naming its field, random
 * mutations of valid specs never crash and fail only with such lines, and specs round-trip. */
#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "model/config.h"
#include "model/job.h"
#include "tests/harness.h"

static const char *s_src = ".";

/* SEMOE_SRC/rel in a static buffer (one at a time). */
static const char *s_path(const char *rel)
{
    static char buf[4096];
    snprintf(buf, sizeof buf, "%s/%s", s_src, rel);
    return buf;
}

static bool s_one_line(const char *msg)
{
    return msg && *msg && !strchr(msg, '\n') && !strchr(msg, '\r');
}

static bool s_starts(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static bool s_config_equal(const model_config_t *a, const model_config_t *b)
{
    return a->vocab_size == b->vocab_size && a->hidden_size == b->hidden_size &&
           a->intermediate_size == b->intermediate_size &&
           a->num_hidden_layers == b->num_hidden_layers &&
           a->num_attention_heads == b->num_attention_heads &&
           a->num_key_value_heads == b->num_key_value_heads && a->head_dim == b->head_dim &&
           a->num_local_experts == b->num_local_experts &&
           a->num_experts_per_tok == b->num_experts_per_tok &&
           a->max_position_embeddings == b->max_position_embeddings &&
           a->sliding_window == b->sliding_window && a->rms_norm_eps == b->rms_norm_eps &&
           a->rope_theta == b->rope_theta && a->router_aux_loss_coef == b->router_aux_loss_coef &&
           a->router_jitter_noise == b->router_jitter_noise &&
           a->initializer_range == b->initializer_range &&
           a->tie_word_embeddings == b->tie_word_embeddings &&
           strcmp(a->hidden_act, b->hidden_act) == 0;
}

/* Every field but json/json_len, which hold each one's own text. */
static bool s_job_equal(const model_job_t *a, const model_job_t *b)
{
    if (!s_config_equal(&a->model, &b->model))
        return false;
    if (a->train.seq_len != b->train.seq_len || a->train.global_batch != b->train.global_batch ||
        a->train.micro_batch != b->train.micro_batch || a->train.lr != b->train.lr ||
        a->train.min_lr != b->train.min_lr || a->train.warmup_steps != b->train.warmup_steps ||
        strcmp(a->train.schedule, b->train.schedule) != 0 ||
        a->train.weight_decay != b->train.weight_decay || a->train.beta1 != b->train.beta1 ||
        a->train.beta2 != b->train.beta2 || a->train.eps != b->train.eps ||
        a->train.grad_clip != b->train.grad_clip || a->train.steps != b->train.steps ||
        a->train.seed != b->train.seed ||
        strcmp(a->train.checkpoint_dir, b->train.checkpoint_dir) != 0 ||
        a->train.checkpoint_interval != b->train.checkpoint_interval ||
        a->train.eval_interval != b->train.eval_interval ||
        a->train.freeze_router != b->train.freeze_router ||
        strcmp(a->train.precision, b->train.precision) != 0 ||
        !a->train.router_bias != !b->train.router_bias)
        return false;
    for (uint32_t e = 0; a->train.router_bias && e < a->model.num_local_experts; e++)
        if (a->train.router_bias[e] != b->train.router_bias[e])
            return false;
    if (a->data.n_paths != b->data.n_paths || a->data.heldout_fraction != b->data.heldout_fraction)
        return false;
    for (uint32_t i = 0; i < a->data.n_paths; i++)
        if (strcmp(a->data.paths[i], b->data.paths[i]) != 0)
            return false;
    return a->cluster.heartbeat_ms == b->cluster.heartbeat_ms &&
           a->cluster.liveness == b->cluster.liveness &&
           a->cluster.expected_workers == b->cluster.expected_workers &&
           a->elastic.threshold == b->elastic.threshold && a->elastic.window == b->elastic.window &&
           a->elastic.patience == b->elastic.patience &&
           a->elastic.min_replicas == b->elastic.min_replicas &&
           a->storage.hbm_bytes == b->storage.hbm_bytes &&
           a->storage.host_bytes == b->storage.host_bytes &&
           a->storage.ssd_bytes == b->storage.ssd_bytes &&
           strcmp(a->storage.ssd_dir, b->storage.ssd_dir) == 0;
}

/* Serialises job, parses the text back and checks the two are equal. */
static void s_check_round_trip(const model_job_t *job, const char *what)
{
    char *text = model_job_to_json(job);
    model_job_t *back = NULL;
    semoe_rc rc = model_job_parse(text, strlen(text), "roundtrip.json", &back);
    CHECK(rc == SEMOE_OK, "%s: re-parse failed: %s", what, semoe_err_msg());
    if (back) {
        CHECK(s_job_equal(job, back), "%s: round trip changed the job:\n%s", what, text);
        CHECK(back->json_len == strlen(text) && strcmp(back->json, text) == 0,
              "%s: json is not the text parsed", what);
    }
    model_job_destroy(&back);
    free(text);
}

static char *s_slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    size_t r;
    while (buf && (r = fread(buf + n, 1, cap - n - 1, f)) > 0) {
        n += r;
        if (n + 1 == cap)
            buf = realloc(buf, cap *= 2);
    }
    fclose(f);
    if (buf)
        buf[n] = 0;
    *len = n;
    return buf;
}

static void test_defaults(void)
{
    model_job_t def;
    model_job_defaults(&def);
    CHECK(def.model.vocab_size == 256 && def.model.hidden_size == 128, "byte-level defaults");
    CHECK(def.model.num_hidden_layers == 4 && def.model.num_local_experts == 8 &&
              def.model.num_experts_per_tok == 2, "4 layers of 8 experts, top-2");
    CHECK(def.model.head_dim == def.model.hidden_size / def.model.num_attention_heads,
          "head_dim %u", def.model.head_dim);
    CHECK(def.cluster.heartbeat_ms == 1000 && def.cluster.liveness == 3 &&
              def.cluster.expected_workers == 0, "cluster defaults");
    CHECK(def.elastic.threshold == 1.3 && def.elastic.window == 10 && def.elastic.patience == 5 &&
              def.elastic.min_replicas == 1, "elastic defaults");
    CHECK(model_config_validate(&def.model, "defaults: model") == SEMOE_OK,
          "defaults invalid: %s", semoe_err_msg());

    /* an empty spec, and empty sections, are the defaults */
    static const char all_empty[] = "{\"model\": {}, \"train\": {}, \"data\": {}, "
                                    "\"cluster\": {}, \"elastic\": {}, \"storage\": {}}";
    const char *empties[] = {"{}", " \n{ }\n", all_empty};
    for (size_t i = 0; i < sizeof empties / sizeof empties[0]; i++) {
        model_job_t *job = NULL;
        semoe_rc rc = model_job_parse(empties[i], strlen(empties[i]), "empty.json", &job);
        CHECK(rc == SEMOE_OK, "'%s': %s", empties[i], semoe_err_msg());
        if (job) {
            CHECK(s_job_equal(job, &def), "'%s' is not the defaults", empties[i]);
            CHECK(job->json_len == strlen(empties[i]) && strcmp(job->json, empties[i]) == 0,
                  "json keeps the text");
        }
        model_job_destroy(&job);
        CHECK(job == NULL, "destroy nulls");
    }
    model_job_destroy(NULL);
    s_check_round_trip(&def, "defaults");
}

static void test_demo(void)
{
    const char *path = s_path("deploy/jobs/demo.json");
    model_job_t *job = NULL;
    semoe_rc rc = model_job_load(path, &job);
    CHECK(rc == SEMOE_OK, "demo.json: %s", semoe_err_msg());
    if (!job)
        return;
    const model_config_t *m = &job->model;
    CHECK(m->vocab_size == 256 && m->hidden_size == 128 && m->num_hidden_layers == 4,
          "demo model");
    CHECK(m->num_local_experts == 8 && m->num_experts_per_tok == 2, "demo experts");
    CHECK(m->head_dim == 32 && m->sliding_window == 0, "demo head_dim %u", m->head_dim);
    CHECK(strcmp(m->hidden_act, "silu") == 0, "demo act");
    CHECK(job->cluster.heartbeat_ms == 1000 && job->cluster.liveness == 3, "demo cluster");
    CHECK(job->data.n_paths == 1 && strcmp(job->data.paths[0], "/usr/share/games/fortunes") == 0,
          "demo data");
    CHECK(job->train.seq_len == 128 && job->train.global_batch == 32 && job->train.steps == 400,
          "demo train");
    CHECK(strcmp(job->train.schedule, "cosine") == 0, "demo schedule");
    size_t len = 0;
    char *text = s_slurp(path, &len);
    CHECK(text && job->json_len == len && memcmp(job->json, text, len) == 0 &&
              job->json[len] == 0, "json is the file's text");
    free(text);
    s_check_round_trip(job, "demo");
    model_job_destroy(&job);
}

static void test_small(void)
{
    model_job_t *job = NULL;
    semoe_rc rc = model_job_load(s_path("tests/jobs/small.json"), &job);
    CHECK(rc == SEMOE_OK, "small.json: %s", semoe_err_msg());
    if (!job)
        return;
    CHECK(job->cluster.heartbeat_ms == 200 && job->cluster.liveness == 3, "small cluster");
    CHECK(job->model.num_hidden_layers == 2 && job->model.num_local_experts == 8 &&
              job->model.num_experts_per_tok == 2, "small model");
    CHECK(job->model.head_dim == 16, "head_dim derived: %u", job->model.head_dim);
    CHECK(job->data.n_paths == 1, "a single string is one path");
    CHECK(job->train.seed == 42 && job->train.lr == 2e-3, "small train");
    CHECK(job->train.eval_interval == 100, "unset train keys keep their defaults");
    s_check_round_trip(job, "small");
    model_job_destroy(&job);
}

static void s_check_tiny_hf(const model_config_t *m, const char *what)
{
    CHECK(m->vocab_size == 256 && m->hidden_size == 64 && m->intermediate_size == 112, "%s", what);
    CHECK(m->num_hidden_layers == 3 && m->num_attention_heads == 8 &&
              m->num_key_value_heads == 4, "%s: layers/heads", what);
    CHECK(m->head_dim == 8, "%s: head_dim null is hidden/heads: %u", what, m->head_dim);
    CHECK(m->num_local_experts == 4 && m->num_experts_per_tok == 2, "%s: experts", what);
    CHECK(m->max_position_embeddings == 512 && m->sliding_window == 0, "%s: positions", what);
    CHECK(m->rms_norm_eps == 1e-6 && m->rope_theta == 1e6 && m->router_aux_loss_coef == 0.02,
          "%s: floats", what);
}

static void test_from_hf(void)
{
    model_config_t cfg;
    semoe_rc rc = model_config_load_hf(s_path("tests/jobs/tiny_hf/config.json"), &cfg);
    CHECK(rc == SEMOE_OK, "tiny_hf: %s", semoe_err_msg());
    if (rc == SEMOE_OK)
        s_check_tiny_hf(&cfg, "tiny_hf");

    model_job_t *job = NULL;
    rc = model_job_load(s_path("tests/jobs/from_hf.json"), &job);
    CHECK(rc == SEMOE_OK, "from_hf.json: %s", semoe_err_msg());
    if (!job)
        return;
    s_check_tiny_hf(&job->model, "from_hf.json");
    CHECK(strcmp(job->train.schedule, "constant") == 0, "schedule");
    CHECK(job->storage.host_bytes == 2ull << 30, "2GiB: %llu",
          (unsigned long long)job->storage.host_bytes);
    CHECK(job->storage.ssd_bytes == 64000000000ull, "64 GB");
    CHECK(strstr(job->json, "tiny_hf/config.json") != NULL, "json is the original text");
    /* the serialised job inlines the model, so it parses with no config.json beside it */
    s_check_round_trip(job, "from_hf");
    model_job_destroy(&job);

    /* a spec read from text anchors "model" at its origin's directory */
    size_t len = 0;
    char *text = s_slurp(s_path("tests/jobs/from_hf.json"), &len);
    if (text) {
        rc = model_job_parse(text, len, "/nonexistent/dir/job.json", &job);
        CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), "/nonexistent/dir/tiny_hf/config.json"),
              "relative to origin: %s", semoe_err_msg());
        rc = model_job_parse(text, len, s_path("tests/jobs/x.json"), &job);
        CHECK(rc == SEMOE_OK, "anchored at origin: %s", semoe_err_msg());
        model_job_destroy(&job);
        free(text);
    }
}

/* Lenient (config.json) and strict (job spec) reading of the same keys, and where messages
 * point. */
static void test_config_modes(void)
{
    model_config_t cfg;
    /* transformers 5 moves rope_theta into rope_parameters; leaving keys out means
     * MixtralConfig's defaults */
    cJSON *o = cJSON_Parse("{\"model_type\": \"mixtral\", \"rope_parameters\": {\"rope_type\": "
                           "\"default\", \"rope_theta\": 500000.0}, \"dtype\": \"bfloat16\", "
                           "\"layer_types\": [\"full_attention\"]}");
    semoe_rc rc = model_config_from_json(o, false, "config.json", &cfg);
    CHECK(rc == SEMOE_OK, "lenient: %s", semoe_err_msg());
    CHECK(cfg.rope_theta == 500000.0, "rope_parameters.rope_theta: %g", cfg.rope_theta);
    CHECK(cfg.vocab_size == 32000 && cfg.hidden_size == 4096 && cfg.head_dim == 128 &&
              cfg.num_hidden_layers == 32, "MixtralConfig defaults for absent keys");
    rc = model_config_from_json(o, true, "job.json: model", &cfg);
    CHECK(rc == SEMOE_EINVAL && s_starts(semoe_err_msg(), "job.json: model.") &&
              strstr(semoe_err_msg(), "unknown key"), "strict refuses them: %s", semoe_err_msg());
    cJSON_Delete(o);

    struct {
        const char *json;
        bool strict;
        const char *fragment;
    } cases[] = {
        {"{\"model_type\": \"llama\"}", false, "config.json: model_type=\"llama\": "},
        {"{\"rope_parameters\": {\"rope_type\": \"yarn\"}}", false, "rope_parameters.rope_type"},
        {"{\"rope_scaling\": {\"type\": \"linear\", \"factor\": 2}}", false, "rope_scaling.type"},
        {"{\"hidden_size\": \"64\"}", false, "config.json: hidden_size=\"64\": must be a whole"},
        {"{\"num_local_experts\": 0}", false, "config.json: num_local_experts=0: need at least 1"},
        {"{\"hidden_act\": \"gelu\"}", true, "config.json: hidden_act=\"gelu\""},
        {"{\"num_hidden_layers\": 2, \"num_hidden_layers\": 3}", true, "given twice"},
        {"{\"head_dim\": 7}", true, "head_dim=7: must be even"},
        {"{\"num_experts_per_tok\": 9}", true,
         "config.json: num_experts_per_tok=9: must be <= num_local_experts (8)"},
        {"{\"num_local_expert\": 4}", true, "did you mean \"num_local_experts\""},
        {"{\"rms_norm_eps\": 0}", true, "rms_norm_eps=0"},
        {"[1]", true, "config.json: must be one JSON object"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        o = cJSON_Parse(cases[i].json);
        rc = model_config_from_json(o, cases[i].strict, "config.json", &cfg);
        CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), cases[i].fragment) &&
                  s_one_line(semoe_err_msg()),
              "%s: want '%s', got '%s'", cases[i].json, cases[i].fragment, semoe_err_msg());
        cJSON_Delete(o);
    }
    /* lenient: a key given twice takes its last value, as Python's json does */
    o = cJSON_Parse("{\"num_hidden_layers\": 2, \"num_hidden_layers\": 3}");
    rc = model_config_from_json(o, false, "config.json", &cfg);
    CHECK(rc == SEMOE_OK && cfg.num_hidden_layers == 3, "last wins: %s", semoe_err_msg());
    cJSON_Delete(o);

    /* the config's own JSON reads back the same, strictly and leniently */
    model_config_defaults(&cfg);
    cfg.sliding_window = 4096;
    cfg.head_dim = 48;
    cfg.rms_norm_eps = 1.0 / 3.0;
    cfg.tie_word_embeddings = true;
    o = model_config_to_json(&cfg);
    for (int strict = 0; strict < 2; strict++) {
        model_config_t back;
        rc = model_config_from_json(o, strict, "back.json: model", &back);
        CHECK(rc == SEMOE_OK && s_config_equal(&cfg, &back), "config round trip (strict %d): %s",
              strict, semoe_err_msg());
    }
    cJSON_Delete(o);

    model_config_defaults(&cfg);
    cfg.num_key_value_heads = 3;
    rc = model_config_validate(&cfg, "x.json: model");
    CHECK(rc == SEMOE_EINVAL &&
              s_starts(semoe_err_msg(), "x.json: model.num_key_value_heads=3: must divide num_attention_heads (4)"),
          "validate: %s", semoe_err_msg());
}

/* Each file in tests/jobs/bad and what its one-line error must contain. */
static const struct {
    const char *file;
    const char *fragment;  /* the field (or position) the message names */
    const char *fix;       /* and a piece of the rest */
} s_bad[] = {
    {"invalid_json.json", "invalid_json.json:4:3:", "invalid JSON near '}'"},
    {"empty.json", "empty.json:1:1:", "empty"},
    {"trailing_garbage.json", "trailing_garbage.json:4:1:", "invalid JSON near '{\"again\": 1}'"},
    {"unknown_key.json", "train.lr_max: unknown key", "did you mean \"lr\""},
    {"unknown_section.json", "trian: unknown section", "did you mean \"train\""},
    {"zero_experts.json", "model.num_local_experts=0:", "need at least 1 expert per MoE layer"},
    {"topk_gt_experts.json", "model.num_experts_per_tok=9:", "must be <= num_local_experts (8)"},
    {"wrong_type.json", "train.seq_len=\"128\":", "not a string"},
    {"fractional_int.json", "model.hidden_size=128.5:", "whole number"},
    {"negative_int.json", "train.global_batch=-1:", ">= 0"},
    {"beyond_uint32.json", "cluster.expected_workers=4294967296:", "<= 4294967295"},
    {"heads_not_dividing.json", "model.num_attention_heads=5:", "must divide hidden_size (128)"},
    {"kv_not_dividing.json", "model.num_key_value_heads=3:", "must divide num_attention_heads"},
    {"missing_model_file.json", "bad/no_such_dir/config.json: cannot read",
     "No such file or directory"},
    {"hf_zero_experts.json", "hf_zero_experts/config.json: num_local_experts=0:",
     "need at least 1 expert"},
    {"heartbeat_too_small.json", "cluster.heartbeat_ms=5:", "10.."},
    {"liveness_zero.json", "cluster.liveness=0:", "1.."},
    {"heldout_one.json", "data.heldout_fraction=1:", "[0, 1)"},
    {"path_not_string.json", "data.paths[1]=7:", "file or directory"},
    {"micro_gt_global.json", "train.micro_batch=16:", "<= train.global_batch (8)"},
    {"seq_len_gt_positions.json", "train.seq_len=2048:", "max_position_embeddings (1024)"},
    {"bad_schedule.json", "train.schedule=\"linear\":", "\"cosine\" or \"constant\""},
    {"bad_precision.json", "train.precision=\"fp16\":", "\"fp32\" or \"bf16\""},
    {"bad_collectives.json", "train.collectives=\"mpi\":", "\"zmq\" or \"nccl\""},
    {"a2a_chunks_0.json", "train.a2a_chunks=0:", "1 to 16"},
    {"a2a_chunks_17.json", "train.a2a_chunks=17:", "1 to 16"},
    {"a2a_chunks_gt_seq.json", "train.a2a_chunks=8:", "<= train.seq_len"},
    {"duplicate_key.json", "train.steps:", "given twice"},
    {"not_object.json", "not_object.json: must be one JSON object", "not an array"},
    {"section_not_object.json", "train=[...]:", "must be an object"},
    {"bool_as_number.json", "model.tie_word_embeddings=1:", "true or false"},
    {"bad_bytes.json", "storage.ssd_bytes=\"12 parsecs\":", "GiB"},
    {"threshold_below_one.json", "elastic.threshold=0.9:", ">= 1"},
};
#define S_NBAD (sizeof s_bad / sizeof s_bad[0])

/* train.router_bias and train.freeze_router: read, checked against the model's experts, and
 * written back by model_job_to_json. */
static void test_router_options(void)
{
    model_job_t *job = NULL;
    const char *ok = "{\"model\": {\"num_local_experts\": 4, \"num_experts_per_tok\": 2},"
                     " \"train\": {\"router_bias\": [4, -0.25, 0, 1e-3], "
                     "\"freeze_router\": true}}";
    semoe_rc rc = model_job_parse(ok, strlen(ok), "job.json", &job);
    CHECK(rc == SEMOE_OK, "router options: %s", semoe_err_msg());
    if (job) {
        const double *b = job->train.router_bias;
        CHECK(b && b[0] == 4 && b[1] == -0.25 && b[2] == 0 && b[3] == 1e-3 &&
                  job->train.freeze_router, "router options read back wrong");
        s_check_round_trip(job, "router options");
        char *text = model_job_to_json(job);
        CHECK(strstr(text, "\"router_bias\"") && strstr(text, "\"freeze_router\":\ttrue"),
              "router options missing from the job's JSON:\n%s", text);
        free(text);
    }
    model_job_destroy(&job);
    /* null is no bias; the default is none, and not frozen */
    const char *none = "{\"train\": {\"router_bias\": null}}";
    rc = model_job_parse(none, strlen(none), "job.json", &job);
    CHECK(rc == SEMOE_OK && job && !job->train.router_bias && !job->train.freeze_router,
          "router_bias null: %s", semoe_err_msg());
    if (job) {
        char *text = model_job_to_json(job);
        CHECK(!strstr(text, "router_bias"), "no bias written as one:\n%s", text);
        free(text);
    }
    model_job_destroy(&job);
    const char *cases[][2] = {
        {"{\"train\": {\"router_bias\": [1, 2]}}",
         "train.router_bias=[...]: 2 values: need 8, one per expert (model.num_local_experts=8)"},
        {"{\"model\": {\"num_local_experts\": 2, \"num_experts_per_tok\": 1}, "
         "\"train\": {\"router_bias\": [1, 2, 3]}}", "3 values: need 2"},
        {"{\"train\": {\"router_bias\": 4}}", "train.router_bias=4: must be an array of 8"},
        {"{\"train\": {\"router_bias\": [0, 0, 0, \"4\", 0, 0, 0, 0]}}",
         "train.router_bias[3]=\"4\": must be a number"},
        {"{\"train\": {\"router_bias\": [0, 0, 0, 0, 0, 1e999, 0, 0]}}",
         "train.router_bias[5]=inf: must be a finite number in [-1000, 1000]"},
        {"{\"train\": {\"router_bias\": [0, 0, 0, 0, 0, 0, 0, -5000]}}",
         "train.router_bias[7]=-5000: must be a finite"},
        {"{\"train\": {\"freeze_router\": 1}}", "train.freeze_router=1: "},
        {"{\"train\": {\"router_bias\": [], \"router_bias\": []}}", "given twice"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        rc = model_job_parse(cases[i][0], strlen(cases[i][0]), "job.json", &job);
        CHECK(rc == SEMOE_EINVAL && job == NULL && strstr(semoe_err_msg(), cases[i][1]) &&
                  s_one_line(semoe_err_msg()),
              "%s: want '%s', got '%s'", cases[i][0], cases[i][1], semoe_err_msg());
        model_job_destroy(&job);
    }
}

static void test_bad_specs(void)
{
    for (size_t i = 0; i < S_NBAD; i++) {
        char rel[256];
        snprintf(rel, sizeof rel, "tests/jobs/bad/%s", s_bad[i].file);
        char path[4096];
        snprintf(path, sizeof path, "%s", s_path(rel));
        model_job_t *job = NULL;
        semoe_rc rc = model_job_load(path, &job);
        const char *msg = semoe_err_msg();
        CHECK(rc == SEMOE_EINVAL && job == NULL, "%s: rc %d", s_bad[i].file, (int)rc);
        CHECK(s_starts(msg, path), "%s: message does not start with the path: %s", s_bad[i].file,
              msg);
        CHECK(s_one_line(msg), "%s: not one line: %s", s_bad[i].file, msg);
        CHECK(strstr(msg, s_bad[i].fragment), "%s: want '%s' in: %s", s_bad[i].file,
              s_bad[i].fragment, msg);
        CHECK(strstr(msg, s_bad[i].fix), "%s: want '%s' in: %s", s_bad[i].file, s_bad[i].fix,
              msg);
        model_job_destroy(&job);
    }
    /* every bad spec on disk is in the table */
    DIR *d = opendir(s_path("tests/jobs/bad"));
    CHECK(d != NULL, "opendir tests/jobs/bad");
    for (struct dirent *e; d && (e = readdir(d)) != NULL;) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 5, ".json") != 0)
            continue;
        bool listed = false;
        for (size_t i = 0; i < S_NBAD; i++)
            listed |= strcmp(s_bad[i].file, e->d_name) == 0;
        CHECK(listed, "tests/jobs/bad/%s has no row in s_bad", e->d_name);
    }
    if (d)
        closedir(d);
}

static void test_read_errors(void)
{
    model_job_t *job = NULL;
    semoe_rc rc = model_job_load("/nonexistent/job.json", &job);
    CHECK(rc == SEMOE_EINVAL && strcmp(semoe_err_msg(), "/nonexistent/job.json: cannot read: "
                                       "No such file or directory") == 0,
          "missing file: %s", semoe_err_msg());
    rc = model_job_load(s_path("tests/jobs"), &job);
    CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), "cannot read: Is a directory"),
          "directory: %s", semoe_err_msg());

    /* more than 16 MiB: refused from text and from a (sparse) file */
    size_t big = (16u << 20) + 1;
    char *text = malloc(big);
    memset(text, ' ', big);
    rc = model_job_parse(text, big, "big.json", &job);
    CHECK(rc == SEMOE_EINVAL && s_starts(semoe_err_msg(), "big.json: ") &&
              strstr(semoe_err_msg(), "too large"), "big text: %s", semoe_err_msg());
    free(text);
    char tmp[] = "/tmp/semoe_test_job_XXXXXX";
    int fd = mkstemp(tmp);
    CHECK(fd >= 0, "mkstemp");
    if (fd >= 0) {
        CHECK(ftruncate(fd, (off_t)big) == 0, "ftruncate");
        close(fd);
        rc = model_job_load(tmp, &job);
        CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), "too large"), "big file: %s",
              semoe_err_msg());
        unlink(tmp);
    }

    const char nul[] = "{\"train\": {}}\0 {";
    rc = model_job_parse(nul, sizeof nul - 1, "nul.json", &job);
    CHECK(rc == SEMOE_EINVAL && s_starts(semoe_err_msg(), "nul.json:1:14: invalid JSON"),
          "NUL byte: %s", semoe_err_msg());
    const char *cases[][2] = {
        {"{\"model\": {\"hidden_size\": 1e999}}", "model.hidden_size=inf: must be a finite"},
        {"{\"model\": {\"rope_theta\": 1e999}}", "model.rope_theta=inf: must be a finite"},
        {"{\"train\": {\"seed\": 9007199254740994}}", "train.seed=9007199254740994: must be <="},
        {"{\"model\": {\"hidden_act\": \"a\\nb\\u0001c\"}}", "model.hidden_act=\"a\\nb\\x01c\": semoe"},
        {"{\"model\": null}", "job.json: model=null: must be an object"},
        {"{\"model\": \"\"}", "job.json: model=\"\": must be an object"},
        {"{\"data\": {\"paths\": []}}", "data.paths=[]: give at least one"},
        {"{\"data\": {\"paths\": {}}}", "data.paths={}: must be a file"},
        {"{\"storage\": {\"ssd_bytes\": 1}}", "storage.ssd_bytes=1: needs storage.ssd_dir"},
        {"{\"cluster\": {\"expected_workers\": 2}, \"elastic\": {\"min_replicas\": 3}}",
         "elastic.min_replicas=3: must be <= cluster.expected_workers (2)"},
        {"{\"train\": {\"lr\": 1e-3, \"min_lr\": 1e-2}}", "train.min_lr=0.01: must be in [0"},
        {"{\"\\n\\u0000x\": 1}", "job.json: \\n: unknown section"},
        {"{\"train\": {\"seq_len\": 128,,}}", "job.json:1:27: invalid JSON near"},
        {"{\"a\": 1\"b\": 2}", "job.json:1:8: invalid JSON near '{\"a\": 1\"b\": 2}'"},
        {"{,}", "job.json:1:2: invalid JSON near '{,}'"},
        {"{\"train\": {\"seq_len\": 128,,}}", "128,,}}'"},
        {"{\"train\": ", "job.json:1:11: invalid JSON: unexpected end of input"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        rc = model_job_parse(cases[i][0], strlen(cases[i][0]), "job.json", &job);
        CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), cases[i][1]) &&
                  s_one_line(semoe_err_msg()) && job == NULL,
              "%s: want '%s', got '%s'", cases[i][0], cases[i][1], semoe_err_msg());
    }
    /* byte counts: numbers, and strings with units */
    const char *ok = "{\"storage\": {\"hbm_bytes\": \"80 GiB\", \"host_bytes\": \"16EiB\"}}";
    rc = model_job_parse(ok, strlen(ok), "job.json", &job);
    CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), "storage.host_bytes=\"16EiB\""),
          "EiB is no unit: %s", semoe_err_msg());
    ok = "{\"storage\": {\"hbm_bytes\": \"80 GiB\", \"host_bytes\": \"18446744073709551615\", "
         "\"ssd_bytes\": \"2tb\", \"ssd_dir\": \"/ssd\"}}";
    rc = model_job_parse(ok, strlen(ok), "job.json", &job);
    CHECK(rc == SEMOE_OK, "bytes: %s", semoe_err_msg());
    if (job) {
        CHECK(job->storage.hbm_bytes == 80ull << 30 &&
                  job->storage.host_bytes == 18446744073709551615ull &&
                  job->storage.ssd_bytes == 2000000000000ull, "byte units");
        s_check_round_trip(job, "bytes beyond 2^53");
    }
    model_job_destroy(&job);
}

/* A random JSON value of any type, biased towards the edges of the ranges. */
static cJSON *s_random_value(void)
{
    static const char *strings[] = {"", "silu", "cosine", "constant", "128", "a\nb", "\x01\x7f",
                                    "tiny_hf/config.json", "/usr/share/games/fortunes", "64GiB",
                                    "\xff\xfe", "x\"y\\z"};
    switch (test_rand_below(14)) {
    case 0: return cJSON_CreateNumber((double)test_rand_below(10));
    case 1: return cJSON_CreateNumber(-(double)test_rand_below(3) - 1);
    case 2: return cJSON_CreateNumber(test_rand_unit() * 4);
    case 3: return cJSON_CreateNumber(ldexp(1.0, (int)test_rand_below(70)));
    case 4: return cJSON_CreateNumber(4294967296.0 + (double)test_rand_below(2) - 1);
    case 5: return cJSON_CreateString(strings[test_rand_below(sizeof strings / sizeof *strings)]);
    case 6: return cJSON_CreateBool(test_rand_below(2));
    case 7: return cJSON_CreateNull();
    case 8: return cJSON_CreateArray();
    case 9: {
        cJSON *a = cJSON_CreateArray();
        for (uint64_t i = test_rand_below(4); i > 0; i--)
            cJSON_AddItemToArray(a, cJSON_CreateString(strings[test_rand_below(4)]));
        return a;
    }
    case 10: return cJSON_CreateObject();
    case 11: return cJSON_CreateNumber(1e300 * (test_rand_below(2) ? 1e300 : -1e300));
    case 12: return cJSON_CreateNumber((double)test_rand_below(5000));
    default: return cJSON_CreateNumber(test_rand_unit());
    }
}

static void s_collect(cJSON *node, cJSON **objs, int *n, int cap)
{
    if (cJSON_IsObject(node) && *n < cap)
        objs[(*n)++] = node;
    for (cJSON *c = node->child; c; c = c->next)
        s_collect(c, objs, n, cap);
}

static cJSON *s_random_child(cJSON *o)
{
    int n = cJSON_GetArraySize(o);
    return n ? cJSON_GetArrayItem(o, (int)test_rand_below((uint64_t)n)) : NULL;
}

/* One structural mutation somewhere in the tree. */
static void s_mutate(cJSON *root)
{
    static const char *keys[] = {"model", "train", "data", "cluster", "elastic", "storage",
                                 "hidden_size", "num_local_experts", "num_experts_per_tok",
                                 "head_dim", "seq_len", "global_batch", "micro_batch", "lr",
                                 "paths", "heartbeat_ms", "liveness", "threshold", "ssd_bytes",
                                 "ssd_dir", "schedule", "hidden_act", "sliding_window",
                                 "lr_max", "Hidden_Size", "", "\n", "architectures",
                                 "router_bias", "freeze_router", "precision", "collectives",
                                 "a2a_chunks"};
    cJSON *objs[64];
    int n = 0;
    s_collect(root, objs, &n, 64);
    if (n == 0)
        return;
    cJSON *o = objs[test_rand_below((uint64_t)n)];
    cJSON *c = s_random_child(o);
    switch (test_rand_below(5)) {
    case 0: /* delete a key */
        if (c)
            cJSON_Delete(cJSON_DetachItemViaPointer(o, c));
        break;
    case 1: /* change a value's type or value */
        if (c)
            cJSON_ReplaceItemViaPointer(o, c, s_random_value());
        break;
    case 2: /* a key, known somewhere or not, maybe repeated */
        cJSON_AddItemToObject(o, keys[test_rand_below(sizeof keys / sizeof *keys)],
                              s_random_value());
        break;
    case 3: /* a plausible number where a number was: hits the relations */
        if (c && cJSON_IsNumber(c))
            cJSON_SetNumberValue(c, floor(c->valuedouble * test_rand_unit() * 2.5));
        break;
    default: /* a random unknown key */ {
        char key[12];
        for (int i = 0; i < 11; i++)
            key[i] = (char)(1 + test_rand_below(255));
        key[test_rand_below(11) + 1] = 0;
        cJSON_AddItemToObject(o, key, s_random_value());
    }
    }
}

/* Checks one parse of fuzzed text: accepted specs round-trip, rejections are one line from the
 * origin. Returns whether it was accepted. */
static bool s_check_fuzzed(const char *text, size_t len, const char *origin)
{
    /* exactly len bytes, no NUL after them: the sanitizers catch a read past the end */
    char *exact = malloc(len ? len : 1);
    memcpy(exact, text, len);
    model_job_t *job = NULL;
    semoe_rc rc = model_job_parse(exact, len, origin, &job);
    free(exact);
    if (rc == SEMOE_OK) {
        CHECK(job != NULL, "accepted without a job");
        if (job)
            s_check_round_trip(job, "fuzzed");
        model_job_destroy(&job);
        return true;
    }
    const char *msg = semoe_err_msg();
    CHECK(rc == SEMOE_EINVAL && job == NULL, "rc %d", (int)rc);
    CHECK(s_starts(msg, origin), "message not from the origin: %s", msg);
    CHECK(s_one_line(msg), "message not one line: %s", msg);
    return false;
}

static void test_fuzz(void)
{
    const char *seeds[] = {"deploy/jobs/demo.json", "tests/jobs/small.json",
                           "tests/jobs/from_hf.json"};
    int accepted = 0, rejected = 0;
    for (size_t s = 0; s < sizeof seeds / sizeof seeds[0]; s++) {
        size_t len = 0;
        char origin[4096];
        snprintf(origin, sizeof origin, "%s", s_path(seeds[s]));
        char *base = s_slurp(origin, &len);
        CHECK(base != NULL, "read %s", seeds[s]);
        if (!base)
            continue;
        for (int iter = 0; iter < 300; iter++) {
            cJSON *root = cJSON_Parse(base);
            for (uint64_t m = 1 + test_rand_below(4); m > 0; m--)
                s_mutate(root);
            char *text = cJSON_PrintUnformatted(root);
            s_check_fuzzed(text, strlen(text), origin) ? accepted++ : rejected++;
            cJSON_free(text);
            cJSON_Delete(root);
        }
        /* bytes: flips, inserts, deletes and cuts of the file's text */
        char *buf = malloc(len + 64);
        for (int iter = 0; iter < 300; iter++) {
            memcpy(buf, base, len);
            size_t n = len;
            for (uint64_t m = 1 + test_rand_below(3); m > 0 && n > 0; m--) {
                size_t at = test_rand_below(n);
                static const char pick[] = "{}[]\",:\n\\ 0e-.\x00\xff";
                char b = test_rand_below(2) ? pick[test_rand_below(sizeof pick - 1)]
                                            : (char)test_rand_below(256);
                switch (test_rand_below(4)) {
                case 0: buf[at] = b; break;
                case 1: memmove(buf + at + 1, buf + at, n - at); buf[at] = b; n++; break;
                case 2: memmove(buf + at, buf + at + 1, n - at - 1); n--; break;
                default: n = at; break;
                }
            }
            s_check_fuzzed(buf, n, origin) ? accepted++ : rejected++;
        }
        free(buf);
        free(base);
    }
    printf("fuzz: %d accepted, %d rejected\n", accepted, rejected);
    CHECK(accepted > 0 && rejected > 0, "fuzz exercised both outcomes");
}

int main(void)
{
    test_init("job");
    const char *src = getenv("SEMOE_SRC");
    if (src && *src)
        s_src = src;
    test_defaults();
    test_demo();
    test_small();
    test_from_hf();
    test_config_modes();
    test_router_options();
    test_bad_specs();
    test_read_errors();
    test_fuzz();
    return test_finish();
}
