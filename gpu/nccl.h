/* NCCL communicators for the GPU workers' data plane, behind a plain C header: one per plan
 * generation, made from a unique id that the generation's rank 0 creates (gpu_nccl_unique_id)
 * and the coordinator relays to every rank (PROTO_COMM); all-to-all with variable byte counts
 * per peer (grouped ncclSend / ncclRecv), all-reduce of fp32 sums, and bucketed all-reduce of
 * many tensors (the dense gradients) as few large ones.
 *
 * Streams. A communicator has its own stream on the device that was current when it was made.
 * A collective is enqueued there after everything the calling thread enqueued on gpu_stream()
 * before it (an event), and gpu_stream() waits for it (another), so that the caller's later
 * kernels see its result without a host wait; the call returns once it is enqueued. Compute
 * enqueued on gpu_stream() after that waits for it, so a caller that wants compute beside
 * communication enqueues the compute first (gpu/nccl.h's collectives on data that is ready).
 *
 * Never a hang. Nothing here blocks on the GPU without a bound: gpu_nccl_wait polls the
 * collectives' completion, NCCL's asynchronous error and the abort flag every millisecond, up
 * to its timeout. On an error, a timeout (a peer dead or silent) or gpu_nccl_abort, the
 * communicator is revoked (its work stopped, gpu_nccl_revocable) or else aborted
 * (ncclCommAbort, which also unblocks its kernels) and broken: every later call fails at once;
 * destroy it and make the next generation's (or shrink a revoked one).
 * Creation is non-blocking and bounded the same way. */
#ifndef SEMOE_GPU_NCCL_H
#define SEMOE_GPU_NCCL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#include "actors/err.h"

#define GPU_NCCL_ID_BYTES 128 /* sizeof(ncclUniqueId) */
#define GPU_NCCL_BUCKET_BYTES ((size_t)32 << 20) /* gpu_nccl_allreduce_buckets' default */

typedef struct gpu_nccl gpu_nccl_t;

/* A fresh communicator id (ncclGetUniqueId). The calling process hosts the id's bootstrap
 * root until the communicator is made, so the rank that calls it must be one of its ranks. */
semoe_rc gpu_nccl_unique_id(uint8_t id[GPU_NCCL_ID_BYTES]);

/* Joins the communicator of `world` ranks named by id as `rank`, on the calling thread's current
 * device (gpu_backend_init). Waits at most timeout_ms for every rank to join: SEMOE_ETIMEDOUT
 * (the communicator aborted) when one does not, SEMOE_ESTOPPED when intr(arg) (NULL: none) says
 * so first; intr then stays the communicator's (gpu_nccl_set_interrupt). timeout_ms also bounds
 * each later call's wait for its peers. Caller owns *out. */
semoe_rc gpu_nccl_new(const uint8_t id[GPU_NCCL_ID_BYTES], int rank, int world, int timeout_ms,
                      int (*intr)(void *arg), void *arg, gpu_nccl_t **out);

/* A communicator of the ranks of c that are not in exclude (n of them, distinct, in range),
 * renumbered in order (ncclCommShrink): survivors of a death keep their NCCL resources and
 * need no new id. Every survivor calls it with the same list. A revoked c (broken, where NCCL
 * can revoke) is quiescent and shrunk as it is; a live one has its work aborted first and is
 * broken afterwards; an aborted one cannot be shrunk. Waits at most timeout_ms, not
 * interruptible. Caller owns *out; destroy c. */
semoe_rc gpu_nccl_shrink(gpu_nccl_t *c, const int *exclude, int n, int timeout_ms,
                         gpu_nccl_t **out);

/* The NCCL library's version code (e.g. 22809 for 2.28.9). */
int gpu_nccl_version(void);
/* Whether this build's NCCL can revoke a communicator (2.28.9 on): without it a failure aborts
 * the communicator outright, and it cannot be shrunk afterwards (the survivors make a new one
 * from a new id instead). */
int gpu_nccl_revocable(void);

int gpu_nccl_rank(const gpu_nccl_t *c);
int gpu_nccl_world(const gpu_nccl_t *c);

/* All-to-all of bytes between device buffers: send_bytes[r] bytes at send + send_off[r] go to
 * rank r, recv_bytes[r] bytes from rank r land at recv + recv_off[r] (world entries each; the
 * sizes of a pair must agree on both sides, as each rank learns them from the routing it
 * shares, e.g. by a first all-to-all of counts). Our own part is a device copy. Enqueued as
 * described above; SEMOE_EINVAL when this rank's own part differs in size between send and
 * receive, and the error that broke c if it is broken. */
semoe_rc gpu_nccl_alltoallv(gpu_nccl_t *c, const void *send, const size_t *send_bytes,
                            const size_t *send_off, void *recv, const size_t *recv_bytes,
                            const size_t *recv_off);

/* One point-to-point transfer of gpu_nccl_sendrecv: to another rank, send (recv NULL); from
 * one, recv (send NULL); with peer this rank, a local copy from send to recv. */
typedef struct {
    int peer;
    const void *send;
    void *recv;
    size_t bytes;
} gpu_nccl_op_t;

