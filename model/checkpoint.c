/* Training checkpoints (see checkpoint.h): the model folder (shards.c) plus the training state
 * under semoe/ and the manifest that makes a checkpoint whole or refused. */
#include "model/checkpoint.h"

#include <cjson/cJSON.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "model/safetensors.h"
#include "model/shards.h"

/* ---- training checkpoints: files, checksums ------------------------------------------------ */

#define S_FNV_OFFSET 0xcbf29ce484222325ull
#define S_FNV_PRIME 0x100000001b3ull

static uint64_t s_fnv(uint64_t h, const void *p, size_t n)
{
    const uint8_t *c = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ c[i]) * S_FNV_PRIME;
    return h;
}

/* Size and FNV-1a 64 of a regular file. */
static semoe_rc s_file_sum(const char *path, uint64_t *size, uint64_t *sum)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return semoe_err_errno(SEMOE_EINVAL, "%s: open", path);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return model_st_fail(SEMOE_EINVAL, "%s: not a regular file", path);
    }
    size_t cap = 1u << 20;
    uint8_t *buf = semoe_xmalloc(cap);
    uint64_t h = S_FNV_OFFSET, total = 0;
    semoe_rc rc = SEMOE_OK;
    for (;;) {
        ssize_t r = read(fd, buf, cap);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = semoe_err_errno(SEMOE_EIO, "%s: read", path);
            break;
        }
        if (r == 0)
            break;
        h = s_fnv(h, buf, (size_t)r);
        total += (uint64_t)r;
    }
    free(buf);
    close(fd);
    *size = total;
    *sum = h;
    return rc;
}

static semoe_rc s_parse_obj(const char *path, const char *text, size_t len, cJSON **out)
{
    cJSON *j = cJSON_ParseWithLength(text, len);
    if (!cJSON_IsObject(j)) {
        cJSON_Delete(j);
        return model_st_fail(SEMOE_EINVAL, "%s: not a JSON object", path);
    }
    *out = j;
    return SEMOE_OK;
}

/* Removes dir and what it holds, two levels at most (a checkpoint: files and semoe/). */
static void s_rmtree(const char *dir, int depth)
{
    DIR *d = opendir(dir);
    if (d) {
        struct dirent *e;
        while ((e = readdir(d))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char *p = model_shards_join(dir, e->d_name);
            struct stat st;
            if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) {
                if (depth > 0)
                    s_rmtree(p, depth - 1);
            } else {
                unlink(p);
            }
            free(p);
        }
        closedir(d);
    }
    rmdir(dir);
}

static void s_u64_hex(cJSON *o, const char *key, uint64_t v)
{
    char s[24];
    snprintf(s, sizeof s, "%016" PRIx64, v);
    cJSON_AddStringToObject(o, key, s);
}

static bool s_get_hex(const cJSON *o, const char *key, uint64_t *v)
{
    const cJSON *e = cJSON_GetObjectItemCaseSensitive(o, key);
    if (!cJSON_IsString(e) || strlen(e->valuestring) != 16)
        return false;
    uint64_t x = 0;
    for (const char *c = e->valuestring; *c; c++) {
        int d = *c >= '0' && *c <= '9' ? *c - '0' : *c >= 'a' && *c <= 'f' ? *c - 'a' + 10 : -1;
        if (d < 0)
            return false;
        x = x << 4 | (uint64_t)d;
    }
    *v = x;
    return true;
}

static bool s_get_u64(const cJSON *o, const char *key, uint64_t *v)
{
    return model_st_json_u64(cJSON_GetObjectItemCaseSensitive(o, key), v);
}

/* A file name a manifest may list: "name" or "semoe/name", printable, no way out of dir. */
static bool s_safe_rel(const char *s)
{
    const char *base = strncmp(s, "semoe/", 6) == 0 ? s + 6 : s;
    size_t n = strlen(base);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++)
        if (*c < 0x20 || *c == 0x7f)
            return false;
    return n > 0 && n < 256 && base[0] != '.' && !strchr(base, '/') && !strchr(base, '\\');
}

/* ---- training checkpoints: save ------------------------------------------------------------ */

/* The manifest's text: the object with every file, then a last member "checksum" holding the
 * FNV-1a 64 of every byte before it. */
#define S_SUM_KEY ",\n\"checksum\": \""

static semoe_rc s_write_manifest(const char *dir, char **files, size_t nfiles, uint64_t gen)
{
    cJSON *root = cJSON_CreateObject();
    cJSON_AddStringToObject(root, "format", "semoe-checkpoint");
    cJSON_AddNumberToObject(root, "version", 1);
    s_u64_hex(root, "generation", gen);
    cJSON *arr = cJSON_AddArrayToObject(root, "files");
    semoe_rc rc = SEMOE_OK;
    for (size_t i = 0; i < nfiles && rc == SEMOE_OK; i++) {
        char *path = model_shards_join(dir, files[i]);
        uint64_t size = 0, sum = 0;
        rc = s_file_sum(path, &size, &sum);
        free(path);
        cJSON *f = cJSON_CreateObject();
        cJSON_AddStringToObject(f, "path", files[i]);
        cJSON_AddNumberToObject(f, "size", (double)size);
        s_u64_hex(f, "fnv1a64", sum);
        cJSON_AddItemToArray(arr, f);
    }
    if (rc == SEMOE_OK) {
        char *text = cJSON_Print(root);
        size_t n = strlen(text);
        /* drop the closing brace: the checksum member goes before it */
        while (n && text[n - 1] != '}')
            n--;
        n = n ? n - 1 : 0;
        while (n && (text[n - 1] == '\n' || text[n - 1] == ' ' || text[n - 1] == '\t'))
            n--;
        char tail[64];
        snprintf(tail, sizeof tail, S_SUM_KEY "%016" PRIx64 "\"\n}\n",
                 s_fnv(S_FNV_OFFSET, text, n));
        model_st_piece_t pieces[2] = {{text, n}, {tail, strlen(tail)}};
        char *path = model_shards_join(dir, MODEL_CKPT_MANIFEST);
        rc = model_st_write_atomic(path, pieces, 2);
        free(path);
        free(text);
    }
    cJSON_Delete(root);
    return rc;
}

