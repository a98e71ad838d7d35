/* worker/commid.h: one slot (the newest generation's id) under a mutex, a condition variable on
 * the monotonic clock for the waiter. */
#include "worker/commid.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct worker_commid {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool have;
    uint64_t gen;
    size_t len;
    uint8_t id[WORKER_COMMID_MAX];
};

worker_commid_t *worker_commid_new(void)
{
    worker_commid_t *self = semoe_xcalloc(1, sizeof *self);
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, &a);
    pthread_condattr_destroy(&a);
    return self;
}

void worker_commid_destroy(worker_commid_t **self_p)
{
    if (!self_p || !*self_p)
        return;
    worker_commid_t *self = *self_p;
    pthread_cond_destroy(&self->cv);
    pthread_mutex_destroy(&self->mu);
    free(self);
    *self_p = NULL;
}

void worker_commid_reset(worker_commid_t *self)
{
    pthread_mutex_lock(&self->mu);
    self->have = false;
    self->gen = 0;
    self->len = 0;
    pthread_mutex_unlock(&self->mu);
}

semoe_rc worker_commid_put(worker_commid_t *self, uint64_t gen, const uint8_t *id, size_t len)
{
    if (len > WORKER_COMMID_MAX)
        return semoe_err(SEMOE_EINVAL, "communicator id of %zu bytes (at most %d)", len,
                         WORKER_COMMID_MAX);
    pthread_mutex_lock(&self->mu);
    if (!self->have || gen >= self->gen) {
        self->have = true;
        self->gen = gen;
        self->len = len;
        memcpy(self->id, id, len);
        pthread_cond_broadcast(&self->cv);
    }
    pthread_mutex_unlock(&self->mu);
    return SEMOE_OK;
}

static int64_t s_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

semoe_rc worker_commid_wait(worker_commid_t *self, uint64_t gen, uint8_t *id, size_t cap,
                            size_t *len, int timeout_ms, bool (*interrupted)(void *arg),
                            void *arg)
{
    int64_t end = s_now_ms() + timeout_ms;
    semoe_rc rc = SEMOE_ETIMEDOUT;
    pthread_mutex_lock(&self->mu);
    for (;;) {
        if (self->have && self->gen == gen) {
            rc = self->len <= cap ? SEMOE_OK : SEMOE_EPROTO;
            if (rc == SEMOE_OK) {
                memcpy(id, self->id, self->len);
                *len = self->len;
            }
            break;
        }
        if (self->have && self->gen > gen) {
            rc = SEMOE_ESTOPPED;
            break;
        }
        int64_t now = s_now_ms();
        if (now >= end)
            break;
        if (interrupted && interrupted(arg)) {
            rc = SEMOE_ESTOPPED;
            break;
        }
        int64_t until = now + 10 < end ? now + 10 : end;
        struct timespec ts = {until / 1000, (long)(until % 1000) * 1000000};
        pthread_cond_timedwait(&self->cv, &self->mu, &ts);
    }
    uint64_t have_gen = self->gen;
    bool have = self->have;
    size_t have_len = self->len;
    pthread_mutex_unlock(&self->mu);
    if (rc == SEMOE_ETIMEDOUT)
        return semoe_err(rc, "no communicator id for generation %" PRIu64 " after %d ms%s",
                         gen, timeout_ms, have ? " (only an older one)" : "");
    if (rc == SEMOE_ESTOPPED)
        return semoe_err(rc, "waiting for the communicator id of generation %" PRIu64 ": %s",
                         gen, have && have_gen > gen ? "a newer generation began"
                                                     : "interrupted");
    if (rc == SEMOE_EPROTO)
        return semoe_err(rc, "the communicator id of generation %" PRIu64 " is %zu bytes "
                         "(at most %zu here)", gen, have_len, cap);
    return SEMOE_OK;
}
