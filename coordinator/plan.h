/* A generation's plan: ranks for the members in join order, the experts placed over them
 * (placement.h: what a live member held stays put), each member's list of experts, and the
 * PLAN message every member gets, its shared body encoded once for all of them. */
#ifndef SEMOE_COORDINATOR_PLAN_H
#define SEMOE_COORDINATOR_PLAN_H

#include <stdint.h>

#include "coordinator/members.h"
#include "proto/msg.h"

typedef struct plan plan_t;

/* Plans for num_layers x num_experts experts (at most PROTO_MAX_EXPERTS). Caller owns it. */
plan_t *plan_new(uint32_t num_layers, uint32_t num_experts);
void plan_destroy(plan_t **self_p);

/* Renumbers the members (ranks 0..n-1 in join order) and places the experts: experts held by
 * a placed member stay with it where balance allows. Every member then gets its experts and is
 * placed and SYNCING. *world gets n, *moved the experts whose holder changed or that had none. */
semoe_rc plan_place(plan_t *self, members_t *members, uint32_t *world, uint64_t *moved);

/* Encodes the PLAN of the last plan_place (step and global_batch go into its body) and sends
 * every member its copy over sock (a ROUTER): hdr gives the run id and generation, and its seq
 * is advanced per message. A member the PLAN cannot be sent to is logged and skipped (its
 * liveness handles it). Fails only when the PLAN cannot be encoded. */
semoe_rc plan_send(plan_t *self, members_t *members, void *sock, proto_header_t *hdr,
                   uint64_t step, uint32_t global_batch);
/* Sends m its copy of the PLAN last sent (after a duplicate JOIN); nothing if m was not in
 * it. hdr as for plan_send. */
void plan_resend(plan_t *self, const member_t *m, void *sock, proto_header_t *hdr);

#endif
