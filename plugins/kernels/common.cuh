// Shared device helpers for the edgessm kernels: dtype conversion, vector loads/stores,
// softplus, fast exp2, and the dtype dispatch used by every launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "edgessm/kernels.h"
#include "quantize_int8.cuh"

namespace essm {

// ---- scalar conversion ------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(int8_t v) { return static_cast<float>(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
// int8 stores are symmetric quantization: round half to even, saturate (quantize_int8.cuh, where
// quantize_int8_div gives from_float<int8_t>(v / out_scale) without a division per element).
template <>
__device__ __forceinline__ int8_t from_float<int8_t>(float v) { return saturate_int8(v); }

// ---- vector memory access ---------------------------------------------------------------------
// Word type for moving N elements of T at once (16-byte words when the run is a multiple of 16).
template <int BYTES>
using VecWord = typename std::conditional<
    BYTES % 16 == 0, uint4,
    typename std::conditional<
        BYTES % 8 == 0, uint2,
        typename std::conditional<BYTES % 4 == 0, uint32_t,
                                  typename std::conditional<BYTES % 2 == 0, uint16_t,
                                                            uint8_t>::type>::type>::type>::type;

// Dequantized value of one loaded element: int8 inputs are scaled, float inputs are exact (their
// scale argument is ignored, which saves a multiply per element in the scans' inner loops).
template <typename T>
__device__ __forceinline__ float dequant(T v, float scale) {
  if constexpr (std::is_same<T, int8_t>::value) return to_float(v) * scale;
  return to_float(v);
}

// One element or word: through the read-only data cache (__ldg), or, with kLive, as an ordinary
// global load (__ldca, what the Triton kernels use). kLive is for data that another kernel may still
// be writing while this one runs: the activations read by a kernel launched with programmatic
// dependent launch (launch_pdl), after its pdl_wait. A read-only (.nc) load requires the data to
// stay unchanged for the kernel's whole lifetime (measured on an H100: Mamba-2 decode read stale
// activations with __ldg); __ldcg (L2 only) was correct too but lost the L1 reuse of B and C (1.4B
// batch-8 state update 4.2 -> 5.7 µs per layer).
template <bool kLive, typename T>
__device__ __forceinline__ T load_elem(const T* p) {
  if constexpr (kLive) return __ldca(p);
  else return __ldg(p);
}

// Loads the raw elements e[i] = p[i] for i < N, i < valid (zero beyond `valid`). Uses wide loads
// when the whole run is valid and the address is aligned for them; scalar loads otherwise. Kernels
// that prefetch a run one step ahead hold it in this form (2..4 registers for 8 fp16/int8 values).
template <typename T, int N, bool kLive = false>
__device__ __forceinline__ void fetch_run(const T* __restrict__ p, int valid, T (&e)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  using W = VecWord<kBytes>;
  constexpr int kWords = kBytes / static_cast<int>(sizeof(W));
  if (valid >= N && (reinterpret_cast<uintptr_t>(p) % sizeof(W)) == 0) {
    W w[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = load_elem<kLive>(reinterpret_cast<const W*>(p) + k);
    memcpy(e, w, kBytes);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      // (plain loads without kLive: __ldg here made the f16 Mamba-1 prefill scan up to 1.4x slower)
      if constexpr (kLive) e[i] = i < valid ? load_elem<true>(p + i) : T{};
      else e[i] = i < valid ? p[i] : T{};
    }
  }
}

// Loads v[i] = dequant(p[i], scale) for i < N, i < valid (zero beyond `valid`), as fetch_run.
template <typename T, int N, bool kLive = false>
__device__ __forceinline__ void load_run(const T* __restrict__ p, int valid, float scale,
                                         float (&v)[N]) {
  T e[N];
  fetch_run<T, N, kLive>(p, valid, e);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = dequant(e[i], scale);
}

// Stores p[i] = e[i] for i < valid, with wide stores when possible.
template <typename T, int N>
__device__ __forceinline__ void put_run(T* __restrict__ p, int valid, const T (&e)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  using W = VecWord<kBytes>;
  constexpr int kWords = kBytes / static_cast<int>(sizeof(W));
  if (valid >= N && (reinterpret_cast<uintptr_t>(p) % sizeof(W)) == 0) {
    W w[kWords];
    memcpy(w, e, kBytes);
#pragma unroll
    for (int k = 0; k < kWords; ++k) reinterpret_cast<W*>(p)[k] = w[k];
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < valid) p[i] = e[i];
  }
}

// Stores p[i] = v[i] (converted) for i < valid, with wide stores when possible.
template <typename T, int N>
__device__ __forceinline__ void store_run(T* __restrict__ p, int valid, const float (&v)[N]) {
  T e[N];
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_float<T>(v[i]);
  put_run<T, N>(p, valid, e);
}

template <typename T, bool kLive = false>
__device__ __forceinline__ float load1(const T* __restrict__ p, float scale) {
  return dequant(load_elem<kLive>(p), scale);
}

