/* gpu/nccl.h on the GPUs of this machine (up to four; skipped, 77, without one), ranks as
 * threads (one GPU each) and, for a death, as processes (this program again, --child). On one
 * GPU (NCCL puts no two ranks on one device) only the first two points, on a communicator of
 * one rank, and a communicator whose second rank never comes: SEMOE_ETIMEDOUT within its
 * timeout, not a hang. With two or more:
 *   - all-to-all with random byte counts per pair (some zero), bit-exact, and the same bytes
 *     through gpu_nccl_sendrecv in two pieces a pair (local copy for this rank's own);
 *   - all-reduce and bucketed all-reduce (tensors adjacent in one slab, scattered, one larger
 *     than the bucket; a small bucket so that several go) against the sum in double, 1e-6;
 *     the buckets again in the background (on the lane split from the communicator) with an
 *     all-reduce enqueued beside them and waited for alone (gpu_nccl_wait_fg), both 1e-6;
 *   - a rank that never joins a collective: the others return SEMOE_ETIMEDOUT within the
 *     timeout (plus the revoke's bound), the communicator broken and every later call failing
 *     at once, in the background too; the survivors shrink it without the silent rank and all-reduce on the result;
 *   - gpu_nccl_abort from another thread ends a wait with SEMOE_ESTOPPED, long before its
 *     timeout;
 *   - a rank process killed (SIGKILL) after enqueueing its part: the survivor's wait returns an
 *     error in bounded time instead of hanging.
 * Inputs come from the test seed (printed; replay with SEMOE_TEST_SEED). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "actors/err.h"
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/nccl.h"
#include "gpu/ops.h"
#include "tests/gpu_util.h"
#include "tests/harness.h"

#define S_MAXW 4
#define S_TIMEOUT 30000    /* ms, for collectives that should succeed */
#define S_SHORT 2000       /* ms, for the one that must time out */
#define S_SETTLE 5000      /* ms, gpu/nccl.cu's bound on a revoke */
#define S_TOL 1e-6
#define S_NTENS 7

static int s_world;
static uint8_t s_id[GPU_NCCL_ID_BYTES];
static pthread_barrier_t s_bar;

static double s_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec * 1e-6;
}

/* ---- the inputs, drawn on the main thread ---------------------------------------------- */

static size_t s_bytes[S_MAXW][S_MAXW];      /* all-to-all: rank r sends s_bytes[r][s] to s */
static uint8_t *s_payload[S_MAXW];          /* rank r's send buffer, peers in order */
static size_t s_lens[S_NTENS];              /* the bucketed tensors' lengths */
static float *s_vals[S_MAXW];               /* each rank's tensors, concatenated */
static size_t s_total;                      /* their total length */

static void s_draw(void)
{
    for (int r = 0; r < s_world; r++) {
        size_t sum = 0;
        for (int s = 0; s < s_world; s++) {
            /* zero, a few bytes, or up to 24 MiB (several NCCL chunks) */
            uint64_t k = test_rand_below(4);
            s_bytes[r][s] = k == 0 ? 0 : k == 1 ? 1 + test_rand_below(100)
                                               : 1 + test_rand_below((size_t)24 << 20);
            sum += s_bytes[r][s];
        }
        s_payload[r] = semoe_xmalloc(sum + 1);
        for (size_t i = 0; i < sum; i++)
            s_payload[r][i] = (uint8_t)test_rand();
    }
    /* small and large tensors; with a 1 MiB bucket some are packed, one goes alone */
    const size_t lens[S_NTENS] = {1000, 70000, 3, 400000, 129, 90000, 1};
    s_total = 0;
    for (int t = 0; t < S_NTENS; t++)
        s_total += s_lens[t] = lens[t];
    for (int r = 0; r < s_world; r++)
        s_vals[r] = test_rand_floats(s_total, 2.0);
}

/* ---- the threads --------------------------------------------------------------------- */

