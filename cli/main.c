/* semoe: the command a person types. Dispatches to a subcommand (status, stop, demo, eval,
 * generate); each lives in its own file in cli/ and takes its own flags. */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "semoe_config.h"

static const char s_usage[] =
    "usage: semoe <command> [flags]\n"
    "\n"
    "commands:\n"
    "  status   show the coordinator's workers, plan and experts (--json, --watch)\n"
    "  stop     ask the coordinator to stop the job: it stops its workers, then itself\n"
    "  demo     start a coordinator and 4 CPU workers here, kill one, watch the reassignment\n"
    "  eval     cross-entropy (and logits) of a text under a checkpoint\n"
    "  generate sample bytes from a checkpoint, continuing a prompt\n"
    "  help     this text; `semoe <command> --help` for a command's flags\n"
    "\n"
    "The daemons are semoe-coordinator and semoe-worker (each has --help).\n";

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs(s_usage, stderr);
        return CLI_EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "status") == 0)
        return cli_status_main(argc - 1, argv + 1);
    if (strcmp(cmd, "stop") == 0)
        return cli_stop_main(argc - 1, argv + 1);
    if (strcmp(cmd, "demo") == 0)
        return cli_demo_main(argc - 1, argv + 1);
    if (strcmp(cmd, "eval") == 0)
        return cli_eval_main(argc - 1, argv + 1);
    if (strcmp(cmd, "generate") == 0)
        return cli_generate_main(argc - 1, argv + 1);
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        fputs(s_usage, stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "version") == 0) {
        printf("semoe %s\n", SEMOE_VERSION);
        return 0;
    }
    fprintf(stderr, "semoe: unknown command '%s' (commands: status, stop, demo, eval, generate, "
                    "help)\n", cmd);
    return CLI_EXIT_USAGE;
}
