/* The status client of the multi-process tests (tests/status_client.h): asks a coordinator's
 * status socket on a fresh REQ socket each time, waits for a condition on the reply, reads its
 * fields and checks the placement and ranks against the contract. */
#include "tests/status_client.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

static void *s_ctx; /* made by the first query, terminated at exit */
static char s_status_err[256];

static void s_ctx_term(void)
{
    if (s_ctx) {
        zmq_ctx_term(s_ctx);
        s_ctx = NULL;
    }
}

/* --- asking ----------------------------------------------------------------------------- */

const char *test_status_error(void) { return s_status_err; }

cJSON *test_status_query(const char *endpoint, int timeout_ms)
{
    s_status_err[0] = 0;
    if (!s_ctx) {
        s_ctx = zmq_ctx_new();
        if (!s_ctx) {
            snprintf(s_status_err, sizeof s_status_err, "zmq_ctx_new: %s",
                     zmq_strerror(zmq_errno()));
            return NULL;
        }
        atexit(s_ctx_term);
    }
    void *s = zmq_socket(s_ctx, ZMQ_REQ);
    if (!s) {
        snprintf(s_status_err, sizeof s_status_err, "zmq_socket: %s", zmq_strerror(zmq_errno()));
        return NULL;
    }
    int zero = 0;
    int64_t maxmsg = 64 << 20;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(s, ZMQ_SNDTIMEO, &timeout_ms, sizeof timeout_ms);
    zmq_setsockopt(s, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    cJSON *st = NULL;
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_connect(s, endpoint) != 0) {
        snprintf(s_status_err, sizeof s_status_err, "connect %s: %s", endpoint,
                 zmq_strerror(zmq_errno()));
        goto done;
    }
    if (zmq_send(s, "status", 6, 0) != 6) {
        snprintf(s_status_err, sizeof s_status_err, "send to %s: %s", endpoint,
                 zmq_strerror(zmq_errno()));
        goto done;
    }
    /* Receive with a deadline that survives EINTR. */
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        int left = (int)(deadline - proc_now_ms());
        if (left < 0)
            left = 0;
        zmq_setsockopt(s, ZMQ_RCVTIMEO, &left, sizeof left);
        if (zmq_msg_recv(&m, s, 0) >= 0)
            break;
        if (zmq_errno() == EINTR && left > 0)
            continue;
        snprintf(s_status_err, sizeof s_status_err, "no reply from %s within %d ms (%s)",
                 endpoint, timeout_ms, zmq_strerror(zmq_errno()));
        goto done;
    }
    if (zmq_msg_more(&m)) {
        snprintf(s_status_err, sizeof s_status_err, "reply from %s has more than one frame",
                 endpoint);
        goto done;
    }
    st = cJSON_ParseWithLength(zmq_msg_data(&m), zmq_msg_size(&m));
    if (!st || !cJSON_IsObject(st)) {
        size_t sz = zmq_msg_size(&m);
        snprintf(s_status_err, sizeof s_status_err, "reply from %s is not a JSON object: %.*s",
                 endpoint, (int)(sz > 120 ? 120 : sz), (const char *)zmq_msg_data(&m));
        cJSON_Delete(st);
        st = NULL;
    }
done:
    zmq_msg_close(&m);
    zmq_close(s);
    return st;
}

cJSON *test_status_wait(const char *endpoint, test_status_pred pred, void *arg, int timeout_ms,
                        int poll_ms)
{
    int64_t start = proc_now_ms(), deadline = start + timeout_ms;
    char why[512] = "", last[1024] = "(no status yet)";
    for (;;) {
        int left = (int)(deadline - proc_now_ms());
        cJSON *st = test_status_query(endpoint, left < 200 ? 200 : left > 1000 ? 1000 : left);
        if (st) {
            why[0] = 0;
            if (pred(st, arg, why, sizeof why))
                return st;
            test_status_summary(st, last, sizeof last);
            cJSON_Delete(st);
        } else {
            snprintf(why, sizeof why, "%s", s_status_err);
        }
        if (proc_now_ms() >= deadline)
            break;
        proc_sleep_ms(poll_ms);
    }
    fprintf(stderr, "%s: waited %lld ms for the status at %s: %s\n  last status: %s\n", proc_name(),
            (long long)(proc_now_ms() - start), endpoint, why[0] ? why : "(condition false)",
            last);
    return NULL;
}

