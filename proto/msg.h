/* Every control message on the wire, defined once in the field tables below: the C struct, the
 * encoder, the strict decoder and the printer are all generated from them.
 *
 * A message is one ZeroMQ frame holding one msgpack array:
 *     [magic, version, type, run_id, generation, seq, field1, field2, ...]
 * with exactly the fields of its type, in table order. Numeric arrays (loads, expert holders)
 * travel as msgpack bin of little-endian u32 so that decoding is a bounds check, not a copy.
 *
 * The decoder never allocates: small strings are copied into fixed buffers in the struct, and
 * bytes/arrays are views into the caller's buffer, valid as long as that buffer is. Every length
 * and count is checked against the bytes left before it is used, so no input can make it read
 * out of bounds or reserve memory (msgpack-c's own unpacker would reserve 96 GB for the five
 * bytes dd ff 00 00 00; we use msgpack-c only to encode). */
#ifndef SEMOE_PROTO_MSG_H
#define SEMOE_PROTO_MSG_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "actors/err.h"

#define PROTO_MAGIC 0x534d4f45u /* "SMOE" */
#define PROTO_VERSION 1u
#define PROTO_MAX_MSG (16 << 20)     /* ZMQ_MAXMSGSIZE on every control socket */
#define PROTO_MAX_NAME 128           /* worker id, device name */
#define PROTO_MAX_HOST 255           /* host name or address */
#define PROTO_MAX_ENDPOINT 255       /* a ZeroMQ endpoint, "tcp://host:port" */
#define PROTO_MAX_TEXT 1024          /* error text, leave reason */
#define PROTO_MAX_WORKERS 65536      /* world size */
#define PROTO_MAX_EXPERTS (1u << 20) /* layers x experts per layer */
#define PROTO_MAX_COMM 4096          /* an opaque communicator id (NCCL's is 128 bytes) */
#define PROTO_NO_RANK 0xffffffffu    /* a PLAN for a worker that holds no rank */
/* Holder entries in a PLAN: each takes 4 bytes of a message of at most PROTO_MAX_MSG, so no
 * PLAN can carry more (the coordinator caps its replicas to fit, coordinator/plan.c). */
#define PROTO_MAX_HOLDERS (PROTO_MAX_MSG / 4)

typedef enum {
    PROTO_JOIN = 1,  /* worker -> coordinator: who I am, what I have */
    PROTO_WELCOME,   /* coordinator -> worker: you are in; liveness settings and the job */
    PROTO_HEARTBEAT, /* both ways: I am alive; workers add their load */
    PROTO_PLAN,      /* coordinator -> worker: the placement of a generation */
    PROTO_COMM,      /* new rank 0 -> coordinator -> all: communicator id of a generation */
    PROTO_ACK,       /* worker -> coordinator: I applied PLAN / COMM / PAUSE of this generation */
    PROTO_PAUSE,     /* coordinator -> worker: stop at a step boundary and report PAUSED */
    PROTO_RESUME,    /* coordinator -> worker: train, from this step */
    PROTO_LEAVE,     /* worker -> coordinator: I am going away (after a handover, or now) */
    PROTO_STOP,      /* admin -> coordinator, coordinator -> worker: checkpoint and stop */
    PROTO_ERROR,     /* either way: what was wrong with what you sent */
    PROTO_TYPE_END
} proto_type_t;

/* What the decoder found wrong; each malformation has its own result. */
typedef enum {
    PROTO_OK = 0,
    PROTO_EMAGIC,     /* not a semoe message */
    PROTO_EVERSION,   /* a version we do not speak */
    PROTO_ETYPE,      /* an unknown message type */
    PROTO_ETRUNCATED, /* the bytes end inside a value */
    PROTO_ECOUNT,     /* an array, map, string or bin claims more than the bytes left */
    PROTO_EDEPTH,     /* a container where the schema has a scalar (nesting deeper than it) */
    PROTO_EKIND,      /* a value of the wrong msgpack kind (a string where a number goes) */
    PROTO_EFIELDS,    /* the wrong number of fields for the type */
    PROTO_ERANGE,     /* a value outside its range, a string too long, an inconsistent table */
    PROTO_ETRAILING,  /* bytes after the message */
    PROTO_EBYTE,      /* a byte that is not msgpack (0xc1) */
    PROTO_RESULT_END
} proto_result_t;

/* ERROR codes. */
enum {
    PROTO_ERR_NOT_MEMBER = 1, /* you sent something other than JOIN and are not a member */
    PROTO_ERR_MALFORMED,      /* your message did not decode */
    PROTO_ERR_REFUSED,        /* your JOIN was refused (duplicate id, bad capabilities) */
    PROTO_ERR_UNEXPECTED,     /* a valid message of a type you must not send */
};

