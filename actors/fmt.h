/* Small text forms that more than one program writes or reads: a list of ids as compressed
 * ranges ("0-3,8,10-11"), and the ZeroMQ endpoints semoe uses across processes. */
#ifndef SEMOE_ACTORS_FMT_H
#define SEMOE_ACTORS_FMT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Writes ids[0..n) (ascending) into buf as runs, "0-3,8,10-11", cut with ",..." where the next
 * run would not fit in size bytes; "" when n is 0. size must be at least 1. */
void fmt_ranges(const uint32_t *ids, size_t n, char *buf, size_t size);

/* Splits ep as ipc://PATH (PATH not empty: *port is NULL) or tcp://HOST:PORT (HOST not empty:
 * *port points at PORT inside ep, not checked). False for anything else. */
bool fmt_endpoint_split(const char *ep, const char **port);

#endif
