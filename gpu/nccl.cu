/* gpu/nccl.h: communicators made non-blocking (every NCCL call may answer ncclInProgress, and
 * s_settle polls until it has taken effect), collectives on the communicator's own stream
 * between two events, and bounded waits. A failure revokes the communicator (its in-flight
 * work stopped, the communicator kept so that survivors can shrink it); if even that does not
 * settle in time, it is aborted outright.
 *
 * The background lane: a second communicator split from the first (same ranks, same order)
 * with a stream of its own, made by the first background call. It is a gpu_nccl_t too, whose
 * `parent` is the communicator it serves: it stops when the parent is asked to, and a failure
 * of either breaks both. */
#include "gpu/nccl.h"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct gpu_nccl {
    ncclComm_t comm;
    int rank, world, dev;
    cudaStream_t st;
    cudaEvent_t ready, done; /* gpu_stream -> st before a collective, st -> gpu_stream after */
    std::atomic<int> abort_req;
    int (*intr)(void *); /* gpu_nccl_set_interrupt's */
    void *intr_arg;
    int broken;  /* 1: revoked (shrinkable), 2: aborted (comm gone) */
    char why[256]; /* what broke it, repeated by every later call */
    semoe_rc code; /* and the code it broke with */
    int timeout_ms; /* how long a call may wait for its peers (a launch, too: NCCL connects
                     * lazily, inside the first launch with each peer) */
    float *bucket; /* gpu_nccl_allreduce_buckets' packing buffer */
    size_t bucket_floats;
    uint64_t a2a_out, ar_floats;
    ncclComm_t child;   /* where ncclCommSplit / ncclCommShrink put theirs (see s_child) */
    gpu_nccl_t *lane;   /* the background lane, NULL until the first background call */
    gpu_nccl_t *parent; /* on a lane: the communicator it serves */
};

namespace {

/* Whether c (or, on a lane, its parent) was asked to abort. */
bool s_aborting(const gpu_nccl_t *c)
{
    gpu_nccl_t *m = const_cast<gpu_nccl_t *>(c);
    return m->abort_req.load() || (m->parent && m->parent->abort_req.load());
}

/* Whether a waiter on c should stop: gpu_nccl_abort, or the interrupt callback (a lane's is
 * its parent's). */
bool s_stop(const gpu_nccl_t *c)
{
    const gpu_nccl_t *o = c->parent ? c->parent : c;
    return s_aborting(c) || (o->intr && o->intr(o->intr_arg));
}

/* What an NCCL error means to a caller: a peer or the network gone (SEMOE_EIO: a comm fault,
 * wait for the next plan) or something wrong here (SEMOE_ECUDA). */
semoe_rc s_code(ncclResult_t r)
{
    return r == ncclRemoteError || r == ncclSystemError ? SEMOE_EIO : SEMOE_ECUDA;
}

constexpr int SETTLE_MS = 5000; /* how long a revoke may take before an abort */

double s_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

void s_nap(void)
{
    struct timespec t = {0, 200000}; /* 0.2 ms */
    nanosleep(&t, NULL);
}

/* Breaks c with the reason (printf-style) and returns code: revokes its work (polled for
 * SETTLE_MS), or aborts it when the revoke fails or does not settle. */
semoe_rc s_break(gpu_nccl_t *c, semoe_rc code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

semoe_rc s_break(gpu_nccl_t *c, semoe_rc code, const char *fmt, ...)
{
    if (!c->broken) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->why, sizeof c->why, fmt, ap);
        va_end(ap);
        c->code = code;
        c->broken = 2;
#ifdef NCCL_REVOKE_DEFAULT /* ncclCommRevoke: NCCL 2.28.9 on */
        ncclResult_t rv = ncclCommRevoke(c->comm, NCCL_REVOKE_DEFAULT);
#else
        ncclResult_t rv = ncclInvalidUsage; /* no revoke: straight to the abort */
#endif
        if (rv == ncclSuccess || rv == ncclInProgress) {
            double t0 = s_now_ms();
            ncclResult_t st = ncclInProgress;
            while (s_now_ms() - t0 < SETTLE_MS) {
                if (ncclCommGetAsyncError(c->comm, &st) != ncclSuccess || st != ncclInProgress)
                    break;
                s_nap();
            }
            if (st == ncclSuccess)
                c->broken = 1;
        }
        if (c->broken == 2) {
            ncclCommAbort(c->comm);
            c->comm = NULL;
        }
        /* the lane and its parent fail together (each call below returns at once if the other
         * is broken already) */
        if (c->lane)
            s_break(c->lane, code, "its communicator failed: %s", c->why);
        if (c->parent)
            s_break(c->parent, code, "its background lane failed: %s", c->why);
    }
    return semoe_err(code, "nccl rank %d of %d: %s", c->rank, c->world, c->why);
}

