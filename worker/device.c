/* Device probing for the worker: parses --device, reads the CPU model from /proc/cpuinfo or the
 * GPU's name and HBM through gpu/device.h, and measures host RAM and SSD space per tier. */
#include "worker/device.h"

#include <ctype.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <sys/sysinfo.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "semoe_config.h"
#if SEMOE_HAVE_CUDA
#include "gpu/device.h"
#endif

semoe_rc worker_device_parse(const char *spec, worker_device_t *dev)
{
    memset(dev, 0, sizeof *dev);
    if (strcmp(spec, "cpu") == 0) {
        snprintf(dev->kind, sizeof dev->kind, "cpu");
        return SEMOE_OK;
    }
    if (strncmp(spec, "cuda:", 5) == 0) {
        const char *n = spec + 5;
        size_t len = strlen(n);
        bool digits = len > 0 && len <= 4;
        for (size_t i = 0; i < len && digits; i++)
            digits = isdigit((unsigned char)n[i]);
        if (digits && atoi(n) <= 1023) {
            snprintf(dev->kind, sizeof dev->kind, "cuda");
            dev->index = (uint32_t)atoi(n);
            return SEMOE_OK;
        }
    }
    return semoe_err(SEMOE_EINVAL, "--device %s: expected cpu or cuda:N (N = 0..1023)", spec);
}

/* The "model name" line of /proc/cpuinfo, or the machine name when there is none (some ARM
 * kernels). */
static void s_cpu_name(char *name, size_t n)
{
    snprintf(name, n, "cpu");
    FILE *f = fopen("/proc/cpuinfo", "r");
    char line[512];
    bool found = false;
    while (f && !found && fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0)
            continue;
        char *v = strchr(line, ':');
        if (!v)
            continue;
        v++;
        while (*v == ' ' || *v == '\t')
            v++;
        v[strcspn(v, "\n")] = 0;
        if (*v) {
            snprintf(name, n, "%s", v);
            found = true;
        }
    }
    if (f)
        fclose(f);
    struct utsname u;
    if (!found && uname(&u) == 0)
        snprintf(name, n, "%s", u.machine);
}

uint64_t worker_device_host_ram(void)
{
    struct sysinfo si;
    if (sysinfo(&si) == 0)
        return (uint64_t)si.totalram * si.mem_unit;
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
}

uint64_t worker_device_fs_free(const char *dir)
{
    struct statvfs vfs;
    if (statvfs(dir, &vfs) != 0)
        return 0;
    return (uint64_t)vfs.f_bavail * vfs.f_frsize;
}

semoe_rc worker_device_probe(const char *spec, const char *dir, worker_device_t *dev)
{
    SEMOE_CHECK(worker_device_parse(spec, dev));
    if (strcmp(dev->kind, "cpu") == 0) {
        s_cpu_name(dev->name, sizeof dev->name);
    } else {
#if SEMOE_HAVE_CUDA
        uint64_t total = 0;
        semoe_rc rc = gpu_device_info((int)dev->index, dev->name, sizeof dev->name, &total, NULL);
        if (rc != SEMOE_OK) {
            char why[512]; /* semoe_err must not format its own buffer into itself */
            snprintf(why, sizeof why, "%s", semoe_err_msg());
            return semoe_err(rc, "--device %s", why); /* why starts with "cuda:N: " */
        }
        dev->total[PROTO_TIER_HBM] = total;
#else
        return semoe_err(SEMOE_EINVAL,
                         "--device %s: this build has no CUDA (rebuild with -Dcuda=enabled)",
                         spec);
#endif
    }
    dev->total[PROTO_TIER_HOST] = worker_device_host_ram();
    dev->total[PROTO_TIER_SSD] = worker_device_fs_free(dir);
    return SEMOE_OK;
}

/* Resident set size from /proc/self/statm (its second field, in pages). */
static uint64_t s_rss(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long long size = 0, resident = 0;
    int got = f ? fscanf(f, "%llu %llu", &size, &resident) : 0;
    if (f)
        fclose(f);
    long page = sysconf(_SC_PAGESIZE);
    return got == 2 && page > 0 ? resident * (uint64_t)page : 0;
}

void worker_device_used(const worker_device_t *dev, uint64_t used[PROTO_TIERS])
{
    used[PROTO_TIER_HBM] = 0;
    used[PROTO_TIER_HOST] = s_rss();
    used[PROTO_TIER_SSD] = 0;
#if SEMOE_HAVE_CUDA
    uint64_t total = 0, free_b = 0;
    if (strcmp(dev->kind, "cuda") == 0 &&
        gpu_device_mem((int)dev->index, &total, &free_b) == SEMOE_OK && total >= free_b)
        used[PROTO_TIER_HBM] = total - free_b;
#else
    (void)dev;
#endif
}
