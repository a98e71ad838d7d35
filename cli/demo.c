/* `semoe demo`: a coordinator and N CPU workers on this machine train a small MoE language model
 * on a real English corpus (fortunes), one progress line per step from the coordinator's metrics
 * log; then it samples a few lines from the checkpoint it saved under ./semoe-demo/. Every wait
 * is bounded and watches a process, a file or the status socket, never a fixed sleep. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
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
#include "model/checkpoint.h"
#include "model/job.h"

#ifndef SEMOE_SOURCE_DIR
#define SEMOE_SOURCE_DIR "."
#endif

#define S_MAX_WORKERS 64
#define S_JOIN_WAIT_MS 30000   /* for the workers to join and start training */
#define S_TRAIN_WAIT_MS (30 * 60 * 1000) /* for the training to end (about 4 min on 2 cores) */
#define S_POLL_MS 100          /* between two looks at the metrics log and the processes */
#define S_PROMPT "Q: "        /* what the demo asks the model to continue */
#define S_SAMPLES 3            /* samples it draws */
#define S_SAMPLE_TOKENS "100"  /* bytes per sample: within the trained window of 128 */

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
    char out[PATH_MAX];        /* ./semoe-demo, absolute */
    char ckpt[PATH_MAX];       /* its checkpoints/ root */
    char job_file[PATH_MAX];   /* the job as the daemons get it, in dir */
    char metrics_log[PATH_MAX]; /* the coordinator's, in out */
    uint64_t steps, seq_len;
    double last_step, first_eval, last_eval;
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

/* --- the job ------------------------------------------------------------------------------- */

/* rm -r of the demo's own checkpoint root (only what it wrote: depth-bounded, no symlinks
 * followed). */
static void s_rmtree(const char *path, int depth)
{
    struct stat st;
    if (lstat(path, &st) != 0)
        return;
    if (S_ISDIR(st.st_mode) && depth < 4) {
        DIR *dir = opendir(path);
        struct dirent *e;
        while (dir && (e = readdir(dir))) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            char sub[PATH_MAX];
            snprintf(sub, sizeof sub, "%.*s/%s", PATH_MAX / 2, path, e->d_name);
            s_rmtree(sub, depth + 1);
        }
        if (dir)
            closedir(dir);
        rmdir(path);
    } else {
        unlink(path);
    }
}

/* The job the daemons get: the spec with its checkpoints under ./semoe-demo/checkpoints (the
 * previous demo's removed: a new run, not a resume), the number of workers to wait for and
 * --steps, written into the log directory. */
static bool s_write_job(s_demo_t *d, const char *spec, long steps)
{
    model_job_t *job = NULL;
    if (model_job_load(spec, &job) != SEMOE_OK)
        return s_fail(d, "%s", semoe_err_msg());
    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) {
        model_job_destroy(&job);
        return s_fail(d, "getcwd: %s", strerror(errno));
    }
    snprintf(d->out, sizeof d->out, "%.*s/semoe-demo", PATH_MAX / 2, cwd);
    snprintf(d->ckpt, sizeof d->ckpt, "%.*s/checkpoints", PATH_MAX / 2, d->out);
    if (mkdir(d->out, 0755) != 0 && errno != EEXIST) {
        model_job_destroy(&job);
        return s_fail(d, "%s: %s", d->out, strerror(errno));
    }
    if (strlen(d->ckpt) > 1000) { /* train.checkpoint_dir holds 1023 */
        model_job_destroy(&job);
        return s_fail(d, "%s: the path is too long for a job spec; run from a shorter directory",
                      d->ckpt);
    }
    s_rmtree(d->ckpt, 0);
    snprintf(job->train.checkpoint_dir, sizeof job->train.checkpoint_dir, "%.1000s", d->ckpt);
    job->cluster.expected_workers = (uint32_t)d->n_workers;
    if (steps > 0)
        job->train.steps = (uint64_t)steps;
    d->steps = job->train.steps;
    d->seq_len = job->train.seq_len;
    char *text = model_job_to_json(job);
    model_job_destroy(&job);
    snprintf(d->job_file, sizeof d->job_file, "%s/job.json", d->dir);
    FILE *f = fopen(d->job_file, "w");
    bool ok = f && fputs(text, f) >= 0;
    if (f && fclose(f) != 0)
        ok = false;
    free(text);
    return ok || s_fail(d, "%s: %s", d->job_file, strerror(errno));
}

