/* Membership on loopback with the real daemons: a coordinator and four workers settle with every
 * expert held once and balanced per layer; a fifth joins and the experts rebalance onto it
 * without other moves; a SIGTERMed worker exits 0 and is gone well before heartbeat expiry
 * could have removed it; the coordinator exits 0 on SIGTERM. */
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"

#define NW 5          /* workers started in all */
#define SETTLE_MS 30000

static char s_ids[NW][32];
static const char *s_idp[NW];
static proc_t *s_workers[NW];

/* Checks that from `before` to `after` every expert whose holder is still listed stayed with it,
 * except those that went to `joiner` (the contract's "fewest moves"). */
static void s_check_moves(const cJSON *before, const cJSON *after, const char *joiner,
                          const char *what)
{
    int total = test_status_num_layers(after) * test_status_num_experts(after);
    int moved = 0, kept = 0;
    for (int e = 0; e < total; e++) {
        const char *was = test_status_expert_holder(before, e);
        const char *now = test_status_expert_holder(after, e);
        if (!was || !now || !test_status_worker(after, was))
            continue;
        if (strcmp(was, now) == 0) {
            kept++;
            continue;
        }
        moved++;
        CHECK(joiner && strcmp(now, joiner) == 0,
              "%s: expert %d moved from %s (still live) to %s", what, e, was, now);
    }
    fprintf(stderr, "  %s: %d experts kept their holder, %d moved\n", what, kept, moved);
}

/* A status predicate: the worker `arg` is no longer listed. */
static bool s_gone(const cJSON *st, void *arg, char *why, size_t n)
{
    if (test_status_worker(st, arg)) {
        snprintf(why, n, "%s still listed", (const char *)arg);
        return false;
    }
    return true;
}

