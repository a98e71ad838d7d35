/* Reading JSON objects into C structs through a table of fields (model/spec.h), and writing
 * them back: every value type- and range-checked, unknown and repeated keys refused when strict,
 * and every message one line that starts with the origin, whatever bytes the user's file holds. */
#include "model/spec.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define S_VALUE_MAX 48    /* bytes of a user's string shown in a message */
#define S_KEY_MAX 64      /* bytes of a user's key shown in a message */
#define S_MAX_FIELDS 64   /* fields in one table */

size_t model_spec_escape(char *out, size_t cap, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char rep[5];
        size_t k = 0;
        if (c == '"' || c == '\\') {
            rep[k++] = '\\';
            rep[k++] = (char)c;
        } else if (c == '\n' || c == '\t' || c == '\r') {
            rep[k++] = '\\';
            rep[k++] = c == '\n' ? 'n' : c == '\t' ? 't' : 'r';
        } else if (c < 0x20 || c >= 0x7f) {
            rep[k++] = '\\';
            rep[k++] = 'x';
            rep[k++] = hex[c >> 4];
            rep[k++] = hex[c & 15];
        } else {
            rep[k++] = (char)c;
        }
        /* keep room for "..." and the NUL unless this is the last byte and it fits */
        size_t room = i + 1 == n ? cap - 1 : cap - 4;
        if (o + k > room) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        memcpy(out + o, rep, k);
        o += k;
    }
    out[o] = 0;
    return o;
}

/* A number as a person would write it back: whole numbers without exponent, others with the
 * fewest digits that read back the same. */
static void s_num_text(double v, char *out, size_t cap)
{
    if (isnan(v))
        snprintf(out, cap, "nan");
    else if (isinf(v))
        snprintf(out, cap, v > 0 ? "inf" : "-inf");
    else if (v == floor(v) && fabs(v) < 1e17)
        snprintf(out, cap, "%.0f", v);
    else {
        snprintf(out, cap, "%.15g", v);
        if (strtod(out, NULL) != v)
            snprintf(out, cap, "%.17g", v);
    }
}

static void s_quoted(const char *s, size_t n, char *out, size_t cap)
{
    char esc[S_VALUE_MAX * 4 + 8];
    model_spec_escape(esc, n > S_VALUE_MAX ? S_VALUE_MAX + 4 : sizeof esc, s, n);
    snprintf(out, cap, "\"%s\"", esc);
}

/* The item's value, one line, short. */
static void s_item_text(const cJSON *item, char *out, size_t cap)
{
    if (!item)
        snprintf(out, cap, "?");
    else if (cJSON_IsNumber(item))
        s_num_text(item->valuedouble, out, cap);
    else if (cJSON_IsString(item))
        s_quoted(item->valuestring, strlen(item->valuestring), out, cap);
    else if (cJSON_IsBool(item))
        snprintf(out, cap, cJSON_IsTrue(item) ? "true" : "false");
    else if (cJSON_IsNull(item))
        snprintf(out, cap, "null");
    else if (cJSON_IsArray(item))
        snprintf(out, cap, cJSON_GetArraySize(item) ? "[...]" : "[]");
    else if (cJSON_IsObject(item))
        snprintf(out, cap, item->child ? "{...}" : "{}");
    else
        snprintf(out, cap, "?");
}

static const char *s_type_name(const cJSON *item)
{
    if (cJSON_IsNumber(item))
        return "a number";
    if (cJSON_IsString(item))
        return "a string";
    if (cJSON_IsBool(item))
        return "a boolean";
    if (cJSON_IsNull(item))
        return "null";
    if (cJSON_IsArray(item))
        return "an array";
    if (cJSON_IsObject(item))
        return "an object";
    return "an unknown value";
}

static semoe_rc s_errv(model_spec_where_t w, const char *key, const char *value,
                       const char *fix_fmt, va_list ap)
{
    char origin[512], path[S_KEY_MAX * 4 + 160], fix[640];
    const char *o = w.origin ? w.origin : "job spec";
    model_spec_escape(origin, sizeof origin, o, strlen(o));
    const char *sec = w.section ? w.section : "";
    char key_esc[S_KEY_MAX * 4 + 8] = "";
    if (key)
        model_spec_escape(key_esc, strlen(key) > S_KEY_MAX ? S_KEY_MAX + 4 : sizeof key_esc, key,
                          strlen(key));
    snprintf(path, sizeof path, "%s%s%s", sec, *sec && key ? "." : "", key_esc);
    vsnprintf(fix, sizeof fix, fix_fmt, ap);
    /* our own words, but they may quote a caller's text: keep the message one line */
    for (char *p = fix; *p; p++)
        if ((unsigned char)*p < 0x20)
            *p = ' ';
    if (!*path)
        return semoe_err(SEMOE_EINVAL, "%s: %s", origin, fix);
    if (value)
        return semoe_err(SEMOE_EINVAL, "%s: %s=%s: %s", origin, path, value, fix);
    return semoe_err(SEMOE_EINVAL, "%s: %s: %s", origin, path, fix);
}

