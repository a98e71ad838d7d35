/* The coordinator's state on disk (state.h): the JSON written with cJSON, read back with every
 * field checked before anything is used, the atomic replacement of the file, and the lock that
 * keeps two coordinators off one directory. */
#include "coordinator/state.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "actors/log.h"
#include "coordinator/reconfig.h"
#include "model/job.h"

/* Integers above this do not survive a JSON number (a double): they are written as strings. */
#define S_EXACT (1ull << 53)

struct state_store {
    char *dir;
    char *path; // DIR/state.json
    char *tmp;  // DIR/state.json.tmp: written whole, then renamed onto path
    int dir_fd, lock_fd;
};

static char *s_join(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = semoe_xmalloc(n);
    snprintf(p, n, "%s/%s", dir, name);
    return p;
}

/* --- the directory and its lock --------------------------------------------------------------- */

/* Locks DIR/lock (flock: the kernel lets go of it when the holder dies, kill -9 included) and
 * writes this process's pid into it, for the message of the next one that tries. */
static semoe_rc s_lock(state_store_t *self)
{
    char *lock = s_join(self->dir, "lock");
    char pid[32] = "";
    semoe_rc rc = SEMOE_OK;
    self->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    int locked = self->lock_fd < 0 ? -1 : flock(self->lock_fd, LOCK_EX | LOCK_NB);
    bool held = locked != 0 && errno == EWOULDBLOCK; // by another process
    if (self->lock_fd < 0) {
        rc = semoe_err_errno(SEMOE_EINVAL, "--state-dir %s: cannot write %s", self->dir, lock);
    } else if (locked != 0 && !held) {
        rc = semoe_err_errno(SEMOE_EINVAL, "--state-dir %s: cannot lock %s", self->dir, lock);
    } else if (held) {
        ssize_t n = pread(self->lock_fd, pid, sizeof pid - 1, 0); // the holder's, for the message
        pid[n > 0 ? n : 0] = 0;
        pid[strcspn(pid, "\n")] = 0;
        rc = semoe_err(SEMOE_EINVAL, "--state-dir %s: another coordinator uses it (%s is locked"
                       "%s%s)", self->dir, lock, pid[0] ? " by pid " : "", pid);
    } else {
        int n = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
        if (ftruncate(self->lock_fd, 0) != 0 || pwrite(self->lock_fd, pid, (size_t)n, 0) != n)
            rc = semoe_err_errno(SEMOE_EINVAL, "--state-dir %s: cannot write %s", self->dir,
                                 lock);
    }
    free(lock);
    return rc;
}

semoe_rc state_store_open(const char *dir, state_store_t **self_p)
{
    *self_p = NULL;
    if (!dir || !dir[0])
        return semoe_err(SEMOE_EINVAL, "--state-dir: want a directory");
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        return semoe_err_errno(SEMOE_EINVAL, "--state-dir %s: cannot create it", dir);
    state_store_t *self = semoe_xcalloc(1, sizeof *self);
    self->dir = semoe_xstrdup(dir);
    self->path = s_join(dir, STATE_FILE);
    self->tmp = s_join(dir, STATE_FILE ".tmp");
    self->lock_fd = -1;
    self->dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    semoe_rc rc = self->dir_fd < 0 ? semoe_err_errno(SEMOE_EINVAL, "--state-dir %s: not a "
                                                     "directory we can open", dir)
                                   : s_lock(self);
    if (rc != SEMOE_OK) {
        state_store_close(&self);
        return rc;
    }
    *self_p = self;
    return SEMOE_OK;
}

void state_store_close(state_store_t **self_p)
{
    state_store_t *self = *self_p;
    if (!self)
        return;
    if (self->lock_fd >= 0)
        close(self->lock_fd); // the lock goes with it
    if (self->dir_fd >= 0)
        close(self->dir_fd);
    free(self->dir);
    free(self->path);
    free(self->tmp);
    free(self);
    *self_p = NULL;
}

const char *state_store_path(const state_store_t *self) { return self->path; }

/* --- writing ---------------------------------------------------------------------------------- */

