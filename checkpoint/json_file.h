// JSON documents that come from files (checkpoint metadata, train_state.json, model directories'
// config and index files): the size is checked before reading, a key given twice in one object
// is refused (otherwise the last would silently win), nesting is bounded, and every error names
// the file. No LibTorch here.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "checkpoint/errors.h"

namespace strata {

// A document that does not parse: `what()` names the file; `reason` is the parser's account.
class JsonDocumentError : public CheckpointError {
 public:
  JsonDocumentError(const std::string& where, const std::string& reason)
      : CheckpointError(where + " is not valid JSON: " + reason), reason(reason) {}
  std::string reason;
};

// The largest JSON document read from a file (a model index with a million tensors is ~100 MB).
constexpr uint64_t kMaxJsonFileBytes = 256ull << 20;
constexpr int kMaxJsonDepth = 64;

// Parses `text`; throws JsonDocumentError "<where> is not valid JSON: <reason>" for a syntax
// error, a duplicate key or nesting deeper than kMaxJsonDepth.
nlohmann::json parse_json_document(const std::string& text, const std::string& where);

// Reads and parses the file at `path` (at most `max_bytes`); throws CheckpointError naming it.
nlohmann::json read_json_file(const std::string& path, uint64_t max_bytes = kMaxJsonFileBytes);

}  // namespace strata
