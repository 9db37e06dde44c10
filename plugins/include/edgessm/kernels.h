// edgessm CUDA kernel launchers: the C ABI shared by the TensorRT plugins (plugins/trt),
// the ctypes harness (plugins/harness, edgessm/ops/cuda.py) and the benchmarks.
//
// Semantics of every launcher are defined op-for-op in docs/onnx_ops.md; the PyTorch
// reference in edgessm/ops is the oracle. All launchers are asynchronous on `stream`, never
// allocate, and return the launch status (cudaGetLastError()) or cudaErrorInvalidValue for
// unsupported sizes/dtypes. Pointers documented "may be NULL" are optional; every other pointer
// must be a valid device pointer. All tensors are dense, contiguous, row-major.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element type of "io" tensors (activations). Parameters and states are always float32.
typedef enum essm_dtype {
  ESSM_F32 = 0,
  ESSM_F16 = 1,
  ESSM_BF16 = 2,
  ESSM_I8 = 3,
} essm_dtype;

// ---- causal depthwise conv1d (channel-first) -------------------------------------------
// x, y: [batch, dim, seqlen] io; weight: [dim, width] f32; bias: [dim] f32 (may be NULL);
// conv_state_out: [batch, dim, width-1] io (may be NULL) = last width-1 inputs, zero-padded.
cudaError_t essm_causal_conv1d_fwd(essm_dtype io, const void* x, const float* weight,
                                   const float* bias, int silu, void* y, void* conv_state_out,
                                   int batch, int dim, int seqlen, int width, cudaStream_t stream);

// x, y: [batch, dim] io; conv_state_in/out: [batch, dim, width-1] io (out may alias in).
cudaError_t essm_causal_conv1d_update(essm_dtype io, const void* x, const void* conv_state_in,
                                      const float* weight, const float* bias, int silu, void* y,
                                      void* conv_state_out, int batch, int dim, int width,
                                      cudaStream_t stream);

// ---- Mamba-1 selective scan (channel-first) ------------------------------------------------
// Dequantization scales for int8 inputs, all device pointers (the kernels read them, so a launch
// never waits on the host and can be captured into a CUDA graph). Every pointer must be non-NULL
// for int8 input (cudaErrorInvalidValue otherwise, z_scale included even when z is NULL); the
// struct is ignored for float io and may then be NULL.
typedef struct essm_scan_scales {
  const float* u_scale;      // [dim] per channel
  const float* delta_scale;  // [1]
  const float* B_scale;      // [1]
  const float* C_scale;      // [1]
  const float* z_scale;      // [1]
} essm_scan_scales;

// in_dtype: dtype of u, delta, Bm, Cm, z (F32, F16, BF16, or I8 with `scales`);
// out_dtype: dtype of y (F32/F16/BF16).
// u, delta, z, y: [batch, dim, seqlen]; A: [dim, dstate] f32; Bm, Cm: [batch, dstate, seqlen];
// Dskip, delta_bias: [dim] f32 (may be NULL); z may be NULL (no gate);
// initial_state: [batch, dim, dstate] f32 (may be NULL = zeros);
// final_state: [batch, dim, dstate] f32 (may be NULL).
cudaError_t essm_selective_scan_fwd(essm_dtype in_dtype, essm_dtype out_dtype, const void* u,
                                    const void* delta, const float* A, const void* Bm,
                                    const void* Cm, const float* Dskip, const void* z,
                                    const float* delta_bias, int delta_softplus,
                                    const essm_scan_scales* scales, const float* initial_state,
                                    void* y, float* final_state, int batch, int dim, int dstate,
                                    int seqlen, cudaStream_t stream);

// One decode step. state_in/out: [batch, dim, dstate] f32 (out may alias in), dstate <= 256;
// x, dt, z, y: [batch, dim]; Bm, Cm: [batch, dstate]; other arguments as above
// (scales->u_scale is the per-channel scale of x, delta_scale that of dt).
cudaError_t essm_selective_state_update(essm_dtype in_dtype, essm_dtype out_dtype,
                                        const float* state_in, const void* x, const void* dt,
                                        const float* A, const void* Bm, const void* Cm,
                                        const float* Dskip, const void* z, const float* dt_bias,
                                        int dt_softplus, const essm_scan_scales* scales, void* y,
                                        float* state_out, int batch, int dim, int dstate,
                                        cudaStream_t stream);

