// Mamba-1 selective scan (prefill) and selective state update (decode), float and int8 inputs.
//
// Prefill design (see docs/kernels.md): one block of kScanThreads threads owns kRows channels of
// one batch element and walks the sequence in chunks of kScanThreads * kScanItems tokens. Every
// thread holds kScanItems consecutive tokens of each of its rows in registers. For each state n
// the recurrence h_t = a_t h_{t-1} + b_t is a composition of affine maps, so the chunk is scanned
// in parallel: a sequential fold over the thread's items, a warp shuffle scan of the per-thread
// (prod a, h) pairs, and a cross-warp combine through shared memory with the carry from the
// previous chunk. The a_t = exp(dt_t A_n) values stay in registers between the two passes, so
// each (token, channel, state) costs one exp2 and six FMA-pipe operations.
#include "common.cuh"

namespace essm {
namespace {

constexpr int kScanThreads = 128;
constexpr int kScanItems = 8;
constexpr int kScanChunk = kScanThreads * kScanItems;
constexpr int kScanWarps = kScanThreads / 32;

struct ScanArgs {
  const void* u;
  const void* delta;
  const float* A;
  const void* Bm;
  const void* Cm;
  const float* Dskip;
  const void* z;
  const float* delta_bias;
  int delta_softplus;
  const float* u_scale;  // per channel, NULL = 1
  float delta_scale, B_scale, C_scale, z_scale;
  const float* initial_state;
  void* y;
  float* final_state;
  int batch, dim, dstate, seqlen;
};

// Shared memory: A*log2(e) [R][N], carry [2][N][R] (double-buffered by chunk parity), warp
// aggregates [2][kScanWarps][R][2] (double-buffered by (chunk, state) iteration parity), so each
// state step needs a single __syncthreads.
template <int R>
size_t scan_smem_bytes(int dstate) {
  return sizeof(float) * (static_cast<size_t>(R) * dstate + 2 * static_cast<size_t>(dstate) * R +
                          2 * kScanWarps * R * 2);
}

template <typename Tin, typename Tout, int R>
__global__ void __launch_bounds__(kScanThreads)
    selective_scan_fwd_kernel(const ScanArgs p) {
  extern __shared__ float smem[];
  const int N = p.dstate, L = p.seqlen, dim = p.dim;
  const int row_groups = (dim + R - 1) / R;
  const int b = blockIdx.x / row_groups;
  const int d0 = (blockIdx.x % row_groups) * R;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* A2s = smem;
  float* carry = A2s + R * N;
  float* wtot = carry + 2 * N * R;

  for (int idx = tid; idx < R * N; idx += kScanThreads) {
    const int r = idx / N, n = idx % N, d = d0 + r;
    const bool ok = d < dim;
    A2s[idx] = ok ? p.A[static_cast<int64_t>(d) * N + n] * kLog2e : 0.f;
    carry[n * R + r] = ok && p.initial_state != nullptr
                           ? p.initial_state[(static_cast<int64_t>(b) * dim + d) * N + n]
                           : 0.f;
  }
  float Dv[R], dbias[R], uscale[R];
  int64_t row_off[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int d = min(d0 + r, dim - 1);  // rows past dim compute on zeros and are not stored
    Dv[r] = p.Dskip != nullptr ? p.Dskip[d] : 0.f;
    dbias[r] = p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;
    uscale[r] = p.u_scale != nullptr ? p.u_scale[d] : 1.f;
    row_off[r] = (static_cast<int64_t>(b) * dim + d) * L;
  }
  const Tin* u = static_cast<const Tin*>(p.u);
  const Tin* delta = static_cast<const Tin*>(p.delta);
  const Tin* Bm = static_cast<const Tin*>(p.Bm) + static_cast<int64_t>(b) * N * L;
  const Tin* Cm = static_cast<const Tin*>(p.Cm) + static_cast<int64_t>(b) * N * L;
  __syncthreads();

  int it = 0;
  int chunk = 0;
  for (int t0 = 0; t0 < L; t0 += kScanChunk, ++chunk) {
    const int tt = t0 + tid * kScanItems;
    const int valid = L - tt;
    float dt[R][kScanItems], dtu[R][kScanItems], y[R][kScanItems];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float uu[kScanItems], dd[kScanItems];
      const bool row_ok = d0 + r < dim;
      load_run<Tin, kScanItems>(u + row_off[r] + tt, row_ok ? valid : 0, uscale[r], uu);
      load_run<Tin, kScanItems>(delta + row_off[r] + tt, row_ok ? valid : 0, p.delta_scale, dd);
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        float v = dd[i] + dbias[r];
        if (p.delta_softplus) v = softplus(v);
        // Padding tokens get dt = 0: a = 1, b = 0 is the identity map, so they leave the
        // carry untouched.
        dt[r][i] = (row_ok && i < valid) ? v : 0.f;
        dtu[r][i] = dt[r][i] * uu[i];
        y[r][i] = Dv[r] * uu[i];
      }
    }

