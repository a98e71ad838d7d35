/* /metrics over HTTP (metrics.h): a listener on uv_tcp and one small state machine per
 * connection (read the request head into a fixed buffer, answer, close), plus the Prometheus
 * text rendering of a status view. */
#include "coordinator/metrics.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct s_conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t write;
    struct metrics *owner;
    char buf[METRICS_MAX_REQUEST];
    size_t len;
    char *reply;
    int open;       // handles not yet closed: the connection is freed at 0
    bool closing;
    bool answered;
    struct s_conn *prev, *next;
} s_conn_t;

struct metrics {
    uv_loop_t *loop;
    uv_tcp_t server;
    bool server_open; // the listener's handle has not finished closing
    bool destroyed;   // metrics_destroy was called: free once every handle has closed
    metrics_render_fn *render;
    void *arg;
    s_conn_t *conns;
    uint32_t n_conns;
};

static void s_maybe_free(metrics_t *self)
{
    if (self->destroyed && !self->server_open && self->n_conns == 0)
        free(self);
}

/* --- connections --------------------------------------------------------------------------- */

static void s_conn_closed(uv_handle_t *handle)
{
    s_conn_t *c = handle->data;
    if (--c->open > 0)
        return;
    metrics_t *owner = c->owner;
    if (c->prev)
        c->prev->next = c->next;
    else
        owner->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    owner->n_conns--;
    free(c->reply);
    free(c);
    s_maybe_free(owner);
}

static void s_conn_close(s_conn_t *c)
{
    if (c->closing)
        return;
    c->closing = true;
    uv_close((uv_handle_t *)&c->tcp, s_conn_closed);
    uv_close((uv_handle_t *)&c->timer, s_conn_closed);
}

static void s_on_written(uv_write_t *req, int status)
{
    (void)status; // either way the connection is done
    s_conn_close(req->data);
}

