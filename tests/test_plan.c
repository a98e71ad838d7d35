/* coordinator/plan: the placement a generation gets, on random shapes and loads. By count
 * (one holder each, balanced) before loads are known with min_replicas 1; by load with
 * min_replicas copies and one spare slot per worker per layer once they are; leaving members
 * become donors (no rank, no experts, every expert still on min_replicas of the others); the
 * same inputs again move nothing; min_replicas is capped at the number of workers. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/balance.h"
#include "coordinator/members.h"
#include "coordinator/plan.h"
#include "tests/harness.h"

/* REQUIRE for a function without a result: ends the round. */
#define REQUIRE_VOID(cond, ...)                                                 \
    do {                                                                        \
        bool held_ = (cond);                                                    \
        CHECK_HELD(held_, #cond, __VA_ARGS__);                                  \
        if (!held_)                                                             \
            return;                                                             \
    } while (0)

static member_t *s_add(members_t *ms, int i)
{
    char id[32];
    uint8_t rid[4] = {1, (uint8_t)(i >> 16), (uint8_t)(i >> 8), (uint8_t)i};
    snprintf(id, sizeof id, "w%d", i);
    member_t *m = members_add(ms, rid, sizeof rid, id);
    proto_join_t j = {.device_kind = "cpu"};
    snprintf(j.data_endpoint, sizeof j.data_endpoint, "tcp://127.0.0.1:%d", 10000 + i);
    members_set_caps(m, &j);
    return m;
}

/* Checks the current placement of plan against the members: every expert's holders distinct
 * ranks, at least want copies, each member's list the experts its rank holds; per layer and
 * worker at most max_per copies. Returns the copies. */
static uint64_t s_check(const plan_t *plan, const members_t *ms, uint32_t L, uint32_t E,
                        uint32_t want, uint32_t max_per, const char *what)
{
    uint32_t n = plan_world(plan);
    const uint32_t *off = plan_offsets(plan), *h = plan_holders(plan);
    uint32_t *per = calloc((size_t)n * L, sizeof *per);
    uint64_t copies = off[(size_t)L * E];
    bool ok = true;
    for (uint32_t e = 0; e < L * E && ok; e++) {
        ok = off[e + 1] - off[e] >= want;
        CHECK(ok, "%s: expert %u has %u holders, want %u", what, e, off[e + 1] - off[e], want);
        for (uint32_t i = off[e]; i < off[e + 1] && ok; i++) {
            ok = h[i] < n && (i == off[e] || h[i] > h[i - 1]);
            CHECK(ok, "%s: expert %u: holder %u", what, e, h[i]);
            if (ok)
                per[(size_t)h[i] * L + e / E]++;
        }
    }
    for (uint32_t k = 0; ok && k < n * L; k++) {
        ok = per[k] <= max_per;
        CHECK(ok, "%s: worker %u holds %u experts of layer %u, at most %u", what, k / L, per[k],
              k % L, max_per);
    }
    for (const member_t *m = members_first(ms); m && ok; m = m->next) {
        if (m->donor) {
            ok = !m->placed && m->n_experts == 0 && m->rank == PROTO_NO_RANK;
            CHECK(ok, "%s: donor %s placed %d with %u experts, rank %u", what, m->id, m->placed,
                  m->n_experts, m->rank);
            continue;
        }
        uint32_t k = 0;
        for (uint32_t e = 0; e < L * E; e++)
            for (uint32_t i = off[e]; i < off[e + 1]; i++)
                if (h[i] == m->rank) {
                    ok = ok && k < m->n_experts && m->experts[k] == e;
                    k++;
                }
        ok = ok && m->placed && k == m->n_experts;
        CHECK(ok, "%s: %s (rank %u) lists %u experts, holds %u", what, m->id, m->rank,
              m->n_experts, k);
    }
    free(per);
    return copies;
}

static void s_round(int round)
{
    uint32_t L = 1 + (uint32_t)test_rand_below(4), E = 2 + (uint32_t)test_rand_below(15);
    uint32_t n = 2 + (uint32_t)test_rand_below(7), mr = 1 + (uint32_t)test_rand_below(3);
    char what[256];
    members_t *ms = members_new();
    for (uint32_t i = 0; i < n; i++)
        s_add(ms, (int)i);
    plan_t *plan = plan_new(L, E, mr);
    uint32_t m = mr < n ? mr : n;
    plan_report_t rep;

    /* no loads yet */
    REQUIRE_VOID(plan_place(plan, ms, NULL, &rep) == SEMOE_OK, "plan_place: %s", semoe_err_msg());
    snprintf(what, sizeof what, "round %d, %u x %u on %u, %u replicas, no load", round, L, E, n,
             mr);
    uint32_t need = (E * m + n - 1) / n;
    uint64_t copies = s_check(plan, ms, L, E, m, need, what);
    CHECK(rep.world == n && rep.min_replicas == m && rep.copies == copies && isnan(rep.after),
          "%s: report world %u, replicas %u, copies %llu of %llu", what, rep.world,
          rep.min_replicas, (unsigned long long)rep.copies, (unsigned long long)copies);
    if (m == 1)
        CHECK(copies == (uint64_t)L * E && rep.slots == 0, "%s: by count: %llu copies",
              what, (unsigned long long)copies);

    /* skewed loads: min_replicas copies and one spare slot per worker per layer */
    double *load = malloc((size_t)L * E * sizeof *load);
    for (uint32_t e = 0; e < L * E; e++)
        load[e] = test_rand_below(8) == 0 ? 2000 * test_rand_unit() : 100 * test_rand_unit();
    double before = plan_imbalance(plan, load);
    REQUIRE_VOID(plan_place(plan, ms, load, &rep) == SEMOE_OK, "plan_place: %s", semoe_err_msg());
    snprintf(what, sizeof what, "round %d, %u x %u on %u, %u replicas, skewed", round, L, E, n,
             mr);
    s_check(plan, ms, L, E, m, need + 1 < E ? need + 1 : E, what);
    double after = plan_imbalance(plan, load);
    CHECK(fabs(rep.before - before) < 1e-12 && fabs(rep.after - after) < 1e-12 &&
              rep.slots == (need + 1 < E ? need + 1 : E),
          "%s: report before %g (%g), after %g (%g), slots %u", what, rep.before, before,
          rep.after, after, rep.slots);
    double ref = balance_imbalance(L, E, n, load, plan_offsets(plan), plan_holders(plan));
    CHECK(after == ref, "%s: plan_imbalance %g, balance_imbalance %g", what, after, ref);

    /* the same inputs again: nothing moves */
    REQUIRE_VOID(plan_place(plan, ms, load, &rep) == SEMOE_OK, "plan_place: %s", semoe_err_msg());
    CHECK(rep.moved == 0, "%s: placing again moved %llu copies", what,
          (unsigned long long)rep.moved);

    /* one leaves with handover: a donor, its experts on the others, dense ranks */
    member_t *gone = members_first(ms);
    for (uint32_t k = (uint32_t)test_rand_below(n); k > 0; k--)
        gone = gone->next;
    uint32_t held = gone->n_experts;
    gone->leaving = true;
    REQUIRE_VOID(plan_place(plan, ms, load, &rep) == SEMOE_OK, "plan_place: %s", semoe_err_msg());
    snprintf(what, sizeof what, "round %d, %u x %u on %u, %u replicas, %s leaving", round, L, E,
             n, mr, gone->id);
    uint32_t m2 = mr < n - 1 ? mr : n - 1, need2 = (E * m2 + n - 2) / (n - 1);
    s_check(plan, ms, L, E, m2, need2 + 1 < E ? need2 + 1 : E, what);
    CHECK(rep.world == n - 1 && rep.donors == 1 && gone->donor && held > 0,
          "%s: world %u, %u donors (it held %u)", what, rep.world, rep.donors, held);
    uint32_t r = 0;
    for (const member_t *x = members_first(ms); x; x = x->next)
        if (!x->leaving)
            CHECK(x->rank == r++, "%s: %s has rank %u", what, x->id, x->rank);
    free(load);
    plan_destroy(&plan);
    members_destroy(&ms);
}

int main(void)
{
    test_init("plan");
    for (int round = 0; round < 200; round++)
        s_round(round);
    return test_finish();
}
