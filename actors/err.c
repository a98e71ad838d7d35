/* Thread-local error message and trace behind SEMOE_CHECK, and the x-allocators. */
#include "actors/err.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static __thread char s_msg[1024];
static __thread char s_where[512];

semoe_rc semoe_err(semoe_rc code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(s_msg, sizeof s_msg, fmt, ap);
    va_end(ap);
    s_where[0] = 0;
    return code;
}

semoe_rc semoe_err_errno(semoe_rc code, const char *fmt, ...)
{
    int saved = errno;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(s_msg, sizeof s_msg, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof s_msg)
        snprintf(s_msg + n, sizeof s_msg - (size_t)n, ": %s", strerror(saved));
    s_where[0] = 0;
    return code;
}

void semoe_err_trace(const char *file, int line)
{
    size_t n = strlen(s_where);
    if (n + 2 < sizeof s_where)
        snprintf(s_where + n, sizeof s_where - n, "%s%s:%d", n ? " < " : "", file, line);
}

const char *semoe_err_msg(void) { return s_msg; }
const char *semoe_err_where(void) { return s_where; }

const char *semoe_rc_name(semoe_rc rc)
{
    static const char *names[] = {"ok", "invalid", "out of memory", "i/o error", "protocol error",
                                  "timed out", "system error", "cuda error", "stopped",
                                  "fenced out"};
    return (unsigned)rc < sizeof names / sizeof names[0] ? names[rc] : "unknown error";
}

static void *s_oom(size_t n)
{
    fprintf(stderr, "semoe: out of memory allocating %zu bytes\n", n);
    abort();
}

void *semoe_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    return p ? p : s_oom(n);
}

void *semoe_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    return p ? p : s_oom(n * size);
}

void *semoe_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    return q ? q : s_oom(n);
}

char *semoe_xstrdup(const char *s)
{
    char *p = strdup(s);
    return p ? p : s_oom(strlen(s) + 1);
}
