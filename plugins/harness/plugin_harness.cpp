// Plugin harness: exercises libedgessm_plugins.so through TensorRT's plugin interfaces the way
// TensorRT itself would (TensorRT cannot run in every workplace; this proves the glue directly).
//
// For every op of docs/onnx_ops.md and every activation dtype it: dlopens the library, takes the
// creators from the exported getCreators(), creates the plugin from a PluginFieldCollection,
// queries the capability interfaces, output count/dtypes/shapes (through a constant-only
// IExprBuilder), supportsFormatCombination (accepted and rejected combinations),
// configurePlugin (a valid and a mismatched shape), the workspace size, clone, the serialized
// fields -> createPlugin(kRUNTIME), attachToContext and onShapeChange, then enqueues (captured
// into a CUDA graph, then launched) on device buffers with fresh random inputs and NaN-poisoned
// outputs and compares with a float64 CPU
// reference of the op written here from docs/onnx_ops.md. Exits 1 on any mismatch.
//
// usage: edgessm_plugin_harness [--lib path/libedgessm_plugins.so] [--seed N] [--op Name] [--no-enqueue]
// --no-enqueue runs every check except the device execution (for machines without a GPU).
#include <NvInferRuntime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#include <dlfcn.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using nvinfer1::DataType;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

#ifndef ESSM_DEFAULT_PLUGIN_PATH
#define ESSM_DEFAULT_PLUGIN_PATH "libedgessm_plugins.so"
#endif

namespace {

#define CUDA_CHECK(expr)                                                                          \
  do {                                                                                            \
    cudaError_t const e_ = (expr);                                                                \
    if (e_ != cudaSuccess)                                                                        \
      throw std::runtime_error(std::string(#expr) + " failed: " + cudaGetErrorString(e_));       \
  } while (0)

// ---- what TensorRT would provide ------------------------------------------------------------

class Logger final : public nvinfer1::ILogger {
 public:
  int errors = 0;
  void log(Severity s, char const* msg) noexcept override {
    if (s <= Severity::kERROR) ++errors;
    if (s <= Severity::kWARNING) std::printf("    [plugin log] %s\n", msg);
  }
};

class LoggerFinder final : public nvinfer1::ILoggerFinder {
 public:
  Logger logger;
  nvinfer1::ILogger* findLogger() override { return &logger; }
};

// IDimensionExpr / IExprBuilder hold a pointer to an implementation object; the harness supplies
// one that only knows constants (all shapes are concrete here).
class ConstExprImpl final : public nvinfer1::apiv::VDimensionExpr {
 public:
  explicit ConstExprImpl(int64_t v) : v_(v) {}
  bool isConstant() const override { return true; }
  int64_t getConstantValue() const override { return v_; }
  bool isSizeTensor() const override { return false; }

 private:
  int64_t v_;
};

class ConstExpr final : public nvinfer1::IDimensionExpr {
 public:
  explicit ConstExpr(int64_t v) : impl_(v) { mImpl = &impl_; }
  ~ConstExpr() override = default;

 private:
  ConstExprImpl impl_;
};

class ExprBuilderImpl final : public nvinfer1::apiv::VExprBuilder {
 public:
  nvinfer1::IDimensionExpr const* constant(int64_t v) override {
    exprs_.push_back(std::make_unique<ConstExpr>(v));
    return exprs_.back().get();
  }
  nvinfer1::IDimensionExpr const* operation(nvinfer1::DimensionOperation op, nvinfer1::IDimensionExpr const& a,
                                            nvinfer1::IDimensionExpr const& b) override {
    int64_t const x = a.getConstantValue(), y = b.getConstantValue();
    using Op = nvinfer1::DimensionOperation;
    switch (op) {
      case Op::kSUM: return constant(x + y);
      case Op::kPROD: return constant(x * y);
      case Op::kMAX: return constant(std::max(x, y));
      case Op::kMIN: return constant(std::min(x, y));
      case Op::kSUB: return constant(x - y);
      case Op::kEQUAL: return constant(x == y);
      case Op::kLESS: return constant(x < y);
      case Op::kFLOOR_DIV: return constant(x / y - ((x % y != 0) && ((x < 0) != (y < 0))));
      case Op::kCEIL_DIV: return constant((x + y - 1) / y);
    }
    return nullptr;
  }
  nvinfer1::IDimensionExpr const* declareSizeTensor(int32_t, nvinfer1::IDimensionExpr const&,
                                                    nvinfer1::IDimensionExpr const&) override {
    return nullptr;  // no edgessm op has data-dependent output shapes
  }

 private:
  std::vector<std::unique_ptr<ConstExpr>> exprs_;
};

class ExprBuilder final : public nvinfer1::IExprBuilder {
 public:
  ExprBuilder() { mImpl = &impl_; }
  ~ExprBuilder() override = default;
  nvinfer1::IDimensionExpr const* make(int64_t v) { return impl_.constant(v); }

 private:
  ExprBuilderImpl impl_;
};

class ResourceContext final : public nvinfer1::IPluginResourceContext {
 public:
  nvinfer1::IGpuAllocator* getGpuAllocator() const noexcept override { return nullptr; }
  nvinfer1::IErrorRecorder* getErrorRecorder() const noexcept override { return nullptr; }
};

// ---- host tensors ---------------------------------------------------------------------------

enum class DT { F32, F16, BF16, I8 };

char const* dtName(DT t) {
  switch (t) {
    case DT::F32: return "f32";
    case DT::F16: return "f16";
    case DT::BF16: return "bf16";
    case DT::I8: return "i8";
  }
  return "?";
}

DataType toTrt(DT t) {
  switch (t) {
    case DT::F32: return DataType::kFLOAT;
    case DT::F16: return DataType::kHALF;
    case DT::BF16: return DataType::kBF16;
    case DT::I8: return DataType::kINT8;
  }
  return DataType::kFLOAT;
}

size_t dtSize(DT t) { return t == DT::F32 ? 4 : t == DT::I8 ? 1 : 2; }

// Round a value to what the dtype can hold (the reference then sees exactly the kernel's input).
double roundTo(DT t, double v) {
  switch (t) {
    case DT::F32: return static_cast<float>(v);
    case DT::F16: return __half2float(__float2half_rn(static_cast<float>(v)));
    case DT::BF16: return __bfloat162float(__float2bfloat16_rn(static_cast<float>(v)));
    case DT::I8: return std::max(-128.0, std::min(127.0, std::nearbyint(v)));
  }
  return v;
}

struct Tensor {
  std::string name;
  DT dt;
  std::vector<int64_t> dims;
  std::vector<double> val;  // exact values (already rounded to dt)
  bool act = false;         // an activation ("io") tensor of the op contract


  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : dims) n *= d;
    return n;
  }
  std::vector<uint8_t> encode() const {
    std::vector<uint8_t> b(val.size() * dtSize(dt));
    for (size_t i = 0; i < val.size(); ++i) {
      float const f = static_cast<float>(val[i]);
      switch (dt) {
        case DT::F32: std::memcpy(&b[i * 4], &f, 4); break;
        case DT::F16: { __half h = __float2half_rn(f); std::memcpy(&b[i * 2], &h, 2); break; }
        case DT::BF16: { __nv_bfloat16 h = __float2bfloat16_rn(f); std::memcpy(&b[i * 2], &h, 2); break; }
        case DT::I8: b[i] = static_cast<uint8_t>(static_cast<int8_t>(val[i])); break;
      }
    }
    return b;
  }
  std::vector<double> decode(std::vector<uint8_t> const& b) const {
    std::vector<double> v(static_cast<size_t>(numel()));
    for (size_t i = 0; i < v.size(); ++i) {
      switch (dt) {
        case DT::F32: { float f; std::memcpy(&f, &b[i * 4], 4); v[i] = f; break; }
        case DT::F16: { __half h; std::memcpy(&h, &b[i * 2], 2); v[i] = __half2float(h); break; }
        case DT::BF16: { __nv_bfloat16 h; std::memcpy(&h, &b[i * 2], 2); v[i] = __bfloat162float(h); break; }
        case DT::I8: v[i] = static_cast<int8_t>(b[i]); break;
      }
    }
    return v;
  }
  nvinfer1::Dims trtDims() const {
    nvinfer1::Dims d{};
    d.nbDims = static_cast<int32_t>(dims.size());
    for (size_t i = 0; i < dims.size(); ++i) d.d[i] = dims[i];
    return d;
  }
};

std::string shapeStr(std::vector<int64_t> const& d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? "," : "") + std::to_string(d[i]);
  return s + "]";
}