static semoe_rc s_write_json(const char *dir, const char *name, const char *text)
{
    char *path = model_shards_join(dir, name);
    model_st_piece_t pieces[2] = {{text, strlen(text)}, {"\n", 1}};
    semoe_rc rc = model_st_write_atomic(path, pieces, 2);
    free(path);
    return rc;
}

/* Writes semoe/optimizer*.safetensors from host copies of m and v (params' slab layout), one
 * file per model shard; appends their names to files. */
static semoe_rc s_save_optimizer(const char *dir, const model_params_t *p, const float *hm,
                                 const float *hv, uint32_t lps, uint32_t nshards, char **files,
                                 size_t *nfiles)
{
    size_t n = model_params_count(p);
    model_st_tensor_t *ts = semoe_xcalloc(2 * n, sizeof *ts);
    char (*names)[MODEL_PARAM_NAME_MAX + 16] = semoe_xcalloc(2 * n, sizeof *names);
    semoe_rc rc = SEMOE_OK;
    for (uint32_t k = 0; k < nshards && rc == SEMOE_OK; k++) {
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            const model_param_t *t = model_params_at(p, i);
            if (model_shards_of(t, lps, nshards) != k)
                continue;
            for (int which = 0; which < 2; which++) {
                snprintf(names[m], sizeof names[m], "%s.%s", t->name,
                         which ? "exp_avg_sq" : "exp_avg");
                ts[m] = (model_st_tensor_t){.name = names[m], .ndim = t->ndim,
                                            .data = (which ? hv : hm) + t->offset};
                memcpy(ts[m].shape, t->shape, sizeof t->shape);
                m++;
            }
        }
        char fname[96];
        memcpy(fname, "semoe/", 6);
        model_shards_name(fname + 6, sizeof fname - 6, "optimizer", k, nshards);
        char *path = model_shards_join(dir, fname);
        rc = model_st_write(path, ts, m);
        free(path);
        files[(*nfiles)++] = semoe_xstrdup(fname);
    }
    free(names);
    free(ts);
    return rc;
}

/* fsyncs a directory, making the renames in it durable. Best effort. */
static void s_fsync_dir(const char *dir)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

/* fsyncs the directory that holds path. */
static void s_fsync_parent(const char *path)
{
    char *parent = semoe_xstrdup(path);
    char *slash = strrchr(parent, '/');
    if (slash == parent)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    s_fsync_dir(slash ? parent : ".");
    free(parent);
}

/* Creates the missing directories above path (mkdir -p of its dirname). Errors are left to the
 * mkdir of path itself, which names them. */
