/* Placement by load (balance.h): per MoE layer, DeepSeek's EPLB (replicate hot experts, then
 * pack copies longest-first, as FlexMoE also does) plus a local search, then the copies kept
 * where they were as far as that costs no balance.
 *
 * Why per layer: every MoE layer's all-to-all is its own synchronisation point, so a step costs
 * the sum over layers of that layer's busiest worker, and the layers are placed independently.
 * Each layer goes through:
 *  1. the reference R (balance_layer.c): replicate by load per copy until the slots are full
 *     (EPLB; a few plans that swap the last hot copies for cold fillers are tried as well),
 *     pack longest processing time first (Graham's LPT: within 4/3 - 1/(3n) of the optimum on
 *     identical machines without slot limits), improve the busiest worker by moves, swaps and
 *     re-replication. R depends on the loads alone.
 *  2. stickiness (balance_sticky.c), bounded by B = R's busiest * (1 + keep_slack):
 *     - the previous placement is kept whole when it is valid, fills as many slots and its
 *       busiest worker is within B under the new loads: feeding the output back in with the
 *       same loads moves nothing;
 *     - otherwise two candidates, the one moving fewer copies wins: R laid over the workers to
 *       keep the most copies in place (workers are interchangeable within a layer), and the
 *       previous placement repaired (dead holders' experts re-homed, new workers filled) then
 *       improved down to B; on both, copies that moved go back where that stays within B.
 * So a layer is never busier than B, and with keep_slack = 0 never busier than R. */
#include "coordinator/balance.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/balance_layer.h"
#include "coordinator/balance_sticky.h"

#define S_KEEP_TOL 1e-9 // "within B" also within this share: summation orders differ

static semoe_rc s_check_inputs(const balance_shape_t *sh, const double *load,
                               const uint32_t *prev_off, const uint32_t *prev_holders,
                               const uint32_t *off, const uint32_t *holders)
{
    if (!sh || !load || !off || !holders)
        return semoe_err(SEMOE_EINVAL, "balance: shape, load, off and holders are required");
    uint32_t L = sh->num_layers, E = sh->num_experts, n = sh->workers, m = sh->min_replicas;
    if (n == 0)
        return semoe_err(SEMOE_EINVAL, "balance: workers=0: need at least 1 worker");
    if (m < 1 || m > n)
        return semoe_err(SEMOE_EINVAL,
                         "balance: min_replicas=%u with %u workers: need 1 <= min_replicas <= "
                         "workers", m, n);
    if (!(sh->keep_slack >= 0) || !isfinite(sh->keep_slack))
        return semoe_err(SEMOE_EINVAL, "balance: keep_slack=%g: need a finite fraction >= 0",
                         sh->keep_slack);
    uint64_t total = (uint64_t)L * E;
    if (total > UINT32_MAX || total * n > UINT32_MAX)
        return semoe_err(SEMOE_EINVAL,
                         "balance: %u layers x %u experts x %u workers: past 32-bit holder "
                         "offsets", L, E, n);
    uint64_t need = ((uint64_t)E * m + n - 1) / n;
    if (sh->slots < need)
        return semoe_err(SEMOE_EINVAL,
                         "balance: slots=%u per worker per layer: %u experts x %u replicas on "
                         "%u workers need slots >= %llu", sh->slots, E, m, n,
                         (unsigned long long)need);
    for (uint64_t e = 0; e < total; e++)
        if (!isfinite(load[e]) || load[e] < 0)
            return semoe_err(SEMOE_EINVAL, "balance: load[%llu]=%g: need a finite load >= 0",
                             (unsigned long long)e, load[e]);
    if (!prev_off)
        return SEMOE_OK;
    for (uint64_t e = 0; e < total; e++)
        if (prev_off[e + 1] < prev_off[e])
            return semoe_err(SEMOE_EINVAL,
                             "balance: prev_off[%llu]=%u > prev_off[%llu]=%u: offsets must not "
                             "decrease", (unsigned long long)e, prev_off[e],
                             (unsigned long long)e + 1, prev_off[e + 1]);
    if (prev_off[total] > prev_off[0] && !prev_holders)
        return semoe_err(SEMOE_EINVAL, "balance: prev_off lists %u holders but prev_holders "
                         "is NULL", prev_off[total] - prev_off[0]);
    for (uint32_t i = prev_off[0]; i < prev_off[total]; i++)
        if (prev_holders[i] != PLACEMENT_NONE && prev_holders[i] >= n)
            return semoe_err(SEMOE_EINVAL,
                             "balance: prev_holders[%u]=%u: not a rank of %u workers nor "
                             "PLACEMENT_NONE", i, prev_holders[i], n);
    return SEMOE_OK;
}

/* Places one layer (ly->load set by balance_layer_reference) and sets the placement to write
 * out: held/copies/wload point into ly. prev_off/prev_holders are this layer's or NULL. */
