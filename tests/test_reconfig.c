/* Elastic reconfiguration through the control plane (net), with raw clients standing in for
 * training workers (docs/control-plane.md, "Reconfiguration"): (a) the first PLAN, acked by
 * all, is followed by RESUME(0); (b) a JOIN during training pauses the members, plans at the
 * step they paused at and resumes there, with "pausing" and "syncing" in status and nothing
 * sent meanwhile; (c) a LEAVE with handover makes the worker a donor of the next PLAN (rank
 * NO_RANK, listed in donors), and its LEAVE without handover removes it as a leave; (d) loads
 * where two experts take 80% of the tokens make the coordinator rebalance after `patience`
 * steps, to a placement with replicas of the hot experts and imbalance <= 1.25 under those
 * loads; (e) a member that goes silent while paused is declared dead and the others converge.
 * Loads and steps are fresh random numbers each run. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "coordinator/balance.h"
#include "proto/msg.h"
#include "tests/fake_worker.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"

#define S_WAIT_MS 10000
#define S_LAYERS 2
#define S_EXPERTS 8
#define S_TOTAL (S_LAYERS * S_EXPERTS)
#define S_MAX_HOLDERS (S_TOTAL * 4)
#define S_HEARTBEAT_MS 100
#define S_LIVENESS 8
#define S_FAKES 4
/* The coordinator's ack wait (reconfig.c S_PLAN_ACK_WAIT_US) in its heartbeats, plus two. */
#define S_ACK_WAIT_BEATS (500 / S_HEARTBEAT_MS + 2)

/* A worker as the coordinator sees it, answering as docs/control-plane.md says: ACK a PLAN
 * (unless the test holds it), on PAUSE an ACK and a HEARTBEAT with phase PAUSED, on RESUME
 * phase training; a HEARTBEAT every S_HEARTBEAT_MS while alive. */
typedef struct {
    fake_worker_t w;      /* its socket, and the counts of what it received */
    bool alive;           /* heartbeats and answers; false: silent, as a hung host */
    bool hold;            /* leaves PAUSE and PLAN to the test */
    int64_t next_beat_ms;
    /* received */
    bool pause_held, plan_held;
    uint64_t plan_gen, plan_step;
    uint64_t acked_gen;   /* the last generation whose PLAN it acked */
    uint32_t world, n_donors;
    char peers[S_FAKES][PROTO_MAX_NAME + 1];
    char donors[S_FAKES][PROTO_MAX_NAME + 1];
    uint32_t off[S_TOTAL + 1];
    uint32_t holders[S_MAX_HOLDERS];
    /* what it reports */
    uint64_t step, step_time_us;
    uint32_t phase;
    uint32_t load[S_TOTAL];
} fake_t;

static proc_ports_t s_ports;
static fake_t s_fakes[S_FAKES];
static double s_total[S_TOTAL]; /* tokens per expert per step the fakes report, all copies */

/* --- the fake workers ------------------------------------------------------------------- */

/* Its load: each copy it holds takes an even share of its expert's tokens. */
static void s_fill_load(fake_t *f)
{
    for (uint32_t e = 0; e < S_TOTAL; e++) {
        f->load[e] = 0;
        uint32_t copies = f->off[e + 1] - f->off[e];
        for (uint32_t i = f->off[e]; f->plan_gen && i < f->off[e + 1]; i++)
            if (f->holders[i] == f->w.rank)
                f->load[e] = (uint32_t)llround(s_total[e] / copies);
    }
}

static void s_heartbeat(fake_t *f)
{
    s_fill_load(f);
    fake_worker_heartbeat(&f->w, &(proto_heartbeat_t){
        .step = f->step, .step_time_us = f->step_time_us, .load = PROTO_U32S(f->load, S_TOTAL),
        .loss = f->step ? 3.0 : NAN, .eval_loss = NAN,
        .tokens_per_s = f->phase == PROTO_PHASE_TRAINING ? 1000 : 0, .phase = f->phase});
    f->next_beat_ms = proc_now_ms() + S_HEARTBEAT_MS;
}

/* Answers a PAUSE: ACK, then PAUSED at its step. */
static void s_answer_pause(fake_t *f)
{
    f->pause_held = false;
    fake_worker_ack(&f->w, PROTO_PAUSE);
    f->phase = PROTO_PHASE_PAUSED;
    s_heartbeat(f);
}

