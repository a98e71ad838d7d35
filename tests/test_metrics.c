/* /metrics (net): the Prometheus text agrees with the status socket (workers by state,
 * generation, counters, loss, held-out loss, tokens per second of the job and of each worker,
 * load imbalance, reconfigurations by kind and the last one's duration) after a settle and after
 * a worker leaves; other paths get 404, garbage gets 400, and a client that connects and says
 * nothing does not block the others. */
#include <math.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "tests/harness.h"
#include "tests/proc.h"
#include "tests/status_client.h"

static proc_ports_t g_ports;
static int s_port;

static int s_connect(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s_port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        if (fd >= 0)
            close(fd);
        return -1;
    }
    return fd;
}

/* Sends req and reads the whole reply (the server closes after it) into a malloc'd string. */
static char *s_http(const char *req, size_t req_len)
{
    int fd = s_connect();
    if (fd < 0)
        return NULL;
    if (write(fd, req, req_len) != (ssize_t)req_len) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    ssize_t n;
    while ((n = read(fd, buf + len, cap - len - 1)) > 0) {
        len += (size_t)n;
        if (len + 1 == cap)
            buf = realloc(buf, cap *= 2);
    }
    buf[len] = 0;
    close(fd);
    return buf;
}

/* The value of the sample line that starts with name (exactly, then a space), or -1. */
static long long s_sample(const char *body, const char *name)
{
    size_t n = strlen(name);
    for (const char *p = body; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (strncmp(p, name, n) == 0 && p[n] == ' ')
            return atoll(p + n + 1);
    return -1;
}

/* The value of the sample line that starts with name as a double (NaN spelled "NaN"); *found
 * says whether there is one. */
static double s_sample_f(const char *body, const char *name, bool *found)
{
    size_t n = strlen(name);
    *found = false;
    for (const char *p = body; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
        if (strncmp(p, name, n) == 0 && p[n] == ' ') {
            *found = true;
            return strtod(p + n + 1, NULL);
        }
    return NAN;
}

/* A status number, NaN for null. */
static double s_status_f(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : NAN;
}

/* a and b agree: both NaN, or within tol (relative to b, at least abs_tol). */
static bool s_agree(double a, double b, double rel, double abs_tol)
{
    if (isnan(a) || isnan(b))
        return isnan(a) && isnan(b);
    return fabs(a - b) <= fmax(abs_tol, rel * fabs(b));
}

/* Compares the training gauges with the status taken around them: workers that train change
 * them with every heartbeat, so only a metrics reply between two status replies that saw the
 * same heartbeats counts. */
static void s_compare_progress(const char *when)
{
    for (int attempt = 0; attempt < 50; attempt++) {
        cJSON *before = test_status_query(g_ports.status_ep, 3000);
        char *reply = s_http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 35);
        cJSON *st = test_status_query(g_ports.status_ep, 3000);
        const char *body = reply ? strstr(reply, "\r\n\r\n") : NULL;
        bool still = before && st && body && test_status_counter(before, "heartbeats") ==
                                                 test_status_counter(st, "heartbeats");
        if (still) {
            bool found;
            const char *gauges[][2] = {{"semoe_loss", "loss"},
                                       {"semoe_eval_loss", "eval_loss"},
                                       {"semoe_tokens_per_second", "tokens_per_s"}};
            for (size_t i = 0; i < sizeof gauges / sizeof gauges[0]; i++) {
                double m = s_sample_f(body, gauges[i][0], &found), v = s_status_f(st, gauges[i][1]);
                CHECK(found && s_agree(m, v, 1e-8, 0.0011), "%s: %s %g vs status %s %g", when,
                      gauges[i][0], m, gauges[i][1], v);
            }
            const cJSON *w;
            cJSON_ArrayForEach(w, test_status_workers(st)) {
                char name[256];
                snprintf(name, sizeof name, "semoe_worker_tokens_per_second{worker=\"%.160s\"}",
                         test_status_worker_id(w));
                double m = s_sample_f(body, name, &found), v = s_status_f(w, "tokens_per_s");
                CHECK(found && s_agree(m, v, 0, 0.0006), "%s: %s %g vs status %g", when, name, m,
                      v);
            }
        }
        cJSON_Delete(before);
        cJSON_Delete(st);
        free(reply);
        if (still)
            return;
    }
    CHECK(false, "%s: the heartbeats counter moved during every one of 50 tries", when);
}

/* The kind of a reconfiguration's why, as docs/control-plane.md gives the reason label: the first
 * word of each comma-separated reason, "mixed" when they differ, "other" when unknown. */
static const char *s_why_kind(const char *why)
{
    static const char *kinds[] = {"join", "leave", "death", "removed", "skew", "restart"};
    const char *kind = NULL;
    for (const char *item = why; item && *item;) {
        size_t n = strcspn(item, " ,");
        const char *k = "other";
        for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
            if (strlen(kinds[i]) == n && strncmp(item, kinds[i], n) == 0)
                k = kinds[i];
        if (kind && strcmp(k, kind) != 0)
            return "mixed";
        kind = k;
        item = strstr(item, ", ");
        item = item ? item + 2 : NULL;
    }
    return kind ? kind : "other";
}

/* The rebalancing metrics against the status: semoe_rebalances_total by reason counts the
 * history's entries (all of them while it holds fewer than 32), the last one's duration, the
 * load imbalance (NaN while unknown), no restart. Returns how many reconfigurations had reason
 * `kind`. */
static long long s_compare_rebalances(const char *when, const char *body, const cJSON *st,
                                      const char *kind)
{
    const cJSON *hist = cJSON_GetObjectItemCaseSensitive(st, "rebalances"), *h, *last = NULL;
    static const char *kinds[] = {"join", "leave", "death", "removed", "skew", "restart",
                                  "mixed", "other"};
    int n = cJSON_GetArraySize(hist);
    long long want_kind = 0;
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        long long count = 0;
        cJSON_ArrayForEach(h, hist)
        {
            count += strcmp(s_why_kind(test_status_str(h, "why")), kinds[i]) == 0;
            last = h;
        }
        char name[96];
        snprintf(name, sizeof name, "semoe_rebalances_total{reason=\"%s\"}", kinds[i]);
        long long m = s_sample(body, name);
        CHECK(n >= 32 ? m >= count : m == count, "%s: %s %lld, the status history has %lld", when,
              name, m, count);
        if (strcmp(kinds[i], kind) == 0)
            want_kind = m;
    }
    bool found;
    double dur = s_sample_f(body, "semoe_rebalance_last_duration_seconds", &found);
    double want = last ? s_status_f(last, "duration_ms") / 1000.0 : NAN;
    CHECK(found && s_agree(dur, want, 1e-9, 1e-9), "%s: semoe_rebalance_last_duration_seconds "
          "%g, the status' last duration %g s", when, dur, want);
    const cJSON *imb = cJSON_GetObjectItemCaseSensitive(st, "imbalance");
    double cur = s_sample_f(body, "semoe_load_imbalance", &found);
    CHECK(found && s_agree(cur, s_status_f(imb, "current"), 1e-9, 1e-9), "%s: "
          "semoe_load_imbalance %g vs status %g", when, cur, s_status_f(imb, "current"));
    double sm = s_sample_f(body, "semoe_load_imbalance_smoothed", &found);
    CHECK(found && s_agree(sm, s_status_f(imb, "smoothed"), 1e-9, 1e-9), "%s: "
          "semoe_load_imbalance_smoothed %g vs status %g", when, sm, s_status_f(imb, "smoothed"));
    CHECK(s_sample(body, "semoe_restarts_total") == 0 && test_status_counter(st, "restarts") == 0,
          "%s: a restart counted without --state-dir", when);
    return want_kind;
}

