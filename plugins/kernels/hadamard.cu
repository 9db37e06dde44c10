// Hadamard transform y = scale * (had_m (x) H_{2^k}) x along the last axis, n = m * 2^k, with an
// optional fused symmetric int8 quantization of the output.
//
// Element i = a*2^k + b of a row: the Sylvester factor acts along b for each a (a Walsh-Hadamard
// transform over the k low index bits), the base matrix along a for each b. A block transforms a
// tile of `rows` consecutive rows (one row for n >= 128 * E, more for small n so that a block has
// >= 128 threads); "flat" below is the index within the tile, whose k low bits are b.
//
// Every butterfly runs in registers. A pass gives each thread items of E elements whose flat
// indices differ exactly in log2(E) "register bits", does the butterflies of those bits that are
// still to do, and hands the elements to the next pass through shared memory (f32, one float2
// write and read per element pair and pass, one barrier: a pass writes back to the words it read).
// The first pass loads from global memory: register bits 0-2 (runs of 8 consecutive elements,
// 16-byte loads for f16) and e - 3 more, E = 2^e = 32 or 64. Later passes keep bit 0 and take up
// to e - 1 new bits. 13 bits cost 5 + 4 + 4 with E = 32, 15 bits 6 + 5 + 4 with E = 64: two
// shared-memory sweeps (the previous design, 4-bit register transforms, needed four).
// For m = 1 the last pass stores pairs of consecutive outputs. For m > 1 a base-matrix pass
// follows: each thread reads X[a, b] for all a and 1-4 values of b (the last 0-2 Sylvester bits,
// done there), multiplies by had_m (rows read as 16-byte shared-memory broadcasts) and stores.
// No warp shuffles: a shuffle butterfly moves 4 bytes per element and bit through the same
// crossbar that a shared-memory sweep uses to move 8 bytes per element for 4-5 bits at once.
#include <algorithm>

#include "common.cuh"

