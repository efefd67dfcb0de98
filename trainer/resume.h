// Where a run's state comes from at start-up, and restoring it (docs/architecture.md "Resume
// and loading"): the run's own latest checkpoint, else checkpoint.resume_path (a Strata
// checkpoint, an HF model directory, a PEFT adapter on its base), else from scratch; then
// checkpoint.additional_load_paths. The weights load through weight_sources.h; this file adds
// the policy and the training state (step, optimizer, data position, schedule, seeds).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json_fwd.hpp>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/sharded_checkpoint.h"
#include "parallel/communicator.h"
#include "trainer/config/config.h"
#include "trainer/optim/adamw.h"
#include "trainer/state_pieces.h"
#include "trainer/train_state.h"
#include "trainer/weight_sources.h"

namespace strata {

// Where the run's state comes from (decided by rank 0, the same on every rank).
struct ResumePlan {
  std::string dir;            // the primary source's directory (a step directory); empty: none
  std::string given;          // the primary source as the config names it
  std::string reason;         // why, for the start-up log
  bool weights_only = false;  // parameters only: step 0, fresh optimizer, data and schedule
  bool own = false;           // from the run's own checkpoint folder
  bool hf = false;            // the primary source is a Hugging Face model directory
  std::vector<WeightSource>
      extra;  // merged in order after the primary: PEFT adapters, bases, additional_load_paths

  std::string to_json() const;
  static ResumePlan from_json(const std::string& text);
  // Rank 0 planned with its own local directories; on another node a Hub snapshot may live
  // elsewhere (another HF_HOME): every source named in `local_dirs` moves to this rank's
  // directory, keeping the part below it (e.g. a step directory).
  void relocate(const std::map<std::string, std::string>& rank0_dirs,
                const std::map<std::string, std::string>& mine);
};

// Decides on rank 0 (the caller broadcasts the plan). `local_dir` maps a path as the config
// writes it (resume_path, additional_load_paths, a PEFT adapter's base) to its local
// directory (a Hub spec's snapshot). Throws CheckpointError for a bad resume_path, load_step
// or additional_load_paths entry, and for an adapter-only checkpoint whose base changed.
ResumePlan plan_resume(const CheckpointConfig& k, const std::filesystem::path& folder,
                       const LocalDir& local_dir);

// The bases an adapter-only checkpoint of this run records (metadata.json "adapter_only"):
// those of its own adapter-only checkpoint, else the plan's sources other than PEFT adapters,
// each with its fingerprint. Throws when there is none.
nlohmann::json adapter_only_record(const ResumePlan& plan);

// The paths the run may load from, as the config writes them, for resolving Hub specs up front:
// resume_path, additional_load_paths, and the base a PEFT adapter among them names.
// `resolve` turns one into its local directory (collectively).
std::map<std::string, std::string> resolve_load_paths(const CheckpointConfig& k,
                                                      const LocalDir& resolve);

// What resuming restored: the run's position and the parameters filled from sources.
struct Resumed {
  TrainState state;
  std::set<std::string> loaded;
};

// This rank's checkpoint pieces: parameters (optimizer null) or parameters and AdamW moments.
using PiecesOf = std::function<std::vector<TensorPiece>(const AdamW*, PieceUse)>;
using ResumeLog = std::function<void(const std::string&)>;

// Loads what `plan` names on every rank (agreeing on failures). The primary Strata checkpoint
// gives the weights and, unless weights_only, excluded by exclude_from_loading, or a
// model-only checkpoint of another run, the optimizer, schedule, data position and seeds;
// every other source gives weights (weight_sources.h).
Resumed resume(const ResumePlan& plan, const CheckpointConfig& kc, int64_t job_seed,
               int64_t total_steps, const WeightTarget& target, AdamW& optimizer,
               const PiecesOf& pieces_of, Communicator& comm, const ResumeLog& log);

}  // namespace strata
