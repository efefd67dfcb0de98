#include "checkpoint/checkpoint_metadata.h"

#include <fmt/format.h>

#include <algorithm>
#include <filesystem>
#include <limits>
#include <regex>

#include "checkpoint/errors.h"
#include "checkpoint/safe_path.h"
#include "checkpoint/safetensors_header.h"

namespace strata {
namespace {

using json = nlohmann::json;

constexpr size_t kMaxRank = 8;  // a tensor has at most this many dimensions

[[noreturn]] void bad(const std::string& path, const std::string& what) {
  throw_damaged_metadata(path, what);
}

// The field `name` of object `obj` (described as `where`), which must be present.
const json& field(const json& obj, const std::string& name, const std::string& where,
                  const std::string& path) {
  if (!obj.is_object()) bad(path, fmt::format("{} is not an object", where));
  const auto it = obj.find(name);
  if (it == obj.end()) bad(path, fmt::format("{} has no \"{}\"", where, name));
  return *it;
}

int64_t integer(const json& value, const std::string& where, const std::string& path,
                int64_t min = 0) {
  if (!value.is_number_integer()) bad(path, fmt::format("{} is not an integer", where));
  if (value.is_number_unsigned() &&
      value.get<uint64_t>() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    bad(path, fmt::format("{} = {} is too large", where, value.dump()));
  const int64_t v = value.get<int64_t>();
  if (v < min) bad(path, fmt::format("{} = {} must be >= {}", where, v, min));
  return v;
}

std::string text(const json& value, const std::string& where, const std::string& path) {
  if (!value.is_string()) bad(path, fmt::format("{} is not a string", where));
  return value.get<std::string>();
}

bool hex_of_length(const std::string& s, size_t length) {
  return s.size() == length && std::all_of(s.begin(), s.end(), [](char c) {
           return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
         });
}

CheckpointFile parse_file(const std::string& name, const json& value, const std::string& path) {
  const std::string where = fmt::format("files[\"{}\"]", name);
  static const std::regex rank_file(R"(rank-[0-9]{5,}\.safetensors)");
  if (!std::regex_match(name, rank_file)) {
    const std::string reason = unsafe_name_reason(name);
    bad(path, fmt::format("{} is not a rank file name (rank-NNNNN.safetensors){}", where,
                          reason.empty() ? "" : "; " + reason));
  }
  CheckpointFile f;
  f.size = static_cast<uint64_t>(integer(field(value, "size", where, path), where + ".size", path));
  f.sha256 = text(field(value, "sha256", where, path), where + ".sha256", path);
  if (!hex_of_length(f.sha256, 64))
    bad(path, fmt::format("{}.sha256 is not 64 lower-case hex digits", where));
  f.block_bytes = static_cast<uint64_t>(
      integer(field(value, "block_bytes", where, path), where + ".block_bytes", path, 1));
  f.block_xxh3 = text(field(value, "block_xxh3", where, path), where + ".block_xxh3", path);
  const uint64_t blocks = f.size / f.block_bytes + (f.size % f.block_bytes != 0);
  if (blocks > f.block_xxh3.size() / 16 || !hex_of_length(f.block_xxh3, blocks * 16))
    bad(path,
        fmt::format("{}.block_xxh3 is not {} block checksum(s) of 16 hex digits", where, blocks));
  for (const auto& [key, unused] : value.items()) {
    if (key != "size" && key != "sha256" && key != "block_bytes" && key != "block_xxh3")
      bad(path, fmt::format("{} has an unknown field \"{}\"", where, key));
  }
  return f;
}

CheckpointTensor parse_tensor(const std::string& key, const json& value,
                              const std::map<std::string, CheckpointFile>& files,
                              const std::string& path) {
  const std::string where = fmt::format("tensors[\"{}\"]", key);
  CheckpointTensor t;
  t.dtype = text(field(value, "dtype", where, path), where + ".dtype", path);
  if (find_safetensors_dtype(t.dtype) == nullptr)
    bad(path, fmt::format("{}.dtype \"{}\" is not a safetensors dtype", where, t.dtype));
  const json& shape = field(value, "shape", where, path);
  if (!shape.is_array() || shape.size() > kMaxRank)
    bad(path, fmt::format("{}.shape is not an array of at most {} sizes", where, kMaxRank));
  int64_t numel = 1;
  for (const json& d : shape) {
    const int64_t size = integer(d, where + ".shape[]", path, 0);
    if (size > 0 && numel > std::numeric_limits<int64_t>::max() / size)
      bad(path,
          fmt::format("{}.shape {} has more elements than an int64 holds", where, shape.dump()));
    numel *= size;
    t.shape.push_back(size);
  }
  const json& chunks = field(value, "chunks", where, path);
  if (!chunks.is_array()) bad(path, fmt::format("{}.chunks is not an array", where));
  for (const json& c : chunks) {
    const std::string cw = where + ".chunks[]";
    if (!c.is_object()) bad(path, fmt::format("{} is not an object", cw));
    for (const auto& [name, unused] : c.items()) {
      if (name != "file" && name != "key" && name != "begin" && name != "end")
        bad(path, fmt::format("{} has an unknown field \"{}\"", cw, name));
    }
    CheckpointChunk chunk{text(field(c, "file", cw, path), cw + ".file", path),
                          text(field(c, "key", cw, path), cw + ".key", path),
                          integer(field(c, "begin", cw, path), cw + ".begin", path),
                          integer(field(c, "end", cw, path), cw + ".end", path)};
    if (!files.count(chunk.file))
      bad(path, fmt::format("tensor '{}' has a chunk in {}, which is not listed under \"files\"",
                            key, chunk.file));
    t.chunks.push_back(std::move(chunk));
  }
  std::sort(t.chunks.begin(), t.chunks.end(),
            [](const CheckpointChunk& a, const CheckpointChunk& b) { return a.begin < b.begin; });
  int64_t covered = 0;
  for (const CheckpointChunk& chunk : t.chunks) {
    if (chunk.begin != covered || chunk.end <= chunk.begin)
      bad(path, fmt::format("the chunks of tensor '{}' do not tile it (element {})", key, covered));
    covered = chunk.end;
  }
  if (covered != numel)
    bad(path,
        fmt::format("the chunks of tensor '{}' cover {} of its {} elements", key, covered, numel));
  for (const auto& [name, unused] : value.items()) {
    if (name != "dtype" && name != "shape" && name != "chunks")
      bad(path, fmt::format("{} has an unknown field \"{}\"", where, name));
  }
  return t;
}

}  // namespace

void throw_damaged_metadata(const std::string& path, const std::string& what) {
  throw CheckpointError(
      fmt::format("{} is not a valid Strata checkpoint description: {}\nHINT: the checkpoint is "
                  "damaged; resume from an older step (checkpoint.load_step) or delete this step "
                  "directory",
                  path, what));
}

int64_t step_of_dir_name(const std::string& name) {
  static const std::regex pattern("step-([0-9]{1,18})");
  std::smatch m;
  return std::regex_match(name, m, pattern) ? std::stoll(m[1]) : -1;
}

CheckpointMetadata validate_checkpoint_metadata(const json& meta, const std::string& path,
                                                const std::string& dir) {
  if (!meta.is_object()) bad(path, "the document is not a JSON object");
  if (text(field(meta, "format", "the document", path), "\"format\"", path) != "strata-checkpoint")
    bad(path, "\"format\" is not \"strata-checkpoint\"");
  const int64_t version =
      integer(field(meta, "format_version", "the document", path), "format_version", path);
  if (version != kCheckpointFormatVersion) {
    throw CheckpointError(fmt::format(
        "{}: checkpoint format version {} is not supported (this build reads version {})\nHINT: "
        "use the Strata version that wrote it, or convert it",
        path, version, kCheckpointFormatVersion));
  }
  CheckpointMetadata out;
  out.step = integer(field(meta, "step", "the document", path), "step", path);
  const int64_t named = step_of_dir_name(std::filesystem::path(dir).filename().string());
  if (named >= 0 && named != out.step)
    bad(path, fmt::format("\"step\" is {} but the directory is {}", out.step,
                          std::filesystem::path(dir).filename().string()));
  if (meta.contains("model_only")) {
    if (!meta["model_only"].is_boolean()) bad(path, "\"model_only\" is not true or false");
    out.model_only = meta["model_only"].get<bool>();
  }
  integer(field(meta, "world_size", "the document", path), "world_size", path, 1);
  if (meta.contains("model") && !meta["model"].is_object()) bad(path, "\"model\" is not an object");
  const json& files = field(meta, "files", "the document", path);
  if (!files.is_object()) bad(path, "\"files\" is not an object");
  for (const auto& [name, value] : files.items())
    out.files.emplace(name, parse_file(name, value, path));
  const json& tensors = field(meta, "tensors", "the document", path);
  if (!tensors.is_object()) bad(path, "\"tensors\" is not an object");
  for (const auto& [key, value] : tensors.items())
    out.tensors.emplace(key, parse_tensor(key, value, out.files, path));
  return out;
}

}  // namespace strata
