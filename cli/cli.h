/* The `semoe` command's subcommands and the pieces they share: asking the coordinator's status
 * socket for its JSON, printing it as tables, and sending STOP to its control socket. */
#ifndef SEMOE_CLI_H
#define SEMOE_CLI_H

#include <cjson/cJSON.h>
#include <stdbool.h>
#include <stdio.h>

#include "actors/err.h"

#define CLI_STATUS_ENDPOINT "tcp://127.0.0.1:5556"
#define CLI_CONTROL_ENDPOINT "tcp://127.0.0.1:5555"
#define CLI_EXIT_USAGE 2

/* The subcommands: argv[0] is the subcommand's name; each returns the process exit code. */
int cli_status_main(int argc, char **argv);
int cli_stop_main(int argc, char **argv);
int cli_demo_main(int argc, char **argv);

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

/* "tcp://HOST:PORT" with PORT 1..65535, or ipc://PATH. */
bool cli_endpoint_ok(const char *endpoint);

/* Milliseconds as an int flag value within [lo, hi]; false when it is not one. */
bool cli_parse_int(const char *s, long lo, long hi, long *out);

#endif