typedef struct {
    int rank;
    semoe_rc rc;
    char err[512];
    /* results for main to check */
    int a2a_ok;                /* every received byte as sent (all-to-all) */
    int p2p_ok;                /* the same through gpu_nccl_sendrecv */
    size_t a2a_bad_at;         /* first wrong byte's offset when not */
    double ar_err, bk_err;     /* all-reduce and bucketed, against double */
    double bg_err, fg_err;     /* bucketed in the background, and an all-reduce beside it */
    semoe_rc silent_rc;        /* the collective a rank did not join (ranks > 0) */
    double silent_ms;
    semoe_rc after_rc;         /* a call on the broken communicator */
    semoe_rc after_bg_rc;      /* and one in the background (its lane broken with it) */
    double after_ms;
    semoe_rc shrink_rc;
    double shrink_err;         /* the all-reduce on the shrunk communicator */
    int shrink_world;
} s_rank_t;

static s_rank_t s_ranks[S_MAXW];

static void s_fail(s_rank_t *R, semoe_rc rc, const char *what)
{
    if (R->rc == SEMOE_OK) {
        R->rc = rc;
        snprintf(R->err, sizeof R->err, "rank %d: %s: %s", R->rank, what, semoe_err_msg());
    }
}

static double s_err_vs_sum(const float *got, size_t off, size_t n, int world)
{
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < n; i++) {
        double want = 0.0;
        for (int r = 0; r < world; r++)
            want += s_vals[r][off + i];
        num += (got[i] - want) * (got[i] - want);
        den += want * want;
    }
    return sqrt(num / (den > 0 ? den : 1.0));
}

static int s_a2a_check(s_rank_t *R, const uint8_t *got, const size_t *rb, const size_t *roff);

static void s_alltoall(s_rank_t *R, gpu_nccl_t *c)
{
    int me = R->rank;
    size_t soff[S_MAXW], roff[S_MAXW], sb[S_MAXW], rb[S_MAXW], st = 0, rt = 0;
    for (int p = 0; p < s_world; p++) {
        sb[p] = s_bytes[me][p], soff[p] = st, st += sb[p];
        rb[p] = s_bytes[p][me], roff[p] = rt, rt += rb[p];
    }
    void *send = test_gpu_up(s_payload[me], st + 1), *recv = gpu_alloc(rt + 1);
    semoe_rc rc = gpu_nccl_alltoallv(c, send, sb, soff, recv, rb, roff);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, S_TIMEOUT);
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "all-to-all");
        return;
    }
    uint8_t *got = semoe_xmalloc(rt + 1);
    gpu_to_host(got, recv, rt);
    R->a2a_ok = s_a2a_check(R, got, rb, roff);
    /* the same transfers as gpu_nccl_sendrecv, each pair's bytes in two pieces listed in order
     * (they must pair up in that order), this rank's own as a local copy */
    gpu_zero(recv, rt + 1);
    gpu_nccl_op_t ops[4 * S_MAXW];
    int n = 0;
    for (int p = 0; p < s_world; p++) {
        size_t hs = sb[p] / 2, hr = rb[p] / 2;
        if (p == me) {
            ops[n++] = (gpu_nccl_op_t){p, (uint8_t *)send + soff[p], (uint8_t *)recv + roff[p],
                                       sb[p]};
            continue;
        }
        ops[n++] = (gpu_nccl_op_t){p, (uint8_t *)send + soff[p], NULL, hs};
        ops[n++] = (gpu_nccl_op_t){p, (uint8_t *)send + soff[p] + hs, NULL, sb[p] - hs};
        ops[n++] = (gpu_nccl_op_t){p, NULL, (uint8_t *)recv + roff[p], hr};
        ops[n++] = (gpu_nccl_op_t){p, NULL, (uint8_t *)recv + roff[p] + hr, rb[p] - hr};
    }
    rc = gpu_nccl_sendrecv(c, ops, n);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, S_TIMEOUT);
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "send/receive");
        free(got);
        return;
    }
    gpu_to_host(got, recv, rt);
    R->p2p_ok = s_a2a_check(R, got, rb, roff);
    free(got);
    gpu_free(send);
    gpu_free(recv);
}

