/* The membership table (members.h): members in a doubly linked list in join order, found by
 * routing id and by worker id through two open-addressing hash maps, plus the fence, a ring
 * of routing ids with its own map. */
#include "coordinator/members.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* --- a small open-addressing hash map of items that carry their own keys --------------------- */

typedef const uint8_t *(s_key_fn)(const void *item, size_t *len);

typedef struct {
    void **items;     // (cap) an item or NULL
    uint64_t *hashes; // (cap)
    uint32_t cap;     // a power of two, at least twice count
    uint32_t count;
    uint64_t seed;
    s_key_fn *key;
} s_map_t;

/* FNV-1a over the bytes from a random start, then a full avalanche (murmur3's finaliser). */
static uint64_t s_hash(uint64_t seed, const void *key, size_t len)
{
    const uint8_t *p = key;
    uint64_t h = seed ^ (len * 0x9E3779B97F4A7C15ull);
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ull;
    h ^= h >> 33;
    return h;
}

static void s_map_init(s_map_t *m, s_key_fn *key, uint64_t seed)
{
    m->cap = 64;
    m->count = 0;
    m->items = semoe_xcalloc(m->cap, sizeof *m->items);
    m->hashes = semoe_xcalloc(m->cap, sizeof *m->hashes);
    m->seed = seed;
    m->key = key;
}

static void s_map_free(s_map_t *m)
{
    free(m->items);
    free(m->hashes);
    m->items = NULL;
    m->hashes = NULL;
}

static void s_map_put_hashed(s_map_t *m, void *item, uint64_t h)
{
    uint32_t mask = m->cap - 1, i = (uint32_t)h & mask;
    while (m->items[i])
        i = (i + 1) & mask;
    m->items[i] = item;
    m->hashes[i] = h;
    m->count++;
}

static void s_map_grow(s_map_t *m)
{
    void **items = m->items;
    uint64_t *hashes = m->hashes;
    uint32_t cap = m->cap;
    m->cap = cap * 2;
    m->count = 0;
    m->items = semoe_xcalloc(m->cap, sizeof *m->items);
    m->hashes = semoe_xcalloc(m->cap, sizeof *m->hashes);
    for (uint32_t i = 0; i < cap; i++)
        if (items[i])
            s_map_put_hashed(m, items[i], hashes[i]);
    free(items);
    free(hashes);
}

/* The slot holding the item with this key, or -1. */
static int64_t s_map_find(const s_map_t *m, const void *key, size_t len)
{
    uint64_t h = s_hash(m->seed, key, len);
    uint32_t mask = m->cap - 1;
    for (uint32_t i = (uint32_t)h & mask; m->items[i]; i = (i + 1) & mask) {
        if (m->hashes[i] != h)
            continue;
        size_t klen;
        const uint8_t *k = m->key(m->items[i], &klen);
        if (klen == len && memcmp(k, key, len) == 0)
            return i;
    }
    return -1;
}

static void *s_map_get(const s_map_t *m, const void *key, size_t len)
{
    int64_t i = s_map_find(m, key, len);
    return i < 0 ? NULL : m->items[i];
}

/* Inserts item; its key must not be in the map. */
static void s_map_put(s_map_t *m, void *item)
{
    if (2 * (m->count + 1) > m->cap)
        s_map_grow(m);
    size_t len;
    const uint8_t *k = m->key(item, &len);
    s_map_put_hashed(m, item, s_hash(m->seed, k, len));
}

/* Removes the item with this key, if any, shifting the entries after it back so that no
 * probe sequence is broken (no tombstones to accumulate under churn). */
static void s_map_del(s_map_t *m, const void *key, size_t len)
{
    int64_t found = s_map_find(m, key, len);
    if (found < 0)
        return;
    uint32_t mask = m->cap - 1, hole = (uint32_t)found;
    for (uint32_t i = (hole + 1) & mask; m->items[i]; i = (i + 1) & mask) {
        uint32_t home = (uint32_t)m->hashes[i] & mask;
        // The entry at i may fill the hole if its home is not cyclically in (hole, i].
        bool in_between = hole <= i ? (home > hole && home <= i) : (home > hole || home <= i);
        if (!in_between) {
            m->items[hole] = m->items[i];
            m->hashes[hole] = m->hashes[i];
            hole = i;
        }
    }
    m->items[hole] = NULL;
    m->count--;
}

/* --- the table --------------------------------------------------------------------------------- */

typedef struct {
    uint8_t len; // 0: an empty ring slot
    uint8_t rid[MEMBERS_MAX_RID];
} s_fence_t;

struct members {
    member_t *head, *tail;
    uint32_t count;
    uint32_t unbound;  // members without a routing id
    uint64_t join_seq;
    s_map_t by_rid, by_id;
    s_fence_t *fence; // (MEMBERS_FENCE_MAX) a ring, allocated on first use
    uint32_t fence_next;
    s_map_t fenced;
};

