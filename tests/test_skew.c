/* Load skew (fault) with the real daemons on loopback: the tiny model of train_util.h with a
 * router that cannot rebalance itself (train.router_bias sending every token to experts 0 and
 * 1 of every layer under top-2; train.freeze_router;
 * router_aux_loss_coef 0), trained by 4 workers twice with the same seed: (1) with the first
 * PLAN's placement kept (an elastic.threshold no skew reaches) and (2) with live rebalancing
 * (the default threshold, a short window and patience). From the workers' metrics lines: the
 * imbalance as the coordinator measures it (per layer the most tokens one worker's experts
 * received over the mean, summed over layers before dividing) stays >= 2 under the static
 * placement and comes to <= 1.25 once the coordinator has rebalanced (replicas of the loaded
 * experts), at least one rebalance shows in the status socket's history and in the generations
 * of the lines, and the routing and the losses are the static run's: replicas split an
 * expert's tokens, the math stays the same. docs/control-plane.md (skew),
 * deploy/jobs/README.md (router_bias, freeze_router). */
#include <cjson/cJSON.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"
#include "tests/train_util.h"

#define S_WORKERS 4
#define S_STEPS 40
#define S_LAST 10          /* the steps both runs' imbalance is measured over: the last ones */
#define S_HOT0 0           /* the hot experts: the count-balanced first PLAN puts experts 0 and */
#define S_HOT1 1           /* 1 of every layer on one worker, the worst case for it */
/* Top-2 routing and a bias of 4 on the hot experts, against logits that spread about 0.1 at
 * init (initializer_range x sqrt(hidden) = 0.02 x sqrt(32)): every token goes to both hot
 * experts, whatever the frozen router says, so the loads are the same at every step and in
 * every run, and the six other experts get nothing. Static: the hot experts' worker takes all
 * 2 N routed rows of a layer, 4 x the mean. By load: 2 + 2 copies of the hot experts over the
 * 4 workers, one each, and the spare slots to idle experts: 1.0 (a rank's rows of an expert
 * split evenly over its holders, to a row). */
#define S_TOPK 2
static const double s_bias[TRAIN_UTIL_EXPERTS] = {[S_HOT0] = 4, [S_HOT1] = 4};
#define S_STATIC_MIN 2.0   /* the static placement's imbalance, at least, every counted step */
#define S_BALANCED_MAX 1.25 /* the rebalanced one, at most, every step of its last generation */
#define S_HOT_MIN 0.99     /* "most tokens": the hot experts' share of the routed rows (all) */
#define S_REL_TOL 1e-5     /* a loss against the static run's, relative */
#define S_RUN_MS 60000     /* for a run to end, the coordinator's exit included */
#define S_EXIT_MS 15000    /* a worker's exit once its coordinator is gone */

static uint64_t s_seed;
static char s_corpus[PATH_MAX];

/* One run of the job. */
typedef struct {
    const char *name;
    char job[PATH_MAX];
    proc_ports_t pp;
    proc_t *coord;
    train_util_worker_t w[S_WORKERS];
    bool hot_together;       /* status: experts S_HOT0 and S_HOT1 of layer 0 share a holder */
    cJSON *rebalance;        /* status: the first rebalance on load skew of the history, or
                              * NULL */
    int polls;               /* status replies read */
    /* from the metrics lines, per step s (index s - 1) */
    bool known[S_STEPS];     /* every rank logged the step in its newest generation */
    uint64_t gen[S_STEPS];
    double imb[S_STEPS];     /* sum over layers of max / sum over layers of mean */
    double hot[S_STEPS];     /* the hot experts' share of the routed rows */
    double hot_layer[TRAIN_UTIL_LAYERS]; /* the same per layer, over all steps */
    double loss[S_STEPS];
    long long routed[S_STEPS][TRAIN_UTIL_LE]; /* every rank's tokens, summed */
} s_run_t;

/* Polls the status socket until the rebalance history has an entry (kept in r->rebalance) or
 * the coordinator exits; notes whether the hot experts share a holder in the first reply that
 * lists the placement. Bounded by S_RUN_MS. */
