/* A generation's plan (plan.h): the placement's input from the members' current experts, the
 * placement by count or by load, its output back into per-member lists (a counting sort by
 * rank), and the PLAN messages. */
#include "coordinator/plan.h"

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"
#include "coordinator/balance.h"
#include "coordinator/placement.h"

/* Bytes of a PLAN besides its tables and peers: header, rank, scalars, msgpack headers. */
#define S_PLAN_OVERHEAD 4096

struct plan {
    uint32_t L, E;
    uint64_t n_total;       // L * E
    uint32_t min_replicas;  // the job's
    /* the current placement (the last plan_place) */
    uint32_t world;
    uint32_t *off;          // (n_total + 1) expert e's holders: holders[off[e] .. off[e + 1])
    uint32_t *holders;      // (cap) ranks
    size_t cap;
    /* the placement plan_compute made, which plan_place applies */
    uint32_t c_world;
    uint32_t *c_off;        // (n_total + 1)
    uint32_t *c_holders;    // (c_cap)
    size_t c_cap;
    /* scratch */
    uint32_t *prev_off;     // (n_total + 1) the current holders, in the new numbering
    uint32_t *prev_holders; // (prev_cap)
    size_t prev_cap;
    uint32_t *fill;         // (n_total + 1)
    uint32_t *prev1;        // (n_total) one previous holder per expert, for placement_compute
    double *uniform;        // (n_total) 1.0 each: loads while none are known
    bool warned_fit;        // logged that replicas were cut to fit a PLAN
    msgpack_sbuffer shared; // the last PLAN's body after rank, kept for plan_resend
    uint32_t shared_world;  // its world (0: none)
};

plan_t *plan_new(uint32_t num_layers, uint32_t num_experts, uint32_t min_replicas)
{
    plan_t *self = semoe_xcalloc(1, sizeof *self);
    self->L = num_layers;
    self->E = num_experts;
    self->n_total = (uint64_t)num_layers * num_experts;
    self->min_replicas = min_replicas ? min_replicas : 1;
    size_t n1 = self->n_total + 1;
    self->off = semoe_xcalloc(n1, sizeof *self->off);
    self->c_off = semoe_xcalloc(n1, sizeof *self->c_off);
    self->prev_off = semoe_xcalloc(n1, sizeof *self->prev_off);
    self->fill = semoe_xcalloc(n1, sizeof *self->fill);
    self->prev1 = semoe_xcalloc(n1, sizeof *self->prev1);
    self->uniform = semoe_xmalloc(n1 * sizeof *self->uniform);
    for (uint64_t e = 0; e < self->n_total; e++)
        self->uniform[e] = 1.0;
    msgpack_sbuffer_init(&self->shared);
    return self;
}

void plan_destroy(plan_t **self_p)
{
    plan_t *self = *self_p;
    if (!self)
        return;
    free(self->off);
    free(self->holders);
    free(self->c_off);
    free(self->c_holders);
    free(self->prev_off);
    free(self->prev_holders);
    free(self->fill);
    free(self->prev1);
    free(self->uniform);
    msgpack_sbuffer_destroy(&self->shared);
    free(self);
    *self_p = NULL;
}

static void s_reserve(uint32_t **arr, size_t *cap, size_t need)
{
    if (need <= *cap)
        return;
    *arr = semoe_xrealloc(*arr, need * sizeof **arr);
    *cap = need;
}

/* prev_off / prev_holders: what every staying placed member holds now, under the rank it gets
 * next (members that are not leaving, numbered in join order). Returns that number of ranks. */
static uint32_t s_prev(plan_t *self, const members_t *members)
{
    uint64_t T = self->n_total;
    memset(self->prev_off, 0, (T + 1) * sizeof *self->prev_off);
    uint32_t n = 0;
    for (const member_t *m = members_first(members); m; m = m->next) {
        if (m->leaving)
            continue;
        for (uint32_t i = 0; m->placed && i < m->n_experts; i++)
            if (m->experts[i] < T)
                self->prev_off[m->experts[i] + 1]++;
        n++;
    }
    for (uint64_t e = 0; e < T; e++)
        self->prev_off[e + 1] += self->prev_off[e];
    s_reserve(&self->prev_holders, &self->prev_cap, self->prev_off[T] ? self->prev_off[T] : 1);
    memcpy(self->fill, self->prev_off, (T + 1) * sizeof *self->fill);
    uint32_t r = 0;
    for (const member_t *m = members_first(members); m; m = m->next) {
        if (m->leaving)
            continue;
        for (uint32_t i = 0; m->placed && i < m->n_experts; i++)
            if (m->experts[i] < T)
                self->prev_holders[self->fill[m->experts[i]]++] = r;
        r++;
    }
    return n;
}

