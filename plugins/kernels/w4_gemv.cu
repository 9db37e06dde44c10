// W4A16 GEMV for decode (a few rows of fp16 x) on the tensor cores: y = x · dequant(W)^T.
//
// Why (docs/benchmarks.md, eleventh session): unpacking 4-bit weights into float32 FFMA chains costs
// ~4.6 instructions per weight, ~9 per byte read, about what an SM can issue per byte of its memory
// bandwidth share, so the Triton W4 GEMV's arithmetic takes as long as its loads. Here two weights
// become an fp16 pair with one LOP3 and one HSUB2/HFMA2 (exact: 1024 + q in fp16, then minus the
// offset), and `mma.sync` m16n8k16 does the products with float32 accumulation: ~1.4 instructions
// per weight.
//
// Weights are repacked once (edgessm.ops.cuda_kernels.repack_w4_mma) so that a lane's A fragments
// of four consecutive k16 steps are one 16-byte word: rw[tile][kblock][lane] (uint4), tile = 16
// output rows, kblock = 64 inputs, lane = 4 g + t; word j (k16 step j of the block, k0 = 64 kblock +
// 16 j) holds the offset-binary nibbles (q + 8) of rows r = 16 tile + g, r8 = r + 8:
//   nibble 0 / 4: (r,  k0 + 2t) / (r,  k0 + 2t + 1)       -> A register 0 (a0, a1)
//   nibble 1 / 5: (r8, k0 + 2t) / (r8, k0 + 2t + 1)       -> A register 1 (a2, a3)
//   nibble 2 / 6: (r,  k0 + 2t + 8) / (r,  k0 + 2t + 9)   -> A register 2 (a4, a5)
//   nibble 3 / 7: (r8, k0 + 2t + 8) / (r8, k0 + 2t + 9)   -> A register 3 (a6, a7)
// (the PTX ISA's fragment layout of mma.m16n8k16 for .f16 A). x is the B operand (k16 x n8, column
// m = row m of x, zero for m >= M); each quantization group's float32 partial is scaled once.
#include "common.cuh"

