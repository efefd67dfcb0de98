// The model <-> Hugging Face directories: the HF export of the training model (a CommitJob
// for the CheckpointManager) and the shape conversions between ModelConfig and the adapter's
// LlamaShape.
#pragma once

#include <map>
#include <set>
#include <string>

#include "checkpoint/checkpoint_manager.h"
#include "checkpoint/hf_llama.h"
#include "trainer/config.h"
#include "trainer/converter.h"
#include "trainer/llama.h"
#include "trainer/sharded_llama.h"
#include "trainer/tokenizer.h"

namespace strata {

LlamaShape llama_shape(const ModelConfig& config);

// The tensor dtype of a config dtype name: float32 | bfloat16 | float16.
at::ScalarType dtype_named(const std::string& name);

// The HF export of the model's current weights at `step`: collective (FSDP ranks gather one
// unit at a time and keep the converted tensors of the shard files they write). Exactly one
// of `plain` / `sharded` is set. `tokenizer` (may be null) gives bos/eos and tokenizer files.
// `source_layout` (may be null): the weight_map of the HF directory the run started from;
// the export then keeps its file layout instead of max_shard_size shards. Converters' keys
// leave through their adapters (LoRA: a PEFT adapter in adapter/); `source_base` names the
// run's source model for an adapter whose base is not the export itself.
CommitJob hf_export_job(int64_t step, const Llama* plain, const ShardedLlama* sharded,
                        const Config& config, const Tokenizer* tokenizer, int rank, int world,
                        bool hash_thread,
                        const std::map<std::string, std::string>* source_layout = nullptr,
                        const std::string& source_base = "");

// The weight_map of an HF directory's index (key -> file); empty for a single model.safetensors.
std::map<std::string, std::string> hf_weight_map(const std::string& dir);

// The model shape of an HF directory's config.json (errors name the file).
LlamaShape hf_shape(const std::string& dir);

// A Hugging Face model directory: config.json and model.safetensors or its sharded index.
bool is_hf_model_dir(const std::string& path);

// Fills `pieces` (model parameters, keys = FQNs, any flat ranges) from the HF directory `dir`:
// each piece reads only the rows it needs (for wq / wk the heads it lies in), converting to
// Strata's layout and dtype. The directory's config.json must describe `model`; differing
// fields, and missing, unexpected and mismatched tensors, are errors naming every one.
void load_hf_model(const std::string& dir, const ModelConfig& model, std::vector<TensorPiece>& pieces);

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