/* Whether got (rb[p] bytes from each rank p at roff[p]) holds what each rank sent this one. */
static int s_a2a_check(s_rank_t *R, const uint8_t *got, const size_t *rb, const size_t *roff)
{
    int me = R->rank;
    for (int p = 0; p < s_world; p++) {
        size_t from = 0; /* where rank p's bytes for me sit in p's payload */
        for (int q = 0; q < me; q++)
            from += s_bytes[p][q];
        for (size_t i = 0; i < rb[p]; i++)
            if (got[roff[p] + i] != s_payload[p][from + i]) {
                R->a2a_bad_at = roff[p] + i;
                return 0;
            }
    }
    return 1;
}

/* The worst error of the bucketed tensors (s_reduces' layout) against the sum. */
static double s_buckets_err(float *const *bufs)
{
    double worst = 0.0;
    size_t off = 0;
    for (int t = 0; t < S_NTENS; off += s_lens[t++]) {
        float *g = test_gpu_downf(bufs[t], s_lens[t]);
        double e = s_err_vs_sum(g, off, s_lens[t], s_world);
        worst = e > worst ? e : worst;
        free(g);
    }
    return worst;
}

static void s_reduces(s_rank_t *R, gpu_nccl_t *c)
{
    int me = R->rank;
    /* the whole vector at once */
    float *d = test_gpu_upf(s_vals[me], s_total);
    semoe_rc rc = gpu_nccl_allreduce_sum(c, d, s_total);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, S_TIMEOUT);
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "all-reduce");
        return;
    }
    float *h = test_gpu_downf(d, s_total);
    R->ar_err = s_err_vs_sum(h, 0, s_total, s_world);
    free(h);
    gpu_free(d);
    /* bucketed: tensors 0-2 adjacent in one slab, 3-6 each their own allocation */
    float *slab = test_gpu_upf(s_vals[me], s_lens[0] + s_lens[1] + s_lens[2]);
    float *bufs[S_NTENS];
    size_t off = 0;
    for (int t = 0; t < S_NTENS; off += s_lens[t++])
        bufs[t] = t < 3 ? slab + off : test_gpu_upf(s_vals[me] + off, s_lens[t]);
    rc = gpu_nccl_allreduce_buckets(c, bufs, s_lens, S_NTENS, (size_t)1 << 20);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, S_TIMEOUT);
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "bucketed all-reduce");
        return;
    }
    R->bk_err = s_buckets_err(bufs);
    /* again in the background (the lane split from c now), with a foreground all-reduce
     * enqueued beside it and waited for on its own; then joined */
    off = 0;
    for (int t = 0; t < S_NTENS; off += s_lens[t++])
        gpu_to_device(bufs[t], s_vals[me] + off, s_lens[t] * sizeof(float));
    d = test_gpu_upf(s_vals[me], s_total);
    rc = gpu_nccl_allreduce_buckets_bg(c, bufs, s_lens, S_NTENS, (size_t)1 << 20);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_allreduce_sum(c, d, s_total);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait_fg(c, S_TIMEOUT);
    if (rc == SEMOE_OK) {
        h = test_gpu_downf(d, s_total);
        R->fg_err = s_err_vs_sum(h, 0, s_total, s_world);
        free(h);
        gpu_nccl_join(c);
        rc = gpu_nccl_wait(c, S_TIMEOUT);
    }
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "bucketed all-reduce in the background");
        return;
    }
    R->bg_err = s_buckets_err(bufs);
    for (int t = 3; t < S_NTENS; t++)
        gpu_free(bufs[t]);
    gpu_free(slab);
    gpu_free(d);
}

/* Rank 0 stays out of one all-reduce; the others time out. Then the others shrink the
 * communicator without rank 0 (which aborts its own) and all-reduce on it. */
