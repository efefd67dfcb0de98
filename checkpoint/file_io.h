// Durable file output and checksums: a writer that streams bytes to a file while hashing them
// (SHA-256 of the whole file, XXH3 of every fixed-size block), fsync of files and directories,
// and atomic replacement (temp + fsync + rename + directory fsync). No LibTorch here.
#pragma once

#include <cstddef>
#include <condition_variable>
#include <functional>
#include <cstdint>
#include <mutex>
#include <thread>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint/errors.h"

namespace strata {

// Bytes per block of the block checksums: a reader verifies the blocks it touches.
constexpr uint64_t kChecksumBlockBytes = 4u << 20;

// Incremental message digest (OpenSSL): SHA-256 for checkpoint files and LFS blobs, SHA-1
// for git blob ids (the Hub names regular files by them).
class MessageDigest {
 public:
  enum class Algorithm { kSha1, kSha256 };
  explicit MessageDigest(Algorithm algorithm);
  ~MessageDigest();
  MessageDigest(const MessageDigest&) = delete;
  MessageDigest& operator=(const MessageDigest&) = delete;
  void update(const void* data, size_t bytes);
  std::string hex_digest();  // finishes the hash: call once

 private:
  void* context_;
};

class Sha256 : public MessageDigest {
 public:
  Sha256() : MessageDigest(Algorithm::kSha256) {}
};

// XXH3-64 of `bytes` bytes at `data`, as 16 lower-case hex digits.
std::string xxh3_hex(const void* data, size_t bytes);

// Checksums of a whole file image: its SHA-256 and the XXH3 of each kChecksumBlockBytes block
// (the last one shorter), concatenated as 16 hex digits per block.
struct FileDigest {
  uint64_t size = 0;
  std::string sha256;
  std::string block_xxh3;
};

// Creates (truncates) `path` and writes to it, hashing as it goes: large writes are hashed on
// a helper thread while the calling thread copies them to the kernel, so a save costs about
// max(hash, write) rather than their sum. `finish` fsyncs and closes; a writer destroyed
// without `finish` removes the file. Throws IoError.
class HashingFileWriter {
 public:
  // `hash_thread` false: hash on the calling thread (when the caller is itself a background
  // thread and cores are scarce). `direct`: write through an aligned 4 MiB buffer with
  // O_DIRECT, bypassing the page cache (for large files; falls back to buffered writes where
  // the file system refuses O_DIRECT).
  explicit HashingFileWriter(std::string path, bool hash_thread = true, bool direct = false);
  ~HashingFileWriter();
  HashingFileWriter(const HashingFileWriter&) = delete;
  HashingFileWriter& operator=(const HashingFileWriter&) = delete;

  void write(const void* data, size_t bytes);
  FileDigest finish();
  const std::string& path() const { return path_; }

 private:
  void hash(const uint8_t* data, size_t bytes);  // SHA-256 + block XXH3, in file order
  void hash_worker();
  // Hashes `bytes` at `data` (on the helper when there is one) while `io` runs.
  void hash_while(const uint8_t* data, size_t bytes, const std::function<void()>& io);
  void write_all(const uint8_t* data, size_t bytes);  // at the current file offset
  void flush_direct(size_t length);                   // the bounce buffer, `length` bytes

  std::string path_;
  int fd_ = -1;
  Sha256 sha_;
  void* block_state_;  // XXH3 state of the current checksum block
  std::string block_xxh3_;
  uint64_t size_ = 0;    // bytes written
  uint64_t hashed_ = 0;  // bytes hashed
  // The helper thread: one job at a time, handed over under `mutex_`.
  std::mutex mutex_;
  std::condition_variable cv_;
  const uint8_t* job_data_ = nullptr;
  size_t job_bytes_ = 0;
  bool job_pending_ = false, stop_ = false;
  std::thread worker_;
  // O_DIRECT: bytes collect in an aligned buffer and go out in whole 4 MiB writes.
  uint8_t* bounce_ = nullptr;
  size_t filled_ = 0;
};

// SHA-256 and block XXH3 of an existing file, read sequentially.
FileDigest digest_file(const std::string& path);

// fsync of a directory, so that renames and creations inside it are durable.
void fsync_directory(const std::string& path);

// Writes `content` to `path` atomically: `path`.tmp, fsync, rename over `path`, fsync of the
// parent directory. Readers see the old content or the new one, never a mix.
void write_file_atomic(const std::string& path, const std::string& content);

// Renames `from` to `to` (same file system) and fsyncs the parent of `to`. Throws IoError.
void rename_durable(const std::string& from, const std::string& to);

}  // namespace strata
