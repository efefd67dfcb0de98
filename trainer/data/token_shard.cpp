// llm.c token shards: writing (atomic) and memory-mapped reading with header validation.
#include "trainer/data/token_shard.h"

#include "checkpoint/file_io.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <glob.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <utility>

namespace strata {
namespace {

constexpr size_t kHeaderBytes = kShardHeaderInts * sizeof(int32_t);

std::string hint_prepare() {
  return "HINT: (re)create the shards with `strata prepare-data`";
}

}  // namespace

namespace {

// Header, then `bytes` of payload, to a temporary file renamed over `path` once complete.
void write_shard_file(const std::string& path, int32_t magic, int32_t version, size_t count,
                      int32_t window, const void* data, size_t bytes) {
  if (count > static_cast<size_t>(INT32_MAX)) {
    throw DataError(
        fmt::format("cannot write {}: {} tokens exceed the format's limit of {} per "
                    "shard\nHINT: use a smaller --shard-tokens",
                    path, count, INT32_MAX));
  }
  int32_t header[kShardHeaderInts] = {};
  header[0] = magic;
  header[1] = version;
  header[2] = static_cast<int32_t>(count);
  header[3] = window;
  const std::string temp = path + ".tmp";
  try {
    {
      HashingFileWriter out(temp, /*hash_thread=*/false);
      out.write(header, sizeof(header));
      out.write(data, bytes);
      out.finish();
    }
    rename_durable(temp, path);
  } catch (const IoError& e) {
    std::remove(temp.c_str());
    throw DataError(
        fmt::format("cannot write token shard {}: {}\nHINT: check free disk space "
                    "and permissions of the output directory",
                    path, e.what()));
  }
}

}  // namespace

void write_mask_shard(const std::string& path, const std::vector<uint8_t>& mask, int32_t window) {
  write_shard_file(path, kMaskMagic, kMaskVersion, mask.size(), window, mask.data(), mask.size());
}

std::string mask_path_of(const std::string& shard_path) {
  const std::filesystem::path p(shard_path);
  return (p.parent_path() / (p.stem().string() + ".mask")).string();
}

void write_token_shard(const std::string& path, const std::vector<uint32_t>& tokens,
                       int64_t vocab_size, int32_t window) {
  const bool wide = vocab_size > 65536;

  std::vector<uint16_t> narrow;
  if (!wide) {
    narrow.resize(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] > 0xFFFF) {
        throw DataError(
            fmt::format("cannot write {}: token {} does not fit uint16 although the "
                        "vocabulary has {} entries",
                        path, tokens[i], vocab_size));
      }
      narrow[i] = static_cast<uint16_t>(tokens[i]);
    }
  }
  if (wide) {
    write_shard_file(path, kShardMagicU32, kShardVersionU32, tokens.size(), window, tokens.data(),
                     tokens.size() * sizeof(uint32_t));
  } else {
    write_shard_file(path, kShardMagicU16, kShardVersionU16, tokens.size(), window, narrow.data(),
                     narrow.size() * sizeof(uint16_t));
  }
}