namespace essm {
namespace {

constexpr int kMaxN = 32768;
constexpr int kMaxThreads = 512;
constexpr int kMinThreads = 128;  // rows per block for small n: at least this many threads
// Shared memory per block above which only one block fits on an SM (H100: 227 KiB per SM).
constexpr size_t kTwoBlockSmem = 113 * 1024;
constexpr int kRegistersPerSm = 65536;  // H100 and Orin

// Register bits of a pass. First pass: flat bits [0, 3) and [hi, hi + bits), bits = e - 3. Later
// passes: flat bit 0 and [hi, hi + bits), items of E = 2^(bits + 1) elements; they do exactly the
// butterflies of [hi, hi + bits) (bit 0 was done in the first pass), so that their code is
// straight-line for a compile-time E (with a runtime bit test, the compiler merges each stage's
// results back with moves), and a pass with fewer bits runs more, smaller items per thread.
// bytes[j]: shared-memory byte offset of register pair (2j, 2j + 1) from the item's (swizzled),
// computed on the host, so that an address is one XOR with a constant-bank operand.
struct HadPass {
  int hi;
  int bits;
  int bytes[32];
};

// first loads from global memory (and stores the output when it is the only pass: m = 1, n <= E);
// mid is an optional shared-memory pass; last (m = 1) stores the output. m > 1 ends with the
// base-matrix pass instead of `last`.
struct HadPlan {
  int e;         // log2 of the elements per item in the first pass
  int rows;      // rows per block, a power of two
  int threads;   // per block; each loops over the items of a pass
  int npass;     // Sylvester passes
  int final_lo;  // m > 1: the base-matrix pass does the b bits [final_lo, k) in registers
  HadPass first, mid, last;
};

constexpr int log2_of(int v) { return v <= 1 ? 0 : 1 + log2_of(v / 2); }

// log2 of the most b values per thread in the base-matrix pass (its registers hold m of each):
// at most 48, 40, 56 and 40 values for m = 12, 20, 28, 40.
__host__ __device__ constexpr int final_bits(int m) { return m == 12 ? 2 : m == 40 ? 0 : 1; }

// Shared-memory word of flat index f. A float2 access is conflict-free when the flat bits that the
// 16 lanes of each half-warp vary map to independent bank bits 1-4: flat bits 1-4 map to
// themselves, and the swizzle XORs bits 5-8 onto bits 1-4 and bit 9 onto bits 1 and 3. The lanes
// of the passes here vary flat bits {3,4,5,6} (first of three passes), {5,6,7,8} or {6,7,8,9}
// (other first passes), {1,2,7,8} or {1,2,8,9} (middle pass) or {1,2,3,4}; each set comes out
// independent, as do bits 0-4 for the base-matrix pass's 4-byte reads. Bits >= 5 are unchanged, so
// the tile (a multiple of 32 words) maps onto itself, and the swizzle is linear over XOR: a
// register's word is the item's word XOR the register offset's.
__host__ __device__ constexpr int swizzle(int f) {
  return f ^ (((f >> 5) & 15) << 1) ^ (((f >> 9) & 1) * 0xA);
}

// Flat index of register 0 of item w: w's bits fill, lowest first, the flat bits outside the
// register bits [0, lo) and [hi, hi + bits). The lowest five are the lanes of a warp.
__device__ __forceinline__ int item_base(int w, int lo, int hi, int bits) {
  const int u = w << lo;
  return (u & ((1 << hi) - 1)) | ((u >> hi) << (hi + bits));
}

// Register pair j of the item whose register 0 is at flat index base.
__device__ __forceinline__ float2* pair_at(float* s, int base, const HadPass& p, int j) {
  return reinterpret_cast<float2*>(reinterpret_cast<char*>(s) + ((swizzle(base) * 4) ^ p.bytes[j]));
}

template <int E>
__device__ __forceinline__ void write_item(float* s, const HadPass& p, int base,
                                           const float (&v)[E]) {
#pragma unroll
  for (int j = 0; j < E / 2; ++j) *pair_at(s, base, p, j) = make_float2(v[2 * j], v[2 * j + 1]);
}

// Butterfly u + w, u - w between registers r and r + h for every r without bit h.
template <int E>
__device__ __forceinline__ void butterfly(float (&v)[E], int h) {
#pragma unroll
  for (int r = 0; r < E; ++r) {
    if ((r & h) == 0) {
      const float u = v[r], w = v[r + h];
      v[r] = u + w;
      v[r + h] = u - w;
    }
  }
}

// Butterflies over the register bits [FROM, TO) (in any order: they commute).
template <int FROM, int TO, int E>
__device__ __forceinline__ void butterflies(float (&v)[E]) {
#pragma unroll
  for (int h = 1 << FROM; h < (1 << TO); h <<= 1) butterfly(v, h);
}

// Calls f(std::integral_constant<int, b>{}) for the runtime value LO <= b <= HI.
template <int LO, int HI, typename F>
__device__ __forceinline__ void with_constant(int b, F&& f) {
  if constexpr (LO <= HI) {
    if (b == LO)
      f(std::integral_constant<int, LO>{});
    else
      with_constant<LO + 1, HI>(b, f);
  }
}

// Output element of the scaled value v = acc * scale. int8 outputs are
// from_float<int8_t>(v / out_scale), as in the reference (ties included), through
// quantize_int8_div: a multiply by inv_scale = quantize_int8_inv(out_scale) (computed on the
// host), and the true division only for the ~1e-4 of values near a half-integer.
template <typename Tout>
__device__ __forceinline__ Tout out_value(float v, float out_scale, float inv_scale) {
  if constexpr (std::is_same<Tout, int8_t>::value) {
    return quantize_int8_div(v, out_scale, inv_scale);
  } else {
    return from_float<Tout>(v);
  }
}

// Global-memory side of a pass: RUNS runs of N consecutive elements, run c at flat
// base + (c << hi), registers N*c + j. When the whole item exists and the pointer is aligned, the
// runs move as wide words with no per-run check, so that all of an item's loads are issued before
// the first use; otherwise (partial last tile, unaligned rows) load_run / store_run check each run.
template <typename T, int N>
using RunWord = VecWord<static_cast<int>(sizeof(T)) * N>;

template <typename T, int N, int RUNS>
__device__ __forceinline__ bool whole_item(const T* p, int base, int hi, int valid) {
  return reinterpret_cast<uintptr_t>(p) % sizeof(RunWord<T, N>) == 0 &&
         base + ((RUNS - 1) << hi) + N <= valid;
}

template <typename Tin, int N, int RUNS>
__device__ __forceinline__ void load_item(const Tin* __restrict__ x, int base, int hi, int valid,
                                          float (&v)[N * RUNS]) {
  using W = RunWord<Tin, N>;
  constexpr int kWords = static_cast<int>(sizeof(Tin)) * N / static_cast<int>(sizeof(W));
  Tin e[RUNS][N];
  if (whole_item<Tin, N, RUNS>(x, base, hi, valid)) {
#pragma unroll
    for (int c = 0; c < RUNS; ++c) {
      W w[kWords];
#pragma unroll
      for (int k = 0; k < kWords; ++k)
        w[k] = __ldg(reinterpret_cast<const W*>(x + base + (c << hi)) + k);
      memcpy(e[c], w, sizeof(w));
    }
  } else {
#pragma unroll
    for (int c = 0; c < RUNS; ++c)
      fetch_run<Tin, N>(x + base + (c << hi), valid - base - (c << hi), e[c]);
  }
#pragma unroll
  for (int c = 0; c < RUNS; ++c)
#pragma unroll
    for (int j = 0; j < N; ++j) v[N * c + j] = to_float(e[c][j]);
}

template <typename Tout, int N, int RUNS>
__device__ __forceinline__ void store_item(Tout* __restrict__ y, int base, int hi, int valid,
                                           const float (&v)[N * RUNS], float scale,
                                           float out_scale, float inv_scale) {
  using W = RunWord<Tout, N>;
  constexpr int kWords = static_cast<int>(sizeof(Tout)) * N / static_cast<int>(sizeof(W));
  // int8 values are quantized once, before the two store paths (the compiler would otherwise
  // duplicate the quantization into both); float outputs convert in each path
  constexpr bool kInt8 = std::is_same<Tout, int8_t>::value;
  float t[RUNS][N];
  Tout q[RUNS][N];
#pragma unroll
  for (int c = 0; c < RUNS; ++c)
#pragma unroll
    for (int j = 0; j < N; ++j) {
      t[c][j] = v[N * c + j] * scale;
      if constexpr (kInt8) q[c][j] = out_value<Tout>(t[c][j], out_scale, inv_scale);
    }
  if (whole_item<Tout, N, RUNS>(y, base, hi, valid)) {
#pragma unroll
    for (int c = 0; c < RUNS; ++c) {
      Tout e[N];
#pragma unroll
      for (int j = 0; j < N; ++j) {
        if constexpr (kInt8) {
          e[j] = q[c][j];
        } else {
          e[j] = from_float<Tout>(t[c][j]);
        }
      }
      W w[kWords];
      memcpy(w, e, sizeof(w));
#pragma unroll
      for (int k = 0; k < kWords; ++k) reinterpret_cast<W*>(y + base + (c << hi))[k] = w[k];
    }
  } else {
#pragma unroll
    for (int c = 0; c < RUNS; ++c) {
      if constexpr (kInt8) {
        put_run<Tout, N>(y + base + (c << hi), valid - base - (c << hi), q[c]);
      } else {
        store_run<Tout, N>(y + base + (c << hi), valid - base - (c << hi), t[c]);
      }
    }
  }
}

// First pass: register 8c + j holds flat base + (c << hi) + j. Loads (zeros past the `valid`
// elements of a partial last tile), does the butterflies of the register bits below k (all of
// them unless the rows are shorter than E), then shared memory, or the output when this is the
// only pass (TO_OUTPUT: m = 1, n <= E).
template <typename Tin, typename Tout, int E, bool TO_OUTPUT>
__device__ __forceinline__ void first_pass(const Tin* __restrict__ x, Tout* __restrict__ y,
                                           float* s, const HadPass& p, int logk, int tile,
                                           int valid, float scale, float out_scale,
                                           float inv_scale) {
  for (int w = threadIdx.x; w < tile / E; w += blockDim.x) {
    const int base = item_base(w, 3, p.hi, p.bits);
    float v[E];
    load_item<Tin, 8, E / 8>(x, base, p.hi, valid, v);
    with_constant<0, log2_of(E)>(min(logk, log2_of(E)),
                                 [&](auto bits) { butterflies<0, bits()>(v); });
    if constexpr (TO_OUTPUT) {
      store_item<Tout, 8, E / 8>(y, base, p.hi, valid, v, scale, out_scale, inv_scale);
    } else {
      write_item(s, p, base, v);
    }
  }
}

// Registers 2j, 2j + 1 of a later pass's item hold flat base + (j << hi) + {0, 1}: reads them from
// shared memory and does the pass's butterflies. Returns the item's flat base.
template <int E>
__device__ __forceinline__ int read_item(float* s, const HadPass& p, int w, float (&v)[E]) {
  const int base = item_base(w, 1, p.hi, p.bits);
#pragma unroll
  for (int j = 0; j < E / 2; ++j) {
    const float2 t = *pair_at(s, base, p, j);
    v[2 * j] = t.x;
    v[2 * j + 1] = t.y;
  }
  butterflies<1, log2_of(E)>(v);
  return base;
}

// Middle pass: back to the words it read, so that the next pass needs only one barrier.
template <int E>
__device__ __forceinline__ void middle_pass(float* s, const HadPass& p, int tile) {
  for (int w = threadIdx.x; w < tile / E; w += blockDim.x) {
    float v[E];
    const int base = read_item(s, p, w, v);
    write_item(s, p, base, v);
  }
}

// Last pass of m = 1: stores the output pairs.
template <typename Tout, int E>
__device__ __forceinline__ void output_pass(float* s, Tout* __restrict__ y, const HadPass& p,
                                            int tile, int valid, float scale, float out_scale,
                                            float inv_scale) {
  for (int w = threadIdx.x; w < tile / E; w += blockDim.x) {
    float v[E];
    const int base = read_item(s, p, w, v);
    store_item<Tout, 2, E / 2>(y, base, p.hi, valid, v, scale, out_scale, inv_scale);
  }
}

// Base-matrix pass (m > 1): item (row r, b with bits [fl, k) clear) holds X[a, b + (j << fl)] for
// every a and j < J = 2^(k - fl), does the Sylvester bits [fl, k), then
// y[a', .] = sum_a had_m[a', a] X[a, .]. A warp's lanes take consecutive b: conflict-free shared
// reads, contiguous stores.
template <typename Tout, int M, int J>
__device__ __forceinline__ void base_matrix_pass(const float* s, const float* hm,
                                                 Tout* __restrict__ y, int logk, int fl, int nrows,
                                                 float scale, float out_scale, float inv_scale) {
  for (int w = threadIdx.x; w < (nrows << fl); w += blockDim.x) {
    const int r = w >> fl;
    const int b = w & ((1 << fl) - 1);
    float v[M][J];
#pragma unroll
    for (int a = 0; a < M; ++a) {
      const int sa = swizzle((r * M + a) << logk);
#pragma unroll
      for (int j = 0; j < J; ++j) v[a][j] = s[sa ^ swizzle(b + (j << fl))];
    }
#pragma unroll
    for (int a = 0; a < M; ++a) butterflies<0, log2_of(J)>(v[a]);
    // A rows of had_m at a time: A * J >= 2 independent FMA chains
    constexpr int A = J >= 2 ? 1 : 2;
#pragma unroll 1
    for (int a0 = 0; a0 < M; a0 += A) {
      float acc[A][J];
#pragma unroll
      for (int i = 0; i < A; ++i)
#pragma unroll
        for (int j = 0; j < J; ++j) acc[i][j] = 0.f;
#pragma unroll
      for (int a4 = 0; a4 < M / 4; ++a4) {
#pragma unroll
        for (int i = 0; i < A; ++i) {
          // had_m rows as 16-byte broadcasts (M is a multiple of 4; hm starts 16-byte aligned)
          const float4 h = reinterpret_cast<const float4*>(hm + (a0 + i) * M)[a4];
#pragma unroll
          for (int j = 0; j < J; ++j) {
            acc[i][j] = fmaf(h.x, v[4 * a4][j], acc[i][j]);
            acc[i][j] = fmaf(h.y, v[4 * a4 + 1][j], acc[i][j]);
            acc[i][j] = fmaf(h.z, v[4 * a4 + 2][j], acc[i][j]);
            acc[i][j] = fmaf(h.w, v[4 * a4 + 3][j], acc[i][j]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < A; ++i) {
        Tout* yr = y + ((r * M + a0 + i) << logk) + b;
#pragma unroll
        for (int j = 0; j < J; ++j)
          yr[j << fl] = out_value<Tout>(acc[i][j] * scale, out_scale, inv_scale);
      }
    }
  }
}

// Register cap per thread: the fewest without spills for every dtype pair (ptxas -v). The
// base-matrix pass of m = 12 and 28 holds 48 and 56 values; E = 64 holds 64 plus butterfly
// temporaries.
__host__ __device__ constexpr int max_registers(int m, int e) {
  return e == 6 ? 120 : (m == 12 || m == 28) ? 80 : 72;
}

template <typename Tin, typename Tout, int M, int E>
__global__ void __launch_bounds__(kMaxThreads) __maxnreg__(max_registers(M, log2_of(E)))
    hadamard_kernel(const Tin* __restrict__ x, const float* __restrict__ had_m, HadPlan plan,
                    int logk, float scale, float out_scale, Tout* __restrict__ y, int64_t rows,
                    float inv_scale) {
  extern __shared__ __align__(16) float s[];
  const int n = M << logk;
  const int tile = plan.rows * n;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * plan.rows;
  const int nrows = static_cast<int>(min(static_cast<int64_t>(plan.rows), rows - row0));
  const int valid = nrows * n;
  x += row0 * n;
  y += row0 * n;

  if (M == 1 && plan.npass == 1) {
    first_pass<Tin, Tout, E, true>(x, y, s, plan.first, logk, tile, valid, scale, out_scale,
                                   inv_scale);
    return;
  }
  first_pass<Tin, Tout, E, false>(x, y, s, plan.first, logk, tile, valid, scale, out_scale,
                                  inv_scale);
  float* hm = s + tile;
  if (M > 1)
    for (int i = threadIdx.x; i < M * M; i += blockDim.x) hm[i] = had_m[i];
  __syncthreads();
  if (plan.npass == (M == 1 ? 3 : 2)) {
    with_constant<1, log2_of(E) - 1>(plan.mid.bits, [&](auto bits) {
      middle_pass<2 << bits()>(s, plan.mid, tile);
    });
    __syncthreads();
  }
  if constexpr (M == 1) {
    with_constant<1, log2_of(E) - 1>(plan.last.bits, [&](auto bits) {
      output_pass<Tout, 2 << bits()>(s, y, plan.last, tile, valid, scale, out_scale, inv_scale);
    });
  } else {
    with_constant<0, final_bits(M)>(logk - plan.final_lo, [&](auto bits) {
      base_matrix_pass<Tout, M, 1 << bits()>(s, hm, y, logk, plan.final_lo, nrows, scale,
                                             out_scale, inv_scale);
    });
  }
}

// Shared memory of a block: the tile (f32) and had_m.
size_t smem_bytes(int m, int tile) {
  return sizeof(float) * (static_cast<size_t>(tile) + (m > 1 ? m * m : 0));
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

// A pass whose lo low register bits are flat bits [0, lo) and the other `bits` flat bits
// [hi, hi + bits).
HadPass make_pass(int lo, int hi, int bits) {
  HadPass p{};
  p.hi = hi;
  p.bits = bits;
  for (int j = 0; j < (1 << (lo + bits - 1)); ++j) {
    const int r = 2 * j;
    p.bytes[j] = swizzle((r & ((1 << lo) - 1)) | ((r >> lo) << hi)) * 4;
  }
  return p;
}

// The passes with 2^e elements per first-pass item; false where that needs more passes than the
// plan holds.
bool plan_passes(int m, int logk, int e, HadPlan* plan) {
  const int n = m << logk;
  HadPlan p{};
  p.e = e;
  p.rows = 1;
  while ((p.rows * n >> e) < kMinThreads) p.rows <<= 1;
  // One thread per first-pass item, or half, a quarter (the threads loop over the items): at most
  // kMaxThreads, and where the shared memory of two blocks fits on an SM, at most half an SM's
  // registers, so that two blocks do fit (m = 40, n = 20480: 320 threads, two items each).
  const size_t smem = smem_bytes(m, p.rows * n);
  p.threads = p.rows * n >> e;
  while (p.threads > kMaxThreads ||
         (smem <= kTwoBlockSmem && 2 * p.threads * max_registers(m, e) > kRegistersPerSm))
    p.threads /= 2;
  // The first pass takes flat bits [0, 3) and [hi, hi + e - 3). Where three passes are needed
  // (m = 1, k > 2e - 1), the top bits of b: a warp's loads are then 512 contiguous bytes for f16,
  // and the middle pass takes bits [3, e + 2). Otherwise bits [3, e), which leaves the top bits of
  // b to the last pass, whose warps then store contiguous runs (and whose lanes then vary flat
  // bits {1,2,3,4}: no bank conflicts).
  const int hi0 = m == 1 && logk > 2 * e - 1 ? logk - (e - 3) : 3;
  p.first = make_pass(3, hi0, e - 3);
  // Bits still to do: [lo, todo). Later passes take them in order, e - 1 at a time, except the
  // top final_bits, which the base-matrix pass does.
  int lo = hi0 == 3 ? e : 3;
  const int todo = hi0 == 3 ? logk : hi0;
  const int end = todo - (m == 1 ? 0 : std::min(final_bits(m), std::max(0, todo - lo)));
  HadPass later[2];
  int nlater = 0;
  for (; lo < end; ++nlater) {
    if (nlater == 2 || (m > 1 && nlater == 1)) return false;
    const int take = std::min(e - 1, end - lo);
    later[nlater] = make_pass(1, lo, take);
    lo += take;
  }
  p.npass = 1 + nlater;
  p.final_lo = std::min(lo, logk);
  if (m == 1 && nlater == 2) p.mid = later[0];
  if (m > 1 && nlater == 1) p.mid = later[0];
  if (m == 1 && nlater > 0) p.last = later[nlater - 1];
  *plan = p;
  return true;
}

// Shared-memory sweeps (and barriers) of a plan.
int sweeps(const HadPlan& p, int m) { return p.npass - 1 + (m > 1 ? 1 : 0); }

// The plan with the fewest sweeps; on a tie E = 32 (fewer registers, more threads).
HadPlan make_plan(int m, int logk) {
  HadPlan best{};
  bool found = false;
  for (int e = 5; e <= 6; ++e) {
    HadPlan p{};
    if (plan_passes(m, logk, e, &p) && (!found || sweeps(p, m) < sweeps(best, m))) {
      best = p;
      found = true;
    }
  }
  return best;
}

template <typename Tin, typename Tout, int M, int E>
cudaError_t launch_plan(const void* x, const float* had_m, const HadPlan& plan, int logk,
                        float scale, float out_scale, void* y, int64_t rows, cudaStream_t stream) {
  const int tile = plan.rows * (M << logk);
  const bool single = M == 1 && plan.npass == 1;
  const size_t smem = single ? 0 : smem_bytes(M, tile);
  auto kernel = hadamard_kernel<Tin, Tout, M, E>;
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
  const int64_t blocks = (rows + plan.rows - 1) / plan.rows;
  // int8: the fast path's 1/out_scale, once per launch (NaN, i.e. always divide, for scales
  // outside the range quantize_int8_div's argument covers)
  const float inv_scale = std::is_same<Tout, int8_t>::value ? quantize_int8_inv(out_scale) : 0.f;
  kernel<<<static_cast<unsigned>(blocks), plan.threads, smem, stream>>>(
      static_cast<const Tin*>(x), had_m, plan, logk, scale, out_scale, static_cast<Tout*>(y), rows,
      inv_scale);
  return launch_status();
}

template <typename Tin, typename Tout, int M>
cudaError_t launch_hadamard_m(const void* x, const float* had_m, int logk, float scale,
                              float out_scale, void* y, int64_t rows, cudaStream_t stream) {
  const HadPlan plan = make_plan(M, logk);
  if (plan.e == 5)
    return launch_plan<Tin, Tout, M, 32>(x, had_m, plan, logk, scale, out_scale, y, rows, stream);
  return launch_plan<Tin, Tout, M, 64>(x, had_m, plan, logk, scale, out_scale, y, rows, stream);
}

template <typename Tin, typename Tout>
cudaError_t launch_hadamard(const void* x, const float* had_m, int m, int logk, float scale,
                            float out_scale, void* y, int64_t rows, cudaStream_t stream) {
  switch (m) {
    case 1: return launch_hadamard_m<Tin, Tout, 1>(x, had_m, logk, scale, out_scale, y, rows, stream);
    case 12: return launch_hadamard_m<Tin, Tout, 12>(x, had_m, logk, scale, out_scale, y, rows, stream);
    case 20: return launch_hadamard_m<Tin, Tout, 20>(x, had_m, logk, scale, out_scale, y, rows, stream);
    case 28: return launch_hadamard_m<Tin, Tout, 28>(x, had_m, logk, scale, out_scale, y, rows, stream);
    case 40: return launch_hadamard_m<Tin, Tout, 40>(x, had_m, logk, scale, out_scale, y, rows, stream);
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
      return launch_hadamard<Tin, int8_t>(x, had_m, m, logk, scale, out_scale, y, rows, stream);
    if (out_dtype != in_dtype) return cudaErrorInvalidValue;
    return launch_hadamard<Tin, Tin>(x, had_m, m, logk, scale, out_scale, y, rows, stream);
  });
}
