/* Process helpers for the multi-process tests: spawning the daemons with logs in a per-test temp
 * dir, a registry of children that are killed at exit or on a signal, bounded waits and free
 * loopback ports. The status client is tests/status_client.c. */
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

#include "tests/harness.h"

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
const char *proc_name(void) { return s_name; }

char *proc_tmp_path(char *buf, size_t n, const char *name)
{
    if (!s_inited) /* never the filesystem's root */
        proc_init("test");
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