static const uint8_t *s_key_rid(const void *item, size_t *len)
{
    const member_t *m = item;
    *len = m->rid_len;
    return m->rid;
}

static const uint8_t *s_key_id(const void *item, size_t *len)
{
    const member_t *m = item;
    *len = strlen(m->id);
    return (const uint8_t *)m->id;
}

static const uint8_t *s_key_fence(const void *item, size_t *len)
{
    const s_fence_t *f = item;
    *len = f->len;
    return f->rid;
}

static uint64_t s_seed(void)
{
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, GRND_NONBLOCK) != (ssize_t)sizeof seed) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        seed = (uint64_t)ts.tv_nsec * 0x9E3779B97F4A7C15ull ^ (uint64_t)ts.tv_sec;
    }
    return seed;
}

members_t *members_new(void)
{
    members_t *self = semoe_xcalloc(1, sizeof *self);
    uint64_t seed = s_seed();
    s_map_init(&self->by_rid, s_key_rid, seed);
    s_map_init(&self->by_id, s_key_id, seed ^ 0x5bd1e9955bd1e995ull);
    s_map_init(&self->fenced, s_key_fence, seed ^ 0xc2b2ae3d27d4eb4full);
    return self;
}

void members_destroy(members_t **self_p)
{
    members_t *self = *self_p;
    if (!self)
        return;
    for (member_t *m = self->head, *next; m; m = next) {
        next = m->next;
        free(m->experts);
        free(m->load_last);
        free(m->status_part);
        free(m);
    }
    s_map_free(&self->by_rid);
    s_map_free(&self->by_id);
    s_map_free(&self->fenced);
    free(self->fence);
    free(self);
    *self_p = NULL;
}

uint32_t members_count(const members_t *self) { return self->count; }

member_t *members_by_rid(const members_t *self, const void *rid, size_t rid_len)
{
    return s_map_get(&self->by_rid, rid, rid_len);
}

member_t *members_by_id(const members_t *self, const char *id)
{
    return s_map_get(&self->by_id, id, strlen(id));
}

/* Links a new member with this id last in join order (and into the id map). */
static member_t *s_link(members_t *self, const char *id)
{
    member_t *m = semoe_xcalloc(1, sizeof *m);
    snprintf(m->id, sizeof m->id, "%s", id);
    m->state = MEMBER_SYNCING;
    members_clear_progress(m);
    m->join_seq = ++self->join_seq;
    m->prev = self->tail;
    if (self->tail)
        self->tail->next = m;
    else
        self->head = m;
    self->tail = m;
    self->count++;
    s_map_put(&self->by_id, m);
    return m;
}

member_t *members_add(members_t *self, const void *rid, size_t rid_len, const char *id)
{
    if (self->count >= PROTO_MAX_WORKERS || rid_len == 0 || rid_len > MEMBERS_MAX_RID)
        return NULL;
    member_t *m = s_link(self, id);
    self->unbound++;
    members_bind(self, m, rid, rid_len);
    return m;
}

member_t *members_add_unbound(members_t *self, const char *id)
{
    if (self->count >= PROTO_MAX_WORKERS)
        return NULL;
    self->unbound++;
    return s_link(self, id);
}

void members_bind(members_t *self, member_t *m, const void *rid, size_t rid_len)
{
    if (members_bound(m) || rid_len == 0 || rid_len > MEMBERS_MAX_RID)
        return;
    memcpy(m->rid, rid, rid_len);
    m->rid_len = (uint8_t)rid_len;
    self->unbound--;
    s_map_put(&self->by_rid, m);
    members_unfence(self, rid, rid_len);
}

uint32_t members_unbound(const members_t *self) { return self->unbound; }

void members_rename(members_t *self, member_t *m, const char *id)
{
    s_map_del(&self->by_id, m->id, strlen(m->id));
    snprintf(m->id, sizeof m->id, "%s", id);
    s_map_put(&self->by_id, m);
}

void members_remove(members_t *self, member_t *m)
{
    if (members_bound(m))
        s_map_del(&self->by_rid, m->rid, m->rid_len);
    else
        self->unbound--;
    s_map_del(&self->by_id, m->id, strlen(m->id));
    if (m->prev)
        m->prev->next = m->next;
    else
        self->head = m->next;
    if (m->next)
        m->next->prev = m->prev;
    else
        self->tail = m->prev;
    self->count--;
    free(m->experts);
    free(m->load_last);
    free(m->status_part);
    free(m);
}

member_t *members_first(const members_t *self) { return self->head; }

uint32_t members_renumber(members_t *self)
{
    uint32_t r = 0;
    for (member_t *m = self->head; m; m = m->next)
        m->rank = m->leaving ? PROTO_NO_RANK : r++;
    return r;
}

