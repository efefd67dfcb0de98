// PEFT LoRA adapter directories (docs/formats.md "PEFT adapters").
#pragma once

#include <set>
#include <string>
#include <vector>

#include "checkpoint/sharded_checkpoint.h"
#include "trainer/config/config.h"
#include "trainer/model/converters/converter.h"

namespace strata {

// A PEFT LoRA adapter directory (docs/formats.md): adapter_config.json and
// adapter_model.safetensors. Checked before is_hf_model_dir: an export with the adapter beside
// the base model is both, and means base + adapter.
bool is_peft_adapter_dir(const std::string& path);

// The LoRA converter an adapter directory describes (r, lora_alpha, lora_dropout, use_rslora,
// target_modules in Strata's names; export: merged), and the base it names
// (base_model_name_or_path; "" when null). Unsupported PEFT features (DoRA, biases,
// rank/alpha patterns, regex targets, fan_in_fan_out) are errors naming the field.
ConverterConfig peft_converter_config(const std::string& dir);
std::string peft_base(const std::string& dir);

// Fills the pieces whose keys `converters` own (the LoRA factors) from the adapter directory
// `dir`, converting key names and the q/k row order. `run` is the run's LoRA converter config:
// r, alpha, rslora and targets must agree with the adapter's. Adapter tensors that fit no piece
// and shape mismatches are errors naming each. Returns the keys filled (pieces the adapter
// lacks stay untouched, for the initialiser).
std::set<std::string> load_peft_adapter(const std::string& dir, const ModelConfig& model,
                                        const Converters& converters, const ConverterConfig& run,
                                        std::vector<TensorPiece>& pieces);

}  // namespace strata
