/* Training progress through the control plane (net), with raw clients standing in for two
 * training workers: no PLAN before cluster.expected_workers have joined; WELCOME carries the
 * data paths made absolute; every step advance appends a line to --metrics-log; status shows
 * the latest loss and evaluation and sums tokens per second over the workers training; a
 * failure is logged once; once both report finishing train.steps they get STOP and the
 * coordinator exits 0. Losses, rates, loads and steps are fresh random numbers each run. */
#include <limits.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "proto/msg.h"
#include "tests/fake_worker.h"
#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"

#define S_WAIT_MS 10000
#define S_LAYERS 2
#define S_EXPERTS 8
#define S_TOTAL (S_LAYERS * S_EXPERTS)
#define S_MAX_STEPS 8

/* A worker as the coordinator sees it: JOIN, ACK every PLAN, HEARTBEATs with what the test
 * says; and the counts of what came back (in w). */
typedef struct {
    fake_worker_t w;
    /* what it reported last */
    uint32_t load[S_TOTAL];
    bool has_load;
    uint32_t phase;
    double tokens_per_s;
} fake_t;

static proc_ports_t s_ports;
static fake_t s_fakes[2];
static uint32_t s_holder[S_TOTAL]; /* the rank holding expert e in the last PLAN */

/* --- the fake workers ------------------------------------------------------------------- */

static bool s_open(fake_t *f, const char *id)
{
    memset(f, 0, sizeof *f);
    return fake_worker_open(&f->w, s_ports.control_ep, id);
}

/* Takes one message if one comes within timeout_ms, and answers it as a worker would (a PLAN
 * with its ACK). A STOP is only counted: the test sends LEAVE when it is ready. */
static void s_take(fake_t *f, int timeout_ms)
{
    zmq_msg_t msg;
    proto_msg_t m;
    if (fake_worker_recv(&f->w, timeout_ms, &msg, &m) != FAKE_WORKER_MSG)
        return;
    fake_worker_count(&f->w, &m);
    if (m.hdr.type == PROTO_PLAN) {
        CHECK(m.plan.holder_offsets.count == S_TOTAL + 1, "PLAN for %u experts",
              m.plan.holder_offsets.count - 1);
        for (uint32_t e = 0; e < S_TOTAL && e + 1 < m.plan.holder_offsets.count; e++)
            s_holder[e] = proto_u32_at(m.plan.holders, proto_u32_at(m.plan.holder_offsets, e));
        fake_worker_ack(&f->w, PROTO_PLAN);
    }
    zmq_msg_close(&msg);
}

/* Lets both fakes take what comes until *count reaches at_least; false after S_WAIT_MS. */
static bool s_wait_count(const int *count, int at_least)
{
    for (int64_t end = proc_now_ms() + S_WAIT_MS; *count < at_least;) {
        if (proc_now_ms() > end)
            return false;
        for (int i = 0; i < 2; i++)
            if (s_fakes[i].w.sock)
                s_take(&s_fakes[i], 5);
    }
    return true;
}

/* A HEARTBEAT from f: step, loss, an evaluation (NaN: none), its rate and phase, and a load
 * for every expert (the coordinator takes only those f holds, once per step): a fresh random
 * one, or with again, the last one again. */
static void s_heartbeat(fake_t *f, uint64_t step, double loss, double eval_loss,
                        uint64_t eval_step, double tokens_per_s, uint32_t phase, bool again)
{
    for (int e = 0; e < S_TOTAL && !again; e++)
        f->load[e] = (uint32_t)test_rand_below(1000);
    fake_worker_heartbeat(&f->w, &(proto_heartbeat_t){
        .step = step, .step_time_us = 1000 + test_rand_below(1000),
        .load = PROTO_U32S(f->load, S_TOTAL), .loss = loss, .eval_loss = eval_loss,
        .eval_step = eval_step, .tokens_per_s = tokens_per_s, .phase = phase});
    f->has_load = f->w.gen > 0;
    f->phase = phase;
    f->tokens_per_s = tokens_per_s;
}

/* --- what the coordinator says ---------------------------------------------------------- */

