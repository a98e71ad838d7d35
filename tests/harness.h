/* The small test harness every test in tests/ uses: checks that count and report, a seeded
 * random source (seed printed so a failure can be replayed), and bounded waits on conditions. */
#ifndef SEMOE_TEST_HARNESS_H
#define SEMOE_TEST_HARNESS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

extern int test_failures;
extern int test_checks;

/* Records a check; prints file:line, the expression and the formatted reason when it fails. */
#define CHECK(cond, ...) CHECK_HELD((cond), #cond, __VA_ARGS__)

/* Like CHECK but ends the test at once (for checks later steps depend on). The condition is
 * evaluated once, so it may have effects (send a signal, start a process). */
#define REQUIRE(cond, ...)                                                      \
    do {                                                                        \
        bool held_ = (cond);                                                    \
        CHECK_HELD(held_, #cond, __VA_ARGS__);                                  \
        if (!held_)                                                             \
            return test_finish();                                               \
    } while (0)

#define CHECK_HELD(held, text, ...)                                             \
    do {                                                                        \
        test_checks++;                                                          \
        if (!(held)) {                                                          \
            test_failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, text);      \
            fprintf(stderr, __VA_ARGS__);                                       \
            fprintf(stderr, "\n");                                              \
        }                                                                       \
    } while (0)

/* CHECK from several threads (the counters are plain ints): the condition is evaluated by the
 * calling thread, the count and the report under the harness's lock. test_lock/test_unlock
 * guard a test's own shared results with the same lock. */
#define TCHECK(cond, ...)                                                       \
    do {                                                                        \
        bool held_ = (cond);                                                    \
        test_lock();                                                            \
        CHECK_HELD(held_, #cond, __VA_ARGS__);                                  \
        test_unlock();                                                          \
    } while (0)
void test_lock(void);
void test_unlock(void);

/* Seeds the test's random source from SEMOE_TEST_SEED or the clock, and prints the seed. */
void test_init(const char *name);
/* Prints "N passed, M failed" and returns the process exit code (0 when all passed). */
int test_finish(void);
/* xorshift64* random numbers from the test seed. */
uint64_t test_rand(void);
/* Uniform in [0, n). */
uint64_t test_rand_below(uint64_t n);
double test_rand_unit(void);

/* Polls cond(arg) every few ms until it returns true or timeout_ms passes; true if it held. */
bool test_wait_for(bool (*cond)(void *arg), void *arg, int timeout_ms);

#endif
