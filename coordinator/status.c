/* The status reply (status.h), written straight into a buffer: a cJSON tree with its number
 * printing (sprintf, then sscanf to check the round trip, per number) cost 8 ms a request at
 * 1024 workers, this 1 ms; and the status socket's request loop. */
#include "coordinator/status.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "actors/log.h"

/* Frames of one status request (routing envelope, delimiter, body) we accept. */
#define S_MAX_FRAMES 16

static const char *s_tier_names[PROTO_TIERS] = {"hbm", "host", "ssd"};

/* --- a JSON writer --------------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} s_json_t;

static void s_reserve(s_json_t *j, size_t more)
{
    if (j->len + more + 1 <= j->cap)
        return;
    while (j->len + more + 1 > j->cap)
        j->cap = j->cap ? 2 * j->cap : 4096;
    j->data = semoe_xrealloc(j->data, j->cap);
}

static void s_raw(s_json_t *j, const char *s, size_t n)
{
    s_reserve(j, n);
    memcpy(j->data + j->len, s, n);
    j->len += n;
    j->data[j->len] = 0;
}

/* A string literal ("" lit makes anything else a compile error). */
#define S_LIT(j, lit) s_raw((j), "" lit, sizeof("" lit) - 1)

static void s_cstr(s_json_t *j, const char *s) { s_raw(j, s, strlen(s)); }

static void s_u64(s_json_t *j, uint64_t v)
{
    char buf[24], *p = buf + sizeof buf;
    do
        *--p = (char)('0' + v % 10);
    while (v /= 10);
    s_raw(j, p, (size_t)(buf + sizeof buf - p));
}

/* A number with up to 3 decimals, or null when not finite. */
static void s_f64(s_json_t *j, double v)
{
    if (!isfinite(v)) {
        S_LIT(j, "null");
        return;
    }
    char buf[48];
    int n = snprintf(buf, sizeof buf, "%.15g", round(v * 1000) / 1000);
    s_raw(j, buf, (size_t)n);
}

/* A number with 9 significant digits (a loss), or null when not finite. */
static void s_g9(s_json_t *j, double v)
{
    if (!isfinite(v)) {
        S_LIT(j, "null");
        return;
    }
    char buf[48];
    int n = snprintf(buf, sizeof buf, "%.9g", v);
    s_raw(j, buf, (size_t)n);
}

/* A string with JSON's escapes (control characters, quote, backslash). */
static void s_str(s_json_t *j, const char *s)
{
    size_t n = strlen(s);
    s_reserve(j, 6 * n + 2);
    char *o = j->data + j->len;
    *o++ = '"';
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\') {
            *o++ = '\\';
            *o++ = (char)*p;
        } else if (*p < 0x20) {
            o += sprintf(o, "\\u%04x", *p);
        } else {
            *o++ = (char)*p;
        }
    }
    *o++ = '"';
    j->len = (size_t)(o - j->data);
    j->data[j->len] = 0;
}

/* ,"name": (the comma unless first) */
static void s_key(s_json_t *j, const char *name, bool first)
{
    if (!first)
        S_LIT(j, ",");
    s_str(j, name);
    S_LIT(j, ":");
}

static void s_free_reply(void *data, void *hint)
{
    (void)hint;
    free(data);
}

/* --- the reply -------------------------------------------------------------------------------- */

const char *const status_why_names[STATUS_WHY_KINDS] = {
    "join", "leave", "death", "removed", "skew", "restart", "mixed", "other"};

status_why_t status_why_kind(const char *why)
{
    int kind = -1;
    for (const char *item = why; item && *item;) {
        size_t n = strcspn(item, " ,");
        int k = STATUS_WHY_OTHER;
        for (int i = 0; i < STATUS_WHY_MIXED; i++)
            if (strlen(status_why_names[i]) == n && strncmp(item, status_why_names[i], n) == 0)
                k = i;
        if (kind >= 0 && k != kind)
            return STATUS_WHY_MIXED;
        kind = k;
        item = strstr(item, ", ");
        item = item ? item + 2 : NULL;
    }
    return kind < 0 ? STATUS_WHY_OTHER : (status_why_t)kind;
}

uint32_t status_workers_in(const status_view_t *v, member_state_t state)
{
    uint32_t n = 0;
    for (const member_t *m = members_first(v->members); m; m = m->next)
        n += (m->placed ? m->state : MEMBER_SYNCING) == state;
    return n;
}