static double s_num(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* a and b are the same string (NULL is no string). */
static bool s_is(const char *a, const char *b) { return a && b && strcmp(a, b) == 0; }

static bool s_near(double a, double b, double tol) { return fabs(a - b) <= tol; }

static bool s_rel_near(double a, double b) { return fabs(a - b) <= 1e-8 * fabs(b); }

/* The JSON lines of the metrics log (into lines[0..max), each the caller's to delete). */
static int s_log_lines(const char *path, cJSON **lines, int max)
{
    char *text = proc_read_file(path, NULL);
    int n = 0;
    for (char *p = text, *nl; p && *p && (nl = strchr(p, '\n')); p = nl + 1) {
        cJSON *line = cJSON_ParseWithLength(p, (size_t)(nl - p));
        if (n < max)
            lines[n] = line;
        else
            cJSON_Delete(line);
        n++;
    }
    free(text);
    return n;
}

typedef struct {
    const char *path;
    int n;
} s_log_want_t;

static bool s_log_has(void *arg)
{
    s_log_want_t *w = arg;
    cJSON *lines[S_MAX_STEPS + 4] = {0};
    int n = s_log_lines(w->path, lines, S_MAX_STEPS + 4);
    for (int i = 0; i < n && i < S_MAX_STEPS + 4; i++)
        cJSON_Delete(lines[i]);
    return n >= w->n;
}

/* Occurrences of needle in the file at path. */
static int s_count_in(const char *path, const char *needle)
{
    char *text = proc_read_file(path, NULL);
    int n = 0;
    for (const char *p = text; p && (p = strstr(p, needle)); p += strlen(needle))
        n++;
    free(text);
    return n;
}

/* A status predicate: worker id shows step and phase. */
typedef struct {
    const char *id;
    long long step;
    const char *phase;
} s_worker_want_t;

static bool s_worker_at(const cJSON *st, void *arg, char *why, size_t n)
{
    const s_worker_want_t *w = arg;
    const cJSON *wk = test_status_worker(st, w->id);
    const char *phase = test_status_str(wk, "phase");
    if (!wk || test_status_num(wk, "step") != w->step || !s_is(phase, w->phase)) {
        snprintf(why, n, "%s at step %lld, %s; waiting for step %lld, %s", w->id,
                 test_status_num(wk, "step"), phase ? phase : "?", w->step, w->phase);
        return false;
    }
    return true;
}

/* A status predicate: the job's state is arg. */
static bool s_state_is(const cJSON *st, void *arg, char *why, size_t n)
{
    const char *state = test_status_state(st);
    if (!state || strcmp(state, arg) != 0) {
        snprintf(why, n, "state %s, waiting for %s", state ? state : "?", (const char *)arg);
        return false;
    }
    return true;
}

/* The tokens the experts of each rank took in the last step, as the coordinator holds them:
 * each expert's load from its holder's last HEARTBEAT of this plan (0 before one). */
static void s_expected_load(uint32_t load[S_TOTAL])
{
    for (int e = 0; e < S_TOTAL; e++) {
        const fake_t *h = s_fakes[0].w.rank == s_holder[e] ? &s_fakes[0] : &s_fakes[1];
        load[e] = h->has_load ? h->load[e] : 0;
    }
}

/* Checks the metrics log's line for step s. */
static void s_check_line(const cJSON *line, uint64_t s, double loss, const double *eval,
                         uint64_t eval_step, double t0)
{
    CHECK(line, "line %llu is not JSON", (unsigned long long)s);
    if (!line)
        return;
    double now = (double)time(NULL) + 1;
    CHECK(s_num(line, "time") >= t0 - 1 && s_num(line, "time") <= now, "line %llu: time %.3f",
          (unsigned long long)s, s_num(line, "time"));
    CHECK(s_num(line, "step") == (double)s, "line %llu: step %g", (unsigned long long)s,
          s_num(line, "step"));
    CHECK(s_num(line, "generation") == 1 && s_num(line, "workers") == 2,
          "line %llu: generation %g, workers %g", (unsigned long long)s,
          s_num(line, "generation"), s_num(line, "workers"));
    CHECK(s_rel_near(s_num(line, "loss"), loss), "line %llu: loss %.9g, want %.9g",
          (unsigned long long)s, s_num(line, "loss"), loss);
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(line, "eval_loss");
    if (eval) {
        CHECK(cJSON_IsNumber(ev) && s_rel_near(ev->valuedouble, *eval) &&
                  s_num(line, "eval_step") == (double)eval_step,
              "line %llu: eval_loss %g at %g, want %.9g at %llu", (unsigned long long)s,
              s_num(line, "eval_loss"), s_num(line, "eval_step"), *eval,
              (unsigned long long)eval_step);
    } else {
        CHECK(!ev, "line %llu has an eval_loss, but no evaluation came since the last",
              (unsigned long long)s);
    }
    double tps = 0;
    for (int i = 0; i < 2; i++)
        if (s_fakes[i].phase == PROTO_PHASE_TRAINING)
            tps += s_fakes[i].tokens_per_s;
    CHECK(s_near(s_num(line, "tokens_per_s"), tps, 0.051), "line %llu: tokens_per_s %g, want %g",
          (unsigned long long)s, s_num(line, "tokens_per_s"), tps);
    uint32_t load[S_TOTAL];
    s_expected_load(load);
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(line, "load");
    bool same = cJSON_IsArray(arr) && cJSON_GetArraySize(arr) == S_TOTAL;
    for (int e = 0; same && e < S_TOTAL; e++)
        same = cJSON_GetArrayItem(arr, e)->valuedouble == load[e];
    CHECK(same, "line %llu: load differs from the holders' last loads", (unsigned long long)s);
    const cJSON *imb = cJSON_GetObjectItemCaseSensitive(line, "imbalance");
    if (s_fakes[0].has_load && s_fakes[1].has_load) {
        double per[2] = {0, 0};
        for (int e = 0; e < S_TOTAL; e++)
            per[s_holder[e]] += load[e];
        double want = (per[0] > per[1] ? per[0] : per[1]) * 2 / (per[0] + per[1]);
        CHECK(cJSON_IsNumber(imb) && s_near(imb->valuedouble, want, 6e-5),
              "line %llu: imbalance %g, want %.5f", (unsigned long long)s,
              s_num(line, "imbalance"), want);
    } else {
        CHECK(!imb, "line %llu: an imbalance before every worker reported a load",
              (unsigned long long)s);
    }
}

/* Checks the status against what the fakes reported. */
static void s_check_status(uint64_t steps, uint64_t s, double loss, const double *eval,
                           uint64_t eval_step)
{
    cJSON *st = test_status_query(s_ports.status_ep, 3000);
    CHECK(st, "no status: %s", test_status_error());
    if (!st)
        return;
    const char *phase = test_status_str(st, "phase");
    CHECK(s_is(phase, "training"), "step %llu: phase %s",
          (unsigned long long)s, phase ? phase : "?");
    CHECK(test_status_num(st, "step") == (long long)s &&
              test_status_num(st, "target_steps") == (long long)steps,
          "step %lld of %lld, want %llu of %llu", test_status_num(st, "step"),
          test_status_num(st, "target_steps"), (unsigned long long)s,
          (unsigned long long)steps);
    CHECK(s_rel_near(s_num(st, "loss"), loss), "status loss %.9g, want %.9g", s_num(st, "loss"),
          loss);
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(st, "eval_loss");
    if (eval)
        CHECK(cJSON_IsNumber(ev) && s_rel_near(ev->valuedouble, *eval) &&
                  test_status_num(st, "eval_step") == (long long)eval_step,
              "status eval_loss %g at %g, want %.9g at %llu", s_num(st, "eval_loss"),
              s_num(st, "eval_step"), *eval, (unsigned long long)eval_step);
    else
        CHECK(cJSON_IsNull(ev) && cJSON_IsNull(cJSON_GetObjectItemCaseSensitive(st, "eval_step")),
              "status shows an evaluation before any");
    double tps = 0;
    for (int i = 0; i < 2; i++) {
        const fake_t *f = &s_fakes[i];
        const cJSON *w = test_status_worker(st, f->w.id);
        const char *wphase = test_status_str(w, "phase");
        CHECK(s_is(wphase, proto_phase_name(f->phase)), "%s: phase %s, want %s",
              f->w.id, wphase ? wphase : "?", proto_phase_name(f->phase));
        CHECK(s_near(s_num(w, "tokens_per_s"), f->tokens_per_s, 0.0006),
              "%s: tokens_per_s %g, want %g", f->w.id, s_num(w, "tokens_per_s"), f->tokens_per_s);
        CHECK(s_rel_near(s_num(w, "loss"), loss), "%s: loss %g, want %g", f->w.id,
              s_num(w, "loss"), loss);
        if (f->phase == PROTO_PHASE_TRAINING)
            tps += f->tokens_per_s;
    }
    CHECK(s_near(s_num(st, "tokens_per_s"), tps, 0.0011), "status tokens_per_s %g, want %g",
          s_num(st, "tokens_per_s"), tps);
    cJSON_Delete(st);
}

/* --- the test --------------------------------------------------------------------------- */

/* path relative to the working directory (which the coordinator shares), into buf. */
static char *s_relative(const char *path, char *buf, size_t n)
{
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd))
        return NULL;
    size_t len = 0;
    for (const char *p = cwd; *p; p++)
        if (*p == '/' && p[1])
            len += (size_t)snprintf(buf + len, n - len, "../");
    snprintf(buf + len, n - len, "%s", path + 1);
    return buf;
}

