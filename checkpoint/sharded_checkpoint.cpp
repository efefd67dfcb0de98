// The sharded checkpoint format: per-rank safetensors files, metadata.json, ranged reads.
#include "checkpoint/sharded_checkpoint.h"

#include <ATen/ATen.h>
#include <fmt/format.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <sstream>

#include "checkpoint/file_io.h"
#include "checkpoint/json_file.h"
#include "checkpoint/safe_path.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string shape_text(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

}  // namespace

std::string rank_file_name(int rank) {
  return fmt::format("rank-{:05d}.safetensors", rank);
}

json write_rank_file(const std::string& dir, int rank, const std::vector<TensorPiece>& pieces,
                     bool hash_thread) {
  std::vector<SafetensorsItem> items;
  std::vector<at::Tensor> host_copies;  // of pieces on a device, alive until written
  json chunks = json::array();
  for (const TensorPiece& piece : pieces) {
    if (piece.local.numel() == 0) continue;
    at::Tensor local = piece.local;
    if (!local.device().is_cpu()) {  // a GPU piece: written from a host copy
      local = host_copies.emplace_back(local.detach().to(at::kCPU).contiguous());
    }
    if (!local.is_contiguous()) {
      throw std::logic_error("write_rank_file: piece " + piece.key + " is not contiguous");
    }
    items.push_back({piece.key, local.scalar_type(), {local.numel()}, local.data_ptr()});
    chunks.push_back(
        {{"key", piece.key}, {"begin", piece.begin}, {"end", piece.begin + piece.local.numel()}});
  }
  const std::string name = rank_file_name(rank);
  const FileDigest digest =
      write_safetensors_file((fs::path(dir) / name).string(), std::move(items), {}, hash_thread);
  return {{"file", name},
          {"size", digest.size},
          {"sha256", digest.sha256},
          {"block_bytes", kChecksumBlockBytes},
          {"block_xxh3", digest.block_xxh3},
          {"chunks", chunks}};
}

json build_metadata(const std::vector<json>& rank_reports, const std::vector<TensorPiece>& pieces,
                    const json& extra) {
  json meta = {{"format", "strata-checkpoint"},
               {"format_version", kCheckpointFormatVersion},
               {"world_size", rank_reports.size()}};
  for (const auto& [key, value] : extra.items()) meta[key] = value;
  json files = json::object();
  std::map<std::string, json> chunks;
  for (const json& report : rank_reports) {
    const std::string file = report.at("file");
    files[file] = {{"size", report.at("size")},
                   {"sha256", report.at("sha256")},
                   {"block_bytes", report.at("block_bytes")},
                   {"block_xxh3", report.at("block_xxh3")}};
    for (const json& chunk : report.at("chunks")) {
      chunks[chunk.at("key")].push_back({{"file", file},
                                         {"key", chunk.at("key")},
                                         {"begin", chunk.at("begin")},
                                         {"end", chunk.at("end")}});
    }
  }
  json tensors = json::object();
  for (const TensorPiece& piece : pieces) {  // every rank lists the same keys in the same order
    json& entry = tensors[piece.key];
    entry["dtype"] = safetensors_dtype(piece.local.scalar_type());
    entry["shape"] = piece.shape;
    entry["chunks"] = chunks.count(piece.key) ? chunks[piece.key] : json::array();
  }
  meta["files"] = files;
  meta["tensors"] = tensors;
  return meta;
}

CheckpointReader::CheckpointReader(std::string dir) : dir_(std::move(dir)) {
  const std::string path = (fs::path(dir_) / "metadata.json").string();
  if (!fs::exists(path)) {
    throw CheckpointError(
        fmt::format("{} is not a Strata checkpoint: no readable metadata.json "
                    "in it\nHINT: point at a committed step-NNNNNNN directory "
                    "or at the checkpoint folder that holds them",
                    dir_));
  }
  try {
    metadata_ = read_json_file(path);
  } catch (const JsonDocumentError& e) {
    throw_damaged_metadata(path, fmt::format("invalid JSON ({})", e.reason));
  }  // other errors (unreadable, too large) name the file themselves
  parsed_ = validate_checkpoint_metadata(metadata_, path, dir_);
}

