/* coordinator/balance: placement by load on random shapes and loads. Every placement is checked
 * for its constraints and determinism; its busiest worker against exhaustive search (tiny
 * layers) or the list-scheduling bounds (large ones); the skewed case against the
 * count-balanced placement; and its moves when fed its own output or slightly different loads. */
#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "coordinator/balance.h"
#include "coordinator/placement.h"
#include "tests/harness.h"

#define EPS 1e-9

/* A placement in balance_place's CSR form, with room for everything everywhere. */
typedef struct {
    uint32_t *off;     // (L E + 1)
    uint32_t *holders; // (L E n)
    balance_report_t rep;
    double *wl;        // (n)
} out_t;

static void s_out_init(out_t *o, const balance_shape_t *sh)
{
    size_t total = (size_t)sh->num_layers * sh->num_experts;
    o->off = calloc(total + 1, sizeof *o->off);
    o->holders = calloc(total * sh->workers + 1, sizeof *o->holders);
    o->wl = calloc(sh->workers + 1, sizeof *o->wl);
    o->rep = (balance_report_t){.worker_load = o->wl};
}

static void s_out_free(out_t *o)
{
    free(o->off);
    free(o->holders);
    free(o->wl);
}

static bool s_place(const balance_shape_t *sh, const double *load, const out_t *prev, out_t *o)
{
    semoe_rc rc = balance_place(sh, load, prev ? prev->off : NULL, prev ? prev->holders : NULL,
                                o->off, o->holders, &o->rep);
    CHECK(rc == SEMOE_OK, "balance_place L=%u E=%u n=%u slots=%u m=%u: %s", sh->num_layers,
          sh->num_experts, sh->workers, sh->slots, sh->min_replicas, semoe_err_msg());
    return rc == SEMOE_OK;
}

static bool s_same(const balance_shape_t *sh, const out_t *a, const out_t *b)
{
    size_t total = (size_t)sh->num_layers * sh->num_experts;
    return memcmp(a->off, b->off, (total + 1) * sizeof *a->off) == 0 &&
           memcmp(a->holders, b->holders, a->off[total] * sizeof *a->holders) == 0;
}

/* Layer l's busiest worker, the mean over workers and the largest copy. */
static double s_layer_max(const balance_shape_t *sh, const double *load, const out_t *o,
                          uint32_t l, double *mean, double *max_copy)
{
    uint32_t E = sh->num_experts, n = sh->workers;
    double *w = calloc(n, sizeof *w), max = 0, sum = 0, mc = 0;
    for (uint32_t j = 0; j < E; j++) {
        size_t e = (size_t)l * E + j;
        uint32_t c = o->off[e + 1] - o->off[e];
        for (uint32_t i = o->off[e]; i < o->off[e + 1]; i++)
            w[o->holders[i]] += load[e] / c;
        sum += load[e];
        mc = c && load[e] / c > mc ? load[e] / c : mc;
    }
    for (uint32_t r = 0; r < n; r++)
        max = w[r] > max ? w[r] : max;
    free(w);
    if (mean)
        *mean = sum / n;
    if (max_copy)
        *max_copy = mc;
    return max;
}

/* Copies in b that a did not have. */
static uint32_t s_moves(const balance_shape_t *sh, const out_t *a, const out_t *b)
{
    size_t total = (size_t)sh->num_layers * sh->num_experts;
    uint32_t moves = 0;
    for (size_t e = 0; e < total; e++)
        for (uint32_t i = b->off[e]; i < b->off[e + 1]; i++) {
            bool had = false;
            for (uint32_t k = a->off[e]; k < a->off[e + 1]; k++)
                had = had || a->holders[k] == b->holders[i];
            moves += !had;
        }
    return moves;
}