typedef enum { PROTO_TIER_HBM = 0, PROTO_TIER_HOST, PROTO_TIER_SSD, PROTO_TIERS } proto_tier_t;

/* What a worker is doing, in its HEARTBEAT. */
typedef enum {
    PROTO_PHASE_IDLE = 0, /* no plan yet, or not training */
    PROTO_PHASE_TRAINING, /* running steps */
    PROTO_PHASE_FINISHED, /* reached train.steps (its final checkpoint written) */
    PROTO_PHASE_FAILED,   /* training stopped on an error it cannot get past */
    PROTO_PHASE_PAUSED,   /* stopped at a step boundary after a PAUSE, waiting for PLAN/RESUME */
    PROTO_PHASE_STALLED,  /* its generation broke (a peer gone or silent past the collective's
                             bound): it abandoned the step and waits for a new PLAN */
    PROTO_PHASE_END
} proto_phase_t;

/* A view of bytes inside the decoded buffer (or, when encoding, the caller's bytes). */
typedef struct {
    const uint8_t *data;
    uint32_t size;
} proto_bytes_t;

/* A u32 array. Decoded: a view of little-endian bytes (data), read with proto_u32_at.
 * To encode: set values (host order) and count; PROTO_U32S(ptr, n) does that. */
typedef struct {
    const uint8_t *data;
    uint32_t count;
    const uint32_t *values;
} proto_u32s_t;
#define PROTO_U32S(ptr, n) ((proto_u32s_t){.values = (ptr), .count = (uint32_t)(n)})

/* An array of [id, endpoint] pairs. Decoded: a view of the pairs (data, size), walked with
 * proto_peers_next. To encode: set ids, endpoints and count; PROTO_PEERS(ids, eps, n). */
typedef struct {
    const uint8_t *data;
    size_t size;
    uint32_t count;
    const char *const *ids;
    const char *const *endpoints;
} proto_peers_t;
#define PROTO_PEERS(i, e, n) ((proto_peers_t){.ids = (i), .endpoints = (e), .count = (uint32_t)(n)})

/* Field tables: X(kind, name, limit). Kinds: U32, U64 (limit = max value), F64, STR (limit =
 * max length, copied into char[limit + 1]), BYTES (limit = max size), U32S (limit = max count),
 * PEERS (limit = max count). */
#define PROTO_JOIN_FIELDS(X)                                                                 \
    X(STR, id, PROTO_MAX_NAME)                  /* the worker's name, unique in the job */   \
    X(STR, host, PROTO_MAX_HOST)                                                             \
    X(U32, pid, UINT32_MAX)                                                                  \
    X(STR, device_kind, 8)                      /* "cpu" or "cuda" */                        \
    X(STR, device_name, PROTO_MAX_NAME)                                                      \
    X(U32, device_index, 1024)                                                               \
    X(U64, mem_hbm, UINT64_MAX)                 /* bytes per tier the worker offers */       \
    X(U64, mem_host, UINT64_MAX)                                                             \
    X(U64, mem_ssd, UINT64_MAX)                                                              \
    X(STR, data_endpoint, PROTO_MAX_ENDPOINT)   /* where peers reach its data socket */

#define PROTO_WELCOME_FIELDS(X)                                                              \
    X(STR, worker_id, PROTO_MAX_NAME)                                                        \
    X(U32, heartbeat_ms, 3600000)                                                            \
    X(U32, liveness, 1000)                                                                   \
    X(BYTES, job, PROTO_MAX_MSG)                /* the job spec, JSON */

/* A worker's HEARTBEAT says how far it is: step, training steps completed (the next step to
 * run); loss, the training loss (cross-entropy + aux, of the global batch) of its last completed
 * step, NaN before any; eval_loss, the held-out cross-entropy of its last evaluation, measured
 * when eval_step steps were done (NaN and 0 when none yet); tokens_per_s, its own training tokens
 * (targets) per second over its last step. The coordinator's HEARTBEAT carries only step (the
 * job's). F64 fields take any double; the coordinator counts a rate that is not a finite
 * number >= 0 as 0. */
