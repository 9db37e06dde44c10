// Generic IPluginV3 / IPluginCreatorV3One implementation and the library entry points.
#include "essm_plugin.h"

#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

using nvinfer1::DataType;
using nvinfer1::Dims;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldType;

namespace essm_trt {
namespace {

std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};

// Shape patterns: the number of explicit (non-'*') dimensions, and whether leading dims are free.
size_t fixedRank(char const* p) { return std::strlen(p) - (p[0] == '*'); }
bool hasStar(char const* p) { return p[0] == '*'; }

bool isIoType(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

bool ioFromOnnx(int32_t onnx, DataType& t) {
  switch (onnx) {
    case 1: t = DataType::kFLOAT; return true;
    case 10: t = DataType::kHALF; return true;
    case 16: t = DataType::kBF16; return true;
    default: return false;
  }
}

essm_dtype toEssm(DataType t) {
  switch (t) {
    case DataType::kHALF: return ESSM_F16;
    case DataType::kBF16: return ESSM_BF16;
    case DataType::kINT8: return ESSM_I8;
    default: return ESSM_F32;
  }
}

std::string fmt(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string dimsToString(Dims const& d) {
  std::string s = "[";
  for (int32_t i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

std::string formatAttrs(OpSpec const& spec, AttrValues const& v) {
  std::string s = std::string(spec.name) + "(";
  for (size_t k = 0; k < spec.attrs.size(); ++k) {
    char buf[64];
    if (spec.attrs[k].type == AttrType::kInt)
      std::snprintf(buf, sizeof buf, "%d", v.i(static_cast<int>(k)));
    else
      std::snprintf(buf, sizeof buf, "%.9g", v.f(static_cast<int>(k)));
    s += (k ? "," : "") + std::string(spec.attrs[k].name) + "=" + buf;
  }
  return s + ")";
}

// The size of symbol `c` once the primary (upper-case) symbols are bound; -1 when unknown.
int64_t derived(char c, Symbols const& sym) {
  if (c == 'k') return sym['K'] < 0 ? -1 : sym['K'] - 1;
  if (c == 'c') return sym['H'] < 0 || sym['P'] < 0 ? -1 : sym['H'] * sym['P'];
  return -1;
}

// A dimension expression for symbol `c` built from the first input that carries it.
nvinfer1::IDimensionExpr const* symbolExpr(OpSpec const& spec, char c, nvinfer1::DimsExprs const* inputs,
                                           nvinfer1::IExprBuilder& b) {
  if (c == '1') return b.constant(1);
  if (c == 'k') {
    nvinfer1::IDimensionExpr const* k = symbolExpr(spec, 'K', inputs, b);
    return k ? b.operation(nvinfer1::DimensionOperation::kSUB, *k, *b.constant(1)) : nullptr;
  }
  for (size_t i = 0; i < spec.inputs.size(); ++i) {
    char const* p = spec.inputs[i].dims;
    int32_t const lead = inputs[i].nbDims - static_cast<int32_t>(fixedRank(p));
    for (size_t j = 0; j < fixedRank(p); ++j)
      if (p[hasStar(p) + j] == c) return inputs[i].d[lead + static_cast<int32_t>(j)];
  }
  return nullptr;
}

}  // namespace

void logError(std::string const& msg) noexcept {
  try {
    std::string const line = "edgessm plugin: " + msg;
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger)
      logger->log(nvinfer1::ILogger::Severity::kERROR, line.c_str());
    else
      std::fprintf(stderr, "%s\n", line.c_str());
  } catch (...) {
    std::fputs("edgessm plugin: error while logging an error\n", stderr);
  }
}

std::string bindShapes(OpSpec const& spec, Dims const* dims, int32_t nb, Symbols& sym) {
  std::string const op = spec.name;
  if (nb != static_cast<int32_t>(spec.inputs.size()))
    return op + ": got " + std::to_string(nb) + " inputs, expected " + std::to_string(spec.inputs.size());
  std::array<char const*, 26> bound_by{};
  for (int pass = 0; pass < 2; ++pass) {  // pass 0: letters, pass 1: derived symbols and literals
    for (int32_t i = 0; i < nb; ++i) {
      TensorSpec const& t = spec.inputs[i];
      Dims const& d = dims[i];
      int32_t const fixed = static_cast<int32_t>(fixedRank(t.dims));
      if (hasStar(t.dims) ? d.nbDims < fixed : d.nbDims != fixed)
        return op + ": input '" + t.name + "' has shape " + dimsToString(d) + ", expected rank " +
               (hasStar(t.dims) ? ">= " : "") + std::to_string(fixed) + " (" + t.dims + ")";
      int32_t const lead = d.nbDims - fixed;
      if (pass == 0 && hasStar(t.dims)) {
        sym.lead = 1;
        for (int32_t j = 0; j < lead; ++j) sym.lead = d.d[j] < 0 || sym.lead < 0 ? -1 : sym.lead * d.d[j];
      }
      for (int32_t j = 0; j < fixed; ++j) {
        char const c = t.dims[hasStar(t.dims) + j];
        int64_t const v = d.d[lead + j];
        bool const upper = std::isupper(static_cast<unsigned char>(c)) != 0;
        if (v < 0 || upper != (pass == 0)) continue;
        int64_t expect = upper ? sym[c] : (c == '1' ? 1 : derived(c, sym));
        if (upper && expect < 0) {
          sym.upper[c - 'A'] = v;
          bound_by[c - 'A'] = t.name;
          continue;
        }
        if (expect >= 0 && v != expect) {
          std::string why = upper ? std::string(1, c) + "=" + std::to_string(expect) + " from input '" +
                                        bound_by[c - 'A'] + "'"
                                  : std::string("expected ") + std::to_string(expect) + " (" + c + ")";
          return op + ": input '" + t.name + "' has shape " + dimsToString(d) + ", dim " + std::to_string(lead + j) +
                 " should match " + t.dims + " but " + why;
        }
      }
    }
  }
  return "";
}

// ---- Plugin --------------------------------------------------------------------------------

Plugin::Plugin(OpSpec const& spec, std::string name, AttrValues attrs)
    : spec_(spec), name_(std::move(name)), attrs_(attrs), description_(formatAttrs(spec, attrs)) {}

Plugin::Plugin(Plugin const& other)
    : nvinfer1::IPluginV3(other),
      nvinfer1::IPluginV3OneCore(other),
      nvinfer1::IPluginV3OneBuild(other),
      nvinfer1::IPluginV3OneRuntime(other),
      spec_(other.spec_),
      name_(other.name_),
      attrs_(other.attrs_),
      description_(other.description_) {}

nvinfer1::IPluginCapability* Plugin::getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept {
  switch (type) {
    case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
    case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
    case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
  }
  return nullptr;
}

nvinfer1::IPluginV3* Plugin::clone() noexcept {
  try {
    return new Plugin(*this);
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": clone failed: " + e.what());
    return nullptr;
  }
}

nvinfer1::IPluginV3* Plugin::attachToContext(nvinfer1::IPluginResourceContext*) noexcept { return clone(); }

DataType Plugin::firstIoType(nvinfer1::PluginTensorDesc const* in, nvinfer1::PluginTensorDesc const* out) const {
  // Inputs first: HadamardQuantize has an activation input but an int8 output.
  for (size_t i = 0; i < spec_.inputs.size(); ++i)
    if (spec_.inputs[i].kind == Kind::kIO) return in[i].type;
  for (size_t o = 0; o < spec_.outputs.size(); ++o)
    if (spec_.outputs[o].kind == Kind::kIO) return out[o].type;
  return DataType::kFLOAT;  // unreachable: every op has an activation tensor (checked by the harness)
}

bool Plugin::fixedIo(DataType& io) const {
  return spec_.out_dtype_attr >= 0 && ioFromOnnx(attrs_.i(spec_.out_dtype_attr), io);
}

bool Plugin::supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                       int32_t nbInputs, int32_t nbOutputs) noexcept {
  if (nbInputs != static_cast<int32_t>(spec_.inputs.size()) || nbOutputs != getNbOutputs() || pos < 0 ||
      pos >= nbInputs + nbOutputs)
    return false;
  auto kindAt = [&](int32_t p) { return p < nbInputs ? spec_.inputs[p].kind : spec_.outputs[p - nbInputs].kind; };
  nvinfer1::PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != nvinfer1::TensorFormat::kLINEAR) return false;
  switch (kindAt(pos)) {
    case Kind::kF32: return d.type == DataType::kFLOAT;
    case Kind::kI8: return d.type == DataType::kINT8;
    case Kind::kIO: break;
  }
  DataType fixed{};
  if (fixedIo(fixed)) return d.type == fixed;
  if (!isIoType(d.type)) return false;
  for (int32_t q = 0; q < pos; ++q)  // every kIO tensor shares the first one's dtype
    if (kindAt(q) == Kind::kIO) return d.type == inOut[q].desc.type;
  return true;
}

