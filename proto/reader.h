/* A strict msgpack pull reader over a byte range: every header is checked against the bytes
 * left before anything is read, and nothing is allocated. The decoder in msg.c reads messages
 * field by field with it, against the schema, so any deviation is found at the first byte. */
#ifndef SEMOE_PROTO_READER_H
#define SEMOE_PROTO_READER_H

#include <stddef.h>
#include <stdint.h>

#include "proto/msg.h"

typedef struct {
    const uint8_t *p;   /* next byte */
    const uint8_t *end; /* one past the last */
} proto_reader_t;

static inline proto_reader_t proto_reader(const void *buf, size_t len)
{
    return (proto_reader_t){(const uint8_t *)buf, (const uint8_t *)buf + len};
}

static inline size_t proto_reader_left(const proto_reader_t *r) { return (size_t)(r->end - r->p); }

/* Each reads one value of its kind and advances past it, or returns why it cannot: the value
 * is another kind (PROTO_EKIND, or PROTO_EDEPTH for a container), its header is cut
 * (PROTO_ETRUNCATED), it claims more elements or bytes than are left (PROTO_ECOUNT), or it is
 * not msgpack (PROTO_EBYTE). The reader is unchanged on failure. */
proto_result_t proto_read_array(proto_reader_t *r, uint32_t *count);
proto_result_t proto_read_uint(proto_reader_t *r, uint64_t *value); /* negative: PROTO_ERANGE */
proto_result_t proto_read_f64(proto_reader_t *r, double *value);   /* float 32 or 64 */
proto_result_t proto_read_str(proto_reader_t *r, const uint8_t **data, uint32_t *len);
proto_result_t proto_read_bin(proto_reader_t *r, const uint8_t **data, uint32_t *len);

#endif
