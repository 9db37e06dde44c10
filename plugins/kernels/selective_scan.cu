// Mamba-1 selective scan (prefill) and selective state update (decode), float and int8 inputs.
//
// Prefill (see docs/kernels.md): four kernels. dstate <= 16 (every Mamba-1 model): a segmented
// sequential scan (thread = (channel, time segment), the 16 states in registers, two passes when
// there is more than one segment; variant 3), its form with one segment per warp and the segments
// spread over a thread-block cluster (variant 5, sm_90 and later; variant 6: up to 4 segments in one
// block, without clusters, for other GPUs), and for one segment the one-barrier form (variant 4).
// dstate > 16: a chunked parallel scan (one block of kScanThreads threads owns kRows channels of one
// batch element and walks the sequence in chunks of kScanThreads * kScanItems tokens; for each state
// n the recurrence h_t = a_t h_{t-1} + b_t is a composition of affine maps, so the chunk is scanned
// by a sequential fold over each thread's items, a warp shuffle scan and a cross-warp combine with
// the carry from the previous chunk; variants 1/2).
#include <cooperative_groups.h>

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

// log1p(t) for t in [0, 1] as t + t^2 q(t), q a degree-8 minimax fit: no division, unlike the
// 2 atanh form of fast_softplus; 3e-9 relative before rounding (tests/test_scan_fast_math.py
// replays it and reads the coefficients from here).
__device__ __forceinline__ float log1p_unit(float t) {
  float q = -3.24402284e-3f;
  q = fmaf(q, t, 1.98514555e-2f);
  q = fmaf(q, t, -5.69595248e-2f);
  q = fmaf(q, t, 1.06036551e-1f);
  q = fmaf(q, t, -1.53055936e-1f);
  q = fmaf(q, t, 1.96759403e-1f);
  q = fmaf(q, t, -2.49541342e-1f);
  q = fmaf(q, t, 3.33299637e-1f);
  q = fmaf(q, t, -4.99999017e-1f);
  return fmaf(t * q, t, t);
}

// Mixed forms of fast_softplus / fast_silu, for the kernel whose state decays already keep the
// special-function unit busy: the exponentials stay on that unit (ex2.approx, with fast_softplus's
// accuracy: the rounding of x*log2e costs about 6e-8 |x| relative), the divisions move to the FMA
// pipe (log1p_unit, fma_rcp). 2 SFU operations per (token, channel) instead of 4, for about the
// issue slots of the fast_ forms.
// softplus = max(x, 0) + log1p(t), t = e^-|x|. The threshold needs no branch: for x > 20,
// t < 2.1e-9 is below half an ulp of x, so the sum is x.
__device__ __forceinline__ float mixed_softplus(float x) {
  return fmaxf(x, 0.f) + log1p_unit(fast_exp2(-fabsf(x) * kLog2e));
}

// x / (1 + e^-x); the clamp keeps 1 + 2^v within fma_rcp's range (ex2.approx.ftz flushes to 0
// below 2^-126, so x > 87 gives exactly x).
__device__ __forceinline__ float mixed_silu(float x) {
  return x * fma_rcp(1.f + fast_exp2(fminf(-x * kLog2e, 125.f)));
}

// How the per-(token, channel) softplus of delta and SiLU of z are computed (variant 3; variants 4
// and 5: mixed).
enum class ScanMath { kSfu, kMixed };

template <ScanMath M>
__device__ __forceinline__ float scan_softplus(float x) {
  if constexpr (M == ScanMath::kMixed) return mixed_softplus(x);
  return fast_softplus(x);
}

template <ScanMath M>
__device__ __forceinline__ float scan_silu(float x) {
  if constexpr (M == ScanMath::kMixed) return mixed_silu(x);
  return fast_silu(x);
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

// The sequential kernels' channel state (thread = channel d of batch b, all its states in
// registers): loaded from initial_state (zeros without one, or for a row past dim) and stored to
// final_state (when asked for and `ok`).
__device__ __forceinline__ void load_channel_state(const ScanArgs& p, int b, int d, int N, int dim,
                                                   bool row_ok, float (&h)[kSeqStates]) {
#pragma unroll
  for (int n = 0; n < kSeqStates; ++n)
    h[n] = (row_ok && n < N && p.initial_state != nullptr)
               ? p.initial_state[(static_cast<int64_t>(b) * dim + d) * N + n]
               : 0.f;
}

__device__ __forceinline__ void store_channel_state(const ScanArgs& p, int b, int d, int N, int dim,
                                                    bool ok, const float (&h)[kSeqStates]) {
  if (p.final_state != nullptr && ok) {
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n)
      if (n < N) p.final_state[(static_cast<int64_t>(b) * dim + d) * N + n] = h[n];
  }
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

// The per-channel parameters of the sequential kernels (channel dc; float, scales dequantized).
struct SeqChannel {
  float A2[kSeqStates];  // A * log2(e), 0 for states >= dstate
  float Dv, dbias, uscale, dscale, Bscale, Cscale, zscale;

  __device__ __forceinline__ SeqChannel(const ScanArgs& p, int dc) {
    const int N = p.dstate;
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n)
      A2[n] = n < N ? p.A[static_cast<int64_t>(dc) * N + n] * kLog2e : 0.f;
    Dv = p.Dskip != nullptr ? p.Dskip[dc] : 0.f;
    dbias = p.delta_bias != nullptr ? p.delta_bias[dc] : 0.f;
    uscale = scale_at(p.u_scale, dc);
    dscale = scale_at(p.delta_scale, 0);
    Bscale = scale_at(p.B_scale, 0);
    Cscale = scale_at(p.C_scale, 0);
    zscale = scale_at(p.z_scale, 0);
  }
};

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

