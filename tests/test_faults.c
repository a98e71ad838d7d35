/* Faults with the real daemons on loopback: a worker killed with SIGKILL is dropped by heartbeat
 * expiry and its experts re-placed; a SIGSTOPped worker is dropped while its TCP connection
 * stays up, and after SIGCONT learns it is no member and rejoins; a coordinator killed with
 * SIGKILL and restarted on the same ports gets every worker back. */
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"

#define NW 4
#define SETTLE_MS 30000
#define RECONNECT_MAX_MS 1000

static char s_ids[NW][32];
static proc_t *s_workers[NW];
static bool s_alive[NW]; /* not killed by the test */

/* Every expert whose holder is still listed in `after` stayed with it (fewest moves). */
static void s_check_kept(const cJSON *before, const cJSON *after, const char *what)
{
    int total = test_status_num_layers(after) * test_status_num_experts(after);
    int kept = 0, moved = 0;
    for (int e = 0; e < total; e++) {
        const char *was = test_status_expert_holder(before, e);
        const char *now = test_status_expert_holder(after, e);
        if (!was || !now || !test_status_worker(after, was))
            continue;
        CHECK(strcmp(was, now) == 0, "%s: expert %d moved from %s (still live) to %s", what, e,
              was, now);
        if (strcmp(was, now) == 0)
            kept++;
        else
            moved++;
    }
    fprintf(stderr, "  %s: %d experts kept their holder, %d moved off a live one\n", what, kept,
            moved);
}

/* The ids of the workers the test has not killed, except `skip` (or -1). */
static int s_live_ids(const char **out, int skip)
{
    int n = 0;
    for (int i = 0; i < NW; i++)
        if (s_alive[i] && i != skip)
            out[n++] = s_ids[i];
    return n;
}

/* A random index among the live workers. */
static int s_pick_live(void)
{
    int live[NW], n = 0;
    for (int i = 0; i < NW; i++)
        if (s_alive[i])
            live[n++] = i;
    return live[test_rand_below((uint64_t)n)];
}

/* A status predicate: the worker `arg` is listed. */
static bool s_listed(const cJSON *st, void *arg, char *why, size_t n)
{
    if (!test_status_worker(st, arg)) {
        snprintf(why, n, "%s not listed", (const char *)arg);
        return false;
    }
    return true;
}

