/* Logging to stderr with a level, a timestamp and the process's role, and monotonic clocks. */
#ifndef SEMOE_LOG_H
#define SEMOE_LOG_H

#include <stdint.h>

typedef enum { LOG_ERROR = 0, LOG_WARN, LOG_INFO, LOG_DEBUG } log_level_t;

/* Sets the role printed on every line ("coordinator", "worker w3") and the level. */
void log_init(const char *role, log_level_t level);
/* Parses "error|warn|info|debug"; returns -1 if none of them. */
int log_level_parse(const char *s);
void log_msg(log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define log_error(...) log_msg(LOG_ERROR, __VA_ARGS__)
#define log_warn(...)  log_msg(LOG_WARN, __VA_ARGS__)
#define log_info(...)  log_msg(LOG_INFO, __VA_ARGS__)
#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)

/* Monotonic clock in milliseconds and microseconds; wall clock in milliseconds. */
int64_t clock_mono_ms(void);
int64_t clock_mono_us(void);
int64_t clock_wall_ms(void);

#endif
