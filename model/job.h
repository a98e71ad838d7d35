/* The job spec: one JSON file with sections model, train, data, cluster, elastic, storage
 * (DESIGN.md). Unknown keys are errors; every error names the file, the field, the value and
 * the fix, e.g. "job.json: model.num_local_experts=0: need at least 1 expert per MoE layer". */
#ifndef SEMOE_MODEL_JOB_H
#define SEMOE_MODEL_JOB_H

#include <stddef.h>
#include <stdint.h>

#include "model/config.h"

typedef struct {
    model_config_t model;
    struct {
        uint32_t seq_len;           /* tokens per sample (a sample is seq_len + 1 bytes) */
        uint32_t global_batch;      /* sequences per step, split by rank */
        uint32_t micro_batch;       /* sequences per forward/backward on one worker */
        double lr, min_lr;          /* peak and final learning rate */
        uint32_t warmup_steps;
        char schedule[16];          /* "cosine" or "constant" */
        double weight_decay, beta1, beta2, eps, grad_clip;
        uint64_t steps;
        uint64_t seed;
        char checkpoint_dir[1024];  /* "" : no checkpoints */
        uint32_t checkpoint_interval;
        uint32_t eval_interval;
    } train;
    struct {
        char **paths;               /* files or directories, as given */
        uint32_t n_paths;
        double heldout_fraction;
    } data;
    struct {
        uint32_t heartbeat_ms;      /* default 1000 */
        uint32_t liveness;          /* missed intervals before a peer is dead; default 3 */
        uint32_t expected_workers;  /* 0: start with whoever joins */
    } cluster;
    struct {
        double threshold;           /* rebalance when smoothed imbalance stays above this */
        uint32_t window;            /* steps of smoothing */
        uint32_t patience;          /* steps above threshold before rebalancing */
        uint32_t min_replicas;      /* every expert on at least this many workers */
    } elastic;
    struct {
        uint64_t hbm_bytes, host_bytes, ssd_bytes; /* per-worker tier budgets, 0: unlimited */
        char ssd_dir[1024];
    } storage;
    char *json;                     /* the spec's text, as read (sent to workers in WELCOME) */
    size_t json_len;
} model_job_t;

/* Reads and checks a job spec file. On success *job is the caller's (model_job_destroy). */
semoe_rc model_job_load(const char *path, model_job_t **job);
/* Same from text; origin names it in messages ("job.json"). */
semoe_rc model_job_parse(const char *text, size_t len, const char *origin, model_job_t **job);
void model_job_destroy(model_job_t **self_p);

#endif