static void s_mkdir_parents(const char *path)
{
    char *p = semoe_xstrdup(path);
    for (char *s = strchr(p + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = '\0';
        (void)mkdir(p, 0755);
        *s = '/';
    }
    free(p);
}

/* Writes the whole checkpoint of model_ckpt_save_host into tmp (removed first), manifest last.
 * dir names it in errors. */
static semoe_rc s_write_tmp(const char *dir, const char *tmp, const model_params_t *params,
                            const float *m, const float *v, int adam_step,
                            const model_ckpt_state_t *state)
{
    const model_config_t *c = model_params_config(params);
    size_t n = model_params_count(params);
    for (size_t i = 0; i < n; i++)
        if (!model_params_at(params, i)->data)
            return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: not held here; a checkpoint "
                                 "needs every expert", dir, model_params_at(params, i)->name);
    if (adam_step < 0)
        return model_st_fail(SEMOE_EINVAL, "%s: adam_step=%d: must be >= 0", dir, adam_step);
    uint32_t L = c->num_hidden_layers;
    uint32_t lps = state->layers_per_shard ? state->layers_per_shard : (L ? L : 1);
    uint32_t nshards = (L + lps - 1) / lps;
    if (nshards == 0)
        nshards = 1;
    size_t nfiles = 0;
    char **files = semoe_xcalloc(2 * (size_t)nshards + 4, sizeof *files);
    char *semoe_dir = model_shards_join(tmp, "semoe");
    char *cfg_text = NULL;
    cJSON *st = NULL;
    char *st_text = NULL;
    semoe_rc rc = SEMOE_OK;

    s_rmtree(tmp, 1);
    int made = mkdir(tmp, 0755);
    if (made != 0 && errno == ENOENT) {
        s_mkdir_parents(tmp);
        made = mkdir(tmp, 0755);
    }
    if (made != 0 || mkdir(semoe_dir, 0755) != 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: mkdir", tmp);
        goto fail;
    }
    cfg_text = model_config_hf_json(c);
    SEMOE_CHECK_GOTO(s_write_json(tmp, "config.json", cfg_text), rc, fail);
    files[nfiles++] = semoe_xstrdup("config.json");

    SEMOE_CHECK_GOTO(model_shards_save(tmp, params, lps), rc, fail);
    if (nshards == 1) {
        files[nfiles++] = semoe_xstrdup(MODEL_ST_SINGLE);
    } else {
        for (uint32_t k = 0; k < nshards; k++) {
            char fname[64];
            model_shards_name(fname, sizeof fname, "model", k, nshards);
            files[nfiles++] = semoe_xstrdup(fname);
        }
        files[nfiles++] = semoe_xstrdup(MODEL_ST_INDEX);
    }

    size_t first_opt = nfiles;
    SEMOE_CHECK_GOTO(s_save_optimizer(tmp, params, m, v, lps, nshards, files, &nfiles), rc,
                     fail);

    st = cJSON_CreateObject();
    cJSON_AddStringToObject(st, "format", "semoe-train-state");
    cJSON_AddNumberToObject(st, "version", 1);
    cJSON_AddNumberToObject(st, "step", (double)state->step);
    cJSON_AddNumberToObject(st, "adam_step", adam_step);
    cJSON_AddNumberToObject(st, "epoch", (double)state->epoch);
    cJSON_AddNumberToObject(st, "position", (double)state->position);
    s_u64_hex(st, "seed", state->seed);
    s_u64_hex(st, "job_hash", state->job_hash);
    s_u64_hex(st, "generation", state->generation);
    s_u64_hex(st, "run", state->run);
    cJSON *rng = cJSON_AddArrayToObject(st, "rng");
    for (int i = 0; i < 4; i++) {
        char s[24];
        snprintf(s, sizeof s, "%016" PRIx64, state->rng[i]);
        cJSON_AddItemToArray(rng, cJSON_CreateString(s));
    }
    cJSON *opt = cJSON_AddArrayToObject(st, "optimizer_files");
    for (size_t i = first_opt; i < nfiles; i++)
        cJSON_AddItemToArray(opt, cJSON_CreateString(files[i]));
    st_text = cJSON_Print(st);
    SEMOE_CHECK_GOTO(s_write_json(tmp, MODEL_CKPT_STATE, st_text), rc, fail);
    files[nfiles++] = semoe_xstrdup(MODEL_CKPT_STATE);

    SEMOE_CHECK_GOTO(s_write_manifest(tmp, files, nfiles, state->generation), rc, fail);
fail:
    free(st_text);
    cJSON_Delete(st);
    free(cfg_text);
    free(semoe_dir);
    for (size_t i = 0; i < nfiles; i++)
        free(files[i]);
    free(files);
    return rc;
}

/* Moves the whole checkpoint in tmp onto dir: the old checkpoint away, the new one in, the old
 * one removed. */
static semoe_rc s_install(const char *dir, const char *tmp)
{
    size_t tlen = strlen(dir) + 32;
    char *old = semoe_xmalloc(tlen);
    snprintf(old, tlen, "%s.old-%ld", dir, (long)getpid());
    semoe_rc rc = SEMOE_OK;
    s_rmtree(old, 1);
    if (model_shards_exists(dir) && rename(dir, old) != 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: rename to %s", dir, old);
    } else if (rename(tmp, dir) != 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: rename to %s", tmp, dir);
        (void)rename(old, dir);
    } else {
        s_rmtree(old, 1);
        s_fsync_parent(dir);
    }
    free(old);
    return rc;
}

/* "<dir>.tmp-<pid>": where this process writes dir before renaming it into place (freed by the
 * caller). */
static char *s_tmp_name(const char *dir)
{
    size_t tlen = strlen(dir) + 32;
    char *tmp = semoe_xmalloc(tlen);
    snprintf(tmp, tlen, "%s.tmp-%ld", dir, (long)getpid());
    return tmp;
}

semoe_rc model_ckpt_save_host(const char *dir, const model_params_t *params, const float *m,
                              const float *v, int adam_step, const model_ckpt_state_t *state)
{
    char *tmp = s_tmp_name(dir);
    semoe_rc rc = s_write_tmp(dir, tmp, params, m, v, adam_step, state);
    if (rc == SEMOE_OK)
        rc = s_install(dir, tmp);
    if (rc != SEMOE_OK)
        s_rmtree(tmp, 1);
    free(tmp);
    return rc;
}

semoe_rc model_ckpt_save(const char *dir, const model_backend_f32_t *be, model_params_t *params,
                         model_train_t *train, const model_ckpt_state_t *state)
{
    size_t floats = model_train_slab_floats(train);
    float *hm = semoe_xmalloc((floats ? floats : 1) * sizeof(float));
    float *hv = semoe_xmalloc((floats ? floats : 1) * sizeof(float));
    model_train_weights_to_params(train);
    be->to_host(hm, model_train_m(train), floats * sizeof(float));
    be->to_host(hv, model_train_v(train), floats * sizeof(float));
    semoe_rc rc = model_ckpt_save_host(dir, params, hm, hv, model_train_adam_step(train), state);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    free(hv);
    free(hm);
    return rc;
}

/* ---- training checkpoints: verify and load ------------------------------------------------- */

