// The safetensors header: parsing and validation of a file image as the reference (Rust)
// reader does it, and the dtype table. No LibTorch: the fuzz target builds this file alone.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/errors.h"

namespace strata {

struct SafetensorsEntry {
  std::string name;
  std::string dtype;  // "F32", "BF16", ...
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // byte range within the data section
};

struct SafetensorsHeader {
  std::map<std::string, std::string> metadata;  // __metadata__
  std::vector<SafetensorsEntry> entries;        // in data order
  uint64_t data_offset = 0;                     // 8 + N: where the data section starts
};

// Parses and validates the header of a whole file image (`size` bytes at `data`). `file`
// names it in errors. Pure function, no I/O: the parser the fuzz target exercises.
SafetensorsHeader parse_safetensors_header(const uint8_t* data, size_t size,
                                           const std::string& file);

// The reference dtype table: bits per element and the writer's alignment rank (higher is
// written first); nullptr for a name the format does not know.
struct SafetensorsDtype {
  const char* name;
  int bits;
  int alignment_rank;
};
const SafetensorsDtype* find_safetensors_dtype(const std::string& name);

}  // namespace strata