/* --- following the training ---------------------------------------------------------------- */

/* Prints the progress lines the coordinator appended to its metrics log since last time
 * (complete lines only): step, loss, held-out loss when evaluated, tokens/s, and the expert load
 * balance (the busiest worker's tokens over the mean). */
static void s_follow(s_demo_t *d, FILE *log)
{
    char line[1 << 16];
    for (;;) {
        long at = ftell(log);
        if (!fgets(line, sizeof line, log))
            break;
        if (!strchr(line, '\n')) { /* a line still being written: read it next time */
            fseek(log, at, SEEK_SET);
            break;
        }
        cJSON *j = cJSON_Parse(line);
        if (!j)
            continue;
        double step = cli_json_num(j, "step", 0), loss = cli_json_num(j, "loss", NAN);
        double eval = cli_json_num(j, "eval_loss", NAN);
        double tps = cli_json_num(j, "tokens_per_s", NAN);
        double imb = cli_json_num(j, "imbalance", NAN);
        char held[48] = "";
        if (!isnan(eval)) {
            snprintf(held, sizeof held, "  held-out %.3f", eval);
            if (isnan(d->first_eval))
                d->first_eval = eval;
            d->last_eval = eval;
        }
        char bal[48] = "";
        if (!isnan(imb))
            snprintf(bal, sizeof bal, "  load max/mean %.2f", imb);
        s_say("   step %5.0f/%" PRIu64 "  loss %.3f%s  %7.0f tokens/s%s", step, d->steps, loss,
              held, tps, bal);
        d->last_step = step;
        cJSON_Delete(j);
    }
    clearerr(log);
}

/* Waits until the status shows every worker training, and prints the placement once. */
static bool s_wait_training(s_demo_t *d)
{
    int64_t until = cli_now_ms() + S_JOIN_WAIT_MS;
    char last[256] = "no answer from the status socket yet";
    while (!s_interrupted) {
        s_child_t *died = s_reap(d);
        if (died) {
            char how[96];
            s_describe_exit(died->status, how, sizeof how);
            d->failure_log = died->log;
            return s_fail(d, "%s ended unexpectedly (%s)", died->name, how);
        }
        cJSON *st = NULL;
        if (cli_status_fetch(d->ctx, d->status, 1000, &st, NULL) == SEMOE_OK) {
            const char *phase = cli_json_str(st, "phase", "?");
            if (strcmp(phase, "training") == 0 || strcmp(phase, "finished") == 0) {
                s_say("%s", "");
                cli_status_print(st, stdout);
                s_say("%s", "");
                cJSON_Delete(st);
                return true;
            }
            snprintf(last, sizeof last, "phase %s, %d workers", phase,
                     cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(st, "workers")));
            cJSON_Delete(st);
        }
        if (cli_now_ms() >= until) {
            d->failure_log = d->child[0].log;
            return s_fail(d, "gave up after %d s waiting for %d workers to start training; "
                          "last status: %s", S_JOIN_WAIT_MS / 1000, d->n_workers, last);
        }
        s_sleep_ms(S_POLL_MS);
    }
    return s_fail(d, "interrupted");
}

/* Follows the training until the coordinator, the job done, has stopped the workers and
 * exited; every process must end with exit 0. */
