// Token shards in llm.c's `.bin` format: a header of 256 little-endian int32 (magic, version,
// token count, zeros), then the tokens: uint16 (magic 20240520, version 1) or, for
// vocabularies over 65 535, uint32 (llm.c's Llama-3 variant: magic 20240801, version 7).
// Shards are memory-mapped read-only.
//
// Instruction data adds two things llm.c's readers ignore: header[3], the packed window length
// (seq_len + 1: the shard is whole windows of records, each window sampled as a unit; 0 for a
// plain token stream), and a loss-mask companion beside each shard (`train_000000.mask` for
// `train_000000.bin`): the same header with magic 20261202, version 2, then one byte per token:
// bit 0 set where the token is a training target (completion and assistant tokens), bit 1 set
// where the token starts a document (a record, or the padding that closes a window).
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "trainer/errors.h"

namespace strata {

inline constexpr int32_t kShardMagicU16 = 20240520;
inline constexpr int32_t kShardVersionU16 = 1;
inline constexpr int32_t kShardMagicU32 = 20240801;
inline constexpr int32_t kShardVersionU32 = 7;
inline constexpr int32_t kMaskMagic = 20261202;
inline constexpr int32_t kMaskVersion = 2;
inline constexpr uint8_t kMaskTarget = 1;         // bit 0: the token is a training target
inline constexpr uint8_t kMaskDocumentStart = 2;  // bit 1: the token starts a document
inline constexpr size_t kShardHeaderInts = 256;

// Writes `tokens` to `path` (temp file + rename, so a reader never sees a partial shard).
// uint16 storage when `vocab_size` <= 65536, else uint32. `window` > 0: packed windows.
void write_token_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                       int64_t vocab_size, int32_t window = 0);
// The loss-mask companion of a shard (one byte of kMask* bits per token), written the same way.
void write_mask_shard(const std::string& path, const std::vector<uint8_t>& mask,
                      int32_t window = 0);
// "<dir>/train_000000.mask" for "<dir>/train_000000.bin".
std::string mask_path_of(const std::string& shard_path);

// A read-only memory map of one shard; validates the header and the file size on open.
class TokenShard {
 public:
  explicit TokenShard(const std::string& path);
  ~TokenShard();
  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  const std::string& path() const { return path_; }
  int64_t size() const { return num_tokens_; }
  int bytes_per_token() const { return bytes_per_token_; }  // 1 for a loss mask
  bool is_mask() const { return bytes_per_token_ == 1; }
  int32_t window() const { return window_; }  // packed window length, 0 for a token stream
  uint32_t token(int64_t i) const;
  // Copies tokens [begin, begin + count) into `out` as int64 (what embeddings index with).
  void read(int64_t begin, int64_t count, int64_t* out) const;
  uint32_t max_token() const;  // scans the shard

 private:
  void unmap();
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t map_bytes_ = 0;
  int64_t num_tokens_ = 0;
  int bytes_per_token_ = 2;
  int32_t window_ = 0;
};

// Shards matching a glob pattern (or a single path), sorted by name. Throws DataError naming
// the pattern when nothing matches.
std::vector<std::string> expand_shard_pattern(const std::string& pattern);

}  // namespace strata