struct Attr {
  std::string name;
  bool is_int;
  double v;
};

struct Case {
  std::string op;
  std::string label;
  std::vector<Tensor> in;
  std::vector<Tensor> out;  // dims/dtype expected from the plugin; val = float64 reference
  std::vector<Attr> attrs;  // fields passed to the creator (others take their defaults)
  double tol;               // on ||out - ref|| / ||ref|| for float outputs
};

class Rng {
 public:
  explicit Rng(uint64_t seed) : g_(seed) {}
  double normal() { return std::normal_distribution<double>(0.0, 1.0)(g_); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(g_); }
  int64_t integer(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g_); }

 private:
  std::mt19937_64 g_;
};

Tensor make(std::string name, DT dt, std::vector<int64_t> dims, std::function<double()> gen) {
  Tensor t{std::move(name), dt, std::move(dims), {}};
  t.val.resize(static_cast<size_t>(t.numel()));
  for (double& v : t.val) v = roundTo(dt, gen());
  return t;
}

Tensor outSpec(std::string name, DT dt, std::vector<int64_t> dims) { return Tensor{std::move(name), dt, std::move(dims), {}}; }

Tensor act(Tensor t) {
  t.act = true;
  return t;
}

double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }
double silu(double x) { return x / (1.0 + std::exp(-x)); }

// ---- float64 references (docs/onnx_ops.md) ----------------------------------------------------

// Causal depthwise conv over concat(state0 [B,C,K-1], x [B,C,L]); y [B,C,L], state1 [B,C,K-1].
void refConv(int64_t B, int64_t C, int64_t L, int64_t K, std::vector<double> const& x, std::vector<double> const& w,
             std::vector<double> const& bias, bool act, std::vector<double> const& state0, std::vector<double>& y,
             std::vector<double>& state1) {
  y.assign(B * C * L, 0.0);
  state1.assign(B * C * (K - 1), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c) {
      auto at = [&](int64_t t) {  // window position t in [-(K-1), L)
        return t >= 0 ? x[(b * C + c) * L + t] : state0.empty() ? 0.0 : state0[(b * C + c) * (K - 1) + (K - 1 + t)];
      };
      for (int64_t t = 0; t < L; ++t) {
        double s = bias[c];
        for (int64_t k = 0; k < K; ++k) s += w[c * K + k] * at(t - K + 1 + k);
        y[(b * C + c) * L + t] = act ? silu(s) : s;
      }
      for (int64_t j = 0; j < K - 1; ++j) state1[(b * C + c) * (K - 1) + j] = at(L - K + 1 + j);
    }
}

// Mamba-1 recurrence; u, delta, z, y [B,D,L]; Bm, Cm [B,N,L]; states [B,D,N] (h0 empty = zeros).
void refScan(int64_t B, int64_t D, int64_t N, int64_t L, std::vector<double> const& u, std::vector<double> const& delta,
             std::vector<double> const& A, std::vector<double> const& Bm, std::vector<double> const& Cm,
             std::vector<double> const& Dskip, std::vector<double> const& z, std::vector<double> const& dbias,
             bool sp, std::vector<double> const& h0, std::vector<double>& y, std::vector<double>& h1) {
  y.assign(B * D * L, 0.0);
  h1 = h0.empty() ? std::vector<double>(B * D * N, 0.0) : h0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) {
      double* h = &h1[(b * D + d) * N];
      for (int64_t t = 0; t < L; ++t) {
        int64_t const i = (b * D + d) * L + t;
        double const dt = sp ? softplus(delta[i] + dbias[d]) : delta[i] + dbias[d];
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) {
          int64_t const j = (b * N + n) * L + t;
          h[n] = std::exp(dt * A[d * N + n]) * h[n] + dt * Bm[j] * u[i];
          acc += h[n] * Cm[j];
        }
        y[i] = (acc + Dskip[d] * u[i]) * silu(z[i]);
      }
    }
}

// Mamba-2 SSD recurrence; x, y [B,L,H,P]; dt [B,L,H]; Bm, Cm [B,L,G,N]; states [B,H,P,N].
void refSSD(int64_t B, int64_t L, int64_t H, int64_t P, int64_t G, int64_t N, std::vector<double> const& x,
            std::vector<double> const& dt, std::vector<double> const& A, std::vector<double> const& Bm,
            std::vector<double> const& Cm, std::vector<double> const& Dskip, std::vector<double> const& dtb, bool sp,
            double dtmin, double dtmax, std::vector<double> const& s0, std::vector<double>& y, std::vector<double>& s1) {
  y.assign(B * L * H * P, 0.0);
  s1 = s0.empty() ? std::vector<double>(B * H * P * N, 0.0) : s0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      int64_t const g = h / (H / G);
      for (int64_t t = 0; t < L; ++t) {
        double const raw = dt[(b * L + t) * H + h] + dtb[h];
        double const d = std::min(std::max(sp ? softplus(raw) : raw, dtmin), dtmax);
        double const decay = std::exp(d * A[h]);
        double const* bv = &Bm[((b * L + t) * G + g) * N];
        double const* cv = &Cm[((b * L + t) * G + g) * N];
        for (int64_t p = 0; p < P; ++p) {
          double const xv = x[((b * L + t) * H + h) * P + p];
          double* s = &s1[((b * H + h) * P + p) * N];
          double acc = 0.0;
          for (int64_t n = 0; n < N; ++n) {
            s[n] = decay * s[n] + d * bv[n] * xv;
            acc += s[n] * cv[n];
          }
          y[((b * L + t) * H + h) * P + p] = acc + Dskip[h] * xv;
        }
      }
    }
}

