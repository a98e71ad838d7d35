/* One result type for the whole tree, and check macros that carry file:line up the stack.
 * A failing call sets a message with semoe_err(); every SEMOE_CHECK on the way up appends
 * its location, so the top level prints "what went wrong" plus "where", like NCCL's NCCLCHECK. */
#ifndef SEMOE_ERR_H
#define SEMOE_ERR_H

#include <stdarg.h>
#include <stddef.h>

typedef enum {
    SEMOE_OK = 0,
    SEMOE_EINVAL,    /* bad argument or input from a user */
    SEMOE_ENOMEM,    /* allocation failed */
    SEMOE_EIO,       /* file or socket I/O failed */
    SEMOE_EPROTO,    /* a peer broke the protocol */
    SEMOE_ETIMEDOUT, /* a bounded wait ran out */
    SEMOE_ESYS,      /* a system call failed (errno in the message) */
    SEMOE_ECUDA,     /* CUDA, cuBLAS or NCCL failed */
    SEMOE_ESTOPPED,  /* the operation was interrupted by a stop request */
    SEMOE_EFENCED,   /* refused: a newer generation owns what this one tried to change */
} semoe_rc;

/* Sets the thread's error message (printf-style) and clears its trace; returns code. */
semoe_rc semoe_err(semoe_rc code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Same, appending ": strerror(errno)". */
semoe_rc semoe_err_errno(semoe_rc code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Appends "file:line" to the thread's trace (used by the CHECK macros). */
void semoe_err_trace(const char *file, int line);
/* The thread's last message and trace; valid until the next semoe_err on this thread. */
const char *semoe_err_msg(void);
const char *semoe_err_where(void);
const char *semoe_rc_name(semoe_rc rc);

#define SEMOE_CHECK(call)                                                    \
    do {                                                                     \
        semoe_rc rc_ = (call);                                               \
        if (rc_ != SEMOE_OK) {                                               \
            semoe_err_trace(__FILE__, __LINE__);                             \
            return rc_;                                                      \
        }                                                                    \
    } while (0)

#define SEMOE_CHECK_GOTO(call, rc, label)                                    \
    do {                                                                     \
        (rc) = (call);                                                       \
        if ((rc) != SEMOE_OK) {                                              \
            semoe_err_trace(__FILE__, __LINE__);                             \
            goto label;                                                      \
        }                                                                    \
    } while (0)

/* For libzmq calls that return -1 and set errno. */
#define ZMQ_CHECK(call)                                                      \
    do {                                                                     \
        if ((call) == -1)                                                    \
            return semoe_err(SEMOE_EIO, "%s:%d: %s: %s", __FILE__, __LINE__, \
                             #call, zmq_strerror(zmq_errno()));              \
    } while (0)

/* Allocation failure is a broken invariant: abort with a message. */
void *semoe_xmalloc(size_t n);
void *semoe_xcalloc(size_t n, size_t size);
void *semoe_xrealloc(void *p, size_t n);
char *semoe_xstrdup(const char *s);

#endif
