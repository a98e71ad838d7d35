/* coordinator/placement: random sequences of joins, leaves and deaths over random model
 * shapes; every placement is checked for coverage, balance per layer and over layers,
 * stickiness and determinism, and its number of moves against an exhaustive search (small
 * shapes) or a lower bound (large ones). */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/placement.h"
#include "tests/harness.h"

/* Surviving experts of layer l on worker w, from prev (held: n entries, zeroed here). */
static void s_held(uint32_t E, uint32_t n, const uint32_t *prev_layer, uint32_t *held)
{
    memset(held, 0, n * sizeof *held);
    for (uint32_t j = 0; j < E; j++)
        if (prev_layer[j] != PLACEMENT_NONE)
            held[prev_layer[j]]++;
}

static uint32_t s_moves(uint64_t total, const uint32_t *prev, const uint32_t *out)
{
    uint32_t moves = 0;
    for (uint64_t e = 0; e < total; e++)
        moves += prev[e] != out[e];
    return moves;
}

/* A lower bound on the moves: the larger of two relaxations. Per layer alone: the orphans,
 * what overflows q + 1, and the over-quota holders beyond the layer's r slots. Per worker
 * alone: a worker keeps at most T of its survivors over all layers (T + 1 for the
 * L r mod n workers with one slot more, best given to those that would keep most). */
static uint32_t s_lower_bound(uint32_t L, uint32_t E, uint32_t n, const uint32_t *prev)
{
    uint32_t q = E / n, r = E % n, lb_layer = 0;
    uint32_t *held = malloc(n * sizeof *held), *keep = calloc(n, sizeof *keep);
    for (uint32_t l = 0; l < L; l++) {
        s_held(E, n, prev + (size_t)l * E, held);
        uint32_t over = 0, kept = 0;
        for (uint32_t w = 0; w < n; w++) {
            kept += held[w] < q ? held[w] : q;
            over += held[w] > q;
            keep[w] += held[w] < q + 1 ? held[w] : q + 1;
        }
        kept += over < r ? over : r;
        lb_layer += E - kept;
    }
    uint32_t T = L * q + (uint32_t)((uint64_t)L * r / n), plus = (uint32_t)((uint64_t)L * r % n);
    uint32_t kept = 0, n_plus = 0;
    for (uint32_t w = 0; w < n; w++) {
        kept += keep[w] < T ? keep[w] : T;
        n_plus += keep[w] > T; // could use a slot more
    }
    kept += n_plus < plus ? n_plus : plus;
    uint32_t lb_worker = L * E - kept;
    free(held);
    free(keep);
    return lb_layer > lb_worker ? lb_layer : lb_worker;
}

/* The optimum by exhaustion: every choice of r workers with a slot more per layer such that
 * each worker gets T or T + 1 of them. Depth-first over layers, dropping a branch as soon as
 * a worker passes T + 1 or more than L r mod n workers reach it. Only for tiny shapes. */
#define BRUTE_MAX_L 4
#define BRUTE_MAX_N 7
typedef struct {
    uint32_t L, E, n, q, T, plus;
    uint32_t held[BRUTE_MAX_L][BRUTE_MAX_N];
    uint32_t masks[1 << BRUTE_MAX_N], n_masks;
    uint32_t slots[BRUTE_MAX_N];
    uint32_t best;
} brute_t;

static void s_brute_dfs(brute_t *b, uint32_t l, uint32_t kept, uint32_t n_plus)
{
    if (l == b->L) {
        if (b->L * b->E - kept < b->best)
            b->best = b->L * b->E - kept;
        return;
    }
    for (uint32_t i = 0; i < b->n_masks; i++) {
        uint32_t m = b->masks[i], k = kept, np = n_plus;
        bool ok = true;
        for (uint32_t w = 0; w < b->n; w++) {
            uint32_t x = (m >> w) & 1, cap = b->q + x;
            b->slots[w] += x;
            np += x && b->slots[w] == b->T + 1;
            ok = ok && b->slots[w] <= b->T + 1;
            k += b->held[l][w] < cap ? b->held[l][w] : cap;
        }
        if (ok && np <= b->plus)
            s_brute_dfs(b, l + 1, k, np);
        for (uint32_t w = 0; w < b->n; w++)
            b->slots[w] -= (m >> w) & 1;
    }
}

static bool s_brute_fits(uint32_t L, uint32_t n) { return L <= BRUTE_MAX_L && n <= BRUTE_MAX_N; }

