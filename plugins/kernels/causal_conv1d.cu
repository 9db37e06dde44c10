// Depthwise causal conv1d (channel-first [batch, dim, seqlen]) and its one-token update.
#include "common.cuh"

namespace essm {
namespace {

constexpr int kMaxWidth = 8;
constexpr int kConvThreads = 128;
constexpr int kConvItems = 8;  // consecutive outputs per thread
constexpr int kConvTile = kConvThreads * kConvItems;

// One block per (batch, channel) row; the row is walked in tiles of kConvTile outputs. Each
// tile's inputs plus the width-1 halo on the left are staged in shared memory (coalesced wide
// loads), then every thread computes kConvItems consecutive outputs from registers.
template <typename T>
__global__ void __launch_bounds__(kConvThreads)
    conv1d_fwd_kernel(const T* __restrict__ x, const float* __restrict__ weight,
                      const float* __restrict__ bias, int silu_act, T* __restrict__ y,
                      T* __restrict__ conv_state_out, int dim, int seqlen, int width) {
  __shared__ float xs[kMaxWidth - 1 + kConvTile];
  const int64_t row = blockIdx.x;
  const int c = static_cast<int>(row % dim);
  const T* xr = x + row * seqlen;
  T* yr = y + row * seqlen;
  float w[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) w[k] = k < width ? weight[c * width + k] : 0.f;
  const float b = bias != nullptr ? bias[c] : 0.f;
  const int halo = width - 1;

  for (int t0 = 0; t0 < seqlen; t0 += kConvTile) {
    // halo: inputs t0-halo .. t0-1 (zero before the sequence start)
    if (threadIdx.x < halo) {
      const int t = t0 - halo + static_cast<int>(threadIdx.x);
      xs[threadIdx.x] = t >= 0 ? to_float(xr[t]) : 0.f;
    }
    const int tt = static_cast<int>(threadIdx.x) * kConvItems;
    float v[kConvItems];
    load_run<T, kConvItems>(xr + t0 + tt, seqlen - t0 - tt, 1.f, v);
#pragma unroll
    for (int i = 0; i < kConvItems; ++i) xs[halo + tt + i] = v[i];
    __syncthreads();
    float out[kConvItems];
#pragma unroll
    for (int i = 0; i < kConvItems; ++i) {
      float acc = b;
#pragma unroll
      for (int k = 0; k < kMaxWidth; ++k)
        if (k < width) acc = fmaf(w[k], xs[tt + i + k], acc);
      out[i] = silu_act ? silu(acc) : acc;
    }
    store_run<T, kConvItems>(yr + t0 + tt, seqlen - t0 - tt, out);
    __syncthreads();  // xs is overwritten by the next tile
  }
  if (conv_state_out != nullptr && threadIdx.x < halo) {
    const int t = seqlen - halo + static_cast<int>(threadIdx.x);
    conv_state_out[row * halo + threadIdx.x] = t >= 0 ? xr[t] : from_float<T>(0.f);
  }
}

// One thread per (batch, channel). Reads the whole window before writing so that
// conv_state_out may alias conv_state_in.
template <typename T>
__global__ void conv1d_update_kernel(const T* x, const T* conv_state_in,
                                     const float* __restrict__ weight,
                                     const float* __restrict__ bias, int silu_act, T* y,
                                     T* conv_state_out, int64_t rows, int dim, int width) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= rows) return;
  const int c = static_cast<int>(row % dim);
  const int halo = width - 1;
  float win[kMaxWidth];
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k) {
    if (k < halo) win[k] = to_float(conv_state_in[row * halo + k]);
    else if (k == halo) win[k] = to_float(x[row]);
    else win[k] = 0.f;
  }
  float acc = bias != nullptr ? bias[c] : 0.f;
#pragma unroll
  for (int k = 0; k < kMaxWidth; ++k)
    if (k < width) acc = fmaf(weight[c * width + k], win[k], acc);
  y[row] = from_float<T>(silu_act ? silu(acc) : acc);
  if (conv_state_out != nullptr) {
#pragma unroll
    for (int k = 0; k < kMaxWidth - 1; ++k)
      if (k < halo) conv_state_out[row * halo + k] = from_float<T>(win[k + 1]);
  }
}

bool conv_sizes_ok(int batch, int dim, int width) {
  return batch > 0 && dim > 0 && width >= 1 && width <= kMaxWidth;
}

}  // namespace
}  // namespace essm

extern "C" cudaError_t essm_causal_conv1d_fwd(essm_dtype io, const void* x, const float* weight,
                                              const float* bias, int silu, void* y,
                                              void* conv_state_out, int batch, int dim,
                                              int seqlen, int width, cudaStream_t stream) {
  using namespace essm;
  if (!conv_sizes_ok(batch, dim, width) || seqlen <= 0 || x == nullptr || weight == nullptr ||
      y == nullptr)
    return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(batch) * dim;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  return dispatch_float(io, [&](auto tag) {
    using T = decltype(tag);
    conv1d_fwd_kernel<T><<<static_cast<unsigned>(rows), kConvThreads, 0, stream>>>(
        static_cast<const T*>(x), weight, bias, silu, static_cast<T*>(y),
        static_cast<T*>(conv_state_out), dim, seqlen, width);
    return launch_status();
  });
}

extern "C" cudaError_t essm_causal_conv1d_update(essm_dtype io, const void* x,
                                                 const void* conv_state_in, const float* weight,
                                                 const float* bias, int silu, void* y,
                                                 void* conv_state_out, int batch, int dim,
                                                 int width, cudaStream_t stream) {
  using namespace essm;
  if (!conv_sizes_ok(batch, dim, width) || x == nullptr || weight == nullptr || y == nullptr ||
      (width > 1 && conv_state_in == nullptr))
    return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(batch) * dim;
  constexpr int kThreads = 256;
  return dispatch_float(io, [&](auto tag) {
    using T = decltype(tag);
    conv1d_update_kernel<T><<<ceil_div(rows, kThreads), kThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(conv_state_in), weight, bias, silu,
        static_cast<T*>(y), static_cast<T*>(conv_state_out), rows, dim, width);
    return launch_status();
  });
}
