/* One training step on one process, float path (DESIGN.md "The model": AdamW with fp32 master
 * weights): gradient accumulation over micro-batches, global gradient-norm clipping and AdamW
 * with decoupled weight decay, plus the learning-rate schedule and a held-out evaluation. The
 * distributed trainer wraps it through hooks (gradient all-reduce, global sum of squares, the
 * expert exchange); with no hooks it is the whole single-process trainer. */
#ifndef SEMOE_MODEL_TRAIN_H
#define SEMOE_MODEL_TRAIN_H

#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/graph.h"
#include "model/job.h"
#include "model/params.h"

typedef struct model_train model_train_t;

/* What the distributed version plugs in; a zeroed struct (or NULL) is the single process. */
typedef struct {
    void *arg; /* passed to every hook */
    /* Called once per step after the last backward, before clipping: grads (n floats, the
     * params-shaped gradient slab in the backend's memory) hold this process's share of the
     * gradient of the global batch's mean loss; the hook makes them the whole of it (sums
     * over workers; the scaling by rows / global_batch is already done). NULL: nothing. */
    semoe_rc (*reduce_grads)(void *arg, float *grads, size_t n);
    /* The global sum of squares of the (reduced) gradient, from this process's sums over the
     * dense tensors and over the expert tensors it holds, kept apart so that a wrapper can
     * count replicated tensors once. NULL: *global = dense + expert. */
    semoe_rc (*reduce_sumsq)(void *arg, double dense, double expert, double *global);
    /* Called during the step's last backward, with a pass that can (model_pass_t's
     * on_dense_ready: the bf16 graph), once per layer as soon as that layer's dense gradients
     * are final, so that their all-reduce can start while backward goes on (nothing the
     * backward does later may wait for it); first with layer num_hidden_layers (the head: the
     * final norm and an untied lm_head), then the layers from the last to the first;
     * reduce_grads follows as always, for the rest (the embedding). NULL: nothing. */
    void (*dense_ready)(void *arg, int layer);
    /* The expert exchange for forward and backward; NULL: the local one (every expert held). */
    const model_exchange_f32 *ex;
    /* Micro-batches per step; 0: n_rows / micro_batch rounded up (chunks of micro_batch, a
     * shorter last one). Workers of an exchange must run the same number (each micro-batch is
     * a collective), whatever their rows: they pass the same count and their rows are spread
     * evenly over it (each micro-batch at most micro_batch rows, at least 1). */
    uint32_t micro_steps;
} model_train_hooks_t;

/* One step's account. Losses are this process's means over its rows (micro-batches weighted by
 * their rows); a wrapper averages them over workers by rows. With an exchange that has
 * reduce_stats they are already the global batch's (micro-batches weighted by their global
 * targets), the same on every worker. */
typedef struct {
    double loss, ce, aux;   /* loss = ce + router_aux_loss_coef * aux */
    double grad_norm;       /* global, before clipping */
    double clip_scale;      /* the factor applied to the gradient (1: not clipped) */
    double lr;              /* model_train_lr(job, step) */
    uint64_t tokens;        /* targets processed here: n_rows * seq_len */
    int adam_step;          /* AdamW's step count t after this step (1 after the first) */
    double t_forward, t_backward, t_optimizer; /* seconds (host clock; a device backend's
                                                * numbers include only what it synchronises) */
} model_train_report_t;

/* The learning rate of step (0-based): linear warmup from 0 at step 0 to train.lr at
 * warmup_steps, then for "cosine" min_lr + (lr - min_lr) (1 + cos(pi p)) / 2 with
 * p = (step - warmup) / (steps - warmup) clamped to [0, 1] (min_lr at and after `steps`), or
 * lr for "constant". As transformers' get_cosine_schedule_with_warmup, with a floor. Pure. */
double model_train_lr(const model_job_t *job, uint64_t step);

/* A trainer for params on backend be under job->train (micro_batch, seq_len, global_batch and
 * the optimizer's settings; job->model is not read: params' config is the model, whose
 * num_local_experts must be train.router_bias's length when that is set). train.router_bias is
 * added to every layer's router logits in every forward pass of the trainer (steps and
 * model_train_eval); train.freeze_router leaves every layer's router gate out of AdamW (no
 * update, no weight decay: its weights stay bit-identical) and out of the gradient norm. The
 * bias lives in the backend's memory, a constant: not in the slabs, not in checkpoints.
 * Allocates the fp32 weights (a params-shaped slab in the backend's memory, loaded from params'
 * slab), the gradients, AdamW's m and v (zeroed, adam step 0) and the activations for
 * micro_batch x seq_len. be, params and job must outlive the trainer (not owned). Caller owns
 * *out (model_train_destroy). */
semoe_rc model_train_new(const model_backend_f32_t *be, model_params_t *params,
                         const model_job_t *job, model_train_t **out);

/* A forward/backward pass the trainer runs instead of model/graph.h's over its table: a
 * device's own mixed-precision graph (gpu/graph_bf16.h's, through gpu/backend.h's
 * gpu_pass_bf16). Weights and gradients stay the trainer's fp32 params-shaped slabs in the
 * table's memory. Created without expert rows (model_train_set_expert_rows 0), the pass holds
 * every expert and uses only an exchange's reduce_stats (and note_local); with them, it sends
 * every MoE layer's rows through the exchange's dispatch and combine, as model/graph.h's does. */
