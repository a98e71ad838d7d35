/* What a worker runs on and what it offers: the device named by --device ("cpu" or "cuda:N"),
 * its name, and the memory per tier (HBM, host RAM, SSD) that goes into JOIN and HEARTBEAT. */
#ifndef SEMOE_WORKER_DEVICE_H
#define SEMOE_WORKER_DEVICE_H

#include <stdint.h>

#include "actors/err.h"
#include "proto/msg.h"

typedef struct {
    char kind[8];                    /* "cpu" or "cuda" */
    uint32_t index;                  /* N of cuda:N; 0 for cpu */
    char name[PROTO_MAX_NAME + 1];   /* "AMD EPYC 7R13 48-Core Processor", "NVIDIA H200" */
    uint64_t total[PROTO_TIERS];     /* bytes offered per tier (proto_tier_t) */
} worker_device_t;

/* Checks a --device value: "cpu" or "cuda:N" with N in 0..1023. Fills kind and index; on a bad
 * value returns SEMOE_EINVAL with a message naming the value and what is accepted. */
semoe_rc worker_device_parse(const char *spec, worker_device_t *dev);

/* Parses spec and probes the device: the name (/proc/cpuinfo for cpu, the CUDA runtime for
 * cuda), HBM (cuda only), host RAM, and the free bytes of the file system holding dir (the
 * SSD tier). cuda in a build without CUDA fails with SEMOE_EINVAL and a message that says
 * how to rebuild. */
semoe_rc worker_device_probe(const char *spec, const char *dir, worker_device_t *dev);

/* Bytes in use now per tier: HBM in use on the device (cuda), this process's resident memory,
 * and 0 for SSD until the store actor keeps files there. */
void worker_device_used(const worker_device_t *dev, uint64_t used[PROTO_TIERS]);

/* Host RAM in bytes (MemTotal), and the free bytes of dir's file system (0 if unknown). */
uint64_t worker_device_host_ram(void);
uint64_t worker_device_fs_free(const char *dir);

#endif
