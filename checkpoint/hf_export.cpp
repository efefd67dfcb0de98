// HF model directories: shard plan, shard files, index and configs.
#include "checkpoint/hf_export.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "checkpoint/file_io.h"
#include "checkpoint/safetensors.h"

namespace strata {
namespace {

namespace fs = std::filesystem;

uint64_t bytes_of(const HfTensorSpec& t) {
  uint64_t n = c10::elementSize(t.dtype);
  for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
  return n;
}

void write_durable_text(const fs::path& path, const std::string& content) {
  HashingFileWriter out(path.string(), /*hash_thread=*/false);
  out.write(content.data(), content.size());
  out.finish();
}

}  // namespace

HfShardPlan plan_hf_shards(const std::vector<HfTensorSpec>& tensors, uint64_t max_shard_bytes) {
  std::vector<std::vector<const HfTensorSpec*>> shards;
  uint64_t current = 0;
  HfShardPlan plan;
  for (const HfTensorSpec& t : tensors) {
    const uint64_t n = bytes_of(t);
    if (shards.empty() || (current > 0 && current + n > max_shard_bytes)) {
      shards.emplace_back();
      current = 0;
    }
    shards.back().push_back(&t);
    current += n;
    plan.total_size += n;
  }
  if (shards.empty()) shards.emplace_back();
  for (size_t i = 0; i < shards.size(); ++i) {
    plan.files.push_back(fmt::format("model-{:05d}-of-{:05d}.safetensors", i + 1, shards.size()));
    for (const HfTensorSpec* t : shards[i]) plan.file_of[t->key] = i;
  }
  return plan;
}

HfShardPlan plan_from_weight_map(const std::map<std::string, std::string>& weight_map,
                                 const std::vector<HfTensorSpec>& tensors) {
  HfShardPlan plan;
  std::map<std::string, size_t> index_of;
  for (const auto& [key, file] : weight_map) index_of.emplace(file, 0);
  for (auto& [file, index] : index_of) {
    index = plan.files.size();
    plan.files.push_back(file);
  }
  if (weight_map.size() != tensors.size()) {
    throw CheckpointError(fmt::format("the source layout has {} tensors, the export {}",
                                      weight_map.size(), tensors.size()));
  }
  for (const HfTensorSpec& t : tensors) {
    auto it = weight_map.find(t.key);
    if (it == weight_map.end()) throw CheckpointError("the source layout has no " + t.key);
    plan.file_of[t.key] = index_of.at(it->second);
    plan.total_size += bytes_of(t);
  }
  return plan;
}

uint64_t parse_byte_size(const std::string& text) {
  size_t digits = 0;
  while (digits < text.size() &&
         (std::isdigit(static_cast<unsigned char>(text[digits])) || text[digits] == '.')) {
    ++digits;
  }
  if (digits == 0)
    throw std::invalid_argument("expected a number with an optional unit (KB, MB, GB)");
  const double value = std::stod(text.substr(0, digits));
  std::string unit = text.substr(digits);
  for (char& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  double scale = 1;
  if (unit == "" || unit == "B") {
    scale = 1;
  } else if (unit == "KB") {
    scale = 1e3;
  } else if (unit == "MB") {
    scale = 1e6;
  } else if (unit == "GB") {
    scale = 1e9;
  } else if (unit == "TB") {
    scale = 1e12;
  } else {
    throw std::invalid_argument(fmt::format("unknown unit '{}' (use B, KB, MB, GB or TB)", unit));
  }
  const double bytes = value * scale;
  if (bytes < 1) throw std::invalid_argument("must be at least 1 byte");
  return static_cast<uint64_t>(bytes);
}

nlohmann::json write_hf_shards(const std::string& dir, const HfShardPlan& plan, int rank, int world,
                               const std::map<std::string, at::Tensor>& tensors, bool hash_thread) {
  std::vector<std::vector<SafetensorsItem>> items(plan.files.size());
  for (const auto& [key, file] : plan.file_of) {
    if (plan.owner(file, world) != rank) continue;
    auto it = tensors.find(key);
    if (it == tensors.end()) throw std::logic_error("write_hf_shards: no tensor for " + key);
    const at::Tensor& t = it->second;
    items[file].push_back({key, t.scalar_type(), t.sizes().vec(), t.data_ptr()});
  }
  nlohmann::json report = {{"size", 0}, {"files", nlohmann::json::object()}};
  uint64_t size = 0;
  for (size_t file = 0; file < plan.files.size(); ++file) {
    if (plan.owner(file, world) != rank) continue;
    const FileDigest digest = write_safetensors_file((fs::path(dir) / plan.files[file]).string(),
                                                     std::move(items[file]), {}, hash_thread);
    size += digest.size;
    report["files"][plan.files[file]] = digest.sha256;
  }
  report["size"] = size;
  return report;
}

void write_hf_shared_files(const std::string& dir, const HfShardPlan& plan,
                           const nlohmann::ordered_json& config,
                           const nlohmann::json& generation_config,
                           const std::map<std::string, std::string>& text_files,
                           const std::vector<std::string>& copy_files) {
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", plan.total_size}};
  nlohmann::ordered_json weight_map = nlohmann::ordered_json::object();
  for (const auto& [key, file] : plan.file_of) weight_map[key] = plan.files[file];  // sorted keys
  index["weight_map"] = weight_map;
  const fs::path root(dir);
  write_durable_text(root / "model.safetensors.index.json", index.dump(2) + "\n");
  write_durable_text(root / "config.json", config.dump(2) + "\n");
  write_durable_text(root / "generation_config.json", generation_config.dump(2) + "\n");
  for (const auto& [name, content] : text_files) write_durable_text(root / name, content);
  for (const std::string& path : copy_files) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw IoError(fmt::format("cannot read {} to copy it into {}", path, dir));
    std::ostringstream bytes;
    bytes << in.rdbuf();
    write_durable_text(root / fs::path(path).filename(), bytes.str());
  }
}

}  // namespace strata
