/* The CUDA backend's fp32 tables (gpu/backend.h): gpu/ops.h's functions under model/backend.h's
 * field names (and the bf16-GEMM variant's two linear ops), and the per-thread device setup. */
#include "gpu/backend.h"
#include "gpu/device.h"
#include "gpu/ops.h"
#include "gpu/stream.h"

#include <cuda_runtime.h>
#include <stdio.h>
#include <string.h>

/* Field by field by name (C++17 has no designated initializers): a field left out stays NULL,
 * which tests/test_gpu_model.c checks for every field. */
static model_backend_f32_t s_table(void)
{
    model_backend_f32_t b;
    memset(&b, 0, sizeof b);
    b.name = "cuda";
    b.alloc = gpu_alloc;
    b.free = gpu_free;
    b.zero = gpu_zero;
    b.copy = gpu_copy;
    b.to_device = gpu_to_device;
    b.to_host = gpu_to_host;
    b.axpy = gpu_axpy;
    b.add = gpu_add;
    b.add_bias = gpu_add_bias;
    b.embedding_fwd = gpu_embedding_fwd;
    b.embedding_bwd = gpu_embedding_bwd;
    b.rmsnorm_fwd = gpu_rmsnorm_fwd;
    b.rmsnorm_bwd = gpu_rmsnorm_bwd;
    b.linear_fwd = gpu_linear_fwd;
    b.linear_bwd = gpu_linear_bwd;
    b.rope_fwd = gpu_rope_fwd;
    b.rope_bwd = gpu_rope_bwd;
    b.attention_fwd = gpu_attention_fwd;
    b.attention_bwd = gpu_attention_bwd;
    b.router_fwd = gpu_router_fwd;
    b.router_bwd = gpu_router_bwd;
    b.swiglu_fwd = gpu_swiglu_fwd;
    b.swiglu_bwd = gpu_swiglu_bwd;
    b.crossentropy_fwd = gpu_crossentropy_fwd;
    b.crossentropy_bwd = gpu_crossentropy_bwd;
    b.auxloss_fwd = gpu_auxloss_fwd;
    b.auxloss_bwd = gpu_auxloss_bwd;
    b.gather_rows = gpu_gather_rows;
    b.gather_rows_bwd = gpu_gather_rows_bwd;
    b.scatter_rows = gpu_scatter_rows;
    b.scatter_rows_bwd = gpu_scatter_rows_bwd;
    b.adamw = gpu_adamw;
    b.sumsq = gpu_sumsq;
    return b;
}

/* Dynamically initialised before main (no C code runs before main, so nothing reads it
 * earlier); extern "C" through gpu/backend.h, so C sees the plain symbol. */
const model_backend_f32_t gpu_backend_f32 = s_table();

/* The same table with the bf16 tensor-core linear ops (gpu/linear_bf16.cu) and the flash
 * attention (gpu/attention_flash.cu). */
static model_backend_f32_t s_table_bf16mm(void)
{
    model_backend_f32_t b = s_table();
    b.name = "cuda-bf16mm";
    b.linear_fwd = gpu_linear_bf16_fwd;
    b.linear_bwd = gpu_linear_bf16_bwd;
    b.attention_fwd = gpu_attention_flash_fwd;
    b.attention_bwd = gpu_attention_flash_bwd;
    return b;
}

const model_backend_f32_t gpu_backend_f32_bf16mm = s_table_bf16mm();

extern "C" semoe_rc gpu_backend_init(int device)
{
    int count = gpu_device_count();
    if (count == 0) {
        char why[256]; /* semoe_err must not format its own message into itself */
        snprintf(why, sizeof why, "%s", semoe_err_msg());
        return semoe_err(SEMOE_EINVAL, "cuda:%d: no CUDA device on this host (%s): run on a GPU "
                         "machine or use the cpu backend", device, why);
    }
    if (device < 0 || device >= count)
        return semoe_err(SEMOE_EINVAL, "cuda:%d: this host has %d CUDA device%s (cuda:0..cuda:%d)",
                         device, count, count == 1 ? "" : "s", count - 1);
    cudaError_t e = cudaSetDevice(device);
    if (e == cudaSuccess)
        e = cudaFree(0); /* creates the primary context now rather than inside the first op */
    if (e != cudaSuccess)
        return semoe_err(SEMOE_ECUDA, "cuda:%d: cannot initialise the device: %s", device,
                         cudaGetErrorString(e));
    (void)gpu_stream();
    return SEMOE_OK;
}
