/* The worker's control actor: owns the DEALER to the coordinator and the trainer actor (which
 * owns the worker's data socket: worker/trainer.h); joins, heartbeats with the trainer's
 * progress, applies and acks plans (passing them on to the trainer), and reconnects with backoff
 * when the coordinator goes away (docs/control-plane.md is the contract). Runs as an actor (actors/actor.h). */
#ifndef SEMOE_WORKER_CONTROL_H
#define SEMOE_WORKER_CONTROL_H

#include "actors/actor.h"
#include "proto/msg.h"
#include "worker/device.h"

/* What the actor needs; the creator owns it and keeps it alive and unchanged until
 * actor_destroy returns (error is the one field the actor writes, before a failed start). */
typedef struct {
    void *ctx;                          /* the ZeroMQ context for the actor's sockets */
    const char *coordinator;            /* control endpoint, "tcp://127.0.0.1:5555" */
    const char *id;                     /* the worker's name, unique in the job */
    const char *host;                   /* host name for JOIN (gethostname or --advertise) */
    const char *advertise;              /* NULL, or the host peers use for the data endpoint */
    const char *data_bind;              /* where the data ROUTER binds, "tcp://127.0.0.1:*" */
    int reconnect_max_ms;               /* backoff cap: 1 s doubling up to this */
    int threads;                        /* the trainer's BLAS threads; 0: OpenBLAS's default */
    const char *metrics_log;            /* NULL, or the trainer's JSON-lines file */
    worker_device_t device;             /* probed device and memory per tier */
    char error[512];                    /* why the actor could not start */
    int error_exit;                     /* exit code that suits error (2: a bad flag value) */
} worker_control_config_t;

/* The actor body: actor_new(ctx, worker_control_actor, &config). It starts the trainer (which
 * binds the data socket) and sends the first JOIN before it signals ready (non-zero, with
 * config.error set, when the trainer cannot start).
 *
 * Commands on the pipe (string frames):
 *   "LEAVE" reason   send LEAVE with reason now and close the control socket (no rejoin after)
 *   "STATUS"         reply one frame "state=member id=w1 run=... generation=3 rank=0 world=4
 *                    experts=0,5,9 batch=0-8 joins=1 paused=0 data=tcp://..."
 *   "$TERM"          send LEAVE if still connected, then end (actor_destroy)
 * Unsolicited, from the actor: "STOPPED" once the coordinator sent STOP; the actor then serves
 * only the pipe until "$TERM". */
void worker_control_actor(void *pipe, void *args);

/* Rewrites a bound endpoint ("tcp://0.0.0.0:41234") into the one peers dial: the host part
 * replaced by advertise when given, or by host when bound to a wildcard address. out holds
 * PROTO_MAX_ENDPOINT + 1 bytes. Fails with SEMOE_EINVAL when the result does not fit. */
semoe_rc worker_control_advertised(const char *bound, const char *advertise, const char *host,
                                   char out[PROTO_MAX_ENDPOINT + 1]);

#endif