/* Bytes the fakes' PLAN ACKs reported, by the generation of the PLAN. */
#define S_MAX_GEN 64
static uint64_t s_acked_bytes[S_MAX_GEN];

static void s_answer_plan(fake_t *f)
{
    f->plan_held = false;
    /* what the coordinator counts: a placed member's first ACK of each PLAN */
    f->w.ack_bytes = test_rand_below(1ull << 30);
    if (f->w.rank != PROTO_NO_RANK && f->acked_gen != f->plan_gen)
        s_acked_bytes[f->plan_gen < S_MAX_GEN ? f->plan_gen : 0] += f->w.ack_bytes;
    f->acked_gen = f->plan_gen;
    fake_worker_ack(&f->w, PROTO_PLAN);
}

static bool s_open(fake_t *f, const char *id)
{
    memset(f, 0, sizeof *f);
    if (!fake_worker_open(&f->w, s_ports.control_ep, id))
        return false;
    f->alive = true;
    f->step_time_us = 1000;
    f->w.rank = PROTO_NO_RANK;
    fake_worker_join(&f->w);
    return true;
}

static void s_on_plan(fake_t *f, const proto_msg_t *m)
{
    const proto_plan_t *p = &m->plan;
    f->plan_gen = m->hdr.generation; // plans, gen and rank: fake_worker_count
    f->plan_step = p->step;
    f->world = p->world;
    CHECK(p->holder_offsets.count == S_TOTAL + 1 && p->holders.count <= S_MAX_HOLDERS &&
              p->world <= S_FAKES && p->donors.count <= S_FAKES,
          "%s: a PLAN for %u experts, %u holders, world %u, %u donors", f->w.id,
          p->holder_offsets.count - 1, p->holders.count, p->world, p->donors.count);
    if (p->holder_offsets.count != S_TOTAL + 1 || p->holders.count > S_MAX_HOLDERS ||
        p->world > S_FAKES || p->donors.count > S_FAKES)
        return;
    for (uint32_t e = 0; e <= S_TOTAL; e++)
        f->off[e] = proto_u32_at(p->holder_offsets, e);
    for (uint32_t i = 0; i < p->holders.count; i++)
        f->holders[i] = proto_u32_at(p->holders, i);
    char ep[PROTO_MAX_ENDPOINT + 1];
    size_t pos = 0;
    for (uint32_t r = 0; r < p->world && proto_peers_next(&p->peers, &pos, f->peers[r], ep);)
        r++;
    pos = 0;
    f->n_donors = 0;
    while (f->n_donors < p->donors.count &&
           proto_peers_next(&p->donors, &pos, f->donors[f->n_donors], ep))
        f->n_donors++;
    if (f->hold)
        f->plan_held = true;
    else
        s_answer_plan(f);
}

/* Takes what is waiting on f's socket and answers it. */
static void s_take(fake_t *f)
{
    for (;;) {
        zmq_msg_t msg;
        proto_msg_t m;
        fake_worker_recv_t got = fake_worker_recv(&f->w, 0, &msg, &m);
        if (got == FAKE_WORKER_NONE)
            return;
        if (got == FAKE_WORKER_MALFORMED)
            continue;
        if (!f->alive) { // a hung host reads nothing
            zmq_msg_close(&msg);
            continue;
        }
        fake_worker_count(&f->w, &m);
        switch (m.hdr.type) {
        case PROTO_PLAN:
            s_on_plan(f, &m);
            break;
        case PROTO_PAUSE:
            CHECK(m.pause.step == 0, "%s: PAUSE(step %llu), want 0 (next boundary)", f->w.id,
                  (unsigned long long)m.pause.step);
            if (f->hold)
                f->pause_held = true;
            else
                s_answer_pause(f);
            break;
        case PROTO_RESUME:
            if (f->phase == PROTO_PHASE_PAUSED)
                f->phase = PROTO_PHASE_TRAINING;
            break;
        default:
            break;
        }
        zmq_msg_close(&msg);
    }
}

