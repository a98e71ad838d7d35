/* The Mixtral model's forward and backward pass on one process, over a backend table
 * (model/backend.h), for float (_f32) and double (_f64), in the shape of llm.c's
 * gpt2_forward/gpt2_backward: activations in one slab with a pointer table, weights and
 * gradients in params-shaped slabs (model/params.h's layout, in T), and the MoE block's expert
 * rows travelling through an exchange (model_exchange_<S>) so that expert parallelism can route
 * them to other workers.
 *
 * Every buffer named here except the host fields of model_acts_<S> comes from the backend's
 * alloc and may live on a device; the graph reaches it only through the table. */
#ifndef SEMOE_MODEL_GRAPH_H
#define SEMOE_MODEL_GRAPH_H

#include <stddef.h>
#include <stdint.h>

#include "actors/err.h"
#include "model/backend.h"
#include "model/params.h"

/* The most parts (model_exchange_f32's part) a layer's rows go in. */
#define MODEL_EXCHANGE_MAX_PARTS 16

/* The losses of one forward pass: loss = ce + router_aux_loss_coef * aux. */
typedef struct {
    double loss;
    double ce;  /* mean cross-entropy over the B*T targets */
    double aux; /* load_balancing_loss_func over every layer's router probs (top-k counts) */
    int64_t tokens; /* the targets the means are over: N, or the global count when the
                     * exchange has reduce_stats */
} model_loss_t;

