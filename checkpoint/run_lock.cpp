// The run directory lock: flock on <run_dir>/.strata.lock (semantics in run_lock.h).
#include "checkpoint/run_lock.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <sstream>
#include <thread>

namespace strata {
namespace {

std::string error_text(int error) {
  return std::strerror(error);
}

// Errors of flock that mean "this filesystem does not do locks", not "someone holds it".
bool locks_unsupported(int error) {
  return error == ENOLCK || error == EOPNOTSUPP || error == ENOTSUP || error == ENOSYS;
}

std::string read_all(int fd) {
  std::string text;
  char buffer[4096];
  for (off_t offset = 0; text.size() < (64u << 10);) {
    const ssize_t n = ::pread(fd, buffer, sizeof buffer, offset);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    text.append(buffer, static_cast<size_t>(n));
    offset += n;
  }
  return text;
}

// Replaces the file's content with `text` and flushes it, so that other nodes read it too.
// Written in place, then cut to length: a reader never sees an empty file in between.
void write_all(int fd, const std::string& text, const std::string& path) {
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n =
        ::pwrite(fd, text.data() + done, text.size() - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      throw IoError(fmt::format(
          "cannot write the lock file {}: {}\nHINT: check that job.run_dir is writable and the "
          "disk is not full",
          path, error_text(errno)));
    }
    done += static_cast<size_t>(n);
  }
  if (::ftruncate(fd, static_cast<off_t>(text.size())) != 0 || ::fsync(fd) != 0) {
    throw IoError(fmt::format(
        "cannot write the lock file {}: {}\nHINT: check that job.run_dir is writable and the "
        "disk is not full",
        path, error_text(errno)));
  }
}

}  // namespace

std::string RunLockHolder::describe() const {
  return fmt::format("host {}, pid {}, started {}", host.empty() ? "unknown" : host,
                     pid > 0 ? std::to_string(pid) : "unknown",
                     started.empty() ? "unknown" : started);
}

std::string RunLockHolder::to_text() const {
  return fmt::format("host: {}\npid: {}\nstarted: {}\n", host, pid, started);
}

RunLockHolder RunLockHolder::from_text(const std::string& text) {
  RunLockHolder holder;
  bool seen_host = false, seen_pid = false, seen_started = false;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    const size_t colon = line.find(": ");
    if (colon == std::string::npos) continue;
    const std::string key = line.substr(0, colon), value = line.substr(colon + 2);
    if (key == "host" && !seen_host) {
      holder.host = value;
      seen_host = true;
    } else if (key == "pid" && !seen_pid) {
      holder.pid = std::strtol(value.c_str(), nullptr, 10);
      seen_pid = true;
    } else if (key == "started" && !seen_started) {
      holder.started = value;
      seen_started = true;
    }
  }
  return holder;
}

RunLockHolder RunLockHolder::current() {
  RunLockHolder holder;
  char host[256] = {};
  if (::gethostname(host, sizeof host - 1) == 0) holder.host = host;
  holder.pid = static_cast<long>(::getpid());
  const std::time_t now = std::time(nullptr);
  std::tm utc{};
  ::gmtime_r(&now, &utc);
  char started[32];
  std::strftime(started, sizeof started, "%Y-%m-%dT%H:%M:%SZ", &utc);
  holder.started = started;
  return holder;
}

RunLock::RunLock(const std::string& run_dir)
    : path_((std::filesystem::path(run_dir) / kRunLockFileName).string()) {
  fd_ = ::open(path_.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) {
    throw IoError(
        fmt::format("cannot open the lock file {}: {}\nHINT: check that job.run_dir is writable",
                    path_, error_text(errno)));
  }
  int result;
  do {
    result = ::flock(fd_, LOCK_EX | LOCK_NB);
  } while (result != 0 && errno == EINTR);
  const int error = result == 0 ? 0 : errno;
  if (error == EWOULDBLOCK) {
    // The holder writes its record right after taking the lock: give it a moment.
    std::string text = read_all(fd_);
    for (int i = 0; i < 20 && RunLockHolder::from_text(text).empty(); ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      text = read_all(fd_);
    }
    ::close(fd_);
    fd_ = -1;
    RunLockHolder holder = RunLockHolder::from_text(text);
    const std::string message = fmt::format(
        "run directory {} is in use by another job: {} (it holds {})\nHINT: wait for that job to "
        "end (or stop it), or give this job another job.run_dir (--set job.run_dir=...)",
        run_dir, holder.describe(), path_);
    throw RunDirInUseError(message, std::move(holder));
  }
  if (error != 0 && !locks_unsupported(error)) {
    ::close(fd_);
    fd_ = -1;
    throw IoError(fmt::format(
        "cannot lock {}: {}\nHINT: check that job.run_dir is on a filesystem with file locks "
        "(a local filesystem, NFSv4, Lustre mounted with -o flock)",
        path_, error_text(error)));
  }
  locked_ = error == 0;
  previous_ = RunLockHolder::from_text(read_all(fd_));
  if (!locked_) {
    warning_ = fmt::format(
        "run directory {} is not locked: its filesystem does not support file locks (flock: "
        "{}), so another job started on the same job.run_dir would not be refused{}; keep "
        "job.run_dir on a local, NFSv4 or Lustre (-o flock) filesystem to have it locked",
        run_dir, error_text(error),
        previous_.empty() ? ""
                          : fmt::format(" (the lock file names {}, which may still be running)",
                                        previous_.describe()));
  }
  try {
    write_all(fd_, RunLockHolder::current().to_text(), path_);
  } catch (...) {
    ::close(fd_);
    fd_ = -1;
    throw;
  }
}

RunLock::~RunLock() {
  if (fd_ < 0) return;
  // Emptied while still held: a record left in the file means a holder that never released it.
  if (locked_ && ::ftruncate(fd_, 0) != 0) {
    // Nothing to do: the lock goes with the descriptor all the same.
  }
  ::close(fd_);
}

}  // namespace strata