int32_t Plugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                                   int32_t nbInputs) const noexcept {
  if (nbInputs != static_cast<int32_t>(spec_.inputs.size()) || nbOutputs != getNbOutputs()) {
    logError(std::string(spec_.name) + ": getOutputDataTypes called with a wrong number of tensors");
    return 1;
  }
  DataType io{};
  if (!fixedIo(io)) {
    int32_t first = -1;
    for (int32_t i = 0; i < nbInputs && first < 0; ++i)
      if (spec_.inputs[i].kind == Kind::kIO) first = i;
    if (first < 0 || !isIoType(inputTypes[first])) {
      logError(std::string(spec_.name) + ": activation inputs must be float32, float16 or bfloat16");
      return 1;
    }
    io = inputTypes[first];
  }
  for (int32_t o = 0; o < nbOutputs; ++o) {
    Kind const k = spec_.outputs[o].kind;
    outputTypes[o] = k == Kind::kIO ? io : k == Kind::kF32 ? DataType::kFLOAT : DataType::kINT8;
  }
  return 0;
}

int32_t Plugin::getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*,
                                int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                                nvinfer1::IExprBuilder& exprBuilder) noexcept {
  if (nbInputs != static_cast<int32_t>(spec_.inputs.size()) || nbOutputs != getNbOutputs()) {
    logError(std::string(spec_.name) + ": getOutputShapes called with a wrong number of tensors");
    return 1;
  }
  for (int32_t i = 0; i < nbInputs; ++i) {
    char const* p = spec_.inputs[i].dims;
    int32_t const fixed = static_cast<int32_t>(fixedRank(p));
    if (hasStar(p) ? inputs[i].nbDims < fixed : inputs[i].nbDims != fixed) {
      logError(std::string(spec_.name) + ": input '" + spec_.inputs[i].name + "' has rank " +
               std::to_string(inputs[i].nbDims) + ", expected " + p);
      return 1;
    }
  }
  for (int32_t o = 0; o < nbOutputs; ++o) {
    char const* p = spec_.outputs[o].dims;
    nvinfer1::DimsExprs& out = outputs[o];
    out.nbDims = 0;
    if (hasStar(p)) {  // leading dims copied from the input that has them (always input 0)
      int32_t const lead = inputs[0].nbDims - static_cast<int32_t>(fixedRank(spec_.inputs[0].dims));
      for (; out.nbDims < lead; ++out.nbDims) out.d[out.nbDims] = inputs[0].d[out.nbDims];
    }
    for (char const* c = p + hasStar(p); *c; ++c) {
      nvinfer1::IDimensionExpr const* e = symbolExpr(spec_, *c, inputs, exprBuilder);
      if (!e) {
        logError(std::string(spec_.name) + ": cannot express output dimension '" + *c + "'");
        return 1;
      }
      out.d[out.nbDims++] = e;
    }
  }
  return 0;
}

