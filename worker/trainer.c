/* The trainer actor (worker/trainer.h): one thread that owns the data port and, per generation,
 * everything a training step needs. Between steps it serves its pipe; inside a collective the
 * port's interrupt (the pipe) breaks the wait, so a new PLAN is never stuck behind a peer that
 * went away. */
#include "worker/trainer.h"

#include <cblas.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>
#include <zmq.h>

#include "actors/log.h"
#include "model/backend.h"
#include "model/checkpoint.h"
#include "model/data.h"
#include "model/job.h"
#include "model/params.h"
#include "model/profile.h"
#include "model/train.h"
#include "semoe_config.h"
#if SEMOE_HAVE_CUDA
#include "gpu/backend.h"
#include "gpu/graph_bf16.h"
#include "gpu/nccl.h"
#endif
#include "worker/ckpt.h"
#include "worker/comm.h"
#include "worker/commid.h"
#include "worker/control.h"
#include "worker/exchange.h"
#include "worker/migrate.h"
#include "worker/plan.h"

/* A collective waits this long for a silent peer before the step is abandoned. A dead peer is
 * normally noticed sooner: the coordinator's next PLAN interrupts the wait. */
#define S_COMM_TIMEOUT_MS 60000
/* Dense gradients are all-reduced in buckets of this size (fusion communication). */
#define S_BUCKET_BYTES ((size_t)4 << 20)
/* Held-out batches of global_batch sequences an evaluation reads (fewer when the held-out split
 * is smaller): the same slice every time, so evaluations compare. */
#define S_EVAL_BATCHES 4
/* Checkpoints kept under train.checkpoint_dir (the newest ones). */
#define S_CKPT_KEEP 3

/* The backend of every step: the CPU one through the profiled table (model/profile.h: one per
 * process, and the trainer is its only user in a worker), so that each step's time splits by
 * op kind. Set when the actor starts. */
static const model_backend_f32_t *s_be = &cpu_backend_f32;

typedef struct {
    worker_trainer_config_t *cfg;
    void *pipe;
    comm_port_t *port;
    void *poke;               /* PAIR: a byte here interrupts a collective (a PLAN is coming) */
    FILE *metrics;
    bool terminated;

    /* the job */
    char *job_text;
    size_t job_len;
    model_job_t *job;
    model_data_t *data;
    bool failed;              /* this job cannot be trained here; wait for another */

    /* the generation */
    worker_plan_t plan;
    bool have_plan;
    bool ready;               /* the generation is set up: steps can run */
    bool busy;                /* a step began and has not finished (abandoned midway: its
                               * collectives may still be in flight) */
    bool paused;              /* the ranks agreed to stop at a step boundary (PAUSE) */
    bool want_pause;          /* a PAUSE came: ask the others at the next boundary */
    bool want_stop;           /* a STOP came: checkpoint at the next boundary, then stop */
    bool stopped;             /* the STOP's checkpoint is done: no more steps */
    comm_t *comm;
#if SEMOE_HAVE_CUDA
    gpu_nccl_t *nccl;         /* train.collectives nccl: the generation's NCCL communicator */
#endif
    worker_exchange_t *ex;
    model_exchange_f32 exf;
    model_params_t *params;
    model_train_t *tr;
    int32_t *owner;           /* (L*E) the rank holding each expert */
    uint32_t micro_steps;     /* the same on every rank */
    uint8_t *tokens;          /* this rank's rows of a batch */
    uint64_t *sample_ids;     /* their sample ids (the data's epoch permutation) */
    float **dense_bufs;       /* the dense tensors of the gradient slab, for the all-reduce */
    float **dense_host;       /* their host copies when the slab is device memory, else NULL */
    size_t *dense_lens;
    int32_t *dense_layer;     /* each dense tensor's layer (the layers' count: the final norm
                               * and an untied lm_head; -1: the embedding) */
    bool *dense_sent;         /* this step: its all-reduce already started during backward */
    semoe_rc bg_rc;           /* the first error of an all-reduce started during backward */
    char bg_err[256];         /* and its message */
    int n_dense;
    uint64_t *rows_in;        /* (L*E) the exchange's counts of the last step: received, */
    uint64_t *rows_out;       /* and sent (this rank's tokens' routing) */
    uint32_t *load;           /* (L*E) tokens per held expert in the last step */
    double t_reduce;          /* seconds in the gradient all-reduce this step */
    double t_snapshot;        /* seconds the last checkpoint's snapshot took (-1: none) */
    worker_ckpt_writer_t *writer; /* rank 0's checkpoints, written in the background */

    /* progress */
    uint64_t step;
    worker_progress_t prog;
} s_tr_t;

/* --- reporting ------------------------------------------------------------------------------- */

static void s_report(s_tr_t *self)
{
    worker_progress_t *p = &self->prog;
    p->step = self->step;
    p->generation = self->plan.generation;
    p->n_load = self->load && self->job ? self->job->model.num_hidden_layers *
                                              self->job->model.num_local_experts
                                        : 0;
    zmq_send(self->pipe, "PROGRESS", 8, ZMQ_SNDMORE);
    zmq_send(self->pipe, p, sizeof *p, ZMQ_SNDMORE);
    zmq_send(self->pipe, self->load, (size_t)p->n_load * sizeof(uint32_t), 0);
}

static void s_set_phase(s_tr_t *self, proto_phase_t phase)
{
    self->prog.phase = phase;
    s_report(self);
}

/* The STOP is done (its checkpoint written, or none to write): say so, and take no more steps. */
static void s_stopped(s_tr_t *self)
{
    self->stopped = true;
    self->want_stop = false;
    self->prog.stopped = 1;
    log_info("stopped at step %" PRIu64, self->step);
    s_report(self);
}

static double s_unix_now(void)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (double)tv.tv_sec + tv.tv_usec / 1e6;
}

/* A double as JSON (null for NaN and infinities). */
static void s_json_num(FILE *f, const char *key, double v)
{
    if (isfinite(v))
        fprintf(f, ",\"%s\":%.9g", key, v);
    else
        fprintf(f, ",\"%s\":null", key);
}

/* One JSON line per step into --metrics-log. The step's time (step_time_s) splits into the ops
 * of the profiled backend (t_gemm, t_attention, t_routing, t_elementwise, t_optimizer: AdamW
 * and the gradient's sum of squares, t_memory), the exchange's collectives (t_exchange: the
 * expert all-to-alls and the reductions of the loss statistics and of the gradient norm) and
 * the dense gradients' all-reduce (t_allreduce); the rest is the graph's own work and the
 * exchange's packing. t_forward and t_backward are the report's wall-clock phases (they include
 * their ops and exchanges). Evaluation is not in any of them. The line is made in memory and
 * written at once: stdio would cut a line longer than its buffer into two writes, and a reader
 * between them would see half a line. (A kill -9 can still cut a write at a page boundary:
 * readers drop a last line without its newline.) */
