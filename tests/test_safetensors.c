/* Tests the safetensors reader and writer (model/safetensors.c): bit-exact round trips of random
 * tensors, BF16/F16 conversion, sharded checkpoints loaded into workers holding random expert
 * subsets, and corrupt files and indexes (hand-made and random mutations, a few hundred) that
 * must each fail with one line naming the file, and the tensor where one is at fault. */
#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/config.h"
#include "model/params.h"
#include "model/safetensors.h"
#include "model/shards.h"
#include "tests/harness.h"

static char s_tmp[256];

/* Non-empty, printable, one line. */
static bool s_one_line(const char *msg)
{
    if (!msg || !*msg)
        return false;
    for (const char *c = msg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            return false;
    return true;
}

/* The last error is one line containing every one of the given strings. */
static bool s_err_names(const char *a, const char *b)
{
    const char *m = semoe_err_msg();
    return s_one_line(m) && (!a || strstr(m, a)) && (!b || strstr(m, b));
}

static const char *s_path(const char *name)
{
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", s_tmp, name);
    return buf[k];
}

static void s_put(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n) {
        perror(path);
        exit(2);
    }
    fclose(f);
}

static uint8_t *s_get(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(*n + 1);
    if (fread(p, 1, *n, f) != *n)
        *n = 0;
    fclose(f);
    return p;
}

/* A file with the given header text (padded to 8) and data_len bytes of data. */
static void s_raw(const char *path, const char *header, size_t data_len)
{
    size_t h = strlen(header), hp = (h + 7) / 8 * 8;
    uint8_t *b = calloc(1, 8 + hp + data_len + 1);
    uint64_t n = hp;
    memcpy(b, &n, 8);
    memcpy(b + 8, header, h);
    memset(b + 8 + h, ' ', hp - h);
    for (size_t i = 0; i < data_len; i++)
        b[8 + hp + i] = (uint8_t)(i * 7);
    s_put(path, b, 8 + hp + data_len);
    free(b);
}

static int s_rm(const char *p, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(p);
}

static void s_clear_dir(const char *dir)
{
    nftw(dir, s_rm, 8, FTW_DEPTH | FTW_PHYS);
    mkdir(dir, 0755);
}

/* ---- single files ------------------------------------------------------------------------- */

static void s_test_round_trip(void)
{
    for (int iter = 0; iter < 40; iter++) {
        size_t n = test_rand_below(7);
        model_st_tensor_t t[6];
        char names[6][32];
        float *bufs[6];
        for (size_t i = 0; i < n; i++) {
            snprintf(names[i], sizeof names[i], "t%zu.\"q\\%llu", i,
                     (unsigned long long)test_rand_below(1000));
            t[i].name = names[i];
            t[i].ndim = (uint32_t)test_rand_below(5);
            uint64_t numel = 1;
            for (uint32_t d = 0; d < t[i].ndim; d++) {
                t[i].shape[d] = test_rand_below(6); /* zero-size dims included */
                numel *= t[i].shape[d];
            }
            bufs[i] = malloc((numel ? numel : 1) * 4);
            for (uint64_t k = 0; k < numel; k++) {
                uint32_t bits = (uint32_t)test_rand(); /* any pattern, NaNs included */
                memcpy(&bufs[i][k], &bits, 4);
            }
            t[i].data = bufs[i];
        }
        char path[512];
        snprintf(path, sizeof path, "%s", s_path("rt.safetensors"));
        semoe_rc rc = model_st_write(path, t, n);
        CHECK(rc == SEMOE_OK, "write: %s", semoe_err_msg());
        CHECK(access(s_path("rt.safetensors.tmp"), F_OK) != 0, "tmp file left behind");
        size_t len;
        uint8_t *raw = s_get(path, &len);
        uint64_t hlen;
        memcpy(&hlen, raw, 8);
        CHECK(hlen % 8 == 0 && raw[8] == '{', "header length %llu not padded",
              (unsigned long long)hlen);
        free(raw);
        model_st_file_t *f = NULL;
        rc = model_st_open(path, &f);
        CHECK(rc == SEMOE_OK, "open: %s", semoe_err_msg());
        if (rc == SEMOE_OK) {
            CHECK(model_st_count(f) == n, "count %zu want %zu", model_st_count(f), n);
            const char *fmt = model_st_meta(f, "format");
            CHECK(fmt && strcmp(fmt, "pt") == 0, "format metadata %s", fmt ? fmt : "(none)");
            for (size_t i = 0; i < n && i < model_st_count(f); i++) {
                const model_st_info_t *in = model_st_at(f, i);
                CHECK(strcmp(in->name, t[i].name) == 0, "name %s want %s", in->name, t[i].name);
                CHECK(model_st_find(f, t[i].name) == in, "find %s", t[i].name);
                CHECK(in->dtype == MODEL_ST_F32 && in->ndim == t[i].ndim &&
                          memcmp(in->shape, t[i].shape, t[i].ndim * 8) == 0,
                      "%s: dtype/shape", t[i].name);
                float *got = malloc((in->numel ? in->numel : 1) * 4);
                rc = model_st_read_f32(f, in, got, in->numel);
                CHECK(rc == SEMOE_OK && memcmp(got, bufs[i], in->numel * 4) == 0,
                      "%s: data not bit-exact", t[i].name);
                CHECK(model_st_read_f32(f, in, got, in->numel + 1) == SEMOE_EINVAL,
                      "wrong destination size accepted");
                free(got);
            }
        }
        model_st_close(&f);
        for (size_t i = 0; i < n; i++)
            free(bufs[i]);
    }
    /* The writer refuses repeated and reserved names. */
    float x = 1;
    model_st_tensor_t bad[2] = {{.name = "a", .ndim = 0, .data = &x},
                                {.name = "a", .ndim = 0, .data = &x}};
    CHECK(model_st_write(s_path("bad.safetensors"), bad, 2) == SEMOE_EINVAL &&
              s_err_names("bad.safetensors", "a"), "repeated name: %s", semoe_err_msg());
    bad[0].name = "__metadata__";
    CHECK(model_st_write(s_path("bad.safetensors"), bad, 1) == SEMOE_EINVAL,
          "reserved name accepted");
}

