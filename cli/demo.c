/* `semoe demo`: a coordinator and N CPU workers on this machine. Shows the assignment of experts
 * to workers, kills one worker with SIGKILL, shows the reassignment, then stops everything with
 * STOP. Every wait is bounded and watches the status socket, never a fixed sleep. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "cli/cli.h"

#ifndef SEMOE_SOURCE_DIR
#define SEMOE_SOURCE_DIR "."
#endif

#define S_MAX_WORKERS 64
#define S_JOIN_WAIT_MS 30000   /* for the workers to join and the plan to be acked */
#define S_EXIT_WAIT_MS 15000   /* for every process to exit after STOP */
#define S_POLL_MS 100          /* between two status requests while waiting */

typedef struct {
    char name[32];
    pid_t pid;
    bool running;
    int status;                /* waitpid's, once it is not running */
    char log[PATH_MAX];
} s_child_t;

typedef struct {
    void *ctx;
    const char *job;
    int n_workers;
    char coordinator_bin[PATH_MAX], worker_bin[PATH_MAX];
    char dir[64];              /* the logs: /tmp/semoe-demo-XXXXXX */
    char control[64], status[64], metrics[64];
    s_child_t child[1 + S_MAX_WORKERS]; /* [0] the coordinator, then w1..wN */
    int n_child;
    char failure[512];
    const char *failure_log;   /* the log that tells more about the failure, or NULL */
} s_demo_t;

static volatile sig_atomic_t s_interrupted;

static void s_on_signal(int sig)
{
    (void)sig;
    s_interrupted = 1;
}

static void s_sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

static void s_say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void s_say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
}

static bool s_fail(s_demo_t *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static bool s_fail(s_demo_t *d, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d->failure, sizeof d->failure, fmt, ap);
    va_end(ap);
    return false;
}

/* --- finding things ------------------------------------------------------------------------- */

static bool s_executable(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && access(path, X_OK) == 0;
}

/* The daemons: in --build DIR's tree, else beside this binary's build tree (build/cli/semoe ->
 * build/coordinator/...), else in this binary's directory (an installed bin/). */
static bool s_find_daemon(s_demo_t *d, const char *build, const char *sub, const char *name,
                          char out[PATH_MAX])
{
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = 0;
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = 0;
    char tried[3][PATH_MAX];
    int k = 0;
    if (build) {
        snprintf(tried[k++], PATH_MAX, "%s/%s/%s", build, sub, name);
    } else if (self[0]) {
        snprintf(tried[k++], PATH_MAX, "%.*s/../%s/%s", PATH_MAX / 2, self, sub, name);
        snprintf(tried[k++], PATH_MAX, "%.*s/%s", PATH_MAX / 2, self, name);
    }
    for (int i = 0; i < k; i++)
        if (s_executable(tried[i]) && realpath(tried[i], out))
            return true;
    return s_fail(d, "cannot find %s (looked for %s%s%s); build it, or give --build DIR", name,
                  k ? tried[0] : "it", k > 1 ? " and " : "", k > 1 ? tried[1] : "");
}

static bool s_find_job(s_demo_t *d, const char *job, char out[PATH_MAX])
{
    if (job) {
        if (access(job, R_OK) == 0) {
            snprintf(out, PATH_MAX, "%s", job);
            return true;
        }
        return s_fail(d, "--job %s: %s", job, strerror(errno));
    }
    const char *rel = "deploy/jobs/demo.json";
    if (access(rel, R_OK) == 0) {
        snprintf(out, PATH_MAX, "%s", rel);
        return true;
    }
    snprintf(out, PATH_MAX, "%s/%s", SEMOE_SOURCE_DIR, rel);
    if (access(out, R_OK) == 0)
        return true;
    return s_fail(d, "cannot find the job spec %s (nor %s): run from the source tree or give "
                  "--job FILE", rel, out);
}

/* Three distinct free loopback ports: bound together (so they differ), then released for the
 * coordinator to take. Another process could grab one in between; the coordinator would then
 * fail to bind and say so in its log. */
