/* Expert parallelism over the CPU collectives: a model_exchange_f32 (model/graph.h) whose
 * dispatch sends each MoE layer's expert rows to the rank that holds the expert and whose
 * combine brings the outputs back, both through one comm_alltoallv (worker/comm.h), plus
 * reduce_stats, the sum over ranks that makes the losses those of the global batch.
 *
 * Placement: expert e = l * E + j is held by the ranks holders[holder_off[e] ..
 * holder_off[e+1]) (one or more, distinct, ascending: the PLAN's tables). A replicated expert
 * takes an even share of every sender's rows on each holder: the sender cuts its rows of the
 * expert in contiguous chunks, one per holder, the first (rows mod holders) one row longer and
 * the chunks' order rotated by the sender's rank, so that replicas stay balanced. Each holder
 * then computes its share's gradient; the trainer sums a replicated expert's gradients over its
 * holders. Every rank of the comm must build its exchange with the same placement and call the
 * graph in lockstep (each dispatch, combine and reduce_stats is a collective).
 *
 * Wire. The message from rank s to rank r in a dispatch or combine is [E int32 counts][rows]:
 * counts[j] is the number of rows of expert j in it (0 unless r holds j for a dispatch, s
 * holds j for a combine), then those rows (D floats each) in expert order; the counts travel
 * with the data, so one alltoallv per call and the receiver checks every size against them.
 * Dispatch regroups what arrived by expert (expert order; within an expert the senders in rank
 * order, each sender's rows in its order) and remembers, per layer, how many rows of each
 * expert every peer sent: combine (and backward, which calls the layers in reverse order,
 * dispatch then combine on each) sends each peer's rows back from that record. */
#ifndef SEMOE_WORKER_EXCHANGE_H
#define SEMOE_WORKER_EXCHANGE_H

#include <stdint.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/graph.h"
#include "model/params.h"
#include "semoe_config.h"
#include "worker/comm.h"
#if SEMOE_HAVE_CUDA
#include "gpu/nccl.h"
#endif

typedef struct worker_exchange worker_exchange_t;

/* What the exchange moved since the last worker_exchange_take. */
typedef struct {
    uint64_t dispatches;          /* dispatch calls (one per MoE layer per forward and backward) */
    uint64_t dispatch_rows_out;   /* rows this rank's dispatches sent to other ranks */
    uint64_t dispatch_bytes_out;  /* their payload bytes to other ranks, counts included */
    double seconds;               /* wall time inside the exchange's collectives */
} worker_exchange_traffic_t;

/* An exchange over comm (this rank's, not owned; must outlive the exchange) for L layers of E
 * experts placed as holder_off (L * E + 1 entries) and holders say (copied). be (not owned)
 * moves rows between the graph's buffers and the host (the messages are host memory).
 * timeout_ms bounds every collective. An expert without holders, or with a holder out of range
 * or repeated, is an error. Caller owns *out. */
semoe_rc worker_exchange_new(comm_t *comm, const model_backend_f32_t *be, int L, int E,
                             const uint32_t *holder_off, const uint32_t *holders, int timeout_ms,
                             worker_exchange_t **out);
/* Frees; nulls *self_p; NULL is a no-op. */
void worker_exchange_destroy(worker_exchange_t **self_p);

/* One transfer of a direct transport: to another rank, send (recv NULL); from one, recv (send
 * NULL); with peer this rank, a copy from send to recv (gpu_nccl_op_t's layout). */
typedef struct {
    int peer;
    const void *send;
    void *recv;
    size_t bytes;
} worker_xfer_op_t;

/* A transport that moves bytes straight between the graph's buffers: run does the n transfers as
 * one group and returns once they are done, at most timeout_ms later; between two ranks, sends
 * and receives pair up in the order each lists them. */
typedef struct {
    void *state;
    semoe_rc (*run)(void *state, const worker_xfer_op_t *ops, int n, int timeout_ms);
} worker_xfer_t;

/* From now on, dispatch and combine move the rows through xfer (copied; NULL: back to the host
 * messages over the comm), the counts still over the comm; every rank of the comm must set
 * the same kind. The rows land laid out exactly as the host path lays them. */