/* BF16 and F16 read to float32 exactly (every half is a float). */
static void s_test_half(void)
{
    const uint16_t f16[] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x03ff, 0x0400, 0x7c00, 0xfc00,
                            0x8000, 0x3555};
    const float f16_want[] = {1.0f, -2.0f, 65504.0f, 5.9604644775390625e-8f,
                              6.09755516052246094e-5f, 6.103515625e-5f, INFINITY, -INFINITY,
                              -0.0f, 0.333251953125f};
    const uint16_t bf16[] = {0x3f80, 0xc040, 0x0000, 0x7f80};
    const float bf16_want[] = {1.0f, -3.0f, 0.0f, INFINITY};
    char path[512];
    snprintf(path, sizeof path, "%s", s_path("half.safetensors"));
    char header[512];
    snprintf(header, sizeof header,
             "{\"h\":{\"dtype\":\"F16\",\"shape\":[2,5],\"data_offsets\":[0,20]},"
             "\"b\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[20,28]},"
             "\"i\":{\"dtype\":\"I32\",\"shape\":[1],\"data_offsets\":[28,32]}}");
    size_t hl = strlen(header), hp = (hl + 7) / 8 * 8;
    uint8_t buf[1024] = {0};
    uint64_t n = hp;
    memcpy(buf, &n, 8);
    memset(buf + 8, ' ', hp);
    memcpy(buf + 8, header, hl);
    memcpy(buf + 8 + hp, f16, 20);
    memcpy(buf + 8 + hp + 20, bf16, 8);
    s_put(path, buf, 8 + hp + 32);
    model_st_file_t *f = NULL;
    semoe_rc rc = model_st_open(path, &f);
    CHECK(rc == SEMOE_OK, "open: %s", semoe_err_msg());
    if (rc != SEMOE_OK)
        return;
    float got[10];
    CHECK(model_st_read_f32(f, model_st_find(f, "h"), got, 10) == SEMOE_OK, "%s",
          semoe_err_msg());
    for (int i = 0; i < 10; i++)
        CHECK(memcmp(&got[i], &f16_want[i], 4) == 0, "F16 %04x -> %.9g want %.9g", f16[i],
              got[i], f16_want[i]);
    CHECK(model_st_read_f32(f, model_st_find(f, "b"), got, 4) == SEMOE_OK, "%s",
          semoe_err_msg());
    for (int i = 0; i < 4; i++)
        CHECK(got[i] == bf16_want[i], "BF16 %04x -> %g want %g", bf16[i], got[i], bf16_want[i]);
    CHECK(model_st_read_f32(f, model_st_find(f, "i"), got, 1) == SEMOE_EINVAL &&
              s_err_names("half.safetensors", "tensor i"), "I32 read as floats: %s",
          semoe_err_msg());
    CHECK(model_st_meta(f, "format") == NULL, "metadata where none was written");
    model_st_close(&f);
}

