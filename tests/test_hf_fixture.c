/* The transformers fixture (tests/fixtures/tiny_mixtral, written by tests/hf/make_fixture.py
 * with transformers' MixtralForCausalLM, fp32, eager attention): its config.json and sharded
 * safetensors load through model/, and our forward pass on the CPU backend reproduces its
 * logits (norm-wise < 1e-5, in double and in float), its cross-entropy and its aux loss; so
 * does `semoe eval --checkpoint DIR --text TEXT --logits FILE`. */
#include <cjson/cJSON.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cpu/ops.h"
#include "model/config.h"
#include "model/graph.h"
#include "model/params.h"
#include "model/shards.h"
#include "tests/harness.h"
#include "tests/proc.h"

static char s_dir[4096];

static char *s_read(const char *name, size_t *len)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", s_dir, name);
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    buf[*len] = 0;
    fclose(f);
    return buf;
}

static double s_num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* Runs the forward pass for B = 1 over tokens[0..Tn] (Tn inputs, Tn targets) in T = S. */
#define RUN(T, S)                                                                              \
    static bool s_run_##S(const model_params_t *p, const int32_t *tokens, int Tn,             \
                          double *logits, model_loss_t *loss)                                  \
    {                                                                                          \
        const model_backend_##S##_t *be = &cpu_backend_##S;                                   \
        model_acts_##S *acts = NULL;                                                          \
        T *w = model_slab_new_##S(be, p);                                                     \
        model_slab_load_##S(be, p, w);                                                        \
        bool ok = model_acts_new_##S(be, p, 1, Tn, 0, &acts) == SEMOE_OK &&                   \
                  model_forward_##S(be, p, w, acts, tokens, NULL, loss) == SEMOE_OK;          \
        if (ok)                                                                                \
            for (size_t i = 0; i < (size_t)Tn * acts->V; i++)                                 \
                logits[i] = acts->a.logits[i];                                                \
        else                                                                                   \
            fprintf(stderr, "forward (" #S "): %s\n", semoe_err_msg());                       \
        model_acts_destroy_##S(&acts);                                                        \
        model_slab_destroy_##S(be, &w);                                                       \
        return ok;                                                                             \
    }
RUN(float, f32)
RUN(double, f64)

/* ||a - b|| / ||b|| */
static double s_relerr(const double *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

/* `test_hf_fixture --write-ours DIR`: a random model of the fixture's config written by our
 * own checkpoint code (config.json + sharded safetensors) with our float logits of the fixture
 * text beside it (our_logits.f32), for tests/hf/check_ours.py to load with transformers'
 * MixtralForCausalLM.from_pretrained and compare on the GPU machine. */
static int s_write_ours(const char *out, const model_config_t *cfg, const int32_t *tokens, int n)
{
    model_params_t *p = NULL;
    if (model_params_new(cfg, NULL, 0, &p) != SEMOE_OK)
        return 1;
    model_params_init(p, 20261128);
    mkdir(out, 0755);
    char *text = model_config_hf_json(cfg), path[4200];
    snprintf(path, sizeof path, "%s/config.json", out);
    FILE *f = fopen(path, "w");
    bool ok = f && fputs(text, f) >= 0;
    if (f)
        fclose(f);
    free(text);
    ok = ok && model_shards_save(out, p, 1) == SEMOE_OK;
    double *logits = malloc((size_t)n * cfg->vocab_size * sizeof *logits);
    model_loss_t loss;
    ok = ok && s_run_f32(p, tokens, n, logits, &loss);
    snprintf(path, sizeof path, "%s/our_logits.f32", out);
    f = ok ? fopen(path, "wb") : NULL;
    for (size_t i = 0; f && i < (size_t)n * cfg->vocab_size; i++) {
        float x = (float)logits[i];
        fwrite(&x, sizeof x, 1, f);
    }
    if (f)
        fclose(f);
    printf("%s: %s\n", out, ok && f ? "written" : semoe_err_msg());
    free(logits);
    model_params_destroy(&p);
    return ok && f ? 0 : 1;
}

int main(int argc, char **argv)
{
    test_init("hf_fixture");
    const char *src = getenv("SEMOE_SRC");
    REQUIRE(src, "SEMOE_SRC is not set");
    snprintf(s_dir, sizeof s_dir, "%s/tests/fixtures/tiny_mixtral", src);

    size_t len;
    char *meta_text = s_read("fixture.json", &len);
    REQUIRE(meta_text, "no fixture.json in %s", s_dir);
    cJSON *meta = cJSON_Parse(meta_text);
    REQUIRE(meta, "fixture.json is not JSON");
    const cJSON *toks = cJSON_GetObjectItemCaseSensitive(meta, "tokens");
    int n_tok = cJSON_GetArraySize(toks);
    int32_t *tokens = calloc((size_t)n_tok + 1, sizeof *tokens);
    for (int i = 0; i < n_tok; i++)
        tokens[i] = cJSON_GetArrayItem(toks, i)->valueint;

    char path[4200];
    snprintf(path, sizeof path, "%s/config.json", s_dir);
    model_config_t cfg;
    REQUIRE(model_config_load_hf(path, &cfg) == SEMOE_OK, "config: %s", semoe_err_msg());
    model_params_t *p = NULL;
    if (argc == 3 && strcmp(argv[1], "--write-ours") == 0) {
        tokens[n_tok] = 0;
        return s_write_ours(argv[2], &cfg, tokens, n_tok);
    }
    REQUIRE(model_params_new(&cfg, NULL, 0, &p) == SEMOE_OK, "params: %s", semoe_err_msg());
    REQUIRE(model_shards_load(s_dir, p) == SEMOE_OK, "load: %s", semoe_err_msg());

    size_t flen;
    float *ref = (float *)s_read("logits.f32", &flen);
    int V = (int)cfg.vocab_size;
    REQUIRE(ref && flen == (size_t)n_tok * V * sizeof(float), "logits.f32: %zu bytes", flen);

    /* All n_tok positions (a dummy last target: the logits and the aux loss do not see it). */
    double *logits = malloc((size_t)n_tok * V * sizeof *logits);
    model_loss_t loss;
    tokens[n_tok] = 0;
    if (s_run_f64(p, tokens, n_tok, logits, &loss)) {
        double e = s_relerr(logits, ref, (size_t)n_tok * V);
        CHECK(e < 1e-5, "double logits vs transformers: %.3g", e);
        printf("double: logits vs transformers %.3g, aux %.9f (transformers %.9f)\n", e,
               loss.aux, s_num(meta, "aux_loss"));
        CHECK(fabs(loss.aux - s_num(meta, "aux_loss")) < 1e-5 * fabs(s_num(meta, "aux_loss")),
              "aux %.9f vs %.9f", loss.aux, s_num(meta, "aux_loss"));
    } else {
        CHECK(false, "double forward failed");
    }
    if (s_run_f32(p, tokens, n_tok, logits, &loss)) {
        double e = s_relerr(logits, ref, (size_t)n_tok * V);
        CHECK(e < 1e-5, "float logits vs transformers: %.3g", e);
        printf("float: logits vs transformers %.3g\n", e);
    } else {
        CHECK(false, "float forward failed");
    }
    /* Cross-entropy with labels = input ids: n_tok - 1 predictions. */
    if (s_run_f64(p, tokens, n_tok - 1, logits, &loss)) {
        double ce = s_num(meta, "cross_entropy");
        CHECK(fabs(loss.ce - ce) < 1e-5 * ce, "cross-entropy %.9f vs %.9f", loss.ce, ce);
        double with_aux = s_num(meta, "loss_with_aux");
        printf("cross-entropy %.9f (transformers %.9f); transformers' loss with aux %.9f\n",
               loss.ce, ce, with_aux);
    }

    /* The command a person runs. */
    proc_init("hf_fixture");
    char bin[4200], out[4200];
    snprintf(bin, sizeof bin, "%s/cli/semoe", proc_build_dir());
    proc_tmp_path(out, sizeof out, "logits.f32");
    const char *text = cJSON_GetObjectItemCaseSensitive(meta, "text")->valuestring;
    proc_t *ev = NULL;
    int code = proc_run(&ev, 60000, "eval", bin, "eval", "--checkpoint", s_dir, "--text", text,
                        "--logits", out, (char *)NULL);
    CHECK(code == 0, "semoe eval exited %d", code);
    size_t olen = 0, elen = 0;
    char *said = ev ? proc_read_file(proc_out_path(ev), &olen) : NULL;
    double ce = NAN;
    const char *line = said ? strstr(said, "\ncross-entropy ") : NULL; /* after the command */
    CHECK(line && sscanf(line + 1, "cross-entropy %lf", &ce) == 1, "semoe eval said: %s",
          said ? said : "(nothing)");
    CHECK(fabs(ce - s_num(meta, "cross_entropy")) < 1e-5, "semoe eval: cross-entropy %.6f vs %.6f",
          ce, s_num(meta, "cross_entropy"));
    float *written = (float *)proc_read_file(out, &elen);
    CHECK(written && elen == flen, "semoe eval --logits wrote %zu bytes, want %zu", elen, flen);
    if (written && elen == flen) {
        double *w64 = malloc((size_t)n_tok * V * sizeof *w64);
        for (size_t i = 0; i < (size_t)n_tok * V; i++)
            w64[i] = written[i];
        double e = s_relerr(w64, ref, (size_t)n_tok * V);
        CHECK(e < 1e-5, "semoe eval --logits vs transformers: %.3g", e);
        free(w64);
    }
    free(written);
    free(said);
    /* A checkpoint that is not there: a one-line error and exit 2. */
    code = proc_run(&ev, 60000, "eval-missing", bin, "eval", "--checkpoint", "/nonexistent",
                    "--text", "ab", (char *)NULL);
    CHECK(code == 2, "semoe eval of a missing checkpoint exited %d", code);

    free(logits);
    free(ref);
    free(tokens);
    model_params_destroy(&p);
    cJSON_Delete(meta);
    free(meta_text);
    return test_finish();
}