/* The n transfers as one group (device buffers): the local copies first, then every send and
 * receive at once. Between two ranks, sends and receives pair up in the order each lists them,
 * so both must list a pair's transfers in the same order (the exchange lists them by expert).
 * Zero-byte transfers are skipped. Enqueued as above. */
semoe_rc gpu_nccl_sendrecv(gpu_nccl_t *c, const gpu_nccl_op_t *ops, int n);

/* buf (n fp32, device) = its sum over the ranks, in place. Enqueued as above. */
semoe_rc gpu_nccl_allreduce_sum(gpu_nccl_t *c, float *buf, size_t n);

/* Each of the n tensors bufs[i] (lens[i] fp32, device) summed over the ranks, as fused
 * all-reduces of at most bucket_bytes each (0: GPU_NCCL_BUCKET_BYTES): tensors adjacent in
 * memory go as one span, in place; the others are packed into a bucket buffer of the
 * communicator's, reduced and unpacked. Every rank passes the same lens in the same order.
 * Enqueued as above. */
semoe_rc gpu_nccl_allreduce_buckets(gpu_nccl_t *c, float *const *bufs, const size_t *lens,
                                    int n, size_t bucket_bytes);

/* gpu_nccl_allreduce_buckets in the background: ordered after the caller's stream as every
 * call is, but the caller's stream does not wait for it: its next kernels may not touch bufs
 * until gpu_nccl_join. It runs on c's background lane, a second communicator of the same
 * ranks (split from c by the first background call, which every rank makes at the same point)
 * with a stream of its own, so that the calls of c that follow (e.g. the expert rows' all-to-all
 * of the next layer in backward) go beside it rather than after it. Background calls run in
 * order among themselves. A failure of the lane breaks c, and the other way round.
 * SEMOE_NCCL_LANE=0 in the environment (every rank's) keeps them on c's own stream instead,
 * after the calls before them: no second communicator, no overlap with c's later calls. */
semoe_rc gpu_nccl_allreduce_buckets_bg(gpu_nccl_t *c, float *const *bufs, const size_t *lens,
                                       int n, size_t bucket_bytes);
/* Makes the caller's stream wait for everything enqueued on c so far, the background too. */
void gpu_nccl_join(gpu_nccl_t *c);

/* Waits until every collective enqueued on c so far has finished (the background ones too),
 * polling NCCL's errors and the abort flag; at most timeout_ms (then SEMOE_ETIMEDOUT and c
 * aborted). */
semoe_rc gpu_nccl_wait(gpu_nccl_t *c, int timeout_ms);
/* The same for the calls not in the background only: the background lane goes on. */
semoe_rc gpu_nccl_wait_fg(gpu_nccl_t *c, int timeout_ms);

/* Asks c to abort: safe from any thread (a signal handler's excepted). A thread waiting in
 * gpu_nccl_new, gpu_nccl_wait or gpu_nccl_shrink returns SEMOE_ESTOPPED within a
 * millisecond or so, having aborted c; without a waiter, the next call on c aborts it. */
void gpu_nccl_abort(gpu_nccl_t *c);

/* A callback that gpu_nccl_wait (and the settling of each call) asks every millisecond or so,
 * from the waiting thread: non-zero ends the wait as gpu_nccl_abort would (SEMOE_ESTOPPED, c
 * broken). The trainer's checks its poke socket: a newer plan ends a wait on the old one. NULL
 * clears it. */
void gpu_nccl_set_interrupt(gpu_nccl_t *c, int (*fn)(void *arg), void *arg);

/* Whether c is broken (after an error, a timeout or an abort). */
int gpu_nccl_broken(const gpu_nccl_t *c);
/* The code c broke with (SEMOE_OK while it is not): SEMOE_ETIMEDOUT, SEMOE_EIO or
 * SEMOE_ESTOPPED for a peer gone or silent, or an abort; others for a fault of this process. */
semoe_rc gpu_nccl_fault(const gpu_nccl_t *c);

/* Frees c: a healthy one finalised (its work flushed, at most a few seconds), a broken one
 * aborted. Nulls *c_p; NULL is a no-op. */
void gpu_nccl_destroy(gpu_nccl_t **c_p);

/* NCCL's own collectives on c, without what the calls above add (the ceiling the benchmarks
 * hold them to, bench/nccl.c): ncclAlltoAll of `per` bytes to and from every rank, and
 * ncclAllReduce of n fp32 in place on one buffer. Ordered and waited for as above. */
semoe_rc gpu_nccl_ref_alltoall(gpu_nccl_t *c, const void *send, void *recv, size_t per);
semoe_rc gpu_nccl_ref_allreduce(gpu_nccl_t *c, float *buf, size_t n);

/* What c moved since it was made: payload bytes this rank sent to other ranks by all-to-all,
 * and fp32 elements it all-reduced. */
void gpu_nccl_traffic(const gpu_nccl_t *c, uint64_t *a2a_bytes_out, uint64_t *allreduce_floats);

#ifdef __cplusplus
}
#endif

#endif
