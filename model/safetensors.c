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
semoe_rc model_st_fail(semoe_rc code, const char *fmt, ...)
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

void model_st_buf_add(model_st_buf_t *b, const char *s, size_t n)
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

void model_st_buf_printf(model_st_buf_t *b, const char *fmt, ...)
{
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    model_st_buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* A JSON string literal for s. */
void model_st_buf_json_str(model_st_buf_t *b, const char *s)
{
    model_st_buf_add(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            model_st_buf_add(b, e, 2);
        } else if (c < 0x20) {
            model_st_buf_printf(b, "\\u%04x", c);
        } else {
            model_st_buf_add(b, (const char *)&c, 1);
        }
    }
    model_st_buf_add(b, "\"", 1);
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

/* Writes the pieces to path.tmp, fsyncs, renames onto path. */
semoe_rc model_st_write_atomic(const char *path, const model_st_piece_t *pieces, size_t n)
{
    char tmp[4096];
    if ((size_t)snprintf(tmp, sizeof tmp, "%s.tmp", path) >= sizeof tmp)
        return model_st_fail(SEMOE_EINVAL, "%s: path too long", path);
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
    model_st_buf_t h = {0};
    model_st_buf_add(&h, "{\"__metadata__\":{\"format\":\"pt\"}", 31);
    uint64_t off = 0;
    semoe_rc rc = SEMOE_OK;
    for (size_t i = 0; i < n; i++) {
        const model_st_tensor_t *t = &tensors[i];
        if (!t->name || !*t->name || strcmp(t->name, "__metadata__") == 0) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %zu: empty or reserved name", path, i);
            goto fail;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(tensors[j].name, t->name) == 0) {
                rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: named twice", path, t->name);
                goto fail;
            }
        if (t->ndim > MODEL_ST_MAX_DIMS) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: %u dims, at most %d", path, t->name,
                               t->ndim, MODEL_ST_MAX_DIMS);
            goto fail;
        }
        uint64_t numel = 1;
        for (uint32_t d = 0; d < t->ndim; d++)
            if (__builtin_mul_overflow(numel, t->shape[d], &numel)) {
                rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape overflows", path, t->name);
                goto fail;
            }
        if (numel > SIZE_MAX / 4 || (numel && !t->data)) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: no data or too large", path, t->name);
            goto fail;
        }
        model_st_buf_add(&h, ",", 1);
        model_st_buf_json_str(&h, t->name);
        model_st_buf_add(&h, ":{\"dtype\":\"F32\",\"shape\":[", 25);
        for (uint32_t d = 0; d < t->ndim; d++)
            model_st_buf_printf(&h, "%s%" PRIu64, d ? "," : "", t->shape[d]);
        model_st_buf_printf(&h, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}", off,
                            off + numel * 4);
        off += numel * 4;
    }
    model_st_buf_add(&h, "}", 1);
    while (h.len % 8)
        model_st_buf_add(&h, " ", 1);

    uint64_t hlen = h.len; /* little-endian host: the bytes are the format's */
    model_st_piece_t *pieces = semoe_xcalloc(n + 2, sizeof *pieces);
    pieces[0] = (model_st_piece_t){&hlen, 8};
    pieces[1] = (model_st_piece_t){h.p, h.len};
    for (size_t i = 0; i < n; i++) {
        uint64_t numel = 1;
        for (uint32_t d = 0; d < tensors[i].ndim; d++)
            numel *= tensors[i].shape[d];
        pieces[i + 2] = (model_st_piece_t){tensors[i].data, (size_t)numel * 4};
    }
    rc = model_st_write_atomic(path, pieces, n + 2);
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
bool model_st_json_u64(const cJSON *j, uint64_t *out)
{
    if (!cJSON_IsNumber(j))
        return false;
    double d = j->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || d != (double)(uint64_t)d)
        return false;
    *out = (uint64_t)d;
    return true;
}

bool model_st_utf8_valid(const uint8_t *s, size_t n)
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