// dt (softplus'd in the kMath form, 0 on padding tokens so that they are identity steps) and u of
// one tile.
template <typename Tin, ScanMath kMath = ScanMath::kSfu>
__device__ __forceinline__ void seq_dt_u(const SeqTok<Tin>& tk, const ScanArgs& p, int tok,
                                         bool row_ok, const SeqChannel& ch,
                                         float (&dt)[kSeqTile], float (&uu)[kSeqTile]) {
  const int valid = row_ok ? p.seqlen - tok : 0;
#pragma unroll
  for (int i = 0; i < kSeqTile; ++i) {
    uu[i] = dequant(tk.u[i], ch.uscale);
    float v = dequant(tk.d[i], ch.dscale) + ch.dbias;
    if (p.delta_softplus) v = scan_softplus<kMath>(v);
    dt[i] = i < valid ? v : 0.f;
  }
}

// One tile of the recurrence over the thread's states; adds y[i] += sum_n h_n C_n when kOutput
// (pass 2), otherwise only advances h (pass 1). The sum starts from y[i] (two chains for
// latency), which saves an add per token over summing from zero.
template <bool kOutput>
__device__ __forceinline__ void seq_tile(float (&h)[kSeqStates], const float (&A2)[kSeqStates],
                                         const float (&dt)[kSeqTile], const float (&uu)[kSeqTile],
                                         const float* Bs, const float* Cs, float (&y)[kSeqTile]) {
#pragma unroll
  for (int i = 0; i < kSeqTile; ++i) {
    const float dtu = dt[i] * uu[i];
    const float4* B4 = reinterpret_cast<const float4*>(Bs + i * kSeqStates);
    const float4* C4 = reinterpret_cast<const float4*>(Cs + i * kSeqStates);
    float acc0 = kOutput ? y[i] : 0.f, acc1 = 0.f;
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
    if (kOutput) y[i] = acc0 + acc1;
  }
}

// One output tile of the sequential kernels: advances h over the tile (seq_tile) and stores
// y = D u + sum_n h_n C_n, gated by SiLU(z) in the kMath form. z's loads are issued before the
// tile's math so that their latency hides behind it.
template <typename Tin, typename Tout, ScanMath kMath>
__device__ __forceinline__ void seq_output_tile(const ScanArgs& p, const SeqChannel& ch,
                                                int64_t row_off, int tok, bool row_ok,
                                                float (&h)[kSeqStates], const float (&dt)[kSeqTile],
                                                const float (&uu)[kSeqTile], const float* Bs,
                                                const float* Cs) {
  const int valid = row_ok ? p.seqlen - tok : 0;
  const Tin* z = static_cast<const Tin*>(p.z);
  Tin zr[kSeqTile];
  if (z != nullptr) fetch_run<Tin, kSeqTile>(z + row_off + tok, valid, zr);
  float y[kSeqTile];
#pragma unroll
  for (int i = 0; i < kSeqTile; ++i) y[i] = ch.Dv * uu[i];
  seq_tile<true>(h, ch.A2, dt, uu, Bs, Cs, y);
  if (valid > 0) {
    if (z != nullptr) {
#pragma unroll
      for (int i = 0; i < kSeqTile; ++i) y[i] *= scan_silu<kMath>(dequant(zr[i], ch.zscale));
    }
    store_run<Tout, kSeqTile>(static_cast<Tout*>(p.y) + row_off + tok, valid, y);
  }
}

// What the segment combines start from for state n of channel dd (batch b): x = A * log2(e), y =
// the initial state; both 0 for a channel past dim or a state past dstate (y also without one).
__device__ __forceinline__ float2 combine_start(const ScanArgs& p, int b, int dd, int n) {
  const int N = p.dstate;
  const bool ok = dd < p.dim && n < N;
  const float a2 = ok ? p.A[static_cast<int64_t>(dd) * N + n] * kLog2e : 0.f;
  const float h0 = ok && p.initial_state != nullptr
                       ? p.initial_state[(static_cast<int64_t>(b) * p.dim + dd) * N + n]
                       : 0.f;
  return make_float2(a2, h0);
}