/* Sends status line, headers and body (body is the caller's), then closes. */
static void s_reply(s_conn_t *c, const char *status, const char *type, const char *body,
                    size_t body_len)
{
    c->answered = true;
    uv_read_stop((uv_stream_t *)&c->tcp);
    char head[256];
    int n = snprintf(head, sizeof head,
                     "HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     status, type, body_len);
    c->reply = semoe_xmalloc((size_t)n + body_len);
    memcpy(c->reply, head, (size_t)n);
    memcpy(c->reply + n, body, body_len);
    uv_buf_t buf = uv_buf_init(c->reply, (unsigned)((size_t)n + body_len));
    c->write.data = c;
    if (uv_write(&c->write, (uv_stream_t *)&c->tcp, &buf, 1, s_on_written) != 0)
        s_conn_close(c);
}

static void s_reply_text(s_conn_t *c, const char *status, const char *text)
{
    s_reply(c, status, "text/plain; charset=utf-8", text, strlen(text));
}

/* Answers a complete request head in c->buf. Only the request line matters. */
static void s_answer(s_conn_t *c)
{
    char *eol = memchr(c->buf, '\n', c->len);
    size_t line_len = eol ? (size_t)(eol - c->buf) : c->len;
    char line[512];
    if (line_len >= sizeof line) {
        s_reply_text(c, "414 URI Too Long", "request line too long\n");
        return;
    }
    memcpy(line, c->buf, line_len);
    line[line_len] = 0;
    char *sp1 = strchr(line, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
    if (!sp1 || !sp2 || strncmp(sp2 + 1, "HTTP/1.", 7) != 0) {
        s_reply_text(c, "400 Bad Request", "bad request\n");
        return;
    }
    *sp1 = 0;
    *sp2 = 0;
    char *path = sp1 + 1, *query = strchr(path, '?');
    if (query)
        *query = 0;
    if (strcmp(line, "GET") != 0 || strcmp(path, "/metrics") != 0) {
        s_reply_text(c, "404 Not Found", "not found; try GET /metrics\n");
        return;
    }
    size_t len = 0;
    char *body = c->owner->render(c->owner->arg, &len);
    s_reply(c, "200 OK", "text/plain; version=0.0.4; charset=utf-8", body, len);
    free(body);
}

static bool s_head_complete(const s_conn_t *c)
{
    return memmem(c->buf, c->len, "\r\n\r\n", 4) || memmem(c->buf, c->len, "\n\n", 2);
}

static void s_on_alloc(uv_handle_t *handle, size_t suggested, uv_buf_t *buf)
{
    (void)suggested;
    s_conn_t *c = handle->data;
    // A full buffer gives libuv no room: the read callback then sees UV_ENOBUFS.
    *buf = uv_buf_init(c->buf + c->len, (unsigned)(sizeof c->buf - c->len));
}

static void s_on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf)
{
    (void)buf;
    s_conn_t *c = stream->data;
    if (c->answered || c->closing)
        return;
    if (nread == UV_ENOBUFS) {
        s_reply_text(c, "431 Request Header Fields Too Large", "request too large\n");
        return;
    }
    if (nread < 0) { // EOF or error before a whole request: nothing to answer
        s_conn_close(c);
        return;
    }
    c->len += (size_t)nread;
    if (s_head_complete(c))
        s_answer(c);
    else if (c->len == sizeof c->buf)
        s_reply_text(c, "431 Request Header Fields Too Large", "request too large\n");
}

static void s_on_timeout(uv_timer_t *timer) { s_conn_close(timer->data); }

static void s_reject_closed(uv_handle_t *handle) { free(handle); }

static void s_on_connection(uv_stream_t *server, int status)
{
    metrics_t *self = server->data;
    if (status < 0 || self->destroyed)
        return;
    if (self->n_conns >= METRICS_MAX_CONNS) {
        // Full: the oldest connection still waiting for its request makes room (so that slow
        // clients holding every slot cannot lock a scraper out); if none waits, hang up on
        // the newcomer.
        s_conn_t *oldest = NULL;
        for (s_conn_t *c = self->conns; c; c = c->next)
            if (!c->answered && !c->closing)
                oldest = c;
        if (oldest) {
            s_conn_close(oldest);
        } else {
            uv_tcp_t *t = semoe_xmalloc(sizeof *t);
            uv_tcp_init(self->loop, t);
            uv_accept(server, (uv_stream_t *)t);
            uv_close((uv_handle_t *)t, s_reject_closed);
            return;
        }
    }
    s_conn_t *c = semoe_xcalloc(1, sizeof *c);
    c->owner = self;
    uv_tcp_init(self->loop, &c->tcp);
    uv_timer_init(self->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open = 2;
    c->next = self->conns;
    if (self->conns)
        self->conns->prev = c;
    self->conns = c;
    self->n_conns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0 ||
        uv_read_start((uv_stream_t *)&c->tcp, s_on_alloc, s_on_read) != 0) {
        s_conn_close(c);
        return;
    }
    uv_timer_start(&c->timer, s_on_timeout, METRICS_TIMEOUT_MS, 0);
}

/* --- the listener ---------------------------------------------------------------------------- */

/* Parses "HOST:PORT" ("[V6]:PORT", "*:PORT", "localhost:PORT") into *addr. */
static semoe_rc s_parse_endpoint(const char *endpoint, struct sockaddr_storage *addr)
{
    char host[256];
    const char *colon = strrchr(endpoint, ':');
    size_t host_len = colon ? (size_t)(colon - endpoint) : 0;
    char *end = NULL;
    long port = colon && colon[1] ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || host_len >= sizeof host || !end || *end || port < 0 || port > 65535)
        return semoe_err(SEMOE_EINVAL, "--metrics %s: want HOST:PORT, e.g. 127.0.0.1:5557",
                         endpoint);
    memcpy(host, endpoint, host_len);
    host[host_len] = 0;
    if (host_len >= 2 && host[0] == '[' && host[host_len - 1] == ']') {
        host[host_len - 1] = 0;
        if (uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)addr) == 0)
            return SEMOE_OK;
    } else {
        const char *h = strcmp(host, "*") == 0 || !host[0] ? "0.0.0.0"
                        : strcmp(host, "localhost") == 0 ? "127.0.0.1"
                                                         : host;
        if (uv_ip4_addr(h, (int)port, (struct sockaddr_in *)addr) == 0)
            return SEMOE_OK;
    }
    return semoe_err(SEMOE_EINVAL, "--metrics %s: '%s' is not an IP address", endpoint, host);
}

