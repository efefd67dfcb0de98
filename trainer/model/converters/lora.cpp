// LoRA (docs/architecture.md "Converters"): low-rank factors A, B on the targeted block linears,
// the base weights frozen, exported as a PEFT adapter, merged weights, or both.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "trainer/model/converters/converter.h"

namespace strata {
namespace {

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() &&
         text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

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
    return fmt::format("base_model.model.model.layers.{}.{}.lora_{}.weight", layer,
                       LlamaStateDictAdapter::hf_module(key->linear),
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
        if (module ==
                fmt::format("{}.lora_{}.weight", LlamaStateDictAdapter::hf_module(linear), ab) ||
            module == fmt::format("{}.lora_{}.default.weight",
                                  LlamaStateDictAdapter::hf_module(linear), ab)) {
          return fmt::format(
              "layers.{}.{}.{}.lora_{}", layer,
              linear == "w1" || linear == "w2" || linear == "w3" ? "feed_forward" : "attention",
              linear, ab[0] == 'A' ? "a" : "b");
        }
      }
    }
    return std::nullopt;
  }

  at::Tensor to_file(const std::string& fqn, const at::Tensor& tensor,
                     const LlamaStateDictAdapter& model) const override {
    const std::string weight = permuted_weight(fqn);
    return weight.empty() ? tensor : model.to_hf(weight, tensor);
  }
  at::Tensor from_file(const std::string& fqn, const at::Tensor& tensor,
                       const LlamaStateDictAdapter& model) const override {
    const std::string weight = permuted_weight(fqn);
    return weight.empty() ? tensor : model.from_hf(weight, tensor);
  }
  std::string subdirectory() const override { return "adapter"; }
  bool base_is_export() const override { return config_.export_mode == "adapter"; }

  nlohmann::json config_json(const std::string& base) const override {
    std::vector<std::string> targets;
    for (const std::string& t : config_.target_modules)
      targets.push_back(LlamaStateDictAdapter::hf_module(t).substr(
          LlamaStateDictAdapter::hf_module(t).find('.') + 1));
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
        scale_(c.use_rslora ? c.alpha / std::sqrt(static_cast<double>(c.rank))
                            : c.alpha / static_cast<double>(c.rank)),
        adapter_(c) {}

  std::string name() const override { return "lora"; }

  bool targets(const std::string& linear) const {
    return std::find(config_.target_modules.begin(), config_.target_modules.end(), linear) !=
           config_.target_modules.end();
  }

  std::vector<Extra> extra_parameters(const std::string& linear, int64_t out,
                                      int64_t in) const override {
    if (!targets(linear)) return {};
    return {{"lora_a", {config_.rank, in}}, {"lora_b", {out, config_.rank}}};
  }

  bool freezes_base() const override { return true; }

  at::Tensor linear_delta(const std::string& linear, const at::Tensor& x,
                          const std::vector<at::Tensor>& extras) const override {
    if (!targets(linear)) return at::Tensor();
    const at::Tensor input =
        config_.dropout > 0 && training() ? at::dropout(x, config_.dropout, true) : x;
    return at::linear(at::linear(input, extras.at(0)), extras.at(1)).mul(scale_);
  }

  void initialize(const std::string& fqn, at::Tensor& value,
                  at::Generator& generator) const override {
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
    return fmt::format(
        "lora (r {}, alpha {}, scale {:g}{}, dropout {}, targets {}; export {}, interval saves {})",
        config_.rank, config_.alpha, scale_, config_.use_rslora ? " rslora" : "", config_.dropout,
        targets, config_.export_mode, config_.save);
  }

 private:
  ConverterConfig config_;
  double scale_;
  PeftLoraAdapter adapter_;
  bool training_ = true;
};

}  // namespace

std::unique_ptr<ModelConverter> make_lora_converter(const ConverterConfig& config) {
  return std::make_unique<LoraConverter>(config);
}

}  // namespace strata
