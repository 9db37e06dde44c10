// Shared device helpers for the edgessm kernels: dtype conversion, vector loads/stores,
// softplus, fast exp2, and the dtype dispatch used by every launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cstring>
#include <type_traits>

#include "edgessm/kernels.h"

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
// int8 stores are symmetric quantization: round half to even, saturate.
template <>
__device__ __forceinline__ int8_t from_float<int8_t>(float v) {
  return static_cast<int8_t>(fminf(fmaxf(rintf(v), -128.f), 127.f));
}

// ---- vector memory access ---------------------------------------------------------------------
// Word type for moving N elements of T at once (16-byte words when the run is a multiple of 16).
template <int BYTES>
using VecWord = typename std::conditional<
    BYTES % 16 == 0, uint4,
    typename std::conditional<BYTES % 8 == 0, uint2,
                              typename std::conditional<BYTES % 4 == 0, uint32_t,
                                                        uint16_t>::type>::type>::type;

// Dequantized value of one loaded element: int8 inputs are scaled, float inputs are exact (their
// scale argument is ignored, which saves a multiply per element in the scans' inner loops).
template <typename T>
__device__ __forceinline__ float dequant(T v, float scale) {
  if constexpr (std::is_same<T, int8_t>::value) return to_float(v) * scale;
  return to_float(v);
}

// Loads the raw elements e[i] = p[i] for i < N, i < valid (zero beyond `valid`). Uses wide loads
// when the whole run is valid and the address is aligned for them; scalar loads otherwise. Kernels
// that prefetch a run one step ahead hold it in this form (2..4 registers for 8 fp16/int8 values).
template <typename T, int N>
__device__ __forceinline__ void fetch_run(const T* __restrict__ p, int valid, T (&e)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  using W = VecWord<kBytes>;
  constexpr int kWords = kBytes / static_cast<int>(sizeof(W));
  if (valid >= N && (reinterpret_cast<uintptr_t>(p) % sizeof(W)) == 0) {
    W w[kWords];
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = __ldg(reinterpret_cast<const W*>(p) + k);
    memcpy(e, w, kBytes);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) e[i] = i < valid ? p[i] : T{};
  }
}

// Loads v[i] = dequant(p[i], scale) for i < N, i < valid (zero beyond `valid`), as fetch_run.
template <typename T, int N>
__device__ __forceinline__ void load_run(const T* __restrict__ p, int valid, float scale,
                                         float (&v)[N]) {
  T e[N];
  fetch_run<T, N>(p, valid, e);
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = dequant(e[i], scale);
}

// Stores p[i] = v[i] for i < valid, with wide stores when possible.
template <typename T, int N>
__device__ __forceinline__ void store_run(T* __restrict__ p, int valid, const float (&v)[N]) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  using W = VecWord<kBytes>;
  constexpr int kWords = kBytes / static_cast<int>(sizeof(W));
  T e[N];
#pragma unroll
  for (int i = 0; i < N; ++i) e[i] = from_float<T>(v[i]);
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

template <typename T>
__device__ __forceinline__ float load1(const T* __restrict__ p, float scale) {
  return dequant(__ldg(p), scale);
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

// Lanes that cooperate on one recurrent-state row in the decode kernels: the next power of two
// >= dstate, at most a warp. Lane `sub` walks states n = sub, sub + lanes, ... so a warp's state
// accesses are coalesced, and the row's output is a shuffle reduction over those lanes.
inline int lanes_per_row(int dstate) {
  int l = 1;
  while (l < dstate && l < 32) l <<= 1;
  return l;
}

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace essm
