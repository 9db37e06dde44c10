// Mamba-2 SSD scan (prefill) and state update (decode), token-major layout, float and int8 x/B/C.
//
// Prefill has three forms (see docs/kernels.md):
// - chunked with register-resident phases (16-bit outputs, dstate <= 128): ssd_mma_kernel below;
//   where a small batch leaves the GPU idle, each sequence is split over several blocks through a
//   workspace (SegSplit).
// - chunked, on tensor cores through WMMA (16-bit outputs, dstate > 128; forced variants for the
//   harness and benchmarks): each block walks the sequence of one (batch, head,
//   32-column headdim tile) in chunks of 64 tokens, keeping the chunk-start state in shared memory.
//   Per chunk, with cum = the inclusive cumsum of dt*A inside the chunk:
//     y     = ((C B^T) o exp(cum_t - cum_s) dt_s [s <= t]) x + exp(cum_t) C S + D x
//     S_end = exp(cum_end) S + B^T (x dt exp(cum_end - cum_t))
//   as WMMA products with fp32 accumulation. Output-only operands (the masked C B^T matrix, the
//   state copy for C S) are rounded to the 16-bit type; the state update keeps fp32 accuracy (its
//   scaled x operand is split into a 16-bit high and low part, two products), so final states
//   match the direct form to ~1e-6.
// - direct (float32 outputs, which ask for float32 accuracy): the recurrence run token by token.
//   One block owns one (batch, head) and a tile of kSsdRows headdim rows; thread (row p, state
//   group g) keeps the 16 states n in [16g, 16g+16) of row p in registers. The block stages a
//   tile of tokens of B and C (dequantized, float) in shared memory; their global loads are
//   16-byte vectors issued one tile ahead (register double buffering) so their latency overlaps
//   the current tile's work. The per-group partial y sums are reduced through shared memory once
//   per tile.
#include <mma.h>

#include <algorithm>

#include "common.cuh"

namespace essm {
namespace {

constexpr int kSsdRows = 8;     // headdim rows per block
constexpr int kSsdStates = 16;  // states per thread
constexpr int kSsdMaxState = 256;

struct SsdArgs {
  const void* x;
  const void* dt;
  const float* A;
  const void* Bm;
  const void* Cm;
  const float* Dskip;
  const float* dt_bias;
  int dt_softplus;
  float dt_min, dt_max;
  const float* x_scale;  // [H*P] or NULL
  const float* B_scale;  // [G] or NULL
  const float* C_scale;  // [G] or NULL
  const float* initial_state;
  void* y;
  float* final_state;
  int batch, seqlen, nheads, headdim, ngroups, dstate;
};

__device__ __forceinline__ float ssd_dt(float raw, float bias, int use_softplus, float lo,
                                        float hi) {
  float v = raw + bias;
  if (use_softplus) v = softplus(v);
  return fminf(fmaxf(v, lo), hi);
}

// Per-(head, group) parameters of the SSD kernels (int8 group scales are 1 for float io).
struct SsdHead {
  float A, dt_bias, D, B_scale, C_scale;
  __device__ SsdHead(const SsdArgs& p, int h, int g)
      : A(p.A[h]),
        dt_bias(p.dt_bias != nullptr ? p.dt_bias[h] : 0.f),
        D(p.Dskip != nullptr ? p.Dskip[h] : 0.f),
        B_scale(p.B_scale != nullptr ? p.B_scale[g] : 1.f),
        C_scale(p.C_scale != nullptr ? p.C_scale[g] : 1.f) {}
};

// Tokens per staged tile: 16-byte vectors per thread per tensor = kSsdTile * sizeof(Tin) / 8.
template <typename Tin>
__host__ __device__ constexpr int ssd_tile() {
  return sizeof(Tin) == 4 ? 8 : 16;
}

// Shared memory (floats): B [T][N], C [T][N], x [T][rows], dt [T], decay [T],
// y partials [T][N/16][rows].
template <typename Tin>
size_t ssd_smem_bytes(int dstate) {
  const size_t T = ssd_tile<Tin>();
  const size_t groups = dstate / kSsdStates;
  return sizeof(float) * (2 * T * dstate + T * kSsdRows + 2 * T + T * groups * kSsdRows);
}

// Raw 16-byte words of one B/C tile that this thread moves: word w = tid + k * nthreads covers
// elements [8w*16/sizeof .. ) of the tile's [T][N] block (rows of N contiguous elements in memory).
template <typename Tin>
struct SsdTileWords {
  static constexpr int kElems = 16 / sizeof(Tin);
  static constexpr int kWords = ssd_tile<Tin>() * static_cast<int>(sizeof(Tin)) / 8;
  uint4 b[kWords], c[kWords];

  // Requires 16-byte aligned Bm/Cm (checked by the launcher) and N % 16 == 0.
  __device__ __forceinline__ void load(const Tin* Bm, const Tin* Cm, int64_t bc_base, int G, int N,
                                       int L, int t0, int nthreads) {
    const int words_per_row = N / kElems;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int w = static_cast<int>(threadIdx.x) + k * nthreads;
      const int t = w / words_per_row, col = (w % words_per_row) * kElems;
      if (t0 + t < L) {
        const int64_t off = bc_base + static_cast<int64_t>(t0 + t) * G * N + col;
        b[k] = __ldg(reinterpret_cast<const uint4*>(Bm + off));
        c[k] = __ldg(reinterpret_cast<const uint4*>(Cm + off));
      } else {
        b[k] = make_uint4(0, 0, 0, 0);
        c[k] = make_uint4(0, 0, 0, 0);
      }
    }
  }

  __device__ __forceinline__ void store(float* Bs, float* Cs, int N, float Bsc, float Csc,
                                        int nthreads) const {
    const int words_per_row = N / kElems;
#pragma unroll
    for (int k = 0; k < kWords; ++k) {
      const int w = static_cast<int>(threadIdx.x) + k * nthreads;
      const int t = w / words_per_row, col = (w % words_per_row) * kElems;
      Tin eb[kElems], ec[kElems];
      memcpy(eb, &b[k], 16);
      memcpy(ec, &c[k], 16);
#pragma unroll
      for (int i = 0; i < kElems; ++i) {
        Bs[t * N + col + i] = dequant(eb[i], Bsc);
        Cs[t * N + col + i] = dequant(ec[i], Csc);
      }
    }
  }
};

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kSsdMaxState / kSsdStates * kSsdRows)
    ssd_scan_fwd_kernel(const SsdArgs p, int ptiles) {
  extern __shared__ __align__(16) float sm[];
  constexpr int T = ssd_tile<Tin>();
  const int N = p.dstate, L = p.seqlen, H = p.nheads, P = p.headdim, G = p.ngroups;
  const int ngroups_n = N / kSsdStates;
  const int nthreads = ngroups_n * kSsdRows;
  const int ptile = blockIdx.x % ptiles;
  const int bh = blockIdx.x / ptiles;
  const int h = bh % H, b = bh / H;
  const int g = h / (H / G);
  const int p0 = ptile * kSsdRows;
  const int tid = threadIdx.x;
  const int pl = tid % kSsdRows, sg = tid / kSsdRows;
  const int prow = p0 + pl;
  const bool prow_ok = prow < P;
  const int n0 = sg * kSsdStates;

  float* Bs = sm;
  float* Cs = Bs + T * N;
  float* xs = Cs + T * N;
  float* dts = xs + T * kSsdRows;
  float* decays = dts + T;
  float* ys = decays + T;

  const SsdHead hp(p, h, g);
  const float Ah = hp.A, bias = hp.dt_bias, Dh = hp.D, Bsc = hp.B_scale, Csc = hp.C_scale;
  const Tin* x = static_cast<const Tin*>(p.x);
  const Tout* dtp = static_cast<const Tout*>(p.dt);
  const Tin* Bm = static_cast<const Tin*>(p.Bm);
  const Tin* Cm = static_cast<const Tin*>(p.Cm);
  Tout* y = static_cast<Tout*>(p.y);
  const int64_t bc_base = (static_cast<int64_t>(b) * L * G + g) * N;  // token 0 of (b, g)

  const int64_t state_row = ((static_cast<int64_t>(b) * H + h) * P + (prow_ok ? prow : 0)) * N;
  float S[kSsdStates];
#pragma unroll
  for (int k = 0; k < kSsdStates; ++k)
    S[k] = (p.initial_state != nullptr && prow_ok) ? p.initial_state[state_row + n0 + k] : 0.f;

  SsdTileWords<Tin> words;
  words.load(Bm, Cm, bc_base, G, N, L, 0, nthreads);
  for (int t0 = 0; t0 < L; t0 += T) {
    // ---- stage this tile (padding tokens: dt = 0, decay = 1, x = 0 make an identity step)
    words.store(Bs, Cs, N, Bsc, Csc, nthreads);
    if (t0 + T < L) words.load(Bm, Cm, bc_base, G, N, L, t0 + T, nthreads);  // next tile, in flight
    for (int idx = tid; idx < T * kSsdRows; idx += nthreads) {
      const int t = idx / kSsdRows, pp = p0 + idx % kSsdRows, tg = t0 + t;
      const int64_t off = ((static_cast<int64_t>(b) * L + tg) * H + h) * P + pp;
      xs[idx] = (tg < L && pp < P)
                    ? load1(x + off, p.x_scale != nullptr ? p.x_scale[h * P + pp] : 1.f)
                    : 0.f;
    }
    for (int t = tid; t < T; t += nthreads) {
      const int tg = t0 + t;
      float d = 0.f;
      if (tg < L) {
        const float raw = to_float(dtp[(static_cast<int64_t>(b) * L + tg) * H + h]);
        d = ssd_dt(raw, bias, p.dt_softplus, p.dt_min, p.dt_max);
      }
      dts[t] = d;
      decays[t] = expf(d * Ah);
    }
    __syncthreads();

    // ---- recurrence over the tile
#pragma unroll 4
    for (int t = 0; t < T; ++t) {
      const float a = decays[t];
      const float dtx = dts[t] * xs[t * kSsdRows + pl];
      const float4* B4 = reinterpret_cast<const float4*>(Bs + t * N + n0);
      const float4* C4 = reinterpret_cast<const float4*>(Cs + t * N + n0);
      float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
      for (int q = 0; q < kSsdStates / 4; ++q) {
        const float4 bb = B4[q], cc = C4[q];
        S[4 * q + 0] = fmaf(a, S[4 * q + 0], dtx * bb.x);
        S[4 * q + 1] = fmaf(a, S[4 * q + 1], dtx * bb.y);
        S[4 * q + 2] = fmaf(a, S[4 * q + 2], dtx * bb.z);
        S[4 * q + 3] = fmaf(a, S[4 * q + 3], dtx * bb.w);
        acc0 = fmaf(S[4 * q + 0], cc.x, acc0);
        acc1 = fmaf(S[4 * q + 1], cc.y, acc1);
        acc0 = fmaf(S[4 * q + 2], cc.z, acc0);
        acc1 = fmaf(S[4 * q + 3], cc.w, acc1);
      }
      ys[(t * ngroups_n + sg) * kSsdRows + pl] = acc0 + acc1;
    }
    __syncthreads();

    // ---- reduce the per-group partials, add the D skip, store
    for (int idx = tid; idx < T * kSsdRows; idx += nthreads) {
      const int t = idx / kSsdRows, pq = idx % kSsdRows, tg = t0 + t, pp = p0 + pq;
      if (tg >= L || pp >= P) continue;
      float acc = Dh * xs[idx];
      for (int w = 0; w < ngroups_n; ++w) acc += ys[(t * ngroups_n + w) * kSsdRows + pq];
      y[((static_cast<int64_t>(b) * L + tg) * H + h) * P + pp] = from_float<Tout>(acc);
    }
    __syncthreads();  // the next tile overwrites the staged tensors
  }
  if (p.final_state != nullptr && prow_ok) {
#pragma unroll
    for (int k = 0; k < kSsdStates; ++k) p.final_state[state_row + n0 + k] = S[k];
  }
}