// v = scale * (had_m (x) H_{2^k}) x along the last axis, x [rows, n].
std::vector<double> refHadamard(int64_t rows, int64_t n, int64_t m, std::vector<double> const& had,
                                std::vector<double> const& x, double scale) {
  int64_t const p2 = n / m;
  std::vector<double> v(rows * n, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      int64_t const a = i / p2, b = i % p2;
      double s = 0.0;
      for (int64_t j = 0; j < n; ++j) {
        int64_t const a2 = j / p2, b2 = j % p2;
        double const sign = (__builtin_popcountll(static_cast<uint64_t>(b & b2)) & 1) ? -1.0 : 1.0;
        s += had[a * m + a2] * sign * x[r * n + j];
      }
      v[r * n + i] = scale * s;
    }
  return v;
}

// ---- test cases -----------------------------------------------------------------------------

double tolFor(DT io) { return io == DT::F32 ? 1e-4 : io == DT::F16 ? 5e-3 : 2e-2; }

std::vector<double> dequant(Tensor const& q, std::vector<double> const& scale, int64_t channel_stride,
                            int64_t channels) {
  std::vector<double> v(q.val.size());
  for (size_t i = 0; i < v.size(); ++i)
    v[i] = q.val[i] * scale[(static_cast<int64_t>(i) / channel_stride) % channels];
  return v;
}

Case convCase(DT io, bool update, Rng& r) {
  int64_t const B = update ? 3 : 2, C = 80, L = update ? 1 : 37, K = 4;
  bool const use_silu = r.integer(0, 1);
  Case c{update ? "CausalConv1dUpdate" : "CausalConv1d", "", {}, {}, {{"silu", true, double(use_silu)}}, tolFor(io)};
  auto n = [&] { return r.normal(); };
  Tensor x = act(make("x", io, update ? std::vector<int64_t>{B, C} : std::vector<int64_t>{B, C, L}, n));
  Tensor st = act(make("conv_state", io, {B, C, K - 1}, n));
  Tensor w = make("weight", DT::F32, {C, K}, [&] { return 0.5 * r.normal(); });
  Tensor bias = make("bias", DT::F32, {C}, n);
  std::vector<double> y, s1;
  refConv(B, C, L, K, x.val, w.val, bias.val, use_silu, update ? st.val : std::vector<double>{}, y, s1);
  c.in = update ? std::vector<Tensor>{x, st, w, bias} : std::vector<Tensor>{x, w, bias};
  c.out = {act(outSpec("y", io, x.dims)), act(outSpec(update ? "new_conv_state" : "conv_state", io, {B, C, K - 1}))};
  c.out[0].val = y;
  c.out[1].val = s1;
  c.label = "B=" + std::to_string(B) + " C=" + std::to_string(C) + " L=" + std::to_string(L) + " K=4 silu=" +
            std::to_string(use_silu);
  return c;
}

// SelectiveScan / SelectiveStateUpdate and their Quant twins (out_dtype = io).
Case scanCase(DT io, bool update, bool quant, Rng& r) {
  int64_t const B = update ? 3 : 2, D = 48, N = 16, L = update ? 1 : 67;
  bool const sp = r.integer(0, 1);
  std::string op = std::string(quant ? "Quant" : "") + (update ? "SelectiveStateUpdate" : "SelectiveScan");
  std::string const spName = update ? "dt_softplus" : "delta_softplus";
  Case c{op, "", {}, {}, {{spName, true, double(sp)}}, tolFor(io)};
  if (quant) c.attrs.push_back({"out_dtype", true, io == DT::F32 ? 1.0 : io == DT::F16 ? 10.0 : 16.0});
  std::vector<int64_t> const bdl = update ? std::vector<int64_t>{B, D} : std::vector<int64_t>{B, D, L};
  std::vector<int64_t> const bnl = update ? std::vector<int64_t>{B, N} : std::vector<int64_t>{B, N, L};
  // Without softplus dt = delta + bias is used as is: keep it positive so the recurrence decays.
  double const dlo = sp ? -3.0 : 0.0, dhi = sp ? 0.5 : 0.25, blo = sp ? -2.0 : 0.0, bhi = sp ? 0.0 : 0.1;
  double const dscale = r.uniform(0.5, 1.0) * std::max(-dlo, dhi) / 127.0;  // delta_scale when quantized
  auto nrm = [&]() -> std::function<double()> {
    if (quant) return [&r] { return double(r.integer(-127, 127)); };
    return [&r] { return r.normal(); };
  };
  auto dgen = [&]() -> std::function<double()> {
    if (quant) return [&r, dlo, dhi, dscale] { return double(r.integer(int64_t(dlo / dscale), int64_t(dhi / dscale))); };
    return [&r, dlo, dhi] { return r.uniform(dlo, dhi); };
  };
  DT const act_dt = quant ? DT::I8 : io;
  char const* un = update ? "x" : "u";
  char const* dn = update ? "dt" : "delta";
  Tensor u = make(un, act_dt, bdl, nrm());
  Tensor delta = make(dn, act_dt, bdl, dgen());
  Tensor A = make("A", DT::F32, {D, N}, [&] { return -std::exp(r.uniform(-1.5, 1.5)); });
  Tensor Bm = make("Bm", act_dt, bnl, nrm());
  Tensor Cm = make("Cm", act_dt, bnl, nrm());
  Tensor Dskip = make("Dskip", DT::F32, {D}, [&] { return r.normal(); });
  Tensor z = make("z", act_dt, bdl, nrm());
  Tensor dbias = make(update ? "dt_bias" : "delta_bias", DT::F32, {D}, [&] { return r.uniform(blo, bhi); });
  if (!quant) {
    for (Tensor* t : {&u, &delta, &Bm, &Cm, &z}) t->act = true;
  }
  Tensor state = make("state", DT::F32, {B, D, N}, [&] { return r.normal(); });

  // Quantized: dequantize with per-channel [D] and per-tensor scales (sized so values are O(1)).
  std::vector<double> uv = u.val, dv = delta.val, bv = Bm.val, cv = Cm.val, zv = z.val;
  std::vector<Tensor> scales;
  if (quant) {
    Tensor us = make(std::string(un) + "_scale", DT::F32, {D}, [&] { return r.uniform(0.5, 2.0) / 127.0; });
    Tensor ds = make(std::string(dn) + "_scale", DT::F32, {1}, [&] { return dscale; });
    Tensor bs = make("B_scale", DT::F32, {1}, [&] { return r.uniform(1.0, 2.0) / 127.0; });
    Tensor cs = make("C_scale", DT::F32, {1}, [&] { return r.uniform(1.0, 2.0) / 127.0; });
    Tensor zs = make("z_scale", DT::F32, {1}, [&] { return r.uniform(1.0, 2.0) / 127.0; });
    int64_t const per_d = update ? 1 : L;
    uv = dequant(u, us.val, per_d, D);
    dv = dequant(delta, ds.val, 1, 1);
    bv = dequant(Bm, bs.val, 1, 1);
    cv = dequant(Cm, cs.val, 1, 1);
    zv = dequant(z, zs.val, 1, 1);
    scales = {us, ds, bs, cs, zs};
  }
  std::vector<double> y, h1;
  refScan(B, D, N, L, uv, dv, A.val, bv, cv, Dskip.val, zv, dbias.val, sp, update ? state.val : std::vector<double>{},
          y, h1);
  if (update)
    c.in = {state, u, delta, A, Bm, Cm, Dskip, z, dbias};
  else
    c.in = {u, delta, A, Bm, Cm, Dskip, z, dbias};
  c.in.insert(c.in.end(), scales.begin(), scales.end());
  c.out = {act(outSpec("y", io, bdl)), outSpec(update ? "new_state" : "final_state", DT::F32, {B, D, N})};
  c.out[0].val = y;
  c.out[1].val = h1;
  c.label = "B=" + std::to_string(B) + " D=48 N=16 L=" + std::to_string(L) + " " + spName + "=" + std::to_string(sp);
  return c;
}