static void s_silent(s_rank_t *R, gpu_nccl_t **cp)
{
    gpu_nccl_t *c = *cp;
    int me = R->rank;
    if (me == 0) {
        pthread_barrier_wait(&s_bar); /* the others are done timing out */
        gpu_nccl_abort(c);
        gpu_nccl_destroy(cp);
        pthread_barrier_wait(&s_bar);
        return;
    }
    float *d = test_gpu_upf(s_vals[me], s_total);
    double t0 = s_ms();
    semoe_rc rc = gpu_nccl_allreduce_sum(c, d, s_total);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, S_SHORT);
    R->silent_rc = rc;
    R->silent_ms = s_ms() - t0;
    t0 = s_ms();
    R->after_rc = gpu_nccl_allreduce_sum(c, d, 1);
    size_t one = 1;
    R->after_bg_rc = gpu_nccl_allreduce_buckets_bg(c, &d, &one, 1, 0);
    R->after_ms = s_ms() - t0;
    pthread_barrier_wait(&s_bar);
    pthread_barrier_wait(&s_bar); /* rank 0 is gone */
    if (!gpu_nccl_revocable()) { /* aborted on the timeout: nothing left to shrink */
        R->shrink_rc = SEMOE_OK;
        R->shrink_world = -1;
        gpu_free(d);
        gpu_nccl_destroy(cp);
        return;
    }
    const int ex = 0;
    gpu_nccl_t *small = NULL;
    R->shrink_rc = gpu_nccl_shrink(c, &ex, 1, S_TIMEOUT, &small);
    if (R->shrink_rc == SEMOE_OK) {
        R->shrink_world = gpu_nccl_world(small);
        gpu_to_device(d, s_vals[me], s_total * sizeof(float));
        semoe_rc r2 = gpu_nccl_allreduce_sum(small, d, s_total);
        if (r2 == SEMOE_OK)
            r2 = gpu_nccl_wait(small, S_TIMEOUT);
        if (r2 == SEMOE_OK) {
            float *h = test_gpu_downf(d, s_total);
            /* the sum over ranks 1 .. world-1 */
            double num = 0.0, den = 0.0;
            for (size_t i = 0; i < s_total; i++) {
                double want = 0.0;
                for (int r = 1; r < s_world; r++)
                    want += s_vals[r][i];
                num += (h[i] - want) * (h[i] - want);
                den += want * want;
            }
            R->shrink_err = sqrt(num / (den > 0 ? den : 1.0));
            free(h);
        } else {
            s_fail(R, r2, "all-reduce on the shrunk communicator");
        }
        gpu_nccl_destroy(&small);
    } else {
        snprintf(R->err, sizeof R->err, "rank %d: shrink: %s", me, semoe_err_msg());
    }
    gpu_free(d);
    gpu_nccl_destroy(cp);
}

static void *s_rank_main(void *arg)
{
    s_rank_t *R = arg;
    semoe_rc rc = gpu_backend_init(R->rank);
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "gpu_backend_init");
        for (int i = 0; i < 3; i++) /* the id's, then s_silent's two */
            pthread_barrier_wait(&s_bar);
        return NULL;
    }
    if (R->rank == 0 && gpu_nccl_unique_id(s_id) != SEMOE_OK)
        s_fail(R, SEMOE_ECUDA, "unique id");
    pthread_barrier_wait(&s_bar); /* the id is there */
    gpu_nccl_t *c = NULL;
    rc = gpu_nccl_new(s_id, R->rank, s_world, S_TIMEOUT, NULL, NULL, &c);
    if (rc != SEMOE_OK) {
        s_fail(R, rc, "gpu_nccl_new");
        pthread_barrier_wait(&s_bar); /* s_silent's two, so that the others go on */
        pthread_barrier_wait(&s_bar);
        return NULL;
    }
    s_alltoall(R, c);
    s_reduces(R, c);
    if (s_world > 1)
        s_silent(R, &c);
    else
        gpu_nccl_destroy(&c);
    return NULL;
}

/* ---- abort from another thread ------------------------------------------------------- */

typedef struct {
    gpu_nccl_t *c;
    atomic_int waiting;
} s_abort_ctx_t;

static bool s_is_waiting(void *arg)
{
    return atomic_load(&((s_abort_ctx_t *)arg)->waiting) != 0;
}

static void *s_aborter(void *arg)
{
    s_abort_ctx_t *a = arg;
    test_wait_for(s_is_waiting, a, S_TIMEOUT);
    gpu_nccl_abort(a->c);
    return NULL;
}

/* Two ranks in this thread's process (devices 0 and 1, one thread each would be the normal
 * way; here rank 1 only joins): rank 0 waits on an all-reduce rank 1 never enqueues. */
