/* The reference placement of one MoE layer (balance_layer.h), from the loads alone: the two
 * steps of DeepSeek's EPLB, replicate then pack (as FlexMoE also does), then a local search.
 * The problem is multiprocessor scheduling (NP-hard) with two twists: a worker has S slots, and
 * replicas of one expert must sit on distinct workers.
 *  1. Replicate: every expert starts with min_replicas copies; while slots remain, the expert
 *     with the most load per copy gets one more (at most one per worker; zero-load experts
 *     never get more). This greedy minimises the largest copy, the term in LPT's bound. With
 *     few slots the last such copies can only sit beside other hot copies, where a copy of a
 *     cold expert would have cost nothing, so a few plans are packed ("the first k hot copies,
 *     then cold fillers") and the best kept (balance_layer_reference).
 *  2. Pack, longest processing time first (Graham 1969): copies by load descending, each to the
 *     least-loaded worker with a free slot that does not hold that expert yet (ties: fewer
 *     copies held, then the lowest rank). On identical machines LPT is within 4/3 - 1/(3n) of
 *     the optimum; the slot and distinctness limits can force a copy elsewhere, so the tests
 *     measure the ratio against exhaustive search. An expert's copies are equal and adjacent in
 *     LPT order, so they are placed together, on its c lightest candidates; that choice is
 *     checked against the Gale-Ryser condition so that the experts left still fit, and when
 *     they would not, the workers with the most free slots are taken instead (Havel-Hakimi:
 *     that always fits).
 *  3. Improve, on the busiest worker while a step leaves every worker it touches strictly
 *     below the busiest's load: move a copy to a free slot, swap it with a lighter copy, or
 *     re-replicate (drop a copy of an expert with spare replicas, add one of another). */
#include "coordinator/balance_layer.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"

#define S_REL_EPS 1e-12          // an improving step must gain more than this share of the max
#define S_SWAP_BUDGET (1u << 22) // copy pairs the improvement may look at, per call

void balance_layer_swap(balance_layer_t *ly)
{
    balance_sol_t *o = &ly->alt, t = {ly->held, ly->bin, ly->cnt, ly->copies, ly->wload, ly->lpc};
    ly->held = o->held, ly->bin = o->bin, ly->cnt = o->cnt, ly->copies = o->copies;
    ly->wload = o->wload, ly->lpc = o->lpc;
    *o = t;
}

/* --- 1. replication ------------------------------------------------------------------------ */

/* Heap orders over experts: true when a comes out before b. */
typedef bool (*s_before_fn)(const balance_layer_t *ly, uint32_t a, uint32_t b);

/* More load per copy first (ties: lower id): the expert a replica helps most. */
static bool s_hotter(const balance_layer_t *ly, uint32_t a, uint32_t b)
{
    double la = ly->load[a] / ly->copies[a], lb = ly->load[b] / ly->copies[b];
    return la > lb || (la == lb && a < b);
}

/* Less load per copy once it has one more first (ties: lower id): the cheapest filler. */
static bool s_filler(const balance_layer_t *ly, uint32_t a, uint32_t b)
{
    double la = ly->load[a] / (ly->copies[a] + 1), lb = ly->load[b] / (ly->copies[b] + 1);
    return la < lb || (la == lb && a < b);
}

static void s_heap_down(const balance_layer_t *ly, s_before_fn before, uint32_t *heap,
                        uint32_t size, uint32_t i)
{
    uint32_t x = heap[i];
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= size)
            break;
        if (c + 1 < size && before(ly, heap[c + 1], heap[c]))
            c++;
        if (!before(ly, heap[c], x))
            break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = x;
}

/* Adds copies one at a time to the expert first in `before` order among those with fewer than
 * n copies (and with load, unless idle), at most `limit` of them and no further than n * S
 * copies in all; returns how many. *k_mean (optional) is set to the number added when the
 * largest copy first dropped to the mean load per worker or below. */