/* The constraints every output must meet, and the report's consistency with it. */
static void s_check(const balance_shape_t *sh, const double *load, const out_t *o)
{
    uint32_t L = sh->num_layers, E = sh->num_experts, n = sh->workers, m = sh->min_replicas;
    uint32_t S = sh->slots < E ? sh->slots : E;
    uint32_t *per = calloc(n, sizeof *per);
    double cost = 0, *wl = calloc(n, sizeof *wl);
    CHECK(o->off[0] == 0, "off[0] = %u", o->off[0]);
    uint32_t copies = 0;
    for (uint32_t l = 0; l < L; l++) {
        memset(per, 0, n * sizeof *per);
        uint64_t used = 0, want = 0;
        bool layer_loaded = false;
        for (uint32_t j = 0; j < E; j++)
            layer_loaded = layer_loaded || load[(size_t)l * E + j] > 0;
        for (uint32_t j = 0; j < E; j++) {
            size_t e = (size_t)l * E + j;
            uint32_t c = o->off[e + 1] - o->off[e];
            CHECK(o->off[e + 1] >= o->off[e] && c >= m && c <= n,
                  "layer %u expert %u: %u holders, want %u..%u", l, j, c, m, n);
            CHECK(layer_loaded || c == m, "layer %u expert %u: a layer without load, but %u "
                  "copies", l, j, c);
            for (uint32_t i = o->off[e]; i < o->off[e + 1] && i < o->off[e] + n; i++) {
                uint32_t h = o->holders[i];
                CHECK(h < n, "layer %u expert %u: holder %u of %u", l, j, h, n);
                CHECK(i == o->off[e] || h > o->holders[i - 1],
                      "layer %u expert %u: holders not ascending and distinct", l, j);
                if (h < n) {
                    per[h]++;
                    wl[h] += load[e] / c;
                }
            }
            used += c;
            want += layer_loaded ? n : m;
        }
        want = want < (uint64_t)n * S ? want : (uint64_t)n * S;
        CHECK(used == want, "layer %u: %llu copies, want %llu (n=%u slots=%u)", l,
              (unsigned long long)used, (unsigned long long)want, n, S);
        copies += (uint32_t)used;
        for (uint32_t w = 0; w < n; w++)
            CHECK(per[w] <= S, "layer %u worker %u: %u experts, slots %u", l, w, per[w], S);
        cost += s_layer_max(sh, load, o, l, NULL, NULL);
    }
    CHECK(o->rep.copies == copies, "report: %u copies, counted %u", o->rep.copies, copies);
    CHECK(fabs(o->rep.cost - cost) <= EPS * (1 + cost), "report: cost %g, counted %g",
          o->rep.cost, cost);
    for (uint32_t w = 0; w < n; w++)
        CHECK(fabs(o->wl[w] - wl[w]) <= EPS * (1 + wl[w]), "report: worker %u load %g, %g", w,
              o->wl[w], wl[w]);
    free(per);
    free(wl);
}

/* Random loads of several shapes: uniform, heavy-tailed, a few hot experts, some zeros. */
static void s_rand_loads(double *load, size_t count)
{
    int kind = (int)test_rand_below(4);
    for (size_t e = 0; e < count; e++) {
        double u = test_rand_unit();
        switch (kind) {
        case 0: load[e] = 1 + 99 * u; break;
        case 1: load[e] = 1000 * pow(u, 4); break;
        case 2: load[e] = test_rand_below(8) == 0 ? 500 + 500 * u : 10 * u; break;
        default: load[e] = test_rand_below(3) == 0 ? 0 : 100 * u; break;
        }
    }
}

static uint32_t s_min_slots(uint32_t E, uint32_t n, uint32_t m)
{
    return (uint32_t)(((uint64_t)E * m + n - 1) / n);
}

/* --- exhaustive search on tiny layers ----------------------------------------------------- */

typedef struct {
    uint32_t E, n, m;
    const double *load;
    uint32_t fill;        // 0: any replica counts; else the copies a full placement has
    uint32_t masks[64], n_masks;
    uint32_t pick[4];
    double best;
} brute_t;

static void s_brute_eval(brute_t *b)
{
    uint32_t c[8] = {0}, total = 0;
    for (uint32_t w = 0; w < b->n; w++)
        for (uint32_t j = 0; j < b->E; j++)
            c[j] += (b->pick[w] >> j) & 1;
    bool loaded = false;
    for (uint32_t j = 0; j < b->E; j++)
        loaded = loaded || b->load[j] > 0;
    for (uint32_t j = 0; j < b->E; j++) {
        if (c[j] < b->m || (b->fill && !loaded && c[j] != b->m))
            return;
        total += c[j];
    }
    if (b->fill && total != b->fill)
        return;
    double max = 0;
    for (uint32_t w = 0; w < b->n; w++) {
        double s = 0;
        for (uint32_t j = 0; j < b->E; j++)
            if ((b->pick[w] >> j) & 1)
                s += b->load[j] / c[j];
        max = s > max ? s : max;
    }
    b->best = max < b->best ? max : b->best;
}

