/* `semoe status`: asks the coordinator's status socket (REP, JSON; docs/control-plane.md) and
 * prints the reply as it came (--json) or as tables: the job, the workers, the experts per
 * layer. --watch asks again every few seconds until Ctrl-C. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/fmt.h"
#include "cli/cli.h"

#define S_MAX_REPLY ((int64_t)64 << 20) /* a status reply of 65536 workers is a few MB */
#define S_WIDTH 100                     /* wrap the experts table here */

static volatile sig_atomic_t s_interrupted;

static void s_on_signal(int sig)
{
    (void)sig;
    s_interrupted = 1;
}

/* --- reading a reply ----------------------------------------------------------------------- */

double cli_json_num(const cJSON *obj, const char *key, double def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : def;
}

const char *cli_json_str(const cJSON *obj, const char *key, const char *def)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) && v->valuestring ? v->valuestring : def;
}

/* --- asking -------------------------------------------------------------------------------- */

semoe_rc cli_status_fetch(void *ctx, const char *endpoint, int timeout_ms, cJSON **reply,
                          char **text)
{
    *reply = NULL;
    if (text)
        *text = NULL;
    void *req = zmq_socket(ctx, ZMQ_REQ);
    if (!req)
        return semoe_err(SEMOE_EIO, "REQ socket: %s", zmq_strerror(zmq_errno()));
    int linger = 0;
    int64_t max = S_MAX_REPLY;
    zmq_setsockopt(req, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(req, ZMQ_MAXMSGSIZE, &max, sizeof max);
    int ipv6 = strchr(endpoint, '[') != NULL; /* tcp://[::1]:5556 */
    zmq_setsockopt(req, ZMQ_IPV6, &ipv6, sizeof ipv6);
    semoe_rc rc = SEMOE_OK;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_connect(req, endpoint) != 0) {
        rc = semoe_err(SEMOE_EINVAL, "%s: %s", endpoint, zmq_strerror(zmq_errno()));
        goto done;
    }
    /* connect() made the pipe already, so the request waits in it until the peer is up */
    if (zmq_send(req, "status", 6, ZMQ_DONTWAIT) != 6) {
        rc = semoe_err(SEMOE_EIO, "%s: send: %s", endpoint, zmq_strerror(zmq_errno()));
        goto done;
    }
    int n = cli_wait(req, ZMQ_POLLIN, cli_now_ms() + timeout_ms, &s_interrupted);
    if (n == -1 && zmq_errno() == EINTR) {
        rc = semoe_err(SEMOE_ESTOPPED, "interrupted");
        goto done;
    }
    if (n == -1) {
        rc = semoe_err(SEMOE_EIO, "%s: %s", endpoint, zmq_strerror(zmq_errno()));
        goto done;
    }
    if (n == 0) {
        rc = semoe_err(SEMOE_ETIMEDOUT, "no answer from %s: is semoe-coordinator running?",
                       endpoint);
        goto done;
    }
    if (zmq_msg_recv(&msg, req, 0) == -1) {
        rc = semoe_err(SEMOE_EIO, "%s: receive: %s", endpoint, zmq_strerror(zmq_errno()));
        goto done;
    }
    cJSON *json = cJSON_ParseWithLength(zmq_msg_data(&msg), zmq_msg_size(&msg));
    if (!cJSON_IsObject(json)) {
        cJSON_Delete(json);
        rc = semoe_err(SEMOE_EPROTO, "%s: the reply is not a JSON object (is this the status "
                       "endpoint?)", endpoint);
        goto done;
    }
    const char *error = cli_json_str(json, "error", NULL);
    if (error) {
        rc = semoe_err(SEMOE_EPROTO, "%s: the coordinator says: %s", endpoint, error);
        cJSON_Delete(json);
        goto done;
    }
    *reply = json;
    if (text) {
        *text = semoe_xmalloc(zmq_msg_size(&msg) + 1);
        memcpy(*text, zmq_msg_data(&msg), zmq_msg_size(&msg));
        (*text)[zmq_msg_size(&msg)] = 0;
    }
done:
    zmq_msg_close(&msg);
    zmq_close(req);
    return rc;
}

/* --- printing ------------------------------------------------------------------------------ */

/* Bytes as "0", "512B", "25M", "1.2T". */
static void s_bytes(double b, char *buf, size_t n)
{
    static const char units[] = "BKMGTPE";
    int u = 0;
    while (b >= 1024 && u < 6) {
        b /= 1024;
        u++;
    }
    if (b == 0)
        snprintf(buf, n, "0");
    else if (b < 10 && u > 0)
        snprintf(buf, n, "%.1f%c", b, units[u]);
    else
        snprintf(buf, n, "%.0f%c", b, units[u]);
}