/* Reads and checks dir's manifest (its own checksum first) and every file it lists. */
static semoe_rc s_verify(const char *dir, cJSON **out)
{
    *out = NULL;
    char *mpath = model_shards_join(dir, MODEL_CKPT_MANIFEST);
    char *text = NULL;
    size_t len = 0;
    cJSON *j = NULL;
    semoe_rc rc = SEMOE_OK;
    if (!model_shards_exists(mpath)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: missing: not a complete semoe checkpoint (its "
                           "save did not finish, or the directory is no checkpoint)", mpath);
        goto out;
    }
    SEMOE_CHECK_GOTO(model_shards_read_text(mpath, &text, &len), rc, out);
    const char *key = NULL;
    for (const char *s = strstr(text, S_SUM_KEY); s; s = strstr(s + 1, S_SUM_KEY))
        key = s;
    uint64_t want = 0;
    const char *hex = key ? key + strlen(S_SUM_KEY) : NULL;
    bool ok = hex && strlen(hex) >= 16 && strcmp(hex + 16, "\"\n}\n") == 0;
    for (int i = 0; ok && i < 16; i++) {
        int d = hex[i] >= '0' && hex[i] <= '9' ? hex[i] - '0'
                : hex[i] >= 'a' && hex[i] <= 'f' ? hex[i] - 'a' + 10 : -1;
        ok = d >= 0;
        want = want << 4 | (uint64_t)(d < 0 ? 0 : d);
    }
    if (!ok) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: no checksum line at its end: damaged", mpath);
        goto out;
    }
    if (s_fnv(S_FNV_OFFSET, text, (size_t)(key - text)) != want) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: checksum mismatch: the manifest is damaged",
                           mpath);
        goto out;
    }
    SEMOE_CHECK_GOTO(s_parse_obj(mpath, text, len, &j), rc, out);
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(j, "format");
    const cJSON *files = cJSON_GetObjectItemCaseSensitive(j, "files");
    uint64_t ver = 0;
    if (!cJSON_IsString(fmt) || strcmp(fmt->valuestring, "semoe-checkpoint") != 0 ||
        !s_get_u64(j, "version", &ver) || ver != 1 || !cJSON_IsArray(files)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: not a semoe-checkpoint manifest of version 1 "
                           "with a files array", mpath);
        goto out;
    }
    bool have_cfg = false, have_state = false;
    const cJSON *f;
    cJSON_ArrayForEach(f, files) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(f, "path");
        uint64_t size = 0, sum = 0, got_size = 0, got_sum = 0;
        if (!cJSON_IsString(p) || !s_safe_rel(p->valuestring) || !s_get_u64(f, "size", &size) ||
            !s_get_hex(f, "fnv1a64", &sum)) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: an entry of files lacks a plain path, a size "
                               "or an fnv1a64", mpath);
            goto out;
        }
        have_cfg = have_cfg || strcmp(p->valuestring, "config.json") == 0;
        have_state = have_state || strcmp(p->valuestring, MODEL_CKPT_STATE) == 0;
        char *path = model_shards_join(dir, p->valuestring);
        if (!model_shards_exists(path)) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: missing (the manifest lists it)", path);
        } else if ((rc = s_file_sum(path, &got_size, &got_sum)) != SEMOE_OK) {
            semoe_err_trace(__FILE__, __LINE__);
        } else if (got_size != size) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: %" PRIu64 " bytes, the manifest says %" PRIu64
                               ": truncated or damaged", path, got_size, size);
        } else if (got_sum != sum) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: checksum %016" PRIx64 ", the manifest says %016"
                               PRIx64 ": damaged", path, got_sum, sum);
        }
        free(path);
        if (rc != SEMOE_OK)
            goto out;
    }
    if (!have_cfg || !have_state)
        rc = model_st_fail(SEMOE_EINVAL, "%s: does not list %s", mpath,
                           have_cfg ? MODEL_CKPT_STATE : "config.json");
out:
    if (rc == SEMOE_OK)
        *out = j;
    else
        cJSON_Delete(j);
    free(text);
    free(mpath);
    return rc;
}

semoe_rc model_ckpt_verify(const char *dir)
{
    cJSON *m = NULL;
    semoe_rc rc = s_verify(dir, &m);
    cJSON_Delete(m);
    return rc;
}

/* dir/config.json must describe params' model: the first field that differs is named. */
static semoe_rc s_check_config(const char *dir, const model_config_t *want)
{
    char *path = model_shards_join(dir, "config.json");
    model_config_t have;
    semoe_rc rc = model_config_load_hf(path, &have);
    if (rc != SEMOE_OK) {
        free(path);
        semoe_err_trace(__FILE__, __LINE__);
        return rc;
    }
    cJSON *a = model_config_to_json(&have), *b = model_config_to_json(want);
    const cJSON *ib;
    cJSON_ArrayForEach(ib, b) {
        const cJSON *ia = cJSON_GetObjectItemCaseSensitive(a, ib->string);
        if (ia && cJSON_Compare(ia, ib, true))
            continue;
        char *va = ia ? cJSON_PrintUnformatted(ia) : semoe_xstrdup("(absent)");
        char *vb = cJSON_PrintUnformatted(ib);
        rc = model_st_fail(SEMOE_EINVAL, "%s: %s=%.60s, the model being loaded has %.60s: "
                           "a checkpoint of another model", path, ib->string, va, vb);
        free(va);
        free(vb);
        break;
    }
    cJSON_Delete(a);
    cJSON_Delete(b);
    free(path);
    return rc;
}

/* Reads one optimizer file into the host copies of m and v (params' slab layout); found[2i]
 * and found[2i + 1] mark tensor i's exp_avg and exp_avg_sq. */