static void s_metrics_line(s_tr_t *self, const model_train_report_t *r, double seconds,
                           const worker_exchange_traffic_t *tf, const model_profile_t *prof,
                           bool evaluated)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = self->metrics ? open_memstream(&buf, &len) : NULL;
    if (!f)
        return;
    const worker_plan_t *pl = &self->plan;
    fprintf(f, "{\"time\":%.3f,\"worker\":\"%s\",\"rank\":%u,\"world\":%u,\"generation\":%" PRIu64
               ",\"step\":%" PRIu64,
            s_unix_now(), self->cfg->id, pl->rank, pl->world, pl->generation, self->step);
    s_json_num(f, "loss", r->loss);
    s_json_num(f, "ce", r->ce);
    s_json_num(f, "aux", r->aux);
    s_json_num(f, "grad_norm", r->grad_norm);
    s_json_num(f, "lr", r->lr);
    fprintf(f, ",\"tokens\":%" PRIu64, r->tokens);
    s_json_num(f, "tokens_per_s", self->prog.tokens_per_s);
    s_json_num(f, "step_time_s", seconds);
    s_json_num(f, "t_forward", r->t_forward);
    s_json_num(f, "t_backward", r->t_backward);
    s_json_num(f, "t_optimizer", prof->seconds[MODEL_PROF_OPTIMIZER]);
    s_json_num(f, "t_exchange", tf->seconds);
    s_json_num(f, "t_allreduce", self->t_reduce);
    s_json_num(f, "t_gemm", prof->seconds[MODEL_PROF_GEMM]);
    s_json_num(f, "t_attention", prof->seconds[MODEL_PROF_ATTENTION]);
    s_json_num(f, "t_routing", prof->seconds[MODEL_PROF_ROUTING]);
    s_json_num(f, "t_elementwise", prof->seconds[MODEL_PROF_ELEMENTWISE]);
    s_json_num(f, "t_memory", prof->seconds[MODEL_PROF_MEMORY]);
    s_json_num(f, "gemm_flops", prof->gemm_flops);
    if (self->t_snapshot >= 0) /* a checkpoint step: the pause its snapshot took */
        s_json_num(f, "t_snapshot", self->t_snapshot);
    fprintf(f, ",\"dispatch_rows_out\":%" PRIu64 ",\"dispatch_bytes_out\":%" PRIu64,
            tf->dispatch_rows_out, tf->dispatch_bytes_out);
    if (evaluated)
        s_json_num(f, "eval_loss", self->prog.eval_loss);
    /* load: tokens the experts held here received; routed: where this rank's tokens went */
    fprintf(f, ",\"load\":[");
    for (uint32_t i = 0; i < self->prog.n_load; i++)
        fprintf(f, "%s%u", i ? "," : "", self->load[i]);
    fprintf(f, "],\"routed\":[");
    for (uint32_t i = 0; i < self->prog.n_load; i++)
        fprintf(f, "%s%" PRIu64, i ? "," : "", self->rows_out[i] / 2);
    /* samples: the ids of this rank's rows (which samples this step trained on) */
    fprintf(f, "],\"samples\":[");
    for (uint64_t i = 0; i < pl->batch_hi - pl->batch_lo; i++)
        fprintf(f, "%s%" PRIu64, i ? "," : "", self->sample_ids[i]);
    fprintf(f, "]}\n");
    fclose(f);
    int fd = fileno(self->metrics); /* nothing buffered there: every line goes so */
    for (size_t off = 0; off < len;) { /* one write but for a short one */
        ssize_t n = write(fd, buf + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            log_warn("metrics log: %s", n < 0 ? strerror(errno) : "nothing written");
            break;
        }
        off += (size_t)n;
    }
    free(buf);
}

/* --- the generation ------------------------------------------------------------------------- */

/* Drops the generation's communicator and buffers; the training state (params, tr, step) stays
 * for the next generation's migration. */
static void s_teardown(s_tr_t *self)
{
    self->ready = false;
#if SEMOE_HAVE_CUDA
    /* first, so that nothing of it runs on the buffers freed below (a cudaFree would wait for
     * a collective stuck on a peer): a step abandoned midway aborts it */
    if (self->busy)
        gpu_nccl_abort(self->nccl);
    gpu_nccl_destroy(&self->nccl);
#endif
    self->busy = false;
    worker_exchange_destroy(&self->ex);
    comm_destroy(&self->comm);
    free(self->owner);
    free(self->tokens);
    free(self->sample_ids);
    free(self->dense_bufs);
    if (self->dense_host)
        free(self->dense_host[0]);
    free(self->dense_host);
    self->dense_host = NULL;
    free(self->dense_lens);
    free(self->dense_layer);
    free(self->dense_sent);
    self->dense_layer = NULL;
    self->dense_sent = NULL;
    free(self->rows_in);
    free(self->rows_out);
    self->rows_out = NULL;
    self->owner = NULL;
    self->tokens = NULL;
    self->sample_ids = NULL;
    self->dense_bufs = NULL;
    self->dense_lens = NULL;
    self->rows_in = NULL;
    self->n_dense = 0;
}

/* Drops the training state too: nothing left to hand over. */
static void s_drop_state(s_tr_t *self)
{
    model_train_destroy(&self->tr);
    model_params_destroy(&self->params);
}

static void s_drop_job(s_tr_t *self)
{
    s_teardown(self);
    if (self->writer)
        (void)worker_ckpt_writer_wait(self->writer);
    s_drop_state(self);
    model_data_destroy(&self->data);
    model_job_destroy(&self->job);
    free(self->load);
    self->load = NULL;
    self->failed = false;
}

#if SEMOE_HAVE_CUDA
/* Starts the NCCL all-reduce of the dense tensors of `layer` (-2: every one) not started yet
 * this step, in fused buckets (a layer's tensors are adjacent in the slab: one span); joined
 * (the caller's stream waits for it and for everything before it on the communicator) or in
 * the background. */
static semoe_rc s_dense_allreduce(s_tr_t *self, int layer, bool join)
{
    float **bufs = semoe_xcalloc((size_t)self->n_dense + 1, sizeof *bufs);
    size_t *lens = semoe_xcalloc((size_t)self->n_dense + 1, sizeof *lens);
    int k = 0;
    for (int i = 0; i < self->n_dense; i++)
        if (!self->dense_sent[i] && (layer == -2 || self->dense_layer[i] == layer)) {
            bufs[k] = self->dense_bufs[i];
            lens[k++] = self->dense_lens[i];
            self->dense_sent[i] = true;
        }
    semoe_rc rc = SEMOE_OK;
    if (k > 0)
        rc = join ? gpu_nccl_allreduce_buckets(self->nccl, bufs, lens, k, 0)
                  : gpu_nccl_allreduce_buckets_bg(self->nccl, bufs, lens, k, 0);
    if (join) /* the background's too */
        gpu_nccl_join(self->nccl);
    free(bufs);
    free(lens);
    return rc;
}

/* The last backward finished layer `layer`'s dense gradients (model_train_hooks_t's
 * dense_ready): their all-reduce starts now, beside the rest of backward (the paper's fused
 * communication overlapped with backward), and so do the sums of its replicated experts'
 * gradients where the placement lets them. An error is kept for s_reduce_grads to return. */