/* Hand-made bad files: each refused with one line naming the file (and tensor). */
static void s_test_bad_files(void)
{
    char path[512];
    snprintf(path, sizeof path, "%s", s_path("bad.safetensors"));
    const char *base = "bad.safetensors";
    struct {
        const char *header;
        size_t data;
        const char *tensor; /* must appear in the message, or NULL */
    } cases[] = {
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]}}", 12, "tensor a"},
        {"{\"a\":{\"dtype\":\"F33\",\"shape\":[4],\"data_offsets\":[0,16]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[-4],\"data_offsets\":[0,16]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4.5],\"data_offsets\":[0,16]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":\"4\",\"data_offsets\":[0,16]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16],\"x\":1}}", 16,
         "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[16,0]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}", 8, "tensor a"},
        /* overlap, hole, trailing bytes, duplicate */
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "tensor b"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[12,20]}}", 20, "tensor b"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12, "after"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]}}", 16, "tensor a"},
        {"{\"__metadata__\":{\"format\":1}}", 0, "__metadata__"},
        {"{\"__metadata__\":[]}", 0, "__metadata__"},
        {"[1, 2]", 0, NULL},
        {"{\"a\":", 0, "JSON"},
        {"{} x", 0, "after"},
        {"", 0, NULL},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,4]}}", 4,
         "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
         "\"data_offsets\":[0,4]}}", 4, "tensor a"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,1e300]}}", 16, "tensor a"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        s_raw(path, cases[i].header, cases[i].data);
        model_st_file_t *f = NULL;
        semoe_rc rc = model_st_open(path, &f);
        CHECK(rc == SEMOE_EINVAL && f == NULL && s_err_names(base, cases[i].tensor),
              "case %zu (%s) accepted or badly reported: %s", i, cases[i].header,
              rc == SEMOE_OK ? "accepted" : semoe_err_msg());
        model_st_close(&f);
    }
    /* The reference message for the shape mismatch. */
    s_raw(path, "{\"model.norm.weight\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,12]}}",
          12);
    model_st_file_t *f = NULL;
    model_st_open(path, &f);
    char want[600];
    snprintf(want, sizeof want, "%s: tensor model.norm.weight: data_offsets [0, 12] do not match "
             "shape [4] x F32 (16 bytes)", path);
    CHECK(strcmp(semoe_err_msg(), want) == 0, "message \"%s\"", semoe_err_msg());
    model_st_close(&f);
    /* Header length: past the end, over the limit, shorter than 8 bytes, missing file. */
    uint8_t b[16] = {0};
    uint64_t n = 9;
    memcpy(b, &n, 8);
    memcpy(b + 8, "{}      ", 8);
    s_put(path, b, 16);
    CHECK(model_st_open(path, &f) == SEMOE_EINVAL && s_err_names(base, "past the end"), "%s",
          semoe_err_msg());
    n = 200000000;
    memcpy(b, &n, 8);
    s_put(path, b, 16);
    CHECK(model_st_open(path, &f) == SEMOE_EINVAL && s_err_names(base, "limit"), "%s",
          semoe_err_msg());
    s_put(path, b, 5);
    CHECK(model_st_open(path, &f) == SEMOE_EINVAL && s_err_names(base, NULL), "%s",
          semoe_err_msg());
    CHECK(model_st_open(s_path("nonexistent.safetensors"), &f) != SEMOE_OK &&
              s_err_names("nonexistent.safetensors", NULL), "%s", semoe_err_msg());
    /* An empty file of tensors is valid. */
    s_raw(path, "{}", 0);
    CHECK(model_st_open(path, &f) == SEMOE_OK && model_st_count(f) == 0, "%s", semoe_err_msg());
    model_st_close(&f);
}