static uint32_t s_brute_best(uint32_t L, uint32_t E, uint32_t n, const uint32_t *prev)
{
    brute_t b = {.L = L, .E = E, .n = n, .q = E / n, .best = UINT32_MAX};
    uint32_t r = E % n;
    b.T = L * r / n;
    b.plus = L * r % n;
    for (uint32_t l = 0; l < L; l++)
        s_held(E, n, prev + (size_t)l * E, b.held[l]);
    for (uint32_t m = 0; m < (1u << n); m++)
        if ((uint32_t)__builtin_popcount(m) == r)
            b.masks[b.n_masks++] = m;
    s_brute_dfs(&b, 0, 0, 0);
    return b.best;
}

/* Checks one placement; returns its number of moves. */
static uint32_t s_check(uint32_t L, uint32_t E, uint32_t n, const uint32_t *prev,
                        const uint32_t *out)
{
    uint64_t total = (uint64_t)L * E;
    uint32_t q = E / n;
    uint32_t *layer = calloc(n, sizeof *layer), *all = calloc(n, sizeof *all);
    uint32_t *fresh = calloc(n, sizeof *fresh), *held = calloc(n, sizeof *held);
    for (uint32_t l = 0; l < L; l++) {
        const uint32_t *o = out + (size_t)l * E, *p = prev + (size_t)l * E;
        memset(layer, 0, n * sizeof *layer);
        memset(fresh, 0, n * sizeof *fresh);
        s_held(E, n, p, held);
        for (uint32_t j = 0; j < E; j++) {
            if (o[j] >= n) {
                CHECK(o[j] < n, "layer %u expert %u: holder %u of %u workers", l, j, o[j], n);
                continue;
            }
            layer[o[j]]++;
            all[o[j]]++;
            fresh[o[j]] += p[j] != o[j];
        }
        uint32_t lo = UINT32_MAX, hi = 0;
        for (uint32_t w = 0; w < n; w++) {
            lo = layer[w] < lo ? layer[w] : lo;
            hi = layer[w] > hi ? layer[w] : hi;
        }
        CHECK(lo == q && hi - lo <= 1, "layer %u: counts %u..%u, want %u..%u", l, lo, hi, q,
              q + 1);
        // Stickiness: a survivor that loses one of its experts must be full with its own
        // (it kept at least q and took in nothing new), or it moved an expert for nothing.
        for (uint32_t j = 0; j < E; j++) {
            uint32_t h = p[j];
            if (h == PLACEMENT_NONE || h == o[j])
                continue;
            CHECK(fresh[h] == 0 && layer[h] >= q && layer[h] < held[h],
                  "layer %u expert %u: moved off live worker %u (held %u, now %u, %u new)", l,
                  j, h, held[h], layer[h], fresh[h]);
        }
    }
    uint32_t lo = UINT32_MAX, hi = 0;
    for (uint32_t w = 0; w < n; w++) {
        lo = all[w] < lo ? all[w] : lo;
        hi = all[w] > hi ? all[w] : hi;
    }
    CHECK(hi - lo <= 1, "totals %u..%u over %u layers", lo, hi, L);
    free(layer);
    free(all);
    free(fresh);
    free(held);
    return s_moves(total, prev, out);
}

/* A cluster under churn: workers by join order (ids), and the holder id of every expert. */
typedef struct {
    uint32_t L, E;
    uint32_t n, cap;
    uint32_t *ids;     // (cap) worker ids by rank
    uint32_t *holder;  // (L E) holder id, or PLACEMENT_NONE
    uint32_t next_id;
} cluster_t;

/* Computes the next placement for c's current workers and checks it; returns the moves and
 * adds to *over_lb how many moves it took beyond the lower bound. */
