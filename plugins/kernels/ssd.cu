// Mamba-2 SSD scan (prefill) and state update (decode), token-major layout, float and int8 x/B/C.
//
// Prefill design (see docs/kernels.md): the recurrence is run directly (no chunked matmuls). One
// block owns one (batch, head) and a tile of kSsdRows headdim rows; warp w owns states
// n in [16w, 16w+16) and lane l owns headdim row p0 + l, so a thread keeps 16 states in
// registers. The block stages kSsdT tokens of B, C (dequantized), x, dt and the scalar decay
// exp(dt*A) in shared memory; every B/C read in the inner loop is a warp-wide broadcast. The
// per-warp partial y sums are reduced through shared memory once per token tile.
#include "common.cuh"

namespace essm {
namespace {

constexpr int kSsdRows = 32;     // headdim rows per block (one per lane)
constexpr int kSsdStates = 16;   // states per thread
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

__host__ __device__ inline int ssd_tokens_per_tile(int dstate) { return dstate <= 128 ? 16 : 8; }

// Shared memory (floats): B [T][N], C [T][N], x [T][32], dt [T], decay [T], y partials
// [T][N/16][32].
inline size_t ssd_smem_bytes(int dstate) {
  const size_t T = ssd_tokens_per_tile(dstate);
  const size_t warps = dstate / kSsdStates;
  return sizeof(float) * (2 * T * dstate + T * kSsdRows + 2 * T + T * warps * kSsdRows);
}

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kSsdMaxState / kSsdStates * 32)
    ssd_scan_fwd_kernel(const SsdArgs p, int ptiles) {
  extern __shared__ __align__(16) float sm[];
  const int N = p.dstate, L = p.seqlen, H = p.nheads, P = p.headdim, G = p.ngroups;
  const int T = ssd_tokens_per_tile(N);
  const int nwarps = N / kSsdStates;
  const int nthreads = nwarps * 32;
  const int ptile = blockIdx.x % ptiles;
  const int bh = blockIdx.x / ptiles;
  const int h = bh % H, b = bh / H;
  const int g = h / (H / G);
  const int p0 = ptile * kSsdRows;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int prow = p0 + lane;
  const bool prow_ok = prow < P;
  const int n0 = warp * kSsdStates;

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

  const int64_t state_row = ((static_cast<int64_t>(b) * H + h) * P + (prow_ok ? prow : 0)) * N;
  float S[kSsdStates];
#pragma unroll
  for (int k = 0; k < kSsdStates; ++k)
    S[k] = (p.initial_state != nullptr && prow_ok) ? p.initial_state[state_row + n0 + k] : 0.f;

  for (int t0 = 0; t0 < L; t0 += T) {
    // ---- stage a tile of tokens (padding tokens: dt = 0, decay = 1, x = 0: identity step)
    for (int idx = tid; idx < T * N; idx += nthreads) {
      const int t = idx / N, n = idx % N, tg = t0 + t;
      const int64_t off = ((static_cast<int64_t>(b) * L + tg) * G + g) * N + n;
      Bs[idx] = tg < L ? load1(Bm + off, Bsc) : 0.f;
      Cs[idx] = tg < L ? load1(Cm + off, Csc) : 0.f;
    }
    for (int idx = tid; idx < T * kSsdRows; idx += nthreads) {
      const int t = idx / kSsdRows, pl = idx % kSsdRows, tg = t0 + t, pp = p0 + pl;
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
    for (int t = 0; t < T; ++t) {
      const float a = decays[t];
      const float dtx = dts[t] * xs[t * kSsdRows + lane];
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
      ys[(t * nwarps + warp) * kSsdRows + lane] = acc0 + acc1;
    }
    __syncthreads();

    // ---- reduce the per-warp partials, add the D skip, store
    for (int idx = tid; idx < T * kSsdRows; idx += nthreads) {
      const int t = idx / kSsdRows, pl = idx % kSsdRows, tg = t0 + t, pp = p0 + pl;
      if (tg >= L || pp >= P) continue;
      float acc = Dh * xs[idx];
      for (int w = 0; w < nwarps; ++w) acc += ys[(t * nwarps + w) * kSsdRows + pl];
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
  const int ptiles = (headdim + kSsdRows - 1) / kSsdRows;
  const int64_t blocks = static_cast<int64_t>(batch) * nheads * ptiles;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  const int threads = dstate / kSsdStates * 32;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    ssd_scan_fwd_kernel<decltype(ti), decltype(to)>
        <<<static_cast<unsigned>(blocks), threads, ssd_smem_bytes(dstate), stream>>>(a, ptiles);
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