/* The error that broke c, again. */
semoe_rc s_broken(const gpu_nccl_t *c)
{
    return semoe_err(c->code, "nccl rank %d of %d: broken earlier: %s", c->rank, c->world,
                     c->why);
}

/* Polls until the communicator's last call has taken effect (not ncclInProgress), an error,
 * the abort flag or timeout_ms. */
semoe_rc s_settle(gpu_nccl_t *c, const char *what, int timeout_ms)
{
    double t0 = s_now_ms();
    for (;;) {
        ncclResult_t st = ncclInProgress;
        ncclResult_t r = ncclCommGetAsyncError(c->comm, &st);
        if (r != ncclSuccess)
            st = r;
        if (st == ncclSuccess)
            return SEMOE_OK;
        if (st != ncclInProgress)
            return s_break(c, s_code(st), "%s: %s (%s)", what, ncclGetErrorString(st),
                           ncclGetLastError(c->comm));
        if (s_stop(c))
            return s_break(c, SEMOE_ESTOPPED, "%s: aborted", what);
        if (s_now_ms() - t0 > timeout_ms)
            return s_break(c, SEMOE_ETIMEDOUT,
                           "%s: not done after %d ms (a rank dead, silent or not joined)", what,
                           timeout_ms);
        s_nap();
    }
}

/* Checks c before a collective and orders its stream after the caller's. */
semoe_rc s_begin(gpu_nccl_t *c)
{
    if (c->broken)
        return s_broken(c);
    if (s_aborting(c))
        return s_break(c, SEMOE_ESTOPPED, "aborted");
    GPU_CHECK(cudaEventRecord(c->ready, gpu_stream()));
    GPU_CHECK(cudaStreamWaitEvent(c->st, c->ready, 0));
    return SEMOE_OK;
}

/* After a collective's NCCL calls (r, the last one's result): settles them and orders the
 * caller's stream after c's. */
semoe_rc s_end_as(gpu_nccl_t *c, ncclResult_t r, const char *what, bool join)
{
    if (r != ncclSuccess && r != ncclInProgress)
        return s_break(c, s_code(r), "%s: %s (%s)", what, ncclGetErrorString(r),
                       ncclGetLastError(c->comm));
    SEMOE_CHECK(s_settle(c, what, c->timeout_ms));
    GPU_CHECK(cudaEventRecord(c->done, c->st));
    if (join)
        GPU_CHECK(cudaStreamWaitEvent(gpu_stream(), c->done, 0));
    return SEMOE_OK;
}

semoe_rc s_end(gpu_nccl_t *c, ncclResult_t r, const char *what)
{
    return s_end_as(c, r, what, true);
}

/* A communicator struct around comm (settled): its stream and events on the current device. */
gpu_nccl_t *s_wrap(ncclComm_t comm, int timeout_ms)
{
    gpu_nccl_t *c = new gpu_nccl_t();
    c->comm = comm;
    c->timeout_ms = timeout_ms;
    ncclCommUserRank(comm, &c->rank);
    ncclCommCount(comm, &c->world);
    GPU_CHECK(cudaGetDevice(&c->dev));
    GPU_CHECK(cudaStreamCreateWithFlags(&c->st, cudaStreamNonBlocking));
    GPU_CHECK(cudaEventCreateWithFlags(&c->ready, cudaEventDisableTiming));
    GPU_CHECK(cudaEventCreateWithFlags(&c->done, cudaEventDisableTiming));
    return c;
}

/* Frees c's stream, events and bucket, once its communicator is closed (s_close); a child
 * that NCCL wrote after a split or shrink was given up on is aborted. */