    for (int n = 0; n < N; ++n, ++it) {
      float Bv[kScanItems], Cv[kScanItems];
      load_run<Tin, kScanItems>(Bm + static_cast<int64_t>(n) * L + tt, valid, p.B_scale, Bv);
      load_run<Tin, kScanItems>(Cm + static_cast<int64_t>(n) * L + tt, valid, p.C_scale, Cv);
      float a[R][kScanItems], h[R][kScanItems], Agg[R], Hagg[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float A2 = A2s[r * N + n];
        Agg[r] = 1.f;
        Hagg[r] = 0.f;
#pragma unroll
        for (int i = 0; i < kScanItems; ++i) {
          a[r][i] = fast_exp2(dt[r][i] * A2);
          h[r][i] = dtu[r][i] * Bv[i];
          Hagg[r] = fmaf(a[r][i], Hagg[r], h[r][i]);
          Agg[r] *= a[r][i];
        }
      }
      // Inclusive warp scan of the per-thread affine maps (earlier map applied first).
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float Ap = __shfl_up_sync(0xffffffffu, Agg[r], off);
          const float Hp = __shfl_up_sync(0xffffffffu, Hagg[r], off);
          if (lane >= off) {
            Hagg[r] = fmaf(Agg[r], Hp, Hagg[r]);
            Agg[r] *= Ap;
          }
        }
      }
      float* wb = wtot + (it & 1) * (kScanWarps * R * 2);
      if (lane == 31) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
          wb[(warp * R + r) * 2] = Agg[r];
          wb[(warp * R + r) * 2 + 1] = Hagg[r];
        }
      }
      float Aex[R], Hex[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        Aex[r] = __shfl_up_sync(0xffffffffu, Agg[r], 1);
        Hex[r] = __shfl_up_sync(0xffffffffu, Hagg[r], 1);
        if (lane == 0) {
          Aex[r] = 1.f;
          Hex[r] = 0.f;
        }
      }
      __syncthreads();
      const float* cin = carry + (chunk & 1) * N * R;
      float* cout = carry + ((chunk + 1) & 1) * N * R;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float hs = cin[n * R + r];
#pragma unroll
        for (int w = 0; w < kScanWarps; ++w)
          if (w < warp) hs = fmaf(wb[(w * R + r) * 2], hs, wb[(w * R + r) * 2 + 1]);
        hs = fmaf(Aex[r], hs, Hex[r]);
#pragma unroll
        for (int i = 0; i < kScanItems; ++i) {
          hs = fmaf(a[r][i], hs, h[r][i]);
          y[r][i] = fmaf(hs, Cv[i], y[r][i]);
        }
        if (tid == kScanThreads - 1) cout[n * R + r] = hs;
      }
    }

    Tout* yout = static_cast<Tout*>(p.y);
    const Tin* z = static_cast<const Tin*>(p.z);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (d0 + r >= dim) continue;
      if (z != nullptr) {
        float zz[kScanItems];
        load_run<Tin, kScanItems>(z + row_off[r] + tt, valid, p.z_scale, zz);
#pragma unroll
        for (int i = 0; i < kScanItems; ++i) y[r][i] *= silu(zz[i]);
      }
      store_run<Tout, kScanItems>(yout + row_off[r] + tt, valid, y[r]);
    }
  }
  __syncthreads();
  if (p.final_state != nullptr) {
    const float* cfin = carry + (chunk & 1) * N * R;
    for (int idx = tid; idx < R * N; idx += kScanThreads) {
      const int r = idx / N, n = idx % N, d = d0 + r;
      if (d < dim) p.final_state[(static_cast<int64_t>(b) * dim + d) * N + n] = cfin[n * R + r];
    }
  }
}

// Benchmark/tuning override of the rows (channels) per thread; 0 = heuristic.
int g_scan_rows_override = 0;