void worker_exchange_set_xfer(worker_exchange_t *x, const worker_xfer_t *xfer);

/* The hosts of the ranks (W entries, 0..W-1; NULL: forget them): with two hosts or more, each
 * of the same number of ranks, the direct path goes in two hops, within hosts first: a rank's
 * rows for another host go to the rank of its own host with the destination's index, which
 * sends on everything its host has for that destination at once (hierarchical all-to-all:
 * fewer, larger transfers across hosts). Every rank must give the same hosts. SEMOE_EINVAL
 * for a host out of range or hosts of different sizes (nothing changed then). */
semoe_rc worker_exchange_set_hosts(worker_exchange_t *x, const int *host);

#if SEMOE_HAVE_CUDA
/* worker_exchange_set_xfer with NCCL's transport: the rows device to device over nccl (the
 * graph's buffers must be device memory: a GPU worker's; the ranks and their order as the
 * comm's), and replicated experts' gradients summed over it too. NULL: back to the host path.
 * Not owned; must outlive its use. */
void worker_exchange_set_nccl(worker_exchange_t *x, gpu_nccl_t *nccl);
#endif

/* The exchange table for the graph and model_train_hooks_t.ex: state is self (which must
 * outlive its use); dispatch, combine and reduce_stats as described above. */
model_exchange_f32 worker_exchange_f32(worker_exchange_t *self);

/* Copies into rows_in (L * E, or NULL) the rows each expert received by dispatch since the last
 * take (0 for experts held elsewhere), into rows_out (L * E, or NULL) the rows this rank's
 * dispatches sent to each expert (its own tokens' routing, wherever the expert is held) and
 * into traffic (or NULL) what moved, then zeroes them.
 * A training micro-batch dispatches every layer twice (forward, and backward's gradient of
 * combine, with the same counts), an evaluation once. */
void worker_exchange_take(worker_exchange_t *x, uint64_t *rows_in, uint64_t *rows_out,
                          worker_exchange_traffic_t *traffic);

/* Sums each replicated expert's gradients over its holders, so that its replicas stay
 * identical: grads is this rank's params-shaped gradient slab (p's layout, the backend's
 * memory); afterwards every holder has the sum, taken in rank order (bit-identical on every
 * holder). A collective (one all-reduce over every replicated expert's tensors, zeros from
 * the ranks that do not hold one): every rank calls it, after backward. Nothing to do, and no
 * message, when no expert is replicated. */
semoe_rc worker_exchange_sum_replicas(worker_exchange_t *x, const model_params_t *p,
                                      float *grads);

#if SEMOE_HAVE_CUDA
/* Over NCCL, during the step's last backward once layer `layer`'s expert gradients are final
 * (model_train_hooks_t's dense_ready): starts the all-reduce of that layer's replicated experts'
 * tensors in the background (the caller's stream does not wait), beside the rest of backward
 * (on the communicator's stream, before the transfers of later dispatches),
 * when the placement allows it on every rank (decided once per exchange from the placement: the
 * zeros standing in for tensors a rank does not hold fit 256 MiB; with every expert everywhere
 * they are none); else nothing. worker_exchange_sum_replicas then sums only the layers not
 * started, and waits for all. A collective: every rank calls it for the same layers in the
 * same order. */
semoe_rc worker_exchange_sum_replicas_layer(worker_exchange_t *x, const model_params_t *p,
                                            float *grads, int layer);
/* Forgets the layers whose sums this step started (a step that failed before
 * worker_exchange_sum_replicas: its caller joined what they started). */
void worker_exchange_sum_replicas_cancel(worker_exchange_t *x);
#endif

/* This rank's share of the global gradient norm's expert part: the sum of squares of the
 * expert tensors it holds as their first (lowest-rank) holder, so that summed over ranks each
 * expert counts once however many replicas it has. */
double worker_exchange_expert_sumsq(const worker_exchange_t *x, const model_params_t *p,
                                    const float *grads);

/* Rows of expert j of layer l this rank received from every rank in the layer's last
 * dispatch (summed over its parts) (0 for experts held elsewhere, or before any dispatch); for tests and metrics. */
int64_t worker_exchange_received(const worker_exchange_t *self, int layer, int j);

#endif