namespace essm {
namespace {

constexpr int kW4KBlock = 64;  // inputs per 16-byte word of a lane (4 k16 steps)
constexpr int kW4Chunk = 4;    // 16-byte words per lane in flight while the previous ones are used

// fp16 pair {lo, hi} from the bits of a 32-bit word
__device__ __forceinline__ uint32_t half2_bits(__half2 h) {
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
__device__ __forceinline__ __half2 bits_half2(uint32_t u) {
  __half2 h;
  memcpy(&h, &u, 4);
  return h;
}

// (a & b) | c as one LOP3 (written as two operations, the two constants would make it two LOP3s:
// SASS LOP3 takes one immediate; ptxas keeps the other in a register outside the loop)
template <uint32_t kB, uint32_t kC>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(kB), "n"(kC));
  return d;
}

// The four A registers of one k16 step from its word (layout above). (w & 0x000F000F) | 0x64006400
// is the pair {1024 + n0, 1024 + n4} in fp16; minus 1032 gives n - 8 exactly. The 0x00F000F0 nibbles
// give 1024 + 16 n, scaled by 1/16 and offset by -72 in one HFMA2, exactly (every value is an
// integer below 2048).
__device__ __forceinline__ void dequant_w4_step(uint32_t w, uint32_t (&a)[4]) {
  const __half2 off = __float2half2_rn(1032.f), sc16 = __float2half2_rn(1.f / 16.f), off16 = __float2half2_rn(-72.f);
  const uint32_t w8 = w >> 8;
  a[0] = half2_bits(__hsub2(bits_half2(and_or<0x000F000Fu, 0x64006400u>(w)), off));
  a[1] = half2_bits(__hfma2(bits_half2(and_or<0x00F000F0u, 0x64006400u>(w)), sc16, off16));
  a[2] = half2_bits(__hsub2(bits_half2(and_or<0x000F000Fu, 0x64006400u>(w8)), off));
  a[3] = half2_bits(__hfma2(bits_half2(and_or<0x00F000F0u, 0x64006400u>(w8)), sc16, off16));
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct W4GemvArgs {
  const __half* x;
  const uint4* rw;
  const float* scale;  // [N, K / group]
  const float* bias;   // [N] or NULL
  __half* y;
  int64_t ldx, ldy;
  int M, N, K;
  int group_shift;  // log2(group)
};

// Block = kWarps warps on one tile of 16 output rows; warp w takes the kblocks [w KB / kWarps,
// (w + 1) KB / kWarps) and the block adds the warps' partial sums through shared memory at the end.
// kGroup32: quantization groups of 32 inputs (two per kblock), else groups of 64 or more (whole
// kblocks).
template <int kWarps, bool kGroup32>
__global__ void __launch_bounds__(32 * kWarps) w4a16_gemv_mma_kernel(const W4GemvArgs p) {
  pdl_launch_dependents();
  __shared__ float partial[kWarps][4][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x;
  const int KB = p.K / kW4KBlock, groups = p.K >> p.group_shift;
  const int kb0 = static_cast<int>(static_cast<int64_t>(warp) * KB / kWarps);
  const int kb1 = static_cast<int>(static_cast<int64_t>(warp + 1) * KB / kWarps);
  const uint4* wp = p.rw + (static_cast<int64_t>(tile) * KB + kb0) * 32 + lane;  // kblock kb0
  // rows of this lane's accumulators (c0, c1: row r; c2, c3: row r + 8), clamped for the scale loads
  // of a last tile padded past N (its padded weights are zero)
  const int r = tile * 16 + g, r8 = r + 8;
  const float* srow = p.scale + static_cast<int64_t>(min(r, p.N - 1)) * groups;
  const float* srow8 = p.scale + static_cast<int64_t>(min(r8, p.N - 1)) * groups;
  // B column g is row g of x (zero for g >= M); a lane's B words of k16 step k0 are the x pairs at
  // k0 + 2t and k0 + 2t + 8, i.e. 32-bit words k0 / 2 + t and k0 / 2 + t + 4 of the row
  const bool has_x = g < p.M;
  const unsigned* xw = reinterpret_cast<const unsigned*>(p.x + static_cast<int64_t>(has_x ? g : 0) * p.ldx) + t;

  float acc[4] = {0.f, 0.f, 0.f, 0.f}, c[4] = {0.f, 0.f, 0.f, 0.f};
  // acc += (the group's partial sums c) x (its scales of rows r and r + 8); c restarts from zero
  auto flush_group = [&](int gi) {
    const float s = __ldg(srow + gi), s8 = __ldg(srow8 + gi);
    acc[0] = fmaf(c[0], s, acc[0]);
    acc[1] = fmaf(c[1], s, acc[1]);
    acc[2] = fmaf(c[2], s8, acc[2]);
    acc[3] = fmaf(c[3], s8, acc[3]);
    c[0] = c[1] = c[2] = c[3] = 0.f;
  };
  // the four k16 steps of kblock kb from its 16-byte word
  auto kblock = [&](const uint4& wv, int kb) {
    const uint32_t words[4] = {wv.x, wv.y, wv.z, wv.w};
    const unsigned* xk = xw + kb * (kW4KBlock / 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t a[4];
      dequant_w4_step(words[j], a);
      const uint32_t b0 = has_x ? __ldca(xk + 8 * j) : 0u, b1 = has_x ? __ldca(xk + 8 * j + 4) : 0u;
      mma_16816(c, a, b0, b1);
      if (kGroup32 && (j & 1)) flush_group(2 * kb + (j >> 1));
    }
    if (!kGroup32 && (((kb + 1) * kW4KBlock) & ((1 << p.group_shift) - 1)) == 0)
      flush_group((kb * kW4KBlock) >> p.group_shift);
  };
  // whole chunks of kW4Chunk kblocks, the next chunk's words loaded before the current one is used;
  // then the remaining kblocks one at a time
  int kb = kb0;
  uint4 cur[kW4Chunk];
  if (kb + kW4Chunk <= kb1) {
#pragma unroll
    for (int i = 0; i < kW4Chunk; ++i) cur[i] = __ldg(wp + i * 32);
  }
  pdl_wait();  // x is written by the kernel before this one
  for (; kb + kW4Chunk <= kb1; kb += kW4Chunk) {
    uint4 nxt[kW4Chunk];
    const bool more = kb + 2 * kW4Chunk <= kb1;
    wp += kW4Chunk * 32;
#pragma unroll
    for (int i = 0; i < kW4Chunk; ++i) nxt[i] = more ? __ldg(wp + i * 32) : uint4{};
#pragma unroll
    for (int i = 0; i < kW4Chunk; ++i) kblock(cur[i], kb + i);
#pragma unroll
    for (int i = 0; i < kW4Chunk; ++i) cur[i] = nxt[i];
  }
  for (; kb < kb1; ++kb, wp += 32) kblock(__ldg(wp), kb);
  // a group split between this warp and the next: scale this warp's part of it (the next warp
  // scales its own part by the same group scale when the group ends)
  const int kend = kb1 * kW4KBlock;
  if (kb1 > kb0 && (kend & ((1 << p.group_shift) - 1)) != 0) flush_group(kend >> p.group_shift);
#pragma unroll
  for (int e = 0; e < 4; ++e) partial[warp][e][lane] = acc[e];
  __syncthreads();
  // thread (e, lane) of the first 4 warps adds element e of `lane` over the warps and stores it:
  // element e is output (row r + 8 (e >> 1), column m = 2t + (e & 1)) of that lane
  if (threadIdx.x < 128) {
    const int e = threadIdx.x >> 5, l = threadIdx.x & 31;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][e][l];
    const int row = tile * 16 + (l >> 2) + 8 * (e >> 1), m = 2 * (l & 3) + (e & 1);
    if (row < p.N && m < p.M) {
      if (p.bias != nullptr) v += p.bias[row];
      p.y[static_cast<int64_t>(m) * p.ldy + row] = __float2half_rn(v);
    }
  }
}

template <int kWarps>
cudaError_t launch_w4a16_gemv(const W4GemvArgs& a, int tiles, cudaStream_t stream) {
  return a.group_shift == 5
             ? launch_pdl(w4a16_gemv_mma_kernel<kWarps, true>, static_cast<unsigned>(tiles), 32 * kWarps, 0, stream, a)
             : launch_pdl(w4a16_gemv_mma_kernel<kWarps, false>, static_cast<unsigned>(tiles), 32 * kWarps, 0, stream, a);
}

}  // namespace
}  // namespace essm

