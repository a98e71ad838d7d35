/* The model config (model/config.h): Mixtral's fields read strictly from a job spec or leniently
 * from a config.json transformers wrote, their defaults, their checks and their JSON form. */
#include "model/config.h"

#include <ctype.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model/spec.h"

/* Bounds far above any Mixtral-layout model, there to catch a stray digit before a size
 * computation overflows somewhere downstream. */
#define S_MAX_VOCAB (1u << 24)
#define S_MAX_HIDDEN (1u << 16)
#define S_MAX_INTERMEDIATE (1u << 18)
#define S_MAX_LAYERS 1024u
#define S_MAX_HEADS 1024u
#define S_MAX_HEAD_DIM 1024u
#define S_MAX_EXPERTS 4096u
#define S_MAX_POSITIONS (1u << 24)

#define S_FIELD(name, kind, nullable)                                                        \
    {#name, kind, offsetof(model_config_t, name), sizeof(((model_config_t *)0)->name), nullable}

/* In MixtralConfig's order; S_HEAD_DIM indexes head_dim. */
static const model_spec_field_t s_fields[] = {
    S_FIELD(vocab_size, MODEL_SPEC_U32, false),
    S_FIELD(hidden_size, MODEL_SPEC_U32, false),
    S_FIELD(intermediate_size, MODEL_SPEC_U32, false),
    S_FIELD(num_hidden_layers, MODEL_SPEC_U32, false),
    S_FIELD(num_attention_heads, MODEL_SPEC_U32, false),
    S_FIELD(num_key_value_heads, MODEL_SPEC_U32, false),
    S_FIELD(head_dim, MODEL_SPEC_U32, true),
    S_FIELD(num_local_experts, MODEL_SPEC_U32, false),
    S_FIELD(num_experts_per_tok, MODEL_SPEC_U32, false),
    S_FIELD(max_position_embeddings, MODEL_SPEC_U32, false),
    S_FIELD(sliding_window, MODEL_SPEC_U32, true),
    S_FIELD(rms_norm_eps, MODEL_SPEC_F64, false),
    S_FIELD(rope_theta, MODEL_SPEC_F64, false),
    S_FIELD(router_aux_loss_coef, MODEL_SPEC_F64, false),
    S_FIELD(router_jitter_noise, MODEL_SPEC_F64, false),
    S_FIELD(initializer_range, MODEL_SPEC_F64, false),
    S_FIELD(tie_word_embeddings, MODEL_SPEC_BOOL, false),
    S_FIELD(hidden_act, MODEL_SPEC_STR, false),
};
#define S_NFIELDS (sizeof s_fields / sizeof s_fields[0])
enum { S_HEAD_DIM = 6, S_ROPE_THETA = 12 };

/* Keys of a config.json that semoe reads beyond the job spec's (lenient mode only). */
static const model_spec_field_t s_hf_fields[] = {
    {"model_type", MODEL_SPEC_OTHER, 0, 0, true},
    {"rope_parameters", MODEL_SPEC_OTHER, 0, 0, true},
    {"rope_scaling", MODEL_SPEC_OTHER, 0, 0, true},
};
enum { S_HF_MODEL_TYPE, S_HF_ROPE_PARAMETERS, S_HF_ROPE_SCALING, S_HF_NFIELDS };

void model_config_defaults(model_config_t *cfg)
{
    *cfg = (model_config_t){
        .vocab_size = 256,
        .hidden_size = 128,
        .intermediate_size = 256,
        .num_hidden_layers = 4,
        .num_attention_heads = 4,
        .num_key_value_heads = 2,
        .head_dim = 32,
        .num_local_experts = 8,
        .num_experts_per_tok = 2,
        .max_position_embeddings = 1024,
        .sliding_window = 0,
        .rms_norm_eps = 1e-5,
        .rope_theta = 10000.0,
        /* Switch Transformer's 0.01 rather than Mixtral's 0.001: a small model trained from
         * scratch needs the push towards balance more than a large one being fine-tuned */
        .router_aux_loss_coef = 0.01,
        .router_jitter_noise = 0.0,
        .initializer_range = 0.02,
        .tie_word_embeddings = false,
        .hidden_act = "silu",
    };
}

void model_config_hf_defaults(model_config_t *cfg)
{
    *cfg = (model_config_t){
        .vocab_size = 32000,
        .hidden_size = 4096,
        .intermediate_size = 14336,
        .num_hidden_layers = 32,
        .num_attention_heads = 32,
        .num_key_value_heads = 8,
        .head_dim = 128,
        .num_local_experts = 8,
        .num_experts_per_tok = 2,
        .max_position_embeddings = 4096 * 32,
        .sliding_window = 0,
        .rms_norm_eps = 1e-5,
        .rope_theta = 1e6,
        .router_aux_loss_coef = 0.001,
        .router_jitter_noise = 0.0,
        .initializer_range = 0.02,
        .tie_word_embeddings = false,
        .hidden_act = "silu",
    };
}

/* head_dim_derived: head_dim was not given, and is hidden / heads where they divide, else 0. */
static semoe_rc s_validate(const model_config_t *c, model_spec_where_t w, bool head_dim_derived)
{
    if (c->vocab_size < 1 || c->vocab_size > S_MAX_VOCAB)
        return model_spec_err_u64(w, "vocab_size", c->vocab_size,
                                  "need 1..%u tokens (256 for raw bytes)", S_MAX_VOCAB);
    if (c->hidden_size < 1 || c->hidden_size > S_MAX_HIDDEN)
        return model_spec_err_u64(w, "hidden_size", c->hidden_size, "must be in 1..%u",
                                  S_MAX_HIDDEN);
    if (c->intermediate_size < 1 || c->intermediate_size > S_MAX_INTERMEDIATE)
        return model_spec_err_u64(w, "intermediate_size", c->intermediate_size,
                                  "must be in 1..%u (each expert's SwiGLU width)",
                                  S_MAX_INTERMEDIATE);
    if (c->num_hidden_layers < 1 || c->num_hidden_layers > S_MAX_LAYERS)
        return model_spec_err_u64(w, "num_hidden_layers", c->num_hidden_layers,
                                  "must be in 1..%u", S_MAX_LAYERS);
    if (c->num_attention_heads < 1 || c->num_attention_heads > S_MAX_HEADS)
        return model_spec_err_u64(w, "num_attention_heads", c->num_attention_heads,
                                  "must be in 1..%u", S_MAX_HEADS);
    if (c->num_key_value_heads < 1 || c->num_key_value_heads > c->num_attention_heads)
        return model_spec_err_u64(w, "num_key_value_heads", c->num_key_value_heads,
                                  "must be in 1..num_attention_heads (%u)",
                                  c->num_attention_heads);
    if (c->num_attention_heads % c->num_key_value_heads)
        return model_spec_err_u64(w, "num_key_value_heads", c->num_key_value_heads,
                                  "must divide num_attention_heads (%u): each key/value head "
                                  "serves a whole group of query heads", c->num_attention_heads);
    if (head_dim_derived && c->head_dim == 0)
        return model_spec_err_u64(w, "num_attention_heads", c->num_attention_heads,
                                  "must divide hidden_size (%u) when head_dim is not given",
                                  c->hidden_size);
    if (c->head_dim < 2 || c->head_dim > S_MAX_HEAD_DIM || c->head_dim % 2)
        return model_spec_err_u64(w, "head_dim", c->head_dim,
                                  "must be even and in 2..%u (RoPE rotates pairs of dimensions)",
                                  S_MAX_HEAD_DIM);
    if (c->num_local_experts < 1)
        return model_spec_err_u64(w, "num_local_experts", c->num_local_experts,
                                  "need at least 1 expert per MoE layer");
    if (c->num_local_experts > S_MAX_EXPERTS)
        return model_spec_err_u64(w, "num_local_experts", c->num_local_experts,
                                  "at most %u experts per layer", S_MAX_EXPERTS);
    if (c->num_experts_per_tok < 1)
        return model_spec_err_u64(w, "num_experts_per_tok", c->num_experts_per_tok,
                                  "need at least 1 expert per token (top-k)");
    if (c->num_experts_per_tok > c->num_local_experts)
        return model_spec_err_u64(w, "num_experts_per_tok", c->num_experts_per_tok,
                                  "must be <= num_local_experts (%u)", c->num_local_experts);
    if (c->max_position_embeddings < 1 || c->max_position_embeddings > S_MAX_POSITIONS)
        return model_spec_err_u64(w, "max_position_embeddings", c->max_position_embeddings,
                                  "must be in 1..%u", S_MAX_POSITIONS);
    if (!(c->rms_norm_eps > 0 && c->rms_norm_eps < 1))
        return model_spec_err_f64(w, "rms_norm_eps", c->rms_norm_eps,
                                  "must be > 0 and < 1 (typically 1e-5)");
    if (!(c->rope_theta > 0) || !isfinite(c->rope_theta))
        return model_spec_err_f64(w, "rope_theta", c->rope_theta,
                                  "must be > 0 (typically 10000 or 1e6)");
    if (!(c->router_aux_loss_coef >= 0) || !isfinite(c->router_aux_loss_coef))
        return model_spec_err_f64(w, "router_aux_loss_coef", c->router_aux_loss_coef,
                                  "must be >= 0 (0 turns the load-balancing loss off)");
    if (!(c->router_jitter_noise >= 0 && c->router_jitter_noise < 1))
        return model_spec_err_f64(w, "router_jitter_noise", c->router_jitter_noise,
                                  "must be in [0, 1) (0: no jitter)");
    if (!(c->initializer_range > 0) || !isfinite(c->initializer_range))
        return model_spec_err_f64(w, "initializer_range", c->initializer_range,
                                  "must be > 0 (typically 0.02)");
    if (strcmp(c->hidden_act, "silu") != 0)
        return model_spec_err_str(w, "hidden_act", c->hidden_act,
                                  "semoe's experts are SwiGLU: use \"silu\"");
    return SEMOE_OK;
}

/* rope_type (or rope_scaling's older "type") must be plain RoPE: semoe has no scaled variants. */
static semoe_rc s_check_rope_type(const cJSON *obj, model_spec_where_t w, const char *name)
{
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(obj, "rope_type");
    const char *key = "rope_type";
    if (!t) {
        t = cJSON_GetObjectItemCaseSensitive(obj, "type");
        key = "type";
    }
    if (!t || cJSON_IsNull(t) || (cJSON_IsString(t) && strcmp(t->valuestring, "default") == 0))
        return SEMOE_OK;
    char path[64];
    snprintf(path, sizeof path, "%s.%s", name, key);
    return model_spec_err_item(w, path, t, "semoe implements plain RoPE only (\"default\")");
}

/* The keys of a config.json beyond the job spec's: model_type, rope_parameters, rope_scaling. */
static semoe_rc s_read_hf(const cJSON *obj, model_spec_where_t w, bool rope_theta_given,
                          model_config_t *cfg)
{
    const cJSON *items[S_HF_NFIELDS];
    SEMOE_CHECK(model_spec_read(obj, s_hf_fields, S_HF_NFIELDS, false, w, cfg, items));
    const cJSON *mt = items[S_HF_MODEL_TYPE];
    if (mt && !cJSON_IsNull(mt) &&
        !(cJSON_IsString(mt) && strcmp(mt->valuestring, "mixtral") == 0))
        return model_spec_err_item(w, "model_type", mt,
                                   "semoe reads Mixtral-layout configs (model_type \"mixtral\")");
    const cJSON *rp = items[S_HF_ROPE_PARAMETERS];
    if (rp && !cJSON_IsNull(rp)) {
        if (!cJSON_IsObject(rp))
            return model_spec_err_item(w, "rope_parameters", rp, "must be an object or null");
        SEMOE_CHECK(s_check_rope_type(rp, w, "rope_parameters"));
        const cJSON *theta = cJSON_GetObjectItemCaseSensitive(rp, "rope_theta");
        if (theta && !rope_theta_given) {
            if (!cJSON_IsNumber(theta) || !isfinite(theta->valuedouble))
                return model_spec_err_item(w, "rope_parameters.rope_theta", theta,
                                           "must be a number");
            cfg->rope_theta = theta->valuedouble;
        }
    }
    const cJSON *rs = items[S_HF_ROPE_SCALING];
    if (rs && !cJSON_IsNull(rs)) {
        if (!cJSON_IsObject(rs))
            return model_spec_err_item(w, "rope_scaling", rs, "must be an object or null");
        SEMOE_CHECK(s_check_rope_type(rs, w, "rope_scaling"));
    }
    return SEMOE_OK;
}

semoe_rc model_config_read(const cJSON *obj, bool strict, const char *origin, const char *section,
                           model_config_t *cfg)
{
    model_spec_where_t w = {origin ? origin : "config", section ? section : ""};
    if (strict)
        model_config_defaults(cfg);
    else
        model_config_hf_defaults(cfg);
    const cJSON *items[S_NFIELDS];
    SEMOE_CHECK(model_spec_read(obj, s_fields, S_NFIELDS, strict, w, cfg, items));
    if (!strict) {
        bool theta_given = items[S_ROPE_THETA] != NULL;
        SEMOE_CHECK(s_read_hf(obj, w, theta_given, cfg));
    }
    bool derived = !items[S_HEAD_DIM] || cJSON_IsNull(items[S_HEAD_DIM]);
    if (derived) {
        uint32_t h = cfg->num_attention_heads;
        cfg->head_dim = h && cfg->hidden_size % h == 0 ? cfg->hidden_size / h : 0;
    }
    return s_validate(cfg, w, derived);
}

/* Splits "ORIGIN: SECTION" where SECTION is one identifier; otherwise all of it is the origin. */
static void s_split_where(const char *where, char *origin, size_t cap, const char **section)
{
    const char *sep = NULL;
    for (const char *p = where; (p = strstr(p, ": ")) != NULL; p += 2)
        sep = p;
    bool ident = sep && sep[2];
    for (const char *p = sep ? sep + 2 : ""; ident && *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '_')
            ident = false;
    if (!ident) {
        snprintf(origin, cap, "%s", where);
        *section = "";
        return;
    }
    snprintf(origin, cap, "%.*s", (int)(sep - where), where);
    *section = sep + 2;
}

semoe_rc model_config_from_json(const cJSON *obj, bool strict, const char *where,
                                model_config_t *cfg)
{
    char origin[1024];
    const char *section;
    s_split_where(where ? where : "config", origin, sizeof origin, &section);
    return model_config_read(obj, strict, origin, section, cfg);
}

semoe_rc model_config_validate(const model_config_t *cfg, const char *where)
{
    char origin[1024];
    const char *section;
    s_split_where(where ? where : "config", origin, sizeof origin, &section);
    return s_validate(cfg, (model_spec_where_t){origin, section}, false);
}

semoe_rc model_config_load_hf_as(const char *path, const char *origin, model_config_t *cfg)
{
    char *text = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    semoe_rc rc;
    SEMOE_CHECK_GOTO(model_spec_read_file(path, origin, &text, &len), rc, out);
    SEMOE_CHECK_GOTO(model_spec_parse(text, len, origin, &root), rc, out);
    SEMOE_CHECK_GOTO(model_config_read(root, false, origin, "", cfg), rc, out);
out:
    cJSON_Delete(root);
    free(text);
    return rc;
}

semoe_rc model_config_load_hf(const char *path, model_config_t *cfg)
{
    return model_config_load_hf_as(path, path, cfg);
}

cJSON *model_config_to_json(const model_config_t *cfg)
{
    return model_spec_to_json(s_fields, S_NFIELDS, cfg);
}

/* A real number that a strict reader takes as a float: integral values keep a ".0" (cJSON
 * would print 0.0 as 0, which transformers' config validation refuses for a float field),
 * others the shortest form that reads back exactly. */
static cJSON *s_real(double x)
{
    char buf[40];
    if (x == floor(x) && fabs(x) < 1e15) {
        snprintf(buf, sizeof buf, "%.1f", x);
    } else {
        for (int prec = 1; prec <= 17; prec++) {
            snprintf(buf, sizeof buf, "%.*g", prec, x);
            if (strtod(buf, NULL) == x)
                break;
        }
    }
    return cJSON_CreateRaw(buf);
}

char *model_config_hf_json(const model_config_t *cfg)
{
    cJSON *j = model_config_to_json(cfg);
    for (size_t i = 0; i < S_NFIELDS; i++)
        if (s_fields[i].kind == MODEL_SPEC_F64)
            cJSON_ReplaceItemInObjectCaseSensitive(
                j, s_fields[i].key, s_real(*(const double *)((const char *)cfg + s_fields[i].offset)));
    cJSON *arch = cJSON_CreateArray();
    cJSON_AddItemToArray(arch, cJSON_CreateString("MixtralForCausalLM"));
    cJSON_AddItemToObject(j, "architectures", arch);
    cJSON_AddStringToObject(j, "model_type", "mixtral");
    cJSON_AddStringToObject(j, "torch_dtype", "float32");
    char *text = cJSON_Print(j);
    cJSON_Delete(j);
    if (!text)
        abort(); /* cJSON fails only when out of memory */
    return text;
}