/* Compares the metrics with a status reply taken right after them (nothing changes between:
 * the cluster is settled and heartbeats move only the heartbeat counter). */
static void s_compare(const char *when, const char *kind, long long min_kind)
{
    char *reply = s_http("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 35);
    CHECK(reply, "%s: no /metrics reply", when);
    if (!reply)
        return;
    CHECK(strncmp(reply, "HTTP/1.", 7) == 0 && strstr(reply, " 200 "), "%s: %.40s", when, reply);
    CHECK(strstr(reply, "text/plain"), "%s: not text/plain", when);
    const char *body = strstr(reply, "\r\n\r\n");
    body = body ? body + 4 : "";
    cJSON *st = test_status_query(g_ports.status_ep, 3000);
    CHECK(st, "%s: no status", when);
    if (st) {
        CHECK(s_sample(body, "semoe_workers{state=\"active\"}") == test_status_active_count(st),
              "%s: active workers %lld vs %d", when,
              s_sample(body, "semoe_workers{state=\"active\"}"), test_status_active_count(st));
        CHECK(s_sample(body, "semoe_workers{state=\"syncing\"}") == 0, "%s: syncing", when);
        CHECK(s_sample(body, "semoe_generation") == test_status_generation(st),
              "%s: generation %lld vs %lld", when, s_sample(body, "semoe_generation"),
              test_status_generation(st));
        const char *counters[][2] = {{"semoe_joins_total", "joins"},
                                     {"semoe_leaves_total", "leaves"},
                                     {"semoe_deaths_total", "deaths"},
                                     {"semoe_protocol_errors_total", "protocol_errors"}};
        for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++)
            CHECK(s_sample(body, counters[i][0]) == test_status_counter(st, counters[i][1]),
                  "%s: %s %lld vs %lld", when, counters[i][0], s_sample(body, counters[i][0]),
                  test_status_counter(st, counters[i][1]));
        long long hb = s_sample(body, "semoe_heartbeats_total");
        CHECK(hb >= 0 && hb <= test_status_counter(st, "heartbeats"), "%s: heartbeats %lld",
              when, hb);
        long long k = s_compare_rebalances(when, body, st, kind);
        CHECK(k >= min_kind, "%s: semoe_rebalances_total{reason=\"%s\"} %lld, want at least "
              "%lld", when, kind, k, min_kind);
        cJSON_Delete(st);
    }
    free(reply);
}