static cJSON *s_add(cJSON *obj, const char *key, cJSON *item)
{
    if (!item || !cJSON_AddItemToObject(obj, key, item))
        abort(); // out of memory
    return item;
}

static void s_push(cJSON *arr, cJSON *item)
{
    if (!item || !cJSON_AddItemToArray(arr, item))
        abort();
}

/* A u64 as a number (printed here: cJSON prints 15 digits when they come within an epsilon),
 * or as a decimal string when a double would round it. */
static cJSON *s_u64_item(uint64_t v)
{
    char s[24];
    snprintf(s, sizeof s, "%" PRIu64, v);
    return v <= S_EXACT ? cJSON_CreateRaw(s) : cJSON_CreateString(s);
}

static cJSON *s_u32s_item(const uint32_t *v, uint64_t n)
{
    cJSON *arr = cJSON_CreateArray();
    if (!arr)
        abort();
    for (uint64_t i = 0; i < n; i++)
        s_push(arr, cJSON_CreateNumber(v[i]));
    return arr;
}

/* A double, null for NaN and infinities; with 17 digits, which read back to the same double
 * (cJSON's own printing settles for 15 when they come within an epsilon). */
static cJSON *s_f64_item(double v)
{
    if (!isfinite(v))
        return cJSON_CreateNull();
    char s[32];
    snprintf(s, sizeof s, "%.17g", v);
    return cJSON_CreateRaw(s);
}

static cJSON *s_member_json(const member_t *m)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        abort();
    s_add(o, "id", cJSON_CreateString(m->id));
    s_add(o, "host", cJSON_CreateString(m->host));
    s_add(o, "pid", s_u64_item(m->pid));
    s_add(o, "device_kind", cJSON_CreateString(m->device_kind));
    s_add(o, "device_name", cJSON_CreateString(m->device_name));
    s_add(o, "device_index", s_u64_item(m->device_index));
    s_add(o, "data_endpoint", cJSON_CreateString(m->data_endpoint));
    cJSON *mem = s_add(o, "memory", cJSON_CreateArray());
    for (int t = 0; t < PROTO_TIERS; t++)
        s_push(mem, s_u64_item(m->mem_total[t]));
    s_add(o, "rank", m->placed ? s_u64_item(m->rank) : cJSON_CreateNull());
    s_add(o, "leaving", cJSON_CreateBool(m->leaving));
    s_add(o, "acked_generation", s_u64_item(m->acked_gen));
    return o;
}

static cJSON *s_rebalance_json(const status_rebalance_t *r)
{
    cJSON *o = cJSON_CreateObject();
    if (!o)
        abort();
    s_add(o, "generation", s_u64_item(r->generation));
    s_add(o, "at_step", s_u64_item(r->at_step));
    s_add(o, "time", s_f64_item(r->time));
    s_add(o, "why", cJSON_CreateString(r->why));
    s_add(o, "moved", s_u64_item(r->moved));
    s_add(o, "bytes", s_u64_item(r->bytes));
    s_add(o, "before", s_f64_item(r->before));
    s_add(o, "after", s_f64_item(r->after));
    s_add(o, "duration_ms", s_f64_item(r->duration_ms));
    return o;
}