semoe_rc model_spec_err(model_spec_where_t w, const char *key, const char *value,
                        const char *fix_fmt, ...)
{
    va_list ap;
    va_start(ap, fix_fmt);
    semoe_rc rc = s_errv(w, key, value, fix_fmt, ap);
    va_end(ap);
    return rc;
}

semoe_rc model_spec_err_item(model_spec_where_t w, const char *key, const cJSON *item,
                             const char *fix_fmt, ...)
{
    char value[S_VALUE_MAX * 4 + 16];
    s_item_text(item, value, sizeof value);
    va_list ap;
    va_start(ap, fix_fmt);
    semoe_rc rc = s_errv(w, key, value, fix_fmt, ap);
    va_end(ap);
    return rc;
}

semoe_rc model_spec_err_u64(model_spec_where_t w, const char *key, uint64_t value,
                            const char *fix_fmt, ...)
{
    char text[24];
    snprintf(text, sizeof text, "%llu", (unsigned long long)value);
    va_list ap;
    va_start(ap, fix_fmt);
    semoe_rc rc = s_errv(w, key, text, fix_fmt, ap);
    va_end(ap);
    return rc;
}

semoe_rc model_spec_err_f64(model_spec_where_t w, const char *key, double value,
                            const char *fix_fmt, ...)
{
    char text[40];
    s_num_text(value, text, sizeof text);
    va_list ap;
    va_start(ap, fix_fmt);
    semoe_rc rc = s_errv(w, key, text, fix_fmt, ap);
    va_end(ap);
    return rc;
}

semoe_rc model_spec_err_str(model_spec_where_t w, const char *key, const char *value,
                            const char *fix_fmt, ...)
{
    char text[S_VALUE_MAX * 4 + 16];
    s_quoted(value, strlen(value), text, sizeof text);
    va_list ap;
    va_start(ap, fix_fmt);
    semoe_rc rc = s_errv(w, key, text, fix_fmt, ap);
    va_end(ap);
    return rc;
}

