/* proto/: every message type round-trips on random contents; every malformation is refused
 * with its own result; msgpack bombs are refused without allocating; PLANs encoded from a
 * shared body equal PLANs encoded whole. `test_proto --write-corpus DIR` writes fuzz seeds. */
#include <malloc.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "proto/msg.h"
#include "tests/harness.h"

/* Storage for the views a random message points into. */
typedef struct {
    char strs[4][64];
    uint8_t bytes[512];
    uint32_t u32[3][300];
    char ids[16][32];
    char eps[16][64];
    const char *idp[16];
    const char *epp[16];
    char don_ids[4][32]; /* a PLAN's donors */
    char don_eps[4][64];
    const char *don_idp[4];
    const char *don_epp[4];
} store_t;

static void s_rand_str(char *out, size_t max)
{
    size_t n = 1 + test_rand_below(max - 1);
    for (size_t i = 0; i < n; i++)
        out[i] = (char)(' ' + 1 + test_rand_below(94));
    out[n] = 0;
}

static uint64_t s_rand_u64(uint64_t limit)
{
    uint64_t v = test_rand() >> test_rand_below(64);
    return limit == UINT64_MAX ? v : v % (limit + 1);
}

/* Any double, NaN (quiet, with a payload) and infinities among them: the wire keeps the bits. */
static double s_rand_f64(void)
{
    switch (test_rand_below(8)) {
    case 0:
        return NAN;
    case 1: {
        uint64_t bits = 0x7ff8000000000000ull | (test_rand() & 0x0007ffffffffffffull);
        double v;
        memcpy(&v, &bits, sizeof v);
        return v;
    }
    case 2:
        return test_rand_below(2) ? INFINITY : -INFINITY;
    case 3:
        return -1e6 * test_rand_unit();
    case 4:
        return ldexp(test_rand_unit(), (int)test_rand_below(2000) - 1000);
    default:
        return 10 * test_rand_unit();
    }
}

/* Fills a field with random contents within its limit. */
#define FILL_U32(f, limit) f = (uint32_t)s_rand_u64(limit)
#define FILL_U64(f, limit) f = s_rand_u64(limit)
#define FILL_F64(f, limit) f = s_rand_f64()
#define FILL_STR(f, limit) s_rand_str(f, (limit) < 40 ? (limit) + 1 : 40)
#define FILL_BYTES(f, limit)                                                                 \
    do {                                                                                     \
        uint32_t n_ = (uint32_t)test_rand_below(sizeof st->bytes);                           \
        for (uint32_t i_ = 0; i_ < n_; i_++)                                                 \
            st->bytes[i_] = (uint8_t)test_rand();                                            \
        f = (proto_bytes_t){st->bytes, n_};                                                  \
    } while (0)
#define FILL_U32S(f, limit)                                                                  \
    do {                                                                                     \
        uint32_t *v_ = st->u32[u32_slot++ % 3];                                              \
        uint32_t n_ = (uint32_t)test_rand_below(300);                                        \
        for (uint32_t i_ = 0; i_ < n_; i_++)                                                 \
            v_[i_] = (uint32_t)test_rand();                                                  \
        f = PROTO_U32S(v_, n_);                                                              \
    } while (0)
#define FILL_PEERS(f, limit)                                                                 \
    do {                                                                                     \
        uint32_t n_ = (uint32_t)test_rand_below(16);                                         \
        for (uint32_t i_ = 0; i_ < n_; i_++) {                                               \
            s_rand_str(st->ids[i_], 32), s_rand_str(st->eps[i_], 64);                        \
            st->idp[i_] = st->ids[i_], st->epp[i_] = st->eps[i_];                            \
        }                                                                                    \
        f = PROTO_PEERS(st->idp, st->epp, n_);                                               \
    } while (0)