// ---- chunked form on tensor cores ------------------------------------------------------------
constexpr int kChunk = 64;    // tokens per chunk
constexpr int kColTile = 32;  // headdim columns per block
constexpr int kWm = 16;       // WMMA tile edge (m16n16k16)
constexpr int kRowBlocks = kChunk / kWm, kColBlocks = kColTile / kWm;
constexpr int kYTiles = kRowBlocks * kColBlocks;  // 16x16 tiles of one chunk's y
// Warps per block: 8 (each owns one tile of Y1 = M x and of Y2 = C S) or 16 (one tile of Y1 or of
// Y2, and half the share of every other phase). A chunk is a chain of barrier-separated phases of a
// few WMMA products each, latency-bound when few warps are resident: where the grid leaves an SM
// with one 8-warp block (batch-1 prefill on an H100; every launch on Orin, whose 164 KiB per SM
// hold one block), 16 warps halve the chain; where two 8-warp blocks fit per SM, they interleave
// their barriers and stay.
constexpr int kChunkWarpChoices[] = {8, 16};
template <int kWarps>
constexpr bool chunk_warps_ok() {
  return (kWarps == kYTiles || kWarps == 2 * kYTiles) && (32 * kWarps) % kChunk == 0 &&
         (32 * kWarps) % kColTile == 0;  // elementwise phases give each thread a fixed column
}

// 16-bit operand type of the products: bf16 for bf16 inputs, fp16 otherwise (int8 is exact in it).
template <typename Tin>
using MmaType = typename std::conditional<std::is_same<Tin, __nv_bfloat16>::value, __nv_bfloat16,
                                          __half>::type;

// Shared-memory layout of the chunked kernel. Leading dimensions are padded by 16 bytes against
// bank conflicts; every region starts on a 128-byte boundary (WMMA and cp.async need 32 / 16).
// The raw tiles (C, B, x as stored in global memory) are the product operands when the input is
// already 16-bit; int8 inputs are converted into separate fp16 operand tiles.
struct ChunkSmem {
  int ldN, ldP, ldNr, ldPr, ldQ = kChunk + 8, ldPf = kColTile + 4, ldG = kChunk + 4;
  size_t Craw, Braw, xraw, C, B, x, xhi, xlo, M, G, S, Sh, vec, bytes;

  __host__ __device__ static size_t take(size_t& off, size_t n) {
    const size_t at = off;
    off += (n + 127) / 128 * 128;
    return at;
  }

  __host__ __device__ ChunkSmem(int N, int in_bytes)
      : ldN(N + 8), ldP(kColTile + 8), ldNr(N + 16 / in_bytes), ldPr(kColTile + 16 / in_bytes) {
    size_t off = 0;
    Craw = take(off, static_cast<size_t>(in_bytes) * kChunk * ldNr);
    Braw = take(off, static_cast<size_t>(in_bytes) * kChunk * ldNr);
    xraw = take(off, static_cast<size_t>(in_bytes) * kChunk * ldPr);
    if (in_bytes == 2) {
      C = Craw, B = Braw, x = xraw;
    } else {
      C = take(off, 2 * kChunk * ldN);
      B = take(off, 2 * kChunk * ldN);
      x = take(off, 2 * kChunk * ldP);
    }
    xhi = take(off, 2 * kChunk * ldP);
    xlo = take(off, 2 * kChunk * ldP);
    M = take(off, 2 * kChunk * ldQ);
    // G = C B^T (fp32) is dead once M is built; the two output products Y1, Y2 then reuse it.
    const size_t g_floats = kChunk * ldG, y_floats = 2 * kChunk * ldPf;
    G = take(off, 4 * (g_floats > y_floats ? g_floats : y_floats));
    S = take(off, 4 * static_cast<size_t>(N) * ldPf);
    Sh = take(off, 2 * static_cast<size_t>(N) * ldP);
    vec = take(off, 4 * 4 * kChunk);  // dt, cum, exp(cum), exp(cum_end - cum)
    bytes = off;
  }
};

__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(src_bytes));
}

// Copies the kChunk x width tile src[r * row_stride + c] (r < rows, c < cols; zero elsewhere) to
// dst[r * ld + c] in raw form: with `async`, as 16-byte cp.async copies (all in flight at once;
// the caller commits and waits), else with ordinary loads (any alignment). Consecutive threads
// take consecutive 16-byte words of the flattened tile: every lane of a warp issues a copy (a
// row-per-warp split left half the lanes idle at dstate 128 and was 20% slower end to end on an
// H100, docs/benchmarks.md).
template <typename Tin, int kThreads>
__device__ __forceinline__ void fetch_chunk_tile(Tin* dst, int ld, const Tin* src, int64_t row_stride,
                                                 int rows, int width, int cols, bool async) {
  constexpr int V = 16 / sizeof(Tin);
  const int per_row = width / V;
  for (int i = threadIdx.x; i < kChunk * per_row; i += kThreads) {
    const int r = i / per_row, c = (i % per_row) * V;
    const int valid = r < rows ? min(max(cols - c, 0), V) : 0;
    const Tin* from = valid > 0 ? src + r * row_stride + c : src;
    if (async) {
      cp_async16(dst + r * ld + c, from, valid * static_cast<int>(sizeof(Tin)));
    } else {
      Tin e[V];
      fetch_run<Tin, V>(from, valid, e);
      memcpy(dst + r * ld + c, e, 16);
    }
  }
}

// int8 raw tile -> fp16 operand tile (exact), 4 elements per step, rows by warp as above.
template <int kThreads>
__device__ __forceinline__ void widen_chunk_tile(__half* dst, int ld, const int8_t* src, int ld_src,
                                                 int width) {
  const int lane = threadIdx.x & 31;
  for (int r = threadIdx.x >> 5; r < kChunk; r += kThreads / 32) {
    for (int c = lane * 4; c < width; c += 128) {
      const char4 v = *reinterpret_cast<const char4*>(src + r * ld_src + c);
      __half2* d = reinterpret_cast<__half2*>(dst + r * ld + c);
      d[0] = __halves2half2(__int2half_rn(v.x), __int2half_rn(v.y));
      d[1] = __halves2half2(__int2half_rn(v.z), __int2half_rn(v.w));
    }
  }
}

// The causal blocks (rb, cb <= rb) of the kChunk x kChunk product, numbered row by row.
__device__ __forceinline__ void causal_block(int i, int& rb, int& cb) {
  rb = 0;
  while (i > rb) i -= ++rb;
  cb = i;
}

// acc += sum_k A_k B_k over k < kblocks, with the 16x16 operand tiles A_k at a + k * a_step and B_k
// at b + k * b_step (FragA / FragB carry the operands' layouts).
template <typename FragA, typename FragB, typename FragC, typename Tm>
__device__ __forceinline__ void mma_k(FragC& acc, const Tm* a, int lda, int a_step, const Tm* b, int ldb,
                                      int b_step, int kblocks) {
#pragma unroll 2
  for (int k = 0; k < kblocks; ++k) {
    FragA fa;
    FragB fb;
    nvcuda::wmma::load_matrix_sync(fa, a + k * a_step, lda);
    nvcuda::wmma::load_matrix_sync(fb, b + k * b_step, ldb);
    nvcuda::wmma::mma_sync(acc, fa, fb, acc);
  }
}

