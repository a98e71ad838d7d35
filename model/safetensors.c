/* The safetensors format (see safetensors.h). The reader trusts nothing: the header length, the
 * JSON, every entry's dtype, shape and offsets are checked before any tensor byte is touched, and
 * the offsets must tile the data section exactly (no overlap, no hole, nothing after), as the
 * reference implementation demands. Hosts are little-endian, as the format is. */
#include "model/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors.c assumes a little-endian host"
#endif

static const struct {
    const char *name;
    size_t size;
} s_dtypes[] = {
    [MODEL_ST_BOOL] = {"BOOL", 1},         [MODEL_ST_U8] = {"U8", 1},
    [MODEL_ST_I8] = {"I8", 1},             [MODEL_ST_F8_E4M3] = {"F8_E4M3", 1},
    [MODEL_ST_F8_E5M2] = {"F8_E5M2", 1},   [MODEL_ST_I16] = {"I16", 2},
    [MODEL_ST_U16] = {"U16", 2},           [MODEL_ST_F16] = {"F16", 2},
    [MODEL_ST_BF16] = {"BF16", 2},         [MODEL_ST_I32] = {"I32", 4},
    [MODEL_ST_U32] = {"U32", 4},           [MODEL_ST_F32] = {"F32", 4},
    [MODEL_ST_I64] = {"I64", 8},           [MODEL_ST_U64] = {"U64", 8},
    [MODEL_ST_F64] = {"F64", 8},
};
#define S_NDTYPES (sizeof s_dtypes / sizeof s_dtypes[0])

const char *model_st_dtype_name(model_st_dtype dt)
{
    return (size_t)dt < S_NDTYPES ? s_dtypes[dt].name : "?";
}

size_t model_st_dtype_size(model_st_dtype dt)
{
    return (size_t)dt < S_NDTYPES ? s_dtypes[dt].size : 0;
}

/* semoe_err with the message made one printable line: names come from untrusted files and may
 * hold newlines or other control bytes, which become '?'. */
static semoe_rc s_fail(semoe_rc code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static semoe_rc s_fail(semoe_rc code, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if ((unsigned char)*c < 0x20 || *c == 0x7f)
            *c = '?';
    return semoe_err(code, "%s", msg);
}

/* ---- a growing string ---------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap;
} s_buf_t;

static void s_buf_add(s_buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1)
            cap *= 2;
        b->p = semoe_xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void s_buf_printf(s_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void s_buf_printf(s_buf_t *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    s_buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A JSON string literal for s. */
static void s_buf_json_str(s_buf_t *b, const char *s)
{
    s_buf_add(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            s_buf_add(b, e, 2);
        } else if (c < 0x20) {
            s_buf_printf(b, "\\u%04x", c);
        } else {
            s_buf_add(b, (const char *)&c, 1);
        }
    }
    s_buf_add(b, "\"", 1);
}

/* ---- atomic file writes -------------------------------------------------------------------- */

static semoe_rc s_write_all(int fd, const void *p, size_t n, const char *path)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return semoe_err_errno(SEMOE_EIO, "%s: write", path);
        c += w;
        n -= (size_t)w;
    }
    return SEMOE_OK;
}

/* fsync of the directory holding path, so a rename into it is durable. */
static void s_sync_dir(const char *path)
{
    char dir[4096];
    snprintf(dir, sizeof dir, "%s", path);
    char *slash = strrchr(dir, '/');
    if (slash == dir)
        slash[1] = '\0';
    else if (slash)
        *slash = '\0';
    else
        snprintf(dir, sizeof dir, ".");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        (void)fsync(fd);
        close(fd);
    }
}

typedef struct {
    const void *p;
    size_t n;
} s_piece_t;