static void s_dense_ready(void *arg, int layer)
{
    s_tr_t *self = arg;
    if (!self->nccl || self->bg_rc != SEMOE_OK)
        return;
    semoe_rc rc = s_dense_allreduce(self, layer, false);
    const char *what = "dense gradients";
    if (rc == SEMOE_OK && layer < (int)self->job->model.num_hidden_layers) {
        /* its experts' are final too (the head has none): replicas' sums, where they go so */
        rc = worker_exchange_sum_replicas_layer(self->ex, self->params,
                                                model_train_grads(self->tr), layer);
        what = "replicated experts' gradients";
    }
    if (rc != SEMOE_OK) {
        self->bg_rc = rc;
        snprintf(self->bg_err, sizeof self->bg_err, "the all-reduce of layer %d's %s: %s",
                 layer, what, semoe_err_msg());
    }
}
#endif

static semoe_rc s_reduce_grads(void *arg, float *grads, size_t n)
{
    (void)grads, (void)n; /* dense_bufs point into the trainer's gradient slab */
    s_tr_t *self = arg;
    int64_t t0 = clock_mono_us();
    semoe_rc rc;
#if SEMOE_HAVE_CUDA
    if (self->nccl) { /* on the device, in buckets: what backward did not start already */
        rc = self->bg_rc;
        if (rc != SEMOE_OK)
            rc = semoe_err(rc, "%s", self->bg_err);
        if (rc == SEMOE_OK)
            rc = s_dense_allreduce(self, -2, true);
        if (rc != SEMOE_OK) /* whatever backward started writes the slab until it is done */
            gpu_nccl_join(self->nccl);
        if (rc == SEMOE_OK)
            rc = gpu_nccl_wait(self->nccl, S_COMM_TIMEOUT_MS);
        if (rc != SEMOE_OK) /* the replicas' sums backward started: not to be skipped later */
            worker_exchange_sum_replicas_cancel(self->ex);
        memset(self->dense_sent, 0, (size_t)self->n_dense * sizeof *self->dense_sent);
        self->bg_rc = SEMOE_OK;
        self->t_reduce += (double)(clock_mono_us() - t0) / 1e6;
        if (rc == SEMOE_OK)
            rc = worker_exchange_sum_replicas(self->ex, self->params, model_train_grads(self->tr));
        return rc;
    }
#endif
    /* over ZeroMQ the sums run on the host: a device slab goes there and back */
    float **bufs = self->dense_host ? self->dense_host : self->dense_bufs;
    for (int i = 0; self->dense_host && i < self->n_dense; i++)
        s_be->to_host(bufs[i], self->dense_bufs[i], self->dense_lens[i] * sizeof(float));
    rc = comm_allreduce_buckets(self->comm, bufs, self->dense_lens, self->n_dense,
                                S_BUCKET_BYTES, S_COMM_TIMEOUT_MS);
    for (int i = 0; rc == SEMOE_OK && self->dense_host && i < self->n_dense; i++)
        s_be->to_device(self->dense_bufs[i], bufs[i], self->dense_lens[i] * sizeof(float));
    self->t_reduce += (double)(clock_mono_us() - t0) / 1e6;
    if (rc == SEMOE_OK) /* replicas of an expert stay identical: their gradients summed */
        rc = worker_exchange_sum_replicas(self->ex, self->params, model_train_grads(self->tr));
    return rc;
}

/* Dense gradients are identical on every rank after the all-reduce: counted once. Each expert
 * counts once too, on its first holder. */
static semoe_rc s_reduce_sumsq(void *arg, double dense, double expert, double *global)
{
    s_tr_t *self = arg;
    (void)expert; /* counts a replicated expert on every holder: take it once, on the first */
    double mine = worker_exchange_expert_sumsq(self->ex, self->params, model_train_grads(self->tr));
    SEMOE_CHECK(self->exf.reduce_stats(self->exf.state, &mine, 1));
    *global = dense + mine;
    return SEMOE_OK;
}

/* Each expert's first (lowest-rank) holder: the one that sends it for a checkpoint. */
static void s_owners(s_tr_t *self)
{
    const worker_plan_t *p = &self->plan;
    size_t n = (size_t)p->num_layers * p->num_experts;
    self->owner = semoe_xcalloc(n + 1, sizeof *self->owner);
    for (size_t e = 0; e < n; e++)
        self->owner[e] = (int32_t)p->holders[p->holder_off[e]];
}

/* Rank 0's latest checkpoint step under the root (0: none, or no root). */
static semoe_rc s_latest(const model_job_t *job, uint64_t *step)
{
    *step = 0;
    if (!job->train.checkpoint_dir[0])
        return SEMOE_OK;
    char dir[4096];
    return model_ckpt_latest(job->train.checkpoint_dir, dir, sizeof dir, step);
}

/* Loads checkpoint `step` of the root into params and tr (only the tensors they hold). */
static semoe_rc s_load_checkpoint(s_tr_t *self, uint64_t step, model_params_t *params,
                                  model_train_t *tr)
{
    const model_job_t *job = self->job;
    char dir[4096];
    SEMOE_CHECK(model_ckpt_step_dir(job->train.checkpoint_dir, step, dir, sizeof dir));
    model_ckpt_state_t st;
    SEMOE_CHECK(model_ckpt_load(dir, s_be, params, tr, &st));
    if (st.step != step)
        return semoe_err(SEMOE_EINVAL, "%s: its state says step %" PRIu64 ", its name %" PRIu64,
                         dir, st.step, step);
    if (st.seed != job->train.seed)
        log_warn("%s was written with train.seed %" PRIu64 ", the job has %" PRIu64
                 ": the data order changes from here", dir, st.seed, job->train.seed);
    log_info("generation %" PRIu64 ": resuming from %s (step %" PRIu64 ")",
             self->plan.generation, dir, step);
    return SEMOE_OK;
}

/* Claims the checkpoint root for this generation (model/checkpoint.h, fencing): from here a
 * worker of an older one cannot put a checkpoint in place. A newer generation holding it means
 * this plan is stale (a newer PLAN is coming): an error of the comm kind. A root that cannot
 * be written only warns (the checkpoints will say so). */
static semoe_rc s_claim(s_tr_t *self)
{
    const char *root = self->job->train.checkpoint_dir;
    if (!root[0])
        return SEMOE_OK;
    model_ckpt_fence_t me = {self->plan.run_id, self->plan.generation};
    semoe_rc rc = model_ckpt_fence_claim(root, me);
    if (rc == SEMOE_EFENCED)
        return rc;
    if (rc != SEMOE_OK)
        log_warn("generation %" PRIu64 ": cannot claim the checkpoint root: %s",
                 self->plan.generation, semoe_err_msg());
    return SEMOE_OK;
}

/* The generation's migration (worker/migrate.h) over a communicator of its ranks and donors,
 * tagged 2 x generation (the training one is 2 x generation + 1): into params and tr (a
 * rank's new tensors; NULL for a donor) what it keeps and receives, or a rewind. */
