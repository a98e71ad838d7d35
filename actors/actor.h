/* The actor runtime: an actor is a thread with a mailbox. Its creator and the actor talk over
 * an inproc PAIR pipe; nothing else is shared. Start is deterministic (actor_new returns after
 * the actor signalled ready, or failed), and so is stop (actor_destroy sends "$TERM" and waits
 * for the thread to end), as in CZMQ's zactor. Each ZeroMQ socket has one owning thread: the
 * pipe's two ends belong to the creator and the actor respectively. */
#ifndef SEMOE_ACTORS_ACTOR_H
#define SEMOE_ACTORS_ACTOR_H

#include <stddef.h>

#include "actors/err.h"

typedef struct actor actor_t;

/* The body of an actor, run in its own thread. pipe is the actor's end of the mailbox. The body
 * sets itself up, then calls actor_signal(pipe, 0) (or a non-zero status if setup failed, and
 * returns), then serves until it receives "$TERM" on the pipe, and returns. args stays the
 * caller's. A body that returns without signalling counts as failed with status -1 (actor_new
 * joins a failed body, so it must return). One that returns before "$TERM" is fine: its pipe
 * end is closed when it returns and actor_destroy still works. Messages the body sends before
 * its first signal are discarded by actor_new. The thread runs with asynchronous signals
 * (SIGTERM, SIGINT, ...) blocked, so they reach the process's other threads and never
 * interrupt the body's zmq calls with EINTR. */
typedef void(actor_fn)(void *pipe, void *args);

/* Starts fn(pipe, args) in a new thread and waits for its ready signal. Returns NULL (with
 * semoe_err set) if the thread could not start or signalled a non-zero status. The caller owns
 * the returned actor. ctx is the ZeroMQ context both ends use. The message says
 * "actor failed to start: status N", with the actor thread's last semoe_err message when it
 * had one. */
actor_t *actor_new(void *ctx, actor_fn *fn, void *args);

/* Sends "$TERM", waits for the thread to end, closes the pipe, frees, nulls *self_p. Blocks
 * until the body returns, so a body must leave on "$TERM" (or on ETERM) whatever it is doing;
 * messages the actor sent that were not read yet are discarded. Call it from the thread that
 * created the actor. NULL or *self_p NULL: nothing to do. */
void actor_destroy(actor_t **self_p);

/* The creator's end of the pipe: send commands, receive replies. Owned by the actor_t. */
void *actor_pipe(actor_t *self);

/* A one-frame signal with a status byte (ready, done); actor_wait blocks for one and returns
 * its status, or -1 if the pipe failed. The status must lie within -128..127 (else
 * SEMOE_EINVAL and nothing is sent). A signal is an 8-byte frame with a magic prefix, told apart
 * from string and msgpack frames; actor_wait discards whole messages that are not signals
 * until one arrives, as CZMQ's zsock_wait does. actor_wait also returns -1 when interrupted
 * (EINTR) or the context ends (ETERM), so -1 as a status is best kept for failures. */
semoe_rc actor_signal(void *pipe, int status);
int actor_wait(void *pipe);

/* Sends a string frame (more: ZMQ_SNDMORE follows), blocking; SEMOE_ESTOPPED if interrupted or
 * the context ends, SEMOE_EIO otherwise. Receives one frame, returning a malloc'd NUL-terminated
 * copy the caller frees, or NULL (errno set) if interrupted (EINTR) or the context ends (ETERM). */
semoe_rc actor_send_str(void *sock, const char *s, int more);
char *actor_recv_str(void *sock);

#endif