template <typename Tin, typename Tout, int R>
cudaError_t launch_scan(const ScanArgs& a, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(a.batch) * ((a.dim + R - 1) / R);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  selective_scan_fwd_kernel<Tin, Tout, R>
      <<<static_cast<unsigned>(blocks), kScanThreads, scan_smem_bytes<R>(a.dstate), stream>>>(a);
  return launch_status();
}

// Estimated cost of a configuration: waves of resident blocks times the work of one block.
template <typename Tin, typename Tout, int R>
cudaError_t scan_cost(const ScanArgs& a, int sms, int64_t* cost) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, selective_scan_fwd_kernel<Tin, Tout, R>, kScanThreads, scan_smem_bytes<R>(a.dstate));
  if (err != cudaSuccess) return err;
  const int64_t blocks = static_cast<int64_t>(a.batch) * ((a.dim + R - 1) / R);
  const int64_t resident = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * sms;
  *cost = (blocks + resident - 1) / resident * R;
  return cudaSuccess;
}

template <typename Tin, typename Tout>
cudaError_t run_scan(const ScanArgs& a, cudaStream_t stream) {
  int rows = g_scan_rows_override;
  if (rows != 1 && rows != 2) {
    int dev = 0, sms = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    int64_t c1 = 0, c2 = 0;
    if (err == cudaSuccess) err = scan_cost<Tin, Tout, 1>(a, sms, &c1);
    if (err == cudaSuccess) err = scan_cost<Tin, Tout, 2>(a, sms, &c2);
    if (err != cudaSuccess) return err;
    rows = c2 <= c1 ? 2 : 1;  // ties go to 2 rows: half the L2 traffic for B and C
  }
  return rows == 2 ? launch_scan<Tin, Tout, 2>(a, stream) : launch_scan<Tin, Tout, 1>(a, stream);
}

// ---- decode --------------------------------------------------------------------------------
// h_n <- exp(dt * A_n) h_n + dtx * B_n over the lane's states; returns sum_n h_n C_n reduced over
// the `lanes` lanes of the row (all lanes of the warp must call this).
template <typename Tin>
__device__ float update_state_row(const float* s_in, float* s_out, const float* A_row,
                                  int a_stride, const Tin* Brow, const Tin* Crow, float B_scale,
                                  float C_scale, float dt, float dtx, int N, int sub, int lanes,
                                  bool active) {
  float acc = 0.f;
  if (active) {
    for (int n = sub; n < N; n += lanes) {
      const float a = expf(dt * A_row[n * a_stride]);
      const float h = fmaf(a, s_in[n], dtx * load1(Brow + n, B_scale));
      s_out[n] = h;
      acc = fmaf(h, load1(Crow + n, C_scale), acc);
    }
  }
  for (int off = lanes >> 1; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  return acc;
}

struct StateUpdateArgs {
  const float* state_in;
  const void* x;
  const void* dt;
  const float* A;
  const void* Bm;
  const void* Cm;
  const float* Dskip;
  const void* z;
  const float* dt_bias;
  int dt_softplus;
  const float* x_scale;
  float dt_scale, B_scale, C_scale, z_scale;
  void* y;
  float* state_out;
  int batch, dim, dstate;
};

constexpr int kDecodeThreads = 128;

// state_in/state_out may alias: every state element is read and then written by one thread.
template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kDecodeThreads)
    selective_state_update_kernel(const StateUpdateArgs p, int lanes) {
  const int64_t gthread = static_cast<int64_t>(blockIdx.x) * kDecodeThreads + threadIdx.x;
  const int64_t row = gthread / lanes;  // (b, d)
  const int sub = static_cast<int>(gthread % lanes);
  const int64_t rows = static_cast<int64_t>(p.batch) * p.dim;
  const bool active = row < rows;
  const int64_t rr = active ? row : 0;
  const int b = static_cast<int>(rr / p.dim), d = static_cast<int>(rr % p.dim);
  const int N = p.dstate;
  const float xv = load1(static_cast<const Tin*>(p.x) + rr, p.x_scale ? p.x_scale[d] : 1.f);
  float dtv = load1(static_cast<const Tin*>(p.dt) + rr, p.dt_scale) + (p.dt_bias ? p.dt_bias[d] : 0.f);
  if (p.dt_softplus) dtv = softplus(dtv);
  const float acc = update_state_row<Tin>(
      p.state_in + rr * N, p.state_out + rr * N, p.A + static_cast<int64_t>(d) * N, 1,
      static_cast<const Tin*>(p.Bm) + static_cast<int64_t>(b) * N,
      static_cast<const Tin*>(p.Cm) + static_cast<int64_t>(b) * N, p.B_scale, p.C_scale, dtv,
      dtv * xv, N, sub, lanes, active);
  if (active && sub == 0) {
    float out = acc + (p.Dskip ? p.Dskip[d] : 0.f) * xv;
    if (p.z != nullptr) out *= silu(load1(static_cast<const Tin*>(p.z) + rr, p.z_scale));
    static_cast<Tout*>(p.y)[rr] = from_float<Tout>(out);
  }
}