static semoe_rc s_load_optimizer(const char *dir, const char *fname, const model_params_t *p,
                                 float *hm, float *hv, uint8_t *found)
{
    char *path = model_shards_join(dir, fname);
    model_st_file_t *f = NULL;
    semoe_rc rc = model_st_open(path, &f);
    if (rc != SEMOE_OK) {
        semoe_err_trace(__FILE__, __LINE__);
        free(path);
        return rc;
    }
    for (size_t k = 0; k < model_st_count(f) && rc == SEMOE_OK; k++) {
        const model_st_info_t *t = model_st_at(f, k);
        char base[MODEL_PARAM_NAME_MAX + 16];
        snprintf(base, sizeof base, "%s", t->name);
        size_t n = strlen(base);
        int which = -1;
        if (n > 11 && strcmp(base + n - 11, ".exp_avg_sq") == 0)
            which = 1, base[n - 11] = '\0';
        else if (n > 8 && strcmp(base + n - 8, ".exp_avg") == 0)
            which = 0, base[n - 8] = '\0';
        long i = which < 0 ? -1 : model_params_index(p, base);
        if (i < 0) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: not an optimizer moment of this "
                               "model", path, t->name);
            break;
        }
        const model_param_t *q = model_params_at(p, (size_t)i);
        if (found[2 * i + which]) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: given twice", path, t->name);
            break;
        }
        if (t->ndim != q->ndim || memcmp(t->shape, q->shape, q->ndim * sizeof q->shape[0])) {
            char have[160], want[160];
            model_st_shape_str(have, sizeof have, t->shape, t->ndim);
            model_st_shape_str(want, sizeof want, q->shape, q->ndim);
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape %s, the model config needs "
                               "%s", path, t->name, have, want);
            break;
        }
        found[2 * i + which] = 1;
        if (q->data)
            rc = model_st_read_f32(f, t, (which ? hv : hm) + q->offset, q->numel);
    }
    model_st_close(&f);
    free(path);
    return rc;
}

/* Whether the manifest lists fname. */
static bool s_listed(const cJSON *manifest, const char *fname)
{
    const cJSON *f;
    cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(manifest, "files")) {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(f, "path");
        if (cJSON_IsString(p) && strcmp(p->valuestring, fname) == 0)
            return true;
    }
    return false;
}

semoe_rc model_ckpt_load_host(const char *dir, model_params_t *params, float *m, float *v,
                              model_ckpt_state_t *state_out)
{
    cJSON *manifest = NULL, *st = NULL;
    char *spath = model_shards_join(dir, MODEL_CKPT_STATE), *text = NULL;
    size_t len = 0, n = model_params_count(params);
    uint8_t *found = NULL;
    semoe_rc rc = SEMOE_OK;
    model_ckpt_state_t s = {0};

    SEMOE_CHECK_GOTO(s_verify(dir, &manifest), rc, out);
    SEMOE_CHECK_GOTO(s_check_config(dir, model_params_config(params)), rc, out);
    SEMOE_CHECK_GOTO(model_shards_read_text(spath, &text, &len), rc, out);
    SEMOE_CHECK_GOTO(s_parse_obj(spath, text, len, &st), rc, out);
    const cJSON *fmt = cJSON_GetObjectItemCaseSensitive(st, "format");
    const cJSON *rng = cJSON_GetObjectItemCaseSensitive(st, "rng");
    const cJSON *opt = cJSON_GetObjectItemCaseSensitive(st, "optimizer_files");
    uint64_t adam = 0, ver = 0;
    bool ok = cJSON_IsString(fmt) && strcmp(fmt->valuestring, "semoe-train-state") == 0 &&
              s_get_u64(st, "version", &ver) && ver == 1 && s_get_u64(st, "step", &s.step) &&
              s_get_u64(st, "adam_step", &adam) && adam <= INT32_MAX &&
              s_get_u64(st, "epoch", &s.epoch) && s_get_u64(st, "position", &s.position) &&
              s_get_hex(st, "seed", &s.seed) && s_get_hex(st, "job_hash", &s.job_hash) &&
              s_get_hex(st, "generation", &s.generation) && cJSON_IsArray(rng) &&
              cJSON_GetArraySize(rng) == 4 && cJSON_IsArray(opt) && cJSON_GetArraySize(opt) > 0;
    for (int i = 0; ok && i < 4; i++) {
        cJSON *holder = cJSON_CreateObject();
        cJSON_AddItemReferenceToObject(holder, "x", cJSON_GetArrayItem(rng, i));
        ok = s_get_hex(holder, "x", &s.rng[i]);
        cJSON_Delete(holder);
    }
    if (!ok) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: not a semoe-train-state of version 1 with step, "
                           "adam_step, epoch, position, seed, job_hash, generation, rng[4] and "
                           "optimizer_files", spath);
        goto out;
    }
    s.adam_step = (int)adam;
    if (!s_get_hex(st, "run", &s.run))
        s.run = 0; /* written before runs were recorded */
    const cJSON *e;
    cJSON_ArrayForEach(e, opt) {
        if (!cJSON_IsString(e) || !s_safe_rel(e->valuestring) ||
            !s_listed(manifest, e->valuestring)) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: optimizer_files: an entry is not a file the "
                               "manifest lists", spath);
            goto out;
        }
    }

    SEMOE_CHECK_GOTO(model_shards_load(dir, params), rc, out);
    found = semoe_xcalloc(2 * n + 1, 1);
    cJSON_ArrayForEach(e, opt)
        SEMOE_CHECK_GOTO(s_load_optimizer(dir, e->valuestring, params, m, v, found), rc, out);
    for (size_t i = 0; i < 2 * n; i++)
        if (!found[i]) {
            char *first = model_shards_join(dir, cJSON_GetArrayItem(opt, 0)->valuestring);
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s.%s missing from the optimizer "
                               "files", first, model_params_at(params, i / 2)->name,
                               i % 2 ? "exp_avg_sq" : "exp_avg");
            free(first);
            goto out;
        }
    if (state_out)
        *state_out = s;
