// Model converters (docs/architecture.md "Converters"): a converter changes the model before it is
// sharded (LoRA adds low-rank factors to linear layers and freezes the base weights; int8 QAT
// fake-quantises the weights in forward) and tells the checkpoint code, through a small
// protocol, how to split the state dict at save time:
//   key_filter(fqn)             which keys it owns (the `base` view leaves them out);
//   state_dict_transform(sd)    applied for export (LoRA `merged`: folds B·A into the weights);
//   state_dict_adapter()        how its own keys leave as files (LoRA: a PEFT adapter), or null.
// Several converters compose: filters are OR-ed, transforms applied in reverse order of
// application. The checkpoint code sees only this protocol, never a concrete converter.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "trainer/model/hf_llama.h"
#include "trainer/config/config.h"
#include "trainer/model/state_dict.h"

namespace strata {

// The block linear layers a converter can act on, in the model's parameter order.
const std::vector<std::string>& block_linears();  // wq wk wv wo w1 w2 w3

// "layers.3.attention.wq.lora_a" -> {"layers.3.attention.wq", "wq", "lora_a"}; nullopt for
// anything that is not a parameter of a block linear.
struct LinearKey {
  std::string linear_fqn, linear, suffix;
};
std::optional<LinearKey> parse_linear_key(const std::string& fqn);

// How a converter's own tensors leave the trainer as files beside (or instead of) the model.
class ConverterAdapter {
 public:
  virtual ~ConverterAdapter() = default;
  virtual std::string weights_file() const = 0;  // e.g. "adapter_model.safetensors"
  virtual std::string config_file() const = 0;   // e.g. "adapter_config.json"
  // The file key of an owned FQN and back (nullopt: not one of this adapter's keys).
  virtual std::string to_file_key(const std::string& fqn) const = 0;
  virtual std::optional<std::string> from_file_key(const std::string& key) const = 0;
  // A tensor in the file's layout and back (PEFT: B of wq / wk gets the HF q/k row order).
  virtual at::Tensor to_file(const std::string& fqn, const at::Tensor& tensor,
                             const LlamaStateDictAdapter& model) const = 0;
  virtual at::Tensor from_file(const std::string& fqn, const at::Tensor& tensor,
                               const LlamaStateDictAdapter& model) const = 0;
  // The adapter's config file; `base` names the base model (path or Hub id; "" for none).
  virtual nlohmann::json config_json(const std::string& base) const = 0;
  // The subdirectory of an HF export its files go to (never beside the model, so that no
  // loader applies them to a model that already holds them).
  virtual std::string subdirectory() const = 0;
  // Whether the model beside it is its base (the export's weights untransformed by it), or the
  // adapter applies to the run's source model.
  virtual bool base_is_export() const = 0;
};

class ModelConverter {
 public:
  virtual ~ModelConverter() = default;
  virtual std::string name() const = 0;

  // --- the model change ---
  // Extra parameters for block linear `linear` (wq..w3) of weight shape [out, in]: the FQN
  // suffix after "<linear>." and the shape. Nothing by default.
  struct Extra {
    std::string suffix;
    std::vector<int64_t> shape;
  };
  virtual std::vector<Extra> extra_parameters(const std::string& linear, int64_t out,
                                              int64_t in) const;
  // Whether the base weights (everything this converter does not own) stop training.
  virtual bool freezes_base() const { return false; }
  // The weight block linear `linear` computes with (QAT: its fake-quantised value).
  virtual at::Tensor transform_weight(const std::string& linear, const at::Tensor& weight) const;
  // Added to the output of block linear `linear` for input x; `extras` are this converter's
  // parameters of that linear in extra_parameters order. Undefined: nothing to add.
  virtual at::Tensor linear_delta(const std::string& linear, const at::Tensor& x,
                                  const std::vector<at::Tensor>& extras) const;
  // Initial value of an owned parameter (only called for keys it owns that no source loaded).
  virtual void initialize(const std::string& fqn, at::Tensor& value,
                          at::Generator& generator) const;
  // Training or evaluating (LoRA dropout applies only while training).
  virtual void set_training(bool) {}
  // One line for the start-up log.
  virtual std::string describe() const = 0;

  // --- the state-dict protocol ---
  virtual bool key_filter(const std::string& fqn) const = 0;
  virtual StateDict state_dict_transform(const StateDict& sd) const { return sd; }
  virtual const ConverterAdapter* state_dict_adapter() const { return nullptr; }
};

// The converters (lora.cpp, int8_qat.cpp); Converters builds them from `converters:` entries.
std::unique_ptr<ModelConverter> make_lora_converter(const ConverterConfig& config);
std::unique_ptr<ModelConverter> make_int8_qat_converter(const ConverterConfig& config);

// The converters of a run, applied in config order.
class Converters {
 public:
  Converters() = default;
  explicit Converters(const std::vector<ConverterConfig>& configs);

  bool empty() const { return list_.empty(); }
  void set_training(bool training);
  const std::vector<std::unique_ptr<ModelConverter>>& list() const { return list_; }

  // The converter owning `fqn`, or null.
  const ModelConverter* owner(const std::string& fqn) const;
  bool owned(const std::string& fqn) const { return owner(fqn) != nullptr; }
  // Trainable: owned by a converter, or no converter freezes the base.
  bool trainable(const std::string& fqn) const;
  // block linear `linear` (fqn prefix `linear_fqn`, e.g. "layers.0.attention.wq"): every
  // converter's extras, as (fqn, shape), in converter order.
  std::vector<std::pair<std::string, std::vector<int64_t>>> extra_parameters(
      const std::string& linear_fqn, const std::string& linear, int64_t out, int64_t in) const;
  // y = x·W'ᵀ + Σ deltas, W' = every converter's transform_weight in order. `extras` are the
  // linear's extra parameters in extra_parameters order (all converters).
  at::Tensor linear(const std::string& linear, const at::Tensor& x, const at::Tensor& weight,
                    const std::vector<at::Tensor>& extras) const;

  // The state-dict views of docs/architecture.md: `base` drops owned keys; `export` applies every
  // converter's transform, last converter first.
  StateDict base_view(const StateDict& full) const;
  StateDict export_view(const StateDict& full) const;

 private:
  std::vector<std::unique_ptr<ModelConverter>> list_;
};

}  // namespace strata