/* Edit distance of two short strings (at most S_KEY_MAX bytes each). */
static size_t s_distance(const char *a, const char *b)
{
    size_t na = strlen(a), nb = strlen(b);
    size_t row[S_KEY_MAX + 1];
    for (size_t j = 0; j <= nb; j++)
        row[j] = j;
    for (size_t i = 1; i <= na; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= nb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[nb];
}

/* The valid key a typo most likely meant, or NULL when none is close. */
static const char *s_nearest(const char *key, const model_spec_field_t *fields, size_t n)
{
    size_t nk = strlen(key);
    if (nk == 0 || nk > S_KEY_MAX)
        return NULL;
    const char *best = NULL;
    size_t best_d = (size_t)-1;
    for (size_t i = 0; i < n; i++) {
        const char *f = fields[i].key;
        size_t nf = strlen(f);
        if (nf > S_KEY_MAX)
            continue;
        size_t d = s_distance(key, f);
        bool prefix = nf >= 2 && nk >= 2 &&
                      (strncasecmp(key, f, nf < nk ? nf : nk) == 0);
        bool close = d <= 2 || d * 3 <= nf || prefix;
        if (close && d < best_d) {
            best = f;
            best_d = d;
        }
    }
    return best;
}

static semoe_rc s_unknown(model_spec_where_t w, const char *key, const model_spec_field_t *fields,
                          size_t n)
{
    char valid[512];
    size_t o = 0;
    valid[0] = 0;
    for (size_t i = 0; i < n && o < sizeof valid; i++)
        o += (size_t)snprintf(valid + o, sizeof valid - o, "%s%s", i ? ", " : "", fields[i].key);
    const char *what = w.section && *w.section ? "key" : "section";
    const char *near = s_nearest(key, fields, n);
    if (near)
        return model_spec_err(w, key, NULL, "unknown %s; did you mean \"%s\"? (valid: %s)", what,
                              near, valid);
    return model_spec_err(w, key, NULL, "unknown %s (valid: %s)", what, valid);
}

/* A whole number in [0, max]. */
static semoe_rc s_whole(const cJSON *v, model_spec_where_t w, const char *key, double max,
                        uint64_t *out)
{
    if (!cJSON_IsNumber(v))
        return model_spec_err_item(w, key, v, "must be a whole number, not %s", s_type_name(v));
    double d = v->valuedouble;
    if (!isfinite(d))
        return model_spec_err_item(w, key, v, "must be a finite whole number");
    if (d != floor(d))
        return model_spec_err_item(w, key, v, "must be a whole number");
    if (d < 0)
        return model_spec_err_item(w, key, v, "must be >= 0");
    if (d > max)
        return model_spec_err_item(w, key, v, "must be <= %.0f", max);
    *out = (uint64_t)d;
    return SEMOE_OK;
}

static semoe_rc s_read_value(const cJSON *v, const model_spec_field_t *f, model_spec_where_t w,
                             void *base)
{
    char *p = (char *)base + f->offset;
    uint64_t u = 0;
    if (cJSON_IsNull(v) && f->nullable)
        return SEMOE_OK;
    switch (f->kind) {
    case MODEL_SPEC_U32:
        SEMOE_CHECK(s_whole(v, w, f->key, 4294967295.0, &u));
        *(uint32_t *)p = (uint32_t)u;
        return SEMOE_OK;
    case MODEL_SPEC_U64:
        SEMOE_CHECK(s_whole(v, w, f->key, (double)MODEL_SPEC_MAX_EXACT, &u));
        *(uint64_t *)p = u;
        return SEMOE_OK;
    case MODEL_SPEC_BYTES:
        if (cJSON_IsString(v)) {
            if (!model_spec_parse_bytes(v->valuestring, &u))
                return model_spec_err_item(w, f->key, v,
                                           "must be a byte count: a whole number or a string "
                                           "like \"64GiB\" (units B, KiB, MiB, GiB, TiB, KB, MB, "
                                           "GB, TB) below 16 EiB");
        } else {
            SEMOE_CHECK(s_whole(v, w, f->key, (double)MODEL_SPEC_MAX_EXACT, &u));
        }
        *(uint64_t *)p = u;
        return SEMOE_OK;
    case MODEL_SPEC_F64:
        if (!cJSON_IsNumber(v))
            return model_spec_err_item(w, f->key, v, "must be a number, not %s", s_type_name(v));
        if (!isfinite(v->valuedouble))
            return model_spec_err_item(w, f->key, v, "must be a finite number");
        *(double *)p = v->valuedouble;
        return SEMOE_OK;
    case MODEL_SPEC_BOOL:
        if (!cJSON_IsBool(v))
            return model_spec_err_item(w, f->key, v, "must be true or false, not %s",
                                       s_type_name(v));
        *(bool *)p = cJSON_IsTrue(v);
        return SEMOE_OK;
    case MODEL_SPEC_STR:
        if (!cJSON_IsString(v))
            return model_spec_err_item(w, f->key, v, "must be a string, not %s", s_type_name(v));
        if (strlen(v->valuestring) >= f->size)
            return model_spec_err_item(w, f->key, v, "too long (at most %zu bytes)", f->size - 1);
        memcpy(p, v->valuestring, strlen(v->valuestring) + 1);
        return SEMOE_OK;
    case MODEL_SPEC_OTHER:
        return SEMOE_OK;
    }
    return model_spec_err_item(w, f->key, v, "unreadable field kind %d", (int)f->kind);
}

semoe_rc model_spec_read(const cJSON *obj, const model_spec_field_t *fields, size_t n, bool strict,
                         model_spec_where_t w, void *base, const cJSON **items)
{
    const cJSON *seen[S_MAX_FIELDS] = {0};
    if (n > S_MAX_FIELDS)
        return model_spec_err(w, NULL, NULL, "a table of %zu fields is more than %d", n,
                              S_MAX_FIELDS);
    if (!cJSON_IsObject(obj)) {
        if (w.section && *w.section)
            return model_spec_err_item(w, NULL, obj, "must be an object {...}, not %s",
                                       s_type_name(obj));
        return model_spec_err(w, NULL, NULL, "must be one JSON object {...}, not %s",
                              s_type_name(obj));
    }
    for (const cJSON *c = obj->child; c; c = c->next) {
        const char *key = c->string ? c->string : "";
        size_t i = 0;
        while (i < n && strcmp(fields[i].key, key) != 0)
            i++;
        if (i == n) {
            if (strict)
                return s_unknown(w, key, fields, n);
            continue;
        }
        if (seen[i] && strict)
            return model_spec_err(w, key, NULL, "given twice; keep one");
        seen[i] = c;
        SEMOE_CHECK(s_read_value(c, &fields[i], w, base));
    }
    if (items)
        memcpy(items, seen, n * sizeof *items);
    return SEMOE_OK;
}

semoe_rc model_spec_read_file(const char *path, const char *origin, char **text, size_t *len)
{
    char o[512];
    model_spec_escape(o, sizeof o, origin, strlen(origin));
    *text = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return semoe_err_errno(SEMOE_EINVAL, "%s: cannot read", o);
    struct stat st;
    bool regular = fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
    if (regular && (uint64_t)st.st_size > MODEL_SPEC_MAX_BYTES) {
        close(fd);
        return semoe_err(SEMOE_EINVAL, "%s: %lld bytes: too large for a spec (at most %zu MiB); "
                         "check the path", o, (long long)st.st_size, MODEL_SPEC_MAX_BYTES >> 20);
    }
    size_t cap = regular && st.st_size > 0 ? (size_t)st.st_size + 1 : 4096;
    char *buf = semoe_xmalloc(cap + 1);
    size_t n = 0;
    for (;;) {
        if (n == cap) {
            cap *= 2;
            buf = semoe_xrealloc(buf, cap + 1);
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            semoe_rc rc = semoe_err_errno(SEMOE_EINVAL, "%s: cannot read", o);
            free(buf);
            close(fd);
            return rc;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > MODEL_SPEC_MAX_BYTES) {
            free(buf);
            close(fd);
            return semoe_err(SEMOE_EINVAL, "%s: more than %zu MiB: too large for a spec; check "
                             "the path", o, MODEL_SPEC_MAX_BYTES >> 20);
        }
    }
    close(fd);
    buf[n] = 0;
    *text = buf;
    *len = n;
    return SEMOE_OK;
}

/* 1-based line and byte column of text[pos]. */
static void s_line_col(const char *text, size_t pos, size_t *line, size_t *col)
{
    size_t l = 1, start = 0;
    for (size_t i = 0; i < pos; i++)
        if (text[i] == '\n') {
            l++;
            start = i + 1;
        }
    *line = l;
    *col = pos - start + 1;
}

semoe_rc model_spec_parse(const char *text, size_t len, const char *origin, cJSON **out)
{
    char o[512];
    model_spec_escape(o, sizeof o, origin, strlen(origin));
    *out = NULL;
    if (len > MODEL_SPEC_MAX_BYTES)
        return semoe_err(SEMOE_EINVAL, "%s: %zu bytes: too large for a spec (at most %zu MiB)", o,
                         len, MODEL_SPEC_MAX_BYTES >> 20);
    size_t line, col;
    const char *nul = memchr(text, 0, len);
    if (nul) {
        s_line_col(text, (size_t)(nul - text), &line, &col);
        return semoe_err(SEMOE_EINVAL, "%s:%zu:%zu: invalid JSON: a NUL byte (is this a text "
                         "file?)", o, line, col);
    }
    size_t first = 0;
    while (first < len && strchr(" \t\r\n", text[first]))
        first++;
    if (first == len) {
        s_line_col(text, len, &line, &col);
        return semoe_err(SEMOE_EINVAL, "%s:%zu:%zu: invalid JSON: the file is empty; a spec is "
                         "one object {...}", o, line, col);
    }
    /* len + 1 takes in the NUL: cJSON only accepts "nothing after the value" by seeing it */
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len + 1, &end, 1);
    if (root) {
        *out = root;
        return SEMOE_OK;
    }
    size_t pos = end && end >= text && end <= text + len ? (size_t)(end - text) : len;
    /* where a key should start, cJSON reports one byte past the byte that is not a '"' */
    if (pos > 0 && pos <= len && !strchr(" \t\r\n\"", text[pos - 1])) {
        size_t p = pos - 1;
        while (p > 0 && strchr(" \t\r\n", text[p - 1]))
            p--;
        if (p > 0 && (text[p - 1] == '{' || text[p - 1] == ','))
            pos--;
    }
    s_line_col(text, pos, &line, &col);
    if (pos >= len)
        return semoe_err(SEMOE_EINVAL, "%s:%zu:%zu: invalid JSON: unexpected end of input (an "
                         "unclosed brace, bracket or string?)", o, line, col);
    /* cJSON's position is at or just after the fault: show a little of the line around it */
    size_t from = pos, to = pos;
    while (from > 0 && pos - from < 12 && text[from - 1] != '\n')
        from--;
    while (from < pos && (text[from] == ' ' || text[from] == '\t'))
        from++;
    while (to < len && to - pos < 16 && text[to] != '\n' && text[to] != '\r')
        to++;
    char near[160];
    size_t k = 0;
    for (size_t i = from; i < to; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c >= 0x20 && c < 0x7f && c != '\\')
            near[k++] = (char)c;
        else
            k += model_spec_escape(near + k, sizeof near - k, text + i, 1);
    }
    near[k] = 0;
    return semoe_err(SEMOE_EINVAL, "%s:%zu:%zu: invalid JSON near '%s'", o, line, col, near);
}