// The S > 1 combine between the two passes, h = this thread's segment end state from a zero state
// on entry and its true initial state on return: h_in[s+1] = exp(A * sum_dt[s]) * h_in[s] +
// h_end[s], h_in[0] = initial state. Uses the first (2 * kSeqStates + 1) * kSeqThreads floats of
// `sm`; the caller synchronizes before (tile reads done) and after (before reusing `sm`).
__device__ __forceinline__ void seq_combine(float* sm, float (&h)[kSeqStates], float sum_dt,
                                            const ScanArgs& p, int segs, int b, int d0) {
  const int tid = threadIdx.x, CH = kSeqThreads / segs;
  float* hend = sm;
  float* hin = hend + kSeqThreads * kSeqStates;
  float* sdt = hin + kSeqThreads * kSeqStates;
#pragma unroll
  for (int n = 0; n < kSeqStates; ++n) hend[tid * kSeqStates + n] = h[n];
  sdt[tid] = sum_dt;
  __syncthreads();
  for (int idx = tid; idx < CH * kSeqStates; idx += kSeqThreads) {
    const int cc = idx / kSeqStates, n = idx % kSeqStates, dd = d0 + cc;
    const float2 start = combine_start(p, b, dd, n);
    const float a2 = start.x;
    float hh = start.y;
    for (int s2 = 0; s2 < segs; ++s2) {
      const int t2 = s2 * CH + cc;  // thread index of (cc, s2)
      hin[t2 * kSeqStates + n] = hh;
      hh = fmaf(fast_exp2(a2 * sdt[t2]), hh, hend[t2 * kSeqStates + n]);
    }
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < kSeqStates; ++n) h[n] = hin[tid * kSeqStates + n];
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
  const SeqChannel ch(p, dc);
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
      seq_put<Tin, kIters>(Bs, Cs, st, false, ch.Bscale, ch.Cscale, segs);
      if (active) seq_dt_u<Tin>(tk, p, tok, row_ok, ch, dt, uu);
      __syncthreads();
      if (tile + 1 < ntiles) {
        seq_fetch<Tin, kIters>(st, false, Bb, Cb, N, L, segs, seg_len, (tile + 1) * kSeqTile);
        if (active) seq_fetch_tok<Tin>(tk, p, row_off, tok + kSeqTile, row_ok);
      }
      if (active) {
        seq_tile<false>(h, ch.A2, dt, uu, Bmine, Cmine, unused);
#pragma unroll
        for (int i = 0; i < kSeqTile; ++i) sum_dt += dt[i];
      }
    }
    __syncthreads();  // the combine reuses the tile memory
    seq_combine(sm, h, sum_dt, p, segs, b, d0);
    // (the first tile of pass 2 synchronizes before it overwrites this memory)
  } else {
    load_channel_state(p, b, d, N, dim, row_ok, h);
  }

  // pass 2: the scan from the true initial state, producing y
  seq_fetch<Tin, kIters>(st, true, Bb, Cb, N, L, segs, seg_len, 0);
  seq_fetch_tok<Tin>(tk, p, row_off, tok0, row_ok);
  for (int tile = 0; tile < ntiles; ++tile) {
    const int tok = tok0 + tile * kSeqTile;
    float dt[kSeqTile], uu[kSeqTile];
    __syncthreads();  // every thread is done reading the previous tile (or the combine's h_in)
    seq_put<Tin, kIters>(Bs, Cs, st, true, ch.Bscale, ch.Cscale, segs);
    seq_dt_u<Tin>(tk, p, tok, row_ok, ch, dt, uu);
    __syncthreads();
    if (tile + 1 < ntiles) {
      seq_fetch<Tin, kIters>(st, true, Bb, Cb, N, L, segs, seg_len, (tile + 1) * kSeqTile);
      seq_fetch_tok<Tin>(tk, p, row_off, tok + kSeqTile, row_ok);
    }
    seq_output_tile<Tin, Tout, ScanMath::kSfu>(p, ch, row_off, tok, row_ok, h, dt, uu, Bmine, Cmine);
  }
  store_channel_state(p, b, d, N, dim, seg == segs - 1 && row_ok, h);
}