static semoe_rc s_migrate(s_tr_t *self, model_params_t *params, model_train_t *tr,
                          worker_migrate_result_t *res)
{
    const worker_plan_t *p = &self->plan;
    uint32_t n = p->world + p->n_donors;
    uint32_t me = p->rank != PROTO_NO_RANK ? p->rank : p->world + p->donor_index;
    const char **eps = semoe_xmalloc(n * sizeof *eps);
    for (uint32_t r = 0; r < n; r++)
        eps[r] = r < p->world ? p->peers[r].endpoint : p->donors[r - p->world].endpoint;
    comm_t *comm = NULL;
    semoe_rc rc = comm_new(self->port, 2 * p->generation, me, n, eps, &comm);
    free(eps);
    worker_state_t old = {.params = self->params, .tr = self->tr, .step = self->step};
    /* every participant's last checkpoint is written (s_start_generation) before participant 0
     * claims the root for this generation and reads its latest */
    if (rc == SEMOE_OK)
        rc = comm_barrier(comm, S_COMM_TIMEOUT_MS);
    if (rc == SEMOE_OK && me == 0)
        rc = s_claim(self);
    if (rc == SEMOE_OK && me == 0)
        rc = s_latest(self->job, &old.ckpt_step);
    if (rc == SEMOE_OK)
        rc = worker_migrate(comm, s_be, &self->job->model, p->world, p->holder_off, p->holders,
                            &old, params, tr, S_COMM_TIMEOUT_MS, res);
    comm_destroy(&comm);
    return rc;
}

#if SEMOE_HAVE_CUDA
/* Whether the control actor poked: a newer PLAN is on its way (the poke stays unread; the PLAN's
 * handling drains it). */
static int s_poked(void *arg)
{
    s_tr_t *self = arg;
    zmq_pollitem_t it = {self->poke, 0, ZMQ_POLLIN, 0};
    return zmq_poll(&it, 1, 0) > 0;
}

static bool s_poked_b(void *arg)
{
    return s_poked(arg) != 0;
}

/* The ranks' hosts for the exchange's two hops (worker_exchange_set_hosts): the host part of
 * each peer's data endpoint ("tcp://HOST:port"), or SEMOE_EMULATE_HOSTS=k hosts of W/k ranks
 * each in rank order (to check the two hops on one machine). One host, hosts of different
 * sizes, or ranks that disagree (logged): one hop. A collective (one reduce_stats). */
static semoe_rc s_hosts(s_tr_t *self)
{
    const worker_plan_t *p = &self->plan;
    const int W = (int)p->world;
    int *host = semoe_xcalloc((size_t)W + 1, sizeof *host), H = 0;
    const char *emu = getenv("SEMOE_EMULATE_HOSTS");
    int k = emu ? atoi(emu) : 0;
    if (k >= 2 && W % k == 0) {
        for (int r = 0; r < W; r++)
            host[r] = r / (W / k);
        H = k;
    } else {
        for (int r = 0; r < W; r++) {
            const char *a = p->peers[r].endpoint, *ae = strrchr(a, ':');
            size_t al = ae ? (size_t)(ae - a) : strlen(a);
            host[r] = H;
            for (int q = 0; q < r; q++) {
                const char *b = p->peers[q].endpoint, *be = strrchr(b, ':');
                size_t bl = be ? (size_t)(be - b) : strlen(b);
                if (al == bl && !memcmp(a, b, al)) {
                    host[r] = host[q];
                    break;
                }
            }
            H += host[r] == H;
        }
    }
    /* every rank must take the same hosts (the environment is each process's own): the sum and
     * the sum of squares of a fingerprint over the ranks say whether all agree, the same answer
     * on every rank */
    long f = 0; /* a fingerprint of host[] below 4093: its sums over the ranks stay exact */
    for (int r = 0; r < W; r++)
        f = (f * 31 + host[r] + 1) % 4093;
    double st[4] = {H, (double)H * H, (double)f, (double)f * f};
    semoe_rc rc = self->exf.reduce_stats(self->exf.state, st, 4);
    /* all equal exactly when each value's sum of squares is W times its mean squared */
    bool agree = rc == SEMOE_OK && st[1] * W == st[0] * st[0] && st[3] * W == st[2] * st[2];
    if (rc != SEMOE_OK) { /* some ranks may have the answer: they could take other hops */
        free(host);
        return semoe_err(rc, "generation %" PRIu64 ": agreeing on the hosts: %s",
                         p->generation, semoe_err_msg());
    }
    if (!agree)
        log_warn("generation %" PRIu64 ": the ranks do not agree on their hosts "
                 "(SEMOE_EMULATE_HOSTS set for some only?): the expert rows in one hop",
                 p->generation);
    if (H >= 2 && agree) {
        if (worker_exchange_set_hosts(self->ex, host) == SEMOE_OK)
            log_info("generation %" PRIu64 ": %d hosts: the expert rows in two hops",
                     p->generation, H);
        else
            log_warn("generation %" PRIu64 ": %s: the expert rows in one hop", p->generation,
                     semoe_err_msg());
    }
    free(host);
    return SEMOE_OK;
}

/* The generation's NCCL communicator: the new rank 0 makes the id and hands it to the control
 * actor ("COMMID" [generation][id]), which sends it up in COMM; the coordinator relays it to
 * every rank, whose control actor puts it in cfg->commid, where each waits for it. A newer
 * PLAN (the poke) ends the wait, as it ends every collective of the old generation. */
static semoe_rc s_nccl_setup(s_tr_t *self)
{
    const worker_plan_t *p = &self->plan;
    if (p->rank == 0) {
        uint8_t body[8 + GPU_NCCL_ID_BYTES];
        memcpy(body, &p->generation, 8);
        SEMOE_CHECK(gpu_nccl_unique_id(body + 8));
        if (zmq_send(self->pipe, "COMMID", 6, ZMQ_SNDMORE) != 6 ||
            zmq_send(self->pipe, body, sizeof body, 0) != (int)sizeof body)
            return semoe_err(SEMOE_EIO, "trainer: handing the communicator id to the control "
                             "actor: %s", zmq_strerror(zmq_errno()));
    }
    uint8_t id[GPU_NCCL_ID_BYTES];
    size_t len = 0;
    SEMOE_CHECK(worker_commid_wait(self->cfg->commid, p->generation, id, sizeof id, &len,
                                   S_COMM_TIMEOUT_MS, s_poked_b, self));
    if (len != sizeof id)
        return semoe_err(SEMOE_EPROTO, "generation %" PRIu64 ": a communicator id of %zu bytes "
                         "(NCCL's are %zu): is every worker a GPU one?", p->generation, len,
                         sizeof id);
    SEMOE_CHECK(gpu_nccl_new(id, (int)p->rank, (int)p->world, S_COMM_TIMEOUT_MS, s_poked, self,
                             &self->nccl));
    worker_exchange_set_nccl(self->ex, self->nccl); /* the expert rows device to device too */
    SEMOE_CHECK(s_hosts(self));
    log_info("generation %" PRIu64 ": NCCL communicator of %u ranks up (rank %u)",
             p->generation, p->world, p->rank);
    return SEMOE_OK;
}
#endif

/* Builds what the generation's steps need: the new tensors (migrated, or rewound to the last
 * checkpoint), then the training communicator and the exchange. Returns an error of the comm
 * (a peer gone: wait for the next plan) or of the job (this worker cannot train it). */
