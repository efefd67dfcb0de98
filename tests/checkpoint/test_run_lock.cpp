// The run directory lock: taken and recorded, refused to a second process with the holder
// named, free again once its holder is killed with SIGKILL, emptied on release, and a dead
// holder's record overwritten.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <regex>
#include <sstream>
#include <string>

#include "checkpoint/run_lock.h"
#include "tests/common/temp_dir.h"

namespace strata {
namespace {

using testing::TempDir;

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string lock_path(const TempDir& dir) {
  return dir / kRunLockFileName;
}

// Everything the other end of `fd` writes until it closes it.
std::string read_pipe(int fd) {
  std::string text;
  char buffer[512];
  for (ssize_t n; (n = ::read(fd, buffer, sizeof buffer)) > 0;) text.append(buffer, n);
  return text;
}

// The exit code of child `pid` (-1 when it did not exit normally).
int wait_exit_code(pid_t pid) {
  int status = 0;
  if (::waitpid(pid, &status, 0) != pid || !WIFEXITED(status)) return -1;
  return WEXITSTATUS(status);
}

TEST(RunLock, TakesTheLockAndRecordsTheHolder) {
  TempDir dir;
  const RunLock lock(dir.path().string());
  EXPECT_TRUE(lock.locked());
  EXPECT_EQ(lock.warning(), "");
  EXPECT_TRUE(lock.previous().empty());
  EXPECT_EQ(lock.path(), lock_path(dir));
  const RunLockHolder recorded = RunLockHolder::from_text(read_text(lock.path()));
  const RunLockHolder me = RunLockHolder::current();
  EXPECT_EQ(recorded.host, me.host);
  EXPECT_FALSE(recorded.host.empty());
  EXPECT_EQ(recorded.pid, static_cast<long>(::getpid()));
  EXPECT_TRUE(std::regex_match(recorded.started, std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")))
      << recorded.started;
  // flock locks belong to an open file: a second lock in the same process is refused too.
  EXPECT_THROW(RunLock again(dir.path().string()), RunDirInUseError);
}

TEST(RunLock, ASecondProcessIsRefusedWithTheHolderNamed) {
  TempDir dir;
  const RunLock lock(dir.path().string());
  int out[2];
  ASSERT_EQ(::pipe(out), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(out[0]);
    int code = 2;  // 2: the lock was taken
    std::string report;
    try {
      RunLock second(dir.path().string());
    } catch (const RunDirInUseError& e) {
      report = std::to_string(e.holder.pid) + "\n" + e.what();
      code = 0;
    } catch (const std::exception& e) {
      report = e.what();
      code = 3;
    }
    if (::write(out[1], report.data(), report.size()) < 0) code = 4;
    ::_exit(code);
  }
  ::close(out[1]);
  const std::string report = read_pipe(out[0]);
  ::close(out[0]);
  ASSERT_EQ(wait_exit_code(child), 0) << report;
  const RunLockHolder me = RunLockHolder::current();
  EXPECT_EQ(report.substr(0, report.find('\n')), std::to_string(::getpid()));
  const std::string message = report.substr(report.find('\n') + 1);
  EXPECT_NE(message.find("is in use by another job: host " + me.host + ", pid " +
                         std::to_string(::getpid()) + ", started "),
            std::string::npos)
      << message;
  EXPECT_NE(message.find(lock_path(dir)), std::string::npos) << message;
  EXPECT_NE(message.find("\nHINT: wait for that job to end"), std::string::npos) << message;
  EXPECT_NE(message.find("another job.run_dir"), std::string::npos) << message;
  // The refused process left the holder's record alone.
  EXPECT_EQ(RunLockHolder::from_text(read_text(lock_path(dir))).pid, ::getpid());
}

TEST(RunLock, AHolderKilledWithSigkillLeavesNoStaleLock) {
  TempDir dir;
  int ready[2];
  ASSERT_EQ(::pipe(ready), 0);
  const pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    ::close(ready[0]);
    try {
      RunLock held(dir.path().string());
      if (::write(ready[1], "L", 1) != 1) ::_exit(3);
      for (;;) ::pause();
    } catch (...) {
      ::_exit(2);
    }
  }
  ::close(ready[1]);
  char signal_byte = 0;
  const bool locked = ::read(ready[0], &signal_byte, 1) == 1;
  ::close(ready[0]);
  if (!locked) {
    ::kill(child, SIGKILL);
    ::waitpid(child, nullptr, 0);
    FAIL() << "the child did not take the lock";
  }
  try {
    RunLock refused(dir.path().string());
    ADD_FAILURE() << "the lock of a live holder was taken";
  } catch (const RunDirInUseError& e) {
    EXPECT_EQ(e.holder.pid, static_cast<long>(child));
  }
  ASSERT_EQ(::kill(child, SIGKILL), 0);
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);

  const RunLock next(dir.path().string());
  EXPECT_TRUE(next.locked());
  // The killed holder never released it: its record was still there, and is now replaced.
  EXPECT_EQ(next.previous().pid, static_cast<long>(child));
  EXPECT_EQ(RunLockHolder::from_text(read_text(next.path())).pid, ::getpid());
}

TEST(RunLock, ReleaseEmptiesTheFileAndLetsTheNextJobIn) {
  TempDir dir;
  { const RunLock first(dir.path().string()); }
  ASSERT_TRUE(std::filesystem::exists(lock_path(dir)));
  EXPECT_EQ(std::filesystem::file_size(lock_path(dir)), 0u);
  const RunLock second(dir.path().string());
  EXPECT_TRUE(second.previous().empty());
  EXPECT_EQ(RunLockHolder::from_text(read_text(second.path())).pid, ::getpid());
}

TEST(RunLock, ADeadHoldersRecordIsOverwritten) {
  TempDir dir;
  {
    std::ofstream old(lock_path(dir));
    old << "host: ghost-node-with-a-rather-long-name.example.org\npid: 999999\n"
           "started: 2001-02-03T04:05:06Z\nleftover: a longer record than the new one\n";
  }
  const RunLock lock(dir.path().string());
  EXPECT_EQ(lock.previous().host, "ghost-node-with-a-rather-long-name.example.org");
  EXPECT_EQ(lock.previous().pid, 999999);
  EXPECT_EQ(lock.previous().started, "2001-02-03T04:05:06Z");
  const std::string text = read_text(lock.path());
  EXPECT_EQ(text.find("ghost"), std::string::npos) << text;
  EXPECT_EQ(text.find("leftover"), std::string::npos) << text;
  const RunLockHolder recorded = RunLockHolder::from_text(text);
  EXPECT_EQ(recorded.pid, ::getpid());
  EXPECT_EQ(recorded.host, RunLockHolder::current().host);
}

TEST(RunLock, HolderTextKeepsTheFirstLineOfEachKey) {
  const RunLockHolder holder = RunLockHolder::from_text(
      "host: a\npid: 12\nstarted: 2025-01-01T00:00:00Z\nhost: b\npid: 34\nstar");
  EXPECT_EQ(holder.host, "a");
  EXPECT_EQ(holder.pid, 12);
  EXPECT_EQ(holder.started, "2025-01-01T00:00:00Z");
  EXPECT_EQ(RunLockHolder::from_text(holder.to_text()).describe(), holder.describe());
  EXPECT_TRUE(RunLockHolder::from_text("").empty());
  EXPECT_EQ(RunLockHolder{}.describe(), "host unknown, pid unknown, started unknown");
}

TEST(RunLock, AMissingRunDirIsAnIoErrorWithAHint) {
  TempDir dir;
  try {
    RunLock lock(dir / "missing");
    FAIL() << "locked a directory that does not exist";
  } catch (const IoError& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find((dir.path() / "missing" / kRunLockFileName).string()), std::string::npos)
        << message;
    EXPECT_NE(message.find("\nHINT: "), std::string::npos) << message;
  }
}

}  // namespace
}  // namespace strata