#define FILL_FIELD(kind, name, limit) FILL_##kind(body->name, limit);
#define FILL_BODY(TYPE, name, FIELDS)                                                        \
    static void s_fill_##name(proto_##name##_t *body, store_t *st)                           \
    {                                                                                        \
        int u32_slot = 0;                                                                    \
        (void)st, (void)u32_slot;                                                            \
        FIELDS(FILL_FIELD)                                                                   \
    }
PROTO_TYPES(FILL_BODY)

/* A consistent PLAN: world workers, L x E experts, each held by 1..3 ranks. */
static void s_fill_plan_consistent(proto_plan_t *p, store_t *st)
{
    uint32_t world = 1 + (uint32_t)test_rand_below(12);
    uint32_t L = 1 + (uint32_t)test_rand_below(4), E = 1 + (uint32_t)test_rand_below(16);
    uint32_t *boff = st->u32[0], *hoff = st->u32[1], *holders = st->u32[2];
    uint32_t batch = (uint32_t)test_rand_below(1000);
    for (uint32_t r = 0; r <= world; r++)
        boff[r] = (uint32_t)((uint64_t)batch * r / world);
    uint32_t nh = 0;
    for (uint32_t e = 0; e < L * E; e++) {
        hoff[e] = nh;
        uint32_t k = 1 + (uint32_t)test_rand_below(3);
        for (uint32_t j = 0; j < k && nh < 300; j++)
            holders[nh++] = (uint32_t)test_rand_below(world);
    }
    hoff[L * E] = nh;
    for (uint32_t r = 0; r < world; r++) {
        s_rand_str(st->ids[r], 32), s_rand_str(st->eps[r], 64);
        st->idp[r] = st->ids[r], st->epp[r] = st->eps[r];
    }
    uint32_t donors = (uint32_t)test_rand_below(5); /* workers leaving with their state */
    for (uint32_t d = 0; d < donors; d++) {
        s_rand_str(st->don_ids[d], 32), s_rand_str(st->don_eps[d], 64);
        st->don_idp[d] = st->don_ids[d], st->don_epp[d] = st->don_eps[d];
    }
    *p = (proto_plan_t){.rank = test_rand_below(4) ? (uint32_t)test_rand_below(world)
                                                   : PROTO_NO_RANK,
                        .world = world, .num_layers = L, .num_experts = E,
                        .step = s_rand_u64(UINT64_MAX), .global_batch = batch,
                        .batch_offsets = PROTO_U32S(boff, world + 1),
                        .holder_offsets = PROTO_U32S(hoff, L * E + 1),
                        .holders = PROTO_U32S(holders, nh),
                        .peers = PROTO_PEERS(st->idp, st->epp, world),
                        .donors = PROTO_PEERS(st->don_idp, st->don_epp, donors)};
}

/* A random message of a type that passes the per-type checks. */
static void s_random_msg(uint32_t type, proto_msg_t *m, store_t *st)
{
    memset(m, 0, sizeof *m);
    m->hdr = (proto_header_t){type, test_rand(), s_rand_u64(UINT64_MAX), test_rand()};
    switch (type) {
#define FILL_CASE(TYPE, name, FIELDS)                                                        \
    case TYPE:                                                                               \
        s_fill_##name(&m->name, st);                                                         \
        break;
        PROTO_TYPES(FILL_CASE)
    }
    if (type == PROTO_JOIN)
        strcpy(m->join.device_kind, test_rand_below(2) ? "cpu" : "cuda");
    if (type == PROTO_WELCOME)
        m->welcome.heartbeat_ms += !m->welcome.heartbeat_ms, m->welcome.liveness += !m->welcome.liveness;
    if (type == PROTO_PLAN)
        s_fill_plan_consistent(&m->plan, st);
    if (type == PROTO_COMM && !m->comm.comm_id.size)
        m->comm.comm_id = (proto_bytes_t){(const uint8_t *)"x", 1};
    if (type == PROTO_COMM)
        m->comm.world += !m->comm.world;
    if (type == PROTO_ACK)
        m->ack.acked_type = 1 + (uint32_t)test_rand_below(PROTO_TYPE_END - 1);
    if (type == PROTO_ERROR)
        m->error.code += !m->error.code;
}