typedef struct {
    semoe_rc rc;
    gpu_nccl_t *c;
} s_join_t;

static void *s_join_only(void *arg)
{
    s_join_t *j = arg;
    j->rc = gpu_backend_init(1);
    if (j->rc == SEMOE_OK)
        j->rc = gpu_nccl_new(s_id, 1, 2, S_TIMEOUT, NULL, NULL, &j->c);
    return NULL;
}

/* -1 when done; test_finish's code when a REQUIRE failed. */
static int s_test_abort(void)
{
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    REQUIRE(gpu_nccl_unique_id(s_id) == SEMOE_OK, "unique id: %s", semoe_err_msg());
    s_join_t j = {0};
    pthread_t th;
    pthread_create(&th, NULL, s_join_only, &j);
    gpu_nccl_t *c = NULL;
    semoe_rc rc = gpu_nccl_new(s_id, 0, 2, S_TIMEOUT, NULL, NULL, &c);
    pthread_join(th, NULL);
    REQUIRE(rc == SEMOE_OK && j.rc == SEMOE_OK, "two ranks: %s", semoe_err_msg());
    float *d = test_gpu_upf(s_vals[0], 1000);
    s_abort_ctx_t a = {.c = c};
    pthread_create(&th, NULL, s_aborter, &a);
    double t0 = s_ms();
    /* waiting from here: NCCL connects inside the first launch with a peer, so the call itself
     * may be what waits for rank 1 */
    atomic_store(&a.waiting, 1);
    rc = gpu_nccl_allreduce_sum(c, d, 1000);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, 10 * S_TIMEOUT);
    double ms = s_ms() - t0;
    pthread_join(th, NULL);
    printf("abort from another thread: rc %d after %.0f ms (%s)\n", (int)rc, ms, semoe_err_msg());
    CHECK(rc == SEMOE_ESTOPPED, "a wait ended by gpu_nccl_abort returned %d: %s", (int)rc,
          semoe_err_msg());
    CHECK(ms < S_SETTLE + 2000, "the abort took %.0f ms", ms);
    CHECK(gpu_nccl_broken(c), "an aborted communicator is not marked broken");
    gpu_free(d);
    gpu_nccl_destroy(&c);
    gpu_nccl_abort(j.c);
    gpu_nccl_destroy(&j.c);
    return -1;
}

/* ---- a rank that never joins ------------------------------------------------------- */

/* -1 when done; test_finish's code when a REQUIRE failed. */
static int s_test_missing(void)
{
    REQUIRE(gpu_backend_init(0) == SEMOE_OK, "gpu_backend_init(0): %s", semoe_err_msg());
    REQUIRE(gpu_nccl_unique_id(s_id) == SEMOE_OK, "unique id: %s", semoe_err_msg());
    gpu_nccl_t *c = NULL;
    double t0 = s_ms();
    semoe_rc rc = gpu_nccl_new(s_id, 0, 2, S_SHORT, NULL, NULL, &c);
    double ms = s_ms() - t0;
    printf("a communicator of 2 with rank 1 missing: rc %d after %.0f ms (%s)\n", (int)rc, ms,
           semoe_err_msg());
    CHECK(rc == SEMOE_ETIMEDOUT && !c, "joining without rank 1 gave %d", (int)rc);
    CHECK(ms >= S_SHORT - 50 && ms < S_SHORT + 3000, "it took %.0f ms (timeout %d)", ms,
          S_SHORT);
    gpu_nccl_destroy(&c);
    return -1;
}

/* ---- a rank process killed ----------------------------------------------------------- */

/* --child RANK HEXID|-: rank 0 ("-") makes the id and prints it in hex, then both join; rank 1
 * enqueues its part of an all-reduce and kills itself; rank 0 waits and exits 0 when the
 * wait failed (printing the error and how long it took), 1 when it succeeded, 2 on setup. */
