// The training loop (trainer/train.cpp) and what a run reports.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "parallel/process_group.h"
#include "trainer/config/config.h"

namespace strata {

struct TrainSummary {
  std::vector<double> losses;                          // training loss of every step
  std::vector<std::pair<int64_t, double>> val_losses;  // (step, validation loss)
  int64_t num_parameters = 0;
  double tokens_per_s = 0.0;  // over the whole run, evaluation excluded
  double train_seconds = 0.0;
  int64_t start_step = 0;    // the step the run resumed from (0: from scratch)
  std::string resumed_from;  // the checkpoint directory loaded, if any
  bool stopped = false;      // a stop signal ended the run early (after saving)
};

// What a run gets besides its config.
struct TrainOptions {
  // resume_path, additional_load_paths and a PEFT adapter's base as local directories
  // (themselves, or a Hub spec's snapshot in the HF cache), by the text the config gives
  // (resolve_load_paths).
  std::map<std::string, std::string> local_dirs;
  // Test hook (CheckpointOptions::before_write): runs before each rank writes a save's files.
  std::function<void(int rank, int64_t step)> before_checkpoint_write;
};

// Runs the job described by `config` (already validated for `group.world_size()`).
// Writes <run_dir>/config.yaml, metrics and samples; prints progress on the main rank.
TrainSummary train(const Config& config, const ProcessGroup& group,
                   const TrainOptions& options = {});

}  // namespace strata