static bool s_free_ports(s_demo_t *d, int ports[3])
{
    int fds[3] = {-1, -1, -1};
    bool ok = true;
    for (int i = 0; i < 3 && ok; i++) {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        socklen_t len = sizeof a;
        fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        ok = fds[i] >= 0 && bind(fds[i], (struct sockaddr *)&a, sizeof a) == 0 &&
             getsockname(fds[i], (struct sockaddr *)&a, &len) == 0;
        ports[i] = ntohs(a.sin_port);
    }
    if (!ok)
        s_fail(d, "cannot find free loopback ports: %s", strerror(errno));
    for (int i = 0; i < 3; i++)
        if (fds[i] >= 0)
            close(fds[i]);
    return ok;
}

/* --- processes -------------------------------------------------------------------------------- */

/* Starts argv[0] with stdout and stderr into DIR/name.log, in its own process group (so the
 * terminal's Ctrl-C reaches only us, and we decide), and dying with us (PR_SET_PDEATHSIG). */
static bool s_spawn(s_demo_t *d, const char *name, char *const argv[])
{
    s_child_t *c = &d->child[d->n_child];
    snprintf(c->name, sizeof c->name, "%s", name);
    snprintf(c->log, sizeof c->log, "%s/%s.log", d->dir, name);
    int fd = open(c->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return s_fail(d, "%s: %s", c->log, strerror(errno));
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid == 0) {
        setpgid(0, 0);
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(1);
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0)
            dup2(null, 0);
        dup2(fd, 1);
        dup2(fd, 2);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(argv[0], argv);
        dprintf(2, "semoe demo: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(fd);
    if (pid < 0)
        return s_fail(d, "fork: %s", strerror(errno));
    c->pid = pid;
    c->running = true;
    d->n_child++;
    return true;
}

/* Collects children that ended. Returns the first one that ended and was not expected to. */
static s_child_t *s_reap(s_demo_t *d)
{
    s_child_t *died = NULL;
    for (int i = 0; i < d->n_child; i++) {
        s_child_t *c = &d->child[i];
        if (c->running && waitpid(c->pid, &c->status, WNOHANG) == c->pid) {
            c->running = false;
            if (!died)
                died = c;
        }
    }
    return died;
}

static void s_describe_exit(int status, char *buf, size_t n)
{
    if (WIFEXITED(status))
        snprintf(buf, n, "exit %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, n, "killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(buf, n, "status %d", status);
}

/* Ends every child still running: SIGTERM (workers leave, the coordinator exits), then SIGKILL
 * for what is left after 3 s; reaps them all. */
static void s_kill_all(s_demo_t *d)
{
    for (int i = 0; i < d->n_child; i++)
        if (d->child[i].running)
            kill(d->child[i].pid, SIGTERM);
    int64_t until = cli_now_ms() + 3000;
    bool any = true;
    while (any && cli_now_ms() < until) {
        s_reap(d);
        any = false;
        for (int i = 0; i < d->n_child; i++)
            any = any || d->child[i].running;
        if (any)
            s_sleep_ms(20);
    }
    for (int i = 0; i < d->n_child; i++) {
        s_child_t *c = &d->child[i];
        if (c->running) {
            kill(c->pid, SIGKILL);
            waitpid(c->pid, &c->status, 0);
            c->running = false;
        }
    }
}

/* Prints the last lines of a log, indented, to stderr. */
static void s_tail(const char *path, int lines)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return;
    char ring[16][512];
    int n = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        snprintf(ring[n % 16], sizeof ring[0], "%s", line);
        n++;
    }
    fclose(f);
    if (lines > 16)
        lines = 16;
    int first = n > lines ? n - lines : 0;
    if (n > 0)
        fprintf(stderr, "  last lines of %s:\n", path);
    for (int i = first; i < n; i++)
        fprintf(stderr, "    %s%s", ring[i % 16], strchr(ring[i % 16], '\n') ? "" : "\n");
}

/* --- reading the status -------------------------------------------------------------------- */

typedef struct {
    int workers;               /* members listed */
    int active;                /* of them active */
    int placed;                /* experts with at least one live holder */
    int experts;               /* layers x experts of the model */
    double generation;
    const char *state;
    bool has_absent;           /* the worker we killed is still listed */
} s_view_t;

static bool s_listed(const cJSON *workers, const char *id)
{
    const cJSON *w;
    cJSON_ArrayForEach(w, workers)
        if (strcmp(cli_json_str(w, "id", ""), id) == 0)
            return true;
    return false;
}