// SSDScan / SSDStateUpdate and their Quant twins.
Case ssdCase(DT io, bool update, bool quant, Rng& r) {
  // L 200: three 64-token chunks and a partial one, which the scan splits into segments (its workspace)
  int64_t const B = update ? 3 : 2, L = update ? 1 : 200, H = 4, P = 16, G = 2, N = 32;
  bool const sp = r.integer(0, 1), clamp = r.integer(0, 1);
  std::string op = std::string(quant ? "Quant" : "") + (update ? "SSDStateUpdate" : "SSDScan");
  Case c{op, "", {}, {}, {{"dt_softplus", true, double(sp)}}, tolFor(io)};
  double dtmin = 0.0, dtmax = std::numeric_limits<double>::infinity();
  if (clamp) {  // exercise the clamp; otherwise the defaults (0, +inf) apply
    dtmin = 0.05;
    dtmax = 0.8;
    c.attrs.push_back({"dt_min", false, dtmin});
    c.attrs.push_back({"dt_max", false, dtmax});
  }
  if (!update) c.attrs.push_back({"chunk_size", true, 32.0});  // a hint the kernel may ignore (it does)
  if (quant) c.attrs.push_back({"out_dtype", true, io == DT::F32 ? 1.0 : io == DT::F16 ? 10.0 : 16.0});
  DT const act_dt = quant ? DT::I8 : io;
  auto nrm = [&]() -> std::function<double()> {
    if (quant) return [&r] { return double(r.integer(-127, 127)); };
    return [&r] { return r.normal(); };
  };
  std::vector<int64_t> xd = update ? std::vector<int64_t>{B, H, P} : std::vector<int64_t>{B, L, H, P};
  std::vector<int64_t> dd = update ? std::vector<int64_t>{B, H} : std::vector<int64_t>{B, L, H};
  std::vector<int64_t> bd = update ? std::vector<int64_t>{B, G, N} : std::vector<int64_t>{B, L, G, N};
  Tensor x = make("x", act_dt, xd, nrm());
  Tensor dt = act(make("dt", io, dd, [&] { return r.uniform(-3.0, 0.5); }));  // dt_min >= 0 clamps negatives
  Tensor A = make("A", DT::F32, {H}, [&] { return -std::exp(r.uniform(-1.0, 1.5)); });
  Tensor Bm = make("Bm", act_dt, bd, nrm());
  Tensor Cm = make("Cm", act_dt, bd, nrm());
  x.act = Bm.act = Cm.act = !quant;
  Tensor Dskip = make("Dskip", DT::F32, {H}, [&] { return r.normal(); });
  Tensor dtb = make("dt_bias", DT::F32, {H}, [&] { return r.uniform(-1.0, 0.5); });
  Tensor state = make("state", DT::F32, {B, H, P, N}, [&] { return r.normal(); });
  std::vector<double> xv = x.val, bv = Bm.val, cv = Cm.val;
  std::vector<Tensor> scales;
  if (quant) {
    Tensor xs = make("x_scale", DT::F32, {H * P}, [&] { return r.uniform(0.5, 2.0) / 127.0; });
    Tensor bs = make("B_scale", DT::F32, {G}, [&] { return r.uniform(0.5, 2.0) / 127.0; });
    Tensor cs = make("C_scale", DT::F32, {G}, [&] { return r.uniform(0.5, 2.0) / 127.0; });
    xv = dequant(x, xs.val, 1, H * P);
    bv = dequant(Bm, bs.val, N, G);
    cv = dequant(Cm, cs.val, N, G);
    scales = {xs, bs, cs};
  }
  std::vector<double> y, s1;
  refSSD(B, L, H, P, G, N, xv, dt.val, A.val, bv, cv, Dskip.val, dtb.val, sp, dtmin, dtmax,
         update ? state.val : std::vector<double>{}, y, s1);
  if (update)
    c.in = {state, x, dt, A, Bm, Cm, Dskip, dtb};
  else
    c.in = {x, dt, A, Bm, Cm, Dskip, dtb};
  c.in.insert(c.in.end(), scales.begin(), scales.end());
  c.out = {act(outSpec("y", io, xd)), outSpec(update ? "new_state" : "final_state", DT::F32, {B, H, P, N})};
  c.out[0].val = y;
  c.out[1].val = s1;
  c.label = "B=" + std::to_string(B) + " L=" + std::to_string(L) + " H=4 P=16 G=2 N=32 dt_softplus=" +
            std::to_string(sp) + (clamp ? " dt in [0.05,0.8]" : "");
  return c;
}