/* A coordinator of its own (fresh ports into *pp) on a small job: train's fields as given,
 * cluster.expected_workers expected; its files named after `word`. NULL (CHECKed) when it
 * could not be started. */
static proc_t *s_own_coordinator(const char *data_rel, const char *train, int expected,
                                 const char *word, proc_ports_t *pp)
{
    if (!proc_ports_pick(pp)) {
        CHECK(false, "no free ports");
        return NULL;
    }
    char job[PATH_MAX], text[3 * PATH_MAX], name[64];
    snprintf(text, sizeof text,
             "{" FAKE_WORKER_MODEL_JSON ","
             " \"train\": {\"seq_len\": 64, \"steps\": 3, %s},"
             " \"data\": {\"paths\": [\"%s\"]},"
             " \"cluster\": {\"heartbeat_ms\": 200, \"liveness\": 25, \"expected_workers\": %d}}\n",
             S_LAYERS, S_EXPERTS, train, data_rel, expected);
    snprintf(name, sizeof name, "job-%s.json", word);
    proc_tmp_path(job, sizeof job, name);
    if (!proc_write_file(job, text)) {
        CHECK(false, "write %s", job);
        return NULL;
    }
    snprintf(name, sizeof name, "coordinator-%s", word);
    proc_t *coord = proc_start_coordinator(name, job, pp, NULL);
    CHECK(coord != NULL, "the %s job's coordinator did not start", word);
    return coord;
}