/* Writes the pieces to path.tmp, fsyncs, renames onto path. */
static semoe_rc s_write_atomic(const char *path, const s_piece_t *pieces, size_t n)
{
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return s_fail(SEMOE_EINVAL, "%s: path too long", path);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return semoe_err_errno(SEMOE_EIO, "%s: open", tmp);
    semoe_rc rc = SEMOE_OK;
    for (size_t i = 0; i < n && rc == SEMOE_OK; i++)
        rc = s_write_all(fd, pieces[i].p, pieces[i].n, tmp);
    if (rc == SEMOE_OK && fsync(fd) != 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s: fsync", tmp);
    if (close(fd) != 0 && rc == SEMOE_OK)
        rc = semoe_err_errno(SEMOE_EIO, "%s: close", tmp);
    if (rc == SEMOE_OK && rename(tmp, path) != 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s: rename to %s", tmp, path);
    if (rc != SEMOE_OK) {
        unlink(tmp);
        return rc;
    }
    s_sync_dir(path);
    return SEMOE_OK;
}

/* ---- writer -------------------------------------------------------------------------------- */

semoe_rc model_st_write(const char *path, const model_st_tensor_t *tensors, size_t n)
{
    s_buf_t h = {0};
    s_buf_add(&h, "{\"__metadata__\":{\"format\":\"pt\"}", 31);
    uint64_t off = 0;
    semoe_rc rc = SEMOE_OK;
    for (size_t i = 0; i < n; i++) {
        const model_st_tensor_t *t = &tensors[i];
        if (!t->name || !*t->name || strcmp(t->name, "__metadata__") == 0) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %zu: empty or reserved name", path, i);
            goto fail;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(tensors[j].name, t->name) == 0) {
                rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: named twice", path, t->name);
                goto fail;
            }
        if (t->ndim > MODEL_ST_MAX_DIMS) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: %u dims, at most %d", path, t->name,
                           t->ndim, MODEL_ST_MAX_DIMS);
            goto fail;
        }
        uint64_t numel = 1;
        for (uint32_t d = 0; d < t->ndim; d++)
            if (__builtin_mul_overflow(numel, t->shape[d], &numel)) {
                rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: shape overflows", path, t->name);
                goto fail;
            }
        if (numel > SIZE_MAX / 4 || (numel && !t->data)) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: no data or too large", path, t->name);
            goto fail;
        }
        s_buf_add(&h, ",", 1);
        s_buf_json_str(&h, t->name);
        s_buf_add(&h, ":{\"dtype\":\"F32\",\"shape\":[", 25);
        for (uint32_t d = 0; d < t->ndim; d++)
            s_buf_printf(&h, "%s%" PRIu64, d ? "," : "", t->shape[d]);
        s_buf_printf(&h, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off, off + numel * 4);
        off += numel * 4;
    }
    s_buf_add(&h, "}", 1);
    while (h.len % 8)
        s_buf_add(&h, " ", 1);

    uint64_t hlen = h.len; /* little-endian host: the bytes are the format's */
    s_piece_t *pieces = semoe_xcalloc(n + 2, sizeof *pieces);
    pieces[0] = (s_piece_t){&hlen, 8};
    pieces[1] = (s_piece_t){h.p, h.len};
    for (size_t i = 0; i < n; i++) {
        uint64_t numel = 1;
        for (uint32_t d = 0; d < tensors[i].ndim; d++)
            numel *= tensors[i].shape[d];
        pieces[i + 2] = (s_piece_t){tensors[i].data, (size_t)numel * 4};
    }
    rc = s_write_atomic(path, pieces, n + 2);
    free(pieces);
fail:
    free(h.p);
    return rc;
}

/* ---- reader -------------------------------------------------------------------------------- */

struct model_st_file {
    char *path;
    int fd;
    uint8_t *map;
    size_t size;
    const uint8_t *data; /* the data section */
    uint64_t data_size;
    cJSON *header;
    model_st_info_t *t;
    size_t n;
    const cJSON *meta;   /* the __metadata__ object, or NULL */
};

/* A JSON number that is a non-negative integer below 2^53 (exact in a double). */
static bool s_json_u64(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j))
        return false;
    double d = j->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || d != (double)(uint64_t)d)
        return false;
    *out = (uint64_t)d;
    return true;
}

static bool s_utf8_valid(const uint8_t *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        uint8_t c = s[i];
        size_t len;
        uint32_t cp;
        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2, cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3, cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4, cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
            cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += len;
    }
    return true;
}