out:
    free(found);
    cJSON_Delete(st);
    free(text);
    free(spath);
    cJSON_Delete(manifest);
    return rc;
}

semoe_rc model_ckpt_load(const char *dir, const model_backend_f32_t *be, model_params_t *params,
                         model_train_t *train, model_ckpt_state_t *state_out)
{
    size_t floats = model_train_slab_floats(train);
    float *hm = semoe_xcalloc(floats ? floats : 1, sizeof(float));
    float *hv = semoe_xcalloc(floats ? floats : 1, sizeof(float));
    model_ckpt_state_t s;
    semoe_rc rc = model_ckpt_load_host(dir, params, hm, hv, &s);
    if (rc == SEMOE_OK) {
        model_train_weights_from_params(train);
        be->to_device(model_train_m(train), hm, floats * sizeof(float));
        be->to_device(model_train_v(train), hv, floats * sizeof(float));
        model_train_set_adam_step(train, s.adam_step);
        if (state_out)
            *state_out = s;
    } else {
        semoe_err_trace(__FILE__, __LINE__);
    }
    free(hv);
    free(hm);
    return rc;
}

/* ---- a checkpoint root --------------------------------------------------------------------- */

/* Whether d is n decimal digits (nothing else, at least one) of a uint64; its value into *x. */
static bool s_digits_u64(const char *d, size_t n, uint64_t *out)
{
    if (n == 0 || strspn(d, "0123456789") != n)
        return false;
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t c = (uint64_t)(d[i] - '0');
        if (x > (UINT64_MAX - c) / 10)
            return false;
        x = x * 10 + c;
    }
    *out = x;
    return true;
}

/* Whether name is a step directory's, "step-" and decimal digits; its step into *step. */
static bool s_step_name(const char *name, uint64_t *step)
{
    if (strncmp(name, "step-", 5) != 0)
        return false;
    const char *d = name + 5;
    return s_digits_u64(d, strlen(d), step);
}

/* Whether name is a writer's leftover, "<name>.tmp-<pid>" or "<name>.old-<pid>", whose process
 * is gone. */
static bool s_dead_leftover(const char *name)
{
    const char *dot = strrchr(name, '.');
    if (!dot || (strncmp(dot, ".tmp-", 5) != 0 && strncmp(dot, ".old-", 5) != 0))
        return false;
    const char *d = dot + 5;
    size_t n = strspn(d, "0123456789");
    if (n == 0 || n > 9 || d[n] != '\0')
        return false;
    long pid = strtol(d, NULL, 10);
    return pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

/* s into out (cap bytes), or an error naming what did not fit. */
static semoe_rc s_copy_out(char *out, size_t cap, const char *s, const char *what)
{
    size_t n = strlen(s);
    if (n >= cap) {
        if (cap)
            out[0] = '\0';
        return model_st_fail(SEMOE_EINVAL, "%s: %s: %zu bytes, room for %zu: use a shorter "
                             "path", s, what, n, cap ? cap - 1 : 0);
    }
    memcpy(out, s, n + 1);
    return SEMOE_OK;
}

semoe_rc model_ckpt_step_dir(const char *root, uint64_t step, char *out, size_t cap)
{
    char name[32];
    snprintf(name, sizeof name, "step-%08" PRIu64, step);
    char *path = model_shards_join(root, name);
    semoe_rc rc = s_copy_out(out, cap, path, "checkpoint path");
    free(path);
    return rc;
}

typedef struct {
    uint64_t step;
    char *name;
} s_step_t;

static int s_by_step(const void *a, const void *b)
{
    const s_step_t *x = a, *y = b;
    if (x->step != y->step)
        return x->step < y->step ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Removes the leftovers of dead writers in root, then the oldest step directories but keep
 * (never the one named latest; keep 0: none). A step directory is first renamed to a leftover
 * of this process, so that a crash midway leaves no half checkpoint under a step name. */
static semoe_rc s_prune(const char *root, const char *latest, uint32_t keep)
{
    DIR *d = opendir(root);
    if (!d)
        return semoe_err_errno(SEMOE_EIO, "%s: opendir (latest names %s; old checkpoints "
                               "not removed)", root, latest);
    s_step_t *steps = NULL;
    size_t n = 0, cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        uint64_t step;
        char *p = model_shards_join(root, e->d_name);
        struct stat st;
        bool is_dir = lstat(p, &st) == 0 && S_ISDIR(st.st_mode);
        if (is_dir && s_step_name(e->d_name, &step)) {
            if (n == cap) {
                cap = cap ? 2 * cap : 16;
                steps = semoe_xrealloc(steps, cap * sizeof *steps);
            }
            steps[n++] = (s_step_t){step, semoe_xstrdup(e->d_name)};
        } else if (s_dead_leftover(e->d_name)) {
            if (is_dir)
                s_rmtree(p, 1);
            else
                (void)unlink(p);
        }
        free(p);
    }
    closedir(d);
    semoe_rc rc = SEMOE_OK;
    if (n)
        qsort(steps, n, sizeof *steps, s_by_step);
    size_t left = n;
    for (size_t i = 0; keep > 0 && i < n && left > keep && rc == SEMOE_OK; i++) {
        if (strcmp(steps[i].name, latest) == 0)
            continue;
        char *p = model_shards_join(root, steps[i].name);
        size_t olen = strlen(p) + 32;
        char *old = semoe_xmalloc(olen);
        snprintf(old, olen, "%s.old-%ld", p, (long)getpid());
        s_rmtree(old, 1);
        if (rename(p, old) != 0)
            rc = semoe_err_errno(SEMOE_EIO, "%s: rename to %s (latest names %s; older "
                                 "checkpoints not removed)", p, old, latest);
        else
            s_rmtree(old, 1);
        left--;
        free(old);
        free(p);
    }
    for (size_t i = 0; i < n; i++)
        free(steps[i].name);
    free(steps);
    return rc;
}

semoe_rc model_ckpt_publish(const char *root, uint64_t step, uint32_t keep)
{
    char name[32];
    snprintf(name, sizeof name, "step-%08" PRIu64, step);
    char *dir = model_shards_join(root, name);
    char *manifest = model_shards_join(dir, MODEL_CKPT_MANIFEST);
    char *link = model_shards_join(root, MODEL_CKPT_LATEST);
    size_t tlen = strlen(link) + 32;
    char *tmp = semoe_xmalloc(tlen);
    snprintf(tmp, tlen, "%s.tmp-%ld", link, (long)getpid());
    semoe_rc rc = SEMOE_OK;

    if (!model_shards_exists(manifest)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: missing: step %" PRIu64 "'s checkpoint is not "
                           "whole; save it (model_ckpt_save_host) before publishing it", manifest,
                           step);
        goto out;
    }
    (void)unlink(tmp);
    if (symlink(name, tmp) != 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: symlink to %s", tmp, name);
        goto out;
    }
    if (rename(tmp, link) != 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: rename to %s", tmp, link);
        (void)unlink(tmp);
        goto out;
    }
    s_fsync_dir(root);
    SEMOE_CHECK_GOTO(s_prune(root, name, keep), rc, out);
out:
    free(tmp);
    free(link);
    free(manifest);
    free(dir);
    return rc;
}