/* Field-by-field equality of an encoded message and its decoding. */
static bool s_eq_u32s(proto_u32s_t a, proto_u32s_t b)
{
    if (a.count != b.count)
        return false;
    for (uint32_t i = 0; i < a.count; i++)
        if ((a.values ? a.values[i] : proto_u32_at(a, i)) !=
            (b.values ? b.values[i] : proto_u32_at(b, i)))
            return false;
    return true;
}
static bool s_eq_peers(proto_peers_t a, proto_peers_t b)
{
    if (a.count != b.count)
        return false;
    size_t pos = 0;
    char id[PROTO_MAX_NAME + 1], ep[PROTO_MAX_ENDPOINT + 1];
    for (uint32_t i = 0; i < b.count; i++) {
        if (!proto_peers_next(&b, &pos, id, ep))
            return false;
        if (strcmp(id, a.ids[i]) || strcmp(ep, a.endpoints[i]))
            return false;
    }
    return !proto_peers_next(&b, &pos, id, ep);
}
/* The same bits: NaN equals itself, and -0 differs from 0, as the wire keeps them. */
static bool s_eq_f64(double a, double b) { return memcmp(&a, &b, sizeof a) == 0; }
#define EQ_U32(a, b) ((a) == (b))
#define EQ_U64(a, b) ((a) == (b))
#define EQ_F64(a, b) s_eq_f64(a, b)
#define EQ_STR(a, b) (strcmp(a, b) == 0)
#define EQ_BYTES(a, b) ((a).size == (b).size && (!(a).size || !memcmp((a).data, (b).data, (a).size)))
#define EQ_U32S(a, b) s_eq_u32s(a, b)
#define EQ_PEERS(a, b) s_eq_peers(a, b)
#define EQ_FIELD(kind, name, limit)                                                          \
    if (!EQ_##kind(a->name, b->name)) {                                                      \
        fprintf(stderr, "field %s differs\n", #name);                                        \
        return false;                                                                        \
    }
#define EQ_BODY(TYPE, name, FIELDS)                                                          \
    static bool s_eq_##name(const proto_##name##_t *a, const proto_##name##_t *b)            \
    {                                                                                        \
        FIELDS(EQ_FIELD)                                                                     \
        return true;                                                                         \
    }
PROTO_TYPES(EQ_BODY)

static bool s_eq(const proto_msg_t *a, const proto_msg_t *b)
{
    if (memcmp(&a->hdr, &b->hdr, sizeof a->hdr))
        return false;
    switch (a->hdr.type) {
#define EQ_CASE(TYPE, name, FIELDS)                                                          \
    case TYPE:                                                                               \
        return s_eq_##name(&a->name, &b->name);
        PROTO_TYPES(EQ_CASE)
    }
    return false;
}

static size_t s_heap_in_use(void)
{
    struct mallinfo2 mi = mallinfo2();
    return mi.uordblks;
}

static void test_round_trips(void)
{
    store_t st;
    for (int it = 0; it < 2000; it++) {
        uint32_t type = 1 + (uint32_t)test_rand_below(PROTO_TYPE_END - 1);
        proto_msg_t m, d;
        s_random_msg(type, &m, &st);
        msgpack_sbuffer sb;
        msgpack_sbuffer_init(&sb);
        semoe_rc rc = type == PROTO_PLAN ? SEMOE_OK : proto_encode(&m, &sb);
        if (type == PROTO_PLAN) {
            msgpack_sbuffer shared;
            msgpack_sbuffer_init(&shared);
            rc = proto_plan_encode_shared(&m.plan, &shared);
            if (rc == SEMOE_OK)
                rc = proto_plan_encode_for(&m.hdr, m.plan.rank, &shared, &sb);
            /* The PLAN encoded whole is the same bytes. */
            msgpack_sbuffer whole;
            msgpack_sbuffer_init(&whole);
            CHECK(proto_encode(&m, &whole) == SEMOE_OK, "%s", semoe_err_msg());
            CHECK(whole.size == sb.size && !memcmp(whole.data, sb.data, sb.size),
                  "PLAN shared+rank differs from PLAN whole");
            msgpack_sbuffer_destroy(&whole);
            msgpack_sbuffer_destroy(&shared);
        }
        CHECK(rc == SEMOE_OK, "encode %s: %s", proto_type_name(type), semoe_err_msg());
        size_t before = s_heap_in_use();
        proto_result_t r = proto_decode(sb.data, sb.size, &d);
        CHECK(s_heap_in_use() == before, "decode allocated");
        CHECK(r == PROTO_OK, "decode %s: %s", proto_type_name(type), proto_result_str(r));
        if (r == PROTO_OK)
            CHECK(s_eq(&m, &d), "round trip of %s differs", proto_type_name(type));
        /* Every proper prefix is refused, and never as OK. */
        for (size_t cut = 0; cut < sb.size; cut += 1 + test_rand_below(1 + sb.size / 16)) {
            r = proto_decode(sb.data, cut, &d);
            CHECK(r == PROTO_ETRUNCATED || r == PROTO_ECOUNT || r == PROTO_EFIELDS ||
                      r == PROTO_EMAGIC,
                  "%s cut at %zu/%zu: %s", proto_type_name(type), cut, sb.size,
                  proto_result_str(r));
        }
        /* A trailing byte is refused. */
        msgpack_sbuffer_write(&sb, "\0", 1);
        CHECK(proto_decode(sb.data, sb.size, &d) == PROTO_ETRAILING, "trailing byte accepted");
        msgpack_sbuffer_destroy(&sb);
    }
}

/* Encodes a header with a given magic/version/type and n extra fields of value 0. */
static void s_raw_header(msgpack_sbuffer *sb, uint64_t magic, uint64_t version, uint64_t type,
                         uint32_t fields)
{
    msgpack_packer pk;
    msgpack_packer_init(&pk, sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, 6 + fields);
    msgpack_pack_uint64(&pk, magic);
    msgpack_pack_uint64(&pk, version);
    msgpack_pack_uint64(&pk, type);
    msgpack_pack_uint64(&pk, 1);
    msgpack_pack_uint64(&pk, 2);
    msgpack_pack_uint64(&pk, 3);
    for (uint32_t i = 0; i < fields; i++)
        msgpack_pack_uint64(&pk, 0);
}

static proto_result_t s_decode_bytes(const char *hex)
{
    uint8_t buf[4096];
    size_t n = 0;
    for (const char *p = hex; *p && n < sizeof buf;) {
        if (*p == ' ') {
            p++;
            continue;
        }
        unsigned v;
        sscanf(p, "%2x", &v);
        buf[n++] = (uint8_t)v;
        p += 2;
    }
    proto_msg_t m;
    return proto_decode(buf, n, &m);
}

/* Decodes a HEARTBEAT written field by field into *m (NULL: a scratch one): load bytes
 * load[0..n), loss written as kind ('d' double, 'f' float 32, 'n' NaN, 's' string, 'a' array,
 * 'i' integer; 'o': the old shape, nothing after load), then eval_loss 2, eval_step 7,
 * tokens_per_s 1234.5 and phase. */
static proto_result_t s_heartbeat_raw(const char *load, uint32_t n, char kind, uint32_t phase,
                                      proto_msg_t *m)
{
    proto_msg_t scratch;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    msgpack_pack_array(&pk, kind == 'o' ? 6 + 6 : 6 + 11);
    msgpack_pack_uint32(&pk, PROTO_MAGIC);
    msgpack_pack_uint32(&pk, PROTO_VERSION);
    msgpack_pack_uint32(&pk, PROTO_HEARTBEAT);
    for (int i = 0; i < 3 + 5; i++) /* run, generation, seq; step .. mem_ssd */
        msgpack_pack_uint64(&pk, (uint64_t)i);
    msgpack_pack_bin_with_body(&pk, load, n);
    if (kind != 'o') {
        switch (kind) {
        case 'f': msgpack_pack_float(&pk, 2.5f); break;
        case 'n': msgpack_pack_double(&pk, NAN); break;
        case 's': msgpack_pack_str_with_body(&pk, "x", 1); break;
        case 'a': msgpack_pack_array(&pk, 1), msgpack_pack_double(&pk, 1); break;
        case 'i': msgpack_pack_uint32(&pk, 3); break;
        default: msgpack_pack_double(&pk, 3.25); break;
        }
        msgpack_pack_double(&pk, 2.0);    /* eval_loss */
        msgpack_pack_uint64(&pk, 7);      /* eval_step */
        msgpack_pack_double(&pk, 1234.5); /* tokens_per_s */
        msgpack_pack_uint32(&pk, phase);
    }
    proto_result_t r = proto_decode(sb.data, sb.size, m ? m : &scratch);
    msgpack_sbuffer_destroy(&sb);
    return r;
}

static void test_malformed(void)
{
    proto_msg_t m;
    msgpack_sbuffer sb;
    /* Header checks, each with its own result. */
    msgpack_sbuffer_init(&sb);
    s_raw_header(&sb, 0x12345678, PROTO_VERSION, PROTO_PAUSE, 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_EMAGIC, "bad magic");
    msgpack_sbuffer_clear(&sb);
    s_raw_header(&sb, PROTO_MAGIC, 99, PROTO_PAUSE, 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_EVERSION, "bad version");
    msgpack_sbuffer_clear(&sb);
    s_raw_header(&sb, PROTO_MAGIC, PROTO_VERSION, 0, 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_ETYPE, "type 0");
    msgpack_sbuffer_clear(&sb);
    s_raw_header(&sb, PROTO_MAGIC, PROTO_VERSION, PROTO_TYPE_END, 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_ETYPE, "type too large");
    msgpack_sbuffer_clear(&sb);
    s_raw_header(&sb, PROTO_MAGIC, PROTO_VERSION, PROTO_PAUSE, 2);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_EFIELDS, "too many fields");
    msgpack_sbuffer_clear(&sb);
    s_raw_header(&sb, PROTO_MAGIC, PROTO_VERSION, PROTO_PAUSE, 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_OK, "valid PAUSE refused");
    msgpack_sbuffer_destroy(&sb);

    /* A string where a number goes; a nested array where a scalar goes. */
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    s_raw_header(&sb, PROTO_MAGIC, PROTO_VERSION, PROTO_PAUSE, 0);
    sb.data[0] = (char)0x97; /* fixarray of 7: header + step */
    msgpack_pack_str_with_body(&pk, "x", 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_EKIND, "string as step");
    sb.size -= 2;
    msgpack_pack_array(&pk, 1);
    msgpack_pack_uint32(&pk, 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_EDEPTH, "array as step");
    sb.size -= 2;
    msgpack_pack_int32(&pk, -5);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_ERANGE, "negative step");
    sb.size -= 1;
    msgpack_sbuffer_write(&sb, "\xc1", 1);
    CHECK(proto_decode(sb.data, sb.size, &m) == PROTO_EBYTE, "0xc1");
    msgpack_sbuffer_destroy(&sb);

    /* Bombs: counts and lengths far beyond the bytes, at the top and inside a header. */
    size_t before = s_heap_in_use();
    CHECK(s_decode_bytes("dd ff 00 00 00") == PROTO_ECOUNT, "array32 bomb");
    CHECK(s_decode_bytes("dc ff ff") == PROTO_ECOUNT, "array16 bomb");
    CHECK(s_decode_bytes("df ff ff ff ff") == PROTO_EMAGIC, "map32 at top");
    CHECK(s_decode_bytes("c6 ff ff ff ff") == PROTO_EMAGIC, "bin32 at top");
    CHECK(s_decode_bytes("") == PROTO_ETRUNCATED, "empty");
    CHECK(s_decode_bytes("dd") == PROTO_ETRUNCATED, "cut array32 header");
    /* ERROR whose text claims 4 GB. */
    CHECK(s_decode_bytes("98 ce 53 4d 4f 45 01 0b 00 00 00 01 db ff ff ff ff") == PROTO_ECOUNT,
          "str32 bomb in ERROR");
    /* ERROR whose code is a deep nest. */
    CHECK(s_decode_bytes("98 ce 53 4d 4f 45 01 0b 00 00 00 91 91 91 91 91 91 91 91 91 91 00") ==
              PROTO_EDEPTH,
          "nest in ERROR");
    /* JOIN (16 fields) with a 4 GB host name. */
    CHECK(s_decode_bytes("dc 00 10 ce 53 4d 4f 45 01 01 00 00 00 a1 77 db ff ff ff ff") ==
              PROTO_ECOUNT,
          "str32 bomb in JOIN");
    CHECK(s_heap_in_use() == before, "bombs allocated");

    /* HEARTBEATs written field by field: a load whose bin is not a whole number of u32, F64
     * fields as float 32, a string or a container, NaN, a phase beyond the last. */
    CHECK(s_heartbeat_raw("abc", 3, 'd', 1, NULL) == PROTO_ERANGE, "load of 3 bytes");
    CHECK(s_heartbeat_raw("abcd", 4, 'd', 3, NULL) == PROTO_OK, "valid HEARTBEAT refused");
    CHECK(s_heartbeat_raw("abcd", 4, 'f', 2, NULL) == PROTO_OK, "float 32 loss refused");
    CHECK(s_heartbeat_raw("abcd", 4, 's', 1, NULL) == PROTO_EKIND, "string as loss");
    CHECK(s_heartbeat_raw("abcd", 4, 'a', 1, NULL) == PROTO_EDEPTH, "array as loss");
    CHECK(s_heartbeat_raw("abcd", 4, 'i', 1, NULL) == PROTO_EKIND, "integer as loss");
    CHECK(s_heartbeat_raw("abcd", 4, 'd', PROTO_PHASE_END, NULL) == PROTO_ERANGE,
          "phase past the last");
    CHECK(s_heartbeat_raw("abcd", 4, 'd', PROTO_PHASE_PAUSED, NULL) == PROTO_OK,
          "phase paused refused");
    CHECK(s_heartbeat_raw("abcd", 4, 'o', 0, NULL) == PROTO_EFIELDS, "HEARTBEAT of the old shape");
    proto_msg_t hb;
    CHECK(s_heartbeat_raw("abcd", 4, 'n', 1, &hb) == PROTO_OK && isnan(hb.heartbeat.loss) &&
              hb.heartbeat.eval_loss == 2.0 && hb.heartbeat.eval_step == 7 &&
              hb.heartbeat.tokens_per_s == 1234.5 && hb.heartbeat.phase == PROTO_PHASE_TRAINING,
          "HEARTBEAT fields read back wrong");

    /* Random bytes never crash and never decode as anything but a result code. */
    uint8_t buf[256];
    for (int it = 0; it < 20000; it++) {
        size_t n = test_rand_below(sizeof buf);
        for (size_t i = 0; i < n; i++)
            buf[i] = (uint8_t)test_rand();
        if (n && test_rand_below(2))
            buf[0] = (uint8_t)(0x90 + test_rand_below(16));
        proto_result_t r = proto_decode(buf, n, &m);
        CHECK(r < PROTO_RESULT_END, "result %d", r);
    }
}

