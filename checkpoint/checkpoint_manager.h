// CheckpointManager: the collective save protocol (write -> agree -> commit), async saves,
// retention, and finding committed checkpoints. What to save is the caller's business: it
// hands over this rank's TensorPieces and the small JSON/YAML documents that go beside them.
//
// Commit protocol for step N (docs/architecture.md "Checkpoint commit protocol"): rank 0 creates
// `step-N.incomplete/`; every rank writes and fsyncs rank-<r>.safetensors there; all reports are
// gathered; only if every rank succeeded does rank 0 write metadata.json, train_state.json and
// config.yaml, rename the directory to `step-N/`, fsync the folder and replace `latest` (temp +
// rename). Any failure raises the same CheckpointError on every rank and leaves `latest` as it was.
// HF exports
// (`hf-N/`, pointer `hf-latest`, a relative symlink) go through the same protocol.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "checkpoint/device_copy.h"
#include "checkpoint/sharded_checkpoint.h"
#include "parallel/communicator.h"

namespace strata {

struct CheckpointOptions {
  std::string folder;         // absolute, or relative to the working directory
  bool async = false;         // stage and write in a background thread
  int64_t keep_latest_k = 0;  // committed step dirs to keep (0: all)
  int64_t hf_max_keep = 0;    // committed hf-* exports to keep (0: all)
  // Test hook: runs on each rank before it writes its files of a save or export at `step` (on
  // the writer thread for async saves); tests inject failures (throw) and slowness (sleep)
  // through it. Empty in production.
  std::function<void(int rank, int64_t step)> before_write;
};

// When maybe_save saves (torchtitan's checkpointer.save(step, last_step) policy): every
// `interval` steps, at the last step, and at a stop signal (always a full checkpoint), plus
// HF exports every `hf_export_interval` steps and at the last step.
struct SavePolicy {
  bool enable = true;
  int64_t interval = 0;              // 0: no interval saves
  bool model_only = false;           // interval saves hold weights only
  bool last_save_model_only = true;  // the last step's save holds weights only
  bool last_save_in_hf = false;      // HF export at the last step
  int64_t hf_export_interval = 0;    // 0: HF exports only at the last step (if last_save_in_hf)
};

// A directory series in the folder: committed directories are "<prefix>-NNNNNNN" (the rename
// is the commit), in flight "<prefix>-NNNNNNN.incomplete"; `pointer` names the newest.
struct DirectorySeries {
  std::string prefix;   // "step" | "hf"
  std::string pointer;  // "latest" (a text file) | "hf-latest" (a relative symlink)
  bool symlink = false;
  std::string what;  // "checkpoint save" | "HF export", for messages
};
const DirectorySeries& checkpoint_series();
const DirectorySeries& hf_series();

// A directory the manager commits besides checkpoints (the HF export): what each rank writes
// and what rank 0 adds once all succeeded.
struct CommitJob {
  int64_t step = 0;
  // This rank's files, written into `dir`; returns the rank's report, which must hold "size"
  // (bytes written). Runs on the writer thread for async saves, so it must not touch live
  // training state or call collectives.
  std::function<nlohmann::json(const std::string& dir)> write_rank;
  // Rank 0, after every rank succeeded: the shared files of the directory.
  std::function<void(const std::string& dir, const std::vector<nlohmann::json>& reports)> finalize;
};

struct SaveRequest {
  int64_t step = 0;
  bool model_only = false;
  std::vector<TensorPiece> pieces;  // every rank lists the same keys in the same order
  nlohmann::json metadata;          // merged into metadata.json (model config, ...)
  nlohmann::json train_state;       // train_state.json
  std::string config_yaml;          // config.yaml
};

// What maybe_save saves: the trainer builds the request for a step (this rank's pieces and the
// documents), or the HF export's CommitJob.
class Checkpointable {
 public:
  virtual ~Checkpointable() = default;
  virtual SaveRequest save_request(int64_t step, bool model_only) = 0;
  virtual CommitJob export_job(int64_t step) = 0;
  // Called whenever this rank's background writer may have started or finished (after each
  // save or export, and after a commit at the step boundary).
  virtual void on_writer_change() {}
};

// "step-0000100"
std::string step_dir_name(int64_t step);

// The step directory `path` designates: a step dir itself (has metadata.json), or a folder's
// checkpoint named by `step` or else by `latest` (the newest committed step-* dir when there is
// no pointer). nullopt when `path` is a folder without any step directory. Throws
// CheckpointError when `step` is given and absent, when `path` does not exist, when `latest`
// names anything but a committed step directory of the folder, and when a step directory lacks
// metadata.json (a run resuming from the folder would later write over it): nothing falls
// back silently.
std::optional<std::string> find_checkpoint(const std::string& path,
                                           std::optional<int64_t> step = std::nullopt);

// The "step-N" directories of `folder` without metadata.json (damaged: a commit renames only
// complete directories).
std::vector<std::string> uncommitted_step_dirs(const std::string& folder);

class CheckpointManager {
 public:
  using Log = std::function<void(const std::string&)>;
  CheckpointManager(CheckpointOptions options, Communicator& comm, Log log);
  ~CheckpointManager();  // waits for background work; an uncommitted save stays .incomplete
  CheckpointManager(const CheckpointManager&) = delete;
  CheckpointManager& operator=(const CheckpointManager&) = delete;