// ---- single-segment sequential variant, one barrier per tile (variant 4) ----------------------
// The S = 1 case of selective_scan_seq_kernel (one thread per channel, its 16 states in registers,
// one pass), which the heuristic picks when batch * dim alone fills the GPU (large batches),
// changed where that kernel's SASS spends issue slots and stalls. Measured on an H100
// (docs/benchmarks.md): 14-18% faster than variant 3 at S = 1; the same changes made the S > 1
// forms slower (more staging bookkeeping per token than the barrier they save), so they run on
// variant 3 only.
//  - B/C tiles are double-buffered in shared memory: tile t+1 is stored into the other buffer while
//    tile t is read, so a single __syncthreads per tile (at its end) orders both hazards, instead
//    of one before and one after the stores.
//  - The staging is spread over the block: 64 threads each hold a 4-token run of B or C of one
//    state, instead of 16 threads of warp 0 storing 16 values each while the other warps wait at
//    the barrier.
//  - softplus and SiLU use the mixed forms (mixed_softplus / mixed_silu): 2 special-function-unit
//    operations per (token, channel) instead of 4, next to the 16 state decays that already bound
//    that unit. (Moving the exponentials to the FMA pipe too was measured slower: it costs ~23
//    issue slots per (token, channel) more than it saves.)
// Tiles stay at kSeqTile = 8 tokens: 16 did not fit 128 registers (4 blocks per SM). At 128, sm_87
// spills one register of the 16-bit io instantiations (stored before the tile loop, reloaded after
// it); sm_90 does not spill.

// Tile memory: [2 buffers][B, C][kSeqSegStride].
constexpr size_t kSeq1SmemBytes = sizeof(float) * 2 * 2 * kSeqSegStride;

// One tile's staging: thread t < 64 holds the 4-token run (t / 16) % 2 of state t % 16 of B
// (t < 32) or C (32 <= t < 64), as raw words in registers from the fetch (issued a tile ahead) to
// the store into the other buffer; threads t >= 64 stage nothing.
template <typename Tin>
struct Seq1Stage {
  static constexpr int kRun = kSeqTile / 2;
  Tin v[kRun];

  __device__ __forceinline__ static int row() {
    return static_cast<int>(threadIdx.x) / (2 * kSeqStates);
  }
  __device__ __forceinline__ static int run() {
    return (static_cast<int>(threadIdx.x) / kSeqStates) % 2;
  }

  // Loads the run of the tile at token t0 (zeros past the sequence end and for states >= dstate).
  // (The batch's B/C rows start at p.Bm / p.Cm + boff: one offset instead of two pointers held
  // across the tile loop.)
  __device__ __forceinline__ void fetch(const ScanArgs& p, int64_t boff, int N, int L, int t0) {
    const int n = static_cast<int>(threadIdx.x) % kSeqStates, j = row();
    const int tok = t0 + run() * kRun;
    const int valid = j < 2 && n < N ? L - tok : 0;
    const int64_t off = valid > 0 ? static_cast<int64_t>(n) * L + tok : 0;
    fetch_run<Tin, kRun>(static_cast<const Tin*>(j >= 1 ? p.Cm : p.Bm) + boff + off, valid, v);
  }

  // Stores the fetched run, dequantized, into buf[B or C][token][state].
  __device__ __forceinline__ void put(float* buf, float B_scale, float C_scale) const {
    const int n = static_cast<int>(threadIdx.x) % kSeqStates, j = row();
    if (j >= 2) return;
    float* dst = buf + j * kSeqSegStride + run() * kRun * kSeqStates + n;
    const float scale = j >= 1 ? C_scale : B_scale;
#pragma unroll
    for (int i = 0; i < kRun; ++i) dst[i * kSeqStates] = dequant(v[i], scale);
  }
};

template <typename Tin, typename Tout>
__global__ void __launch_bounds__(kSeqThreads, 4)
    selective_scan_seq1_kernel(const ScanArgs p) {
  extern __shared__ __align__(16) float sm[];
  const int N = p.dstate, L = p.seqlen, dim = p.dim;
  const int tid = threadIdx.x;
  const int groups = (dim + kSeqThreads - 1) / kSeqThreads;
  const int b = blockIdx.x / groups;
  const int d = (blockIdx.x % groups) * kSeqThreads + tid;
  const bool row_ok = d < dim;
  const int dc = row_ok ? d : dim - 1;
  const int64_t row_off = (static_cast<int64_t>(b) * dim + dc) * L;
  const SeqChannel ch(p, dc);
  const int64_t boff = static_cast<int64_t>(b) * N * L;  // of the batch's B/C rows
  constexpr int kBufFloats = 2 * kSeqSegStride;
  const int ntiles = (L + kSeqTile - 1) / kSeqTile;

  float h[kSeqStates];
  load_channel_state(p, b, d, N, dim, row_ok, h);

  Seq1Stage<Tin> st;
  SeqTok<Tin> tk;
  st.fetch(p, boff, N, L, 0);
  seq_fetch_tok<Tin>(tk, p, row_off, 0, row_ok);
  st.put(sm, ch.Bscale, ch.Cscale);
  if (ntiles > 1) st.fetch(p, boff, N, L, kSeqTile);
  __syncthreads();
  for (int tile = 0; tile < ntiles; ++tile) {
    const int tok = tile * kSeqTile;
    const float* cur = sm + (tile & 1) * kBufFloats;
    float dt[kSeqTile], uu[kSeqTile];
    seq_dt_u<Tin, ScanMath::kMixed>(tk, p, tok, row_ok, ch, dt, uu);
    // The next tile's loads and stores go before this tile's math so that their latency hides
    // behind it; the other buffer's readers finished before the previous tile's barrier.
    if (tile + 1 < ntiles) {
      seq_fetch_tok<Tin>(tk, p, row_off, tok + kSeqTile, row_ok);
      st.put(sm + ((tile + 1) & 1) * kBufFloats, ch.Bscale, ch.Cscale);
      if (tile + 2 < ntiles) st.fetch(p, boff, N, L, (tile + 2) * kSeqTile);
    }
    seq_output_tile<Tin, Tout, ScanMath::kMixed>(p, ch, row_off, tok, row_ok, h, dt, uu, cur,
                                                 cur + kSeqSegStride);
    __syncthreads();  // this tile's buffer is free, the next one is complete
  }
  store_channel_state(p, b, d, N, dim, row_ok, h);
}