/* A job takes no more workers than its global batch has sequences (every rank trains one at
 * least): with global_batch 2, two fake workers get WELCOME and a third ERROR REFUSED naming
 * train.global_batch (it retries, as any refused JOIN does); once one of the two leaves, the
 * third's JOIN is welcome. Its own coordinator on ports of its own. */
static void s_check_batch_cap(const char *data_rel)
{
    proc_ports_t pp;
    proc_t *coord = s_own_coordinator(data_rel, "\"global_batch\": 2, \"micro_batch\": 2", 2,
                                      "cap", &pp);
    if (!coord)
        return;
    fake_worker_t w[3];
    uint32_t got[3] = {0};
    char said[PROTO_MAX_TEXT + 1] = "";
    char ids[3][32]; /* the fakes keep pointing at their ids */
    for (int i = 0; i < 3; i++) {
        snprintf(ids[i], sizeof ids[i], "cap-worker-%d", i);
        if (!fake_worker_open(&w[i], pp.control_ep, ids[i])) {
            CHECK(false, "fake worker %s", ids[i]);
            return;
        }
        fake_worker_join_as(&w[i], "cpu");
        zmq_msg_t msg;
        proto_msg_t m;
        if (fake_worker_recv(&w[i], S_WAIT_MS, &msg, &m) == FAKE_WORKER_MSG) {
            got[i] = m.hdr.type;
            if (got[i] == PROTO_ERROR)
                snprintf(said, sizeof said, "%s", m.error.text);
            zmq_msg_close(&msg);
        }
    }
    CHECK(got[0] == PROTO_WELCOME && got[1] == PROTO_WELCOME, "the first two JOINs to a job of "
          "global_batch 2: %s, %s, want WELCOME", got[0] ? proto_type_name(got[0]) : "nothing",
          got[1] ? proto_type_name(got[1]) : "nothing");
    CHECK(got[2] == PROTO_ERROR && strstr(said, "global_batch"), "a third JOIN to a job of "
          "global_batch 2: %s \"%s\", want ERROR REFUSED naming train.global_batch",
          got[2] ? proto_type_name(got[2]) : "nothing", said);
    fprintf(stderr, "  global_batch 2, third worker: %s%s%s\n",
            got[2] ? proto_type_name(got[2]) : "nothing", said[0] ? ": " : "", said);
    /* one of the two leaves: the third's JOIN, again, is welcome */
    proto_msg_t leave = {.hdr.type = PROTO_LEAVE};
    snprintf(leave.leave.reason, sizeof leave.leave.reason, "test");
    fake_worker_send(&w[1], &leave);
    bool welcome = false;
    for (int64_t end = proc_now_ms() + S_WAIT_MS; !welcome && proc_now_ms() < end;) {
        fake_worker_join_as(&w[2], "cpu");
        zmq_msg_t msg;
        proto_msg_t m;
        for (int k = 0; k < 8 && !welcome; k++) {
            if (fake_worker_recv(&w[2], 200, &msg, &m) != FAKE_WORKER_MSG)
                break;
            welcome = m.hdr.type == PROTO_WELCOME;
            zmq_msg_close(&msg);
        }
    }
    CHECK(welcome, "the third worker's JOIN was not welcome after one of the two left");
    for (int i = 0; i < 3; i++)
        fake_worker_close(&w[i]);
    int status;
    CHECK(proc_signal(coord, SIGTERM) && proc_wait(coord, S_WAIT_MS, &status) &&
              proc_exit_code(status) == 0,
          "the capped job's coordinator did not exit 0 on SIGTERM");
}

