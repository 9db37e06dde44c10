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
  // int8 dequantization scales (device pointers, NULL for float io): u_scale per channel, the
  // others per tensor ([1]), read by the kernels so that a launch never waits on the host.
  const float* u_scale;
  const float *delta_scale, *B_scale, *C_scale, *z_scale;
  const float* initial_state;
  void* y;
  float* final_state;
  int batch, dim, dstate, seqlen;
};

// A scale pointer's value (1 for NULL, i.e. float io, whose loads ignore the scale anyway).
__device__ __forceinline__ float scale_at(const float* s, int64_t i) {
  return s != nullptr ? __ldg(s + i) : 1.f;
}

// softplus with the mamba_ssm threshold (x for x > 20) as max(x, 0) + log1p(t), t = exp(-|x|),
// and log1p(t) = 2 atanh(s), s = t / (2 + t) in [0, 1/3], by its odd series to s^13 (truncation
// < 1.4e-8 relative). About 16 instructions against ~40 for log1pf(expf(x)); the error is the
// ex2.approx/division rounding (a few 1e-7 relative) and keeps its relative size for x << 0.
// Runs once per (token, channel) per pass in the prefill scans.
__device__ __forceinline__ float fast_softplus(float x) {
  if (x > 20.f) return x;
  const float t = fast_exp2(-fabsf(x) * kLog2e);
  const float s = __fdividef(t, 2.f + t);
  const float s2 = s * s;
  float q = 2.f / 13.f;
  q = fmaf(q, s2, 2.f / 11.f);
  q = fmaf(q, s2, 2.f / 9.f);
  q = fmaf(q, s2, 2.f / 7.f);
  q = fmaf(q, s2, 2.f / 5.f);
  q = fmaf(q, s2, 2.f / 3.f);
  q = fmaf(q, s2, 2.f);
  return fmaxf(x, 0.f) + s * q;
}

