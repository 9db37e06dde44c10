// Mamba-2 SSD scan (prefill) and state update (decode), token-major layout, float and int8 x/B/C.
//
// Prefill design (see docs/kernels.md): the recurrence is run directly (no chunked matmuls). One
// block owns one (batch, head) and a tile of kSsdRows headdim rows; thread (row p, state group g)
// keeps the 16 states n in [16g, 16g+16) of row p in registers. The block stages a tile of tokens
// of B and C (dequantized, float) in shared memory; their global loads are 16-byte vectors issued
// one tile ahead (register double buffering) so their latency overlaps the current tile's work.
// The per-group partial y sums are reduced through shared memory once per tile.
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

  const float Ah = p.A[h];
  const float bias = p.dt_bias != nullptr ? p.dt_bias[h] : 0.f;
  const float Dh = p.Dskip != nullptr ? p.Dskip[h] : 0.f;
  const float Bsc = p.B_scale != nullptr ? p.B_scale[g] : 1.f;
  const float Csc = p.C_scale != nullptr ? p.C_scale[g] : 1.f;
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
  const float xv = load1(static_cast<const Tin*>(p.x) + rr,
                         p.x_scale != nullptr ? p.x_scale[h * P + pp] : 1.f);
  const float dtv = ssd_dt(to_float(static_cast<const Tout*>(p.dt)[bh]),
                           p.dt_bias != nullptr ? p.dt_bias[h] : 0.f, p.dt_softplus, p.dt_min,
                           p.dt_max);
  const int64_t bc = (static_cast<int64_t>(b) * p.ngroups + g) * N;
  float acc = 0.f;
  if (active) {
    const float a = expf(dtv * p.A[h]);
    const float dtx = dtv * xv;
    const float Bsc = p.B_scale != nullptr ? p.B_scale[g] : 1.f;
    const float Csc = p.C_scale != nullptr ? p.C_scale[g] : 1.f;
    for (int n = sub; n < N; n += lanes) {
      const float s = fmaf(a, state_in[rr * N + n],
                           dtx * load1(static_cast<const Tin*>(p.Bm) + bc + n, Bsc));
      state_out[rr * N + n] = s;
      acc = fmaf(s, load1(static_cast<const Tin*>(p.Cm) + bc + n, Csc), acc);
    }
  }
  for (int off = lanes >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (active && sub == 0) {
    const float out = acc + (p.Dskip != nullptr ? p.Dskip[h] : 0.f) * xv;
    static_cast<Tout*>(p.y)[rr] = from_float<Tout>(out);
  }
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
  (void)chunk_size;  // a hint only: this kernel's result does not depend on chunking
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
  const int ptiles = (headdim + kSsdRows - 1) / kSsdRows;
  const int64_t blocks = static_cast<int64_t>(batch) * nheads * ptiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int threads = dstate / kSsdStates * kSsdRows;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    using Tin = decltype(ti);
    ssd_scan_fwd_kernel<Tin, decltype(to)>
        <<<static_cast<unsigned>(blocks), threads, ssd_smem_bytes<Tin>(dstate), stream>>>(a,
                                                                                   ptiles);
    return launch_status();
  });
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
