/* semoe-coordinator: reads the flags and the job spec, then runs the coordinator until a STOP
 * has been carried out (an admin's, or its own once training finished) or SIGTERM/SIGINT
 * arrives. Exit codes: 0 done, 1 an endpoint could not be bound, 2 a bad flag, job spec,
 * metrics log or state directory (one line on stderr naming it). */
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "actors/log.h"
#include "coordinator/coord.h"
#include "model/job.h"
#include "semoe_config.h"

#define S_NAME "semoe-coordinator"

static const char s_usage[] =
    "usage: " S_NAME " --config JOB.json [options]\n"
    "       " S_NAME " --state-dir DIR [options]      (go on with the job saved in DIR)\n"
    "\n"
    "The coordinator of one semoe job: workers join it, it decides which worker holds which\n"
    "experts (a new generation and PLAN whenever membership changes), and it answers `semoe\n"
    "status` and Prometheus.\n"
    "\n"
    "  -c, --config JOB.json    the job spec (required unless --state-dir holds a saved job)\n"
    "  -b, --bind ENDPOINT      control socket for workers and `semoe stop` (ZeroMQ ROUTER)\n"
    "                           [" COORD_DEFAULT_CONTROL "]\n"
    "  -s, --status ENDPOINT    status socket: send \"status\" from a ZeroMQ REQ, get JSON\n"
    "                           [" COORD_DEFAULT_STATUS "]\n"
    "  -m, --metrics HOST:PORT  HTTP GET /metrics in Prometheus text format, or \"none\"\n"
    "                           [" COORD_DEFAULT_METRICS "]\n"
    "      --metrics-log FILE   append a JSON line to FILE each time the job's step advances:\n"
    "                           time, step, generation, workers, loss, eval_loss, tokens_per_s,\n"
    "                           imbalance, load per expert (docs/control-plane.md) [none]\n"
    "      --state-dir DIR      keep the coordinator's state in DIR/state.json (created when\n"
    "                           missing): started again with the same DIR after a crash, it\n"
    "                           goes on with the same run, its workers and its placement\n"
    "                           (docs/control-plane.md, \"Coordinator restart\"). A --config\n"
    "                           must then be the saved job; leave it out to take that one [none]\n"
    "  -l, --log-level LEVEL    error, warn, info or debug [info]\n"
    "  -h, --help               this text\n"
    "  -V, --version            the version\n"
    "\n"
    "Everything binds to loopback unless told otherwise; binding beyond it is an explicit\n"
    "choice. Heartbeat interval, liveness and the workers to wait for before the first plan\n"
    "(expected_workers) come from the job's cluster section.\n"
    "Exits 0 after a STOP (every worker told to stop), once every worker finished train.steps,\n"
    "or on SIGTERM/SIGINT; 1 when an endpoint cannot be bound, 2 on a bad flag, job spec,\n"
    "metrics log or state directory (a damaged DIR/state.json is named and left as it is).\n";

/* The flag getopt stopped at, for messages ("--bnid", "-x"). */
static const char *s_flag(char **argv, char *buf, size_t n)
{
    if (optopt > 0 && optopt < 128) { // a long-only flag's optopt is its code, not a letter
        snprintf(buf, n, "-%c", optopt);
        return buf;
    }
    return argv[optind - 1];
}

enum { S_OPT_METRICS_LOG = 1000, S_OPT_STATE_DIR };

int main(int argc, char **argv)
{
    coord_opts_t opts = {.control = COORD_DEFAULT_CONTROL, .status = COORD_DEFAULT_STATUS,
                         .metrics = COORD_DEFAULT_METRICS};
    const char *config = NULL;
    int level = LOG_INFO;
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},   {"bind", required_argument, NULL, 'b'},
        {"status", required_argument, NULL, 's'},   {"metrics", required_argument, NULL, 'm'},
        {"log-level", required_argument, NULL, 'l'}, {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {"metrics-log", required_argument, NULL, S_OPT_METRICS_LOG},
        {"state-dir", required_argument, NULL, S_OPT_STATE_DIR}, {NULL, 0, NULL, 0},
    };
    char flag[8];
    opterr = 0; // our own one-line messages
    int c;
    while ((c = getopt_long(argc, argv, ":c:b:s:m:l:hV", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            config = optarg;
            break;
        case 'b':
            opts.control = optarg;
            break;
        case 's':
            opts.status = optarg;
            break;
        case 'm':
            opts.metrics = optarg;
            break;
        case S_OPT_METRICS_LOG:
            opts.metrics_log = optarg;
            break;
        case S_OPT_STATE_DIR:
            opts.state_dir = optarg;
            break;
        case 'l':
            level = log_level_parse(optarg);
            if (level < 0) {
                fprintf(stderr, S_NAME ": --log-level %s: want error, warn, info or debug\n",
                        optarg);
                return 2;
            }
            break;
        case 'h':
            fputs(s_usage, stdout);
            return 0;
        case 'V':
            printf(S_NAME " %s\n", SEMOE_VERSION);
            return 0;
        case ':':
            fprintf(stderr, S_NAME ": %s needs a value (see --help)\n",
                    s_flag(argv, flag, sizeof flag));
            return 2;
        default:
            fprintf(stderr, S_NAME ": unknown flag %s (see --help)\n",
                    s_flag(argv, flag, sizeof flag));
            return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, S_NAME ": unexpected argument '%s' (see --help)\n", argv[optind]);
        return 2;
    }
    if (!config && !opts.state_dir) {
        fprintf(stderr, S_NAME ": --config JOB.json is required (see --help)\n");
        return 2;
    }
    log_init("coordinator", (log_level_t)level);
    signal(SIGPIPE, SIG_IGN); // a metrics client that hangs up must not end us

    model_job_t *job = NULL; // without --config, the one saved in --state-dir (coord_new)
    if (config && model_job_load(config, &job) != SEMOE_OK) {
        fprintf(stderr, S_NAME ": %s\n", semoe_err_msg());
        return 2;
    }
    coord_t *coord = NULL;
    semoe_rc rc = coord_new(&opts, &job, &coord);
    if (rc != SEMOE_OK) {
        fprintf(stderr, S_NAME ": %s\n", semoe_err_msg());
        return rc == SEMOE_EINVAL ? 2 : 1;
    }
    rc = coord_run(coord);
    coord_destroy(&coord);
    if (rc != SEMOE_OK) {
        fprintf(stderr, S_NAME ": %s\n", semoe_err_msg());
        return 1;
    }
    log_info("stopped");
    return 0;
}