int main(void)
{
    test_init("metrics");
    proc_init("metrics");
    REQUIRE(proc_ports_pick(&g_ports), "no free ports");
    s_port = g_ports.metrics;
    char job[4096];
    proc_src_path(job, sizeof job, "tests/jobs/control.json");
    proc_t *coord = proc_start_coordinator("coordinator", job, &g_ports, NULL);
    REQUIRE(coord, "coordinator did not start");
    int n = 2 + (int)test_rand_below(3);
    proc_t *workers[4];
    char ids[4][24];
    const char *idp[4];
    for (int i = 0; i < n; i++) {
        snprintf(ids[i], sizeof ids[i], "m%d-%04x", i, (unsigned)test_rand_below(65536));
        idp[i] = ids[i];
        workers[i] = proc_start_worker(ids[i], &g_ports, 1000);
        REQUIRE(workers[i], "worker %s did not start", ids[i]);
    }
    test_status_want_t want = {.n = n, .ids = idp, .n_ids = n};
    cJSON *st = test_status_wait(g_ports.status_ep, test_status_settled, &want, 20000, 20);
    REQUIRE(st, "%d workers did not settle", n);
    long long gen = test_status_generation(st);
    cJSON_Delete(st);

    /* A client that connects and says nothing must not hold up the others. */
    int idle = s_connect();
    CHECK(idle >= 0, "cannot connect to %s", g_ports.metrics_addr);
    s_compare("settled", "join", 1);
    s_compare_progress("settled");

    /* One worker leaves: the counters and gauges follow. */
    int k = (int)test_rand_below((uint64_t)n);
    REQUIRE(proc_signal(workers[k], SIGTERM), "SIGTERM %s", ids[k]);
    test_status_want_t want2 = {.n = n - 1, .absent = ids[k], .min_gen = gen};
    st = test_status_wait(g_ports.status_ep, test_status_settled, &want2, 20000, 20);
    REQUIRE(st, "%s did not leave", ids[k]);
    cJSON_Delete(st);
    s_compare("after a leave", "leave", 1);
    s_compare_progress("after a leave");

    /* Other paths and garbage. */
    char *r = s_http("GET /nope HTTP/1.0\r\n\r\n", 22);
    CHECK(r && strstr(r, " 404 "), "GET /nope: %.40s", r ? r : "(none)");
    free(r);
    char junk[512];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (char)(1 + test_rand_below(255));
    junk[sizeof junk - 4] = '\r', junk[sizeof junk - 3] = '\n';
    junk[sizeof junk - 2] = '\r', junk[sizeof junk - 1] = '\n';
    r = s_http(junk, sizeof junk);
    CHECK(!r || !*r || strstr(r, " 400 ") || strstr(r, " 404 "), "garbage: %.40s", r);
    free(r);
    s_compare("after garbage", "leave", 1);
    if (idle >= 0)
        close(idle);

    int status;
    CHECK(proc_signal(coord, SIGTERM) && proc_wait(coord, 10000, &status) &&
              proc_exit_code(status) == 0,
          "coordinator did not exit 0 on SIGTERM");
    for (int i = 0; i < n; i++)
        if (i != k) {
            proc_signal(workers[i], SIGTERM);
            proc_wait(workers[i], 10000, &status);
        }
    return test_finish();
}