/* Workers are interchangeable: their subsets are enumerated in non-decreasing mask order. */
static void s_brute_dfs(brute_t *b, uint32_t w, uint32_t from)
{
    if (w >= b->n || w >= sizeof b->pick / sizeof b->pick[0]) { /* n <= 4: s_brute */
        s_brute_eval(b);
        return;
    }
    for (uint32_t i = from; i < b->n_masks; i++) {
        b->pick[w] = b->masks[i];
        s_brute_dfs(b, w + 1, i);
    }
}

/* The least busiest-worker load over every placement of one layer with m..n copies of each
 * expert and at most S experts per worker. full: only placements with balance_place's rule on
 * replicas (as many copies as n * S allows; in a layer without load, m copies each); else any
 * counts, slots left free included. */
static double s_brute(uint32_t E, uint32_t n, uint32_t S, uint32_t m, const double *load,
                      bool full)
{
    brute_t b = {.E = E, .n = n, .m = m, .load = load, .best = INFINITY};
    REQUIRE(n <= sizeof b.pick / sizeof b.pick[0], "brute force over %u workers: at most 4", n);
    if (full) {
        bool loaded = false;
        for (uint32_t j = 0; j < E; j++)
            loaded = loaded || load[j] > 0;
        uint32_t want = E * (loaded ? n : m);
        b.fill = want < n * S ? want : n * S;
    }
    for (uint32_t mask = 0; mask < (1u << E); mask++)
        if ((uint32_t)__builtin_popcount(mask) <= S)
            b.masks[b.n_masks++] = mask;
    s_brute_dfs(&b, 0, 0);
    return b.best;
}

/* Tiny layers against exhaustion: within 4/3 of the best placement under the same replica rule
 * (LPT's factor); the ratio to the best placement of any kind is reported. */
static void s_quality_tiny(void)
{
    double sum[2] = {0}, worst[2] = {1, 1};
    int cases = 0, optimal[2] = {0};
    for (int t = 0; t < 600; t++) {
        uint32_t E = 1 + (uint32_t)test_rand_below(6);
        uint32_t n = 1 + (uint32_t)test_rand_below(E <= 5 ? 4 : 3);
        uint32_t m = 1 + (uint32_t)test_rand_below(n), lo = s_min_slots(E, n, m);
        uint32_t S = lo + (uint32_t)test_rand_below(3);
        S = S < E ? S : E;
        S = S < 4 ? S : (lo > 4 ? lo : 4);
        balance_shape_t sh = {.num_layers = 1, .num_experts = E, .workers = n, .slots = S,
                              .min_replicas = m};
        double load[6];
        s_rand_loads(load, E);
        out_t o;
        s_out_init(&o, &sh);
        if (s_place(&sh, load, NULL, &o)) {
            s_check(&sh, load, &o);
            double got = s_layer_max(&sh, load, &o, 0, NULL, NULL);
            for (int k = 0; k < 2; k++) {
                double opt = s_brute(E, n, S, m, load, k == 0);
                if (k == 0)
                    CHECK(got <= 4.0 / 3.0 * opt + EPS * (1 + opt),
                          "E=%u n=%u slots=%u m=%u: busiest %g, optimum %g (ratio %.4f)", E, n,
                          S, m, got, opt, got / opt);
                CHECK(got >= opt - EPS * (1 + opt), "busiest %g below the optimum %g", got, opt);
                double ratio = opt > 0 ? got / opt : 1;
                sum[k] += ratio;
                worst[k] = ratio > worst[k] ? ratio : worst[k];
                optimal[k] += ratio <= 1 + EPS;
            }
            cases++;
        }
        s_out_free(&o);
    }
    fprintf(stderr, "balance: tiny layers vs exhaustive, %d cases: same replica rule: mean ratio "
            "%.4f, worst %.4f, optimal in %d; any placement: mean %.4f, worst %.4f, optimal in "
            "%d\n", cases, sum[0] / cases, worst[0], optimal[0], sum[1] / cases, worst[1],
            optimal[1]);
}