static uint32_t s_add_copies(balance_layer_t *ly, s_before_fn before, bool idle, uint64_t *total,
                             uint32_t limit, uint32_t *k_mean)
{
    uint64_t target = (uint64_t)ly->n * ly->S;
    double mean = 0;
    uint32_t size = 0, added = 0;
    for (uint32_t j = 0; j < ly->E; j++) {
        mean += ly->load[j];
        if (ly->copies[j] < ly->n && (idle || ly->load[j] > 0))
            ly->heap[size++] = j;
    }
    mean /= ly->n;
    for (uint32_t i = size / 2; i-- > 0;)
        s_heap_down(ly, before, ly->heap, size, i);
    // experts with n copies carry at most load / n <= mean each: only the heap's top matters
    if (k_mean)
        *k_mean = 0;
    while (*total < target && size > 0 && added < limit) {
        if (k_mean && *k_mean == 0 && added > 0 && ly->load[ly->heap[0]] /
                                                    ly->copies[ly->heap[0]] <= mean)
            *k_mean = added;
        uint32_t j = ly->heap[0];
        ly->copies[j]++;
        (*total)++;
        added++;
        if (ly->copies[j] == ly->n)
            ly->heap[0] = ly->heap[--size];
        s_heap_down(ly, before, ly->heap, size, 0); // the top's key only moved back
    }
    if (k_mean && *k_mean == 0)
        *k_mean = added;
    return added;
}

/* Step 1: copies[] and lpc[]. Every expert starts with min_replicas copies; the first `useful`
 * additions go to the hottest expert per copy (EPLB), the rest, up to n * S copies in all, to
 * the cheapest fillers: idle experts first (they add no load: with the rest of the load on a
 * few hot experts, a filler that is another hot copy would sit beside one), then the least
 * loaded per copy. Nothing is filled in a layer without load. Returns the number of hot
 * additions made; *k_mean as above. */
static uint32_t s_replicate(balance_layer_t *ly, uint32_t useful, uint32_t *k_mean)
{
    uint64_t total = (uint64_t)ly->E * ly->m;
    bool loaded = false;
    for (uint32_t j = 0; j < ly->E; j++) {
        ly->copies[j] = ly->m;
        loaded = loaded || ly->load[j] > 0;
    }
    uint32_t hot = s_add_copies(ly, s_hotter, false, &total, useful, k_mean);
    s_add_copies(ly, s_filler, loaded, &total, UINT32_MAX, NULL);
    for (uint32_t j = 0; j < ly->E; j++)
        ly->lpc[j] = ly->load[j] / ly->copies[j];
    return hot;
}

/* --- 2. packing ----------------------------------------------------------------------------- */

