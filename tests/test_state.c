/* coordinator/state: the state a restarted coordinator takes up. Random states (members with
 * capabilities past what a double holds, a placement with replicas and ranks whose member has
 * gone, a history with unknown imbalances, smoothed loads) written and read back equal, members
 * unbound; a fresh directory holds none; the lock keeps a second store off; every cut of the
 * file and random damage to it is refused or read whole, never half, and the file is left as
 * it was. */
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "coordinator/reconfig.h"
#include "coordinator/state.h"
#include "model/job.h"
#include "tests/harness.h"
#include "tests/proc.h"

#define S_L 2
#define S_E 8
#define S_T (S_L * S_E)

static const char s_job_text[] =
    "{\"model\": {\"vocab_size\": 256, \"hidden_size\": 64, \"intermediate_size\": 128,\n"
    "  \"num_hidden_layers\": 2, \"num_attention_heads\": 4, \"num_key_value_heads\": 2,\n"
    "  \"num_local_experts\": 8, \"num_experts_per_tok\": 2, \"max_position_embeddings\": 256},\n"
    " \"train\": {\"seq_len\": 64, \"global_batch\": 32, \"micro_batch\": 4, \"steps\": 200,\n"
    "  \"seed\": 42}}\n";

/* A random state of n members, world of them placed (some ranks without a member). */
typedef struct {
    state_t st;
    char *job;
    uint32_t off[S_T + 1], holders[S_T * 4];
    double load[S_T];
    status_rebalance_t hist[RECONFIG_HISTORY];
} s_fixture_t;

