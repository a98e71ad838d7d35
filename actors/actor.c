/* The actor runtime behind actor.h: one pthread per actor, an inproc PAIR pipe as its mailbox,
 * and the one-frame signals that let the creator start and stop it in step, after CZMQ's
 * zactor. */
#include "actors/actor.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* A signal is one 8-byte frame holding this value plus the status byte, in host order (the
 * pipe never leaves the process), as CZMQ's zsock_signal does: a string or msgpack frame of
 * the same size would have to carry exactly these bytes to be taken for one. */
#define S_SIGNAL_MAGIC 0x7766554433221100ull

/* The mailbox HWM in messages: commands and replies are small and answered promptly. */
#define S_PIPE_HWM 1000

/* What the actor thread needs. The creator writes it before pthread_create and reads it after
 * pthread_join (both full barriers); only `finished` is read while the thread runs. */
typedef struct {
    actor_fn *fn;
    void *args;
    void *pipe;           /* the actor's end; closed by the actor thread when fn returns */
    bool signalled;       /* fn sent its first signal (ready or failed) */
    char why[256];        /* the actor thread's last error when that signal was a failure */
    atomic_bool finished; /* fn returned and the actor's end is closed */
} shim_t;

struct actor {
    void *pipe; /* the creator's end */
    pthread_t thread;
    shim_t shim;
};

/* The shim of the actor running on this thread, so actor_signal can note the first signal
 * without changing the body's signature. NULL on threads that are not actors. */
static __thread shim_t *s_current;

static void *s_thread(void *arg)
{
    shim_t *shim = arg;
    s_current = shim;
    shim->fn(shim->pipe, shim->args);
    s_current = NULL;
    /* A body that returns without signalling (it failed before it could say so) must not
     * leave its creator blocked in actor_new. */
    if (!shim->signalled)
        actor_signal(shim->pipe, -1);
    /* Messages already sent stay readable by the creator after this close: an inproc writer
     * leaves its pending messages to the reader, whatever its linger. */
    zmq_close(shim->pipe);
    atomic_store(&shim->finished, true);
    return NULL;
}

static bool s_is_signal(zmq_msg_t *msg, int *status)
{
    uint64_t v;
    if (zmq_msg_size(msg) != sizeof v || zmq_msg_more(msg))
        return false;
    memcpy(&v, zmq_msg_data(msg), sizeof v);
    if ((v & ~(uint64_t)0xff) != S_SIGNAL_MAGIC)
        return false;
    *status = (int8_t)(uint8_t)(v & 0xff);
    return true;
}

/* Receives until a signal arrives, discarding whole messages that are not signals. Returns 0
 * with *status, or -1 with zmq_errno() telling why; EINTR is retried when retry_eintr. */
static int s_wait(void *pipe, bool retry_eintr, int *status)
{
    bool in_message = false; /* the frames after a non-final frame are never signals */
    zmq_msg_t msg;
    for (;;) {
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, pipe, 0) == -1) {
            int e = zmq_errno();
            zmq_msg_close(&msg);
            if (e == EINTR && retry_eintr)
                continue;
            errno = e;
            return -1;
        }
        bool signal = !in_message && s_is_signal(&msg, status);
        in_message = zmq_msg_more(&msg);
        zmq_msg_close(&msg);
        if (signal)
            return 0;
    }
}

/* Starts the thread with every asynchronous signal blocked, so SIGTERM and friends reach the
 * process's main thread (its libuv loop or sigwait) and never interrupt an actor's zmq calls
 * with EINTR. Faults raised by the thread itself still reach it. Returns pthread_create's
 * result. */
static int s_start_thread(actor_t *self)
{
    sigset_t all, old;
    sigfillset(&all);
    int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS, SIGABRT};
    for (size_t i = 0; i < sizeof faults / sizeof faults[0]; i++)
        sigdelset(&all, faults[i]);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&self->thread, NULL, s_thread, &self->shim);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return rc;
}

