/* Flag checks the `semoe` subcommands share (cli/cli.h): numbers and endpoints, and the usage
 * errors of a getopt_long loop, each one line "semoe CMD: WHAT (see semoe CMD --help)". */
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "actors/fmt.h"
#include "cli/cli.h"

bool cli_parse_int(const char *s, long lo, long hi, long *out)
{
    if (!s || !*s || strspn(s, "0123456789") != strlen(s) || strlen(s) > 9)
        return false;
    long v = strtol(s, NULL, 10);
    if (v < lo || v > hi)
        return false;
    *out = v;
    return true;
}

bool cli_endpoint_ok(const char *ep)
{
    const char *port;
    long n;
    return fmt_endpoint_split(ep, &port) && (!port || cli_parse_int(port, 1, 65535, &n));
}

int cli_flags_other(const char *cmd, int c, char **argv, const char *usage)
{
    if (c == 'h') {
        fputs(usage, stdout);
        return 0;
    }
    /* getopt_long has moved optind past the flag it could not take */
    if (c == ':')
        fprintf(stderr, "semoe %s: %s needs a value (see semoe %s --help)\n", cmd,
                argv[optind - 1], cmd);
    else
        fprintf(stderr, "semoe %s: unknown flag %s (see semoe %s --help)\n", cmd,
                argv[optind - 1], cmd);
    return CLI_EXIT_USAGE;
}

bool cli_flags_end(const char *cmd, int argc, char **argv)
{
    if (optind >= argc)
        return true;
    fprintf(stderr, "semoe %s: unexpected argument %s (see semoe %s --help)\n", cmd,
            argv[optind], cmd);
    return false;
}

bool cli_flag_timeout_ms(const char *cmd, const char *value, long *ms)
{
    if (cli_parse_int(value, 1, 3600000, ms))
        return true;
    fprintf(stderr, "semoe %s: --timeout-ms %s: expected milliseconds, 1..3600000\n", cmd,
            value);
    return false;
}

bool cli_flag_endpoint(const char *cmd, const char *endpoint)
{
    if (cli_endpoint_ok(endpoint))
        return true;
    fprintf(stderr, "semoe %s: --endpoint %s: expected tcp://HOST:PORT or ipc://PATH\n", cmd,
            endpoint);
    return false;
}