void s_free(gpu_nccl_t *c)
{
    ncclComm_t late = __atomic_load_n(&c->child, __ATOMIC_ACQUIRE);
    if (late)
        ncclCommAbort(late);
    if (c->bucket)
        cudaFreeAsync(c->bucket, c->st);
    cudaStreamSynchronize(c->st);
    cudaStreamDestroy(c->st);
    cudaEventDestroy(c->ready);
    cudaEventDestroy(c->done);
    delete c;
}

/* Polls a communicator being made (comm non-NULL, its state ncclInProgress) until it is ready,
 * fails, or timeout_ms / the abort flag of `owner` (may be NULL) ends the wait; aborts it then. */
semoe_rc s_made(ncclComm_t comm, ncclResult_t r, int rank, int world, int timeout_ms,
                const char *what, int (*intr)(void *), void *arg)
{
    double t0 = s_now_ms();
    while (r == ncclSuccess || r == ncclInProgress) {
        ncclResult_t st = ncclInProgress;
        if (ncclCommGetAsyncError(comm, &st) != ncclSuccess)
            st = ncclInternalError;
        if (st == ncclSuccess)
            return SEMOE_OK;
        if (st != ncclInProgress) {
            r = st;
            break;
        }
        bool stop = intr && intr(arg);
        if (stop || s_now_ms() - t0 > timeout_ms) {
            ncclCommAbort(comm);
            return semoe_err(stop ? SEMOE_ESTOPPED : SEMOE_ETIMEDOUT,
                             "nccl rank %d of %d: %s: %s", rank, world, what,
                             stop ? "aborted" : "not every rank joined in time");
        }
        s_nap();
    }
    const char *last = ncclGetLastError(comm);
    ncclCommAbort(comm);
    return semoe_err(SEMOE_ECUDA, "nccl rank %d of %d: %s: %s (%s)", rank, world, what,
                     ncclGetErrorString(r), last);
}

/* After ncclCommSplit or ncclCommShrink on c (r, its result) into c->child: with a non-blocking
 * c, NCCL makes the child on a thread of its own and only writes it there once done, c's state
 * in progress meanwhile. Polls for it, bounded by timeout_ms and, if interruptible, by c's
 * abort flag and interrupt; the child is the caller's then (c->child cleared). A child written
 * after a failure is aborted with c (s_free). */
semoe_rc s_child(gpu_nccl_t *c, ncclResult_t r, const char *what, int timeout_ms,
                 bool interruptible, ncclComm_t *out)
{
    *out = NULL;
    if (r != ncclSuccess && r != ncclInProgress)
        return semoe_err(s_code(r), "nccl rank %d of %d: %s: %s (%s)", c->rank, c->world, what,
                         ncclGetErrorString(r), ncclGetLastError(c->comm));
    double t0 = s_now_ms();
    for (;;) {
        ncclComm_t got = __atomic_load_n(&c->child, __ATOMIC_ACQUIRE);
        ncclResult_t st = ncclInProgress;
        ncclResult_t q = ncclCommGetAsyncError(c->comm, &st);
        if (q != ncclSuccess)
            st = q;
        if (got && st != ncclInProgress) { /* its own state, s_made's to poll, says the rest */
            __atomic_store_n(&c->child, (ncclComm_t)NULL, __ATOMIC_RELEASE);
            *out = got;
            return SEMOE_OK;
        }
        if (st != ncclSuccess && st != ncclInProgress)
            return semoe_err(s_code(st), "nccl rank %d of %d: %s: %s (%s)", c->rank, c->world,
                             what, ncclGetErrorString(st), ncclGetLastError(c->comm));
        if (interruptible && s_stop(c))
            return semoe_err(SEMOE_ESTOPPED, "nccl rank %d of %d: %s: aborted", c->rank,
                             c->world, what);
        if (s_now_ms() - t0 > timeout_ms)
            return semoe_err(SEMOE_ETIMEDOUT, "nccl rank %d of %d: %s: no communicator after "
                             "%d ms", c->rank, c->world, what, timeout_ms);
        s_nap();
    }
}

