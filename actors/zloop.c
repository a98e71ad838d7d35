/* ZeroMQ sockets on a libuv loop: a watch turns a socket's edge-triggered ZMQ_FD into one
 * callback per pending message, never leaving one behind and never hogging the loop. zloop.h
 * says why it takes a poll, a prepare and an idle handle to do that. */
#include "actors/zloop.h"

#include <stdbool.h>
#include <stdlib.h>
#include <zmq.h>

#include "actors/log.h"

/* Messages one drain hands to the callback before it lets the loop turn: enough to amortise a
 * turn, few enough that timers and other sockets wait a few milliseconds at most. */
#define S_BUDGET_DEFAULT 256
#define S_HANDLES 3

struct zloop_watch {
    void *sock;
    zloop_fn *fn;
    void *arg;
    int budget;
    uv_poll_t poll;       /* ZMQ_FD readable: ZMQ_EVENTS may have changed */
    uv_prepare_t prepare; /* the loop is about to block: catch edges our own sends consumed */
    uv_idle_t idle;       /* active only while a drain stopped at its budget with more left */
    int open;             /* handles initialised and not yet closed; freed when it reaches 0 */
    bool draining;        /* s_drain is on the stack (the callback may poke or destroy) */
    bool closing;         /* destroyed: the callback must not run again */
    bool failed;          /* ZMQ_EVENTS failed: handles stopped, error logged once */
};

static void s_on_close(uv_handle_t *handle)
{
    zloop_watch_t *self = handle->data;
    if (--self->open == 0)
        free(self);
}

/* Stops every handle (closing frees the watch later); used by destroy and a failed new. */
static void s_close(zloop_watch_t *self)
{
    self->closing = true;
    uv_close((uv_handle_t *)&self->poll, s_on_close);
    uv_close((uv_handle_t *)&self->prepare, s_on_close);
    uv_close((uv_handle_t *)&self->idle, s_on_close);
}

/* ZMQ_EVENTS, or -1 after stopping the watch: a socket that cannot report its events (closed
 * under its watch, or its context terminated) would otherwise fail on every loop turn, or spin
 * the loop on a ZMQ_FD that nobody reads. */
static int s_events(zloop_watch_t *self)
{
    int events = 0;
    size_t len = sizeof events;
    if (zmq_getsockopt(self->sock, ZMQ_EVENTS, &events, &len) == 0)
        return events;
    log_warn("zloop: ZMQ_EVENTS failed: %s; the watch stops (destroy a watch before closing its "
             "socket or terminating its context)",
             zmq_strerror(zmq_errno()));
    self->failed = true;
    uv_poll_stop(&self->poll);
    uv_prepare_stop(&self->prepare);
    uv_idle_stop(&self->idle);
    return -1;
}

/* Nothing to do: being active is enough to keep the loop from blocking. */
static void s_on_idle(uv_idle_t *handle) { (void)handle; }

/* Calls fn once per pending message, up to the budget. Reading ZMQ_EVENTS is what re-arms
 * ZMQ_FD, so it is read before every message and once more at the end, even when fn is not
 * called. */
static void s_drain(zloop_watch_t *self)
{
    if (self->draining || self->closing || self->failed)
        return;
    self->draining = true;
    int handled = 0;
    bool left = false;
    for (;;) {
        int events = s_events(self);
        if (events < 0 || !(events & ZMQ_POLLIN))
            break;
        if (handled == self->budget) {
            left = true;
            break;
        }
        self->fn(self->sock, self->arg);
        handled++;
        /* fn may have destroyed the watch: the struct lives until the close callbacks run on
         * a later phase of the loop, but the socket may be gone. */
        if (self->closing)
            break;
    }
    self->draining = false;
    if (self->closing || self->failed)
        return;
    /* The idle handle's only job is to make the loop poll without blocking; the next turn's
     * prepare drains the rest. */
    if (left)
        uv_idle_start(&self->idle, s_on_idle);
    else
        uv_idle_stop(&self->idle);
}

static void s_on_poll(uv_poll_t *handle, int status, int events)
{
    (void)events;
    zloop_watch_t *self = handle->data;
    if (status < 0)
        /* libuv has stopped the poll handle (it does on POLLERR, which ZeroMQ's signalling fd
         * should never raise). The prepare still drains, but only when something else wakes
         * the loop, so say so. */
        log_warn("zloop: polling ZMQ_FD failed (%s): this socket is now served only when "
                 "other events wake the loop",
                 uv_strerror(status));
    s_drain(self);
}

static void s_on_prepare(uv_prepare_t *handle) { s_drain(handle->data); }

zloop_watch_t *zloop_watch_new(uv_loop_t *loop, void *sock, zloop_fn *fn, void *arg)
{
    if (!loop || !sock || !fn) {
        semoe_err(SEMOE_EINVAL, "zloop_watch_new: a loop, a socket and a callback are required");
        return NULL;
    }
    zmq_fd_t fd;
    size_t len = sizeof fd;
    if (zmq_getsockopt(sock, ZMQ_FD, &fd, &len) == -1) {
        semoe_err(SEMOE_EIO, "zloop_watch_new: ZMQ_FD: %s", zmq_strerror(zmq_errno()));
        return NULL;
    }
    zloop_watch_t *self = semoe_xcalloc(1, sizeof *self);
    self->sock = sock;
    self->fn = fn;
    self->arg = arg;
    self->budget = S_BUDGET_DEFAULT;
    int rc = uv_poll_init_socket(loop, &self->poll, fd);
    if (rc != 0) {
        semoe_err(SEMOE_EIO, "zloop_watch_new: polling ZMQ_FD %d: %s%s", (int)fd, uv_strerror(rc),
                  rc == UV_EEXIST ? " (the socket already has a watch on this loop)" : "");
        free(self);
        return NULL;
    }
    uv_prepare_init(loop, &self->prepare);
    uv_idle_init(loop, &self->idle);
    self->open = S_HANDLES;
    self->poll.data = self->prepare.data = self->idle.data = self;
    rc = uv_poll_start(&self->poll, UV_READABLE, s_on_poll);
    if (rc == 0)
        rc = uv_prepare_start(&self->prepare, s_on_prepare);
    if (rc != 0) {
        semoe_err(SEMOE_EIO, "zloop_watch_new: starting the watch: %s", uv_strerror(rc));
        s_close(self);
        return NULL;
    }
    return self;
}

void zloop_watch_destroy(zloop_watch_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    s_close(*self_p);
    *self_p = NULL;
}

void zloop_watch_poke(zloop_watch_t *self) { s_drain(self); }

void zloop_watch_set_budget(zloop_watch_t *self, int budget)
{
    self->budget = budget > 0 ? budget : 1;
}