static uint32_t s_replan(cluster_t *c, uint64_t *over_lb)
{
    uint64_t total = (uint64_t)c->L * c->E;
    uint32_t *prev = malloc(total * sizeof *prev), *out = malloc(total * sizeof *out);
    uint32_t *again = malloc(total * sizeof *again);
    for (uint64_t e = 0; e < total; e++) {
        prev[e] = PLACEMENT_NONE;
        for (uint32_t r = 0; r < c->n; r++) // ids are few: a scan is fine in a test
            if (c->ids[r] == c->holder[e])
                prev[e] = r;
    }
    semoe_rc rc = placement_compute(c->L, c->E, c->n, prev, out);
    CHECK(rc == SEMOE_OK, "placement_compute: %s", semoe_err_msg());
    uint32_t moves = 0;
    if (c->n == 0) {
        for (uint64_t e = 0; e < total; e++)
            CHECK(out[e] == PLACEMENT_NONE, "expert %llu placed with no workers",
                  (unsigned long long)e);
    } else {
        moves = s_check(c->L, c->E, c->n, prev, out);
        uint32_t lb = s_lower_bound(c->L, c->E, c->n, prev);
        CHECK(moves >= lb, "moves %u below the lower bound %u", moves, lb);
        *over_lb += moves - lb;
        if (s_brute_fits(c->L, c->n)) {
            uint32_t best = s_brute_best(c->L, c->E, c->n, prev);
            CHECK(moves == best, "L=%u E=%u n=%u: %u moves, the optimum is %u", c->L, c->E,
                  c->n, moves, best);
        }
        placement_compute(c->L, c->E, c->n, prev, again);
        CHECK(memcmp(out, again, total * sizeof *out) == 0, "not deterministic");
    }
    for (uint64_t e = 0; e < total; e++)
        c->holder[e] = out[e] == PLACEMENT_NONE ? PLACEMENT_NONE : c->ids[out[e]];
    free(prev);
    free(out);
    free(again);
    return moves;
}

static void s_join(cluster_t *c)
{
    if (c->n < c->cap)
        c->ids[c->n++] = c->next_id++;
}

static void s_remove(cluster_t *c, uint32_t r)
{
    memmove(c->ids + r, c->ids + r + 1, (c->n - r - 1) * sizeof *c->ids);
    c->n--;
}

/* Random churn: batches of joins and departures (a leave and a death look the same to
 * placement), a replan after each batch. */
static void s_churn(uint32_t L, uint32_t E, uint32_t max_n, int rounds, uint64_t *over_lb)
{
    cluster_t c = {.L = L, .E = E, .cap = max_n};
    c.ids = calloc(max_n, sizeof *c.ids);
    c.holder = malloc((size_t)L * E * sizeof *c.holder);
    for (size_t e = 0; e < (size_t)L * E; e++)
        c.holder[e] = PLACEMENT_NONE;
    for (int i = 0; i < rounds; i++) {
        uint32_t joins = (uint32_t)test_rand_below(3), gone = (uint32_t)test_rand_below(3);
        if (c.n == 0)
            joins = 1 + (uint32_t)test_rand_below(max_n);
        for (uint32_t k = 0; k < gone && c.n > 0; k++)
            s_remove(&c, (uint32_t)test_rand_below(c.n));
        for (uint32_t k = 0; k < joins; k++)
            s_join(&c);
        s_replan(&c, over_lb);
    }
    free(c.ids);
    free(c.holder);
}

/* From a balanced placement, one worker joins, leaves or dies: the common case, checked
 * against exhaustion (in s_replan) on shapes small enough for it. */
static void s_single_events(void)
{
    for (int t = 0; t < 1000; t++) {
        uint32_t L = 1 + (uint32_t)test_rand_below(BRUTE_MAX_L);
        uint32_t E = 1 + (uint32_t)test_rand_below(16);
        uint32_t n = 1 + (uint32_t)test_rand_below(BRUTE_MAX_N - 1);
        cluster_t c = {.L = L, .E = E, .cap = n + 1};
        c.ids = calloc(n + 1, sizeof *c.ids);
        c.holder = malloc((size_t)L * E * sizeof *c.holder);
        for (size_t e = 0; e < (size_t)L * E; e++)
            c.holder[e] = PLACEMENT_NONE;
        for (uint32_t i = 0; i < n; i++)
            s_join(&c);
        uint64_t over = 0;
        s_replan(&c, &over);
        if (test_rand_below(2) || c.n == 1)
            s_join(&c);
        else
            s_remove(&c, (uint32_t)test_rand_below(c.n));
        s_replan(&c, &over);
        free(c.ids);
        free(c.holder);
    }
}