/* c's background lane, split from it by the first call that needs one (every rank makes that
 * call at the same point: ncclCommSplit is a collective of c). A lane that cannot be made
 * breaks c. */
semoe_rc s_lane(gpu_nccl_t *c, gpu_nccl_t **out)
{
    *out = c->lane;
    if (c->lane)
        return SEMOE_OK;
    if (c->broken)
        return s_broken(c);
    if (s_aborting(c))
        return s_break(c, SEMOE_ESTOPPED, "aborted");
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    c->child = NULL;
    ncclResult_t r = ncclCommSplit(c->comm, 0, c->rank, &c->child, &cfg);
    ncclComm_t comm = NULL;
    semoe_rc rc = s_child(c, r, "ncclCommSplit (the background lane)", c->timeout_ms, true,
                          &comm);
    if (rc == SEMOE_OK)
        rc = s_made(comm, ncclInProgress, c->rank, c->world, c->timeout_ms,
                    "ncclCommSplit (the background lane)", c->intr, c->intr_arg);
    if (rc != SEMOE_OK) /* the ranks no longer agree on what comes next */
        return c->broken ? rc : s_break(c, rc, "%s", semoe_err_msg());
    c->lane = s_wrap(comm, c->timeout_ms);
    c->lane->parent = c;
    *out = c->lane;
    return SEMOE_OK;
}

/* Takes c's lane off it, its communicator aborted (whatever it was running is lost) and what it
 * moved kept; NULL if none. The caller frees it (s_free) once c's own work is stopped too: the
 * lane's stream may wait on the caller's, which may wait on c's. */
gpu_nccl_t *s_detach_lane(gpu_nccl_t *c)
{
    gpu_nccl_t *l = c->lane;
    if (!l)
        return NULL;
    c->lane = NULL;
    c->a2a_out += l->a2a_out;
    c->ar_floats += l->ar_floats;
    if (l->comm)
        ncclCommAbort(l->comm);
    l->comm = NULL;
    return l;
}

/* Waits until the work enqueued on c's own stream so far is done (see gpu_nccl_wait). */
semoe_rc s_wait(gpu_nccl_t *c, int timeout_ms)
{
    if (c->broken)
        return s_broken(c);
    double t0 = s_now_ms();
    for (;;) {
        cudaError_t e = cudaEventQuery(c->done);
        if (e == cudaSuccess)
            return SEMOE_OK;
        if (e != cudaErrorNotReady)
            return s_break(c, SEMOE_ECUDA, "waiting: %s", cudaGetErrorString(e));
        ncclResult_t st = ncclSuccess, q = ncclCommGetAsyncError(c->comm, &st);
        if (q != ncclSuccess)
            st = q;
        if (st != ncclSuccess && st != ncclInProgress)
            return s_break(c, s_code(st), "waiting: %s (%s)", ncclGetErrorString(st),
                           ncclGetLastError(c->comm));
        /* the other of lane and parent may see a dead peer first */
        gpu_nccl_t *o = c->lane ? c->lane : c->parent;
        ncclResult_t so = ncclSuccess;
        if (o && o->comm && !o->broken && ncclCommGetAsyncError(o->comm, &so) == ncclSuccess &&
            so != ncclSuccess && so != ncclInProgress)
            return s_break(o, s_code(so), "waiting: %s (%s)", ncclGetErrorString(so),
                           ncclGetLastError(o->comm));
        if (s_stop(c))
            return s_break(c, SEMOE_ESTOPPED, "waiting: aborted");
        if (s_now_ms() - t0 > timeout_ms)
            return s_break(c, SEMOE_ETIMEDOUT,
                           "a collective not done after %d ms (a rank dead or silent)",
                           timeout_ms);
        s_nap();
    }
}

} // namespace