/* A job with train.precision "bf16" or train.collectives "nccl" (`field`, naming `word`) takes
 * GPU workers only: a JOIN from one that computes on the CPU gets ERROR REFUSED saying why (it
 * would fail its first step), one from a cuda worker gets WELCOME. Its own coordinator on ports
 * of its own. */
static void s_check_gpu_joins(const char *data_rel, const char *field, const char *word)
{
    proc_ports_t pp;
    char train[128];
    snprintf(train, sizeof train, "\"global_batch\": 8, \"micro_batch\": 4, %s", field);
    proc_t *coord = s_own_coordinator(data_rel, train, 1, word, &pp);
    if (!coord)
        return;
    static const char *const kinds[] = {"cpu", "cuda"};
    for (int i = 0; i < 2; i++) {
        fake_worker_t w;
        char id[32];
        snprintf(id, sizeof id, "%s-worker", kinds[i]);
        if (!fake_worker_open(&w, pp.control_ep, id)) {
            CHECK(false, "fake worker %s", id);
            continue;
        }
        fake_worker_join_as(&w, kinds[i]);
        zmq_msg_t msg;
        proto_msg_t m;
        uint32_t got = 0, code = 0;
        char said[PROTO_MAX_TEXT + 1] = "";
        if (fake_worker_recv(&w, S_WAIT_MS, &msg, &m) == FAKE_WORKER_MSG) {
            got = m.hdr.type;
            if (got == PROTO_ERROR) {
                code = m.error.code;
                snprintf(said, sizeof said, "%s", m.error.text);
            }
            zmq_msg_close(&msg);
        }
        if (i == 0)
            CHECK(got == PROTO_ERROR && code == PROTO_ERR_REFUSED && strstr(said, word) &&
                      strstr(said, "cuda"),
                  "a cpu worker's JOIN to a %s job: %s %u \"%s\", want ERROR REFUSED naming "
                  "%s and cuda", word, got ? proto_type_name(got) : "nothing", code, said, word);
        else
            CHECK(got == PROTO_WELCOME, "a cuda worker's JOIN to a %s job: %s, want WELCOME",
                  word, got ? proto_type_name(got) : "nothing");
        fprintf(stderr, "  %s job, %s worker: %s%s%s\n", word, kinds[i],
                got ? proto_type_name(got) : "nothing", said[0] ? ": " : "", said);
        fake_worker_close(&w);
    }
    int status;
    CHECK(proc_signal(coord, SIGTERM) && proc_wait(coord, S_WAIT_MS, &status) &&
              proc_exit_code(status) == 0,
          "the %s job's coordinator did not exit 0 on SIGTERM", word);
}

