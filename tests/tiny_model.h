/* The tiny Mixtral config the model, training, checkpoint and expert-parallel tests share:
 * small enough for finite differences over every parameter, with grouped-query heads, several
 * experts and top-2 routing so that every path of the layer runs. */
#ifndef SEMOE_TESTS_TINY_MODEL_H
#define SEMOE_TESTS_TINY_MODEL_H

#include <stdint.h>

#include "model/config.h"
#include "model/job.h"
#include "model/params.h"

/* Vocabulary 32, hidden 16, 2 layers, 4 heads / 2 kv heads of 4, 4 experts of 24, top-2,
 * aux coefficient 0.02, untied embeddings; the rest model_config_defaults. */
void test_tiny_config(model_config_t *c);

/* Params for cfg initialised from seed (every expert), then RMSNorm weights drawn from
 * [0.8, 1.2) so that their updates show, and, with noise > 0, every matrix entry moved by up to
 * +-noise so that activations and routing are not trivial (the harness's random numbers).
 * NULL when the config is refused. */
model_params_t *test_tiny_params(const model_config_t *cfg, uint64_t seed, double noise);

/* The GPU tests' models against the CPU: 0 is vocabulary 67, hidden 40, 2 layers, 5 query heads
 * on 1 kv head of 8, top-2 of 6 experts of 56, aux 0.02, untied; 1 is vocabulary 50, hidden 36,
 * 3 layers, 6 heads on 3 of 6, top-1 of 5 experts of 30, aux 0.05, tied. Odd sizes, so that no
 * kernel gets only aligned shapes. */
void test_gpu_config(model_config_t *c, int which);

/* The training the GPU tests compare with the CPU's: model_job_defaults, then global batch 8
 * in micro-batches of 4 of seq_len tokens, lr (min_lr lr / 10), warmup 2, cosine, clipping at
 * 1, 20 steps. job->model is left to the caller. */
void test_tiny_train20(model_job_t *job, uint32_t seq_len, double lr);

#endif