static bool s_train(s_demo_t *d)
{
    FILE *log = NULL;
    int64_t until = cli_now_ms() + S_TRAIN_WAIT_MS;
    for (;;) {
        if (!log)
            log = fopen(d->metrics_log, "r");
        if (log)
            s_follow(d, log);
        s_reap(d);
        int left = 0;
        for (int i = 0; i < d->n_child; i++) {
            s_child_t *c = &d->child[i];
            left += c->running;
            if (!c->running && (!WIFEXITED(c->status) || WEXITSTATUS(c->status) != 0)) {
                char how[96];
                s_describe_exit(c->status, how, sizeof how);
                d->failure_log = c->log;
                if (log)
                    fclose(log);
                return s_fail(d, "%s ended with %s", c->name, how);
            }
        }
        if (!left)
            break;
        if (s_interrupted || cli_now_ms() >= until) {
            if (log)
                fclose(log);
            d->failure_log = d->child[0].log;
            return s_interrupted ? s_fail(d, "interrupted")
                                 : s_fail(d, "training did not end within %d minutes",
                                          S_TRAIN_WAIT_MS / 60000);
        }
        s_sleep_ms(S_POLL_MS);
    }
    if (log) {
        s_follow(d, log);
        fclose(log);
    }
    return true;
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
    snprintf(d->metrics_log, sizeof d->metrics_log, "%.*s/metrics.jsonl", PATH_MAX / 2, d->out);
    unlink(d->metrics_log);

    s_say("1. Starting the coordinator (job %s, %" PRIu64 " steps); watch it with", d->job,
          d->steps);
    s_say("   semoe status --endpoint %s", d->status);
    char *cargv[] = {d->coordinator_bin, "--config", d->job_file, "--bind", d->control,
                     "--status", d->status, "--metrics", d->metrics, "--metrics-log",
                     d->metrics_log, NULL};
    if (!s_spawn(d, "coordinator", cargv))
        return false;
    char names[S_MAX_WORKERS][16], logs[S_MAX_WORKERS][PATH_MAX];
    for (int i = 0; i < d->n_workers; i++) {
        snprintf(names[i], sizeof names[i], "w%d", i + 1);
        snprintf(logs[i], sizeof logs[i], "%.*s/%s.jsonl", PATH_MAX / 2, d->dir, names[i]);
        char *wargv[] = {d->worker_bin, "--coordinator", d->control, "--id", names[i],
                         "--device", "cpu", "--threads", "1", "--metrics-log", logs[i], NULL};
        if (!s_spawn(d, names[i], wargv))
            return false;
    }
    s_say("2. Starting %d CPU workers (w1%s%s), one BLAS thread each; they split the experts",
          d->n_workers, d->n_workers > 2 ? " .. " : " ", names[d->n_workers - 1]);
    s_say("   (expert parallel) and each batch (data parallel) as the coordinator's plan says.");
    int64_t t0 = cli_now_ms();
    if (!s_wait_training(d))
        return false;
    s_say("3. Training on the fortunes corpus, bytes as tokens; held-out documents are "
          "evaluated");
    s_say("   every few steps (cross-entropy in nats per byte).");
    if (!s_train(d))
        return false;
    double secs = (cli_now_ms() - t0) / 1000.0;
    s_say("   Trained %.0f steps in %.0f s: held-out loss %.3f at the first evaluation, %.3f at "
          "the", d->last_step, secs, d->first_eval, d->last_eval);
    s_say("   end, in nats per byte (uniform guessing scores ln 256 = 5.55; a bigram model of");
    s_say("   fortunes 2.59). Every process exited cleanly.");

    char ckpt[PATH_MAX];
    uint64_t step = 0;
    if (model_ckpt_latest(d->ckpt, ckpt, sizeof ckpt, &step) != SEMOE_OK || !ckpt[0])
        return s_fail(d, "no checkpoint under %s: %s", d->ckpt,
                      ckpt[0] ? semoe_err_msg() : "none written");
    s_say("%s", "");
    s_say("4. Sampling %d lines from the checkpoint: semoe generate --checkpoint %s", S_SAMPLES,
          d->ckpt);
    s_say("   --prompt \"%s\" --tokens %s --temperature 0.7 --top-k 40 --seed 1..%d (the model "
          "saw", S_PROMPT, S_SAMPLE_TOKENS, S_SAMPLES);
    s_say("   %" PRIu64 "-byte windows: a sample stays within one)", d->seq_len);
    s_say("%s", "");
    for (int i = 1; i <= S_SAMPLES; i++) {
        char seed[16];
        snprintf(seed, sizeof seed, "%d", i);
        char *gargv[] = {"generate", "--checkpoint", d->ckpt, "--prompt", S_PROMPT, "--tokens",
                         S_SAMPLE_TOKENS, "--temperature", "0.7", "--top-k", "40", "--seed",
                         seed, NULL};
        fputs("   ", stdout);
        if (cli_generate_main(13, gargv) != 0)
            return s_fail(d, "semoe generate failed");
    }
    s_say("%s", "");
    s_say("The model is saved in %s (step %" PRIu64 ", Hugging Face layout: transformers'",
          ckpt, step);
    s_say("MixtralForCausalLM.from_pretrained reads it). Try: semoe eval --checkpoint %s "
          "--text \"...\"", d->ckpt);
    return true;
}

