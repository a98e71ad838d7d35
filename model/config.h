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

/* Mixtral's defaults scaled to a small byte-level model: vocab 256, hidden 128, 4 layers of 8
 * experts (top-2), 4 heads over 2 key/value heads. The defaults of a job spec's model section. */
void model_config_defaults(model_config_t *cfg);

/* MixtralConfig()'s own defaults in transformers (vocab 32000, hidden 4096, 32 layers, ...): what
 * a key that a config.json leaves out means. */
void model_config_hf_defaults(model_config_t *cfg);

/* Reads obj into *cfg. strict (job spec): starts from model_config_defaults, unknown or repeated
 * keys are errors. lenient (a config.json transformers wrote): starts from
 * model_config_hf_defaults, unknown keys are ignored, rope_theta may come from
 * rope_parameters.rope_theta, and model_type, when given, must be "mixtral". head_dim null or
 * absent means hidden_size / num_attention_heads, sliding_window null means none (0). where
 * names the origin in messages: "ORIGIN: SECTION" ("job.json: model", fields then read
 * "job.json: model.hidden_size=...") or just "ORIGIN" ("config.json": "config.json:
 * hidden_size=..."); SECTION is one identifier. Checks every field and their relations. */
semoe_rc model_config_from_json(const cJSON *obj, bool strict, const char *where,
                                model_config_t *cfg);
/* The same with the origin and the section ("" for none) apart. */
semoe_rc model_config_read(const cJSON *obj, bool strict, const char *origin, const char *section,
                           model_config_t *cfg);

/* Reads a Hugging Face config.json, leniently; messages start with path. */
semoe_rc model_config_load_hf(const char *path, model_config_t *cfg);
/* The same, messages starting with origin ("job.json: model: /x/config.json"). */
semoe_rc model_config_load_hf_as(const char *path, const char *origin, model_config_t *cfg);

/* Checks the fields' ranges and relations; the message names the field, value and fix. where
 * as for model_config_from_json. */
semoe_rc model_config_validate(const model_config_t *cfg, const char *where);

/* Every field under its MixtralConfig name (sliding_window 0 as null): a job spec's model section
 * that model_config_from_json reads back to the same config, strictly or leniently. The caller
 * owns the object (cJSON_Delete). */
cJSON *model_config_to_json(const model_config_t *cfg);

/* The config.json of a Hugging Face Mixtral checkpoint (model_type, architectures, float
 * fields written as floats), as text the caller frees. */
char *model_config_hf_json(const model_config_t *cfg);

#endif
