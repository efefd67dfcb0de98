// safetensors files (the format of HF checkpoints and of Strata's per-rank checkpoint files):
// an 8-byte little-endian header length N, N bytes of JSON header padded with spaces to a
// multiple of 8, then the tensor bytes back to back. Reading memory-maps the file and checks
// everything the reference reader checks; writing produces the reference writer's layout and
// replaces the destination atomically (temp + fsync + rename).
#pragma once

#include <ATen/Tensor.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint/file_io.h"
#include "checkpoint/safetensors_header.h"

namespace strata {

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // mmap + parse_safetensors_header
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  bool contains(const std::string& name) const;
  const SafetensorsEntry& entry(const std::string& name) const;  // throws CheckpointError
  // A copy of the tensor (dtype and shape as stored).
  at::Tensor tensor(const std::string& name) const;
  // Elements [begin, begin + count) of the flattened tensor: reads only those bytes.
  at::Tensor read_elements(const std::string& name, int64_t begin, int64_t count) const;
  // The same into `dest` (count elements of the stored dtype), without an intermediate tensor.
  void copy_elements(const std::string& name, int64_t begin, int64_t count, void* dest) const;
  // The file byte range [first, last) of those elements (throws when out of range).
  std::pair<uint64_t, uint64_t> element_bytes(const std::string& name, int64_t begin,
                                              int64_t count) const;
  // Asks the kernel to read bytes [first, last) ahead (asynchronous readahead of a range that
  // is about to be read).
  void prefetch(uint64_t first, uint64_t last) const;
  // The whole file image, memory-mapped.
  const uint8_t* data() const { return map_; }
  size_t size() const { return size_; }

 private:
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t size_ = 0;
  SafetensorsHeader header_;
  std::map<std::string, size_t> index_;
};

// One tensor to write from raw memory (contiguous, `dtype`, `shape`).
struct SafetensorsItem {
  std::string name;
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  const void* data;
};

// Writes `items` to `path` in the reference layout, in place (not atomic): the caller owns the
// directory protocol. fsyncs the file and returns its checksums.
FileDigest write_safetensors_file(const std::string& path, std::vector<SafetensorsItem> items,
                                  std::map<std::string, std::string> metadata = {},
                                  bool hash_thread = true);

// Writes `tensors` (any order; names unique) with `metadata` (string -> string; "format": "pt"
// is added when absent) to `path`, atomically.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, at::Tensor>>& tensors,
                       std::map<std::string, std::string> metadata = {});

// safetensors dtype string <-> LibTorch dtype; throws CheckpointError for ones LibTorch lacks.
std::string safetensors_dtype(at::ScalarType dtype);
at::ScalarType torch_dtype(const std::string& safetensors_dtype);

}  // namespace strata