int main(void)
{
    test_init("membership");
    proc_init("membership");
    char summary[1024], job[PATH_MAX];
    proc_src_path(job, sizeof job, "tests/jobs/control.json");

    proc_ports_t pp;
    proc_t *coord;
    cJSON *st = test_status_start_coordinator(job, &pp, &coord);
    REQUIRE(st, "no coordinator answering on its status socket");
    long long hb = test_status_num(st, "heartbeat_ms"), liveness = test_status_num(st, "liveness");
    CHECK(hb == 200 && liveness == 3, "status heartbeat_ms=%lld liveness=%lld, control.json says "
          "200 and 3", hb, liveness);
    if (hb <= 0 || liveness <= 0) {
        hb = 200;
        liveness = 3;
    }
    CHECK(test_status_worker_count(st) == 0, "a fresh coordinator lists %d workers",
          test_status_worker_count(st));
    const char *state = test_status_state(st);
    CHECK(state && strcmp(state, "waiting") == 0, "fresh coordinator state %s, want waiting",
          state ? state : "(none)");
    cJSON_Delete(st);

    /* Random names, so nothing depends on them sorting or being w0..w3. */
    for (int i = 0; i < NW; i++) {
        static const char *stems[] = {"w", "gpu", "node", "x"};
        snprintf(s_ids[i], sizeof s_ids[i], "%s%d-%05x", stems[test_rand_below(4)], i,
                 (unsigned)test_rand_below(1u << 20));
        s_idp[i] = s_ids[i];
    }

    /* Four workers: all active, every expert held once, balanced. */
    for (int i = 0; i < 4; i++) {
        s_workers[i] = proc_start_worker(s_ids[i], &pp, 1000);
        REQUIRE(s_workers[i], "cannot start worker %s", s_ids[i]);
    }
    test_status_want_t want4 = {.n = 4, .ids = s_idp, .n_ids = 4, .min_gen = 0};
    cJSON *st4 = test_status_wait(pp.status_ep, test_status_settled, &want4, SETTLE_MS, 50);
    REQUIRE(st4, "4 workers never settled");
    fprintf(stderr, "  4 workers: %s\n", test_status_summary(st4, summary, sizeof summary));
    long long g4 = test_status_generation(st4);
    for (int i = 0; i < 4; i++) {
        const cJSON *w = test_status_worker(st4, s_ids[i]);
        long long pid = test_status_num(w, "pid");
        CHECK(pid == proc_pid(s_workers[i]), "worker %s shows pid %lld, it is %d", s_ids[i], pid,
              (int)proc_pid(s_workers[i]));
    }
    CHECK(test_status_counter(st4, "joins") >= 4, "counters.joins=%lld after 4 joins",
          test_status_counter(st4, "joins"));

    /* A fifth joins: a higher generation, balanced, and only moves onto the newcomer. */
    s_workers[4] = proc_start_worker(s_ids[4], &pp, 1000);
    REQUIRE(s_workers[4], "cannot start worker %s", s_ids[4]);
    test_status_want_t want5 = {.n = 5, .ids = s_idp, .n_ids = 5, .min_gen = g4};
    cJSON *st5 = test_status_wait(pp.status_ep, test_status_settled, &want5, SETTLE_MS, 50);
    REQUIRE(st5, "5 workers never settled");
    fprintf(stderr, "  5 workers: %s\n", test_status_summary(st5, summary, sizeof summary));
    long long g5 = test_status_generation(st5);
    CHECK(g5 > g4, "generation %lld after a join, was %lld", g5, g4);
    s_check_moves(st4, st5, s_ids[4], "join");
    int newcomer[4096];
    int held = test_status_worker_experts(test_status_worker(st5, s_ids[4]), newcomer, 4096);
    CHECK(held > 0, "the fifth worker holds %d experts after the rebalance", held);

    /* SIGTERM one at random: it sends LEAVE and exits 0; the coordinator drops it at once,
     * well before liveness * heartbeat_ms of silence would have. */
    int v = (int)test_rand_below(NW);
    const char *victim = s_ids[v];
    fprintf(stderr, "  SIGTERM %s\n", victim);
    int64_t t0 = proc_now_ms();
    bool ok = proc_signal(s_workers[v], SIGTERM);
    REQUIRE(ok, "cannot signal %s", victim);
    cJSON *gone = test_status_wait(pp.status_ep, s_gone, (void *)victim, SETTLE_MS, 10);
    int64_t took = proc_now_ms() - t0;
    CHECK(gone != NULL, "%s still listed %lld ms after SIGTERM", victim, (long long)took);
    CHECK(took < liveness * hb, "%s was dropped %lld ms after SIGTERM: not before heartbeat "
          "expiry (%lld ms) could have done it; it should have sent LEAVE", victim,
          (long long)took, liveness * hb);
    fprintf(stderr, "  %s gone from status %lld ms after SIGTERM\n", victim, (long long)took);
    cJSON_Delete(gone);
    int wst = 0;
    bool exited = proc_wait(s_workers[v], 10000, &wst);
    CHECK(exited, "%s still running 10 s after SIGTERM", victim);
    CHECK(!exited || proc_exit_code(wst) == 0, "%s exit code %d after SIGTERM, want 0", victim,
          proc_exit_code(wst));

    const char *rest[NW];
    int nrest = 0;
    for (int i = 0; i < NW; i++)
        if (i != v)
            rest[nrest++] = s_ids[i];
    test_status_want_t want_left = {.n = 4, .ids = rest, .n_ids = nrest, .absent = victim,
                                    .min_gen = g5};
    cJSON *stl = test_status_wait(pp.status_ep, test_status_settled, &want_left, SETTLE_MS, 50);
    CHECK(stl != NULL, "4 workers never settled after %s left", victim);
    if (stl) {
        fprintf(stderr, "  after leave: %s\n", test_status_summary(stl, summary, sizeof summary));
        s_check_moves(st5, stl, NULL, "leave");
        long long leaves0 = test_status_counter(st5, "leaves");
        long long leaves1 = test_status_counter(stl, "leaves");
        long long deaths0 = test_status_counter(st5, "deaths");
        long long deaths1 = test_status_counter(stl, "deaths");
        CHECK(leaves1 == leaves0 + 1, "counters.leaves %lld -> %lld after one LEAVE", leaves0,
              leaves1);
        CHECK(deaths1 == deaths0, "counters.deaths %lld -> %lld after a LEAVE (no death)",
              deaths0, deaths1);
    }

    /* The coordinator exits 0 on SIGTERM; the workers outlive it (they keep reconnecting). */
    ok = proc_signal(coord, SIGTERM);
    REQUIRE(ok, "cannot signal the coordinator");
    int cst = 0;
    bool coord_exited = proc_wait(coord, 10000, &cst);
    CHECK(coord_exited, "the coordinator still runs 10 s after SIGTERM");
    CHECK(!coord_exited || proc_exit_code(cst) == 0, "coordinator exit code %d after SIGTERM",
          proc_exit_code(cst));
    for (int i = 0; i < NW; i++)
        if (i != v)
            CHECK(proc_running(s_workers[i]), "worker %s died with the coordinator", s_ids[i]);

    cJSON_Delete(st4);
    cJSON_Delete(st5);
    cJSON_Delete(stl);
    return test_finish();
}
