/* semoe eval: the mean next-token cross-entropy of a text under a checkpoint (a Hugging Face
 * Mixtral folder: config.json and safetensors, or a checkpoint root's latest step), as
 * transformers computes it with labels = the input ids, without the aux term; optionally the
 * logits of every position to a file. The float path runs on the CPU or a CUDA device
 * (--device); double on the CPU only. */
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cpu/ops.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/graph.h"
#include "model/params.h"
#include "model/shards.h"

static const char s_usage[] =
    "usage: semoe eval --checkpoint DIR (--text TEXT | --file PATH) [--logits FILE] [--double]\n"
    "                  [--device cpu|cuda:N]\n"
    "\n"
    "Prints the mean next-token cross-entropy (nats per byte) of the text's bytes under the\n"
    "checkpoint DIR (config.json + model.safetensors or a sharded index, as transformers\n"
    "writes them; semoe's own checkpoints have the same layout, and a training run's\n"
    "checkpoint root names its newest one in DIR/latest).\n"
    "\n"
    "  --checkpoint DIR  a model folder, or a checkpoint root whose latest\n"
    "                    checkpoint is used\n"
    "  --text TEXT       the text (its bytes are the tokens), or\n"
    "  --file PATH       read the text from a file\n"
    "  --logits FILE     write the logits of every position: float32 little-endian (T, V)\n"
    "  --double          compute in double instead of float (the reference path)\n"
    "  --device D        cpu (default), or cuda:N: the float path on CUDA device N\n"
    "                    (builds with -Dcuda=enabled; not with --double)\n";

/* Reads a whole file (at most 64 MiB) into a malloc'd buffer. */
static char *s_slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = NULL;
    size_t cap = 0, n = 0, got;
    do {
        if (n == cap) {
            cap = cap ? 2 * cap : 65536;
            if (cap > (64u << 20)) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = semoe_xrealloc(buf, cap);
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
    } while (got > 0);
    fclose(f);
    *len = n;
    return buf;
}

/* The logits (n, V) of tokens[0..n) in T = S on backend be, widened to double. */
#define S_LOGITS(T, S)                                                                         \
    static semoe_rc s_logits_##S(const model_backend_##S##_t *be, const model_params_t *p,    \
                                 const int32_t *tokens, int n, double *logits)                 \
    {                                                                                          \
        size_t count = (size_t)n * model_params_config(p)->vocab_size;                        \
        T *w = model_slab_new_##S(be, p), *out = semoe_xmalloc(count * sizeof *out);          \
        model_slab_load_##S(be, p, w);                                                        \
        semoe_rc rc = model_logits_##S(be, p, w, tokens, n, out);                             \
        for (size_t i = 0; rc == SEMOE_OK && i < count; i++)                                  \
            logits[i] = out[i];                                                                \
        free(out);                                                                             \
        model_slab_destroy_##S(be, &w);                                                       \
        return rc;                                                                             \
    }
S_LOGITS(float, f32)
S_LOGITS(double, f64)