/* Random mutations of a valid file: accepted (and then readable) or one line naming it. */
static void s_test_mutations(void)
{
    float data[64];
    for (int i = 0; i < 64; i++)
        data[i] = (float)test_rand_unit();
    model_st_tensor_t t[3] = {{.name = "model.norm.weight", .ndim = 1, .shape = {16}, .data = data},
                              {.name = "w", .ndim = 2, .shape = {4, 8}, .data = data + 16},
                              {.name = "b", .ndim = 1, .shape = {16}, .data = data + 48}};
    char good[512], path[512];
    snprintf(good, sizeof good, "%s", s_path("good.safetensors"));
    snprintf(path, sizeof path, "%s", s_path("mut.safetensors"));
    CHECK(model_st_write(good, t, 3) == SEMOE_OK, "%s", semoe_err_msg());
    size_t len;
    uint8_t *orig = s_get(good, &len);
    uint64_t hlen;
    memcpy(&hlen, orig, 8);
    uint8_t *buf = malloc(len + 64);
    int refused = 0;
    for (int iter = 0; iter < 400; iter++) {
        memcpy(buf, orig, len);
        size_t n = len;
        switch (test_rand_below(5)) {
        case 0: /* truncate */
            n = test_rand_below(len);
            break;
        case 1: /* flip bytes in the header */
            for (int k = 1 + (int)test_rand_below(3); k > 0; k--)
                buf[8 + test_rand_below(hlen)] ^= (uint8_t)(1 + test_rand_below(255));
            break;
        case 2: /* the header length */
            buf[test_rand_below(8)] ^= (uint8_t)(1 + test_rand_below(255));
            break;
        case 3: { /* replace a header byte with a JSON-significant one */
            const char *sig = "{}[],:\"0123456789-.e ";
            buf[8 + test_rand_below(hlen)] = (uint8_t)sig[test_rand_below(strlen(sig))];
            break;
        }
        default: /* append bytes */
            n = len + 1 + test_rand_below(40);
            break;
        }
        s_put(path, buf, n);
        model_st_file_t *f = NULL;
        semoe_rc rc = model_st_open(path, &f);
        if (rc == SEMOE_OK) {
            for (size_t i = 0; i < model_st_count(f); i++) {
                const model_st_info_t *in = model_st_at(f, i);
                if (in->numel > 1 << 20)
                    continue;
                float *dst = malloc((in->numel ? in->numel : 1) * 4);
                semoe_rc r2 = model_st_read_f32(f, in, dst, in->numel);
                CHECK(r2 == SEMOE_OK || s_err_names("mut.safetensors", in->name),
                      "read of a mutated file: %s", semoe_err_msg());
                free(dst);
            }
        } else {
            refused++;
            CHECK(rc == SEMOE_EINVAL && s_err_names("mut.safetensors", NULL),
                  "iteration %d: rc %s message \"%s\"", iter, semoe_rc_name(rc), semoe_err_msg());
        }
        model_st_close(&f);
    }
    CHECK(refused > 200, "only %d of 400 mutations refused", refused);
    free(buf);
    free(orig);
}

/* ---- checkpoints -------------------------------------------------------------------------- */

static void s_random_config(model_config_t *c)
{
    model_config_defaults(c);
    c->vocab_size = 1 + (uint32_t)test_rand_below(50);
    c->num_key_value_heads = 1 + (uint32_t)test_rand_below(2);
    c->num_attention_heads = c->num_key_value_heads * (1 + (uint32_t)test_rand_below(2));
    c->head_dim = 1 + (uint32_t)test_rand_below(6);
    c->hidden_size = 1 + (uint32_t)test_rand_below(16);
    c->intermediate_size = 1 + (uint32_t)test_rand_below(16);
    c->num_hidden_layers = 1 + (uint32_t)test_rand_below(6);
    c->num_local_experts = 1 + (uint32_t)test_rand_below(6);
    c->num_experts_per_tok = 1;
    c->tie_word_embeddings = test_rand_below(2);
}

/* A params object holding a random subset of experts, or NULL ids for all. */
static model_params_t *s_subset(const model_config_t *c)
{
    uint32_t G = c->num_hidden_layers * c->num_local_experts, *ids = calloc(G, 4);
    size_t m = 0;
    for (uint32_t g = 0; g < G; g++)
        if (test_rand_below(2))
            ids[m++] = g;
    model_params_t *p = NULL;
    if (model_params_new(c, ids, m, &p) != SEMOE_OK)
        fprintf(stderr, "model_params_new: %s\n", semoe_err_msg());
    free(ids);
    return p;
}