/* Large random shapes: constraints, determinism, and mean <= busiest <= mean + largest copy
 * (the list-scheduling bound) in every layer. */
static void s_quality_large(void)
{
    double sum = 0;
    int layers = 0;
    for (int t = 0; t < 300; t++) {
        uint32_t L = 1 + (uint32_t)test_rand_below(4), E = 1 + (uint32_t)test_rand_below(128);
        uint32_t n = 1 + (uint32_t)test_rand_below(64);
        uint32_t m = 1 + (uint32_t)test_rand_below(n < 3 ? n : 3);
        uint32_t S = s_min_slots(E, n, m) + (uint32_t)test_rand_below(4);
        balance_shape_t sh = {.num_layers = L, .num_experts = E, .workers = n, .slots = S,
                              .min_replicas = m};
        double *load = malloc((size_t)L * E * sizeof *load);
        s_rand_loads(load, (size_t)L * E);
        out_t o, again;
        s_out_init(&o, &sh);
        s_out_init(&again, &sh);
        if (s_place(&sh, load, NULL, &o) && s_place(&sh, load, NULL, &again)) {
            s_check(&sh, load, &o);
            CHECK(s_same(&sh, &o, &again), "not deterministic");
            for (uint32_t l = 0; l < L; l++) {
                double mean, mc, max = s_layer_max(&sh, load, &o, l, &mean, &mc);
                CHECK(max >= mean - EPS * (1 + mean), "layer %u: busiest %g below mean %g", l,
                      max, mean);
                CHECK(max <= mean + mc + EPS * (1 + max),
                      "L=%u E=%u n=%u slots=%u m=%u layer %u: busiest %g > mean %g + copy %g",
                      L, E, n, S, m, l, max, mean, mc);
                sum += mean > 0 ? max / mean : 1;
                layers++;
            }
        }
        s_out_free(&o);
        s_out_free(&again);
        free(load);
    }
    fprintf(stderr, "balance: large shapes: %d layers, mean busiest/mean %.4f\n", layers,
            sum / layers);
}

/* --- the skewed router ---------------------------------------------------------------------- */

/* A frozen router sends 80% of the tokens to two experts (the case): on 4 workers with
 * 8 experts and 3 slots, the count-balanced placement is at least 2x the mean, ours <= 1.25. */
static void s_skew(void)
{
    uint32_t L = 1, E = 8, n = 4;
    balance_shape_t sh = {.num_layers = L, .num_experts = E, .workers = n, .slots = 3,
                          .min_replicas = 1};
    uint32_t prev[8], one[8], off1[9];
    for (int i = 0; i < 8; i++)
        prev[i] = PLACEMENT_NONE;
    CHECK(placement_compute(L, E, n, prev, one) == SEMOE_OK, "placement_compute");
    for (uint32_t e = 0; e <= L * E; e++)
        off1[e] = e;
    double worst = 0, worst_count = INFINITY;
    for (int t = 0; t < 50; t++) {
        double load[8];
        for (uint32_t l = 0; l < L; l++) {
            // the two hot experts share a worker in the count-balanced placement, as a frozen
            // router's favourites may; the split between them and the cold ones is random
            uint32_t hot0 = UINT32_MAX, hot1 = UINT32_MAX, w = (uint32_t)test_rand_below(n);
            for (uint32_t j = 0; j < E; j++)
                if (one[l * E + j] == w && hot0 == UINT32_MAX)
                    hot0 = j;
                else if (one[l * E + j] == w)
                    hot1 = j;
            double split = 0.3 + 0.2 * test_rand_unit(), cold[8], cs = 0;
            for (uint32_t j = 0; j < E; j++)
                cs += cold[j] = 0.5 + test_rand_unit();
            for (uint32_t j = 0; j < E; j++)
                load[l * E + j] = j == hot0 ? 0.8 * split
                                : j == hot1 ? 0.8 * (1 - split)
                                            : 0.2 * cold[j] / (cs - cold[hot0] - cold[hot1]);
        }
        out_t o;
        s_out_init(&o, &sh);
        if (s_place(&sh, load, NULL, &o)) {
            s_check(&sh, load, &o);
            double ours = balance_imbalance(L, E, n, load, o.off, o.holders);
            double count = balance_imbalance(L, E, n, load, off1, one);
            CHECK(count >= 2, "count-balanced imbalance %.3f < 2", count);
            CHECK(ours <= 1.25, "balanced imbalance %.3f > 1.25", ours);
            worst = ours > worst ? ours : worst;
            worst_count = count < worst_count ? count : worst_count;
            if (t == 0)
                fprintf(stderr, "balance: skew 80%% on 2 experts, n=4 E=8 slots=3: "
                        "count-balanced imbalance %.3f, by load %.3f\n", count, ours);
        }
        s_out_free(&o);
    }
    fprintf(stderr, "balance: skew over 50 draws: count-balanced >= %.3f, by load <= %.3f\n",
            worst_count, worst);
}

