#include "tests/ep_util.h"

#include <string.h>

#include "tests/harness.h"

void test_ep_place(test_ep_place_t *pl, int LE, uint32_t W, bool replicas)
{
    int perm[64];
    uint32_t first[64];
    for (int i = 0; i < LE; i++)
        perm[i] = i;
    for (int i = LE - 1; i > 0; i--) {
        int j = (int)test_rand_below((uint64_t)i + 1), t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
    for (int i = 0; i < LE; i++)
        first[perm[i]] = (uint32_t)i % W;
    uint32_t at = 0;
    for (int e = 0; e < LE; e++) {
        bool on[8] = {false};
        on[first[e]] = true;
        if (replicas && W > 1 && test_rand_below(2)) {
            uint32_t more = 1 + (uint32_t)test_rand_below(W - 1);
            for (uint32_t k = 0; k < more; k++)
                on[test_rand_below(W)] = true;
        }
        pl->hoff[e] = at;
        for (uint32_t r = 0; r < W; r++)
            if (on[r])
                pl->hold[at++] = r;
    }
    pl->hoff[LE] = at;
    pl->world = W;
    pl->LE = LE;
}

bool test_ep_holds(const test_ep_place_t *pl, int e, uint32_t rank)
{
    for (uint32_t i = pl->hoff[e]; i < pl->hoff[e + 1]; i++)
        if (pl->hold[i] == rank)
            return true;
    return false;
}

model_params_t *test_ep_rank_params(const test_ep_place_t *pl, const model_params_t *full,
                                    uint32_t rank)
{
    uint32_t ids[64];
    size_t n = 0;
    for (int e = 0; e < pl->LE; e++)
        if (test_ep_holds(pl, e, rank))
            ids[n++] = (uint32_t)e;
    model_params_t *p = NULL;
    if (model_params_new(model_params_config(full), ids, n, &p) != SEMOE_OK)
        return NULL;
    for (size_t i = 0; i < model_params_count(p); i++) {
        const model_param_t *t = model_params_at(p, i);
        if (t->data)
            memcpy(t->data, model_params_at(full, i)->data, t->numel * sizeof(float));
    }
    return p;
}
