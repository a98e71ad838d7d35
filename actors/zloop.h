/* ZeroMQ sockets on a libuv loop. The coordinator runs one single-threaded libuv loop for its
 * ZeroMQ sockets, timers and HTTP; a ZeroMQ socket joins it through its ZMQ_FD.
 *
 * ZMQ_FD is edge-triggered and signals only that ZMQ_EVENTS must be read again: it does not
 * stay readable while messages wait, and any zmq_send or zmq_recv on the socket (from a timer,
 * say) can consume the edge. So a watch (1) on ZMQ_FD readability drains the socket while
 * ZMQ_EVENTS has POLLIN, and (2) re-checks ZMQ_EVENTS from a uv_prepare callback, which runs
 * just before the loop blocks, so a message that arrived while we were sending is never left
 * behind. A drain handles at most a budget of messages and then lets the loop turn (an idle
 * handle keeps it from blocking), so one busy socket cannot starve timers or other sockets. */
#ifndef SEMOE_ACTORS_ZLOOP_H
#define SEMOE_ACTORS_ZLOOP_H

#include <uv.h>

#include "actors/err.h"

typedef struct zloop_watch zloop_watch_t;

/* Called once per pending message: it must receive exactly one whole message (all frames)
 * from sock. */
typedef void(zloop_fn)(void *sock, void *arg);

/* Starts watching sock on loop. The watch must not outlive the loop; the socket stays the
 * caller's. Returns NULL with semoe_err set on failure. Everything here runs on the loop's
 * thread, which must own sock. One watch per socket and loop (a second fails). fn is first
 * called from the loop, never from zloop_watch_new. Destroy the watch before closing its socket
 * or terminating its context: a watch whose socket fails logs a warning once and goes quiet. */
zloop_watch_t *zloop_watch_new(uv_loop_t *loop, void *sock, zloop_fn *fn, void *arg);

/* Stops the watch, closes its handles (they finish closing on the next loop turn) and nulls
 * *self_p. Safe from inside the watch's own callback (fn is not called again, even for messages
 * left in the socket) and from any other callback on the loop. The memory is freed when the
 * handles finish closing, so run the loop once more (uv_run(loop, UV_RUN_NOWAIT)) before
 * uv_loop_close. */
void zloop_watch_destroy(zloop_watch_t **self_p);

/* Drains now (call after sending on the socket outside the watch's callback if the caller
 * cannot wait for the next loop turn; normally unnecessary). Does nothing when called from the
 * watch's own callback. */
void zloop_watch_poke(zloop_watch_t *self);

/* Sets how many messages one drain hands to fn before letting the loop turn (default 256;
 * values below 1 mean 1). A loop turn drains at most twice (ZMQ_FD readable, then before the
 * loop blocks), so at most 2 x budget messages per socket per turn. */
void zloop_watch_set_budget(zloop_watch_t *self, int budget);

#endif
