/* The model's forward and backward pass on one GPU in mixed precision: bf16 weights and
 * activations with fp32 accumulation, the residual stream and every weight gradient in fp32,
 * against the trainer's fp32 master weights (model/graph.h's pass, the same math up to the bf16
 * roundings; docs/gpu.md "The bf16 graph").
 *
 * Per layer: RMSNorm (fp32 residual in, bf16 out), one GEMM for q, k and v, RoPE while splitting
 * them, flash attention (gpu/flash_attn.h), o_proj accumulated into the fp32 residual by the
 * GEMM, RMSNorm, and the MoE block as gpu/moe_layer.h's layer (router, permutation, W1 and W3 as
 * one GEMM per expert, SwiGLU, W2, the weighted combine added to the residual). Then the final
 * norm, the LM head (bf16 logits) and the cross-entropy; the aux loss pooled over the layers as
 * model/graph.h computes it. Each forward rounds the master weights to a bf16 copy laid out for
 * those GEMMs (q/k/v stacked, W1 over W3 per expert); backward accumulates fp32 gradients
 * straight into the params-shaped gradient slab (cuBLAS with fp32 C and beta 1).
 *
 * Made without expert rows, the graph holds every expert of the model and runs the MoE block
 * locally: an exchange passed to forward/backward contributes only reduce_stats (the global
 * losses, as model/graph.h does) and note_local (the load accounting). Made with expert rows
 * (expert parallelism), it holds the experts params holds and every MoE layer's rows travel
 * through the exchange's dispatch and combine as bf16 (rows of D/2 floats to the exchange,
 * which only moves them), each rank running its experts on the rows that arrive: forward and
 * backward are then collectives, with the exchange required. router_jitter_noise is not
 * applied. Memory: linear in T (no attention probabilities).
 *
 * Device pointers are the calling thread's current device (gpu_backend_init); everything runs
 * on its gpu_stream(), from the thread that created the graph. Compiled only with CUDA. */
#ifndef SEMOE_GPU_GRAPH_BF16_H
#define SEMOE_GPU_GRAPH_BF16_H

#ifdef __cplusplus
extern "C" {
#endif

#include "actors/err.h"
#include "model/graph.h"
#include "model/params.h"
#include "model/train.h"

typedef struct gpu_graph_bf16 gpu_graph_bf16_t;

/* The pass for B sequences of T tokens of params' model (its config and tensor offsets; params
 * must outlive the graph). expert_rows: 0, or the room for the rows an exchange delivers per
 * MoE layer at first (expert parallelism; each layer's grows when a step delivers more, up to
 * B T K times the ranks). Allocates every activation and scratch buffer once but that room (and
 * bf16 copies of the held experts only). SEMOE_EINVAL
 * when hd is not 64 or 128, a width is not a multiple of 8, or the MoE layer refuses the
 * shape; SEMOE_ENOMEM (the message says how much) when the device is full. */
semoe_rc gpu_graph_bf16_new(const model_params_t *params, int B, int T, int expert_rows,
                            gpu_graph_bf16_t **out);
void gpu_graph_bf16_destroy(gpu_graph_bf16_t **self_p);

/* (E) fp32 device memory added to every layer's router logits in later forwards, or NULL
 * (train.router_bias); not owned. */
void gpu_graph_bf16_set_router_bias(gpu_graph_bf16_t *self, const float *bias);

/* Forward on tokens (host, B rows of T + 1: inputs tokens[:, :T], targets tokens[:, 1:]) with
 * the fp32 master weights w (a params-shaped slab in device memory). Fills *loss; keeps what
 * backward needs. ex NULL or without reduce_stats: local means. Errors: a token out of range,
 * reduce_stats' failure; an expert not held without expert rows; with expert rows, no
 * exchange (or one without dispatch and combine) and the exchange's errors. Waits for the device (the loss is read back). */
semoe_rc gpu_graph_bf16_forward(gpu_graph_bf16_t *self, const float *w, const int32_t *tokens,
                                const model_exchange_f32 *ex, model_loss_t *loss);

/* Backward of the last forward (same w): ACCUMULATES scale * d loss / d w into g
 * (params-shaped, fp32, device), loss = ce + router_aux_loss_coef * aux as the forward
 * reported it (with reduce_stats: this process's share of the global loss's gradient), the
 * experts' only for those held here. Enqueued (with expert rows, the exchange waits for the
 * device at each MoE layer); the exchange's errors. */
semoe_rc gpu_graph_bf16_backward(gpu_graph_bf16_t *self, const float *w, float *g,
                                 double scale);

/* The trainer's pass (model/train.h model_train_new_pass) over these functions, name "bf16". */
extern const model_pass_t gpu_pass_bf16;

/* Time split for benchmarks (one thread): while on, every gpu_graph_bf16_forward/backward of
 * the process waits for the device at each section boundary and adds the section's time to its
 * kind; the MoE layers time their phases with CUDA events, splitting their share into the
 * expert and router GEMMs and the rest. take copies the sums (seconds) and zeroes them. */
enum {
    GPU_GRAPH_GEMM = 0,    /* q/k/v, o_proj and LM-head GEMMs, forward and backward */
    GPU_GRAPH_MOE_GEMM,    /* the MoE layers' GEMMs (experts, router) */
    GPU_GRAPH_MOE_OTHER,   /* the MoE layers' routing, permutation, SwiGLU, combine */
    GPU_GRAPH_ATTENTION,   /* flash attention and RoPE */
    GPU_GRAPH_NORM_LOSS,   /* RMSNorm, cross-entropy, the router probability sums */
    GPU_GRAPH_CONVERT,     /* bf16 weight copy, residual copies and roundings, embedding */
    GPU_GRAPH_HOST,        /* token upload, the losses read back */
    GPU_GRAPH_NKIND
};
void gpu_graph_bf16_profile(int on);
void gpu_graph_bf16_profile_take(double seconds[GPU_GRAPH_NKIND]);
const char *gpu_graph_bf16_kind(int kind);

/* Layer l's routing in the last forward: (B*T, K) expert ids, int32 device memory owned by the
 * graph, in model/graph.h's order (descending probability, ties to the lower expert). */
const int32_t *gpu_graph_bf16_route(const gpu_graph_bf16_t *self, int l);

/* The last forward's logits (B*T, V) as bf16 bit patterns, device memory owned by the graph
 * (overwritten by backward). */
const uint16_t *gpu_graph_bf16_logits(const gpu_graph_bf16_t *self);

#ifdef __cplusplus
}
#endif

#endif
