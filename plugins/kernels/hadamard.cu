// Hadamard transform y = scale * (had_m (x) H_{2^k}) x along the last axis, n = m * 2^k, with an
// optional fused symmetric int8 quantization of the output.
//
// One block per row; the row lives in shared memory as float. Element i = a*2^k + b, so the
// Sylvester factor acts along b independently for each a, and the base matrix acts along a for
// each b. Sylvester stages are done up to 4 index bits at a time in registers (up to 16-point
// transforms): the first pass (4 bits) straight from global memory, the others over shared memory
// with one barrier per pass, the remaining bits shared out evenly over the fewest passes. The last pass multiplies by had_m (from shared memory, broadcast) and writes the output.
#include "common.cuh"

namespace essm {
namespace {

constexpr int kMaxN = 32768;
constexpr int kRadixBits = 4;
constexpr int kRadix = 1 << kRadixBits;
// Threads per block (at most; one per 16-element group of a pass) and registers bounded so that
// two blocks share an SM where shared memory allows: each block's passes are separated by
// barriers, and a 512-thread block at 72 registers was alone on its SM (docs/benchmarks.md). The
// base-matrix pass (m > 1) keeps a column of m values in registers, hence 256 threads there.
template <int M>
constexpr int max_threads() {
  return M == 1 ? 512 : 256;
}

// In-place Walsh-Hadamard transform of the first `e` (power of two <= 16) entries of v.
__device__ __forceinline__ void wht_registers(float (&v)[kRadix], int e) {
#pragma unroll
  for (int hs = 1; hs < kRadix; hs <<= 1) {
    if (hs >= e) break;
#pragma unroll
    for (int j = 0; j < kRadix; ++j) {
      if ((j & hs) == 0) {
        const float u = v[j], w = v[j + hs];
        v[j] = u + w;
        v[j + hs] = u - w;
      }
    }
  }
}

// Output value before conversion: scaled, and divided by the quantization step for int8 outputs
// (a true division, as in the reference, so that rounding ties land the same way).
template <typename Tout>
__device__ __forceinline__ float finish_value(float acc, float scale, float out_scale) {
  const float v = acc * scale;
  if constexpr (std::is_same<Tout, int8_t>::value) return v / out_scale;
  return v;
}

template <typename Tin, typename Tout, int M>
__global__ void __launch_bounds__(max_threads<M>(), 2) hadamard_kernel(const Tin* __restrict__ x, const float* __restrict__ had_m,
                                int logk, float scale, float out_scale, Tout* __restrict__ y,
                                int n) {
  constexpr int m = M;
  extern __shared__ __align__(16) float s[];
  float* hm = s + n;
  const int64_t row = blockIdx.x;
  const Tin* xr = x + row * n;
  Tout* yr = y + row * n;
  const int K = 1 << logk;
  const int nthreads = blockDim.x;

  for (int i = threadIdx.x; i < m * m; i += nthreads) hm[i] = M > 1 ? had_m[i] : 1.f;

  // pass 0: groups of e0 consecutive elements (low index bits), loaded from global memory
  const int bits0 = min(kRadixBits, logk);
  const int e0 = 1 << bits0;
  for (int g = threadIdx.x; g < n / e0; g += nthreads) {
    float v[kRadix];
    load_run<Tin, kRadix>(xr + static_cast<int64_t>(g) * e0, e0, 1.f, v);
    wht_registers(v, e0);
    if (e0 == kRadix) {  // 16-byte stores: 4-way instead of 16-way bank conflicts
      float4* s4 = reinterpret_cast<float4*>(s + g * kRadix);
#pragma unroll
      for (int q = 0; q < kRadix / 4; ++q)
        s4[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
    } else {
#pragma unroll
      for (int j = 0; j < kRadix; ++j)
        if (j < e0) s[g * e0 + j] = v[j];
    }
  }
  __syncthreads();

  // later passes: bits [lo, lo+bits) of b; a group fixes every other bit (and a)
  // The remaining bits are shared out evenly over the fewest passes (13 bits: 4 + 3 + 3 + 3, not
  // 4 + 4 + 4 + 1, whose last pass would be a whole sweep for one butterfly per element pair).
  for (int lo = bits0, bits = 0; lo < logk; lo += bits) {
    const int passes = (logk - lo + kRadixBits - 1) / kRadixBits;
    bits = (logk - lo + passes - 1) / passes;
    const int e = 1 << bits;
    for (int g = threadIdx.x; g < n / e; g += nthreads) {
      const int a = g / (K >> bits);
      const int rest = g % (K >> bits);
      const int low = rest & ((1 << lo) - 1);
      const int high = rest >> lo;
      const int base = a * K + (high << (lo + bits)) + low;
      float v[kRadix];
#pragma unroll
      for (int j = 0; j < kRadix; ++j) v[j] = j < e ? s[base + (j << lo)] : 0.f;
      wht_registers(v, e);
#pragma unroll
      for (int j = 0; j < kRadix; ++j)
        if (j < e) s[base + (j << lo)] = v[j];
    }
    __syncthreads();
  }

  // base-matrix pass + output: y[a'*K + b] = scale * sum_a had_m[a', a] * X[a, b]
  if constexpr (M == 1) {
    // 8 consecutive outputs per thread: two 16-byte shared loads and one wide global store
    for (int b0 = threadIdx.x * 8; b0 < K; b0 += nthreads * 8) {
      float v[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = b0 + j < K ? finish_value<Tout>(s[b0 + j], scale, out_scale) : 0.f;
      store_run<Tout, 8>(yr + b0, K - b0, v);
    }
  } else {
    for (int bcol = threadIdx.x; bcol < K; bcol += nthreads) {
      float xa[M];
#pragma unroll
      for (int a = 0; a < M; ++a) xa[a] = s[a * K + bcol];
#pragma unroll 1
      for (int ao = 0; ao < M; ++ao) {
        // row ao of had_m as 16-byte broadcasts (M is a multiple of 4; hm starts 16-byte aligned)
        const float4* hrow = reinterpret_cast<const float4*>(hm + ao * M);
        float acc = 0.f;
#pragma unroll
        for (int a4 = 0; a4 < M / 4; ++a4) {
          const float4 hv = hrow[a4];
          acc = fmaf(hv.x, xa[4 * a4], acc);
          acc = fmaf(hv.y, xa[4 * a4 + 1], acc);
          acc = fmaf(hv.z, xa[4 * a4 + 2], acc);
          acc = fmaf(hv.w, xa[4 * a4 + 3], acc);
        }
        yr[ao * K + bcol] = from_float<Tout>(finish_value<Tout>(acc, scale, out_scale));
      }
    }
  }
}

bool hadamard_shape(int m, int n, int* logk) {
  if (!(m == 1 || m == 12 || m == 20 || m == 28 || m == 40)) return false;
  if (n <= 0 || n > kMaxN || n % m != 0) return false;
  const int K = n / m;
  if ((K & (K - 1)) != 0) return false;
  int l = 0;
  while ((1 << l) < K) ++l;
  *logk = l;
  return true;
}

template <typename Tin, typename Tout, int M>
cudaError_t launch_hadamard_m(const void* x, const float* had_m, int logk, float scale,
                              float out_scale, void* y, int64_t rows, int n, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (static_cast<size_t>(n) + static_cast<size_t>(M) * M);
  auto kernel = hadamard_kernel<Tin, Tout, M>;
  if (smem > 48 * 1024) {
    int dev = 0, optin = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess)
      err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return err;
    if (smem > static_cast<size_t>(optin)) return cudaErrorInvalidValue;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  // one thread per 16-element group of the widest pass, 32..max_threads<M>() threads
  int threads = 32;
  while (threads < max_threads<M>() && threads * kRadix < n) threads <<= 1;
  kernel<<<static_cast<unsigned>(rows), threads, smem, stream>>>(
      static_cast<const Tin*>(x), had_m, logk, scale, out_scale, static_cast<Tout*>(y), n);
  return launch_status();
}

template <typename Tin, typename Tout>
cudaError_t launch_hadamard(const void* x, const float* had_m, int m, int logk, float scale,
                            float out_scale, void* y, int64_t rows, int n, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_hadamard_m<Tin, Tout, 1>(x, had_m, logk, scale, out_scale, y, rows, n, stream);
    case 12: return launch_hadamard_m<Tin, Tout, 12>(x, had_m, logk, scale, out_scale, y, rows, n, stream);
    case 20: return launch_hadamard_m<Tin, Tout, 20>(x, had_m, logk, scale, out_scale, y, rows, n, stream);
    case 28: return launch_hadamard_m<Tin, Tout, 28>(x, had_m, logk, scale, out_scale, y, rows, n, stream);
    case 40: return launch_hadamard_m<Tin, Tout, 40>(x, had_m, logk, scale, out_scale, y, rows, n, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace essm

extern "C" cudaError_t essm_hadamard_transform(essm_dtype in_dtype, essm_dtype out_dtype,
                                               const void* x, const float* had_m, int m,
                                               float scale, float out_scale, void* y,
                                               int64_t rows, int n, cudaStream_t stream) {
  using namespace essm;
  int logk = 0;
  if (!hadamard_shape(m, n, &logk) || rows <= 0 || rows > 0x7fffffff || x == nullptr ||
      y == nullptr || (m > 1 && had_m == nullptr) ||
      (out_dtype == ESSM_I8 && !(out_scale > 0.f)))
    return cudaErrorInvalidValue;
  return dispatch_float(in_dtype, [&](auto ti) {
    using Tin = decltype(ti);
    if (out_dtype == ESSM_I8)
      return launch_hadamard<Tin, int8_t>(x, had_m, m, logk, scale, out_scale, y, rows, n, stream);
    if (out_dtype != in_dtype) return cudaErrorInvalidValue;
    return launch_hadamard<Tin, Tin>(x, had_m, m, logk, scale, out_scale, y, rows, n, stream);
  });
}