/* Milliseconds as "140 ms", "2.1 s", "3 min", "2.5 h". */
static void s_duration(double ms, char *buf, size_t n)
{
    if (ms < 1000)
        snprintf(buf, n, "%.0f ms", ms);
    else if (ms < 60000)
        snprintf(buf, n, "%.1f s", ms / 1000);
    else if (ms < 3600000)
        snprintf(buf, n, "%.0f min", ms / 60000);
    else
        snprintf(buf, n, "%.1f h", ms / 3600000);
}

static int s_cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* The ids of a JSON array of numbers, ascending, as "8: 0-1,8-9" (count first), cut with "..."
 * when longer than the buffer. */
static void s_expert_list(const cJSON *arr, char *buf, size_t n)
{
    int count = cJSON_GetArraySize(arr);
    uint32_t *ids = semoe_xcalloc((size_t)count, sizeof *ids);
    int k = 0;
    const cJSON *v;
    cJSON_ArrayForEach(v, arr)
        if (cJSON_IsNumber(v) && v->valuedouble >= 0)
            ids[k++] = (uint32_t)v->valuedouble;
    qsort(ids, (size_t)k, sizeof *ids, s_cmp_u32);
    size_t len = (size_t)snprintf(buf, n, "%d%s", k, k ? ": " : "");
    if (len < n)
        fmt_ranges(ids, (size_t)k, buf + len, n - len);
    free(ids);
}

/* "host 25M/503G hbm 1.2G/141G": used/total of each tier with a total. */
static void s_memory(const cJSON *mem, char *buf, size_t n)
{
    static const char *tiers[] = {"hbm", "host", "ssd"};
    size_t len = 0;
    buf[0] = 0;
    for (int t = 0; t < 3 && len < n; t++) {
        const cJSON *tier = cJSON_GetObjectItemCaseSensitive(mem, tiers[t]);
        double total = cli_json_num(tier, "total", 0), used = cli_json_num(tier, "used", 0);
        if (total <= 0 && used <= 0)
            continue;
        char u[16], tt[16];
        s_bytes(used, u, sizeof u);
        s_bytes(total, tt, sizeof tt);
        len += (size_t)snprintf(buf + len, n - len, "%s%s %s/%s", len ? " " : "", tiers[t], u, tt);
    }
    if (!buf[0])
        snprintf(buf, n, "-");
}

enum { C_ID, C_RANK, C_STATE, C_HOST, C_DEVICE, C_EXPERTS, C_BATCH, C_TOKENS, C_MEMORY,
       C_HEARTBEAT, C_N };

static void s_print_workers(const cJSON *workers, FILE *out)
{
    static const char *heads[C_N] = {"WORKER", "RANK", "STATE", "HOST", "DEVICE", "EXPERTS",
                                     "BATCH", "TOKENS/S", "MEMORY (used/total)", "HEARTBEAT"};
    int n = cJSON_GetArraySize(workers);
    typedef char s_cell_t[C_N][96];
    s_cell_t *rows = semoe_xcalloc((size_t)n + 1, sizeof *rows);
    size_t width[C_N] = {0};
    for (int c = 0; c < C_N; c++) {
        snprintf(rows[0][c], sizeof rows[0][c], "%s", heads[c]);
        width[c] = strlen(heads[c]);
    }
    int r = 1;
    const cJSON *w;
    cJSON_ArrayForEach(w, workers) {
        char(*row)[96] = rows[r++];
        snprintf(row[C_ID], 96, "%s", cli_json_str(w, "id", "?"));
        double rank = cli_json_num(w, "rank", -1);
        if (rank >= 0)
            snprintf(row[C_RANK], 96, "%.0f", rank);
        else
            snprintf(row[C_RANK], 96, "-");
        snprintf(row[C_STATE], 96, "%s", cli_json_str(w, "state", "?"));
        snprintf(row[C_HOST], 96, "%s", cli_json_str(w, "host", "?"));
        snprintf(row[C_DEVICE], 96, "%s", cli_json_str(w, "device", "?"));
        s_expert_list(cJSON_GetObjectItemCaseSensitive(w, "experts"), row[C_EXPERTS], 40);
        const cJSON *batch = cJSON_GetObjectItemCaseSensitive(w, "batch");
        const cJSON *lo = cJSON_GetArrayItem(batch, 0), *hi = cJSON_GetArrayItem(batch, 1);
        if (cJSON_IsNumber(lo) && cJSON_IsNumber(hi))
            snprintf(row[C_BATCH], 96, "[%.0f,%.0f)", lo->valuedouble, hi->valuedouble);
        else
            snprintf(row[C_BATCH], 96, "-");
        const char *phase = cli_json_str(w, "phase", "idle");
        if (strcmp(phase, "training") == 0)
            snprintf(row[C_TOKENS], 96, "%.0f", cli_json_num(w, "tokens_per_s", 0));
        else
            snprintf(row[C_TOKENS], 96, "%s", phase); /* idle, finished, failed */
        s_memory(cJSON_GetObjectItemCaseSensitive(w, "memory"), row[C_MEMORY], 96);
        double age = cli_json_num(w, "heartbeat_age_ms", -1);
        if (age >= 0) {
            char d[32];
            s_duration(age, d, sizeof d);
            snprintf(row[C_HEARTBEAT], 96, "%s ago", d);
        } else {
            snprintf(row[C_HEARTBEAT], 96, "-");
        }
        for (int c = 0; c < C_N; c++)
            if (strlen(row[c]) > width[c])
                width[c] = strlen(row[c]);
    }
    for (int i = 0; i < r; i++) {
        fprintf(out, " ");
        for (int c = 0; c + 1 < C_N; c++)
            fprintf(out, " %-*s", (int)width[c], rows[i][c]);
        fprintf(out, " %s\n", rows[i][C_N - 1]);
    }
    free(rows);
}