// x * sigmoid(x) with ex2.approx and an approximate division (a few ulp; x < -88 gives -0).
__device__ __forceinline__ float fast_silu(float x) {
  return __fdividef(x, 1.f + fast_exp2(-x * kLog2e));
}

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
  // Per-tensor scales, once per thread (a broadcast load per block).
  const float dscale = scale_at(p.delta_scale, 0), Bscale = scale_at(p.B_scale, 0);
  const float Cscale = scale_at(p.C_scale, 0), zscale = scale_at(p.z_scale, 0);
  float Dv[R], dbias[R], uscale[R];
  int64_t row_off[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int d = min(d0 + r, dim - 1);  // rows past dim compute on zeros and are not stored
    Dv[r] = p.Dskip != nullptr ? p.Dskip[d] : 0.f;
    dbias[r] = p.delta_bias != nullptr ? p.delta_bias[d] : 0.f;
    uscale[r] = scale_at(p.u_scale, d);
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
      load_run<Tin, kScanItems>(delta + row_off[r] + tt, row_ok ? valid : 0, dscale, dd);
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        float v = dd[i] + dbias[r];
        if (p.delta_softplus) v = fast_softplus(v);
        // Padding tokens get dt = 0: a = 1, b = 0 is the identity map, so they leave the
        // carry untouched.
        dt[r][i] = (row_ok && i < valid) ? v : 0.f;
        dtu[r][i] = dt[r][i] * uu[i];
        y[r][i] = Dv[r] * uu[i];
      }
    }

    // B/C rows of state n are loaded one iteration ahead so that their latency overlaps the
    // previous state's scan.
    float Bn[kScanItems], Cn[kScanItems];
    load_run<Tin, kScanItems>(Bm + tt, valid, Bscale, Bn);
    load_run<Tin, kScanItems>(Cm + tt, valid, Cscale, Cn);
    for (int n = 0; n < N; ++n, ++it) {
      float Bv[kScanItems], Cv[kScanItems];
#pragma unroll
      for (int i = 0; i < kScanItems; ++i) {
        Bv[i] = Bn[i];
        Cv[i] = Cn[i];
      }
      if (n + 1 < N) {
        load_run<Tin, kScanItems>(Bm + static_cast<int64_t>(n + 1) * L + tt, valid, Bscale, Bn);
        load_run<Tin, kScanItems>(Cm + static_cast<int64_t>(n + 1) * L + tt, valid, Cscale, Cn);
      }
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
        load_run<Tin, kScanItems>(z + row_off[r] + tt, valid, zscale, zz);
#pragma unroll
        for (int i = 0; i < kScanItems; ++i) y[r][i] *= fast_silu(zz[i]);
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

// ---- segmented sequential variant (dstate <= 16) ---------------------------------------------
// Thread (channel c, segment s) keeps all (<= 16) states of its channel in registers and walks its
// segment of the sequence token by token: per (token, state) one exp2 and four FMA-pipe
// operations, no shuffles and no per-state barriers. B and C of kSeqTile tokens of every segment
// are staged in shared memory (transposed to [token][state], so the inner loop reads them as
// warp-broadcast float4s). The global loads of the next tile (B/C staging, u/delta, raw in
// registers) are issued before the current tile is computed, so their latency hides behind it.
// With S > 1 segments the scan runs twice: pass 1 computes each segment's end state from a zero
// state and its sum of dt, a short sequential combine over the segments gives every segment its
// true initial state (the decay over a segment is exp(A * sum dt)), and pass 2 recomputes the
// segment from it while producing y.
constexpr int kSeqThreads = 128;
constexpr int kSeqStates = 16;
constexpr int kSeqTile = 8;
constexpr int kSeqMaxSegs = 32;
constexpr int kSeqSegStride = kSeqTile * kSeqStates + 4;  // +4 floats: segments hit distinct banks

size_t seq_smem_bytes(int segs) {
  const size_t tiles = 2 * static_cast<size_t>(segs) * kSeqSegStride;
  const size_t combine = 2 * kSeqThreads * kSeqStates + kSeqThreads;
  return sizeof(float) * (tiles > combine ? tiles : combine);
}

// (segment, state) runs of B/C that each thread stages per tile: segs * kSeqStates / kSeqThreads,
// rounded up (a compile-time bound, so the prefetch registers are sized per launch).
constexpr int seq_stage_iters(int segs) {
  return (segs * kSeqStates + kSeqThreads - 1) / kSeqThreads;
}

// Raw B (and C) of the thread's staging runs for one tile, held in registers until stored.
template <typename Tin, int kIters>
struct SeqStage {
  Tin b[kIters][kSeqTile];
  Tin c[kIters][kSeqTile];
};

// Issues the loads of B (and C when `with_c`) for tokens [s*seg_len + t0, +kSeqTile) of every
// segment s (zeros past the sequence end and for states >= dstate).
template <typename Tin, int kIters>
__device__ __forceinline__ void seq_fetch(SeqStage<Tin, kIters>& st, bool with_c, const Tin* Bb,
                                          const Tin* Cb, int N, int L, int segs, int seg_len,
                                          int t0) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = static_cast<int>(threadIdx.x) + it * kSeqThreads;
    const int seg = idx / kSeqStates, n = idx % kSeqStates;
    const int tok = seg * seg_len + t0;
    const int valid = (idx < segs * kSeqStates && n < N) ? L - tok : 0;
    const int64_t off = valid > 0 ? static_cast<int64_t>(n) * L + tok : 0;
    fetch_run<Tin, kSeqTile>(Bb + off, valid, st.b[it]);
    if (with_c) fetch_run<Tin, kSeqTile>(Cb + off, valid, st.c[it]);
  }
}

// Stores the fetched runs into Bs/Cs[s][token][state] as float.
template <typename Tin, int kIters>
__device__ __forceinline__ void seq_put(float* Bs, float* Cs, const SeqStage<Tin, kIters>& st,
                                        bool with_c, float B_scale, float C_scale, int segs) {
#pragma unroll
  for (int it = 0; it < kIters; ++it) {
    const int idx = static_cast<int>(threadIdx.x) + it * kSeqThreads;
    if (idx >= segs * kSeqStates) break;
    const int seg = idx / kSeqStates, n = idx % kSeqStates;
#pragma unroll
    for (int i = 0; i < kSeqTile; ++i)
      Bs[seg * kSeqSegStride + i * kSeqStates + n] = dequant(st.b[it][i], B_scale);
    if (with_c) {
#pragma unroll
      for (int i = 0; i < kSeqTile; ++i)
        Cs[seg * kSeqSegStride + i * kSeqStates + n] = dequant(st.c[it][i], C_scale);
    }
  }
}

// Raw u and delta of the thread's channel for one tile.
template <typename Tin>
struct SeqTok {
  Tin u[kSeqTile];
  Tin d[kSeqTile];
};