// ---- cluster-segmented variant (variant 5) ----------------------------------------------------
// The segmented scan with one time segment per warp: warp w of block r in a thread-block cluster
// runs segment r * warps + w of the same 32 channels (lane = channel). Against variant 3, whose
// 128-thread block holds all S segments of 128 / S channels (at S = 32 a warp spans 8 segments and
// every block stages B/C of all 32), each warp here stages only its own segment's B/C tile (lanes
// 0-15 a state of B, 16-31 a state of C) into its own double buffer, so the tile loop needs no
// block barrier (one __syncwarp per tile), every shared-memory read of B/C is a broadcast to the
// whole warp, and the staging per state step is 4 / S of variant 3's (1/8 at S = 32).
// For S > 4 the segments of a channel span a cluster (S / 4 blocks, at most 8: the portable cluster
// size; sm_90 and later), so the combine between the passes reads the other blocks' end states
// through distributed shared memory; for S <= 4 one block holds them all and runs on any GPU (Jetson
// Orin's 16 SMs are filled by S <= 4 at batch 1). Measured on an H100 (docs/benchmarks.md):
// 1.07-1.18x faster than variant 3 at the heuristic's S > 1, and faster at S = 2 and 4 in 15 of 16
// benchmarked rows.
constexpr int kClusterWarps = 4;    // segments per block (one per warp) when S >= 4
constexpr int kClusterMaxSize = 8;  // blocks per cluster: the portable limit
constexpr int kClusterChannels = 32;
constexpr int kWarpCOffset = kSeqTile * kSeqStates + 16;  // C after B, at the other 16 banks
constexpr int kWarpBufFloats = 2 * kWarpCOffset;           // one tile of B and C
constexpr int kEndStride = kSeqStates + 1;                  // end-state rows, conflict-free stores
static_assert(kSeqMaxSegs / kClusterWarps <= kClusterMaxSize, "S segments fit one cluster");

// Dynamic shared memory for `warps` warps: two tile buffers per warp, then the end states
// [warps][32][kEndStride] and the sums of dt [warps][32] that the combine reads.
size_t cluster_smem_bytes(int warps) {
  return sizeof(float) * static_cast<size_t>(warps) *
         (2 * kWarpBufFloats + kClusterChannels * (kEndStride + 1));
}

// One warp's B/C staging: lane l holds the kSeqTile-token run of state l % 16 of B (l < 16) or C
// (l >= 16, skipped in pass 1), raw from the fetch (issued a tile ahead) to the store.
template <typename Tin>
struct WarpStage {
  Tin v[kSeqTile];

  __device__ __forceinline__ static int lane() { return static_cast<int>(threadIdx.x) % 32; }

  __device__ __forceinline__ void fetch(const ScanArgs& p, int64_t boff, bool with_c, int t0) {
    const int n = lane() % kSeqStates, j = lane() / kSeqStates;
    const int valid = (j == 0 || with_c) && n < p.dstate ? p.seqlen - t0 : 0;
    const int64_t off = valid > 0 ? static_cast<int64_t>(n) * p.seqlen + t0 : 0;
    fetch_run<Tin, kSeqTile>(static_cast<const Tin*>(j == 1 ? p.Cm : p.Bm) + boff + off, valid, v);
  }

  // Stores the run, dequantized, into buf[token][state] (B) or buf[kWarpCOffset + ...] (C).
  __device__ __forceinline__ void put(float* buf, bool with_c, float B_scale, float C_scale) const {
    const int n = lane() % kSeqStates, j = lane() / kSeqStates;
    if (j == 1 && !with_c) return;
    float* dst = buf + j * kWarpCOffset + n;
    const float scale = j == 1 ? C_scale : B_scale;
#pragma unroll
    for (int i = 0; i < kSeqTile; ++i) dst[i * kSeqStates] = dequant(v[i], scale);
  }
};

