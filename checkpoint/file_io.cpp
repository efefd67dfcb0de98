// Durable writes and checksums.
#include "checkpoint/file_io.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/evp.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>

namespace strata {
namespace {

std::string errno_text() {
  return std::strerror(errno);
}

std::string hex64(uint64_t value) {
  return fmt::format("{:016x}", value);
}

XXH3_state_t* as_state(void* p) {
  return static_cast<XXH3_state_t*>(p);
}

}  // namespace

MessageDigest::MessageDigest(Algorithm algorithm) : context_(EVP_MD_CTX_new()) {
  const EVP_MD* md = algorithm == Algorithm::kSha1 ? EVP_sha1() : EVP_sha256();
  if (!context_ || EVP_DigestInit_ex(static_cast<EVP_MD_CTX*>(context_), md, nullptr) != 1) {
    throw std::runtime_error("OpenSSL: cannot initialise a message digest");
  }
}

MessageDigest::~MessageDigest() {
  EVP_MD_CTX_free(static_cast<EVP_MD_CTX*>(context_));
}

void MessageDigest::update(const void* data, size_t bytes) {
  EVP_DigestUpdate(static_cast<EVP_MD_CTX*>(context_), data, bytes);
}

std::string MessageDigest::hex_digest() {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(static_cast<EVP_MD_CTX*>(context_), digest, &length);
  std::string hex;
  for (unsigned int i = 0; i < length; ++i) hex += fmt::format("{:02x}", digest[i]);
  return hex;
}

std::string xxh3_hex(const void* data, size_t bytes) {
  return hex64(XXH3_64bits(data, bytes));
}

constexpr size_t kBounceBytes = size_t{4} << 20;
constexpr size_t kDirectAlign = 4096;

HashingFileWriter::HashingFileWriter(std::string path, bool hash_thread, bool direct)
    : path_(std::move(path)), block_state_(XXH3_createState()) {
  XXH3_64bits_reset(as_state(block_state_));
  const int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
  fd_ = direct ? ::open(path_.c_str(), flags | O_DIRECT, 0644) : -1;
  if (fd_ >= 0) {
    void* buffer = nullptr;
    if (posix_memalign(&buffer, kDirectAlign, kBounceBytes) == 0) {
      bounce_ = static_cast<uint8_t*>(buffer);
    } else {
      ::close(fd_);
      fd_ = -1;
    }
  }
  if (fd_ < 0) fd_ = ::open(path_.c_str(), flags, 0644);  // buffered (or O_DIRECT refused)
  if (fd_ < 0) {
    const std::string reason = errno_text();
    XXH3_freeState(as_state(block_state_));
    throw IoError(fmt::format("cannot create {}: {}", path_, reason));
  }
  if (hash_thread) worker_ = std::thread([this] { hash_worker(); });
}

HashingFileWriter::~HashingFileWriter() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
  if (fd_ >= 0) {  // not finished: the file is incomplete
    ::close(fd_);
    ::unlink(path_.c_str());
  }
  std::free(bounce_);
  XXH3_freeState(as_state(block_state_));
}

void HashingFileWriter::hash(const uint8_t* p, size_t bytes) {
  sha_.update(p, bytes);
  // Block checksums: cut the input at block boundaries of the file offset.
  for (size_t done = 0; done < bytes;) {
    const uint64_t in_block = (hashed_ + done) % kChecksumBlockBytes;
    const size_t take = std::min<uint64_t>(bytes - done, kChecksumBlockBytes - in_block);
    XXH3_64bits_update(as_state(block_state_), p + done, take);
    done += take;
    if (in_block + take == kChecksumBlockBytes) {
      block_xxh3_ += hex64(XXH3_64bits_digest(as_state(block_state_)));
      XXH3_64bits_reset(as_state(block_state_));
    }
  }
  hashed_ += bytes;
}

void HashingFileWriter::hash_worker() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    cv_.wait(lock, [this] { return job_pending_ || stop_; });
    if (!job_pending_) return;
    const uint8_t* data = job_data_;
    const size_t bytes = job_bytes_;
    lock.unlock();
    hash(data, bytes);
    lock.lock();
    job_pending_ = false;
    cv_.notify_all();
  }
}

void HashingFileWriter::hash_while(const uint8_t* data, size_t bytes,
                                   const std::function<void()>& io) {
  const bool parallel = worker_.joinable() && bytes >= (size_t{256} << 10);
  if (parallel) {
    std::lock_guard<std::mutex> lock(mutex_);
    job_data_ = data;
    job_bytes_ = bytes;
    job_pending_ = true;
    cv_.notify_all();
  } else {
    hash(data, bytes);
  }
  std::exception_ptr error;
  try {
    io();
  } catch (...) {
    error = std::current_exception();
  }
  if (parallel) {  // the data must stay untouched until the helper is done with it
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [this] { return !job_pending_; });
  }
  if (error) std::rethrow_exception(error);
}

