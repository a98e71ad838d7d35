/* Logging and clocks shared by every process. Lines are written whole (one fprintf) so that
 * the lines of several threads do not interleave. */
#include "actors/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static char s_role[64] = "semoe";
static log_level_t s_level = LOG_INFO;

void log_init(const char *role, log_level_t level)
{
    snprintf(s_role, sizeof s_role, "%s", role);
    s_level = level;
}

int log_level_parse(const char *s)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, names[i]) == 0)
            return i;
    return -1;
}

void log_msg(log_level_t level, const char *fmt, ...)
{
    if (level > s_level)
        return;
    static const char tag[] = "EWID";
    char line[2048];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    localtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03ld %c %s: ", tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, tag[level], s_role);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s\n", line);
}

static int64_t s_clock(clockid_t id, int64_t div)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * (1000000000 / div) + ts.tv_nsec / div;
}

int64_t clock_mono_ms(void) { return s_clock(CLOCK_MONOTONIC, 1000000); }
int64_t clock_mono_us(void) { return s_clock(CLOCK_MONOTONIC, 1000); }
int64_t clock_wall_ms(void) { return s_clock(CLOCK_REALTIME, 1000000); }