static bool s_same_held(const model_params_t *full, const model_params_t *p)
{
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *a = model_params_at(full, i), *b = model_params_at(p, i);
        if (b->data && memcmp(a->data, b->data, a->numel * 4) != 0) {
            fprintf(stderr, "  %s differs\n", a->name);
            return false;
        }
    }
    return true;
}

static void s_test_checkpoints(void)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s", s_path("ckpt"));
    for (int iter = 0; iter < 30; iter++) {
        model_config_t c;
        s_random_config(&c);
        s_clear_dir(dir);
        model_params_t *full = NULL;
        if (model_params_new(&c, NULL, 0, &full) != SEMOE_OK)
            return;
        model_params_init(full, test_rand());
        uint32_t lps = 1 + (uint32_t)test_rand_below(c.num_hidden_layers + 1);
        uint32_t nshards = (c.num_hidden_layers + lps - 1) / lps;
        semoe_rc rc = model_shards_save(dir, full, lps);
        CHECK(rc == SEMOE_OK, "save: %s", semoe_err_msg());
        char name[256];
        if (nshards == 1) {
            CHECK(access(s_path("ckpt/model.safetensors"), F_OK) == 0, "no model.safetensors");
            CHECK(access(s_path("ckpt/" MODEL_ST_INDEX), F_OK) != 0, "index for one shard");
        } else {
            CHECK(access(s_path("ckpt/" MODEL_ST_INDEX), F_OK) == 0, "no index");
            for (uint32_t k = 1; k <= nshards; k++) {
                snprintf(name, sizeof name, "ckpt/model-%05u-of-%05u.safetensors", k, nshards);
                CHECK(access(s_path(name), F_OK) == 0, "%s missing", name);
            }
            /* Embedding in the first shard, norm and lm_head in the last, layer i in i/lps. */
            model_st_file_t *first = NULL, *last = NULL;
            snprintf(name, sizeof name, "ckpt/model-00001-of-%05u.safetensors", nshards);
            model_st_open(s_path(name), &first);
            snprintf(name, sizeof name, "ckpt/model-%05u-of-%05u.safetensors", nshards, nshards);
            model_st_open(s_path(name), &last);
            CHECK(first && last, "shards do not open: %s", semoe_err_msg());
            if (first && last) {
                CHECK(model_st_find(first, "model.embed_tokens.weight"), "embedding not first");
                CHECK(model_st_find(last, "model.norm.weight"), "norm not last");
                CHECK(c.tie_word_embeddings || model_st_find(last, "lm_head.weight"),
                      "lm_head not last");
                CHECK(!model_st_find(last, "model.layers.0.input_layernorm.weight"),
                      "layer 0 in the last shard");
            }
            model_st_close(&first);
            model_st_close(&last);
            size_t ilen = 0;
            char *itext = (char *)s_get(s_path("ckpt/" MODEL_ST_INDEX), &ilen);
            itext[ilen] = '\0';
            char want[64];
            snprintf(want, sizeof want, "%llu",
                     (unsigned long long)(model_params_total(&c) * 4));
            CHECK(strstr(itext, "\"total_size\"") && strstr(itext, want),
                  "index total_size not %s", want);
            free(itext);
        }
        /* Load into a fresh full object and into a random subset. */
        model_params_t *p = NULL;
        model_params_new(&c, NULL, 0, &p);
        rc = model_shards_load(dir, p);
        CHECK(rc == SEMOE_OK && s_same_held(full, p), "full load: %s", semoe_err_msg());
        model_params_destroy(&p);
        p = s_subset(&c);
        rc = model_shards_load(dir, p);
        CHECK(rc == SEMOE_OK && s_same_held(full, p), "subset load: %s", semoe_err_msg());
        model_params_destroy(&p);
        /* Saving a worker's subset is refused (a checkpoint needs every expert). */
        if (c.num_local_experts > 1) {
            uint32_t one = 0;
            model_params_new(&c, &one, 1, &p);
            CHECK(model_shards_save(dir, p, 1) == SEMOE_EINVAL && s_one_line(semoe_err_msg()),
                  "saving a subset accepted");
            model_params_destroy(&p);
        }
        model_params_destroy(&full);
    }
}

