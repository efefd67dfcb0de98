// Strata's reshardable checkpoint format (docs/architecture.md "Checkpoint commit protocol"): a
// step directory holding one safetensors file per saving rank with that rank's contiguous pieces of
// each logical tensor, and metadata.json describing every tensor (dtype, global shape, chunks:
// file, key, flat element range) and every file (size, SHA-256, XXH3 per 4 MiB block). A reader on
// any number of ranks reads only the byte ranges it needs, verifying the checksum blocks it
// touches.
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "checkpoint/checkpoint_metadata.h"
#include "checkpoint/safetensors.h"

namespace strata {

// One rank's contiguous piece of a logical tensor: elements [begin, begin + local.numel()) of
// the row-major flattening of a tensor of `shape`. `local` is 1-D and contiguous, on the CPU or a
// GPU (written from a host copy).
struct TensorPiece {
  std::string key;
  std::vector<int64_t> shape;
  int64_t begin = 0;
  at::Tensor local;
};

std::string rank_file_name(int rank);  // "rank-00003.safetensors"

// Writes this rank's non-empty pieces to `dir`/rank_file_name(rank) (fsynced) and returns its
// report: file name, size, checksums and the chunk of every piece. Throws CheckpointError.
// `hash_thread`: see HashingFileWriter.
nlohmann::json write_rank_file(const std::string& dir, int rank,
                               const std::vector<TensorPiece>& pieces, bool hash_thread = true);

// metadata.json from every rank's report (rank order); `extra` fields are merged at top level.
nlohmann::json build_metadata(const std::vector<nlohmann::json>& rank_reports,
                              const std::vector<TensorPiece>& pieces, const nlohmann::json& extra);

// A committed step directory, opened for reading.
class CheckpointReader {
 public:
  // Reads and validates `dir`/metadata.json (validate_checkpoint_metadata).
  explicit CheckpointReader(std::string dir);
  ~CheckpointReader();

  const std::string& dir() const { return dir_; }
  const nlohmann::json& metadata() const { return metadata_; }
  int64_t step() const;
  bool model_only() const;
  bool contains(const std::string& key) const { return parsed_.tensors.count(key) != 0; }
  std::vector<std::string> keys() const;
  std::vector<int64_t> shape(const std::string& key) const;

  // Fills every piece from the chunks that overlap it (casting to the piece's dtype), reading
  // only those bytes and verifying the checksum blocks they lie in. Missing keys and shape
  // mismatches are reported together, naming each key and both shapes.
  void load(std::vector<TensorPiece>& pieces) const;

  // Recomputes every file's size and checksums and checks each chunk's dtype and length in its
  // file's header; returns one line per problem (empty: intact).
  std::vector<std::string> verify_files() const;

 private:
  const SafetensorsFile& open(const std::string& file) const;
  std::string file_path(const std::string& file) const;  // confined to dir_
  void verify_range(const SafetensorsFile& file, uint64_t first, uint64_t last) const;

  std::string dir_;
  nlohmann::json metadata_;
  CheckpointMetadata parsed_;
  mutable std::map<std::string, std::unique_ptr<SafetensorsFile>> files_;
  mutable std::map<std::string, std::vector<bool>> verified_blocks_;
};

}  // namespace strata