/* An inconsistent PLAN or an out-of-range field is refused by the encoder, not sent. */
static void test_encoder_refuses(void)
{
    store_t st;
    proto_msg_t m;
    s_random_msg(PROTO_PLAN, &m, &st);
    m.plan.holders.count = 0; /* offsets no longer match */
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    CHECK(proto_plan_encode_shared(&m.plan, &sb) != SEMOE_OK, "inconsistent PLAN encoded");
    msgpack_sbuffer_clear(&sb);
    s_random_msg(PROTO_WELCOME, &m, &st);
    m.welcome.liveness = 5000;
    CHECK(proto_encode(&m, &sb) == SEMOE_EINVAL && strstr(semoe_err_msg(), "liveness"),
          "liveness out of range encoded: %s", semoe_err_msg());
    msgpack_sbuffer_clear(&sb);
    s_random_msg(PROTO_JOIN, &m, &st);
    strcpy(m.join.device_kind, "tpu");
    CHECK(proto_encode(&m, &sb) == SEMOE_EINVAL, "device tpu encoded");
    msgpack_sbuffer_clear(&sb);
    s_random_msg(PROTO_LEAVE, &m, &st);
    m.leave.handover = 2; /* a flag: 0 or 1 */
    CHECK(proto_encode(&m, &sb) == SEMOE_EINVAL && strstr(semoe_err_msg(), "handover"),
          "LEAVE with handover 2 encoded: %s", semoe_err_msg());
    msgpack_sbuffer_destroy(&sb);
}

