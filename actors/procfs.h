/* Readings of a process from Linux's /proc, for the programs that watch a daemon they started
 * (the tests, the benchmarks). */
#ifndef SEMOE_ACTORS_PROCFS_H
#define SEMOE_ACTORS_PROCFS_H

#include <stdint.h>
#include <sys/types.h>

/* The peak resident set size of process pid (VmHWM in /proc/PID/status), in kB; 0 when it
 * cannot be read (no such process, or not ours to read). */
uint64_t procfs_peak_rss_kb(pid_t pid);

#endif