template <typename Tin, typename Tout, int kWarps>
__global__ void __launch_bounds__(32 * kWarps)
    ssd_chunked_kernel(const SsdArgs p, int ptiles, bool async) {
  using namespace nvcuda;
  static_assert(chunk_warps_ok<kWarps>(), "see kChunkWarpChoices");
  constexpr int kChunkThreads = 32 * kWarps, kChunkWarps = kWarps;
  using Tm = MmaType<Tin>;
  using FragA = wmma::fragment<wmma::matrix_a, kWm, kWm, kWm, Tm, wmma::row_major>;
  using FragAt = wmma::fragment<wmma::matrix_a, kWm, kWm, kWm, Tm, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, kWm, kWm, kWm, Tm, wmma::row_major>;
  using FragBt = wmma::fragment<wmma::matrix_b, kWm, kWm, kWm, Tm, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, kWm, kWm, kWm, float>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const int N = p.dstate, L = p.seqlen, H = p.nheads, P = p.headdim, G = p.ngroups;
  const ChunkSmem lay(N, sizeof(Tin));
  Tin* Craw = reinterpret_cast<Tin*>(smem_raw + lay.Craw);
  Tin* Braw = reinterpret_cast<Tin*>(smem_raw + lay.Braw);
  Tin* xraw = reinterpret_cast<Tin*>(smem_raw + lay.xraw);
  Tm* Cs = reinterpret_cast<Tm*>(smem_raw + lay.C);
  Tm* Bs = reinterpret_cast<Tm*>(smem_raw + lay.B);
  Tm* xs = reinterpret_cast<Tm*>(smem_raw + lay.x);
  Tm* xhi = reinterpret_cast<Tm*>(smem_raw + lay.xhi);
  Tm* xlo = reinterpret_cast<Tm*>(smem_raw + lay.xlo);
  Tm* Ms = reinterpret_cast<Tm*>(smem_raw + lay.M);
  float* Gs = reinterpret_cast<float*>(smem_raw + lay.G);
  float* Y1 = Gs;
  float* Y2 = Gs + kChunk * lay.ldPf;
  float* Sf = reinterpret_cast<float*>(smem_raw + lay.S);
  Tm* Sh = reinterpret_cast<Tm*>(smem_raw + lay.Sh);
  float* dts = reinterpret_cast<float*>(smem_raw + lay.vec);
  float* cum = dts + kChunk;
  float* e_out = cum + kChunk;  // exp(cum_t): decay of the chunk-start state to token t
  float* e_in = e_out + kChunk;  // exp(cum_end - cum_t): decay of token t's input to the chunk end

  const int ptile = blockIdx.x % ptiles;
  const int bh = blockIdx.x / ptiles;
  const int h = bh % H, b = bh / H;
  const int g = h / (H / G);
  const int p0 = ptile * kColTile;
  const int pcols = min(kColTile, P - p0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int nblk = N / kWm;

  const SsdHead hp(p, h, g);
  const float Ah = hp.A, bias = hp.dt_bias, Dh = hp.D, Bsc = hp.B_scale, Csc = hp.C_scale;
  const Tout* dtp = static_cast<const Tout*>(p.dt);
  Tout* y = static_cast<Tout*>(p.y);
  const int64_t x_stride = static_cast<int64_t>(H) * P, bc_stride = static_cast<int64_t>(G) * N;
  const int64_t state_base = (static_cast<int64_t>(b) * H + h) * P;  // row (b, h, p = 0)
  // this thread's column of the elementwise phases (kColTile divides kChunkThreads) and its scale
  const int my_c = tid % kColTile;
  const float my_xsc =
      (p.x_scale != nullptr && my_c < pcols) ? p.x_scale[h * P + p0 + my_c] : 1.f;

  // the chunk-start state S [N][kColTile] (fp32) and its 16-bit copy for the C S product
  for (int i = tid; i < N * kColTile; i += kChunkThreads) {
    const int c = i / N, n = i % N;  // n fastest: coalesced reads of initial_state rows
    const float v = (p.initial_state != nullptr && c < pcols)
                        ? p.initial_state[(state_base + p0 + c) * N + n]
                        : 0.f;
    Sf[n * lay.ldPf + c] = v;
    Sh[n * lay.ldP + c] = from_float<Tm>(v);
  }

  // raw dt of token `chunk_start + tid` (threads tid < kChunk), loaded one chunk ahead
  auto next_dt = [&](int chunk_start) {
    const int t = chunk_start + tid;
    return t < L ? to_float(dtp[(static_cast<int64_t>(b) * L + t) * H + h]) : 0.f;
  };
  float dt_raw = tid < kChunk ? next_dt(0) : 0.f;

  for (int c0 = 0; c0 < L; c0 += kChunk) {
    const int rows = min(kChunk, L - c0);
    __syncthreads();  // the previous chunk is done with every staged operand and with Y1/Y2
    // ---- stage C, B, x and dt (padding tokens: dt = 0 and zero operands, an identity step)
    const int64_t tok0 = static_cast<int64_t>(b) * L + c0;
    const int64_t bc0 = tok0 * bc_stride + static_cast<int64_t>(g) * N;
    fetch_chunk_tile<Tin, kChunkThreads>(Craw, lay.ldNr, static_cast<const Tin*>(p.Cm) + bc0, bc_stride, rows, N, N,
                          async);
    fetch_chunk_tile<Tin, kChunkThreads>(Braw, lay.ldNr, static_cast<const Tin*>(p.Bm) + bc0, bc_stride, rows, N, N,
                          async);
    fetch_chunk_tile<Tin, kChunkThreads>(xraw, lay.ldPr,
                          static_cast<const Tin*>(p.x) + tok0 * x_stride + static_cast<int64_t>(h) * P + p0,
                          x_stride, rows, kColTile, pcols, async);
    if (async) asm volatile("cp.async.commit_group;\n" ::);
    if (tid < kChunk) {
      dts[tid] = tid < rows ? ssd_dt(dt_raw, bias, p.dt_softplus, p.dt_min, p.dt_max) : 0.f;
      dt_raw = next_dt(c0 + kChunk);  // consumed by the next chunk: its latency hides behind this one
    }
    if (async) asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();
    if constexpr (std::is_same<Tin, int8_t>::value) {
      widen_chunk_tile<kChunkThreads>(Cs, lay.ldN, Craw, lay.ldNr, N);
      widen_chunk_tile<kChunkThreads>(Bs, lay.ldN, Braw, lay.ldNr, N);
      widen_chunk_tile<kChunkThreads>(xs, lay.ldP, xraw, lay.ldPr, kColTile);
      __syncthreads();
    }

    // ---- warp 0: cum = inclusive cumsum of dt*A (two tokens per lane) and its exponentials;
    // meanwhile the other warps compute G = C B^T on the causal blocks (cb <= rb; the mask
    // zeroes the rest).
    if (warp == 0) {
      const float a0 = dts[2 * lane] * Ah, a1 = dts[2 * lane + 1] * Ah;
      float incl = a0 + a1;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const float o = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += o;
      }
      const float c_a = incl - a1, c_b = incl;
      const float c_end = __shfl_sync(0xffffffffu, incl, 31);
      cum[2 * lane] = c_a;
      cum[2 * lane + 1] = c_b;
      e_out[2 * lane] = expf(c_a);
      e_out[2 * lane + 1] = expf(c_b);
      e_in[2 * lane] = expf(c_end - c_a);
      e_in[2 * lane + 1] = expf(c_end - c_b);
    } else {
      for (int i = warp - 1; i < kRowBlocks * (kRowBlocks + 1) / 2; i += kChunkWarps - 1) {
        int rb, cb;
        causal_block(i, rb, cb);
        FragC acc;
        wmma::fill_fragment(acc, 0.f);
        mma_k<FragA, FragBt>(acc, Cs + rb * kWm * lay.ldN, lay.ldN, kWm, Bs + cb * kWm * lay.ldN, lay.ldN,
                             kWm, nblk);
        wmma::store_matrix_sync(Gs + rb * kWm * lay.ldG + cb * kWm, acc, lay.ldG, wmma::mem_row_major);
      }
    }
    __syncthreads();

    // ---- M = G o exp(cum_t - cum_s) dt_s [s <= t] (output-only: 16-bit), and the state
    // operand x_t dt_t exp(cum_end - cum_t) (x at true scale) split into 16-bit high + low parts
    const float bc_scale = Bsc * Csc;
    {
      const int s = tid % kChunk;  // a fixed column per thread: its cum and dt stay in registers
      const float cum_s = cum[s], w_s = bc_scale * dts[s];
      for (int t = tid / kChunk; t < kChunk; t += kChunkThreads / kChunk) {
        const float m = s <= t ? Gs[t * lay.ldG + s] * w_s * __expf(cum[t] - cum_s) : 0.f;
        Ms[t * lay.ldQ + s] = from_float<Tm>(m);
      }
    }
    for (int t = tid / kColTile; t < kChunk; t += kChunkThreads / kColTile) {
      const float v = to_float(xs[t * lay.ldP + my_c]) * my_xsc * dts[t] * e_in[t];
      const Tm hi = from_float<Tm>(v);
      xhi[t * lay.ldP + my_c] = hi;
      xlo[t * lay.ldP + my_c] = from_float<Tm>(v - to_float(hi));
    }
    __syncthreads();

    // ---- 16x16 tiles of Y1 = M x (causal: k blocks <= rb) and Y2 = C S: with 8 warps one of
    // each per warp (two independent accumulators), with 16 one per warp (warps 0-7 Y1, 8-15 Y2).
    // Y1/Y2 alias G: every warp finished reading G before the barrier above.
    {
      const int yt = warp % kYTiles, rb = yt / kColBlocks, cb = yt % kColBlocks;
      const bool y1 = kWarps == kYTiles || warp < kYTiles, y2 = kWarps == kYTiles || warp >= kYTiles;
      FragC a1, a2;
      wmma::fill_fragment(a1, 0.f);
      wmma::fill_fragment(a2, 0.f);
      if (y1)
        mma_k<FragA, FragB>(a1, Ms + rb * kWm * lay.ldQ, lay.ldQ, kWm, xs + cb * kWm, lay.ldP,
                            kWm * lay.ldP, rb + 1);
      if (y2)
        mma_k<FragA, FragB>(a2, Cs + rb * kWm * lay.ldN, lay.ldN, kWm, Sh + cb * kWm, lay.ldP,
                            kWm * lay.ldP, nblk);
      if (y1)
        wmma::store_matrix_sync(Y1 + rb * kWm * lay.ldPf + cb * kWm, a1, lay.ldPf, wmma::mem_row_major);
      if (y2)
        wmma::store_matrix_sync(Y2 + rb * kWm * lay.ldPf + cb * kWm, a2, lay.ldPf, wmma::mem_row_major);
    }
    __syncthreads();

    // ---- output: y = x_scale Y1 + C_scale exp(cum_t) Y2 + D x
    if (my_c < pcols) {
      for (int t = tid / kColTile; t < rows; t += kChunkThreads / kColTile) {
        const float xv = to_float(xs[t * lay.ldP + my_c]) * my_xsc;
        const float out = fmaf(my_xsc, Y1[t * lay.ldPf + my_c],
                               fmaf(Csc * e_out[t], Y2[t * lay.ldPf + my_c], Dh * xv));
        y[(tok0 + t) * x_stride + static_cast<int64_t>(h) * P + p0 + my_c] = from_float<Tout>(out);
      }
    }

    // ---- state: S <- exp(cum_end) S + B_scale B^T (x_hi + x_lo). Each warp owns whole 16x16
    // tiles of S, so no block barrier is needed. During the products the accumulator holds
    // S / B_scale (B is staged raw): x' then carries no B_scale factor, which keeps its 16-bit
    // parts away from fp16's subnormal range for int8 inputs. Uniform scaling of an accumulator
    // fragment is independent of its (opaque) element layout.
    const float pre = e_out[kChunk - 1] / Bsc;
    for (int i = warp; i < nblk * kColBlocks; i += kChunkWarps) {
      const int rb = i / kColBlocks, cb = i % kColBlocks;
      float* tile = Sf + rb * kWm * lay.ldPf + cb * kWm;
      FragC acc;
      wmma::load_matrix_sync(acc, tile, lay.ldPf, wmma::mem_row_major);
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= pre;
      // B^T (col-major view of Bs: element (n, t) is Bs[t][n]) times the high and the low part
      mma_k<FragAt, FragB>(acc, Bs + rb * kWm, lay.ldN, kWm * lay.ldN, xhi + cb * kWm, lay.ldP,
                           kWm * lay.ldP, kRowBlocks);
      mma_k<FragAt, FragB>(acc, Bs + rb * kWm, lay.ldN, kWm * lay.ldN, xlo + cb * kWm, lay.ldP,
                           kWm * lay.ldP, kRowBlocks);
      for (int e = 0; e < acc.num_elements; ++e) acc.x[e] *= Bsc;
      wmma::store_matrix_sync(tile, acc, lay.ldPf, wmma::mem_row_major);
      __syncwarp();
      for (int e = lane; e < kWm * kWm; e += 32) {
        const int r = rb * kWm + e / kWm, c = cb * kWm + e % kWm;
        Sh[r * lay.ldP + c] = from_float<Tm>(Sf[r * lay.ldPf + c]);
      }
    }
  }
  __syncthreads();
  if (p.final_state != nullptr) {
    for (int i = tid; i < N * pcols; i += kChunkThreads) {
      const int c = i / N, n = i % N;
      p.final_state[(state_base + p0 + c) * N + n] = Sf[n * lay.ldPf + c];
    }
  }
}

// ---- chunked form, register-resident (mma.sync) -----------------------------------------------
// The same chunk algebra as ssd_chunked_kernel, with every product a PTX mma.sync m16n8k16 whose
// fragment layouts are documented (PTX ISA, "Matrix Fragments for mma.m16n8k16"), so the phases
// stay in registers: warp w owns the chunk's output rows t in [16w, 16w + 16) and the state rows
// n in [w kN/4, (w + 1) kN/4). G = C B^T (causal part) is accumulated in registers, turned into
// M = G o decay in place and fed to M x as the A operand (the accumulator layout of two adjacent
// n8 tiles is the A layout of one k16 step, as flash-attention kernels do with their scores); the
// chunk-start state lives in the state accumulators across chunks and is written once per chunk
// as the 16-bit copy that C S reads. Operands come from shared memory through ldmatrix. The staged
// tiles are double-buffered with cp.async (chunk c + 1 lands while chunk c computes) and so is the
// 16-bit state copy; with kStages = 1 (pass 2, one warp group) the raw tiles have one buffer and
// chunk c + 1 is staged after a third barrier at the end of chunk c: 71 KiB instead of 110 at
// dstate 128 for 16-bit input, and at most 168 registers, so three blocks share an H100 SM (two an
// Orin SM) and hide each other's staging. A chunk has two block barriers: after the first its
// tiles and its token vectors (computed by warp 0 during the previous chunk) are visible; before
// the second the state operand x dt exp(cum_end - cum) (split into 16-bit high and low parts once
// per block) and, for int8, the fp16 copies of the tiles are written. Eligible: 16-bit outputs,
// dstate <= 128 (padded to kN = 64 or 128 with zeros).
constexpr int kMmaRowWarps = kChunk / 16;  // warps per group: one 16-row slice of the outputs each
constexpr int kMmaMaxState = 128;
// kGroups warp groups of kMmaRowWarps warps split the column tile: group r owns columns
// [r kCols, (r + 1) kCols) of y and of the state, and each computes G for its rows (two groups
// double the warps of a block, which is what hides latency where one block is all an SM holds,
// at the price of computing G twice).
constexpr int kMmaGroupChoices[] = {1, 2};
template <int kGroups>
struct MmaShape {
  static constexpr int kWarps = kMmaRowWarps * kGroups, kThreads = 32 * kWarps;
  static constexpr int kCols = kColTile / kGroups;  // columns per group
  static constexpr int kPT = kCols / 8;              // n8 tiles per group
  // the state operand x dt exp(cum_end - cum): thread tid splits kXsplit consecutive columns of
  // token row tid / (kColTile / kXsplit)
  static constexpr int kXsplit = kChunk * kColTile / kThreads;
  static_assert(kPT % 2 == 0 && (kXsplit == 8 || kXsplit == 16), "shape");
};

constexpr int kTokenVectors = 4;  // per-token vectors of a chunk (see ssd_mma_kernel)

// Sequence split of the register-resident form (docs/kernels.md, "sequence split"): each (batch,
// head, column tile) walks `segments` segments of seg_len tokens (a multiple of kChunk, so chunks
// are those of the unsplit walk) in separate blocks. Pass 1 (kStateOnly) cuts each of segments
// 0 .. segments - 2 into `pieces` pieces of piece_len tokens (whole chunks; the last piece of a
// segment may be shorter), runs the state update alone over each piece from a zero state in its
// own block and writes the piece's end state and total decay; pass 2 starts segment s from the
// initial state carried through the pieces of segments < s. Pieces are what keep pass 1 short:
// a state-only chunk step costs nearly as much time as a full one (it waits on its staging and
// barriers), so pass 1 runs fewer chunks per block in more, smaller blocks.
struct SegSplit {
  int segments = 1;
  int seg_len = 0;               // tokens
  int pieces = 1;                // pass-1 pieces per segment
  int piece_len = 0;             // tokens
  float* states = nullptr;       // [tile][segments - 1][pieces][kColTile][kN] (true scale)
  float* log2_decay = nullptr;   // [tile][segments - 1][pieces]: sum of dt A log2(e) over the piece
};
// Pieces carried into one pass-2 segment, (segments - 1) * pieces: at most one per lane of the
// warp that weighs them (ssd_mma_kernel).
constexpr int kMaxCarriedPieces = 32;