/* --- stickiness ----------------------------------------------------------------------------- */

/* Fed its own output, balance_place moves nothing; with loads off by +-1% it moves few copies,
 * never makes a layer busier than (1 + slack) x the placement without history, and moves no
 * more in total than that placement would. After a worker dies or joins, most copies stay. */
static void s_sticky(double slack)
{
    uint64_t moves = 0, naive = 0, copies = 0;
    uint64_t ev_moves[2] = {0}, ev_naive[2] = {0}, ev_copies[2] = {0}; // death, join
    for (int t = 0; t < 200; t++) {
        uint32_t L = 1 + (uint32_t)test_rand_below(4), E = 2 + (uint32_t)test_rand_below(64);
        uint32_t n = 2 + (uint32_t)test_rand_below(t % 4 == 3 ? 200 : 32); // greedy past 128
        uint32_t m = 1 + (uint32_t)test_rand_below(2);
        uint32_t S = s_min_slots(E, n, m) + (uint32_t)test_rand_below(3);
        balance_shape_t sh = {.num_layers = L, .num_experts = E, .workers = n, .slots = S,
                              .min_replicas = m, .keep_slack = slack};
        size_t total = (size_t)L * E;
        double *load = malloc(total * sizeof *load), *near = malloc(total * sizeof *near);
        s_rand_loads(load, total);
        for (size_t e = 0; e < total; e++)
            near[e] = load[e] * (0.99 + 0.02 * test_rand_unit());
        out_t p1, p2, p3, ref;
        s_out_init(&p1, &sh);
        s_out_init(&p2, &sh);
        s_out_init(&p3, &sh);
        s_out_init(&ref, &sh);
        if (!s_place(&sh, load, NULL, &p1) || !s_place(&sh, load, &p1, &p2) ||
            !s_place(&sh, near, &p1, &p3) || !s_place(&sh, near, NULL, &ref))
            goto next;
        CHECK(s_same(&sh, &p1, &p2) && p2.rep.moves == 0 && p2.rep.layers_kept == L,
              "fed its own output: %u moves, %u of %u layers kept", p2.rep.moves,
              p2.rep.layers_kept, L);
        s_check(&sh, near, &p3);
        CHECK(p3.rep.moves == s_moves(&sh, &p1, &p3), "report: %u moves, counted %u",
              p3.rep.moves, s_moves(&sh, &p1, &p3));
        for (uint32_t l = 0; l < L; l++) {
            double a = s_layer_max(&sh, near, &p3, l, NULL, NULL);
            double b = s_layer_max(&sh, near, &ref, l, NULL, NULL);
            CHECK(a <= b * (1 + slack) * (1 + 1e-8), "layer %u: sticky busiest %g > fresh %g "
                  "(slack %g)", l, a, b, slack);
        }
        moves += p3.rep.moves;
        naive += s_moves(&sh, &p1, &ref);
        copies += p3.rep.copies;
        // p3 is itself a fixed point (its history was p1, not itself)
        CHECK(s_place(&sh, near, &p3, &p2) && s_same(&sh, &p3, &p2),
              "a sticky result fed back in changed");

        // a worker dies (its entries become PLACEMENT_NONE, ranks above it shift down) or one
        // joins (rank n, holding nothing)
        for (int ev = 0; ev < 2; ev++) {
            if (ev == 0 && n < 3)
                continue;
            uint32_t dead = (uint32_t)test_rand_below(n), n2 = ev == 0 ? n - 1 : n + 1;
            balance_shape_t sd = sh;
            sd.workers = n2;
            sd.slots = s_min_slots(E, n2, m) > S ? s_min_slots(E, n2, m) : S;
            out_t prev = p1, d, dn;
            if (ev == 0) {
                prev.holders = malloc((p1.off[total] + 1) * sizeof *prev.holders);
                for (size_t i = 0; i < p1.off[total]; i++)
                    prev.holders[i] = p1.holders[i] == dead ? PLACEMENT_NONE
                                    : p1.holders[i] > dead  ? p1.holders[i] - 1
                                                            : p1.holders[i];
            }
            s_out_init(&d, &sd);
            s_out_init(&dn, &sd);
            if (s_place(&sd, load, &prev, &d) && s_place(&sd, load, NULL, &dn)) {
                s_check(&sd, load, &d);
                ev_moves[ev] += d.rep.moves;
                ev_naive[ev] += s_moves(&sd, &prev, &dn);
                ev_copies[ev] += d.rep.copies;
            }
            if (ev == 0)
                free(prev.holders);
            s_out_free(&d);
            s_out_free(&dn);
        }
    next:
        s_out_free(&p1);
        s_out_free(&p2);
        s_out_free(&p3);
        s_out_free(&ref);
        free(load);
        free(near);
    }
    fprintf(stderr, "balance: keep_slack %g, loads +-1%%: %llu of %llu copies moved (%.1f%%), "
            "without history %llu (%.1f%%)\n", slack, (unsigned long long)moves,
            (unsigned long long)copies, 100.0 * moves / copies, (unsigned long long)naive,
            100.0 * naive / copies);
    for (int ev = 0; ev < 2; ev++)
        fprintf(stderr, "balance: keep_slack %g, a worker %s: %llu of %llu copies moved "
                "(%.1f%%), without history %llu (%.1f%%)\n", slack, ev ? "joins" : "dies",
                (unsigned long long)ev_moves[ev], (unsigned long long)ev_copies[ev],
                100.0 * ev_moves[ev] / ev_copies[ev], (unsigned long long)ev_naive[ev],
                100.0 * ev_naive[ev] / ev_copies[ev]);
    CHECK(moves <= naive, "sticky moved %llu, more than %llu without history",
          (unsigned long long)moves, (unsigned long long)naive);
    for (int ev = 0; ev < 2; ev++)
        CHECK(ev_moves[ev] <= ev_naive[ev], "after a %s: sticky moved %llu, more than %llu",
              ev ? "join" : "death", (unsigned long long)ev_moves[ev],
              (unsigned long long)ev_naive[ev]);
    if (slack >= 0.02) // loads within 1% of the last plan's: nearly every layer stays
        CHECK(moves * 20 <= copies, "keep_slack %g: %llu of %llu copies moved on +-1%% loads",
              slack, (unsigned long long)moves, (unsigned long long)copies);
}