bool test_status_any(const cJSON *st, void *arg, char *why, size_t why_n)
{
    (void)st;
    (void)arg;
    (void)why;
    (void)why_n;
    return true;
}

cJSON *test_status_start_coordinator(const char *job, proc_ports_t *pp, proc_t **coord)
{
    *coord = NULL;
    if (!proc_ports_pick(pp))
        return NULL;
    *coord = proc_start_coordinator("coordinator", job, pp, NULL);
    if (!*coord)
        return NULL;
    return test_status_wait(pp->status_ep, test_status_any, NULL, 15000, 50);
}

/* --- status fields ---------------------------------------------------------------------- */

long long test_status_num(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? (long long)v->valuedouble : -1;
}

const char *test_status_str(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

long long test_status_generation(const cJSON *st) { return test_status_num(st, "generation"); }
const char *test_status_run_id(const cJSON *st) { return test_status_str(st, "run_id"); }
const char *test_status_state(const cJSON *st) { return test_status_str(st, "state"); }

long long test_status_counter(const cJSON *st, const char *name)
{
    return test_status_num(cJSON_GetObjectItemCaseSensitive(st, "counters"), name);
}

int test_status_num_layers(const cJSON *st)
{
    return (int)test_status_num(cJSON_GetObjectItemCaseSensitive(st, "model"), "num_layers");
}

int test_status_num_experts(const cJSON *st)
{
    return (int)test_status_num(cJSON_GetObjectItemCaseSensitive(st, "model"), "num_experts");
}

const cJSON *test_status_workers(const cJSON *st)
{
    const cJSON *w = cJSON_GetObjectItemCaseSensitive(st, "workers");
    return cJSON_IsArray(w) ? w : NULL;
}

int test_status_worker_count(const cJSON *st)
{
    const cJSON *w = test_status_workers(st);
    return w ? cJSON_GetArraySize(w) : -1;
}

const char *test_status_worker_id(const cJSON *w) { return test_status_str(w, "id"); }
const char *test_status_worker_state(const cJSON *w) { return test_status_str(w, "state"); }
long long test_status_worker_rank(const cJSON *w) { return test_status_num(w, "rank"); }

const cJSON *test_status_worker(const cJSON *st, const char *id)
{
    const cJSON *w;
    cJSON_ArrayForEach(w, test_status_workers(st))
    {
        const char *wid = test_status_worker_id(w);
        if (wid && strcmp(wid, id) == 0)
            return w;
    }
    return NULL;
}

int test_status_worker_experts(const cJSON *w, int *out, int n)
{
    const cJSON *ex = cJSON_GetObjectItemCaseSensitive(w, "experts");
    if (!cJSON_IsArray(ex))
        return -1;
    int k = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, ex)
    {
        if (k < n && out)
            out[k] = cJSON_IsNumber(e) ? (int)e->valuedouble : -1;
        k++;
    }
    return k;
}

int test_status_active_count(const cJSON *st)
{
    int n = 0;
    const cJSON *w;
    cJSON_ArrayForEach(w, test_status_workers(st))
    {
        const char *s = test_status_worker_state(w);
        n += s && strcmp(s, "active") == 0;
    }
    return n;
}

/* The experts entry with this id, or NULL. */
static const cJSON *s_expert(const cJSON *st, int id)
{
    const cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(st, "experts"))
    {
        if (test_status_num(e, "id") == id)
            return e;
    }
    return NULL;
}

const char *test_status_expert_holder(const cJSON *st, int id)
{
    const cJSON *ws = cJSON_GetObjectItemCaseSensitive(s_expert(st, id), "workers");
    if (!cJSON_IsArray(ws) || cJSON_GetArraySize(ws) != 1)
        return NULL;
    const cJSON *w = cJSON_GetArrayItem(ws, 0);
    return cJSON_IsString(w) ? w->valuestring : NULL;
}

static int s_worker_index(const cJSON *st, const char *id)
{
    int i = 0;
    const cJSON *w;
    cJSON_ArrayForEach(w, test_status_workers(st))
    {
        const char *wid = test_status_worker_id(w);
        if (wid && strcmp(wid, id) == 0)
            return i;
        i++;
    }
    return -1;
}

static bool s_fail(char *why, size_t n, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static bool s_fail(char *why, size_t n, const char *fmt, ...)
{
    if (why && n) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(why, n, fmt, ap);
        va_end(ap);
    }
    return false;
}