#define MODEL_GRAPH_DECLARE(T, S)                                                              \
    /* The expert exchange of an MoE layer: rows grouped by expert go out to whoever holds    \
     * the experts (dispatch) and the experts' outputs come back (combine). Both are          \
     * permutations of rows, each the other's transpose, which is how backward uses them:    \
     * the gradient of combine travels by dispatch and the gradient of dispatch by combine.  \
     * Counts are host arrays of E entries (one per expert of the layer). */                  \
    typedef struct {                                                                           \
        void *state;                                                                           \
        /* send (sum send_counts, D): this process's token rows for layer `layer`, grouped   \
         * by expert 0..E-1. Writes recv (R, D): the rows for the experts this process holds \
         * (from every process), grouped by expert 0..E-1, and recv_counts (E; 0 for experts \
         * not held here); R = sum recv_counts must be <= recv_cap, else an error. A         \
         * distributed exchange remembers per (layer, part) how the rows were split among    \
         * peers. part: 0, or which of the pieces a pass cut the layer's tokens into (so that \
         * the pieces' transfers overlap the experts' compute on others; parts of a layer go \
         * in order 0, 1, ..., each combined after its dispatch, and a part 0 starts the     \
         * layer anew), < MODEL_EXCHANGE_MAX_PARTS. recv NULL: the counts alone (a          \
         * collective too): recv_counts filled, nothing moved, so that the caller can make    \
         * room; several parts of a layer may be announced so before any rows move (from    \
         * part 0: it starts the layer anew), each part's rows then following in a dispatch \
         * with recv and the same send_counts. */                                             \
        semoe_rc (*dispatch)(void *state, int layer, int part, int E, int D, const T *send,   \
                             const int32_t *send_counts, T *recv, int32_t *recv_counts,       \
                             int recv_cap);                                                    \
        /* The reverse of layer `layer`'s dispatch of that part: send (R, D) grouped as that \
         * dispatch's recv (send_counts = its recv_counts); writes recv grouped as its send  \
         * (recv_counts = its send_counts). */                                               \
        semoe_rc (*combine)(void *state, int layer, int part, int E, int D, const T *send,    \
                            const int32_t *send_counts, T *recv, const int32_t *recv_counts); \
        /* Optional (NULL: this process's batch is the whole batch). buf[i] = the sum over   \
         * every process of its buf[i], i < n, the same bits on every process (a collective: \
         * every process calls it at the same point with the same n). With it the forward   \
         * pass reports the losses of the GLOBAL batch (ce: mean over every process's       \
         * targets; aux: from every process's routed counts and router probs over the global \
         * token count) and backward computes this process's share of their gradient, so   \
         * that the sum over processes is the gradient of the global loss. */               \
        semoe_rc (*reduce_stats)(void *state, double *buf, size_t n);                        \
        /* Optional: a pass that runs every expert of layer `layer` on this process without  \
         * dispatch or combine (gpu/graph_bf16.h) reports the rows it routed per expert      \
         * (E, host) where a dispatch would have counted them: once per dispatch it stands   \
         * in for (forward, and backward's transpose), for the exchange's load accounting. */ \
        void (*note_local)(void *state, int layer, int E, const int32_t *counts);            \
        /* Into how many parts a pass that can (gpu/graph_bf16.h's) cuts each MoE layer's    \
         * tokens, each part's rows dispatched, run and combined on their own so that one    \
         * part's transfers overlap another's expert compute (Tutel's overlap); 0 or 1: one, \
         * the whole layer at once. */                                                       \
        int parts;                                                                             \
    } model_exchange_##S;                                                                      \
                                                                                               \
    /* The activation pointer table, llm.c style: every field points into one slab. Shapes:  \
     * N = B*T tokens, L layers, Q = H*hd, KV = KVH*hd, NK = N*K routed rows, R the expert   \
     * rows this process may receive (model_acts_new's expert_rows). */                       \
    typedef struct {                                                                           \
        T *encoded;   /* (N, D) embedding: layer 0's input */                                 \
        T *ln1;       /* (L, N, D) input_layernorm output */                                  \
        T *ln1_rstd;  /* (L, N) */                                                            \
        T *q;         /* (L, N, Q) q_proj output, before RoPE */                              \
        T *k;         /* (L, N, KV) */                                                        \
        T *v;         /* (L, N, KV) */                                                        \
        T *qr;        /* (L, N, Q) after RoPE */                                              \
        T *kr;        /* (L, N, KV) after RoPE */                                             \
        T *att;       /* (L, N, Q) attention output, before o_proj */                         \
        T *att_probs; /* (L, B, H, T, T) */                                                   \
        T *attproj;   /* (L, N, D) o_proj output */                                           \
        T *res1;      /* (L, N, D) layer input + attproj */                                   \
        T *ln2;       /* (L, N, D) post_attention_layernorm output */                         \
        T *ln2_rstd;  /* (L, N) */                                                            \
        T *rlogits;   /* (L, N, E) router (gate) logits */                                    \
        T *rprobs;    /* (L, N, E) softmax; contiguous over layers for the aux loss */        \
        T *rw;        /* (L, N, K) renormalised top-k weights */                              \
        T *xs;        /* (L, NK, D) token rows grouped by expert (sent) */                    \
        T *xr;        /* (L, R, D) rows received for the experts held here */                 \
        T *ea;        /* (L, R, F) x w1^T */                                                  \
        T *eb;        /* (L, R, F) x w3^T */                                                  \
        T *eh;        /* (L, R, F) silu(ea) * eb */                                           \
        T *yr;        /* (L, R, D) h w2^T: the experts' outputs (sent back) */                \
        T *ys;        /* (L, NK, D) the outputs back, grouped as xs */                        \
        T *moe;       /* (L, N, D) weighted sum of the experts' outputs */                    \
        T *res2;      /* (L, N, D) res1 + moe: layer l+1's input */                           \
        T *lnf;       /* (N, D) model.norm output */                                          \
        T *lnf_rstd;  /* (N) */                                                               \
        T *logits;    /* (N, V) */                                                            \
        T *losses;    /* (N) per-token cross-entropy */                                       \
    } model_actbufs_##S;                                                                       \
                                                                                               \
    typedef struct {                                                                           \
        const model_backend_##S##_t *be;                                                      \
        const model_params_t *params;                                                         \
        int B, Tn, N, L, D, H, KVH, hd, E, K, F, V, R;                                        \
        model_actbufs_##S a; /* forward activations */                                        \
        model_actbufs_##S d; /* their gradients (written by backward) */                      \
        /* backend int32 buffers */                                                           \
        int32_t *inputs;  /* (N) tokens[:, :T] */                                             \
        int32_t *targets; /* (N) tokens[:, 1:] */                                             \
        int32_t *pos;     /* (N) position within the sequence, 0..T-1 */                      \
        int32_t *ridx;    /* (L, N, K) top-k expert ids; contiguous for the aux loss */       \
        int32_t *rows;    /* (L, NK) token of each routed row, grouped by expert */           \
        int32_t *slots;   /* (L, NK) its index token * K + k into rw */                       \
        /* host */                                                                            \
        int32_t *send_counts; /* (L, E) routed rows per expert, this process's tokens */      \
        int32_t *recv_counts; /* (L, E) rows received per expert held here */                 \
        int32_t *h_idx, *h_rows, *h_slots; /* (NK) scratch for the routing plan */           \
        T *h_probs;       /* (L, N, E) router probs on the host, for the global aux loss */  \
        int global;       /* the last forward reduced its losses (ex->reduce_stats) */       \
        double ce_scale;  /* then: N / global targets, d loss / d (local mean ce) */          \
        double *aux_coef; /* (E) then: d aux / d probs[m, e] over the global batch */        \
        uint64_t *off;    /* element offsets of the tensors in a params-shaped slab */        \
        /* (E) backend memory or NULL: a constant added to every layer's router logits       \
         * before the softmax and top-k (a job's train.router_bias); not owned, not a        \
         * parameter: backward passes the logits' gradient through unchanged. NULL after     \
         * model_acts_new; the caller sets it. */                                             \
        const T *router_bias;                                                                  \
        void *mem, *dmem; /* the two slabs (backend memory) */                                \
    } model_acts_##S;                                                                          \
                                                                                               \
    /* Allocates the activations (and their gradients) for B sequences of Tn tokens under   \
     * params' config; expert_rows is the capacity R for rows received by the exchange (0:   \
     * N*K, what the local exchange needs). The acts keep be and params (not owned). */      \
    semoe_rc model_acts_new_##S(const model_backend_##S##_t *be, const model_params_t *params, \
                                int B, int Tn, int expert_rows, model_acts_##S **out);         \
    /* Frees; nulls *self_p; NULL is a no-op. */                                               \
    void model_acts_destroy_##S(model_acts_##S **self_p);                                     \
                                                                                               \
    /* A params-shaped slab of T in the backend's memory (model_params_slab_floats(params)  \
     * elements, the held tensors at their params offsets), zeroed: gradients, or weights   \
     * (model_slab_load_##S fills it from the params' float slab). Free with                 \
     * model_slab_destroy_##S, which nulls *slab_p. */                                         \
    T *model_slab_new_##S(const model_backend_##S##_t *be, const model_params_t *params);     \
    void model_slab_load_##S(const model_backend_##S##_t *be, const model_params_t *params,   \
                             T *slab);                                                         \
    void model_slab_destroy_##S(const model_backend_##S##_t *be, T **slab_p);                 \
    /* Zeroes a gradient slab (call before each backward: backward accumulates). */           \
    void model_zero_grad_##S(const model_backend_##S##_t *be, const model_params_t *params,   \
                             T *grads);                                                        \
                                                                                               \
    /* The exchange for a process that holds every expert: dispatch and combine copy. */     \
    model_exchange_##S model_exchange_local_##S(const model_backend_##S##_t *be);             \
                                                                                               \
    /* Forward pass. w: a params-shaped weight slab in T (for f32 on the CPU,                \
     * model_params_slab(params) itself); tokens (B, T+1) on the host: inputs tokens[:, :T], \
     * targets tokens[:, 1:], each in [0, V). ex NULL: the local exchange. Fills acts and   \
     * *loss. Errors: a token out of range, an exchange failure, rows for an expert not held.\
     * router_jitter_noise is not applied (the pass is deterministic); acts->router_bias,   \
     * when set, is. */                                                                       \
    semoe_rc model_forward_##S(const model_backend_##S##_t *be, const model_params_t *params, \
                               const T *w, model_acts_##S *acts, const int32_t *tokens,        \
                               const model_exchange_##S *ex, model_loss_t *loss);              \
    /* Backward of the last forward on acts (same be, params, w, ex): ACCUMULATES d loss /   \
     * d w into grads (params-shaped; zero it first with model_zero_grad), for the held     \
     * tensors. */                                                                             \
    semoe_rc model_backward_##S(const model_backend_##S##_t *be, const model_params_t *params,\
                                const T *w, T *grads, model_acts_##S *acts,                    \
                                const model_exchange_##S *ex);                                 \
                                                                                               \
    /* The logits (n, V) of one sequence of n tokens (host int32 ids) under the weights w,    \
     * copied to the host into logits (caller's, n * V); for eval and generation. */         \
    semoe_rc model_logits_##S(const model_backend_##S##_t *be, const model_params_t *params,  \
                              const T *w, const int32_t *tokens, int n, T *logits);

MODEL_GRAPH_DECLARE(float, f32)
MODEL_GRAPH_DECLARE(double, f64)

/* The losses of one forward pass from its sums over this process's tokens, for any pass (this
 * graph's, gpu/graph_bf16.h's): st (2E + 2) = [rows routed to each expert over every layer (E),
 * router probabilities summed per expert over every layer's tokens (E), the targets'
 * cross-entropies summed, the number of targets]. reduce(state, st, 2E + 2), when not NULL,
 * sums them over processes in place (an exchange's reduce_stats). aux = E sum_e f_e P_e with
 * f_e = st[e] / M, P_e = st[E + e] / M, M = L x targets (transformers' pooling over layers);
 * fills *loss (tokens: the targets counted), aux_grad (E) = d aux / d probs[m, e] = E f_e / M
 * for every row m, and *per_target = 1 / targets (d ce / d one target's cross-entropy).
 * SEMOE_EPROTO when the targets sum to less than 1; reduce's error as it is. */
semoe_rc model_losses_from_stats(double *st, int E, int L, double coef,
                                 semoe_rc (*reduce)(void *state, double *buf, size_t n),
                                 void *state, double *aux_grad, double *per_target,
                                 model_loss_t *loss);

#endif
