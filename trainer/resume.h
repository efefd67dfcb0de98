// Where a run's state comes from at start-up, and loading it (DESIGN.md "Loading and
// resume_path"): the run's own latest checkpoint, else checkpoint.resume_path (a Strata
// checkpoint or a Hugging Face model directory), else from scratch.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/sharded_checkpoint.h"
#include "parallel/communicator.h"
#include "trainer/config.h"
#include "trainer/optimizer.h"
#include "trainer/train_state.h"

namespace strata {

// Where the run's state comes from (decided by rank 0, the same on every rank).
struct ResumePlan {
  std::string dir;           // step directory; empty: from scratch
  std::string reason;        // why, for the start-up log
  bool weights_only = false; // parameters only: step 0, fresh optimizer, data and schedule
  bool own = false;          // from the run's own checkpoint folder
  bool hf = false;           // a Hugging Face model directory (weights only)
};

// Decides on rank 0 (the caller broadcasts the plan). Throws CheckpointError for a bad
// resume_path or load_step.
ResumePlan plan_resume(const CheckpointConfig& k, const std::filesystem::path& folder);

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

Resumed load_resume_source(const ResumePlan& plan, const ModelConfig& mc, const CheckpointConfig& kc,
                           int64_t job_seed, int64_t total_steps, Communicator& comm,
                           AdamW& optimizer, const PiecesOf& pieces_of, const ResumeLog& log);

}  // namespace strata