Case hadamardCase(DT io, bool quantize, int64_t m, Rng& r) {
  int64_t const n = m * (m == 1 ? 512 : 64);
  std::vector<int64_t> const xd = quantize ? std::vector<int64_t>{5, n} : std::vector<int64_t>{2, 3, n};
  int64_t const rows = quantize ? 5 : 6;
  double const scale = 1.0 / std::sqrt(double(n));
  Case c{quantize ? "HadamardQuantize" : "HadamardTransform", "", {}, {}, {{"scale", false, scale}}, tolFor(io)};
  Tensor x = act(make("x", io, xd, [&] { return r.normal(); }));
  // Any +-1 base matrix defines the op; for m = 1 the contract fixes it to [[1]].
  Tensor had = make("had_m", DT::F32, {m, m}, [&] { return m == 1 || r.integer(0, 1) ? 1.0 : -1.0; });
  std::vector<double> v = refHadamard(rows, n, m, had.val, x.val, static_cast<float>(scale));
  c.in = {x, had};
  c.out = {quantize ? outSpec("y", DT::I8, xd) : act(outSpec("y", io, xd))};
  if (quantize) {
    double amax = 0.0;
    for (double e : v) amax = std::max(amax, std::fabs(e));
    double const out_scale = static_cast<float>(amax / 150.0);  // the largest values clamp to 127 / -128
    c.attrs.push_back({"out_scale", false, out_scale});
    for (double& e : v) e /= out_scale;  // reference holds the unrounded quotient (see compareInt8)
  }
  c.out[0].val = v;
  c.label = "x" + shapeStr(xd) + " m=" + std::to_string(m);
  return c;
}

std::vector<Case> allCases(Rng& r) {
  std::vector<Case> cs;
  for (DT io : {DT::F32, DT::F16, DT::BF16}) {
    cs.push_back(convCase(io, false, r));
    cs.push_back(convCase(io, true, r));
    cs.push_back(scanCase(io, false, false, r));
    cs.push_back(scanCase(io, true, false, r));
    cs.push_back(ssdCase(io, false, false, r));
    cs.push_back(ssdCase(io, true, false, r));
    cs.push_back(hadamardCase(io, false, io == DT::F16 ? 12 : io == DT::BF16 ? 40 : 1, r));
    cs.push_back(hadamardCase(io, true, io == DT::F32 ? 20 : io == DT::F16 ? 28 : 1, r));
    if (io == DT::BF16) continue;  // the Quant* ops' out_dtype contract is float32 / float16
    cs.push_back(scanCase(io, false, true, r));
    cs.push_back(scanCase(io, true, true, r));
    cs.push_back(ssdCase(io, false, true, r));
    cs.push_back(ssdCase(io, true, true, r));
  }
  return cs;
}

// ---- checks ---------------------------------------------------------------------------------

struct Failures {
  std::vector<std::string> list;
  void add(std::string const& s) {
    list.push_back(s);
    std::printf("    FAIL: %s\n", s.c_str());
  }
};

using GetCreatorsFn = nvinfer1::IPluginCreatorInterface* const* (*)(int32_t&);
using SetLoggerFinderFn = void (*)(nvinfer1::ILoggerFinder*);

struct Fields {
  std::vector<int32_t> ints;
  std::vector<float> floats;
  std::vector<PluginField> f;
  nvinfer1::PluginFieldCollection fc{};
  explicit Fields(std::vector<Attr> const& attrs) {
    ints.reserve(attrs.size());
    floats.reserve(attrs.size());
    for (Attr const& a : attrs) {
      if (a.is_int) {
        ints.push_back(static_cast<int32_t>(a.v));
        f.emplace_back(a.name.c_str(), &ints.back(), PluginFieldType::kINT32, 1);
      } else {
        floats.push_back(static_cast<float>(a.v));
        f.emplace_back(a.name.c_str(), &floats.back(), PluginFieldType::kFLOAT32, 1);
      }
    }
    fc.nbFields = static_cast<int32_t>(f.size());
    fc.fields = f.data();
  }
};

// Field name -> value as a double, from a serialized collection.
std::map<std::string, double> fieldMap(nvinfer1::PluginFieldCollection const* fc) {
  std::map<std::string, double> m;
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.type == PluginFieldType::kINT32)
      m[f.name] = *static_cast<int32_t const*>(f.data);
    else if (f.type == PluginFieldType::kFLOAT32)
      m[f.name] = *static_cast<float const*>(f.data);
    else
      m[f.name] = std::numeric_limits<double>::quiet_NaN();
  }
  return m;
}

nvinfer1::DynamicPluginTensorDesc dynDesc(nvinfer1::Dims d, DataType t) {
  nvinfer1::DynamicPluginTensorDesc x{};
  x.desc.dims = d;
  x.desc.type = t;
  x.desc.format = nvinfer1::TensorFormat::kLINEAR;
  x.desc.scale = -1.0f;
  x.min = x.opt = x.max = d;
  return x;
}

double relErr(std::vector<double> const& out, std::vector<double> const& ref, bool& nan) {
  double num = 0.0, den = 0.0;
  nan = false;
  for (size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) nan = true;
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

// int8 output vs the unrounded reference quotient q: must equal clamp(rint(q)), except where q
// lies within float32 rounding of a .5 tie (the kernel sums in float32, the reference in float64).
int64_t compareInt8(std::vector<double> const& out, std::vector<double> const& q) {
  int64_t bad = 0;
  for (size_t i = 0; i < out.size(); ++i) {
    double const want = std::max(-128.0, std::min(127.0, std::nearbyint(q[i])));
    if (out[i] == want) continue;
    double const tie = std::fabs(std::fabs(q[i] - std::trunc(q[i])) - 0.5);
    bool const near_tie = tie < 1e-4 * std::max(1.0, std::fabs(q[i])) && std::fabs(out[i] - want) == 1.0;
    if (!near_tie) ++bad;
  }
  return bad;
}

struct DeviceBuffers {
  std::vector<void*> ptrs;
  ~DeviceBuffers() {
    for (void* p : ptrs) cudaFree(p);
  }
  void* alloc(std::vector<uint8_t> const& host) {
    void* p = nullptr;
    CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(host.size(), 1)));
    ptrs.push_back(p);
    CUDA_CHECK(cudaMemcpy(p, host.data(), host.size(), cudaMemcpyHostToDevice));
    return p;
  }
};