extern "C" semoe_rc gpu_nccl_unique_id(uint8_t id[GPU_NCCL_ID_BYTES])
{
    static_assert(sizeof(ncclUniqueId) == GPU_NCCL_ID_BYTES, "ncclUniqueId size");
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess)
        return semoe_err(SEMOE_ECUDA, "ncclGetUniqueId: %s", ncclGetErrorString(r));
    memcpy(id, &u, sizeof u);
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_nccl_new(const uint8_t id[GPU_NCCL_ID_BYTES], int rank, int world,
                                 int timeout_ms, int (*intr)(void *arg), void *arg,
                                 gpu_nccl_t **out)
{
    *out = NULL;
    if (world < 1 || rank < 0 || rank >= world || timeout_ms <= 0)
        return semoe_err(SEMOE_EINVAL, "gpu_nccl_new: rank %d of %d, timeout %d ms", rank, world,
                         timeout_ms);
    ncclUniqueId u;
    memcpy(&u, id, sizeof u);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t comm = NULL;
    ncclResult_t r = ncclCommInitRankConfig(&comm, world, u, rank, &cfg);
    if (!comm)
        return semoe_err(SEMOE_ECUDA, "nccl rank %d of %d: ncclCommInitRankConfig: %s", rank,
                         world, ncclGetErrorString(r));
    SEMOE_CHECK(s_made(comm, r, rank, world, timeout_ms, "ncclCommInitRankConfig", intr, arg));
    *out = s_wrap(comm, timeout_ms);
    gpu_nccl_set_interrupt(*out, intr, arg);
    return SEMOE_OK;
}

extern "C" semoe_rc gpu_nccl_shrink(gpu_nccl_t *c, const int *exclude, int n, int timeout_ms,
                                    gpu_nccl_t **out)
{
    *out = NULL;
    if (c->broken == 2)
        return semoe_err(SEMOE_ECUDA, "nccl rank %d of %d: cannot shrink: aborted after: %s",
                         c->rank, c->world, c->why);
    if (n < 1 || n >= c->world)
        return semoe_err(SEMOE_EINVAL, "gpu_nccl_shrink: %d of %d ranks excluded", n, c->world);
    for (int i = 0; i < n; i++) {
        bool dup = false;
        for (int j = 0; j < i; j++)
            dup |= exclude[j] == exclude[i];
        if (exclude[i] < 0 || exclude[i] >= c->world || dup || exclude[i] == c->rank)
            return semoe_err(SEMOE_EINVAL, "gpu_nccl_shrink: rank %d of %d: excluded rank %d "
                             "is out of range, repeated or this rank", c->rank, c->world,
                             exclude[i]);
    }
    gpu_nccl_t *lane = s_detach_lane(c); /* a new one is split from the result when needed */
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    c->child = NULL;
    /* a revoked parent is quiescent (DEFAULT); a live one may have work stuck on the excluded
     * ranks: ABORT terminates it first, and the parent is broken from then on */
    ncclResult_t r = ncclCommShrink(c->comm, const_cast<int *>(exclude), n, &c->child, &cfg,
                                    c->broken ? NCCL_SHRINK_DEFAULT : NCCL_SHRINK_ABORT);
    if (!c->broken) {
        snprintf(c->why, sizeof c->why, "shrunk with its work aborted");
        c->code = SEMOE_ESTOPPED;
        c->broken = 1;
    }
    ncclComm_t comm = NULL;
    semoe_rc rc = s_child(c, r, "ncclCommShrink", timeout_ms, false, &comm);
    if (rc != SEMOE_OK && c->comm) { /* its work may not have been stopped: abort it */
        ncclCommAbort(c->comm);
        c->comm = NULL;
        c->broken = 2;
    }
    if (lane) /* c's work is stopped now */
        s_free(lane);
    SEMOE_CHECK(rc);
    int world = c->world - n;
    /* not interruptible: the parent's abort flag or poke, which may be what broke it, would end
     * the shrink at once */
    SEMOE_CHECK(s_made(comm, ncclInProgress, -1, world, timeout_ms, "ncclCommShrink", NULL,
                       NULL));
    *out = s_wrap(comm, timeout_ms);
    return SEMOE_OK;
}

extern "C" int gpu_nccl_version(void)
{
    int v = 0;
    ncclGetVersion(&v);
    return v;
}

extern "C" int gpu_nccl_revocable(void)
{
#ifdef NCCL_REVOKE_DEFAULT
    return 1;
#else
    return 0;
#endif
}