// Walks the warp's segment [tok0, tok0 + ntiles * kSeqTile) from state h. Pass 1 (!kOutput) only
// advances h and returns the segment's sum of dt; pass 2 writes y (and reads z).
template <typename Tin, typename Tout, bool kOutput>
__device__ __forceinline__ float cluster_pass(const ScanArgs& p, const SeqChannel& ch, float* bufs,
                                              int64_t boff, int64_t row_off, bool row_ok, int tok0,
                                              int ntiles, float (&h)[kSeqStates]) {
  WarpStage<Tin> st;
  SeqTok<Tin> tk;
  float sum_dt = 0.f;
  st.fetch(p, boff, kOutput, tok0);
  seq_fetch_tok<Tin>(tk, p, row_off, tok0, row_ok);
  for (int tile = 0; tile < ntiles; ++tile) {
    const int tok = tok0 + tile * kSeqTile;
    float* buf = bufs + (tile & 1) * kWarpBufFloats;
    // The other lanes finished reading this buffer (tile - 2) before the previous __syncwarp.
    st.put(buf, kOutput, ch.Bscale, ch.Cscale);
    __syncwarp();
    float dt[kSeqTile], uu[kSeqTile];
    seq_dt_u<Tin, ScanMath::kMixed>(tk, p, tok, row_ok, ch, dt, uu);
    if (tile + 1 < ntiles) {  // the next tile's loads, hidden behind this tile's math
      st.fetch(p, boff, kOutput, tok + kSeqTile);
      seq_fetch_tok<Tin>(tk, p, row_off, tok + kSeqTile, row_ok);
    }
    if constexpr (kOutput) {
      seq_output_tile<Tin, Tout, ScanMath::kMixed>(p, ch, row_off, tok, row_ok, h, dt, uu, buf,
                                                   buf + kWarpCOffset);
    } else {
      float unused[kSeqTile];
      seq_tile<false>(h, ch.A2, dt, uu, buf, buf + kWarpCOffset, unused);
#pragma unroll
      for (int i = 0; i < kSeqTile; ++i) sum_dt += dt[i];
    }
  }
  return sum_dt;
}

// The blocks that hold one channel group's segments. kClusters: a thread-block cluster (sm_90 and
// later; every launch of that form has the cluster attribute, of size 1 where S <= 4); otherwise one
// block (S <= 4, launched without clusters: the form GPUs without clusters run, e.g. Jetson Orin).
// sync() is the barrier between the passes and the combine; smem(p, r) is shared-memory address p
// in block r of the group.
template <bool kClusters>
struct SegmentBlocks {
  __device__ static int rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kClusters) return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#endif
    return 0;
  }

  __device__ static void sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kClusters) {
      cooperative_groups::this_cluster().sync();
      return;
    }
#endif
    __syncthreads();
  }

  __device__ static float* smem(float* p, int r) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if constexpr (kClusters) return cooperative_groups::this_cluster().map_shared_rank(p, r);
#endif
    return p;
  }
};

template <typename Tin, typename Tout, bool kClusters>
__global__ void __launch_bounds__(kClusterWarps * 32, 4)
    selective_scan_cluster_kernel(const ScanArgs p, int segs, int seg_len) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ < 900
  if constexpr (kClusters) return;  // never launched below sm_90 (no clusters there)
#endif
  extern __shared__ __align__(16) float sm[];
  const int N = p.dstate, L = p.seqlen, dim = p.dim;
  const int warps = static_cast<int>(blockDim.x) / 32, csize = segs / warps;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  using Group = SegmentBlocks<kClusters>;
  const int rank = Group::rank();
  const int seg = rank * warps + warp;
  const int groups = (dim + kClusterChannels - 1) / kClusterChannels;
  const int cl = static_cast<int>(blockIdx.x) / csize;  // (batch, channel group) of the cluster
  const int b = cl / groups, d0 = (cl % groups) * kClusterChannels, d = d0 + lane;
  const bool row_ok = d < dim;
  const int dc = row_ok ? d : dim - 1;
  const int64_t row_off = (static_cast<int64_t>(b) * dim + dc) * L;
  const int64_t boff = static_cast<int64_t>(b) * N * L;
  const SeqChannel ch(p, dc);
  float* bufs = sm + warp * 2 * kWarpBufFloats;
  float* hend = sm + warps * 2 * kWarpBufFloats;  // [warps][32][kEndStride], then h_in in place
  float* sdt = hend + warps * kClusterChannels * kEndStride;  // [warps][32]
  const int tok0 = seg * seg_len, ntiles = seg_len / kSeqTile;

  // pass 1: every segment but the last from a zero state: its end state and sum of dt
  float h[kSeqStates];