semoe_rc model_ckpt_latest(const char *root, char *out, size_t cap, uint64_t *step)
{
    if (cap)
        out[0] = '\0';
    *step = 0;
    struct stat st;
    if (stat(root, &st) != 0)
        return errno == ENOENT ? SEMOE_OK
                               : semoe_err_errno(SEMOE_EIO, "%s: checkpoint root: stat", root);
    if (!S_ISDIR(st.st_mode))
        return model_st_fail(SEMOE_EINVAL, "%s: not a directory: a checkpoint root holds "
                             "step-NNNNNNNN checkpoints and a link %s", root, MODEL_CKPT_LATEST);
    char *link = model_shards_join(root, MODEL_CKPT_LATEST), *dir = NULL;
    char target[256];
    uint64_t s = 0;
    semoe_rc rc = SEMOE_OK;
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0 && errno == ENOENT)
        goto out; /* a root with nothing published: a fresh start */
    if (n < 0 && errno == EINVAL) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: not a symbolic link: latest must link to a "
                           "step-NNNNNNNN directory beside it", link);
        goto out;
    }
    if (n < 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: readlink", link);
        goto out;
    }
    target[n] = '\0';
    if ((size_t)n == sizeof target - 1 || !s_step_name(target, &s)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s -> %s: not a step directory beside it "
                           "(step-NNNNNNNN): point it at one, or remove it to start afresh",
                           link, target);
        goto out;
    }
    dir = model_shards_join(root, target);
    int got = stat(dir, &st);
    if (got != 0 || !S_ISDIR(st.st_mode)) {
        const char *why = got == 0 ? "not a directory"
                          : errno == ENOENT ? "missing: the checkpoint it names is gone"
                                            : strerror(errno);
        rc = model_st_fail(SEMOE_EINVAL, "%s -> %s: %s; point it at a whole step-NNNNNNNN "
                           "directory, or remove it to start afresh", link, target, why);
        goto out;
    }
    SEMOE_CHECK_GOTO(s_copy_out(out, cap, dir, "checkpoint path"), rc, out);
    *step = s;
out:
    free(dir);
    free(link);
    return rc;
}

semoe_rc model_ckpt_resolve(const char *path, char *out, size_t cap)
{
    char *cfg = model_shards_join(path, "config.json");
    char *link = model_shards_join(path, MODEL_CKPT_LATEST);
    struct stat st;
    uint64_t step = 0;
    semoe_rc rc = SEMOE_OK;
    if (cap)
        out[0] = '\0';
    if (model_shards_exists(cfg)) {
        rc = s_copy_out(out, cap, path, "model folder");
    } else if (lstat(link, &st) == 0) {
        rc = model_ckpt_latest(path, out, cap, &step);
        if (rc == SEMOE_OK && !out[0])
            rc = model_st_fail(SEMOE_EINVAL, "%s: vanished while being read", link);
    } else {
        rc = model_st_fail(SEMOE_EINVAL, "%s: neither a model folder (no config.json) nor a "
                           "checkpoint root (no %s): give a folder with config.json, or a "
                           "train.checkpoint_dir that holds a checkpoint", path,
                           MODEL_CKPT_LATEST);
    }
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    free(link);
    free(cfg);
    return rc;
}

/* ---- generation fencing -------------------------------------------------------------------- */

/* The fence's lock: held (flock, exclusive) while the fence is read and changed and while a
 * fenced checkpoint goes into place. Returns the descriptor, or -1 with the error set. */
static int s_fence_lock(const char *root)
{
    char *path = model_shards_join(root, MODEL_CKPT_FENCE ".lock");
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 && errno == ENOENT) { /* a root's first checkpoint: make the root */
        s_mkdir_parents(path);
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    }
    if (fd < 0) {
        semoe_err_errno(SEMOE_EIO, "%s: open", path);
    } else if (flock(fd, LOCK_EX) != 0) {
        semoe_err_errno(SEMOE_EIO, "%s: flock", path);
        close(fd);
        fd = -1;
    }
    free(path);
    return fd;
}