typedef struct {
    const char *name; /* "bf16" */
    /* state for rows sequences of seq tokens of params' model; expert_rows > 0: the capacity
     * for rows an exchange delivers per MoE layer (SEMOE_EINVAL from a pass that cannot take
     * them) */
    semoe_rc (*create)(const model_params_t *params, int rows, int seq, int expert_rows,
                       void **out);
    void (*destroy)(void **self_p);
    /* (E) floats in the table's memory added to the router logits, or NULL; not owned */
    void (*set_router_bias)(void *self, const float *bias);
    /* model_forward_f32's contract on w (fp32 master slab) and tokens (rows, seq + 1) */
    semoe_rc (*forward)(void *self, const float *w, const int32_t *tokens,
                        const model_exchange_f32 *ex, model_loss_t *loss);
    /* model_backward_f32's, for the loss times scale: g += scale * d loss / d w (the trainer's
     * micro-batch weight, so that micro-batches accumulate into one slab) */
    semoe_rc (*backward)(void *self, const float *w, float *g, double scale);
    /* Optional (NULL: the pass cannot): from now on, backward calls fn(arg, layer) as soon as
     * layer `layer`'s dense gradients are final in g: num_hidden_layers first (the head: the
     * final norm and an untied lm_head), then the layers from the last to the first (the
     * embedding is not reported); fn NULL: no more calls. */
    void (*on_dense_ready)(void *self, void (*fn)(void *arg, int layer), void *arg);
} model_pass_t;

/* The layer a dense tensor of a model of `layers` layers is reported ready with (dense_ready,
 * on_dense_ready): its own, `layers` for the final norm and an untied lm_head, -1 (never) for
 * the embedding. */
int model_train_dense_layer(const model_param_t *t, uint32_t layers);

/* model_train_new with pass (NULL: model/graph.h's). */
semoe_rc model_train_new_pass(const model_backend_f32_t *be, const model_pass_t *pass,
                              model_params_t *params, const model_job_t *job,
                              model_train_t **out);
/* Frees everything the trainer allocated; nulls *self_p; NULL and *self_p NULL are fine. */
void model_train_destroy(model_train_t **self_p);

/* Step `step` (0-based: it picks the learning rate) over this process's rows of the global
 * batch: tokens (n_rows, seq_len + 1) bytes as model_data_batch fills them. Zeroes the
 * gradients; runs forward + backward per micro-batch of micro_batch rows (a last shorter one
 * when n_rows is not a multiple), accumulating d/dw of (rows / global_batch) * that
 * micro-batch's loss, so that over all workers the sum is the gradient of the mean loss of the
 * global batch (with hooks->ex->reduce_stats: the global rows of the micro-step / global_batch
 * times the share of the global micro-step loss's gradient backward gives); hooks->reduce_grads; the global norm (hooks->reduce_sumsq) and the clip scale
 * min(1, grad_clip / (norm + 1e-6)) (grad_clip <= 0: none); AdamW (step count t + 1, bias
 * corrected) with decoupled weight decay on the matrices only: RMSNorm weights (every 1-D
 * tensor) are not decayed, as in transformers' and most Mixtral recipes (no biases here).
 * A non-finite gradient norm is an error (SEMOE_EINVAL) and leaves weights, moments and the
 * step count as they were. hooks may be NULL; report may be NULL. */
semoe_rc model_train_step(model_train_t *tr, const uint8_t *tokens, uint32_t n_rows,
                          uint64_t step, const model_train_hooks_t *hooks,
                          model_train_report_t *report);

/* Reallocates the activations so that the exchange may deliver up to `rows` expert rows per
 * micro-batch (0: micro_batch * seq_len * num_experts_per_tok, all a local exchange needs). An
 * expert-parallel worker receives rows from every worker for the experts it holds: the global
 * micro-batch's tokens * K is always enough. */
semoe_rc model_train_set_expert_rows(model_train_t *tr, int rows);

/* Forward only over tokens (n_rows, seq_len + 1) in micro-batches (micro_steps as in
 * model_train_hooks_t): *ce the mean cross-entropy over every target (aux not included); with an
 * exchange that has reduce_stats, over every worker's targets. ex NULL: the local exchange. */
semoe_rc model_train_eval(model_train_t *tr, const uint8_t *tokens, uint32_t n_rows,
                          const model_exchange_f32 *ex, uint32_t micro_steps, double *ce);

/* --- state, for checkpoints and tests ------------------------------------------------------ */

/* Floats in each params-shaped slab (model_params_slab_floats). */
size_t model_train_slab_floats(const model_train_t *tr);
/* The slabs, in the backend's memory, at params' offsets: weights (the fp32 master copy),
 * gradients (as the last step left them: reduced, not clipped), AdamW's first and second
 * moments. Owned by the trainer; a checkpoint copies them out (be->to_host) and back. */
float *model_train_weights(model_train_t *tr);
float *model_train_grads(model_train_t *tr);
float *model_train_m(model_train_t *tr);
float *model_train_v(model_train_t *tr);
/* AdamW's step count t (0 before the first step; bias correction uses t after the update). */
int model_train_adam_step(const model_train_t *tr);
void model_train_set_adam_step(model_train_t *tr, int t);
/* Copies the weights to params' host slab (before saving them with model_shards_save), or back
 * from it (after loading them into params). */
void model_train_weights_to_params(model_train_t *tr);
void model_train_weights_from_params(model_train_t *tr);

#endif
