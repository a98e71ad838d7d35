/* Balanced sticky placement (placement.h): which r = E mod n workers get one expert more in
 * each layer is chosen for all layers at once by a min-cost flow (slots spread evenly, given to
 * survivors that hold more where possible); then each layer keeps what fits, deals the rest. */
#include "coordinator/placement.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Above this many layer x worker pairs the flow graph would cost too much memory; the extra
 * slots are then dealt cyclically: still balanced, no longer move-minimal. */
#define PLACEMENT_FLOW_MAX_PAIRS (1u << 20)

#define S_INF INT64_MAX

/* A flow network in adjacency lists; edge e and e ^ 1 are a pair (forward, residual). */
typedef struct {
    uint32_t n_nodes, n_edges;
    int32_t *head;  // (nodes) first edge out of a node, -1: none
    int32_t *next;  // (edges) next edge out of the same node
    uint32_t *to;   // (edges)
    int32_t *cap;   // (edges) residual capacity
    int32_t *cost;  // (edges)
    int64_t *pot;   // (nodes) potentials: reduced costs stay >= 0
    int64_t *dist;  // (nodes)
    int32_t *level; // (nodes) BFS level in the admissible graph
    int32_t *iter;  // (nodes) Dinic's current edge
    uint32_t *queue; // (nodes)
    struct s_heap_item { int64_t d; uint32_t v; } *heap; // (edges + 1) Dijkstra's lazy heap
} s_graph_t;

static void s_graph_init(s_graph_t *g, uint32_t nodes, uint32_t edges)
{
    memset(g, 0, sizeof *g);
    g->n_nodes = nodes;
    g->head = semoe_xmalloc(nodes * sizeof *g->head);
    memset(g->head, 0xff, nodes * sizeof *g->head);
    g->next = semoe_xmalloc(edges * sizeof *g->next);
    g->to = semoe_xmalloc(edges * sizeof *g->to);
    g->cap = semoe_xmalloc(edges * sizeof *g->cap);
    g->cost = semoe_xmalloc(edges * sizeof *g->cost);
    g->pot = semoe_xcalloc(nodes, sizeof *g->pot);
    g->dist = semoe_xmalloc(nodes * sizeof *g->dist);
    g->level = semoe_xmalloc(nodes * sizeof *g->level);
    g->iter = semoe_xmalloc(nodes * sizeof *g->iter);
    g->queue = semoe_xmalloc(nodes * sizeof *g->queue);
    g->heap = semoe_xmalloc((edges + 1) * sizeof *g->heap);
}

static void s_graph_free(s_graph_t *g)
{
    free(g->head);
    free(g->next);
    free(g->to);
    free(g->cap);
    free(g->cost);
    free(g->pot);
    free(g->dist);
    free(g->level);
    free(g->iter);
    free(g->queue);
    free(g->heap);
}

/* Adds u -> v and its residual v -> u; returns the forward edge's index. */
static uint32_t s_edge(s_graph_t *g, uint32_t u, uint32_t v, int32_t cap, int32_t cost)
{
    uint32_t e = g->n_edges;
    g->to[e] = v, g->cap[e] = cap, g->cost[e] = cost, g->next[e] = g->head[u];
    g->head[u] = (int32_t)e;
    g->to[e + 1] = u, g->cap[e + 1] = 0, g->cost[e + 1] = -cost, g->next[e + 1] = g->head[v];
    g->head[v] = (int32_t)(e + 1);
    g->n_edges += 2;
    return e;
}

static int64_t s_reduced(const s_graph_t *g, uint32_t u, uint32_t e)
{
    return g->cost[e] + g->pot[u] - g->pot[g->to[e]];
}

static void s_heap_push(s_graph_t *g, uint32_t *size, int64_t d, uint32_t v)
{
    uint32_t i = (*size)++;
    while (i > 0) {
        uint32_t p = (i - 1) / 2;
        if (g->heap[p].d < d || (g->heap[p].d == d && g->heap[p].v <= v))
            break;
        g->heap[i] = g->heap[p];
        i = p;
    }
    g->heap[i] = (struct s_heap_item){d, v};
}

static struct s_heap_item s_heap_pop(s_graph_t *g, uint32_t *size)
{
    struct s_heap_item top = g->heap[0], last = g->heap[--(*size)];
    uint32_t i = 0;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= *size)
            break;
        if (c + 1 < *size && (g->heap[c + 1].d < g->heap[c].d ||
                              (g->heap[c + 1].d == g->heap[c].d && g->heap[c + 1].v < g->heap[c].v)))
            c++;
        if (last.d < g->heap[c].d || (last.d == g->heap[c].d && last.v <= g->heap[c].v))
            break;
        g->heap[i] = g->heap[c];
        i = c;
    }
    g->heap[i] = last;
    return top;
}

/* Shortest distances from s over residual edges by reduced cost (all >= 0), then folds them
 * into the potentials so that the edges on shortest paths get reduced cost 0. Returns false
 * when t cannot be reached. The heap may hold one entry per edge relaxation: at most one per
 * edge, since a node is settled once. */