static double s_place_layer(balance_layer_t *ly, double slack, const uint32_t *prev_off,
                            const uint32_t *prev_holders, const uint8_t **held,
                            const uint32_t **copies, const double **wload, balance_report_t *rep)
{
    uint32_t E = ly->E;
    double ref = balance_layer_eval(ly, ly->held, ly->copies, ly->wload), max = ref;
    double bound = ref * (1 + slack) + ref * S_KEEP_TOL;
    uint64_t total = 0;
    for (uint32_t j = 0; j < E; j++)
        total += ly->copies[j];
    *held = ly->held, *copies = ly->copies, *wload = ly->wload;
    if (!prev_off)
        return max;
    bool live = false, valid = balance_sticky_read_prev(ly, prev_off, prev_holders, &live);
    uint64_t ptotal = 0;
    bool loaded = false;
    for (uint32_t j = 0; j < E; j++)
        loaded = loaded || ly->load[j] > 0;
    for (uint32_t j = 0; j < E; j++) {
        ptotal += ly->pcopies[j];
        valid = valid && (loaded || ly->pcopies[j] == ly->m); // idle layer: no replicas
    }
    if (valid && ptotal == total) {
        double pmax = balance_layer_eval(ly, ly->pheld, ly->pcopies, ly->pwload);
        if (pmax <= bound) {
            *held = ly->pheld, *copies = ly->pcopies, *wload = ly->pwload;
            rep->layers_kept++;
            return pmax;
        }
    }
    if (!live)
        return max;
    balance_sticky_relabel(ly);
    balance_sticky_stick(ly, bound);
    max = balance_layer_eval(ly, ly->held, ly->copies, ly->wload);
    uint32_t moves = balance_sticky_moves(ly);
    balance_layer_swap(ly); // the relabelled reference waits in ly->alt
    bool ok = balance_sticky_seed(ly, total);
    if (ok) {
        balance_layer_improve(ly, bound);
        balance_sticky_stick(ly, bound);
        double smax = balance_layer_eval(ly, ly->held, ly->copies, ly->wload);
        ok = smax <= bound && balance_sticky_moves(ly) < moves;
        if (ok) {
            max = smax;
            rep->layers_seeded++;
        }
    }
    if (!ok)
        balance_layer_swap(ly);
    *held = ly->held, *copies = ly->copies, *wload = ly->wload;
    return max;
}

semoe_rc balance_place(const balance_shape_t *shape, const double *load, const uint32_t *prev_off,
                       const uint32_t *prev_holders, uint32_t *off, uint32_t *holders,
                       balance_report_t *report)
{
    SEMOE_CHECK(s_check_inputs(shape, load, prev_off, prev_holders, off, holders));
    uint32_t L = shape->num_layers, E = shape->num_experts, n = shape->workers;
    uint32_t S = shape->slots < E ? shape->slots : E;
    balance_report_t rep = {.worker_load = report ? report->worker_load : NULL};
    if (rep.worker_load)
        for (uint32_t w = 0; w < n; w++)
            rep.worker_load[w] = 0;
    off[0] = 0;
    if ((uint64_t)L * E == 0) {
        if (report)
            *report = rep;
        return SEMOE_OK;
    }
    uint32_t longest = 0; // the most previous holder entries of one layer
    for (uint32_t l = 0; prev_off && l < L; l++) {
        uint32_t len = prev_off[(size_t)(l + 1) * E] - prev_off[(size_t)l * E];
        longest = len > longest ? len : longest;
    }
    balance_layer_t ly;
    balance_layer_init(&ly, E, n, S, shape->min_replicas, longest);
    uint32_t k = 0;
    for (uint32_t l = 0; l < L; l++) {
        size_t e0 = (size_t)l * E;
        balance_layer_reference(&ly, load + e0);
        const uint8_t *held;
        const uint32_t *copies;
        const double *wload;
        rep.cost += s_place_layer(&ly, shape->keep_slack, prev_off ? prev_off + e0 : NULL,
                                  prev_holders, &held, &copies, &wload, &rep);
        for (uint32_t j = 0; j < E; j++) {
            off[e0 + j] = k;
            for (uint32_t w = 0; w < n; w++)
                if (held[(size_t)w * E + j]) {
                    holders[k++] = w;
                    rep.moves += !prev_off || !ly.pheld[(size_t)w * E + j];
                }
            rep.copies += copies[j];
        }
        if (rep.worker_load)
            for (uint32_t w = 0; w < n; w++)
                rep.worker_load[w] += wload[w];
    }
    off[(size_t)L * E] = k;
    balance_layer_free(&ly);
    if (report)
        *report = rep;
    return SEMOE_OK;
}

double balance_imbalance(uint32_t num_layers, uint32_t num_experts, uint32_t n,
                         const double *load, const uint32_t *off, const uint32_t *holders)
{
    if (n == 0)
        return 1.0;
    /* per layer: each layer's all-to-all waits for its busiest worker, so a step costs the sum
     * over layers of the busiest worker's tokens; against the sum of the layers' means. Skew
     * that differs from layer to layer does not average out as it would over the whole model. */
    double *tok = semoe_xcalloc(n, sizeof *tok), busiest = 0, total = 0;
    for (uint32_t l = 0; l < num_layers; l++) {
        memset(tok, 0, n * sizeof *tok);
        for (uint64_t e = (uint64_t)l * num_experts; e < (uint64_t)(l + 1) * num_experts; e++) {
            uint32_t live = 0;
            for (uint32_t i = off[e]; i < off[e + 1]; i++)
                live += holders[i] < n;
            for (uint32_t i = off[e]; live > 0 && i < off[e + 1]; i++)
                if (holders[i] < n)
                    tok[holders[i]] += load[e] / live;
        }
        double max = 0;
        for (uint32_t w = 0; w < n; w++) {
            total += tok[w];
            max = tok[w] > max ? tok[w] : max;
        }
        busiest += max;
    }
    free(tok);
    return total > 0 ? busiest / (total / n) : 1.0;
}