/* The part of a worker's entry that changes only with its capabilities or the plan. */
static void s_worker_fixed(s_json_t *j, const status_view_t *v, const member_t *m)
{
    s_key(j, "id", true);
    s_str(j, m->id);
    s_key(j, "rank", false);
    if (m->placed)
        s_u64(j, m->rank);
    else
        S_LIT(j, "null");
    s_key(j, "host", false);
    s_str(j, m->host);
    s_key(j, "pid", false);
    s_u64(j, m->pid);
    char device[PROTO_MAX_NAME + 32];
    if (strcmp(m->device_kind, "cuda") == 0)
        snprintf(device, sizeof device, "cuda:%u", m->device_index);
    else
        snprintf(device, sizeof device, "%s", m->device_kind);
    s_key(j, "device", false);
    s_str(j, device);
    s_key(j, "device_name", false);
    s_str(j, m->device_name);
    s_key(j, "data_endpoint", false);
    s_str(j, m->data_endpoint);
    s_key(j, "experts", false);
    S_LIT(j, "[");
    for (uint32_t i = 0; i < m->n_experts; i++) {
        if (i)
            S_LIT(j, ",");
        s_u64(j, m->experts[i]);
    }
    S_LIT(j, "]");
    s_key(j, "batch", false);
    if (m->placed && m->rank < v->world) {
        S_LIT(j, "[");
        s_u64(j, (uint64_t)m->rank * v->global_batch / v->world);
        S_LIT(j, ",");
        s_u64(j, (uint64_t)(m->rank + 1) * v->global_batch / v->world);
        S_LIT(j, "]");
    } else {
        S_LIT(j, "null");
    }
}

/* A worker's entry: the fixed part from the member's memo (rewritten when the generation
 * moved or the member dropped it), then what changes with every heartbeat. At a thousand
 * workers the memo halves the cost of a status reply. */
static void s_worker(s_json_t *j, const status_view_t *v, member_t *m)
{
    if (!m->status_part || m->status_part_gen != v->generation) {
        s_json_t part = {0};
        s_worker_fixed(&part, v, m);
        free(m->status_part);
        m->status_part = part.data;
        m->status_part_len = part.len;
        m->status_part_gen = v->generation;
    }
    s_raw(j, m->status_part, m->status_part_len);
    s_key(j, "state", false);
    s_str(j, m->leaving                                ? "leaving"
             : m->placed && m->state == MEMBER_ACTIVE ? "active"
                                                      : "syncing");
    s_key(j, "memory", false);
    for (int t = 0; t < PROTO_TIERS; t++) {
        s_cstr(j, t ? "," : "{");
        s_key(j, s_tier_names[t], true);
        S_LIT(j, "{\"total\":");
        s_u64(j, m->mem_total[t]);
        S_LIT(j, ",\"used\":");
        s_u64(j, m->mem_used[t]);
        S_LIT(j, "}");
    }
    S_LIT(j, "}");
    int64_t age = v->now_ms - m->last_seen_ms;
    s_key(j, "heartbeat_age_ms", false);
    s_u64(j, age > 0 ? (uint64_t)age : 0);
    s_key(j, "generation", false);
    s_u64(j, m->acked_gen);
    s_key(j, "phase", false);
    s_str(j, proto_phase_name(m->phase));
    s_key(j, "step", false);
    s_u64(j, m->step);
    s_key(j, "loss", false);
    s_g9(j, m->loss);
    s_key(j, "tokens_per_s", false);
    s_f64(j, m->tokens_per_s);
}

/* The experts, each with the ids of the workers that hold it (from the members' own lists, so
 * that a worker removed since the last plan is not named). */
