/* Reading JSON objects into C structs through a table of fields, strictly (a job spec: unknown
 * and duplicate keys are errors) or leniently (a config.json transformers wrote), and back to
 * JSON; the one line every model/ error is: "ORIGIN: SECTION.KEY=VALUE: FIX", user text escaped. */
#ifndef SEMOE_MODEL_SPEC_H
#define SEMOE_MODEL_SPEC_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"

/* A job spec or a config.json is a small file; anything larger is a wrong path. */
#define MODEL_SPEC_MAX_BYTES ((size_t)16 << 20)
/* The largest whole number a JSON number (a double) holds exactly: 2^53. */
#define MODEL_SPEC_MAX_EXACT 9007199254740992ull

typedef enum {
    MODEL_SPEC_U32,   /* uint32_t: a whole number in [0, 2^32) */
    MODEL_SPEC_U64,   /* uint64_t: a whole number in [0, 2^53] */
    MODEL_SPEC_BYTES, /* uint64_t: a whole number as U64, or a string "64GiB", "512 MB", "1T" */
    MODEL_SPEC_F64,   /* double, finite */
    MODEL_SPEC_BOOL,  /* bool: true or false */
    MODEL_SPEC_STR,   /* char[size]: a string that fits with its NUL */
    MODEL_SPEC_OTHER, /* a known key the caller reads itself from items[] */
} model_spec_kind_t;

typedef struct {
    const char *key;
    model_spec_kind_t kind;
    size_t offset;  /* of the field in the struct read into */
    size_t size;    /* of the field (the buffer, for MODEL_SPEC_STR) */
    bool nullable;  /* null means "not given": the field keeps its default */
} model_spec_field_t;

/* Where a value sits, for messages: origin names the file ("job.json", or a longer chain
 * "job.json: model: /x/config.json"); section is the dotted path of the object ("train"),
 * "" for the top level. */
typedef struct {
    const char *origin;
    const char *section;
} model_spec_where_t;

/* Reads obj, which must be a JSON object, into base through fields[0..n). Every value is type-
 * and range-checked for its kind. strict: an unknown or repeated key is an error (the message
 * names the nearest valid key); lenient: unknown keys are ignored and a repeated key's last value
 * wins, as Python's json does. items (n entries, may be NULL when no field is OTHER) receives
 * each field's JSON value, NULL where absent; a null value is stored as given. */
semoe_rc model_spec_read(const cJSON *obj, const model_spec_field_t *fields, size_t n, bool strict,
                         model_spec_where_t w, void *base, const cJSON **items);

/* Reads a whole file of at most MODEL_SPEC_MAX_BYTES. On success *text (NUL-terminated, *len
 * bytes before the NUL) is the caller's to free(). Messages start with origin. */
semoe_rc model_spec_read_file(const char *path, const char *origin, char **text, size_t *len);

/* Parses text[0..len) as one JSON value with nothing after it; text[len] must be a NUL. On
 * success *out is the caller's (cJSON_Delete). A syntax error reads "ORIGIN:LINE:COL: invalid
 * JSON near '...'". */
semoe_rc model_spec_parse(const char *text, size_t len, const char *origin, cJSON **out);

/* Sets the thread's error (SEMOE_EINVAL) to "ORIGIN: SECTION.KEY=VALUE: FIX" and returns it.
 * key NULL names the section itself; value NULL leaves out "=VALUE". value is shown as given,
 * so it must already be one line (the helpers below make it from a JSON item or a C value). */
semoe_rc model_spec_err(model_spec_where_t w, const char *key, const char *value,
                        const char *fix_fmt, ...) __attribute__((format(printf, 4, 5)));
semoe_rc model_spec_err_item(model_spec_where_t w, const char *key, const cJSON *item,
                             const char *fix_fmt, ...) __attribute__((format(printf, 4, 5)));
semoe_rc model_spec_err_u64(model_spec_where_t w, const char *key, uint64_t value,
                            const char *fix_fmt, ...) __attribute__((format(printf, 4, 5)));
semoe_rc model_spec_err_f64(model_spec_where_t w, const char *key, double value,
                            const char *fix_fmt, ...) __attribute__((format(printf, 4, 5)));
/* value is a C string, shown quoted and escaped. */
semoe_rc model_spec_err_str(model_spec_where_t w, const char *key, const char *value,
                            const char *fix_fmt, ...) __attribute__((format(printf, 4, 5)));

/* Writes s[0..n) into out (cap >= 8 bytes) with printable ASCII kept and everything else
 * escaped (\n, \t, \", \\, \xNN), cut with "..." where it does not fit; returns the length. */
size_t model_spec_escape(char *out, size_t cap, const char *s, size_t n);

/* Parses a byte count: digits, then an optional unit B, K/KiB, M/MiB, G/GiB, T/TiB (powers of
 * 1024) or KB, MB, GB, TB (powers of 1000), case-insensitive, spaces allowed around. */
bool model_spec_parse_bytes(const char *s, uint64_t *out);

/* Adds item to obj under key; aborts when cJSON cannot allocate (out of memory). */
void model_spec_put(cJSON *obj, const char *key, cJSON *item);

/* The fields[0..n) of base as a new JSON object (caller's, cJSON_Delete), what model_spec_read
 * reads back: a nullable U32 that is 0 as null, a BYTES count above MODEL_SPEC_MAX_EXACT as a
 * decimal string, OTHER fields left out (the caller adds them). Aborts when out of memory. */
cJSON *model_spec_to_json(const model_spec_field_t *fields, size_t n, const void *base);

#endif
