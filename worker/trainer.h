/* The worker's trainer actor: owns the worker's data port and, per plan generation, the
 * communicator, the parameters of the experts it holds, the optimizer and the data slice; runs
 * training steps in lockstep with its peers (expert parallel for experts, data parallel for
 * the dense tensors) and reports progress to the control actor. docs/training.md is the
 * picture.
 *
 * A generation starts with a migration (worker/migrate.h): the workers' newest training state
 * moves peer to peer to the new placement, or, when some of it has no live holder, every
 * worker rewinds consistently to the last checkpoint under train.checkpoint_dir (or the seeded
 * initialisation when there is none): so a job that is started again, on any number of
 * workers, resumes where its last checkpoint left it. Checkpoints are written in the
 * background from a snapshot and fenced by generation (worker/ckpt.h). */
#ifndef SEMOE_WORKER_TRAINER_H
#define SEMOE_WORKER_TRAINER_H

#include <stdint.h>

#include "actors/actor.h"
#include "proto/msg.h"

/* What the trainer reports after every step and every change of phase. */
typedef struct {
    uint64_t generation;
    uint64_t step;          /* steps completed: the next step to run */
    uint64_t step_time_us;  /* wall time of the last step */
    uint64_t eval_step;     /* step count at the last held-out evaluation (0: none) */
    double loss;            /* the global batch's loss at the last step (NaN: none yet) */
    double eval_loss;       /* held-out cross-entropy at eval_step (NaN: none) */
    double tokens_per_s;    /* this worker's targets per second over the last step */
    uint64_t ready_gen;     /* the last generation whose plan it has taken up (migrated) */
    uint64_t moved_bytes;   /* training state it received from peers in that migration */
    uint32_t phase;         /* proto_phase_t (proto/msg.h), as HEARTBEAT carries it */
    uint32_t handed_over;   /* 1 once, as a donor, it handed its state over */
    uint32_t stopped;       /* 1 once a STOP's checkpoint is written (or there was none to do) */
    uint32_t n_load;        /* entries in the load frame that follows (layers x experts) */
} worker_progress_t;

/* What the actor needs; the creator owns it and keeps it alive until actor_destroy returns. */
typedef struct {
    void *ctx;
    const char *id;           /* the worker's name, for logs and metrics */
    const char *host;         /* replaces a wildcard bind address in the advertised endpoint */
    const char *advertise;    /* NULL, or the host peers use */
    const char *data_bind;    /* where the data port binds, "tcp://127.0.0.1:*" */
    int threads;              /* BLAS threads (--threads); 0 leaves OpenBLAS's default */
    int cuda_device;          /* -1: train on the CPU backend; N: on gpu/'s, device cuda:N */
    const char *metrics_log;  /* NULL, or a file to append one JSON line per step to */
    const char *poke;         /* inproc endpoint the control actor's poke PAIR is bound to */
    struct worker_commid *commid; /* COMM's ids from the control actor (worker/commid.h) */
    char data_endpoint[PROTO_MAX_ENDPOINT + 1]; /* set by the actor before it signals ready */
    char error[512];          /* why the actor could not start */
    int error_exit;           /* exit code that suits error (2: a bad flag value) */
} worker_trainer_config_t;

/* The actor body: actor_new(ctx, worker_trainer_actor, &config). Binds the data port before it
 * signals ready (non-zero, with config.error set, when it cannot, or the metrics log cannot be
 * opened).
 *
 * Commands on the pipe:
 *   "JOB" text         the job spec from WELCOME (JSON); a different job drops everything
 *   "PLAN" ptr         a worker_plan_t * (worker/plan.h), heap-allocated, now the trainer's:
 *                      start this generation: migrate (worker/migrate.h), then train, or as
 *                      a donor hand the state over; progress.ready_gen says when it is done
 *   "PAUSE"            stop at the next step boundary the ranks agree on (phase PAUSED)
 *   "RESUME"           go on
 *   "STOP"             checkpoint at the next step boundary the ranks agree on (at once when
 *                      paused), then take no more steps; progress.stopped says when it is done
 *   "$TERM"            end
 * From the actor: "PROGRESS" [worker_progress_t] [n_load uint32 tokens per expert (layer*E+j)
 * the experts held here received in the last step, 0 elsewhere]. A byte on the poke socket
 * (config.poke, an inproc address the actor connects a PAIR to) interrupts a collective the
 * trainer is waiting in (worker/comm.h comm_port_set_interrupt): the control actor pokes with
 * every PLAN, so that a dead peer of the old generation never holds the trainer. */
void worker_trainer_actor(void *pipe, void *args);

#endif