static const char s_usage[] =
    "usage: semoe demo [--workers 4] [--steps N] [--build DIR] [--job deploy/jobs/demo.json]\n"
    "\n"
    "Starts a coordinator and N CPU workers on this machine that train a small MoE language\n"
    "model on the fortunes corpus (experts split over the workers, each batch too), printing\n"
    "a line per step; then samples from the model and leaves its checkpoint, its metrics and\n"
    "the job in ./semoe-demo/ (the previous demo's checkpoints there are replaced).\n"
    "\n"
    "  --workers N   how many workers (1..64, default 4)\n"
    "  --steps N     training steps (default: the job's train.steps)\n"
    "  --build DIR   the meson build directory holding the daemons (default: next to semoe)\n"
    "  --job FILE    the job spec (default deploy/jobs/demo.json)\n";

int cli_demo_main(int argc, char **argv)
{
    enum { O_WORKERS = 1, O_STEPS, O_BUILD, O_JOB };
    static const struct option opts[] = {
        {"workers", required_argument, 0, O_WORKERS},
        {"steps", required_argument, 0, O_STEPS},
        {"build", required_argument, 0, O_BUILD},
        {"job", required_argument, 0, O_JOB},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    long workers = 4, steps = 0;
    const char *build = NULL, *job = NULL;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_WORKERS:
            if (!cli_parse_int(optarg, 1, S_MAX_WORKERS, &workers)) {
                fprintf(stderr, "semoe demo: --workers %s: expected 1..%d\n", optarg,
                        S_MAX_WORKERS);
                return CLI_EXIT_USAGE;
            }
            break;
        case O_STEPS:
            if (!cli_parse_int(optarg, 1, 10000000, &steps)) {
                fprintf(stderr, "semoe demo: --steps %s: expected 1..10000000\n", optarg);
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
    d->first_eval = d->last_eval = NAN;
    snprintf(d->dir, sizeof d->dir, "/tmp/semoe-demo-XXXXXX");
    if (!mkdtemp(d->dir)) {
        fprintf(stderr, "semoe demo: cannot make a log directory in /tmp: %s\n", strerror(errno));
        return 1;
    }
    if (!s_write_job(d, job_path, steps)) {
        fprintf(stderr, "semoe demo: %s\n", d->failure);
        return 1;
    }

    struct sigaction sa = {0};
    sa.sa_handler = s_on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    s_say("semoe demo: a coordinator and %d CPU worker%s on this machine (logs in %s)",
          d->n_workers, d->n_workers > 1 ? "s" : "", d->dir);
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
        s_say("Done. Logs of every process are in %s; deploy/jobs/README.md explains the job "
              "spec for a job of your own.", d->dir);
    else
        s_say("semoe demo: logs are in %s", d->dir);
    return ok ? 0 : s_interrupted ? 130 : 1;
}