int main(void)
{
    test_init("faults");
    proc_init("faults");
    char summary[1024], job[PATH_MAX];
    proc_src_path(job, sizeof job, "tests/jobs/control.json");

    proc_ports_t pp;
    proc_t *coord;
    cJSON *st = test_status_start_coordinator(job, &pp, &coord);
    REQUIRE(st, "no coordinator answering on its status socket");
    long long hb = test_status_num(st, "heartbeat_ms"), liveness = test_status_num(st, "liveness");
    if (hb <= 0 || liveness <= 0) {
        CHECK(false, "status has no heartbeat_ms/liveness");
        hb = 200;
        liveness = 3;
    }
    cJSON_Delete(st);

    for (int i = 0; i < NW; i++) {
        snprintf(s_ids[i], sizeof s_ids[i], "f%d-%05x", i, (unsigned)test_rand_below(1u << 20));
        s_workers[i] = proc_start_worker(s_ids[i], &pp, RECONNECT_MAX_MS);
        REQUIRE(s_workers[i], "cannot start worker %s", s_ids[i]);
        s_alive[i] = true;
    }
    const char *ids[NW];
    int n = s_live_ids(ids, -1);
    test_status_want_t want = {.n = n, .ids = ids, .n_ids = n, .min_gen = 0};
    cJSON *st0 = test_status_wait(pp.status_ep, test_status_settled, &want, SETTLE_MS, 50);
    REQUIRE(st0, "%d workers never settled", n);
    fprintf(stderr, "  start: %s\n", test_status_summary(st0, summary, sizeof summary));

    /* kill -9 one: heartbeat expiry drops it; 3 left, higher generation, all experts held. */
    int k = s_pick_live();
    fprintf(stderr, "  SIGKILL %s\n", s_ids[k]);
    int64_t t0 = proc_now_ms();
    bool ok = proc_kill(s_workers[k]);
    REQUIRE(ok, "cannot kill %s", s_ids[k]);
    s_alive[k] = false;
    n = s_live_ids(ids, -1);
    want = (test_status_want_t){.n = n, .ids = ids, .n_ids = n, .absent = s_ids[k],
                                .min_gen = test_status_generation(st0)};
    cJSON *st1 = test_status_wait(pp.status_ep, test_status_settled, &want, SETTLE_MS, 50);
    REQUIRE(st1, "%d workers never settled after %s was killed", n, s_ids[k]);
    fprintf(stderr, "  %lld ms later: %s\n", (long long)(proc_now_ms() - t0),
            test_status_summary(st1, summary, sizeof summary));
    s_check_kept(st0, st1, "kill -9");
    CHECK(test_status_counter(st1, "deaths") == test_status_counter(st0, "deaths") + 1,
          "counters.deaths %lld -> %lld after one death", test_status_counter(st0, "deaths"),
          test_status_counter(st1, "deaths"));

    /* SIGSTOP one: its TCP connection stays up, yet heartbeat expiry drops it. */
    int s = s_pick_live();
    fprintf(stderr, "  SIGSTOP %s\n", s_ids[s]);
    CHECK(proc_tcp_connected(s_workers[s], pp.control),
          "%s has no established connection to the control port before SIGSTOP", s_ids[s]);
    t0 = proc_now_ms();
    ok = proc_signal(s_workers[s], SIGSTOP);
    REQUIRE(ok, "cannot stop %s", s_ids[s]);
    n = s_live_ids(ids, s);
    want = (test_status_want_t){.n = n, .ids = ids, .n_ids = n, .absent = s_ids[s],
                                .min_gen = test_status_generation(st1)};
    cJSON *st2 = test_status_wait(pp.status_ep, test_status_settled, &want, SETTLE_MS, 50);
    int64_t took = proc_now_ms() - t0;
    CHECK(st2 != NULL, "%s was not dropped while stopped", s_ids[s]);
    if (st2) {
        fprintf(stderr, "  %lld ms later: %s\n", (long long)took,
                test_status_summary(st2, summary, sizeof summary));
        /* Dropped by expiry, not by anything faster: its last heartbeat left at most one
         * interval before the stop, so (liveness - 1) intervals at least. */
        CHECK(took >= (liveness - 1) * hb - hb / 2, "%s dropped %lld ms after SIGSTOP, before "
              "%lld x %lld ms of silence", s_ids[s], (long long)took, liveness, hb);
        s_check_kept(st1, st2, "SIGSTOP");
    }
    CHECK(proc_running(s_workers[s]), "%s exited while stopped", s_ids[s]);
    CHECK(proc_tcp_connected(s_workers[s], pp.control),
          "%s's TCP connection to the control port is gone; the test wants it dropped by "
          "heartbeat expiry alone", s_ids[s]);

    /* SIGCONT: its next HEARTBEAT gets ERROR NOT_MEMBER and it rejoins at once, under a higher
     * generation. Had it instead given the coordinator up (its own liveness ran out while it
     * was stopped) it would wait out the reconnect backoff, which starts at 1 s: so a rejoin
     * within 1 s of SIGCONT is the sign that it was told. */
    long long joins2 = st2 ? test_status_counter(st2, "joins") : -1;
    ok = proc_signal(s_workers[s], SIGCONT);
    REQUIRE(ok, "cannot continue %s", s_ids[s]);
    t0 = proc_now_ms();
    cJSON *back = test_status_wait(pp.status_ep, s_listed, s_ids[s], SETTLE_MS, 10);
    took = proc_now_ms() - t0;
    CHECK(back != NULL, "%s not listed again after SIGCONT", s_ids[s]);
    CHECK(took < 1000, "%s rejoined %lld ms after SIGCONT: it was not told NOT_MEMBER (or did "
          "not act on it) but gave the coordinator up and waited out the reconnect backoff",
          s_ids[s], (long long)took);
    fprintf(stderr, "  %s listed again %lld ms after SIGCONT\n", s_ids[s], (long long)took);
    cJSON_Delete(back);
    n = s_live_ids(ids, -1);
    want = (test_status_want_t){.n = n, .ids = ids, .n_ids = n,
                                .min_gen = st2 ? test_status_generation(st2)
                                               : test_status_generation(st1)};
    cJSON *st3 = test_status_wait(pp.status_ep, test_status_settled, &want, SETTLE_MS, 50);
    REQUIRE(st3, "%s never rejoined after SIGCONT", s_ids[s]);
    fprintf(stderr, "  after SIGCONT: %s\n", test_status_summary(st3, summary, sizeof summary));
    CHECK(test_status_num(test_status_worker(st3, s_ids[s]), "pid") == proc_pid(s_workers[s]),
          "%s rejoined with another pid", s_ids[s]);
    CHECK(joins2 < 0 || test_status_counter(st3, "joins") > joins2,
          "counters.joins %lld -> %lld: the stopped worker did not JOIN again", joins2,
          test_status_counter(st3, "joins"));

    /* The coordinator killed and restarted on the same ports, twice: once at once (the workers
     * learn of the new run from its run id) and once after it was gone for longer than the
     * liveness window (they give it up and reconnect with backoff), in random order. */
    cJSON *prev = st3;
    cJSON *st4 = NULL;
    bool long_first = test_rand_below(2) == 0;
    for (int round = 0; round < 2; round++) {
        bool long_down = (round == 0) == long_first;
        int down_ms = long_down ? (int)(3 * liveness * hb) : (int)test_rand_below((uint64_t)hb);
        char run0[128];
        snprintf(run0, sizeof run0, "%s", test_status_run_id(prev) ? test_status_run_id(prev) : "");
        fprintf(stderr, "  SIGKILL the coordinator (run %s), restart after %d ms\n", run0, down_ms);
        ok = proc_kill(coord);
        REQUIRE(ok, "cannot kill the coordinator");
        t0 = proc_now_ms();
        cJSON *none = test_status_query(pp.status_ep, 100);
        CHECK(none == NULL, "the killed coordinator still answers status");
        cJSON_Delete(none);
        /* Not a wait for a condition: the downtime is the scenario under test. */
        int64_t left = down_ms - (proc_now_ms() - t0);
        if (left > 0)
            proc_sleep_ms((int)left);
        coord = proc_start_coordinator("coordinator", job, &pp, NULL);
        REQUIRE(coord, "cannot restart the coordinator");
        want = (test_status_want_t){.n = n, .ids = ids, .n_ids = n, .min_gen = 0,
                                    .not_run_id = run0};
        st4 = test_status_wait(pp.status_ep, test_status_settled, &want, SETTLE_MS, 50);
        REQUIRE(st4, "the workers never rejoined the coordinator restarted after %d ms", down_ms);
        fprintf(stderr, "  %lld ms after the kill: %s\n", (long long)(proc_now_ms() - t0),
                test_status_summary(st4, summary, sizeof summary));
        for (int i = 0; i < NW; i++) {
            if (!s_alive[i])
                continue;
            long long pid = test_status_num(test_status_worker(st4, s_ids[i]), "pid");
            CHECK(pid == proc_pid(s_workers[i]), "%s is back with pid %lld, it is %d", s_ids[i],
                  pid, (int)proc_pid(s_workers[i]));
        }
        if (prev != st3)
            cJSON_Delete(prev);
        prev = st4;
    }
    for (int i = 0; i < NW; i++)
        if (s_alive[i])
            CHECK(proc_running(s_workers[i]), "worker %s exited", s_ids[i]);

    cJSON_Delete(st0);
    cJSON_Delete(st1);
    cJSON_Delete(st2);
    cJSON_Delete(st3);
    cJSON_Delete(st4);
    return test_finish();
}
