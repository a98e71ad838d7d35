/* bench_skew's reading of the workers' metrics lines (skewlog.h): the logs read incrementally
 * with cJSON, and a step's imbalance computed as coordinator/balance.h's balance_imbalance
 * does, from what the workers' experts actually received. */
#include "bench/skewlog.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

#include <cjson/cJSON.h>

#include "actors/err.h"

#define S_MAX_RANKS 1024

static double s_num(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

void skewlog_read(skewlog_worker_t *w, uint32_t le)
{
    FILE *f = fopen(w->metrics, "r");
    if (!f)
        return;
    if (fseek(f, w->off, SEEK_SET) != 0) {
        fclose(f);
        return;
    }
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, f)) > 0) {
        if (line[got - 1] != '\n')
            break; /* not whole yet: read it next time */
        w->off += (long)got;
        cJSON *o = cJSON_ParseWithLength(line, (size_t)got);
        const cJSON *load = cJSON_GetObjectItemCaseSensitive(o, "load");
        if (o && cJSON_IsArray(load) && (uint32_t)cJSON_GetArraySize(load) == le) {
            if (w->n == w->cap) {
                w->cap = w->cap ? 2 * w->cap : 64;
                w->lines = semoe_xrealloc(w->lines, (size_t)w->cap * sizeof *w->lines);
            }
            skewlog_line_t *l = &w->lines[w->n++];
            l->gen = (uint64_t)s_num(o, "generation");
            l->step = (uint64_t)s_num(o, "step");
            l->rank = (int)s_num(o, "rank");
            l->world = (int)s_num(o, "world");
            l->time = s_num(o, "time");
            l->step_s = s_num(o, "step_time_s");
            l->exch_s = s_num(o, "t_exchange");
            l->load = semoe_xcalloc(le ? le : 1, sizeof *l->load);
            size_t k = 0;
            const cJSON *v;
            cJSON_ArrayForEach(v, load) l->load[k++] = (uint32_t)v->valuedouble;
        }
        cJSON_Delete(o);
    }
    free(line);
    fclose(f);
}

void skewlog_free(skewlog_worker_t *w)
{
    for (int k = 0; k < w->n; k++)
        free(w->lines[k].load);
    free(w->lines);
    w->lines = NULL;
    w->n = w->cap = 0;
}

/* The line of worker w for (gen, step), or NULL. */
static const skewlog_line_t *s_find(const skewlog_worker_t *w, uint64_t gen, uint64_t step)
{
    for (int k = w->n - 1; k >= 0; k--)
        if (w->lines[k].gen == gen && w->lines[k].step == step)
            return &w->lines[k];
    return NULL;
}

bool skewlog_step(const skewlog_run_t *r, uint64_t gen, uint64_t step, skewlog_step_t *out)
{
    const skewlog_line_t *l[S_MAX_RANKS];
    int n = 0, world = 0;
    for (int i = 0; i < r->n && n < S_MAX_RANKS; i++) {
        const skewlog_line_t *x = s_find(&r->w[i], gen, step);
        if (x) {
            l[n++] = x;
            world = x->world;
        }
    }
    if (n == 0 || n != world)
        return false;
    double sum_max = 0, sum_mean = 0, hot = 0, all = 0;
    for (uint32_t layer = 0; layer < r->L; layer++) {
        double most = 0, total = 0;
        for (int i = 0; i < n; i++) {
            double mine = 0;
            for (uint32_t j = 0; j < r->E; j++) {
                double v = l[i]->load[layer * r->E + j];
                mine += v;
                hot += j < r->hot ? v : 0;
            }
            most = fmax(most, mine);
            total += mine;
        }
        sum_max += most;
        sum_mean += total / n;
        all += total;
    }
    *out = (skewlog_step_t){.imbalance = sum_mean > 0 ? sum_max / sum_mean : 1,
                            .hot = all > 0 ? hot / all : 0};
    for (int i = 0; i < n; i++) {
        out->step_s += l[i]->step_s / n;
        out->exch_s += l[i]->exch_s / n;
    }
    return true;
}

uint64_t skewlog_newest(const skewlog_run_t *r, uint64_t *first, uint64_t *done)
{
    uint64_t gen = 0;
    *first = UINT64_MAX;
    *done = 0;
    for (int i = 0; i < r->n; i++)
        for (int k = 0; k < r->w[i].n; k++)
            gen = r->w[i].lines[k].gen > gen ? r->w[i].lines[k].gen : gen;
    for (int i = 0; i < r->n; i++)
        for (int k = 0; k < r->w[i].n; k++)
            if (r->w[i].lines[k].gen == gen && r->w[i].lines[k].step < *first)
                *first = r->w[i].lines[k].step;
    skewlog_step_t x;
    for (uint64_t s = *first; gen && s != UINT64_MAX && skewlog_step(r, gen, s, &x); s++)
        *done = s - *first + 1;
    return gen;
}

/* A worker's wall time per step over steps (from, to] of gen: the first worker with lines at
 * both ends. NaN when none has. */
static double s_wall_step(const skewlog_run_t *r, uint64_t gen, uint64_t from, uint64_t to)
{
    for (int i = 0; i < r->n && to > from; i++) {
        const skewlog_line_t *a = s_find(&r->w[i], gen, from), *z = s_find(&r->w[i], gen, to);
        if (a && z)
            return (z->time - a->time) / (double)(to - from);
    }
    return NAN;
}

void skewlog_phase(const skewlog_run_t *r, uint64_t gen, uint64_t from, uint64_t to,
                   double tokens_per_step, skewlog_phase_t *p)
{
    memset(p, 0, sizeof *p);
    p->gen = gen, p->from = from, p->to = to;
    p->imb_min = INFINITY, p->imb_max = -INFINITY;
    for (uint64_t s = from; s <= to; s++) {
        skewlog_step_t x;
        if (!skewlog_step(r, gen, s, &x))
            continue;
        p->steps++;
        p->imb_mean += x.imbalance;
        p->hot_mean += x.hot;
        p->imb_min = fmin(p->imb_min, x.imbalance);
        p->imb_max = fmax(p->imb_max, x.imbalance);
        p->step_s += x.step_s;
        p->exch_s += x.exch_s;
    }
    if (p->steps) {
        p->imb_mean /= p->steps;
        p->hot_mean /= p->steps;
        p->step_s /= p->steps;
        p->exch_s /= p->steps;
    }
    p->wall_step_s = from >= 1 ? s_wall_step(r, gen, from - 1, to) : NAN;
    p->tok_s = tokens_per_step / p->wall_step_s;
}
