/* Encoder, strict decoder and printer of every control message, generated from the field
 * tables in msg.h; plus the per-type checks a table cannot express (a PLAN's tables agree). */
#include "proto/msg.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "proto/reader.h"

#define PROTO_HEADER_FIELDS 6

/* --- the type table ------------------------------------------------------------------------ */

#define S_COUNT_FIELD(kind, name, limit) +1
#define S_TYPE_INFO(TYPE, name, FIELDS) [TYPE] = {#name, 0 FIELDS(S_COUNT_FIELD)},
static const struct {
    const char *name;
    uint32_t fields;
} s_types[PROTO_TYPE_END] = {PROTO_TYPES(S_TYPE_INFO)};

const char *proto_type_name(uint32_t type)
{
    return type > 0 && type < PROTO_TYPE_END ? s_types[type].name : "?";
}

const char *proto_phase_name(uint32_t phase)
{
    static const char *names[PROTO_PHASE_END] = {
        [PROTO_PHASE_IDLE] = "idle",
        [PROTO_PHASE_TRAINING] = "training",
        [PROTO_PHASE_FINISHED] = "finished",
        [PROTO_PHASE_FAILED] = "failed",
        [PROTO_PHASE_PAUSED] = "paused",
        [PROTO_PHASE_STALLED] = "stalled",
    };
    return phase < PROTO_PHASE_END ? names[phase] : "?";
}

const char *proto_result_str(proto_result_t r)
{
    static const char *names[PROTO_RESULT_END] = {
        [PROTO_OK] = "ok",
        [PROTO_EMAGIC] = "not a semoe message (bad magic)",
        [PROTO_EVERSION] = "unsupported protocol version",
        [PROTO_ETYPE] = "unknown message type",
        [PROTO_ETRUNCATED] = "truncated message",
        [PROTO_ECOUNT] = "a count or length larger than the bytes left",
        [PROTO_EDEPTH] = "nesting deeper than the schema",
        [PROTO_EKIND] = "a field of the wrong kind",
        [PROTO_EFIELDS] = "wrong number of fields",
        [PROTO_ERANGE] = "a value out of range",
        [PROTO_ETRAILING] = "bytes after the message",
        [PROTO_EBYTE] = "not msgpack (byte 0xc1)",
    };
    return (unsigned)r < PROTO_RESULT_END ? names[r] : "unknown result";
}

/* --- decoding, one reader per field kind ----------------------------------------------------- */

static proto_result_t s_rd_U32(proto_reader_t *r, uint32_t *out, uint64_t limit)
{
    uint64_t v;
    proto_result_t rc = proto_read_uint(r, &v);
    if (rc != PROTO_OK)
        return rc;
    if (v > limit)
        return PROTO_ERANGE;
    *out = (uint32_t)v;
    return PROTO_OK;
}

static proto_result_t s_rd_U64(proto_reader_t *r, uint64_t *out, uint64_t limit)
{
    uint64_t v;
    proto_result_t rc = proto_read_uint(r, &v);
    if (rc != PROTO_OK)
        return rc;
    if (v > limit)
        return PROTO_ERANGE;
    *out = v;
    return PROTO_OK;
}

/* Any double, NaN and infinities included: a field's meaning says what NaN stands for. */
static proto_result_t s_rd_F64(proto_reader_t *r, double *out, uint64_t limit)
{
    (void)limit;
    return proto_read_f64(r, out);
}

/* Copies a string into out[limit + 1]; refuses embedded NULs (names are C strings). */
static proto_result_t s_rd_STR(proto_reader_t *r, char *out, uint64_t limit)
{
    const uint8_t *p;
    uint32_t n;
    proto_result_t rc = proto_read_str(r, &p, &n);
    if (rc != PROTO_OK)
        return rc;
    if (n > limit || memchr(p, 0, n))
        return PROTO_ERANGE;
    memcpy(out, p, n);
    out[n] = 0;
    return PROTO_OK;
}

