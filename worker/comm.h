/* Collectives for CPU workers over ZeroMQ peer sockets: all-reduce (sum of float32, bit-identical
 * on every rank), all-to-all with variable byte counts per peer, barrier, and bucketed all-reduce
 * for dense gradients. One communicator per plan generation; the CUDA backend later implements
 * the same calls over NCCL.
 *
 * Sockets and threads. A worker has one comm_port_t for its whole life: a ROUTER bound at its
 * data endpoint (the one advertised in JOIN), where every peer's data arrives. Each generation
 * builds a comm_t on that port: one DEALER per peer, connected to the peer's data endpoint with
 * routing id "g<gen>r<rank>". The port, and the comm_t built on it, are used from ONE thread
 * (the trainer's); the only call allowed from another thread is comm_abort().
 *
 * Wire. Every message is [header][payload]: a 40-byte header (magic "SMCL", op, generation,
 * sender rank, collective sequence number, chunk index, chunk count, total bytes; little endian)
 * then the raw bytes as their own frame, cut in chunks of at most COMM_CHUNK_BYTES. Receivers
 * match (sequence, op, sender, chunk). A message of an older generation is dropped and counted
 * (fencing: a zombie of an older generation cannot write into this one); one of a newer
 * generation is kept on the port for the next communicator (a faster peer may already be there);
 * one of a later collective of this generation is buffered until that collective runs.
 *
 * Errors. Every wait is bounded by its timeout_ms: a silent or dead peer makes the call return
 * SEMOE_ETIMEDOUT with a message naming the ranks still missing. After any error (timeout,
 * abort, a peer breaking protocol) the communicator is broken: every later call fails at once;
 * destroy it and build the next generation's. */
#ifndef SEMOE_WORKER_COMM_H
#define SEMOE_WORKER_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"

#define COMM_CHUNK_BYTES ((size_t)4 << 20) /* payload bytes per message at most */
#define COMM_MAX_FRAME (COMM_CHUNK_BYTES + 64) /* ZMQ_MAXMSGSIZE on the data ROUTER */
#define COMM_STASH_MAX_BYTES ((size_t)256 << 20) /* newer-generation bytes kept for later */
#define COMM_POLL_SLICE_MS 10 /* how often a waiting call checks comm_abort's flag */
#define COMM_LINGER_MS 2000   /* comm_destroy: how long queued sends may still go out */

typedef struct comm_port comm_port_t;
typedef struct comm comm_t;

/* Counters of what the receiving side did with messages (since the comm was built). */
typedef struct {
    uint64_t msgs_sent, bytes_sent;   /* payload bytes */
    uint64_t msgs_recv, bytes_recv;   /* accepted for this generation */
    uint64_t stale_dropped;           /* of an older generation: fenced off */
    uint64_t future_stashed;          /* of a newer generation: kept on the port */
    uint64_t malformed_dropped;       /* bad header, frame count, or routing id */
} comm_stats_t;

/* Opens this worker's data port: a ROUTER bound at `bind` ("tcp://127.0.0.1:*" picks a port),
 * linger 0, ZMQ_MAXMSGSIZE COMM_MAX_FRAME. The calling thread owns it; the caller owns *out. */
semoe_rc comm_port_new(void *ctx, const char *bind, comm_port_t **out);
/* The endpoint the ROUTER is bound to, wildcard port resolved (ZMQ_LAST_ENDPOINT). A wildcard
 * host (0.0.0.0) is not rewritten: peers need worker_control_advertised's answer. */
const char *comm_port_endpoint(const comm_port_t *port);
/* A socket (of the port's thread, e.g. its actor pipe) whose input interrupts a waiting call:
 * the call returns SEMOE_ESTOPPED within COMM_POLL_SLICE_MS and breaks its comm, leaving the
 * input unread. NULL: none. An actor that must answer its mailbox while it waits on peers. */
void comm_port_set_interrupt(comm_port_t *port, void *sock);
/* Closes the ROUTER and frees what it kept; nulls *port_p. Destroy its comm first. */
void comm_port_destroy(comm_port_t **port_p);

/* The communicator of generation `gen`: this worker is `rank` of `world`; endpoints[r] is rank
 * r's data endpoint (endpoints[rank] is not used). Connects one DEALER per peer (linger 0
 * until comm_destroy, unbounded send queue: a collective queues at most its own payload, so a send never blocks).
 * Messages of `gen` kept on the port are taken over; older ones are dropped. One comm per port
 * at a time; `port` must outlive it. The caller owns *out. */
semoe_rc comm_new(comm_port_t *port, uint64_t gen, uint32_t rank, uint32_t world,
                  const char *const *endpoints, comm_t **out);
/* Closes the DEALERs and frees; nulls *comm_p. Sends still queued (this rank may finish a
 * collective before its last messages have left) get COMM_LINGER_MS to go out in the background
 * (zmq_ctx_term waits for them at most that long); a comm broken by an error or comm_abort drops
 * them at once (linger 0). */
void comm_destroy(comm_t **comm_p);

uint32_t comm_rank(const comm_t *c);
uint32_t comm_world(const comm_t *c);
uint64_t comm_generation(const comm_t *c);
void comm_stats(const comm_t *c, comm_stats_t *out);

/* buf[i] = sum over ranks of buf[i], for i < n, on every rank. The sum is taken in rank order,
 * ((x0 + x1) + x2) + ... + x(world-1), for every element, whatever the timing or n: so the
 * result is bit-identical on every rank, deterministic, and does not depend on how a tensor is
 * cut (bucketed == unbucketed). Algorithm: direct reduce-scatter (rank k owns the k-th of
 * `world` contiguous segments and receives every other rank's copy of it) then all-gather;
 * each rank sends and receives (world-1)/world of the buffer twice, like a ring. Every rank
 * must call it with the same n. */
semoe_rc comm_allreduce_sum(comm_t *c, float *buf, size_t n, int timeout_ms);

/* All-to-all with variable counts. send holds the bytes for every peer packed in rank order:
 * peer r gets send_bytes[r] bytes (0 allowed, self included). On return recv holds what every
 * peer sent to this rank, packed in rank order, recv_bytes[r] bytes from rank r (sizes learned
 * from the messages); their sum must fit in recv_cap or the call fails with SEMOE_EINVAL. */
semoe_rc comm_alltoallv(comm_t *c, const void *send, const size_t *send_bytes, void *recv,
                        size_t *recv_bytes, size_t recv_cap, int timeout_ms);

/* Returns once every rank has entered the barrier. */
semoe_rc comm_barrier(comm_t *c, int timeout_ms);

/* All-reduces n tensors (bufs[i] of lens[i] floats) through buckets of bucket_bytes: tensors
 * are packed back to back (a large one spans several buckets), each full bucket is all-reduced
 * and unpacked. Bit-identical to comm_allreduce_sum of each tensor alone. timeout_ms bounds
 * each bucket. */
semoe_rc comm_allreduce_buckets(comm_t *c, float *const *bufs, const size_t *lens, int n,
                                size_t bucket_bytes, int timeout_ms);

/* Makes the call waiting now (or the next) return SEMOE_ESTOPPED within COMM_POLL_SLICE_MS,
 * and breaks the comm. The one call safe from another thread (it sets an atomic flag), e.g. the
 * control actor when the coordinator reports a peer gone. */
void comm_abort(comm_t *c);

#endif
