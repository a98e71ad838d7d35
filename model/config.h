/* The model config: Mixtral's fields, named as Hugging Face's MixtralConfig names them, read
 * strictly from a job spec (unknown keys are errors) or leniently from a config.json that
 * transformers wrote (the fields semoe needs are checked, the rest ignored). */
#ifndef SEMOE_MODEL_CONFIG_H
#define SEMOE_MODEL_CONFIG_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdint.h>

#include "actors/err.h"

typedef struct {
    uint32_t vocab_size;              /* 256: bytes */
    uint32_t hidden_size;             /* D */
    uint32_t intermediate_size;       /* F, per expert */
    uint32_t num_hidden_layers;       /* L; every layer has an MoE block */
    uint32_t num_attention_heads;
    uint32_t num_key_value_heads;     /* grouped-query attention */
    uint32_t head_dim;                /* hidden_size / num_attention_heads unless given */
    uint32_t num_local_experts;       /* E per layer */
    uint32_t num_experts_per_tok;     /* k */
    uint32_t max_position_embeddings;
    uint32_t sliding_window;          /* 0: none */
    double rms_norm_eps;
    double rope_theta;
    double router_aux_loss_coef;
    double router_jitter_noise;
    double initializer_range;
    bool tie_word_embeddings;
    char hidden_act[16];              /* "silu" */
} model_config_t;

/* Mixtral's defaults scaled to a small byte-level model. */
void model_config_defaults(model_config_t *cfg);

/* Reads obj into *cfg (starting from the defaults). strict: unknown keys are errors (job spec);
 * lenient: unknown keys are ignored (a config.json transformers wrote). where names the origin
 * in messages ("job.json: model"). Checks every field and their relations. */
semoe_rc model_config_from_json(const cJSON *obj, bool strict, const char *where,
                                model_config_t *cfg);

/* Reads a Hugging Face config.json, leniently. */
semoe_rc model_config_load_hf(const char *path, model_config_t *cfg);

/* Checks the fields' ranges and relations; the message names the field, value and fix. */
semoe_rc model_config_validate(const model_config_t *cfg, const char *where);

#endif
