/* The model as a Hugging Face folder (see shards.h): safetensors shards with
 * model.safetensors.index.json as save_pretrained writes them, loaded by name into a params
 * table. */
#include "model/shards.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/safetensors.h"

/* ---- paths and shard names ------------------------------------------------------------ */

char *model_shards_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = semoe_xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

bool model_shards_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

semoe_rc model_shards_read_text(const char *path, char **out, size_t *len)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return semoe_err_errno(SEMOE_EINVAL, "%s: open", path);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > MODEL_ST_MAX_HEADER) {
        close(fd);
        return model_st_fail(SEMOE_EINVAL, "%s: not a regular file of at most %u bytes", path,
                             MODEL_ST_MAX_HEADER);
    }
    size_t size = (size_t)st.st_size, got = 0;
    char *text = semoe_xmalloc(size + 1);
    while (got < size) {
        ssize_t r = read(fd, text + got, size - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    text[got] = '\0';
    if (memchr(text, 0, got) || !model_st_utf8_valid((const uint8_t *)text, got)) {
        free(text);
        return model_st_fail(SEMOE_EINVAL, "%s: not valid UTF-8 text", path);
    }
    *out = text;
    *len = got;
    return SEMOE_OK;
}


/* Appends a name to a list of at most 4 shown names, counting the rest. */
typedef struct {
    model_st_buf_t b;
    size_t n;
} s_names_t;

static void s_names_add(s_names_t *l, const char *name)
{
    if (l->n < 4) {
        if (l->n)
            model_st_buf_add(&l->b, ", ", 2);
        model_st_buf_add(&l->b, name, strlen(name) < 200 ? strlen(name) : 200);
    }
    l->n++;
}

static const char *s_names_str(s_names_t *l)
{
    if (l->n > 4)
        model_st_buf_printf(&l->b, " (and %zu more)", l->n - 4);
    return l->b.p ? l->b.p : "";
}

/* The shard (0-based) of nshards that tensor t goes to: its layer's, the embedding in the
 * first, model.norm and lm_head in the last. */
uint32_t model_shards_of(const model_param_t *t, uint32_t layers_per_shard, uint32_t nshards)
{
    if (t->layer >= 0)
        return (uint32_t)t->layer / layers_per_shard;
    return strcmp(t->name, "model.embed_tokens.weight") == 0 ? 0 : nshards - 1;
}

/* "<stem>.safetensors" for one shard, else "<stem>-0000K-of-0000N.safetensors". */
void model_shards_name(char *buf, size_t cap, const char *stem, uint32_t k, uint32_t nshards)
{
    if (nshards == 1)
        snprintf(buf, cap, "%s.safetensors", stem);
    else
        snprintf(buf, cap, "%s-%05u-of-%05u.safetensors", stem, k + 1, nshards);
}

semoe_rc model_shards_save(const char *dir, const model_params_t *p,
                               uint32_t layers_per_shard)
{
    const model_config_t *c = model_params_config(p);
    size_t n = model_params_count(p);
    if (layers_per_shard == 0)
        return model_st_fail(SEMOE_EINVAL, "%s: layers_per_shard=0: need at least 1", dir);
    for (size_t i = 0; i < n; i++)
        if (!model_params_at(p, i)->data)
            return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: not held here; a checkpoint needs "
                                 "every expert", dir, model_params_at(p, i)->name);
    uint32_t L = c->num_hidden_layers;
    uint32_t nshards = (L + layers_per_shard - 1) / layers_per_shard;
    if (nshards == 0)
        nshards = 1;
    model_st_tensor_t *ts = semoe_xcalloc(n, sizeof *ts);
    cJSON *index = cJSON_CreateObject();
    cJSON *meta = cJSON_AddObjectToObject(index, "metadata");
    cJSON *wmap = cJSON_AddObjectToObject(index, "weight_map");
    uint64_t total = 0;
    semoe_rc rc = SEMOE_OK;
    char *path = NULL;
    for (uint32_t k = 0; k < nshards; k++) {
        char fname[64];
        model_shards_name(fname, sizeof fname, "model", k, nshards);
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            const model_param_t *t = model_params_at(p, i);
            if (model_shards_of(t, layers_per_shard, nshards) != k)
                continue;
            ts[m] = (model_st_tensor_t){.name = t->name, .ndim = t->ndim, .data = t->data};
            memcpy(ts[m].shape, t->shape, sizeof t->shape);
            m++;
            total += t->numel * 4;
            cJSON_AddStringToObject(wmap, t->name, fname);
        }
        path = model_shards_join(dir, fname);
        SEMOE_CHECK_GOTO(model_st_write(path, ts, m), rc, fail);
        free(path);
        path = NULL;
    }
    /* One layout per directory: the other form, left from an earlier save, would shadow or
     * contradict this one (transformers prefers model.safetensors when both exist). */
    path = model_shards_join(dir, nshards == 1 ? MODEL_ST_INDEX : MODEL_ST_SINGLE);
    if (unlink(path) != 0 && errno != ENOENT) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: unlink", path);
        goto fail;
    }
    free(path);
    path = NULL;
    if (nshards > 1) {
        cJSON_AddNumberToObject(meta, "total_size", (double)total);
        char *text = cJSON_Print(index);
        path = model_shards_join(dir, MODEL_ST_INDEX);
        model_st_piece_t pieces[2] = {{text, strlen(text)}, {"\n", 1}};
        rc = model_st_write_atomic(path, pieces, 2);
        free(text);
    }