bool model_spec_parse_bytes(const char *s, uint64_t *out)
{
    static const struct {
        const char *unit;
        uint64_t scale;
    } units[] = {
        {"", 1}, {"b", 1},
        {"k", 1ull << 10}, {"kib", 1ull << 10}, {"kb", 1000ull},
        {"m", 1ull << 20}, {"mib", 1ull << 20}, {"mb", 1000000ull},
        {"g", 1ull << 30}, {"gib", 1ull << 30}, {"gb", 1000000000ull},
        {"t", 1ull << 40}, {"tib", 1ull << 40}, {"tb", 1000000000000ull},
    };
    while (*s == ' ')
        s++;
    if (*s < '0' || *s > '9')
        return false;
    uint64_t v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        uint64_t d = (uint64_t)(*s - '0');
        if (v > (UINT64_MAX - d) / 10)
            return false;
        v = v * 10 + d;
    }
    while (*s == ' ')
        s++;
    size_t n = 0;
    while (s[n] && s[n] != ' ')
        n++;
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strlen(units[i].unit) != n || strncasecmp(s, units[i].unit, n) != 0)
            continue;
        const char *rest = s + n;
        while (*rest == ' ')
            rest++;
        if (*rest)
            return false;
        if (v > UINT64_MAX / units[i].scale)
            return false;
        *out = v * units[i].scale;
        return true;
    }
    return false;
}

