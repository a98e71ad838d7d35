/* worker/commid.h (unit): the communicator id handed from the control actor's thread to the
 * trainer's. A waiter gets the id put from another thread after it began waiting (a condition
 * wait, not a poll of the clock); an id of an older generation does not satisfy it and a newer
 * one ends the wait (SEMOE_ESTOPPED); nothing within the timeout is SEMOE_ETIMEDOUT; the
 * interrupt callback ends it too; an id too long for the caller is SEMOE_EPROTO, and one over
 * WORKER_COMMID_MAX is refused when put; a reset (a new run) forgets the id, so that a lower
 * generation's is taken again. Random ids from the test seed. */
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>

#include "tests/harness.h"
#include "worker/commid.h"

typedef struct {
    worker_commid_t *box;
    uint64_t gen;
    uint8_t id[128];
    atomic_int waiting; /* set by the waiter just before it waits */
} s_put_t;

static bool s_is_waiting(void *arg)
{
    return atomic_load(&((s_put_t *)arg)->waiting) != 0;
}

static void *s_putter(void *arg)
{
    s_put_t *p = arg;
    test_wait_for(s_is_waiting, p, 10000);
    worker_commid_put(p->box, p->gen - 1, p->id, 64); /* an older one first: not it */
    worker_commid_put(p->box, p->gen, p->id, sizeof p->id);
    return NULL;
}

static atomic_int s_stop;
static bool s_interrupted(void *arg)
{
    (void)arg;
    return atomic_load(&s_stop) != 0;
}

static void *s_stopper(void *arg)
{
    test_wait_for(s_is_waiting, arg, 10000);
    atomic_store(&s_stop, 1);
    return NULL;
}

int main(void)
{
    test_init("commid");
    worker_commid_t *box = worker_commid_new();
    uint8_t got[WORKER_COMMID_MAX];
    size_t len = 0;

    /* put from another thread while waiting */
    s_put_t p = {.box = box, .gen = 5 + test_rand_below(100)};
    for (size_t i = 0; i < sizeof p.id; i++)
        p.id[i] = (uint8_t)test_rand();
    pthread_t th;
    pthread_create(&th, NULL, s_putter, &p);
    atomic_store(&p.waiting, 1);
    semoe_rc rc = worker_commid_wait(box, p.gen, got, sizeof got, &len, 10000, NULL, NULL);
    pthread_join(th, NULL);
    CHECK(rc == SEMOE_OK, "wait: %s", semoe_err_msg());
    CHECK(len == sizeof p.id && !memcmp(got, p.id, len), "the id came back as %zu other bytes",
          len);

    /* kept: a second wait for the same generation returns at once */
    rc = worker_commid_wait(box, p.gen, got, sizeof got, &len, 0, NULL, NULL);
    CHECK(rc == SEMOE_OK && len == sizeof p.id, "the kept id: rc %d", (int)rc);
    /* the generation before it is over */
    rc = worker_commid_wait(box, p.gen - 1, got, sizeof got, &len, 1000, NULL, NULL);
    CHECK(rc == SEMOE_ESTOPPED, "an older generation's wait gave %d", (int)rc);
    /* the next one has none yet */
    rc = worker_commid_wait(box, p.gen + 1, got, sizeof got, &len, 50, NULL, NULL);
    CHECK(rc == SEMOE_ETIMEDOUT, "no id for the next generation gave %d: %s", (int)rc,
          semoe_err_msg());
    /* an older id put later does not replace the newer one */
    worker_commid_put(box, p.gen - 3, p.id, 8);
    rc = worker_commid_wait(box, p.gen, got, sizeof got, &len, 0, NULL, NULL);
    CHECK(rc == SEMOE_OK && len == sizeof p.id, "an older put replaced the id: rc %d len %zu",
          (int)rc, len);
    /* too long for the caller, and too long to keep */
    rc = worker_commid_wait(box, p.gen, got, 16, &len, 0, NULL, NULL);
    CHECK(rc == SEMOE_EPROTO, "a 128-byte id into 16 bytes gave %d", (int)rc);
    static uint8_t big[WORKER_COMMID_MAX + 1];
    CHECK(worker_commid_put(box, p.gen + 1, big, sizeof big) == SEMOE_EINVAL,
          "an id over the maximum was kept");

    /* a new run: forgotten, and a lower generation's id is taken again */
    worker_commid_reset(box);
    rc = worker_commid_wait(box, p.gen, got, sizeof got, &len, 0, NULL, NULL);
    CHECK(rc == SEMOE_ETIMEDOUT, "after a reset the old id is still there (rc %d)", (int)rc);
    worker_commid_put(box, 1, p.id, 32);
    rc = worker_commid_wait(box, 1, got, sizeof got, &len, 0, NULL, NULL);
    CHECK(rc == SEMOE_OK && len == 32, "after a reset generation 1's id was refused (rc %d)",
          (int)rc);

    /* interrupted from another thread */
    s_put_t w = {.box = box};
    pthread_create(&th, NULL, s_stopper, &w);
    atomic_store(&w.waiting, 1);
    rc = worker_commid_wait(box, p.gen + 7, got, sizeof got, &len, 30000, s_interrupted, NULL);
    pthread_join(th, NULL);
    CHECK(rc == SEMOE_ESTOPPED, "an interrupted wait gave %d: %s", (int)rc, semoe_err_msg());

    worker_commid_destroy(&box);
    CHECK(box == NULL, "destroy did not null the pointer");
    return test_finish();
}