fail:
    free(path);
    cJSON_Delete(index);
    free(ts);
    return rc;
}

/* A shard name an index may give: a plain file in the same directory. */
static bool s_safe_fname(const char *s)
{
    size_t n = strlen(s), suf = strlen(".safetensors");
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        if (*c < 0x20 || *c == 0x7f) /* it ends up in messages: one printable line */
            return false;
    return n > suf && n < 256 && s[0] != '.' && !strchr(s, '/') && !strchr(s, '\\') &&
           strcmp(s + n - suf, ".safetensors") == 0;
}

/* Reads and checks dir's index.json: an object with a weight_map of tensor name -> shard file
 * and an optional metadata object (total_size a non-negative integer when given). */
static semoe_rc s_read_index(const char *path, cJSON **out)
{
    *out = NULL;
    char *text;
    size_t got;
    SEMOE_CHECK(model_shards_read_text(path, &text, &got));
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(text, got, &end, false);
    bool trailing = false;
    for (const char *c = j ? end : text + got; c < text + got; c++)
        trailing = trailing || (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r');
    free(text);
    if (!j || trailing) {
        cJSON_Delete(j);
        return model_st_fail(SEMOE_EINVAL, "%s: not valid JSON", path);
    }
    semoe_rc rc = SEMOE_OK;
    const cJSON *wmap = cJSON_GetObjectItemCaseSensitive(j, "weight_map");
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(j, "metadata");
    const cJSON *e;
    uint64_t u;
    if (!cJSON_IsObject(j)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: not a JSON object", path);
    } else if (!cJSON_IsObject(wmap)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: weight_map missing or not an object", path);
    } else if (meta && !cJSON_IsObject(meta)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: metadata is not an object", path);
    } else if (meta && cJSON_GetObjectItemCaseSensitive(meta, "total_size") &&
               !model_st_json_u64(cJSON_GetObjectItemCaseSensitive(meta, "total_size"), &u)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: metadata.total_size is not a non-negative integer",
                           path);
    } else {
        cJSON_ArrayForEach(e, wmap) {
            if (!cJSON_IsString(e)) {
                rc = model_st_fail(SEMOE_EINVAL, "%s: weight_map: tensor %.200s: shard is not a "
                                   "string", path, e->string);
                break;
            }
            if (!s_safe_fname(e->valuestring)) {
                rc = model_st_fail(SEMOE_EINVAL, "%s: weight_map: tensor %.200s: shard \"%.100s\" "
                                   "is not a .safetensors file in the same directory", path,
                                   e->string, e->valuestring);
                break;
            }
        }
    }
    if (rc != SEMOE_OK) {
        cJSON_Delete(j);
        return rc;
    }
    *out = j;
    return SEMOE_OK;
}

/* Checks every tensor of one shard file against p's table and the index, and reads the held
 * ones. shard_of[i]: the file the index names for table tensor i; found[i] set here. */
static semoe_rc s_load_file(const char *dir, const char *fname, const char *const *shard_of,
                            uint8_t *found, model_params_t *p)
{
    char *path = model_shards_join(dir, fname);
    model_st_file_t *f = NULL;
    s_names_t extra = {0};
    semoe_rc rc = model_st_open(path, &f);
    if (rc != SEMOE_OK) {
        semoe_err_trace(__FILE__, __LINE__);
        goto out;
    }
    for (size_t k = 0; k < model_st_count(f) && rc == SEMOE_OK; k++) {
        const model_st_info_t *t = model_st_at(f, k);
        long i = model_params_index(p, t->name);
        if (i < 0) {
            s_names_add(&extra, t->name);
            continue;
        }
        const model_param_t *q = model_params_at(p, (size_t)i);
        if (strcmp(shard_of[i], fname) != 0) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: the index maps it to %s", path,
                               t->name, shard_of[i]);
            break;
        }
        if (t->ndim != q->ndim || memcmp(t->shape, q->shape, q->ndim * sizeof q->shape[0])) {
            char have[160], want[160];
            model_st_shape_str(have, sizeof have, t->shape, t->ndim);
            model_st_shape_str(want, sizeof want, q->shape, q->ndim);
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape %s, the model config needs %s",
                               path, t->name, have, want);
            break;
        }
        found[i] = 1;
        if (q->data)
            rc = model_st_read_f32(f, t, q->data, q->numel);
    }
    if (rc == SEMOE_OK && extra.n)
        rc = model_st_fail(SEMOE_EINVAL, "%s: %zu tensors this model does not have: %s", path,
                           extra.n, s_names_str(&extra));