/* One turn: every open fake takes its messages and, when due, sends its HEARTBEAT. */
static void s_pump(void)
{
    zmq_pollitem_t items[S_FAKES];
    int n = 0;
    for (int i = 0; i < S_FAKES; i++)
        if (s_fakes[i].w.sock)
            items[n++] = (zmq_pollitem_t){.socket = s_fakes[i].w.sock, .events = ZMQ_POLLIN};
    zmq_poll(items, n, 5);
    for (int i = 0; i < S_FAKES; i++) {
        fake_t *f = &s_fakes[i];
        if (!f->w.sock)
            continue;
        s_take(f);
        if (f->alive && f->w.welcomes && proc_now_ms() >= f->next_beat_ms)
            s_heartbeat(f);
    }
}

/* Pumps until *count reaches at_least; false after S_WAIT_MS. */
static bool s_wait_count(const int *count, int at_least)
{
    for (int64_t end = proc_now_ms() + S_WAIT_MS; *count < at_least; s_pump())
        if (proc_now_ms() > end)
            return false;
    return true;
}

/* Pumps until pred(arg) holds; false after S_WAIT_MS. */
static bool s_wait(bool (*pred)(void *), void *arg)
{
    for (int64_t end = proc_now_ms() + S_WAIT_MS; !pred(arg); s_pump())
        if (proc_now_ms() > end)
            return false;
    return true;
}

/* Every fake of a NULL-ended list does a step: reports it done, training, at once. */
static void s_step(fake_t **fs, uint64_t step)
{
    for (fake_t **f = fs; *f; f++) {
        (*f)->step = step;
        (*f)->phase = PROTO_PHASE_TRAINING;
        s_heartbeat(*f);
    }
}

/* --- status ----------------------------------------------------------------------------- */

static bool s_is(const char *a, const char *b) { return a && b && strcmp(a, b) == 0; }

static cJSON *s_status(void)
{
    for (int i = 0; i < 3; i++) { // keep the fakes alive between tries
        cJSON *st = test_status_query(s_ports.status_ep, 2000);
        if (st)
            return st;
        s_pump();
    }
    CHECK(false, "no status: %s", test_status_error());
    return NULL;
}

/* The status' reconfig state. */
static bool s_reconfig_is(const char *want)
{
    cJSON *st = s_status();
    bool ok = st && s_is(test_status_str(st, "reconfig"), want);
    if (!ok)
        fprintf(stderr, "  reconfig is %s, want %s\n",
                st ? test_status_str(st, "reconfig") : "?", want);
    cJSON_Delete(st);
    return ok;
}

/* The last entry of status' rebalances (a copy, caller deletes), and how many there are. */
static cJSON *s_last_rebalance(int *count)
{
    cJSON *st = s_status(), *last = NULL;
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(st, "rebalances");
    *count = cJSON_GetArraySize(arr);
    if (*count > 0)
        last = cJSON_Duplicate(cJSON_GetArrayItem(arr, *count - 1), true);
    cJSON_Delete(st);
    return last;
}

