/* Keeping copies in place (balance_sticky.h). A move ships an expert's weights and optimizer
 * state over the network, so moves are worth a search, but the layer's busiest worker sets the
 * step time, so the caller bounds every candidate by the reference placement's busiest load:
 *  - relabel: workers are interchangeable within a layer, so the reference's worker contents
 *    ("bins") can go to whichever workers share most with them (an assignment problem);
 *  - stick: a copy that moved goes back to a previous holder when that keeps within the bound;
 *  - seed: the previous placement repaired (a dead worker's experts re-homed, a new worker's
 *    slots filled, the neediest expert first), for the caller to improve down to the bound. */
#include "coordinator/balance_sticky.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "actors/err.h"
#include "coordinator/placement.h"

#define S_STICK_BUDGET (1u << 22) // copy pairs stick and seed may look at, per call
#define S_HUNGARIAN_MAX_N 128     // n^3 per layer: beyond this the relabelling is greedy

/* Reads this layer's previous placement (offsets off[0..E], ranks valid) into pheld, pcopies
 * and the distinct live holder lists; returns true when it is a placement that could be kept:
 * no holder gone, none twice, min_replicas..n holders each, at most S per worker. *live is
 * set when some previous holder is alive. */
bool balance_sticky_read_prev(balance_layer_t *ly, const uint32_t *off, const uint32_t *holders,
                              bool *live)
{
    uint32_t E = ly->E, n = ly->n, k = 0;
    bool ok = true;
    memset(ly->pheld, 0, (size_t)n * E);
    memset(ly->tmp.cnt, 0, n * sizeof *ly->tmp.cnt); // scratch: copies per worker
    for (uint32_t j = 0; j < E; j++) {
        ly->pl_off[j] = k;
        for (uint32_t i = off[j]; i < off[j + 1]; i++) {
            uint32_t h = holders[i];
            if (h == PLACEMENT_NONE || ly->pheld[(size_t)h * E + j]) {
                ok = false;
                continue;
            }
            ly->pheld[(size_t)h * E + j] = 1;
            ly->pl[k++] = h;
            ly->tmp.cnt[h]++;
        }
        ly->pcopies[j] = k - ly->pl_off[j];
        ok = ok && ly->pcopies[j] >= ly->m;
    }
    ly->pl_off[E] = k;
    for (uint32_t w = 0; w < n; w++)
        ok = ok && ly->tmp.cnt[w] <= ly->S;
    *live = k > 0;
    return ok;
}

/* Copies of bin b (the reference's worker b) that worker w held before. */
static uint32_t s_overlap(const balance_layer_t *ly, uint32_t b, uint32_t w)
{
    const uint32_t *B = ly->bin + (size_t)b * ly->S;
    const uint8_t *row = ly->pheld + (size_t)w * ly->E;
    uint32_t k = 0;
    for (uint32_t i = 0; i < ly->cnt[b]; i++)
        k += row[B[i]];
    return k;
}

/* Min-cost perfect assignment of rows to columns (n x n costs a, row-major), O(n^3), the
 * shortest-augmenting-path form with potentials. Sets perm[row] = column. */
static void s_hungarian(uint32_t n, const int64_t *a, uint32_t *perm)
{
    int64_t *u = semoe_xcalloc(n + 1, sizeof *u), *v = semoe_xcalloc(n + 1, sizeof *v);
    int64_t *minv = semoe_xmalloc((n + 1) * sizeof *minv);
    uint32_t *p = semoe_xcalloc(n + 1, sizeof *p), *way = semoe_xcalloc(n + 1, sizeof *way);
    bool *used = semoe_xmalloc((n + 1) * sizeof *used);
    for (uint32_t i = 1; i <= n; i++) {
        p[0] = i;
        uint32_t j0 = 0;
        for (uint32_t j = 0; j <= n; j++)
            minv[j] = INT64_MAX, used[j] = false;
        do {
            used[j0] = true;
            uint32_t i0 = p[j0], j1 = 0;
            int64_t delta = INT64_MAX;
            for (uint32_t j = 1; j <= n; j++) {
                if (used[j])
                    continue;
                int64_t cur = a[(size_t)(i0 - 1) * n + (j - 1)] - u[i0] - v[j];
                if (cur < minv[j])
                    minv[j] = cur, way[j] = j0;
                if (minv[j] < delta)
                    delta = minv[j], j1 = j;
            }
            for (uint32_t j = 0; j <= n; j++) {
                if (used[j])
                    u[p[j]] += delta, v[j] -= delta;
                else
                    minv[j] -= delta;
            }
            j0 = j1;
        } while (p[j0] != 0);
        do {
            uint32_t j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
        } while (j0 != 0);
    }
    for (uint32_t j = 1; j <= n; j++)
        perm[p[j] - 1] = j - 1;
    free(u);
    free(v);
    free(minv);
    free(p);
    free(way);
    free(used);
}

