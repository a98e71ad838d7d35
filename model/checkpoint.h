/* Checkpoints in a directory (DESIGN.md "Hierarchical storage and 2D prefetch"): the model as a
 * Hugging Face folder (config.json, safetensors shards, model.safetensors.index.json) and, for a
 * training checkpoint, the training state beside it under semoe/, with a manifest of checksums
 * written last so that a checkpoint is whole or refused. Files hold whole tensors by name: they
 * do not depend on the number of workers. A training run keeps its checkpoints under one root
 * (job spec train.checkpoint_dir):
 *
 *   <root>/step-00000020/   one whole checkpoint, as model_ckpt_save_host writes it
 *   <root>/step-00000030/
 *   <root>/latest           symlink "step-00000030": the newest whole one (model_ckpt_publish)
 *
 * plus, for an instant, a writer's "<name>.tmp-<pid>" and "<name>.old-<pid>"; a dead writer's
 * are removed by the next publish. */
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
    uint64_t run;              /* and its coordinator run (0: not recorded) */
    int adam_step;             /* load only: AdamW's step count restored into the trainer */
    uint32_t layers_per_shard; /* save only: layers per model shard; 0: one file */
} model_ckpt_state_t;

/* Writes a whole training checkpoint to dir from host memory: config.json (model_config_hf_json
 * of params' config), the model shards as model_shards_save writes them (params' slab),
 * semoe/optimizer[-0000K-of-0000N].safetensors (m and v as "<tensor>.exp_avg" and
 * "<tensor>.exp_avg_sq", sharded as the model), semoe/state.json (state and adam_step) and,
 * last, semoe/manifest.json: every file with its size and FNV-1a 64 checksum, the generation,
 * and a checksum of the manifest itself. params must hold every expert; m and v are in params'
 * slab layout (model_params_slab_floats floats each); nothing is taken over. Everything is
 * written into "<dir>.tmp-<pid>" and renamed onto dir (an older dir is renamed away to
 * "<dir>.old-<pid>" first and removed after), so dir is either the old checkpoint, absent for an
 * instant, or the new one. dir's missing parents are created (a checkpoint root's first step).
 * The distributed trainer gathers every expert onto one rank and calls this there. */
semoe_rc model_ckpt_save_host(const char *dir, const model_params_t *params, const float *m,
                              const float *v, int adam_step, const model_ckpt_state_t *state);

/* model_ckpt_save_host of a single-process trainer: train's weights (copied into params' slab
 * first), its m and v (copied to the host) and its adam step. params must hold every expert;
 * be is train's backend. */
semoe_rc model_ckpt_save(const char *dir, const model_backend_f32_t *be, model_params_t *params,
                         model_train_t *train, const model_ckpt_state_t *state);

/* Checks dir's manifest and every file it lists (present, size, checksum); a one-line error
 * names the file at fault. */
semoe_rc model_ckpt_verify(const char *dir);

/* Verifies dir (model_ckpt_verify), checks that config.json is params' config, then loads the
 * weights into params' slab, m and v into host arrays in params' slab layout
 * (model_params_slab_floats floats each, the caller's), and the state with its adam step into
 * *state_out (may be NULL). Only the tensors params holds are read (any subset of the experts),
 * so any number of workers can resume from one checkpoint. On error params, m and v may hold
 * part of the checkpoint. */
semoe_rc model_ckpt_load_host(const char *dir, model_params_t *params, float *m, float *v,
                              model_ckpt_state_t *state_out);

/* model_ckpt_load_host into a single-process trainer: the weights into params' slab and train,
 * m and v into train, its adam step set; *state_out (may be NULL) as load_host fills it. On
 * error params may hold part of the checkpoint; train is left as it was. */
semoe_rc model_ckpt_load(const char *dir, const model_backend_f32_t *be, model_params_t *params,
                         model_train_t *train, model_ckpt_state_t *state_out);

/* ---- a checkpoint root: the steps of one run ----------------------------------------------- */

#define MODEL_CKPT_LATEST "latest"

/* "<root>/step-<step as %08 PRIu64>" into out (cap bytes): where step's checkpoint goes. An
 * error when it does not fit. No file system access. */
semoe_rc model_ckpt_step_dir(const char *root, uint64_t step, char *out, size_t cap);

/* Call once step's checkpoint (model_ckpt_step_dir) is whole. Points <root>/latest at it
 * atomically (a symlink "step-NNNNNNNN" made under a temporary name, renamed over latest), then
 * removes the oldest step directories so that at most keep remain, never the one latest names
 * (keep 0: keep them all), and the "*.tmp-<pid>" / "*.old-<pid>" leftovers of writers that are
 * no longer running (kill(pid, 0) says ESRCH: one host writes a root). A step directory is
 * renamed to a leftover before it is removed, so a crash never leaves half of one. An error
 * after latest moved says so ("latest names step-..."). */
semoe_rc model_ckpt_publish(const char *root, uint64_t step, uint32_t keep);

/* ---- generation fencing -------------------------------------------------------------------- */

/* A root's fence, <root>/fence: the newest (coordinator run, membership generation) that claimed
 * the root, one line "<run as 16 hex digits> <generation>" (absent: none). Pairs compare run
 * first (coordinators make run ids that grow with their start time), then generation. A
 * generation claims the root when it starts; from then a writer of an older one (a zombie: a
 * worker stopped, partitioned or replaced that wakes up and goes on, or one of a run before)
 * can no longer put a checkpoint in place. The fence is read and changed, and a fenced
 * checkpoint moved into place, under an exclusive flock of <root>/fence.lock (on NFS, Linux
 * maps flock to POSIX locks, which hold across hosts). */
#define MODEL_CKPT_FENCE "fence"

typedef struct {
    uint64_t run, generation;
} model_ckpt_fence_t;

/* The fence into *out ({0, 0}: no fence yet); a fence that is not one is a one-line error naming
 * the file. */
semoe_rc model_ckpt_fence_read(const char *root, model_ckpt_fence_t *out);

/* Raises the fence to claim (creating root and the fence when missing); SEMOE_EFENCED when a
 * newer pair holds it. Claiming the pair that holds it is a no-op. */
semoe_rc model_ckpt_fence_claim(const char *root, model_ckpt_fence_t claim);

/* A fenced checkpoint of step under root: writes it as model_ckpt_save_host does into a
 * temporary directory, then, under the fence's lock, claims the fence for (state->run,
 * state->generation) (SEMOE_EFENCED, and nothing changed under root but the removed temporary,
 * when a newer pair holds it), moves it onto step's directory and publishes it
 * (model_ckpt_publish with keep). */
semoe_rc model_ckpt_commit(const char *root, uint64_t step, uint32_t keep,
                           const model_params_t *params, const float *m, const float *v,
                           int adam_step, const model_ckpt_state_t *state);

/* The checkpoint <root>/latest names: its path into out (cap bytes) and its step into *step.
 * A root that does not exist, or holds no latest, is a fresh start: SEMOE_OK with out[0] == 0
 * and *step == 0. latest naming something missing or not a step directory beside it is a
 * one-line error. The checkpoint's contents are not checked (load does that). */
semoe_rc model_ckpt_latest(const char *root, char *out, size_t cap, uint64_t *step);

/* What a user means by a checkpoint path: path itself when it holds config.json (a model folder
 * or one step's checkpoint), else the step directory path/latest names (a checkpoint root),
 * into out (cap bytes); else a one-line error saying path is neither. */
semoe_rc model_ckpt_resolve(const char *path, char *out, size_t cap);

#endif