CheckpointReader::~CheckpointReader() = default;

int64_t CheckpointReader::step() const {
  return parsed_.step;
}

bool CheckpointReader::model_only() const {
  return parsed_.model_only;
}

std::vector<std::string> CheckpointReader::keys() const {
  std::vector<std::string> out;
  for (const auto& [key, t] : parsed_.tensors) out.push_back(key);
  return out;
}

std::vector<int64_t> CheckpointReader::shape(const std::string& key) const {
  return parsed_.tensors.at(key).shape;
}

std::string CheckpointReader::file_path(const std::string& file) const {
  // Inside the step directory (inside the repo folder for a Hub cache snapshot, whose files
  // link into blobs/).
  return path_inside(dir_, file, fmt::format("{}/metadata.json: file", dir_),
                     confinement_root(dir_));
}

const SafetensorsFile& CheckpointReader::open(const std::string& file) const {
  auto it = files_.find(file);
  if (it != files_.end()) return *it->second;
  const std::string path = file_path(file);
  const CheckpointFile& info = parsed_.files.at(file);
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    throw CheckpointError(
        fmt::format("checkpoint file {} is missing\nHINT: the checkpoint is "
                    "incomplete; resume from an older step "
                    "(checkpoint.load_step)",
                    path));
  }
  const uint64_t expected = info.size;
  if (static_cast<uint64_t>(st.st_size) != expected) {
    throw CheckpointError(
        fmt::format("checkpoint file {} is {} bytes but metadata.json says {} "
                    "(truncated or replaced)\nHINT: resume from an older step "
                    "(checkpoint.load_step)",
                    path, st.st_size, expected));
  }
  auto opened = std::make_unique<SafetensorsFile>(path);
  verified_blocks_[file].assign((expected + info.block_bytes - 1) / info.block_bytes, false);
  verify_range(*opened, 0, opened->header().data_offset);
  return *files_.emplace(file, std::move(opened)).first->second;
}

void CheckpointReader::verify_range(const SafetensorsFile& file, uint64_t first,
                                    uint64_t last) const {
  const std::string name = fs::path(file.path()).filename().string();
  const CheckpointFile& info = parsed_.files.at(name);
  const uint64_t block = info.block_bytes;
  const std::string& expected = info.block_xxh3;
  std::vector<bool>& done = verified_blocks_[name];
  if (last <= first) return;
  for (uint64_t b = first / block; b * block < last; ++b) {
    if (done[b]) continue;
    const uint64_t begin = b * block, end = std::min<uint64_t>(file.size(), begin + block);
    const std::string got = xxh3_hex(file.data() + begin, end - begin);
    if (expected.size() < (b + 1) * 16 || expected.compare(b * 16, 16, got) != 0) {
      throw CheckpointError(
          fmt::format("checkpoint file {} is corrupted: bytes [{}, {}) do not "
                      "match their checksum in metadata.json\nHINT: resume from "
                      "an older step (checkpoint.load_step); `strata inspect "
                      "{} --verify` checks every file",
                      file.path(), begin, end, dir_));
    }
    done[b] = true;
  }
}