static semoe_rc s_setup(s_tr_t *self, bool *job_fault)
{
    const worker_plan_t *p = &self->plan;
    const model_job_t *job = self->job;
    const model_config_t *cfg = &job->model;
    *job_fault = true;
    /* every rank runs the same micro-batches: as many as the largest slice needs */
    uint32_t max_rows = 0;
    for (uint32_t r = 0; r < p->world; r++) {
        uint32_t rows = p->batch_off[r + 1] - p->batch_off[r];
        max_rows = rows > max_rows ? rows : max_rows;
        if (rows == 0)
            return semoe_err(SEMOE_EINVAL, "trainer: generation %" PRIu64 ": rank %u has no "
                             "sequences (train.global_batch=%u < %u workers)", p->generation, r,
                             job->train.global_batch, p->world);
    }
    uint32_t mb = job->train.micro_batch;
    self->micro_steps = (max_rows + mb - 1) / mb;
    uint32_t per_micro = (max_rows + self->micro_steps - 1) / self->micro_steps;

    bool nccl = strcmp(job->train.collectives, "nccl") == 0;
    if (nccl && (self->cfg->cuda_device < 0 || !SEMOE_HAVE_CUDA))
        return semoe_err(SEMOE_EINVAL, "trainer: train.collectives \"nccl\" runs on GPU "
                         "workers (--device cuda:N, a device of its own each); this one computes "
                         "on the CPU: use \"zmq\"");
    model_params_t *params = NULL;
    model_train_t *tr = NULL;
    /* train.precision bf16: the GPU's bf16 graph */
    const model_pass_t *pass = NULL;
    if (strcmp(job->train.precision, "bf16") == 0) {
#if SEMOE_HAVE_CUDA
        if (self->cfg->cuda_device >= 0)
            pass = &gpu_pass_bf16;
#endif
        if (!pass)
            return semoe_err(SEMOE_EINVAL, "trainer: train.precision \"bf16\" runs on a GPU "
                             "worker (--device cuda:N); this one computes on the CPU");
    }
    SEMOE_CHECK(model_params_new(cfg, p->experts, p->n_experts, &params));
    model_params_init(params, job->train.seed);
    semoe_rc rc = model_train_new_pass(s_be, pass, params, job, &tr);
    /* an expert may receive every routed row of the global micro-batch */
    int64_t rows = (int64_t)per_micro * p->world * job->train.seq_len * cfg->num_experts_per_tok;
    if (rc == SEMOE_OK && rows > INT32_MAX)
        rc = semoe_err(SEMOE_EINVAL, "trainer: %lld expert rows per micro-batch: lower "
                       "train.micro_batch", (long long)rows);
    /* the bf16 pass runs its experts on the rows that arrive only when some expert is not on
     * every rank (expert parallelism); with every expert everywhere (data parallel) each rank
     * keeps its rows, and the replicas' gradients are summed as always. Every rank decides
     * from the same plan, so all of them dispatch or none does. */
    bool ep = !pass;
    for (uint32_t e = 0; e < p->num_layers * p->num_experts && !ep; e++)
        ep = p->holder_off[e + 1] - p->holder_off[e] < p->world;
    /* the pass grows its room for the rows as a step needs: it starts with twice a balanced
     * rank's (the fp32 graph's is fixed: every row that may arrive) */
    int64_t room = 2 * (int64_t)per_micro * job->train.seq_len * cfg->num_experts_per_tok;
    if (pass && room < rows)
        rows = room;
    if (rc == SEMOE_OK && ep)
        rc = model_train_set_expert_rows(tr, (int)rows);
    worker_migrate_result_t res = {0};
    if (rc == SEMOE_OK) {
        *job_fault = false;
        rc = s_migrate(self, params, tr, &res);
    }
    if (rc == SEMOE_OK && res.rewind && res.ckpt_step > 0) {
        *job_fault = true;
        rc = s_load_checkpoint(self, res.ckpt_step, params, tr);
    }
    if (rc != SEMOE_OK) {
        model_train_destroy(&tr);
        model_params_destroy(&params);
        return rc;
    }
    if (res.rewind && res.ckpt_step == 0 && self->params)
        log_warn("generation %" PRIu64 ": state lost and no checkpoint to resume from: "
                 "restarting at step 0 (set train.checkpoint_dir and train.checkpoint_interval "
                 "to lose less)", p->generation);
    else if (res.rewind && self->params)
        log_warn("generation %" PRIu64 ": some state had no live holder at step %" PRIu64
                 ": every worker rewinds to the checkpoint of step %" PRIu64, p->generation,
                 self->step, res.ckpt_step);
    else if (!res.rewind)
        log_info("generation %" PRIu64 ": state of step %" PRIu64 " kept, %u tensors received "
                 "(%.1f MB in, %.1f MB out)", p->generation, res.step, res.tensors_in,
                 res.bytes_in / 1e6, res.bytes_out / 1e6);
    s_drop_state(self);
    self->params = params;
    self->tr = tr;
    self->step = res.step;
    self->prog.moved_bytes = res.rewind ? 0 : res.bytes_in;

    s_owners(self);
    self->tokens = semoe_xmalloc((size_t)max_rows * (job->train.seq_len + 1));
    self->sample_ids = semoe_xcalloc((size_t)max_rows + 1, sizeof *self->sample_ids);
    size_t n = model_params_count(self->params);
    self->dense_bufs = semoe_xcalloc(n, sizeof *self->dense_bufs);
    self->dense_lens = semoe_xcalloc(n, sizeof *self->dense_lens);
    self->dense_layer = semoe_xcalloc(n + 1, sizeof *self->dense_layer);
    self->dense_sent = semoe_xcalloc(n + 1, sizeof *self->dense_sent);
    self->bg_rc = SEMOE_OK;
    float *g = model_train_grads(self->tr);
    for (size_t i = 0; i < n; i++) {
        const model_param_t *t = model_params_at(self->params, i);
        if (t->data && t->kind == MODEL_PARAM_DENSE) {
            self->dense_bufs[self->n_dense] = g + t->offset;
            self->dense_layer[self->n_dense] = model_train_dense_layer(t, cfg->num_hidden_layers);
            self->dense_lens[self->n_dense++] = (size_t)t->numel;
        }
    }
    if (self->cfg->cuda_device >= 0 && self->n_dense > 0 && !nccl) { /* through the host */
        size_t total = 0;
        for (int i = 0; i < self->n_dense; i++)
            total += self->dense_lens[i];
        self->dense_host = semoe_xcalloc((size_t)self->n_dense, sizeof *self->dense_host);
        self->dense_host[0] = semoe_xmalloc(total * sizeof(float));
        for (int i = 1; i < self->n_dense; i++)
            self->dense_host[i] = self->dense_host[i - 1] + self->dense_lens[i - 1];
    }
    size_t le = (size_t)cfg->num_hidden_layers * cfg->num_local_experts;
    self->rows_in = semoe_xcalloc(le + 1, sizeof *self->rows_in);
    self->rows_out = semoe_xcalloc(le + 1, sizeof *self->rows_out);

    const char **eps = semoe_xmalloc(p->world * sizeof *eps);
    for (uint32_t r = 0; r < p->world; r++)
        eps[r] = p->peers[r].endpoint;
    rc = comm_new(self->port, 2 * p->generation + 1, p->rank, p->world, eps, &self->comm);
    free(eps);
    SEMOE_CHECK(rc);
    SEMOE_CHECK(worker_exchange_new(self->comm, s_be, (int)cfg->num_hidden_layers,
                                    (int)cfg->num_local_experts, p->holder_off, p->holders,
                                    S_COMM_TIMEOUT_MS, &self->ex));
    self->exf = worker_exchange_f32(self->ex);
    self->exf.parts = (int)job->train.a2a_chunks; /* the bf16 pass's chunks per MoE layer */
#if SEMOE_HAVE_CUDA
    if (nccl)
        SEMOE_CHECK(s_nccl_setup(self));
#endif
    self->ready = true;
    return SEMOE_OK;
}

