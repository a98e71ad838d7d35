/* The strict msgpack pull reader: headers are decoded by hand from the format's first byte
 * (https://github.com/msgpack/msgpack/blob/master/spec.md) and checked against the bytes left. */
#include "proto/reader.h"

#include <string.h>

/* What a first byte announces. */
typedef enum { K_UINT, K_INT, K_NIL, K_BOOL, K_F32, K_F64, K_STR, K_BIN, K_ARRAY, K_MAP, K_EXT,
               K_NEVER } s_kind_t;

static s_kind_t s_kind(uint8_t b)
{
    if (b <= 0x7f) return K_UINT;
    if (b <= 0x8f) return K_MAP;
    if (b <= 0x9f) return K_ARRAY;
    if (b <= 0xbf) return K_STR;
    if (b >= 0xe0) return K_INT;
    switch (b) {
    case 0xc0: return K_NIL;
    case 0xc2: case 0xc3: return K_BOOL;
    case 0xc4: case 0xc5: case 0xc6: return K_BIN;
    case 0xc7: case 0xc8: case 0xc9: return K_EXT;
    case 0xca: return K_F32;
    case 0xcb: return K_F64;
    case 0xcc: case 0xcd: case 0xce: case 0xcf: return K_UINT;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: return K_INT;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: return K_EXT;
    case 0xd9: case 0xda: case 0xdb: return K_STR;
    case 0xdc: case 0xdd: return K_ARRAY;
    case 0xde: case 0xdf: return K_MAP;
    default: return K_NEVER; /* 0xc1 */
    }
}

/* The error for finding kind k where want was expected. */
static proto_result_t s_mismatch(s_kind_t k)
{
    if (k == K_NEVER)
        return PROTO_EBYTE;
    if (k == K_ARRAY || k == K_MAP)
        return PROTO_EDEPTH;
    return PROTO_EKIND;
}

/* Big-endian unsigned of n bytes at p. */
static uint64_t s_be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

proto_result_t proto_read_array(proto_reader_t *r, uint32_t *count)
{
    if (r->p >= r->end)
        return PROTO_ETRUNCATED;
    uint8_t b = r->p[0];
    size_t hdr;
    uint64_t n;
    if (b >= 0x90 && b <= 0x9f) {
        hdr = 1, n = b & 0x0f;
    } else if (b == 0xdc || b == 0xdd) {
        hdr = b == 0xdc ? 3 : 5;
        if (proto_reader_left(r) < hdr)
            return PROTO_ETRUNCATED;
        n = s_be(r->p + 1, (int)hdr - 1);
    } else {
        return s_kind(b) == K_NEVER ? PROTO_EBYTE : PROTO_EKIND;
    }
    /* Every element takes at least one byte: a count beyond the bytes left is a lie. */
    if (n > proto_reader_left(r) - hdr)
        return PROTO_ECOUNT;
    r->p += hdr;
    *count = (uint32_t)n;
    return PROTO_OK;
}

proto_result_t proto_read_uint(proto_reader_t *r, uint64_t *value)
{
    if (r->p >= r->end)
        return PROTO_ETRUNCATED;
    uint8_t b = r->p[0];
    s_kind_t k = s_kind(b);
    if (k != K_UINT && k != K_INT)
        return s_mismatch(k);
    if (b <= 0x7f) {
        *value = b;
        r->p += 1;
        return PROTO_OK;
    }
    if (b >= 0xe0)
        return PROTO_ERANGE; /* negative fixint */
    int n = 1 << (b & 0x03); /* 0xcc..0xcf and 0xd0..0xd3: 1, 2, 4, 8 bytes */
    if (proto_reader_left(r) < (size_t)n + 1)
        return PROTO_ETRUNCATED;
    uint64_t v = s_be(r->p + 1, n);
    if (k == K_INT && (v >> (8 * n - 1)) & 1)
        return PROTO_ERANGE; /* a negative signed integer */
    *value = v;
    r->p += n + 1;
    return PROTO_OK;
}

proto_result_t proto_read_f64(proto_reader_t *r, double *value)
{
    if (r->p >= r->end)
        return PROTO_ETRUNCATED;
    s_kind_t k = s_kind(r->p[0]);
    if (k != K_F32 && k != K_F64)
        return s_mismatch(k);
    size_t n = k == K_F32 ? 4 : 8;
    if (proto_reader_left(r) < n + 1)
        return PROTO_ETRUNCATED;
    uint64_t bits = s_be(r->p + 1, (int)n);
    if (k == K_F32) {
        uint32_t b32 = (uint32_t)bits;
        float f;
        memcpy(&f, &b32, 4);
        *value = f;
    } else {
        memcpy(value, &bits, 8);
    }
    r->p += n + 1;
    return PROTO_OK;
}

/* str and bin share the shape: a header with a length, then that many bytes. */
static proto_result_t s_read_bytes(proto_reader_t *r, s_kind_t want, const uint8_t **data,
                                   uint32_t *len)
{
    if (r->p >= r->end)
        return PROTO_ETRUNCATED;
    uint8_t b = r->p[0];
    s_kind_t k = s_kind(b);
    if (k != want)
        return s_mismatch(k);
    size_t hdr;
    uint64_t n;
    if (b >= 0xa0 && b <= 0xbf) {
        hdr = 1, n = b & 0x1f;
    } else {
        /* 0xd9/0xc4: 1 length byte, 0xda/0xc5: 2, 0xdb/0xc6: 4 */
        int lb = (b == 0xd9 || b == 0xc4) ? 1 : (b == 0xda || b == 0xc5) ? 2 : 4;
        hdr = 1 + (size_t)lb;
        if (proto_reader_left(r) < hdr)
            return PROTO_ETRUNCATED;
        n = s_be(r->p + 1, lb);
    }
    if (proto_reader_left(r) < hdr)
        return PROTO_ETRUNCATED;
    if (n > proto_reader_left(r) - hdr)
        return PROTO_ECOUNT;
    *data = r->p + hdr;
    *len = (uint32_t)n;
    r->p += hdr + n;
    return PROTO_OK;
}

proto_result_t proto_read_str(proto_reader_t *r, const uint8_t **data, uint32_t *len)
{
    return s_read_bytes(r, K_STR, data, len);
}

proto_result_t proto_read_bin(proto_reader_t *r, const uint8_t **data, uint32_t *len)
{
    return s_read_bytes(r, K_BIN, data, len);
}