/* The whole state as JSON text (caller frees). */
static char *s_to_json(const state_t *st)
{
    cJSON *root = cJSON_CreateObject();
    if (!root)
        abort();
    char run[17];
    snprintf(run, sizeof run, "%016" PRIx64, st->run_id);
    s_add(root, "format", cJSON_CreateString(STATE_FORMAT));
    s_add(root, "version", cJSON_CreateNumber(STATE_VERSION));
    s_add(root, "written", cJSON_CreateNumber((double)clock_wall_ms() / 1000.0));
    s_add(root, "run_id", cJSON_CreateString(run));
    s_add(root, "started", cJSON_CreateBool(st->started));
    s_add(root, "stopped", cJSON_CreateBool(st->stopped));
    s_add(root, "step", s_u64_item(st->step));
    s_add(root, "training", cJSON_CreateBool(st->training));
    s_add(root, "generation", s_u64_item(st->generation));
    s_add(root, "plan_step", s_u64_item(st->plan_step));
    s_add(root, "last_reconfig_ms", s_f64_item(st->last_reconfig_ms < 0 ? NAN
                                                                         : st->last_reconfig_ms));
    cJSON *c = s_add(root, "counters", cJSON_CreateObject());
    s_add(c, "joins", s_u64_item(st->counters.joins));
    s_add(c, "leaves", s_u64_item(st->counters.leaves));
    s_add(c, "deaths", s_u64_item(st->counters.deaths));
    s_add(c, "generations", s_u64_item(st->counters.generations));
    s_add(c, "restarts", s_u64_item(st->counters.restarts));
    cJSON *k = s_add(root, "reconfigurations", cJSON_CreateObject());
    for (int i = 0; i < STATUS_WHY_KINDS; i++)
        s_add(k, status_why_names[i], s_u64_item(st->by_kind[i]));
    cJSON *h = s_add(root, "rebalances", cJSON_CreateArray());
    for (uint32_t i = 0; i < st->n_rebalances; i++)
        s_push(h, s_rebalance_json(&st->rebalances[i]));
    cJSON *pl = s_add(root, "placement", st->world ? cJSON_CreateObject() : cJSON_CreateNull());
    if (st->world) {
        s_add(pl, "world", s_u64_item(st->world));
        s_add(pl, "holder_offsets", s_u32s_item(st->holder_offsets, st->n_total + 1));
        s_add(pl, "holders", s_u32s_item(st->holders, st->holder_offsets[st->n_total]));
    }
    cJSON *load = s_add(root, "load", st->load ? cJSON_CreateArray() : cJSON_CreateNull());
    for (uint64_t e = 0; st->load && e < st->n_total; e++)
        s_push(load, s_f64_item(st->load[e]));
    cJSON *ms = s_add(root, "members", cJSON_CreateArray());
    for (const member_t *m = members_first(st->members); m; m = m->next)
        s_push(ms, s_member_json(m));
    s_add(root, "job", cJSON_CreateString(st->job));
    char *text = cJSON_Print(root);
    cJSON_Delete(root);
    if (!text)
        abort();
    return text;
}