// Shared-memory layout (byte offsets) of ssd_mma_kernel. 16-bit operand tiles have rows padded by
// 16 bytes, which makes every ldmatrix phase (8 rows of 16 bytes) hit 32 distinct banks.
// Double-buffered regions are `stage` / `sh_bytes` apart (buffer 1 after buffer 0).
struct MmaSmem {
  int ldN, ldP, ldNr, ldPr;
  size_t Craw, Braw, xraw, stage, C, B, x, xhi, xlo, Sh, sh_bytes, vec, bytes;

  // (int8 raw tiles are only read as whole 16-byte words, row by row: no padding needed). The
  // state-only pass (pass 1 of a split) has no C tile, fp16 x copy or 16-bit state: about half the
  // bytes, so that more of its blocks share an SM.
  // `stages` 1 keeps one copy of the raw tiles (see ssd_mma_kernel's kStages).
  __host__ __device__ MmaSmem(int kN, int in_bytes, bool state_only = false, int stages = 2)
      : ldN(kN + 8), ldP(kColTile + 8), ldNr(in_bytes == 2 ? ldN : kN), ldPr(in_bytes == 2 ? ldP : kColTile) {
    const bool i8_full = in_bytes != 2 && !state_only;
    size_t off = 0;
    Craw = ChunkSmem::take(off, state_only ? 0 : static_cast<size_t>(in_bytes) * kChunk * ldNr);
    Braw = ChunkSmem::take(off, static_cast<size_t>(in_bytes) * kChunk * ldNr);
    xraw = ChunkSmem::take(off, static_cast<size_t>(in_bytes) * kChunk * ldPr);
    stage = off;  // the raw tiles start at 0
    off += stages == 2 ? stage : 0;
    // int8 tiles are widened into one set of fp16 operand tiles; 16-bit tiles are used as staged
    C = i8_full ? ChunkSmem::take(off, 2 * kChunk * ldN) : 0;
    B = in_bytes == 2 ? 0 : ChunkSmem::take(off, 2 * kChunk * ldN);
    x = i8_full ? ChunkSmem::take(off, 2 * kChunk * ldP) : 0;
    xhi = ChunkSmem::take(off, 2 * kChunk * ldP);
    xlo = ChunkSmem::take(off, 2 * kChunk * ldP);
    Sh = ChunkSmem::take(off, state_only ? 0 : 2 * static_cast<size_t>(kN) * ldP);
    sh_bytes = off - Sh;
    off += sh_bytes;
    vec = ChunkSmem::take(off, sizeof(float) * 2 * kTokenVectors * kChunk);  // double-buffered
    bytes = off;
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ldmatrix x4: four 8x8 16-bit matrices; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// Fragment loads from a row-major 16-bit tile `t` with leading dimension ld (elements).
// A operand (16 x 16 at rows m0, columns k0) of a tile stored [m][k].
template <typename Tm>
__device__ __forceinline__ void load_a(uint32_t (&r)[4], const Tm* t, int ld, int m0, int k0, int lane) {
  ldsm_x4(r, t + (m0 + (lane & 15)) * ld + k0 + 8 * (lane >> 4));
}
// A operand (16 x 16 at rows m0, columns k0) of a tile stored transposed, [k][m].
template <typename Tm>
__device__ __forceinline__ void load_a_trans(uint32_t (&r)[4], const Tm* t, int ld, int k0, int m0, int lane) {
  ldsm_x4_trans(r, t + (k0 + (lane & 7) + 8 * (lane >> 4)) * ld + m0 + 8 * ((lane >> 3) & 1));
}
// B operands of two n8 tiles (k16 x n16 at k0, n0) of a tile stored [n][k]: r[0], r[1] are the
// first tile's b0, b1; r[2], r[3] the second's.
template <typename Tm>
__device__ __forceinline__ void load_b_nk(uint32_t (&r)[4], const Tm* t, int ld, int n0, int k0, int lane) {
  ldsm_x4(r, t + (n0 + (lane & 7) + 8 * (lane >> 4)) * ld + k0 + 8 * ((lane >> 3) & 1));
}
// The same from a tile stored [k][n].
template <typename Tm>
__device__ __forceinline__ void load_b_kn(uint32_t (&r)[4], const Tm* t, int ld, int k0, int n0, int lane) {
  ldsm_x4_trans(r, t + (k0 + (lane & 7) + 8 * ((lane >> 3) & 1)) * ld + n0 + 8 * (lane >> 4));
}

// d += a b (m16n8k16, fp32 accumulate), for fp16 or bf16 operands.
template <typename Tm>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same<Tm, __half>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats as one 32-bit register of 16-bit values (the first in the low half), and back.
template <typename Tm>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  uint32_t r;
  if constexpr (std::is_same<Tm, __half>::value) {
    const __half2 v = __floats2half2_rn(lo, hi);
    memcpy(&r, &v, 4);
  } else {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    memcpy(&r, &v, 4);
  }
  return r;
}
template <typename Tm>
__device__ __forceinline__ float2 unpack2(uint32_t r) {
  if constexpr (std::is_same<Tm, __half>::value) {
    __half2 v;
    memcpy(&v, &r, 4);
    return __half22float2(v);
  } else {
    __nv_bfloat162 v;
    memcpy(&v, &r, 4);
    return __bfloat1622float2(v);
  }
}

// kBytes (a multiple of 4) between registers and 16-, 8- or 4-byte aligned shared memory, in the
// widest words the size allows (memcpy of an unknown alignment would move bytes).
template <int kBytes>
__device__ __forceinline__ void lds_bytes(void* regs, const void* smem) {
  using W = VecWord<kBytes>;
  W w[kBytes / sizeof(W)];
#pragma unroll
  for (int i = 0; i < static_cast<int>(kBytes / sizeof(W)); ++i) w[i] = static_cast<const W*>(smem)[i];
  memcpy(regs, w, kBytes);
}
template <int kBytes>
__device__ __forceinline__ void sts_bytes(void* smem, const void* regs) {
  using W = VecWord<kBytes>;
  W w[kBytes / sizeof(W)];
  memcpy(w, regs, kBytes);
#pragma unroll
  for (int i = 0; i < static_cast<int>(kBytes / sizeof(W)); ++i) static_cast<W*>(smem)[i] = w[i];
}

// v[i] = w x[i] for kC values, split into 16-bit high parts and the 16-bit roundings of the
// remainders, as kC / 8 16-byte words each (x, w and v in float32).
template <typename Tm, int kC>
__device__ __forceinline__ void split_scaled(const float (&x)[kC], float w, uint4 (&hi)[kC / 8], uint4 (&lo)[kC / 8]) {
  uint32_t h[kC / 2], l[kC / 2];
#pragma unroll
  for (int i = 0; i < kC / 2; ++i) {
    const float a = x[2 * i] * w, b = x[2 * i + 1] * w;
    h[i] = pack2<Tm>(a, b);
    const float2 r = unpack2<Tm>(h[i]);
    l[i] = pack2<Tm>(a - r.x, b - r.y);
  }
  memcpy(hi, h, sizeof(h));
  memcpy(lo, l, sizeof(l));
}

// 4 kW int8 values (kW 32-bit words) as exact fp16 values (2 kW words): byte b becomes the half
// 1024 + (b ^ 0x80) (exponent bits 0x64 above the byte), minus 1152; two bytes per byte_perm.
template <int kW>
__device__ __forceinline__ void widen_int8(const uint32_t (&w)[kW], uint32_t (&o)[2 * kW]) {
  const __half2 bias = __float2half2_rn(1152.f);
#pragma unroll
  for (int i = 0; i < kW; ++i) {
    const uint32_t u = w[i] ^ 0x80808080u;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const uint32_t hb = __byte_perm(u, 0x64646464u, j == 0 ? 0x4140 : 0x4342);
      __half2 hv;
      memcpy(&hv, &hb, 4);
      hv = __hsub2(hv, bias);
      memcpy(&o[2 * i + j], &hv, 4);
    }
  }
}

// cp.async copies of a kChunk x kWidth tile src[r * row_stride + c] (r < rows, c < cols; zero
// elsewhere, cols a multiple of 16 bytes) to dst[r * ld + c]: each thread moves a fixed column of
// 16-byte words down the rows, so its addresses are set up once.
template <typename Tin, int kWidth, int kThreads>
__device__ __forceinline__ void copy_tile_async(Tin* dst, int ld, const Tin* src, int64_t row_stride, int rows,
                                                int cols) {
  constexpr int V = 16 / sizeof(Tin), kPerRow = kWidth / V, kRowStep = kThreads / kPerRow;
  static_assert(kThreads % kPerRow == 0 && (kChunk % kRowStep == 0 || kRowStep % kChunk == 0), "tile shape");
  const int r0 = threadIdx.x / kPerRow, c = (threadIdx.x % kPerRow) * V;
  if (kRowStep > kChunk && r0 >= kChunk) return;  // more threads than words
  const bool col_ok = c < cols;
#pragma unroll
  for (int k = 0; k < (kChunk + kRowStep - 1) / kRowStep; ++k) {
    const int r = r0 + k * kRowStep;
    const bool ok = col_ok && r < rows;
    cp_async16(dst + r * ld + c, ok ? src + r * row_stride + c : src, ok ? 16 : 0);
  }
}

// int8 [kChunk][kWidth] tile -> fp16 tile, one 16-byte word per thread per step.
template <int kWidth, int kThreads>
__device__ __forceinline__ void widen_tile(__half* dst, int ld, const int8_t* src, int ld_src) {
  constexpr int kPerRow = kWidth / 16, kRowStep = kThreads / kPerRow;
  const int r0 = threadIdx.x / kPerRow, c = (threadIdx.x % kPerRow) * 16;
#pragma unroll
  for (int r = r0; r < kChunk; r += kRowStep) {
    uint32_t w[4], o[8];
    lds_bytes<16>(w, src + r * ld_src + c);
    widen_int8(w, o);
    sts_bytes<32>(dst + r * ld + c, o);
  }
}

