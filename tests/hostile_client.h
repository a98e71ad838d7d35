/* The raw clients of test_hostile and the messages they forge: ZeroMQ DEALER sockets on the
 * coordinator's control port that tally every reply, valid messages of any type for the job
 * under attack, and malformed ones (random bytes, msgpack bombs, bad headers, mutants). */
#ifndef SEMOE_TEST_HOSTILE_CLIENT_H
#define SEMOE_TEST_HOSTILE_CLIENT_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/msg.h"

#define HOSTILE_REPLY_MS 3000   /* how long a client waits for the reply it expects */
#define HOSTILE_MAX_EXPERTS 4096 /* layers x experts the forged tables have room for */

/* Replies the hostile clients got. */
typedef struct {
    long total, undecodable, not_error, by_code[8];
} hostile_tally_t;

/* The job under attack, which the test fills in, and what the clients did, which they count. */
typedef struct {
    void *ctx;              /* the test's ZeroMQ context; the clients' sockets live in it */
    const char *control_ep; /* the coordinator's control endpoint */
    uint64_t run_id;        /* the coordinator's, from status */
    uint64_t gen;           /* generation of the settled job before the attack */
    uint32_t layers, experts;
    uint32_t heartbeat_ms;  /* what a forged WELCOME says */
    hostile_tally_t tally;
    long sends, dropped;    /* frames queued, and those a full queue dropped */
} hostile_t;

typedef struct {
    void *sock;
    long sent;
} hostile_client_t;

/* Call once layers and experts are known (at most HOSTILE_MAX_EXPERTS together), before any
 * other call: everything below reads the job from *h and counts into it; h stays the caller's
 * and must outlive the clients. Draws the forged COMM id from the test's random source. */
void hostile_init(hostile_t *h);

/* --- messages --------------------------------------------------------------------------- */

/* A valid message of type (never STOP: from anyone it stops the job, by contract). PAUSE and
 * RESUME carry a step above 1 so that no mutation of their type byte makes a valid STOP. Its
 * tables are views into the module's own arrays. */
void hostile_valid(uint32_t type, uint64_t run, uint64_t gen, proto_msg_t *m);
/* Encodes m into sb (initialised here; the caller destroys it); a failure is a failed CHECK. */
bool hostile_encode(const proto_msg_t *m, msgpack_sbuffer *sb);
/* Any type a hostile client may send valid (all but JOIN, which would make it a member, and
 * STOP). */
uint32_t hostile_rand_nonjoin_type(void);

/* Malformed messages into sb (initialised here; the caller destroys it). */
/* A bomb alone, or inside a valid-looking header after k valid u32 fields, or as the header's
 * own array count. */
void hostile_build_bomb(msgpack_sbuffer *sb);
/* Wrong magic, version or type around a valid HEARTBEAT body, or the magic as a string. */
void hostile_build_bad_header(msgpack_sbuffer *sb);
/* A valid non-JOIN message with random byte changes, insertions or a cut. */
void hostile_build_mutant(msgpack_sbuffer *sb);
/* Valid non-JOIN messages with stale, current and future generations and right, zero and
 * wrong run ids: from a non-member all are refused with ERROR. */
void hostile_build_generation(msgpack_sbuffer *sb);
/* Random bytes, mostly short, sometimes starting like a message's array. */
void hostile_build_random(msgpack_sbuffer *sb);

/* --- clients ---------------------------------------------------------------------------- */

/* Opens c on the control endpoint, with routing_id[0..id_len) as its ZeroMQ routing id when
 * not NULL; a failure is a failed CHECK (and c->sock NULL, which the others ignore). */
void hostile_client_open(hostile_client_t *c, const void *routing_id, size_t id_len);
void hostile_client_close(hostile_client_t *c);
/* Queues one frame (flags: ZMQ_SNDMORE for a part); a full queue drops it (counted). */
void hostile_client_send(hostile_client_t *c, const void *buf, size_t len, int flags);
/* Receives one reply if one comes within timeout_ms; tallies it. Returns its decoded type
 * (0: none or undecodable) and *code for an ERROR. */
uint32_t hostile_client_recv(hostile_client_t *c, int timeout_ms, uint32_t *code);
/* Receives (and tallies) every reply already there. */
void hostile_client_drain(hostile_client_t *c);
/* Sends a valid HEARTBEAT and waits for the ERROR that a non-member gets: the coordinator has
 * then handled everything this client sent before it. */
bool hostile_client_sync(hostile_client_t *c);
/* Sends one valid message and returns the type of the first reply (0: none in
 * HOSTILE_REPLY_MS). */
uint32_t hostile_ask(hostile_client_t *c, const proto_msg_t *m, uint32_t *code);
/* Sends one valid message and reads replies (heartbeats may come first) until an ERROR comes,
 * for HOSTILE_REPLY_MS at most. True when one came (its code in *code); *got is the type of the
 * last reply (0: none). */
bool hostile_ask_error(hostile_client_t *c, const proto_msg_t *m, uint32_t *code, uint32_t *got);
/* A LEAVE from a non-member, then a HEARTBEAT: the only reply may be the HEARTBEAT's
 * NOT_MEMBER (or one for the LEAVE too); CHECKs both, naming what. */
void hostile_leave_then_sync(hostile_client_t *c, const char *what);
/* 3 to 8 frames: garbage, or a valid non-JOIN message followed by garbage. */
void hostile_send_multipart(hostile_client_t *c);
/* Joins as id, takes WELCOME and PLAN; returns the PLAN's generation (0 if it never came) and
 * the coordinator's run id in *run. */
uint64_t hostile_join(hostile_client_t *c, const char *id, uint64_t *run);

#endif
