// Writing a Hugging Face model directory (docs/formats.md): the tensors are split
// into `model-0000i-of-0000n.safetensors` shards of at most max_shard_size bytes in HF key
// order, file i written by rank i % world (each rank holds only its files' tensors), and rank
// 0 adds `model.safetensors.index.json`, config.json, generation_config.json and the
// tokenizer files. The shard layout depends only on the tensors, so the bytes do not depend
// on the number of ranks that wrote them.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace strata {

struct HfTensorSpec {
  std::string key;  // HF name
  std::vector<int64_t> shape;
  at::ScalarType dtype;
};

struct HfShardPlan {
  std::vector<std::string> files;         // model-00001-of-0000n.safetensors, ...
  std::map<std::string, size_t> file_of;  // HF key -> index into files
  uint64_t total_size = 0;                // tensor bytes in all (index metadata.total_size)
  int owner(size_t file, int world) const {
    return static_cast<int>(file % static_cast<size_t>(world));
  }
};

// Fills shards in the given order; a tensor larger than the limit gets a shard of its own.
HfShardPlan plan_hf_shards(const std::vector<HfTensorSpec>& tensors, uint64_t max_shard_bytes);

// The shard layout of an existing HF directory (its index's weight_map: key -> file), for the
// same tensors. Throws CheckpointError when the keys differ.
HfShardPlan plan_from_weight_map(const std::map<std::string, std::string>& weight_map,
                                 const std::vector<HfTensorSpec>& tensors);

// "5GB", "500MB", "64KB", "1000" (bytes; decimal units as huggingface_hub). Throws
// std::invalid_argument with the reason.
uint64_t parse_byte_size(const std::string& text);

// Writes the files of `plan` that `rank` owns from `tensors` (HF key -> contiguous CPU
// tensor; must hold every key of those files). Returns {"size": bytes, "files": {name: sha256}}.
nlohmann::json write_hf_shards(const std::string& dir, const HfShardPlan& plan, int rank, int world,
                               const std::map<std::string, at::Tensor>& tensors, bool hash_thread);

// Rank 0's part: the index, the configs, `text_files` (name -> content) and copies of
// `copy_files` (paths; same base name in `dir`). Every file fsynced.
void write_hf_shared_files(const std::string& dir, const HfShardPlan& plan,
                           const nlohmann::ordered_json& config,
                           const nlohmann::json& generation_config,
                           const std::map<std::string, std::string>& text_files,
                           const std::vector<std::string>& copy_files);

}  // namespace strata