static void s_server_closed(uv_handle_t *handle)
{
    metrics_t *self = handle->data;
    self->server_open = false;
    s_maybe_free(self);
}

semoe_rc metrics_new(uv_loop_t *loop, const char *endpoint, metrics_render_fn *render, void *arg,
                     metrics_t **self_p)
{
    *self_p = NULL;
    struct sockaddr_storage addr;
    memset(&addr, 0, sizeof addr);
    SEMOE_CHECK(s_parse_endpoint(endpoint, &addr));
    metrics_t *self = semoe_xcalloc(1, sizeof *self);
    self->loop = loop;
    self->render = render;
    self->arg = arg;
    uv_tcp_init(loop, &self->server);
    self->server.data = self;
    self->server_open = true;
    int rc = uv_tcp_bind(&self->server, (const struct sockaddr *)&addr, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&self->server, 128, s_on_connection);
    if (rc != 0) {
        metrics_destroy(&self);
        return semoe_err(SEMOE_EIO, "--metrics %s: cannot listen: %s", endpoint, uv_strerror(rc));
    }
    *self_p = self;
    return SEMOE_OK;
}

void metrics_destroy(metrics_t **self_p)
{
    metrics_t *self = *self_p;
    if (!self)
        return;
    *self_p = NULL;
    self->destroyed = true;
    for (s_conn_t *c = self->conns; c; c = c->next)
        s_conn_close(c);
    uv_close((uv_handle_t *)&self->server, s_server_closed);
}

/* --- the Prometheus text --------------------------------------------------------------------- */

typedef struct {
    char *data;
    size_t len, cap;
} s_text_t;

static void __attribute__((format(printf, 2, 3))) s_put(s_text_t *t, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->data + t->len, t->cap - t->len, fmt, ap);
        va_end(ap);
        if (n >= 0 && (size_t)n < t->cap - t->len) {
            t->len += (size_t)n;
            return;
        }
        t->cap = 2 * t->cap + (n > 0 ? (size_t)n : 0);
        t->data = semoe_xrealloc(t->data, t->cap);
    }
}

/* A sample value as Prometheus writes it: NaN, +Inf and -Inf by name. */
static void s_value(s_text_t *t, double v)
{
    if (isnan(v))
        s_put(t, "NaN");
    else if (isinf(v))
        s_put(t, "%cInf", v > 0 ? '+' : '-');
    else
        s_put(t, "%.15g", v);
}

static void s_metric(s_text_t *t, const char *name, const char *type, const char *help,
                     double value)
{
    s_put(t, "# HELP %s %s\n# TYPE %s %s\n%s ", name, help, name, type, name);
    s_value(t, value);
    s_put(t, "\n");
}

/* A label value with the exposition format's escapes (backslash, quote, newline). */
static void s_label(s_text_t *t, const char *v)
{
    while (*v) {
        size_t n = strcspn(v, "\\\"\n");
        s_put(t, "%.*s", (int)n, v);
        v += n;
        if (*v) {
            s_put(t, "\\%c", *v == '\n' ? 'n' : *v);
            v++;
        }
    }
}

/* The load imbalance and the reconfigurations: by kind (each counted once: "mixed" when its
 * reasons were of several kinds), and the duration of the last. */