/* Checkpoints that do not fit the params object, and broken indexes. */
static void s_test_bad_checkpoints(void)
{
    char dir[512];
    snprintf(dir, sizeof dir, "%s", s_path("bad"));
    model_config_t c;
    model_config_defaults(&c);
    c.vocab_size = 11, c.hidden_size = 6, c.intermediate_size = 5, c.num_hidden_layers = 3;
    c.num_attention_heads = 2, c.num_key_value_heads = 1, c.head_dim = 4; /* o_proj (6, 8) */
    c.num_local_experts = 3, c.num_experts_per_tok = 1, c.tie_word_embeddings = false;
    model_params_t *full = NULL, *p = NULL;
    model_params_new(&c, NULL, 0, &full);
    model_params_init(full, 42);
    model_params_new(&c, NULL, 0, &p);
    size_t n = model_params_count(full);
    model_st_tensor_t *t = calloc(n + 1, sizeof *t);
    for (size_t i = 0; i < n; i++) {
        const model_param_t *q = model_params_at(full, i);
        t[i] = (model_st_tensor_t){.name = q->name, .ndim = q->ndim, .data = q->data};
        memcpy(t[i].shape, q->shape, sizeof q->shape);
    }
    char single[512];
    snprintf(single, sizeof single, "%s", s_path("bad/model.safetensors"));

    /* Missing tensor (the last), named. */
    s_clear_dir(dir);
    model_st_write(single, t, n - 1);
    CHECK(model_shards_load(dir, p) == SEMOE_EINVAL && s_err_names("bad/model.safetensors",
                                                               "lm_head.weight"),
          "missing tensor: %s", semoe_err_msg());
    /* Extra tensor, named. */
    float extra[2] = {1, 2};
    t[n] = (model_st_tensor_t){.name = "model.layers.0.mlp.bias", .ndim = 1, .shape = {2},
                               .data = extra};
    model_st_write(single, t, n + 1);
    CHECK(model_shards_load(dir, p) == SEMOE_EINVAL &&
              s_err_names("bad/model.safetensors", "model.layers.0.mlp.bias"),
          "extra tensor: %s", semoe_err_msg());
    /* An expert beyond the config (E=3) is extra too. */
    t[n].name = "model.layers.0.block_sparse_moe.experts.3.w1.weight";
    model_st_write(single, t, n + 1);
    CHECK(model_shards_load(dir, p) == SEMOE_EINVAL && s_err_names(NULL, "experts.3.w1"),
          "extra expert: %s", semoe_err_msg());
    /* Shape mismatch against the table: a transposed o_proj. */
    long oi = model_params_index(full, "model.layers.1.self_attn.o_proj.weight");
    uint64_t s0 = t[oi].shape[0];
    t[oi].shape[0] = t[oi].shape[1], t[oi].shape[1] = s0;
    model_st_write(single, t, n);
    CHECK(model_shards_load(dir, p) == SEMOE_EINVAL &&
              s_err_names("bad/model.safetensors", "model.layers.1.self_attn.o_proj.weight"),
          "transposed tensor: %s", semoe_err_msg());
    t[oi].shape[1] = t[oi].shape[0], t[oi].shape[0] = s0;
    /* No checkpoint at all. */
    s_clear_dir(dir);
    CHECK(model_shards_load(dir, p) == SEMOE_EINVAL && s_err_names("bad", NULL), "empty dir: %s",
          semoe_err_msg());

    /* Broken indexes over a good sharded save. */
    char index[512];
    snprintf(index, sizeof index, "%s", s_path("bad/" MODEL_ST_INDEX));
    struct {
        const char *text;
        const char *want;
    } idx[] = {
        {"not json", NULL},
        {"[]", NULL},
        {"{\"metadata\":{}}", "weight_map"},
        {"{\"weight_map\":[]}", "weight_map"},
        {"{\"metadata\":3,\"weight_map\":{}}", "metadata"},
        {"{\"metadata\":{\"total_size\":-1},\"weight_map\":{}}", "total_size"},
        {"{\"weight_map\":{\"model.norm.weight\":7}}", "model.norm.weight"},
        {"{\"weight_map\":{\"model.norm.weight\":\"../x.safetensors\"}}", "model.norm.weight"},
        {"{\"weight_map\":{\"model.norm.weight\":\"model-00002-of-00002.safetensors\"}}",
         "lacks"},
        {"{\"weight_map\":{\"bogus.weight\":\"model-00002-of-00002.safetensors\"}}",
         "bogus.weight"},
    };
    for (size_t i = 0; i < sizeof idx / sizeof idx[0]; i++) {
        s_clear_dir(dir);
        model_shards_save(dir, full, 2);
        s_put(index, idx[i].text, strlen(idx[i].text));
        CHECK(model_shards_load(dir, p) == SEMOE_EINVAL &&
                  s_err_names("bad/" MODEL_ST_INDEX, idx[i].want),
              "index %zu (%s): %s", i, idx[i].text, semoe_err_msg());
    }
    /* An index that maps a tensor to the wrong (existing) shard, or to a missing file. */
    s_clear_dir(dir);
    model_shards_save(dir, full, 2);
    size_t ilen;
    char *text = (char *)s_get(index, &ilen);
    text[ilen] = '\0';
    char *at = strstr(text, "\"model.norm.weight\"");
    char *q = at ? strstr(at, "00002-of") : NULL;
    if (q) {
        q[4] = '1'; /* model-00002-of-00002 -> model-00001-of-00002 */
        s_put(index, text, ilen);
        CHECK(model_shards_load(dir, p) == SEMOE_EINVAL && s_err_names(NULL, "model.norm.weight"),
              "wrong shard: %s", semoe_err_msg());
        q[4] = '9';
        s_put(index, text, ilen);
        CHECK(model_shards_load(dir, p) != SEMOE_OK && s_err_names("model-00009-of-00002", NULL),
              "missing shard file: %s", semoe_err_msg());
    } else {
        CHECK(false, "index text unexpected: %s", text);
    }
    free(text);
    /* Both layouts at once. */
    s_clear_dir(dir);
    model_shards_save(dir, full, 2);
    model_st_write(single, t, n);
    CHECK(model_shards_load(dir, p) == SEMOE_EINVAL && s_err_names("ambiguous", NULL), "%s",
          semoe_err_msg());
    /* Random mutations of a shard or the index: OK or one line naming the directory. */
    int refused = 0;
    for (int iter = 0; iter < 300; iter++) {
        s_clear_dir(dir);
        model_shards_save(dir, full, 1 + (uint32_t)test_rand_below(3));
        const char *victim = access(index, F_OK) == 0 && test_rand_below(3) == 0
                                 ? index
                                 : s_path("bad/model-00001-of-00002.safetensors");
        if (access(victim, F_OK) != 0)
            victim = access(index, F_OK) == 0 ? s_path("bad/model-00001-of-00003.safetensors")
                                              : single;
        size_t len;
        uint8_t *b = s_get(victim, &len);
        if (!b) {
            CHECK(false, "no file %s", victim);
            continue;
        }
        size_t hl = len;
        if (victim != index) {
            uint64_t h;
            memcpy(&h, b, 8);
            hl = 8 + h;
        }
        size_t nb = len;
        if (test_rand_below(4) == 0)
            nb = test_rand_below(len);
        else
            for (int k = 1 + (int)test_rand_below(3); k > 0; k--)
                b[test_rand_below(hl)] ^= (uint8_t)(1 + test_rand_below(255));
        s_put(victim, b, nb);
        free(b);
        semoe_rc rc = model_shards_load(dir, p);
        if (rc != SEMOE_OK) {
            refused++;
            CHECK(s_err_names(s_tmp, NULL), "iteration %d: message \"%s\"", iter,
                  semoe_err_msg());
        }
    }
    CHECK(refused > 150, "only %d of 300 mutated checkpoints refused", refused);
    model_params_destroy(&p);
    model_params_destroy(&full);
    free(t);
}

int main(void)
{
    test_init("test_safetensors");
    snprintf(s_tmp, sizeof s_tmp, "/tmp/test_safetensors.XXXXXX");
    if (!mkdtemp(s_tmp)) {
        perror("mkdtemp");
        return 2;
    }
    s_test_round_trip();
    s_test_half();
    s_test_bad_files();
    s_test_mutations();
    s_test_checkpoints();
    s_test_bad_checkpoints();
    nftw(s_tmp, s_rm, 8, FTW_DEPTH | FTW_PHYS);
    return test_finish();
}
