/* What the training benchmarks measure against: OpenBLAS sgemm's own rate in the bench's
 * process (the peak over square sizes, and the rate at a model's own linear-op shapes) and a
 * model's FLOPs per token. */
#ifndef SEMOE_BENCH_FLOPS_H
#define SEMOE_BENCH_FLOPS_H

#include "model/config.h"

#define FLOPS_NSIZES 5
extern const int flops_sizes[FLOPS_NSIZES]; /* 256, 512, 1024, 1536, 2048 */

typedef struct {
    int threads;
    double best_gflops;
    int best_n;
    double gflops[FLOPS_NSIZES]; /* by flops_sizes */
} flops_peak_t;

/* Best GFLOP/s of C = A B (square, row-major, no transposes) at each of flops_sizes with
 * `threads` OpenBLAS threads (left set afterwards), each size repeated for at least 0.3 s after
 * one warm-up call. */
void flops_sgemm_peak(int threads, flops_peak_t *pk);

/* One GEMM of a model step: C (m, n) = op(A) (m, k) op(B) (k, n), row-major, as the CPU
 * backend's linear ops call it; `calls` of them per micro-batch. */
typedef struct {
    const char *what; /* "q_proj fwd", ... */
    int m, n, k;
    int ta, tb;       /* transposed A, B */
    double calls;
    double gflops;    /* measured by flops_sgemm_shapes */
} flops_shape_t;

/* The GEMMs of one micro-batch of config c on a worker: `tokens` token rows, `experts_held`
 * experts per layer each receiving `expert_rows` rows (balanced routing): every linear op's
 * forward (N T), input gradient (N N) and weight gradient (T N). Fills at most cap; returns
 * how many. */
int flops_model_shapes(const model_config_t *c, int tokens, int experts_held, int expert_rows,
                       flops_shape_t *out, int cap);

/* Times every shape (best of repeats for at least 0.1 s each, after a warm-up) with `threads`
 * OpenBLAS threads, sets each one's gflops and returns the rate of the whole mix: the sum of
 * calls x FLOPs over the sum of calls x time. */
double flops_sgemm_shapes(int threads, flops_shape_t *s, int n);

/* Model FLOPs per trained token: 6 x (active parameters - the embedding) + causal attention
 * 6 x layers x seq_len x heads x head_dim (forward and backward). */
double flops_per_token(const model_config_t *c, uint32_t seq_len);

/* CLOCK_MONOTONIC in seconds. */
double flops_now(void);

#endif
