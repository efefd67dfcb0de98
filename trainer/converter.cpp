// Model converters: the protocol's composition, LoRA (with its PEFT adapter) and int8
// quantisation-aware training.
#include "trainer/converter.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "trainer/config.h"

namespace strata {
namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// "layers.3.attention.wq.lora_a" -> {"layers.3.attention.wq", "wq", "lora_a"}; nullopt for
// anything that is not an extra parameter of a block linear.
struct LinearKey {
  std::string linear_fqn, linear, suffix;
};
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

// The HF module of a block linear (docs/formats.md).
std::string hf_module(const std::string& linear) {
  static const std::map<std::string, std::string> names = {
      {"wq", "self_attn.q_proj"}, {"wk", "self_attn.k_proj"}, {"wv", "self_attn.v_proj"}, {"wo", "self_attn.o_proj"},
      {"w1", "mlp.gate_proj"},    {"w3", "mlp.up_proj"},      {"w2", "mlp.down_proj"}};
  return names.at(linear);
}

// ---- LoRA ----------------------------------------------------------------------------------

// PEFT's adapter files (docs/formats.md): keys base_model.model.model.layers.{i}.<module>.
// lora_{A,B}.weight, adapter_config.json as PEFT writes it.
class PeftLoraAdapter : public ConverterAdapter {
 public:
  explicit PeftLoraAdapter(const ConverterConfig& c) : config_(c) {}
  std::string weights_file() const override { return "adapter_model.safetensors"; }
  std::string config_file() const override { return "adapter_config.json"; }

  std::string to_file_key(const std::string& fqn) const override {
    const std::optional<LinearKey> key = parse_linear_key(fqn);
    if (!key || (key->suffix != "lora_a" && key->suffix != "lora_b")) {
      throw std::invalid_argument("not a LoRA key: " + fqn);
    }
    const std::string layer = fqn.substr(7, fqn.find('.', 7) - 7);
    return fmt::format("base_model.model.model.layers.{}.{}.lora_{}.weight", layer, hf_module(key->linear),
                       key->suffix == "lora_a" ? "A" : "B");
  }

  std::optional<std::string> from_file_key(const std::string& key) const override {
    std::string rest = key;
    for (const char* prefix : {"base_model.model.", "model."}) {
      if (rest.rfind(prefix, 0) == 0) rest = rest.substr(std::string(prefix).size());
    }
    if (rest.rfind("layers.", 0) != 0) return std::nullopt;
    const size_t dot = rest.find('.', 7);
    if (dot == std::string::npos) return std::nullopt;
    const std::string layer = rest.substr(7, dot - 7), module = rest.substr(dot + 1);
    for (const std::string& linear : block_linears()) {
      for (const char* ab : {"A", "B"}) {
        if (module == fmt::format("{}.lora_{}.weight", hf_module(linear), ab) ||
            module == fmt::format("{}.lora_{}.default.weight", hf_module(linear), ab)) {
          return fmt::format("layers.{}.{}.{}.lora_{}", layer, linear == "w1" || linear == "w2" || linear == "w3"
                                                                   ? "feed_forward" : "attention",
                             linear, ab[0] == 'A' ? "a" : "b");
        }
      }
    }
    return std::nullopt;
  }

  at::Tensor to_file(const std::string& fqn, const at::Tensor& tensor, const LlamaStateDictAdapter& model) const override {
    const std::string weight = permuted_weight(fqn);
    return weight.empty() ? tensor : model.to_hf(weight, tensor);
  }
  at::Tensor from_file(const std::string& fqn, const at::Tensor& tensor, const LlamaStateDictAdapter& model) const override {
    const std::string weight = permuted_weight(fqn);
    return weight.empty() ? tensor : model.from_hf(weight, tensor);
  }
  std::string subdirectory() const override { return "adapter"; }
  bool base_is_export() const override { return config_.export_mode == "adapter"; }

  nlohmann::json config_json(const std::string& base) const override {
    std::vector<std::string> targets;
    for (const std::string& t : config_.target_modules) targets.push_back(hf_module(t).substr(hf_module(t).find('.') + 1));
    std::sort(targets.begin(), targets.end());
    return {{"peft_type", "LORA"},
            {"task_type", "CAUSAL_LM"},
            {"base_model_name_or_path", base.empty() ? nlohmann::json() : nlohmann::json(base)},
            {"revision", nullptr},
            {"inference_mode", true},
            {"r", config_.rank},
            {"lora_alpha", config_.alpha},
            {"lora_dropout", config_.dropout},
            {"target_modules", targets},
            {"bias", "none"},
            {"fan_in_fan_out", false},
            {"use_rslora", config_.use_rslora},
            {"use_dora", false},
            {"init_lora_weights", true},
            {"modules_to_save", nullptr},
            {"layers_to_transform", nullptr},
            {"layers_pattern", nullptr},
            {"rank_pattern", nlohmann::json::object()},
            {"alpha_pattern", nlohmann::json::object()}};
  }

 private:
  // B of wq / wk has the weight's output rows, which HF orders rotate-half: the weight's FQN
  // whose row permutation applies, or "".
  static std::string permuted_weight(const std::string& fqn) {
    if (!ends_with(fqn, ".lora_b")) return "";
    const std::string weight = fqn.substr(0, fqn.size() - 7) + ".weight";
    return LlamaStateDictAdapter::permuted(weight) ? weight : "";
  }