static void s_shape_str(char *buf, size_t cap, const uint64_t *shape, uint32_t ndim)
{
    size_t o = (size_t)snprintf(buf, cap, "[");
    for (uint32_t d = 0; d < ndim && o < cap; d++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%" PRIu64, d ? ", " : "", shape[d]);
    if (o < cap)
        snprintf(buf + o, cap - o, "]");
}

/* Validates one header entry into *t; messages name the file and the tensor. */
static semoe_rc s_parse_entry(const char *path, const cJSON *e, model_st_info_t *t)
{
    const char *name = e->string;
    t->name = name;
    if (!*name)
        return s_fail(SEMOE_EINVAL, "%s: a tensor has an empty name", path);
    if (!cJSON_IsObject(e))
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: entry is not an object", path, name);
    const cJSON *dt = NULL, *shape = NULL, *offs = NULL, *f;
    cJSON_ArrayForEach(f, e) {
        const cJSON **slot = strcmp(f->string, "dtype") == 0          ? &dt
                             : strcmp(f->string, "shape") == 0        ? &shape
                             : strcmp(f->string, "data_offsets") == 0 ? &offs
                                                                      : NULL;
        if (!slot)
            return s_fail(SEMOE_EINVAL, "%s: tensor %s: unknown key \"%.40s\"", path, name,
                             f->string);
        if (*slot)
            return s_fail(SEMOE_EINVAL, "%s: tensor %s: key %s given twice", path, name,
                             f->string);
        *slot = f;
    }
    if (!dt || !shape || !offs)
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: needs dtype, shape and data_offsets",
                         path, name);
    if (!cJSON_IsString(dt))
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: dtype is not a string", path, name);
    size_t k = 0;
    while (k < S_NDTYPES && strcmp(s_dtypes[k].name, dt->valuestring) != 0)
        k++;
    if (k == S_NDTYPES)
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: unknown dtype \"%.20s\"", path, name,
                         dt->valuestring);
    t->dtype = (model_st_dtype)k;
    if (!cJSON_IsArray(shape))
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: shape is not an array", path, name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > MODEL_ST_MAX_DIMS)
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: shape has %d dims, at most %d", path,
                         name, nd, MODEL_ST_MAX_DIMS);
    t->ndim = (uint32_t)nd;
    uint64_t numel = 1, bytes;
    int d = 0;
    cJSON_ArrayForEach(f, shape) {
        if (!s_json_u64(f, &t->shape[d]))
            return s_fail(SEMOE_EINVAL, "%s: tensor %s: shape[%d] is not a non-negative "
                             "integer", path, name, d);
        if (__builtin_mul_overflow(numel, t->shape[d], &numel))
            return s_fail(SEMOE_EINVAL, "%s: tensor %s: shape overflows", path, name);
        d++;
    }
    t->numel = numel;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !s_json_u64(cJSON_GetArrayItem(offs, 0), &t->begin) ||
        !s_json_u64(cJSON_GetArrayItem(offs, 1), &t->end))
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets is not [begin, end] of "
                         "non-negative integers", path, name);
    if (t->end < t->begin)
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                         "] end before begin", path, name, t->begin, t->end);
    char sh[160];
    s_shape_str(sh, sizeof sh, t->shape, t->ndim);
    if (__builtin_mul_overflow(numel, (uint64_t)s_dtypes[k].size, &bytes))
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: shape %s overflows", path, name, sh);
    if (bytes != t->end - t->begin)
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                         "] do not match shape %s x %s (%" PRIu64 " bytes)", path, name,
                         t->begin, t->end, sh, s_dtypes[k].name, bytes);
    return SEMOE_OK;
}