// ---- math -------------------------------------------------------------------------------------
constexpr float kLog2e = 1.4426950408889634f;

// 2^x through the special-function unit (ex2.approx, ~2 ulp; results below 2^-126 flush to 0,
// which is harmless for decay factors). The harness checks the end-to-end error against float64.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// 1/d on the FMA pipe for 1 <= d <= 2^125, for kernels bound by the special-function unit (rcp
// runs at 16/clk/SM, FMA at 128): a bit-trick seed (at most 5.1% off), one Newton step
// (2.6e-3), one cubic step r += r (e + e^2) (1.7e-8), then the float rounding. 6 instructions.
__device__ __forceinline__ float fma_rcp(float d) {
  float r = __int_as_float(0x7EF311C3 - __float_as_int(d));
  float e = fmaf(-d, r, 1.f);
  r = fmaf(r, e, r);
  e = fmaf(-d, r, 1.f);
  return fmaf(r, fmaf(e, e, e), r);
}

// softplus with the mamba_ssm threshold: x for x > 20, else log1p(exp(x)) (accurate libm calls:
// this runs once per (token, channel), not per state).
__device__ __forceinline__ float softplus(float x) { return x > 20.f ? x : log1pf(expf(x)); }

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// ---- host-side dispatch -----------------------------------------------------------------------
// Calls f(T{}) with T the C++ type of a float io dtype; returns cudaErrorInvalidValue otherwise.
template <typename F>
cudaError_t dispatch_float(essm_dtype dt, F&& f) {
  switch (dt) {
    case ESSM_F32: return f(float{});
    case ESSM_F16: return f(__half{});
    case ESSM_BF16: return f(__nv_bfloat16{});
    default: return cudaErrorInvalidValue;
  }
}

// Input/output dtype pairs the scan kernels support: float io in == out, or int8 in with any
// float out. Calls f(Tin{}, Tout{}).
template <typename F>
cudaError_t dispatch_in_out(essm_dtype in, essm_dtype out, F&& f) {
  if (in == ESSM_I8) {
    return dispatch_float(out, [&](auto o) { return f(int8_t{}, o); });
  }
  if (in != out) return cudaErrorInvalidValue;
  return dispatch_float(in, [&](auto t) { return f(t, t); });
}

inline cudaError_t launch_status() { return cudaGetLastError(); }

// ---- programmatic dependent launch (PDL, sm_90 and later) ----------------------------------------
// A decode step is a chain of small kernels whose time is mostly launch and memory latency. With
// PDL a kernel's blocks start while the previous kernel finishes (each kernel lets its dependents
// start at once, pdl_launch_dependents) and wait (pdl_wait) only before their first load of
// anything a kernel writes: activations and states. Parameters may be read before it. Both
// instructions are no-ops when the kernel was launched without the attribute, and are compiled out
// below sm_90 (Jetson Orin is sm_87). The Triton decode kernels do the same (edgessm/ops/triton_gemv.py).
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether launch_pdl sets the attribute: the current device is sm_90 or later, and the environment
// does not set EDGESSM_PDL=0.
inline bool pdl_enabled() {
  const char* env = std::getenv("EDGESSM_PDL");  // read at every launch, as the Python side does
  int device = 0, major = 0;
  return (env == nullptr || std::strcmp(env, "0") != 0) && cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
         major >= 9;
}

// kernel<<<grid, block, smem, stream>>>(args...) through cudaLaunchKernelEx with the launch
// attribute `attr` when `with_attr` (PDL, a cluster shape).
template <typename... Params, typename... Args>
cudaError_t launch_ex(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem,
                      cudaStream_t stream, cudaLaunchAttribute attr, bool with_attr, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(grid);
  config.blockDim = dim3(block);
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = with_attr ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  const cudaError_t last = launch_status();  // clears the error launch_status() would report later
  return err != cudaSuccess ? err : last;
}