typedef struct { uint32_t k, b, w; } s_pair_t;

static int s_cmp_pair(const void *x, const void *y)
{
    const s_pair_t *a = x, *b = y;
    if (a->k != b->k)
        return a->k > b->k ? -1 : 1;
    if (a->b != b->b)
        return a->b < b->b ? -1 : 1;
    return a->w < b->w ? -1 : a->w > b->w;
}

/* Greedy assignment for many workers: pairs by overlap descending, then the rest in order. */
static void s_greedy_assign(balance_layer_t *ly, uint32_t *perm)
{
    uint32_t n = ly->n, *count = ly->cand, np = 0, cap = 1024;
    s_pair_t *pairs = semoe_xmalloc(cap * sizeof *pairs);
    memset(count, 0, n * sizeof *count);
    for (uint32_t b = 0; b < n; b++) {
        const uint32_t *B = ly->bin + (size_t)b * ly->S;
        for (uint32_t i = 0; i < ly->cnt[b]; i++)
            for (uint32_t k = ly->pl_off[B[i]]; k < ly->pl_off[B[i] + 1]; k++) {
                uint32_t w = ly->pl[k];
                if (count[w]++ == 0) {
                    if (np == cap)
                        pairs = semoe_xrealloc(pairs, (cap *= 2) * sizeof *pairs);
                    pairs[np++] = (s_pair_t){0, b, w};
                }
            }
        for (uint32_t i = np; i-- > 0 && pairs[i].b == b;) {
            pairs[i].k = count[pairs[i].w];
            count[pairs[i].w] = 0;
        }
    }
    qsort(pairs, np, sizeof *pairs, s_cmp_pair);
    uint8_t *taken = ly->mark; // workers already given a bin (mark is zero between uses)
    for (uint32_t b = 0; b < n; b++)
        perm[b] = UINT32_MAX;
    for (uint32_t i = 0; i < np; i++)
        if (perm[pairs[i].b] == UINT32_MAX && !taken[pairs[i].w]) {
            perm[pairs[i].b] = pairs[i].w;
            taken[pairs[i].w] = 1;
        }
    uint32_t w = 0;
    for (uint32_t b = 0; b < n; b++) {
        if (perm[b] != UINT32_MAX)
            continue;
        while (taken[w])
            w++;
        perm[b] = w;
        taken[w] = 1;
    }
    memset(taken, 0, n);
    free(pairs);
}

/* Lays the reference's bins over the workers so that the most copies stay where they were. */
void balance_sticky_relabel(balance_layer_t *ly)
{
    uint32_t n = ly->n, E = ly->E, S = ly->S;
    if (n <= S_HUNGARIAN_MAX_N) {
        int64_t *a = semoe_xmalloc((size_t)n * n * sizeof *a);
        for (uint32_t b = 0; b < n; b++)
            for (uint32_t w = 0; w < n; w++)
                a[(size_t)b * n + w] = -(int64_t)s_overlap(ly, b, w);
        s_hungarian(n, a, ly->perm);
        free(a);
    } else {
        s_greedy_assign(ly, ly->perm);
    }
    for (uint32_t b = 0; b < n; b++) {
        uint32_t w = ly->perm[b];
        memcpy(ly->tmp.held + (size_t)w * E, ly->held + (size_t)b * E, E);
        memcpy(ly->tmp.bin + (size_t)w * S, ly->bin + (size_t)b * S, ly->cnt[b] * sizeof *ly->bin);
        ly->tmp.cnt[w] = ly->cnt[b];
        ly->tmp.wload[w] = ly->wload[b];
    }
    uint8_t *h = ly->held;
    ly->held = ly->tmp.held, ly->tmp.held = h;
    uint32_t *p = ly->bin;
    ly->bin = ly->tmp.bin, ly->tmp.bin = p;
    p = ly->cnt;
    ly->cnt = ly->tmp.cnt, ly->tmp.cnt = p;
    double *d = ly->wload;
    ly->wload = ly->tmp.wload, ly->tmp.wload = d;
}