static proto_result_t s_rd_BYTES(proto_reader_t *r, proto_bytes_t *out, uint64_t limit)
{
    const uint8_t *p;
    uint32_t n;
    proto_result_t rc = proto_read_bin(r, &p, &n);
    if (rc != PROTO_OK)
        return rc;
    if (n > limit)
        return PROTO_ERANGE;
    *out = (proto_bytes_t){p, n};
    return PROTO_OK;
}

static proto_result_t s_rd_U32S(proto_reader_t *r, proto_u32s_t *out, uint64_t limit)
{
    const uint8_t *p;
    uint32_t n;
    proto_result_t rc = proto_read_bin(r, &p, &n);
    if (rc != PROTO_OK)
        return rc;
    if (n % 4 || n / 4 > limit)
        return PROTO_ERANGE;
    *out = (proto_u32s_t){.data = p, .count = n / 4};
    return PROTO_OK;
}

/* One [id, endpoint] pair; id and endpoint may be NULL to only check. */
static proto_result_t s_rd_pair(proto_reader_t *r, char *id, char *endpoint)
{
    char scratch[PROTO_MAX_ENDPOINT + 1];
    uint32_t n;
    proto_result_t rc = proto_read_array(r, &n);
    if (rc != PROTO_OK)
        return rc;
    if (n != 2)
        return PROTO_EFIELDS;
    if ((rc = s_rd_STR(r, id ? id : scratch, PROTO_MAX_NAME)) != PROTO_OK)
        return rc;
    if ((rc = s_rd_STR(r, endpoint ? endpoint : scratch, PROTO_MAX_ENDPOINT)) != PROTO_OK)
        return rc;
    if (!(id ? id : scratch)[0] && !endpoint)
        return PROTO_ERANGE;
    return PROTO_OK;
}

static proto_result_t s_rd_PEERS(proto_reader_t *r, proto_peers_t *out, uint64_t limit)
{
    uint32_t n;
    proto_result_t rc = proto_read_array(r, &n);
    if (rc != PROTO_OK)
        return rc;
    if (n > limit)
        return PROTO_ERANGE;
    const uint8_t *start = r->p;
    for (uint32_t i = 0; i < n; i++)
        if ((rc = s_rd_pair(r, NULL, NULL)) != PROTO_OK)
            return rc;
    *out = (proto_peers_t){.data = start, .size = (size_t)(r->p - start), .count = n};
    return PROTO_OK;
}

bool proto_peers_next(const proto_peers_t *peers, size_t *pos, char id[PROTO_MAX_NAME + 1],
                      char endpoint[PROTO_MAX_ENDPOINT + 1])
{
    if (!peers->data || *pos >= peers->size)
        return false;
    proto_reader_t r = proto_reader(peers->data + *pos, peers->size - *pos);
    if (s_rd_pair(&r, id, endpoint) != PROTO_OK)
        return false;
    *pos = (size_t)(r.p - peers->data);
    return true;
}