static void s_experts(s_json_t *j, const status_view_t *v)
{
    uint64_t total = (uint64_t)v->num_layers * v->num_experts;
    uint32_t *off = semoe_xcalloc(total + 1, sizeof *off);
    for (const member_t *m = members_first(v->members); m; m = m->next)
        for (uint32_t i = 0; i < m->n_experts; i++)
            if (m->experts[i] < total)
                off[m->experts[i] + 1]++;
    for (uint64_t e = 0; e < total; e++)
        off[e + 1] += off[e];
    const char **names = semoe_xmalloc((off[total] + 1) * sizeof *names);
    uint32_t *fill = semoe_xmalloc((total + 1) * sizeof *fill);
    memcpy(fill, off, total * sizeof *fill);
    for (const member_t *m = members_first(v->members); m; m = m->next)
        for (uint32_t i = 0; i < m->n_experts; i++)
            if (m->experts[i] < total)
                names[fill[m->experts[i]]++] = m->id;
    S_LIT(j, "[");
    for (uint64_t e = 0; e < total; e++) {
        s_cstr(j, e ? ",{\"id\":" : "{\"id\":");
        s_u64(j, e);
        S_LIT(j, ",\"layer\":");
        s_u64(j, e / v->num_experts);
        S_LIT(j, ",\"expert\":");
        s_u64(j, e % v->num_experts);
        S_LIT(j, ",\"workers\":[");
        for (uint32_t i = off[e]; i < off[e + 1]; i++) {
            if (i > off[e])
                S_LIT(j, ",");
            s_str(j, names[i]);
        }
        S_LIT(j, "],\"load\":");
        s_f64(j, v->load ? v->load[e] : 0.0);
        S_LIT(j, "}");
    }
    S_LIT(j, "]");
    free(fill);
    free(names);
    free(off);
}

/* The history of reconfigurations, oldest first. */
static void s_rebalances(s_json_t *j, const status_view_t *v)
{
    S_LIT(j, "[");
    for (uint32_t i = 0; i < v->n_rebalances; i++) {
        const status_rebalance_t *r = &v->rebalances[i];
        s_cstr(j, i ? ",{" : "{");
        s_key(j, "generation", true);
        s_u64(j, r->generation);
        s_key(j, "at_step", false);
        s_u64(j, r->at_step);
        s_key(j, "time", false);
        s_f64(j, r->time);
        s_key(j, "why", false);
        s_str(j, r->why);
        s_key(j, "moved", false);
        s_u64(j, r->moved);
        s_key(j, "bytes", false);
        s_u64(j, r->bytes);
        s_key(j, "before", false);
        s_f64(j, r->before);
        s_key(j, "after", false);
        s_f64(j, r->after);
        s_key(j, "duration_ms", false);
        s_f64(j, r->duration_ms);
        S_LIT(j, "}");
    }
    S_LIT(j, "]");
}

char *status_json(const status_view_t *v, size_t *len)
{
    /* Start at the last reply's size: a reply of a few hundred KB grown by doubling costs
     * copies and fresh pages on every request. */
    static __thread size_t last_cap;
    s_json_t j = {0};
    if (last_cap)
        s_reserve(&j, last_cap + last_cap / 8);
    char run[17];
    snprintf(run, sizeof run, "%016" PRIx64, v->run_id);
    S_LIT(&j, "{");
    s_key(&j, "run_id", true);
    s_str(&j, run);
    s_key(&j, "generation", false);
    s_u64(&j, v->generation);
    s_key(&j, "state", false);
    s_str(&j, v->state);
    s_key(&j, "reconfig", false);
    s_str(&j, v->reconfig ? v->reconfig : "running");
    s_key(&j, "phase", false);
    s_str(&j, v->phase);
    s_key(&j, "step", false);
    s_u64(&j, v->step);
    s_key(&j, "target_steps", false);
    s_u64(&j, v->target_steps);
    s_key(&j, "loss", false);
    s_g9(&j, v->loss); // NAN: null
    s_key(&j, "eval_loss", false);
    s_g9(&j, v->eval_loss);
    s_key(&j, "eval_step", false);
    if (isnan(v->eval_loss))
        S_LIT(&j, "null");
    else
        s_u64(&j, v->eval_step);
    s_key(&j, "tokens_per_s", false);
    s_f64(&j, v->tokens_per_s);
    s_key(&j, "uptime_ms", false);
    s_u64(&j, v->uptime_ms > 0 ? (uint64_t)v->uptime_ms : 0);
    s_key(&j, "heartbeat_ms", false);
    s_u64(&j, v->heartbeat_ms);
    s_key(&j, "liveness", false);
    s_u64(&j, v->liveness);
    S_LIT(&j, ",\"model\":{\"num_layers\":");
    s_u64(&j, v->num_layers);
    S_LIT(&j, ",\"num_experts\":");
    s_u64(&j, v->num_experts);
    S_LIT(&j, ",\"top_k\":");
    s_u64(&j, v->top_k);
    S_LIT(&j, "}");
    s_key(&j, "global_batch", false);
    s_u64(&j, v->global_batch);
    s_key(&j, "last_reconfig_ms", false);
    s_f64(&j, v->last_reconfig_ms < 0 ? NAN : v->last_reconfig_ms);
    s_key(&j, "pending_acks", false);
    s_u64(&j, v->pending_acks);
    S_LIT(&j, ",\"imbalance\":{\"current\":");
    s_f64(&j, v->imbalance);
    S_LIT(&j, ",\"smoothed\":");
    s_f64(&j, v->imbalance_smoothed);
    S_LIT(&j, "},\"rebalances\":");
    s_rebalances(&j, v);
    S_LIT(&j, ",\"counters\":{\"heartbeats\":");
    s_u64(&j, v->counters.heartbeats);
    S_LIT(&j, ",\"protocol_errors\":");
    s_u64(&j, v->counters.protocol_errors);
    S_LIT(&j, ",\"joins\":");
    s_u64(&j, v->counters.joins);
    S_LIT(&j, ",\"leaves\":");
    s_u64(&j, v->counters.leaves);
    S_LIT(&j, ",\"deaths\":");
    s_u64(&j, v->counters.deaths);
    S_LIT(&j, ",\"generations\":");
    s_u64(&j, v->counters.generations);
    S_LIT(&j, ",\"restarts\":");
    s_u64(&j, v->counters.restarts);
    S_LIT(&j, "},\"workers\":[");
    bool first = true;
    for (member_t *m = members_first(v->members); m; m = m->next, first = false) {
        s_cstr(&j, first ? "{" : ",{");
        s_worker(&j, v, m);
        S_LIT(&j, "}");
    }
    S_LIT(&j, "],\"experts\":");
    s_experts(&j, v);
    S_LIT(&j, "}");
    last_cap = j.len;
    *len = j.len;
    return j.data;
}