void model_spec_put(cJSON *obj, const char *key, cJSON *item)
{
    if (!item || !cJSON_AddItemToObject(obj, key, item)) {
        fprintf(stderr, "semoe: out of memory building JSON\n");
        abort();
    }
}

/* A count as a JSON number when exact, else as a decimal string (which BYTES fields read). */
static cJSON *s_u64_json(uint64_t v, bool as_string_if_large)
{
    if (v <= MODEL_SPEC_MAX_EXACT || !as_string_if_large)
        return cJSON_CreateNumber((double)v);
    char text[24];
    snprintf(text, sizeof text, "%llu", (unsigned long long)v);
    return cJSON_CreateString(text);
}

cJSON *model_spec_to_json(const model_spec_field_t *fields, size_t n, const void *base)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        abort();
    for (size_t i = 0; i < n; i++) {
        const model_spec_field_t *f = &fields[i];
        const char *p = (const char *)base + f->offset;
        cJSON *v = NULL;
        switch (f->kind) {
        case MODEL_SPEC_U32: {
            uint32_t u = *(const uint32_t *)p;
            v = f->nullable && u == 0 ? cJSON_CreateNull() : cJSON_CreateNumber(u);
            break;
        }
        case MODEL_SPEC_U64:
            v = s_u64_json(*(const uint64_t *)p, false);
            break;
        case MODEL_SPEC_BYTES:
            v = s_u64_json(*(const uint64_t *)p, true);
            break;
        case MODEL_SPEC_F64:
            v = cJSON_CreateNumber(*(const double *)p);
            break;
        case MODEL_SPEC_BOOL:
            v = cJSON_CreateBool(*(const bool *)p);
            break;
        case MODEL_SPEC_STR:
            v = cJSON_CreateString(p);
            break;
        case MODEL_SPEC_OTHER:
            continue;
        }
        model_spec_put(o, f->key, v);
    }
    return o;
}
