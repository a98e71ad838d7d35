/* The Mixtral parameter table and slab: every tensor of MixtralForCausalLM under the name its
 * state_dict carries on disk, and one float32 slab holding the dense tensors plus only the
 * experts this worker holds, with a pointer per tensor (llm.c malloc_and_point_parameters). */
#ifndef SEMOE_MODEL_PARAMS_H
#define SEMOE_MODEL_PARAMS_H

#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/config.h"

#define MODEL_PARAM_NAME_MAX 96

typedef enum {
    MODEL_PARAM_DENSE = 0, /* embedding, norms, attention, router, lm_head: every worker */
    MODEL_PARAM_EXPERT,    /* w1/w3/w2 of expert (layer, expert) */
} model_param_kind;

typedef struct {
    char name[MODEL_PARAM_NAME_MAX]; /* "model.layers.3.block_sparse_moe.experts.5.w1.weight" */
    uint32_t ndim;                   /* 1 or 2 */
    uint64_t shape[2];               /* row-major, as torch: (out, in) for a linear */
    uint64_t numel;
    model_param_kind kind;
    int32_t layer;                   /* -1 for embed_tokens, model.norm, lm_head */
    int32_t expert;                  /* j within the layer, -1 for dense tensors */
    uint64_t offset;                 /* in floats into the slab; UINT64_MAX when not held */
    float *data;                     /* into the slab; NULL when this worker does not hold it */
} model_param_t;

typedef struct model_params model_params_t;

/* Builds the table for cfg (every tensor, in state_dict order: embedding, then per layer
 * input_layernorm, q/k/v/o_proj, post_attention_layernorm, gate, experts j: w1, w2, w3, then
 * model.norm, lm_head unless tied) and allocates one zeroed slab for the dense tensors plus the
 * experts listed in experts: global ids layer * E + j, n_experts of them (NULL: every expert).
 * An id out of range or repeated is an error. Caller owns *out (model_params_destroy). */
semoe_rc model_params_new(const model_config_t *cfg, const uint32_t *experts, size_t n_experts,
                          model_params_t **out);
/* Frees the slab and the table; nulls *self_p. NULL or *self_p NULL is a no-op. */
void model_params_destroy(model_params_t **self_p);

/* The config the table was built from. */
const model_config_t *model_params_config(const model_params_t *self);
/* Number of tensors in the table, held or not. */
size_t model_params_count(const model_params_t *self);
/* Tensor i of the table (0 <= i < count), in state_dict order. */
const model_param_t *model_params_at(const model_params_t *self, size_t i);
/* The tensor named name, or NULL. */
const model_param_t *model_params_lookup(const model_params_t *self, const char *name);
/* Index of name in the table, or -1. */
long model_params_index(const model_params_t *self, const char *name);
/* Whether this worker holds expert (layer, j). */
int model_params_holds_expert(const model_params_t *self, uint32_t layer, uint32_t j);

/* Calls fn for every tensor this worker holds, in table order; stops at the first non-OK rc and
 * returns it. */
semoe_rc model_params_foreach(model_params_t *self,
                              semoe_rc (*fn)(model_param_t *p, void *arg), void *arg);

/* The slab and its length in floats (the held tensors back to back, in table order). */
float *model_params_slab(model_params_t *self);
uint64_t model_params_slab_floats(const model_params_t *self);

/* Fills every held tensor deterministically from seed: RMSNorm weights 1, every matrix
 * normal(0, initializer_range) drawn by a counter-based generator keyed by (seed, hash of the
 * tensor's name, element index), so a tensor's values depend on neither the worker holding it
 * nor which other experts that worker holds. */
void model_params_init(model_params_t *self, uint64_t seed);
/* Element idx of tensor name as model_params_init(seed) fills it (for tests and for workers that
 * initialise one tensor alone). */
float model_params_init_value(const model_config_t *cfg, const model_param_t *p, uint64_t seed,
                              uint64_t idx);

/* Parameter counts of the whole model (every expert, held or not): total, and active per token
 * (dense + num_experts_per_tok experts per layer); the lm_head counted only when untied. */
uint64_t model_params_total(const model_config_t *cfg);
uint64_t model_params_active(const model_config_t *cfg);
/* Parameters of one expert (w1, w3, w2) and of the dense tensors. */
uint64_t model_params_per_expert(const model_config_t *cfg);
uint64_t model_params_dense(const model_config_t *cfg);

#endif