/* A donor's part: hand its state over in the generation's migration, then drop it. */
static semoe_rc s_hand_over(s_tr_t *self)
{
    worker_migrate_result_t res = {0};
    SEMOE_CHECK(s_migrate(self, NULL, NULL, &res));
    log_info("generation %" PRIu64 ": handed over (%.1f MB sent)%s", self->plan.generation,
             res.bytes_out / 1e6, res.rewind ? "; the others rewind to a checkpoint" : "");
    s_drop_state(self);
    return SEMOE_OK;
}

/* --- checkpoints ---------------------------------------------------------------------------- */

/* A checkpoint of step self->step (worker/ckpt.h): the steps pause for the snapshot, a
 * collective that gathers the experts onto rank 0, whose writer then writes it in the
 * background, fenced by this generation; with wait, until it is on disk (the last step's and a
 * STOP's: what the job reports done is there). A failed write is logged, not fatal: training
 * goes on and the next interval tries again. Errors are the snapshot's (a peer gone). */
static semoe_rc s_checkpoint(s_tr_t *self, bool wait)
{
    const model_job_t *job = self->job;
    int64_t t0 = clock_mono_us();
    (void)worker_ckpt_writer_wait(self->writer); /* one model copy at a time; outcome logged */
    worker_snapshot_t *snap = NULL;
    SEMOE_CHECK(worker_snapshot_gather(self->comm, s_be, self->params, self->tr, self->owner,
                                       S_COMM_TIMEOUT_MS, &snap));
    self->t_snapshot = (double)(clock_mono_us() - t0) / 1e6;
    if (!snap)
        return SEMOE_OK; /* not rank 0: its part is done */
    uint64_t samples = model_data_samples(self->data, MODEL_DATA_TRAIN);
    uint64_t pos = self->step * job->train.global_batch;
    model_ckpt_state_t st = {.step = self->step, .seed = job->train.seed,
                             .epoch = pos / samples, .position = pos % samples,
                             .generation = self->plan.generation,
                             .run = self->plan.run_id};
    log_info("checkpoint of step %" PRIu64 ": snapshot (%.1f MB) taken in %.3f s", self->step,
             worker_snapshot_bytes(snap) / 1e6, self->t_snapshot);
    worker_ckpt_writer_start(self->writer, snap, job->train.checkpoint_dir, S_CKPT_KEEP,
                             model_train_adam_step(self->tr), &st);
    if (wait)
        (void)worker_ckpt_writer_wait(self->writer);
    return SEMOE_OK;
}

/* --- steps ---------------------------------------------------------------------------------- */

/* The held-out cross-entropy over the fixed evaluation slice. */
static semoe_rc s_evaluate(s_tr_t *self, double *ce)
{
    const worker_plan_t *p = &self->plan;
    uint64_t nb = model_data_heldout_batches(self->data);
    if (nb > S_EVAL_BATCHES)
        nb = S_EVAL_BATCHES;
    uint32_t lo = (uint32_t)p->batch_lo, rows = (uint32_t)(p->batch_hi - p->batch_lo);
    double sum = 0;
    for (uint64_t k = 0; k < nb; k++) {
        double c;
        SEMOE_CHECK(model_data_heldout_rows(self->data, k, lo, rows, self->tokens, NULL));
        SEMOE_CHECK(model_train_eval(self->tr, self->tokens, rows, &self->exf, self->micro_steps,
                                     &c));
        sum += c;
    }
    worker_exchange_take(self->ex, NULL, NULL, NULL);
    *ce = sum / (double)nb;
    return SEMOE_OK;
}

static semoe_rc s_step(s_tr_t *self)
{
    const model_job_t *job = self->job;
    const worker_plan_t *p = &self->plan;
    uint32_t lo = (uint32_t)p->batch_lo, rows = (uint32_t)(p->batch_hi - p->batch_lo);
    SEMOE_CHECK(model_data_batch_rows(self->data, self->step, lo, rows, self->tokens,
                                      self->sample_ids, NULL));
    model_train_hooks_t hooks = {.arg = self, .reduce_grads = s_reduce_grads,
#if SEMOE_HAVE_CUDA
                                 .dense_ready = s_dense_ready,
#endif
                                 .reduce_sumsq = s_reduce_sumsq, .ex = &self->exf,
                                 .micro_steps = self->micro_steps};
    model_train_report_t rep;
    model_profile_t prof;
    self->t_reduce = 0;
    self->busy = true;
    /* what ran since the last step (its evaluation, a checkpoint's copies, the generation's
     * setup) is not this step's */
    model_profile_take(NULL);
    int64_t t0 = clock_mono_us();
    SEMOE_CHECK(model_train_step(self->tr, self->tokens, rows, self->step, &hooks, &rep));
    double seconds = (double)(clock_mono_us() - t0) / 1e6;
    model_profile_take(&prof);
    self->step++;

    worker_exchange_traffic_t tf;
    worker_exchange_take(self->ex, self->rows_in, self->rows_out, &tf);
    size_t le = (size_t)job->model.num_hidden_layers * job->model.num_local_experts;
    for (size_t e = 0; e < le; e++) /* forward and backward each dispatched the same rows */
        self->load[e] = (uint32_t)(self->rows_in[e] / 2);
    self->prog.loss = rep.loss;
    self->prog.step_time_us = (uint64_t)(seconds * 1e6);
    self->prog.tokens_per_s = seconds > 0 ? (double)rep.tokens / seconds : 0;

    bool last = self->step >= job->train.steps;
    uint32_t every = job->train.eval_interval;
    bool evaluate = model_data_samples(self->data, MODEL_DATA_HELDOUT) > 0 &&
                    ((every && self->step % every == 0) || last);
    if (evaluate) {
        double ce;
        SEMOE_CHECK(s_evaluate(self, &ce));
        self->prog.eval_loss = ce;
        self->prog.eval_step = self->step;
    }
    self->busy = false; /* the collectives are over (the evaluation's too) */
    uint32_t ck = job->train.checkpoint_interval;
    bool checkpoint = job->train.checkpoint_dir[0] && ((ck && self->step % ck == 0) || last);
    self->t_snapshot = -1;
    if (checkpoint)
        SEMOE_CHECK(s_checkpoint(self, last));
    s_metrics_line(self, &rep, seconds, &tf, &prof, evaluate);
    log_debug("step %" PRIu64 ": loss %.4f, %.0f tokens/s", self->step, rep.loss,
              self->prog.tokens_per_s);
    if (last) {
        log_info("training finished at step %" PRIu64 ": loss %.4f, held-out %.4f", self->step,
                 rep.loss, self->prog.eval_loss);
        self->prog.phase = PROTO_PHASE_FINISHED;
        if (self->want_stop) /* the final checkpoint is the STOP's */
            s_stopped(self);
        else
            s_report(self);
        return SEMOE_OK;
    }
    /* A PAUSE or a STOP reaches the ranks at different moments: they agree to pause at this
     * boundary when any of them has one, and to checkpoint and stop when any has a STOP
     * (float sums of 0/1 flags: exact). */
    float flag[2] = {self->want_pause || self->want_stop ? 1.0f : 0.0f,
                     self->want_stop ? 1.0f : 0.0f};
    SEMOE_CHECK(comm_allreduce_sum(self->comm, flag, 2, S_COMM_TIMEOUT_MS));
    if (flag[0] > 0) {
        self->paused = true;
        self->want_pause = false;
        log_info("paused after step %" PRIu64 "%s", self->step,
                 flag[1] > 0 ? " to stop" : "");
        self->prog.phase = PROTO_PHASE_PAUSED;
    }
    if (flag[1] > 0) {
        if (checkpoint)
            (void)worker_ckpt_writer_wait(self->writer); /* this step's is the STOP's */
        else if (job->train.checkpoint_dir[0])
            SEMOE_CHECK(s_checkpoint(self, true));
        s_stopped(self);
    } else {
        s_report(self);
    }
    return SEMOE_OK;
}