TokenShard::TokenShard(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    throw DataError(fmt::format("cannot open token shard {}: {}\n{}", path, std::strerror(errno),
                                hint_prepare()));
  }
  struct stat st {};
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    throw DataError(fmt::format("cannot stat token shard {}: {}", path, std::strerror(errno)));
  }
  const size_t file_bytes = static_cast<size_t>(st.st_size);
  if (file_bytes < kHeaderBytes) {
    ::close(fd);
    throw DataError(
        fmt::format("token shard {} is truncated: {} bytes, shorter than the "
                    "{}-byte header\n{}",
                    path, file_bytes, kHeaderBytes, hint_prepare()));
  }
  void* map = mmap(nullptr, file_bytes, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) {
    throw DataError(
        fmt::format("cannot memory-map token shard {}: {}", path, std::strerror(errno)));
  }
  map_ = static_cast<const uint8_t*>(map);
  map_bytes_ = file_bytes;

  int32_t header[4];
  std::memcpy(header, map_, sizeof(header));
  window_ = header[3];
  if (header[0] == kMaskMagic) {
    bytes_per_token_ = 1;
    if (header[1] != kMaskVersion) {
      unmap();
      throw DataError(fmt::format("loss mask {} has version {}; magic {} needs version {}\n{}",
                                  path, header[1], kMaskMagic, kMaskVersion, hint_prepare()));
    }
  } else if (header[0] == kShardMagicU16) {
    bytes_per_token_ = 2;
    if (header[1] != kShardVersionU16) {
      unmap();
      throw DataError(fmt::format("token shard {} has version {}; magic {} needs version {}\n{}",
                                  path, header[1], kShardMagicU16, kShardVersionU16,
                                  hint_prepare()));
    }
  } else if (header[0] == kShardMagicU32) {
    bytes_per_token_ = 4;
    if (header[1] != kShardVersionU32) {
      unmap();
      throw DataError(fmt::format("token shard {} has version {}; magic {} needs version {}\n{}",
                                  path, header[1], kShardMagicU32, kShardVersionU32,
                                  hint_prepare()));
    }
  } else {
    unmap();
    throw DataError(
        fmt::format("{} is not an llm.c token shard: bad magic {} (expected {} for "
                    "uint16 or {} for uint32 tokens)\n{}",
                    path, header[0], kShardMagicU16, kShardMagicU32, hint_prepare()));
  }
  num_tokens_ = header[2];
  const size_t expected = kHeaderBytes + static_cast<size_t>(num_tokens_) * bytes_per_token_;
  if (num_tokens_ < 0 || expected != file_bytes) {
    unmap();
    throw DataError(
        fmt::format("token shard {} is truncated or corrupt: its header says {} "
                    "tokens ({} bytes), the file has {} bytes\n{}",
                    path, header[2], expected, file_bytes, hint_prepare()));
  }
  if (window_ < 0 || (window_ > 0 && num_tokens_ % window_ != 0)) {
    unmap();
    throw DataError(fmt::format(
        "token shard {} is corrupt: its packed window length {} does not divide its {} tokens\n{}",
        path, window_, num_tokens_, hint_prepare()));
  }
}

TokenShard::~TokenShard() {
  unmap();
}

TokenShard::TokenShard(TokenShard&& other) noexcept {
  *this = std::move(other);
}

TokenShard& TokenShard::operator=(TokenShard&& other) noexcept {
  if (this != &other) {
    unmap();
    path_ = std::move(other.path_);
    map_ = std::exchange(other.map_, nullptr);
    map_bytes_ = std::exchange(other.map_bytes_, 0);
    num_tokens_ = other.num_tokens_;
    bytes_per_token_ = other.bytes_per_token_;
    window_ = other.window_;
  }
  return *this;
}

void TokenShard::unmap() {
  if (map_) munmap(const_cast<uint8_t*>(map_), map_bytes_);
  map_ = nullptr;
  map_bytes_ = 0;
}

uint32_t TokenShard::token(int64_t i) const {
  const uint8_t* p = map_ + kHeaderBytes + static_cast<size_t>(i) * bytes_per_token_;
  if (bytes_per_token_ == 1) return *p;
  if (bytes_per_token_ == 2) {
    uint16_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

void TokenShard::read(int64_t begin, int64_t count, int64_t* out) const {
  for (int64_t i = 0; i < count; ++i) out[i] = token(begin + i);
}

uint32_t TokenShard::max_token() const {
  uint32_t m = 0;
  const uint8_t* data = map_ + kHeaderBytes;
  if (bytes_per_token_ == 2) {
    for (int64_t i = 0; i < num_tokens_; ++i) {
      uint16_t v;
      std::memcpy(&v, data + 2 * i, 2);
      m = std::max<uint32_t>(m, v);
    }
  } else {
    for (int64_t i = 0; i < num_tokens_; ++i) m = std::max(m, token(i));
  }
  return m;  // a mask: its largest flag byte
}

std::vector<std::string> expand_shard_pattern(const std::string& pattern) {
  if (std::filesystem::is_regular_file(pattern)) return {pattern};
  glob_t matches{};
  const int rc = glob(pattern.c_str(), GLOB_ERR, nullptr, &matches);
  std::vector<std::string> paths;
  if (rc == 0) {
    for (size_t i = 0; i < matches.gl_pathc; ++i) paths.emplace_back(matches.gl_pathv[i]);
  }
  globfree(&matches);
  if (paths.empty()) {
    throw DataError(
        fmt::format("no token shards match '{}'\nHINT: check the path (relative paths "
                    "start from the working directory) or create the shards with "
                    "`strata prepare-data`",
                    pattern));
  }
  std::sort(paths.begin(), paths.end());
  return paths;
}

}  // namespace strata
