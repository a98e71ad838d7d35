/* What the benchmarks that run the real daemons share: a job spec read, edited and written
 * back (a bench keeps the data of a given spec and sets its own model, train and cluster
 * knobs), the machine's and this process's CPU time (to say what else ran meanwhile) and an
 * interruption-proof sleep. */
#ifndef SEMOE_BENCH_BENCHUTIL_H
#define SEMOE_BENCH_BENCHUTIL_H

#include <cjson/cJSON.h>

#include "actors/err.h"

/* The job spec at path (model/spec.h's reader: comments and errors as the daemons see them)
 * into *root; EINVAL when it is not one JSON object. */
semoe_rc bench_job_read(const char *path, cJSON **root);

/* root[name] as an object, made (replacing anything else there) when missing. */
cJSON *bench_job_section(cJSON *root, const char *name);

/* obj[key] = item (taken over), replacing what was there. */
void bench_job_set(cJSON *obj, const char *key, cJSON *item);
void bench_job_set_num(cJSON *obj, const char *key, double v);

/* Writes root (deleted) to path, one JSON object and a newline. */
semoe_rc bench_job_write(cJSON *root, const char *path);

/* obj[key] as a number, or dflt when it is missing or not a number. */
double bench_num(const cJSON *obj, const char *key, double dflt);

/* Busy CPU seconds of the whole machine (/proc/stat) and of this process with its reaped
 * children (getrusage): their difference over a run is what else ran meanwhile. */
void bench_cpu(double *machine, double *own);

void bench_sleep_ms(int ms);

#endif