extern "C" int gpu_nccl_rank(const gpu_nccl_t *c) { return c->rank; }
extern "C" int gpu_nccl_world(const gpu_nccl_t *c) { return c->world; }
extern "C" void gpu_nccl_set_interrupt(gpu_nccl_t *c, int (*fn)(void *arg), void *arg)
{
    c->intr = fn;
    c->intr_arg = arg;
}

extern "C" int gpu_nccl_broken(const gpu_nccl_t *c) { return c->broken != 0; }
extern "C" semoe_rc gpu_nccl_fault(const gpu_nccl_t *c) { return c->broken ? c->code : SEMOE_OK; }

extern "C" semoe_rc gpu_nccl_alltoallv(gpu_nccl_t *c, const void *send, const size_t *send_bytes,
                                       const size_t *send_off, void *recv,
                                       const size_t *recv_bytes, const size_t *recv_off)
{
    const int me = c->rank;
    if (send_bytes[me] != recv_bytes[me])
        return semoe_err(SEMOE_EINVAL, "gpu_nccl_alltoallv: rank %d sends itself %zu bytes but "
                         "receives %zu", me, send_bytes[me], recv_bytes[me]);
    SEMOE_CHECK(s_begin(c));
    const uint8_t *s = (const uint8_t *)send;
    uint8_t *d = (uint8_t *)recv;
    if (send_bytes[me])
        GPU_CHECK(cudaMemcpyAsync(d + recv_off[me], s + send_off[me], send_bytes[me],
                                  cudaMemcpyDeviceToDevice, c->st));
    ncclResult_t r = ncclGroupStart();
    for (int k = 1; k < c->world && (r == ncclSuccess || r == ncclInProgress); k++) {
        int to = (me + k) % c->world, from = (me - k + c->world) % c->world;
        if (send_bytes[to]) {
            r = ncclSend(s + send_off[to], send_bytes[to], ncclUint8, to, c->comm, c->st);
            c->a2a_out += send_bytes[to];
        }
        if (recv_bytes[from] && (r == ncclSuccess || r == ncclInProgress))
            r = ncclRecv(d + recv_off[from], recv_bytes[from], ncclUint8, from, c->comm, c->st);
    }
    ncclResult_t g = ncclGroupEnd();
    return s_end(c, r == ncclSuccess || r == ncclInProgress ? g : r, "all-to-all");
}

extern "C" semoe_rc gpu_nccl_sendrecv(gpu_nccl_t *c, const gpu_nccl_op_t *ops, int n)
{
    for (int i = 0; i < n; i++) {
        const gpu_nccl_op_t *o = &ops[i];
        bool local = o->peer == c->rank;
        if (o->peer < 0 || o->peer >= c->world || (local && (!o->send || !o->recv)) ||
            (!local && !o->send == !o->recv))
            return semoe_err(SEMOE_EINVAL, "gpu_nccl_sendrecv: transfer %d: peer %d of %d, "
                             "send %p, recv %p", i, o->peer, c->world, o->send, o->recv);
    }
    SEMOE_CHECK(s_begin(c));
    for (int i = 0; i < n; i++)
        if (ops[i].peer == c->rank && ops[i].bytes)
            GPU_CHECK(cudaMemcpyAsync(ops[i].recv, ops[i].send, ops[i].bytes,
                                      cudaMemcpyDeviceToDevice, c->st));
    ncclResult_t r = ncclGroupStart();
    for (int i = 0; i < n && (r == ncclSuccess || r == ncclInProgress); i++) {
        const gpu_nccl_op_t *o = &ops[i];
        if (o->peer == c->rank || !o->bytes)
            continue;
        if (o->send) {
            r = ncclSend(o->send, o->bytes, ncclUint8, o->peer, c->comm, c->st);
            c->a2a_out += o->bytes;
        } else {
            r = ncclRecv(o->recv, o->bytes, ncclUint8, o->peer, c->comm, c->st);
        }
    }
    ncclResult_t g = ncclGroupEnd();
    return s_end(c, r == ncclSuccess || r == ncclInProgress ? g : r, "send/receive");
}

extern "C" semoe_rc gpu_nccl_allreduce_sum(gpu_nccl_t *c, float *buf, size_t n)
{
    SEMOE_CHECK(s_begin(c));
    c->ar_floats += n;
    return s_end(c, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, c->comm, c->st),
                 "all-reduce");
}