/* --- edges ---------------------------------------------------------------------------------- */

static void s_expect_einval(const balance_shape_t *sh, const double *load, const uint32_t *poff,
                            const uint32_t *ph, const char *needle)
{
    uint32_t off[64], holders[256];
    semoe_rc rc = balance_place(sh, load, poff, ph, off, holders, NULL);
    CHECK(rc == SEMOE_EINVAL && strstr(semoe_err_msg(), needle) != NULL,
          "want EINVAL naming '%s', got %s: %s", needle, semoe_rc_name(rc), semoe_err_msg());
}

static void s_edges(void)
{
    double load[12];
    for (int i = 0; i < 12; i++)
        load[i] = 1 + (double)test_rand_below(100);
    // one worker: everything on it
    balance_shape_t one = {.num_layers = 2, .num_experts = 5, .workers = 1, .slots = 5,
                           .min_replicas = 1};
    out_t o;
    s_out_init(&o, &one);
    if (s_place(&one, load, NULL, &o)) {
        s_check(&one, load, &o);
        for (uint32_t e = 0; e < 10; e++)
            CHECK(o.off[e + 1] - o.off[e] == 1 && o.holders[o.off[e]] == 0, "n=1: expert %u",
                  e);
        CHECK(fabs(balance_imbalance(2, 5, 1, load, o.off, o.holders) - 1) < EPS, "n=1 imb");
    }
    s_out_free(&o);
    // min_replicas = n, and slots = E with loads: everything everywhere
    balance_shape_t all[2] = {{.num_layers = 3, .num_experts = 4, .workers = 3, .slots = 4,
                               .min_replicas = 3},
                              {.num_layers = 3, .num_experts = 4, .workers = 3, .slots = 9,
                               .min_replicas = 1}};
    for (int i = 0; i < 2; i++) {
        s_out_init(&o, &all[i]);
        if (s_place(&all[i], load, NULL, &o)) {
            s_check(&all[i], load, &o);
            for (uint32_t e = 0; e < 12; e++)
                CHECK(o.off[e + 1] - o.off[e] == 3, "case %d: expert %u on %u workers", i, e,
                      o.off[e + 1] - o.off[e]);
            CHECK(fabs(balance_imbalance(3, 4, 3, load, o.off, o.holders) - 1) < EPS,
                  "everywhere: imbalance %g", balance_imbalance(3, 4, 3, load, o.off, o.holders));
        }
        s_out_free(&o);
    }
    // zero loads: min_replicas each, cost 0, imbalance 1
    double zero[12] = {0};
    balance_shape_t z = {.num_layers = 3, .num_experts = 4, .workers = 3, .slots = 3,
                         .min_replicas = 2};
    s_out_init(&o, &z);
    if (s_place(&z, zero, NULL, &o)) {
        s_check(&z, zero, &o);
        CHECK(o.rep.cost == 0 && o.off[12] == 24, "zero loads: cost %g, %u copies", o.rep.cost,
              o.off[12]);
        CHECK(balance_imbalance(3, 4, 3, zero, o.off, o.holders) == 1.0, "zero loads imb");
    }
    // PLACEMENT_NONE (and duplicates) in prev: used for stickiness, never kept as is
    out_t p;
    s_out_init(&p, &z);
    uint32_t poff[13], ph[24];
    for (uint32_t e = 0; e <= 12; e++)
        poff[e] = 2 * e;
    for (uint32_t i = 0; i < 24; i++)
        ph[i] = i % 5 == 0 ? PLACEMENT_NONE : i % 3;
    out_t pn = {.off = poff, .holders = ph};
    if (s_place(&z, load, &pn, &p)) {
        s_check(&z, load, &p);
        CHECK(p.rep.layers_kept == 0, "a prev with gone holders was kept");
    }
    s_out_free(&p);
    s_out_free(&o);
    // an expert that goes idle (the hot one, on every worker): its copies are kept only while
    // the busy experts' placement stays within keep_slack of a fresh one; a whole layer gone
    // idle gives every replica back
    balance_shape_t idle = {.num_layers = 1, .num_experts = 4, .workers = 4, .slots = 2,
                            .min_replicas = 1, .keep_slack = 0.1};
    double busy[4] = {100, 1, 2, 3}, quiet[4] = {0, 1, 2, 3}, none[4] = {0};
    out_t i1, i2, fresh, i3;
    s_out_init(&i1, &idle);
    s_out_init(&i2, &idle);
    s_out_init(&fresh, &idle);
    s_out_init(&i3, &idle);
    if (s_place(&idle, busy, NULL, &i1) && s_place(&idle, quiet, &i1, &i2) &&
        s_place(&idle, quiet, NULL, &fresh) && s_place(&idle, none, &i1, &i3)) {
        CHECK(i1.off[1] - i1.off[0] >= 2, "hot expert 0 has %u copies", i1.off[1] - i1.off[0]);
        s_check(&idle, quiet, &i2);
        double kept = s_layer_max(&idle, quiet, &i2, 0, NULL, NULL);
        double ref = s_layer_max(&idle, quiet, &fresh, 0, NULL, NULL);
        CHECK(kept <= 1.1 * ref + EPS, "expert 0 went idle: busiest %g, a fresh placement's %g "
              "(keep_slack 0.1)", kept, ref);
        s_check(&idle, none, &i3);
        CHECK(i3.off[4] == 4, "a layer gone idle kept %u copies of 4 experts", i3.off[4]);
    }
    s_out_free(&i1);
    s_out_free(&i2);
    s_out_free(&fresh);
    s_out_free(&i3);
    // imbalance of a hand-made placement: expert 0 (load 6) on 0 and 1, expert 1 (2) on 1
    uint32_t hoff[3] = {0, 2, 3}, hh[3] = {0, 1, 1};
    double hl[2] = {6, 2};
    CHECK(fabs(balance_imbalance(1, 2, 2, hl, hoff, hh) - 5.0 / 4.0) < EPS, "imbalance %g",
          balance_imbalance(1, 2, 2, hl, hoff, hh));
    // bad inputs
    balance_shape_t bad = {.num_layers = 1, .num_experts = 6, .workers = 2, .slots = 2,
                           .min_replicas = 1};
    s_expect_einval(&bad, load, NULL, NULL, "slots=2");
    bad.slots = 3, bad.min_replicas = 2;
    s_expect_einval(&bad, load, NULL, NULL, "slots=3");
    bad.workers = 0;
    s_expect_einval(&bad, load, NULL, NULL, "workers=0");
    bad.workers = 2, bad.min_replicas = 3, bad.slots = 6;
    s_expect_einval(&bad, load, NULL, NULL, "min_replicas=3");
    bad.min_replicas = 0;
    s_expect_einval(&bad, load, NULL, NULL, "min_replicas=0");
    bad.min_replicas = 1;
    double neg[6] = {1, 2, -1, 3, 4, 5};
    s_expect_einval(&bad, neg, NULL, NULL, "load[2]=-1");
    neg[2] = NAN;
    s_expect_einval(&bad, neg, NULL, NULL, "load[2]=nan");
    uint32_t boff[7] = {0, 1, 2, 3, 4, 5, 6}, bh[6] = {0, 1, 0, 2, 1, 0};
    s_expect_einval(&bad, load, boff, bh, "prev_holders[3]=2");
    boff[3] = 1;
    bh[3] = 1;
    s_expect_einval(&bad, load, boff, bh, "prev_off[2]=2");
    bad.keep_slack = -0.5;
    s_expect_einval(&bad, load, NULL, NULL, "keep_slack=-0.5");
}

