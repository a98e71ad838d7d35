/* The training's progress (progress.h): the job's numbers folded from the workers' HEARTBEATs,
 * and the metrics log written with stdio, line-buffered, on a file opened with O_APPEND. */
#include "coordinator/progress.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "actors/log.h"

struct progress {
    uint64_t n_total;
    uint64_t *step_load;  // (n_total) tokens of the last step its holders reported (this plan)
    uint64_t step;        // the most steps any worker reported done
    bool training;        // a worker reported training, or a step done
    double loss;          // reported after loss_step steps, the most any loss came with; NaN
    uint64_t loss_step;
    double eval_loss;     // the latest evaluation reported, after eval_step steps; NaN: none
    uint64_t eval_step;
    uint64_t eval_logged; // 1 + eval_step of the last evaluation in the log (0: none)
    FILE *log;            // --metrics-log, or NULL
};

semoe_rc progress_new(uint64_t n_total, const char *log_path, progress_t **self_p)
{
    *self_p = NULL;
    FILE *log = NULL;
    if (log_path) {
        int fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        log = fd >= 0 ? fdopen(fd, "a") : NULL;
        if (!log) {
            semoe_rc rc = semoe_err_errno(SEMOE_EINVAL, "--metrics-log %s: cannot open for "
                                          "appending", log_path);
            if (fd >= 0)
                close(fd);
            return rc;
        }
        setvbuf(log, NULL, _IOLBF, 0);
    }
    progress_t *self = semoe_xcalloc(1, sizeof *self);
    self->n_total = n_total;
    self->step_load = semoe_xcalloc(n_total ? n_total : 1, sizeof *self->step_load);
    self->loss = self->eval_loss = NAN;
    self->log = log;
    *self_p = self;
    return SEMOE_OK;
}

void progress_destroy(progress_t **self_p)
{
    progress_t *self = *self_p;
    if (!self)
        return;
    if (self->log)
        fclose(self->log);
    free(self->step_load);
    free(self);
    *self_p = NULL;
}

void progress_take_load(progress_t *self, member_t *m, proto_u32s_t load)
{
    for (uint32_t i = 0; i < m->n_experts; i++)
        if (m->experts[i] < self->n_total && m->experts[i] < load.count)
            m->load_last[i] = proto_u32_at(load, m->experts[i]);
}

const uint64_t *progress_loads(progress_t *self, const members_t *members)
{
    memset(self->step_load, 0, self->n_total * sizeof *self->step_load);
    for (const member_t *m = members_first(members); m; m = m->next)
        for (uint32_t i = 0; m->placed && m->has_load && i < m->n_experts; i++)
            if (m->experts[i] < self->n_total)
                self->step_load[m->experts[i]] += m->load_last[i];
    return self->step_load;
}

/* The job's tokens per second: the sum over the workers that are training. */
static double s_tokens_per_s(const members_t *members)
{
    double sum = 0;
    for (const member_t *m = members_first(members); m; m = m->next)
        if (m->phase == PROTO_PHASE_TRAINING)
            sum += m->tokens_per_s;
    return sum;
}

double progress_imbalance(const members_t *members)
{
    double max = 0, sum = 0;
    uint32_t n = 0;
    for (const member_t *m = members_first(members); m; m = m->next) {
        if (!m->placed)
            continue;
        if (!m->has_load)
            return NAN;
        double tokens = 0;
        for (uint32_t i = 0; i < m->n_experts; i++)
            tokens += m->load_last[i];
        max = tokens > max ? tokens : max;
        sum += tokens;
        n++;
    }
    return sum > 0 ? max * n / sum : NAN;
}

/* Appends the log's line for the step the job just reached. Each worker's numbers are those of
 * its last HEARTBEAT, so tokens per second and loads may be a step or two behind the step; the
 * loss is the step's own (null if the report that advanced it had none). An evaluation appears
 * once, on the first line after it was reported, with the step it was measured at. */
static void s_log_line(progress_t *self, const members_t *members, uint64_t generation,
                       uint32_t world)
{
    FILE *f = self->log;
    fprintf(f, "{\"time\":%.3f,\"step\":%" PRIu64 ",\"generation\":%" PRIu64
            ",\"workers\":%u,\"loss\":", (double)clock_wall_ms() / 1000.0, self->step,
            generation, world);
    if (self->loss_step == self->step && isfinite(self->loss))
        fprintf(f, "%.9g", self->loss);
    else
        fputs("null", f);
    if (isfinite(self->eval_loss) && self->eval_logged != self->eval_step + 1) {
        fprintf(f, ",\"eval_loss\":%.9g,\"eval_step\":%" PRIu64, self->eval_loss,
                self->eval_step);
        self->eval_logged = self->eval_step + 1;
    }
    fprintf(f, ",\"tokens_per_s\":%.1f", s_tokens_per_s(members));
    double imbalance = progress_imbalance(members);
    if (isfinite(imbalance))
        fprintf(f, ",\"imbalance\":%.4f", imbalance);
    fputs(",\"load\":[", f);
    progress_loads(self, members);
    for (uint64_t e = 0; e < self->n_total; e++)
        fprintf(f, e ? ",%" PRIu64 : "%" PRIu64, self->step_load[e]);
    fputs("]}\n", f);
    if (ferror(f)) { // a full disk must not stop the job: it stops the log
        log_error("--metrics-log: cannot write: %s; no more lines", strerror(errno));
        fclose(f);
        self->log = NULL;
    }
}

bool progress_take(progress_t *self, const member_t *m, const members_t *members,
                   uint64_t generation, uint32_t world)
{
    if (m->phase == PROTO_PHASE_TRAINING || m->step > 0)
        self->training = true;
    if (isfinite(m->loss) && (isnan(self->loss) || m->step >= self->loss_step)) {
        self->loss = m->loss;
        self->loss_step = m->step;
    }
    if (isfinite(m->eval_loss) && (isnan(self->eval_loss) || m->eval_step >= self->eval_step)) {
        self->eval_loss = m->eval_loss;
        self->eval_step = m->eval_step;
    }
    if (m->step <= self->step)
        return false;
    self->step = m->step;
    if (self->log)
        s_log_line(self, members, generation, world);
    return true;
}

void progress_restore(progress_t *self, uint64_t step, bool training)
{
    self->step = step;
    self->training = training;
}

uint64_t progress_step(const progress_t *self) { return self->step; }

bool progress_training(const progress_t *self) { return self->training; }

void progress_view(const progress_t *self, status_view_t *v)
{
    v->phase = self->training ? "training" : "waiting";
    v->step = self->step;
    v->loss = self->loss;
    v->eval_loss = self->eval_loss;
    v->eval_step = self->eval_step;
    v->tokens_per_s = s_tokens_per_s(v->members);
}

bool progress_all_finished(const members_t *members, uint64_t steps)
{
    uint32_t n = 0;
    for (const member_t *m = members_first(members); m; m = m->next) {
        if (!m->placed)
            continue;
        if (m->phase != PROTO_PHASE_FINISHED || m->step < steps)
            return false;
        n++;
    }
    return n > 0;
}