/* The cell of one expert: "5→w2", "5→w2+w1", "5→(none)", with " (120)" tokens when loads
 * are known. Returns its width in columns (the arrow is 3 bytes, 1 column). */
static int s_expert_cell(const cJSON *x, int j, bool loads, char *item, size_t n)
{
    int len = snprintf(item, n, "%d→", j);
    const cJSON *h;
    int k = 0;
    cJSON_ArrayForEach(h, cJSON_GetObjectItemCaseSensitive(x, "workers")) {
        if (cJSON_IsString(h) && len < (int)n)
            len += snprintf(item + len, n - (size_t)len, "%s%s", k ? "+" : "", h->valuestring);
        k++;
    }
    if (k == 0 && len < (int)n)
        len += snprintf(item + len, n - (size_t)len, "(none)");
    if (loads && len < (int)n)
        len += snprintf(item + len, n - (size_t)len, " (%.0f)", cli_json_num(x, "load", 0));
    return (len < (int)n ? len : (int)n - 1) - 2;
}

/* One line per layer, "layer 0: 0→w1  1→w1  2→w2", cells in columns, wrapped at S_WIDTH. */
static void s_print_experts(const cJSON *status, FILE *out)
{
    const cJSON *experts = cJSON_GetObjectItemCaseSensitive(status, "experts");
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(status, "model");
    int layers = (int)cli_json_num(model, "num_layers", 0);
    int per = (int)cli_json_num(model, "num_experts", 0);
    int n = cJSON_GetArraySize(experts);
    if (n == 0) {
        fprintf(out, "  (no experts placed yet)\n");
        return;
    }
    /* entries by id, so the table does not depend on the reply's order */
    const cJSON **byid = semoe_xcalloc((size_t)n, sizeof *byid);
    const cJSON *e;
    cJSON_ArrayForEach(e, experts) {
        double id = cli_json_num(e, "id", -1);
        if (id >= 0 && id < n)
            byid[(int)id] = e;
    }
    if (layers <= 0 || per <= 0 || layers * per != n) {
        layers = 1;
        per = n;
    }
    bool loads = false;
    for (int i = 0; i < n; i++)
        loads = loads || (byid[i] && cli_json_num(byid[i], "load", 0) > 0);
    char item[256];
    int cell = 1;
    for (int i = 0; i < n; i++) {
        int w = s_expert_cell(byid[i], i % per, loads, item, sizeof item);
        cell = w > cell ? w : cell;
    }
    char head[32];
    int indent = snprintf(head, sizeof head, "  layer %d:", layers - 1);
    int per_line = (S_WIDTH - indent) / (cell + 2);
    per_line = per_line > 0 ? per_line : 1;
    fprintf(out, "  experts per layer (expert→worker%s):\n", loads ? ", tokens/step" : "");
    for (int l = 0; l < layers; l++) {
        snprintf(head, sizeof head, "  layer %d:", l);
        fprintf(out, "%-*s", indent, head);
        for (int j = 0; j < per; j++) {
            if (j > 0 && j % per_line == 0)
                fprintf(out, "\n%*s", indent, "");
            int w = s_expert_cell(byid[l * per + j], j, loads, item, sizeof item);
            bool last = j + 1 == per || (j + 1) % per_line == 0;
            fprintf(out, "  %s%*s", item, last ? 0 : cell - w, "");
        }
        fprintf(out, "\n");
    }
    free(byid);
}

