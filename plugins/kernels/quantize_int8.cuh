// Symmetric int8 quantization y = saturate(round_half_even(v / out_scale)) (ONNX QuantizeLinear)
// without a division per element. Plain C++ as well as CUDA: common.cuh includes it for the
// kernels, and tests/cpp/quantize_int8_check.cpp (built by g++ from tests/test_hadamard_quantize.py)
// checks this very code against the division.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ESSM_QI8_FN __host__ __device__ __forceinline__
#else
#define ESSM_QI8_FN inline
#endif

namespace essm {

// IEEE round-to-nearest float32 operations that are never contracted into FMAs or reassociated:
// the argument below is about exactly these roundings (the _rn intrinsics on the device; on the
// host, where the test runs, the file is compiled with -ffp-contract=off).
ESSM_QI8_FN float qi8_mul(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
ESSM_QI8_FN float qi8_add(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ESSM_QI8_FN float qi8_sub(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ESSM_QI8_FN float qi8_div(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
ESSM_QI8_FN int32_t qi8_bits(float a) {
#ifdef __CUDA_ARCH__
  return __float_as_int(a);
#else
  int32_t b;
  memcpy(&b, &a, sizeof b);
  return b;
#endif
}

// The reference rounding of an int8 output: rintf (half to even), then saturate; NaN gives -128
// (fmaxf drops it). from_float<int8_t> (common.cuh) is this function.
ESSM_QI8_FN int8_t saturate_int8(float q) {
  return static_cast<int8_t>(fminf(fmaxf(rintf(q), -128.f), 127.f));
}

constexpr float kQi8Round = 12582912.f;         // 1.5 * 2^23: q + this rounds q to an integer
constexpr int32_t kQi8RoundBits = 0x4B400000;   // its bits; the low bits of q + it hold rint(q)
constexpr float kQi8Near = 0.5f - 0x1p-14f;     // fast path iff |q - rint(q)| <= this

// The fast path's 1/out_scale, once per launch or thread: RN(1/s) where the bound below holds
// (s in [2^-100, 2^100]), NaN otherwise (every NaN or nonpositive s included), which sends every
// element to the division.
ESSM_QI8_FN float quantize_int8_inv(float out_scale) {
  return out_scale >= 0x1p-100f && out_scale <= 0x1p100f ? qi8_div(1.f, out_scale) : NAN;
}

// Why q = RN(v * inv), inv = RN(1/s), decides the result away from half-integers (u = 2^-24):
// - x = v / s exactly; the reference rounds twice: Q = RN(x), then rint(Q) and the clamp. A
//   refined quotient (a Newton step on q) cannot remove the fallback: Q itself may be a tie that x
//   is not, so any fast path must stay away from half-integers by about an ulp of Q anyway; q alone
//   keeps that margin small.
// - With 1/s normal (s in [2^-100, 2^100]) and no overflow, q = x (1 + d1)(1 + d2) + e with
//   |d1|, |d2| <= u and |e| <= 2^-150 (underflow of q), so |q - x| <= (2u + u^2) |x| + 2^-150.
// - |q| < 129: then |x| < 129.0001, |q - x| < 1.008 * 2^-16 and |Q - x| <= ulp(x) / 2 <= 2^-17,
//   so |q - Q| < 1.51 * 2^-16 < 2^-14. The fast path requires q to be at least 2^-14 from every
//   half-integer, so no half-integer lies between q and Q or equals Q: rint(Q) = rint(q).
// - |q| >= 129: x and Q have q's sign and magnitude > 128.9: both sides saturate alike.
// - t = RN(q + 1.5 * 2^23) is 1.5 * 2^23 + rint(q) (ties to even) for |q| < 2^22, where
//   t - 1.5 * 2^23 and q - rint(q) are exact (Sterbenz), so the test |q - rint(q)| <= 0.5 - 2^-14
//   is exact, and bits(t) - bits(1.5 * 2^23) = rint(q). (Adds, not rintf and a float-to-int
//   conversion: the fast path has no conversion or MUFU instruction, which issue at a quarter of
//   the FMA pipe's rate or less.) For |q| >= 2^22 the test may be inexact but the bits of
//   t (monotonic in t, negative for t < 0) fall outside the clamp on q's side: saturated, as it
//   must be. q = +-inf or NaN (v = +-inf or NaN, overflow, or an out-of-range scale's NaN inv)
//   makes the test false: the division decides, as do the ~2^-13 of values near a half-integer.
// So quantize_int8_div(v, s, quantize_int8_inv(s)) == saturate_int8(v / s) for every float v and
// s, with the division on only those elements (tests/cpp/quantize_int8_check.cpp checks it).
ESSM_QI8_FN bool quantize_int8_fast(float v, float inv_scale, int8_t* y) {
  const float q = qi8_mul(v, inv_scale);
  const float t = qi8_add(q, kQi8Round);
  if (!(fabsf(qi8_sub(q, qi8_sub(t, kQi8Round))) <= kQi8Near)) return false;
  int32_t b = qi8_bits(t);
  b = b < kQi8RoundBits - 128 ? kQi8RoundBits - 128 : b;
  b = b > kQi8RoundBits + 127 ? kQi8RoundBits + 127 : b;
  *y = static_cast<int8_t>(b - kQi8RoundBits);
  return true;
}

// saturate_int8(v / out_scale), dividing only where the fast path cannot decide;
// inv_scale = quantize_int8_inv(out_scale).
ESSM_QI8_FN int8_t quantize_int8_div(float v, float out_scale, float inv_scale) {
  int8_t y;
  if (quantize_int8_fast(v, inv_scale, &y)) return y;
  return saturate_int8(qi8_div(v, out_scale));
}

}  // namespace essm