#define PROTO_HEARTBEAT_FIELDS(X)                                                            \
    X(U64, step, UINT64_MAX)                    /* steps completed (the next step to run) */ \
    X(U64, step_time_us, UINT64_MAX)                                                         \
    X(U64, mem_hbm, UINT64_MAX)                 /* bytes in use per tier */                  \
    X(U64, mem_host, UINT64_MAX)                                                             \
    X(U64, mem_ssd, UINT64_MAX)                                                              \
    X(U32S, load, PROTO_MAX_EXPERTS)            /* tokens per expert (layer*E + j) last step */ \
    X(F64, loss, 0)                             /* of the last step; NaN: none yet */        \
    X(F64, eval_loss, 0)                        /* held-out; NaN: no evaluation yet */       \
    X(U64, eval_step, UINT64_MAX)               /* steps done at that evaluation (0: none) */ \
    X(F64, tokens_per_s, 0)                     /* this worker's, over its last step */      \
    X(U32, phase, PROTO_PHASE_END - 1)          /* proto_phase_t */

/* The shared part of a PLAN (all fields after rank) is the same for every worker and is
 * encoded once per generation (proto_plan_encode_shared). donors are the workers that hold
 * training state but get no rank in this generation (they asked to leave with handover): they
 * take part in the migration only, and get this PLAN too, with rank PROTO_NO_RANK. */
#define PROTO_PLAN_FIELDS(X)                                                                 \
    X(U32, rank, UINT32_MAX)                    /* this worker's rank or PROTO_NO_RANK */    \
    X(U32, world, PROTO_MAX_WORKERS)                                                         \
    X(U32, num_layers, 65536)                   /* MoE layers */                             \
    X(U32, num_experts, 65536)                  /* experts per MoE layer */                  \
    X(U64, step, UINT64_MAX)                    /* first step the plan applies to */         \
    X(U64, global_batch, UINT64_MAX)            /* sequences per step */                     \
    X(U32S, batch_offsets, PROTO_MAX_WORKERS + 1) /* rank r takes [off[r], off[r+1]) */      \
    X(U32S, holder_offsets, PROTO_MAX_EXPERTS + 1) /* expert e's holders: [off[e], off[e+1]) */ \
    X(U32S, holders, PROTO_MAX_HOLDERS)         /* ranks, by expert */                       \
    X(PEERS, peers, PROTO_MAX_WORKERS)          /* by rank: [worker id, data endpoint] */    \
    X(PEERS, donors, PROTO_MAX_WORKERS)         /* [id, data endpoint] of each donor */

#define PROTO_COMM_FIELDS(X)                                                                 \
    X(U32, world, PROTO_MAX_WORKERS)                                                         \
    X(BYTES, comm_id, PROTO_MAX_COMM)

/* bytes: for a PLAN, the training state (weights and optimizer moments) this worker received
 * from its peers in the generation's migration; 0 otherwise. */
#define PROTO_ACK_FIELDS(X)                                                                  \
    X(U32, acked_type, PROTO_TYPE_END - 1)      /* what is acked, of the header's generation */ \
    X(U32, status, UINT32_MAX)                  /* 0 = applied */                            \
    X(U64, bytes, UINT64_MAX)

#define PROTO_PAUSE_FIELDS(X) X(U64, step, UINT64_MAX) /* 0: at the next step boundary */
#define PROTO_RESUME_FIELDS(X) X(U64, step, UINT64_MAX)  /* the step training goes on from */
/* handover 1: "I hold training state: plan me out, let me hand it over, then I send LEAVE
 * with handover 0"; 0: gone now. */
#define PROTO_LEAVE_FIELDS(X)                                                                \
    X(STR, reason, PROTO_MAX_TEXT)                                                           \
    X(U32, handover, 1)
#define PROTO_STOP_FIELDS(X) X(U32, checkpoint, 1)    /* 1: checkpoint before stopping */
#define PROTO_ERROR_FIELDS(X)                                                                \
    X(U32, code, UINT32_MAX)                                                                 \
    X(STR, text, PROTO_MAX_TEXT)

/* The list of types: X(TYPE, name, FIELDS). */
#define PROTO_TYPES(X)                                                                       \
    X(PROTO_JOIN, join, PROTO_JOIN_FIELDS)                                                   \
    X(PROTO_WELCOME, welcome, PROTO_WELCOME_FIELDS)                                          \
    X(PROTO_HEARTBEAT, heartbeat, PROTO_HEARTBEAT_FIELDS)                                    \
    X(PROTO_PLAN, plan, PROTO_PLAN_FIELDS)                                                   \
    X(PROTO_COMM, comm, PROTO_COMM_FIELDS)                                                   \
    X(PROTO_ACK, ack, PROTO_ACK_FIELDS)                                                      \
    X(PROTO_PAUSE, pause, PROTO_PAUSE_FIELDS)                                                \
    X(PROTO_RESUME, resume, PROTO_RESUME_FIELDS)                                             \
    X(PROTO_LEAVE, leave, PROTO_LEAVE_FIELDS)                                                \
    X(PROTO_STOP, stop, PROTO_STOP_FIELDS)                                                   \
    X(PROTO_ERROR, error, PROTO_ERROR_FIELDS)

