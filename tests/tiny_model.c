/* The tiny Mixtral config of the model tests (tiny_model.h). */
#include "tests/tiny_model.h"

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