/* Sends copies that moved back to a previous holder (into a free slot, or swapped with a copy
 * that is new there, preferring one whose previous holder is this worker), as long as neither
 * worker passes max. Every action lowers the moves, so the passes end. */
void balance_sticky_stick(balance_layer_t *ly, double max)
{
    uint32_t E = ly->E, S = ly->S, n = ly->n;
    uint64_t spent = 0;
    bool changed = true;
    while (changed && spent < S_STICK_BUDGET) {
        changed = false;
        for (uint32_t w = 0; w < n; w++) {
            uint32_t *W = ly->bin + (size_t)w * S;
            for (uint32_t i = 0; i < ly->cnt[w]; i++) {
                uint32_t x = W[i];
                if (ly->pheld[(size_t)w * E + x])
                    continue;
                double lx = ly->lpc[x];
                for (uint32_t k = ly->pl_off[x]; k < ly->pl_off[x + 1]; k++) {
                    uint32_t p = ly->pl[k], *P = ly->bin + (size_t)p * S;
                    if (ly->held[(size_t)p * E + x])
                        continue;
                    spent += ly->cnt[p] + 1;
                    if (ly->cnt[p] < S && ly->wload[p] + lx <= max) {
                        ly->held[(size_t)w * E + x] = 0;
                        ly->held[(size_t)p * E + x] = 1;
                        ly->wload[w] -= lx;
                        ly->wload[p] += lx;
                        P[ly->cnt[p]++] = x;
                        W[i--] = W[--ly->cnt[w]]; // look at what took x's place
                        changed = true;
                        break;
                    }
                    uint32_t best = UINT32_MAX;
                    for (uint32_t q = 0; q < ly->cnt[p]; q++) {
                        uint32_t y = P[q];
                        double ly_ = ly->lpc[y];
                        if (ly->pheld[(size_t)p * E + y] || ly->held[(size_t)w * E + y] ||
                            ly->wload[w] - lx + ly_ > max || ly->wload[p] - ly_ + lx > max)
                            continue;
                        if (best == UINT32_MAX || (ly->pheld[(size_t)w * E + y] &&
                                                   !ly->pheld[(size_t)w * E + P[best]]))
                            best = q;
                    }
                    if (best == UINT32_MAX)
                        continue;
                    uint32_t y = P[best];
                    ly->held[(size_t)w * E + x] = 0, ly->held[(size_t)p * E + x] = 1;
                    ly->held[(size_t)p * E + y] = 0, ly->held[(size_t)w * E + y] = 1;
                    ly->wload[w] += ly->lpc[y] - lx;
                    ly->wload[p] += lx - ly->lpc[y];
                    P[best] = x;
                    W[i] = y;
                    changed = true;
                    break;
                }
            }
        }
    }
}

/* Rebuilds bin, cnt, lpc and wload from held and copies. */
static void s_rebuild(balance_layer_t *ly)
{
    uint32_t E = ly->E, S = ly->S;
    for (uint32_t j = 0; j < E; j++)
        ly->lpc[j] = ly->copies[j] ? ly->load[j] / ly->copies[j] : 0;
    for (uint32_t w = 0; w < ly->n; w++) {
        ly->cnt[w] = 0;
        for (uint32_t j = 0; j < E; j++)
            if (ly->held[(size_t)w * E + j])
                ly->bin[(size_t)w * S + ly->cnt[w]++] = j;
        balance_layer_reload(ly, w);
    }
}

/* Whether expert x should get a copy before y: those below min_replicas first, then by load
 * per copy (none: infinite), then lower id. */
static bool s_needier(const balance_layer_t *ly, uint32_t x, uint32_t y)
{
    bool nx = ly->copies[x] < ly->m, ny = ly->copies[y] < ly->m;
    if (nx != ny)
        return nx;
    double lx = ly->copies[x] ? ly->load[x] / ly->copies[x] : INFINITY;
    double lyy = ly->copies[y] ? ly->load[y] / ly->copies[y] : INFINITY;
    if (lx != lyy)
        return lx > lyy;
    return x < y;
}

