/* The test harness: counting checks, a replayable random seed and bounded condition waits. */
#include "tests/harness.h"

#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int test_failures;
int test_checks;
static uint64_t s_state;
static const char *s_name;

void test_init(const char *name)
{
    s_name = name;
    const char *env = getenv("SEMOE_TEST_SEED");
    uint64_t seed;
    if (env && *env) {
        seed = strtoull(env, NULL, 0);
    } else {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        seed = (uint64_t)ts.tv_nsec ^ ((uint64_t)ts.tv_sec << 20) ^ (uint64_t)getpid();
    }
    s_state = seed ? seed : 0x9E3779B97F4A7C15ull;
    fprintf(stderr, "%s: seed %llu (replay with SEMOE_TEST_SEED=%llu)\n", name,
            (unsigned long long)seed, (unsigned long long)seed);
}

int test_finish(void)
{
    int passed = test_checks - test_failures;
    printf("%s: %d passed, %d failed\n", s_name ? s_name : "test", passed, test_failures);
    return test_failures ? 1 : 0;
}

uint64_t test_rand(void)
{
    s_state ^= s_state >> 12;
    s_state ^= s_state << 25;
    s_state ^= s_state >> 27;
    return s_state * 0x2545F4914F6CDD1Dull;
}

uint64_t test_rand_below(uint64_t n) { return n ? test_rand() % n : 0; }

double test_rand_unit(void) { return (double)(test_rand() >> 11) / 9007199254740992.0; }

bool test_wait_for(bool (*cond)(void *arg), void *arg, int timeout_ms)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        if (cond(arg))
            return true;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (ms > timeout_ms)
            return cond(arg);
        usleep(5000);
    }
}

static pthread_mutex_t s_check_lock = PTHREAD_MUTEX_INITIALIZER;

void test_lock(void)
{
    pthread_mutex_lock(&s_check_lock);
}

void test_unlock(void)
{
    pthread_mutex_unlock(&s_check_lock);
}