template <typename Tin, typename Tout, int kN, int kGroups, bool kStateOnly, int kStages = 2>
__global__ void __launch_bounds__(MmaShape<kGroups>::kThreads, kStateOnly || kStages == 1 ? 3 : 2 / kGroups)
    ssd_mma_kernel(const SsdArgs p, int ptiles, bool x_async, const SegSplit split) {
  using Tm = MmaType<Tin>;
  using Shape = MmaShape<kGroups>;
  constexpr int kThreads = Shape::kThreads, kPT = Shape::kPT, kXsplit = Shape::kXsplit;
  constexpr bool kInt8 = std::is_same<Tin, int8_t>::value;
  constexpr int kK = kN / 16;                // k16 steps over the state
  constexpr int kSRows = kN / kMmaRowWarps;  // state rows per warp
  constexpr int kMt = kSRows / 16;        // m16 tiles of state per warp
  static_assert(kMt >= 1 && kSRows % 16 == 0, "kN must be 64 or 128");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // Pass 1 lets pass 2 (launched with PDL, launch_ssd_mma) start at once: its segment-0 blocks need
  // nothing from pass 1, and the others stage their first chunk before they wait for it.
  if constexpr (kStateOnly) pdl_launch_dependents();
  const MmaSmem lay(kN, sizeof(Tin), kStateOnly, kStages);
  const int N = p.dstate, L = p.seqlen, H = p.nheads, P = p.headdim, G = p.ngroups;
  // block = (tile, segment) in pass 2, (tile, segment, piece) in pass 1, which runs the pieces of
  // segments 0 .. segments - 2; tile = (b, h, ptile)
  const int tile_blocks = kStateOnly ? (split.segments - 1) * split.pieces : split.segments;
  const int in_tile = blockIdx.x % tile_blocks, tile = blockIdx.x / tile_blocks;
  const int seg = kStateOnly ? in_tile / split.pieces : in_tile;
  const int ptile = tile % ptiles;
  const int bh = tile / ptiles;
  const int h = bh % H, b = bh / H;
  const int seg_begin = seg * split.seg_len;
  const int seg_end = split.segments > 1 ? min(L, seg_begin + split.seg_len) : L;
  const int t_begin = kStateOnly ? seg_begin + in_tile % split.pieces * split.piece_len : seg_begin;
  const int t_end = kStateOnly ? min(seg_end, t_begin + split.piece_len) : seg_end;
  // this tile's pass-1 results: end state and log2 decay of piece j (j = segment * pieces + piece)
  const int64_t piece_slot = static_cast<int64_t>(tile) * (split.segments - 1) * split.pieces;
  auto piece_state = [&](int j) { return split.states + (piece_slot + j) * kColTile * kN; };
  const int g = h / (H / G);
  const int p0 = ptile * kColTile;
  const int pcols = min(kColTile, P - p0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // row slice (outputs) and state rows of this warp; group 1 takes them in reverse order, so the
  // two warps on each scheduler (warp w and w + 4) share out the causal G work evenly
  const int wr = warp < kMmaRowWarps ? warp : kMmaRowWarps - 1 - warp % kMmaRowWarps;
  const int pg = warp / kMmaRowWarps * Shape::kCols;  // first column of this warp's group
  const int gid = lane >> 2, tid4 = lane & 3;   // fragment row group and column pair

  const SsdHead hp(p, h, g);
  const float A2 = hp.A * kLog2e, bias = hp.dt_bias, Dh = hp.D, Bsc = hp.B_scale, Csc = hp.C_scale;
  const float bc_scale = Bsc * Csc;
  const Tout* dtp = static_cast<const Tout*>(p.dt);
  Tout* y = static_cast<Tout*>(p.y);
  const int64_t x_stride = static_cast<int64_t>(H) * P, bc_stride = static_cast<int64_t>(G) * N;
  const int64_t state_base = (static_cast<int64_t>(b) * H + h) * P + p0;  // row (b, h, p0)
  // full, 4-byte aligned output pairs (the usual case) are stored as one 32-bit word
  const bool y_pairs = pcols == kColTile && P % 2 == 0 && reinterpret_cast<uintptr_t>(y) % 4 == 0;

  // This thread's accumulator columns p = pg + 8q + 2 tid4 + e. For int8 the state accumulators hold
  // S / (B_scale x_scale[p]) so that the products take raw int8 B (exact in fp16) and the state
  // operand x dt exp(cum_end - cum) without x_scale; a column with a zero x_scale (its x is zero)
  // keeps scale 1 and gets a zero state operand.
  float col_scale[kPT][2], col_xsc[kPT][2];
#pragma unroll
  for (int q = 0; q < kPT; ++q)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int pc = pg + 8 * q + 2 * tid4 + e;
      const float xs = (kInt8 && pc < pcols) ? p.x_scale[h * P + p0 + pc] : 1.f;
      col_xsc[q][e] = xs;
      col_scale[q][e] = kInt8 ? Bsc * (xs != 0.f ? xs : 1.f) : 1.f;
    }
  // the state operand's row and columns for this thread, and (int8) its columns with x_scale 0
  const int xs_row = threadIdx.x / (kColTile / kXsplit), xs_col = threadIdx.x % (kColTile / kXsplit) * kXsplit;
  unsigned xs_zero = 0;
  if constexpr (kInt8) {
    for (int i = 0; i < kXsplit; ++i)
      if (xs_col + i < pcols && p.x_scale[h * P + p0 + xs_col + i] == 0.f) xs_zero |= 1u << i;
  }

  // stage the chunk starting at c0 into buffer st (zero-filled past the sequence / dstate / headdim)
  auto stage = [&](int c0, int st) {
    const int rows = min(kChunk, L - c0);
    const int64_t tok0 = static_cast<int64_t>(b) * L + c0;
    const int64_t bc0 = tok0 * bc_stride + static_cast<int64_t>(g) * N;
    Tin* xdst = reinterpret_cast<Tin*>(smem_raw + lay.xraw + st * lay.stage);
    const Tin* xsrc = static_cast<const Tin*>(p.x) + tok0 * x_stride + static_cast<int64_t>(h) * P + p0;
    if constexpr (!kStateOnly)
      copy_tile_async<Tin, kN, kThreads>(reinterpret_cast<Tin*>(smem_raw + lay.Craw + st * lay.stage), lay.ldNr,
                                         static_cast<const Tin*>(p.Cm) + bc0, bc_stride, rows, N);
    copy_tile_async<Tin, kN, kThreads>(reinterpret_cast<Tin*>(smem_raw + lay.Braw + st * lay.stage), lay.ldNr,
                             static_cast<const Tin*>(p.Bm) + bc0, bc_stride, rows, N);
    if (x_async) {
      copy_tile_async<Tin, kColTile, kThreads>(xdst, lay.ldPr, xsrc, x_stride, rows, pcols);
    } else {
      fetch_chunk_tile<Tin, kThreads>(xdst, lay.ldPr, xsrc, x_stride, rows, kColTile, pcols, false);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  stage(t_begin, 0);

  // the chunk-start state: accumulators S[mt][q] (rows n = w kN/4 + 16 mt + gid (+8), columns as
  // above); f(element, n, column, its column scale) visits each of this thread's elements
  float S[kMt][kPT][4];
  auto for_each_state = [&](auto&& f) {
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
      for (int q = 0; q < kPT; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i)
          f(S[mt][q][i], wr * kSRows + 16 * mt + gid + 8 * (i >> 1), pg + 8 * q + 2 * tid4 + (i & 1),
            col_scale[q][i & 1]);
  };
  // Pass 1 starts from zero; pass 2 from the initial state carried through the pieces before this
  // segment, S <- S exp2(log2_decay_j) + end_j for j = 0 .. seg * pieces - 1. The block folds the
  // carried state a piece at a time (coalesced, each piece's loads independent of each other) into
  // the 16-bit state copy's buffers (unused until store_state_copy), then each thread takes its
  // accumulators from there: per element, a chain of loads would wait on one after another.
  const int carried = kStateOnly ? 0 : seg * split.pieces;
  const float* carry = reinterpret_cast<const float*>(smem_raw + lay.Sh);  // [kColTile][kN] (true scale)
  if (carried > 0) {
    pdl_wait();  // pass 1 wrote the pieces' end states and decays
    static_assert(kColTile * kN * sizeof(float) <= 2 * kN * (kColTile + 8) * sizeof(Tm), "fits Sh");
    constexpr int kPer = kColTile * kN / kThreads;
    float v[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = threadIdx.x + i * kThreads, pc = e / kN, n = e % kN;
      v[i] = n < N && pc < pcols && p.initial_state != nullptr ? p.initial_state[(state_base + pc) * N + n] : 0.f;
    }
    for (int j = 0; j < carried; ++j) {
      const float decay = exp2f(split.log2_decay[piece_slot + j]);
      const float* end_j = piece_state(j);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[i] = fmaf(v[i], decay, end_j[threadIdx.x + i * kThreads]);
    }
#pragma unroll
    for (int i = 0; i < kPer; ++i) const_cast<float*>(carry)[threadIdx.x + i * kThreads] = v[i];
    __syncthreads();
  }
  for_each_state([&](float& s, int n, int pc, float sc) {
    if (kStateOnly || n >= N || pc >= pcols) {
      s = 0.f;
      return;
    }
    float v = carried > 0 ? carry[pc * kN + n]
                          : p.initial_state != nullptr ? p.initial_state[(state_base + pc) * N + n] : 0.f;
    s = v / sc;
  });
  if (carried > 0) __syncthreads();  // every thread has its state before store_state_copy reuses the buffers
  // its 16-bit copy (true scale) for the next chunk's C S
  auto store_state_copy = [&](int buf) {
    Tm* Sh = reinterpret_cast<Tm*>(smem_raw + lay.Sh + buf * lay.sh_bytes);
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
      for (int q = 0; q < kPT; ++q)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int n = wr * kSRows + 16 * mt + gid + 8 * r;
          *reinterpret_cast<uint32_t*>(Sh + n * lay.ldP + pg + 8 * q + 2 * tid4) =
              pack2<Tm>(S[mt][q][2 * r] * col_scale[q][0], S[mt][q][2 * r + 1] * col_scale[q][1]);
        }
  };
  if constexpr (!kStateOnly) store_state_copy(0);

  // Token vectors of a chunk, double-buffered: buffer k holds cumv (inclusive cumsum of dt A log2(e)),
  // dtbv (dt B_scale C_scale, M's column factor), wv (dt exp(cum_end - cum), the weight of token s
  // in the chunk-end state) and eov (exp(cum), the decay of the chunk-start state to token t).
  // Warp 0 (the least causal G work) computes chunk c + 1's during chunk c, from raw dt it loads a
  // chunk ahead of that (two tokens per lane, shuffle scan).
  auto vectors = [&](int buf) { return reinterpret_cast<float*>(smem_raw + lay.vec) + buf * kTokenVectors * kChunk; };
  auto load_dt = [&](int c0, float (&raw)[2]) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int t = c0 + 2 * lane + e;
      raw[e] = t < L ? to_float(dtp[(static_cast<int64_t>(b) * L + t) * H + h]) : 0.f;
    }
  };
  float dt_raw[2];
  auto token_vectors = [&](int c0, int buf) {
    float d[2];
#pragma unroll
    for (int e = 0; e < 2; ++e)
      d[e] = c0 + 2 * lane + e < L ? ssd_dt(dt_raw[e], bias, p.dt_softplus, p.dt_min, p.dt_max) : 0.f;
    load_dt(c0 + kChunk, dt_raw);
    const float a1 = d[1] * A2;
    float incl = fmaf(d[0], A2, a1);
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const float o = __shfl_up_sync(0xffffffffu, incl, off);
      if (lane >= off) incl += o;
    }
    const float cum_end = __shfl_sync(0xffffffffu, incl, 31);
    const float cum2[2] = {incl - a1, incl};
    float* v = vectors(buf);
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      v[2 * lane + e] = cum2[e];
      v[kChunk + 2 * lane + e] = d[e] * bc_scale;
      v[2 * kChunk + 2 * lane + e] = d[e] * fast_exp2(cum_end - cum2[e]);
      v[3 * kChunk + 2 * lane + e] = fast_exp2(cum2[e]);
    }
  };
  if (warp == 0) {
    load_dt(t_begin, dt_raw);
    token_vectors(t_begin, 0);
  }

  Tm* xhi = reinterpret_cast<Tm*>(smem_raw + lay.xhi);
  Tm* xlo = reinterpret_cast<Tm*>(smem_raw + lay.xlo);
  const int row0 = 16 * wr;  // this warp's first output row in the chunk
  float seg_log2_decay = 0.f;  // pass 1: sum of dt A log2(e) over the chunks done so far
  for (int c0 = t_begin, ci = 0; c0 < t_end; c0 += kChunk, ++ci) {
    const int st = ci & 1, rs = kStages == 2 ? st : 0;  // rs: the raw tiles' buffer
    asm volatile("cp.async.wait_group 0;\n" ::);
    __syncthreads();  // chunk ci's tiles, token vectors and 16-bit state are visible; ci - 1 is done
    if (kStages == 2 && c0 + kChunk < t_end) stage(c0 + kChunk, st ^ 1);

    const float* cumv = vectors(st);
    const float* dtbv = cumv + kChunk;
    const float* wv = dtbv + kChunk;
    const float* eov = wv + kChunk;
    const float e_end = eov[kChunk - 1];  // padding tokens have dt = 0: exp(cum_end)
    if constexpr (kStateOnly) seg_log2_decay += cumv[kChunk - 1];

    // ---- the state operand x dt exp(cum_end - cum) as 16-bit high + low parts (and for int8 the
    // fp16 operand tiles), then the block's second barrier
    const Tin* xraw = reinterpret_cast<const Tin*>(smem_raw + lay.xraw + rs * lay.stage);
    float xv[kXsplit];
    if constexpr (kInt8) {
      uint32_t raw[kXsplit / 4];
      lds_bytes<kXsplit>(raw, xraw + xs_row * lay.ldPr + xs_col);
      int8_t e[kXsplit];
      memcpy(e, raw, kXsplit);
#pragma unroll
      for (int i = 0; i < kXsplit; ++i) xv[i] = (xs_zero >> i) & 1 ? 0.f : static_cast<float>(e[i]);
      if constexpr (!kStateOnly) {  // x and C as fp16 operands of M x, C S and the D skip
        uint32_t o[kXsplit / 2];
        widen_int8(raw, o);
        sts_bytes<sizeof(o)>(reinterpret_cast<Tm*>(smem_raw + lay.x) + xs_row * lay.ldP + xs_col, o);
        widen_tile<kN, kThreads>(reinterpret_cast<__half*>(smem_raw + lay.C), lay.ldN,
                                 reinterpret_cast<const int8_t*>(smem_raw + lay.Craw + rs * lay.stage), lay.ldNr);
      }
      widen_tile<kN, kThreads>(reinterpret_cast<__half*>(smem_raw + lay.B),
                     lay.ldN, reinterpret_cast<const int8_t*>(smem_raw + lay.Braw + rs * lay.stage), lay.ldNr);
    } else {
      uint32_t w[kXsplit / 2];
      lds_bytes<sizeof(w)>(w, xraw + xs_row * lay.ldPr + xs_col);
#pragma unroll
      for (int i = 0; i < kXsplit / 2; ++i) {
        const float2 f = unpack2<Tm>(w[i]);
        xv[2 * i] = f.x;
        xv[2 * i + 1] = f.y;
      }
    }
    {
      uint4 hi[kXsplit / 8], lo[kXsplit / 8];
      split_scaled<Tm>(xv, wv[xs_row], hi, lo);
      sts_bytes<sizeof(hi)>(xhi + xs_row * lay.ldP + xs_col, hi);
      sts_bytes<sizeof(lo)>(xlo + xs_row * lay.ldP + xs_col, lo);
    }
    __syncthreads();
    const Tm* Bs = reinterpret_cast<const Tm*>(smem_raw + (kInt8 ? lay.B : lay.Braw + rs * lay.stage));
    if constexpr (!kStateOnly) {  // the chunk's outputs
      const Tm* Cs = reinterpret_cast<const Tm*>(smem_raw + (kInt8 ? lay.C : lay.Craw + rs * lay.stage));
      const Tm* xs = kInt8 ? reinterpret_cast<const Tm*>(smem_raw + lay.x) : reinterpret_cast<const Tm*>(xraw);
      const int ldx = kInt8 ? lay.ldP : lay.ldPr;
      const Tm* Sh = reinterpret_cast<const Tm*>(smem_raw + lay.Sh + st * lay.sh_bytes);

      // ---- G = C B^T on the causal tiles (s < 16 (warp + 1)) and Y2 = C S, one A fragment of C each
      float Gacc[2 * kMmaRowWarps][4], Y1[kPT][4], Y2[kPT][4];
#pragma unroll
      for (int j = 0; j < 2 * kMmaRowWarps; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) Gacc[j][i] = 0.f;
#pragma unroll
      for (int q = 0; q < kPT; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) Y1[q][i] = Y2[q][i] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kK; ++kk) {
        uint32_t a[4];
        load_a(a, Cs, lay.ldN, row0, 16 * kk, lane);
#pragma unroll
        for (int jj = 0; jj < kMmaRowWarps; ++jj) {
          if (jj <= wr) {
            uint32_t bf[4];
            load_b_nk(bf, Bs, lay.ldN, 16 * jj, 16 * kk, lane);
            mma16816<Tm>(Gacc[2 * jj], a, bf[0], bf[1]);
            mma16816<Tm>(Gacc[2 * jj + 1], a, bf[2], bf[3]);
          }
        }
#pragma unroll
        for (int qq = 0; qq < kPT / 2; ++qq) {
          uint32_t bf[4];
          load_b_kn(bf, Sh, lay.ldP, 16 * kk, pg + 16 * qq, lane);
          mma16816<Tm>(Y2[2 * qq], a, bf[0], bf[1]);
          mma16816<Tm>(Y2[2 * qq + 1], a, bf[2], bf[3]);
        }
      }

      // ---- M = G o exp(cum_t - cum_s) dt_s B_scale C_scale [s <= t], straight into A fragments of
      // Y1 = M x (k16 step kk = n8 tiles 2kk, 2kk + 1 of G)
      const float cum_t[2] = {cumv[row0 + gid], cumv[row0 + gid + 8]};
#pragma unroll
      for (int kk = 0; kk < kMmaRowWarps; ++kk) {
        if (kk <= wr) {
          uint32_t a[4];
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int j = 2 * kk + half, s = 8 * j + 2 * tid4;
            const float cs0 = cumv[s], cs1 = cumv[s + 1], w0 = dtbv[s], w1 = dtbv[s + 1];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
              const int t = row0 + gid + 8 * r;
              const float m0 = s <= t ? Gacc[j][2 * r] * w0 * fast_exp2(cum_t[r] - cs0) : 0.f;
              const float m1 = s + 1 <= t ? Gacc[j][2 * r + 1] * w1 * fast_exp2(cum_t[r] - cs1) : 0.f;
              a[2 * half + r] = pack2<Tm>(m0, m1);
            }
          }
#pragma unroll
          for (int qq = 0; qq < kPT / 2; ++qq) {
            uint32_t bf[4];
            load_b_kn(bf, xs, ldx, 16 * kk, pg + 16 * qq, lane);
            mma16816<Tm>(Y1[2 * qq], a, bf[0], bf[1]);
            mma16816<Tm>(Y1[2 * qq + 1], a, bf[2], bf[3]);
          }
        }
      }

      // ---- output: y = x_scale (Y1 + D x) + C_scale exp(cum_t) Y2 (x raw: int8 values for int8)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int t = row0 + gid + 8 * r;
        if (c0 + t >= L) continue;
        const float eo = Csc * eov[t];
        Tout* yrow = y + (static_cast<int64_t>(b) * L + c0 + t) * x_stride + static_cast<int64_t>(h) * P + p0;
