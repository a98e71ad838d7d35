/* Simulated workers for the control-plane benchmark: an actor owns a share of them, each a
 * DEALER socket that JOINs the coordinator, heartbeats every interval from its WELCOME, ACKs
 * every PLAN with its generation, and notes when a PLAN of a marked generation arrived. */
#ifndef SEMOE_BENCH_SIMWORKER_H
#define SEMOE_BENCH_SIMWORKER_H

#include <stdint.h>

typedef struct {
    const char *endpoint; /* the coordinator's control endpoint */
    void **ctxs;          /* ZeroMQ contexts this driver spreads its sockets over */
    int n_ctxs;
    int first, stride;    /* it owns the workers first, first + stride, ... below total */
    int total;
    uint32_t n_loads;     /* heartbeat load array length: MoE layers x experts per layer */
    uint64_t seed;        /* staggers the first heartbeats */
} simworker_args_t;

/* The actor body (actor_new(ctx, simworker_actor, &args); args stay the caller's and must
 * outlive the actor). Commands on the pipe, each answered with one string:
 *   "JOIN A B"  JOIN every owned worker i with A <= i < B   -> "OK T" (T: first send, mono us)
 *   "LEAVE I"   worker I sends LEAVE and closes its socket  -> "OK T" or "NO"
 *   "KILL I"    worker I closes its socket without a word   -> "OK T" or "NO"
 *   "MARK G"    from now note the first PLAN of a generation >= G per worker -> "OK"
 *   "QUERY"     -> "LIVE MARKED FIRST_US LAST_US GEN_MIN GEN_MAX ERRORS REJOINS REFUSED"
 * LIVE counts the workers with an open socket, MARKED those of them that saw a marked PLAN,
 * FIRST/LAST the earliest and latest such arrival; ERRORS counts ERROR replies and messages
 * that did not decode, REJOINS the JOINs sent again after NOT_MEMBER, REFUSED the JOINs
 * refused. A worker told to STOP closes its socket. */
void simworker_actor(void *pipe, void *args);

/* Which driver of n owns worker i (the args' first must be its index, stride n). */
static inline int simworker_owner(int i, int n) { return i % n; }

#endif