// kernel<<<grid, block, smem, stream>>>(args...), with the PDL attribute where pdl_enabled().
template <typename... Params, typename... Args>
cudaError_t launch_pdl(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem,
                       cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return launch_ex(kernel, grid, block, smem, stream, attr, pdl_enabled(),
                   std::forward<Args>(args)...);
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// ---- decode: one recurrent-state row per `lanes` lanes -------------------------------------------
// A decode step moves a few hundred KB per layer: its time is memory latency and instruction
// count, so
//  - every global load of a row is issued before any arithmetic or store (a loop that loaded and
//    stored element by element paid one memory round trip per element: state_out may alias
//    state_in, so no load may move above a store);
//  - states move kVec at a time (4: 16-byte words, where dstate % 4 == 0 and the state rows are
//    16-byte aligned), lane `sub` of a row owning the runs n = (i lanes + sub) kVec .. + kVec - 1
//    for i < kPer, so a warp's accesses stay coalesced and the row's output is a shuffle reduction
//    over its lanes.
constexpr int kMaxDecodeStates = 256;  // dstate limit of the decode kernels
// Thread count limit of a decode launch (rows x lanes), so that thread and row indices are 32-bit:
// their 64-bit division was a chain of ~40 instructions in front of every load.
constexpr int64_t kMaxDecodeThreads = int64_t{1} << 30;

// How a launch lays rows out over lanes: kVec states per access, `lanes` (a power of two <= 32,
// >= dstate / kVec where possible) per row, kPer accesses per lane.
struct DecodeShape {
  int vec, lanes, per;
  DecodeShape(int dstate, bool aligned16) : vec(aligned16 && dstate % 4 == 0 ? 4 : 1), lanes(1) {
    const int runs = (dstate + vec - 1) / vec;
    while (lanes < runs && lanes < 32) lanes <<= 1;
    per = (runs + lanes - 1) / lanes;
  }
};

// Calls f(std::integral_constant<int, kPer>{}, std::integral_constant<int, kVec>{}) for `shape`
// (kPer rounded up to a power of two: at most 8 / kVec, since the launchers reject dstate above
// kMaxDecodeStates and lanes <= 32).
template <typename F>
cudaError_t with_decode_shape(const DecodeShape& shape, F&& f) {
  using V1 = std::integral_constant<int, 1>;
  using V4 = std::integral_constant<int, 4>;
  if (shape.vec == 4)
    return shape.per <= 1 ? f(std::integral_constant<int, 1>{}, V4{}) : f(std::integral_constant<int, 2>{}, V4{});
  if (shape.per <= 1) return f(std::integral_constant<int, 1>{}, V1{});
  if (shape.per <= 2) return f(std::integral_constant<int, 2>{}, V1{});
  if (shape.per <= 4) return f(std::integral_constant<int, 4>{}, V1{});
  return f(std::integral_constant<int, 8>{}, V1{});
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// This thread's row and lane within it (lanes a power of two).
__device__ __forceinline__ void decode_row(int block_threads, int lanes, int* row, int* sub) {
  const int t = static_cast<int>(blockIdx.x) * block_threads + static_cast<int>(threadIdx.x);
  *row = t >> (__ffs(lanes) - 1);
  *sub = t & (lanes - 1);
}

// kVec floats at p (16-byte aligned for kVec 4). Plain loads, not __ldg: the state may be
// rewritten by this kernel.
template <int kVec>
__device__ __forceinline__ void load_floats(const float* p, float (&v)[kVec]) {
  if constexpr (kVec == 4) {
    const float4 w = *reinterpret_cast<const float4*>(p);
    v[0] = w.x, v[1] = w.y, v[2] = w.z, v[3] = w.w;
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = p[j];
  }
}

template <int kVec>
__device__ __forceinline__ void store_floats(float* p, const float (&v)[kVec]) {
  if constexpr (kVec == 4) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec; ++j) p[j] = v[j];
  }
}

// One row's states, A, B and C for this lane, loaded by load() in the kernel's first lines (before
// any arithmetic, softplus's branches included: code placed after a branch is not hoisted above
// it), then advanced by update().
template <int kPer, int kVec>
struct StateRowLane {
  float h[kPer][kVec], a[kPer][kVec], b[kPer][kVec], c[kPer][kVec];

  // A_n = A_row[n] (per_state_A) or A_row[0] (one decay per row); inactive rows read nothing
  template <typename Tin>
  __device__ __forceinline__ void load(const float* s_in, const float* A_row, bool per_state_A,
                                       const Tin* Brow, const Tin* Crow, float B_scale, float C_scale,
                                       int N, int sub, int lanes, bool active) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int n = (i * lanes + sub) * kVec;
      if (active && n < N) {
        load_floats<kVec>(s_in + n, h[i]);
        if (per_state_A) {
          load_run<float, kVec>(A_row + n, kVec, 1.f, a[i]);
        } else {
#pragma unroll
          for (int j = 0; j < kVec; ++j) a[i][j] = __ldg(A_row);
        }
        load_run<Tin, kVec, true>(Brow + n, kVec, B_scale, b[i]);  // written by the previous kernel
        load_run<Tin, kVec, true>(Crow + n, kVec, C_scale, c[i]);
      }
    }
  }

  // h_n <- exp(dt A_n) h_n + dtx B_n, written to s_out; returns sum_n h_n C_n reduced over the
  // row's lanes (every lane of the warp calls it). The decay goes through ex2.approx, as in the
  // prefill scans (the rounding of dt log2(e) A costs about 6e-8 |dt A| relative).
  __device__ __forceinline__ float update(float* s_out, float dt, float dtx, int N, int sub, int lanes,
                                          bool active) {
    const float dt2 = dt * kLog2e;
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int n = (i * lanes + sub) * kVec;
      if (active && n < N) {
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          h[i][j] = fmaf(fast_exp2(dt2 * a[i][j]), h[i][j], dtx * b[i][j]);
          acc = fmaf(h[i][j], c[i][j], acc);
        }
        store_floats<kVec>(s_out + n, h[i]);
      }
    }
    for (int off = lanes >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    return acc;
  }
};

}  // namespace essm
