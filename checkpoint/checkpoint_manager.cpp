// CheckpointManager: save protocol, async writer, retention, checkpoint discovery.
#include "checkpoint/checkpoint_manager.h"

#include <ATen/ATen.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>

#include "checkpoint/checkpoint_metadata.h"
#include "checkpoint/file_io.h"

namespace strata {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

// Committed directories "<prefix>-<digits>" of `folder` (with `marker` inside when given), by
// step.
std::vector<std::pair<int64_t, std::string>> committed_steps(
    const fs::path& folder, const std::string& prefix = "step",
    const std::string& marker = "metadata.json") {
  const std::regex pattern(prefix + "-([0-9]{1,18})");
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(folder, ec)) {
    const std::string name = entry.path().filename().string();
    std::smatch m;
    if (std::regex_match(name, m, pattern) && entry.is_directory() &&
        (marker.empty() || fs::exists(entry.path() / marker))) {
      out.emplace_back(std::stoll(m[1]), name);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The directory a series' pointer names ("" when none).
std::string read_pointer(const fs::path& folder, const DirectorySeries& series) {
  std::error_code ec;
  if (series.symlink) return fs::read_symlink(folder / series.pointer, ec).filename().string();
  std::ifstream in(folder / series.pointer);
  std::string name;
  if (in) std::getline(in, name);
  while (!name.empty() && std::isspace(static_cast<unsigned char>(name.back()))) name.pop_back();
  return name;
}

std::vector<std::string> step_numbers(const std::vector<std::pair<int64_t, std::string>>& steps) {
  std::vector<std::string> out;
  for (const auto& s : steps) out.push_back(std::to_string(s.first));
  return out;
}

void write_durable(const fs::path& path, const std::string& content) {
  HashingFileWriter out(path.string());
  out.write(content.data(), content.size());
  out.finish();
}

}  // namespace

std::string step_dir_name(int64_t step) {
  if (step < 0) throw std::logic_error(fmt::format("step_dir_name: negative step {}", step));
  return fmt::format("step-{:07d}", step);
}

const DirectorySeries& checkpoint_series() {
  static const DirectorySeries series{"step", "latest", false, "checkpoint save"};
  return series;
}

const DirectorySeries& hf_series() {
  static const DirectorySeries series{"hf", "hf-latest", true, "HF export"};
  return series;
}

namespace {
std::string dir_name(const DirectorySeries& series, int64_t step) {
  return fmt::format("{}-{:07d}", series.prefix, step);
}
}  // namespace

std::optional<std::string> find_checkpoint(const std::string& path, std::optional<int64_t> step) {
  const fs::path root(path);
  if (!fs::exists(root)) {
    throw CheckpointError(
        fmt::format("checkpoint path {} does not exist\nHINT: give a Strata "
                    "checkpoint folder or one of its step-NNNNNNN directories",
                    path));
  }
  if (fs::exists(root / "metadata.json")) return root.string();
  const auto steps = committed_steps(root);
  const std::vector<std::string> damaged = uncommitted_step_dirs(path);
  const std::string committed =
      steps.empty() ? std::string("none") : fmt::format("{}", fmt::join(step_numbers(steps), ", "));
  if (!damaged.empty()) {
    throw CheckpointError(fmt::format(
        "{} holds {}, a step directory without metadata.json: not a committed checkpoint "
        "(damaged, or not written by Strata); Strata neither resumes from it nor writes over "
        "it\nHINT: move it out of the folder and relaunch (committed steps: {})",
        path, fmt::join(damaged, ", "), committed));
  }
  if (step) {
    const fs::path dir = root / step_dir_name(*step);
    if (fs::exists(dir / "metadata.json")) return dir.string();
    throw CheckpointError(
        fmt::format("{} has no committed checkpoint for step {} (committed steps: "
                    "{})\nHINT: set checkpoint.load_step to one of them, or "
                    "remove it to load the latest",
                    path, *step, committed));
  }
  const std::string latest = read_pointer(root, checkpoint_series());
  if (latest.empty()) {
    if (steps.empty()) return std::nullopt;
    return (root / steps.back().second).string();
  }
  if (step_of_dir_name(latest) < 0) {
    throw CheckpointError(fmt::format(
        "{}/{} names '{}', which is not a step directory of that folder (step-NNNNNNN)\nHINT: "
        "the pointer is damaged; set checkpoint.load_step to a committed step ({}), or write "
        "the newest one's name into it",
        path, checkpoint_series().pointer, latest, committed));
  }
  if (!fs::exists(root / latest / "metadata.json")) {
    throw CheckpointError(fmt::format(
        "{}/{} names {}, which is not a committed checkpoint (it does not exist)\nHINT: set "
        "checkpoint.load_step to a committed step ({}), or write its name into {}",
        path, checkpoint_series().pointer, latest, committed, checkpoint_series().pointer));
  }
  return (root / latest).string();
}

std::vector<std::string> uncommitted_step_dirs(const std::string& folder) {
  const auto all = committed_steps(folder, "step", "");
  const auto committed = committed_steps(folder);
  std::vector<std::string> out;
  for (const auto& entry : all) {
    if (std::find(committed.begin(), committed.end(), entry) == committed.end())
      out.push_back(entry.second);
  }
  return out;
}

CheckpointManager::CheckpointManager(CheckpointOptions options, Communicator& comm, Log log)
    : options_(std::move(options)), comm_(comm), log_(std::move(log)) {}

CheckpointManager::~CheckpointManager() {
  if (in_flight_ && in_flight_->writer.joinable()) in_flight_->writer.join();
  if (purge_.joinable()) purge_.join();
}

void CheckpointManager::prepare(InFlight& save) {
  save.incomplete_dir =
      (fs::path(options_.folder) / (dir_name(*save.series, save.job.step) + ".incomplete"))
          .string();
  run_on_all_ranks<CheckpointError>(
      comm_, fmt::format("{} at step {}", save.series->what, save.job.step), [&] {
        if (comm_.rank() != 0) return;
        std::error_code ec;
        fs::create_directories(options_.folder, ec);
        if (ec) {
          throw IoError(
              fmt::format("cannot create checkpoint folder {}: {}\nHINT: set "
                          "checkpoint.folder to a writable directory",
                          options_.folder, ec.message()));
        }
        fs::remove_all(save.incomplete_dir, ec);  // left by a crash at this step
        if (!fs::create_directory(save.incomplete_dir, ec) || ec) {
          throw IoError(fmt::format("cannot create {}: {}", save.incomplete_dir,
                                    ec ? ec.message() : "it already exists"));
        }
      });
}

void CheckpointManager::write(InFlight& save) {
  try {
    if (save.copies) save.copies->copies_done();  // CUDA pieces: on the host now
    if (options_.before_write) options_.before_write(comm_.rank(), save.job.step);
    save.report = save.job.write_rank(save.incomplete_dir);
    save.report["ok"] = true;
  } catch (const std::exception& e) {
    save.report = {{"ok", false}, {"error", e.what()}};
  }
  save.done = true;
}

void CheckpointManager::commit(InFlight& save) {
  const auto start = Clock::now();
  if (save.writer.joinable()) save.writer.join();
  const DirectorySeries& series = *save.series;
  const int64_t step = save.job.step;
  const std::vector<std::string> texts = comm_.all_gather_strings(save.report.dump());
  std::vector<json> reports;
  for (const std::string& text : texts) reports.push_back(json::parse(text));
  const std::string keep_hint = fmt::format(
      "\nHINT: the previous {} is still the newest ({}); fix the cause (disk space, "
      "permissions) and relaunch to resume",
      series.prefix == "hf" ? "export" : "checkpoint", series.pointer);
  for (size_t r = 0; r < reports.size(); ++r) {
    if (reports[r].at("ok").get<bool>()) continue;
    if (comm_.rank() == 0) {
      std::error_code ec;
      fs::remove_all(save.incomplete_dir, ec);
    }
    throw CheckpointError(fmt::format("{} at step {} failed on rank {}: {}{}", series.what, step, r,
                                      reports[r].at("error").get<std::string>(), keep_hint));
  }
  const fs::path folder(options_.folder);
  const fs::path final_dir = folder / dir_name(series, step);
  uint64_t bytes = 0;
  for (const json& report : reports) bytes += report.at("size").get<uint64_t>();
  std::string error;
  if (comm_.rank() == 0) {
    try {
      const fs::path dir(save.incomplete_dir);
      save.job.finalize(dir.string(), reports);
      fsync_directory(dir.string());
      // A committed directory of the same step (an earlier timeline, after resuming from an
      // older step) is replaced, saying so; anything else there is never written over.
      const fs::path replaced = folder / (dir_name(series, step) + ".replaced");
      std::error_code ec;
      if (fs::exists(final_dir)) {
        if (&series == &checkpoint_series() && !fs::exists(final_dir / "metadata.json")) {
          throw CheckpointError(fmt::format(
              "{} exists but is not a committed checkpoint (no metadata.json); Strata does not "
              "write over it\nHINT: move it out of {}",
              final_dir.string(), folder.string()));
        }
        log_(fmt::format("checkpoint: {} replaces the committed {} of an earlier run",
                         dir_name(series, step), final_dir.string()));
        fs::remove_all(replaced, ec);
        rename_durable(final_dir.string(), replaced.string());
      }
      rename_durable(dir.string(), final_dir.string());
      fs::remove_all(replaced, ec);
      if (series.symlink) {  // relative, replaced by rename
        const fs::path temp = folder / (series.pointer + ".tmp");
        fs::remove(temp, ec);
        fs::create_directory_symlink(final_dir.filename(), temp);
        rename_durable(temp.string(), (folder / series.pointer).string());
      } else {
        write_file_atomic((folder / series.pointer).string(), dir_name(series, step) + "\n");
      }
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  error = comm_.broadcast_string(error, 0);
  if (!error.empty()) {
    throw CheckpointError(fmt::format("{} commit at step {} failed on rank 0: {}{}", series.what,
                                      step, error, keep_hint));
  }
  const double seconds = seconds_since(save.started);
  log_(fmt::format(
      "{}: committed {} ({}{:.1f} MB on {} rank(s), {:.2f} s{}, commit {:.3f} s)",
      series.prefix == "hf" ? "hf export" : "checkpoint", final_dir.string(),
      save.request.model_only ? "model only, " : "", bytes / 1e6, reports.size(), seconds,
      options_.async
          ? fmt::format(", foreground {:.3f} s: previous save {:.3f} s, "
                        "staging wait {:.3f} s",
                        save.stall_seconds, save.previous_wait_seconds, save.staging_wait_seconds)
          : "",
      seconds_since(start)));
  start_purge(series, series.prefix == "hf" ? options_.hf_max_keep : options_.keep_latest_k, step);
}

bool CheckpointManager::maybe_save(int64_t step, bool last_step, bool stop_requested,
                                   const std::string& signal, const SavePolicy& policy,
                                   Checkpointable& source) {
  const bool stop = poll(stop_requested);
  source.on_writer_change();  // a background save may have just finished
  auto save_at = [&](bool model_only) {
    save(source.save_request(step, model_only));
    source.on_writer_change();
  };
  auto export_at = [&] {
    export_hf(source.export_job(step));
    source.on_writer_change();
  };
  const bool export_due = policy.hf_export_interval > 0 && step % policy.hf_export_interval == 0;
  if (last_step) {
    if (policy.enable) save_at(policy.last_save_model_only);
    if (policy.enable && (policy.last_save_in_hf || export_due)) export_at();
    return false;
  }
  if (stop) {
    log_(fmt::format("stop: {} received; {}",
                     signal.empty() ? "a stop signal on another rank" : signal,
                     policy.enable ? fmt::format("saving a full checkpoint at step {}", step)
                                   : std::string("checkpoint.enable is false, nothing is saved")));
    if (policy.enable) save_at(/*model_only=*/false);
    return true;
  }
  if (policy.enable && policy.interval > 0 && step % policy.interval == 0)
    save_at(policy.model_only);
  if (policy.enable && export_due) export_at();
  return false;
}

void CheckpointManager::start_purge(const DirectorySeries& series, int64_t keep,
                                    int64_t committed_step) {
  if (comm_.rank() != 0) return;
  if (purge_.joinable()) purge_.join();
  purge_ = std::thread([folder = options_.folder, keep, log = log_, committed_step, &series] {
    try {
      const std::vector<std::string> removed =
          purge_checkpoints(folder, keep, committed_step, series);
      if (!removed.empty()) {
        log(fmt::format("checkpoint: removed {} ({} {})", fmt::join(removed, ", "),
                        series.prefix == "hf" ? "hf_max_keep" : "keep_latest_k", keep));
      }
    } catch (const std::exception& e) {
      log(fmt::format("checkpoint: warning: cleaning up {} failed: {}", folder, e.what()));
    }
  });
}

// Copies every piece into its staging buffer (allocated on first use, reused while the piece
// layout stays the same) and points the piece at it. CPU pieces are copied with memcpy, which
// is safe on a background thread; CUDA pieces go to pinned host memory on a side stream: this
// only enqueues those copies (`save.copies`), which write() waits for.
void CheckpointManager::stage(InFlight& save) {
  std::vector<TensorPiece>& pieces = save.request.pieces;
  for (size_t i = 0; i < pieces.size(); ++i) {
    at::Tensor& buffer = staging_[i];
    const at::Tensor source = pieces[i].local.detach();
    if (source.device().is_cpu() && source.is_contiguous()) {
      if (source.nbytes() > 0) std::memcpy(buffer.data_ptr(), source.data_ptr(), source.nbytes());
    } else if (source.device().is_cpu()) {
      buffer.copy_(source.reshape({-1}));
    } else {
      if (!save.copies) save.copies = std::make_unique<DeviceToHostCopies>();
      save.copies->copy(source, buffer);
    }
    pieces[i].local = buffer;
  }
  if (save.copies) save.copies->record();
  {
    std::lock_guard<std::mutex> lock(staged_mutex_);
    save.staged = true;
  }
  staged_cv_.notify_all();
}

void CheckpointManager::save(SaveRequest request) {
  const auto began = Clock::now();
  finish();  // one save in flight at a time
  auto save = std::make_unique<InFlight>();
  save->series = &checkpoint_series();
  save->request = std::move(request);
  save->job.step = save->request.step;
  InFlight* raw = save.get();
  // A background save hashes on its own thread: it should take one core, not two.
  save->job.write_rank = [this, raw](const std::string& dir) {
    return write_rank_file(dir, comm_.rank(), raw->request.pieces, /*hash_thread=*/!options_.async);
  };
  save->job.finalize = [raw](const std::string& dir, const std::vector<json>& reports) {
    json extra = raw->request.metadata;
    extra["step"] = raw->request.step;
    extra["model_only"] = raw->request.model_only;
    const json meta = build_metadata(reports, raw->request.pieces, extra);
    write_durable(fs::path(dir) / "metadata.json", meta.dump(1));
    write_durable(fs::path(dir) / "train_state.json", raw->request.train_state.dump(1));
    write_durable(fs::path(dir) / "config.yaml", raw->request.config_yaml);
  };
  start(std::move(save), began, seconds_since(began));
}

void CheckpointManager::export_hf(CommitJob job) {
  const auto began = Clock::now();
  finish();
  auto save = std::make_unique<InFlight>();
  save->series = &hf_series();
  save->job = std::move(job);
  save->staged = true;  // the job owns its tensors: nothing to stage
  start(std::move(save), began, seconds_since(began));
}

void CheckpointManager::start(std::unique_ptr<InFlight> owned, Clock::time_point started,
                              double previous_wait) {
  in_flight_ = std::move(owned);
  InFlight& save = *in_flight_;
  save.started = started;
  save.previous_wait_seconds = previous_wait;
  try {
    prepare(save);
  } catch (...) {
    in_flight_.reset();
    throw;
  }
  std::vector<TensorPiece>& pieces = save.request.pieces;
  bool on_device = false;
  for (const TensorPiece& p : pieces) on_device = on_device || !p.local.device().is_cpu();
  if ((options_.async || on_device) && !pieces.empty()) reserve_staging(pieces);
  if (options_.async) {
    // Device pieces: their copies are enqueued here (the current stream is this thread's),
    // and the writer waits for them; CPU pieces are copied by the background thread while
    // training computes.
    if (on_device) stage(save);
    save.stall_seconds = seconds_since(started);
    save.writer = std::thread([this, &save] {
      try {
        if (!save.staged) stage(save);
      } catch (const std::exception& e) {  // reported at the commit, on every rank
        save.report = {{"ok", false}, {"error", fmt::format("staging failed: {}", e.what())}};
        {
          std::lock_guard<std::mutex> lock(staged_mutex_);
          save.staged = true;
        }
        staged_cv_.notify_all();
        save.done = true;
        return;
      }
      write(save);
    });
    return;
  }
  if (on_device) stage(save);
  write(save);
  std::unique_ptr<InFlight> done = std::move(in_flight_);
  commit(*done);
}

void CheckpointManager::reserve_staging(const std::vector<TensorPiece>& pieces) {
  bool reuse = staging_.size() == pieces.size();
  for (size_t i = 0; reuse && i < pieces.size(); ++i) {
    reuse = staging_[i].numel() == pieces[i].local.numel() &&
            staging_[i].scalar_type() == pieces[i].local.scalar_type() &&
            staging_pinned_[i] == wants_pinned_host_buffer(pieces[i].local);
  }
  if (reuse) return;
  staging_.clear();
  staging_pinned_.clear();
  for (const TensorPiece& p : pieces) {
    const bool pinned = wants_pinned_host_buffer(p.local);  // only for CUDA pieces
    staging_.push_back(at::zeros(
        {p.local.numel()}, at::TensorOptions().dtype(p.local.scalar_type()).pinned_memory(pinned)));
    staging_pinned_.push_back(pinned);
  }
}

void CheckpointManager::wait_until_staged() {
  if (in_flight_ && in_flight_->copies && !in_flight_->copies_ordered) {
    in_flight_->copies->order_after_copies();  // on the device: the host goes on
    in_flight_->copies_ordered = true;
  }
  if (!in_flight_ || in_flight_->staged) return;
  const auto start = Clock::now();
  std::unique_lock<std::mutex> lock(staged_mutex_);
  staged_cv_.wait(lock, [this] { return in_flight_->staged.load(); });
  in_flight_->stall_seconds += seconds_since(start);
  in_flight_->staging_wait_seconds += seconds_since(start);
}

bool CheckpointManager::poll(bool stop_requested) {
  const bool pending = in_flight_ && !in_flight_->done;
  bool stop = stop_requested, any_pending = pending;
  if (comm_.world_size() > 1) {
    at::Tensor flags =
        at::tensor({static_cast<int32_t>(stop_requested), static_cast<int32_t>(pending)});
    comm_.all_reduce(flags, ReduceOp::kMax);
    stop = flags[0].item<int32_t>() != 0;
    any_pending = flags[1].item<int32_t>() != 0;
  }
  if (in_flight_ && !any_pending) {
    std::unique_ptr<InFlight> done = std::move(in_flight_);
    commit(*done);
  }
  return stop;
}

void CheckpointManager::finish() {
  if (!in_flight_) return;
  std::unique_ptr<InFlight> done = std::move(in_flight_);
  commit(*done);
}

std::vector<std::string> purge_checkpoints(const std::string& folder, int64_t keep,
                                           int64_t stale_below, const DirectorySeries& series) {
  std::vector<std::string> removed;
  const fs::path root(folder);
  std::error_code ec;
  const std::string pointed = read_pointer(root, series);
  if (keep > 0) {
    const auto steps = committed_steps(root, series.prefix, "");
    for (size_t i = 0; i + static_cast<size_t>(keep) < steps.size(); ++i) {
      if (steps[i].second == pointed) continue;
      // Out of the series first: a purge cut short leaves a `.purging` leftover (removed by a
      // later purge), never a step directory without its metadata.
      const fs::path doomed = root / (steps[i].second + ".purging");
      fs::rename(root / steps[i].second, doomed, ec);
      if (ec) continue;
      fs::remove_all(doomed, ec);
      removed.push_back(steps[i].second);
    }
  }
  const std::regex leftover(series.prefix + "-([0-9]{1,18})\\.(incomplete|replaced|purging)");
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::string name = entry.path().filename().string();
    std::smatch m;
    if (std::regex_match(name, m, leftover) && std::stoll(m[1]) < stale_below) {
      std::error_code remove_ec;
      fs::remove_all(entry.path(), remove_ec);
      if (!remove_ec) removed.push_back(name);
    }
  }
  return removed;
}

std::string describe_checkpoint(const CheckpointReader& reader) {
  const json& meta = reader.metadata();
  std::string out = fmt::format(
      "checkpoint {}\n  format {} v{}, step {}, saved on {} rank(s), {}\n", reader.dir(),
      meta.at("format").get<std::string>(), meta.at("format_version").get<int>(), reader.step(),
      meta.at("world_size").get<int64_t>(),
      reader.model_only() ? "model only" : "model + optimizer");
  uint64_t total = 0;
  out += "  files:\n";
  for (const auto& [file, info] : meta.at("files").items()) {
    total += info.at("size").get<uint64_t>();
    out += fmt::format("    {}  {} bytes  sha256 {}\n", file, info.at("size").get<uint64_t>(),
                       info.at("sha256").get<std::string>());
  }
  const auto& tensors = meta.at("tensors");
  out += fmt::format("  tensors ({}, {:.1f} MB in all):\n", tensors.size(), total / 1e6);
  for (const auto& [key, t] : tensors.items()) {
    std::vector<std::string> chunks;
    for (const json& c : t.at("chunks")) {
      chunks.push_back(fmt::format("{}[{}:{}]", c.at("file").get<std::string>(),
                                   c.at("begin").get<int64_t>(), c.at("end").get<int64_t>()));
    }
    out += fmt::format("    {}  {} [{}]  {}\n", key, t.at("dtype").get<std::string>(),
                       fmt::join(t.at("shape").get<std::vector<int64_t>>(), ", "),
                       fmt::join(chunks, " "));
  }
  return out;
}

}  // namespace strata
