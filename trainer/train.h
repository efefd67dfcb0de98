// The training loop: data -> model (init contract) -> AdamW steps with gradient
// accumulation and clipping -> periodic validation, samples and metrics.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "parallel/process_group.h"
#include "trainer/config.h"

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

// Runs the job described by `config` (already validated for `group.world_size()`).
// Writes <run_dir>/config.yaml, metrics and samples; prints progress on the main rank.
TrainSummary train(const Config& config, const ProcessGroup& group);

}  // namespace strata