/* Edge cases: no workers, a bad previous holder, exact division, more workers than experts. */
static void s_edges(void)
{
    uint32_t prev[6] = {0, 1, 2, PLACEMENT_NONE, 0, 0}, out[6];
    CHECK(placement_compute(2, 3, 2, prev, out) == SEMOE_EINVAL, "rank 2 of 2 accepted");
    CHECK(strstr(semoe_err_msg(), "rank 2") != NULL, "message: %s", semoe_err_msg());
    for (int i = 0; i < 6; i++)
        prev[i] = PLACEMENT_NONE;
    CHECK(placement_compute(2, 3, 0, prev, out) == SEMOE_OK, "n = 0");
    for (int i = 0; i < 6; i++)
        CHECK(out[i] == PLACEMENT_NONE, "n = 0 placed expert %d", i);
    // 3 experts per layer, 5 workers: 2 workers hold nothing per layer, totals 1..2.
    CHECK(placement_compute(2, 3, 5, prev, out) == SEMOE_OK, "n > E");
    s_check(2, 3, 5, prev, out);
    // Exact division keeps every expert of every survivor when its share did not grow.
    uint32_t p2[8] = {0, 0, 1, 1, 2, 2, 3, 3}, o2[8];
    CHECK(placement_compute(1, 8, 4, p2, o2) == SEMOE_OK, "exact");
    CHECK(s_moves(8, p2, o2) == 0, "balanced input moved %u", s_moves(8, p2, o2));
    uint32_t off[5];
    placement_batch_offsets(10, 4, off);
    CHECK(off[0] == 0 && off[1] == 2 && off[2] == 5 && off[3] == 7 && off[4] == 10,
          "batch offsets %u %u %u %u %u", off[0], off[1], off[2], off[3], off[4]);
    placement_batch_offsets(3, 4, off);
    CHECK(off[0] == 0 && off[4] == 3 && off[1] == 0, "batch 3 over 4");
}

/* The large shape the control-plane benchmark uses must stay cheap: 1024 workers, one dies. */
static void s_large(void)
{
    uint32_t L = 32, E = 64, n = 1024;
    uint64_t over = 0;
    cluster_t c = {.L = L, .E = E, .cap = n};
    c.ids = calloc(n, sizeof *c.ids);
    c.holder = malloc((size_t)L * E * sizeof *c.holder);
    for (size_t e = 0; e < (size_t)L * E; e++)
        c.holder[e] = PLACEMENT_NONE;
    for (uint32_t i = 0; i < n; i++)
        s_join(&c);
    s_replan(&c, &over);
    s_remove(&c, (uint32_t)test_rand_below(c.n));
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint32_t moves = s_replan(&c, &over);
    clock_gettime(CLOCK_MONOTONIC, &b);
    double ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    fprintf(stderr, "placement: L=%u E=%u n=1024 -> 1023: %u moves, %.1f ms (with checks)\n",
            L, E, moves, ms);
    CHECK(over == 0, "large: %llu moves above the bound", (unsigned long long)over);
    free(c.ids);
    free(c.holder);
}

/* Past the flow's size limit (layers x workers) the extra slots are dealt cyclically: still
 * balanced, still keeping what fits, not move-minimal. */
static void s_beyond_flow(void)
{
    uint32_t L = 40, E = 3, n = 30000;
    size_t total = (size_t)L * E;
    uint32_t *prev = malloc(total * sizeof *prev), *out = malloc(total * sizeof *out);
    for (size_t e = 0; e < total; e++)
        prev[e] = PLACEMENT_NONE;
    CHECK(placement_compute(L, E, n, prev, out) == SEMOE_OK, "beyond the flow: fresh");
    s_check(L, E, n, prev, out);
    uint32_t dead = out[0]; // a holder dies: ranks above it shift down
    for (size_t e = 0; e < total; e++)
        prev[e] = out[e] == dead ? PLACEMENT_NONE : out[e] > dead ? out[e] - 1 : out[e];
    CHECK(placement_compute(L, E, n - 1, prev, out) == SEMOE_OK, "beyond the flow: death");
    s_check(L, E, n - 1, prev, out);
    free(prev);
    free(out);
}

int main(void)
{
    test_init("placement");
    s_edges();
    s_single_events();
    uint64_t over = 0;
    for (int t = 0; t < 400; t++) { // tiny shapes, checked against exhaustion
        uint32_t L = 1 + (uint32_t)test_rand_below(BRUTE_MAX_L);
        uint32_t E = 1 + (uint32_t)test_rand_below(9);
        s_churn(L, E, 1 + (uint32_t)test_rand_below(BRUTE_MAX_N), 12, &over);
    }
    for (int t = 0; t < 60; t++) { // larger shapes, checked against the lower bound
        uint32_t L = 1 + (uint32_t)test_rand_below(12), E = 1 + (uint32_t)test_rand_below(70);
        s_churn(L, E, 1 + (uint32_t)test_rand_below(40), 15, &over);
    }
    fprintf(stderr, "placement: %llu moves above the lower bound in all churn\n",
            (unsigned long long)over);
    s_large();
    s_beyond_flow();
    return test_finish();
}
