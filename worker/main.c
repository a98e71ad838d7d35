/* semoe-worker: one per device. Reads its flags, probes the device, starts the control actor
 * (worker/control.c) and waits for SIGTERM/SIGINT (send LEAVE, exit 0) or for the coordinator's
 * STOP (exit 0). docs/control-plane.md lists the flags. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/actor.h"
#include "actors/fmt.h"
#include "actors/log.h"
#include "worker/control.h"
#include "worker/device.h"

#define S_EXIT_USAGE 2

static const char s_usage[] =
    "usage: semoe-worker [--coordinator tcp://127.0.0.1:5555] [--device cpu|cuda:N] [--id NAME]\n"
    "                    [--data-bind tcp://127.0.0.1:*] [--advertise HOST]\n"
    "                    [--reconnect-max-ms 32000] [--threads N] [--metrics-log FILE]\n"
    "                    [--log-level info] [--help]\n"
    "\n"
    "Joins a semoe coordinator and trains the job it hands out: the experts and the share of\n"
    "each batch its plans give this worker. Reconnects with backoff when the coordinator goes\n"
    "away. SIGTERM or SIGINT: leave the job and exit 0.\n"
    "\n"
    "  --coordinator E       the coordinator's control endpoint (default tcp://127.0.0.1:5555)\n"
    "  --device D            cpu, or cuda:N for GPU N (default cpu)\n"
    "  --id NAME             this worker's name, unique in the job (default HOST:PID)\n"
    "  --data-bind E         where peers reach this worker's data socket\n"
    "                        (default tcp://127.0.0.1:*, an ephemeral loopback port)\n"
    "  --advertise HOST      the host name or address other hosts use to reach this worker;\n"
    "                        needed with --data-bind on a wildcard or non-loopback address\n"
    "  --reconnect-max-ms N  longest wait between reconnects: 1 s doubling up to N\n"
    "                        (default 32000)\n"
    "  --threads N           BLAS threads for this worker's compute, 1..1024 (default 1: one\n"
    "                        worker per core)\n"
    "  --metrics-log FILE    append one JSON line per training step to FILE (step, loss,\n"
    "                        held-out loss, tokens/s, time split, load per expert)\n"
    "  --log-level L         error, warn, info or debug (default info)\n"
    "  --help                this text\n";

typedef struct {
    const char *coordinator;
    const char *device;
    const char *id;
    const char *data_bind;
    const char *advertise;
    int reconnect_max_ms;
    int threads;
    const char *metrics_log;
    int log_level;
} s_flags_t;

/* Prints one line, "semoe-worker: WHAT (see semoe-worker --help)", and returns exit code 2. */
static int s_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int s_usage_error(const char *fmt, ...)
{
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    fprintf(stderr, "semoe-worker: %s (see semoe-worker --help)\n", what);
    return S_EXIT_USAGE;
}

/* A ZeroMQ endpoint we can use across processes: tcp://HOST:PORT (PORT 1..65535, or * and 0
 * when binding) or ipc://PATH. */
static bool s_endpoint_ok(const char *ep, bool bind)
{
    const char *port;
    if (strlen(ep) > PROTO_MAX_ENDPOINT || !fmt_endpoint_split(ep, &port))
        return false;
    if (!port) /* ipc:// */
        return true;
    if (bind && strcmp(port, "*") == 0)
        return true;
    if (!*port || strlen(port) > 5 || strspn(port, "0123456789") != strlen(port))
        return false;
    long n = strtol(port, NULL, 10);
    return n <= 65535 && (n > 0 || bind);
}

static bool s_name_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] <= ' ' || s[i] == 0x7f)
            return false;
    return true;
}

/* A decimal integer in [lo, hi], the whole of s. */
static bool s_int_in(const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || *end || end == s || v < lo || v > hi)
        return false;
    *out = (int)v;
    return true;
}

