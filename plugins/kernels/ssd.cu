// Mamba-2 SSD scan (prefill) and state update (decode), token-major layout, float and int8 x/B/C.
//
// Prefill has two forms (see docs/kernels.md):
// - chunked, on tensor cores (16-bit outputs): each block walks the sequence of one (batch, head,
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

// ---- decode: one (batch, head, headdim row) per `lanes` lanes, like the Mamba-1 update ----
constexpr int kSsdDecodeThreads = 128;

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kSsdDecodeThreads)
    ssd_state_update_kernel(const float* state_in, float* state_out, const SsdArgs p, int lanes) {
  const int64_t gthread = static_cast<int64_t>(blockIdx.x) * kSsdDecodeThreads + threadIdx.x;
  const int64_t row = gthread / lanes;  // (b, h, p)
  const int sub = static_cast<int>(gthread % lanes);
  const int H = p.nheads, P = p.headdim, N = p.dstate;
  const int64_t rows = static_cast<int64_t>(p.batch) * H * P;
  const bool active = row < rows;
  const int64_t rr = active ? row : 0;
  const int pp = static_cast<int>(rr % P);
  const int64_t bh = rr / P;
  const int h = static_cast<int>(bh % H), b = static_cast<int>(bh / H);
  const int g = h / (H / p.ngroups);
  const SsdHead hp(p, h, g);  // (inactive lanes read row 0's: valid addresses, results unused)
  const float xv = load1(static_cast<const Tin*>(p.x) + rr,
                         p.x_scale != nullptr ? p.x_scale[h * P + pp] : 1.f);
  const float dtv = ssd_dt(to_float(static_cast<const Tout*>(p.dt)[bh]), hp.dt_bias,
                           p.dt_softplus, p.dt_min, p.dt_max);
  const int64_t bc = (static_cast<int64_t>(b) * p.ngroups + g) * N;
  float acc = 0.f;
  if (active) {
    const float a = expf(dtv * hp.A);
    const float dtx = dtv * xv;
    for (int n = sub; n < N; n += lanes) {
      const float s = fmaf(a, state_in[rr * N + n],
                           dtx * load1(static_cast<const Tin*>(p.Bm) + bc + n, hp.B_scale));
      state_out[rr * N + n] = s;
      acc = fmaf(s, load1(static_cast<const Tin*>(p.Cm) + bc + n, hp.C_scale), acc);
    }
  }
  for (int off = lanes >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (active && sub == 0) {
    const float out = acc + hp.D * xv;
    static_cast<Tout*>(p.y)[rr] = from_float<Tout>(out);
  }
}

// Benchmark/tuning override (essm_tuning_set_ssd_variant): 0 = by output dtype, 1 = direct,
// 2 / 3 = chunked with 8 / 16 warps per block (16-bit outputs).
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

// Lets the chunked kernel with kWarps warps use the layout's dynamic shared memory (above 48 KiB
// needs the opt-in) before it is launched or its occupancy is asked for.
template <typename Tin, typename Tout, int kWarps>
cudaError_t allow_chunked_smem(const ChunkSmem& lay) {
  return cudaFuncSetAttribute(ssd_chunked_kernel<Tin, Tout, kWarps>,
                              cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(lay.bytes));
}

// Launches the chunked kernel with kWarps warps per block.
template <typename Tin, typename Tout, int kWarps>
cudaError_t launch_ssd_chunked_warps(const SsdArgs& a, const ChunkSmem& lay, int64_t blocks,
                                     int ptiles, cudaStream_t stream) {
  const cudaError_t err = allow_chunked_smem<Tin, Tout, kWarps>(lay);
  if (err != cudaSuccess) return err;
  // cp.async moves 16-byte words: x rows (and the head offset inside a row) must keep that alignment
  // (B/C rows always do: aligned base, dstate a multiple of 16); otherwise ordinary loads.
  const bool async = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && (a.headdim * sizeof(Tin)) % 16 == 0;
  ssd_chunked_kernel<Tin, Tout, kWarps>
      <<<static_cast<unsigned>(blocks), 32 * kWarps, lay.bytes, stream>>>(a, ptiles, async);
  return launch_status();
}

// Warps resident per SM for a launch of `blocks` blocks of kWarps warps (the busiest SM's share).
template <typename Tin, typename Tout, int kWarps>
cudaError_t chunked_resident_warps(const ChunkSmem& lay, int64_t blocks, int sms, int64_t* warps) {
  cudaError_t err = allow_chunked_smem<Tin, Tout, kWarps>(lay);
  int per_sm = 0;
  if (err == cudaSuccess)
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, ssd_chunked_kernel<Tin, Tout, kWarps>,
                                                        32 * kWarps, lay.bytes);
  if (err != cudaSuccess) return err;
  const int64_t share = (blocks + sms - 1) / sms;
  *warps = (share < per_sm ? share : per_sm) * kWarps;
  return cudaSuccess;
}