/* The structs, one per type. */
#define PROTO_CTYPE_U32(name, limit) uint32_t name;
#define PROTO_CTYPE_U64(name, limit) uint64_t name;
#define PROTO_CTYPE_F64(name, limit) double name;
#define PROTO_CTYPE_STR(name, limit) char name[(limit) + 1];
#define PROTO_CTYPE_BYTES(name, limit) proto_bytes_t name;
#define PROTO_CTYPE_U32S(name, limit) proto_u32s_t name;
#define PROTO_CTYPE_PEERS(name, limit) proto_peers_t name;
#define PROTO_FIELD_DECL(kind, name, limit) PROTO_CTYPE_##kind(name, limit)
#define PROTO_STRUCT_DECL(TYPE, name, FIELDS)                                                \
    typedef struct {                                                                         \
        FIELDS(PROTO_FIELD_DECL)                                                             \
    } proto_##name##_t;
PROTO_TYPES(PROTO_STRUCT_DECL)

typedef struct {
    uint32_t type;       /* proto_type_t */
    uint64_t run_id;     /* the coordinator run this message belongs to (0 before WELCOME) */
    uint64_t generation; /* the plan generation the sender is in */
    uint64_t seq;        /* per-sender sequence number */
} proto_header_t;

#define PROTO_UNION_MEMBER(TYPE, name, FIELDS) proto_##name##_t name;
typedef struct {
    proto_header_t hdr;
    union {
        PROTO_TYPES(PROTO_UNION_MEMBER)
    };
} proto_msg_t;

/* Decodes buf[0..len) into *msg, allocating nothing: views in *msg point into buf.
 * Returns PROTO_OK, or the first malformation found (and *msg is then unspecified). */
proto_result_t proto_decode(const void *buf, size_t len, proto_msg_t *msg);

/* Encodes *msg (its hdr.type selects the body) at the end of *out. Fails (SEMOE_EINVAL) if
 * a field is out of the table's range, so we never send what a peer would refuse. */
semoe_rc proto_encode(const proto_msg_t *msg, msgpack_sbuffer *out);

/* PLAN in two parts: the shared body (every field after rank) encoded once per generation,
 * then per worker the header and rank with the shared bytes appended. */
semoe_rc proto_plan_encode_shared(const proto_plan_t *plan, msgpack_sbuffer *shared);
semoe_rc proto_plan_encode_for(const proto_header_t *hdr, uint32_t rank,
                               const msgpack_sbuffer *shared, msgpack_sbuffer *out);

/* Value i of a u32 array (i < a.count). */
static inline uint32_t proto_u32_at(proto_u32s_t a, uint32_t i)
{
    const uint8_t *p = a.data + 4 * (size_t)i;
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Walks a decoded PEERS view: the first call with *pos = 0; copies the pair into id and
 * endpoint (NUL-terminated) and returns true, or false after the last pair. */
bool proto_peers_next(const proto_peers_t *peers, size_t *pos, char id[PROTO_MAX_NAME + 1],
                      char endpoint[PROTO_MAX_ENDPOINT + 1]);

const char *proto_type_name(uint32_t type);
/* "idle", "training", "finished", "failed", "paused"; "?" for anything else. */
const char *proto_phase_name(uint32_t phase);
const char *proto_result_str(proto_result_t r);
/* Prints one line, "PLAN gen=3 seq=9 run=... rank=1 world=4 ...", for logs and tests. */
void proto_print(const proto_msg_t *msg, FILE *out);

/* Sends a message over a ZeroMQ socket: for a ROUTER, identity (non-NULL) goes first.
 * The encoded buffer is handed to ZeroMQ without a copy. */
semoe_rc proto_send(void *sock, const void *identity, size_t identity_len,
                    const proto_msg_t *msg);
/* Sends already encoded bytes (for a PLAN from proto_plan_encode_for); takes the sbuffer's
 * data and leaves *sb empty. */
semoe_rc proto_send_sbuf(void *sock, const void *identity, size_t identity_len,
                         msgpack_sbuffer *sb);
/* Sets the options every control socket needs: ZMQ_MAXMSGSIZE = PROTO_MAX_MSG, linger 0. */
semoe_rc proto_socket_setup(void *sock);

#endif
