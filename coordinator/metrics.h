/* /metrics: a small HTTP/1.x server on the coordinator's libuv loop: GET /metrics gets the
 * Prometheus text format, anything else 404; one bounded request per connection, answered,
 * then closed, so garbage and slow clients cost a buffer and a timer each, for a while. */
#ifndef SEMOE_COORDINATOR_METRICS_H
#define SEMOE_COORDINATOR_METRICS_H

#include <stddef.h>
#include <uv.h>

#include "coordinator/status.h"

#define METRICS_MAX_REQUEST 8192 /* bytes of request line and headers */
#define METRICS_TIMEOUT_MS 5000  /* a connection must send its request and go within this */
#define METRICS_MAX_CONNS 64      /* beyond: a new one displaces the oldest still sending */

typedef struct metrics metrics_t;

/* Produces the body of GET /metrics: malloc'd text the server frees, its length in *len. */
typedef char *(metrics_render_fn)(void *arg, size_t *len);

/* Listens on endpoint ("HOST:PORT", "[V6ADDR]:PORT"; "*" for every IPv4 address) on loop;
 * *self_p gets the server, the caller's. render is called once per GET /metrics. Fails with
 * SEMOE_EINVAL for an endpoint that does not parse, SEMOE_EIO when it cannot listen. The loop
 * must outlive the server. */
semoe_rc metrics_new(uv_loop_t *loop, const char *endpoint, metrics_render_fn *render, void *arg,
                     metrics_t **self_p);
/* Closes the listener and every open connection (their handles finish closing on the next
 * loop turn, then the memory is freed); nulls *self_p. */
void metrics_destroy(metrics_t **self_p);

/* The Prometheus text for a view of the coordinator (caller frees; length in *len). */
char *metrics_format(const status_view_t *v, size_t *len);

#endif
