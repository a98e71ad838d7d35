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
 * caller's. */
typedef void(actor_fn)(void *pipe, void *args);

/* Starts fn(pipe, args) in a new thread and waits for its ready signal. Returns NULL (with
 * semoe_err set) if the thread could not start or signalled a non-zero status. The caller owns
 * the returned actor. ctx is the ZeroMQ context both ends use. */
actor_t *actor_new(void *ctx, actor_fn *fn, void *args);

/* Sends "$TERM", waits for the thread to end, closes the pipe, frees, nulls *self_p. */
void actor_destroy(actor_t **self_p);

/* The creator's end of the pipe: send commands, receive replies. Owned by the actor_t. */
void *actor_pipe(actor_t *self);

/* A one-frame signal with a status byte (ready, done); actor_wait blocks for one and returns
 * its status, or -1 if the pipe failed. */
semoe_rc actor_signal(void *pipe, int status);
int actor_wait(void *pipe);

/* Sends a string frame (more: ZMQ_SNDMORE follows); receives one, returning a malloc'd copy
 * the caller frees, or NULL if interrupted. */
semoe_rc actor_send_str(void *sock, const char *s, int more);
char *actor_recv_str(void *sock);

#endif