extern "C" cudaError_t essm_w4a16_gemv_mma(const void* x, int64_t ldx, const void* rw, const float* scale,
                                           const float* bias, void* y, int64_t ldy, int M, int N, int K,
                                           int group, cudaStream_t stream) {
  using namespace essm;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 4 == 0 && ldx % 2 == 0 && aligned16(rw);
  if (x == nullptr || rw == nullptr || scale == nullptr || y == nullptr || !aligned || M < 1 || M > 8 ||
      N < 1 || K < kW4KBlock || K % kW4KBlock != 0 || group < 32 || (group & (group - 1)) != 0 || K % group != 0 ||
      (M > 1 && (ldx < K || ldy < N)))
    return cudaErrorInvalidValue;
  const int tiles = (N + 15) / 16;
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  const W4GemvArgs a{static_cast<const __half*>(x), static_cast<const uint4*>(rw), scale, bias,
                     static_cast<__half*>(y), ldx, ldy, M, N, K, __builtin_ctz(static_cast<unsigned>(group))};
  // 4 warps per tile where the tiles alone give every SM two blocks, else 8 (more loads in flight
  // for the small layers)
  return tiles >= 2 * sms ? launch_w4a16_gemv<4>(a, tiles, stream) : launch_w4a16_gemv<8>(a, tiles, stream);
}