std::string Plugin::checkConcrete(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs,
                                  Symbols& sym) const {
  if (nbOutputs != getNbOutputs())
    return std::string(spec_.name) + ": got " + std::to_string(nbOutputs) + " outputs, expected " +
           std::to_string(getNbOutputs());
  std::vector<Dims> dims(static_cast<size_t>(std::max(nbInputs, 0)));
  for (int32_t i = 0; i < nbInputs; ++i) dims[i] = in[i].dims;
  std::string err = bindShapes(spec_, dims.data(), nbInputs, sym);
  if (err.empty()) {
    err = spec_.check(sym, attrs_);
    if (!err.empty()) err = std::string(spec_.name) + ": " + err;
  }
  return err;
}

int32_t Plugin::configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  try {
    std::vector<nvinfer1::PluginTensorDesc> descs;
    for (int32_t i = 0; i < nbInputs; ++i) descs.push_back(in[i].desc);
    Symbols sym;
    std::string const err = checkConcrete(descs.data(), nbInputs, nbOutputs, sym);
    if (err.empty()) return 0;
    logError(err);
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": configurePlugin: " + e.what());
  }
  return 1;
}

size_t Plugin::getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) const noexcept {
  if (spec_.workspace == nullptr) return 0;  // the launcher works in place in its outputs
  try {
    // the profile's largest shapes: the op's workspace function covers every shape up to them
    auto at_max = [](nvinfer1::DynamicPluginTensorDesc const* d, int32_t n) {
      std::vector<nvinfer1::PluginTensorDesc> v;
      for (int32_t i = 0; i < n; ++i) {
        v.push_back(d[i].desc);
        v.back().dims = d[i].max;
      }
      return v;
    };
    std::vector<nvinfer1::PluginTensorDesc> const in_max = at_max(in, nbInputs), out_max = at_max(out, nbOutputs);
    Symbols sym;
    std::string const err = checkConcrete(in_max.data(), nbInputs, nbOutputs, sym);
    if (!err.empty()) {
      logError(err);
      return 0;
    }
    DataType io{};
    if (!fixedIo(io)) io = firstIoType(in_max.data(), out_max.data());
    return spec_.workspace(sym, toEssm(io));
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": getWorkspaceSize: " + e.what());
  }
  return 0;
}

