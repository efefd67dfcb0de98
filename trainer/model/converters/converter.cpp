// The converter protocol's defaults and the composition of several converters (Converters).
#include "trainer/model/converters/converter.h"

#include <fmt/format.h>

#include <algorithm>

namespace strata {

const std::vector<std::string>& block_linears() {
  static const std::vector<std::string> names = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  return names;
}

std::optional<LinearKey> parse_linear_key(const std::string& fqn) {
  if (fqn.rfind("layers.", 0) != 0) return std::nullopt;
  for (const std::string& linear : block_linears()) {
    const std::string marker = "." + linear + ".";
    const size_t at = fqn.find(marker);
    if (at == std::string::npos) continue;
    return LinearKey{fqn.substr(0, at + 1 + linear.size()), linear, fqn.substr(at + marker.size())};
  }
  return std::nullopt;
}

std::vector<ModelConverter::Extra> ModelConverter::extra_parameters(const std::string&, int64_t,
                                                                    int64_t) const {
  return {};
}

at::Tensor ModelConverter::transform_weight(const std::string&, const at::Tensor& weight) const {
  return weight;
}

at::Tensor ModelConverter::linear_delta(const std::string&, const at::Tensor&,
                                        const std::vector<at::Tensor>&) const {
  return at::Tensor();
}

void ModelConverter::initialize(const std::string& fqn, at::Tensor&, at::Generator&) const {
  throw std::logic_error(fmt::format("converter {} does not initialise {}", name(), fqn));
}

Converters::Converters(const std::vector<ConverterConfig>& configs) {
  for (const ConverterConfig& c : configs) {
    if (c.type == "lora") {
      list_.push_back(make_lora_converter(c));
    } else if (c.type == "int8_qat") {
      list_.push_back(make_int8_qat_converter(c));
    } else {
      throw std::invalid_argument("unknown converter type " + c.type);
    }
  }
}

void Converters::set_training(bool training) {
  for (auto& c : list_) c->set_training(training);
}

const ModelConverter* Converters::owner(const std::string& fqn) const {
  for (const auto& c : list_) {
    if (c->key_filter(fqn)) return c.get();
  }
  return nullptr;
}

bool Converters::trainable(const std::string& fqn) const {
  if (owned(fqn)) return true;
  return std::none_of(list_.begin(), list_.end(), [](const auto& c) { return c->freezes_base(); });
}

std::vector<std::pair<std::string, std::vector<int64_t>>> Converters::extra_parameters(
    const std::string& linear_fqn, const std::string& linear, int64_t out, int64_t in) const {
  std::vector<std::pair<std::string, std::vector<int64_t>>> extras;
  for (const auto& c : list_) {
    for (const ModelConverter::Extra& e : c->extra_parameters(linear, out, in)) {
      extras.emplace_back(linear_fqn + "." + e.suffix, e.shape);
    }
  }
  return extras;
}

at::Tensor Converters::linear(const std::string& linear, const at::Tensor& x,
                              const at::Tensor& weight,
                              const std::vector<at::Tensor>& extras) const {
  at::Tensor w = weight;
  for (const auto& c : list_) w = c->transform_weight(linear, w);
  at::Tensor y = at::linear(x, w);
  size_t next = 0;
  for (const auto& c : list_) {
    const size_t count = c->extra_parameters(linear, weight.size(0), weight.size(1)).size();
    const std::vector<at::Tensor> mine(extras.begin() + static_cast<std::ptrdiff_t>(next),
                                       extras.begin() + static_cast<std::ptrdiff_t>(next + count));
    next += count;
    const at::Tensor delta = c->linear_delta(linear, x, mine);
    if (delta.defined()) y = y + delta;
  }
  return y;
}

StateDict Converters::base_view(const StateDict& full) const {
  StateDict base;
  for (const auto& [fqn, tensor] : full) {
    if (!owned(fqn)) base.insert(fqn, tensor);
  }
  return base;
}

StateDict Converters::export_view(const StateDict& full) const {
  StateDict sd = full;
  for (auto it = list_.rbegin(); it != list_.rend(); ++it) sd = (*it)->state_dict_transform(sd);
  return sd;
}

}  // namespace strata