#pragma unroll
  for (int n = 0; n < kSeqStates; ++n) h[n] = 0.f;
  if (seg < segs - 1) {
    const float sum_dt = cluster_pass<Tin, Tout, false>(p, ch, bufs, boff, row_off, row_ok, tok0,
                                                        ntiles, h);
    float* mine = hend + (warp * kClusterChannels + lane) * kEndStride;
#pragma unroll
    for (int n = 0; n < kSeqStates; ++n) mine[n] = h[n];
    sdt[warp * kClusterChannels + lane] = sum_dt;
  }
  Group::sync();
  // combine: per (channel, state), h_in[s+1] = exp(A * sum_dt[s]) * h_in[s] + h_end[s] from the
  // initial state, spread over the cluster's threads; h_in replaces h_end in the owner's memory.
  // The remote loads of kFold segments are issued before their fold (each is a cluster round trip).
  constexpr int kFold = 8;
  for (int pair = rank * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
       pair < kClusterChannels * kSeqStates; pair += csize * static_cast<int>(blockDim.x)) {
    const int cc = pair / kSeqStates, n = pair % kSeqStates, dd = d0 + cc;
    const float2 start = combine_start(p, b, dd, n);
    const float a2 = start.x;
    float hh = start.y;
    for (int s0 = 0; s0 < segs; s0 += kFold) {
      float end[kFold], decay[kFold];
#pragma unroll
      for (int i = 0; i < kFold; ++i) {
        const int s2 = s0 + i, w2 = s2 % warps;
        const bool carried = s2 < segs - 1;  // (the last segment's end state is not needed)
        const float* base = Group::smem(hend, carried ? s2 / warps : 0);
        end[i] = carried ? base[(w2 * kClusterChannels + cc) * kEndStride + n] : 0.f;
        decay[i] = carried ? base[warps * kClusterChannels * kEndStride + w2 * kClusterChannels + cc] : 0.f;
      }
#pragma unroll
      for (int i = 0; i < kFold; ++i) {
        const int s2 = s0 + i;
        if (s2 >= segs) break;
        Group::smem(hend, s2 / warps)[((s2 % warps) * kClusterChannels + cc) * kEndStride + n] = hh;
        hh = fmaf(fast_exp2(a2 * decay[i]), hh, end[i]);
      }
    }
  }
  Group::sync();
  const float* hin = hend + (warp * kClusterChannels + lane) * kEndStride;
#pragma unroll
  for (int n = 0; n < kSeqStates; ++n) h[n] = hin[n];

  // pass 2: the segment from its true initial state, producing y
  cluster_pass<Tin, Tout, true>(p, ch, bufs, boff, row_off, row_ok, tok0, ntiles, h);
  store_channel_state(p, b, d, N, dim, seg == segs - 1 && row_ok, h);
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
cudaError_t launch_seq1(const ScanArgs& a, cudaStream_t stream) {
  const int64_t blocks = static_cast<int64_t>(a.batch) * ((a.dim + kSeqThreads - 1) / kSeqThreads);
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  selective_scan_seq1_kernel<Tin, Tout>
      <<<static_cast<unsigned>(blocks), kSeqThreads, kSeq1SmemBytes, stream>>>(a);
  return launch_status();
}

// Blocks of variant 5 that hold one channel group's S segments (a cluster when more than one).
int cluster_blocks(int segs) { return segs > kClusterWarps ? segs / kClusterWarps : 1; }

// Variant 5 with S = segs, in clusters (kClusters) or, for S <= 4, in single blocks without them.
template <typename Tin, typename Tout, bool kClusters>
cudaError_t launch_seq_cluster(const ScanArgs& a, int segs, cudaStream_t stream) {
  const int warps = segs < kClusterWarps ? segs : kClusterWarps;
  const int csize = cluster_blocks(segs);
  const int64_t blocks = static_cast<int64_t>(a.batch) *
                         ((a.dim + kClusterChannels - 1) / kClusterChannels) * csize;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = static_cast<unsigned>(csize);
  attr.val.clusterDim.y = 1;
  attr.val.clusterDim.z = 1;
  return launch_ex(selective_scan_cluster_kernel<Tin, Tout, kClusters>,
                   static_cast<unsigned>(blocks), static_cast<unsigned>(warps * 32),
                   cluster_smem_bytes(warps), stream, attr, kClusters, a, segs,
                   seq_segment_length(a.seqlen, segs));
}