static int s_cmp_ptr_offset(const void *a, const void *b)
{
    const model_st_info_t *x = *(const model_st_info_t *const *)a;
    const model_st_info_t *y = *(const model_st_info_t *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

static int s_cmp_ptr_name(const void *a, const void *b)
{
    return strcmp((*(const model_st_info_t *const *)a)->name,
                  (*(const model_st_info_t *const *)b)->name);
}

/* Checks the offsets tile [0, data_size) exactly and names are unique. */
static semoe_rc s_check_layout(model_st_file_t *self)
{
    const char *path = self->path;
    semoe_rc rc = SEMOE_OK;
    const model_st_info_t **v = semoe_xcalloc(self->n ? self->n : 1, sizeof *v);
    for (size_t i = 0; i < self->n; i++)
        v[i] = &self->t[i];
    qsort(v, self->n, sizeof *v, s_cmp_ptr_name);
    for (size_t i = 1; i < self->n; i++)
        if (strcmp(v[i - 1]->name, v[i]->name) == 0) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: named twice in the header", path,
                           v[i]->name);
            goto out;
        }
    qsort(v, self->n, sizeof *v, s_cmp_ptr_offset);
    uint64_t at = 0;
    for (size_t i = 0; i < self->n; i++) {
        const model_st_info_t *t = v[i];
        if (t->end > self->data_size) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                           "] run past the data section (%" PRIu64 " bytes)", path, t->name,
                           t->begin, t->end, self->data_size);
            goto out;
        }
        if (t->begin < at) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                           "] overlap tensor %s", path, t->name, t->begin, t->end,
                           v[i - 1]->name);
            goto out;
        }
        if (t->begin > at) {
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                           "] leave a hole of %" PRIu64 " bytes before it", path, t->name,
                           t->begin, t->end, t->begin - at);
            goto out;
        }
        at = t->end;
    }
    if (at != self->data_size)
        rc = s_fail(SEMOE_EINVAL, "%s: %" PRIu64 " bytes after the last tensor's data "
                       "(data section %" PRIu64 " bytes, tensors end at %" PRIu64 ")", path,
                       self->data_size - at, self->data_size, at);
out:
    free(v);
    return rc;
}

semoe_rc model_st_open(const char *path, model_st_file_t **out)
{
    *out = NULL;
    model_st_file_t *self = semoe_xcalloc(1, sizeof *self);
    self->path = semoe_xstrdup(path);
    self->fd = -1;
    semoe_rc rc = SEMOE_OK;
    self->fd = open(path, O_RDONLY | O_CLOEXEC);
    if (self->fd < 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: open", path);
        goto fail;
    }
    struct stat st;
    if (fstat(self->fd, &st) != 0) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: stat", path);
        goto fail;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = s_fail(SEMOE_EINVAL, "%s: not a regular file", path);
        goto fail;
    }
    self->size = (size_t)st.st_size;
    if (self->size < 8) {
        rc = s_fail(SEMOE_EINVAL, "%s: %zu bytes: too short for the 8-byte header length",
                       path, self->size);
        goto fail;
    }
    self->map = mmap(NULL, self->size, PROT_READ, MAP_PRIVATE, self->fd, 0);
    if (self->map == MAP_FAILED) {
        self->map = NULL;
        rc = semoe_err_errno(SEMOE_EIO, "%s: mmap", path);
        goto fail;
    }
    uint64_t hlen;
    memcpy(&hlen, self->map, 8);
    if (hlen > MODEL_ST_MAX_HEADER) {
        rc = s_fail(SEMOE_EINVAL, "%s: header length %" PRIu64 " exceeds the %u-byte limit",
                       path, hlen, MODEL_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > self->size - 8) {
        rc = s_fail(SEMOE_EINVAL, "%s: header length %" PRIu64 " points past the end of the "
                       "file (%zu bytes)", path, hlen, self->size);
        goto fail;
    }
    const uint8_t *h = self->map + 8;
    if (hlen < 2 || h[0] != '{') {
        rc = s_fail(SEMOE_EINVAL, "%s: header does not start with a JSON object", path);
        goto fail;
    }
    if (memchr(h, 0, hlen) || !s_utf8_valid(h, hlen)) {
        rc = s_fail(SEMOE_EINVAL, "%s: header is not valid UTF-8 text", path);
        goto fail;
    }
    const char *end = NULL;
    self->header = cJSON_ParseWithLengthOpts((const char *)h, hlen, &end, false);
    if (!self->header) {
        size_t at = end ? (size_t)(end - (const char *)h) : 0;
        rc = s_fail(SEMOE_EINVAL, "%s: header is not valid JSON (near byte %zu of %" PRIu64
                       ")", path, at, hlen);
        goto fail;
    }
    for (const char *c = end; c < (const char *)h + hlen; c++)
        if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r') {
            rc = s_fail(SEMOE_EINVAL, "%s: header has bytes after its JSON object (at byte "
                           "%zu)", path, (size_t)(c - (const char *)h));
            goto fail;
        }
    if (!cJSON_IsObject(self->header)) {
        rc = s_fail(SEMOE_EINVAL, "%s: header is not a JSON object", path);
        goto fail;
    }
    self->data = self->map + 8 + hlen;
    self->data_size = self->size - 8 - hlen;

    int count = cJSON_GetArraySize(self->header);
    self->t = semoe_xcalloc(count > 0 ? (size_t)count : 1, sizeof *self->t);
    const cJSON *e;
    cJSON_ArrayForEach(e, self->header) {
        if (strcmp(e->string, "__metadata__") == 0) {
            if (self->meta) {
                rc = s_fail(SEMOE_EINVAL, "%s: __metadata__ given twice", path);
                goto fail;
            }
            if (!cJSON_IsObject(e)) {
                rc = s_fail(SEMOE_EINVAL, "%s: __metadata__ is not an object", path);
                goto fail;
            }
            const cJSON *m;
            cJSON_ArrayForEach(m, e) {
                if (!cJSON_IsString(m)) {
                    rc = s_fail(SEMOE_EINVAL, "%s: __metadata__.%.40s is not a string",
                                   path, m->string);
                    goto fail;
                }
            }
            self->meta = e;
            continue;
        }
        SEMOE_CHECK_GOTO(s_parse_entry(path, e, &self->t[self->n]), rc, fail);
        self->n++;
    }
    SEMOE_CHECK_GOTO(s_check_layout(self), rc, fail);
    *out = self;
    return SEMOE_OK;