static int s_cmp_hot(const void *a, const void *b, void *arg)
{
    const balance_layer_t *ly = arg;
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    if (ly->lpc[x] != ly->lpc[y])
        return ly->lpc[x] > ly->lpc[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* The packing order of workers: lighter first, then fewer copies, then lower rank. */
int balance_layer_cmp_light(const void *a, const void *b, void *arg)
{
    const balance_layer_t *ly = arg;
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    if (ly->wload[x] != ly->wload[y])
        return ly->wload[x] < ly->wload[y] ? -1 : 1;
    if (ly->cnt[x] != ly->cnt[y])
        return ly->cnt[x] < ly->cnt[y] ? -1 : 1;
    return x < y ? -1 : x > y;
}

/* Gale-Ryser for "at most" capacities: the experts still to pack (remc) fit on the free slots
 * (S - cnt[w]), one copy per worker each, iff for every k the k largest copy counts sum to at
 * most sum_w min(free_w, k) (max-flow min-cut on experts x workers). */
static bool s_feasible(balance_layer_t *ly)
{
    uint32_t S = ly->S, *ge = ly->ge;
    memset(ge, 0, (S + 2) * sizeof *ge);
    for (uint32_t w = 0; w < ly->n; w++)
        ge[S - ly->cnt[w]]++;
    for (uint32_t k = S; k-- > 0;)
        ge[k] += ge[k + 1]; // ge[k]: workers with at least k free slots
    uint64_t cap = 0, demand = 0;
    uint32_t k = 0;
    for (uint32_t v = ly->n; v > 0; v--)
        for (uint32_t i = 0; i < ly->remc[v]; i++) {
            k++;
            demand += v;
            if (k <= S)
                cap += ge[k];
            if (demand > cap)
                return false;
        }
    return true;
}

/* Whether putting one copy on each of cand[0..c) leaves the rest packable. */
static bool s_fits_after(balance_layer_t *ly, const uint32_t *cand, uint32_t c)
{
    for (uint32_t i = 0; i < c; i++)
        ly->cnt[cand[i]]++;
    bool ok = s_feasible(ly);
    for (uint32_t i = 0; i < c; i++)
        ly->cnt[cand[i]]--;
    return ok;
}

static void s_put(balance_layer_t *ly, uint32_t w, uint32_t j)
{
    ly->held[(size_t)w * ly->E + j] = 1;
    ly->bin[(size_t)w * ly->S + ly->cnt[w]++] = j;
    ly->wload[w] += ly->lpc[j];
}

/* Chooses the c workers for one expert among cand[0..m) (all with a free slot), leaving them
 * in cand[0..c): the c lightest, or, when the rest would no longer fit, the lightest k that
 * still let the remaining c - k go to the workers with the most free slots. */
static void s_choose(balance_layer_t *ly, uint32_t *cand, uint32_t m, uint32_t c)
{
    if (c <= 8) { // partial selection sort: c passes
        for (uint32_t i = 0; i < c; i++) {
            uint32_t best = i;
            for (uint32_t k = i + 1; k < m; k++)
                if (balance_layer_cmp_light(&cand[k], &cand[best], ly) < 0)
                    best = k;
            uint32_t t = cand[i];
            cand[i] = cand[best];
            cand[best] = t;
        }
    } else {
        qsort_r(cand, m, sizeof *cand, balance_layer_cmp_light, ly);
    }
    if (s_fits_after(ly, cand, c))
        return;
    // Rare: the lightest workers would strand a later expert. Havel-Hakimi: giving an expert
    // the workers with the most free slots keeps a packable state packable.
    qsort_r(cand, m, sizeof *cand, balance_layer_cmp_light, ly);
    uint32_t *hh = ly->hh, h = 0;
    for (uint32_t f = ly->S; f > 0 && h < m; f--) // by free slots descending, stable
        for (uint32_t i = 0; i < m; i++)
            if (ly->S - ly->cnt[cand[i]] == f)
                hh[h++] = cand[i];
    for (uint32_t keep = c; keep-- > 0;) {
        // cand[0..keep) stays; the rest comes from hh in order
        for (uint32_t i = 0; i < keep; i++)
            ly->mark[cand[i]] = 1;
        uint32_t got = keep;
        for (uint32_t i = 0; i < h && got < c; i++)
            if (!ly->mark[hh[i]]) {
                ly->mark[hh[i]] = 1;
                // move hh[i] into position `got` of cand, keeping cand a permutation
                for (uint32_t k = got; k < m; k++)
                    if (cand[k] == hh[i]) {
                        cand[k] = cand[got];
                        cand[got] = hh[i];
                        break;
                    }
                got++;
            }
        for (uint32_t i = 0; i < m; i++)
            ly->mark[cand[i]] = 0;
        if (keep == 0 || s_fits_after(ly, cand, c))
            return; // keep == 0 is pure Havel-Hakimi, which fits by the lemma
        qsort_r(cand, m, sizeof *cand, balance_layer_cmp_light, ly);
    }
}

/* Step 2: held, bin, cnt, wload from copies and lpc. */
static void s_pack(balance_layer_t *ly)
{
    uint32_t E = ly->E, n = ly->n;
    memset(ly->held, 0, (size_t)n * E);
    memset(ly->cnt, 0, n * sizeof *ly->cnt);
    for (uint32_t w = 0; w < n; w++)
        ly->wload[w] = 0;
    for (uint32_t j = 0; j < E; j++)
        ly->order[j] = j;
    qsort_r(ly->order, E, sizeof *ly->order, s_cmp_hot, ly);
    memset(ly->remc, 0, (n + 1) * sizeof *ly->remc);
    for (uint32_t j = 0; j < E; j++)
        ly->remc[ly->copies[j]]++;
    for (uint32_t i = 0; i < E; i++) {
        uint32_t j = ly->order[i], c = ly->copies[j], m = 0;
        ly->remc[c]--;
        for (uint32_t w = 0; w < n; w++)
            if (ly->cnt[w] < ly->S)
                ly->cand[m++] = w;
        if (m < c) { // the Gale-Ryser invariant rules this out
            fprintf(stderr, "balance: expert %u needs %u workers, %u have room\n", j, c, m);
            abort();
        }
        s_choose(ly, ly->cand, m, c);
        for (uint32_t k = 0; k < c; k++)
            s_put(ly, ly->cand[k], j);
    }
}

/* --- 3. local improvement ------------------------------------------------------------------- */

/* Worker w's load summed afresh (the incremental updates of a long search would drift). */
void balance_layer_reload(balance_layer_t *ly, uint32_t w)
{
    const uint32_t *W = ly->bin + (size_t)w * ly->S;
    double sum = 0;
    for (uint32_t i = 0; i < ly->cnt[w]; i++)
        sum += ly->lpc[W[i]];
    ly->wload[w] = sum;
}

/* Expert j gains (+1) or loses (-1) a copy: its load per copy and its holders' loads follow. */
void balance_layer_recopy(balance_layer_t *ly, uint32_t j, int delta)
{
    ly->copies[j] = (uint32_t)((int64_t)ly->copies[j] + delta);
    ly->lpc[j] = ly->load[j] / ly->copies[j];
    for (uint32_t w = 0; w < ly->n; w++)
        if (ly->held[(size_t)w * ly->E + j])
            balance_layer_reload(ly, w);
}

/* Step 3, on the busiest worker b, best first, while some change leaves every worker it
 * touches strictly below b's load:
 *  - move one of b's copies to a free slot elsewhere, or swap it with a lighter copy;
 *  - re-replicate: drop one of b's copies of an expert x that has more than min_replicas (x's
 *    other holders take up its share) and give b a new copy of an expert y with load (y's
 *    holders shed some). Replication by load per copy alone can put a hot expert's second copy
 *    beside another hot expert when slots are few; this undoes that. */
void balance_layer_improve(balance_layer_t *ly, double target)
{
    uint32_t E = ly->E, S = ly->S, n = ly->n;
    uint64_t spent = 0;
    while (spent < S_SWAP_BUDGET) {
        uint32_t b = 0;
        for (uint32_t w = 1; w < n; w++)
            if (ly->wload[w] > ly->wload[b])
                b = w;
        double Lb = ly->wload[b], best = Lb - Lb * S_REL_EPS;
        if (Lb <= target)
            return;
        // kind: 0 none, 1 move to a free slot of bw, 2 swap with bw's copy bk, 3 re-replicate
        // B[bi] as a new copy of expert bk
        int kind = 0;
        uint32_t bi = 0, bw = 0, bk = 0;
        uint32_t *B = ly->bin + (size_t)b * S;
        for (uint32_t ia = 0; ia < ly->cnt[b]; ia++) {
            uint32_t a = B[ia];
            double la = ly->lpc[a];
            for (uint32_t w = 0; w < n; w++) {
                double Lw = ly->wload[w];
                if (w == b || Lw >= best || ly->held[(size_t)w * E + a])
                    continue;
                spent += ly->cnt[w] + 1;
                if (ly->cnt[w] < S) {
                    double v = fmax(Lb - la, Lw + la);
                    if (v < best)
                        best = v, kind = 1, bi = ia, bw = w;
                }
                const uint32_t *W = ly->bin + (size_t)w * S;
                for (uint32_t ic = 0; ic < ly->cnt[w]; ic++) {
                    uint32_t c = W[ic];
                    double lc = ly->lpc[c];
                    if (lc >= la || ly->held[(size_t)b * E + c])
                        continue;
                    double v = fmax(Lb - la + lc, Lw + la - lc);
                    if (v < best)
                        best = v, kind = 2, bi = ia, bw = w, bk = ic;
                }
            }
            if (ly->copies[a] <= ly->m)
                continue;
            // a's other holders after it loses b's copy
            double up = ly->load[a] / (ly->copies[a] - 1) - la, others = 0;
            for (uint32_t w = 0; w < n; w++)
                if (w != b && ly->held[(size_t)w * E + a])
                    others = fmax(others, ly->wload[w] + up);
            spent += n + E;
            if (others >= best)
                continue;
            for (uint32_t y = 0; y < E; y++) {
                if (ly->held[(size_t)b * E + y] || ly->copies[y] >= n || ly->load[y] <= 0)
                    continue;
                double v = fmax(Lb - la + ly->load[y] / (ly->copies[y] + 1), others);
                if (v < best)
                    best = v, kind = 3, bi = ia, bk = y;
            }
        }
        uint32_t a = B[bi], *W = ly->bin + (size_t)bw * S;
        if (kind == 0) {
            return;
        } else if (kind == 1) {
            ly->held[(size_t)b * E + a] = 0;
            ly->held[(size_t)bw * E + a] = 1;
            B[bi] = B[--ly->cnt[b]];
            W[ly->cnt[bw]++] = a;
        } else if (kind == 2) {
            uint32_t c = W[bk];
            ly->held[(size_t)b * E + a] = 0, ly->held[(size_t)bw * E + a] = 1;
            ly->held[(size_t)bw * E + c] = 0, ly->held[(size_t)b * E + c] = 1;
            B[bi] = c;
            W[bk] = a;
        } else {
            ly->held[(size_t)b * E + a] = 0;
            ly->held[(size_t)b * E + bk] = 1;
            B[bi] = bk;
            balance_layer_recopy(ly, a, -1);
            balance_layer_recopy(ly, bk, +1); // reloads b too
        }
        balance_layer_reload(ly, b);
        if (kind != 3)
            balance_layer_reload(ly, bw);
    }
}

/* Every worker's load from a held matrix, summed in expert order so that equal contents give
 * equal bits whatever the labels; returns the busiest. */
double balance_layer_eval(const balance_layer_t *ly, const uint8_t *held,
                          const uint32_t *copies, double *wload)
{
    double max = 0;
    for (uint32_t w = 0; w < ly->n; w++) {
        const uint8_t *row = held + (size_t)w * ly->E;
        double sum = 0;
        for (uint32_t j = 0; j < ly->E; j++)
            if (row[j])
                sum += ly->load[j] / copies[j];
        wload[w] = sum;
        max = sum > max ? sum : max;
    }
    return max;
}

/* Tries a few replica plans and keeps the one whose packing has the lightest busiest worker
 * (ties: the earlier). EPLB's plan replicates by load per copy until the slots are full; when
 * slots are few, the last of those copies can only go beside other hot copies, where cold
 * fillers would cost nothing. So a plan is "the first k of EPLB's copies, then fillers": with
 * few extra copies every k, else k = all (EPLB), k where the largest copy first reaches the mean
 * per worker (below that the lower bound max(mean, largest copy) no longer improves), and
 * halfway between. */
#define S_ALL_PLANS 8

void balance_layer_reference(balance_layer_t *ly, const double *load)
{
    ly->load = load;
    uint32_t k_mean, plans[S_ALL_PLANS + 1], n_plans = 0;
    double best = INFINITY;
    for (uint32_t p = 0; p == 0 || p < n_plans; p++) {
        uint32_t hot = s_replicate(ly, p == 0 ? UINT32_MAX : plans[p], &k_mean);
        if (p == 0) {
            plans[n_plans++] = hot;
            if (hot <= S_ALL_PLANS) {
                for (uint32_t k = hot; k-- > 0;)
                    plans[n_plans++] = k;
            } else {
                if (k_mean < hot)
                    plans[n_plans++] = k_mean;
                if (k_mean + 1 < hot)
                    plans[n_plans++] = k_mean + (hot - k_mean) / 2;
            }
        }
        s_pack(ly);
        balance_layer_improve(ly, 0);
        double max = balance_layer_eval(ly, ly->held, ly->copies, ly->wload);
        if (max < best) {
            best = max;
            balance_layer_swap(ly); // the best so far waits in ly->alt
        }
    }
    balance_layer_swap(ly);
}

static void s_sol_init(balance_sol_t *s, uint32_t E, uint32_t n, uint32_t S)
{
    s->held = semoe_xmalloc((size_t)n * E + 1);
    s->bin = semoe_xmalloc(((size_t)n * S + 1) * sizeof *s->bin);
    s->cnt = semoe_xmalloc(n * sizeof *s->cnt);
    s->copies = semoe_xmalloc((E + 1) * sizeof *s->copies);
    s->wload = semoe_xmalloc(n * sizeof *s->wload);
    s->lpc = semoe_xmalloc((E + 1) * sizeof *s->lpc);
}

static void s_sol_free(balance_sol_t *s)
{
    free(s->held);
    free(s->bin);
    free(s->cnt);
    free(s->copies);
    free(s->wload);
    free(s->lpc);
}

void balance_layer_init(balance_layer_t *ly, uint32_t E, uint32_t n, uint32_t S, uint32_t m,
                        uint32_t prev_longest)
{
    memset(ly, 0, sizeof *ly);
    ly->E = E, ly->n = n, ly->S = S, ly->m = m;
    balance_sol_t cur;
    s_sol_init(&cur, E, n, S);
    ly->held = cur.held, ly->bin = cur.bin, ly->cnt = cur.cnt, ly->copies = cur.copies;
    ly->wload = cur.wload, ly->lpc = cur.lpc;
    s_sol_init(&ly->alt, E, n, S);
    s_sol_init(&ly->tmp, E, n, S);
    ly->order = semoe_xmalloc((E + 1) * sizeof *ly->order);
    ly->heap = semoe_xmalloc((E + 1) * sizeof *ly->heap);
    ly->cand = semoe_xmalloc(n * sizeof *ly->cand);
    ly->hh = semoe_xmalloc(n * sizeof *ly->hh);
    ly->mark = semoe_xcalloc(n, 1);
    ly->remc = semoe_xmalloc((n + 1) * sizeof *ly->remc);
    ly->ge = semoe_xmalloc(((size_t)S + 2) * sizeof *ly->ge);
    ly->pheld = semoe_xmalloc((size_t)n * E + 1);
    ly->pcopies = semoe_xmalloc((E + 1) * sizeof *ly->pcopies);
    ly->pl_off = semoe_xmalloc((E + 1) * sizeof *ly->pl_off);
    ly->pl = semoe_xmalloc(((size_t)prev_longest + 1) * sizeof *ly->pl);
    ly->pwload = semoe_xmalloc(n * sizeof *ly->pwload);
    ly->perm = semoe_xmalloc(n * sizeof *ly->perm);
}

void balance_layer_free(balance_layer_t *ly)
{
    balance_sol_t cur = {ly->held, ly->bin, ly->cnt, ly->copies, ly->wload, ly->lpc};
    s_sol_free(&cur);
    s_sol_free(&ly->alt);
    s_sol_free(&ly->tmp);
    free(ly->order);
    free(ly->heap);
    free(ly->cand);
    free(ly->hh);
    free(ly->mark);
    free(ly->remc);
    free(ly->ge);
    free(ly->pheld);
    free(ly->pcopies);
    free(ly->pl_off);
    free(ly->pl);
    free(ly->pwload);
    free(ly->perm);
    memset(ly, 0, sizeof *ly);
}