static s_view_t s_view(const cJSON *st, const char *absent)
{
    s_view_t v = {0};
    const cJSON *workers = cJSON_GetObjectItemCaseSensitive(st, "workers");
    const cJSON *w;
    cJSON_ArrayForEach(w, workers) {
        v.workers++;
        v.active += strcmp(cli_json_str(w, "state", ""), "active") == 0;
    }
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(st, "model");
    v.experts = (int)(cli_json_num(model, "num_layers", 0) * cli_json_num(model, "num_experts", 0));
    const cJSON *e;
    cJSON_ArrayForEach(e, cJSON_GetObjectItemCaseSensitive(st, "experts")) {
        bool held = false;
        const cJSON *h;
        cJSON_ArrayForEach(h, cJSON_GetObjectItemCaseSensitive(e, "workers"))
            held = held || (cJSON_IsString(h) && s_listed(workers, h->valuestring) &&
                            (!absent || strcmp(h->valuestring, absent) != 0));
        v.placed += held;
    }
    v.generation = cli_json_num(st, "generation", 0);
    v.state = cli_json_str(st, "state", "?");
    v.has_absent = absent && s_listed(workers, absent);
    return v;
}

/* Waits until the status shows want workers, all active, the job running, every expert held
 * by a listed worker, a generation above min_gen, and absent (if given) gone. Returns the
 * status that showed it (caller's), or NULL with d->failure set. */
static cJSON *s_wait_placed(s_demo_t *d, int want, double min_gen, const char *absent,
                            int timeout_ms)
{
    int64_t until = cli_now_ms() + timeout_ms;
    char last[256] = "no answer from the status socket yet";
    while (!s_interrupted) {
        s_child_t *died = s_reap(d);
        if (died) {
            char how[96];
            s_describe_exit(died->status, how, sizeof how);
            s_fail(d, "%s ended unexpectedly (%s)", died->name, how);
            d->failure_log = died->log;
            return NULL;
        }
        cJSON *st = NULL;
        if (cli_status_fetch(d->ctx, d->status, 1000, &st, NULL) == SEMOE_OK) {
            s_view_t v = s_view(st, absent);
            if (v.workers == want && v.active == want && strcmp(v.state, "running") == 0 &&
                v.experts > 0 && v.placed == v.experts && v.generation > min_gen && !v.has_absent)
                return st;
            snprintf(last, sizeof last, "state %s, generation %.0f, %d workers (%d active), "
                     "%d of %d experts held", v.state, v.generation, v.workers, v.active,
                     v.placed, v.experts);
            cJSON_Delete(st);
        } else if (semoe_err_msg()[0]) {
            snprintf(last, sizeof last, "%s", semoe_err_msg());
        }
        if (cli_now_ms() >= until) {
            s_fail(d, "gave up after %d s waiting for %d active workers holding every expert; "
                   "last status: %s", timeout_ms / 1000, want, last);
            d->failure_log = d->child[0].log;
            return NULL;
        }
        s_sleep_ms(S_POLL_MS);
    }
    s_fail(d, "interrupted");
    return NULL;
}

/* Prints, layer by layer, the experts that victim held in before and who holds them now. */
static void s_print_moves(const cJSON *before, const cJSON *after, const char *victim)
{
    const cJSON *model = cJSON_GetObjectItemCaseSensitive(after, "model");
    int per = (int)cli_json_num(model, "num_experts", 0);
    const cJSON *eb = cJSON_GetObjectItemCaseSensitive(before, "experts");
    const cJSON *ea = cJSON_GetObjectItemCaseSensitive(after, "experts");
    int shown_layer = -1, moved = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, eb) {
        bool held = false;
        const cJSON *h;
        cJSON_ArrayForEach(h, cJSON_GetObjectItemCaseSensitive(e, "workers"))
            held = held || (cJSON_IsString(h) && strcmp(h->valuestring, victim) == 0);
        if (!held || per <= 0)
            continue;
        int id = (int)cli_json_num(e, "id", -1), layer = id / per;
        const cJSON *now = NULL, *x;
        cJSON_ArrayForEach(x, ea)
            if ((int)cli_json_num(x, "id", -2) == id)
                now = x;
        char to[128] = "";
        size_t len = 0;
        cJSON_ArrayForEach(h, cJSON_GetObjectItemCaseSensitive(now, "workers"))
            if (cJSON_IsString(h) && len < sizeof to)
                len += (size_t)snprintf(to + len, sizeof to - len, "%s%s", len ? "+" : "",
                                        h->valuestring);
        if (layer != shown_layer)
            printf("%s   layer %d:", shown_layer >= 0 ? "\n" : "", layer);
        shown_layer = layer;
        printf(" %d→%s", id % per, to[0] ? to : "(none)");
        moved++;
    }
    if (moved)
        printf("\n");
    fflush(stdout);
}

