/* A generation's plan (plan.h): the placement's input from the members' current experts, its
 * output back into per-member lists (a counting sort by rank), and the PLAN messages. */
#include "coordinator/plan.h"

#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"
#include "coordinator/placement.h"

struct plan {
    uint32_t L, E;
    uint64_t n_total;     // L * E
    uint32_t world;       // members in the last placement
    uint32_t *prev;       // (n_total) holder ranks before, in the new numbering
    uint32_t *holder;     // (n_total) holder ranks now
    uint32_t *by_rank;    // (n_total) expert ids grouped by holder
    uint32_t *holder_off; // (n_total + 1) one holder per expert: 0, 1, 2, ...
    msgpack_sbuffer shared; // the last PLAN's body after rank, kept for plan_resend
    uint32_t shared_world;  // its world (0: none)
};

plan_t *plan_new(uint32_t num_layers, uint32_t num_experts)
{
    plan_t *self = semoe_xcalloc(1, sizeof *self);
    self->L = num_layers;
    self->E = num_experts;
    self->n_total = (uint64_t)num_layers * num_experts;
    self->prev = semoe_xmalloc(self->n_total * sizeof *self->prev);
    self->holder = semoe_xmalloc(self->n_total * sizeof *self->holder);
    self->by_rank = semoe_xmalloc(self->n_total * sizeof *self->by_rank);
    self->holder_off = semoe_xmalloc((self->n_total + 1) * sizeof *self->holder_off);
    for (uint64_t e = 0; e < self->n_total; e++)
        self->holder[e] = PLACEMENT_NONE;
    for (uint64_t e = 0; e <= self->n_total; e++)
        self->holder_off[e] = (uint32_t)e;
    msgpack_sbuffer_init(&self->shared);
    return self;
}

void plan_destroy(plan_t **self_p)
{
    plan_t *self = *self_p;
    if (!self)
        return;
    free(self->prev);
    free(self->holder);
    free(self->by_rank);
    free(self->holder_off);
    msgpack_sbuffer_destroy(&self->shared);
    free(self);
    *self_p = NULL;
}

/* Gives each member its experts from self->holder, ascending. */
static void s_assign(plan_t *self, members_t *members, uint32_t n)
{
    uint32_t *off = semoe_xcalloc((size_t)n + 1, sizeof *off);
    for (uint64_t e = 0; e < self->n_total; e++)
        off[self->holder[e] + 1]++;
    for (uint32_t r = 0; r < n; r++)
        off[r + 1] += off[r];
    uint32_t *fill = semoe_xmalloc(((size_t)n + 1) * sizeof *fill);
    memcpy(fill, off, ((size_t)n + 1) * sizeof *fill);
    for (uint64_t e = 0; e < self->n_total; e++)
        self->by_rank[fill[self->holder[e]]++] = (uint32_t)e;
    for (member_t *m = members_first(members); m; m = m->next) {
        members_set_experts(m, self->by_rank + off[m->rank], off[m->rank + 1] - off[m->rank]);
        m->placed = true;
        m->state = MEMBER_SYNCING;
        m->has_load = false;
    }
    free(fill);
    free(off);
}

semoe_rc plan_place(plan_t *self, members_t *members, uint32_t *world, uint64_t *moved)
{
    uint32_t n = members_renumber(members);
    for (uint64_t e = 0; e < self->n_total; e++)
        self->prev[e] = PLACEMENT_NONE;
    for (member_t *m = members_first(members); m; m = m->next)
        for (uint32_t i = 0; m->placed && i < m->n_experts; i++)
            self->prev[m->experts[i]] = m->rank;
    SEMOE_CHECK(placement_compute(self->L, self->E, n, self->prev, self->holder));
    *moved = 0;
    for (uint64_t e = 0; e < self->n_total; e++)
        *moved += self->prev[e] != self->holder[e];
    self->world = *world = n;
    if (n > 0)
        s_assign(self, members, n);
    return SEMOE_OK;
}

semoe_rc plan_send(plan_t *self, members_t *members, void *sock, proto_header_t *hdr,
                   uint64_t step, uint32_t global_batch)
{
    uint32_t n = self->world;
    self->shared_world = 0;
    if (n == 0)
        return SEMOE_OK;
    uint32_t *batch = semoe_xmalloc(((size_t)n + 1) * sizeof *batch);
    const char **ids = semoe_xmalloc(n * sizeof *ids), **eps = semoe_xmalloc(n * sizeof *eps);
    placement_batch_offsets(global_batch, n, batch);
    for (member_t *m = members_first(members); m; m = m->next) {
        ids[m->rank] = m->id;
        eps[m->rank] = m->data_endpoint;
    }
    proto_plan_t plan = {
        .world = n, .num_layers = self->L, .num_experts = self->E, .step = step,
        .global_batch = global_batch,
        .batch_offsets = PROTO_U32S(batch, (size_t)n + 1),
        .holder_offsets = PROTO_U32S(self->holder_off, self->n_total + 1),
        .holders = PROTO_U32S(self->holder, self->n_total),
        .peers = PROTO_PEERS(ids, eps, n),
    };
    msgpack_sbuffer_destroy(&self->shared);
    msgpack_sbuffer_init(&self->shared);
    semoe_rc rc = proto_plan_encode_shared(&plan, &self->shared);
    self->shared_world = rc == SEMOE_OK ? n : 0;
    for (member_t *m = members_first(members); rc == SEMOE_OK && m; m = m->next)
        plan_resend(self, m, sock, hdr);
    free(batch);
    free(ids);
    free(eps);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

void plan_resend(plan_t *self, const member_t *m, void *sock, proto_header_t *hdr)
{
    if (!m->placed || m->rank >= self->shared_world)
        return;
    msgpack_sbuffer out;
    msgpack_sbuffer_init(&out);
    hdr->type = PROTO_PLAN;
    hdr->seq++;
    if (proto_plan_encode_for(hdr, m->rank, &self->shared, &out) != SEMOE_OK ||
        proto_send_sbuf(sock, m->rid, m->rid_len, &out) != SEMOE_OK)
        log_warn("generation %" PRIu64 ": PLAN for %s: %s", hdr->generation, m->id,
                 semoe_err_msg());
    msgpack_sbuffer_destroy(&out);
}
