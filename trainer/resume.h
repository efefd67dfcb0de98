// Where a run's state comes from at start-up, and loading it (docs/architecture.md "Resume and
// loading"): the run's own latest checkpoint, else checkpoint.resume_path (a Strata
// checkpoint or a Hugging Face model directory), else from scratch.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/sharded_checkpoint.h"
#include "parallel/communicator.h"
#include "trainer/config.h"
#include "trainer/converter.h"
#include "trainer/optimizer.h"
#include "trainer/train_state.h"

namespace strata {

// A further source of weights (after the primary one): a PEFT adapter's LoRA factors, an HF
// model directory's base weights, or a Strata checkpoint's parameters.
struct LoadSource {
  enum class Kind { kStrata, kHf, kPeft };
  std::string given;  // as the config names it
  std::string dir;    // local directory (a Strata step directory for kStrata)
  Kind kind = Kind::kHf;
};

// Where the run's state comes from (decided by rank 0, the same on every rank).
struct ResumePlan {
  std::string dir;           // step directory; empty: from scratch
  std::string given;         // the primary source as the config names it
  std::string reason;        // why, for the start-up log
  bool weights_only = false; // parameters only: step 0, fresh optimizer, data and schedule
  bool own = false;          // from the run's own checkpoint folder
  bool hf = false;           // a Hugging Face model directory (weights only)
  std::vector<LoadSource> extra;  // merged in order after `dir`: PEFT adapters, additional_load_paths

  std::string to_json() const;
  static ResumePlan from_json(const std::string& text);
  // Rank 0 planned with its own local directories; on another node a Hub snapshot may live
  // elsewhere (another HF_HOME): every source named in `local_dirs` moves to this rank's
  // directory, keeping the part below it (e.g. a step directory).
  void relocate(const std::map<std::string, std::string>& rank0_dirs, const std::map<std::string, std::string>& mine);
};

// Decides on rank 0 (the caller broadcasts the plan). `local_dir` maps a path as the config
// writes it (resume_path, additional_load_paths, a PEFT adapter's base) to its local
// directory (a Hub spec's snapshot). Throws CheckpointError for a bad resume_path, load_step
// or additional_load_paths entry.
ResumePlan plan_resume(const CheckpointConfig& k, const std::filesystem::path& folder,
                       const std::function<std::string(const std::string&)>& local_dir);

// adapter-only checkpoints (a converter with `save: adapter_only`) hold the converters' keys
// and record the base they apply to: every base source with a fingerprint of its files
// (SHA-256 over names, sizes and contents of its *.safetensors and *.json). Resuming one
// reloads each base and refuses a changed one.
std::string source_fingerprint(const std::string& dir);
// The bases of a run about to train: recorded in its own adapter-only checkpoint, else the
// plan's sources other than PEFT adapters. Throws when there is none.
nlohmann::json adapter_only_bases(const ResumePlan& plan);

// The paths the run may load from, as the config writes them, for resolving Hub specs up front:
// resume_path, additional_load_paths, and the base a PEFT adapter among them names.
// `resolve` turns one into its local directory (collectively).
std::map<std::string, std::string> resolve_load_paths(const CheckpointConfig& k,
                                                      const std::function<std::string(const std::string&)>& resolve);

// Loads what `plan` names (on every rank, agreeing on failures) and returns where training
// continues. A model-only checkpoint gives the weights (and, from the run's own folder, the
// step and data position); resume_model_only gives the weights only.
struct Resumed {
  int64_t step = 0, data_step_offset = 0, lr_step_offset = 0;
  uint64_t data_seed = 0, sample_seed = 0;
  std::set<std::string> loaded;  // parameter FQNs filled from the checkpoint
};

using PiecesOf = std::function<std::vector<TensorPiece>(const AdamW*, PieceUse)>;
using ResumeLog = std::function<void(const std::string&)>;

// Each further source in plan.extra fills the keys it has; a key two sources provide is an
// error naming both; one log line per source says how many tensors it gave.
Resumed load_resume_source(const ResumePlan& plan, const ModelConfig& mc, const CheckpointConfig& kc,
                           const Converters& converters, const std::vector<ConverterConfig>& converter_configs,
                           int64_t job_seed, int64_t total_steps, Communicator& comm,
                           AdamW& optimizer, const PiecesOf& pieces_of, const ResumeLog& log);

}  // namespace strata
