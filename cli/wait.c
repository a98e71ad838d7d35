/* Bounded waits for the `semoe` subcommands (cli/cli.h): a monotonic clock and a poll of one
 * ZeroMQ socket until a deadline, which a signal cuts short only when the caller says so. */
#include <errno.h>
#include <time.h>
#include <zmq.h>

#include "cli/cli.h"

int64_t cli_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int cli_wait(void *sock, short events, int64_t deadline_ms, volatile sig_atomic_t *interrupted)
{
    for (;;) {
        int64_t left = deadline_ms - cli_now_ms();
        zmq_pollitem_t item = {sock, 0, events, 0};
        int n = zmq_poll(&item, 1, left > 0 ? (long)left : 0);
        if (n == -1 && zmq_errno() == EINTR) {
            if (interrupted && *interrupted)
                return -1; /* errno is still EINTR */
            continue;
        }
        return n;
    }
}
