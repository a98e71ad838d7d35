/* Compressed id ranges and endpoint syntax (actors/fmt.h), shared by the worker's log lines, the
 * `semoe` command's tables and the flag checks of both. */
#include "actors/fmt.h"

#include <stdio.h>
#include <string.h>

void fmt_ranges(const uint32_t *ids, size_t n, char *buf, size_t size)
{
    size_t len = 0;
    buf[0] = 0;
    for (size_t i = 0; i < n;) {
        size_t j = i;
        while (j + 1 < n && ids[j + 1] == ids[j] + 1)
            j++;
        char run[32];
        if (i == j)
            snprintf(run, sizeof run, "%s%u", i ? "," : "", ids[i]);
        else
            snprintf(run, sizeof run, "%s%u-%u", i ? "," : "", ids[i], ids[j]);
        /* room for the run and, after it, a ",..." that may still have to follow */
        if (len + strlen(run) + 4 >= size) {
            snprintf(buf + len, size - len, ",...");
            return;
        }
        len += (size_t)snprintf(buf + len, size - len, "%s", run);
        i = j + 1;
    }
}

bool fmt_endpoint_split(const char *ep, const char **port)
{
    *port = NULL;
    if (strncmp(ep, "ipc://", 6) == 0)
        return ep[6] != 0;
    if (strncmp(ep, "tcp://", 6) != 0)
        return false;
    const char *host = ep + 6, *colon = strrchr(host, ':');
    if (!colon || colon == host)
        return false;
    *port = colon + 1;
    return true;
}