/* Parses argv into *f; returns -1 to go on, or the exit code. */
static int s_parse(int argc, char **argv, s_flags_t *f)
{
    enum { O_COORD = 1, O_DEVICE, O_ID, O_DATA, O_ADV, O_RECONNECT, O_THREADS, O_METRICS, O_LOG,
           O_HELP };
    static const struct option opts[] = {
        {"coordinator", required_argument, 0, O_COORD},
        {"device", required_argument, 0, O_DEVICE},
        {"id", required_argument, 0, O_ID},
        {"data-bind", required_argument, 0, O_DATA},
        {"advertise", required_argument, 0, O_ADV},
        {"reconnect-max-ms", required_argument, 0, O_RECONNECT},
        {"threads", required_argument, 0, O_THREADS},
        {"metrics-log", required_argument, 0, O_METRICS},
        {"log-level", required_argument, 0, O_LOG},
        {"help", no_argument, 0, O_HELP},
        {0, 0, 0, 0},
    };
    *f = (s_flags_t){.coordinator = "tcp://127.0.0.1:5555", .device = "cpu",
                     .data_bind = "tcp://127.0.0.1:*", .reconnect_max_ms = 32000, .threads = 1,
                     .log_level = LOG_INFO};
    opterr = 0;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_COORD: f->coordinator = optarg; break;
        case O_DEVICE: f->device = optarg; break;
        case O_ID: f->id = optarg; break;
        case O_DATA: f->data_bind = optarg; break;
        case O_ADV: f->advertise = optarg; break;
        case O_RECONNECT:
            if (!s_int_in(optarg, 1, 3600000, &f->reconnect_max_ms))
                return s_usage_error("--reconnect-max-ms %s: expected milliseconds, 1..3600000",
                                     optarg);
            break;
        case O_THREADS:
            if (!s_int_in(optarg, 1, 1024, &f->threads))
                return s_usage_error("--threads %s: expected a count, 1..1024", optarg);
            break;
        case O_METRICS:
            if (!*optarg)
                return s_usage_error("--metrics-log needs a file name");
            f->metrics_log = optarg;
            break;
        case O_LOG:
            f->log_level = log_level_parse(optarg);
            if (f->log_level < 0)
                return s_usage_error("--log-level %s: expected error, warn, info or debug",
                                     optarg);
            break;
        case 'h':
        case O_HELP: fputs(s_usage, stdout); return 0;
        case ':': return s_usage_error("%s needs a value", argv[optind - 1]);
        default:
            if (optopt)
                return s_usage_error("unknown flag -%c", optopt);
            return s_usage_error("unknown flag %s", argv[optind - 1]);
        }
    }
    if (optind < argc)
        return s_usage_error("unexpected argument %s", argv[optind]);
    if (!s_endpoint_ok(f->coordinator, false))
        return s_usage_error("--coordinator %s: expected tcp://HOST:PORT or ipc://PATH",
                             f->coordinator);
    if (!s_endpoint_ok(f->data_bind, true))
        return s_usage_error("--data-bind %s: expected tcp://HOST:PORT (PORT may be *) or "
                             "ipc://PATH", f->data_bind);
    if (f->id && !s_name_ok(f->id, PROTO_MAX_NAME))
        return s_usage_error("--id '%s': expected 1..%d characters without spaces", f->id,
                             PROTO_MAX_NAME);
    if (f->advertise && !s_name_ok(f->advertise, PROTO_MAX_HOST - 16))
        return s_usage_error("--advertise '%s': expected a host name or address",
                             f->advertise);
    return -1;
}

/* SIGTERM and SIGINT become a byte on this pipe. A handler, not a signalfd: a signalfd sees a
 * signal only while every thread blocks it, and libraries start threads of their own before
 * main runs (OpenBLAS's pool, from its constructor), where the default action would kill the
 * process. A handler runs on whichever thread the kernel picks. */
static int s_sig_pipe[2] = {-1, -1};

static void s_on_signal(int sig)
{
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    ssize_t n = write(s_sig_pipe[1], &b, 1);
    (void)n; /* a full pipe already holds a signal to act on */
    errno = saved;
}

