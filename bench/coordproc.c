/* The coordinator under benchmark (coordproc.h): fork/exec on fresh ports, a long-lived status
 * client, and /proc readings of its CPU time and peak memory. */
#include "bench/coordproc.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/log.h"
#include "actors/procfs.h"

struct coordproc {
    pid_t pid;
    bool reaped;
    char control[64], status[64], metrics[64];
    char job[PATH_MAX], log[PATH_MAX];
    void *ctx;
    void *req; /* REQ with relaxed/correlate: a timed-out query does not wedge it */
};

/* A loopback port that was free a moment ago (bound to 0, read back, closed). */
static int s_free_port(void)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    int port = 0;
    if (bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0)
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

static semoe_rc s_write_job(const char *path, uint32_t heartbeat_ms, uint32_t liveness,
                            int layers, int experts, int n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return semoe_err_errno(SEMOE_EIO, "%s", path);
    /* A small model: the coordinator never touches tensors, only the expert table matters. */
    fprintf(f,
            "{\n"
            "  \"model\": {\"vocab_size\": 256, \"hidden_size\": 64, \"intermediate_size\": 128,\n"
            "            \"num_hidden_layers\": %d, \"num_attention_heads\": 4,\n"
            "            \"num_key_value_heads\": 2, \"num_local_experts\": %d,\n"
            "            \"num_experts_per_tok\": 2, \"max_position_embeddings\": 256},\n"
            "  \"train\": {\"seq_len\": 64, \"global_batch\": %d, \"micro_batch\": 4,\n"
            "            \"steps\": 1000000},\n"
            "  \"cluster\": {\"heartbeat_ms\": %u, \"liveness\": %u, \"expected_workers\": 0}\n"
            "}\n",
            layers, experts, 4 * (n + 1), heartbeat_ms, liveness);
    if (fclose(f) != 0)
        return semoe_err_errno(SEMOE_EIO, "%s", path);
    return SEMOE_OK;
}

bool coordproc_alive(coordproc_t *self)
{
    if (self->reaped)
        return false;
    int status;
    if (waitpid(self->pid, &status, WNOHANG) == self->pid) {
        self->reaped = true;
        return false;
    }
    return true;
}