namespace {
semoe_rc s_buckets(gpu_nccl_t *c, float *const *bufs, const size_t *lens, int n,
                   size_t bucket_bytes, bool join);
}

extern "C" semoe_rc gpu_nccl_allreduce_buckets(gpu_nccl_t *c, float *const *bufs,
                                               const size_t *lens, int n, size_t bucket_bytes)
{
    return s_buckets(c, bufs, lens, n, bucket_bytes, true);
}

extern "C" semoe_rc gpu_nccl_allreduce_buckets_bg(gpu_nccl_t *c, float *const *bufs,
                                                  const size_t *lens, int n, size_t bucket_bytes)
{
    static int use_lane = -1; /* SEMOE_NCCL_LANE=0: on c's own stream, after its calls */
    if (use_lane < 0) {
        const char *v = getenv("SEMOE_NCCL_LANE");
        use_lane = !(v && !strcmp(v, "0"));
    }
    if (!use_lane)
        return s_buckets(c, bufs, lens, n, bucket_bytes, false);
    gpu_nccl_t *lane;
    SEMOE_CHECK(s_lane(c, &lane));
    return s_buckets(lane, bufs, lens, n, bucket_bytes, false);
}

extern "C" void gpu_nccl_join(gpu_nccl_t *c)
{
    GPU_CHECK(cudaStreamWaitEvent(gpu_stream(), c->done, 0));
    if (c->lane)
        GPU_CHECK(cudaStreamWaitEvent(gpu_stream(), c->lane->done, 0));
}

namespace {
semoe_rc s_buckets(gpu_nccl_t *c, float *const *bufs, const size_t *lens, int n,
                   size_t bucket_bytes, bool join)
{
    size_t cap = (bucket_bytes ? bucket_bytes : GPU_NCCL_BUCKET_BYTES) / sizeof(float);
    if (cap == 0)
        return semoe_err(SEMOE_EINVAL, "gpu_nccl_allreduce_buckets: bucket of %zu bytes",
                         bucket_bytes);
    SEMOE_CHECK(s_begin(c));
    ncclResult_t r = ncclSuccess;
    int i = 0;
    while (i < n && (r == ncclSuccess || r == ncclInProgress)) {
        /* the bucket: tensors i .. j-1, adjacent in memory (one span, in place) or packed */
        size_t total = lens[i];
        bool span = true;
        int j = i + 1;
        while (j < n && total + lens[j] <= cap) {
            span = span && bufs[j] == bufs[j - 1] + lens[j - 1];
            total += lens[j++];
        }
        if (total == 0) {
            i = j;
            continue;
        }
        if (span || j == i + 1) {
            r = ncclAllReduce(bufs[i], bufs[i], total, ncclFloat, ncclSum, c->comm, c->st);
            /* taken effect before the next call: a non-blocking communicator refuses a call
             * while the last is in progress */
            if (r == ncclSuccess || r == ncclInProgress)
                SEMOE_CHECK(s_settle(c, "bucketed all-reduce", c->timeout_ms));
        } else {
            if (!c->bucket || cap > c->bucket_floats) { /* grown for a larger bucket size */
                /* stream-ordered: no wait for the device (the other communicator's work may be
                 * stuck on a dead peer) */
                if (c->bucket) {
                    GPU_CHECK(cudaFreeAsync(c->bucket, c->st));
                    c->bucket = NULL;
                }
                if (cudaMallocAsync((void **)&c->bucket, cap * sizeof(float), c->st) !=
                    cudaSuccess) {
                    cudaGetLastError();
                    /* buckets may be enqueued already: the ranks no longer match, so break */
                    return s_break(c, SEMOE_ENOMEM, "bucketed all-reduce: a bucket of %zu bytes "
                                   "on the device", cap * sizeof(float));
                }
                c->bucket_floats = cap;
            }
            size_t o = 0;
            for (int t = i; t < j; o += lens[t++])
                GPU_CHECK(cudaMemcpyAsync(c->bucket + o, bufs[t], lens[t] * sizeof(float),
                                          cudaMemcpyDeviceToDevice, c->st));
            r = ncclAllReduce(c->bucket, c->bucket, total, ncclFloat, ncclSum, c->comm, c->st);
            /* the unpacking copies must follow the reduce on the stream: settle it first */
            if (r == ncclSuccess || r == ncclInProgress)
                SEMOE_CHECK(s_settle(c, "bucketed all-reduce", c->timeout_ms));
            o = 0;
            for (int t = i; t < j; o += lens[t++])
                GPU_CHECK(cudaMemcpyAsync(bufs[t], c->bucket + o, lens[t] * sizeof(float),
                                          cudaMemcpyDeviceToDevice, c->st));
        }
        c->ar_floats += total;
        i = j;
    }
    return s_end_as(c, r, "bucketed all-reduce", join);
}
} // namespace