/* Holder entries a PLAN to these members can carry within PROTO_MAX_MSG. */
static uint64_t s_holder_budget(const plan_t *self, const members_t *members, uint32_t n)
{
    uint64_t fixed = S_PLAN_OVERHEAD + 4 * (self->n_total + 1) + 4 * ((uint64_t)n + 1);
    for (const member_t *m = members_first(members); m; m = m->next)
        fixed += strlen(m->id) + strlen(m->data_endpoint) + 16;
    uint64_t budget = fixed < PROTO_MAX_MSG ? (PROTO_MAX_MSG - fixed) / 4 : 0;
    return budget < PROTO_MAX_HOLDERS ? budget : PROTO_MAX_HOLDERS;
}

/* One holder per expert, balanced by count, fewest moves (placement.h). */
static semoe_rc s_by_count(plan_t *self, uint32_t n, plan_report_t *rep)
{
    uint64_t T = self->n_total;
    for (uint64_t e = 0; e < T; e++)
        self->prev1[e] = self->prev_off[e] < self->prev_off[e + 1]
                             ? self->prev_holders[self->prev_off[e]]
                             : PLACEMENT_NONE;
    s_reserve(&self->c_holders, &self->c_cap, T ? T : 1);
    SEMOE_CHECK(placement_compute(self->L, self->E, n, self->prev1, self->c_holders));
    for (uint64_t e = 0; e <= T; e++)
        self->c_off[e] = (uint32_t)e;
    rep->copies = T;
    rep->min_replicas = 1;
    rep->slots = 0;
    rep->moved = 0;
    for (uint64_t e = 0; e < T; e++) { // a copy moves unless one of its holders had it
        bool kept = false;
        for (uint32_t i = self->prev_off[e]; i < self->prev_off[e + 1]; i++)
            kept = kept || self->prev_holders[i] == self->c_holders[e];
        rep->moved += !kept;
    }
    return SEMOE_OK;
}

semoe_rc plan_compute(plan_t *self, const members_t *members, const double *load,
                      plan_report_t *report)
{
    plan_report_t rep = {.before = plan_imbalance(self, load), .after = NAN};
    uint64_t T = self->n_total;
    uint32_t n = s_prev(self, members);
    for (const member_t *m = members_first(members); m; m = m->next)
        rep.donors += m->leaving;
    rep.world = self->c_world = n;
    if (n == 0 || T == 0) {
        memset(self->c_off, 0, (T + 1) * sizeof *self->c_off);
        if (report)
            *report = rep;
        return SEMOE_OK;
    }
    uint32_t m = self->min_replicas < n ? self->min_replicas : n;
    if (!load && m == 1) {
        SEMOE_CHECK(s_by_count(self, n, &rep));
    } else {
        /* Slots: what min_replicas needs, plus one spare per worker per layer for replicas of
         * hot experts once loads say which; as many as a PLAN can carry. */
        uint64_t budget = s_holder_budget(self, members, n), per = (uint64_t)self->L * n;
        uint64_t need = ((uint64_t)self->E * m + n - 1) / n;
        uint32_t want = m;
        while (m > 1 && per * need > budget) {
            m--;
            need = ((uint64_t)self->E * m + n - 1) / n;
        }
        uint64_t slots = need + (load ? 1 : 0);
        slots = slots < self->E ? slots : self->E;
        slots = per * slots <= budget ? slots : budget / per;
        if (per * need > budget || m < want || (load && slots <= need && need < self->E)) {
            if (!self->warned_fit)
                log_warn("placement: %u layers x %u experts on %u workers: a PLAN of %u "
                         "replicas%s does not fit in %d MiB: %s", self->L, self->E, n, want,
                         load ? " and spare slots" : "", PROTO_MAX_MSG >> 20,
                         per * need > budget ? "one holder per expert, by count"
                                             : "fewer replicas");
            self->warned_fit = true;
        }
        if (per * need > budget) {
            SEMOE_CHECK(s_by_count(self, n, &rep));
        } else {
            s_reserve(&self->c_holders, &self->c_cap, per * slots);
            balance_shape_t shape = {.num_layers = self->L, .num_experts = self->E,
                                     .workers = n, .slots = (uint32_t)slots, .min_replicas = m,
                                     .keep_slack = PLAN_KEEP_SLACK};
            balance_report_t br = {.worker_load = NULL};
            SEMOE_CHECK(balance_place(&shape, load ? load : self->uniform, self->prev_off,
                                      self->prev_holders, self->c_off, self->c_holders, &br));
            rep.copies = br.copies;
            rep.moved = br.moves;
            rep.min_replicas = m;
            rep.slots = (uint32_t)slots;
        }
    }
    if (load)
        rep.after = balance_imbalance(self->L, self->E, n, load, self->c_off, self->c_holders);
    if (report)
        *report = rep;
    return SEMOE_OK;
}

