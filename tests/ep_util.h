/* What the expert-parallel tests (test_ep.c on the CPU, test_gpu_ep_bf16.c on a GPU) share: a
 * random placement of the experts on W ranks, as a PLAN's tables give it, and each rank's
 * params copied from the full model's. */
#ifndef SEMOE_TESTS_EP_UTIL_H
#define SEMOE_TESTS_EP_UTIL_H

#include <stdbool.h>
#include <stdint.h>

#include "model/params.h"

/* Expert e's holders are hold[hoff[e] .. hoff[e+1]) (distinct, ascending). */
typedef struct {
    uint32_t world;
    int LE;        /* experts: layers x experts per layer, at most 64 */
    uint32_t hoff[65], hold[64 * 8];
} test_ep_place_t;

/* LE experts on W ranks (W <= 8): a random permutation dealt out round robin, then with
 * replicas about half the experts get 1 to W - 1 more holders at random (the harness's random
 * numbers). */
void test_ep_place(test_ep_place_t *pl, int LE, uint32_t W, bool replicas);

/* Whether rank holds expert e. */
bool test_ep_holds(const test_ep_place_t *pl, int e, uint32_t rank);

/* A params object holding rank's experts (and every dense tensor), its tensors copied from
 * full's; NULL (semoe_err_msg says why) when it cannot be made. */
model_params_t *test_ep_rank_params(const test_ep_place_t *pl, const model_params_t *full,
                                    uint32_t rank);

#endif