bool scan_scales_ok(essm_dtype in, const essm_scan_scales* s) {
  return in != ESSM_I8 || (s != nullptr && s->u_scale != nullptr);
}

}  // namespace
}  // namespace essm

extern "C" int essm_tuning_set_scan_rows(int rows) {
  essm::g_scan_rows_override = (rows == 1 || rows == 2) ? rows : 0;
  return essm::g_scan_rows_override;
}

extern "C" cudaError_t essm_selective_scan_fwd(
    essm_dtype in_dtype, essm_dtype out_dtype, const void* u, const void* delta, const float* A,
    const void* Bm, const void* Cm, const float* Dskip, const void* z, const float* delta_bias,
    int delta_softplus, const essm_scan_scales* scales, const float* initial_state, void* y,
    float* final_state, int batch, int dim, int dstate, int seqlen, cudaStream_t stream) {
  using namespace essm;
  if (batch <= 0 || dim <= 0 || dstate <= 0 || dstate > 256 || seqlen <= 0 || u == nullptr ||
      delta == nullptr || A == nullptr || Bm == nullptr || Cm == nullptr || y == nullptr ||
      !scan_scales_ok(in_dtype, scales))
    return cudaErrorInvalidValue;
  const bool q = in_dtype == ESSM_I8;
  const ScanArgs a{u,
                   delta,
                   A,
                   Bm,
                   Cm,
                   Dskip,
                   z,
                   delta_bias,
                   delta_softplus,
                   q ? scales->u_scale : nullptr,
                   q ? scales->delta_scale : 1.f,
                   q ? scales->B_scale : 1.f,
                   q ? scales->C_scale : 1.f,
                   q ? scales->z_scale : 1.f,
                   initial_state,
                   y,
                   final_state,
                   batch,
                   dim,
                   dstate,
                   seqlen};
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    return run_scan<decltype(ti), decltype(to)>(a, stream);
  });
}

extern "C" cudaError_t essm_selective_state_update(
    essm_dtype in_dtype, essm_dtype out_dtype, const float* state_in, const void* x,
    const void* dt, const float* A, const void* Bm, const void* Cm, const float* Dskip,
    const void* z, const float* dt_bias, int dt_softplus, const essm_scan_scales* scales, void* y,
    float* state_out, int batch, int dim, int dstate, cudaStream_t stream) {
  using namespace essm;
  if (batch <= 0 || dim <= 0 || dstate <= 0 || state_in == nullptr || x == nullptr ||
      dt == nullptr || A == nullptr || Bm == nullptr || Cm == nullptr || y == nullptr ||
      state_out == nullptr || !scan_scales_ok(in_dtype, scales))
    return cudaErrorInvalidValue;
  const bool q = in_dtype == ESSM_I8;
  const StateUpdateArgs a{state_in,
                          x,
                          dt,
                          A,
                          Bm,
                          Cm,
                          Dskip,
                          z,
                          dt_bias,
                          dt_softplus,
                          q ? scales->u_scale : nullptr,
                          q ? scales->delta_scale : 1.f,
                          q ? scales->B_scale : 1.f,
                          q ? scales->C_scale : 1.f,
                          q ? scales->z_scale : 1.f,
                          y,
                          state_out,
                          batch,
                          dim,
                          dstate};
  const int lanes = lanes_per_row(dstate);
  const int64_t threads = static_cast<int64_t>(batch) * dim * lanes;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    selective_state_update_kernel<decltype(ti), decltype(to)>
        <<<ceil_div(threads, kDecodeThreads), kDecodeThreads, 0, stream>>>(a, lanes);
    return launch_status();
  });
}