/* --- the demo -------------------------------------------------------------------------------- */

static bool s_run(s_demo_t *d)
{
    int ports[3];
    if (!s_free_ports(d, ports))
        return false;
    snprintf(d->control, sizeof d->control, "tcp://127.0.0.1:%d", ports[0]);
    snprintf(d->status, sizeof d->status, "tcp://127.0.0.1:%d", ports[1]);
    snprintf(d->metrics, sizeof d->metrics, "127.0.0.1:%d", ports[2]);

    s_say("1. Starting the coordinator: control %s, status %s, job %s", d->control, d->status,
          d->job);
    char *cargv[] = {d->coordinator_bin, "--config", (char *)d->job, "--bind", d->control,
                     "--status", d->status, "--metrics", d->metrics, NULL};
    if (!s_spawn(d, "coordinator", cargv))
        return false;

    char names[S_MAX_WORKERS][16];
    for (int i = 0; i < d->n_workers; i++) {
        snprintf(names[i], sizeof names[i], "w%d", i + 1);
        char *wargv[] = {d->worker_bin, "--coordinator", d->control, "--id", names[i],
                         "--device", "cpu", NULL};
        if (!s_spawn(d, names[i], wargv))
            return false;
    }
    s_say("2. Starting %d CPU workers: w1%s%s", d->n_workers, d->n_workers > 2 ? " .. " : " ",
          names[d->n_workers - 1]);

    int64_t t0 = cli_now_ms();
    cJSON *before = s_wait_placed(d, d->n_workers, 0, NULL, S_JOIN_WAIT_MS);
    if (!before)
        return false;
    s_say("   All %d workers joined and every expert has a worker (generation %.0f, %.1f s).",
          d->n_workers, cli_json_num(before, "generation", 0), (cli_now_ms() - t0) / 1000.0);
    s_say("%s", "");
    cli_status_print(before, stdout);
    s_say("%s", "");

    /* the victim: w2, a worker in the middle of the ranks */
    s_child_t *victim = &d->child[2];
    double hb = cli_json_num(before, "heartbeat_ms", 1000);
    double liveness = cli_json_num(before, "liveness", 3);
    s_say("3. Killing worker %s (pid %d) with SIGKILL, as if its machine died. The coordinator",
          victim->name, (int)victim->pid);
    s_say("   notices when it misses %.0f heartbeats (%.0f ms apart) and gives its experts to "
          "the others.", liveness, hb);
    int64_t t_kill = cli_now_ms();
    kill(victim->pid, SIGKILL);
    waitpid(victim->pid, &victim->status, 0);
    victim->running = false;
    cJSON *after = s_wait_placed(d, d->n_workers - 1, cli_json_num(before, "generation", 0),
                                 victim->name, (int)(hb * liveness) + S_JOIN_WAIT_MS);
    if (!after) {
        cJSON_Delete(before);
        return false;
    }
    s_say("   Done after %.1f s: generation %.0f -> %.0f, %d worker%s. %s's experts went to:",
          (cli_now_ms() - t_kill) / 1000.0, cli_json_num(before, "generation", 0),
          cli_json_num(after, "generation", 0), d->n_workers - 1, d->n_workers > 2 ? "s" : "",
          victim->name);
    s_print_moves(before, after, victim->name);
    s_say("%s", "");
    cli_status_print(after, stdout);
    s_say("%s", "");
    cJSON_Delete(before);
    cJSON_Delete(after);

    s_say("4. Stopping everything: semoe stop --endpoint %s", d->control);
    bool acked = false;
    if (cli_stop_send(d->ctx, d->control, 5000, &acked) != SEMOE_OK)
        return s_fail(d, "semoe stop: %s", semoe_err_msg());
    int64_t until = cli_now_ms() + S_EXIT_WAIT_MS;
    int left = 0;
    do {
        s_reap(d);
        left = 0;
        for (int i = 0; i < d->n_child; i++)
            left += d->child[i].running;
        if (left && !s_interrupted)
            s_sleep_ms(20);
    } while (left && !s_interrupted && cli_now_ms() < until);
    if (s_interrupted)
        return s_fail(d, "interrupted");
    for (int i = 0; i < d->n_child; i++) {
        s_child_t *c = &d->child[i];
        if (c == victim)
            continue;
        if (c->running) {
            d->failure_log = c->log;
            return s_fail(d, "%s did not exit within %d s of STOP", c->name,
                          S_EXIT_WAIT_MS / 1000);
        }
        if (!WIFEXITED(c->status) || WEXITSTATUS(c->status) != 0) {
            char how[96];
            s_describe_exit(c->status, how, sizeof how);
            d->failure_log = c->log;
            return s_fail(d, "%s ended with %s after STOP, not exit 0", c->name, how);
        }
    }
    s_say("   The coordinator and %d worker%s exited cleanly (exit 0).", d->n_workers - 1,
          d->n_workers > 2 ? "s" : "");
    return true;
}

