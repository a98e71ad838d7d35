/* Process helpers for the multi-process tests: spawning the daemons with logs in a per-test temp
 * dir, a registry of children that are killed at exit or on a signal, bounded waits, free
 * loopback ports, and the status client with readers for the status reply's fields. */
#include "tests/proc.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "tests/harness.h"

#define PROC_MAX 128
#define PROC_MAX_PORTS 256

struct proc {
    char label[80];
    char bin[64];
    pid_t pid;
    bool reaped;
    int status;
    char out_path[PATH_MAX];
    char err_path[PATH_MAX];
};

static proc_t *s_procs[PROC_MAX];
/* What the signal handler reads: pids of children not yet reaped (0 once reaped). */
static volatile pid_t s_pids[PROC_MAX];
static volatile sig_atomic_t s_nprocs;
static char s_tmp[2048];
static char s_name[64] = "test";
static bool s_inited;
static int s_ports[PROC_MAX_PORTS];
static int s_nports;
static void *s_ctx;
static char s_status_err[256];

/* --- clocks and paths ------------------------------------------------------------------- */

int64_t proc_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void proc_sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) == -1 && errno == EINTR) {
    }
}

static const char *s_env_dir(const char *var)
{
    const char *v = getenv(var);
    if (!v || !*v) {
        fprintf(stderr, "%s: %s is not set (run through meson test, or set it to the %s)\n",
                s_name, var, strcmp(var, "SEMOE_BUILD") ? "source root" : "build root");
        exit(2);
    }
    return v;
}

const char *proc_build_dir(void) { return s_env_dir("SEMOE_BUILD"); }
const char *proc_src_dir(void) { return s_env_dir("SEMOE_SRC"); }
const char *proc_tmp_dir(void) { return s_tmp; }

char *proc_tmp_path(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", s_tmp, name);
    return buf;
}

/* --- cleanup ---------------------------------------------------------------------------- */