/* A number with 2 decimals, or "-" when it is not one (null). */
static void s_ratio(const cJSON *obj, const char *key, char *buf, size_t n)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    if (cJSON_IsNumber(v))
        snprintf(buf, n, "%.2f", v->valuedouble);
    else
        snprintf(buf, n, "-");
}

/* The last few reconfigurations, newest last: when, why, what moved, how long it took. */
static void s_print_rebalances(const cJSON *st, FILE *out)
{
    enum { S_SHOWN = 5 };
    const cJSON *arr = cJSON_GetObjectItemCaseSensitive(st, "rebalances");
    int n = cJSON_GetArraySize(arr);
    if (n == 0)
        return;
    fprintf(out, "  reconfigurations (the last %d of %d kept):\n", n < S_SHOWN ? n : S_SHOWN, n);
    for (int i = n > S_SHOWN ? n - S_SHOWN : 0; i < n; i++) {
        const cJSON *r = cJSON_GetArrayItem(arr, i);
        char when[32] = "?", before[16], after[16], took[32], bytes[32] = "";
        time_t t = (time_t)cli_json_num(r, "time", 0);
        struct tm tm;
        if (t > 0 && localtime_r(&t, &tm))
            strftime(when, sizeof when, "%H:%M:%S", &tm);
        s_ratio(r, "before", before, sizeof before);
        s_ratio(r, "after", after, sizeof after);
        s_duration(cli_json_num(r, "duration_ms", 0), took, sizeof took);
        double b = cli_json_num(r, "bytes", -1);
        if (b >= 0) { // null until the workers report what they sent
            char sz[16];
            s_bytes(b, sz, sizeof sz);
            snprintf(bytes, sizeof bytes, " (%s)", sz);
        }
        fprintf(out, "    %s  generation %.0f at step %.0f: %s; %.0f copies moved%s, "
                "imbalance %s -> %s, took %s\n", when, cli_json_num(r, "generation", 0),
                cli_json_num(r, "at_step", 0), cli_json_str(r, "why", "?"),
                cli_json_num(r, "moved", 0), bytes, before, after, took);
    }
}

void cli_status_print(const cJSON *st, FILE *out)
{
    char loss[32] = "-", eval[64] = "-", reconfig[32] = "-", up[32];
    const cJSON *lv = cJSON_GetObjectItemCaseSensitive(st, "loss");
    if (cJSON_IsNumber(lv))
        snprintf(loss, sizeof loss, "%.4f", lv->valuedouble);
    const cJSON *ev = cJSON_GetObjectItemCaseSensitive(st, "eval_loss");
    if (cJSON_IsNumber(ev))
        snprintf(eval, sizeof eval, "%.4f (step %.0f)", ev->valuedouble,
                 cli_json_num(st, "eval_step", 0));
    double rc = cli_json_num(st, "last_reconfig_ms", -1);
    if (rc >= 0)
        snprintf(reconfig, sizeof reconfig, "%.1f ms", rc);
    s_duration(cli_json_num(st, "uptime_ms", 0), up, sizeof up);
    const cJSON *workers = cJSON_GetObjectItemCaseSensitive(st, "workers");
    int n = cJSON_GetArraySize(workers), active = 0;
    const cJSON *w;
    cJSON_ArrayForEach(w, workers)
        active += strcmp(cli_json_str(w, "state", ""), "active") == 0;
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(st, "model");

    fprintf(out, "run %s  generation %.0f  %s  last reconfiguration %s  up %s\n",
            cli_json_str(st, "run_id", "?"), cli_json_num(st, "generation", 0),
            cli_json_str(st, "state", "?"), reconfig, up);
    fprintf(out, "phase %s  step %.0f of %.0f  loss %s  held-out loss %s  tokens/s %.0f\n",
            cli_json_str(st, "phase", "?"), cli_json_num(st, "step", 0),
            cli_json_num(st, "target_steps", 0), loss, eval, cli_json_num(st, "tokens_per_s", 0));
    fprintf(out, "model %.0f layers x %.0f experts (top-%.0f), global batch %.0f, "
            "heartbeat %.0f ms x %.0f, %d worker%s (%d active)\n",
            cli_json_num(model, "num_layers", 0), cli_json_num(model, "num_experts", 0),
            cli_json_num(model, "top_k", 0), cli_json_num(st, "global_batch", 0),
            cli_json_num(st, "heartbeat_ms", 0), cli_json_num(st, "liveness", 0), n,
            n == 1 ? "" : "s", active);
    char now[16], smoothed[16];
    const cJSON *imb = cJSON_GetObjectItemCaseSensitive(st, "imbalance");
    s_ratio(imb, "current", now, sizeof now);
    s_ratio(imb, "smoothed", smoothed, sizeof smoothed);
    fprintf(out, "imbalance %s (smoothed %s)  reconfiguration %s\n", now, smoothed,
            cli_json_str(st, "reconfig", "?"));
    s_print_rebalances(st, out);
    fprintf(out, "\n");
    if (n > 0)
        s_print_workers(workers, out);
    else
        fprintf(out, "  (no workers: start some with semoe-worker --coordinator ENDPOINT)\n");
    fprintf(out, "\n");
    s_print_experts(st, out);
}