static bool s_printable(const char *s, bool spaces)
{
    for (; *s; s++)
        if ((unsigned char)*s < (spaces ? 0x20 : 0x21) || (unsigned char)*s > 0x7e)
            return false;
    return true;
}

const char *members_join_invalid(const proto_join_t *j)
{
    if (!j->id[0])
        return "id is empty";
    if (!s_printable(j->id, false))
        return "id must be printable ASCII, no spaces";
    if (strcmp(j->device_kind, "cpu") != 0 && strcmp(j->device_kind, "cuda") != 0)
        return "device_kind must be cpu or cuda";
    if (!j->data_endpoint[0])
        return "data_endpoint is empty";
    if (!s_printable(j->data_endpoint, false) || !s_printable(j->host, true) ||
        !s_printable(j->device_name, true))
        return "host, device_name and data_endpoint must be printable ASCII";
    return NULL;
}

void members_set_caps(member_t *m, const proto_join_t *j)
{
    snprintf(m->host, sizeof m->host, "%s", j->host);
    snprintf(m->device_kind, sizeof m->device_kind, "%s", j->device_kind);
    snprintf(m->device_name, sizeof m->device_name, "%s", j->device_name);
    snprintf(m->data_endpoint, sizeof m->data_endpoint, "%s", j->data_endpoint);
    m->pid = j->pid;
    m->device_index = j->device_index;
    m->mem_total[PROTO_TIER_HBM] = j->mem_hbm;
    m->mem_total[PROTO_TIER_HOST] = j->mem_host;
    m->mem_total[PROTO_TIER_SSD] = j->mem_ssd;
    memset(m->mem_used, 0, sizeof m->mem_used);
    free(m->status_part);
    m->status_part = NULL;
}

void members_set_progress(member_t *m, const proto_heartbeat_t *h)
{
    m->mem_used[PROTO_TIER_HBM] = h->mem_hbm;
    m->mem_used[PROTO_TIER_HOST] = h->mem_host;
    m->mem_used[PROTO_TIER_SSD] = h->mem_ssd;
    m->step = h->step;
    m->step_time_us = h->step_time_us;
    // No step done, no loss; eval_step 0 says no evaluation (whatever the other field holds).
    m->loss = h->step > 0 ? h->loss : NAN;
    m->eval_loss = h->eval_step > 0 ? h->eval_loss : NAN;
    m->eval_step = h->eval_step;
    m->tokens_per_s = isfinite(h->tokens_per_s) && h->tokens_per_s > 0 ? h->tokens_per_s : 0;
    m->phase = h->phase;
    m->has_step = true;
}

void members_clear_progress(member_t *m)
{
    memset(m->mem_used, 0, sizeof m->mem_used);
    m->step = m->step_time_us = m->eval_step = 0;
    m->loss = m->eval_loss = NAN;
    m->tokens_per_s = 0;
    m->phase = PROTO_PHASE_IDLE;
    m->failed_logged = 0;
    m->has_step = m->has_load = false;
}

void members_set_experts(member_t *m, const uint32_t *experts, uint32_t n)
{
    m->experts = semoe_xrealloc(m->experts, (n ? n : 1) * sizeof *m->experts);
    if (n)
        memcpy(m->experts, experts, n * sizeof *experts);
    free(m->load_last);
    m->load_last = semoe_xcalloc(n ? n : 1, sizeof *m->load_last);
    m->n_experts = n;
    free(m->status_part);
    m->status_part = NULL;
}

/* --- the fence --------------------------------------------------------------------------------- */

void members_fence(members_t *self, const void *rid, size_t rid_len)
{
    if (rid_len == 0 || rid_len > MEMBERS_MAX_RID || members_fenced(self, rid, rid_len))
        return;
    if (!self->fence)
        self->fence = semoe_xcalloc(MEMBERS_FENCE_MAX, sizeof *self->fence);
    s_fence_t *f = &self->fence[self->fence_next];
    self->fence_next = (self->fence_next + 1) % MEMBERS_FENCE_MAX;
    if (f->len) // the ring is full: forget the oldest
        s_map_del(&self->fenced, f->rid, f->len);
    f->len = (uint8_t)rid_len;
    memcpy(f->rid, rid, rid_len);
    s_map_put(&self->fenced, f);
}

bool members_fenced(const members_t *self, const void *rid, size_t rid_len)
{
    return self->fenced.count > 0 && s_map_get(&self->fenced, rid, rid_len) != NULL;
}

void members_unfence(members_t *self, const void *rid, size_t rid_len)
{
    s_fence_t *f = self->fenced.count > 0 ? s_map_get(&self->fenced, rid, rid_len) : NULL;
    if (!f)
        return;
    s_map_del(&self->fenced, rid, rid_len);
    f->len = 0;
}