// ---- Mamba-2 SSD (token-major) -------------------------------------------------------------
typedef struct essm_ssd_scales {
  const float* x_scale;  // [nheads*headdim] per channel (device pointer)
  const float* B_scale;  // [ngroups] (device pointer)
  const float* C_scale;  // [ngroups] (device pointer)
} essm_ssd_scales;

// in_dtype: dtype of x, Bm, Cm (F32/F16/BF16, or I8 with `scales`); dt is always out_dtype.
// x, y: [batch, seqlen, nheads, headdim]; dt: [batch, seqlen, nheads]; A, Dskip, dt_bias: [nheads]
// f32 (Dskip/dt_bias may be NULL); Bm, Cm: [batch, seqlen, ngroups, dstate];
// initial_state (may be NULL) / final_state (may be NULL): [batch, nheads, headdim, dstate] f32.
// workspace: workspace_bytes of device memory (16-byte aligned; NULL with 0 bytes), its contents
// ignored and overwritten. With 16-bit outputs a batch too small to fill the GPU has each
// sequence split into segments run in parallel, as far as the workspace allows (none without
// one); essm_ssd_scan_workspace_size gives the size that allows the full split.
cudaError_t essm_ssd_scan_fwd(essm_dtype in_dtype, essm_dtype out_dtype, const void* x,
                              const void* dt, const float* A, const void* Bm, const void* Cm,
                              const float* Dskip, const float* dt_bias, int dt_softplus,
                              float dt_min, float dt_max, const essm_ssd_scales* scales,
                              const float* initial_state, void* y, float* final_state, int batch,
                              int seqlen, int nheads, int headdim, int ngroups, int dstate,
                              int chunk_size, void* workspace, size_t workspace_bytes,
                              cudaStream_t stream);

// Workspace bytes that let essm_ssd_scan_fwd split the sequence fully for every batch <= max_batch
// and seqlen <= max_seqlen with these sizes (0 where it never splits, e.g. float32 outputs). The
// same on every GPU, so a size taken when a TensorRT engine is built holds for later launches.
size_t essm_ssd_scan_workspace_size(essm_dtype out_dtype, int max_batch, int max_seqlen, int nheads,
                                    int headdim, int dstate);

// One decode step. state_in/out: [batch, nheads, headdim, dstate] f32 (out may alias in),
// dstate <= 256; x, y: [batch, nheads, headdim]; dt: [batch, nheads]; Bm, Cm: [batch, ngroups, dstate].
cudaError_t essm_ssd_state_update(essm_dtype in_dtype, essm_dtype out_dtype, const float* state_in,
                                  const void* x, const void* dt, const float* A, const void* Bm,
                                  const void* Cm, const float* Dskip, const float* dt_bias,
                                  int dt_softplus, float dt_min, float dt_max,
                                  const essm_ssd_scales* scales, void* y, float* state_out,
                                  int batch, int nheads, int headdim, int ngroups, int dstate,
                                  cudaStream_t stream);

// ---- Hadamard transform --------------------------------------------------------------------
// x: [rows, n] io; y: [rows, n] of out_dtype (io dtype, or I8 to fuse symmetric quantization:
// y = clamp(rint(v / out_scale), -128, 127)). n = m * 2^k, m in {1, 12, 20, 28, 40}, n <= 32768;
// had_m: [m, m] f32 device pointer (may be NULL when m == 1). v = scale * (had_m (x) H_{2^k}) x.
cudaError_t essm_hadamard_transform(essm_dtype in_dtype, essm_dtype out_dtype, const void* x,
                                    const float* had_m, int m, float scale, float out_scale,
                                    void* y, int64_t rows, int n, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