static semoe_rc s_pipe_socket(void *ctx, void **sock)
{
    *sock = zmq_socket(ctx, ZMQ_PAIR);
    if (!*sock)
        return semoe_err(SEMOE_EIO, "actor_new: pipe socket: %s", zmq_strerror(zmq_errno()));
    int linger = 0, hwm = S_PIPE_HWM;
    zmq_setsockopt(*sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(*sock, ZMQ_SNDHWM, &hwm, sizeof hwm);
    zmq_setsockopt(*sock, ZMQ_RCVHWM, &hwm, sizeof hwm);
    return SEMOE_OK;
}

actor_t *actor_new(void *ctx, actor_fn *fn, void *args)
{
    static atomic_ulong counter;
    if (!ctx || !fn) {
        semoe_err(SEMOE_EINVAL, "actor_new: a ZeroMQ context and a body are required");
        return NULL;
    }
    actor_t *self = semoe_xcalloc(1, sizeof *self);
    void *back = NULL; /* the actor's end, ours until the thread starts */
    char endpoint[96];
    snprintf(endpoint, sizeof endpoint, "inproc://semoe-actor-%p-%lu", (void *)self,
             atomic_fetch_add(&counter, 1) + 1);

    if (s_pipe_socket(ctx, &self->pipe) != SEMOE_OK || s_pipe_socket(ctx, &back) != SEMOE_OK)
        goto fail;
    if (zmq_bind(self->pipe, endpoint) == -1 || zmq_connect(back, endpoint) == -1) {
        semoe_err(SEMOE_EIO, "actor_new: %s: %s", endpoint, zmq_strerror(zmq_errno()));
        goto fail;
    }
    self->shim.fn = fn;
    self->shim.args = args;
    self->shim.pipe = back;
    atomic_init(&self->shim.finished, false);
    int rc = s_start_thread(self);
    if (rc != 0) {
        errno = rc;
        semoe_err_errno(SEMOE_ESYS, "actor_new: pthread_create");
        goto fail;
    }
    back = NULL; /* the socket moved to the actor thread with pthread_create's barrier */

    int status;
    if (s_wait(self->pipe, true, &status) == -1) {
        /* Only ETERM gets here: the context is ending, so the body's own zmq calls fail too
         * and it returns. */
        int e = errno;
        pthread_join(self->thread, NULL);
        semoe_err(SEMOE_ESTOPPED, "actor_new: waiting for the actor to start: %s",
                  zmq_strerror(e));
        goto fail;
    }
    if (status != 0) {
        pthread_join(self->thread, NULL);
        if (self->shim.why[0])
            semoe_err(SEMOE_EIO, "actor failed to start: status %d (its last error: %s)", status,
                      self->shim.why);
        else
            semoe_err(SEMOE_EIO, "actor failed to start: status %d", status);
        goto fail;
    }
    return self;

fail:
    if (back)
        zmq_close(back);
    if (self->pipe)
        zmq_close(self->pipe);
    free(self);
    return NULL;
}

/* Delivers "$TERM" unless the body has already returned. A plain blocking send could hang for
 * good: a PAIR whose peer is gone takes no messages, and a full mailbox takes none until the
 * body reads, which it may never do if it is itself blocked sending to us. So send without
 * blocking; between tries discard what the actor sent (nobody will read it now), which
 * unblocks such a body, and wait for room, but never so long that a body which returned
 * meanwhile (that wakes nobody here) keeps us waiting. */
static void s_send_term(actor_t *self)
{
    while (!atomic_load(&self->shim.finished)) {
        if (zmq_send(self->pipe, "$TERM", 5, ZMQ_DONTWAIT) == 5)
            return;
        int e = zmq_errno();
        if (e != EAGAIN && e != EINTR)
            return; /* ETERM: the body sees it as well and returns */
        zmq_pollitem_t item = {self->pipe, 0, ZMQ_POLLIN | ZMQ_POLLOUT, 0};
        if (zmq_poll(&item, 1, 10) > 0 && (item.revents & ZMQ_POLLIN)) {
            zmq_msg_t msg;
            zmq_msg_init(&msg);
            while (zmq_msg_recv(&msg, self->pipe, ZMQ_DONTWAIT) >= 0)
                ;
            zmq_msg_close(&msg);
        }
    }
}

void actor_destroy(actor_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    actor_t *self = *self_p;
    s_send_term(self);
    pthread_join(self->thread, NULL);
    zmq_close(self->pipe);
    free(self);
    *self_p = NULL;
}

void *actor_pipe(actor_t *self) { return self->pipe; }

semoe_rc actor_signal(void *pipe, int status)
{
    if (status < INT8_MIN || status > INT8_MAX)
        return semoe_err(SEMOE_EINVAL, "actor_signal: status %d: must be within -128..127",
                         status);
    uint64_t v = S_SIGNAL_MAGIC | (uint8_t)(int8_t)status;
    /* Snapshot the reason before the send, which may itself overwrite it. */
    char why[sizeof s_current->why] = "";
    shim_t *shim = s_current && s_current->pipe == pipe ? s_current : NULL;
    if (shim && !shim->signalled && status != 0)
        snprintf(why, sizeof why, "%s", semoe_err_msg());
    int rc;
    do
        rc = zmq_send(pipe, &v, sizeof v, 0);
    while (rc == -1 && zmq_errno() == EINTR);
    if (rc == -1)
        return semoe_err(zmq_errno() == ETERM ? SEMOE_ESTOPPED : SEMOE_EIO,
                         "actor_signal: %s", zmq_strerror(zmq_errno()));
    if (shim && !shim->signalled) {
        shim->signalled = true;
        memcpy(shim->why, why, sizeof why);
    }
    return SEMOE_OK;
}

int actor_wait(void *pipe)
{
    int status;
    return s_wait(pipe, false, &status) == 0 ? status : -1;
}

semoe_rc actor_send_str(void *sock, const char *s, int more)
{
    if (zmq_send(sock, s, strlen(s), more ? ZMQ_SNDMORE : 0) == -1) {
        int e = zmq_errno();
        return semoe_err(e == ETERM || e == EINTR ? SEMOE_ESTOPPED : SEMOE_EIO,
                         "actor_send_str: %s", zmq_strerror(e));
    }
    return SEMOE_OK;
}

char *actor_recv_str(void *sock)
{
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, sock, 0) == -1) {
        int e = zmq_errno();
        zmq_msg_close(&msg);
        errno = e;
        return NULL;
    }
    size_t n = zmq_msg_size(&msg);
    char *s = semoe_xmalloc(n + 1);
    memcpy(s, zmq_msg_data(&msg), n);
    s[n] = 0;
    zmq_msg_close(&msg);
    return s;
}