static int s_child(int rank, const char *hex)
{
    if (gpu_backend_init(rank) != SEMOE_OK)
        return 2;
    uint8_t id[GPU_NCCL_ID_BYTES];
    if (rank == 0) {
        if (gpu_nccl_unique_id(id) != SEMOE_OK)
            return 2;
        for (int i = 0; i < GPU_NCCL_ID_BYTES; i++)
            printf("%02x", id[i]);
        printf("\n");
        fflush(stdout);
    } else {
        for (int i = 0; i < GPU_NCCL_ID_BYTES; i++)
            if (sscanf(hex + 2 * i, "%2hhx", &id[i]) != 1)
                return 2;
    }
    gpu_nccl_t *c = NULL;
    if (gpu_nccl_new(id, rank, 2, S_TIMEOUT, NULL, NULL, &c) != SEMOE_OK) {
        fprintf(stderr, "child %d: %s\n", rank, semoe_err_msg());
        return 2;
    }
    size_t n = (size_t)64 << 20; /* 256 MiB: still running when rank 1 dies */
    float *d = gpu_alloc(n * sizeof(float));
    gpu_zero(d, n * sizeof(float));
    if (rank == 1) {
        gpu_nccl_allreduce_sum(c, d, n);
        kill(getpid(), SIGKILL);
    }
    /* rank 0: one all-reduce to match rank 1's, then one it can never finish */
    double t0 = s_ms();
    semoe_rc rc = gpu_nccl_allreduce_sum(c, d, n);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_allreduce_sum(c, d, n);
    if (rc == SEMOE_OK)
        rc = gpu_nccl_wait(c, S_SHORT);
    printf("survivor: rc %d after %.0f ms: %s\n", (int)rc, s_ms() - t0,
           rc ? semoe_err_msg() : "ok");
    gpu_nccl_destroy(&c);
    return rc == SEMOE_OK ? 1 : 0;
}

typedef struct {
    pid_t pid[2];
    int st[2]; /* exit status, -1 while running */
} s_pair_t;

static bool s_reaped(void *arg)
{
    s_pair_t *p = arg;
    for (int i = 0; i < 2; i++) {
        int st;
        if (p->st[i] < 0 && waitpid(p->pid[i], &st, WNOHANG) == p->pid[i])
            p->st[i] = st;
    }
    return p->st[0] >= 0 && p->st[1] >= 0;
}