/* Writes all of text to fd. */
static bool s_write_all(int fd, const char *text, size_t len)
{
    while (len > 0) {
        ssize_t n = write(fd, text, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return false;
        text += n;
        len -= (size_t)n;
    }
    return true;
}

semoe_rc state_store_save(state_store_t *self, const state_t *st)
{
    char *text = s_to_json(st);
    size_t len = strlen(text);
    semoe_rc rc = SEMOE_OK;
    int fd = open(self->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s: cannot create", self->tmp);
    else if (!s_write_all(fd, text, len) || !s_write_all(fd, "\n", 1))
        rc = semoe_err_errno(SEMOE_EIO, "%s: cannot write", self->tmp);
    else if (fsync(fd) != 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s: fsync", self->tmp);
    if (fd >= 0 && close(fd) != 0 && rc == SEMOE_OK)
        rc = semoe_err_errno(SEMOE_EIO, "%s: close", self->tmp);
    /* the rename replaces the old state whole; the directory's fsync makes it durable */
    if (rc == SEMOE_OK && rename(self->tmp, self->path) != 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s: cannot rename onto %s", self->tmp, self->path);
    if (rc == SEMOE_OK && fsync(self->dir_fd) != 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s: fsync of its directory", self->path);
    free(text);
    return rc;
}

/* --- reading ---------------------------------------------------------------------------------- */

/* The reader: where in the file it is ("members[2]: "), and the first problem found. */
typedef struct {
    char at[48];
    char why[256];
} s_rd_t;

/* Notes a problem (the first one is kept, with where it was); returns false. */
static bool __attribute__((format(printf, 2, 3))) s_bad(s_rd_t *rd, const char *fmt, ...)
{
    if (rd->why[0])
        return false;
    size_t n = (size_t)snprintf(rd->why, sizeof rd->why, "%s", rd->at);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rd->why + n, sizeof rd->why - n, fmt, ap);
    va_end(ap);
    return false;
}

static const cJSON *s_item(const cJSON *obj, const char *key)
{
    return cJSON_GetObjectItemCaseSensitive(obj, key);
}

/* v as a u64 (a whole number >= 0 that a double holds exactly, or a decimal string) no more
 * than max; what names it in messages. */
static bool s_u64_of(s_rd_t *rd, const cJSON *v, const char *what, uint64_t max, uint64_t *out)
{
    if (cJSON_IsNumber(v) && v->valuedouble >= 0 && v->valuedouble <= (double)S_EXACT &&
        v->valuedouble == floor(v->valuedouble)) {
        *out = (uint64_t)v->valuedouble;
    } else if (cJSON_IsString(v) && v->valuestring[0] && strlen(v->valuestring) <= 20 &&
               strspn(v->valuestring, "0123456789") == strlen(v->valuestring)) {
        errno = 0;
        *out = strtoull(v->valuestring, NULL, 10);
        if (errno)
            return s_bad(rd, "%s: %s is out of range", what, v->valuestring);
    } else {
        return s_bad(rd, "%s: want a whole number >= 0", what);
    }
    if (*out > max)
        return s_bad(rd, "%s: %" PRIu64 " is more than %" PRIu64, what, *out, max);
    return true;
}

/* obj.key as a u64 (s_u64_of). */
static bool s_u64(s_rd_t *rd, const cJSON *obj, const char *key, uint64_t max, uint64_t *out)
{
    char what[64];
    snprintf(what, sizeof what, "\"%s\"", key);
    return s_u64_of(rd, s_item(obj, key), what, max, out);
}

static bool s_u32(s_rd_t *rd, const cJSON *obj, const char *key, uint32_t max, uint32_t *out)
{
    uint64_t v = 0;
    if (!s_u64(rd, obj, key, max, &v))
        return false;
    *out = (uint32_t)v;
    return true;
}

/* obj.key as a double: a number, or null (NaN). */
static bool s_f64(s_rd_t *rd, const cJSON *obj, const char *key, double *out)
{
    const cJSON *v = s_item(obj, key);
    if (cJSON_IsNumber(v))
        *out = v->valuedouble;
    else if (cJSON_IsNull(v))
        *out = NAN;
    else
        return s_bad(rd, "\"%s\": want a number or null", key);
    return true;
}

static bool s_bool(s_rd_t *rd, const cJSON *obj, const char *key, bool *out)
{
    const cJSON *v = s_item(obj, key);
    if (!cJSON_IsBool(v))
        return s_bad(rd, "\"%s\": want true or false", key);
    *out = cJSON_IsTrue(v);
    return true;
}

/* obj.key as a string of at most max bytes, copied into out (max + 1 bytes). */
static bool s_str(s_rd_t *rd, const cJSON *obj, const char *key, char *out, size_t max)
{
    const cJSON *v = s_item(obj, key);
    if (!cJSON_IsString(v) || strlen(v->valuestring) > max)
        return s_bad(rd, "\"%s\": want a string of at most %zu bytes", key, max);
    memcpy(out, v->valuestring, strlen(v->valuestring) + 1);
    return true;
}

static const cJSON *s_array(s_rd_t *rd, const cJSON *obj, const char *key, int max)
{
    const cJSON *v = s_item(obj, key);
    if (!cJSON_IsArray(v) || cJSON_GetArraySize(v) > max) {
        s_bad(rd, "\"%s\": want an array of at most %d entries", key, max);
        return NULL;
    }
    return v;
}

/* One member, added unbound to members. */
static bool s_read_member(s_rd_t *rd, const cJSON *o, uint32_t world, members_t *members)
{
    proto_join_t j = {0};
    uint64_t mem[PROTO_TIERS] = {0};
    if (!cJSON_IsObject(o))
        return s_bad(rd, "want an object");
    const cJSON *mv = s_array(rd, o, "memory", PROTO_TIERS);
    if (!s_str(rd, o, "id", j.id, PROTO_MAX_NAME) ||
        !s_str(rd, o, "host", j.host, PROTO_MAX_HOST) ||
        !s_u32(rd, o, "pid", UINT32_MAX, &j.pid) ||
        !s_str(rd, o, "device_kind", j.device_kind, sizeof j.device_kind - 1) ||
        !s_str(rd, o, "device_name", j.device_name, PROTO_MAX_NAME) ||
        !s_u32(rd, o, "device_index", 1024, &j.device_index) ||
        !s_str(rd, o, "data_endpoint", j.data_endpoint, PROTO_MAX_ENDPOINT) || !mv)
        return false;
    for (int t = 0; t < PROTO_TIERS; t++)
        if (!s_u64_of(rd, cJSON_GetArrayItem(mv, t), "\"memory\"", UINT64_MAX, &mem[t]))
            return false;
    j.mem_hbm = mem[PROTO_TIER_HBM], j.mem_host = mem[PROTO_TIER_HOST];
    j.mem_ssd = mem[PROTO_TIER_SSD];
    const char *bad = members_join_invalid(&j);
    if (bad)
        return s_bad(rd, "%s: %s", j.id, bad);
    if (members_by_id(members, j.id))
        return s_bad(rd, "%s is listed twice", j.id);
    bool placed = !cJSON_IsNull(s_item(o, "rank")), leaving = false;
    uint64_t acked = 0;
    uint32_t rank = PROTO_NO_RANK;
    if (!s_bool(rd, o, "leaving", &leaving) ||
        !s_u64(rd, o, "acked_generation", UINT64_MAX, &acked) ||
        (placed && !s_u32(rd, o, "rank", PROTO_MAX_WORKERS - 1, &rank)))
        return false;
    if (placed && rank >= world)
        return s_bad(rd, "%s: rank %u, the placement has %u ranks", j.id, rank, world);
    member_t *m = members_add_unbound(members, j.id);
    if (!m)
        return s_bad(rd, "more than %d members", PROTO_MAX_WORKERS);
    members_set_caps(m, &j);
    m->placed = placed;
    m->leaving = leaving;
    m->rank = rank;
    m->acked_gen = acked;
    return true;
}

/* No two placed members have one rank. */
static bool s_check_ranks(s_rd_t *rd, const members_t *members, uint32_t world)
{
    bool *seen = semoe_xcalloc(world ? world : 1, sizeof *seen), ok = true;
    for (const member_t *m = members_first(members); ok && m; m = m->next) {
        if (m->placed && seen[m->rank])
            ok = s_bad(rd, "members: %s: rank %u is another member's too", m->id, m->rank);
        if (m->placed)
            seen[m->rank] = true;
    }
    free(seen);
    return ok;
}

/* A u32 array of exactly n entries of at most max, into a new array (*out, the state's). */
static bool s_read_u32s(s_rd_t *rd, const cJSON *obj, const char *key, uint64_t n, uint32_t max,
                        uint32_t **out)
{
    const cJSON *arr = s_item(obj, key), *v;
    if (!cJSON_IsArray(arr) || (uint64_t)cJSON_GetArraySize(arr) != n)
        return s_bad(rd, "\"%s\": want %" PRIu64 " entries", key, n);
    uint32_t *a = semoe_xmalloc((n ? n : 1) * sizeof *a);
    *out = a;
    uint64_t i = 0;
    cJSON_ArrayForEach(v, arr)
    {
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || v->valuedouble > max ||
            v->valuedouble != floor(v->valuedouble))
            return s_bad(rd, "\"%s\": entry %" PRIu64 " is not a whole number from 0 to %u",
                         key, i, max);
        a[i++] = (uint32_t)v->valuedouble;
    }
    return true;
}

/* The placement: null, or world ranks, ascending offsets from 0, every expert on at least one
 * rank and on no rank twice. */
static bool s_read_placement(s_rd_t *rd, const cJSON *root, state_t *st)
{
    const cJSON *pl = s_item(root, "placement");
    if (cJSON_IsNull(pl))
        return true;
    uint32_t *off = NULL, *holders = NULL;
    if (!cJSON_IsObject(pl))
        return s_bad(rd, "\"placement\": want null or an object");
    snprintf(rd->at, sizeof rd->at, "placement: ");
    if (!s_u32(rd, pl, "world", PROTO_MAX_WORKERS, &st->world) || st->world == 0)
        return s_bad(rd, "\"world\": want 1 or more");
    bool ok = s_read_u32s(rd, pl, "holder_offsets", st->n_total + 1, PROTO_MAX_HOLDERS, &off);
    st->holder_offsets = off;
    for (uint64_t e = 0; ok && e < st->n_total; e++)
        if (off[e + 1] <= off[e] || off[0] != 0)
            ok = s_bad(rd, "expert %" PRIu64 " has no holder, or the offsets do not ascend "
                       "from 0", e);
    ok = ok && s_read_u32s(rd, pl, "holders", off[st->n_total], st->world - 1, &holders);
    st->holders = holders;
    uint64_t *last = ok ? semoe_xcalloc(st->world, sizeof *last) : NULL; // 1 + expert, by rank
    for (uint64_t e = 0; ok && e < st->n_total; e++)
        for (uint32_t i = off[e]; ok && i < off[e + 1]; i++) {
            if (last[holders[i]] == e + 1)
                ok = s_bad(rd, "expert %" PRIu64 " twice on rank %u", e, holders[i]);
            last[holders[i]] = e + 1;
        }
    free(last);
    rd->at[0] = 0;
    return ok;
}

static bool s_read_rebalance(s_rd_t *rd, const cJSON *o, status_rebalance_t *r)
{
    if (!cJSON_IsObject(o))
        return s_bad(rd, "want an object");
    return s_u64(rd, o, "generation", UINT64_MAX, &r->generation) &&
           s_u64(rd, o, "at_step", UINT64_MAX, &r->at_step) && s_f64(rd, o, "time", &r->time) &&
           s_str(rd, o, "why", r->why, STATUS_WHY_MAX - 1) &&
           s_u64(rd, o, "moved", UINT64_MAX, &r->moved) &&
           s_u64(rd, o, "bytes", UINT64_MAX, &r->bytes) && s_f64(rd, o, "before", &r->before) &&
           s_f64(rd, o, "after", &r->after) && s_f64(rd, o, "duration_ms", &r->duration_ms);
}

/* The scalars, the counters and the history. */
static bool s_read_top(s_rd_t *rd, const cJSON *root, state_t *st)
{
    const cJSON *run = s_item(root, "run_id");
    char *end = NULL;
    st->run_id = cJSON_IsString(run) && strlen(run->valuestring) == 16
                     ? strtoull(run->valuestring, &end, 16) : 0;
    if (st->run_id == 0 || !end || *end)
        return s_bad(rd, "\"run_id\": want 16 hex digits, not all zero");
    const cJSON *c = s_item(root, "counters"), *k = s_item(root, "reconfigurations");
    if (!s_bool(rd, root, "started", &st->started) || !s_bool(rd, root, "stopped", &st->stopped) ||
        !s_u64(rd, root, "step", UINT64_MAX, &st->step) ||
        !s_bool(rd, root, "training", &st->training) ||
        !s_u64(rd, root, "generation", UINT64_MAX - 1, &st->generation) ||
        !s_u64(rd, root, "plan_step", UINT64_MAX, &st->plan_step) ||
        !s_f64(rd, root, "last_reconfig_ms", &st->last_reconfig_ms))
        return false;
    if (!cJSON_IsObject(c) || !cJSON_IsObject(k))
        return s_bad(rd, "\"counters\" and \"reconfigurations\": want objects");
    snprintf(rd->at, sizeof rd->at, "counters: ");
    if (!s_u64(rd, c, "joins", UINT64_MAX, &st->counters.joins) ||
        !s_u64(rd, c, "leaves", UINT64_MAX, &st->counters.leaves) ||
        !s_u64(rd, c, "deaths", UINT64_MAX, &st->counters.deaths) ||
        !s_u64(rd, c, "generations", UINT64_MAX, &st->counters.generations) ||
        !s_u64(rd, c, "restarts", UINT64_MAX, &st->counters.restarts))
        return false;
    snprintf(rd->at, sizeof rd->at, "reconfigurations: ");
    for (int i = 0; i < STATUS_WHY_KINDS; i++)
        if (!s_u64(rd, k, status_why_names[i], UINT64_MAX, &st->by_kind[i]))
            return false;
    rd->at[0] = 0;
    if (isnan(st->last_reconfig_ms))
        st->last_reconfig_ms = -1;
    const cJSON *h = s_array(rd, root, "rebalances", RECONFIG_HISTORY), *v;
    if (!h)
        return false;
    status_rebalance_t *hist = semoe_xcalloc(RECONFIG_HISTORY, sizeof *hist);
    st->rebalances = hist;
    cJSON_ArrayForEach(v, h)
    {
        snprintf(rd->at, sizeof rd->at, "rebalances[%u]: ", st->n_rebalances);
        if (!s_read_rebalance(rd, v, &hist[st->n_rebalances]))
            return false;
        st->n_rebalances++;
    }
    rd->at[0] = 0;
    return true;
}

/* The smoothed loads: null, or n_total numbers >= 0. */
static bool s_read_load(s_rd_t *rd, const cJSON *root, state_t *st)
{
    const cJSON *arr = s_item(root, "load"), *v;
    if (cJSON_IsNull(arr))
        return true;
    if (!cJSON_IsArray(arr) || (uint64_t)cJSON_GetArraySize(arr) != st->n_total)
        return s_bad(rd, "\"load\": want null or %" PRIu64 " numbers (the job's layers x "
                     "experts)", st->n_total);
    double *load = semoe_xmalloc(st->n_total * sizeof *load);
    st->load = load;
    uint64_t e = 0;
    cJSON_ArrayForEach(v, arr)
    {
        if (!cJSON_IsNumber(v) || !(v->valuedouble >= 0) || !isfinite(v->valuedouble))
            return s_bad(rd, "\"load\": entry %" PRIu64 " is not a number >= 0", e);
        load[e++] = v->valuedouble;
    }
    return true;
}

/* The job: it must parse, as it will be given to workers; its model sizes the rest. */
static bool s_read_job(s_rd_t *rd, const cJSON *root, state_t *st)
{
    const cJSON *job = s_item(root, "job");
    if (!cJSON_IsString(job))
        return s_bad(rd, "\"job\": want the job spec as a string");
    model_job_t *spec = NULL;
    if (model_job_parse(job->valuestring, strlen(job->valuestring), "saved job", &spec) !=
        SEMOE_OK)
        return s_bad(rd, "\"job\": %s", semoe_err_msg());
    st->n_total = (uint64_t)spec->model.num_hidden_layers * spec->model.num_local_experts;
    model_job_destroy(&spec);
    if (st->n_total == 0 || st->n_total > PROTO_MAX_EXPERTS)
        return s_bad(rd, "\"job\": %" PRIu64 " experts in all, want 1 to %u", st->n_total,
                     PROTO_MAX_EXPERTS);
    st->job = semoe_xstrdup(job->valuestring);
    return true;
}

/* Everything in root into st, checked. */
static bool s_read(s_rd_t *rd, const cJSON *root, state_t *st)
{
    const cJSON *fmt = s_item(root, "format"), *ver = s_item(root, "version");
    if (!cJSON_IsObject(root) || !cJSON_IsString(fmt) || strcmp(fmt->valuestring, STATE_FORMAT))
        return s_bad(rd, "not a coordinator state (want an object with \"format\": \"%s\")",
                     STATE_FORMAT);
    if (!cJSON_IsNumber(ver) || ver->valuedouble != STATE_VERSION)
        return s_bad(rd, "version %g: this semoe-coordinator reads version %d",
                     cJSON_IsNumber(ver) ? ver->valuedouble : NAN, STATE_VERSION);
    if (!s_read_job(rd, root, st) || !s_read_top(rd, root, st) || !s_read_load(rd, root, st) ||
        !s_read_placement(rd, root, st))
        return false;
    const cJSON *ms = s_array(rd, root, "members", PROTO_MAX_WORKERS), *m;
    if (!ms)
        return false;
    st->members = members_new();
    uint32_t i = 0;
    cJSON_ArrayForEach(m, ms)
    {
        snprintf(rd->at, sizeof rd->at, "members[%u]: ", i++);
        if (!s_read_member(rd, m, st->world, st->members))
            return false;
    }
    rd->at[0] = 0;
    return s_check_ranks(rd, st->members, st->world);
}

semoe_rc state_store_load(state_store_t *self, state_t **out)
{
    *out = NULL;
    int fd = open(self->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT)
        return SEMOE_OK; // a fresh start
    if (fd < 0)
        return semoe_err_errno(SEMOE_EINVAL, "%s: cannot open", self->path);
    struct stat sb;
    char *text = NULL;
    size_t len = 0;
    semoe_rc rc = SEMOE_OK;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size > (off_t)1 << 32) {
        rc = semoe_err(SEMOE_EINVAL, "%s: not a regular file of at most 4 GiB", self->path);
    } else {
        text = semoe_xmalloc((size_t)sb.st_size + 1);
        while (len < (size_t)sb.st_size) {
            ssize_t n = read(fd, text + len, (size_t)sb.st_size - len);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            len += (size_t)n;
        }
        text[len] = 0;
        if (len != (size_t)sb.st_size)
            rc = semoe_err_errno(SEMOE_EINVAL, "%s: cannot read", self->path);
    }
    close(fd);
    if (rc != SEMOE_OK) {
        free(text);
        return rc;
    }
    s_rd_t rd = {.at = ""};
    state_t *st = semoe_xcalloc(1, sizeof *st);
    st->last_reconfig_ms = -1;
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, false);
    if (!root)
        s_bad(&rd, "not JSON (cut short or damaged near byte %td of %zu)",
              end ? end - text : (ptrdiff_t)0, len);
    else
        s_read(&rd, root, st);
    cJSON_Delete(root);
    free(text);
    if (rd.why[0]) {
        state_destroy(&st);
        return semoe_err(SEMOE_EINVAL, "%s: %s: not a state this coordinator can take up (the "
                         "file is left as it is: move it away to start the job afresh)",
                         self->path, rd.why);
    }
    *out = st;
    return SEMOE_OK;
}

/* "line N: ... saved, ... given" for the first line where the saved job and the given one
 * differ, into out. */
static void s_first_diff(const char *saved, const char *given, char *out, size_t n)
{
    size_t at = 0, start = 0;
    int line = 1;
    for (; saved[at] && saved[at] == given[at]; at++)
        if (saved[at] == '\n') {
            line++;
            start = at + 1;
        }
    const char *a = saved + start, *b = given + start;
    a += strspn(a, " \t");
    b += strspn(b, " \t");
    snprintf(out, n, "line %d as workers get it: %.*s saved, %.*s given", line,
             (int)strcspn(a, "\n"), a, (int)strcspn(b, "\n"), b);
}

semoe_rc state_check_job(const state_store_t *self, const state_t *st, const char *job_json)
{
    if (strcmp(job_json, st->job) == 0)
        return SEMOE_OK;
    char where[256];
    s_first_diff(st->job, job_json, where, sizeof where);
    return semoe_err(SEMOE_EINVAL, "--config: the job differs from the one %s was saved with "
                     "(%s); leave --config out to go on with the saved job, or give another "
                     "--state-dir to start a new one", self->path, where);
}

void state_destroy(state_t **st_p)
{
    state_t *st = *st_p;
    if (!st)
        return;
    free((void *)st->job); // state_store_load's own copies
    free((void *)st->load);
    free((void *)st->rebalances);
    free((void *)st->holder_offsets);
    free((void *)st->holders);
    members_destroy(&st->members);
    free(st);
    *st_p = NULL;
}