  // Collective. Sync: returns once step N is committed. Async: waits for (and commits) a save
  // still in flight, starts the background thread and returns; that thread copies the pieces
  // into reusable staging buffers (allocated once), then writes them. `poll` or `finish`
  // commit it. Until `wait_until_staged` returns, the caller must not modify the saved
  // tensors (reading them, e.g. forward and backward, is fine).
  // Pieces on a CUDA device: the staging buffers are pinned host memory, and save() only
  // enqueues the device-to-host copies on a side stream (behind the work already queued on
  // the current stream) before it returns; the writer waits for them on the host, and
  // wait_until_staged orders the current stream's later work after them without blocking the
  // host. Sync saves copy device pieces to the host and write them.
  void save(SaveRequest request);
  // The same protocol for an HF export (series hf): sync or async as configured.
  void export_hf(CommitJob job);
  // Async: allocates (and touches) the staging buffers for pieces of this layout now, so that
  // the first save does not pay for fresh memory while training waits.
  void reserve_staging(const std::vector<TensorPiece>& pieces);
  // Blocks until the save in flight no longer reads the live tensors. Call before modifying
  // them (the optimizer step), on the thread (CUDA: the current stream) that modifies them.
  // Cheap when there is nothing to wait for; for CUDA pieces it does not block the host: the
  // current stream waits for the copies on the device.
  void wait_until_staged();

  // Collective, cheap (one small all-reduce when a save is in flight, nothing otherwise):
  // commits the save in flight when every rank's write has finished; surfaces its error.
  // `stop_requested` is this rank's stop flag; returns true when any rank's flag is set.
  bool poll(bool stop_requested);
  // Collective: waits for the save in flight and commits it.
  void finish();

  // Collective, at every step boundary: commits a finished background save, agrees on stop
  // signals (`stop_requested`: this rank's flag, `signal`: its name for the log) and saves
  // what `policy` asks for at `step` from `source`. Returns true when the run must stop: a
  // stop signal arrived on some rank before the last step (a full checkpoint was saved).
  bool maybe_save(int64_t step, bool last_step, bool stop_requested, const std::string& signal,
                  const SavePolicy& policy, Checkpointable& source);

  // This rank's background thread is still staging or writing.
  bool writing() const { return in_flight_ && !in_flight_->done; }

 private:
  struct InFlight {
    const DirectorySeries* series = nullptr;
    SaveRequest request;  // checkpoint saves: the pieces and documents
    CommitJob job;        // every save: the rank's writer and rank 0's finalizer
    std::string incomplete_dir;
    std::thread writer;
    std::atomic<bool> staged{false};  // the pieces are in the staging buffers (or, for CUDA
                                      // pieces, the copies there are enqueued)
    std::unique_ptr<DeviceToHostCopies> copies;  // CUDA pieces: the copies in flight
    bool copies_ordered = false;  // the current stream waits for `copies` (wait_until_staged)
    std::atomic<bool> done{false};
    nlohmann::json report;  // written by the writer before `done`
    std::chrono::steady_clock::time_point started;
    double stall_seconds = 0.0;          // foreground time in all: the parts below and the rest
    double previous_wait_seconds = 0.0;  // waiting for the previous save to commit
    double staging_wait_seconds = 0.0;   // wait_until_staged
  };
  void start(std::unique_ptr<InFlight> save, std::chrono::steady_clock::time_point started,
             double previous_wait);
  void prepare(InFlight& save);
  void stage(InFlight& save);
  void write(InFlight& save);
  void commit(InFlight& save);
  void start_purge(const DirectorySeries& series, int64_t keep, int64_t committed_step);

  CheckpointOptions options_;
  Communicator& comm_;
  Log log_;
  std::unique_ptr<InFlight> in_flight_;
  std::vector<at::Tensor> staging_;   // async: reused while the piece layout stays the same
  std::vector<bool> staging_pinned_;  // which of them are pinned (for pieces on a GPU)
  std::mutex staged_mutex_;
  std::condition_variable staged_cv_;
  std::thread purge_;
};

// Removes committed dirs of `series` beyond the newest `keep` (never the one its pointer
// names; each is renamed to `.purging` first, so a purge cut short leaves no damaged step
// directory) and every `.incomplete`, `.replaced` or `.purging` dir of the series below step
// `stale_below` (a later save may be writing its own). Returns the names removed.
std::vector<std::string> purge_checkpoints(const std::string& folder, int64_t keep,
                                           int64_t stale_below,
                                           const DirectorySeries& series = checkpoint_series());

// A human-readable listing of a step directory: metadata summary and every tensor.
std::string describe_checkpoint(const CheckpointReader& reader);

}  // namespace strata
