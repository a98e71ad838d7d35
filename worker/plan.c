/* The worker's copy of a PLAN (worker/plan.h): checks the tables of a decoded PLAN against each
 * other before anything is taken from them, then copies out what this worker needs. */
#include "worker/plan.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/fmt.h"
#include "actors/log.h"

const char *worker_plan_check(const proto_plan_t *p, uint32_t num_layers, uint32_t num_experts)
{
    if (p->world == 0)
        return "world is 0";
    if (p->rank != PROTO_NO_RANK && p->rank >= p->world)
        return "rank is not below world";
    if (p->peers.count != p->world)
        return "peers do not match world";
    if (p->batch_offsets.count != p->world + 1)
        return "batch_offsets do not have world + 1 entries";
    uint64_t n = (uint64_t)p->num_layers * p->num_experts;
    if (n == 0 || n > PROTO_MAX_EXPERTS || p->holder_offsets.count != n + 1)
        return "holder_offsets do not have layers x experts + 1 entries";
    if (num_layers && num_experts &&
        (p->num_layers != num_layers || p->num_experts != num_experts))
        return "layers x experts differ from the job's model";
    uint32_t prev = 0;
    for (uint32_t i = 0; i <= p->world; i++) {
        uint32_t v = proto_u32_at(p->batch_offsets, i);
        if (v < prev || v > p->global_batch)
            return "batch_offsets are not ascending within global_batch";
        prev = v;
    }
    prev = 0;
    for (uint32_t e = 0; e <= n; e++) {
        uint32_t v = proto_u32_at(p->holder_offsets, e);
        if (v < prev || v > p->holders.count)
            return "holder_offsets are not ascending within holders";
        prev = v;
    }
    if (prev != p->holders.count)
        return "holder_offsets do not end at the number of holders";
    for (uint32_t i = 0; i < p->holders.count; i++)
        if (proto_u32_at(p->holders, i) >= p->world)
            return "a holder is not a rank";
    return NULL;
}

void worker_plan_clear(worker_plan_t *plan)
{
    free(plan->experts);
    free(plan->holder_off);
    free(plan->batch_off);
    free(plan->holders);
    free(plan->peers);
    free(plan->donors);
    memset(plan, 0, sizeof *plan);
    plan->rank = PROTO_NO_RANK;
    plan->donor_index = UINT32_MAX;
}

void worker_plan_take(worker_plan_t *plan, uint64_t gen, const proto_plan_t *p,
                      const char *self_id)
{
    worker_plan_clear(plan);
    plan->generation = gen;
    plan->rank = p->rank;
    plan->world = p->world;
    plan->num_layers = p->num_layers;
    plan->num_experts = p->num_experts;
    plan->step = p->step;
    plan->global_batch = p->global_batch;
    uint32_t n = p->num_layers * p->num_experts;
    plan->experts = semoe_xcalloc(n, sizeof *plan->experts);
    for (uint32_t e = 0; e < n && p->rank != PROTO_NO_RANK; e++) {
        uint32_t lo = proto_u32_at(p->holder_offsets, e);
        uint32_t hi = proto_u32_at(p->holder_offsets, e + 1);
        for (uint32_t i = lo; i < hi; i++)
            if (proto_u32_at(p->holders, i) == p->rank) {
                plan->experts[plan->n_experts++] = e;
                break;
            }
    }
    if (p->rank != PROTO_NO_RANK) {
        plan->batch_lo = proto_u32_at(p->batch_offsets, p->rank);
        plan->batch_hi = proto_u32_at(p->batch_offsets, p->rank + 1);
    }
    plan->batch_off = semoe_xmalloc(((size_t)p->world + 1) * sizeof *plan->batch_off);
    for (uint32_t r = 0; r <= p->world; r++)
        plan->batch_off[r] = proto_u32_at(p->batch_offsets, r);
    plan->holder_off = semoe_xmalloc(((size_t)n + 1) * sizeof *plan->holder_off);
    for (uint32_t e = 0; e <= n; e++)
        plan->holder_off[e] = proto_u32_at(p->holder_offsets, e);
    plan->holders = semoe_xmalloc(((size_t)p->holders.count + 1) * sizeof *plan->holders);
    for (uint32_t i = 0; i < p->holders.count; i++)
        plan->holders[i] = proto_u32_at(p->holders, i);
    plan->peers = semoe_xcalloc(p->world, sizeof *plan->peers);
    size_t pos = 0;
    for (uint32_t r = 0; r < p->world; r++)
        if (!proto_peers_next(&p->peers, &pos, plan->peers[r].id, plan->peers[r].endpoint))
            break;
    plan->n_donors = p->donors.count;
    plan->donors = semoe_xcalloc(p->donors.count + 1, sizeof *plan->donors);
    pos = 0;
    for (uint32_t d = 0; d < p->donors.count; d++) {
        if (!proto_peers_next(&p->donors, &pos, plan->donors[d].id, plan->donors[d].endpoint))
            break;
        if (self_id && strcmp(plan->donors[d].id, self_id) == 0)
            plan->donor_index = d;
    }
}

static void *s_dup(const void *p, size_t bytes)
{
    void *q = semoe_xmalloc(bytes ? bytes : 1);
    if (bytes)
        memcpy(q, p, bytes);
    return q;
}

void worker_plan_copy(worker_plan_t *dst, const worker_plan_t *src)
{
    *dst = *src;
    size_t n = (size_t)src->num_layers * src->num_experts;
    dst->experts = s_dup(src->experts, src->n_experts * sizeof *src->experts);
    dst->holder_off = src->holder_off ? s_dup(src->holder_off, (n + 1) * sizeof(uint32_t)) : NULL;
    dst->holders = src->holder_off ? s_dup(src->holders, src->holder_off[n] * sizeof(uint32_t))
                                   : NULL;
    dst->peers = s_dup(src->peers, src->world * sizeof *src->peers);
    dst->donors = s_dup(src->donors, src->n_donors * sizeof *src->donors);
    dst->batch_off = src->batch_off ? s_dup(src->batch_off, ((size_t)src->world + 1) *
                                                                sizeof(uint32_t))
                                    : NULL;
}

void worker_plan_ids_str(const uint32_t *ids, uint32_t n, char *buf, size_t size)
{
    if (n == 0)
        snprintf(buf, size, "none");
    else
        fmt_ranges(ids, n, buf, size);
}

void worker_plan_log(const worker_plan_t *plan)
{
    char experts[256];
    worker_plan_ids_str(plan->experts, plan->n_experts, experts, sizeof experts);
    char peers[512] = "";
    size_t len = 0;
    for (uint32_t r = 0; r < plan->world; r++) {
        if (len + strlen(plan->peers[r].id) + 6 >= sizeof peers) {
            snprintf(peers + len, sizeof peers - len, " ...");
            break;
        }
        len += (size_t)snprintf(peers + len, sizeof peers - len, "%s%s", r ? " " : "",
                                plan->peers[r].id);
    }
    uint32_t n = plan->num_layers * plan->num_experts;
    if (plan->rank == PROTO_NO_RANK)
        log_info("generation %" PRIu64 ": no rank in a world of %u (peers %s)", plan->generation,
                 plan->world, peers);
    else
        log_info("generation %" PRIu64 ": rank %u of %u, %u of %u experts [%s], batch [%" PRIu64
                 ", %" PRIu64 ") of %" PRIu64 ", from step %" PRIu64 ", peers %s",
                 plan->generation, plan->rank, plan->world, plan->n_experts, n, experts,
                 plan->batch_lo, plan->batch_hi, plan->global_batch, plan->step, peers);
}
