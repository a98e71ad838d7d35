/* A fake training worker over a raw ZeroMQ DEALER, for the net tests that stand in for
 * workers: it JOINs, stamps what it sends with its run, generation and sequence, ACKs and
 * HEARTBEATs when told, and counts what the coordinator sends it. What to answer, and when, is
 * the test's. */
#ifndef SEMOE_TESTS_FAKE_WORKER_H
#define SEMOE_TESTS_FAKE_WORKER_H

#include <stdbool.h>
#include <stdint.h>
#include <zmq.h>

#include "proto/msg.h"

/* The "model" member of a job that fakes run (they compute nothing): a small Mixtral, its
 * num_hidden_layers and num_local_experts the two %d, in that order. */
#define FAKE_WORKER_MODEL_JSON                                                                   \
    "\"model\": {\"vocab_size\": 256, \"hidden_size\": 64, \"intermediate_size\": 128,"          \
    " \"num_hidden_layers\": %d, \"num_attention_heads\": 4, \"num_key_value_heads\": 2,"        \
    " \"num_local_experts\": %d, \"num_experts_per_tok\": 2,"                                    \
    " \"max_position_embeddings\": 256}"

typedef struct {
    const char *id;
    void *sock;             /* DEALER to the coordinator's control endpoint; NULL: closed */
    uint64_t run, gen, seq; /* stamped on what it sends */
    uint32_t rank;          /* of the last PLAN */
    uint64_t ack_bytes;     /* what its ACKs say it received in a migration */
    /* received */
    int welcomes, plans, pauses, resumes, heartbeats, stops, errors;
    uint64_t heartbeat_gen; /* generation of the last coordinator HEARTBEAT */
    uint64_t resume_gen, resume_step;
    uint32_t stop_checkpoint;
    char *job;              /* WELCOME's job spec; owned, freed by fake_worker_close */
} fake_worker_t;

/* Zeroes *self and connects a DEALER to endpoint, in the fakes' ZeroMQ context (made on the
 * first open); sends nothing. False on failure. */
bool fake_worker_open(fake_worker_t *self, const char *endpoint, const char *id);

/* Closes the socket (sock becomes NULL) and frees the job spec. */
void fake_worker_close(fake_worker_t *self);

/* Ends the fakes' ZeroMQ context, once every fake is closed. */
void fake_worker_term(void);

/* Stamps m's header with run, generation and the next seq, and sends it (a CHECK on failure). */
void fake_worker_send(fake_worker_t *self, proto_msg_t *m);

/* JOIN as a CPU worker on 127.0.0.1. */
void fake_worker_join(fake_worker_t *self);
/* The same JOIN from a worker of device_kind ("cpu" or "cuda"). */
void fake_worker_join_as(fake_worker_t *self, const char *device_kind);

/* ACK of a message of type (proto_type_t). */
void fake_worker_ack(fake_worker_t *self, uint32_t type);

/* A HEARTBEAT reporting *hb. */
void fake_worker_heartbeat(fake_worker_t *self, const proto_heartbeat_t *hb);

typedef enum {
    FAKE_WORKER_NONE,      /* nothing came */
    FAKE_WORKER_MALFORMED, /* a message that does not decode (a CHECK failed; nothing to close) */
    FAKE_WORKER_MSG,       /* *m decoded, viewing *msg: the caller closes msg */
} fake_worker_recv_t;

/* Takes one message: with timeout_ms > 0, waits that long for one; else only what waits. */
fake_worker_recv_t fake_worker_recv(fake_worker_t *self, int timeout_ms, zmq_msg_t *msg,
                                    proto_msg_t *m);

/* Counts m: WELCOME (run, job), PLAN (generation, rank), PAUSE, RESUME (generation, step),
 * HEARTBEAT (generation), STOP (checkpoint), ERROR (printed to stderr). Answers nothing. */
void fake_worker_count(fake_worker_t *self, const proto_msg_t *m);

#endif
