/* The model as a Hugging Face folder: config.json beside safetensors shards
 * (model-0000K-of-0000N.safetensors + model.safetensors.index.json, or one model.safetensors),
 * as transformers' save_pretrained writes them and from_pretrained reads them; loaded by
 * tensor name into a params table, so the files do not depend on which worker holds what. */
#ifndef SEMOE_MODEL_SHARDS_H
#define SEMOE_MODEL_SHARDS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/config.h"
#include "model/params.h"

/* Writes every tensor of p (which must hold every expert) into dir as transformers'
 * save_pretrained does: layers_per_shard layers per file model-0000K-of-0000N.safetensors
 * (the embedding in the first, model.norm and lm_head in the last) plus
 * model.safetensors.index.json, or a single model.safetensors when one shard holds all. dir must
 * exist. Each file is written atomically, the index last. No config.json. */
semoe_rc model_shards_save(const char *dir, const model_params_t *p,
                               uint32_t layers_per_shard);

/* Loads the model tensors in dir (model.safetensors.index.json, else model.safetensors) into p
 * by name: every tensor of p's table must be present with its shape, nothing else may be; only
 * the tensors p holds are read. Errors name the file and tensor(s) at fault. */
semoe_rc model_shards_load(const char *dir, model_params_t *p);

/* Opens a model folder as transformers writes it: dir/config.json (read leniently) into *cfg
 * and every tensor (all experts) into a new params object, the caller's (*out). */
semoe_rc model_shards_load_model(const char *dir, model_config_t *cfg, model_params_t **out);

/* Helpers the training checkpoint shares: "dir/name" (caller frees); whether a path exists;
 * the shard (0..nshards-1) a tensor goes to with layers_per_shard layers per shard (the
 * embedding in the first, model.norm and lm_head in the last); a shard's file name,
 * "<stem>.safetensors" for one shard, else "<stem>-0000K-of-0000N.safetensors". */
char *model_shards_join(const char *dir, const char *name);
/* A small text file (at most MODEL_ST_MAX_HEADER bytes of UTF-8 without NULs), whole and
 * NUL-terminated into *out (caller frees); *len its length. Errors name the file. */
semoe_rc model_shards_read_text(const char *path, char **out, size_t *len);
bool model_shards_exists(const char *path);
uint32_t model_shards_of(const model_param_t *t, uint32_t layers_per_shard, uint32_t nshards);
void model_shards_name(char *buf, size_t cap, const char *stem, uint32_t k, uint32_t nshards);

#endif
