// edgessm TensorRT plugins: one generic IPluginV3 implementation driven by a per-op descriptor.
//
// Every op of docs/onnx_ops.md is described by an OpSpec (tensor dtype classes, symbolic shapes,
// attributes, launcher); `Plugin` and `Creator` implement the TensorRT interfaces once for all of
// them. Only TensorRT's header-only interface classes are used, so the library does not link
// libnvinfer: TensorRT finds the creators through the exported `getCreators` entry point.
#pragma once

#include <NvInferRuntime.h>
#include <edgessm/kernels.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace essm_trt {

// Which dtypes a tensor may have. kIO: the op's activation dtype (float32/float16/bfloat16,
// shared by every kIO tensor of one plugin; for the Quant* ops it is fixed by `out_dtype`).
enum class Kind : uint8_t { kIO, kF32, kI8 };

// A tensor's shape is a string of symbols, one per dimension:
//   'A'..'Z'  a size shared by every tensor that uses the same letter (B = batch, L = seqlen, ...)
//   'k'       K - 1 (conv state width)       'c'  H * P (Quamba2 per-channel scale length)
//   '1'       the literal 1                  '*'  (first only) any number of leading dimensions
struct TensorSpec {
  char const* name;
  Kind kind;
  char const* dims;
};

enum class AttrType : uint8_t { kInt, kFloat };

struct AttrSpec {
  char const* name;
  AttrType type;
  bool required;  // no default: createPlugin fails without it
  double dflt;
  double lo, hi;  // valid range, inclusive (NaN is always rejected)
};

constexpr int kMaxTensors = 16;
constexpr int kMaxAttrs = 6;

// Attribute values of one plugin instance, in AttrSpec order.
struct AttrValues {
  std::array<double, kMaxAttrs> v{};
  int32_t i(int idx) const { return static_cast<int32_t>(v[idx]); }
  float f(int idx) const { return static_cast<float>(v[idx]); }
};

// Sizes bound to the shape symbols of one call (-1 = not known yet).
struct Symbols {
  std::array<int64_t, 26> upper{};  // 'A'..'Z'
  int64_t lead = 1;                  // product of the '*' leading dimensions
  Symbols() { upper.fill(-1); }
  int64_t operator[](char s) const { return upper[s - 'A']; }
};

struct OpSpec;

struct LaunchArgs {
  OpSpec const& spec;
  essm_dtype io;  // activation dtype of the kIO tensors
  void const* const* in;
  void* const* out;
  Symbols const& sym;
  AttrValues const& attrs;
  void* workspace;  // getWorkspaceSize's bytes (of the profile's largest shapes)
  cudaStream_t stream;
};

struct OpSpec {
  char const* name;
  std::vector<TensorSpec> inputs;
  std::vector<TensorSpec> outputs;
  std::vector<AttrSpec> attrs;
  int out_dtype_attr;  // index of the `out_dtype` attribute (Quant* ops), else -1
  // Size constraints beyond shape agreement, checked once all symbols are known; "" = fine.
  std::string (*check)(Symbols const&, AttrValues const&);
  cudaError_t (*launch)(LaunchArgs const&);
  // Device workspace bytes for every shape up to the bound symbols (a profile's largest); none if null.
  size_t (*workspace)(Symbols const&, essm_dtype io) = nullptr;
};

// The op table (essm_ops.cpp), in docs/onnx_ops.md order.
std::vector<OpSpec> const& opSpecs();

// Logging through the ILogger TensorRT hands over via setLoggerFinder (stderr before that).
void logError(std::string const& msg) noexcept;

// Binds the shape symbols of `spec` to input dims (entries of -1 are skipped) and checks that
// every input agrees. Returns "" or a message naming the op, tensor and dimension.
std::string bindShapes(OpSpec const& spec, nvinfer1::Dims const* dims, int32_t nb, Symbols& sym);

class Plugin final : public nvinfer1::IPluginV3,
                     public nvinfer1::IPluginV3OneCore,
                     public nvinfer1::IPluginV3OneBuild,
                     public nvinfer1::IPluginV3OneRuntime {
 public:
  Plugin(OpSpec const& spec, std::string name, AttrValues attrs);
  Plugin(Plugin const& other);
  Plugin& operator=(Plugin const&) = delete;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return spec_.name; }
  char const* getPluginVersion() const noexcept override { return "1"; }
  char const* getPluginNamespace() const noexcept override { return ""; }

  // IPluginV3OneBuild
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
                             nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs,
                          nvinfer1::DimsExprs const* shapeInputs, int32_t nbShapeInputs,
                          nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut,
                                 int32_t nbInputs, int32_t nbOutputs) noexcept override;
  int32_t getNbOutputs() const noexcept override { return static_cast<int32_t>(spec_.outputs.size()); }
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) const noexcept override;
  char const* getTimingCacheID() noexcept override { return description_.c_str(); }
  char const* getMetadataString() noexcept override { return description_.c_str(); }

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs,
                        nvinfer1::PluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  // The fixed activation dtype of Quant* ops (from out_dtype), or kFLOAT/false when free.
  bool fixedIo(nvinfer1::DataType& io) const;
  // The dtype of the first activation (kIO) tensor, inputs before outputs.
  nvinfer1::DataType firstIoType(nvinfer1::PluginTensorDesc const* in, nvinfer1::PluginTensorDesc const* out) const;
  std::string checkConcrete(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, int32_t nbOutputs,
                            Symbols& sym) const;

  OpSpec const& spec_;
  std::string name_;
  AttrValues attrs_;
  std::string description_;  // "Op(attr=value,...)": timing-cache id and engine-inspector metadata
  // Storage behind getFieldsToSerialize(): one int32 or float32 per attribute.
  std::array<int32_t, kMaxAttrs> ser_int_{};
  std::array<float, kMaxAttrs> ser_float_{};
  std::vector<nvinfer1::PluginField> ser_fields_;
  nvinfer1::PluginFieldCollection ser_fc_{};
};

class Creator final : public nvinfer1::IPluginCreatorV3One {
 public:
  explicit Creator(OpSpec const& spec);
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  char const* getPluginName() const noexcept override { return spec_.name; }
  char const* getPluginVersion() const noexcept override { return "1"; }
  char const* getPluginNamespace() const noexcept override { return ""; }

 private:
  OpSpec const& spec_;
  std::vector<nvinfer1::PluginField> fields_;
  nvinfer1::PluginFieldCollection fc_{};
};

}  // namespace essm_trt