/* Gives each placed member the experts its rank holds in the current placement, ascending. */
static void s_experts_by_rank(plan_t *self, members_t *members)
{
    uint32_t n = self->world;
    uint64_t T = self->n_total, H = self->off[T];
    uint32_t *roff = semoe_xcalloc((size_t)n + 2, sizeof *roff);
    for (uint64_t i = 0; i < H; i++)
        roff[self->holders[i] + 1]++;
    for (uint32_t r = 0; r < n; r++)
        roff[r + 1] += roff[r];
    uint32_t *fill = semoe_xmalloc(((size_t)n + 1) * sizeof *fill);
    memcpy(fill, roff, ((size_t)n + 1) * sizeof *fill);
    uint32_t *by_rank = semoe_xmalloc((H ? H : 1) * sizeof *by_rank);
    for (uint64_t e = 0; e < T; e++)
        for (uint32_t i = self->off[e]; i < self->off[e + 1]; i++)
            by_rank[fill[self->holders[i]]++] = (uint32_t)e;
    for (member_t *m = members_first(members); m; m = m->next)
        if (m->placed && m->rank < n)
            members_set_experts(m, by_rank + roff[m->rank], roff[m->rank + 1] - roff[m->rank]);
    free(by_rank);
    free(fill);
    free(roff);
}

/* Gives each member its experts from the current placement (ranks from members_renumber); the
 * leaving ones become donors. */
static void s_assign(plan_t *self, members_t *members)
{
    for (member_t *m = members_first(members); m; m = m->next) {
        m->state = MEMBER_SYNCING;
        m->has_load = false;
        m->pause_acked = m->paused = false;
        m->placed = !m->leaving;
        m->donor = m->leaving;
        if (m->leaving)
            members_set_experts(m, NULL, 0);
    }
    s_experts_by_rank(self, members);
}

semoe_rc plan_place(plan_t *self, members_t *members, const double *load,
                    plan_report_t *report)
{
    SEMOE_CHECK(plan_compute(self, members, load, report));
    uint32_t *t = self->off;
    self->off = self->c_off, self->c_off = t;
    t = self->holders;
    self->holders = self->c_holders, self->c_holders = t;
    size_t c = self->cap;
    self->cap = self->c_cap, self->c_cap = c;
    self->world = self->c_world;
    uint32_t n = members_renumber(members);
    if (n != self->world) // plan_compute numbered the same members the same way
        return semoe_err(SEMOE_EINVAL, "plan: %u ranks placed, %u renumbered", self->world, n);
    s_assign(self, members);
    return SEMOE_OK;
}

