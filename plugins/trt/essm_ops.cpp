// The op table: names, tensors, attributes and launchers of docs/onnx_ops.md.
// Tensor order and attribute names must match that document exactly: the ONNX parser maps node
// inputs by position and node attributes by name.
#include <cmath>
#include <limits>

#include "essm_plugin.h"

namespace essm_trt {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

float const* f32(void const* p) { return static_cast<float const*>(p); }
float* f32(void* p) { return static_cast<float*>(p); }
int i32(int64_t v) { return static_cast<int>(v); }

bool isQuant(LaunchArgs const& a) { return a.spec.out_dtype_attr >= 0; }
essm_dtype inDtype(LaunchArgs const& a) { return isQuant(a) ? ESSM_I8 : a.io; }

// Scales of a Quant(SelectiveScan|SelectiveStateUpdate), inputs first..first+4: the per-channel
// [D] scale, then delta/B/C/z [1]. All stay device tensors: the kernels read them, so enqueue never
// waits on the host and can be captured into a CUDA graph.
essm_scan_scales scanScales(LaunchArgs const& a, int first) {
  return essm_scan_scales{f32(a.in[first]), f32(a.in[first + 1]), f32(a.in[first + 2]), f32(a.in[first + 3]),
                          f32(a.in[first + 4])};
}

cudaError_t launchConv(LaunchArgs const& a) {
  Symbols const& s = a.sym;
  return essm_causal_conv1d_fwd(a.io, a.in[0], f32(a.in[1]), f32(a.in[2]), a.attrs.i(0), a.out[0], a.out[1],
                                i32(s['B']), i32(s['C']), i32(s['L']), i32(s['K']), a.stream);
}

cudaError_t launchConvUpdate(LaunchArgs const& a) {
  Symbols const& s = a.sym;
  return essm_causal_conv1d_update(a.io, a.in[0], a.in[1], f32(a.in[2]), f32(a.in[3]), a.attrs.i(0), a.out[0],
                                   a.out[1], i32(s['B']), i32(s['C']), i32(s['K']), a.stream);
}

// inputs: u delta A Bm Cm Dskip z delta_bias [u_scale delta_scale B_scale C_scale z_scale]
cudaError_t launchSelectiveScan(LaunchArgs const& a) {
  essm_scan_scales const scales = isQuant(a) ? scanScales(a, 8) : essm_scan_scales{};
  Symbols const& s = a.sym;
  return essm_selective_scan_fwd(inDtype(a), a.io, a.in[0], a.in[1], f32(a.in[2]), a.in[3], a.in[4], f32(a.in[5]),
                                 a.in[6], f32(a.in[7]), a.attrs.i(0), isQuant(a) ? &scales : nullptr, nullptr,
                                 a.out[0], f32(a.out[1]), i32(s['B']), i32(s['D']), i32(s['N']), i32(s['L']),
                                 a.stream);
}

// inputs: state x dt A Bm Cm Dskip z dt_bias [x_scale dt_scale B_scale C_scale z_scale]
cudaError_t launchSelectiveStateUpdate(LaunchArgs const& a) {
  essm_scan_scales const scales = isQuant(a) ? scanScales(a, 9) : essm_scan_scales{};
  Symbols const& s = a.sym;
  return essm_selective_state_update(inDtype(a), a.io, f32(a.in[0]), a.in[1], a.in[2], f32(a.in[3]), a.in[4],
                                     a.in[5], f32(a.in[6]), a.in[7], f32(a.in[8]), a.attrs.i(0),
                                     isQuant(a) ? &scales : nullptr, a.out[0], f32(a.out[1]), i32(s['B']),
                                     i32(s['D']), i32(s['N']), a.stream);
}

// The SSD scan's workspace (its sequence split) for batch <= B and seqlen <= L: what
// getWorkspaceSize reserves for the profile's largest shapes, and (no more than that) what a
// launch with smaller shapes may use.
size_t ssdScanWorkspace(Symbols const& s, essm_dtype io) {
  return essm_ssd_scan_workspace_size(io, i32(s['B']), i32(s['L']), i32(s['H']), i32(s['P']), i32(s['N']));
}

// inputs: x dt A Bm Cm Dskip dt_bias [x_scale B_scale C_scale]
cudaError_t launchSSDScan(LaunchArgs const& a) {
  // scale inputs exist only for the Quant* op: read them only then (float ops have 7 inputs)
  essm_ssd_scales const scales =
      isQuant(a) ? essm_ssd_scales{f32(a.in[7]), f32(a.in[8]), f32(a.in[9])} : essm_ssd_scales{};
  Symbols const& s = a.sym;
  return essm_ssd_scan_fwd(inDtype(a), a.io, a.in[0], a.in[1], f32(a.in[2]), a.in[3], a.in[4], f32(a.in[5]),
                           f32(a.in[6]), a.attrs.i(0), a.attrs.f(1), a.attrs.f(2), isQuant(a) ? &scales : nullptr,
                           nullptr, a.out[0], f32(a.out[1]), i32(s['B']), i32(s['L']), i32(s['H']), i32(s['P']),
                           i32(s['G']), i32(s['N']), a.attrs.i(3), a.workspace, ssdScanWorkspace(s, a.io),
                           a.stream);
}

// inputs: state x dt A Bm Cm Dskip dt_bias [x_scale B_scale C_scale]
cudaError_t launchSSDStateUpdate(LaunchArgs const& a) {
  essm_ssd_scales const scales =
      isQuant(a) ? essm_ssd_scales{f32(a.in[8]), f32(a.in[9]), f32(a.in[10])} : essm_ssd_scales{};
  Symbols const& s = a.sym;
  return essm_ssd_state_update(inDtype(a), a.io, f32(a.in[0]), a.in[1], a.in[2], f32(a.in[3]), a.in[4], a.in[5],
                               f32(a.in[6]), f32(a.in[7]), a.attrs.i(0), a.attrs.f(1), a.attrs.f(2),
                               isQuant(a) ? &scales : nullptr, a.out[0], f32(a.out[1]), i32(s['B']), i32(s['H']),
                               i32(s['P']), i32(s['G']), i32(s['N']), a.stream);
}

// HadamardTransform (y io) and HadamardQuantize (y int8, attribute 1 = out_scale).
cudaError_t launchHadamard(LaunchArgs const& a) {
  bool const quantize = a.spec.outputs[0].kind == Kind::kI8;
  return essm_hadamard_transform(a.io, quantize ? ESSM_I8 : a.io, a.in[0], f32(a.in[1]), i32(a.sym['M']),
                                 a.attrs.f(0), quantize ? a.attrs.f(1) : 1.0f, a.out[0], a.sym.lead,
                                 i32(a.sym['N']), a.stream);
}

// Attribute indices 1, 2 are dt_min, dt_max in both SSD ops.
std::string checkSSD(Symbols const& s, AttrValues const& attrs) {
  if (attrs.v[1] > attrs.v[2])
    return "dt_min=" + std::to_string(attrs.f(1)) + " > dt_max=" + std::to_string(attrs.f(2));
  if (s['H'] > 0 && s['G'] > 0 && s['H'] % s['G'] != 0)
    return "nheads H=" + std::to_string(s['H']) + " is not a multiple of ngroups G=" + std::to_string(s['G']);
  return "";
}

std::string checkHadamard(Symbols const& s, AttrValues const&) {
  int64_t const m = s['M'], n = s['N'];
  if (m < 0) return "";
  if (m != 1 && m != 12 && m != 20 && m != 28 && m != 40)
    return "had_m is " + std::to_string(m) + "x" + std::to_string(m) + ", expected m in {1, 12, 20, 28, 40}";
  if (n < 0) return "";
  int64_t const pow2 = n % m == 0 ? n / m : 0;
  if (pow2 <= 0 || (pow2 & (pow2 - 1)) != 0 || n > 32768)
    return "last dim n=" + std::to_string(n) + " is not m * 2^k <= 32768 with m=" + std::to_string(m);
  return "";
}

std::string noCheck(Symbols const&, AttrValues const&) { return ""; }

// Attribute lists shared between a float op and its Quant* twin (out_dtype appended last).
constexpr double kFltMax = std::numeric_limits<float>::max();
AttrSpec const kSilu{"silu", AttrType::kInt, false, 1, 0, 1};
AttrSpec const kDeltaSoftplus{"delta_softplus", AttrType::kInt, false, 1, 0, 1};
AttrSpec const kDtSoftplus{"dt_softplus", AttrType::kInt, false, 1, 0, 1};
AttrSpec const kDtMin{"dt_min", AttrType::kFloat, false, 0.0, 0, kInf};
AttrSpec const kDtMax{"dt_max", AttrType::kFloat, false, kInf, 0, kInf};
AttrSpec const kChunk{"chunk_size", AttrType::kInt, false, 256, 1, 1 << 20};
// ONNX TensorProto enum: 1 = float32, 10 = float16, 16 = bfloat16 (checked in ioFromOnnx).
AttrSpec const kOutDtype{"out_dtype", AttrType::kInt, true, 0, 1, 16};
AttrSpec const kScale{"scale", AttrType::kFloat, false, 1.0, -kFltMax, kFltMax};
AttrSpec const kOutScale{"out_scale", AttrType::kFloat, true, 0, std::numeric_limits<float>::min(), kFltMax};

std::vector<TensorSpec> concat(std::vector<TensorSpec> a, std::vector<TensorSpec> const& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

// The Quant* twin: same tensors with the listed inputs made int8, plus the scale inputs.
OpSpec quantTwin(OpSpec base, char const* name, std::vector<char const*> const& int8_inputs,
                 std::vector<TensorSpec> const& scales) {
  base.name = name;
  for (TensorSpec& t : base.inputs)
    for (char const* q : int8_inputs)
      if (std::string(t.name) == q) t.kind = Kind::kI8;
  base.inputs = concat(base.inputs, scales);
  base.attrs.push_back(kOutDtype);
  base.out_dtype_attr = static_cast<int>(base.attrs.size()) - 1;
  return base;
}

std::vector<OpSpec> buildSpecs() {
  Kind const IO = Kind::kIO, F32 = Kind::kF32, I8 = Kind::kI8;
  OpSpec conv{"CausalConv1d",
              {{"x", IO, "BCL"}, {"weight", F32, "CK"}, {"bias", F32, "C"}},
              {{"y", IO, "BCL"}, {"conv_state", IO, "BCk"}},
              {kSilu}, -1, noCheck, launchConv};
  OpSpec conv_update{"CausalConv1dUpdate",
                     {{"x", IO, "BC"}, {"conv_state", IO, "BCk"}, {"weight", F32, "CK"}, {"bias", F32, "C"}},
                     {{"y", IO, "BC"}, {"new_conv_state", IO, "BCk"}},
                     {kSilu}, -1, noCheck, launchConvUpdate};
  OpSpec scan{"SelectiveScan",
              {{"u", IO, "BDL"}, {"delta", IO, "BDL"}, {"A", F32, "DN"}, {"Bm", IO, "BNL"}, {"Cm", IO, "BNL"},
               {"Dskip", F32, "D"}, {"z", IO, "BDL"}, {"delta_bias", F32, "D"}},
              {{"y", IO, "BDL"}, {"final_state", F32, "BDN"}},
              {kDeltaSoftplus}, -1, noCheck, launchSelectiveScan};
  OpSpec scan_update{"SelectiveStateUpdate",
                     {{"state", F32, "BDN"}, {"x", IO, "BD"}, {"dt", IO, "BD"}, {"A", F32, "DN"}, {"Bm", IO, "BN"},
                      {"Cm", IO, "BN"}, {"Dskip", F32, "D"}, {"z", IO, "BD"}, {"dt_bias", F32, "D"}},
                     {{"y", IO, "BD"}, {"new_state", F32, "BDN"}},
                     {kDtSoftplus}, -1, noCheck, launchSelectiveStateUpdate};
  OpSpec ssd{"SSDScan",
             {{"x", IO, "BLHP"}, {"dt", IO, "BLH"}, {"A", F32, "H"}, {"Bm", IO, "BLGN"}, {"Cm", IO, "BLGN"},
              {"Dskip", F32, "H"}, {"dt_bias", F32, "H"}},
             {{"y", IO, "BLHP"}, {"final_state", F32, "BHPN"}},
             {kDtSoftplus, kDtMin, kDtMax, kChunk}, -1, checkSSD, launchSSDScan, ssdScanWorkspace};
  OpSpec ssd_update{"SSDStateUpdate",
                    {{"state", F32, "BHPN"}, {"x", IO, "BHP"}, {"dt", IO, "BH"}, {"A", F32, "H"}, {"Bm", IO, "BGN"},
                     {"Cm", IO, "BGN"}, {"Dskip", F32, "H"}, {"dt_bias", F32, "H"}},
                    {{"y", IO, "BHP"}, {"new_state", F32, "BHPN"}},
                    {kDtSoftplus, kDtMin, kDtMax}, -1, checkSSD, launchSSDStateUpdate};
  OpSpec hadamard{"HadamardTransform",
                  {{"x", IO, "*N"}, {"had_m", F32, "MM"}},
                  {{"y", IO, "*N"}},
                  {kScale}, -1, checkHadamard, launchHadamard};
  OpSpec hadamard_q = hadamard;
  hadamard_q.name = "HadamardQuantize";
  hadamard_q.outputs = {{"y", I8, "*N"}};
  hadamard_q.attrs = {kScale, kOutScale};

  std::vector<TensorSpec> const scan_scales_d = {{"delta_scale", F32, "1"}, {"B_scale", F32, "1"},
                                                 {"C_scale", F32, "1"}, {"z_scale", F32, "1"}};
  OpSpec qscan = quantTwin(scan, "QuantSelectiveScan", {"u", "delta", "Bm", "Cm", "z"},
                           concat({{"u_scale", F32, "D"}}, scan_scales_d));
  OpSpec qscan_update = quantTwin(scan_update, "QuantSelectiveStateUpdate", {"x", "dt", "Bm", "Cm", "z"},
                                  concat({{"x_scale", F32, "D"}}, {{"dt_scale", F32, "1"}, {"B_scale", F32, "1"},
                                                                   {"C_scale", F32, "1"}, {"z_scale", F32, "1"}}));
  std::vector<TensorSpec> const ssd_scales = {{"x_scale", F32, "c"}, {"B_scale", F32, "G"}, {"C_scale", F32, "G"}};
  OpSpec qssd = quantTwin(ssd, "QuantSSDScan", {"x", "Bm", "Cm"}, ssd_scales);
  OpSpec qssd_update = quantTwin(ssd_update, "QuantSSDStateUpdate", {"x", "Bm", "Cm"}, ssd_scales);

  return {conv, conv_update, scan, scan_update, ssd, ssd_update, hadamard, hadamard_q,
          qscan, qscan_update, qssd, qssd_update};
}

}  // namespace

std::vector<OpSpec> const& opSpecs() {
  static std::vector<OpSpec> const specs = buildSpecs();
  return specs;
}

}  // namespace essm_trt