int32_t Plugin::onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                              nvinfer1::PluginTensorDesc const*, int32_t nbOutputs) noexcept {
  try {
    Symbols sym;
    std::string const err = checkConcrete(in, nbInputs, nbOutputs, sym);
    if (err.empty()) return 0;
    logError(err);
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": onShapeChange: " + e.what());
  }
  return 1;
}

int32_t Plugin::enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                        void const* const* inputs, void* const* outputs, void* workspace,
                        cudaStream_t stream) noexcept {
  try {
    int32_t const nbIn = static_cast<int32_t>(spec_.inputs.size());
    Symbols sym;
    std::string err = checkConcrete(inputDesc, nbIn, getNbOutputs(), sym);
    if (!err.empty()) {
      logError(err);
      return 1;
    }
    DataType io{};
    if (!fixedIo(io)) io = firstIoType(inputDesc, outputDesc);
    LaunchArgs const args{spec_, toEssm(io), inputs, outputs, sym, attrs_, workspace, stream};
    cudaError_t const e = spec_.launch(args);
    if (e == cudaSuccess) return 0;
    logError(std::string(spec_.name) + " (" + name_ + "): kernel launch failed: " + cudaGetErrorName(e) + " (" +
             cudaGetErrorString(e) + ")");
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": enqueue: " + e.what());
  }
  return 1;
}

nvinfer1::PluginFieldCollection const* Plugin::getFieldsToSerialize() noexcept {
  try {
    ser_fields_.clear();
    for (size_t k = 0; k < spec_.attrs.size(); ++k) {
      int const ki = static_cast<int>(k);
      if (spec_.attrs[k].type == AttrType::kInt) {
        ser_int_[k] = attrs_.i(ki);
        ser_fields_.emplace_back(spec_.attrs[k].name, &ser_int_[k], PluginFieldType::kINT32, 1);
      } else {
        ser_float_[k] = attrs_.f(ki);
        ser_fields_.emplace_back(spec_.attrs[k].name, &ser_float_[k], PluginFieldType::kFLOAT32, 1);
      }
    }
    ser_fc_.nbFields = static_cast<int32_t>(ser_fields_.size());
    ser_fc_.fields = ser_fields_.data();
    return &ser_fc_;
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": getFieldsToSerialize: " + e.what());
    return nullptr;
  }
}

// ---- Creator -------------------------------------------------------------------------------