/* A PLAN for a donor: rank PROTO_NO_RANK, its own id among the donors, none among the peers. */
static void test_plan_donors(void)
{
    store_t st;
    proto_msg_t m, d;
    for (int it = 0; it < 50; it++) {
        s_random_msg(PROTO_PLAN, &m, &st);
        if (m.plan.donors.count == 0)
            continue;
        uint32_t k = (uint32_t)test_rand_below(m.plan.donors.count);
        msgpack_sbuffer shared, sb;
        msgpack_sbuffer_init(&shared);
        msgpack_sbuffer_init(&sb);
        CHECK(proto_plan_encode_shared(&m.plan, &shared) == SEMOE_OK &&
                  proto_plan_encode_for(&m.hdr, PROTO_NO_RANK, &shared, &sb) == SEMOE_OK,
              "PLAN with donors: %s", semoe_err_msg());
        CHECK(proto_decode(sb.data, sb.size, &d) == PROTO_OK && d.plan.rank == PROTO_NO_RANK &&
                  d.plan.donors.count == m.plan.donors.count,
              "a donor's PLAN does not decode as one");
        char id[PROTO_MAX_NAME + 1], ep[PROTO_MAX_ENDPOINT + 1];
        size_t pos = 0;
        uint32_t found = UINT32_MAX;
        for (uint32_t i = 0; proto_peers_next(&d.plan.donors, &pos, id, ep); i++)
            if (found == UINT32_MAX && strcmp(id, st.don_ids[k]) == 0 &&
                strcmp(ep, st.don_eps[k]) == 0)
                found = i;
        CHECK(found <= k, "donor %u not found by its id", k);
        msgpack_sbuffer_destroy(&shared);
        msgpack_sbuffer_destroy(&sb);
    }
}

/* Writes one encoded message of every type (several PLANs) as fuzz seeds. */
static int s_write_corpus(const char *dir)
{
    store_t st;
    mkdir(dir, 0755);
    for (uint32_t type = 1; type < PROTO_TYPE_END; type++) {
        for (int k = 0; k < (type == PROTO_PLAN ? 4 : 1); k++) {
            proto_msg_t m;
            s_random_msg(type, &m, &st);
            msgpack_sbuffer sb;
            msgpack_sbuffer_init(&sb);
            if (proto_encode(&m, &sb) != SEMOE_OK)
                return 1;
            char path[512];
            snprintf(path, sizeof path, "%s/seed-%s-%d", dir, proto_type_name(type), k);
            FILE *f = fopen(path, "wb");
            if (!f)
                return 1;
            fwrite(sb.data, 1, sb.size, f);
            fclose(f);
            msgpack_sbuffer_destroy(&sb);
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    test_init("test_proto");
    if (argc == 3 && strcmp(argv[1], "--write-corpus") == 0)
        return s_write_corpus(argv[2]);
    test_round_trips();
    test_malformed();
    test_encoder_refuses();
    test_plan_donors();
    return test_finish();
}