/* --- the pipe ------------------------------------------------------------------------------- */

/* Starts the plan's generation: on a comm error (a peer gone), waits for the next plan; on a
 * job error, this worker cannot train the job. */
static void s_start_generation(s_tr_t *self)
{
    s_teardown(self);
    /* the last generation's checkpoint is on disk (or fenced out) before this one looks */
    (void)worker_ckpt_writer_wait(self->writer);
    if (!self->have_plan)
        return;
    const worker_plan_t *p = &self->plan;
    if (!self->data || self->failed || p->rank == PROTO_NO_RANK) {
        if (self->data && !self->failed && p->donor_index != UINT32_MAX && self->params) {
            semoe_rc rc = s_hand_over(self);
            if (rc != SEMOE_OK)
                log_warn("generation %" PRIu64 ": could not hand over: %s", p->generation,
                         semoe_err_msg());
            self->prog.handed_over = rc == SEMOE_OK;
        }
        self->prog.ready_gen = p->generation; /* nothing (more) to do in this generation */
        s_set_phase(self, self->failed ? PROTO_PHASE_FAILED : PROTO_PHASE_IDLE);
        return;
    }
    bool job_fault = false;
    semoe_rc rc = s_setup(self, &job_fault);
    if (rc == SEMOE_OK) {
        bool done = self->step >= self->job->train.steps;
        if (done)
            log_info("generation %" PRIu64 ": the job is already at step %" PRIu64 " of %" PRIu64,
                     p->generation, self->step, self->job->train.steps);
        self->prog.ready_gen = p->generation;
        s_set_phase(self, done ? PROTO_PHASE_FINISHED
                          : self->paused ? PROTO_PHASE_PAUSED
                                         : PROTO_PHASE_TRAINING);
        return;
    }
    s_teardown(self);
    if (job_fault) {
        log_error("cannot train generation %" PRIu64 ": %s", p->generation, semoe_err_msg());
        self->failed = true;
        s_set_phase(self, PROTO_PHASE_FAILED);
    } else {
        /* interrupted (a newer PLAN is in the pipe: normal) or a peer gone: the next plan */
        log_warn("generation %" PRIu64 " did not start: %s; waiting for the next plan",
                 p->generation, semoe_err_msg());
    }
}

static void s_take_job(s_tr_t *self, const void *text, size_t len)
{
    if (self->job_text && self->job_len == len && memcmp(self->job_text, text, len) == 0)
        return;
    s_drop_job(self);
    free(self->job_text);
    self->job_text = semoe_xmalloc(len + 1);
    memcpy(self->job_text, text, len);
    self->job_text[len] = 0;
    self->job_len = len;
    semoe_rc rc = model_job_parse(self->job_text, len, "job from WELCOME", &self->job);
    if (rc == SEMOE_OK && self->job->data.n_paths == 0) {
        log_info("the job has no data.paths: holding the planned experts without training");
        return;
    }
    if (rc == SEMOE_OK)
        rc = model_data_open(self->job, &self->data);
    if (rc != SEMOE_OK) {
        log_error("cannot train this job: %s", semoe_err_msg());
        self->failed = true;
        s_set_phase(self, PROTO_PHASE_FAILED);
        return;
    }
    char line[512];
    model_data_summary(self->data, line, sizeof line);
    log_info("%s", line);
    size_t le = (size_t)self->job->model.num_hidden_layers * self->job->model.num_local_experts;
    self->load = semoe_xcalloc(le + 1, sizeof *self->load);
    self->step = 0;
    self->prog = (worker_progress_t){.loss = NAN, .eval_loss = NAN};
}

/* STOP: training ranks agree on a boundary and checkpoint there (s_step). Paused ranks are all
 * at one boundary and each gets the STOP: they checkpoint together now. Otherwise there is
 * nothing to write (no generation, or finished: the last step's checkpoint is the final one). */
static void s_on_stop(s_tr_t *self)
{
    if (self->stopped) {
        s_report(self);
        return;
    }
    bool training = self->ready && self->step < self->job->train.steps;
    if (training && !self->paused) {
        self->want_stop = true;
        return;
    }
    if (training && self->job->train.checkpoint_dir[0]) {
        semoe_rc rc = s_checkpoint(self, true);
        if (rc != SEMOE_OK)
            log_warn("no checkpoint at the stop: %s; the last one stands", semoe_err_msg());
    }
    (void)worker_ckpt_writer_wait(self->writer);
    s_stopped(self);
}

/* The pokes that came with the plans taken so far: read, so they interrupt nothing later. */
static void s_drain_pokes(s_tr_t *self)
{
    char b[8];
    while (self->poke && zmq_recv(self->poke, b, sizeof b, ZMQ_DONTWAIT) >= 0)
        ;
}