void CheckpointReader::load(std::vector<TensorPiece>& pieces) const {
  std::vector<std::string> problems;
  for (const TensorPiece& piece : pieces) {
    auto it = parsed_.tensors.find(piece.key);
    if (it == parsed_.tensors.end()) {
      problems.push_back(fmt::format("'{}' is missing (model expects shape {})", piece.key,
                                     shape_text(piece.shape)));
    } else if (it->second.shape != piece.shape) {
      problems.push_back(fmt::format("'{}' has shape {} in the checkpoint but {} in the model",
                                     piece.key, shape_text(it->second.shape),
                                     shape_text(piece.shape)));
    }
  }
  if (!problems.empty()) {
    throw CheckpointError(
        fmt::format("checkpoint {} does not fit the model:\n  {}\nHINT: use the "
                    "model config the checkpoint was saved with (its "
                    "config.yaml), or another checkpoint",
                    dir_, fmt::join(problems, "\n  ")));
  }
  for (TensorPiece& piece : pieces) {
    const CheckpointTensor& t = parsed_.tensors.at(piece.key);
    const int64_t want_begin = piece.begin, want_end = piece.begin + piece.local.numel();
    const at::ScalarType stored = torch_dtype(t.dtype);
    for (const CheckpointChunk& chunk : t.chunks) {
      const int64_t lo = std::max(want_begin, chunk.begin), hi = std::min(want_end, chunk.end);
      if (lo >= hi) continue;
      const SafetensorsFile& file = open(chunk.file);
      const SafetensorsEntry& entry = file.entry(chunk.key);
      if (entry.dtype != t.dtype || entry.shape != std::vector<int64_t>{chunk.end - chunk.begin}) {
        throw CheckpointError(
            fmt::format("checkpoint file {}: tensor '{}' is {} {} but "
                        "metadata.json says {} [{}]",
                        file.path(), chunk.key, entry.dtype, shape_text(entry.shape), t.dtype,
                        chunk.end - chunk.begin));
      }
      const auto [first, last] = file.element_bytes(chunk.key, lo - chunk.begin, hi - lo);
      file.prefetch(first, last);
      verify_range(file, first, last);
      at::Tensor dest = piece.local.narrow(0, lo - want_begin, hi - lo);
      if (stored == piece.local.scalar_type() && dest.device().is_cpu()) {
        file.copy_elements(chunk.key, lo - chunk.begin, hi - lo, dest.data_ptr());
      } else {
        dest.copy_(file.read_elements(chunk.key, lo - chunk.begin, hi - lo));
      }
    }
  }
}

std::vector<std::string> CheckpointReader::verify_files() const {
  std::vector<std::string> problems;
  for (const auto& [file, info] : parsed_.files) {
    FileDigest digest;
    std::string path;
    try {
      path = file_path(file);
      digest = digest_file(path);
    } catch (const std::exception& e) {
      problems.push_back(fmt::format("{}: {}", file, e.what()));
      continue;
    }
    if (digest.size != info.size) {
      problems.push_back(
          fmt::format("{}: {} bytes, metadata.json says {}", path, digest.size, info.size));
    } else if (digest.sha256 != info.sha256) {
      problems.push_back(fmt::format("{}: SHA-256 {} does not match metadata.json ({})", path,
                                     digest.sha256, info.sha256));
    } else if (info.block_bytes == kChecksumBlockBytes && digest.block_xxh3 != info.block_xxh3) {
      problems.push_back(fmt::format("{}: block checksums do not match metadata.json", path));
    }
  }
  if (!problems.empty()) return problems;
  // Every chunk is where metadata.json says, with its dtype and length.
  for (const auto& [key, t] : parsed_.tensors) {
    for (const CheckpointChunk& chunk : t.chunks) {
      try {
        const SafetensorsFile& file = open(chunk.file);
        if (!file.contains(chunk.key)) {
          problems.push_back(fmt::format("{}: tensor '{}' (a chunk of '{}') is missing", chunk.file,
                                         chunk.key, key));
          continue;
        }
        const SafetensorsEntry& entry = file.entry(chunk.key);
        if (entry.dtype != t.dtype ||
            entry.shape != std::vector<int64_t>{chunk.end - chunk.begin}) {
          problems.push_back(fmt::format(
              "{}: tensor '{}' is {} {} but metadata.json says {} [{}]", chunk.file, chunk.key,
              entry.dtype, shape_text(entry.shape), t.dtype, chunk.end - chunk.begin));
        }
      } catch (const CheckpointError& e) {
        problems.push_back(e.what());
      }
    }
  }
  return problems;
}

}  // namespace strata