static void s_watch(s_run_t *r, bool want_rebalance)
{
    int64_t deadline = proc_now_ms() + S_RUN_MS;
    bool placed = false;
    while (proc_now_ms() < deadline && proc_running(r->coord) &&
           !(placed && (r->rebalance || !want_rebalance))) {
        cJSON *st = test_status_query(r->pp.status_ep, 1000);
        r->polls += st != NULL;
        const char *h0 = st ? test_status_expert_holder(st, S_HOT0) : NULL;
        const char *h1 = st ? test_status_expert_holder(st, S_HOT1) : NULL;
        if (!placed && h0 && h1 && test_status_active_count(st) == S_WORKERS) {
            placed = true;
            r->hot_together = strcmp(h0, h1) == 0;
        }
        /* the history lists every reconfiguration (the joins too): a rebalance says why */
        const cJSON *hist = st ? cJSON_GetObjectItemCaseSensitive(st, "rebalances") : NULL;
        const cJSON *e;
        cJSON_ArrayForEach(e, hist)
        {
            const char *why = test_status_str(e, "why");
            if (!r->rebalance && why && strncmp(why, "skew ", 5) == 0)
                r->rebalance = cJSON_Duplicate(e, true);
        }
        cJSON_Delete(st);
        if (!(placed && (r->rebalance || !want_rebalance)))
            proc_sleep_ms(10);
    }
}

/* Writes the job (elastic.threshold `threshold`, 0: the default), starts its coordinator and
 * the workers, watches the status socket (s_watch), waits for the coordinator to exit 0 and for
 * every worker to exit 0 after it, and reads the metrics logs. False (said why) when one of
 * that failed. */
static bool s_run(s_run_t *r, const char *name, double threshold)
{
    memset(r, 0, sizeof *r);
    r->name = name;
    char file[96];
    snprintf(file, sizeof file, "%s.json", name);
    proc_tmp_path(r->job, sizeof r->job, file);
    train_util_job_t job = {.seed = s_seed, .corpus = s_corpus, .checkpoint_dir = "",
                            .steps = S_STEPS, .eval_interval = S_STEPS,
                            .checkpoint_interval = S_STEPS, .expected_workers = S_WORKERS,
                            .threshold = threshold, .window = 4, .patience = 3,
                            .top_k = S_TOPK, .no_aux = true, .router_bias = s_bias,
                            .freeze_router = true};
    int started;
    if (!train_util_start_run(name, r->job, &job, &r->pp, &r->coord, r->w, S_WORKERS, &started))
        return false;
    s_watch(r, threshold == 0);
    int code = 0;
    bool exited = proc_wait(r->coord, S_RUN_MS, &code);
    CHECK(exited && proc_exit_code(code) == 0, "%s: the coordinator %s", name,
          exited ? "exited with another code than 0" : "still runs");
    bool ok = exited && proc_exit_code(code) == 0;
    for (int i = 0; i < S_WORKERS; i++) {
        bool gone = proc_wait(r->w[i].proc, S_EXIT_MS, &code);
        CHECK(gone && proc_exit_code(code) == 0, "%s: worker %s %s", name, r->w[i].id,
              gone ? "exited with another code than 0" : "still runs after its coordinator");
        ok = ok && gone && proc_exit_code(code) == 0;
    }
    for (int i = 0; i < S_WORKERS; i++)
        ok = train_util_read_log(&r->w[i], name) && ok;
    return ok;
}

/* Per step, from the lines of its newest generation (all S_WORKERS ranks of it): the
 * imbalance, the hot share, the loss and the routing. A step that some rank did not log in its
 * newest generation stays unknown (a CHECK failure: nobody dies here). */