static bool s_catch_signals(void)
{
    if (pipe2(s_sig_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
        return false;
    struct sigaction sa = {0};
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    return sigaction(SIGTERM, &sa, NULL) == 0 && sigaction(SIGINT, &sa, NULL) == 0;
}

/* Waits for a signal, the actor's STOPPED or its LEFT; returns the signal's name, "STOP" or
 * "LEFT". */
static const char *s_wait(actor_t *control, int sfd)
{
    for (;;) {
        zmq_pollitem_t items[2] = {{actor_pipe(control), 0, ZMQ_POLLIN, 0},
                                   {NULL, sfd, ZMQ_POLLIN, 0}};
        if (zmq_poll(items, 2, -1) == -1) {
            if (zmq_errno() == EINTR)
                continue;
            log_error("zmq_poll: %s", zmq_strerror(zmq_errno()));
            return "a failure";
        }
        if (items[1].revents & ZMQ_POLLIN) {
            unsigned char b;
            if (read(sfd, &b, 1) == 1)
                return b == SIGINT ? "SIGINT" : "SIGTERM";
        }
        if (items[0].revents & ZMQ_POLLIN) {
            char *what = actor_recv_str(actor_pipe(control));
            const char *done = !what                       ? NULL
                               : strcmp(what, "STOPPED") == 0 ? "STOP"
                               : strcmp(what, "LEFT") == 0    ? "LEFT"
                                                             : NULL;
            free(what);
            if (done)
                return done;
        }
    }
}

int main(int argc, char **argv)
{
    s_flags_t f;
    int code = s_parse(argc, argv, &f);
    if (code >= 0)
        return code;

    char host[PROTO_MAX_HOST + 1] = "localhost";
    if (gethostname(host, sizeof host) != 0)
        snprintf(host, sizeof host, "localhost");
    host[sizeof host - 1] = 0;
    char id[PROTO_MAX_NAME + 1];
    if (f.id)
        snprintf(id, sizeof id, "%s", f.id);
    else
        snprintf(id, sizeof id, "%.100s:%ld", host, (long)getpid());

    worker_control_config_t cfg = {
        .coordinator = f.coordinator, .id = id, .host = f.advertise ? f.advertise : host,
        .advertise = f.advertise, .data_bind = f.data_bind,
        .reconnect_max_ms = f.reconnect_max_ms, .threads = f.threads,
        .metrics_log = f.metrics_log};
    semoe_rc rc = worker_device_probe(f.device, ".", &cfg.device);
    if (rc != SEMOE_OK) {
        fprintf(stderr, "semoe-worker: %s\n", semoe_err_msg());
        return rc == SEMOE_EINVAL ? S_EXIT_USAGE : 1;
    }

    char role[PROTO_MAX_NAME + 16];
    snprintf(role, sizeof role, "worker %s", id);
    log_init(role, (log_level_t)f.log_level);

    /* Actor threads block every signal (actors/actor.c) and so do ZeroMQ's: a SIGTERM lands on
     * this thread or on a library's own (s_on_signal), and reaches s_wait through the pipe. */
    signal(SIGPIPE, SIG_IGN);
    if (!s_catch_signals()) {
        fprintf(stderr, "semoe-worker: cannot catch SIGTERM: %s\n", strerror(errno));
        return 1;
    }
    int sfd = s_sig_pipe[0];

    void *ctx = zmq_ctx_new();
    if (!ctx) {
        fprintf(stderr, "semoe-worker: zmq_ctx_new: %s\n", zmq_strerror(zmq_errno()));
        return 1;
    }
    cfg.ctx = ctx;
    log_info("device %s (%s): %.1f GiB HBM, %.1f GiB host RAM, %.1f GiB free on disk",
             f.device, cfg.device.name, cfg.device.total[PROTO_TIER_HBM] / 1073741824.0,
             cfg.device.total[PROTO_TIER_HOST] / 1073741824.0,
             cfg.device.total[PROTO_TIER_SSD] / 1073741824.0);
    actor_t *control = actor_new(ctx, worker_control_actor, &cfg);
    if (!control) {
        fprintf(stderr, "semoe-worker: %s\n", cfg.error[0] ? cfg.error : semoe_err_msg());
        zmq_ctx_term(ctx);
        return cfg.error[0] ? cfg.error_exit : 1;
    }

    const char *why = s_wait(control, sfd);
    if (strcmp(why, "SIGTERM") == 0 || strcmp(why, "SIGINT") == 0) {
        /* leave: after handing the experts over when training (bounded by the control actor);
         * a second signal leaves at once */
        log_info("%s: leaving", why);
        actor_send_str(actor_pipe(control), "LEAVE", ZMQ_SNDMORE);
        actor_send_str(actor_pipe(control), why, 0);
        const char *then = s_wait(control, sfd);
        if (strcmp(then, "SIGTERM") == 0 || strcmp(then, "SIGINT") == 0) {
            actor_send_str(actor_pipe(control), "LEAVE", ZMQ_SNDMORE);
            actor_send_str(actor_pipe(control), then, 0);
        }
    }
    actor_destroy(&control);
    zmq_ctx_term(ctx); /* waits, at most the LEAVE's linger, for the LEAVE to go out */
    log_info("stopped (%s)", why ? why : "?");
    return why && strcmp(why, "a failure") == 0 ? 1 : 0;
}
