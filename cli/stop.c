/* `semoe stop`: sends STOP to the coordinator's control socket. The coordinator then sends STOP
 * to every worker; they exit 0, and so does it (docs/control-plane.md). */
#include <getopt.h>
#include <string.h>
#include <zmq.h>

#include "cli/cli.h"
#include "proto/msg.h"

#define S_LINGER_MS 2000 /* how long the STOP may wait in the socket after we close it */

semoe_rc cli_stop_send(void *ctx, const char *endpoint, int timeout_ms, bool *acked)
{
    *acked = false;
    void *dealer = zmq_socket(ctx, ZMQ_DEALER);
    if (!dealer)
        return semoe_err(SEMOE_EIO, "DEALER socket: %s", zmq_strerror(zmq_errno()));
    semoe_rc rc = proto_socket_setup(dealer);
    int ipv6 = strchr(endpoint, '[') != NULL; /* tcp://[::1]:5555 */
    zmq_setsockopt(dealer, ZMQ_IPV6, &ipv6, sizeof ipv6);
    int immediate = 1; /* queue only on a live connection: a writable socket means one is up */
    if (rc == SEMOE_OK && zmq_setsockopt(dealer, ZMQ_IMMEDIATE, &immediate, sizeof immediate) != 0)
        rc = semoe_err(SEMOE_EIO, "ZMQ_IMMEDIATE: %s", zmq_strerror(zmq_errno()));
    if (rc == SEMOE_OK && zmq_connect(dealer, endpoint) != 0)
        rc = semoe_err(SEMOE_EINVAL, "%s: %s", endpoint, zmq_strerror(zmq_errno()));
    if (rc != SEMOE_OK) {
        zmq_close(dealer);
        return rc;
    }

    int64_t deadline = cli_now_ms() + timeout_ms;
    if (cli_wait(dealer, ZMQ_POLLOUT, deadline, NULL) != 1) {
        zmq_close(dealer);
        return semoe_err(SEMOE_ETIMEDOUT, "could not reach %s within %d ms: is "
                         "semoe-coordinator running?", endpoint, timeout_ms);
    }

    proto_msg_t msg = {0};
    msg.hdr.type = PROTO_STOP;
    msg.hdr.seq = 1;
    msg.stop.checkpoint = 1;
    rc = proto_send(dealer, NULL, 0, &msg);
    if (rc != SEMOE_OK) {
        zmq_close(dealer);
        return rc;
    }
    /* The coordinator answers ACK (acked_type STOP), or ERROR when it refuses. */
    while (!*acked && rc == SEMOE_OK && cli_wait(dealer, ZMQ_POLLIN, deadline, NULL) == 1) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        proto_msg_t reply;
        if (zmq_msg_recv(&m, dealer, 0) >= 0 &&
            proto_decode(zmq_msg_data(&m), zmq_msg_size(&m), &reply) == PROTO_OK) {
            if (reply.hdr.type == PROTO_ERROR)
                rc = semoe_err(SEMOE_EPROTO, "%s refused the STOP: %s", endpoint,
                               reply.error.text);
            else if (reply.hdr.type == PROTO_ACK && reply.ack.acked_type == PROTO_STOP)
                *acked = true;
        }
        zmq_msg_close(&m);
    }
    int linger = S_LINGER_MS;
    zmq_setsockopt(dealer, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(dealer);
    return rc;
}

static const char s_usage[] =
    "usage: semoe stop [--endpoint tcp://127.0.0.1:5555] [--timeout-ms 2000]\n"
    "\n"
    "Asks the coordinator to stop the job: it sends STOP to every worker, they exit, then it\n"
    "exits.\n"
    "\n"
    "  --endpoint E     the coordinator's control endpoint (default tcp://127.0.0.1:5555)\n"
    "  --timeout-ms T   how long to wait to reach it, and for its answer (default 2000)\n";

int cli_stop_main(int argc, char **argv)
{
    enum { O_ENDPOINT = 1, O_TIMEOUT };
    static const struct option opts[] = {
        {"endpoint", required_argument, 0, O_ENDPOINT},
        {"timeout-ms", required_argument, 0, O_TIMEOUT},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *endpoint = CLI_CONTROL_ENDPOINT;
    long timeout_ms = 2000;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, ":h", opts, NULL)) != -1) {
        switch (c) {
        case O_ENDPOINT: endpoint = optarg; break;
        case O_TIMEOUT:
            if (!cli_flag_timeout_ms("stop", optarg, &timeout_ms))
                return CLI_EXIT_USAGE;
            break;
        default: return cli_flags_other("stop", c, argv, s_usage);
        }
    }
    if (!cli_flags_end("stop", argc, argv) || !cli_flag_endpoint("stop", endpoint))
        return CLI_EXIT_USAGE;
    void *ctx = zmq_ctx_new();
    bool acked = false;
    semoe_rc rc = cli_stop_send(ctx, endpoint, (int)timeout_ms, &acked);
    zmq_ctx_term(ctx);
    if (rc != SEMOE_OK) {
        fprintf(stderr, "semoe stop: %s\n", semoe_err_msg());
        return 1;
    }
    if (acked)
        printf("semoe stop: %s acknowledged STOP: it stops its workers, then exits\n",
               endpoint);
    else
        printf("semoe stop: sent STOP to %s (no acknowledgement within %ld ms)\n", endpoint,
               timeout_ms);
    return 0;
}
