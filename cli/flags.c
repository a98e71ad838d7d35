/* Flag checks the `semoe` subcommands share (cli/cli.h): numbers, endpoints and devices, and
 * the usage errors of a getopt_long loop, each one line "semoe CMD: WHAT (see semoe CMD --help)";
 * and the compute backend a --device names. */
#include <ctype.h>
#include <getopt.h>
#include <stdlib.h>
#include <string.h>

#include "actors/fmt.h"
#include "cli/cli.h"
#include "semoe_config.h"
#if SEMOE_HAVE_CUDA
#include "gpu/backend.h"
#endif

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

bool cli_flag_device(const char *cmd, const char *value, int *cuda)
{
    if (strcmp(value, "cpu") == 0) {
        *cuda = -1;
        return true;
    }
    /* as semoe-worker's worker_device_parse: cuda:N, N 1..4 digits, at most 1023 */
    if (strncmp(value, "cuda:", 5) == 0) {
        const char *n = value + 5;
        size_t len = strlen(n);
        bool digits = len > 0 && len <= 4;
        for (size_t i = 0; i < len && digits; i++)
            digits = isdigit((unsigned char)n[i]);
        if (digits && atoi(n) <= 1023) {
            *cuda = atoi(n);
            return true;
        }
    }
    fprintf(stderr, "semoe %s: --device %s: expected cpu or cuda:N (N = 0..1023)\n", cmd, value);
    return false;
}

int cli_device_backend(const char *cmd, int cuda, const model_backend_f32_t **be)
{
    *be = &cpu_backend_f32;
    if (cuda < 0)
        return 0;
#if SEMOE_HAVE_CUDA
    semoe_rc rc = gpu_backend_init(cuda);
    if (rc != SEMOE_OK) {
        /* the message starts with "cuda:N: " */
        fprintf(stderr, "semoe %s: --device %s\n", cmd, semoe_err_msg());
        return rc == SEMOE_EINVAL ? CLI_EXIT_USAGE : 1;
    }
    *be = &gpu_backend_f32;
    return 0;
#else
    fprintf(stderr, "semoe %s: --device cuda:%d: this build has no CUDA (rebuild with meson setup "
                    "-Dcuda=enabled)\n", cmd, cuda);
    return CLI_EXIT_USAGE;
#endif
}