fail:
    model_st_close(&self);
    return rc;
}

void model_st_close(model_st_file_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    model_st_file_t *self = *self_p;
    free(self->t);
    cJSON_Delete(self->header);
    if (self->map)
        munmap(self->map, self->size);
    if (self->fd >= 0)
        close(self->fd);
    free(self->path);
    free(self);
    *self_p = NULL;
}

const char *model_st_path(const model_st_file_t *self)
{
    return self->path;
}

size_t model_st_count(const model_st_file_t *self)
{
    return self->n;
}

const model_st_info_t *model_st_at(const model_st_file_t *self, size_t i)
{
    return i < self->n ? &self->t[i] : NULL;
}

const model_st_info_t *model_st_find(const model_st_file_t *self, const char *name)
{
    for (size_t i = 0; i < self->n; i++)
        if (strcmp(self->t[i].name, name) == 0)
            return &self->t[i];
    return NULL;
}

const char *model_st_meta(const model_st_file_t *self, const char *key)
{
    if (!self->meta)
        return NULL;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(self->meta, key);
    return cJSON_IsString(m) ? m->valuestring : NULL;
}

/* IEEE half to float, subnormals, infinities and NaNs included. */
static float s_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man) {
        /* Subnormal: shift until the implicit bit appears. */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    } else {
        bits = sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

semoe_rc model_st_read_f32(const model_st_file_t *self, const model_st_info_t *t, float *dst,
                           uint64_t n)
{
    if (n != t->numel)
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: %" PRIu64 " elements, the destination "
                         "holds %" PRIu64, self->path, t->name, t->numel, n);
    const uint8_t *src = self->data + t->begin;
    switch (t->dtype) {
    case MODEL_ST_F32:
        memcpy(dst, src, (size_t)n * 4);
        return SEMOE_OK;
    case MODEL_ST_BF16:
        for (uint64_t i = 0; i < n; i++) {
            uint16_t b;
            memcpy(&b, src + 2 * i, 2);
            uint32_t bits = (uint32_t)b << 16;
            memcpy(&dst[i], &bits, 4);
        }
        return SEMOE_OK;
    case MODEL_ST_F16:
        for (uint64_t i = 0; i < n; i++) {
            uint16_t b;
            memcpy(&b, src + 2 * i, 2);
            dst[i] = s_half_to_float(b);
        }
        return SEMOE_OK;
    default:
        return s_fail(SEMOE_EINVAL, "%s: tensor %s: dtype %s cannot be read as floats (F32, "
                         "BF16 or F16 needed)", self->path, t->name, model_st_dtype_name(t->dtype));
    }
}

/* ---- sharded checkpoints ------------------------------------------------------------------- */

static char *s_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = semoe_xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

static bool s_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Appends a name to a list of at most 4 shown names, counting the rest. */
typedef struct {
    s_buf_t b;
    size_t n;
} s_names_t;

static void s_names_add(s_names_t *l, const char *name)
{
    if (l->n < 4) {
        if (l->n)
            s_buf_add(&l->b, ", ", 2);
        s_buf_add(&l->b, name, strlen(name) < 200 ? strlen(name) : 200);
    }
    l->n++;
}