std::vector<uint8_t> poison(Tensor const& t, std::vector<double> const& ref) {
  std::vector<uint8_t> b(static_cast<size_t>(t.numel()) * dtSize(t.dt));
  uint32_t const f32nan = 0x7FC00000u;
  uint16_t const f16nan = 0x7E00u, bf16nan = 0x7FC0u;
  for (size_t i = 0; i < static_cast<size_t>(t.numel()); ++i) {
    switch (t.dt) {
      case DT::F32: std::memcpy(&b[i * 4], &f32nan, 4); break;
      case DT::F16: std::memcpy(&b[i * 2], &f16nan, 2); break;
      case DT::BF16: std::memcpy(&b[i * 2], &bf16nan, 2); break;
      case DT::I8: {  // int8 has no NaN: poison with a value >= 64 away from the expected one
        double const want = std::max(-128.0, std::min(127.0, std::nearbyint(ref[i])));
        b[i] = static_cast<uint8_t>(static_cast<int8_t>(want >= 0 ? want - 100 : want + 100));
        break;
      }
    }
  }
  return b;
}

// Build-phase checks on `build` for the case's concrete tensors; returns the workspace size.
size_t checkBuild(Case const& c, nvinfer1::IPluginV3OneBuild* build, Logger& log, Failures& f) {
  int32_t const nin = static_cast<int32_t>(c.in.size()), nout = static_cast<int32_t>(c.out.size());
  if (build->getNbOutputs() != nout)
    f.add(c.op + ": getNbOutputs() = " + std::to_string(build->getNbOutputs()) + ", expected " + std::to_string(nout));

  std::vector<DataType> itypes, otypes(nout, DataType::kBOOL);
  for (Tensor const& t : c.in) itypes.push_back(toTrt(t.dt));
  if (build->getOutputDataTypes(otypes.data(), nout, itypes.data(), nin) != 0)
    f.add(c.op + ": getOutputDataTypes failed");
  for (int32_t o = 0; o < nout; ++o)
    if (otypes[o] != toTrt(c.out[o].dt))
      f.add(c.op + ": output '" + c.out[o].name + "' dtype " + std::to_string(int(otypes[o])) + ", expected " +
            dtName(c.out[o].dt));

  ExprBuilder eb;
  std::vector<nvinfer1::DimsExprs> ins(nin), outs(nout);
  for (int32_t i = 0; i < nin; ++i) {
    ins[i].nbDims = static_cast<int32_t>(c.in[i].dims.size());
    for (int32_t j = 0; j < ins[i].nbDims; ++j) ins[i].d[j] = eb.make(c.in[i].dims[j]);
  }
  if (build->getOutputShapes(ins.data(), nin, nullptr, 0, outs.data(), nout, eb) != 0) {
    f.add(c.op + ": getOutputShapes failed");
  } else {
    for (int32_t o = 0; o < nout; ++o) {
      std::vector<int64_t> got;
      for (int32_t j = 0; j < outs[o].nbDims; ++j)
        got.push_back(outs[o].d[j] && outs[o].d[j]->isConstant() ? outs[o].d[j]->getConstantValue() : -999);
      if (got != c.out[o].dims)
        f.add(c.op + ": output '" + c.out[o].name + "' shape " + shapeStr(got) + ", expected " + shapeStr(c.out[o].dims));
    }
  }

  // supportsFormatCombination: the real combination is accepted position by position; a wrong
  // dtype, a non-linear format and (for activations) a dtype differing from the first are rejected.
  std::vector<nvinfer1::DynamicPluginTensorDesc> io;
  for (Tensor const& t : c.in) io.push_back(dynDesc(t.trtDims(), toTrt(t.dt)));
  for (Tensor const& t : c.out) io.push_back(dynDesc(t.trtDims(), toTrt(t.dt)));
  for (int32_t pos = 0; pos < nin + nout; ++pos) {
    std::string const who = c.op + ": supportsFormatCombination(pos " + std::to_string(pos) + ")";
    if (!build->supportsFormatCombination(pos, io.data(), nin, nout)) f.add(who + " rejects the valid combination");
    auto saved = io[pos];
    io[pos].desc.type = DataType::kINT32;
    if (build->supportsFormatCombination(pos, io.data(), nin, nout)) f.add(who + " accepts int32");
    io[pos] = saved;
    io[pos].desc.format = nvinfer1::TensorFormat::kCHW32;
    if (build->supportsFormatCombination(pos, io.data(), nin, nout)) f.add(who + " accepts CHW32");
    io[pos] = saved;
    // Another float precision: only the first activation tensor of a non-Quant op may choose it.
    DataType const other = saved.desc.type == DataType::kHALF ? DataType::kFLOAT : DataType::kHALF;
    Tensor const& t = pos < nin ? c.in[pos] : c.out[pos - nin];
    bool first_act = t.act && c.op.rfind("Quant", 0) != 0;
    for (int32_t q = 0; q < pos && first_act; ++q) first_act = !(q < nin ? c.in[q] : c.out[q - nin]).act;
    io[pos].desc.type = other;
    if (build->supportsFormatCombination(pos, io.data(), nin, nout) != first_act)
      f.add(who + (first_act ? " rejects" : " accepts") + " dtype " + std::to_string(int(other)) + " for '" + t.name + "'");
    io[pos] = saved;
  }

  if (build->configurePlugin(io.data(), nin, io.data() + nin, nout) != 0) f.add(c.op + ": configurePlugin failed");
  // A shape that contradicts another input must be refused at build time, with a logged error.
  for (int32_t i = nin - 1; i >= 1; --i) {
    if (c.in[i].dims.empty() || c.in[i].dims[0] == 1) continue;
    auto bad = io;
    bad[i].desc.dims.d[0] += 1;
    bad[i].min = bad[i].opt = bad[i].max = bad[i].desc.dims;
    int const before = log.errors;
    if (build->configurePlugin(bad.data(), nin, bad.data() + nin, nout) == 0 || log.errors == before)
      f.add(c.op + ": configurePlugin accepted input '" + c.in[i].name + "' with dim 0 off by one");
    break;
  }
  // Only the SSD scan asks for a workspace (its sequence split, 16-bit outputs only); the
  // harness shapes are small enough to be split.
  size_t const ws = build->getWorkspaceSize(io.data(), nin, io.data() + nin, nout);
  bool const wants_ws = c.op.find("SSDScan") != std::string::npos && c.out[0].dt != DT::F32;
  if ((ws != 0) != wants_ws) f.add(c.op + ": workspace " + std::to_string(ws) + " bytes, expected " + (wants_ws ? "some" : "none"));
  return ws;
}

