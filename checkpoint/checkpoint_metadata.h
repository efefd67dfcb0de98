// metadata.json of a step directory, validated: the schema (every field present, of its type,
// in range; no unknown chunk fields) and the document against itself (chunks tile each tensor,
// every chunk's file is listed, file names are rank files inside the step directory, the step
// agrees with the directory's name). No LibTorch: the metadata fuzz target builds this alone.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace strata {

constexpr int kCheckpointFormatVersion = 1;

struct CheckpointChunk {
  std::string file, key;
  int64_t begin = 0, end = 0;  // flat element range of the tensor
};

struct CheckpointTensor {
  std::string dtype;  // safetensors name ("F32", "BF16", ...)
  std::vector<int64_t> shape;
  std::vector<CheckpointChunk> chunks;  // sorted by begin, covering [0, numel)
};

struct CheckpointFile {
  uint64_t size = 0;
  std::string sha256;
  uint64_t block_bytes = 0;
  std::string block_xxh3;  // 16 hex digits per block
};

struct CheckpointMetadata {
  int64_t step = 0;
  bool model_only = false;
  std::map<std::string, CheckpointTensor> tensors;
  std::map<std::string, CheckpointFile> files;
};

// Validates `meta` (read from `path`, the metadata.json of step directory `dir`) and returns
// its parsed form. Throws CheckpointError "<path> is not a valid Strata checkpoint
// description: <field and reason>" with a hint, or a format-version error.
CheckpointMetadata validate_checkpoint_metadata(const nlohmann::json& meta, const std::string& path,
                                                const std::string& dir);

// Throws the CheckpointError of a damaged metadata.json at `path`: "<path> is not a valid
// Strata checkpoint description: <what>", with a hint.
[[noreturn]] void throw_damaged_metadata(const std::string& path, const std::string& what);

// The step a directory name "step-NNNNNNN" designates, or -1 for any other name.
int64_t step_of_dir_name(const std::string& name);

}  // namespace strata