void HashingFileWriter::write_all(const uint8_t* data, size_t bytes) {
  for (size_t written = 0; written < bytes;) {
    const ssize_t w = ::write(fd_, data + written, bytes - written);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EINVAL && bounce_) {
      // The file system takes O_DIRECT at open but not for this write: go on buffered.
      const int flags = ::fcntl(fd_, F_GETFL);
      if (flags >= 0 && (flags & O_DIRECT) && ::fcntl(fd_, F_SETFL, flags & ~O_DIRECT) == 0)
        continue;
    }
    if (w < 0) throw IoError(fmt::format("cannot write {}: {}", path_, errno_text()));
    written += static_cast<size_t>(w);
  }
}

void HashingFileWriter::flush_direct(size_t length) {
  hash_while(bounce_, filled_, [&] { write_all(bounce_, length); });
  size_ += filled_;
  filled_ = 0;
}

void HashingFileWriter::write(const void* data, size_t bytes) {
  const auto* p = static_cast<const uint8_t*>(data);
  if (bounce_) {  // O_DIRECT: one copy into the aligned buffer, whole-buffer writes
    while (bytes > 0) {
      const size_t n = std::min(bytes, kBounceBytes - filled_);
      std::memcpy(bounce_ + filled_, p, n);
      filled_ += n;
      p += n;
      bytes -= n;
      if (filled_ == kBounceBytes) flush_direct(kBounceBytes);
    }
    return;
  }
  // In chunks, each hashed on the helper while this thread copies it to the kernel: both
  // threads read the same few MiB at about the same time, so it comes from memory once.
  for (size_t done = 0; done < bytes;) {
    const size_t n = std::min(kBounceBytes, bytes - done);
    hash_while(p + done, n, [&] { write_all(p + done, n); });
    size_ += n;
    done += n;
  }
}

FileDigest HashingFileWriter::finish() {
  if (bounce_ && filled_ > 0) {  // the tail, padded to the alignment, then cut to size
    const size_t padded = (filled_ + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
    std::memset(bounce_ + filled_, 0, padded - filled_);
    flush_direct(padded);
    if (::ftruncate(fd_, static_cast<off_t>(size_)) != 0) {
      throw IoError(fmt::format("cannot truncate {}: {}", path_, errno_text()));
    }
  }
  if (size_ % kChecksumBlockBytes != 0 || size_ == 0) {
    block_xxh3_ += hex64(XXH3_64bits_digest(as_state(block_state_)));
  }
  if (::fsync(fd_) != 0) throw IoError(fmt::format("cannot fsync {}: {}", path_, errno_text()));
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) {
    ::unlink(path_.c_str());
    throw IoError(fmt::format("cannot close {}: {}", path_, errno_text()));
  }
  return FileDigest{size_, sha_.hex_digest(), block_xxh3_};
}

FileDigest digest_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw IoError(fmt::format("cannot open {}: {}", path, errno_text()));
  FileDigest digest;
  Sha256 sha;
  std::vector<uint8_t> block(kChecksumBlockBytes);
  while (true) {
    size_t filled = 0;
    while (filled < block.size()) {
      const ssize_t n = ::read(fd, block.data() + filled, block.size() - filled);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) {
        const std::string reason = errno_text();
        ::close(fd);
        throw IoError(fmt::format("cannot read {}: {}", path, reason));
      }
      if (n == 0) break;
      filled += static_cast<size_t>(n);
    }
    if (filled > 0) {
      sha.update(block.data(), filled);
      digest.block_xxh3 += xxh3_hex(block.data(), filled);
      digest.size += filled;
    }
    if (filled < block.size()) break;
  }
  if (digest.size == 0) digest.block_xxh3 = xxh3_hex(nullptr, 0);
  ::close(fd);
  digest.sha256 = sha.hex_digest();
  return digest;
}

void fsync_directory(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw IoError(fmt::format("cannot open directory {}: {}", path, errno_text()));
  const int rc = ::fsync(fd);
  const std::string reason = errno_text();
  ::close(fd);
  if (rc != 0) throw IoError(fmt::format("cannot fsync directory {}: {}", path, reason));
}

namespace {
std::string parent_of(const std::string& path) {
  const std::filesystem::path parent = std::filesystem::path(path).parent_path();
  return parent.empty() ? std::string(".") : parent.string();
}
}  // namespace

void write_file_atomic(const std::string& path, const std::string& content) {
  const std::string temp = path + ".tmp";
  {
    HashingFileWriter out(temp);
    out.write(content.data(), content.size());
    out.finish();
  }
  rename_durable(temp, path);
}

void rename_durable(const std::string& from, const std::string& to) {
  if (std::rename(from.c_str(), to.c_str()) != 0) {
    throw IoError(fmt::format("cannot rename {} to {}: {}", from, to, errno_text()));
  }
  fsync_directory(parent_of(to));
}

}  // namespace strata