static bool s_dijkstra(s_graph_t *g, uint32_t s, uint32_t t)
{
    for (uint32_t v = 0; v < g->n_nodes; v++)
        g->dist[v] = S_INF;
    uint32_t size = 0;
    g->dist[s] = 0;
    s_heap_push(g, &size, 0, s);
    while (size > 0) {
        struct s_heap_item it = s_heap_pop(g, &size);
        if (it.d != g->dist[it.v])
            continue;
        for (int32_t e = g->head[it.v]; e != -1; e = g->next[e]) {
            if (g->cap[e] <= 0)
                continue;
            uint32_t u = g->to[e];
            int64_t d = it.d + s_reduced(g, it.v, (uint32_t)e);
            if (d < g->dist[u]) {
                g->dist[u] = d;
                s_heap_push(g, &size, d, u);
            }
        }
    }
    if (g->dist[t] == S_INF)
        return false;
    for (uint32_t v = 0; v < g->n_nodes; v++)
        g->pot[v] += g->dist[v] < g->dist[t] ? g->dist[v] : g->dist[t];
    return true;
}

static bool s_admissible(const s_graph_t *g, uint32_t u, uint32_t e)
{
    return g->cap[e] > 0 && s_reduced(g, u, e) == 0;
}

/* BFS levels over admissible edges; true when t is reached. */
static bool s_levels(s_graph_t *g, uint32_t s, uint32_t t)
{
    for (uint32_t v = 0; v < g->n_nodes; v++)
        g->level[v] = -1;
    uint32_t qh = 0, qt = 0;
    g->level[s] = 0;
    g->queue[qt++] = s;
    while (qh < qt) {
        uint32_t v = g->queue[qh++];
        for (int32_t e = g->head[v]; e != -1; e = g->next[e]) {
            uint32_t u = g->to[e];
            if (g->level[u] < 0 && s_admissible(g, v, (uint32_t)e)) {
                g->level[u] = g->level[v] + 1;
                g->queue[qt++] = u;
            }
        }
    }
    return g->level[t] >= 0;
}

/* One augmenting path along increasing levels; returns the flow pushed (0: none left). The
 * recursion is as deep as t's BFS level, at most the number of nodes. */
static int32_t s_augment(s_graph_t *g, uint32_t v, uint32_t t, int32_t f)
{
    if (v == t)
        return f;
    for (; g->iter[v] != -1; g->iter[v] = g->next[g->iter[v]]) {
        uint32_t e = (uint32_t)g->iter[v], u = g->to[e];
        if (g->level[u] != g->level[v] + 1 || !s_admissible(g, v, e))
            continue;
        int32_t d = s_augment(g, u, t, f < g->cap[e] ? f : g->cap[e]);
        if (d > 0) {
            g->cap[e] -= d;
            g->cap[e ^ 1] += d;
            return d;
        }
    }
    return 0;
}

/* Min-cost flow of value need from s to t (primal-dual: shortest paths by potentials, then a
 * blocking flow over the zero-reduced-cost edges). Returns the flow reached. */
static int64_t s_min_cost_flow(s_graph_t *g, uint32_t s, uint32_t t, int64_t need)
{
    int64_t flow = 0;
    while (flow < need && s_dijkstra(g, s, t)) {
        while (flow < need && s_levels(g, s, t)) {
            memcpy(g->iter, g->head, g->n_nodes * sizeof *g->iter);
            int32_t f;
            while (flow < need && (f = s_augment(g, s, t, INT32_MAX)) > 0)
                flow += f;
        }
    }
    return flow;
}

/* Chooses, for every layer, the r workers that get q + 1 experts (slots[l * r + i]), each
 * worker in floor(L r / n) or ceil(L r / n) layers, maximising the number of choices where the
 * worker already holds more than q surviving experts of that layer (held: L x n counts).
 * Returns false if the flow fell short, which the proof in the caller rules out. */
static bool s_choose_flow(uint32_t L, uint32_t n, uint32_t q, uint32_t r, const uint32_t *held,
                          uint32_t *slots)
{
    uint64_t total = (uint64_t)L * r;
    uint32_t per = (uint32_t)(total / n), extra = (uint32_t)(total % n);
    // nodes: s, L layers, n workers, the pool of the `extra` workers allowed one more, t
    uint32_t s = 0, layer0 = 1, worker0 = 1 + L, pool = 1 + L + n, t = pool + 1;
    uint32_t edges = 2 * (L + L * n + 2 * n + 1);
    s_graph_t g;
    s_graph_init(&g, t + 1, edges);
    for (uint32_t l = 0; l < L; l++)
        s_edge(&g, s, layer0 + l, (int32_t)r, 0);
    // Layer -> worker edges are added in descending rank so that the adjacency lists (which
    // prepend) are walked in ascending rank: ties go to low ranks, which reads naturally.
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t w = n; w-- > 0;)
            s_edge(&g, layer0 + l, worker0 + w, 1, held[(size_t)l * n + w] > q ? 0 : 1);
    for (uint32_t w = n; w-- > 0;) {
        if (extra > 0)
            s_edge(&g, worker0 + w, pool, 1, 0);
        if (per > 0)
            s_edge(&g, worker0 + w, t, (int32_t)per, 0);
    }
    if (extra > 0)
        s_edge(&g, pool, t, (int32_t)extra, 0);
    // s_choose_cyclic proves a flow of value L r exists, so the flow reaches it.
    bool ok = s_min_cost_flow(&g, s, t, (int64_t)total) == (int64_t)total;
    for (uint32_t l = 0; ok && l < L; l++) {
        uint32_t i = 0;
        for (int32_t e = g.head[layer0 + l]; e != -1; e = g.next[e]) {
            uint32_t v = g.to[e];
            if ((e & 1) == 0 && v >= worker0 && v < worker0 + n && g.cap[e] == 0 && i < r)
                slots[(size_t)l * r + i++] = v - worker0;
        }
        ok = i == r;
    }
    s_graph_free(&g);
    return ok;
}