/* REQUIRE for a function without a result: ends the round. */
#define REQUIRE_VOID(cond, ...)                                                 \
    do {                                                                        \
        bool held_ = (cond);                                                    \
        CHECK_HELD(held_, #cond, __VA_ARGS__);                                  \
        if (!held_)                                                             \
            return;                                                             \
    } while (0)

static uint64_t s_big(void) { return test_rand() >> (test_rand_below(2) ? 0 : 20); }

static void s_make(s_fixture_t *f)
{
    memset(f, 0, sizeof *f);
    model_job_t *job = NULL;
    if (model_job_parse(s_job_text, strlen(s_job_text), "test job", &job) != SEMOE_OK) {
        fprintf(stderr, "the test's job: %s\n", semoe_err_msg());
        exit(1);
    }
    f->job = model_job_to_json(job);
    model_job_destroy(&job);
    state_t *st = &f->st;
    st->run_id = test_rand() | 1;
    st->job = f->job;
    st->started = test_rand_below(2), st->stopped = test_rand_below(2);
    st->training = test_rand_below(2);
    st->step = test_rand_below(1u << 30), st->generation = 1 + test_rand_below(1000);
    st->plan_step = test_rand_below(1u << 30);
    st->last_reconfig_ms = test_rand_below(2) ? -1 : test_rand_unit() * 1000;
    st->counters = (status_counters_t){.joins = s_big(), .leaves = test_rand_below(9),
                                       .deaths = 3, .generations = st->generation,
                                       .restarts = test_rand_below(4)};
    for (int k = 0; k < STATUS_WHY_KINDS; k++)
        st->by_kind[k] = test_rand_below(100);
    st->n_rebalances = (uint32_t)test_rand_below(RECONFIG_HISTORY + 1);
    for (uint32_t i = 0; i < st->n_rebalances; i++)
        f->hist[i] = (status_rebalance_t){.generation = i + 1, .at_step = i * 7,
                                          .time = 1.7e9 + test_rand_unit(), .moved = i,
                                          .bytes = s_big(), .before = i % 2 ? NAN : 1.5,
                                          .after = test_rand_unit() + 1,
                                          .duration_ms = test_rand_unit() * 100};
    for (uint32_t i = 0; i < st->n_rebalances; i++)
        snprintf(f->hist[i].why, sizeof f->hist[i].why, "join w%u, death \"w%u\"\\", i, i + 1);
    st->rebalances = f->hist;
    st->n_total = S_T;
    for (int e = 0; e < S_T; e++)
        f->load[e] = test_rand_unit() * 1000;
    st->load = test_rand_below(2) ? f->load : NULL;
    uint32_t n = 1 + (uint32_t)test_rand_below(6), world = n + (uint32_t)test_rand_below(2);
    st->world = test_rand_below(4) ? world : 0;
    uint32_t h = 0;
    for (int e = 0; e < S_T; e++) { // 1 or 2 distinct holders, ascending
        f->off[e] = h;
        uint32_t a = (uint32_t)test_rand_below(world), b = (uint32_t)test_rand_below(world);
        f->holders[h++] = a < b ? a : b;
        if (a != b)
            f->holders[h++] = a < b ? b : a;
    }
    f->off[S_T] = h;
    st->holder_offsets = st->world ? f->off : NULL;
    st->holders = st->world ? f->holders : NULL;
    st->members = members_new();
    for (uint32_t i = 0; i < n; i++) {
        char id[32];
        uint8_t rid[2] = {1, (uint8_t)i};
        snprintf(id, sizeof id, "w%u-%04x", i, (unsigned)test_rand_below(65536));
        member_t *m = members_add(st->members, rid, sizeof rid, id);
        proto_join_t j = {.device_kind = "cpu", .pid = (uint32_t)test_rand(),
                          .mem_hbm = s_big(), .mem_host = s_big(), .mem_ssd = s_big()};
        snprintf(j.host, sizeof j.host, "host %u", i);
        snprintf(j.device_name, sizeof j.device_name, "AMD EPYC");
        snprintf(j.data_endpoint, sizeof j.data_endpoint, "tcp://127.0.0.1:%u", 20000 + i);
        members_set_caps(m, &j);
        m->placed = st->world > 0 && i < world - (world > n) && test_rand_below(5);
        m->rank = m->placed ? i : PROTO_NO_RANK;
        m->leaving = !m->placed && test_rand_below(2);
        m->acked_gen = test_rand_below(2) ? st->generation : 0;
    }
}

/* a and b hold the same (b as state_store_load gives it). */
static void s_compare(const state_t *a, const state_t *b, const char *what)
{
    CHECK(a->run_id == b->run_id && strcmp(a->job, b->job) == 0 && a->started == b->started &&
              a->stopped == b->stopped && a->step == b->step && a->training == b->training &&
              a->generation == b->generation && a->plan_step == b->plan_step &&
              (a->last_reconfig_ms < 0 ? b->last_reconfig_ms < 0
                                       : a->last_reconfig_ms == b->last_reconfig_ms),
          "%s: the scalars differ", what);
    CHECK(memcmp(&a->counters, &b->counters, sizeof a->counters) == 0 &&
              memcmp(a->by_kind, b->by_kind, sizeof a->by_kind) == 0,
          "%s: the counters differ", what);
    bool hist = a->n_rebalances == b->n_rebalances;
    for (uint32_t i = 0; hist && i < a->n_rebalances; i++) {
        const status_rebalance_t *x = &a->rebalances[i], *y = &b->rebalances[i];
        hist = x->generation == y->generation && x->at_step == y->at_step &&
               x->time == y->time && strcmp(x->why, y->why) == 0 && x->moved == y->moved &&
               x->bytes == y->bytes && (isnan(x->before) ? isnan(y->before)
                                                         : x->before == y->before) &&
               x->after == y->after && x->duration_ms == y->duration_ms;
    }
    CHECK(hist, "%s: the history differs", what);
    CHECK((a->load == NULL) == (b->load == NULL) &&
              (!a->load || memcmp(a->load, b->load, S_T * sizeof *a->load) == 0),
          "%s: the loads differ", what);
    CHECK(a->world == b->world &&
              (!a->world || (memcmp(a->holder_offsets, b->holder_offsets,
                                    (S_T + 1) * sizeof *a->holder_offsets) == 0 &&
                             memcmp(a->holders, b->holders,
                                    a->holder_offsets[S_T] * sizeof *a->holders) == 0)),
          "%s: the placement differs", what);
    const member_t *x = members_first(a->members), *y = members_first(b->members);
    for (; x && y; x = x->next, y = y->next) {
        CHECK(strcmp(x->id, y->id) == 0 && strcmp(x->host, y->host) == 0 && x->pid == y->pid &&
                  strcmp(x->data_endpoint, y->data_endpoint) == 0 &&
                  strcmp(x->device_name, y->device_name) == 0 &&
                  memcmp(x->mem_total, y->mem_total, sizeof x->mem_total) == 0 &&
                  x->placed == y->placed && (!x->placed || x->rank == y->rank) &&
                  x->leaving == y->leaving && x->acked_gen == y->acked_gen,
              "%s: member %s differs", what, x->id);
        CHECK(!members_bound(y), "%s: member %s was read with a routing id", what, y->id);
    }
    CHECK(!x && !y, "%s: the members differ in number", what);
    CHECK(members_unbound(b->members) == members_count(b->members), "%s: %u of %u unbound", what,
          members_unbound(b->members), members_count(b->members));
}

/* A round: a fresh dir holds no state; a random one written, read back equal; every cut of the
 * file refused and left as it was; random damage refused or read whole. */
static void s_round(int round)
{
    char dir[PATH_MAX], name[32];
    snprintf(name, sizeof name, "state-%d", round);
    proc_tmp_path(dir, sizeof dir, name);
    state_store_t *store = NULL, *second = NULL;
    REQUIRE_VOID(state_store_open(dir, &store) == SEMOE_OK, "%s", semoe_err_msg());
    CHECK(state_store_open(dir, &second) == SEMOE_EINVAL &&
              strstr(semoe_err_msg(), "another coordinator uses it"),
          "round %d: a second store on %s: %s", round, dir, semoe_err_msg());
    state_t *got = NULL;
    CHECK(state_store_load(store, &got) == SEMOE_OK && !got, "round %d: a fresh dir holds a "
          "state", round);
    static s_fixture_t f;
    s_make(&f);
    REQUIRE_VOID(state_store_save(store, &f.st) == SEMOE_OK, "%s", semoe_err_msg());
    state_store_close(&store);
    REQUIRE_VOID(state_store_open(dir, &store) == SEMOE_OK, "%s", semoe_err_msg());
    CHECK(state_store_load(store, &got) == SEMOE_OK && got, "round %d: %s", round,
          semoe_err_msg());
    if (got)
        s_compare(&f.st, got, "round trip");
    state_destroy(&got);
    size_t len = 0;
    char *text = proc_read_file(state_store_path(store), &len);
    REQUIRE_VOID(text && len > 2, "round %d: no state file", round);
    for (int k = 0; k < 24; k++) {
        size_t cut = (size_t)test_rand_below(len - 1); // not at the trailing newline
        bool damage = k % 2;
        char *bad = semoe_xstrdup(text);
        if (damage)
            bad[cut] = (char)(1 + test_rand_below(255));
        else
            bad[cut] = 0;
        REQUIRE_VOID(proc_write_file(state_store_path(store), bad), "cannot write");
        semoe_rc rc = state_store_load(store, &got);
        CHECK(rc == SEMOE_EINVAL || (damage && rc == SEMOE_OK && got), "round %d: %s at byte "
              "%zu of %zu: %s", round, damage ? "a damaged byte" : "cut", cut, len,
              rc ? semoe_rc_name(rc) : "read");
        CHECK(rc == SEMOE_OK || strstr(semoe_err_msg(), state_store_path(store)), "round %d: "
              "the message does not name the file: %s", round, semoe_err_msg());
        char *after = proc_read_file(state_store_path(store), NULL);
        CHECK(after && strcmp(after, bad) == 0, "round %d: the file changed", round);
        free(after);
        state_destroy(&got);
        free(bad);
    }
    free(text);
    state_store_close(&store);
    members_destroy(&f.st.members);
    free(f.job);
}

int main(void)
{
    test_init("state");
    proc_init("state");
    for (int round = 0; round < 50; round++)
        s_round(round);
    return test_finish();
}