// The chunked form; the direct form where the chunked form's shared memory (it grows with dstate:
// 169 KiB for f16 at 256) exceeds the device's per-block limit (163 KiB on Orin, 227 KiB on H100).
// 16 warps per block where that puts more warps on the busiest SM than 8 (see kChunkWarpChoices),
// unless `warps` forces one.
template <typename Tin, typename Tout>
cudaError_t launch_ssd_chunked(const SsdArgs& a, int warps, cudaStream_t stream) {
  static_assert(kChunkWarpChoices[0] == 8 && kChunkWarpChoices[1] == 16, "instantiations below");
  const ChunkSmem lay(a.dstate, sizeof(Tin));
  int dev = 0, smem_max = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  if (lay.bytes > static_cast<size_t>(smem_max)) return launch_ssd_direct<Tin, Tout>(a, stream);
  const int ptiles = (a.headdim + kColTile - 1) / kColTile;
  const int64_t blocks = static_cast<int64_t>(a.batch) * a.nheads * ptiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  if (warps != 8 && warps != 16) {
    int64_t w8 = 0, w16 = 0;
    err = chunked_resident_warps<Tin, Tout, 8>(lay, blocks, sms, &w8);
    if (err == cudaSuccess) err = chunked_resident_warps<Tin, Tout, 16>(lay, blocks, sms, &w16);
    if (err != cudaSuccess) return err;
    warps = w16 > w8 ? 16 : 8;
  }
  return warps == 16 ? launch_ssd_chunked_warps<Tin, Tout, 16>(a, lay, blocks, ptiles, stream)
                     : launch_ssd_chunked_warps<Tin, Tout, 8>(a, lay, blocks, ptiles, stream);
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
                                         int ngroups, int dstate, int chunk_size,
                                         cudaStream_t stream) {
  using namespace essm;
  (void)chunk_size;  // a hint only: the chunked form uses its own chunk length (kChunk)
  if (!ssd_sizes_ok(batch, nheads, headdim, ngroups, dstate) || seqlen <= 0 ||
      dstate % kSsdStates != 0 || dstate > kSsdMaxState || x == nullptr || dt == nullptr ||
      A == nullptr || Bm == nullptr || Cm == nullptr || y == nullptr ||
      !ssd_scales_ok(in_dtype, scales))
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
      return launch_ssd_chunked<Tin, Tout>(a, g_ssd_variant == 2 ? 8 : g_ssd_variant == 3 ? 16 : 0,
                                           stream);
    }
  });
}

extern "C" int essm_tuning_set_ssd_variant(int variant) {
  essm::g_ssd_variant = variant >= 1 && variant <= 3 ? variant : 0;
  return essm::g_ssd_variant;
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
  if (!ssd_sizes_ok(batch, nheads, headdim, ngroups, dstate) || state_in == nullptr ||
      state_out == nullptr || x == nullptr || dt == nullptr || A == nullptr || Bm == nullptr ||
      Cm == nullptr || y == nullptr || !ssd_scales_ok(in_dtype, scales))
    return cudaErrorInvalidValue;
  const SsdArgs a = make_ssd_args(in_dtype, x, dt, A, Bm, Cm, Dskip, dt_bias, dt_softplus, dt_min,
                                  dt_max, scales, nullptr, y, nullptr, batch, 1, nheads, headdim,
                                  ngroups, dstate);
  const int lanes = lanes_per_row(dstate);
  const int64_t threads = static_cast<int64_t>(batch) * nheads * headdim * lanes;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    ssd_state_update_kernel<decltype(ti), decltype(to)>
        <<<ceil_div(threads, kSsdDecodeThreads), kSsdDecodeThreads, 0, stream>>>(
            state_in, state_out, a, lanes);
    return launch_status();
  });
}