#pragma unroll
        for (int q = 0; q < kPT; ++q) {
          const int pc = pg + 8 * q + 2 * tid4;
          const float2 xq = unpack2<Tm>(*reinterpret_cast<const uint32_t*>(xs + t * ldx + pc));
          float out[2];
          out[0] = fmaf(col_xsc[q][0], fmaf(Dh, xq.x, Y1[q][2 * r]), eo * Y2[q][2 * r]);
          out[1] = fmaf(col_xsc[q][1], fmaf(Dh, xq.y, Y1[q][2 * r + 1]), eo * Y2[q][2 * r + 1]);
          if (y_pairs) {
            *reinterpret_cast<uint32_t*>(yrow + pc) = pack2<Tout>(out[0], out[1]);
          } else {
            store_run<Tout, 2>(yrow + pc, pcols - pc, out);
          }
        }
      }
    }

    if (warp == 0 && c0 + kChunk < t_end) token_vectors(c0 + kChunk, st ^ 1);

    // ---- state: S <- exp(cum_end) S + B^T (x_hi + x_lo)
#pragma unroll
    for (int mt = 0; mt < kMt; ++mt)
#pragma unroll
      for (int q = 0; q < kPT; ++q)
#pragma unroll
        for (int i = 0; i < 4; ++i) S[mt][q][i] *= e_end;
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      uint32_t bh[kPT / 2][4], bl[kPT / 2][4];
#pragma unroll
      for (int qq = 0; qq < kPT / 2; ++qq) {
        load_b_kn(bh[qq], xhi, lay.ldP, 16 * kk, pg + 16 * qq, lane);
        load_b_kn(bl[qq], xlo, lay.ldP, 16 * kk, pg + 16 * qq, lane);
      }
#pragma unroll
      for (int mt = 0; mt < kMt; ++mt) {
        uint32_t a[4];
        load_a_trans(a, Bs, lay.ldN, 16 * kk, wr * kSRows + 16 * mt, lane);
#pragma unroll
        for (int qq = 0; qq < kPT / 2; ++qq) {
          mma16816<Tm>(S[mt][2 * qq], a, bh[qq][0], bh[qq][1]);
          mma16816<Tm>(S[mt][2 * qq + 1], a, bh[qq][2], bh[qq][3]);
          mma16816<Tm>(S[mt][2 * qq], a, bl[qq][0], bl[qq][1]);
          mma16816<Tm>(S[mt][2 * qq + 1], a, bl[qq][2], bl[qq][3]);
        }
      }
    }
    if constexpr (!kStateOnly) store_state_copy(st ^ 1);
    if (kStages == 1 && c0 + kChunk < t_end) {  // one copy of the raw tiles: every warp is done with them
      __syncthreads();
      stage(c0 + kChunk, 0);
    }
  }

  if constexpr (kStateOnly) {  // this piece's end state from zero, and its decay
    float* e = piece_state(in_tile);
    for_each_state([&](float& s, int n, int pc, float sc) { e[pc * kN + n] = s * sc; });
    if (threadIdx.x == 0) split.log2_decay[piece_slot + in_tile] = seg_log2_decay;
  } else if (p.final_state != nullptr && seg == split.segments - 1) {
    for_each_state([&](float& s, int n, int pc, float sc) {
      if (n < N && pc < pcols) p.final_state[(state_base + pc) * N + n] = s * sc;
    });
  }
}

// ---- decode: one (batch, head, headdim row) per `lanes` lanes, like the Mamba-1 update ----
constexpr int kSsdDecodeThreads = 128;

// As the Mamba-1 update (one decay per row: A per head), with every load of a row issued up front
// (common.cuh, "decode").
template <typename Tin, typename Tout, int kPer, int kVec>
__global__ void __launch_bounds__(kSsdDecodeThreads)
    ssd_state_update_kernel(const float* state_in, float* state_out, const SsdArgs p, int lanes) {
  pdl_launch_dependents();
  int row, sub;
  decode_row(kSsdDecodeThreads, lanes, &row, &sub);  // row (b, h, p)
  const int H = p.nheads, P = p.headdim, N = p.dstate;
  const bool active = row < p.batch * H * P;
  const int r32 = active ? row : 0;
  const int64_t rr = r32;
  const int bh = r32 / P, pp = r32 - bh * P;
  const int b = bh / H, h = bh - b * H;
  const int g = h / (H / p.ngroups);
  const SsdHead hp(p, h, g);  // (inactive lanes read row 0's: valid addresses, results unused)
  pdl_wait();                 // x, dt, B, C and the state are written by earlier kernels
  const float xv = load1<Tin, true>(static_cast<const Tin*>(p.x) + rr,
                                   p.x_scale != nullptr ? p.x_scale[h * P + pp] : 1.f);
  const float dt_raw = to_float(load_elem<true>(static_cast<const Tout*>(p.dt) + bh));
  const int64_t bc = (static_cast<int64_t>(b) * p.ngroups + g) * N;
  StateRowLane<kPer, kVec> st;
  st.load(state_in + rr * N, p.A + h, false, static_cast<const Tin*>(p.Bm) + bc,
          static_cast<const Tin*>(p.Cm) + bc, hp.B_scale, hp.C_scale, N, sub, lanes, active);
  const float dtv = ssd_dt(dt_raw, hp.dt_bias, p.dt_softplus, p.dt_min, p.dt_max);
  const float acc = st.update(state_out + rr * N, dtv, dtv * xv, N, sub, lanes, active);
  if (active && sub == 0) static_cast<Tout*>(p.y)[rr] = from_float<Tout>(fmaf(hp.D, xv, acc));
}

// Benchmark/tuning override (essm_tuning_set_ssd_variant): 0 = by output dtype and dstate, 1 =
// direct; for 16-bit outputs 2 / 3 = the WMMA chunked form with 8 / 16 warps per block, 4 / 5 =
// the register-resident form with 4 / 8 warps and two stages of raw tiles, 6 = with 4 warps and one
// stage (dstate <= 128).
int g_ssd_variant = 0;

template <typename Tin, typename Tout>
cudaError_t launch_ssd_direct(const SsdArgs& a, cudaStream_t stream) {
  const int ptiles = (a.headdim + kSsdRows - 1) / kSsdRows;
  const int64_t blocks = static_cast<int64_t>(a.batch) * a.nheads * ptiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int threads = a.dstate / kSsdStates * kSsdRows;
  ssd_scan_fwd_kernel<Tin, Tout>
      <<<static_cast<unsigned>(blocks), threads, ssd_smem_bytes<Tin>(a.dstate), stream>>>(a, ptiles);
  return launch_status();
}

// cp.async moves 16-byte words: x rows (and the head offset inside a row) must keep that alignment
// for the chunked kernels to stage x with it (B/C rows always do: aligned base, dstate a multiple
// of 16); otherwise they stage x with ordinary loads.
template <typename Tin>
bool x_rows_async(const SsdArgs& a) {
  return reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && (a.headdim * sizeof(Tin)) % 16 == 0;
}

// Shared memory per block available with the opt-in, and the SM count, of the current device.
inline cudaError_t device_limits(int* smem_max, int* sms) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, dev);
  return err;
}