template <typename Tin, typename Tout>
cudaError_t run_scan(const ScanArgs& a, cudaStream_t stream) {
  int dev = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (err != cudaSuccess) return err;
  int variant = g_scan_variant;
  if (variant >= 3 && a.dstate > kSeqStates) variant = 0;
  // dstate <= 16: the cluster-segmented scan (variant 5) with seq_segments' count; on a GPU without
  // clusters (below sm_90) its single-block form (variant 6) where S <= 4, else the segmented one
  // (variant 3); one segment runs variant 4.
  if (variant == 0 && a.dstate <= kSeqStates) variant = 5;
  if (variant == 4) return launch_seq1<Tin, Tout>(a, stream);
  if (variant >= 3) {
    const bool forced = g_scan_segments >= 1 && g_scan_segments <= kSeqMaxSegs &&
                        (g_scan_segments & (g_scan_segments - 1)) == 0;
    const int segs = forced ? g_scan_segments : seq_segments(a, sms);
    // One segment (batch * dim fills the GPU): the one-barrier kernel, unless S is forced.
    if (segs == 1 && !(forced && variant == 3)) return launch_seq1<Tin, Tout>(a, stream);
    if (variant == 5) {
      int clusters = 0;  // thread-block clusters: sm_90 and later
      err = cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, dev);
      if (err != cudaSuccess) return err;
      if (clusters != 0) return launch_seq_cluster<Tin, Tout, true>(a, segs, stream);
      variant = 6;
    }
    if (variant == 6 && cluster_blocks(segs) == 1)
      return launch_seq_cluster<Tin, Tout, false>(a, segs, stream);
    return launch_seq<Tin, Tout>(a, segs, stream);
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

// state_in/state_out may alias: every state element is read and then written by one thread. All of
// a row's loads (x, dt, D, z, and its states, A, B and C in StateRowLane::load) come before any
// arithmetic that waits on them (common.cuh, "decode"); softplus and SiLU are the prefill scans'
// fast forms (the softplus branch-free).
template <typename Tin, typename Tout, int kPer, int kVec>
__global__ void __launch_bounds__(kDecodeThreads)
    selective_state_update_kernel(const StateUpdateArgs p, int lanes) {
  pdl_launch_dependents();
  int row, sub;
  decode_row(kDecodeThreads, lanes, &row, &sub);  // row (b, d)
  const bool active = row < p.batch * p.dim;
  const int64_t rr = active ? row : 0;
  const int b = static_cast<int>(rr) / p.dim, d = static_cast<int>(rr) - b * p.dim;
  const int N = p.dstate;
  const float bias = p.dt_bias ? p.dt_bias[d] : 0.f, Dd = p.Dskip ? p.Dskip[d] : 0.f;
  pdl_wait();  // x, dt, z, B, C and the state are written by earlier kernels
  const float xv = load1<Tin, true>(static_cast<const Tin*>(p.x) + rr, scale_at(p.x_scale, d));
  const float dt_raw = load1<Tin, true>(static_cast<const Tin*>(p.dt) + rr, scale_at(p.dt_scale, 0));
  const float zv =
      p.z != nullptr ? load1<Tin, true>(static_cast<const Tin*>(p.z) + rr, scale_at(p.z_scale, 0)) : 0.f;
  StateRowLane<kPer, kVec> st;
  st.load(p.state_in + rr * N, p.A + static_cast<int64_t>(d) * N, true,
          static_cast<const Tin*>(p.Bm) + static_cast<int64_t>(b) * N,
          static_cast<const Tin*>(p.Cm) + static_cast<int64_t>(b) * N, scale_at(p.B_scale, 0),
          scale_at(p.C_scale, 0), N, sub, lanes, active);
  const float dtv = p.dt_softplus ? mixed_softplus(dt_raw + bias) : dt_raw + bias;
  const float acc = st.update(p.state_out + rr * N, dtv, dtv * xv, N, sub, lanes, active);
  if (active && sub == 0) {
    float out = fmaf(Dd, xv, acc);
    if (p.z != nullptr) out *= fast_silu(zv);
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
// sequential scan with `segments` segments (a power of two <= 32; 0 = the heuristic's count, which
// at one segment runs variant 4), 4 = the single-segment one-barrier kernel, 5 = the
// cluster-segmented scan with `segments` segments (0 = the heuristic's count; one segment runs
// variant 4, and on a GPU without clusters, i.e. below sm_90, variant 6), 6 = variant 5's form
// without clusters (one block per channel group, S <= 4: what GPUs without clusters such as Jetson
// Orin run; more segments run variant 3) (3-6: dstate <= 16).
// Returns the variant now in force.
extern "C" int essm_tuning_set_scan_variant(int variant, int segments) {
  essm::g_scan_variant = (variant >= 1 && variant <= 6) ? variant : 0;
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
  if (batch <= 0 || dim <= 0 || dstate <= 0 || dstate > kMaxDecodeStates || state_in == nullptr ||
      x == nullptr || dt == nullptr || A == nullptr || Bm == nullptr || Cm == nullptr ||
      y == nullptr || state_out == nullptr || !scan_scales_ok(in_dtype, scales))
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
  const DecodeShape shape(dstate, aligned16(state_in) && aligned16(state_out));
  const int64_t threads = static_cast<int64_t>(batch) * dim * shape.lanes;
  if (threads > kMaxDecodeThreads) return cudaErrorInvalidValue;
  return dispatch_in_out(in_dtype, out_dtype, [&](auto ti, auto to) {
    return with_decode_shape(shape, [&](auto per, auto vec) {
      return launch_pdl(
          selective_state_update_kernel<decltype(ti), decltype(to), decltype(per)::value, decltype(vec)::value>,
          ceil_div(threads, kDecodeThreads), kDecodeThreads, 0, stream, a, shape.lanes);
    });
  });
}
