/* semoe generate: byte-level sampling from a checkpoint (config.json + safetensors, or a
 * checkpoint root's latest step, as semoe eval loads it). Each new token reruns the whole
 * forward pass over the sequence so far (no KV cache: quadratic, fine for the small models
 * semoe trains on a CPU). The forward pass runs on the CPU or a CUDA device (--device); the
 * sampler always runs on the host, in double. */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "model/checkpoint.h"
#include "model/config.h"
#include "model/graph.h"
#include "model/params.h"
#include "model/shards.h"

static const char s_usage[] =
    "usage: semoe generate --checkpoint DIR --prompt TEXT [--tokens N] [--temperature T]\n"
    "                      [--top-k K] [--seed S] [--device cpu|cuda:N]\n"
    "\n"
    "Prints the prompt, then N bytes sampled one at a time from the checkpoint DIR's model\n"
    "(config.json + model.safetensors or a sharded index), then a newline. Bytes are written as\n"
    "they are (it is a byte-level model); a token id >= 256 prints as <ID>. The same flags give\n"
    "the same bytes: the sampler draws from splitmix64 seeded with S.\n"
    "\n"
    "  --checkpoint DIR   a model folder, or a checkpoint root whose latest\n"
    "                     checkpoint is used\n"
    "  --prompt TEXT      the text to continue (at least one byte)\n"
    "  --tokens N         how many tokens to generate (default 64, at most 100000)\n"
    "  --temperature T    softmax temperature (default 1.0; 0 = greedy, the argmax)\n"
    "  --top-k K          sample among the K most likely tokens only (default 0 = all)\n"
    "  --seed S           the sampler's seed (default 0)\n"
    "  --device D         cpu (default), or cuda:N: the forward pass on CUDA device N\n"
    "                     (builds with -Dcuda=enabled). The logits then differ from the\n"
    "                     CPU's in the last bits, so a draw that falls on a boundary can\n"
    "                     differ; greedy (--temperature 0) differs only on near ties.\n";

/* splitmix64 (Steele, Lea, Flood 2014): the state advances by a constant, the output is a
 * mix of it. Deterministic and platform independent. */
static uint64_t s_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static const float *s_sort_logits; /* qsort has no context argument */

/* Descending by logit, ties by ascending id: a total order, so the pick is deterministic. */
static int s_by_logit(const void *a, const void *b)
{
    int i = *(const int *)a, j = *(const int *)b;
    float x = s_sort_logits[i], y = s_sort_logits[j];
    if (x != y)
        return x > y ? -1 : 1;
    return i < j ? -1 : (i > j);
}

/* The next token from logits (V): the argmax (lowest id among equals) when temperature is 0,
 * else a draw from softmax(logits / temperature) restricted to the top_k largest (0: all).
 * order (V) and p (V) are scratch. */
static int s_sample(const float *logits, int V, double temperature, int top_k, uint64_t *rng,
                    int *order, double *p)
{
    if (temperature == 0) {
        int best = 0;
        for (int v = 1; v < V; v++)
            if (logits[v] > logits[best])
                best = v;
        return best;
    }
    for (int v = 0; v < V; v++)
        order[v] = v;
    s_sort_logits = logits;
    qsort(order, (size_t)V, sizeof *order, s_by_logit);
    int k = top_k > 0 && top_k < V ? top_k : V;
    double mx = logits[order[0]], z = 0;
    for (int i = 0; i < k; i++)
        z += p[i] = exp(((double)logits[order[i]] - mx) / temperature);
    /* 53 random bits: u uniform in [0, 1) */
    double u = (double)(s_splitmix64(rng) >> 11) * 0x1.0p-53 * z, acc = 0;
    for (int i = 0; i < k; i++) {
        acc += p[i];
        if (u < acc)
            return order[i];
    }
    return order[k - 1]; /* rounding left u at the very top */
}

static bool s_parse_double(const char *s, double lo, double hi, double *out)
{
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(x) || x < lo || x > hi)
        return false;
    *out = x;
    return true;
}

static bool s_parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    if (*s == '-' || *s == 0)
        return false;
    unsigned long long x = strtoull(s, &end, 0);
    if (errno || *end)
        return false;
    *out = x;
    return true;
}