static void s_measure(s_run_t *r)
{
    const int L = TRAIN_UTIL_LAYERS, E = TRAIN_UTIL_EXPERTS;
    const long long rows = (long long)TRAIN_UTIL_BATCH * TRAIN_UTIL_SEQ * S_TOPK;
    for (int s = 1; s <= S_STEPS; s++) {
        const train_util_line_t *line[S_WORKERS] = {0};
        uint64_t gen = 0;
        for (int i = 0; i < S_WORKERS; i++) {
            const train_util_line_t *l = train_util_find_step(&r->w[i], (uint64_t)s);
            line[i] = l;
            gen = l && l->generation > gen ? l->generation : gen;
        }
        int n = 0;
        for (int i = 0; i < S_WORKERS; i++)
            n += line[i] && line[i]->generation == gen && line[i]->world == S_WORKERS;
        r->known[s - 1] = n == S_WORKERS;
        CHECK(r->known[s - 1], "%s: step %d: %d of %d ranks logged it in generation %" PRIu64,
              r->name, s, n, S_WORKERS, gen);
        if (!r->known[s - 1])
            continue;
        r->gen[s - 1] = gen;
        r->loss[s - 1] = line[0]->lossv;
        double sum_max = 0, sum_mean = 0, hot = 0;
        for (int l = 0; l < L; l++) {
            double hot_l = hot;
            long long most = 0, all = 0;
            for (int i = 0; i < S_WORKERS; i++) {
                long long mine = 0;
                for (int j = 0; j < E; j++)
                    mine += line[i]->load[l * E + j];
                most = mine > most ? mine : most;
                all += mine;
                hot += (double)line[i]->load[l * E + S_HOT0] + line[i]->load[l * E + S_HOT1];
            }
            /* dropless: the experts' holders received every routed row of the layer */
            CHECK(all == rows, "%s: step %d layer %d: the workers' experts received %lld rows, "
                  "the batch routes %lld", r->name, s, l, all, rows);
            sum_max += (double)most;
            sum_mean += (double)all / S_WORKERS;
            r->hot_layer[l] += (hot - hot_l) / ((double)rows * S_STEPS);
        }
        r->imb[s - 1] = sum_max / sum_mean;
        r->hot[s - 1] = hot / ((double)rows * L);
        for (int i = 0; i < S_WORKERS; i++) {
            CHECK(strcmp(line[i]->loss, line[0]->loss) == 0, "%s: step %d: rank %lld's loss %s, "
                  "rank %lld's %s", r->name, s, line[i]->rank, line[i]->loss, line[0]->rank,
                  line[0]->loss);
            for (int e = 0; e < TRAIN_UTIL_LE; e++)
                r->routed[s - 1][e] += line[i]->routed[e];
        }
    }
}

/* min, max and mean of x over steps [from, S_STEPS] (1-based). */
static void s_range(const double *x, int from, double *lo, double *hi, double *mean)
{
    *lo = INFINITY, *hi = -INFINITY, *mean = 0;
    for (int s = from; s <= S_STEPS; s++) {
        *lo = fmin(*lo, x[s - 1]);
        *hi = fmax(*hi, x[s - 1]);
        *mean += x[s - 1] / (S_STEPS - from + 1);
    }
}

