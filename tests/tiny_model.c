/* The tiny Mixtral config of the model tests (tiny_model.h). */
#include "tests/tiny_model.h"

#include "tests/harness.h"

void test_tiny_config(model_config_t *c)
{
    model_config_defaults(c);
    c->vocab_size = 32;
    c->hidden_size = 16;
    c->intermediate_size = 24;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 4;
    c->num_key_value_heads = 2;
    c->head_dim = 4;
    c->num_local_experts = 4;
    c->num_experts_per_tok = 2;
    c->max_position_embeddings = 64;
    c->router_aux_loss_coef = 0.02;
    c->tie_word_embeddings = false;
}

model_params_t *test_tiny_params(const model_config_t *cfg, uint64_t seed, double noise)
{
    model_params_t *p = NULL;
    if (model_params_new(cfg, NULL, 0, &p) != SEMOE_OK)
        return NULL;
    model_params_init(p, seed);
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (!t->data || (t->ndim != 1 && noise <= 0))
            continue;
        for (uint64_t e = 0; e < t->numel; e++)
            t->data[e] = t->ndim == 1 ? (float)(0.8 + 0.4 * test_rand_unit())
                                      : t->data[e] + (float)(noise * (2 * test_rand_unit() - 1));
    }
    return p;
}

void test_tiny_train20(model_job_t *job, uint32_t seq_len, double lr)
{
    model_job_defaults(job);
    job->train.seq_len = seq_len;
    job->train.global_batch = 8;
    job->train.micro_batch = 4;
    job->train.lr = lr;
    job->train.min_lr = lr / 10;
    job->train.warmup_steps = 2;
    snprintf(job->train.schedule, sizeof job->train.schedule, "cosine");
    job->train.grad_clip = 1.0;
    job->train.steps = 20;
}

void test_gpu_config(model_config_t *c, int which)
{
    model_config_defaults(c);
    c->vocab_size = 67;
    c->hidden_size = 40;
    c->intermediate_size = 56;
    c->num_hidden_layers = 2;
    c->num_attention_heads = 5;
    c->num_key_value_heads = 1;
    c->head_dim = 8;
    c->num_local_experts = 6;
    c->num_experts_per_tok = 2;
    c->max_position_embeddings = 64;
    c->router_aux_loss_coef = 0.02;
    c->tie_word_embeddings = false;
    if (which == 1) {
        c->vocab_size = 50;
        c->hidden_size = 36;
        c->intermediate_size = 30;
        c->num_hidden_layers = 3;
        c->num_attention_heads = 6;
        c->num_key_value_heads = 3;
        c->head_dim = 6;
        c->num_local_experts = 5;
        c->num_experts_per_tok = 1;
        c->router_aux_loss_coef = 0.05;
        c->tie_word_embeddings = true;
    }
}