int main(void)
{
    test_init("progress");
    proc_init("progress");
    REQUIRE(proc_ports_pick(&s_ports), "no free ports");

    /* A data file named by a relative path; the job with expected_workers 2. */
    char data[PATH_MAX], rel[2 * PATH_MAX], job[PATH_MAX], text[3 * PATH_MAX], log[PATH_MAX];
    proc_tmp_path(data, sizeof data, "data.txt");
    REQUIRE(proc_write_file(data, "some text\n"), "write %s", data);
    char *data_abs = realpath(data, NULL);
    REQUIRE(data_abs && s_relative(data, rel, sizeof rel), "paths of %s", data);
    uint64_t steps = 4 + test_rand_below(S_MAX_STEPS - 4 + 1);
    uint64_t eval_at = 2 + test_rand_below(steps - 2);  /* 2 .. steps-1 */
    uint64_t fail_at = 1 + test_rand_below(steps - 1);  /* 1 .. steps-1 */
    snprintf(text, sizeof text,
             "{" FAKE_WORKER_MODEL_JSON ","
             " \"train\": {\"seq_len\": 64, \"global_batch\": 32, \"micro_batch\": 4,"
             " \"steps\": %llu},"
             " \"data\": {\"paths\": [\"%s\"]},"
             " \"cluster\": {\"heartbeat_ms\": 200, \"liveness\": 25, \"expected_workers\": 2}}\n",
             S_LAYERS, S_EXPERTS, (unsigned long long)steps, rel);
    proc_tmp_path(job, sizeof job, "job.json");
    REQUIRE(proc_write_file(job, text), "write %s", job);
    proc_tmp_path(log, sizeof log, "metrics.jsonl");
    fprintf(stderr, "  %llu steps, evaluation at %llu, a failure reported at %llu\n",
            (unsigned long long)steps, (unsigned long long)eval_at, (unsigned long long)fail_at);

    /* A metrics log that cannot be opened is a startup error naming the flag. */
    char bad[PATH_MAX];
    proc_tmp_path(bad, sizeof bad, "no-such-dir/metrics.jsonl");
    proc_t *p = NULL;
    int code = proc_run(&p, 10000, "bad-log", PROC_COORDINATOR, "--config", job, "--bind",
                        s_ports.control_ep, "--status", s_ports.status_ep, "--metrics", "none",
                        "--metrics-log", bad, NULL);
    CHECK(code == 2 && s_count_in(proc_err_path(p), "--metrics-log") == 1,
          "--metrics-log %s: exit %d, want 2 and one line naming the flag", bad, code);

    const char *extra[] = {"--metrics-log", log, NULL};
    proc_t *coord = proc_start_coordinator("coordinator", job, &s_ports, extra);
    REQUIRE(coord, "coordinator did not start");
    cJSON *st = test_status_wait(s_ports.status_ep, test_status_any, NULL, 15000, 50);
    REQUIRE(st, "the coordinator's status does not answer");
    cJSON_Delete(st);
    double t0 = (double)time(NULL);

    /* (i) One worker: WELCOME (data paths absolute), heartbeats, and no PLAN. */
    REQUIRE(s_open(&s_fakes[0], "fake-a"), "fake-a: socket");
    fake_worker_join(&s_fakes[0].w);
    REQUIRE(s_wait_count(&s_fakes[0].w.welcomes, 1), "fake-a: no WELCOME");
    cJSON *spec = cJSON_Parse(s_fakes[0].w.job ? s_fakes[0].w.job : "");
    const cJSON *paths = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(spec, "data"), "paths");
    const cJSON *p0 = cJSON_IsArray(paths) ? cJSON_GetArrayItem(paths, 0) : paths;
    CHECK(cJSON_IsString(p0) && strcmp(p0->valuestring, data_abs) == 0,
          "WELCOME's data path is %s, want %s (from %s)",
          cJSON_IsString(p0) ? p0->valuestring : "?", data_abs, rel);
    cJSON_Delete(spec);
    /* Two of the coordinator's heartbeats span an interval, many times the plan's deferral. */
    REQUIRE(s_wait_count(&s_fakes[0].w.heartbeats, 2), "fake-a: no heartbeats");
    CHECK(s_fakes[0].w.plans == 0 && s_fakes[0].w.heartbeat_gen == 0,
          "a PLAN (generation %llu) before cluster.expected_workers joined",
          (unsigned long long)s_fakes[0].w.heartbeat_gen);
    st = test_status_query(s_ports.status_ep, 3000);
    CHECK(st && s_is(test_status_state(st), "waiting") && test_status_generation(st) == 0 &&
              test_status_worker_count(st) == 1 && s_is(test_status_str(st, "phase"), "waiting"),
          "status while waiting for the second worker: %s",
          st ? test_status_state(st) : test_status_error());
    cJSON_Delete(st);

    /* The second joins: both get the first PLAN. */
    REQUIRE(s_open(&s_fakes[1], "fake-b"), "fake-b: socket");
    fake_worker_join(&s_fakes[1].w);
    REQUIRE(s_wait_count(&s_fakes[0].w.plans, 1) && s_wait_count(&s_fakes[1].w.plans, 1),
            "no PLAN after the second worker joined");
    CHECK(s_fakes[0].w.gen == 1 && s_fakes[1].w.gen == 1 &&
              s_fakes[0].w.rank != s_fakes[1].w.rank,
          "PLANs: generations %llu, %llu, ranks %u, %u", (unsigned long long)s_fakes[0].w.gen,
          (unsigned long long)s_fakes[1].w.gen, s_fakes[0].w.rank, s_fakes[1].w.rank);
    st = test_status_wait(s_ports.status_ep, s_state_is, "running", S_WAIT_MS, 10);
    REQUIRE(st, "the job did not run with 2 workers");
    cJSON_Delete(st);

    /* (iii, iv) Steps: fake-a reports each step first (the job's step advances: a line),
     * then fake-b the same step (no line). */
    double eval = 1 + 4 * test_rand_unit(), loss = NAN;
    bool evaluated = false;
    fake_t *a = &s_fakes[0], *b = &s_fakes[1];
    s_log_want_t want = {log, 0};
    for (uint64_t s = 1; s < steps; s++) {
        loss = 1 + 5 * test_rand_unit();
        double ev = s >= eval_at ? eval : NAN;
        uint64_t ev_step = s >= eval_at ? eval_at : 0;
        s_heartbeat(a, s, loss, ev, ev_step, 500 + 1000 * test_rand_unit(),
                    PROTO_PHASE_TRAINING, false);
        want.n = (int)s;
        REQUIRE(test_wait_for(s_log_has, &want, S_WAIT_MS), "no metrics-log line for step %llu",
                (unsigned long long)s);
        cJSON *lines[S_MAX_STEPS + 4] = {0};
        int n = s_log_lines(log, lines, S_MAX_STEPS + 4);
        CHECK(n == (int)s, "%d lines after step %llu", n, (unsigned long long)s);
        s_check_line(lines[s - 1], s, loss, s == eval_at ? &eval : NULL, eval_at, t0);
        for (int i = 0; i < n && i < S_MAX_STEPS + 4; i++)
            cJSON_Delete(lines[i]);

        uint32_t phase = s == fail_at ? PROTO_PHASE_FAILED : PROTO_PHASE_TRAINING;
        s_heartbeat(b, s, loss, ev, ev_step, 500 + 1000 * test_rand_unit(), phase, false);
        if (phase == PROTO_PHASE_FAILED) /* twice: logged once */
            s_heartbeat(b, s, loss, ev, ev_step, b->tokens_per_s, phase, true);
        s_worker_want_t ww = {b->w.id, (long long)s, proto_phase_name(phase)};
        st = test_status_wait(s_ports.status_ep, s_worker_at, &ww, S_WAIT_MS, 10);
        REQUIRE(st, "fake-b's step %llu does not show", (unsigned long long)s);
        cJSON_Delete(st);
        evaluated = evaluated || s >= eval_at;
        s_check_status(steps, s, loss, evaluated ? &eval : NULL, eval_at);
    }
    CHECK(s_count_in(proc_err_path(coord), "training failed") == 1,
          "fake-b's failure logged %d times, want once",
          s_count_in(proc_err_path(coord), "training failed"));

    /* (ii) fake-a finishes: the job goes on; fake-b finishes: both get STOP. */
    loss = 1 + 5 * test_rand_unit();
    s_heartbeat(a, steps, loss, eval, eval_at, 0, PROTO_PHASE_FINISHED, false);
    want.n = (int)steps;
    REQUIRE(test_wait_for(s_log_has, &want, S_WAIT_MS), "no metrics-log line for the last step");
    cJSON *lines[S_MAX_STEPS + 4] = {0};
    int n = s_log_lines(log, lines, S_MAX_STEPS + 4);
    CHECK(n == (int)steps, "%d lines after the last step", n);
    if (n == (int)steps)
        s_check_line(lines[steps - 1], steps, loss, NULL, eval_at, t0);
    for (int i = 0; i < n && i < S_MAX_STEPS + 4; i++)
        cJSON_Delete(lines[i]);
    st = test_status_query(s_ports.status_ep, 3000);
    CHECK(st && s_is(test_status_state(st), "running") &&
              s_is(test_status_str(st, "phase"), "training"),
          "one worker finished, the other not: state %s", st ? test_status_state(st) : "?");
    cJSON_Delete(st);

    s_heartbeat(b, steps, loss, eval, eval_at, 0, PROTO_PHASE_FINISHED, false);
    REQUIRE(s_wait_count(&a->w.stops, 1) && s_wait_count(&b->w.stops, 1),
            "no STOP after both workers finished");
    CHECK(a->w.stop_checkpoint == 0 && b->w.stop_checkpoint == 0, "STOP asks for a checkpoint");
    st = test_status_query(s_ports.status_ep, 3000);
    CHECK(st && s_is(test_status_state(st), "stopping") &&
              s_is(test_status_str(st, "phase"), "finished"),
          "after finishing: state %s", st ? test_status_state(st) : "?");
    cJSON_Delete(st);
    char finished[64];
    snprintf(finished, sizeof finished, "training finished at step %llu",
             (unsigned long long)steps);
    CHECK(s_count_in(proc_err_path(coord), finished) == 1, "the log does not say \"%s\"",
          finished);
    for (int i = 0; i < 2; i++) {
        proto_msg_t leave = {.hdr.type = PROTO_LEAVE};
        snprintf(leave.leave.reason, sizeof leave.leave.reason, "stopped");
        fake_worker_send(&s_fakes[i].w, &leave);
    }
    int status;
    CHECK(proc_wait(coord, S_WAIT_MS, &status) && proc_exit_code(status) == 0,
          "the coordinator did not exit 0 once the workers left");
    CHECK(a->w.errors == 0 && b->w.errors == 0, "ERRORs: %d, %d", a->w.errors, b->w.errors);

    for (int i = 0; i < 2; i++)
        fake_worker_close(&s_fakes[i].w);
    s_check_gpu_joins(rel, "\"precision\": \"bf16\"", "bf16");
    s_check_gpu_joins(rel, "\"collectives\": \"nccl\"", "nccl");
    s_check_batch_cap(rel);
    fake_worker_term();
    free(data_abs);
    return test_finish();
}