int cli_generate_main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"checkpoint", required_argument, NULL, 'c'}, {"prompt", required_argument, NULL, 'p'},
        {"tokens", required_argument, NULL, 'n'},     {"temperature", required_argument, NULL, 't'},
        {"top-k", required_argument, NULL, 'k'},      {"seed", required_argument, NULL, 's'},
        {"device", required_argument, NULL, 'D'},     {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0}};
    const char *dir = NULL, *prompt = NULL;
    long n_new = 64, top_k = 0;
    double temperature = 1.0;
    uint64_t seed = 0;
    int c, cuda = -1;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': dir = optarg; break;
        case 'p': prompt = optarg; break;
        case 'n':
            if (!cli_parse_int(optarg, 0, 100000, &n_new)) {
                fprintf(stderr, "semoe generate: --tokens %s: need an integer 0..100000\n",
                        optarg);
                return CLI_EXIT_USAGE;
            }
            break;
        case 't':
            if (!s_parse_double(optarg, 0, 1e6, &temperature)) {
                fprintf(stderr, "semoe generate: --temperature %s: need a number >= 0 "
                                "(0 = greedy)\n", optarg);
                return CLI_EXIT_USAGE;
            }
            break;
        case 'k':
            if (!cli_parse_int(optarg, 0, 1L << 30, &top_k)) {
                fprintf(stderr, "semoe generate: --top-k %s: need an integer >= 0 (0 = all)\n",
                        optarg);
                return CLI_EXIT_USAGE;
            }
            break;
        case 's':
            if (!s_parse_u64(optarg, &seed)) {
                fprintf(stderr, "semoe generate: --seed %s: need an unsigned 64-bit integer\n",
                        optarg);
                return CLI_EXIT_USAGE;
            }
            break;
        case 'D':
            if (!cli_flag_device("generate", optarg, &cuda))
                return CLI_EXIT_USAGE;
            break;
        default: return cli_flags_other("generate", c, argv, s_usage);
        }
    }
    if (!cli_flags_end("generate", argc, argv))
        return CLI_EXIT_USAGE;
    if (!dir || !prompt || !*prompt) {
        fprintf(stderr, "semoe generate: need --checkpoint DIR and a non-empty --prompt TEXT "
                        "(see semoe generate --help)\n");
        return CLI_EXIT_USAGE;
    }
    size_t plen = strlen(prompt);
    if (plen > (1u << 16)) {
        fprintf(stderr, "semoe generate: --prompt has %zu bytes: at most 65536\n", plen);
        return CLI_EXIT_USAGE;
    }

    const model_backend_f32_t *be;
    int brc = cli_device_backend("generate", cuda, &be);
    if (brc != 0)
        return brc;
    model_config_t cfg;
    model_params_t *p = NULL;
    float *w = NULL, *logits = NULL;
    int32_t *tokens = NULL;
    int *order = NULL;
    double *prob = NULL;
    int rc = CLI_EXIT_USAGE;
    char model_dir[4096];
    if (model_ckpt_resolve(dir, model_dir, sizeof model_dir) != SEMOE_OK ||
        model_shards_load_model(model_dir, &cfg, &p) != SEMOE_OK) {
        fprintf(stderr, "semoe generate: --checkpoint: %s\n", semoe_err_msg());
        goto done;
    }
    int V = (int)cfg.vocab_size;
    size_t total = plen + (size_t)n_new;
    tokens = semoe_xcalloc(total, sizeof *tokens);
    for (size_t i = 0; i < plen; i++) {
        tokens[i] = (unsigned char)prompt[i];
        if (tokens[i] >= V) {
            fprintf(stderr, "semoe generate: --prompt byte %d at offset %zu is outside the "
                            "vocabulary (%d)\n", tokens[i], i, V);
            goto done;
        }
    }
    w = model_slab_new_f32(be, p);
    model_slab_load_f32(be, p, w);
    logits = semoe_xmalloc(total * (size_t)V * sizeof *logits);
    order = semoe_xmalloc((size_t)V * sizeof *order);
    prob = semoe_xmalloc((size_t)V * sizeof *prob);
    uint64_t rng = seed;
    fwrite(prompt, 1, plen, stdout);
    fflush(stdout);
    rc = 1;
    for (size_t n = plen; n < total; n++) {
        if (model_logits_f32(be, p, w, tokens, (int)n, logits) != SEMOE_OK) {
            fprintf(stderr, "\nsemoe generate: %s\n", semoe_err_msg());
            goto done;
        }
        const float *last = logits + (n - 1) * (size_t)V;
        int next = s_sample(last, V, temperature, (int)top_k, &rng, order, prob);
        tokens[n] = next;
        if (next < 256)
            putchar(next);
        else
            printf("<%d>", next);
        fflush(stdout);
    }
    putchar('\n');
    rc = 0;
done:
    free(prob);
    free(order);
    free(logits);
    model_slab_destroy_f32(be, &w);
    free(tokens);
    model_params_destroy(&p);
    return rc;
}
