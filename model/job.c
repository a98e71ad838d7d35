/* The job spec (model/job.h): one JSON object of sections model, train, data, cluster, elastic
 * and storage, read strictly (unknown keys are errors), checked field by field and across
 * sections, each error one line naming the file, the field, the value and the fix. */
#include "model/job.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/graph.h"
#include "model/spec.h"

#define S_MAX_PATHS 4096u
#define S_MAX_PATH_LEN 4095u
#define S_MIN_HEARTBEAT_MS 10u
#define S_MAX_HEARTBEAT_MS 600000u /* ten minutes; with S_MAX_LIVENESS the product fits an int */
#define S_MAX_LIVENESS 1000u
#define S_MAX_WORKERS (1u << 20)
/* A router bias of this size already decides the top-k outright; larger ones only cost the
 * logits their float precision. */
#define S_MAX_ROUTER_BIAS 1000.0

#define S_FIELD(sec, name, kind)                                                              \
    {#name, kind, offsetof(model_job_t, sec.name), sizeof(((model_job_t *)0)->sec.name), false}
#define S_OTHER(name) {name, MODEL_SPEC_OTHER, 0, 0, false}
#define S_LEN(a) (sizeof(a) / sizeof((a)[0]))

static const model_spec_field_t s_top[] = {
    S_OTHER("model"), S_OTHER("train"),   S_OTHER("data"),
    S_OTHER("cluster"), S_OTHER("elastic"), S_OTHER("storage"),
};
enum { S_MODEL, S_TRAIN, S_DATA, S_CLUSTER, S_ELASTIC, S_STORAGE };

static const model_spec_field_t s_train[] = {
    S_FIELD(train, seq_len, MODEL_SPEC_U32),
    S_FIELD(train, global_batch, MODEL_SPEC_U32),
    S_FIELD(train, micro_batch, MODEL_SPEC_U32),
    S_FIELD(train, lr, MODEL_SPEC_F64),
    S_FIELD(train, min_lr, MODEL_SPEC_F64),
    S_FIELD(train, warmup_steps, MODEL_SPEC_U32),
    S_FIELD(train, schedule, MODEL_SPEC_STR),
    S_FIELD(train, weight_decay, MODEL_SPEC_F64),
    S_FIELD(train, beta1, MODEL_SPEC_F64),
    S_FIELD(train, beta2, MODEL_SPEC_F64),
    S_FIELD(train, eps, MODEL_SPEC_F64),
    S_FIELD(train, grad_clip, MODEL_SPEC_F64),
    S_FIELD(train, steps, MODEL_SPEC_U64),
    S_FIELD(train, seed, MODEL_SPEC_U64),
    S_FIELD(train, checkpoint_dir, MODEL_SPEC_STR),
    S_FIELD(train, checkpoint_interval, MODEL_SPEC_U32),
    S_FIELD(train, eval_interval, MODEL_SPEC_U32),
    S_FIELD(train, freeze_router, MODEL_SPEC_BOOL),
    S_FIELD(train, precision, MODEL_SPEC_STR),
    S_FIELD(train, collectives, MODEL_SPEC_STR),
    S_FIELD(train, a2a_chunks, MODEL_SPEC_U32),
    S_OTHER("router_bias"),
};
#define S_TRAIN_ROUTER_BIAS (S_LEN(s_train) - 1)

static const model_spec_field_t s_data[] = {
    S_OTHER("paths"),
    S_FIELD(data, heldout_fraction, MODEL_SPEC_F64),
};
enum { S_DATA_PATHS };

static const model_spec_field_t s_cluster[] = {
    S_FIELD(cluster, heartbeat_ms, MODEL_SPEC_U32),
    S_FIELD(cluster, liveness, MODEL_SPEC_U32),
    S_FIELD(cluster, expected_workers, MODEL_SPEC_U32),
};

static const model_spec_field_t s_elastic[] = {
    S_FIELD(elastic, threshold, MODEL_SPEC_F64),
    S_FIELD(elastic, window, MODEL_SPEC_U32),
    S_FIELD(elastic, patience, MODEL_SPEC_U32),
    S_FIELD(elastic, min_replicas, MODEL_SPEC_U32),
};

static const model_spec_field_t s_storage[] = {
    S_FIELD(storage, hbm_bytes, MODEL_SPEC_BYTES),
    S_FIELD(storage, host_bytes, MODEL_SPEC_BYTES),
    S_FIELD(storage, ssd_bytes, MODEL_SPEC_BYTES),
    S_FIELD(storage, ssd_dir, MODEL_SPEC_STR),
};

void model_job_defaults(model_job_t *job)
{
    memset(job, 0, sizeof *job);
    model_config_defaults(&job->model);
    job->train.seq_len = 128;
    job->train.global_batch = 32;
    job->train.micro_batch = 8;
    job->train.lr = 1e-3;
    job->train.min_lr = 1e-4;
    job->train.warmup_steps = 100;
    snprintf(job->train.schedule, sizeof job->train.schedule, "cosine");
    snprintf(job->train.precision, sizeof job->train.precision, "fp32");
    snprintf(job->train.collectives, sizeof job->train.collectives, "zmq");
    job->train.a2a_chunks = 1;
    job->train.weight_decay = 0.1;
    job->train.beta1 = 0.9;
    job->train.beta2 = 0.95;
    job->train.eps = 1e-8;
    job->train.grad_clip = 1.0;
    job->train.steps = 1000;
    job->train.seed = 1337;
    job->train.checkpoint_interval = 100;
    job->train.eval_interval = 100;
    job->data.heldout_fraction = 0.05;
    job->cluster.heartbeat_ms = 1000;
    job->cluster.liveness = 3;
    job->cluster.expected_workers = 0;
    job->elastic.threshold = 1.3;
    job->elastic.window = 10;
    job->elastic.patience = 5;
    job->elastic.min_replicas = 1;
}

void model_job_destroy(model_job_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    model_job_t *job = *self_p;
    for (uint32_t i = 0; i < job->data.n_paths; i++)
        free(job->data.paths[i]);
    free(job->data.paths);
    free(job->train.router_bias);
    free(job->json);
    free(job);
    *self_p = NULL;
}

/* "model": "path/to/config.json", relative to the directory of origin (read as a path). */
static semoe_rc s_read_hf_model(const cJSON *item, const char *origin, model_config_t *cfg)
{
    model_spec_where_t w = {origin, ""};
    const char *rel = item->valuestring;
    if (!*rel)
        return model_spec_err_item(w, "model", item, "must be an object of MixtralConfig fields "
                                                     "or the path of a config.json");
    if (strlen(rel) > S_MAX_PATH_LEN)
        return model_spec_err_item(w, "model", item, "path too long (at most %u bytes)",
                                   S_MAX_PATH_LEN);
    const char *slash = strrchr(origin, '/');
    size_t dir = rel[0] == '/' || !slash ? 0 : (size_t)(slash - origin) + 1;
    size_t n = dir + strlen(rel) + 1;
    char *path = semoe_xmalloc(n);
    snprintf(path, n, "%.*s%s", (int)dir, origin, rel);
    size_t on = strlen(origin) + strlen(path) + 16;
    char *hf_origin = semoe_xmalloc(on);
    snprintf(hf_origin, on, "%s: model: %s", origin, path);
    semoe_rc rc = model_config_load_hf_as(path, hf_origin, cfg);
    free(hf_origin);
    free(path);
    return rc;
}

/* One path of data.paths: a non-empty string that a path buffer holds. */
static semoe_rc s_check_path(const cJSON *e, model_spec_where_t w, const char *key)
{
    if (!cJSON_IsString(e) || !*e->valuestring)
        return model_spec_err_item(w, key, e, "must be a file or directory (a non-empty string)");
    if (strlen(e->valuestring) > S_MAX_PATH_LEN)
        return model_spec_err_item(w, key, e, "path too long (at most %u bytes)", S_MAX_PATH_LEN);
    return SEMOE_OK;
}

/* data.paths: a string or a non-empty array of strings, each a file or directory. */
static semoe_rc s_read_paths(const cJSON *item, model_spec_where_t w, model_job_t *job)
{
    uint32_t n = 1;
    if (cJSON_IsArray(item)) {
        int size = cJSON_GetArraySize(item);
        if (size == 0)
            return model_spec_err_item(w, "paths", item, "give at least one file or directory");
        if ((unsigned)size > S_MAX_PATHS)
            return model_spec_err(w, "paths", NULL, "%d paths: at most %u (name directories "
                                  "instead of their files)", size, S_MAX_PATHS);
        n = (uint32_t)size;
        int i = 0;
        for (const cJSON *e = item->child; e; e = e->next, i++) {
            char key[32];
            snprintf(key, sizeof key, "paths[%d]", i);
            SEMOE_CHECK(s_check_path(e, w, key));
        }
    } else if (cJSON_IsString(item)) {
        SEMOE_CHECK(s_check_path(item, w, "paths"));
    } else {
        return model_spec_err_item(w, "paths", item,
                                   "must be a file or directory, or an array of them");
    }
    job->data.paths = semoe_xcalloc(n, sizeof *job->data.paths);
    const cJSON *e = cJSON_IsArray(item) ? item->child : item;
    for (uint32_t i = 0; i < n; i++, e = e->next)
        job->data.paths[i] = semoe_xstrdup(e->valuestring);
    job->data.n_paths = n;
    return SEMOE_OK;
}

/* train.router_bias: null (none) or one finite number per expert of a layer, within
 * +-S_MAX_ROUTER_BIAS; the model section is read by now. */
static semoe_rc s_read_router_bias(const cJSON *item, model_spec_where_t w, model_job_t *job)
{
    if (cJSON_IsNull(item))
        return SEMOE_OK;
    uint32_t E = job->model.num_local_experts;
    if (!cJSON_IsArray(item))
        return model_spec_err_item(w, "router_bias", item, "must be an array of %u numbers, one "
                                   "per expert (model.num_local_experts), or null", E);
    int size = cJSON_GetArraySize(item);
    if ((uint32_t)size != E)
        return model_spec_err_item(w, "router_bias", item, "%d values: need %u, one per expert "
                                   "(model.num_local_experts=%u)", size, E, E);
    int i = 0;
    for (const cJSON *e = item->child; e; e = e->next, i++) {
        char key[40];
        snprintf(key, sizeof key, "router_bias[%d]", i);
        if (!cJSON_IsNumber(e))
            return model_spec_err_item(w, key, e, "must be a number (a logit offset)");
        if (!isfinite(e->valuedouble) || fabs(e->valuedouble) > S_MAX_ROUTER_BIAS)
            return model_spec_err_item(w, key, e, "must be a finite number in [-%g, %g]",
                                       S_MAX_ROUTER_BIAS, S_MAX_ROUTER_BIAS);
    }
    job->train.router_bias = semoe_xcalloc(E, sizeof *job->train.router_bias);
    i = 0;
    for (const cJSON *e = item->child; e; e = e->next)
        job->train.router_bias[i++] = e->valuedouble;
    return SEMOE_OK;
}

static semoe_rc s_validate(const model_job_t *j, const char *origin)
{
    model_spec_where_t w = {origin, "train"};
    const model_config_t *m = &j->model;
    if (j->train.seq_len < 1)
        return model_spec_err_u64(w, "seq_len", j->train.seq_len, "must be >= 1 token");
    if (j->train.seq_len > m->max_position_embeddings)
        return model_spec_err_u64(w, "seq_len", j->train.seq_len,
                                  "must be <= model.max_position_embeddings (%u)",
                                  m->max_position_embeddings);
    if (j->train.global_batch < 1)
        return model_spec_err_u64(w, "global_batch", j->train.global_batch,
                                  "need at least 1 sequence per step");
    if (j->train.micro_batch < 1)
        return model_spec_err_u64(w, "micro_batch", j->train.micro_batch,
                                  "need at least 1 sequence per forward/backward");
    if (j->train.micro_batch > j->train.global_batch)
        return model_spec_err_u64(w, "micro_batch", j->train.micro_batch,
                                  "must be <= train.global_batch (%u)", j->train.global_batch);
    if (!(j->train.lr > 0))
        return model_spec_err_f64(w, "lr", j->train.lr, "must be > 0 (e.g. 1e-3)");
    if (!(j->train.min_lr >= 0 && j->train.min_lr <= j->train.lr))
        return model_spec_err_f64(w, "min_lr", j->train.min_lr,
                                  "must be in [0, train.lr] (lr is %g)", j->train.lr);
    if (strcmp(j->train.schedule, "cosine") != 0 && strcmp(j->train.schedule, "constant") != 0)
        return model_spec_err_str(w, "schedule", j->train.schedule,
                                  "must be \"cosine\" or \"constant\"");
    if (strcmp(j->train.precision, "fp32") != 0 && strcmp(j->train.precision, "bf16") != 0)
        return model_spec_err_str(w, "precision", j->train.precision,
                                  "must be \"fp32\" or \"bf16\" (bf16 runs on GPU workers)");
    if (strcmp(j->train.collectives, "zmq") != 0 && strcmp(j->train.collectives, "nccl") != 0)
        return model_spec_err_str(w, "collectives", j->train.collectives,
                                  "must be \"zmq\" or \"nccl\" (nccl: GPU workers only)");
    if (j->train.a2a_chunks < 1 || j->train.a2a_chunks > MODEL_EXCHANGE_MAX_PARTS)
        return model_spec_err_u64(w, "a2a_chunks", j->train.a2a_chunks,
                                  "must be 1 to 16 (chunks of an MoE layer's tokens)");
    /* every rank's micro-batch has a sequence at least: then every rank cuts as many chunks */
    if (j->train.a2a_chunks > j->train.seq_len)
        return model_spec_err_u64(w, "a2a_chunks", j->train.a2a_chunks,
                                  "must be <= train.seq_len (chunks of a micro-batch's tokens)");
    if (!(j->train.weight_decay >= 0))
        return model_spec_err_f64(w, "weight_decay", j->train.weight_decay, "must be >= 0");
    if (!(j->train.beta1 >= 0 && j->train.beta1 < 1))
        return model_spec_err_f64(w, "beta1", j->train.beta1, "must be in [0, 1) (e.g. 0.9)");
    if (!(j->train.beta2 >= 0 && j->train.beta2 < 1))
        return model_spec_err_f64(w, "beta2", j->train.beta2, "must be in [0, 1) (e.g. 0.95)");
    if (!(j->train.eps > 0))
        return model_spec_err_f64(w, "eps", j->train.eps, "must be > 0 (e.g. 1e-8)");
    if (!(j->train.grad_clip >= 0))
        return model_spec_err_f64(w, "grad_clip", j->train.grad_clip,
                                  "must be >= 0 (0: no clipping)");
    if (j->train.steps < 1)
        return model_spec_err_u64(w, "steps", j->train.steps, "need at least 1 step");

    w.section = "data";
    if (!(j->data.heldout_fraction >= 0 && j->data.heldout_fraction < 1))
        return model_spec_err_f64(w, "heldout_fraction", j->data.heldout_fraction,
                                  "must be in [0, 1) (e.g. 0.05)");

    w.section = "cluster";
    if (j->cluster.heartbeat_ms < S_MIN_HEARTBEAT_MS ||
        j->cluster.heartbeat_ms > S_MAX_HEARTBEAT_MS)
        return model_spec_err_u64(w, "heartbeat_ms", j->cluster.heartbeat_ms,
                                  "must be in %u..%u ms (default 1000)", S_MIN_HEARTBEAT_MS,
                                  S_MAX_HEARTBEAT_MS);
    if (j->cluster.liveness < 1 || j->cluster.liveness > S_MAX_LIVENESS)
        return model_spec_err_u64(w, "liveness", j->cluster.liveness,
                                  "must be in 1..%u missed heartbeats (default 3)",
                                  S_MAX_LIVENESS);
    if (j->cluster.expected_workers > S_MAX_WORKERS)
        return model_spec_err_u64(w, "expected_workers", j->cluster.expected_workers,
                                  "must be <= %u (0: start with whoever joins)", S_MAX_WORKERS);

    w.section = "elastic";
    if (!(j->elastic.threshold >= 1))
        return model_spec_err_f64(w, "threshold", j->elastic.threshold,
                                  "must be >= 1: it bounds max/mean load, never below 1 (e.g. "
                                  "1.3)");
    if (j->elastic.window < 1)
        return model_spec_err_u64(w, "window", j->elastic.window,
                                  "need at least 1 step of smoothing");
    if (j->elastic.min_replicas < 1)
        return model_spec_err_u64(w, "min_replicas", j->elastic.min_replicas,
                                  "every expert needs at least 1 holder");
    if (j->cluster.expected_workers && j->elastic.min_replicas > j->cluster.expected_workers)
        return model_spec_err_u64(w, "min_replicas", j->elastic.min_replicas,
                                  "must be <= cluster.expected_workers (%u): replicas live on "
                                  "distinct workers", j->cluster.expected_workers);

    w.section = "storage";
    if (j->storage.ssd_bytes && !j->storage.ssd_dir[0])
        return model_spec_err_u64(w, "ssd_bytes", j->storage.ssd_bytes,
                                  "needs storage.ssd_dir, the directory the SSD tier writes to");
    return SEMOE_OK;
}

/* Reads one section object into job through its table; absent sections keep the defaults. */
static semoe_rc s_section(const cJSON *item, const char *origin, const char *name,
                          const model_spec_field_t *fields, size_t n, model_job_t *job,
                          const cJSON **items)
{
    if (!item)
        return SEMOE_OK;
    model_spec_where_t w = {origin, name};
    return model_spec_read(item, fields, n, true, w, job, items);
}

static semoe_rc s_parse(const cJSON *root, const char *origin, model_job_t *job)
{
    const cJSON *top[S_LEN(s_top)];
    model_spec_where_t w = {origin, ""};
    SEMOE_CHECK(model_spec_read(root, s_top, S_LEN(s_top), true, w, job, top));

    const cJSON *model = top[S_MODEL];
    if (model && cJSON_IsString(model))
        SEMOE_CHECK(s_read_hf_model(model, origin, &job->model));
    else if (model && cJSON_IsObject(model))
        SEMOE_CHECK(model_config_read(model, true, origin, "model", &job->model));
    else if (model)
        return model_spec_err_item(w, "model", model, "must be an object of MixtralConfig fields "
                                                      "or the path of a config.json");

    const cJSON *train[S_LEN(s_train)] = {0};
    SEMOE_CHECK(s_section(top[S_TRAIN], origin, "train", s_train, S_LEN(s_train), job, train));
    if (train[S_TRAIN_ROUTER_BIAS])
        SEMOE_CHECK(s_read_router_bias(train[S_TRAIN_ROUTER_BIAS],
                                       (model_spec_where_t){origin, "train"}, job));
    const cJSON *data[S_LEN(s_data)] = {0};
    SEMOE_CHECK(s_section(top[S_DATA], origin, "data", s_data, S_LEN(s_data), job, data));
    if (data[S_DATA_PATHS])
        SEMOE_CHECK(s_read_paths(data[S_DATA_PATHS], (model_spec_where_t){origin, "data"}, job));
    SEMOE_CHECK(s_section(top[S_CLUSTER], origin, "cluster", s_cluster, S_LEN(s_cluster), job,
                          NULL));
    SEMOE_CHECK(s_section(top[S_ELASTIC], origin, "elastic", s_elastic, S_LEN(s_elastic), job,
                          NULL));
    SEMOE_CHECK(s_section(top[S_STORAGE], origin, "storage", s_storage, S_LEN(s_storage), job,
                          NULL));
    return s_validate(job, origin);
}

semoe_rc model_job_parse(const char *text, size_t len, const char *origin, model_job_t **out)
{
    *out = NULL;
    if (!origin)
        origin = "job spec";
    if (!text)
        return model_spec_err((model_spec_where_t){origin, ""}, NULL, NULL, "no text given");
    if (len > MODEL_SPEC_MAX_BYTES) /* before copying it */
        return model_spec_err((model_spec_where_t){origin, ""}, NULL, NULL,
                              "%zu bytes: too large for a spec (at most %zu MiB)", len,
                              MODEL_SPEC_MAX_BYTES >> 20);
    model_job_t *job = semoe_xmalloc(sizeof *job);
    model_job_defaults(job);
    job->json = semoe_xmalloc(len + 1);
    memcpy(job->json, text, len);
    job->json[len] = 0;
    job->json_len = len;
    cJSON *root = NULL;
    semoe_rc rc;
    SEMOE_CHECK_GOTO(model_spec_parse(job->json, len, origin, &root), rc, fail);
    SEMOE_CHECK_GOTO(s_parse(root, origin, job), rc, fail);
    cJSON_Delete(root);
    *out = job;
    return SEMOE_OK;
fail:
    cJSON_Delete(root);
    model_job_destroy(&job);
    return rc;
}

semoe_rc model_job_load(const char *path, model_job_t **out)
{
    *out = NULL;
    char *text = NULL;
    size_t len = 0;
    SEMOE_CHECK(model_spec_read_file(path, path, &text, &len));
    semoe_rc rc = model_job_parse(text, len, path, out);
    free(text);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

char *model_job_to_json(const model_job_t *job)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        abort();
    model_spec_put(root, "model", model_config_to_json(&job->model));
    cJSON *train = model_spec_to_json(s_train, S_LEN(s_train), job);
    if (job->train.router_bias) {
        cJSON *bias = cJSON_CreateArray();
        if (!bias)
            abort();
        for (uint32_t i = 0; i < job->model.num_local_experts; i++)
            if (!cJSON_AddItemToArray(bias, cJSON_CreateNumber(job->train.router_bias[i])))
                abort();
        model_spec_put(train, "router_bias", bias);
    }
    model_spec_put(root, "train", train);
    cJSON *data = model_spec_to_json(s_data, S_LEN(s_data), job);
    if (job->data.n_paths) {
        cJSON *paths = cJSON_CreateArray();
        if (!paths)
            abort();
        for (uint32_t i = 0; i < job->data.n_paths; i++)
            if (!cJSON_AddItemToArray(paths, cJSON_CreateString(job->data.paths[i])))
                abort();
        model_spec_put(data, "paths", paths);
    }
    model_spec_put(root, "data", data);
    model_spec_put(root, "cluster", model_spec_to_json(s_cluster, S_LEN(s_cluster), job));
    model_spec_put(root, "elastic", model_spec_to_json(s_elastic, S_LEN(s_elastic), job));
    model_spec_put(root, "storage", model_spec_to_json(s_storage, S_LEN(s_storage), job));
    char *printed = cJSON_Print(root);
    cJSON_Delete(root);
    if (!printed)
        abort();
    char *text = semoe_xstrdup(printed);
    cJSON_free(printed);
    return text;
}