template <typename Tin>
__device__ __forceinline__ void seq_fetch_tok(SeqTok<Tin>& tk, const ScanArgs& p, int64_t row_off,
                                              int tok, bool row_ok) {
  const int valid = row_ok ? p.seqlen - tok : 0;
  fetch_run<Tin, kSeqTile>(static_cast<const Tin*>(p.u) + row_off + tok, valid, tk.u);
  fetch_run<Tin, kSeqTile>(static_cast<const Tin*>(p.delta) + row_off + tok, valid, tk.d);
}

// dt (softplus'd, 0 on padding tokens so that they are identity steps) and u of one tile.
template <typename Tin>
__device__ __forceinline__ void seq_dt_u(const SeqTok<Tin>& tk, const ScanArgs& p, int tok,
                                         bool row_ok, float dbias, float uscale, float dscale,
                                         float (&dt)[kSeqTile], float (&uu)[kSeqTile]) {
  const int valid = row_ok ? p.seqlen - tok : 0;
#pragma unroll
  for (int i = 0; i < kSeqTile; ++i) {
    uu[i] = dequant(tk.u[i], uscale);
    float v = dequant(tk.d[i], dscale) + dbias;
    if (p.delta_softplus) v = fast_softplus(v);
    dt[i] = i < valid ? v : 0.f;
  }
}

// One tile of the recurrence over the thread's states; accumulates y[i] = sum_n h_n C_n when
// kOutput (pass 2), otherwise only advances h (pass 1).
template <bool kOutput>
__device__ __forceinline__ void seq_tile(float (&h)[kSeqStates], const float (&A2)[kSeqStates],
                                         const float (&dt)[kSeqTile], const float (&uu)[kSeqTile],
                                         const float* Bs, const float* Cs, float (&y)[kSeqTile]) {
#pragma unroll
  for (int i = 0; i < kSeqTile; ++i) {
    const float dtu = dt[i] * uu[i];
    const float4* B4 = reinterpret_cast<const float4*>(Bs + i * kSeqStates);
    const float4* C4 = reinterpret_cast<const float4*>(Cs + i * kSeqStates);
    float acc0 = 0.f, acc1 = 0.f;
#pragma unroll
    for (int q = 0; q < kSeqStates / 4; ++q) {
      const float4 bb = B4[q];
      const float bv[4] = {bb.x, bb.y, bb.z, bb.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = 4 * q + j;
        h[n] = fmaf(fast_exp2(dt[i] * A2[n]), h[n], dtu * bv[j]);
      }
      if (kOutput) {
        const float4 cc = C4[q];
        acc0 = fmaf(h[4 * q], cc.x, acc0);
        acc1 = fmaf(h[4 * q + 1], cc.y, acc1);
        acc0 = fmaf(h[4 * q + 2], cc.z, acc0);
        acc1 = fmaf(h[4 * q + 3], cc.w, acc1);
      }
    }
    if (kOutput) y[i] += acc0 + acc1;
  }
}

