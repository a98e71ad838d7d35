/* Job specs edited by the benchmarks, and their CPU accounting (bench/benchutil.h). */
#include "bench/benchutil.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "model/spec.h"

semoe_rc bench_job_read(const char *path, cJSON **root)
{
    size_t len = 0;
    char *text = NULL;
    *root = NULL;
    SEMOE_CHECK(model_spec_read_file(path, path, &text, &len));
    semoe_rc rc = model_spec_parse(text, len, path, root);
    free(text);
    SEMOE_CHECK(rc);
    if (!cJSON_IsObject(*root)) {
        cJSON_Delete(*root);
        *root = NULL;
        return semoe_err(SEMOE_EINVAL, "--job %s: not a JSON object", path);
    }
    return SEMOE_OK;
}

cJSON *bench_job_section(cJSON *root, const char *name)
{
    cJSON *s = cJSON_GetObjectItemCaseSensitive(root, name);
    if (!cJSON_IsObject(s)) {
        cJSON_DeleteItemFromObjectCaseSensitive(root, name);
        s = cJSON_CreateObject();
        model_spec_put(root, name, s);
    }
    return s;
}

void bench_job_set(cJSON *obj, const char *key, cJSON *item)
{
    cJSON_DeleteItemFromObjectCaseSensitive(obj, key);
    model_spec_put(obj, key, item);
}

void bench_job_set_num(cJSON *obj, const char *key, double v)
{
    bench_job_set(obj, key, cJSON_CreateNumber(v));
}

semoe_rc bench_job_write(cJSON *root, const char *path)
{
    char *out = cJSON_Print(root);
    cJSON_Delete(root);
    if (!out)
        abort(); /* out of memory */
    FILE *f = fopen(path, "w");
    semoe_rc rc = SEMOE_OK;
    if (!f || fputs(out, f) < 0 || fputc('\n', f) < 0)
        rc = semoe_err_errno(SEMOE_EIO, "%s", path);
    if (f && fclose(f) != 0 && rc == SEMOE_OK)
        rc = semoe_err_errno(SEMOE_EIO, "%s", path);
    cJSON_free(out);
    return rc;
}

double bench_num(const cJSON *obj, const char *key, double dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

void bench_cpu(double *machine, double *own)
{
    unsigned long long v[8] = {0};
    FILE *f = fopen("/proc/stat", "r");
    if (!f || fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                     &v[3], &v[4], &v[5], &v[6], &v[7]) != 8)
        memset(v, 0, sizeof v);
    if (f)
        fclose(f);
    *machine = (double)(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / (double)sysconf(_SC_CLK_TCK);
    struct rusage self, kids;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &kids);
    *own = 0;
    const struct timeval *tv[4] = {&self.ru_utime, &self.ru_stime, &kids.ru_utime,
                                   &kids.ru_stime};
    for (int i = 0; i < 4; i++)
        *own += (double)tv[i]->tv_sec + tv[i]->tv_usec / 1e6;
}

void bench_sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}