bool plan_keep(plan_t *self, members_t *members, const double *load, plan_report_t *report)
{
    uint32_t r = 0;
    for (const member_t *m = members_first(members); m; m = m->next, r++)
        if (m->leaving || !m->placed || m->rank != r)
            return false;
    if (r == 0 || r != self->world)
        return false;
    s_assign(self, members); // the same experts, with fresh load slots as a new plan gives
    double imbalance = plan_imbalance(self, load);
    if (report)
        *report = (plan_report_t){.world = r, .copies = self->off[self->n_total],
                                  .min_replicas = self->min_replicas < r ? self->min_replicas : r,
                                  .before = imbalance, .after = imbalance};
    return true;
}

void plan_restore(plan_t *self, members_t *members, uint32_t world, const uint32_t *off,
                  const uint32_t *holders)
{
    uint64_t T = self->n_total;
    self->world = world;
    self->shared_world = 0;
    if (world == 0) {
        memset(self->off, 0, (T + 1) * sizeof *self->off);
        return;
    }
    memcpy(self->off, off, (T + 1) * sizeof *self->off);
    s_reserve(&self->holders, &self->cap, off[T] ? off[T] : 1);
    memcpy(self->holders, holders, off[T] * sizeof *self->holders);
    s_experts_by_rank(self, members);
}

double plan_imbalance(const plan_t *self, const double *load)
{
    if (!load || self->world == 0)
        return NAN;
    return balance_imbalance(self->L, self->E, self->world, load, self->off, self->holders);
}

uint32_t plan_world(const plan_t *self) { return self->world; }
const uint32_t *plan_offsets(const plan_t *self) { return self->off; }
const uint32_t *plan_holders(const plan_t *self) { return self->holders; }

semoe_rc plan_send(plan_t *self, members_t *members, void *sock, proto_header_t *hdr,
                   uint64_t step, uint32_t global_batch)
{
    uint32_t n = self->world, d = 0;
    self->shared_world = 0;
    if (n == 0)
        return SEMOE_OK;
    for (member_t *m = members_first(members); m; m = m->next)
        d += m->donor;
    uint32_t *batch = semoe_xmalloc(((size_t)n + 1) * sizeof *batch);
    const char **ids = semoe_xmalloc(n * sizeof *ids), **eps = semoe_xmalloc(n * sizeof *eps);
    const char **dids = semoe_xmalloc((d ? d : 1) * sizeof *dids);
    const char **deps = semoe_xmalloc((d ? d : 1) * sizeof *deps);
    placement_batch_offsets(global_batch, n, batch);
    d = 0;
    for (member_t *m = members_first(members); m; m = m->next) {
        if (m->donor) {
            dids[d] = m->id;
            deps[d++] = m->data_endpoint;
        } else if (m->placed) {
            ids[m->rank] = m->id;
            eps[m->rank] = m->data_endpoint;
        }
    }
    proto_plan_t plan = {
        .world = n, .num_layers = self->L, .num_experts = self->E, .step = step,
        .global_batch = global_batch,
        .batch_offsets = PROTO_U32S(batch, (size_t)n + 1),
        .holder_offsets = PROTO_U32S(self->off, self->n_total + 1),
        .holders = PROTO_U32S(self->holders, self->off[self->n_total]),
        .peers = PROTO_PEERS(ids, eps, n),
        .donors = PROTO_PEERS(dids, deps, d),
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
    free(dids);
    free(deps);
    if (rc != SEMOE_OK)
        semoe_err_trace(__FILE__, __LINE__);
    return rc;
}

void plan_resend(plan_t *self, const member_t *m, void *sock, proto_header_t *hdr)
{
    uint32_t rank;
    if (!members_bound(m)) // restored after a restart and not back: nowhere to send it
        return;
    if (m->donor)
        rank = PROTO_NO_RANK;
    else if (m->placed && m->rank < self->shared_world)
        rank = m->rank;
    else
        return;
    if (self->shared_world == 0)
        return;
    msgpack_sbuffer out;
    msgpack_sbuffer_init(&out);
    hdr->type = PROTO_PLAN;
    hdr->seq++;
    if (proto_plan_encode_for(hdr, rank, &self->shared, &out) != SEMOE_OK ||
        proto_send_sbuf(sock, m->rid, m->rid_len, &out) != SEMOE_OK)
        log_warn("generation %" PRIu64 ": PLAN for %s: %s", hdr->generation, m->id,
                 semoe_err_msg());
    msgpack_sbuffer_destroy(&out);
}