template <typename Tin, typename Tout, int kIters>
__global__ void __launch_bounds__(kSeqThreads)
    selective_scan_seq_kernel(const ScanArgs p, int segs, int seg_len) {
  extern __shared__ __align__(16) float sm[];
  const int N = p.dstate, L = p.seqlen, dim = p.dim;
  const int CH = kSeqThreads / segs;
  const int tid = threadIdx.x, c = tid % CH, seg = tid / CH;
  const int groups = (dim + CH - 1) / CH;
  const int b = blockIdx.x / groups;
  const int d0 = (blockIdx.x % groups) * CH;
  const int d = d0 + c;
  const bool row_ok = d < dim;
  const int dc = row_ok ? d : dim - 1;
  const int64_t row_off = (static_cast<int64_t>(b) * dim + dc) * L;
  float A2[kSeqStates];
#pragma unroll
  for (int n = 0; n < kSeqStates; ++n)
    A2[n] = n < N ? p.A[static_cast<int64_t>(dc) * N + n] * kLog2e : 0.f;
  const float Dv = p.Dskip != nullptr ? p.Dskip[dc] : 0.f;
  const float dbias = p.delta_bias != nullptr ? p.delta_bias[dc] : 0.f;
  const float uscale = scale_at(p.u_scale, dc);
  const float dscale = scale_at(p.delta_scale, 0), Bscale = scale_at(p.B_scale, 0);
  const float Cscale = scale_at(p.C_scale, 0), zscale = scale_at(p.z_scale, 0);
  const Tin* Bb = static_cast<const Tin*>(p.Bm) + static_cast<int64_t>(b) * N * L;
  const Tin* Cb = static_cast<const Tin*>(p.Cm) + static_cast<int64_t>(b) * N * L;
  float* Bs = sm;
  float* Cs = sm + segs * kSeqSegStride;
  const float* Bmine = Bs + seg * kSeqSegStride;
  const float* Cmine = Cs + seg * kSeqSegStride;
  const int ntiles = seg_len / kSeqTile;
  const int tok0 = seg * seg_len;
  SeqStage<Tin, kIters> st;
  SeqTok<Tin> tk;

  float h[kSeqStates];
  if (segs > 1) {
    // pass 1: segment end states from zero, and the segments' sums of dt; the last segment's end
    // state is only needed from pass 2, so its threads only stage
    const bool active = seg < segs - 1;
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n) h[n] = 0.f;
    float sum_dt = 0.f;
    seq_fetch<Tin, kIters>(st, false, Bb, Cb, N, L, segs, seg_len, 0);
    if (active) seq_fetch_tok<Tin>(tk, p, row_off, tok0, row_ok);
    for (int tile = 0; tile < ntiles; ++tile) {
      const int tok = tok0 + tile * kSeqTile;
      float dt[kSeqTile], uu[kSeqTile], unused[kSeqTile];
      __syncthreads();  // every thread is done reading the previous tile
      seq_put<Tin, kIters>(Bs, Cs, st, false, Bscale, Cscale, segs);
      if (active) seq_dt_u<Tin>(tk, p, tok, row_ok, dbias, uscale, dscale, dt, uu);
      __syncthreads();
      if (tile + 1 < ntiles) {
        seq_fetch<Tin, kIters>(st, false, Bb, Cb, N, L, segs, seg_len, (tile + 1) * kSeqTile);
        if (active) seq_fetch_tok<Tin>(tk, p, row_off, tok + kSeqTile, row_ok);
      }
      if (active) {
        seq_tile<false>(h, A2, dt, uu, Bmine, Cmine, unused);
#pragma unroll
        for (int i = 0; i < kSeqTile; ++i) sum_dt += dt[i];
      }
    }
    __syncthreads();  // the combine reuses the tile memory
    // combine: h_in[s+1] = exp(A * sum_dt[s]) * h_in[s] + h_end[s], h_in[0] = initial state
    float* hend = sm;
    float* hin = hend + kSeqThreads * kSeqStates;
    float* sdt = hin + kSeqThreads * kSeqStates;
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n) hend[tid * kSeqStates + n] = h[n];
    sdt[tid] = sum_dt;
    __syncthreads();
    for (int idx = tid; idx < CH * kSeqStates; idx += kSeqThreads) {
      const int cc = idx / kSeqStates, n = idx % kSeqStates, dd = d0 + cc;
      const bool ok = dd < dim && n < N;
      const float a2 = ok ? p.A[static_cast<int64_t>(dd) * N + n] * kLog2e : 0.f;
      float hh = ok && p.initial_state != nullptr
                     ? p.initial_state[(static_cast<int64_t>(b) * dim + dd) * N + n]
                     : 0.f;
      for (int s2 = 0; s2 < segs; ++s2) {
        const int t2 = s2 * CH + cc;  // thread index of (cc, s2)
        hin[t2 * kSeqStates + n] = hh;
        hh = fmaf(fast_exp2(a2 * sdt[t2]), hh, hend[t2 * kSeqStates + n]);
      }
    }
    __syncthreads();
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n) h[n] = hin[tid * kSeqStates + n];
    // (the first tile of pass 2 synchronizes before it overwrites this memory)
  } else {
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n)
      h[n] = (row_ok && n < N && p.initial_state != nullptr)
                 ? p.initial_state[(static_cast<int64_t>(b) * dim + d) * N + n]
                 : 0.f;
  }

  // pass 2: the scan from the true initial state, producing y
  Tout* yout = static_cast<Tout*>(p.y);
  const Tin* z = static_cast<const Tin*>(p.z);
  seq_fetch<Tin, kIters>(st, true, Bb, Cb, N, L, segs, seg_len, 0);
  seq_fetch_tok<Tin>(tk, p, row_off, tok0, row_ok);
  for (int tile = 0; tile < ntiles; ++tile) {
    const int tok = tok0 + tile * kSeqTile;
    const int valid = row_ok ? L - tok : 0;
    float dt[kSeqTile], uu[kSeqTile], y[kSeqTile];
    __syncthreads();  // every thread is done reading the previous tile (or the combine's h_in)
    seq_put<Tin, kIters>(Bs, Cs, st, true, Bscale, Cscale, segs);
    seq_dt_u<Tin>(tk, p, tok, row_ok, dbias, uscale, dscale, dt, uu);
    __syncthreads();
    if (tile + 1 < ntiles) {
      seq_fetch<Tin, kIters>(st, true, Bb, Cb, N, L, segs, seg_len, (tile + 1) * kSeqTile);
      seq_fetch_tok<Tin>(tk, p, row_off, tok + kSeqTile, row_ok);
    }
    Tin zr[kSeqTile];  // issued before the tile's math so that its latency hides behind it
    if (z != nullptr) fetch_run<Tin, kSeqTile>(z + row_off + tok, valid, zr);
#pragma unroll
    for (int i = 0; i < kSeqTile; ++i) y[i] = Dv * uu[i];
    seq_tile<true>(h, A2, dt, uu, Bmine, Cmine, y);
    if (valid > 0) {
      if (z != nullptr) {
#pragma unroll
        for (int i = 0; i < kSeqTile; ++i) y[i] *= fast_silu(dequant(zr[i], zscale));
      }
      store_run<Tout, kSeqTile>(yout + row_off + tok, valid, y);
    }
  }
  if (p.final_state != nullptr && seg == segs - 1 && row_ok) {
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n)
      if (n < N) p.final_state[(static_cast<int64_t>(b) * dim + d) * N + n] = h[n];
  }
}

