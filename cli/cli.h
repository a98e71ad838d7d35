/* The `semoe` command's subcommands and the pieces they share: asking the coordinator's status
 * socket for its JSON, printing it as tables, sending STOP to its control socket, checking flags
 * (cli/flags.c) and waiting on a socket with a deadline (cli/wait.c). */
#ifndef SEMOE_CLI_H
#define SEMOE_CLI_H

#include <cjson/cJSON.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "actors/err.h"
#include "model/backend.h"

#define CLI_STATUS_ENDPOINT "tcp://127.0.0.1:5556"
#define CLI_CONTROL_ENDPOINT "tcp://127.0.0.1:5555"
#define CLI_EXIT_USAGE 2

/* The subcommands: argv[0] is the subcommand's name; each returns the process exit code. */
int cli_status_main(int argc, char **argv);
int cli_stop_main(int argc, char **argv);
int cli_demo_main(int argc, char **argv);
int cli_eval_main(int argc, char **argv);
int cli_generate_main(int argc, char **argv);

/* Sends "status" to the REP socket at endpoint and waits at most timeout_ms for the reply.
 * On success *reply is the parsed JSON object (caller's, cJSON_Delete) and, when text is not
 * NULL, *text the reply as received (caller's, free). SEMOE_ETIMEDOUT when nothing came back,
 * SEMOE_EPROTO when the reply is not a JSON object or is {"error": ...}, SEMOE_ESTOPPED when a
 * signal interrupted the wait. ctx is the caller's ZeroMQ context. */
semoe_rc cli_status_fetch(void *ctx, const char *endpoint, int timeout_ms, cJSON **reply,
                          char **text);

/* Prints a status reply as a header line, the workers table and the experts per layer. */
void cli_status_print(const cJSON *status, FILE *out);

/* Sends STOP to the coordinator's control socket at endpoint and waits, within timeout_ms in
 * all, for its ACK (*acked true). Fails with SEMOE_ETIMEDOUT when no connection came up, and
 * SEMOE_EPROTO when the coordinator answered with ERROR (its text in the message). */
semoe_rc cli_stop_send(void *ctx, const char *endpoint, int timeout_ms, bool *acked);

/* Reading a status reply: the member's value, or def when absent or of another kind. */
double cli_json_num(const cJSON *obj, const char *key, double def);
const char *cli_json_str(const cJSON *obj, const char *key, const char *def);

/* --- flags (cli/flags.c) ------------------------------------------------------------------- */

/* "tcp://HOST:PORT" with PORT 1..65535, or ipc://PATH. */
bool cli_endpoint_ok(const char *endpoint);

/* Milliseconds as an int flag value within [lo, hi]; false when it is not one. */
bool cli_parse_int(const char *s, long lo, long hi, long *out);

/* The four below serve a subcommand's getopt_long loop (optstring ":h", --help mapped to 'h');
 * cmd is the subcommand's name ("status"), and each message goes to stderr as "semoe CMD: ...".
 *
 * What the loop does not handle itself, c as getopt_long returned it: 'h' prints usage to
 * stdout and returns 0; ':' (a flag without its value) or anything else (an unknown flag)
 * says so and returns CLI_EXIT_USAGE. */
int cli_flags_other(const char *cmd, int c, char **argv, const char *usage);
/* After the loop: true when no argument is left, else false after naming the first. */
bool cli_flags_end(const char *cmd, int argc, char **argv);
/* --timeout-ms value: 1..3600000 into *ms, or false after saying what is expected. */
bool cli_flag_timeout_ms(const char *cmd, const char *value, long *ms);
/* --endpoint: true when cli_endpoint_ok, or false after saying what is expected. */
bool cli_flag_endpoint(const char *cmd, const char *endpoint);
/* --device: "cpu" (*cuda = -1) or "cuda:N" with N 0..1023 (*cuda = N), as semoe-worker takes
 * it; else false after saying what is expected. */
bool cli_flag_device(const char *cmd, const char *value, int *cuda);

/* The fp32 backend of a parsed --device into *be: &cpu_backend_f32 for cuda < 0, else
 * gpu_backend_init(cuda) on the calling thread and &gpu_backend_f32. Returns 0, or the exit code
 * after one line on stderr: CLI_EXIT_USAGE when this build has no CUDA (the line says how to
 * rebuild) or cuda is not a device of this host (gpu_backend_init's message), 1 when the CUDA
 * runtime fails. */
int cli_device_backend(const char *cmd, int cuda, const model_backend_f32_t **be);

/* --- bounded waits (cli/wait.c) ------------------------------------------------------------ */

/* Monotonic milliseconds. */
int64_t cli_now_ms(void);

/* Polls sock for events (ZMQ_POLLIN, ZMQ_POLLOUT) until cli_now_ms() reaches deadline_ms.
 * Returns 1 when the socket is ready, 0 at the deadline, -1 when zmq_poll failed: zmq_errno()
 * is EINTR when a signal came and *interrupted was set; a signal with interrupted NULL or
 * *interrupted 0 only resumes the wait. */
int cli_wait(void *sock, short events, int64_t deadline_ms, volatile sig_atomic_t *interrupted);

#endif