/* Deals the extra slots cyclically: layer l's go to ranks (l r + i) mod n. Over all layers
 * that gives every worker floor(L r / n) or ceil(L r / n) slots: proof that a balanced choice
 * always exists. */
static void s_choose_cyclic(uint32_t L, uint32_t n, uint32_t r, uint32_t *slots)
{
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t i = 0; i < r; i++)
            slots[(size_t)l * r + i] = (uint32_t)(((uint64_t)l * r + i) % n);
}

/* Places one layer: keeps each expert on its surviving holder while the holder has room (in
 * expert order), then deals the rest to the lowest ranks with room. cnt and cap are scratch
 * arrays over the workers, zero on entry and left zero. */
static void s_place_layer(uint32_t E, uint32_t q, uint32_t r, const uint32_t *slots,
                          const uint32_t *prev, uint32_t *out, uint32_t *cnt, uint32_t *cap)
{
    for (uint32_t i = 0; i < r; i++)
        cap[slots[i]] = 1; // cap holds the extra over q
    for (uint32_t j = 0; j < E; j++) {
        uint32_t h = prev[j];
        if (h != PLACEMENT_NONE && cnt[h] < q + cap[h]) {
            out[j] = h;
            cnt[h]++;
        } else {
            out[j] = PLACEMENT_NONE;
        }
    }
    uint32_t w = 0;
    for (uint32_t j = 0; j < E; j++) {
        if (out[j] != PLACEMENT_NONE)
            continue;
        while (cnt[w] >= q + cap[w])
            w++; // terminates: the capacities sum to E
        out[j] = w;
        cnt[w]++;
    }
    for (uint32_t j = 0; j < E; j++)
        cnt[out[j]] = 0;
    for (uint32_t i = 0; i < r; i++)
        cap[slots[i]] = 0;
}

semoe_rc placement_compute(uint32_t num_layers, uint32_t num_experts, uint32_t n,
                           const uint32_t *prev, uint32_t *out)
{
    uint64_t total = (uint64_t)num_layers * num_experts;
    if (total > UINT32_MAX)
        return semoe_err(SEMOE_EINVAL, "placement: %u layers x %u experts is too many",
                         num_layers, num_experts);
    for (uint64_t e = 0; e < total; e++)
        if (prev[e] != PLACEMENT_NONE && prev[e] >= n)
            return semoe_err(SEMOE_EINVAL, "placement: expert %llu held by rank %u of %u",
                             (unsigned long long)e, prev[e], n);
    if (n == 0) {
        for (uint64_t e = 0; e < total; e++)
            out[e] = PLACEMENT_NONE;
        return SEMOE_OK;
    }
    if (total == 0)
        return SEMOE_OK;
    uint32_t L = num_layers, E = num_experts, q = E / n, r = E % n;
    uint32_t *slots = semoe_xmalloc(((size_t)L * r + 1) * sizeof *slots);
    uint32_t *cnt = semoe_xcalloc(n, sizeof *cnt);
    uint32_t *cap = semoe_xcalloc(n, sizeof *cap);
    if (r > 0 && (uint64_t)L * n <= PLACEMENT_FLOW_MAX_PAIRS) {
        // held[l][w]: surviving experts of layer l on worker w
        uint32_t *held = semoe_xcalloc((size_t)L * n, sizeof *held);
        for (uint64_t e = 0; e < total; e++)
            if (prev[e] != PLACEMENT_NONE)
                held[(e / E) * n + prev[e]]++;
        bool ok = s_choose_flow(L, n, q, r, held, slots);
        free(held);
        if (!ok) // cannot happen (a flow of L r exists); stay balanced if it ever does
            s_choose_cyclic(L, n, r, slots);
    } else if (r > 0) {
        s_choose_cyclic(L, n, r, slots);
    }
    for (uint32_t l = 0; l < L; l++)
        s_place_layer(E, q, r, slots + (size_t)l * r, prev + (size_t)l * E,
                      out + (size_t)l * E, cnt, cap);
    free(cap);
    free(cnt);
    free(slots);
    return SEMOE_OK;
}

void placement_batch_offsets(uint32_t global_batch, uint32_t n, uint32_t *off)
{
    for (uint32_t r = 0; r <= n; r++)
        off[r] = n ? (uint32_t)((uint64_t)r * global_batch / n) : 0;
}
