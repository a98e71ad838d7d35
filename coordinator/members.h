/* The membership table: workers in join order (ranks dense 0..n-1), found by routing id or
 * worker id in constant time (randomly seeded hash maps); and the fence, a bounded set of
 * routing ids that broke protocol, ignored until they JOIN again. */
#ifndef SEMOE_COORDINATOR_MEMBERS_H
#define SEMOE_COORDINATOR_MEMBERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "proto/msg.h"

#define MEMBERS_MAX_RID 255   /* ZeroMQ routing ids are 1..255 bytes */
#define MEMBERS_FENCE_MAX 4096 /* fenced routing ids remembered; the oldest is forgotten first */

typedef enum { MEMBER_SYNCING = 0, MEMBER_ACTIVE } member_state_t;

/* One worker. The table owns it; a pointer stays valid until members_remove. */
typedef struct member {
    char id[PROTO_MAX_NAME + 1];
    uint8_t rid[MEMBERS_MAX_RID];
    uint8_t rid_len;        /* 0: restored after a restart, not back yet (members_bind) */
    /* capabilities, from JOIN */
    char host[PROTO_MAX_HOST + 1];
    uint32_t pid;
    char device_kind[9];
    char device_name[PROTO_MAX_NAME + 1];
    uint32_t device_index;
    char data_endpoint[PROTO_MAX_ENDPOINT + 1];
    uint64_t mem_total[PROTO_TIERS]; /* bytes offered per tier */
    /* liveness and progress, from HEARTBEAT */
    uint64_t mem_used[PROTO_TIERS];
    uint64_t step, step_time_us;
    double loss;            /* of its last step; NaN: none yet */
    double eval_loss;       /* of its last evaluation, after eval_step steps; NaN: none yet */
    uint64_t eval_step;
    double tokens_per_s;    /* its own, over its last step: a finite number >= 0 */
    uint32_t phase;         /* proto_phase_t */
    uint64_t failed_logged; /* 1 + the generation its failure was last logged in (0: never) */
    bool has_step;          /* a HEARTBEAT was seen */
    bool has_load;          /* a load of the current plan was taken from it */
    uint64_t load_step;     /* the step of that load: a load counts once per step */
    uint32_t *load_last;    /* (n_experts) tokens each of its copies took in that step */
    int64_t last_seen_ms;   /* any message counts */
    /* the plan */
    uint32_t rank;          /* dense 0..n-1 in join order, set by members_renumber */
    member_state_t state;   /* ACTIVE once it acked the current generation's PLAN */
    uint64_t acked_gen;     /* the last generation it acked (0: none) */
    bool placed;            /* holds the experts of the current plan (false after a (re)JOIN) */
    uint32_t *experts;      /* (n_experts) global expert ids it holds, ascending */
    uint32_t n_experts;
    /* elastic reconfiguration (coordinator/reconfig.c) */
    bool leaving;           /* asked to leave with handover: a donor from the next PLAN on */
    bool donor;             /* got the current PLAN as a donor (no rank, no experts) */
    bool pause_acked;       /* acked the PAUSE under way */
    bool paused;            /* reported PAUSED (after acking the PAUSE), at step */
    /* status.c's memo: this member's part of the status reply that changes only with its
     * capabilities or the plan, written for status_part_gen; NULL when it must be rewritten
     * (members_set_caps and members_set_experts drop it) */
    char *status_part;
    size_t status_part_len;
    uint64_t status_part_gen;
    /* the table's links */
    struct member *prev, *next;
    uint64_t join_seq;
} member_t;

typedef struct members members_t;

/* An empty table; the caller owns it. */
members_t *members_new(void);
/* Frees the table, its members and the fence; nulls *self_p. */
void members_destroy(members_t **self_p);

/* Live members. */
uint32_t members_count(const members_t *self);
/* The member with this routing id, or NULL. */
member_t *members_by_rid(const members_t *self, const void *rid, size_t rid_len);
/* The member with this worker id, or NULL. */
member_t *members_by_id(const members_t *self, const char *id);

/* Adds a member with this routing id (1..MEMBERS_MAX_RID bytes) and worker id (neither may be
 * in the table), last in join order, SYNCING, no progress (members_clear_progress), everything
 * else zero; lifts any fence on the routing id. The caller fills in the capabilities. Returns
 * NULL when the table holds PROTO_MAX_WORKERS members already. */
member_t *members_add(members_t *self, const void *rid, size_t rid_len, const char *id);
/* Adds a member known only by its worker id (not in the table), as a restarted coordinator
 * restores it: no routing id until members_bind, SYNCING, no progress. NULL when the table is
 * full. */
member_t *members_add_unbound(members_t *self, const char *id);
/* Gives an unbound member the routing id (1..MEMBERS_MAX_RID bytes, not in the table) its
 * connection came from, and lifts any fence on it. */
void members_bind(members_t *self, member_t *m, const void *rid, size_t rid_len);
/* Whether m has a routing id: messages can reach it. */
static inline bool members_bound(const member_t *m) { return m->rid_len > 0; }
/* Members without a routing id. */
uint32_t members_unbound(const members_t *self);
/* Gives m another worker id (not in the table); keeps its place in join order. */
void members_rename(members_t *self, member_t *m, const char *id);
/* Removes m and frees it; m is invalid afterwards. */
void members_remove(members_t *self, member_t *m);

/* Iterates in join order: for (m = members_first(t); m; m = m->next). To remove while
 * iterating, take m->next first. */
member_t *members_first(const members_t *self);

/* Gives ranks 0..n-1 in join order to the members that are not leaving, PROTO_NO_RANK to those
 * that are, and returns n. */
uint32_t members_renumber(members_t *self);

/* Why a JOIN cannot be accepted ("id is empty", ...), or NULL when it can. Names end up in
 * logs and status JSON, so they must be printable ASCII (ids and endpoints without spaces). */
const char *members_join_invalid(const proto_join_t *j);
/* Copies a JOIN's capabilities into m (and clears the memory in use). */
void members_set_caps(member_t *m, const proto_join_t *j);
/* Copies a HEARTBEAT's progress into m: memory in use, step, step time, losses (NaN at step 0,
 * and the held-out one at eval_step 0), tokens per second (a rate that is not a finite number
 * >= 0 taken as 0), phase. */
void members_set_progress(member_t *m, const proto_heartbeat_t *h);
/* Forgets m's progress (as when it has sent no HEARTBEAT yet): losses NaN, the rest zero. */
void members_clear_progress(member_t *m);

/* Sets m's experts (copied); their last loads (load_last) start at 0. */
void members_set_experts(member_t *m, const uint32_t *experts, uint32_t n);

/* The fence: a routing id that broke protocol is ignored until it JOINs. */
void members_fence(members_t *self, const void *rid, size_t rid_len);
bool members_fenced(const members_t *self, const void *rid, size_t rid_len);
void members_unfence(members_t *self, const void *rid, size_t rid_len);

#endif