void model_st_shape_str(char *buf, size_t cap, const uint64_t *shape, uint32_t ndim)
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
        return model_st_fail(SEMOE_EINVAL, "%s: a tensor has an empty name", path);
    if (!cJSON_IsObject(e))
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: entry is not an object", path, name);
    const cJSON *dt = NULL, *shape = NULL, *offs = NULL, *f;
    cJSON_ArrayForEach(f, e) {
        const cJSON **slot = strcmp(f->string, "dtype") == 0          ? &dt
                             : strcmp(f->string, "shape") == 0        ? &shape
                             : strcmp(f->string, "data_offsets") == 0 ? &offs
                                                                      : NULL;
        if (!slot)
            return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: unknown key \"%.40s\"", path, name,
                                 f->string);
        if (*slot)
            return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: key %s given twice", path, name,
                                 f->string);
        *slot = f;
    }
    if (!dt || !shape || !offs)
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: needs dtype, shape and data_offsets",
                             path, name);
    if (!cJSON_IsString(dt))
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: dtype is not a string", path, name);
    size_t k = 0;
    while (k < S_NDTYPES && strcmp(s_dtypes[k].name, dt->valuestring) != 0)
        k++;
    if (k == S_NDTYPES)
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: unknown dtype \"%.20s\"", path, name,
                             dt->valuestring);
    t->dtype = (model_st_dtype)k;
    if (!cJSON_IsArray(shape))
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape is not an array", path, name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > MODEL_ST_MAX_DIMS)
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape has %d dims, at most %d", path,
                             name, nd, MODEL_ST_MAX_DIMS);
    t->ndim = (uint32_t)nd;
    uint64_t numel = 1, bytes;
    int d = 0;
    cJSON_ArrayForEach(f, shape) {
        if (!model_st_json_u64(f, &t->shape[d]))
            return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape[%d] is not a non-negative "
                                 "integer", path, name, d);
        if (__builtin_mul_overflow(numel, t->shape[d], &numel))
            return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape overflows", path, name);
        d++;
    }
    t->numel = numel;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !model_st_json_u64(cJSON_GetArrayItem(offs, 0), &t->begin) ||
        !model_st_json_u64(cJSON_GetArrayItem(offs, 1), &t->end))
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets is not [begin, end] of "
                             "non-negative integers", path, name);
    if (t->end < t->begin)
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                             "] end before begin", path, name, t->begin, t->end);
    char sh[160];
    model_st_shape_str(sh, sizeof sh, t->shape, t->ndim);
    if (__builtin_mul_overflow(numel, (uint64_t)s_dtypes[k].size, &bytes))
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: shape %s overflows", path, name, sh);
    if (bytes != t->end - t->begin)
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
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
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: named twice in the header", path,
                               v[i]->name);
            goto out;
        }
    qsort(v, self->n, sizeof *v, s_cmp_ptr_offset);
    uint64_t at = 0;
    for (size_t i = 0; i < self->n; i++) {
        const model_st_info_t *t = v[i];
        if (t->end > self->data_size) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                               "] run past the data section (%" PRIu64 " bytes)", path, t->name,
                               t->begin, t->end, self->data_size);
            goto out;
        }
        if (t->begin < at) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                               "] overlap tensor %s", path, t->name, t->begin, t->end,
                               v[i - 1]->name);
            goto out;
        }
        if (t->begin > at) {
            rc = model_st_fail(SEMOE_EINVAL, "%s: tensor %s: data_offsets [%" PRIu64 ", %" PRIu64
                               "] leave a hole of %" PRIu64 " bytes before it", path, t->name,
                               t->begin, t->end, t->begin - at);
            goto out;
        }
        at = t->end;
    }
    if (at != self->data_size)
        rc = model_st_fail(SEMOE_EINVAL, "%s: %" PRIu64 " bytes after the last tensor's data "
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
        rc = model_st_fail(SEMOE_EINVAL, "%s: not a regular file", path);
        goto fail;
    }
    self->size = (size_t)st.st_size;
    if (self->size < 8) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: %zu bytes: too short for the 8-byte header length",
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
        rc = model_st_fail(SEMOE_EINVAL, "%s: header length %" PRIu64 " exceeds the %u-byte limit",
                           path, hlen, MODEL_ST_MAX_HEADER);
        goto fail;
    }
    if (hlen > self->size - 8) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: header length %" PRIu64 " points past the end of the "
                           "file (%zu bytes)", path, hlen, self->size);
        goto fail;
    }
    const uint8_t *h = self->map + 8;
    if (hlen < 2 || h[0] != '{') {
        rc = model_st_fail(SEMOE_EINVAL, "%s: header does not start with a JSON object", path);
        goto fail;
    }
    if (memchr(h, 0, hlen) || !model_st_utf8_valid(h, hlen)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: header is not valid UTF-8 text", path);
        goto fail;
    }
    const char *end = NULL;
    self->header = cJSON_ParseWithLengthOpts((const char *)h, hlen, &end, false);
    if (!self->header) {
        size_t at = end ? (size_t)(end - (const char *)h) : 0;
        rc = model_st_fail(SEMOE_EINVAL, "%s: header is not valid JSON (near byte %zu of %" PRIu64
                           ")", path, at, hlen);
        goto fail;
    }
    for (const char *c = end; c < (const char *)h + hlen; c++)
        if (*c != ' ' && *c != '\t' && *c != '\n' && *c != '\r') {
            rc = model_st_fail(SEMOE_EINVAL, "%s: header has bytes after its JSON object (at byte "
                               "%zu)", path, (size_t)(c - (const char *)h));
            goto fail;
        }
    if (!cJSON_IsObject(self->header)) {
        rc = model_st_fail(SEMOE_EINVAL, "%s: header is not a JSON object", path);
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
                rc = model_st_fail(SEMOE_EINVAL, "%s: __metadata__ given twice", path);
                goto fail;
            }
            if (!cJSON_IsObject(e)) {
                rc = model_st_fail(SEMOE_EINVAL, "%s: __metadata__ is not an object", path);
                goto fail;
            }
            const cJSON *m;
            cJSON_ArrayForEach(m, e) {
                if (!cJSON_IsString(m)) {
                    rc = model_st_fail(SEMOE_EINVAL, "%s: __metadata__.%.40s is not a string",
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
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: %" PRIu64 " elements, the destination "
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
        return model_st_fail(SEMOE_EINVAL, "%s: tensor %s: dtype %s cannot be read as floats (F32, "
                         "BF16 or F16 needed)", self->path, t->name, model_st_dtype_name(t->dtype));
    }
}
