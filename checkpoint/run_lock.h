// One job per run directory: an exclusive lock on <run_dir>/.strata.lock, taken by the main
// rank of `strata train` before it writes into the run directory and held for the job's life.
//
// Mechanism: flock(LOCK_EX | LOCK_NB) on a descriptor kept open until the RunLock is
// destroyed. The kernel drops the lock when the process ends in any way (SIGKILL included), so
// no stale lock is ever left behind: a lock that can be taken belongs to nobody alive. Once
// taken, the file records the holder (host, pid, start time in ISO-8601 UTC); a second job
// reads it and fails at once naming that holder. On release the file is emptied, not removed
// (removing it would let two jobs lock two different inodes of the same name), so a file that
// still names a holder when the lock is taken was left by a job that ended without releasing it
// (killed, or its node died).
//
// Filesystems assumed: a local filesystem; NFSv4 (and NFSv3 with the NLM lock manager), where
// Linux emulates flock with whole-file POSIX byte-range locks that the server arbitrates between
// clients and drops when a client's lease expires; Lustre mounted with `-o flock`. Where locks
// are not shared between nodes (Lustre `-o localflock`, NFS mounted `nolock`), jobs on
// different nodes are not kept apart. Where the filesystem refuses locks outright (flock fails
// with ENOLCK, EOPNOTSUPP or ENOSYS, e.g. Lustre without a flock mount option), the run goes on
// unlocked and warning() says so. No LibTorch here.
#pragma once

#include <string>
#include <utility>

#include "checkpoint/errors.h"

namespace strata {

// The lock file's name inside the run directory.
inline constexpr const char* kRunLockFileName = ".strata.lock";

// Who holds (or last held) a run directory's lock, as the lock file records it.
struct RunLockHolder {
  std::string host;
  long pid = 0;
  std::string started;  // ISO-8601 UTC, e.g. 2025-01-31T12:00:00Z

  bool empty() const { return host.empty() && pid == 0 && started.empty(); }
  // "host h, pid 123, started 2025-01-31T12:00:00Z" (fields the file lacks are "unknown").
  std::string describe() const;
  // The lock file's text: one "key: value" line per field.
  std::string to_text() const;
  // Reads what to_text() wrote; the first line of each key wins, other lines are ignored.
  static RunLockHolder from_text(const std::string& text);
  // This process: its host name, pid and the current time.
  static RunLockHolder current();
};

// Another job holds the run directory's lock.
class RunDirInUseError : public CheckpointError {
 public:
  RunDirInUseError(const std::string& message, RunLockHolder holder)
      : CheckpointError(message), holder(std::move(holder)) {}
  RunLockHolder holder;
};

class RunLock {
 public:
  // Takes the lock on `run_dir` (an existing directory) without waiting, and records this
  // process as the holder. Throws RunDirInUseError naming the holder when another process holds
  // it, IoError when the lock file cannot be opened or written.
  explicit RunLock(const std::string& run_dir);
  // Releases: empties the lock file and closes it (which drops the lock).
  ~RunLock();
  RunLock(const RunLock&) = delete;
  RunLock& operator=(const RunLock&) = delete;

  const std::string& path() const { return path_; }
  // False when the filesystem does not support locks: the run goes on unlocked.
  bool locked() const { return locked_; }
  // Why the run goes on unlocked ("" when locked).
  const std::string& warning() const { return warning_; }
  // The holder the file still named when the lock was taken: a job that ended without releasing
  // it. Empty after a clean release or for a new file.
  const RunLockHolder& previous() const { return previous_; }

 private:
  std::string path_;
  int fd_ = -1;
  bool locked_ = false;
  std::string warning_;
  RunLockHolder previous_;
};

}  // namespace strata
