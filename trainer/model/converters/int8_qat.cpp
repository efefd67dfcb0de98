// int8 quantisation-aware training: weight-only, per-output-channel symmetric fake
// quantisation of the targeted block linears in forward, straight-through gradients.
#include <fmt/format.h>

#include <algorithm>

#include "trainer/model/converters/converter.h"

namespace strata {
namespace {

// Per-output-channel symmetric int8: scale = max|w_row| / 127, w_q = clamp(round(w / scale),
// -127, 127) · scale (rows of zeros stay zero).
at::Tensor fake_quantize_int8(const at::Tensor& w) {
  const at::Tensor scale = w.detach().abs().amax({1}, /*keepdim=*/true).div(127.0).clamp_min(1e-12);
  return at::clamp(at::round(w.detach() / scale), -127, 127).mul(scale);
}

class Int8QatConverter : public ModelConverter {
 public:
  explicit Int8QatConverter(const ConverterConfig& c) : config_(c) {}
  std::string name() const override { return "int8_qat"; }
  bool targets(const std::string& linear) const {
    return std::find(config_.target_modules.begin(), config_.target_modules.end(), linear) !=
           config_.target_modules.end();
  }
  // Forward sees the quantised weight; the gradient passes straight through to the fp32 one.
  at::Tensor transform_weight(const std::string& linear, const at::Tensor& weight) const override {
    if (!targets(linear)) return weight;
    return weight + (fake_quantize_int8(weight) - weight).detach();
  }
  bool key_filter(const std::string&) const override { return false; }
  std::string describe() const override {
    std::string targets;
    for (const std::string& t : config_.target_modules) targets += (targets.empty() ? "" : " ") + t;
    return fmt::format("int8_qat (per-output-channel symmetric, straight-through; targets {})",
                       targets);
  }
  // The export holds what forward computed with: the quantise-dequantised weights.
  StateDict state_dict_transform(const StateDict& sd) const override {
    StateDict out;
    for (const auto& [fqn, tensor] : sd) {
      const std::optional<LinearKey> key = parse_linear_key(fqn);
      const bool quantised = key && key->suffix == "weight" && targets(key->linear);
      out.insert(fqn, quantised ? fake_quantize_int8(tensor.to(at::kFloat)) : tensor);
    }
    return out;
  }

 private:
  ConverterConfig config_;
};

}  // namespace

std::unique_ptr<ModelConverter> make_int8_qat_converter(const ConverterConfig& config) {
  return std::make_unique<Int8QatConverter>(config);
}

}  // namespace strata