static void s_on_pipe(s_tr_t *self)
{
    zmq_msg_t cmd, body;
    zmq_msg_init(&cmd);
    zmq_msg_init(&body);
    int rc;
    while ((rc = zmq_msg_recv(&cmd, self->pipe, 0)) == -1 && zmq_errno() == EINTR)
        ;
    if (rc == -1) { /* the pipe is gone: nobody left to train for */
        self->terminated = true;
        goto out;
    }
    bool more = zmq_msg_more(&cmd);
    if (more && zmq_msg_recv(&body, self->pipe, 0) == -1) {
        self->terminated = true;
        goto out;
    }
    const char *c = zmq_msg_data(&cmd);
    size_t n = zmq_msg_size(&cmd);
    if (n == 5 && memcmp(c, "$TERM", 5) == 0) {
        self->terminated = true;
    } else if (n == 5 && memcmp(c, "PAUSE", 5) == 0) {
        if (self->ready && !self->paused && self->step < self->job->train.steps) {
            self->want_pause = true; /* the ranks agree on the boundary after this step */
        } else if (!self->paused) {
            self->paused = true;     /* between steps already: nothing to agree on */
            s_set_phase(self, PROTO_PHASE_PAUSED);
        } else {
            s_report(self);
        }
    } else if (n == 4 && memcmp(c, "STOP", 4) == 0) {
        s_on_stop(self);
    } else if (n == 6 && memcmp(c, "RESUME", 6) == 0) {
        self->want_pause = false;
        if (self->paused) {
            self->paused = false;
            bool done = self->job && self->step >= self->job->train.steps;
            s_set_phase(self, done ? PROTO_PHASE_FINISHED
                              : self->ready ? PROTO_PHASE_TRAINING
                                            : PROTO_PHASE_IDLE);
        }
    } else if (n == 3 && memcmp(c, "JOB", 3) == 0 && more) {
        s_take_job(self, zmq_msg_data(&body), zmq_msg_size(&body));
    } else if (n == 4 && memcmp(c, "PLAN", 4) == 0 && more &&
               zmq_msg_size(&body) == sizeof(worker_plan_t *)) {
        worker_plan_t *plan;
        memcpy(&plan, zmq_msg_data(&body), sizeof plan);
        s_drain_pokes(self);
        s_teardown(self);
        /* a PAUSE not yet agreed on was for the old generation's reconfiguration: this PLAN is
         * it. Kept, it would pause the new ranks after their first step, and those whose RESUME
         * was read before that pause would wait for another forever. */
        self->want_pause = false;
        worker_plan_clear(&self->plan);
        self->plan = *plan; /* the arrays are ours now */
        free(plan);
        self->have_plan = true;
        s_start_generation(self);
    } else {
        log_warn("trainer: unknown command %.*s", (int)(n < 32 ? n : 32), c);
    }
out:
    zmq_msg_close(&body);
    zmq_msg_close(&cmd);
}

static bool s_pipe_pending(s_tr_t *self)
{
    zmq_pollitem_t it = {self->pipe, 0, ZMQ_POLLIN, 0};
    return zmq_poll(&it, 1, 0) > 0;
}

static void s_loop(s_tr_t *self)
{
    while (!self->terminated) {
        bool train = self->ready && !self->paused && !self->stopped &&
                     self->step < self->job->train.steps;
#if SEMOE_HAVE_CUDA
        /* a step abandoned midway over NCCL (a poke: a PLAN is coming) leaves collectives in
         * flight and the communicator unusable: nothing more until the PLAN tears it down */
        train = train && !(self->busy && self->nccl);
#endif
        if (!train || s_pipe_pending(self)) {
            s_on_pipe(self); /* blocks until a command comes */
            continue;
        }
        semoe_rc rc = s_step(self);
        if (rc == SEMOE_OK || rc == SEMOE_ESTOPPED) /* interrupted: the pipe has the news */
            continue;
        bool comm_fault = rc == SEMOE_ETIMEDOUT || rc == SEMOE_EPROTO || rc == SEMOE_EIO;
#if SEMOE_HAVE_CUDA /* a communicator broken by a peer (whatever NCCL called it), or aborted */
        semoe_rc why = self->nccl ? gpu_nccl_fault(self->nccl) : SEMOE_OK;
        comm_fault = comm_fault || why == SEMOE_ETIMEDOUT || why == SEMOE_EIO ||
                     why == SEMOE_ESTOPPED;
#endif
        log_error("step %" PRIu64 " of generation %" PRIu64 " abandoned: %s%s", self->step,
                  self->plan.generation, semoe_err_msg(),
                  comm_fault ? "; waiting for the next plan" : "");
        s_teardown(self);
        /* say so: should nobody else notice (the peer is alive but wedged, or its death went
         * unseen), the coordinator plans a new generation */
        self->failed = !comm_fault;
        s_set_phase(self, comm_fault ? PROTO_PHASE_STALLED : PROTO_PHASE_FAILED);
    }
}

/* --- setup ---------------------------------------------------------------------------------- */

void worker_trainer_actor(void *pipe, void *args)
{
    s_tr_t self = {0};
    self.cfg = args;
    self.pipe = pipe;
    worker_plan_clear(&self.plan);
    self.prog = (worker_progress_t){.loss = NAN, .eval_loss = NAN};
    worker_trainer_config_t *cfg = self.cfg;
    const model_backend_f32_t *be = &cpu_backend_f32;
    if (cfg->cuda_device >= 0) {
#if SEMOE_HAVE_CUDA
        /* this thread's device and stream: every op of the trainer runs here */
        semoe_rc grc = gpu_backend_init(cfg->cuda_device);
        if (grc != SEMOE_OK) {
            snprintf(cfg->error, sizeof cfg->error, "--device cuda:%d: %s", cfg->cuda_device,
                     semoe_err_msg());
            cfg->error_exit = 2;
            actor_signal(pipe, 1);
            return;
        }
        be = &gpu_backend_f32;
#endif
    }
    /* the profiled table times the ops as the host sees them: on a GPU that is the launches,
     * not the kernels (a per-op split there needs CUDA events) */
    s_be = model_profile_wrap(be);
    if (cfg->threads > 0)
        openblas_set_num_threads(cfg->threads);
    semoe_rc rc = comm_port_new(cfg->ctx, cfg->data_bind, &self.port);
    if (rc != SEMOE_OK) {
        snprintf(cfg->error, sizeof cfg->error, "--data-bind %s: %s", cfg->data_bind,
                 semoe_err_msg());
        cfg->error_exit = rc == SEMOE_EINVAL ? 2 : 1;
        goto fail;
    }
    rc = worker_control_advertised(comm_port_endpoint(self.port), cfg->advertise, cfg->host,
                                   cfg->data_endpoint);
    if (rc != SEMOE_OK) {
        snprintf(cfg->error, sizeof cfg->error, "%s", semoe_err_msg());
        cfg->error_exit = 2;
        goto fail;
    }
    if (cfg->metrics_log) {
        self.metrics = fopen(cfg->metrics_log, "a");
        if (!self.metrics) {
            snprintf(cfg->error, sizeof cfg->error, "--metrics-log %s: cannot open: %s",
                     cfg->metrics_log, strerror(errno));
            cfg->error_exit = 2;
            goto fail;
        }
    }
    if (cfg->poke) {
        self.poke = zmq_socket(cfg->ctx, ZMQ_PAIR);
        int linger = 0;
        if (!self.poke || zmq_setsockopt(self.poke, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
            zmq_connect(self.poke, cfg->poke) != 0) {
            snprintf(cfg->error, sizeof cfg->error, "trainer: poke socket %s: %s", cfg->poke,
                     zmq_strerror(zmq_errno()));
            cfg->error_exit = 1;
            goto fail;
        }
        comm_port_set_interrupt(self.port, self.poke);
    }
    self.writer = worker_ckpt_writer_new();
    actor_signal(pipe, 0);
    s_loop(&self);
    s_drop_job(&self);
    worker_ckpt_writer_destroy(&self.writer);
    worker_plan_clear(&self.plan);
    free(self.job_text);
    comm_port_destroy(&self.port);
    if (self.metrics)
        fclose(self.metrics);
    zmq_close(self.poke);
    return;
fail:
    comm_port_destroy(&self.port);
    if (self.metrics)
        fclose(self.metrics);
    if (self.poke)
        zmq_close(self.poke);
    actor_signal(pipe, 1);
}
