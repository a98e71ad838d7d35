/* Process helpers for multi-process tests: start the real daemons from the build tree with
 * their output in a per-test temp dir, signal them, wait for them with bounds, and kill every
 * child at exit or on a signal so nothing is left behind; free loopback ports. */
#ifndef SEMOE_TEST_PROC_H
#define SEMOE_TEST_PROC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Paths of the programs under $SEMOE_BUILD. */
#define PROC_COORDINATOR "coordinator/semoe-coordinator"
#define PROC_WORKER "worker/semoe-worker"
#define PROC_CLI "cli/semoe"
/* Children a test may start in all. */
#define PROC_MAX 128

typedef struct proc proc_t;

/* Call once after test_init: makes the test's temp dir and installs the cleanup (atexit and
 * SIGTERM/SIGINT/SIGHUP/SIGQUIT handlers) that kills every child still running. At exit the
 * temp dir is removed when the test passed (kept with SEMOE_TEST_KEEP=1), and kept, with the
 * tail of every log printed, when it failed. */
void proc_init(const char *test_name);

/* $SEMOE_BUILD and $SEMOE_SRC (the build and source roots); exits 2 with a message when
 * unset. */
const char *proc_build_dir(void);
const char *proc_src_dir(void);
/* The test's name as given to proc_init ("test" before). */
const char *proc_name(void);
/* The test's temp dir, and a path name inside it (into buf; returns buf). */
const char *proc_tmp_dir(void);
char *proc_tmp_path(char *buf, size_t n, const char *name);

/* Starts $SEMOE_BUILD/bin with the NULL-terminated arguments after it; stdout and stderr go
 * to <tmp>/<label>.out and <label>.err (a repeated label gets a suffix). The child dies with
 * the test (PR_SET_PDEATHSIG) even when the test itself is killed. Returns the process, owned
 * by the registry (freed at exit), or NULL (with a message) if it could not be started. */
proc_t *proc_start(const char *label, const char *bin, ...) __attribute__((sentinel));
/* The same with an argument vector (argv[0..argc), no program name). */
proc_t *proc_startv(const char *label, const char *bin, int argc, const char *const *argv);

pid_t proc_pid(const proc_t *p);
const char *proc_label(const proc_t *p);
const char *proc_out_path(const proc_t *p);
const char *proc_err_path(const proc_t *p);

/* Sends sig (no effect once it has exited). Returns false if kill(2) failed. */
bool proc_signal(proc_t *p, int sig);
/* True while the process has not exited (a stopped process is running); reaps it once it has. */
bool proc_running(proc_t *p);
/* Waits up to timeout_ms for the process to exit; true and *status (waitpid's) if it did. */
bool proc_wait(proc_t *p, int timeout_ms, int *status);
/* SIGKILL (and SIGCONT, in case it is stopped) then waits for it; true once it is reaped. */
bool proc_kill(proc_t *p);
/* The exit code of a waitpid status, or 128 + the signal that killed it, or -1. */
int proc_exit_code(int status);
/* Starts bin with the arguments, waits up to timeout_ms and returns its exit code (as
 * proc_exit_code), or -1 if it did not finish in time (it is killed then). *pp, if not NULL,
 * gets the process (for its output). */
int proc_run(proc_t **pp, int timeout_ms, const char *label, const char *bin, ...)
    __attribute__((sentinel));

/* Whole contents of a file (NUL-terminated; caller frees), or NULL. */
char *proc_read_file(const char *path, size_t *len);
/* Writes text to path; false (with a message) on failure. */
bool proc_write_file(const char *path, const char *text);
/* Prints the paths and the last lines of p's logs (NULL: of every child) to stderr. */
void proc_dump_logs(const proc_t *p, int lines);

/* A loopback TCP port that was free a moment ago (bound to port 0, read back, closed); never
 * the same one twice in a test. Returns 0 on failure. */
int proc_free_port(void);
/* True if p holds an established TCP connection to 127.0.0.1:port (read from /proc). */
bool proc_tcp_connected(const proc_t *p, int port);

/* Monotonic milliseconds. */
int64_t proc_now_ms(void);
/* Sleeps ms milliseconds (only for pacing a poll loop, never to wait for a condition). */
void proc_sleep_ms(int ms);

/* --- daemons ---------------------------------------------------------------------------- */

/* The three endpoints of a coordinator on fresh loopback ports. */
typedef struct {
    int control, status, metrics;
    char control_ep[64]; /* "tcp://127.0.0.1:P" */
    char status_ep[64];
    char metrics_addr[64]; /* "127.0.0.1:P" */
} proc_ports_t;

/* Picks three free ports; false if none could be found. */
bool proc_ports_pick(proc_ports_t *pp);
/* $SEMOE_SRC/rel into buf; returns buf. */
char *proc_src_path(char *buf, size_t n, const char *rel);
/* Starts semoe-coordinator --config job on pp's endpoints (extra: more arguments, NULL-ended
 * array or NULL). */
proc_t *proc_start_coordinator(const char *label, const char *job, const proc_ports_t *pp,
                               const char *const *extra);
/* Starts semoe-worker --id id --device cpu against pp's control endpoint; reconnect_max_ms > 0
 * adds --reconnect-max-ms. The label is the id. */
proc_t *proc_start_worker(const char *id, const proc_ports_t *pp, int reconnect_max_ms);

#endif