// ---- variant selection ------------------------------------------------------------------------
// Benchmark/tuning override (essm_tuning_set_scan_variant): 0 = heuristic.
int g_scan_variant = 0;
int g_scan_segments = 0;

template <typename Tin, typename Tout, int R>
cudaError_t launch_chunked(const ScanArgs& a, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(a.batch) * ((a.dim + R - 1) / R);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  selective_scan_fwd_kernel<Tin, Tout, R>
      <<<static_cast<unsigned>(blocks), kScanThreads, scan_smem_bytes<R>(a.dstate), stream>>>(a);
  return launch_status();
}

// Estimated cost of a chunked configuration: waves of resident blocks times one block's work.
template <typename Tin, typename Tout, int R>
cudaError_t chunked_cost(const ScanArgs& a, int sms, int64_t* cost) {
  int per_sm = 0;
  const cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, selective_scan_fwd_kernel<Tin, Tout, R>, kScanThreads, scan_smem_bytes<R>(a.dstate));
  if (err != cudaSuccess) return err;
  const int64_t blocks = static_cast<int64_t>(a.batch) * ((a.dim + R - 1) / R);
  const int64_t resident = static_cast<int64_t>(per_sm > 0 ? per_sm : 1) * sms;
  *cost = (blocks + resident - 1) / resident * R;
  return cudaSuccess;
}

int seq_segment_length(int seqlen, int segs) {
  const int per = (seqlen + segs - 1) / segs;
  return (per + kSeqTile - 1) / kSeqTile * kSeqTile;
}

// Segments: the fewest that give about 2 blocks of kSeqThreads per multiprocessor (>= 15/8; each
// extra pass costs work, so no more than needed), without segments made only of padding. Measured
// on an H100 (docs/benchmarks.md): with the tile prefetch, about 2 resident blocks per SM already
// keep the kernel near its best, and doubling S past that point costs more than it hides.
int seq_segments(const ScanArgs& a, int sms) {
  const int64_t channels = static_cast<int64_t>(a.batch) * a.dim;
  const int64_t want = static_cast<int64_t>(sms) * kSeqThreads * 15 / 8;
  int segs = 1;
  while (segs < kSeqMaxSegs && channels * segs < want) segs *= 2;
  while (segs > 1 && (segs - 1) * seq_segment_length(a.seqlen, segs) >= a.seqlen) segs /= 2;
  return segs;
}

template <typename Tin, typename Tout, int kIters>
cudaError_t launch_seq_iters(const ScanArgs& a, int segs, cudaStream_t stream) {
  const int CH = kSeqThreads / segs;
  const int64_t blocks = static_cast<int64_t>(a.batch) * ((a.dim + CH - 1) / CH);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  selective_scan_seq_kernel<Tin, Tout, kIters><<<static_cast<unsigned>(blocks), kSeqThreads,
                                                 seq_smem_bytes(segs), stream>>>(
      a, segs, seq_segment_length(a.seqlen, segs));
  return launch_status();
}