/* max - min over counts[0..n). */
static int s_spread(const int *counts, int n)
{
    int lo = counts[0], hi = counts[0];
    for (int i = 1; i < n; i++) {
        lo = counts[i] < lo ? counts[i] : lo;
        hi = counts[i] > hi ? counts[i] : hi;
    }
    return hi - lo;
}

bool test_status_placement_ok(const cJSON *st, char *why, size_t why_n)
{
    int L = test_status_num_layers(st), E = test_status_num_experts(st);
    if (L <= 0 || E <= 0)
        return s_fail(why, why_n, "status has no model.num_layers/num_experts (%d, %d)", L, E);
    int nw = test_status_worker_count(st);
    if (nw <= 0)
        return s_fail(why, why_n, "no workers");
    const cJSON *experts = cJSON_GetObjectItemCaseSensitive(st, "experts");
    if (!cJSON_IsArray(experts))
        return s_fail(why, why_n, "status has no experts array");
    if (cJSON_GetArraySize(experts) != L * E)
        return s_fail(why, why_n, "experts array has %d entries, want %d x %d",
                      cJSON_GetArraySize(experts), L, E);
    int *per_layer = calloc((size_t)L * (size_t)nw, sizeof *per_layer);
    int *total = calloc((size_t)nw, sizeof *total);
    bool *seen = calloc((size_t)L * (size_t)E, sizeof *seen);
    if (!per_layer || !total || !seen)
        abort();
    bool ok = false;
    const cJSON *e;
    cJSON_ArrayForEach(e, experts)
    {
        long long id = test_status_num(e, "id"), layer = test_status_num(e, "layer"),
                  j = test_status_num(e, "expert");
        if (id < 0 || id >= (long long)L * E || seen[id]) {
            s_fail(why, why_n, "expert id %lld out of range or listed twice", id);
            goto done;
        }
        seen[id] = true;
        if (layer != id / E || j != id % E) {
            s_fail(why, why_n, "expert %lld: layer %lld expert %lld, want %lld %lld", id, layer,
                   j, id / E, id % E);
            goto done;
        }
        const cJSON *ws = cJSON_GetObjectItemCaseSensitive(e, "workers");
        int nh = cJSON_IsArray(ws) ? cJSON_GetArraySize(ws) : -1;
        if (nh != 1) {
            s_fail(why, why_n, "expert %lld (layer %lld, expert %lld) held by %d workers, want 1",
                   id, layer, j, nh);
            goto done;
        }
        const cJSON *h = cJSON_GetArrayItem(ws, 0);
        int wi = cJSON_IsString(h) ? s_worker_index(st, h->valuestring) : -1;
        if (wi < 0) {
            s_fail(why, why_n, "expert %lld held by \"%s\", which is not a listed worker", id,
                   cJSON_IsString(h) ? h->valuestring : "?");
            goto done;
        }
        int mine[4096];
        int k = test_status_worker_experts(cJSON_GetArrayItem(test_status_workers(st), wi), mine,
                                           4096);
        bool listed = false;
        for (int i = 0; i < k && i < 4096 && !listed; i++)
            listed = mine[i] == id;
        if (!listed) {
            s_fail(why, why_n, "expert %lld is held by %s, but %s does not list it", id,
                   h->valuestring, h->valuestring);
            goto done;
        }
        per_layer[layer * nw + wi]++;
        total[wi]++;
    }
    /* And each worker lists only experts that name it as holder. */
    int wi = 0;
    const cJSON *w;
    cJSON_ArrayForEach(w, test_status_workers(st))
    {
        int mine[4096];
        int k = test_status_worker_experts(w, mine, 4096);
        const char *wid = test_status_worker_id(w);
        if (k < 0 || !wid) {
            s_fail(why, why_n, "worker %d has no id or experts array", wi);
            goto done;
        }
        if (k != total[wi]) {
            s_fail(why, why_n, "worker %s lists %d experts, but holds %d by the experts array",
                   wid, k, total[wi]);
            goto done;
        }
        wi++;
    }
    for (int l = 0; l < L; l++) {
        int spread = s_spread(per_layer + l * nw, nw);
        if (spread > 1) {
            char counts[256];
            size_t off = 0;
            for (int i = 0; i < nw && off < sizeof counts; i++)
                off += (size_t)snprintf(counts + off, sizeof counts - off, " %d",
                                        per_layer[l * nw + i]);
            s_fail(why, why_n, "layer %d unbalanced: experts per worker%s", l, counts);
            goto done;
        }
    }
    if (s_spread(total, nw) > 1) {
        s_fail(why, why_n, "totals over layers unbalanced (max - min = %d)", s_spread(total, nw));
        goto done;
    }
    ok = true;
done:
    free(per_layer);
    free(total);
    free(seen);
    return ok;
}