static void s_write_str(const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = write(2, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* Async-signal-safe: kill every child still running, say where the logs are, and die of the
 * same signal. */
static void s_on_signal(int sig)
{
    for (int i = 0; i < s_nprocs; i++) {
        pid_t pid = s_pids[i];
        if (pid > 0) {
            kill(pid, SIGKILL);
            kill(pid, SIGCONT);
        }
    }
    s_write_str("\n");
    s_write_str(s_name);
    s_write_str(": interrupted by a signal; killed its children; logs kept in ");
    s_write_str(s_tmp);
    s_write_str("\n");
    signal(sig, SIG_DFL);
    raise(sig);
}

static int s_rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(path);
    return 0;
}

static void s_cleanup(void)
{
    int left = 0;
    for (int i = 0; i < s_nprocs; i++) {
        if (proc_running(s_procs[i])) {
            left++;
            proc_kill(s_procs[i]);
        }
    }
    if (left)
        fprintf(stderr, "%s: killed %d child process%s still running at exit\n", s_name, left,
                left == 1 ? "" : "es");
    const char *keep = getenv("SEMOE_TEST_KEEP");
    if (test_failures > 0) {
        proc_dump_logs(NULL, 25);
        fprintf(stderr, "%s: logs kept in %s\n", s_name, s_tmp);
    } else if (keep && *keep && strcmp(keep, "0") != 0) {
        fprintf(stderr, "%s: logs kept in %s (SEMOE_TEST_KEEP)\n", s_name, s_tmp);
    } else if (s_tmp[0]) {
        nftw(s_tmp, s_rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    for (int i = 0; i < s_nprocs; i++) {
        free(s_procs[i]);
        s_procs[i] = NULL;
        s_pids[i] = 0;
    }
    s_nprocs = 0;
    if (s_ctx) {
        zmq_ctx_term(s_ctx);
        s_ctx = NULL;
    }
}

void proc_init(const char *test_name)
{
    if (s_inited)
        return;
    s_inited = true;
    snprintf(s_name, sizeof s_name, "%s", test_name);
    const char *base = getenv("TMPDIR");
    if (!base || !*base)
        base = "/tmp";
    snprintf(s_tmp, sizeof s_tmp, "%s/semoe-%s-XXXXXX", base, test_name);
    if (!mkdtemp(s_tmp)) {
        fprintf(stderr, "%s: mkdtemp %s: %s\n", s_name, s_tmp, strerror(errno));
        exit(2);
    }
    fprintf(stderr, "%s: logs in %s\n", s_name, s_tmp);
    atexit(s_cleanup);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaction(sigs[i], &sa, NULL);
}

/* --- processes -------------------------------------------------------------------------- */

pid_t proc_pid(const proc_t *p) { return p->pid; }
const char *proc_label(const proc_t *p) { return p->label; }
const char *proc_out_path(const proc_t *p) { return p->out_path; }
const char *proc_err_path(const proc_t *p) { return p->err_path; }

/* A label not used yet: label, label-2, label-3, ... */
static void s_unique_label(const char *label, char *out, size_t n)
{
    snprintf(out, n, "%s", label);
    for (int k = 2;; k++) {
        bool used = false;
        for (int i = 0; i < s_nprocs && !used; i++)
            used = strcmp(s_procs[i]->label, out) == 0;
        if (!used)
            return;
        snprintf(out, n, "%s-%d", label, k);
    }
}

proc_t *proc_startv(const char *label, const char *bin, int argc, const char *const *argv)
{
    if (!s_inited)
        proc_init("test");
    if (s_nprocs >= PROC_MAX) {
        fprintf(stderr, "%s: too many child processes (%d)\n", s_name, PROC_MAX);
        return NULL;
    }
    char path[PATH_MAX];
    if (bin[0] == '/')
        snprintf(path, sizeof path, "%s", bin);
    else
        snprintf(path, sizeof path, "%s/%s", proc_build_dir(), bin);
    if (access(path, X_OK) != 0) {
        fprintf(stderr, "%s: cannot run %s: %s\n", s_name, path, strerror(errno));
        return NULL;
    }
    proc_t *p = calloc(1, sizeof *p);
    if (!p)
        abort();
    s_unique_label(label, p->label, sizeof p->label);
    const char *slash = strrchr(bin, '/');
    snprintf(p->bin, sizeof p->bin, "%s", slash ? slash + 1 : bin);
    snprintf(p->out_path, sizeof p->out_path, "%s/%s.out", s_tmp, p->label);
    snprintf(p->err_path, sizeof p->err_path, "%s/%s.err", s_tmp, p->label);

    const char **av = calloc((size_t)argc + 2, sizeof *av);
    if (!av)
        abort();
    av[0] = path;
    for (int i = 0; i < argc; i++)
        av[i + 1] = argv[i];

    /* The command line goes at the top of the .out file, for whoever reads the logs. */
    int out_fd = open(p->out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int err_fd = open(p->err_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int null_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (out_fd < 0 || err_fd < 0 || null_fd < 0) {
        fprintf(stderr, "%s: cannot open the logs of %s in %s: %s\n", s_name, p->label, s_tmp,
                strerror(errno));
        goto fail;
    }
    char cmd[4096];
    size_t off = (size_t)snprintf(cmd, sizeof cmd, "#");
    for (int i = 0; i <= argc && off < sizeof cmd; i++)
        off += (size_t)snprintf(cmd + off, sizeof cmd - off, " %s", av[i]);
    if (off < sizeof cmd - 1)
        off += (size_t)snprintf(cmd + off, sizeof cmd - off, "\n");
    else
        off = sizeof cmd - 1;
    if (write(out_fd, cmd, off) < 0) {
        /* the log header is a courtesy; the process can run without it */
    }

    fflush(NULL);
    /* Block our handled signals across fork, so that the child cannot run s_on_signal (and kill
     * its siblings) before it has reset the handlers. */
    sigset_t block, saved;
    sigemptyset(&block);
    int sigs[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
        sigaddset(&block, sigs[i]);
    sigprocmask(SIG_BLOCK, &block, &saved);
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        sigprocmask(SIG_SETMASK, &saved, NULL);
        fprintf(stderr, "%s: fork: %s\n", s_name, strerror(errno));
        goto fail;
    }
    if (pid == 0) {
        /* Die with the test, even if the test is SIGKILLed and cannot clean up. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        dup2(null_fd, 0);
        dup2(out_fd, 1);
        dup2(err_fd, 2);
        for (int fd = 3; fd < 1024; fd++)
            close(fd);
        int dfl[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGPIPE, SIGCHLD};
        for (size_t i = 0; i < sizeof dfl / sizeof dfl[0]; i++)
            signal(dfl[i], SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        execv(path, (char *const *)av);
        dprintf(2, "exec %s: %s\n", path, strerror(errno));
        _exit(127);
    }
    p->pid = pid;
    s_procs[s_nprocs] = p;
    s_pids[s_nprocs] = pid;
    s_nprocs++;
    sigprocmask(SIG_SETMASK, &saved, NULL);
    close(out_fd);
    close(err_fd);
    close(null_fd);
    free(av);
    return p;

fail:
    if (out_fd >= 0)
        close(out_fd);
    if (err_fd >= 0)
        close(err_fd);
    if (null_fd >= 0)
        close(null_fd);
    free(av);
    free(p);
    return NULL;
}

static int s_collect_args(va_list ap, const char **argv, int max)
{
    int argc = 0;
    const char *a;
    while ((a = va_arg(ap, const char *)) != NULL) {
        if (argc < max)
            argv[argc] = a;
        argc++;
    }
    return argc;
}

proc_t *proc_start(const char *label, const char *bin, ...)
{
    const char *argv[64];
    va_list ap;
    va_start(ap, bin);
    int argc = s_collect_args(ap, argv, 64);
    va_end(ap);
    if (argc > 64) {
        fprintf(stderr, "%s: proc_start %s: too many arguments\n", s_name, label);
        return NULL;
    }
    return proc_startv(label, bin, argc, argv);
}

static void s_mark_reaped(proc_t *p, int status)
{
    p->reaped = true;
    p->status = status;
    for (int i = 0; i < s_nprocs; i++)
        if (s_procs[i] == p)
            s_pids[i] = 0;
}

bool proc_running(proc_t *p)
{
    if (!p || p->reaped)
        return false;
    int st = 0;
    pid_t r = waitpid(p->pid, &st, WNOHANG);
    if (r == p->pid) {
        s_mark_reaped(p, st);
        return false;
    }
    if (r < 0 && errno != EINTR) {
        s_mark_reaped(p, -1);
        return false;
    }
    return true;
}

bool proc_signal(proc_t *p, int sig)
{
    if (!p || p->reaped)
        return false;
    return kill(p->pid, sig) == 0;
}

bool proc_wait(proc_t *p, int timeout_ms, int *status)
{
    if (!p)
        return false;
    int64_t deadline = proc_now_ms() + timeout_ms;
    for (;;) {
        if (!proc_running(p)) {
            if (status)
                *status = p->status;
            return true;
        }
        if (proc_now_ms() > deadline)
            return false;
        proc_sleep_ms(5);
    }
}

bool proc_kill(proc_t *p)
{
    if (!p || p->reaped)
        return true;
    kill(p->pid, SIGKILL);
    kill(p->pid, SIGCONT);
    return proc_wait(p, 10000, NULL);
}

int proc_exit_code(int status)
{
    if (status == -1)
        return -1;
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return -1;
}

int proc_run(proc_t **pp, int timeout_ms, const char *label, const char *bin, ...)
{
    const char *argv[64];
    va_list ap;
    va_start(ap, bin);
    int argc = s_collect_args(ap, argv, 64);
    va_end(ap);
    if (pp)
        *pp = NULL;
    if (argc > 64)
        return -1;
    proc_t *p = proc_startv(label, bin, argc, argv);
    if (!p)
        return -1;
    if (pp)
        *pp = p;
    int st;
    if (!proc_wait(p, timeout_ms, &st)) {
        fprintf(stderr, "%s: %s did not finish within %d ms; killing it\n", s_name, p->label,
                timeout_ms);
        proc_kill(p);
        return -1;
    }
    return proc_exit_code(st);
}

/* --- files and logs --------------------------------------------------------------------- */

char *proc_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    if (!buf)
        abort();
    for (;;) {
        if (cap - n < 2048) {
            cap *= 2;
            buf = realloc(buf, cap);
            if (!buf)
                abort();
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0)
            break;
    }
    fclose(f);
    buf[n] = 0;
    if (len)
        *len = n;
    return buf;
}

bool proc_write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "%s: cannot write %s: %s\n", s_name, path, strerror(errno));
        return false;
    }
    size_t n = strlen(text);
    bool ok = fwrite(text, 1, n, f) == n;
    ok = fclose(f) == 0 && ok;
    if (!ok)
        fprintf(stderr, "%s: cannot write %s\n", s_name, path);
    return ok;
}

static void s_tail(const char *path, int lines)
{
    size_t len = 0;
    char *text = proc_read_file(path, &len);
    if (!text) {
        fprintf(stderr, "---- %s: (cannot read)\n", path);
        return;
    }
    const char *start = text + len;
    int seen = 0;
    if (len > 0 && text[len - 1] == '\n')
        start--;
    while (start > text) {
        if (start[-1] == '\n' && ++seen >= lines)
            break;
        start--;
    }
    fprintf(stderr, "---- %s (%s) ----\n", path, start == text ? "all" : "last lines");
    fputs(start, stderr);
    if (len > 0 && text[len - 1] != '\n')
        fputc('\n', stderr);
    free(text);
}

void proc_dump_logs(const proc_t *p, int lines)
{
    for (int i = 0; i < s_nprocs; i++) {
        const proc_t *q = s_procs[i];
        if (p && q != p)
            continue;
        char state[64];
        if (!q->reaped)
            snprintf(state, sizeof state, "running");
        else
            snprintf(state, sizeof state, "exit code %d", proc_exit_code(q->status));
        fprintf(stderr, "==== %s (pid %d, %s) ====\n", q->label, (int)q->pid, state);
        s_tail(q->out_path, lines);
        s_tail(q->err_path, lines);
    }
}

/* --- ports ------------------------------------------------------------------------------ */

int proc_free_port(void)
{
    for (int attempt = 0; attempt < 100; attempt++) {
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return 0;
        struct sockaddr_in a;
        memset(&a, 0, sizeof a);
        a.sin_family = AF_INET;
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        a.sin_port = 0;
        socklen_t alen = sizeof a;
        int port = 0;
        if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
            getsockname(fd, (struct sockaddr *)&a, &alen) == 0)
            port = ntohs(a.sin_port);
        close(fd);
        if (port == 0)
            return 0;
        bool used = false;
        for (int i = 0; i < s_nports && !used; i++)
            used = s_ports[i] == port;
        if (used)
            continue;
        if (s_nports < PROC_MAX_PORTS)
            s_ports[s_nports++] = port;
        return port;
    }
    return 0;
}

/* Does /proc/net/<file> list an established connection to remote port `port` whose socket
 * inode is one of inodes[0..n)? */
static bool s_tcp_table_has(const char *file, int port, const unsigned long *inodes, int n)
{
    FILE *f = fopen(file, "r");
    if (!f)
        return false;
    char line[512];
    bool found = false;
    if (!fgets(line, sizeof line, f)) { /* header */
        fclose(f);
        return false;
    }
    while (!found && fgets(line, sizeof line, f)) {
        char local[64], remote[64];
        unsigned st;
        unsigned long inode;
        /* sl local rem st tx:rx tr:when retrnsmt uid timeout inode */
        if (sscanf(line, " %*[^:]: %63s %63s %x %*s %*s %*s %*s %*s %lu", local, remote, &st,
                   &inode) != 4)
            continue;
        const char *colon = strrchr(remote, ':');
        if (!colon || st != 1)
            continue;
        if ((int)strtol(colon + 1, NULL, 16) != port)
            continue;
        for (int i = 0; i < n && !found; i++)
            found = inodes[i] == inode;
    }
    fclose(f);
    return found;
}

bool proc_tcp_connected(const proc_t *p, int port)
{
    char dir[64];
    snprintf(dir, sizeof dir, "/proc/%d/fd", (int)p->pid);
    DIR *d = opendir(dir);
    if (!d)
        return false;
    unsigned long inodes[512];
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL && n < 512) {
        char link[PATH_MAX], target[128];
        snprintf(link, sizeof link, "%s/%s", dir, e->d_name);
        ssize_t r = readlink(link, target, sizeof target - 1);
        if (r <= 0)
            continue;
        target[r] = 0;
        unsigned long ino;
        if (sscanf(target, "socket:[%lu]", &ino) == 1)
            inodes[n++] = ino;
    }
    closedir(d);
    return s_tcp_table_has("/proc/net/tcp", port, inodes, n) ||
           s_tcp_table_has("/proc/net/tcp6", port, inodes, n);
}

/* --- daemons ---------------------------------------------------------------------------- */

bool proc_ports_pick(proc_ports_t *pp)
{
    memset(pp, 0, sizeof *pp);
    pp->control = proc_free_port();
    pp->status = proc_free_port();
    pp->metrics = proc_free_port();
    if (!pp->control || !pp->status || !pp->metrics) {
        fprintf(stderr, "%s: no free loopback port\n", s_name);
        return false;
    }
    snprintf(pp->control_ep, sizeof pp->control_ep, "tcp://127.0.0.1:%d", pp->control);
    snprintf(pp->status_ep, sizeof pp->status_ep, "tcp://127.0.0.1:%d", pp->status);
    snprintf(pp->metrics_addr, sizeof pp->metrics_addr, "127.0.0.1:%d", pp->metrics);
    return true;
}

char *proc_src_path(char *buf, size_t n, const char *rel)
{
    snprintf(buf, n, "%s/%s", proc_src_dir(), rel);
    return buf;
}

proc_t *proc_start_coordinator(const char *label, const char *job, const proc_ports_t *pp,
                               const char *const *extra)
{
    const char *argv[64] = {"--config", job, "--bind", pp->control_ep, "--status", pp->status_ep,
                            "--metrics", pp->metrics_addr};
    int argc = 8;
    for (int i = 0; extra && extra[i] && argc < 64; i++)
        argv[argc++] = extra[i];
    return proc_startv(label, PROC_COORDINATOR, argc, argv);
}

proc_t *proc_start_worker(const char *id, const proc_ports_t *pp, int reconnect_max_ms)
{
    char backoff[32];
    snprintf(backoff, sizeof backoff, "%d", reconnect_max_ms);
    const char *argv[16] = {"--coordinator", pp->control_ep, "--id", id, "--device", "cpu",
                            "--data-bind", "tcp://127.0.0.1:*"};
    int argc = 8;
    if (reconnect_max_ms > 0) {
        argv[argc++] = "--reconnect-max-ms";
        argv[argc++] = backoff;
    }
    return proc_startv(id, PROC_WORKER, argc, argv);
}

/* --- status client ---------------------------------------------------------------------- */

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
    fprintf(stderr, "%s: waited %lld ms for the status at %s: %s\n  last status: %s\n", s_name,
            (long long)(proc_now_ms() - start), endpoint, why[0] ? why : "(condition false)",
            last);
    return NULL;
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