template <typename Tin, typename Tout>
cudaError_t launch_seq(const ScanArgs& a, int segs, cudaStream_t stream) {
  static_assert(seq_stage_iters(kSeqMaxSegs) == 4, "staging instantiations below");
  switch (seq_stage_iters(segs)) {
    case 1: return launch_seq_iters<Tin, Tout, 1>(a, segs, stream);
    case 2: return launch_seq_iters<Tin, Tout, 2>(a, segs, stream);
    default: return launch_seq_iters<Tin, Tout, 4>(a, segs, stream);
  }
}

template <typename Tin, typename Tout>
cudaError_t run_scan(const ScanArgs& a, cudaStream_t stream) {
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  int variant = g_scan_variant;
  if (variant == 3 && a.dstate > kSeqStates) variant = 0;
  if (variant == 0 && a.dstate <= kSeqStates) variant = 3;
  if (variant == 3) {
    const bool forced = g_scan_segments >= 1 && g_scan_segments <= kSeqMaxSegs &&
                        (g_scan_segments & (g_scan_segments - 1)) == 0;
    return launch_seq<Tin, Tout>(a, forced ? g_scan_segments : seq_segments(a, sms), stream);
  }
  if (variant != 1 && variant != 2) {
    int64_t c1 = 0, c2 = 0;
    err = chunked_cost<Tin, Tout, 1>(a, sms, &c1);
    if (err == cudaSuccess) err = chunked_cost<Tin, Tout, 2>(a, sms, &c2);
    if (err != cudaSuccess) return err;
    variant = c2 < c1 ? 2 : 1;
  }
  return variant == 2 ? launch_chunked<Tin, Tout, 2>(a, stream)
                      : launch_chunked<Tin, Tout, 1>(a, stream);
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
  const float* x_scale;  // int8 scales as in ScanArgs (NULL for float io)
  const float *dt_scale, *B_scale, *C_scale, *z_scale;
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
  const float xv = load1(static_cast<const Tin*>(p.x) + rr, scale_at(p.x_scale, d));
  float dtv = load1(static_cast<const Tin*>(p.dt) + rr, scale_at(p.dt_scale, 0)) +
              (p.dt_bias ? p.dt_bias[d] : 0.f);
  if (p.dt_softplus) dtv = softplus(dtv);
  const float acc = update_state_row<Tin>(
      p.state_in + rr * N, p.state_out + rr * N, p.A + static_cast<int64_t>(d) * N, 1,
      static_cast<const Tin*>(p.Bm) + static_cast<int64_t>(b) * N,
      static_cast<const Tin*>(p.Cm) + static_cast<int64_t>(b) * N, scale_at(p.B_scale, 0),
      scale_at(p.C_scale, 0), dtv,
      dtv * xv, N, sub, lanes, active);
  if (active && sub == 0) {
    float out = acc + (p.Dskip ? p.Dskip[d] : 0.f) * xv;
    if (p.z != nullptr) out *= silu(load1(static_cast<const Tin*>(p.z) + rr, scale_at(p.z_scale, 0)));
    static_cast<Tout*>(p.y)[rr] = from_float<Tout>(out);
  }
}

bool scan_scales_ok(essm_dtype in, const essm_scan_scales* s) {
  return in != ESSM_I8 || (s != nullptr && s->u_scale != nullptr && s->delta_scale != nullptr &&
                           s->B_scale != nullptr && s->C_scale != nullptr && s->z_scale != nullptr);
}

}  // namespace
}  // namespace essm

// Not part of kernels.h: lets the harness and the benchmark force a prefill-scan variant.
// variant 0 = heuristic, 1/2 = chunked parallel scan with 1/2 channels per thread, 3 = segmented
// sequential scan (dstate <= 16; `segments` a power of two <= 32, or 0 for the heuristic).
// Returns the variant now in force.
extern "C" int essm_tuning_set_scan_variant(int variant, int segments) {
  essm::g_scan_variant = (variant >= 1 && variant <= 3) ? variant : 0;
  essm::g_scan_segments = segments;
  return essm::g_scan_variant;
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
                   q ? scales->delta_scale : nullptr,
                   q ? scales->B_scale : nullptr,
                   q ? scales->C_scale : nullptr,
                   q ? scales->z_scale : nullptr,
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
                          q ? scales->delta_scale : nullptr,
                          q ? scales->B_scale : nullptr,
                          q ? scales->C_scale : nullptr,
                          q ? scales->z_scale : nullptr,
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