// Lets `kernel` use `bytes` of dynamic shared memory (above 48 KiB needs the opt-in) before it is
// launched or its occupancy is asked for.
template <typename K>
cudaError_t allow_dynamic_smem(K* kernel, size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Blocks of `kernel` (`threads` threads, `smem` dynamic shared memory) resident per SM.
template <typename K>
cudaError_t blocks_per_sm(K* kernel, int threads, size_t smem, int* per_sm) {
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  return err == cudaSuccess ? cudaOccupancyMaxActiveBlocksPerMultiprocessor(per_sm, kernel, threads, smem) : err;
}

// Warps resident on the busiest SM for a launch of `blocks` blocks of `warps_per_block` warps, of
// which `per_sm` blocks fit on an SM.
int64_t busiest_sm_warps(int per_sm, int warps_per_block, int64_t blocks, int sms) {
  return std::min<int64_t>((blocks + sms - 1) / sms, per_sm) * warps_per_block;
}

// The same, with `per_sm` asked of the occupancy API for `kernel`.
template <typename K>
cudaError_t resident_warps(K* kernel, int warps_per_block, size_t smem, int64_t blocks, int sms, int64_t* warps) {
  int per_sm = 0;
  const cudaError_t err = blocks_per_sm(kernel, 32 * warps_per_block, smem, &per_sm);
  if (err == cudaSuccess) *warps = busiest_sm_warps(per_sm, warps_per_block, blocks, sms);
  return err;
}

// Launches the chunked kernel with kWarps warps per block.
template <typename Tin, typename Tout, int kWarps>
cudaError_t launch_ssd_chunked_warps(const SsdArgs& a, const ChunkSmem& lay, int64_t blocks,
                                     int ptiles, cudaStream_t stream) {
  const cudaError_t err = allow_dynamic_smem(ssd_chunked_kernel<Tin, Tout, kWarps>, lay.bytes);
  if (err != cudaSuccess) return err;
  ssd_chunked_kernel<Tin, Tout, kWarps>
      <<<static_cast<unsigned>(blocks), 32 * kWarps, lay.bytes, stream>>>(a, ptiles, x_rows_async<Tin>(a));
  return launch_status();
}

// The chunked form; the direct form where the chunked form's shared memory (it grows with dstate:
// 169 KiB for f16 at 256) exceeds the device's per-block limit (163 KiB on Orin, 227 KiB on H100).
// 16 warps per block where that puts more warps on the busiest SM than 8 (see kChunkWarpChoices),
// unless `warps` forces one.
template <typename Tin, typename Tout>
cudaError_t launch_ssd_chunked(const SsdArgs& a, int warps, cudaStream_t stream) {
  static_assert(kChunkWarpChoices[0] == 8 && kChunkWarpChoices[1] == 16, "instantiations below");
  const ChunkSmem lay(a.dstate, sizeof(Tin));
  int smem_max = 0, sms = 0;
  cudaError_t err = device_limits(&smem_max, &sms);
  if (err != cudaSuccess) return err;
  if (lay.bytes > static_cast<size_t>(smem_max)) return launch_ssd_direct<Tin, Tout>(a, stream);
  const int ptiles = (a.headdim + kColTile - 1) / kColTile;
  const int64_t blocks = static_cast<int64_t>(a.batch) * a.nheads * ptiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  if (warps != 8 && warps != 16) {
    int64_t w8 = 0, w16 = 0;
    err = resident_warps(ssd_chunked_kernel<Tin, Tout, 8>, 8, lay.bytes, blocks, sms, &w8);
    if (err == cudaSuccess) err = resident_warps(ssd_chunked_kernel<Tin, Tout, 16>, 16, lay.bytes, blocks, sms, &w16);
    if (err != cudaSuccess) return err;
    warps = w16 > w8 ? 16 : 8;
  }
  return warps == 16 ? launch_ssd_chunked_warps<Tin, Tout, 16>(a, lay, blocks, ptiles, stream)
                     : launch_ssd_chunked_warps<Tin, Tout, 8>(a, lay, blocks, ptiles, stream);
}

// ---- sequence split of the register-resident form (SegSplit) ----
// Blocks that the workspace is sized to fill: an H100's resident register-resident blocks (132 SMs
// x 2 with two stages of raw tiles, x 3 with one: ssd_mma_kernel's kStages), and for pass 1 its
// resident state-only blocks (132 x 4 for int8 input, x 3 for 16-bit).
// Constants, not the device's counts, so that a workspace sized when a TensorRT engine is built
// covers every later launch on any GPU; the launch itself splits no further than its device fills
// (split_for_device).
constexpr int64_t kSplitBlocksTwoStages = 264;
constexpr int64_t kSplitBlocksOneStage = 396;
constexpr int64_t kPieceBlocks = 528;
constexpr int kMaxSegments = 32;
static_assert(kMaxSegments - 1 <= kMaxCarriedPieces, "one piece per segment always fits");
// Pieces carried into one pass-2 segment that the heuristic allows: each costs the segment's block
// a 16 KiB read before its first chunk (a forced count may go up to kMaxCarriedPieces).
constexpr int kHeuristicCarriedPieces = 16;
int g_ssd_segments = 0;  // tuning: forced segment count (essm_tuning_set_ssd_variant), 0 = heuristic
int g_ssd_pieces = 0;    // tuning: forced pieces per segment (essm_tuning_set_ssd_pieces), 0 = heuristic

// `want` segments capped at one per chunk and kMaxSegments (1: no split). Two segments already pay
// since pass 1 runs in pieces (H100, batch 1, L 2048, 64 heads: 98 against 106 µs unsplit for f16
// input, 91 against 116 for int8; docs/benchmarks.md, SSD step 15).
int usable_segments(int64_t want, int chunks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, chunks, kMaxSegments})));
}

// Segments per tile that the workspace is sized for with `stages` stages of raw tiles in pass 2:
// enough blocks for kSplitBlocks* (or the forced count).
int split_cap(int64_t tiles, int chunks, int stages) {
  const int64_t blocks = stages == 1 ? kSplitBlocksOneStage : kSplitBlocksTwoStages;
  return usable_segments(g_ssd_segments > 0 ? g_ssd_segments : blocks / tiles, chunks);
}

// The segments of a launch before the workspace's limit: as many as fill the device's `slots`
// resident pass-2 blocks (or the forced count), within split_cap.
int wanted_segments(int64_t tiles, int chunks, int64_t slots, int stages) {
  const int cap = split_cap(tiles, chunks, stages);
  return g_ssd_segments > 0 ? cap : usable_segments(std::min<int64_t>(cap, slots / tiles), chunks);
}

// Chunks per segment of `segments` (evened out over the chunks).
int segment_chunks(int chunks, int segments) { return (chunks + segments - 1) / segments; }

// Pass-1 pieces per segment: as many as fill `slots` resident state-only blocks (or the forced
// count), at most one per chunk of a segment and within the carried-piece limit.
int pieces_for(int64_t tiles, int segments, int seg_chunks, int64_t slots) {
  if (segments <= 1) return 1;
  const int64_t carry_cap = (g_ssd_pieces > 0 ? kMaxCarriedPieces : kHeuristicCarriedPieces) / (segments - 1);
  const int64_t want = g_ssd_pieces > 0 ? g_ssd_pieces : slots / (tiles * (segments - 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, seg_chunks, carry_cap})));
}

// Workspace of a split into `segments` of `pieces` pass-1 pieces: end states
// [tiles][segments - 1][pieces][kColTile][kn], then decays.
size_t split_state_bytes(int64_t tiles, int segments, int pieces, int kn) {
  return segments <= 1 ? 0
                       : static_cast<size_t>(tiles) * (segments - 1) * pieces * kColTile * kn * sizeof(float);
}
size_t split_bytes(int64_t tiles, int segments, int pieces, int kn) {
  return segments <= 1 ? 0
                       : split_state_bytes(tiles, segments, pieces, kn) +
                             static_cast<size_t>(tiles) * (segments - 1) * pieces * sizeof(float);
}

// The workspace that a launch of `tiles` tiles may use (its largest split on any GPU, with either
// number of stages).
size_t split_need(int64_t tiles, int chunks, int kn) {
  size_t most = 0;
  for (int stages = 1; stages <= 2; ++stages) {
    const int segments = split_cap(tiles, chunks, stages);
    most = std::max(most, split_bytes(tiles, segments,
                                      pieces_for(tiles, segments, segment_chunks(chunks, segments), kPieceBlocks), kn));
  }
  return most;
}

// The split of one launch whose pass 2 has `stages` stages: wanted_segments and as many pieces as
// fill the device's `piece_slots` resident state-only blocks (unless forced), no more than the
// workspace allows (fewer pieces first, then fewer segments), evened out over the chunks.
SegSplit split_for_device(int64_t tiles, int seqlen, int kn, int64_t slots, int64_t piece_slots, int stages,
                          void* ws, size_t ws_bytes) {
  const int chunks = (seqlen + kChunk - 1) / kChunk;
  int segments = wanted_segments(tiles, chunks, slots, stages);
  int pieces = pieces_for(tiles, segments, segment_chunks(chunks, segments), piece_slots);
  while (segments > 1 && split_bytes(tiles, segments, pieces, kn) > ws_bytes) {
    if (pieces > 1) {
      --pieces;
    } else {
      segments = usable_segments(segments - 1, chunks);
    }
  }
  SegSplit split;
  if (segments <= 1) return split;
  const int seg_chunks = segment_chunks(chunks, segments);
  const int piece_chunks = (seg_chunks + pieces - 1) / pieces;
  split.segments = (chunks + seg_chunks - 1) / seg_chunks;
  split.seg_len = seg_chunks * kChunk;
  split.pieces = (seg_chunks + piece_chunks - 1) / piece_chunks;
  split.piece_len = piece_chunks * kChunk;
  split.states = static_cast<float*>(ws);
  split.log2_decay = reinterpret_cast<float*>(static_cast<char*>(ws) +
                                              split_state_bytes(tiles, split.segments, split.pieces, kn));
  return split;
}

// Launches one pass of the register-resident kernel: kGroups warp groups, kStateOnly = pass 1.
// Pass 2 of a split is a programmatic dependent launch (PDL, sm_90 and later) after pass 1: its
// blocks are scheduled as pass 1's finish and only those that carry a state wait for pass 1
// (ssd_mma_kernel). Pass 1, and an unsplit pass 2, wait for the kernels before them as usual: they
// read what those wrote from their first instruction on.
template <typename Tin, typename Tout, int kN, int kGroups, bool kStateOnly, int kStages = 2>
cudaError_t launch_ssd_mma_pass(const SsdArgs& a, const MmaSmem& lay, int64_t blocks, int ptiles,
                                const SegSplit& split, cudaStream_t stream) {
  auto kernel = ssd_mma_kernel<Tin, Tout, kN, kGroups, kStateOnly, kStages>;
  const cudaError_t err = allow_dynamic_smem(kernel, lay.bytes);
  if (err != cudaSuccess) return err;
  const bool x_async = x_rows_async<Tin>(a);
  if (!kStateOnly && split.segments > 1)
    return launch_pdl(kernel, static_cast<unsigned>(blocks), MmaShape<kGroups>::kThreads, lay.bytes, stream, a,
                      ptiles, x_async, split);
  kernel<<<static_cast<unsigned>(blocks), MmaShape<kGroups>::kThreads, lay.bytes, stream>>>(a, ptiles, x_async,
                                                                                             split);
  return launch_status();
}

// Whether pass 2 takes one stage of raw tiles: where that fits more blocks on an SM (per_sm_single
// against per_sm) and so splits the sequence into more segments. A chunk step is slower with one
// stage, so only the extra segments pay for it: on an H100 batch-1 prefill gained (B1 H24 f16: 8
// segments, 42.4 against 47.5 µs with 5, same run), while a grid that fills the GPU unsplit lost
// (B4 H64: 320 against 273 µs); docs/benchmarks.md, seventeenth session.
bool one_stage_pays(int64_t tiles, int chunks, int sms, int per_sm, int per_sm_single) {
  return per_sm_single > per_sm && wanted_segments(tiles, chunks, static_cast<int64_t>(sms) * per_sm_single, 1) >
                                       wanted_segments(tiles, chunks, static_cast<int64_t>(sms) * per_sm, 2);
}