/* The previous placement repaired into a candidate with `target` copies: what no longer fits
 * dropped (a worker past S keeps its least replicated experts; zero-load experts keep
 * min_replicas), then copies added by s_needier, each on the lightest worker with room that
 * lacks it; an expert below min_replicas with no room anywhere takes the place of the copy
 * whose loss hurts least. Returns false when it gets stuck (the caller falls back). */
bool balance_sticky_seed(balance_layer_t *ly, uint64_t target)
{
    uint32_t E = ly->E, n = ly->n, S = ly->S, m = ly->m;
    memcpy(ly->held, ly->pheld, (size_t)n * E);
    memcpy(ly->copies, ly->pcopies, E * sizeof *ly->copies);
    for (uint32_t w = 0; w < n; w++) {
        uint8_t *row = ly->held + (size_t)w * E;
        uint32_t c = 0;
        for (uint32_t j = 0; j < E; j++)
            c += row[j];
        while (c > S) {
            uint32_t d = UINT32_MAX;
            for (uint32_t j = 0; j < E; j++)
                if (row[j] && (d == UINT32_MAX || ly->copies[j] >= ly->copies[d]))
                    d = j;
            row[d] = 0, ly->copies[d]--, c--;
        }
    }
    for (uint32_t j = 0; j < E; j++)
        for (uint32_t w = n; ly->load[j] <= 0 && ly->copies[j] > m && w-- > 0;)
            if (ly->held[(size_t)w * E + j])
                ly->held[(size_t)w * E + j] = 0, ly->copies[j]--;
    s_rebuild(ly);
    uint64_t total = 0, spent = 0;
    for (uint32_t j = 0; j < E; j++)
        total += ly->copies[j];
    for (;;) {
        // the neediest expert that may take a copy, and the lightest worker with room for it
        uint32_t x = UINT32_MAX, bw = UINT32_MAX;
        for (uint32_t j = 0; j < E; j++) {
            bool below = ly->copies[j] < m;
            if (!below && (total >= target || ly->load[j] <= 0 || ly->copies[j] >= n))
                continue;
            if (x != UINT32_MAX && !s_needier(ly, j, x))
                continue;
            uint32_t w0 = UINT32_MAX;
            for (uint32_t w = 0; w < n; w++)
                if (ly->cnt[w] < S && !ly->held[(size_t)w * E + j] &&
                    (w0 == UINT32_MAX || balance_layer_cmp_light(&w, &w0, ly) < 0))
                    w0 = w;
            spent += n;
            if (w0 != UINT32_MAX || below)
                x = j, bw = w0;
        }
        if (x == UINT32_MAX)
            break;
        if (spent > S_STICK_BUDGET)
            return false;
        if (bw == UINT32_MAX) {
            // x is below min_replicas and every slot is taken: replace the copy, on a worker
            // without x, whose expert keeps the smallest load per copy after losing it
            uint32_t dw = UINT32_MAX, di = 0;
            double harm = INFINITY;
            for (uint32_t w = 0; w < n; w++) {
                if (ly->held[(size_t)w * E + x])
                    continue;
                for (uint32_t i = 0; i < ly->cnt[w]; i++) {
                    uint32_t y = ly->bin[(size_t)w * S + i];
                    if (ly->copies[y] <= m)
                        continue;
                    double h = ly->load[y] / (ly->copies[y] - 1);
                    if (h < harm)
                        harm = h, dw = w, di = i;
                }
            }
            if (dw == UINT32_MAX)
                return false;
            uint32_t y = ly->bin[(size_t)dw * S + di];
            ly->held[(size_t)dw * E + y] = 0;
            ly->bin[(size_t)dw * S + di] = ly->bin[(size_t)dw * S + --ly->cnt[dw]];
            balance_layer_recopy(ly, y, -1);
            balance_layer_reload(ly, dw);
            total--;
            bw = dw;
        }
        ly->held[(size_t)bw * E + x] = 1;
        ly->bin[(size_t)bw * S + ly->cnt[bw]++] = x;
        balance_layer_recopy(ly, x, +1);
        total++;
    }
    return total == target;
}

/* Copies of the current placement on a worker that did not hold that expert before. */
uint32_t balance_sticky_moves(const balance_layer_t *ly)
{
    uint32_t k = 0;
    for (size_t i = 0; i < (size_t)ly->n * ly->E; i++)
        k += ly->held[i] && !ly->pheld[i];
    return k;
}