/* The shapes a large job has must stay cheap: 32 layers of 64 experts on 1024 workers, one
 * slot each (16 copies per expert), and 32 x 256 on 64 workers with 8 slots, both with
 * history. */
static void s_large(void)
{
    balance_shape_t shapes[2] = {{.num_layers = 32, .num_experts = 64, .workers = 1024,
                                  .slots = 1, .min_replicas = 1},
                                 {.num_layers = 32, .num_experts = 256, .workers = 64,
                                  .slots = 8, .min_replicas = 1}};
    for (int i = 0; i < 2; i++) {
        const balance_shape_t *sh = &shapes[i];
        size_t total = (size_t)sh->num_layers * sh->num_experts;
        double *load = malloc(total * sizeof *load), *near = malloc(total * sizeof *near);
        s_rand_loads(load, total);
        for (size_t e = 0; e < total; e++)
            near[e] = load[e] * (0.95 + 0.1 * test_rand_unit());
        out_t a, b;
        s_out_init(&a, sh);
        s_out_init(&b, sh);
        struct timespec t0, t1, t2;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        bool ok = s_place(sh, load, NULL, &a);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        ok = ok && s_place(sh, near, &a, &b);
        clock_gettime(CLOCK_MONOTONIC, &t2);
        if (ok) {
            s_check(sh, near, &b);
            double ms0 = (double)(t1.tv_sec - t0.tv_sec) * 1e3 +
                         (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
            double ms1 = (double)(t2.tv_sec - t1.tv_sec) * 1e3 +
                         (double)(t2.tv_nsec - t1.tv_nsec) / 1e6;
            fprintf(stderr, "balance: L=%u E=%u n=%u slots=%u: %.1f ms fresh, %.1f ms with "
                    "history (+-5%% loads: %u of %u copies moved, imbalance %.3f)\n",
                    sh->num_layers, sh->num_experts, sh->workers, sh->slots, ms0, ms1,
                    b.rep.moves, b.rep.copies,
                    balance_imbalance(sh->num_layers, sh->num_experts, sh->workers, near, b.off,
                                      b.holders));
        }
        s_out_free(&a);
        s_out_free(&b);
        free(load);
        free(near);
    }
}

int main(void)
{
    test_init("balance");
    s_edges();
    s_quality_tiny();
    s_quality_large();
    s_skew();
    s_sticky(0);
    s_sticky(0.02);
    s_large();
    return test_finish();
}
