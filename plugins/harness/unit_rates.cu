// Peak rates of the two execution units that bound the scans, measured on the GPU at hand:
// - mma.sync m16n8k16 with fp16 operands and fp32 accumulation (the SSD kernel's products; the
//   only tensor-core instruction sm_87 has, and on sm_90 the legacy path beside wgmma), in FLOP per
//   SM clock;
// - ex2.approx.f32 on the special-function unit (the Mamba-1 scan's per-state decays), per SM clock.
// Each kernel keeps 8 independent chains per thread and enough warps per SM that issue, not
// latency, limits it; the SM clock is read with clock64() inside the kernel, so the result is per
// clock whatever clock the GPU ran at. bench_kernels.py's floors take these units' rates from its
// tables (SFU_OPS_PER_CLK_SM, TENSOR_F16_FLOPS_PER_CLK_SM); this program checks them.
//
//   nvcc -O3 -arch=sm_90 plugins/harness/unit_rates.cu -o /tmp/unit_rates && /tmp/unit_rates
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

constexpr int kChains = 8;
constexpr int kThreads = 256;
constexpr int kBlocksPerSm = 4;  // 32 warps per SM; registers: < 64 per thread

#define CHECK(call)                                                              \
  do {                                                                           \
    const cudaError_t e_ = (call);                                               \
    if (e_ != cudaSuccess) {                                                     \
      std::fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_));          \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Each block writes its clock64() span; `sink` keeps the results alive.
__global__ void __launch_bounds__(kThreads) mma_rate(int iters, long long* cycles, float* sink) {
  const uint32_t v = 0x3c003c00u ^ (threadIdx.x & 1);  // fp16 pairs near 1
  const uint32_t a[4] = {v, v, v, v};
  float d[kChains][4] = {};
  __syncthreads();
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) mma16816(d[c], a, v, v);
  }
  __syncthreads();
  const long long t1 = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += d[c][0] + d[c][1] + d[c][2] + d[c][3];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
}

__global__ void __launch_bounds__(kThreads) ex2_rate(int iters, long long* cycles, float* sink) {
  float x[kChains];
#pragma unroll
  for (int c = 0; c < kChains; ++c) x[c] = 0.01f * (threadIdx.x % 7 + c);
  __syncthreads();
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int c = 0; c < kChains; ++c) {  // x <- 2^x - 1 stays in [0, 1): no overflow, no shortcut
      float e;
      asm volatile("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(x[c]));
      x[c] = e - 1.f;
    }
  }
  __syncthreads();
  const long long t1 = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChains; ++c) s += x[c];
  sink[blockIdx.x * kThreads + threadIdx.x] = s;
}

// Operations per SM clock of `kernel`, each thread doing iters * kChains operations worth `work`.
template <typename K>
int measure(const char* name, K kernel, int sms, int iters, double work, const char* unit) {
  const int blocks = sms * kBlocksPerSm;
  long long* cycles = nullptr;
  float* sink = nullptr;
  CHECK(cudaMalloc(&cycles, sizeof(long long) * blocks));
  CHECK(cudaMalloc(&sink, sizeof(float) * blocks * kThreads));
  kernel<<<blocks, kThreads>>>(iters / 10, cycles, sink);  // warm-up (clocks up)
  kernel<<<blocks, kThreads>>>(iters, cycles, sink);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<long long> c(blocks);
  CHECK(cudaMemcpy(c.data(), cycles, sizeof(long long) * blocks, cudaMemcpyDeviceToHost));
  long long span = 0;
  for (long long v : c) span = v > span ? v : span;
  // every block ran concurrently (one wave): the SM did kBlocksPerSm blocks' work in `span` clocks
  const double per_sm = static_cast<double>(kBlocksPerSm) * kThreads * iters * kChains * work;
  std::printf("%-40s %10.1f %s per SM clock (%d SMs, %lld clocks)\n", name, per_sm / span, unit, sms, span);
  CHECK(cudaFree(cycles));
  CHECK(cudaFree(sink));
  return 0;
}

}  // namespace

int main() {
  int dev = 0, sms = 0, major = 0, minor = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  std::printf("unit_rates: sm_%d%d, %d SMs\n", major, minor, sms);
  // an m16n8k16 product is 2 * 16 * 8 * 16 FLOP per warp, i.e. 4096 / 32 per thread
  if (measure("mma.sync m16n8k16 f16 -> f32", mma_rate, sms, 4096, 4096.0 / 32, "FLOP") != 0) return 1;
  return measure("ex2.approx.f32 (special-function unit)", ex2_rate, sms, 8192, 1.0, "ops");
}