// Enqueue on device (with `workspace_bytes` of workspace, poisoned) and compare with the reference.
void checkEnqueue(Case const& c, nvinfer1::IPluginV3OneRuntime* rt, bool enqueue, size_t workspace_bytes, Failures& f) {
  int32_t const nin = static_cast<int32_t>(c.in.size()), nout = static_cast<int32_t>(c.out.size());
  std::vector<nvinfer1::PluginTensorDesc> din, dout;
  for (Tensor const& t : c.in) din.push_back(dynDesc(t.trtDims(), toTrt(t.dt)).desc);
  for (Tensor const& t : c.out) dout.push_back(dynDesc(t.trtDims(), toTrt(t.dt)).desc);
  if (rt->onShapeChange(din.data(), nin, dout.data(), nout) != 0) f.add(c.op + ": onShapeChange failed");
  if (!enqueue) return;

  DeviceBuffers buf;
  std::vector<void const*> in_ptrs;
  std::vector<void*> out_ptrs;
  for (Tensor const& t : c.in) in_ptrs.push_back(buf.alloc(t.encode()));
  for (Tensor const& t : c.out) out_ptrs.push_back(buf.alloc(poison(t, t.val)));
  void* workspace = workspace_bytes ? buf.alloc(std::vector<uint8_t>(workspace_bytes, 0xFF)) : nullptr;  // NaN floats
  // enqueue is captured into a CUDA graph that is then launched, as TensorRT does when the
  // application captures enqueueV3: a plugin that synchronizes or reads device memory on the host
  // breaks the capture and fails here.
  cudaStream_t stream = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  int32_t const rc = rt->enqueue(din.data(), dout.data(), in_ptrs.data(), out_ptrs.data(), workspace, stream);
  cudaGraph_t graph = nullptr;
  cudaError_t const captured = cudaStreamEndCapture(stream, &graph);
  cudaError_t ran = captured;
  if (captured == cudaSuccess && rc == 0) {
    cudaGraphExec_t exec = nullptr;
    ran = cudaGraphInstantiate(&exec, graph, 0);
    if (ran == cudaSuccess) ran = cudaGraphLaunch(exec, stream);
    if (ran == cudaSuccess) ran = cudaStreamSynchronize(stream);
    if (exec != nullptr) CUDA_CHECK(cudaGraphExecDestroy(exec));
  }
  if (graph != nullptr) CUDA_CHECK(cudaGraphDestroy(graph));
  CUDA_CHECK(cudaStreamDestroy(stream));
  if (rc != 0) f.add(c.op + ": enqueue under CUDA-graph capture returned " + std::to_string(rc));
  if (captured != cudaSuccess) {
    f.add(c.op + ": enqueue broke the CUDA-graph capture: " + cudaGetErrorString(captured));
    return;
  }
  if (ran != cudaSuccess) throw std::runtime_error(c.op + ": graph launch failed: " + cudaGetErrorString(ran));
  if (rc != 0) return;

  for (int32_t o = 0; o < nout; ++o) {
    Tensor const& t = c.out[o];
    std::vector<uint8_t> host(static_cast<size_t>(t.numel()) * dtSize(t.dt));
    CUDA_CHECK(cudaMemcpy(host.data(), out_ptrs[o], host.size(), cudaMemcpyDeviceToHost));
    std::vector<double> const got = t.decode(host);
    if (t.dt == DT::I8) {
      int64_t const bad = compareInt8(got, t.val);
      std::printf("    %-14s %-5s %-14s mismatches %lld / %lld\n", t.name.c_str(), dtName(t.dt), shapeStr(t.dims).c_str(),
                  static_cast<long long>(bad), static_cast<long long>(t.numel()));
      if (bad) f.add(c.op + ": int8 output '" + t.name + "' differs from round(ref) at " + std::to_string(bad) + " elements");
      continue;
    }
    bool nan = false;
    double const err = relErr(got, t.val, nan);
    // f32 outputs (states) of a low-precision op carry the inputs' rounding only: same bound as the op.
    std::printf("    %-14s %-5s %-14s rel err %.3e (tol %.0e)%s\n", t.name.c_str(), dtName(t.dt), shapeStr(t.dims).c_str(),
                err, c.tol, nan ? " NaN/Inf!" : "");
    if (nan) f.add(c.op + ": output '" + t.name + "' has NaN/Inf (unwritten or overflow)");
    if (!(err <= c.tol)) f.add(c.op + ": output '" + t.name + "' rel err " + std::to_string(err));
  }
}

void runCase(Case const& c, nvinfer1::IPluginCreatorV3One* creator, Logger& log, bool enqueue, Failures& f) {
  std::printf("  %s [%s] %s\n", c.op.c_str(), dtName(c.out[0].dt == DT::I8 ? c.in[0].dt : c.out[0].dt), c.label.c_str());
  // getFieldNames advertises every attribute the case may set.
  std::set<std::string> advertised;
  nvinfer1::PluginFieldCollection const* names = creator->getFieldNames();
  for (int32_t i = 0; names && i < names->nbFields; ++i) advertised.insert(names->fields[i].name);
  for (Attr const& a : c.attrs)
    if (!advertised.count(a.name)) f.add(c.op + ": getFieldNames() lacks '" + a.name + "'");

  Fields fields(c.attrs);
  std::unique_ptr<nvinfer1::IPluginV3> p(creator->createPlugin("harness_node", &fields.fc, nvinfer1::TensorRTPhase::kBUILD));
  if (!p) {
    f.add(c.op + ": createPlugin(kBUILD) returned null");
    return;
  }
  auto* core = static_cast<nvinfer1::IPluginV3OneCore*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kCORE));
  auto* build = static_cast<nvinfer1::IPluginV3OneBuild*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kBUILD));
  auto* rt0 = static_cast<nvinfer1::IPluginV3OneRuntime*>(p->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  if (!core || !build || !rt0) {
    f.add(c.op + ": a capability interface is null");
    return;
  }
  if (c.op != core->getPluginName() || std::string(core->getPluginVersion()) != "1" ||
      std::string(core->getPluginNamespace()) != "")
    f.add(c.op + ": core reports " + core->getPluginName() + " v" + core->getPluginVersion());
  if (std::string(build->getInterfaceInfo().kind) != "PLUGIN_V3ONE_BUILD") f.add(c.op + ": build interface kind");

  size_t const workspace_bytes = checkBuild(c, build, log, f);

  // clone -> serialize -> createPlugin(kRUNTIME) -> attachToContext: what engine (de)serialization does.
  std::unique_ptr<nvinfer1::IPluginV3> cl(p->clone());
  if (!cl) {
    f.add(c.op + ": clone returned null");
    return;
  }
  auto* rt1 = static_cast<nvinfer1::IPluginV3OneRuntime*>(cl->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  nvinfer1::PluginFieldCollection const* ser = rt1->getFieldsToSerialize();
  std::map<std::string, double> const sm = fieldMap(ser);
  for (Attr const& a : c.attrs) {
    auto it = sm.find(a.name);
    if (it == sm.end() || static_cast<float>(it->second) != static_cast<float>(a.v))
      f.add(c.op + ": serialized field '" + a.name + "' lost its value");
  }
  std::unique_ptr<nvinfer1::IPluginV3> p2(creator->createPlugin("harness_node", ser, nvinfer1::TensorRTPhase::kRUNTIME));
  if (!p2) {
    f.add(c.op + ": createPlugin(kRUNTIME) from the serialized fields returned null");
    return;
  }
  auto* rt2 = static_cast<nvinfer1::IPluginV3OneRuntime*>(p2->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME));
  if (fieldMap(rt2->getFieldsToSerialize()) != sm) f.add(c.op + ": re-created plugin serializes different fields");
  ResourceContext ctx;
  std::unique_ptr<nvinfer1::IPluginV3> attached(rt2->attachToContext(&ctx));
  if (!attached) {
    f.add(c.op + ": attachToContext returned null");
    return;
  }
  checkEnqueue(c, static_cast<nvinfer1::IPluginV3OneRuntime*>(
                      attached->getCapabilityInterface(nvinfer1::PluginCapabilityType::kRUNTIME)),
               enqueue, workspace_bytes, f);
}