bool test_status_ranks_ok(const cJSON *st, char *why, size_t why_n)
{
    int n = test_status_worker_count(st);
    if (n <= 0)
        return s_fail(why, why_n, "no workers");
    long long B = test_status_num(st, "global_batch");
    bool seen[PROC_MAX] = {false};
    const cJSON *w;
    cJSON_ArrayForEach(w, test_status_workers(st))
    {
        long long r = test_status_worker_rank(w);
        const char *id = test_status_worker_id(w);
        if (r < 0 || r >= n || n > PROC_MAX || seen[r])
            return s_fail(why, why_n, "worker %s has rank %lld: ranks must be dense 0..%d",
                          id ? id : "?", r, n - 1);
        seen[r] = true;
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(w, "batch");
        if (B > 0 && cJSON_IsArray(b) && cJSON_GetArraySize(b) == 2) {
            long long lo = (long long)cJSON_GetArrayItem(b, 0)->valuedouble;
            long long hi = (long long)cJSON_GetArrayItem(b, 1)->valuedouble;
            long long wlo = r * B / n, whi = (r + 1) * B / n;
            if (lo != wlo || hi != whi)
                return s_fail(why, why_n,
                              "worker %s (rank %lld of %d) has batch [%lld, %lld), want "
                              "[%lld, %lld) of %lld",
                              id ? id : "?", r, n, lo, hi, wlo, whi, B);
        }
    }
    return true;
}

bool test_status_settled(const cJSON *st, void *arg, char *why, size_t why_n)
{
    const test_status_want_t *w = arg;
    long long gen = test_status_generation(st);
    if (gen <= w->min_gen)
        return s_fail(why, why_n, "generation %lld, waiting for one above %lld", gen, w->min_gen);
    const char *run = test_status_run_id(st);
    if (w->not_run_id && run && strcmp(run, w->not_run_id) == 0)
        return s_fail(why, why_n, "still the old coordinator run %s", run);
    if (!run)
        return s_fail(why, why_n, "status has no run_id");
    int n = test_status_worker_count(st);
    if (n != w->n)
        return s_fail(why, why_n, "%d workers listed, waiting for %d", n, w->n);
    for (int i = 0; i < w->n_ids; i++)
        if (!test_status_worker(st, w->ids[i]))
            return s_fail(why, why_n, "worker %s not listed", w->ids[i]);
    if (w->absent && test_status_worker(st, w->absent))
        return s_fail(why, why_n, "worker %s still listed", w->absent);
    int active = test_status_active_count(st);
    if (active != n)
        return s_fail(why, why_n, "%d of %d workers active", active, n);
    const char *state = test_status_state(st);
    if (!state || strcmp(state, "running") != 0)
        return s_fail(why, why_n, "job state %s, waiting for running", state ? state : "(none)");
    return test_status_placement_ok(st, why, why_n) && test_status_ranks_ok(st, why, why_n);
}

char *test_status_summary(const cJSON *st, char *buf, size_t n)
{
    const char *state = test_status_state(st), *run = test_status_run_id(st);
    size_t off = (size_t)snprintf(buf, n, "gen=%lld state=%s run=%.8s workers=[",
                                  test_status_generation(st), state ? state : "?",
                                  run ? run : "?");
    const cJSON *w;
    bool first = true;
    cJSON_ArrayForEach(w, test_status_workers(st))
    {
        if (off >= n)
            break;
        const char *id = test_status_worker_id(w), *ws = test_status_worker_state(w);
        off += (size_t)snprintf(buf + off, n - off, "%s%s:%s:r%lld:%de", first ? "" : " ",
                                id ? id : "?", ws ? ws : "?", test_status_worker_rank(w),
                                test_status_worker_experts(w, NULL, 0));
        first = false;
    }
    if (off < n)
        snprintf(buf + off, n - off, "]");
    return buf;
}