/* Per-type checks beyond the field table. */
static proto_result_t s_check(const proto_msg_t *m)
{
    switch (m->hdr.type) {
    case PROTO_JOIN:
        if (!m->join.id[0] || !m->join.data_endpoint[0] ||
            (strcmp(m->join.device_kind, "cpu") && strcmp(m->join.device_kind, "cuda")))
            return PROTO_ERANGE;
        return PROTO_OK;
    case PROTO_WELCOME:
        return m->welcome.heartbeat_ms && m->welcome.liveness ? PROTO_OK : PROTO_ERANGE;
    case PROTO_PLAN: {
        const proto_plan_t *p = &m->plan;
        uint64_t experts = (uint64_t)p->num_layers * p->num_experts;
        if (p->world == 0 || (p->rank >= p->world && p->rank != PROTO_NO_RANK) ||
            experts > PROTO_MAX_EXPERTS || p->batch_offsets.count != p->world + 1 ||
            p->holder_offsets.count != experts + 1 || p->peers.count != p->world)
            return PROTO_ERANGE;
        for (uint32_t i = 0; i < p->world; i++)
            if (proto_u32_at(p->batch_offsets, i) > proto_u32_at(p->batch_offsets, i + 1))
                return PROTO_ERANGE;
        if (proto_u32_at(p->batch_offsets, 0) != 0 ||
            proto_u32_at(p->batch_offsets, p->world) != p->global_batch)
            return PROTO_ERANGE;
        if (proto_u32_at(p->holder_offsets, 0) != 0 ||
            proto_u32_at(p->holder_offsets, (uint32_t)experts) != p->holders.count)
            return PROTO_ERANGE;
        for (uint32_t e = 0; e < experts; e++)
            if (proto_u32_at(p->holder_offsets, e) > proto_u32_at(p->holder_offsets, e + 1))
                return PROTO_ERANGE;
        for (uint32_t i = 0; i < p->holders.count; i++)
            if (proto_u32_at(p->holders, i) >= p->world)
                return PROTO_ERANGE;
        return PROTO_OK;
    }
    case PROTO_COMM:
        return m->comm.comm_id.size && m->comm.world ? PROTO_OK : PROTO_ERANGE;
    case PROTO_ACK:
        return m->ack.acked_type >= 1 ? PROTO_OK : PROTO_ERANGE;
    case PROTO_ERROR:
        return m->error.code ? PROTO_OK : PROTO_ERANGE;
    default:
        return PROTO_OK;
    }
}