// Creator-level rejections: unknown fields, out-of-range values, missing required attributes.
void checkRejections(std::map<std::string, nvinfer1::IPluginCreatorV3One*> const& creators, Logger& log, Failures& f) {
  struct Bad {
    char const* op;
    std::vector<Attr> attrs;
    char const* why;
  };
  std::vector<Bad> const bad = {
      {"CausalConv1d", {{"bogus", true, 1}}, "an unknown field"},
      {"CausalConv1d", {{"silu", true, 2}}, "silu=2"},
      {"SSDScan", {{"chunk_size", true, 0}}, "chunk_size=0"},
      {"SSDScan", {{"dt_min", false, 0.5}, {"dt_max", false, 0.1}}, "dt_min > dt_max"},
      {"QuantSSDScan", {}, "a missing out_dtype"},
      {"QuantSelectiveScan", {{"out_dtype", true, 7}}, "out_dtype=7"},
      {"HadamardQuantize", {{"scale", false, 1.0}}, "a missing out_scale"},
      {"HadamardQuantize", {{"out_scale", false, -1.0}}, "out_scale=-1"},
  };
  for (Bad const& b : bad) {
    Fields fields(b.attrs);
    int const before = log.errors;
    std::unique_ptr<nvinfer1::IPluginV3> p(
        creators.at(b.op)->createPlugin("bad_node", &fields.fc, nvinfer1::TensorRTPhase::kBUILD));
    if (p || log.errors == before) f.add(std::string(b.op) + ": createPlugin accepted " + b.why);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string lib = ESSM_DEFAULT_PLUGIN_PATH, only;
  uint64_t seed = std::random_device{}();
  bool enqueue = true;
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    if (a == "--lib" && i + 1 < argc) lib = argv[++i];
    else if (a == "--seed" && i + 1 < argc) seed = std::stoull(argv[++i]);
    else if (a == "--op" && i + 1 < argc) only = argv[++i];
    else if (a == "--no-enqueue") enqueue = false;
    else {
      std::fprintf(stderr, "usage: %s [--lib libedgessm_plugins.so] [--seed N] [--op Name] [--no-enqueue]\n", argv[0]);
      return 2;
    }
  }
  try {
    void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) throw std::runtime_error("dlopen " + lib + ": " + dlerror());
    auto getCreators = reinterpret_cast<GetCreatorsFn>(dlsym(h, "getCreators"));
    auto setLoggerFinder = reinterpret_cast<SetLoggerFinderFn>(dlsym(h, "setLoggerFinder"));
    if (!getCreators || !setLoggerFinder) throw std::runtime_error(lib + " does not export getCreators/setLoggerFinder");
    static LoggerFinder finder;
    setLoggerFinder(&finder);

    std::string device = "none (--no-enqueue: interface checks only)";
    if (enqueue) {
      int dev = 0;
      cudaDeviceProp prop{};
      CUDA_CHECK(cudaGetDevice(&dev));
      CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
      device = std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ")";
    }
    std::printf("edgessm plugin harness: %s, device %s, seed %llu\n", lib.c_str(), device.c_str(),
                static_cast<unsigned long long>(seed));

    Failures f;
    int32_t n = 0;
    nvinfer1::IPluginCreatorInterface* const* list = getCreators(n);
    std::map<std::string, nvinfer1::IPluginCreatorV3One*> creators;
    for (int32_t i = 0; i < n; ++i) {
      if (std::string(list[i]->getInterfaceInfo().kind) != "PLUGIN CREATOR_V3ONE") {
        f.add(std::string("creator ") + std::to_string(i) + " is not an IPluginCreatorV3One");
        continue;
      }
      auto* c = static_cast<nvinfer1::IPluginCreatorV3One*>(list[i]);
      if (std::string(c->getPluginVersion()) != "1" || std::string(c->getPluginNamespace()) != "")
        f.add(std::string(c->getPluginName()) + ": version/namespace must be \"1\"/\"\"");
      creators[c->getPluginName()] = c;
    }
    std::set<std::string> const expected = {"CausalConv1d", "CausalConv1dUpdate", "SelectiveScan",
                                            "SelectiveStateUpdate", "SSDScan", "SSDStateUpdate",
                                            "HadamardTransform", "HadamardQuantize", "QuantSelectiveScan",
                                            "QuantSelectiveStateUpdate", "QuantSSDScan", "QuantSSDStateUpdate"};
    std::set<std::string> got;
    for (auto const& kv : creators) got.insert(kv.first);
    if (got != expected) {
      f.add("getCreators() returned " + std::to_string(n) + " creators, not exactly the 12 ops of docs/onnx_ops.md");
      for (auto const& e : expected)
        if (!got.count(e)) f.add("missing creator " + e);
    }
    checkRejections(creators, finder.logger, f);

    Rng rng(seed);
    int ran = 0;
    for (Case const& c : allCases(rng)) {
      if (!only.empty() && c.op != only) continue;
      if (!creators.count(c.op)) continue;
      size_t const before = f.list.size();
      runCase(c, creators.at(c.op), finder.logger, enqueue, f);
      std::printf("    -> %s\n", f.list.size() == before ? "ok" : "FAILED");
      ++ran;
    }
    std::printf("\n%d cases, %zu failures (seed %llu)\n", ran, f.list.size(), static_cast<unsigned long long>(seed));
    for (auto const& s : f.list) std::printf("  FAIL %s\n", s.c_str());
    return f.list.empty() && ran > 0 ? 0 : 1;
  } catch (std::exception const& e) {
    std::fprintf(stderr, "harness error: %s\n", e.what());
    return 1;
  }
}