extern "C" semoe_rc gpu_nccl_wait(gpu_nccl_t *c, int timeout_ms)
{
    double t0 = s_now_ms();
    SEMOE_CHECK(s_wait(c, timeout_ms));
    if (!c->lane)
        return SEMOE_OK;
    int left = timeout_ms - (int)(s_now_ms() - t0);
    return s_wait(c->lane, left > 1 ? left : 1);
}

extern "C" semoe_rc gpu_nccl_wait_fg(gpu_nccl_t *c, int timeout_ms)
{
    return s_wait(c, timeout_ms);
}

extern "C" void gpu_nccl_abort(gpu_nccl_t *c)
{
    if (c)
        c->abort_req.store(1);
}

namespace {
/* Closes c's communicator: a healthy one finalised (its work flushed, at most SETTLE_MS) and
 * destroyed, a broken one (or one whose finalising fails or does not settle) aborted. */
void s_close(gpu_nccl_t *c)
{
    if (!c->comm)
        return;
    /* broken or asked to abort: no flush (peers may be gone), straight to the abort */
    ncclResult_t fr = c->broken || s_aborting(c) ? ncclInvalidUsage : ncclCommFinalize(c->comm);
    if (fr == ncclSuccess || fr == ncclInProgress) {
        double t0 = s_now_ms();
        ncclResult_t st = ncclInProgress;
        while (s_now_ms() - t0 < SETTLE_MS &&
               ncclCommGetAsyncError(c->comm, &st) == ncclSuccess && st == ncclInProgress)
            s_nap();
        if (st == ncclSuccess) {
            ncclCommDestroy(c->comm);
            c->comm = NULL;
        }
    }
    if (c->comm)
        ncclCommAbort(c->comm);
    c->comm = NULL;
}
} // namespace

/* The lane's communicator closes first (a broken parent's lane is broken too), then the
 * parent's; the streams go last, once no work of either can hold them. */
extern "C" void gpu_nccl_destroy(gpu_nccl_t **c_p)
{
    if (!c_p || !*c_p)
        return;
    gpu_nccl_t *c = *c_p;
    *c_p = NULL;
    gpu_nccl_t *lane = c->lane;
    c->lane = NULL;
    if (lane) /* it sees the parent's abort flag, and shares its breaks */
        s_close(lane);
    s_close(c);
    if (lane)
        s_free(lane);
    s_free(c);
}

extern "C" semoe_rc gpu_nccl_ref_alltoall(gpu_nccl_t *c, const void *send, void *recv,
                                          size_t per)
{
    SEMOE_CHECK(s_begin(c));
    return s_end(c, ncclAlltoAll(send, recv, per, ncclUint8, c->comm, c->st), "ncclAlltoAll");
}

extern "C" semoe_rc gpu_nccl_ref_allreduce(gpu_nccl_t *c, float *buf, size_t n)
{
    SEMOE_CHECK(s_begin(c));
    return s_end(c, ncclAllReduce(buf, buf, n, ncclFloat, ncclSum, c->comm, c->st),
                 "ncclAllReduce");
}

extern "C" void gpu_nccl_traffic(const gpu_nccl_t *c, uint64_t *a2a_bytes_out,
                                 uint64_t *allreduce_floats)
{
    const gpu_nccl_t *l = c->lane;
    if (a2a_bytes_out)
        *a2a_bytes_out = c->a2a_out + (l ? l->a2a_out : 0);
    if (allreduce_floats)
        *allreduce_floats = c->ar_floats + (l ? l->ar_floats : 0);
}