#define S_DECODE_FIELD(kind, name, limit)                                                    \
    if ((rc = s_rd_##kind(r, body->name, limit)) != PROTO_OK)                                \
        return rc;
/* Field kinds take a pointer, except STR whose array decays by itself. */
#define s_rd_U32(r, f, l) s_rd_U32(r, &(f), l)
#define s_rd_U64(r, f, l) s_rd_U64(r, &(f), l)
#define s_rd_F64(r, f, l) s_rd_F64(r, &(f), l)
#define s_rd_BYTES(r, f, l) s_rd_BYTES(r, &(f), l)
#define s_rd_U32S(r, f, l) s_rd_U32S(r, &(f), l)
#define s_rd_PEERS(r, f, l) s_rd_PEERS(r, &(f), l)
#define S_DECODE_BODY(TYPE, name, FIELDS)                                                    \
    static proto_result_t s_decode_##name(proto_reader_t *r, proto_##name##_t *body)         \
    {                                                                                        \
        proto_result_t rc;                                                                   \
        FIELDS(S_DECODE_FIELD)                                                               \
        return PROTO_OK;                                                                     \
    }
PROTO_TYPES(S_DECODE_BODY)
#undef s_rd_U32
#undef s_rd_U64
#undef s_rd_F64
#undef s_rd_BYTES
#undef s_rd_U32S
#undef s_rd_PEERS

proto_result_t proto_decode(const void *buf, size_t len, proto_msg_t *msg)
{
    proto_reader_t r = proto_reader(buf, len);
    uint32_t n;
    uint64_t v;
    proto_result_t rc = proto_read_array(&r, &n);
    if (rc == PROTO_EKIND || rc == PROTO_EBYTE)
        return PROTO_EMAGIC; /* not even an array: not one of ours */
    if (rc != PROTO_OK)
        return rc;
    memset(&msg->hdr, 0, sizeof msg->hdr);
    /* Signature, version and type first, so that a foreign message says so. */
    if (n < 1)
        return PROTO_EFIELDS;
    if (proto_read_uint(&r, &v) != PROTO_OK || v != PROTO_MAGIC)
        return PROTO_EMAGIC;
    if (n < 2)
        return PROTO_EFIELDS;
    if ((rc = proto_read_uint(&r, &v)) != PROTO_OK)
        return rc == PROTO_ERANGE ? PROTO_EVERSION : rc;
    if (v != PROTO_VERSION)
        return PROTO_EVERSION;
    if (n < 3)
        return PROTO_EFIELDS;
    if ((rc = proto_read_uint(&r, &v)) != PROTO_OK)
        return rc == PROTO_ERANGE ? PROTO_ETYPE : rc;
    if (v == 0 || v >= PROTO_TYPE_END)
        return PROTO_ETYPE;
    msg->hdr.type = (uint32_t)v;
    if (n != PROTO_HEADER_FIELDS + s_types[v].fields)
        return PROTO_EFIELDS;
    if ((rc = proto_read_uint(&r, &msg->hdr.run_id)) != PROTO_OK ||
        (rc = proto_read_uint(&r, &msg->hdr.generation)) != PROTO_OK ||
        (rc = proto_read_uint(&r, &msg->hdr.seq)) != PROTO_OK)
        return rc;
    switch (msg->hdr.type) {
#define S_DECODE_CASE(TYPE, name, FIELDS)                                                    \
    case TYPE:                                                                               \
        rc = s_decode_##name(&r, &msg->name);                                                \
        break;
        PROTO_TYPES(S_DECODE_CASE)
    default:
        return PROTO_ETYPE;
    }
    if (rc != PROTO_OK)
        return rc;
    if (r.p != r.end)
        return PROTO_ETRAILING;
    return s_check(msg);
}

/* --- encoding -------------------------------------------------------------------------------- */

static semoe_rc s_range(const char *field, uint64_t v, uint64_t limit)
{
    return semoe_err(SEMOE_EINVAL, "proto: %s=%" PRIu64 " is out of range (max %" PRIu64 ")",
                     field, v, limit);
}

static semoe_rc s_wr_U32(msgpack_packer *pk, const char *f, uint32_t v, uint64_t limit)
{
    if (v > limit)
        return s_range(f, v, limit);
    return msgpack_pack_uint32(pk, v) ? semoe_err(SEMOE_ENOMEM, "proto: pack") : SEMOE_OK;
}

static semoe_rc s_wr_U64(msgpack_packer *pk, const char *f, uint64_t v, uint64_t limit)
{
    if (v > limit)
        return s_range(f, v, limit);
    return msgpack_pack_uint64(pk, v) ? semoe_err(SEMOE_ENOMEM, "proto: pack") : SEMOE_OK;
}

static semoe_rc s_wr_F64(msgpack_packer *pk, const char *f, double v, uint64_t limit)
{
    (void)f, (void)limit;
    return msgpack_pack_double(pk, v) ? semoe_err(SEMOE_ENOMEM, "proto: pack") : SEMOE_OK;
}

static semoe_rc s_wr_STR(msgpack_packer *pk, const char *f, const char *s, uint64_t limit)
{
    size_t n = strnlen(s, limit + 1);
    if (n > limit)
        return semoe_err(SEMOE_EINVAL, "proto: %s is longer than %" PRIu64 " bytes", f, limit);
    if (msgpack_pack_str(pk, n) || msgpack_pack_str_body(pk, s, n))
        return semoe_err(SEMOE_ENOMEM, "proto: pack");
    return SEMOE_OK;
}

static semoe_rc s_wr_BYTES(msgpack_packer *pk, const char *f, proto_bytes_t b, uint64_t limit)
{
    if (b.size > limit)
        return s_range(f, b.size, limit);
    if (msgpack_pack_bin(pk, b.size) || (b.size && msgpack_pack_bin_body(pk, b.data, b.size)))
        return semoe_err(SEMOE_ENOMEM, "proto: pack");
    return SEMOE_OK;
}

static semoe_rc s_wr_U32S(msgpack_packer *pk, const char *f, proto_u32s_t a, uint64_t limit)
{
    if (a.count > limit)
        return s_range(f, a.count, limit);
    if (msgpack_pack_bin(pk, (size_t)a.count * 4))
        return semoe_err(SEMOE_ENOMEM, "proto: pack");
    if (!a.values) /* re-encoding a decoded view: already little-endian */
        return a.count && msgpack_pack_bin_body(pk, a.data, (size_t)a.count * 4)
                   ? semoe_err(SEMOE_ENOMEM, "proto: pack")
                   : SEMOE_OK;
    uint8_t chunk[1024];
    for (uint32_t i = 0; i < a.count;) {
        uint32_t k = 0;
        for (; k < sizeof chunk / 4 && i < a.count; k++, i++) {
            uint32_t v = a.values[i];
            chunk[4 * k] = (uint8_t)v, chunk[4 * k + 1] = (uint8_t)(v >> 8);
            chunk[4 * k + 2] = (uint8_t)(v >> 16), chunk[4 * k + 3] = (uint8_t)(v >> 24);
        }
        if (msgpack_pack_bin_body(pk, chunk, 4 * k))
            return semoe_err(SEMOE_ENOMEM, "proto: pack");
    }
    return SEMOE_OK;
}

static semoe_rc s_wr_PEERS(msgpack_packer *pk, const char *f, proto_peers_t p, uint64_t limit)
{
    if (p.count > limit)
        return s_range(f, p.count, limit);
    if (msgpack_pack_array(pk, p.count))
        return semoe_err(SEMOE_ENOMEM, "proto: pack");
    if (!p.ids) /* re-encoding a decoded view */
        return p.size && msgpack_pack_bin_body(pk, p.data, p.size)
                   ? semoe_err(SEMOE_ENOMEM, "proto: pack")
                   : SEMOE_OK;
    for (uint32_t i = 0; i < p.count; i++) {
        if (msgpack_pack_array(pk, 2))
            return semoe_err(SEMOE_ENOMEM, "proto: pack");
        SEMOE_CHECK(s_wr_STR(pk, "peers.id", p.ids[i], PROTO_MAX_NAME));
        SEMOE_CHECK(s_wr_STR(pk, "peers.endpoint", p.endpoints[i], PROTO_MAX_ENDPOINT));
    }
    return SEMOE_OK;
}

#define S_ENCODE_FIELD(kind, name, limit)                                                    \
    SEMOE_CHECK(s_wr_##kind(pk, #name, body->name, limit));
#define S_ENCODE_BODY(TYPE, name, FIELDS)                                                    \
    static semoe_rc s_encode_##name(msgpack_packer *pk, const proto_##name##_t *body)        \
    {                                                                                        \
        FIELDS(S_ENCODE_FIELD)                                                               \
        return SEMOE_OK;                                                                     \
    }
PROTO_TYPES(S_ENCODE_BODY)

static semoe_rc s_encode_header(msgpack_packer *pk, const proto_header_t *h)
{
    if (h->type == 0 || h->type >= PROTO_TYPE_END)
        return semoe_err(SEMOE_EINVAL, "proto: cannot encode message type %u", h->type);
    if (msgpack_pack_array(pk, PROTO_HEADER_FIELDS + s_types[h->type].fields) ||
        msgpack_pack_uint32(pk, PROTO_MAGIC) || msgpack_pack_uint32(pk, PROTO_VERSION) ||
        msgpack_pack_uint32(pk, h->type) || msgpack_pack_uint64(pk, h->run_id) ||
        msgpack_pack_uint64(pk, h->generation) || msgpack_pack_uint64(pk, h->seq))
        return semoe_err(SEMOE_ENOMEM, "proto: pack");
    return SEMOE_OK;
}

semoe_rc proto_encode(const proto_msg_t *msg, msgpack_sbuffer *out)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
    size_t start = out->size;
    SEMOE_CHECK(s_encode_header(&pk, &msg->hdr));
    semoe_rc rc;
    switch (msg->hdr.type) {
#define S_ENCODE_CASE(TYPE, name, FIELDS)                                                    \
    case TYPE:                                                                               \
        rc = s_encode_##name(&pk, &msg->name);                                               \
        break;
        PROTO_TYPES(S_ENCODE_CASE)
    default:
        rc = SEMOE_EINVAL;
    }
    SEMOE_CHECK(rc);
    /* What we send must pass the decoder a peer runs: check the relations now, where the
     * mistake is ours, not at the peer. PLANs are checked once, by proto_plan_encode_shared. */
    if (msg->hdr.type != PROTO_PLAN) {
        proto_msg_t check;
        proto_result_t r = proto_decode(out->data + start, out->size - start, &check);
        if (r != PROTO_OK)
            return semoe_err(SEMOE_EINVAL, "proto: refusing to send a %s: %s",
                             proto_type_name(msg->hdr.type), proto_result_str(r));
    }
    return SEMOE_OK;
}

/* The PLAN body after rank, field by field, in table order. */
#define S_PLAN_SHARED_FIELD(kind, name, limit)                                               \
    if (strcmp(#name, "rank") != 0)                                                          \
        SEMOE_CHECK(s_wr_##kind(&pk, #name, plan->name, limit));

semoe_rc proto_plan_encode_shared(const proto_plan_t *plan, msgpack_sbuffer *shared)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, shared, msgpack_sbuffer_write);
    size_t start = shared->size;
    PROTO_PLAN_FIELDS(S_PLAN_SHARED_FIELD)
    /* Check the whole plan once, as every worker's decoder will. */
    msgpack_sbuffer whole;
    msgpack_sbuffer_init(&whole);
    msgpack_sbuffer body = {.size = shared->size - start, .data = shared->data + start};
    proto_header_t h = {.type = PROTO_PLAN};
    semoe_rc rc = proto_plan_encode_for(&h, PROTO_NO_RANK, &body, &whole);
    proto_msg_t check;
    proto_result_t r = rc == SEMOE_OK ? proto_decode(whole.data, whole.size, &check) : PROTO_OK;
    msgpack_sbuffer_destroy(&whole);
    SEMOE_CHECK(rc);
    if (r != PROTO_OK)
        return semoe_err(SEMOE_EINVAL, "proto: refusing to send an inconsistent PLAN: %s",
                         proto_result_str(r));
    return SEMOE_OK;
}

semoe_rc proto_plan_encode_for(const proto_header_t *hdr, uint32_t rank,
                               const msgpack_sbuffer *shared, msgpack_sbuffer *out)
{
    /* The shared body starts with world: a rank must be below it. */
    proto_reader_t r = proto_reader(shared->data, shared->size);
    uint64_t world;
    if (proto_read_uint(&r, &world) != PROTO_OK)
        return semoe_err(SEMOE_EINVAL, "proto: PLAN body does not start with world");
    if (rank >= world && rank != PROTO_NO_RANK)
        return semoe_err(SEMOE_EINVAL, "proto: PLAN rank %u >= world %" PRIu64, rank, world);
    proto_header_t h = *hdr;
    h.type = PROTO_PLAN;
    msgpack_packer pk;
    msgpack_packer_init(&pk, out, msgpack_sbuffer_write);
    SEMOE_CHECK(s_encode_header(&pk, &h));
    if (msgpack_pack_uint32(&pk, rank) || msgpack_sbuffer_write(out, shared->data, shared->size))
        return semoe_err(SEMOE_ENOMEM, "proto: pack");
    return SEMOE_OK;
}

/* --- printing -------------------------------------------------------------------------------- */

static void s_pr_U32(FILE *f, const char *n, uint32_t v) { fprintf(f, " %s=%u", n, v); }
static void s_pr_U64(FILE *f, const char *n, uint64_t v) { fprintf(f, " %s=%" PRIu64, n, v); }
static void s_pr_F64(FILE *f, const char *n, double v) { fprintf(f, " %s=%g", n, v); }
static void s_pr_STR(FILE *f, const char *n, const char *v) { fprintf(f, " %s=\"%s\"", n, v); }
static void s_pr_BYTES(FILE *f, const char *n, proto_bytes_t v)
{
    fprintf(f, " %s=<%u bytes>", n, v.size);
}
static void s_pr_U32S(FILE *f, const char *n, proto_u32s_t v)
{
    fprintf(f, " %s=[", n);
    for (uint32_t i = 0; i < v.count && i < 8; i++)
        fprintf(f, "%s%u", i ? "," : "", v.values ? v.values[i] : proto_u32_at(v, i));
    fprintf(f, "%s](%u)", v.count > 8 ? ",..." : "", v.count);
}
static void s_pr_PEERS(FILE *f, const char *n, proto_peers_t v)
{
    fprintf(f, " %s=<%u peers>", n, v.count);
}

#define S_PRINT_FIELD(kind, name, limit) s_pr_##kind(out, #name, body->name);
#define S_PRINT_BODY(TYPE, name, FIELDS)                                                     \
    static void s_print_##name(FILE *out, const proto_##name##_t *body)                      \
    {                                                                                        \
        FIELDS(S_PRINT_FIELD)                                                                \
    }
PROTO_TYPES(S_PRINT_BODY)

void proto_print(const proto_msg_t *msg, FILE *out)
{
    const proto_header_t *h = &msg->hdr;
    fprintf(out, "%s run=%016" PRIx64 " gen=%" PRIu64 " seq=%" PRIu64,
            proto_type_name(h->type), h->run_id, h->generation, h->seq);
    switch (h->type) {
#define S_PRINT_CASE(TYPE, name, FIELDS)                                                     \
    case TYPE:                                                                               \
        s_print_##name(out, &msg->name);                                                     \
        break;
        PROTO_TYPES(S_PRINT_CASE)
    default:
        break;
    }
    fputc('\n', out);
}

/* --- sockets --------------------------------------------------------------------------------- */

static void s_free(void *data, void *hint)
{
    (void)hint;
    free(data);
}

semoe_rc proto_send_sbuf(void *sock, const void *identity, size_t identity_len,
                         msgpack_sbuffer *sb)
{
    size_t size = sb->size;
    char *data = msgpack_sbuffer_release(sb);
    zmq_msg_t m;
    if (zmq_msg_init_data(&m, data, size, s_free, NULL) != 0) {
        free(data);
        return semoe_err(SEMOE_ENOMEM, "proto: zmq_msg_init_data: %s", zmq_strerror(zmq_errno()));
    }
    /* Never block the sender's loop: a peer whose queue is full loses this message, which
     * heartbeats and liveness are built to survive. */
    if (identity && zmq_send(sock, identity, identity_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return semoe_err(SEMOE_EIO, "proto: send: %s", zmq_strerror(zmq_errno()));
    }
    if (zmq_msg_send(&m, sock, ZMQ_DONTWAIT) < 0) {
        int e = zmq_errno();
        zmq_msg_close(&m);
        return semoe_err(SEMOE_EIO, "proto: send: %s", zmq_strerror(e));
    }
    return SEMOE_OK;
}

semoe_rc proto_send(void *sock, const void *identity, size_t identity_len, const proto_msg_t *msg)
{
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    semoe_rc rc = proto_encode(msg, &sb);
    if (rc == SEMOE_OK)
        rc = proto_send_sbuf(sock, identity, identity_len, &sb);
    msgpack_sbuffer_destroy(&sb);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

semoe_rc proto_socket_setup(void *sock)
{
    int64_t max = PROTO_MAX_MSG;
    int linger = 0;
    ZMQ_CHECK(zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &max, sizeof max));
    ZMQ_CHECK(zmq_setsockopt(sock, ZMQ_LINGER, &linger, sizeof linger));
    return SEMOE_OK;
}