int main(void)
{
    test_init("skew");
    proc_init("skew");
    s_seed = train_util_begin(s_corpus);
    int64_t t0 = proc_now_ms();
    static s_run_t st, rb;
    bool ok_static = s_run(&st, "static", 1e9);
    int64_t t1 = proc_now_ms();
    bool ok_rebal = s_run(&rb, "rebalanced", 0);
    int64_t t2 = proc_now_ms();
    REQUIRE(ok_static && ok_rebal, "a run did not complete");
    s_measure(&st);
    s_measure(&rb);
    for (int s = 1; s <= S_STEPS; s++)
        if (!st.known[s - 1] || !rb.known[s - 1])
            return test_finish();

    /* (1) static: one generation throughout, the hot experts together, skewed to the end */
    CHECK(st.hot_together, "static: experts %d and %d of layer 0 are not on one worker in the "
          "first PLAN (the count-balanced placement changed?): the skew test needs them together",
          S_HOT0, S_HOT1);
    CHECK(st.gen[0] == st.gen[S_STEPS - 1] && st.rebalance == NULL, "static: generations %" PRIu64
          "..%" PRIu64 "%s: the placement changed under a threshold of 1e9", st.gen[0],
          st.gen[S_STEPS - 1], st.rebalance ? ", a rebalance in the history" : "");
    double lo, hi, mean, hot_lo, hot_hi, hot_mean;
    s_range(st.imb, S_STEPS - S_LAST + 1, &lo, &hi, &mean);
    CHECK(lo >= S_STATIC_MIN, "static: imbalance %.3f at its lowest over steps %d..%d, want >= "
          "%g", lo, S_STEPS - S_LAST + 1, S_STEPS, S_STATIC_MIN);
    s_range(st.hot, 1, &hot_lo, &hot_hi, &hot_mean);
    CHECK(hot_lo >= S_HOT_MIN, "static: the hot experts took %.3f of the routed rows at the "
          "least, want >= %g (most tokens)", hot_lo, S_HOT_MIN);
    fprintf(stderr, "static: generation %" PRIu64 " throughout; imbalance over steps %d..%d "
            "%.3f..%.3f (mean %.3f); the hot experts %d and %d took %.3f..%.3f of the routed "
            "rows (mean %.3f; per layer", st.gen[0], S_STEPS - S_LAST + 1, S_STEPS, lo, hi, mean,
            S_HOT0, S_HOT1, hot_lo, hot_hi, hot_mean);
    for (int l = 0; l < TRAIN_UTIL_LAYERS; l++)
        fprintf(stderr, " %.4f", st.hot_layer[l]);
    fprintf(stderr, "); %.1f s\n", (double)(t1 - t0) / 1000.0);

    /* (2) rebalanced: a rebalance in the history and a newer generation in the lines; from the
     * first step of the last generation on, the imbalance at most S_BALANCED_MAX */
    CHECK(rb.rebalance != NULL, "rebalanced: no rebalance in the status history (%d replies "
          "read)", rb.polls);
    uint64_t last_gen = rb.gen[S_STEPS - 1];
    int settle = S_STEPS;
    while (settle > 1 && rb.gen[settle - 2] == last_gen)
        settle--;
    CHECK(last_gen > rb.gen[0], "rebalanced: generation %" PRIu64 " from step 1 to the last",
          last_gen);
    CHECK(settle <= S_STEPS - S_LAST + 1, "rebalanced: the last generation (%" PRIu64 ") "
          "started at step %d: fewer than %d steps to measure", last_gen, settle, S_LAST);
    double blo, bhi, bmean;
    s_range(rb.imb, settle, &blo, &bhi, &bmean);
    CHECK(bhi <= S_BALANCED_MAX, "rebalanced: imbalance up to %.3f over steps %d..%d of "
          "generation %" PRIu64 ", want <= %g", bhi, settle, S_STEPS, last_gen, S_BALANCED_MAX);
    double before = rb.rebalance ? test_status_num(rb.rebalance, "at_step") : -1;
    const cJSON *why = rb.rebalance ? cJSON_GetObjectItemCaseSensitive(rb.rebalance, "why")
                                    : NULL;
    const cJSON *pb = rb.rebalance ? cJSON_GetObjectItemCaseSensitive(rb.rebalance, "before")
                                   : NULL;
    const cJSON *pa = rb.rebalance ? cJSON_GetObjectItemCaseSensitive(rb.rebalance, "after")
                                   : NULL;
    const cJSON *dur = rb.rebalance ? cJSON_GetObjectItemCaseSensitive(rb.rebalance,
                                                                       "duration_ms")
                                    : NULL;
    double b_lo, b_hi, b_mean;
    s_range(rb.imb, 1, &b_lo, &b_hi, &b_mean);
    fprintf(stderr, "rebalanced: first rebalance at step %.0f (\"%s\", predicted %.3f -> %.3f, "
            "%.0f ms); generations %" PRIu64 "..%" PRIu64 ", the last from step %d; imbalance "
            "at step 1 %.3f, over steps %d..%d %.3f..%.3f (mean %.3f); %.1f s\n", before,
            cJSON_IsString(why) ? why->valuestring : "?", cJSON_IsNumber(pb) ? pb->valuedouble
            : NAN, cJSON_IsNumber(pa) ? pa->valuedouble : NAN, cJSON_IsNumber(dur) ?
            dur->valuedouble : NAN, rb.gen[0], last_gen, settle, rb.imb[0], settle, S_STEPS,
            blo, bhi, bmean, (double)(t2 - t1) / 1000.0);

    /* (3) the same routing and the same losses, step by step: the bias decides every token's
     * top-3 by a margin of 2 logits, float rounding cannot flip it */
    double worst = 0;
    int same_routing = 0;
    for (int s = 1; s <= S_STEPS; s++) {
        bool same = memcmp(st.routed[s - 1], rb.routed[s - 1], sizeof st.routed[0]) == 0;
        CHECK(same, "step %d: the tokens went to other experts in the rebalanced run", s);
        same_routing += same;
        double d = fabs(rb.loss[s - 1] - st.loss[s - 1]) / fabs(st.loss[s - 1]);
        CHECK(d < S_REL_TOL, "step %d: loss %.9g rebalanced, %.9g static: relative difference "
              "%.3g >= %g", s, rb.loss[s - 1], st.loss[s - 1], d, S_REL_TOL);
        worst = fmax(worst, d);
    }
    fprintf(stderr, "losses: %d steps, the same routing in %d, the largest relative difference "
            "%.3g (loss %.6f at step 1, %.6f at step %d)\n", S_STEPS, same_routing, worst,
            st.loss[0], st.loss[S_STEPS - 1], S_STEPS);
    fprintf(stderr, "  total %.1f s\n", (double)(proc_now_ms() - t0) / 1000.0);
    cJSON_Delete(st.rebalance);
    cJSON_Delete(rb.rebalance);
    for (int i = 0; i < S_WORKERS; i++) {
        train_util_free_log(&st.w[i]);
        train_util_free_log(&rb.w[i]);
    }
    return test_finish();
}