  ConverterConfig config_;
};

class LoraConverter : public ModelConverter {
 public:
  explicit LoraConverter(const ConverterConfig& c)
      : config_(c),
        scale_(c.use_rslora ? c.alpha / std::sqrt(static_cast<double>(c.rank)) : c.alpha / static_cast<double>(c.rank)),
        adapter_(c) {}

  std::string name() const override { return "lora"; }

  bool targets(const std::string& linear) const {
    return std::find(config_.target_modules.begin(), config_.target_modules.end(), linear) != config_.target_modules.end();
  }

  std::vector<Extra> extra_parameters(const std::string& linear, int64_t out, int64_t in) const override {
    if (!targets(linear)) return {};
    return {{"lora_a", {config_.rank, in}}, {"lora_b", {out, config_.rank}}};
  }

  bool freezes_base() const override { return true; }

  at::Tensor linear_delta(const std::string& linear, const at::Tensor& x,
                          const std::vector<at::Tensor>& extras) const override {
    if (!targets(linear)) return at::Tensor();
    const at::Tensor input = config_.dropout > 0 && training() ? at::dropout(x, config_.dropout, true) : x;
    return at::linear(at::linear(input, extras.at(0)), extras.at(1)).mul(scale_);
  }

  void initialize(const std::string& fqn, at::Tensor& value, at::Generator& generator) const override {
    if (ends_with(fqn, ".lora_b")) {
      value.zero_();
    } else {  // PEFT's A: kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(in), 1/sqrt(in))
      const double bound = 1.0 / std::sqrt(static_cast<double>(value.size(1)));
      value.uniform_(-bound, bound, generator);
    }
  }

  bool key_filter(const std::string& fqn) const override {
    return ends_with(fqn, ".lora_a") || ends_with(fqn, ".lora_b");
  }

  // `merged`: W + scale·(B @ A) in fp32, LoRA keys dropped. `both`: the same, the LoRA keys
  // kept for the PEFT adapter (adapter/, on the run's source model). `adapter`: unchanged (the
  // base weights, with the PEFT adapter in adapter/ on them).
  StateDict state_dict_transform(const StateDict& sd) const override {
    if (config_.export_mode == "adapter") return sd;
    StateDict out;
    for (const auto& [fqn, tensor] : sd) {
      if (key_filter(fqn)) {
        if (config_.export_mode == "both") out.insert(fqn, tensor);
        continue;
      }
      const std::string prefix = ends_with(fqn, ".weight") ? fqn.substr(0, fqn.size() - 7) : "";
      if (!prefix.empty() && sd.contains(prefix + ".lora_a") && sd.contains(prefix + ".lora_b")) {
        out.insert(fqn, merge(tensor, sd.at(prefix + ".lora_a"), sd.at(prefix + ".lora_b")));
      } else {
        out.insert(fqn, tensor);
      }
    }
    return out;
  }

  at::Tensor merge(const at::Tensor& w, const at::Tensor& a, const at::Tensor& b) const {
    at::NoGradGuard no_grad;
    return w.to(at::kFloat) + at::mm(b.to(at::kFloat), a.to(at::kFloat)).mul(scale_);
  }

  const ConverterAdapter* state_dict_adapter() const override { return &adapter_; }

  void set_training(bool training) override { training_ = training; }
  bool training() const { return training_; }

  std::string describe() const override {
    std::string targets;
    for (const std::string& t : config_.target_modules) targets += (targets.empty() ? "" : " ") + t;
    return fmt::format("lora (r {}, alpha {}, scale {:g}{}, dropout {}, targets {}; export {}, interval saves {})",
                       config_.rank, config_.alpha, scale_, config_.use_rslora ? " rslora" : "", config_.dropout, targets,
                       config_.export_mode, config_.save);
  }

 private:
  ConverterConfig config_;
  double scale_;
  PeftLoraAdapter adapter_;
  bool training_ = true;
};

// ---- int8 quantisation-aware training ------------------------------------------------------

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
    return std::find(config_.target_modules.begin(), config_.target_modules.end(), linear) != config_.target_modules.end();
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
    return fmt::format("int8_qat (per-output-channel symmetric, straight-through; targets {})", targets);
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

const std::vector<std::string>& block_linears() {
  static const std::vector<std::string> names = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
  return names;
}

std::vector<ModelConverter::Extra> ModelConverter::extra_parameters(const std::string&, int64_t, int64_t) const {
  return {};
}

at::Tensor ModelConverter::transform_weight(const std::string&, const at::Tensor& weight) const { return weight; }

at::Tensor ModelConverter::linear_delta(const std::string&, const at::Tensor&, const std::vector<at::Tensor>&) const {
  return at::Tensor();
}

void ModelConverter::initialize(const std::string& fqn, at::Tensor&, at::Generator&) const {
  throw std::logic_error(fmt::format("converter {} does not initialise {}", name(), fqn));
}

Converters::Converters(const std::vector<ConverterConfig>& configs) {
  for (const ConverterConfig& c : configs) {
    if (c.type == "lora") {
      list_.push_back(std::make_unique<LoraConverter>(c));
    } else if (c.type == "int8_qat") {
      list_.push_back(std::make_unique<Int8QatConverter>(c));
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

at::Tensor Converters::linear(const std::string& linear, const at::Tensor& x, const at::Tensor& weight,
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