static double s_jnum(const cJSON *o, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* Checks the newest history entry: generation, step, a reason containing why, and the bytes
 * the members' ACKs of its PLAN reported (one PLAN per reconfiguration in this test). */
static void s_check_history(uint64_t gen, uint64_t step, const char *why)
{
    int n;
    cJSON *h = s_last_rebalance(&n);
    const char *w = test_status_str(h, "why");
    CHECK(h && s_jnum(h, "generation") == (double)gen && s_jnum(h, "at_step") == (double)step &&
              w && strstr(w, why) && s_jnum(h, "duration_ms") >= 0 && s_jnum(h, "time") > 1e9,
          "history: %d entries, the last generation %g at step %g, why \"%s\"; want generation "
          "%llu at step %llu, why with \"%s\"", n, s_jnum(h, "generation"), s_jnum(h, "at_step"),
          w ? w : "?", (unsigned long long)gen, (unsigned long long)step, why);
    uint64_t want = gen < S_MAX_GEN ? s_acked_bytes[gen] : 0;
    CHECK(s_jnum(h, "bytes") == (double)want, "history: bytes %g, the ACKs of its PLAN said %llu",
          s_jnum(h, "bytes"), (unsigned long long)want);
    cJSON_Delete(h);
}

/* --- conditions ------------------------------------------------------------------------- */

typedef struct {
    fake_t **fs;   /* NULL-ended */
    uint64_t gen;  /* a PLAN or RESUME of at least this generation */
} s_want_t;

static bool s_all_resumed(void *arg)
{
    s_want_t *w = arg;
    for (fake_t **f = w->fs; *f; f++)
        if ((*f)->w.resumes == 0 || (*f)->w.resume_gen < w->gen)
            return false;
    return true;
}

static bool s_all_planned(void *arg)
{
    s_want_t *w = arg;
    for (fake_t **f = w->fs; *f; f++)
        if ((*f)->plan_gen < w->gen)
            return false;
    return true;
}

/* The last PLAN f got names exactly the peers in ids (NULL-ended), in any order. */
static bool s_peers_are(const fake_t *f, const char *const *ids)
{
    uint32_t n = 0;
    for (const char *const *id = ids; *id; id++, n++) {
        bool found = false;
        for (uint32_t r = 0; r < f->world; r++)
            found = found || strcmp(f->peers[r], *id) == 0;
        if (!found)
            return false;
    }
    return n == f->world;
}

/* --- the test --------------------------------------------------------------------------- */

static bool s_job(char *path, size_t n)
{
    char text[2048];
    snprintf(text, sizeof text,
             "{" FAKE_WORKER_MODEL_JSON ","
             " \"train\": {\"seq_len\": 64, \"global_batch\": 32, \"micro_batch\": 4,"
             " \"steps\": 1000},"
             " \"cluster\": {\"heartbeat_ms\": %d, \"liveness\": %d, \"expected_workers\": 2},"
             " \"elastic\": {\"threshold\": 1.3, \"window\": 3, \"patience\": 3}}\n",
             S_LAYERS, S_EXPERTS, S_HEARTBEAT_MS, S_LIVENESS);
    proc_tmp_path(path, n, "job.json");
    return proc_write_file(path, text);
}

int main(void)
{
    test_init("reconfig");
    proc_init("reconfig");
    REQUIRE(proc_ports_pick(&s_ports), "no free ports");
    char job[4096];
    REQUIRE(s_job(job, sizeof job), "write the job");
    proc_t *coord = proc_start_coordinator("coordinator", job, &s_ports, NULL);
    REQUIRE(coord, "coordinator did not start");
    cJSON *st = test_status_wait(s_ports.status_ep, test_status_any, NULL, 15000, 50);
    REQUIRE(st, "the coordinator's status does not answer");
    cJSON_Delete(st);
    fake_t *a = &s_fakes[0], *b = &s_fakes[1], *c = &s_fakes[2], *d = &s_fakes[3];
    /* Uniform loads to begin with: no skew. */
    uint32_t base = 20 + (uint32_t)test_rand_below(40);
    for (int e = 0; e < S_TOTAL; e++)
        s_total[e] = base;

    /* (a) The first PLAN, acked by both, then RESUME(0) to both. */
    REQUIRE(s_open(a, "w-a") && s_open(b, "w-b"), "sockets");
    fake_t *ab[] = {a, b, NULL};
    s_want_t want = {ab, 1};
    REQUIRE(s_wait(s_all_resumed, &want), "(a) no RESUME after the first PLAN: %d, %d",
            a->w.resumes, b->w.resumes);
    CHECK(a->w.plans == 1 && b->w.plans == 1 && a->plan_gen == 1 && a->w.resume_step == 0 &&
              b->w.resume_step == 0 && a->w.pauses == 0 && b->w.pauses == 0,
          "(a) %d and %d PLANs, generation %llu, RESUME at %llu and %llu, %d PAUSEs", a->w.plans,
          b->w.plans, (unsigned long long)a->plan_gen, (unsigned long long)a->w.resume_step,
          (unsigned long long)b->w.resume_step, a->w.pauses + b->w.pauses);
    CHECK(s_reconfig_is("running"), "(a) not running after RESUME");
    fprintf(stderr, "  (a) generation 1 resumed at step 0\n");

    /* (b) They train a few steps; a third joins: PAUSE to the two, PLAN at the step they
     * paused at to all three, RESUME there once all acked. */
    uint64_t S = 2 + test_rand_below(3);
    for (uint64_t s = 1; s <= S; s++)
        s_step(ab, s);
    a->hold = b->hold = true;
    c->hold = true;
    REQUIRE(s_open(c, "w-c"), "socket");
    REQUIRE(s_wait_count(&a->w.pauses, 1) && s_wait_count(&b->w.pauses, 1), "(b) no PAUSE after a "
            "JOIN during training");
    CHECK(s_reconfig_is("pausing"), "(b) status does not say pausing");
    CHECK(c->w.pauses == 0 && c->w.plans == 0, "(b) the joiner got %d PAUSEs, %d PLANs before the "
          "others paused", c->w.pauses, c->w.plans);
    s_answer_pause(a);
    s_answer_pause(b);
    fake_t *abc[] = {a, b, c, NULL};
    want = (s_want_t){abc, 2};
    REQUIRE(s_wait(s_all_planned, &want), "(b) no PLAN of generation 2 after both paused");
    CHECK(a->plan_step == S && b->plan_step == S && c->plan_step == S && a->world == 3 &&
              c->w.rank != PROTO_NO_RANK && a->n_donors == 0,
          "(b) PLAN at steps %llu %llu %llu (want %llu), world %u, %u donors",
          (unsigned long long)a->plan_step, (unsigned long long)b->plan_step,
          (unsigned long long)c->plan_step, (unsigned long long)S, a->world, a->n_donors);
    CHECK(s_reconfig_is("syncing"), "(b) status does not say syncing");
    /* Nothing more goes out while they migrate, past the coordinator's ack wait. */
    int beats = a->w.heartbeats;
    REQUIRE(s_wait_count(&a->w.heartbeats, beats + S_ACK_WAIT_BEATS), "(b) no heartbeats");
    CHECK(a->w.plans == 2 && b->w.plans == 2 && c->w.plans == 1 && a->w.resumes == 1,
          "(b) while migrating: PLANs %d %d %d, RESUMEs %d", a->w.plans, b->w.plans, c->w.plans,
          a->w.resumes);
    a->hold = b->hold = c->hold = false;
    s_answer_plan(a);
    s_answer_plan(b);
    s_answer_plan(c);
    REQUIRE(s_wait(s_all_resumed, &want), "(b) no RESUME after all acked generation 2");
    CHECK(a->w.resume_step == S && b->w.resume_step == S && c->w.resume_step == S,
          "(b) RESUME at %llu, %llu, %llu; want %llu", (unsigned long long)a->w.resume_step,
          (unsigned long long)b->w.resume_step, (unsigned long long)c->w.resume_step,
          (unsigned long long)S);
    s_check_history(2, S, "join w-c");
    CHECK(s_reconfig_is("running"), "(b) not running after RESUME");
    fprintf(stderr, "  (b) w-c joined: paused at %llu, generation 2 resumed there\n",
            (unsigned long long)S);

    /* (c) w-c leaves with handover: PAUSE to all three, PLAN with w-c as donor (rank
     * NO_RANK), RESUME to the two; its LEAVE without handover removes it as a leave. */
    uint64_t S2 = S + 1 + test_rand_below(3);
    for (uint64_t s = S + 1; s <= S2; s++)
        s_step(abc, s);
    proto_msg_t leave = {.hdr.type = PROTO_LEAVE};
    snprintf(leave.leave.reason, sizeof leave.leave.reason, "SIGTERM");
    leave.leave.handover = 1;
    fake_worker_send(&c->w, &leave);
    want = (s_want_t){abc, 3};
    REQUIRE(s_wait(s_all_planned, &want), "(c) no PLAN after a LEAVE with handover");
    CHECK(a->w.pauses == 2 && c->w.pauses == 1, "(c) PAUSEs: %d, %d", a->w.pauses, c->w.pauses);
    CHECK(c->w.rank == PROTO_NO_RANK && c->n_donors == 1 && strcmp(c->donors[0], "w-c") == 0 &&
              a->n_donors == 1 && a->world == 2 && a->plan_step == S2 &&
              s_peers_are(a, (const char *const[]){"w-a", "w-b", NULL}),
          "(c) donor PLAN: rank %u, %u donors (%s), world %u at step %llu (want %llu)", c->w.rank,
          c->n_donors, c->n_donors ? c->donors[0] : "-", a->world,
          (unsigned long long)a->plan_step, (unsigned long long)S2);
    want = (s_want_t){ab, 3};
    REQUIRE(s_wait(s_all_resumed, &want), "(c) no RESUME after the handover PLAN");
    CHECK(a->w.resume_step == S2 && c->w.resumes == 1, "(c) RESUME at %llu; the donor got %d",
          (unsigned long long)a->w.resume_step, c->w.resumes);
    st = s_status();
    const cJSON *cw = test_status_worker(st, "w-c");
    CHECK(cw && s_is(test_status_worker_state(cw), "leaving") &&
              test_status_counter(st, "leaves") == 0,
          "(c) the donor shows as %s, leaves %lld", cw ? test_status_worker_state(cw) : "absent",
          test_status_counter(st, "leaves"));
    cJSON_Delete(st);
    leave.leave.handover = 0;
    snprintf(leave.leave.reason, sizeof leave.leave.reason, "handed over");
    fake_worker_send(&c->w, &leave);
    for (int64_t end = proc_now_ms() + S_WAIT_MS; proc_now_ms() < end; s_pump()) {
        st = s_status();
        bool gone = st && !test_status_worker(st, "w-c");
        if (gone) {
            CHECK(test_status_counter(st, "leaves") == 1 &&
                      test_status_counter(st, "deaths") == 0 && test_status_generation(st) == 3,
                  "(c) after the donor left: leaves %lld, deaths %lld, generation %lld",
                  test_status_counter(st, "leaves"), test_status_counter(st, "deaths"),
                  test_status_generation(st));
            cJSON_Delete(st);
            break;
        }
        cJSON_Delete(st);
        CHECK(proc_now_ms() < end - 50, "(c) the donor is still a member");
    }
    fake_worker_close(&c->w);
    s_check_history(3, S2, "leave w-c");
    fprintf(stderr, "  (c) w-c handed over at %llu and left\n", (unsigned long long)S2);

    /* (d) Skew: two experts of each layer, both held by one worker alone, take 80% of the
     * tokens, the first 62.5-70% on its own: no placement without a replica of it gets below
     * 1.25 (its one holder would take more than 1.25 x the mean). After `patience` steps the
     * coordinator pauses and places with replicas. */
    uint32_t hot[S_LAYERS][2];
    for (uint32_t l = 0; l < S_LAYERS; l++) {
        uint32_t k = 0;
        for (uint32_t j = 0; j < S_EXPERTS && k < 2; j++) {
            uint32_t e = l * S_EXPERTS + j;
            if (a->off[e + 1] - a->off[e] == 1 && a->holders[a->off[e]] == 0)
                hot[l][k++] = e;
        }
        REQUIRE(k == 2, "(d) layer %u: rank 0 holds fewer than 2 experts alone", l);
        uint32_t tokens = 1000 + (uint32_t)test_rand_below(1000);
        for (uint32_t j = 0; j < S_EXPERTS; j++)
            s_total[l * S_EXPERTS + j] = 0.2 * tokens / (S_EXPERTS - 2);
        double top = 0.63 + 0.07 * test_rand_unit();
        s_total[hot[l][0]] = top * tokens;
        s_total[hot[l][1]] = (0.8 - top) * tokens;
    }
    double before = balance_imbalance(S_LAYERS, S_EXPERTS, 2, s_total, a->off, a->holders);
    CHECK(before >= 1.5, "(d) the skewed loads give only %.3f", before);
    uint64_t S3 = S2;
    for (int k = 0; k < 3; k++)
        s_step(ab, ++S3);
    REQUIRE(s_wait_count(&a->w.pauses, 3) && s_wait_count(&b->w.pauses, 3),
            "(d) no PAUSE after 3 steps at imbalance %.2f > 1.3", before);
    want = (s_want_t){ab, 4};
    REQUIRE(s_wait(s_all_planned, &want), "(d) no PLAN after the skew PAUSE");
    double after = balance_imbalance(S_LAYERS, S_EXPERTS, 2, s_total, a->off, a->holders);
    CHECK(after <= 1.25, "(d) the rebalanced placement gives %.3f under the loads (from %.3f)",
          after, before);
    for (uint32_t l = 0; l < S_LAYERS; l++)
        CHECK(a->off[hot[l][0] + 1] - a->off[hot[l][0]] >= 2, "(d) the hottest expert %u has "
              "%u holders", hot[l][0], a->off[hot[l][0] + 1] - a->off[hot[l][0]]);
    CHECK(a->plan_step == S3, "(d) PLAN at %llu, want %llu", (unsigned long long)a->plan_step,
          (unsigned long long)S3);
    REQUIRE(s_wait(s_all_resumed, &want), "(d) no RESUME after the rebalance");
    s_check_history(4, S3, "skew");
    int n_hist;
    cJSON *h = s_last_rebalance(&n_hist);
    CHECK(s_jnum(h, "before") > 1.3 && s_jnum(h, "after") <= 1.25 && s_jnum(h, "moved") > 0,
          "(d) history: before %g, after %g, moved %g", s_jnum(h, "before"), s_jnum(h, "after"),
          s_jnum(h, "moved"));
    cJSON_Delete(h);
    fprintf(stderr, "  (d) skew %.3f rebalanced to %.3f at step %llu\n", before, after,
            (unsigned long long)S3);

    /* (e) A join pauses w-a and w-b; w-b goes silent instead of pausing: it is dead by the
     * liveness, and the others converge (PLAN without it, RESUME). The pause's own bound is
     * made long (slow steps) so that the death, not the timeout, ends it. */
    for (int k = 0; k < 2; k++)
        s_step(ab, ++S3);
    a->step_time_us = b->step_time_us = 10 * 1000 * 1000;
    s_step(ab, S3);
    b->alive = false;
    REQUIRE(s_open(d, "w-d"), "socket");
    REQUIRE(s_wait_count(&a->w.pauses, 4), "(e) no PAUSE after the JOIN");
    fake_t *ad[] = {a, d, NULL};
    want = (s_want_t){ad, 5};
    REQUIRE(s_wait(s_all_resumed, &want), "(e) w-a and w-d never resumed after w-b died");
    CHECK(s_peers_are(a, (const char *const[]){"w-a", "w-d", NULL}) && a->plan_step == S3 &&
              a->w.resume_step == S3,
          "(e) PLAN of world %u at %llu (want w-a, w-d at %llu), RESUME at %llu", a->world,
          (unsigned long long)a->plan_step, (unsigned long long)S3,
          (unsigned long long)a->w.resume_step);
    st = s_status();
    CHECK(st && test_status_counter(st, "deaths") == 1 && !test_status_worker(st, "w-b"),
          "(e) deaths %lld", test_status_counter(st, "deaths"));
    cJSON_Delete(st);
    h = s_last_rebalance(&n_hist);
    const char *why = test_status_str(h, "why");
    CHECK(why && strstr(why, "death w-b") && strstr(why, "join w-d"), "(e) history: %s",
          why ? why : "?");
    cJSON_Delete(h);
    fprintf(stderr, "  (e) w-b died while pausing: w-a and w-d resumed at %llu\n",
            (unsigned long long)S3);

    /* (f) w-d gives up generation 5's step (a collective ran past its bound: phase stalled)
     * while nothing else changes: the coordinator plans generation 6 for the same two, and
     * they resume. */
    d->phase = PROTO_PHASE_STALLED;
    s_heartbeat(d);
    want = (s_want_t){ad, 6};
    REQUIRE(s_wait(s_all_resumed, &want), "(f) no new generation after w-d reported stalled");
    d->phase = PROTO_PHASE_TRAINING;
    CHECK(s_peers_are(a, (const char *const[]){"w-a", "w-d", NULL}), "(f) PLAN of world %u, "
          "want w-a and w-d", a->world);
    h = s_last_rebalance(&n_hist);
    why = test_status_str(h, "why");
    CHECK(why && strstr(why, "stalled w-d"), "(f) history: %s", why ? why : "?");
    cJSON_Delete(h);
    fprintf(stderr, "  (f) w-d stalled: generation 6 for w-a and w-d\n");

    /* `semoe status` shows the imbalance and the last reconfigurations. */
    proc_t *cli = NULL;
    int code = proc_run(&cli, S_WAIT_MS, "status-cli", PROC_CLI, "status", "--endpoint",
                        s_ports.status_ep, NULL);
    char *out = cli ? proc_read_file(proc_out_path(cli), NULL) : NULL;
    CHECK(code == 0 && out && strstr(out, "imbalance ") && strstr(out, "skew ") &&
              strstr(out, "death w-b") && strstr(out, "leave w-c"),
          "semoe status exit %d, printed:\n%s", code, out ? out : "(nothing)");
    free(out);

    CHECK(a->w.errors == 0 && d->w.errors == 0, "ERRORs: %d, %d", a->w.errors, d->w.errors);
    CHECK(proc_signal(coord, SIGTERM), "SIGTERM");
    int status;
    CHECK(proc_wait(coord, S_WAIT_MS, &status) && proc_exit_code(status) == 0,
          "the coordinator did not exit 0 on SIGTERM");
    for (int i = 0; i < S_FAKES; i++)
        fake_worker_close(&s_fakes[i].w);
    fake_worker_term();
    return test_finish();
}