out:
    free(extra.b.p);
    model_st_close(&f);
    free(path);
    return rc;
}

semoe_rc model_shards_load(const char *dir, model_params_t *p)
{
    size_t n = model_params_count(p);
    char *ipath = model_shards_join(dir, MODEL_ST_INDEX), *spath = model_shards_join(dir, MODEL_ST_SINGLE);
    const char **shard_of = semoe_xcalloc(n ? n : 1, sizeof *shard_of);
    const char **files = semoe_xcalloc(n ? n : 1, sizeof *files);
    uint8_t *found = semoe_xcalloc(n ? n : 1, 1);
    size_t nfiles = 0;
    cJSON *index = NULL;
    s_names_t names = {0};
    semoe_rc rc = SEMOE_OK;
    bool have_index = model_shards_exists(ipath), have_single = model_shards_exists(spath);

    if (have_index && have_single) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: holds both %s and %s: ambiguous, remove one", dir,
                           MODEL_ST_INDEX, MODEL_ST_SINGLE);
        goto out;
    }
    if (!have_index && !have_single) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: no checkpoint: neither %s nor %s", dir,
                           MODEL_ST_INDEX, MODEL_ST_SINGLE);
        goto out;
    }
    if (have_single) {
        for (size_t i = 0; i < n; i++)
            shard_of[i] = MODEL_ST_SINGLE;
        files[nfiles++] = MODEL_ST_SINGLE;
    } else {
        SEMOE_CHECK_GOTO(s_read_index(ipath, &index), rc, out);
        const cJSON *e;
        cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(index, "weight_map")) {
            long i = model_params_index(p, e->string);
            if (i < 0) {
                s_names_add(&names, e->string);
                continue;
            }
            if (shard_of[i]) {
                rc = model_st_fail(SEMOE_EINVAL, "%s: weight_map: tensor %s: listed twice", ipath,
                                   e->string);
                goto out;
            }
            shard_of[i] = e->valuestring;
            size_t f = 0;
            while (f < nfiles && strcmp(files[f], e->valuestring) != 0)
                f++;
            if (f == nfiles)
                files[nfiles++] = e->valuestring;
        }
        if (names.n) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: weight_map has %zu tensors this model does not "
                               "have: %s", ipath, names.n, s_names_str(&names));
            goto out;
        }
        for (size_t i = 0; i < n; i++)
            if (!shard_of[i])
                s_names_add(&names, model_params_at(p, i)->name);
        if (names.n) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: weight_map lacks %zu tensors of this model: %s",
                               ipath, names.n, s_names_str(&names));
            goto out;
        }
    }
    for (size_t f = 0; f < nfiles; f++)
        SEMOE_CHECK_GOTO(s_load_file(dir, files[f], shard_of, found, p), rc, out);
    size_t first = n;
    for (size_t i = 0; i < n; i++)
        if (!found[i]) {
            first = first < n ? first : i;
            s_names_add(&names, model_params_at(p, i)->name);
        }
    if (names.n)
        rc = model_st_fail(SEMOE_EINVAL, "%s/%s: %zu tensors of this model missing%s: %s", dir,
                       shard_of[first], names.n, have_index ? " (the index maps them here)" : "",
                           s_names_str(&names));
out:
    free(names.b.p);
    cJSON_Delete(index);
    free(found);
    free(files);
    free(shard_of);
    free(spath);
    free(ipath);
    return rc;
}

semoe_rc model_shards_load_model(const char *dir, model_config_t *cfg, model_params_t **out)
{
    *out = NULL;
    char *path = model_shards_join(dir, "config.json");
    semoe_rc rc = model_config_load_hf(path, cfg);
    free(path);
    SEMOE_CHECK(rc);
    model_params_t *p = NULL;
    SEMOE_CHECK(model_params_new(cfg, NULL, 0, &p));
    if ((rc = model_shards_load(dir, p)) != SEMOE_OK) {
        model_params_destroy(&p);
        semoe_err_trace(__FILE__, __LINE__);
        return rc;
    }
    *out = p;
    return SEMOE_OK;
}