static const char *s_names_str(s_names_t *l)
{
    if (l->n > 4)
        s_buf_printf(&l->b, " (and %zu more)", l->n - 4);
    return l->b.p ? l->b.p : "";
}

semoe_rc model_st_save(const char *dir, const model_params_t *p, uint32_t layers_per_shard)
{
    const model_config_t *c = model_params_config(p);
    size_t n = model_params_count(p);
    if (layers_per_shard == 0)
        return s_fail(SEMOE_EINVAL, "%s: layers_per_shard=0: need at least 1", dir);
    for (size_t i = 0; i < n; i++)
        if (!model_params_at(p, i)->data)
            return s_fail(SEMOE_EINVAL, "%s: tensor %s: not held here; a checkpoint needs "
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
        if (nshards == 1)
            snprintf(fname, sizeof fname, "%s", MODEL_ST_SINGLE);
        else
            snprintf(fname, sizeof fname, "model-%05u-of-%05u.safetensors", k + 1, nshards);
        size_t m = 0;
        for (size_t i = 0; i < n; i++) {
            const model_param_t *t = model_params_at(p, i);
            uint32_t shard = t->layer >= 0 ? (uint32_t)t->layer / layers_per_shard
                             : strcmp(t->name, "model.embed_tokens.weight") == 0 ? 0
                                                                                 : nshards - 1;
            if (shard != k)
                continue;
            ts[m] = (model_st_tensor_t){.name = t->name, .ndim = t->ndim, .data = t->data};
            memcpy(ts[m].shape, t->shape, sizeof t->shape);
            m++;
            total += t->numel * 4;
            cJSON_AddStringToObject(wmap, t->name, fname);
        }
        path = s_join(dir, fname);
        SEMOE_CHECK_GOTO(model_st_write(path, ts, m), rc, fail);
        free(path);
        path = NULL;
    }
    /* One layout per directory: the other form, left from an earlier save, would shadow or
     * contradict this one (transformers prefers model.safetensors when both exist). */
    path = s_join(dir, nshards == 1 ? MODEL_ST_INDEX : MODEL_ST_SINGLE);
    if (unlink(path) != 0 && errno != ENOENT) {
        rc = semoe_err_errno(SEMOE_EIO, "%s: unlink", path);
        goto fail;
    }
    free(path);
    path = NULL;
    if (nshards > 1) {
        cJSON_AddNumberToObject(meta, "total_size", (double)total);
        char *text = cJSON_Print(index);
        path = s_join(dir, MODEL_ST_INDEX);
        s_piece_t pieces[2] = {{text, strlen(text)}, {"\n", 1}};
        rc = s_write_atomic(path, pieces, 2);
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
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return semoe_err_errno(SEMOE_EIO, "%s: open", path);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size > MODEL_ST_MAX_HEADER) {
        close(fd);
        return s_fail(SEMOE_EINVAL, "%s: not a regular file of at most %u bytes", path,
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
    if (memchr(text, 0, got) || !s_utf8_valid((const uint8_t *)text, got)) {
        free(text);
        return s_fail(SEMOE_EINVAL, "%s: not valid UTF-8 text", path);
    }
    const char *end = NULL;
    cJSON *j = cJSON_ParseWithLengthOpts(text, got, &end, false);
    bool trailing = false;
    for (const char *c = j ? end : text + got; c < text + got; c++)
        trailing = trailing || (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r');
    free(text);
    if (!j || trailing) {
        cJSON_Delete(j);
        return s_fail(SEMOE_EINVAL, "%s: not valid JSON", path);
    }
    semoe_rc rc = SEMOE_OK;
    const cJSON *wmap = cJSON_GetObjectItemCaseSensitive(j, "weight_map");
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(j, "metadata");
    const cJSON *e;
    uint64_t u;
    if (!cJSON_IsObject(j)) {
        rc = s_fail(SEMOE_EINVAL, "%s: not a JSON object", path);
    } else if (!cJSON_IsObject(wmap)) {
        rc = s_fail(SEMOE_EINVAL, "%s: weight_map missing or not an object", path);
    } else if (meta && !cJSON_IsObject(meta)) {
        rc = s_fail(SEMOE_EINVAL, "%s: metadata is not an object", path);
    } else if (meta && cJSON_GetObjectItemCaseSensitive(meta, "total_size") &&
               !s_json_u64(cJSON_GetObjectItemCaseSensitive(meta, "total_size"), &u)) {
        rc = s_fail(SEMOE_EINVAL, "%s: metadata.total_size is not a non-negative integer",
                       path);
    } else {
        cJSON_ArrayForEach(e, wmap) {
            if (!cJSON_IsString(e)) {
                rc = s_fail(SEMOE_EINVAL, "%s: weight_map: tensor %.200s: shard is not a "
                               "string", path, e->string);
                break;
            }
            if (!s_safe_fname(e->valuestring)) {
                rc = s_fail(SEMOE_EINVAL, "%s: weight_map: tensor %.200s: shard \"%.100s\" "
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
    char *path = s_join(dir, fname);
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
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: the index maps it to %s", path,
                           t->name, shard_of[i]);
            break;
        }
        if (t->ndim != q->ndim || memcmp(t->shape, q->shape, q->ndim * sizeof q->shape[0])) {
            char have[160], want[160];
            s_shape_str(have, sizeof have, t->shape, t->ndim);
            s_shape_str(want, sizeof want, q->shape, q->ndim);
            rc = s_fail(SEMOE_EINVAL, "%s: tensor %s: shape %s, the model config needs %s",
                           path, t->name, have, want);
            break;
        }
        found[i] = 1;
        if (q->data)
            rc = model_st_read_f32(f, t, q->data, q->numel);
    }
    if (rc == SEMOE_OK && extra.n)
        rc = s_fail(SEMOE_EINVAL, "%s: %zu tensors this model does not have: %s", path,
                       extra.n, s_names_str(&extra));
out:
    free(extra.b.p);
    model_st_close(&f);
    free(path);
    return rc;
}

semoe_rc model_st_load(const char *dir, model_params_t *p)
{
    size_t n = model_params_count(p);
    char *ipath = s_join(dir, MODEL_ST_INDEX), *spath = s_join(dir, MODEL_ST_SINGLE);
    const char **shard_of = semoe_xcalloc(n ? n : 1, sizeof *shard_of);
    const char **files = semoe_xcalloc(n ? n : 1, sizeof *files);
    uint8_t *found = semoe_xcalloc(n ? n : 1, 1);
    size_t nfiles = 0;
    cJSON *index = NULL;
    s_names_t names = {0};
    semoe_rc rc = SEMOE_OK;
    bool have_index = s_exists(ipath), have_single = s_exists(spath);

    if (have_index && have_single) {
        rc = s_fail(SEMOE_EINVAL, "%s: holds both %s and %s: ambiguous, remove one", dir,
                       MODEL_ST_INDEX, MODEL_ST_SINGLE);
        goto out;
    }
    if (!have_index && !have_single) {
        rc = s_fail(SEMOE_EINVAL, "%s: no checkpoint: neither %s nor %s", dir,
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
                rc = s_fail(SEMOE_EINVAL, "%s: weight_map: tensor %s: listed twice", ipath,
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
            rc = s_fail(SEMOE_EINVAL, "%s: weight_map has %zu tensors this model does not "
                           "have: %s", ipath, names.n, s_names_str(&names));
            goto out;
        }
        for (size_t i = 0; i < n; i++)
            if (!shard_of[i])
                s_names_add(&names, model_params_at(p, i)->name);
        if (names.n) {
            rc = s_fail(SEMOE_EINVAL, "%s: weight_map lacks %zu tensors of this model: %s",
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
        rc = s_fail(SEMOE_EINVAL, "%s/%s: %zu tensors of this model missing%s: %s", dir,
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

semoe_rc model_st_load_model(const char *dir, model_config_t *cfg, model_params_t **out)
{
    *out = NULL;
    char *path = s_join(dir, "config.json");
    semoe_rc rc = model_config_load_hf(path, cfg);
    free(path);
    SEMOE_CHECK(rc);
    model_params_t *p = NULL;
    SEMOE_CHECK(model_params_new(cfg, NULL, 0, &p));
    if ((rc = model_st_load(dir, p)) != SEMOE_OK) {
        model_params_destroy(&p);
        semoe_err_trace(__FILE__, __LINE__);
        return rc;
    }
    *out = p;
    return SEMOE_OK;
}
