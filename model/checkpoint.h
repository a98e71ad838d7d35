/* Checkpoints in a directory (DESIGN.md "Hierarchical storage and 2D prefetch"): the model as a
 * Hugging Face folder (config.json, safetensors shards, model.safetensors.index.json) and, for a
 * training checkpoint, the training state beside it under semoe/, with a manifest of checksums
 * written last so that a checkpoint is whole or refused. Files hold whole tensors by name: they
 * do not depend on the number of workers. */
#ifndef SEMOE_MODEL_CHECKPOINT_H
#define SEMOE_MODEL_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/config.h"
#include "model/params.h"
#include "model/train.h"

/* ---- training checkpoints ------------------------------------------------------------------ */

#define MODEL_CKPT_MANIFEST "semoe/manifest.json"
#define MODEL_CKPT_STATE "semoe/state.json"

/* The training state beside the model, besides weights and AdamW's moments. */
typedef struct {
    uint64_t step;             /* training steps done: the next step to run */
    uint64_t seed;             /* train.seed */
    uint64_t epoch, position;  /* data cursor: the next sample position within epoch */
    uint64_t rng[4];           /* the caller's RNG state, kept as is */
    uint64_t job_hash;         /* a hash of the job spec, for the caller to compare on resume */
    uint64_t generation;       /* the membership generation that wrote the checkpoint */
    int adam_step;             /* load only: AdamW's step count restored into the trainer */
    uint32_t layers_per_shard; /* save only: layers per model shard; 0: one file */
} model_ckpt_state_t;

/* Writes a whole training checkpoint to dir: config.json (model_config_hf_json of params'
 * config), the model shards as model_shards_save writes them (train's weights, copied into
 * params' slab first), semoe/optimizer[-0000K-of-0000N].safetensors (AdamW's m and v as
 * "<tensor>.exp_avg" and "<tensor>.exp_avg_sq", sharded as the model), semoe/state.json
 * (state and the adam step) and, last, semoe/manifest.json: every file with its size and
 * FNV-1a 64 checksum, the generation, and a checksum of the manifest itself. Everything is
 * written into "<dir>.tmp-<pid>" and renamed onto dir (an older dir is renamed away first and
 * removed after), so dir is either the old checkpoint, absent for an instant, or the new one.
 * params must hold every expert; be is train's backend. */
semoe_rc model_ckpt_save(const char *dir, const model_backend_f32_t *be, model_params_t *params,
                         model_train_t *train, const model_ckpt_state_t *state);

/* Checks dir's manifest and every file it lists (present, size, checksum); a one-line error
 * names the file at fault. */
semoe_rc model_ckpt_verify(const char *dir);

/* Verifies dir (model_ckpt_verify), checks that config.json is params' config, then loads the
 * weights (into params' slab and train), m, v, the adam step and *state_out. Only the tensors
 * params holds are read, so any number of workers can resume from one checkpoint. On error
 * train may hold part of the checkpoint. */
semoe_rc model_ckpt_load(const char *dir, const model_backend_f32_t *be, model_params_t *params,
                         model_train_t *train, model_ckpt_state_t *state_out);

#endif
