/* The job spec: one JSON file with sections model, train, data, cluster, elastic, storage
 * (DESIGN.md). Unknown keys are errors; every error names the file, the field, the value and
 * the fix, e.g. "job.json: model.num_local_experts=0: need at least 1 expert per MoE layer". */
#ifndef SEMOE_MODEL_JOB_H
#define SEMOE_MODEL_JOB_H

#include <stdbool.h>
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
        char checkpoint_dir[1024];  /* a checkpoint root (model/checkpoint.h); "": none */
        uint32_t checkpoint_interval;
        uint32_t eval_interval;
        /* (model.num_local_experts) or NULL: a constant added to every MoE layer's router
         * logits before the softmax and top-k, to skew the routing on purpose (tests,
         * benchmarks). Not a parameter: not trained, not in checkpoints (Mixtral has no router
         * bias), applied by this job's training and evaluation only. */
        double *router_bias;
        bool freeze_router;         /* the router (gate) weights get no update */
        /* "fp32" (every backend) or "bf16": bf16 weights and activations with fp32 master
         * weights, gradients and residual stream (gpu/graph_bf16.h), on GPU workers */
        char precision[8];
        /* bf16 with experts split over workers: each MoE layer's tokens in this many chunks,
         * one chunk's all-to-all beside another's expert GEMMs (Tutel's overlap); 1 (the
         * default): the whole layer at once. 1..16, at most seq_len */
        uint32_t a2a_chunks;
        /* the data plane: "zmq" (the default: the dense gradients' all-reduce and the expert
         * rows' all-to-all over the workers' ZeroMQ peer sockets, staged through the host on
         * GPU workers) or "nccl" (both on the device, every worker a GPU one on a device of its
         * own: a communicator per generation, its id relayed by the coordinator in COMM) */
        char collectives[8];
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

/* The defaults every section starts from (DESIGN.md): the small byte-level model of
 * model_config_defaults, seq_len 128, global batch 32, cosine schedule, heartbeat 1000 ms,
 * liveness 3, no data paths. Allocates nothing (paths and json are NULL). */
void model_job_defaults(model_job_t *job);

/* Reads and checks a job spec file; relative paths in it (a "model" config.json) are relative to
 * the file's directory. On success *job is the caller's (model_job_destroy). Messages start with
 * path. */
semoe_rc model_job_load(const char *path, model_job_t **job);
/* Same from text[0..len) (no NUL needed); origin names it in messages ("job.json") and, read as
 * a path, anchors a relative "model" path (its directory, or the working directory). */
semoe_rc model_job_parse(const char *text, size_t len, const char *origin, model_job_t **job);
/* Frees the job and everything it holds; nulls *self_p. NULL and *self_p NULL are fine. */
void model_job_destroy(model_job_t **self_p);

/* The job as a self-contained spec: every field of every section, the model inlined even when
 * it came from a config.json. model_job_parse reads it back to an equal job (json aside), so it is
 * what a coordinator can hand to workers that cannot see the spec's files. Caller frees the
 * NUL-terminated text with free(). */
char *model_job_to_json(const model_job_t *job);

#endif