// The register-resident chunked form with the state padded to kN, its sequence split by the
// workspace (ws, ws_bytes; see SegSplit), with `groups` warp groups (1 or 2; 0: two where that
// puts more warps on the busiest SM, see MmaShape) and `stages` stages of raw tiles in pass 2 (1
// or 2; 0: one where one_stage_pays, which also means one group). Pass 1 of a split always runs one
// group and two stages.
template <typename Tin, typename Tout, int kN>
cudaError_t launch_ssd_mma(const SsdArgs& a, int groups, int stages, int sms, void* ws, size_t ws_bytes,
                           cudaStream_t stream) {
  static_assert(kMmaGroupChoices[0] == 1 && kMmaGroupChoices[1] == 2, "instantiations below");
  const MmaSmem lay(kN, sizeof(Tin)), lay1(kN, sizeof(Tin), true), lay_single(kN, sizeof(Tin), false, 1);
  const int ptiles = (a.headdim + kColTile - 1) / kColTile;
  const int64_t tiles = static_cast<int64_t>(a.batch) * a.nheads * ptiles;
  int per_sm = 0, per_sm1 = 0, per_sm_single = 0;
  cudaError_t err = blocks_per_sm(ssd_mma_kernel<Tin, Tout, kN, 1, false>, MmaShape<1>::kThreads, lay.bytes, &per_sm);
  if (err == cudaSuccess)
    err = blocks_per_sm(ssd_mma_kernel<Tin, Tout, kN, 1, true>, MmaShape<1>::kThreads, lay1.bytes, &per_sm1);
  if (err == cudaSuccess && stages != 2 && groups != 2)  // (a one-stage pass 2 runs one group)
    err = blocks_per_sm(ssd_mma_kernel<Tin, Tout, kN, 1, false, 1>, MmaShape<1>::kThreads, lay_single.bytes,
                        &per_sm_single);
  if (err != cudaSuccess) return err;
  if (stages != 1 && stages != 2)
    stages = groups != 2 && one_stage_pays(tiles, (a.seqlen + kChunk - 1) / kChunk, sms, per_sm, per_sm_single) ? 1 : 2;
  if (stages == 1) {
    groups = 1;
    per_sm = per_sm_single;
  }
  const SegSplit split = split_for_device(tiles, a.seqlen, kN, static_cast<int64_t>(sms) * per_sm,
                                          static_cast<int64_t>(sms) * per_sm1, stages, ws, ws_bytes);
  const int64_t blocks = tiles * split.segments;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  if (groups != 1 && groups != 2) {  // (the one-group kernel's occupancy is per_sm, asked above)
    const int64_t w1 = busiest_sm_warps(per_sm, MmaShape<1>::kWarps, blocks, sms);
    int64_t w2 = 0;
    err = resident_warps(ssd_mma_kernel<Tin, Tout, kN, 2, false>, MmaShape<2>::kWarps, lay.bytes, blocks, sms, &w2);
    if (err != cudaSuccess) return err;
    groups = w2 > w1 ? 2 : 1;
  }
  if (split.segments > 1) {
    err = launch_ssd_mma_pass<Tin, Tout, kN, 1, true>(a, lay1, tiles * (split.segments - 1) * split.pieces, ptiles,
                                                      split, stream);
    if (err != cudaSuccess) return err;
  }
  if (stages == 1) return launch_ssd_mma_pass<Tin, Tout, kN, 1, false, 1>(a, lay_single, blocks, ptiles, split, stream);
  return groups == 2 ? launch_ssd_mma_pass<Tin, Tout, kN, 2, false>(a, lay, blocks, ptiles, split, stream)
                     : launch_ssd_mma_pass<Tin, Tout, kN, 1, false>(a, lay, blocks, ptiles, split, stream);
}

// The register-resident form's padded state size kN for `dstate` under `variant` (g_ssd_variant), 0
// where it does not apply (16-bit outputs only: the callers decide that).
int mma_state_pad(int dstate, int variant) {
  if (variant == 1 || variant == 2 || variant == 3 || dstate > kMmaMaxState) return 0;
  return dstate <= 64 ? 64 : 128;
}

// Prefill with 16-bit outputs: the register-resident chunked form where it applies (dstate <= 128
// and its shared memory fits: 110 KiB at dstate 128 for 16-bit inputs), its sequence split as far
// as the workspace allows, else the WMMA chunked form. `variant` (g_ssd_variant) 2 / 3 force the
// WMMA form with 8 / 16 warps, 4 / 5 the register-resident form with 1 / 2 warp groups and two
// stages, 6 with one group and one stage (where it applies).
template <typename Tin, typename Tout>
cudaError_t launch_ssd_prefill16(const SsdArgs& a, int variant, void* ws, size_t ws_bytes, cudaStream_t stream) {
  const int kn = mma_state_pad(a.dstate, variant);
  if (kn != 0) {
    int smem_max = 0, sms = 0;
    const cudaError_t err = device_limits(&smem_max, &sms);
    if (err != cudaSuccess) return err;
    if (MmaSmem(kn, sizeof(Tin)).bytes <= static_cast<size_t>(smem_max)) {
      const int groups = variant == 4 || variant == 6 ? 1 : variant == 5 ? 2 : 0;
      const int stages = variant == 4 || variant == 5 ? 2 : variant == 6 ? 1 : 0;
      return kn == 64 ? launch_ssd_mma<Tin, Tout, 64>(a, groups, stages, sms, ws, ws_bytes, stream)
                      : launch_ssd_mma<Tin, Tout, 128>(a, groups, stages, sms, ws, ws_bytes, stream);
    }
  }
  return launch_ssd_chunked<Tin, Tout>(a, variant == 2 ? 8 : variant == 3 ? 16 : 0, stream);
}

bool ssd_sizes_ok(int batch, int nheads, int headdim, int ngroups, int dstate) {
  return batch > 0 && nheads > 0 && headdim > 0 && ngroups > 0 && nheads % ngroups == 0 &&
         dstate > 0;
}

bool ssd_scales_ok(essm_dtype in, const essm_ssd_scales* s) {
  return in != ESSM_I8 ||
         (s != nullptr && s->x_scale != nullptr && s->B_scale != nullptr && s->C_scale != nullptr);
}

SsdArgs make_ssd_args(essm_dtype in_dtype, const void* x, const void* dt, const float* A,
                      const void* Bm, const void* Cm, const float* Dskip, const float* dt_bias,
                      int dt_softplus, float dt_min, float dt_max, const essm_ssd_scales* scales,
                      const float* initial_state, void* y, float* final_state, int batch,
                      int seqlen, int nheads, int headdim, int ngroups, int dstate) {
  const bool q = in_dtype == ESSM_I8;
  return SsdArgs{x,
                 dt,
                 A,
                 Bm,
                 Cm,
                 Dskip,
                 dt_bias,
                 dt_softplus,
                 dt_min,
                 dt_max,
                 q ? scales->x_scale : nullptr,
                 q ? scales->B_scale : nullptr,
                 q ? scales->C_scale : nullptr,
                 initial_state,
                 y,
                 final_state,
                 batch,
                 seqlen,
                 nheads,
                 headdim,
                 ngroups,
                 dstate};
}

}  // namespace
}  // namespace essm

extern "C" cudaError_t essm_ssd_scan_fwd(essm_dtype in_dtype, essm_dtype out_dtype, const void* x,
                                         const void* dt, const float* A, const void* Bm,
                                         const void* Cm, const float* Dskip,
                                         const float* dt_bias, int dt_softplus, float dt_min,
                                         float dt_max, const essm_ssd_scales* scales,
                                         const float* initial_state, void* y, float* final_state,
                                         int batch, int seqlen, int nheads, int headdim,
                                         int ngroups, int dstate, int chunk_size, void* workspace,
                                         size_t workspace_bytes, cudaStream_t stream) {
  using namespace essm;
  (void)chunk_size;  // a hint only: the chunked form uses its own chunk length (kChunk)
  if (!ssd_sizes_ok(batch, nheads, headdim, ngroups, dstate) || seqlen <= 0 ||
      dstate % kSsdStates != 0 || dstate > kSsdMaxState || x == nullptr || dt == nullptr ||
      A == nullptr || Bm == nullptr || Cm == nullptr || y == nullptr ||
      !ssd_scales_ok(in_dtype, scales) ||
      (workspace_bytes > 0 && (workspace == nullptr || reinterpret_cast<uintptr_t>(workspace) % 16 != 0)))
    return cudaErrorInvalidValue;
  const SsdArgs a = make_ssd_args(in_dtype, x, dt, A, Bm, Cm, Dskip, dt_bias, dt_softplus, dt_min,
                                  dt_max, scales, initial_state, y, final_state, batch, seqlen,
                                  nheads, headdim, ngroups, dstate);
  // B/C tiles move as 16-byte vectors
  if (reinterpret_cast<uintptr_t>(Bm) % 16 != 0 || reinterpret_cast<uintptr_t>(Cm) % 16 != 0)
    return cudaErrorInvalidValue;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    using Tin = decltype(ti);
    using Tout = decltype(to);
    // float32 outputs ask for float32 accuracy: the direct form; 16-bit outputs: tensor cores
    if constexpr (std::is_same<Tout, float>::value) {
      return launch_ssd_direct<Tin, Tout>(a, stream);
    } else {
      if (g_ssd_variant == 1) return launch_ssd_direct<Tin, Tout>(a, stream);
      return launch_ssd_prefill16<Tin, Tout>(a, g_ssd_variant, workspace, workspace_bytes, stream);
    }
  });
}

extern "C" size_t essm_ssd_scan_workspace_size(essm_dtype out_dtype, int max_batch, int max_seqlen, int nheads,
                                               int headdim, int dstate) {
  using namespace essm;
  const int kn = mma_state_pad(dstate, g_ssd_variant);
  if (out_dtype == ESSM_F32 || kn == 0 || max_batch <= 0 || max_seqlen <= 0 || nheads <= 0 || headdim <= 0)
    return 0;
  const int chunks = (max_seqlen + kChunk - 1) / kChunk;
  const int64_t tiles1 = static_cast<int64_t>(nheads) * ((headdim + kColTile - 1) / kColTile);
  // The largest need over batches 1 .. max_batch: a forced segment count needs the most at
  // max_batch; the heuristic's count falls as the batch grows and is 1 from kSplitBlocksOneStage tiles on.
  auto need = [&](int64_t batch) { return split_need(batch * tiles1, chunks, kn); };
  size_t most = need(max_batch);
  for (int64_t b = 1; b < std::min<int64_t>(max_batch, kSplitBlocksOneStage); ++b) most = std::max(most, need(b));
  return most;
}

extern "C" int essm_tuning_set_ssd_variant(int variant, int segments) {
  essm::g_ssd_variant = variant >= 1 && variant <= 6 ? variant : 0;
  essm::g_ssd_segments = segments >= 1 && segments <= essm::kMaxSegments ? segments : 0;
  return essm::g_ssd_variant;
}

extern "C" int essm_tuning_set_ssd_pieces(int pieces) {
  essm::g_ssd_pieces = pieces >= 1 && pieces <= essm::kMaxCarriedPieces ? pieces : 0;
  return essm::g_ssd_pieces;
}

extern "C" cudaError_t essm_ssd_state_update(essm_dtype in_dtype, essm_dtype out_dtype,
                                             const float* state_in, const void* x, const void* dt,
                                             const float* A, const void* Bm, const void* Cm,
                                             const float* Dskip, const float* dt_bias,
                                             int dt_softplus, float dt_min, float dt_max,
                                             const essm_ssd_scales* scales, void* y,
                                             float* state_out, int batch, int nheads, int headdim,
                                             int ngroups, int dstate, cudaStream_t stream) {
  using namespace essm;
  if (!ssd_sizes_ok(batch, nheads, headdim, ngroups, dstate) || dstate > kMaxDecodeStates ||
      state_in == nullptr || state_out == nullptr || x == nullptr || dt == nullptr || A == nullptr ||
      Bm == nullptr || Cm == nullptr || y == nullptr || !ssd_scales_ok(in_dtype, scales))
    return cudaErrorInvalidValue;
  const SsdArgs a = make_ssd_args(in_dtype, x, dt, A, Bm, Cm, Dskip, dt_bias, dt_softplus, dt_min,
                                  dt_max, scales, nullptr, y, nullptr, batch, 1, nheads, headdim,
                                  ngroups, dstate);
  const DecodeShape shape(dstate, aligned16(state_in) && aligned16(state_out));
  const int64_t threads = static_cast<int64_t>(batch) * nheads * headdim * shape.lanes;
  if (threads > kMaxDecodeThreads) return cudaErrorInvalidValue;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    return with_decode_shape(shape, [&](auto per, auto vec) {
      return launch_pdl(
          ssd_state_update_kernel<decltype(ti), decltype(to), decltype(per)::value, decltype(vec)::value>,
          ceil_div(threads, kSsdDecodeThreads), kSsdDecodeThreads, 0, stream, state_in, state_out, a,
          shape.lanes);
    });
  });
}