static const char s_usage[] =
    "usage: semoe demo [--workers 4] [--build DIR] [--job deploy/jobs/demo.json]\n"
    "\n"
    "Starts a coordinator and N CPU workers on this machine, shows which worker holds which\n"
    "experts, kills one worker, shows how its experts are reassigned, then stops everything.\n"
    "\n"
    "  --workers N   how many workers (2..64, default 4)\n"
    "  --build DIR   the meson build directory holding the daemons (default: next to semoe)\n"
    "  --job FILE    the job spec (default deploy/jobs/demo.json)\n";

int cli_demo_main(int argc, char **argv)
{
    enum { O_WORKERS = 1, O_BUILD, O_JOB };
    static const struct option opts[] = {
        {"workers", required_argument, 0, O_WORKERS},
        {"build", required_argument, 0, O_BUILD},
        {"job", required_argument, 0, O_JOB},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    long workers = 4;
    const char *build = NULL, *job = NULL;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_WORKERS:
            if (!cli_parse_int(optarg, 2, S_MAX_WORKERS, &workers)) {
                fprintf(stderr, "semoe demo: --workers %s: expected 2..%d\n", optarg,
                        S_MAX_WORKERS);
                return CLI_EXIT_USAGE;
            }
            break;
        case O_BUILD: build = optarg; break;
        case O_JOB: job = optarg; break;
        default: return cli_flags_other("demo", c, argv, s_usage);
        }
    }
    if (!cli_flags_end("demo", argc, argv))
        return CLI_EXIT_USAGE;

    static s_demo_t demo; /* big (paths per child): static, not on the stack */
    s_demo_t *d = &demo;
    d->n_workers = (int)workers;
    char job_path[PATH_MAX];
    if (!s_find_daemon(d, build, "coordinator", "semoe-coordinator", d->coordinator_bin) ||
        !s_find_daemon(d, build, "worker", "semoe-worker", d->worker_bin) ||
        !s_find_job(d, job, job_path)) {
        fprintf(stderr, "semoe demo: %s\n", d->failure);
        return 1;
    }
    d->job = job_path;
    snprintf(d->dir, sizeof d->dir, "/tmp/semoe-demo-XXXXXX");
    if (!mkdtemp(d->dir)) {
        fprintf(stderr, "semoe demo: cannot make a log directory in /tmp: %s\n", strerror(errno));
        return 1;
    }

    struct sigaction sa = {0};
    sa.sa_handler = s_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    s_say("semoe demo: a coordinator and %d CPU workers on this machine (logs in %s)",
          d->n_workers, d->dir);
    d->ctx = zmq_ctx_new();
    bool ok = s_run(d);
    if (!ok) {
        if (s_interrupted)
            s_say("semoe demo: interrupted; stopping the processes it started");
        else
            fprintf(stderr, "semoe demo: FAILED: %s\n", d->failure);
        if (d->failure_log && !s_interrupted)
            s_tail(d->failure_log, 8);
        s_kill_all(d);
    }
    zmq_ctx_term(d->ctx);
    if (ok)
        s_say("Done. Logs of every process are in %s; see `semoe status --help` to watch a "
              "job of your own.", d->dir);
    else
        s_say("semoe demo: logs are in %s", d->dir);
    return ok ? 0 : s_interrupted ? 130 : 1;
}