char *status_error_json(const char *text, size_t *len)
{
    s_json_t j = {0};
    S_LIT(&j, "{\"error\":");
    s_str(&j, text);
    S_LIT(&j, "}");
    *len = j.len;
    return j.data;
}

/* --- serving ----------------------------------------------------------------------------------- */

void status_serve(void *sock, status_view_fn *view, void *arg)
{
    zmq_msg_t frames[S_MAX_FRAMES], extra;
    int n = 0, total = 0;
    for (bool more = true; more;) {
        zmq_msg_t *f = n < S_MAX_FRAMES ? &frames[n] : &extra; // the rest: read, drop
        zmq_msg_init(f);
        if (zmq_msg_recv(f, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(f);
            break;
        }
        more = zmq_msg_more(f);
        total++;
        if (f == &extra)
            zmq_msg_close(f);
        else
            n++;
    }
    int delim = -1;
    for (int i = 1; i < n && delim < 0; i++)
        if (zmq_msg_size(&frames[i]) == 0)
            delim = i;
    if (delim > 0 && total <= S_MAX_FRAMES) {
        const char *text = delim + 1 < n ? zmq_msg_data(&frames[delim + 1]) : "";
        size_t len = delim + 1 < n ? zmq_msg_size(&frames[delim + 1]) : 0;
        while (len > 0 && (text[len - 1] == '\n' || text[len - 1] == '\r' || text[len - 1] == 0))
            len--;
        char *reply;
        if (n == delim + 2 && len == 6 && memcmp(text, "status", 6) == 0) {
            status_view_t v;
            view(arg, &v);
            reply = status_json(&v, &len);
        } else {
            reply = status_error_json("unknown request: send the string \"status\"", &len);
        }
        bool ok = true;
        for (int i = 0; ok && i <= delim; i++)
            ok = zmq_send(sock, zmq_msg_data(&frames[i]), zmq_msg_size(&frames[i]),
                          ZMQ_SNDMORE | ZMQ_DONTWAIT) >= 0;
        /* Hand the reply to ZeroMQ without a copy; it frees it once sent. */
        zmq_msg_t out;
        if (ok && zmq_msg_init_data(&out, reply, len, s_free_reply, NULL) == 0) {
            if (zmq_msg_send(&out, sock, ZMQ_DONTWAIT) < 0) {
                log_debug("status: reply: %s", zmq_strerror(zmq_errno()));
                zmq_msg_close(&out);
            }
        } else {
            log_debug("status: reply: %s", zmq_strerror(zmq_errno()));
            free(reply);
        }
    } else {
        log_debug("status: dropped a message of %d frames that is not a request", total);
    }
    for (int i = 0; i < n; i++)
        zmq_msg_close(&frames[i]);
}