/* --- the command --------------------------------------------------------------------------- */

static const char s_usage[] =
    "usage: semoe status [--endpoint tcp://127.0.0.1:5556] [--json] [--watch [SECONDS]]\n"
    "                    [--timeout-ms 2000]\n"
    "\n"
    "Asks the coordinator's status socket and prints the job, its workers and where every\n"
    "expert lives.\n"
    "\n"
    "  --endpoint E     the coordinator's status endpoint (default tcp://127.0.0.1:5556)\n"
    "  --json           print the coordinator's JSON reply as it is\n"
    "  --watch [N]      ask again every N seconds (default 2) until Ctrl-C\n"
    "  --timeout-ms T   how long to wait for an answer (default 2000)\n";

int cli_status_main(int argc, char **argv)
{
    enum { O_ENDPOINT = 1, O_JSON, O_WATCH, O_TIMEOUT };
    static const struct option opts[] = {
        {"endpoint", required_argument, 0, O_ENDPOINT},
        {"json", no_argument, 0, O_JSON},
        {"watch", no_argument, 0, O_WATCH},
        {"timeout-ms", required_argument, 0, O_TIMEOUT},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *endpoint = CLI_STATUS_ENDPOINT;
    bool json = false;
    long watch = 0, timeout_ms = 2000;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_ENDPOINT: endpoint = optarg; break;
        case O_JSON: json = true; break;
        case O_WATCH:
            watch = 2;
            /* an optional separate value: --watch 5 */
            if (optind < argc && cli_parse_int(argv[optind], 1, 86400, &watch))
                optind++;
            else if (optind < argc && argv[optind][0] != '-') {
                fprintf(stderr, "semoe status: --watch %s: expected seconds, 1..86400\n",
                        argv[optind]);
                return CLI_EXIT_USAGE;
            }
            break;
        case O_TIMEOUT:
            if (!cli_flag_timeout_ms("status", optarg, &timeout_ms))
                return CLI_EXIT_USAGE;
            break;
        default: return cli_flags_other("status", c, argv, s_usage);
        }
    }
    if (!cli_flags_end("status", argc, argv) || !cli_flag_endpoint("status", endpoint))
        return CLI_EXIT_USAGE;
    if (watch) { /* Ctrl-C ends the watch with exit 0 */
        struct sigaction sa = {0};
        sa.sa_handler = s_on_signal;
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGTERM, &sa, NULL);
    }

    void *ctx = zmq_ctx_new();
    int code = 0;
    bool tty = isatty(STDOUT_FILENO);
    do {
        cJSON *st = NULL;
        char *text = NULL;
        semoe_rc rc = cli_status_fetch(ctx, endpoint, (int)timeout_ms, &st, &text);
        if (rc == SEMOE_ESTOPPED)
            break;
        if (watch && tty && !json)
            fputs("\033[H\033[2J", stdout); /* a fresh screen each round */
        if (rc != SEMOE_OK) {
            fprintf(stderr, "semoe status: %s\n", semoe_err_msg());
            code = 1;
        } else {
            code = 0;
            if (json)
                printf("%s\n", text);
            else
                cli_status_print(st, stdout);
        }
        fflush(stdout);
        cJSON_Delete(st);
        free(text);
        if (watch && !s_interrupted) {
            struct timespec ts = {.tv_sec = watch};
            nanosleep(&ts, NULL); /* a signal cuts it short */
        }
    } while (watch && !s_interrupted);
    zmq_ctx_term(ctx);
    return watch ? 0 : code;
}
