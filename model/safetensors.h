/* The safetensors format, as Hugging Face writes and reads it: a writer of float32 tensors (F32,
 * atomic) and a strict reader that converts F32/BF16/F16 to float32: one file. Sharded
 * checkpoints (model.safetensors.index.json) are model/checkpoint.h's. */
#ifndef SEMOE_MODEL_SAFETENSORS_H
#define SEMOE_MODEL_SAFETENSORS_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/config.h"
#include "model/params.h"

#define MODEL_ST_MAX_DIMS 8
#define MODEL_ST_MAX_HEADER (100u * 1000u * 1000u) /* bytes, as the reference reader */
#define MODEL_ST_INDEX "model.safetensors.index.json"
#define MODEL_ST_SINGLE "model.safetensors"

typedef enum {
    MODEL_ST_BOOL, MODEL_ST_U8, MODEL_ST_I8, MODEL_ST_F8_E4M3, MODEL_ST_F8_E5M2,
    MODEL_ST_I16, MODEL_ST_U16, MODEL_ST_F16, MODEL_ST_BF16,
    MODEL_ST_I32, MODEL_ST_U32, MODEL_ST_F32, MODEL_ST_I64, MODEL_ST_U64, MODEL_ST_F64,
} model_st_dtype;

/* A tensor to write: caller's float32 buffer of prod(shape) elements, written as F32. */
typedef struct {
    const char *name;
    uint32_t ndim;                     /* 0 (scalar) .. MODEL_ST_MAX_DIMS */
    uint64_t shape[MODEL_ST_MAX_DIMS];
    const float *data;
} model_st_tensor_t;

/* A tensor of an open file, as its header describes it (validated). */
typedef struct {
    const char *name;                  /* into the file object */
    model_st_dtype dtype;
    uint32_t ndim;
    uint64_t shape[MODEL_ST_MAX_DIMS];
    uint64_t numel;
    uint64_t begin, end;               /* byte offsets into the data section */
} model_st_info_t;

typedef struct model_st_file model_st_file_t;

/* "F32", "BF16", ...; the element size in bytes. */
const char *model_st_dtype_name(model_st_dtype dt);
size_t model_st_dtype_size(model_st_dtype dt);

/* Writes n tensors to path as F32 in the given order, with __metadata__ {"format": "pt"}: to
 * "<path>.tmp", fsync, rename, fsync of the directory, so path is either whole or untouched.
 * Names must be unique, non-empty and not "__metadata__". */
semoe_rc model_st_write(const char *path, const model_st_tensor_t *tensors, size_t n);

/* Opens and validates path (see safetensors.c for every rule); on any breach returns
 * SEMOE_EINVAL with one line naming the file and, where one is at fault, the tensor. Caller
 * owns *out (model_st_close). */
semoe_rc model_st_open(const char *path, model_st_file_t **out);
void model_st_close(model_st_file_t **self_p);

const char *model_st_path(const model_st_file_t *self);
size_t model_st_count(const model_st_file_t *self);
/* Tensor i in header order, or NULL. */
const model_st_info_t *model_st_at(const model_st_file_t *self, size_t i);
const model_st_info_t *model_st_find(const model_st_file_t *self, const char *name);
/* The __metadata__ value for key, or NULL. */
const char *model_st_meta(const model_st_file_t *self, const char *key);

/* Converts tensor t (F32, BF16 or F16) into dst, which holds n floats; n must equal t->numel. */
semoe_rc model_st_read_f32(const model_st_file_t *self, const model_st_info_t *t, float *dst,
                           uint64_t n);

/* ---- helpers shared with model/checkpoint.c (not for other callers) ------------------------ */

/* semoe_err with the message made one printable line (control bytes become '?'): names come
 * from untrusted files. Returns code. */
semoe_rc model_st_fail(semoe_rc code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* A growing NUL-terminated string; free(b.p) when done. */
typedef struct {
    char *p;
    size_t len, cap;
} model_st_buf_t;
void model_st_buf_add(model_st_buf_t *b, const char *s, size_t n);
/* Appends at most 127 formatted bytes. */
void model_st_buf_printf(model_st_buf_t *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* Appends s as a JSON string literal. */
void model_st_buf_json_str(model_st_buf_t *b, const char *s);

typedef struct {
    const void *p;
    size_t n;
} model_st_piece_t;
/* Writes the pieces to "<path>.tmp", fsyncs, renames onto path, fsyncs the directory. */
semoe_rc model_st_write_atomic(const char *path, const model_st_piece_t *pieces, size_t n);

/* A JSON number that is a non-negative integer below 2^53. */
bool model_st_json_u64(const cJSON *j, uint64_t *out);
bool model_st_utf8_valid(const uint8_t *s, size_t n);
/* "[a, b]" into buf. */
void model_st_shape_str(char *buf, size_t cap, const uint64_t *shape, uint32_t ndim);

#endif