int cli_eval_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"checkpoint", required_argument, NULL, 'c'}, {"text", required_argument, NULL, 't'},
        {"file", required_argument, NULL, 'f'},       {"logits", required_argument, NULL, 'l'},
        {"double", no_argument, NULL, 'd'},           {"device", required_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},             {NULL, 0, NULL, 0}};
    const char *dir = NULL, *text = NULL, *file = NULL, *logits_path = NULL, *device = "cpu";
    bool dbl = false;
    int c, cuda = -1;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': dir = optarg; break;
        case 't': text = optarg; break;
        case 'f': file = optarg; break;
        case 'l': logits_path = optarg; break;
        case 'd': dbl = true; break;
        case 'D':
            device = optarg;
            if (!cli_flag_device("eval", device, &cuda))
                return CLI_EXIT_USAGE;
            break;
        default: return cli_flags_other("eval", c, argv, s_usage);
        }
    }
    if (!cli_flags_end("eval", argc, argv))
        return CLI_EXIT_USAGE;
    if (!dir || (!text) == (!file)) {
        fprintf(stderr, "semoe eval: need --checkpoint DIR and one of --text or --file "
                        "(see semoe eval --help)\n");
        return CLI_EXIT_USAGE;
    }
    if (dbl && cuda >= 0) {
        fprintf(stderr, "semoe eval: --double --device %s: the double path runs on the cpu only "
                        "(drop --double, or use --device cpu)\n", device);
        return CLI_EXIT_USAGE;
    }
    const model_backend_f32_t *be;
    int brc = cli_device_backend("eval", cuda, &be);
    if (brc != 0)
        return brc;
    size_t len = text ? strlen(text) : 0;
    char *owned = NULL;
    if (file) {
        owned = s_slurp(file, &len);
        if (!owned) {
            fprintf(stderr, "semoe eval: --file %s: cannot read it (missing, or over 64 MiB)\n",
                    file);
            return CLI_EXIT_USAGE;
        }
        text = owned;
    }
    int rc = 1;
    model_config_t cfg;
    model_params_t *p = NULL;
    int32_t *tokens = NULL;
    double *logits = NULL;
    if (len < 2 || len > (1u << 20)) {
        fprintf(stderr, "semoe eval: the text has %zu bytes: need 2 to 1048576\n", len);
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    char model_dir[4096];
    if (model_ckpt_resolve(dir, model_dir, sizeof model_dir) != SEMOE_OK ||
        model_shards_load_model(model_dir, &cfg, &p) != SEMOE_OK) {
        fprintf(stderr, "semoe eval: --checkpoint: %s\n", semoe_err_msg());
        rc = CLI_EXIT_USAGE;
        goto done;
    }
    int n = (int)len, V = (int)cfg.vocab_size;
    tokens = semoe_xcalloc((size_t)n, sizeof *tokens);
    for (int i = 0; i < n; i++) {
        tokens[i] = (unsigned char)text[i];
        if (tokens[i] >= V) {
            fprintf(stderr, "semoe eval: byte %d at offset %d is outside the vocabulary (%d)\n",
                    tokens[i], i, V);
            rc = CLI_EXIT_USAGE;
            goto done;
        }
    }
    logits = semoe_xmalloc((size_t)n * V * sizeof *logits);
    semoe_rc frc = dbl ? s_logits_f64(&cpu_backend_f64, p, tokens, n, logits)
                       : s_logits_f32(be, p, tokens, n, logits);
    if (frc != SEMOE_OK) {
        fprintf(stderr, "semoe eval: %s\n", semoe_err_msg());
        goto done;
    }
    /* Cross-entropy as transformers takes it with labels = input ids: position t predicts
     * token t + 1, n - 1 predictions. */
    double sum = 0;
    for (int t = 0; t + 1 < n; t++) {
        const double *row = logits + (size_t)t * V;
        double mx = row[0], z = 0;
        for (int v = 1; v < V; v++)
            mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < V; v++)
            z += exp(row[v] - mx);
        sum += mx + log(z) - row[tokens[t + 1]];
    }
    printf("cross-entropy %.6f nats/byte over %d predictions (%s, %s)\n", sum / (n - 1), n - 1,
           dbl ? "double" : "float", device);
    if (logits_path) {
        FILE *f = fopen(logits_path, "wb");
        bool ok = f != NULL;
        for (size_t i = 0; ok && i < (size_t)n * V; i++) {
            float x = (float)logits[i];
            ok = fwrite(&x, sizeof x, 1, f) == 1;
        }
        if (f && fclose(f) != 0)
            ok = false;
        if (!ok) {
            fprintf(stderr, "semoe eval: --logits %s: cannot write it\n", logits_path);
            goto done;
        }
        printf("logits (%d, %d) float32 written to %s\n", n, V, logits_path);
    }
    rc = 0;
done:
    free(logits);
    free(tokens);
    model_params_destroy(&p);
    free(owned);
    return rc;
}