/* -1 when done; test_finish's code when a REQUIRE failed. */
static int s_test_kill(const char *self)
{
    int out[2];
    REQUIRE(pipe(out) == 0, "pipe: %s", strerror(errno));
    pid_t p0 = fork();
    if (p0 == 0) {
        dup2(out[1], 1);
        close(out[0]);
        execl(self, self, "--child", "0", "-", (char *)NULL);
        _exit(3);
    }
    close(out[1]);
    FILE *f = fdopen(out[0], "r");
    char hex[2 * GPU_NCCL_ID_BYTES + 8] = {0};
    REQUIRE(f && fgets(hex, sizeof hex, f), "no id from the rank 0 child");
    pid_t p1 = fork();
    if (p1 == 0) {
        execl(self, self, "--child", "1", hex, (char *)NULL);
        _exit(3);
    }
    /* bounded: the survivor must be done well within two minutes */
    s_pair_t pr = {{p0, p1}, {-1, -1}};
    test_wait_for(s_reaped, &pr, 120000);
    int st0 = pr.st[0], st1 = pr.st[1];
    char line[512];
    while (fgets(line, sizeof line, f))
        fputs(line, stdout);
    fclose(f);
    if (st0 < 0) {
        kill(p0, SIGKILL);
        waitpid(p0, NULL, 0);
    }
    if (st1 < 0) {
        kill(p1, SIGKILL);
        waitpid(p1, NULL, 0);
    }
    CHECK(st1 >= 0 && WIFSIGNALED(st1) && WTERMSIG(st1) == SIGKILL,
          "the rank 1 child did not die by SIGKILL (status %d)", st1);
    CHECK(st0 >= 0, "the survivor hung: still running after 120 s");
    CHECK(st0 >= 0 && WIFEXITED(st0) && WEXITSTATUS(st0) == 0,
          "the survivor's wait did not fail cleanly (status %d)", st0);
    return -1;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "--child"))
        return s_child(atoi(argv[2]), argv[3]);
    int n = gpu_device_count();
    if (n < 1) {
        printf("gpu_nccl: skipped: no CUDA device (%s)\n", semoe_err_msg());
        return 77;
    }
    test_init("gpu_nccl");
    s_world = n < S_MAXW ? n : S_MAXW;
    s_draw();
    printf("%d ranks, one GPU each; NCCL %d%s\n", s_world, gpu_nccl_version(),
           gpu_nccl_revocable() ? "" : " (no revoke: no shrink)");
    pthread_barrier_init(&s_bar, NULL, (unsigned)s_world);
    pthread_t th[S_MAXW];
    for (int r = 0; r < s_world; r++) {
        s_ranks[r].rank = r;
        pthread_create(&th[r], NULL, s_rank_main, &s_ranks[r]);
    }
    for (int r = 0; r < s_world; r++)
        pthread_join(th[r], NULL);
    for (int r = 0; r < s_world; r++) {
        s_rank_t *R = &s_ranks[r];
        CHECK(R->rc == SEMOE_OK, "%s", R->err);
        if (R->rc != SEMOE_OK)
            continue;
        printf("rank %d: all-to-all %s, send/receive %s; all-reduce rel %.2e, bucketed %.2e; "
               "in the background %.2e beside an all-reduce %.2e\n", r,
               R->a2a_ok ? "bit-exact" : "WRONG", R->p2p_ok ? "bit-exact" : "WRONG", R->ar_err,
               R->bk_err, R->bg_err, R->fg_err);
        CHECK(R->a2a_ok, "rank %d: all-to-all byte %zu differs", r, R->a2a_bad_at);
        CHECK(R->p2p_ok, "rank %d: send/receive byte %zu differs", r, R->a2a_bad_at);
        CHECK(R->ar_err <= S_TOL, "rank %d: all-reduce rel %.3g", r, R->ar_err);
        CHECK(R->bk_err <= S_TOL, "rank %d: bucketed all-reduce rel %.3g", r, R->bk_err);
        CHECK(R->bg_err <= S_TOL && R->fg_err <= S_TOL, "rank %d: in the background rel %.3g, "
              "the all-reduce beside it %.3g", r, R->bg_err, R->fg_err);
        if (r == 0)
            continue;
        printf("rank %d: without rank 0: rc %d after %.0f ms; next call rc %d after %.1f ms; "
               "shrunk to %d ranks (rc %d), all-reduce rel %.2e\n", r, (int)R->silent_rc,
               R->silent_ms, (int)R->after_rc, R->after_ms, R->shrink_world, (int)R->shrink_rc,
               R->shrink_err);
        CHECK(R->silent_rc == SEMOE_ETIMEDOUT, "rank %d: a collective rank 0 skipped gave %d",
              r, (int)R->silent_rc);
        CHECK(R->silent_ms < S_SHORT + S_SETTLE + 3000, "rank %d: timing out took %.0f ms", r,
              R->silent_ms);
        CHECK(R->after_rc != SEMOE_OK && R->after_bg_rc != SEMOE_OK && R->after_ms < 100,
              "rank %d: calls on the broken communicator gave %d and %d (background) after "
              "%.1f ms", r, (int)R->after_rc, (int)R->after_bg_rc, R->after_ms);
        if (R->shrink_world < 0) {
            printf("rank %d: NCCL %d cannot revoke: shrink not tried\n", r, gpu_nccl_version());
            continue;
        }
        CHECK(R->shrink_rc == SEMOE_OK && R->shrink_world == s_world - 1,
              "rank %d: shrink gave %d, %d ranks: %s", r, (int)R->shrink_rc, R->shrink_world,
              R->err);
        CHECK(R->shrink_rc != SEMOE_OK || R->shrink_err <= S_TOL,
              "rank %d: all-reduce on the shrunk communicator rel %.3g", r, R->shrink_err);
    }
    int rc = s_world > 1 ? s_test_abort() : s_test_missing();
    if (rc < 0 && s_world > 1)
        rc = s_test_kill("/proc/self/exe");
    if (rc >= 0)
        return rc;
    for (int r = 0; r < s_world; r++) {
        free(s_payload[r]);
        free(s_vals[r]);
    }
    return test_finish();
}