semoe_rc coordproc_spawn(const char *log, char *const argv[], int *out)
{
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0)
        return semoe_err_errno(SEMOE_ESYS, "fork");
    if (pid == 0) {
        /* Die with the bench, even when it is killed. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(argv[0], argv);
        fprintf(stderr, "bench: exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    *out = (int)pid;
    return SEMOE_OK;
}

void coordproc_bin(const char *rel, char *out, size_t cap)
{
    const char *b = getenv("SEMOE_BUILD");
    if (b && *b) {
        snprintf(out, cap, "%s/%s", b, rel);
        return;
    }
    char self[PATH_MAX - 64];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    self[n > 0 ? n : 0] = '\0';
    char *slash = strrchr(self, '/');
    if (slash)
        *slash = '\0';
    snprintf(out, cap, "%s/../%s", self, rel);
}

static semoe_rc s_spawn(coordproc_t *self, const char *bin)
{
    char *const argv[] = {(char *)bin, "--config", self->job, "--bind", self->control,
                          "--status", self->status, "--metrics", self->metrics,
                          "--log-level", "warn", NULL};
    int pid;
    SEMOE_CHECK(coordproc_spawn(self->log, argv, &pid));
    self->pid = pid;
    return SEMOE_OK;
}

/* Picks three free loopback ports for the control, status and metrics sockets. */
static semoe_rc s_ports(coordproc_t *self)
{
    int pc = s_free_port(), ps = s_free_port(), pm = s_free_port();
    if (!pc || !ps || !pm || pc == ps || ps == pm || pc == pm)
        return semoe_err(SEMOE_ESYS, "no free loopback ports");
    snprintf(self->control, sizeof self->control, "tcp://127.0.0.1:%d", pc);
    snprintf(self->status, sizeof self->status, "tcp://127.0.0.1:%d", ps);
    snprintf(self->metrics, sizeof self->metrics, "127.0.0.1:%d", pm);
    return SEMOE_OK;
}

/* Starts bin with self's job and log on fresh ports and waits until its status socket
 * answers; on an error frees self. */
static semoe_rc s_start(coordproc_t *self, const char *bin)
{
    semoe_rc rc;
    SEMOE_CHECK_GOTO(s_ports(self), rc, fail);
    SEMOE_CHECK_GOTO(s_spawn(self, bin), rc, fail);

    self->ctx = zmq_ctx_new();
    self->req = zmq_socket(self->ctx, ZMQ_REQ);
    int one = 1, zero = 0;
    zmq_setsockopt(self->req, ZMQ_REQ_RELAXED, &one, sizeof one);
    zmq_setsockopt(self->req, ZMQ_REQ_CORRELATE, &one, sizeof one);
    zmq_setsockopt(self->req, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_connect(self->req, self->status) != 0) {
        rc = semoe_err(SEMOE_EIO, "connect %s: %s", self->status, zmq_strerror(zmq_errno()));
        goto fail;
    }
    int64_t end = clock_mono_ms() + 15000;
    for (;;) {
        cJSON *st = coordproc_status(self, 500, NULL, NULL);
        if (st) {
            cJSON_Delete(st);
            break;
        }
        if (!coordproc_alive(self)) {
            rc = semoe_err(SEMOE_EIO, "%s exited at start (see %s)", bin, self->log);
            goto fail;
        }
        if (clock_mono_ms() > end) {
            rc = semoe_err(SEMOE_ETIMEDOUT, "%s: no status answer on %s in 15 s (see %s)", bin,
                           self->status, self->log);
            goto fail;
        }
    }
    return SEMOE_OK;
fail:
    fprintf(stderr, "bench: coordinator log %s\n", self->log);
    coordproc_stop(&self);
    return rc;
}

semoe_rc coordproc_start(const char *bin, const char *dir, int n, uint32_t heartbeat_ms,
                         uint32_t liveness, int layers, int experts, coordproc_t **out)
{
    coordproc_t *self = semoe_xcalloc(1, sizeof *self);
    *out = NULL;
    snprintf(self->job, sizeof self->job, "%s/job-%d.json", dir, n);
    snprintf(self->log, sizeof self->log, "%s/coordinator-%d.log", dir, n);
    semoe_rc rc = s_write_job(self->job, heartbeat_ms, liveness, layers, experts, n);
    if (rc != SEMOE_OK) {
        free(self);
        return rc;
    }
    SEMOE_CHECK(s_start(self, bin));
    *out = self;
    return SEMOE_OK;
}

semoe_rc coordproc_start_job(const char *bin, const char *job, const char *log,
                             coordproc_t **out)
{
    coordproc_t *self = semoe_xcalloc(1, sizeof *self);
    *out = NULL;
    snprintf(self->job, sizeof self->job, "%s", job);
    snprintf(self->log, sizeof self->log, "%s", log);
    SEMOE_CHECK(s_start(self, bin));
    *out = self;
    return SEMOE_OK;
}

bool coordproc_wait_exit(coordproc_t *self, int timeout_ms, int *code)
{
    int64_t end = clock_mono_ms() + timeout_ms;
    for (;;) {
        int status;
        if (!self->reaped && waitpid(self->pid, &status, WNOHANG) == self->pid) {
            self->reaped = true;
            *code = WIFEXITED(status) ? WEXITSTATUS(status)
                                      : 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
            return true;
        }
        if (self->reaped) { /* reaped by coordproc_alive: the status is gone */
            *code = -1;
            return true;
        }
        if (clock_mono_ms() >= end)
            return false;
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
}

void coordproc_stop(coordproc_t **self_p)
{
    coordproc_t *self = *self_p;
    if (!self)
        return;
    if (self->pid > 0 && coordproc_alive(self)) {
        kill(self->pid, SIGTERM);
        int64_t end = clock_mono_ms() + 5000;
        while (coordproc_alive(self) && clock_mono_ms() < end) {
            struct timespec ts = {0, 10 * 1000000L};
            nanosleep(&ts, NULL);
        }
        if (coordproc_alive(self)) {
            fprintf(stderr, "bench: coordinator %d ignored SIGTERM for 5 s; killing it\n",
                    (int)self->pid);
            kill(self->pid, SIGKILL);
            waitpid(self->pid, NULL, 0);
            self->reaped = true;
        }
    }
    if (self->req)
        zmq_close(self->req);
    if (self->ctx)
        zmq_ctx_term(self->ctx);
    free(self);
    *self_p = NULL;
}

const char *coordproc_control(const coordproc_t *self) { return self->control; }
const char *coordproc_log_path(const coordproc_t *self) { return self->log; }

cJSON *coordproc_status(coordproc_t *self, int timeout_ms, int64_t *latency_us, size_t *bytes)
{
    int64_t t0 = clock_mono_us();
    if (zmq_send(self->req, "status", 6, 0) != 6)
        return NULL;
    zmq_pollitem_t it = {.socket = self->req, .events = ZMQ_POLLIN};
    if (zmq_poll(&it, 1, timeout_ms) <= 0)
        return NULL;
    zmq_msg_t msg;
    zmq_msg_init(&msg);
    if (zmq_msg_recv(&msg, self->req, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&msg);
        return NULL;
    }
    int64_t t1 = clock_mono_us();
    if (latency_us)
        *latency_us = t1 - t0;
    if (bytes)
        *bytes = zmq_msg_size(&msg);
    cJSON *st = cJSON_ParseWithLength(zmq_msg_data(&msg), zmq_msg_size(&msg));
    zmq_msg_close(&msg);
    return st;
}

uint64_t coordproc_u64(const cJSON *st, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(st, key);
    return cJSON_IsNumber(v) && v->valuedouble > 0 ? (uint64_t)v->valuedouble : 0;
}

double coordproc_f64(const cJSON *st, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(st, key);
    return cJSON_IsNumber(v) ? v->valuedouble : -1;
}

uint64_t coordproc_counter(const cJSON *st, const char *name)
{
    return coordproc_u64(cJSON_GetObjectItemCaseSensitive(st, "counters"), name);
}

bool coordproc_steady(const cJSON *st, int n, uint64_t min_gen)
{
    const cJSON *state = cJSON_GetObjectItemCaseSensitive(st, "state");
    const cJSON *workers = cJSON_GetObjectItemCaseSensitive(st, "workers");
    if (!cJSON_IsString(state) || strcmp(state->valuestring, "running") != 0 ||
        coordproc_u64(st, "pending_acks") != 0 || coordproc_u64(st, "generation") < min_gen ||
        !cJSON_IsArray(workers) || cJSON_GetArraySize(workers) != n)
        return false;
    const cJSON *w;
    cJSON_ArrayForEach(w, workers)
    {
        const cJSON *ws = cJSON_GetObjectItemCaseSensitive(w, "state");
        if (!cJSON_IsString(ws) || strcmp(ws->valuestring, "active") != 0)
            return false;
    }
    return true;
}

void coordproc_cpu(const coordproc_t *self, coordproc_cpu_t *cpu)
{
    char path[128];
    memset(cpu, 0, sizeof *cpu);
    /* Every thread, the ZeroMQ I/O threads included: they read the heartbeats off TCP. */
    snprintf(path, sizeof path, "/proc/%d/task", (int)self->pid);
    DIR *d = opendir(path);
    for (struct dirent *e; d && (e = readdir(d));) {
        if (e->d_name[0] == '.')
            continue;
        char p[320];
        snprintf(p, sizeof p, "/proc/%d/task/%s/schedstat", (int)self->pid, e->d_name);
        FILE *f = fopen(p, "r");
        unsigned long long ns = 0;
        if (f && fscanf(f, "%llu", &ns) == 1)
            cpu->task_ns += ns;
        if (f)
            fclose(f);
    }
    if (d)
        closedir(d);
    /* utime and stime are fields 14 and 15, counted after the ')' that ends comm. */
    snprintf(path, sizeof path, "/proc/%d/stat", (int)self->pid);
    FILE *f = fopen(path, "r");
    char buf[1024];
    size_t len = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    if (f)
        fclose(f);
    buf[len] = '\0';
    char *p = strrchr(buf, ')');
    unsigned long long ut = 0, stt = 0;
    if (p && sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &ut, &stt) == 2)
        cpu->ticks = ut + stt;
}

uint64_t coordproc_peak_rss_kb(const coordproc_t *self) { return procfs_peak_rss_kb(self->pid); }

void coordproc_remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    for (struct dirent *e; d && (e = readdir(d));) {
        if ((!strncmp(e->d_name, "job-", 4) || !strncmp(e->d_name, "coordinator-", 12)) &&
            (strstr(e->d_name, ".json") || strstr(e->d_name, ".log"))) {
            char p[PATH_MAX];
            snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
            unlink(p);
        }
    }
    if (d)
        closedir(d);
    rmdir(dir);
}