static void s_fence_unlock(int fd)
{
    (void)flock(fd, LOCK_UN);
    close(fd);
}

/* (run, generation) pairs in order: a later run's, then a later generation of the same run. */
static int s_fence_cmp(model_ckpt_fence_t a, model_ckpt_fence_t b)
{
    if (a.run != b.run)
        return a.run < b.run ? -1 : 1;
    return a.generation < b.generation ? -1 : a.generation > b.generation;
}

semoe_rc model_ckpt_fence_read(const char *root, model_ckpt_fence_t *out)
{
    *out = (model_ckpt_fence_t){0, 0};
    char *path = model_shards_join(root, MODEL_CKPT_FENCE);
    semoe_rc rc = SEMOE_OK;
    FILE *f = fopen(path, "re");
    if (!f) {
        if (errno != ENOENT)
            rc = semoe_err_errno(SEMOE_EIO, "%s: open", path);
        free(path);
        return rc; /* no fence: no generation has claimed the root yet */
    }
    char line[80] = {0};
    bool got = fgets(line, sizeof line, f) != NULL;
    fclose(f);
    line[strcspn(line, "\n")] = '\0';
    /* "<run: 16 hex digits> <generation: decimal>" */
    char *sp = strchr(line, ' ');
    cJSON *holder = cJSON_CreateObject();
    if (sp) {
        *sp = '\0';
        cJSON_AddStringToObject(holder, "run", line);
    }
    model_ckpt_fence_t fence;
    bool ok = got && sp && s_get_hex(holder, "run", &fence.run) &&
              s_digits_u64(sp + 1, strlen(sp + 1), &fence.generation);
    cJSON_Delete(holder);
    if (sp)
        *sp = ' ';
    if (!ok)
        rc = model_st_fail(SEMOE_EINVAL, "%s: \"%s\" is not \"<run as 16 hex digits> "
                           "<generation>\": the fence of a checkpoint root names the newest "
                           "generation that wrote to it; remove the file to let any generation "
                           "write", path, line);
    else
        *out = fence;
    free(path);
    return rc;
}

/* Writes the fence (a temporary file renamed over it), under the lock. */
static semoe_rc s_fence_write(const char *root, model_ckpt_fence_t fence)
{
    char *path = model_shards_join(root, MODEL_CKPT_FENCE);
    char *tmp = s_tmp_name(path);
    char text[64];
    snprintf(text, sizeof text, "%016" PRIx64 " %" PRIu64 "\n", fence.run, fence.generation);
    semoe_rc rc = SEMOE_OK;
    FILE *f = fopen(tmp, "we");
    if (!f) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: open", tmp);
    } else {
        bool ok = fputs(text, f) >= 0 && fflush(f) == 0 && fsync(fileno(f)) == 0;
        if (fclose(f) != 0 || !ok)
            rc = semoe_err_errno(SEMOE_EIO, "%s: write", tmp);
        else if (rename(tmp, path) != 0)
            rc = semoe_err_errno(SEMOE_EIO, "%s: rename to %s", tmp, path);
        if (rc != SEMOE_OK)
            (void)unlink(tmp);
        else
            s_fsync_dir(root);
    }
    free(tmp);
    free(path);
    return rc;
}

/* Under the lock: raises the fence to `claim`, or refuses when a newer one holds it. */
static semoe_rc s_fence_claim_locked(const char *root, model_ckpt_fence_t claim)
{
    model_ckpt_fence_t fence;
    SEMOE_CHECK(model_ckpt_fence_read(root, &fence));
    int c = s_fence_cmp(fence, claim);
    if (c > 0)
        return semoe_err(SEMOE_EFENCED, "%s: generation %" PRIu64 " of run %016" PRIx64 " is "
                         "fenced out: generation %" PRIu64 " of run %016" PRIx64 " owns the "
                         "checkpoints now", root, claim.generation, claim.run, fence.generation,
                         fence.run);
    return c < 0 ? s_fence_write(root, claim) : SEMOE_OK;
}

semoe_rc model_ckpt_fence_claim(const char *root, model_ckpt_fence_t claim)
{
    int fd = s_fence_lock(root);
    if (fd < 0)
        return SEMOE_EIO;
    semoe_rc rc = s_fence_claim_locked(root, claim);
    s_fence_unlock(fd);
    return rc;
}

semoe_rc model_ckpt_commit(const char *root, uint64_t step, uint32_t keep,
                           const model_params_t *params, const float *m, const float *v,
                           int adam_step, const model_ckpt_state_t *state)
{
    char dir[4096];
    SEMOE_CHECK(model_ckpt_step_dir(root, step, dir, sizeof dir));
    char *tmp = s_tmp_name(dir);
    semoe_rc rc = s_write_tmp(dir, tmp, params, m, v, adam_step, state);
    int fd = rc == SEMOE_OK ? s_fence_lock(root) : -1;
    if (rc == SEMOE_OK && fd < 0)
        rc = SEMOE_EIO;
    if (rc == SEMOE_OK) {
        rc = s_fence_claim_locked(root, (model_ckpt_fence_t){state->run, state->generation});
        if (rc == SEMOE_OK)
            rc = s_install(dir, tmp);
        if (rc == SEMOE_OK)
            rc = model_ckpt_publish(root, step, keep);
        s_fence_unlock(fd);
    }
    if (rc != SEMOE_OK)
        s_rmtree(tmp, 1);
    free(tmp);
    return rc;
}