namespace {

// One attribute value from a PluginField; "" or an error naming the field.
std::string readField(OpSpec const& spec, AttrSpec const& a, PluginField const& f, double& out) {
  std::string const where = std::string(spec.name) + ": field '" + a.name + "'";
  if (f.length != 1 || !f.data) return where + " must hold exactly one value (length " + std::to_string(f.length) + ")";
  if (a.type == AttrType::kInt) {
    switch (f.type) {
      case PluginFieldType::kINT32: out = *static_cast<int32_t const*>(f.data); break;
      case PluginFieldType::kINT64: out = static_cast<double>(*static_cast<int64_t const*>(f.data)); break;
      default: return where + " must be an int32/int64 field (ONNX int attribute)";
    }
  } else {
    switch (f.type) {
      case PluginFieldType::kFLOAT32: out = *static_cast<float const*>(f.data); break;
      case PluginFieldType::kFLOAT64: out = *static_cast<double const*>(f.data); break;
      default: return where + " must be a float32/float64 field (ONNX float attribute)";
    }
  }
  if (!(out >= a.lo && out <= a.hi)) return where + " = " + fmt(out) + " is outside [" + fmt(a.lo) + ", " + fmt(a.hi) + "]";
  return "";
}

std::string parseFields(OpSpec const& spec, nvinfer1::PluginFieldCollection const* fc, AttrValues& v) {
  std::array<bool, kMaxAttrs> seen{};
  for (size_t k = 0; k < spec.attrs.size(); ++k) v.v[k] = spec.attrs[k].dflt;
  for (int32_t i = 0; fc && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    size_t k = 0;
    while (k < spec.attrs.size() && (!f.name || std::strcmp(f.name, spec.attrs[k].name) != 0)) ++k;
    if (k == spec.attrs.size()) {
      std::string known;
      for (AttrSpec const& a : spec.attrs) known += std::string(known.empty() ? "" : ", ") + a.name;
      return std::string(spec.name) + ": unknown field '" + (f.name ? f.name : "(null)") + "' (expected: " + known +
             ")";
    }
    std::string err = readField(spec, spec.attrs[k], f, v.v[k]);
    if (!err.empty()) return err;
    seen[k] = true;
  }
  for (size_t k = 0; k < spec.attrs.size(); ++k)
    if (spec.attrs[k].required && !seen[k])
      return std::string(spec.name) + ": required attribute '" + spec.attrs[k].name + "' is missing";
  DataType io{};
  if (spec.out_dtype_attr >= 0 && !ioFromOnnx(v.i(spec.out_dtype_attr), io))
    return std::string(spec.name) + ": out_dtype=" + std::to_string(v.i(spec.out_dtype_attr)) +
           " is not 1 (float32), 10 (float16) or 16 (bfloat16)";
  std::string const err = spec.check(Symbols{}, v);  // attribute-only constraints
  return err.empty() ? "" : std::string(spec.name) + ": " + err;
}

}  // namespace

Creator::Creator(OpSpec const& spec) : spec_(spec) {
  for (AttrSpec const& a : spec.attrs)
    fields_.emplace_back(a.name, nullptr, a.type == AttrType::kInt ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32,
                         1);
  fc_.nbFields = static_cast<int32_t>(fields_.size());
  fc_.fields = fields_.data();
}

nvinfer1::IPluginV3* Creator::createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                           nvinfer1::TensorRTPhase) noexcept {
  try {
    AttrValues v;
    std::string const err = parseFields(spec_, fc, v);
    if (!err.empty()) {
      logError(err + (name ? std::string(" (node '") + name + "')" : ""));
      return nullptr;
    }
    return new Plugin(spec_, name ? name : "", v);
  } catch (std::exception const& e) {
    logError(std::string(spec_.name) + ": createPlugin: " + e.what());
    return nullptr;
  }
}

}  // namespace essm_trt

// ---- Entry points looked up by IPluginRegistry::loadLibrary / trtexec --dynamicPlugins ----------

#define ESSM_EXPORT extern "C" __attribute__((visibility("default")))

ESSM_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static std::vector<std::unique_ptr<essm_trt::Creator>> const creators = [] {
    std::vector<std::unique_ptr<essm_trt::Creator>> c;
    for (essm_trt::OpSpec const& s : essm_trt::opSpecs()) c.push_back(std::make_unique<essm_trt::Creator>(s));
    return c;
  }();
  static std::vector<nvinfer1::IPluginCreatorInterface*> const list = [] {
    std::vector<nvinfer1::IPluginCreatorInterface*> l;
    for (auto const& c : creators) l.push_back(c.get());
    return l;
  }();
  nbCreators = static_cast<int32_t>(list.size());
  return list.data();
}

ESSM_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { essm_trt::gLoggerFinder.store(finder); }
