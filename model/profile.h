/* A timing wrapper around a float backend table (model/backend.h): every op runs between two
 * clock reads and its time goes to one category (GEMM, attention, routing, elementwise,
 * optimizer, memory); the linear ops also count the FLOPs they did. Benchmarks and the worker's
 * trainer use it to split a step's time by op kind.
 *
 * The table has no context pointer, so the wrapper is process-global: ONE profiled backend per
 * process (in a worker, the trainer is the only user). The sums are per thread: a thread reads
 * back what its own op calls added. The cost is two clock reads (vDSO, tens of ns) per op
 * call. A device backend's ops return before the device is done: their times are only the
 * launch, unless the op synchronises. */
#ifndef SEMOE_MODEL_PROFILE_H
#define SEMOE_MODEL_PROFILE_H

#include "model/backend.h"

typedef enum {
    MODEL_PROF_GEMM,        /* linear_fwd/bwd (and their FLOPs) */
    MODEL_PROF_ATTENTION,   /* attention_fwd/bwd, rope_fwd/bwd */
    MODEL_PROF_ROUTING,     /* router, aux loss, gather/scatter of expert rows */
    MODEL_PROF_ELEMENTWISE, /* embedding, RMSNorm, SwiGLU, cross-entropy, add, axpy */
    MODEL_PROF_OPTIMIZER,   /* adamw, sumsq */
    MODEL_PROF_MEMORY,      /* alloc, free, zero, copy, to_device, to_host */
    MODEL_PROF_N
} model_prof_cat_t;

/* What the calling thread's op calls took since its last model_profile_take. */
typedef struct {
    double seconds[MODEL_PROF_N];
    double gemm_flops; /* 2 N IN OUT per product the linear ops computed */
    uint64_t calls;    /* op calls timed */
} model_profile_t;

/* The profiled table: real's ops, each timed into its category; name "<real's>-profiled".
 * real (not owned) must outlive every use of the returned table, which is static (not owned
 * by the caller). Calling it again with the same real returns the same table; with another
 * real, the table's ops call that one from then on (the last call wins: one profiled backend
 * per process). */
const model_backend_f32_t *model_profile_wrap(const model_backend_f32_t *real);

/* Copies the calling thread's sums into *out (NULL: discards them), then zeroes them. */
void model_profile_take(model_profile_t *out);

/* The sum of out's categories, in seconds. */
double model_profile_total(const model_profile_t *p);

/* "gemm", "attention", "routing", "elementwise", "optimizer", "memory"; "?" out of range. */
const char *model_profile_category(int cat);

#endif