static void s_rebalances(s_text_t *t, const status_view_t *v)
{
    s_metric(t, "semoe_load_imbalance", "gauge",
             "The last step's load imbalance as the workers reported it: the most tokens any "
             "worker's expert copies took over the mean over workers (NaN: unknown).",
             v->imbalance);
    s_metric(t, "semoe_load_imbalance_smoothed", "gauge",
             "The placement's imbalance under the smoothed loads, layer by layer, as the "
             "rebalancing rule sees it (NaN: no loads yet).", v->imbalance_smoothed);
    s_put(t, "# HELP semoe_rebalances_total Reconfigurations done (PAUSE or change to RESUME), by "
             "the kind of change that made them.\n# TYPE semoe_rebalances_total counter\n");
    for (int k = 0; k < STATUS_WHY_KINDS; k++)
        s_put(t, "semoe_rebalances_total{reason=\"%s\"} %" PRIu64 "\n", status_why_names[k],
              v->rebalances_by_kind ? v->rebalances_by_kind[k] : 0);
    double last = v->n_rebalances ? v->rebalances[v->n_rebalances - 1].duration_ms / 1000.0 : NAN;
    s_metric(t, "semoe_rebalance_last_duration_seconds", "gauge",
             "The last reconfiguration, from the change (or its PAUSE) to RESUME (NaN: none yet).",
             last);
}

char *metrics_format(const status_view_t *v, size_t *len)
{
    s_text_t t = {.cap = 2048};
    t.data = semoe_xmalloc(t.cap);
    t.data[0] = 0;
    s_put(&t, "# HELP semoe_workers Workers in the job, by state.\n"
              "# TYPE semoe_workers gauge\n"
              "semoe_workers{state=\"active\"} %u\nsemoe_workers{state=\"syncing\"} %u\n",
          status_workers_in(v, MEMBER_ACTIVE), status_workers_in(v, MEMBER_SYNCING));
    s_metric(&t, "semoe_generation", "gauge", "The current plan generation.",
             (double)v->generation);
    s_metric(&t, "semoe_step", "gauge", "The most training steps a worker reported done.",
             (double)v->step);
    s_metric(&t, "semoe_loss", "gauge",
             "Training loss (cross-entropy + aux) of the latest step reported (NaN: none yet).",
             v->loss);
    s_metric(&t, "semoe_eval_loss", "gauge",
             "Held-out cross-entropy of the latest evaluation (NaN: none yet).", v->eval_loss);
    s_metric(&t, "semoe_tokens_per_second", "gauge",
             "Training tokens per second, summed over the workers that are training.",
             v->tokens_per_s);
    s_put(&t, "# HELP semoe_worker_tokens_per_second A worker's training tokens per second over "
              "its last step.\n# TYPE semoe_worker_tokens_per_second gauge\n");
    for (const member_t *m = members_first(v->members); m; m = m->next) {
        s_put(&t, "semoe_worker_tokens_per_second{worker=\"");
        s_label(&t, m->id);
        s_put(&t, "\"} ");
        s_value(&t, m->tokens_per_s);
        s_put(&t, "\n");
    }
    s_metric(&t, "semoe_pending_acks", "gauge", "Workers that have not acked the current plan.",
             v->pending_acks);
    s_metric(&t, "semoe_heartbeats_total", "counter", "Heartbeats received from workers.",
             (double)v->counters.heartbeats);
    s_metric(&t, "semoe_protocol_errors_total", "counter",
             "Messages refused as malformed or out of protocol.",
             (double)v->counters.protocol_errors);
    s_metric(&t, "semoe_joins_total", "counter", "Workers that joined.",
             (double)v->counters.joins);
    s_metric(&t, "semoe_leaves_total", "counter", "Workers that left.",
             (double)v->counters.leaves);
    s_metric(&t, "semoe_deaths_total", "counter", "Workers declared dead (heartbeats missed).",
             (double)v->counters.deaths);
    s_metric(&t, "semoe_generations_total", "counter", "Plan generations opened.",
             (double)v->counters.generations);
    s_metric(&t, "semoe_reconfig_seconds", "gauge",
             "Last reconfiguration: from the membership change to every worker's ack (0: none yet).",
             v->last_reconfig_ms < 0 ? 0.0 : v->last_reconfig_ms / 1000.0);
    s_metric(&t, "semoe_uptime_seconds", "gauge", "Seconds since the coordinator started.",
             (double)v->uptime_ms / 1000.0);
    s_metric(&t, "semoe_restarts_total", "counter",
             "Times the job's coordinator was started again on its saved state (--state-dir).",
             (double)v->counters.restarts);
    s_rebalances(&t, v);
    *len = t.len;
    return t.data;
}
