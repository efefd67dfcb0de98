// The model <-> Hugging Face model directories: the HF export of the training model (a
// CommitJob for the CheckpointManager) and loading an HF directory's weights into a model.
#pragma once

#include <map>
#include <set>
#include <string>

#include "checkpoint/checkpoint_manager.h"
#include "trainer/model/hf_llama.h"
#include "trainer/config/config.h"
#include "trainer/model/converters/converter.h"
#include "trainer/model/llama.h"
#include "trainer/model/sharded_llama.h"
#include "trainer/data/tokenizer.h"

namespace strata {

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

// The model config of an HF directory's config.json (errors name the file).
ModelConfig hf_model_config(const std::string& dir);

// A Hugging Face model directory: config.json and model.safetensors or its sharded index.
bool is_hf_model_dir(const std::string& path);

// Fills `pieces` (model parameters, keys = FQNs, any flat ranges) from the HF directory `dir`:
// each piece reads only the rows it needs (for wq / wk the heads it lies in), converting to
// Strata's layout and dtype. The directory's config.json must describe `model`; differing
// fields, and missing, unexpected and mismatched tensors, are errors naming every one.
void load_hf_model(const std::string& dir, const ModelConfig& model,
                   std::vector<TensorPiece>& pieces);

}  // namespace strata
